//! Teams and their members. Administrators manage them; a user sees the teams they belong to.
//! A team admin (`team_members.role = admin`) may change the team's description, tighten its
//! limits within those an administrator set, see every member, and add or remove plain members;
//! a plain member sees only their own membership row.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{types::Json as Jsonb, FromRow};
use tollgate_core::{limits::Limits, DEFAULT_TEAM_ID};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{models::check_models_exist, prelude::*};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/teams", get(list).post(create))
        .route("/teams/{id}", get(fetch).patch(update).delete(remove))
        .route("/teams/{id}/members", get(list_members).post(add_member))
        .route("/teams/{id}/members/{user_id}", delete(remove_member))
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct Team {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// Models the team's keys may use; empty means all.
    pub allowed_models: Vec<String>,
    /// What the gateway enforces.
    #[schema(value_type = Limits)]
    pub limits: Jsonb<Limits>,
    /// The limits an administrator set: a team admin may tighten `limits` within them.
    #[schema(value_type = Limits)]
    pub admin_limits: Jsonb<Limits>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns [`Team`] is read from.
const COLUMNS: &str = "id, name, description, allowed_models, limits, admin_limits, created_at, updated_at";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTeam {
    #[schema(value_type = validate::Name)]
    pub name: String,
    #[schema(value_type = Option<validate::Description>)]
    pub description: Option<String>,
    /// Models the team's keys may use (each must exist); empty or absent means all.
    #[schema(value_type = Option<Vec<validate::ModelId>>)]
    pub allowed_models: Option<Vec<String>>,
    pub limits: Option<Limits>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTeam {
    #[schema(value_type = Option<validate::Name>)]
    pub name: Option<String>,
    #[schema(value_type = Option<validate::Description>)]
    pub description: Option<String>,
    /// Replaces the list (each must exist); empty means all models.
    #[schema(value_type = Option<Vec<validate::ModelId>>)]
    pub allowed_models: Option<Vec<String>>,
    /// Replaces the team's limits (a team admin: within `admin_limits`).
    pub limits: Option<Limits>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TeamFilter {
    /// Exact name (case-insensitive).
    pub name: Option<String>,
    /// Teams this user belongs to.
    pub member_id: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    #[default]
    Member,
    Admin,
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct TeamMember {
    pub team_id: Uuid,
    pub user_id: Uuid,
    #[schema(value_type = MemberRole)]
    pub role: String,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub user_id: Uuid,
    pub role: Option<MemberRole>,
}

/// The team `t` has the user `$` as a member.
const HAS_MEMBER: &str = "EXISTS (SELECT 1 FROM team_members m WHERE m.team_id = t.id AND m.user_id = $)";

async fn validate_models(db: &sqlx::PgPool, models: Option<Vec<String>>) -> ApiResult<Option<Vec<String>>> {
    let Some(models) = models else { return Ok(None) };
    let mut ids = Vec::with_capacity(models.len());
    for (i, m) in models.iter().enumerate() {
        ids.push(validate::identifier(&format!("allowed_models[{i}]"), m, 256)?);
    }
    ids.sort();
    ids.dedup();
    check_models_exist(db, "allowed_models", &ids).await?;
    Ok(Some(ids))
}

/// The team, if `op` is allowed on it (a user who is no member gets 404), and the relation that
/// allows it.
async fn authorized(state: &AppState, caller: &Caller, op: Op, id: Uuid) -> ApiResult<(Team, Relation)> {
    let team: Team = find_by_id(&state.db, &format!("SELECT {COLUMNS} FROM teams"), id, "team").await?;
    let relation = caller.authorize(&state.db, op, Target::team(id)).await?;
    Ok((team, relation))
}

#[utoipa::path(get, path = "/api/v1/teams", tag = "teams", params(PageParams, TeamFilter),
    responses((status = 200, body = Page<Team>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<TeamFilter>,
) -> ApiResult<Page<Team>> {
    caller.authorize(&state.db, Op::TeamsList, Target::NONE).await?;
    let bounds = page.bounds()?;
    ListQuery::new(format!("SELECT {COLUMNS} FROM teams t"))
        .filter(HAS_MEMBER, caller.own_scope())
        .filter(HAS_MEMBER, filter.member_id)
        .filter("lower(name) = lower($)", filter.name)
        .page(&state.db, "created_at, id", bounds)
        .await
}

#[utoipa::path(post, path = "/api/v1/teams", tag = "teams", request_body = CreateTeam,
    responses((status = 201, body = Team)))]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateTeam>,
) -> ApiResult<Created<Team>> {
    caller.authorize(&state.db, Op::TeamsCreate, Target::NONE).await?;
    let name = validate::text("name", &body.name, 200)?;
    let description = validate::optional_text("description", body.description.as_deref().unwrap_or(""), 2000)?;
    let limits = validate_limits("limits", body.limits)?;
    let models = validate_models(&state.db, body.allowed_models).await?.unwrap_or_default();
    let mut tx = Write::begin(&state, &caller).await?;
    let team: Team = sqlx::query_as(&format!(
        "INSERT INTO teams (name, description, allowed_models, limits, admin_limits) VALUES ($1, $2, $3, $4, $4)
         RETURNING {COLUMNS}"
    ))
    .bind(&name)
    .bind(&description)
    .bind(&models)
    .bind(Jsonb(&limits))
    .fetch_one(&mut *tx)
    .await?;
    let change = Change::new("team.create", "team", team.id, json!({"name": name}));
    tx.commit(change, []).await?;
    Ok(Created(team))
}

#[utoipa::path(get, path = "/api/v1/teams/{id}", tag = "teams", params(("id" = Uuid, Path)),
    responses((status = 200, body = Team)))]
async fn fetch(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<Json<Team>> {
    Ok(Json(authorized(&state, &caller, Op::TeamsGet, id).await?.0))
}

#[utoipa::path(patch, path = "/api/v1/teams/{id}", tag = "teams", params(("id" = Uuid, Path)),
    request_body = UpdateTeam, responses((status = 200, body = Team)))]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Json(body): Json<UpdateTeam>,
) -> ApiResult<Json<Team>> {
    let (before, relation) = authorized(&state, &caller, Op::TeamsUpdate, id).await?;
    let admin = relation == Relation::Admin;
    if !admin {
        if body.name.is_some() || body.allowed_models.is_some() {
            return Err(ApiError::forbidden("only administrators change a team's name or allowed models"));
        }
        if let Some(limits) = &body.limits {
            limits_within("limits", limits, &[("team", &before.admin_limits, Ceiling::Set)])?;
        }
    }
    let name = body.name.as_deref().map(|n| validate::text("name", n, 200)).transpose()?;
    let description =
        body.description.as_deref().map(|d| validate::optional_text("description", d, 2000)).transpose()?;
    let limits = body.limits.map(|l| validate_limits("limits", Some(l))).transpose()?;
    let models = validate_models(&state.db, body.allowed_models).await?;
    let mut tx = Write::begin(&state, &caller).await?;
    let team: Team = sqlx::query_as(&format!(
        "UPDATE teams SET name = COALESCE($2, name), description = COALESCE($3, description),
                allowed_models = COALESCE($4, allowed_models), limits = COALESCE($5, limits),
                admin_limits = CASE WHEN $6 THEN COALESCE($5, admin_limits) ELSE admin_limits END,
                updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .bind(description)
    .bind(models)
    .bind(limits.map(Jsonb))
    .bind(admin)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("team"))?;
    let change = Change::new("team.update", "team", id, json!({"changes": diff(&before, &team)}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Team, id)]).await?;
    Ok(Json(team))
}

/// Delete a team. Refused (409) for the Default Team and while keys belong to the team.
#[utoipa::path(delete, path = "/api/v1/teams/{id}", tag = "teams", params(("id" = Uuid, Path)),
    responses((status = 204)))]
async fn remove(State(state): State<AppState>, caller: Caller, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    authorized(&state, &caller, Op::TeamsDelete, id).await?;
    if id == DEFAULT_TEAM_ID {
        return Err(ApiError::conflict("the Default Team cannot be deleted"));
    }
    let mut tx = Write::begin(&state, &caller).await?;
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE team_id = $1").bind(id).fetch_one(&mut *tx).await?;
    if keys > 0 {
        return Err(ApiError::conflict(format!("{keys} keys belong to this team; move or delete them first")));
    }
    let deleted = sqlx::query("DELETE FROM teams WHERE id = $1").bind(id).execute(&mut *tx).await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound("team"));
    }
    let change = Change::new("team.delete", "team", id, json!({}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Team, id)]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A team's members: all of them for administrators and the team's admins; a plain member sees
/// only their own row (a member list is a directory of email addresses).
#[utoipa::path(get, path = "/api/v1/teams/{id}/members", tag = "teams", params(("id" = Uuid, Path), PageParams),
    responses((status = 200, body = Page<TeamMember>)))]
async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(page): Query<PageParams>,
) -> ApiResult<Page<TeamMember>> {
    let bounds = page.bounds()?;
    let (_, relation) = authorized(&state, &caller, Op::MembersList, id).await?;
    let only = match relation {
        Relation::Owner => caller.actor_id(),
        _ => None,
    };
    ListQuery::new(
        "SELECT m.team_id, m.user_id, m.role, u.email, u.name, m.created_at
         FROM team_members m JOIN users u ON u.id = m.user_id",
    )
    .filter("m.team_id = $", Some(id))
    .filter("m.user_id = $", only)
    .page(&state.db, "m.created_at, m.user_id", bounds)
    .await
}

/// Add a member (a team admin: plain members only).
#[utoipa::path(post, path = "/api/v1/teams/{id}/members", tag = "teams", params(("id" = Uuid, Path)),
    request_body = AddMember, responses((status = 201, body = TeamMember)))]
async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Json(body): Json<AddMember>,
) -> ApiResult<Created<TeamMember>> {
    let (_, relation) = authorized(&state, &caller, Op::MembersAdd, id).await?;
    let role = body.role.unwrap_or_default();
    if relation != Relation::Admin && matches!(role, MemberRole::Admin) {
        return Err(ApiError::forbidden("only administrators make team admins"));
    }
    let mut tx = Write::begin(&state, &caller).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)")
        .bind(body.user_id)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        return Err(ApiError::invalid("user_id", "no such user"));
    }
    let role = match role {
        MemberRole::Member => "member",
        MemberRole::Admin => "admin",
    };
    let member: TeamMember = sqlx::query_as(
        "WITH m AS (INSERT INTO team_members (team_id, user_id, role) VALUES ($1, $2, $3)
                    RETURNING team_id, user_id, role, created_at)
         SELECT m.team_id, m.user_id, m.role, u.email, u.name, m.created_at
         FROM m JOIN users u ON u.id = m.user_id",
    )
    .bind(id)
    .bind(body.user_id)
    .bind(role)
    .fetch_one(&mut *tx)
    .await?;
    let change = Change::new("team.member.add", "team", id, json!({"user_id": body.user_id, "role": role}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Team, id)]).await?;
    Ok(Created(member))
}

/// Remove a member (a team admin: plain members and themself). Refused (409) while the user holds
/// unrevoked keys on this team.
#[utoipa::path(delete, path = "/api/v1/teams/{id}/members/{user_id}", tag = "teams",
    params(("id" = Uuid, Path), ("user_id" = Uuid, Path)), responses((status = 204)))]
async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, user_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let (_, relation) = authorized(&state, &caller, Op::MembersRemove, id).await?;
    let mut tx = Write::begin(&state, &caller).await?;
    if relation != Relation::Admin && caller.actor_id() != Some(user_id) {
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM team_members WHERE team_id = $1 AND user_id = $2 FOR UPDATE")
                .bind(id)
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
        if role.as_deref() == Some("admin") {
            return Err(ApiError::forbidden("only administrators remove a team admin"));
        }
    }
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE team_id = $1 AND user_id = $2 AND revoked_at IS NULL")
            .bind(id)
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?;
    if keys > 0 {
        return Err(ApiError::conflict(format!("the user holds {keys} unrevoked keys on this team")));
    }
    let deleted = sqlx::query("DELETE FROM team_members WHERE team_id = $1 AND user_id = $2")
        .bind(id)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound("team member"));
    }
    let change = Change::new("team.member.remove", "team", id, json!({"user_id": user_id}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Team, id)]).await?;
    Ok(StatusCode::NO_CONTENT)
}
