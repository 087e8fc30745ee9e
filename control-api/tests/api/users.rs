use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tollgate_core::DEFAULT_TEAM_ID;

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn create_get_list_and_update_users(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (status, user) = app
        .post("/api/v1/users", &admin, json!({"email": "Ada@Example.com", "name": "Ada", "limits": {"rpm": 10}}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    assert_eq!(user["roles"], json!(["user"]));
    assert_eq!(user["status"], "active");
    assert_eq!(user["limits"]["rpm"], 10);
    let uid = id(&user);

    // Every new user joins the Default Team.
    let (_, members) = app.get(&format!("/api/v1/teams/{DEFAULT_TEAM_ID}/members"), &admin).await;
    assert!(members["data"].as_array().unwrap().iter().any(|m| m["user_id"] == uid.as_str()));

    let (status, got) = app.get(&format!("/api/v1/users/{uid}"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["email"], "Ada@Example.com");

    app.create_user("bob@example.com").await;
    let (_, page) = app.get("/api/v1/users?limit=1", &admin).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], true);
    let (_, page) = app.get("/api/v1/users?limit=1&offset=1", &admin).await;
    assert_eq!(page["has_more"], false);
    let (_, filtered) = app.get("/api/v1/users?email=ADA@example.com", &admin).await;
    assert_eq!(filtered["data"].as_array().unwrap().len(), 1);

    let (status, updated) = app
        .patch(
            &format!("/api/v1/users/{uid}"),
            &admin,
            json!({"name": "Ada L.", "roles": ["adminReadonly"], "status": "suspended"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["name"], "Ada L.");
    assert_eq!(updated["roles"], json!(["adminReadonly"]));
    assert_eq!(updated["status"], "suspended");
    let (_, suspended) = app.get("/api/v1/users?status=suspended", &admin).await;
    assert_eq!(suspended["data"].as_array().unwrap().len(), 1);

    let actions = app.audit_actions("user", &uid).await;
    let names: Vec<&str> = actions.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(names, ["user.create", "user.update"]);
    assert!(actions[0].1.starts_with("admin-key:"));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn duplicate_email_is_409_case_insensitively(db: PgPool) {
    let app = TestApp::spawn(db).await;
    app.create_user("dup@example.com").await;
    let (status, body) =
        app.post("/api/v1/users", &app.admin_key.clone(), json!({"email": "DUP@example.com", "name": "x"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(app.count("users").await, 1);
    assert_eq!(app.count("team_members").await, 1, "no partial write");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn unknown_user_is_404(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (status, body) = app.get(&format!("/api/v1/users/{}", uuid()), &app.admin_key.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) =
        app.patch(&format!("/api/v1/users/{}", uuid()), &app.admin_key.clone(), json!({"name": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
