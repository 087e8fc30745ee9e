//! Usage reports over the rollup tables (usage_daily for days and every other grouping,
//! usage_hourly for hours); raw usage_logs are never scanned. Users see only their own usage.
//!
//! A report groups by one dimension or two (`group_by=user,model`), filters by user, team, key,
//! model and subscription, carries per row the request, error, token and cost totals and the
//! latency percentiles read from the rollups' histograms (see [`tollgate_core::latency`]), and
//! lists the budget adjustments made in its range as lines of their own. `format=csv` (or
//! `Accept: text/csv`) streams the same lines as CSV.

use axum::{extract::State, http::HeaderMap, response::IntoResponse, response::Response, routing::get, Router};
use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Utc};
use futures::TryStreamExt;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgPool};
use tollgate_core::latency;
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
    csv::{self, Format},
    error::{ApiError, ApiResult},
    extract::Query,
    state::AppState,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/usage", get(report))
}

/// One dimension of a report.
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
    Subscription,
}

impl GroupBy {
    const ALL: [GroupBy; 7] = [
        GroupBy::Day,
        GroupBy::Hour,
        GroupBy::Model,
        GroupBy::Key,
        GroupBy::User,
        GroupBy::Team,
        GroupBy::Subscription,
    ];

    fn name(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Hour => "hour",
            GroupBy::Model => "model",
            GroupBy::Key => "key",
            GroupBy::User => "user",
            GroupBy::Team => "team",
            GroupBy::Subscription => "subscription",
        }
    }

    fn is_time(self) -> bool {
        matches!(self, GroupBy::Day | GroupBy::Hour)
    }

    /// The group's value in a rollup row `r`.
    fn expr(self) -> &'static str {
        match self {
            GroupBy::Day => "to_char(r.day, 'YYYY-MM-DD')",
            GroupBy::Hour => "to_char(r.hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
            GroupBy::Model => "r.model_id",
            GroupBy::Key => "r.key_id::text",
            GroupBy::User => "r.user_id::text",
            GroupBy::Team => "r.team_id::text",
            GroupBy::Subscription => "COALESCE(r.subscription_id::text, '')",
        }
    }

    /// The group's value for a budget adjustment `b` (its key `bk` and subscription `bs` joined);
    /// '' where the adjustment says nothing about the dimension.
    fn adjustment_expr(self) -> &'static str {
        match self {
            GroupBy::Day => "to_char(b.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            GroupBy::Hour => {
                "to_char(date_trunc('hour', b.created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')"
            }
            GroupBy::Model => "COALESCE(bs.model_id, '')",
            GroupBy::Key => "CASE WHEN b.scope = 'key' THEN b.scope_id::text ELSE '' END",
            GroupBy::User => {
                "COALESCE((CASE b.scope WHEN 'user' THEN b.scope_id WHEN 'key' THEN bk.user_id
                                 WHEN 'subscription' THEN bs.user_id END)::text, '')"
            }
            GroupBy::Team => {
                "COALESCE((CASE b.scope WHEN 'team' THEN b.scope_id WHEN 'key' THEN bk.team_id END)::text, '')"
            }
            GroupBy::Subscription => "CASE WHEN b.scope = 'subscription' THEN b.scope_id::text ELSE '' END",
        }
    }

    /// The label columns (`name, key_prefix, user_id, email, model_id`, suffixed by `p`) and the
    /// joins that give them, for the group in column `g{p}` of `a`. Labels come from rows that
    /// may since have been renamed or deleted (left joins).
    fn labels(self, p: u8) -> (String, String) {
        let none = |cols: [&str; 5]| {
            let names = ["name", "key_prefix", "user_id", "email", "model_id"];
            cols.iter().zip(names).map(|(c, n)| format!("{c} AS {n}{p}")).collect::<Vec<_>>().join(", ")
        };
        match self {
            GroupBy::Key => (
                none([&format!("k{p}.name"), &format!("k{p}.key_prefix"), &format!("k{p}.user_id"), &format!("ku{p}.email"), "NULL::text"]),
                format!("LEFT JOIN api_keys k{p} ON k{p}.id = NULLIF(a.g{p}, '')::uuid LEFT JOIN users ku{p} ON ku{p}.id = k{p}.user_id"),
            ),
            GroupBy::User => (
                none([&format!("u{p}.name"), "NULL::text", "NULL::uuid", &format!("u{p}.email"), "NULL::text"]),
                format!("LEFT JOIN users u{p} ON u{p}.id = NULLIF(a.g{p}, '')::uuid"),
            ),
            GroupBy::Team => (
                none([&format!("t{p}.name"), "NULL::text", "NULL::uuid", "NULL::text", "NULL::text"]),
                format!("LEFT JOIN teams t{p} ON t{p}.id = NULLIF(a.g{p}, '')::uuid"),
            ),
            GroupBy::Subscription => (
                none(["NULL::text", "NULL::text", &format!("s{p}.user_id"), &format!("su{p}.email"), &format!("s{p}.model_id")]),
                format!("LEFT JOIN subscriptions s{p} ON s{p}.id = NULLIF(a.g{p}, '')::uuid LEFT JOIN users su{p} ON su{p}.id = s{p}.user_id"),
            ),
            _ => (none(["NULL::text", "NULL::text", "NULL::uuid", "NULL::text", "NULL::text"]), String::new()),
        }
    }
}

/// What `group_by` accepts, for the OpenAPI document.
pub struct GroupByList;

/// The pattern of `group_by`: one dimension, or two different ones separated by a comma.
const GROUP_BY_PATTERN: &str =
    "^(day|hour|model|key|user|team|subscription)(,(day|hour|model|key|user|team|subscription))?$";

impl PartialSchema for GroupByList {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(GROUP_BY_PATTERN))
            .description(Some(
                "One dimension (`day`, `hour`, `model`, `key`, `user`, `team`, `subscription`; default `day`) or \
                 two different ones separated by a comma (`user,model`), at most one of them `day` or `hour`.",
            ))
            .into()
    }
}

impl ToSchema for GroupByList {}

fn parse_group_by(value: Option<&str>) -> ApiResult<Vec<GroupBy>> {
    let Some(value) = value else { return Ok(vec![GroupBy::Day]) };
    let mut dims = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        // Not a dimension: a malformed query (400), like any other; a combination that cannot be: 422.
        let dim = GroupBy::ALL.into_iter().find(|d| d.name() == part).ok_or_else(|| ApiError::BadRequest {
            field: Some("group_by".into()),
            message: "each dimension is one of day, hour, model, key, user, team, subscription".into(),
        })?;
        if dims.contains(&dim) {
            return Err(ApiError::invalid("group_by", format!("`{part}` is named twice")));
        }
        dims.push(dim);
    }
    if dims.len() > 2 {
        return Err(ApiError::invalid("group_by", "at most two dimensions"));
    }
    if dims.iter().filter(|d| d.is_time()).count() > 1 {
        return Err(ApiError::invalid("group_by", "at most one of day and hour"));
    }
    Ok(dims)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    #[param(value_type = Option<GroupByList>)]
    pub group_by: Option<String>,
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
    pub subscription_id: Option<Uuid>,
    /// `csv`: the same lines as CSV (also chosen by `Accept: text/csv` when `format` is absent).
    pub format: Option<Format>,
}

/// What a line of a report is.
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LineKind {
    /// Usage of one group.
    Usage,
    /// A budget adjustment made in the report's range (its amount is the line's cost).
    Adjustment,
    /// The report's totals.
    Total,
}

impl LineKind {
    fn name(self) -> &'static str {
        match self {
            LineKind::Usage => "usage",
            LineKind::Adjustment => "adjustment",
            LineKind::Total => "total",
        }
    }
}

/// What names a group, beside its id.
#[derive(Debug, Clone, Default, Serialize, ToSchema, PartialEq)]
pub struct Labels {
    /// The key's, user's or team's name (group key, user or team), when it still exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key's public prefix (group key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// The key's or subscription's owner (group key or subscription).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// The user's email (group user, and the owner's for key and subscription).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The subscription's model (group subscription).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
}

impl Labels {
    fn is_empty(&self) -> bool {
        *self == Labels::default()
    }
}

/// A budget adjustment, on its own line of a report.
#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
pub struct AdjustmentLine {
    pub id: Uuid,
    /// key, user, team or subscription.
    pub scope: String,
    pub scope_id: Uuid,
    /// The budget period it applies to.
    pub period: String,
    pub reason: String,
    pub actor: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageRow {
    pub kind: LineKind,
    /// The first dimension's value: the day (`YYYY-MM-DD`), hour (RFC 3339), model id, key id,
    /// user id, team id or subscription id ('' where a line has none, such as usage recorded
    /// without a subscription or an adjustment the dimension does not apply to); `total` on the
    /// totals line.
    pub group: String,
    #[serde(flatten)]
    pub labels: Labels,
    /// The second dimension's value (two dimensions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group2: Option<String>,
    /// The second dimension's labels, as the first's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group2_labels: Option<Labels>,
    pub requests: i64,
    /// Requests answered with a status of 400 or more.
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// USD; an adjustment's amount (negative: a credit).
    #[schema(value_type = f64)]
    pub cost: Decimal,
    /// Median latency in milliseconds, from the rollups' histogram (within one bucket, about
    /// 20-25%, of the true value); absent without latency data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile latency in milliseconds, as `latency_p50_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p95_ms: Option<f64>,
    /// The adjustment (adjustment lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjustment: Option<AdjustmentLine>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    /// The dimensions, comma-separated as asked (`day`, `user,model`).
    pub group_by: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Usage lines in group order, then adjustment lines in time order.
    pub data: Vec<UsageRow>,
    /// Every line added up (adjustments' amounts included in `cost`).
    pub totals: UsageRow,
    /// The adjustments' part of `totals.cost`, USD.
    #[schema(value_type = f64)]
    pub adjustments_cost: Decimal,
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

/// A time parameter: `YYYY-MM-DD` (midnight UTC) or RFC 3339, within the years reports know;
/// errors name `field`.
pub(crate) fn parse_time(field: &str, value: &str) -> ApiResult<DateTime<Utc>> {
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

/// A usage line as the report's query returns it.
#[derive(Debug, FromRow)]
struct Aggregate {
    g1: String,
    g2: Option<String>,
    requests: i64,
    errors: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    cost: Decimal,
    latency_hist: Vec<i64>,
    name1: Option<String>,
    key_prefix1: Option<String>,
    user_id1: Option<Uuid>,
    email1: Option<String>,
    model_id1: Option<String>,
    name2: Option<String>,
    key_prefix2: Option<String>,
    user_id2: Option<Uuid>,
    email2: Option<String>,
    model_id2: Option<String>,
}

/// An adjustment line as its query returns it.
#[derive(Debug, FromRow)]
struct AdjustmentAggregate {
    #[sqlx(flatten)]
    line: AdjustmentLine,
    amount_nanos: i64,
    g1: String,
    g2: Option<String>,
}

fn ms(v: Option<f64>) -> Option<f64> {
    v.map(|v| (v * 10.0).round() / 10.0)
}

impl Aggregate {
    fn into_row(self, two: bool) -> UsageRow {
        let labels2 = Labels {
            name: self.name2,
            key_prefix: self.key_prefix2,
            user_id: self.user_id2,
            email: self.email2,
            model_id: self.model_id2,
        };
        UsageRow {
            kind: LineKind::Usage,
            group: self.g1,
            labels: Labels {
                name: self.name1,
                key_prefix: self.key_prefix1,
                user_id: self.user_id1,
                email: self.email1,
                model_id: self.model_id1,
            },
            group2: if two { Some(self.g2.unwrap_or_default()) } else { None },
            group2_labels: (two && !labels2.is_empty()).then_some(labels2),
            requests: self.requests,
            errors: self.errors,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cost: self.cost,
            latency_p50_ms: ms(latency::quantile(&self.latency_hist, 0.5)),
            latency_p95_ms: ms(latency::quantile(&self.latency_hist, 0.95)),
            adjustment: None,
        }
    }
}

/// A report's parameters, checked.
struct Plan {
    dims: Vec<GroupBy>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    own: Option<Uuid>,
    q: UsageQuery,
}

impl Plan {
    fn hourly(&self) -> bool {
        self.dims.contains(&GroupBy::Hour)
    }

    fn group_by(&self) -> String {
        self.dims.iter().map(|d| d.name()).collect::<Vec<_>>().join(",")
    }

    fn usage_sql(&self) -> String {
        let (table, bucket_filter) = if self.hourly() {
            ("usage_hourly", "hour >= date_trunc('hour', $1) AND hour < $2")
        } else {
            ("usage_daily", "day >= ($1 AT TIME ZONE 'UTC')::date AND (day::timestamp AT TIME ZONE 'UTC') < $2")
        };
        let g1 = self.dims[0].expr();
        let g2 = self.dims.get(1).map_or("NULL::text", |d| d.expr());
        let (labels1, joins1) = self.dims[0].labels(1);
        let (labels2, joins2) = self.dims.get(1).copied().unwrap_or(GroupBy::Day).labels(2);
        format!(
            "WITH a AS (
               SELECT {g1} AS g1, {g2} AS g2, sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,
                      sum(prompt_tokens)::bigint AS prompt_tokens,
                      sum(completion_tokens)::bigint AS completion_tokens,
                      sum(prompt_tokens + completion_tokens)::bigint AS total_tokens,
                      sum(cost) AS cost, tollgate_hist_sum(latency_hist) AS latency_hist
               FROM {table} r
               WHERE {bucket_filter}
                 AND ($3::uuid IS NULL OR user_id = $3) AND ($4::uuid IS NULL OR user_id = $4)
                 AND ($5::uuid IS NULL OR team_id = $5) AND ($6::uuid IS NULL OR key_id = $6)
                 AND ($7::text IS NULL OR model_id = $7) AND ($8::uuid IS NULL OR subscription_id = $8)
               GROUP BY 1, 2)
             SELECT a.*, {labels1}, {labels2} FROM a {joins1} {joins2} ORDER BY a.g1, a.g2"
        )
    }

    /// Adjustments in the same buckets as the usage (each day or hour overlapping the range, whole)
    /// and under the same filters: a user's are those on the user, their keys and subscriptions; a
    /// team's those on the team and its keys; a model's those on its subscriptions.
    fn adjustments_sql(&self) -> String {
        let bucket_filter = if self.hourly() {
            "date_trunc('hour', b.created_at) >= date_trunc('hour', $1) AND date_trunc('hour', b.created_at) < $2"
        } else {
            "(b.created_at AT TIME ZONE 'UTC')::date >= ($1 AT TIME ZONE 'UTC')::date
             AND (date_trunc('day', b.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') < $2"
        };
        let g1 = self.dims[0].adjustment_expr();
        let g2 = self.dims.get(1).map_or("NULL::text", |d| d.adjustment_expr());
        let user_of = "CASE b.scope WHEN 'user' THEN b.scope_id WHEN 'key' THEN bk.user_id
                       WHEN 'subscription' THEN bs.user_id END";
        let team_of = "CASE b.scope WHEN 'team' THEN b.scope_id WHEN 'key' THEN bk.team_id END";
        format!(
            "SELECT b.id, b.scope, b.scope_id, b.period, b.reason, b.actor, b.created_at, b.amount_nanos,
                    {g1} AS g1, {g2} AS g2
             FROM budget_adjustments b
             LEFT JOIN api_keys bk ON b.scope = 'key' AND bk.id = b.scope_id
             LEFT JOIN subscriptions bs ON b.scope = 'subscription' AND bs.id = b.scope_id
             WHERE {bucket_filter}
               AND ($3::uuid IS NULL OR ({user_of}) = $3) AND ($4::uuid IS NULL OR ({user_of}) = $4)
               AND ($5::uuid IS NULL OR ({team_of}) = $5)
               AND ($6::uuid IS NULL OR (b.scope = 'key' AND b.scope_id = $6))
               AND ($7::text IS NULL OR bs.model_id = $7)
               AND ($8::uuid IS NULL OR (b.scope = 'subscription' AND b.scope_id = $8))
             ORDER BY b.created_at, b.id"
        )
    }

    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(self.from)
            .bind(self.to)
            .bind(self.own)
            .bind(self.q.user_id)
            .bind(self.q.team_id)
            .bind(self.q.key_id)
            .bind(self.q.model_id.as_deref())
            .bind(self.q.subscription_id)
    }
}

/// Where a report's lines go: a JSON answer's list, or a CSV stream.
enum Sink {
    Json(Vec<UsageRow>),
    Csv(csv::Writer),
}

/// The CSV columns, in order.
const CSV_HEADER: [&str; 28] = [
    "kind",
    "group",
    "name",
    "key_prefix",
    "user_id",
    "email",
    "model_id",
    "group2",
    "group2_name",
    "group2_key_prefix",
    "group2_user_id",
    "group2_email",
    "group2_model_id",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "latency_p50_ms",
    "latency_p95_ms",
    "adjustment_id",
    "adjustment_scope",
    "adjustment_scope_id",
    "adjustment_period",
    "adjustment_reason",
    "adjustment_actor",
    "adjustment_created_at",
];

fn csv_fields(row: &UsageRow) -> Vec<String> {
    fn s<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map(T::to_string).unwrap_or_default()
    }
    let none = Labels::default();
    let l2 = row.group2_labels.as_ref().unwrap_or(&none);
    let a = row.adjustment.as_ref();
    vec![
        row.kind.name().to_string(),
        row.group.clone(),
        s(&row.labels.name),
        s(&row.labels.key_prefix),
        s(&row.labels.user_id),
        s(&row.labels.email),
        s(&row.labels.model_id),
        s(&row.group2),
        s(&l2.name),
        s(&l2.key_prefix),
        s(&l2.user_id),
        s(&l2.email),
        s(&l2.model_id),
        row.requests.to_string(),
        row.errors.to_string(),
        row.prompt_tokens.to_string(),
        row.completion_tokens.to_string(),
        row.total_tokens.to_string(),
        row.cost.normalize().to_string(),
        s(&row.latency_p50_ms),
        s(&row.latency_p95_ms),
        s(&a.map(|a| a.id)),
        s(&a.map(|a| a.scope.clone())),
        s(&a.map(|a| a.scope_id)),
        s(&a.map(|a| a.period.clone())),
        s(&a.map(|a| a.reason.clone())),
        s(&a.map(|a| a.actor.clone())),
        s(&a.map(|a| a.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))),
    ]
}

impl Sink {
    async fn emit(&mut self, row: UsageRow) -> Result<(), csv::Gone> {
        match self {
            Sink::Json(rows) => {
                rows.push(row);
                Ok(())
            }
            Sink::Csv(w) => w.line(&csv_fields(&row)).await,
        }
    }
}

/// Running totals of a report's lines.
struct Totals {
    row: UsageRow,
    hist: Vec<i64>,
    adjustments: Decimal,
}

impl Totals {
    fn new() -> Self {
        Totals {
            row: UsageRow {
                kind: LineKind::Total,
                group: "total".into(),
                labels: Labels::default(),
                group2: None,
                group2_labels: None,
                requests: 0,
                errors: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                total_tokens: 0,
                cost: Decimal::ZERO,
                latency_p50_ms: None,
                latency_p95_ms: None,
                adjustment: None,
            },
            hist: Vec::new(),
            adjustments: Decimal::ZERO,
        }
    }

    fn add(&mut self, r: &UsageRow) {
        let t = &mut self.row;
        t.requests += r.requests;
        t.errors += r.errors;
        t.prompt_tokens += r.prompt_tokens;
        t.completion_tokens += r.completion_tokens;
        t.total_tokens += r.total_tokens;
        t.cost += r.cost;
        if r.kind == LineKind::Adjustment {
            self.adjustments += r.cost;
        }
    }

    fn add_hist(&mut self, hist: &[i64]) {
        if self.hist.len() < hist.len() {
            self.hist.resize(hist.len(), 0);
        }
        for (t, h) in self.hist.iter_mut().zip(hist) {
            *t += h;
        }
    }

    fn finish(mut self) -> (UsageRow, Decimal) {
        self.row.latency_p50_ms = ms(latency::quantile(&self.hist, 0.5));
        self.row.latency_p95_ms = ms(latency::quantile(&self.hist, 0.95));
        (self.row, self.adjustments)
    }
}

/// Either a database error or a client that left a CSV answer.
enum Stop {
    Db(sqlx::Error),
    Gone,
}

impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Db(e)
    }
}

impl From<csv::Gone> for Stop {
    fn from(_: csv::Gone) -> Self {
        Stop::Gone
    }
}

/// Reads the report's lines into `sink` (usage lines as the database streams them, then the
/// adjustment lines) and answers the totals.
async fn produce(db: &PgPool, plan: &Plan, sink: &mut Sink) -> Result<(UsageRow, Decimal), Stop> {
    let two = plan.dims.len() == 2;
    let mut totals = Totals::new();
    let sql = plan.usage_sql();
    let mut rows = plan.bind(sqlx::query_as::<_, Aggregate>(&sql)).fetch(db);
    while let Some(agg) = rows.try_next().await? {
        totals.add_hist(&agg.latency_hist);
        let row = agg.into_row(two);
        totals.add(&row);
        sink.emit(row).await?;
    }
    drop(rows);
    let sql = plan.adjustments_sql();
    let mut rows = plan.bind(sqlx::query_as::<_, AdjustmentAggregate>(&sql)).fetch(db);
    while let Some(adj) = rows.try_next().await? {
        let row = UsageRow {
            kind: LineKind::Adjustment,
            group: adj.g1,
            labels: Labels::default(),
            group2: if two { Some(adj.g2.unwrap_or_default()) } else { None },
            group2_labels: None,
            requests: 0,
            errors: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cost: Decimal::from_i128_with_scale(adj.amount_nanos.into(), 9).normalize(),
            latency_p50_ms: None,
            latency_p95_ms: None,
            adjustment: Some(adj.line),
        };
        totals.add(&row);
        sink.emit(row).await?;
    }
    Ok(totals.finish())
}

/// Usage grouped by one or two of day, hour, model, key, user, team and subscription, with the
/// budget adjustments of the range as lines of their own; JSON, or CSV with `format=csv` or
/// `Accept: text/csv`.
#[utoipa::path(get, path = "/api/v1/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, description = "The report", content(
        (UsageReport = "application/json"),
        (String = "text/csv"),
    ))))]
async fn report(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Response> {
    caller.authorize(&state.db, Op::Usage, Target::NONE).await?;
    let dims = parse_group_by(q.group_by.as_deref())?;
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
    let as_csv = csv::wanted(q.format, &headers);
    let plan = Plan { dims, from, to, own: caller.own_scope(), q };
    if as_csv {
        let db = state.db.clone();
        let name = format!("usage-{}-{}.csv", plan.group_by().replace(',', "-"), from.format("%Y%m%d"));
        return csv::stream(&name, move |mut w| async move {
            let header = CSV_HEADER;
            if w.line(&header).await.is_err() {
                return;
            }
            let mut sink = Sink::Csv(w);
            let result = produce(&db, &plan, &mut sink).await;
            let Sink::Csv(mut w) = sink else { return };
            match result {
                Ok((totals, _)) => {
                    if w.line(&csv_fields(&totals)).await.is_ok() {
                        w.finish().await;
                    }
                }
                Err(Stop::Db(e)) => w.fail(e.into()).await,
                Err(Stop::Gone) => {}
            }
        })
        .await;
    }
    let mut sink = Sink::Json(Vec::new());
    // A JSON sink never reports a client gone: only the database can stop it.
    let (totals, adjustments_cost) = produce(&state.db, &plan, &mut sink).await.map_err(|stop| match stop {
        Stop::Db(e) => ApiError::from(e),
        Stop::Gone => ApiError::Internal(anyhow::anyhow!("a JSON report lost its sink")),
    })?;
    let Sink::Json(data) = sink else { return Err(ApiError::Internal(anyhow::anyhow!("a JSON report lost its sink"))) };
    let report = UsageReport { group_by: plan.group_by(), from, to, data, totals, adjustments_cost };
    Ok(axum::Json(report).into_response())
}
