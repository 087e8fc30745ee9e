//! What the upstream receives and what comes back: where the upstream is ([`Upstream`], resolved
//! once at start), the peer each request connects to, the request header it is sent, and the
//! response headers the client may see.
//!
//! Both directions are built from allowlists, never by removing what looks dangerous: the request
//! header is made anew by the gateway (method, the allowlisted path with no query string, a few
//! content-negotiation headers from the client, the upstream's own credential and identity
//! headers the gateway sets itself), so nothing a client adds (`x-litellm-*`, a `model` query
//! parameter, a second credential) reaches the upstream; response headers the upstream adds
//! (`x-litellm-*`, `llm_provider-*`, its own rate limits) never reach the client.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    time::Duration,
};

use pingora::{
    http::{RequestHeader, ResponseHeader},
    prelude::HttpPeer,
    Result,
};

use crate::{auth::AuthContext, config::GatewayConfig, context::BodyMode};

/// Client headers copied to the upstream request; every other client header stays behind.
const FORWARDED_REQUEST_HEADERS: &[&str] = &["content-type", "accept", "user-agent"];

/// Upstream response headers the client sees (framing, caching, and what an OpenAI client reads);
/// the gateway adds its own `x-request-id` and `x-ratelimit-*`.
const FORWARDED_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "transfer-encoding",
    "cache-control",
    "date",
    "retry-after",
    "openai-version",
    "openai-processing-ms",
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
    /// Client headers the operator chose to forward besides [`FORWARDED_REQUEST_HEADERS`].
    pub extra_headers: Vec<String>,
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
            extra_headers: config.forward_request_headers.clone(),
        })
    }

    /// The peer one request connects to.
    pub fn peer(&self) -> Box<HttpPeer> {
        let mut peer = HttpPeer::new(self.addr, false, self.sni.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        Box::new(peer)
    }

    /// The request header the upstream receives for a call to the metered `endpoint`, built
    /// anew from the client's `req`.
    pub fn request_header(
        &self,
        client: &RequestHeader,
        endpoint: &str,
        request_id: &str,
        caller: Option<&AuthContext>,
        body: &BodyMode,
    ) -> Result<RequestHeader> {
        let path = format!("{}{endpoint}", self.base_path);
        let mut req = RequestHeader::build(client.method.clone(), path.as_bytes(), Some(12))?;
        let names = FORWARDED_REQUEST_HEADERS.iter().copied().chain(self.extra_headers.iter().map(String::as_str));
        for name in names {
            if let Some(value) = client.headers.get(name) {
                req.insert_header(name.to_string(), value.clone())?;
            }
        }
        req.insert_header("host", self.authority.as_str())?;
        if let Some(auth) = &self.authorization {
            req.insert_header("authorization", auth.as_str())?;
        }
        req.insert_header("x-request-id", request_id)?;
        if let Some(auth) = caller {
            req.insert_header("x-tollgate-user-id", auth.user_id.to_string())?;
            req.insert_header("x-tollgate-team-id", auth.team_id.to_string())?;
            req.insert_header("x-tollgate-key-id", auth.key_id.to_string())?;
        }
        match body {
            BodyMode::Judged(Some(out)) => req.insert_header("content-length", out.len().to_string())?,
            BodyMode::Collecting(_) => {
                // The judged body may differ in length from what the client announced.
                req.insert_header("transfer-encoding", "chunked")?
            }
            _ => {
                if let Some(len) = client.headers.get("content-length") {
                    req.insert_header("content-length", len.clone())?;
                }
            }
        }
        Ok(req)
    }

    /// Drops every upstream response header that is not on the allowlist.
    pub fn filter_response(resp: &mut ResponseHeader) {
        let dropped: Vec<_> =
            resp.headers.keys().filter(|name| !FORWARDED_RESPONSE_HEADERS.contains(&name.as_str())).cloned().collect();
        for name in dropped {
            resp.remove_header(&name);
        }
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
