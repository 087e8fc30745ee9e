//! Prometheus metrics of the control API: requests by route / method / status, latency, model
//! sync runs. Routes are the matched templates, never raw paths, so ids never become labels.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::state::AppState;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub sync_runs: IntCounterVec,
    pub invalidations: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("tollgate_control_api".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route, method and status"),
            &["route", "method", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["route", "method"],
        )
        .expect("metric");
        let sync_runs =
            IntCounterVec::new(Opts::new("model_sync_runs_total", "Model sync runs by outcome"), &["outcome"])
                .expect("metric");
        let invalidations = IntCounterVec::new(
            Opts::new("invalidations_published_total", "Invalidation messages by outcome"),
            &["outcome"],
        )
        .expect("metric");
        for c in [&requests, &sync_runs, &invalidations] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        registry.register(Box::new(latency.clone())).expect("register");
        Self { registry, requests, latency, sync_runs, invalidations }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encode");
        String::from_utf8(buf).expect("utf8")
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

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
