//! Offset pagination shared by every list endpoint: `?limit=&offset=` in, `Page<T>` out.

use serde::{Deserialize, Serialize};
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
}

impl<T> Page<T> {
    /// Builds a page from rows fetched with `LIMIT limit + 1`.
    pub fn from_rows(mut rows: Vec<T>, (limit, offset): (i64, i64)) -> Self {
        let has_more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        Page { data: rows, limit, offset, has_more }
    }
}
