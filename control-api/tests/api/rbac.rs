//! Role checks: adminReadonly reads everything and writes nothing; a user sees and changes only
//! their own resources (others' are 404) and creates keys only for their active subscriptions.

use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use tollgate_core::DEFAULT_TEAM_ID;

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn read_only_admin_reads_everything_and_writes_nothing(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (user, model) = app.subscribed_user("owner@example.com", "m").await;
    let uid = id(&user);
    let key = app.create_key(&uid, &[&model]).await;
    let kid = id(&key);
    let sub: String = sqlx::query_scalar("SELECT id::text FROM subscriptions").fetch_one(&app.db).await.unwrap();
    let ro = user_token("ro-1", "ro@example.com", &["adminReadonly"]);

    for path in [
        "/api/v1/users",
        "/api/v1/teams",
        "/api/v1/models",
        "/api/v1/subscriptions",
        "/api/v1/keys",
        "/api/v1/audit",
        "/api/v1/usage",
        &format!("/api/v1/users/{uid}"),
        &format!("/api/v1/keys/{kid}"),
    ] {
        let (status, body) = app.get(path, &ro).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    }
    let (_, users) = app.get("/api/v1/users", &ro).await;
    assert!(users["data"].as_array().unwrap().len() >= 2);

    let writes: Vec<(Method, String, serde_json::Value)> = vec![
        (Method::POST, "/api/v1/users".into(), json!({"email": "n@example.com", "name": "n"})),
        (Method::PATCH, format!("/api/v1/users/{uid}"), json!({"name": "x"})),
        (Method::POST, "/api/v1/teams".into(), json!({"name": "t"})),
        (Method::PATCH, format!("/api/v1/teams/{DEFAULT_TEAM_ID}"), json!({"description": "x"})),
        (Method::POST, format!("/api/v1/teams/{DEFAULT_TEAM_ID}/members"), json!({"user_id": uid})),
        (Method::DELETE, format!("/api/v1/teams/{DEFAULT_TEAM_ID}/members/{uid}"), json!(null)),
        (
            Method::POST,
            "/api/v1/models".into(),
            json!({"id": "x", "input_cost_per_token": 0, "output_cost_per_token": 0}),
        ),
        (Method::PATCH, "/api/v1/models/m".into(), json!({"enabled": false})),
        (Method::DELETE, "/api/v1/models/m".into(), json!(null)),
        (Method::POST, "/api/v1/models/sync".into(), json!({})),
        (Method::POST, "/api/v1/subscriptions".into(), json!({"user_id": uid, "model_id": "m"})),
        (Method::PATCH, format!("/api/v1/subscriptions/{sub}"), json!({"limits": {}})),
        (Method::POST, format!("/api/v1/subscriptions/{sub}/suspend"), json!({})),
        (Method::POST, format!("/api/v1/subscriptions/{sub}/cancel"), json!({})),
        (Method::POST, "/api/v1/keys".into(), json!({"user_id": uid, "name": "k"})),
        (Method::PATCH, format!("/api/v1/keys/{kid}"), json!({"name": "x"})),
        (Method::POST, format!("/api/v1/keys/{kid}/rotate"), json!({})),
        (Method::POST, format!("/api/v1/keys/{kid}/revoke"), json!({})),
    ];
    let audit_before = app.count("audit_logs").await;
    for (method, path, body) in writes {
        let body = if body.is_null() { None } else { Some(body) };
        let (status, resp) = app.call(method.clone(), &path, Some(&ro), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {resp}");
        assert_eq!(resp["error"]["code"], "forbidden");
    }
    // No refused write left an audit row.
    assert_eq!(app.count("audit_logs").await, audit_before);
    let (_, still) = app.get(&format!("/api/v1/keys/{kid}"), &app.admin_key.clone()).await;
    assert!(still["revoked_at"].is_null());
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn user_sees_and_changes_only_own_resources(db: PgPool) {
    let app = TestApp::spawn(db).await;
    // Alice (via JWT) and Bob (created by an admin), each with a subscription and a key.
    let alice_token = user_token("alice-sub", "alice@example.com", &["user"]);
    let (status, alice) = app.get("/api/v1/users/me", &alice_token).await;
    assert_eq!(status, StatusCode::OK, "{alice}");
    let alice_id = id(&alice);
    app.create_model("m").await;
    app.create_model("n").await;
    let (status, alice_sub) = app.post("/api/v1/subscriptions", &alice_token, json!({"model_id": "m"})).await;
    assert_eq!(status, StatusCode::CREATED, "{alice_sub}");
    let (bob, _) = (app.create_user("bob@example.com").await, ());
    let bob_id = id(&bob);
    let bob_sub = app.subscribe(&bob_id, "m").await;
    let bob_key = app.create_key(&bob_id, &["m"]).await;

    // Own key for an own active subscription: allowed. Others' or unsubscribed: refused.
    let (status, alice_key) = app.post("/api/v1/keys", &alice_token, json!({"name": "mine", "models": ["m"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{alice_key}");
    assert!(alice_key["key"].is_string());
    let (status, body) = app.post("/api/v1/keys", &alice_token, json!({"name": "x", "models": ["n"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) =
        app.post("/api/v1/keys", &alice_token, json!({"user_id": bob_id, "name": "x", "models": ["m"]})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        app.post("/api/v1/subscriptions", &alice_token, json!({"user_id": bob_id, "model_id": "n"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Lists are limited to her own.
    for (path, owner_field) in
        [("/api/v1/users", "id"), ("/api/v1/keys", "user_id"), ("/api/v1/subscriptions", "user_id")]
    {
        let (status, page) = app.get(path, &alice_token).await;
        assert_eq!(status, StatusCode::OK);
        let rows = page["data"].as_array().unwrap();
        assert!(!rows.is_empty(), "{path}");
        assert!(rows.iter().all(|r| r[owner_field] == alice_id.as_str()), "{path}: {page}");
    }
    let (_, teams) = app.get("/api/v1/teams", &alice_token).await;
    assert_eq!(teams["data"].as_array().unwrap().len(), 1, "only the Default Team she is in");

    // Others' resources do not exist for her.
    let bob_kid = id(&bob_key);
    let bob_sid = id(&bob_sub);
    for (method, path) in [
        (Method::GET, format!("/api/v1/users/{bob_id}")),
        (Method::GET, format!("/api/v1/keys/{bob_kid}")),
        (Method::POST, format!("/api/v1/keys/{bob_kid}/revoke")),
        (Method::POST, format!("/api/v1/keys/{bob_kid}/rotate")),
        (Method::GET, format!("/api/v1/subscriptions/{bob_sid}")),
        (Method::POST, format!("/api/v1/subscriptions/{bob_sid}/cancel")),
    ] {
        let body = (method == Method::POST).then(|| json!({}));
        let (status, resp) = app.call(method.clone(), &path, Some(&alice_token), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {resp}");
    }
    let team = app.admin_post("/api/v1/teams", json!({"name": "Bob's"})).await;
    let (status, _) = app.get(&format!("/api/v1/teams/{}", id(&team)), &alice_token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get(&format!("/api/v1/usage?user_id={bob_id}"), &alice_token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Administrative writes are forbidden to her.
    for (path, body) in [
        ("/api/v1/users", json!({"email": "z@example.com", "name": "z"})),
        ("/api/v1/teams", json!({"name": "mine"})),
        ("/api/v1/models", json!({"id": "z", "input_cost_per_token": 0, "output_cost_per_token": 0})),
        ("/api/v1/models/sync", json!({})),
    ] {
        let (status, _) = app.post(path, &alice_token, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "POST {path}");
    }
    let (status, _) = app.patch(&format!("/api/v1/users/{alice_id}"), &alice_token, json!({"roles": ["admin"]})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no self-promotion");
    let (status, _) =
        app.post(&format!("/api/v1/subscriptions/{}/suspend", id(&alice_sub)), &alice_token, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app.get("/api/v1/audit", &alice_token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Her own key: rotate and revoke work; the audit row names her.
    let akid = id(&alice_key);
    let (status, _) = app.post(&format!("/api/v1/keys/{akid}/rotate"), &alice_token, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    // Rotation needs the models still actively subscribed.
    app.admin_post(&format!("/api/v1/subscriptions/{}/suspend", id(&alice_sub)), json!({})).await;
    let (status, _) = app.post(&format!("/api/v1/keys/{akid}/rotate"), &alice_token, json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.post(&format!("/api/v1/keys/{akid}/revoke"), &alice_token, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let actors = app.audit_actions("key", &akid).await;
    assert!(actors.iter().all(|(_, actor)| actor == "user:alice@example.com"), "{actors:?}");
    let (_, bob_key_now) = app.get(&format!("/api/v1/keys/{bob_kid}"), &app.admin_key.clone()).await;
    assert!(bob_key_now["revoked_at"].is_null());
}
