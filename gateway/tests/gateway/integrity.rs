//! Enforcement integrity: what a key holder sends cannot steer the upstream past what the gateway
//! authorized, and what the upstream says about itself does not reach the client. Each test is an
//! attack tried through the gateway against the recording mock upstream.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

/// The one request the mock recorded last.
async fn last_recorded(stack: &Stack) -> Value {
    stack.recorded().await.pop().expect("the upstream saw a request")
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn the_query_string_never_reaches_the_upstream(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("q@example.com", &["cheap"]).await;
    let url = format!("{}/v1/chat/completions?model=expensive&api_base=http://evil", stack.gateway.base);
    let resp = stack
        .http
        .post(url)
        .bearer_auth(&key)
        .json(&json!({"model": "cheap", "messages": user_msg("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = last_recorded(&stack).await;
    assert_eq!(seen["path"], "/v1/chat/completions", "{seen}");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn only_allowlisted_client_headers_reach_the_upstream(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, _) = stack.ready_key("h@example.com", &["m"]).await;
    let resp = stack
        .chat(&key, json!({"model": "m", "messages": user_msg("hi")}))
        .header("x-litellm-api-key", "sk-litellm-master")
        .header("x-litellm-tags", "free")
        .header("litellm-disable-fallbacks", "false")
        .header("x-tollgate-key-id", "forged")
        .header("x-forwarded-for", "10.0.0.1")
        .header("cookie", "session=1")
        .header("openai-organization", "org-other")
        .header("user-agent", "OpenAI/Python 1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = last_recorded(&stack).await;
    let names: Vec<&str> = seen["headers"].as_array().unwrap().iter().map(|h| h[0].as_str().unwrap()).collect();
    for name in &names {
        let allowed = [
            "content-type",
            "accept",
            "user-agent",
            "host",
            "authorization",
            "content-length",
            "x-request-id",
            "x-tollgate-user-id",
            "x-tollgate-team-id",
            "x-tollgate-key-id",
        ];
        assert!(allowed.contains(name), "client header `{name}` reached the upstream: {names:?}");
    }
    assert_eq!(recorded_header(&seen, "authorization"), Some("Bearer sk-upstream-credential"));
    assert_eq!(recorded_header(&seen, "x-tollgate-key-id"), Some(key_id.as_str()));
    assert_eq!(recorded_header(&seen, "user-agent"), Some("OpenAI/Python 1.0"));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn upstream_response_headers_do_not_reach_the_client(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("r@example.com", &["m"]).await;
    for stream in [false, true] {
        let resp =
            stack.chat(&key, json!({"model": "m", "messages": user_msg("hi"), "stream": stream})).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        for (name, _) in resp.headers() {
            let name = name.as_str();
            assert!(
                !name.starts_with("x-litellm-")
                    && !name.starts_with("llm_provider-")
                    && !name.starts_with("x-ratelimit-"),
                "upstream header `{name}` reached the client (stream: {stream})"
            );
        }
        assert!(resp.headers().contains_key("x-request-id"));
        let _ = resp.bytes().await.unwrap();
    }
    // Where a Tollgate scope applies, its own x-ratelimit-* are the ones the client sees.
    let user = stack.post_admin("/users", json!({"email": "r2@example.com", "name": "t"})).await;
    let uid = user["id"].as_str().unwrap();
    stack.post_admin("/subscriptions", json!({"user_id": uid, "model_id": "m"})).await;
    let limited =
        stack.post_admin("/keys", json!({"user_id": uid, "name": "k", "models": ["m"], "limits": {"rpm": 7}})).await;
    let limited = limited["key"].as_str().unwrap();
    let resp = stack.chat(limited, json!({"model": "m", "messages": user_msg("hi")})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "7");
    assert!(!resp.headers().contains_key("x-ratelimit-limit-tokens"), "the upstream's token limit leaked");
}

/// A user subscribed to `model` and a key with `limits`: `(key, key id)`.
async fn limited_key(stack: &Stack, email: &str, model: &str, limits: Value) -> (String, String) {
    let user = stack.post_admin("/users", json!({"email": email, "name": "t"})).await;
    let uid = user["id"].as_str().unwrap();
    stack.post_admin("/subscriptions", json!({"user_id": uid, "model_id": model})).await;
    let key =
        stack.post_admin("/keys", json!({"user_id": uid, "name": "k", "models": [model], "limits": limits})).await;
    (key["key"].as_str().unwrap().to_string(), key["id"].as_str().unwrap().to_string())
}

/// The settled spend Redis holds for a key's monthly budget, in nano-USD.
async fn redis_month_spend(stack: &Stack, key_id: &str) -> i64 {
    let client = redis::Client::open(stack.redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let month = chrono::Utc::now().format("%Y%m");
    let v: Option<i64> =
        redis::cmd("GET").arg(format!("tg:{{key:{key_id}}}:nb:m{month}")).query_async(&mut conn).await.unwrap();
    v.unwrap_or(0)
}

async fn logged_cost_nanos(stack: &Stack) -> i64 {
    let cost: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT coalesce(sum(cost), 0) FROM usage_logs").fetch_one(&stack.db).await.unwrap();
    (cost * rust_decimal::Decimal::from(1_000_000_000)).try_into().unwrap()
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_client_that_leaves_before_the_answer_is_still_billed(db: PgPool) {
    let stack = Stack::start(db).await;
    stack.model("m").await;
    let (key, key_id) =
        limited_key(&stack, "leave@example.com", "m", json!({"max_budget": 1, "budget_period": "monthly"})).await;
    stack.wait_model(&key, "m").await;
    let impatient = reqwest::Client::builder().timeout(std::time::Duration::from_millis(300)).build().unwrap();
    let sent = impatient
        .post(format!("{}/v1/chat/completions", stack.gateway.base))
        .bearer_auth(&key)
        .header("x-mock-ttfb-ms", "1500")
        .json(&json!({"model": "m", "messages": user_msg("hi"), "max_tokens": 10}))
        .send()
        .await;
    assert!(sent.is_err(), "the client should have timed out");
    stack.wait_usage_rows(1).await;
    let (completion, cost, kind): (i64, rust_decimal::Decimal, Option<String>) =
        sqlx::query_as("SELECT completion_tokens, cost, error_kind FROM usage_logs")
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!(completion, 10, "billed its ceiling ({kind:?})");
    assert!(cost > rust_decimal::Decimal::ZERO);
    // The budget was charged the same, not given back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while redis_month_spend(&stack, &key_id).await != logged_cost_nanos(&stack).await {
        assert!(std::time::Instant::now() < deadline, "the budget never saw the early leaver's cost");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn an_answer_without_usage_is_billed_from_an_estimate(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("nousage@example.com", &["m"]).await;
    for stream in [false, true] {
        let resp = stack
            .chat(&key, json!({"model": "m", "messages": user_msg("hello there"), "stream": stream}))
            .header("x-mock-no-usage", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = resp.bytes().await.unwrap();
    }
    stack.wait_usage_rows(2).await;
    let rows: Vec<(bool, i64, i64, rust_decimal::Decimal, Option<String>)> =
        sqlx::query_as("SELECT stream, prompt_tokens, completion_tokens, cost, error_kind FROM usage_logs")
            .fetch_all(&stack.db)
            .await
            .unwrap();
    for (stream, prompt, completion, cost, kind) in rows {
        assert!(prompt > 0 && completion > 0, "stream {stream}: {prompt}+{completion}");
        assert!(cost > rust_decimal::Decimal::ZERO, "stream {stream} billed $0");
        assert_eq!(kind.as_deref(), Some("usage_missing"));
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_cheap_models_budget_adds_up_exactly(db: PgPool) {
    let stack = Stack::start(db).await;
    // 0.01 USD per million prompt tokens, 0.02 per million completion tokens: each request
    // here costs 90 nano-USD, which whole micro-USD would round to nothing.
    stack
        .post_admin(
            "/models",
            json!({"id": "cheap", "input_cost_per_token": 0.00000001, "output_cost_per_token": 0.00000002}),
        )
        .await;
    let (key, key_id) =
        limited_key(&stack, "cheap@example.com", "cheap", json!({"max_budget": 1, "budget_period": "monthly"})).await;
    stack.wait_model(&key, "cheap").await;
    const REQUESTS: usize = 10_000;
    let body = json!({"model": "cheap", "messages": user_msg("hi")});
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (http, url, key, body, sent) = (
            stack.http.clone(),
            format!("{}/v1/chat/completions", stack.gateway.base),
            key.clone(),
            body.clone(),
            sent.clone(),
        );
        workers.push(tokio::spawn(async move {
            while sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REQUESTS {
                let resp = http.post(&url).bearer_auth(&key).json(&body).send().await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                let _ = resp.bytes().await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stack.wait_usage_rows(REQUESTS as i64).await;
    let logged = logged_cost_nanos(&stack).await;
    assert_eq!(logged, 90 * REQUESTS as i64, "each request costs 1 x 10 + 4 x 20 nano-USD");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let in_redis = redis_month_spend(&stack, &key_id).await;
        if in_redis == logged {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Redis budget {in_redis} nano-USD, PostgreSQL {logged}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A counter or gauge of the gateway, by its name without the `tollgate_gateway_` prefix.
async fn metric(stack: &Stack, name: &str) -> f64 {
    stack.metric(&format!("tollgate_gateway_{name}")).await.unwrap_or_else(|| panic!("no metric {name}"))
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_flood_of_unknown_keys_costs_bounded_lookups_and_memory(db: PgPool) {
    let stack = Stack::start_with(
        db,
        vec![("TOLLGATE_FAILED_AUTH_PER_MINUTE", "50"), ("TOLLGATE_KEY_CACHE_MAX_ENTRIES", "1000")],
    )
    .await;
    let (good, _, _) = stack.ready_key("flood@example.com", &["m"]).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (http, url, body, sent) =
            (stack.http.clone(), format!("{}/v1/chat/completions", stack.gateway.base), body.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 10_000 {
                let key = tollgate_core::keys::generate_key();
                let resp = http.post(&url).bearer_auth(&key).json(&body).send().await.unwrap();
                statuses.push(resp.status().as_u16());
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.unwrap());
    }
    assert_eq!(statuses.len(), 10_000);
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{:?}",
        statuses.iter().find(|s| **s != 401 && **s != 429)
    );
    assert!(statuses.iter().filter(|s| **s == 429).count() >= 9_900, "the throttle held");
    let lookups = metric(&stack, "key_cache_misses_total").await;
    assert!(lookups <= 60.0, "{lookups} PostgreSQL lookups for 10,000 unknown keys");
    assert!(metric(&stack, "key_cache_entries").await <= 1000.0);
    assert_eq!(metric(&stack, "auth_throttle_addresses").await, 1.0);
    // The key that was cached before the flood still works from the flooded address.
    assert_eq!(stack.chat(&good, body).send().await.unwrap().status(), StatusCode::OK);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn forwarded_for_counts_only_behind_a_trusted_proxy(db: PgPool) {
    let body = json!({"model": "m", "messages": user_msg("hi")});
    // Untrusted: a client cannot escape the throttle by naming other addresses.
    let stack = Stack::start_with(db, vec![("TOLLGATE_FAILED_AUTH_PER_MINUTE", "2")]).await;
    let mut codes = Vec::new();
    for i in 0..4 {
        let resp = stack
            .chat(&tollgate_core::keys::generate_key(), body.clone())
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .await
            .unwrap();
        codes.push(resp.status().as_u16());
    }
    assert_eq!(codes, [401, 401, 429, 429]);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn behind_a_trusted_proxy_each_client_has_its_own_allowance(db: PgPool) {
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let stack = Stack::start_with(
        db,
        vec![("TOLLGATE_FAILED_AUTH_PER_MINUTE", "2"), ("TOLLGATE_TRUSTED_PROXIES", "127.0.0.0/8,::1")],
    )
    .await;
    let send = |client: &'static str| {
        stack.chat(&tollgate_core::keys::generate_key(), body.clone()).header("x-forwarded-for", client).send()
    };
    let mut codes = Vec::new();
    for client in ["198.51.100.1", "198.51.100.1", "198.51.100.1", "198.51.100.2"] {
        codes.push(send(client).await.unwrap().status().as_u16());
    }
    assert_eq!(codes, [401, 401, 429, 401], "the second client is not throttled for the first");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn every_denied_body_field_is_refused_before_the_upstream(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("fields@example.com", &["m"]).await;
    for field in tollgate_gateway::config::DENIED_BODY_FIELDS {
        let name = field.replace('*', "x");
        let mut body = json!({"model": "m", "messages": user_msg("hi")});
        match name.strip_prefix("metadata.") {
            Some(inner) => body["metadata"] = json!({ inner: "x" }),
            None => body[name.as_str()] = json!(["expensive-model"]),
        }
        let resp = stack.chat(&key, body).send().await.unwrap();
        let (status, code) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "invalid_request"), "{name}");
    }
    // Hiding a field behind an escape or a repeat does not help.
    let smuggled = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"fallb\u0061cks":["x"]}"#;
    let repeated = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"model":"expensive"}"#;
    for body in [smuggled, repeated] {
        let resp = stack
            .http
            .post(format!("{}/v1/chat/completions", stack.gateway.base))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    assert!(stack.recorded().await.is_empty(), "a refused body reached the upstream");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn every_stream_carries_exactly_one_request_for_usage(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("so@example.com", &["m"]).await;
    let variants =
        [json!(null), json!(false), json!({}), json!({"include_usage": false}), json!({"include_usage": null})];
    for (i, options) in variants.iter().enumerate() {
        let resp = stack
            .chat(&key, json!({"model": "m", "messages": user_msg("hi"), "stream": true, "stream_options": options}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{options}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains("\"usage\":{"), "the client did not ask for usage: {text}");
        let seen = last_recorded(&stack).await;
        let sent = seen["body"].as_str().unwrap();
        assert_eq!(sent.matches("stream_options").count(), 1, "{sent}");
        let v: Value = serde_json::from_str(sent).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true, "{sent}");
        stack.wait_usage_rows(i as i64 + 1).await;
    }
    let estimated: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_logs WHERE error_kind IS NOT NULL")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(estimated, 0, "every stream was billed from the upstream's own usage");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn the_upstream_is_asked_for_the_models_upstream_name(db: PgPool) {
    let stack = Stack::start(db).await;
    stack
        .post_admin(
            "/models",
            json!({"id": "house-model", "upstream_model": "provider/real-model-2024", "input_cost_per_token": 0.000001,
                   "output_cost_per_token": 0.000002}),
        )
        .await;
    let (key, _, _) = stack.key_for("up@example.com", &["house-model"]).await;
    stack.wait_model(&key, "house-model").await;
    let resp = stack.chat(&key, json!({"model": "house-model", "messages": user_msg("hi")})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = last_recorded(&stack).await;
    let v: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(v["model"], "provider/real-model-2024");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn reservations_bound_every_choice_against_a_budget_that_fits_one_honest_request(db: PgPool) {
    let stack = Stack::start(db).await;
    stack.model("m").await;
    let honest = json!({"model": "m", "messages": user_msg("hi"), "max_tokens": 10});
    let prompt = tollgate_gateway::request::estimate_tokens(serde_json::to_vec(&honest).unwrap().len());
    // 1 micro-USD per prompt token, 2 per completion token: the honest request may cost this much.
    let budget = rust_decimal::Decimal::new((prompt + 2 * 10) as i64, 6);
    let (key, _) =
        limited_key(&stack, "n@example.com", "m", json!({"max_budget": budget, "budget_period": "monthly"})).await;
    stack.wait_model(&key, "m").await;
    let mut asks = Vec::new();
    for (extra, what) in [
        (json!({"n": 2}), "two choices"),
        (json!({"best_of": 3}), "best_of"),
        (json!({"max_completion_tokens": 10, "max_tokens": 1000}), "a larger max_tokens beside max_completion_tokens"),
        (json!({"max_tokens": null}), "no max tokens"),
    ] {
        let mut body = honest.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        if body["max_tokens"].is_null() {
            body.as_object_mut().unwrap().remove("max_tokens");
        }
        let resp = stack.chat(&key, body).send().await.unwrap();
        asks.push((what, error_of(resp).await));
    }
    for (what, (status, code)) in asks {
        assert_eq!((status, code.as_str()), (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota"), "{what}");
    }
    let resp = stack.chat(&key, honest).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the honest request fits exactly");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn many_concurrent_first_uses_of_a_valid_key_are_not_throttled(db: PgPool) {
    let stack = Stack::start_with(db, vec![("TOLLGATE_FAILED_AUTH_PER_MINUTE", "2")]).await;
    stack.model("m").await;
    // Not cached yet: every request below misses the cache at once.
    let (key, _, _) = stack.key_for("cold@example.com", &["m"]).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let sends: Vec<_> = (0..40).map(|_| stack.chat(&key, body.clone()).send()).collect();
    let statuses: Vec<u16> =
        futures::future::join_all(sends).await.into_iter().map(|r| r.unwrap().status().as_u16()).collect();
    assert!(statuses.iter().all(|s| *s != 429), "a valid key was throttled: {statuses:?}");
    assert!(metric(&stack, "key_cache_misses_total").await <= 2.0, "concurrent misses share one lookup");
}
