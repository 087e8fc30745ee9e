//! Audit trail: one audit_logs row per successful write, written in the write's own transaction
//! so that a write and its audit row commit or roll back together.

use serde::Serialize;
use serde_json::Value;
use sqlx::{FromRow, PgConnection};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Caller;

pub async fn record(
    conn: &mut PgConnection,
    caller: &Caller,
    action: &str,
    target_type: &str,
    target_id: impl ToString,
    details: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_logs (actor_id, actor, action, target_type, target_id, details, ip, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(caller.actor_id())
    .bind(caller.actor_label())
    .bind(action)
    .bind(target_type)
    .bind(target_id.to_string())
    .bind(details)
    .bind(&caller.ip)
    .bind(&caller.request_id)
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
