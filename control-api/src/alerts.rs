//! The budget alert scanner: every `alerts.scan_interval_seconds`, one replica at a time (a
//! transaction-scoped PostgreSQL advisory lock) computes the spend of every scope with a budget
//! in its current period (UTC calendar, as the limiter counts it) from usage_daily plus the
//! period's budget_adjustments, one statement per scope kind, and records in the `events` outbox
//! - a `budget.threshold` event for each alert threshold the spend has reached (the scope's
//!   `alert_thresholds`, else `alerts.thresholds`), and
//! - a `limit.exceeded` event when a soft or monitor budget has been passed (a hard budget
//!   refuses instead; RPM and TPM overages are not events).
//!
//! Inserts are `ON CONFLICT DO NOTHING` on (type, scope, scope_id, period, threshold): an event
//! exists once per threshold, scope and period whatever the number of replicas, restarts or scans.
//! During the first minutes of a period the previous one is scanned too, so that usage flushed
//! just after the boundary still raises the previous period's alerts.

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use tokio::time::MissedTickBehavior;
use tollgate_core::{
    limiter::{period_id, period_start, ScopeKind},
    limits::{BudgetPeriod, Enforcement, Limits},
};
use uuid::Uuid;

use crate::{config::AlertsConfig, state::AppState};

/// The advisory lock's key ("tollalrt"), distinct from model sync's.
const LOCK_KEY: i64 = 0x746f_6c6c_616c_7274;
/// How long into a period the previous one is still scanned.
const GRACE: chrono::Duration = chrono::Duration::minutes(10);

pub const BUDGET_THRESHOLD: &str = "budget.threshold";
pub const LIMIT_EXCEEDED: &str = "limit.exceeded";

/// Runs forever: a scan every `interval` (the first at once).
pub async fn run(state: AppState, config: AlertsConfig) {
    let mut tick = tokio::time::interval(Duration::from_secs(config.scan_interval_seconds.max(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match scan(&state, &config.thresholds, Utc::now()).await {
            Ok(Some(n)) if n > 0 => tracing::info!(events = n, "budget events recorded"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "budget alert scan failed"),
        }
    }
}

/// A budget period being scanned: the limits' `budget_period`, the limiter's name of the
/// period, and its days `[start, end)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Period {
    pub budget_period: &'static str,
    pub id: String,
    pub start: NaiveDate,
    pub end: NaiveDate,
}

/// The periods to scan at `now`: each kind's current one, and its previous one during the first
/// [`GRACE`] of the current.
pub fn periods(now: DateTime<Utc>) -> Vec<Period> {
    let far = NaiveDate::from_ymd_opt(9999, 12, 31).unwrap_or(NaiveDate::MAX);
    let mut out = vec![Period {
        budget_period: "none",
        id: "all".into(),
        start: NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or(NaiveDate::MIN),
        end: far,
    }];
    for (kind, name) in
        [(BudgetPeriod::Daily, "daily"), (BudgetPeriod::Weekly, "weekly"), (BudgetPeriod::Monthly, "monthly")]
    {
        let id = period_id(kind, now);
        let Some(start) = period_start(&id) else { continue };
        let begins = start.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
        if now - begins < GRACE {
            let before = period_id(kind, begins - chrono::Duration::seconds(1));
            if let Some(previous) = period_start(&before) {
                out.push(Period { budget_period: name, id: before, start: previous, end: start });
            }
        }
        out.push(Period { budget_period: name, id, start, end: far });
    }
    out
}

/// One budgeted scope in one period, as the scan reads it.
#[derive(Debug, sqlx::FromRow)]
struct Spend {
    id: Uuid,
    limits: serde_json::Value,
    period: String,
    /// USD.
    spent: Decimal,
}

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub kind: &'static str,
    pub threshold: Decimal,
    pub spent: Decimal,
    pub max_budget: Decimal,
}

/// The events a scope's spend calls for: each threshold reached (with some spend: a zero budget
/// is not "reached" by spending nothing), and `limit.exceeded` past a soft or monitor budget.
pub fn candidates(limits: &Limits, spent: Decimal, default_thresholds: &[f64]) -> Vec<Candidate> {
    let Some(max_budget) = limits.max_budget else { return Vec::new() };
    let mut out = Vec::new();
    if spent <= Decimal::ZERO {
        return out;
    }
    let thresholds = limits.alert_thresholds.as_deref().unwrap_or(default_thresholds);
    for t in thresholds {
        // The shortest decimal that reads back as the float: 0.8, not 0.8000000000000000444.
        let threshold = Decimal::from_str(&t.to_string()).unwrap_or(Decimal::ZERO);
        if spent >= max_budget * threshold {
            out.push(Candidate { kind: BUDGET_THRESHOLD, threshold, spent, max_budget });
        }
    }
    if matches!(limits.enforcement, Enforcement::Soft | Enforcement::Monitor) && spent > max_budget {
        out.push(Candidate { kind: LIMIT_EXCEEDED, threshold: Decimal::ONE, spent, max_budget });
    }
    out
}

/// The statement that reads every budgeted scope of one kind with its spend in the periods
/// given (`$1` budget_period, `$2` period id, `$3` start, `$4` end, as arrays).
fn spend_sql(kind: ScopeKind, adjustments: bool) -> String {
    let (table, column, live) = match kind {
        ScopeKind::Key => ("api_keys", "key_id", "AND t.revoked_at IS NULL"),
        ScopeKind::User => ("users", "user_id", ""),
        ScopeKind::Team => ("teams", "team_id", ""),
        ScopeKind::Subscription => ("subscriptions", "subscription_id", "AND t.status <> 'cancelled'"),
    };
    let adjusted = if adjustments {
        format!(
            "+ coalesce((SELECT sum(a.amount_nanos) FROM budget_adjustments a
                         WHERE a.scope = '{}' AND a.scope_id = s.id AND a.period = s.period), 0) / 1000000000.0",
            kind.as_str()
        )
    } else {
        String::new()
    };
    format!(
        "WITH p AS (SELECT * FROM unnest($1::text[], $2::text[], $3::date[], $4::date[])
                    AS p(budget_period, period, start_day, end_day)),
         s AS (SELECT t.id, t.limits, p.period, p.start_day, p.end_day
               FROM {table} t JOIN p ON p.budget_period = coalesce(t.limits->>'budget_period', 'none')
               WHERE jsonb_typeof(t.limits->'max_budget') = 'number' {live}),
         used AS (SELECT s.id, s.period, coalesce(sum(d.cost), 0) AS cost
                  FROM s LEFT JOIN usage_daily d ON d.{column} = s.id AND d.day >= s.start_day AND d.day < s.end_day
                  GROUP BY s.id, s.period)
         SELECT s.id, s.limits, s.period, u.cost {adjusted} AS spent
         FROM s JOIN used u ON u.id = s.id AND u.period = s.period"
    )
}

/// One scan at `now`: `Ok(None)` when another replica holds the lock, else how many new events
/// were recorded.
pub async fn scan(state: &AppState, default_thresholds: &[f64], now: DateTime<Utc>) -> sqlx::Result<Option<u64>> {
    let mut tx = state.db.begin().await?;
    let held: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(LOCK_KEY).fetch_one(&mut *tx).await?;
    if !held {
        return Ok(None);
    }
    let adjustments: bool =
        sqlx::query_scalar("SELECT to_regclass('budget_adjustments') IS NOT NULL").fetch_one(&mut *tx).await?;
    let periods = periods(now);
    let names: Vec<&str> = periods.iter().map(|p| p.budget_period).collect();
    let ids: Vec<&str> = periods.iter().map(|p| p.id.as_str()).collect();
    let starts: Vec<NaiveDate> = periods.iter().map(|p| p.start).collect();
    let ends: Vec<NaiveDate> = periods.iter().map(|p| p.end).collect();
    let mut found: Vec<(ScopeKind, Uuid, String, Candidate)> = Vec::new();
    for kind in [ScopeKind::Key, ScopeKind::User, ScopeKind::Team, ScopeKind::Subscription] {
        let spends: Vec<Spend> = sqlx::query_as(&spend_sql(kind, adjustments))
            .bind(&names)
            .bind(&ids)
            .bind(&starts)
            .bind(&ends)
            .fetch_all(&mut *tx)
            .await?;
        for s in spends {
            // Limits were checked when written; one that no longer reads is skipped, not fatal.
            let Ok(limits) = serde_json::from_value::<Limits>(s.limits) else { continue };
            for c in candidates(&limits, s.spent, default_thresholds) {
                found.push((kind, s.id, s.period.clone(), c));
            }
        }
    }
    let column = |f: fn(&(ScopeKind, Uuid, String, Candidate)) -> Decimal| found.iter().map(f).collect::<Vec<_>>();
    let recorded: Vec<String> = sqlx::query_scalar(
        "INSERT INTO events (type, scope, scope_id, period, threshold, spent, max_budget)
         SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::numeric[], $6::numeric[],
                              $7::numeric[])
         ON CONFLICT (type, scope, scope_id, period, threshold) DO NOTHING
         RETURNING type",
    )
    .bind(found.iter().map(|f| f.3.kind).collect::<Vec<_>>())
    .bind(found.iter().map(|f| f.0.as_str()).collect::<Vec<_>>())
    .bind(found.iter().map(|f| f.1).collect::<Vec<_>>())
    .bind(found.iter().map(|f| f.2.as_str()).collect::<Vec<_>>())
    .bind(column(|f| f.3.threshold))
    .bind(column(|f| f.3.spent))
    .bind(column(|f| f.3.max_budget))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    for kind in &recorded {
        state.metrics.events.with_label_values(&[kind.as_str(), "recorded"]).inc();
    }
    Ok(Some(recorded.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(json: &str) -> Limits {
        serde_json::from_str(json).unwrap()
    }

    fn usd(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn thresholds_reached_and_soft_budgets_passed() {
        let l = limits(r#"{"max_budget": 10, "budget_period": "monthly"}"#);
        let default = [0.8, 1.0];
        assert!(candidates(&l, usd("7.99"), &default).is_empty());
        let at80 = candidates(&l, usd("8"), &default);
        assert_eq!(at80.len(), 1);
        assert_eq!((at80[0].kind, at80[0].threshold), (BUDGET_THRESHOLD, usd("0.8")));
        assert_eq!(candidates(&l, usd("10"), &default).len(), 2);
        // Hard budgets never get limit.exceeded (they refuse); soft and monitor ones do, once past.
        assert_eq!(candidates(&l, usd("12"), &default).len(), 2);
        let soft = limits(r#"{"max_budget": 10, "enforcement": "soft", "alert_thresholds": [0.5]}"#);
        assert_eq!(candidates(&soft, usd("10"), &default).len(), 1);
        let past = candidates(&soft, usd("10.000001"), &default);
        assert_eq!(past.iter().map(|c| c.kind).collect::<Vec<_>>(), [BUDGET_THRESHOLD, LIMIT_EXCEEDED]);
        assert_eq!(past[1].threshold, Decimal::ONE);
        let monitor = limits(r#"{"max_budget": 10, "enforcement": "monitor", "alert_thresholds": []}"#);
        assert_eq!(candidates(&monitor, usd("11"), &default).len(), 1);
        // No budget, or nothing spent (a zero budget is not reached by spending nothing).
        assert!(candidates(&limits(r#"{"rpm": 5}"#), usd("100"), &default).is_empty());
        let zero = limits(r#"{"max_budget": 0}"#);
        assert!(candidates(&zero, Decimal::ZERO, &default).is_empty());
        assert_eq!(candidates(&zero, usd("0.000001"), &default).len(), 2);
    }

    #[test]
    fn periods_are_the_limiters_with_the_previous_one_early_in_a_period() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let ids = |now| periods(at(now)).into_iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids("2026-12-09T12:00:00Z"), ["all", "d20261209", "w20261207", "m202612"]);
        // 5 minutes into Monday 2026-12-07: the previous day and week too, not the month.
        assert_eq!(ids("2026-12-07T00:05:00Z"), ["all", "d20261206", "d20261207", "w20261130", "w20261207", "m202612"]);
        let p = periods(at("2027-01-01T00:01:00Z"));
        let dec = p.iter().find(|p| p.id == "m202612").unwrap();
        assert_eq!(
            (dec.start, dec.end),
            (NaiveDate::from_ymd_opt(2026, 12, 1).unwrap(), NaiveDate::from_ymd_opt(2027, 1, 1).unwrap())
        );
    }
}
