//! The status page, `/_atoll/ui`, on every site and router: one self-contained HTML page (no
//! external assets, works offline) that polls `/_atoll/ui/state` every second and shows the
//! sites on a world map with live/dead, the last 15 minutes (a timeline of events, and charts
//! per site and per peer from the site's history, `crate::history`), the routing table,
//! per-peer replication and the deployed apps.

use atoll_router::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The page, with the coastline (`assets/land-110m.path`: Natural Earth's 1:110m land, public
/// domain, made by `assets/make-land.py`) put in once.
static PAGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    include_str!("ui.html").replace("{{LAND}}", include_str!("../assets/land-110m.path").trim())
});

/// The page itself.
pub async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], PAGE.as_str())
        .into_response()
}

/// `?since=MS`: only the history after it (the page asks for what is new each second).
#[derive(Debug, serde::Deserialize)]
pub struct StateQuery {
    pub since: Option<u64>,
}

/// Who is asking for the state: a site (with its replication and apps) or a router.
pub struct Viewer<'a> {
    pub kind: &'static str,
    pub name: &'a str,
    pub region: Option<&'a str>,
    pub peers: Vec<atoll_sync::Peer>,
    /// (name, version)
    pub apps: Vec<(String, String)>,
    /// Faults `atoll dev` injected into this site, if any.
    pub faults: Option<Value>,
}

/// What the page shows, as JSON.
pub fn state(router: &Router, viewer: Viewer<'_>) -> Value {
    let place = |region: Option<&str>| {
        let coord = region.and_then(|r| router.coord(r));
        (coord.map(|c| c.lat), coord.map(|c| c.lon))
    };
    let mut sites = Vec::new();
    if viewer.kind == "site" {
        let (lat, lon) = place(viewer.region);
        sites.push(json!({
            "name": viewer.name, "region": viewer.region, "live": true, "url": "(this site)",
            "last_error": null, "lat": lat, "lon": lon, "faults": viewer.faults,
        }));
    }
    for site in router.sites() {
        let h = site.snapshot();
        let (lat, lon) = place(h.region.as_deref());
        sites.push(json!({
            "name": h.name.unwrap_or_else(|| site.url().to_owned()), "region": h.region, "live": h.live,
            "url": site.url(), "last_error": if h.live { None } else { h.last_error }, "lat": lat, "lon": lon,
            "faults": h.faults, "cut": site.is_cut(),
        }));
    }
    let status = router.status_json();
    let table: Vec<Value> = status["table"]
        .as_object()
        .map(|t| {
            t.iter()
                .map(|(region, row)| json!({ "region": region, "serving": row["serving"], "order": row["order"] }))
                .collect()
        })
        .unwrap_or_default();
    let apps: Vec<Value> =
        viewer.apps.iter().map(|(name, version)| json!({ "name": name, "version": version })).collect();
    json!({
        "kind": viewer.kind,
        "name": viewer.name,
        "region": viewer.region,
        "sites": sites,
        "table": table,
        "peers": viewer.peers.into_iter().filter(|p| p.active()).collect::<Vec<_>>(),
        "apps": apps,
        "faults": viewer.faults,
    })
}
