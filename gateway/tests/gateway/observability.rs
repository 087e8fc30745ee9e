//! Logs never carry a key; metrics count traffic without per-key labels; health and readiness.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::harness::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn no_key_in_any_log_line_and_metrics_without_key_labels(db: PgPool) {
    let stack = Stack::start_with(db, vec![("RUST_LOG", "trace")]).await;
    let (key, key_id, _) = stack.ready_key("logs@example.com", &["m"]).await;
    let wrong = tollgate_core::keys::generate_key();
    let body = json!({"model": "m", "messages": user_msg("hi")});
    assert_eq!(stack.chat(&key, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    let stream = json!({"model": "m", "stream": true, "messages": user_msg("hi")});
    stack.chat(&key, stream).send().await.unwrap().text().await.unwrap();
    assert_eq!(stack.chat(&wrong, body.clone()).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let resp = stack
        .http
        .post(format!("{}/v1/embeddings", stack.gateway.base))
        .header("x-api-key", &key)
        .json(&json!({"model": "nope", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    stack.post_admin(&format!("/keys/{key_id}/revoke"), json!({})).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(stack.chat(&key, body).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    stack.wait_usage_rows(2).await;

    let logs = stack.gateway.logs();
    assert!(logs.lines().count() > 20, "trace logging produced too little to be a fair check:\n{logs}");
    for secret in
        [key.clone(), wrong.clone(), key[6..].to_string(), wrong[6..].to_string(), "sk-upstream-credential".to_string()]
    {
        let leak = logs.lines().find(|l| l.contains(secret.as_str())).map(|l| l.replace(secret.as_str(), "<SECRET>"));
        assert!(leak.is_none(), "a secret appears in the gateway's logs: {}", leak.unwrap_or_default());
    }

    let metrics =
        stack.http.get(format!("{}/metrics", stack.gateway.admin)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"tollgate_gateway_requests_total{model="m",outcome="success",status="2xx"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tollgate_gateway_rejections_total{reason="invalid_api_key",scope="request"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_gateway_key_cache_hits_total"));
    assert!(metrics.contains("tollgate_gateway_usage_rows_flushed_total 2"), "{metrics}");
    assert!(!metrics.contains(&key_id) && !metrics.contains(&key[6..]), "per-key data in metrics");

    let ready: Value =
        stack.http.get(format!("{}/ready", stack.gateway.admin)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["postgres"], true);
    let health = stack.http.get(format!("{}/health", stack.gateway.admin)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// The gateway's access-log lines (target `tollgate::access`), parsed.
fn access_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tollgate::access")
        .collect()
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn one_access_log_line_per_request_naming_the_key_by_prefix(db: PgPool) {
    let stack = Stack::start(db.clone()).await;
    let (key, key_id, user_id) = stack.ready_key("access@example.com", &["m"]).await;
    let prefix = stack.admin(reqwest::Method::GET, &format!("/keys/{key_id}"), json!(null)).await["key_prefix"]
        .as_str()
        .unwrap()
        .to_string();
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let ok = stack.chat(&key, body.clone()).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let ok_id = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    let stream = json!({"model": "m", "stream": true, "messages": user_msg("hi")});
    let streamed = stack.chat(&key, stream).send().await.unwrap();
    let stream_id = streamed.headers()["x-request-id"].to_str().unwrap().to_string();
    streamed.text().await.unwrap();
    let unknown = stack.chat(&tollgate_core::keys::generate_key(), body.clone()).send().await.unwrap();
    let unknown_id = unknown.headers()["x-request-id"].to_str().unwrap().to_string();
    let upstream_error = stack.chat(&key, body.clone()).header("x-mock-status", "500").send().await.unwrap();
    let upstream_error_id = upstream_error.headers()["x-request-id"].to_str().unwrap().to_string();
    stack.wait_usage_rows(3).await;

    let lines = access_lines(&stack.gateway.logs());
    let line = |id: &str| {
        let of: Vec<&Value> = lines.iter().filter(|l| l["fields"]["request_id"] == id).collect();
        assert_eq!(of.len(), 1, "one line for request {id}: {lines:?}");
        of[0]["fields"].clone()
    };
    let row: (i64, i64, String) = sqlx::query_as(
        "SELECT prompt_tokens::bigint, completion_tokens::bigint, cost::text FROM usage_logs WHERE request_id = $1",
    )
    .bind(&ok_id)
    .fetch_one(&db)
    .await
    .unwrap();
    let l = line(&ok_id);
    assert_eq!(l["key_prefix"], prefix.as_str());
    assert_eq!(l["key_id"], key_id.as_str());
    assert_eq!(l["user_id"], user_id.as_str());
    assert_eq!(l["model"], "m");
    assert_eq!(l["endpoint"], "/v1/chat/completions");
    assert_eq!(l["status"], 200);
    assert_eq!(l["outcome"], "success");
    assert_eq!((l["prompt_tokens"].as_i64(), l["completion_tokens"].as_i64()), (Some(row.0), Some(row.1)));
    assert_eq!(
        rust_decimal::Decimal::from_str_exact(l["cost_usd"].as_str().unwrap()).unwrap().normalize().to_string(),
        rust_decimal::Decimal::from_str_exact(&row.2).unwrap().normalize().to_string()
    );
    assert!(l["latency_ms"].as_f64().unwrap() > 0.0 && l["upstream_ms"].as_f64().is_some(), "{l}");
    assert!(l.get("error_kind").is_none_or(Value::is_null), "{l}");
    assert_eq!(line(&stream_id)["stream"], true);
    let l = line(&unknown_id);
    assert_eq!((l["status"].as_i64(), l["error_kind"].as_str()), (Some(401), Some("invalid_api_key")));
    assert!(l.get("key_prefix").is_none_or(Value::is_null), "{l}");
    let l = line(&upstream_error_id);
    assert_eq!((l["status"].as_i64(), l["error_kind"].as_str()), (Some(500), Some("upstream_status")));
    let chats = lines.iter().filter(|l| l["fields"]["endpoint"] == "/v1/chat/completions").count();
    assert_eq!(chats, 4, "a line per request, and no more: {lines:?}");

    // Sampled to none: errors are still logged. Off: nothing.
    for (env, errors_logged) in
        [(("TOLLGATE_ACCESS_LOG_SAMPLE_RATE", "0"), true), (("TOLLGATE_ACCESS_LOG", "false"), false)]
    {
        let replica = stack.replica(vec![env]).await;
        let chat = |key: String| {
            stack.http.post(format!("{}/v1/chat/completions", replica.base)).bearer_auth(key).json(&body).send()
        };
        assert_eq!(chat(key.clone()).await.unwrap().status(), StatusCode::OK);
        assert_eq!(chat(tollgate_core::keys::generate_key()).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        // The line is written after the answer: give it a moment, then a moment more for any extra.
        let statuses = || {
            let lines = access_lines(&replica.logs());
            let chats = lines.iter().filter(|l| l["fields"]["endpoint"] == "/v1/chat/completions");
            chats.filter_map(|l| l["fields"]["status"].as_i64()).collect::<Vec<_>>()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while errors_logged && statuses().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(statuses(), if errors_logged { vec![401] } else { vec![] }, "{env:?}");
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn metrics_agree_with_the_usage_rows_after_mixed_traffic(db: PgPool) {
    let stack = Stack::start(db.clone()).await;
    // Prices whose per-request cost is a fraction of a micro-USD apart.
    stack
        .post_admin(
            "/models",
            json!({"id": "cheap", "input_cost_per_token": 0.00000015, "output_cost_per_token": 0.0000006}),
        )
        .await;
    stack.model("m").await;
    let (key, _, _) = stack.key_for("mixed@example.com", &["cheap", "m"]).await;
    stack.wait_model(&key, "cheap").await;
    stack.wait_model(&key, "m").await;
    let mut sent = 0;
    for model in ["cheap", "m"] {
        let plain = json!({"model": model, "messages": user_msg("hello there")});
        let stream = json!({"model": model, "stream": true, "messages": user_msg("a longer prompt, streamed")});
        for (body, header) in [
            (plain.clone(), None),
            (plain.clone(), None),
            (stream.clone(), None),
            (stream.clone(), Some(("x-mock-chunks", "7"))),
            (plain.clone(), Some(("x-mock-no-usage", "1"))),
            (stream.clone(), Some(("x-mock-no-usage", "1"))),
            (plain.clone(), Some(("x-mock-status", "500"))),
        ] {
            let mut req = stack.chat(&key, body);
            if let Some((name, value)) = header {
                req = req.header(name, value);
            }
            req.send().await.unwrap().text().await.unwrap();
            sent += 1;
        }
    }
    stack.wait_usage_rows(sent).await;
    for model in ["cheap", "m"] {
        let (prompt, completion, cost): (i64, i64, rust_decimal::Decimal) = sqlx::query_as(
            "SELECT sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, sum(cost) FROM usage_logs WHERE model_id = $1",
        )
        .bind(model)
        .fetch_one(&db)
        .await
        .unwrap();
        let cost: f64 = rust_decimal::prelude::ToPrimitive::to_f64(&cost).unwrap();
        assert!(cost > 0.0);
        let spend = stack.metric(&format!(r#"tollgate_gateway_spend_usd_total{{model="{model}"}}"#)).await.unwrap();
        assert!((spend - cost).abs() < 1e-12, "{model}: metrics say ${spend}, usage rows ${cost}");
        for (name, sum) in [("prompt_tokens", prompt), ("completion_tokens", completion)] {
            let series = format!(r#"tollgate_gateway_{name}_total{{model="{model}"}}"#);
            assert_eq!(stack.metric(&series).await, Some(sum as f64), "{series}");
        }
    }
}
