//! The audit trail, readable by administrators (read-only ones included).

use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::prelude::*;
use crate::audit::AuditEntry;

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
    /// The server's request id (the `x-request-id` it answered with).
    pub request_id: Option<String>,
    /// The `x-request-id` the client sent.
    pub client_request_id: Option<String>,
}

/// Audit entries, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(PageParams, AuditFilter),
    responses((status = 200, body = Page<AuditEntry>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<AuditFilter>,
) -> ApiResult<Page<AuditEntry>> {
    caller.authorize(&state.db, Op::Audit, Target::NONE).await?;
    let bounds = page.bounds()?;
    ListQuery::new(
        "SELECT id, created_at, actor_id, actor, action, target_type, target_id, details, ip, request_id,
                client_request_id, user_agent
         FROM audit_logs",
    )
    .filter("actor_id = $", filter.actor_id)
    .filter("action = $", filter.action)
    .filter("target_type = $", filter.target_type)
    .filter("target_id = $", filter.target_id)
    .filter("request_id = $", filter.request_id)
    .filter("client_request_id = $", filter.client_request_id)
    .page(&state.db, "id DESC", bounds)
    .await
}
