//! Audit trail: one audit_logs row per successful write, written in the write's own transaction
//! so that a write and its audit row commit or roll back together. [`record`] is the only writer
//! of that table, so every row carries the same facts: who, from which request and address, what.

use serde::Serialize;
use serde_json::Value;
use sqlx::{FromRow, PgConnection};
use utoipa::ToSchema;
use uuid::Uuid;

/// The request a change came in with, as far as the audit trail cares.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The `x-request-id` the request carried or was given.
    pub request_id: Option<String>,
    /// The client's address: the first `X-Forwarded-For` hop, else the peer.
    pub ip: Option<String>,
}

/// Who made a change, and from where.
#[derive(Debug, Clone)]
pub struct Actor<'a> {
    /// The user, when the actor is one (admin API keys are not users).
    pub id: Option<Uuid>,
    /// How the actor reads in the trail, e.g. `user:ada@example.com` or `admin-key:1a2b3c4d`.
    pub label: String,
    pub origin: &'a Origin,
}

/// What changed: an action such as `key.create`, its target, and the details worth keeping.
#[derive(Debug, Clone)]
pub struct Change {
    pub action: String,
    pub target_type: &'static str,
    pub target_id: String,
    pub details: Value,
}

impl Change {
    pub fn new(action: impl Into<String>, target_type: &'static str, target_id: impl ToString, details: Value) -> Self {
        Self { action: action.into(), target_type, target_id: target_id.to_string(), details }
    }
}

pub async fn record(conn: &mut PgConnection, actor: &Actor<'_>, change: Change) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_logs (actor_id, actor, action, target_type, target_id, details, ip, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(actor.id)
    .bind(&actor.label)
    .bind(change.action)
    .bind(change.target_type)
    .bind(change.target_id)
    .bind(change.details)
    .bind(&actor.origin.ip)
    .bind(&actor.origin.request_id)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub actor_id: Option<Uuid>,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub details: Value,
    pub ip: Option<String>,
    pub request_id: Option<String>,
}
