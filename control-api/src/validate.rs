//! Field checks shared by the resources: text that PostgreSQL can store and people can read.

use crate::error::{ApiError, ApiResult};

/// Trimmed, non-empty, at most `max` characters, no control characters.
pub fn text(field: &str, value: &str, max: usize) -> ApiResult<String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    optional_text(field, v, max)
}

/// Like [`text`] but may be empty.
pub fn optional_text(field: &str, value: &str, max: usize) -> ApiResult<String> {
    let v = value.trim();
    if v.chars().count() > max {
        return Err(ApiError::invalid(field, format!("at most {max} characters")));
    }
    if v.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "must not contain control characters"));
    }
    Ok(v.to_string())
}

/// An identifier such as a model id: no whitespace or control characters.
pub fn identifier(field: &str, value: &str, max: usize) -> ApiResult<String> {
    let v = text(field, value, max)?;
    if v.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid(field, "must not contain whitespace"));
    }
    Ok(v)
}

pub fn email(field: &str, value: &str) -> ApiResult<String> {
    let v = text(field, value, 254)?;
    let ok = match v.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !v.chars().any(char::is_whitespace)
        }
        None => false,
    };
    if !ok {
        return Err(ApiError::invalid(field, "not an email address"));
    }
    Ok(v)
}

/// JSON metadata objects are bounded so that one request cannot store megabytes.
pub fn metadata(field: &str, value: &serde_json::Value) -> ApiResult<()> {
    if !value.is_object() {
        return Err(ApiError::invalid(field, "must be a JSON object"));
    }
    if value.to_string().len() > 16 * 1024 {
        return Err(ApiError::invalid(field, "at most 16 KiB"));
    }
    if value.to_string().contains("\\u0000") {
        return Err(ApiError::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}
