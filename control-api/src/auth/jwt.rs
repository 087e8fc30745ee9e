//! JWT verification: HS256 with the configured shared secret, or RS256 against an OIDC issuer's
//! JWKS (cached; refetched on an unknown `kid` at most every [`JWKS_REFRESH`]). Also reads what a
//! verified token says about its bearer: subject, email, name and Tollgate role.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use jsonwebtoken::{decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation};
use reqwest::Url;
use serde_json::{Map, Value};
use tokio::sync::RwLock;
use tollgate_core::roles::Role;

use crate::{
    config::JwtConfig,
    error::{ApiError, ApiResult},
};

/// Who a verified token names.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: String,
    /// The `email` (else `preferred_username`) claim when it looks like an address, else the subject.
    pub email: String,
    pub name: String,
    pub role: Role,
}

/// Verifies HS256 tokens with the shared secret and RS256 tokens against a JWKS.
pub struct JwtVerifier {
    config: JwtConfig,
    hs256: Option<DecodingKey>,
    jwks: Option<JwksCache>,
}

struct JwksCache {
    url: Url,
    http: reqwest::Client,
    keys: RwLock<KeySet>,
}

#[derive(Default)]
struct KeySet {
    /// When the JWKS was last fetched (successfully or not).
    fetched_at: Option<Instant>,
    by_kid: HashMap<String, Arc<DecodingKey>>,
}

/// Refetch the JWKS on an unknown `kid` at most this often.
const JWKS_REFRESH: Duration = Duration::from_secs(10);

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> anyhow::Result<Self> {
        let hs256 = config.secret.as_deref().filter(|s| !s.is_empty()).map(|s| DecodingKey::from_secret(s.as_bytes()));
        let jwks = match &config.jwks_url {
            Some(url) => Some(JwksCache {
                url: url.clone(),
                http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
                keys: RwLock::new(KeySet::default()),
            }),
            None => None,
        };
        Ok(Self { config: config.clone(), hs256, jwks })
    }

    /// Verifies `token` and reads who it names: 401 for a token that does not verify or names no
    /// usable subject, 403 for one that carries no Tollgate role.
    pub async fn identity(&self, token: &str) -> ApiResult<Identity> {
        let claims = self.verify(token).await?;
        let role = self
            .role(&claims)
            .ok_or_else(|| ApiError::forbidden("token carries no Tollgate role (roles claim or mapped group)"))?;
        let subject = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
        if subject.is_empty() || subject.len() > 255 {
            return Err(ApiError::Unauthorized("token has no usable subject".into()));
        }
        let email = ["email", "preferred_username"]
            .iter()
            .filter_map(|c| claims.get(*c).and_then(Value::as_str))
            .find(|v| v.contains('@'))
            .unwrap_or(subject)
            .to_string();
        let name = claims.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        Ok(Identity { subject: subject.to_string(), email, name, role })
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
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        decode::<Map<String, Value>>(token, &key, &validation).map(|data| data.claims).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => unauthorized("token expired"),
            jsonwebtoken::errors::ErrorKind::InvalidSignature => unauthorized("bad token signature"),
            _ => unauthorized("invalid token"),
        })
    }

    /// The strongest role named by the roles claim, else mapped from the groups claim.
    fn role(&self, claims: &Map<String, Value>) -> Option<Role> {
        let strings = |claim: &str| -> Vec<String> {
            match claims.get(claim) {
                Some(Value::String(s)) => s.split([',', ' ']).map(str::to_owned).collect(),
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                _ => Vec::new(),
            }
        };
        let mut roles: Vec<Role> = strings(&self.config.roles_claim).iter().filter_map(|r| Role::parse(r)).collect();
        if roles.is_empty() {
            roles = strings(&self.config.groups_claim)
                .iter()
                .filter_map(|g| self.config.group_roles.get(g.trim_start_matches('/')).copied())
                .collect();
        }
        [Role::Admin, Role::AdminReadonly, Role::User].into_iter().find(|r| roles.contains(r))
    }
}

impl JwksCache {
    async fn key(&self, kid: &str) -> ApiResult<Option<Arc<DecodingKey>>> {
        let fresh = |set: &KeySet| set.fetched_at.is_some_and(|t| t.elapsed() < JWKS_REFRESH);
        {
            let set = self.keys.read().await;
            if let Some(k) = set.by_kid.get(kid) {
                return Ok(Some(k.clone()));
            }
            if fresh(&set) {
                return Ok(None);
            }
        }
        let mut set = self.keys.write().await;
        // Another request may have refetched while this one waited for the lock.
        if fresh(&set) {
            return Ok(set.by_kid.get(kid).cloned());
        }
        set.fetched_at = Some(Instant::now());
        let jwks: JwkSet = match self.http.get(self.url.clone()).send().await {
            Ok(resp) => resp.json().await.map_err(|e| {
                tracing::warn!(error = %e, "JWKS unreadable");
                ApiError::Unavailable("identity provider keys unavailable".into())
            })?,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS unreachable");
                return Err(ApiError::Unavailable("identity provider keys unavailable".into()));
            }
        };
        set.by_kid = jwks
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|k| (kid, Arc::new(k)))
            })
            .collect();
        Ok(set.by_kid.get(kid).cloned())
    }
}
