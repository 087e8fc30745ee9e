use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::common::*;

/// Every column of every api_keys row, as text.
async fn stored_key_rows(app: &TestApp) -> String {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k").fetch_all(&app.db).await.unwrap();
    rows.join("\n")
}

async fn stored_hash(app: &TestApp, key_id: &str) -> Vec<u8> {
    sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE id = $1::uuid")
        .bind(key_id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn key_is_shown_once_and_only_its_hash_is_stored(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (user, model) = app.subscribed_user("k@example.com", "m").await;
    let uid = id(&user);
    let (status, created) = app
        .post(
            "/api/v1/keys",
            &admin,
            json!({"user_id": uid, "name": "ci", "models": [model], "limits": {"rpm": 60}, "metadata": {"env": "ci"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    assert!(tollgate_core::keys::is_well_formed(&key), "{key}");
    assert_eq!(created["key_prefix"], format!("{}...{}", &key[..12], &key[key.len() - 4..]));
    assert_eq!(created["team_id"], tollgate_core::DEFAULT_TEAM_ID.to_string());
    let kid = id(&created);

    // Get and list never show the key.
    let (_, got) = app.get(&format!("/api/v1/keys/{kid}"), &admin).await;
    assert!(got.get("key").is_none());
    let (_, listed) = app.get(&format!("/api/v1/keys?user_id={uid}"), &admin).await;
    assert!(!listed.to_string().contains(&key));
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);

    // The table holds SHA-256(key) and nothing from which the key can be read.
    let rows = stored_key_rows(&app).await;
    assert!(!rows.contains(&key));
    assert!(!rows.contains(&key[6..]));
    assert_eq!(stored_hash(&app, &kid).await, Sha256::digest(key.as_bytes()).to_vec());

    // Rotation: a new key, once; the old hash is gone; still no plaintext stored.
    let (status, rotated) = app.post(&format!("/api/v1/keys/{kid}/rotate"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new_key, key);
    assert_eq!(rotated["id"], kid.as_str());
    let rows = stored_key_rows(&app).await;
    assert!(!rows.contains(&new_key) && !rows.contains(&new_key[6..]));
    assert_eq!(stored_hash(&app, &kid).await, Sha256::digest(new_key.as_bytes()).to_vec());
    let old_hash_left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE key_hash = $1)")
        .bind(Sha256::digest(key.as_bytes()).to_vec())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!old_hash_left);

    // Nor does the audit trail hold a key.
    let audit: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(a)::text FROM audit_logs a").fetch_all(&app.db).await.unwrap();
    let audit = audit.join("\n");
    assert!(!audit.contains(&key[6..]) && !audit.contains(&new_key[6..]));

    let (status, updated) =
        app.patch(&format!("/api/v1/keys/{kid}"), &admin, json!({"name": "renamed", "limits": {"tpm": 100}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["limits"]["tpm"], 100);

    let (status, revoked) = app.post(&format!("/api/v1/keys/{kid}/revoke"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked["revoked_at"].is_string());
    let (status, again) = app.post(&format!("/api/v1/keys/{kid}/revoke"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "revoking twice is harmless");
    assert_eq!(again["revoked_at"], revoked["revoked_at"]);
    let (status, _) = app.post(&format!("/api/v1/keys/{kid}/rotate"), &admin, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = app.patch(&format!("/api/v1/keys/{kid}"), &admin, json!({"name": "x"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, revoked_list) = app.get("/api/v1/keys?revoked=true", &admin).await;
    assert_eq!(revoked_list["data"].as_array().unwrap().len(), 1);

    let names: Vec<String> = app.audit_actions("key", &kid).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(names, ["key.create", "key.rotate", "key.update", "key.revoke"]);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn key_models_must_be_actively_subscribed_and_allowed(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (user, _) = app.subscribed_user("e@example.com", "mine").await;
    let uid = id(&user);
    app.create_model("other").await;
    let (status, body) =
        app.post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "k", "models": ["mine", "other"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "models");
    assert!(body["error"]["message"].as_str().unwrap().contains("other"));
    // A model that does not exist is named as such, not as a missing subscription.
    let (status, body) =
        app.post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "k", "models": ["mine", "gpt-nope"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "models");
    assert_eq!(body["error"]["message"], "no such model: gpt-nope");
    // So does a PATCH of the key's models, and nothing changes.
    let (status, key) =
        app.post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "k", "models": ["mine"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let kid = id(&key);
    let (status, body) =
        app.patch(&format!("/api/v1/keys/{kid}"), &admin, json!({"models": ["gpt-nope", "mine", "gpt-gone"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "models");
    assert_eq!(body["error"]["message"], "no such model: gpt-gone, gpt-nope");
    let (_, unchanged) = app.get(&format!("/api/v1/keys/{kid}"), &admin).await;
    assert_eq!(unchanged["models"], json!(["mine"]));
    app.post(&format!("/api/v1/keys/{kid}/revoke"), &admin, json!({})).await;

    // A suspended subscription no longer entitles.
    let sub = app.subscribe(&uid, "other").await;
    app.admin_post(&format!("/api/v1/subscriptions/{}/suspend", id(&sub)), json!({})).await;
    let (status, _) = app.post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "k", "models": ["other"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // The team must allow the models, and the user must belong to the team.
    let team = app.admin_post("/api/v1/teams", json!({"name": "T", "allowed_models": ["other"]})).await;
    let tid = id(&team);
    let (status, body) = app
        .post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "k", "team_id": tid, "models": ["mine"]}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "team_id");
    app.admin_post(&format!("/api/v1/teams/{tid}/members"), json!({"user_id": uid})).await;
    let (status, body) = app
        .post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "k", "team_id": tid, "models": ["mine"]}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().unwrap().contains("team"), "{body}");

    let (status, body) = app
        .post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "k", "expires_at": "2020-01-01T00:00:00Z"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "expires_at");
    assert_eq!(app.count("api_keys").await, 1, "nothing written but the revoked key");

    // An empty model list means all of the user's active subscriptions.
    let (status, key) = app
        .post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "all", "expires_at": "2999-01-01T00:00:00Z"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    assert_eq!(key["models"], json!([]));
}
