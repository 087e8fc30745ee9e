//! Who is calling: the key from `Authorization: Bearer`, `api-key` or `x-api-key`, hashed and
//! looked up in the [`KeyCache`](crate::key_cache::KeyCache); a miss reads PostgreSQL once (one query brings the key, its
//! user, team and the user's active subscriptions) and caches the answer, negative ones too.
//! Addresses that fail too often are throttled ([`FailedAuthThrottle`]) so keys cannot be
//! guessed at speed.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use pingora::{http::RequestHeader, proxy::Session};
use prometheus::IntCounter;
use serde::Deserialize;
use sqlx::{types::Json, FromRow, PgPool};
use tollgate_core::{
    keys::{hash_key, is_well_formed, KeyHash},
    limits::Limits,
    net::{client_address, Cidr},
    sync::lock,
};
use uuid::Uuid;

use crate::{
    error::GatewayError,
    key_cache::{Joined, Lookup},
    state::GatewayState,
};

/// Everything the gateway needs to decide about a key, loaded in one query.
#[derive(Debug, Clone)]
pub struct AuthContext {
    pub key_id: Uuid,
    /// The key's public prefix (`sk-tg-AbCdEf...WxYz`), for logs: never the key itself.
    pub key_prefix: String,
    pub user_id: Uuid,
    pub team_id: Uuid,
    /// Empty: every model of the user's active subscriptions.
    pub key_models: Vec<String>,
    pub key_limits: Limits,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked: bool,
    pub user_active: bool,
    pub user_limits: Limits,
    /// Empty: every model.
    pub team_models: Vec<String>,
    pub team_limits: Limits,
    pub team_member: bool,
    pub subscriptions: Vec<ActiveSubscription>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ActiveSubscription {
    pub id: Uuid,
    pub model: String,
    pub limits: Limits,
}

impl AuthContext {
    /// 401/403 for a key that may not be used at all right now.
    pub fn check_usable(&self, now: DateTime<Utc>) -> Result<(), GatewayError> {
        if self.revoked {
            return Err(GatewayError::RevokedKey);
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            return Err(GatewayError::ExpiredKey);
        }
        if !self.user_active {
            return Err(GatewayError::SuspendedUser);
        }
        Ok(())
    }

    /// The subscription that entitles this key to `model`, if the key, its team and the user's
    /// subscriptions all allow it.
    pub fn entitlement(&self, model: &str) -> Result<&ActiveSubscription, GatewayError> {
        let allowed_by_key = self.key_models.is_empty() || self.key_models.iter().any(|m| m == model);
        let allowed_by_team = self.team_models.is_empty() || self.team_models.iter().any(|m| m == model);
        if !allowed_by_key || !allowed_by_team || !self.team_member {
            return Err(GatewayError::ModelNotAllowed(model.to_string()));
        }
        self.subscriptions
            .iter()
            .find(|s| s.model == model)
            .ok_or_else(|| GatewayError::NoSubscription(model.to_string()))
    }

    /// Models this key may call (before checking that each model is enabled).
    pub fn usable_models(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.iter().map(|s| s.model.as_str()).filter(|m| self.entitlement(m).is_ok())
    }
}

#[derive(FromRow)]
struct KeyRow {
    key_id: Uuid,
    key_prefix: String,
    user_id: Uuid,
    team_id: Uuid,
    key_models: Vec<String>,
    key_limits: Json<Limits>,
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
    user_active: bool,
    user_limits: Json<Limits>,
    team_models: Vec<String>,
    team_limits: Json<Limits>,
    team_member: bool,
    subscriptions: Json<Vec<ActiveSubscription>>,
}

const KEY_QUERY: &str = "
SELECT k.id AS key_id, k.key_prefix, k.user_id, k.team_id, k.models AS key_models, k.limits AS key_limits,
       k.expires_at, k.revoked_at IS NOT NULL AS revoked,
       u.status = 'active' AS user_active, u.limits AS user_limits,
       t.allowed_models AS team_models, t.limits AS team_limits,
       EXISTS (SELECT 1 FROM team_members m WHERE m.team_id = k.team_id AND m.user_id = k.user_id) AS team_member,
       (SELECT coalesce(json_agg(json_build_object('id', s.id, 'model', s.model_id, 'limits', s.limits)), '[]'::json)
          FROM subscriptions s WHERE s.user_id = k.user_id AND s.status = 'active') AS subscriptions
FROM api_keys k JOIN users u ON u.id = k.user_id JOIN teams t ON t.id = k.team_id
WHERE k.key_hash = $1";

/// Reads one key's context from PostgreSQL; `Ok(None)` for an unknown key.
pub async fn load_key(db: &PgPool, hash: KeyHash) -> Result<Option<AuthContext>, sqlx::Error> {
    let row: Option<KeyRow> = sqlx::query_as(KEY_QUERY).bind(&hash[..]).fetch_optional(db).await?;
    Ok(row.map(|r| AuthContext {
        key_id: r.key_id,
        key_prefix: r.key_prefix,
        user_id: r.user_id,
        team_id: r.team_id,
        key_models: r.key_models,
        key_limits: r.key_limits.0,
        expires_at: r.expires_at,
        revoked: r.revoked,
        user_active: r.user_active,
        user_limits: r.user_limits.0,
        team_models: r.team_models,
        team_limits: r.team_limits.0,
        team_member: r.team_member,
        subscriptions: r.subscriptions.0,
    }))
}

/// The presented key, from `Authorization: Bearer`, `api-key` or `x-api-key`.
pub fn presented_key(headers: &RequestHeader) -> Option<&str> {
    if let Some(v) = headers.headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let token = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v);
        return Some(token.trim()).filter(|t| !t.is_empty());
    }
    ["api-key", "x-api-key"]
        .iter()
        .find_map(|h| headers.headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Failed authentications per client address over fixed one-minute windows: past the limit,
/// 429 instead of 401, and no key lookup reaches PostgreSQL from that address until the window
/// ends. The addresses tracked are bounded: expired windows go first, then the oldest.
pub struct FailedAuthThrottle {
    shards: Vec<Mutex<HashMap<IpAddr, FailureWindow>>>,
    per_minute: u32,
    shard_capacity: usize,
    evictions: IntCounter,
}

struct FailureWindow {
    started: Instant,
    failures: u32,
}

const FAILURE_WINDOW: Duration = Duration::from_secs(60);
const THROTTLE_SHARDS: usize = 16;

impl FailedAuthThrottle {
    pub fn new(per_minute: u32, max_addresses: usize, evictions: IntCounter) -> Self {
        Self {
            shards: (0..THROTTLE_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_minute: per_minute.max(1),
            shard_capacity: max_addresses.div_ceil(THROTTLE_SHARDS).max(1),
            evictions,
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, FailureWindow>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ip.hash(&mut h);
        &self.shards[h.finish() as usize % THROTTLE_SHARDS]
    }

    /// Whether `ip` has used up its failures for this window.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        lock(self.shard(&ip))
            .get(&ip)
            .is_some_and(|w| w.started.elapsed() < FAILURE_WINDOW && w.failures >= self.per_minute)
    }

    /// Counts a failed authentication from `ip`: answered with `e`, or 429 once `ip` has failed
    /// too often.
    pub fn judge(&self, ip: IpAddr, e: GatewayError) -> GatewayError {
        let mut shard = lock(self.shard(&ip));
        if !shard.contains_key(&ip) && shard.len() >= self.shard_capacity {
            shard.retain(|_, w| w.started.elapsed() < FAILURE_WINDOW);
            if shard.len() >= self.shard_capacity {
                let oldest = shard.iter().min_by_key(|(_, w)| w.started).map(|(ip, _)| *ip);
                if let Some(oldest) = oldest {
                    shard.remove(&oldest);
                    self.evictions.inc();
                }
            }
        }
        let now = Instant::now();
        let window = shard.entry(ip).or_insert(FailureWindow { started: now, failures: 0 });
        if now.duration_since(window.started) >= FAILURE_WINDOW {
            *window = FailureWindow { started: now, failures: 0 };
        }
        window.failures = window.failures.saturating_add(1);
        if window.failures > self.per_minute {
            GatewayError::TooManyFailures
        } else {
            e
        }
    }

    /// Takes one failure's place for a key lookup from `ip` before it runs, so that concurrent
    /// lookups cannot overrun the allowance: `false` (and nothing taken) when `ip` is blocked.
    /// A lookup that finds a key gives its place back with [`Self::forgive`].
    pub fn begin_lookup(&self, ip: IpAddr) -> bool {
        !matches!(self.judge(ip, GatewayError::InvalidKey), GatewayError::TooManyFailures)
    }

    /// Gives back the place [`Self::begin_lookup`] took.
    pub fn forgive(&self, ip: IpAddr) {
        if let Some(w) = lock(self.shard(&ip)).get_mut(&ip) {
            w.failures = w.failures.saturating_sub(1);
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The client's address: the peer, or behind a trusted proxy the address it forwarded for.
pub fn client_ip(session: &Session, trusted: &[Cidr]) -> IpAddr {
    let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if trusted.is_empty() {
        return peer;
    }
    let forwarded = session.req_header().headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    client_address(peer, forwarded, trusted)
}

/// Step 1: the caller behind the presented key, from the cache or PostgreSQL. Unknown, revoked
/// and expired keys count against the address's failed-authentication allowance.
pub async fn authenticate(
    state: &GatewayState,
    req: &RequestHeader,
    ip: IpAddr,
) -> Result<Arc<AuthContext>, GatewayError> {
    let failed = |e: GatewayError| state.auth_failures.judge(ip, e);
    let key = presented_key(req).ok_or(GatewayError::MissingKey)?;
    if !is_well_formed(key) {
        return Err(failed(GatewayError::InvalidKey));
    }
    let hash = hash_key(key);
    let ctx = match state.keys.get(&hash) {
        Lookup::Hit(ctx) => {
            state.metrics.key_cache_hits.inc();
            ctx
        }
        Lookup::Unknown => {
            state.metrics.key_cache_hits.inc();
            return Err(failed(GatewayError::InvalidKey));
        }
        // Every lookup counts as a failure until it finds a key: an address past its failures
        // may still use keys already cached, but reaches PostgreSQL no more, so a flood of
        // made-up keys costs at most its allowance of lookups, however concurrent.
        Lookup::Miss => {
            let db = state.db.clone();
            let support = state.support.clone();
            let generation = state.keys.generation();
            let joined = state.key_loads.join_or_start(
                hash,
                generation,
                || state.auth_failures.begin_lookup(ip),
                || {
                    Box::pin(async move {
                        match support.spawn(async move { load_key(&db, hash).await }).await {
                            Ok(loaded) => loaded.map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        }
                    })
                },
            );
            let (load, started) = match joined {
                None => return Err(GatewayError::TooManyFailures),
                Some(Joined::Started(load, entry)) => (load, Some(entry)),
                Some(Joined::Joined(load)) => (load, None),
            };
            let loaded = load.await;
            if started.is_some() {
                state.metrics.key_cache_misses.inc();
                if !matches!(loaded, Ok(None)) {
                    state.auth_failures.forgive(ip);
                }
            }
            let ctx = match loaded {
                Ok(Some(ctx)) => state.keys.insert(hash, Some(ctx), generation).ok_or(GatewayError::Internal)?,
                Ok(None) => {
                    state.keys.insert(hash, None, generation);
                    return Err(GatewayError::InvalidKey);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "key lookup failed");
                    // PostgreSQL is away: a key seen before keeps working; an unknown one
                    // cannot be judged, which is not the client's fault (503, never 401).
                    state.keys.get_stale(&hash).ok_or(GatewayError::AuthUnavailable)?
                }
            };
            // Cached before the lookup's entry ends: a later miss finds the cache, not a stale
            // answer.
            drop(started);
            ctx
        }
    };
    ctx.check_usable(Utc::now()).map_err(|e| match e {
        GatewayError::RevokedKey | GatewayError::ExpiredKey => failed(e),
        other => other,
    })?;
    Ok(ctx)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn context(key: u128, user: u128) -> AuthContext {
        AuthContext {
            key_id: Uuid::from_u128(key),
            key_prefix: "sk-tg-test...".into(),
            user_id: Uuid::from_u128(user),
            team_id: Uuid::from_u128(9),
            key_models: vec![],
            key_limits: Limits::default(),
            expires_at: None,
            revoked: false,
            user_active: true,
            user_limits: Limits::default(),
            team_models: vec![],
            team_limits: Limits::default(),
            team_member: true,
            subscriptions: vec![ActiveSubscription {
                id: Uuid::from_u128(50),
                model: "m".into(),
                limits: Limits::default(),
            }],
        }
    }

    #[test]
    fn throttle_counts_failures_per_address_and_stays_bounded() {
        let evictions = IntCounter::new("e", "e").unwrap();
        let t = FailedAuthThrottle::new(2, 32, evictions.clone());
        let a = IpAddr::from([10, 0, 0, 1]);
        assert!(matches!(t.judge(a, GatewayError::InvalidKey), GatewayError::InvalidKey));
        assert!(!t.is_blocked(a));
        assert!(matches!(t.judge(a, GatewayError::InvalidKey), GatewayError::InvalidKey));
        assert!(t.is_blocked(a));
        assert!(matches!(t.judge(a, GatewayError::InvalidKey), GatewayError::TooManyFailures));
        assert!(!t.is_blocked(IpAddr::from([10, 0, 0, 2])), "other addresses are not blocked");
        for i in 0..10_000u32 {
            t.judge(IpAddr::from(i.to_be_bytes()), GatewayError::InvalidKey);
        }
        assert!(t.len() <= 32, "{} addresses tracked", t.len());
        assert!(evictions.get() > 0);
    }

    #[test]
    fn entitlement_needs_key_team_and_subscription() {
        let mut c = context(1, 1);
        assert_eq!(c.entitlement("m").unwrap().id, Uuid::from_u128(50));
        assert!(matches!(c.entitlement("x"), Err(GatewayError::NoSubscription(_))));
        c.key_models = vec!["x".into()];
        assert!(matches!(c.entitlement("m"), Err(GatewayError::ModelNotAllowed(_))));
        c.key_models = vec![];
        c.team_models = vec!["x".into()];
        assert!(matches!(c.entitlement("m"), Err(GatewayError::ModelNotAllowed(_))));
        c.team_models = vec![];
        c.team_member = false;
        assert!(matches!(c.entitlement("m"), Err(GatewayError::ModelNotAllowed(_))));
    }
}
