//! Test harness: the built `tollgate-gateway` binary as a separate process, in front of an
//! in-process mock upstream, with an in-process control API issuing keys, all on real
//! PostgreSQL (a fresh database per test) and the shared Redis.

use std::{
    net::TcpListener as StdListener,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tollgate_bench::mock::{self, MockConfig};
use tollgate_control_api::{config::ControlApiConfig, state::AppState};

/// Headers that steer the mock upstream (latency, chunks, failures); forwarded by configuration.
pub const MOCK_HEADERS: &str =
    "x-mock-ttfb-ms,x-mock-chunks,x-mock-chunk-delay-ms,x-mock-status,x-mock-drop-after,x-mock-no-usage";

pub fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The URL of the database `#[sqlx::test]` made for this test.
pub fn database_url(db: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let name = db.connect_options().get_database().expect("database name").to_string();
    let (prefix, _) = base.rsplit_once('/').expect("DATABASE_URL has a database");
    format!("{prefix}/{name}")
}

pub struct Stack {
    pub redis: String,
    pub db: PgPool,
    pub http: reqwest::Client,
    pub api: String,
    pub admin_key: String,
    pub mock: String,
    pub gateway: Gateway,
}

pub struct Gateway {
    pub child: Option<Child>,
    pub base: String,
    pub admin: String,
    pub log: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(format!("tollgate-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct GatewayOptions {
    pub database_url: String,
    pub upstream_url: String,
    pub env: Vec<(String, String)>,
}

impl Gateway {
    pub async fn start(opts: GatewayOptions) -> Gateway {
        let dir = TempDir::new();
        let (port, admin_port) = (free_port(), free_port());
        let log = dir.0.join("gateway.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("TOLLGATE_DATABASE_URL", &opts.database_url)
            .env("TOLLGATE_REDIS_URL", redis_url())
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("TOLLGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("TOLLGATE_UPSTREAM_URL", &opts.upstream_url)
            .env("TOLLGATE_UPSTREAM_API_KEY", "sk-upstream-credential")
            // Debug builds on a busy machine: a generous Redis budget, so that only the tests
            // about outages see the fallback (they set their own).
            .env("TOLLGATE_REDIS_TIMEOUT_MS", "1000")
            .env("TOLLGATE_GRACE_PERIOD_SECONDS", "1")
            .env("TOLLGATE_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", "5")
            .env("TOLLGATE_SPOOL_DIR", dir.0.join("spool"))
            // The mock upstream's per-request behaviour headers.
            .env("TOLLGATE_FORWARD_REQUEST_HEADERS", MOCK_HEADERS)
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tollgate-gateway");
        // A TLS listener's certificate names localhost.
        let tls = opts.env.iter().any(|(k, _)| k == "TOLLGATE_TLS_CERT_FILE");
        let gw = Gateway {
            child: Some(child),
            base: if tls { format!("https://localhost:{port}") } else { format!("http://127.0.0.1:{port}") },
            admin: format!("http://127.0.0.1:{admin_port}"),
            log,
            _dir: dir,
        };
        gw.wait_ready().await;
        gw
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            let admin_up = http.get(format!("{}/health", self.admin)).send().await.is_ok();
            let proxy_up =
                tokio::net::TcpStream::connect(self.base.rsplit('/').next().unwrap_or_default()).await.is_ok();
            if admin_up && proxy_up {
                return;
            }
            assert!(Instant::now() < deadline, "gateway did not start:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (off the async runtime) for the process to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::task::spawn_blocking(move || {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            child.wait().expect("wait")
        })
        .await
        .expect("join")
    }
}

/// Applies the control API's alert and webhook settings among `env` (`TOLLGATE_ALERT_*`,
/// `TOLLGATE_WEBHOOK_*`; the gateway ignores them) to `config`: true when there were any, and the
/// in-process control API then runs its alert scanner and webhook worker.
pub fn control_api_env(config: &mut ControlApiConfig, env: &[(&str, &str)]) -> bool {
    let mut any = false;
    for (k, v) in env {
        match *k {
            "TOLLGATE_WEBHOOK_URL" => config.webhook.url = Some(v.parse().unwrap()),
            "TOLLGATE_WEBHOOK_SECRET" => config.webhook.secret = Some(v.to_string()),
            "TOLLGATE_WEBHOOK_RETRY_BASE_MS" => config.webhook.retry_base_ms = v.parse().unwrap(),
            "TOLLGATE_WEBHOOK_TIMEOUT_SECONDS" => config.webhook.timeout_seconds = v.parse().unwrap(),
            "TOLLGATE_ALERT_SCAN_INTERVAL_SECONDS" => config.alerts.scan_interval_seconds = v.parse().unwrap(),
            "TOLLGATE_ALERT_THRESHOLDS" => {
                config.alerts.thresholds = v.split(',').map(|t| t.trim().parse().unwrap()).collect();
            }
            _ => continue,
        }
        any = true;
    }
    any
}

pub async fn start_mock() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mock::serve(listener, MockConfig::default()));
    format!("http://{addr}")
}

impl Stack {
    pub async fn start(db: PgPool) -> Stack {
        Self::start_with(db, vec![]).await
    }

    /// `env` may name its own `TOLLGATE_REDIS_URL`; the control API then uses it too.
    pub async fn start_with(db: PgPool, env: Vec<(&str, &str)>) -> Stack {
        Self::start_fronted(db, env, |mock| mock.to_string()).await
    }

    /// As [`Stack::start_with`], with the gateway's upstream URL made from the mock's by
    /// `front` (e.g. a TLS front before it).
    pub async fn start_fronted(db: PgPool, env: Vec<(&str, &str)>, front: impl FnOnce(&str) -> String) -> Stack {
        let mock = start_mock().await;
        let upstream = front(&mock);
        let admin_key = tollgate_core::keys::generate_key();
        let redis =
            env.iter().find(|(k, _)| *k == "TOLLGATE_REDIS_URL").map(|(_, v)| v.to_string()).unwrap_or_else(redis_url);
        let mut config = ControlApiConfig {
            redis_url: redis.clone(),
            admin_api_keys: vec![admin_key.clone()],
            ..Default::default()
        };
        let events = control_api_env(&mut config, &env);
        let state = AppState::new(&config, db.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        if events {
            tollgate_control_api::spawn_events(&config, &state);
        }
        tokio::spawn(tollgate_control_api::serve(listener, state, std::future::pending()));
        let gateway = Gateway::start(GatewayOptions {
            database_url: database_url(&db),
            upstream_url: upstream,
            env: env.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        })
        .await;
        Stack { redis, db, http: reqwest::Client::new(), api, admin_key, mock, gateway }
    }

    /// Another gateway process on the same database, Redis and upstream.
    pub async fn replica(&self, env: Vec<(&str, &str)>) -> Gateway {
        let mut env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.insert(0, ("TOLLGATE_REDIS_URL".into(), self.redis.clone()));
        Gateway::start(GatewayOptions { database_url: database_url(&self.db), upstream_url: self.mock.clone(), env })
            .await
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .request(method.clone(), format!("{}/api/v1{path}", self.api))
            .bearer_auth(&self.admin_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    /// PATCHes `path` (`/keys/{id}`, `/users/{id}`, ...) and waits until the first gateway has
    /// applied the invalidation it publishes: the next request sees the change. (Replicas started
    /// later read it from PostgreSQL.) Without the wait a loaded machine can serve the request
    /// before the message arrives.
    pub async fn patch(&self, path: &str, body: Value) -> Value {
        let kind = path.trim_start_matches('/').split('/').next().unwrap_or_default().trim_end_matches('s');
        let series = format!(r#"tollgate_gateway_invalidations_total{{kind="{kind}"}}"#);
        let before = self.metric(&series).await.unwrap_or(0.0);
        let answer = self.admin(reqwest::Method::PATCH, path, body).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric(&series).await.unwrap_or(0.0) <= before {
            assert!(Instant::now() < deadline, "the gateway never applied the invalidation of PATCH {path}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        answer
    }

    pub async fn post_admin(&self, path: &str, body: Value) -> Value {
        self.admin(reqwest::Method::POST, path, body).await
    }

    /// A model priced at 1 micro-USD per prompt token and 2 per completion token.
    pub async fn model(&self, id: &str) {
        self.post_admin(
            "/models",
            json!({"id": id, "input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}),
        )
        .await;
    }

    /// A user subscribed to `models` and a key for them: `(key, key id, user id)`.
    pub async fn key_for(&self, email: &str, models: &[&str]) -> (String, String, String) {
        let user = self.post_admin("/users", json!({"email": email, "name": "t"})).await;
        let uid = user["id"].as_str().unwrap().to_string();
        for m in models {
            self.post_admin("/subscriptions", json!({"user_id": uid, "model_id": m})).await;
        }
        let key = self.post_admin("/keys", json!({"user_id": uid, "name": "k", "models": models})).await;
        (key["key"].as_str().unwrap().to_string(), key["id"].as_str().unwrap().to_string(), uid)
    }

    /// Creates `models`, a user subscribed to them and a key, and waits until the gateway serves
    /// them: `(key, key id, user id)`.
    pub async fn ready_key(&self, email: &str, models: &[&str]) -> (String, String, String) {
        for m in models {
            self.model(m).await;
        }
        let made = self.key_for(email, models).await;
        for m in models {
            self.wait_model(&made.0, m).await;
        }
        made
    }

    /// The gateway's `GET /v1/models` as `key` sees it.
    pub async fn models(&self, key: &str) -> Value {
        self.http
            .get(format!("{}/v1/models", self.gateway.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the gateway's catalogue knows `model` (it learns through invalidation).
    pub async fn wait_model(&self, key: &str, model: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.models(key).await;
            if v["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == model)) {
                return;
            }
            assert!(Instant::now() < deadline, "gateway never saw model {model}: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn chat(&self, key: &str, body: Value) -> reqwest::RequestBuilder {
        self.http.post(format!("{}/v1/chat/completions", self.gateway.base)).bearer_auth(key).json(&body)
    }

    pub async fn recorded(&self) -> Vec<Value> {
        let v: Value =
            self.http.get(format!("{}/mock/requests", self.mock)).send().await.unwrap().json().await.unwrap();
        v.as_array().unwrap().clone()
    }

    /// Waits until usage_logs holds `n` rows.
    pub async fn wait_usage_rows(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_logs").fetch_one(&self.db).await.unwrap();
            if count >= n {
                assert_eq!(count, n, "more usage rows than requests");
                return;
            }
            assert!(Instant::now() < deadline, "only {count} of {n} usage rows");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A header of a request the mock recorded.
pub fn recorded_header<'a>(recorded: &'a Value, name: &str) -> Option<&'a str> {
    recorded["headers"].as_array()?.iter().find(|h| h[0] == name).and_then(|h| h[1].as_str())
}

impl Stack {
    /// One series of the gateway's /metrics (its full name, labels included), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.metric_of(&self.gateway, series).await
    }

    /// The control API's /metrics, read with the admin key.
    pub async fn api_metrics(&self) -> String {
        let request = self.http.get(format!("{}/metrics", self.api)).bearer_auth(&self.admin_key);
        request.send().await.unwrap().text().await.unwrap()
    }

    /// One series of another gateway's /metrics (a replica's).
    pub async fn metric_of(&self, gateway: &Gateway, series: &str) -> Option<f64> {
        let text = self.http.get(format!("{}/metrics", gateway.admin)).send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

/// The names of the files in `dir` that start with `prefix`.
pub fn files_starting(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A usage row as the gateway's writer queues it: one token each way, $0.000003, on the
/// Default Team.
pub fn usage_row(request_id: String, model: &str, latency_ms: i32, status: i16) -> tollgate_gateway::usage::UsageRow {
    tollgate_gateway::usage::UsageRow {
        request_id,
        created_at: chrono::Utc::now(),
        key_id: uuid::Uuid::from_u128(7),
        user_id: uuid::Uuid::from_u128(8),
        team_id: tollgate_core::DEFAULT_TEAM_ID,
        model_id: model.into(),
        subscription_id: None,
        endpoint: "/v1/chat/completions".into(),
        status,
        prompt_tokens: 1,
        completion_tokens: 1,
        cost: rust_decimal::Decimal::new(3, 6),
        latency_ms,
        ttfb_ms: Some(1),
        stream: false,
        error_kind: None,
    }
}

/// The OpenAI-shaped error of a response: `(status, code)`.
pub async fn error_of(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{v}");
    (status, v["error"]["code"].as_str().unwrap_or_default().to_string())
}

pub fn user_msg(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// A Redis server of the test's own, on a free port (never the shared one), killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    cluster: bool,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::spawn(free_port(), TempDir::new(), false).await
    }

    async fn spawn(port: u16, dir: TempDir, cluster: bool) -> RedisServer {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(std::fs::File::create(dir.0.join(format!("redis-{port}.log"))).unwrap());
        if cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", &format!("nodes-{port}.conf")]);
        }
        let child = cmd.spawn().expect("redis-server (installed by scripts/test)");
        let server = RedisServer { port, child: Some(child), dir, cluster };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server vanishes with everything it held.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a server that hangs, then comes back as it was.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let signal = if paused { "-STOP" } else { "-CONT" };
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// A new, empty server on the same port.
    pub async fn restart(mut self) -> RedisServer {
        self.kill();
        let (port, dir, cluster) = (self.port, std::mem::replace(&mut self.dir, TempDir::new()), self.cluster);
        Self::spawn(port, dir, cluster).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::spawn(free_port(), TempDir::new(), true).await);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out =
                Command::new("redis-cli").args(["-p", &nodes[0].port.to_string(), "cluster", "info"]).output().unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never became ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        RedisCluster { nodes }
    }

    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}
