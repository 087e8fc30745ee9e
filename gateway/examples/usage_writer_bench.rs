//! How many usage rows per second the writer's batch statement puts into PostgreSQL (rows,
//! rollups and last_used_at together). Run by `bench/run`:
//! `usage_writer_bench DATABASE_URL [SECONDS] [BATCH]` prints one JSON line.

use std::time::{Duration, Instant};

use chrono::Utc;
use rust_decimal::Decimal;
use tollgate_gateway::usage::{insert, UsageRow};
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).ok_or_else(|| anyhow::anyhow!("usage: usage_writer_bench DATABASE_URL [SECONDS] [BATCH]"))?;
    let seconds: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let batch: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let db = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(url).await?;
    tollgate_core::MIGRATOR.run(&db).await?;
    tollgate_core::ensure_usage_partitions(&db).await?;
    // 50 keys x 4 models: rollup rows are shared across batches, as in production.
    let keys: Vec<(Uuid, Uuid)> = (0..50).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect();
    let team = tollgate_core::DEFAULT_TEAM_ID;
    let started = Instant::now();
    let mut rows_written = 0u64;
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let rows: Vec<UsageRow> = (0..batch)
            .map(|_| {
                n += 1;
                let (key, user) = keys[(n % 50) as usize];
                UsageRow {
                    request_id: Uuid::new_v4().to_string(),
                    created_at: Utc::now(),
                    key_id: key,
                    user_id: user,
                    team_id: team,
                    model_id: format!("bench-{}", n % 4),
                    subscription_id: None,
                    endpoint: "/v1/chat/completions".into(),
                    status: 200,
                    prompt_tokens: 12,
                    completion_tokens: 34,
                    cost: Decimal::new(80, 6),
                    latency_ms: 3,
                    ttfb_ms: Some(2),
                    stream: n.is_multiple_of(2),
                    error_kind: None,
                }
            })
            .collect();
        insert(&db, &rows).await?;
        rows_written += rows.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"rows\": {rows_written}, \"seconds\": {secs:.3}, \"rows_per_second\": {:.0}, \"batch\": {batch}}}",
        rows_written as f64 / secs
    );
    Ok(())
}
