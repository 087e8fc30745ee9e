//! Faults between the gateway and its upstream that a mock speaking proper HTTP cannot stage: a
//! pooled connection the upstream closes as it is reused.

use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::harness::*;

/// Reads one HTTP/1.1 request (header and content-length body) from `conn`; `None` at EOF.
async fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
    while buf.len() < header_end + length {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf[header_end..header_end + length].to_vec())
}

/// An upstream that answers every request with a chat completion on a keep-alive connection,
/// except the second request on its first connection: that one it reads and then closes the
/// connection without a byte of answer, as a server closing an idle connection does when a
/// request races the close. Returns its URL and the bodies it received, dropped one included.
async fn closing_upstream() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        for connection in 0.. {
            let (mut conn, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                for request in 0.. {
                    let Some(body) = read_request(&mut conn).await else { return };
                    seen.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    if connection == 0 && request == 1 {
                        return; // dropped: closed without an answer
                    }
                    let answer = json!({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "x",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
                    })
                    .to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        answer.len()
                    );
                    if conn.write_all(format!("{head}{answer}").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, bodies)
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_stale_pooled_connection_is_retried_once_with_the_rewritten_body(db: PgPool) {
    let stack = Stack::start(db.clone()).await;
    // The upstream knows the model by another name: the gateway rewrites `model` in the body.
    stack
        .post_admin(
            "/models",
            json!({"id": "m", "upstream_model": "provider/m-v2", "input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}),
        )
        .await;
    let (key, _, _) = stack.key_for("retry@example.com", &["m"]).await;
    stack.wait_model(&key, "m").await;
    let (upstream, bodies) = closing_upstream().await;
    let gateway =
        Gateway::start(GatewayOptions { database_url: database_url(&db), upstream_url: upstream, env: vec![] }).await;
    let chat = || {
        stack
            .http
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth(&key)
            .json(&json!({"model": "m", "messages": user_msg("hello")}))
            .send()
    };
    // The first request opens the connection the second reuses, and the upstream drops.
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    let resp = chat().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().await.unwrap());

    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3, "the dropped request was sent again, once: {bodies:?}");
    for body in &bodies {
        assert_eq!(body["model"], "provider/m-v2", "an attempt went out without the rewritten body: {body}");
    }
    assert_eq!(bodies[1], bodies[2], "the retry differs from the first attempt");
    // One usage row per client request, the retried one billed once.
    stack.wait_usage_rows(2).await;
    let rows: Vec<(i16, i64, i64)> =
        sqlx::query_as("SELECT status, prompt_tokens, completion_tokens FROM usage_logs").fetch_all(&db).await.unwrap();
    assert_eq!(rows, vec![(200, 3, 2), (200, 3, 2)]);
}
