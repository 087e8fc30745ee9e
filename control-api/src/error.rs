//! The control API's one error type and the single place it is rendered:
//! `{"error": {"code", "message", "field"?}}` with the matching status.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use tollgate_core::limits::FieldError;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: unparsable JSON, bad path or query parameter.
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    #[error("request body must be JSON (content-type: application/json)")]
    UnsupportedMediaType,
    /// Well-formed but invalid: wrong type, unknown field, out-of-range value, unknown reference.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable reason, e.g. `validation_error`, `not_found`, `conflict`.
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, as a dotted path, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid { field: field.into(), message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest { field: None, message: message.into() }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::Forbidden(message.into())
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::Conflict(message.into())
    }

    /// Prefixes a limits validation failure with where the limits object sits.
    pub fn from_field(prefix: &str, e: FieldError) -> Self {
        ApiError::invalid(format!("{prefix}.{}", e.field), e.message)
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Invalid { .. } => "validation_error",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::BadGateway(_) => "upstream_error",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "internal error");
        }
        let (field, message) = match &self {
            ApiError::BadRequest { field, message } => (field.clone(), message.clone()),
            ApiError::Invalid { field, message } => (Some(field.clone()), message.clone()),
            other => (None, other.to_string()),
        };
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message, field } };
        let mut response = (self.status_code(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    /// Constraint violations are the client's doing (409/422/400); anything else is ours.
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            let constraint = db.constraint().unwrap_or_default().to_string();
            match db.code().as_deref() {
                Some("23505") => return ApiError::Conflict(conflict_message(&constraint)),
                Some("23503") => return ApiError::Conflict(format!("still referenced ({constraint})")),
                Some("23514") => return ApiError::invalid(constraint, "value not allowed"),
                // Invalid text (e.g. NUL bytes) or numeric out of range for a column.
                Some("22021") | Some("22P05") => {
                    return ApiError::bad_request("text contains characters that cannot be stored")
                }
                Some("22003") => return ApiError::bad_request("numeric value out of range"),
                _ => {}
            }
        }
        if let sqlx::Error::PoolTimedOut = e {
            return ApiError::Unavailable("database unavailable".into());
        }
        ApiError::Internal(e.into())
    }
}

fn conflict_message(constraint: &str) -> String {
    match constraint {
        "users_email_key" => "a user with this email already exists".into(),
        "teams_name_key" => "a team with this name already exists".into(),
        "models_pkey" => "a model with this id already exists".into(),
        "subscriptions_live_key" => "the user already holds a subscription for this model".into(),
        "team_members_pkey" => "the user is already a member of this team".into(),
        other => format!("conflicts with an existing record ({other})"),
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
