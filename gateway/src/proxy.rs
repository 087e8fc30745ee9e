//! The pingora `ProxyHttp` implementation: one request, phase by phase.
//!
//! - `request_filter`: route, authenticate, and for bodies that fit pingora's 64 KiB replay buffer
//!   read and judge the body here, so a refusal never reaches the upstream;
//! - `request_body_filter`: larger bodies are held back chunk by chunk and judged whole at the end
//!   (a refusal then abandons the half-sent upstream request); the judged body, with
//!   `stream_options.include_usage` injected where the gateway needs it, is released at once;
//! - `upstream_request_filter`: the upstream credential replaces the client's, identity headers
//!   are added, hop-by-hop and client credential headers removed;
//! - `response_*`: SSE passes through event by event while the usage is read (and the usage event
//!   removed when the client did not ask for it);
//! - `logging`: the usage row is priced and handed to the writer, off the client's path.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use pingora::{
    http::{RequestHeader, ResponseHeader},
    prelude::HttpPeer,
    proxy::{FailToProxy, ProxyHttp, Session},
    Error, ErrorType, Result,
};
use serde_json::json;
use uuid::Uuid;

use tollgate_core::limiter::{micros_round, Limiter, Reason, Reservation, Standing};

use crate::{
    auth::{key_hash, load_key, presented_key, AuthContext, Lookup},
    catalog::ModelInfo,
    error::GatewayError,
    limits,
    meter::{Meter, Usage},
    metrics::status_class,
    request::{self, RequestFacts},
    state::GatewayState,
    usage::UsageRow,
};

/// Bodies up to this size are read in `request_filter` (pingora replays up to 64 KiB).
const SMALL_BODY: usize = 60 * 1024;

/// Headers never forwarded upstream: hop-by-hop ones, the client's credentials, and identity
/// headers a client might try to forge.
const DROPPED_HEADERS: &[&str] = &[
    "authorization",
    "api-key",
    "x-api-key",
    "proxy-authorization",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "accept-encoding",
    "x-tollgate-user-id",
    "x-tollgate-team-id",
    "x-tollgate-key-id",
];

pub struct Gateway {
    pub state: Arc<GatewayState>,
}

#[derive(Default)]
enum BodyMode {
    #[default]
    None,
    /// Read and judged in `request_filter`; `Some` when the upstream gets a rewritten body.
    Judged(Option<Bytes>),
    /// Held back in `request_body_filter` until the end of the body.
    Collecting(BytesMut),
}

pub struct RequestCtx {
    request_id: String,
    started: Instant,
    started_at: DateTime<Utc>,
    endpoint: String,
    auth: Option<Arc<AuthContext>>,
    model: Option<Arc<ModelInfo>>,
    subscription_id: Option<Uuid>,
    facts: Option<RequestFacts>,
    body: BodyMode,
    /// A refusal decided in a filter, rendered by `fail_to_proxy`.
    refusal: Option<GatewayError>,
    meter: Meter,
    upstream_sent: Option<Instant>,
    ttfb_ms: Option<i32>,
    status: u16,
    error_kind: Option<&'static str>,
    /// What the limiter holds for this request, settled or released in `logging`.
    reservation: Option<Reservation>,
    /// The tightest scope's standing, for the `x-ratelimit-*` headers.
    standing: Option<Standing>,
    /// Soft limits this request went over.
    warnings: Vec<String>,
}

/// OpenAI's rate-limit headers (and ours for soft limits) for a standing.
fn rate_headers(standing: Option<&Standing>, warnings: &[String]) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    if let Some(s) = standing {
        if let (Some(limit), Some(remaining)) = (s.limit_requests, s.remaining_requests) {
            h.push(("x-ratelimit-limit-requests", limit.to_string()));
            h.push(("x-ratelimit-remaining-requests", remaining.to_string()));
            h.push(("x-ratelimit-reset-requests", format!("{}s", s.reset_requests_secs)));
        }
        if let (Some(limit), Some(remaining)) = (s.limit_tokens, s.remaining_tokens) {
            h.push(("x-ratelimit-limit-tokens", limit.to_string()));
            h.push(("x-ratelimit-remaining-tokens", remaining.to_string()));
            h.push(("x-ratelimit-reset-tokens", format!("{}s", s.reset_tokens_secs)));
        }
    }
    if !warnings.is_empty() {
        h.push(("x-tollgate-warning", warnings.join(", ")));
    }
    h
}

impl Gateway {
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: Bytes,
        retry_after: Option<u64>,
    ) -> Result<()> {
        ctx.status = status;
        let mut resp = ResponseHeader::build(status, Some(8))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some(secs) = retry_after {
            resp.insert_header("retry-after", secs.to_string())?;
        }
        for (name, value) in rate_headers(ctx.standing.as_ref(), &ctx.warnings) {
            resp.insert_header(name, value)?;
        }
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    async fn refuse(&self, session: &mut Session, ctx: &mut RequestCtx, e: GatewayError) -> Result<bool> {
        if !matches!(e, GatewayError::RateLimited { .. } | GatewayError::BudgetExhausted { .. }) {
            self.state.metrics.rejections.with_label_values(&[e.label(), "request"]).inc();
        }
        ctx.error_kind = Some(e.label());
        self.respond(session, ctx, e.status(), e.body(), e.retry_after()).await?;
        Ok(true)
    }

    /// A failed authentication: 401, or 429 once this address has failed too often.
    fn failed_auth(&self, session: &Session, e: GatewayError) -> GatewayError {
        let ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        match self.state.auth_failures.check_key(&ip) {
            Ok(()) => e,
            Err(_) => GatewayError::TooManyFailures,
        }
    }

    async fn authenticate(&self, session: &Session) -> std::result::Result<Arc<AuthContext>, GatewayError> {
        let s = &self.state;
        let key = presented_key(session.req_header()).ok_or(GatewayError::MissingKey)?;
        if !tollgate_core::keys::is_well_formed(key) {
            return Err(self.failed_auth(session, GatewayError::InvalidKey));
        }
        let hash = key_hash(key);
        let ctx = match s.keys.get(&hash) {
            Lookup::Hit(ctx) => {
                s.metrics.key_cache_hits.inc();
                ctx
            }
            Lookup::Unknown => {
                s.metrics.key_cache_hits.inc();
                return Err(self.failed_auth(session, GatewayError::InvalidKey));
            }
            Lookup::Miss => {
                s.metrics.key_cache_misses.inc();
                let db = s.db.clone();
                let loaded = s.support.spawn(async move { load_key(&db, hash).await }).await;
                match loaded {
                    Ok(Ok(Some(ctx))) => s.keys.insert(hash, Some(ctx)).expect("inserted"),
                    Ok(Ok(None)) => {
                        s.keys.insert(hash, None);
                        return Err(self.failed_auth(session, GatewayError::InvalidKey));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "key lookup failed");
                        // PostgreSQL is away: a key seen before keeps working; an unknown one
                        // cannot be judged, which is not the client's fault (503, never 401).
                        s.keys.get_stale(&hash).ok_or(GatewayError::AuthUnavailable)?
                    }
                    Err(_) => return Err(GatewayError::Internal),
                }
            }
        };
        ctx.check_usable(Utc::now()).map_err(|e| match e {
            GatewayError::RevokedKey | GatewayError::ExpiredKey => self.failed_auth(session, e),
            other => other,
        })?;
        Ok(ctx)
    }

    /// Judges a whole body: parse, authorize, and choose what the upstream receives.
    fn admit(&self, ctx: &mut RequestCtx, body: Bytes) -> std::result::Result<Bytes, GatewayError> {
        let facts = request::parse(&body)?;
        let auth = ctx.auth.as_ref().expect("authenticated before the body");
        let model = self
            .state
            .catalog
            .get(&facts.model)
            .filter(|m| m.usable())
            .ok_or_else(|| GatewayError::ModelNotAllowed(facts.model.clone()))?;
        let subscription = auth.entitlement(&facts.model)?;
        ctx.subscription_id = Some(subscription.id);
        ctx.model = Some(model);
        ctx.meter = if facts.stream { Meter::sse(!facts.client_wants_usage) } else { Meter::json() };
        let out = request::upstream_body(body, &facts);
        ctx.facts = Some(facts);
        Ok(out)
    }

    /// Step 4: reserve in every scope with limits, or refuse with 429 (or 503 under fail_closed
    /// when limits cannot be checked).
    async fn reserve(&self, ctx: &mut RequestCtx) -> std::result::Result<(), GatewayError> {
        let s = &self.state;
        let (Some(auth), Some(model), Some(facts)) = (&ctx.auth, &ctx.model, &ctx.facts) else { return Ok(()) };
        let Some(sub) = auth.subscriptions.iter().find(|x| Some(x.id) == ctx.subscription_id) else { return Ok(()) };
        let scopes = limits::scopes(auth, sub);
        if scopes.is_empty() {
            return Ok(());
        }
        let demand = limits::demand(&ctx.request_id, facts, model, &ctx.endpoint, s.config.default_max_tokens);
        let started = Instant::now();
        let limiter = &s.limiter.limiter;
        let result = limiter.reserve(&scopes, &demand).await;
        s.metrics.redis_latency.observe(started.elapsed().as_secs_f64());
        s.metrics.fallback_active.set(limiter.fallback_active() as i64);
        s.metrics.redis_errors.inc_by(limiter.take_failures());
        let admission = match result {
            Ok(a) => a,
            Err(e) => {
                // Only under fail_closed: otherwise the fallback answers.
                tracing::warn!(error = %e, "limits could not be checked");
                return Err(GatewayError::LimitsUnavailable);
            }
        };
        for (scope, reason) in &admission.warnings {
            s.metrics.limit_warnings.with_label_values(&[reason.as_str(), scope.as_str()]).inc();
            // Monitor-only limits count silently; soft ones tell the client.
            let soft = scopes
                .iter()
                .any(|x| x.kind == *scope && x.limits.enforcement == tollgate_core::limits::Enforcement::Soft);
            if soft {
                ctx.warnings.push(format!("{} limit exceeded on {}", reason.as_str(), scope.as_str()));
            }
        }
        ctx.standing = Some(admission.standing);
        if let Some(r) = admission.refusal {
            s.metrics.rejections.with_label_values(&[r.reason.as_str(), r.scope.as_str()]).inc();
            return Err(match r.reason {
                Reason::Budget => GatewayError::BudgetExhausted { scope: r.scope.as_str(), retry_after: r.retry_after },
                reason => GatewayError::RateLimited {
                    scope: r.scope.as_str(),
                    reason: reason.as_str(),
                    retry_after: r.retry_after,
                },
            });
        }
        ctx.reservation = admission.reservation;
        Ok(())
    }

    fn models_list(&self, auth: &AuthContext) -> Bytes {
        let data: Vec<_> = auth
            .usable_models()
            .filter(|m| self.state.catalog.get(m).is_some_and(|info| info.usable()))
            .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "tollgate"}))
            .collect();
        Bytes::from(json!({"object": "list", "data": data}).to_string())
    }

    fn usage_row(&self, ctx: &RequestCtx, failed: bool) -> Option<UsageRow> {
        let (auth, model, facts) = (ctx.auth.as_ref()?, ctx.model.as_ref()?, ctx.facts.as_ref()?);
        ctx.upstream_sent?;
        let ok = (200..300).contains(&ctx.status);
        let (usage, error_kind) = match ctx.meter.reported() {
            Some(u) => (u, if failed { Some("interrupted") } else { None }),
            None if ok && facts.stream => (
                // The stream ended without usage (interrupted, or an upstream that does not
                // report it): estimate from what was sent and streamed.
                Usage {
                    prompt_tokens: facts.estimated_prompt_tokens,
                    completion_tokens: ctx.meter.estimated_completion_tokens(),
                },
                Some(if failed { "interrupted" } else { "usage_missing" }),
            ),
            None if ok => (Usage::default(), Some("usage_missing")),
            None => (Usage::default(), Some(ctx.error_kind.unwrap_or("upstream_status"))),
        };
        Some(UsageRow {
            request_id: ctx.request_id.clone(),
            created_at: ctx.started_at,
            key_id: auth.key_id,
            user_id: auth.user_id,
            team_id: auth.team_id,
            model_id: model.id.clone(),
            subscription_id: ctx.subscription_id,
            endpoint: ctx.endpoint.clone(),
            status: ctx.status as i16,
            prompt_tokens: usage.prompt_tokens as i64,
            completion_tokens: usage.completion_tokens as i64,
            cost: model.cost(usage.prompt_tokens, usage.completion_tokens),
            latency_ms: ctx.started.elapsed().as_millis().min(i32::MAX as u128) as i32,
            ttfb_ms: ctx.ttfb_ms,
            stream: facts.stream,
            error_kind: error_kind.map(str::to_owned),
        })
    }
}

fn is_json(req: &RequestHeader) -> bool {
    req.headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

fn content_length(req: &RequestHeader) -> Option<usize> {
    req.headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: Uuid::new_v4().to_string(),
            started: Instant::now(),
            started_at: Utc::now(),
            endpoint: String::new(),
            auth: None,
            model: None,
            subscription_id: None,
            facts: None,
            body: BodyMode::None,
            refusal: None,
            meter: Meter::Off,
            upstream_sent: None,
            ttfb_ms: None,
            status: 0,
            error_kind: None,
            reservation: None,
            standing: None,
            warnings: Vec::new(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let (method, path) = {
            let req = session.req_header();
            (req.method.clone(), req.uri.path().to_string())
        };
        ctx.endpoint = path.clone();
        let models_call = method == "GET" && (path == "/v1/models" || path == "/models");
        if !models_call && !(method == "POST" && self.state.metered_paths.iter().any(|p| *p == path)) {
            return self.refuse(session, ctx, GatewayError::NotFound(path)).await;
        }
        let auth = match self.authenticate(session).await {
            Ok(auth) => auth,
            Err(e) => return self.refuse(session, ctx, e).await,
        };
        if models_call {
            let body = self.models_list(&auth);
            self.respond(session, ctx, 200, body, None).await?;
            return Ok(true);
        }
        ctx.auth = Some(auth);
        if !is_json(session.req_header()) {
            return self.refuse(session, ctx, GatewayError::UnsupportedContentType).await;
        }
        let max = self.state.config.max_body_bytes;
        match content_length(session.req_header()) {
            Some(n) if n > max => return self.refuse(session, ctx, GatewayError::TooLarge(max)).await,
            Some(n) if n <= SMALL_BODY => {
                session.enable_retry_buffering();
                let mut buf = BytesMut::with_capacity(n);
                while let Some(chunk) = session.read_request_body().await? {
                    buf.extend_from_slice(&chunk);
                    if buf.len() > SMALL_BODY {
                        return self
                            .refuse(
                                session,
                                ctx,
                                GatewayError::InvalidRequest("body longer than its content-length".into()),
                            )
                            .await;
                    }
                }
                let body = buf.freeze();
                let original_len = body.len();
                match self.admit(ctx, body) {
                    Ok(out) => ctx.body = BodyMode::Judged((out.len() != original_len).then_some(out)),
                    Err(e) => return self.refuse(session, ctx, e).await,
                }
                if let Err(e) = self.reserve(ctx).await {
                    return self.refuse(session, ctx, e).await;
                }
            }
            _ => ctx.body = BodyMode::Collecting(BytesMut::new()),
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        match &mut ctx.body {
            BodyMode::Judged(rewritten) => {
                // The replay buffer arrives here whole; swap in the rewritten body if any.
                if let Some(out) = rewritten.take() {
                    *body = Some(out);
                }
            }
            BodyMode::Collecting(buf) => {
                if let Some(chunk) = body.take() {
                    buf.extend_from_slice(&chunk);
                }
                let max = self.state.config.max_body_bytes;
                if buf.len() > max {
                    ctx.refusal = Some(GatewayError::TooLarge(max));
                    return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
                }
                if !end_of_stream {
                    *body = Some(Bytes::new());
                    return Ok(());
                }
                let whole = std::mem::take(buf).freeze();
                ctx.body = BodyMode::None;
                match self.admit(ctx, whole) {
                    Ok(out) => {
                        if let Err(e) = self.reserve(ctx).await {
                            let status = e.status();
                            ctx.refusal = Some(e);
                            return Error::e_explain(ErrorType::HTTPStatus(status), "request refused");
                        }
                        *body = Some(out)
                    }
                    Err(e) => {
                        let status = e.status();
                        ctx.refusal = Some(e);
                        return Error::e_explain(ErrorType::HTTPStatus(status), "request refused");
                    }
                }
            }
            BodyMode::None => {}
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let up = &self.state.upstream;
        let mut peer = HttpPeer::new(up.addr, false, up.sni.clone());
        let c = &self.state.config;
        peer.options.connection_timeout = Some(std::time::Duration::from_millis(c.upstream_connect_timeout_ms));
        peer.options.read_timeout = Some(std::time::Duration::from_secs(c.upstream_timeout_seconds));
        ctx.upstream_sent = Some(Instant::now());
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        for h in DROPPED_HEADERS {
            req.remove_header(*h);
        }
        let s = &self.state;
        if let Some(auth) = &s.upstream_authorization {
            req.insert_header("authorization", auth.as_str())?;
        }
        req.insert_header("host", s.upstream.authority.as_str())?;
        req.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some(auth) = &ctx.auth {
            req.insert_header("x-tollgate-user-id", auth.user_id.to_string())?;
            req.insert_header("x-tollgate-team-id", auth.team_id.to_string())?;
            req.insert_header("x-tollgate-key-id", auth.key_id.to_string())?;
        }
        if !s.upstream.base_path.is_empty() {
            let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let uri = format!("{}{pq}", s.upstream.base_path);
            req.set_uri(uri.parse().or_err(ErrorType::InternalError, "upstream uri")?);
        }
        match &ctx.body {
            BodyMode::Judged(Some(out)) => {
                req.insert_header("content-length", out.len().to_string())?;
            }
            BodyMode::Collecting(_) => {
                // The judged body may differ in length from what the client announced.
                req.remove_header("content-length");
                req.insert_header("transfer-encoding", "chunked")?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.status = resp.status.as_u16();
        ctx.ttfb_ms = Some(ctx.started.elapsed().as_millis().min(i32::MAX as u128) as i32);
        self.state.metrics.ttfb.observe(ctx.started.elapsed().as_secs_f64());
        let is_sse = resp
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let ok = resp.status.is_success();
        match (&ctx.meter, ok, is_sse) {
            (_, false, _) => ctx.meter = Meter::Off,
            (Meter::Sse(_), true, true) => {
                // Removing the usage event changes the length.
                resp.remove_header("content-length");
            }
            (Meter::Sse(_), true, false) => ctx.meter = Meter::json(),
            _ => {}
        }
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        for (name, value) in rate_headers(ctx.standing.as_ref(), &ctx.warnings) {
            resp.insert_header(name, value)?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        ctx.meter.feed(body, end_of_stream);
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        use ErrorType::*;
        let error = ctx.refusal.take().or_else(|| match e.etype() {
            ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
            | TLSHandshakeFailure | InvalidCert => Some(GatewayError::UpstreamUnreachable),
            ReadTimedout | WriteTimedout => Some(GatewayError::UpstreamTimeout),
            HTTPStatus(413) => Some(GatewayError::TooLarge(self.state.config.max_body_bytes)),
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => Some(GatewayError::UpstreamUnreachable),
                pingora::ErrorSource::Downstream => None,
                _ => Some(GatewayError::Internal),
            },
        });
        let Some(error) = error else {
            // The client went away: nothing to answer.
            ctx.error_kind = Some("client_disconnected");
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        };
        ctx.error_kind = Some(error.label());
        let code = error.status();
        if session.response_written().is_none() {
            if let Err(err) = self.respond(session, ctx, code, error.body(), error.retry_after()).await {
                tracing::debug!(error = %err, "could not answer the client");
            }
        } else {
            // Mid-response: the status already went out; the stream is cut.
            ctx.error_kind = Some("interrupted");
        }
        if matches!(error, GatewayError::UpstreamUnreachable | GatewayError::UpstreamTimeout) {
            ctx.status = code;
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(resp) = session.response_written() {
            ctx.status = resp.status.as_u16();
        }
        let s = &self.state;
        let model = ctx.model.as_ref().map(|m| m.id.as_str()).unwrap_or("none");
        let outcome = match (e.is_some(), ctx.upstream_sent.is_some(), ctx.status) {
            (_, false, 200..=299) => "answered",
            (_, false, _) => "rejected",
            (true, true, _) => "interrupted",
            (false, true, 200..=299) => "success",
            _ => "upstream_error",
        };
        s.metrics.requests.with_label_values(&[model, status_class(ctx.status), outcome]).inc();
        s.metrics.latency.with_label_values(&[model]).observe(ctx.started.elapsed().as_secs_f64());
        if let Some(sent) = ctx.upstream_sent {
            s.metrics.upstream_latency.observe(sent.elapsed().as_secs_f64());
        }
        let row = self.usage_row(ctx, e.is_some());
        if let Some(reservation) = ctx.reservation.take() {
            let limiter = s.limiter.limiter.clone();
            // Off the client's path: the response is already out.
            let used = row
                .as_ref()
                .filter(|_| ctx.ttfb_ms.is_some())
                .map(|r| ((r.prompt_tokens + r.completion_tokens) as u64, micros_round(r.cost)));
            s.support.spawn(async move {
                let result = match used {
                    Some((tokens, cost)) => limiter.settle(&reservation, tokens, cost).await,
                    // The upstream never answered: give everything back.
                    None => limiter.release(&reservation).await,
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "settlement failed; the reservation's lease will return it");
                }
            });
        }
        if let Some(row) = row {
            s.metrics.prompt_tokens.with_label_values(&[model]).inc_by(row.prompt_tokens as u64);
            s.metrics.completion_tokens.with_label_values(&[model]).inc_by(row.completion_tokens as u64);
            let micros = (row.cost * rust_decimal::Decimal::from(1_000_000)).trunc();
            s.metrics.spend_micros.with_label_values(&[model]).inc_by(micros.try_into().unwrap_or(0u64));
            s.usage.record(row);
        }
    }
}

use pingora::OrErr;
