//! Budget standings and adjustments against real spend: two gateway replicas spend through the
//! limiter, the control API reads the standing (from Redis, and from PostgreSQL when Redis is out
//! of reach) and adjusts budgets, and admission follows at once and after Redis loses the scope.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;
use tollgate_control_api::{config::ControlApiConfig, standing::Clock, state::AppState};

use crate::harness::*;

/// A control API of the test's own on the stack's database, with its clock in hand.
async fn control_api(stack: &Stack, redis_url: &str) -> (String, Arc<Clock>) {
    let config = ControlApiConfig {
        redis_url: redis_url.to_string(),
        admin_api_keys: vec![stack.admin_key.clone()],
        ..Default::default()
    };
    let state = AppState::new(&config, stack.db.clone()).unwrap();
    let clock = state.clock.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    tokio::spawn(tollgate_control_api::serve(listener, state, std::future::pending()));
    (base, clock)
}

async fn get(stack: &Stack, url: &str) -> Value {
    let resp = stack.http.get(url).bearer_auth(&stack.admin_key).send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "GET {url}: {v}");
    v
}

fn usd(v: &Value) -> Decimal {
    Decimal::from_str_exact(&v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")).to_string()).unwrap()
}

/// What usage_logs recorded for a key: (cost rounded to the micro-USD, requests, tokens).
async fn logged(stack: &Stack, key_id: &str) -> (Decimal, i64, i64) {
    let (cost, n, tokens): (Decimal, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(cost), 0), count(*), coalesce(sum(prompt_tokens + completion_tokens), 0)::bigint
         FROM usage_logs WHERE key_id = $1::uuid",
    )
    .bind(key_id)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    (cost.round_dp(6).normalize(), n, tokens)
}

/// Waits until the standing at `url` holds nothing reserved (every request settled) and `spent`.
async fn settled(stack: &Stack, url: &str, spent: Decimal) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = get(stack, url).await;
        if usd(&s["reserved"]).is_zero() && usd(&s["spent"]) == spent {
            return s;
        }
        assert!(Instant::now() < deadline, "never settled at {spent}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn the_standing_matches_spend_through_two_replicas_and_resets_at_the_period_boundary(db: PgPool) {
    let stack = Stack::start(db).await;
    let r2 = stack.replica(vec![]).await;
    stack.model("m").await;
    let user = stack
        .post_admin(
            "/users",
            json!({"email": "standing@example.com", "name": "s",
                                      "limits": {"max_budget": 5, "budget_period": "monthly"}}),
        )
        .await;
    let uid = user["id"].as_str().unwrap().to_string();
    stack.post_admin("/subscriptions", json!({"user_id": uid, "model_id": "m"})).await;
    let limits = json!({"max_budget": 1, "budget_period": "monthly", "rpm": 1000, "tpm": 1_000_000});
    let key = stack.post_admin("/keys", json!({"user_id": uid, "name": "k", "models": ["m"], "limits": limits})).await;
    let (secret, key_id) = (key["key"].as_str().unwrap().to_string(), key["id"].as_str().unwrap().to_string());
    stack.wait_model(&secret, "m").await;
    let (api, clock) = control_api(&stack, &stack.redis).await;

    // Requests of different sizes, alternating between the replicas, some streamed.
    for i in 0..10 {
        let base = if i % 2 == 0 { &stack.gateway.base } else { &r2.base };
        let words = "word ".repeat(i * 7 + 1);
        let body = json!({"model": "m", "max_tokens": 3 + i, "stream": i % 3 == 0, "messages": user_msg(&words)});
        let resp = stack
            .http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.bytes().await.unwrap();
    }
    stack.wait_usage_rows(10).await;
    let (cost, requests, tokens) = logged(&stack, &key_id).await;
    assert_eq!(requests, 10);
    assert!(cost > Decimal::ZERO);
    let key_url = format!("{api}/keys/{key_id}/budget");
    let s = settled(&stack, &key_url, cost).await;
    assert_eq!(s["source"], "redis", "{s}");
    assert_eq!(usd(&s["remaining"]), Decimal::ONE - cost);
    assert_eq!(s["rpm"], json!({"limit": 1000, "used": 10}));
    assert_eq!(s["tpm"], json!({"limit": 1_000_000, "used": tokens}), "settled to the real token counts");
    let u = settled(&stack, &format!("{api}/users/{uid}/budget"), cost).await;
    assert_eq!(usd(&u["remaining"]), Decimal::from(5) - cost);

    // Redis out of reach: PostgreSQL's rollups say the same.
    let dead = free_port();
    let (blind, _) = control_api(&stack, &format!("redis://127.0.0.1:{dead}")).await;
    let p = get(&stack, &format!("{blind}/keys/{key_id}/budget")).await;
    assert_eq!(p["source"], "postgres", "{p}");
    assert_eq!((usd(&p["spent"]), p["period"].clone()), (cost, s["period"].clone()));
    assert_eq!(p["rpm"]["used"], Value::Null);

    // Moments before the period ends it still counts; past the boundary the next period starts
    // from nothing.
    let resets: chrono::DateTime<chrono::Utc> = s["resets_at"].as_str().unwrap().parse().unwrap();
    clock.set_offset_secs((resets - chrono::Utc::now()).num_seconds() - 3);
    let late = get(&stack, &key_url).await;
    assert_eq!((late["period"].clone(), usd(&late["spent"])), (s["period"].clone(), cost), "{late}");
    clock.set_offset_secs((resets - chrono::Utc::now()).num_seconds() + 1);
    let next = get(&stack, &key_url).await;
    assert_ne!(next["period"], s["period"]);
    assert_eq!(next["period_start"], s["resets_at"]);
    assert_eq!((usd(&next["spent"]), usd(&next["remaining"])), (Decimal::ZERO, Decimal::ONE), "{next}");
    assert_eq!(next["rpm"]["used"], 0, "the window is a minute long: {next}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn adjustments_change_admission_at_once_and_survive_losing_the_scope_in_redis(db: PgPool) {
    // The reconcile runs every second: were it to leave adjustments out, it would undo credits.
    let stack = Stack::start_with(db, vec![("TOLLGATE_BUDGET_RECONCILE_SECONDS", "1")]).await;
    let r2 = stack.replica(vec![("TOLLGATE_BUDGET_RECONCILE_SECONDS", "1")]).await;
    // $0.01 per completion token, nothing for prompts: max_tokens 3 costs exactly $0.03 (the
    // mock answers 4 tokens, capped at 3).
    stack.post_admin("/models", json!({"id": "b", "input_cost_per_token": 0, "output_cost_per_token": 0.01})).await;
    let user = stack.post_admin("/users", json!({"email": "adjust@example.com", "name": "a"})).await;
    let uid = user["id"].as_str().unwrap().to_string();
    stack.post_admin("/subscriptions", json!({"user_id": uid, "model_id": "b"})).await;
    let limits = json!({"max_budget": 0.06, "budget_period": "daily"});
    let key = stack.post_admin("/keys", json!({"user_id": uid, "name": "k", "models": ["b"], "limits": limits})).await;
    let (secret, key_id) = (key["key"].as_str().unwrap().to_string(), key["id"].as_str().unwrap().to_string());
    stack.wait_model(&secret, "b").await;
    let (api, _) = control_api(&stack, &stack.redis).await;
    let standing_url = format!("{api}/keys/{key_id}/budget");
    let body = json!({"model": "b", "max_tokens": 3, "messages": user_msg("hi")});
    let mut turn = 0;
    let mut chat = || {
        turn += 1;
        let base = if turn % 2 == 0 { r2.base.clone() } else { stack.gateway.base.clone() };
        stack.http.post(format!("{base}/v1/chat/completions")).bearer_auth(&secret).json(&body).send()
    };
    let adjust = |amount: f64| {
        stack
            .http
            .post(format!("{api}/keys/{key_id}/budget/adjustments"))
            .bearer_auth(&stack.admin_key)
            .json(&json!({"amount": amount, "reason": format!("test {amount}")}))
            .send()
    };
    let cents = |n: i64| Decimal::new(n, 2);

    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    settled(&stack, &standing_url, cents(6)).await;
    let refused = chat().await.unwrap();
    assert_eq!(error_of(refused).await, (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota".into()));

    // A credit admits the exhausted key at once, on either replica. (Redis marks a seed by the
    // second: an adjustment in the second the budget was seeded drops it to be seeded again.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = adjust(-0.03).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let made: Value = resp.json().await.unwrap();
    assert_eq!(made["redis"], "added", "{made}");
    assert_eq!((usd(&made["standing"]["spent"]), usd(&made["standing"]["remaining"])), (cents(3), cents(3)));
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    settled(&stack, &standing_url, cents(6)).await;
    assert_eq!(chat().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);

    // A debit refuses at once what a credit had just allowed.
    assert_eq!(adjust(-0.03).await.unwrap().status(), StatusCode::CREATED);
    let made: Value = adjust(0.03).await.unwrap().json().await.unwrap();
    assert_eq!(usd(&made["standing"]["remaining"]), Decimal::ZERO, "{made}");
    assert_eq!(chat().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);

    // Credit again, and let the reconcile run a few times: it counts the credit too.
    assert_eq!(adjust(-0.03).await.unwrap().status(), StatusCode::CREATED);
    stack.wait_usage_rows(3).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = settled(&stack, &standing_url, cents(3)).await;
    assert_eq!(s["source"], "redis");

    // Redis loses the scope: the standing falls back to PostgreSQL (usage plus adjustments), and
    // the re-seed counts the adjustments, so the credit still admits one request and no more.
    let mut redis =
        redis::Client::open(stack.redis.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("tg:{{key:{key_id}}}*")).query_async(&mut redis).await.unwrap();
    assert!(!keys.is_empty());
    let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await.unwrap();
    let s = get(&stack, &standing_url).await;
    assert_eq!((s["source"].as_str(), usd(&s["spent"])), (Some("postgres"), cents(3)), "{s}");
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    let s = settled(&stack, &standing_url, cents(6)).await;
    assert_eq!(s["source"], "redis", "re-seeded: {s}");
    assert_eq!(chat().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    stack.wait_usage_rows(4).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    settled(&stack, &standing_url, cents(6)).await;

    // The trail: every adjustment listed and audited.
    let list = get(&stack, &format!("{api}/keys/{key_id}/budget/adjustments")).await;
    assert_eq!(list["total"], 4);
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = 'budget.adjust' AND target_id = $1")
            .bind(&key_id)
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!(audited, 4);
}
