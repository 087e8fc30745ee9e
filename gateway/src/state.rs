//! What every request shares: configuration, the upstream, caches, the usage sink, metrics, and
//! a handle to the support runtime that owns the PostgreSQL and Redis connections.

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    num::NonZeroU32,
    sync::Arc,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;

use crate::{
    auth::KeyCache, catalog::ModelCatalog, config::GatewayConfig, limits::LimiterHandle, metrics::Metrics,
    usage::UsageSink,
};

/// Where requests go: resolved once at start.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// The `host` header to send.
    pub authority: String,
    pub sni: String,
    /// Prefix put before each request path (from the upstream URL's path), without trailing `/`.
    pub base_path: String,
}

impl Upstream {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: axum::http::Uri = url.parse().map_err(|e| anyhow::anyhow!("upstream_url {url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => anyhow::bail!(
                "upstream_url {url:?}: https upstreams are not supported by this build; reach the upstream over http (e.g. inside the cluster)"
            ),
            _ => anyhow::bail!("upstream_url {url:?}: must start with http://"),
        }
        let host = uri.host().ok_or_else(|| anyhow::anyhow!("upstream_url {url:?} has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow::anyhow!("upstream host {host} does not resolve"))?;
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.to_string());
        Ok(Self { addr, authority, sni: host.to_string(), base_path: uri.path().trim_end_matches('/').to_string() })
    }
}

pub struct GatewayState {
    pub config: GatewayConfig,
    pub upstream: Upstream,
    /// `Bearer <upstream key>`, when one is configured.
    pub upstream_authorization: Option<String>,
    pub keys: Arc<KeyCache>,
    pub catalog: Arc<ModelCatalog>,
    pub db: PgPool,
    /// The runtime that owns the database and Redis connections.
    pub support: tokio::runtime::Handle,
    pub usage: UsageSink,
    pub metrics: Arc<Metrics>,
    pub auth_failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Paths proxied with authentication and metering.
    pub metered_paths: Vec<String>,
    pub limiter: Arc<LimiterHandle>,
}

pub fn auth_failure_limiter(per_minute: u32) -> DefaultKeyedRateLimiter<IpAddr> {
    RateLimiter::keyed(Quota::per_minute(NonZeroU32::new(per_minute.max(1)).expect("non-zero")))
}

pub fn metered_paths(config: &GatewayConfig) -> Vec<String> {
    let mut paths: Vec<String> =
        ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"].iter().map(|p| p.to_string()).collect();
    paths.extend(config.passthrough_paths.iter().cloned());
    paths
}

#[cfg(test)]
mod tests {
    use super::Upstream;

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("http://127.0.0.1:4000/litellm/").unwrap();
        assert_eq!(u.addr.port(), 4000);
        assert_eq!(u.authority, "127.0.0.1:4000");
        assert_eq!(u.base_path, "/litellm");
        assert_eq!(Upstream::parse("http://localhost").unwrap().addr.port(), 80);
        assert!(Upstream::parse("https://example.com").is_err());
        assert!(Upstream::parse("ftp://x").is_err());
    }
}
