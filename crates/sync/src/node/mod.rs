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

use anyhow::Result;
use atoll_kv::{Change, Hlc, Origin};

use crate::membership::{Member, Record};
use crate::message::{PeerInfo, Reply, Request};
use crate::reconcile::Budget;
use crate::store::SyncStore;

mod answer;
mod collect;
mod gate;
mod learn;
mod session;

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
    /// Sends `request` to the site at `url`, known by the name `to` ("" when its name is not
    /// known yet), and returns its answer.
    fn call(&self, url: &str, to: &str, request: Request) -> impl Future<Output = Result<Exchange>> + Send;
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
    /// Every write of its own stamped up to here (unix ms) is merged at this site, as it last
    /// said (its frontier here; filled in by [`Node::peers`]).
    pub frontier_ms: Option<u64>,
    /// It refused a push carrying a frontier (a site older than them): it gets plain pushes
    /// until it says hello again.
    #[serde(skip)]
    claims_refused: bool,
    /// The site behind it as its last hello said (incarnation, boot, how far back its data
    /// reaches): what a frontier sent to it holds for. When it changes, it may have lost data
    /// (a restore, a resync): no frontier until an anti-entropy session after it.
    #[serde(skip)]
    view: Option<(u64, u64, (u64, u32))>,
    /// Counts the times the push path lost track of it (see [`Peer::lost_track`]).
    #[serde(skip)]
    lost: u64,
    /// [`Peer::lost`] when the last completed anti-entropy session with it began: a push may
    /// carry a frontier only while nothing was lost since.
    #[serde(skip)]
    synced_lost: u64,
    /// Pushes to it under way (a frontier only from the one push in flight: another could fail
    /// after it).
    #[serde(skip)]
    pushing: u32,
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
            frontier_ms: None,
            claims_refused: false,
            view: None,
            // Nothing pushed yet: no frontier until a session.
            lost: 1,
            synced_lost: 0,
            pushing: 0,
            introduced: false,
            pending: BTreeSet::new(),
        }
    }

    /// The push path lost track of it (a queue overflow, a failed push, lost feed batches, a
    /// write not queued for it, another state of it): anti-entropy must catch it up, and no
    /// push says it holds everything until a session that began after this has ended.
    pub(crate) fn lost_track(&mut self) {
        self.needs_anti_entropy = true;
        self.lost += 1;
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

    /// Resyncs or new incarnations being started (the gate stays closed meanwhile).
    starting_over: u32,
    /// Counts resyncs started; a session that began before the last one does not finish it.
    resync_epoch: u64,
    /// The sites that accepted this site's hello since it started (or since it reincarnated):
    /// its identity is confirmed when every admitted member has.
    confirmed: BTreeSet<String>,
    /// A peer refused this site (duplicate name, retired incarnation): its URL and reason.
    refused: Option<(String, String)>,
    /// The greatest stamp of this site's own writes taken from the change feed so far: every
    /// write of its own stamped at or before it is queued for every peer (or was pushed, or the
    /// peer is marked for anti-entropy). Stamps of local writes grow in commit order, and the
    /// feed is in commit order.
    noted: Hlc,
    /// What guests are told while they may not use the store.
    gate: Option<String>,
    /// The gate is closed for a reason that makes the site unready (not only starting up).
    gate_unready: bool,
}

/// Whether this site talks to `peer`: not itself, and not a site it does not admit (cut off,
/// or told to reincarnate).
fn active(members: &BTreeMap<String, Member>, peer: &Peer) -> bool {
    !peer.is_self && peer.site.as_ref().and_then(|s| members.get(s)).is_none_or(Member::admitted)
}

/// One site's replication.
pub struct Node<S> {
    store: S,
    /// How far this site holds every other site's own writes (session tokens read it).
    frontiers: std::sync::Arc<crate::frontier::Frontiers>,
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
    /// read back from the store; a record that cannot be read is an error (a site that forgot
    /// one could collect without that site, or take an older copy of it for new).
    pub fn new(store: S, me: PeerInfo, config: NodeConfig, seeds: &[String], now_ms: u64) -> Result<Node<S>> {
        let mut members = BTreeMap::new();
        for (name, bytes) in store.records("member/")? {
            let record = Record::decode(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "the member record {name:?} in the data dir cannot be read ({e:#}): run the build that wrote it, or restore the data dir"
                )
            })?;
            members.insert(record.site.clone(), Member::from_record(record));
        }
        for (name, bytes) in store.records("accepted/")? {
            if let Some(m) = name.strip_prefix("accepted/").and_then(|site| members.get_mut(site)) {
                m.accepted = crate::membership::Accepted::decode(&bytes);
            }
        }
        let collected = store.collected()?;
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
            frontiers: Default::default(),
            me,
            config,
            state: Mutex::new(State {
                peers,
                members,
                collected,
                starting_over: 0,
                resync_epoch: 0,
                confirmed: BTreeSet::new(),
                refused: None,
                noted: Hlc::ZERO,
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
        Ok(node)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// How far this site holds every other site's own writes.
    pub fn frontiers(&self) -> &std::sync::Arc<crate::frontier::Frontiers> {
        &self.frontiers
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
            copy.frontier_ms = copy.site.as_ref().and_then(|s| self.frontiers.get(s)).map(|h| h.physical_ms);
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
        state.peers.values().filter(|p| active(&state.members, p)).map(|p| p.url.clone()).collect()
    }

    /// The URLs of peers whose push queue holds keys.
    pub fn peers_with_pushes(&self) -> Vec<String> {
        let state = self.state();
        state
            .peers
            .values()
            .filter(|p| active(&state.members, p) && !p.pending.is_empty())
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

    /// Queues this site's own committed writes for every active peer.
    pub fn note_changes(&self, changes: &[Change]) {
        let mut state = self.state();
        let state = &mut *state;
        let cap = self.config.push_queue;
        for change in changes.iter().filter(|c| c.origin == Origin::Local) {
            state.noted = state.noted.max(change.entry.changed.hlc);
        }
        let members = &state.members;
        let local = changes.iter().any(|c| c.origin == Origin::Local);
        for peer in state.peers.values_mut() {
            if !active(members, peer) {
                // Not queued for it: once it is active again, anti-entropy must carry these
                // (and no push may say it holds everything before it has).
                if local {
                    peer.lost_track();
                }
                continue;
            }
            for change in changes.iter().filter(|c| c.origin == Origin::Local) {
                if peer.pending.len() >= cap {
                    if !peer.needs_anti_entropy {
                        tracing::warn!(peer = %peer.url, "push queue full; anti-entropy will catch this peer up");
                    }
                    peer.lost_track();
                    break;
                }
                peer.pending.insert(change.key.clone());
            }
        }
    }

    /// The change feed lost batches: every peer must be caught up by anti-entropy.
    pub fn note_lost_changes(&self) {
        for peer in self.state().peers.values_mut() {
            peer.lost_track();
        }
    }

    fn failed(&self, url: &str, error: &anyhow::Error) {
        let text = format!("{error:#}");
        self.with_peer(url, |p| {
            if p.last_error.as_deref() != Some(text.as_str()) {
                tracing::warn!(peer = %p.url, "sync failed: {text}");
            }
            p.last_error = Some(text);
            p.lost_track();
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
}
