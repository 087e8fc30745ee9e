use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn audit_rows_carry_actor_target_request_id_and_address(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let resp = app
        .http
        .post(format!("{}/api/v1/teams", app.base))
        .bearer_auth(&app.admin_key)
        .header("x-request-id", "req-audit-1")
        .json(&json!({"name": "Audited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // The answer carries the server's own request id, never the client's.
    let server_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(server_id, "req-audit-1");
    let team: serde_json::Value = resp.json().await.unwrap();

    // A pending subscription approved by an admin is audited too.
    app.admin_post(
        "/api/v1/models",
        json!({"id": "r", "input_cost_per_token": 0, "output_cost_per_token": 0, "restricted": true}),
    )
    .await;
    let token = user_token("aud", "aud@example.com", &["user"]);
    let (_, sub) = app.post("/api/v1/subscriptions", &token, json!({"model_id": "r"})).await;
    app.admin_post(&format!("/api/v1/subscriptions/{}/approve", id(&sub)), json!({})).await;
    let actions: Vec<String> = app.audit_actions("subscription", &id(&sub)).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(actions, ["subscription.create", "subscription.approve"]);

    let (status, page) =
        app.get(&format!("/api/v1/audit?target_type=team&target_id={}", id(&team)), &app.admin_key.clone()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let rows = page["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["action"], "team.create");
    assert_eq!(row["request_id"], server_id.as_str());
    assert_eq!(row["client_request_id"], "req-audit-1");
    assert_eq!(row["ip"], "127.0.0.1");
    assert!(row["actor"].as_str().unwrap().starts_with("admin-key:"));
    assert!(row["actor_id"].is_null());
    assert_eq!(row["details"]["name"], "Audited");

    // Newest first, filterable by actor and action; JWT actors carry their user id.
    let (_, me) = app.get("/api/v1/users/me", &token).await;
    let (_, mine) = app.get(&format!("/api/v1/audit?actor_id={}", id(&me)), &app.admin_key.clone()).await;
    let actions: Vec<&str> = mine["data"].as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["subscription.create", "user.create"], "first use creates the user, newest first");
    let (_, creates) = app.get("/api/v1/audit?action=model.create", &app.admin_key.clone()).await;
    assert_eq!(creates["data"].as_array().unwrap().len(), 1);
    let (_, all) = app.get("/api/v1/audit?limit=2", &app.admin_key.clone()).await;
    assert_eq!(all["data"][0]["action"], "subscription.approve");
    assert_eq!(all["has_more"], true);
}
