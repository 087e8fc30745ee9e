//! The gateway's configuration (configs/gateway.toml), loaded through tollgate-core's layered loader.

use std::{net::SocketAddr, path::Path};

use figment::Figment;
use serde::{Deserialize, Serialize};
use tollgate_core::{
    config::{comma_list, load, ConfigError, ConfigSpec},
    net::Cidr,
};
use url::Url;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub database_url: String,
    pub redis_url: String,
    /// Address for client traffic (`IP:port`).
    pub listen: SocketAddr,
    /// Address for /metrics, /health and /ready (`IP:port`).
    pub admin_listen: SocketAddr,
    /// Base URL of the OpenAI-compatible upstream (LiteLLM); a path in it prefixes every request.
    pub upstream_url: Url,
    /// The credential the gateway presents upstream (environment only).
    pub upstream_api_key: Option<String>,
    /// PEM bundle of the CAs an `https://` upstream's certificate must chain to (instead of the
    /// system's roots).
    pub upstream_ca_file: Option<String>,
    /// How often the upstream's host name is resolved again (0: only at start).
    pub upstream_resolve_interval_seconds: u64,
    /// PEM certificate chain and private key: when both are set the client listener speaks TLS.
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub migrate_on_start: bool,
    /// Largest request body accepted (bytes); larger ones get 413.
    pub max_body_bytes: usize,
    pub upstream_connect_timeout_ms: u64,
    /// Longest wait for the upstream's next byte (first byte included); beyond it: 504.
    pub upstream_timeout_seconds: u64,
    /// Paths besides chat/completions, completions and embeddings that are passed through with
    /// authentication, authorization and metering (JSON bodies naming a model).
    #[serde(deserialize_with = "comma_list")]
    pub passthrough_paths: Vec<String>,
    /// Client headers forwarded to the upstream besides content-type, accept and user-agent
    /// (lowercase names). Credentials, framing, `x-tollgate-*` and LiteLLM's control headers
    /// are refused at start.
    #[serde(deserialize_with = "comma_list")]
    pub forward_request_headers: Vec<String>,
    /// Request body fields refused with 400 (a name, `metadata.<name>`, or a prefix ending in
    /// `*`). The default lists the fields LiteLLM acts on to route, retry, mock, cache, tag or
    /// call elsewhere; setting this replaces the list.
    #[serde(deserialize_with = "comma_list")]
    pub denied_body_fields: Vec<String>,
    /// Prompt tokens reserved for each image input.
    pub image_input_tokens: u64,
    /// Prompt tokens reserved for each audio input.
    pub audio_input_tokens: u64,
    /// How long a key stays cached without an invalidation.
    pub key_cache_ttl_seconds: u64,
    /// How long an unknown key stays cached as unknown.
    pub negative_cache_ttl_seconds: u64,
    /// Failed authentications allowed per client address and minute before 429.
    pub failed_auth_per_minute: u32,
    /// Most client addresses the failed-authentication throttle tracks at once.
    pub failed_auth_max_addresses: usize,
    /// Most keys (known and unknown) the key cache holds.
    pub key_cache_max_entries: usize,
    /// CIDR ranges of proxies whose `X-Forwarded-For` is believed (none by default).
    #[serde(deserialize_with = "comma_list")]
    pub trusted_proxies: Vec<String>,
    /// Worker threads of the proxy.
    pub threads: usize,
    /// After SIGTERM: how long in-flight requests may take to finish.
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    /// A client must send a whole request header within this long of its first byte (the first
    /// request's: of connecting); otherwise its connection is closed (408).
    pub header_read_timeout_ms: u64,
    /// How long a client connection may sit idle between requests; 0: no keep-alive.
    pub keepalive_idle_seconds: u64,
    /// Most client connections open at once (per process); beyond it new ones get 503 and are closed.
    pub max_connections: usize,
    /// Bounded queue between requests and the usage writer.
    pub usage_queue_capacity: usize,
    pub usage_batch_size: usize,
    pub usage_flush_interval_ms: u64,
    /// Where usage rows wait while PostgreSQL is unreachable (replicas may share it).
    pub spool_dir: String,
    /// Most bytes of spool segments on disk; beyond it rows wait in memory (bounded, counted).
    pub spool_max_bytes: u64,
    /// Longest wait for any Redis call on the request path.
    pub redis_timeout_ms: u64,
    /// How long a reservation holds budget if its request is never settled (crashed replica).
    pub reservation_lease_seconds: u64,
    /// Completion allowance reserved when a request names no max_tokens.
    pub default_max_tokens: u64,
    /// true: while limits cannot be checked, answer 503 instead of admitting.
    pub fail_closed: bool,
    /// The most gateway replicas that run at once (e.g. the autoscaler's maximum). While Redis is
    /// away each replica admits limit / replicas, counting at least this many, so that replicas
    /// that never saw the others (started during an outage) do not each take the whole limit.
    pub expected_replicas: u32,
    /// Most settlements kept while Redis does not take them (then the oldest are given up).
    pub settlement_queue_capacity: usize,
    /// How long a quota lease (a slice of a scope's limits this replica admits from without a
    /// Redis call) lasts, in milliseconds; 0: no leases, every limited request asks Redis.
    pub lease_slice_ms: u64,
    /// true: each worker thread calls Redis over a connection of its own, on its own runtime
    /// (one Redis node only); false: every call goes through one shared connection.
    pub redis_worker_connections: bool,
    /// How often budgets in Redis are compared with PostgreSQL's rollups and raised where they
    /// missed spend; 0: never.
    pub budget_reconcile_seconds: u64,
    /// One log line per request (target `tollgate::access`, level info).
    pub access_log: bool,
    /// The share of successful requests that get an access-log line (0 to 1); every request that
    /// ends in an error status or error kind gets one regardless.
    pub access_log_sample_rate: f64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/tollgate".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            upstream_url: default_upstream(),
            upstream_api_key: None,
            upstream_ca_file: None,
            upstream_resolve_interval_seconds: 30,
            tls_cert_file: None,
            tls_key_file: None,
            migrate_on_start: true,
            max_body_bytes: 10 * 1024 * 1024,
            upstream_connect_timeout_ms: 2000,
            upstream_timeout_seconds: 600,
            passthrough_paths: vec!["/v1/moderations".into(), "/v1/rerank".into()],
            forward_request_headers: vec![],
            denied_body_fields: DENIED_BODY_FIELDS.iter().map(|f| f.to_string()).collect(),
            image_input_tokens: 2_000,
            audio_input_tokens: 2_000,
            key_cache_ttl_seconds: 60,
            negative_cache_ttl_seconds: 5,
            failed_auth_per_minute: 60,
            failed_auth_max_addresses: 100_000,
            key_cache_max_entries: 100_000,
            trusted_proxies: vec![],
            threads: 2,
            grace_period_seconds: 10,
            graceful_shutdown_timeout_seconds: 10,
            header_read_timeout_ms: 10_000,
            keepalive_idle_seconds: 60,
            max_connections: 10_000,
            usage_queue_capacity: 100_000,
            usage_batch_size: 2000,
            usage_flush_interval_ms: 200,
            spool_dir: "./tollgate-spool".into(),
            spool_max_bytes: 1024 * 1024 * 1024,
            redis_timeout_ms: 50,
            reservation_lease_seconds: 600,
            default_max_tokens: 4096,
            fail_closed: false,
            expected_replicas: 1,
            settlement_queue_capacity: 100_000,
            budget_reconcile_seconds: 60,
            lease_slice_ms: 1000,
            redis_worker_connections: true,
            access_log: true,
            access_log_sample_rate: 1.0,
        }
    }
}

pub const SPEC: ConfigSpec<'static> = ConfigSpec {
    env: &[
        ("DATABASE_URL", "database_url"),
        ("REDIS_URL", "redis_url"),
        ("LISTEN", "listen"),
        ("ADMIN_LISTEN", "admin_listen"),
        ("UPSTREAM_URL", "upstream_url"),
        ("UPSTREAM_API_KEY", "upstream_api_key"),
        ("UPSTREAM_CA_FILE", "upstream_ca_file"),
        ("UPSTREAM_RESOLVE_INTERVAL_SECONDS", "upstream_resolve_interval_seconds"),
        ("TLS_CERT_FILE", "tls_cert_file"),
        ("TLS_KEY_FILE", "tls_key_file"),
        ("MIGRATE_ON_START", "migrate_on_start"),
        ("MAX_BODY_BYTES", "max_body_bytes"),
        ("UPSTREAM_TIMEOUT_SECONDS", "upstream_timeout_seconds"),
        ("PASSTHROUGH_PATHS", "passthrough_paths"),
        ("FORWARD_REQUEST_HEADERS", "forward_request_headers"),
        ("DENIED_BODY_FIELDS", "denied_body_fields"),
        ("KEY_CACHE_TTL_SECONDS", "key_cache_ttl_seconds"),
        ("FAILED_AUTH_PER_MINUTE", "failed_auth_per_minute"),
        ("TRUSTED_PROXIES", "trusted_proxies"),
        ("FAILED_AUTH_MAX_ADDRESSES", "failed_auth_max_addresses"),
        ("KEY_CACHE_MAX_ENTRIES", "key_cache_max_entries"),
        ("THREADS", "threads"),
        ("GRACE_PERIOD_SECONDS", "grace_period_seconds"),
        ("GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", "graceful_shutdown_timeout_seconds"),
        ("HEADER_READ_TIMEOUT_MS", "header_read_timeout_ms"),
        ("KEEPALIVE_IDLE_SECONDS", "keepalive_idle_seconds"),
        ("MAX_CONNECTIONS", "max_connections"),
        ("USAGE_FLUSH_INTERVAL_MS", "usage_flush_interval_ms"),
        ("SPOOL_DIR", "spool_dir"),
        ("SPOOL_MAX_BYTES", "spool_max_bytes"),
        ("REDIS_TIMEOUT_MS", "redis_timeout_ms"),
        ("RESERVATION_LEASE_SECONDS", "reservation_lease_seconds"),
        ("DEFAULT_MAX_TOKENS", "default_max_tokens"),
        ("FAIL_CLOSED", "fail_closed"),
        ("EXPECTED_REPLICAS", "expected_replicas"),
        ("BUDGET_RECONCILE_SECONDS", "budget_reconcile_seconds"),
        ("LEASE_SLICE_MS", "lease_slice_ms"),
        ("REDIS_WORKER_CONNECTIONS", "redis_worker_connections"),
        ("ACCESS_LOG", "access_log"),
        ("ACCESS_LOG_SAMPLE_RATE", "access_log_sample_rate"),
    ],
    secrets: &["upstream_api_key"],
};

/// Body fields a LiteLLM proxy acts on when its caller holds the master key: routing and
/// fallbacks, credentials and endpoints, retries and timeouts, mocking, caching, logging, tags,
/// budgets, guardrails and custom pricing. None is part of OpenAI's API.
pub const DENIED_BODY_FIELDS: &[&str] = &[
    "fallbacks",
    "context_window_fallbacks",
    "content_policy_fallbacks",
    "default_fallbacks",
    "disable_fallbacks",
    "model_list",
    "model_group",
    "specific_deployment",
    "api_base",
    "base_url",
    "api_key",
    "api_version",
    "organization",
    "custom_llm_provider",
    "deployment_id",
    "aws_*",
    "vertex_*",
    "azure_*",
    "region_name",
    "extra_headers",
    "extra_body",
    "mock_*",
    "num_retries",
    "max_retries",
    "retry_policy",
    "timeout",
    "request_timeout",
    "stream_timeout",
    "cache",
    "caching",
    "no-cache",
    "no-store",
    "no-log",
    "no_log",
    "turn_off_message_logging",
    "litellm_*",
    "proxy_server_request",
    "secret_fields",
    "user_config",
    "guardrails",
    "tags",
    "input_cost_per_token",
    "output_cost_per_token",
    "input_cost_per_second",
    "output_cost_per_second",
    "context_window_fallback_dict",
    "router_settings_override",
    "routing_strategy",
    "max_fallbacks",
    "include_fallback_errors",
    "model_id",
    "passthrough_on_no_deployment",
    "priority",
    "prompt_*",
    "silent_model",
    "headers",
    "provider_specific_header",
    "ssl_verify",
    "tenant_id",
    "client_id",
    "client_secret",
    "use_litellm_proxy",
    "ttl",
    "cache_key",
    "preset_cache_key",
    "caching_groups",
    "redis_namespace",
    "success_callback",
    "failure_callback",
    "callbacks",
    "service_callback",
    "logger_fn",
    "langfuse_*",
    "langsmith_*",
    "drop_params",
    "additional_drop_params",
    "allowed_openai_params",
    "custom_prompt_dict",
    "base_model",
    "model_info",
    "max_budget",
    "budget_duration",
    "spend_logs_metadata",
    "verbose",
    "user_api_key*",
    "_*",
    "metadata.tags",
    "metadata._*",
    "metadata.caching_groups",
    "metadata.redis_namespace",
    "metadata.session_id",
    "metadata.trace_id",
    "metadata.model_group",
    "metadata.user_api_key*",
    "metadata.spend_logs_metadata",
    "metadata.guardrails",
    "metadata.disable_fallbacks",
];

impl GatewayConfig {
    /// The parsed `trusted_proxies`.
    pub fn trusted_proxy_ranges(&self) -> Result<Vec<Cidr>, ConfigError> {
        self.trusted_proxies.iter().map(|c| c.parse().map_err(|e| SPEC.invalid("trusted_proxies", e))).collect()
    }
}

/// Whether an operator may forward client header `name` upstream: never a credential, a framing
/// or hop-by-hop header, the identity headers the gateway sets, or one LiteLLM acts on.
fn forwardable(name: &str) -> bool {
    const NEVER: &[&str] = &[
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "accept-encoding",
        "x-request-id",
    ];
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid
        && !NEVER.contains(&name)
        && !["x-tollgate-", "x-litellm-", "litellm-", "x-forwarded-", "x-real-ip"].iter().any(|p| name.starts_with(p))
}

// A constant URL: parsing it cannot fail.
#[allow(clippy::expect_used)]
fn default_upstream() -> Url {
    Url::parse("http://127.0.0.1:4000").expect("default upstream URL")
}

impl GatewayConfig {
    /// Defaults < file < environment < `flags`; every URL is checked here, so a bad one stops
    /// the gateway at start with the setting's name.
    pub fn load(file: Option<&Path>, flags: Figment) -> Result<Self, ConfigError> {
        let config: Self = load(file, &SPEC, flags)?;
        SPEC.url("database_url", &config.database_url, &["postgres", "postgresql"])?;
        SPEC.redis_url("redis_url", &config.redis_url)?;
        SPEC.url("upstream_url", config.upstream_url.as_str(), &["http", "https"])?;
        config.trusted_proxy_ranges()?;
        if config.header_read_timeout_ms == 0 {
            return Err(SPEC.invalid("header_read_timeout_ms", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&config.access_log_sample_rate) {
            return Err(SPEC.invalid("access_log_sample_rate", "must be between 0 and 1"));
        }
        if config.expected_replicas == 0 {
            return Err(SPEC.invalid("expected_replicas", "must be at least 1"));
        }
        if config.max_connections == 0 {
            return Err(SPEC.invalid("max_connections", "must be at least 1"));
        }
        if config.tls_cert_file.is_some() != config.tls_key_file.is_some() {
            let missing = if config.tls_cert_file.is_none() { "tls_cert_file" } else { "tls_key_file" };
            return Err(SPEC.invalid(missing, "tls_cert_file and tls_key_file are set together"));
        }
        if config.upstream_ca_file.is_some() && config.upstream_url.scheme() != "https" {
            return Err(SPEC.invalid("upstream_ca_file", "is only used with an https:// upstream_url"));
        }
        if config.upstream_resolve_interval_seconds > 86_400 {
            return Err(SPEC.invalid("upstream_resolve_interval_seconds", "must be at most 86400 (a day)"));
        }
        if let Some(name) = config.forward_request_headers.iter().find(|h| !forwardable(h)) {
            return Err(SPEC.invalid("forward_request_headers", format!("`{name}` may not be forwarded")));
        }
        Ok(config)
    }
}
