//! The timers that drive a [`Node`] in a running site: a task per peer that pushes fresh writes
//! as they commit (after a short batching delay) and runs anti-entropy on an interval (at once
//! when the push path lost track), plus tombstone collection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use atoll_kv::Change;
use tokio::sync::broadcast::error::RecvError;

use crate::http::wall_ms;
use crate::node::{Node, Transport};
use crate::store::SyncStore;

/// How often things happen.
#[derive(Debug, Clone)]
pub struct Timing {
    /// How long a push waits to batch more writes.
    pub push_delay: Duration,
    /// Anti-entropy with each peer, at most this far apart (with jitter).
    pub anti_entropy: Duration,
    /// Wait after a failed exchange with a peer.
    pub retry: Duration,
    /// Tombstone collection interval.
    pub collect: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            push_delay: Duration::from_millis(2),
            anti_entropy: Duration::from_secs(5),
            retry: Duration::from_millis(500),
            collect: Duration::from_secs(30),
        }
    }
}

/// Runs replication until the returned future is dropped. `changes` is the store's change feed.
pub async fn run<S, T>(
    node: Arc<Node<S>>,
    transport: Arc<T>,
    mut changes: tokio::sync::broadcast::Receiver<Arc<Vec<Change>>>,
    timing: Timing,
) where
    S: SyncStore + 'static,
    T: Transport + 'static,
{
    let (kick, _) = tokio::sync::watch::channel(0u64);
    let kick = Arc::new(kick);
    {
        let (node, kick) = (node.clone(), kick.clone());
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(batch) => node.note_changes(&batch),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(
                            batches = n,
                            "replication fell behind the change feed; anti-entropy will catch up"
                        );
                        node.note_lost_changes();
                    }
                    Err(RecvError::Closed) => break,
                }
                kick.send_modify(|k| *k += 1);
            }
        });
    }
    {
        // Whether guests may use the store follows resyncs, confirmations and clock offsets.
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                node.update_gate(wall_ms());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    {
        let (node, every) = (node.clone(), timing.collect);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = node.collect(wall_ms()) {
                    tracing::error!("tombstone collection failed: {e:#}");
                }
            }
        });
    }
    // A peer's task ends when the peer stops being active (cut off, or found to be this site);
    // it is started again if the peer becomes active again (a cut-off site that resynced).
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        running.retain(|_, task| !task.is_finished());
        for url in node.active_peers() {
            if !running.contains_key(&url) {
                let (node, transport, kicks, timing) =
                    (node.clone(), transport.clone(), kick.subscribe(), timing.clone());
                running.insert(url.clone(), tokio::spawn(peer_loop(node, transport, url, kicks, timing)));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Pushes every queued write to every peer, within `limit`: what a site does when it stops, so
/// that writes acknowledged just before leave with it. Returns the keys still queued.
pub async fn flush<S: SyncStore, T: Transport>(node: &Node<S>, transport: &T, limit: Duration) -> usize {
    // Let the change feed task take in the last commits first (it runs on this runtime).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = tokio::time::timeout(limit, async {
        for url in node.peers_with_pushes() {
            while node.peers_with_pushes().contains(&url) {
                if node.push(transport, &url, wall_ms()).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    node.peers().iter().filter(|p| p.active()).map(|p| p.push_pending).sum()
}

async fn peer_loop<S: SyncStore, T: Transport>(
    node: Arc<Node<S>>,
    transport: Arc<T>,
    url: String,
    mut kicks: tokio::sync::watch::Receiver<u64>,
    timing: Timing,
) {
    let mut next_anti_entropy = tokio::time::Instant::now();
    loop {
        if !node.active_peers().contains(&url) {
            return;
        }
        let mut failed = false;
        while node.peers_with_pushes().contains(&url) {
            if node.push(&*transport, &url, wall_ms()).await.is_err() {
                failed = true;
                break;
            }
        }
        let now = tokio::time::Instant::now();
        // A failed push marks the peer for anti-entropy, which runs at once: the push path
        // failing never delays the repair.
        if now >= next_anti_entropy || node.needs_anti_entropy(&url) {
            failed = false;
            let started = std::time::Instant::now();
            let result = async {
                node.say_hello(&*transport, &url, wall_ms()).await?;
                node.anti_entropy(&*transport, &url, fastrand::u32(..), wall_ms()).await
            }
            .await;
            match result {
                Ok(rounds) => {
                    tracing::debug!(peer = %url, rounds, took = ?started.elapsed(), "anti-entropy done")
                }
                Err(_) => failed = true,
            }
            let jitter = timing.anti_entropy.mul_f64(fastrand::f64() * 0.2);
            next_anti_entropy = tokio::time::Instant::now() + timing.anti_entropy - jitter;
        }
        if failed {
            tokio::time::sleep(timing.retry).await;
            continue;
        }
        tokio::select! {
            changed = kicks.changed() => {
                if changed.is_err() { return; }
                tokio::time::sleep(timing.push_delay).await;
            }
            _ = tokio::time::sleep_until(next_anti_entropy) => {}
        }
    }
}
