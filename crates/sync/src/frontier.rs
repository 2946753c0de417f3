//! How far this site holds every other site's own writes: for each site name, a clock reading
//! such that every write that site made with a stamp at or before it is merged here. The site's
//! session tokens are checked against it (a client's token says how much of each site's writes
//! it may have seen; see ARCHITECTURE.md, "Sessions", and ALGORITHM.md, "Frontiers").
//!
//! A frontier moves only by what the site it is about says, in the message that makes it true:
//! a push that carries every write it had queued for this site since its last anti-entropy
//! session with it (`Request::PushCovered`), or the end of an anti-entropy session it led with
//! this site (an empty `PushCovered`). It never moves back while the process runs; it is cleared
//! when this site discards data (a resync, a new incarnation), and starts empty at each start
//! (it fills again within an anti-entropy period).

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Instant;

use atoll_kv::Hlc;

/// Every other site's frontier here.
#[derive(Debug, Default)]
pub struct Frontiers {
    map: RwLock<BTreeMap<String, Hlc>>,
    moved: tokio::sync::Notify,
}

impl Frontiers {
    /// The frontier of `site`'s writes here, if it has told this site one.
    pub fn get(&self, site: &str) -> Option<Hlc> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(site).copied()
    }

    /// Whether every write `site` made up to `at` is merged here.
    pub fn covers(&self, site: &str, at: Hlc) -> bool {
        self.get(site).is_some_and(|f| f >= at)
    }

    /// All of them.
    pub fn snapshot(&self) -> BTreeMap<String, Hlc> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn advance(&self, site: &str, to: Hlc) {
        {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            match map.get_mut(site) {
                Some(f) if *f >= to => return,
                Some(f) => *f = to,
                None => {
                    map.insert(site.to_owned(), to);
                }
            }
        }
        self.moved.notify_waiters();
    }

    pub(crate) fn clear(&self) {
        self.map.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Waits until `done` holds (checked now and whenever a frontier moves) or `until` passes;
    /// whether it holds.
    pub async fn wait_until(&self, until: Instant, done: impl Fn(&Frontiers) -> bool) -> bool {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            // Registered before the check: a move between the check and the wait wakes it.
            moved.as_mut().enable();
            if done(self) {
                return true;
            }
            if tokio::time::timeout_at(until.into(), moved).await.is_err() {
                return done(self);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn at(ms: u64) -> Hlc {
        Hlc { physical_ms: ms, logical: 0 }
    }

    #[test]
    fn a_frontier_only_moves_forward() {
        let f = Frontiers::default();
        assert!(!f.covers("a", at(1)));
        f.advance("a", at(10));
        f.advance("a", at(5));
        assert_eq!(f.get("a"), Some(at(10)));
        assert!(f.covers("a", at(10)) && !f.covers("a", at(11)));
        f.clear();
        assert_eq!(f.get("a"), None);
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_frontier_it_needs_arrives_and_gives_up_at_its_deadline() {
        let f = Arc::new(Frontiers::default());
        let later = f.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            later.advance("a", at(5));
            tokio::time::sleep(Duration::from_millis(20)).await;
            later.advance("a", at(10));
        });
        let start = Instant::now();
        assert!(f.wait_until(start + Duration::from_secs(5), |f| f.covers("a", at(10))).await);
        assert!(start.elapsed() < Duration::from_secs(5));
        let start = Instant::now();
        assert!(!f.wait_until(start + Duration::from_millis(50), |f| f.covers("a", at(11))).await);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
