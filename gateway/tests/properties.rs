//! Properties of what the gateway reads from untrusted bytes, over generated inputs: the SSE and
//! JSON meters, the request-body parser and the key extraction never panic on garbage, and a
//! stream split at any bytes meters the same usage, passes the same bytes and estimates the
//! same text as the stream unsplit.

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use pingora::http::RequestHeader;
use proptest::{collection::vec, prelude::*};
use serde_json::{json, Value};
use tollgate_gateway::{
    auth::presented_key,
    meter::{Meter, Usage},
    request::{parse, upstream_body, BodyPolicy},
};

/// Feeds `input` cut at `cuts` (offsets, any order); returns what the client receives.
fn feed(meter: &mut Meter, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    at.extend([0, input.len()]);
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    for (i, w) in at.windows(2).enumerate() {
        let mut chunk = Some(Bytes::copy_from_slice(&input[w[0]..w[1]]));
        meter.feed(&mut chunk, i + 2 == at.len());
        out.extend_from_slice(&chunk.unwrap_or_default());
    }
    if at.len() < 2 {
        let mut chunk = None;
        meter.feed(&mut chunk, true);
        out.extend_from_slice(&chunk.unwrap_or_default());
    }
    out
}

/// One SSE event with `payload` as its data line, ended by a blank line in `eol` line endings.
fn event(payload: &Value, eol: &str) -> String {
    format!("data: {payload}{eol}{eol}")
}

/// A chat stream: text events, then (maybe) the usage event, then `[DONE]`; each event ends in
/// `\n` or `\r\n` line endings as `crlf` says. Returns the stream and the stream without its
/// usage event.
fn stream(texts: &[String], usage: Option<(u64, u64)>, crlf: &[bool]) -> (String, String) {
    let eol = |i: usize| if crlf.get(i).copied().unwrap_or(false) { "\r\n" } else { "\n" };
    let mut whole = String::new();
    let mut stripped = String::new();
    for (i, t) in texts.iter().enumerate() {
        let e = event(
            &json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": t}}]}),
            eol(i),
        );
        whole.push_str(&e);
        stripped.push_str(&e);
    }
    if let Some((p, c)) = usage {
        whole.push_str(&event(
            &json!({"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c}}),
            eol(texts.len()),
        ));
    }
    let done = format!("data: [DONE]{0}{0}", eol(texts.len() + 1));
    whole.push_str(&done);
    stripped.push_str(&done);
    (whole, stripped)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_stream_split_anywhere_meters_as_unsplit(
        texts in vec("[ -~é😀\\n]{0,12}", 0..6),
        usage in proptest::option::of((0u64..100_000, 0u64..100_000)),
        crlf in vec(any::<bool>(), 8),
        cuts in vec(any::<usize>(), 0..12),
        strip in any::<bool>(),
    ) {
        let (whole, stripped) = stream(&texts, usage, &crlf);
        let mut unsplit = Meter::sse(strip);
        let unsplit_out = feed(&mut unsplit, whole.as_bytes(), &[]);
        let mut split = Meter::sse(strip);
        let split_out = feed(&mut split, whole.as_bytes(), &cuts);

        let expected = usage.map(|(p, c)| Usage { prompt_tokens: p, completion_tokens: c });
        prop_assert_eq!(unsplit.reported(), expected);
        prop_assert_eq!(split.reported(), expected);
        prop_assert_eq!(split.estimated_completion_tokens(), unsplit.estimated_completion_tokens());
        let chars: usize = texts.iter().map(String::len).sum();
        prop_assert_eq!(split.estimated_completion_tokens(), (chars as u64).div_ceil(4));
        // The client gets the stream as sent, less the usage event when it did not ask for it.
        let want = if strip { stripped.as_bytes() } else { whole.as_bytes() };
        prop_assert_eq!(&split_out[..], want);
        prop_assert_eq!(&unsplit_out[..], want);
    }

    #[test]
    fn garbage_never_panics_a_meter(input in vec(any::<u8>(), 0..2048), cuts in vec(any::<usize>(), 0..16)) {
        for mut meter in [Meter::sse(true), Meter::sse(false), Meter::json()] {
            let out = feed(&mut meter, &input, &cuts);
            let _ = (meter.reported(), meter.estimated_completion_tokens());
            if !matches!(meter, Meter::Sse(_)) {
                prop_assert_eq!(out, input.clone());
            }
        }
    }

    #[test]
    fn sse_like_garbage_never_panics_and_passes_whole_when_not_stripping(
        pieces in vec(prop_oneof![
            Just("data: ".to_string()), Just("\n".to_string()), Just("\r\n".to_string()), Just("\r".to_string()),
            Just("{\"usage\":{\"prompt_tokens\":1}}".to_string()), Just("{\"choices\":[{\"delta\":{\"content\":\"x\"}}]}".to_string()),
            Just("[DONE]".to_string()), "[ -~]{0,8}",
        ], 0..40),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let input = pieces.concat();
        let mut keep = Meter::sse(false);
        prop_assert_eq!(feed(&mut keep, input.as_bytes(), &cuts), input.as_bytes().to_vec());
        let mut strip = Meter::sse(true);
        let out = feed(&mut strip, input.as_bytes(), &cuts);
        prop_assert!(out.len() <= input.len());
    }

    #[test]
    fn any_body_is_judged_without_panicking(body in vec(any::<u8>(), 0..512)) {
        let policy = BodyPolicy::new(&["fallbacks".to_string(), "mock_*".to_string()], 2000, 2000);
        if let Ok((facts, layout)) = parse(&body, &policy) {
            let _ = upstream_body(&body, &facts, &layout, "upstream");
        }
    }

    #[test]
    fn any_json_body_is_judged_and_rewritten_to_valid_json(value in json_value(), model in "[a-z/.-]{1,12}") {
        let mut value = value;
        if let Value::Object(map) = &mut value {
            map.insert("model".into(), Value::from(model.clone()));
        }
        let body = serde_json::to_vec(&value).unwrap();
        let policy = BodyPolicy::new(&[], 2000, 2000);
        if let Ok((facts, layout)) = parse(&body, &policy) {
            prop_assert_eq!(&facts.model, &model);
            let out = upstream_body(&body, &facts, &layout, "provider/other").unwrap_or_else(|| Bytes::from(body.clone()));
            let sent: Value = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(&sent["model"], "provider/other");
            if facts.stream && !facts.client_wants_usage {
                prop_assert_eq!(&sent["stream_options"]["include_usage"], true);
            }
        }
    }

    #[test]
    fn any_credential_header_is_read_without_panicking(value in vec(any::<u8>(), 0..96), name in prop_oneof![
        Just("authorization"), Just("api-key"), Just("x-api-key"),
    ]) {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        // Bytes a header cannot hold are refused here, as the HTTP parser would.
        let _ = req.insert_header(name, &value[..]);
        if let Some(key) = presented_key(&req) {
            let _ = tollgate_core::keys::is_well_formed(key);
            let _ = tollgate_core::keys::display_prefix(key);
        }
    }
}

/// JSON values shaped like chat requests: known fields with values of any type, and others.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[ -~é]{0,10}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::from),
            vec(("[a-z_]{1,8}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    let field = prop_oneof![
        Just("stream"),
        Just("stream_options"),
        Just("max_tokens"),
        Just("max_completion_tokens"),
        Just("n"),
        Just("best_of"),
        Just("messages"),
        Just("input"),
        Just("prompt"),
        Just("metadata"),
        Just("temperature"),
    ];
    vec((field, value), 0..6).prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}
