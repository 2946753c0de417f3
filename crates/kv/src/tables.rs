//! The redb tables of a store and the helpers that keep them consistent: one write changes an
//! entry, its range's digest and the index together ([`Tables::replace`]).

use redb::{ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

use crate::hlc::Hlc;
use crate::store::{DIGEST_RANGES, KvError, storage};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
pub(crate) const DIGESTS: TableDefinition<u32, &[u8]> = TableDefinition::new("digests");
pub(crate) const INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("index");
pub(crate) const TOMBSTONES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tombstones");
/// Entries a resync discarded that hold this site's own increments, kept until a peer's entry on
/// the same register shows those increments are still wanted (see `Store::discard_before`).
pub(crate) const SET_ASIDE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("set_aside");

/// The writable tables of one transaction, changed together by [`Tables::replace`].
pub(crate) struct Tables<'t> {
    pub(crate) entries: redb::Table<'t, &'static [u8], &'static [u8]>,
    pub(crate) digests: redb::Table<'t, u32, &'static [u8]>,
    pub(crate) index: redb::Table<'t, &'static [u8], &'static [u8]>,
    pub(crate) tombstones: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> Tables<'t> {
    pub(crate) fn open(txn: &'t redb::WriteTransaction) -> Result<Tables<'t>, KvError> {
        Ok(Tables {
            entries: txn.open_table(ENTRIES).map_err(storage)?,
            digests: txn.open_table(DIGESTS).map_err(storage)?,
            index: txn.open_table(INDEX).map_err(storage)?,
            tombstones: txn.open_table(TOMBSTONES).map_err(storage)?,
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
        let mut sum = match self.digests.get(range).map_err(storage)? {
            Some(v) => decode_u128(v.value())?,
            None => 0,
        };
        if let Some(old) = old {
            sum = sum.wrapping_sub(entry_hash(composite, old));
        }
        // The index row changes only when the key appears or goes: an overwrite (the common
        // write) touches the entry and the range's digest row, nothing else.
        match new {
            Some(new) => {
                sum = sum.wrapping_add(entry_hash(composite, new));
                self.entries.insert(composite, new).map_err(storage)?;
                if old.is_none() {
                    self.index
                        .insert(index_key(range, composite).as_slice(), [].as_slice())
                        .map_err(storage)?;
                }
            }
            None => {
                self.entries.remove(composite).map_err(storage)?;
                self.index.remove(index_key(range, composite).as_slice()).map_err(storage)?;
            }
        }
        self.digests.insert(range, sum.to_le_bytes().as_slice()).map_err(storage)?;
        Ok(())
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
