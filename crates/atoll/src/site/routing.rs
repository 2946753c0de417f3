//! Which app a request is for, and serving it.
//!
//! Rule (documented in README.md): if the Host's first label names a deployed app
//! (`NAME.<any domain>`), that app gets the request with its path unchanged: an app on its own
//! host owns its whole path space. Otherwise `/apps/NAME/<path>` selects `NAME` and the guest
//! sees `/<path>`. `/_atoll/` is reserved on every host.

use std::sync::Arc;

use axum::body::Body;
use std::net::SocketAddr;

use atoll_router::Outcome;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::Site;

/// Header naming the site that served a response.
pub(crate) const SITE_HEADER: &str = "x-atoll-site";
/// Header carrying the serving site's hybrid logical clock (`physical_ms.logical`).
pub(crate) const HLC_HEADER: &str = "x-atoll-hlc";
const SITE: HeaderName = HeaderName::from_static(SITE_HEADER);
const HLC: HeaderName = HeaderName::from_static(HLC_HEADER);

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target<A> {
    /// To a deployed app, with the path and query the guest should see (`None`: unchanged).
    App { app: A, name: String, path_and_query: Option<String> },
    /// The Host or the path named an app that is not deployed.
    Unknown(String),
    /// Neither the Host nor the path names an app.
    Nothing,
}

/// Decides the target from the Host header and the URI; `lookup` finds a deployed app by name
/// (called at most twice: once for the Host label, once for the path).
pub(crate) fn target<A>(host: Option<&str>, uri: &Uri, lookup: impl Fn(&str) -> Option<A>) -> Target<A> {
    let host_label = host.and_then(host_app_label);
    if let Some(label) = host_label.as_deref()
        && let Some(app) = lookup(label)
    {
        return Target::App { app, name: label.to_owned(), path_and_query: None };
    }
    if let Some(rest) = uri.path().strip_prefix("/apps/") {
        let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if !name.is_empty() {
            let Some(app) = lookup(name) else { return Target::Unknown(name.to_owned()) };
            let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
            return Target::App {
                app,
                name: name.to_owned(),
                path_and_query: Some(format!("/{tail}{query}")),
            };
        }
    }
    match host_label {
        Some(label) => Target::Unknown(label),
        None => Target::Nothing,
    }
}

/// The first label of a host name with at least two labels, lowercased
/// (`Hello.localhost:8080` → `hello`). IP addresses and single-label hosts have none.
fn host_app_label(host: &str) -> Option<String> {
    if host.starts_with('[') {
        return None; // an IPv6 literal
    }
    let host = host.split(':').next()?; // without IPv6, ':' only separates the port
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return None;
    }
    let (label, rest) = host.split_once('.')?;
    (!label.is_empty() && !rest.is_empty()).then(|| label.to_ascii_lowercase())
}

/// Whether the Host header's first label names a deployed app.
pub(super) fn host_names_an_app(site: &Site, headers: &axum::http::HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    host.and_then(host_app_label).is_some_and(|label| site.app(&label).is_some())
}

/// The fallback handler: every request that is not for `/_atoll/`. It goes to the nearest live
/// site for its region: here, or forwarded (one hop at most, see atoll-router).
pub(super) async fn serve_app(State(site): State<Arc<Site>>, mut request: Request) -> Response {
    if let Some(faults) = &site.faults {
        // Latency injected by atoll dev (development only).
        let latency = faults.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
    let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    // The request id goes with the request to whichever site serves it.
    let request_id = atoll_router::ensure_request_id(request.headers_mut());
    // A span only when debug logging is on (none per request otherwise).
    let span = tracing::debug_span!("request", request_id = request_id.to_str().unwrap_or_default());
    match tracing::Instrument::instrument(site.router.route(request, client), span).await {
        Outcome::Response(response) => response,
        Outcome::Local(request, route) => {
            let (request, session) = match super::session::arrive(&site, request).await {
                super::session::Arrival::Serve(request, session) => (request, session),
                super::session::Arrival::Answered(response) => return response,
            };
            let mut response = serve_here(&site, request, request_id, &session).await;
            route.apply(response.headers_mut());
            response
        }
    }
}

/// Serves a request with an app deployed here.
async fn serve_here(
    site: &Arc<Site>,
    request: Request,
    request_id: HeaderValue,
    session: &super::session::Session,
) -> Response {
    let id = request_id.to_str().unwrap_or_default();
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    let target = target(host, request.uri(), |name| site.serving(name));
    let mut cookie = false;
    // What the request reads and writes here: the response's session token covers it.
    let touched = Arc::new(atoll_kv::Touched::default());
    let mut response = match target {
        Target::App { app: (_, _, policy), name, .. } if policy.refuse_stale && !session.stale.is_empty() => {
            cookie = policy.cookie;
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "this site does not hold everything this session has seen yet (writes of {}), and {name} \
                     refuses stale reads: retry\n",
                    session.stale.join(", ")
                ),
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        Target::App { app: (app, counts, policy), name, path_and_query } => 'app: {
            cookie = policy.cookie;
            // A retry of a request that is not safe, with an Idempotency-Key: run at most once.
            let mut running = None;
            match super::idempotency::key_of(request.method(), request.headers()) {
                Err(e) => break 'app text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                Ok(None) => {}
                // The session saw writes this site lacks: the first attempt may be among them.
                Ok(Some(_)) if !session.stale.is_empty() => {
                    break 'app text(
                        StatusCode::CONFLICT,
                        format!(
                            "this site does not hold every write this session has seen (of {}): a request \
                             with this Idempotency-Key may have run there, so it is not run here\n",
                            session.stale.join(", ")
                        ),
                    );
                }
                Ok(Some(key)) => {
                    let what = super::idempotency::describe(&request);
                    let deadline = app.settings().limits.deadline;
                    // A router's retry after a site failed with it in flight names that site.
                    let after = request
                        .headers()
                        .get(atoll_router::IDEMPOTENT_AFTER_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .filter(|first| *first != site.name)
                        .map(str::to_owned);
                    let begun = super::idempotency::begin(
                        site,
                        &name,
                        &key,
                        what,
                        deadline,
                        &touched,
                        after.as_deref(),
                    );
                    match begun.await {
                        super::idempotency::Begin::Run(r) => running = Some(r),
                        super::idempotency::Begin::Answer(response) => break 'app response,
                        super::idempotency::Begin::Forward(to)
                            if !super::idempotency::forwarded(&request) =>
                        {
                            let mut request = request;
                            super::idempotency::mark_forwarded(&mut request, &site.name);
                            match site.router.route_to(request, &to, "idempotent").await {
                                Ok(Outcome::Response(response)) => return response,
                                Ok(Outcome::Local(..)) | Err(_) => {
                                    break 'app text(
                                        StatusCode::CONFLICT,
                                        format!(
                                            "the first request with this Idempotency-Key runs at {to}, which cannot be \
                                             reached now: retry later\n"
                                        ),
                                    );
                                }
                            }
                        }
                        // Forwarded once already: the sites disagree about where it runs.
                        super::idempotency::Begin::Forward(to) => {
                            break 'app text(
                                StatusCode::CONFLICT,
                                format!(
                                    "the first request with this Idempotency-Key runs at {to}: retry later\n"
                                ),
                            );
                        }
                    }
                }
            }
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(touched.clone());
            // With a `Host` header the guest's authority is the Host: an HTTP/2 request forwarded
            // by a router carries the site's own address as its `:authority`.
            let with_host = parts.headers.contains_key(header::HOST);
            if path_and_query.is_some() || (with_host && parts.uri.authority().is_some()) {
                let mut uri = parts.uri.into_parts();
                if let Some(pq) = path_and_query {
                    uri.path_and_query = pq.parse().ok();
                }
                if with_host {
                    (uri.scheme, uri.authority) = (None, None);
                }
                parts.uri = Uri::from_parts(uri).unwrap_or_default();
            }
            let started = std::time::Instant::now();
            let _in_flight = crate::metrics::InFlight::start();
            let result = app.serve(axum::http::Request::from_parts(parts, body), id).await;
            let status = result.as_ref().map_or_else(|e| e.status(), |r| r.status());
            let instantiated = !matches!(&result, Err(e) if super::idempotency::never_ran(e));
            counts.request(status.as_u16(), started.elapsed().as_secs_f64(), instantiated);
            match &result {
                Err(atoll_runtime::HandleError::Trap(_)) => counts.trap(),
                Err(atoll_runtime::HandleError::Deadline { .. }) => counts.timeout(),
                _ => {}
            }
            if let Some(running) = running {
                match &result {
                    Ok(r) => {
                        running.finish(r.status(), r.headers(), r.body().whole_bytes().map(|b| &b[..])).await
                    }
                    Err(e) if super::idempotency::never_ran(e) => running.release().await,
                    Err(e) => {
                        running.finish(status, &Default::default(), Some(format!("{e}\n").as_bytes())).await
                    }
                }
            }
            match result {
                Ok(response) => response.map(Body::new),
                Err(e) => {
                    if status.is_server_error() {
                        tracing::warn!(app = %name, request_id = id, %status, "{e}");
                    }
                    text(status, format!("{e}\n"))
                }
            }
        }
        Target::Unknown(name) => {
            text(StatusCode::NOT_FOUND, format!("no app named {name:?} is deployed on this site\n"))
        }
        Target::Nothing => text(
            StatusCode::NOT_FOUND,
            "no app selected: call /apps/NAME/<path>, or send Host: NAME.<any domain>\n".into(),
        ),
    };
    let headers = response.headers_mut();
    // Room for these and the routing headers at once (growing the map as they come rehashes it).
    headers.reserve(6);
    if let Some(v) = &site.name_header {
        headers.insert(SITE, v.clone());
    }
    headers.insert(atoll_router::names::REQUEST_ID, request_id.clone());
    // The serving site's clock after the request: every write it made is stamped at or before it.
    // Digits and a dot: taken without a copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(site.kv.clock().last().to_string())) {
        headers.insert(HLC, v);
    }
    session.apply(site, cookie, &touched.clocks(), headers);
    response
}

pub(super) fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, uri: &str) -> Target<()> {
        target(host, &uri.parse().expect("uri"), |name| (name == "hello" || name == "apps").then_some(()))
    }

    fn app(name: &str, pq: Option<&str>) -> Target<()> {
        Target::App { app: (), name: name.into(), path_and_query: pq.map(Into::into) }
    }

    #[test]
    fn host_label_selects_a_deployed_app_and_keeps_the_path() {
        assert_eq!(route(Some("hello.localhost:8080"), "/x?y=1"), app("hello", None));
        assert_eq!(route(Some("Hello.Example.com"), "/"), app("hello", None));
        assert_eq!(route(Some("hello.example.com"), "/apps/other/x"), app("hello", None));
    }

    #[test]
    fn path_prefix_selects_and_is_stripped() {
        assert_eq!(route(Some("127.0.0.1:8080"), "/apps/hello/a/b?q=1"), app("hello", Some("/a/b?q=1")));
        assert_eq!(route(Some("localhost"), "/apps/hello"), app("hello", Some("/")));
        assert_eq!(route(None, "/apps/hello/"), app("hello", Some("/")));
        // A Host label that is not an app falls through to the path.
        assert_eq!(route(Some("www.example.com"), "/apps/hello/z"), app("hello", Some("/z")));
    }

    #[test]
    fn nothing_or_unknown() {
        assert_eq!(route(Some("nope.localhost"), "/"), Target::Unknown("nope".into()));
        assert_eq!(route(Some("127.0.0.1"), "/apps/nope/x"), Target::Unknown("nope".into()));
        assert_eq!(route(Some("127.0.0.1:80"), "/"), Target::Nothing);
        assert_eq!(route(Some("[::1]:80"), "/"), Target::Nothing);
        assert_eq!(route(Some("localhost:80"), "/apps/"), Target::Nothing);
    }
}
