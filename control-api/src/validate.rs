//! Field checks shared by the resources: text that PostgreSQL can store and people can read.
//! Beside each check, the schema that says the same in the OpenAPI document ([`Name`],
//! [`ModelId`], ...: request fields name them with `#[schema(value_type = ...)]`), so that what a
//! client or a fuzzer reads there is what these functions enforce.

use utoipa::{
    openapi::{
        schema::{ObjectBuilder, Schema, Type},
        KnownFormat, RefOr, SchemaFormat,
    },
    PartialSchema, ToSchema,
};

use crate::error::{ApiError, ApiResult};

/// `char::is_control` (Unicode Cc), as a regex character range.
const CONTROL: &str = r"\u0000-\u001f\u007f-\u009f";
/// `char::is_whitespace` less what [`CONTROL`] already holds, as a regex character range.
const SPACE: &str = r"\u0020\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// A string schema of at most `max` characters matching `pattern`.
fn string_schema(max: usize, min: usize, pattern: String, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
        .pattern(Some(pattern))
        .description(Some(description))
        .into()
}

/// What [`text`] accepts, as stored: no control characters and no surrounding whitespace (which
/// [`text`] trims), not blank. The API also takes surrounding whitespace and trims it.
fn text_schema(max: usize, description: &str) -> RefOr<Schema> {
    let pattern = format!("^[^{CONTROL}{SPACE}]([^{CONTROL}]*[^{CONTROL}{SPACE}])?$");
    string_schema(max, 1, pattern, description)
}

/// What [`identifier`] accepts, as stored: no whitespace or control characters, not empty.
fn identifier_schema(max: usize, description: &str) -> RefOr<Schema> {
    string_schema(max, 1, format!("^[^{CONTROL}{SPACE}]+$"), description)
}

/// A name ([`text`], 200 characters).
pub struct Name;

impl PartialSchema for Name {
    fn schema() -> RefOr<Schema> {
        text_schema(200, "1-200 characters, not blank, no control characters; surrounding whitespace is trimmed.")
    }
}

impl ToSchema for Name {}

/// A description ([`optional_text`], 2000 characters, may be empty).
pub struct Description;

impl PartialSchema for Description {
    fn schema() -> RefOr<Schema> {
        let pattern = format!("^([^{CONTROL}{SPACE}]([^{CONTROL}]*[^{CONTROL}{SPACE}])?)?$");
        string_schema(2000, 0, pattern, "At most 2000 characters, no control characters; may be empty.")
    }
}

impl ToSchema for Description {}

/// A model id ([`identifier`], 256 characters).
pub struct ModelId;

impl PartialSchema for ModelId {
    fn schema() -> RefOr<Schema> {
        identifier_schema(256, "A model's id: 1-256 characters, no whitespace or control characters.")
    }
}

impl ToSchema for ModelId {}

/// The upstream's name of a model ([`identifier`], 512 characters).
pub struct UpstreamModel;

impl PartialSchema for UpstreamModel {
    fn schema() -> RefOr<Schema> {
        identifier_schema(
            512,
            "The upstream's name of the model: 1-512 characters, no whitespace or control characters.",
        )
    }
}

impl ToSchema for UpstreamModel {}

/// A provider's name ([`identifier`], 100 characters).
pub struct Provider;

impl PartialSchema for Provider {
    fn schema() -> RefOr<Schema> {
        identifier_schema(100, "1-100 characters, no whitespace or control characters.")
    }
}

impl ToSchema for Provider {}

/// An email address ([`email`]).
pub struct Email;

impl PartialSchema for Email {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Email)))
            .min_length(Some(3))
            .max_length(Some(254))
            .description(Some("An email address, at most 254 characters."))
            .into()
    }
}

impl ToSchema for Email {}

/// Why a budget was adjusted ([`text`], 500 characters).
pub struct AdjustmentReason;

impl PartialSchema for AdjustmentReason {
    fn schema() -> RefOr<Schema> {
        text_schema(500, "1-500 characters, not blank, no control characters; surrounding whitespace is trimmed.")
    }
}

impl ToSchema for AdjustmentReason {}

/// Free-form metadata ([`metadata`]).
pub struct Metadata;

impl PartialSchema for Metadata {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A JSON object of at most 16 KiB (as JSON), without NUL characters, its numbers within ±1e300.",
            ))
            .into()
    }
}

impl ToSchema for Metadata {}

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
    if has_huge_number(value) {
        return Err(ApiError::invalid(field, "numbers must lie within ±1e300"));
    }
    Ok(())
}

/// PostgreSQL's jsonb keeps numbers as decimals and writes them back in full: one near f64's
/// bounds (1.7976931348623157e308) comes back as digits that no longer parse as an f64, and the
/// stored row could not be read again. Such numbers are refused on the way in.
fn has_huge_number(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Number(n) => n.as_f64().is_some_and(|f| f.abs() > 1e300),
        Value::Array(items) => items.iter().any(has_huge_number),
        Value::Object(fields) => fields.values().any(has_huge_number),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn metadata_refuses_numbers_jsonb_cannot_give_back() {
        assert!(super::metadata("metadata", &json!({"a": [null, 1.7976931348623157e308]})).is_err());
        assert!(super::metadata("metadata", &json!({"a": {"b": -1e301}})).is_err());
        assert!(super::metadata("metadata", &json!({"a": 1e300, "b": [1, 2.5, "x"]})).is_ok());
    }
}
