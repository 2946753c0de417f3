//! Membership: what this site knows about every other site, by **name**, durably.
//!
//! A site's identity is its name plus its data dir's incarnation, never its URL. For every site it
//! was ever introduced to, a site keeps a [`Member`] record in its own store (the meta table,
//! `sync/member/NAME`): the incarnation it accepts, what it has seen of that incarnation (boot
//! count, clock at open, highest durable clock), whether it is cut off, its matured
//! acknowledgements, when it was last heard from. The records survive restarts, so a cut-off
//! site stays cut off, a restarted site still waits for every site it knew before collecting a
//! tombstone, and an older copy of a site's data dir is recognised (see ALGORITHM.md, "Identity").
//!
//! The rules are pure functions of a record and a message ([`Member::admit`], [`learn`]), so
//! the simulation and the unit tests check them without a network.

use std::collections::VecDeque;

use atoll_kv::Hlc;
use serde::{Deserialize, Serialize};

use crate::message::{BootSeen, Hello, Seen, Sender, hlc_from_wire};

/// The version byte of a stored member record.
const RECORD_VERSION: u8 = 4;
/// Most boots of a member's lineage kept in its record (a hello carries its last 32).
const MAX_LINEAGE: usize = 32;
/// The version byte of a stored [`Accepted`].
const ACCEPTED_VERSION: u8 = 1;
/// Most retired incarnations remembered per site.
const MAX_RETIRED: usize = 16;
/// Most completed sessions waiting to mature, per site.
const MAX_ACKS: usize = 64;

/// What this site knows about another site. The fields up to `last_matured` are the durable
/// record (stored as a version byte and their postcard encoding, in this order: a disk format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its name.
    pub site: String,
    /// Its region.
    pub region: String,
    /// The URL it advertised last.
    pub url: String,
    /// The incarnation this site accepts from it.
    pub incarnation: u64,
    /// The highest boot count seen from that incarnation.
    pub boot: u64,
    /// That boot's random id.
    pub boot_nonce: u64,
    /// Its clock at open in that boot.
    pub opened_at: (u64, u32),
    /// The highest durable clock it reported (or stamped) in that incarnation.
    pub durable: (u64, u32),
    /// Cut off past the horizon (or joined with data older than what was collected here): its
    /// entries are refused until it resyncs.
    pub cut_off: bool,
    /// Told that it runs on an older copy of its data dir: refused until a new incarnation.
    pub reincarnate: bool,
    /// Incarnations it had before (a hello from one of them is refused).
    pub retired: Vec<u64>,
    /// The last time it was heard from (unix ms).
    pub last_contact_ms: u64,
    /// The start of the second-to-last matured session (what collection counts on).
    pub matured_ack: Option<(u64, u32)>,
    /// The start of the last matured session.
    pub last_matured: Option<(u64, u32)>,
    /// This site's clock when the record was first made (kept when a new incarnation replaces
    /// the accepted one: a resync finishes only with a site known before it began).
    pub introduced: (u64, u32),
    /// How far back its data reaches, as its last accepted hello said: a message sent before a
    /// resync (reaching back further) is refused.
    pub since: (u64, u32),
    /// The collection watermark up to which it was counted, when it was told to resync while
    /// still counted (a new incarnation of a site this one counted, with older data); zero
    /// otherwise. A resync from any other watermark is *uncounted*: tombstones were collected
    /// without it (cut off past the horizon, never known, or away while its resync was pending).
    pub counted_at: (u64, u32),
    /// The recorded boot's lineage, as its hello said (its last boots, that one last; moved on
    /// by witness gossip): a hello of an earlier boot in it, sent before the next one opened, is
    /// a delayed message, not an older copy. Stored after the fields above (version 4).
    #[serde(skip)]
    pub lineage: Vec<BootSeen>,
}

impl Record {
    /// What this site tells it to resync from, if it must.
    fn resync(&self, collected: Hlc) -> Verdict {
        let uncounted = collected == Hlc::ZERO || self.counted_at != wire(collected);
        Verdict::Resync { watermark: collected, uncounted }
    }
}

impl Record {
    /// The stored form: the version byte, the record's fields, then its lineage.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![RECORD_VERSION];
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out.extend(postcard::to_stdvec(&self.lineage).unwrap_or_default());
        out
    }

    /// Reads a stored record: this version, or version 3 (no lineage: a hello of an earlier
    /// boot is then taken for an older copy until the next hello records one).
    pub fn decode(bytes: &[u8]) -> anyhow::Result<Record> {
        match bytes.split_first() {
            Some((&RECORD_VERSION, rest)) => {
                let (mut record, rest): (Record, _) = postcard::take_from_bytes(rest)?;
                record.lineage = postcard::from_bytes(rest)?;
                Ok(record)
            }
            Some((3, rest)) => Ok(postcard::from_bytes(rest)?),
            Some((v, _)) => anyhow::bail!(
                "member record version {v} is not supported (this build reads {RECORD_VERSION} and 3)"
            ),
            None => anyhow::bail!("empty member record"),
        }
    }
}

/// A member: its durable record and what is kept of it in memory only.
#[derive(Debug, Clone)]
pub struct Member {
    /// The durable part.
    pub record: Record,
    /// Completed sessions not yet old enough to count: (HLC at the start, unix ms at the end).
    pub acks: VecDeque<(Hlc, u64)>,
    /// Why its messages were last refused here (a clock past the bound, a duplicate name).
    pub flag: Option<String>,
    /// The record changed since it was last saved.
    pub dirty: bool,
    /// It said it is resyncing (its last hello or message): nothing it sends is merged.
    pub resyncing: bool,
    /// When it last merged this site's data (stored apart from the record, as
    /// `sync/accepted/NAME`).
    pub accepted: Option<Accepted>,
    /// When `accepted` was last stored (unix ms).
    pub accepted_saved_ms: u64,
}

/// When a member last merged this site's data: the end of the last anti-entropy session it took
/// whole, with the member's incarnation and this site's own identity then. A member that did so
/// within the horizon cannot have cut this site off past it, nor met it as new, so its demand
/// that this very incarnation and data resync is refused (ALGORITHM.md, "Horizon").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The member's incarnation that merged it.
    pub peer_incarnation: u64,
    /// This site's incarnation then.
    pub incarnation: u64,
    /// How far back this site's data reached then.
    pub since: (u64, u32),
    /// When (this site's wall clock, unix ms).
    pub at_ms: u64,
}

impl Accepted {
    /// The stored form (a version byte and the postcard encoding).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![ACCEPTED_VERSION];
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Reads a stored record; one that cannot be read is none (it only ever refuses a resync).
    pub fn decode(bytes: &[u8]) -> Option<Accepted> {
        match bytes.split_first() {
            Some((&ACCEPTED_VERSION, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// What this site does with a message from a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Merge it.
    Accept,
    /// Unknown site or incarnation: it must say hello first.
    Introduce,
    /// It runs on an older copy of its data dir.
    Reincarnate,
    /// Its data reaches back before what this site collected (it was cut off, or is new or an
    /// older copy): it must resync from this watermark (`uncounted`: tombstones were collected
    /// without it).
    Resync {
        /// This site's collection watermark.
        watermark: Hlc,
        /// It was not counted when tombstones were collected.
        uncounted: bool,
    },
    /// Refused, for this reason.
    Refused(String),
}

impl Member {
    /// A member from its stored record.
    pub fn from_record(record: Record) -> Member {
        Member {
            record,
            acks: VecDeque::new(),
            flag: None,
            dirty: false,
            resyncing: false,
            accepted: None,
            accepted_saved_ms: 0,
        }
    }

    /// Whether this site exchanges entries with it.
    pub fn admitted(&self) -> bool {
        !self.record.cut_off && !self.record.reincarnate
    }

    /// The verdict on a push or reconcile round from `from`; notes what it says of its clock.
    pub fn admit(&mut self, from: &Sender, collected: Hlc, now_ms: u64) -> Verdict {
        // Another incarnation, or a boot whose hello this site has not heard: introduce it first
        // (what it says of its clock only counts within the boot the record describes).
        if from.incarnation != self.record.incarnation
            || from.boot != self.record.boot
            || from.boot_nonce != self.record.boot_nonce
        {
            return Verdict::Introduce;
        }
        if self.record.reincarnate {
            return Verdict::Reincarnate;
        }
        if self.record.cut_off {
            return self.record.resync(collected);
        }
        if from.since < self.record.since {
            // Sent before its resync (a delayed or replayed copy): its data reached back further.
            return Verdict::Introduce;
        }
        self.record.last_contact_ms = now_ms;
        // Only a hello says a resync is over (a delayed message from before must not).
        self.resyncing |= from.resyncing;
        if from.durable > self.record.durable {
            self.record.durable = from.durable;
            self.dirty = true;
        }
        Verdict::Accept
    }

    /// What this site has seen of the member's incarnation, for other sites' hellos.
    pub fn seen(&self) -> Seen {
        Seen {
            site: self.record.site.clone(),
            incarnation: self.record.incarnation,
            boot: self.record.boot,
            boot_nonce: self.record.boot_nonce,
            opened_at: self.record.opened_at,
            durable: self.record.durable,
        }
    }

    /// Takes in what another site has seen of this member (witness gossip): a later boot, or a
    /// higher durable clock of the same boot, of the same incarnation. A copy of it must not pass
    /// for it here because this site had not heard from it for a while. Never lowers what this
    /// site knows; a later boot that opened before what was seen of it marks it an older copy.
    pub fn witness(&mut self, seen: &Seen) {
        let r = &mut self.record;
        if seen.incarnation != r.incarnation || seen.site != r.site {
            return;
        }
        if seen.boot > r.boot {
            if seen.opened_at < r.durable {
                r.reincarnate = true;
            } else if seen.boot > r.boot.saturating_add(1) {
                // The boots in between are unseen here: the next hello's lineage checks them
                // (taking this one would hide a restored copy that restarted since).
                return;
            }
            r.boot = seen.boot;
            r.boot_nonce = seen.boot_nonce;
            r.opened_at = seen.opened_at;
            r.durable = r.durable.max(seen.durable);
            r.lineage.push(BootSeen { boot: seen.boot, nonce: seen.boot_nonce, opened_at: seen.opened_at });
            r.lineage = last_boots(&r.lineage);
            self.dirty = true;
        } else if seen.boot == r.boot && seen.boot_nonce == r.boot_nonce && seen.durable > r.durable {
            r.durable = seen.durable;
            self.dirty = true;
        }
    }

    /// Records a completed anti-entropy session that started at `started` and ended at `now_ms`.
    pub fn acknowledged(&mut self, started: Hlc, now_ms: u64) {
        // Bounded: when full, later sessions are simply not counted (collection waits).
        if self.acks.len() < MAX_ACKS {
            self.acks.push_back((started, now_ms));
        }
    }

    /// Moves acknowledgements older than `max_age_ms` into the matured ones.
    pub fn mature(&mut self, now_ms: u64, max_age_ms: u64) {
        while let Some(&(started, ended)) = self.acks.front()
            && now_ms >= ended.saturating_add(max_age_ms)
        {
            self.record.matured_ack = self.record.last_matured.replace(wire(started));
            self.acks.pop_front();
            self.dirty = true;
        }
    }

    /// The watermark this member allows collection up to, if any.
    pub fn watermark(&self) -> Option<Hlc> {
        self.record.matured_ack.map(hlc_from_wire)
    }

    fn reset_acks(&mut self) {
        self.acks.clear();
        self.record.matured_ack = None;
        self.record.last_matured = None;
    }
}

fn wire(h: Hlc) -> (u64, u32) {
    (h.physical_ms, h.logical)
}

/// The last [`MAX_LINEAGE`] boots of `boots`.
fn last_boots(boots: &[BootSeen]) -> Vec<BootSeen> {
    boots[boots.len().saturating_sub(MAX_LINEAGE)..].to_vec()
}

/// Whether `hello`, from an earlier boot than the one `known` records, is a message that boot
/// sent before the next one opened (held up on the way, or answered late): the known boot's
/// lineage holds that boot with the same nonce and clock at open (a copy started again is a new
/// boot with a new nonce, never one of the lineage), and the hello's durable clock is not past
/// the clock the next boot opened at. Every boot opens at or after everything the one before
/// made durable, and a site moves its durable clock past everything before it as it says hello
/// (a barrier): so a boot still running after the next one opened on a copy of the data dir,
/// idle or not, says hello with a durable clock past that opening, and is told to reincarnate.
fn delayed(hello: &Hello, known: &Record) -> bool {
    let at = |boot: u64| known.lineage.iter().find(|b| b.boot == boot);
    let (Some(that), Some(next)) = (at(hello.boot), at(hello.boot.saturating_add(1))) else {
        return false;
    };
    that.nonce == hello.boot_nonce && that.opened_at == hello.opened_at && hello.durable <= next.opened_at
}

/// Whether the boots in `hello`, later than the one `known` records, continue that boot: its
/// lineage holds the known boot with the same nonce, and the boot after it opened at or after
/// the highest durable clock seen from the known boot. A restored copy opens before that, and
/// restarting it again does not hide the boot that opened on the copy. A lineage that no longer
/// reaches back to the known boot proves nothing, so it does not follow: more than 32 restarts
/// while this site did not hear from it (a crash loop, say) cost a new incarnation, which is
/// safe; accepting could let a copy pass that forked at the boot this site never saw close.
fn follows(hello: &Hello, known: &Record) -> bool {
    let at = |boot: u64| hello.boots.iter().find(|b| b.boot == boot);
    let (Some(same), Some(next)) = (at(known.boot), at(known.boot.saturating_add(1))) else {
        return false;
    };
    same.nonce == known.boot_nonce && next.opened_at >= known.durable
}

/// How a hello changes what this site knows of its sender.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// This site's collection watermark.
    pub collected: Hlc,
    /// A new incarnation of a site heard from less than this long ago is a second live site
    /// with the same name (refused), not a replacement.
    pub replace_after_ms: u64,
    /// Now (unix ms).
    pub now_ms: u64,
    /// Now (this site's clock).
    pub now: Hlc,
}

/// Learns from `hello` about its sender, whose record (if any) is `member`; returns the member as
/// it is now and the verdict on it. The rules (ALGORITHM.md, "Identity"):
/// - a site never introduced is recorded; it is cut off (must resync) if its data reaches back
///   before what this site has collected;
/// - the accepted incarnation saying hello with a lower boot, the same boot opened at another
///   clock, or a new boot opened before a durable clock it reported earlier, runs on an older
///   copy of its data dir: it must reincarnate;
/// - a new incarnation replaces the old one only if it names the old one as the incarnation it
///   replaced, or the old one was told to reincarnate, is cut off, or has been silent for
///   `replace_after_ms`; else it is a second live site with the same name and is refused; a
///   retired incarnation (an older copy started again) must reincarnate;
/// - a cut-off site whose data now reaches back no further than this site's watermark (it
///   resynced) is accepted again.
pub fn learn(member: Option<Member>, hello: &Hello, rules: Rules) -> (Member, Verdict) {
    let since = hlc_from_wire(hello.since);
    let old_data = rules.collected > Hlc::ZERO && since < rules.collected;
    let fresh = |retired: Vec<u64>| Record {
        site: hello.me.site.clone(),
        region: hello.me.region.clone(),
        url: hello.me.url.clone(),
        incarnation: hello.incarnation,
        boot: hello.boot,
        boot_nonce: hello.boot_nonce,
        opened_at: hello.opened_at,
        durable: hello.durable,
        cut_off: old_data,
        reincarnate: false,
        retired,
        last_contact_ms: rules.now_ms,
        matured_ack: None,
        last_matured: None,
        introduced: wire(rules.now),
        since: hello.since,
        counted_at: (0, 0),
        lineage: last_boots(&hello.boots),
    };
    let Some(mut m) = member else {
        let m = Member { dirty: true, resyncing: hello.resyncing, ..Member::from_record(fresh(Vec::new())) };
        let verdict = if old_data { m.record.resync(rules.collected) } else { Verdict::Accept };
        return (m, verdict);
    };
    m.dirty = true;
    let r = &mut m.record;
    if hello.incarnation != r.incarnation {
        if r.retired.contains(&hello.incarnation) {
            // An older copy of the site, started after the site moved on: it must take a new
            // incarnation, which is then accepted once the current one is silent (or refused
            // as a second live site while it is not).
            tracing::warn!(
                site = %r.site,
                "incarnation {:016x} was replaced by incarnation {:016x}: an older copy of the site is running",
                hello.incarnation, r.incarnation
            );
            return (m, Verdict::Reincarnate);
        }
        let silent = rules.now_ms.saturating_sub(r.last_contact_ms);
        let successor = hello.previous_incarnation == r.incarnation;
        if !successor && !r.reincarnate && !r.cut_off && silent < rules.replace_after_ms {
            let reason = format!(
                "site {} (incarnation {:016x}) was heard from {} ms ago; refusing a second live site with the same name (incarnation {:016x})",
                r.site, r.incarnation, silent, hello.incarnation
            );
            return (m, Verdict::Refused(reason));
        }
        let mut retired = std::mem::take(&mut r.retired);
        retired.push(r.incarnation);
        if retired.len() > MAX_RETIRED {
            retired.remove(0);
        }
        // The incarnation it replaces was counted up to now, unless it was cut off.
        let counted_at = if old_data && !r.cut_off { wire(rules.collected) } else { (0, 0) };
        let introduced = r.introduced;
        m.record = Record { introduced, counted_at, ..fresh(retired) };
        m.reset_acks();
        m.resyncing = hello.resyncing;
        let verdict = if old_data { m.record.resync(rules.collected) } else { Verdict::Accept };
        return (m, verdict);
    }
    if r.reincarnate {
        return (m, Verdict::Reincarnate);
    }
    if hello.boot < r.boot && delayed(hello, r) {
        // Sent by an earlier boot before the known one opened: it says nothing of the site now.
        return (m, Verdict::Introduce);
    }
    // The same boot count opened again (a copy taken while the site was stopped, started after
    // the site itself had started from it) differs by its nonce.
    let restored = hello.boot < r.boot
        || (hello.boot == r.boot && (hello.boot_nonce != r.boot_nonce || hello.opened_at != r.opened_at))
        || (hello.boot > r.boot && !follows(hello, r));
    tracing::debug!(site = %r.site, boot = hello.boot, opened_at = ?hello.opened_at, known_boot = r.boot, known_durable = ?r.durable, restored, "hello from a known incarnation");
    if restored {
        r.reincarnate = true;
        return (m, Verdict::Reincarnate);
    }
    if hello.since < r.since {
        if hello.boot == r.boot {
            // This boot's hello from before its resync (delayed or replayed): it says nothing
            // of the site now.
            return (m, Verdict::Introduce);
        }
        // A later boot whose data reaches back further than this one's did: an older copy.
        r.reincarnate = true;
        return (m, Verdict::Reincarnate);
    }
    // Only a current hello of the accepted incarnation says whether it resyncs.
    m.resyncing = hello.resyncing;
    let r = &mut m.record;
    // Only the accepted incarnation moves the record's address (a refused one may not).
    r.region = hello.me.region.clone();
    r.url = hello.me.url.clone();
    r.boot = hello.boot;
    r.boot_nonce = hello.boot_nonce;
    r.opened_at = hello.opened_at;
    r.lineage = last_boots(&hello.boots);
    r.durable = r.durable.max(hello.durable);
    r.last_contact_ms = rules.now_ms;
    r.since = r.since.max(hello.since);
    if r.cut_off {
        if old_data {
            let verdict = r.resync(rules.collected);
            return (m, verdict);
        }
        tracing::info!(site = %r.site, "a cut-off site resynced; accepting its entries again");
        r.cut_off = false;
        r.counted_at = (0, 0);
        m.reset_acks();
    }
    (m, Verdict::Accept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{BootSeen, PeerInfo};

    fn hello(incarnation: u64, boot: u64, opened_at: u64, durable: u64, since: u64) -> Hello {
        Hello {
            me: PeerInfo { site: "c".into(), region: "r".into(), url: "http://c".into() },
            peers: vec![],
            wall_ms: durable,
            incarnation,
            previous_incarnation: 0,
            boot,
            boot_nonce: boot * 1000 + opened_at,
            opened_at: (opened_at, 0),
            boots: vec![BootSeen { boot, nonce: boot * 1000 + opened_at, opened_at: (opened_at, 0) }],
            durable: (durable, 0),
            since: (since, 0),
            resyncing: false,
            seen: vec![],
        }
    }

    /// What another site says it saw of boot `boot` of incarnation 7 of site c.
    fn seen(boot: u64, boot_nonce: u64, opened_at: u64, durable: u64) -> Seen {
        Seen {
            site: "c".into(),
            incarnation: 7,
            boot,
            boot_nonce,
            opened_at: (opened_at, 0),
            durable: (durable, 0),
        }
    }

    /// `next`, a later boot of the data dir that said `prev`: its lineage continues prev's.
    fn then(prev: &Hello, next: Hello) -> Hello {
        let boots = prev.boots.iter().chain(&next.boots).copied().collect();
        Hello { boots, ..next }
    }

    fn rules(collected: u64, now_ms: u64) -> Rules {
        Rules {
            collected: Hlc { physical_ms: collected, logical: 0 },
            replace_after_ms: 30_000,
            now_ms,
            now: Hlc { physical_ms: now_ms, logical: 0 },
        }
    }

    #[test]
    fn a_restart_is_accepted_and_an_older_copy_must_reincarnate() {
        let first = hello(7, 1, 10, 50, 5);
        let (m, v) = learn(None, &first, rules(0, 100));
        assert_eq!(v, Verdict::Accept);
        // Restarted: next boot, opened at its last durable clock.
        let second = then(&first, hello(7, 2, 60, 70, 5));
        let (m, v) = learn(Some(m), &second, rules(0, 200));
        assert_eq!(v, Verdict::Accept);
        // A copy taken at boot 1 (clock 40) started again: boot 2 again, opened at 40.
        let (m2, v) = learn(Some(m.clone()), &hello(7, 2, 40, 45, 5), rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        assert!(m2.record.reincarnate);
        // A copy restored after the site ran on: a later boot opened before what it reported.
        let (_, v) = learn(Some(m.clone()), &then(&second, hello(7, 3, 65, 90, 5)), rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        // Then it reincarnates: accepted at once, being the one told to.
        let (m3, v) = learn(Some(m2), &hello(8, 3, 40, 45, 5), rules(0, 400));
        assert_eq!(v, Verdict::Accept);
        assert_eq!(m3.record.retired, vec![7]);
        // The old incarnation, started again from a copy, must reincarnate too...
        let (m3, v) = learn(Some(m3), &hello(7, 4, 90, 95, 5), rules(0, 500));
        assert_eq!(v, Verdict::Reincarnate);
        // ...and its new incarnation is a second live site while the current one is heard from.
        let (_, v) = learn(Some(m3), &hello(10, 4, 90, 95, 5), rules(0, 600));
        assert!(matches!(&v, Verdict::Refused(r) if r.contains("second live site")), "{v:?}");
    }

    #[test]
    fn a_restored_copy_restarted_before_a_peer_saw_it_must_still_reincarnate() {
        let (m, _) = learn(None, &hello(7, 1, 10, 50, 5), rules(0, 100));
        // Restored from a copy taken at clock 40 (boot 2 opens at 40), then restarted at 90: the
        // boot this peer hears opened after everything it saw, but the lineage shows boot 2.
        let mut restarted = hello(7, 3, 90, 95, 5);
        restarted.boots = vec![
            BootSeen { boot: 1, nonce: 1010, opened_at: (10, 0) },
            BootSeen { boot: 2, nonce: 77, opened_at: (40, 0) },
            BootSeen { boot: 3, nonce: 3090, opened_at: (90, 0) },
        ];
        let (_, v) = learn(Some(m.clone()), &restarted, rules(0, 200));
        assert_eq!(v, Verdict::Reincarnate);
        // A lineage that forks at the known boot (another nonce for boot 1) is a copy too.
        restarted.boots[1].opened_at = (60, 0);
        restarted.boots[0].nonce = 5;
        let (_, v) = learn(Some(m.clone()), &restarted, rules(0, 200));
        assert_eq!(v, Verdict::Reincarnate);
        // The same restarts on the real data dir are accepted.
        restarted.boots[0].nonce = 1010;
        let (m, v) = learn(Some(m), &restarted, rules(0, 200));
        assert_eq!(v, Verdict::Accept);
        // A lineage that starts just after the known boot cannot show it is the same boot 3.
        let mut short = restarted.clone();
        short.boot = 5;
        short.boots = vec![
            BootSeen { boot: 4, nonce: 4, opened_at: (96, 0) },
            BootSeen { boot: 5, nonce: 5, opened_at: (97, 0) },
        ];
        let (_, v) = learn(Some(m.clone()), &short, rules(0, 250));
        assert_eq!(v, Verdict::Reincarnate);
        // A lineage that no longer reaches the boot after the known one proves nothing.
        let mut looped = hello(7, 40, 500, 510, 5);
        looped.boots = (8..=40).map(|b| BootSeen { boot: b, nonce: b, opened_at: (400 + b, 0) }).collect();
        let (_, v) = learn(Some(m.clone()), &looped, rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        // Gossip of a boot two ahead is not taken on trust (the lineage is checked at the hello).
        let mut m = m;
        m.witness(&seen(5, 1, 99, 99));
        assert_eq!(m.record.boot, 3);
    }

    #[test]
    fn a_hello_of_an_earlier_boot_sent_before_the_next_opened_is_stale_not_a_copy() {
        let first = hello(7, 1, 10, 50, 5);
        let (m, _) = learn(None, &first, rules(0, 100));
        let second = then(&first, hello(7, 2, 60, 70, 5));
        let (m, v) = learn(Some(m), &second, rules(0, 200));
        assert_eq!(v, Verdict::Accept);
        // Boot 1's hello, held up on the way, arrives after boot 2's: it changes nothing.
        let (m, v) = learn(Some(m), &first, rules(0, 300));
        assert_eq!(v, Verdict::Introduce);
        assert!(!m.record.reincarnate);
        assert_eq!((m.record.boot, m.record.lineage.len()), (2, 2));
        // Boot 1 still running after boot 2 opened (on a copy) and writing: an older copy.
        let (_, v) = learn(Some(m.clone()), &hello(7, 1, 10, 61, 5), rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        // Idle, it says hello all the same: its durable clock moved past boot 2's opening as it
        // did (a barrier), so it is a copy too.
        let (_, v) = learn(Some(m.clone()), &hello(7, 1, 10, 60, 5), rules(0, 300));
        assert_eq!(v, Verdict::Introduce, "at boot 2's opening: sent before it");
        let idle = Hello { durable: (60, 1), ..hello(7, 1, 10, 60, 5) };
        let (_, v) = learn(Some(m.clone()), &idle, rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        // Another nonce for boot 1 (a copy started again): an older copy.
        let mut copy = first.clone();
        copy.boot_nonce += 1;
        let (_, v) = learn(Some(m.clone()), &copy, rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        // The lineage survives the stored record; a version 3 record has none (a stale hello
        // is then taken for a copy, as before).
        let stored = Record::decode(&m.record.encode()).expect("decode");
        assert_eq!(stored, m.record);
        let mut v3 = vec![3];
        v3.extend(postcard::to_stdvec(&m.record).expect("encode"));
        let old = Record::decode(&v3).expect("a version 3 record reads");
        assert_eq!(old, Record { lineage: vec![], ..m.record.clone() });
        let (_, v) = learn(Some(Member::from_record(old)), &first, rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        // Gossip of the next boot extends the lineage.
        let mut m = m;
        m.witness(&seen(3, 3, 80, 85));
        assert_eq!(m.record.lineage.last(), Some(&BootSeen { boot: 3, nonce: 3, opened_at: (80, 0) }));
        let (_, v) = learn(Some(m), &second, rules(0, 400));
        assert_eq!(v, Verdict::Introduce, "boot 2's hello, sent before boot 3 opened");
    }

    #[test]
    fn a_second_live_site_with_the_same_name_is_refused() {
        let (m, _) = learn(None, &hello(7, 1, 10, 50, 5), rules(0, 100));
        let (m, v) = learn(Some(m), &hello(9, 1, 10, 50, 5), rules(0, 1_000));
        assert!(matches!(&v, Verdict::Refused(r) if r.contains("second live site")), "{v:?}");
        // Silent long enough: a new disk for the same site replaces it.
        let (_, v) = learn(Some(m), &hello(9, 1, 10, 50, 5), rules(0, 100_000));
        assert_eq!(v, Verdict::Accept);
    }

    #[test]
    fn data_older_than_the_watermark_must_resync_first() {
        let first = hello(7, 1, 10, 50, 5);
        let (m, v) = learn(None, &first, rules(20, 100));
        assert_eq!(v, Verdict::Resync { watermark: Hlc { physical_ms: 20, logical: 0 }, uncounted: true });
        assert!(m.record.cut_off);
        let (m, v) = learn(Some(m), &then(&first, hello(7, 2, 60, 70, 20)), rules(20, 200));
        assert_eq!(v, Verdict::Accept);
        assert!(!m.record.cut_off);
        let bytes = m.record.encode();
        assert_eq!(Record::decode(&bytes).expect("decodes"), m.record);
        // A message sent before the resync (its data reached back further) is not merged.
        let mut m = m;
        let stale = Sender {
            site: "c".into(),
            incarnation: 7,
            boot: 2,
            boot_nonce: 2060,
            durable: (70, 0),
            resyncing: false,
            since: (5, 0),
        };
        assert_eq!(m.admit(&stale, Hlc { physical_ms: 20, logical: 0 }, 300), Verdict::Introduce);
        let current = Sender { since: (20, 0), ..stale };
        assert_eq!(m.admit(&current, Hlc { physical_ms: 20, logical: 0 }, 300), Verdict::Accept);
    }

    #[test]
    fn only_a_current_hello_of_the_accepted_incarnation_says_whether_it_resyncs() {
        let (m, _) = learn(None, &hello(7, 1, 10, 50, 5), rules(0, 100));
        let resyncing = Hello { resyncing: true, since: (20, 0), ..hello(7, 1, 10, 60, 20) };
        let (m, v) = learn(Some(m), &resyncing, rules(0, 200));
        assert_eq!(v, Verdict::Accept);
        assert!(m.resyncing);
        // A delayed or replayed hello from before its resync (reaching back further) is ignored.
        let (m, v) = learn(Some(m), &hello(7, 1, 10, 50, 5), rules(0, 300));
        assert_eq!(v, Verdict::Introduce);
        assert!(m.resyncing, "a stale hello lifted the quarantine");
        // A hello from an older copy (a lower boot) does not lift it either.
        let (m, v) = learn(Some(m), &Hello { resyncing: false, ..hello(7, 0, 5, 8, 20) }, rules(0, 400));
        assert_eq!(v, Verdict::Reincarnate);
        assert!(m.resyncing, "an older copy lifted the quarantine");
        // A later boot reaching back further than the resync (a copy from before it, restarted
        // at a clock no earlier than anything seen) is an older copy too.
        let (m, _) = learn(None, &hello(7, 1, 10, 50, 5), rules(0, 100));
        let (m, _) = learn(Some(m), &Hello { since: (20, 0), ..hello(7, 1, 10, 50, 20) }, rules(0, 200));
        let (m, v) = learn(Some(m), &then(&hello(7, 1, 10, 50, 5), hello(7, 2, 50, 55, 5)), rules(0, 300));
        assert_eq!(v, Verdict::Reincarnate);
        assert!(m.record.reincarnate);
    }

    #[test]
    fn only_a_new_incarnation_of_a_site_counted_until_now_resyncs_as_counted() {
        let resync = |v: &Verdict| match v {
            Verdict::Resync { uncounted, .. } => Some(*uncounted),
            _ => None,
        };
        let first = hello(7, 1, 10, 50, 5);
        let (m, _) = learn(None, &first, rules(0, 100));
        // An older copy, reincarnated, while the site was counted: counted at this watermark...
        let copy = Hello { previous_incarnation: 7, ..hello(8, 2, 40, 45, 5) };
        let (m2, v) = learn(Some(m.clone()), &copy, rules(20, 200));
        assert_eq!(resync(&v), Some(false));
        // ...and only at it: once collection moved on without it, not.
        let (m2, v) = learn(Some(m2), &copy, rules(20, 300));
        assert_eq!(resync(&v), Some(false));
        let (_, v) = learn(Some(m2), &copy, rules(30, 400));
        assert_eq!(resync(&v), Some(true));
        // A site never met, with old data, was never counted.
        let (_, v) = learn(None, &first, rules(20, 100));
        assert_eq!(resync(&v), Some(true));
        // Nor was a new incarnation of a site cut off past the horizon.
        let mut cut = m;
        cut.record.cut_off = true;
        let (_, v) = learn(Some(cut), &copy, rules(20, 200));
        assert_eq!(resync(&v), Some(true));
    }

    #[test]
    fn a_record_of_another_version_is_refused_by_name() {
        assert!(Record::decode(&[9, 1, 2]).expect_err("refused").to_string().contains("version 9"));
        assert!(Record::decode(&[]).is_err());
    }
}
