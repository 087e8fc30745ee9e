//! Recording: every proxied request becomes one usage row. Requests hand rows to a bounded
//! queue; the [`UsageWriter`] batches them into usage_logs with one multi-row INSERT and folds the
//! rows actually inserted into usage_daily and usage_hourly in the same statement, so a flush
//! touches each rollup row once and a replayed row is never counted twice. The rollups also keep
//! errors and a fixed-bucket latency histogram, so that reports give percentiles from them.
//! While PostgreSQL is unreachable (or the queue is full) rows go to the [`Spool`], replayed later.

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tollgate_core::latency;
use uuid::Uuid;

use crate::{context::RequestCtx, journal::Journal, meter::Usage, metrics::Metrics, outcome::ErrorKind, spool::Spool};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    pub key_id: Uuid,
    pub user_id: Uuid,
    pub team_id: Uuid,
    pub model_id: String,
    pub subscription_id: Option<Uuid>,
    pub endpoint: String,
    pub status: i16,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: Decimal,
    pub latency_ms: i32,
    pub ttfb_ms: Option<i32>,
    pub stream: bool,
    pub error_kind: Option<String>,
}

impl UsageRow {
    /// The row a finished request leaves: `None` when it never reached the upstream (refusals
    /// are counted in metrics, not billed). `errored`: the exchange ended in an error.
    ///
    /// A request the upstream worked on is never billed $0 for want of a usage report: a stream
    /// is estimated from its prompt and the text it carried; a JSON answer from its prompt and
    /// its size; a request whose client left before the answer was complete is billed its
    /// ceiling (the upstream did, or is doing, the work).
    pub fn for_request(ctx: &RequestCtx, errored: bool) -> Option<UsageRow> {
        let admitted = ctx.admitted.as_ref()?;
        ctx.upstream_sent?;
        let (auth, model, facts) = (&admitted.auth, &admitted.model, &admitted.facts);
        let ok = (200..300).contains(&ctx.status);
        let answered = ctx.ttfb_ms.is_some();
        let left_early = ctx.error_kind == Some(ErrorKind::ClientDisconnected);
        let estimate = |completion: u64| Usage {
            prompt_tokens: facts.estimated_prompt_tokens,
            completion_tokens: completion.min(admitted.ceiling.completion_tokens),
        };
        let (usage, error_kind) = match ctx.meter.reported() {
            Some(u) => (u, errored.then_some(ErrorKind::Interrupted)),
            None if !answered && left_early => (admitted.ceiling, Some(ErrorKind::ClientDisconnected)),
            None if answered && ok && facts.stream => (
                estimate(ctx.meter.estimated_completion_tokens()),
                Some(if errored { ErrorKind::Interrupted } else { ErrorKind::UsageMissing }),
            ),
            None if answered && ok && errored => (admitted.ceiling, Some(ErrorKind::Interrupted)),
            None if answered && ok => {
                (estimate(ctx.meter.estimated_completion_tokens()), Some(ErrorKind::UsageMissing))
            }
            None => (Usage::default(), Some(ctx.error_kind.unwrap_or(ErrorKind::UpstreamStatus))),
        };
        Some(UsageRow {
            request_id: ctx.request_id.clone(),
            created_at: ctx.started_at,
            key_id: auth.key_id,
            user_id: auth.user_id,
            team_id: auth.team_id,
            model_id: model.id.clone(),
            subscription_id: Some(admitted.subscription.id),
            endpoint: ctx.endpoint.clone(),
            status: ctx.status as i16,
            prompt_tokens: usage.prompt_tokens as i64,
            completion_tokens: usage.completion_tokens as i64,
            cost: model.cost(usage.prompt_tokens, usage.completion_tokens),
            latency_ms: ctx.elapsed_ms(),
            ttfb_ms: ctx.ttfb_ms,
            stream: facts.stream,
            error_kind: error_kind.map(|k| k.as_str().to_owned()),
        })
    }

    /// Whether the request's reservation is replaced by this row's usage (the upstream answered,
    /// or the client left while it worked), rather than given back (the upstream never answered).
    pub fn settles(&self) -> bool {
        self.ttfb_ms.is_some() || self.error_kind.as_deref() == Some(ErrorKind::ClientDisconnected.as_str())
    }
}

// Rows are nearly every message; boxing them would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Message {
    /// A row and its number in the journal (0: not journaled).
    Row(UsageRow, u64),
    /// Flush everything queued so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// The requests' side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<Message>,
    spool: Spool,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
}

impl UsageSink {
    /// Journals the row (so a process killed with it queued does not lose it), then queues it.
    pub fn record(&self, row: UsageRow) {
        let line = Journal::encode(&row);
        let (overflow, journaled) =
            self.journal.record(line.as_deref(), |n| match self.tx.try_send(Message::Row(row, n)) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(Message::Row(row, _)))
                | Err(mpsc::error::TrySendError::Closed(Message::Row(row, _))) => Some(row),
                Err(_) => None,
            });
        if !journaled {
            self.metrics.usage_journal_errors.inc();
        }
        match overflow {
            None => self.metrics.usage_queue_depth.inc(),
            // Never drop a row: a full queue or a stopped writer spills to disk.
            Some(row) => self.spool.append(vec![row]),
        }
    }

    /// Waits until every row recorded before this call is in PostgreSQL or the spool.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

pub struct UsageWriter {
    db: PgPool,
    rx: mpsc::Receiver<Message>,
    spool: Spool,
    journal: Arc<Journal>,
    /// The highest journal number among the rows taken from the queue.
    journaled: u64,
    metrics: Arc<Metrics>,
    batch_size: usize,
    interval: Duration,
    /// No replay before this (it backs off while PostgreSQL stays away).
    replay_after: Instant,
    replay_backoff: Duration,
}

/// Creates the sink requests use and the writer that drains it.
pub fn channel(
    db: PgPool,
    spool: Spool,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    capacity: usize,
    batch_size: usize,
    interval: Duration,
) -> (UsageSink, UsageWriter) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        UsageSink { tx, spool: spool.clone(), journal: journal.clone(), metrics: metrics.clone() },
        UsageWriter {
            db,
            rx,
            spool,
            journal,
            journaled: 0,
            metrics,
            batch_size: batch_size.max(1),
            interval,
            replay_after: Instant::now(),
            replay_backoff: MIN_REPLAY_BACKOFF,
        },
    )
}

impl UsageWriter {
    /// Runs until every sink is dropped, then flushes what is left. The writer wakes on its
    /// interval and drains the queue, rather than on every row: under load a per-row wake-up
    /// costs the request threads more than the write itself.
    pub async fn run(mut self) {
        let mut batch: Vec<UsageRow> = Vec::with_capacity(self.batch_size);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
            let closed = loop {
                match self.rx.try_recv() {
                    Ok(Message::Row(row, n)) => {
                        self.metrics.usage_queue_depth.dec();
                        self.journaled = self.journaled.max(n);
                        batch.push(row);
                        if batch.len() >= self.batch_size {
                            self.flush(&mut batch).await;
                        }
                    }
                    Ok(Message::Flush(done)) => waiting.push(done),
                    Err(mpsc::error::TryRecvError::Empty) => break false,
                    Err(mpsc::error::TryRecvError::Disconnected) => break true,
                }
            };
            let flushed = self.flush(&mut batch).await;
            if closed || !waiting.is_empty() {
                // Rows spooled by this flush are on disk before anyone is told.
                self.spool.sync().await;
            }
            for done in waiting {
                let _ = done.send(());
            }
            if closed {
                break;
            }
            if flushed {
                self.replay_spool().await;
            }
        }
    }

    /// Inserts the batch, or spools it; false when PostgreSQL refused. Either way the rows are
    /// then safe without the journal.
    async fn flush(&self, batch: &mut Vec<UsageRow>) -> bool {
        if batch.is_empty() {
            self.journal.done_through(self.journaled);
            return true;
        }
        let rows = std::mem::take(batch);
        match insert(&self.db, &rows).await {
            Ok(()) => {
                self.metrics.usage_rows_flushed.inc_by(rows.len() as u64);
                self.journal.done_through(self.journaled);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = rows.len(), "usage flush failed; spooling");
                self.spool.append(rows);
                // On disk (synced) before the journal lets them go.
                self.spool.sync().await;
                self.journal.done_through(self.journaled);
                false
            }
        }
    }

    /// Replays spooled segments, oldest first, each deleted once its rows are committed; stops at
    /// the first failure and backs off (1 s, doubling to 30 s) while PostgreSQL stays away.
    async fn replay_spool(&mut self) {
        if Instant::now() < self.replay_after {
            return;
        }
        while let Some(segment) = self.spool.next().await {
            let mut ok = true;
            for chunk in segment.rows.chunks(self.batch_size) {
                // A chunk inserted before a later one fails is skipped by the next replay's insert.
                if let Err(e) = insert(&self.db, chunk).await {
                    tracing::warn!(error = %e, "usage spool replay failed; retrying later");
                    ok = false;
                    break;
                }
            }
            if !ok {
                self.spool.failed(segment.path);
                self.replay_after = Instant::now() + self.replay_backoff;
                self.replay_backoff = (self.replay_backoff * 2).min(MAX_REPLAY_BACKOFF);
                return;
            }
            self.metrics.usage_rows_flushed.inc_by(segment.rows.len() as u64);
            self.metrics.usage_rows_replayed.inc_by(segment.rows.len() as u64);
            self.spool.committed(segment.path);
            self.replay_backoff = MIN_REPLAY_BACKOFF;
        }
    }
}

const MIN_REPLAY_BACKOFF: Duration = Duration::from_secs(1);
const MAX_REPLAY_BACKOFF: Duration = Duration::from_secs(30);

/// One statement: insert the rows (a replayed row is skipped by its key), then add the rows that
/// were inserted into the day and hour rollups, aggregated per rollup row.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[],
                         $7::uuid[], $8::text[], $9::smallint[], $10::bigint[], $11::bigint[], $12::numeric[],
                         $13::int[], $14::int[], $15::bool[], $16::text[])
        AS r(request_id, created_at, key_id, user_id, team_id, model_id, subscription_id, endpoint, status,
             prompt_tokens, completion_tokens, cost, latency_ms, ttfb_ms, stream, error_kind)
), ins AS (
    INSERT INTO usage_logs (request_id, created_at, key_id, user_id, team_id, model_id, subscription_id,
                            endpoint, status, prompt_tokens, completion_tokens, cost, latency_ms, ttfb_ms,
                            stream, error_kind)
    SELECT * FROM input
    ON CONFLICT (request_id, created_at) DO NOTHING
    RETURNING *
), daily AS ({daily}), hourly AS ({hourly}), used AS (
    UPDATE api_keys k SET last_used_at = u.at
    FROM (SELECT key_id, max(created_at) AS at FROM ins GROUP BY key_id) u
    WHERE k.id = u.key_id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM daily), (SELECT count(*) FROM hourly), (SELECT count(*) FROM used)
"#,
        daily = rollup("usage_daily", "day", "(created_at AT TIME ZONE 'UTC')::date"),
        hourly = rollup("usage_hourly", "hour", "date_trunc('hour', created_at)"),
    )
});

/// Adds the inserted rows (`ins`) to a rollup table keyed by `(bucket, key_id, model_id)`: counts,
/// tokens, cost, and each row's latency in the rollup's histogram (`latency_hist`, the buckets of
/// [`latency`], whose lower bounds are bound as `$17`).
fn rollup(table: &str, bucket: &str, bucket_expr: &str) -> String {
    format!(
        "INSERT INTO {table} AS t ({bucket}, key_id, model_id, user_id, team_id, subscription_id, requests, errors,
                             prompt_tokens, completion_tokens, cost, latency_hist)
    SELECT {bucket_expr}, key_id, model_id,
           (array_agg(user_id))[1], (array_agg(team_id))[1], (array_agg(subscription_id))[1],
           count(*), count(*) FILTER (WHERE status >= 400), sum(prompt_tokens), sum(completion_tokens), sum(cost),
           tollgate_hist_of(array_agg(width_bucket(GREATEST(latency_ms, 0)::bigint, $17::bigint[])), {buckets})
    FROM ins GROUP BY 1, 2, 3
    ON CONFLICT ({bucket}, key_id, model_id) DO UPDATE SET
        requests = t.requests + EXCLUDED.requests, errors = t.errors + EXCLUDED.errors,
        prompt_tokens = t.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = t.completion_tokens + EXCLUDED.completion_tokens, cost = t.cost + EXCLUDED.cost,
        latency_hist = tollgate_hist_add(t.latency_hist, EXCLUDED.latency_hist)
    RETURNING 1",
        buckets = latency::BUCKETS,
    )
}

pub async fn insert(db: &PgPool, rows: &[UsageRow]) -> Result<(), sqlx::Error> {
    macro_rules! col {
        ($f:ident) => {
            rows.iter().map(|r| r.$f.clone()).collect::<Vec<_>>()
        };
    }
    sqlx::query(&INSERT)
        .bind(col!(request_id))
        .bind(col!(created_at))
        .bind(col!(key_id))
        .bind(col!(user_id))
        .bind(col!(team_id))
        .bind(col!(model_id))
        .bind(col!(subscription_id))
        .bind(col!(endpoint))
        .bind(col!(status))
        .bind(col!(prompt_tokens))
        .bind(col!(completion_tokens))
        .bind(col!(cost))
        .bind(col!(latency_ms))
        .bind(col!(ttfb_ms))
        .bind(col!(stream))
        .bind(col!(error_kind))
        .bind(&latency::LATENCY_BOUNDS_MS[..])
        .execute(db)
        .await?;
    Ok(())
}
