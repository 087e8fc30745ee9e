//! One router per resource, merged under `/api/v1` by [`api_router`], plus the limits check the
//! resources share and [`find_by_id`]. Writes go through [`crate::write::Write`], lists through
//! [`crate::pagination::ListQuery`].

pub mod audit_log;
pub mod budgets;
pub mod events;
pub mod health;
pub mod keys;
pub mod models;
mod prelude;
pub mod subscriptions;
pub mod sync_runs;
pub mod teams;
pub mod usage;
pub mod users;

use axum::Router;
use sqlx::{postgres::PgRow, Encode, FromRow, PgPool, Postgres, Type};
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
        .merge(events::router())
        .merge(budgets::router())
}

/// Validates optional limits, defaulting to none; errors name `field.<limit>`.
pub fn validate_limits(field: &str, limits: Option<Limits>) -> ApiResult<Limits> {
    let limits = limits.unwrap_or_default();
    limits.validate().map_err(|e| ApiError::from_field(field, e))?;
    Ok(limits)
}

/// The row `select` (a `SELECT ... FROM <table>`) reads for `id`, or 404 naming `what`.
pub async fn find_by_id<T, I>(db: &PgPool, select: &str, id: I, what: &'static str) -> ApiResult<T>
where
    T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    I: for<'q> Encode<'q, Postgres> + Type<Postgres> + Send + 'static,
{
    sqlx::query_as(&format!("{select} WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or(ApiError::NotFound(what))
}
