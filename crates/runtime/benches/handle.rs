//! In-process cost of one request: fresh store + instance, the handler, teardown. No network.
//!
//! `cargo bench -p atoll-runtime` prints µs per request for `hello` on one thread;
//! `ATOLL_BENCH_WASM=/abs/path.wasm` measures another component.

use std::time::Instant;

use atoll_runtime::{AppSettings, Runtime, RuntimeConfig};
use bytes::Bytes;
use http_body_util::Full;

fn main() {
    let runtime = Runtime::new(RuntimeConfig {
        guest_env: vec![("ATOLL_SITE".into(), "bench".into()), ("ATOLL_REGION".into(), "local".into())],
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let path = std::env::var("ATOLL_BENCH_WASM").unwrap_or_else(|_| atoll_test_guests::HELLO.into());
    let wasm = std::fs::read(&path).expect("hello built");
    let app = runtime.load("hello", &wasm, AppSettings::default()).expect("loads");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    rt.block_on(async {
        let request =
            || http::Request::get("http://localhost/").body(Full::new(Bytes::new())).expect("request");
        for _ in 0..2_000 {
            app.handle(request(), "warm-up").await.expect("served");
        }
        for round in 0..3 {
            let n = 20_000;
            let started = Instant::now();
            for _ in 0..n {
                app.handle(request(), "bench").await.expect("served");
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!("round {round}: {per:.1} µs per request ({path}, fresh instance, in-process, 1 thread)");
        }
    });
}
