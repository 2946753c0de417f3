//! `hello`: the smallest useful Atoll handler.
//!
//! Answers every request with a greeting naming the site and region that served it. It is an
//! ordinary `wasi:http/incoming-handler` component: it runs unchanged under `wasmtime serve`
//! (where the site and region read as "unknown").

use wstd::http::{Body, Error, Request, Response};

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, Error> {
    let site = std::env::var("ATOLL_SITE").unwrap_or_else(|_| "unknown".into());
    let region = std::env::var("ATOLL_REGION").unwrap_or_else(|_| "unknown".into());
    let path = request.uri().path();
    let greeting = format!("Hello from Atoll site {site} in region {region}! You asked for {path}\n");
    Ok(Response::builder().header("content-type", "text/plain; charset=utf-8").body(greeting.into())?)
}
