//! What replication needs from storage, as a trait: atoll-kv's [`Store`] implements it, and a
//! test can wrap it to inject failures.

use std::future::Future;

use anyhow::Result;
use atoll_kv::{Entry, Hlc, Identity, Store};

/// The storage side of replication.
pub trait SyncStore: Send + Sync {
    /// Who this store is (name, incarnation, boot, how far back its data reaches).
    fn identity(&self) -> Identity;
    /// A fresh HLC reading (greater than every stamp in the store).
    fn now(&self) -> Hlc;
    /// The clock's high-water mark as of the last durable commit.
    fn durable_hlc(&self) -> Hlc;
    /// The wall clock the store's clock reads (unix ms).
    fn wall_ms(&self) -> u64;
    /// Waits until every write submitted before is committed; the durable clock after it.
    fn barrier(&self) -> impl Future<Output = Result<Hlc>> + Send;
    /// The digest of every leaf range, in order ([`atoll_kv::DIGEST_RANGES`] of them).
    fn leaf_digests(&self) -> Result<Vec<u128>>;
    /// The composite keys in one leaf range with their entry hashes.
    fn leaf_items(&self, leaf: u32) -> Result<Vec<(Vec<u8>, u128)>>;
    /// The entries at these keys (those that exist).
    fn entries_at(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Entry)>>;
    /// Merges entries from another site; how many changed this store. Refuses the whole batch,
    /// merging nothing, if an entry was changed at or after `refuse_from` (a clock past the bound).
    fn merge(
        &self,
        entries: Vec<(Vec<u8>, Entry)>,
        refuse_from: Hlc,
    ) -> impl Future<Output = Result<usize>> + Send;
    /// Removes tombstones that arrived before `before`, recording the watermark; how many went.
    fn collect_tombstones(&self, before: Hlc) -> Result<usize>;
    /// The collection watermark reached so far (durable).
    fn collected(&self) -> Result<Hlc>;
    /// Starts a resync from `before`: removes every entry a delete collected elsewhere may have
    /// removed (see `atoll_kv::Store::discard_before`; `uncounted`: this site was cut off).
    fn discard_before(&self, before: Hlc, uncounted: bool) -> Result<usize>;
    /// When the resync under way began (this store's clock), if one is.
    fn resync_began(&self) -> Result<Option<Hlc>>;
    /// Records that the resync is finished.
    fn finish_resync(&self) -> Result<()>;
    /// Takes a new incarnation (this data dir is an older copy of itself).
    fn reincarnate(&self) -> Result<Identity>;
    /// Replication's durable records whose names start with `prefix`.
    fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// Writes one durable record.
    fn save_record(&self, name: &str, value: &[u8]) -> Result<()>;
    /// Closes the store to guests (`Some(reason)`: to their writes only, or to reads too) or
    /// opens it again.
    fn set_gate(&self, reason: Option<String>, writes_only: bool);
    /// Merged tombstones stamped before `floor`, for keys the store does not hold, are not stored.
    fn set_tombstone_floor(&self, floor: Hlc);
}

/// Why a merge was refused: an entry stamped past the clock bound.
#[derive(Debug, thiserror::Error)]
#[error("an entry changed at {stamp} is past this site's clock bound ({bound})")]
pub struct AheadOfClock {
    /// The entry's last change.
    pub stamp: Hlc,
    /// The bound.
    pub bound: Hlc,
}

impl SyncStore for Store {
    fn identity(&self) -> Identity {
        Store::identity(self)
    }

    fn now(&self) -> Hlc {
        self.clock().now()
    }

    fn durable_hlc(&self) -> Hlc {
        Store::durable_hlc(self)
    }

    fn wall_ms(&self) -> u64 {
        self.clock().wall()
    }

    async fn barrier(&self) -> Result<Hlc> {
        Ok(Store::barrier(self).await?)
    }

    fn leaf_digests(&self) -> Result<Vec<u128>> {
        Ok(self.digests()?)
    }

    fn leaf_items(&self, leaf: u32) -> Result<Vec<(Vec<u8>, u128)>> {
        Ok(self.range_items(leaf)?)
    }

    fn entries_at(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Entry)>> {
        Ok(Store::entries_at(self, keys)?)
    }

    async fn merge(&self, entries: Vec<(Vec<u8>, Entry)>, refuse_from: Hlc) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        if let Some((_, e)) = entries.iter().find(|(_, e)| e.changed.hlc >= refuse_from) {
            return Err(AheadOfClock { stamp: e.changed.hlc, bound: refuse_from }.into());
        }
        Ok(Store::merge(self, entries).await?)
    }

    fn collect_tombstones(&self, before: Hlc) -> Result<usize> {
        Ok(Store::collect_tombstones(self, before)?)
    }

    fn collected(&self) -> Result<Hlc> {
        Ok(Store::collected(self)?)
    }

    fn discard_before(&self, before: Hlc, uncounted: bool) -> Result<usize> {
        Ok(Store::discard_before(self, before, uncounted)?)
    }

    fn resync_began(&self) -> Result<Option<Hlc>> {
        Ok(Store::resync_began(self)?)
    }

    fn finish_resync(&self) -> Result<()> {
        Ok(Store::finish_resync(self)?)
    }

    fn reincarnate(&self) -> Result<Identity> {
        Ok(Store::reincarnate(self)?)
    }

    fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self.meta_list(prefix)?)
    }

    fn save_record(&self, name: &str, value: &[u8]) -> Result<()> {
        Ok(self.set_meta(name, value)?)
    }

    fn set_gate(&self, reason: Option<String>, writes_only: bool) {
        Store::set_gate(self, reason, writes_only)
    }

    fn set_tombstone_floor(&self, floor: Hlc) {
        Store::set_tombstone_floor(self, floor)
    }
}
