//! Integration tests of atoll-runtime against the real guests in `guests/`.

mod keyvalue;
mod limits;
mod load;
mod serve;
mod stream;
mod variables;

use std::time::Duration;

use atoll_runtime::{App, AppSettings, HandleError, Limits, Runtime, RuntimeConfig};
use bytes::Bytes;

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        max_instances: 50,
        guest_env: vec![
            ("ATOLL_SITE".into(), "test-site".into()),
            ("ATOLL_REGION".into(), "test-region".into()),
        ],
        ..RuntimeConfig::default()
    })
    .expect("runtime starts")
}

fn load(runtime: &Runtime, path: &str, settings: AppSettings) -> App {
    let wasm = std::fs::read(path).expect("guest was built");
    runtime.load("test-app", &wasm, settings).expect("guest loads")
}

fn quick_limits() -> AppSettings {
    AppSettings {
        limits: Limits {
            deadline: Duration::from_millis(500),
            max_memory_bytes: 16 << 20,
            ..Limits::default()
        },
        ..AppSettings::default()
    }
}

async fn get(app: &App, path: &str) -> Result<(u16, String), HandleError> {
    let request = http::Request::get(format!("http://example.com{path}"))
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("valid request");
    let response = app.handle(request, "test-request").await?;
    Ok((response.status().as_u16(), String::from_utf8_lossy(response.body()).into_owned()))
}
