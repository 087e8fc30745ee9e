//! CSV answers for the list and report endpoints: `?format=csv`, or `Accept: text/csv` without a
//! `format`. RFC 4180: a header line, CRLF line ends, a field quoted (`"`, inner quotes doubled)
//! when it holds a comma, a quote, CR or LF, or starts or ends with a space.
//!
//! Exports carry text users choose (key and user names, emails, user agents, reasons) and are
//! opened in spreadsheets, which run a cell that starts with `=`, `+`, `-`, `@`, a tab or a CR
//! as a formula: such a field gets a leading `'` (as OWASP advises against CSV injection), unless
//! it is a plain number (a credit's negative cost stays a number).
//!
//! A CSV answer is streamed: a task reads the rows (a cursor, or pages) and sends the text in
//! chunks through a small channel, so that a large export never sits in memory whole and a slow
//! client holds the reader back. An error before the first chunk is answered as the usual JSON
//! error; one after it aborts the body, so the client sees a broken transfer, never a short file
//! that looks complete.

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};

/// The answer's format.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Csv,
}

/// Whether the request asks for CSV: `format=csv`, or no `format` and an `Accept` header naming
/// `text/csv` (with a non-zero q) but not `application/json`.
pub fn wanted(format: Option<Format>, headers: &HeaderMap) -> bool {
    match format {
        Some(f) => f == Format::Csv,
        None => {
            let accept = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
            let ranges = accept.iter().flat_map(|v| v.split(',')).filter(|r| {
                let mut params = r.split(';').skip(1);
                !params.any(|p| p.trim().strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>() == Ok(0.0)))
            });
            let types: Vec<String> =
                ranges.map(|r| r.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()).collect();
            types.iter().any(|t| t == "text/csv") && !types.iter().any(|t| t == "application/json")
        }
    }
}

/// Whether a spreadsheet would read `value` as a formula.
fn formula_like(value: &str) -> bool {
    value.starts_with(['=', '+', '-', '@', '\t', '\r']) && value.parse::<f64>().is_err()
}

/// Appends `value` to `out` as one CSV field.
pub fn push_field(out: &mut String, value: &str) {
    let defused;
    let value = if formula_like(value) {
        defused = format!("'{value}");
        defused.as_str()
    } else {
        value
    };
    let quote = value.contains([',', '"', '\r', '\n']) || value.starts_with(' ') || value.ends_with(' ');
    if quote {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// Appends one CSV line (CRLF-terminated).
pub fn push_line<S: AsRef<str>>(out: &mut String, fields: &[S]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_field(out, f.as_ref());
    }
    out.push_str("\r\n");
}

/// Chunks of this size or more are sent as they fill.
const CHUNK: usize = 16 * 1024;

/// The producing side of a streamed CSV answer.
pub struct Writer {
    tx: mpsc::Sender<Result<Bytes, ApiError>>,
    buf: String,
}

/// Why a [`Writer`] stopped: the client went away (nothing more to do).
#[derive(Debug)]
pub struct Gone;

impl Writer {
    /// Appends a line; sends the buffer once it is large.
    pub async fn line<S: AsRef<str>>(&mut self, fields: &[S]) -> Result<(), Gone> {
        push_line(&mut self.buf, fields);
        if self.buf.len() >= CHUNK {
            let chunk = std::mem::take(&mut self.buf);
            self.tx.send(Ok(Bytes::from(chunk))).await.map_err(|_| Gone)?;
        }
        Ok(())
    }

    /// Sends what is left: the answer ends well.
    pub async fn finish(mut self) {
        if !self.buf.is_empty() {
            let _ = self.tx.send(Ok(Bytes::from(std::mem::take(&mut self.buf)))).await;
        }
    }

    /// Ends the answer with an error (a JSON error if nothing was sent yet).
    pub async fn fail(self, error: ApiError) {
        tracing::warn!(error = %error, "CSV export failed");
        let _ = self.tx.send(Err(error)).await;
    }
}

/// A streamed CSV answer: `produce` writes the lines (header first) into the [`Writer`] it is
/// given, in a task of its own. The first chunk is awaited here, so a failure before it is
/// answered as a JSON error. `filename` names the attachment.
pub async fn stream<F, Fut>(filename: &str, produce: F) -> ApiResult<Response>
where
    F: FnOnce(Writer) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(4);
    tokio::spawn(produce(Writer { tx, buf: String::new() }));
    let first = match rx.recv().await {
        Some(Ok(bytes)) => bytes,
        Some(Err(e)) => return Err(e),
        None => Bytes::new(),
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let body = futures::stream::StreamExt::chain(futures::stream::once(async move { Ok(first) }), rest);
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_as_rfc_4180_says() {
        let mut out = String::new();
        push_line(&mut out, &["plain", "a,b", "say \"hi\"", "two\nlines", "", " pad"]);
        assert_eq!(out, "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",,\" pad\"\r\n");
    }

    #[test]
    fn cells_a_spreadsheet_would_run_are_defused_and_numbers_are_not() {
        let mut out = String::new();
        push_line(
            &mut out,
            &["=HYPERLINK(\"http://x\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tx", "-0.500000", "+1", "a=b"],
        );
        assert_eq!(
            out,
            "\"'=HYPERLINK(\"\"http://x\"\")\",'+cmd|' /C calc'!A0,'-2+3,'@SUM(A1),'\tx,-0.500000,+1,a=b\r\n"
        );
    }

    #[test]
    fn accept_header_chooses_csv_only_without_json() {
        let mut h = HeaderMap::new();
        assert!(!wanted(None, &h));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/csv"));
        assert!(wanted(None, &h));
        assert!(!wanted(Some(Format::Json), &h));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/csv;q=0, */*"));
        assert!(!wanted(None, &h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/csv"));
        assert!(!wanted(None, &h));
        assert!(wanted(Some(Format::Csv), &HeaderMap::new()));
    }
}
