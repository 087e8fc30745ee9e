//! Reads usage from responses as they pass: the `usage` object of a JSON body, or the SSE event
//! that carries it. SSE passes through event by event, never buffered beyond the event being
//! read; the usage event is removed when the client did not ask for it (the gateway asked on its
//! behalf). A stream that ends without usage is estimated from the text it carried.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use crate::request::{estimate_tokens, RequestFacts};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// Largest JSON response body kept whole to read its usage.
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;
/// Of a larger body, this much of its end is kept: OpenAI-shaped answers put `usage` last.
const JSON_TAIL: usize = 64 * 1024;

#[derive(Debug, Default)]
pub enum Meter {
    #[default]
    Off,
    Json(JsonMeter),
    Sse(SseMeter),
}

#[derive(Debug, Default)]
pub struct JsonMeter {
    /// The whole body while it fits `MAX_JSON_BODY`, then only its last `JSON_TAIL` bytes.
    kept: BytesMut,
    overflow: bool,
    /// Bytes seen in all.
    seen: u64,
}

#[derive(Debug, Default)]
pub struct SseMeter {
    strip_usage: bool,
    /// Bytes of an event not yet complete (held only while stripping).
    partial: BytesMut,
    /// Text of the event being scanned when not stripping (events may straddle chunks).
    scan: BytesMut,
    usage: Option<Usage>,
    /// Characters of generated text seen, for estimating an interrupted stream.
    streamed_chars: u64,
}

#[derive(Deserialize)]
struct UsageCarrier {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Vec<ChoiceText>,
}

#[derive(Deserialize)]
struct ChoiceText {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl Meter {
    pub fn json() -> Self {
        Meter::Json(JsonMeter::default())
    }

    pub fn sse(strip_usage: bool) -> Self {
        Meter::Sse(SseMeter { strip_usage, ..Default::default() })
    }

    /// The meter an admitted request's response needs: SSE for streams (stripping the usage
    /// event the gateway asked for on the client's behalf), JSON otherwise.
    pub fn for_request(facts: &RequestFacts) -> Self {
        if facts.stream {
            Meter::sse(!facts.client_wants_usage)
        } else {
            Meter::json()
        }
    }

    /// Observes one chunk on its way to the client; may rewrite it (SSE usage stripping).
    pub fn feed(&mut self, chunk: &mut Option<Bytes>, end_of_stream: bool) {
        match self {
            Meter::Off => {}
            Meter::Json(json) => {
                if let Some(c) = chunk.as_ref() {
                    json.feed(c);
                }
            }
            Meter::Sse(sse) => sse.feed(chunk, end_of_stream),
        }
    }

    /// The usage the upstream reported, if it reported one.
    pub fn reported(&self) -> Option<Usage> {
        match self {
            Meter::Off => None,
            Meter::Json(json) => json.usage(),
            Meter::Sse(sse) => sse.usage,
        }
    }

    /// Completion tokens estimated from what was answered (for answers without usage): the text
    /// of a stream, or the size of a JSON body.
    pub fn estimated_completion_tokens(&self) -> u64 {
        match self {
            Meter::Sse(sse) => estimate_tokens(sse.streamed_chars as usize),
            Meter::Json(json) => estimate_tokens(json.seen as usize),
            Meter::Off => 0,
        }
    }
}

impl JsonMeter {
    fn feed(&mut self, chunk: &[u8]) {
        self.seen += chunk.len() as u64;
        if !self.overflow && self.kept.len() + chunk.len() > MAX_JSON_BODY {
            self.overflow = true;
        }
        self.kept.extend_from_slice(chunk);
        if self.overflow && self.kept.len() > 2 * JSON_TAIL {
            let _ = self.kept.split_to(self.kept.len() - JSON_TAIL);
        }
    }

    fn usage(&self) -> Option<Usage> {
        if !self.overflow {
            return serde_json::from_slice::<UsageCarrier>(&self.kept).ok().and_then(|c| c.usage);
        }
        // Too large to keep whole: read the last `"usage": {...}` of the tail.
        let tail = &self.kept[..];
        let at = tail.windows(7).rposition(|w| w == b"\"usage\"")?;
        let rest = &tail[at + 7..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        let rest = rest[colon..].strip_prefix(b":")?;
        serde_json::Deserializer::from_slice(rest).into_iter::<Usage>().next()?.ok()
    }
}

impl SseMeter {
    fn feed(&mut self, chunk: &mut Option<Bytes>, end_of_stream: bool) {
        let Some(data) = chunk.as_ref() else {
            if end_of_stream && self.strip_usage && !self.partial.is_empty() {
                *chunk = Some(self.partial.split().freeze());
            }
            return;
        };
        if !self.strip_usage {
            // Pass the chunk through untouched; read its events on the side.
            self.scan.extend_from_slice(data);
            while let Some(end) = find_event_end(&self.scan) {
                let event = self.scan.split_to(end);
                self.observe(&event);
            }
            return;
        }
        self.partial.extend_from_slice(data);
        let mut out = BytesMut::with_capacity(self.partial.len());
        while let Some(end) = find_event_end(&self.partial) {
            let event = self.partial.split_to(end);
            if !self.observe(&event) {
                out.extend_from_slice(&event);
            }
        }
        if end_of_stream && !self.partial.is_empty() {
            out.extend_from_slice(&self.partial.split());
        }
        *chunk = Some(out.freeze());
    }

    /// Reads one complete event; returns true when it is the usage event.
    fn observe(&mut self, event: &[u8]) -> bool {
        let Some(payload) = data_payload(event) else { return false };
        if payload == b"[DONE]" || !payload.starts_with(b"{") {
            return false;
        }
        let Ok(carrier) = serde_json::from_slice::<UsageCarrier>(payload) else { return false };
        for c in &carrier.choices {
            let text = c.delta.as_ref().and_then(|d| d.content.as_deref()).or(c.text.as_deref());
            self.streamed_chars += text.map_or(0, |t| t.len() as u64);
        }
        match carrier.usage {
            Some(u) => {
                self.usage = Some(u);
                // OpenAI's usage event has no choices; LiteLLM's has one with an empty delta.
                // An event that also carries text or a finish reason is never removed.
                carrier.choices.iter().all(|c| {
                    c.delta.as_ref().and_then(|d| d.content.as_deref()).unwrap_or("").is_empty()
                        && c.text.as_deref().unwrap_or("").is_empty()
                        && c.finish_reason.is_none()
                })
            }
            None => false,
        }
    }
}

/// The end (exclusive) of the first complete event: after the first blank line, i.e. a line
/// ending (`\n` or `\r\n`) right after another, whichever endings a server mixes. A `\r` at the
/// end of `buf` is not a line ending yet, so where a chunk boundary falls changes nothing.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let mut previous_end = None;
    for (i, _) in buf.iter().enumerate().filter(|(_, b)| **b == b'\n') {
        let start = if i > 0 && buf[i - 1] == b'\r' { i - 1 } else { i };
        if previous_end == Some(start) {
            return Some(i + 1);
        }
        previous_end = Some(i + 1);
    }
    None
}

/// The `data:` payload of an event (single-line data, as OpenAI-compatible servers send).
fn data_payload(event: &[u8]) -> Option<&[u8]> {
    let line = event.split(|b| *b == b'\n').find(|l| l.starts_with(b"data:"))?;
    let mut payload = &line[5..];
    while let [b' ', rest @ ..] = payload {
        payload = rest;
    }
    while let [rest @ .., b'\r'] = payload {
        payload = rest;
    }
    Some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_USAGE: &str = include_str!("../../control-api/tests/fixtures/litellm/chat-stream-include-usage.sse");
    const NO_USAGE: &str = include_str!("../../control-api/tests/fixtures/litellm/chat-stream-no-usage.sse");

    /// Feeds `input` in chunks of `size` bytes; returns what the client receives.
    fn run(meter: &mut Meter, input: &str, size: usize) -> String {
        let mut out = Vec::new();
        let bytes = input.as_bytes();
        let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
        for (i, c) in chunks.iter().enumerate() {
            let mut chunk = Some(Bytes::copy_from_slice(c));
            meter.feed(&mut chunk, i + 1 == chunks.len());
            out.extend_from_slice(&chunk.unwrap_or_default());
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn litellm_usage_chunk_is_read_and_kept_when_asked() {
        for size in [1, 7, 64, 100_000] {
            let mut m = Meter::sse(false);
            let out = run(&mut m, WITH_USAGE, size);
            assert_eq!(out, WITH_USAGE);
            let u = m.reported().expect("usage");
            assert!(u.prompt_tokens > 0 && u.completion_tokens > 0, "{u:?}");
        }
    }

    #[test]
    fn usage_chunk_is_stripped_when_not_asked() {
        for size in [1, 5, 300, 100_000] {
            let mut m = Meter::sse(true);
            let out = run(&mut m, WITH_USAGE, size);
            assert!(m.reported().is_some());
            assert!(!out.contains("\"prompt_tokens\""), "usage chunk left in: {out}");
            assert!(out.ends_with("data: [DONE]\n\n"));
            assert_eq!(out.matches("data: ").count(), WITH_USAGE.matches("data: ").count() - 1);
        }
    }

    #[test]
    fn events_end_at_the_first_blank_line_whatever_the_line_endings() {
        // A `\r\n` event before a `\n` one: both are read, the usage of the second too.
        let input = "data: {\"choices\":[{\"delta\":{\"content\":\"ab\"}}]}\r\n\r\n\
                     data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n\
                     data: [DONE]\n\n";
        for size in [1, 3, 1000] {
            let mut m = Meter::sse(true);
            let out = run(&mut m, input, size);
            assert_eq!(m.reported(), Some(Usage { prompt_tokens: 4, completion_tokens: 2 }), "chunks of {size}");
            assert!(!out.contains("usage") && out.ends_with("data: [DONE]\n\n"), "{out}");
        }
        assert_eq!(find_event_end(b"a\n\r\nb"), Some(4));
        assert_eq!(find_event_end(b"a\r\n\r"), None, "a trailing \\r may be half of a \\r\\n");
    }

    #[test]
    fn stream_without_usage_is_estimated_from_text() {
        let mut m = Meter::sse(false);
        assert_eq!(run(&mut m, NO_USAGE, 13), NO_USAGE);
        assert_eq!(m.reported(), None);
        // "Hello from the mock provider" is 28 characters.
        assert_eq!(m.estimated_completion_tokens(), 7);
    }

    #[test]
    fn usage_of_a_json_body_over_the_buffer_is_read_from_its_tail() {
        let mut m = Meter::json();
        let filler = "x".repeat(1024 * 1024);
        let mut body = String::from(r#"{"id":"x","data":["#);
        for i in 0..20 {
            body.push_str(&format!("{}\"{filler}\"", if i > 0 { "," } else { "" }));
        }
        body.push_str(r#"],"usage": {"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#);
        run(&mut m, &body, 100_000);
        assert_eq!(m.reported(), Some(Usage { prompt_tokens: 12, completion_tokens: 3 }));
        assert!(m.estimated_completion_tokens() > 5_000_000);
    }

    #[test]
    fn json_usage() {
        let mut m = Meter::json();
        let body = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
        assert_eq!(run(&mut m, body, 10), body);
        assert_eq!(m.reported(), Some(Usage { prompt_tokens: 12, completion_tokens: 3 }));
    }
}
