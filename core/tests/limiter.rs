//! The Redis limiter against a real Redis: windows, budgets, seeding, leases, refunds, periods.
//! Time is injected through the script's clock offset, never waited for (except lease expiry).

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chrono::NaiveDate;
use rust_decimal::Decimal;
use tollgate_core::{
    limiter::{Demand, Limiter, Reason, RedisConn, RedisLimiter, Scope, ScopeKind, ScopeSync, SpendSource},
    limits::{BudgetPeriod, Enforcement, Limits},
};
use uuid::Uuid;

fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A spend source that answers a fixed amount and records what it was asked.
#[derive(Default)]
struct FixedSpend {
    nanos: i64,
    asked: Mutex<Vec<(ScopeKind, NaiveDate)>>,
}

#[async_trait]
impl SpendSource for FixedSpend {
    async fn spent_nanos(&self, scope: &Scope, since: NaiveDate) -> Result<i64, String> {
        self.asked.lock().unwrap().push((scope.kind, since));
        Ok(self.nanos)
    }
}

async fn limiter_at(offset: i64, lease: u64, seed: Arc<FixedSpend>) -> RedisLimiter {
    let conn = RedisConn::connect(&redis_url(), Duration::from_secs(2)).await.unwrap();
    RedisLimiter::new(conn, Duration::from_secs(2), lease, offset, seed)
}

fn scope(kind: ScopeKind, limits: Limits) -> Scope {
    Scope { kind, id: Uuid::new_v4(), limits }
}

fn demand(tokens: u64, cost: i64) -> Demand {
    Demand { request_id: Uuid::new_v4().to_string(), tokens, cost_nanos: cost }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn rpm_is_a_rolling_sixty_second_window() {
    let key = scope(ScopeKind::Key, Limits { rpm: Some(3), ..Default::default() });
    // Ten seconds into a minute that begins at a fixed offset from the real clock.
    let base = 1_000_000 - (now() % 1_000_000);
    for (offset, admitted) in
        [(0, true), (10, true), (20, true), (30, false), (59, false), (60, true), (61, false), (70, true)]
    {
        let l = limiter_at(base + offset, 600, Arc::default()).await;
        let a = l.reserve(std::slice::from_ref(&key), &demand(1, 0)).await.unwrap();
        assert_eq!(a.refusal.is_none(), admitted, "at +{offset}s: {a:?}");
        if let Some(r) = &a.refusal {
            assert_eq!(r.reason, Reason::Rpm);
            assert!(r.retry_after >= 1 && r.retry_after <= 60, "{r:?}");
        }
    }
}

#[tokio::test]
async fn tpm_reserves_then_settles_to_real_counts() {
    let l = limiter_at(0, 600, Arc::default()).await;
    let key = scope(ScopeKind::Key, Limits { tpm: Some(100), ..Default::default() });
    let a = l.reserve(std::slice::from_ref(&key), &demand(60, 0)).await.unwrap();
    assert!(a.refusal.is_none());
    assert_eq!(a.standing.remaining_tokens, Some(40));
    let refused = l.reserve(std::slice::from_ref(&key), &demand(60, 0)).await.unwrap();
    assert_eq!(refused.refusal.unwrap().reason, Reason::Tpm);
    // The first used 10 of its 60: 50 come back.
    l.settle(a.reservation.as_ref().unwrap(), 10, 0).await.unwrap();
    let b = l.reserve(std::slice::from_ref(&key), &demand(60, 0)).await.unwrap();
    assert!(b.refusal.is_none(), "{b:?}");
    assert_eq!(b.standing.remaining_tokens, Some(30));
}

#[tokio::test]
async fn a_refusal_by_one_scope_refunds_the_others() {
    let l = limiter_at(0, 600, Arc::default()).await;
    let key = scope(ScopeKind::Key, Limits { rpm: Some(10), ..Default::default() });
    let team = scope(ScopeKind::Team, Limits { rpm: Some(1), ..Default::default() });
    let both = [key.clone(), team.clone()];
    assert!(l.reserve(&both, &demand(1, 0)).await.unwrap().refusal.is_none());
    for _ in 0..5 {
        let a = l.reserve(&both, &demand(1, 0)).await.unwrap();
        assert_eq!(a.refusal.as_ref().unwrap().scope, ScopeKind::Team);
    }
    // The key scope saw one request, not six.
    let a = l.reserve(std::slice::from_ref(&key), &demand(1, 0)).await.unwrap();
    assert_eq!(a.standing.remaining_requests, Some(8));
}

#[tokio::test]
async fn budget_counts_reservations_and_settles_real_cost() {
    let seed = Arc::new(FixedSpend { nanos: 200_000_000, ..Default::default() });
    let l = limiter_at(0, 600, seed.clone()).await;
    let limits = Limits { max_budget: Some(Decimal::ONE), budget_period: BudgetPeriod::Monthly, ..Default::default() };
    let user = scope(ScopeKind::User, limits);
    let one = std::slice::from_ref(&user);
    // Seeded once with $0.20 already spent this month: $0.80 left.
    let a = l.reserve(one, &demand(0, 500_000_000)).await.unwrap();
    assert!(a.refusal.is_none());
    let first_day = chrono::Utc::now().date_naive().with_day0(0).unwrap();
    assert_eq!(seed.asked.lock().unwrap().as_slice(), &[(ScopeKind::User, first_day)]);
    let refused = l.reserve(one, &demand(0, 400_000_000)).await.unwrap();
    assert_eq!(refused.refusal.as_ref().unwrap().reason, Reason::Budget);
    assert!(refused.refusal.unwrap().retry_after > 0, "a monthly budget resets next month");
    // It cost $0.10: $0.70 left.
    l.settle(a.reservation.as_ref().unwrap(), 0, 100_000_000).await.unwrap();
    assert!(l.reserve(one, &demand(0, 700_000_000)).await.unwrap().refusal.is_none());
    assert!(l.reserve(one, &demand(0, 1)).await.unwrap().refusal.is_some());
    assert_eq!(seed.asked.lock().unwrap().len(), 1, "seeded only once");
}

#[tokio::test]
async fn released_reservations_and_expired_leases_return() {
    let limits = Limits { max_budget: Some(Decimal::ONE), ..Default::default() };
    let key = scope(ScopeKind::Key, limits);
    let one = std::slice::from_ref(&key);
    let l = limiter_at(0, 1, Arc::default()).await;
    let a = l.reserve(one, &demand(0, 1_000_000_000)).await.unwrap();
    assert!(a.refusal.is_none());
    assert!(l.reserve(one, &demand(0, 1)).await.unwrap().refusal.is_some());
    l.release(a.reservation.as_ref().unwrap()).await.unwrap();
    let b = l.reserve(one, &demand(0, 1_000_000_000)).await.unwrap();
    assert!(b.refusal.is_none(), "released");
    // Never settled (a crashed replica): the lease of 1 s runs out and the money returns.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(l.reserve(one, &demand(0, 1_000_000_000)).await.unwrap().refusal.is_none(), "lease expired");
}

#[tokio::test]
async fn soft_limits_admit_with_a_warning_and_monitor_only_counts() {
    let l = limiter_at(0, 600, Arc::default()).await;
    for mode in [Enforcement::Soft, Enforcement::Monitor] {
        let key = scope(ScopeKind::Key, Limits { rpm: Some(1), enforcement: mode, ..Default::default() });
        let one = std::slice::from_ref(&key);
        assert!(l.reserve(one, &demand(1, 0)).await.unwrap().warnings.is_empty());
        let over = l.reserve(one, &demand(1, 0)).await.unwrap();
        assert!(over.refusal.is_none());
        assert_eq!(over.warnings, vec![(ScopeKind::Key, Reason::Rpm)]);
    }
}

#[tokio::test]
async fn a_daily_budget_exhausted_before_midnight_admits_after_it() {
    let limits = Limits { max_budget: Some(Decimal::ONE), budget_period: BudgetPeriod::Daily, ..Default::default() };
    let key = scope(ScopeKind::Key, limits);
    let one = std::slice::from_ref(&key);
    // A clock that reads 23:59:59 UTC, then 00:00:01 the next day.
    let to_midnight = 86_400 - now().rem_euclid(86_400);
    let before = limiter_at(to_midnight - 1, 600, Arc::default()).await;
    let a = before.reserve(one, &demand(0, 1_000_000_000)).await.unwrap();
    assert!(a.refusal.is_none());
    before.settle(a.reservation.as_ref().unwrap(), 0, 1_000_000_000).await.unwrap();
    let refused = before.reserve(one, &demand(0, 1)).await.unwrap().refusal.unwrap();
    assert_eq!(refused.reason, Reason::Budget);
    assert!(refused.retry_after <= 2, "resets at midnight: {refused:?}");
    let after = limiter_at(to_midnight + 1, 600, Arc::default()).await;
    let b = after.reserve(one, &demand(0, 1_000_000_000)).await.unwrap();
    assert!(b.refusal.is_none(), "a new day starts from zero: {b:?}");
}

#[tokio::test]
async fn concurrent_reservations_never_exceed_the_limit() {
    let l = Arc::new(limiter_at(0, 600, Arc::default()).await);
    let key = scope(ScopeKind::Key, Limits { rpm: Some(50), ..Default::default() });
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (l, key) = (l.clone(), key.clone());
            tokio::spawn(async move { l.reserve(&[key], &demand(1, 0)).await.unwrap().refusal.is_none() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap() as usize;
    }
    assert_eq!(admitted, 50);
}

trait FirstOfMonth {
    fn with_day0(self, d: u32) -> Option<NaiveDate>;
}

impl FirstOfMonth for NaiveDate {
    fn with_day0(self, d: u32) -> Option<NaiveDate> {
        chrono::Datelike::with_day0(&self, d)
    }
}

/// How many more requests `scope` admits now (up to `max`), each a request of its own.
async fn admits(l: &RedisLimiter, scope: &Scope, max: usize) -> usize {
    let mut n = 0;
    while n < max && l.reserve(std::slice::from_ref(scope), &demand(1, 0)).await.unwrap().refusal.is_none() {
        n += 1;
    }
    n
}

fn sync(scope: &Scope, windows: Vec<(i64, i64, i64)>, floor: Option<(i64, i64, i64)>) -> ScopeSync {
    ScopeSync {
        scope: scope.clone(),
        id: Uuid::new_v4().to_string(),
        windows,
        spend_nanos: 0,
        settled_from: now(),
        floor,
    }
}

#[tokio::test]
async fn a_lost_window_is_restored_to_the_largest_floor_plus_every_replicas_fallback() {
    // Redis restarted empty. Two replicas saw the window at 50 and at 60 before the outage, and
    // each admitted 20 alone meanwhile: 100 in the minute. The first sync's fallback admissions
    // must not stand in for the second replica's larger floor, whatever the order.
    for floors in [[50, 60], [60, 50]] {
        let key = scope(ScopeKind::Key, Limits { rpm: Some(101), ..Default::default() });
        let l = limiter_at(0, 600, Arc::default()).await;
        let seen = now() - 5;
        for floor in floors {
            l.sync(&sync(&key, vec![(now() - 1, 20, 0)], Some((seen, floor, 0)))).await.unwrap();
        }
        assert_eq!(admits(&l, &key, 5).await, 1, "floors in the order {floors:?}");
    }
}

#[tokio::test]
async fn a_window_that_outlived_the_outage_takes_no_floor() {
    // Redis was only unreachable: the window holds what it counted; a floor would count it twice.
    let key = scope(ScopeKind::Key, Limits { rpm: Some(50), ..Default::default() });
    let before = limiter_at(-10, 600, Arc::default()).await;
    assert_eq!(admits(&before, &key, 30).await, 30);
    let l = limiter_at(0, 600, Arc::default()).await;
    l.sync(&sync(&key, vec![(now() - 1, 5, 0)], Some((now() - 5, 30, 0)))).await.unwrap();
    assert_eq!(admits(&l, &key, 50).await, 15);
}
