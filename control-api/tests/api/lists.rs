//! Every filter of every list endpoint narrows its list, alone and combined, and a page is
//! bounded by `limit`/`offset` with `has_more` saying whether another follows.

use reqwest::Method;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::common::*;

/// The ids (or `field`) of a list response's rows, in order.
fn column(page: &Value, field: &str) -> Vec<String> {
    let rows = page["data"].as_array().unwrap_or_else(|| panic!("not a page: {page}"));
    rows.iter().map(|r| r[field].as_str().unwrap_or_else(|| panic!("no {field} in {r}")).to_string()).collect()
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn every_list_filter_narrows(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let list = |path: String| {
        let app = &app;
        let admin = admin.clone();
        async move {
            let (status, page) = app.get(&path, &admin).await;
            assert!(status.is_success(), "GET {path}: {status} {page}");
            page
        }
    };

    // Models: enabled, available, provider.
    app.admin_post(
        "/api/v1/models",
        json!({"id": "a", "provider": "openai", "input_cost_per_token": 0, "output_cost_per_token": 0}),
    )
    .await;
    app.admin_post(
        "/api/v1/models",
        json!({"id": "b", "provider": "ibm", "input_cost_per_token": 0, "output_cost_per_token": 0, "enabled": false}),
    )
    .await;
    assert_eq!(column(&list("/api/v1/models?provider=ibm".into()).await, "id"), ["b"]);
    assert_eq!(column(&list("/api/v1/models?enabled=false".into()).await, "id"), ["b"]);
    assert_eq!(column(&list("/api/v1/models?available=true&provider=openai".into()).await, "id"), ["a"]);
    assert!(column(&list("/api/v1/models?available=false".into()).await, "id").is_empty());

    // Users: email (any case), role, status.
    let ada =
        app.admin_post("/api/v1/users", json!({"email": "Ada@example.com", "name": "Ada", "roles": ["admin"]})).await;
    let bob = app.create_user("bob@example.com").await;
    assert_eq!(column(&list("/api/v1/users?email=ADA@example.com".into()).await, "id"), [id(&ada)]);
    assert_eq!(column(&list("/api/v1/users?role=admin".into()).await, "id"), [id(&ada)]);
    assert_eq!(column(&list("/api/v1/users?role=user&status=active".into()).await, "id"), [id(&bob)]);

    // Subscriptions: user, model, status.
    app.subscribe(&id(&ada), "a").await;
    let bob_a = app.subscribe(&id(&bob), "a").await;
    assert_eq!(
        column(&list(format!("/api/v1/subscriptions?user_id={}&model_id=a", id(&bob))).await, "id"),
        [id(&bob_a)]
    );
    assert!(column(&list("/api/v1/subscriptions?model_id=b".into()).await, "id").is_empty());
    assert_eq!(column(&list("/api/v1/subscriptions?status=active".into()).await, "id").len(), 2);

    // Teams: name (any case), member; members of a team.
    let team = app.admin_post("/api/v1/teams", json!({"name": "Research"})).await;
    app.admin_post(&format!("/api/v1/teams/{}/members", id(&team)), json!({"user_id": id(&bob)})).await;
    assert_eq!(column(&list("/api/v1/teams?name=research".into()).await, "id"), [id(&team)]);
    assert_eq!(column(&list(format!("/api/v1/teams?member_id={}&name=Research", id(&bob))).await, "id"), [id(&team)]);
    assert_eq!(column(&list(format!("/api/v1/teams/{}/members", id(&team))).await, "user_id"), [id(&bob)]);

    // Keys: user, team, model, revoked.
    let general = app.create_key(&id(&bob), &[]).await;
    let on_a = app.create_key(&id(&bob), &["a"]).await;
    app.create_key(&id(&ada), &["a"]).await;
    assert_eq!(column(&list(format!("/api/v1/keys?user_id={}&model_id=a", id(&bob))).await, "id"), [id(&on_a)]);
    assert_eq!(column(&list(format!("/api/v1/keys?team_id={}", id(&team))).await, "id").len(), 0);
    app.admin_post(&format!("/api/v1/keys/{}/revoke", id(&general)), json!({})).await;
    assert_eq!(column(&list("/api/v1/keys?revoked=true".into()).await, "id"), [id(&general)]);
    assert_eq!(column(&list("/api/v1/keys?revoked=false&model_id=a".into()).await, "id").len(), 2);

    // Audit: action, target, actor (none: an admin key), request id; a page at a time.
    assert_eq!(
        column(&list(format!("/api/v1/audit?target_type=key&target_id={}", id(&general))).await, "action"),
        ["key.revoke", "key.create"],
        "newest first"
    );
    assert_eq!(column(&list("/api/v1/audit?action=team.create".into()).await, "target_id"), [id(&team)]);
    assert!(column(&list("/api/v1/audit?request_id=never-sent".into()).await, "action").is_empty());
    let sent = app
        .request(Method::POST, "/api/v1/teams", &admin)
        .header("x-request-id", "req-lists-1")
        .json(&json!({"name": "Traced"}))
        .send()
        .await
        .unwrap();
    assert!(sent.status().is_success());
    assert_eq!(column(&list("/api/v1/audit?client_request_id=req-lists-1".into()).await, "action"), ["team.create"]);
    let server_id = sent.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(column(&list(format!("/api/v1/audit?request_id={server_id}")).await, "action"), ["team.create"]);
    let first = list("/api/v1/audit?action=key.create&limit=2".into()).await;
    let second = list("/api/v1/audit?action=key.create&limit=2&offset=2".into()).await;
    assert_eq!((first["has_more"].as_bool(), second["has_more"].as_bool()), (Some(true), Some(false)));
    assert_eq!(first["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(second["data"].as_array().map(Vec::len), Some(1));
}
