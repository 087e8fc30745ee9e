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
use tokio::sync::{mpsc, oneshot};

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

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
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
    /// On one node, calls of concurrent requests go to Redis together (see [`Coalescer`]).
    coalescer: Option<mpsc::Sender<Pending>>,
}

/// Keeps this replica in the live set and answers how many replicas are live.
static HEARTBEAT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("heartbeat.lua")));

/// One scope's answer to `reserve`.
type Reply = (i64, i64, i64, String, i64, i64, i64, i64, i64, i64, i64);

/// One request's part of a script call: its scopes, with each scope's extra fields
/// (see scope.lua: `a`, `b`, `c`).
#[derive(Clone)]
struct Call {
    request_id: String,
    tokens: u64,
    cost: i64,
    entries: Vec<(Scope, String, String, String)>,
}

/// A call waiting to be sent with others.
struct Pending {
    op: &'static str,
    call: Call,
    done: oneshot::Sender<Result<Vec<Reply>, String>>,
}

/// The most calls one script invocation carries.
const MAX_BATCH: usize = 128;

impl RedisLimiter {
    pub fn new(
        conn: RedisConn,
        timeout: Duration,
        lease_secs: u64,
        clock_offset_secs: i64,
        seed: Arc<dyn SpendSource>,
    ) -> Self {
        let mut limiter =
            Self { conn, timeout, lease_secs, clock_offset_secs, seed, observations: Arc::default(), coalescer: None };
        if let RedisConn::Single(_) = limiter.conn {
            let (tx, rx) = mpsc::channel(4096);
            tokio::spawn(Coalescer { conn: limiter.conn.clone(), timeout, lease_secs, clock_offset_secs }.run(rx));
            limiter.coalescer = Some(tx);
        }
        limiter
    }

    pub fn with_observations(mut self, observations: Arc<Observations>) -> Self {
        self.observations = observations;
        self
    }

    /// Tells Redis what a replica's fallback admitted in one scope while Redis was away: its
    /// requests and tokens go into the windows (seconds still in them), its spend into the
    /// current budget period unless that period was seeded after the spend was settled. A sync is
    /// applied once under its id, however often it is sent.
    /// How long one call may take before it counts as failed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub async fn sync(&self, sync: &ScopeSync) -> Result<(), LimiterError> {
        let windows: Vec<String> = sync.windows.iter().map(|(s, r, t)| format!("{s}:{r}:{t}")).collect();
        let floor = sync.floor.map(|(at, r, t)| format!("{at}:{r}:{t}")).unwrap_or_default();
        let call = Call {
            request_id: sync.id.clone(),
            tokens: 0,
            cost: sync.spend_nanos,
            entries: vec![(sync.scope.clone(), sync.settled_from.to_string(), windows.join(","), floor)],
        };
        let inv = invocation("sync", std::slice::from_ref(&call), self.lease_secs, self.clock_offset_secs);
        run(&self.conn, self.timeout, &inv).await.map(|_: Value| ())
    }

    /// Sends again a settlement (`Some(cost)`) or release (`None`) whose first call failed: it
    /// counts once, however many of its calls reached Redis (see `resettle` in scope.lua).
    pub async fn resettle(&self, reservation: &Reservation, cost_nanos: Option<i64>) -> Result<(), LimiterError> {
        let d = &reservation.demand;
        self.undo("resettle", &reservation.held, d, 0, cost_nanos.unwrap_or(0)).await
    }

    /// Raises `scope`'s spend in budget period `period` (e.g. `m202611`) to `spent_nanos`, less
    /// what is still reserved, when Redis holds less: a settlement that never arrived. Returns
    /// the nano-USD added (0 when Redis agrees, is ahead, or is in another period).
    pub async fn reconcile(&self, scope: &Scope, period: &str, spent_nanos: i64) -> Result<i64, LimiterError> {
        let call = Call {
            request_id: String::new(),
            tokens: 0,
            cost: spent_nanos,
            entries: vec![(scope.clone(), period.to_string(), String::new(), String::new())],
        };
        let inv = invocation("reconcile", std::slice::from_ref(&call), self.lease_secs, self.clock_offset_secs);
        let value: Value = run(&self.conn, self.timeout, &inv).await?;
        let added: Vec<i64> = redis::from_redis_value(&value).map_err(LimiterError::Redis)?;
        Ok(added.first().copied().unwrap_or(0))
    }

    /// Marks `replica` alive and returns how many replicas were alive in the last `window`.
    pub async fn heartbeat(&self, replica: &str, window: Duration) -> Result<u32, LimiterError> {
        let mut conn = self.conn.clone();
        let mut inv = HEARTBEAT_SCRIPT.prepare_invoke();
        inv.key("tg:{replicas}").arg(replica).arg(window.as_millis() as u64);
        let live: u32 = bounded(self.timeout, async move { inv.invoke_async(&mut conn).await }).await?;
        Ok(live.max(1))
    }

    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Loads the script on every node (pipelines can only use EVALSHA).
    pub async fn load_script(&self) -> Result<(), LimiterError> {
        load_script(&self.conn, self.timeout).await
    }

    /// One request's call, answered per scope. On one node it joins the coalescer's next batch;
    /// on a cluster each scope is its own call (one slot each), all at once.
    async fn call(&self, op: &'static str, call: Call) -> Result<Vec<Reply>, LimiterError> {
        if let Some(tx) = &self.coalescer {
            let (done, answer) = oneshot::channel();
            tx.send(Pending { op, call, done }).await.map_err(|_| LimiterError::Protocol("limiter stopped".into()))?;
            return match tokio::time::timeout(self.timeout * 2, answer).await {
                Ok(Ok(Ok(replies))) => Ok(replies),
                Ok(Ok(Err(e))) => Err(LimiterError::Protocol(e)),
                Ok(Err(_)) => Err(LimiterError::Protocol("limiter stopped".into())),
                Err(_) => Err(LimiterError::Timeout),
            };
        }
        let each = call.entries.iter().map(|entry| {
            let single = Call { entries: vec![entry.clone()], ..call.clone() };
            async move {
                let inv = invocation(op, std::slice::from_ref(&single), self.lease_secs, self.clock_offset_secs);
                let value: Value = run(&self.conn, self.timeout, &inv).await?;
                Ok::<_, LimiterError>(replies_of(op, &value, 1)?.pop().unwrap_or_default())
            }
        });
        let per_scope: Vec<Vec<Reply>> = futures::future::join_all(each).await.into_iter().collect::<Result<_, _>>()?;
        Ok(per_scope.into_iter().flatten().collect())
    }

    fn call_for(
        &self,
        scopes: &[&Scope],
        demand: &Demand,
        extra: impl Fn(usize, &Scope) -> (String, String, String),
    ) -> Call {
        Call {
            request_id: demand.request_id.clone(),
            tokens: demand.tokens,
            cost: demand.cost_nanos,
            entries: scopes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let (a, b, c) = extra(i, s);
                    ((*s).clone(), a, b, c)
                })
                .collect(),
        }
    }

    async fn undo(
        &self,
        op: &'static str,
        held: &[Held],
        demand: &Demand,
        tokens: u64,
        cost: i64,
    ) -> Result<(), LimiterError> {
        // A settlement changes only tokens and spend, a repeated one only spend: scopes with
        // neither need no call.
        let held: Vec<&Held> = held
            .iter()
            .filter(|h| match op {
                "settle" => h.scope.limits.tpm.is_some() || h.scope.limits.max_budget.is_some(),
                "resettle" => h.scope.limits.max_budget.is_some(),
                _ => true,
            })
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let call = Call {
            request_id: demand.request_id.clone(),
            tokens,
            cost,
            entries: held
                .iter()
                .map(|h| (h.scope.clone(), h.made_at.to_string(), demand.tokens.to_string(), h.period.clone()))
                .collect(),
        };
        self.call(op, call).await.map(|_| ())
    }
}

async fn bounded<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = RedisResult<T>>,
) -> Result<T, LimiterError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(LimiterError::Timeout),
    }
}

async fn load_script(conn: &RedisConn, timeout: Duration) -> Result<(), LimiterError> {
    let mut conn = conn.clone();
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(include_str!("scope.lua"));
    bounded(timeout, async move { cmd.query_async::<Value>(&mut conn).await }).await?;
    Ok(())
}

/// Runs one script invocation; if Redis lost the script, loads it and runs again once.
async fn run(conn: &RedisConn, timeout: Duration, inv: &redis::ScriptInvocation<'_>) -> Result<Value, LimiterError> {
    let mut c = conn.clone();
    let mut pipe = redis::pipe();
    pipe.invoke_script(inv);
    let first: Result<(Value,), LimiterError> = bounded(timeout, pipe.query_async(&mut c)).await;
    match first {
        Ok((v,)) => Ok(v),
        Err(LimiterError::Redis(e)) if e.kind() == ErrorKind::NoScriptError => {
            load_script(conn, timeout).await?;
            let (v,): (Value,) = bounded(timeout, pipe.query_async(&mut c)).await?;
            Ok(v)
        }
        Err(e) => Err(e),
    }
}

/// The script invocation for a batch of calls (see scope.lua for the layout).
fn invocation<'a>(op: &str, calls: &[Call], lease_secs: u64, offset: i64) -> redis::ScriptInvocation<'a> {
    let mut inv = SCOPE_SCRIPT.prepare_invoke();
    let mut keys: Vec<String> = Vec::new();
    inv.arg(op).arg(lease_secs).arg(offset).arg(calls.len());
    for call in calls {
        inv.arg(&call.request_id).arg(call.tokens).arg(call.cost).arg(call.entries.len());
        for (scope, a, b, c) in &call.entries {
            let prefix = scope.redis_prefix();
            let index = match keys.iter().position(|k| *k == prefix) {
                Some(i) => i + 1,
                None => {
                    keys.push(prefix);
                    keys.len()
                }
            };
            let l = &scope.limits;
            inv.arg(index)
                .arg(l.rpm.unwrap_or(-1))
                .arg(l.tpm.unwrap_or(-1))
                .arg(l.max_budget_nanos().unwrap_or(-1))
                .arg(period_arg(l.budget_period))
                .arg(enforcement_arg(l.enforcement))
                .arg(a)
                .arg(b)
                .arg(c);
        }
    }
    for k in keys {
        inv.key(k);
    }
    inv
}

/// Per-call replies: scope replies for `reserve`, nothing for the other ops.
fn replies_of(op: &str, value: &Value, calls: usize) -> Result<Vec<Vec<Reply>>, LimiterError> {
    if op != "reserve" {
        return Ok(vec![Vec::new(); calls]);
    }
    redis::from_redis_value::<Vec<Vec<Reply>>>(value).map_err(LimiterError::Redis)
}

/// Sends the calls of concurrent requests to Redis together: whatever arrived while the previous
/// batch was in flight goes in the next script invocation, in arrival order. A lone request pays
/// nothing extra; under load one round trip and one script run serve many requests.
struct Coalescer {
    conn: RedisConn,
    timeout: Duration,
    lease_secs: u64,
    clock_offset_secs: i64,
}

impl Coalescer {
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            for op in ["reserve", "settle", "refund", "resettle"] {
                let (group, rest): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(|p| p.op == op);
                batch = rest;
                if group.is_empty() {
                    continue;
                }
                let calls: Vec<Call> = group.iter().map(|p| p.call.clone()).collect();
                let inv = invocation(op, &calls, self.lease_secs, self.clock_offset_secs);
                let result = run(&self.conn, self.timeout, &inv).await.and_then(|v| replies_of(op, &v, calls.len()));
                match result {
                    Ok(replies) => {
                        for (p, r) in group.into_iter().zip(replies) {
                            let _ = p.done.send(Ok(r));
                        }
                    }
                    Err(e) => {
                        let message = e.to_string();
                        for p in group {
                            let _ = p.done.send(Err(message.clone()));
                        }
                    }
                }
            }
        }
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
        let no_seed = |_: usize, _: &Scope| (String::new(), String::new(), String::new());
        let mut replies = self.call("reserve", self.call_for(&scopes, demand, no_seed)).await?;
        // Budgets Redis no longer holds are seeded from PostgreSQL's rollups, then reserved.
        let missing: Vec<usize> = replies.iter().enumerate().filter(|(_, r)| r.0 == -1).map(|(i, _)| i).collect();
        if !missing.is_empty() {
            let mut seeds = HashMap::new();
            for &i in &missing {
                let since = period_start(&replies[i].3)
                    .ok_or_else(|| LimiterError::Protocol(format!("period {}", replies[i].3)))?;
                seeds.insert(i, self.seed.spent_nanos(scopes[i], since).await.map_err(LimiterError::Seed)?);
            }
            if self.coalescer.is_some() {
                // One node: nothing of the request was applied; reserve it whole again.
                let with_seeds = |i: usize, _: &Scope| {
                    (seeds.get(&i).map(|s| s.to_string()).unwrap_or_default(), String::new(), String::new())
                };
                replies = self.call("reserve", self.call_for(&scopes, demand, with_seeds)).await?;
            } else {
                // Cluster: each scope stands alone; reserve the seeded ones now.
                let only: Vec<&Scope> = missing.iter().map(|&i| scopes[i]).collect();
                let with_seeds = |j: usize, _: &Scope| (seeds[&missing[j]].to_string(), String::new(), String::new());
                let again = self.call("reserve", self.call_for(&only, demand, with_seeds)).await?;
                for (j, &i) in missing.iter().enumerate() {
                    replies[i] = again[j].clone();
                }
            }
        }

        let mut held = Vec::new();
        let mut refusal = None;
        let mut warnings = Vec::new();
        let mut standing = Standing::default();
        let mut lost = false;
        for (scope, r) in scopes.iter().zip(&replies) {
            let (status, reason, now, period, rpm_used, rpm_reset, tpm_used, tpm_reset, left, retry, windows) =
                r.clone();
            // A window this replica saw in use within the minute is gone: Redis lost its data.
            if let Some(seen) = self.observations.last(&scope.redis_prefix()).filter(|o| now - o.at < 60) {
                let gone = |had: i64, bit: i64| had > 0 && windows & bit == 0;
                let rpm_gone = scope.limits.rpm.is_some() && gone(seen.rpm_used, 1);
                let tpm_gone = scope.limits.tpm.is_some() && gone(seen.tpm_used, 2);
                lost |= rpm_gone || tpm_gone;
            }
            self.observations.record(
                scope,
                LastKnown {
                    at: now,
                    rpm_used,
                    tpm_used,
                    budget_left: scope.limits.max_budget.map(|_| left),
                    ..LastKnown::default()
                },
            );
            let reason = match reason {
                1 => Some(Reason::Rpm),
                2 => Some(Reason::Tpm),
                3 => Some(Reason::Budget),
                _ => None,
            };
            standing.tighten(Reason::Rpm, scope.limits.rpm, rpm_used, rpm_reset);
            standing.tighten(Reason::Tpm, scope.limits.tpm, tpm_used, tpm_reset);
            match status {
                0 => {
                    if refusal.is_none() {
                        let (reason, retry_after) = (reason.unwrap_or(Reason::Rpm), retry.max(0) as u64);
                        let (limit, used) = match reason {
                            Reason::Tpm => (scope.limits.tpm, tpm_used),
                            _ => (scope.limits.rpm, rpm_used),
                        };
                        standing.refused(reason, limit, used, retry_after);
                        refusal = Some(Refusal { scope: scope.kind, reason, retry_after });
                    }
                }
                1 | 2 => {
                    if let (2, Some(reason)) = (status, reason) {
                        warnings.push((scope.kind, reason));
                    }
                    held.push(Held { scope: (*scope).clone(), made_at: now, period: period.clone() });
                }
                // Not applied because another scope of the request refused.
                3 => {}
                other => return Err(LimiterError::Protocol(format!("status {other}"))),
            }
        }
        if lost {
            // What this call applied goes back; the caller restores the windows and asks again.
            self.undo("refund", &held, demand, demand.tokens, demand.cost_nanos).await?;
            return Err(LimiterError::Lost);
        }
        if refusal.is_some() {
            // Only a cluster applies scopes one by one; on one node `held` is empty here.
            self.undo("refund", &held, demand, demand.tokens, demand.cost_nanos).await?;
            return Ok(Admission { refusal, warnings, standing, reservation: None });
        }
        Ok(Admission {
            refusal: None,
            warnings,
            standing,
            reservation: Some(Reservation { demand: demand.clone(), held, local: false }),
        })
    }

    async fn settle(&self, reservation: &Reservation, tokens: u64, cost_nanos: i64) -> Result<(), LimiterError> {
        self.undo("settle", &reservation.held, &reservation.demand, tokens, cost_nanos).await
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        let d = &reservation.demand;
        self.undo("refund", &reservation.held, d, d.tokens, d.cost_nanos).await
    }
}
