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

/// A budget of $1 for the whole time (`budget_period: none`) on a key for model `b` ($0.01 per
/// completion token), over a Redis of the test's own: `(stack, key, key id)`.
async fn budget_stack(db: PgPool, redis_url: &str, env: Vec<(&str, &str)>) -> (Stack, String, String) {
    let mut env = env;
    env.extend([("TOLLGATE_REDIS_URL", redis_url), ("TOLLGATE_REDIS_TIMEOUT_MS", "300")]);
    let stack = Stack::start_with(db, env).await;
    stack.post_admin("/models", json!({"id": "b", "input_cost_per_token": 0, "output_cost_per_token": 0.01})).await;
    let (key, key_id, _) = stack.key_for("budget@example.com", &["b"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"max_budget": 1, "budget_period": "none"}})).await;
    stack.wait_model(&key, "b").await;
    (stack, key, key_id)
}

/// The key's settled spend in Redis (nano-USD) and its usage rows' cost in PostgreSQL (nano-USD).
async fn spend_both_sides(stack: &Stack, redis: &RedisServer, key_id: &str) -> (i64, i64) {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let in_redis: Option<i64> =
        redis::cmd("GET").arg(format!("tg:{{key:{key_id}}}:nb:all")).query_async(&mut conn).await.unwrap();
    let in_pg: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT coalesce(sum(cost), 0) FROM usage_logs WHERE key_id = $1::uuid")
            .bind(key_id)
            .fetch_one(&stack.db)
            .await
            .unwrap();
    (in_redis.unwrap_or(0), tollgate_core::limiter::nanos_round(in_pg))
}

/// Polls `metric` on `stack`'s gateway until `done` holds (10 s at most).
async fn wait_metric(stack: &Stack, metric: &str, done: impl Fn(f64) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = stack.metric(metric).await.unwrap_or(0.0);
        if done(v) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{metric} stayed at {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_settlement_redis_missed_is_kept_and_applied_once(db: PgPool) {
    let redis = RedisServer::start().await;
    // Reconcile off: only the kept settlement may restore the spend.
    let (stack, key, key_id) = budget_stack(db, &redis.url(), vec![("TOLLGATE_BUDGET_RECONCILE_SECONDS", "0")]).await;
    let body = json!({"model": "b", "max_tokens": 3, "messages": user_msg("hi")});
    assert_eq!(stack.chat(&key, body.clone()).send().await.unwrap().status(), StatusCode::OK);

    // A slow request is admitted, then Redis hangs while it finishes: its settlement fails.
    let slow = tokio::spawn(stack.chat(&key, body.clone()).header("x-mock-ttfb-ms", "1500").send());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    redis.pause(true);
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    wait_metric(&stack, "tollgate_gateway_settlements_pending", |v| v >= 1.0).await;
    redis.pause(false);
    wait_metric(&stack, "tollgate_gateway_settlements_pending", |v| v == 0.0).await;
    stack.wait_usage_rows(2).await;

    // Both requests' spend is in the budget, once: the settlement that timed out still reached
    // Redis when it woke, and its repeat found it applied.
    let (in_redis, in_pg) = spend_both_sides(&stack, &redis, &key_id).await;
    assert!(in_pg > 0);
    assert_eq!(in_redis, in_pg, "Redis budget vs usage rows (nano-USD)");
    assert_eq!(stack.metric("tollgate_gateway_settlements_dropped_total").await, Some(0.0));
}

/// A TCP relay to `target` that can cut every connection through it and refuse new ones until
/// healed: a network partition, where a call in flight never arrives.
struct Partition {
    /// `127.0.0.1:<port>` of the relay.
    addr: String,
    cut: Arc<std::sync::atomic::AtomicU64>,
}

impl Partition {
    async fn start(target: u16) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Even: healed; odd: cut. A connection lives while the generation it opened in lasts.
        let cut = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let generation = cut.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let opened = generation.load(std::sync::atomic::Ordering::SeqCst);
                if opened % 2 == 1 {
                    continue; // refused: dropped at once
                }
                let generation = generation.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let relay = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    let severed = async {
                        while generation.load(std::sync::atomic::Ordering::SeqCst) == opened {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                    };
                    tokio::select! {
                        _ = relay => {}
                        _ = severed => {}
                    }
                });
            }
        });
        Partition { addr, cut }
    }

    fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn set(&self, cut: bool) {
        let now = self.cut.load(std::sync::atomic::Ordering::SeqCst);
        if (now % 2 == 1) != cut {
            self.cut.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A request of the budget key admitted through Redis, then the network to Redis cut while its
/// answer comes: its settlement cannot arrive. Returns once the gateway keeps it.
async fn strand_a_settlement(stack: &Stack, partition: &Partition, key: &str) {
    let body = json!({"model": "b", "max_tokens": 3, "messages": user_msg("hi")});
    assert_eq!(stack.chat(key, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    let slow = tokio::spawn(stack.chat(key, body).header("x-mock-ttfb-ms", "1500").send());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    partition.set(true);
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    wait_metric(stack, "tollgate_gateway_settlements_pending", |v| v >= 1.0).await;
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_settlement_lost_in_a_partition_is_sent_again_when_redis_is_back(db: PgPool) {
    let redis = RedisServer::start().await;
    let partition = Partition::start(redis.port).await;
    let (stack, key, key_id) =
        budget_stack(db, &partition.redis_url(), vec![("TOLLGATE_BUDGET_RECONCILE_SECONDS", "0")]).await;
    strand_a_settlement(&stack, &partition, &key).await;
    stack.wait_usage_rows(2).await;
    let (in_redis, in_pg) = spend_both_sides(&stack, &redis, &key_id).await;
    assert!(in_redis < in_pg, "the settlement cannot have arrived yet");

    partition.set(false);
    wait_metric(&stack, "tollgate_gateway_settlements_retried_total", |v| v >= 1.0).await;
    wait_metric(&stack, "tollgate_gateway_settlements_pending", |v| v == 0.0).await;
    let (in_redis, in_pg) = spend_both_sides(&stack, &redis, &key_id).await;
    assert_eq!(in_redis, in_pg, "Redis budget vs usage rows (nano-USD)");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_budget_that_missed_spend_is_raised_to_the_rollups(db: PgPool) {
    let redis = RedisServer::start().await;
    let (stack, key, key_id) = budget_stack(db, &redis.url(), vec![("TOLLGATE_BUDGET_RECONCILE_SECONDS", "1")]).await;
    let body = json!({"model": "b", "max_tokens": 3, "messages": user_msg("hi")});
    for _ in 0..3 {
        assert_eq!(stack.chat(&key, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    }
    stack.wait_usage_rows(3).await;
    let (before, in_pg) = spend_both_sides(&stack, &redis, &key_id).await;
    assert_eq!(before, in_pg);
    // A settlement lost for good (e.g. given up after its lease): Redis holds one request less.
    let one = in_pg / 3;
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: i64 =
        redis::cmd("DECRBY").arg(format!("tg:{{key:{key_id}}}:nb:all")).arg(one).query_async(&mut conn).await.unwrap();
    wait_metric(&stack, "tollgate_gateway_budget_reconcile_corrections_total", |v| v >= 1.0).await;
    let (after, in_pg) = spend_both_sides(&stack, &redis, &key_id).await;
    assert_eq!(after, in_pg, "the reconcile restored the missing spend exactly");
    assert_eq!(stack.metric("tollgate_gateway_budget_reconciled_nano_usd_total").await, Some(one as f64));
    // In agreement, later rounds change nothing.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(spend_both_sides(&stack, &redis, &key_id).await.0, after);
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn settlements_unsent_at_shutdown_are_taken_up_by_the_next_start(db: PgPool) {
    let redis = RedisServer::start().await;
    let partition = Partition::start(redis.port).await;
    let spool = TempDir::new();
    let spool_dir = spool.0.to_str().unwrap().to_string();
    let env = vec![("TOLLGATE_BUDGET_RECONCILE_SECONDS", "0"), ("TOLLGATE_SPOOL_DIR", spool_dir.as_str())];
    let (mut stack, key, key_id) = budget_stack(db, &partition.redis_url(), env).await;
    strand_a_settlement(&stack, &partition, &key).await;

    // Stopped while Redis is still cut off: the settlement is saved beside the spool.
    assert!(stack.gateway.terminate().await.success());
    let saved = files_starting(&spool.0, "settlements-");
    assert_eq!(saved.len(), 1, "{saved:?}");
    let (in_redis, in_pg) = spend_both_sides(&stack, &redis, &key_id).await;
    assert!(in_redis < in_pg);

    // The next gateway on that directory, with Redis reachable, applies it and removes the file.
    partition.set(false);
    let next = stack.replica(vec![("TOLLGATE_SPOOL_DIR", spool_dir.as_str())]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while spend_both_sides(&stack, &redis, &key_id).await.0 < in_pg {
        assert!(std::time::Instant::now() < deadline, "the saved settlement was never applied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(spend_both_sides(&stack, &redis, &key_id).await, (in_pg, in_pg));
    assert!(files_starting(&spool.0, "settlements-").is_empty(), "the settlements file was not removed");
    drop(next);
}

/// Sends `n` chat requests one after another, round-robin over `bases`; returns how many were
/// admitted (200). Any other answer must be a 429.
async fn admitted(stack: &Stack, bases: &[&str], key: &str, n: usize) -> usize {
    let mut ok = 0;
    for i in 0..n {
        let resp = stack
            .http
            .post(format!("{}/v1/chat/completions", bases[i % bases.len()]))
            .bearer_auth(key)
            .json(&json!({"model": "m", "max_tokens": 1, "messages": user_msg("hi")}))
            .send()
            .await
            .unwrap();
        match resp.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
        }
    }
    ok
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_flapping_redis_never_hands_out_a_fresh_share(db: PgPool) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let env = vec![("TOLLGATE_REDIS_URL", url.as_str()), ("TOLLGATE_REDIS_TIMEOUT_MS", "200")];
    let stack = Stack::start_with(db, env.clone()).await;
    let (key, key_id, _) = stack.ready_key("flap@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 20}})).await;
    let other = stack.replica(env).await;
    let bases = [stack.gateway.base.as_str(), other.base.as_str()];
    // Both replicas in the heartbeat set, and the new limit seen by both.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;

    // All within one minute: Redis up, down, up, down.
    let mut total = admitted(&stack, &bases, &key, 8).await;
    assert_eq!(total, 8);
    redis.pause(true);
    total += admitted(&stack, &bases, &key, 24).await;
    redis.pause(false);
    // Heartbeats bring what each replica admitted alone into Redis.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    total += admitted(&stack, &bases, &key, 24).await;
    redis.pause(true);
    total += admitted(&stack, &bases, &key, 24).await;
    redis.pause(false);
    assert!(total <= 20, "{total} admitted in one minute under an RPM of 20");
    assert!(total >= 16, "only {total} admitted: the outage should still admit each replica's share");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn replicas_that_start_during_an_outage_count_the_expected_replicas(db: PgPool) {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let stack = Stack::start_with(db, vec![("TOLLGATE_REDIS_URL", url.as_str())]).await;
    let (key, key_id, _) = stack.ready_key("cold@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"rpm": 10}})).await;
    redis.kill();
    // Two replicas that never see each other: each counts the two it was told to expect.
    let env = vec![("TOLLGATE_EXPECTED_REPLICAS", "2"), ("TOLLGATE_REDIS_TIMEOUT_MS", "200")];
    let (a, b) = (stack.replica(env.clone()).await, stack.replica(env).await);
    let total = admitted(&stack, &[a.base.as_str(), b.base.as_str()], &key, 30).await;
    assert_eq!(total, 10, "each replica admits its half of the limit");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_budget_postgres_cannot_seed_is_not_a_redis_outage(db: PgPool) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let stack = Stack::start_with(db.clone(), vec![("TOLLGATE_REDIS_URL", url.as_str())]).await;
    let (key, key_id, _) = stack.ready_key("seed@example.com", &["m"]).await;
    let (plain, _, _) = stack.key_for("plain@example.com", &["m"]).await;
    stack.patch(&format!("/keys/{key_id}"), json!({"limits": {"max_budget": 5, "rpm": 100}})).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The rollups a budget is seeded from cannot be read.
    sqlx::query("ALTER TABLE usage_daily RENAME TO usage_daily_away").execute(&db).await.unwrap();
    let body = json!({"model": "m", "messages": user_msg("hi")});
    let resp = stack.chat(&key, body.clone()).send().await.unwrap();
    assert_eq!(error_of(resp).await, (StatusCode::SERVICE_UNAVAILABLE, "limits_unavailable".into()));
    // Redis is fine: the replica is not limiting on its own, and other keys go through Redis.
    assert_eq!(stack.metric("tollgate_gateway_limiter_fallback_active").await, Some(0.0));
    assert_eq!(stack.chat(&plain, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    sqlx::query("ALTER TABLE usage_daily_away RENAME TO usage_daily").execute(&db).await.unwrap();
    assert_eq!(stack.chat(&key, body).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(stack.metric("tollgate_gateway_limiter_fallback_active").await, Some(0.0));
}

/// `db`'s URL with its host and port replaced by `addr`.
fn database_url_via(db: &PgPool, addr: &str) -> String {
    let url = database_url(db);
    let (scheme_auth, rest) = url.split_once('@').unwrap();
    let (_, path) = rest.split_once('/').unwrap();
    format!("{scheme_auth}@{addr}/{path}")
}

/// The usage spool segments in `dir`.
fn segments_in(dir: &std::path::Path) -> Vec<String> {
    files_starting(dir, "usage-").into_iter().filter(|n| n.ends_with(".jsonl")).collect()
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn replicas_sharing_a_spool_lose_and_double_no_row_through_a_postgres_outage(db: PgPool) {
    let postgres = Partition::start(5432).await;
    let via = database_url_via(&db, &postgres.addr);
    let spool = TempDir::new();
    let spool_dir = spool.0.to_str().unwrap().to_string();
    let env = vec![("TOLLGATE_DATABASE_URL", via.as_str()), ("TOLLGATE_SPOOL_DIR", spool_dir.as_str())];
    let stack = Stack::start_with(db.clone(), env.clone()).await;
    let (key, _, _) = stack.ready_key("spool@example.com", &["m"]).await;
    let other = stack.replica(env).await;
    let (a, b) = (stack.gateway.base.clone(), other.base.clone());
    let chat = |base: String| {
        stack
            .http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "m", "messages": user_msg("hi")}))
            .send()
    };
    // Both replicas know the key before PostgreSQL goes away.
    for base in [&a, &b] {
        assert_eq!(chat(base.clone()).await.unwrap().status(), StatusCode::OK);
    }
    stack.wait_usage_rows(2).await;

    postgres.set(true);
    let mut ids = Vec::new();
    for i in 0..40 {
        let resp = chat(if i % 2 == 0 { a.clone() } else { b.clone() }).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    // Each replica spools into segments of its own in the one directory.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let owners = loop {
        let owners: std::collections::HashSet<String> =
            segments_in(&spool.0).iter().filter_map(|n| n.split('-').nth(1).map(str::to_string)).collect();
        if owners.len() == 2 || std::time::Instant::now() > deadline {
            break owners;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(owners.len(), 2, "segments of both replicas: {:?}", segments_in(&spool.0));

    postgres.set(false);
    stack.wait_usage_rows(42).await;
    let recorded: Vec<String> = sqlx::query_scalar("SELECT request_id FROM usage_logs").fetch_all(&db).await.unwrap();
    for id in &ids {
        assert_eq!(recorded.iter().filter(|r| *r == id).count(), 1, "request {id}");
    }
    let daily: i64 = sqlx::query_scalar("SELECT sum(requests)::bigint FROM usage_daily").fetch_one(&db).await.unwrap();
    assert_eq!(daily, 42, "rollups count each row once");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !segments_in(&spool.0).is_empty() {
        assert!(std::time::Instant::now() < deadline, "segments left: {:?}", segments_in(&spool.0));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let replayed = stack.metric("tollgate_gateway_usage_rows_replayed_total").await.unwrap()
        + stack.metric_of(&other, "tollgate_gateway_usage_rows_replayed_total").await.unwrap();
    // The segments of both went through the spool (rows still queued when PostgreSQL came back
    // went straight in).
    assert!((2.0..=40.0).contains(&replayed), "{replayed} rows replayed");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn a_segment_left_by_a_stopped_replica_is_replayed_and_its_bad_lines_quarantined(db: PgPool) {
    let spool = TempDir::new();
    let row = |i: u32| usage_row(format!("left-behind-{i}"), "m", 5, 200);
    // A crashed replica's segment: two rows, a torn line between them, and a torn last line.
    let mut text = serde_json::to_string(&row(1)).unwrap() + "\n";
    text += "{\"request_id\":\"torn\n";
    text += &(serde_json::to_string(&row(2)).unwrap() + "\n");
    text += &serde_json::to_string(&row(3)).unwrap()[..40];
    std::fs::write(spool.0.join("usage-0123abcd-0000000001.jsonl"), text).unwrap();

    let spool_dir = spool.0.to_str().unwrap().to_string();
    let stack = Stack::start_with(db.clone(), vec![("TOLLGATE_SPOOL_DIR", spool_dir.as_str())]).await;
    stack.wait_usage_rows(2).await;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM usage_logs ORDER BY request_id").fetch_all(&db).await.unwrap();
    assert_eq!(ids, vec!["left-behind-1", "left-behind-2"]);
    assert_eq!(stack.metric("tollgate_gateway_usage_spool_corrupt_lines_total").await, Some(2.0));
    let quarantined = std::fs::read_to_string(spool.0.join("quarantine-usage.jsonl")).unwrap();
    assert_eq!(quarantined.lines().count(), 2, "{quarantined}");
    assert!(segments_in(&spool.0).is_empty(), "the replayed segment was not removed");
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn rows_over_the_spool_cap_wait_in_memory_and_still_arrive(db: PgPool) {
    let postgres = Partition::start(5432).await;
    let via = database_url_via(&db, &postgres.addr);
    // A cap the first spooled row already reaches.
    let env = vec![("TOLLGATE_DATABASE_URL", via.as_str()), ("TOLLGATE_SPOOL_MAX_BYTES", "1")];
    let stack = Stack::start_with(db.clone(), env).await;
    let (key, _, _) = stack.ready_key("cap@example.com", &["m"]).await;
    let body = json!({"model": "m", "messages": user_msg("hi")});
    assert_eq!(stack.chat(&key, body.clone()).send().await.unwrap().status(), StatusCode::OK);
    stack.wait_usage_rows(1).await;
    postgres.set(true);
    for _ in 0..10 {
        assert_eq!(stack.chat(&key, body.clone()).send().await.unwrap().status(), StatusCode::OK);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    wait_metric(&stack, "tollgate_gateway_usage_spool_memory_rows", |v| v >= 1.0).await;
    assert!(stack.metric("tollgate_gateway_usage_spool_write_errors_total").await.unwrap() >= 1.0);
    postgres.set(false);
    stack.wait_usage_rows(11).await;
    wait_metric(&stack, "tollgate_gateway_usage_spool_memory_rows", |v| v == 0.0).await;
    assert_eq!(stack.metric("tollgate_gateway_usage_rows_dropped_total").await, Some(0.0));
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn rows_queued_when_a_gateway_is_killed_are_replayed_from_its_journal(db: PgPool) {
    // The writer flushes once a minute here, so every answered request's row is still queued
    // in memory when the gateway is SIGKILLed.
    let spool = TempDir::new();
    let spool_dir = spool.0.to_str().unwrap().to_string();
    let env = vec![("TOLLGATE_USAGE_FLUSH_INTERVAL_MS", "60000"), ("TOLLGATE_SPOOL_DIR", spool_dir.as_str())];
    let mut stack = Stack::start_with(db, env).await;
    let (key, _, _) = stack.ready_key("killed@example.com", &["m"]).await;
    for _ in 0..5 {
        let resp = stack
            .chat(&key, json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
    }
    let count = |db: &PgPool| {
        let db = db.clone();
        async move { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM usage_logs").fetch_one(&db).await.unwrap() }
    };
    assert_eq!(count(&stack.db).await, 0, "the rows were to wait in the queue");
    let mut child = stack.gateway.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(files_starting(&spool.0, "journal-").len(), 1);

    // The next gateway on that directory replays the journal: every row once, in the rollups too.
    let next = stack.replica(vec![("TOLLGATE_SPOOL_DIR", spool_dir.as_str())]).await;
    stack.wait_usage_rows(5).await;
    let rolled: i64 = sqlx::query_scalar("SELECT coalesce(sum(requests), 0)::bigint FROM usage_daily")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(rolled, 5);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !files_starting(&spool.0, "journal-").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the replayed journal was not removed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(next);
}
