//! `/metrics` in the Prometheus text format, through the `metrics` facade and its Prometheus
//! exporter. Events are recorded where they happen (`metrics::counter!` in the runtime, the
//! router and here); state that already lives elsewhere (replication peers, the routing table,
//! requests in flight) is copied into gauges when `/metrics` is scraped.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `atoll_requests_total` | counter | `app`, `status` (and `site`, on every metric of a site) |
//! | `atoll_request_duration_seconds` | histogram | `app` |
//! | `atoll_requests_in_flight` | gauge | |
//! | `atoll_instantiation_seconds` | histogram | `app` |
//! | `atoll_guest_traps_total`, `atoll_guest_timeouts_total` | counter | `app` |
//! | `atoll_responses_cut_total` | counter | `app`, `reason` |
//! | `atoll_kv_operations_total` | counter | `op` |
//! | `atoll_apps_deployed` | gauge | |
//! | `atoll_sync_lag_seconds`, `atoll_sync_push_pending` | gauge | `peer` |
//! | `atoll_sync_entries_total`, `atoll_sync_bytes_total` | counter | `peer`, `direction` |
//! | `atoll_sync_peer_last_sync_age_seconds` | gauge | `peer` |
//! | `atoll_router_site_up` | gauge | `target`, `region` |
//! | `atoll_routing_decisions_total` | counter | `reason` |
//! | `atoll_routing_default_region_total` | counter | `why` |
//! | `atoll_router_hedges_total` | counter | `trigger` |
//! | `atoll_router_hedge_winners_total` | counter | `winner` |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static IN_FLIGHT: AtomicI64 = AtomicI64::new(0);

/// Latency buckets (seconds) for every `_seconds` histogram: 50 µs to 10 s.
const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Installs the process-wide recorder; `labels` are added to every metric (`site`, `region`).
pub fn install(labels: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut builder = PrometheusBuilder::new().set_buckets(&BUCKETS)?;
    for (k, v) in labels {
        builder = builder.add_global_label(*k, *v);
    }
    let handle = builder.install_recorder()?;
    // Histogram samples collect in buckets until upkeep folds them in; without it they would
    // grow with every request between scrapes.
    let upkeep = handle.clone();
    std::thread::Builder::new().name("atoll-metrics".into()).spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            upkeep.run_upkeep();
        }
    })?;
    let _ = HANDLE.set(handle);
    Ok(())
}

/// The text exposition (empty before `install`).
pub fn render() -> String {
    HANDLE.get().map(PrometheusHandle::render).unwrap_or_default()
}

/// Counts a request in flight while the guard lives.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests being served now (the site's own, not the ones it forwards).
pub fn in_flight() -> i64 {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// Copies the routing table into gauges.
pub fn observe_router(router: &atoll_router::Router) {
    for site in router.sites() {
        let h = site.snapshot();
        let target = h.name.clone().unwrap_or_else(|| site.url().to_owned());
        let region = h.region.clone().unwrap_or_default();
        metrics::gauge!("atoll_router_site_up", "target" => target, "region" => region).set(if h.live {
            1.0
        } else {
            0.0
        });
    }
}

/// Copies the replication peers' statistics into gauges and counters.
pub fn observe_sync<S: atoll_sync::SyncStore>(node: &atoll_sync::Node<S>) {
    let now = atoll_sync::http::wall_ms();
    metrics::gauge!("atoll_sync_store_closed").set(if node.guest_gate().is_some() { 1.0 } else { 0.0 });
    for p in node.peers() {
        let peer = p.site.clone().unwrap_or_else(|| p.url.clone());
        if let Some(offset) = p.clock_offset_ms {
            metrics::gauge!("atoll_sync_peer_clock_offset_ms", "peer" => peer.clone()).set(offset as f64);
        }
        metrics::gauge!("atoll_sync_peer_cut_off", "peer" => peer.clone()).set(if p.cut_off {
            1.0
        } else {
            0.0
        });
        if !p.active() {
            continue;
        }
        if let Some(lag) = p.lag_ms {
            metrics::gauge!("atoll_sync_lag_seconds", "peer" => peer.clone()).set(lag as f64 / 1000.0);
        }
        if let Some(at) = p.last_sync_ms {
            metrics::gauge!("atoll_sync_peer_last_sync_age_seconds", "peer" => peer.clone())
                .set(now.saturating_sub(at) as f64 / 1000.0);
        }
        metrics::gauge!("atoll_sync_push_pending", "peer" => peer.clone()).set(p.push_pending as f64);
        for (direction, entries, bytes) in
            [("sent", p.entries_sent, p.bytes_sent), ("received", p.entries_received, p.bytes_received)]
        {
            metrics::counter!("atoll_sync_entries_total", "peer" => peer.clone(), "direction" => direction)
                .absolute(entries);
            metrics::counter!("atoll_sync_bytes_total", "peer" => peer.clone(), "direction" => direction)
                .absolute(bytes);
        }
    }
}

/// One app's request metrics, resolved once when the app is deployed: a request records into
/// its handles with no label hashing or registry lookup (the status counters other than 200
/// are looked up in a short list, and made on first use).
pub struct AppMetrics {
    name: String,
    ok: metrics::Counter,
    duration: metrics::Histogram,
    traps: metrics::Counter,
    timeouts: metrics::Counter,
    statuses: std::sync::Mutex<Vec<(u16, metrics::Counter)>>,
}

impl AppMetrics {
    pub fn new(name: &str) -> AppMetrics {
        let app = name.to_owned();
        AppMetrics {
            ok: metrics::counter!("atoll_requests_total", "app" => app.clone(), "status" => "200"),
            duration: metrics::histogram!("atoll_request_duration_seconds", "app" => app.clone()),
            traps: metrics::counter!("atoll_guest_traps_total", "app" => app.clone()),
            timeouts: metrics::counter!("atoll_guest_timeouts_total", "app" => app),
            name: name.to_owned(),
            statuses: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Counts a request answered with `status` after `seconds` (`instantiated`: a guest ran).
    pub fn request(&self, status: u16, seconds: f64, instantiated: bool) {
        crate::history::record_request(status, seconds, instantiated);
        self.duration.record(seconds);
        if status == 200 {
            return self.ok.increment(1);
        }
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, counter)) = statuses.iter().find(|(s, _)| *s == status) {
            return counter.increment(1);
        }
        let counter = metrics::counter!("atoll_requests_total", "app" => self.name.clone(), "status" => status.to_string());
        counter.increment(1);
        statuses.push((status, counter));
    }

    /// Counts a guest trap.
    pub fn trap(&self) {
        self.traps.increment(1);
    }

    /// Counts a guest stopped at its deadline.
    pub fn timeout(&self) {
        self.timeouts.increment(1);
    }
}
