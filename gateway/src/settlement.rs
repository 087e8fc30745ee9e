//! Keeping Redis budgets whole when a settlement cannot reach Redis. A settlement (or release)
//! whose call fails is kept in [`Unsettled`], bounded, and sent again every second until Redis
//! takes it; it counts once however many of its calls arrived (the `resettle` op). What is still
//! unsettled at shutdown is saved beside the usage spool and taken up by the next start. A budget
//! that missed a settlement anyway (dropped, or kept past its reservation's lease) is repaired by
//! [`BudgetScopes::reconcile`], which raises Redis's spend to PostgreSQL's rollups.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tollgate_core::{
    limiter::{period_id, period_start, RedisLimiter, Reservation, ResilientLimiter, Scope, SpendSource},
    sync::{lock, read, write},
};

use crate::metrics::Metrics;

/// A settlement Redis has not taken yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unsettled {
    pub reservation: Reservation,
    /// What the request cost (nano-USD), or `None`: its reservation is given back whole.
    pub cost_nanos: Option<i64>,
    pub failed_at: DateTime<Utc>,
}

/// Settlements waiting for Redis, oldest first.
pub struct UnsettledQueue {
    queue: Mutex<VecDeque<Unsettled>>,
    capacity: usize,
    /// Past this age a reservation's lease has returned it; only its spend is still missing,
    /// which [`BudgetScopes::reconcile`] restores from PostgreSQL.
    max_age: chrono::Duration,
    /// Settlements spawned and not yet finished (to wait for at shutdown).
    in_flight: AtomicUsize,
}

/// The file a stopping gateway leaves its unsettled settlements in: one per process.
const FILE_PREFIX: &str = "settlements-";

impl UnsettledQueue {
    pub fn new(capacity: usize, lease_seconds: u64) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            max_age: chrono::Duration::seconds(lease_seconds.try_into().unwrap_or(i64::MAX / 1000)),
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.queue).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a settlement under way until the returned guard drops.
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.in_flight)
    }

    /// Keeps a settlement that failed; when full, the oldest goes (counted; reconcile repairs it).
    pub fn push(&self, item: Unsettled, metrics: &Metrics) {
        let mut queue = lock(&self.queue);
        if queue.len() >= self.capacity {
            queue.pop_front();
            metrics.settlements_dropped.inc();
        }
        queue.push_back(item);
        metrics.settlements_pending.set(queue.len() as i64);
    }

    /// Sends every kept settlement again, oldest first; stops at the first failure (Redis is
    /// still away) and keeps the rest.
    pub async fn retry(&self, limiter: &ResilientLimiter, metrics: &Metrics) {
        let batch: Vec<Unsettled> = lock(&self.queue).drain(..).collect();
        let mut left = VecDeque::new();
        let mut failing = false;
        for item in batch {
            if Utc::now() - item.failed_at > self.max_age {
                metrics.settlements_dropped.inc();
                continue;
            }
            if !failing {
                match limiter.resettle(&item.reservation, item.cost_nanos).await {
                    Ok(()) => {
                        metrics.settlements_retried.inc();
                        continue;
                    }
                    Err(_) => failing = true,
                }
            }
            left.push_back(item);
        }
        let mut queue = lock(&self.queue);
        // Failures that arrived meanwhile are newer: they go after what is left.
        left.extend(queue.drain(..));
        *queue = left;
        metrics.settlements_pending.set(queue.len() as i64);
    }

    /// Waits up to `timeout` for settlements under way to finish (or fail into the queue).
    pub async fn drain_in_flight(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Writes what is kept to `dir`, for the next start (nothing when empty).
    pub fn save(&self, dir: &Path) -> std::io::Result<Option<PathBuf>> {
        let items: Vec<Unsettled> = lock(&self.queue).iter().cloned().collect();
        if items.is_empty() {
            return Ok(None);
        }
        let path = dir.join(format!("{FILE_PREFIX}{}.json", uuid::Uuid::new_v4()));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&items)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(Some(path))
    }

    /// Takes up the settlements stopped gateways left in `dir`. A file is removed once read;
    /// one that cannot be read is left for an operator, with a warning.
    pub fn load(&self, dir: &Path, metrics: &Metrics) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(FILE_PREFIX) || !name.ends_with(".json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<Vec<Unsettled>>(&bytes).map_err(|e| e.to_string()))
            {
                Ok(items) => {
                    tracing::info!(file = %path.display(), settlements = items.len(), "taking up unsettled settlements");
                    for item in items {
                        self.push(item, metrics);
                    }
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(file = %path.display(), error = %e, "could not remove a settlements file");
                    }
                }
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "unreadable settlements file left as is"),
            }
        }
    }
}

/// Marks one settlement under way.
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The scopes with budgets this replica has served lately, for [`BudgetScopes::reconcile`].
#[derive(Default)]
pub struct BudgetScopes {
    seen: RwLock<HashMap<String, (Scope, Instant)>>,
}

/// A scope not served for this long is no longer reconciled by this replica.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// How often a scope's last use is refreshed (a read lock otherwise).
const REFRESH_AFTER: Duration = Duration::from_secs(60);

impl BudgetScopes {
    pub fn note(&self, scopes: &[Scope]) {
        for scope in scopes.iter().filter(|s| s.limits.max_budget.is_some()) {
            let prefix = scope.redis_prefix();
            let fresh = read(&self.seen).get(&prefix).is_some_and(|(s, at)| s == scope && at.elapsed() < REFRESH_AFTER);
            if !fresh {
                write(&self.seen).insert(prefix, (scope.clone(), Instant::now()));
            }
        }
    }

    /// Compares each recently served budget's spend in Redis with PostgreSQL's rollups for the
    /// current period and raises Redis where it holds less. Returns the nano-USD added.
    pub async fn reconcile(&self, redis: &RedisLimiter, spend: &dyn SpendSource, metrics: &Metrics) -> i64 {
        let scopes: Vec<Scope> = {
            let mut seen = write(&self.seen);
            seen.retain(|_, (_, at)| at.elapsed() < FORGET_AFTER);
            seen.values().map(|(s, _)| s.clone()).collect()
        };
        let mut added = 0;
        for scope in scopes {
            let period = period_id(scope.limits.budget_period, Utc::now());
            let Some(since) = period_start(&period) else { continue };
            let spent = match spend.spent_nanos(&scope, since).await {
                Ok(spent) => spent,
                Err(e) => {
                    tracing::debug!(error = %e, "budget reconcile: rollups unavailable");
                    return added;
                }
            };
            match redis.reconcile(&scope, &period, spent).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(scope = scope.kind.as_str(), id = %scope.id, nano_usd = n, "budget missed spend; raised to PostgreSQL's rollups");
                    metrics.budget_reconciled_nanos.inc_by(n.max(0) as u64);
                    metrics.budget_reconcile_corrections.inc();
                    added += n;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "budget reconcile: redis unavailable");
                    return added;
                }
            }
        }
        added
    }
}
