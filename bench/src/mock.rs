//! An OpenAI-compatible stand-in upstream: chat completions, completions, embeddings and models,
//! as JSON or SSE in OpenAI's chunk format, with deterministic token counts.
//!
//! Token counts: `prompt_tokens` is the number of whitespace-separated words in the prompt (every
//! message's text content, the `prompt`, or the embedding `input`), at least 1; a completion is
//! `chunks` tokens (`"tok "` each), capped by `max_tokens` / `max_completion_tokens`. A usage
//! chunk is sent only when `stream_options.include_usage` is true.
//!
//! Per-request behaviour, by header (defaults from the command line):
//! `x-mock-ttfb-ms` (delay before the response starts), `x-mock-chunks`, `x-mock-chunk-delay-ms`,
//! `x-mock-status` (answer this HTTP error with an OpenAI error body), `x-mock-drop-after`
//! (streams: cut the connection after this many chunks), `x-mock-no-usage: 1` (answer without
//! usage, even when a stream asks for it).
//! Like a LiteLLM proxy, every answer carries `x-litellm-*`, `llm_provider-*` and `x-ratelimit-*`
//! headers of its own.
//! `GET /mock/requests` returns the last requests received (newest last); `DELETE` clears them.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use futures::stream::{self, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// How many requests `GET /mock/requests` remembers.
const REMEMBERED: usize = 256;
/// Bodies up to this size are kept verbatim in the record; larger ones by length and hash only.
const BODY_KEPT: usize = 64 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct MockConfig {
    /// Delay before each response starts, in ms.
    #[arg(long, default_value_t = 0)]
    pub ttfb_ms: u64,
    /// Completion chunks (= completion tokens) per response.
    #[arg(long, default_value_t = 4)]
    pub chunks: u32,
    /// Delay between stream chunks, in ms.
    #[arg(long, default_value_t = 0)]
    pub chunk_delay_ms: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self { ttfb_ms: 0, chunks: 4, chunk_delay_ms: 0 }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    pub body_sha256: String,
    /// The body as text when it is at most 64 KiB of UTF-8.
    pub body: Option<String>,
}

#[derive(Clone)]
struct Mock {
    config: MockConfig,
    requests: Arc<Mutex<VecDeque<RecordedRequest>>>,
}

pub fn router(config: MockConfig) -> Router {
    let mock = Mock { config, requests: Arc::new(Mutex::new(VecDeque::new())) };
    Router::new().route("/mock/requests", get(recorded).delete(clear)).fallback(handle).with_state(mock)
}

pub async fn serve(listener: tokio::net::TcpListener, config: MockConfig) -> std::io::Result<()> {
    axum::serve(listener, router(config)).await
}

async fn recorded(State(mock): State<Mock>) -> Json<Vec<RecordedRequest>> {
    Json(mock.requests.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect())
}

async fn clear(State(mock): State<Mock>) -> StatusCode {
    mock.requests.lock().unwrap_or_else(PoisonError::into_inner).clear();
    StatusCode::NO_CONTENT
}

/// Per-request settings: headers override the command line.
struct Behaviour {
    ttfb: Duration,
    chunks: u32,
    chunk_delay: Duration,
    status: Option<u16>,
    drop_after: Option<u32>,
    /// Answer without any usage (as some upstreams and passthrough endpoints do).
    no_usage: bool,
}

fn behaviour(config: &MockConfig, headers: &HeaderMap) -> Behaviour {
    let num = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    Behaviour {
        ttfb: Duration::from_millis(num("x-mock-ttfb-ms").unwrap_or(config.ttfb_ms)),
        chunks: num("x-mock-chunks").map(|n| n as u32).unwrap_or(config.chunks),
        chunk_delay: Duration::from_millis(num("x-mock-chunk-delay-ms").unwrap_or(config.chunk_delay_ms)),
        status: num("x-mock-status").map(|n| n as u16),
        drop_after: num("x-mock-drop-after").map(|n| n as u32),
        no_usage: num("x-mock-no-usage").is_some_and(|n| n > 0),
    }
}

async fn handle(State(mock): State<Mock>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    record(&mock, &method, &uri, &headers, &body);
    let b = behaviour(&mock.config, &headers);
    if !b.ttfb.is_zero() {
        tokio::time::sleep(b.ttfb).await;
    }
    if let Some(status) = b.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "mock_error", "the mock was asked to fail");
    }
    let path = uri.path();
    let mut response = match (method.as_str(), path) {
        ("GET", "/v1/models") | ("GET", "/models") => models(),
        ("POST", "/v1/chat/completions") | ("POST", "/chat/completions") => completion(&body, &b, Kind::Chat),
        ("POST", "/v1/completions") | ("POST", "/completions") => completion(&body, &b, Kind::Text),
        ("POST", "/v1/embeddings") | ("POST", "/embeddings") => embeddings(&body),
        _ => error(StatusCode::NOT_FOUND, "not_found", "unknown path"),
    };
    add_litellm_headers(response.headers_mut());
    response
}

/// What a LiteLLM proxy adds to its answers: its own spend and routing facts and the provider's
/// rate limits. A gateway in front must not pass these on to its clients.
fn add_litellm_headers(headers: &mut HeaderMap) {
    for (name, value) in [
        ("x-litellm-key-spend", "1234.5"),
        ("x-litellm-model-api-base", "https://provider.internal/v1"),
        ("llm_provider-x-request-id", "req-provider"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-limit-tokens", "1000000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

fn record(mock: &Mock, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) {
    let entry = RecordedRequest {
        method: method.to_string(),
        path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body_len: body.len(),
        body_sha256: hex::encode(Sha256::digest(body)),
        body: (body.len() <= BODY_KEPT).then(|| String::from_utf8(body.to_vec()).ok()).flatten(),
    };
    let mut requests = mock.requests.lock().unwrap_or_else(PoisonError::into_inner);
    if requests.len() == REMEMBERED {
        requests.pop_front();
    }
    requests.push_back(entry);
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    (status, Json(json!({"error": {"message": message, "type": kind, "code": code}}))).into_response()
}

fn models() -> Response {
    let data: Vec<Value> = ["mock-gpt", "mock-embed"]
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Whitespace-separated words of every text the prompt carries.
pub fn count_words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(count_words).sum(),
        Value::Object(map) => ["content", "text"].iter().filter_map(|k| map.get(*k)).map(count_words).sum(),
        _ => 0,
    }
}

fn prompt_tokens(req: &Value) -> u64 {
    let words = count_words(req.get("messages").unwrap_or(&Value::Null))
        + count_words(req.get("prompt").unwrap_or(&Value::Null))
        + count_words(req.get("input").unwrap_or(&Value::Null));
    words.max(1)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn completion(body: &Bytes, b: &Behaviour, kind: Kind) -> Response {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_json", "body is not JSON"),
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock-gpt").to_string();
    let max_tokens = ["max_completion_tokens", "max_tokens"].iter().find_map(|k| req.get(*k).and_then(Value::as_u64));
    let completion_tokens = max_tokens.map_or(b.chunks as u64, |m| m.min(b.chunks as u64));
    let prompt = prompt_tokens(&req);
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens});
    let id = format!("mock-{:x}", now() ^ (prompt << 20) ^ completion_tokens);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let text = "tok ".repeat(completion_tokens as usize);
        let mut body = match kind {
            Kind::Chat => json!({"id": id, "object": "chat.completion", "created": now(), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage}),
            Kind::Text => json!({"id": id, "object": "text_completion", "created": now(), "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage}),
        };
        if b.no_usage {
            body.as_object_mut().map(|o| o.remove("usage"));
        }
        return Json(body).into_response();
    }
    let include_usage =
        !b.no_usage && req.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = |choice: Value, usage: Option<Value>| -> Bytes {
        let mut c = json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice]});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let content = |text: &str| match kind {
        Kind::Chat => json!({"index": 0, "delta": {"content": text}, "finish_reason": null}),
        Kind::Text => json!({"index": 0, "text": text, "finish_reason": null}),
    };
    let mut events: Vec<Bytes> = (0..completion_tokens).map(|_| chunk(content("tok "), None)).collect();
    events.push(match kind {
        Kind::Chat => chunk(json!({"index": 0, "delta": {}, "finish_reason": "stop"}), None),
        Kind::Text => chunk(json!({"index": 0, "text": "", "finish_reason": "stop"}), None),
    });
    if include_usage {
        let c = json!({"id": id, "object": object, "created": now(), "model": model, "choices": [], "usage": usage});
        events.push(Bytes::from(format!("data: {c}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let delay = b.chunk_delay;
    let drop_after = b.drop_after;
    let body = stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
        if drop_after.is_some_and(|n| i as u32 >= n) {
            // Let what was sent reach the client before the connection is cut.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "mock drop"));
        }
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(event)
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    response
}

fn embeddings(body: &Bytes) -> Response {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_json", "body is not JSON"),
    };
    let inputs = match req.get("input") {
        Some(Value::Array(items)) => items.len().max(1),
        _ => 1,
    };
    let prompt = prompt_tokens(&req);
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}))
        .collect();
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock-embed");
    Json(json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}))
    .into_response()
}
