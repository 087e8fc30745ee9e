//! The audit trail, readable by administrators (read-only ones included).

use axum::{extract::State, routing::get, Router};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::{
    audit::AuditEntry,
    auth::Caller,
    error::ApiResult,
    extract::Query,
    pagination::{Page, PageParams},
    state::AppState,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/audit", get(list))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditFilter {
    pub actor_id: Option<Uuid>,
    /// e.g. `key.create`, `subscription.cancel`.
    pub action: Option<String>,
    /// user, team, model, subscription or key.
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub request_id: Option<String>,
}

/// Audit entries, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(PageParams, AuditFilter),
    responses((status = 200, body = Page<AuditEntry>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<AuditFilter>,
) -> ApiResult<axum::Json<Page<AuditEntry>>> {
    caller.require_reader()?;
    let bounds = page.bounds()?;
    let rows = sqlx::query_as(
        "SELECT id, created_at, actor_id, actor, action, target_type, target_id, details, ip, request_id
         FROM audit_logs
         WHERE ($1::uuid IS NULL OR actor_id = $1) AND ($2::text IS NULL OR action = $2)
           AND ($3::text IS NULL OR target_type = $3) AND ($4::text IS NULL OR target_id = $4)
           AND ($5::text IS NULL OR request_id = $5)
         ORDER BY id DESC LIMIT $6 OFFSET $7",
    )
    .bind(filter.actor_id)
    .bind(filter.action)
    .bind(filter.target_type)
    .bind(filter.target_id)
    .bind(filter.request_id)
    .bind(bounds.0 + 1)
    .bind(bounds.1)
    .fetch_all(&state.db)
    .await?;
    Ok(axum::Json(Page::from_rows(rows, bounds)))
}
