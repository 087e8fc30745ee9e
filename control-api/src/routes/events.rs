//! `GET /events`: the budget events of the outbox with their delivery state, for administrators
//! (read-only ones included). See alerts.rs (how events are made) and webhooks.rs (delivery).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::prelude::*;

pub fn router() -> Router<AppState> {
    Router::new().route("/events", get(list))
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
pub enum EventType {
    #[serde(rename = "budget.threshold")]
    BudgetThreshold,
    #[serde(rename = "limit.exceeded")]
    LimitExceeded,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::BudgetThreshold => "budget.threshold",
            EventType::LimitExceeded => "limit.exceeded",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Not delivered yet: waiting for its next attempt (or for a webhook URL).
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Still not delivered 24 hours after the event: no more attempts.
    Failed,
}

impl EventStatus {
    fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Delivered => "delivered",
            EventStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventScope {
    Key,
    User,
    Team,
    Subscription,
}

impl EventScope {
    fn as_str(self) -> &'static str {
        match self {
            EventScope::Key => "key",
            EventScope::User => "user",
            EventScope::Team => "team",
            EventScope::Subscription => "subscription",
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventFilter {
    #[serde(rename = "type")]
    #[param(rename = "type", inline)]
    pub kind: Option<EventType>,
    #[param(inline)]
    pub status: Option<EventStatus>,
    #[param(inline)]
    pub scope: Option<EventScope>,
    /// The key, user, team or subscription the events are about.
    pub scope_id: Option<Uuid>,
    /// Events that occurred at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Events that occurred before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
}

/// One event: what the webhook receives, and its delivery state.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct EventEntry {
    /// Unique per event; a receiver deduplicates deliveries by it.
    pub event_id: Uuid,
    /// `budget.threshold` or `limit.exceeded`.
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    /// `key`, `user`, `team` or `subscription`.
    pub scope: String,
    /// The scope's id.
    pub id: Uuid,
    /// The fraction of max_budget reached (1 for limit.exceeded).
    #[schema(value_type = f64)]
    pub threshold: Decimal,
    /// USD spent in the period when the event was detected.
    #[schema(value_type = f64)]
    pub spent: Decimal,
    /// USD.
    #[schema(value_type = f64)]
    pub max_budget: Decimal,
    /// The budget period as the limiter names it: `d20261206`, `w20261130`, `m202612` or `all`.
    pub period: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// Why the latest attempt failed.
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When a pending event is attempted next (at the earliest).
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// Budget events, newest first, with their webhook delivery state.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(PageParams, EventFilter),
    responses((status = 200, body = Page<EventEntry>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<EventFilter>,
) -> ApiResult<Page<EventEntry>> {
    caller.authorize(&state.db, Op::Events, Target::NONE).await?;
    let bounds = page.bounds()?;
    if let (Some(from), Some(to)) = (filter.from, filter.to) {
        if from >= to {
            return Err(ApiError::invalid("from", "must be before `to`"));
        }
    }
    ListQuery::new(
        "SELECT id AS event_id, type, occurred_at, scope, scope_id AS id, threshold, spent, max_budget, period,
                status, attempts, last_error, last_attempt_at,
                CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at, delivered_at
         FROM events",
    )
    .filter("type = $", filter.kind.map(EventType::as_str))
    .filter("status = $", filter.status.map(EventStatus::as_str))
    .filter("scope = $", filter.scope.map(EventScope::as_str))
    .filter("scope_id = $", filter.scope_id)
    .filter("occurred_at >= $", filter.from)
    .filter("occurred_at < $", filter.to)
    .page(&state.db, "occurred_at DESC, id", bounds)
    .await
}
