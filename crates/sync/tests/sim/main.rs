//! Deterministic simulation of replication: 3–7 sites in one process, each with a real atoll-kv
//! store in a real redb file and a real [`Node`], talking over a simulated network that loses,
//! delays, duplicates and partitions messages. The faults are the ones operators meet: a crash
//! reopens the store from its file (everything the node held in memory is gone); a restore
//! replaces the file with an older copy of itself; a new site joins with an empty disk; a site
//! comes back at a new address; clocks jump forward and back, one beyond the bound for a while.
//! The workload mixes set, delete, increment and compare-and-swap on shared keys, with values up
//! to the size limit. Then the network heals, the sites sync until quiet, and the checkers run
//! (see ALGORITHM.md, "Invariants"); one of them also runs at every step.
//!
//! Every run is seeded. `ATOLL_SIM_SEEDS=N` runs seeds 0..N (default 400); `ATOLL_SIM_SEED=S`
//! replays one seed; `cargo xtask sim --seeds 10000` is the long run. A failure prints its seed.
#![allow(clippy::unwrap_used)] // a poisoned lock is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use atoll_kv::{Clock, Namespace, Register, Stamp, Store, StoreConfig, Write, Written};
use atoll_sync::message::{PeerInfo, Reply, Request};
use atoll_sync::node::Exchange;
use atoll_sync::{Node, NodeConfig, Transport};
use tracing::Instrument;

const MAX_AGE_MS: u64 = 2_000;
/// Most sites a simulation grows to (new sites join during the run).
const MAX_SITES: usize = 7;

struct Site {
    store: Store,
    node: Arc<Node<Store>>,
    feed: tokio::sync::broadcast::Receiver<Arc<Vec<atoll_kv::Change>>>,
    /// The store's file (in its own temporary directory).
    path: PathBuf,
    _dir: Arc<tempfile::TempDir>,
    /// This site's wall clock minus true time (ms); changed by clock jumps.
    skew: Arc<AtomicI64>,
    /// The skew it started with (healing puts it back).
    base_skew: i64,
    /// Its address generation: a site restarted elsewhere advertises `site-i.gen`.
    generation: usize,
    /// An older copy of its store file, and the step it was taken at.
    snapshot: Option<(PathBuf, usize)>,
}

struct Net {
    now: Arc<AtomicU64>,
    sites: Mutex<Vec<Option<Arc<Node<Store>>>>>,
    /// Each site's clock skew (ms), as its node sees the time.
    skews: Mutex<Vec<Arc<AtomicI64>>>,
    rng: Mutex<fastrand::Rng>,
    /// Pairs (a, b), a < b, that cannot talk.
    cut: Mutex<BTreeSet<(usize, usize)>>,
    /// Copies of requests to deliver again later: (at, sent at, to, request).
    delayed: Mutex<Vec<(u64, u64, usize, Request)>>,
    lossy: std::sync::atomic::AtomicBool,
    /// A hostile peer holding the secret: calls to this site get this answer instead of its own.
    forged: Mutex<Option<(usize, Reply)>>,
}

fn url(i: usize) -> String {
    format!("sim://site-{i}")
}

fn url_at(i: usize, generation: usize) -> String {
    if generation == 0 { url(i) } else { format!("sim://site-{i}.{generation}") }
}

impl Net {
    /// The site an URL reaches (every generation of a site's address reaches it).
    fn index(url: &str) -> usize {
        let tail = url.rsplit('-').next().unwrap_or_default();
        tail.split('.').next().and_then(|n| n.parse().ok()).unwrap_or(usize::MAX)
    }

    fn chance(&self, p: f64) -> bool {
        self.lossy.load(Ordering::Relaxed) && self.rng.lock().unwrap().f64() < p
    }

    fn node(&self, i: usize) -> Option<Arc<Node<Store>>> {
        self.sites.lock().unwrap().get(i).cloned().flatten()
    }

    /// Site `i`'s wall clock.
    fn wall(&self, i: usize) -> u64 {
        let skew = self.skews.lock().unwrap().get(i).map_or(0, |s| s.load(Ordering::Relaxed));
        self.now.load(Ordering::Relaxed).saturating_add_signed(skew)
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        !self.cut.lock().unwrap().contains(&(a.min(b), a.max(b)))
    }

    async fn deliver_delayed(&self) {
        let now = self.now.load(Ordering::Relaxed);
        let due: Vec<_> = {
            let mut delayed = self.delayed.lock().unwrap();
            let (due, later) = delayed.drain(..).partition(|d| d.0 <= now);
            *delayed = later;
            due
        };
        for (_, sent, to, request) in due {
            // The receiver's signature window: an old message is refused unread.
            if now - sent > MAX_AGE_MS {
                continue;
            }
            if let Some(node) = self.node(to) {
                let _ = node.handle(request, self.wall(to)).await;
            }
        }
    }
}

struct Link {
    net: Arc<Net>,
    from: usize,
}

impl Transport for Link {
    async fn call(&self, url: &str, _to: &str, request: Request) -> Result<Exchange> {
        let to = Net::index(url);
        let net = &self.net;
        let Some(node) = net.node(to) else { bail!("{url} is down") };
        if net.node(self.from).is_none() || !net.reachable(self.from, to) {
            bail!("{url} unreachable");
        }
        if net.chance(0.1) {
            bail!("request lost");
        }
        let now = net.now.load(Ordering::Relaxed);
        if net.chance(0.1) {
            let delay = net.rng.lock().unwrap().u64(1..3_000);
            net.delayed.lock().unwrap().push((now + delay, now, to, request.clone()));
        }
        // The receiver refuses an oversized message unread, as the HTTP endpoint does (400).
        let sent_bytes = atoll_sync::message::encode(&request).len();
        if sent_bytes > atoll_sync::message::MAX_MESSAGE {
            bail!("{url} refused a message of {sent_bytes} bytes");
        }
        let forged = net.forged.lock().unwrap().clone().filter(|(at, _)| *at == to);
        let reply = match forged {
            Some((_, reply)) => reply,
            None => node.handle(request, net.wall(to)).instrument(tracing::info_span!("at", to)).await?,
        };
        if net.chance(0.1) {
            bail!("reply lost");
        }
        let received_bytes = atoll_sync::message::encode(&reply).len();
        if received_bytes > atoll_sync::message::MAX_MESSAGE {
            bail!("an answer of {received_bytes} bytes from {url} was refused");
        }
        Ok(Exchange {
            reply,
            sent_bytes,
            received_bytes,
            sent_payload: sent_bytes,
            received_payload: received_bytes,
        })
    }
}

fn node_config() -> NodeConfig {
    NodeConfig {
        horizon_ms: u64::MAX / 4,
        max_message_age_ms: MAX_AGE_MS,
        push_queue: 50,
        push_batch: 20,
        push_bytes: 64 << 10,
        budget: atoll_sync::reconcile::Budget { entry_bytes: 4096, fingerprints: 200 },
        replace_after_ms: 5_000,
        confirm_timeout_ms: 3_000,
        ..NodeConfig::default()
    }
}

/// Where simulated stores live: memory-backed when the machine has /dev/shm (the files are real
/// redb files all the same, reopened after every crash).
fn store_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("temp dir")
    } else {
        tempfile::tempdir().expect("temp dir")
    }
}

/// What the checkers expect.
#[derive(Default)]
struct Model {
    /// Keys set exactly once (acknowledged): their unique value, and where and when it was set.
    once: BTreeMap<String, (String, usize, usize)>,
    /// Keys deleted (acknowledged) after their only set: where and when.
    deleted: BTreeMap<String, (usize, usize)>,
    /// Counter keys (only ever incremented): each acknowledged increment (site, step, delta).
    counters: BTreeMap<String, Vec<(usize, usize, i64)>>,
    /// Writes a restore may have undone (made at the restored site after its copy was taken,
    /// and perhaps never replicated): (site, first step, last step).
    at_risk: Vec<(usize, usize, usize)>,
    /// Every (key, stamp) seen anywhere, with the register it stamped: a stamp is never reused.
    stamps: BTreeMap<(Vec<u8>, Stamp), Register>,
    /// The stamp of each acknowledged set of `once` (what a frontier must cover).
    once_stamps: BTreeMap<String, atoll_kv::Hlc>,
    /// The stamp of every counter contribution made: (key, the register's stamp, writer, up,
    /// down) → the increment that made it (what a store's seen vector must cover).
    contributions: BTreeMap<(String, Stamp, String, u64, u64), atoll_kv::Hlc>,
}

impl Model {
    fn risky(&self, site: usize, step: usize) -> bool {
        self.at_risk.iter().any(|&(s, from, to)| s == site && (from..=to).contains(&step))
    }
}

struct Sim {
    rng: fastrand::Rng,
    net: Arc<Net>,
    sites: Vec<Site>,
    model: Model,
    n: usize,
    config: NodeConfig,
    /// Tombstones collected, over all sites.
    collected: usize,
    /// Steps taken (unique key and value names).
    step: usize,
    /// The first invariant broken during the chaos, if any.
    failure: Option<anyhow::Error>,
    /// (site, key): the site has held the tombstone of a deleted key; it must never read a value
    /// for it again, not even for a while.
    saw_delete: BTreeSet<(usize, String)>,
    /// Faults injected, for the summary.
    faults: BTreeMap<&'static str, usize>,
    /// Restored sites not yet told by a peer that they run on an older copy: (step the copy was
    /// taken at, incarnation at the restore). Their writes stay at risk until they reincarnate
    /// (or the next heal, when every peer can tell them): a restored site that no peer can
    /// recognise for longer than the confirmation timeout writes on its old identity.
    restored: BTreeMap<usize, (usize, u64)>,
    /// A site was restored since the last heal.
    restored_since_heal: bool,
    /// How many sites the simulation started with.
    initial: usize,
    /// What `ATOLL_SIM_WATCH` last showed, by site.
    watched: BTreeMap<usize, String>,
    /// The stores' fold and flush thresholds: small (from the seed), so that folding the index
    /// journal and writing stale digests happen between crashes and restores.
    derived: (usize, usize),
}

impl Sim {
    fn new(seed: u64, config: NodeConfig) -> Sim {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = rng.usize(3..=5);
        let derived = (1 + (seed % 29) as usize, 1 + (seed / 29 % 17) as usize);
        let now = Arc::new(AtomicU64::new(1_000_000));
        let net = Arc::new(Net {
            now: now.clone(),
            sites: Mutex::new(Vec::new()),
            skews: Mutex::new(Vec::new()),
            rng: Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5eed)),
            cut: Mutex::new(BTreeSet::new()),
            delayed: Mutex::new(Vec::new()),
            lossy: std::sync::atomic::AtomicBool::new(true),
            forged: Mutex::new(None),
        });
        let mut sim = Sim {
            rng,
            net,
            sites: Vec::new(),
            model: Model::default(),
            n: 0,
            config,
            collected: 0,
            step: 0,
            saw_delete: BTreeSet::new(),
            failure: None,
            faults: BTreeMap::new(),
            restored: BTreeMap::new(),
            restored_since_heal: false,
            initial: n,
            watched: BTreeMap::new(),
            derived,
        };
        for _ in 0..n {
            sim.add_site();
        }
        sim
    }

    /// A new site with an empty disk, peered with every site so far.
    fn add_site(&mut self) -> usize {
        let i = self.n;
        // Each site's wall clock is skewed by up to ±200 ms (pairs stay within the 500 ms bound).
        let base_skew = self.rng.i64(-200..=200);
        let skew = Arc::new(AtomicI64::new(base_skew));
        self.net.skews.lock().unwrap().push(skew.clone());
        let dir = Arc::new(store_dir());
        let path = dir.path().join("kv.redb");
        let store = self.open_store(i, &path, &skew);
        let node = self.start_node(&store, i, 0);
        self.net.sites.lock().unwrap().push(Some(node.clone()));
        let feed = store.changes();
        self.sites.push(Site {
            store,
            node,
            feed,
            path,
            _dir: dir,
            skew,
            base_skew,
            generation: 0,
            snapshot: None,
        });
        self.n += 1;
        i
    }

    fn open_store(&self, i: usize, path: &std::path::Path, skew: &Arc<AtomicI64>) -> Store {
        let (time, skew) = (self.net.now.clone(), skew.clone());
        let clock = Clock::with_source(Box::new(move || {
            time.load(Ordering::Relaxed).saturating_add_signed(skew.load(Ordering::Relaxed))
        }));
        let (fold_at, flush_at) = self.derived;
        // Dropped stores are dead processes here: nothing is written at close.
        let config =
            StoreConfig { fold_at, flush_at, flush_at_close: false, ..StoreConfig::new(format!("s{i}")) };
        Store::open(path, config, clock).expect("store")
    }

    fn start_node(&self, store: &Store, i: usize, generation: usize) -> Arc<Node<Store>> {
        let me = PeerInfo { site: format!("s{i}"), region: "sim".into(), url: url_at(i, generation) };
        // Every site is configured with every other site's address, as `atoll dev` and the
        // Kubernetes manifests do (a new site knows the ones before it; they learn of it by hello).
        let seeds: Vec<String> = (0..self.initial.max(i + 1)).chain(0..self.n).map(url).collect();
        Arc::new(Node::new(store.clone(), me, self.config.clone(), &seeds, self.net.wall(i)).expect("node"))
    }

    fn now(&self) -> u64 {
        self.net.now.load(Ordering::Relaxed)
    }

    /// Site `i`'s wall clock (what its node is told the time is).
    fn wall(&self, i: usize) -> u64 {
        self.net.wall(i)
    }

    fn up(&self, i: usize) -> bool {
        self.net.node(i).is_some()
    }

    fn link(&self, i: usize) -> Link {
        Link { net: self.net.clone(), from: i }
    }

    fn fault(&mut self, what: &'static str) {
        tracing::info!(step = self.step, "fault: {what}");
        *self.faults.entry(what).or_default() += 1;
    }

    /// Hands each site's committed changes to its node, as the driver's feed task does, and
    /// recomputes whether guests may write there.
    fn drain_feeds(&mut self) {
        for i in 0..self.n {
            let site = &mut self.sites[i];
            // As the driver does: a feed that lost batches sends every peer to anti-entropy.
            loop {
                match site.feed.try_recv() {
                    Ok(batch) => site.node.note_changes(&batch),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                        site.node.note_lost_changes()
                    }
                    Err(_) => break,
                }
            }
            if self.net.node(i).is_some() {
                site.node.update_gate(self.net.wall(i));
            }
        }
    }

    /// A value: mostly short, sometimes near the size limit.
    fn value(&mut self, tag: String) -> String {
        if self.rng.u8(..100) == 0 {
            let pad = self.rng.usize((256 << 10)..(1 << 20) - 1024);
            format!("{tag}:{}", "x".repeat(pad))
        } else {
            tag
        }
    }

    async fn write(&mut self, step: usize) {
        let i = self.rng.usize(..self.n);
        if !self.up(i) {
            return;
        }
        let store = self.sites[i].store.clone();
        // Guests go through the gate (the runtime checks it before every write).
        if store.write_gate().is_err() {
            return;
        }
        let ns = Namespace::new("app", "b", store.bounds()).expect("ns");
        match self.rng.u8(..12) {
            0..=3 => {
                let key = format!("once-{step}");
                let value = self.value(format!("v-{step}-s{i}"));
                if store.write(&ns, key.as_bytes(), Write::Set(value.clone().into_bytes())).await
                    == Ok(Written::Done)
                {
                    if let Ok(entries) = store.entries_at(&[ns.key(key.as_bytes())])
                        && let Some((_, entry)) = entries.first()
                    {
                        self.model.once_stamps.insert(key.clone(), entry.stamp.hlc);
                    }
                    self.model.once.insert(key, (value, i, step));
                }
            }
            4 => {
                let candidates: Vec<String> = self
                    .model
                    .once
                    .keys()
                    .filter(|k| !self.model.deleted.contains_key(*k))
                    .cloned()
                    .collect();
                if !candidates.is_empty() {
                    let key = candidates[self.rng.usize(..candidates.len())].clone();
                    // Only a delete that saw the set follows it; a delete concurrent with the set
                    // is ordered by the clocks, and may lose, by design.
                    if store.get(&ns, key.as_bytes()).ok().flatten().is_none() {
                        return;
                    }
                    if store.write(&ns, key.as_bytes(), Write::Delete).await == Ok(Written::Done) {
                        tracing::info!(site = i, step, key, "deleted");
                        self.model.deleted.insert(key, (i, step));
                    }
                }
            }
            5..=7 => {
                let key = format!("counter-{}", self.rng.u8(..4));
                let delta = self.rng.i64(-5..=20);
                if let Ok(Written::Total(t)) = store.write(&ns, key.as_bytes(), Write::Increment(delta)).await
                {
                    self.note_contribution(i, &key);
                    tracing::info!(step, site = i, key, delta, total = t, "incremented");
                    self.model.counters.entry(key).or_default().push((i, step, delta));
                }
            }
            8..=9 => {
                // Contested keys: concurrent sets, deletes and increments at different sites;
                // only convergence (and unique stamps) are checked.
                let key = format!("contested-{}", self.rng.u8(..3));
                let write = match self.rng.u8(..4) {
                    0 => Write::Delete,
                    1 => Write::Increment(self.rng.i64(1..5)),
                    _ => Write::Set(format!("{}", self.rng.u32(..1000)).into_bytes()),
                };
                let increment = matches!(write, Write::Increment(_));
                if let Ok(Written::Total(_)) = store.write(&ns, key.as_bytes(), write).await
                    && increment
                {
                    self.note_contribution(i, &key);
                }
            }
            _ => {
                // Compare-and-swap on the contested keys: atomic at this site only.
                let key = format!("contested-{}", self.rng.u8(..3));
                let expected = store.get(&ns, key.as_bytes()).ok().flatten();
                let new = format!("cas-{step}").into_bytes();
                let _ = store.write(&ns, key.as_bytes(), Write::CompareAndSwap { expected, new }).await;
            }
        }
        self.drain_feeds();
    }

    async fn push(&self, i: usize) {
        let node = &self.sites[i].node;
        for url in node.peers_with_pushes() {
            let _ =
                node.push(&self.link(i), &url, self.wall(i)).instrument(tracing::info_span!("s", i)).await;
        }
    }

    async fn anti_entropy(&mut self, i: usize) {
        let node = self.sites[i].node.clone();
        let peers = node.active_peers();
        if peers.is_empty() {
            return;
        }
        let url = peers[self.rng.usize(..peers.len())].clone();
        let salt = self.rng.u32(..);
        let _ = self.session(i, &url, salt).await;
        self.drain_feeds();
    }

    /// Site `i` says hello to `url` and, if that is accepted, runs an anti-entropy session.
    async fn session(&self, i: usize, url: &str, salt: u32) -> Result<usize> {
        let node = self.sites[i].node.clone();
        let link = self.link(i);
        let span = tracing::info_span!("s", i);
        node.say_hello(&link, url, self.wall(i)).instrument(span.clone()).await?;
        node.anti_entropy(&link, url, salt, self.wall(i)).instrument(span).await
    }

    /// The site goes down: its node and everything it held in memory are gone.
    fn crash(&mut self, i: usize) {
        self.net.sites.lock().unwrap()[i] = None;
    }

    /// Closes site `i`'s store, as a dead process would have: its node and store are replaced
    /// by placeholders (the store's writer thread ends), so the file can be opened again.
    fn close(&mut self, i: usize) {
        self.net.sites.lock().unwrap()[i] = None;
        let placeholder = Store::open_with_backend(
            redb::backends::InMemoryBackend::new(),
            StoreConfig::new("placeholder"),
            Clock::with_source(Box::new(|| 0)),
        )
        .expect("placeholder store");
        self.sites[i].node = Arc::new(
            Node::new(
                placeholder.clone(),
                PeerInfo { site: "placeholder".into(), region: String::new(), url: String::new() },
                self.config.clone(),
                &[],
                0,
            )
            .expect("placeholder node"),
        );
        self.sites[i].store = placeholder;
    }

    /// Starts site `i` again from its store file, at address generation `generation`.
    fn restart_at(&mut self, i: usize, generation: usize) {
        self.close(i);
        let store = self.open_store(i, &self.sites[i].path.clone(), &self.sites[i].skew.clone());
        let node = self.start_node(&store, i, generation);
        self.sites[i].feed = store.changes();
        self.sites[i].store = store;
        self.sites[i].node = node.clone();
        self.sites[i].generation = generation;
        self.net.sites.lock().unwrap()[i] = Some(node);
    }

    fn restart(&mut self, i: usize) {
        let generation = self.sites[i].generation;
        self.restart_at(i, generation);
    }

    /// Copies site `i`'s store file (it is consistent between steps: nothing is being written).
    fn snapshot(&mut self, i: usize) {
        tracing::info!(site = i, step = self.step, "copied");
        let copy = self.sites[i].path.with_extension(format!("copy-{}", self.step));
        std::fs::copy(&self.sites[i].path, &copy).expect("copy the store");
        if let Some((old, _)) = self.sites[i].snapshot.replace((copy, self.step)) {
            let _ = std::fs::remove_file(old);
        }
    }

    /// Site `i` is restored from its older copy: what it acknowledged since may be gone.
    fn restore(&mut self, i: usize) {
        let Some((copy, taken)) = self.sites[i].snapshot.take() else { return };
        self.close(i);
        std::fs::rename(&copy, &self.sites[i].path).expect("restore the copy");
        self.restart_at(i, self.sites[i].generation);
        self.close_risk(i);
        self.restored.insert(i, (taken, self.sites[i].store.identity().incarnation));
        self.restored_since_heal = true;
        // The restored site may legitimately read values its lost tombstones had deleted.
        self.saw_delete.retain(|(site, _)| *site != i);
        let id = self.sites[i].store.identity();
        tracing::info!(site = i, taken, boot = id.boot, opened_at = %id.opened_at, "restored");
        self.fault("restores");
    }

    /// Whether a restore may have undone the write site `site` acknowledged at `step`: in a
    /// closed window, or after the copy of a restored site still on its old incarnation.
    fn at_risk(&self, site: usize, step: usize) -> bool {
        self.model.risky(site, step) || self.restored.get(&site).is_some_and(|&(taken, _)| step > taken)
    }

    /// Ends the window of writes a restore of site `i` may undo.
    fn close_risk(&mut self, i: usize) {
        if let Some((taken, _)) = self.restored.remove(&i) {
            self.model.at_risk.push((i, taken + 1, self.step));
        }
    }

    /// Restored sites that took a new incarnation: their later writes are safe.
    fn note_reincarnations(&mut self) {
        let done: Vec<usize> = self
            .restored
            .iter()
            .filter(|(i, (_, inc))| self.sites[**i].store.identity().incarnation != *inc)
            .map(|(i, _)| *i)
            .collect();
        for i in done {
            self.close_risk(i);
        }
    }

    fn ns(&self) -> Namespace {
        Namespace::new("app", "b", &atoll_kv::Bounds::default()).expect("ns")
    }

    async fn chaos(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step += 1;
            let step = self.step;
            let dt = self.rng.u64(1..60);
            self.net.now.fetch_add(dt, Ordering::Relaxed);
            self.net.deliver_delayed().await;
            let i = self.rng.usize(..self.n);
            let up = self.up(i);
            match self.rng.u16(..1000) {
                0..=439 => self.write(step).await,
                440..=639 if up => self.push(i).await,
                640..=789 if up => self.anti_entropy(i).await,
                790..=839 if up => {
                    self.collected += self.sites[i].node.collect(self.wall(i)).unwrap_or(0);
                }
                840..=889 | 940..=969 => {
                    let j = self.rng.usize(..self.n);
                    if i != j {
                        let mut cut = self.net.cut.lock().unwrap();
                        let pair = (i.min(j), i.max(j));
                        if !cut.remove(&pair) {
                            cut.insert(pair);
                        }
                    }
                }
                // Crash: the site goes down; its node's volatile state is gone.
                890..=919 if up => {
                    self.crash(i);
                    self.fault("crashes");
                }
                890..=919 => self.restart(i),
                920..=929 if up => {
                    self.restart(i);
                    self.fault("restarts");
                }
                930..=934 if up => self.snapshot(i),
                // One restore between heals (ALGORITHM.md, "Fault model"): a restored site's own
                // knowledge of its peers is as old as its copy, so it may take a second restored
                // site's old data for current before the others tell it otherwise.
                935..=937 if self.sites[i].snapshot.is_some() && !self.restored_since_heal => self.restore(i),
                938 if self.n < MAX_SITES => {
                    self.add_site();
                    self.fault("sites added");
                }
                939 if up => {
                    let generation = self.sites[i].generation + 1;
                    self.restart_at(i, generation);
                    self.fault("address changes");
                }
                970..=989 => {
                    // A clock jumps forward or back, mostly within the bound, sometimes past it.
                    let jump = if self.rng.u8(..5) == 0 {
                        self.rng.i64(600..3_000)
                    } else {
                        self.rng.i64(-200..=200)
                    };
                    let jump = if self.rng.bool() { jump } else { -jump };
                    let base = self.sites[i].base_skew;
                    self.sites[i].skew.store(base.saturating_add(jump), Ordering::Relaxed);
                    self.fault("clock jumps");
                }
                990..=999 => {
                    let base = self.sites[i].base_skew;
                    self.sites[i].skew.store(base, Ordering::Relaxed);
                }
                _ => {}
            }
            self.note_reincarnations();
            self.watch();
            if let Err(e) = self
                .no_deleted_key_comes_back()
                .and_then(|()| self.frontiers_hold())
                .and_then(|()| self.seen_covers_what_is_held())
            {
                self.failure.get_or_insert(e);
            }
        }
    }

    /// Every site's frontier for another is kept: each acknowledged set that site made with a
    /// stamp at or before it is here (what session tokens rely on). Sets a restore may have
    /// undone, and keys deleted since, are not checked.
    fn frontiers_hold(&self) -> Result<()> {
        let ns = self.ns();
        for b in (0..self.n).filter(|&b| self.up(b)) {
            let frontiers = self.sites[b].node.frontiers().snapshot();
            if frontiers.is_empty() {
                continue;
            }
            for (key, (value, site, step)) in &self.model.once {
                let (Some(stamp), Some(frontier)) =
                    (self.model.once_stamps.get(key), frontiers.get(&format!("s{site}")))
                else {
                    continue;
                };
                if *site == b
                    || stamp > frontier
                    || self.model.deleted.contains_key(key)
                    || self.at_risk(*site, *step)
                {
                    continue;
                }
                let got = self.sites[b].store.get(&ns, key.as_bytes())?;
                if got.as_deref() != Some(value.as_bytes()) {
                    bail!(
                        "site s{b}: its frontier for s{site} is {frontier}, but {key} set there at {stamp} is {:?} here",
                        show(got.as_deref())
                    );
                }
            }
        }
        Ok(())
    }

    /// Records the contribution an increment at site `i` just made to `key` (its stamp is the
    /// entry's `changed` there, right after it).
    fn note_contribution(&mut self, i: usize, key: &str) {
        let ns = self.ns();
        if let Ok(Some((_, entry))) =
            self.sites[i].store.entries_at(&[ns.key(key.as_bytes())]).map(|mut e| e.pop())
            && let Some(c) = entry.counter.get(&entry.changed.site)
        {
            let id = (key.to_owned(), entry.stamp.clone(), entry.changed.site.clone(), c.up, c.down);
            self.model.contributions.entry(id).or_insert(entry.changed.hlc);
        }
    }

    /// Every store's seen vector covers what it holds (what session tokens are built from): a
    /// register's stamp, and the increment that made each counter contribution it holds.
    fn seen_covers_what_is_held(&self) -> Result<()> {
        let ns = self.ns();
        for b in 0..self.n {
            let store = &self.sites[b].store;
            let seen = store.seen();
            let at = |writer: &str| {
                let name = writer.split_once('~').map_or(writer, |(n, _)| n);
                seen.iter().find(|(n, _)| n == name).map(|(_, h)| *h)
            };
            for (key, register, writer, up, down) in self.model.contributions.keys() {
                let Some((_, entry)) = store.entries_at(&[ns.key(key.as_bytes())])?.pop() else { continue };
                let held = entry.counter.get(writer);
                if entry.stamp != *register || held.map(|c| (c.up, c.down)) != Some((*up, *down)) {
                    continue;
                }
                let made =
                    self.model.contributions[&(key.clone(), register.clone(), writer.clone(), *up, *down)];
                if at(writer).is_none_or(|seen| seen < made) {
                    bail!(
                        "site s{b}: holds {writer}'s contribution ({up}, {down}) to {key}, made at {made}, but its seen \
                         vector says {:?} for that site (step {})",
                        at(writer),
                        self.step
                    );
                }
            }
        }
        Ok(())
    }

    /// `ATOLL_SIM_WATCH=key` logs every change of that key's entry at every site.
    fn watch(&mut self) {
        let Ok(key) = std::env::var("ATOLL_SIM_WATCH") else { return };
        let composite = self.ns().key(key.as_bytes());
        for i in 0..self.n {
            let entry = self.sites[i]
                .store
                .entries_at(std::slice::from_ref(&composite))
                .ok()
                .and_then(|mut e| e.pop());
            let shown = format!("{:?}", entry.map(|(_, e)| (e.is_tombstone(), e.stamp)));
            if self.watched.get(&i) != Some(&shown) {
                tracing::info!(step = self.step, site = i, key, "watch: {shown}");
                self.watched.insert(i, shown);
            }
        }
    }

    /// Checks, at every step, that no site that has held a deleted key's tombstone reads a value
    /// for that key again.
    fn no_deleted_key_comes_back(&mut self) -> Result<()> {
        let ns = self.ns();
        for i in 0..self.n {
            let store = &self.sites[i].store;
            for key in self.model.deleted.keys() {
                let composite = ns.key(key.as_bytes());
                let entry = store.entries_at(&[composite])?.pop().map(|(_, e)| e);
                match entry {
                    Some(e) if e.register == atoll_kv::Register::Tombstone => {
                        self.saw_delete.insert((i, key.clone()));
                    }
                    Some(e) if self.saw_delete.contains(&(i, key.clone())) => {
                        bail!(
                            "site s{i}: deleted key {key} came back as {:?} at step {}",
                            e.read(),
                            self.step
                        )
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Heals everything (network, clocks, down sites) and syncs until every site holds the same
    /// state and no tombstone is left anywhere.
    async fn heal(&mut self) -> Result<()> {
        self.net.lossy.store(false, Ordering::Relaxed);
        self.net.cut.lock().unwrap().clear();
        for i in 0..self.n {
            self.sites[i].skew.store(self.sites[i].base_skew, Ordering::Relaxed);
            if !self.up(i) {
                self.restart(i);
            }
        }
        // Half-second steps: acknowledgements mature (and tombstones are collected) while delayed
        // copies of old messages are still arriving.
        for iteration in 0..80 {
            self.net.now.fetch_add(500, Ordering::Relaxed);
            self.net.deliver_delayed().await;
            for i in 0..self.n {
                self.push(i).await;
                let node = self.sites[i].node.clone();
                for url in node.active_peers() {
                    // A refusal (a clock still ahead, a site told to resync) is retried next time.
                    let salt = self.rng.u32(..);
                    let _ = self.session(i, &url, salt).await;
                }
                self.collected += node.collect(self.wall(i))?;
                self.drain_feeds();
                self.watch();
                self.no_deleted_key_comes_back()?;
            }
            self.note_reincarnations();
            if iteration >= 8 && self.converged()? && self.tombstones()? == 0 {
                for i in 0..self.n {
                    self.close_risk(i);
                }
                self.restored_since_heal = false;
                self.net.lossy.store(true, Ordering::Relaxed);
                return Ok(());
            }
        }
        if self.converged()? {
            let mut left = Vec::new();
            for (i, site) in self.sites.iter().enumerate() {
                for (k, e) in site.store.entries()?.into_iter().filter(|(_, e)| e.is_tombstone()) {
                    left.push(format!("s{i}: {} @ {:?}", String::from_utf8_lossy(&k[6..]), e.stamp));
                }
                let peers: Vec<_> = site
                    .node
                    .peers()
                    .into_iter()
                    .map(|p| (p.url, p.site, p.cut_off, p.must_reincarnate, p.flag, p.last_error))
                    .collect();
                left.push(format!("s{i} collected {} peers {peers:?}", site.node.collected()));
            }
            bail!(
                "sites converged but {} tombstones were never collected (now {}):\n{}",
                self.tombstones()?,
                self.now(),
                left.join("\n")
            );
        }
        bail!("sites did not converge after healing")
    }

    /// Tombstones (deleted keys without increments) held, over all sites.
    fn tombstones(&self) -> Result<usize> {
        let mut n = 0;
        for site in &self.sites {
            n += site.store.entries()?.iter().filter(|(_, e)| e.is_tombstone()).count();
        }
        Ok(n)
    }

    /// The live state of a site: key → value (tombstones are absent keys).
    fn view(&self, i: usize) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        Ok(self.sites[i]
            .store
            .entries()?
            .into_iter()
            .filter_map(|(k, e)| e.read().into_bytes().map(|v| (k, v)))
            .collect())
    }

    fn converged(&self) -> Result<bool> {
        let first = self.view(0)?;
        for i in 1..self.n {
            if self.view(i)? != first {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn check(&mut self) -> Result<()> {
        let ns = Namespace::new("app", "b", &atoll_kv::Bounds::default())?;
        for i in 0..self.n {
            let store = &self.sites[i].store;
            for (key, (value, site, step)) in &self.model.once {
                let got = store.get(&ns, key.as_bytes())?;
                let set_at_risk = self.model.risky(*site, *step);
                match self.model.deleted.get(key) {
                    Some(&(dsite, dstep)) => {
                        // A restore may have undone the delete (then the value may be back, if
                        // the set itself survived) but nothing else may bring it back.
                        let undone = self.model.risky(dsite, dstep);
                        if got.is_some() && !(undone && got.as_deref() == Some(value.as_bytes())) {
                            bail!("site s{i}: deleted key {key} resurrected as {:?}", show(got.as_deref()));
                        }
                    }
                    None => {
                        if got.as_deref() != Some(value.as_bytes()) && !(set_at_risk && got.is_none()) {
                            bail!(
                                "site s{i}: acknowledged {key}={} lost (found {:?})",
                                short(value),
                                show(got.as_deref())
                            );
                        }
                    }
                }
            }
            for (key, increments) in &self.model.counters {
                // Exact, but for increments a restore may have undone.
                let (mut low, mut high) = (0i64, 0i64);
                for &(site, step, delta) in increments {
                    if self.model.risky(site, step) {
                        if delta < 0 {
                            low += delta;
                        } else {
                            high += delta;
                        }
                    } else {
                        low += delta;
                        high += delta;
                    }
                }
                let got = store.get(&ns, key.as_bytes())?;
                // A counter whose every increment a restore undid may be absent: it counts as 0.
                let total: Option<i64> = match got.as_deref() {
                    None => Some(0),
                    Some(v) => std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()),
                };
                if !total.is_some_and(|t| (low..=high).contains(&t)) {
                    let entry = store.entries_at(&[ns.key(key.as_bytes())])?;
                    eprintln!("entry: {entry:?}\nincrements: {increments:?}\nfaults: {:?}", self.faults);
                    bail!(
                        "site s{i}: counter {key} is {:?}, acknowledged increments allow {low}..={high}",
                        show(got.as_deref())
                    );
                }
            }
            // The digests and the index say what the entries say.
            store.check().map_err(|e| anyhow::anyhow!("site s{i}: {e}"))?;
            // No stamp is ever used for two different writes of a key.
            for (key, entry) in store.entries()? {
                match self.model.stamps.entry((key, entry.stamp.clone())) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(entry.register.clone());
                    }
                    std::collections::btree_map::Entry::Occupied(o) => {
                        if *o.get() != entry.register && entry.stamp != Stamp::zero() {
                            bail!(
                                "site s{i}: stamp {:?} was used for two different writes of one key",
                                entry.stamp
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn show(v: Option<&[u8]>) -> Option<String> {
    v.map(|v| short(&String::from_utf8_lossy(v)))
}

fn short(v: &str) -> String {
    if v.len() > 40 { format!("{}… ({} bytes)", &v[..40], v.len()) } else { v.to_owned() }
}

async fn run_seed(seed: u64) -> Result<(usize, BTreeMap<&'static str, usize>)> {
    // `ATOLL_SIM_LOG=info` (with ATOLL_SIM_SEED) shows what the nodes log, step by step.
    if let Ok(filter) = std::env::var("ATOLL_SIM_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let mut sim = Sim::new(seed, node_config());
    sim.chaos(150).await;
    sim.heal().await?;
    sim.check()?;
    sim.chaos(150).await;
    sim.heal().await?;
    sim.check()?;
    if let Some(e) = sim.failure.take() {
        return Err(e);
    }
    Ok((sim.collected, sim.faults))
}

/// This shard's seeds: seeds `0..ATOLL_SIM_SEEDS` (default 400) split over [`SHARDS`] tests that
/// run in parallel, or only `ATOLL_SIM_SEED` (in shard 0).
fn seeds(shard: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("ATOLL_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return if shard == 0 { vec![seed] } else { vec![] };
    }
    let n: u64 = std::env::var("ATOLL_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    (0..n).filter(|s| s % SHARDS == shard).collect()
}

const SHARDS: u64 = 4;

#[tokio::test(flavor = "current_thread")]
async fn seeds_shard_0_converge_without_losing_or_resurrecting_anything() {
    run_shard(0).await
}

#[tokio::test(flavor = "current_thread")]
async fn seeds_shard_1_converge_without_losing_or_resurrecting_anything() {
    run_shard(1).await
}

#[tokio::test(flavor = "current_thread")]
async fn seeds_shard_2_converge_without_losing_or_resurrecting_anything() {
    run_shard(2).await
}

#[tokio::test(flavor = "current_thread")]
async fn seeds_shard_3_converge_without_losing_or_resurrecting_anything() {
    run_shard(3).await
}

async fn run_shard(shard: u64) {
    let mut failures = Vec::new();
    let mut collected = 0;
    let mut faults: BTreeMap<&'static str, usize> = BTreeMap::new();
    for seed in seeds(shard) {
        match run_seed(seed).await {
            Ok((n, f)) => {
                collected += n;
                for (k, v) in f {
                    *faults.entry(k).or_default() += v;
                }
            }
            Err(e) => {
                eprintln!(
                    "seed {seed} FAILED: {e:#}\n  replay: ATOLL_SIM_SEED={seed} cargo test -p atoll-sync --test sim"
                );
                failures.push(seed);
            }
        }
    }
    eprintln!("tombstones collected over all seeds: {collected}; faults injected: {faults:?}");
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

mod scenarios;
