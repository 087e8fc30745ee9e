//! Limits and budgets held exactly across gateway replicas (separate processes sharing Redis).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

/// Sends `n` requests round-robin over `bases` with `concurrency` in flight; returns each status.
async fn blast(
    stack: &Stack,
    bases: &[String],
    key: &str,
    n: usize,
    concurrency: usize,
    body: Value,
    slow_ms: u64,
) -> Vec<(StatusCode, reqwest::header::HeaderMap, String)> {
    let bases = Arc::new(bases.to_vec());
    stream::iter(0..n)
        .map(|i| {
            let (http, bases, key, body) = (stack.http.clone(), bases.clone(), key.to_string(), body.clone());
            async move {
                let resp = http
                    .post(format!("{}/v1/chat/completions", bases[i % bases.len()]))
                    .bearer_auth(&key)
                    .header("x-mock-ttfb-ms", slow_ms.to_string())
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let (status, headers) = (resp.status(), resp.headers().clone());
                (status, headers, resp.text().await.unwrap_or_default())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn rpm_holds_exactly_across_three_replicas(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("rpm@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 100}})).await;
    let (r2, r3) = (stack.replica(vec![]).await, stack.replica(vec![]).await);
    let bases = [stack.gateway.base.clone(), r2.base.clone(), r3.base.clone()];
    let results = blast(&stack, &bases, &key, 500, 64, json!({"model": "m", "messages": user_msg("hi")}), 0).await;
    let admitted = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    assert_eq!(admitted, 100);
    let refused: Vec<_> = results.iter().filter(|r| r.0 != StatusCode::OK).collect();
    assert!(refused.iter().all(|r| r.0 == StatusCode::TOO_MANY_REQUESTS));
    let (_, headers, body) = refused[0];
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(headers["x-ratelimit-limit-requests"], "100");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    // Admitted responses carry the headers too.
    let ok = results.iter().find(|r| r.0 == StatusCode::OK).unwrap();
    assert_eq!(ok.1["x-ratelimit-limit-requests"], "100");
    assert_eq!(stack.recorded().await.len(), 100, "refusals never reach the upstream");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn tpm_reservations_never_exceed_the_limit_and_settle_to_real_counts(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("tpm@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"tpm": 1000}})).await;
    let r2 = stack.replica(vec![]).await;
    let bases = [stack.gateway.base.clone(), r2.base.clone()];
    // Each reserves its prompt estimate (~20 tokens) + max_tokens 80 = ~100; 30 of them ask 3x the limit.
    let body = json!({"model": "m", "max_tokens": 80, "messages": user_msg("one two")});
    // Slow answers: nothing settles before every request has reserved.
    let results = blast(&stack, &bases, &key, 30, 30, body, 500).await;
    let admitted = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    let reserve_each = 80
        + tollgate_gateway::request::estimate_tokens(
            serde_json::to_vec(&json!({"model": "m", "max_tokens": 80, "messages": user_msg("one two")}))
                .unwrap()
                .len(),
        );
    assert!(admitted as u64 * reserve_each <= 1000, "{admitted} x {reserve_each} > 1000");
    let refused: Vec<_> = results.iter().filter(|r| r.0 != StatusCode::OK).map(|r| (r.0, &r.2)).collect();
    assert_eq!(admitted as u64, 1000 / reserve_each, "as many as fit; the others: {refused:?}");
    // The mock used 2 prompt + 4 completion tokens per request: after settlement the window
    // holds 6 per admitted request, and the headers of the next request show it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp =
        stack.chat(&key, json!({"model": "m", "max_tokens": 1, "messages": user_msg("x")})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let remaining: u64 = resp.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap();
    let this_one = 1 + tollgate_gateway::request::estimate_tokens(
        serde_json::to_vec(&json!({"model": "m", "max_tokens": 1, "messages": user_msg("x")})).unwrap().len(),
    );
    assert_eq!(remaining, 1000 - 6 * admitted as u64 - this_one);
}

async fn budget_case(db: PgPool, stream: bool) {
    let stack = Stack::start(db).await;
    // $0.01 per completion token and nothing for prompts: max_tokens 3 costs at most $0.03.
    stack.post_admin("/models", json!({"id": "b", "input_cost_per_token": 0, "output_cost_per_token": 0.01})).await;
    let (key, _, uid) = stack.key_for("budget@example.com", &["b"]).await;
    stack.wait_model(&key, "b").await;
    stack.patch(&format!("/users/{uid}"), json!({"limits": {"max_budget": 1.0, "budget_period": "monthly"}})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (r2, r3) = (stack.replica(vec![]).await, stack.replica(vec![]).await);
    let bases = [stack.gateway.base.clone(), r2.base.clone(), r3.base.clone()];
    let body = json!({"model": "b", "max_tokens": 3, "stream": stream, "messages": user_msg("hi")});
    let results = blast(&stack, &bases, &key, 200, 200, body, 200).await;
    let admitted = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    assert_eq!(admitted, 33, "$1.00 holds 33 requests of at most $0.03");
    let refused = results.iter().find(|r| r.0 == StatusCode::TOO_MANY_REQUESTS).expect("some refused");
    let err: Value = serde_json::from_str(&refused.2).unwrap();
    assert_eq!(err["error"]["code"], "insufficient_quota");
    stack.wait_usage_rows(admitted as i64).await;
    let spent: Decimal = sqlx::query_scalar("SELECT sum(cost) FROM usage_logs").fetch_one(&stack.db).await.unwrap();
    assert!(spent <= Decimal::ONE, "spent {spent}");
    // Every admitted request used exactly 3 completion tokens (the mock's 4 chunks, capped): $0.03.
    assert_eq!(spent, Decimal::new(3, 2) * Decimal::from(admitted));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn budget_holds_across_replicas(db: PgPool) {
    budget_case(db, false).await;
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn budget_holds_across_replicas_for_streams(db: PgPool) {
    budget_case(db, true).await;
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_killed_replicas_reservation_returns_after_its_lease(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("lease@example.com", &["m"]).await;
    // The budget fits one request's maximum cost ($0.000001 x 5 + $0.000002 x 1000) at a time.
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"max_budget": 0.0025}})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut doomed = stack.replica(vec![("TOLLGATE_RESERVATION_LEASE_SECONDS", "2")]).await;
    let body = json!({"model": "m", "max_tokens": 1000, "stream": true, "messages": user_msg("hi")});
    // A slow stream on the doomed replica holds the reservation; SIGKILL it mid-way.
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", doomed.base))
        .bearer_auth(&key)
        .header("x-mock-chunks", "10")
        .header("x-mock-chunk-delay-ms", "500")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut child = doomed.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = Instant::now();
    let refused = stack.chat(&key, body.clone()).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "the reservation still holds the budget");
    let mut admitted_after = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if stack.chat(&key, body.clone()).send().await.unwrap().status() == StatusCode::OK {
            admitted_after = Some(killed_at.elapsed());
            break;
        }
    }
    let after = admitted_after.expect("the reservation never came back");
    assert!(after >= Duration::from_millis(800), "came back before the lease ran out: {after:?}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn revocation_reaches_every_replica_within_100ms(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("revoke@example.com", &["m"]).await;
    let (r2, r3) = (stack.replica(vec![]).await, stack.replica(vec![]).await);
    let bases = [stack.gateway.base.clone(), r2.base.clone(), r3.base.clone()];
    let body = json!({"model": "m", "messages": user_msg("hi")});
    for base in &bases {
        // Every replica has the key cached.
        let resp =
            stack.http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let revoked_at = Instant::now();
    stack.post_admin(&format!("/keys/{key_id}/revoke"), json!({})).await;
    let answered = revoked_at.elapsed();
    tokio::time::sleep(Duration::from_millis(100).saturating_sub(answered)).await;
    for base in &bases {
        let resp =
            stack.http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{base} still accepts the key 100 ms after revoke");
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn soft_limits_warn_and_monitor_limits_only_count(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, uid) = stack.ready_key("soft@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 1, "enforcement": "soft"}})).await;
    stack.patch(&format!("/users/{uid}"), json!({"limits": {"tpm": 1, "enforcement": "monitor"}})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let first = stack.chat(&key, body.clone()).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("x-tollgate-warning").is_none(), "the key's rpm is not exceeded yet");
    let second = stack.chat(&key, body).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::OK, "soft limits admit");
    let warning = second.headers()["x-tollgate-warning"].to_str().unwrap().to_string();
    assert_eq!(warning, "rpm limit exceeded on key", "monitor limits do not warn the client");
    let metrics =
        stack.http.get(format!("{}/metrics", stack.gateway.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"tollgate_gateway_limit_warnings_total{reason="rpm",scope="key"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"tollgate_gateway_limit_warnings_total{reason="tpm",scope="user"} 2"#), "{metrics}");
}

/// Seconds of an `x-ratelimit-reset-*` value (`"42s"`).
fn reset_secs(headers: &reqwest::header::HeaderMap, name: &str) -> u64 {
    let v = headers[name].to_str().unwrap();
    v.strip_suffix('s').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{name}: {v}"))
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn rate_limit_headers_retry_after_and_message_agree(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("headers@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 3, "tpm": 1000}})).await;
    let body = |max_tokens: u64| json!({"model": "m", "max_tokens": max_tokens, "messages": user_msg("hi")});

    // Admitted: the window's oldest request leaves it a minute after it was made, not in a second.
    for _ in 0..2 {
        let resp = stack.chat(&key, body(10)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!((55..=60).contains(&reset_secs(resp.headers(), "x-ratelimit-reset-requests")), "{:?}", resp.headers());
        assert!((55..=60).contains(&reset_secs(resp.headers(), "x-ratelimit-reset-tokens")), "{:?}", resp.headers());
    }

    // Refused on tokens: the tokens' reset is the retry-after, and the message says the same.
    let resp = stack.chat(&key, body(990)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = resp.headers().clone();
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "{headers:?}");
    assert_eq!(reset_secs(&headers, "x-ratelimit-reset-tokens"), retry);
    assert_eq!(headers["x-ratelimit-limit-tokens"], "1000");
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains(&format!("tpm on this key; retry after {retry}s")), "{v}");

    // Refused on requests: the same for the requests' headers.
    assert_eq!(stack.chat(&key, body(10)).send().await.unwrap().status(), StatusCode::OK);
    let resp = stack.chat(&key, body(10)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = resp.headers().clone();
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "{headers:?}");
    assert_eq!(reset_secs(&headers, "x-ratelimit-reset-requests"), retry);
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(headers["x-ratelimit-limit-requests"], "3");
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains(&format!("rpm on this key; retry after {retry}s")), "{v}");
}
