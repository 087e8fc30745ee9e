//! The limiter the gateway uses: Redis when it answers, the per-replica fallback when it does not
//! (or a refusal to guess, under `fail_closed`). After a failure Redis is skipped for a second, so
//! an outage costs one timeout per second, not one per request.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;

use super::*;

const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(1);

pub struct ResilientLimiter {
    primary: OnceLock<Arc<RedisLimiter>>,
    fallback: FallbackLimiter,
    down_until: Mutex<Option<Instant>>,
    in_fallback: AtomicBool,
    /// Calls to Redis that failed or timed out since the last `take_failures`.
    failures: AtomicU64,
    fail_closed: bool,
}

impl ResilientLimiter {
    /// `live_replicas`: the heartbeat's count (0 until seen); `expected_replicas`: the floor of
    /// the count a fallback share is taken for.
    pub fn new(
        live_replicas: Arc<AtomicU32>,
        expected_replicas: u32,
        observations: Arc<Observations>,
        seed: Arc<dyn SpendSource>,
        fail_closed: bool,
    ) -> Self {
        Self {
            primary: OnceLock::new(),
            fallback: FallbackLimiter::new(live_replicas, expected_replicas, observations, seed),
            down_until: Mutex::new(None),
            in_fallback: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            fail_closed,
        }
    }

    /// Redis has been reached: use it from now on.
    pub fn connect(&self, primary: Arc<RedisLimiter>) {
        let _ = self.primary.set(primary);
    }

    pub fn primary(&self) -> Option<&Arc<RedisLimiter>> {
        self.primary.get()
    }

    /// Whether requests are being limited without Redis right now.
    pub fn fallback_active(&self) -> bool {
        self.in_fallback.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many Redis calls failed since the last time this was asked (for a counter metric).
    pub fn take_failures(&self) -> u64 {
        self.failures.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    fn usable_primary(&self) -> Option<&Arc<RedisLimiter>> {
        let down = crate::sync::lock(&self.down_until).is_some_and(|t| Instant::now() < t);
        if down {
            None
        } else {
            self.primary.get()
        }
    }

    /// Tells Redis what the fallback admitted, one call per scope, off the request path (the
    /// gateway calls it every second). Returns how many scopes were synced.
    pub async fn sync_fallback(&self) -> usize {
        let Some(primary) = self.usable_primary() else { return 0 };
        let syncs = self.fallback.take_sync();
        let mut failed = Vec::new();
        let mut synced = 0;
        for sync in syncs {
            if !failed.is_empty() {
                failed.push(sync);
                continue;
            }
            match primary.sync(&sync).await {
                Ok(()) => synced += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "fallback sync failed; kept for the next round");
                    failed.push(sync);
                }
            }
        }
        if !failed.is_empty() {
            self.fallback.put_back_sync(failed);
        }
        synced
    }

    fn mark(&self, up: bool) {
        let was_fallback = self.in_fallback.swap(!up, std::sync::atomic::Ordering::Relaxed);
        if !up {
            if !was_fallback {
                self.fallback.begin_outage();
            }
            *crate::sync::lock(&self.down_until) = Some(Instant::now() + SKIP_AFTER_FAILURE);
        }
    }
}

#[async_trait]
impl Limiter for ResilientLimiter {
    async fn reserve(&self, scopes: &[Scope], demand: &Demand) -> Result<Admission, LimiterError> {
        if let Some(primary) = self.usable_primary() {
            match primary.reserve(scopes, demand).await {
                Ok(a) => {
                    self.mark(true);
                    return Ok(a);
                }
                // PostgreSQL could not seed a budget: Redis is fine, and the fallback could not
                // tell this budget's remaining either.
                Err(e @ LimiterError::Seed(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "redis limiter failed; limiting locally");
                    self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.mark(false);
                    if self.fail_closed {
                        return Err(e);
                    }
                }
            }
        } else {
            if !self.in_fallback.swap(true, std::sync::atomic::Ordering::Relaxed) {
                self.fallback.begin_outage();
            }
            if self.fail_closed {
                return Err(LimiterError::Timeout);
            }
        }
        self.fallback.reserve(scopes, demand).await
    }

    async fn settle(&self, reservation: &Reservation, tokens: u64, cost_nanos: i64) -> Result<(), LimiterError> {
        match (reservation.local, self.primary.get()) {
            (false, Some(p)) => p.settle(reservation, tokens, cost_nanos).await,
            _ => self.fallback.settle(reservation, tokens, cost_nanos).await,
        }
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        match (reservation.local, self.primary.get()) {
            (false, Some(p)) => p.release(reservation).await,
            _ => self.fallback.release(reservation).await,
        }
    }
}

impl ResilientLimiter {
    /// Sends again a Redis settlement (`Some(cost)`) or release (`None`) whose call failed.
    pub async fn resettle(&self, reservation: &Reservation, cost_nanos: Option<i64>) -> Result<(), LimiterError> {
        match self.usable_primary() {
            Some(p) => p.resettle(reservation, cost_nanos).await,
            None => Err(LimiterError::Timeout),
        }
    }
}
