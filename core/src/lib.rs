//! tollgate-core: what the gateway and the control API must agree on — the key format and its
//! hashing, the limits type and its validation, layered configuration loading, the invalidation
//! message and its Redis channel, and the well-known identifiers of the schema.

pub mod config;
pub mod invalidation;
pub mod keys;
pub mod latency;
pub mod limiter;
pub mod limits;
pub mod net;
pub mod roles;
pub mod sync;

use uuid::Uuid;

/// The Default Team every new user joins (created by the first migration).
pub const DEFAULT_TEAM_ID: Uuid = Uuid::from_u128(0xa0000000_0000_4000_8000_000000000001);

/// The sqlx migrations both binaries apply.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Creates usage_logs partitions for this month and the next two (idempotent). Both binaries call
/// it at start and daily, so rows land in their month's partition rather than the default one.
pub async fn ensure_usage_partitions(db: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT tollgate_ensure_usage_partitions(now(), 3)").execute(db).await?;
    Ok(())
}
