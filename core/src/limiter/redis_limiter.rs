//! [`Limiter`] on Redis (one node or a Redis Cluster): one `scope.lua` call per scope, all scopes
//! of a request in one pipeline, every call bounded by a short timeout.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock, OnceLock,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Value,
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
    /// This replica's quota leases (off unless [`RedisLimiter::with_leases`]).
    leases: Arc<LeaseBook>,
    /// Set: each thread that calls gets a connection and coalescer of its own, on its own
    /// runtime (see [`RedisLimiter::with_worker_connections`]).
    worker_url: Option<String>,
    /// Tells this limiter's per-thread links from another's.
    id: u64,
}

static NEXT_LIMITER: AtomicU64 = AtomicU64::new(0);

/// A thread's own way to Redis for one limiter: its coalescer, once its connection is up.
struct WorkerLink {
    limiter: u64,
    ready: Arc<OnceLock<mpsc::Sender<Pending>>>,
    tried: Instant,
}

thread_local! {
    static WORKER_LINKS: RefCell<Vec<WorkerLink>> = const { RefCell::new(Vec::new()) };
}

/// A thread whose connection could not be made tries again after this long (meanwhile it uses
/// the shared one).
const WORKER_RETRY: Duration = Duration::from_secs(5);

/// Script calls made to Redis (round trips), for the gateway's metrics.
static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);

/// How many limiter script calls went to Redis since the last time this was asked.
pub fn take_round_trips() -> u64 {
    ROUND_TRIPS.swap(0, Ordering::Relaxed)
}

/// Keeps this replica in the live set and answers how many replicas are live.
static HEARTBEAT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("heartbeat.lua")));

/// What a call asks the script to do: `ARGV[1]` of `scope.lua`, whose header describes each op's
/// arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Takes a request against every scope's RPM, TPM and budget, or against none.
    Reserve,
    /// Gives a reservation back whole.
    Refund,
    /// Replaces a reservation with what was really used.
    Settle,
    /// Tells Redis what the fallback admitted while Redis was away.
    Sync,
    /// A settlement or refund sent again after a call that failed: applied once.
    Resettle,
    /// Raises a budget's spend to what PostgreSQL recorded.
    Reconcile,
    /// Tells Redis what became of a quota lease (see lease.rs).
    Return,
}

impl Op {
    /// The op's name in the script.
    pub fn wire_name(self) -> &'static str {
        match self {
            Op::Reserve => "reserve",
            Op::Refund => "refund",
            Op::Settle => "settle",
            Op::Sync => "sync",
            Op::Resettle => "resettle",
            Op::Reconcile => "reconcile",
            Op::Return => "return",
        }
    }
}

/// How the script judged one scope of a reservation (the first field of a [`ScopeReply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `1`: admitted, and applied.
    Admitted,
    /// `2`: admitted over a soft or monitor limit (the reply's reason says which), and applied.
    AdmittedOver,
    /// `0`: refused (the reply's reason says why, its `retry_after` when to ask again).
    Refused,
    /// `-1`: the scope's budget is not in Redis; reserve again with its spend so far as the seed.
    NeedsSeed,
    /// `3`: would have been admitted, but another scope of the request refused or needs a seed,
    /// so nothing of the request was applied.
    NotApplied,
}

impl TryFrom<i64> for Status {
    type Error = LimiterError;

    fn try_from(code: i64) -> Result<Self, LimiterError> {
        match code {
            1 => Ok(Status::Admitted),
            2 => Ok(Status::AdmittedOver),
            0 => Ok(Status::Refused),
            -1 => Ok(Status::NeedsSeed),
            3 => Ok(Status::NotApplied),
            other => Err(LimiterError::Protocol(format!("unknown status {other}"))),
        }
    }
}

/// Which of a scope's windows existed in Redis before a call (the last field of a
/// [`ScopeReply`]): a bitmask of [`Windows::RPM`] and [`Windows::TPM`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Windows(u8);

impl Windows {
    pub const NONE: Windows = Windows(0);
    pub const RPM: Windows = Windows(1);
    pub const TPM: Windows = Windows(2);

    /// Whether every window in `w` is in `self`.
    pub fn contains(self, w: Windows) -> bool {
        self.0 & w.0 == w.0
    }
}

impl TryFrom<i64> for Windows {
    type Error = LimiterError;

    fn try_from(bits: i64) -> Result<Self, LimiterError> {
        match u8::try_from(bits) {
            Ok(b) if b <= (Windows::RPM.0 | Windows::TPM.0) => Ok(Windows(b)),
            _ => Err(LimiterError::Protocol(format!("unknown windows {bits}"))),
        }
    }
}

/// One scope's answer to [`Op::Reserve`]: the script replies, per request, per scope, an array of
/// these thirteen fields in this order (`scope.lua` points here). Seconds are Redis seconds (TIME
/// plus the clock offset); counts are what the windows hold after the call.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeReply {
    /// `1` admitted, `2` admitted over a soft or monitor limit, `0` refused, `-1` the budget must
    /// be seeded, `3` not applied because another scope refused or needs a seed.
    pub status: Status,
    /// `0` none, `1` rpm, `2` tpm, `3` budget: why it was refused, or which soft limit it went over.
    pub reason: Option<Reason>,
    /// The second the script ran in.
    pub now: i64,
    /// The budget period the call fell in (e.g. `m202611`), or `""` without a budget.
    pub period: String,
    /// Requests in the RPM window.
    pub rpm_used: i64,
    /// Seconds until the oldest request leaves the RPM window (0: empty).
    pub rpm_reset: i64,
    /// Tokens in the TPM window.
    pub tpm_used: i64,
    /// Seconds until the oldest tokens leave the TPM window (0: empty).
    pub tpm_reset: i64,
    /// Nano-USD left in the budget (-1 without a budget).
    pub budget_left: i64,
    /// When refused, seconds until a retry may succeed (0: not within this budget period).
    pub retry_after: i64,
    /// Which windows existed before the call: a window a replica saw in use within the minute
    /// that no longer exists means Redis lost its data.
    pub windows: Windows,
    /// Requests like this one granted to the lease the call asked for (0: none; see lease.rs).
    pub lease_slots: i64,
    /// The second the granted slice is counted in (its last second).
    pub lease_bucket: i64,
}

/// The fields of a [`ScopeReply`], in the script's order.
const REPLY_FIELDS: [&str; 13] = [
    "status",
    "reason",
    "now",
    "period",
    "rpm_used",
    "rpm_reset",
    "tpm_used",
    "tpm_reset",
    "budget_left",
    "retry_after",
    "windows",
    "lease_slots",
    "lease_bucket",
];

impl ScopeReply {
    /// Decodes one scope's reply, naming what was wrong when it is malformed.
    pub fn decode(v: &Value) -> Result<Self, LimiterError> {
        let items = match v {
            Value::Array(items) => items,
            other => return Err(LimiterError::Protocol(format!("scope reply is not an array: {other:?}"))),
        };
        if items.len() != REPLY_FIELDS.len() {
            return Err(LimiterError::Protocol(format!(
                "scope reply has {} fields, expected {}",
                items.len(),
                REPLY_FIELDS.len()
            )));
        }
        let field = |i: usize| -> Result<i64, LimiterError> {
            redis::from_redis_value(&items[i])
                .map_err(|_| LimiterError::Protocol(format!("{} is not an integer: {:?}", REPLY_FIELDS[i], items[i])))
        };
        let reason = match field(1)? {
            0 => None,
            code => Some(Reason::try_from(code)?),
        };
        Ok(ScopeReply {
            status: Status::try_from(field(0)?)?,
            reason,
            now: field(2)?,
            period: redis::from_redis_value(&items[3])
                .map_err(|_| LimiterError::Protocol(format!("period is not a string: {:?}", items[3])))?,
            rpm_used: field(4)?,
            rpm_reset: field(5)?,
            tpm_used: field(6)?,
            tpm_reset: field(7)?,
            budget_left: field(8)?,
            retry_after: field(9)?,
            windows: Windows::try_from(field(10)?)?,
            lease_slots: field(11)?,
            lease_bucket: field(12)?,
        })
    }
}

impl FromRedisValue for ScopeReply {
    fn from_redis_value(v: &Value) -> RedisResult<Self> {
        ScopeReply::decode(v).map_err(|e| {
            let detail = match e {
                LimiterError::Protocol(detail) => detail,
                other => other.to_string(),
            };
            RedisError::from((ErrorKind::TypeError, "malformed limiter reply", detail))
        })
    }
}

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
    op: Op,
    call: Call,
    done: oneshot::Sender<Result<Vec<ScopeReply>, String>>,
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
        let mut limiter = Self {
            conn,
            timeout,
            lease_secs,
            clock_offset_secs,
            seed,
            observations: Arc::default(),
            coalescer: None,
            leases: Arc::new(LeaseBook::off()),
            worker_url: None,
            id: NEXT_LIMITER.fetch_add(1, Ordering::Relaxed),
        };
        if let RedisConn::Single(_) = limiter.conn {
            let (tx, rx) = mpsc::channel(4096);
            let shared =
                Coalescer { conn: limiter.conn.clone(), timeout, lease_secs, clock_offset_secs, keepalive: false };
            tokio::spawn(shared.run(rx));
            limiter.coalescer = Some(tx);
        }
        limiter
    }

    pub fn with_observations(mut self, observations: Arc<Observations>) -> Self {
        self.observations = observations;
        self
    }

    /// Admits from quota leases kept in `leases` (see lease.rs).
    pub fn with_leases(mut self, leases: Arc<LeaseBook>) -> Self {
        self.leases = leases;
        self
    }

    pub fn leases(&self) -> &LeaseBook {
        &self.leases
    }

    /// On one node: each thread that reserves (pingora's workers) gets its own connection to
    /// `url` and its own coalescer, spawned on that thread's runtime, so that a limiter call
    /// never leaves the worker's runtime (no wake-up of another runtime's thread, and back).
    /// Until a thread's connection is up, and if it cannot be made, the shared one serves.
    pub fn with_worker_connections(mut self, url: &str) -> Self {
        self.worker_url = Some(url.to_string());
        self
    }

    /// The coalescer for a call made on this thread (see [`RedisLimiter::with_worker_connections`]).
    fn coalescer_here(&self) -> Option<mpsc::Sender<Pending>> {
        let shared = self.coalescer.clone()?;
        let Some(url) = &self.worker_url else { return Some(shared) };
        let ready = WORKER_LINKS.with(|links| {
            let mut links = links.borrow_mut();
            links.retain(|l| !l.ready.get().is_some_and(|tx| tx.is_closed()));
            if let Some(l) = links.iter_mut().find(|l| l.limiter == self.id) {
                if l.ready.get().is_some() || l.tried.elapsed() < WORKER_RETRY {
                    return l.ready.clone();
                }
                l.tried = Instant::now();
            } else {
                links.push(WorkerLink { limiter: self.id, ready: Arc::default(), tried: Instant::now() });
            }
            let link = links.iter().find(|l| l.limiter == self.id).map(|l| l.ready.clone()).unwrap_or_default();
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return link };
            let (url, ready) = (url.clone(), link.clone());
            let (timeout, lease_secs, clock_offset_secs) = (self.timeout, self.lease_secs, self.clock_offset_secs);
            runtime.spawn(async move {
                match RedisConn::connect(&url, Duration::from_secs(2)).await {
                    Ok(conn) => {
                        let (tx, rx) = mpsc::channel(4096);
                        if ready.set(tx).is_ok() {
                            Coalescer { conn, timeout, lease_secs, clock_offset_secs, keepalive: true }.run(rx).await;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "worker's own redis connection failed; using the shared one"),
                }
            });
            link
        });
        match ready.get() {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            _ => Some(shared),
        }
    }

    /// Tells Redis what became of the quota leases that are due (`all`: every one, at
    /// shutdown). Returns how many returns Redis took; one that failed is sent again next time.
    pub async fn flush_leases(&self, all: bool) -> Result<usize, LimiterError> {
        let due = self.leases.due(all);
        let calls: Vec<Call> = due
            .iter()
            .map(|r| Call {
                request_id: r.request_id.clone(),
                tokens: 0,
                cost: r.spend,
                entries: vec![(r.scope.clone(), r.fields.clone(), String::new(), r.period.clone())],
            })
            .collect();
        // One node takes many in one call; on a cluster each scope is its own slot.
        let per_call = if self.coalescer.is_some() { MAX_BATCH } else { 1 };
        let mut result = Ok(0);
        for (returns, calls) in due.chunks(per_call).zip(calls.chunks(per_call)) {
            let inv = invocation(Op::Return, calls, self.lease_secs, self.clock_offset_secs);
            let sent = run(&self.conn, self.timeout, &inv).await;
            self.leases.acknowledge(returns, sent.is_ok());
            match sent {
                Ok(_) => result = result.map(|n| n + returns.len()),
                Err(e) => result = Err(e),
            }
        }
        result
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
        let inv = invocation(Op::Sync, std::slice::from_ref(&call), self.lease_secs, self.clock_offset_secs);
        run(&self.conn, self.timeout, &inv).await.map(|_: Value| ())
    }

    /// Sends again a settlement (`Some(cost)`) or release (`None`) whose first call failed: it
    /// counts once, however many of its calls reached Redis (see `resettle` in scope.lua).
    pub async fn resettle(&self, reservation: &Reservation, cost_nanos: Option<i64>) -> Result<(), LimiterError> {
        let d = &reservation.demand;
        self.undo(Op::Resettle, &reservation.held, d, 0, cost_nanos.unwrap_or(0)).await
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
        let inv = invocation(Op::Reconcile, std::slice::from_ref(&call), self.lease_secs, self.clock_offset_secs);
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
    async fn call(&self, op: Op, call: Call) -> Result<Vec<ScopeReply>, LimiterError> {
        if let Some(tx) = &self.coalescer_here() {
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
        let per_scope: Vec<Vec<ScopeReply>> =
            futures::future::join_all(each).await.into_iter().collect::<Result<_, _>>()?;
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

    async fn undo(&self, op: Op, held: &[Held], demand: &Demand, tokens: u64, cost: i64) -> Result<(), LimiterError> {
        // A settlement changes only tokens and spend, a repeated one only spend: scopes with
        // neither need no call. Scopes admitted from a lease settle through it.
        let held: Vec<&Held> = held
            .iter()
            .filter(|h| h.lease.is_none())
            .filter(|h| match op {
                Op::Settle => h.scope.limits.tpm.is_some() || h.scope.limits.max_budget.is_some(),
                Op::Resettle => h.scope.limits.max_budget.is_some(),
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
    ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
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
fn invocation<'a>(op: Op, calls: &[Call], lease_secs: u64, offset: i64) -> redis::ScriptInvocation<'a> {
    let mut inv = SCOPE_SCRIPT.prepare_invoke();
    let mut keys: Vec<String> = Vec::new();
    inv.arg(op.wire_name()).arg(lease_secs).arg(offset).arg(calls.len());
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
fn replies_of(op: Op, value: &Value, calls: usize) -> Result<Vec<Vec<ScopeReply>>, LimiterError> {
    if op != Op::Reserve {
        return Ok(vec![Vec::new(); calls]);
    }
    let calls_replies = match value {
        Value::Array(items) if items.len() == calls => items,
        Value::Array(items) => {
            return Err(LimiterError::Protocol(format!("reply for {} requests, expected {calls}", items.len())))
        }
        other => return Err(LimiterError::Protocol(format!("reply is not an array: {other:?}"))),
    };
    calls_replies
        .iter()
        .map(|call| match call {
            Value::Array(scopes) => scopes.iter().map(ScopeReply::decode).collect(),
            other => Err(LimiterError::Protocol(format!("request's reply is not an array: {other:?}"))),
        })
        .collect()
}

/// A reply for each scope asked about, or a protocol error.
fn expect_scopes(replies: &[ScopeReply], scopes: usize) -> Result<(), LimiterError> {
    if replies.len() == scopes {
        Ok(())
    } else {
        Err(LimiterError::Protocol(format!("{} scope replies for {scopes} scopes", replies.len())))
    }
}

/// Sends the calls of concurrent requests to Redis together: whatever arrived while the previous
/// batch was in flight goes in the next script invocation, in arrival order. A lone request pays
/// nothing extra; under load one round trip and one script run serve many requests.
struct Coalescer {
    conn: RedisConn,
    timeout: Duration,
    lease_secs: u64,
    clock_offset_secs: i64,
    /// A worker's own connection PINGs Redis every second, as the heartbeat does on the shared
    /// one: a Redis that restarted is found (and the connection made anew) by the PING, not by
    /// the next request, which would fall back for a second.
    keepalive: bool,
}

const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

impl Coalescer {
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let mut idle = tokio::time::interval(KEEPALIVE_EVERY);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
                _ = idle.tick(), if self.keepalive => {
                    let mut conn = self.conn.clone();
                    let ping = redis::cmd("PING");
                    let _ = bounded(self.timeout, async move { ping.query_async::<Value>(&mut conn).await }).await;
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            for op in [Op::Reserve, Op::Settle, Op::Refund, Op::Resettle] {
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
        let all: Vec<&Scope> = scopes.iter().filter(|s| !s.limits.is_empty()).collect();
        // Scopes whose slice holds the request are admitted here; the others ask Redis.
        let plan = self.leases.plan(&all, demand);
        let remote: Vec<&Scope> = plan.remote.iter().map(|&i| all[i]).collect();
        let result = if remote.is_empty() {
            Ok(Admission {
                refusal: None,
                warnings: vec![],
                standing: Standing::default(),
                reservation: Some(Reservation { demand: demand.clone(), held: vec![], local: false }),
            })
        } else {
            self.reserve_remote(&remote, demand, &plan).await
        };
        match result {
            Ok(mut admission) => {
                admission.standing.merge(&plan.standing);
                match admission.reservation.as_mut() {
                    Some(r) => r.held.extend(plan.held),
                    None => self.leases.untake(&plan.held, demand),
                }
                Ok(admission)
            }
            Err(e) => {
                self.leases.untake(&plan.held, demand);
                self.leases.unask(&all, &plan);
                Err(e)
            }
        }
    }

    async fn settle(&self, reservation: &Reservation, tokens: u64, cost_nanos: i64) -> Result<(), LimiterError> {
        self.leases.settle(&reservation.held, &reservation.demand, Some((tokens, cost_nanos)));
        self.undo(Op::Settle, &reservation.held, &reservation.demand, tokens, cost_nanos).await
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        let d = &reservation.demand;
        self.leases.settle(&reservation.held, d, None);
        self.undo(Op::Refund, &reservation.held, d, d.tokens, d.cost_nanos).await
    }
}

impl RedisLimiter {
    /// Reserves in Redis for `scopes` (those no lease held), asking for the leases in `plan`.
    async fn reserve_remote(&self, scopes: &[&Scope], demand: &Demand, plan: &Plan) -> Result<Admission, LimiterError> {
        let ask = |i: usize| plan.asks[i].as_ref().map(|(_, arg)| arg.clone()).unwrap_or_default();
        let no_seed = |i: usize, _: &Scope| (String::new(), ask(i), String::new());
        let mut replies = self.call(Op::Reserve, self.call_for(scopes, demand, no_seed)).await?;
        expect_scopes(&replies, scopes.len())?;
        // Budgets Redis no longer holds are seeded from PostgreSQL's rollups, then reserved.
        let missing: Vec<usize> =
            replies.iter().enumerate().filter(|(_, r)| r.status == Status::NeedsSeed).map(|(i, _)| i).collect();
        if !missing.is_empty() {
            let mut seeds = HashMap::new();
            for &i in &missing {
                let since = period_start(&replies[i].period)
                    .ok_or_else(|| LimiterError::Protocol(format!("period {}", replies[i].period)))?;
                seeds.insert(i, self.seed.spent_nanos(scopes[i], since).await.map_err(LimiterError::Seed)?);
            }
            if self.coalescer.is_some() {
                // One node: nothing of the request was applied; reserve it whole again.
                let with_seeds = |i: usize, _: &Scope| {
                    (seeds.get(&i).map(|s| s.to_string()).unwrap_or_default(), ask(i), String::new())
                };
                replies = self.call(Op::Reserve, self.call_for(scopes, demand, with_seeds)).await?;
                expect_scopes(&replies, scopes.len())?;
            } else {
                // Cluster: each scope stands alone; reserve the seeded ones now.
                let only: Vec<&Scope> = missing.iter().map(|&i| scopes[i]).collect();
                let with_seeds = |j: usize, _: &Scope| (seeds[&missing[j]].to_string(), ask(missing[j]), String::new());
                let again = self.call(Op::Reserve, self.call_for(&only, demand, with_seeds)).await?;
                expect_scopes(&again, only.len())?;
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
        for (i, (scope, r)) in scopes.iter().zip(&replies).enumerate() {
            let ScopeReply {
                status,
                reason,
                now,
                ref period,
                rpm_used,
                rpm_reset,
                tpm_used,
                tpm_reset,
                budget_left,
                retry_after,
                windows,
                ..
            } = *r;
            if let (Some((lease, _)), Some(asked_at)) = (&plan.asks[i], plan.asked_at) {
                self.leases.answered(scope, lease, r, demand, asked_at);
            }
            // A window this replica saw in use within the minute is gone: Redis lost its data.
            if let Some(seen) = self.observations.last(&scope.redis_prefix()).filter(|o| now - o.at < 60) {
                let gone = |had: i64, window: Windows| had > 0 && !windows.contains(window);
                let rpm_gone = scope.limits.rpm.is_some() && gone(seen.rpm_used, Windows::RPM);
                let tpm_gone = scope.limits.tpm.is_some() && gone(seen.tpm_used, Windows::TPM);
                lost |= rpm_gone || tpm_gone;
            }
            self.observations.record(
                scope,
                LastKnown {
                    at: now,
                    rpm_used,
                    tpm_used,
                    budget_left: scope.limits.max_budget.map(|_| budget_left),
                    ..LastKnown::default()
                },
            );
            standing.tighten(Reason::Rpm, scope.limits.rpm, rpm_used, rpm_reset);
            standing.tighten(Reason::Tpm, scope.limits.tpm, tpm_used, tpm_reset);
            match status {
                Status::Refused => {
                    if refusal.is_none() {
                        let (reason, retry_after) = (reason.unwrap_or(Reason::Rpm), retry_after.max(0) as u64);
                        let (limit, used) = match reason {
                            Reason::Tpm => (scope.limits.tpm, tpm_used),
                            _ => (scope.limits.rpm, rpm_used),
                        };
                        standing.refused(reason, limit, used, retry_after);
                        refusal = Some(Refusal { scope: scope.kind, reason, retry_after });
                    }
                }
                Status::Admitted | Status::AdmittedOver => {
                    if let (Status::AdmittedOver, Some(reason)) = (status, reason) {
                        warnings.push((scope.kind, reason));
                    }
                    held.push(Held { scope: (*scope).clone(), made_at: now, period: period.clone(), lease: None });
                }
                // Not applied because another scope of the request refused.
                Status::NotApplied => {}
                // Asked again with a seed: the script seeds a missing budget before judging.
                Status::NeedsSeed => {
                    return Err(LimiterError::Protocol(format!("{} scope needs a seed again", scope.kind.as_str())))
                }
            }
        }
        if lost {
            // What this call applied goes back; the caller restores the windows and asks again.
            self.undo(Op::Refund, &held, demand, demand.tokens, demand.cost_nanos).await?;
            return Err(LimiterError::Lost);
        }
        if refusal.is_some() {
            // Only a cluster applies scopes one by one; on one node `held` is empty here.
            self.undo(Op::Refund, &held, demand, demand.tokens, demand.cost_nanos).await?;
            return Ok(Admission { refusal, warnings, standing, reservation: None });
        }
        Ok(Admission {
            refusal: None,
            warnings,
            standing,
            reservation: Some(Reservation { demand: demand.clone(), held, local: false }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(i: i64) -> Value {
        Value::Int(i)
    }

    fn reply(status: i64, reason: i64, windows: i64) -> Vec<Value> {
        vec![
            int(status),
            int(reason),
            int(1_700_000_000),
            Value::BulkString(b"m202611".to_vec()),
            int(3),
            int(42),
            int(1_500),
            int(17),
            int(9_000_000_000),
            int(0),
            int(windows),
            int(0),
            int(0),
        ]
    }

    fn protocol_error(v: Value) -> String {
        match ScopeReply::decode(&v) {
            Err(LimiterError::Protocol(detail)) => {
                let via_redis = redis::from_redis_value::<ScopeReply>(&v).unwrap_err();
                assert_eq!(via_redis.kind(), ErrorKind::TypeError);
                assert_eq!(via_redis.detail(), Some(detail.as_str()));
                detail
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn a_good_reply_decodes_into_its_fields() {
        let decoded: ScopeReply = redis::from_redis_value(&Value::Array(reply(2, 2, 3))).unwrap();
        assert_eq!(
            decoded,
            ScopeReply {
                status: Status::AdmittedOver,
                reason: Some(Reason::Tpm),
                now: 1_700_000_000,
                period: "m202611".into(),
                rpm_used: 3,
                rpm_reset: 42,
                tpm_used: 1_500,
                tpm_reset: 17,
                budget_left: 9_000_000_000,
                retry_after: 0,
                windows: Windows::try_from(3).unwrap(),
                lease_slots: 0,
                lease_bucket: 0,
            }
        );
        assert!(decoded.windows.contains(Windows::RPM) && decoded.windows.contains(Windows::TPM));
        let mut no_budget = reply(1, 0, 1);
        no_budget[3] = Value::BulkString(Vec::new());
        let decoded = ScopeReply::decode(&Value::Array(no_budget)).unwrap();
        assert_eq!((decoded.status, decoded.reason, decoded.period.as_str()), (Status::Admitted, None, ""));
        assert!(decoded.windows.contains(Windows::RPM) && !decoded.windows.contains(Windows::TPM));
    }

    #[test]
    fn statuses_and_reasons_decode_from_the_scripts_codes() {
        for (code, status) in [
            (1, Status::Admitted),
            (2, Status::AdmittedOver),
            (0, Status::Refused),
            (-1, Status::NeedsSeed),
            (3, Status::NotApplied),
        ] {
            assert_eq!(Status::try_from(code).unwrap(), status);
        }
        for (code, reason) in [(1, Reason::Rpm), (2, Reason::Tpm), (3, Reason::Budget)] {
            assert_eq!(Reason::try_from(code).unwrap(), reason);
        }
        assert!(Reason::try_from(0).is_err());
        let decoded = ScopeReply::decode(&Value::Array(reply(0, 3, 0))).unwrap();
        assert_eq!((decoded.status, decoded.reason), (Status::Refused, Some(Reason::Budget)));
        assert_eq!(decoded.windows, Windows::NONE);
    }

    #[test]
    fn a_short_reply_is_a_protocol_error() {
        let mut short = reply(1, 0, 0);
        short.pop();
        assert_eq!(protocol_error(Value::Array(short)), "scope reply has 12 fields, expected 13");
        assert!(protocol_error(int(1)).starts_with("scope reply is not an array"));
    }

    #[test]
    fn a_field_of_the_wrong_type_is_a_protocol_error() {
        let mut wrong = reply(1, 0, 0);
        wrong[4] = Value::BulkString(b"many".to_vec());
        assert!(protocol_error(Value::Array(wrong)).starts_with("rpm_used is not an integer"));
        let mut wrong = reply(1, 0, 0);
        wrong[3] = Value::Array(vec![]);
        assert!(protocol_error(Value::Array(wrong)).starts_with("period is not a string"));
    }

    #[test]
    fn unknown_codes_are_protocol_errors() {
        assert_eq!(protocol_error(Value::Array(reply(7, 0, 0))), "unknown status 7");
        assert_eq!(protocol_error(Value::Array(reply(0, 9, 0))), "unknown reason 9");
        assert_eq!(protocol_error(Value::Array(reply(1, 0, 4))), "unknown windows 4");
    }

    #[test]
    fn replies_are_read_per_request_for_reserve_only() {
        let two = Value::Array(vec![Value::Array(vec![Value::Array(reply(1, 0, 1))]), Value::Array(vec![])]);
        let replies = replies_of(Op::Reserve, &two, 2).unwrap();
        assert_eq!((replies.len(), replies[0].len(), replies[1].len()), (2, 1, 0));
        assert!(matches!(replies_of(Op::Reserve, &two, 3), Err(LimiterError::Protocol(_))));
        assert_eq!(replies_of(Op::Settle, &int(1), 2).unwrap(), vec![Vec::new(), Vec::new()]);
        let ops = [Op::Reserve, Op::Refund, Op::Settle, Op::Sync, Op::Resettle, Op::Reconcile, Op::Return];
        let names: Vec<&str> = ops.iter().map(|o| o.wire_name()).collect();
        assert_eq!(names, ["reserve", "refund", "settle", "sync", "resettle", "reconcile", "return"]);
    }
}
