//! The admin listener (TOLLGATE_ADMIN_LISTEN): `/metrics`, `/health` and `/ready`.

use std::{sync::Arc, time::Duration};

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::{json, Value};

use crate::state::GatewayState;

pub fn router(state: Arc<GatewayState>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<GatewayState>>| async move {
                s.metrics.key_cache_entries.set(s.keys.len() as i64);
                s.metrics.auth_throttle_addresses.set(s.auth_failures.len() as i64);
                s.limiter.count_redis_use(&s.metrics);
                ([("content-type", "text/plain; version=0.0.4")], s.metrics.render())
            }),
        )
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .with_state(state)
}

/// Ready when keys can be checked (PostgreSQL answers, or keys are cached), an upstream is set,
/// and, under `fail_closed`, the limiter reaches Redis.
async fn ready(State(s): State<Arc<GatewayState>>) -> (StatusCode, Json<Value>) {
    let postgres =
        matches!(tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&s.db)).await, Ok(Ok(_)));
    let cached_keys = s.keys.len();
    let upstream = s.config.upstream_url.host_str().is_some();
    let limiter = s.limiter.limiter.primary().is_some() && !s.limiter.limiter.fallback_active();
    let ok = (postgres || cached_keys > 0) && upstream && (limiter || !s.config.fail_closed);
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        Json(json!({"status": if ok { "ready" } else { "not_ready" }, "postgres": postgres,
        "cached_keys": cached_keys, "upstream": upstream, "limiter": limiter})),
    )
}
