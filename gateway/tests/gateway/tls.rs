//! TLS on both sides of the gateway: an `https://` upstream whose certificate is verified
//! against the configured CA file (a call without that trust, or to a host name the certificate
//! does not name, is a 502 with a log line, never a silent plaintext or unverified call), and
//! the client listener served over TLS from certificate files.

use std::{net::TcpListener as StdListener, path::Path, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use reqwest::StatusCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

/// A throwaway certificate authority and the certificates it signs.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A certificate and its key, in PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Tollgate test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    fn leaf(&self, names: &[&str]) -> Leaf {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

/// An https front for `backend` (an `http://host:port` URL) presenting `leaf`: the port it
/// listens on (127.0.0.1).
fn tls_front(leaf: &Leaf, backend: &str) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.cert_der.clone()], leaf.key_der.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let backend = backend.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate aborts here.
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                if let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    port
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

async fn chat_ok(stack: &Stack, key: &str) {
    let resp =
        stack.chat(key, json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert!(v["usage"]["total_tokens"].as_u64().is_some_and(|t| t > 0), "{v}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn https_upstream_verified_against_the_ca_file_serves_calls_and_streams(db: PgPool) {
    let pki = Pki::new();
    let dir = TempDir::new();
    let ca = write(&dir.0, "ca.pem", &pki.ca_pem());
    let leaf = pki.leaf(&["localhost"]);
    let mut front = 0;
    let stack = Stack::start_fronted(db, vec![("TOLLGATE_UPSTREAM_CA_FILE", &ca)], |mock| {
        front = tls_front(&leaf, mock);
        format!("https://localhost:{front}")
    })
    .await;
    let (key, _, _) = stack.ready_key("tls@example.com", &["m"]).await;
    chat_ok(&stack, &key).await;

    // A stream passes through the TLS connection chunk by chunk, usage included.
    let resp = stack
        .chat(&key, json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .header("x-mock-chunks", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains(r#""finish_reason":"stop""#), "{text}");
    // The usage chunk the gateway asked for (and the client did not) is metered, not shown.
    assert!(!text.contains(r#""choices":[]"#), "{text}");

    // What reached the upstream: the gateway's credential, over the TLS front.
    let recorded = stack.recorded().await;
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded_header(&recorded[0], "authorization"), Some("Bearer sk-upstream-credential"));
    assert_eq!(recorded_header(&recorded[0], "host"), Some(format!("localhost:{front}").as_str()));
    stack.wait_usage_rows(2).await;
    let metered: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_logs WHERE stream AND completion_tokens > 0")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(metered, 1, "the stream's usage came through the TLS connection");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn https_upstream_not_trusted_is_a_502_and_a_log_line(db: PgPool) {
    // The system roots do not know this CA: the handshake must fail, not fall back to
    // plaintext or to an unverified connection.
    let pki = Pki::new();
    let leaf = pki.leaf(&["localhost"]);
    let stack = Stack::start_fronted(db, vec![], |mock| format!("https://localhost:{}", tls_front(&leaf, mock))).await;
    let (key, _, _) = stack.ready_key("untrusted@example.com", &["m"]).await;
    let resp =
        stack.chat(&key, json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unreachable", "{v}");
    assert!(stack.recorded().await.is_empty(), "nothing may reach the upstream over an unverified connection");
    wait_log(&stack, "upstream request failed").await;
    let logs = stack.gateway.logs();
    assert!(logs.contains("certificate verify failed") || logs.contains("TLSHandshakeFailure"), "{logs}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn https_upstream_with_a_certificate_for_another_host_is_a_502(db: PgPool) {
    // A trusted CA, but the certificate names another host: the host name is verified too.
    let pki = Pki::new();
    let dir = TempDir::new();
    let ca = write(&dir.0, "ca.pem", &pki.ca_pem());
    let leaf = pki.leaf(&["upstream.example.com"]);
    let stack = Stack::start_fronted(db, vec![("TOLLGATE_UPSTREAM_CA_FILE", &ca)], |mock| {
        format!("https://localhost:{}", tls_front(&leaf, mock))
    })
    .await;
    let (key, _, _) = stack.ready_key("wrong-host@example.com", &["m"]).await;
    let resp =
        stack.chat(&key, json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(stack.recorded().await.is_empty());
    wait_log(&stack, "upstream request failed").await;
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_plain_http_upstream_behind_tls_is_refused_not_downgraded(db: PgPool) {
    // An https URL pointing at a plaintext server: the handshake fails; the gateway never
    // sends the request in the clear.
    let stack =
        Stack::start_fronted(db, vec![], |mock| mock.replacen("http://127.0.0.1", "https://localhost", 1)).await;
    let (key, _, _) = stack.ready_key("plain@example.com", &["m"]).await;
    let resp =
        stack.chat(&key, json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(stack.recorded().await.is_empty(), "the request was sent in the clear");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn the_client_listener_serves_tls_from_certificate_files(db: PgPool) {
    let pki = Pki::new();
    let dir = TempDir::new();
    let leaf = pki.leaf(&["localhost"]);
    let cert = write(&dir.0, "tls.crt", &leaf.cert_pem);
    let key_file = write(&dir.0, "tls.key", &leaf.key_pem);
    let mut stack =
        Stack::start_with(db, vec![("TOLLGATE_TLS_CERT_FILE", &cert), ("TOLLGATE_TLS_KEY_FILE", &key_file)]).await;
    assert!(stack.gateway.base.starts_with("https://"));
    // A client that trusts the CA gets through; one that does not fails its handshake.
    stack.http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let (key, _, _) = stack.ready_key("client-tls@example.com", &["m"]).await;
    chat_ok(&stack, &key).await;
    let untrusting = reqwest::Client::new();
    let err = untrusting.get(format!("{}/v1/models", stack.gateway.base)).bearer_auth(&key).send().await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err}");
    // Plain HTTP on the TLS port gets no answer from the proxy.
    let plain = stack.gateway.base.replacen("https://", "http://", 1);
    let answered = reqwest::Client::new().get(format!("{plain}/v1/models")).bearer_auth(&key).send().await;
    assert!(answered.map(|r| r.status() != StatusCode::OK).unwrap_or(true));
}

#[tokio::test]
async fn a_tls_listener_with_only_a_certificate_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
        .env_clear()
        .env("TOLLGATE_TLS_CERT_FILE", "/nonexistent/tls.crt")
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls_key_file"), "{err}");
}

async fn wait_log(stack: &Stack, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !stack.gateway.logs().contains(needle) {
        assert!(std::time::Instant::now() < deadline, "no `{needle}` in the log:\n{}", stack.gateway.logs());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
