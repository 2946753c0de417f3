//! `counter`: `POST /NAME` (or any method but GET) increments the counter `NAME` and answers its
//! new value; `GET /NAME` answers the current value. State lives in `wasi:keyvalue`
//! (`0.2.0-draft2`, the version Spin guests use), in the default bucket.

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/wasi-keyvalue-0.2.0-draft2",
        world: "imports",
        generate_all,
    });
}

use bindings::wasi::keyvalue::{atomics, store};
use wstd::http::{Body, Error, Method, Request, Response, StatusCode};

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, Error> {
    let name = request.uri().path().trim_start_matches('/').to_owned();
    if name.is_empty() {
        return reply(StatusCode::BAD_REQUEST, "name a counter: /NAME\n".into());
    }
    let bucket = match store::open("") {
        Ok(bucket) => bucket,
        Err(e) => return reply(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot open the store: {e:?}\n")),
    };
    let result = if request.method() == Method::GET {
        bucket
            .get(&name)
            .map(|v| v.map_or_else(|| "0".to_owned(), |v| String::from_utf8_lossy(&v).into_owned()))
    } else {
        atomics::increment(&bucket, &name, 1).map(|n| n.to_string())
    };
    match result {
        Ok(value) => reply(StatusCode::OK, format!("{value}\n")),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("store error: {e:?}\n")),
    }
}

fn reply(status: StatusCode, body: String) -> Result<Response<Body>, Error> {
    Ok(Response::builder().status(status).header("content-type", "text/plain").body(body.into())?)
}
