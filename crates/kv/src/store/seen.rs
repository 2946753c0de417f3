//! What this store holds of each site's writes, as a clock per site name: the basis of session
//! tokens (a client that read here may have seen any of it; another site serving that client
//! next should hold as much). Kept by the writer thread and published just before a batch
//! commits, so anything a reader can see (a guest's own write included) is in it.
//!
//! For each site, the clock reading is at least the stamp of every change of that site's the
//! store holds (an upper bound: never less, sometimes more):
//! - a local write: its own stamp;
//! - a merged register that is new here: its stamp, for the site that wrote it;
//! - a merged counter contribution that is new here: the incoming entry's `changed` stamp, for
//!   the contributing site (a contribution has no stamp of its own; `changed` is the greatest
//!   stamp of anything in the entry, so at least the contribution's).

use std::sync::Arc;
#[cfg(test)]
use std::sync::RwLock;

use crate::{Entry, Hlc};

/// A clock reading per site name, sorted by name.
pub type SeenVector = Arc<Vec<(String, Hlc)>>;

/// The name a writer id (`name~incarnation`) belongs to.
pub(crate) fn site_name(writer: &str) -> &str {
    writer.split_once('~').map_or(writer, |(name, _)| name)
}

/// One batch's additions, folded into the shared vector once the batch is durable.
#[derive(Default)]
pub(super) struct Batch(Vec<(String, Hlc)>);

impl Batch {
    fn note(&mut self, writer: &str, at: Hlc) {
        let name = site_name(writer);
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, seen)) => *seen = (*seen).max(at),
            None => self.0.push((name.to_owned(), at)),
        }
    }

    /// A local write stamped `next.changed` (also an increment set aside and rescued here).
    pub(super) fn local(&mut self, next: &Entry) {
        self.note(&next.changed.site, next.changed.hlc);
    }

    /// A merge that took `current` to `next`, the incoming entry changed at `incoming`.
    pub(super) fn merged(&mut self, current: &Entry, next: &Entry, incoming: Hlc) {
        // On a new register every contribution is new here, even one whose value equals what
        // the same site had on the old register (it was made since, on top of the new one).
        let new_register = next.stamp != current.stamp;
        if new_register {
            self.note(&next.stamp.site, next.stamp.hlc);
        }
        for (site, contribution) in &next.counter {
            if new_register || current.counter.get(site) != Some(contribution) {
                self.note(site, incoming);
            }
        }
    }

    /// `current` with this batch folded in, if anything moved (to be stored in the batch's
    /// transaction, then published once it is durable).
    pub(super) fn next(self, current: &SeenVector) -> Option<SeenVector> {
        if self.0.is_empty() {
            return None;
        }
        let mut next: Vec<(String, Hlc)> = current.as_ref().clone();
        let mut moved = false;
        for (name, at) in self.0 {
            match next.iter_mut().find(|(n, _)| *n == name) {
                Some((_, seen)) if *seen >= at => {}
                Some((_, seen)) => {
                    *seen = at;
                    moved = true;
                }
                None => {
                    next.push((name, at));
                    moved = true;
                }
            }
        }
        moved.then(|| {
            next.sort();
            Arc::new(next)
        })
    }

    #[cfg(test)]
    fn fold_into(self, shared: &RwLock<SeenVector>) {
        let current = shared.read().expect("lock").clone();
        if let Some(next) = self.next(&current) {
            *shared.write().expect("lock") = next;
        }
    }
}

/// What one reader (a request) read and wrote, as a clock per site name, sorted by name: for
/// each site, a clock at or after the stamp of every change of that site's the reader saw. A
/// session token built from it asks the next site for what the client saw, not for everything
/// the serving site held (a token of the whole [`SeenVector`] would make a client whose data
/// never touched a cut-off site wait on that site).
#[derive(Debug, Default)]
pub struct Touched(std::sync::Mutex<Vec<(String, Hlc)>>);

impl Touched {
    fn raise(&self, name: &str, at: Hlc) {
        if name.is_empty() || at == Hlc::default() {
            return; // a key never written: nothing of anyone's
        }
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match list.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => list[i].1 = list[i].1.max(at),
            Err(i) => list.insert(i, (name.to_owned(), at)),
        }
    }

    /// An entry read (a tombstone too: a deletion is something seen). Its register counts for
    /// the site that wrote it, at its stamp; each counter contribution for its site at the
    /// entry's `changed` stamp (a contribution has no stamp of its own; `changed` is at or after
    /// all of them), but no later than `seen`'s clock for that site (also at or after every
    /// change of that site held here, and often earlier than `changed`). `seen` must be the
    /// store's vector as read after the entry.
    pub fn read(&self, entry: &Entry, seen: &[(String, Hlc)]) {
        self.raise(site_name(&entry.stamp.site), entry.stamp.hlc);
        for writer in entry.counter.keys() {
            let name = site_name(writer);
            let held = seen.iter().find(|(n, _)| n == name).map(|(_, at)| *at);
            self.raise(name, held.map_or(entry.changed.hlc, |held| held.min(entry.changed.hlc)));
        }
    }

    /// A write this store's site `site` made and acknowledged: the site's clock in `seen`, which
    /// moved past the write's stamp before it committed.
    pub fn wrote(&self, site: &str, seen: &[(String, Hlc)]) {
        if let Some((_, at)) = seen.iter().find(|(n, _)| n == site) {
            self.raise(site, *at);
        }
    }

    /// Everything in `seen` (a listing: the keys it did not return are something seen too).
    pub fn all(&self, seen: &[(String, Hlc)]) {
        for (name, at) in seen {
            self.raise(name, *at);
        }
    }

    /// The clocks so far, sorted by name.
    pub fn clocks(&self) -> Vec<(String, Hlc)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The vector as the `meta` table's `"seen"` row holds it: per site, the name's length (u8),
/// the name, the clock (physical u64, logical u32), little-endian.
pub(super) fn encode(seen: &[(String, Hlc)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(seen.len() * 24);
    for (name, at) in seen {
        let name = &name.as_bytes()[..name.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&at.physical_ms.to_le_bytes());
        out.extend_from_slice(&at.logical.to_le_bytes());
    }
    out
}

/// The vector in a `"seen"` row, or `None` if it is not one.
pub(super) fn decode(mut bytes: &[u8]) -> Option<SeenVector> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = bytes.split_first() {
        let len = len as usize;
        if rest.len() < len + 12 {
            return None;
        }
        let name = std::str::from_utf8(&rest[..len]).ok()?.to_owned();
        let physical_ms = u64::from_le_bytes(rest[len..len + 8].try_into().ok()?);
        let logical = u32::from_le_bytes(rest[len + 8..len + 12].try_into().ok()?);
        out.push((name, Hlc { physical_ms, logical }));
        bytes = &rest[len + 12..];
    }
    Some(Arc::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stamp;

    fn at(ms: u64) -> Hlc {
        Hlc { physical_ms: ms, logical: 0 }
    }

    fn stamp(site: &str, ms: u64) -> Stamp {
        Stamp { hlc: at(ms), site: site.into() }
    }

    #[test]
    fn a_site_is_known_by_name_whatever_its_incarnation() {
        let shared = RwLock::new(SeenVector::default());
        let mut batch = Batch::default();
        batch.local(&Entry::set(b"1".to_vec(), stamp("a~01", 10)));
        batch.local(&Entry::set(b"2".to_vec(), stamp("a~02", 12)));
        batch.fold_into(&shared);
        assert_eq!(*shared.read().expect("lock").as_ref(), vec![("a".to_owned(), at(12))]);
        // Never backwards.
        let mut batch = Batch::default();
        batch.local(&Entry::set(b"0".to_vec(), stamp("a~01", 5)));
        let before = shared.read().expect("lock").clone();
        batch.fold_into(&shared);
        assert!(Arc::ptr_eq(&before, &shared.read().expect("lock")), "unchanged: the same vector");
    }

    #[test]
    fn the_stored_row_round_trips_and_a_torn_one_is_refused() {
        let seen =
            vec![("a".to_owned(), at(12)), ("eu-west-1".to_owned(), Hlc { physical_ms: 7, logical: 3 })];
        let bytes = encode(&seen);
        assert_eq!(decode(&bytes).as_deref(), Some(&seen));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode(&[]).as_deref(), Some(&Vec::new()));
    }

    #[test]
    fn a_reader_is_held_to_what_it_read_and_wrote_only() {
        let seen = vec![("a".to_owned(), at(50)), ("b".to_owned(), at(15)), ("c".to_owned(), at(90))];
        let touched = Touched::default();
        // A register counts for its writer at its stamp.
        touched.read(&Entry::set(b"x".to_vec(), stamp("a~1", 10)), &seen);
        // A counter: b's contribution at the entry's change, capped by what is held of b here.
        let (counter, _) =
            Entry::set(b"1".to_vec(), stamp("a~1", 12)).increment(1, stamp("b~2", 14)).expect("increment");
        let (counter, _) = counter.increment(1, stamp("a~1", 40)).expect("increment");
        touched.read(&counter, &seen);
        // A key never written holds nobody to anything.
        touched.read(&Entry::absent(), &seen);
        assert_eq!(touched.clocks(), vec![("a".to_owned(), at(40)), ("b".to_owned(), at(15))]);
        // A write counts for the writing site at its seen clock; c is never asked for.
        touched.wrote("a", &seen);
        assert_eq!(touched.clocks(), vec![("a".to_owned(), at(50)), ("b".to_owned(), at(15))]);
        touched.all(&seen);
        assert_eq!(touched.clocks(), seen);
    }

    #[test]
    fn a_merge_counts_only_what_is_new_here() {
        let current = Entry::set(b"1".to_vec(), stamp("a~1", 10));
        let (incremented, _) = current.increment(3, stamp("b~1", 20)).expect("increment");
        let mut batch = Batch::default();
        // The register is the same; b's contribution is new, at most as old as the entry's change.
        batch.merged(&current, &incremented, at(20));
        let shared = RwLock::new(SeenVector::default());
        batch.fold_into(&shared);
        assert_eq!(*shared.read().expect("lock").as_ref(), vec![("b".to_owned(), at(20))]);
        // A contribution equal in value to the one on the old register, on a new register: new.
        let reset = Entry::set(b"0".to_vec(), stamp("a~1", 25));
        let (moved, _) = reset.increment(3, stamp("b~1", 28)).expect("increment");
        let mut batch = Batch::default();
        batch.merged(&incremented, &moved, at(28));
        let shared_moved = RwLock::new(SeenVector::default());
        batch.fold_into(&shared_moved);
        assert_eq!(
            *shared_moved.read().expect("lock").as_ref(),
            vec![("a".to_owned(), at(25)), ("b".to_owned(), at(28))]
        );
        // A new register counts for its writer at its own stamp.
        let mut batch = Batch::default();
        batch.merged(&current, &Entry::set(b"9".to_vec(), stamp("c~1", 30)), at(30));
        batch.fold_into(&shared);
        assert_eq!(
            *shared.read().expect("lock").as_ref(),
            vec![("b".to_owned(), at(20)), ("c".to_owned(), at(30))]
        );
    }
}
