//! The pingora `ProxyHttp` implementation: one request, phase by phase. Each phase is a call
//! into the module that owns its logic; this file is the glue between pingora's hooks.
//!
//! - `request_filter`: route, authenticate ([`auth`]), and for bodies that fit pingora's 64 KiB
//!   replay buffer read and judge the body here ([`admission`], [`limits`]), so a refusal never
//!   reaches the upstream;
//! - `request_body_filter`: larger bodies are held back chunk by chunk and judged whole at the end
//!   (a refusal then abandons the half-sent upstream request); the judged body, with
//!   `stream_options.include_usage` injected where the gateway needs it, is released at once;
//! - `upstream_peer` / `upstream_request_filter`: what the upstream receives ([`upstream`]);
//! - `response_*`: SSE passes through event by event while the usage is read ([`meter`]);
//! - `logging`: settlement ([`limits::settle`]), metrics, and the usage row ([`usage`]), off the
//!   client's path.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::{
    http::{RequestHeader, ResponseHeader},
    prelude::HttpPeer,
    proxy::{FailToProxy, ProxyHttp, Session},
    Error, ErrorType, Result, RetryType,
};

use tollgate_core::limiter::nanos_round;

use crate::{
    admission, auth,
    context::{BodyMode, RequestCtx},
    error::GatewayError,
    limits,
    meter::Meter,
    outcome::{ErrorKind, Outcome},
    request,
    state::GatewayState,
    upstream::Upstream,
    usage::UsageRow,
};

/// Bodies up to this size are read in `request_filter` (pingora replays up to 64 KiB).
const SMALL_BODY: usize = 60 * 1024;

pub struct Gateway {
    pub state: Arc<GatewayState>,
}

impl Gateway {
    /// Writes a whole JSON answer of the gateway's own.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: Bytes,
        headers: Vec<(&'static str, String)>,
    ) -> Result<()> {
        ctx.status = status;
        let mut resp = ResponseHeader::build(status, Some(8))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        for (name, value) in headers.into_iter().chain(ctx.rate.headers()) {
            resp.insert_header(name, value)?;
        }
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// Answers a refusal decided before any upstream contact; the request ends here.
    async fn refuse(&self, session: &mut Session, ctx: &mut RequestCtx, e: GatewayError) -> Result<bool> {
        self.count_refusal(&e);
        ctx.error_kind = Some(ErrorKind::Answered { code: e.label() });
        self.respond(session, ctx, e.status(), e.body(), e.headers()).await?;
        Ok(true)
    }

    /// A refusal decided while the body streams upstream: `fail_to_proxy` renders it and the
    /// half-sent upstream request is abandoned.
    fn refuse_mid_body(&self, ctx: &mut RequestCtx, e: GatewayError) -> Result<()> {
        self.count_refusal(&e);
        let status = e.status();
        ctx.refusal = Some(e);
        Error::e_explain(ErrorType::HTTPStatus(status), "request refused")
    }

    fn count_refusal(&self, e: &GatewayError) {
        if !e.counted_by_limiter() {
            self.state.metrics.rejections.with_label_values(&[e.label(), "request"]).inc();
        }
    }

    /// Steps 3 and 4, shared by both body paths: judge the whole body, then reserve its limits.
    /// Returns the body the upstream gets instead of the client's, if any.
    async fn admit_and_reserve(
        &self,
        ctx: &mut RequestCtx,
        body: &[u8],
    ) -> std::result::Result<Option<Bytes>, GatewayError> {
        let caller = ctx.caller.as_ref().ok_or(GatewayError::Internal)?;
        let (admitted, out) = admission::admit(&self.state, caller, &ctx.endpoint, body)?;
        ctx.meter = Meter::for_request(&admitted.facts);
        let admitted = ctx.admitted.insert(admitted);
        admitted.reservation = limits::reserve(&self.state, &ctx.request_id, admitted, &mut ctx.rate).await?;
        Ok(out)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let route = if path == "/v1/models" || path == "/models" {
            Some("GET")
        } else if self.state.metered_paths.contains(&path) {
            Some("POST")
        } else {
            None
        };
        ctx.endpoint = path.clone();
        let models_call = match route {
            None => return self.refuse(session, ctx, GatewayError::NotFound(path)).await,
            Some(allow) if req.method != allow => {
                return self.refuse(session, ctx, GatewayError::MethodNotAllowed { path, allow }).await
            }
            Some(allow) => allow == "GET",
        };
        let client = auth::client_ip(session, &self.state.trusted_proxies);
        ctx.client = Some(client);
        let caller = match auth::authenticate(&self.state, session.req_header(), client).await {
            Ok(caller) => caller,
            Err(e) => return self.refuse(session, ctx, e).await,
        };
        ctx.caller = Some(caller.clone());
        if models_call {
            let body = self.state.catalog.list_for(&caller);
            self.respond(session, ctx, 200, body, Vec::new()).await?;
            return Ok(true);
        }
        if !request::is_json(session.req_header()) {
            return self.refuse(session, ctx, GatewayError::UnsupportedContentType).await;
        }
        let max = self.state.config.max_body_bytes;
        match request::content_length(session.req_header()) {
            Some(n) if n > max => self.refuse(session, ctx, GatewayError::TooLarge(max)).await,
            Some(n) if n <= SMALL_BODY => {
                session.enable_retry_buffering();
                let body = match request::read_small_body(session, n, SMALL_BODY).await? {
                    Ok(body) => body,
                    Err(e) => return self.refuse(session, ctx, e).await,
                };
                match self.admit_and_reserve(ctx, &body).await {
                    Ok(rewritten) => {
                        ctx.body = BodyMode::Judged(rewritten);
                        Ok(false)
                    }
                    Err(e) => self.refuse(session, ctx, e).await,
                }
            }
            _ => {
                ctx.body = BodyMode::Collecting(BytesMut::new());
                Ok(false)
            }
        }
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
                // The replay buffer arrives here whole, on the first attempt and again on a
                // retry: each gets the rewritten body, if any.
                if let (Some(out), true) = (rewritten.as_ref(), body.as_ref().is_some_and(|b| !b.is_empty())) {
                    *body = Some(out.clone());
                }
            }
            BodyMode::Collecting(buf) => {
                if let Some(chunk) = body.take() {
                    buf.extend_from_slice(&chunk);
                }
                let max = self.state.config.max_body_bytes;
                if buf.len() > max {
                    return self.refuse_mid_body(ctx, GatewayError::TooLarge(max));
                }
                if !end_of_stream {
                    *body = Some(Bytes::new());
                    return Ok(());
                }
                let whole = std::mem::take(buf).freeze();
                ctx.body = BodyMode::None;
                match self.admit_and_reserve(ctx, &whole).await {
                    Ok(rewritten) => *body = Some(rewritten.unwrap_or(whole)),
                    Err(e) => return self.refuse_mid_body(ctx, e),
                }
            }
            BodyMode::None => {}
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        ctx.upstream_sent = Some(Instant::now());
        Ok(self.state.upstream.peer())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        *req = self.state.upstream.request_header(
            req,
            &ctx.endpoint,
            &ctx.request_id,
            ctx.caller.as_deref(),
            &ctx.body,
        )?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.status = resp.status.as_u16();
        ctx.ttfb_ms = Some(ctx.elapsed_ms());
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
        Upstream::filter_response(resp);
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        for (name, value) in ctx.rate.headers() {
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

    /// An upstream name may resolve to several addresses (a headless Service, IPv6 and IPv4):
    /// when one cannot be reached the request goes to the next ([`Upstream::peer`] takes them in
    /// turn), each address at most once. Nothing has been sent yet, so any request may move.
    /// TLS failures are not moved: every address presents the same certificate.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let others = self.state.upstream.addrs().len().saturating_sub(1);
        let unreachable = matches!(
            e.etype(),
            ErrorType::ConnectRefused
                | ErrorType::ConnectTimedout
                | ErrorType::ConnectNoRoute
                | ErrorType::ConnectError
        );
        if unreachable && usize::from(ctx.connect_failovers) < others.min(3) {
            ctx.connect_failovers += 1;
            e.set_retry(true);
        }
        e
    }

    /// pingora never retries a POST. One case is safe and common: the upstream closed a pooled
    /// connection as it was reused, before any byte of an answer (`ReusedOnly`). A body judged
    /// whole in `request_filter` is in memory and replays rewritten, so that request is retried,
    /// once; anything else is not.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let stale_pooled = client_reused && matches!(e.retry, RetryType::ReusedOnly);
        let replayable = matches!(ctx.body, BodyMode::Judged(_)) && !session.as_ref().retry_buffer_truncated();
        if stale_pooled && replayable && ctx.upstream_retries == 0 && ctx.ttfb_ms.is_none() {
            ctx.upstream_retries += 1;
            e.set_retry(true);
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error =
            ctx.refusal.take().or_else(|| GatewayError::from_proxy_failure(e, self.state.config.max_body_bytes));
        let Some(error) = error else {
            // The client went away: nothing to answer.
            ctx.error_kind = Some(ErrorKind::ClientDisconnected);
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        };
        ctx.error_kind = Some(ErrorKind::Answered { code: error.label() });
        let code = error.status();
        if session.response_written().is_none() {
            if let Err(err) = self.respond(session, ctx, code, error.body(), error.headers()).await {
                tracing::debug!(error = %err, "could not answer the client");
            }
        } else {
            // Mid-response: the status already went out; the stream is cut.
            ctx.error_kind = Some(ErrorKind::Interrupted);
        }
        if error.is_upstream_failure() {
            ctx.status = code;
            // The operator's clue when the upstream is away or refuses TLS (certificate not
            // trusted, wrong host name): pingora's error names the cause and the peer.
            tracing::warn!(request_id = %ctx.request_id, error = %e, "upstream request failed");
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(resp) = session.response_written() {
            ctx.status = resp.status.as_u16();
        }
        let s = &self.state;
        let row = UsageRow::for_request(ctx, e.is_some());
        let outcome = Outcome::of(e.is_some(), ctx.upstream_sent.is_some(), ctx.status);
        let upstream_time = ctx.upstream_sent.map(|t| t.elapsed());
        s.metrics.observe_request(
            ctx.model_label(),
            ctx.status,
            outcome,
            ctx.started.elapsed(),
            upstream_time,
            row.as_ref(),
        );
        s.access_log.record(ctx, outcome, upstream_time, row.as_ref());
        if let Some(reservation) = ctx.admitted.as_mut().and_then(|a| a.reservation.take()) {
            // `None`: the upstream never answered, everything goes back.
            let used = row
                .as_ref()
                .filter(|r| r.settles())
                .map(|r| ((r.prompt_tokens + r.completion_tokens) as u64, nanos_round(r.cost)));
            limits::settle(s, reservation, used);
        }
        if let Some(row) = row {
            s.usage.record(row);
        }
    }
}
