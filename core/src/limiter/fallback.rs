//! What limits mean while Redis is unreachable: each replica enforces its share of every limit
//! (limit / replicas: the count last seen through the heartbeat set in Redis, or the configured
//! expected count if that is more, so a replica that starts during an outage does not think it
//! is alone), starting from the usage last seen in Redis; a budget gets the replica's share of
//! its last known remaining (or, for a scope not seen yet, of what PostgreSQL says is left).
//! Shares are rounded down, so the replicas together never admit more than the limit.
//!
//! What the fallback admitted is kept per scope, aggregated (requests and tokens by second, spend
//! in all), and given to Redis when it answers again ([`FallbackLimiter::take_sync`]), so that
//! Redis counts it too. Local counts outlive a recovery: each outage starts from the larger of
//! what this replica admitted in the window and its part of what Redis last reported, so a
//! flapping Redis never hands out a fresh share.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use chrono::{Datelike, Utc};

use super::*;

/// What Redis last said about a scope.
#[derive(Debug, Clone, Copy, Default)]
pub struct LastKnown {
    pub at: i64,
    pub rpm_used: i64,
    pub tpm_used: i64,
    /// Budget left (nano-USD) after the last reservation, if the scope has a budget.
    pub budget_left: Option<i64>,
    /// How much the scope moved between this replica's last two calls: what the other replicas
    /// used in one of its gaps, and so about what they may have used since the last one, which
    /// an outage keeps this replica from seeing. Filled in by [`Observations::record`].
    pub rpm_step: i64,
    pub tpm_step: i64,
    pub budget_step: i64,
}

impl LastKnown {
    /// The figures with what the other replicas may have used since this was seen: what an
    /// outage starts from, so that a replica's stale view does not add up to more than the limit.
    fn with_unseen(self) -> LastKnown {
        LastKnown {
            rpm_used: self.rpm_used + self.rpm_step,
            tpm_used: self.tpm_used + self.tpm_step,
            budget_left: self.budget_left.map(|left| left - self.budget_step),
            ..self
        }
    }
}

/// Last known state of every scope, kept up to date by the Redis limiter.
#[derive(Default)]
pub struct Observations {
    scopes: Mutex<HashMap<String, (Scope, LastKnown)>>,
}

impl Observations {
    pub fn record(&self, scope: &Scope, mut seen: LastKnown) {
        let prefix = scope.redis_prefix();
        let mut scopes = crate::sync::lock(&self.scopes);
        if let Some((_, last)) = scopes.get(&prefix).filter(|(_, l)| seen.at - l.at < 60) {
            seen.rpm_step = (seen.rpm_used - last.rpm_used).max(0);
            seen.tpm_step = (seen.tpm_used - last.tpm_used).max(0);
            seen.budget_step = match (last.budget_left, seen.budget_left) {
                (Some(before), Some(now)) => (before - now).max(0),
                _ => 0,
            };
        }
        match scopes.get_mut(&prefix) {
            Some(entry) if entry.0 == *scope => entry.1 = seen,
            _ => {
                scopes.insert(prefix, (scope.clone(), seen));
            }
        }
    }

    /// Scopes last seen at or after second `since`, with what was seen (raw).
    fn recent(&self, since: i64) -> Vec<(String, (Scope, LastKnown))> {
        let mut scopes = crate::sync::lock(&self.scopes);
        scopes.retain(|_, (_, seen)| seen.at >= since - 60);
        scopes.iter().filter(|(_, (_, seen))| seen.at >= since).map(|(p, v)| (p.clone(), v.clone())).collect()
    }

    /// What Redis last said of `prefix`, as it said it.
    pub fn last(&self, prefix: &str) -> Option<LastKnown> {
        crate::sync::lock(&self.scopes).get(prefix).map(|(_, l)| *l)
    }

    /// What an outage starts from for `prefix`: the last figures plus what was not seen.
    fn get(&self, prefix: &str) -> Option<LastKnown> {
        crate::sync::lock(&self.scopes).get(prefix).map(|(_, l)| l.with_unseen())
    }
}

#[derive(Default)]
struct LocalScope {
    /// (second, requests, tokens) buckets of the last 60 seconds.
    buckets: VecDeque<(i64, i64, i64)>,
    /// This replica's budget share left, once known.
    budget_left: Option<i64>,
    /// The outage this scope's figures were last brought up to date for.
    outage: u64,
}

/// What the fallback admitted in one scope that Redis has not been told about: requests and
/// tokens by second (those still in a window), and spend, with when it was first settled.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeSync {
    pub scope: Scope,
    /// Names this sync for Redis, which applies a sync once, however often it is sent.
    pub id: String,
    pub windows: Vec<(i64, i64, i64)>,
    pub spend_nanos: i64,
    /// The first settlement's second: a budget seeded after it already counts (some of) it.
    pub settled_from: i64,
    /// What Redis last counted in the scope's windows before the outage (`(second, requests,
    /// tokens)`): a Redis that came back empty is brought up to it, so that what it admitted
    /// before it lost its data still counts.
    pub floor: Option<(i64, i64, i64)>,
}

impl LocalScope {
    fn used(&mut self, now: i64) -> (i64, i64) {
        while self.buckets.front().is_some_and(|b| b.0 <= now - 60) {
            self.buckets.pop_front();
        }
        self.buckets.iter().fold((0, 0), |(r, t), b| (r + b.1, t + b.2))
    }

    /// Adds to the bucket of second `sec`; a second older than every bucket is out of the
    /// window already and is ignored.
    fn add(&mut self, sec: i64, requests: i64, tokens: i64) {
        if let Some(b) = self.buckets.iter_mut().rev().find(|b| b.0 == sec) {
            b.1 += requests;
            b.2 += tokens;
        } else if self.buckets.back().is_none_or(|b| b.0 < sec) {
            self.buckets.push_back((sec, requests, tokens));
        }
    }
}

pub struct FallbackLimiter {
    /// What was admitted here that Redis has not been told about yet, by scope prefix; open to
    /// more until it is sent.
    unsynced: Mutex<HashMap<String, ScopeSync>>,
    /// Syncs sent whose calls failed: sent again as they are, never added to (the first call
    /// may have arrived, and Redis applies an id once).
    resend: Mutex<Vec<ScopeSync>>,
    /// Replicas last seen through the heartbeat (0: never seen).
    live_replicas: Arc<AtomicU32>,
    /// The most replicas that run at once, as configured: the floor of the count.
    expected_replicas: u32,
    observations: Arc<Observations>,
    seed: Arc<dyn SpendSource>,
    scopes: Mutex<HashMap<String, LocalScope>>,
    /// Counts outages; a scope's local figures are brought up to date once per outage.
    outage: AtomicU64,
    /// Whether `unsynced` holds anything (read on every request while Redis is up).
    dirty: AtomicBool,
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn share(limit: i64, replicas: i64) -> i64 {
    limit.max(0) / replicas.max(1)
}

impl FallbackLimiter {
    pub fn new(
        live_replicas: Arc<AtomicU32>,
        expected_replicas: u32,
        observations: Arc<Observations>,
        seed: Arc<dyn SpendSource>,
    ) -> Self {
        Self {
            unsynced: Mutex::new(HashMap::new()),
            resend: Mutex::new(Vec::new()),
            live_replicas,
            expected_replicas: expected_replicas.max(1),
            observations,
            seed,
            scopes: Mutex::new(HashMap::new()),
            outage: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    /// The replicas a share is counted for.
    fn replicas(&self) -> i64 {
        self.live_replicas.load(Ordering::Relaxed).max(self.expected_replicas).max(1) as i64
    }

    /// A new outage begins: every scope's figures are brought up to date on its next request.
    pub fn begin_outage(&self) {
        self.outage.fetch_add(1, Ordering::AcqRel);
    }

    /// A budget share for a scope seen for the first time during the outage.
    async fn initial_budget(&self, scope: &Scope, budget: i64, replicas: i64) -> i64 {
        if let Some(left) = self.observations.get(&scope.redis_prefix()).and_then(|o| o.budget_left) {
            return share(left, replicas);
        }
        let today = Utc::now().date_naive();
        let since = match scope.limits.budget_period {
            BudgetPeriod::None => NaiveDate::from_ymd_opt(1970, 1, 1),
            BudgetPeriod::Daily => Some(today),
            BudgetPeriod::Weekly => {
                today.checked_sub_days(chrono::Days::new(today.weekday().num_days_from_monday() as u64))
            }
            BudgetPeriod::Monthly => today.with_day(1),
        }
        .unwrap_or(today);
        match self.seed.spent_nanos(scope, since).await {
            Ok(spent) => share(budget - spent, replicas),
            // Neither Redis nor PostgreSQL can say what is left: admit nothing against it.
            Err(_) => 0,
        }
    }
}

#[async_trait]
impl Limiter for FallbackLimiter {
    async fn reserve(&self, scopes: &[Scope], demand: &Demand) -> Result<Admission, LimiterError> {
        self.judge(scopes, demand, true).await
    }

    async fn settle(&self, reservation: &Reservation, tokens: u64, cost_nanos: i64) -> Result<(), LimiterError> {
        self.settle_local(reservation, tokens, cost_nanos)
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        self.release_local(reservation)
    }
}

impl FallbackLimiter {
    /// Just after Redis came back, before every replica has told it what it admitted alone: the
    /// share check, counted locally only (Redis counts the request itself). A refusal here
    /// stands; an admission still goes to Redis.
    pub async fn shadow(&self, scopes: &[Scope], demand: &Demand) -> Result<Admission, LimiterError> {
        self.judge(scopes, demand, false).await
    }

    /// Judges a request against this replica's shares; `for_redis`: an admission is kept for
    /// Redis to count when it answers again.
    async fn judge(&self, scopes: &[Scope], demand: &Demand, for_redis: bool) -> Result<Admission, LimiterError> {
        let replicas = self.replicas();
        let now = now_secs();
        let outage = self.outage.load(Ordering::Acquire);
        // Budgets not yet known locally are looked up before taking the lock.
        let mut initial = HashMap::new();
        for s in scopes.iter().filter(|s| s.limits.max_budget.is_some()) {
            let known = crate::sync::lock(&self.scopes)
                .get(&s.redis_prefix())
                .is_some_and(|l| l.budget_left.is_some() && l.outage == outage);
            if !known {
                let budget = s.limits.max_budget_nanos().unwrap_or(0);
                initial.insert(s.redis_prefix(), self.initial_budget(s, budget, replicas).await);
            }
        }
        let mut local = crate::sync::lock(&self.scopes);
        let mut refusal = None;
        let mut warnings = Vec::new();
        let mut standing = Standing::default();
        for s in scopes.iter().filter(|s| !s.limits.is_empty()) {
            let prefix = s.redis_prefix();
            let entry = local.entry(prefix.clone()).or_default();
            if entry.outage != outage {
                entry.outage = outage;
                // This replica's part of what Redis last counted in the window, unless what it
                // admitted itself in earlier outages is more.
                if let Some(o) = self.observations.get(&prefix).filter(|o| o.at > now - 60) {
                    let part = |used: i64| (used + replicas - 1) / replicas;
                    let (requests, tokens) = entry.used(now);
                    entry.add(o.at, (part(o.rpm_used) - requests).max(0), (part(o.tpm_used) - tokens).max(0));
                }
            }
            if let Some(v) = initial.get(&prefix) {
                // Never more than the share left from an earlier outage.
                entry.budget_left = Some(entry.budget_left.map_or(*v, |left| left.min(*v)));
            }
            let (requests, tokens) = entry.used(now);
            let over = if s.limits.rpm.is_some_and(|l| requests + 1 > share(l, replicas)) {
                Some(Reason::Rpm)
            } else if s.limits.tpm.is_some_and(|l| tokens + demand.tokens as i64 > share(l, replicas)) {
                Some(Reason::Tpm)
            } else if entry.budget_left.is_some_and(|left| demand.cost_nanos > left || left <= 0) {
                Some(Reason::Budget)
            } else {
                None
            };
            // This replica's share stands in for the limit; its uses leave within the window.
            let rpm_share = s.limits.rpm.map(|l| share(l, replicas));
            let tpm_share = s.limits.tpm.map(|l| share(l, replicas));
            standing.tighten(Reason::Rpm, rpm_share, requests, 1);
            standing.tighten(Reason::Tpm, tpm_share, tokens, 1);
            match (over, s.limits.enforcement) {
                (Some(reason), Enforcement::Hard) if refusal.is_none() => {
                    let (limit, used) = if reason == Reason::Tpm { (tpm_share, tokens) } else { (rpm_share, requests) };
                    standing.refused(reason, limit, used, 1);
                    refusal = Some(Refusal { scope: s.kind, reason, retry_after: 1 });
                }
                (Some(_), Enforcement::Hard) => {}
                (Some(reason), _) => warnings.push((s.kind, reason)),
                (None, _) => {}
            }
        }
        if refusal.is_some() {
            return Ok(Admission { refusal, warnings, standing, reservation: None });
        }
        for s in scopes.iter().filter(|s| !s.limits.is_empty()) {
            // Every limited scope got an entry in the check above.
            if let Some(entry) = local.get_mut(&s.redis_prefix()) {
                entry.add(now, 1, demand.tokens as i64);
                if let Some(left) = entry.budget_left.as_mut() {
                    *left -= demand.cost_nanos;
                }
            }
        }
        drop(local);
        let held = scopes
            .iter()
            .filter(|s| !s.limits.is_empty())
            .map(|s| Held { scope: s.clone(), made_at: now, period: String::new(), lease: None })
            .collect();
        let reservation = Reservation { demand: demand.clone(), held, local: true };
        if for_redis {
            // Redis counts the admission as soon as it answers again, not when the request ends.
            self.unsync(&reservation, 1, demand.tokens as i64, 0);
        }
        Ok(Admission { refusal: None, warnings, standing, reservation: Some(reservation) })
    }

    fn settle_local(&self, reservation: &Reservation, tokens: u64, cost_nanos: i64) -> Result<(), LimiterError> {
        let d = &reservation.demand;
        // The admission was synced already: now the real tokens and the spend.
        self.unsync(reservation, 0, tokens as i64 - d.tokens as i64, cost_nanos);
        let mut local = crate::sync::lock(&self.scopes);
        for h in &reservation.held {
            if let Some(entry) = local.get_mut(&h.scope.redis_prefix()) {
                entry.add(h.made_at, 0, tokens as i64 - d.tokens as i64);
                if let Some(left) = entry.budget_left.as_mut() {
                    *left += d.cost_nanos - cost_nanos;
                }
            }
        }
        Ok(())
    }

    fn release_local(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        let d = &reservation.demand;
        self.unsync(reservation, -1, -(d.tokens as i64), 0);
        let mut local = crate::sync::lock(&self.scopes);
        for h in &reservation.held {
            if let Some(entry) = local.get_mut(&h.scope.redis_prefix()) {
                entry.add(h.made_at, -1, -(d.tokens as i64));
                if let Some(left) = entry.budget_left.as_mut() {
                    *left += d.cost_nanos;
                }
            }
        }
        Ok(())
    }
}

impl FallbackLimiter {
    /// Adds what a settled request used to what Redis must be told, per scope.
    fn unsync(&self, reservation: &Reservation, requests: i64, tokens: i64, cost_nanos: i64) {
        let now = now_secs();
        let mut unsynced = crate::sync::lock(&self.unsynced);
        self.dirty.store(true, Ordering::Release);
        for h in &reservation.held {
            let pending = unsynced.entry(h.scope.redis_prefix()).or_insert_with(|| ScopeSync {
                scope: h.scope.clone(),
                id: uuid::Uuid::new_v4().to_string(),
                windows: Vec::new(),
                spend_nanos: 0,
                settled_from: now,
                floor: None,
            });
            match pending.windows.iter_mut().find(|w| w.0 == h.made_at) {
                Some(w) => (w.1, w.2) = (w.1 + requests, w.2 + tokens),
                None => pending.windows.push((h.made_at, requests, tokens)),
            }
            // Seconds out of every window no longer matter to Redis.
            pending.windows.retain(|w| w.0 > now - 60);
            pending.spend_nanos += cost_nanos.max(0);
        }
    }

    /// What was admitted here since the last call, one entry per scope, for Redis to add; with
    /// `floors`, also every scope Redis reported in the last minute, carrying what it counted.
    pub fn take_sync(&self, floors: bool) -> Vec<ScopeSync> {
        let mut syncs = {
            let mut unsynced = crate::sync::lock(&self.unsynced);
            self.dirty.store(false, Ordering::Release);
            std::mem::take(&mut *unsynced)
        };
        if floors {
            let now = now_secs();
            for (prefix, (scope, seen)) in self.observations.recent(now - 60) {
                let sync = syncs.entry(prefix).or_insert_with(|| ScopeSync {
                    scope,
                    id: uuid::Uuid::new_v4().to_string(),
                    windows: Vec::new(),
                    spend_nanos: 0,
                    settled_from: now,
                    floor: None,
                });
                // With what others may have admitted since: a floor a little high only refuses
                // a few requests early; one too low would admit them twice.
                let seen = seen.with_unseen();
                sync.floor = Some((seen.at, seen.rpm_used, seen.tpm_used));
            }
        }
        let mut out = std::mem::take(&mut *crate::sync::lock(&self.resend));
        out.extend(syncs.into_values());
        out
    }

    /// Whether anything admitted here waits for Redis.
    pub fn has_unsynced(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Syncs Redis did not take, kept under their ids and sent again as they are.
    pub fn put_back_sync(&self, syncs: Vec<ScopeSync>) {
        crate::sync::lock(&self.resend).extend(syncs);
        self.dirty.store(true, Ordering::Release);
    }
}
