//! Who is calling: an admin API key from configuration, or a JWT (HS256 shared secret, or RS256
//! verified against an OIDC issuer's JWKS). JWT users unknown to the database are created on first
//! use and join the Default Team. [`Caller`] also carries the request id and client address that
//! the audit trail records, and the role checks every handler applies.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{header, request::Parts},
};
use jsonwebtoken::{decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sqlx::PgPool;
use tokio::sync::RwLock;
use tollgate_core::{
    keys::{hash_key, hashes_equal, KeyHash},
    roles::Role,
    DEFAULT_TEAM_ID,
};
use uuid::Uuid;

use crate::{
    config::{ControlApiConfig, JwtConfig},
    error::{ApiError, ApiResult},
    state::AppState,
};

#[derive(Debug, Clone)]
pub enum Principal {
    AdminKey { label: String },
    User { id: Uuid, email: String, role: Role },
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub request_id: Option<String>,
    pub ip: Option<String>,
}

impl Caller {
    pub fn role(&self) -> Role {
        match &self.principal {
            Principal::AdminKey { .. } => Role::Admin,
            Principal::User { role, .. } => *role,
        }
    }

    pub fn actor_id(&self) -> Option<Uuid> {
        match &self.principal {
            Principal::AdminKey { .. } => None,
            Principal::User { id, .. } => Some(*id),
        }
    }

    pub fn actor_label(&self) -> String {
        match &self.principal {
            Principal::AdminKey { label } => label.clone(),
            Principal::User { email, .. } => format!("user:{email}"),
        }
    }

    /// Admins only (every write that is not on one's own resources).
    pub fn require_admin(&self) -> ApiResult<()> {
        match self.role() {
            Role::Admin => Ok(()),
            Role::AdminReadonly => Err(ApiError::forbidden("read-only administrators cannot write")),
            Role::User => Err(ApiError::forbidden("administrator role required")),
        }
    }

    /// Any write: refused to read-only administrators; users are then limited to their own.
    pub fn require_writer(&self) -> ApiResult<()> {
        match self.role() {
            Role::AdminReadonly => Err(ApiError::forbidden("read-only administrators cannot write")),
            _ => Ok(()),
        }
    }

    /// Reading everything (audit log and the like): admin or adminReadonly.
    pub fn require_reader(&self) -> ApiResult<()> {
        match self.role() {
            Role::User => Err(ApiError::forbidden("administrator role required")),
            _ => Ok(()),
        }
    }

    /// `Some(own id)` when results must be restricted to the caller's own resources.
    pub fn own_scope(&self) -> Option<Uuid> {
        match &self.principal {
            Principal::User { id, role: Role::User, .. } => Some(*id),
            _ => None,
        }
    }

    /// Whether the caller may see resources owned by `owner`.
    pub fn sees(&self, owner: Uuid) -> bool {
        self.own_scope().is_none_or(|me| me == owner)
    }

    /// 404 unless the caller may see resources owned by `owner`: to a user, others' resources
    /// do not exist.
    pub fn ensure_sees(&self, owner: Uuid, what: &'static str) -> ApiResult<()> {
        if self.sees(owner) {
            Ok(())
        } else {
            Err(ApiError::NotFound(what))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        let principal = state.auth.authenticate(token).await?;
        let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let forwarded = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_owned());
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
        Ok(Caller { principal, request_id, ip: forwarded.or(peer) })
    }
}

pub struct Authenticator {
    admin_key_hashes: Vec<KeyHash>,
    jwt: JwtVerifier,
    db: PgPool,
}

impl Authenticator {
    pub fn new(config: &ControlApiConfig, db: PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            admin_key_hashes: config.admin_api_keys.iter().map(|k| hash_key(k)).collect(),
            jwt: JwtVerifier::new(&config.jwt)?,
            db,
        })
    }

    pub async fn authenticate(&self, token: &str) -> ApiResult<Principal> {
        if token.bytes().filter(|b| *b == b'.').count() == 2 {
            let claims = self.jwt.verify(token).await?;
            return self.user_from_claims(&claims).await;
        }
        let presented = hash_key(token);
        // Compare against every configured key without stopping early.
        let matched =
            self.admin_key_hashes
                .iter()
                .fold(None, |found, h| if hashes_equal(h, &presented) { Some(h) } else { found });
        match matched {
            Some(h) => Ok(Principal::AdminKey { label: format!("admin-key:{}", hex_prefix(h)) }),
            None => Err(ApiError::Unauthorized("invalid credentials".into())),
        }
    }

    /// Maps verified claims to a user, creating the user on first sight.
    async fn user_from_claims(&self, claims: &Map<String, Value>) -> ApiResult<Principal> {
        let role = self
            .jwt
            .role(claims)
            .ok_or_else(|| ApiError::forbidden("token carries no Tollgate role (roles claim or mapped group)"))?;
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
        if sub.is_empty() || sub.len() > 255 {
            return Err(ApiError::Unauthorized("token has no usable subject".into()));
        }
        let email = ["email", "preferred_username"]
            .iter()
            .filter_map(|c| claims.get(*c).and_then(Value::as_str))
            .find(|v| v.contains('@'))
            .unwrap_or(sub)
            .to_string();
        let name = claims.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let (id, status) = self.resolve_user(sub, &email, &name, role).await?;
        if status != "active" {
            return Err(ApiError::forbidden("user is suspended"));
        }
        Ok(Principal::User { id, email, role })
    }

    async fn resolve_user(&self, sub: &str, email: &str, name: &str, role: Role) -> ApiResult<(Uuid, String)> {
        // Known by subject, or by email (then linked to the subject).
        let found: Option<(Uuid, String)> = sqlx::query_as(
            "UPDATE users SET oidc_subject = $1, updated_at = now()
             WHERE id = (SELECT id FROM users WHERE oidc_subject = $1
                         UNION ALL
                         SELECT id FROM users WHERE lower(email) = lower($2) AND oidc_subject IS NULL
                         LIMIT 1)
             RETURNING id, status",
        )
        .bind(sub)
        .bind(email)
        .fetch_optional(&self.db)
        .await?;
        if let Some(found) = found {
            return Ok(found);
        }
        let mut tx = self.db.begin().await?;
        let created: Option<(Uuid, String)> = sqlx::query_as(
            "INSERT INTO users (email, name, roles, oidc_subject) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING RETURNING id, status",
        )
        .bind(email)
        .bind(name)
        .bind(vec![role.as_str()])
        .bind(sub)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, status)) = created else {
            // A concurrent first request created it, or the email belongs to another subject.
            tx.rollback().await?;
            let again: Option<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM users WHERE oidc_subject = $1")
                .bind(sub)
                .fetch_optional(&self.db)
                .await?;
            return again.ok_or_else(|| ApiError::conflict("the token's email belongs to another identity"));
        };
        sqlx::query("INSERT INTO team_members (team_id, user_id) VALUES ($1, $2)")
            .bind(DEFAULT_TEAM_ID)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO audit_logs (actor_id, actor, action, target_type, target_id, details)
             VALUES ($1, $2, 'user.create', 'user', $1::text, $3)",
        )
        .bind(id)
        .bind(format!("jwt:{sub}"))
        .bind(serde_json::json!({"email": email, "source": "jwt"}))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((id, status))
    }
}

fn hex_prefix(h: &KeyHash) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies HS256 tokens with the shared secret and RS256 tokens against a JWKS.
struct JwtVerifier {
    config: JwtConfig,
    hs256: Option<DecodingKey>,
    jwks: Option<JwksCache>,
}

struct JwksCache {
    url: String,
    http: reqwest::Client,
    keys: RwLock<(Option<Instant>, HashMap<String, Arc<DecodingKey>>)>,
}

/// Refetch the JWKS on an unknown `kid` at most this often.
const JWKS_REFRESH: Duration = Duration::from_secs(10);

impl JwtVerifier {
    fn new(config: &JwtConfig) -> anyhow::Result<Self> {
        let hs256 = config.secret.as_deref().filter(|s| !s.is_empty()).map(|s| DecodingKey::from_secret(s.as_bytes()));
        let jwks = match config.jwks_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => Some(JwksCache {
                url: url.to_string(),
                http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
                keys: RwLock::new((None, HashMap::new())),
            }),
            None => None,
        };
        Ok(Self { config: config.clone(), hs256, jwks })
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
        match &self.config.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => {}
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
        {
            let guard = self.keys.read().await;
            if let Some(k) = guard.1.get(kid) {
                return Ok(Some(k.clone()));
            }
            if guard.0.is_some_and(|t| t.elapsed() < JWKS_REFRESH) {
                return Ok(None);
            }
        }
        let mut guard = self.keys.write().await;
        if guard.0.is_some_and(|t| t.elapsed() < JWKS_REFRESH) {
            return Ok(guard.1.get(kid).cloned());
        }
        guard.0 = Some(Instant::now());
        let set: JwkSet = match self.http.get(&self.url).send().await {
            Ok(resp) => resp.json().await.map_err(|e| {
                tracing::warn!(error = %e, "JWKS unreadable");
                ApiError::Unavailable("identity provider keys unavailable".into())
            })?,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS unreachable");
                return Err(ApiError::Unavailable("identity provider keys unavailable".into()));
            }
        };
        guard.1 = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|k| (kid, Arc::new(k)))
            })
            .collect();
        Ok(guard.1.get(kid).cloned())
    }
}
