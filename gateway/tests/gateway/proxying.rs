//! What reaches the upstream and what comes back: bodies byte for byte, headers, streaming
//! without buffering, the usage chunk, metering into usage_logs.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::harness::*;

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn large_prompts_arrive_byte_identical(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, key_id, uid) = stack.ready_key("a@example.com", &["m"]).await;
    // 1 MiB of prompt, with formatting a re-serialiser would change.
    let prompt = "lorem ipsum ".repeat(1024 * 1024 / 12);
    let body = format!("{{ \"model\" : \"m\",\n  \"messages\": [{{\"role\":\"user\",\"content\":\"{prompt}\"}}], \"temperature\": 0.50 }}");
    assert!(body.len() > 1024 * 1024);
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.gateway.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("x-custom", "kept")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    let recorded = stack.recorded().await;
    assert_eq!(recorded.len(), 1);
    let req = &recorded[0];
    assert_eq!(req["body_len"], body.len());
    assert_eq!(req["body_sha256"], hex::encode(Sha256::digest(body.as_bytes())));
    // The upstream credential replaces the client's key; identity headers are added.
    assert_eq!(recorded_header(req, "authorization"), Some("Bearer sk-upstream-credential"));
    assert_eq!(recorded_header(req, "x-tollgate-key-id"), Some(key_id.as_str()));
    assert_eq!(recorded_header(req, "x-tollgate-user-id"), Some(uid.as_str()));
    // Client headers reach the upstream only from an allowlist.
    assert_eq!(recorded_header(req, "x-custom"), None);
    assert!(!req.to_string().contains(&key), "the client's key reached the upstream");

    // A streamed 1 MiB request: identical apart from the injected stream_options.
    let body =
        format!("{{\"model\":\"m\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"{prompt}\"}}]}}");
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.gateway.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.text().await.unwrap();
    let recorded = stack.recorded().await;
    let expected = body.replacen('{', r#"{"stream_options":{"include_usage":true},"#, 1);
    assert_eq!(recorded[1]["body_sha256"], hex::encode(Sha256::digest(expected.as_bytes())));

    // Metered from the upstream's own usage report.
    stack.wait_usage_rows(2).await;
    let (prompt_tokens, completion_tokens): (i64, i64) =
        sqlx::query_as("SELECT prompt_tokens, completion_tokens FROM usage_logs WHERE NOT stream")
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!(prompt_tokens, answer["usage"]["prompt_tokens"].as_i64().unwrap());
    assert_eq!(completion_tokens, answer["usage"]["completion_tokens"].as_i64().unwrap());
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn streams_pass_through_without_buffering(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("a@example.com", &["m"]).await;
    let started = Instant::now();
    let mut resp = stack
        .chat(&key, json!({"model": "m", "stream": true, "messages": user_msg("hi")}))
        .header("x-mock-chunks", "2")
        .header("x-mock-chunk-delay-ms", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let first = resp.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("tok"), "{first:?}");
    assert!(first_at < Duration::from_millis(450), "first chunk after {first_at:?}: buffered");
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
}

async fn stream_events(stack: &Stack, key: &str, include_usage: Option<bool>) -> Vec<Value> {
    let mut body = json!({"model": "m", "stream": true, "messages": user_msg("one two three")});
    if let Some(include) = include_usage {
        body["stream_options"] = json!({"include_usage": include});
    }
    let text = stack.chat(key, body).send().await.unwrap().text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn usage_chunk_is_kept_or_stripped_as_the_client_asked(db: PgPool) {
    let stack = Stack::start(db).await;
    let (key, _, _) = stack.ready_key("a@example.com", &["m"]).await;

    let asked = stream_events(&stack, &key, Some(true)).await;
    let last = asked.last().unwrap();
    assert_eq!(last["usage"], json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}));
    for include in [None, Some(false)] {
        let events = stream_events(&stack, &key, include).await;
        assert_eq!(events.len(), asked.len() - 1, "one event fewer");
        assert!(events.iter().all(|e| e["usage"].is_null()), "usage leaked: {events:?}");
        assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "stop");
    }
    // Each of the three was metered exactly, whatever the client saw.
    stack.wait_usage_rows(3).await;
    let rows: Vec<(i64, i64, rust_decimal::Decimal, Option<String>)> =
        sqlx::query_as("SELECT prompt_tokens, completion_tokens, cost, error_kind FROM usage_logs")
            .fetch_all(&stack.db)
            .await
            .unwrap();
    for row in rows {
        assert_eq!((row.0, row.1), (3, 4));
        assert_eq!(row.2, rust_decimal::Decimal::new(11, 6), "3 x 1 + 4 x 2 micro-USD");
        assert_eq!(row.3, None);
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn models_list_embeddings_and_completions(db: PgPool) {
    let stack = Stack::start(db).await;
    stack.model("m").await;
    stack.model("e").await;
    stack.model("hidden").await;
    let (key, _, _) = stack.key_for("a@example.com", &["m", "e"]).await;
    stack.wait_model(&key, "e").await;
    let models = stack.models(&key).await;
    let mut ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["e", "m"]);
    assert_eq!(models["object"], "list");

    let emb: Value = stack
        .http
        .post(format!("{}/v1/embeddings", stack.gateway.base))
        .bearer_auth(&key)
        .json(&json!({"model": "e", "input": ["a b c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(emb["usage"]["prompt_tokens"], 3);
    let done: Value = stack
        .http
        .post(format!("{}/v1/completions", stack.gateway.base))
        .bearer_auth(&key)
        .json(&json!({"model": "m", "prompt": "x y", "max_tokens": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["usage"]["completion_tokens"], 1);
    stack.wait_usage_rows(2).await;
    let rows: Vec<(String, String, i64, i64)> =
        sqlx::query_as("SELECT endpoint, model_id, prompt_tokens, completion_tokens FROM usage_logs ORDER BY endpoint")
            .fetch_all(&stack.db)
            .await
            .unwrap();
    assert_eq!(rows, vec![("/v1/completions".into(), "m".into(), 2, 1), ("/v1/embeddings".into(), "e".into(), 3, 0)]);
}
