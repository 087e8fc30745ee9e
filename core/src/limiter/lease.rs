//! Quota leases: this replica's slices of its scopes' quotas, admitted from without a Redis call.
//!
//! A reservation that goes to Redis may ask for a slice with it (see "Leases" in `scope.lua`):
//! room for up to N more requests like itself (their request slots, tokens and cost), counted in
//! Redis at once. Requests that fit a scope's live slice take from it here; a request takes either
//! from every scope's slice or goes to Redis for the scopes whose slice cannot hold it. What
//! leased requests really used, the slots they did not use and the budget still in flight go back
//! to Redis in one `return` call per slice when the slice expires, goes idle, or every
//! [`REPORT_EVERY`] while it lives.
//!
//! Why this never admits more than a limit: Redis counts a slice whole when it grants it (its
//! slots in the bucket of the second the slice ends, its budget as a reservation), and a slice
//! is used only before it ends on this replica's clock, measured from before the call that
//! granted it. Near the limit the script grants nothing (a slice is at most a
//! `1/(4 x replicas)` share of the headroom) and every request asks Redis, as without leases.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use super::*;
use crate::limits::{Enforcement, Limits};

/// A scope asks for a slice once this replica sees it this many times a second (per slice length).
const MIN_SLOTS: u64 = 4;
/// The most requests one slice holds.
const MAX_SLOTS: u64 = 1024;
/// A slice nothing was taken from for this long goes back.
pub const IDLE: Duration = Duration::from_millis(200);
/// A live slice tells Redis what its requests settled at least this often.
pub const REPORT_EVERY: Duration = Duration::from_millis(500);
/// A slice with requests in flight tells Redis at least this often (Redis holds their budget
/// for 10 s past the last word, so that a dead replica's claim goes soon).
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// An ask with no answer for this long no longer stops another.
const ASK_STALE: Duration = Duration::from_secs(2);

/// Counters for the gateway's metrics.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Requests admitted from a slice, with no Redis call.
    pub admissions: AtomicU64,
    /// Slices granted.
    pub grants: AtomicU64,
    /// Slices given back (expired or idle), their account closed in Redis.
    pub returns: AtomicU64,
}

impl LeaseStats {
    /// `(admissions, grants, returns)` since the last time this was asked.
    pub fn take(&self) -> (u64, u64, u64) {
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        (take(&self.admissions), take(&self.grants), take(&self.returns))
    }
}

pub struct LeaseBook {
    /// How long a slice lives; zero turns leasing off.
    slice: Duration,
    replica: String,
    next_id: AtomicU64,
    live_replicas: Arc<AtomicU32>,
    expected_replicas: u32,
    scopes: Mutex<HashMap<(ScopeKind, uuid::Uuid), ScopeBook>>,
    pub stats: LeaseStats,
}

struct ScopeBook {
    scope: Scope,
    live: Option<String>,
    /// Granted while the live slice ran low: it serves once the live one cannot.
    next: Option<String>,
    /// Slots the ask in flight asked for.
    wanted: u64,
    asking: Option<Instant>,
    rate: Arrivals,
    slices: HashMap<String, Slice>,
}

/// A scope's entry in the book: its kind and id (no string built per request).
fn book_key(scope: &Scope) -> (ScopeKind, uuid::Uuid) {
    (scope.kind, scope.id)
}

impl ScopeBook {
    /// The slice waiting to take over becomes the live one (none if none waits).
    fn promote(&mut self, now: Instant) {
        self.live = self.next.take();
        if let Some(next) = self.live.as_ref().and_then(|id| self.slices.get_mut(id)) {
            next.last_take = now;
        }
    }
}

/// Requests seen in the current and the previous second.
struct Arrivals {
    since: Instant,
    this: u64,
    last: u64,
}

impl Arrivals {
    fn note(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.since);
        if elapsed >= Duration::from_secs(2) {
            (self.since, self.this, self.last) = (now, 0, 0);
        } else if elapsed >= Duration::from_secs(1) {
            (self.since, self.last, self.this) = (self.since + Duration::from_secs(1), self.this, 0);
        }
        self.this += 1;
    }

    fn per_second(&self) -> u64 {
        self.this.max(self.last)
    }
}

struct Slice {
    limits: Limits,
    granted_sec: i64,
    bucket: i64,
    period: String,
    expires: Instant,
    last_take: Instant,
    live: bool,
    granted: u64,
    /// Redis granted all that was asked: the scope is far from its limits.
    whole: bool,
    slots_left: u64,
    tokens_left: u64,
    nanos_left: i64,
    /// Requests taken and not yet settled or refunded.
    outstanding: u64,
    /// Owed to Redis since the last return: slots back, the tokens correction, spend settled.
    slots_back: i64,
    tokens_delta: i64,
    spend: i64,
    /// Nano-USD of requests taken and not yet settled.
    inflight: i64,
    dirty: bool,
    last_report: Instant,
    seq: u64,
    /// A return that failed, sent again as it is (it applies once).
    sending: Option<Return>,
    /// A return carrying its retirement reached Redis.
    closed: bool,
    /// The windows as the grant left them, for the headers of requests admitted from the slice.
    rpm_used: i64,
    rpm_reset: i64,
    tpm_used: i64,
    tpm_reset: i64,
}

impl Slice {
    fn retire(&mut self) {
        if !self.live {
            return;
        }
        self.live = false;
        if self.limits.rpm.is_some() {
            self.slots_back += self.slots_left as i64;
        }
        if self.limits.tpm.is_some() {
            self.tokens_delta -= self.tokens_left as i64;
        }
        (self.slots_left, self.tokens_left, self.nanos_left) = (0, 0, 0);
        self.dirty = true;
    }

    fn take(&mut self, demand: &Demand, now: Instant) {
        self.slots_left -= 1;
        if self.limits.tpm.is_some() {
            self.tokens_left -= demand.tokens;
        }
        if self.limits.max_budget.is_some() {
            self.nanos_left -= demand.cost_nanos;
            self.inflight += demand.cost_nanos;
        }
        self.outstanding += 1;
        self.last_take = now;
    }

    fn fits(&self, demand: &Demand, now: Instant) -> bool {
        self.live
            && now < self.expires
            && self.slots_left >= 1
            && (self.limits.tpm.is_none() || self.tokens_left >= demand.tokens)
            && (self.limits.max_budget.is_none() || self.nanos_left >= demand.cost_nanos)
    }

    fn done(&self) -> bool {
        !self.live && self.closed && self.outstanding == 0 && !self.dirty && self.sending.is_none()
    }
}

/// One slice's account for Redis (`return` in scope.lua).
#[derive(Debug, Clone)]
pub struct Return {
    pub scope: Scope,
    pub lease: String,
    /// `<lease id>#<seq>`.
    pub request_id: String,
    pub fields: String,
    pub period: String,
    pub spend: i64,
    closes: bool,
}

/// What the book says of a reservation: the scopes admitted from slices, the others (by index
/// into the scopes asked about) with the lease asked for each, if any.
#[derive(Debug, Default)]
pub struct Plan {
    pub held: Vec<Held>,
    pub remote: Vec<usize>,
    /// Per remote scope: `(lease id, the script's lease argument)`.
    pub asks: Vec<Option<(String, String)>>,
    pub standing: Standing,
    pub asked_at: Option<Instant>,
}

impl LeaseBook {
    pub fn new(slice: Duration, live_replicas: Arc<AtomicU32>, expected_replicas: u32) -> Self {
        Self {
            slice,
            replica: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            next_id: AtomicU64::new(0),
            live_replicas,
            expected_replicas,
            scopes: Mutex::default(),
            stats: LeaseStats::default(),
        }
    }

    /// Leasing off: every request asks Redis.
    pub fn off() -> Self {
        Self::new(Duration::ZERO, Arc::default(), 1)
    }

    fn replicas(&self) -> u32 {
        self.live_replicas.load(Ordering::Relaxed).max(self.expected_replicas).max(1)
    }

    /// Takes `demand` from the slices of every scope that can hold it; the others go to Redis.
    /// A taken part that Redis then refuses goes back with [`LeaseBook::untake`].
    pub fn plan(&self, scopes: &[&Scope], demand: &Demand) -> Plan {
        let mut plan = Plan::default();
        if self.slice.is_zero() {
            plan.remote = (0..scopes.len()).collect();
            plan.asks = vec![None; scopes.len()];
            return plan;
        }
        let now = Instant::now();
        let mut books = crate::sync::lock(&self.scopes);
        for (i, scope) in scopes.iter().enumerate() {
            let book = books.entry(book_key(scope)).or_insert_with(|| ScopeBook {
                scope: (*scope).clone(),
                live: None,
                next: None,
                wanted: 0,
                asking: None,
                rate: Arrivals { since: now, this: 0, last: 0 },
                slices: HashMap::new(),
            });
            book.rate.note(now);
            if book.scope.limits != scope.limits {
                book.scope = (*scope).clone();
            }
            let want = (book.rate.per_second() as u128 * self.slice.as_millis() / 1000) as u64;
            let asking = book.asking.is_some_and(|at| now.duration_since(at) < ASK_STALE);
            let may_ask = scope.limits.enforcement == Enforcement::Hard && want >= MIN_SLOTS && !asking;
            // The live slice serves; one that can no longer is retired and the next takes over.
            let (mut renew, mut taken) = (false, false);
            if book.live.is_none() {
                book.promote(now);
            }
            for _ in 0..2 {
                let Some(slice) = book.live.as_ref().and_then(|id| book.slices.get_mut(id)) else { break };
                if slice.limits == scope.limits && slice.fits(demand, now) {
                    // Running low (a quarter left, in slots or time): this request asks Redis for
                    // the next slice while the others keep taking from this one, so that the
                    // scope never waits for a renewal with nothing in hand.
                    // Only far from the limits (the last grant was whole): near them, two slices
                    // per replica would leave more room stranded (see "Bounds").
                    let low = slice.slots_left * 4 <= slice.granted || now + self.slice / 4 >= slice.expires;
                    if low && slice.whole && book.next.is_none() && may_ask {
                        renew = true;
                        break;
                    }
                    slice.take(demand, now);
                    taken = true;
                    plan.standing.tighten(
                        Reason::Rpm,
                        scope.limits.rpm,
                        slice.rpm_used - slice.slots_left as i64,
                        slice.rpm_reset,
                    );
                    plan.standing.tighten(
                        Reason::Tpm,
                        scope.limits.tpm,
                        slice.tpm_used - slice.tokens_left as i64,
                        slice.tpm_reset,
                    );
                    plan.held.push(Held {
                        scope: (*scope).clone(),
                        made_at: slice.bucket,
                        period: slice.period.clone(),
                        lease: book.live.clone(),
                    });
                    break;
                }
                slice.retire();
                book.promote(now);
            }
            if taken {
                continue;
            }
            plan.remote.push(i);
            if may_ask && (book.live.is_none() || renew) {
                book.asking = Some(now);
                book.wanted = want.min(MAX_SLOTS);
                let id = format!("{}-{}", self.replica, self.next_id.fetch_add(1, Ordering::Relaxed));
                let arg = format!("{id}:{}:{}:{}", want.min(MAX_SLOTS), self.replicas(), self.slice.as_millis());
                plan.asks.push(Some((id, arg)));
                plan.asked_at = Some(now);
            } else {
                plan.asks.push(None);
            }
        }
        if plan.remote.is_empty() {
            self.stats.admissions.fetch_add(1, Ordering::Relaxed);
        }
        plan
    }

    /// Redis answered an ask: a granted slice becomes the scope's live one.
    pub fn answered(&self, scope: &Scope, lease: &str, reply: &ScopeReply, demand: &Demand, asked_at: Instant) {
        let mut books = crate::sync::lock(&self.scopes);
        let Some(book) = books.get_mut(&book_key(scope)) else { return };
        book.asking = None;
        if reply.lease_slots <= 0 {
            return;
        }
        // Asked while the live slice ran low: the new one waits for it (an older waiting one goes).
        let serving = book.live.as_ref().and_then(|id| book.slices.get(id)).is_some_and(|s| s.live);
        if let Some(old) = book.next.take().and_then(|id| book.slices.get_mut(&id)) {
            old.retire();
        }
        if !serving {
            if let Some(old) = book.live.take().and_then(|id| book.slices.get_mut(&id)) {
                old.retire();
            }
        }
        let n = reply.lease_slots as u64;
        book.slices.insert(
            lease.to_string(),
            Slice {
                limits: scope.limits.clone(),
                granted_sec: reply.now,
                bucket: reply.lease_bucket,
                period: reply.period.clone(),
                // From before the call: the slice ends here no later than in Redis's count.
                expires: asked_at + self.slice,
                last_take: Instant::now(),
                live: true,
                granted: n,
                whole: n >= book.wanted,
                slots_left: n,
                tokens_left: n * demand.tokens,
                nanos_left: n as i64 * demand.cost_nanos,
                outstanding: 0,
                slots_back: 0,
                tokens_delta: 0,
                spend: 0,
                inflight: 0,
                dirty: false,
                last_report: Instant::now(),
                seq: 0,
                sending: None,
                closed: false,
                rpm_used: reply.rpm_used,
                rpm_reset: reply.rpm_reset,
                tpm_used: reply.tpm_used,
                tpm_reset: reply.tpm_reset,
            },
        );
        if serving {
            book.next = Some(lease.to_string());
        } else {
            book.live = Some(lease.to_string());
        }
        self.stats.grants.fetch_add(1, Ordering::Relaxed);
    }

    /// Redis was not asked after all, or failed: asks are open again.
    pub fn unask(&self, scopes: &[&Scope], plan: &Plan) {
        let mut books = crate::sync::lock(&self.scopes);
        for (&i, ask) in plan.remote.iter().zip(&plan.asks) {
            if ask.is_some() {
                if let Some(book) = books.get_mut(&book_key(scopes[i])) {
                    book.asking = None;
                }
            }
        }
    }

    /// Gives back what a request took from slices (refused elsewhere, or never proxied).
    pub fn untake(&self, held: &[Held], demand: &Demand) {
        self.settle(held, demand, None);
    }

    /// A leased request's real use (`Some((tokens, nano-USD))`), or its refund (`None`).
    pub fn settle(&self, held: &[Held], demand: &Demand, used: Option<(u64, i64)>) {
        let mut books = crate::sync::lock(&self.scopes);
        for h in held {
            let Some(lease) = &h.lease else { continue };
            let Some(slice) = books.get_mut(&book_key(&h.scope)).and_then(|b| b.slices.get_mut(lease)) else {
                continue;
            };
            let l = &slice.limits;
            let (tokens, cost) = match used {
                Some(u) => u,
                None => {
                    if l.rpm.is_some() {
                        slice.slots_back += 1;
                    }
                    (0, 0)
                }
            };
            if l.tpm.is_some() {
                slice.tokens_delta += tokens as i64 - demand.tokens as i64;
            }
            if l.max_budget.is_some() {
                slice.inflight -= demand.cost_nanos;
                slice.spend += cost;
            }
            slice.outstanding = slice.outstanding.saturating_sub(1);
            slice.dirty = true;
        }
    }

    /// The returns due now: slices that expired or went idle are retired; every slice with
    /// something to tell Redis (at once when retired, else every [`REPORT_EVERY`]) gets one,
    /// and a return that failed is sent again as it was. `all`: retire every slice (shutdown).
    pub fn due(&self, all: bool) -> Vec<Return> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut books = crate::sync::lock(&self.scopes);
        books.retain(|_, book| {
            // A live slice that expired or went idle hands over to the one waiting, if any.
            let spent = |s: &Slice| all || now >= s.expires || now.duration_since(s.last_take) >= IDLE;
            if let Some(live) = book.live.as_ref().and_then(|id| book.slices.get_mut(id)).filter(|s| spent(s)) {
                live.retire();
                book.promote(now);
            }
            for (id, slice) in book.slices.iter_mut() {
                // A slice waiting to take over is not idle.
                let waiting = book.live.is_some() && book.next.as_deref() == Some(id.as_str());
                let idle = !waiting && now.duration_since(slice.last_take) >= IDLE;
                if slice.live && (all || now >= slice.expires || idle) {
                    slice.retire();
                    if book.live.as_deref() == Some(id.as_str()) {
                        book.live = None;
                    }
                    if book.next.as_deref() == Some(id.as_str()) {
                        book.next = None;
                    }
                }
                if let Some(r) = &slice.sending {
                    out.push(r.clone());
                    continue;
                }
                let since = now.duration_since(slice.last_report);
                let report = !slice.live || since >= REPORT_EVERY;
                let keepalive = slice.inflight > 0 && since >= KEEPALIVE;
                if !(slice.dirty && report || keepalive) {
                    continue;
                }
                slice.seq += 1;
                let unused = if slice.live { slice.nanos_left } else { 0 };
                let r = Return {
                    scope: Scope { limits: slice.limits.clone(), ..book.scope.clone() },
                    lease: id.clone(),
                    request_id: format!("{id}#{}", slice.seq),
                    fields: format!(
                        "{id}:{}:{}:{}:{}:{}:{unused}:{}",
                        slice.seq,
                        slice.granted_sec,
                        slice.bucket,
                        slice.slots_back,
                        slice.tokens_delta,
                        slice.inflight.max(0)
                    ),
                    period: slice.period.clone(),
                    spend: slice.spend,
                    closes: !slice.live,
                };
                (slice.slots_back, slice.tokens_delta, slice.spend, slice.dirty) = (0, 0, 0, false);
                slice.last_report = now;
                slice.sending = Some(r.clone());
                out.push(r);
            }
            book.slices.retain(|_, s| !s.done());
            // A scope not seen for a while and holding nothing is forgotten.
            !book.slices.is_empty() || now.duration_since(book.rate.since) < Duration::from_secs(10)
        });
        out
    }

    /// Redis took (`ok`) or did not take these returns.
    pub fn acknowledge(&self, returns: &[Return], ok: bool) {
        if !ok {
            return;
        }
        let mut books = crate::sync::lock(&self.scopes);
        for r in returns {
            let Some(book) = books.get_mut(&book_key(&r.scope)) else { continue };
            let Some(slice) = book.slices.get_mut(&r.lease) else { continue };
            if slice.sending.as_ref().is_some_and(|s| s.request_id == r.request_id) {
                slice.sending = None;
                if r.closes && !slice.closed {
                    slice.closed = true;
                    self.stats.returns.fetch_add(1, Ordering::Relaxed);
                }
            }
            if slice.done() {
                book.slices.remove(&r.lease);
            }
        }
    }

    /// Whether any slice is held or owes Redis an account.
    pub fn is_empty(&self) -> bool {
        crate::sync::lock(&self.scopes).values().all(|b| b.slices.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn scope(rpm: i64) -> Scope {
        Scope { kind: ScopeKind::Key, id: uuid::Uuid::nil(), limits: Limits { rpm: Some(rpm), ..Limits::default() } }
    }

    fn demand(n: u32) -> Demand {
        Demand { request_id: format!("r{n}"), tokens: 10, cost_nanos: 0 }
    }

    fn granted(slots: i64) -> ScopeReply {
        ScopeReply {
            status: Status::Admitted,
            reason: None,
            now: 100,
            period: String::new(),
            rpm_used: 1 + slots,
            rpm_reset: 60,
            tpm_used: 0,
            tpm_reset: 0,
            budget_left: -1,
            retry_after: 0,
            windows: Windows::RPM,
            lease_slots: slots,
            lease_bucket: 101,
        }
    }

    #[test]
    fn a_busy_scope_asks_once_then_admits_from_its_slice_until_it_is_used_up() {
        let book = LeaseBook::new(Duration::from_secs(1), Arc::default(), 1);
        let s = scope(1000);
        let mut ask = None;
        for n in 0..MIN_SLOTS as u32 {
            let plan = book.plan(&[&s], &demand(n));
            assert_eq!(plan.remote, vec![0], "no slice yet");
            if let Some(a) = plan.asks[0].clone() {
                assert!(ask.is_none(), "one ask at a time");
                ask = Some((a.0, plan.asked_at.unwrap()));
            }
        }
        let (id, at) = ask.expect("a scope seen 4 times a second asks");
        book.answered(&s, &id, &granted(3), &demand(9), at);
        for n in 0..3 {
            let plan = book.plan(&[&s], &demand(10 + n));
            assert!(plan.remote.is_empty());
            assert_eq!(plan.held[0].lease.as_deref(), Some(id.as_str()));
            assert_eq!(plan.held[0].made_at, 101, "counted in the slice's bucket");
            assert_eq!(plan.standing.remaining_requests, Some(1000 - 4 + 2 - n as u64));
        }
        assert_eq!(book.plan(&[&s], &demand(20)).remote, vec![0], "used up");
        assert_eq!(book.stats.admissions.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_slice_running_low_asks_for_the_next_one_which_takes_over_when_it_is_used_up() {
        let book = LeaseBook::new(Duration::from_secs(1), Arc::default(), 1);
        let s = scope(1000);
        for n in 0..MIN_SLOTS as u32 {
            book.plan(&[&s], &demand(n));
        }
        book.answered(&s, "first", &granted(8), &demand(0), Instant::now());
        for n in 0..6 {
            assert!(book.plan(&[&s], &demand(10 + n)).remote.is_empty());
        }
        // A quarter left: this request goes to Redis with an ask; the others keep taking.
        let asking = book.plan(&[&s], &demand(20));
        assert_eq!(asking.remote, vec![0]);
        let (next, _) = asking.asks[0].clone().expect("asks for the next slice");
        book.answered(&s, &next, &granted(8), &demand(0), Instant::now());
        let leases: Vec<String> = (0..4)
            .map(|n| book.plan(&[&s], &demand(30 + n)).held.first().and_then(|h| h.lease.clone()).unwrap_or_default())
            .collect();
        assert_eq!(leases, ["first", "first", next.as_str(), next.as_str()], "the live one's last two, then the next");
    }

    #[test]
    fn a_request_larger_than_the_slice_holds_never_takes_from_it() {
        let book = LeaseBook::new(Duration::from_secs(1), Arc::default(), 1);
        let s = Scope { limits: Limits { tpm: Some(1_000_000), ..scope(1000).limits }, ..scope(1000) };
        book.plan(&[&s], &demand(0));
        // Sized by 10-token requests: 5 slots, 50 tokens.
        book.answered(&s, "small", &granted(5), &demand(0), Instant::now());
        let big = Demand { request_id: "big".into(), tokens: 51, cost_nanos: 0 };
        let plan = book.plan(&[&s], &big);
        assert_eq!(plan.remote, vec![0], "51 tokens do not fit 50: Redis judges it");
        assert!(plan.held.is_empty());
        // The slice retired: its 5 slots and 50 tokens go back, nothing was taken from it.
        let returns = book.due(false);
        assert_eq!(returns.len(), 1);
        assert_eq!(returns[0].fields, "small:1:100:101:5:-50:0:0");
    }

    #[test]
    fn a_retired_slice_returns_its_unused_slots_and_refunds_once() {
        let book = LeaseBook::new(Duration::from_secs(1), Arc::default(), 1);
        let s = scope(1000);
        let id = "lease-1".to_string();
        book.plan(&[&s], &demand(0));
        book.answered(&s, &id, &granted(5), &demand(0), Instant::now());
        let taken = book.plan(&[&s], &demand(1));
        book.untake(&taken.held, &demand(1));
        let returns = book.due(true);
        assert_eq!(returns.len(), 1);
        // 5 granted, 1 taken and refunded: all 5 slots go back; the TPM is not limited.
        assert_eq!(returns[0].fields, "lease-1:1:100:101:5:0:0:0");
        // A failed return is sent again as it was.
        book.acknowledge(&returns, false);
        assert_eq!(book.due(false)[0].request_id, returns[0].request_id);
        book.acknowledge(&returns, true);
        assert!(book.due(false).is_empty() && book.is_empty());
        assert_eq!(book.stats.returns.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn soft_scopes_and_a_book_that_is_off_never_lease() {
        let off = LeaseBook::off();
        let s = scope(1000);
        for n in 0..10 {
            assert!(off.plan(&[&s], &demand(n)).asks[0].is_none());
        }
        let book = LeaseBook::new(Duration::from_secs(1), Arc::default(), 1);
        let mut soft = scope(1000);
        soft.limits.enforcement = Enforcement::Soft;
        for n in 0..10 {
            assert!(book.plan(&[&soft], &demand(n)).asks[0].is_none());
        }
    }
}
