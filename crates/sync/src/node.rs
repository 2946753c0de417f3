//! One site's replication state and the steps that change it, independent of sockets and timers.
//!
//! A [`Node`] knows its peers (membership), queues fresh local writes per peer (the push path),
//! answers other sites' requests ([`Node::handle`]), runs its side of pushes, hellos and
//! anti-entropy sessions over any [`Transport`], and collects tombstones when every known site has
//! acknowledged them ([`Node::collect`]). The site's driver (`crate::driver`) calls these on
//! timers over HTTP; the simulation tests call them over a lossy in-memory network.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;

use anyhow::{Result, bail};
use atoll_kv::{Change, Hlc, Origin};

use crate::message::{Hello, PeerInfo, Reply, Request, WireEntry, hlc_from_wire, hlc_wire};
use crate::reconcile::{self, Budget};
use crate::store::SyncStore;

/// How a node behaves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// A site not heard from for this long is cut off: tombstones are collected without it, and
    /// it must resync before its entries are accepted again.
    pub horizon_ms: u64,
    /// The oldest message a site accepts (the signature window); an anti-entropy
    /// acknowledgement only counts for collection this long after the session ended.
    pub max_message_age_ms: u64,
    /// Most keys waiting to be pushed to one peer; past it the peer is caught up by anti-entropy.
    pub push_queue: usize,
    /// Most entries in one push message.
    pub push_batch: usize,
    /// What one anti-entropy round may carry.
    pub budget: Budget,
    /// Most rounds in one session.
    pub max_rounds: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            horizon_ms: 7 * 24 * 3600 * 1000,
            max_message_age_ms: crate::auth::MAX_AGE_MS,
            push_queue: 100_000,
            push_batch: 2000,
            budget: Budget::default(),
            max_rounds: 10_000,
        }
    }
}

/// Carries requests to other sites.
pub trait Transport: Send + Sync {
    /// Sends `request` to the site at `url` and returns its answer.
    fn call(&self, url: &str, request: Request) -> impl Future<Output = Result<Exchange>> + Send;
}

/// A request's answer and what it cost.
#[derive(Debug)]
pub struct Exchange {
    /// The answer.
    pub reply: Reply,
    /// Bytes sent (body and headers).
    pub sent_bytes: usize,
    /// Bytes received (body and headers).
    pub received_bytes: usize,
    /// Of which protocol messages (bodies): sent.
    pub sent_payload: usize,
    /// Of which protocol messages (bodies): received.
    pub received_payload: usize,
}

/// What this site knows about one peer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peer {
    /// Where it is reached.
    pub url: String,
    /// Its name and region, once it said hello.
    pub site: Option<String>,
    /// Its region.
    pub region: Option<String>,
    /// The URL is this site itself (a shared peer list).
    pub is_self: bool,
    /// Cut off past the horizon: its entries are refused until it resyncs.
    pub cut_off: bool,
    /// When this site first heard of it (unix ms).
    pub first_seen_ms: u64,
    /// The last successful exchange either way (unix ms).
    pub last_contact_ms: Option<u64>,
    /// The last completed anti-entropy session (unix ms).
    pub last_sync_ms: Option<u64>,
    /// The last failure talking to it.
    pub last_error: Option<String>,
    /// Entries sent to it (pushes and anti-entropy).
    pub entries_sent: u64,
    /// Entries received from it.
    pub entries_received: u64,
    /// Bytes sent to it.
    pub bytes_sent: u64,
    /// Bytes received from it.
    pub bytes_received: u64,
    /// Of `bytes_sent`, protocol messages (without HTTP framing).
    pub payload_sent: u64,
    /// Of `bytes_received`, protocol messages (without HTTP framing).
    pub payload_received: u64,
    /// How old the newest entry received from it was when it arrived (ms): the replication lag
    /// from it to this site.
    pub lag_ms: Option<u64>,
    /// Keys waiting to be pushed to it (filled in by [`Node::peers`]).
    pub push_pending: usize,
    /// The push path lost track (queue overflow or failed push): anti-entropy must catch up.
    pub needs_anti_entropy: bool,
    #[serde(skip)]
    pending: BTreeSet<Vec<u8>>,
    /// Completed sessions not yet old enough to count: (HLC at the start, unix ms at the end).
    #[serde(skip)]
    acks: std::collections::VecDeque<(Hlc, u64)>,
    /// The start of the second-to-last matured session: what collection counts on (see
    /// ALGORITHM.md: a fingerprint collision in one session is caught by the next).
    #[serde(skip)]
    matured_ack: Option<Hlc>,
    /// The start of the last matured session.
    #[serde(skip)]
    last_matured: Option<Hlc>,
}

impl Peer {
    fn new(url: String, now_ms: u64) -> Peer {
        Peer {
            url,
            site: None,
            region: None,
            is_self: false,
            cut_off: false,
            first_seen_ms: now_ms,
            last_contact_ms: None,
            last_sync_ms: None,
            last_error: None,
            entries_sent: 0,
            entries_received: 0,
            bytes_sent: 0,
            bytes_received: 0,
            payload_sent: 0,
            payload_received: 0,
            lag_ms: None,
            push_pending: 0,
            needs_anti_entropy: true,
            pending: BTreeSet::new(),
            acks: std::collections::VecDeque::new(),
            matured_ack: None,
            last_matured: None,
        }
    }

    /// Whether this site talks to it at all.
    pub fn active(&self) -> bool {
        !self.is_self && !self.cut_off
    }
}

struct State {
    peers: BTreeMap<String, Peer>,
    /// Tombstones older than this are collected here.
    collected: Hlc,
}

/// One site's replication.
pub struct Node<S> {
    store: S,
    me: PeerInfo,
    config: NodeConfig,
    state: Mutex<State>,
}

impl<S> std::fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("me", &self.me).finish_non_exhaustive()
    }
}

impl<S: SyncStore> Node<S> {
    /// A node for site `me` over `store`, with the peers at `seeds` (URLs).
    pub fn new(store: S, me: PeerInfo, config: NodeConfig, seeds: &[String], now_ms: u64) -> Node<S> {
        let node = Node {
            store,
            me,
            config,
            state: Mutex::new(State { peers: BTreeMap::new(), collected: Hlc::ZERO }),
        };
        for url in seeds {
            node.add_peer(url, now_ms);
        }
        node
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// This site.
    pub fn me(&self) -> &PeerInfo {
        &self.me
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a peer by URL (a no-op for a known URL or this site's own).
    pub fn add_peer(&self, url: &str, now_ms: u64) {
        let url = url.trim_end_matches('/').to_owned();
        if url.is_empty() || url == self.me.url {
            return;
        }
        self.state().peers.entry(url.clone()).or_insert_with(|| Peer::new(url, now_ms));
    }

    /// Every peer, by URL.
    /// Copies without their push queues (callers poll this often; a queue may hold 100k keys).
    pub fn peers(&self) -> Vec<Peer> {
        let mut state = self.state();
        let mut peers = Vec::with_capacity(state.peers.len());
        for p in state.peers.values_mut() {
            let pending = std::mem::take(&mut p.pending);
            let mut copy = p.clone();
            copy.push_pending = pending.len();
            p.pending = pending;
            peers.push(copy);
        }
        peers
    }

    /// The URLs this site should talk to now.
    pub fn active_peers(&self) -> Vec<String> {
        self.state().peers.values().filter(|p| p.active()).map(|p| p.url.clone()).collect()
    }

    /// The URLs of peers whose push queue holds keys.
    pub fn peers_with_pushes(&self) -> Vec<String> {
        self.state()
            .peers
            .values()
            .filter(|p| p.active() && !p.pending.is_empty())
            .map(|p| p.url.clone())
            .collect()
    }

    /// Whether `url` lost track on the push path and wants anti-entropy soon.
    pub fn needs_anti_entropy(&self, url: &str) -> bool {
        self.state().peers.get(url).is_some_and(|p| p.needs_anti_entropy)
    }

    /// The tombstone collection watermark reached so far.
    pub fn collected(&self) -> Hlc {
        self.state().collected
    }

    /// This site's hello.
    pub fn hello(&self) -> Result<Hello> {
        let peers = self
            .state()
            .peers
            .values()
            .filter(|p| !p.is_self)
            .filter_map(|p| {
                Some(PeerInfo {
                    site: p.site.clone()?,
                    region: p.region.clone().unwrap_or_default(),
                    url: p.url.clone(),
                })
            })
            .collect();
        Ok(Hello {
            me: self.me.clone(),
            peers,
            hlc: hlc_wire(self.store.now()),
            resynced_from: self.store.resynced_from()?.map(hlc_wire),
        })
    }

    /// Learns from a hello received from (or answered by) the site at `url`.
    /// `reached`: this site called `url` and got the hello as the answer (so `url` works); else the
    /// hello came in, and `url` is what the peer advertises.
    fn learn(&self, url: &str, hello: &Hello, now_ms: u64, reached: bool) {
        let mut state = self.state();
        let collected = state.collected;
        let mut url = url.trim_end_matches('/').to_owned();
        let known_as = state
            .peers
            .iter()
            .find(|(_, p)| p.site.as_deref() == Some(hello.me.site.as_str()))
            .map(|(u, _)| u.clone());
        match known_as {
            // A site reached at a new URL (restarted elsewhere) is the same site: forget the old URL.
            Some(old) if reached && old != url => {
                state.peers.remove(&old);
            }
            // A known site calling in: keep the URL this site reaches it at (its advertised one may
            // differ, e.g. a name instead of an address).
            Some(old) if !reached => url = old,
            _ => {}
        }
        let url = url.as_str();
        for info in &hello.peers {
            let known = state.peers.contains_key(&info.url)
                || state.peers.values().any(|p| p.site.as_deref() == Some(info.site.as_str()));
            if info.url != self.me.url && info.site != self.me.site && !known {
                tracing::info!(site = %info.site, region = %info.region, url = %info.url, "learned a peer");
                state.peers.insert(info.url.clone(), Peer::new(info.url.clone(), now_ms));
            }
        }
        let peer = state.peers.entry(url.to_owned()).or_insert_with(|| Peer::new(url.to_owned(), now_ms));
        peer.site = Some(hello.me.site.clone());
        peer.region = Some(hello.me.region.clone());
        peer.is_self = hello.me.site == self.me.site;
        peer.last_contact_ms = Some(now_ms);
        if peer.cut_off && hello.resynced_from.map(hlc_from_wire).is_some_and(|r| r >= collected) {
            tracing::info!(site = %hello.me.site, "a cut-off peer resynced; accepting its entries again");
            peer.cut_off = false;
            peer.acks.clear();
            peer.matured_ack = None;
            peer.last_matured = None;
        }
    }

    /// The peer with site name `site`, if known: updates its contact time; `Err` with the
    /// collection watermark if it is cut off.
    fn contact(&self, site: &str, now_ms: u64) -> std::result::Result<(), Hlc> {
        let mut state = self.state();
        let collected = state.collected;
        for p in state.peers.values_mut().filter(|p| p.site.as_deref() == Some(site)) {
            if p.cut_off {
                return Err(collected);
            }
            p.last_contact_ms = Some(now_ms);
        }
        Ok(())
    }

    fn with_site(&self, site: &str, f: impl Fn(&mut Peer)) {
        for p in self.state().peers.values_mut().filter(|p| p.site.as_deref() == Some(site)) {
            f(p);
        }
    }

    fn with_peer(&self, url: &str, f: impl FnOnce(&mut Peer)) {
        if let Some(p) = self.state().peers.get_mut(url) {
            f(p);
        }
    }

    /// Answers a request from another site (already authenticated and decoded).
    pub async fn handle(&self, request: Request, now_ms: u64) -> Result<Reply> {
        match request {
            Request::Hello(hello) => {
                self.learn(&hello.me.url, &hello, now_ms, false);
                Ok(Reply::Hello(self.hello()?))
            }
            Request::Push(from, wire) => {
                if let Err(w) = self.contact(&from, now_ms) {
                    return Ok(Reply::ResyncRequired(hlc_wire(w)));
                }
                let entries = crate::message::entries(wire);
                let lag = lag(&entries, now_ms);
                let n = entries.len() as u64;
                let changed = self.store.merge(entries).await?;
                self.with_site(&from, |p| {
                    p.entries_received += n;
                    p.lag_ms = lag.or(p.lag_ms);
                });
                Ok(Reply::Pushed(changed as u32))
            }
            Request::Reconcile(from, round) => {
                if let Err(w) = self.contact(&from, now_ms) {
                    return Ok(Reply::ResyncRequired(hlc_wire(w)));
                }
                let (out, moved) = reconcile::process(&self.store, round, self.config.budget).await?;
                self.with_site(&from, |p| {
                    p.entries_received += moved.received as u64;
                    p.entries_sent += moved.sent as u64;
                });
                Ok(Reply::Reconcile(out))
            }
        }
    }

    /// Queues this site's own committed writes for every active peer.
    pub fn note_changes(&self, changes: &[Change]) {
        let mut state = self.state();
        let cap = self.config.push_queue;
        for peer in state.peers.values_mut().filter(|p| p.active()) {
            for change in changes.iter().filter(|c| c.origin == Origin::Local) {
                if peer.pending.len() >= cap {
                    if !peer.needs_anti_entropy {
                        tracing::warn!(peer = %peer.url, "push queue full; anti-entropy will catch this peer up");
                    }
                    peer.needs_anti_entropy = true;
                    break;
                }
                peer.pending.insert(change.key.clone());
            }
        }
    }

    /// The change feed lost batches: every peer must be caught up by anti-entropy.
    pub fn note_lost_changes(&self) {
        for peer in self.state().peers.values_mut() {
            peer.needs_anti_entropy = true;
        }
    }

    fn failed(&self, url: &str, error: &anyhow::Error) {
        let text = format!("{error:#}");
        self.with_peer(url, |p| {
            if p.last_error.as_deref() != Some(text.as_str()) {
                tracing::warn!(peer = %p.url, "sync failed: {text}");
            }
            p.last_error = Some(text);
            p.needs_anti_entropy = true;
        });
    }

    fn exchanged(&self, url: &str, exchange: &Exchange, now_ms: u64) {
        self.with_peer(url, |p| {
            p.bytes_sent += exchange.sent_bytes as u64;
            p.bytes_received += exchange.received_bytes as u64;
            p.payload_sent += exchange.sent_payload as u64;
            p.payload_received += exchange.received_payload as u64;
            p.last_contact_ms = Some(now_ms);
            p.last_error = None;
        });
    }

    async fn call(
        &self,
        transport: &impl Transport,
        url: &str,
        request: Request,
        now_ms: u64,
    ) -> Result<Reply> {
        match transport.call(url, request).await {
            Ok(exchange) => {
                self.exchanged(url, &exchange, now_ms);
                if let Reply::ResyncRequired(w) = exchange.reply {
                    self.resync(hlc_from_wire(w))?;
                    bail!("{url} requires a resync");
                }
                Ok(exchange.reply)
            }
            Err(e) => {
                self.failed(url, &e);
                Err(e)
            }
        }
    }

    /// This site was cut off by a peer past the horizon: drop every entry older than the peer's
    /// collection watermark (it may be a value whose tombstone is gone) and pull the rest again.
    fn resync(&self, watermark: Hlc) -> Result<()> {
        if self.store.resynced_from()?.is_some_and(|r| r >= watermark) {
            return Ok(());
        }
        let dropped = self.store.discard_before(watermark)?;
        self.store.set_resynced_from(watermark)?;
        tracing::warn!(%watermark, dropped, "this site was cut off past the replication horizon; resyncing");
        self.note_lost_changes();
        Ok(())
    }

    /// Says hello to `url` and learns the peers it knows.
    pub async fn say_hello(&self, transport: &impl Transport, url: &str, now_ms: u64) -> Result<()> {
        match self.call(transport, url, Request::Hello(self.hello()?), now_ms).await? {
            Reply::Hello(hello) => {
                self.learn(url, &hello, now_ms, true);
                Ok(())
            }
            other => bail!("unexpected answer to hello: {other:?}"),
        }
    }

    /// Sends the keys waiting for `url` (their current entries) in one push. A failed push is
    /// not retried as such: the peer is marked for anti-entropy, which carries the same entries.
    pub async fn push(&self, transport: &impl Transport, url: &str, now_ms: u64) -> Result<usize> {
        let keys: Vec<Vec<u8>> = {
            let mut state = self.state();
            let Some(peer) = state.peers.get_mut(url) else { return Ok(0) };
            let mut keys = Vec::new();
            while keys.len() < self.config.push_batch {
                let Some(k) = peer.pending.pop_first() else { break };
                keys.push(k);
            }
            keys
        };
        if keys.is_empty() {
            return Ok(0);
        }
        // The entries as they are now: a push never carries a state older than its signature.
        let wire: Vec<WireEntry> =
            self.store.entries_at(&keys)?.into_iter().map(|(k, e)| WireEntry::new(k, &e)).collect();
        let n = wire.len();
        match self.call(transport, url, Request::Push(self.me.site.clone(), wire), now_ms).await? {
            Reply::Pushed(_) => {
                self.with_peer(url, |p| p.entries_sent += n as u64);
                Ok(n)
            }
            other => bail!("unexpected answer to push: {other:?}"),
        }
    }

    /// Runs one anti-entropy session with `url`, salted with `salt`; returns the number of
    /// rounds. On success the peer holds everything this site held when the session started.
    pub async fn anti_entropy(
        &self,
        transport: &impl Transport,
        url: &str,
        salt: u32,
        now_ms: u64,
    ) -> Result<usize> {
        let started = self.store.now();
        let mut round = reconcile::start(&self.store, salt)?;
        let mut rounds = 0;
        let (mut sent, mut received, mut merged) = (0, 0, 0);
        loop {
            rounds += 1;
            if rounds > self.config.max_rounds {
                bail!("anti-entropy with {url} did not finish in {} rounds", self.config.max_rounds);
            }
            let reply = match self
                .call(transport, url, Request::Reconcile(self.me.site.clone(), round), now_ms)
                .await?
            {
                Reply::Reconcile(reply) => reply,
                other => bail!("unexpected answer to reconcile: {other:?}"),
            };
            let (next, moved) = reconcile::process(&self.store, reply, self.config.budget).await?;
            (sent, received, merged) = (sent + moved.sent, received + moved.received, merged + moved.merged);
            self.with_peer(url, |p| {
                p.entries_received += moved.received as u64;
                p.entries_sent += moved.sent as u64;
                p.lag_ms = moved.newest_ms.map(|t| now_ms.saturating_sub(t)).or(p.lag_ms);
            });
            if next.is_empty() {
                break;
            }
            round = next;
        }
        if sent + received > 0 {
            tracing::info!(peer = %url, rounds, sent, received, merged, "anti-entropy repaired a difference");
        } else {
            tracing::debug!(peer = %url, rounds, "anti-entropy: in sync");
        }
        self.with_peer(url, |p| {
            // Bounded: when full, later sessions are simply not counted (collection waits).
            if p.acks.len() < 64 {
                p.acks.push_back((started, now_ms));
            }
            p.last_sync_ms = Some(now_ms);
            p.needs_anti_entropy = false;
        });
        Ok(rounds)
    }

    /// Collects the tombstones every known site has acknowledged (see ALGORITHM.md,
    /// "Tombstones"), cutting off sites silent past the horizon; returns how many went.
    pub fn collect(&self, now_ms: u64) -> Result<usize> {
        let watermark = {
            let mut state = self.state();
            let mut watermark: Option<Hlc> = None;
            let mut blocked = false;
            for p in state.peers.values_mut().filter(|p| !p.is_self) {
                while let Some(&(started, ended)) = p.acks.front()
                    && now_ms >= ended + self.config.max_message_age_ms
                {
                    p.matured_ack = p.last_matured.replace(started);
                    p.acks.pop_front();
                }
                if p.cut_off {
                    continue;
                }
                let heard = p.last_contact_ms.unwrap_or(p.first_seen_ms);
                if now_ms.saturating_sub(heard) > self.config.horizon_ms {
                    tracing::warn!(peer = %p.url, "peer silent past the horizon: cut off; it must resync to rejoin");
                    p.cut_off = true;
                    p.pending.clear();
                    continue;
                }
                match p.matured_ack {
                    Some(a) => watermark = Some(watermark.map_or(a, |w| w.min(a))),
                    None => blocked = true,
                }
            }
            match watermark {
                Some(w) if !blocked && w > state.collected => w,
                _ => return Ok(0),
            }
        };
        let removed = self.store.collect_tombstones(watermark)?;
        self.state().collected = watermark;
        if removed > 0 {
            tracing::info!(removed, %watermark, "collected tombstones every site has acknowledged");
        }
        Ok(removed)
    }
}

/// How old the newest of these entries is at `now_ms`.
fn lag(entries: &[(Vec<u8>, atoll_kv::Entry)], now_ms: u64) -> Option<u64> {
    entries.iter().map(|(_, e)| e.changed.hlc.physical_ms).max().map(|t| now_ms.saturating_sub(t))
}
