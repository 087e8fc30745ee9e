//! Who is calling: an admin API key from configuration, or a JWT ([`jwt`]: HS256 shared secret,
//! or RS256 verified against an OIDC issuer's JWKS) whose user [`provision`] finds or creates.
//! [`Caller`] also carries the request's [`Origin`] for the audit trail, and the role checks every
//! handler applies.

mod jwt;
mod provision;

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{header, request::Parts},
};
use sqlx::PgPool;
use tollgate_core::{
    keys::{hash_key, hashes_equal, KeyHash},
    roles::Role,
};
use uuid::Uuid;

use self::jwt::JwtVerifier;
use crate::{
    audit::{Actor, Origin},
    config::ControlApiConfig,
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
    pub origin: Origin,
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

    /// The caller as the audit trail names it.
    pub fn actor(&self) -> Actor<'_> {
        let label = match &self.principal {
            Principal::AdminKey { label } => label.clone(),
            Principal::User { email, .. } => format!("user:{email}"),
        };
        Actor { id: self.actor_id(), label, origin: &self.origin }
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

    /// The user a resource is created for: `asked` if the caller may see that user (404 if not),
    /// else the caller themself; 422 naming `user_id` when an admin key names nobody.
    pub fn user_or_self(&self, asked: Option<Uuid>) -> ApiResult<Uuid> {
        let user_id = asked.or(self.actor_id()).ok_or_else(|| ApiError::invalid("user_id", "required"))?;
        self.ensure_sees(user_id, "user")?;
        Ok(user_id)
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
        let origin = origin(parts);
        let principal = state.auth.authenticate(token, &origin).await?;
        Ok(Caller { principal, origin })
    }
}

fn origin(parts: &Parts) -> Origin {
    let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let forwarded = parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned());
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    Origin { request_id, ip: forwarded.or(peer) }
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

    /// The principal behind `token`; a JWT's user is provisioned on first sight, audited as
    /// coming from `origin`.
    pub async fn authenticate(&self, token: &str, origin: &Origin) -> ApiResult<Principal> {
        if token.bytes().filter(|b| *b == b'.').count() == 2 {
            let identity = self.jwt.identity(token).await?;
            return provision::principal(&self.db, identity, origin).await;
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
}

fn hex_prefix(h: &KeyHash) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}
