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
