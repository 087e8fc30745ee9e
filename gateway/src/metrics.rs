//! The gateway's Prometheus metrics. Labels are bounded (model, status class, outcome, reason,
//! scope type); never a key, user or request id.

use std::time::Duration;

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::{outcome::Outcome, usage::UsageRow};

pub struct Metrics {
    registry: Registry,
    /// model, status class (2xx, 4xx, ...), outcome (success, rejected, upstream_error, interrupted).
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub upstream_latency: Histogram,
    pub ttfb: Histogram,
    pub prompt_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    /// USD, by model: the sum of the usage rows' costs, unrounded.
    pub spend_usd: CounterVec,
    /// reason, scope type.
    pub rejections: IntCounterVec,
    pub key_cache_hits: IntCounter,
    pub key_cache_misses: IntCounter,
    /// Entries in the key cache (set when scraped).
    pub key_cache_entries: IntGauge,
    pub key_cache_evictions: IntCounter,
    /// Client addresses the failed-authentication throttle tracks (set when scraped).
    pub auth_throttle_addresses: IntGauge,
    pub auth_throttle_evictions: IntCounter,
    pub usage_queue_depth: IntGauge,
    pub usage_rows_spooled: IntCounter,
    pub usage_rows_flushed: IntCounter,
    /// Rows inserted from the spool (also in `usage_rows_flushed`).
    pub usage_rows_replayed: IntCounter,
    /// Bytes of spool segments on disk.
    pub usage_spool_bytes: IntGauge,
    /// Rows waiting in memory because the spool could not take them (full disk, or at its cap).
    pub usage_spool_memory_rows: IntGauge,
    pub usage_spool_write_errors: IntCounter,
    /// Rows the usage journal could not take (they are queued all the same).
    pub usage_journal_errors: IntCounter,
    /// Spool lines that could not be read, moved to the quarantine file.
    pub usage_spool_corrupt_lines: IntCounter,
    /// Rows given up: more than the spool's memory holds while it cannot write.
    pub usage_rows_dropped: IntCounter,
    pub invalidations: IntCounterVec,
    pub redis_latency: Histogram,
    pub redis_errors: IntCounter,
    /// Limiter script calls sent to Redis (a coalesced batch is one).
    pub redis_round_trips: IntCounter,
    /// Requests admitted from quota leases, with no Redis call.
    pub lease_admissions: IntCounter,
    pub lease_grants: IntCounter,
    pub lease_returns: IntCounter,
    /// 1 while the limiter cannot reach Redis.
    pub fallback_active: IntGauge,
    /// Requests whose real cost exceeded what their budgets reserved.
    pub reservation_overruns: IntCounter,
    /// Requests admitted over a soft or monitor limit, by reason and scope type.
    pub limit_warnings: IntCounterVec,
    /// Settlements kept because Redis did not take them, waiting to be sent again.
    pub settlements_pending: IntGauge,
    /// Kept settlements Redis has since taken.
    pub settlements_retried: IntCounter,
    /// Kept settlements given up (queue full, or older than a reservation's lease): their spend
    /// comes back through the budget reconcile.
    pub settlements_dropped: IntCounter,
    /// Nano-USD the budget reconcile added to Redis budgets that had missed spend.
    pub budget_reconciled_nanos: IntCounter,
    /// Budgets the reconcile found short.
    pub budget_reconcile_corrections: IntCounter,
    /// Client connections open now.
    pub downstream_connections: IntGauge,
    /// Client connections the gateway closed, by reason (max_connections, header_timeout).
    pub downstream_rejections: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Metrics {
    // Metric names, help texts and labels are constants: registering them fails only on a
    // programming error, which the first test that builds `Metrics` finds.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("tollgate_gateway".into()), None).expect("registry");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())).expect("metric");
            registry.register(Box::new(h.clone())).expect("register");
            h
        };
        let latency = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Whole request latency, by model")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )
        .expect("metric");
        registry.register(Box::new(latency.clone())).expect("register");
        let fallback_active =
            IntGauge::new("limiter_fallback_active", "1 while limits are checked without Redis").expect("metric");
        registry.register(Box::new(fallback_active.clone())).expect("register");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let usage_queue_depth =
            IntGauge::new("usage_queue_depth", "Usage rows waiting for the writer").expect("metric");
        registry.register(Box::new(usage_queue_depth.clone())).expect("register");
        Self {
            requests: counter_vec(
                "requests_total",
                "Requests by model, status class and outcome",
                &["model", "status", "outcome"],
            ),
            latency,
            upstream_latency: histogram("upstream_duration_seconds", "Time from sending upstream to the last byte"),
            ttfb: histogram("time_to_first_byte_seconds", "Time from request to the first response byte"),
            prompt_tokens: counter_vec("prompt_tokens_total", "Prompt tokens by model", &["model"]),
            completion_tokens: counter_vec("completion_tokens_total", "Completion tokens by model", &["model"]),
            spend_usd: {
                let c = CounterVec::new(Opts::new("spend_usd_total", "Spend in USD by model, as billed"), &["model"])
                    .expect("metric");
                registry.register(Box::new(c.clone())).expect("register");
                c
            },
            rejections: counter_vec(
                "rejections_total",
                "Requests refused, by reason and scope type",
                &["reason", "scope"],
            ),
            key_cache_hits: counter("key_cache_hits_total", "Key lookups answered from the cache"),
            key_cache_misses: counter("key_cache_misses_total", "Key lookups that read PostgreSQL"),
            key_cache_entries: gauge("key_cache_entries", "Keys (known and unknown) in the key cache"),
            key_cache_evictions: counter("key_cache_evictions_total", "Keys dropped from the full key cache"),
            auth_throttle_addresses: gauge(
                "auth_throttle_addresses",
                "Client addresses tracked by the failed-authentication throttle",
            ),
            auth_throttle_evictions: counter(
                "auth_throttle_evictions_total",
                "Addresses dropped from the full failed-authentication throttle",
            ),
            usage_queue_depth,
            usage_rows_spooled: counter("usage_rows_spooled_total", "Usage rows written to the disk spool"),
            usage_rows_flushed: counter("usage_rows_flushed_total", "Usage rows written to PostgreSQL"),
            usage_rows_replayed: counter(
                "usage_rows_replayed_total",
                "Usage rows written to PostgreSQL from the spool",
            ),
            usage_spool_bytes: gauge("usage_spool_bytes", "Bytes of usage spool segments on disk"),
            usage_spool_memory_rows: gauge(
                "usage_spool_memory_rows",
                "Usage rows held in memory because the spool cannot write (full disk or spool_max_bytes)",
            ),
            usage_spool_write_errors: counter("usage_spool_write_errors_total", "Failed writes to the usage spool"),
            usage_journal_errors: counter(
                "usage_journal_errors_total",
                "Usage rows the journal could not take (a process killed before they are written loses them)",
            ),
            usage_spool_corrupt_lines: counter(
                "usage_spool_corrupt_lines_total",
                "Unreadable usage spool lines moved to quarantine-usage.jsonl",
            ),
            usage_rows_dropped: counter(
                "usage_rows_dropped_total",
                "Usage rows given up: the spool could not write them and its memory was full",
            ),
            invalidations: counter_vec("invalidations_total", "Invalidation messages received, by kind", &["kind"]),
            redis_latency: histogram("redis_duration_seconds", "Latency of the limiter's Redis round trips"),
            redis_errors: counter("redis_errors_total", "Limiter calls to Redis that failed or timed out"),
            redis_round_trips: counter(
                "redis_round_trips_total",
                "Limiter script calls sent to Redis (one coalesced batch counts once)",
            ),
            lease_admissions: counter(
                "lease_admissions_total",
                "Requests admitted from this replica's quota leases without a Redis call",
            ),
            lease_grants: counter("lease_grants_total", "Quota lease slices Redis granted to this replica"),
            lease_returns: counter("lease_returns_total", "Quota lease slices given back to Redis (expired or idle)"),
            fallback_active,
            reservation_overruns: counter(
                "reservation_overruns_total",
                "Requests that cost more than their budgets reserved (charged in full)",
            ),
            limit_warnings: counter_vec(
                "limit_warnings_total",
                "Requests admitted over a soft or monitor limit",
                &["reason", "scope"],
            ),
            settlements_pending: gauge("settlements_pending", "Settlements waiting for Redis to take them"),
            settlements_retried: counter("settlements_retried_total", "Settlements Redis took when sent again"),
            settlements_dropped: counter(
                "settlements_dropped_total",
                "Settlements given up (the budget reconcile restores their spend)",
            ),
            budget_reconciled_nanos: counter(
                "budget_reconciled_nano_usd_total",
                "Spend the budget reconcile added to Redis from PostgreSQL's rollups",
            ),
            budget_reconcile_corrections: counter(
                "budget_reconcile_corrections_total",
                "Budgets the reconcile found holding less than PostgreSQL's rollups",
            ),
            downstream_connections: gauge("downstream_connections", "Client connections open now"),
            downstream_rejections: counter_vec(
                "downstream_rejected_total",
                "Client connections closed by the gateway, by reason (max_connections, header_timeout)",
                &["reason"],
            ),
            registry,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// A finished request: its count and latencies, and the tokens and spend of its usage row.
    pub fn observe_request(
        &self,
        model: &str,
        status: u16,
        outcome: Outcome,
        elapsed: Duration,
        upstream: Option<Duration>,
        row: Option<&UsageRow>,
    ) {
        self.requests.with_label_values(&[model, status_class(status), outcome.as_str()]).inc();
        self.latency.with_label_values(&[model]).observe(elapsed.as_secs_f64());
        if let Some(upstream) = upstream {
            self.upstream_latency.observe(upstream.as_secs_f64());
        }
        if let Some(row) = row {
            self.prompt_tokens.with_label_values(&[model]).inc_by(row.prompt_tokens as u64);
            self.completion_tokens.with_label_values(&[model]).inc_by(row.completion_tokens as u64);
            // The row's own figure, unrounded, so that the counter and usage_logs agree.
            let usd = rust_decimal::prelude::ToPrimitive::to_f64(&row.cost).unwrap_or(0.0);
            self.spend_usd.with_label_values(&[model]).inc_by(usd.max(0.0));
        }
    }
}

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
