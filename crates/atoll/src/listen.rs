//! Listening sockets: one per server thread, all bound to the same address with `SO_REUSEPORT`,
//! so the kernel spreads connections over the threads; and the threads serving them, each with
//! its own single-threaded tokio runtime (no work stealing or cross-thread wake-ups per request;
//! see ARCHITECTURE.md for the measurements behind this). Sites and routers serve this way.

use std::net::{SocketAddr, TcpListener};

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

/// Serves `app` on every listener, each from its own thread (`NAME-serve-i`) and runtime, until
/// `stop` turns true; then each finishes its in-flight requests and its thread ends.
pub(crate) fn serve(
    name: &str,
    listeners: Vec<TcpListener>,
    app: axum::Router,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<std::thread::JoinHandle<Result<()>>>> {
    let mut workers = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let (app, mut stopped) = (app.clone(), stop.clone());
        let worker =
            std::thread::Builder::new().name(format!("{name}-serve-{i}")).spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                        .with_graceful_shutdown(async move {
                            let _ = stopped.wait_for(|stop| *stop).await;
                        })
                        .await?;
                    Ok(())
                })
            })?;
        workers.push(worker);
    }
    Ok(workers)
}

/// Waits for the server threads to end, at most `limit` (their in-flight requests finish
/// first); past it, returns with a warning and the process exits under them.
pub(crate) fn join(
    workers: Vec<std::thread::JoinHandle<Result<()>>>,
    limit: std::time::Duration,
) -> Result<()> {
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
