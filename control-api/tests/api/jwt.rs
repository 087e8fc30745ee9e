//! Issue 10, findings 4 and 7: JWT claims (HS256 and RS256) and the JWKS cache, against a JWKS
//! server of the test's own whose answer, latency and fetch count the test controls.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{extract::State, routing::get, Router};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::common::*;

#[derive(Clone, Default)]
struct Jwks {
    body: Arc<Mutex<String>>,
    delay: Arc<Mutex<Duration>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks_server(jwks: Jwks) -> SocketAddr {
    *jwks.body.lock().unwrap() = JWKS.to_string();
    let router = Router::new()
        .route(
            "/jwks.json",
            get(|State(j): State<Jwks>| async move {
                j.fetches.fetch_add(1, Ordering::SeqCst);
                let delay = *j.delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                let body = j.body.lock().unwrap().clone();
                ([("content-type", "application/json")], body)
            }),
        )
        .with_state(jwks);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "claims-1", "email": "c@example.com", "roles": ["admin"], "exp": now() + 600});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// Finding 4: configured issuer and audience are required claims; `nbf` is checked; both `exp`
/// and `nbf` tolerate the configured leeway and no more.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_4_issuer_audience_required_and_nbf_checked(db: PgPool) {
    let app = TestApp::spawn_with(db.clone(), |c| {
        c.jwt.issuer = Some("https://idp.example".into());
        c.jwt.audience = Some("tollgate".into());
    })
    .await;
    let good = json!({"iss": "https://idp.example", "aud": "tollgate"});
    let cases: Vec<(&str, Value, StatusCode)> = vec![
        ("iss and aud", good.clone(), StatusCode::OK),
        ("aud as a list", json!({"iss": "https://idp.example", "aud": ["other", "tollgate"]}), StatusCode::OK),
        ("no iss", json!({"aud": "tollgate"}), StatusCode::UNAUTHORIZED),
        ("no aud", json!({"iss": "https://idp.example"}), StatusCode::UNAUTHORIZED),
        ("wrong iss", json!({"iss": "https://evil.example", "aud": "tollgate"}), StatusCode::UNAUTHORIZED),
        ("wrong aud", json!({"iss": "https://idp.example", "aud": "other"}), StatusCode::UNAUTHORIZED),
        (
            "nbf in an hour",
            json!({"iss": "https://idp.example", "aud": "tollgate", "nbf": now() + 3600}),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "nbf within leeway",
            json!({"iss": "https://idp.example", "aud": "tollgate", "nbf": now() + 30}),
            StatusCode::OK,
        ),
        (
            "exp within leeway",
            json!({"iss": "https://idp.example", "aud": "tollgate", "exp": now() - 30}),
            StatusCode::OK,
        ),
        (
            "exp beyond leeway",
            json!({"iss": "https://idp.example", "aud": "tollgate", "exp": now() - 120}),
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (what, extra, expected) in &cases {
        for (alg, token) in
            [("HS256", hs256_token(claims(extra.clone()))), ("RS256", rs256_token("test-key-1", claims(extra.clone())))]
        {
            let (status, body) = app.get("/api/v1/users/me", &token).await;
            assert_eq!(status, *expected, "{alg} {what}: {body}");
        }
    }

    // The leeway is configurable: with none, a token expired 30 s ago is refused.
    let strict = TestApp::spawn_with(db, |c| c.jwt.leeway_seconds = 0).await;
    let token = hs256_token(claims(json!({"exp": now() - 30})));
    let (status, _) = strict.get("/api/v1/users/me", &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let token = hs256_token(claims(json!({"nbf": now() + 30})));
    let (status, _) = strict.get("/api/v1/users/me", &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Finding 7: an unknown `kid` never stalls verification of known keys while the JWKS is being
/// fetched, fetches on unknown `kid`s are rate-limited, and keys the issuer removed stop verifying.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_7_jwks_fetches_do_not_block_and_removed_keys_stop_verifying(db: PgPool) {
    let jwks = Jwks::default();
    let addr = jwks_server(jwks.clone()).await;
    let app = TestApp::spawn_with(db, |c| {
        c.jwt.jwks_url = Some(format!("http://{addr}/jwks.json").parse().unwrap());
        c.jwt.jwks_refresh_seconds = 1;
    })
    .await;
    let app = Arc::new(app);
    // The keys are fetched at start (a verifier that fetched only on demand would have none yet).
    let started = Instant::now();
    while jwks.fetches.load(Ordering::SeqCst) == 0 && started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let known = rs256_token("test-key-1", claims(json!({})));

    // From now on every fetch takes 3 s.
    *jwks.delay.lock().unwrap() = Duration::from_secs(3);
    let unknown = rs256_token("made-up-kid", claims(json!({})));
    let mut refused = Vec::new();
    for _ in 0..5 {
        let (app, token) = (app.clone(), unknown.clone());
        refused.push(tokio::spawn(async move { app.get("/api/v1/users/me", &token).await.0 }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fetches_before = jwks.fetches.load(Ordering::SeqCst);
    let t = Instant::now();
    let (status, body) = app.get("/api/v1/users/me", &known).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(t.elapsed() < Duration::from_millis(1500), "a known key waited {:?} for a JWKS fetch", t.elapsed());
    for r in refused {
        let status = r.await.unwrap();
        assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::SERVICE_UNAVAILABLE, "{status}");
    }
    assert!(jwks.fetches.load(Ordering::SeqCst) <= fetches_before + 2, "five unknown kids must not cause five fetches");

    // The issuer drops the key: after the next scheduled refresh it no longer verifies.
    *jwks.delay.lock().unwrap() = Duration::ZERO;
    *jwks.body.lock().unwrap() = json!({"keys": []}).to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = app.get("/api/v1/users/me", &known).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "a key removed from the JWKS still verifies");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
