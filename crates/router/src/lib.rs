//! Atoll's routing: send each request to the nearest live site.
//!
//! A [`Router`] holds the sites it knows ([`SiteState`]: URL, name, region, liveness), ranks
//! them for a client's region by great-circle distance between regions (or an explicit latency
//! table), keeps liveness current with active health checks of `/_atoll/health` plus passive
//! signals from proxying, and proxies a request to the first live site in that order, retrying
//! the next one when that is safe. The same library is the `atoll router` front door and the
//! forwarding every site does (a site is itself a candidate: [`Target::Local`]).
//!
//! Nothing here knows wasmtime, redb or replication; membership comes in through
//! [`Router::set_sites`] (from configuration, [`dns`] discovery, or a site's peers).

pub mod config;
pub mod dns;
mod health;
mod proxy;
pub mod regions;
mod sites;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

pub use config::{RoutingConfig, Settings};
pub use proxy::{Outcome, RouteInfo};
pub use sites::{Health, SiteState};

/// Response header: why this site served the request (`nearest`, `failover`).
pub const ROUTE_HEADER: &str = "x-atoll-route";
/// Response header: the region the decision was made for.
pub const ROUTE_REGION_HEADER: &str = "x-atoll-route-region";
/// Response header, present when the default region was used: `missing` or `unknown`.
pub const DEFAULT_REGION_HEADER: &str = "x-atoll-default-region";
/// Request header a router or site sets when it forwards: the receiving site serves the request
/// itself, whatever it thinks is nearest. At most one hop, and no loops.
pub const HOP_HEADER: &str = "x-atoll-forwarded-by";

/// A site identity given in configuration (its URL, optionally its name and region; what is
/// missing is learned from its health answer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub url: String,
    pub name: Option<String>,
    pub region: Option<String>,
}

impl SiteSpec {
    pub fn url(url: impl Into<String>) -> SiteSpec {
        SiteSpec { url: url.into(), name: None, region: None }
    }
}

/// Where a request may go, nearest first.
#[derive(Debug, Clone)]
pub enum Target {
    /// This site itself (only for a router embedded in a site).
    Local,
    /// Another site.
    Site(Arc<SiteState>),
}

/// The site a router is embedded in.
#[derive(Debug, Clone)]
struct Me {
    name: String,
    region: Option<String>,
}

/// The routing state of a router or a site.
#[derive(Debug)]
pub struct Router {
    settings: Settings,
    /// The name in `x-atoll-forwarded-by` and the status page.
    name: String,
    me: Option<Me>,
    sites: RwLock<Vec<Arc<SiteState>>>,
}

/// A region decision: which region, and whether it was the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRegion {
    pub region: String,
    /// `Some("missing")` or `Some("unknown")` when the default region stands in.
    pub defaulted: Option<&'static str>,
}

impl Router {
    /// A stand-alone router (`atoll router`) named `name`.
    pub fn new(name: &str, settings: Settings) -> Router {
        Router { settings, name: name.to_owned(), me: None, sites: RwLock::new(Vec::new()) }
    }

    /// The router inside site `name` in `region`: this site is a candidate like the others.
    pub fn for_site(name: &str, region: &str, settings: Settings) -> Router {
        let region = settings.regions.resolve(region);
        if region.is_none() {
            tracing::warn!(
                "this site's region is not in the region table: requests are forwarded to sites in known regions"
            );
        }
        let me = Me { name: name.to_owned(), region };
        Router { me: Some(me), ..Router::new(name, settings) }
    }

    /// The sites known now.
    pub fn sites(&self) -> Vec<Arc<SiteState>> {
        self.sites.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the membership `specs`: new URLs are added (assumed live until checked), known
    /// ones keep their health, and ones no longer listed go once their checks fail (at once if
    /// they are already dead). A spec naming this site itself is ignored.
    pub fn set_sites(&self, specs: &[SiteSpec]) {
        let mut sites = self.sites.write().unwrap_or_else(|e| e.into_inner());
        for site in sites.iter() {
            site.set_listed(specs.iter().any(|s| s.url.trim_end_matches('/') == site.url()));
        }
        for spec in specs {
            if sites.iter().any(|s| s.url() == spec.url.trim_end_matches('/')) {
                continue;
            }
            let region = spec.region.clone().map(|r| {
                let known = self.settings.regions.resolve(&r);
                (r, known)
            });
            match SiteState::new(&spec.url, spec.name.clone(), None) {
                Ok(site) => {
                    site.set_identity(None, region);
                    tracing::info!(url = %site.url(), "site added to the routing table");
                    sites.push(Arc::new(site));
                }
                Err(e) => tracing::warn!("ignoring a site: {e:#}"),
            }
        }
        sites.retain(|s| {
            let h = s.health();
            let keep = h.listed || h.live;
            if !keep {
                tracing::info!(url = %s.url(), "site removed from the routing table (no longer listed, and down)");
            }
            keep
        });
    }

    /// Removes unlisted sites that are dead (called after health checks).
    fn prune(&self) {
        let gone = self.sites().iter().any(|s| {
            let h = s.health();
            !h.listed && !h.live
        });
        if gone {
            let specs: Vec<SiteSpec> =
                self.sites().iter().filter(|s| s.health().listed).map(|s| SiteSpec::url(s.url())).collect();
            self.set_sites(&specs);
        }
    }

    /// The client's region from the request headers, or the default and why.
    pub fn client_region(&self, headers: &http::HeaderMap) -> ClientRegion {
        match headers.get(&self.settings.region_header).and_then(|v| v.to_str().ok()) {
            None => ClientRegion { region: self.settings.default_region.clone(), defaulted: Some("missing") },
            Some(raw) => match self.settings.regions.resolve(raw) {
                Some(region) => ClientRegion { region, defaulted: None },
                None => {
                    ClientRegion { region: self.settings.default_region.clone(), defaulted: Some("unknown") }
                }
            },
        }
    }

    /// Every candidate for a client in `region`, nearest first, dead ones included. Ties go to
    /// this site first (no pointless hop), then by name, then by URL: every router agrees.
    pub fn ranking(&self, region: &str) -> Vec<Target> {
        let distance = |site_region: Option<&str>| -> f64 {
            site_region.and_then(|r| self.settings.regions.distance(region, r)).unwrap_or(f64::INFINITY)
        };
        let mut ranked: Vec<(f64, u8, String, String, Target)> = self
            .sites()
            .into_iter()
            .map(|s| {
                let h = s.health();
                let (d, name) = (distance(h.known_region.as_deref()), h.name.clone().unwrap_or_default());
                drop(h);
                (d, 1, name, s.url().to_owned(), Target::Site(s))
            })
            .collect();
        if let Some(me) = &self.me {
            ranked.push((distance(me.region.as_deref()), 0, me.name.clone(), String::new(), Target::Local));
        }
        ranked
            .sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
        ranked.into_iter().map(|r| r.4).collect()
    }

    /// The live routing table: for every region a client may name, the sites in order and the
    /// one serving it now; and every site's health.
    pub fn status_json(&self) -> serde_json::Value {
        let label = |t: &Target| match t {
            Target::Local => self.me.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
            Target::Site(s) => s.label(),
        };
        let live = |t: &Target| match t {
            Target::Local => true,
            Target::Site(s) => s.is_live(),
        };
        let mut table = BTreeMap::new();
        for region in self.settings.regions.names() {
            let order = self.ranking(&region);
            let serving = order.iter().find(|t| live(t)).map(label);
            let order: Vec<String> = order.iter().map(label).collect();
            table.insert(region, serde_json::json!({ "serving": serving, "order": order }));
        }
        let sites: Vec<serde_json::Value> = self
            .sites()
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s.snapshot()).unwrap_or_default();
                v["url"] = s.url().into();
                v
            })
            .collect();
        serde_json::json!({
            "router": self.name,
            "site": self.me.as_ref().map(|m| &m.name),
            "region_header": self.settings.region_header.as_str(),
            "default_region": self.settings.default_region,
            "health": {
                "interval_ms": self.settings.interval.as_millis() as u64,
                "timeout_ms": self.settings.timeout.as_millis() as u64,
                "fall": self.settings.fall,
                "rise": self.settings.rise,
            },
            "sites": sites,
            "table": table,
        })
    }

    /// Runs the active health checks until the router is dropped.
    pub async fn run_health_checks(self: Arc<Self>) {
        health::run(self).await
    }
}
