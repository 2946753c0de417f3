//! One site's replication state and the steps that change it, independent of sockets and timers.
//!
//! A [`Node`] knows its peers (by URL, for talking to them) and the sites behind them (by name,
//! durably: [`crate::membership`]), queues fresh local writes per peer (the push path), answers
//! other sites' requests ([`Node::handle`]), runs its side of pushes, hellos and anti-entropy
//! sessions over any [`Transport`], and collects tombstones when every known site has
//! acknowledged them ([`Node::collect`]). It also decides when guests may not use the store
//! ([`Node::guest_gate`]: resyncing, identity unconfirmed, clock off, refused by peers). The
//! site's driver (`crate::driver`) calls these on timers over HTTP; the simulation tests call them
//! over a lossy in-memory network.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;

use anyhow::{Result, bail};
use atoll_kv::{Change, Hlc, Origin};

use crate::membership::{self, Member, Record, Rules, Verdict};
use crate::message::{BootSeen, Hello, PeerInfo, Reply, Request, Sender, WireEntry, hlc_from_wire, hlc_wire};
use crate::reconcile::{self, Budget};
use crate::store::SyncStore;

mod collect;
mod gate;

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
    /// Most bytes of entries in one push (the rest waits for the next push).
    pub push_bytes: usize,
    /// Remote stamps further than this ahead of this site's wall clock are not merged; a site
    /// whose clock is off by more than this from most of its peers refuses guest writes.
    pub max_clock_offset_ms: u64,
    /// A new incarnation of a site heard from less than this long ago is refused as a second
    /// live site with the same name.
    pub replace_after_ms: u64,
    /// How long a started site waits for a peer to confirm its identity before it lets guests
    /// write anyway (a site alone).
    pub confirm_timeout_ms: u64,
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
            push_bytes: 8 << 20,
            max_clock_offset_ms: 500,
            replace_after_ms: 30_000,
            confirm_timeout_ms: 10_000,
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

/// What this site knows about one peer URL (statistics, push queue); the site behind it, once it
/// said hello, is a [`Member`] (by name, durable).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peer {
    /// Where it is reached.
    pub url: String,
    /// Its name, once it said hello.
    pub site: Option<String>,
    /// Its region.
    pub region: Option<String>,
    /// Its data dir incarnation (16 hex digits), once it said hello.
    pub incarnation: Option<String>,
    /// The URL is this site itself (a shared peer list).
    pub is_self: bool,
    /// Cut off past the horizon: its entries are refused until it resyncs.
    pub cut_off: bool,
    /// Told it runs on an older copy of its data dir: refused until it takes a new incarnation.
    pub must_reincarnate: bool,
    /// Its wall clock minus this site's (ms), as last measured.
    pub clock_offset_ms: Option<i64>,
    /// When the offset was measured (unix ms).
    #[serde(skip)]
    offset_at_ms: u64,
    /// Why this site refused its messages last (a clock past the bound, a duplicate name).
    pub flag: Option<String>,
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
    /// A hello with it succeeded since this process started (pushes and sessions wait for one).
    #[serde(skip)]
    introduced: bool,
    #[serde(skip)]
    pending: BTreeSet<Vec<u8>>,
}

impl Peer {
    fn new(url: String, now_ms: u64) -> Peer {
        Peer {
            url,
            site: None,
            region: None,
            incarnation: None,
            is_self: false,
            cut_off: false,
            must_reincarnate: false,
            clock_offset_ms: None,
            offset_at_ms: 0,
            flag: None,
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
            introduced: false,
            pending: BTreeSet::new(),
        }
    }

    /// Whether this site talks to it at all (as of the copy [`Node::peers`] made).
    pub fn active(&self) -> bool {
        !self.is_self && !self.cut_off && !self.must_reincarnate
    }
}

struct State {
    peers: BTreeMap<String, Peer>,
    /// Every site this site was introduced to, by name (durable records, loaded at start).
    members: BTreeMap<String, Member>,
    /// Tombstones that arrived before this are collected here (durable, in the store).
    collected: Hlc,

    /// Counts resyncs started; a session that began before the last one does not finish it.
    resync_epoch: u64,
    /// The sites that accepted this site's hello since it started (or since it reincarnated):
    /// its identity is confirmed when every admitted member has.
    confirmed: BTreeSet<String>,
    /// A peer refused this site (duplicate name, retired incarnation): its URL and reason.
    refused: Option<(String, String)>,
    /// What guests are told while they may not use the store.
    gate: Option<String>,
    /// The gate is closed for a reason that makes the site unready (not only starting up).
    gate_unready: bool,
}

impl State {
    fn active(&self, peer: &Peer) -> bool {
        !peer.is_self && peer.site.as_ref().and_then(|s| self.members.get(s)).is_none_or(Member::admitted)
    }
}

/// One site's replication.
pub struct Node<S> {
    store: S,
    me: PeerInfo,
    config: NodeConfig,
    state: Mutex<State>,
    started_ms: u64,
}

impl<S> std::fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("me", &self.me).finish_non_exhaustive()
    }
}

impl<S: SyncStore> Node<S> {
    /// A node for site `me` over `store`, with the peers at `seeds` (URLs). What this site knew
    /// of other sites before (members, cut-offs, acknowledgements, the collection watermark) is
    /// read back from the store.
    pub fn new(store: S, me: PeerInfo, config: NodeConfig, seeds: &[String], now_ms: u64) -> Node<S> {
        let mut members = BTreeMap::new();
        match store.records("member/") {
            Ok(records) => {
                for (name, bytes) in records {
                    match Record::decode(&bytes) {
                        Ok(r) => {
                            members.insert(r.site.clone(), Member::from_record(r));
                        }
                        Err(e) => tracing::error!(record = %name, "cannot read a member record: {e:#}"),
                    }
                }
            }
            Err(e) => tracing::error!("cannot read the member records: {e:#}"),
        }
        let collected = store.collected().unwrap_or_else(|e| {
            tracing::error!("cannot read the collection watermark: {e:#}");
            Hlc::ZERO
        });
        let mut peers = BTreeMap::new();
        // Known sites are peers from the start, at the URL they advertised last.
        for m in members.values() {
            let mut p = Peer::new(m.record.url.clone(), now_ms);
            p.site = Some(m.record.site.clone());
            p.region = Some(m.record.region.clone());
            peers.insert(m.record.url.clone(), p);
        }
        let node = Node {
            store,
            me,
            config,
            state: Mutex::new(State {
                peers,
                members,
                collected,
                resync_epoch: 0,
                confirmed: BTreeSet::new(),
                refused: None,
                gate: None,
                gate_unready: false,
            }),
            started_ms: now_ms,
        };
        for url in seeds {
            node.add_peer(url, now_ms);
        }
        node.store.set_tombstone_floor(node.tombstone_floor(collected));
        node.update_gate(now_ms);
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

    /// Every peer, by URL, with what is known of the site behind it.
    /// Copies without their push queues (callers poll this often; a queue may hold 100k keys).
    pub fn peers(&self) -> Vec<Peer> {
        let mut state = self.state();
        let state = &mut *state;
        let mut peers = Vec::with_capacity(state.peers.len());
        for p in state.peers.values_mut() {
            let pending = std::mem::take(&mut p.pending);
            let mut copy = p.clone();
            copy.push_pending = pending.len();
            p.pending = pending;
            if let Some(m) = copy.site.as_ref().and_then(|s| state.members.get(s)) {
                copy.cut_off = m.record.cut_off;
                copy.must_reincarnate = m.record.reincarnate;
                copy.incarnation = Some(format!("{:016x}", m.record.incarnation));
                copy.flag = copy.flag.or_else(|| m.flag.clone());
            }
            peers.push(copy);
        }
        peers
    }

    /// The URLs this site should talk to now.
    pub fn active_peers(&self) -> Vec<String> {
        let state = self.state();
        state.peers.values().filter(|p| state.active(p)).map(|p| p.url.clone()).collect()
    }

    /// The URLs of peers whose push queue holds keys.
    pub fn peers_with_pushes(&self) -> Vec<String> {
        let state = self.state();
        state
            .peers
            .values()
            .filter(|p| state.active(p) && !p.pending.is_empty())
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
    pub fn hello(&self, now_ms: u64) -> Result<Hello> {
        let id = self.store.identity();
        let (peers, seen) = {
            let state = self.state();
            let seen = state.members.values().map(Member::seen).collect();
            let peers = state
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
            (peers, seen)
        };
        Ok(Hello {
            me: self.me.clone(),
            peers,
            hlc: hlc_wire(self.store.now()),
            wall_ms: now_ms,
            incarnation: id.incarnation,
            previous_incarnation: id.previous,
            boot: id.boot,
            boot_nonce: id.boot_nonce,
            opened_at: hlc_wire(id.opened_at),
            boots: id
                .boots
                .iter()
                .map(|b| BootSeen { boot: b.boot, nonce: b.nonce, opened_at: hlc_wire(b.opened_at) })
                .collect(),
            durable: hlc_wire(self.store.durable_hlc()),
            since: hlc_wire(id.since),
            resyncing: self.store.resync_began()?.is_some(),
            seen,
        })
    }

    fn sender(&self) -> Sender {
        let id = self.store.identity();
        Sender {
            site: self.me.site.clone(),
            incarnation: id.incarnation,
            boot: id.boot,
            boot_nonce: id.boot_nonce,
            durable: hlc_wire(self.store.durable_hlc()),
            resyncing: self.store.resync_began().ok().flatten().is_some(),
            since: hlc_wire(id.since),
        }
    }

    /// Learns from a hello received from (or answered by) the site at `url`, and says what this
    /// site makes of its sender. `reached`: this site called `url` and got the hello as the
    /// answer (so `url` works); else the hello came in, and `url` is what the peer advertises.
    fn learn(&self, url: &str, hello: &Hello, now_ms: u64, reached: bool) -> Verdict {
        let mut url = url.trim_end_matches('/').to_owned();
        if hello.me.site == self.me.site {
            if hello.incarnation == self.store.identity().incarnation {
                // This site itself, listed in a shared peer list.
                if let Some(p) = self.state().peers.get_mut(&url) {
                    p.is_self = true;
                }
                return Verdict::Accept;
            }
            let reason = format!(
                "site {} (incarnation {:016x}, at {}) has this site's name: two live sites with one name",
                hello.me.site, hello.incarnation, hello.me.url
            );
            tracing::error!("{reason}; refusing it");
            return Verdict::Refused(reason);
        }
        let (verdict, record) = {
            let mut state = self.state();
            let state = &mut *state;
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
                // A known site calling in: keep the URL this site reaches it at (its advertised one
                // may differ, e.g. a name instead of an address).
                Some(old) if !reached => url = old,
                _ => {}
            }
            for info in &hello.peers {
                let known = state.peers.contains_key(&info.url)
                    || state.peers.values().any(|p| p.site.as_deref() == Some(info.site.as_str()));
                if info.url != self.me.url && info.site != self.me.site && !known {
                    tracing::info!(site = %info.site, region = %info.region, url = %info.url, "learned a peer");
                    state.peers.insert(info.url.clone(), Peer::new(info.url.clone(), now_ms));
                }
            }
            // What the sender has seen of the others, and what it has collected, counts too.
            for seen in &hello.seen {
                if seen.site == self.me.site {
                    continue;
                }
                if let Some(m) = state.members.get_mut(&seen.site) {
                    m.witness(seen);
                }
            }
            let collected = state.collected;
            let rules = Rules {
                collected,
                replace_after_ms: self.config.replace_after_ms,
                now_ms,
                now: self.store.now(),
            };
            let before = state.members.remove(&hello.me.site);
            let was_admitted = before.as_ref().map(Member::admitted);
            let (mut member, verdict) = membership::learn(before, hello, rules);
            match &verdict {
                Verdict::Reincarnate if was_admitted != Some(false) => tracing::warn!(
                    site = %hello.me.site,
                    "this site has seen a newer state of that site than it now holds: it runs on an older copy of its data dir and must take a new incarnation"
                ),
                Verdict::Resync(w) if was_admitted != Some(false) => tracing::warn!(
                    site = %hello.me.site, watermark = %w,
                    "site holds data older than what was collected here: it must resync before its entries are accepted"
                ),
                Verdict::Refused(reason) => tracing::error!(site = %hello.me.site, "refused: {reason}"),
                _ => {}
            }
            let record = member.record.clone();
            member.dirty = false;
            state.members.insert(hello.me.site.clone(), member);
            let peer = state.peers.entry(url.clone()).or_insert_with(|| Peer::new(url.clone(), now_ms));
            peer.site = Some(hello.me.site.clone());
            peer.region = Some(hello.me.region.clone());
            peer.is_self = false;
            peer.last_contact_ms = Some(now_ms);
            peer.clock_offset_ms = Some(
                i64::try_from(hello.wall_ms)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(i64::try_from(now_ms).unwrap_or(i64::MAX)),
            );
            peer.offset_at_ms = now_ms;
            peer.flag = None;
            (verdict, record)
        };
        self.save(&record);
        verdict
    }

    fn save(&self, record: &Record) {
        if let Err(e) = self.store.save_record(&format!("member/{}", record.site), &record.encode()) {
            tracing::error!(site = %record.site, "cannot save a member record: {e:#}");
        }
    }

    /// The verdict on a push or reconcile round from `from`.
    fn admit(&self, from: &Sender, now_ms: u64) -> Verdict {
        let mut state = self.state();
        let collected = state.collected;
        match state.members.get_mut(&from.site) {
            Some(m) => m.admit(from, collected, now_ms),
            None => Verdict::Introduce,
        }
    }

    fn refusal(verdict: Verdict) -> Option<Reply> {
        match verdict {
            Verdict::Accept => None,
            Verdict::Introduce => Some(Reply::Introduce),
            Verdict::Reincarnate => Some(Reply::Reincarnate),
            Verdict::Resync(w) => Some(Reply::ResyncRequired(hlc_wire(w))),
            Verdict::Refused(reason) => Some(Reply::Refused(reason)),
        }
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

    /// Flags the member `site` with `reason` (shown in the status), logging it once.
    fn flag(&self, site: &str, reason: String) {
        if let Some(m) = self.state().members.get_mut(site) {
            if m.flag.as_deref() != Some(reason.as_str()) {
                tracing::warn!(site, "{reason}");
            }
            m.flag = Some(reason);
        }
    }

    /// Merges entries from `site` unless one is past the clock bound (then the peer is flagged).
    async fn merge_from(
        &self,
        site: &str,
        entries: Vec<(Vec<u8>, atoll_kv::Entry)>,
        now_ms: u64,
    ) -> Result<usize> {
        match self.store.merge(entries, self.clock_bound(now_ms)).await {
            Ok(n) => Ok(n),
            Err(e) => {
                if let Some(ahead) = e.downcast_ref::<crate::store::AheadOfClock>() {
                    self.flag(site, format!("refused entries from {site}: {ahead}"));
                }
                Err(e)
            }
        }
    }

    /// Answers a request from another site (already authenticated and decoded).
    pub async fn handle(&self, request: Request, now_ms: u64) -> Result<Reply> {
        match request {
            Request::Hello(hello) => {
                let verdict = self.learn(&hello.me.url, &hello, now_ms, false);
                if let Some(refusal) = Self::refusal(verdict) {
                    return Ok(refusal);
                }
                Ok(Reply::Hello(self.hello(now_ms)?))
            }
            Request::Push(from, wire) => {
                if let Some(refusal) = Self::refusal(self.admit(&from, now_ms)) {
                    return Ok(refusal);
                }
                if from.resyncing {
                    // Not merged until it has finished (anti-entropy brings it later).
                    return Ok(Reply::Pushed(0));
                }
                let entries = crate::message::entries(wire);
                let lag = lag(&entries, now_ms);
                let n = entries.len() as u64;
                let changed = match self.merge_from(&from.site, entries, now_ms).await {
                    Ok(changed) => changed,
                    Err(e) if e.is::<crate::store::AheadOfClock>() => {
                        return Ok(Reply::AheadOfClock(format!("{e:#}")));
                    }
                    Err(e) => return Err(e),
                };
                self.with_site(&from.site, |p| {
                    p.entries_received += n;
                    p.lag_ms = lag.or(p.lag_ms);
                    p.last_contact_ms = Some(now_ms);
                });
                Ok(Reply::Pushed(changed as u32))
            }
            Request::Reconcile(from, round) => {
                if let Some(refusal) = Self::refusal(self.admit(&from, now_ms)) {
                    return Ok(refusal);
                }
                let limits = reconcile::Limits {
                    budget: self.config.budget,
                    refuse_from: self.clock_bound(now_ms),
                    take: !from.resyncing,
                };
                let processed = reconcile::process(&self.store, round, limits).await;
                let (out, moved) = match processed {
                    Ok(done) => done,
                    Err(e) if e.is::<crate::store::AheadOfClock>() => {
                        self.flag(&from.site, format!("refused entries from {}: {e:#}", from.site));
                        return Ok(Reply::AheadOfClock(format!("{e:#}")));
                    }
                    Err(e) => return Err(e),
                };
                self.with_site(&from.site, |p| {
                    p.entries_received += moved.received as u64;
                    p.entries_sent += moved.sent as u64;
                    p.last_contact_ms = Some(now_ms);
                });
                Ok(Reply::Reconcile(out))
            }
        }
    }

    /// Queues this site's own committed writes for every active peer.
    pub fn note_changes(&self, changes: &[Change]) {
        let mut state = self.state();
        let state = &mut *state;
        let cap = self.config.push_queue;
        let members = &state.members;
        let active = |p: &Peer| {
            !p.is_self && p.site.as_ref().and_then(|s| members.get(s)).is_none_or(Member::admitted)
        };
        for peer in state.peers.values_mut().filter(|p| active(p)) {
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
        let mut state = self.state();
        let Some(p) = state.peers.get_mut(url) else { return };
        p.bytes_sent += exchange.sent_bytes as u64;
        p.bytes_received += exchange.received_bytes as u64;
        p.payload_sent += exchange.sent_payload as u64;
        p.payload_received += exchange.received_payload as u64;
        p.last_contact_ms = Some(now_ms);
        p.last_error = None;
        // The member itself is heard from only by what names its incarnation (a hello, a push, a
        // round): whatever answers at its URL may be an older copy of it.
    }

    async fn call(
        &self,
        transport: &impl Transport,
        url: &str,
        request: Request,
        now_ms: u64,
    ) -> Result<Reply> {
        let result = match transport.call(url, request).await {
            Ok(exchange) => {
                self.exchanged(url, &exchange, now_ms);
                match exchange.reply {
                    Reply::ResyncRequired(w) => self.resync(url, hlc_from_wire(w), now_ms),
                    Reply::Introduce => {
                        self.with_peer(url, |p| p.introduced = false);
                        Err(anyhow::anyhow!("{url} does not know this site (or this incarnation) yet"))
                    }
                    Reply::Reincarnate => self.reincarnate(url, now_ms),
                    Reply::AheadOfClock(reason) => {
                        // The peer's clock, or this site's, is off: the gate's clock rule decides
                        // which (offsets to every peer); this exchange just failed.
                        self.with_peer(url, |p| {
                            p.flag = Some(format!("refused this site's entries: {reason}"))
                        });
                        Err(anyhow::anyhow!("{url} refused entries past its clock bound: {reason}"))
                    }
                    Reply::Refused(reason) => {
                        self.state().refused = Some((url.to_owned(), reason.clone()));
                        tracing::error!(peer = %url, "refused by a peer: {reason}");
                        Err(anyhow::anyhow!("{url} refused this site: {reason}"))
                    }
                    reply => return Ok(reply),
                }
            }
            Err(e) => {
                if let Some(clock) = e.downcast_ref::<crate::http::ClockOffset>() {
                    let reason = format!("clocks too far apart to talk: {clock}");
                    self.with_peer(url, |p| {
                        p.clock_offset_ms = Some(clock.offset_ms);
                        p.offset_at_ms = now_ms;
                        p.flag = Some(reason);
                    });
                }
                Err(e)
            }
        };
        let e = result.err().unwrap_or_else(|| anyhow::anyhow!("{url}: no answer"));
        self.failed(url, &e);
        Err(e)
    }

    /// A peer says this site runs on an older copy of its data dir: take a new incarnation, so
    /// that no stamp or counter contribution is ever reused, then say hello again.
    fn reincarnate(&self, url: &str, now_ms: u64) -> Result<()> {
        let old = self.store.identity();
        let new = self.store.reincarnate()?;
        tracing::warn!(
            peer = %url,
            old = format!("{:016x}", old.incarnation),
            new = format!("{:016x}", new.incarnation),
            "a peer has seen a newer state of this site than its data dir holds (restored from an older copy?): took a new incarnation"
        );
        {
            let mut state = self.state();
            state.confirmed.clear();
            state.resync_epoch += 1;
            for p in state.peers.values_mut() {
                p.introduced = false;
                p.needs_anti_entropy = true;
            }
        }
        // Guests stop at once (not at the gate task's next turn).
        self.update_gate(now_ms);
        bail!("{url}: this site took a new incarnation; saying hello again")
    }

    /// This site was cut off by the peer at `url` past the horizon: drop every entry older than
    /// its collection watermark (it may be a value whose tombstone is gone) and pull the rest
    /// again. The watermark is checked first: it cannot be from the future, and a resync this
    /// site already did from a later watermark is not repeated.
    fn resync(&self, url: &str, watermark: Hlc, now_ms: u64) -> Result<()> {
        if watermark > self.clock_bound(now_ms) {
            bail!("{url} asked for a resync from a watermark in the future ({watermark}): refused");
        }
        if self.store.identity().since >= watermark {
            bail!(
                "{url} requires a resync from {watermark}; this site's data reaches back no further: saying hello again"
            );
        }
        let dropped = self.store.discard_before(watermark)?;
        tracing::warn!(peer = %url, %watermark, dropped, "this site was cut off past the replication horizon; resyncing");
        {
            let mut state = self.state();
            state.resync_epoch += 1;
            for p in state.peers.values_mut() {
                p.introduced = false;
            }
        }
        self.note_lost_changes();
        self.update_gate(now_ms);
        bail!(
            "{url} requires a resync: dropped {dropped} entries older than {watermark}, pulling the rest again"
        )
    }

    /// Says hello to `url` and learns the peers it knows.
    pub async fn say_hello(&self, transport: &impl Transport, url: &str, now_ms: u64) -> Result<()> {
        match self.call(transport, url, Request::Hello(self.hello(now_ms)?), now_ms).await? {
            Reply::Hello(hello) => {
                let verdict = self.learn(url, &hello, now_ms, true);
                let mut state = self.state();
                if let Some(p) = state.peers.get_mut(url) {
                    p.introduced = verdict == Verdict::Accept;
                }
                if state.refused.as_ref().is_some_and(|(by, _)| by == url) {
                    state.refused = None;
                }
                if hello.me.site != self.me.site {
                    // The peer answered in kind: it accepts this site as it is.
                    state.confirmed.insert(hello.me.site.clone());
                }
                drop(state);
                match verdict {
                    Verdict::Accept => Ok(()),
                    other => bail!("{url} ({}) is not accepted here: {other:?}", hello.me.site),
                }
            }
            other => bail!("unexpected answer to hello: {other:?}"),
        }
    }

    async fn introduce(&self, transport: &impl Transport, url: &str, now_ms: u64) -> Result<()> {
        let introduced = self.state().peers.get(url).is_some_and(|p| p.introduced);
        if !introduced {
            self.say_hello(transport, url, now_ms).await?;
        }
        Ok(())
    }

    /// Sends the keys waiting for `url` (their current entries) in one push, up to the push
    /// budget (count and bytes; the rest stays queued). A failed push is not retried as such:
    /// the peer is marked for anti-entropy, which carries the same entries.
    pub async fn push(&self, transport: &impl Transport, url: &str, now_ms: u64) -> Result<usize> {
        self.introduce(transport, url, now_ms).await?;
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
        // Read in small chunks so that the byte budget holds while the message is assembled.
        let mut wire: Vec<WireEntry> = Vec::new();
        let mut bytes = 0;
        let mut taken = 0;
        for chunk in keys.chunks(4) {
            if bytes >= self.config.push_bytes && !wire.is_empty() {
                break;
            }
            let read = match self.store.entries_at(chunk) {
                Ok(read) => read,
                Err(e) => {
                    self.with_peer(url, |p| p.needs_anti_entropy = true);
                    return Err(e);
                }
            };
            for (k, e) in read {
                let w = WireEntry::new(k, &e);
                bytes += w.size();
                wire.push(w);
            }
            taken += chunk.len();
        }
        if taken < keys.len() {
            let mut state = self.state();
            if let Some(peer) = state.peers.get_mut(url) {
                peer.pending.extend(keys[taken..].iter().cloned());
            }
        }
        let n = wire.len();
        match self.call(transport, url, Request::Push(self.sender(), wire), now_ms).await? {
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
        self.introduce(transport, url, now_ms).await?;
        let epoch = self.state().resync_epoch;
        // While this site resyncs, what it sends is not merged: the session acknowledges nothing.
        let resyncing = self.store.resync_began()?.is_some();
        // The durable clock after a barrier, read before the digests: every tombstone that arrived
        // before it is committed and in them; one in a batch not yet committed arrived after it,
        // so this session never counts as having carried it.
        let started = self.store.barrier().await?;
        let mut round = reconcile::start(&self.store, salt)?;
        let mut rounds = 0;
        let (mut sent, mut received, mut merged) = (0, 0, 0);
        let site = self.state().peers.get(url).and_then(|p| p.site.clone()).unwrap_or_default();
        // A peer that resyncs: what it sends is not merged until it has finished.
        let take = !self.state().members.get(&site).is_some_and(|m| m.resyncing);
        let limits =
            reconcile::Limits { budget: self.config.budget, refuse_from: self.clock_bound(now_ms), take };
        loop {
            rounds += 1;
            if rounds > self.config.max_rounds {
                bail!("anti-entropy with {url} did not finish in {} rounds", self.config.max_rounds);
            }
            let reply =
                match self.call(transport, url, Request::Reconcile(self.sender(), round), now_ms).await? {
                    Reply::Reconcile(reply) => reply,
                    other => bail!("unexpected answer to reconcile: {other:?}"),
                };
            let processed = reconcile::process(&self.store, reply, limits).await;
            let (next, moved) = match processed {
                Ok(done) => done,
                Err(e) => {
                    if e.is::<crate::store::AheadOfClock>() {
                        self.flag(&site, format!("refused entries from {site}: {e:#}"));
                    }
                    self.failed(url, &e);
                    return Err(e);
                }
            };
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
        let began = self.store.resync_began()?;
        let finished_resync = {
            let mut state = self.state();
            let before = |m: &Member| began.is_some_and(|b| hlc_from_wire(m.record.introduced) < b);
            // A copy older than every introduction (nobody known yet when it was taken) has no
            // one to wait for: any peer that accepts it vouches.
            let nobody_before = !state.members.values().any(before);
            let same_epoch = state.resync_epoch == epoch;
            let mut vouches = false;
            if let Some(m) = state.members.get_mut(&site) {
                // Only a session the peer merged acknowledges anything (a resync that began
                // during it stopped that).
                if !resyncing && same_epoch {
                    m.acknowledged(started, now_ms);
                }
                m.flag = None;
                // A peer that resyncs itself gave nothing (and took nothing): it cannot vouch.
                vouches = take && !m.resyncing && (before(m) || nobody_before);
            }
            if let Some(p) = state.peers.get_mut(url) {
                p.last_sync_ms = Some(now_ms);
                p.needs_anti_entropy = false;
            }
            // Only a site known before the resync began can vouch for it (when there is one): one
            // met since may never have held what the others collected (a new site, say).
            same_epoch && vouches
        };
        if finished_resync {
            self.store.finish_resync()?;
            tracing::info!(peer = %url, "resync finished: this site holds everything its peers kept");
            self.update_gate(now_ms);
        }
        Ok(rounds)
    }
}

/// How old the newest of these entries is at `now_ms`.
fn lag(entries: &[(Vec<u8>, atoll_kv::Entry)], now_ms: u64) -> Option<u64> {
    entries.iter().map(|(_, e)| e.changed.hlc.physical_ms).max().map(|t| now_ms.saturating_sub(t))
}
