//! Issue 10: what a malicious user with a valid login tried, one test per finding (the JWT and
//! JWKS findings, 4 and 7, are in `jwt.rs`).

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use tollgate_core::DEFAULT_TEAM_ID;

use crate::common::*;

/// A user created by an admin, the token they log in with, and their id.
async fn user_with_token(app: &TestApp, name: &str) -> (String, String) {
    let user = app.create_user(&format!("{name}@example.com")).await;
    (id(&user), user_token(&format!("{name}-sub"), &format!("{name}@example.com"), &["user"]))
}

/// Finding 1: the owner cannot cancel a subscription an admin suspended, nor subscribe afresh.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_1_owner_cannot_escape_a_suspension(db: PgPool) {
    let app = TestApp::spawn(db).await;
    app.create_model("m").await;
    let (uid, token) = user_with_token(&app, "sus").await;
    let (status, sub) = app.post("/api/v1/subscriptions", &token, json!({"model_id": "m"})).await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    let sid = id(&sub);
    app.admin_post(&format!("/api/v1/subscriptions/{sid}/suspend"), json!({})).await;

    let (status, body) = app.post(&format!("/api/v1/subscriptions/{sid}/cancel"), &token, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = app.post("/api/v1/subscriptions", &token, json!({"model_id": "m", "limits": {}})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = app.post(&format!("/api/v1/subscriptions/{sid}/reactivate"), &token, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let live: Vec<String> = sqlx::query_scalar("SELECT status FROM subscriptions WHERE user_id = $1::uuid")
        .bind(&uid)
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(live, ["suspended"], "still suspended, and nothing new");

    // An active one the owner may still cancel; an admin may cancel the suspended one.
    app.create_model("n").await;
    let (_, other) = app.post("/api/v1/subscriptions", &token, json!({"model_id": "n"})).await;
    let (status, _) = app.post(&format!("/api/v1/subscriptions/{}/cancel", id(&other)), &token, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    app.admin_post(&format!("/api/v1/subscriptions/{sid}/cancel"), json!({})).await;
}

/// Finding 2: limits an admin set are a ceiling; users choose limits only within admins' limits.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_2_owners_tighten_but_never_loosen_limits(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    app.create_model("m").await;
    app.create_model("n").await;
    let (uid, token) = user_with_token(&app, "lim").await;
    let sub = app.subscribe(&uid, "m").await;
    let set = json!({"rpm": 10, "max_budget": 5, "budget_period": "daily"});
    let key =
        app.admin_post("/api/v1/keys", json!({"user_id": uid, "name": "k", "models": ["m"], "limits": set})).await;
    assert_eq!(key["admin_limits"]["rpm"], 10);
    let path = format!("/api/v1/keys/{}", id(&key));

    for (limits, field) in [
        (json!({}), "limits.rpm"),
        (json!({"rpm": 11, "max_budget": 5, "budget_period": "daily"}), "limits.rpm"),
        (json!({"rpm": 10, "budget_period": "daily"}), "limits.max_budget"),
        (json!({"rpm": 10, "max_budget": 5, "budget_period": "monthly"}), "limits.budget_period"),
        (json!({"rpm": 10, "max_budget": 5, "budget_period": "daily", "enforcement": "monitor"}), "limits.enforcement"),
    ] {
        let (status, body) = app.patch(&path, &token, json!({"limits": limits})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{limits}: {body}");
        assert_eq!(body["error"]["field"], field, "{limits}: {body}");
    }
    let (status, body) =
        app.patch(&path, &token, json!({"limits": {"rpm": 5, "max_budget": 1, "budget_period": "daily"}})).await;
    assert_eq!(status, StatusCode::OK, "tightening is fine: {body}");
    assert_eq!(body["limits"]["rpm"], 5);
    let (status, _) = app.patch(&path, &token, json!({"limits": set})).await;
    assert_eq!(status, StatusCode::OK, "back up to the ceiling");
    let (status, body) = app.patch(&path, &admin, json!({"limits": {}})).await;
    assert_eq!(status, StatusCode::OK, "an admin lifts them: {body}");

    // On create and subscribe, a user's limits stay within their user's.
    app.patch(&format!("/api/v1/users/{uid}"), &admin, json!({"limits": {"rpm": 100}})).await;
    let (status, body) =
        app.post("/api/v1/keys", &token, json!({"name": "x", "models": ["m"], "limits": {"rpm": 1000}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "limits.rpm");
    let (status, body) =
        app.post("/api/v1/keys", &token, json!({"name": "x", "models": ["m"], "limits": {"rpm": 50}})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) =
        app.post("/api/v1/subscriptions", &token, json!({"model_id": "n", "limits": {"rpm": 1000}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Subscriptions: the owner tightens within what an admin set.
    let spath = format!("/api/v1/subscriptions/{}", id(&sub));
    app.patch(&spath, &admin, json!({"limits": {"tpm": 1000}})).await;
    let (status, body) = app.patch(&spath, &token, json!({"limits": {}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "limits.tpm");
    let (status, body) = app.patch(&spath, &token, json!({"limits": {"tpm": 500}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["admin_limits"]["tpm"], 1000);

    // An owner may bring an expiry closer, never push it away.
    let soon = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let later = (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    app.patch(&path, &admin, json!({"expires_at": soon})).await;
    let (status, body) = app.patch(&path, &token, json!({"expires_at": later})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "expires_at");
}

/// Finding 3: the Default Team's member list is not a directory of every user.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_3_members_see_only_themselves(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (uid, token) = user_with_token(&app, "nosy").await;
    user_with_token(&app, "victim").await;
    let path = format!("/api/v1/teams/{DEFAULT_TEAM_ID}/members");
    let (status, page) = app.get(&path, &token).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let rows = page["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{page}");
    assert_eq!(rows[0]["user_id"], uid.as_str());
    let (_, all) = app.get(&path, &app.admin_key.clone()).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 2);

    // A team admin sees their team's members, all of them.
    let (lead, lead_token) = user_with_token(&app, "lead").await;
    let team = app.admin_post("/api/v1/teams", json!({"name": "T"})).await;
    let tpath = format!("/api/v1/teams/{}/members", id(&team));
    app.admin_post(&tpath, json!({"user_id": lead, "role": "admin"})).await;
    app.admin_post(&tpath, json!({"user_id": uid})).await;
    let (_, members) = app.get(&tpath, &lead_token).await;
    assert_eq!(members["data"].as_array().unwrap().len(), 2, "{members}");
    let (_, mine) = app.get(&tpath, &token).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1, "{mine}");
}

/// Finding 5: no account takeover by `preferred_username` or an unverified email; links audited.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_5_identities_link_only_by_verified_email(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let victim = app.admin_post("/api/v1/users", json!({"email": "boss@example.com", "name": "Boss"})).await;
    let vid = id(&victim);

    let by_username = hs256_token(json!({"sub": "evil-1", "preferred_username": "boss@example.com",
        "roles": ["user"], "exp": now() + 600}));
    let (status, me) = app.get("/api/v1/users/me", &by_username).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_ne!(me["id"], vid.as_str(), "preferred_username never links");

    let unverified = hs256_token(json!({"sub": "evil-2", "email": "boss@example.com", "email_verified": false,
        "roles": ["user"], "exp": now() + 600}));
    let (status, body) = app.get("/api/v1/users/me", &unverified).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let subject: Option<String> = sqlx::query_scalar("SELECT oidc_subject FROM users WHERE id = $1::uuid")
        .bind(&vid)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(subject, None, "the victim is still unlinked");

    let verified = hs256_token(json!({"sub": "boss-sso", "email": "Boss@example.com", "email_verified": true,
        "roles": ["user"], "exp": now() + 600}));
    let (status, me) = app.get("/api/v1/users/me", &verified).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["id"], vid.as_str());
    let rows = app.audit_actions("user", &vid).await;
    assert_eq!(rows.last(), Some(&("user.link".to_string(), "jwt:boss-sso".to_string())), "{rows:?}");
    assert_eq!(rows.iter().filter(|(action, _)| action == "user.link").count(), 1);
}

/// Finding 6: roles stored in Tollgate count (merged with the token's), and team roles grant.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_6_stored_roles_and_team_roles_grant(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let auditor = app
        .admin_post("/api/v1/users", json!({"email": "aud@example.com", "name": "A", "roles": ["adminReadonly"]}))
        .await;
    let token = user_token("aud-sub", "aud@example.com", &["user"]);
    let (status, body) = app.get("/api/v1/audit", &token).await;
    assert_eq!(status, StatusCode::OK, "granted in Tollgate: {body}");
    let (status, _) = app.post("/api/v1/teams", &token, json!({"name": "x"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "read-only");
    app.patch(&format!("/api/v1/users/{}", id(&auditor)), &admin, json!({"roles": ["user"]})).await;
    let (status, _) = app.get("/api/v1/audit", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "taken away in Tollgate");

    // A token without any role still works for a user Tollgate granted one...
    let roleless = hs256_token(json!({"sub": "aud-sub", "exp": now() + 600}));
    let (status, _) = app.get("/api/v1/users/me", &roleless).await;
    assert_eq!(status, StatusCode::OK);
    // ...and suspension ends everything, whatever the token says.
    app.patch(&format!("/api/v1/users/{}", id(&auditor)), &admin, json!({"status": "suspended"})).await;
    let admin_token = user_token("aud-sub", "aud@example.com", &["admin"]);
    let (status, _) = app.get("/api/v1/users/me", &admin_token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Team admins see, update and revoke their team's keys, but never get another's secret.
    app.create_model("m").await;
    let (member, member_token) = user_with_token(&app, "member").await;
    let (lead, lead_token) = user_with_token(&app, "lead").await;
    let team = app.admin_post("/api/v1/teams", json!({"name": "T", "limits": {"rpm": 100}})).await;
    let tid = id(&team);
    app.admin_post(&format!("/api/v1/teams/{tid}/members"), json!({"user_id": lead, "role": "admin"})).await;
    app.admin_post(&format!("/api/v1/teams/{tid}/members"), json!({"user_id": member})).await;
    app.subscribe(&member, "m").await;
    let (status, key) =
        app.post("/api/v1/keys", &member_token, json!({"name": "k", "team_id": tid, "models": ["m"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let kid = id(&key);
    let (_, listed) = app.get("/api/v1/keys", &lead_token).await;
    assert!(listed["data"].as_array().unwrap().iter().any(|k| k["id"] == kid.as_str()), "{listed}");
    let (status, body) = app.patch(&format!("/api/v1/keys/{kid}"), &lead_token, json!({"limits": {"rpm": 500}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "within the team's limits: {body}");
    let (status, _) = app.patch(&format!("/api/v1/keys/{kid}"), &lead_token, json!({"limits": {"rpm": 50}})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.post(&format!("/api/v1/keys/{kid}/rotate"), &lead_token, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) =
        app.post("/api/v1/keys", &lead_token, json!({"user_id": member, "team_id": tid, "name": "x"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app.post(&format!("/api/v1/keys/{kid}/revoke"), &lead_token, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    // A plain member of the team has none of this over the lead's resources.
    let (status, _) = app.patch(&format!("/api/v1/teams/{tid}"), &member_token, json!({"description": "x"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app.patch(&format!("/api/v1/teams/{tid}"), &lead_token, json!({"description": "x"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.patch(&format!("/api/v1/teams/{tid}"), &lead_token, json!({"limits": {}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a team admin cannot lift the team's limits");
}

/// Finding 8: the audit address believes X-Forwarded-For only from trusted proxies; the server's
/// request id, the client's and the user agent are kept; updates record before and after.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_8_audit_origin_and_changes(db: PgPool) {
    let app = TestApp::spawn_with(db, |c| c.trusted_proxies = vec!["127.0.0.1/32".into()]).await;
    let admin = app.admin_key.clone();
    let (uid, _) = user_with_token(&app, "aud").await;
    app.create_model("m").await;
    app.subscribe(&uid, "m").await;
    let key = app.create_key(&uid, &["m"]).await;
    let kid = id(&key);
    let resp = app
        .request(Method::PATCH, &format!("/api/v1/keys/{kid}"), &admin)
        .header("x-request-id", "client-chosen")
        .header("x-forwarded-for", "1.2.3.4, 198.51.100.7")
        .header("user-agent", "tollgate-test/1")
        .json(&json!({"limits": {"rpm": 7}, "expires_at": "2199-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let server_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let (_, page) = app.get(&format!("/api/v1/audit?action=key.update&target_id={kid}"), &admin).await;
    let row = &page["data"][0];
    assert_eq!(row["ip"], "198.51.100.7", "behind a trusted proxy: {row}");
    assert_eq!(row["request_id"], server_id.as_str());
    assert_eq!(row["client_request_id"], "client-chosen");
    assert_eq!(row["user_agent"], "tollgate-test/1");
    let changes = &row["details"]["changes"];
    assert_eq!(changes["limits"]["before"]["rpm"], Value::Null, "{row}");
    assert_eq!(changes["limits"]["after"]["rpm"], 7);
    assert_eq!(changes["expires_at"]["before"], Value::Null);
    assert!(changes["expires_at"]["after"].as_str().unwrap().starts_with("2199-01-01"));
    assert!(changes.get("name").is_none(), "unchanged fields are left out");

    for (path, body, action) in [
        (format!("/api/v1/users/{uid}"), json!({"limits": {"rpm": 3}}), "user.update"),
        (format!("/api/v1/teams/{DEFAULT_TEAM_ID}"), json!({"limits": {"tpm": 9}}), "team.update"),
    ] {
        app.patch(&path, &admin, body).await;
        let (_, page) = app.get(&format!("/api/v1/audit?action={action}"), &admin).await;
        let changes = &page["data"][0]["details"]["changes"];
        assert!(changes["limits"]["after"].is_object(), "{action}: {page}");
    }

    // Not behind a trusted proxy: the peer is the client.
    let direct = TestApp::spawn(app.db.clone()).await;
    let resp = direct
        .request(Method::POST, "/api/v1/teams", &direct.admin_key)
        .header("x-forwarded-for", "198.51.100.7")
        .json(&json!({"name": "Direct"}))
        .send()
        .await
        .unwrap();
    let team: Value = resp.json().await.unwrap();
    let ip: Option<String> = sqlx::query_scalar("SELECT ip FROM audit_logs WHERE target_id = $1")
        .bind(id(&team))
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(ip.as_deref(), Some("127.0.0.1"));
}

/// Finding 9: extreme dates are 422 naming the field, never a panic.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_9_extreme_usage_dates_are_422(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    for (query, field) in [
        ("to=-262143-01-05", "to"),
        ("to=+262142-12-31", "to"),
        ("from=1999-12-31", "from"),
        ("to=2200-01-01", "to"),
        ("from=0001-01-01T00:00:00Z", "from"),
        ("to=9999-12-31T23:59:59Z", "to"),
    ] {
        let (status, body) = app.get(&format!("/api/v1/usage?{query}"), &admin).await;
        assert!(status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
    let (status, _) = app.get("/api/v1/usage?from=2000-01-01&to=2001-06-01", &admin).await;
    assert_eq!(status, StatusCode::OK);
}

/// Finding 10: half a price is no price; an empty catalogue changes nothing.
#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn finding_10_sync_is_careful_with_prices_and_empty_answers(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    *app.model_info.lock().unwrap() = (
        200,
        json!({"data": [
            {"model_name": "half-in", "litellm_params": {"model": "openai/half-in"},
             "model_info": {"input_cost_per_token": 0.000001}},
            {"model_name": "half-out", "litellm_params": {"model": "openai/half-out"},
             "model_info": {"output_cost_per_token": 0.000002}},
            {"model_name": "whole", "litellm_params": {"model": "openai/whole"},
             "model_info": {"input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}},
        ]}),
    );
    let (status, report) = app.post("/api/v1/models/sync", &admin, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    for (model, enabled) in [("half-in", false), ("half-out", false), ("whole", true)] {
        let (_, m) = app.get(&format!("/api/v1/models/{model}"), &admin).await;
        assert_eq!(m["enabled"], enabled, "{m}");
    }

    *app.model_info.lock().unwrap() = (200, json!({"data": []}));
    let (status, body) = app.post("/api/v1/models/sync", &admin, json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let (_, page) = app.get("/api/v1/models?available=false", &admin).await;
    assert!(page["data"].as_array().unwrap().is_empty(), "nothing marked unavailable: {page}");
    let metrics =
        app.http.get(format!("{}/metrics", app.base)).bearer_auth(&admin).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.contains("sync") && l.contains("failure") && !l.starts_with('#')), "{metrics}");
}
