//! `atoll router`: the stateless front door. It knows the sites (from `--site`, `[router] sites`,
//! DNS), checks their health, and proxies every request to the nearest live one for the
//! client's region. Several can run side by side: they share nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use atoll_router::{Outcome, Router, SiteSpec};
use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::config::FileConfig;

/// Everything `atoll router` is started with.
#[derive(Debug)]
pub struct RouterOptions {
    pub listen: SocketAddr,
    pub name: Option<String>,
    pub sites: Vec<String>,
    pub config: FileConfig,
}

/// Serves until SIGINT or SIGTERM.
pub fn run(options: RouterOptions) -> Result<()> {
    let config = options.config;
    let name = options.name.or_else(|| config.router.name.clone()).unwrap_or_else(|| "router".into());
    let mut urls = options.sites;
    urls.extend(config.router.sites.iter().cloned());
    let discovery = config.discovery(&urls)?;
    let settings = config.routing("us-east")?;
    atoll_router::set_http2(settings.http2);
    // Sites reached over https:// are verified as [tls] says (before any client is made).
    let tls = crate::tls::Tls::load(&config.tls)?;
    if let Some(tls) = &tls {
        atoll_router::set_tls((*tls.client).clone(), tls.server_name.clone());
    }
    let router = Arc::new(Router::new(&name, settings));
    crate::metrics::install(&[("router", &name)])?;
    let interval = config.dns_interval();
    let config_drain = config.drain();

    // Discovery and health checks run on their own thread and runtime; requests are served by
    // one single-threaded runtime per core, like a site's.
    let control = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let urls = control.block_on(discovery.resolve());
    if urls.is_empty() {
        tracing::warn!("no sites yet: every request gets 503 until one is found");
    }
    router.set_sites(&urls.iter().map(SiteSpec::url).collect::<Vec<_>>());
    let checked = router.clone();
    std::thread::Builder::new().name("atoll-router-health".into()).spawn(move || {
        control.block_on(async move {
            if discovery.is_dynamic() {
                let router = checked.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(interval).await;
                        let urls = discovery.resolve().await;
                        router.set_sites(&urls.iter().map(SiteSpec::url).collect::<Vec<_>>());
                    }
                });
            }
            checked.run_health_checks().await
        })
    })?;

    let app = axum::Router::new()
        .route("/_atoll/health", get(health))
        .route("/_atoll/router/status", get(status))
        .route("/metrics", get(metrics))
        .route("/_atoll/ui", get(crate::ui::page))
        .route("/_atoll/ui/state", get(ui_state))
        .fallback(proxy)
        .with_state(router.clone());
    let threads = config.server_threads();
    let listeners = crate::listen::bind(options.listen, threads)?;
    let addr = listeners[0].local_addr().context("no local address")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tls.as_ref().and_then(|t| t.public.clone());
    let scheme = if serving.is_some() { "https" } else { "http" };
    let workers =
        crate::listen::serve("atoll-router", listeners, app, config.connection_limits(), serving, &stopped)?;
    // The first line on stdout is for scripts and tests: where the router listens.
    println!("atoll router {name} listening on {scheme}://{addr}");
    tracing::info!(router = %name, %addr, sites = router.sites().len(), threads, "router started");
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(crate::shutdown_signal());
    let _ = stop.send(true);
    crate::listen::join(workers, config_drain)
}

/// The router's own health: 200 while it runs, with how many sites it sees live.
async fn health(State(router): State<Arc<Router>>) -> Response {
    let sites = router.sites();
    let live = sites.iter().filter(|s| s.is_live()).count();
    Json(serde_json::json!({ "status": "ok", "router": true, "sites": sites.len(), "live_sites": live }))
        .into_response()
}

async fn metrics(State(router): State<Arc<Router>>) -> Response {
    crate::metrics::observe_router(&router);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render())
        .into_response()
}

/// The router's view (sites, table), plus replication and apps as the nearest live site to the
/// default region reports them (a router holds neither).
async fn ui_state(
    State(router): State<Arc<Router>>,
    axum::extract::Query(query): axum::extract::Query<crate::ui::StateQuery>,
) -> Response {
    let name = router.name().to_owned();
    let viewer = crate::ui::Viewer {
        kind: "router",
        name: &name,
        region: None,
        peers: vec![],
        apps: vec![],
        faults: None,
    };
    let mut state = crate::ui::state(&router, viewer);
    let region = router.client_region(&axum::http::HeaderMap::new()).region;
    let path = format!("/_atoll/ui/state?since={}", query.since.unwrap_or(0));
    match router.fetch_json(&region, &path).await {
        Ok((site, remote)) => {
            state["peers"] = remote["peers"].clone();
            state["apps"] = remote["apps"].clone();
            state["history"] = remote["history"].clone();
            state["reported_by"] = site.into();
        }
        Err(e) => state["reported_by_error"] = format!("{e:#}").into(),
    }
    Json(state).into_response()
}

async fn status(State(router): State<Arc<Router>>) -> Response {
    Json(router.status_json()).into_response()
}

async fn proxy(State(router): State<Arc<Router>>, mut request: Request) -> Response {
    let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let request_id = atoll_router::ensure_request_id(request.headers_mut());
    // A span only when debug logging is on (none per request otherwise).
    let span = tracing::debug_span!("request", request_id = request_id.to_str().unwrap_or_default());
    match tracing::Instrument::instrument(router.route(request, client), span).await {
        Outcome::Response(mut response) => {
            response.headers_mut().insert(atoll_router::REQUEST_ID_HEADER, request_id);
            response
        }
        // A stand-alone router is never a candidate itself.
        Outcome::Local(..) => (StatusCode::INTERNAL_SERVER_ERROR, "router chose itself\n").into_response(),
    }
}
