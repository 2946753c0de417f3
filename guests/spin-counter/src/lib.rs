//! A Spin app (spin-sdk 7) keeping counters, served unchanged by Atoll, its state replicated
//! between sites.
//!
//! - `POST /NAME` adds the variable `step` (one when it is not set: `atoll deploy --var step=N`)
//!   to counter NAME and answers the new total: `wasi:keyvalue`'s atomic increment (which
//!   spin-sdk 7 imports too), so increments at different sites add up;
//! - `GET /NAME` answers the counter through Spin's key-value store (`0` if unset);
//! - `PUT /NAME` sets the value to the request body, `DELETE /NAME` deletes it (Spin's store);
//! - `GET /` lists `name=value` lines of every key (`get-keys`);
//! - `GET /_open/LABEL` opens the store LABEL: `opened`, or Spin's error;
//! - `GET /_var/NAME` answers the variable NAME (Spin's variables), or Spin's error;
//! - `GET /_config/NAME` answers it through `wasi:config` (`none` when unset).

use spin_sdk::http::body::IncomingBodyExt;
use spin_sdk::http::{IntoResponse, Method, Request, StatusCode};
use spin_sdk::http_service;
use spin_sdk::key_value::Store;
use spin_sdk::variables;

#[http_service]
async fn counter(request: Request) -> anyhow::Result<impl IntoResponse> {
    let path = request.uri().path().trim_start_matches('/').to_owned();
    if let Some(label) = path.strip_prefix("_open/") {
        return Ok(match Store::open(label).await {
            Ok(_) => (StatusCode::OK, "opened\n".to_owned()),
            Err(e) => (StatusCode::FORBIDDEN, format!("{e:?}\n")),
        });
    }
    if let Some(name) = path.strip_prefix("_var/") {
        return Ok(match variables::get(name).await {
            Ok(value) => (StatusCode::OK, format!("{value}\n")),
            Err(e) => (StatusCode::NOT_FOUND, format!("{e:?}\n")),
        });
    }
    if let Some(name) = path.strip_prefix("_config/") {
        use spin_sdk::experimental::wasi::config::store as config;
        let value = config::get(name).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        return Ok((StatusCode::OK, format!("{}\n", value.as_deref().unwrap_or("none"))));
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
        let step = match variables::get("step").await {
            Ok(step) => step.trim().parse().map_err(|_| anyhow::anyhow!("the variable step is not a number"))?,
            Err(variables::Error::Undefined(_)) => 1,
            Err(e) => anyhow::bail!("{e:?}"),
        };
        let bucket = store::open("default").map_err(|e| anyhow::anyhow!("{e:?}"))?;
        atomics::increment(&bucket, &path, step).map_err(|e| anyhow::anyhow!("{e:?}"))?.to_string()
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
