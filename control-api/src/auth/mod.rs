//! Who is calling: an admin API key from configuration, or a JWT ([`jwt`]: HS256 shared secret,
//! or RS256 verified against an OIDC issuer's JWKS) whose user [`provision`] finds or creates.
//! [`Caller`] also carries the request's [`Origin`] for the audit trail; what a caller may do is
//! [`crate::authz`]'s table.
//!
//! A JWT caller's role is the strongest of the roles its token maps to and the roles an
//! administrator stored on the user in Tollgate, so Tollgate can grant a role without the
//! identity provider. A role is taken away where it was given (the identity provider's groups,
//! or `PATCH /users/{id}` `roles`); suspending the user takes everything away at once.

mod jwt;
mod provision;

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};
use sqlx::PgPool;
use tollgate_core::{
    keys::{hash_key, hashes_equal, KeyHash},
    net::Cidr,
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
    AdminKey {
        label: String,
    },
    /// A JWT's user; `role` is already merged with the roles stored in Tollgate.
    User {
        id: Uuid,
        email: String,
        role: Role,
    },
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

    /// `Some(own id)` when a list must hold only the caller's own rows (the `user` role).
    pub fn own_scope(&self) -> Option<Uuid> {
        match &self.principal {
            Principal::User { id, role: Role::User, .. } => Some(*id),
            _ => None,
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
        let origin = Origin::of(parts, &state.auth.trusted_proxies);
        let principal = state.auth.authenticate(token, &origin).await?;
        Ok(Caller { principal, origin })
    }
}

pub struct Authenticator {
    admin_key_hashes: Vec<KeyHash>,
    /// Proxies whose `X-Forwarded-For` names the client, for the audit trail.
    pub trusted_proxies: Vec<Cidr>,
    jwt: JwtVerifier,
    db: PgPool,
    /// The limits of a user provisioned on first sight (`defaults.user_limits`).
    default_user_limits: tollgate_core::limits::Limits,
}

impl Authenticator {
    pub fn new(config: &ControlApiConfig, db: PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            admin_key_hashes: config.admin_api_keys.iter().map(|k| hash_key(k)).collect(),
            trusted_proxies: config.trusted_proxy_ranges()?,
            jwt: JwtVerifier::new(&config.jwt)?,
            db,
            default_user_limits: config.defaults.user_limits.clone(),
        })
    }

    /// The principal behind `token`; a JWT's user is provisioned on first sight, audited as
    /// coming from `origin`.
    pub async fn authenticate(&self, token: &str, origin: &Origin) -> ApiResult<Principal> {
        if token.bytes().filter(|b| *b == b'.').count() == 2 {
            let identity = self.jwt.identity(token).await?;
            return provision::principal(&self.db, identity, origin, &self.default_user_limits).await;
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
