//! Configured default limits for new users and keys, the Default Team's own limits, and the last
//! model sync's report.

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tollgate_core::limits::{BudgetPeriod, Limits};

use crate::common::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn configured_defaults_apply_to_new_users_and_keys_unless_given(db: PgPool) {
    let app = TestApp::spawn_with(db, |c| {
        c.defaults.user_limits = Limits {
            rpm: Some(60),
            max_budget: Some(10.into()),
            budget_period: BudgetPeriod::Monthly,
            ..Default::default()
        };
        c.defaults.key_limits = Limits { rpm: Some(30), ..Default::default() };
    })
    .await;
    let admin = app.admin_key.clone();
    let plain = app.create_user("plain@example.com").await;
    let l = &plain["limits"];
    assert_eq!(
        (l["rpm"].as_i64(), l["max_budget"].as_f64(), l["budget_period"].as_str()),
        (Some(60), Some(10.0), Some("monthly"))
    );
    let (_, explicit) =
        app.post("/api/v1/users", &admin, json!({"email": "own@example.com", "name": "o", "limits": {"tpm": 5}})).await;
    assert_eq!(explicit["limits"]["tpm"], 5);
    assert!(explicit["limits"]["rpm"].is_null(), "explicit limits win: {explicit}");
    let (_, none) =
        app.post("/api/v1/users", &admin, json!({"email": "none@example.com", "name": "n", "limits": {}})).await;
    assert!(none["limits"]["rpm"].is_null(), "{{}} is explicit: {none}");
    // A user created on first sight of a JWT gets them too.
    let token = user_token("jit-defaults", "jit@example.com", &["user"]);
    let (_, me) = app.get("/api/v1/users/me", &token).await;
    assert_eq!(me["limits"]["rpm"], 60, "{me}");

    // Keys: the defaults, as the key's ceiling; explicit limits win.
    app.create_model("m1").await;
    app.subscribe(&id(&me), "m1").await;
    let key = app.create_key(&id(&plain), &[]).await;
    assert_eq!((key["limits"]["rpm"].as_i64(), key["admin_limits"]["rpm"].as_i64()), (Some(30), Some(30)), "{key}");
    let (_, own) = app.post("/api/v1/keys", &token, json!({"name": "mine"})).await;
    assert_eq!((own["limits"]["rpm"].as_i64(), own["admin_limits"]["rpm"].as_i64()), (Some(30), Some(30)), "{own}");
    let (status, body) =
        app.patch(&format!("/api/v1/keys/{}", id(&own)), &token, json!({"limits": {"rpm": 100}})).await;
    assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("limits.rpm")));
    let (status, tighter) =
        app.patch(&format!("/api/v1/keys/{}", id(&own)), &token, json!({"limits": {"rpm": 10}})).await;
    assert_eq!((status, tighter["limits"]["rpm"].as_i64()), (StatusCode::OK, Some(10)));
    let (_, explicit) =
        app.post("/api/v1/keys", &admin, json!({"user_id": id(&plain), "name": "x", "limits": {"tpm": 7}})).await;
    assert_eq!((explicit["limits"]["tpm"].as_i64(), explicit["limits"]["rpm"].as_i64()), (Some(7), None), "{explicit}");

    // The Default Team carries limits of its own, set on the team.
    let team = tollgate_core::DEFAULT_TEAM_ID;
    let (status, t) = app
        .patch(
            &format!("/api/v1/teams/{team}"),
            &admin,
            json!({"limits": {"max_budget": 100, "budget_period": "monthly"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(
        (t["limits"]["max_budget"].as_f64(), t["admin_limits"]["max_budget"].as_f64()),
        (Some(100.0), Some(100.0))
    );
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn the_last_sync_report_is_shown(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (status, _) = app.get("/api/v1/models/sync", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no sync yet");

    let (status, report) = app.post("/api/v1/models/sync", &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (status, last) = app.get("/api/v1/models/sync", &admin).await;
    assert_eq!(status, StatusCode::OK, "{last}");
    assert_eq!((last["trigger"].as_str(), last["outcome"].as_str()), (Some("manual"), Some("success")));
    assert!(last["actor"].as_str().unwrap().starts_with("admin-key:"), "{last}");
    assert_eq!(last["created"], report["created"]);
    assert_eq!(last["updated"], report["updated"]);
    assert!(last["error"].is_null());
    let unpriced = last["unpriced"].as_array().unwrap();
    assert!(!unpriced.is_empty(), "the capture has unpriced models: {last}");
    for m in unpriced {
        let (_, model) = app.get(&format!("/api/v1/models/{}", m.as_str().unwrap().replace('/', "%2F")), &admin).await;
        assert_eq!(model["enabled"], false, "{model}");
    }

    // A failed sync is the last report, with its error; readable by adminReadonly, not by users.
    *app.model_info.lock().unwrap() = (500, json!({"error": "down"}));
    let (status, _) = app.post("/api/v1/models/sync", &admin, json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let readonly = user_token("ro-sync", "ro-sync@example.com", &["adminReadonly"]);
    let (status, failed) = app.get("/api/v1/models/sync", &readonly).await;
    assert_eq!(status, StatusCode::OK, "{failed}");
    assert_eq!(failed["outcome"], "failure");
    assert!(failed["error"].as_str().is_some_and(|e| !e.is_empty()), "{failed}");
    assert_eq!(failed["created"], json!([]));
    let (status, _) = app.get("/api/v1/models/sync", &user_token("u-sync", "u-sync@example.com", &["user"])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The scheduled sync leaves its report too.
    let state = tollgate_control_api::state::AppState::new(
        &tollgate_control_api::config::ControlApiConfig {
            redis_url: redis_url(),
            litellm: tollgate_control_api::config::LitellmConfig { url: None, ..Default::default() },
            ..Default::default()
        },
        app.db.clone(),
    )
    .unwrap();
    assert!(tollgate_control_api::model_sync::attempt(&state, std::time::Duration::from_millis(2)).await.unwrap());
    let (_, scheduled) = app.get("/api/v1/models/sync", &admin).await;
    assert_eq!(
        (scheduled["trigger"].as_str(), scheduled["actor"].as_str()),
        (Some("scheduled"), Some("system:model-sync"))
    );
    assert_eq!(scheduled["outcome"], "failure", "no LiteLLM URL: {scheduled}");
}

#[test]
fn default_limits_are_checked_at_load_naming_the_setting() {
    use figment::{providers::Serialized, Figment};
    use tollgate_control_api::config::ControlApiConfig;
    for (key, limits) in [
        ("defaults.user_limits", json!({"rpm": -1})),
        ("defaults.key_limits", json!({"max_budget": 2000000})),
        ("defaults.key_limits", json!({"rpm": 1, "unknown": 2})),
    ] {
        let err = ControlApiConfig::load(None, Figment::from(Serialized::default(key, limits.clone())))
            .expect_err(&format!("{key}={limits} was accepted"))
            .to_string();
        assert!(err.contains(key.rsplit('.').next().unwrap()), "{key}={limits}: {err}");
    }
    let ok =
        ControlApiConfig::load(None, Figment::from(Serialized::default("defaults.user_limits", json!({"rpm": 5}))))
            .unwrap();
    assert_eq!(ok.defaults.user_limits.rpm, Some(5));
}
