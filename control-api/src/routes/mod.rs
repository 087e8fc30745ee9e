//! One router per resource, merged under `/api/v1` by [`api_router`], plus the helpers every
//! write shares.

pub mod audit_log;
pub mod health;
pub mod keys;
pub mod models;
pub mod subscriptions;
pub mod teams;
pub mod usage;
pub mod users;

use axum::Router;
use sqlx::{Postgres, Transaction};
use tollgate_core::{invalidation::Invalidation, limits::Limits};

use crate::{
    error::{ApiError, ApiResult},
    state::AppState,
};

pub fn api_router() -> Router<AppState> {
    Router::new()
        .merge(users::router())
        .merge(teams::router())
        .merge(models::router())
        .merge(subscriptions::router())
        .merge(keys::router())
        .merge(usage::router())
        .merge(audit_log::router())
}

/// Commits a write, then tells every gateway what changed. Publishing happens strictly after the
/// commit so that a gateway reloading on the message reads the new state.
pub async fn commit_and_publish(
    state: &AppState,
    tx: Transaction<'static, Postgres>,
    messages: Vec<Invalidation>,
) -> ApiResult<()> {
    tx.commit().await?;
    let sent = state.events.publish(&messages).await;
    let failed = messages.len() - sent;
    state.metrics.invalidations.with_label_values(&["published"]).inc_by(sent as u64);
    state.metrics.invalidations.with_label_values(&["failed"]).inc_by(failed as u64);
    Ok(())
}

/// Validates optional limits, defaulting to none; errors name `field.<limit>`.
pub fn validate_limits(field: &str, limits: Option<Limits>) -> ApiResult<Limits> {
    let limits = limits.unwrap_or_default();
    limits.validate().map_err(|e| ApiError::from_field(field, e))?;
    Ok(limits)
}
