use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use tollgate_core::DEFAULT_TEAM_ID;

use crate::common::*;

async fn status_with(app: &TestApp, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    app.call(Method::GET, "/api/v1/models", token, None).await
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn missing_wrong_expired_and_forged_credentials_are_401(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (status, body) = status_with(&app, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = status_with(&app, Some("sk-tg-not-the-admin-key")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let expired = hs256_token(json!({"sub": "s", "roles": ["admin"], "exp": now() - 3600}));
    let (status, body) = status_with(&app, Some(&expired)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["message"], "token expired");

    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "s", "roles": ["admin"], "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret"),
    )
    .unwrap();
    let (status, body) = status_with(&app, Some(&forged)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["message"], "bad token signature");

    let (status, _) = status_with(&app, Some("not.a.jwt")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let no_exp = hs256_token(json!({"sub": "s", "roles": ["admin"]}));
    let (status, _) = status_with(&app, Some(&no_exp)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let unknown_kid = rs256_token("not-in-jwks", json!({"sub": "s", "roles": ["admin"], "exp": now() + 600}));
    let (status, _) = status_with(&app, Some(&unknown_kid)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.count("users").await, 0, "no user from a rejected token");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn valid_token_without_a_role_is_403(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let token =
        hs256_token(json!({"sub": "norole", "email": "n@example.com", "groups": ["unrelated"], "exp": now() + 600}));
    let (status, body) = status_with(&app, Some(&token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("role"));
    assert_eq!(app.count("users").await, 0);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn jwt_user_is_created_on_first_use_and_groups_map_to_roles(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let token = hs256_token(json!({"sub": "kc-123", "email": "grace@example.com", "name": "Grace",
        "groups": ["/litemaas-admins"], "exp": now() + 600}));
    let (status, me) = app.get("/api/v1/users/me", &token).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["email"], "grace@example.com");
    // The role comes from the token at each request; Tollgate stores no grant of its own.
    assert_eq!(me["roles"], json!([]));
    let uid = id(&me);
    // Mapped to admin: may create users.
    let (status, _) = app.post("/api/v1/users", &token, json!({"email": "new@example.com", "name": "New"})).await;
    assert_eq!(status, StatusCode::CREATED);
    // Joined the Default Team, audited once, and not created twice.
    let (_, members) = app.get(&format!("/api/v1/teams/{DEFAULT_TEAM_ID}/members"), &token).await;
    assert!(members["data"].as_array().unwrap().iter().any(|m| m["user_id"] == uid.as_str()));
    let (_, again) = app.get("/api/v1/users/me", &token).await;
    assert_eq!(again["id"], uid.as_str());
    assert_eq!(app.audit_actions("user", &uid).await, vec![("user.create".to_string(), "jwt:kc-123".to_string())]);

    let readonly = hs256_token(json!({"sub": "kc-ro", "groups": ["litemaas-readonly"], "exp": now() + 600}));
    let (status, _) = app.post("/api/v1/teams", &readonly, json!({"name": "x"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let user = hs256_token(json!({"sub": "kc-u", "groups": ["litemaas-users"], "exp": now() + 600}));
    let (status, _) = app.get("/api/v1/users/me", &user).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.post("/api/v1/teams", &user, json!({"name": "x"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn rs256_tokens_verify_against_the_jwks(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let token = rs256_token(
        "test-key-1",
        json!({"sub": "oidc-1", "email": "o@example.com", "roles": ["admin"], "exp": now() + 600}),
    );
    let (status, body) = app.get("/api/v1/users", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expired = rs256_token("test-key-1", json!({"sub": "oidc-1", "roles": ["admin"], "exp": now() - 600}));
    let (status, _) = app.get("/api/v1/users", &expired).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn suspended_jwt_user_is_403(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let token = user_token("sus", "sus@example.com", &["user"]);
    let (_, me) = app.get("/api/v1/users/me", &token).await;
    app.patch(&format!("/api/v1/users/{}", id(&me)), &app.admin_key.clone(), json!({"status": "suspended"})).await;
    let (status, _) = app.get("/api/v1/users/me", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn first_use_is_audited_with_request_id_and_address(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let token = user_token("kc-jit", "jit@example.com", &["user"]);
    let resp = app
        .request(Method::GET, "/api/v1/users/me", &token)
        .header("x-request-id", "req-jit-1")
        .header("x-forwarded-for", "203.0.113.7, 10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let server_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let me: serde_json::Value = resp.json().await.unwrap();
    let (_, page) = app.get(&format!("/api/v1/audit?target_type=user&target_id={}", id(&me)), &app.admin_key).await;
    let rows = page["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{page}");
    assert_eq!(rows[0]["action"], "user.create");
    assert_eq!(rows[0]["actor"], "jwt:kc-jit");
    assert_eq!(rows[0]["actor_id"], id(&me).as_str());
    assert_eq!(rows[0]["request_id"], server_id.as_str());
    assert_eq!(rows[0]["client_request_id"], "req-jit-1");
    // No proxy is trusted: the peer is the client, whatever X-Forwarded-For says.
    assert_eq!(rows[0]["ip"], "127.0.0.1");
    assert_eq!(rows[0]["details"]["source"], "jwt");
}
