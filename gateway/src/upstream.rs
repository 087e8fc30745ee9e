//! What the upstream receives: where it is ([`Upstream`], resolved once at start), the peer each
//! request connects to, and the request header it is sent, with the upstream's own credential in
//! place of the client's and identity headers the gateway sets itself.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    time::Duration,
};

use pingora::{http::RequestHeader, prelude::HttpPeer, ErrorType, OrErr, Result};

use crate::{auth::AuthContext, config::GatewayConfig, context::BodyMode};

/// Headers never forwarded upstream: hop-by-hop ones, the client's credentials, and identity
/// headers a client might try to forge.
const DROPPED_HEADERS: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "proxy-authorization",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "accept-encoding",
    "x-tollgate-user-id",
    "x-tollgate-team-id",
    "x-tollgate-key-id",
];

/// Where requests go: resolved once at start.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// The `host` header to send.
    pub authority: String,
    pub sni: String,
    /// Prefix put before each request path (from the upstream URL's path), without trailing `/`.
    pub base_path: String,
    /// `Bearer <upstream key>`, when one is configured.
    pub authorization: Option<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &GatewayConfig) -> anyhow::Result<Self> {
        let url = &config.upstream_url;
        match url.scheme() {
            "http" => {}
            "https" => anyhow::bail!(
                "upstream_url {url}: https upstreams are not supported by this build; reach the upstream over http (e.g. inside the cluster)"
            ),
            _ => anyhow::bail!("upstream_url {url}: must start with http://"),
        }
        let host = url.host_str().ok_or_else(|| anyhow::anyhow!("upstream_url {url} has no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow::anyhow!("upstream host {host} does not resolve"))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Ok(Self {
            addr,
            authority,
            sni: host.to_string(),
            base_path: url.path().trim_end_matches('/').to_string(),
            authorization: config.upstream_api_key.as_ref().filter(|k| !k.is_empty()).map(|k| format!("Bearer {k}")),
            connect_timeout: Duration::from_millis(config.upstream_connect_timeout_ms),
            read_timeout: Duration::from_secs(config.upstream_timeout_seconds),
        })
    }

    /// The peer one request connects to.
    pub fn peer(&self) -> Box<HttpPeer> {
        let mut peer = HttpPeer::new(self.addr, false, self.sni.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        Box::new(peer)
    }

    /// Rewrites the client's request header into the one the upstream receives.
    pub fn prepare(
        &self,
        req: &mut RequestHeader,
        request_id: &str,
        caller: Option<&AuthContext>,
        body: &BodyMode,
    ) -> Result<()> {
        for h in DROPPED_HEADERS {
            req.remove_header(*h);
        }
        if let Some(auth) = &self.authorization {
            req.insert_header("authorization", auth.as_str())?;
        }
        req.insert_header("host", self.authority.as_str())?;
        req.insert_header("x-request-id", request_id)?;
        if let Some(auth) = caller {
            req.insert_header("x-tollgate-user-id", auth.user_id.to_string())?;
            req.insert_header("x-tollgate-team-id", auth.team_id.to_string())?;
            req.insert_header("x-tollgate-key-id", auth.key_id.to_string())?;
        }
        if !self.base_path.is_empty() {
            let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let uri = format!("{}{pq}", self.base_path);
            req.set_uri(uri.parse().or_err(ErrorType::InternalError, "upstream uri")?);
        }
        match body {
            BodyMode::Judged(Some(out)) => {
                req.insert_header("content-length", out.len().to_string())?;
            }
            BodyMode::Collecting(_) => {
                // The judged body may differ in length from what the client announced.
                req.remove_header("content-length");
                req.insert_header("transfer-encoding", "chunked")?;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> anyhow::Result<Upstream> {
        Upstream::new(&GatewayConfig { upstream_url: url.parse()?, ..Default::default() })
    }

    #[test]
    fn upstream_urls() {
        let u = upstream("http://127.0.0.1:4000/litellm/").unwrap();
        assert_eq!(u.addr.port(), 4000);
        assert_eq!(u.authority, "127.0.0.1:4000");
        assert_eq!(u.base_path, "/litellm");
        assert_eq!(upstream("http://localhost").unwrap().addr.port(), 80);
        assert!(upstream("https://example.com").is_err());
        assert!(upstream("ftp://x").is_err());
    }
}
