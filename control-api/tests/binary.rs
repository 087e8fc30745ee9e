//! The control API binary as it is deployed: what it logs about answers it meant to give (a
//! refusal or a deliberate 503 is never an ERROR line, so that operators' error alerts mean
//! something), and `/metrics` on an address of its own.

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sqlx::PgPool;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The binary on `db`, its API on a free port; `(process, API base URL, admin key, log file)`.
async fn spawn(db: &PgPool, env: &[(&str, String)]) -> (Child, String, String, PathBuf) {
    let base = std::env::var("DATABASE_URL").unwrap();
    let name = db.connect_options().get_database().unwrap().to_string();
    let database_url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let port = free_port();
    let admin = tollgate_core::keys::generate_key();
    let log = std::env::temp_dir().join(format!("tollgate-control-api-{}.log", uuid::Uuid::new_v4()));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-control-api"));
    cmd.env_clear()
        .env("TOLLGATE_DATABASE_URL", &database_url)
        .env("TOLLGATE_REDIS_URL", std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into()))
        .env("TOLLGATE_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_ADMIN_API_KEYS", &admin)
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let api = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{api}/health")).await.is_err() {
        assert!(Instant::now() < deadline, "control API did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, api, admin, log)
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn deliberate_refusals_and_503s_are_not_logged_as_errors(db: PgPool) {
    let (mut child, api, admin, log) = spawn(&db, &[]).await;
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{api}/api/v1{path}")).bearer_auth(&admin).json(&serde_json::json!({})).send()
    };
    // Model sync without a LiteLLM configured: a deliberate 503.
    assert_eq!(call(reqwest::Method::POST, "/models/sync").await.unwrap().status(), 503);
    assert_eq!(call(reqwest::Method::GET, &format!("/users/{}", uuid::Uuid::new_v4())).await.unwrap().status(), 404);
    assert_eq!(call(reqwest::Method::POST, "/users").await.unwrap().status(), 422);
    let anonymous = http.get(format!("{api}/api/v1/users")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let _ = child.kill();
    let _ = child.wait();

    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(r#""level":"ERROR""#)).collect();
    assert!(errors.is_empty(), "ERROR lines for deliberate answers:\n{}", errors.join("\n"));
    assert!(
        text.lines().any(|l| l.contains(r#""level":"WARN""#) && l.contains("503")),
        "the 503 is a warning:\n{text}"
    );
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn metrics_on_their_own_address_and_not_on_the_api(db: PgPool) {
    let metrics_port = free_port();
    let (mut child, api, admin, log) =
        spawn(&db, &[("TOLLGATE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))]).await;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let scraped = loop {
        match http.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await {
            Ok(resp) => break resp,
            Err(e) => assert!(Instant::now() < deadline, "no metrics listener: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("tollgate_control_api_http_requests_total"));
    // Not on the API's address, not even for an admin.
    let on_api = http.get(format!("{api}/metrics")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(on_api.status(), 404);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log);
}

/// `(action, created_at)` of the scheduled syncs in the audit trail, oldest first.
async fn scheduled_syncs(db: &PgPool) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    sqlx::query_as("SELECT action, created_at FROM audit_logs WHERE actor = $1 ORDER BY id")
        .bind(tollgate_control_api::model_sync::ACTOR)
        .fetch_all(db)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn models_sync_on_a_schedule_one_replica_at_a_time(db: PgPool) {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    // A LiteLLM stand-in answering the captured /model/info while `up`, 503 after.
    let info: serde_json::Value = serde_json::from_str(include_str!("fixtures/litellm/model-info.json")).unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let answer = up.clone();
    let litellm = axum::Router::new().route(
        "/model/info",
        axum::routing::get(move || {
            let (info, up) = (info.clone(), answer.load(Ordering::SeqCst));
            async move {
                let status = if up { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
                (status, axum::Json(info))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let litellm_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, litellm).await.unwrap() });

    // Two replicas, an interval of 4 s: a replica skips its turn within 2 s of any sync.
    let env = [("TOLLGATE_LITELLM_URL", litellm_url), ("TOLLGATE_MODEL_SYNC_INTERVAL_SECONDS", "4".to_string())];
    let (mut a, api_a, admin_a, log_a) = spawn(&db, &env).await;
    let (mut b, api_b, admin_b, log_b) = spawn(&db, &env).await;

    // The catalogue fills without anyone asking, once although two replicas started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scheduled_syncs(&db).await.is_empty() {
        assert!(Instant::now() < deadline, "no sync at start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let models: i64 = sqlx::query_scalar("SELECT count(*) FROM models").fetch_one(&db).await.unwrap();
    assert!(models > 0, "the sync at start made no model");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let at_start: Vec<String> = scheduled_syncs(&db).await.into_iter().map(|s| s.0).collect();
    assert_eq!(at_start, ["model.sync"], "both replicas synced at start");

    // A later turn finds LiteLLM away: the failure is in the trail, and nothing changed.
    up.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !scheduled_syncs(&db).await.iter().any(|s| s.0 == "model.sync_failed") {
        assert!(Instant::now() < deadline, "no scheduled sync after the first");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM models WHERE available").fetch_one(&db).await.unwrap();
    assert_eq!(after, models, "a failed sync changes nothing");
    let syncs = scheduled_syncs(&db).await;
    for pair in syncs.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(gap >= chrono::Duration::seconds(2), "two syncs {gap} apart: {syncs:?}");
    }

    // Each outcome counted by the replica that ran it.
    let http = reqwest::Client::new();
    let mut counted = String::new();
    for (api, admin) in [(&api_a, &admin_a), (&api_b, &admin_b)] {
        let metrics = http.get(format!("{api}/metrics")).bearer_auth(admin).send().await.unwrap();
        counted += &metrics.text().await.unwrap();
    }
    for outcome in ["success", "failure"] {
        let series = format!(r#"tollgate_control_api_model_sync_runs_total{{outcome="{outcome}"}}"#);
        assert!(counted.contains(&series), "{series} missing:\n{counted}");
    }
    for (child, log) in [(&mut a, log_a), (&mut b, log_b)] {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(log);
    }
}
