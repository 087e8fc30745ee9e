//! Request extractors whose rejections are [`ApiError`]s, so that every bad input gets the JSON
//! error shape with the offending field named; [`Json`] also answers, and [`Created`] answers 201.

use axum::{
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::ApiError;

/// JSON body. In a request: 415 without a JSON content type, 400 for malformed JSON, 422 naming
/// the field for a wrong type, a missing or an unknown field. In a response: 200 with `T`.
/// A float with no fraction is taken for an integer (see [`parse_json`]).
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// 201 with the created resource.
pub struct Created<T>(pub T);

impl<T: Serialize> IntoResponse for Created<T> {
    fn into_response(self) -> Response {
        (StatusCode::CREATED, axum::Json(self.0)).into_response()
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("could not read body: {e}")))?;
        parse_json(&bytes).map(Json)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    integral_floats_to_integers(&mut value);
    match serde_path_to_error::deserialize(value) {
        Ok(v) => Ok(v),
        Err(err) => {
            let field = err.path().to_string();
            let message = strip_position(&err.into_inner().to_string());
            Err(ApiError::invalid(field_of(&field, &message), message))
        }
    }
}

/// JSON has one number type: `2.0` is the integer 2 (JSON Schema's `integer` says so too), yet
/// serde refuses a float for an integer field. Integral floats within i64 become integers, so that
/// `"rpm": 60.0` is 60 like `"rpm": 60`; a number field takes an integer all the same.
fn integral_floats_to_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    // 2^63: the first float beyond i64 (floats below it convert exactly).
    const I64_BOUND: f64 = 9_223_372_036_854_775_808.0;
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && (-I64_BOUND..I64_BOUND).contains(&f) {
                    // In range and integral: the cast is exact.
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

/// The dotted path of the field at fault. serde reports missing and unknown fields at the
/// enclosing object, naming the field only in its message.
fn field_of(path: &str, message: &str) -> String {
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split('`').next());
    match (path, named) {
        (".", Some(name)) => name.to_string(),
        (".", None) => "body".to_string(),
        (p, Some(name)) if !p.ends_with(name) => format!("{p}.{name}"),
        (p, _) => p.to_string(),
    }
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Path parameters: 400 naming the parameter when one does not parse (e.g. a bad UUID).
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::BadRequest { field: Some("path".into()), message: e.body_text() }),
        }
    }
}

/// Query string: 400 naming the parameter when one does not parse.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(Query).map_err(|e| ApiError::BadRequest {
            field: Some(e.path().to_string()),
            message: format!("invalid query parameter {}: {}", e.path(), e.inner()),
        })
    }
}
