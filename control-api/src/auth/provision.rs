//! Just-in-time provisioning: the user behind a verified JWT. Found by subject; else linked by
//! email to an existing user that has no subject yet, but only when the issuer verified the email
//! (`email_verified: true`; never by `preferred_username`); else created on first sight and
//! joined to the Default Team. Linking and creating are audited like any other write.
//!
//! The caller's role is the strongest of the token's roles and the roles stored on the user. A
//! user created here starts with no stored roles: until an administrator grants one in Tollgate,
//! the identity provider alone decides, so removing a group there takes its role away.

use sqlx::PgPool;
use tollgate_core::{limits::Limits, roles::Role, DEFAULT_TEAM_ID};
use uuid::Uuid;

use super::{
    jwt::{strongest, Identity},
    Principal,
};
use crate::{
    audit::{self, Actor, Change, Origin},
    error::{ApiError, ApiResult},
};

#[derive(sqlx::FromRow)]
struct Found {
    id: Uuid,
    email: String,
    status: String,
    roles: Vec<String>,
}

/// The principal for `identity`, provisioning its user if need be; 403 for a suspended user or
/// one with no role from either the token or Tollgate.
pub async fn principal(db: &PgPool, identity: Identity, origin: &Origin, limits: &Limits) -> ApiResult<Principal> {
    let user = resolve_user(db, &identity, origin, limits).await?;
    if user.status != "active" {
        return Err(ApiError::forbidden("user is suspended"));
    }
    let stored = user.roles.iter().filter_map(|r| Role::parse(r));
    let role = strongest(identity.roles.iter().copied().chain(stored)).ok_or_else(no_role)?;
    Ok(Principal::User { id: user.id, email: user.email, role })
}

fn no_role() -> ApiError {
    ApiError::forbidden("token carries no Tollgate role (roles claim or mapped group) and none was granted in Tollgate")
}

/// A user created here gets `limits` (the configured `defaults.user_limits`).
async fn resolve_user(db: &PgPool, identity: &Identity, origin: &Origin, limits: &Limits) -> ApiResult<Found> {
    let Identity { subject, email, email_verified, name, roles } = identity;
    let found: Option<Found> = sqlx::query_as("SELECT id, email, status, roles FROM users WHERE oidc_subject = $1")
        .bind(subject)
        .fetch_optional(db)
        .await?;
    if let Some(found) = found {
        return Ok(found);
    }
    // The new subject acts on its own behalf in the trail.
    let actor = |id: Uuid| Actor { id: Some(id), label: format!("jwt:{subject}"), origin };
    let mut tx = db.begin().await?;
    if let (Some(email), true) = (email, email_verified) {
        let linked: Option<Found> = sqlx::query_as(
            "UPDATE users SET oidc_subject = $1, updated_at = now()
             WHERE lower(email) = lower($2) AND oidc_subject IS NULL
             RETURNING id, email, status, roles",
        )
        .bind(subject)
        .bind(email)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(linked) = linked {
            let details = serde_json::json!({"subject": subject, "email": email, "email_verified": true});
            audit::record(&mut tx, &actor(linked.id), Change::new("user.link", "user", linked.id, details)).await?;
            tx.commit().await?;
            return Ok(linked);
        }
    }
    // Nobody to link: a new user, but only for a token that grants a role.
    if roles.is_empty() {
        return Err(no_role());
    }
    let email = email.as_deref().unwrap_or(subject);
    let created: Option<Found> = sqlx::query_as(
        "INSERT INTO users (email, name, roles, oidc_subject, limits) VALUES ($1, $2, '{}', $3, $4)
         ON CONFLICT DO NOTHING RETURNING id, email, status, roles",
    )
    .bind(email)
    .bind(name)
    .bind(subject)
    .bind(sqlx::types::Json(limits))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(created) = created else {
        // A concurrent first request created it, or the email belongs to another user (whom an
        // unverified email must not reach).
        tx.rollback().await?;
        let again: Option<Found> = sqlx::query_as("SELECT id, email, status, roles FROM users WHERE oidc_subject = $1")
            .bind(subject)
            .fetch_optional(db)
            .await?;
        return again.ok_or_else(|| ApiError::conflict("the token's email belongs to another user"));
    };
    sqlx::query("INSERT INTO team_members (team_id, user_id) VALUES ($1, $2)")
        .bind(DEFAULT_TEAM_ID)
        .bind(created.id)
        .execute(&mut *tx)
        .await?;
    let details = serde_json::json!({"email": email, "source": "jwt"});
    audit::record(&mut tx, &actor(created.id), Change::new("user.create", "user", created.id, details)).await?;
    tx.commit().await?;
    Ok(created)
}
