//! The audit trail, readable by administrators (read-only ones included): a page of JSON, or
//! every matching entry as streamed CSV.

use axum::{http::HeaderMap, response::IntoResponse, response::Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::{
    prelude::*,
    usage::{parse_time, ReportTime},
};
use crate::{
    audit::AuditEntry,
    csv::{self, Format},
    pagination::MAX_LIMIT,
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
    /// The server's request id (the `x-request-id` it answered with).
    pub request_id: Option<String>,
    /// The `x-request-id` the client sent.
    pub client_request_id: Option<String>,
    /// Entries at or after this time: `YYYY-MM-DD` (midnight UTC) or RFC 3339.
    #[param(value_type = Option<ReportTime>)]
    pub from: Option<String>,
    /// Entries before this time (exclusive), not before `from`.
    #[param(value_type = Option<ReportTime>)]
    pub to: Option<String>,
    /// `csv`: every matching entry (or the page `limit`/`offset` name, when given) as CSV; also
    /// chosen by `Accept: text/csv` when `format` is absent.
    pub format: Option<Format>,
}

/// `[from, to)`, either end open.
type Range = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// The time range of a filter, checked: 422 naming the field when malformed, out of range or
/// `from` after `to`.
fn range(filter: &AuditFilter) -> ApiResult<Range> {
    // A malformed time is a 400 naming it, as in usage reports; a range that cannot be, 422.
    let from = filter.from.as_deref().map(|v| parse_time("from", v)).transpose()?;
    let to = filter.to.as_deref().map(|v| parse_time("to", v)).transpose()?;
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return Err(ApiError::invalid("from", "must not be after `to`"));
        }
    }
    Ok((from, to))
}

const SELECT: &str = "SELECT id, created_at, actor_id, actor, action, target_type, target_id, details, ip, request_id,
                client_request_id, user_agent
         FROM audit_logs";

/// The list's query with `filter`'s conditions (and, for the pages of an export, entries before
/// `before`).
fn query(filter: &AuditFilter, (from, to): Range, before: Option<i64>) -> ListQuery<'static> {
    ListQuery::new(SELECT)
        .filter("actor_id = $", filter.actor_id)
        .filter("action = $", filter.action.clone())
        .filter("target_type = $", filter.target_type.clone())
        .filter("target_id = $", filter.target_id.clone())
        .filter("request_id = $", filter.request_id.clone())
        .filter("client_request_id = $", filter.client_request_id.clone())
        .filter("created_at >= $", from)
        .filter("created_at < $", to)
        .filter("id < $", before)
}

/// Audit entries, newest first; CSV with `format=csv` or `Accept: text/csv`.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(PageParams, AuditFilter),
    responses((status = 200, description = "A page of entries, or CSV", content(
        (Page<AuditEntry> = "application/json"),
        (String = "text/csv"),
    ))))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(page): Query<PageParams>,
    Query(filter): Query<AuditFilter>,
) -> ApiResult<Response> {
    caller.authorize(&state.db, Op::Audit, Target::NONE).await?;
    let bounds = page.bounds()?;
    let times = range(&filter)?;
    if !csv::wanted(filter.format, &headers) {
        let page: Page<AuditEntry> = query(&filter, times, None).page(&state.db, "id DESC", bounds).await?;
        return Ok(page.into_response());
    }
    // Pages of the export: keyset by id (newest first), from `offset`, up to `limit` when given.
    let db = state.db.clone();
    let wanted = page.limit;
    csv::stream("audit.csv", move |mut w| async move {
        const HEADER: [&str; 12] = [
            "id",
            "created_at",
            "actor_id",
            "actor",
            "action",
            "target_type",
            "target_id",
            "details",
            "ip",
            "request_id",
            "client_request_id",
            "user_agent",
        ];
        if w.line(&HEADER).await.is_err() {
            return;
        }
        let (mut before, mut offset, mut left) = (None, bounds.1, wanted.unwrap_or(i64::MAX));
        while left > 0 {
            let size = left.min(MAX_LIMIT);
            let rows: Vec<AuditEntry> = match query(&filter, times, before).rows(&db, "id DESC", size, offset).await {
                Ok(rows) => rows,
                Err(e) => return w.fail(e).await,
            };
            for e in &rows {
                let opt = |v: &Option<String>| v.clone().unwrap_or_default();
                let line = [
                    e.id.to_string(),
                    e.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    e.actor_id.map(|a| a.to_string()).unwrap_or_default(),
                    e.actor.clone(),
                    e.action.clone(),
                    e.target_type.clone(),
                    e.target_id.clone(),
                    e.details.to_string(),
                    opt(&e.ip),
                    opt(&e.request_id),
                    opt(&e.client_request_id),
                    opt(&e.user_agent),
                ];
                if w.line(&line).await.is_err() {
                    return;
                }
            }
            let fetched = rows.len() as i64;
            left -= fetched;
            if fetched < size {
                break;
            }
            before = rows.last().map(|e| e.id);
            offset = 0;
        }
        w.finish().await;
    })
    .await
}
