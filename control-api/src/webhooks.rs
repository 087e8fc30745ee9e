//! Webhook delivery from the `events` outbox: every replica runs a worker that claims due
//! events (`FOR UPDATE SKIP LOCKED`, so two replicas never claim the same one), POSTs each to
//! `webhook.url` signed with `x-tollgate-signature`, and records the outcome: a 2xx answer marks
//! the event delivered; anything else (a refused connection, a timeout, another status) schedules
//! another attempt after `retry_base_ms`, doubling up to an hour, until the event is 24 hours old,
//! when it is marked failed. A claim is a lease: the event's next attempt is moved past the
//! request's timeout, so an event whose replica died mid-delivery is sent again by another.
//! Delivery is therefore at least once; receivers deduplicate by `event_id`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::Sha256;
use sqlx::FromRow;
use uuid::Uuid;

use crate::{config::WebhookConfig, state::AppState};

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";
/// How long after an event it is still attempted; then a failed attempt marks it failed.
pub const RETRY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Events claimed per round.
const BATCH: i64 = 20;
/// How often a worker looks for due events (at most; sooner with a shorter retry base).
const POLL: Duration = Duration::from_secs(1);

/// The body a receiver gets (the documented event, nothing else).
#[derive(Debug, Clone, Serialize, FromRow, PartialEq)]
pub struct Payload {
    pub event_id: Uuid,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub scope: String,
    pub id: Uuid,
    pub threshold: Decimal,
    pub spent: Decimal,
    pub max_budget: Decimal,
    pub period: String,
}

/// The `x-tollgate-signature` value of `body` sent at `t` (unix seconds).
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length: new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before attempt `attempts + 1`, after `attempts` failed ones: `base`, doubling, at
/// most [`MAX_BACKOFF`].
pub fn backoff(base: Duration, attempts: i32) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 30) as u32;
    base.saturating_mul(1u32 << doublings).min(MAX_BACKOFF)
}

/// Runs forever: delivers due events when a URL is configured, and keeps the pending gauge.
pub async fn run(state: AppState, config: WebhookConfig) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(config.timeout_seconds))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tollgate-webhook/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "webhook client could not be built; events will not be delivered");
            return;
        }
    };
    let poll = POLL.min(Duration::from_millis(config.retry_base_ms)).max(Duration::from_millis(50));
    loop {
        let busy = match &config.url {
            Some(_) => match deliver_due(&state, &client, &config).await {
                Ok(n) => n as i64 == BATCH,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook delivery round failed");
                    false
                }
            },
            None => false,
        };
        if let Ok(pending) = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE status = 'pending'")
            .fetch_one(&state.db)
            .await
        {
            state.metrics.events_pending.set(pending);
        }
        if !busy {
            tokio::time::sleep(poll).await;
        }
    }
}

/// One round: claims up to [`BATCH`] due events, delivers them concurrently, records each
/// outcome. Returns how many were claimed.
pub async fn deliver_due(state: &AppState, client: &reqwest::Client, config: &WebhookConfig) -> sqlx::Result<usize> {
    let Some(url) = &config.url else { return Ok(0) };
    let secret = config.secret.clone().unwrap_or_default();
    // The lease: past the request's timeout, so that only a dead replica's claim is taken over.
    let lease = config.timeout_seconds as f64 * 2.0 + 5.0;
    let claimed: Vec<Payload> = sqlx::query_as(
        "UPDATE events SET attempts = attempts + 1, last_attempt_at = now(),
                           next_attempt_at = now() + make_interval(secs => $2)
         WHERE id IN (SELECT id FROM events WHERE status = 'pending' AND next_attempt_at <= now()
                      ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING id AS event_id, type, occurred_at, scope, scope_id AS id, threshold, spent, max_budget, period",
    )
    .bind(BATCH)
    .bind(lease)
    .fetch_all(&state.db)
    .await?;
    let sends = claimed.iter().map(|event| send(client, url.as_str(), secret.as_bytes(), event));
    let outcomes = futures::future::join_all(sends).await;
    for (event, outcome) in claimed.iter().zip(outcomes) {
        record(state, config, event, outcome).await?;
    }
    Ok(claimed.len())
}

/// POSTs one event; `Err` says why it was not accepted.
async fn send(client: &reqwest::Client, url: &str, secret: &[u8], event: &Payload) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let t = Utc::now().timestamp();
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature(secret, t, &body))
        .header("x-tollgate-event-id", event.event_id.to_string())
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "request failed"
            };
            format!("{kind}: {e}")
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

async fn record(
    state: &AppState,
    config: &WebhookConfig,
    event: &Payload,
    outcome: Result<(), String>,
) -> sqlx::Result<()> {
    let counter = |outcome: &str| state.metrics.events.with_label_values(&[event.kind.as_str(), outcome]).inc();
    match outcome {
        Ok(()) => {
            sqlx::query(
                "UPDATE events SET status = 'delivered', delivered_at = now(), last_error = NULL
                 WHERE id = $1 AND status = 'pending'",
            )
            .bind(event.event_id)
            .execute(&state.db)
            .await?;
            counter("delivered");
        }
        Err(error) => {
            let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM events WHERE id = $1")
                .bind(event.event_id)
                .fetch_one(&state.db)
                .await?;
            let wait = backoff(Duration::from_millis(config.retry_base_ms), attempts);
            let failed: Option<String> = sqlx::query_scalar(
                "UPDATE events SET last_error = $2,
                        status = CASE WHEN occurred_at + make_interval(secs => $4) <= now() THEN 'failed'
                                      ELSE 'pending' END,
                        next_attempt_at = now() + make_interval(secs => $3)
                 WHERE id = $1 AND status = 'pending' RETURNING status",
            )
            .bind(event.event_id)
            .bind(&error)
            .bind(wait.as_secs_f64())
            .bind(RETRY_WINDOW.as_secs_f64())
            .fetch_optional(&state.db)
            .await?;
            if failed.as_deref() == Some("failed") {
                tracing::warn!(event_id = %event.event_id, attempts, error, "webhook delivery given up after 24 hours");
                counter("failed");
            } else {
                tracing::info!(event_id = %event.event_id, attempts, error, retry_in = ?wait, "webhook delivery failed; will retry");
                counter("retried");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_t_and_hex_hmac_of_t_dot_body() {
        // The same HMAC computed by Python's hmac module (docs/api.md's receiver).
        assert_eq!(
            signature(b"whsec-test", 1_700_000_000, br#"{"event_id":"e"}"#),
            "t=1700000000,v1=28b615f0d9262993c9b9ffcb3fc85216cbc3fc2f906ae3acccff4f7954e22870"
        );
        let other = signature(b"another", 1_700_000_000, br#"{"event_id":"e"}"#);
        assert_ne!(other, signature(b"whsec-test", 1_700_000_000, br#"{"event_id":"e"}"#));
        assert_ne!(signature(b"whsec-test", 1_700_000_001, b"{}"), signature(b"whsec-test", 1_700_000_000, b"{}"));
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_an_hour() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff(base, 1), Duration::from_secs(10));
        assert_eq!(backoff(base, 2), Duration::from_secs(20));
        assert_eq!(backoff(base, 4), Duration::from_secs(80));
        assert_eq!(backoff(base, 20), MAX_BACKOFF);
        assert_eq!(backoff(base, i32::MAX), MAX_BACKOFF);
        assert_eq!(backoff(Duration::from_millis(50), 0), Duration::from_millis(50));
    }

    #[test]
    fn payload_has_exactly_the_documented_fields() {
        let p = Payload {
            event_id: Uuid::nil(),
            kind: "budget.threshold".into(),
            occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            scope: "key".into(),
            id: Uuid::nil(),
            threshold: Decimal::new(8, 1),
            spent: Decimal::new(81, 2),
            max_budget: Decimal::ONE,
            period: "m202612".into(),
        };
        let v = serde_json::to_value(&p).unwrap_or_default();
        let mut keys: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["event_id", "id", "max_budget", "occurred_at", "period", "scope", "spent", "threshold", "type"]
        );
        assert_eq!(v["threshold"], serde_json::json!(0.8));
        assert_eq!(v["type"], "budget.threshold");
    }
}
