use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tollgate_core::DEFAULT_TEAM_ID;

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn team_lifecycle_with_members(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    app.create_model("m1").await;
    let (status, team) = app
        .post("/api/v1/teams", &admin, json!({"name": "Research", "allowed_models": ["m1"], "limits": {"max_budget": 25.5, "budget_period": "monthly"}}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{team}");
    assert_eq!(team["allowed_models"], json!(["m1"]));
    assert_eq!(team["limits"]["max_budget"], 25.5);
    let tid = id(&team);

    let (status, body) = app.post("/api/v1/teams", &admin, json!({"name": "research"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let (status, body) = app.post("/api/v1/teams", &admin, json!({"name": "Other", "allowed_models": ["nope"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "allowed_models");
    assert_eq!(body["error"]["message"], "no such model: nope");

    let user = app.create_user("member@example.com").await;
    let uid = id(&user);
    let (status, member) =
        app.post(&format!("/api/v1/teams/{tid}/members"), &admin, json!({"user_id": uid, "role": "admin"})).await;
    assert_eq!(status, StatusCode::CREATED, "{member}");
    assert_eq!(member["role"], "admin");
    assert_eq!(member["email"], "member@example.com");
    let (status, _) = app.post(&format!("/api/v1/teams/{tid}/members"), &admin, json!({"user_id": uid})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = app.post(&format!("/api/v1/teams/{tid}/members"), &admin, json!({"user_id": uuid()})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "user_id");

    let (_, members) = app.get(&format!("/api/v1/teams/{tid}/members"), &admin).await;
    assert_eq!(members["data"].as_array().unwrap().len(), 1);
    let (_, mine) = app.get(&format!("/api/v1/teams?member_id={uid}"), &admin).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 2, "Default Team and Research");

    let (status, updated) =
        app.patch(&format!("/api/v1/teams/{tid}"), &admin, json!({"description": "ML", "allowed_models": []})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["allowed_models"], json!([]));
    assert_eq!(updated["description"], "ML");

    // A member holding a key on the team cannot be removed, nor can the team be deleted.
    app.subscribe(&uid, "m1").await;
    let key =
        app.admin_post("/api/v1/keys", json!({"user_id": uid, "name": "k", "team_id": tid, "models": ["m1"]})).await;
    let (status, _) = app.delete(&format!("/api/v1/teams/{tid}/members/{uid}"), &admin).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = app.delete(&format!("/api/v1/teams/{tid}"), &admin).await;
    assert_eq!(status, StatusCode::CONFLICT);
    app.admin_post(&format!("/api/v1/keys/{}/revoke", id(&key)), json!({})).await;
    let (status, _) = app.delete(&format!("/api/v1/teams/{tid}/members/{uid}"), &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.delete(&format!("/api/v1/teams/{tid}/members/{uid}"), &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _) = app.delete(&format!("/api/v1/teams/{DEFAULT_TEAM_ID}"), &admin).await;
    assert_eq!(status, StatusCode::CONFLICT, "the Default Team stays");

    let names: Vec<String> = app.audit_actions("team", &tid).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(names, ["team.create", "team.member.add", "team.update", "team.member.remove"]);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn empty_team_can_be_deleted(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let team = app.admin_post("/api/v1/teams", json!({"name": "Temp"})).await;
    let tid = id(&team);
    let (status, _) = app.delete(&format!("/api/v1/teams/{tid}"), &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get(&format!("/api/v1/teams/{tid}"), &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let names: Vec<String> = app.audit_actions("team", &tid).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(names, ["team.create", "team.delete"]);
}
