//! Rate limits and budgets: the [`Limiter`] trait the gateway reserves and settles through, its
//! Redis implementation ([`RedisLimiter`], one Lua script per scope in `scope.lua`), and the
//! types both speak.
//!
//! A request names up to four scopes (key, user, team, subscription), each only if it has limits.
//! Reserving takes one request against RPM, the estimated tokens against TPM and the estimated
//! maximum cost against the budget, in every scope, in one pipelined round trip; if any scope
//! refuses, the others are refunded. Settling replaces the reservation with the real amounts.

mod fallback;
mod lease;
mod redis_limiter;
mod resilient;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Duration as Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::limits::{BudgetPeriod, Enforcement, Limits};

pub use fallback::{FallbackLimiter, LastKnown, Observations, ScopeSync};
pub use lease::{LeaseBook, LeaseStats, Plan, Return};
pub use redis_limiter::{take_round_trips, Op, RedisConn, RedisLimiter, ScopeReply, Status, Windows, SCOPE_SCRIPT};
pub use resilient::ResilientLimiter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    Key,
    User,
    Team,
    Subscription,
}

impl ScopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Key => "key",
            ScopeKind::User => "user",
            ScopeKind::Team => "team",
            ScopeKind::Subscription => "subscription",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    pub kind: ScopeKind,
    pub id: Uuid,
    pub limits: Limits,
}

impl Scope {
    /// Every Redis key of this scope starts with this; the braces make it one cluster hash slot.
    pub fn redis_prefix(&self) -> String {
        format!("tg:{{{}:{}}}", self.kind.as_str(), self.id)
    }
}

/// What one request asks of every scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    pub request_id: String,
    /// Prompt estimate plus the completion allowance.
    pub tokens: u64,
    /// The most the request can cost, in nano-USD.
    pub cost_nanos: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rpm,
    Tpm,
    Budget,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rpm => "rpm",
            Reason::Tpm => "tpm",
            Reason::Budget => "budget",
        }
    }
}

/// The limiter script's reason codes (see [`ScopeReply`]): 1 rpm, 2 tpm, 3 budget; 0, no
/// reason, is `None` in [`ScopeReply::reason`].
impl TryFrom<i64> for Reason {
    type Error = LimiterError;

    fn try_from(code: i64) -> Result<Self, LimiterError> {
        match code {
            1 => Ok(Reason::Rpm),
            2 => Ok(Reason::Tpm),
            3 => Ok(Reason::Budget),
            other => Err(LimiterError::Protocol(format!("unknown reason {other}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub scope: ScopeKind,
    pub reason: Reason,
    /// Seconds until the request could be admitted (0: not within this period).
    pub retry_after: u64,
}

/// Where a scope stands after a reservation, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Standing {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests_secs: u64,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens_secs: u64,
}

impl Standing {
    /// Takes in one scope's window: it becomes the standing of its dimension when it is tighter
    /// (fewer remaining) than what is there. `reset`: seconds until the oldest use in the window
    /// leaves it, i.e. until `remaining` next grows.
    pub fn tighten(&mut self, reason: Reason, limit: Option<i64>, used: i64, reset: i64) {
        let Some(limit) = limit else { return };
        let remaining = (limit - used).max(0) as u64;
        let (l, r, secs) = self.figures(reason);
        if r.is_none_or(|r| remaining < r) {
            (*l, *r, *secs) = (Some(limit as u64), Some(remaining), reset.max(0) as u64);
        }
    }

    /// A refusal on RPM or TPM: its dimension reports the refusing scope, reset when a retry
    /// may succeed, so that `x-ratelimit-reset-*`, `retry-after` and the message say one thing.
    pub fn refused(&mut self, reason: Reason, limit: Option<i64>, used: i64, retry_after: u64) {
        let Some(limit) = limit else { return };
        if reason == Reason::Budget {
            return;
        }
        let (l, r, secs) = self.figures(reason);
        (*l, *r, *secs) = (Some(limit as u64), Some((limit - used).max(0) as u64), retry_after);
    }

    /// Takes in another part's standing, dimension by dimension, where it is tighter.
    pub fn merge(&mut self, other: &Standing) {
        for reason in [Reason::Rpm, Reason::Tpm] {
            let mut theirs = *other;
            let (l, r, secs) = theirs.figures(reason);
            let (l, r, secs) = (*l, *r, *secs);
            let (ml, mr, msecs) = self.figures(reason);
            if r.is_some() && mr.is_none_or(|mine| r < Some(mine)) {
                (*ml, *mr, *msecs) = (l, r, secs);
            }
        }
    }

    fn figures(&mut self, reason: Reason) -> (&mut Option<u64>, &mut Option<u64>, &mut u64) {
        match reason {
            Reason::Tpm => (&mut self.limit_tokens, &mut self.remaining_tokens, &mut self.reset_tokens_secs),
            _ => (&mut self.limit_requests, &mut self.remaining_requests, &mut self.reset_requests_secs),
        }
    }
}

/// One scope's part of a reservation, enough to settle or refund it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub scope: Scope,
    /// The (Redis) second the reservation was made in.
    pub made_at: i64,
    /// The budget period it was made in, e.g. `d20261122`.
    pub period: String,
    /// The quota lease it was admitted from, if any: settled through the lease, not one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub demand: Demand,
    pub held: Vec<Held>,
    /// Made by the fallback while Redis was unreachable: settled there too.
    pub local: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// `None`: admitted.
    pub refusal: Option<Refusal>,
    /// Soft-enforced limits the request went over (admitted anyway).
    pub warnings: Vec<(ScopeKind, Reason)>,
    /// The tightest scope's standing.
    pub standing: Standing,
    /// Present when admitted: settle or release it.
    pub reservation: Option<Reservation>,
}

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
    #[error("budget seed: {0}")]
    Seed(String),
    #[error("unexpected limiter reply: {0}")]
    Protocol(String),
    #[error("redis lost the limiter's windows (restarted empty)")]
    Lost,
}

/// Where a budget scope's spend so far in a period comes from when Redis has lost it.
#[async_trait]
pub trait SpendSource: Send + Sync {
    async fn spent_nanos(&self, scope: &Scope, since: NaiveDate) -> Result<i64, String>;
}

#[async_trait]
pub trait Limiter: Send + Sync {
    /// Reserves `demand` in every scope, or in none.
    async fn reserve(&self, scopes: &[Scope], demand: &Demand) -> Result<Admission, LimiterError>;
    /// Replaces a reservation with what was really used.
    async fn settle(&self, reservation: &Reservation, tokens: u64, cost_nanos: i64) -> Result<(), LimiterError>;
    /// Gives a reservation back whole (nothing reached the upstream).
    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError>;
}

/// The first day of a budget period named by the script (`d20261122`, `w20261116`, `m202611`,
/// `all`).
pub fn period_start(period: &str) -> Option<NaiveDate> {
    let (kind, rest) = period.split_at(1.min(period.len()));
    match kind {
        "d" | "w" => NaiveDate::parse_from_str(rest, "%Y%m%d").ok(),
        "m" => NaiveDate::parse_from_str(&format!("{rest}01"), "%Y%m%d").ok(),
        _ if period == "all" => NaiveDate::from_ymd_opt(1970, 1, 1),
        _ => None,
    }
}

/// The budget period `at` falls in, named as the limiter script names it (`d20261122`,
/// `w20261116` for the ISO week starting that Monday, `m202611`, `all`).
pub fn period_id(period: BudgetPeriod, at: DateTime<Utc>) -> String {
    let day = at.date_naive();
    match period {
        BudgetPeriod::None => "all".to_string(),
        BudgetPeriod::Daily => day.format("d%Y%m%d").to_string(),
        BudgetPeriod::Weekly => {
            let monday = day - Days::days(day.weekday().num_days_from_monday().into());
            monday.format("w%Y%m%d").to_string()
        }
        BudgetPeriod::Monthly => format!("m{:04}{:02}", day.year(), day.month()),
    }
}

/// Nano-USD in one USD. Money is counted in integer nano-USD: a cheap model's request costs a few
/// micro-USD, and rounding each to whole micro-USD would let many of them spend nothing.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// Nano-USD from a decimal amount of USD, rounded up (a reservation never under-counts).
pub fn nanos_ceil(usd: rust_decimal::Decimal) -> i64 {
    use rust_decimal::prelude::ToPrimitive;
    (usd * rust_decimal::Decimal::from(NANOS_PER_USD)).ceil().to_i64().unwrap_or(i64::MAX)
}

/// Nano-USD from a decimal amount of USD, rounded to nearest (what was really spent).
pub fn nanos_round(usd: rust_decimal::Decimal) -> i64 {
    use rust_decimal::prelude::ToPrimitive;
    (usd * rust_decimal::Decimal::from(NANOS_PER_USD)).round().to_i64().unwrap_or(i64::MAX)
}

/// A scope's spend in `period` from PostgreSQL, in nano-USD: usage_daily's costs from `since` (to
/// `end`, exclusive, when given) plus the period's budget adjustments. The gateway's seed and
/// budget reconcile and the control API's standings read it alike, so that all count adjustments
/// (or a reconcile would undo a credit).
pub async fn pg_spent_nanos(
    db: &sqlx::PgPool,
    scope: &Scope,
    period: &str,
    since: NaiveDate,
    end: Option<NaiveDate>,
) -> Result<i64, sqlx::Error> {
    let column = match scope.kind {
        ScopeKind::Key => "key_id",
        ScopeKind::User => "user_id",
        ScopeKind::Team => "team_id",
        ScopeKind::Subscription => "subscription_id",
    };
    let sql = format!(
        "SELECT (SELECT coalesce(sum(cost), 0) FROM usage_daily
                 WHERE {column} = $1 AND day >= $2 AND ($3::date IS NULL OR day < $3)),
                (SELECT coalesce(sum(amount_nanos), 0)::bigint FROM budget_adjustments
                 WHERE scope = $4 AND scope_id = $1 AND period = $5)"
    );
    let (cost, adjusted): (rust_decimal::Decimal, i64) = sqlx::query_as(&sql)
        .bind(scope.id)
        .bind(since)
        .bind(end)
        .bind(scope.kind.as_str())
        .bind(period)
        .fetch_one(db)
        .await?;
    Ok(nanos_round(cost).saturating_add(adjusted))
}

pub(crate) fn period_arg(p: BudgetPeriod) -> &'static str {
    match p {
        BudgetPeriod::None => "none",
        BudgetPeriod::Daily => "daily",
        BudgetPeriod::Weekly => "weekly",
        BudgetPeriod::Monthly => "monthly",
    }
}

pub(crate) fn enforcement_arg(e: Enforcement) -> &'static str {
    match e {
        Enforcement::Hard => "hard",
        Enforcement::Soft => "soft",
        Enforcement::Monitor => "monitor",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_ids_name_the_period_an_instant_is_in() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(period_id(BudgetPeriod::Daily, at("2026-11-22T23:59:59Z")), "d20261122");
        assert_eq!(period_id(BudgetPeriod::Weekly, at("2026-11-22T12:00:00Z")), "w20261116");
        assert_eq!(period_id(BudgetPeriod::Weekly, at("2026-11-23T00:00:00Z")), "w20261123");
        assert_eq!(period_id(BudgetPeriod::Monthly, at("2026-12-31T23:59:59Z")), "m202612");
        assert_eq!(period_id(BudgetPeriod::None, at("2026-12-31T23:59:59Z")), "all");
        for p in [BudgetPeriod::Daily, BudgetPeriod::Weekly, BudgetPeriod::Monthly, BudgetPeriod::None] {
            assert!(period_start(&period_id(p, at("2026-02-28T10:00:00Z"))).is_some());
        }
    }

    #[test]
    fn period_names_map_to_their_first_day() {
        assert_eq!(period_start("d20261122"), NaiveDate::from_ymd_opt(2026, 11, 22));
        assert_eq!(period_start("w20261116"), NaiveDate::from_ymd_opt(2026, 11, 16));
        assert_eq!(period_start("m202611"), NaiveDate::from_ymd_opt(2026, 11, 1));
        assert_eq!(period_start("all"), NaiveDate::from_ymd_opt(1970, 1, 1));
        assert_eq!(period_start("x"), None);
    }

    #[test]
    fn scopes_share_one_hash_tag() {
        let s = Scope { kind: ScopeKind::Team, id: Uuid::nil(), limits: Limits::default() };
        assert_eq!(s.redis_prefix(), "tg:{team:00000000-0000-0000-0000-000000000000}");
    }
}
