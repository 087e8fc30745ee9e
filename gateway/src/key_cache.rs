//! The in-process [`KeyCache`]: key contexts by key hash, sharded to keep lock contention low.
//! Entries expire after a TTL (the backstop) and are dropped at once by invalidations; unknown
//! keys are cached too, for a shorter TTL, so a flood of bad keys does not reach PostgreSQL.
//! The cache is bounded: a full shard drops its expired entries first, then unknown keys, then
//! whatever it must, counting each eviction.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use futures::future::{BoxFuture, Shared};
use prometheus::IntCounter;
use tollgate_core::{
    invalidation::{Invalidation, InvalidationKind},
    keys::KeyHash,
    sync::{lock, read, write},
};
use uuid::Uuid;

use crate::auth::AuthContext;

struct Entry {
    /// `None`: the key is unknown.
    ctx: Option<Arc<AuthContext>>,
    fresh_until: Instant,
}

const SHARDS: usize = 16;

pub struct KeyCache {
    shards: Vec<RwLock<HashMap<KeyHash, Entry>>>,
    ttl: Duration,
    negative_ttl: Duration,
    shard_capacity: usize,
    evictions: IntCounter,
    /// Counts invalidations (and clears). A lookup notes it before reading PostgreSQL and caches
    /// its answer only if no invalidation came meanwhile: a lookup that read a key just before
    /// its revocation committed must not put the key back after the invalidation dropped it.
    generation: AtomicU64,
}

pub enum Lookup {
    Hit(Arc<AuthContext>),
    Unknown,
    Miss,
}

impl KeyCache {
    pub fn new(ttl: Duration, negative_ttl: Duration, max_entries: usize, evictions: IntCounter) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            ttl,
            negative_ttl,
            shard_capacity: max_entries.div_ceil(SHARDS).max(1),
            evictions,
            generation: AtomicU64::new(0),
        }
    }

    /// The invalidation generation; note it before reading PostgreSQL, for [`KeyCache::insert`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn shard(&self, hash: &KeyHash) -> &RwLock<HashMap<KeyHash, Entry>> {
        &self.shards[hash[0] as usize % SHARDS]
    }

    pub fn get(&self, hash: &KeyHash) -> Lookup {
        match read(self.shard(hash)).get(hash) {
            Some(e) if e.fresh_until > Instant::now() => match &e.ctx {
                Some(ctx) => Lookup::Hit(ctx.clone()),
                None => Lookup::Unknown,
            },
            _ => Lookup::Miss,
        }
    }

    /// Whatever is cached for `hash`, even past its TTL (used while PostgreSQL is away).
    pub fn get_stale(&self, hash: &KeyHash) -> Option<Arc<AuthContext>> {
        read(self.shard(hash)).get(hash).and_then(|e| e.ctx.clone())
    }

    /// Caches what PostgreSQL said of `hash`, as read at invalidation generation `read_at`, and
    /// returns the context. An answer read before the latest invalidation is returned but not
    /// cached: it may predate a revocation (the next request reads PostgreSQL again).
    pub fn insert(&self, hash: KeyHash, ctx: Option<AuthContext>, read_at: u64) -> Option<Arc<AuthContext>> {
        let ttl = if ctx.is_some() { self.ttl } else { self.negative_ttl };
        let ctx = ctx.map(Arc::new);
        let mut shard = write(self.shard(&hash));
        // Checked under the shard's lock, which `invalidate` takes after counting: either the
        // invalidation is counted and this answer is dropped, or it sweeps this entry out.
        if self.generation() != read_at {
            return ctx;
        }
        if !shard.contains_key(&hash) && shard.len() >= self.shard_capacity {
            self.make_room(&mut shard);
        }
        shard.insert(hash, Entry { ctx: ctx.clone(), fresh_until: Instant::now() + ttl });
        ctx
    }

    /// Frees at least one place in a full shard.
    fn make_room(&self, shard: &mut HashMap<KeyHash, Entry>) {
        let before = shard.len();
        let now = Instant::now();
        shard.retain(|_, e| e.fresh_until > now);
        if shard.len() >= self.shard_capacity {
            shard.retain(|_, e| e.ctx.is_some());
        }
        if shard.len() >= self.shard_capacity {
            if let Some(victim) = shard.keys().next().copied() {
                shard.remove(&victim);
            }
        }
        self.evictions.inc_by((before - shard.len()) as u64);
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            write(s).clear();
        }
    }

    /// Drops every entry an invalidation concerns. Models are not cached here.
    pub fn invalidate(&self, message: &Invalidation) {
        let Ok(id) = message.id.parse::<Uuid>() else { return };
        let concerns = |ctx: &AuthContext| match message.kind {
            InvalidationKind::Key => ctx.key_id == id,
            InvalidationKind::User => ctx.user_id == id,
            InvalidationKind::Team => ctx.team_id == id,
            InvalidationKind::Subscription => ctx.subscriptions.iter().any(|s| s.id == id),
            InvalidationKind::Model => false,
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            write(s).retain(|_, e| !e.ctx.as_deref().is_some_and(concerns));
        }
    }
}

/// One key's PostgreSQL lookup, awaited by every request that missed the cache meanwhile.
pub type KeyLoad = Shared<BoxFuture<'static, Result<Option<AuthContext>, String>>>;

/// Key lookups under way. Concurrent misses of one key share one query, and so one place in the
/// failed-authentication allowance: a replica starting cold under load does not throttle a valid
/// key for the many requests that missed at once. A lookup belongs to the invalidation generation
/// it started in; a miss in a later generation starts its own rather than join an answer that
/// may predate a revocation.
#[derive(Default)]
pub struct KeyLoads(Mutex<HashMap<KeyHash, (u64, KeyLoad)>>);

/// A lookup this request joined, or started (then it ends the lookup's entry when dropped, even if
/// the request is abandoned, so no later miss waits on a finished, stale answer).
pub enum Joined<'a> {
    Started(KeyLoad, LoadEntry<'a>),
    Joined(KeyLoad),
}

pub struct LoadEntry<'a> {
    loads: &'a KeyLoads,
    hash: KeyHash,
    generation: u64,
}

impl Drop for LoadEntry<'_> {
    fn drop(&mut self) {
        let mut loads = lock(&self.loads.0);
        // A newer generation's lookup of the same key may have taken the place.
        if loads.get(&self.hash).is_some_and(|(g, _)| *g == self.generation) {
            loads.remove(&self.hash);
        }
    }
}

impl KeyLoads {
    /// Joins the lookup of `hash` under way in invalidation generation `generation`, or starts
    /// one with `start` when `may_start` allows it; `None` when it does not.
    pub fn join_or_start(
        &self,
        hash: KeyHash,
        generation: u64,
        may_start: impl FnOnce() -> bool,
        start: impl FnOnce() -> BoxFuture<'static, Result<Option<AuthContext>, String>>,
    ) -> Option<Joined<'_>> {
        let mut loads = lock(&self.0);
        if let Some((_, load)) = loads.get(&hash).filter(|(g, _)| *g == generation) {
            return Some(Joined::Joined(load.clone()));
        }
        if !may_start() {
            return None;
        }
        let load = futures::FutureExt::shared(start());
        loads.insert(hash, (generation, load.clone()));
        Some(Joined::Started(load, LoadEntry { loads: self, hash, generation }))
    }
}

#[cfg(test)]
mod tests {
    use tollgate_core::keys::hash_key;

    use super::*;
    use crate::auth::tests::context;

    fn cache(max_entries: usize) -> KeyCache {
        KeyCache::new(Duration::from_secs(60), Duration::from_secs(5), max_entries, IntCounter::new("e", "e").unwrap())
    }

    #[test]
    fn unknown_keys_cannot_grow_the_cache_without_bound() {
        let cache = cache(64);
        cache.insert(hash_key("known"), Some(context(1, 1)), 0);
        for i in 0..10_000 {
            cache.insert(hash_key(&format!("unknown-{i}")), None, 0);
        }
        assert!(cache.len() <= 64, "{} entries", cache.len());
        assert!(cache.evictions.get() >= 10_000 - 64);
        assert!(matches!(cache.get(&hash_key("known")), Lookup::Hit(_)), "known keys are evicted last");
    }

    #[test]
    fn invalidation_drops_matching_entries_only() {
        let cache = cache(1000);
        cache.insert(hash_key("a"), Some(context(1, 10)), 0);
        cache.insert(hash_key("b"), Some(context(2, 20)), 0);
        cache.insert(hash_key("c"), None, 0);
        cache.invalidate(&Invalidation::new(InvalidationKind::Key, Uuid::from_u128(1)));
        assert!(matches!(cache.get(&hash_key("a")), Lookup::Miss));
        assert!(matches!(cache.get(&hash_key("b")), Lookup::Hit(_)));
        assert!(matches!(cache.get(&hash_key("c")), Lookup::Unknown));
        cache.invalidate(&Invalidation::new(InvalidationKind::Subscription, Uuid::from_u128(50)));
        assert!(matches!(cache.get(&hash_key("b")), Lookup::Miss));
    }

    #[test]
    fn a_lookup_that_read_before_an_invalidation_is_not_cached() {
        let cache = cache(1000);
        // A lookup notes the generation, reads the key (not yet revoked)...
        let read_at = cache.generation();
        let stale = context(1, 10);
        // ...the revocation commits and its invalidation runs before the lookup inserts.
        cache.invalidate(&Invalidation::new(InvalidationKind::Key, Uuid::from_u128(1)));
        let answered = cache.insert(hash_key("a"), Some(stale), read_at);
        assert!(answered.is_some(), "the request that looked it up still gets its answer");
        assert!(matches!(cache.get(&hash_key("a")), Lookup::Miss), "the stale answer was cached");
        // A lookup after the invalidation is cached as usual.
        cache.insert(hash_key("a"), Some(context(1, 10)), cache.generation());
        assert!(matches!(cache.get(&hash_key("a")), Lookup::Hit(_)));
        // So is one across a clear (a reconnected invalidation listener).
        let read_at = cache.generation();
        cache.clear();
        cache.insert(hash_key("b"), Some(context(2, 20)), read_at);
        assert!(matches!(cache.get(&hash_key("b")), Lookup::Miss));
    }

    #[test]
    fn a_miss_after_an_invalidation_does_not_join_an_older_lookup() {
        let loads = KeyLoads::default();
        let hash = hash_key("a");
        let never =
            || -> BoxFuture<'static, Result<Option<AuthContext>, String>> { Box::pin(futures::future::pending()) };
        let first = loads.join_or_start(hash, 0, || true, never);
        assert!(matches!(first, Some(Joined::Started(..))));
        assert!(matches!(loads.join_or_start(hash, 0, || true, never), Some(Joined::Joined(_))));
        let newer = loads.join_or_start(hash, 1, || true, never);
        assert!(matches!(newer, Some(Joined::Started(..))), "joined a lookup from before the invalidation");
        // The older lookup ending does not remove the newer one's place.
        drop(first);
        assert!(matches!(loads.join_or_start(hash, 1, || true, never), Some(Joined::Joined(_))));
    }
}
