//! The in-process [`KeyCache`]: key contexts by key hash, sharded to keep lock contention low.
//! Entries expire after a TTL (the backstop) and are dropped at once by invalidations; unknown
//! keys are cached too, for a shorter TTL, so a flood of bad keys does not reach PostgreSQL.
//! The cache is bounded: a full shard drops its expired entries first, then unknown keys, then
//! whatever it must, counting each eviction.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
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
        }
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

    /// Caches what PostgreSQL said of `hash` and returns the cached context.
    pub fn insert(&self, hash: KeyHash, ctx: Option<AuthContext>) -> Option<Arc<AuthContext>> {
        let ttl = if ctx.is_some() { self.ttl } else { self.negative_ttl };
        let ctx = ctx.map(Arc::new);
        let mut shard = write(self.shard(&hash));
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
        for s in &self.shards {
            write(s).retain(|_, e| !e.ctx.as_deref().is_some_and(concerns));
        }
    }
}

/// One key's PostgreSQL lookup, awaited by every request that missed the cache meanwhile.
pub type KeyLoad = Shared<BoxFuture<'static, Result<Option<AuthContext>, String>>>;

/// Key lookups under way. Concurrent misses of one key share one query, and so one place in the
/// failed-authentication allowance: a replica starting cold under load does not throttle a valid
/// key for the many requests that missed at once.
#[derive(Default)]
pub struct KeyLoads(Mutex<HashMap<KeyHash, KeyLoad>>);

/// A lookup this request joined, or started (then it ends the lookup's entry when dropped, even if
/// the request is abandoned, so no later miss waits on a finished, stale answer).
pub enum Joined<'a> {
    Started(KeyLoad, LoadEntry<'a>),
    Joined(KeyLoad),
}

pub struct LoadEntry<'a> {
    loads: &'a KeyLoads,
    hash: KeyHash,
}

impl Drop for LoadEntry<'_> {
    fn drop(&mut self) {
        lock(&self.loads.0).remove(&self.hash);
    }
}

impl KeyLoads {
    /// Joins the lookup of `hash` under way, or starts one with `start` when `may_start` allows
    /// it; `None` when it does not.
    pub fn join_or_start(
        &self,
        hash: KeyHash,
        may_start: impl FnOnce() -> bool,
        start: impl FnOnce() -> BoxFuture<'static, Result<Option<AuthContext>, String>>,
    ) -> Option<Joined<'_>> {
        let mut loads = lock(&self.0);
        if let Some(load) = loads.get(&hash) {
            return Some(Joined::Joined(load.clone()));
        }
        if !may_start() {
            return None;
        }
        let load = futures::FutureExt::shared(start());
        loads.insert(hash, load.clone());
        Some(Joined::Started(load, LoadEntry { loads: self, hash }))
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
        cache.insert(hash_key("known"), Some(context(1, 1)));
        for i in 0..10_000 {
            cache.insert(hash_key(&format!("unknown-{i}")), None);
        }
        assert!(cache.len() <= 64, "{} entries", cache.len());
        assert!(cache.evictions.get() >= 10_000 - 64);
        assert!(matches!(cache.get(&hash_key("known")), Lookup::Hit(_)), "known keys are evicted last");
    }

    #[test]
    fn invalidation_drops_matching_entries_only() {
        let cache = cache(1000);
        cache.insert(hash_key("a"), Some(context(1, 10)));
        cache.insert(hash_key("b"), Some(context(2, 20)));
        cache.insert(hash_key("c"), None);
        cache.invalidate(&Invalidation::new(InvalidationKind::Key, Uuid::from_u128(1)));
        assert!(matches!(cache.get(&hash_key("a")), Lookup::Miss));
        assert!(matches!(cache.get(&hash_key("b")), Lookup::Hit(_)));
        assert!(matches!(cache.get(&hash_key("c")), Lookup::Unknown));
        cache.invalidate(&Invalidation::new(InvalidationKind::Subscription, Uuid::from_u128(50)));
        assert!(matches!(cache.get(&hash_key("b")), Lookup::Miss));
    }
}
