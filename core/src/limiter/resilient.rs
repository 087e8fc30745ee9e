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
    pub fn new(
        live_replicas: Arc<AtomicU32>,
        observations: Arc<Observations>,
        seed: Arc<dyn SpendSource>,
        fail_closed: bool,
    ) -> Self {
        Self {
            primary: OnceLock::new(),
            fallback: FallbackLimiter::new(live_replicas, observations, seed),
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

    /// Tells Redis what the fallback spent, once Redis answers again.
    async fn sync_fallback_spend(&self) {
        let Some(primary) = self.usable_primary() else { return };
        let spends = self.fallback.take_unsynced();
        if spends.is_empty() {
            return;
        }
        if primary.add_spend(&spends).await.is_err() {
            self.fallback.put_back_unsynced(spends);
        }
    }

    fn mark(&self, up: bool) {
        let was_fallback = self.in_fallback.swap(!up, std::sync::atomic::Ordering::Relaxed);
        if up {
            if was_fallback {
                // Redis is the truth again; local shares are stale from now on.
                self.fallback.reset();
            }
        } else {
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
                    self.sync_fallback_spend().await;
                    return Ok(a);
                }
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
            self.in_fallback.store(true, std::sync::atomic::Ordering::Relaxed);
            if self.fail_closed {
                return Err(LimiterError::Timeout);
            }
        }
        self.fallback.reserve(scopes, demand).await
    }

    async fn settle(&self, reservation: &Reservation, tokens: u64, cost_nanos: i64) -> Result<(), LimiterError> {
        match (reservation.local, self.primary.get()) {
            (false, Some(p)) => p.settle(reservation, tokens, cost_nanos).await,
            _ => {
                self.fallback.settle(reservation, tokens, cost_nanos).await?;
                self.sync_fallback_spend().await;
                Ok(())
            }
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
