//! The model catalogue: what clients may call and what it costs. Administrators manage it by hand
//! or sync it from LiteLLM's `/model/info`; everyone authenticated may read it.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

use super::prelude::*;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/models", get(list).post(create))
        .route("/models/sync", get(super::sync_runs::sync_status).post(sync))
        .route("/models/{id}", get(fetch).patch(update).delete(remove))
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct Model {
    /// The name clients send.
    pub id: String,
    pub upstream_model: String,
    pub provider: Option<String>,
    pub context_length: Option<i32>,
    #[schema(value_type = f64)]
    pub input_cost_per_token: Decimal,
    #[schema(value_type = f64)]
    pub output_cost_per_token: Decimal,
    pub enabled: bool,
    /// Subscriptions to a restricted model start pending until an administrator approves them.
    pub restricted: bool,
    /// False once a sync no longer finds the model upstream.
    pub available: bool,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub synced_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns [`Model`] is read from.
const COLUMNS: &str = "id, upstream_model, provider, context_length, input_cost_per_token,
    output_cost_per_token, enabled, restricted, available, metadata, synced_at, created_at, updated_at";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    /// The name clients send.
    #[schema(value_type = validate::ModelId)]
    pub id: String,
    /// Defaults to `id`.
    #[schema(value_type = Option<validate::UpstreamModel>)]
    pub upstream_model: Option<String>,
    #[schema(value_type = Option<validate::Provider>)]
    pub provider: Option<String>,
    #[schema(minimum = 1)]
    pub context_length: Option<i32>,
    /// USD.
    #[schema(value_type = f64, minimum = 0, maximum = 1000)]
    pub input_cost_per_token: Decimal,
    /// USD.
    #[schema(value_type = f64, minimum = 0, maximum = 1000)]
    pub output_cost_per_token: Decimal,
    /// Default true.
    pub enabled: Option<bool>,
    /// Default false.
    pub restricted: Option<bool>,
    #[schema(value_type = Option<validate::Metadata>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateModel {
    #[schema(value_type = Option<validate::UpstreamModel>)]
    pub upstream_model: Option<String>,
    #[schema(value_type = Option<validate::Provider>)]
    pub provider: Option<String>,
    #[schema(minimum = 1)]
    pub context_length: Option<i32>,
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000)]
    pub input_cost_per_token: Option<Decimal>,
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000)]
    pub output_cost_per_token: Option<Decimal>,
    pub enabled: Option<bool>,
    pub restricted: Option<bool>,
    /// Replaces the metadata.
    #[schema(value_type = Option<validate::Metadata>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelFilter {
    pub enabled: Option<bool>,
    pub available: Option<bool>,
    pub provider: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SyncReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    /// Previously synced models no longer offered upstream, now marked unavailable.
    pub unavailable: Vec<String>,
}

/// Per-token prices above a thousand dollars are a typo, not a price.
const MAX_COST_PER_TOKEN: i64 = 1000;

fn check_cost(field: &str, cost: Decimal) -> ApiResult<Decimal> {
    if cost.is_sign_negative() {
        return Err(ApiError::invalid(field, "must be >= 0"));
    }
    if cost > Decimal::from(MAX_COST_PER_TOKEN) {
        return Err(ApiError::invalid(field, format!("must be <= {MAX_COST_PER_TOKEN}")));
    }
    Ok(cost)
}

fn check_context(len: Option<i32>) -> ApiResult<Option<i32>> {
    match len {
        Some(n) if n < 1 => Err(ApiError::invalid("context_length", "must be >= 1")),
        other => Ok(other),
    }
}

/// 422 naming `field` unless every id is a known model.
pub async fn check_models_exist(db: &sqlx::PgPool, field: &str, ids: &[String]) -> ApiResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let missing: Vec<String> =
        sqlx::query_scalar("SELECT m FROM unnest($1::text[]) m WHERE NOT EXISTS (SELECT 1 FROM models WHERE id = m)")
            .bind(ids)
            .fetch_all(db)
            .await?;
    if !missing.is_empty() {
        return Err(ApiError::invalid(field, format!("no such model: {}", missing.join(", "))));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/models", tag = "models", params(PageParams, ModelFilter),
    responses((status = 200, body = Page<Model>)))]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(page): Query<PageParams>,
    Query(filter): Query<ModelFilter>,
) -> ApiResult<Page<Model>> {
    caller.authorize(&state.db, Op::ModelsList, Target::NONE).await?;
    let bounds = page.bounds()?;
    ListQuery::new(format!("SELECT {COLUMNS} FROM models"))
        .filter("enabled = $", filter.enabled)
        .filter("available = $", filter.available)
        .filter("provider = $", filter.provider)
        .page(&state.db, "id", bounds)
        .await
}

#[utoipa::path(post, path = "/api/v1/models", tag = "models", request_body = CreateModel,
    responses((status = 201, body = Model)))]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateModel>,
) -> ApiResult<Created<Model>> {
    caller.authorize(&state.db, Op::ModelsCreate, Target::NONE).await?;
    let id = validate::identifier("id", &body.id, 256)?;
    let upstream = validate::identifier("upstream_model", body.upstream_model.as_deref().unwrap_or(&id), 512)?;
    let provider = body.provider.as_deref().map(|p| validate::identifier("provider", p, 100)).transpose()?;
    let input = check_cost("input_cost_per_token", body.input_cost_per_token)?;
    let output = check_cost("output_cost_per_token", body.output_cost_per_token)?;
    let context = check_context(body.context_length)?;
    let metadata = body.metadata.unwrap_or_else(|| json!({}));
    validate::metadata("metadata", &metadata)?;
    let mut tx = Write::begin(&state, &caller).await?;
    let model: Model = sqlx::query_as(&format!(
        "INSERT INTO models (id, upstream_model, provider, context_length, input_cost_per_token,
                             output_cost_per_token, enabled, restricted, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(&upstream)
    .bind(provider)
    .bind(context)
    .bind(input)
    .bind(output)
    .bind(body.enabled.unwrap_or(true))
    .bind(body.restricted.unwrap_or(false))
    .bind(&metadata)
    .fetch_one(&mut *tx)
    .await?;
    let change = Change::new("model.create", "model", &id, json!({"upstream_model": upstream}));
    // A gateway may hold a negative entry for this name.
    tx.commit(change, [Invalidation::new(InvalidationKind::Model, &id)]).await?;
    Ok(Created(model))
}

/// Model ids may contain `/`: percent-encode it (`%2F`) in the path.
#[utoipa::path(get, path = "/api/v1/models/{id}", tag = "models", params(("id" = String, Path)),
    responses((status = 200, body = Model)))]
async fn fetch(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Model>> {
    caller.authorize(&state.db, Op::ModelsGet, Target::NONE).await?;
    Ok(Json(find_by_id(&state.db, &format!("SELECT {COLUMNS} FROM models"), id, "model").await?))
}

#[utoipa::path(patch, path = "/api/v1/models/{id}", tag = "models", params(("id" = String, Path)),
    request_body = UpdateModel, responses((status = 200, body = Model)))]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateModel>,
) -> ApiResult<Json<Model>> {
    caller.authorize(&state.db, Op::ModelsUpdate, Target::NONE).await?;
    let before: Model = find_by_id(&state.db, &format!("SELECT {COLUMNS} FROM models"), id.clone(), "model").await?;
    let upstream =
        body.upstream_model.as_deref().map(|u| validate::identifier("upstream_model", u, 512)).transpose()?;
    let provider = body.provider.as_deref().map(|p| validate::identifier("provider", p, 100)).transpose()?;
    let input = body.input_cost_per_token.map(|c| check_cost("input_cost_per_token", c)).transpose()?;
    let output = body.output_cost_per_token.map(|c| check_cost("output_cost_per_token", c)).transpose()?;
    let context = check_context(body.context_length)?;
    if let Some(m) = &body.metadata {
        validate::metadata("metadata", m)?;
    }
    let mut tx = Write::begin(&state, &caller).await?;
    let model: Model = sqlx::query_as(&format!(
        "UPDATE models SET upstream_model = COALESCE($2, upstream_model), provider = COALESCE($3, provider),
                context_length = COALESCE($4, context_length),
                input_cost_per_token = COALESCE($5, input_cost_per_token),
                output_cost_per_token = COALESCE($6, output_cost_per_token),
                enabled = COALESCE($7, enabled), restricted = COALESCE($8, restricted),
                metadata = COALESCE($9, metadata), updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(upstream)
    .bind(provider)
    .bind(context)
    .bind(input)
    .bind(output)
    .bind(body.enabled)
    .bind(body.restricted)
    .bind(body.metadata)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("model"))?;
    let change = Change::new("model.update", "model", &id, json!({"changes": diff(&before, &model)}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Model, &id)]).await?;
    Ok(Json(model))
}

/// Delete a model. Refused (409) while any subscription, even a cancelled one, refers to it:
/// disable it instead.
#[utoipa::path(delete, path = "/api/v1/models/{id}", tag = "models", params(("id" = String, Path)),
    responses((status = 204)))]
async fn remove(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    caller.authorize(&state.db, Op::ModelsDelete, Target::NONE).await?;
    let mut tx = Write::begin(&state, &caller).await?;
    let deleted = sqlx::query("DELETE FROM models WHERE id = $1").bind(&id).execute(&mut *tx).await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound("model"));
    }
    let change = Change::new("model.delete", "model", &id, json!({}));
    tx.commit(change, [Invalidation::new(InvalidationKind::Model, &id)]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sync the catalogue from LiteLLM. New models are created enabled when LiteLLM knows both their
/// prices and disabled (metadata.pricing = "missing") when it lacks either, so nothing is sold
/// for free by accident; existing models keep their enabled flag and any price LiteLLM lacks.
/// Previously synced models that LiteLLM no longer lists are marked unavailable; their
/// subscriptions are kept. A `/model/info` that lists no model (LiteLLM still starting) changes
/// nothing and fails the sync (502), like one that cannot be read.
#[utoipa::path(post, path = "/api/v1/models/sync", tag = "models", responses((status = 200, body = SyncReport)))]
async fn sync(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<SyncReport>> {
    caller.authorize(&state.db, Op::ModelsSync, Target::NONE).await?;
    let started = Utc::now();
    let result = run_sync(&state, &caller).await;
    let outcome = if result.is_ok() { "success" } else { "failure" };
    state.metrics.sync_runs.with_label_values(&[outcome]).inc();
    super::sync_runs::record(&state.db, super::sync_runs::Trigger::Manual, &caller.actor().label, started, &result)
        .await;
    result.map(Json)
}

pub(crate) async fn run_sync(state: &AppState, caller: &Caller) -> ApiResult<SyncReport> {
    let upstream = state.litellm.model_info().await?;
    if upstream.is_empty() {
        // Marking every model unavailable would refuse every request: believe the catalogue, not
        // an empty answer.
        return Err(ApiError::BadGateway("LiteLLM /model/info listed no models; nothing changed".into()));
    }
    let mut tx = Write::begin(state, caller).await?;
    let mut report = SyncReport { created: vec![], updated: vec![], unavailable: vec![] };
    for m in &upstream {
        // One known price is no price: the other would be sold at zero.
        let priced = m.input_cost_per_token.is_some() && m.output_cost_per_token.is_some();
        let mut metadata = m.metadata.clone();
        if !priced {
            metadata["pricing"] = json!("missing");
        }
        let inserted: bool = sqlx::query_scalar(
            "INSERT INTO models (id, upstream_model, provider, context_length, input_cost_per_token,
                                 output_cost_per_token, enabled, available, metadata, synced_at)
             VALUES ($1, $2, $3, $4, COALESCE($5, 0), COALESCE($6, 0), $7, true, $8, now())
             ON CONFLICT (id) DO UPDATE SET
                upstream_model = EXCLUDED.upstream_model, provider = EXCLUDED.provider,
                context_length = EXCLUDED.context_length,
                input_cost_per_token = COALESCE($5, models.input_cost_per_token),
                output_cost_per_token = COALESCE($6, models.output_cost_per_token),
                available = true, metadata = models.metadata || EXCLUDED.metadata,
                synced_at = now(), updated_at = now()
             RETURNING (xmax = 0)",
        )
        .bind(&m.id)
        .bind(&m.upstream_model)
        .bind(&m.provider)
        .bind(m.context_length)
        .bind(m.input_cost_per_token)
        .bind(m.output_cost_per_token)
        .bind(priced)
        .bind(&metadata)
        .fetch_one(&mut *tx)
        .await?;
        if inserted { &mut report.created } else { &mut report.updated }.push(m.id.clone());
    }
    let ids: Vec<&str> = upstream.iter().map(|m| m.id.as_str()).collect();
    report.unavailable = sqlx::query_scalar(
        "UPDATE models SET available = false, updated_at = now()
         WHERE synced_at IS NOT NULL AND available AND NOT (id = ANY($1)) RETURNING id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let change = Change::new(
        "model.sync",
        "model",
        "*",
        json!({"created": report.created, "updated": report.updated, "unavailable": report.unavailable}),
    );
    let changed = report.created.iter().chain(&report.updated).chain(&report.unavailable);
    tx.commit(change, changed.map(|id| Invalidation::new(InvalidationKind::Model, id))).await?;
    Ok(report)
}
