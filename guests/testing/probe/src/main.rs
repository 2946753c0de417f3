//! `probe`: a test program for the runtime's isolation and limits.
//!
//! Each path exercises one behaviour a hostile or buggy handler might show, or one property the
//! host promises. Tests in `crates/runtime` and `tests/e2e` call these routes.
//!
//! | path | behaviour |
//! |---|---|
//! | `/loop` | spins forever (the host's deadline must stop it: 504) |
//! | `/sleep?ms=N` | waits N ms without using CPU (the deadline covers waiting too) |
//! | `/trap` | panics (a trap: 500) |
//! | `/oom` | allocates until memory runs out (the memory cap: 500) |
//! | `/static` | increments a global and returns it: always 1 with a fresh instance per request |
//! | `/env` | returns the guest's environment, one `KEY=value` per line |
//! | `/echo` | returns the request body, and the path and query it saw in `x-probe-path` |
//! | `/big?bytes=N` | returns a body of N bytes |
//! | `/drip?n=N&ms=M[&trap=K]` | returns N lines (`drip I`), one every M ms: a body streamed as it is written (trapping instead of writing line K) |
//! | `/tiny?n=N` | after 150 ms, returns N bytes written one byte at a time |
//! | `/fetch?url=U` | makes an outbound GET to U and reports the status or the error |
//! | `/files` | tries to read the filesystem and reports what it saw |
//! | `/log?QUERY` | prints `probe says QUERY` to stdout and `probe warns QUERY` to stderr |

use std::sync::atomic::{AtomicU64, Ordering};
use wstd::http::{Body, Client, Error, Request, Response, StatusCode};

static REQUESTS_SEEN: AtomicU64 = AtomicU64::new(0);

#[wstd::http_server]
async fn main(mut request: Request<Body>) -> Result<Response<Body>, Error> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };
    match path.as_str() {
        "/loop" => {
            println!("probe: looping");
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "/sleep" => {
            let ms = param("ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
            wstd::task::sleep(wstd::time::Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("slept {ms} ms\n"))
        }
        "/trap" => panic!("probe was asked to trap"),
        "/oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "/static" => {
            let n = REQUESTS_SEEN.fetch_add(1, Ordering::SeqCst) + 1;
            text(StatusCode::OK, format!("{n}\n"))
        }
        "/headers" => {
            let mut lines: Vec<String> = request
                .headers()
                .iter()
                .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            text(StatusCode::OK, lines.join("\n") + "\n")
        }
        "/env" => {
            let mut vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            vars.sort();
            text(StatusCode::OK, vars.join("\n") + "\n")
        }
        "/echo" => {
            let body = request.body_mut().bytes_contents().await?;
            let seen = match query.as_str() {
                "" => path.clone(),
                q => format!("{path}?{q}"),
            };
            // The authority the guest was given (the `Host` the client sent, however it came).
            let authority = request.uri().authority().map(|a| a.to_string()).unwrap_or_default();
            Ok(Response::builder()
                .header("x-probe-path", seen)
                .header("x-probe-authority", authority)
                .body(body.into())?)
        }
        "/big" => {
            let n: usize = param("bytes").and_then(|v| v.parse().ok()).unwrap_or(0);
            Ok(Response::new(vec![b'x'; n].into()))
        }
        "/drip" => {
            let n: u64 = param("n").and_then(|v| v.parse().ok()).unwrap_or(10);
            let ms: u64 = param("ms").and_then(|v| v.parse().ok()).unwrap_or(50);
            let trap: Option<u64> = param("trap").and_then(|v| v.parse().ok());
            let lines = futures_lite::stream::unfold(0, move |i| async move {
                if i == n {
                    return None;
                }
                wstd::task::sleep(wstd::time::Duration::from_millis(ms)).await;
                assert!(trap != Some(i), "probe was asked to trap at line {i}");
                Some((format!("drip {i}\n"), i + 1))
            });
            Ok(Response::new(Body::from_stream(lines)))
        }
        "/tiny" => {
            let n: u64 = param("n").and_then(|v| v.parse().ok()).unwrap_or(1000);
            let bytes = futures_lite::stream::unfold(0, move |i| async move {
                if i == 0 {
                    wstd::task::sleep(wstd::time::Duration::from_millis(150)).await;
                }
                (i < n).then(|| (vec![b't'], i + 1))
            });
            Ok(Response::new(Body::from_stream(bytes)))
        }
        "/fetch" => {
            let Some(url) = param("url") else {
                return text(StatusCode::BAD_REQUEST, "missing ?url=\n".into());
            };
            let req = Request::get(url.as_str()).body(Body::empty())?;
            match Client::new().send(req).await {
                Ok(resp) => text(StatusCode::OK, format!("fetched: {}\n", resp.status().as_u16())),
                Err(e) => text(StatusCode::BAD_GATEWAY, format!("fetch failed: {e:?}\n")),
            }
        }
        "/log" => {
            println!("probe says {query}");
            eprintln!("probe warns {query}");
            text(StatusCode::OK, "logged\n".into())
        }
        "/files" => {
            let seen = match std::fs::read_dir("/") {
                Ok(entries) => format!("read_dir ok: {} entries\n", entries.count()),
                Err(e) => format!("read_dir failed: {e}\n"),
            };
            text(StatusCode::OK, seen)
        }
        _ => text(StatusCode::NOT_FOUND, format!("probe has no route {path}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Result<Response<Body>, Error> {
    Ok(Response::builder().status(status).body(body.into())?)
}
