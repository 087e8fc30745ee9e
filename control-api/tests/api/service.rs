//! Health, readiness, metrics, the OpenAPI document and Swagger UI.

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn health_ready_metrics_openapi_and_docs(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let get = |path: &'static str| {
        let http = app.http.clone();
        let url = format!("{}{path}", app.base);
        async move { http.get(url).send().await.unwrap() }
    };
    let health = get("/health").await;
    assert_eq!(health.status(), StatusCode::OK);
    let ready = get("/ready").await;
    assert_eq!(ready.status(), StatusCode::OK);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready, serde_json::json!({"status": "ready", "postgres": true, "redis": true}));

    // Traffic shows up under the route template, never the raw path.
    app.get(&format!("/api/v1/users/{}", uuid()), &app.admin_key.clone()).await;
    // /metrics on the API's address takes an admin credential like the API: an admin API key or
    // an admin's (or read-only admin's) JWT; a plain user's is refused.
    assert_eq!(get("/metrics").await.status(), StatusCode::UNAUTHORIZED);
    let scrape = |token: String| {
        let request = app.http.get(format!("{}/metrics", app.base)).bearer_auth(token);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(scrape(user_token("u1", "u1@example.com", &["user"])).await, StatusCode::FORBIDDEN);
    assert_eq!(scrape(user_token("a1", "a1@example.com", &["admin"])).await, StatusCode::OK);
    assert_eq!(scrape(user_token("r1", "r1@example.com", &["adminReadonly"])).await, StatusCode::OK);
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"tollgate_control_api_http_requests_total{method="GET",route="/api/v1/users/{id}",status="404"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_control_api_http_request_duration_seconds_bucket"));

    let doc: Value = get("/api/v1/openapi.json").await.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/api/v1/users", "/api/v1/keys/{id}/rotate", "/api/v1/models/sync", "/api/v1/usage", "/api/v1/audit"] {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    assert_eq!(
        doc["paths"]["/api/v1/keys"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ErrorBody"
    );
    let docs = get("/docs/").await;
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn ready_is_503_when_redis_is_unreachable(db: PgPool) {
    let mut config = tollgate_control_api::config::ControlApiConfig::default();
    // A port nothing listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    config.redis_url = format!("redis://127.0.0.1:{unused}");
    let state = tollgate_control_api::state::AppState::new(&config, db).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tollgate_control_api::serve(listener, state, std::future::pending()));
    let resp = reqwest::get(format!("http://{addr}/ready")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["postgres"], true);
    assert_eq!(body["redis"], false);
}
