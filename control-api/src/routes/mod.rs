//! One router per resource, merged under `/api/v1` by [`api_router`], plus the limits check the
//! resources share. Writes go through [`crate::write::Write`], lists through
//! [`crate::pagination::ListQuery`].

pub mod audit_log;
pub mod health;
pub mod keys;
pub mod models;
pub mod subscriptions;
pub mod teams;
pub mod usage;
pub mod users;

use axum::Router;
use tollgate_core::limits::Limits;

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

/// Validates optional limits, defaulting to none; errors name `field.<limit>`.
pub fn validate_limits(field: &str, limits: Option<Limits>) -> ApiResult<Limits> {
    let limits = limits.unwrap_or_default();
    limits.validate().map_err(|e| ApiError::from_field(field, e))?;
    Ok(limits)
}
