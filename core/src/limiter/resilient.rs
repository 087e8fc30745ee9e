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
    /// Held while what the fallback admitted is given to Redis after an outage.
    sync_gate: tokio::sync::Mutex<()>,
    /// An outage began since the last sync: the next one carries floors.
    needs_floors: AtomicBool,
    /// Until then (just after an outage), requests must also fit this replica's share.
    grace_until: Mutex<Option<Instant>>,
}

/// How long after an outage a replica still holds itself to its share: every replica has told
/// Redis what it admitted alone within two heartbeats.
const GRACE_AFTER_OUTAGE: Duration = Duration::from_secs(2);

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
            sync_gate: tokio::sync::Mutex::new(()),
            needs_floors: AtomicBool::new(false),
            grace_until: Mutex::new(None),
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

    /// Tells Redis what the fallback admitted, one call per scope (the gateway calls it every
    /// second; a request that finds Redis back calls it first, see `reserve`). After an outage it
    /// also brings every scope seen in the last minute up to what Redis had counted, in case
    /// Redis came back empty. Returns how many scopes were synced, `None` if a call failed.
    pub async fn sync_fallback(&self) -> Option<usize> {
        let primary = self.usable_primary()?;
        let after_outage = self.needs_floors.swap(false, std::sync::atomic::Ordering::AcqRel);
        let syncs = self.fallback.take_sync(after_outage);
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
            if after_outage {
                self.needs_floors.store(true, std::sync::atomic::Ordering::Release);
            }
            return None;
        }
        Some(synced)
    }

    /// Whether the fallback holds admissions, or floors, Redis has not been told about.
    fn fallback_pending(&self) -> bool {
        self.fallback.has_unsynced() || self.needs_floors.load(std::sync::atomic::Ordering::Acquire)
    }

    fn mark(&self, up: bool) {
        let was_fallback = self.in_fallback.swap(!up, std::sync::atomic::Ordering::Relaxed);
        if !up {
            if !was_fallback {
                self.fallback.begin_outage();
                self.needs_floors.store(true, std::sync::atomic::Ordering::Release);
            }
            *crate::sync::lock(&self.down_until) = Some(Instant::now() + SKIP_AFTER_FAILURE);
        }
    }
}

#[async_trait]
impl Limiter for ResilientLimiter {
    async fn reserve(&self, scopes: &[Scope], demand: &Demand) -> Result<Admission, LimiterError> {
        let mut primary = self.usable_primary();
        if primary.is_some() && self.fallback_pending() {
            // Redis is back: what was admitted without it reaches Redis before Redis admits
            // anything more. Requests meanwhile wait for the gate, then find nothing to sync.
            let _gate = self.sync_gate.lock().await;
            if self.fallback_pending() {
                if self.sync_fallback().await.is_none() {
                    self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.mark(false);
                    primary = None;
                } else {
                    *crate::sync::lock(&self.grace_until) = Some(Instant::now() + GRACE_AFTER_OUTAGE);
                }
            }
        }
        if let Some(primary) = primary {
            let in_grace = crate::sync::lock(&self.grace_until).is_some_and(|t| Instant::now() < t);
            if in_grace {
                // The other replicas may not have told Redis yet what they admitted alone.
                let local = self.fallback.shadow(scopes, demand).await?;
                if local.refusal.is_some() {
                    return Ok(local);
                }
            }
            let asked = Instant::now();
            let mut result = primary.reserve(scopes, demand).await;
            if result.is_err() && stalled(asked.elapsed(), primary.timeout()) {
                // The call failed long after its timeout: this process did not run meanwhile
                // (paused, starved), Redis did not fail. Falling back now would judge from a view
                // as old as the pause while the other replicas kept admitting; ask Redis again.
                tracing::info!(
                    elapsed_ms = asked.elapsed().as_millis() as u64,
                    "limiter call outlived its timeout; asking again"
                );
                result = primary.reserve(scopes, demand).await;
            }
            if matches!(result, Err(LimiterError::Lost)) {
                // Redis restarted empty: bring every scope seen in the last minute back up to
                // what Redis had counted (and what was admitted without it), then ask again.
                let _gate = self.sync_gate.lock().await;
                self.needs_floors.store(true, std::sync::atomic::Ordering::Release);
                self.sync_fallback().await;
                result = primary.reserve(scopes, demand).await;
            }
            match result {
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

/// Whether a Redis call that took `elapsed` failed because this process was not running rather
/// than because Redis did not answer: a call is abandoned after its timeout (twice that for a
/// coalesced batch), so one that ends much later was not being waited for.
fn stalled(elapsed: Duration, timeout: Duration) -> bool {
    elapsed > timeout * 3 + Duration::from_millis(500)
}

impl ResilientLimiter {
    /// Settles (`Some((tokens, nano-USD))`) or releases (`None`) a reservation that was admitted
    /// wholly from quota leases, here and now: no Redis call, nothing to wait for. Returns false
    /// (and does nothing) for any other reservation.
    pub fn settle_leased(&self, reservation: &Reservation, used: Option<(u64, i64)>) -> bool {
        let leased = !reservation.local && reservation.held.iter().all(|h| h.lease.is_some());
        match self.primary.get() {
            Some(p) if leased => {
                p.leases().settle(&reservation.held, &reservation.demand, used);
                true
            }
            _ => false,
        }
    }

    /// Sends again a Redis settlement (`Some(cost)`) or release (`None`) whose call failed.
    pub async fn resettle(&self, reservation: &Reservation, cost_nanos: Option<i64>) -> Result<(), LimiterError> {
        match self.usable_primary() {
            Some(p) => p.resettle(reservation, cost_nanos).await,
            None => Err(LimiterError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_ending_long_after_its_timeout_was_not_being_waited_for() {
        let timeout = Duration::from_millis(50);
        // A timeout, even a coalesced batch's (twice the timeout) on a busy runtime, is Redis.
        assert!(!stalled(Duration::from_millis(50), timeout));
        assert!(!stalled(Duration::from_millis(400), timeout));
        // Five seconds for a 50 ms call: the process was paused (SIGSTOP) or starved.
        assert!(stalled(Duration::from_secs(5), timeout));
        assert!(!stalled(Duration::from_millis(3400), Duration::from_secs(1)));
        assert!(stalled(Duration::from_secs(4), Duration::from_secs(1)));
    }
}
