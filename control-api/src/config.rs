//! The control API's configuration (configs/control-api.toml), loaded through tollgate-core's
//! layered loader. Secrets (admin keys, JWT secret, LiteLLM key) come only from the environment.
//! Addresses and URLs are parsed and checked as the configuration loads, so a bad one stops the
//! control API at start, naming the setting, instead of failing on first use.

use std::{collections::HashMap, net::SocketAddr, path::Path};

use figment::Figment;
use reqwest::Url;
use serde::{Deserialize, Deserializer, Serialize};
use tollgate_core::{
    config::{comma_list, load, ConfigError, ConfigSpec},
    limits::Limits,
    net::Cidr,
    roles::Role,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlApiConfig {
    pub database_url: String,
    pub redis_url: String,
    /// Address for the control API (`IP:port`).
    pub listen: SocketAddr,
    /// When set, `/metrics` is served here, without credentials (for Prometheus on a private
    /// network), and no longer on `listen`; when not, `/metrics` on `listen` takes an admin or
    /// adminReadonly credential like the rest of the API.
    pub metrics_listen: Option<SocketAddr>,
    /// Plaintext admin API keys (environment only); hashed at start-up.
    #[serde(deserialize_with = "comma_list")]
    pub admin_api_keys: Vec<String>,
    pub migrate_on_start: bool,
    /// CIDR ranges of proxies whose `X-Forwarded-For` names the client in the audit trail (none
    /// by default: the peer is the client).
    #[serde(deserialize_with = "comma_list")]
    pub trusted_proxies: Vec<String>,
    pub jwt: JwtConfig,
    pub litellm: LitellmConfig,
    pub alerts: AlertsConfig,
    pub webhook: WebhookConfig,
    /// Limits given to new users and keys whose request names none.
    pub defaults: DefaultsConfig,
}

/// Limits applied when a request creating a user or a key gives no `limits` (an explicit
/// `limits`, even `{}`, wins). Empty (the default): none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsConfig {
    /// A new user's limits: `POST /users` without `limits`, and users created on first sight of
    /// a JWT.
    pub user_limits: Limits,
    /// A new key's limits: `POST /keys` without `limits`. They are an administrator's (the
    /// operator's), so they become the key's `admin_limits` too: its owner may tighten them,
    /// only an administrator may lift them.
    pub key_limits: Limits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// HS256 shared secret (environment only).
    pub secret: Option<String>,
    /// JWKS of an OIDC issuer, for RS256 tokens.
    #[serde(deserialize_with = "optional_url")]
    pub jwks_url: Option<Url>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub roles_claim: String,
    pub groups_claim: String,
    /// Group name -> role, used when the token has no roles claim.
    pub group_roles: HashMap<String, Role>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// How often the JWKS is refetched on a timer, so that keys the issuer removed stop
    /// verifying (an unknown `kid` also triggers a fetch, at most every 10 s).
    pub jwks_refresh_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LitellmConfig {
    /// Base URL of LiteLLM; `/model/info` is read below it.
    #[serde(deserialize_with = "optional_url")]
    pub url: Option<Url>,
    /// Credential for LiteLLM's `/model/info` (environment only).
    pub api_key: Option<String>,
    pub timeout_seconds: u64,
    /// Sync the catalogue from LiteLLM at start and then every this many seconds (0: only when
    /// asked through `POST /models/sync`). One replica syncs at a time.
    pub sync_interval_seconds: u64,
}

/// Budget alerts: the scanner that turns spend into `budget.threshold` and `limit.exceeded`
/// events (see alerts.rs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often one replica (under an advisory lock) compares every budget's spend with its
    /// thresholds, in seconds (0: never; no events are made).
    pub scan_interval_seconds: u64,
    /// Fractions of max_budget at which `budget.threshold` is sent, for budgets whose limits
    /// name no `alert_thresholds`.
    #[serde(deserialize_with = "threshold_list")]
    pub thresholds: Vec<f64>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self { scan_interval_seconds: 5, thresholds: vec![0.8, 1.0] }
    }
}

/// Where events are delivered (see webhooks.rs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// The receiver (`http` or `https`); unset: events are recorded and listed, not delivered.
    #[serde(deserialize_with = "optional_url")]
    pub url: Option<Url>,
    /// HMAC-SHA256 key of `x-tollgate-signature` (environment only; required with a url).
    pub secret: Option<String>,
    /// Per delivery attempt.
    pub timeout_seconds: u64,
    /// The wait after the first failed attempt, doubling with each failure up to an hour;
    /// attempts go on for 24 hours after the event, then it is marked failed.
    pub retry_base_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self { url: None, secret: None, timeout_seconds: 10, retry_base_ms: 10_000 }
    }
}

impl Default for LitellmConfig {
    fn default() -> Self {
        Self { url: None, api_key: None, timeout_seconds: 10, sync_interval_seconds: 300 }
    }
}

impl Default for ControlApiConfig {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/tollgate".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            metrics_listen: None,
            admin_api_keys: Vec::new(),
            migrate_on_start: true,
            trusted_proxies: Vec::new(),
            jwt: JwtConfig::default(),
            litellm: LitellmConfig::default(),
            alerts: AlertsConfig::default(),
            webhook: WebhookConfig::default(),
            defaults: DefaultsConfig::default(),
        }
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            secret: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            roles_claim: "roles".into(),
            groups_claim: "groups".into(),
            group_roles: HashMap::from([
                ("litemaas-admins".into(), Role::Admin),
                ("litemaas-readonly".into(), Role::AdminReadonly),
                ("litemaas-users".into(), Role::User),
            ]),
            leeway_seconds: 60,
            jwks_refresh_seconds: 300,
        }
    }
}

/// The longest model-sync interval: beyond it a timer's deadline could overflow the clock.
const MAX_SYNC_INTERVAL_SECONDS: u64 = 365 * 24 * 3600;

pub const SPEC: ConfigSpec<'static> = ConfigSpec {
    env: &[
        ("DATABASE_URL", "database_url"),
        ("REDIS_URL", "redis_url"),
        ("API_LISTEN", "listen"),
        ("METRICS_LISTEN", "metrics_listen"),
        ("ADMIN_API_KEYS", "admin_api_keys"),
        ("MIGRATE_ON_START", "migrate_on_start"),
        ("TRUSTED_PROXIES", "trusted_proxies"),
        ("JWT_SECRET", "jwt.secret"),
        ("JWT_JWKS_URL", "jwt.jwks_url"),
        ("JWT_ISSUER", "jwt.issuer"),
        ("JWT_AUDIENCE", "jwt.audience"),
        ("JWT_LEEWAY_SECONDS", "jwt.leeway_seconds"),
        ("JWT_JWKS_REFRESH_SECONDS", "jwt.jwks_refresh_seconds"),
        ("LITELLM_URL", "litellm.url"),
        ("LITELLM_API_KEY", "litellm.api_key"),
        ("MODEL_SYNC_INTERVAL_SECONDS", "litellm.sync_interval_seconds"),
        ("DEFAULT_USER_LIMITS", "defaults.user_limits"),
        ("DEFAULT_KEY_LIMITS", "defaults.key_limits"),
        ("ALERT_SCAN_INTERVAL_SECONDS", "alerts.scan_interval_seconds"),
        ("ALERT_THRESHOLDS", "alerts.thresholds"),
        ("WEBHOOK_URL", "webhook.url"),
        ("WEBHOOK_SECRET", "webhook.secret"),
        ("WEBHOOK_TIMEOUT_SECONDS", "webhook.timeout_seconds"),
        ("WEBHOOK_RETRY_BASE_MS", "webhook.retry_base_ms"),
    ],
    secrets: &["admin_api_keys", "jwt.secret", "litellm.api_key", "webhook.secret"],
};

impl ControlApiConfig {
    /// Defaults < file < environment < `flags`; every address and URL is checked here.
    pub fn load(file: Option<&Path>, flags: Figment) -> Result<Self, ConfigError> {
        let config: Self = load(file, &SPEC, flags)?;
        SPEC.url("database_url", &config.database_url, &["postgres", "postgresql"])?;
        SPEC.redis_url("redis_url", &config.redis_url)?;
        if let Some(url) = &config.jwt.jwks_url {
            SPEC.url("jwt.jwks_url", url.as_str(), &["http", "https"])?;
        }
        if let Some(url) = &config.litellm.url {
            SPEC.url("litellm.url", url.as_str(), &["http", "https"])?;
        }
        config.trusted_proxy_ranges()?;
        if config.litellm.sync_interval_seconds > MAX_SYNC_INTERVAL_SECONDS {
            let reason = format!("must be at most {MAX_SYNC_INTERVAL_SECONDS} (a year); 0 turns the schedule off");
            return Err(SPEC.invalid("litellm.sync_interval_seconds", reason));
        }
        if config.jwt.jwks_refresh_seconds == 0 {
            return Err(SPEC.invalid("jwt.jwks_refresh_seconds", "must be at least 1"));
        }
        for (key, limits) in [
            ("defaults.user_limits", &config.defaults.user_limits),
            ("defaults.key_limits", &config.defaults.key_limits),
        ] {
            limits.validate().map_err(|e| SPEC.invalid(key, format!("{}: {}", e.field, e.message)))?;
        }
        config.check_alerts()?;
        Ok(config)
    }

    /// The alert and webhook settings: a year at most between scans, thresholds as a budget's
    /// own `alert_thresholds`, an http(s) webhook with its secret, a timeout, a retry base of at
    /// most an hour.
    pub fn check_alerts(&self) -> Result<(), ConfigError> {
        if self.alerts.scan_interval_seconds > MAX_SYNC_INTERVAL_SECONDS {
            let reason = format!("must be at most {MAX_SYNC_INTERVAL_SECONDS} (a year); 0 turns the scanner off");
            return Err(SPEC.invalid("alerts.scan_interval_seconds", reason));
        }
        tollgate_core::limits::check_thresholds(&self.alerts.thresholds)
            .map_err(|e| SPEC.invalid("alerts.thresholds", e))?;
        if let Some(url) = &self.webhook.url {
            SPEC.url("webhook.url", url.as_str(), &["http", "https"])?;
            if self.webhook.secret.as_deref().is_none_or(|s| s.trim().is_empty()) {
                return Err(SPEC.invalid("webhook.secret", "is required with webhook.url: events are signed with it"));
            }
        }
        if !(1..=300).contains(&self.webhook.timeout_seconds) {
            return Err(SPEC.invalid("webhook.timeout_seconds", "must be between 1 and 300"));
        }
        if !(1..=3_600_000).contains(&self.webhook.retry_base_ms) {
            return Err(SPEC.invalid("webhook.retry_base_ms", "must be between 1 and 3600000 (an hour)"));
        }
        Ok(())
    }

    /// The parsed `trusted_proxies`.
    pub fn trusted_proxy_ranges(&self) -> Result<Vec<Cidr>, ConfigError> {
        self.trusted_proxies.iter().map(|c| c.parse().map_err(|e| SPEC.invalid("trusted_proxies", e))).collect()
    }
}

/// Thresholds given as a list of numbers, or as one comma-separated string (the form an
/// environment variable takes: `TOLLGATE_ALERT_THRESHOLDS=0.5,0.8,1`).
fn threshold_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(f64),
        Text(String),
        Many(Vec<f64>),
    }
    match Raw::deserialize(d)? {
        Raw::One(t) => Ok(vec![t]),
        Raw::Many(v) => Ok(v),
        Raw::Text(s) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| t.parse::<f64>().map_err(|e| serde::de::Error::custom(format!("{e} in {t:?}"))))
            .collect(),
    }
}

/// An optional URL where an empty value (e.g. `TOLLGATE_LITELLM_URL=`) means none.
fn optional_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Url>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(url) => Url::parse(url).map(Some).map_err(|e| serde::de::Error::custom(format!("{e} in {url:?}"))),
    }
}
