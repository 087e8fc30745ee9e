//! Where a scope stands against its limits in the current period: the budget (spent, reserved,
//! remaining) and the RPM/TPM windows, read from Redis (the limiter's own counters, the truth the
//! gateway enforces) or, when Redis is unreachable or does not hold the period, from
//! PostgreSQL's rollups plus the period's adjustments. Also the clock the control API reads
//! periods by (offset in tests, to cross a period boundary) and the Redis connection both use.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        LazyLock,
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, NaiveTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tollgate_core::{
    limiter::{period_id, period_start, pg_spent_nanos, RedisConn, Scope, ScopeKind},
    limits::{BudgetPeriod, Limits},
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiResult;

/// The control API's clock: the system's, moved by an offset that tests set to cross period
/// boundaries. Redis readings take the same offset on top of Redis TIME.
#[derive(Debug, Default)]
pub struct Clock {
    offset_secs: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::seconds(self.offset_secs())
    }

    pub fn offset_secs(&self) -> i64 {
        self.offset_secs.load(Ordering::Relaxed)
    }

    /// Moves the clock `secs` away from the system's (tests only).
    pub fn set_offset_secs(&self, secs: i64) {
        self.offset_secs.store(secs, Ordering::Relaxed);
    }
}

/// How long one Redis call may take before the standing falls back to PostgreSQL.
const REDIS_TIMEOUT: Duration = Duration::from_millis(300);
/// After a failed connect, Redis is not tried again for this long.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

static STANDING_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("standing.lua")));
static ADJUST_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("adjust.lua")));

/// The limiter's Redis (one node or a cluster, as `TOLLGATE_REDIS_URL` says), connected on first
/// use, every call bounded by a short timeout.
pub struct LimiterRedis {
    url: String,
    conn: Mutex<Option<RedisConn>>,
    failed_at: std::sync::Mutex<Option<Instant>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisUnavailable {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
    #[error("redis was unreachable moments ago")]
    Resting,
}

async fn bounded<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, RedisUnavailable> {
    match tokio::time::timeout(REDIS_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RedisUnavailable::Timeout),
    }
}

impl LimiterRedis {
    pub fn new(url: &str) -> Self {
        Self { url: url.to_string(), conn: Mutex::new(None), failed_at: std::sync::Mutex::new(None) }
    }

    async fn connection(&self) -> Result<RedisConn, RedisUnavailable> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let resting = |at: &Option<Instant>| at.is_some_and(|t| t.elapsed() < RECONNECT_AFTER);
        if resting(&self.failed_at.lock().unwrap_or_else(|e| e.into_inner())) {
            return Err(RedisUnavailable::Resting);
        }
        let connect = RedisConn::connect(&self.url, REDIS_TIMEOUT);
        let result = match tokio::time::timeout(REDIS_TIMEOUT * 4, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(RedisUnavailable::Redis(e)),
            Err(_) => Err(RedisUnavailable::Timeout),
        };
        match result {
            Ok(conn) => {
                *slot = Some(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                Err(e)
            }
        }
    }

    /// Redis TIME, in whole seconds.
    pub async fn time(&self) -> Result<i64, RedisUnavailable> {
        let mut conn = self.connection().await?;
        let (secs, _micros): (i64, i64) = bounded(redis::cmd("TIME").query_async(&mut conn)).await?;
        Ok(secs)
    }

    /// What Redis holds for `scope` in budget period `period` at second `now`.
    async fn read(&self, scope: &Scope, period: &str, now: i64) -> Result<RedisView, RedisUnavailable> {
        let mut conn = self.connection().await?;
        let prefix = scope.redis_prefix();
        let mut inv = STANDING_SCRIPT.prepare_invoke();
        for suffix in [format!(":nb:{period}"), ":nres".into(), ":nlease".into(), ":rpm".into(), ":tpm".into()] {
            inv.key(format!("{prefix}{suffix}"));
        }
        inv.arg(now);
        let (spent, reserved, rpm, tpm): (Option<String>, i64, i64, i64) = bounded(inv.invoke_async(&mut conn)).await?;
        let spent = spent.and_then(|s| s.parse::<i64>().ok());
        Ok(RedisView { spent, reserved, rpm, tpm })
    }

    /// Applies a committed adjustment of `amount_nanos` to `scope`'s budget period `period`, if
    /// Redis holds it; `before` is Redis TIME read before the adjustment was committed.
    pub async fn adjust(
        &self,
        scope: &Scope,
        period: &str,
        amount_nanos: i64,
        before: i64,
    ) -> Result<Applied, RedisUnavailable> {
        let mut conn = self.connection().await?;
        let budget_key = format!("{}:nb:{period}", scope.redis_prefix());
        let mut inv = ADJUST_SCRIPT.prepare_invoke();
        inv.key(&budget_key).key(format!("{budget_key}:seeded")).arg(amount_nanos).arg(before);
        let outcome: i64 = bounded(inv.invoke_async(&mut conn)).await?;
        Ok(match outcome {
            1 => Applied::Added,
            2 => Applied::Reseed,
            _ => Applied::NotHeld,
        })
    }

    /// Drops `scope`'s budget period `period` from Redis: the next request seeds it again from
    /// PostgreSQL, adjustments included.
    pub async fn drop_period(&self, scope: &Scope, period: &str) -> Result<(), RedisUnavailable> {
        let mut conn = self.connection().await?;
        let budget_key = format!("{}:nb:{period}", scope.redis_prefix());
        let mut del = redis::cmd("DEL");
        del.arg(&budget_key).arg(format!("{budget_key}:seeded"));
        bounded(del.query_async::<i64>(&mut conn)).await?;
        Ok(())
    }
}

/// What became of an adjustment in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// Added to the period's spend in Redis.
    Added,
    /// Redis does not hold the period: its next seed from PostgreSQL counts the adjustment.
    NotHeld,
    /// The period was dropped from Redis, to be seeded again with the adjustment counted (it was
    /// seeded while the adjustment was being committed, or Redis could not be told at once).
    Reseed,
}

struct RedisView {
    spent: Option<i64>,
    reserved: i64,
    rpm: i64,
    tpm: i64,
}

/// Where the figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The limiter's counters in Redis: what the gateway enforces.
    Redis,
    /// PostgreSQL's rollups and adjustments: Redis was unreachable or did not hold the period.
    Postgres,
}

/// The kinds of scope that carry limits (the OpenAPI name of core's `ScopeKind`).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScopeName {
    Key,
    User,
    Team,
    Subscription,
}

/// A limit and how much of it the current 60 s window holds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Window {
    /// The limit (none: not limited).
    pub limit: Option<i64>,
    /// Requests or tokens in the last 60 s (reserved, then settled); null when there is no limit
    /// (the gateway counts no window then) or Redis, which alone holds windows, is unreachable.
    pub used: Option<i64>,
}

/// One scope's standing in its current budget period.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Standing {
    #[schema(value_type = ScopeName)]
    pub scope: ScopeKind,
    pub id: Uuid,
    /// The limits the gateway enforces on the scope.
    pub limits: Limits,
    /// The limiter's name of the current period: `d20261206` (daily), `w20261130` (the ISO week
    /// starting that Monday), `m202612` (monthly) or `all` (`budget_period: none`).
    pub period: String,
    /// When the period began (UTC); null for `all`.
    pub period_start: Option<DateTime<Utc>>,
    /// When the next period begins and spend starts again from zero; null for `all`.
    pub resets_at: Option<DateTime<Utc>>,
    /// USD per period; null when the scope has no budget (then `spent`, `reserved` and
    /// `remaining` are null too).
    #[schema(value_type = Option<f64>)]
    pub max_budget: Option<Decimal>,
    /// USD settled this period, adjustments included (a credit can make it negative), rounded to
    /// the micro-USD.
    #[schema(value_type = Option<f64>)]
    pub spent: Option<Decimal>,
    /// USD held by requests in flight (0 when read from PostgreSQL, which does not know them).
    #[schema(value_type = Option<f64>)]
    pub reserved: Option<Decimal>,
    /// `max_budget - spent - reserved`, never below 0.
    #[schema(value_type = Option<f64>)]
    pub remaining: Option<Decimal>,
    pub rpm: Window,
    pub tpm: Window,
    pub source: Source,
    /// The time the standing was read at (Redis TIME when read from Redis).
    pub as_of: DateTime<Utc>,
}

/// USD from nano-USD, rounded to the micro-USD (half to even) like the API's other money.
pub fn usd(nanos: i64) -> Decimal {
    Decimal::new(nanos, 9).round_dp(6).normalize()
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_time(NaiveTime::MIN))
}

/// The first day of the period after the one starting on `start`; `None` for `none`.
fn next_period(kind: BudgetPeriod, start: NaiveDate) -> Option<NaiveDate> {
    match kind {
        BudgetPeriod::None => None,
        BudgetPeriod::Daily => start.checked_add_days(Days::new(1)),
        BudgetPeriod::Weekly => start.checked_add_days(Days::new(7)),
        BudgetPeriod::Monthly => start.with_day(1)?.checked_add_months(Months::new(1)),
    }
}

/// The current period of `limits` at `now`: its id, first day, and the first day of the next.
pub fn current_period(limits: &Limits, now: DateTime<Utc>) -> (String, Option<NaiveDate>, Option<NaiveDate>) {
    let id = period_id(limits.budget_period, now);
    if limits.budget_period == BudgetPeriod::None {
        return (id, None, None);
    }
    let start = period_start(&id);
    let next = start.and_then(|s| next_period(limits.budget_period, s));
    (id, start, next)
}

/// The standings of `scopes`, read together: one Redis TIME, then each scope from Redis, or from
/// PostgreSQL where Redis cannot answer.
pub async fn standings(db: &PgPool, redis: &LimiterRedis, clock: &Clock, scopes: &[Scope]) -> ApiResult<Vec<Standing>> {
    let redis_now = match redis.time().await {
        Ok(secs) => Some(secs + clock.offset_secs()),
        Err(e) => {
            tracing::debug!(error = %e, "standing: redis unavailable, reading PostgreSQL");
            None
        }
    };
    let each = scopes.iter().map(|scope| standing(db, redis, clock, scope, redis_now));
    futures::future::join_all(each).await.into_iter().collect()
}

async fn standing(
    db: &PgPool,
    redis: &LimiterRedis,
    clock: &Clock,
    scope: &Scope,
    redis_now: Option<i64>,
) -> ApiResult<Standing> {
    let now = redis_now.and_then(|s| DateTime::from_timestamp(s, 0)).unwrap_or_else(|| clock.now());
    let limits = &scope.limits;
    let (period, start, next) = current_period(limits, now);
    let view = match redis_now {
        Some(secs) => match redis.read(scope, &period, secs).await {
            Ok(view) => Some(view),
            Err(e) => {
                tracing::debug!(error = %e, "standing: redis read failed, reading PostgreSQL");
                None
            }
        },
        None => None,
    };
    let budget = limits.max_budget_nanos();
    let mut source = if view.is_some() { Source::Redis } else { Source::Postgres };
    let (mut spent, mut reserved, mut remaining) = (None, None, None);
    if let Some(budget) = budget {
        let held = view.as_ref().map(|v| v.reserved).unwrap_or(0);
        let settled = match view.as_ref().and_then(|v| v.spent) {
            Some(s) => s,
            None => {
                source = Source::Postgres;
                // `all` counts from 1970-01-01, as the gateway's seed does.
                pg_spent_nanos(db, scope, &period, start.unwrap_or_default(), next).await?
            }
        };
        spent = Some(usd(settled));
        reserved = Some(usd(held));
        remaining = Some(usd(budget.saturating_sub(settled).saturating_sub(held).max(0)));
    }
    let window = |limit: Option<i64>, used: Option<i64>| Window { limit, used: limit.and(used) };
    Ok(Standing {
        scope: scope.kind,
        id: scope.id,
        limits: limits.clone(),
        period,
        period_start: start.map(midnight),
        resets_at: next.map(midnight),
        max_budget: budget.map(usd),
        spent,
        reserved,
        remaining,
        rpm: window(limits.rpm, view.as_ref().map(|v| v.rpm)),
        tpm: window(limits.tpm, view.as_ref().map(|v| v.tpm)),
        source,
        as_of: now,
    })
}
