//! Listening sockets: one per server thread, all bound to the same address with `SO_REUSEPORT`,
//! so the kernel spreads connections over the threads; and the threads serving them, each with
//! its own single-threaded tokio runtime (no work stealing or cross-thread wake-ups per request;
//! see ARCHITECTURE.md for the measurements behind this). Sites and routers serve this way.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

/// Binds `count` listeners to `addr` (a port of 0 is resolved once, then shared).
pub(crate) fn bind(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>> {
    // SO_REUSEPORT would also let a second process join an address already in use; a plain
    // bind first turns that mistake into the usual "address in use" error.
    if addr.port() != 0 {
        drop(TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    let first = socket(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count.max(1) {
        listeners.push(socket(addr).with_context(|| format!("cannot listen on {addr} again"))?);
    }
    Ok(listeners)
}

/// What one connection may cost (`[server]`): the guard against clients that open connections
/// and send nothing, or send slowly, or never leave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Open connections at once, over all server threads; past it new ones wait in the
    /// kernel's accept queue until one closes.
    pub max_connections: usize,
    /// A connection's first request must have arrived whole within this (slowloris; a TLS
    /// handshake counts too).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and
    /// HTTP/2 alike; it bounds a later request's headers too), and one that sends nothing of a
    /// response for this long (its client does not read) is dropped.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `app` on every listener, each from its own thread (`NAME-serve-i`) and runtime, until
/// `stop` turns true; then each finishes its in-flight requests and its thread ends.
///
/// Connections are served by hyper-util's HTTP/1 + HTTP/2 server with `limits` applied (the
/// connection cap is split evenly between the threads: the kernel spreads connections evenly),
/// over TLS when `tls` is given (ALPN picks the protocol), else over plain TCP (h2c with prior
/// knowledge).
pub(crate) fn serve(
    name: &str,
    listeners: Vec<TcpListener>,
    app: axum::Router,
    limits: ConnectionLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<std::thread::JoinHandle<Result<()>>>> {
    let per_thread = limits.max_connections.div_ceil(listeners.len().max(1)).max(1);
    let mut workers = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let (app, stopped) = (app.clone(), stop.clone());
        let tls = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let worker =
            std::thread::Builder::new().name(format!("{name}-serve-{i}")).spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    accept(
                        listener,
                        app,
                        ConnectionLimits { max_connections: per_thread, ..limits },
                        tls,
                        stopped,
                    )
                    .await;
                    Ok(())
                })
            })?;
        workers.push(worker);
    }
    Ok(workers)
}

/// Accepts connections until `stop`, at most `limits.max_connections` open at once, then waits
/// for the open ones to finish their requests.
async fn accept(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut warned: Option<Instant> = None;
    loop {
        if slots.available_permits() == 0 && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            warned = Some(Instant::now());
            metrics::counter!("atoll_connections_at_cap_total").increment(1);
            tracing::warn!(
                max = limits.max_connections,
                "at the connection cap: new connections wait until one closes ([server] max_connections)"
            );
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken: wait a
                    // little rather than spin (as axum::serve does).
                    tracing::debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, stop, tls) = (app.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _open = OpenConnection::new();
            let activity = Arc::new(Activity::new());
            let stream = Watched { inner: stream, activity: activity.clone() };
            let Some(tls) = tls else { return connection(stream, activity, peer, app, limits, stop).await };
            // The handshake counts against the first-request deadline.
            match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => connection(stream, activity, peer, app, limits, stop).await,
                Ok(Err(e)) => {
                    metrics::counter!("atoll_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                }
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    // Every slot back: every connection has ended.
    let _ = slots.acquire_many(limits.max_connections as u32).await;
}

/// What a connection is doing: requests in flight (from their arrival to the end of their
/// response's body), when the last one ended, and since when its writes have been blocked.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request ended; `u64::MAX`: none yet.
    last_ms: AtomicU64,
    /// Milliseconds after `opened` since when a write has waited with nothing written (the
    /// client does not read); `u64::MAX`: not blocked.
    blocked_ms: AtomicU64,
    /// Response bodies being written (larger or streamed ones: see [`Tracked`]).
    responding: AtomicUsize,
    /// Milliseconds after `opened` when bytes last went out (or a tracked response began).
    wrote_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(u64::MAX),
            blocked_ms: AtomicU64::new(u64::MAX),
            responding: AtomicUsize::new(0),
            wrote_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// When the connection is due to close if nothing happens before, or `None` while a request
    /// is in flight.
    fn idle_deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.last_ms.load(Ordering::Acquire) {
            u64::MAX => self.opened + limits.header_read_timeout,
            ms => self.opened + Duration::from_millis(ms) + limits.idle_timeout,
        })
    }

    /// When the connection counts as stalled if nothing changes before: its writes stay
    /// blocked (the client does not read), or a response being written sends nothing (an
    /// HTTP/2 client that gives no flow-control window); `None` when neither can happen.
    fn stall_deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let at = |ms: u64| self.opened + Duration::from_millis(ms) + limits.idle_timeout;
        let blocked = match self.blocked_ms.load(Ordering::Acquire) {
            u64::MAX => None,
            ms => Some(at(ms)),
        };
        let silent =
            (self.responding.load(Ordering::Acquire) > 0).then(|| at(self.wrote_ms.load(Ordering::Acquire)));
        blocked.into_iter().chain(silent).min()
    }

    /// Notes the outcome of a write.
    fn wrote(&self, result: &std::task::Poll<std::io::Result<usize>>) {
        match result {
            std::task::Poll::Ready(Ok(n)) if *n > 0 => {
                self.blocked_ms.store(u64::MAX, Ordering::Release);
                if self.responding.load(Ordering::Relaxed) > 0 {
                    self.wrote_ms.store(self.now_ms(), Ordering::Release);
                }
            }
            std::task::Poll::Pending if self.blocked_ms.load(Ordering::Acquire) == u64::MAX => {
                self.blocked_ms.store(self.now_ms(), Ordering::Release)
            }
            _ => {}
        }
    }
}

/// Marks a request in flight on its connection until dropped (it moves into the response's
/// body, so a response being written keeps its connection from counting as idle).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Response bodies up to this size, of known length, are not tracked to their end.
const SMALL_BODY: u64 = 64 << 10;

/// A response body holding its request in flight until it ends (or is dropped), and counted
/// as being written meanwhile.
struct Tracked {
    body: axum::body::Body,
    in_flight: Option<Responding>,
}

/// A request whose response body is being written.
struct Responding(InFlight);

impl Responding {
    fn start(in_flight: InFlight) -> Responding {
        let activity = &in_flight.0;
        activity.wrote_ms.store(activity.now_ms(), Ordering::Release);
        activity.responding.fetch_add(1, Ordering::AcqRel);
        Responding(in_flight)
    }
}

impl Drop for Responding {
    fn drop(&mut self) {
        (self.0).0.responding.fetch_sub(1, Ordering::AcqRel);
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket, noting in its [`Activity`] whether writes get through.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection: HTTP/1.1 or HTTP/2, with the peer's address in each request's
/// extensions (axum's `ConnectInfo`), closed when idle past the limits or at `stop` (after its
/// requests in flight finish).
async fn connection<S>(
    stream: S,
    activity: Arc<Activity>,
    peer: SocketAddr,
    app: axum::Router,
    limits: ConnectionLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        let in_flight = InFlight::start(&tracked);
        request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let response = app.clone().oneshot(request.map(axum::body::Body::new));
        async move {
            let response = response.await;
            // A small body of known length is written at once: the request ends with its
            // handler. Anything else stays in flight until its last byte is handed over.
            response.map(|r| {
                if http_body::Body::size_hint(r.body()).exact().is_some_and(|n| n <= SMALL_BODY) {
                    return r;
                }
                let in_flight = Some(Responding::start(in_flight));
                r.map(|body| axum::body::Body::new(Tracked { body, in_flight }))
            })
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // No per-request header timer in hyper (it arms and drops a timer for every request): the
    // watcher below bounds a connection's first request by header_read_timeout and any later
    // one by idle_timeout, which covers a slow client sending headers.
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        // Each response holds up to its cap in memory (whole, or queued while it streams):
        // bound how many one connection may hold at once. A
        // router multiplexes all its requests to this site from one server thread on one
        // connection: as many as the instance pool runs at once (1,000 by default).
        .max_concurrent_streams(1000)
        .max_header_list_size(atoll_router::MAX_HEADER_LIST);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    // Once closing for idleness, a connection that does not end by itself is dropped after one
    // more header_read_timeout; one whose response does not move for idle_timeout (a client
    // that does not read) is dropped at once, whatever else it sends.
    let mut closing: Option<Instant> = None;
    let mut stopping = false;
    loop {
        let stall = activity.stall_deadline(&limits);
        let later = Instant::now() + limits.idle_timeout;
        let check = match closing {
            Some(at) if activity.in_flight.load(Ordering::Acquire) == 0 => at + limits.header_read_timeout,
            Some(_) => stall.unwrap_or(later),
            None if stopping => stall.unwrap_or(later),
            None => [activity.idle_deadline(&limits), stall].into_iter().flatten().min().unwrap_or(later),
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                break;
            }
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
            _ = tokio::time::sleep_until(check.into()) => {
                if activity.stall_deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!(%peer, "dropping a connection whose client does not read its response");
                    metrics::counter!("atoll_connections_stalled_closed_total").increment(1);
                    break;
                }
                if closing.is_some() && activity.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                if stopping || closing.is_some() {
                    continue;
                }
                if activity.idle_deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!(%peer, "closing an idle connection");
                    metrics::counter!("atoll_connections_idle_closed_total").increment(1);
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
            }
        }
    }
}

/// Counts an open connection in `atoll_connections_open` while it lives.
struct OpenConnection;

impl OpenConnection {
    fn new() -> OpenConnection {
        metrics::gauge!("atoll_connections_open").increment(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("atoll_connections_open").decrement(1.0);
    }
}

/// Waits for the server threads to end, at most `limit` (their in-flight requests finish
/// first); past it, returns with a warning and the process exits under them.
pub(crate) fn join(workers: Vec<std::thread::JoinHandle<Result<()>>>, limit: Duration) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut result = Ok(());
        for worker in workers {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(anyhow::anyhow!("a server thread panicked")),
            }
        }
        let _ = tx.send(result);
    });
    match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(?limit, "requests still in flight after the drain limit: stopping anyway");
            Ok(())
        }
    }
}

fn socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_several_sockets_to_one_port_but_not_to_a_busy_one() -> Result<()> {
        let listeners = bind("127.0.0.1:0".parse()?, 3)?;
        let addr = listeners[0].local_addr()?;
        assert!(listeners.iter().all(|l| l.local_addr().ok() == Some(addr)));
        let err = bind(addr, 1).expect_err("port is busy");
        assert!(format!("{err:#}").contains("cannot listen"), "{err:#}");
        Ok(())
    }
}
