//! Proxying a request to the nearest live site, with failover.
//!
//! Retry rule: a request whose connection failed *before it was sent* (connect refused, reset or
//! timed out) goes to the next live site whatever its method: no site saw it. Once sent, only an
//! idempotent request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) whose body can be sent again (none,
//! or buffered because it was small) is retried; anything else gets 502, because the site may
//! have applied it. At most `max_attempts` sites are tried.
//!
//! Bodies stream both ways. A streamed request body is handed to the HTTP client through
//! [`ProxyBody`], which takes it out of a shared slot only when the connection first polls it: if
//! connecting failed, the body is still in the slot for the next attempt.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::health::log_transition;
use crate::sites::SiteState;
use crate::{ClientRegion, Router, Target};

pub(crate) type Client = hyper_util::client::legacy::Client<Connector, ProxyBody>;

/// What the router connects to sites with: `http://` as is, `https://` with TLS.
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The TLS settings of connections to `https://` sites, set once before serving.
static TLS: std::sync::OnceLock<(rustls::ClientConfig, Option<rustls::pki_types::ServerName<'static>>)> =
    std::sync::OnceLock::new();

/// Requests reach sites over HTTP/2 (see `routing.site_protocol`; the default).
static HTTP2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Sends requests to sites over HTTP/2 (`on`) or HTTP/1.1 from now on (`routing.site_protocol`). Call
/// before the first request: each server thread makes its client once.
pub fn set_http2(on: bool) {
    HTTP2.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Sets how `https://` sites are verified (default: the public web roots and the URL's host):
/// with `tls`, against `server_name` when given (sites reached by address whose certificates
/// carry one shared name). Call before the first request; later calls change nothing.
pub fn set_tls(tls: rustls::ClientConfig, server_name: Option<rustls::pki_types::ServerName<'static>>) {
    let _ = TLS.set((tls, server_name));
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long connecting to a site may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

thread_local! {
    static CLIENT: Client = new_client();
}

/// This thread's HTTP client. One per thread: a pooled connection's task runs on the runtime
/// that opened it, so sharing a pool across per-core runtimes would wake other threads on
/// every request.
pub(crate) fn client() -> Client {
    CLIENT.with(Client::clone)
}

fn new_client() -> Client {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.enforce_http(false);
    // With TLS set, sites are reached over https only (an http:// one is refused, not talked to
    // in the clear).
    let builder = match TLS.get().cloned() {
        Some((tls, server_name)) => {
            let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
            match server_name {
                Some(name) => {
                    builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
                }
                None => builder,
            }
        }
        None => {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
            let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http()
        }
    };
    let http2 = HTTP2.load(std::sync::atomic::Ordering::Relaxed);
    // Over TLS, ALPN offers the one protocol the client speaks.
    let connector = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    let mut client = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    if http2 {
        client
            .http2_only(true)
            // A connection the network dropped silently is found by pings, not by every
            // request on it timing out.
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_keep_alive_interval(Some(Duration::from_secs(10)))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            // Windows that grow with the connection's bandwidth, so that large responses do
            // not hold back the small ones sharing it.
            .http2_adaptive_window(true)
            .http2_max_header_list_size(crate::MAX_HEADER_LIST);
    }
    client.pool_idle_timeout(Duration::from_secs(30)).pool_max_idle_per_host(512).build(connector)
}

/// What to do with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Answered (by another site, or with an error): send this back.
    Response(Response<Body>),
    /// Serve it here (the router is embedded in a site and this site is the choice); add
    /// [`RouteInfo::apply`]'s headers to the response.
    Local(Request<Body>, RouteInfo),
}

/// Why a request went where it went.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    /// `nearest`, `fallback`, `failover` (see [`reason`]) or `forwarded` (another router or site
    /// chose this site).
    pub reason: &'static str,
    pub region: ClientRegion,
}

impl RouteInfo {
    /// Adds the routing headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        counted("atoll_routing_decisions_total", "reason", self.reason);
        if let Some(why) = self.region.defaulted {
            counted("atoll_routing_default_region_total", "why", why);
        }
        headers.insert(crate::names::ROUTE, HeaderValue::from_static(self.reason));
        if let Ok(v) = HeaderValue::from_str(&self.region.region) {
            headers.insert(crate::names::ROUTE_REGION, v);
        }
        if let Some(why) = self.region.defaulted {
            headers.insert(crate::names::DEFAULT_REGION, HeaderValue::from_static(why));
        }
    }
}

/// What became of a request sent to a site.
enum Sent {
    Answer(Response<hyper::body::Incoming>),
    /// Never sent (the connection could not be made): any method may go elsewhere.
    Unreachable(String),
    /// Sent, and no answer: the site may have applied it.
    Failed(String),
}

/// Sends `request` to `site` and waits at most `wait` for the head of its answer.
async fn exchange(site: &SiteState, request: Request<ProxyBody>, wait: Duration) -> Sent {
    let started = std::time::Instant::now();
    match tokio::time::timeout(wait, self::client().request(request)).await {
        Ok(Ok(response)) => {
            site.observe(started.elapsed());
            Sent::Answer(response)
        }
        Ok(Err(e)) if e.is_connect() => Sent::Unreachable(describe(&e)),
        Ok(Err(e)) => Sent::Failed(describe(&e)),
        Err(_) => Sent::Failed(format!("no response within {wait:?}")),
    }
}

/// Returns once `site` is out of the rotation (its health checks failed meanwhile).
async fn left_rotation(site: &SiteState) {
    while site.is_live() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a hedged request came to: the answer (from which site, and whether from the hedge),
/// the failures, and whether the hedge was sent.
struct Hedged {
    answer: Option<(Arc<SiteState>, Response<hyper::body::Incoming>, bool)>,
    failures: Vec<(Arc<SiteState>, Sent)>,
    hedged: bool,
}

/// The header of the IETF draft: a request carrying it is retried by the router like an
/// idempotent one (sites run it at most once; see the binary's `site::idempotency`).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

impl Router {
    /// How long a request to `site` may wait for its answer's head: one that may be hedged, the
    /// response timeout (the hedge spares it most of that); one that may not (a POST, a PUT, a
    /// streamed body),
    /// what the site itself allows (its longest app deadline, for reading the body and again for
    /// running the handler) and a second, when the site has said it: never a fixed 30 s for a POST
    /// to a site that hangs.
    fn wait_for(&self, site: &SiteState, hedged: bool) -> Duration {
        match site.max_deadline_ms() {
            Some(ms) if !hedged => Duration::from_millis(ms.saturating_mul(2).saturating_add(1000)),
            _ => self.settings.response_timeout,
        }
    }

    /// Sends `request` to `site`; when no head has come after the site's hedge delay (what its
    /// answers usually take, at most a second), or the site leaves the rotation meanwhile, sends
    /// the same request (`hedge()`) to `other` too. The first answer wins; the other request is
    /// cancelled. Hedges for slowness take from a budget of a tenth of the requests; hedges from a
    /// site gone down are failovers and do not.
    async fn hedged(
        &self,
        site: &Arc<SiteState>,
        other: &Arc<SiteState>,
        request: Request<ProxyBody>,
        hedge: impl FnOnce() -> Option<Request<ProxyBody>>,
        wait: Duration,
    ) -> Hedged {
        let single = |sent: Sent| match sent {
            Sent::Answer(response) => {
                Hedged { answer: Some((site.clone(), response, false)), failures: vec![], hedged: false }
            }
            failed => Hedged { answer: None, failures: vec![(site.clone(), failed)], hedged: false },
        };
        let mut first = std::pin::pin!(exchange(site, request, wait));
        let why = match self.until_hedge(site, first.as_mut()).await {
            Ok(sent) => return single(sent),
            Err(why) => why,
        };
        let second = match other.is_live().then(hedge).flatten() {
            Some(request) => request,
            None => {
                if why == "slow" {
                    self.refund_hedge_budget();
                }
                return single(first.await);
            }
        };
        counted("atoll_router_hedges_total", "trigger", why);
        tracing::debug!(site = %site.label(), to = %other.label(), trigger = why, "hedged");
        let mut second = std::pin::pin!(exchange(other, second, wait));
        let (mut first_done, mut second_done) = (false, false);
        let mut failures = Vec::new();
        while !(first_done && second_done) {
            let (by, sent, hedge) = tokio::select! {
                sent = &mut first, if !first_done => {
                    first_done = true;
                    (site, sent, false)
                }
                sent = &mut second, if !second_done => {
                    second_done = true;
                    (other, sent, true)
                }
            };
            match sent {
                Sent::Answer(response) => {
                    counted(
                        "atoll_router_hedge_winners_total",
                        "winner",
                        if hedge { "hedge" } else { "first" },
                    );
                    return Hedged { answer: Some((by.clone(), response, hedge)), failures, hedged: true };
                }
                failed => failures.push((by.clone(), failed)),
            }
        }
        Hedged { answer: None, failures, hedged: true }
    }

    /// [`Router::hedged`] when the next choice is this site itself: `None` when the request is
    /// to be served here instead (its site slow, within the budget, or out of the rotation),
    /// the other request cancelled.
    async fn or_here(&self, site: &SiteState, request: Request<ProxyBody>, wait: Duration) -> Option<Sent> {
        let first = std::pin::pin!(exchange(site, request, wait));
        match self.until_hedge(site, first).await {
            Ok(sent) => Some(sent),
            Err(why) => {
                counted("atoll_router_hedges_total", "trigger", why);
                None
            }
        }
    }

    /// Waits for `first`'s answer (`Ok`) or until a hedge is due (`Err` with the trigger): the
    /// site's hedge delay has passed and the budget allows one for slowness, or the site has left
    /// the rotation. One timer on the way of every request: the rotation is watched only past
    /// the delay.
    async fn until_hedge<F: Future<Output = Sent>>(
        &self,
        site: &SiteState,
        mut first: Pin<&mut F>,
    ) -> Result<Sent, &'static str> {
        self.deposit_hedge_budget();
        let mut why = tokio::select! {
            biased;
            sent = &mut first => return Ok(sent),
            () = tokio::time::sleep(site.hedge_after()) => if site.is_live() { "slow" } else { "down" },
        };
        if why == "slow" && !self.take_hedge_budget() {
            // No budget left for slowness: hedged only if the site leaves the rotation.
            why = tokio::select! {
                biased;
                sent = &mut first => return Ok(sent),
                () = left_rotation(site) => "down",
            };
        }
        Err(why)
    }

    /// Every hedgeable request earns a tenth of a hedge for slowness (at most 10 saved); the
    /// budget counts tenths.
    fn deposit_hedge_budget(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.hedge_budget.fetch_update(Relaxed, Relaxed, |t| (t < 100).then_some(t + 1));
    }

    /// Gives back a hedge taken but not sent.
    fn refund_hedge_budget(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.hedge_budget.fetch_update(Relaxed, Relaxed, |t| Some((t + 10).min(100)));
    }

    fn take_hedge_budget(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.hedge_budget.fetch_update(Relaxed, Relaxed, |t| t.checked_sub(10)).is_ok()
    }
}

/// Why `target` serves a client whose candidates are `ranking` (nearest first):
/// - `nearest`: it is the nearest site, and no site this router has not yet heard from (whose
///   region it cannot know) might be nearer (a site silent for a minute since it was added is
///   taken for dead, not for nearer);
/// - `fallback`: the nearest site has not been ready since this router started (it is starting,
///   or has never answered), or one not yet heard from might be nearer;
/// - `failover`: the nearest site was live once and is down now (or failed this request);
/// - (`hedged` is said by the proxy: the nearest was slow and the next site answered first).
pub(crate) fn reason(ranking: &[Target], target: &Target) -> &'static str {
    let same = |a: &Target, b: &Target| match (a, b) {
        (Target::Local, Target::Local) => true,
        (Target::Site(a), Target::Site(b)) => Arc::ptr_eq(a, b),
        _ => false,
    };
    let never_ready = |t: &Target| match t {
        Target::Local => false,
        Target::Site(s) => !s.heard_from(),
    };
    match ranking.first() {
        Some(first) if same(first, target) => {
            let unplaced = |t: &Target| match t {
                Target::Local => false,
                Target::Site(s) => s.unplaced(),
            };
            if ranking.iter().any(unplaced) { "fallback" } else { "nearest" }
        }
        Some(first) if never_ready(first) => "fallback",
        _ => "failover",
    }
}

/// Counts one event in the counter `name` with the label `key` = `value`, through a handle each
/// server thread resolves once per (name, value): no label hashing or registry lookup per
/// request.
/// The routing reasons counted process-wide (any other counts as the last).
const REASONS: [&str; 8] =
    ["nearest", "failover", "fallback", "forwarded", "session", "idempotent", "none", "other"];
static DECISIONS: [std::sync::atomic::AtomicU64; 8] = [const { std::sync::atomic::AtomicU64::new(0) }; 8];

/// Routing decisions made in this process so far, by reason (the status page's history).
pub fn decisions() -> Vec<(&'static str, u64)> {
    REASONS.iter().zip(&DECISIONS).map(|(r, n)| (*r, n.load(std::sync::atomic::Ordering::Relaxed))).collect()
}

fn counted(name: &'static str, key: &'static str, value: &'static str) {
    if name == "atoll_routing_decisions_total" {
        let i = REASONS.iter().position(|r| *r == value).unwrap_or(REASONS.len() - 1);
        DECISIONS[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    thread_local! {
        static COUNTERS: std::cell::RefCell<Vec<(&'static str, &'static str, metrics::Counter)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    COUNTERS.with_borrow_mut(|counters| {
        match counters.iter().find(|(n, v, _)| std::ptr::eq(*n, name) && *v == value) {
            Some((_, _, counter)) => counter.increment(1),
            None => {
                let counter = metrics::counter!(name, key => value);
                counter.increment(1);
                counters.push((name, value, counter));
            }
        }
    });
}

/// The request body as the HTTP client sees it, one per attempt.
#[derive(Debug)]
pub struct ProxyBody(Kind);

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Stream { slot: Arc<Mutex<Option<Body>>>, taken: Option<Body>, hint: SizeHint },
}

impl ProxyBody {
    pub(crate) fn empty() -> ProxyBody {
        ProxyBody(Kind::Full(None))
    }
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream { slot, taken, .. } => {
                if taken.is_none() {
                    *taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                match taken {
                    Some(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
                    None => {
                        Poll::Ready(Some(Err("the request body was already sent to another site".into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream { hint, .. } => hint.exact() == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { hint, .. } => *hint,
        }
    }
}

/// A request body across attempts.
enum Prepared {
    /// Held whole (empty, or small and idempotent): every attempt sends it.
    Replayable(Bytes),
    /// Streamed: the first attempt that gets connected takes it.
    Stream { slot: Arc<Mutex<Option<Body>>>, hint: SizeHint },
}

impl Prepared {
    async fn new(body: Body, idempotent: bool, limit: u64) -> Result<Prepared, String> {
        let hint = http_body::Body::size_hint(&body);
        if hint.exact() == Some(0) {
            return Ok(Prepared::Replayable(Bytes::new()));
        }
        if idempotent && hint.upper().is_some_and(|n| n <= limit) {
            let bytes = body.collect().await.map_err(|e| format!("cannot read the request body: {e}"))?;
            return Ok(Prepared::Replayable(bytes.to_bytes()));
        }
        Ok(Prepared::Stream { slot: Arc::new(Mutex::new(Some(body))), hint })
    }

    /// The body for one more attempt, unless it was sent already.
    fn attempt(&self) -> Option<ProxyBody> {
        match self {
            Prepared::Replayable(bytes) => {
                Some(ProxyBody(Kind::Full((!bytes.is_empty()).then(|| bytes.clone()))))
            }
            Prepared::Stream { slot, hint } => {
                let present = slot.lock().unwrap_or_else(|e| e.into_inner()).is_some();
                present.then(|| ProxyBody(Kind::Stream { slot: slot.clone(), taken: None, hint: *hint }))
            }
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Prepared::Replayable(_))
    }

    /// The body for serving here, unless it was sent already.
    fn into_body(self) -> Option<Body> {
        match self {
            Prepared::Replayable(bytes) => Some(Body::from(bytes)),
            Prepared::Stream { slot, .. } => slot.lock().unwrap_or_else(|e| e.into_inner()).take(),
        }
    }
}

/// Responses up to this size with a known length are read whole before the head is written
/// back, so head and body leave in one write (`cargo xtask bench-router`: 10-30 µs less added
/// latency at p50 for small responses); anything longer, or of unknown length, streams.
const GATHER_RESPONSE_BYTES: u64 = 16 << 10;

async fn response_body(body: hyper::body::Incoming) -> Body {
    let small = http_body::Body::size_hint(&body).exact().is_some_and(|n| n <= GATHER_RESPONSE_BYTES);
    if !small {
        return Body::new(body);
    }
    match body.collect().await {
        Ok(collected) => Body::from(collected.to_bytes()),
        // The site broke off mid-body: the client sees the same.
        Err(e) => Body::new(http_body_util::StreamBody::new(Once(Some(Err::<Frame<Bytes>, _>(e))))),
    }
}

/// A stream of one item.
struct Once<T>(Option<T>);

impl<T: Unpin> futures_core::Stream for Once<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<T>> {
        Poll::Ready(self.0.take())
    }
}

const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that say who the client is; from anyone but a trusted proxy they are dropped.
const CLIENT_CLAIMS: [&str; 2] = ["forwarded", "x-real-ip"];

/// Sets `x-forwarded-for` as the first trusted hop does: the connection's peer address, whatever
/// the client sent; behind a trusted proxy or Atoll hop (`trusted`), its chain and its address.
/// From anyone else, the hop header and other client claims are dropped.
fn forwarded_for(headers: &mut HeaderMap, client: Option<IpAddr>, trusted: bool) {
    if !trusted {
        for name in CLIENT_CLAIMS.into_iter().chain([crate::HOP_HEADER]) {
            headers.remove(name);
        }
    }
    let prior = if trusted { headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) } else { None };
    let value = match (prior, client) {
        (Some(prior), Some(ip)) => HeaderValue::from_str(&format!("{prior}, {ip}")).ok(),
        (None, Some(ip)) => HeaderValue::from_str(&ip.to_string()).ok(),
        (_, None) => None,
    };
    match value {
        Some(v) => {
            headers.insert(FORWARDED_FOR, v);
        }
        None if !trusted => {
            headers.remove(FORWARDED_FOR);
        }
        None => {}
    }
}

/// Whether `path` is under `/_atoll/`, which is never forwarded.
fn is_reserved(path: &str) -> bool {
    path == "/_atoll" || path.starts_with("/_atoll/")
}

/// Safe methods (RFC 9110 §9.2.1): they write nothing, so two sites may both serve one.
fn safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// A short reason for a client error, with the underlying I/O error when there is one.
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    reason
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

impl Router {
    /// Decides where `request` goes and, unless that is this site, proxies it there, failing
    /// over to the next live site as the retry rule allows. `client` is the peer address the
    /// request came from (for `x-forwarded-for`).
    pub async fn route(&self, mut request: Request<Body>, client: Option<IpAddr>) -> Outcome {
        // Who sent it: a trusted proxy or Atoll hop (a trusted forwarder, or a site this one
        // routes to), whose forwarding headers hold; or anyone else, whose do not.
        // Only a request that claims something about its client needs its sender looked up (the
        // lookup reads the site table): without claims, trusted or not comes to the same.
        let client = client.map(|ip| ip.to_canonical());
        let headers = request.headers();
        let claims = headers.contains_key(crate::HOP_HEADER)
            || headers.contains_key(&FORWARDED_FOR)
            || CLIENT_CLAIMS.iter().any(|name| headers.contains_key(*name));
        let trusted = claims && self.trusts(client);
        forwarded_for(request.headers_mut(), client, trusted);
        let hop = trusted && request.headers().contains_key(crate::HOP_HEADER);
        let region = self.client_region(request.headers());
        if is_reserved(request.uri().path()) {
            // The admin API, replication and status of a site are its own: never reached
            // through a router or another site, on any host.
            let mut response = text(
                StatusCode::NOT_FOUND,
                format!(
                    "{} is reserved: /_atoll/ paths are served by each site or router itself and \
                     never forwarded\n",
                    request.uri().path()
                ),
            );
            RouteInfo { reason: "none", region }.apply(response.headers_mut());
            return Outcome::Response(response);
        }
        if self.me.is_some() && hop {
            tracing::debug!(region = %region.region, "served here: forwarded by another router or site");
            return Outcome::Local(request, RouteInfo { reason: "forwarded", region });
        }
        let ranking = self.ranking(&region.region);
        self.send_ranked(request, region, &ranking, None).await
    }

    /// Sends `request` to the live site named `name`, or serves it here if that site cannot be
    /// reached (as the retry rule allows); a response from there says `why` in
    /// `x-atoll-route`. For a site that should not serve a request itself (it does not hold
    /// what the request's session token asks for) and knows which site does. `Err`: no live
    /// site of that name (the request is given back).
    pub async fn route_to(
        &self,
        request: Request<Body>,
        name: &str,
        why: &'static str,
    ) -> Result<Outcome, Request<Body>> {
        let Some(site) =
            self.sites().into_iter().find(|s| s.is_live() && s.snapshot().name.as_deref() == Some(name))
        else {
            return Err(request);
        };
        let region = self.client_region(request.headers());
        let ranking = [Target::Site(site), Target::Local];
        Ok(self.send_ranked(request, region, &ranking, Some(why)).await)
    }

    /// Proxies `request` to the first live site of `ranking` that answers, as the retry and
    /// hedging rules allow (serving it here when this site comes up in the ranking).
    async fn send_ranked(
        &self,
        request: Request<Body>,
        region: ClientRegion,
        ranking: &[Target],
        why: Option<&'static str>,
    ) -> Outcome {
        let reason = |t: &Target| match (why, t) {
            (Some(why), Target::Site(_)) => why,
            _ => reason(ranking, t),
        };
        let live: Vec<&Target> = ranking
            .iter()
            .filter(|t| match t {
                Target::Local => true,
                Target::Site(s) => s.is_live(),
            })
            .collect();
        match live.first() {
            None => {
                let down: Vec<String> = ranking
                    .iter()
                    .filter_map(|t| match t {
                        Target::Site(s) => {
                            Some(format!("{} ({})", s.label(), s.snapshot().last_error.unwrap_or_default()))
                        }
                        Target::Local => None,
                    })
                    .collect();
                let mut response = if down.is_empty() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no live site: this router knows no sites yet\n".into(),
                    )
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("no live site: every site is down: {}\n", down.join(", ")),
                    )
                };
                RouteInfo { reason: "none", region }.apply(response.headers_mut());
                return Outcome::Response(response);
            }
            Some(Target::Local) => {
                let info = RouteInfo { reason: reason(&Target::Local), region };
                tracing::debug!(
                    region = %info.region.region, defaulted = ?info.region.defaulted, reason = info.reason,
                    "routed here"
                );
                return Outcome::Local(request, info);
            }
            Some(Target::Site(_)) => {}
        }

        let (parts, body) = request.into_parts();
        let method = parts.method.clone();
        // A request with an Idempotency-Key may be sent again: the site that gets the retry
        // runs it only if no site has (it answers the first response, or 409).
        let keyed_once = !idempotent(&method) && parts.headers.contains_key(IDEMPOTENCY_KEY);
        let idempotent = idempotent(&method) || parts.headers.contains_key(IDEMPOTENCY_KEY);
        let prepared = match Prepared::new(body, idempotent, self.settings.replay_body_bytes).await {
            Ok(p) => p,
            Err(e) => return Outcome::Response(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
        };
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        if let Ok(v) = HeaderValue::from_str(&self.name) {
            headers.insert(crate::HOP_HEADER, v);
        }
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_owned();

        let mut attempts = 0;
        let mut errors: Vec<String> = Vec::new();
        let mut sent_somewhere = false;
        // A keyed request that is not idempotent, failed at a site after it was sent: the next
        // site is told where it may have run (see `IDEMPOTENT_AFTER_HEADER`).
        let after: std::sync::Mutex<Option<HeaderValue>> = std::sync::Mutex::new(None);
        let after_now = || after.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let request_for = |site: &SiteState| {
            let body = prepared.attempt()?;
            let mut request = Request::new(body);
            *request.method_mut() = method.clone();
            *request.uri_mut() = site.uri(&path_and_query);
            *request.headers_mut() = headers.clone();
            if let Some(v) = after_now() {
                request.headers_mut().insert(crate::IDEMPOTENT_AFTER_HEADER, v);
            }
            Some(request)
        };
        let mut next = 0;
        while let Some(&target) = live.get(next) {
            next += 1;
            let site = match target {
                Target::Local => {
                    // A nearer site failed; this site is next.
                    let Some(body) = prepared.into_body() else { break };
                    let info = RouteInfo { reason: reason(&Target::Local), region };
                    tracing::debug!(region = %info.region.region, errors = ?errors, "serving here after failover");
                    let mut parts = parts;
                    if let Some(v) = after_now() {
                        parts.headers.insert(crate::IDEMPOTENT_AFTER_HEADER, v);
                    }
                    return Outcome::Local(Request::from_parts(parts, body), info);
                }
                Target::Site(site) => site,
            };
            if attempts == self.settings.max_attempts {
                break;
            }
            attempts += 1;
            let Some(request) = request_for(site) else { break };
            // A safe request (GET, HEAD, OPTIONS, TRACE: no writes) with its body at hand may also
            // go to the next live site if this one is slow to answer or leaves the rotation
            // meanwhile (a hedge). Not a PUT or DELETE: both copies could apply, the loser's
            // later than the client's next write.
            let retriable = idempotent && prepared.replayable();
            // Not a request sent to one site on purpose (`route_to`): serving it elsewhere is what it avoids.
            let hedgeable = self.settings.hedging && why.is_none() && safe(&method) && retriable;
            let hedge_to = match live.get(next) {
                Some(Target::Site(other)) if hedgeable && attempts < self.settings.max_attempts => {
                    Some(other)
                }
                _ => None,
            };
            // With somewhere to hedge to, the hedge bounds the wait; else the site's deadline does.
            let wait = self.wait_for(site, hedgeable && live.get(next).is_some());
            if hedgeable && matches!(live.get(next), Some(Target::Local)) {
                // This site is next: the hedge is serving it here (giving up on the other).
                match self.or_here(site, request, wait).await {
                    Some(Sent::Answer(response)) => {
                        let info = RouteInfo { reason: reason(target), region };
                        let (mut parts, body) = response.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        info.apply(&mut parts.headers);
                        return Outcome::Response(Response::from_parts(parts, response_body(body).await));
                    }
                    Some(failed) => {
                        let why = match &failed {
                            Sent::Unreachable(why) => {
                                log_transition(site, site.unreachable(why.clone(), self.settings.fall));
                                why.clone()
                            }
                            Sent::Failed(why) => {
                                log_transition(site, site.failed(why.clone(), self.settings.fall));
                                sent_somewhere = true;
                                why.clone()
                            }
                            Sent::Answer(_) => String::new(),
                        };
                        errors.push(format!("{}: {why}", site.label()));
                        continue;
                    }
                    None => {
                        let Some(body) = prepared.into_body() else { break };
                        let info = RouteInfo { reason: "hedged", region };
                        return Outcome::Local(Request::from_parts(parts, body), info);
                    }
                }
            }
            let (answered, failures) = match hedge_to {
                Some(other) => {
                    let hedged = self.hedged(site, other, request, || request_for(other), wait).await;
                    if hedged.hedged {
                        attempts += 1;
                        next += 1;
                    }
                    (hedged.answer, hedged.failures)
                }
                None => match exchange(site, request, wait).await {
                    Sent::Answer(response) => (Some((site.clone(), response, false)), vec![]),
                    failed => (None, vec![(site.clone(), failed)]),
                },
            };
            for (failed_site, failure) in &failures {
                match failure {
                    Sent::Answer(_) => {}
                    Sent::Unreachable(why) => {
                        log_transition(failed_site, failed_site.unreachable(why.clone(), self.settings.fall));
                    }
                    Sent::Failed(why) => {
                        log_transition(failed_site, failed_site.failed(why.clone(), self.settings.fall));
                    }
                }
            }
            if let Some((by, response, hedge)) = answered {
                let reason = if hedge { "hedged" } else { reason(&Target::Site(by.clone())) };
                let info = RouteInfo { reason, region };
                tracing::debug!(
                    site = %by.label(), region = %info.region.region, defaulted = ?info.region.defaulted,
                    reason = info.reason, attempts, "routed"
                );
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                info.apply(&mut parts.headers);
                return Outcome::Response(Response::from_parts(parts, response_body(body).await));
            }
            for (failed_site, failure) in failures {
                match failure {
                    Sent::Answer(_) => {}
                    Sent::Unreachable(reason) => {
                        // Not sent: any method may go to the next site.
                        errors.push(format!("{}: {reason}", failed_site.label()));
                    }
                    Sent::Failed(failure) => {
                        errors.push(format!("{}: {failure}", failed_site.label()));
                        sent_somewhere = true;
                        if keyed_once {
                            *after.lock().unwrap_or_else(|e| e.into_inner()) =
                                HeaderValue::from_str(&failed_site.label()).ok();
                        }
                        if !retriable {
                            let request_id =
                                headers.get(crate::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok());
                            tracing::warn!(site = %failed_site.label(), %method, request_id, "{failure}: not retried (the site may have applied it)");
                            return Outcome::Response(text(
                                StatusCode::BAD_GATEWAY,
                                format!(
                                    "site {} failed after the request was sent ({failure}); a {method} request is not \
                                     retried elsewhere because it may have been applied\n",
                                    failed_site.label()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        let mut response = if sent_somewhere {
            text(StatusCode::BAD_GATEWAY, format!("no site could serve the request: {}\n", errors.join("; ")))
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no live site: every site tried was unreachable: {}\n", errors.join("; ")),
            )
        };
        RouteInfo { reason: "none", region }.apply(response.headers_mut());
        Outcome::Response(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_reason_says_why_the_nearest_site_was_not_taken() {
        let site = |port: u16, region: Option<&str>| {
            let region = region.map(|r| (r.to_owned(), Some(r.to_owned())));
            Arc::new(crate::SiteState::new(&format!("http://127.0.0.1:{port}"), None, region).expect("url"))
        };
        let (east, west) = (site(1, Some("us-east")), site(2, Some("eu-west")));
        let ranking = [Target::Site(east.clone()), Target::Site(west.clone())];
        assert_eq!(reason(&ranking, &ranking[0]), "nearest");
        // The nearest has never been ready (it is starting): the next one is a fallback ...
        assert_eq!(reason(&ranking, &ranking[1]), "fallback");
        // ... and, once it has been ready, a failover.
        east.passed(None, None, 1);
        assert_eq!(reason(&ranking, &ranking[1]), "failover");
        // A site not yet heard from, whose region is unknown, might be nearer: not `nearest`.
        let unknown = site(3, None);
        let ranking = [Target::Site(east), Target::Site(west), Target::Site(unknown.clone())];
        assert_eq!(reason(&ranking, &ranking[0]), "fallback");
        unknown.passed(None, Some(("ap-south".into(), Some("ap-south".into()))), 1);
        assert_eq!(reason(&ranking, &ranking[0]), "nearest");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert("host", HeaderValue::from_static("hello.example.com"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "x-kept"]);
    }

    #[test]
    fn reserved_paths_are_the_atoll_tree() {
        for path in ["/_atoll", "/_atoll/", "/_atoll/apps", "/_atoll/sync", "/_atoll/apps/x"] {
            assert!(is_reserved(path), "{path}");
        }
        for path in ["/", "/apps/x/_atoll/apps", "/_atollx", "/metrics"] {
            assert!(!is_reserved(path), "{path}");
        }
    }

    #[test]
    fn forwarded_for_is_the_peer_unless_an_atoll_hop_sent_it() {
        let client: Option<IpAddr> = Some([203, 0, 113, 9].into());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert(crate::HOP_HEADER, HeaderValue::from_static("evil"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        forwarded_for(&mut h, client, false);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert!(!h.contains_key(crate::HOP_HEADER), "a hop header from a client is dropped");
        assert!(!h.contains_key("x-real-ip") && !h.contains_key("forwarded"));
        // Behind a trusted proxy that is not an Atoll hop, its chain holds too.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        forwarded_for(&mut h, client, true);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 203.0.113.9");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        h.insert(crate::HOP_HEADER, HeaderValue::from_static("router"));
        forwarded_for(&mut h, client, true);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 203.0.113.9");
        assert_eq!(h[crate::HOP_HEADER], "router");
    }

    #[test]
    fn methods() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }

    #[tokio::test]
    async fn a_streamed_body_stays_for_the_next_attempt_until_polled() {
        let prepared = Prepared::new(
            Body::from_stream(Once(Some(Ok::<_, std::io::Error>(Bytes::from_static(b"body"))))),
            false,
            10,
        )
        .await
        .expect("prepared");
        assert!(!prepared.replayable());
        let first = prepared.attempt().expect("first");
        drop(first); // connecting failed: never polled
        let mut second = prepared.attempt().expect("still there");
        let frame = std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut second), cx)).await;
        assert!(frame.is_some());
        assert!(prepared.attempt().is_none(), "taken by the attempt that sent it");
    }
}
