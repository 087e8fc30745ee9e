//! What the gateway reads from a request body: the model, whether it streams and asked for
//! usage, the completion budget, and a prompt-token estimate. Parsed once, borrowing the body;
//! the messages themselves are skipped, not materialised.

use bytes::{Bytes, BytesMut};
use pingora::{http::RequestHeader, proxy::Session};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

#[derive(Debug, Clone, PartialEq)]
pub struct RequestFacts {
    pub model: String,
    pub stream: bool,
    /// The client itself asked for the usage chunk.
    pub client_wants_usage: bool,
    /// The body carries a `stream_options` object.
    pub has_stream_options: bool,
    pub max_tokens: Option<u64>,
    pub estimated_prompt_tokens: u64,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Whether the request says its body is JSON.
pub fn is_json(req: &RequestHeader) -> bool {
    req.headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The announced body length, when there is a valid one.
pub fn content_length(req: &RequestHeader) -> Option<usize> {
    req.headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

/// Reads a whole body of at most `limit` bytes (the client announced that much); a body that
/// runs longer is refused rather than read on.
pub async fn read_small_body(
    session: &mut Session,
    announced: usize,
    limit: usize,
) -> pingora::Result<Result<Bytes, GatewayError>> {
    let mut buf = BytesMut::with_capacity(announced);
    while let Some(chunk) = session.read_request_body().await? {
        buf.extend_from_slice(&chunk);
        if buf.len() > limit {
            return Ok(Err(GatewayError::InvalidRequest("body longer than its content-length".into())));
        }
    }
    Ok(Ok(buf.freeze()))
}

/// Roughly four bytes of JSON per token: cheap and close enough for an admission estimate.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

pub fn parse(body: &[u8]) -> Result<RequestFacts, GatewayError> {
    let fields: Fields = serde_json::from_slice(body)
        .map_err(|e| GatewayError::InvalidRequest(format!("request body is not valid JSON: {e}")))?;
    let model: String = match fields.model {
        None => return Err(GatewayError::InvalidRequest("`model` is required".into())),
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| GatewayError::InvalidRequest("`model` must be a string".into()))?,
    };
    if model.is_empty() {
        return Err(GatewayError::InvalidRequest("`model` must not be empty".into()));
    }
    Ok(RequestFacts {
        model,
        stream: fields.stream.unwrap_or(false),
        has_stream_options: fields.stream_options.is_some(),
        client_wants_usage: fields.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        max_tokens: fields.max_completion_tokens.or(fields.max_tokens),
        estimated_prompt_tokens: estimate_tokens(body.len()),
    })
}

/// The body to send upstream: unchanged, or, for a stream whose client did not ask for usage,
/// with `stream_options.include_usage = true` so that the gateway can meter it.
pub fn upstream_body(body: Bytes, facts: &RequestFacts) -> Bytes {
    if !facts.stream || facts.client_wants_usage {
        return body;
    }
    if !facts.has_stream_options {
        // Splice the field in after the opening brace: no re-serialisation of the prompt.
        if let Some(open) = body.iter().position(|b| *b == b'{') {
            let mut out = BytesMut::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            out.extend_from_slice(&body[open + 1..]);
            return out.freeze();
        }
        return body;
    }
    // stream_options present without include_usage: rewrite it properly (rare).
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut v) => {
            v["stream_options"]["include_usage"] = serde_json::Value::Bool(true);
            serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body)
        }
        Err(_) => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn reads_the_fields_that_matter() {
        let f = parse(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_completion_tokens":7}"#,
        )
        .unwrap();
        assert_eq!(f.model, "m");
        assert!(f.stream);
        assert!(!f.client_wants_usage);
        assert_eq!(f.max_tokens, Some(7));
        assert!(f.estimated_prompt_tokens > 0);
        let f = parse(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(f.client_wants_usage);
    }

    #[test]
    fn bad_bodies_are_400() {
        for body in [&b"not json"[..], br#"{"messages":[]}"#, br#"{"model":5}"#, br#"{"model":""}"#, b"[1]"] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn usage_is_requested_for_streams_only_when_missing() {
        let body = Bytes::from_static(br#" {"model":"m","stream":true,"messages":[]}"#);
        let f = parse(&body).unwrap();
        let out = upstream_body(body.clone(), &f);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");

        let body = Bytes::from_static(br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#);
        let v: Value = serde_json::from_slice(&upstream_body(body.clone(), &parse(&body).unwrap())).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);

        let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        assert_eq!(upstream_body(body.clone(), &parse(&body).unwrap()), body, "non-streams pass unchanged");
    }
}
