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
    /// A connection's first request must have arrived whole within this; an HTTP/1 request's
    /// headers, any of them, too (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and
    /// HTTP/2 alike).
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
            let Some(tls) = tls else { return connection(stream, peer, app, limits, stop).await };
            // The handshake counts against the first-request deadline.
            match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => connection(stream, peer, app, limits, stop).await,
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

/// Whether a connection has a request in flight, and since when it has had none.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request ended; `u64::MAX`: none yet.
    last_ms: AtomicU64,
}

impl Activity {
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
}

/// Marks a request in flight on its connection until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one connection: HTTP/1.1 or HTTP/2, with the peer's address in each request's
/// extensions (axum's `ConnectInfo`), closed when idle past the limits or at `stop` (after its
/// requests in flight finish).
async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    app: axum::Router,
    limits: ConnectionLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let activity = Arc::new(Activity {
        opened: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(u64::MAX),
    });
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        let in_flight = InFlight::start(&tracked);
        request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let response = app.clone().oneshot(request.map(axum::body::Body::new));
        async move {
            let response = response.await;
            drop(in_flight);
            response
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Past the first request, hyper's own timer bounds each HTTP/1 request's headers.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    // Once closing for idleness, a connection that does not end by itself (a client that does
    // not read) is dropped after one more header_read_timeout.
    let mut closing: Option<Instant> = None;
    let mut stopping = false;
    loop {
        let check = match closing {
            Some(at) => at + limits.header_read_timeout,
            None => activity.idle_deadline(&limits).unwrap_or_else(|| Instant::now() + limits.idle_timeout),
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
            _ = tokio::time::sleep_until(check.into()), if !stopping => {
                if closing.is_some() {
                    break;
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
