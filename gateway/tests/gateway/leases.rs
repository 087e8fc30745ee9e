//! Quota leases across replicas: replicas that admit from slices of a scope's limits still never
//! admit more than the limit, give a dead replica's slice back when it expires, and never
//! overspend a budget that runs out while slices are out.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

/// Sends `rps` requests a second to `base` for `secs` seconds, each without waiting for the
/// last, answered by the mock after `ttfb_ms`; returns every answer's status.
async fn paced(
    stack: &Stack,
    base: &str,
    key: &str,
    body: Value,
    rps: u64,
    secs: f64,
    ttfb_ms: u64,
) -> Vec<StatusCode> {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rps));
    let started = Instant::now();
    let mut sent = Vec::new();
    while started.elapsed().as_secs_f64() < secs {
        tick.tick().await;
        let request = stack.http.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(&body);
        let request = request.header("x-mock-ttfb-ms", ttfb_ms.to_string());
        sent.push(tokio::spawn(async move { request.send().await.map(|r| r.status()) }));
    }
    let mut statuses = Vec::new();
    for s in sent {
        statuses.push(s.await.unwrap().expect("the gateway answers"));
    }
    statuses
}

/// Requests admitted from slices (no Redis call), summed over `gateways`.
async fn lease_admissions(stack: &Stack, gateways: &[&Gateway]) -> f64 {
    let mut total = 0.0;
    for g in gateways {
        total += stack.metric_of(g, "tollgate_gateway_lease_admissions_total").await.unwrap_or(0.0);
    }
    total
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn three_leasing_replicas_never_admit_more_than_the_limit_in_any_sliding_minute(db: PgPool) {
    const RPM: usize = 150;
    let mut stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("slide@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": RPM}})).await;
    let (mut r2, mut r3) = (stack.replica(vec![]).await, stack.replica(vec![]).await);
    let body = json!({"model": "m", "messages": user_msg("hi")});
    // 60 requests a second for 68 s against 150 a minute: the window fills within seconds, then
    // slides past its first minute while every replica keeps asking.
    let sends = [&stack.gateway, &r2, &r3].map(|g| paced(&stack, &g.base, &key, body.clone(), 20, 68.0, 0));
    let results = futures::future::join_all(sends).await;
    let statuses: Vec<StatusCode> = results.into_iter().flatten().collect();
    assert!(statuses.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    let admitted = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    stack.wait_usage_rows(admitted as i64).await;
    let mut times: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT created_at FROM usage_logs WHERE key_id = $1 AND status = 200 ORDER BY created_at")
            .bind(uuid::Uuid::parse_str(&key_id).unwrap())
            .fetch_all(&stack.db)
            .await
            .unwrap();
    times.sort();
    assert_eq!(times.len(), admitted);
    // Every minute the limiter counts: rows less than 59 s apart (its windows have 1 s buckets;
    // half a second more covers a row's time being its arrival, a little before its admission).
    let span = chrono::Duration::milliseconds(58_500);
    let busiest = (0..times.len()).map(|i| times[i..].iter().take_while(|t| **t - times[i] < span).count()).max();
    assert_eq!(busiest, Some(RPM), "the busiest minute holds exactly the limit");
    assert!(admitted > RPM, "the window slid: {admitted} admitted in 68 s");
    let leased = lease_admissions(&stack, &[&stack.gateway, &r2, &r3]).await;
    assert!(leased > 0.0, "replicas admitted from their slices");
    // Busy replicas take a moment to drain: done before the test database is dropped.
    for g in [&mut r2, &mut r3, &mut stack.gateway] {
        g.terminate().await;
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_killed_replicas_slice_comes_back_when_it_expires(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("slice@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"max_budget": 100}})).await;
    // Requests in flight at the kill keep their part for the (shortened) reservation lease.
    let mut doomed = stack.replica(vec![("TOLLGATE_RESERVATION_LEASE_SECONDS", "2")]).await;
    let body = json!({"model": "m", "max_tokens": 10, "messages": user_msg("hi")});
    // Busy enough to lease, then killed while its slice is live.
    let statuses = paced(&stack, &doomed.base, &key, body.clone(), 40, 1.5, 0).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert!(stack.metric_of(&doomed, "tollgate_gateway_lease_grants_total").await.unwrap_or(0.0) > 0.0);
    let request = stack.http.post(format!("{}/v1/chat/completions", doomed.base)).bearer_auth(&key).json(&body);
    assert_eq!(request.send().await.unwrap().status(), StatusCode::OK);
    let mut child = doomed.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = Instant::now();
    let reserved = || async {
        let standing = stack.admin(reqwest::Method::GET, &format!("/keys/{key_id}/budget"), Value::Null).await;
        standing["reserved"].as_f64().unwrap()
    };
    assert!(reserved().await > 0.0, "the dead replica's slice still holds budget");
    // A slice lasts 1 s and its unused budget 2 s more; what was in flight, 2 s after the last
    // return.
    while reserved().await > 0.0 {
        assert!(killed_at.elapsed() < Duration::from_secs(5), "the slice never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_budget_that_runs_out_mid_slice_is_not_overspent(db: PgPool) {
    let stack = Stack::start(db).await;
    // $0.01 per completion token: max_tokens 3 reserves $0.03, and the mock uses all 3.
    stack.post_admin("/models", json!({"id": "b", "input_cost_per_token": 0, "output_cost_per_token": 0.01})).await;
    let (key, _, uid) = stack.key_for("midslice@example.com", &["b"]).await;
    stack.wait_model(&key, "b").await;
    stack.patch(&format!("/users/{uid}"), json!({"limits": {"max_budget": 3, "budget_period": "monthly"}})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (r2, r3) = (stack.replica(vec![]).await, stack.replica(vec![]).await);
    let body = json!({"model": "b", "max_tokens": 3, "messages": user_msg("hi")});
    // 150 requests a second, each answered after 300 ms: $3.00 holds 100, gone within the first
    // second while slices are out and their requests still in flight.
    let sends = [&stack.gateway, &r2, &r3].map(|g| paced(&stack, &g.base, &key, body.clone(), 50, 3.0, 300));
    let statuses: Vec<StatusCode> = futures::future::join_all(sends).await.into_iter().flatten().collect();
    let admitted = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(admitted, 100, "$3.00 holds 100 requests of $0.03 ({} sent)", statuses.len());
    stack.wait_usage_rows(admitted as i64).await;
    let spent: Decimal = sqlx::query_scalar("SELECT sum(cost) FROM usage_logs").fetch_one(&stack.db).await.unwrap();
    assert_eq!(spent, Decimal::new(300, 2));
    assert!(lease_admissions(&stack, &[&stack.gateway, &r2, &r3]).await > 0.0, "slices were used");
}
