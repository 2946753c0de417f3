//! `todo`: a JSON REST API of to-do items, kept in the `todos` bucket of `wasi:keyvalue`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | 200, every item: `[{"id":1,"title":"…","done":false}, …]` |
//! | `POST /` with `{"title":"…"}` | 201, the new item |
//! | `GET /ID` | 200 the item, 404 |
//! | `DELETE /ID` | 204, 404 |

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/wasi-keyvalue-0.2.0-draft2",
        world: "imports",
        generate_all,
    });
}

use bindings::wasi::keyvalue::{atomics, store};
use serde::{Deserialize, Serialize};
use wstd::http::{Body, Error, Method, Request, Response, StatusCode};

#[derive(Serialize, Deserialize)]
struct Item {
    id: u64,
    title: String,
    done: bool,
}

#[derive(Deserialize)]
struct NewItem {
    title: String,
}

fn key(id: u64) -> String {
    format!("item:{id:012}")
}

#[wstd::http_server]
async fn main(mut request: Request<Body>) -> Result<Response<Body>, Error> {
    let bucket = match store::open("todos") {
        Ok(b) => b,
        Err(e) => return json(StatusCode::SERVICE_UNAVAILABLE, &format!("store unavailable: {e:?}")),
    };
    let path = request.uri().path().trim_matches('/').to_owned();
    let method = request.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "") => {
            let mut items = Vec::new();
            let mut cursor = None;
            loop {
                let page = match bucket.list_keys(cursor.as_deref()) {
                    Ok(page) => page,
                    Err(e) => return json(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:?}")),
                };
                for k in page.keys.iter().filter(|k| k.starts_with("item:")) {
                    if let Ok(Some(bytes)) = bucket.get(k)
                        && let Ok(item) = serde_json::from_slice::<Item>(&bytes)
                    {
                        items.push(item);
                    }
                }
                match page.cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            json(StatusCode::OK, &items)
        }
        (Method::POST, "") => {
            let body = request.body_mut().bytes_contents().await?;
            let Ok(new) = serde_json::from_slice::<NewItem>(&body) else {
                return json(StatusCode::BAD_REQUEST, &"expected {\"title\": \"...\"}");
            };
            let id = match atomics::increment(&bucket, "next-id", 1) {
                Ok(id) => id as u64,
                Err(e) => return json(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:?}")),
            };
            let item = Item { id, title: new.title, done: false };
            match bucket.set(&key(id), &serde_json::to_vec(&item).unwrap_or_default()) {
                Ok(()) => json(StatusCode::CREATED, &item),
                Err(e) => json(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:?}")),
            }
        }
        (method, id) => {
            let Ok(id) = id.parse::<u64>() else {
                return json(StatusCode::NOT_FOUND, &"no such route");
            };
            let found = match bucket.get(&key(id)) {
                Ok(found) => found,
                Err(e) => return json(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:?}")),
            };
            match (method, found) {
                (_, None) => json(StatusCode::NOT_FOUND, &format!("no item {id}")),
                (Method::GET, Some(bytes)) => {
                    Ok(Response::builder().header("content-type", "application/json").body(bytes.into())?)
                }
                (Method::DELETE, Some(_)) => match bucket.delete(&key(id)) {
                    Ok(()) => Ok(Response::builder().status(StatusCode::NO_CONTENT).body(Body::empty())?),
                    Err(e) => json(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:?}")),
                },
                _ => json(StatusCode::METHOD_NOT_ALLOWED, &"use GET or DELETE"),
            }
        }
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Result<Response<Body>, Error> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Ok(Response::builder().status(status).header("content-type", "application/json").body(body.into())?)
}
