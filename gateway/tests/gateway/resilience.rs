//! Limits through a Redis outage, and on a Redis Cluster.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

/// Sends `n` requests one after another, round-robin over `bases`: `(admitted, slowest)`.
async fn send(stack: &Stack, bases: &[&str], key: &str, n: usize) -> (usize, Duration) {
    let body = json!({"model": "b", "max_tokens": 3, "messages": user_msg("hi")});
    let (mut admitted, mut slowest) = (0, Duration::ZERO);
    for i in 0..n {
        let started = Instant::now();
        let resp = stack
            .http
            .post(format!("{}/v1/chat/completions", bases[i % bases.len()]))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        match resp.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
        }
    }
    (admitted, slowest)
}

async fn priced_key(stack: &Stack, email: &str) -> (String, String, String) {
    // $0.01 per completion token, max_tokens 3: at most $0.03 a request.
    stack.post_admin("/models", json!({"id": "b", "input_cost_per_token": 0, "output_cost_per_token": 0.01})).await;
    let (key, key_id, uid) = stack.key_for(email, &["b"]).await;
    stack.wait_model(&key, "b").await;
    (key, key_id, uid)
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn limits_hold_through_a_redis_outage_and_budgets_are_reseeded(db: PgPool) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let stack = Stack::start_with(db, vec![("TOLLGATE_REDIS_URL", &url), ("TOLLGATE_REDIS_TIMEOUT_MS", "100")]).await;
    let (key, key_id, uid) = priced_key(&stack, "outage@example.com").await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 30}})).await;
    stack.patch(&format!("/users/{uid}"), json!({"limits": {"max_budget": 1.0, "budget_period": "monthly"}})).await;
    let timeout = vec![("TOLLGATE_REDIS_TIMEOUT_MS", "100")];
    let (r2, r3) = (stack.replica(timeout.clone()).await, stack.replica(timeout).await);
    let bases = [stack.gateway.base.as_str(), r2.base.as_str(), r3.base.as_str()];
    // Let every replica's heartbeat register (one a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (before, _) = send(&stack, &bases, &key, 10).await;
    assert_eq!(before, 10);

    let mut redis = redis;
    redis.kill();
    let (during, slowest) = send(&stack, &bases, &key, 60).await;
    assert!(slowest < Duration::from_millis(500), "a request waited {slowest:?} on a dead Redis");
    // Each of the 3 replicas may admit a third of the 20 requests left in the window: 6.
    assert!(during <= 20, "admitted {during} during the outage");
    assert!(during >= 12, "the fallback admitted only {during}");

    // Redis comes back empty: budgets are re-seeded from PostgreSQL, not started from zero.
    let redis = redis.restart().await;
    stack.wait_usage_rows((before + during) as i64).await;
    let spent: Decimal = sqlx::query_scalar("SELECT sum(cost) FROM usage_daily").fetch_one(&stack.db).await.unwrap();
    assert_eq!(spent, Decimal::new(3, 2) * Decimal::from(before + during));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The RPM window outlived Redis's restart: the replicas brought it back to what Redis had
    // counted, so this minute's limit is not handed out a second time.
    let (again, _) = send(&stack, &bases, &key, 10).await;
    assert!(before + during + again <= 30, "{} admitted in one minute under an RPM of 30", before + during + again);
    // The budget is the user's: another key of theirs, without an RPM, meets it alone.
    let other = stack.post_admin("/keys", json!({"user_id": uid, "name": "no-rpm", "models": ["b"]})).await;
    let other_key = other["key"].as_str().unwrap();
    let (after, _) = send(&stack, &bases[..1], other_key, 30).await;
    let after = after + again;
    let left = Decimal::ONE - spent;
    let fits = (left / Decimal::new(3, 2)).floor();
    assert_eq!(Decimal::from(after), fits, "after the restart only what is left of the budget is admitted");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let month = chrono::Utc::now().format("%Y%m");
    let seeded: i64 =
        redis::cmd("GET").arg(format!("tg:{{user:{uid}}}:nb:m{month}")).query_async(&mut conn).await.unwrap();
    assert_eq!(
        seeded,
        30_000_000 * (before + during + after) as i64,
        "spend (nano-USD) seeded from PostgreSQL plus what followed"
    );
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn fail_closed_answers_503_without_redis(db: PgPool) {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let stack = Stack::start_with(
        db,
        vec![("TOLLGATE_REDIS_URL", &url), ("TOLLGATE_FAIL_CLOSED", "true"), ("TOLLGATE_REDIS_TIMEOUT_MS", "100")],
    )
    .await;
    let (key, key_id, _) = priced_key(&stack, "closed@example.com").await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 100}})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = json!({"model": "b", "messages": user_msg("hi")});
    assert_eq!(stack.chat(&key, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    redis.kill();
    let started = Instant::now();
    let resp = stack.chat(&key, body).send().await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(error_of(resp).await, (StatusCode::SERVICE_UNAVAILABLE, "limits_unavailable".into()));
    let metrics =
        stack.http.get(format!("{}/metrics", stack.gateway.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_gateway_limiter_fallback_active 1"), "{metrics}");
    assert!(
        metrics.contains("tollgate_gateway_redis_errors_total 1"),
        "one failed call, then Redis is skipped: {metrics}"
    );
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn rpm_and_budgets_hold_on_a_redis_cluster(db: PgPool) {
    let cluster = RedisCluster::start().await;
    let url = cluster.url();
    let stack = Stack::start_with(db, vec![("TOLLGATE_REDIS_URL", &url)]).await;
    let (key, key_id, uid) = priced_key(&stack, "cluster@example.com").await;
    // Four scopes on (most likely) different nodes, one request reserving in all of them.
    let sub: Value = stack.admin(reqwest::Method::GET, &format!("/subscriptions?user_id={uid}"), json!(null)).await;
    let sid = sub["data"][0]["id"].as_str().unwrap().to_string();
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 40}})).await;
    stack.patch(&format!("/users/{uid}"), json!({"limits": {"max_budget": 0.9}})).await;
    stack.patch(&format!("/subscriptions/{sid}"), json!({"limits": {"tpm": 1000000}})).await;
    stack.patch(&format!("/teams/{}", tollgate_core::DEFAULT_TEAM_ID), json!({"limits": {"rpm": 1000}})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (r2, r3) = (stack.replica(vec![]).await, stack.replica(vec![]).await);
    let bases = [stack.gateway.base.as_str(), r2.base.as_str(), r3.base.as_str()];
    // The budget ($0.90 = 30 requests) binds before the RPM (40).
    let (admitted, _) = send(&stack, &bases, &key, 45).await;
    let metrics =
        stack.http.get(format!("{}/metrics", stack.gateway.admin)).send().await.unwrap().text().await.unwrap();
    let logs = stack.gateway.logs();
    let warnings: Vec<&str> =
        metrics.lines().chain(logs.lines()).filter(|l| l.contains("fallback_active") || l.contains("WARN")).collect();
    assert_eq!(admitted, 30, "{warnings:#?}");
    // And the RPM binds for a key without a budget.
    let (key2, key2_id, _) = stack.key_for("cluster2@example.com", &["b"]).await;
    stack.patch(&format!("/keys/{key2_id}"), json!({"limits": {"rpm": 12}})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (admitted, _) = send(&stack, &bases, &key2, 20).await;
    assert_eq!(admitted, 12);
    let logs = stack.gateway.logs() + &r2.logs() + &r3.logs();
    assert!(!logs.contains("CROSSSLOT"), "cross-slot errors in the logs");
}
