//! Who is calling: the key from `Authorization: Bearer`, `api-key` or `x-api-key`, hashed and
//! looked up in the [`KeyCache`]; a miss reads PostgreSQL once (one query brings the key, its
//! user, team and the user's active subscriptions) and caches the answer, negative ones too.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::{types::Json, FromRow, PgPool};
use tollgate_core::{
    invalidation::{Invalidation, InvalidationKind},
    keys::{hash_key, KeyHash},
    limits::Limits,
};
use uuid::Uuid;

use crate::error::GatewayError;

/// Everything the gateway needs to decide about a key, loaded in one query.
#[derive(Debug, Clone)]
pub struct AuthContext {
    pub key_id: Uuid,
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
SELECT k.id AS key_id, k.user_id, k.team_id, k.models AS key_models, k.limits AS key_limits,
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
pub fn presented_key(headers: &pingora::http::RequestHeader) -> Option<&str> {
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

struct Entry {
    /// `None`: the key is unknown.
    ctx: Option<Arc<AuthContext>>,
    fresh_until: Instant,
}

const SHARDS: usize = 16;

/// In-process cache of key contexts by key hash, sharded to keep lock contention low. Entries
/// expire after a TTL (the backstop) and are dropped at once by invalidations.
pub struct KeyCache {
    shards: Vec<RwLock<HashMap<KeyHash, Entry>>>,
    ttl: Duration,
    negative_ttl: Duration,
}

pub enum Lookup {
    Hit(Arc<AuthContext>),
    Unknown,
    Miss,
}

impl KeyCache {
    pub fn new(ttl: Duration, negative_ttl: Duration) -> Self {
        Self { shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(), ttl, negative_ttl }
    }

    fn shard(&self, hash: &KeyHash) -> &RwLock<HashMap<KeyHash, Entry>> {
        &self.shards[hash[0] as usize % SHARDS]
    }

    pub fn get(&self, hash: &KeyHash) -> Lookup {
        let shard = self.shard(hash).read().expect("key cache lock");
        match shard.get(hash) {
            Some(e) if e.fresh_until > Instant::now() => match &e.ctx {
                Some(ctx) => Lookup::Hit(ctx.clone()),
                None => Lookup::Unknown,
            },
            _ => Lookup::Miss,
        }
    }

    /// Whatever is cached for `hash`, even past its TTL (used while PostgreSQL is away).
    pub fn get_stale(&self, hash: &KeyHash) -> Option<Arc<AuthContext>> {
        self.shard(hash).read().expect("key cache lock").get(hash).and_then(|e| e.ctx.clone())
    }

    pub fn insert(&self, hash: KeyHash, ctx: Option<AuthContext>) -> Option<Arc<AuthContext>> {
        let ttl = if ctx.is_some() { self.ttl } else { self.negative_ttl };
        let ctx = ctx.map(Arc::new);
        self.shard(&hash)
            .write()
            .expect("key cache lock")
            .insert(hash, Entry { ctx: ctx.clone(), fresh_until: Instant::now() + ttl });
        ctx
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().expect("key cache lock").len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        for s in &self.shards {
            s.write().expect("key cache lock").clear();
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
            s.write().expect("key cache lock").retain(|_, e| !e.ctx.as_deref().is_some_and(concerns));
        }
    }
}

/// Hashes a presented key; cheap enough to do on every request.
pub fn key_hash(key: &str) -> KeyHash {
    hash_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(key: u128, user: u128) -> AuthContext {
        AuthContext {
            key_id: Uuid::from_u128(key),
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
    fn invalidation_drops_matching_entries_only() {
        let cache = KeyCache::new(Duration::from_secs(60), Duration::from_secs(5));
        cache.insert(hash_key("a"), Some(ctx(1, 10)));
        cache.insert(hash_key("b"), Some(ctx(2, 20)));
        cache.insert(hash_key("c"), None);
        cache.invalidate(&Invalidation::new(InvalidationKind::Key, Uuid::from_u128(1)));
        assert!(matches!(cache.get(&hash_key("a")), Lookup::Miss));
        assert!(matches!(cache.get(&hash_key("b")), Lookup::Hit(_)));
        assert!(matches!(cache.get(&hash_key("c")), Lookup::Unknown));
        cache.invalidate(&Invalidation::new(InvalidationKind::Subscription, Uuid::from_u128(50)));
        assert!(matches!(cache.get(&hash_key("b")), Lookup::Miss));
    }

    #[test]
    fn entitlement_needs_key_team_and_subscription() {
        let mut c = ctx(1, 1);
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
