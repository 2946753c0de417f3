//! A Spin app built with spin-sdk 7 (a `wasi:http/handler@0.3.0` component), served by Atoll
//! unchanged: `cargo build --target wasm32-wasip2 --release`, then `atoll deploy`.

use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_service;

/// Answers with a greeting naming the site and region that served it.
#[http_service]
async fn hello(request: Request) -> impl IntoResponse {
    let site = std::env::var("ATOLL_SITE").unwrap_or_else(|_| "unknown".into());
    let region = std::env::var("ATOLL_REGION").unwrap_or_else(|_| "unknown".into());
    format!(
        "Hello from a Spin app on Atoll site {site} in region {region}! You asked for {}\n",
        request.uri().path()
    )
}
