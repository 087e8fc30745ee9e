//! The model sync at a glance: every sync, manual (`POST /models/sync`) or scheduled, leaves one
//! model_sync_runs row (when, who, the outcome, the models it created, updated, marked
//! unavailable or created disabled for want of a price, or its error), and
//! `GET /models/sync` answers the latest.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};
use utoipa::ToSchema;

use super::{models::SyncReport, prelude::*};

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `POST /models/sync`.
    Manual,
    /// The schedule (`litellm.sync_interval_seconds`).
    Scheduled,
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct SyncRun {
    pub id: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    #[schema(value_type = Trigger)]
    pub trigger: String,
    /// Who ran it: the administrator (as the audit trail names them) or `system:model-sync`.
    pub actor: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// Models the sync added.
    pub created: Vec<String>,
    /// Models it updated.
    pub updated: Vec<String>,
    /// Models LiteLLM no longer lists, marked unavailable.
    pub unavailable: Vec<String>,
    /// Of `created`, those created disabled because LiteLLM lacks a price.
    pub unpriced: Vec<String>,
    /// Why it failed (failures only); nothing changed then.
    pub error: Option<String>,
}

/// Records one run. A failure to record is logged, never the sync's failure.
pub async fn record(
    db: &PgPool,
    trigger: Trigger,
    actor: &str,
    started_at: DateTime<Utc>,
    result: &ApiResult<SyncReport>,
) {
    let trigger = match trigger {
        Trigger::Manual => "manual",
        Trigger::Scheduled => "scheduled",
    };
    let empty = SyncReport { created: vec![], updated: vec![], unavailable: vec![] };
    let (report, error) = match result {
        Ok(report) => (report, None),
        Err(e) => (&empty, Some(e.to_string())),
    };
    let recorded = sqlx::query(
        "INSERT INTO model_sync_runs (started_at, trigger, actor, outcome, created, updated, unavailable, unpriced, error)
         SELECT $1, $2, $3, $4, $5, $6, $7,
                ARRAY(SELECT id FROM models WHERE id = ANY($5) AND metadata->>'pricing' = 'missing' ORDER BY id), $8",
    )
    .bind(started_at)
    .bind(trigger)
    .bind(actor)
    .bind(if error.is_none() { "success" } else { "failure" })
    .bind(&report.created)
    .bind(&report.updated)
    .bind(&report.unavailable)
    .bind(error)
    .execute(db)
    .await;
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "could not record the model sync's report");
    }
}

/// The last model sync's report (manual or scheduled); 404 before any sync has run.
#[utoipa::path(get, path = "/api/v1/models/sync", tag = "models", responses((status = 200, body = SyncRun)))]
pub async fn sync_status(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<SyncRun>> {
    caller.authorize(&state.db, Op::ModelsSyncStatus, Target::NONE).await?;
    let run: Option<SyncRun> = sqlx::query_as(
        "SELECT id, started_at, finished_at, trigger, actor, outcome, created, updated, unavailable, unpriced, error
         FROM model_sync_runs ORDER BY finished_at DESC, id DESC LIMIT 1",
    )
    .fetch_optional(&state.db)
    .await?;
    run.map(Json).ok_or(ApiError::NotFound("model sync report"))
}
