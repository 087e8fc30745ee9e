//! Test harness: the control API served over real HTTP on port 0 against a fresh database (from
//! `#[sqlx::test]`) and the shared Redis, plus a JWKS endpoint and a LiteLLM stand-in.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, http::HeaderMap, routing::get, Router};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use tollgate_control_api::{
    config::{ControlApiConfig, JwtConfig, LitellmConfig},
    state::AppState,
};

pub const JWT_SECRET: &str = "test-hs256-secret-that-is-long-enough";
pub const LITELLM_KEY: &str = "sk-litellm-test";
pub const RS256_PEM: &[u8] = include_bytes!("../fixtures/jwt-rs256.pem");
pub const JWKS: &str = include_str!("../fixtures/jwks.json");
pub const MODEL_INFO: &str = include_str!("../fixtures/litellm/model-info.json");

pub fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// What the LiteLLM stand-in answers on `/model/info`: a status and a body.
pub type ModelInfoReply = Arc<Mutex<(u16, Value)>>;

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub db: PgPool,
    pub admin_key: String,
    pub model_info: ModelInfoReply,
    /// The control API's clock (tests move it across budget periods).
    pub clock: Arc<tollgate_control_api::standing::Clock>,
}

async fn serve_router(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

impl TestApp {
    pub async fn spawn(db: PgPool) -> Self {
        Self::spawn_with(db, |_| {}).await
    }

    /// [`TestApp::spawn`] with the configuration changed by `configure` first.
    pub async fn spawn_with(db: PgPool, configure: impl FnOnce(&mut ControlApiConfig)) -> Self {
        // The LiteLLM stand-in checks the credential the control API presents.
        let model_info: ModelInfoReply = Arc::new(Mutex::new((200, serde_json::from_str(MODEL_INFO).unwrap())));
        let litellm = Router::new()
            .route(
                "/model/info",
                get(|State(reply): State<ModelInfoReply>, headers: HeaderMap| async move {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if auth != Some(&format!("Bearer {LITELLM_KEY}")) {
                        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "auth"})));
                    }
                    let (status, body) = reply.lock().unwrap().clone();
                    (axum::http::StatusCode::from_u16(status).unwrap(), axum::Json(body))
                }),
            )
            .with_state(model_info.clone());
        let litellm_addr = serve_router(litellm).await;
        let jwks_addr = serve_router(
            Router::new().route("/jwks.json", get(|| async { ([("content-type", "application/json")], JWKS) })),
        )
        .await;

        let admin_key = tollgate_core::keys::generate_key();
        let defaults = ControlApiConfig::default();
        let mut config = ControlApiConfig {
            redis_url: redis_url(),
            admin_api_keys: vec![admin_key.clone()],
            jwt: JwtConfig {
                secret: Some(JWT_SECRET.into()),
                jwks_url: Some(format!("http://{jwks_addr}/jwks.json").parse().unwrap()),
                ..defaults.jwt
            },
            litellm: LitellmConfig {
                url: Some(format!("http://{litellm_addr}").parse().unwrap()),
                api_key: Some(LITELLM_KEY.into()),
                ..defaults.litellm
            },
            ..defaults
        };
        configure(&mut config);
        let state = AppState::new(&config, db.clone()).unwrap();
        let clock = state.clock.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(tollgate_control_api::serve(listener, state, std::future::pending()));
        TestApp { base: format!("http://{addr}"), http: reqwest::Client::new(), db, admin_key, model_info, clock }
    }

    /// A request to `path` with `token` as bearer, for tests that set more than [`TestApp::call`] does.
    pub fn request(&self, method: Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(token)
    }

    /// Sends a request with `token` as bearer (if any) and a JSON body (if any).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON response {status}: {text}"))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// POST as admin and expect success; returns the body.
    pub async fn admin_post(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.post(path, &self.admin_key.clone(), body).await;
        assert!(status.is_success(), "POST {path}: {status} {v}");
        v
    }

    pub async fn create_user(&self, email: &str) -> Value {
        self.admin_post("/api/v1/users", json!({"email": email, "name": "Test User"})).await
    }

    pub async fn create_model(&self, id: &str) -> Value {
        self.admin_post(
            "/api/v1/models",
            json!({"id": id, "input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}),
        )
        .await
    }

    pub async fn subscribe(&self, user_id: &str, model: &str) -> Value {
        self.admin_post("/api/v1/subscriptions", json!({"user_id": user_id, "model_id": model})).await
    }

    pub async fn create_key(&self, user_id: &str, models: &[&str]) -> Value {
        self.admin_post("/api/v1/keys", json!({"user_id": user_id, "name": "k", "models": models})).await
    }

    /// A user with an active subscription to a fresh model: `(user, model id)`.
    pub async fn subscribed_user(&self, email: &str, model: &str) -> (Value, String) {
        let user = self.create_user(email).await;
        self.create_model(model).await;
        self.subscribe(user["id"].as_str().unwrap(), model).await;
        (user, model.to_string())
    }

    /// The audit rows for one target, oldest first: `(action, actor)`.
    pub async fn audit_actions(&self, target_type: &str, target_id: &str) -> Vec<(String, String)> {
        sqlx::query_as("SELECT action, actor FROM audit_logs WHERE target_type = $1 AND target_id = $2 ORDER BY id")
            .bind(target_type)
            .bind(target_id)
            .fetch_all(&self.db)
            .await
            .unwrap()
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&self.db).await.unwrap()
    }
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An HS256 token signed with the configured secret.
pub fn hs256_token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// An RS256 token signed with the key published in the test JWKS under `kid`.
pub fn rs256_token(kid: &str, claims: Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_rsa_pem(RS256_PEM).unwrap()).unwrap()
}

/// A valid token for `sub` with the given roles claim and an email the issuer verified (so that it
/// links to a user an administrator created with that email).
pub fn user_token(sub: &str, email: &str, roles: &[&str]) -> String {
    hs256_token(json!({"sub": sub, "email": email, "email_verified": true, "roles": roles, "exp": now() + 600}))
}

pub fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}
