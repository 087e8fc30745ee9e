//! Budget alerts end to end: traffic through two gateway replicas crosses a budget's thresholds,
//! the control API (two scanners and delivery workers on the same database, as two replicas
//! would run) records each crossing once and a webhook receiver in the test gets it once, signed;
//! a receiver that is down at first still gets every event once the retries reach it.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
    Router,
};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;
use tollgate_control_api::{config::ControlApiConfig, state::AppState};
use tollgate_core::{limiter::period_id, limits::BudgetPeriod};

use crate::harness::*;

const SECRET: &str = "whsec-test-secret";

/// What the receiver got: each request's signature header and raw body.
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

async fn receive(State(got): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers.get("x-tollgate-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    got.lock().unwrap().push((signature, body));
    StatusCode::NO_CONTENT
}

/// A webhook receiver on `listener`, answering 204 to every POST.
fn serve_receiver(listener: tokio::net::TcpListener) -> Received {
    let got: Received = Arc::default();
    let app = Router::new().route("/hook", post(receive)).with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    got
}

/// Checks `signature` over `body` as a receiver would (the HMAC recomputed, a recent `t`) and
/// returns the event.
fn verified(signature: &str, body: &[u8]) -> Value {
    let (t, v1) = signature
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("malformed signature {signature:?}"));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&hex::decode(v1).unwrap()).expect("the signature verifies");
    let age = chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap();
    assert!((0..300).contains(&age), "t is {age} s old");
    serde_json::from_slice(body).unwrap()
}

/// The events received so far, each verified.
fn events(got: &Received) -> Vec<Value> {
    got.lock().unwrap().iter().map(|(sig, body)| verified(sig, body)).collect()
}

/// Waits until the receiver holds `n` events (failing if it gets more), then returns them.
async fn wait_events(got: &Received, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let seen = events(got);
        assert!(seen.len() <= n, "more events than expected: {seen:#?}");
        if seen.len() == n {
            return seen;
        }
        assert!(Instant::now() < deadline, "only {} of {n} events: {seen:#?}", seen.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alert_env(url: &str) -> Vec<(&str, &str)> {
    vec![
        ("TOLLGATE_WEBHOOK_URL", url),
        ("TOLLGATE_WEBHOOK_SECRET", SECRET),
        ("TOLLGATE_ALERT_SCAN_INTERVAL_SECONDS", "1"),
        ("TOLLGATE_WEBHOOK_RETRY_BASE_MS", "200"),
    ]
}

/// A second control API replica's scanner and delivery worker on the same database.
fn second_control_api(stack: &Stack, env: &[(&str, &str)]) {
    let mut config = ControlApiConfig { redis_url: stack.redis.clone(), ..Default::default() };
    assert!(control_api_env(&mut config, env));
    let state = AppState::new(&config, stack.db.clone()).unwrap();
    tollgate_control_api::spawn_events(&config, &state);
}

/// `n` chat calls of $0.03 each (3 completion tokens at $0.01), alternating between `bases`;
/// returns how many were admitted.
async fn spend(stack: &Stack, bases: &[&str], key: &str, n: usize) -> usize {
    let body = json!({"model": "b", "max_tokens": 3, "messages": user_msg("hi")});
    let mut admitted = 0;
    for i in 0..n {
        let base = bases[i % bases.len()];
        let resp =
            stack.http.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
        if resp.status() == StatusCode::OK {
            admitted += 1;
        } else {
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        }
    }
    admitted
}

async fn priced_key(stack: &Stack, email: &str) -> (String, String, String) {
    stack.post_admin("/models", json!({"id": "b", "input_cost_per_token": 0, "output_cost_per_token": 0.01})).await;
    let made = stack.key_for(email, &["b"]).await;
    stack.wait_model(&made.0, "b").await;
    made
}

/// A stack whose control API, and a second one on the same database, send alerts to a webhook
/// receiver in the test; and what the receiver gets.
async fn two_scanners_and_a_receiver(db: PgPool) -> (Stack, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = serve_receiver(listener);
    let env = alert_env(&url);
    let stack = Stack::start_with(db, env.clone()).await;
    second_control_api(&stack, &env);
    (stack, got)
}

async fn listed(stack: &Stack, query: &str) -> Value {
    stack.admin(reqwest::Method::GET, &format!("/events{query}"), Value::Null).await
}

fn usd(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn each_threshold_crossing_is_sent_once_across_replicas(db: PgPool) {
    let (stack, got) = two_scanners_and_a_receiver(db).await;
    let (key, key_id, _) = priced_key(&stack, "alerts@example.com").await;
    // $0.30 a month: ten requests of $0.03; 80% after eight.
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"max_budget": 0.3, "budget_period": "monthly"}})).await;
    let r2 = stack.replica(vec![]).await;
    let bases = [stack.gateway.base.as_str(), r2.base.as_str()];

    assert_eq!(spend(&stack, &bases, &key, 7).await, 7);
    stack.wait_usage_rows(7).await;
    // Several scans at 70%: nothing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(events(&got).is_empty(), "an event below every threshold");

    assert_eq!(spend(&stack, &bases, &key, 1).await, 1);
    stack.wait_usage_rows(8).await;
    let first = wait_events(&got, 1, Duration::from_secs(15)).await;
    let e = &first[0];
    assert_eq!(e["type"], "budget.threshold");
    assert_eq!(usd(&e["threshold"]), 0.8);
    assert_eq!((e["scope"].as_str(), e["id"].as_str()), (Some("key"), Some(key_id.as_str())));
    assert_eq!(usd(&e["max_budget"]), 0.3);
    assert!((usd(&e["spent"]) - 0.24).abs() < 1e-9, "{e}");
    assert_eq!(e["period"], period_id(BudgetPeriod::Monthly, chrono::Utc::now()));
    assert!(chrono::DateTime::parse_from_rfc3339(e["occurred_at"].as_str().unwrap()).is_ok());

    // Past 100%: the budget refuses the rest, one more event.
    assert_eq!(spend(&stack, &bases, &key, 4).await, 2);
    stack.wait_usage_rows(10).await;
    let both = wait_events(&got, 2, Duration::from_secs(15)).await;
    assert_eq!(usd(&both[1]["threshold"]), 1.0);
    assert!((usd(&both[1]["spent"]) - 0.3).abs() < 1e-9);
    assert_ne!(both[0]["event_id"], both[1]["event_id"]);
    // Scans go on (two scanners, every second): still exactly these two.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(events(&got).len(), 2);

    let page = listed(&stack, "?type=budget.threshold&status=delivered").await;
    assert_eq!(page["total"], 2, "{page}");
    for row in page["data"].as_array().unwrap() {
        assert_eq!(row["status"], "delivered");
        assert_eq!(row["attempts"], 1);
        assert!(row["delivered_at"].is_string());
        assert!(both.iter().any(|e| e["event_id"] == row["event_id"] && e["threshold"] == row["threshold"]));
    }
    assert_eq!(listed(&stack, "?status=pending").await["total"], 0);
    assert_eq!(listed(&stack, "?type=limit.exceeded").await["total"], 0, "a hard budget is not exceeded");
    let metrics = stack.api_metrics().await;
    // This replica's counters: it recorded and delivered some of the two, its twin the rest.
    assert!(metrics.contains("tollgate_control_api_events_pending 0"), "{metrics}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_soft_budget_passed_sends_one_limit_exceeded(db: PgPool) {
    let (stack, got) = two_scanners_and_a_receiver(db).await;
    let (key, _, uid) = priced_key(&stack, "soft@example.com").await;
    // A user's soft budget of $0.06 a day, with its own single threshold at half of it.
    let limits =
        json!({"max_budget": 0.06, "budget_period": "daily", "enforcement": "soft", "alert_thresholds": [0.5]});
    let user = stack.patch(&format!("/users/{uid}"), json!({"limits": limits})).await;
    assert_eq!(user["limits"]["alert_thresholds"], json!([0.5]), "echoed");
    for bad in [json!([0]), json!([11]), json!([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2]), json!(["0.5"])] {
        let resp = stack
            .http
            .patch(format!("{}/api/v1/users/{uid}", stack.api))
            .bearer_auth(&stack.admin_key)
            .json(&json!({"limits": {"max_budget": 1, "alert_thresholds": bad}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let err: Value = resp.json().await.unwrap();
        assert!(err["error"]["field"].as_str().unwrap().starts_with("limits.alert_thresholds"), "{bad}: {err}");
    }
    let r2 = stack.replica(vec![]).await;
    let bases = [stack.gateway.base.as_str(), r2.base.as_str()];

    assert_eq!(spend(&stack, &bases, &key, 1).await, 1);
    stack.wait_usage_rows(1).await;
    let half = wait_events(&got, 1, Duration::from_secs(15)).await;
    assert_eq!((half[0]["type"].as_str(), usd(&half[0]["threshold"])), (Some("budget.threshold"), 0.5));
    assert_eq!(half[0]["scope"], "user");

    // Soft: admitted past the budget, and one limit.exceeded however far past it goes.
    assert_eq!(spend(&stack, &bases, &key, 5).await, 5);
    stack.wait_usage_rows(6).await;
    let all = wait_events(&got, 2, Duration::from_secs(15)).await;
    let exceeded = &all[1];
    assert_eq!(exceeded["type"], "limit.exceeded");
    assert_eq!((exceeded["scope"].as_str(), exceeded["id"].as_str()), (Some("user"), Some(uid.as_str())));
    assert_eq!(usd(&exceeded["threshold"]), 1.0);
    assert!(usd(&exceeded["spent"]) > 0.06);
    assert_eq!(exceeded["period"], period_id(BudgetPeriod::Daily, chrono::Utc::now()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(events(&got).len(), 2, "no threshold of 0.8 or 1.0: the user's own list replaces them");
    assert_eq!(listed(&stack, "?type=limit.exceeded&scope=user").await["total"], 1);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_receiver_down_at_first_gets_each_event_once_retries_reach_it(db: PgPool) {
    // A port nobody listens on yet: the first attempts are refused.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let env = alert_env(&url);
    let stack = Stack::start_with(db, env.clone()).await;
    let (key, key_id, _) = priced_key(&stack, "retry@example.com").await;
    let limits = json!({"max_budget": 0.06, "budget_period": "weekly", "alert_thresholds": [0.5, 1]});
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": limits})).await;
    assert_eq!(spend(&stack, &[stack.gateway.base.as_str()], &key, 2).await, 2);
    stack.wait_usage_rows(2).await;

    // Both events are recorded, and attempted again and again while nobody answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = listed(&stack, "?status=pending").await;
        let rows = page["data"].as_array().unwrap().clone();
        if rows.len() == 2 && rows.iter().all(|r| r["attempts"].as_i64().unwrap() >= 2) {
            for r in &rows {
                let error = r["last_error"].as_str().unwrap();
                assert!(error.contains("connect"), "{error}");
                assert!(r["next_attempt_at"].is_string());
            }
            break;
        }
        assert!(Instant::now() < deadline, "the failed attempts were not recorded: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let got = serve_receiver(listener);
    let received = wait_events(&got, 2, Duration::from_secs(30)).await;
    let mut thresholds: Vec<f64> = received.iter().map(|e| usd(&e["threshold"])).collect();
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(thresholds, [0.5, 1.0]);
    // The receiver's answer is recorded just after it is received.
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = listed(&stack, "?status=delivered").await;
        if page["total"] == 2 {
            break page;
        }
        assert!(Instant::now() < deadline, "not marked delivered: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for row in page["data"].as_array().unwrap() {
        assert!(row["attempts"].as_i64().unwrap() >= 3, "{row}");
        assert!(row["next_attempt_at"].is_null());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(events(&got).len(), 2, "each delivered once");
}
