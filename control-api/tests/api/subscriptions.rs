use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn subscription_lifecycle(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let user = app.create_user("sub@example.com").await;
    let uid = id(&user);
    app.create_model("m").await;
    let (status, sub) = app
        .post("/api/v1/subscriptions", &admin, json!({"user_id": uid, "model_id": "m", "limits": {"tpm": 1000}}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["limits"]["tpm"], 1000);
    let sid = id(&sub);

    let (status, _) = app.post("/api/v1/subscriptions", &admin, json!({"user_id": uid, "model_id": "m"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "one live subscription per user and model");

    let (status, body) = app.post(&format!("/api/v1/subscriptions/{sid}/reactivate"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, s) = app.post(&format!("/api/v1/subscriptions/{sid}/suspend"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["status"], "suspended");
    let (status, s) = app.post(&format!("/api/v1/subscriptions/{sid}/reactivate"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["status"], "active");
    let (status, s) = app
        .patch(&format!("/api/v1/subscriptions/{sid}"), &admin, json!({"limits": {"rpm": 5, "enforcement": "soft"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["limits"]["rpm"], 5);
    assert_eq!(s["limits"]["tpm"], serde_json::Value::Null);

    // Cancel is refused while an unrevoked key names the model.
    let key = app.create_key(&uid, &["m"]).await;
    let (status, body) = app.post(&format!("/api/v1/subscriptions/{sid}/cancel"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    app.admin_post(&format!("/api/v1/keys/{}/revoke", id(&key)), json!({})).await;
    let (status, s) = app.post(&format!("/api/v1/subscriptions/{sid}/cancel"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["status"], "cancelled");
    let (status, _) = app.post(&format!("/api/v1/subscriptions/{sid}/cancel"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // A cancelled subscription does not block a new one.
    let (status, _) = app.post("/api/v1/subscriptions", &admin, json!({"user_id": uid, "model_id": "m"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, filtered) = app.get(&format!("/api/v1/subscriptions?user_id={uid}&status=cancelled"), &admin).await;
    assert_eq!(filtered["data"].as_array().unwrap().len(), 1);

    let names: Vec<String> = app.audit_actions("subscription", &sid).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(
        names,
        [
            "subscription.create",
            "subscription.suspend",
            "subscription.reactivate",
            "subscription.update",
            "subscription.cancel"
        ]
    );
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn restricted_model_needs_approval(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    app.admin_post(
        "/api/v1/models",
        json!({"id": "vip", "input_cost_per_token": 0, "output_cost_per_token": 0, "restricted": true}),
    )
    .await;
    let user = app.create_user("vip@example.com").await;
    let token = user_token("vip-sub", "vip@example.com", &["user"]);
    let (status, sub) = app.post("/api/v1/subscriptions", &token, json!({"model_id": "vip"})).await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    assert_eq!(sub["status"], "pending");
    assert_eq!(sub["user_id"], user["id"]);
    let sid = id(&sub);
    // A pending subscription does not entitle keys.
    let (status, body) = app.post("/api/v1/keys", &token, json!({"name": "k", "models": ["vip"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = app.post(&format!("/api/v1/subscriptions/{sid}/approve"), &token, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "users cannot approve themselves");
    let (status, s) = app.post(&format!("/api/v1/subscriptions/{sid}/approve"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["status"], "active");
    let (status, _) = app.post("/api/v1/keys", &token, json!({"name": "k", "models": ["vip"]})).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn unknown_or_disabled_model_is_422(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let uid = id(&app.create_user("u@example.com").await);
    let (status, body) = app.post("/api/v1/subscriptions", &admin, json!({"user_id": uid, "model_id": "ghost"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "model_id");
    assert_eq!(body["error"]["message"], "no such model: ghost");
    app.admin_post(
        "/api/v1/models",
        json!({"id": "off", "input_cost_per_token": 0, "output_cost_per_token": 0, "enabled": false}),
    )
    .await;
    let (status, body) = app.post("/api/v1/subscriptions", &admin, json!({"user_id": uid, "model_id": "off"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().unwrap().contains("disabled"));
    let (status, body) = app.post("/api/v1/subscriptions", &admin, json!({"user_id": uuid(), "model_id": "off"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "user_id");
    assert_eq!(app.count("subscriptions").await, 0);
}
