use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn model_crud(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (status, model) = app
        .post(
            "/api/v1/models",
            &admin,
            json!({
            "id": "openai/gpt-x", "upstream_model": "gpt-x-2026", "provider": "openai",
            "context_length": 8192, "input_cost_per_token": 0.0000025, "output_cost_per_token": 0.00001,
            "restricted": true, "metadata": {"tier": "premium"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{model}");
    assert_eq!(model["input_cost_per_token"], 0.0000025);
    assert_eq!(model["enabled"], true);
    assert_eq!(model["available"], true);

    // Ids with a slash are addressed percent-encoded.
    let (status, got) = app.get("/api/v1/models/openai%2Fgpt-x", &admin).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["upstream_model"], "gpt-x-2026");
    assert_eq!(got["metadata"]["tier"], "premium");

    let (status, _) = app
        .post(
            "/api/v1/models",
            &admin,
            json!({"id": "openai/gpt-x", "input_cost_per_token": 0, "output_cost_per_token": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, updated) = app
        .patch("/api/v1/models/openai%2Fgpt-x", &admin, json!({"enabled": false, "output_cost_per_token": 0.00002}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["enabled"], false);
    assert_eq!(updated["output_cost_per_token"], 0.00002);
    assert_eq!(updated["input_cost_per_token"], 0.0000025);

    let (_, enabled) = app.get("/api/v1/models?enabled=true", &admin).await;
    assert!(enabled["data"].as_array().unwrap().is_empty());

    let (status, body) = app
        .post("/api/v1/models", &admin, json!({"id": "neg", "input_cost_per_token": -1, "output_cost_per_token": 0}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "input_cost_per_token");

    let (status, _) = app.delete("/api/v1/models/openai%2Fgpt-x", &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get("/api/v1/models/openai%2Fgpt-x", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let names: Vec<String> = app.audit_actions("model", "openai/gpt-x").await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(names, ["model.create", "model.update", "model.delete"]);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn model_with_subscriptions_cannot_be_deleted(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (user, model) = app.subscribed_user("s@example.com", "kept").await;
    let _ = user;
    let (status, body) = app.delete(&format!("/api/v1/models/{model}"), &app.admin_key.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(app.count("models").await, 1);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn sync_reads_litellm_model_info(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (status, report) = app.post("/api/v1/models/sync", &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let mut created: Vec<&str> = report["created"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    created.sort();
    assert_eq!(created, ["claude-sonnet", "gpt-4o-mini", "granite-3-8b", "text-embedding-3-small"]);

    let (_, granite) = app.get("/api/v1/models/granite-3-8b", &admin).await;
    assert_eq!(granite["upstream_model"], "openai/ibm-granite/granite-3.1-8b-instruct");
    assert_eq!(granite["provider"], "openai");
    assert_eq!(granite["context_length"], 131072);
    assert_eq!(granite["input_cost_per_token"], 0.0000002);
    assert_eq!(granite["output_cost_per_token"], 0.0000006);
    assert_eq!(granite["enabled"], true);
    assert!(granite["synced_at"].is_string());

    // No price upstream: created, but disabled until an administrator prices it.
    let (_, claude) = app.get("/api/v1/models/claude-sonnet", &admin).await;
    assert_eq!(claude["enabled"], false);
    assert_eq!(claude["provider"], "anthropic");
    assert_eq!(claude["metadata"]["pricing"], "missing");

    // A subscription to a model that later disappears upstream is kept.
    let user = app.create_user("sync@example.com").await;
    let sub = app.subscribe(&id(&user), "granite-3-8b").await;
    {
        let mut reply = app.model_info.lock().unwrap();
        let data = reply.1["data"].as_array_mut().unwrap();
        data.retain(|m| m["model_name"] != "granite-3-8b");
    }
    let (status, report) = app.post("/api/v1/models/sync", &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["unavailable"], json!(["granite-3-8b"]));
    assert!(report["created"].as_array().unwrap().is_empty());
    assert_eq!(report["updated"].as_array().unwrap().len(), 3);
    let (_, granite) = app.get("/api/v1/models/granite-3-8b", &admin).await;
    assert_eq!(granite["available"], false);
    let (status, kept) = app.get(&format!("/api/v1/subscriptions/{}", id(&sub)), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kept["status"], "active");

    let syncs: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = 'model.sync'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(syncs, 2);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn sync_failure_upstream_is_502_and_changes_nothing(db: PgPool) {
    let app = TestApp::spawn(db).await;
    *app.model_info.lock().unwrap() = (500, json!({"error": "boom"}));
    let (status, body) = app.post("/api/v1/models/sync", &app.admin_key.clone(), json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error");
    assert_eq!(app.count("models").await, 0);
    *app.model_info.lock().unwrap() = (200, json!({"unexpected": true}));
    let (status, _) = app.post("/api/v1/models/sync", &app.admin_key.clone(), json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(app.count("audit_logs").await, 0);
}
