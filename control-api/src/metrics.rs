//! Prometheus metrics of the control API: requests by route / method / status, latency, model
//! sync runs. Routes are the matched templates, never raw paths, so ids never become labels.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use tollgate_core::roles::Role;

use crate::{auth::Caller, error::ApiError, state::AppState};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub sync_runs: IntCounterVec,
    pub invalidations: IntCounterVec,
    /// Budget events by type and outcome: recorded (by the scanner), delivered, retried (an
    /// attempt failed, another follows), failed (given up after 24 hours).
    pub events: IntCounterVec,
    /// Events not delivered yet (the whole outbox's, as this replica last counted it).
    pub events_pending: IntGauge,
}

impl Metrics {
    /// Fails only on a malformed metric name, help or label set: a mistake that stops every start,
    /// never a request.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("tollgate_control_api".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route, method and status"),
            &["route", "method", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["route", "method"],
        )?;
        let sync_runs =
            IntCounterVec::new(Opts::new("model_sync_runs_total", "Model sync runs by outcome"), &["outcome"])?;
        let invalidations = IntCounterVec::new(
            Opts::new("invalidations_published_total", "Invalidation messages by outcome"),
            &["outcome"],
        )?;
        let events = IntCounterVec::new(
            Opts::new("events_total", "Budget events by type and outcome (recorded, delivered, retried, failed)"),
            &["type", "outcome"],
        )?;
        let events_pending = IntGauge::new("events_pending", "Budget events not delivered yet")?;
        registry.register(Box::new(events_pending.clone()))?;
        for c in [&requests, &sync_runs, &invalidations, &events] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(latency.clone()))?;
        Ok(Self { registry, requests, latency, sync_runs, invalidations, events, events_pending })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let response = next.run(req).await;
    let m = &state.metrics;
    m.latency.with_label_values(&[&route, &method]).observe(start.elapsed().as_secs_f64());
    m.requests.with_label_values(&[&route, &method, response.status().as_str()]).inc();
    response
}

/// `/metrics` on its own listener (`metrics_listen`): no credentials.
pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// `/metrics` on the API's own address: an admin or adminReadonly credential, like the API.
pub async fn render_for_admins(caller: Caller, state: State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if !matches!(caller.role(), Role::Admin | Role::AdminReadonly) {
        return Err(ApiError::forbidden("metrics are for admins"));
    }
    Ok(render(state).await)
}

/// The router of the separate metrics listener.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new().route("/metrics", axum::routing::get(render)).with_state(state)
}
