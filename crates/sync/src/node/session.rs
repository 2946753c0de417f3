//! This site's side of a conversation with a peer: a hello, a push, an anti-entropy session, and
//! what it does when a peer answers that it must take a new incarnation or resync.

use anyhow::{Result, bail};
use atoll_kv::Hlc;

use super::{Node, Transport};
use crate::membership::{Accepted, Member, Verdict};
use crate::message::{Reply, Request, WireEntry, hlc_from_wire, hlc_wire};
use crate::reconcile;
use crate::store::SyncStore;

/// Who demands a resync, as its signed answer says.
pub(super) struct Demander {
    site: String,
    incarnation: u64,
    horizon_ms: u64,
}

impl<S: SyncStore> Node<S> {
    pub(super) async fn call(
        &self,
        transport: &impl Transport,
        url: &str,
        request: Request,
        now_ms: u64,
    ) -> Result<Reply> {
        let to = self.state().peers.get(url).and_then(|p| p.site.clone()).unwrap_or_default();
        let result = match transport.call(url, &to, request).await {
            Ok(exchange) => {
                self.exchanged(url, &exchange, now_ms);
                match exchange.reply {
                    Reply::ResyncRequired { watermark, uncounted, site, incarnation, horizon_ms } => {
                        let by = Demander { site, incarnation, horizon_ms };
                        self.resync(url, hlc_from_wire(watermark), uncounted, &by, now_ms)
                    }
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
    pub(super) fn reincarnate(&self, url: &str, now_ms: u64) -> Result<()> {
        let old = self.store.identity();
        let new = self.start_over(|| self.store.reincarnate())?;
        tracing::warn!(
            peer = %url,
            old = format!("{:016x}", old.incarnation),
            new = format!("{:016x}", new.incarnation),
            "a peer has seen a newer state of this site than its data dir holds (restored from an older copy?): took a new incarnation"
        );
        self.state().confirmed.clear();
        // Guests stop at once (not at the gate task's next turn).
        self.update_gate(now_ms);
        bail!("{url}: this site took a new incarnation; saying hello again")
    }

    /// This site was cut off by the peer at `url` past the horizon: drop every entry older than
    /// its collection watermark (it may be a value whose tombstone is gone) and pull the rest
    /// again. The demand is checked first: the watermark cannot be from the future, a resync
    /// this site already did from a later watermark is not repeated, and a demand by a peer that
    /// merged this very data within the horizon is refused.
    pub(super) fn resync(
        &self,
        url: &str,
        watermark: Hlc,
        uncounted: bool,
        by: &Demander,
        now_ms: u64,
    ) -> Result<()> {
        if watermark > self.clock_bound(now_ms) {
            bail!("{url} asked for a resync from a watermark in the future ({watermark}): refused");
        }
        if self.store.identity().since >= watermark {
            bail!(
                "{url} requires a resync from {watermark}; this site's data reaches back no further: saying hello again"
            );
        }
        if let Some(at_ms) = self.merged_within_horizon(by, now_ms) {
            let reason = format!(
                "{} demands a resync from {watermark}, but it merged this site's data at {at_ms} (unix ms), within the horizon: refused (a site that took this data cannot have cut it off)",
                by.site
            );
            self.flag(&by.site, reason.clone());
            bail!("{url}: {reason}");
        }
        let dropped = self.start_over(|| self.store.discard_before(watermark, uncounted))?;
        tracing::warn!(
            peer = %url, %watermark, dropped, uncounted,
            "this site's data reaches back before what a peer has collected (cut off past the replication horizon, an older copy, or data from before it was known): resyncing"
        );
        self.update_gate(now_ms);
        bail!(
            "{url} requires a resync: dropped {dropped} entries older than {watermark}, pulling the rest again"
        )
    }

    /// When the demanding site (by name and incarnation, as it signed its answer) last merged
    /// this site's data, if this site's incarnation and data are still those it merged and that
    /// was within the shorter of both horizons, less the signature window and the clock bound
    /// both ways (what the two clocks may disagree by). A time ahead of this site's clock by more
    /// than that (its clock was set back) proves nothing.
    fn merged_within_horizon(&self, by: &Demander, now_ms: u64) -> Option<u64> {
        let me = self.store.identity();
        let a = self.state().members.get(&by.site)?.accepted?;
        let slack = (self.config.max_message_age_ms)
            .saturating_add(self.config.max_clock_offset_ms)
            .saturating_mul(2);
        let horizon = self.config.horizon_ms.min(by.horizon_ms);
        let recent = a.at_ms <= now_ms.saturating_add(slack)
            && now_ms.saturating_sub(a.at_ms).saturating_add(slack) < horizon;
        let same = a.peer_incarnation == by.incarnation
            && a.incarnation == me.incarnation
            && a.since == hlc_wire(me.since);
        (recent && same).then_some(a.at_ms)
    }

    /// Begins a resync or a new incarnation with `change` (the store's side): guests stop first
    /// (the store refuses their writes from its next batch on, so none lands on half-discarded
    /// state); the sessions under way count for nothing, and every peer hears a hello and a
    /// full session again. The epoch moves before the store changes (a session that began
    /// before cannot acknowledge or end what is starting) and again after (one that began in
    /// between may have read the store before the change).
    fn start_over<T>(&self, change: impl FnOnce() -> Result<T>) -> Result<T> {
        {
            let mut state = self.state();
            state.starting_over += 1;
            state.resync_epoch += 1;
            state.gate = Some(super::gate::RESYNCING.to_owned());
            self.store.set_gate(state.gate.clone(), false);
            for p in state.peers.values_mut() {
                p.introduced = false;
                p.lost_track();
            }
        }
        // What this site held of others' writes is going: their frontiers here with it.
        self.frontiers.clear();
        let changed = change();
        self.frontiers.clear();
        let mut state = self.state();
        state.resync_epoch += 1;
        state.starting_over -= 1;
        changed
    }

    /// Says hello to `url` and learns the peers it knows.
    pub async fn say_hello(&self, transport: &impl Transport, url: &str, now_ms: u64) -> Result<()> {
        let before = self.store.wall_ms();
        self.store.barrier().await?;
        // The hello says when it leaves (the barrier may have waited behind a busy writer):
        // peers measure this site's clock offset from it.
        let now_ms = now_ms.saturating_add(self.store.wall_ms().saturating_sub(before));
        match self.call(transport, url, Request::Hello(self.hello_at(now_ms)?), now_ms).await? {
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

    pub(super) async fn introduce(&self, transport: &impl Transport, url: &str, now_ms: u64) -> Result<()> {
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
        let (keys, mut claim) = {
            let mut state = self.state();
            let noted = state.noted;
            let Some(peer) = state.peers.get_mut(url) else { return Ok(0) };
            let mut keys = Vec::new();
            while keys.len() < self.config.push_batch {
                let Some(k) = peer.pending.pop_first() else { break };
                keys.push(k);
            }
            // Everything queued for it goes now, and nothing was lost since the last session
            // (a failed push or an overflow marks it for anti-entropy): once this is merged, it
            // holds every write of this site's stamped up to what the feed had brought.
            let complete = peer.pending.is_empty()
                && !peer.needs_anti_entropy
                && peer.lost == peer.synced_lost
                && peer.pushing == 0
                && !peer.claims_refused;
            if !keys.is_empty() {
                peer.pushing += 1;
            }
            (keys, peer.view.filter(|_| complete).map(|view| covered(noted, view)))
        };
        if keys.is_empty() {
            return Ok(0);
        }
        // Counted down however this push ends (an error, or this future dropped).
        let _pushing = Pushing { node: self, url };
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
                    self.with_peer(url, |p| p.lost_track());
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
            claim = None;
            let mut state = self.state();
            if let Some(peer) = state.peers.get_mut(url) {
                peer.pending.extend(keys[taken..].iter().cloned());
            }
        }
        let n = wire.len();
        let request = match claim {
            Some(claim) => Request::PushCovered(self.sender(), wire, claim),
            None => Request::Push(self.sender(), wire),
        };
        match self.call(transport, url, request, now_ms).await {
            Ok(Reply::Pushed(_)) => {
                self.with_peer(url, |p| p.entries_sent += n as u64);
                Ok(n)
            }
            Ok(other) => bail!("unexpected answer to push: {other:?}"),
            Err(e) => {
                if claim.is_some() {
                    self.note_claim_refused(url, &e);
                }
                Err(e)
            }
        }
    }

    /// Tells `url` that it holds every write of this site's stamped up to `claim` (an
    /// anti-entropy session this site led with it has just ended). A failure changes nothing.
    async fn send_claim(
        &self,
        transport: &impl Transport,
        url: &str,
        claim: Hlc,
        view: (u64, u64, (u64, u32)),
        now_ms: u64,
    ) {
        if self.state().peers.get(url).is_none_or(|p| p.claims_refused) {
            return;
        }
        let request = Request::PushCovered(self.sender(), Vec::new(), covered(claim, view));
        if let Err(e) = self.call(transport, url, request, now_ms).await {
            self.note_claim_refused(url, &e);
            tracing::debug!(peer = %url, "could not send the frontier after anti-entropy: {e:#}");
        }
    }

    /// A site older than frontiers answers a push carrying one with 400: it gets plain pushes
    /// until it says hello again (an upgraded site does at its start).
    fn note_claim_refused(&self, url: &str, e: &anyhow::Error) {
        if format!("{e:#}").contains("answered 400") {
            self.with_peer(url, |p| {
                if !p.claims_refused {
                    tracing::info!(peer = %p.url, "this peer does not take frontiers (an older build): plain pushes");
                }
                p.claims_refused = true;
            });
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
        // Read before the barrier: whatever is lost after this (a write committed after the
        // barrier, say) counts against the session; anything lost before was committed before it.
        let lost_at_start = self.state().peers.get(url).map_or(0, |p| p.lost);
        let started = self.store.barrier().await?;
        let mut round = reconcile::start(&self.store, salt)?;
        let mut rounds = 0;
        let (mut sent, mut received, mut merged) = (0, 0, 0);
        let (site, view) = {
            let state = self.state();
            let peer = state.peers.get(url);
            (peer.and_then(|p| p.site.clone()).unwrap_or_default(), peer.and_then(|p| p.view))
        };
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
                    self.flag_if_ahead(&site, &e);
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
        let me = self.store.identity();
        let mut accepted_to_save = None;
        // What the peer holds of this site's own writes now: all it held at the start.
        let mut claim = None;
        let finished_resync = {
            let mut state = self.state();
            let state = &mut *state;
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
                    claim = Some(started);
                    m.acknowledged(started, now_ms);
                    let accepted = Accepted {
                        peer_incarnation: m.record.incarnation,
                        incarnation: me.incarnation,
                        since: hlc_wire(me.since),
                        at_ms: now_ms,
                    };
                    // Stored when it says something new, or a minute later (the horizon is days).
                    let same = m.accepted.is_some_and(|a| Accepted { at_ms: now_ms, ..a } == accepted);
                    if !same || now_ms.saturating_sub(m.accepted_saved_ms) >= 60_000 {
                        accepted_to_save = Some((m.record.site.clone(), accepted));
                    }
                    m.accepted = Some(accepted);
                }
                m.flag = None;
                // A peer that resyncs itself gave nothing (and took nothing): it cannot vouch.
                vouches = take && !m.resyncing && (before(m) || nobody_before);
            }
            if let Some(p) = state.peers.get_mut(url) {
                p.last_sync_ms = Some(now_ms);
                // What was lost while the session ran is still to repair.
                p.needs_anti_entropy = p.lost != lost_at_start;
                p.synced_lost = lost_at_start;
            }
            // Only a site known before the resync began can vouch for it (when there is one): one
            // met since may never have held what the others collected (a new site, say).
            let finished = began.is_some() && same_epoch && vouches;
            if finished {
                // Under the state lock: a resync that begins now moves the epoch first, so it
                // cannot start between the check above and this.
                self.store.finish_resync()?;
            }
            finished
        };
        if let Some((site, accepted)) = accepted_to_save
            && self.save_accepted(&site, &accepted)
            && let Some(m) = self.state().members.get_mut(&site)
        {
            m.accepted_saved_ms = accepted.at_ms;
        }
        if finished_resync {
            tracing::info!(peer = %url, "resync finished: this site holds everything its peers kept");
            self.update_gate(now_ms);
        }
        // The frontier holds for the peer as it was when the session began (its hello before).
        if let (Some(claim), Some(view)) = (claim, view) {
            self.send_claim(transport, url, claim, view, now_ms).await;
        }
        Ok(rounds)
    }
}

/// A frontier `through`, for the receiver `view` (incarnation, boot, since).
fn covered(through: Hlc, view: (u64, u64, (u64, u32))) -> crate::message::Covered {
    crate::message::Covered {
        through: hlc_wire(through),
        incarnation: view.0,
        boot_nonce: view.1,
        since: view.2,
    }
}

/// Counts a push to a peer as under way while it lives.
struct Pushing<'a, S: SyncStore> {
    node: &'a Node<S>,
    url: &'a str,
}

impl<S: SyncStore> Drop for Pushing<'_, S> {
    fn drop(&mut self) {
        self.node.with_peer(self.url, |p| p.pushing = p.pushing.saturating_sub(1));
    }
}
