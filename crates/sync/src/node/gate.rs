//! What guests may do at this site, and the bound on clocks: the store's gate (closed while the
//! site resyncs; closed to writes while its identity is unconfirmed, a peer refuses it, or its
//! clock is off from most of its peers) and the offsets it is computed from.

use atoll_kv::Hlc;

use super::{Node, Peer};
use crate::message::PeerInfo;
use crate::store::SyncStore;

/// What guests are told while the site resyncs.
pub(super) const RESYNCING: &str = "this site is resyncing (cut off past the replication horizon, or running on an older copy of its data dir): it takes no guest reads or writes until a peer it knew before has brought it up to date";

impl<S: SyncStore> Node<S> {
    /// The bound on remote stamps: entries changed at or after it are not merged.
    pub(super) fn clock_bound(&self, now_ms: u64) -> Hlc {
        Hlc { physical_ms: now_ms.saturating_add(self.config.max_clock_offset_ms), logical: 0 }
    }

    /// A site whose signed hello was refused because the two clocks are `offset_ms` apart (more
    /// than the signature window): it is shown and flagged, and nothing else.
    pub fn note_clock_too_far(&self, who: &PeerInfo, offset_ms: i64, now_ms: u64) {
        let url = who.url.trim_end_matches('/').to_owned();
        if url.is_empty() || url == self.me.url || who.site == self.me.site {
            return;
        }
        let mut state = self.state();
        let known = state
            .peers
            .iter()
            .find(|(_, p)| p.site.as_deref() == Some(who.site.as_str()))
            .map(|(u, _)| u.clone());
        let peer = state.peers.entry(known.unwrap_or(url.clone())).or_insert_with(|| Peer::new(url, now_ms));
        peer.site.get_or_insert_with(|| who.site.clone());
        peer.region.get_or_insert_with(|| who.region.clone());
        // Only a flag: a replayed old hello looks the same, so the offset that counts for the
        // clock rule is the one this site measures on its own requests.
        peer.flag = Some(format!(
            "a hello signed {offset_ms} ms from this site's clock was refused (its clock is off, or \
             the message was replayed)"
        ));
    }

    /// Why guests may not use the store now, if they may not (as last computed by
    /// [`Node::update_gate`]).
    pub fn guest_gate(&self) -> Option<String> {
        self.state().gate.clone()
    }

    /// Whether the gate is closed for a reason that makes the site unready: resyncing, clock
    /// off, refused (not merely waiting for a first confirmation at startup).
    pub fn blocks_readiness(&self) -> bool {
        self.state().gate_unready
    }

    /// Recomputes [`Node::guest_gate`] and applies it to the store: closed to guests while this
    /// site resyncs; closed to their writes while no peer has confirmed its identity since it
    /// started (up to `confirm_timeout_ms`), while a peer refuses it, and while its clock is off
    /// by more than the bound from most of its peers (at least two measured).
    pub fn update_gate(&self, now_ms: u64) -> Option<String> {
        let resyncing = self.store.resync_began().map_or(true, |b| b.is_some());
        let mut state = self.state();
        let resyncing = resyncing || state.starting_over > 0;
        let bound = i64::try_from(self.config.max_clock_offset_ms).unwrap_or(i64::MAX);
        let measured: Vec<i64> = state
            .peers
            .values()
            .filter(|p| !p.is_self && now_ms.saturating_sub(p.offset_at_ms) < 60_000)
            .filter_map(|p| p.clock_offset_ms)
            .collect();
        let off = measured.iter().filter(|o| o.unsigned_abs() > bound.unsigned_abs()).count();
        let has_peers = state.peers.values().any(|p| !p.is_self);
        // Every site that may have seen a newer state of this one must have had its say.
        let unconfirmed =
            state.members.values().any(|m| m.admitted() && !state.confirmed.contains(&m.record.site))
                || (state.confirmed.is_empty() && has_peers);
        let mut unready = true;
        let gate = if resyncing {
            Some(RESYNCING.to_owned())
        } else if let Some((url, reason)) = &state.refused {
            Some(format!("this site is refused by its peer {url}: {reason}"))
        } else if measured.len() >= 2 && off * 2 > measured.len() {
            let median = {
                let mut m = measured.clone();
                m.sort_unstable();
                m[m.len() / 2]
            };
            Some(format!(
                "this site's clock is off by about {} ms from most of its peers (the bound is {} ms): fix the clock",
                -median, self.config.max_clock_offset_ms
            ))
        } else if unconfirmed && now_ms.saturating_sub(self.started_ms) < self.config.confirm_timeout_ms {
            unready = false;
            Some("this site is starting: no peer has confirmed its identity yet".to_owned())
        } else {
            None
        };
        if gate != state.gate {
            match &gate {
                Some(reason) => tracing::warn!("guests may not use the store: {reason}"),
                None => tracing::info!("guests may use the store again"),
            }
            state.gate = gate.clone();
        }
        state.gate_unready = unready && gate.is_some();
        // Only a resync hides what the store holds; the other causes refuse writes. Set under
        // the state lock: a resync starting now closes it under the same lock.
        self.store.set_gate(gate.clone(), !resyncing);
        drop(state);
        gate
    }
}
