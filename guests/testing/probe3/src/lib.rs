//! A WASI 0.3 test program (spin-sdk 7): one route per behaviour Atoll must contain or serve.
//!
//! - `/` answers `probe3 N`, N counting the requests this instance served (always 1 with a fresh
//!   instance per request) and logs `probe3 served` to stdout; `/echo` answers the request body's length and its first bytes;
//! - `/sleep?ms=N` waits N ms (an async wait: no wasm runs meanwhile), then answers;
//! - `/loop` computes forever; `/grow` allocates until memory runs out; `/trap` panics;
//! - `/forever` answers 200 and a body that never ends (a line every 10 ms);
//! - `/fetch?url=URL` calls URL (outbound `wasi:http@0.3`): `fetched: STATUS`, or 502 and the error;
//! - `/kv-burst?n=N` starts N Spin key-value `set`s at once: `ok OK refused REFUSED`;
//! - `/big?n=N` answers N bytes, written in 64 KiB chunks after the response is returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::SinkExt;
use spin_sdk::http::body::{IncomingBodyExt, stream};
use spin_sdk::http::{BoxBody, Request, box_body};
use spin_sdk::http_service;

fn query(request: &Request, name: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.parse().ok())?
    })
}

#[http_service]
async fn probe(request: Request) -> anyhow::Result<Response> {
    let path = request.uri().path().to_owned();
    match path.as_str() {
        "/echo" => {
            let body = request.into_body().bytes().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let head = String::from_utf8_lossy(&body[..body.len().min(16)]).into_owned();
            text(format!("{} {head}\n", body.len()))
        }
        "/fetch" => {
            let url =
                request.uri().query().and_then(|q| q.strip_prefix("url=")).unwrap_or_default().to_owned();
            match spin_sdk::http::get(url).await {
                Ok(response) => text(format!("fetched: {}\n", response.status().as_u16())),
                Err(e) => {
                    let mut response = Response::new(box_body(http_body_util::Full::new(
                        bytes::Bytes::from(format!("{e:?}\n")),
                    )));
                    *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                    Ok(response)
                }
            }
        }
        "/kv-burst" => {
            let n = query(&request, "n").unwrap_or(40);
            let store = spin_sdk::key_value::Store::open_default().await?;
            let writes = (0..n).map(|i| store.set(format!("burst-{i}"), vec![b'x'; 1024]));
            let results = futures::future::join_all(writes).await;
            let ok = results.iter().filter(|r| r.is_ok()).count();
            text(format!("ok {ok} refused {}\n", results.len() - ok))
        }
        "/sleep" => {
            let ms = query(&request, "ms").unwrap_or(100);
            spin_sdk::time::sleep(Duration::from_millis(ms)).await;
            text(format!("slept {ms} ms\n"))
        }
        "/loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "/grow" => {
            let mut held = Vec::new();
            loop {
                held.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&held);
            }
        }
        "/trap" => panic!("probe3 traps on purpose"),
        "/forever" => {
            let (mut tx, body) = stream::<String>();
            spin_sdk::wasip3::spawn(async move {
                for i in 0u64.. {
                    if tx.send(format!("line {i}\n")).await.is_err() {
                        break;
                    }
                    spin_sdk::time::sleep(Duration::from_millis(10)).await;
                }
            });
            Ok(Response::new(box_body(body)))
        }
        "/big" => {
            let n = query(&request, "n").unwrap_or(1 << 20) as usize;
            let (mut tx, body) = stream::<Vec<u8>>();
            spin_sdk::wasip3::spawn(async move {
                let mut left = n;
                while left > 0 {
                    let chunk = left.min(64 << 10);
                    if tx.send(vec![b'x'; chunk]).await.is_err() {
                        break;
                    }
                    left -= chunk;
                }
            });
            Ok(Response::new(box_body(body)))
        }
        _ => {
            static SERVED: AtomicU64 = AtomicU64::new(0);
            let n = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
            println!("probe3 served {path}");
            text(format!("probe3 {n}\n"))
        }
    }
}

type Response = http::Response<BoxBody>;

fn text(body: String) -> anyhow::Result<Response> {
    Ok(Response::new(box_body(http_body_util::Full::new(bytes::Bytes::from(body)))))
}
