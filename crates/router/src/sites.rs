//! The sites a router knows, and whether each is live.
//!
//! A site is known by its base URL; its name and region come from configuration or from its
//! own `/_atoll/health` answer. Liveness changes only here: `fall` consecutive failed checks (or
//! one refused connection while proxying) take a site out of rotation, `rise` consecutive passed
//! checks put it back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// One site as this router sees it.
#[derive(Debug)]
pub struct SiteState {
    url: String,
    uri_base: http::Uri,
    live: AtomicBool,
    /// Cut off from here by a partition `atoll dev` injected: not live, whatever checks say.
    cut: AtomicBool,
    /// A health check has passed since it was added (what `reason` reads on every request,
    /// without the lock).
    heard: AtomicBool,
    /// Its region is known (configured, or from a health answer).
    placed: AtomicBool,
    added: std::time::Instant,
    /// The longest deadline of its apps, as its health answer says (how long a request it has
    /// taken may rightly go unanswered), in ms; 0 while unknown.
    max_deadline: std::sync::atomic::AtomicU64,
    state: Mutex<Health>,
}

/// How long a site not yet heard from, whose region is unknown, may be nearer than the nearest
/// known one (then it is taken for dead).
const UNPLACED_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// What the health checks and the proxy have learned about a site.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    /// The site's name (configured, or learned from its health answer).
    pub name: Option<String>,
    /// The site's region as it names it.
    pub region: Option<String>,
    /// That region as the router's region table knows it (`None`: unknown, ranked last).
    pub known_region: Option<String>,
    pub live: bool,
    /// When `live` last changed (unix ms).
    pub since_ms: u64,
    pub consecutive_failures: u32,
    pub consecutive_passes: u32,
    /// The reason of the last failure.
    pub last_error: Option<String>,
    /// The last check that passed (unix ms).
    pub last_ok_ms: Option<u64>,
    /// Still named by the configuration or discovery; an unlisted site goes once it is dead.
    pub listed: bool,
    /// Its answers' observed time to the response head (an average and a deviation, moving):
    /// when a request of its has waited past `mean + 4 × deviation`, it is hedged.
    pub latency_ms: Option<(f64, f64)>,
    /// Faults injected into it for a rehearsal (`atoll dev`), as its health answer says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<serde_json::Value>,
}

/// The least and the most a request waits for a site before it is hedged to the next one.
pub const HEDGE_MIN: std::time::Duration = std::time::Duration::from_millis(50);
pub const HEDGE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// What a state change was, for the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    WentDown,
    CameBack,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl SiteState {
    /// A site at `url` (scheme and authority, no path), assumed live until a check says otherwise;
    /// `region` is its region as named and as the region table knows it.
    pub fn new(
        url: &str,
        name: Option<String>,
        region: Option<(String, Option<String>)>,
    ) -> anyhow::Result<SiteState> {
        let url = url.trim_end_matches('/').to_owned();
        let uri_base: http::Uri =
            url.parse().map_err(|e| anyhow::anyhow!("site URL {url:?} is not a URL: {e}"))?;
        if !matches!(uri_base.scheme_str(), Some("http" | "https")) || uri_base.authority().is_none() {
            anyhow::bail!("site URL {url:?} must be http://HOST:PORT or https://HOST:PORT");
        }
        if uri_base.path() != "/" && !uri_base.path().is_empty() {
            anyhow::bail!("site URL {url:?} must not have a path");
        }
        Ok(SiteState {
            url,
            uri_base,
            live: AtomicBool::new(true),
            cut: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            placed: AtomicBool::new(region.as_ref().is_some_and(|r| r.1.is_some())),
            added: std::time::Instant::now(),
            max_deadline: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(Health {
                name,
                known_region: region.as_ref().and_then(|r| r.1.clone()),
                region: region.map(|r| r.0),
                live: true,
                since_ms: now_ms(),
                consecutive_failures: 0,
                consecutive_passes: 0,
                last_error: None,
                last_ok_ms: None,
                listed: true,
                latency_ms: None,
                faults: None,
            }),
        })
    }

    /// The site's address, when its URL names one (not a DNS name).
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.uri_base.host()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `path_and_query` at this site.
    pub(crate) fn uri(&self, path_and_query: &str) -> http::Uri {
        let mut parts = self.uri_base.clone().into_parts();
        parts.path_and_query = path_and_query.parse().ok();
        http::Uri::from_parts(parts).unwrap_or_else(|_| self.uri_base.clone())
    }

    /// Whether it takes requests now.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed) && !self.cut.load(Ordering::Relaxed)
    }

    /// Cuts it off from here, or ends that: a partition injected by `atoll dev` (development
    /// only; see the binary's `site::faults`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    /// Whether an injected partition cuts it off from here.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    pub(crate) fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of its state.
    pub fn snapshot(&self) -> Health {
        self.health().clone()
    }

    /// The name to show: its name, else its URL.
    pub fn label(&self) -> String {
        self.health().name.clone().unwrap_or_else(|| self.url.clone())
    }

    /// A check passed; the site said who it is.
    pub(crate) fn passed(
        &self,
        name: Option<String>,
        region: Option<(String, Option<String>)>,
        rise: u32,
    ) -> Transition {
        let mut h = self.health();
        h.consecutive_failures = 0;
        h.consecutive_passes = h.consecutive_passes.saturating_add(1);
        h.last_ok_ms = Some(now_ms());
        if name.is_some() {
            h.name = name;
        }
        if let Some((region, known)) = region {
            h.region = Some(region);
            h.known_region = known;
        }
        self.heard.store(true, Ordering::Relaxed);
        self.placed.store(h.known_region.is_some() || h.region.is_some(), Ordering::Relaxed);
        if !h.live && h.consecutive_passes >= rise {
            self.set_live(&mut h, true);
            return Transition::CameBack;
        }
        Transition::None
    }

    /// A check failed, or a request to it failed after it was sent.
    pub(crate) fn failed(&self, reason: String, fall: u32) -> Transition {
        let mut h = self.health();
        h.consecutive_passes = 0;
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        h.last_error = Some(reason);
        if h.live && h.consecutive_failures >= fall {
            self.set_live(&mut h, false);
            return Transition::WentDown;
        }
        Transition::None
    }

    /// A connection to it was refused or reset: out of rotation at once.
    pub(crate) fn unreachable(&self, reason: String, fall: u32) -> Transition {
        let mut h = self.health();
        h.consecutive_failures = h.consecutive_failures.max(fall.saturating_sub(1));
        drop(h);
        self.failed(reason, fall)
    }

    /// One of its answers took `elapsed` to its head.
    pub(crate) fn observe(&self, elapsed: std::time::Duration) {
        let x = elapsed.as_secs_f64() * 1000.0;
        let mut h = self.health();
        h.latency_ms = Some(match h.latency_ms {
            None => (x, x / 2.0),
            Some((mean, dev)) => (mean + 0.05 * (x - mean), dev + 0.05 * ((x - mean).abs() - dev)),
        });
    }

    /// How long a request to it waits for a head before it is hedged to the next site: well past
    /// what its answers usually take, within [`HEDGE_MIN`] and [`HEDGE_MAX`] ([`HEDGE_MAX`] until
    /// it has answered).
    pub(crate) fn hedge_after(&self) -> std::time::Duration {
        match self.health().latency_ms {
            None => HEDGE_MAX,
            Some((mean, dev)) => {
                std::time::Duration::from_secs_f64((mean + 4.0 * dev) / 1000.0).clamp(HEDGE_MIN, HEDGE_MAX)
            }
        }
    }

    /// Its health answer said its longest app deadline.
    pub(crate) fn set_max_deadline(&self, ms: Option<u64>) {
        self.max_deadline.store(ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// Its longest app deadline, if its health answer said it.
    pub(crate) fn max_deadline_ms(&self) -> Option<u64> {
        Some(self.max_deadline.load(Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    /// A health check has passed since it was added.
    pub(crate) fn heard_from(&self) -> bool {
        self.heard.load(Ordering::Relaxed)
    }

    /// Not heard from yet, its region unknown, and added within [`UNPLACED_GRACE`]: it might be
    /// nearer than the nearest known site.
    pub(crate) fn unplaced(&self) -> bool {
        !self.heard_from() && !self.placed.load(Ordering::Relaxed) && self.added.elapsed() < UNPLACED_GRACE
    }

    fn set_live(&self, h: &mut Health, live: bool) {
        h.live = live;
        h.since_ms = now_ms();
        self.live.store(live, Ordering::Relaxed);
    }

    pub(crate) fn set_listed(&self, listed: bool) {
        self.health().listed = listed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_and_rise_thresholds() {
        let s = SiteState::new("http://127.0.0.1:1", None, None).expect("url");
        assert!(s.is_live());
        assert_eq!(s.failed("timeout".into(), 2), Transition::None);
        assert!(s.is_live());
        assert_eq!(s.failed("timeout".into(), 2), Transition::WentDown);
        assert!(!s.is_live());
        assert_eq!(s.passed(None, None, 2), Transition::None);
        assert!(!s.is_live());
        assert_eq!(s.failed("timeout".into(), 2), Transition::None);
        assert_eq!(s.passed(None, None, 2), Transition::None);
        assert_eq!(s.passed(Some("a".into()), None, 2), Transition::CameBack);
        assert!(s.is_live());
        assert_eq!(s.label(), "a");
        // A refused connection is enough on its own.
        assert_eq!(s.unreachable("connection refused".into(), 2), Transition::WentDown);
        assert!(!s.is_live());
    }

    #[test]
    fn urls_are_checked() {
        assert!(SiteState::new("http://127.0.0.1:8080/", None, None).is_ok());
        assert!(SiteState::new("https://x:1", None, None).is_ok());
        assert!(SiteState::new("http://x:1/path", None, None).is_err());
        assert!(SiteState::new("https://127.0.0.1:8443", None, None).is_ok());
        assert!(SiteState::new("ftp://127.0.0.1:21", None, None).is_err());
        assert!(SiteState::new("not a url", None, None).is_err());
        let s = SiteState::new("http://127.0.0.1:8080", None, None).expect("url");
        assert_eq!(s.uri("/apps/x?y=1").to_string(), "http://127.0.0.1:8080/apps/x?y=1");
    }
}
