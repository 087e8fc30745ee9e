//! JWT verification: HS256 with the configured shared secret, or RS256 against an OIDC issuer's
//! JWKS. Also reads what a verified token says about its bearer: subject, email (and whether the
//! issuer verified it), name and the Tollgate roles its claims map to.
//!
//! Claims: `exp` and `sub` are required, and `iss` / `aud` too when configured (a token that
//! leaves them out is refused, not waved through); `nbf` is checked when present; `exp` and `nbf`
//! tolerate `jwt.leeway_seconds` of clock skew.
//!
//! The JWKS is held as one immutable key set that verification reads without waiting: a fetch
//! builds a new set and swaps it in whole, so keys the issuer removed stop verifying. Fetches run
//! on a timer (`jwt.jwks_refresh_seconds`) and on an unknown `kid` at most every
//! [`UNKNOWN_KID_REFETCH`], one at a time, never under the lock verification reads.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, Weak},
    time::{Duration, Instant},
};

use jsonwebtoken::{decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation};
use reqwest::Url;
use serde_json::{Map, Value};
use tollgate_core::{roles::Role, sync};

use crate::{
    config::JwtConfig,
    error::{ApiError, ApiResult},
};

/// Who a verified token names.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: String,
    /// The `email` claim, when it looks like an address. `preferred_username` is never used: the
    /// user picks it, so it proves nothing.
    pub email: Option<String>,
    /// `email_verified: true` in the token: only then may the token be linked to an existing user
    /// by email.
    pub email_verified: bool,
    pub name: String,
    /// The Tollgate roles the token's claims map to (possibly none).
    pub roles: Vec<Role>,
}

/// Verifies HS256 tokens with the shared secret and RS256 tokens against a JWKS.
pub struct JwtVerifier {
    config: JwtConfig,
    hs256: Option<DecodingKey>,
    jwks: Option<Arc<JwksCache>>,
}

type KeySet = HashMap<String, Arc<DecodingKey>>;

struct JwksCache {
    url: Url,
    http: reqwest::Client,
    /// The current key set; held only long enough to clone the `Arc`.
    keys: RwLock<Arc<KeySet>>,
    /// Serialises fetches; holds when the last one started.
    fetch: tokio::sync::Mutex<Option<Instant>>,
}

/// Refetch the JWKS on an unknown `kid` at most this often, so that unsigned tokens with made-up
/// `kid`s cannot make the control API hammer the issuer.
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);

impl JwtVerifier {
    /// Starts the JWKS refresh timer when a JWKS is configured (and a Tokio runtime is running).
    pub fn new(config: &JwtConfig) -> anyhow::Result<Self> {
        let hs256 = config.secret.as_deref().filter(|s| !s.is_empty()).map(|s| DecodingKey::from_secret(s.as_bytes()));
        let jwks = match &config.jwks_url {
            Some(url) => {
                let cache = Arc::new(JwksCache {
                    url: url.clone(),
                    http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
                    keys: RwLock::new(Arc::new(KeySet::new())),
                    fetch: tokio::sync::Mutex::new(None),
                });
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let every = Duration::from_secs(config.jwks_refresh_seconds.max(1));
                    runtime.spawn(refresh_periodically(Arc::downgrade(&cache), every));
                }
                Some(cache)
            }
            None => None,
        };
        Ok(Self { config: config.clone(), hs256, jwks })
    }

    /// Verifies `token` and reads who it names: 401 for a token that does not verify or names no
    /// usable subject.
    pub async fn identity(&self, token: &str) -> ApiResult<Identity> {
        let claims = self.verify(token).await?;
        let subject = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
        if subject.is_empty() || subject.len() > 255 {
            return Err(ApiError::Unauthorized("token has no usable subject".into()));
        }
        let email = claims.get("email").and_then(Value::as_str).filter(|v| v.contains('@')).map(str::to_owned);
        let email_verified = claims.get("email_verified").and_then(Value::as_bool) == Some(true);
        let name = claims.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        Ok(Identity { subject: subject.to_string(), email, email_verified, name, roles: self.roles(&claims) })
    }

    async fn verify(&self, token: &str) -> ApiResult<Map<String, Value>> {
        let unauthorized = |m: &str| ApiError::Unauthorized(m.to_string());
        let header = decode_header(token).map_err(|_| unauthorized("malformed token"))?;
        let key = match header.alg {
            Algorithm::HS256 => {
                self.hs256.clone().map(Arc::new).ok_or_else(|| unauthorized("HS256 tokens are not accepted"))?
            }
            Algorithm::RS256 => {
                let jwks = self.jwks.as_ref().ok_or_else(|| unauthorized("RS256 tokens are not accepted"))?;
                let kid = header.kid.as_deref().unwrap_or_default();
                jwks.key(kid).await?.ok_or_else(|| unauthorized("unknown signing key"))?
            }
            _ => return Err(unauthorized("unsupported token algorithm")),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.config.leeway_seconds;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        // The library checks `iss` and `aud` only when the token carries them: configured, they
        // must be present.
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        decode::<Map<String, Value>>(token, &key, &validation).map(|data| data.claims).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => unauthorized("token expired"),
                K::ImmatureSignature => unauthorized("token not valid yet (nbf)"),
                K::InvalidSignature => unauthorized("bad token signature"),
                K::InvalidIssuer => unauthorized("token issuer not accepted"),
                K::InvalidAudience => unauthorized("token audience not accepted"),
                K::MissingRequiredClaim(claim) => unauthorized(&format!("token lacks the `{claim}` claim")),
                _ => unauthorized("invalid token"),
            }
        })
    }

    /// The roles named by the roles claim, else mapped from the groups claim.
    fn roles(&self, claims: &Map<String, Value>) -> Vec<Role> {
        let strings = |claim: &str| -> Vec<String> {
            match claims.get(claim) {
                Some(Value::String(s)) => s.split([',', ' ']).map(str::to_owned).collect(),
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                _ => Vec::new(),
            }
        };
        let roles: Vec<Role> = strings(&self.config.roles_claim).iter().filter_map(|r| Role::parse(r)).collect();
        if !roles.is_empty() {
            return roles;
        }
        strings(&self.config.groups_claim)
            .iter()
            .filter_map(|g| self.config.group_roles.get(g.trim_start_matches('/')).copied())
            .collect()
    }
}

/// The strongest of `roles`.
pub fn strongest(roles: impl IntoIterator<Item = Role>) -> Option<Role> {
    let roles: Vec<Role> = roles.into_iter().collect();
    [Role::Admin, Role::AdminReadonly, Role::User].into_iter().find(|r| roles.contains(r))
}

/// Refetches the JWKS every `every` for as long as the verifier lives.
async fn refresh_periodically(cache: Weak<JwksCache>, every: Duration) {
    loop {
        let Some(cache) = cache.upgrade() else { return };
        let mut last = cache.fetch.lock().await;
        *last = Some(Instant::now());
        if let Err(e) = cache.refetch().await {
            // Keep the keys we have: an issuer's hiccup must not log everyone out.
            tracing::warn!(error = %e, "scheduled JWKS refresh failed");
        }
        drop(last);
        drop(cache);
        tokio::time::sleep(every).await;
    }
}

impl JwksCache {
    fn current(&self) -> Arc<KeySet> {
        sync::read(&self.keys).clone()
    }

    async fn key(&self, kid: &str) -> ApiResult<Option<Arc<DecodingKey>>> {
        if let Some(k) = self.current().get(kid) {
            return Ok(Some(k.clone()));
        }
        // Unknown kid: one fetch at a time, at most every UNKNOWN_KID_REFETCH. Verifications of
        // known kids do not wait for it: they only read `keys`.
        let mut last = self.fetch.lock().await;
        if let Some(k) = self.current().get(kid) {
            return Ok(Some(k.clone()));
        }
        if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFETCH) {
            return Ok(None);
        }
        *last = Some(Instant::now());
        self.refetch().await.map_err(|e| {
            tracing::warn!(error = %e, "JWKS unavailable");
            ApiError::Unavailable("identity provider keys unavailable".into())
        })?;
        Ok(self.current().get(kid).cloned())
    }

    /// Fetches the JWKS and replaces the key set with it whole.
    async fn refetch(&self) -> Result<(), reqwest::Error> {
        let jwks: JwkSet = self.http.get(self.url.clone()).send().await?.error_for_status()?.json().await?;
        let keys: KeySet = jwks
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|k| (kid, Arc::new(k)))
            })
            .collect();
        *sync::write(&self.keys) = Arc::new(keys);
        Ok(())
    }
}
