//! Bad input gets a JSON error naming the field, the right status, and writes nothing.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::common::*;

async fn raw_post(app: &TestApp, path: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
    let resp = app
        .http
        .post(format!("{}{path}", app.base))
        .bearer_auth(&app.admin_key)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn malformed_bodies(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (status, body) = raw_post(&app, "/api/v1/users", "application/json", "{\"email\": ").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "bad_request");
    let (status, body) = raw_post(&app, "/api/v1/users", "text/plain", "{}").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");

    let cases: Vec<(&str, Value, &str)> = vec![
        ("/api/v1/users", json!({"email": "a@example.com", "name": "a", "admin": true}), "admin"),
        ("/api/v1/users", json!({"email": 5, "name": "a"}), "email"),
        ("/api/v1/users", json!({"name": "a"}), "email"),
        ("/api/v1/users", json!({"email": "not-an-email", "name": "a"}), "email"),
        ("/api/v1/users", json!({"email": "a@example.com", "name": "  "}), "name"),
        ("/api/v1/users", json!({"email": "a@example.com", "name": "a", "roles": ["root"]}), "roles[0]"),
        ("/api/v1/users", json!({"email": "a@example.com", "name": "a\u{0}"}), "name"),
        ("/api/v1/users", json!({"email": "a@example.com", "name": "a", "limits": {"rpm": -1}}), "limits.rpm"),
        ("/api/v1/users", json!({"email": "a@example.com", "name": "a", "limits": {"tpm": 1e15}}), "limits.tpm"),
        (
            "/api/v1/users",
            json!({"email": "a@example.com", "name": "a", "limits": {"tpm": 10_000_000_000_000_i64}}),
            "limits.tpm",
        ),
        (
            "/api/v1/users",
            json!({"email": "a@example.com", "name": "a", "limits": {"max_budget": -5}}),
            "limits.max_budget",
        ),
        (
            "/api/v1/users",
            json!({"email": "a@example.com", "name": "a", "limits": {"budget_period": "hourly"}}),
            "limits.budget_period",
        ),
        (
            "/api/v1/users",
            json!({"email": "a@example.com", "name": "a", "limits": {"enforcement": "strict"}}),
            "limits.enforcement",
        ),
        ("/api/v1/users", json!({"email": "a@example.com", "name": "a", "limits": {"rpm": "ten"}}), "limits.rpm"),
        ("/api/v1/teams", json!({"name": "t", "limits": {"max_budget": 1e12}}), "limits.max_budget"),
        ("/api/v1/teams", json!({"name": "t", "allowed_models": "all"}), "allowed_models"),
        ("/api/v1/models", json!({"id": "has space", "input_cost_per_token": 0, "output_cost_per_token": 0}), "id"),
        (
            "/api/v1/models",
            json!({"id": "m", "input_cost_per_token": "cheap", "output_cost_per_token": 0}),
            "input_cost_per_token",
        ),
        (
            "/api/v1/models",
            json!({"id": "m", "input_cost_per_token": 0, "output_cost_per_token": 0, "context_length": 0}),
            "context_length",
        ),
        ("/api/v1/subscriptions", json!({"user_id": "not-a-uuid", "model_id": "m"}), "user_id"),
        ("/api/v1/keys", json!({"user_id": uuid(), "name": "k", "expires_at": "tomorrow"}), "expires_at"),
        ("/api/v1/keys", json!({"user_id": uuid(), "name": "k", "models": [1]}), "models[0]"),
    ];
    for (path, payload, field) in cases {
        let (status, body) = app.post(path, &app.admin_key.clone(), payload.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path} {payload}: {body}");
        assert_eq!(body["error"]["field"], field, "{path} {payload}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    for table in ["users", "models", "subscriptions", "api_keys", "audit_logs"] {
        assert_eq!(app.count(table).await, 0, "{table} untouched");
    }
    assert_eq!(app.count("teams").await, 1, "only the Default Team");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn bad_paths_and_queries(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    for path in ["/api/v1/users/not-a-uuid", "/api/v1/keys/123", "/api/v1/subscriptions/x/cancel"] {
        let (status, body) = if path.ends_with("cancel") {
            app.post(path, &admin, json!({})).await
        } else {
            app.get(path, &admin).await
        };
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["field"], "path");
    }
    for (path, field) in [
        ("/api/v1/users?limit=0", "limit"),
        ("/api/v1/users?limit=100000", "limit"),
        ("/api/v1/users?offset=-1", "offset"),
        ("/api/v1/keys?user_id=nope", "user_id"),
        ("/api/v1/keys?revoked=maybe", "revoked"),
        ("/api/v1/usage?group_by=week", "group_by"),
        ("/api/v1/usage?from=yesterday", "from"),
    ] {
        let (status, body) = app.get(path, &admin).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["field"], field, "{path}: {body}");
    }
    let (status, body) = app.get("/api/v1/nothing-here", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = app.call(reqwest::Method::PUT, "/api/v1/users", Some(&admin), Some(json!({}))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_object());
}
