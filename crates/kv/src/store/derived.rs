//! The store's derived state: each range's digest and the index of keys by range, kept in memory
//! and made durable lazily, so that a write costs the entry's own page and little else.
//!
//! Why: a write that creates a key used to change three random pages (its entry, its range's
//! digest row, its index row), and with one fsync per batch the pages a batch dirties are what a
//! commit costs. Now:
//! - Each committed transaction publishes its digest deltas to [`Derived::digests`], which is
//!   what [`Store::digests`](super::Store::digests) answers from. The `digests` table lags: the
//!   ranges whose row is behind are listed in the meta table (a 512-byte bitmap, in the meta page
//!   every commit writes anyway), and their rows are written in one go when there are
//!   `flush_at` of them, or when the journal is folded.
//! - An index change (a key appears or goes) is appended to the `journal` table in key order of
//!   a sequence number (one page for a whole batch) and kept in [`Derived::pending`]; when
//!   `fold_at` changes are pending, a batch folds them into the `index` table first, sorted, in
//!   its own transaction, and empties the journal. Transactions that change many keys at once
//!   (collection, a resync's discard) fold first and change the index directly.
//!
//! Nothing here is lost by a crash: the journal and the stale set are committed with the
//! entries they describe. When the store opens, it reads the journal back into `pending` and
//! recomputes the digests of the stale ranges from their entries (one range scan each).
//!
//! Readers see the derived state and the database at the same commit: a transaction takes the
//! write lock before its commit and publishes before releasing it; readers take a snapshot
//! (begin a read transaction) under the read lock.

use std::collections::BTreeMap;
use std::sync::RwLock;

use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

use super::{KvError, storage};
use crate::store::DIGEST_RANGES;
use crate::tables::{
    Changes, DIGESTS, ENTRIES, INDEX, JOURNAL, STALE, Stale, decode_journal, decode_u128, entry_hash,
    index_key,
};

/// Index changes pending before a batch folds them into the index table (at most ~100 bytes
/// of memory each).
pub const FOLD_AT: usize = 65_536;
/// Ranges whose digest rows may lag before they are written (each is one range to scan when
/// the store opens after a crash).
pub const FLUSH_AT: usize = 512;

/// See the module docs.
pub(crate) struct Derived {
    /// Each range's digest, as of the last commit.
    pub(crate) digests: Vec<u128>,
    /// Per range, composite key → present: index changes in the journal, not yet in the index
    /// table.
    pub(crate) pending: Vec<BTreeMap<Vec<u8>, bool>>,
    /// How many keys `pending` holds.
    pub(crate) pending_len: usize,
    /// The journal's next sequence number.
    pub(crate) next_seq: u64,
    /// Ranges whose row in the digests table is behind [`Derived::digests`].
    pub(crate) stale: Stale,
    pub(crate) fold_at: usize,
    pub(crate) flush_at: usize,
}

impl Derived {
    /// Reads the derived state in the transaction that opens the store, recomputes the digests of
    /// the ranges left stale (by a crash, or by a stop: nothing is flushed at a stop) and stores
    /// them.
    pub(crate) fn load(
        txn: &WriteTransaction,
        meta: &mut redb::Table<&'static str, &'static [u8]>,
        fold_at: usize,
        flush_at: usize,
    ) -> Result<Derived, KvError> {
        let mut digests = vec![0u128; DIGEST_RANGES as usize];
        let mut table = txn.open_table(DIGESTS).map_err(storage)?;
        for item in table.iter().map_err(storage)? {
            let (range, sum) = item.map_err(storage)?;
            let slot =
                digests.get_mut(range.value() as usize).ok_or_else(|| storage("corrupt digest range"))?;
            *slot = decode_u128(sum.value())?;
        }
        let mut derived = Derived {
            digests,
            pending: vec![BTreeMap::new(); DIGEST_RANGES as usize],
            pending_len: 0,
            next_seq: 0,
            stale: Stale::default(),
            fold_at,
            flush_at,
        };
        for item in txn.open_table(JOURNAL).map_err(storage)?.iter().map_err(storage)? {
            let (seq, row) = item.map_err(storage)?;
            let (range, composite, present) = decode_journal(row.value())?;
            derived.pend(range, composite.to_vec(), present);
            derived.next_seq = seq.value() + 1;
        }
        let stale = match meta.get(STALE).map_err(storage)?.map(|v| Stale::decode(v.value())) {
            Some(Ok(stale)) => stale,
            // Unreadable: every range is recomputed.
            Some(Err(e)) => {
                tracing::warn!("kv: {e}: recomputing every range digest");
                let mut all = Stale::default();
                (0..DIGEST_RANGES).for_each(|r| all.insert(r));
                all
            }
            None => Stale::default(),
        };
        if !stale.is_empty() {
            let index = txn.open_table(INDEX).map_err(storage)?;
            let entries = txn.open_table(ENTRIES).map_err(storage)?;
            for range in stale.ranges() {
                let mut sum = 0u128;
                for composite in derived.range_keys(&index, range)? {
                    let encoded = entries
                        .get(composite.as_slice())
                        .map_err(storage)?
                        .ok_or_else(|| storage("index names a missing entry"))?;
                    sum = sum.wrapping_add(entry_hash(&composite, encoded.value()));
                }
                derived.digests[range as usize] = sum;
                table.insert(range, sum.to_le_bytes().as_slice()).map_err(storage)?;
            }
            meta.remove(STALE).map_err(storage)?;
        }
        Ok(derived)
    }

    /// Whether the next batch should fold the journal into the index.
    pub(crate) fn should_fold(&self) -> bool {
        self.pending_len >= self.fold_at
    }

    fn pend(&mut self, range: u32, composite: Vec<u8>, present: bool) {
        if self.pending[range as usize].insert(composite, present).is_none() {
            self.pending_len += 1;
        }
    }

    /// The composite keys of `range`, in key order: the index table's (as `index` holds them)
    /// with the pending changes applied.
    pub(crate) fn range_keys(
        &self,
        index: &impl ReadableTable<&'static [u8], &'static [u8]>,
        range: u32,
    ) -> Result<Vec<Vec<u8>>, KvError> {
        let prefix = index_key(range, &[]);
        let mut keys: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
        for item in index.range(prefix.as_slice()..).map_err(storage)? {
            let (k, _) = item.map_err(storage)?;
            let Some(composite) = k.value().strip_prefix(prefix.as_slice()) else { break };
            keys.insert(composite.to_vec(), true);
        }
        for (composite, present) in &self.pending[range as usize] {
            keys.insert(composite.clone(), *present);
        }
        Ok(keys.into_iter().filter_map(|(k, present)| present.then_some(k)).collect())
    }

    /// Publishes what a committed transaction changed.
    fn apply(&mut self, changes: Changes) {
        for (range, delta) in changes.deltas {
            let slot = &mut self.digests[range as usize];
            *slot = slot.wrapping_add(delta);
        }
        if changes.folded {
            self.pending.iter_mut().for_each(BTreeMap::clear);
            self.pending_len = 0;
        }
        for (range, composite, present) in changes.index {
            self.pend(range, composite, present);
        }
        self.next_seq = changes.next_seq;
        self.stale = changes.stale;
    }
}

/// Writes the stale digest rows, so that the next open has none to recompute (at a clean stop).
pub(crate) fn flush(db: &redb::Database, derived: &RwLock<Derived>) -> Result<(), KvError> {
    let mut d = derived.write().unwrap_or_else(|e| e.into_inner());
    if d.stale.is_empty() {
        return Ok(());
    }
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut table = txn.open_table(DIGESTS).map_err(storage)?;
        for range in d.stale.ranges() {
            table.insert(range, d.digests[range as usize].to_le_bytes().as_slice()).map_err(storage)?;
        }
        txn.open_table(crate::tables::META).map_err(storage)?.remove(STALE).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    d.stale = Stale::default();
    Ok(())
}

/// Commits a transaction that changed the derived state by `changes` (`commit` commits it) and
/// publishes them, with no reader between the two.
pub(crate) fn commit(
    derived: &RwLock<Derived>,
    changes: Changes,
    commit: impl FnOnce() -> Result<(), KvError>,
) -> Result<(), KvError> {
    let mut d = derived.write().unwrap_or_else(|e| e.into_inner());
    commit()?;
    d.apply(changes);
    Ok(())
}

impl super::Store {
    /// Checks the derived state against the entries (a full scan): every range's digest is the
    /// sum over its entries, and the index (with the pending changes) lists exactly the keys
    /// held; the journal and the stale set on disk are those in memory. For tests and for an
    /// operator who suspects the file: writes wait while it runs.
    pub fn check(&self) -> Result<(), KvError> {
        let derived = self.inner.derived.read().unwrap_or_else(|e| e.into_inner());
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let entries = txn.open_table(ENTRIES).map_err(storage)?;
        let index = txn.open_table(INDEX).map_err(storage)?;
        let mut sums = vec![0u128; DIGEST_RANGES as usize];
        let mut keys: Vec<Vec<Vec<u8>>> = vec![Vec::new(); DIGEST_RANGES as usize];
        for item in entries.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let range = crate::tables::range_of(k.value()) as usize;
            sums[range] = sums[range].wrapping_add(entry_hash(k.value(), v.value()));
            keys[range].push(k.value().to_vec());
        }
        let mut stored = vec![0u128; DIGEST_RANGES as usize];
        for item in txn.open_table(DIGESTS).map_err(storage)?.iter().map_err(storage)? {
            let (range, sum) = item.map_err(storage)?;
            stored[range.value() as usize] = decode_u128(sum.value())?;
        }
        let stale: Vec<u32> = derived.stale.ranges().collect();
        let stored_stale =
            match txn.open_table(crate::tables::META).map_err(storage)?.get(STALE).map_err(storage)? {
                Some(v) => Stale::decode(v.value())?,
                None => Stale::default(),
            };
        if stored_stale != derived.stale {
            return Err(storage("the stale digest set on disk is not the one in memory"));
        }
        let mut journal = vec![BTreeMap::new(); DIGEST_RANGES as usize];
        match txn.open_table(JOURNAL) {
            Ok(table) => {
                for item in table.iter().map_err(storage)? {
                    let (_, row) = item.map_err(storage)?;
                    let (range, composite, present) = decode_journal(row.value())?;
                    journal[range as usize].insert(composite.to_vec(), present);
                }
            }
            // A fold deletes it; the next batch makes it again.
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(storage(e)),
        }
        if journal != derived.pending {
            return Err(storage("the journal on disk is not the pending index changes in memory"));
        }
        for range in 0..DIGEST_RANGES {
            if derived.digests[range as usize] != sums[range as usize] {
                return Err(storage(format!("range {range}: the digest is not the sum of its entries")));
            }
            if stored[range as usize] != sums[range as usize] && !stale.contains(&range) {
                return Err(storage(format!("range {range}: the stored digest is behind, not marked stale")));
            }
            let listed = derived.range_keys(&index, range)?;
            let mut held = std::mem::take(&mut keys[range as usize]);
            held.sort();
            if listed != held {
                return Err(storage(format!(
                    "range {range}: the index lists {} keys, the range holds {}",
                    listed.len(),
                    held.len()
                )));
            }
        }
        Ok(())
    }
}
