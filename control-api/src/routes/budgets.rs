//! Budgets as their payers and administrators see them: a scope's standing in its current period
//! (`GET /{keys|users|teams|subscriptions}/{id}/budget`, and every scope of the caller at once in
//! `GET /users/me/budgets`), and administrators' adjustments of a period's spend
//! (`POST .../budget/adjustments`: a credit lowers it, a debit raises it), recorded append-only in
//! `budget_adjustments`, audited, applied to Redis at once and counted by every re-seed of the
//! budget (the gateway's seed and reconcile add a period's adjustments to usage_daily's spend).

use chrono::{DateTime, Utc};
use rust_decimal::{prelude::ToPrimitive, Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{types::Json as Jsonb, FromRow};
use tollgate_core::{
    limiter::{Scope, ScopeKind, NANOS_PER_USD},
    limits::{Limits, MAX_BUDGET_USD},
};
use utoipa::{
    openapi::{
        schema::{ObjectBuilder, OneOfBuilder, Schema, Type},
        RefOr,
    },
    IntoParams, PartialSchema, ToSchema,
};
use uuid::Uuid;

use super::prelude::*;
use crate::standing::{self, current_period, usd, Applied, ScopeName, Standing};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users/me/budgets", get(my_budgets))
        .route("/keys/{id}/budget", get(key_standing))
        .route("/keys/{id}/budget/adjustments", get(key_adjustments).post(key_adjust))
        .route("/users/{id}/budget", get(user_standing))
        .route("/users/{id}/budget/adjustments", get(user_adjustments).post(user_adjust))
        .route("/teams/{id}/budget", get(team_standing))
        .route("/teams/{id}/budget/adjustments", get(team_adjustments).post(team_adjust))
        .route("/subscriptions/{id}/budget", get(subscription_standing))
        .route("/subscriptions/{id}/budget/adjustments", get(subscription_adjustments).post(subscription_adjust))
}

/// The three operations on each kind of scope.
#[derive(Clone, Copy)]
enum Action {
    Standing,
    List,
    Adjust,
}

fn op(kind: ScopeKind, action: Action) -> Op {
    use Action::*;
    match (kind, action) {
        (ScopeKind::Key, Standing) => Op::KeysBudget,
        (ScopeKind::Key, List) => Op::KeysBudgetAdjustments,
        (ScopeKind::Key, Adjust) => Op::KeysBudgetAdjust,
        (ScopeKind::User, Standing) => Op::UsersBudget,
        (ScopeKind::User, List) => Op::UsersBudgetAdjustments,
        (ScopeKind::User, Adjust) => Op::UsersBudgetAdjust,
        (ScopeKind::Team, Standing) => Op::TeamsBudget,
        (ScopeKind::Team, List) => Op::TeamsBudgetAdjustments,
        (ScopeKind::Team, Adjust) => Op::TeamsBudgetAdjust,
        (ScopeKind::Subscription, Standing) => Op::SubscriptionsBudget,
        (ScopeKind::Subscription, List) => Op::SubscriptionsBudgetAdjustments,
        (ScopeKind::Subscription, Adjust) => Op::SubscriptionsBudgetAdjust,
    }
}

/// The scope `id` of `kind` with its limits, if `action` is allowed on it (404 or 403 otherwise).
async fn authorized(state: &AppState, caller: &Caller, kind: ScopeKind, id: Uuid, action: Action) -> ApiResult<Scope> {
    let db = &state.db;
    let (limits, target) = match kind {
        ScopeKind::Key => {
            let (user, team, limits): (Uuid, Uuid, Jsonb<Limits>) =
                find_by_id(db, "SELECT user_id, team_id, limits FROM api_keys", id, "key").await?;
            (limits, Target::owned(user, Some(team)))
        }
        ScopeKind::User => {
            let (limits,): (Jsonb<Limits>,) = find_by_id(db, "SELECT limits FROM users", id, "user").await?;
            (limits, Target::user(id))
        }
        ScopeKind::Team => {
            let (limits,): (Jsonb<Limits>,) = find_by_id(db, "SELECT limits FROM teams", id, "team").await?;
            (limits, Target::team(id))
        }
        ScopeKind::Subscription => {
            let (user, limits): (Uuid, Jsonb<Limits>) =
                find_by_id(db, "SELECT user_id, limits FROM subscriptions", id, "subscription").await?;
            (limits, Target::owned(user, None))
        }
    };
    caller.authorize(db, op(kind, action), target).await?;
    Ok(Scope { kind, id, limits: limits.0 })
}

async fn standing_of(state: &AppState, scope: &Scope) -> ApiResult<Standing> {
    let mut all =
        standing::standings(&state.db, &state.limiter_redis, &state.clock, std::slice::from_ref(scope)).await?;
    all.pop().ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no standing")))
}

async fn get_standing(state: AppState, caller: Caller, kind: ScopeKind, id: Uuid) -> ApiResult<Json<Standing>> {
    let scope = authorized(&state, &caller, kind, id, Action::Standing).await?;
    Ok(Json(standing_of(&state, &scope).await?))
}

/// What an adjustment may be: a non-zero amount of USD within ±1,000,000, and a reason.
pub struct AdjustmentAmount;

impl PartialSchema for AdjustmentAmount {
    fn schema() -> RefOr<Schema> {
        let max = MAX_BUDGET_USD as f64;
        let range =
            |min: f64, max: f64| ObjectBuilder::new().schema_type(Type::Number).minimum(Some(min)).maximum(Some(max));
        OneOfBuilder::new()
            .item(range(-max, -0.000001))
            .item(range(0.000001, max))
            .description(Some(
                "USD added to the period's spend (negative: a credit, which gives the scope more to spend); \
                 rounded to the micro-USD (half to even), non-zero, at most 1,000,000 either way.",
            ))
            .into()
    }
}

impl ToSchema for AdjustmentAmount {}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAdjustment {
    #[schema(value_type = AdjustmentAmount)]
    #[serde(deserialize_with = "usd_number")]
    pub amount: Decimal,
    #[schema(value_type = validate::AdjustmentReason)]
    pub reason: String,
}

/// A JSON number (not a string) of USD, read exactly as written.
fn usd_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    use std::str::FromStr;
    let number = serde_json::Number::deserialize(d)?;
    let text = number.to_string();
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| serde::de::Error::custom(format!("must be within ±{MAX_BUDGET_USD}")))
}

/// The longest reason an adjustment keeps.
const MAX_REASON: usize = 500;

#[derive(Debug, FromRow)]
struct AdjustmentRow {
    id: Uuid,
    scope: String,
    scope_id: Uuid,
    period: String,
    amount_nanos: i64,
    reason: String,
    actor: String,
    request_id: Option<String>,
    created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, scope, scope_id, period, amount_nanos, reason, actor, request_id, created_at";

/// One recorded adjustment.
#[derive(Debug, Serialize, ToSchema)]
pub struct Adjustment {
    pub id: Uuid,
    #[schema(value_type = ScopeName)]
    pub scope: String,
    pub scope_id: Uuid,
    /// The budget period it applies to (`m202612`, ..., `all`): the scope's current one when made.
    pub period: String,
    /// USD added to the period's spend (negative: a credit).
    #[schema(value_type = f64)]
    pub amount: Decimal,
    pub reason: String,
    /// Who made it, as the audit trail names them.
    pub actor: String,
    /// The server's id of the request that made it.
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<AdjustmentRow> for Adjustment {
    fn from(r: AdjustmentRow) -> Self {
        Adjustment {
            id: r.id,
            scope: r.scope,
            scope_id: r.scope_id,
            period: r.period,
            amount: usd(r.amount_nanos),
            reason: r.reason,
            actor: r.actor,
            request_id: r.request_id,
            created_at: r.created_at,
        }
    }
}

/// An adjustment made, what Redis made of it, and the scope's standing after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdjustmentMade {
    pub adjustment: Adjustment,
    /// `added`: added to the period's spend in Redis at once; `not_held`: Redis does not hold the
    /// period, whose next seed counts it; `reseed`: the period was dropped from Redis and is seeded
    /// again, with it; `pending`: Redis is unreachable, and the period will be dropped from it (to
    /// be seeded again) once it answers.
    pub redis: RedisOutcome,
    pub standing: Standing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedisOutcome {
    Added,
    NotHeld,
    Reseed,
    Pending,
}

/// A page of adjustments, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdjustmentPage {
    pub data: Vec<Adjustment>,
    pub limit: i64,
    pub offset: i64,
    pub has_more: bool,
    /// How many adjustments match, over every page.
    pub total: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AdjustmentFilter {
    /// Only those applying to this period (`m202612`, `d20261206`, `w20261130`, `all`).
    #[param(pattern = "^[a-z0-9]{1,16}$")]
    pub period: Option<String>,
}

/// The amount in nano-USD after rounding to the micro-USD, or 422 naming `amount`.
fn amount_nanos(amount: Decimal) -> ApiResult<i64> {
    let rounded = amount.round_dp_with_strategy(6, RoundingStrategy::MidpointNearestEven);
    if rounded.abs() > Decimal::from(MAX_BUDGET_USD) {
        return Err(ApiError::invalid("amount", format!("must be within ±{MAX_BUDGET_USD}")));
    }
    if rounded.is_zero() {
        return Err(ApiError::invalid("amount", "must not be zero (rounded to the micro-USD)"));
    }
    (rounded * Decimal::from(NANOS_PER_USD))
        .to_i64()
        .ok_or_else(|| ApiError::invalid("amount", format!("must be within ±{MAX_BUDGET_USD}")))
}

/// How long an adjustment Redis could not be told of keeps trying to drop the period from Redis.
const RESEED_ATTEMPTS: u32 = 600;

async fn adjust(
    state: AppState,
    caller: Caller,
    kind: ScopeKind,
    id: Uuid,
    body: NewAdjustment,
) -> ApiResult<Created<AdjustmentMade>> {
    let scope = authorized(&state, &caller, kind, id, Action::Adjust).await?;
    let nanos = amount_nanos(body.amount)?;
    let reason = validate::text("reason", &body.reason, MAX_REASON)?;
    // Redis's second before the commit: a period seeded from PostgreSQL before it cannot count
    // the adjustment; one seeded since may (see adjust.lua).
    let before = state.limiter_redis.time().await.ok();
    let now = match before {
        Some(secs) => {
            DateTime::from_timestamp(secs + state.clock.offset_secs(), 0).unwrap_or_else(|| state.clock.now())
        }
        None => state.clock.now(),
    };
    let (period, _, _) = current_period(&scope.limits, now);
    let actor = caller.actor();
    let mut tx = Write::begin(&state, &caller).await?;
    let row: AdjustmentRow = sqlx::query_as(&format!(
        "INSERT INTO budget_adjustments (scope, scope_id, period, amount_nanos, reason, actor, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    ))
    .bind(kind.as_str())
    .bind(id)
    .bind(&period)
    .bind(nanos)
    .bind(&reason)
    .bind(&actor.label)
    .bind(&caller.origin.request_id)
    .fetch_one(&mut *tx)
    .await?;
    let adjustment = Adjustment::from(row);
    let details = json!({
        "adjustment_id": adjustment.id,
        "period": period,
        "amount": adjustment.amount,
        "reason": reason,
    });
    // Limits are unchanged: nothing for the gateways to reload.
    tx.commit(Change::new("budget.adjust", kind.as_str(), id, details), []).await?;

    let outcome = match before {
        Some(before) => match state.limiter_redis.adjust(&scope, &period, nanos, before).await {
            Ok(Applied::Added) => RedisOutcome::Added,
            Ok(Applied::NotHeld) => RedisOutcome::NotHeld,
            Ok(Applied::Reseed) => RedisOutcome::Reseed,
            Err(e) => {
                tracing::warn!(error = %e, "budget adjustment committed; Redis not told yet");
                RedisOutcome::Pending
            }
        },
        None => RedisOutcome::Pending,
    };
    if outcome == RedisOutcome::Pending {
        // Whether a seed since the commit counted it is unknown: the period is dropped from Redis
        // once it answers, and the next request seeds it with the adjustment counted once.
        let (redis, scope, period) = (state.limiter_redis.clone(), scope.clone(), period.clone());
        tokio::spawn(async move {
            for _ in 0..RESEED_ATTEMPTS {
                match redis.drop_period(&scope, &period).await {
                    Ok(()) => return,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                }
            }
            tracing::error!(scope = scope.kind.as_str(), id = %scope.id, "budget adjustment never reached Redis; it counts from the next seed");
        });
    }
    let standing = standing_of(&state, &scope).await?;
    Ok(Created(AdjustmentMade { adjustment, redis: outcome, standing }))
}

async fn list_adjustments(
    state: AppState,
    caller: Caller,
    kind: ScopeKind,
    id: Uuid,
    page: PageParams,
    filter: AdjustmentFilter,
) -> ApiResult<Json<AdjustmentPage>> {
    authorized(&state, &caller, kind, id, Action::List).await?;
    let (limit, offset) = page.bounds()?;
    let period = filter.period;
    let well_formed =
        |p: &str| (1..=16).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if period.as_deref().is_some_and(|p| !well_formed(p)) {
        return Err(ApiError::BadRequest {
            field: Some("period".into()),
            message: "period must be a period id such as m202612, d20261206, w20261130 or all".into(),
        });
    }
    let condition = "scope = $1 AND scope_id = $2 AND ($3::text IS NULL OR period = $3)";
    let total: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM budget_adjustments WHERE {condition}"))
        .bind(kind.as_str())
        .bind(id)
        .bind(&period)
        .fetch_one(&state.db)
        .await?;
    let rows: Vec<AdjustmentRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM budget_adjustments WHERE {condition} ORDER BY created_at, id LIMIT $4 OFFSET $5"
    ))
    .bind(kind.as_str())
    .bind(id)
    .bind(&period)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(&state.db)
    .await?;
    let has_more = rows.len() as i64 > limit;
    let data = rows.into_iter().take(limit as usize).map(Adjustment::from).collect();
    Ok(Json(AdjustmentPage { data, limit, offset, has_more, total }))
}

/// Every scope that applies to the caller, with its standing.
#[derive(Debug, Serialize, ToSchema)]
pub struct MyBudgets {
    pub user_id: Uuid,
    /// The caller's user, their live keys (not revoked, not expired), their active subscriptions,
    /// and the teams they administer.
    pub data: Vec<Standing>,
}

/// The standing of every scope that applies to the caller: their user, their live keys, their
/// active subscriptions and the teams they administer. An admin API key is no user: 404.
#[utoipa::path(get, path = "/api/v1/users/me/budgets", tag = "budgets",
    responses((status = 200, body = MyBudgets)))]
async fn my_budgets(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<MyBudgets>> {
    caller.authorize(&state.db, Op::UsersMeBudgets, Target::NONE).await?;
    let me = caller.actor_id().ok_or(ApiError::NotFound("user"))?;
    let rows: Vec<(String, Uuid, Jsonb<Limits>)> = sqlx::query_as(
        "SELECT kind, id, limits FROM (
             SELECT 0 AS rank, 'user' AS kind, id, limits, created_at FROM users WHERE id = $1
             UNION ALL
             SELECT 1, 'key', id, limits, created_at FROM api_keys
             WHERE user_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
             UNION ALL
             SELECT 2, 'subscription', id, limits, created_at FROM subscriptions
             WHERE user_id = $1 AND status = 'active'
             UNION ALL
             SELECT 3, 'team', t.id, t.limits, t.created_at FROM teams t
             JOIN team_members m ON m.team_id = t.id WHERE m.user_id = $1 AND m.role = 'admin'
         ) scopes ORDER BY rank, created_at, id",
    )
    .bind(me)
    .fetch_all(&state.db)
    .await?;
    let scopes: Vec<Scope> = rows
        .into_iter()
        .map(|(kind, id, limits)| {
            let kind = match kind.as_str() {
                "key" => ScopeKind::Key,
                "subscription" => ScopeKind::Subscription,
                "team" => ScopeKind::Team,
                _ => ScopeKind::User,
            };
            Scope { kind, id, limits: limits.0 }
        })
        .collect();
    let data = standing::standings(&state.db, &state.limiter_redis, &state.clock, &scopes).await?;
    Ok(Json(MyBudgets { user_id: me, data }))
}

// One handler per path, for the OpenAPI document; each is the scope's kind and a shared body.

/// The three handlers of one kind of scope: its standing (`GET .../budget`), an adjustment
/// (`POST .../budget/adjustments`) and the list of its adjustments (`GET` on the same path).
macro_rules! scope_handlers {
    (
        $kind:expr;
        $(#[doc = $standing_doc:tt])* $standing:ident: $standing_path:tt;
        $(#[doc = $adjust_doc:tt])* $adjust:ident: $adjustments_path:tt;
        $(#[doc = $list_doc:tt])* $list:ident;
    ) => {
        $(#[doc = $standing_doc])*
        #[utoipa::path(get, path = $standing_path, tag = "budgets", params(("id" = Uuid, Path)),
            responses((status = 200, body = Standing)))]
        async fn $standing(
            State(state): State<AppState>,
            caller: Caller,
            Path(id): Path<Uuid>,
        ) -> ApiResult<Json<Standing>> {
            get_standing(state, caller, $kind, id).await
        }

        $(#[doc = $adjust_doc])*
        #[utoipa::path(post, path = $adjustments_path, tag = "budgets", params(("id" = Uuid, Path)),
            request_body = NewAdjustment, responses((status = 201, body = AdjustmentMade)))]
        async fn $adjust(
            State(state): State<AppState>,
            caller: Caller,
            Path(id): Path<Uuid>,
            Json(body): Json<NewAdjustment>,
        ) -> ApiResult<Created<AdjustmentMade>> {
            adjust(state, caller, $kind, id, body).await
        }

        $(#[doc = $list_doc])*
        #[utoipa::path(get, path = $adjustments_path, tag = "budgets",
            params(("id" = Uuid, Path), PageParams, AdjustmentFilter), responses((status = 200, body = AdjustmentPage)))]
        async fn $list(
            State(state): State<AppState>,
            caller: Caller,
            Path(id): Path<Uuid>,
            Query(page): Query<PageParams>,
            Query(filter): Query<AdjustmentFilter>,
        ) -> ApiResult<Json<AdjustmentPage>> {
            list_adjustments(state, caller, $kind, id, page, filter).await
        }
    };
}

scope_handlers! {
    ScopeKind::Key;
    /// A key's budget standing in its current period, and its RPM/TPM windows.
    key_standing: "/api/v1/keys/{id}/budget";
    /// Adjust a key's spend in its current budget period (administrators only).
    key_adjust: "/api/v1/keys/{id}/budget/adjustments";
    /// A key's budget adjustments, oldest first.
    key_adjustments;
}

scope_handlers! {
    ScopeKind::User;
    /// A user's budget standing in its current period, and its RPM/TPM windows.
    user_standing: "/api/v1/users/{id}/budget";
    /// Adjust a user's spend in its current budget period (administrators only).
    user_adjust: "/api/v1/users/{id}/budget/adjustments";
    /// A user's budget adjustments, oldest first.
    user_adjustments;
}

scope_handlers! {
    ScopeKind::Team;
    /// A team's budget standing in its current period, and its RPM/TPM windows (administrators and
    /// the team's admins).
    team_standing: "/api/v1/teams/{id}/budget";
    /// Adjust a team's spend in its current budget period (administrators only).
    team_adjust: "/api/v1/teams/{id}/budget/adjustments";
    /// A team's budget adjustments, oldest first.
    team_adjustments;
}

scope_handlers! {
    ScopeKind::Subscription;
    /// A subscription's budget standing in its current period, and its RPM/TPM windows.
    subscription_standing: "/api/v1/subscriptions/{id}/budget";
    /// Adjust a subscription's spend in its current budget period (administrators only).
    subscription_adjust: "/api/v1/subscriptions/{id}/budget/adjustments";
    /// A subscription's budget adjustments, oldest first.
    subscription_adjustments;
}
