//! The gateway's configuration (configs/gateway.toml), loaded through tollgate-core's layered loader.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tollgate_core::config::{load, ConfigError, ConfigSpec};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub database_url: String,
    pub redis_url: String,
    /// Address for client traffic.
    pub listen: String,
    /// Address for /metrics, /health and /ready.
    pub admin_listen: String,
    pub upstream_url: String,
    /// The credential the gateway presents upstream (environment only).
    pub upstream_api_key: Option<String>,
    pub migrate_on_start: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/tollgate".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            upstream_url: "http://127.0.0.1:4000".into(),
            upstream_api_key: None,
            migrate_on_start: true,
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
        ("MIGRATE_ON_START", "migrate_on_start"),
    ],
    secrets: &["upstream_api_key"],
};

impl GatewayConfig {
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        load(file, &SPEC, figment::Figment::new())
    }
}
