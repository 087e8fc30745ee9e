//! The vocabulary every resource module speaks, imported whole with `use super::prelude::*`:
//! state and caller, extractors and responses, errors and checks, lists, writes and what a write
//! announces.

pub use axum::{
    extract::State,
    http::StatusCode,
    routing::{delete, get, post},
    Router,
};
pub use tollgate_core::invalidation::{Invalidation, InvalidationKind};

pub use super::{find_by_id, validate_limits};
pub use crate::{
    audit::{diff, Change},
    auth::Caller,
    authz::{limits_within, Ceiling, Op, Relation, Target},
    error::{ApiError, ApiResult},
    extract::{Created, Json, Path, Query},
    pagination::{ListQuery, Page, PageParams},
    state::AppState,
    validate,
    write::Write,
};
