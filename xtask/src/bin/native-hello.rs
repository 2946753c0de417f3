//! The native baseline of `cargo xtask bench`: an axum route answering what the `hello` guest
//! answers, on the same kind of tokio runtime as `atoll site`.

use axum::http::{HeaderMap, Uri};

async fn hello(uri: Uri, _headers: HeaderMap) -> ([(&'static str, &'static str); 1], String) {
    let body = format!("Hello from Atoll site bench in region local! You asked for {}\n", uri.path());
    ([("content-type", "text/plain; charset=utf-8")], body)
}

fn main() -> anyhow::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("native-hello listening on http://{}", listener.local_addr()?);
        axum::serve(listener, axum::Router::new().fallback(hello)).await?;
        Ok(())
    })
}
