//! Offset pagination shared by every list endpoint: `?limit=&offset=` in, `Page<T>` out, and the
//! [`ListQuery`] that fills a page from the filters a request gives. Every page carries `total`,
//! the number of rows the filters match (counted by a second query with the same filters).

use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::{postgres::PgRow, Encode, FromRow, PgPool, Postgres, QueryBuilder, Type};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
const MAX_OFFSET: i64 = 1_000_000_000;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Rows per page (1-500, default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Rows to skip (default 0).
    #[param(minimum = 0, maximum = 1_000_000_000)]
    pub offset: Option<i64>,
}

impl PageParams {
    /// `(limit, offset)` after validation.
    pub fn bounds(&self) -> ApiResult<(i64, i64)> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::BadRequest {
                field: Some("limit".into()),
                message: format!("limit must be between 1 and {MAX_LIMIT}"),
            });
        }
        let offset = self.offset.unwrap_or(0);
        if !(0..=MAX_OFFSET).contains(&offset) {
            return Err(ApiError::BadRequest {
                field: Some("offset".into()),
                message: format!("offset must be between 0 and {MAX_OFFSET}"),
            });
        }
        Ok((limit, offset))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub limit: i64,
    pub offset: i64,
    /// Whether another page follows (request it with `offset + limit`).
    pub has_more: bool,
    /// How many rows the filters match, on every page together.
    pub total: i64,
}

impl<T: Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        axum::Json(self).into_response()
    }
}

impl<T> Page<T> {
    /// Builds a page from rows fetched with `LIMIT limit + 1`, of `total` matching rows.
    pub fn from_rows(mut rows: Vec<T>, (limit, offset): (i64, i64), total: i64) -> Self {
        let has_more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        Page { data: rows, limit, offset, has_more, total }
    }
}

/// A list endpoint's `SELECT`. Each filter the request gives adds one `AND` condition (absent
/// ones add nothing), and [`ListQuery::page`] appends the order and the page's bounds.
pub struct ListQuery<'a> {
    sql: QueryBuilder<'a, Postgres>,
    /// The same statement under `SELECT count(*)`, for the page's `total`.
    count: QueryBuilder<'a, Postgres>,
    conditions: usize,
}

impl<'a> ListQuery<'a> {
    /// `select` is the statement up to (not including) its `WHERE`.
    pub fn new(select: impl Into<String>) -> Self {
        let select = select.into();
        let count = QueryBuilder::new(format!("SELECT count(*) FROM ({select}"));
        Self { sql: QueryBuilder::new(select), count, conditions: 0 }
    }

    /// Adds `condition`, with `value` bound where it says `$`, when `value` is given. Conditions
    /// are SQL written in the code; what the request sent is only ever bound.
    pub fn filter<T>(mut self, condition: &str, value: Option<T>) -> Self
    where
        T: 'a + Encode<'a, Postgres> + Type<Postgres> + Clone,
    {
        let Some(value) = value else { return self };
        let (before, after) = condition.split_once('$').unwrap_or((condition, ""));
        let joiner = if self.conditions == 0 { " WHERE " } else { " AND " };
        self.sql.push(joiner).push(before).push_bind(value.clone()).push(after);
        self.count.push(joiner).push(before).push_bind(value).push(after);
        self.conditions += 1;
        self
    }

    /// One page of rows in `order_by` order.
    pub async fn page<T>(mut self, db: &PgPool, order_by: &str, (limit, offset): (i64, i64)) -> ApiResult<Page<T>>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let total: i64 = self.count.push(") AS listed").build_query_scalar().fetch_one(db).await?;
        let rows = self.rows(db, order_by, limit + 1, offset).await?;
        // One row past the page tells whether another page follows.
        Ok(Page::from_rows(rows, (limit, offset), total))
    }

    /// At most `limit` rows in `order_by` order from `offset` on, without a count: the pages of
    /// a CSV export.
    pub async fn rows<T>(mut self, db: &PgPool, order_by: &str, limit: i64, offset: i64) -> ApiResult<Vec<T>>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        self.sql.push(" ORDER BY ").push(order_by);
        self.sql.push(" LIMIT ").push_bind(limit).push(" OFFSET ").push_bind(offset);
        Ok(self.sql.build_query_as().fetch_all(db).await?)
    }
}
