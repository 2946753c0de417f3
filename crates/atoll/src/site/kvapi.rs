//! An app's key-value data for operators (`atoll kv`), under the admin API (bearer token):
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/_atoll/apps/NAME/kv?bucket=&prefix=&after=&limit=` | 200 `{keys, next, site}` |
//! | GET | `/_atoll/apps/NAME/kv/KEY?bucket=` | 200 the value's bytes; with `format=json`, [`Shown`] |
//! | PUT | `/_atoll/apps/NAME/kv/KEY?bucket=` | 200 [`Shown`] (body: the value) |
//! | POST | `/_atoll/apps/NAME/kv/KEY?bucket=&by=N` | 200 [`Shown`] (an increment, by 1 by default) |
//! | DELETE | `/_atoll/apps/NAME/kv/KEY?bucket=` | 200 [`Shown`] (the tombstone) |
//!
//! Writes take the guests' path (`Store::guest_write`: the HLC stamp, the counters, tombstones,
//! replication, and the same gate: 503 while the site resyncs or its clock is off), so a tool's
//! write is an ordinary write everywhere. Every answer names the site (`x-atoll-site`, `site`)
//! and how fresh its data is (`freshness`: per peer, the replication lag and how far it holds
//! that peer's writes). Errors: 400 (a bound, a bad `by`), 404 (no such app, or key), 409 (an
//! increment of a value that is not a number), 503 (the store is closed to writes).

use std::sync::Arc;

use atoll_kv::{Entry, KvError, Namespace, Register, Write};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::Site;
use super::admin::{ApiError, authorize};

/// The routes, added to the admin API's.
pub(super) fn routes(router: axum::Router<Arc<Site>>) -> axum::Router<Arc<Site>> {
    router
        .route("/_atoll/apps/{name}/kv", axum::routing::get(list))
        .route("/_atoll/apps/{name}/kv/{*key}", axum::routing::get(one).put(one).post(one).delete(one))
}

#[derive(Debug, Deserialize)]
struct KeyQuery {
    #[serde(default)]
    bucket: String,
    format: Option<String>,
    by: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    bucket: String,
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// A key as the site holds it.
#[derive(Debug, Serialize)]
pub(crate) struct Shown {
    app: String,
    bucket: String,
    key: String,
    /// The site that answered.
    site: String,
    /// Deleted (a tombstone), or never written.
    deleted: bool,
    /// What a guest's `get` returns, as text if it is UTF-8.
    value: Option<String>,
    /// The same, base64 (always, when there is a value).
    value_base64: Option<String>,
    /// The write of the register: its clock (`physical_ms.logical`) and writer (`site~incarnation`).
    stamp: Stamp,
    /// The latest change of any part of the entry.
    changed: Stamp,
    /// A counter's parts, per writer (empty for a plain value).
    counter: Vec<Part>,
    /// How fresh this site's data is.
    freshness: Vec<Freshness>,
}

#[derive(Debug, Serialize)]
struct Stamp {
    hlc: String,
    writer: String,
}

#[derive(Debug, Serialize)]
struct Part {
    writer: String,
    up: u64,
    down: u64,
}

/// Per peer: its replication lag and how far this site holds its writes.
#[derive(Debug, Serialize)]
struct Freshness {
    site: String,
    lag_ms: Option<u64>,
    /// The wall-clock ms up to which every write of that site is held here (session frontiers).
    holds_writes_until_ms: Option<u64>,
    last_sync_ms: Option<u64>,
    cut_off: bool,
}

fn freshness(site: &Site) -> Vec<Freshness> {
    let Some(node) = site.sync.get() else { return vec![] };
    node.peers()
        .into_iter()
        .filter(|p| !p.is_self && p.site.is_some())
        .map(|p| Freshness {
            site: p.site.unwrap_or_default(),
            lag_ms: p.lag_ms,
            holds_writes_until_ms: p.frontier_ms,
            last_sync_ms: p.last_sync_ms,
            cut_off: p.cut_off,
        })
        .collect()
}

fn stamp(s: &atoll_kv::Stamp) -> Stamp {
    Stamp { hlc: format!("{}.{}", s.hlc.physical_ms, s.hlc.logical), writer: s.site.clone() }
}

impl Shown {
    fn new(site: &Site, ns: &Namespace, key: &str, entry: &Entry) -> Shown {
        let bytes = entry.read().into_bytes();
        Shown {
            app: ns.app().to_owned(),
            bucket: ns.bucket().to_owned(),
            key: key.to_owned(),
            site: site.name.clone(),
            deleted: bytes.is_none(),
            value: bytes.as_deref().and_then(|b| std::str::from_utf8(b).ok()).map(str::to_owned),
            value_base64: bytes.map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            stamp: stamp(&entry.stamp),
            changed: stamp(&entry.changed),
            counter: entry
                .counter
                .iter()
                .map(|(writer, c)| Part { writer: writer.clone(), up: c.up, down: c.down })
                .collect(),
            freshness: freshness(site),
        }
    }
}

fn kv_error(e: KvError) -> ApiError {
    let status = match &e {
        KvError::TooLarge { .. } => StatusCode::BAD_REQUEST,
        KvError::Entry(_) => StatusCode::CONFLICT,
        KvError::Unavailable(_) | KvError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

/// The namespace of `bucket` of the app `name`, which must be deployed here.
fn namespace(site: &Site, name: &str, bucket: &str) -> Result<Namespace, ApiError> {
    if site.app(name).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no app named {name:?} is deployed on this site"),
        ));
    }
    Namespace::new(name, bucket, site.kv.bounds()).map_err(kv_error)
}

fn with_site(site: &Site, mut response: Response) -> Response {
    if let Some(v) = &site.name_header {
        response.headers_mut().insert(HeaderName::from_static(super::routing::SITE_HEADER), v.clone());
    }
    response
}

async fn list(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&site, &headers)?;
    let ns = namespace(&site, &name, &q.bucket)?;
    site.kv.gate().map_err(kv_error)?;
    let limit = q.limit.unwrap_or(site.kv.bounds().max_page);
    let (keys, next) = site
        .kv
        .list_prefix(&ns, q.prefix.as_bytes(), q.after.as_deref().map(str::as_bytes), limit)
        .map_err(kv_error)?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let body = serde_json::json!({
        "app": name,
        "bucket": ns.bucket(),
        "keys": keys.into_iter().map(text).collect::<Vec<_>>(),
        "next": next.map(text),
        "site": site.name,
        "freshness": freshness(&site),
    });
    Ok(with_site(&site, Json(body).into_response()))
}

async fn one(
    State(site): State<Arc<Site>>,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<KeyQuery>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&site, &headers)?;
    let ns = namespace(&site, &name, &q.bucket)?;
    let store = &site.kv;
    // HEAD is a GET without the body (axum runs `get` handlers for it): it reads, never writes.
    let reads = method == Method::GET || method == Method::HEAD;
    let write = match method {
        Method::GET | Method::HEAD => None,
        Method::PUT => {
            let max = store.bounds().max_value;
            let too_large = || {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the value is over the limit of {max} bytes"),
                )
            };
            let value = axum::body::to_bytes(body, max).await.map_err(|e| {
                if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
                    too_large()
                } else {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the value: {e}"))
                }
            })?;
            Some(Write::Set(value.to_vec()))
        }
        Method::POST => {
            let by = q.by.as_deref().unwrap_or("1");
            let by: i64 = by.parse().map_err(|_| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("by={by:?} is not a whole number"))
            })?;
            Some(Write::Increment(by))
        }
        Method::DELETE => Some(Write::Delete),
        other => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{other} is not a key-value operation: GET, HEAD, PUT, POST (increment) or DELETE"),
            ));
        }
    };
    if let Some(write) = write {
        store.write_gate().map_err(kv_error)?;
        store.guest_write(&ns, key.as_bytes(), write).await.map_err(kv_error)?;
    } else {
        store.gate().map_err(kv_error)?;
    }
    let entry = store.entry_of(&ns, key.as_bytes()).map_err(kv_error)?;
    let entry = match entry {
        Some(e) => e,
        None if reads => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no key {key:?} in bucket {} of {name} at {}", ns.bucket(), site.name),
            ));
        }
        None => Entry::absent(),
    };
    let json = q.format.as_deref() == Some("json") || !reads;
    if json {
        return Ok(with_site(&site, Json(Shown::new(&site, &ns, &key, &entry)).into_response()));
    }
    let Some(bytes) = entry.read().into_bytes() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("key {key:?} in bucket {} of {name} was deleted (at {})", ns.bucket(), site.name),
        ));
    };
    let mut response = Response::new(Body::from(bytes));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}.{} {}",
        entry.stamp.hlc.physical_ms, entry.stamp.hlc.logical, entry.stamp.site
    )) {
        headers.insert("x-atoll-kv-stamp", v);
    }
    if matches!(entry.register, Register::Value(_)) && !entry.counter.is_empty() {
        headers.insert("x-atoll-kv-counter", HeaderValue::from_static("1"));
    }
    Ok(with_site(&site, response))
}
