//! What this site tells others about itself (its hello, the sender line on every message) and
//! what it learns from theirs: peers, the member records kept in the data dir (ALGORITHM.md,
//! "Membership"), and the verdict on a hello's sender.

use crate::membership::{self, Member, Record, Rules, Verdict};
use crate::message::{BootSeen, Hello, PeerInfo, Sender, hlc_wire, offset_ms};
use crate::store::SyncStore;
use anyhow::Result;

use super::{Node, Peer, State};

impl<S: SyncStore> Node<S> {
    /// This site's hello, at `now_ms`. It first moves the durable clock past everything before
    /// (a barrier): a boot's hello then says how far it ran, so a later boot opened on a copy of
    /// the data dir taken before it cannot be mistaken for its successor (see
    /// `membership::learn`).
    pub async fn hello(&self, now_ms: u64) -> Result<Hello> {
        self.store.barrier().await?;
        self.hello_at(now_ms)
    }

    /// This site's hello at `now_ms`, as its store is now (see [`Node::hello`]).
    pub(super) fn hello_at(&self, now_ms: u64) -> Result<Hello> {
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

    pub(super) fn sender(&self) -> Sender {
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
    pub(super) fn learn(&self, url: &str, hello: &Hello, now_ms: u64, reached: bool) -> Verdict {
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
            let rules = Rules {
                collected: state.collected,
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
                Verdict::Resync { watermark, .. } if was_admitted != Some(false) => tracing::warn!(
                    site = %hello.me.site, %watermark,
                    "site holds data older than what was collected here: it must resync before its entries are accepted"
                ),
                Verdict::Refused(reason) => tracing::error!(site = %hello.me.site, "refused: {reason}"),
                _ => {}
            }
            let record = member.record.clone();
            member.dirty = false;
            state.members.insert(hello.me.site.clone(), member);
            // Only the site itself as this site accepts it (cut off or not) moves its address,
            // names peers or speaks for the others: an older copy, a second site with its name or a
            // stale hello must not move the real site's URL or clock offset.
            if matches!(verdict, Verdict::Accept | Verdict::Resync { .. }) {
                self.learn_from(state, &mut url, hello, now_ms, reached);
            }
            (verdict, record)
        };
        self.save(&record);
        verdict
    }

    /// What a hello from an accepted sender teaches about its address, its peers and the others.
    fn learn_from(&self, state: &mut State, url: &mut String, hello: &Hello, now_ms: u64, reached: bool) {
        let known_as = state
            .peers
            .iter()
            .find(|(_, p)| p.site.as_deref() == Some(hello.me.site.as_str()))
            .map(|(u, _)| u.clone());
        match known_as {
            // A site reached at a new URL (restarted elsewhere) is the same site: forget the old URL.
            Some(old) if reached && old != *url => {
                state.peers.remove(&old);
            }
            // A known site calling in: keep the URL this site reaches it at (its advertised one
            // may differ, e.g. a name instead of an address).
            Some(old) if !reached => *url = old,
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
        // What the sender has seen of the others counts too.
        for seen in &hello.seen {
            if seen.site == self.me.site {
                continue;
            }
            if let Some(m) = state.members.get_mut(&seen.site) {
                m.witness(seen);
            }
        }
        let peer = state.peers.entry(url.clone()).or_insert_with(|| Peer::new(url.clone(), now_ms));
        peer.site = Some(hello.me.site.clone());
        peer.region = Some(hello.me.region.clone());
        peer.is_self = false;
        peer.last_contact_ms = Some(now_ms);
        peer.clock_offset_ms = Some(offset_ms(hello.wall_ms, now_ms));
        // It may have been upgraded since it refused a frontier: try again (one push at most
        // fails per hello, and a failed push is repaired by anti-entropy at once).
        peer.claims_refused = false;
        let view = (hello.incarnation, hello.boot_nonce, hello.since);
        if peer.view != Some(view) {
            // Another boot, or it resynced: what it held may be gone.
            peer.view = Some(view);
            peer.lost_track();
        }
        peer.offset_at_ms = now_ms;
        peer.flag = None;
    }

    /// Stores when `site` last merged this site's data; whether it was stored.
    pub(super) fn save_accepted(&self, site: &str, accepted: &crate::membership::Accepted) -> bool {
        let saved = self.store.save_record(&format!("accepted/{site}"), &accepted.encode());
        if let Err(e) = &saved {
            tracing::error!(site, "cannot save when a peer last merged this site's data: {e:#}");
        }
        saved.is_ok()
    }

    pub(super) fn save(&self, record: &Record) {
        let name = format!("member/{}", record.site);
        if let Err(e) = self.store.save_record(&name, &record.encode()) {
            tracing::error!(site = %record.site, "cannot save a member record: {e:#}");
        }
    }
}
