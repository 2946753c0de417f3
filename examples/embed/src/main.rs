//! Embedding atoll-runtime: serve one wasi:http component from your own axum server.
//!
//! ```text
//! cargo xtask build-guests
//! cargo run -p atoll-example-embed -- guests/target/wasm32-wasip2/release/hello.wasm
//! curl http://127.0.0.1:3000/anything
//! ```

use atoll_runtime::{AppSettings, Limits, Runtime, RuntimeConfig};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "hello.wasm".into());
    let runtime = Runtime::new(RuntimeConfig {
        guest_env: vec![("ATOLL_SITE".into(), "embedded".into()), ("ATOLL_REGION".into(), "local".into())],
        ..RuntimeConfig::default()
    })?;
    // Compile once; every request below gets a fresh instance of it.
    let settings = AppSettings {
        limits: Limits { deadline: std::time::Duration::from_secs(2), ..Limits::default() },
        ..AppSettings::default()
    };
    let app = runtime.load("hello", &std::fs::read(&path)?, settings)?;

    let router = axum::Router::new().fallback(serve).with_state(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("serving {path} on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}

async fn serve(State(app): State<atoll_runtime::App>, request: Request) -> Response {
    match app.handle(request, "embedded").await {
        Ok(response) => response.map(Body::from),
        // Traps, deadlines and body caps arrive here, each with its HTTP status.
        Err(e) => (e.status(), format!("{e}\n")).into_response(),
    }
}
