//! The HTTP transport: the client side ([`HttpTransport`]) and the `/_atoll/sync/` endpoints
//! ([`routes`]). The client speaks HTTP/2 to its peers: one multiplexed connection per peer, and
//! headers that HPACK shrinks to a few bytes per round trip; with prior knowledge (h2c) to
//! `http://` peers, over TLS (ALPN h2) to `https://` ones.
//!
//! - `POST /_atoll/sync`: one [`Request`] in, one [`Reply`] out, both as
//!   [`crate::message`] bytes signed with the peer secret ([`crate::auth`]). The proof's head
//!   is checked before the body is read: no valid head, 401 with nothing of the body read; a
//!   signed length over [`MAX_MESSAGE`], 413. Then the whole proof: invalid, 401; a replayed
//!   request, 409; malformed or unknown-version body, 400. Nothing is changed in any case.
//! - `GET /_atoll/sync/blobs/{version}`: a deployed component's bytes by version (SHA-256 hex),
//!   for deploy replication; signed like a request with an empty body.
//! - `GET /_atoll/sync/status`: this site's replication as JSON: per peer the last successful
//!   sync, entries and bytes each way, lag, pending pushes and the last error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::auth::{self, Secret};
use crate::message::{self, MAX_MESSAGE, Reply, Request, hlc_wire};
use crate::node::{Exchange, Node, Transport};
use crate::store::SyncStore;

/// The largest component a peer fetches (a site's upload cap may not exceed it, so every
/// deployable component replicates).
pub const MAX_BLOB: usize = 64 << 20;

/// The most a sync request outside the time window may carry to be read at all (a hello, to
/// show which site's clock is off).
const MAX_STALE_HELLO: u64 = 64 << 10;

/// How long a sync request's body may take to arrive once its head is checked.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of the sync endpoint.
pub const SYNC_PATH: &str = "/_atoll/sync";

/// Milliseconds since the Unix epoch, from the system clock (the store's, so an injected
/// development skew moves both).
pub fn wall_ms() -> u64 {
    atoll_kv::hlc::wall_ms()
}

/// What the transport connects with: `http://` as is, `https://` with TLS.
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A connector for peers, giving up on connecting after `timeout`: `https://` peers verified
/// with `tls` against `server_name` when given (peers reached by address whose certificates
/// carry one shared name), else the URL's host. With `tls`, only `https://` peers are reached
/// (an `http://` one learned from a peer or DNS is refused, not talked to in the clear);
/// without, `http://` ones too, and `https://` ones verified with the public web roots.
pub fn connector(
    tls: Option<rustls::ClientConfig>,
    server_name: Option<rustls::pki_types::ServerName<'static>>,
    timeout: Duration,
) -> Connector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    http.enforce_http(false);
    let builder = match tls {
        Some(tls) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only(),
        None => {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
            let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http()
        }
    };
    let builder = match server_name {
        Some(name) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name)),
        None => builder,
    };
    builder.enable_http2().wrap_connector(http)
}

/// Sends sync requests over HTTP/2 with one pooled connection per peer.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: Client<Connector, Full<Bytes>>,
    secret: Secret,
    timeout: Duration,
}

impl HttpTransport {
    /// A transport proving `secret`, giving up on a request after `timeout` (`https://` peers
    /// verified with the public web roots).
    pub fn new(secret: Secret, timeout: Duration) -> HttpTransport {
        HttpTransport::with_connector(secret, timeout, connector(None, None, timeout))
    }

    /// [`HttpTransport::new`] connecting with `connector` (see [`connector`]).
    pub fn with_connector(secret: Secret, timeout: Duration, connector: Connector) -> HttpTransport {
        // HTTP/2 (with prior knowledge over plain TCP): one multiplexed connection per peer,
        // and HPACK makes the headers repeated on every round trip cost a few bytes.
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpTransport { client, secret, timeout }
    }

    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<(http::response::Parts, Bytes)> {
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .context("timed out")?
            .context("cannot connect")?;
        let (parts, body) = response.into_parts();
        let limited = http_body_util::Limited::new(body, limit);
        let body = tokio::time::timeout(self.timeout, limited.collect())
            .await
            .context("timed out reading the answer")?
            .map_err(|e| anyhow::anyhow!("cannot read the answer: {e}"))?
            .to_bytes();
        Ok((parts, body))
    }

    /// Fetches a component by version from the site at `url`, checking its SHA-256.
    pub async fn fetch_blob(&self, url: &str, version: &str) -> Result<Vec<u8>> {
        use sha2::Digest;
        if !is_version(version) {
            bail!("{version:?} is not a component version (SHA-256 hex)");
        }
        let path = format!("{SYNC_PATH}/blobs/{version}");
        let request = http::Request::get(format!("{url}{path}"))
            .header(auth::HEADER, self.secret.sign(wall_ms(), "", &path, b""))
            .body(Full::new(Bytes::new()))?;
        let (parts, body) = self.send(request, MAX_BLOB).await?;
        if parts.status != StatusCode::OK {
            bail!("{url} answered {} for component {version}", parts.status);
        }
        let hash: String = sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
        if hash != version {
            bail!("{url} sent bytes with SHA-256 {hash} for component {version}");
        }
        Ok(body.to_vec())
    }
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + 2
}

impl Transport for HttpTransport {
    async fn call(&self, url: &str, to: &str, request: Request) -> Result<Exchange> {
        let body = message::encode(&request);
        let request_proof = self.secret.sign(wall_ms(), to, SYNC_PATH, &body);
        let request = http::Request::post(format!("{url}{SYNC_PATH}"))
            .header(auth::HEADER, request_proof.as_str())
            .body(Full::new(Bytes::from(body)))?;
        let body_len = body_len_of(&request);
        // Approximate: the headers' plain size (HTTP/2 compresses them; the exact count on the
        // wire is what `cargo bench -p atoll-sync --bench reconcile` measures).
        let sent_bytes = body_len + header_bytes(request.headers()) + url.len() + 70;
        let sent_at = wall_ms();
        let (parts, bytes) = self.send(request, MAX_MESSAGE).await.with_context(|| url.to_string())?;
        let received_at = wall_ms();
        if parts.status != StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            // A peer that refused the proof's timestamp says what time it is: the offset.
            let time_proof = parts.headers.get(TIME_HEADER).and_then(|v| v.to_str().ok());
            if parts.status == StatusCode::UNAUTHORIZED
                && let Ok(theirs) = self.secret.signed_at(time_proof, "", &clock_purpose(&request_proof), b"")
            {
                let ours = sent_at / 2 + received_at / 2;
                let offset_ms = message::offset_ms(theirs.at_ms, ours);
                return Err(ClockOffset { offset_ms, detail: format!("{url} answered 401: {text}") }.into());
            }
            bail!("{url} answered {}: {text}", parts.status);
        }
        // The answer must be signed for this very request: a captured answer to another (an
        // empty round, say) proves nothing here.
        let proof = parts.headers.get(auth::HEADER).and_then(|v| v.to_str().ok());
        let purpose = Secret::reply_purpose(&request_proof);
        if let Err(e) = self.secret.verify(proof, received_at, "", &purpose, &bytes) {
            if let auth::AuthError::Stale(_) = e
                && let Ok(at) = self.secret.signed_at(proof, "", &purpose, &bytes)
            {
                let offset_ms = message::offset_ms(at.at_ms, received_at);
                return Err(ClockOffset { offset_ms, detail: format!("{url}'s answer: {e}") }.into());
            }
            return Err(anyhow::Error::new(e).context(format!("{url}'s answer")));
        }
        let reply: Reply = message::decode(&bytes).with_context(|| format!("{url}'s answer"))?;
        let received_bytes = bytes.len() + header_bytes(&parts.headers) + 17;
        Ok(Exchange {
            reply,
            sent_bytes,
            received_bytes,
            sent_payload: body_len,
            received_payload: bytes.len(),
        })
    }
}

fn body_len_of(request: &http::Request<Full<Bytes>>) -> usize {
    use hyper::body::Body as _;
    request.body().size_hint().exact().unwrap_or(0) as usize
}

/// Where the sync endpoints find a component's bytes by version.
pub trait Blobs: Send + Sync {
    /// The component with this version, if this site has it.
    fn blob(&self, version: &str) -> Option<Vec<u8>>;
}

/// What the sync endpoints serve.
pub struct Server<S> {
    /// This site's replication.
    pub node: Arc<Node<S>>,
    /// The peer secret.
    pub secret: Secret,
    /// Components by version.
    pub blobs: Arc<dyn Blobs>,
    /// The nonces of the requests taken lately (a replay is refused).
    pub replays: auth::Replays,
}

impl<S> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

/// On a 401, the refusing site's wall clock, signed like an answer to the refused request
/// (purpose `clock` and the request's proof, empty body): a caller whose clock is off learns by
/// how much, and nobody without the secret can tell it otherwise, nor replay an old one.
pub const TIME_HEADER: &str = "x-atoll-time";

fn clock_purpose(request_proof: &str) -> String {
    format!("clock\n{request_proof}")
}

/// A peer could not be talked to because the two clocks are further apart than the signature
/// window: the offset (the peer's clock minus this site's, in ms) is known all the same.
#[derive(Debug, thiserror::Error)]
#[error("{detail} (its clock is {offset_ms} ms from this site's)")]
pub struct ClockOffset {
    /// The peer's clock minus this site's (ms).
    pub offset_ms: i64,
    /// What happened.
    pub detail: String,
}

/// The `/_atoll/sync/` routes.
pub fn routes<S: SyncStore + 'static>(server: Arc<Server<S>>) -> axum::Router {
    axum::Router::new()
        .route(SYNC_PATH, post(sync::<S>))
        .route("/_atoll/sync/blobs/{version}", get(blob::<S>))
        .route("/_atoll/sync/status", get(status::<S>))
        .with_state(server)
}

fn refuse(status: StatusCode, reason: impl std::fmt::Display) -> Response {
    (status, format!("{reason}\n")).into_response()
}

async fn sync<S: SyncStore>(
    State(server): State<Arc<Server<S>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let proof = headers.get(auth::HEADER).and_then(|v| v.to_str().ok());
    let me = server.node.me().site.clone();
    // The head of the proof first: a sender without the secret, a replayed head and one out of
    // the time window are refused before a byte of the body is read (a stale one may still
    // carry a small hello, read to show which site's clock is off); the rest is read for the
    // length it signs, within a time limit.
    let now = wall_ms();
    let head =
        server.secret.head(proof, &me, SYNC_PATH).or_else(|_| server.secret.head(proof, "", SYNC_PATH));
    let len = match head {
        Ok(head) if head.len > MAX_MESSAGE as u64 => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("sync message over the limit of {MAX_MESSAGE} bytes"),
            );
        }
        Ok(head) if server.replays.seen(head.nonce) => {
            tracing::warn!("refused a replayed sync request");
            return refuse(StatusCode::CONFLICT, "this request was taken already (a replay)");
        }
        Ok(head) if now.abs_diff(head.at_ms) > auth::MAX_AGE_MS && head.len > MAX_STALE_HELLO => {
            return unauthorized(
                &server.secret,
                proof,
                now,
                auth::AuthError::Stale(now.abs_diff(head.at_ms)),
            );
        }
        Ok(head) => head.len as usize,
        Err(e) => return unauthorized(&server.secret, proof, now, e),
    };
    let read = http_body_util::Limited::new(body, len).collect();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => return refuse(StatusCode::BAD_REQUEST, format!("cannot read the sync message: {e}")),
        Err(_) => {
            let reason = format!("the sync message did not arrive within {BODY_TIMEOUT:?}");
            return refuse(StatusCode::REQUEST_TIMEOUT, reason);
        }
    };
    let now = wall_ms();
    // For this site by name; or for no one in particular, which only a hello may be (its sender
    // may know this site by address only).
    let verified = match server.secret.verify(proof, now, &me, SYNC_PATH, &bytes) {
        Err(auth::AuthError::BadSignature) => {
            server.secret.verify(proof, now, "", SYNC_PATH, &bytes).map(|p| (p, false))
        }
        other => other.map(|p| (p, true)),
    };
    let (verified, addressed) = match verified {
        Ok(v) => v,
        Err(e) => {
            // A genuine hello (the signature holds) from a site whose clock is too far off to
            // talk: show who it says it is (a replay of an old hello looks the same, so this
            // only flags; offsets come from this site's own requests), and admit nothing.
            if let auth::AuthError::Stale(_) = e
                && let Ok(at) = server
                    .secret
                    .signed_at(proof, &me, SYNC_PATH, &bytes)
                    .or_else(|_| server.secret.signed_at(proof, "", SYNC_PATH, &bytes))
                && let Ok(Request::Hello(hello)) = message::decode::<Request>(&bytes)
            {
                let offset = message::offset_ms(at.at_ms, now);
                server.node.note_clock_too_far(&hello.me, offset, now);
            }
            return unauthorized(&server.secret, proof, now, e);
        }
    };
    let request: Request = match message::decode(&bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("refused a sync request: {e}");
            return refuse(StatusCode::BAD_REQUEST, e);
        }
    };
    if !addressed && !matches!(request, Request::Hello(_)) {
        tracing::warn!("refused a sync request signed for another site");
        return refuse(StatusCode::UNAUTHORIZED, "this request was signed for another site");
    }
    if !server.replays.first_time(verified, now) {
        tracing::warn!("refused a replayed sync request");
        return refuse(StatusCode::CONFLICT, "this request was taken already (a replay)");
    }
    let request_proof = proof.unwrap_or("");
    match server.node.handle(request, now).await {
        Ok(reply) => {
            let body = message::encode(&reply);
            let proof = server.secret.sign(wall_ms(), "", &Secret::reply_purpose(request_proof), &body);
            (
                [(auth::HEADER, proof.as_str()), (header::CONTENT_TYPE.as_str(), "application/octet-stream")],
                body,
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!("sync request failed: {e:#}");
            refuse(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
        }
    }
}

/// 401, with this site's time signed for the refused request: a caller whose clock is off
/// learns by how much (it proves nothing else).
fn unauthorized(secret: &Secret, proof: Option<&str>, now: u64, e: auth::AuthError) -> Response {
    tracing::warn!("refused a sync request: {e}");
    let time = secret.sign(now, "", &clock_purpose(proof.unwrap_or("")), b"");
    (StatusCode::UNAUTHORIZED, [(TIME_HEADER, time)], format!("{e}\n")).into_response()
}

async fn blob<S: SyncStore>(
    State(server): State<Arc<Server<S>>>,
    Path(version): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !is_version(&version) {
        return refuse(StatusCode::BAD_REQUEST, "a component version is 64 lowercase hex digits");
    }
    let path = format!("{SYNC_PATH}/blobs/{version}");
    let proof = headers.get(auth::HEADER).and_then(|v| v.to_str().ok());
    if let Err(e) = server.secret.verify(proof, wall_ms(), "", &path, b"") {
        return refuse(StatusCode::UNAUTHORIZED, e);
    }
    match server.blobs.blob(&version) {
        Some(bytes) => ([(header::CONTENT_TYPE, "application/wasm")], bytes).into_response(),
        None => refuse(StatusCode::NOT_FOUND, format!("no component with version {version} here")),
    }
}

/// Whether `version` is a SHA-256 in lowercase hex (checked before it is used in a path).
fn is_version(version: &str) -> bool {
    version.len() == 64 && version.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// This site's replication status as JSON.
pub fn status_json<S: SyncStore>(node: &Node<S>) -> serde_json::Value {
    let (p, l) = hlc_wire(node.store().now());
    serde_json::json!({
        "site": node.me().site,
        "region": node.me().region,
        "url": node.me().url,
        "hlc": format!("{p}.{l}"),
        "tombstones_collected_before": node.collected().to_string(),
        "peers": node.peers(),
    })
}

async fn status<S: SyncStore>(State(server): State<Arc<Server<S>>>) -> Response {
    axum::Json(status_json(&server.node)).into_response()
}
