//! Usage reports over the rollup tables (usage_daily for days and every other grouping,
//! usage_hourly for hours); raw usage_logs are never scanned. Users see only their own usage.

use axum::{extract::State, routing::get, Router};
use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{
    openapi::{
        schema::{ObjectBuilder, OneOfBuilder, Schema, Type},
        KnownFormat, RefOr, SchemaFormat,
    },
    IntoParams, PartialSchema, ToSchema,
};
use uuid::Uuid;

use crate::{
    auth::Caller,
    authz::{Op, Target},
    error::{ApiError, ApiResult},
    extract::Query,
    state::AppState,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/usage", get(report))
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    #[default]
    Day,
    Hour,
    Model,
    Key,
    User,
    Team,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    pub group_by: Option<GroupBy>,
    /// Start: `YYYY-MM-DD` or RFC 3339. Default: 30 days before `to`. Every day or hour bucket
    /// that overlaps [from, to) is reported whole.
    #[param(value_type = Option<ReportTime>)]
    pub from: Option<String>,
    /// End (exclusive): `YYYY-MM-DD` or RFC 3339, after `from` and at most 732 days from it.
    /// Default: now.
    #[param(value_type = Option<ReportTime>)]
    pub to: Option<String>,
    pub user_id: Option<Uuid>,
    pub team_id: Option<Uuid>,
    pub key_id: Option<Uuid>,
    pub model_id: Option<String>,
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct UsageRow {
    /// The day (`YYYY-MM-DD`), hour (RFC 3339), model id, key id, user id or team id.
    pub group: String,
    /// The key's, user's or team's name (group_by key, user or team), when it still exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key's public prefix (group_by key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// The key owner's id (group_by key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// The user's email (group_by user, and the key owner's for group_by key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// USD.
    #[schema(value_type = f64)]
    pub cost: Decimal,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub group_by: GroupBy,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub data: Vec<UsageRow>,
    pub totals: UsageRow,
}

/// The longest range a report may span.
const MAX_RANGE_DAYS: i64 = 366 * 2;

/// Dates a report may name: [2000-01-01, 2200-01-01). Beyond them there is no usage, and date
/// arithmetic near chrono's limits would overflow.
const EARLIEST_YEAR: i32 = 2000;
const LATEST_YEAR: i32 = 2200;

/// What [`parse_time`] accepts, for the OpenAPI document. The years' bounds cannot be said in a
/// JSON schema of a date string: the description says them.
pub struct ReportTime;

impl PartialSchema for ReportTime {
    fn schema() -> RefOr<Schema> {
        let format = |f| ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(f)));
        OneOfBuilder::new()
            .item(format(KnownFormat::Date))
            .item(format(KnownFormat::DateTime))
            .description(Some(format!(
                "A day (`YYYY-MM-DD`, midnight UTC) or an RFC 3339 time, from {EARLIEST_YEAR}-01-01 until \
                 {LATEST_YEAR}-01-01."
            )))
            .into()
    }
}

impl ToSchema for ReportTime {}

fn parse_time(field: &str, value: &str) -> ApiResult<DateTime<Utc>> {
    let t = if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        t.with_timezone(&Utc)
    } else if let Ok(d) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        d.and_time(NaiveTime::MIN).and_utc()
    } else {
        return Err(ApiError::BadRequest {
            field: Some(field.into()),
            message: format!("{field} must be YYYY-MM-DD or an RFC 3339 time"),
        });
    };
    if !(EARLIEST_YEAR..LATEST_YEAR).contains(&t.year()) {
        return Err(ApiError::invalid(field, format!("must be between {EARLIEST_YEAR}-01-01 and {LATEST_YEAR}-01-01")));
    }
    Ok(t)
}

/// Usage totals grouped by day, hour, model, key, user or team.
#[utoipa::path(get, path = "/api/v1/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, body = UsageReport)))]
async fn report(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<UsageQuery>,
) -> ApiResult<axum::Json<UsageReport>> {
    caller.authorize(&state.db, Op::Usage, Target::NONE).await?;
    let to = q.to.as_deref().map(|v| parse_time("to", v)).transpose()?.unwrap_or_else(Utc::now);
    let from = q.from.as_deref().map(|v| parse_time("from", v)).transpose()?.unwrap_or(to - Duration::days(30));
    if from >= to {
        return Err(ApiError::invalid("from", "must be before `to`"));
    }
    if to - from > Duration::days(MAX_RANGE_DAYS) {
        return Err(ApiError::invalid("from", format!("a report spans at most {MAX_RANGE_DAYS} days")));
    }
    if let (Some(me), Some(asked)) = (caller.own_scope(), q.user_id) {
        if me != asked {
            return Err(ApiError::NotFound("user"));
        }
    }
    let group_by = q.group_by.unwrap_or_default();
    let (table, bucket_filter) = match group_by {
        GroupBy::Hour => ("usage_hourly", "hour >= date_trunc('hour', $1) AND hour < $2"),
        _ => ("usage_daily", "day >= ($1 AT TIME ZONE 'UTC')::date AND (day::timestamp AT TIME ZONE 'UTC') < $2"),
    };
    let group = match group_by {
        GroupBy::Day => "to_char(day, 'YYYY-MM-DD')",
        GroupBy::Hour => "to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
        GroupBy::Model => "model_id",
        GroupBy::Key => "key_id::text",
        GroupBy::User => "user_id::text",
        GroupBy::Team => "team_id::text",
    };
    // Labels beside the ids, from rows that may since have been renamed or deleted (left joins).
    let (labels, joins) = match group_by {
        GroupBy::Key => (
            "k.name AS name, k.key_prefix AS key_prefix, k.user_id AS user_id, u.email AS email",
            "LEFT JOIN api_keys k ON k.id = a.\"group\"::uuid LEFT JOIN users u ON u.id = k.user_id",
        ),
        GroupBy::User => (
            "u.name AS name, NULL::text AS key_prefix, NULL::uuid AS user_id, u.email AS email",
            "LEFT JOIN users u ON u.id = a.\"group\"::uuid",
        ),
        GroupBy::Team => (
            "t.name AS name, NULL::text AS key_prefix, NULL::uuid AS user_id, NULL::text AS email",
            "LEFT JOIN teams t ON t.id = a.\"group\"::uuid",
        ),
        _ => ("NULL::text AS name, NULL::text AS key_prefix, NULL::uuid AS user_id, NULL::text AS email", ""),
    };
    let sql = format!(
        "WITH a AS (
           SELECT {group} AS \"group\", sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,
                  sum(prompt_tokens)::bigint AS prompt_tokens,
                  sum(completion_tokens)::bigint AS completion_tokens,
                  sum(prompt_tokens + completion_tokens)::bigint AS total_tokens,
                  sum(cost) AS cost
           FROM {table}
           WHERE {bucket_filter}
             AND ($3::uuid IS NULL OR user_id = $3) AND ($4::uuid IS NULL OR user_id = $4)
             AND ($5::uuid IS NULL OR team_id = $5) AND ($6::uuid IS NULL OR key_id = $6)
             AND ($7::text IS NULL OR model_id = $7)
           GROUP BY 1)
         SELECT a.*, {labels} FROM a {joins} ORDER BY 1"
    );
    let data: Vec<UsageRow> = sqlx::query_as(&sql)
        .bind(from)
        .bind(to)
        .bind(caller.own_scope())
        .bind(q.user_id)
        .bind(q.team_id)
        .bind(q.key_id)
        .bind(q.model_id)
        .fetch_all(&state.db)
        .await?;
    let totals = data.iter().fold(
        UsageRow {
            group: "total".into(),
            name: None,
            key_prefix: None,
            user_id: None,
            email: None,
            requests: 0,
            errors: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cost: Decimal::ZERO,
        },
        |mut t, r| {
            t.requests += r.requests;
            t.errors += r.errors;
            t.prompt_tokens += r.prompt_tokens;
            t.completion_tokens += r.completion_tokens;
            t.total_tokens += r.total_tokens;
            t.cost += r.cost;
            t
        },
    );
    Ok(axum::Json(UsageReport { group_by, from, to, data, totals }))
}
