use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;
use std::str::FromStr;
use uuid::Uuid;

use crate::common::*;

/// A rollup row as the gateway's usage writer leaves it: `(day, hour, key, model, user, team,
/// requests, prompt, completion, cost)`.
type UsageRow<'a> = (&'a str, &'a str, Uuid, &'a str, Uuid, Uuid, i64, i64, i64, &'a str);

async fn insert_usage(app: &TestApp, rows: &[UsageRow<'_>]) {
    for (day, hour, key, model, user, team, requests, prompt, completion, cost) in rows {
        let cost = Decimal::from_str(cost).unwrap();
        sqlx::query(
            "INSERT INTO usage_daily (day, key_id, model_id, user_id, team_id, requests, prompt_tokens, completion_tokens, cost)
             VALUES ($1::date, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (day, key_id, model_id) DO UPDATE SET requests = usage_daily.requests + EXCLUDED.requests,
               prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens,
               completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens,
               cost = usage_daily.cost + EXCLUDED.cost",
        )
        .bind(day).bind(key).bind(model).bind(user).bind(team).bind(requests).bind(prompt).bind(completion).bind(cost)
        .execute(&app.db).await.unwrap();
        sqlx::query(
            "INSERT INTO usage_hourly (hour, key_id, model_id, user_id, team_id, requests, prompt_tokens, completion_tokens, cost)
             VALUES ($1::timestamptz, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(hour).bind(key).bind(model).bind(user).bind(team).bind(requests).bind(prompt).bind(completion).bind(cost)
        .execute(&app.db).await.unwrap();
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn usage_groups_and_filters_rollups(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let alice_token = user_token("alice", "alice@example.com", &["user"]);
    let (_, alice) = app.get("/api/v1/users/me", &alice_token).await;
    let alice_id: Uuid = id(&alice).parse().unwrap();
    let bob_id: Uuid = id(&app.create_user("bob@example.com").await).parse().unwrap();
    let team = tollgate_core::DEFAULT_TEAM_ID;
    let (ka, kb) = (Uuid::new_v4(), Uuid::new_v4());
    insert_usage(
        &app,
        &[
            ("2026-03-01", "2026-03-01T10:00:00Z", ka, "m1", alice_id, team, 3, 100, 50, "0.003"),
            ("2026-03-01", "2026-03-01T11:00:00Z", ka, "m2", alice_id, team, 1, 10, 5, "0.0001"),
            ("2026-03-02", "2026-03-02T09:00:00Z", kb, "m1", bob_id, team, 2, 40, 20, "0.5"),
            ("2026-04-15", "2026-04-15T09:00:00Z", kb, "m1", bob_id, team, 7, 1, 1, "1"),
        ],
    )
    .await;
    let range = "from=2026-03-01&to=2026-03-03";

    let (status, r) = app.get(&format!("/api/v1/usage?group_by=day&{range}"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(
        r["data"],
        json!([
            {"kind": "usage", "group": "2026-03-01", "requests": 4, "errors": 0, "prompt_tokens": 110, "completion_tokens": 55, "total_tokens": 165, "cost": 0.0031},
            {"kind": "usage", "group": "2026-03-02", "requests": 2, "errors": 0, "prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60, "cost": 0.5},
        ])
    );
    assert_eq!(r["totals"]["requests"], 6);
    assert_eq!(r["totals"]["cost"], 0.5031);

    let (_, r) = app.get(&format!("/api/v1/usage?group_by=model&{range}"), &admin).await;
    let groups: Vec<(&str, i64)> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["group"].as_str().unwrap(), row["requests"].as_i64().unwrap()))
        .collect();
    assert_eq!(groups, [("m1", 5), ("m2", 1)]);

    let (_, r) = app.get(&format!("/api/v1/usage?group_by=key&{range}&model_id=m1"), &admin).await;
    assert_eq!(r["data"].as_array().unwrap().len(), 2);
    let (_, r) = app.get(&format!("/api/v1/usage?group_by=user&{range}&key_id={kb}"), &admin).await;
    let (_, bob) = app.get(&format!("/api/v1/users/{bob_id}"), &admin).await;
    assert_eq!(
        r["data"],
        json!([{"kind": "usage", "group": bob_id.to_string(), "name": bob["name"], "email": "bob@example.com", "requests": 2, "errors": 0, "prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60, "cost": 0.5}])
    );
    let (_, r) =
        app.get(&format!("/api/v1/usage?group_by=team&from=2026-01-01&to=2026-12-31&team_id={team}"), &admin).await;
    assert_eq!(r["data"][0]["requests"], 13);
    assert_eq!(r["data"][0]["name"], "Default Team", "{r}");

    let (_, r) = app.get("/api/v1/usage?group_by=hour&from=2026-03-01T11:00:00Z&to=2026-03-02T00:00:00Z", &admin).await;
    assert_eq!(
        r["data"],
        json!([{"kind": "usage", "group": "2026-03-01T11:00:00Z", "requests": 1, "errors": 0, "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": 0.0001}])
    );

    // A user sees only their own usage, whatever they ask for.
    let (_, r) = app.get(&format!("/api/v1/usage?group_by=user&{range}"), &alice_token).await;
    assert_eq!(r["data"].as_array().unwrap().len(), 1);
    assert_eq!(r["data"][0]["group"], alice_id.to_string());
    assert_eq!(r["totals"]["requests"], 4);

    let (status, body) = app.get("/api/v1/usage?from=2026-03-03&to=2026-03-01", &admin).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "from");
    let (status, _) = app.get("/api/v1/usage?from=2020-01-01&to=2026-01-01", &admin).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn usage_by_key_names_the_key_its_prefix_and_owner(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (user, _) = app.subscribed_user("carol@example.com", "m1").await;
    let uid: Uuid = id(&user).parse().unwrap();
    let (_, key) =
        app.post("/api/v1/keys", &admin, json!({"user_id": uid, "name": "carol-laptop", "models": ["m1"]})).await;
    let kid: Uuid = id(&key).parse().unwrap();
    let gone = Uuid::new_v4(); // a key deleted since: its row stays, unlabelled
    let team = tollgate_core::DEFAULT_TEAM_ID;
    insert_usage(
        &app,
        &[
            ("2026-03-01", "2026-03-01T10:00:00Z", kid, "m1", uid, team, 3, 100, 50, "0.003"),
            ("2026-03-01", "2026-03-01T10:00:00Z", gone, "m1", uid, team, 1, 1, 1, "0.001"),
        ],
    )
    .await;
    let (status, r) = app.get("/api/v1/usage?group_by=key&from=2026-03-01&to=2026-03-02", &admin).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let rows = r["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{r}");
    let labelled = rows.iter().find(|row| row["group"] == kid.to_string()).unwrap();
    assert_eq!(labelled["name"], "carol-laptop");
    assert_eq!(labelled["key_prefix"], key["key_prefix"]);
    assert_eq!(labelled["email"], "carol@example.com");
    assert_eq!(labelled["user_id"], uid.to_string());
    let orphan = rows.iter().find(|row| row["group"] == gone.to_string()).unwrap();
    assert!(orphan.get("name").is_none() && orphan["requests"] == 1, "{orphan}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn usage_by_user_and_team_carries_names_and_keeps_deleted_ones(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (_, dora) =
        app.post("/api/v1/users", &admin, json!({"email": "dora@example.com", "name": "Dora Explorer"})).await;
    let dora: Uuid = id(&dora).parse().unwrap();
    let research = app.admin_post("/api/v1/teams", json!({"name": "Research"})).await;
    let research: Uuid = id(&research).parse().unwrap();
    let doomed = app.admin_post("/api/v1/teams", json!({"name": "Doomed"})).await;
    let doomed: Uuid = id(&doomed).parse().unwrap();
    let ghost = Uuid::new_v4(); // a user the database no longer knows
    insert_usage(
        &app,
        &[
            ("2026-05-01", "2026-05-01T08:00:00Z", Uuid::new_v4(), "m1", dora, research, 2, 10, 10, "0.02"),
            ("2026-05-01", "2026-05-01T08:00:00Z", Uuid::new_v4(), "m1", dora, doomed, 1, 1, 1, "0.01"),
            ("2026-05-01", "2026-05-01T08:00:00Z", Uuid::new_v4(), "m1", ghost, research, 4, 4, 4, "0.04"),
        ],
    )
    .await;
    let (status, _) = app.delete(&format!("/api/v1/teams/{doomed}"), &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let range = "from=2026-05-01&to=2026-05-02";

    let (status, r) = app.get(&format!("/api/v1/usage?group_by=user&{range}"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let rows = r["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{r}");
    let row = |group: Uuid| rows.iter().find(|row| row["group"] == group.to_string()).unwrap().clone();
    let labelled = row(dora);
    assert_eq!(
        (labelled["name"].as_str(), labelled["email"].as_str()),
        (Some("Dora Explorer"), Some("dora@example.com"))
    );
    assert_eq!(labelled["requests"], 3);
    assert!(labelled.get("key_prefix").is_none() && labelled.get("user_id").is_none(), "{labelled}");
    let unknown = row(ghost);
    assert!(unknown.get("name").is_none() && unknown.get("email").is_none() && unknown["requests"] == 4, "{unknown}");

    let (status, r) = app.get(&format!("/api/v1/usage?group_by=team&{range}"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let rows = r["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "a deleted team's usage stays: {r}");
    let row = |group: Uuid| rows.iter().find(|row| row["group"] == group.to_string()).unwrap().clone();
    assert_eq!(row(research)["name"], "Research");
    assert_eq!(row(research)["requests"], 6);
    let gone = row(doomed);
    assert!(gone.get("name").is_none() && gone["requests"] == 1, "{gone}");
    assert!(gone.get("email").is_none(), "{gone}");
    assert_eq!(r["totals"]["requests"], 7);

    // A model is its own label: nothing is added.
    let (_, r) = app.get(&format!("/api/v1/usage?group_by=model&{range}"), &admin).await;
    assert_eq!(r["data"][0]["group"], "m1");
    assert!(r["data"][0].get("name").is_none(), "{r}");
}
