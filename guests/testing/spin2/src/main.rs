//! `spin2`: the interfaces a spin-sdk 2–5 app imports (`fermyon:spin/key-value@2.0.0`,
//! `fermyon:spin/variables@2.0.0`) and `wasi:config/store`, bound from the exact WIT Atoll
//! vendors, from a WASI 0.2 handler.
//!
//! | request | does |
//! |---|---|
//! | `GET /kv/LABEL/KEY` | get (404 when absent) |
//! | `PUT /kv/LABEL/KEY` (body) | set |
//! | `DELETE /kv/LABEL/KEY` | delete |
//! | `GET /exists/LABEL/KEY` | `true` or `false` |
//! | `GET /kv/LABEL/` | get-keys, one a line |
//! | `GET /var/NAME` | the variable (Spin's interface), or its error |
//! | `GET /config/NAME` | the variable through `wasi:config` (`none` when unset) |
//! | `GET /config` | every variable through `wasi:config`, `name=value` lines |
//!
//! A store or variable error answers 409 with the error's debug form.

mod bindings {
    wit_bindgen::generate!({
        inline: "package atoll:guest;
            world spin2 {
                import fermyon:spin/key-value@2.0.0;
                import fermyon:spin/variables@2.0.0;
                import wasi:config/store@0.2.0-draft-2024-09-27;
            }",
        path: ["../../../wit/fermyon-spin-2.0.0", "../../../wit/wasi-config-0.2.0-draft-2024-09-27"],
        world: "atoll:guest/spin2",
        generate_all,
    });
}

use bindings::fermyon::spin::{key_value, variables};
use bindings::wasi::config::store as config;
use wstd::http::{Body, Error, Method, Request, Response, StatusCode};

#[wstd::http_server]
async fn main(mut request: Request<Body>) -> Result<Response<Body>, Error> {
    let path = request.uri().path().trim_start_matches('/').to_owned();
    let mut parts = path.splitn(3, '/');
    let (kind, first, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
    match kind {
        "var" => match variables::get(first) {
            Ok(value) => reply(StatusCode::OK, value),
            Err(e) => reply(StatusCode::CONFLICT, format!("{e:?}")),
        },
        "config" if first.is_empty() => match config::get_all() {
            Ok(all) => reply(StatusCode::OK, all.iter().map(|(k, v)| format!("{k}={v}\n")).collect()),
            Err(e) => reply(StatusCode::CONFLICT, format!("{e:?}")),
        },
        "config" => match config::get(first) {
            Ok(value) => reply(StatusCode::OK, value.unwrap_or_else(|| "none".into())),
            Err(e) => reply(StatusCode::CONFLICT, format!("{e:?}")),
        },
        "kv" | "exists" => {
            let store = match key_value::Store::open(first) {
                Ok(store) => store,
                Err(e) => return reply(StatusCode::CONFLICT, format!("{e:?}")),
            };
            let key = rest.unwrap_or("");
            let method = request.method().clone();
            let outcome = if kind == "exists" {
                store.exists(key).map(|e| (StatusCode::OK, e.to_string()))
            } else if key.is_empty() {
                store.get_keys().map(|keys| (StatusCode::OK, keys.iter().map(|k| format!("{k}\n")).collect()))
            } else if method == Method::PUT {
                let body = request.body_mut().bytes_contents().await?;
                store.set(key, &body).map(|()| (StatusCode::OK, "set".into()))
            } else if method == Method::DELETE {
                store.delete(key).map(|()| (StatusCode::OK, "deleted".into()))
            } else {
                store.get(key).map(|v| match v {
                    Some(v) => (StatusCode::OK, String::from_utf8_lossy(&v).into_owned()),
                    None => (StatusCode::NOT_FOUND, String::new()),
                })
            };
            match outcome {
                Ok((status, body)) => reply(status, body),
                Err(e) => reply(StatusCode::CONFLICT, format!("{e:?}")),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "no such route\n".into()),
    }
}

fn reply(status: StatusCode, body: String) -> Result<Response<Body>, Error> {
    Ok(Response::builder().status(status).body(body.into())?)
}
