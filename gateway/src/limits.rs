//! Step 4 of a request: the scopes that carry limits, what the request may at most use, the
//! reservation before proxying and its settlement after, the `x-ratelimit-*` headers that report
//! the standing, and the limiter behind them (Redis, or each replica's share while Redis is
//! unreachable).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{NaiveDate, NaiveTime};
use sqlx::PgPool;
use tollgate_core::{
    limiter::{
        nanos_ceil, period_id, pg_spent_nanos, take_round_trips, Demand, LeaseBook, Limiter, Observations, Reason,
        RedisConn, RedisLimiter, Reservation, ResilientLimiter, Scope, ScopeKind, SpendSource, Standing,
    },
    limits::Enforcement,
};

use crate::{
    admission::Admitted,
    auth::{ActiveSubscription, AuthContext},
    config::GatewayConfig,
    error::GatewayError,
    metrics::Metrics,
    settlement::{BudgetScopes, Unsettled, UnsettledQueue},
    state::GatewayState,
};

/// The scopes of a request that have limits: key, user, team, subscription.
pub fn scopes(auth: &AuthContext, subscription: &ActiveSubscription) -> Vec<Scope> {
    let mut out = Vec::with_capacity(4);
    for (kind, id, limits) in [
        (ScopeKind::Key, auth.key_id, &auth.key_limits),
        (ScopeKind::User, auth.user_id, &auth.user_limits),
        (ScopeKind::Team, auth.team_id, &auth.team_limits),
    ] {
        if !limits.is_empty() {
            out.push(Scope { kind, id, limits: limits.clone() });
        }
    }
    if !subscription.limits.is_empty() {
        out.push(Scope { kind: ScopeKind::Subscription, id: subscription.id, limits: subscription.limits.clone() });
    }
    out
}

/// What a request asks of every scope: its allowance of tokens, and its ceiling priced.
pub fn demand(request_id: &str, admitted: &Admitted) -> Demand {
    let (allowance, ceiling) = (admitted.allowance, admitted.ceiling);
    Demand {
        request_id: request_id.to_string(),
        tokens: allowance.prompt_tokens.saturating_add(allowance.completion_tokens),
        cost_nanos: nanos_ceil(admitted.model.cost(ceiling.prompt_tokens, ceiling.completion_tokens)),
    }
}

/// What the limiter said of a request, for the headers of its answer: OpenAI's
/// `x-ratelimit-*` from the tightest scope's standing, and `x-tollgate-warning` for soft limits
/// the request went over.
#[derive(Debug, Default)]
pub struct RateHeaders {
    standing: Option<Standing>,
    warnings: Vec<String>,
}

impl RateHeaders {
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Some(s) = &self.standing {
            if let (Some(limit), Some(remaining)) = (s.limit_requests, s.remaining_requests) {
                h.push(("x-ratelimit-limit-requests", limit.to_string()));
                h.push(("x-ratelimit-remaining-requests", remaining.to_string()));
                h.push(("x-ratelimit-reset-requests", format!("{}s", s.reset_requests_secs)));
            }
            if let (Some(limit), Some(remaining)) = (s.limit_tokens, s.remaining_tokens) {
                h.push(("x-ratelimit-limit-tokens", limit.to_string()));
                h.push(("x-ratelimit-remaining-tokens", remaining.to_string()));
                h.push(("x-ratelimit-reset-tokens", format!("{}s", s.reset_tokens_secs)));
            }
        }
        if !self.warnings.is_empty() {
            h.push(("x-tollgate-warning", self.warnings.join(", ")));
        }
        h
    }
}

/// Reserves what an admitted request may at most use in every scope with limits: `Ok(None)`
/// when no scope has limits, 429 when a hard limit refuses, 503 under `fail_closed` when limits
/// cannot be checked. `rate` receives the standing either way.
pub async fn reserve(
    state: &GatewayState,
    request_id: &str,
    admitted: &Admitted,
    rate: &mut RateHeaders,
) -> Result<Option<Reservation>, GatewayError> {
    let scopes = scopes(&admitted.auth, &admitted.subscription);
    if scopes.is_empty() {
        return Ok(None);
    }
    state.limiter.budget_scopes.note(&scopes);
    let demand = demand(request_id, admitted);
    let metrics = &state.metrics;
    let limiter = &state.limiter.limiter;
    let started = Instant::now();
    let result = limiter.reserve(&scopes, &demand).await;
    metrics.redis_latency.observe(started.elapsed().as_secs_f64());
    metrics.fallback_active.set(limiter.fallback_active() as i64);
    metrics.redis_errors.inc_by(limiter.take_failures());
    state.limiter.count_redis_use(metrics);
    let admission = result.map_err(|e| {
        // Under fail_closed, or when PostgreSQL cannot seed a budget: otherwise the fallback answers.
        tracing::warn!(error = %e, "limits could not be checked");
        GatewayError::LimitsUnavailable
    })?;
    for (scope, reason) in &admission.warnings {
        metrics.limit_warnings.with_label_values(&[reason.as_str(), scope.as_str()]).inc();
        // Monitor-only limits count silently; soft ones tell the client.
        let soft = scopes.iter().any(|x| x.kind == *scope && x.limits.enforcement == Enforcement::Soft);
        if soft {
            rate.warnings.push(format!("{} limit exceeded on {}", reason.as_str(), scope.as_str()));
        }
    }
    rate.standing = Some(admission.standing);
    if let Some(r) = admission.refusal {
        metrics.rejections.with_label_values(&[r.reason.as_str(), r.scope.as_str()]).inc();
        return Err(match r.reason {
            Reason::Budget => GatewayError::BudgetExhausted { scope: r.scope.as_str(), retry_after: r.retry_after },
            reason => GatewayError::RateLimited {
                scope: r.scope.as_str(),
                reason: reason.as_str(),
                retry_after: r.retry_after,
            },
        });
    }
    Ok(admission.reservation)
}

/// After the response, off the client's path: replaces a reservation with what the request used
/// (`(tokens, nano-USD)`), or gives it all back when the upstream never answered (`None`).
pub fn settle(state: &GatewayState, reservation: Reservation, used: Option<(u64, i64)>) {
    if used.is_some_and(|(_, cost)| cost > reservation.demand.cost_nanos) {
        // Charged in full: a budget can end over its limit by this one request's excess.
        state.metrics.reservation_overruns.inc();
    }
    // Admitted from leases alone: settled in memory, with no task to spawn.
    if state.limiter.limiter.settle_leased(&reservation, used) {
        return;
    }
    let handle = state.limiter.clone();
    state.support.spawn(async move {
        let _settling = handle.unsettled.begin();
        let result = match used {
            Some((tokens, cost)) => handle.limiter.settle(&reservation, tokens, cost).await,
            None => handle.limiter.release(&reservation).await,
        };
        if let Err(e) = result {
            // Kept and sent again until Redis takes it (once): see settlement.rs.
            tracing::warn!(error = %e, "settlement failed; kept to be sent again");
            let item = Unsettled { reservation, cost_nanos: used.map(|(_, cost)| cost), failed_at: chrono::Utc::now() };
            handle.unsettled.push(item, &handle.metrics);
        }
    });
}

/// Spend so far in a period, from the usage_daily rollups plus the period's budget adjustments
/// (used to re-seed Redis, and by the budget reconcile: both must count adjustments, or a
/// reconcile would undo a credit).
pub struct PgSpend {
    pub db: PgPool,
    pub support: tokio::runtime::Handle,
}

#[async_trait]
impl SpendSource for PgSpend {
    async fn spent_nanos(&self, scope: &Scope, since: NaiveDate) -> Result<i64, String> {
        // The period starting on `since`, named as the limiter and the adjustments name it.
        let period = period_id(scope.limits.budget_period, since.and_time(NaiveTime::MIN).and_utc());
        let (db, scope) = (self.db.clone(), scope.clone());
        self.support
            .spawn(async move { pg_spent_nanos(&db, &scope, &period, since, None).await })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// The limiter and the background work that keeps it connected: connecting to Redis (first while
/// starting, so that no request is admitted unchecked when Redis is there, then in the background
/// until it answers) and a heartbeat every second that counts the live replicas for the fallback.
pub struct LimiterHandle {
    pub limiter: Arc<ResilientLimiter>,
    /// Settlements Redis did not take, sent again every second.
    pub unsettled: Arc<UnsettledQueue>,
    /// Budgets served lately, reconciled with PostgreSQL every `budget_reconcile_seconds`.
    pub budget_scopes: Arc<BudgetScopes>,
    /// This replica's quota leases, kept across reconnects to Redis.
    pub leases: Arc<LeaseBook>,
    metrics: Arc<Metrics>,
}

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How often kept settlements are sent again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// A replica not heard from for this long no longer counts as live.
const HEARTBEAT_WINDOW: Duration = Duration::from_secs(5);
/// How often quota leases are looked at for returns that are due.
const LEASE_RETURNS_EVERY: Duration = Duration::from_millis(100);

impl LimiterHandle {
    pub fn start(
        config: &GatewayConfig,
        db: PgPool,
        support: &tokio::runtime::Runtime,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        // 0: the heartbeat has not been seen yet (the expected count stands in).
        let live = Arc::new(AtomicU32::new(0));
        let observations = Arc::new(Observations::default());
        let spend: Arc<dyn SpendSource> = Arc::new(PgSpend { db, support: support.handle().clone() });
        let limiter = Arc::new(ResilientLimiter::new(
            live.clone(),
            config.expected_replicas,
            observations.clone(),
            spend.clone(),
            config.fail_closed,
        ));
        let (url, timeout) = (config.redis_url.clone(), Duration::from_millis(config.redis_timeout_ms.max(1)));
        let lease = config.reservation_lease_seconds;
        let leases = Arc::new(LeaseBook::new(
            Duration::from_millis(config.lease_slice_ms),
            live.clone(),
            config.expected_replicas,
        ));
        let reconcile_spend = spend.clone();
        let book = leases.clone();
        let per_worker = config.redis_worker_connections;
        let connect = move || {
            let (url, spend, observations, book) = (url.clone(), spend.clone(), observations.clone(), book.clone());
            async move {
                // Connecting may take longer than a request's Redis budget.
                let conn = RedisConn::connect(&url, Duration::from_secs(2)).await.map_err(|e| e.to_string())?;
                let mut redis =
                    RedisLimiter::new(conn, timeout, lease, 0, spend).with_observations(observations).with_leases(book);
                if per_worker {
                    redis = redis.with_worker_connections(&url);
                }
                match tokio::time::timeout(Duration::from_secs(2), redis.load_script()).await {
                    Ok(Ok(())) => Ok(Arc::new(redis)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out loading the limiter script".to_string()),
                }
            }
        };
        match support.block_on(connect()) {
            Ok(redis) => {
                limiter.connect(redis);
                tracing::info!("limiter connected to redis");
            }
            Err(e) => tracing::warn!(error = %e, "limiter cannot reach redis at start; limiting locally until it can"),
        }
        let unsettled = Arc::new(UnsettledQueue::new(config.settlement_queue_capacity, lease));
        unsettled.load(Path::new(&config.spool_dir), &metrics);
        let budget_scopes = Arc::new(BudgetScopes::default());
        let (l, queue, m) = (limiter.clone(), unsettled.clone(), metrics.clone());
        support.spawn(async move {
            loop {
                tokio::time::sleep(RETRY_EVERY).await;
                if !queue.is_empty() {
                    queue.retry(&l, &m).await;
                }
            }
        });
        if config.budget_reconcile_seconds > 0 {
            let every = Duration::from_secs(config.budget_reconcile_seconds);
            let (l, budgets, m) = (limiter.clone(), budget_scopes.clone(), metrics.clone());
            support.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Some(redis) = l.primary().filter(|_| !l.fallback_active()) {
                        budgets.reconcile(redis, reconcile_spend.as_ref(), &m).await;
                    }
                }
            });
        }
        let l = limiter.clone();
        support.spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RETURNS_EVERY).await;
                if let Some(redis) = l.primary() {
                    if let Err(e) = redis.flush_leases(false).await {
                        tracing::debug!(error = %e, "quota lease returns failed; sent again next round");
                    }
                }
            }
        });
        let replica = uuid::Uuid::new_v4().to_string();
        let l = limiter.clone();
        support.spawn(async move {
            loop {
                match l.primary() {
                    None => match connect().await {
                        Ok(redis) => {
                            l.connect(redis);
                            tracing::info!("limiter connected to redis");
                        }
                        Err(e) => tracing::warn!(error = %e, "limiter cannot reach redis; retrying"),
                    },
                    Some(redis) => match redis.heartbeat(&replica, HEARTBEAT_WINDOW).await {
                        Ok(n) => {
                            live.store(n, Ordering::Relaxed);
                            // What the fallback admitted reaches Redis here, off the request path.
                            l.sync_fallback().await;
                        }
                        Err(e) => tracing::debug!(error = %e, "heartbeat failed; keeping the last replica count"),
                    },
                }
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        });
        Arc::new(Self { limiter, unsettled, budget_scopes, leases, metrics })
    }

    /// Brings the Redis round-trip and lease counters up to date.
    pub fn count_redis_use(&self, metrics: &Metrics) {
        metrics.redis_round_trips.inc_by(take_round_trips());
        let (admissions, grants, returns) = self.leases.stats.take();
        metrics.lease_admissions.inc_by(admissions);
        metrics.lease_grants.inc_by(grants);
        metrics.lease_returns.inc_by(returns);
    }

    /// At shutdown: waits for settlements under way, sends the kept ones once more, and saves
    /// what Redis still did not take in `spool_dir` for the next start.
    pub async fn shut_down(&self, spool_dir: &str) {
        self.unsettled.drain_in_flight(Duration::from_secs(2)).await;
        // Slices go back whole; what their requests used reaches Redis with them.
        if let Some(redis) = self.limiter.primary() {
            if let Err(e) = redis.flush_leases(true).await {
                tracing::warn!(error = %e, "quota leases could not be returned; Redis frees them when they expire");
            }
        }
        if self.unsettled.is_empty() {
            return;
        }
        self.unsettled.retry(&self.limiter, &self.metrics).await;
        match self.unsettled.save(Path::new(spool_dir)) {
            Ok(Some(path)) => {
                tracing::warn!(file = %path.display(), settlements = self.unsettled.len(), "unsettled settlements saved for the next start")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, settlements = self.unsettled.len(), "could not save unsettled settlements; the budget reconcile will restore their spend")
            }
        }
    }
}
