//! API keys. The plaintext key is returned exactly once, by create and rotate; only its SHA-256
//! and a display prefix are stored. A key's models must be a subset of its owner's active
//! subscriptions (and of its team's allowed models); users manage only their own keys, and team
//! admins their team's (never receiving another user's secret). Limits an administrator set on a
//! key are a ceiling for everyone else: see [`crate::authz::limits_within`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{types::Json as Jsonb, FromRow, PgConnection};
use tollgate_core::{
    keys::{display_prefix, generate_key, hash_key},
    limits::Limits,
    DEFAULT_TEAM_ID,
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{prelude::*, users};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/keys", get(list).post(create))
        .route("/keys/{id}", get(fetch).patch(update))
        .route("/keys/{id}/rotate", post(rotate))
        .route("/keys/{id}/revoke", post(revoke))
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    /// First 12 and last 4 characters of the key, for recognising it.
    pub key_prefix: String,
    pub name: String,
    pub user_id: Uuid,
    pub team_id: Uuid,
    /// Models the key may call; empty means every model of the owner's active subscriptions.
    pub models: Vec<String>,
    /// What the gateway enforces.
    #[schema(value_type = Limits)]
    pub limits: Jsonb<Limits>,
    /// The limits an administrator set: others may tighten `limits` within them, never loosen.
    #[schema(value_type = Limits)]
    pub admin_limits: Jsonb<Limits>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns [`ApiKey`] is read from.
const COLUMNS: &str = "id, key_prefix, name, user_id, team_id, models, limits, admin_limits, expires_at,
    revoked_at, last_used_at, metadata, created_at, updated_at";

/// A key with its plaintext, shown only in the response that creates or rotates it.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedKey {
    /// The key itself. Store it now: it cannot be shown again.
    pub key: String,
    #[serde(flatten)]
    pub api_key: ApiKey,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// An active user; defaults to the calling user (required for an admin API key, which is no
    /// user).
    pub user_id: Option<Uuid>,
    #[schema(value_type = validate::Name)]
    pub name: String,
    /// A team the user belongs to; defaults to the Default Team.
    pub team_id: Option<Uuid>,
    /// Models the key may call: each must exist, be actively subscribed by the user and be allowed
    /// by the team. Empty or absent means every model of the user's active subscriptions.
    #[schema(value_type = Option<Vec<validate::ModelId>>)]
    pub models: Option<Vec<String>>,
    /// Absent: the configured `defaults.key_limits` (which become the key's `admin_limits` too).
    pub limits: Option<Limits>,
    /// Must be in the future.
    pub expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<validate::Metadata>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    #[schema(value_type = Option<validate::Name>)]
    pub name: Option<String>,
    /// Replaces the list (each must exist, be actively subscribed by the owner and be allowed by the
    /// team); empty means every model of the owner's active subscriptions.
    #[schema(value_type = Option<Vec<validate::ModelId>>)]
    pub models: Option<Vec<String>>,
    /// Replaces the key's limits (anyone but an administrator: within `admin_limits` and the
    /// user's and team's limits).
    pub limits: Option<Limits>,
    /// Must be in the future; anyone but an administrator may only bring the expiry closer.
    pub expires_at: Option<DateTime<Utc>>,
    /// Replaces the metadata.
    #[schema(value_type = Option<validate::Metadata>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyFilter {
    pub user_id: Option<Uuid>,
    pub team_id: Option<Uuid>,
    /// Keys that name this model.
    pub model_id: Option<String>,
    /// true: only revoked keys; false: only unrevoked ones.
    pub revoked: Option<bool>,
}

/// The key, if `op` is allowed on it (404 or 403 otherwise), and the relation that allows it.
async fn authorized(state: &AppState, caller: &Caller, op: Op, id: Uuid) -> ApiResult<(ApiKey, Relation)> {
    let key: ApiKey = find_by_id(&state.db, &format!("SELECT {COLUMNS} FROM api_keys"), id, "key").await?;
    let relation = caller.authorize(&state.db, op, Target::owned(key.user_id, Some(key.team_id))).await?;
    Ok((key, relation))
}

/// 422 unless `limits` are within what administrators set: on the key itself (`admin_limits`, when
/// it exists), on its user and on its team.
async fn check_limits(
    conn: &mut PgConnection,
    limits: &Limits,
    admin_limits: Option<&Limits>,
    user_id: Uuid,
    team_id: Uuid,
) -> ApiResult<()> {
    let (user, team): (Jsonb<Limits>, Jsonb<Limits>) =
        sqlx::query_as("SELECT (SELECT limits FROM users WHERE id = $1), (SELECT limits FROM teams WHERE id = $2)")
            .bind(user_id)
            .bind(team_id)
            .fetch_one(&mut *conn)
            .await?;
    let mut ceilings = vec![("user", &user.0, Ceiling::Enclosing), ("team", &team.0, Ceiling::Enclosing)];
    if let Some(set) = admin_limits {
        ceilings.insert(0, ("key", set, Ceiling::Set));
    }
    limits_within("limits", limits, &ceilings)
}

fn normalize_models(models: Vec<String>) -> ApiResult<Vec<String>> {
    let mut out = Vec::with_capacity(models.len());
    for (i, m) in models.iter().enumerate() {
        out.push(validate::identifier(&format!("models[{i}]"), m, 256)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn check_expiry(expires_at: Option<DateTime<Utc>>) -> ApiResult<()> {
    match expires_at {
        Some(t) if t <= Utc::now() => Err(ApiError::invalid("expires_at", "must be in the future")),
        _ => Ok(()),
    }
}

/// 422 unless every one of `models` exists, is within the user's active subscriptions and is
/// among the team's allowed models. Holds the user's active subscriptions FOR SHARE so a
/// concurrent cancel waits.
async fn check_entitlement(conn: &mut PgConnection, user_id: Uuid, team_id: Uuid, models: &[String]) -> ApiResult<()> {
    let known: Vec<String> =
        sqlx::query_scalar("SELECT id FROM models WHERE id = ANY($1)").bind(models).fetch_all(&mut *conn).await?;
    let unknown: Vec<&str> = models.iter().filter(|m| !known.contains(m)).map(String::as_str).collect();
    if !unknown.is_empty() {
        return Err(ApiError::invalid("models", format!("no such model: {}", unknown.join(", "))));
    }
    let active: Vec<String> =
        sqlx::query_scalar("SELECT model_id FROM subscriptions WHERE user_id = $1 AND status = 'active' FOR SHARE")
            .bind(user_id)
            .fetch_all(&mut *conn)
            .await?;
    let missing: Vec<&str> = models.iter().filter(|m| !active.contains(m)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(ApiError::invalid("models", format!("no active subscription for: {}", missing.join(", "))));
    }
    let allowed: Vec<String> = sqlx::query_scalar("SELECT allowed_models FROM teams WHERE id = $1")
        .bind(team_id)
        .fetch_one(&mut *conn)
        .await?;
    let outside: Vec<&str> =
        models.iter().filter(|m| !allowed.is_empty() && !allowed.contains(m)).map(String::as_str).collect();
    if !outside.is_empty() {
        return Err(ApiError::invalid("models", format!("not allowed for the team: {}", outside.join(", "))));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/keys", tag = "keys", params(PageParams, KeyFilter),
    responses((status = 200, body = Page<ApiKey>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<KeyFilter>,
) -> ApiResult<Page<ApiKey>> {
    caller.authorize(&state.db, Op::KeysList, Target::NONE).await?;
    let bounds = page.bounds()?;
    // A user sees their own keys and those of the teams they administer.
    const OWN_OR_TEAM_ADMIN: &str = "EXISTS (SELECT 1 FROM (SELECT $::uuid AS me) c WHERE c.me = api_keys.user_id
        OR c.me IN (SELECT m.user_id FROM team_members m WHERE m.team_id = api_keys.team_id AND m.role = 'admin'))";
    ListQuery::new(format!("SELECT {COLUMNS} FROM api_keys"))
        .filter(OWN_OR_TEAM_ADMIN, caller.own_scope())
        .filter("user_id = $", filter.user_id)
        .filter("team_id = $", filter.team_id)
        .filter("$ = ANY(models)", filter.model_id)
        .filter("(revoked_at IS NOT NULL) = $", filter.revoked)
        .page(&state.db, "created_at, id", bounds)
        .await
}

/// Create a key. The response carries the key itself, once.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = IssuedKey)))]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateKey>,
) -> ApiResult<Created<IssuedKey>> {
    let user_id = body.user_id.or(caller.actor_id()).ok_or_else(|| ApiError::invalid("user_id", "required"))?;
    let team_id = body.team_id.unwrap_or(DEFAULT_TEAM_ID);
    let relation = caller.authorize(&state.db, Op::KeysCreate, Target::owned(user_id, Some(team_id))).await?;
    let name = validate::text("name", &body.name, 200)?;
    let models = normalize_models(body.models.unwrap_or_default())?;
    // No `limits`: the configured defaults, which are the operator's (an administrator's) and so
    // the key's ceiling too; an explicit object, even `{}`, wins.
    let defaulted = body.limits.is_none();
    let limits = match body.limits {
        Some(limits) => validate_limits("limits", Some(limits))?,
        None => state.defaults.key_limits.clone(),
    };
    check_expiry(body.expires_at)?;
    let metadata = body.metadata.unwrap_or_else(|| json!({}));
    validate::metadata("metadata", &metadata)?;
    let admin = relation == Relation::Admin;

    let mut tx = Write::begin(&state, &caller).await?;
    users::require_active(&mut tx, user_id).await?;
    let member: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM team_members WHERE team_id = $1 AND user_id = $2)")
            .bind(team_id)
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?;
    if !member {
        return Err(ApiError::invalid("team_id", "the user is not a member of this team"));
    }
    check_entitlement(&mut tx, user_id, team_id, &models).await?;
    if !admin && !defaulted {
        check_limits(&mut tx, &limits, None, user_id, team_id).await?;
    }
    // An administrator's limits (and the configured defaults) are the key's ceiling; anyone
    // else's are only what is enforced.
    let admin_limits = if admin || defaulted { limits.clone() } else { Limits::default() };
    let key = generate_key();
    let api_key: ApiKey = sqlx::query_as(&format!(
        "INSERT INTO api_keys (key_hash, key_prefix, name, user_id, team_id, models, limits, admin_limits,
                               expires_at, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
    ))
    .bind(&hash_key(&key)[..])
    .bind(display_prefix(&key))
    .bind(&name)
    .bind(user_id)
    .bind(team_id)
    .bind(&models)
    .bind(Jsonb(&limits))
    .bind(Jsonb(&admin_limits))
    .bind(body.expires_at)
    .bind(&metadata)
    .fetch_one(&mut *tx)
    .await?;
    let details = json!({"user_id": user_id, "team_id": team_id, "models": models, "key_prefix": api_key.key_prefix,
                         "limits": limits, "expires_at": body.expires_at});
    let change = Change::new("key.create", "key", api_key.id, details);
    tx.commit(change, []).await?;
    Ok(Created(IssuedKey { key, api_key }))
}

#[utoipa::path(get, path = "/api/v1/keys/{id}", tag = "keys", params(("id" = Uuid, Path)),
    responses((status = 200, body = ApiKey)))]
async fn fetch(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<ApiKey>> {
    Ok(Json(authorized(&state, &caller, Op::KeysGet, id).await?.0))
}

/// Update a key's name, models, limits, expiry or metadata. Refused (409) for a revoked key. An
/// administrator's limits become the key's ceiling; anyone else only tightens within it (422).
#[utoipa::path(patch, path = "/api/v1/keys/{id}", tag = "keys", params(("id" = Uuid, Path)),
    request_body = UpdateKey, responses((status = 200, body = ApiKey)))]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Json(body): Json<UpdateKey>,
) -> ApiResult<Json<ApiKey>> {
    let (current, relation) = authorized(&state, &caller, Op::KeysUpdate, id).await?;
    if current.revoked_at.is_some() {
        return Err(ApiError::conflict("the key is revoked"));
    }
    let admin = relation == Relation::Admin;
    if let (false, Some(new)) = (admin, body.expires_at) {
        if current.expires_at.is_some_and(|old| new > old) {
            return Err(ApiError::invalid("expires_at", "only an administrator may extend a key's expiry"));
        }
    }
    let name = body.name.as_deref().map(|n| validate::text("name", n, 200)).transpose()?;
    let models = body.models.map(normalize_models).transpose()?;
    let limits = body.limits.map(|l| validate_limits("limits", Some(l))).transpose()?;
    check_expiry(body.expires_at)?;
    if let Some(m) = &body.metadata {
        validate::metadata("metadata", m)?;
    }
    let mut tx = Write::begin(&state, &caller).await?;
    if let Some(models) = &models {
        check_entitlement(&mut tx, current.user_id, current.team_id, models).await?;
    }
    if let (false, Some(limits)) = (admin, &limits) {
        check_limits(&mut tx, limits, Some(&current.admin_limits), current.user_id, current.team_id).await?;
    }
    let key: ApiKey = sqlx::query_as(&format!(
        "UPDATE api_keys SET name = COALESCE($2, name), models = COALESCE($3, models),
                limits = COALESCE($4, limits), expires_at = COALESCE($5, expires_at),
                metadata = COALESCE($6, metadata),
                admin_limits = CASE WHEN $7 THEN COALESCE($4, admin_limits) ELSE admin_limits END,
                updated_at = now()
         WHERE id = $1 AND revoked_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .bind(models)
    .bind(limits.map(Jsonb))
    .bind(body.expires_at)
    .bind(body.metadata)
    .bind(admin)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::conflict("the key is revoked"))?;
    let change = Change::new("key.update", "key", id, json!({"changes": diff(&current, &key)}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Key, id)]).await?;
    Ok(Json(key))
}

/// Replace a key's secret: the old key stops working at once, the new one is returned once.
/// Users may rotate only keys whose models are all still actively subscribed.
#[utoipa::path(post, path = "/api/v1/keys/{id}/rotate", tag = "keys", params(("id" = Uuid, Path)),
    responses((status = 200, body = IssuedKey)))]
async fn rotate(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<IssuedKey>> {
    let (current, relation) = authorized(&state, &caller, Op::KeysRotate, id).await?;
    if current.revoked_at.is_some() {
        return Err(ApiError::conflict("a revoked key cannot be rotated"));
    }
    let mut tx = Write::begin(&state, &caller).await?;
    if relation != Relation::Admin {
        check_entitlement(&mut tx, current.user_id, current.team_id, &current.models).await?;
    }
    let key = generate_key();
    let api_key: ApiKey = sqlx::query_as(&format!(
        "UPDATE api_keys SET key_hash = $2, key_prefix = $3, updated_at = now()
         WHERE id = $1 AND revoked_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&hash_key(&key)[..])
    .bind(display_prefix(&key))
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::conflict("a revoked key cannot be rotated"))?;
    let details = json!({"old_prefix": current.key_prefix, "key_prefix": api_key.key_prefix});
    let change = Change::new("key.rotate", "key", id, details);
    tx.commit(change, [Invalidation::new(InvalidationKind::Key, id)]).await?;
    Ok(Json(IssuedKey { key, api_key }))
}

/// Revoke a key at once, everywhere. Revoking a revoked key changes nothing and succeeds.
#[utoipa::path(post, path = "/api/v1/keys/{id}/revoke", tag = "keys", params(("id" = Uuid, Path)),
    responses((status = 200, body = ApiKey)))]
async fn revoke(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<ApiKey>> {
    let (current, _) = authorized(&state, &caller, Op::KeysRevoke, id).await?;
    if current.revoked_at.is_some() {
        return Ok(Json(current));
    }
    let mut tx = Write::begin(&state, &caller).await?;
    let key: ApiKey = sqlx::query_as(&format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()), updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let change = Change::new("key.revoke", "key", id, json!({"key_prefix": key.key_prefix}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Key, id)]).await?;
    Ok(Json(key))
}
