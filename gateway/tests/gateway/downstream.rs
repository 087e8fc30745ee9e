//! Slow and greedy clients over real TCP: a request header must arrive whole within
//! `header_read_timeout_ms`, an idle keep-alive connection closes after `keepalive_idle_seconds`,
//! and at most `max_connections` client connections are open at once.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::*;

async fn connect(stack: &Stack) -> TcpStream {
    TcpStream::connect(stack.gateway.base.trim_start_matches("http://")).await.unwrap()
}

/// A whole chat request (the gateway's own answers close their connection; proxied ones do not).
fn chat_request(key: &str) -> String {
    let body = json!({"model": "m", "messages": user_msg("hi")}).to_string();
    format!("{}{body}", chat_head(key, body.len()))
}

fn chat_head(key: &str, body_len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {body_len}\r\n\r\n"
    )
}

/// One response: (status, head in lowercase, body). `None` if the connection ends first.
async fn read_response(conn: &mut TcpStream) -> Option<(u16, String, Vec<u8>)> {
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let length: Option<usize> =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
        let mut body = buf.split_off(head_end);
        loop {
            let done = match length {
                Some(n) => body.len() >= n,
                None => body.ends_with(b"0\r\n\r\n"),
            };
            if done {
                return Some((status, head, body));
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("no response within 20 s")
}

/// Reads until the gateway closes the connection (end of stream or reset): what arrived, and
/// how long it took. Fails after `limit`.
async fn until_closed(conn: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(limit.saturating_sub(started.elapsed()), conn.read(&mut chunk)).await;
        match read.expect("the gateway kept the connection open") {
            Ok(0) | Err(_) => return (got, started.elapsed()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_header_sent_byte_by_byte_is_cut_off_at_its_deadline(db: PgPool) {
    let stack = Stack::start_with(db, vec![("TOLLGATE_HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let (key, _, _) = stack.ready_key("slow@example.com", &["m"]).await;

    // A slowloris: a request line, then one header byte every 300 ms, never the empty line.
    let mut slow = connect(&stack).await;
    let started = Instant::now();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nx-slow: ").await.unwrap();
    let (mut reader, mut writer) = slow.into_split();
    let drip = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if writer.write_all(b"a").await.is_err() {
                break;
            }
        }
    });
    let closed = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return (got, started.elapsed()),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    });

    // Meanwhile an honest client is served.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let resp = stack.chat(&key, json!({"model": "m", "messages": user_msg("hi")})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let (got, after) = tokio::time::timeout(Duration::from_secs(15), closed).await.expect("never closed").unwrap();
    drip.abort();
    assert!(after >= Duration::from_millis(900), "closed after {after:?}, before the deadline");
    assert!(after < Duration::from_secs(6), "closed only after {after:?}");
    // The 408 arrives unless the client's next byte turned the close into a reset first.
    let got = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
    assert_eq!(stack.metric(r#"tollgate_gateway_downstream_rejected_total{reason="header_timeout"}"#).await, Some(1.0));

    // A header that arrives in time, then a body slower than the header deadline: served, as the
    // deadline covers the header only.
    let body = json!({"model": "m", "messages": user_msg("slow body")}).to_string();
    let mut conn = connect(&stack).await;
    conn.write_all(chat_head(&key, body.len()).as_bytes()).await.unwrap();
    let (first, rest) = body.split_at(10);
    conn.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    conn.write_all(rest.as_bytes()).await.unwrap();
    let (status, _, answer) = read_response(&mut conn).await.expect("no answer to a slow body");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn connections_beyond_the_cap_are_refused_until_one_closes(db: PgPool) {
    let stack = Stack::start_with(db, vec![("TOLLGATE_MAX_CONNECTIONS", "3")]).await;
    let (key, _, _) = stack.ready_key("many@example.com", &["m"]).await;
    // The key is ready, so the stack's own connections to the gateway can go.
    let stack = Stack { http: reqwest::Client::new(), ..stack };

    // Three connections, each proven admitted by an answer, then kept open idle. (The harness's
    // own connections may take a moment to be released: a refused attempt is retried.)
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < 3 {
        let mut conn = connect(&stack).await;
        conn.write_all(chat_request(&key).as_bytes()).await.unwrap();
        match read_response(&mut conn).await {
            Some((200, _, _)) => held.push(conn),
            other => {
                assert!(Instant::now() < deadline, "could not open 3 connections: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(stack.metric("tollgate_gateway_downstream_connections").await, Some(3.0));

    // A fourth, idle: 503 with connection: close, then closed, at once.
    let mut fourth = connect(&stack).await;
    let (got, after) = until_closed(&mut fourth, Duration::from_secs(5)).await;
    let got = String::from_utf8_lossy(&got).to_lowercase();
    assert!(got.starts_with("http/1.1 503"), "{got}");
    assert!(got.contains("connection: close") && got.contains("\"overloaded\""), "{got}");
    assert!(after < Duration::from_secs(2), "{after:?}");
    // One that sends a request gets the same.
    let mut fifth = connect(&stack).await;
    fifth.write_all(chat_request(&key).as_bytes()).await.unwrap();
    let (status, _, _) = read_response(&mut fifth).await.expect("an answer");
    assert_eq!(status, 503);
    assert_eq!(
        stack.metric(r#"tollgate_gateway_downstream_rejected_total{reason="max_connections"}"#).await,
        Some(2.0)
    );

    // The held connections still work.
    for conn in &mut held {
        conn.write_all(chat_request(&key).as_bytes()).await.unwrap();
        assert_eq!(read_response(conn).await.map(|r| r.0), Some(200));
    }

    // Once one closes, a new connection is served.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut conn = connect(&stack).await;
        conn.write_all(chat_request(&key).as_bytes()).await.unwrap();
        match read_response(&mut conn).await {
            Some((200, _, _)) => break,
            other => assert!(Instant::now() < deadline, "no slot came free: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn idle_keep_alive_connections_are_closed(db: PgPool) {
    let stack = Stack::start_with(
        db,
        vec![("TOLLGATE_KEEPALIVE_IDLE_SECONDS", "1"), ("TOLLGATE_HEADER_READ_TIMEOUT_MS", "200")],
    )
    .await;
    let (key, _, _) = stack.ready_key("idle@example.com", &["m"]).await;

    let mut conn = connect(&stack).await;
    conn.write_all(chat_request(&key).as_bytes()).await.unwrap();
    let (status, head, _) = read_response(&mut conn).await.expect("first answer");
    assert_eq!(status, 200);
    assert!(head.contains("connection: keep-alive"), "{head}");
    // Idle for longer than the header deadline but within the keep-alive: reused.
    tokio::time::sleep(Duration::from_millis(400)).await;
    conn.write_all(chat_request(&key).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn).await.map(|r| r.0), Some(200), "a kept-alive connection was not reused");
    // Then idle past a second: closed, with nothing written.
    let (got, after) = until_closed(&mut conn, Duration::from_secs(10)).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(6), "closed after {after:?}");
    // Idling out is not a rejection.
    assert_eq!(stack.metric(r#"tollgate_gateway_downstream_rejected_total{reason="header_timeout"}"#).await, Some(0.0));

    // keepalive_idle_seconds = 0: every answer closes its connection.
    let replica = stack.replica(vec![("TOLLGATE_KEEPALIVE_IDLE_SECONDS", "0")]).await;
    let mut conn = TcpStream::connect(replica.base.trim_start_matches("http://")).await.unwrap();
    conn.write_all(chat_request(&key).as_bytes()).await.unwrap();
    let (status, head, _) = read_response(&mut conn).await.expect("an answer");
    assert_eq!(status, 200);
    assert!(head.contains("connection: close"), "{head}");
    let (got, after) = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(got.is_empty() && after < Duration::from_secs(2), "{after:?}");
}
