//! What the gateway reads from a request body and what the upstream receives of it.
//!
//! The body is parsed once, borrowing it: the top-level fields as raw JSON (the prompt itself is
//! never materialised), the messages only far enough to find images and audio. A body is refused
//! (400, naming the field) when it repeats a field (the gateway and the upstream could read
//! different values), carries a field the operator's policy denies (by default the ones that make
//! LiteLLM route, retry, mock or call elsewhere), or gives a known field the wrong type.
//!
//! What goes upstream is the client's body byte for byte but for two splices the gateway makes
//! itself: `model` replaced by the model's upstream name when it differs, and, on streams, one
//! `stream_options` with `include_usage: true` whatever the client sent.

use std::{borrow::Cow, collections::HashSet, fmt, ops::Range};

use bytes::{Bytes, BytesMut};
use pingora::{http::RequestHeader, proxy::Session};
use serde::{
    de::{MapAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// Most choices (`n`, `best_of`) one request may ask for.
pub const MAX_CHOICES: u64 = 128;
/// Most completion tokens one choice may ask for: far above any model's output, low enough that
/// no product of counts overflows.
pub const MAX_COMPLETION_TOKENS: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct RequestFacts {
    pub model: String,
    pub stream: bool,
    /// The client itself asked for the usage chunk.
    pub client_wants_usage: bool,
    /// The larger of `max_tokens` and `max_completion_tokens`, per choice.
    pub max_tokens: Option<u64>,
    /// Completions the upstream generates: the larger of `n` and `best_of`, at least 1.
    pub choices: u64,
    /// Text at four bytes a token, plus the allowance of each image and audio input.
    pub estimated_prompt_tokens: u64,
}

/// What the operator allows in a body, and how media inputs are counted.
#[derive(Debug, Clone, Default)]
pub struct BodyPolicy {
    /// Denied names (`name` or `metadata.<name>`), looked up per field on every request.
    denied: HashSet<String>,
    /// Denied prefixes (entries ending in `*`), without the `*`.
    denied_prefixes: Vec<String>,
    /// Tokens reserved for each image input.
    image_tokens: u64,
    /// Tokens reserved for each audio input.
    audio_tokens: u64,
}

impl BodyPolicy {
    /// `denied_fields`: a top-level name, `metadata.<name>`, or a prefix ending in `*`.
    pub fn new(denied_fields: &[String], image_tokens: u64, audio_tokens: u64) -> Self {
        let (prefixes, names): (Vec<&String>, Vec<&String>) = denied_fields.iter().partition(|d| d.ends_with('*'));
        Self {
            denied: names.into_iter().cloned().collect(),
            denied_prefixes: prefixes.into_iter().map(|p| p.trim_end_matches('*').to_string()).collect(),
            image_tokens,
            audio_tokens,
        }
    }

    fn denies(&self, path: &str) -> bool {
        self.denied.contains(path) || self.denied_prefixes.iter().any(|p| path.starts_with(p.as_str()))
    }
}

/// Where the fields the gateway may rewrite stand in the body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    model: Range<usize>,
    /// The value of `stream_options`, when present.
    stream_options: Option<Range<usize>>,
    /// `stream_options`' own fields besides `include_usage`, kept when it is rewritten.
    stream_option_fields: Vec<(String, Range<usize>)>,
    open_brace: usize,
}

/// The top-level fields in body order, with duplicates detected (escapes in names resolved).
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
                while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                    if fields.iter().any(|(n, _)| *n == name) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{name}`")));
                    }
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((name, value));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// A field as `T`, absent and `null` alike as `None`.
    fn typed<T: Deserialize<'a>>(&self, name: &str, expected: &str) -> Result<Option<T>, GatewayError> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| GatewayError::InvalidRequest(format!("`{name}` must be {expected}"))),
        }
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    image_url: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input_audio: Option<&'a RawValue>,
}

fn span(raw: &RawValue, body: &[u8]) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

fn invalid(message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(message.into())
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

/// Reads a body under `policy`: its facts and where its rewritable fields stand.
pub fn parse(body: &[u8], policy: &BodyPolicy) -> Result<(RequestFacts, Layout), GatewayError> {
    let fields: Fields =
        serde_json::from_slice(body).map_err(|e| invalid(format!("request body is not valid JSON: {e}")))?;
    for (name, value) in &fields.0 {
        if policy.denies(name) {
            return Err(invalid(format!("`{name}` is not accepted by this gateway")));
        }
        if name == "metadata" && value.get().starts_with('{') {
            let nested: Fields = serde_json::from_str(value.get()).map_err(|e| invalid(format!("`metadata`: {e}")))?;
            if let Some((inner, _)) = nested.0.iter().find(|(inner, _)| policy.denies(&format!("metadata.{inner}"))) {
                return Err(invalid(format!("`metadata.{inner}` is not accepted by this gateway")));
            }
        }
    }
    let model_raw = fields.get("model").ok_or_else(|| invalid("`model` is required"))?;
    let model: String = serde_json::from_str(model_raw.get()).map_err(|_| invalid("`model` must be a string"))?;
    if model.is_empty() {
        return Err(invalid("`model` must not be empty"));
    }
    let stream = fields.typed::<bool>("stream", "a boolean")?.unwrap_or(false);
    let count = |name: &str| fields.typed::<u64>(name, "a non-negative integer");
    let max_tokens = match (count("max_tokens")?, count("max_completion_tokens")?) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    if max_tokens.is_some_and(|m| m > MAX_COMPLETION_TOKENS) {
        return Err(invalid(format!(
            "`max_tokens` and `max_completion_tokens` must be at most {MAX_COMPLETION_TOKENS}"
        )));
    }
    let choices = count("n")?.unwrap_or(1).max(count("best_of")?.unwrap_or(1)).max(1);
    if choices > MAX_CHOICES {
        return Err(invalid(format!("`n` and `best_of` must be at most {MAX_CHOICES}")));
    }
    let mut layout = Layout {
        model: span(model_raw, body),
        open_brace: body.iter().position(|b| *b == b'{').unwrap_or(0),
        ..Layout::default()
    };
    let mut client_wants_usage = false;
    if let Some(raw) = fields.get("stream_options") {
        layout.stream_options = Some(span(raw, body));
        // `null`, `false` and `true` carry no options: replaced whole on a stream.
        if !matches!(raw.get(), "null" | "false" | "true") {
            let options: Fields =
                serde_json::from_str(raw.get()).map_err(|_| invalid("`stream_options` must be an object"))?;
            client_wants_usage = options.typed::<bool>("include_usage", "a boolean")?.unwrap_or(false);
            layout.stream_option_fields = options
                .0
                .iter()
                .filter(|(n, _)| n != "include_usage")
                .map(|(n, v)| (n.to_string(), span(v, body)))
                .collect();
        }
    }
    Ok((
        RequestFacts {
            model,
            stream,
            client_wants_usage,
            max_tokens,
            choices,
            estimated_prompt_tokens: estimate_prompt(body.len(), fields.get("messages"), policy)?,
        },
        layout,
    ))
}

/// Text at four bytes a token; an image or audio input counts its allowance instead of its bytes
/// (a URL is a few bytes, inline data far more than the model counts).
fn estimate_prompt(body_len: usize, messages: Option<&RawValue>, policy: &BodyPolicy) -> Result<u64, GatewayError> {
    // Most prompts carry no media: then the messages need no second parse.
    let has_media = |m: &&RawValue| m.get().contains("\"image_url\"") || m.get().contains("\"input_audio\"");
    let Some(messages) = messages.filter(|m| m.get().starts_with('[')).filter(has_media) else {
        return Ok(estimate_tokens(body_len));
    };
    let messages: Vec<Message> =
        serde_json::from_str(messages.get()).map_err(|e| invalid(format!("`messages`: {e}")))?;
    let (mut media_bytes, mut allowance) = (0usize, 0u64);
    for content in messages.iter().filter_map(|m| m.content).filter(|c| c.get().starts_with('[')) {
        let parts: Vec<Part> =
            serde_json::from_str(content.get()).map_err(|e| invalid(format!("`messages[].content`: {e}")))?;
        for part in parts {
            if let Some(image) = part.image_url {
                media_bytes += image.get().len();
                allowance += policy.image_tokens;
            }
            if let Some(audio) = part.input_audio {
                media_bytes += audio.get().len();
                allowance += policy.audio_tokens;
            }
        }
    }
    Ok(estimate_tokens(body_len.saturating_sub(media_bytes)) + allowance)
}

/// The body the upstream receives, when it is not the client's own: `model` set to
/// `upstream_model` and, on a stream, exactly one `stream_options` that asks for usage. `None`:
/// the client's body goes as it is.
pub fn upstream_body(body: &[u8], facts: &RequestFacts, layout: &Layout, upstream_model: &str) -> Option<Bytes> {
    let mut splices: Vec<(Range<usize>, Vec<u8>)> = Vec::new();
    if upstream_model != facts.model {
        splices.push((layout.model.clone(), serde_json::Value::from(upstream_model).to_string().into_bytes()));
    }
    if facts.stream && !facts.client_wants_usage {
        match &layout.stream_options {
            None => {
                let at = layout.open_brace + 1;
                splices.push((at..at, br#""stream_options":{"include_usage":true},"#.to_vec()));
            }
            Some(value) => {
                let mut options = b"{".to_vec();
                for (name, v) in &layout.stream_option_fields {
                    options.extend_from_slice(serde_json::Value::from(name.as_str()).to_string().as_bytes());
                    options.push(b':');
                    options.extend_from_slice(&body[v.clone()]);
                    options.push(b',');
                }
                options.extend_from_slice(br#""include_usage":true}"#);
                splices.push((value.clone(), options));
            }
        }
    }
    if splices.is_empty() {
        return None;
    }
    splices.sort_by_key(|(r, _)| r.start);
    let mut out = BytesMut::with_capacity(body.len() + 64);
    let mut at = 0;
    for (range, with) in splices {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(&with);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn policy() -> BodyPolicy {
        BodyPolicy::new(&["fallbacks".into(), "mock_*".into(), "metadata.tags".into()], 1000, 2000)
    }

    /// What the upstream receives for `body`.
    fn forwarded(body: &[u8], f: &RequestFacts, layout: &Layout, upstream_model: &str) -> Vec<u8> {
        upstream_body(body, f, layout, upstream_model).map_or_else(|| body.to_vec(), |b| b.to_vec())
    }

    fn facts(body: &[u8]) -> RequestFacts {
        parse(body, &policy()).unwrap().0
    }

    fn sent(body: &str, upstream_model: &str) -> Value {
        let (f, layout) = parse(body.as_bytes(), &policy()).unwrap();
        serde_json::from_slice(&forwarded(body.as_bytes(), &f, &layout, upstream_model)).unwrap()
    }

    #[test]
    fn reads_the_fields_that_matter() {
        let f = facts(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_completion_tokens":7}"#,
        );
        assert_eq!(f.model, "m");
        assert!(f.stream);
        assert!(!f.client_wants_usage);
        assert_eq!(f.max_tokens, Some(7));
        assert_eq!(f.choices, 1);
        assert!(f.estimated_prompt_tokens > 0);
        let f = facts(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(f.client_wants_usage);
    }

    #[test]
    fn the_larger_allowance_and_every_choice_count() {
        let f = facts(br#"{"model":"m","max_tokens":500,"max_completion_tokens":20,"n":3,"best_of":5}"#);
        assert_eq!((f.max_tokens, f.choices), (Some(500), 5));
        let f = facts(br#"{"model":"m","max_tokens":null,"n":0}"#);
        assert_eq!((f.max_tokens, f.choices), (None, 1));
    }

    #[test]
    fn images_and_audio_count_their_allowance_not_their_bytes() {
        let data = "A".repeat(400_000);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"what is this"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{data}"}}}},{{"type":"image_url","image_url":{{"url":"https://x/y.png"}}}},{{"type":"input_audio","input_audio":{{"data":"{data}","format":"wav"}}}}]}}]}}"#
        );
        let f = facts(body.as_bytes());
        assert!(f.estimated_prompt_tokens >= 2 * 1000 + 2000, "{}", f.estimated_prompt_tokens);
        assert!(f.estimated_prompt_tokens < 2 * 1000 + 2000 + 100, "{}", f.estimated_prompt_tokens);
    }

    #[test]
    fn bad_bodies_are_400_naming_the_field() {
        for (body, field) in [
            (&b"not json"[..], "JSON"),
            (br#"{"messages":[]}"#, "model"),
            (br#"{"model":5}"#, "model"),
            (br#"{"model":""}"#, "model"),
            (b"[1]", "JSON"),
            (br#"{"model":"m","model":"other"}"#, "duplicate field `model`"),
            (br#"{"model":"m","model":"other"}"#, "duplicate field `model`"),
            (br#"{"model":"m","fallbacks":["gpt-4"]}"#, "fallbacks"),
            (br#"{"model":"m","fallbacks":["gpt-4"]}"#, "fallbacks"),
            (br#"{"model":"m","mock_response":"hi"}"#, "mock_response"),
            (br#"{"model":"m","metadata":{"tags":["free"]}}"#, "metadata.tags"),
            (br#"{"model":"m","stream":"yes"}"#, "stream"),
            (br#"{"model":"m","max_tokens":-1}"#, "max_tokens"),
            (br#"{"model":"m","n":1000}"#, "n"),
            (br#"{"model":"m","max_tokens":18446744073709551615}"#, "max_tokens"),
            (br#"{"model":"m","stream":true,"stream_options":5}"#, "stream_options"),
        ] {
            let e = parse(body, &policy()).unwrap_err();
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(body));
            assert!(e.to_string().contains(field), "{} -> {e}", String::from_utf8_lossy(body));
        }
        assert!(parse(br#"{"model":"m","metadata":{"user_note":"ok"}}"#, &policy()).is_ok());
    }

    #[test]
    fn a_stream_sends_exactly_one_stream_options_that_asks_for_usage() {
        for body in [
            r#" {"model":"m","stream":true,"messages":[]}"#,
            r#"{"model":"m","stream":true,"stream_options":null}"#,
            r#"{"model":"m","stream":true,"stream_options":false}"#,
            r#"{"stream_options":{"include_usage":false},"model":"m","stream":true}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        ] {
            let (f, layout) = parse(body.as_bytes(), &policy()).unwrap();
            let out = forwarded(body.as_bytes(), &f, &layout, "m");
            let text = String::from_utf8(out.to_vec()).unwrap();
            assert_eq!(text.matches("stream_options").count(), 1, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true, "{text}");
            assert_eq!(v["model"], "m");
        }
        let v = sent(r#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#, "m");
        assert_eq!(v["stream_options"]["include_obfuscation"], false, "the client's other options are kept");
    }

    #[test]
    fn the_upstream_gets_the_models_upstream_name_and_otherwise_the_same_bytes() {
        let body = r#"{"model":"cheap", "messages":[{"role":"user","content":"hi"}]}"#;
        let v = sent(body, "provider/cheap-2024");
        assert_eq!(v["model"], "provider/cheap-2024");
        assert_eq!(v["messages"][0]["content"], "hi");
        let (f, layout) = parse(body.as_bytes(), &policy()).unwrap();
        assert_eq!(upstream_body(body.as_bytes(), &f, &layout, "cheap"), None, "nothing to change: byte for byte");
    }
}
