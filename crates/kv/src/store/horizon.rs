//! The replication horizon in the store: tombstone collection and its watermark, and the resync a
//! site cut off past the horizon goes through (discard what may have been deleted elsewhere,
//! then pull the rest again).

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{KvError, Store, storage};
use crate::codec;
use crate::entry::{Entry, Stamp};
use crate::hlc::{Clock, Hlc};
use crate::identity::Identity;
use crate::tables::{Changes, META, SET_ASIDE, Tables, decode_hlc, encode_hlc};
use std::sync::atomic::Ordering;

impl Store {
    /// Removes tombstones (deleted keys without increments) that **arrived at this site** before
    /// the HLC reading `before`, and returns how many went. This is the separate, explicit
    /// collection step: the store never drops a tombstone by itself, and replication decides when
    /// `before` is safe (every known site completed a session with this site that started after
    /// the tombstone arrived here). Runs as its own transaction; digests follow, and so does the
    /// collection watermark ([`Store::collected`]): it can never be behind what was removed.
    pub fn collect_tombstones(&self, before: Hlc) -> Result<usize, KvError> {
        let txn = self.inner.db.begin_write().map_err(storage)?;
        let mut removed = 0;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let collected = read_collected(&meta)?;
            meta.insert(COLLECTED, encode_hlc(collected.max(before)).as_slice()).map_err(storage)?;
        }
        let derived = {
            let mut tables = self.tables(&txn)?;
            let mut found = Vec::new();
            for item in tables.tombstones.iter().map_err(storage)? {
                let (k, arrived) = item.map_err(storage)?;
                if decode_hlc(arrived.value())? < before {
                    found.push(k.value().to_vec());
                }
            }
            for composite in found {
                let encoded =
                    tables.entries.get(composite.as_slice()).map_err(storage)?.map(|v| v.value().to_vec());
                if let Some(encoded) = encoded
                    && codec::decode(&encoded).map_err(storage)?.is_tombstone()
                {
                    tables.replace(&composite, Some(&encoded), None)?;
                    removed += 1;
                }
                tables.tombstones.remove(composite.as_slice()).map_err(storage)?;
            }
            self.finish(&txn, tables)?
        };
        {
            // Set-aside increments whose register no known site still holds (every site had a
            // session with this one since they were set aside) are gone with it.
            let mut aside = txn.open_table(SET_ASIDE).map_err(storage)?;
            let mut expired = Vec::new();
            for item in aside.iter().map_err(storage)? {
                let (k, row) = item.map_err(storage)?;
                if decode_aside(row.value())?.at < before {
                    expired.push(k.value().to_vec());
                }
            }
            for k in expired {
                aside.remove(k.as_slice()).map_err(storage)?;
            }
            if aside.is_empty().map_err(storage)? {
                self.inner.aside.store(false, Ordering::Relaxed);
            }
        }
        super::derived::commit(&self.inner.derived, derived, move || txn.commit().map_err(storage))?;
        Ok(removed)
    }

    /// The tombstone collection watermark: tombstones that arrived before it are gone.
    pub fn collected(&self) -> Result<Hlc, KvError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        read_collected(&txn.open_table(META).map_err(storage)?)
    }

    /// Starts a resync from the collection watermark `before` of a peer that cut this site off:
    /// removes every entry whose register was written before `before` (its increments with it),
    /// tombstone or not, since it may be a value or a counter deleted elsewhere whose tombstone
    /// is gone; and, in the same transaction, records that the data now reaches back only to
    /// `before` ([`Identity::since`]) and that a resync is under way
    /// ([`Store::resync_began`]). Returns how many entries went.
    ///
    /// An entry goes by its register's stamp, not its last change: increments made recently on
    /// top of a register deleted (and collected) elsewhere would otherwise bring it back, and a
    /// counter keeps one running total per site, so its increments after such a delete cannot be
    /// told from those before it. This site's own contributions to discarded entries are set
    /// aside, and put back when a peer's entry on the same register arrives (see the writer):
    /// all of them if this site was counted when tombstones were collected (every collected
    /// delete reached it); if it was not (`uncounted`: cut off past the horizon, or away while
    /// its resync was pending), only those on a register with a real stamp (a value, or a
    /// counter on a delete), which no other register shares. A counter never set is on the zero
    /// register at every site, before and after a delete collected meanwhile: its rows are
    /// dropped. And the writer id moves to a new epoch, so increments made from now on never
    /// fall into a slot a peer holds higher.
    pub fn discard_before(&self, before: Hlc, uncounted: bool) -> Result<usize, KvError> {
        // A full scan: only for resync after being cut off.
        let txn = self.inner.db.begin_write().map_err(storage)?;
        let mut removed = 0;
        let mut identity;
        let began;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            // As stored: a resync or new incarnation committed just before changed it.
            identity = Identity::load(&meta)?;
            identity.since = identity.since.max(before);
            identity.writer_epoch = identity.writer_epoch.wrapping_add(1);
            identity.save(&mut meta)?;
            began = begin_resync(&mut meta, &self.inner.clock)?;
        }
        let derived = {
            let mut tables = self.tables(&txn)?;
            let mut aside = txn.open_table(SET_ASIDE).map_err(storage)?;
            if uncounted {
                // Rows on the zero register from an earlier discard: a delete collected since
                // may have removed them.
                let mut zero = Vec::new();
                for item in aside.iter().map_err(storage)? {
                    let (k, row) = item.map_err(storage)?;
                    if !provable(&decode_aside(row.value())?.entry, &identity.writer()) {
                        zero.push(k.value().to_vec());
                    }
                }
                for k in zero {
                    aside.remove(k.as_slice()).map_err(storage)?;
                }
            }
            let own = identity.writer();
            let mut found = Vec::new();
            for item in tables.entries.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                let entry = codec::decode(v.value()).map_err(storage)?;
                if entry.stamp.hlc < before {
                    found.push((k.value().to_vec(), v.value().to_vec(), entry));
                }
            }
            for (composite, encoded, entry) in found {
                tables.replace(&composite, Some(&encoded), None)?;
                tables.tombstones.remove(composite.as_slice()).map_err(storage)?;
                removed += 1;
                if (uncounted && !provable(&entry, &own))
                    || !entry.counter.keys().any(|w| Identity::same_site(w, &own))
                {
                    continue;
                }
                let kept = match aside.get(composite.as_slice()).map_err(storage)? {
                    Some(row) => decode_aside(row.value())?.entry.merge(&entry),
                    None => entry,
                };
                let row = Aside { at: began, entry: kept };
                aside.insert(composite.as_slice(), row.encode().as_slice()).map_err(storage)?;
            }
            drop(aside);
            self.finish(&txn, tables)?
        };
        // Before the commit: a batch the writer commits right after looks for set-aside rows
        // (it reads the flag, and the writer id, once it holds the write lock).
        self.inner.aside.store(true, Ordering::Relaxed);
        super::derived::commit(&self.inner.derived, derived, || {
            self.commit_with_writer(txn, identity.writer())
        })?;
        *self.inner.identity.write().unwrap_or_else(|e| e.into_inner()) = identity;
        *self.inner.resync.lock().unwrap_or_else(|e| e.into_inner()) = Some(began);
        Ok(removed)
    }

    /// When the resync under way began (this store's clock), if one is.
    pub fn resync_began(&self) -> Result<Option<Hlc>, KvError> {
        Ok(*self.inner.resync.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records that the resync is finished: a full anti-entropy session with a peer that accepts
    /// this site completed after it started. `since` stays the watermark it discarded to (a peer
    /// with a lower watermark must not vouch for more).
    pub fn finish_resync(&self) -> Result<(), KvError> {
        let txn = self.inner.db.begin_write().map_err(storage)?;
        txn.open_table(META).map_err(storage)?.remove(RESYNCING).map_err(storage)?;
        txn.commit().map_err(storage)?;
        *self.inner.resync.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }
}

impl Store {
    /// The tables of a transaction that may change many keys: the journal is folded first and
    /// its index changes go straight to the index.
    fn tables<'t>(&self, txn: &'t redb::WriteTransaction) -> Result<Tables<'t>, KvError> {
        Tables::open(txn, &self.inner.derived.read().unwrap_or_else(|e| e.into_inner()), true)
    }

    /// [`Tables::finish`] in `txn`.
    fn finish(&self, txn: &redb::WriteTransaction, tables: Tables<'_>) -> Result<Changes, KvError> {
        let mut meta = txn.open_table(META).map_err(storage)?;
        tables.finish(&mut meta, &self.inner.derived.read().unwrap_or_else(|e| e.into_inner()).digests)
    }
}

const COLLECTED: &str = "collected";
const RESYNCING: &str = "resyncing";

/// Marks a resync under way from now, unless one already is (it keeps its start); returns the
/// start.
pub(super) fn begin_resync(meta: &mut redb::Table<&str, &[u8]>, clock: &Clock) -> Result<Hlc, KvError> {
    if let Some(began) = read_resync(meta)? {
        return Ok(began);
    }
    let began = clock.now();
    meta.insert(RESYNCING, encode_hlc(began).as_slice()).map_err(storage)?;
    // The clock never reads below it again, even after a crash and a clock stepped back.
    meta.insert("hlc", encode_hlc(began).as_slice()).map_err(storage)?;
    Ok(began)
}

/// Whether a peer's entry could show that `entry`'s register is still the one this site saw,
/// had this site missed a delete: a real stamp (no other register shares it), or, on the zero
/// register, other sites' contributions the peer must hold at least as high (a counter made
/// afresh after a delete starts them again from nothing). A counter only this site ever
/// incremented, on the zero register, proves nothing.
fn provable(entry: &Entry, writer: &str) -> bool {
    entry.stamp != Stamp::zero() || entry.counter.keys().any(|w| !Identity::same_site(w, writer))
}

/// A set-aside row: this site's contributions to an entry a resync discarded.
pub(super) struct Aside {
    /// When it was set aside (this store's clock): it goes when collection passes it.
    pub(super) at: Hlc,
    /// The entry as it was discarded.
    pub(super) entry: Entry,
}

impl Aside {
    fn encode(&self) -> Vec<u8> {
        let mut row = encode_hlc(self.at).to_vec();
        row.extend(codec::encode(&self.entry));
        row
    }
}

pub(super) fn decode_aside(row: &[u8]) -> Result<Aside, KvError> {
    let bad = || KvError::Storage("corrupt set-aside row".into());
    Ok(Aside {
        at: decode_hlc(row.get(..12).ok_or_else(bad)?)?,
        entry: codec::decode(row.get(12..).ok_or_else(bad)?).map_err(storage)?,
    })
}

/// The collection watermark stored under `"collected"` (zero before the first collection).
fn read_collected(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Hlc, KvError> {
    match meta.get(COLLECTED).map_err(storage)? {
        Some(v) => decode_hlc(v.value()),
        None => Ok(Hlc::ZERO),
    }
}

/// When the resync under way began, if one is: the HLC stored under `"resyncing"`.
pub(super) fn read_resync(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<Hlc>, KvError> {
    let Some(v) = meta.get(RESYNCING).map_err(storage)? else { return Ok(None) };
    Ok(Some(decode_hlc(v.value())?))
}
