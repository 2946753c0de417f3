//! The minimal-host baseline of `cargo xtask bench`: wasmtime-wasi-http 48's documented p2 serving
//! example (its `p2` module docs), with the engine configuration Atoll uses
//! ([`atoll_runtime::engine_config`]: pooling, keep-resident, PAGEMAP_SCAN, no concurrency
//! support) and the same server shape (a current-thread runtime per core, each with its own
//! `SO_REUSEPORT` listener), a fresh instance per request, and nothing else: no routing, limits,
//! metrics, logs or key-value store. What it costs per request is wasmtime's share; what the site
//! costs beyond it is Atoll's.
//!
//! `minimal-host COMPONENT.wasm [ADDR]` prints `minimal-host listening on http://ADDR`.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

struct State {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: wasmtime_wasi_http::default_hooks(),
        }
    }
}

async fn handle(
    pre: ProxyPre<State>,
    request: hyper::Request<hyper::body::Incoming>,
) -> wasmtime::Result<hyper::Response<HyperOutgoingBody>> {
    // The environment a site gives its guests (the hello guest prints it).
    let mut wasi = WasiCtx::builder();
    wasi.env("ATOLL_SITE", "bench").env("ATOLL_REGION", "local");
    let state = State { table: ResourceTable::new(), wasi: wasi.build(), http: WasiHttpCtx::new() };
    let mut store = Store::new(pre.engine(), state);
    // A deadline as a server must have one (the epoch ticker below moves it).
    store.set_epoch_deadline(100);
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let request = store.data_mut().http().new_incoming_request(Scheme::Http, request)?;
    let out = store.data_mut().http().new_response_outparam(sender)?;
    let task = tokio::task::spawn(async move {
        let proxy = pre.instantiate_async(&mut store).await?;
        proxy.wasi_http_incoming_handler().call_handle(store, request, out).await
    });
    match receiver.await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => match task.await {
            Ok(Ok(())) => Err(wasmtime::format_err!("the guest set no response")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.into()),
        },
    }
}

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn main() -> wasmtime::Result<()> {
    let wasm = std::env::args()
        .nth(1)
        .ok_or_else(|| wasmtime::format_err!("usage: minimal-host COMPONENT.wasm [ADDR]"))?;
    let addr: SocketAddr = std::env::args().nth(2).unwrap_or_else(|| "127.0.0.1:0".into()).parse()?;
    let engine = Engine::new(&atoll_runtime::engine_config(&atoll_runtime::RuntimeConfig::default()))?;
    let component = Component::from_file(&engine, &wasm)?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    let pre = ProxyPre::new(linker.instantiate_pre(&component)?)?;
    let ticker = engine.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(10));
            ticker.increment_epoch();
        }
    });
    let first = listener(addr)?;
    let addr = first.local_addr()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut listeners = vec![first];
    for _ in 1..cores {
        listeners.push(listener(addr)?);
    }
    println!("minimal-host listening on http://{addr}");
    let pre = Arc::new(pre);
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let pre = pre.clone();
            std::thread::spawn(move || -> wasmtime::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    loop {
                        let (stream, _) = listener.accept().await?;
                        let pre = pre.clone();
                        tokio::task::spawn(async move {
                            let service =
                                hyper::service::service_fn(move |request| handle((*pre).clone(), request));
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ =
                                http1::Builder::new().keep_alive(true).serve_connection(io, service).await;
                        });
                    }
                })
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| wasmtime::format_err!("a server thread panicked"))??;
    }
    Ok(())
}
