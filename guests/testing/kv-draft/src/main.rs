//! `kv-draft`: exercises `wasi:keyvalue@0.2.0-draft` from a guest.
//!
//! | request | does |
//! |---|---|
//! | `GET /BUCKET/KEY` | get (404 when absent) |
//! | `PUT /BUCKET/KEY` (body) | set |
//! | `DELETE /BUCKET/KEY` | delete |
//! | `POST /BUCKET/KEY?by=N` | increment by N (default 1), answers the total |
//! | `POST /BUCKET/KEY?wait_ms=M` | increment by 1, then wait M ms before answering (a site killed meanwhile has applied it) |
//! | `GET /BUCKET/` | every key, one a line, following the cursor |

mod bindings {
    wit_bindgen::generate!({
        path: "../../../wit/wasi-keyvalue-0.2.0-draft",
        world: "imports",
        generate_all,
    });
}

use bindings::wasi::keyvalue::{atomics, store};
use wstd::http::{Body, Error, Method, Request, Response, StatusCode};

#[wstd::http_server]
async fn main(mut request: Request<Body>) -> Result<Response<Body>, Error> {
    let path = request.uri().path().trim_start_matches('/').to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let (bucket_name, key) = path.split_once('/').unwrap_or((path.as_str(), ""));
    let bucket = match store::open(bucket_name) {
        Ok(b) => b,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("open failed: {e:?}\n")),
    };
    let method = request.method().clone();
    let outcome: Result<(StatusCode, String), store::Error> = if key.is_empty() {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            match bucket.list_keys(cursor) {
                Ok(page) => {
                    keys.extend(page.keys);
                    match page.cursor {
                        Some(c) => cursor = Some(c),
                        None => break Ok((StatusCode::OK, keys.join("\n"))),
                    }
                }
                Err(e) => break Err(e),
            }
        }
    } else if method == Method::GET {
        bucket.get(key).map(|v| match v {
            Some(v) => (StatusCode::OK, String::from_utf8_lossy(&v).into_owned()),
            None => (StatusCode::NOT_FOUND, String::new()),
        })
    } else if method == Method::PUT {
        let body = request.body_mut().bytes_contents().await?;
        bucket.set(key, &body).map(|()| (StatusCode::OK, "set".into()))
    } else if method == Method::DELETE {
        bucket.delete(key).map(|()| (StatusCode::OK, "deleted".into()))
    } else {
        let by = query.strip_prefix("by=").and_then(|n| n.parse().ok()).unwrap_or(1);
        atomics::increment(&bucket, key, by).map(|n| (StatusCode::OK, n.to_string()))
    };
    // After the write, before the answer: a request in flight that has taken effect.
    if let Some(ms) = query.strip_prefix("wait_ms=").and_then(|n| n.parse().ok()) {
        wstd::task::sleep(wstd::time::Duration::from_millis(ms)).await;
    }
    match outcome {
        Ok((status, body)) => reply(status, body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("store error: {e:?}")),
    }
}

fn reply(status: StatusCode, body: String) -> Result<Response<Body>, Error> {
    Ok(Response::builder().status(status).body(body.into())?)
}
