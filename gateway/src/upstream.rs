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
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use pingora::{
    http::{RequestHeader, ResponseHeader},
    prelude::HttpPeer,
    protocols::tls::CaType,
    tls::x509::X509,
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

/// Where requests go. The host is resolved at start and again every
/// `upstream_resolve_interval_seconds` ([`Upstream::refresh`]), so a Kubernetes Service name or
/// a provider's DNS that moves is followed; requests take the resolved addresses in turn.
#[derive(Debug)]
pub struct Upstream {
    /// `host:port` as resolved (brackets stripped from an IPv6 literal).
    host: String,
    port: u16,
    addrs: RwLock<Arc<[SocketAddr]>>,
    next: AtomicUsize,
    /// `https`: TLS with certificate and host name verification, SNI from the host.
    pub tls: bool,
    /// The trust anchors for an https upstream when a CA file is configured (system roots
    /// otherwise).
    ca: Option<Arc<CaType>>,
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
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => anyhow::bail!("upstream_url {url}: must start with http:// or https://"),
        };
        let ca = match (&config.upstream_ca_file, tls) {
            (Some(path), true) => Some(Arc::new(load_ca_file(path)?)),
            (Some(_), false) => anyhow::bail!("upstream_ca_file is set but upstream_url {url} is not https://"),
            (None, _) => None,
        };
        let host = url.host_str().ok_or_else(|| anyhow::anyhow!("upstream_url {url} has no host"))?;
        let port = url.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
        let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let addrs =
            resolve(&bare_host, port).map_err(|e| anyhow::anyhow!("upstream host {host} does not resolve: {e}"))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Ok(Self {
            sni: bare_host.clone(),
            host: bare_host,
            port,
            addrs: RwLock::new(addrs),
            next: AtomicUsize::new(0),
            tls,
            ca,
            authority,
            base_path: url.path().trim_end_matches('/').to_string(),
            authorization: config.upstream_api_key.as_ref().filter(|k| !k.is_empty()).map(|k| format!("Bearer {k}")),
            connect_timeout: Duration::from_millis(config.upstream_connect_timeout_ms),
            read_timeout: Duration::from_secs(config.upstream_timeout_seconds),
            extra_headers: config.forward_request_headers.clone(),
        })
    }

    /// The addresses requests currently go to.
    pub fn addrs(&self) -> Arc<[SocketAddr]> {
        tollgate_core::sync::read(&self.addrs).clone()
    }

    /// Resolves the host again (blocking: call it off the request path) and takes the answer if
    /// it names any address; a failed or empty answer keeps the addresses in use.
    pub fn refresh(&self) -> anyhow::Result<bool> {
        self.take(resolve(&self.host, self.port))
    }

    fn take(&self, answer: std::io::Result<Arc<[SocketAddr]>>) -> anyhow::Result<bool> {
        let fresh = answer.map_err(|e| anyhow::anyhow!("upstream host {} does not resolve: {e}", self.host))?;
        let mut addrs = tollgate_core::sync::write(&self.addrs);
        let changed = *addrs != fresh;
        *addrs = fresh;
        Ok(changed)
    }

    /// The peer one request connects to: the resolved addresses in turn.
    pub fn peer(&self) -> Box<HttpPeer> {
        let addrs = self.addrs();
        let addr = addrs[self.next.fetch_add(1, Ordering::Relaxed) % addrs.len()];
        let mut peer = HttpPeer::new(addr, self.tls, self.sni.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.ca = self.ca.clone();
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

/// Every address `host:port` resolves to; an empty answer is an error.
fn resolve(host: &str, port: u16) -> std::io::Result<Arc<[SocketAddr]>> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"));
    }
    Ok(addrs.into())
}

/// The certificates of a PEM bundle, refused at start when it holds none.
fn load_ca_file(path: &str) -> anyhow::Result<CaType> {
    let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("upstream_ca_file {path}: {e}"))?;
    let certs = X509::stack_from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("upstream_ca_file {path}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("upstream_ca_file {path}: holds no certificate");
    }
    Ok(certs.into_boxed_slice())
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
        assert_eq!(u.addrs()[0].port(), 4000);
        assert_eq!(u.authority, "127.0.0.1:4000");
        assert_eq!(u.base_path, "/litellm");
        assert!(!u.tls);
        assert_eq!(upstream("http://localhost").unwrap().addrs()[0].port(), 80);
        let tls = upstream("https://localhost/v1").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.addrs()[0].port(), 443);
        assert_eq!(tls.sni, "localhost");
        assert_eq!(tls.authority, "localhost");
        assert!(upstream("ftp://x").is_err());
        assert!(upstream("http://[::1]:4000").unwrap().addrs()[0].is_ipv6());
    }

    #[test]
    fn a_ca_file_needs_https_and_certificates() {
        let config = |url: &str, ca: &str| GatewayConfig {
            upstream_url: url.parse().unwrap(),
            upstream_ca_file: Some(ca.into()),
            ..Default::default()
        };
        let dir = std::env::temp_dir().join(format!("tollgate-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let not_pem = not_pem.display().to_string();
        let err = |c: GatewayConfig| Upstream::new(&c).unwrap_err().to_string();
        assert!(err(config("http://localhost", &not_pem)).contains("not https://"));
        assert!(err(config("https://localhost", &not_pem)).contains("upstream_ca_file"));
        assert!(err(config("https://localhost", "/nonexistent/ca.pem")).contains("/nonexistent/ca.pem"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn refresh_follows_the_answer_and_keeps_the_last_good_one() {
        let u = upstream("http://127.0.0.1:4000").unwrap();
        let moved: Arc<[SocketAddr]> =
            vec!["127.0.0.2:4000".parse().unwrap(), "127.0.0.3:4000".parse().unwrap()].into();
        assert!(u.take(Ok(moved.clone())).unwrap());
        assert_eq!(u.addrs(), moved);
        // Requests take the addresses in turn.
        let picked: Vec<_> = (0..4).map(|_| u.peer()._address.to_string()).collect();
        assert_ne!(picked[0], picked[1]);
        assert_eq!(picked[0], picked[2]);
        // An unchanged answer is no change; a failed lookup keeps what works.
        assert!(!u.take(Ok(moved.clone())).unwrap());
        assert!(u.take(Err(std::io::Error::other("SERVFAIL"))).is_err());
        assert_eq!(u.addrs(), moved);
    }
}
