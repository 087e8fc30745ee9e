//! What the gateway knows about one request as it moves through the proxy's phases. Facts are
//! set once, when they become known: the caller after authentication, [`Admitted`] when the body
//! has been judged and the request authorized; later phases read them, never re-derive them.

use std::{net::IpAddr, sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    admission::Admitted, auth::AuthContext, error::GatewayError, limits::RateHeaders, meter::Meter, outcome::ErrorKind,
};

/// How the request body reaches the upstream.
#[derive(Debug, Default)]
pub enum BodyMode {
    /// No body has been judged (yet).
    #[default]
    None,
    /// Read and judged in `request_filter`; `Some` when the upstream gets a rewritten body.
    Judged(Option<Bytes>),
    /// Held back in `request_body_filter` until the end of the body.
    Collecting(BytesMut),
}

pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    pub started_at: DateTime<Utc>,
    pub endpoint: String,
    /// The client's address (`X-Forwarded-For` only from a trusted proxy).
    pub client: Option<IpAddr>,
    /// The authenticated caller (known before the body is judged).
    pub caller: Option<Arc<AuthContext>>,
    /// Set once, when the request has been admitted.
    pub admitted: Option<Admitted>,
    pub body: BodyMode,
    /// A refusal decided in a filter, rendered by `fail_to_proxy`.
    pub refusal: Option<GatewayError>,
    pub meter: Meter,
    pub upstream_sent: Option<Instant>,
    /// Times the upstream request was sent again (a stale pooled connection).
    pub upstream_retries: u8,
    /// Upstream addresses tried after one refused the connection.
    pub connect_failovers: u8,
    pub ttfb_ms: Option<i32>,
    pub status: u16,
    pub error_kind: Option<ErrorKind>,
    /// What the limiter said, for the `x-ratelimit-*` and warning headers.
    pub rate: RateHeaders,
}

impl RequestCtx {
    pub fn new() -> Self {
        Self {
            request_id: Uuid::new_v4().to_string(),
            started: Instant::now(),
            started_at: Utc::now(),
            endpoint: String::new(),
            client: None,
            caller: None,
            admitted: None,
            body: BodyMode::None,
            refusal: None,
            meter: Meter::Off,
            upstream_sent: None,
            upstream_retries: 0,
            connect_failovers: 0,
            ttfb_ms: None,
            status: 0,
            error_kind: None,
            rate: RateHeaders::default(),
        }
    }

    /// The model label of this request's metrics.
    pub fn model_label(&self) -> &str {
        self.admitted.as_ref().map(|a| a.model.id.as_str()).unwrap_or("none")
    }

    /// Milliseconds since the request arrived, for usage rows.
    pub fn elapsed_ms(&self) -> i32 {
        self.started.elapsed().as_millis().min(i32::MAX as u128) as i32
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
