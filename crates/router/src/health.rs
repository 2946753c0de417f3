//! Active health checks: every `interval`, `GET /_atoll/health?ready=1` at every known site (a
//! site that has not finished its first sync with a peer is not ready: 503), each within
//! `timeout`. A 200 whose JSON names the site (`site`, `region`) passes and teaches the router
//! the site's identity; anything else fails.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;

use crate::Router;
use crate::sites::{SiteState, Transition};

pub(crate) async fn run(router: Arc<Router>) {
    loop {
        let started = Instant::now();
        let mut checks = tokio::task::JoinSet::new();
        for site in router.sites() {
            let router = router.clone();
            checks.spawn(async move { check(&router, &site).await });
        }
        while checks.join_next().await.is_some() {}
        router.prune();
        if let Some(rest) = router.settings.interval.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// The most of a health answer read (a site's is ~200 bytes): a site, or anything at its
/// address, cannot make a router buffer more.
pub(crate) const MAX_HEALTH_BODY: usize = 64 << 10;

async fn check(router: &Router, site: &SiteState) {
    let settings = &router.settings;
    let request = http::Request::get(site.uri("/_atoll/health?ready=1"))
        .header(crate::HOP_HEADER, &router.name)
        .body(crate::proxy::ProxyBody::empty());
    let Ok(request) = request else { return };
    let result = tokio::time::timeout(settings.timeout, async {
        let response =
            crate::proxy::client().request(request).await.map_err(|e| crate::proxy::describe(&e))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await
            .map_err(|e| format!("health check answer: {e}"))?
            .to_bytes();
        if status != http::StatusCode::OK {
            return Err(format!("health check answered {status}"));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| "health check answer is not JSON".to_owned())?;
        site.set_max_deadline(v["max_deadline_ms"].as_u64());
        site.health().faults = v.get("dev_faults").cloned();
        Ok((v["site"].as_str().map(str::to_owned), v["region"].as_str().map(str::to_owned)))
    })
    .await;
    let transition = match result {
        Ok(Ok((name, region))) => {
            let region = region.map(|r| router.known_region(r));
            let who = |site: &SiteState| {
                let h = site.health();
                (h.name.clone(), h.known_region.clone())
            };
            let before = who(site);
            let transition = site.passed(name, region, settings.rise);
            if who(site) != before {
                router.rankings_changed();
            }
            transition
        }
        Ok(Err(reason)) => site.failed(reason, settings.fall),
        Err(_) => site.failed(format!("health check timed out after {:?}", settings.timeout), settings.fall),
    };
    log_transition(site, transition);
}

pub(crate) fn log_transition(site: &SiteState, transition: Transition) {
    match transition {
        Transition::None => {}
        Transition::WentDown => {
            let h = site.snapshot();
            tracing::warn!(
                site = %site.label(), url = %site.url(),
                "site is down: out of rotation ({})", h.last_error.unwrap_or_default()
            );
        }
        Transition::CameBack => {
            tracing::info!(site = %site.label(), url = %site.url(), "site is back in rotation")
        }
    }
}
