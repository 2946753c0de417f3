//! Answers to other sites' requests: a hello, a push, an anti-entropy round, each admitted (or
//! refused) by what this site knows of its sender first.

use anyhow::Result;

use super::Node;
use crate::membership::Verdict;
use crate::message::{Reply, Request, Sender, hlc_wire};
use crate::reconcile;
use crate::store::SyncStore;

impl<S: SyncStore> Node<S> {
    /// The verdict on a push or reconcile round from `from`.
    pub(super) fn admit(&self, from: &Sender, now_ms: u64) -> Verdict {
        let mut state = self.state();
        let collected = state.collected;
        match state.members.get_mut(&from.site) {
            Some(m) => m.admit(from, collected, now_ms),
            None => Verdict::Introduce,
        }
    }

    pub(super) fn refusal(&self, verdict: Verdict) -> Option<Reply> {
        match verdict {
            Verdict::Accept => None,
            Verdict::Introduce => Some(Reply::Introduce),
            Verdict::Reincarnate => Some(Reply::Reincarnate),
            Verdict::Resync { watermark, uncounted } => Some(Reply::ResyncRequired {
                watermark: hlc_wire(watermark),
                uncounted,
                site: self.me.site.clone(),
                incarnation: self.store.identity().incarnation,
                horizon_ms: self.config.horizon_ms,
            }),
            Verdict::Refused(reason) => Some(Reply::Refused(reason)),
        }
    }

    /// Whether `error` is entries from `site` refused past the clock bound (then the site is
    /// flagged: shown in the status, logged once).
    pub(super) fn flag_if_ahead(&self, site: &str, error: &anyhow::Error) -> bool {
        let ahead = error.is::<crate::store::AheadOfClock>();
        if ahead {
            self.flag(site, format!("refused entries from {site}: {error:#}"));
        }
        ahead
    }

    /// Answers a request from another site (already authenticated and decoded).
    pub async fn handle(&self, request: Request, now_ms: u64) -> Result<Reply> {
        match request {
            Request::Hello(hello) => {
                let verdict = self.learn(&hello.me.url, &hello, now_ms, false);
                if let Some(refusal) = self.refusal(verdict) {
                    return Ok(refusal);
                }
                Ok(Reply::Hello(self.hello(now_ms).await?))
            }
            Request::Push(from, wire) => self.pushed(from, wire, None, now_ms).await,
            Request::PushCovered(from, wire, covered) => self.pushed(from, wire, Some(covered), now_ms).await,
            Request::Reconcile(from, round) => {
                if let Some(refusal) = self.refusal(self.admit(&from, now_ms)) {
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
                    Err(e) if self.flag_if_ahead(&from.site, &e) => {
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
}

impl<S: SyncStore> Node<S> {
    /// A push from `from`: merged, and with `claim`, its frontier here moves (only once every
    /// entry of the push is merged, for this very state of this site: not a restored copy or
    /// one that has resynced since the sender heard from it, nor one that began to meanwhile).
    async fn pushed(
        &self,
        from: crate::message::Sender,
        wire: Vec<crate::message::WireEntry>,
        claim: Option<crate::message::Covered>,
        now_ms: u64,
    ) -> Result<Reply> {
        let epoch = self.state().resync_epoch;
        if let Some(refusal) = self.refusal(self.admit(&from, now_ms)) {
            return Ok(refusal);
        }
        if from.resyncing {
            // Not merged until it has finished (anti-entropy brings it later).
            return Ok(Reply::Pushed(0));
        }
        let entries = crate::message::entries(wire);
        let lag = lag(&entries, now_ms);
        let n = entries.len() as u64;
        let changed = match self.store.merge(entries, self.clock_bound(now_ms)).await {
            Ok(changed) => changed,
            Err(e) if self.flag_if_ahead(&from.site, &e) => {
                return Ok(Reply::AheadOfClock(format!("{e:#}")));
            }
            Err(e) => return Err(e),
        };
        if let Some(claim) = claim {
            let me = self.store.identity();
            let state = self.state();
            let same = state.resync_epoch == epoch
                && state.starting_over == 0
                && (claim.incarnation, claim.boot_nonce, claim.since)
                    == (me.incarnation, me.boot_nonce, crate::message::hlc_wire(me.since));
            if same {
                // Under the state lock: a resync beginning now clears it after this.
                self.frontiers.advance(&from.site, crate::message::hlc_from_wire(claim.through));
            }
        }
        self.with_site(&from.site, |p| {
            p.entries_received += n;
            p.lag_ms = lag.or(p.lag_ms);
            p.last_contact_ms = Some(now_ms);
        });
        Ok(Reply::Pushed(changed as u32))
    }
}

fn lag(entries: &[(Vec<u8>, atoll_kv::Entry)], now_ms: u64) -> Option<u64> {
    entries.iter().map(|(_, e)| e.changed.hlc.physical_ms).max().map(|t| now_ms.saturating_sub(t))
}
