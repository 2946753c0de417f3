//! The redb tables of a store and the helpers that keep them consistent: one write changes an
//! entry, its range's digest and the index together ([`Tables::replace`]), the last two through
//! the store's derived state (`store::derived`).

use std::collections::HashMap;

use redb::TableDefinition;
use sha2::{Digest, Sha256};

use crate::hlc::Hlc;
use crate::store::derived::Derived;
use crate::store::{DIGEST_RANGES, KvError, storage};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
pub(crate) const DIGESTS: TableDefinition<u32, &[u8]> = TableDefinition::new("digests");
pub(crate) const INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("index");
pub(crate) const TOMBSTONES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tombstones");
/// Entries a resync discarded that hold this site's own increments, kept until a peer's entry on
/// the same register shows those increments are still wanted (see `Store::discard_before`).
pub(crate) const SET_ASIDE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("set_aside");

/// Index changes not yet folded into [`INDEX`], in the order they were made: sequence number →
/// 1 (the key appeared) or 0 (it went) ‖ the index key. Appended at its end, so a batch of
/// creates adds rows to one page instead of one random index page each (see
/// `store::derived`).
pub(crate) const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");

/// The writable tables of one transaction that changes entries, and what the transaction changes
/// of the derived state (range digests, the index): [`Tables::replace`] keeps them true together;
/// [`Tables::finish`] writes what must be durable before the commit.
pub(crate) struct Tables<'t> {
    pub(crate) entries: redb::Table<'t, &'static [u8], &'static [u8]>,
    pub(crate) tombstones: redb::Table<'t, &'static [u8], &'static [u8]>,
    txn: &'t redb::WriteTransaction,
    /// Where index changes go: appended to the journal, or (once this transaction folded the
    /// journal) straight into the index.
    index: IndexSink<'t>,
    changes: Changes,
    flush_at: usize,
}

enum IndexSink<'t> {
    Journal(redb::Table<'t, u64, &'static [u8]>),
    Index(redb::Table<'t, &'static [u8], &'static [u8]>),
}

impl<'t> Tables<'t> {
    /// Opens the tables for a transaction on a store whose derived state is `derived`. With
    /// `fold`, the journal is first folded into the index, and this transaction's index changes
    /// go straight there (for transactions that change many keys at once, and when the journal
    /// has grown long).
    pub(crate) fn open(
        txn: &'t redb::WriteTransaction,
        derived: &Derived,
        fold: bool,
    ) -> Result<Tables<'t>, KvError> {
        let index = if fold {
            let mut index = txn.open_table(INDEX).map_err(storage)?;
            for (range, keys) in derived.pending.iter().enumerate() {
                for (composite, present) in keys {
                    let key = index_key(range as u32, composite);
                    if *present {
                        index.insert(key.as_slice(), [].as_slice()).map_err(storage)?;
                    } else {
                        index.remove(key.as_slice()).map_err(storage)?;
                    }
                }
            }
            txn.delete_table(JOURNAL).map_err(storage)?;
            IndexSink::Index(index)
        } else {
            IndexSink::Journal(txn.open_table(JOURNAL).map_err(storage)?)
        };
        Ok(Tables {
            entries: txn.open_table(ENTRIES).map_err(storage)?,
            tombstones: txn.open_table(TOMBSTONES).map_err(storage)?,
            txn,
            index,
            changes: Changes {
                deltas: HashMap::new(),
                index: Vec::new(),
                next_seq: derived.next_seq,
                folded: fold,
                stale: derived.stale.clone(),
            },
            flush_at: derived.flush_at,
        })
    }

    /// Replaces the encoded entry `old` at `composite` by `new` (`None`: absent), keeping the
    /// range digest and the index true in the same transaction.
    pub(crate) fn replace(
        &mut self,
        composite: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), KvError> {
        let range = range_of(composite);
        let mut delta = 0u128;
        if let Some(old) = old {
            delta = delta.wrapping_sub(entry_hash(composite, old));
        }
        match new {
            Some(new) => {
                delta = delta.wrapping_add(entry_hash(composite, new));
                self.entries.insert(composite, new).map_err(storage)?;
            }
            None => {
                self.entries.remove(composite).map_err(storage)?;
            }
        }
        let sum = self.changes.deltas.entry(range).or_insert(0);
        *sum = sum.wrapping_add(delta);
        // The index changes only when the key appears or goes: an overwrite (the common write)
        // touches the entry, nothing else on disk.
        if old.is_none() != new.is_none() {
            let key = index_key(range, composite);
            let present = new.is_some();

            match &mut self.index {
                IndexSink::Index(index) if present => {
                    index.insert(key.as_slice(), [].as_slice()).map_err(storage)?;
                }
                IndexSink::Index(index) => {
                    index.remove(key.as_slice()).map_err(storage)?;
                }
                IndexSink::Journal(journal) => {
                    let mut row = Vec::with_capacity(1 + key.len());
                    row.push(u8::from(present));
                    row.extend_from_slice(&key);
                    journal.insert(self.changes.next_seq, row.as_slice()).map_err(storage)?;
                    self.changes.next_seq += 1;
                    self.changes.index.push((range, composite.to_vec(), present));
                }
            }
        }
        Ok(())
    }

    /// Records, in the transaction, which ranges' stored digests are now behind (in `meta`);
    /// when they are many (or the journal was folded), writes their digests, `digests` being
    /// the derived state's before this transaction. Returns what to publish once committed.
    pub(crate) fn finish(
        mut self,
        meta: &mut redb::Table<&'static str, &'static [u8]>,
        digests: &[u128],
    ) -> Result<Changes, KvError> {
        let before = self.changes.stale.clone();
        for range in self.changes.deltas.keys() {
            self.changes.stale.insert(*range);
        }
        if self.changes.folded || self.changes.stale.len() >= self.flush_at {
            let mut table = self.txn.open_table(DIGESTS).map_err(storage)?;
            for range in self.changes.stale.ranges() {
                let delta = self.changes.deltas.get(&range).copied().unwrap_or(0);
                let sum = digests[range as usize].wrapping_add(delta);
                table.insert(range, sum.to_le_bytes().as_slice()).map_err(storage)?;
            }
            self.changes.stale = Stale::default();
        }
        if self.changes.stale != before {
            if self.changes.stale.is_empty() {
                meta.remove(STALE).map_err(storage)?;
            } else {
                meta.insert(STALE, self.changes.stale.encode().as_slice()).map_err(storage)?;
            }
        }
        Ok(self.changes)
    }
}

/// What one committed transaction changed of the derived state ([`Derived::apply`]).
pub(crate) struct Changes {
    /// What each range's digest moved by.
    pub(crate) deltas: HashMap<u32, u128>,
    /// Index changes appended to the journal, in order: range, composite key, present.
    pub(crate) index: Vec<(u32, Vec<u8>, bool)>,
    pub(crate) next_seq: u64,
    /// The journal was folded into the index (and emptied) first.
    pub(crate) folded: bool,
    /// The ranges whose stored digest is behind after it.
    pub(crate) stale: Stale,
}

/// The meta key of the ranges whose row in [`DIGESTS`] is behind (a bitmap of
/// `DIGEST_RANGES` bits); absent: none is.
pub(crate) const STALE: &str = "stale_digests";

/// A set of ranges, as a bitmap.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Stale {
    words: Vec<u64>,
    len: usize,
}

impl Stale {
    pub(crate) fn insert(&mut self, range: u32) {
        let (word, bit) = ((range / 64) as usize, range % 64);
        if self.words.len() <= word {
            self.words.resize(DIGEST_RANGES as usize / 64, 0);
        }
        if self.words[word] & (1 << bit) == 0 {
            self.words[word] |= 1 << bit;
            self.len += 1;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn ranges(&self) -> impl Iterator<Item = u32> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(i, w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| (i * 64 + b) as u32))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Stale, KvError> {
        if bytes.len() != DIGEST_RANGES as usize / 8 {
            return Err(KvError::Storage("corrupt stale digest set".into()));
        }
        let mut stale = Stale::default();
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            for b in 0..64 {
                if w & (1 << b) != 0 {
                    stale.insert((i * 64 + b) as u32);
                }
            }
        }
        Ok(stale)
    }
}

/// A journal row's range, composite key, and whether the key appeared (or went).
pub(crate) fn decode_journal(row: &[u8]) -> Result<(u32, &[u8], bool), KvError> {
    match row {
        [present @ (0 | 1), hi, lo, composite @ ..]
            if u32::from(u16::from_be_bytes([*hi, *lo])) < DIGEST_RANGES =>
        {
            Ok((u32::from(u16::from_be_bytes([*hi, *lo])), composite, *present == 1))
        }
        _ => Err(KvError::Storage("corrupt journal row".into())),
    }
}

pub(crate) fn index_key(range: u32, composite: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + composite.len());
    k.extend_from_slice(&(range as u16).to_be_bytes());
    k.extend_from_slice(composite);
    k
}

/// The range of the key-hash space a composite key falls in (`0..DIGEST_RANGES`).
pub fn range_of(composite: &[u8]) -> u32 {
    let h = Sha256::digest(composite);
    (u32::from(h[0]) << 4 | u32::from(h[1]) >> 4) % DIGEST_RANGES
}

/// What an entry adds to its range's digest.
pub(crate) fn entry_hash(composite: &[u8], encoded: &[u8]) -> u128 {
    let mut h = Sha256::new();
    h.update((composite.len() as u32).to_le_bytes());
    h.update(composite);
    h.update(encoded);
    let d = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&d[..16]);
    u128::from_le_bytes(first)
}

pub(crate) fn decode_u128(bytes: &[u8]) -> Result<u128, KvError> {
    bytes.try_into().map(u128::from_le_bytes).map_err(|_| KvError::Storage("corrupt digest".into()))
}

pub(crate) fn encode_hlc(hlc: Hlc) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&hlc.physical_ms.to_le_bytes());
    b[8..].copy_from_slice(&hlc.logical.to_le_bytes());
    b
}

pub(crate) fn decode_hlc(bytes: &[u8]) -> Result<Hlc, KvError> {
    let bad = || KvError::Storage("corrupt clock high-water mark".into());
    let physical: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
    let logical: [u8; 4] = bytes.get(8..12).and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
    Ok(Hlc { physical_ms: u64::from_le_bytes(physical), logical: u32::from_le_bytes(logical) })
}
