//! `Idempotency-Key` (the IETF httpapi draft's header): a request that is not safe (POST, PUT,
//! PATCH, DELETE) carrying one runs its app's handler at most once per app and key at a site,
//! and once across sites when the first attempt's record has replicated (milliseconds; see
//! ARCHITECTURE.md, "Idempotent retries"); a retry gets the first response again.
//!
//! The record lives in the reserved, replicated namespace `_atoll`/`idem`, under `APP\nKEY`:
//! `running` (which site and boot run it) is written before the handler runs, `done` (status,
//! headers, body up to [`MAX_STORED_BODY`]) after; both expire after [`TTL_MS`] and are then
//! deleted by [`sweep`] (the tombstones are collected as any others). A retry finds:
//! - `done`: the stored response, with `idempotent-replayed: true` (422 if the key was used for
//!   another method or path; 409 if the response was too large or streamed to be kept);
//! - `running` at this site: it waits for the first attempt, up to its deadline, then 409;
//! - `running` at another live site: forwarded there (which does the same);
//! - `running` at a site that is down or restarted since: 409, since whether the first attempt
//!   took effect is not known (at most once wins over exactly once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_kv::{Namespace, Touched, Write, Written};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::Site;

/// The request header.
pub(crate) const KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on a response replayed from the record.
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// How long a record is kept.
pub(crate) const TTL_MS: u64 = 24 * 3600 * 1000;
/// The most of a response body kept for replay (a record is one store value of at most 1 MiB).
pub(crate) const MAX_STORED_BODY: usize = 512 << 10;
/// The reserved bucket.
pub(crate) const BUCKET: &str = "idem";

/// One key's record. Fields a later version adds are ignored (a site of this version still
/// admits and replays such a record).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    /// `running` or `done`.
    state: String,
    /// The site running or that ran it, and that site's boot then.
    site: String,
    boot: u64,
    /// What the key was first used for (`METHOD path?query`).
    request: String,
    expires_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    /// The body, base64; absent when it was too large or streamed to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    /// What the first attempt read and wrote (site name, clock `physical_ms.logical`): a replay
    /// shows what it showed, so its session token asks for as much.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    saw: Vec<(String, u64, u32)>,
}

/// What to do with a keyed request.
pub(crate) enum Begin {
    /// Run it; [`Running::finish`] records the response.
    Run(Running),
    /// Answered from the record, or refused.
    Answer(Response),
    /// The first attempt runs at this live site: send the retry there.
    Forward(String),
}

/// A keyed request being run here. Dropped before [`Running::finish`] or [`Running::release`]
/// (the client went away and the guest's task with it), it is recorded as interrupted.
pub(crate) struct Running {
    site: Arc<Site>,
    ns: Namespace,
    key: Vec<u8>,
    record: Record,
    settled: bool,
    /// The request's: the records it writes are part of what its client saw.
    touched: Arc<Touched>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (site, ns, key, mut record) =
            (self.site.clone(), self.ns.clone(), self.key.clone(), self.record.clone());
        record.state = "interrupted".into();
        runtime.spawn(async move {
            let value = serde_json::to_vec(&record).unwrap_or_default();
            if let Err(e) = site.kv.write(&ns, &key, Write::Set(value)).await {
                tracing::warn!("cannot record an interrupted idempotent request: {e}");
            }
        });
    }
}

fn namespace(site: &Site) -> Namespace {
    Namespace::new("_atoll", BUCKET, site.kv.bounds()).expect("a valid reserved namespace")
}

/// The key of a request that needs one checked: `Ok(None)` for a safe method or no header.
pub(crate) fn key_of(method: &Method, headers: &HeaderMap) -> Result<Option<String>, String> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE) {
        return Ok(None);
    }
    let Some(value) = headers.get(&KEY_HEADER) else { return Ok(None) };
    let text = value.to_str().unwrap_or_default().trim();
    // The draft's sf-string, quoted or not: 1 to 255 visible ASCII characters.
    let text = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    if text.is_empty() || text.len() > 255 || !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err("Idempotency-Key must be 1 to 255 visible ASCII characters".into());
    }
    Ok(Some(text.to_owned()))
}

/// What a key is bound to: the method, the path and query, and (hashed) the credentials, so a
/// key another caller reuses or guesses does not replay someone else's response.
pub(crate) fn describe(request: &axum::extract::Request) -> String {
    use sha2::Digest;
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut line = format!("{} {path}", request.method());
    if let Some(auth) = request.headers().get(header::AUTHORIZATION) {
        let digest = sha2::Sha256::digest(auth.as_bytes());
        let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        line.push_str(&format!(" (credentials {short})"));
    }
    line
}

/// Set on a retry forwarded to the site running the first attempt (which does not forward it on).
const FORWARDED: HeaderName = HeaderName::from_static("x-atoll-idempotent-forwarded");

pub(crate) fn forwarded(request: &axum::extract::Request) -> bool {
    request.headers().contains_key(FORWARDED)
}

pub(crate) fn mark_forwarded(request: &mut axum::extract::Request, me: &str) {
    if let Ok(v) = HeaderValue::from_str(me) {
        request.headers_mut().insert(FORWARDED, v);
    }
}

fn now_ms() -> u64 {
    atoll_kv::hlc::wall_ms()
}

fn text(status: StatusCode, body: String) -> Response {
    let mut r = super::routing::text(status, body);
    if status == StatusCode::CONFLICT {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// The stored bytes (what a claim compares against) and the record, if one that has not expired.
fn read(
    site: &Site,
    ns: &Namespace,
    key: &[u8],
    touched: &Touched,
) -> Result<(Option<Vec<u8>>, Option<Record>), String> {
    let bytes = site.kv.get_noting(ns, key, Some(touched)).map_err(|e| format!("{e}"))?;
    let record = bytes
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Record>(b).ok())
        .filter(|r| r.expires_ms > now_ms());
    Ok((bytes, record))
}

/// Decides what a request with `key` for `app` does here. The records it reads and writes are
/// noted in `touched` (the request's session token then covers them: a retry elsewhere with it
/// finds the record, or is refused).
pub(crate) async fn begin(
    site: &Arc<Site>,
    app: &str,
    key: &str,
    request: String,
    deadline: Duration,
    touched: &Arc<Touched>,
    after: Option<&str>,
) -> Begin {
    let ns = namespace(site);
    let composite = format!("{app}\n{key}").into_bytes();
    let boot = site.kv.identity().boot_nonce;
    let waited_until = Instant::now() + deadline.min(Duration::from_secs(10));
    // A router's retry after `after` failed with the request in flight: its record may still be
    // on its way here.
    let record_until = Instant::now() + site.session_wait;
    loop {
        let (stored, held) = match read(site, &ns, &composite, touched) {
            Ok(read) => read,
            Err(e) => return Begin::Answer(text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))),
        };
        if let (None, Some(first)) = (&held, after) {
            if Instant::now() < record_until {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            metrics::counter!("atoll_idempotency_total", "outcome" => "unknown").increment(1);
            return Begin::Answer(text(
                StatusCode::CONFLICT,
                format!(
                    "this request was sent to {first} first, which failed with it in flight, and no record of it \
                     has reached this site: whether it took effect there is not known, so it is not run again \
                     (use a new key to run it anyway)\n"
                ),
            ));
        }
        let Some(held) = held else {
            // Claim it here: a compare-and-swap on what was read, so two requests at this site
            // cannot both run (the loser reads the winner's record next round).
            let record = Record {
                state: "running".into(),
                site: site.name.clone(),
                boot,
                request: request.clone(),
                expires_ms: now_ms() + TTL_MS,
                status: None,
                headers: vec![],
                body: None,
                saw: vec![],
            };
            // Against the very bytes read: a claim committed since (another server thread) fails it.
            let new = serde_json::to_vec(&record).unwrap_or_default();
            match site.kv.write(&ns, &composite, Write::CompareAndSwap { expected: stored, new }).await {
                Ok(Written::Swapped(true)) => {
                    site.kv.note_write(touched, &ns, None).ok();
                    return Begin::Run(Running {
                        site: site.clone(),
                        ns,
                        key: composite,
                        record,
                        settled: false,
                        touched: touched.clone(),
                    });
                }
                Ok(_) => continue,
                Err(e) => {
                    return Begin::Answer(text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot record the Idempotency-Key: {e}\n"),
                    ));
                }
            }
        };
        if held.request != request {
            return Begin::Answer(text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("this Idempotency-Key was used for {} first, not {request}\n", held.request),
            ));
        }
        if held.state == "done" {
            let saw: Vec<(String, atoll_kv::Hlc)> = held
                .saw
                .iter()
                .map(|(name, physical_ms, logical)| {
                    (name.clone(), atoll_kv::Hlc { physical_ms: *physical_ms, logical: *logical })
                })
                .collect();
            touched.all(&saw);
            return Begin::Answer(replay(&held));
        }
        if held.state == "interrupted" {
            return Begin::Answer(text(
                StatusCode::CONFLICT,
                format!(
                    "the first request with this Idempotency-Key was cut off at {} (its client went away) while \
                     running: whether it took effect is not known, so it is not run again (use a new key to run it \
                     anyway)\n",
                    held.site
                ),
            ));
        }
        let here = held.site == site.name;
        if here && held.boot == boot {
            // The first attempt runs here now: wait for it.
            if Instant::now() < waited_until {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            return Begin::Answer(text(
                StatusCode::CONFLICT,
                "a request with this Idempotency-Key is still running: retry later\n".into(),
            ));
        }
        let live = !here
            && site
                .router
                .sites()
                .iter()
                .any(|s| s.is_live() && s.snapshot().name.as_deref() == Some(&held.site));
        if live {
            return Begin::Forward(held.site);
        }
        metrics::counter!("atoll_idempotency_total", "outcome" => "unknown").increment(1);
        return Begin::Answer(text(
            StatusCode::CONFLICT,
            format!(
                "the first request with this Idempotency-Key ran at {}, which {} while running it: whether it \
                 took effect is not known here, so it is not run again (use a new key to run it anyway)\n",
                held.site,
                if here { "restarted" } else { "is down" }
            ),
        ));
    }
}

/// The stored response, marked as replayed.
fn replay(held: &Record) -> Response {
    metrics::counter!("atoll_idempotency_total", "outcome" => "replayed").increment(1);
    let Some(body) =
        held.body.as_ref().and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    else {
        return text(
            StatusCode::CONFLICT,
            format!(
                "the request with this Idempotency-Key already ran at {} (status {}); its response was too \
                 large or streamed to be kept\n",
                held.site,
                held.status.unwrap_or(0)
            ),
        );
    };
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = StatusCode::from_u16(held.status.unwrap_or(200)).unwrap_or(StatusCode::OK);
    for (name, value) in &held.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            response.headers_mut().append(n, v);
        }
    }
    response.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

impl Running {
    /// Records the response the handler gave (or its failure's status), for retries.
    pub(crate) async fn finish(mut self, status: StatusCode, headers: &HeaderMap, body: Option<&[u8]>) {
        self.settled = true;
        metrics::counter!("atoll_idempotency_total", "outcome" => "ran").increment(1);
        self.record.state = "done".into();
        self.record.status = Some(status.as_u16());
        self.record.headers = headers
            .iter()
            .filter(|(n, _)| !n.as_str().starts_with("x-atoll-") && *n != header::SET_COOKIE)
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        self.record.body = body
            .filter(|b| b.len() <= MAX_STORED_BODY)
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        self.record.saw =
            self.touched.clocks().into_iter().map(|(name, at)| (name, at.physical_ms, at.logical)).collect();
        let value = serde_json::to_vec(&self.record).unwrap_or_default();
        match self.site.kv.write(&self.ns, &self.key, Write::Set(value)).await {
            Ok(_) => self.site.kv.note_write(&self.touched, &self.ns, None).unwrap_or_default(),
            Err(e) => tracing::warn!("cannot record the response of an idempotent request: {e}"),
        }
    }
}

impl Running {
    /// The handler never ran (refused before it started: busy, a body too large or too slow):
    /// the key is free again.
    pub(crate) async fn release(mut self) {
        self.settled = true;
        if let Err(e) = self.site.kv.write(&self.ns, &self.key, Write::Delete).await {
            tracing::warn!("cannot release an Idempotency-Key: {e}");
        }
    }
}

/// Whether the handler never ran for a request that failed with `e`.
pub(crate) fn never_ran(e: &atoll_runtime::HandleError) -> bool {
    use atoll_runtime::HandleError as E;
    matches!(
        e,
        E::RequestBodyTooLarge { .. }
            | E::RequestBody(_)
            | E::AtCapacity
            | E::AppAtCapacity { .. }
            | E::BodyMemoryFull { .. }
            | E::RequestBodyTimeout { .. }
    )
}

/// Whether `key`/`entry` from another site is an idempotency record this site takes.
pub(crate) fn admit(name: &[u8], entry: &atoll_kv::Entry) -> Result<(), String> {
    let name =
        std::str::from_utf8(name).map_err(|_| "an idempotency record's name is not UTF-8".to_owned())?;
    let (app, _) = name.split_once('\n').ok_or("an idempotency record's name is not APP\\nKEY")?;
    super::admin::validate_name(app).map_err(|_| format!("{app:?} is not an app name"))?;
    match (&entry.register, entry.counter.is_empty()) {
        (atoll_kv::Register::Value(bytes), true) => serde_json::from_slice::<Record>(bytes)
            .map(|_| ())
            .map_err(|_| "an idempotency record does not parse".to_owned()),
        (atoll_kv::Register::Tombstone, true) => Ok(()),
        _ => Err("an idempotency record holds a counter".into()),
    }
}

/// Deletes expired records every ten minutes (their tombstones replicate and are collected).
pub(crate) async fn sweep(site: Arc<Site>) {
    loop {
        tokio::time::sleep(Duration::from_secs(600)).await;
        let ns = namespace(&site);
        let mut cursor: Option<Vec<u8>> = None;
        while let Ok((keys, next)) = site.kv.list_keys(&ns, cursor.as_deref(), 1000) {
            for key in keys {
                let Ok(Some(stored)) = site.kv.get(&ns, &key) else { continue };
                let expired =
                    serde_json::from_slice::<Record>(&stored).map_or(true, |r| r.expires_ms <= now_ms());
                if expired {
                    // Only the expired record read: a claim made on it since (a retry's
                    // compare-and-swap) stays.
                    let _ = site.kv.write(&ns, &key, Write::DeleteIf { expected: stored }).await;
                }
            }
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
    }
}
