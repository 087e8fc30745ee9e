//! Liveness and readiness. Ready means PostgreSQL answers and Redis answers (without Redis the
//! gateways would miss invalidations).

use std::time::Duration;

use axum::{extract::State, http::StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    pub postgres: bool,
    pub redis: bool,
}

/// The process is up.
#[utoipa::path(get, path = "/health", tag = "health", security(()), responses((status = 200, body = Health)))]
pub async fn health() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

/// PostgreSQL and Redis both answer (503 otherwise).
#[utoipa::path(get, path = "/ready", tag = "health", security(()),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, axum::Json<Readiness>) {
    let db = async {
        matches!(
            tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&state.db)).await,
            Ok(Ok(_))
        )
    };
    let (postgres, redis) = tokio::join!(db, state.events.ping());
    let ok = postgres && redis;
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(Readiness { status: if ok { "ready" } else { "not_ready" }, postgres, redis }))
}
