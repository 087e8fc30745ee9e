//! Just-in-time provisioning: the user behind a verified JWT. Found by subject, or by email (and
//! then linked to the subject); otherwise created on first sight, joined to the Default Team and
//! audited like any other write.

use sqlx::PgPool;
use tollgate_core::DEFAULT_TEAM_ID;
use uuid::Uuid;

use super::{jwt::Identity, Principal};
use crate::{
    audit::{self, Actor, Change, Origin},
    error::{ApiError, ApiResult},
};

/// The principal for `identity`, provisioning its user if need be; 403 for a suspended user.
pub async fn principal(db: &PgPool, identity: Identity, origin: &Origin) -> ApiResult<Principal> {
    let (id, status) = resolve_user(db, &identity, origin).await?;
    if status != "active" {
        return Err(ApiError::forbidden("user is suspended"));
    }
    Ok(Principal::User { id, email: identity.email, role: identity.role })
}

/// `(user id, status)` of the identity's user.
async fn resolve_user(db: &PgPool, identity: &Identity, origin: &Origin) -> ApiResult<(Uuid, String)> {
    let Identity { subject, email, name, role } = identity;
    // Known by subject, or by email (then linked to the subject).
    let found: Option<(Uuid, String)> = sqlx::query_as(
        "UPDATE users SET oidc_subject = $1, updated_at = now()
         WHERE id = (SELECT id FROM users WHERE oidc_subject = $1
                     UNION ALL
                     SELECT id FROM users WHERE lower(email) = lower($2) AND oidc_subject IS NULL
                     LIMIT 1)
         RETURNING id, status",
    )
    .bind(subject)
    .bind(email)
    .fetch_optional(db)
    .await?;
    if let Some(found) = found {
        return Ok(found);
    }
    let mut tx = db.begin().await?;
    let created: Option<(Uuid, String)> = sqlx::query_as(
        "INSERT INTO users (email, name, roles, oidc_subject) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING RETURNING id, status",
    )
    .bind(email)
    .bind(name)
    .bind(vec![role.as_str()])
    .bind(subject)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, status)) = created else {
        // A concurrent first request created it, or the email belongs to another subject.
        tx.rollback().await?;
        let again: Option<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM users WHERE oidc_subject = $1")
            .bind(subject)
            .fetch_optional(db)
            .await?;
        return again.ok_or_else(|| ApiError::conflict("the token's email belongs to another identity"));
    };
    sqlx::query("INSERT INTO team_members (team_id, user_id) VALUES ($1, $2)")
        .bind(DEFAULT_TEAM_ID)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    // The new user creates themself: the token's subject is the actor.
    let actor = Actor { id: Some(id), label: format!("jwt:{subject}"), origin };
    let change = Change::new("user.create", "user", id, serde_json::json!({"email": email, "source": "jwt"}));
    audit::record(&mut tx, &actor, change).await?;
    tx.commit().await?;
    Ok((id, status))
}
