//! The mock upstream over real HTTP: formats, deterministic usage, per-request behaviour, records.

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_bench::mock::{self, MockConfig};

async fn start() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mock::serve(listener, MockConfig::default()));
    format!("http://{addr}")
}

fn events(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn chat_json_has_deterministic_usage() {
    let base = start().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 2});
    let resp: Value = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
    assert_eq!(resp["choices"][0]["message"]["content"], "tok tok ");
    assert_eq!(resp["model"], "m");
}

#[tokio::test]
async fn stream_sends_usage_chunk_only_when_asked() {
    let base = start().await;
    let http = reqwest::Client::new();
    let req = |include: bool| {
        let mut body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "a b"}]});
        if include {
            body["stream_options"] = json!({"include_usage": true});
        }
        http.post(format!("{base}/v1/chat/completions")).json(&body).send()
    };
    let without = events(&req(false).await.unwrap().text().await.unwrap());
    assert_eq!(without.len(), 4 + 1 + 1);
    assert_eq!(without.last().unwrap(), "[DONE]");
    assert!(without.iter().all(|e| !e.contains("\"usage\"")));
    let with = events(&req(true).await.unwrap().text().await.unwrap());
    assert_eq!(with.len(), 4 + 1 + 1 + 1);
    let usage: Value = serde_json::from_str(&with[with.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(usage["usage"]["prompt_tokens"], 2);
}

#[tokio::test]
async fn chunk_delay_error_status_and_drop() {
    let base = start().await;
    let http = reqwest::Client::new();
    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let started = Instant::now();
    let mut resp = http
        .post(format!("{base}/v1/chat/completions"))
        .header("x-mock-chunks", "2")
        .header("x-mock-chunk-delay-ms", "300")
        .json(&body)
        .send()
        .await
        .unwrap();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_millis(250), "first chunk before the delay");
    assert!(String::from_utf8_lossy(&first).contains("tok"));
    while resp.chunk().await.unwrap().is_some() {}
    assert!(started.elapsed() >= Duration::from_millis(600));

    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .header("x-mock-status", "503")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "server_error");

    let mut resp = http
        .post(format!("{base}/v1/chat/completions"))
        .header("x-mock-drop-after", "2")
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut got = 0;
    let outcome = loop {
        match resp.chunk().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(outcome.is_err(), "the stream is cut, not ended");
    assert!(got >= 1);
}

#[tokio::test]
async fn embeddings_models_and_records() {
    let base = start().await;
    let http = reqwest::Client::new();
    let resp: Value = http
        .post(format!("{base}/v1/embeddings"))
        .header("x-trace", "t1")
        .json(&json!({"model": "e", "input": ["a b", "c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["data"].as_array().unwrap().len(), 2);
    assert_eq!(resp["usage"]["prompt_tokens"], 3);
    let models: Value = http.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    let recorded: Value = http.get(format!("{base}/mock/requests")).send().await.unwrap().json().await.unwrap();
    let first = &recorded[0];
    assert_eq!(first["path"], "/v1/embeddings");
    assert!(first["headers"].as_array().unwrap().iter().any(|h| h[0] == "x-trace" && h[1] == "t1"));
    assert_eq!(first["body"], r#"{"input":["a b","c"],"model":"e"}"#);
    assert_eq!(recorded.as_array().unwrap().len(), 2);
    http.delete(format!("{base}/mock/requests")).send().await.unwrap();
    let recorded: Value = http.get(format!("{base}/mock/requests")).send().await.unwrap().json().await.unwrap();
    assert_eq!(recorded, json!([]));
}
