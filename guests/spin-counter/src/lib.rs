//! A Spin app (spin-sdk 7) keeping counters, served unchanged by Atoll, its state replicated
//! between sites.
//!
//! - `POST /NAME` adds one to counter NAME and answers the new total: `wasi:keyvalue`'s atomic
//!   increment (which spin-sdk 7 imports too), so increments at different sites add up;
//! - `GET /NAME` answers the counter through Spin's key-value store (`0` if unset);
//! - `PUT /NAME` sets the value to the request body, `DELETE /NAME` deletes it (Spin's store);
//! - `GET /` lists `name=value` lines of every key (`get-keys`);
//! - `GET /_open/LABEL` opens the store LABEL: `opened`, or Spin's error.

use spin_sdk::http::body::IncomingBodyExt;
use spin_sdk::http::{IntoResponse, Method, Request, StatusCode};
use spin_sdk::http_service;
use spin_sdk::key_value::Store;

#[http_service]
async fn counter(request: Request) -> anyhow::Result<impl IntoResponse> {
    let path = request.uri().path().trim_start_matches('/').to_owned();
    if let Some(label) = path.strip_prefix("_open/") {
        return Ok(match Store::open(label).await {
            Ok(_) => (StatusCode::OK, "opened\n".to_owned()),
            Err(e) => (StatusCode::FORBIDDEN, format!("{e:?}\n")),
        });
    }
    let store = Store::open_default().await?;
    if path.is_empty() {
        let mut lines = String::new();
        for key in store.get_keys().await.collect().await? {
            let value = store.get(&key).await?.unwrap_or_default();
            lines.push_str(&format!("{key}={}\n", String::from_utf8_lossy(&value)));
        }
        return Ok((StatusCode::OK, lines));
    }
    let method = request.method().clone();
    let answer = if method == Method::POST {
        use spin_sdk::experimental::wasi::keyvalue::{atomics, store};
        let bucket = store::open("default").map_err(|e| anyhow::anyhow!("{e:?}"))?;
        atomics::increment(&bucket, &path, 1).map_err(|e| anyhow::anyhow!("{e:?}"))?.to_string()
    } else if method == Method::PUT {
        let body = request.into_body().bytes().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        store.set(&path, &body).await?;
        String::from_utf8_lossy(&body).into_owned()
    } else if method == Method::DELETE {
        store.delete(&path).await?;
        "deleted".to_owned()
    } else {
        let value = store.get(&path).await?;
        value.map_or_else(|| "0".to_owned(), |v| String::from_utf8_lossy(&v).into_owned())
    };
    Ok((StatusCode::OK, format!("{answer}\n")))
}
