//! Budget standings and adjustments: figures read from the limiter's Redis keys (written here as
//! the gateway's script writes them) or, without them, from PostgreSQL's rollups and adjustments;
//! periods by the control API's clock; who may read and who may adjust.

use chrono::{DateTime, Datelike, Utc};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::common::*;

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn redis_now(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let (secs, _): (i64, i64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs
}

/// Removes every Redis key of a scope.
async fn forget(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = conn.keys(format!("{prefix}:*")).await.unwrap();
    if !keys.is_empty() {
        let _: i64 = conn.del(keys).await.unwrap();
    }
}

fn month(at: DateTime<Utc>) -> String {
    format!("m{:04}{:02}", at.year(), at.month())
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A user with a key on a fresh model, the key with a monthly budget of $10, 5 RPM and 1000 TPM:
/// `(user id, key id)`.
async fn budgeted_key(app: &TestApp, n: &str) -> (String, String) {
    let (user, model) = app.subscribed_user(&format!("budget-{n}@example.com"), &format!("bm-{n}")).await;
    let uid = id(&user);
    let limits = json!({"max_budget": 10, "budget_period": "monthly", "rpm": 5, "tpm": 1000});
    let key =
        app.admin_post("/api/v1/keys", json!({"user_id": uid, "name": "k", "models": [model], "limits": limits})).await;
    (uid, id(&key))
}

async fn usage_today(app: &TestApp, key: &str, user: &str, cost: &str) {
    sqlx::query(
        "INSERT INTO usage_daily (day, key_id, model_id, user_id, team_id, requests, cost)
         VALUES (current_date, $1::uuid, 'm', $2::uuid, 'a0000000-0000-4000-8000-000000000001', 1, $3::numeric)",
    )
    .bind(key)
    .bind(user)
    .bind(cost)
    .execute(&app.db)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn budget_standing_reads_the_limiters_keys_else_postgres(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (uid, key) = budgeted_key(&app, "read").await;
    let mut conn = redis().await;
    let prefix = format!("tg:{{key:{key}}}");
    forget(&mut conn, &prefix).await;
    usage_today(&app, &key, &uid, "1.2345674").await;

    // Redis does not hold the period: PostgreSQL's rollups, rounded to the micro-USD.
    let (status, s) = app.get(&format!("/api/v1/keys/{key}/budget"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["scope"], "key");
    assert_eq!(s["id"], key.as_str());
    assert_eq!(s["source"], "postgres");
    let now = Utc::now();
    assert_eq!(s["period"], month(now));
    assert_eq!(s["limits"]["rpm"], 5);
    assert_eq!(num(&s["max_budget"]), 10.0);
    assert_eq!(num(&s["spent"]), 1.234567);
    assert_eq!(num(&s["reserved"]), 0.0);
    assert_eq!(num(&s["remaining"]), 8.765433);
    let start: DateTime<Utc> = s["period_start"].as_str().unwrap().parse().unwrap();
    assert_eq!((start.day(), start.month(), start.timestamp() % 86400), (1, now.month(), 0));
    let resets: DateTime<Utc> = s["resets_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(resets.day(), 1);
    assert!(resets > now && resets - start >= chrono::Duration::days(28));

    // The limiter's keys: settled spend, a live reservation and an expired one, windows.
    let t = redis_now(&mut conn).await;
    let period = month(DateTime::from_timestamp(t, 0).unwrap());
    let _: () = conn.set(format!("{prefix}:nb:{period}"), 2_000_000_600i64).await.unwrap();
    let _: () = conn
        .hset_multiple(
            format!("{prefix}:nres"),
            &[("r1", 500_000_000i64), ("r2", 1_000_000_000), ("__total", 1_500_000_000)],
        )
        .await
        .unwrap();
    let _: () = conn.zadd(format!("{prefix}:nlease"), "r1", t + 600).await.unwrap();
    let _: () = conn.zadd(format!("{prefix}:nlease"), "r2", t - 1).await.unwrap();
    let window = |a: i64, b: i64, old: i64| {
        vec![
            (t.to_string(), a),
            ((t - 30).to_string(), b),
            ((t - 61).to_string(), old),
            ("t".into(), a + b + old),
            ("s".into(), t - 120),
            ("b".into(), t - 200),
            ("f".into(), 7),
        ]
    };
    let _: () = conn.hset_multiple(format!("{prefix}:rpm"), &window(2, 1, 5)).await.unwrap();
    let _: () = conn.hset_multiple(format!("{prefix}:tpm"), &window(200, 100, 500)).await.unwrap();
    let (status, s) = app.get(&format!("/api/v1/keys/{key}/budget"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["source"], "redis", "{s}");
    assert_eq!(num(&s["spent"]), 2.000001, "nano-USD rounded to the micro-USD: {s}");
    assert_eq!(num(&s["reserved"]), 0.5, "only unexpired leases: {s}");
    assert_eq!(num(&s["remaining"]), 7.499999, "10 - 2.0000006 - 0.5");
    assert_eq!(s["rpm"], json!({"limit": 5, "used": 3}));
    assert_eq!(s["tpm"], json!({"limit": 1000, "used": 300}));

    // A scope without limits: no budget figures, no windows.
    let (status, s) = app.get(&format!("/api/v1/users/{uid}/budget"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["period"], "all");
    for field in ["period_start", "resets_at", "max_budget", "spent", "reserved", "remaining"] {
        assert!(s[field].is_null(), "{field}: {s}");
    }
    assert_eq!(s["rpm"], json!({"limit": null, "used": null}));
    forget(&mut conn, &prefix).await;
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn adjustments_apply_to_redis_at_once_and_to_every_seed(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (uid, key) = budgeted_key(&app, "adjust").await;
    let mut conn = redis().await;
    let prefix = format!("tg:{{key:{key}}}");
    forget(&mut conn, &prefix).await;
    usage_today(&app, &key, &uid, "4").await;
    let path = format!("/api/v1/keys/{key}/budget/adjustments");

    // Redis does not hold the period yet: the seed will count it.
    let (status, made) = app.post(&path, &admin, json!({"amount": -1.5, "reason": "outage refund"})).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["redis"], "not_held");
    assert_eq!(num(&made["adjustment"]["amount"]), -1.5);
    assert_eq!(made["adjustment"]["scope"], "key");
    assert_eq!(made["adjustment"]["reason"], "outage refund");
    let period = made["adjustment"]["period"].as_str().unwrap().to_string();
    assert_eq!(period, month(Utc::now()));
    assert_eq!(made["standing"]["source"], "postgres");
    assert_eq!(num(&made["standing"]["spent"]), 2.5);
    assert_eq!(num(&made["standing"]["remaining"]), 7.5);
    let stored: (String, String, i64, String, Option<String>) =
        sqlx::query_as("SELECT scope, period, amount_nanos, actor, request_id FROM budget_adjustments")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((stored.0.as_str(), stored.1.as_str(), stored.2), ("key", period.as_str(), -1_500_000_000));
    assert!(stored.3.starts_with("admin-key:") && stored.4.is_some(), "{stored:?}");
    assert_eq!(app.audit_actions("key", &key).await.last().unwrap().0, "budget.adjust");

    // Redis holds the period (seeded before the adjustment): added at once.
    let nb = format!("{prefix}:nb:{period}");
    let t = redis_now(&mut conn).await;
    let _: () = conn.set(&nb, 2_500_000_000i64).await.unwrap();
    let _: () = conn.set(format!("{nb}:seeded"), t - 5).await.unwrap();
    let (status, made) = app.post(&path, &admin, json!({"amount": 0.25, "reason": "correction"})).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["redis"], "added");
    assert_eq!(made["standing"]["source"], "redis");
    assert_eq!(num(&made["standing"]["spent"]), 2.75);
    let held: i64 = conn.get(&nb).await.unwrap();
    assert_eq!(held, 2_750_000_000);

    // A period seeded while the adjustment was committed may or may not count it: dropped, to be
    // seeded again.
    let _: () = conn.set(format!("{nb}:seeded"), t + 3600).await.unwrap();
    let (status, made) = app.post(&path, &admin, json!({"amount": -0.75, "reason": "goodwill"})).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["redis"], "reseed");
    let exists: bool = conn.exists(&nb).await.unwrap();
    assert!(!exists);
    assert_eq!(made["standing"]["source"], "postgres");
    assert_eq!(num(&made["standing"]["spent"]), 2.0, "4 - 1.5 + 0.25 - 0.75");

    // The list, oldest first, with its total; filtered by period.
    let (status, list) = app.get(&format!("{path}?limit=2"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!((list["total"].as_i64(), list["has_more"].as_bool()), (Some(3), Some(true)));
    let amounts: Vec<f64> = list["data"].as_array().unwrap().iter().map(|a| num(&a["amount"])).collect();
    assert_eq!(amounts, vec![-1.5, 0.25]);
    let (_, none) = app.get(&format!("{path}?period=m200001"), &admin).await;
    assert_eq!(none["total"], 0);
    forget(&mut conn, &prefix).await;
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn the_standing_resets_at_the_period_boundary(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (uid, key) = budgeted_key(&app, "reset").await;
    let mut conn = redis().await;
    forget(&mut conn, &format!("tg:{{key:{key}}}")).await;
    usage_today(&app, &key, &uid, "3").await;
    let path = format!("/api/v1/keys/{key}/budget");
    let (_, before) = app.get(&path, &admin).await;
    assert_eq!(num(&before["spent"]), 3.0);
    let resets: DateTime<Utc> = before["resets_at"].as_str().unwrap().parse().unwrap();

    // A second before the boundary: the same period.
    app.clock.set_offset_secs((resets - Utc::now()).num_seconds() - 2);
    let (_, late) = app.get(&path, &admin).await;
    assert_eq!(late["period"], before["period"], "{late}");
    assert_eq!(num(&late["spent"]), 3.0);

    // Past it: the next period, from zero, resetting a month later.
    app.clock.set_offset_secs((resets - Utc::now()).num_seconds() + 2);
    let (_, next) = app.get(&path, &admin).await;
    assert_eq!(next["period"], month(resets), "{next}");
    assert_eq!(next["period_start"], before["resets_at"]);
    assert_eq!(num(&next["spent"]), 0.0);
    assert_eq!(num(&next["remaining"]), 10.0);
    let again: DateTime<Utc> = next["resets_at"].as_str().unwrap().parse().unwrap();
    assert_eq!((again.day(), again.month()), (1, resets.month() % 12 + 1));

    // An adjustment made now belongs to the new period.
    let (_, made) =
        app.post(&format!("{path}/adjustments"), &admin, json!({"amount": 1, "reason": "next month"})).await;
    assert_eq!(made["adjustment"]["period"], month(resets));
    assert_eq!(num(&made["standing"]["spent"]), 1.0);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn without_redis_the_standing_comes_from_postgres(db: PgPool) {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let app = TestApp::spawn_with(db, |c| c.redis_url = format!("redis://127.0.0.1:{dead}")).await;
    let admin = app.admin_key.clone();
    let (uid, key) = budgeted_key(&app, "dead").await;
    usage_today(&app, &key, &uid, "0.5").await;
    let started = std::time::Instant::now();
    let (status, s) = app.get(&format!("/api/v1/keys/{key}/budget"), &admin).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(s["source"], "postgres");
    assert_eq!(num(&s["spent"]), 0.5);
    assert_eq!(s["rpm"], json!({"limit": 5, "used": null}), "windows live only in Redis");
    let (status, made) = app
        .post(&format!("/api/v1/keys/{key}/budget/adjustments"), &admin, json!({"amount": -0.25, "reason": "x"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["redis"], "pending");
    assert_eq!(num(&made["standing"]["spent"]), 0.25);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn adjustments_refuse_bad_input_naming_the_field(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let (_, key) = budgeted_key(&app, "bad").await;
    let path = format!("/api/v1/keys/{key}/budget/adjustments");
    let long = "x".repeat(501);
    for (body, field) in [
        (json!({"amount": 0, "reason": "r"}), "amount"),
        (json!({"amount": 0.0000004, "reason": "r"}), "amount"),
        (json!({"amount": 1000000.5, "reason": "r"}), "amount"),
        (json!({"amount": -1e300, "reason": "r"}), "amount"),
        (json!({"amount": "1", "reason": "r"}), "amount"),
        (json!({"amount": null, "reason": "r"}), "amount"),
        (json!({"reason": "r"}), "amount"),
        (json!({"amount": 1}), "reason"),
        (json!({"amount": 1, "reason": "  "}), "reason"),
        (json!({"amount": 1, "reason": long}), "reason"),
        (json!({"amount": 1, "reason": "a\u{0}b"}), "reason"),
        (json!({"amount": 1, "reason": "r", "extra": 1}), "extra"),
    ] {
        let (status, err) = app.post(&path, &admin, body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let (status, _) = app.post("/api/v1/keys/not-a-uuid/budget/adjustments", &admin, json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = app.get(&format!("/api/v1/keys/{}/budget", uuid()), &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, err) = app.get(&format!("{path}?limit=0"), &admin).await;
    assert_eq!((status, err["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")));
    let (status, err) = app.get(&format!("{path}?period=a%20b"), &admin).await;
    assert_eq!((status, err["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("period")));
    assert_eq!(app.count("budget_adjustments").await, 0);
}

/// A caller's token and what it gets: (GET of the standing and the list, POST of an adjustment).
type Expect<'a> = (&'a str, (StatusCode, StatusCode));

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn owners_read_their_budgets_and_only_admins_adjust(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let admin = app.admin_key.clone();
    let owner = user_token("budget-owner", "budget-owner@example.com", &["user"]);
    let lead = user_token("budget-lead", "budget-lead@example.com", &["user"]);
    let member = user_token("budget-member", "budget-member@example.com", &["user"]);
    let other = user_token("budget-other", "budget-other@example.com", &["user"]);
    let ro = user_token("budget-ro", "budget-ro@example.com", &["adminReadonly"]);
    let mut ids = Vec::new();
    for t in [&owner, &lead, &member, &other, &ro] {
        ids.push(id(&app.get("/api/v1/users/me", t).await.1));
    }
    let (owner_id, lead_id, member_id) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    app.create_model("bm-authz").await;
    let sub = id(&app.subscribe(&owner_id, "bm-authz").await);
    let team = id(&app.admin_post("/api/v1/teams", json!({"name": "budget-team", "limits": {"max_budget": 50}})).await);
    for (user, role) in [(&owner_id, "member"), (&lead_id, "admin"), (&member_id, "member")] {
        app.admin_post(&format!("/api/v1/teams/{team}/members"), json!({"user_id": user, "role": role})).await;
    }
    let key = id(&app
        .admin_post(
            "/api/v1/keys",
            json!({"user_id": owner_id, "team_id": team, "name": "k", "models": ["bm-authz"],
                   "limits": {"max_budget": 5, "budget_period": "daily"}}),
        )
        .await);
    let body = json!({"amount": 1, "reason": "r"});
    // What a caller gets: (GET standing and list, POST adjustment).
    let reads = (StatusCode::OK, StatusCode::FORBIDDEN);
    let hidden = (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND);
    let forbidden = (StatusCode::FORBIDDEN, StatusCode::FORBIDDEN);
    let cases: Vec<(String, Vec<Expect>)> = vec![
        // (path, [(token, outcome)])
        (
            format!("/api/v1/keys/{key}/budget"),
            vec![(&owner, reads), (&lead, reads), (&member, hidden), (&other, hidden), (&ro, reads)],
        ),
        (
            format!("/api/v1/users/{owner_id}/budget"),
            vec![(&owner, reads), (&lead, hidden), (&other, hidden), (&ro, reads)],
        ),
        (format!("/api/v1/subscriptions/{sub}/budget"), vec![(&owner, reads), (&other, hidden), (&ro, reads)]),
        (
            format!("/api/v1/teams/{team}/budget"),
            vec![(&lead, reads), (&member, forbidden), (&other, hidden), (&ro, reads)],
        ),
    ];
    for (path, who) in &cases {
        for (token, (read, write)) in who {
            let (status, v) = app.get(path, token).await;
            assert_eq!(status, *read, "GET {path}: {v}");
            let (status, v) = app.get(&format!("{path}/adjustments"), token).await;
            assert_eq!(status, *read, "GET {path}/adjustments: {v}");
            let (status, v) = app.post(&format!("{path}/adjustments"), token, body.clone()).await;
            assert_eq!(status, *write, "POST {path}/adjustments: {v}");
        }
        let (status, v) = app.post(&format!("{path}/adjustments"), &admin, body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "admin POST {path}/adjustments: {v}");
    }
    assert_eq!(app.count("budget_adjustments").await, 4, "only the administrator's");

    // Every scope that applies to the owner at once; the team's only for its admin.
    let (status, mine) = app.get("/api/v1/users/me/budgets", &owner).await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(mine["user_id"], owner_id.as_str());
    let scopes: Vec<(String, String)> = mine["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["scope"].as_str().unwrap().to_string(), s["id"].as_str().unwrap().to_string()))
        .collect();
    let expected: Vec<(String, String)> = [("user", &owner_id), ("key", &key), ("subscription", &sub)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(scopes, expected);
    let key_standing = &mine["data"][1];
    assert_eq!(num(&key_standing["spent"]), 1.0, "the administrator's debit: {key_standing}");
    assert!(key_standing["period"].as_str().unwrap().starts_with('d'));
    let (_, leads) = app.get("/api/v1/users/me/budgets", &lead).await;
    let kinds: Vec<&str> = leads["data"].as_array().unwrap().iter().map(|s| s["scope"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["user", "team"], "{leads}");
    let (status, _) = app.get("/api/v1/users/me/budgets", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an admin API key is no user");
}
