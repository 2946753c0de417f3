//! Tombstone collection (ALGORITHM.md, "Tombstones"): every site ever introduced counts, cut-offs
//! past the horizon, and the floor below which a tombstone already collected is not stored again.

use anyhow::Result;
use atoll_kv::Hlc;

use super::Node;
use crate::membership;
use crate::store::SyncStore;

impl<S: SyncStore> Node<S> {
    /// Below the collection watermark by three clock bounds: a tombstone stamped before this,
    /// for a key this site does not hold, was held by every site when this site collected, and
    /// no write made since can be stamped before it (ALGORITHM.md, "Tombstones go away").
    pub(super) fn tombstone_floor(&self, collected: Hlc) -> Hlc {
        let margin = self.config.max_clock_offset_ms.saturating_mul(3);
        Hlc { physical_ms: collected.physical_ms.saturating_sub(margin), logical: 0 }
    }

    /// Collects the tombstones every known site has acknowledged (see ALGORITHM.md,
    /// "Tombstones"), cutting off sites silent past the horizon; returns how many went. Every
    /// site this site was ever introduced to counts (the records are durable), whatever URL it
    /// has and whether this process has heard from it yet.
    pub fn collect(&self, now_ms: u64) -> Result<usize> {
        let (watermark, changed) = {
            let mut state = self.state();
            let mut watermark: Option<Hlc> = None;
            let mut blocked = false;
            let mut changed = Vec::new();
            // Cut off only from the side that keeps a majority of the sites: a site that finds
            // (most of) the others silent past the horizon is the one that was away, and cutting
            // them off would leave both sides waiting for the other to call.
            let silent_past = |m: &membership::Member| {
                !m.record.cut_off && now_ms.saturating_sub(m.record.last_contact_ms) > self.config.horizon_ms
            };
            let total = state.members.len() + 1;
            let staying = 1 + state.members.values().filter(|m| !m.record.cut_off && !silent_past(m)).count();
            let may_cut = staying * 2 > total;
            // Maturity: the signature window, plus the clock bound both ways (a message is
            // accepted within the window of the receiver's clock, which may lag the signer's).
            let maturity = self
                .config
                .max_message_age_ms
                .saturating_add(self.config.max_clock_offset_ms.saturating_mul(2));
            for m in state.members.values_mut() {
                m.mature(now_ms, maturity);
                if !m.record.cut_off {
                    let silent = now_ms.saturating_sub(m.record.last_contact_ms);
                    if silent > self.config.horizon_ms && !may_cut {
                        blocked = true;
                    } else if silent > self.config.horizon_ms {
                        tracing::warn!(site = %m.record.site, "peer silent past the horizon: cut off; it must resync to rejoin");
                        m.record.cut_off = true;
                        m.record.counted_at = (0, 0);
                        m.dirty = true;
                    } else {
                        match m.watermark() {
                            Some(a) => watermark = Some(watermark.map_or(a, |w| w.min(a))),
                            None => blocked = true,
                        }
                    }
                }
                if m.dirty {
                    m.dirty = false;
                    changed.push(m.record.clone());
                }
            }
            // A peer known only by URL (never introduced) could be any site: it blocks
            // collection until it says hello, or until it is silent past the horizon.
            if state.peers.values().any(|p| {
                !p.is_self
                    && p.site.is_none()
                    && now_ms.saturating_sub(p.last_contact_ms.unwrap_or(p.first_seen_ms))
                        <= self.config.horizon_ms
            }) {
                blocked = true;
            }
            let cut: Vec<String> =
                state.members.values().filter(|m| m.record.cut_off).map(|m| m.record.site.clone()).collect();
            for p in state.peers.values_mut() {
                if p.site.as_ref().is_some_and(|s| cut.contains(s)) {
                    p.pending.clear();
                    p.lost_track();
                }
            }
            let watermark = match watermark {
                Some(w) if !blocked && w > state.collected => Some(w),
                _ => None,
            };
            (watermark, changed)
        };
        for record in &changed {
            self.save(record);
        }
        let Some(watermark) = watermark else { return Ok(0) };
        let removed = self.store.collect_tombstones(watermark)?;
        self.state().collected = watermark;
        self.store.set_tombstone_floor(self.tombstone_floor(watermark));
        if removed > 0 {
            tracing::info!(removed, %watermark, "collected tombstones every site has acknowledged");
        }
        Ok(removed)
    }
}
