//! What every request shares: configuration, the upstream, caches, the usage sink, metrics, and
//! a handle to the support runtime that owns the PostgreSQL and Redis connections.

use std::sync::Arc;

use sqlx::PgPool;
use tollgate_core::net::Cidr;

use crate::{
    access_log::AccessLog,
    auth::FailedAuthThrottle,
    catalog::ModelCatalog,
    config::GatewayConfig,
    key_cache::{KeyCache, KeyLoads},
    limits::LimiterHandle,
    metrics::Metrics,
    request::BodyPolicy,
    upstream::Upstream,
    usage::UsageSink,
};

pub struct GatewayState {
    pub config: GatewayConfig,
    pub upstream: Arc<Upstream>,
    pub keys: Arc<KeyCache>,
    /// Key lookups under way, shared by concurrent misses of one key.
    pub key_loads: KeyLoads,
    pub catalog: Arc<ModelCatalog>,
    pub db: PgPool,
    /// The runtime that owns the database and Redis connections.
    pub support: tokio::runtime::Handle,
    pub usage: UsageSink,
    pub metrics: Arc<Metrics>,
    pub auth_failures: FailedAuthThrottle,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<Cidr>,
    /// What a request body may carry, and how its media inputs are counted.
    pub body_policy: BodyPolicy,
    /// Paths proxied with authentication and metering.
    pub metered_paths: Vec<String>,
    pub limiter: Arc<LimiterHandle>,
    pub access_log: AccessLog,
}

pub fn metered_paths(config: &GatewayConfig) -> Vec<String> {
    let mut paths: Vec<String> =
        ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"].iter().map(|p| p.to_string()).collect();
    paths.extend(config.passthrough_paths.iter().cloned());
    paths
}
