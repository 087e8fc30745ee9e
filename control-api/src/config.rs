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
    ],
    secrets: &["admin_api_keys", "jwt.secret", "litellm.api_key"],
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
        Ok(config)
    }

    /// The parsed `trusted_proxies`.
    pub fn trusted_proxy_ranges(&self) -> Result<Vec<Cidr>, ConfigError> {
        self.trusted_proxies.iter().map(|c| c.parse().map_err(|e| SPEC.invalid("trusted_proxies", e))).collect()
    }
}

/// An optional URL where an empty value (e.g. `TOLLGATE_LITELLM_URL=`) means none.
fn optional_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Url>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(url) => Url::parse(url).map(Some).map_err(|e| serde::de::Error::custom(format!("{e} in {url:?}"))),
    }
}
