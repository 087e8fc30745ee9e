//! Audit trail: one audit_logs row per successful write, written in the write's own transaction
//! so that a write and its audit row commit or roll back together. [`record`] is the only writer
//! of that table, so every row carries the same facts: who, from which request and address, what.
//!
//! What a client says about itself proves nothing, so the trail keeps it apart: the request id is
//! the server's own ([`request_ids`] gives every request one, and answers with it), the client's
//! `x-request-id` sits beside it; the address is the peer's unless the peer is a configured
//! trusted proxy ([`tollgate_core::net::client_address`]).

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, Request},
    http::{request::Parts, HeaderValue},
    middleware::Next,
    response::Response,
};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{FromRow, PgConnection};
use tollgate_core::net::{client_address, Cidr};
use utoipa::ToSchema;
use uuid::Uuid;

/// The request a change came in with, as far as the audit trail cares.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The server's own id for the request (also its `x-request-id` response header).
    pub request_id: Option<String>,
    /// The `x-request-id` the client sent, if any: recorded, never trusted.
    pub client_request_id: Option<String>,
    /// The client's address: the peer, or behind a trusted proxy the `X-Forwarded-For` hop it names.
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// The ids of one request, put in its extensions by [`request_ids`].
#[derive(Debug, Clone)]
struct RequestIds {
    server: String,
    client: Option<String>,
}

/// Longest client-supplied header value kept in the trail.
const MAX_HEADER_CHARS: usize = 256;

fn header_text(parts: &Parts, name: &str) -> Option<String> {
    let v = parts.headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| v.chars().take(MAX_HEADER_CHARS).collect())
}

/// Middleware: gives every request a server-generated id, keeps the client's `x-request-id`
/// aside for the trail, and answers with the server's id in `x-request-id`.
pub async fn request_ids(mut req: Request, next: Next) -> Response {
    let server = Uuid::new_v4().to_string();
    let client = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(MAX_HEADER_CHARS).collect());
    req.extensions_mut().insert(RequestIds { server: server.clone(), client });
    let mut response = next.run(req).await;
    if let Ok(value) = HeaderValue::from_str(&server) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

impl Origin {
    /// Where the request in `parts` came from, believing `X-Forwarded-For` only from `trusted`.
    pub fn of(parts: &Parts, trusted: &[Cidr]) -> Origin {
        let ids = parts.extensions.get::<RequestIds>();
        let forwarded = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| client_address(c.0.ip(), forwarded, trusted).to_string());
        Origin {
            request_id: ids.map(|i| i.server.clone()),
            client_request_id: ids.and_then(|i| i.client.clone()),
            ip,
            user_agent: header_text(parts, "user-agent"),
        }
    }
}

/// Who made a change, and from where.
#[derive(Debug, Clone)]
pub struct Actor<'a> {
    /// The user, when the actor is one (admin API keys are not users).
    pub id: Option<Uuid>,
    /// How the actor reads in the trail, e.g. `user:ada@example.com` or `admin-key:1a2b3c4d`.
    pub label: String,
    pub origin: &'a Origin,
}

/// What changed: an action such as `key.create`, its target, and the details worth keeping.
#[derive(Debug, Clone)]
pub struct Change {
    pub action: String,
    pub target_type: &'static str,
    pub target_id: String,
    pub details: Value,
}

impl Change {
    pub fn new(action: impl Into<String>, target_type: &'static str, target_id: impl ToString, details: Value) -> Self {
        Self { action: action.into(), target_type, target_id: target_id.to_string(), details }
    }
}

/// The fields of `before` and `after` (two serialisations of one resource) that differ, as
/// `{"field": {"before": .., "after": ..}}`; timestamps of the write itself are left out.
pub fn diff<B: Serialize, A: Serialize>(before: &B, after: &A) -> Value {
    let as_map = |v: Result<Value, serde_json::Error>| match v {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let (before, after) = (as_map(serde_json::to_value(before)), as_map(serde_json::to_value(after)));
    let mut changes = Map::new();
    for (field, new) in &after {
        let old = before.get(field).unwrap_or(&Value::Null);
        if old != new && field != "updated_at" {
            changes.insert(field.clone(), serde_json::json!({"before": old, "after": new}));
        }
    }
    Value::Object(changes)
}

pub async fn record(conn: &mut PgConnection, actor: &Actor<'_>, change: Change) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_logs (actor_id, actor, action, target_type, target_id, details, ip, request_id,
                                 client_request_id, user_agent)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(actor.id)
    .bind(&actor.label)
    .bind(change.action)
    .bind(change.target_type)
    .bind(change.target_id)
    .bind(change.details)
    .bind(&actor.origin.ip)
    .bind(&actor.origin.request_id)
    .bind(&actor.origin.client_request_id)
    .bind(&actor.origin.user_agent)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub actor_id: Option<Uuid>,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub details: Value,
    pub ip: Option<String>,
    /// The server's id of the request.
    pub request_id: Option<String>,
    /// The `x-request-id` the client sent (unverified).
    pub client_request_id: Option<String>,
    pub user_agent: Option<String>,
}
