//! Every error the gateway answers itself, in OpenAI's shape with the right status.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn authentication_errors_are_401(db: PgPool) {
    let stack = Stack::start(db).await;
    stack.model("m").await;
    let (key, key_id, _) = stack.key_for("a@example.com", &["m"]).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let gw = &stack.gateway.base;

    let resp = stack.http.post(format!("{gw}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::UNAUTHORIZED, "missing_api_key".into()));
    let unknown = tollgate_core::keys::generate_key();
    assert_eq!(
        error_of(stack.chat(&unknown, body.clone()).send().await.unwrap()).await,
        (StatusCode::UNAUTHORIZED, "invalid_api_key".into())
    );
    assert_eq!(
        error_of(stack.chat("not-even-a-key", body.clone()).send().await.unwrap()).await.0,
        StatusCode::UNAUTHORIZED
    );

    // The key works in each header form.
    stack.wait_model(&key, "m").await;
    for header in ["api-key", "x-api-key"] {
        let resp =
            stack.http.post(format!("{gw}/v1/chat/completions")).header(header, &key).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{header}");
    }

    // Revoked through the control API: the next request fails.
    stack.post_admin(&format!("/keys/{key_id}/revoke"), json!({})).await;
    let mut status = StatusCode::OK;
    for _ in 0..50 {
        status = stack.chat(&key, body.clone()).send().await.unwrap().status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked key still accepted");
    assert_eq!(error_of(stack.chat(&key, body.clone()).send().await.unwrap()).await.1, "revoked_api_key");

    // Expired.
    let (key2, key2_id, _) = stack.key_for("b@example.com", &["m"]).await;
    assert_eq!(stack.chat(&key2, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1::uuid")
        .bind(&key2_id)
        .execute(&stack.db)
        .await
        .unwrap();
    stack.admin(reqwest::Method::PATCH, &format!("/keys/{key2_id}"), json!({"name": "expired"})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        error_of(stack.chat(&key2, body.clone()).send().await.unwrap()).await,
        (StatusCode::UNAUTHORIZED, "expired_api_key".into())
    );
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn authorization_errors_are_403(db: PgPool) {
    let stack = Stack::start(db).await;
    stack.model("mine").await;
    stack.model("other").await;
    let (key, _, uid) = stack.key_for("a@example.com", &["mine"]).await;
    stack.wait_model(&key, "mine").await;
    let chat = |model: &str| stack.chat(&key, json!({"model": model, "messages": user_msg("hi")})).send();
    assert_eq!(error_of(chat("other").await.unwrap()).await, (StatusCode::FORBIDDEN, "model_not_allowed".into()));
    // A model the catalogue does not know is OpenAI's 404 model_not_found, naming the model.
    let resp = chat("does-not-exist").await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("`does-not-exist` does not exist"), "{v}");

    // A key for all the user's subscriptions, and a subscription suspended after the fact.
    let all = stack.post_admin("/keys", json!({"user_id": uid, "name": "all"})).await;
    let all_key = all["key"].as_str().unwrap();
    let resp = stack.chat(all_key, json!({"model": "other", "messages": user_msg("hi")})).send().await.unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::FORBIDDEN, "no_active_subscription".into()));
    let subs = stack.admin(reqwest::Method::GET, &format!("/subscriptions?user_id={uid}"), json!(null)).await;
    let sid = subs["data"][0]["id"].as_str().unwrap();
    assert_eq!(chat("mine").await.unwrap().status(), StatusCode::OK);
    stack.post_admin(&format!("/subscriptions/{sid}/suspend"), json!({})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(error_of(chat("mine").await.unwrap()).await, (StatusCode::FORBIDDEN, "no_active_subscription".into()));

    // A disabled model.
    stack.post_admin(&format!("/subscriptions/{sid}/reactivate"), json!({})).await;
    stack.admin(reqwest::Method::PATCH, "/models/mine", json!({"enabled": false})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(error_of(chat("mine").await.unwrap()).await, (StatusCode::FORBIDDEN, "model_not_allowed".into()));
    // None of these reached the upstream, save the one that was allowed.
    assert_eq!(stack.recorded().await.len(), 1);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn bad_requests_are_400_413_and_404(db: PgPool) {
    let stack = Stack::start_with(db, vec![("TOLLGATE_MAX_BODY_BYTES", "200000")]).await;
    let (key, _, _) = stack.ready_key("a@example.com", &["m"]).await;
    let gw = &stack.gateway.base;
    let raw = |body: &'static str, ct: &'static str| {
        stack
            .http
            .post(format!("{gw}/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    assert_eq!(error_of(raw("{not json", "application/json").await.unwrap()).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(raw(r#"{"messages":[]}"#, "application/json").await.unwrap()).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_of(raw(r#"{"model":42,"messages":[]}"#, "application/json").await.unwrap()).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        error_of(raw(r#"{"model":"m"}"#, "text/plain").await.unwrap()).await,
        (StatusCode::BAD_REQUEST, "unsupported_content_type".into())
    );

    // Over the maximum: announced by content-length, or discovered while streaming the body.
    let big = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(300_000));
    let resp = stack
        .http
        .post(format!("{gw}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large".into()));
    let chunks: Vec<Result<String, std::io::Error>> =
        big.as_bytes().chunks(50_000).map(|c| Ok(String::from_utf8(c.to_vec()).unwrap())).collect();
    let resp = stack
        .http
        .post(format!("{gw}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    let resp = stack.http.get(format!("{gw}/v1/nothing")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::NOT_FOUND, "unknown_url".into()));

    // A known path with the wrong method: 405 naming the method it takes, with or without a key.
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/chat/completions", "POST"),
        (reqwest::Method::PUT, "/v1/embeddings", "POST"),
        (reqwest::Method::DELETE, "/v1/completions", "POST"),
        (reqwest::Method::POST, "/v1/models", "GET"),
    ] {
        for auth in [true, false] {
            let mut req = stack.http.request(method.clone(), format!("{gw}{path}"));
            if auth {
                req = req.bearer_auth(&key);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.headers().get("allow").map(|v| v.to_str().unwrap()), Some(allow), "{method} {path}");
            assert_eq!(error_of(resp).await, (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into()));
        }
    }
    assert!(stack.recorded().await.is_empty(), "nothing reached the upstream");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn upstream_unreachable_is_502_and_slow_upstream_is_504(db: PgPool) {
    let stack = Stack::start_with(db.clone(), vec![("TOLLGATE_UPSTREAM_TIMEOUT_SECONDS", "1")]).await;
    let (key, _, _) = stack.ready_key("a@example.com", &["m"]).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let resp = stack.chat(&key, body.clone()).header("x-mock-ttfb-ms", "3000").send().await.unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout".into()));

    // A second gateway whose upstream port has nothing listening.
    let dead = Gateway::start(GatewayOptions {
        database_url: database_url(&db),
        upstream_url: format!("http://127.0.0.1:{}", free_port()),
        env: vec![],
    })
    .await;
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", dead.base))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::BAD_GATEWAY, "upstream_unreachable".into()));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn unknown_key_with_postgres_down_is_503(db: PgPool) {
    let _ = db;
    // A gateway whose database is unreachable from the start.
    let gw = Gateway::start(GatewayOptions {
        database_url: format!("postgres://postgres@127.0.0.1:{}/nothing", free_port()),
        upstream_url: start_mock().await,
        env: vec![("TOLLGATE_MIGRATE_ON_START".into(), "false".into())],
    })
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(tollgate_core::keys::generate_key())
        .json(&json!({"model": "m", "messages": user_msg("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable".into()));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn repeated_failed_authentication_is_429(db: PgPool) {
    let stack = Stack::start_with(db, vec![("TOLLGATE_FAILED_AUTH_PER_MINUTE", "3")]).await;
    let (key, _, _) = stack.ready_key("a@example.com", &["m"]).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let mut codes = Vec::new();
    for _ in 0..5 {
        let resp = stack.chat(&tollgate_core::keys::generate_key(), body.clone()).send().await.unwrap();
        codes.push(error_of(resp).await);
    }
    let statuses: Vec<u16> = codes.iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    assert_eq!(codes[4].1, "too_many_auth_failures");
    // A valid key from the same address still works: only failures are counted.
    assert_eq!(stack.chat(&key, body).send().await.unwrap().status(), StatusCode::OK);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn passthrough_paths_are_proxied_with_auth_and_metering(db: PgPool) {
    let stack = Stack::start_with(db, vec![("TOLLGATE_PASSTHROUGH_PATHS", "/v1/rerank")]).await;
    let (key, key_id, _) = stack.ready_key("a@example.com", &["m"]).await;
    let url = format!("{}/v1/rerank", stack.gateway.base);
    let body = json!({"model": "m", "query": "q", "documents": ["a"]});
    let resp = stack.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "auth applies to pass-through paths");
    // The mock does not serve /v1/rerank: its 404 is passed back and recorded.
    let resp = stack.http.post(&url).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let recorded = stack.recorded().await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0]["path"], "/v1/rerank");
    stack.wait_usage_rows(1).await;
    let (endpoint, status, kid): (String, i16, String) =
        sqlx::query_as("SELECT endpoint, status, key_id::text FROM usage_logs").fetch_one(&stack.db).await.unwrap();
    assert_eq!((endpoint.as_str(), status, kid), ("/v1/rerank", 404, key_id));
    // Moderations is not on this gateway's list.
    let resp = stack
        .http
        .post(format!("{}/v1/moderations", stack.gateway.base))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(stack.recorded().await.len(), 1);
}
