//! In-process cost of one request: fresh store + instance, the handler, teardown. No network.
//!
//! `cargo bench -p atoll-runtime` prints µs per request for `hello` on one thread, through
//! [`App::handle`] and through a bare wasmtime host with the same engine configuration (what the
//! runtime's own layers cost is the difference); `ATOLL_BENCH_WASM=/abs/path.wasm` measures
//! another component.

use std::time::Instant;

use atoll_runtime::{AppSettings, Runtime, RuntimeConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

struct Bare {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Bare {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: wasmtime_wasi_http::default_hooks(),
        }
    }
}

/// One request through a bare host: the wasmtime-wasi-http documented serving steps.
async fn bare(pre: &ProxyPre<Bare>) -> Bytes {
    let mut wasi = WasiCtx::builder();
    wasi.env("ATOLL_SITE", "bench").env("ATOLL_REGION", "local");
    let state = Bare { table: ResourceTable::new(), wasi: wasi.build(), http: WasiHttpCtx::new() };
    let mut store = Store::new(pre.engine(), state);
    store.set_epoch_deadline(100);
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let request = http::Request::get("http://localhost/").body(Full::new(Bytes::new())).expect("request");
    let request = store.data_mut().http().new_incoming_request(Scheme::Http, request).expect("request");
    let out = store.data_mut().http().new_response_outparam(sender).expect("outparam");
    let proxy = pre.instantiate_async(&mut store).await.expect("instance");
    proxy.wasi_http_incoming_handler().call_handle(&mut store, request, out).await.expect("handled");
    let response = receiver.await.expect("response").expect("ok");
    let body = response.into_body().collect().await.expect("body").to_bytes();
    drop(store);
    body
}

fn rounds(name: &str, path: &str, mut one: impl FnMut()) {
    for _ in 0..2_000 {
        one();
    }
    for round in 0..3 {
        let n = 20_000;
        let started = Instant::now();
        for _ in 0..n {
            one();
        }
        let per = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "{name}, round {round}: {per:.1} µs per request ({path}, fresh instance, in-process, 1 thread)"
        );
    }
}

fn main() {
    let config = RuntimeConfig {
        guest_env: vec![("ATOLL_SITE".into(), "bench".into()), ("ATOLL_REGION".into(), "local".into())],
        ..RuntimeConfig::default()
    };
    let engine = Engine::new(&atoll_runtime::engine_config(&config)).expect("engine");
    let runtime = Runtime::new(config).expect("runtime");
    let path = std::env::var("ATOLL_BENCH_WASM").unwrap_or_else(|_| atoll_test_guests::HELLO.into());
    let wasm = std::fs::read(&path).expect("hello built");
    let app = runtime.load("hello", &wasm, AppSettings::default()).expect("loads");
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("wasi");
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).expect("wasi:http");
    let component = Component::new(&engine, &wasm).expect("compiles");
    let pre = ProxyPre::new(linker.instantiate_pre(&component).expect("links")).expect("a handler");
    let ticker = engine.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(10));
            ticker.increment_epoch();
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let request = || http::Request::get("http://localhost/").body(Full::new(Bytes::new())).expect("request");
    for _ in 0..2 {
        rounds("App::handle", &path, || {
            rt.block_on(app.handle(request(), "bench")).expect("served");
        });
        rounds("bare wasmtime host", &path, || {
            rt.block_on(bare(&pre));
        });
    }
}
