//! The scheduled model sync: at start and every `litellm.sync_interval_seconds`, one replica at a
//! time. A transaction-scoped PostgreSQL advisory lock keeps two replicas from syncing at once,
//! and a replica skips its turn when any sync (a replica's, or an admin's `POST /models/sync`)
//! ran less than half an interval ago, so N replicas still sync about once per interval. Each
//! run is counted in `model_sync_runs_total` and recorded in the audit trail by the actor
//! [`ACTOR`]: `model.sync` with what changed, or `model.sync_failed` with the error.

use std::time::Duration;

use serde_json::json;
use tokio::time::MissedTickBehavior;

use crate::{
    audit::{self, Change, Origin},
    auth::{Caller, Principal},
    routes::{models::run_sync, sync_runs},
    state::AppState,
};

/// The advisory lock's key: any value no other lock of the project's database uses ("tollsync").
const LOCK_KEY: i64 = 0x746f_6c6c_7379_6e63;
/// The actor the audit trail names for scheduled syncs.
pub const ACTOR: &str = "system:model-sync";

/// Runs forever: a sync attempt now and then every `interval`.
pub async fn run(state: AppState, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = attempt(&state, interval).await {
            tracing::warn!(error = %e, "scheduled model sync could not run");
        }
    }
}

/// One scheduled attempt. `Ok(false)`: skipped, another replica holds the lock or a sync ran
/// recently. A sync that fails (LiteLLM away) is `Ok(true)`: it ran, and says so in the trail.
pub async fn attempt(state: &AppState, interval: Duration) -> Result<bool, sqlx::Error> {
    let mut lock = state.db.begin().await?;
    let held: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(LOCK_KEY).fetch_one(&mut *lock).await?;
    if !held {
        return Ok(false);
    }
    let recent: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM audit_logs WHERE action IN ('model.sync', 'model.sync_failed')
                        AND created_at > clock_timestamp() - make_interval(secs => $1))",
    )
    .bind(interval.as_secs_f64() / 2.0)
    .fetch_one(&mut *lock)
    .await?;
    if recent {
        return Ok(false);
    }
    let caller = Caller { principal: Principal::AdminKey { label: ACTOR.into() }, origin: Origin::default() };
    let started = chrono::Utc::now();
    let result = run_sync(state, &caller).await;
    sync_runs::record(&state.db, sync_runs::Trigger::Scheduled, ACTOR, started, &result).await;
    let outcome = if result.is_ok() { "success" } else { "failure" };
    state.metrics.sync_runs.with_label_values(&[outcome]).inc();
    match result {
        Ok(report) => tracing::info!(
            created = report.created.len(),
            updated = report.updated.len(),
            unavailable = report.unavailable.len(),
            "models synced from LiteLLM"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "scheduled model sync failed");
            let change = Change::new("model.sync_failed", "model", "*", json!({"error": e.to_string()}));
            audit::record(&mut lock, &caller.actor(), change).await?;
        }
    }
    lock.commit().await?;
    Ok(true)
}
