//! What a site did over the last 15 minutes, in memory: one [`Sample`] per second (requests,
//! errors, latency, instantiations, key-value operations, routing decisions, and per peer the
//! replication lag and bytes), and [`Event`]s (a site down or up, a region failed over and back,
//! faults injected and healed, deploys). The status page draws them (`?since=` gives only what is
//! new) and `atoll status` prints them.
//!
//! Requests are counted where they are served (`record_request`, from the app metrics); the rest
//! is read once a second by [`run`] from what already keeps it (the router's sites and table, the
//! replication peers, the runtime's key-value counter, the router's decision counters) and
//! turned into per-second differences and events by comparing with the second before.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// How much is kept.
const KEEP_MS: u64 = 15 * 60 * 1000;
/// Latency buckets: bucket `i` holds latencies up to `FIRST_US * GROWTH^i` µs.
const BUCKETS: usize = 64;
const FIRST_US: f64 = 50.0;
const GROWTH: f64 = 1.25;

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
static INSTANTIATIONS: AtomicU64 = AtomicU64::new(0);
static LATENCY: [AtomicU64; BUCKETS] = [const { AtomicU64::new(0) }; BUCKETS];

/// Counts a request served here: its status, how long it took, and whether a guest ran for it.
pub fn record_request(status: u16, seconds: f64, instantiated: bool) {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    if status >= 500 {
        ERRORS.fetch_add(1, Ordering::Relaxed);
    }
    if instantiated {
        INSTANTIATIONS.fetch_add(1, Ordering::Relaxed);
    }
    let us = (seconds * 1e6).max(1.0);
    let bucket = ((us / FIRST_US).ln() / GROWTH.ln()).ceil().clamp(0.0, (BUCKETS - 1) as f64) as usize;
    LATENCY[bucket].fetch_add(1, Ordering::Relaxed);
}

/// One second.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The second's end, unix ms.
    pub t: u64,
    pub requests: u64,
    /// Answered 5xx.
    pub errors: u64,
    /// Latency of the second's requests, ms (upper bucket edges; `null` without requests).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub instantiations: u64,
    pub kv_ops: u64,
    /// Routing decisions by reason (`nearest`, `failover`, `fallback`, `forwarded`, ...).
    pub routes: BTreeMap<&'static str, u64>,
    /// Per peer: replication lag (ms) and bytes sent and received in the second.
    pub peers: BTreeMap<String, PeerSample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerSample {
    pub lag_ms: Option<u64>,
    pub bytes: u64,
}

/// Something that happened.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t: u64,
    /// `start`, `down`, `up`, `failover`, `failback`, `faults`, `healed`, `deploy`, `delete`.
    pub kind: &'static str,
    pub text: String,
}

/// The kept samples and events.
pub struct History {
    kept: Mutex<(VecDeque<Sample>, VecDeque<Event>)>,
}

/// This process's (one site per process).
pub static HISTORY: History = History { kept: Mutex::new((VecDeque::new(), VecDeque::new())) };

impl History {
    fn push(&self, sample: Sample, events: Vec<Event>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let from = sample.t.saturating_sub(KEEP_MS);
        kept.0.push_back(sample);
        kept.1.extend(events);
        while kept.0.front().is_some_and(|s| s.t < from) {
            kept.0.pop_front();
        }
        while kept.1.front().is_some_and(|e| e.t < from) || kept.1.len() > 1000 {
            kept.1.pop_front();
        }
    }

    /// The samples and events after `since` (unix ms; 0: all kept), as JSON.
    pub fn since(&self, since: u64) -> serde_json::Value {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let samples: Vec<&Sample> = kept.0.iter().filter(|s| s.t > since).collect();
        let events: Vec<&Event> = kept.1.iter().filter(|e| e.t > since).collect();
        serde_json::json!({ "keep_ms": KEEP_MS, "samples": samples, "events": events })
    }
}

/// What one second's look at the site found; the next one is compared with it.
#[derive(Default, Clone, PartialEq)]
pub struct Look {
    /// Site name → live.
    pub sites: BTreeMap<String, bool>,
    /// Client region → the site serving it, and whether that is the region's first choice.
    pub serving: BTreeMap<String, (Option<String>, bool)>,
    /// Injected faults (atoll dev), as text.
    pub faults: String,
    /// App → version.
    pub apps: BTreeMap<String, String>,
    /// Peer → (lag, bytes sent + received so far).
    pub peers: BTreeMap<String, (Option<u64>, u64)>,
    pub kv_ops: u64,
    pub routes: BTreeMap<&'static str, u64>,
}

/// The events between two looks.
fn events(t: u64, before: &Look, now: &Look) -> Vec<Event> {
    let mut out = Vec::new();
    let mut event = |kind, text: String| out.push(Event { t, kind, text });
    for (site, live) in &now.sites {
        match before.sites.get(site) {
            Some(was) if was != live => event(
                if *live { "up" } else { "down" },
                format!("{site} {}", if *live { "up" } else { "down" }),
            ),
            _ => {}
        }
    }
    // One event per site that took regions over (or back), naming the regions.
    let mut moved: BTreeMap<(bool, String), Vec<&str>> = BTreeMap::new();
    for (region, (serving, first)) in &now.serving {
        let Some((was, _)) = before.serving.get(region) else { continue };
        if was != serving {
            let by = serving.clone().unwrap_or_else(|| "no live site".into());
            moved.entry((*first, by)).or_default().push(region);
        }
    }
    for ((first, by), regions) in moved {
        let named = match regions.len() {
            1..=3 => regions.join(", "),
            n => format!("{} and {} other regions", regions[..2].join(", "), n - 2),
        };
        if first {
            event("failback", format!("{named} served by {by} again"));
        } else {
            event("failover", format!("{named} failed over to {by}"));
        }
    }
    if before.faults != now.faults {
        if now.faults.is_empty() {
            event("healed", format!("faults healed (were: {})", before.faults));
        } else {
            event("faults", format!("faults: {}", now.faults));
        }
    }
    for (app, version) in &now.apps {
        if before.apps.get(app) != Some(version) {
            event("deploy", format!("{app} deployed ({})", &version[..version.len().min(12)]));
        }
    }
    for app in before.apps.keys().filter(|a| !now.apps.contains_key(*a)) {
        event("delete", format!("{app} deleted"));
    }
    out
}

/// Takes a look every second (`look` reads the site) and keeps the samples and events.
pub fn run(history: &History, site_name: &str, mut look: impl FnMut() -> Look) {
    let mut before = look();
    history.push(
        Sample {
            t: now_ms(),
            requests: 0,
            errors: 0,
            p50_ms: None,
            p99_ms: None,
            instantiations: 0,
            kv_ops: 0,
            routes: BTreeMap::new(),
            peers: BTreeMap::new(),
        },
        vec![Event { t: now_ms(), kind: "start", text: format!("{site_name} started") }],
    );
    loop {
        // At the next whole second.
        let wait = 1000 - now_ms() % 1000;
        std::thread::sleep(std::time::Duration::from_millis(wait.max(1)));
        let now = look();
        let t = now_ms();
        let mut latency = [0u64; BUCKETS];
        for (i, bucket) in LATENCY.iter().enumerate() {
            latency[i] = bucket.swap(0, Ordering::Relaxed);
        }
        let peers = now
            .peers
            .iter()
            .map(|(name, (lag, bytes))| {
                let was = before.peers.get(name).map_or(*bytes, |p| p.1);
                (name.clone(), PeerSample { lag_ms: *lag, bytes: bytes.saturating_sub(was) })
            })
            .collect();
        let routes = now
            .routes
            .iter()
            .map(|(reason, n)| (*reason, n.saturating_sub(before.routes.get(reason).copied().unwrap_or(0))))
            .filter(|(_, n)| *n > 0)
            .collect();
        let sample = Sample {
            t,
            requests: REQUESTS.swap(0, Ordering::Relaxed),
            errors: ERRORS.swap(0, Ordering::Relaxed),
            p50_ms: quantile(&latency, 0.5),
            p99_ms: quantile(&latency, 0.99),
            instantiations: INSTANTIATIONS.swap(0, Ordering::Relaxed),
            kv_ops: now.kv_ops.saturating_sub(before.kv_ops),
            routes,
            peers,
        };
        history.push(sample, events(t, &before, &now));
        before = now;
    }
}

/// The latency (ms, the bucket's upper edge) at or under which `q` of the counts fall.
fn quantile(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let us = FIRST_US * GROWTH.powi(i as i32);
            return Some((us / 10.0).round() / 100.0);
        }
    }
    None
}

/// The system clock (unix ms), without the skew `atoll dev skew` injects into the site's own
/// clocks: the history is drawn against the viewer's time.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut b = [0u64; BUCKETS];
        b[0] = 98; // up to 50 µs
        b[10] = 2; // up to 50 µs × 1.25^10 ≈ 466 µs
        assert_eq!(quantile(&b, 0.5), Some(0.05));
        assert_eq!(quantile(&b, 0.99), Some(0.47));
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
    }

    #[test]
    fn looks_compared_give_the_events() {
        let mut before = Look::default();
        before.sites.insert("eu-west-1".into(), true);
        before.serving.insert("eu-west".into(), (Some("eu-west-1".into()), true));
        before.apps.insert("counter".into(), "abc".into());
        let mut now = before.clone();
        now.sites.insert("eu-west-1".into(), false);
        now.serving.insert("eu-west".into(), (Some("us-east-1".into()), false));
        now.faults = "eu-west-1 partitioned".into();
        now.apps.insert("counter".into(), "def".into());
        let kinds: Vec<&str> = events(1, &before, &now).iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["down", "failover", "faults", "deploy"]);
        let back: Vec<String> = events(2, &now, &before).iter().map(|e| e.text.clone()).collect();
        assert_eq!(
            back,
            [
                "eu-west-1 up",
                "eu-west served by eu-west-1 again",
                "faults healed (were: eu-west-1 partitioned)",
                "counter deployed (abc)"
            ]
        );
    }
}
