//! [`Limiter`] on Redis (one node or a Redis Cluster): one `scope.lua` call per scope, all scopes
//! of a request in one pipeline, every call bounded by a short timeout.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
    time::Duration,
};

use async_trait::async_trait;
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult, Value,
};

use super::*;

/// The per-scope script, loaded from `scope.lua`.
pub static SCOPE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("scope.lua")));

/// A connection to one Redis node or to a Redis Cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// `redis://host:port` is one node; several comma-separated URLs, or `redis+cluster://h1:p1,h2:p2`,
    /// are a cluster.
    pub async fn connect(url: &str, timeout: Duration) -> RedisResult<Self> {
        let nodes: Vec<String> = match url.strip_prefix("redis+cluster://") {
            Some(rest) => rest.split(',').map(|n| format!("redis://{}", n.trim())).collect(),
            None => url.split(',').map(|n| n.trim().to_string()).collect(),
        };
        let cluster = url.starts_with("redis+cluster://") || nodes.len() > 1;
        if cluster {
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            Ok(RedisConn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(nodes[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout)
                .set_number_of_retries(1);
            Ok(RedisConn::Single(ConnectionManager::new_with_config(client, config).await?))
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, cmd: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisLimiter {
    conn: RedisConn,
    timeout: Duration,
    lease_secs: u64,
    /// Added to Redis TIME; 0 outside tests of period boundaries.
    clock_offset_secs: i64,
    seed: Arc<dyn SpendSource>,
    /// What each reservation saw, for the fallback to start from.
    observations: Arc<Observations>,
}

/// Keeps this replica in the live set and answers how many replicas are live.
static HEARTBEAT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("heartbeat.lua")));

/// One scope's answer to `reserve`.
type Reply = (i64, i64, i64, String, i64, i64, i64, i64, i64, i64);

impl RedisLimiter {
    pub fn new(conn: RedisConn, timeout: Duration, lease_secs: u64, clock_offset_secs: i64, seed: Arc<dyn SpendSource>) -> Self {
        Self { conn, timeout, lease_secs, clock_offset_secs, seed, observations: Arc::default() }
    }

    pub fn with_observations(mut self, observations: Arc<Observations>) -> Self {
        self.observations = observations;
        self
    }

    /// Adds spend admitted elsewhere (by the fallback; `(scope, micro-USD, settled at)`) to each
    /// scope's current budget period, unless the period was seeded after it was settled.
    pub async fn add_spend(&self, spends: &[(Scope, i64, i64)]) -> Result<(), LimiterError> {
        let calls: Vec<_> = spends
            .iter()
            .filter(|(s, cost, _)| s.limits.max_budget.is_some() && *cost > 0)
            .map(|(scope, cost, at)| {
                let mut inv = SCOPE_SCRIPT.prepare_invoke();
                let d = Demand { request_id: String::new(), tokens: 0, cost_micros: *cost };
                self.base_args(&mut inv, "spend", scope, &d);
                inv.arg(at);
                inv
            })
            .collect();
        if calls.is_empty() {
            return Ok(());
        }
        self.run_all::<Value>(&calls).await.map(|_| ())
    }

    /// Marks `replica` alive and returns how many replicas were alive in the last `window`.
    pub async fn heartbeat(&self, replica: &str, window: Duration) -> Result<u32, LimiterError> {
        let mut conn = self.conn.clone();
        let mut inv = HEARTBEAT_SCRIPT.prepare_invoke();
        inv.key("tg:{replicas}").arg(replica).arg(window.as_millis() as u64);
        let live: u32 = self.bounded(async move { inv.invoke_async(&mut conn).await }).await?;
        Ok(live.max(1))
    }

    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Loads the script on every node (a pipeline can only use EVALSHA).
    pub async fn load_script(&self) -> Result<(), LimiterError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(include_str!("scope.lua"));
        self.bounded(async move { cmd.query_async::<Value>(&mut conn).await }).await?;
        Ok(())
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = RedisResult<T>>) -> Result<T, LimiterError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(LimiterError::Timeout),
        }
    }

    fn base_args<'a>(&self, inv: &mut redis::ScriptInvocation<'a>, op: &str, scope: &Scope, demand: &Demand) {
        let l = &scope.limits;
        inv.key(scope.redis_prefix())
            .arg(op)
            .arg(&demand.request_id)
            .arg(l.rpm.unwrap_or(-1))
            .arg(l.tpm.unwrap_or(-1))
            .arg(l.max_budget_micros().unwrap_or(-1))
            .arg(period_arg(l.budget_period))
            .arg(demand.tokens)
            .arg(demand.cost_micros)
            .arg(self.lease_secs)
            .arg(self.clock_offset_secs)
            .arg(enforcement_arg(l.enforcement));
    }

    /// Runs `pipe`; if Redis lost the script, loads it and runs again once.
    async fn run<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, LimiterError> {
        let mut conn = self.conn.clone();
        match self.bounded(pipe.query_async::<T>(&mut conn)).await {
            Err(LimiterError::Redis(e)) if e.kind() == ErrorKind::NoScriptError => {
                self.load_script().await?;
                self.bounded(pipe.query_async::<T>(&mut conn)).await
            }
            other => other,
        }
    }

    /// Runs one script call per scope in one round trip: a pipeline on one node; on a cluster
    /// (whose pipelines cannot span slots) concurrent calls, one per scope's slot.
    async fn run_all<T: redis::FromRedisValue + Send>(&self, calls: &[redis::ScriptInvocation<'_>]) -> Result<Vec<T>, LimiterError> {
        match &self.conn {
            RedisConn::Single(_) => {
                let mut pipe = redis::pipe();
                for call in calls {
                    pipe.invoke_script(call);
                }
                self.run(&pipe).await
            }
            RedisConn::Cluster(_) => {
                let each = calls.iter().map(|call| {
                    let mut pipe = redis::pipe();
                    pipe.invoke_script(call);
                    async move {
                        let mut one: Vec<T> = self.run(&pipe).await?;
                        one.pop().ok_or_else(|| LimiterError::Protocol("empty reply".into()))
                    }
                });
                futures::future::join_all(each).await.into_iter().collect()
            }
        }
    }

    async fn reserve_pass(&self, scopes: &[&Scope], demand: &Demand, seeds: &HashMap<usize, i64>) -> Result<Vec<Reply>, LimiterError> {
        let calls: Vec<_> = scopes
            .iter()
            .enumerate()
            .map(|(i, scope)| {
                let mut inv = SCOPE_SCRIPT.prepare_invoke();
                self.base_args(&mut inv, "reserve", scope, demand);
                inv.arg(seeds.get(&i).map(|s| s.to_string()).unwrap_or_default());
                inv
            })
            .collect();
        self.run_all(&calls).await
    }

    async fn undo(&self, op: &str, held: &[Held], demand: &Demand, tokens: u64, cost: i64) -> Result<(), LimiterError> {
        if held.is_empty() {
            return Ok(());
        }
        let actual = Demand { tokens, cost_micros: cost, ..demand.clone() };
        let calls: Vec<_> = held
            .iter()
            // A settlement changes only tokens and spend: scopes with neither need no call.
            .filter(|h| op != "settle" || h.scope.limits.tpm.is_some() || h.scope.limits.max_budget.is_some())
            .map(|h| {
                let mut inv = SCOPE_SCRIPT.prepare_invoke();
                self.base_args(&mut inv, op, &h.scope, &actual);
                inv.arg(h.made_at).arg(demand.tokens).arg(&h.period);
                inv
            })
            .collect();
        if calls.is_empty() {
            return Ok(());
        }
        self.run_all::<Value>(&calls).await.map(|_| ())
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn reserve(&self, scopes: &[Scope], demand: &Demand) -> Result<Admission, LimiterError> {
        let scopes: Vec<&Scope> = scopes.iter().filter(|s| !s.limits.is_empty()).collect();
        if scopes.is_empty() {
            return Ok(Admission {
                refusal: None,
                warnings: vec![],
                standing: Standing::default(),
                reservation: Some(Reservation { demand: demand.clone(), held: vec![], local: false }),
            });
        }
        let mut replies = self.reserve_pass(&scopes, demand, &HashMap::new()).await?;
        // Budgets Redis no longer holds are seeded from PostgreSQL's rollups, then reserved.
        let missing: Vec<usize> = replies.iter().enumerate().filter(|(_, r)| r.0 == -1).map(|(i, _)| i).collect();
        if !missing.is_empty() {
            let mut seeds = HashMap::new();
            for &i in &missing {
                let since = period_start(&replies[i].3)
                    .ok_or_else(|| LimiterError::Protocol(format!("period {}", replies[i].3)))?;
                seeds.insert(i, self.seed.spent_micros(scopes[i], since).await.map_err(LimiterError::Seed)?);
            }
            let only: Vec<&Scope> = missing.iter().map(|&i| scopes[i]).collect();
            let seeded: HashMap<usize, i64> = missing.iter().enumerate().map(|(j, i)| (j, seeds[i])).collect();
            let again = self.reserve_pass(&only, demand, &seeded).await?;
            for (j, &i) in missing.iter().enumerate() {
                replies[i] = again[j].clone();
            }
        }

        let mut held = Vec::new();
        let mut refusal = None;
        let mut warnings = Vec::new();
        let mut standing = Standing::default();
        for (scope, r) in scopes.iter().zip(&replies) {
            let (status, reason, now, period, rpm_used, rpm_reset, tpm_used, tpm_reset, left, retry) = r.clone();
            self.observations.record(
                scope.redis_prefix(),
                LastKnown { at: now, rpm_used, tpm_used, budget_left: scope.limits.max_budget.map(|_| left) },
            );
            let reason = match reason {
                1 => Some(Reason::Rpm),
                2 => Some(Reason::Tpm),
                3 => Some(Reason::Budget),
                _ => None,
            };
            if let Some(rpm) = scope.limits.rpm {
                let remaining = (rpm - rpm_used).max(0) as u64;
                if standing.remaining_requests.is_none_or(|r| remaining < r) {
                    standing.limit_requests = Some(rpm as u64);
                    standing.remaining_requests = Some(remaining);
                    standing.reset_requests_secs = rpm_reset.max(0) as u64;
                }
            }
            if let Some(tpm) = scope.limits.tpm {
                let remaining = (tpm - tpm_used).max(0) as u64;
                if standing.remaining_tokens.is_none_or(|r| remaining < r) {
                    standing.limit_tokens = Some(tpm as u64);
                    standing.remaining_tokens = Some(remaining);
                    standing.reset_tokens_secs = tpm_reset.max(0) as u64;
                }
            }
            match status {
                0 => {
                    if refusal.is_none() {
                        refusal = Some(Refusal {
                            scope: scope.kind,
                            reason: reason.unwrap_or(Reason::Rpm),
                            retry_after: retry.max(0) as u64,
                        });
                    }
                }
                1 | 2 => {
                    if let (2, Some(reason)) = (status, reason) {
                        warnings.push((scope.kind, reason));
                    }
                    held.push(Held { scope: (*scope).clone(), made_at: now, period: period.clone() });
                }
                other => return Err(LimiterError::Protocol(format!("status {other}"))),
            }
        }
        if refusal.is_some() {
            self.undo("refund", &held, demand, demand.tokens, demand.cost_micros).await?;
            return Ok(Admission { refusal, warnings, standing, reservation: None });
        }
        Ok(Admission { refusal: None, warnings, standing, reservation: Some(Reservation { demand: demand.clone(), held, local: false }) })
    }

    async fn settle(&self, reservation: &Reservation, tokens: u64, cost_micros: i64) -> Result<(), LimiterError> {
        self.undo("settle", &reservation.held, &reservation.demand, tokens, cost_micros).await
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        let d = &reservation.demand;
        self.undo("refund", &reservation.held, d, d.tokens, d.cost_micros).await
    }
}
