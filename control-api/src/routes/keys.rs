//! API keys. The plaintext key is returned exactly once, by create and rotate; only its SHA-256
//! and a display prefix are stored. A key's models must be a subset of its owner's active
//! subscriptions (and of its team's allowed models); users manage only their own keys.

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
    #[schema(value_type = Limits)]
    pub limits: Jsonb<Limits>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns [`ApiKey`] is read from.
const COLUMNS: &str = "id, key_prefix, name, user_id, team_id, models, limits, expires_at,
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
    /// Defaults to the calling user.
    pub user_id: Option<Uuid>,
    pub name: String,
    /// A team the user belongs to; defaults to the Default Team.
    pub team_id: Option<Uuid>,
    pub models: Option<Vec<String>>,
    pub limits: Option<Limits>,
    pub expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    pub name: Option<String>,
    /// Replaces the list; empty means every model of the owner's active subscriptions.
    pub models: Option<Vec<String>>,
    /// Replaces the key's limits.
    pub limits: Option<Limits>,
    pub expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
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

async fn visible(state: &AppState, caller: &Caller, id: Uuid) -> ApiResult<ApiKey> {
    let key: ApiKey = find_by_id(&state.db, &format!("SELECT {COLUMNS} FROM api_keys"), id, "key").await?;
    caller.ensure_sees(key.user_id, "key")?;
    Ok(key)
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

/// 422 unless `models` is within the user's active subscriptions and the team's allowed
/// models. Holds the user's active subscriptions FOR SHARE so a concurrent cancel waits.
async fn check_entitlement(conn: &mut PgConnection, user_id: Uuid, team_id: Uuid, models: &[String]) -> ApiResult<()> {
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
    let bounds = page.bounds()?;
    ListQuery::new(format!("SELECT {COLUMNS} FROM api_keys"))
        .filter("user_id = $", caller.own_scope())
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
    caller.require_writer()?;
    let user_id = caller.user_or_self(body.user_id)?;
    let name = validate::text("name", &body.name, 200)?;
    let models = normalize_models(body.models.unwrap_or_default())?;
    let limits = validate_limits("limits", body.limits)?;
    check_expiry(body.expires_at)?;
    let metadata = body.metadata.unwrap_or_else(|| json!({}));
    validate::metadata("metadata", &metadata)?;
    let team_id = body.team_id.unwrap_or(DEFAULT_TEAM_ID);

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
    let key = generate_key();
    let api_key: ApiKey = sqlx::query_as(&format!(
        "INSERT INTO api_keys (key_hash, key_prefix, name, user_id, team_id, models, limits, expires_at, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
    ))
    .bind(&hash_key(&key)[..])
    .bind(display_prefix(&key))
    .bind(&name)
    .bind(user_id)
    .bind(team_id)
    .bind(&models)
    .bind(Jsonb(&limits))
    .bind(body.expires_at)
    .bind(&metadata)
    .fetch_one(&mut *tx)
    .await?;
    let details = json!({"user_id": user_id, "team_id": team_id, "models": models, "key_prefix": api_key.key_prefix});
    let change = Change::new("key.create", "key", api_key.id, details);
    tx.commit(change, []).await?;
    Ok(Created(IssuedKey { key, api_key }))
}

#[utoipa::path(get, path = "/api/v1/keys/{id}", tag = "keys", params(("id" = Uuid, Path)),
    responses((status = 200, body = ApiKey)))]
async fn fetch(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<ApiKey>> {
    Ok(Json(visible(&state, &caller, id).await?))
}

/// Update a key's name, models, limits, expiry or metadata. Refused (409) for a revoked key.
#[utoipa::path(patch, path = "/api/v1/keys/{id}", tag = "keys", params(("id" = Uuid, Path)),
    request_body = UpdateKey, responses((status = 200, body = ApiKey)))]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Json(body): Json<UpdateKey>,
) -> ApiResult<Json<ApiKey>> {
    let current = visible(&state, &caller, id).await?;
    caller.require_writer()?;
    if current.revoked_at.is_some() {
        return Err(ApiError::conflict("the key is revoked"));
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
    let key: ApiKey = sqlx::query_as(&format!(
        "UPDATE api_keys SET name = COALESCE($2, name), models = COALESCE($3, models),
                limits = COALESCE($4, limits), expires_at = COALESCE($5, expires_at),
                metadata = COALESCE($6, metadata), updated_at = now()
         WHERE id = $1 AND revoked_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .bind(models)
    .bind(limits.map(Jsonb))
    .bind(body.expires_at)
    .bind(body.metadata)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::conflict("the key is revoked"))?;
    let change = Change::new("key.update", "key", id, json!({"models": key.models}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Key, id)]).await?;
    Ok(Json(key))
}

/// Replace a key's secret: the old key stops working at once, the new one is returned once.
/// Users may rotate only keys whose models are all still actively subscribed.
#[utoipa::path(post, path = "/api/v1/keys/{id}/rotate", tag = "keys", params(("id" = Uuid, Path)),
    responses((status = 200, body = IssuedKey)))]
async fn rotate(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<IssuedKey>> {
    let current = visible(&state, &caller, id).await?;
    caller.require_writer()?;
    if current.revoked_at.is_some() {
        return Err(ApiError::conflict("a revoked key cannot be rotated"));
    }
    let mut tx = Write::begin(&state, &caller).await?;
    if caller.own_scope().is_some() {
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
    let current = visible(&state, &caller, id).await?;
    caller.require_writer()?;
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
