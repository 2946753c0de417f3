//! Faults `atoll dev` injects into its sites to rehearse failures: a partition between sites,
//! latency, a clock skew. Development only: a site takes them only when started with
//! `--dev-faults FILE`, which it refuses without `--insecure-dev` and loopback listen addresses
//! (so no production site can have them), and `atoll dev` is what passes it.
//!
//! The faults live in one JSON file per dev cluster (`DATA/faults.json`, written by `atoll dev
//! partition|heal|latency|skew`); every site reads its own part every 100 ms and applies it to
//! its own transports:
//! - **partition**: replication to a site it is cut from fails at once (as a refused
//!   connection would), and its router takes that site for down (no forwarding, no hedging).
//!   `atoll dev` writes both sides, so both directions fail. Clients and the front-door router
//!   still reach every site: each side of a partition serves its own region.
//! - **latency**: every replication message it sends and every app request it serves waits that
//!   long first (the lag its peers measure grows; routers see a slow site and hedge).
//! - **skew**: its clock (the HLC's physical time and replication's wall clock) runs that far
//!   ahead or behind, so its peers measure the offset and the clock bound applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use atoll_sync::Transport;
use atoll_sync::message::Request;
use atoll_sync::node::Exchange;
use serde::{Deserialize, Serialize};

/// The faults of one dev cluster, by site name (`DATA/faults.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultsFile {
    #[serde(default)]
    pub(crate) sites: BTreeMap<String, SiteFaults>,
}

/// What is injected into one site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SiteFaults {
    /// The sites it cannot reach (and that cannot reach it): names and URLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) cut_from: Vec<Cut>,
    /// Added before every replication message it sends and every app request it serves.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) latency_ms: u64,
    /// Its clock's offset from the machine's.
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub(crate) skew_ms: i64,
}

impl SiteFaults {
    /// In a few words, as the status page's timeline says it.
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.cut_from.is_empty() {
            let names: Vec<&str> = self.cut_from.iter().map(|c| c.site.as_str()).collect();
            parts.push(format!("partitioned from {}", names.join(", ")));
        }
        if self.latency_ms > 0 {
            parts.push(format!("+{} ms latency", self.latency_ms));
        }
        if self.skew_ms != 0 {
            parts.push(format!("clock {:+} ms", self.skew_ms));
        }
        parts.join("; ")
    }
}

/// A site on the other side of a partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cut {
    pub(crate) site: String,
    pub(crate) url: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_i(v: &i64) -> bool {
    *v == 0
}

impl SiteFaults {
    pub(crate) fn is_empty(&self) -> bool {
        *self == SiteFaults::default()
    }
}

impl FaultsFile {
    /// Reads `path`; a missing file is no faults.
    pub(crate) fn load(path: &Path) -> Result<FaultsFile> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a faults file atoll dev wrote", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FaultsFile::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes it to `path` at once (a temporary file renamed over it: a site never reads half).
    pub(crate) fn store(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// One site's injected faults, as last read.
#[derive(Debug)]
pub(crate) struct Faults {
    path: PathBuf,
    me: String,
    current: RwLock<SiteFaults>,
}

impl Faults {
    pub(crate) fn new(path: PathBuf, me: String) -> Faults {
        Faults { path, me, current: RwLock::new(SiteFaults::default()) }
    }

    fn get(&self) -> SiteFaults {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a partition cuts this site from the site `name` at `url`.
    fn cut(&self, name: &str, url: &str) -> Option<String> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current
            .cut_from
            .iter()
            .find(|c| (!name.is_empty() && c.site == name) || c.url == url)
            .map(|c| c.site.clone())
    }

    /// The injected latency.
    pub(crate) fn latency(&self) -> Duration {
        Duration::from_millis(self.current.read().unwrap_or_else(|e| e.into_inner()).latency_ms)
    }

    /// What is injected now, for the status page and the health answer (`None`: nothing).
    pub(crate) fn status(&self) -> Option<SiteFaults> {
        Some(self.get()).filter(|f| !f.is_empty())
    }

    /// Reads the file again and applies what changed: the clock's skew, and the router's view
    /// of the sites a partition cuts off (every time: the router's sites come and go).
    fn reload(&self, router: &atoll_router::Router) {
        let next = match FaultsFile::load(&self.path) {
            Ok(mut file) => file.sites.remove(&self.me).unwrap_or_default(),
            Err(e) => {
                tracing::warn!("dev faults: {e:#}");
                return;
            }
        };
        let changed = {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            let changed = *current != next;
            *current = next.clone();
            changed
        };
        atoll_kv::hlc::set_dev_skew_ms(next.skew_ms);
        for site in router.sites() {
            let name = site.snapshot().name.unwrap_or_default();
            site.set_cut(self.cut(&name, site.url()).is_some());
        }
        if changed {
            let cut: Vec<&str> = next.cut_from.iter().map(|c| c.site.as_str()).collect();
            tracing::warn!(
                partitioned_from = ?cut, latency_ms = next.latency_ms, skew_ms = next.skew_ms,
                "atoll dev injected faults into this site"
            );
        }
    }
}

/// Keeps `faults` as `atoll dev` last wrote them.
pub(crate) async fn watch(faults: Arc<Faults>, router: Arc<atoll_router::Router>) {
    loop {
        faults.reload(&router);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the faults once before the site starts serving (its first clock readings included).
pub(crate) fn load_now(faults: &Faults, router: &atoll_router::Router) {
    faults.reload(router);
}

/// The replication transport with the injected faults in front of it.
pub(crate) struct Faulty<T> {
    pub(crate) inner: Arc<T>,
    pub(crate) faults: Option<Arc<Faults>>,
}

impl<T: Transport> Transport for Faulty<T> {
    async fn call(&self, url: &str, to: &str, request: Request) -> Result<Exchange> {
        if let Some(faults) = &self.faults {
            if let Some(site) = faults.cut(to, url) {
                anyhow::bail!("partitioned from {site} (a fault injected by atoll dev)");
            }
            let latency = faults.latency();
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
        }
        self.inner.call(url, to, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_round_trips_and_an_unknown_field_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("faults.json");
        assert_eq!(FaultsFile::load(&path).expect("missing is empty"), FaultsFile::default());
        let mut file = FaultsFile::default();
        file.sites.insert(
            "a".into(),
            SiteFaults {
                cut_from: vec![Cut { site: "b".into(), url: "http://127.0.0.1:2".into() }],
                latency_ms: 5,
                skew_ms: -2000,
            },
        );
        file.store(&path).expect("store");
        assert_eq!(FaultsFile::load(&path).expect("load"), file);
        std::fs::write(&path, br#"{"sites":{"a":{"latency":5}}}"#).expect("write");
        let e = FaultsFile::load(&path).expect_err("unknown field");
        assert!(format!("{e:#}").contains("not a faults file"), "{e:#}");
    }

    #[test]
    fn a_cut_matches_by_name_or_url() {
        let faults = Faults::new(PathBuf::new(), "a".into());
        *faults.current.write().expect("lock") = SiteFaults {
            cut_from: vec![Cut { site: "b".into(), url: "http://127.0.0.1:2".into() }],
            ..SiteFaults::default()
        };
        assert_eq!(faults.cut("b", "http://elsewhere"), Some("b".into()));
        assert_eq!(faults.cut("", "http://127.0.0.1:2"), Some("b".into()));
        assert_eq!(faults.cut("", "http://127.0.0.1:3"), None);
        assert_eq!(faults.cut("c", "http://127.0.0.1:3"), None);
    }
}
