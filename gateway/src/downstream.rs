//! Client connections before pingora parses them: a cap on how many are open at once, a deadline
//! for each request header as a whole, and an idle timeout between keep-alive requests.
//!
//! pingora times out each read of a request header separately (60 s on a connection's first
//! request, never on later ones), so a client that sends a byte now and then holds a connection,
//! and a worker's memory, forever. [`Guarded`] wraps pingora's HTTP application:
//! - on accept it takes one of `max_connections` slots (none left: a `503` with
//!   `connection: close`, and the connection is closed) and wraps the socket in [`Downstream`];
//! - [`Downstream`] scans the bytes of each request header for its end (the empty line) and
//!   fails the read once `header_read_timeout_ms` has passed since the header's first byte (the
//!   first request's: since accept), answering `408` when a header had begun;
//! - between requests, the same timer closes a connection idle for `keepalive_idle_seconds`.
//!
//! Which phase a connection is in comes from pingora itself: [`Sessions`] sees every HTTP/1
//! session begin (before its header is read) and tells the connection's [`Downstream`]. Once a
//! header is complete, reads pass straight through to the socket.

use std::{
    fmt,
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use pingora::{
    apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp},
    protocols::{
        http::{v2::server::H2Options, ServerSession},
        raw_connect::ProxyDigest,
        tls::{SslDigest, TlsRef},
        GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
        UniqueID, UniqueIDType, ALPN,
    },
    server::ShutdownWatch,
};
use prometheus::{IntCounter, IntGauge};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    time::{Instant, Sleep},
};

use crate::{config::GatewayConfig, metrics::Metrics};

/// Written to a connection over `max_connections` before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 107\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
{\"error\":{\"message\":\"the gateway has too many open connections\",\"type\":\"server_error\",\"code\":\"overloaded\"}}";

/// Written (best effort) to a connection whose request header did not arrive in time.
const HEADER_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
content-length: 115\r\nconnection: close\r\n\r\n\
{\"error\":{\"message\":\"the request header was not received in time\",\"type\":\"invalid_request_error\",\"code\":\"timeout\"}}";

/// How long a refused connection may take to receive its 503 and go away, and how many refused
/// connections may wait so at once (beyond that they are closed without waiting).
const REFUSAL_LINGER: Duration = Duration::from_millis(250);
const MAX_LINGERING: usize = 64;

/// The settings and counters all connections of one gateway process share.
#[derive(Debug)]
pub struct Limits {
    max_connections: usize,
    header_timeout: Duration,
    /// `None`: no keep-alive, every response closes its connection.
    keepalive_idle: Option<Duration>,
    open: AtomicUsize,
    lingering: AtomicUsize,
    connections: IntGauge,
    rejected_max_connections: IntCounter,
    rejected_header_timeout: IntCounter,
}

impl Limits {
    pub fn new(config: &GatewayConfig, metrics: &Metrics) -> Self {
        Self {
            max_connections: config.max_connections,
            header_timeout: Duration::from_millis(config.header_read_timeout_ms),
            keepalive_idle: (config.keepalive_idle_seconds > 0)
                .then(|| Duration::from_secs(config.keepalive_idle_seconds)),
            open: AtomicUsize::new(0),
            lingering: AtomicUsize::new(0),
            connections: metrics.downstream_connections.clone(),
            rejected_max_connections: metrics.downstream_rejections.with_label_values(&["max_connections"]),
            rejected_header_timeout: metrics.downstream_rejections.with_label_values(&["header_timeout"]),
        }
    }

    /// Takes a connection slot, if one is free.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.connections.inc();
        Some(Slot(self.clone()))
    }
}

/// One open connection's place under `max_connections`, given back on drop.
#[derive(Debug)]
struct Slot(Arc<Limits>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.connections.dec();
    }
}

/// pingora's HTTP application `A` (the proxy) behind the connection cap and the header and
/// keep-alive deadlines; serve it with `pingora::services::listening::Service::new`.
pub struct Guarded<A> {
    sessions: Arc<Sessions<A>>,
    limits: Arc<Limits>,
}

impl<A> Guarded<A> {
    pub fn new(app: A, limits: Limits) -> Self {
        let no_keepalive = limits.keepalive_idle.is_none();
        Self { sessions: Arc::new(Sessions { app: Arc::new(app), no_keepalive }), limits: Arc::new(limits) }
    }

    /// Best effort: the 503, then a short wait for the client to read it and leave (so that its
    /// request, arriving after the close, does not turn the answer into a reset).
    async fn refuse(&self, mut stream: Stream) {
        self.limits.rejected_max_connections.inc();
        let linger = self.limits.lingering.fetch_add(1, Ordering::AcqRel) < MAX_LINGERING;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(OVER_CAPACITY).await?;
            stream.flush().await?;
            if linger {
                AsyncWriteExt::shutdown(&mut stream).await?;
                let mut sink = [0u8; 512];
                while stream.read(&mut sink).await? > 0 {}
            }
            io::Result::Ok(())
        })
        .await;
        self.limits.lingering.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl<A> ServerApp for Guarded<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let Some(slot) = self.limits.admit() else {
            tracing::debug!("connection refused: max_connections reached");
            self.refuse(stream).await;
            return None;
        };
        let mut next: Option<Stream> = Some(Box::new(Downstream::new(stream, slot)));
        // A stream handed back (custom protocols only) is still this connection: serve it here
        // rather than return it and have it counted again.
        while let Some(stream) = next {
            next = self.sessions.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.sessions).await;
    }
}

/// `A` with each HTTP/1 session's start reported to its connection's [`Downstream`].
pub struct Sessions<A> {
    app: Arc<A>,
    no_keepalive: bool,
}

#[async_trait]
impl<A> HttpServerApp for Sessions<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if let Some(downstream) = session.stream().and_then(|s| s.as_ref().as_any().downcast_ref::<Downstream>()) {
            downstream.next_request();
        }
        if self.no_keepalive {
            // pingora then answers with `connection: close` and does not reuse the connection.
            session.set_keepalive_reuses_remaining(Some(0));
        }
        self.app.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.app.server_options()
    }

    async fn http_cleanup(&self) {
        self.app.http_cleanup().await;
    }

    async fn process_custom_session(self: Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        self.app.clone().process_custom_session(stream, shutdown).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request header; `started`: some byte of it has arrived. The timer holds the
    /// header's deadline.
    Header { started: bool },
    /// Between requests, nothing of the next one read yet; the timer holds the idle deadline.
    Idle,
    /// The header is complete: reads go straight to the socket, no deadline.
    Request,
    /// A deadline passed: every further read ends the connection.
    Expired,
}

/// A client connection under the header and keep-alive deadlines (see the module docs). Every
/// pingora IO trait is delegated to the socket, so peer addresses and digests are unchanged.
pub struct Downstream {
    inner: Stream,
    phase: Phase,
    /// Progress towards the empty line that ends a header (see [`header_end`]).
    scan: u8,
    /// Set by [`Sessions`] when pingora starts a session (a new request) on this connection.
    next: AtomicBool,
    timer: Pin<Box<Sleep>>,
    limits: Arc<Limits>,
    _slot: Slot,
}

impl fmt::Debug for Downstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Downstream").field("inner", &self.inner).field("phase", &self.phase).finish()
    }
}

impl Downstream {
    /// A connection just accepted: its first header is due `header_timeout` from now. Needs a
    /// tokio runtime (the timer).
    fn new(inner: Stream, slot: Slot) -> Self {
        let limits = slot.0.clone();
        let timer = Box::pin(tokio::time::sleep(limits.header_timeout));
        Self {
            inner,
            phase: Phase::Header { started: false },
            scan: 0,
            next: AtomicBool::new(false),
            timer,
            limits,
            _slot: slot,
        }
    }

    /// pingora is about to read a new request on this connection.
    fn next_request(&self) {
        self.next.store(true, Ordering::Relaxed);
    }

    /// A read while a deadline runs.
    fn guarded_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.next.load(Ordering::Relaxed) {
            // The first session of a connection starts in `Header` already.
            self.next.store(false, Ordering::Relaxed);
        }
        if self.phase == Phase::Expired {
            return Poll::Ready(Ok(()));
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(self.expire(cx));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            let fresh = &buf.filled()[before..];
            if !fresh.is_empty() {
                self.received(fresh);
            }
        }
        read
    }

    /// Bytes of a request header arrived.
    fn received(&mut self, bytes: &[u8]) {
        match self.phase {
            Phase::Idle => {
                self.phase = Phase::Header { started: true };
                let deadline = Instant::now() + self.limits.header_timeout;
                self.timer.as_mut().reset(deadline);
            }
            Phase::Header { started: false } => self.phase = Phase::Header { started: true },
            _ => {}
        }
        if header_end(&mut self.scan, bytes) {
            self.phase = Phase::Request;
            self.scan = 0;
        }
    }

    /// The running deadline passed.
    fn expire(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match std::mem::replace(&mut self.phase, Phase::Expired) {
            // An idle keep-alive connection, or one that never sent anything: closed quietly
            // (pingora sees the end of the stream).
            Phase::Idle => Ok(()),
            Phase::Header { started: false } => {
                self.limits.rejected_header_timeout.inc();
                Ok(())
            }
            _ => {
                self.limits.rejected_header_timeout.inc();
                tracing::debug!("request header not received in time; closing the connection");
                // Best effort, without waiting: pingora writes nothing after a failed header
                // read, only shuts the stream down (which flushes this).
                let mut inner = Pin::new(&mut self.inner);
                if let Poll::Ready(Ok(_)) = inner.as_mut().poll_write(cx, HEADER_TIMEOUT) {
                    let _ = inner.poll_flush(cx);
                }
                Err(io::Error::new(io::ErrorKind::TimedOut, "request header not received in time"))
            }
        }
    }
}

/// Advances `state` over `bytes` and tells whether they complete a request header: an empty
/// line (`\r\n\r\n`, or with bare `\n` as HTTP parsers accept) after at least one byte that is
/// not a line break (empty lines before a request line are skipped by parsers, so they must not
/// end the header here). `state` carries a terminator split across reads; 0 starts afresh.
pub fn header_end(state: &mut u8, bytes: &[u8]) -> bool {
    // 0: only line breaks so far; 1: within a line; 2: after `\n`; 3: after `\n\r`.
    let mut s = *state;
    for &b in bytes {
        s = match (s, b) {
            (0, b'\r' | b'\n') => 0,
            (0, _) => 1,
            (1, b'\n') => 2,
            (1, _) => 1,
            (2 | 3, b'\n') => {
                *state = 0;
                return true;
            }
            (2, b'\r') => 3,
            _ => 1,
        };
    }
    *state = s;
    false
}

impl AsyncRead for Downstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Request {
            if !this.next.load(Ordering::Relaxed) {
                // The fast path: a request's body, or pingora watching for the client leaving.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // A new request on a kept-alive connection: the idle deadline runs until its first
            // byte.
            this.phase = match this.limits.keepalive_idle {
                Some(idle) => {
                    this.timer.as_mut().reset(Instant::now() + idle);
                    Phase::Idle
                }
                None => Phase::Expired,
            };
        }
        this.guarded_read(cx, buf)
    }
}

impl AsyncWrite for Downstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Downstream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await;
    }
}

impl UniqueID for Downstream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Downstream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Downstream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Downstream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Downstream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Downstream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(chunks: &[&[u8]]) -> Vec<bool> {
        let mut state = 0;
        chunks.iter().map(|c| header_end(&mut state, c)).collect()
    }

    #[test]
    fn header_end_finds_the_empty_line_across_reads() {
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"]), [true]);
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r", b"\n"]), [false, true]);
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\n", b"\r\n"]), [false, true]);
        assert_eq!(ends(&[b"GET / HTTP/1.1\r", b"\n", b"\r", b"\n"]), [false, false, false, true]);
        assert_eq!(ends(&[b"GET / HTTP/1.1\nhost: a\n\n"]), [true]);
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nhost: a\n", b"\r\n"]), [false, true]);
        // Line breaks before the request line do not end anything; a header line does not either.
        assert_eq!(ends(&[b"\r\n\r\n\n\n", b"GET / HTTP/1.1\r\nhost: a\r\n"]), [false, false]);
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nx: \r\r\n"]), [false]);
    }

    fn limits(max_connections: usize, header_ms: u64, keepalive_seconds: u64) -> Arc<Limits> {
        let config = GatewayConfig {
            max_connections,
            header_read_timeout_ms: header_ms,
            keepalive_idle_seconds: keepalive_seconds,
            ..GatewayConfig::default()
        };
        Arc::new(Limits::new(&config, &Metrics::new()))
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let limits = limits(2, 1000, 60);
        let (a, b) = (limits.admit().unwrap(), limits.admit().unwrap());
        assert!(limits.admit().is_none());
        assert_eq!(limits.connections.get(), 2);
        drop(a);
        let c = limits.admit().unwrap();
        assert!(limits.admit().is_none());
        drop((b, c));
        assert_eq!(limits.connections.get(), 0);
        assert_eq!(limits.open.load(Ordering::Relaxed), 0);
    }

    /// A `Downstream` over an in-memory pipe: (the connection, the client's end).
    fn pipe(limits: &Arc<Limits>) -> (Downstream, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(4096);
        (Downstream::new(Box::new(server), limits.admit().unwrap()), client)
    }

    #[tokio::test]
    async fn a_header_dripping_past_its_deadline_fails_the_read_and_gets_a_408() {
        let limits = limits(10, 300, 60);
        let (mut conn, mut client) = pipe(&limits);
        let started = std::time::Instant::now();
        let drip = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nhost: a\r\n".iter().cycle().take(40) {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match conn.read(&mut buf).await {
                Ok(n) => assert!(n > 0, "unexpected end of stream"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(290) && waited < Duration::from_secs(2), "{waited:?}");
        assert_eq!(limits.rejected_header_timeout.get(), 1);
        drop(conn);
        let answer = drip.await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer));
    }

    #[tokio::test]
    async fn a_complete_header_lifts_the_deadline_and_keep_alive_idles_out() {
        let limits = limits(10, 200, 1);
        let (mut conn, mut client) = pipe(&limits);
        conn.next_request();
        client.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 128];
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        assert_eq!(conn.phase, Phase::Request);
        // Past the header deadline, a body (or pingora's idle probe) still reads fine.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"body").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 4);

        // The next request on the connection: idle for up to a second, then the end of stream.
        conn.next_request();
        let started = std::time::Instant::now();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(990) && waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(limits.rejected_header_timeout.get(), 0);
    }

    #[tokio::test]
    async fn the_next_header_gets_its_own_deadline_from_its_first_byte() {
        let limits = limits(10, 300, 60);
        let (mut conn, mut client) = pipe(&limits);
        let mut buf = [0u8; 128];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        conn.next_request();
        // Idle longer than the header deadline: fine, the keep-alive allows 60 s.
        let reader = tokio::spawn(async move {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0);
            let started = std::time::Instant::now();
            let err = loop {
                match conn.read(&mut buf).await {
                    Ok(n) => assert!(n > 0),
                    Err(e) => break e,
                }
            };
            (err.kind(), started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        let (kind, waited) = reader.await.unwrap();
        assert_eq!(kind, io::ErrorKind::TimedOut);
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(2), "{waited:?}");
    }

    #[test]
    fn zero_header_timeout_or_connection_cap_stops_the_gateway_at_start() {
        use figment::{providers::Serialized, Figment};
        for key in ["header_read_timeout_ms", "max_connections"] {
            let err = GatewayConfig::load(None, Figment::from(Serialized::default(key, 0))).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let flags = Figment::from(Serialized::default("keepalive_idle_seconds", 0));
        assert_eq!(GatewayConfig::load(None, flags).unwrap().keepalive_idle_seconds, 0);
    }

    #[test]
    fn canned_answers_have_the_right_lengths() {
        for raw in [OVER_CAPACITY, HEADER_TIMEOUT] {
            let text = std::str::from_utf8(raw).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let len: usize =
                head.lines().find_map(|l| l.strip_prefix("content-length: ")).and_then(|v| v.parse().ok()).unwrap();
            assert_eq!(len, body.len(), "{head}");
            serde_json::from_str::<serde_json::Value>(body).unwrap();
        }
    }
}
