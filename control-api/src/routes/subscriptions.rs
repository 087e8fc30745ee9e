//! Subscriptions: a user's entitlement to a model. Active on creation, or pending for a
//! restricted model until an administrator approves. Administrators suspend and reactivate;
//! the owner or an administrator cancels, which is refused while an unrevoked key names the model.
//! Out of `suspended` only an administrator moves a subscription (the owner cannot cancel it and
//! subscribe afresh), and the limits an administrator set are a ceiling for the owner.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{types::Json as Jsonb, FromRow};
use tollgate_core::{
    limits::Limits,
    roles::SubscriptionStatus::{self, Active, Cancelled, Pending, Suspended},
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{prelude::*, users};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/subscriptions", get(list).post(create))
        .route("/subscriptions/{id}", get(fetch).patch(update))
        .route("/subscriptions/{id}/approve", post(approve))
        .route("/subscriptions/{id}/suspend", post(suspend))
        .route("/subscriptions/{id}/reactivate", post(reactivate))
        .route("/subscriptions/{id}/cancel", post(cancel))
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct Subscription {
    pub id: Uuid,
    pub user_id: Uuid,
    pub model_id: String,
    #[schema(value_type = SubscriptionStatus)]
    pub status: String,
    /// What the gateway enforces.
    #[schema(value_type = Limits)]
    pub limits: Jsonb<Limits>,
    /// The limits an administrator set: the owner may tighten `limits` within them, never loosen.
    #[schema(value_type = Limits)]
    pub admin_limits: Jsonb<Limits>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns [`Subscription`] is read from.
const COLUMNS: &str = "id, user_id, model_id, status, limits, admin_limits, created_at, updated_at";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// Defaults to the calling user.
    pub user_id: Option<Uuid>,
    /// A model that exists, is enabled and is available.
    #[schema(value_type = validate::ModelId)]
    pub model_id: String,
    pub limits: Option<Limits>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSubscription {
    /// Replaces the subscription's limits (an owner: within `admin_limits`).
    pub limits: Limits,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscriptionFilter {
    pub user_id: Option<Uuid>,
    pub model_id: Option<String>,
    pub status: Option<SubscriptionStatus>,
}

/// The subscription, if `op` is allowed on it (404 or 403 otherwise).
async fn authorized(state: &AppState, caller: &Caller, op: Op, id: Uuid) -> ApiResult<(Subscription, Relation)> {
    let sub: Subscription =
        find_by_id(&state.db, &format!("SELECT {COLUMNS} FROM subscriptions"), id, "subscription").await?;
    let relation = caller.authorize(&state.db, op, Target::owned(sub.user_id, None)).await?;
    Ok((sub, relation))
}

/// The limits `user_id`'s user carries (an administrator's, always).
async fn user_limits(conn: &mut sqlx::PgConnection, user_id: Uuid) -> ApiResult<Limits> {
    let limits: Option<Jsonb<Limits>> =
        sqlx::query_scalar("SELECT limits FROM users WHERE id = $1").bind(user_id).fetch_optional(conn).await?;
    Ok(limits.map(|l| l.0).unwrap_or_default())
}

#[utoipa::path(get, path = "/api/v1/subscriptions", tag = "subscriptions", params(PageParams, SubscriptionFilter),
    responses((status = 200, body = Page<Subscription>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<SubscriptionFilter>,
) -> ApiResult<Page<Subscription>> {
    caller.authorize(&state.db, Op::SubscriptionsList, Target::NONE).await?;
    let bounds = page.bounds()?;
    ListQuery::new(format!("SELECT {COLUMNS} FROM subscriptions"))
        .filter("user_id = $", caller.own_scope())
        .filter("user_id = $", filter.user_id)
        .filter("model_id = $", filter.model_id)
        .filter("status = $", filter.status.map(SubscriptionStatus::as_str))
        .page(&state.db, "created_at, id", bounds)
        .await
}

/// Subscribe a user to a model. Users subscribe themselves, with limits within their user's; the
/// subscription is pending when the model is restricted and a user asked, active otherwise.
/// Refused (409) while a live subscription, suspended ones included, exists for the model.
#[utoipa::path(post, path = "/api/v1/subscriptions", tag = "subscriptions", request_body = CreateSubscription,
    responses((status = 201, body = Subscription)))]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateSubscription>,
) -> ApiResult<Created<Subscription>> {
    let user_id = body.user_id.or(caller.actor_id()).ok_or_else(|| ApiError::invalid("user_id", "required"))?;
    let relation = caller.authorize(&state.db, Op::SubscriptionsCreate, Target::user(user_id)).await?;
    let model_id = validate::identifier("model_id", &body.model_id, 256)?;
    let limits = validate_limits("limits", body.limits)?;
    let mut tx = Write::begin(&state, &caller).await?;
    users::require_active(&mut tx, user_id).await?;
    let admin = relation == Relation::Admin;
    if !admin {
        limits_within("limits", &limits, &[("user", &user_limits(&mut tx, user_id).await?, Ceiling::Enclosing)])?;
    }
    let live: Option<String> = sqlx::query_scalar(
        "SELECT status FROM subscriptions WHERE user_id = $1 AND model_id = $2 AND status <> 'cancelled'",
    )
    .bind(user_id)
    .bind(&model_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(status) = live {
        return Err(ApiError::conflict(format!("the user already has a {status} subscription to this model")));
    }
    let model: Option<(bool, bool, bool)> =
        sqlx::query_as("SELECT enabled, available, restricted FROM models WHERE id = $1")
            .bind(&model_id)
            .fetch_optional(&mut *tx)
            .await?;
    let status = match model {
        None => return Err(ApiError::invalid("model_id", format!("no such model: {model_id}"))),
        Some((false, _, _)) => return Err(ApiError::invalid("model_id", "model is disabled")),
        Some((_, false, _)) => return Err(ApiError::invalid("model_id", "model is unavailable upstream")),
        Some((_, _, true)) if !admin => Pending,
        Some(_) => Active,
    };
    // An administrator's limits are the ceiling; a user's own are only what is enforced.
    let admin_limits = if admin { limits.clone() } else { Limits::default() };
    let sub: Subscription = sqlx::query_as(&format!(
        "INSERT INTO subscriptions (user_id, model_id, status, limits, admin_limits) VALUES ($1, $2, $3, $4, $5)
         RETURNING {COLUMNS}"
    ))
    .bind(user_id)
    .bind(&model_id)
    .bind(status.as_str())
    .bind(Jsonb(&limits))
    .bind(Jsonb(&admin_limits))
    .fetch_one(&mut *tx)
    .await?;
    let details = json!({"user_id": user_id, "model_id": model_id, "status": sub.status, "limits": limits});
    let change = Change::new("subscription.create", "subscription", sub.id, details);
    // The user's set of models changed: gateways reload what they hold for the user.
    tx.commit(change, [Invalidation::new(InvalidationKind::User, user_id)]).await?;
    Ok(Created(sub))
}

#[utoipa::path(get, path = "/api/v1/subscriptions/{id}", tag = "subscriptions", params(("id" = Uuid, Path)),
    responses((status = 200, body = Subscription)))]
async fn fetch(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<Subscription>> {
    Ok(Json(authorized(&state, &caller, Op::SubscriptionsGet, id).await?.0))
}

/// Replace a subscription's limits. An administrator sets the ceiling (`admin_limits`) with them;
/// the owner may only tighten within it and within their user's limits (422 naming the limit).
#[utoipa::path(patch, path = "/api/v1/subscriptions/{id}", tag = "subscriptions", params(("id" = Uuid, Path)),
    request_body = UpdateSubscription, responses((status = 200, body = Subscription)))]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Json(body): Json<UpdateSubscription>,
) -> ApiResult<Json<Subscription>> {
    let (before, relation) = authorized(&state, &caller, Op::SubscriptionsUpdate, id).await?;
    let limits = validate_limits("limits", Some(body.limits))?;
    let mut tx = Write::begin(&state, &caller).await?;
    let admin = relation == Relation::Admin;
    if !admin {
        let user = user_limits(&mut tx, before.user_id).await?;
        limits_within(
            "limits",
            &limits,
            &[("subscription", &before.admin_limits, Ceiling::Set), ("user", &user, Ceiling::Enclosing)],
        )?;
    }
    let sub: Subscription = sqlx::query_as(&format!(
        "UPDATE subscriptions SET limits = $2, admin_limits = CASE WHEN $3 THEN $2 ELSE admin_limits END,
                updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(Jsonb(&limits))
    .bind(admin)
    .fetch_one(&mut *tx)
    .await?;
    let change = Change::new("subscription.update", "subscription", id, json!({"changes": diff(&before, &sub)}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Subscription, id)]).await?;
    Ok(Json(sub))
}

/// A move between statuses: from which statuses, and the operation whose row in
/// [`crate::authz::RULES`] says who may make it (and from which statuses only an admin may).
struct Transition {
    action: &'static str,
    from: &'static [SubscriptionStatus],
    to: SubscriptionStatus,
    op: Op,
}

const APPROVE: Transition =
    Transition { action: "approve", from: &[Pending], to: Active, op: Op::SubscriptionsApprove };
const SUSPEND: Transition =
    Transition { action: "suspend", from: &[Pending, Active], to: Suspended, op: Op::SubscriptionsSuspend };
const REACTIVATE: Transition =
    Transition { action: "reactivate", from: &[Suspended], to: Active, op: Op::SubscriptionsReactivate };
const CANCEL: Transition =
    Transition { action: "cancel", from: &[Pending, Active, Suspended], to: Cancelled, op: Op::SubscriptionsCancel };

/// Makes `transition` if the caller may; 409 from a status it does not start from.
async fn transition(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    transition: Transition,
) -> ApiResult<Json<Subscription>> {
    let Transition { action, from, to, op } = transition;
    let mut tx = Write::begin(state, caller).await?;
    // Locked first, so that the status the decision reads is the one the update changes. Also
    // serialises with key creation, which holds the user's active subscriptions FOR SHARE.
    let current: Subscription =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM subscriptions WHERE id = $1 FOR UPDATE"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(ApiError::NotFound("subscription"))?;
    caller.authorize(&state.db, op, Target::owned(current.user_id, None).in_state(&current.status)).await?;
    if to == Cancelled {
        let dependent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM api_keys WHERE user_id = $1 AND $2 = ANY(models) AND revoked_at IS NULL
               AND (expires_at IS NULL OR expires_at > now())",
        )
        .bind(current.user_id)
        .bind(&current.model_id)
        .fetch_one(&mut *tx)
        .await?;
        if dependent > 0 {
            return Err(ApiError::conflict(format!(
                "{dependent} unrevoked keys depend on this subscription; revoke them first"
            )));
        }
    }
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let sub: Subscription = sqlx::query_as(&format!(
        "UPDATE subscriptions SET status = $2, updated_at = now()
         WHERE id = $1 AND status = ANY($3) RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(to.as_str())
    .bind(&from)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::conflict(format!("cannot {action} a {} subscription", current.status)))?;
    let details = json!({"from": current.status, "to": sub.status});
    let change = Change::new(format!("subscription.{action}"), "subscription", id, details);
    tx.commit(change, [Invalidation::new(InvalidationKind::Subscription, id)]).await?;
    Ok(Json(sub))
}

/// Approve a pending subscription (administrators only).
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/approve", tag = "subscriptions", params(("id" = Uuid, Path)),
    responses((status = 200, body = Subscription)))]
async fn approve(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<Subscription>> {
    transition(&state, &caller, id, APPROVE).await
}

/// Suspend a pending or active subscription (administrators only).
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/suspend", tag = "subscriptions", params(("id" = Uuid, Path)),
    responses((status = 200, body = Subscription)))]
async fn suspend(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<Subscription>> {
    transition(&state, &caller, id, SUSPEND).await
}

/// Reactivate a suspended subscription (administrators only).
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/reactivate", tag = "subscriptions", params(("id" = Uuid, Path)),
    responses((status = 200, body = Subscription)))]
async fn reactivate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Subscription>> {
    transition(&state, &caller, id, REACTIVATE).await
}

/// Cancel a subscription (owner or administrator; a suspended one: administrators only, 403).
/// Refused (409) while an unrevoked key of the user names the model; keys without a model list
/// follow the user's subscriptions and do not block.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/cancel", tag = "subscriptions", params(("id" = Uuid, Path)),
    responses((status = 200, body = Subscription)))]
async fn cancel(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<Subscription>> {
    transition(&state, &caller, id, CANCEL).await
}
