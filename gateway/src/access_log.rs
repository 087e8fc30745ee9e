//! The access log: one structured line per finished request (target `tollgate::access`, level
//! info), so that an operator can find a request after the fact without PostgreSQL. It names the
//! key by its public prefix, never the key; it carries no body, prompt or header.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::{context::RequestCtx, outcome::Outcome, usage::UsageRow};

/// Which requests get a line: all of them, none, or a share of the successful ones (a request
/// that ends in an error status or error kind is always logged).
pub struct AccessLog {
    enabled: bool,
    sample_rate: f64,
    seen: AtomicU64,
}

impl AccessLog {
    pub fn new(enabled: bool, sample_rate: f64) -> Self {
        Self { enabled, sample_rate: sample_rate.clamp(0.0, 1.0), seen: AtomicU64::new(0) }
    }

    /// Whether the next successful request is logged: exactly `sample_rate` of them, spread
    /// evenly (the n-th is logged when n x rate crosses a whole number).
    fn sampled(&self) -> bool {
        if self.sample_rate >= 1.0 {
            return true;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.sample_rate).floor() > (n * self.sample_rate).floor()
    }

    /// Writes the line of a finished request. `upstream`: time from sending upstream to the end.
    pub fn record(&self, ctx: &RequestCtx, outcome: Outcome, upstream: Option<Duration>, row: Option<&UsageRow>) {
        if !self.enabled {
            return;
        }
        let failed = ctx.status >= 400 || ctx.error_kind.is_some() || row.is_some_and(|r| r.error_kind.is_some());
        if !failed && !self.sampled() {
            return;
        }
        let auth = ctx.caller.as_deref();
        let error_kind = row.and_then(|r| r.error_kind.as_deref()).or(ctx.error_kind.map(|k| k.as_str()));
        tracing::info!(
            target: "tollgate::access",
            request_id = %ctx.request_id,
            client = ctx.client.map(|ip| ip.to_string()),
            endpoint = %ctx.endpoint,
            key_prefix = auth.map(|a| a.key_prefix.as_str()),
            key_id = auth.map(|a| a.key_id.to_string()),
            user_id = auth.map(|a| a.user_id.to_string()),
            team_id = auth.map(|a| a.team_id.to_string()),
            model = ctx.admitted.as_ref().map(|a| a.model.id.as_str()),
            stream = ctx.admitted.as_ref().map(|a| a.facts.stream),
            status = ctx.status,
            outcome = outcome.as_str(),
            error_kind,
            prompt_tokens = row.map(|r| r.prompt_tokens),
            completion_tokens = row.map(|r| r.completion_tokens),
            cost_usd = row.map(|r| r.cost.to_string()),
            latency_ms = millis(ctx.started.elapsed()),
            ttfb_ms = ctx.ttfb_ms,
            upstream_ms = upstream.map(millis),
            "request"
        );
    }
}

/// Milliseconds to the microsecond.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_logs_exactly_the_share() {
        for (rate, of_1000) in [(0.0, 0), (0.1, 100), (0.25, 250), (0.5, 500), (1.0, 1000)] {
            let log = AccessLog::new(true, rate);
            assert_eq!((0..1000).filter(|_| log.sampled()).count(), of_1000, "rate {rate}");
        }
    }
}
