//! Users: administrators manage them; a user sees only themself. `roles` are the roles granted in
//! Tollgate, merged with a JWT's own at each request (see [`crate::auth`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{types::Json as Jsonb, FromRow};
use tollgate_core::{limits::Limits, roles::Role, DEFAULT_TEAM_ID};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::prelude::*;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", get(list).post(create))
        .route("/users/me", get(me))
        .route("/users/{id}", get(fetch).patch(update))
}

#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    #[schema(value_type = Vec<Role>)]
    pub roles: Vec<String>,
    #[schema(value_type = UserStatus)]
    pub status: String,
    #[schema(value_type = Limits)]
    pub limits: Jsonb<Limits>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns [`User`] is read from.
const COLUMNS: &str = "id, email, name, roles, status, limits, created_at, updated_at";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Suspended,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    #[schema(value_type = validate::Email)]
    pub email: String,
    #[schema(value_type = validate::Name)]
    pub name: String,
    /// Defaults to `["user"]`.
    #[schema(min_items = 1)]
    pub roles: Option<Vec<Role>>,
    /// Absent: the configured `defaults.user_limits`.
    pub limits: Option<Limits>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[schema(value_type = Option<validate::Name>)]
    pub name: Option<String>,
    /// Replaces the roles granted in Tollgate.
    #[schema(min_items = 1)]
    pub roles: Option<Vec<Role>>,
    pub status: Option<UserStatus>,
    /// Replaces the user's limits.
    pub limits: Option<Limits>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserFilter {
    /// Exact email (case-insensitive).
    pub email: Option<String>,
    pub status: Option<UserStatus>,
    pub role: Option<Role>,
}

fn roles_vec(roles: Option<Vec<Role>>) -> ApiResult<Vec<&'static str>> {
    let mut roles: Vec<&'static str> =
        roles.unwrap_or_else(|| vec![Role::User]).into_iter().map(Role::as_str).collect();
    roles.sort_unstable();
    roles.dedup();
    if roles.is_empty() {
        return Err(ApiError::invalid("roles", "at least one role"));
    }
    Ok(roles)
}

async fn load(state: &AppState, id: Uuid) -> ApiResult<User> {
    find_by_id(&state.db, &format!("SELECT {COLUMNS} FROM users"), id, "user").await
}

/// 422 naming `user_id` unless the user exists and is active.
pub(crate) async fn require_active(conn: &mut sqlx::PgConnection, user_id: Uuid) -> ApiResult<()> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM users WHERE id = $1").bind(user_id).fetch_optional(conn).await?;
    match status.as_deref() {
        None => Err(ApiError::invalid("user_id", "no such user")),
        Some("active") => Ok(()),
        Some(_) => Err(ApiError::invalid("user_id", "user is suspended")),
    }
}

/// List users (a user sees only themself).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", params(PageParams, UserFilter),
    responses((status = 200, body = Page<User>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<UserFilter>,
) -> ApiResult<Page<User>> {
    caller.authorize(&state.db, Op::UsersList, Target::NONE).await?;
    let bounds = page.bounds()?;
    ListQuery::new(format!("SELECT {COLUMNS} FROM users"))
        .filter("id = $", caller.own_scope())
        .filter("lower(email) = lower($)", filter.email)
        .filter("status = $", filter.status.map(status_str))
        .filter("$ = ANY(roles)", filter.role.map(Role::as_str))
        .page(&state.db, "created_at, id", bounds)
        .await
}

fn status_str(s: UserStatus) -> &'static str {
    match s {
        UserStatus::Active => "active",
        UserStatus::Suspended => "suspended",
    }
}

/// Create a user; the user joins the Default Team.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = CreateUser,
    responses((status = 201, body = User)))]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateUser>,
) -> ApiResult<Created<User>> {
    caller.authorize(&state.db, Op::UsersCreate, Target::NONE).await?;
    let email = validate::email("email", &body.email)?;
    let name = validate::text("name", &body.name, 200)?;
    let roles = roles_vec(body.roles)?;
    // No `limits`: the configured defaults (an explicit object, even `{}`, wins).
    let limits = match body.limits {
        Some(limits) => validate_limits("limits", Some(limits))?,
        None => state.defaults.user_limits.clone(),
    };
    let mut tx = Write::begin(&state, &caller).await?;
    let user: User = sqlx::query_as(&format!(
        "INSERT INTO users (email, name, roles, limits) VALUES ($1, $2, $3, $4) RETURNING {COLUMNS}"
    ))
    .bind(&email)
    .bind(&name)
    .bind(&roles)
    .bind(Jsonb(&limits))
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO team_members (team_id, user_id) VALUES ($1, $2)")
        .bind(DEFAULT_TEAM_ID)
        .bind(user.id)
        .execute(&mut *tx)
        .await?;
    let change = Change::new("user.create", "user", user.id, json!({"email": email, "roles": roles}));
    tx.commit(change, []).await?;
    Ok(Created(user))
}

/// The calling user (JWT callers only).
#[utoipa::path(get, path = "/api/v1/users/me", tag = "users", responses((status = 200, body = User)))]
async fn me(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<User>> {
    caller.authorize(&state.db, Op::UsersMe, Target::NONE).await?;
    let id = caller.actor_id().ok_or(ApiError::NotFound("user"))?;
    Ok(Json(load(&state, id).await?))
}

#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", params(("id" = Uuid, Path)),
    responses((status = 200, body = User)))]
async fn fetch(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<User>> {
    caller.authorize(&state.db, Op::UsersGet, Target::user(id)).await?;
    Ok(Json(load(&state, id).await?))
}

/// Update a user's name, roles, status or limits (administrators only). Taking a role granted in
/// Tollgate away is a PATCH of `roles`; a role from the identity provider is taken away there;
/// `status: suspended` refuses the user at once, whatever their token says.
#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users", params(("id" = Uuid, Path)),
    request_body = UpdateUser, responses((status = 200, body = User)))]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Json(body): Json<UpdateUser>,
) -> ApiResult<Json<User>> {
    caller.authorize(&state.db, Op::UsersUpdate, Target::user(id)).await?;
    let before = load(&state, id).await?;
    let name = body.name.as_deref().map(|n| validate::text("name", n, 200)).transpose()?;
    let roles = body.roles.map(|r| roles_vec(Some(r))).transpose()?;
    let limits = body.limits.map(|l| validate_limits("limits", Some(l))).transpose()?;
    let mut tx = Write::begin(&state, &caller).await?;
    let user: User = sqlx::query_as(&format!(
        "UPDATE users SET name = COALESCE($2, name), roles = COALESCE($3, roles),
                status = COALESCE($4, status), limits = COALESCE($5, limits), updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .bind(roles)
    .bind(body.status.map(status_str))
    .bind(limits.map(Jsonb))
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("user"))?;
    let change = Change::new("user.update", "user", id, json!({"changes": diff(&before, &user)}));
    tx.commit(change, [Invalidation::new(InvalidationKind::User, id)]).await?;
    Ok(Json(user))
}
