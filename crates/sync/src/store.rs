//! What replication needs from storage, as a trait: atoll-kv's [`Store`] implements it, and a
//! test can wrap it to inject failures.

use std::future::Future;

use anyhow::Result;
use atoll_kv::{Entry, Hlc, Store};

/// The storage side of replication.
pub trait SyncStore: Send + Sync {
    /// This site's id.
    fn site(&self) -> &str;
    /// A fresh HLC reading (greater than every stamp in the store).
    fn now(&self) -> Hlc;
    /// The digest of every leaf range, in order ([`atoll_kv::DIGEST_RANGES`] of them).
    fn leaf_digests(&self) -> Result<Vec<u128>>;
    /// The composite keys in one leaf range with their entry hashes.
    fn leaf_items(&self, leaf: u32) -> Result<Vec<(Vec<u8>, u128)>>;
    /// The entries at these keys (those that exist).
    fn entries_at(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Entry)>>;
    /// Merges entries from another site; how many changed this store.
    fn merge(&self, entries: Vec<(Vec<u8>, Entry)>) -> impl Future<Output = Result<usize>> + Send;
    /// Removes tombstones last changed before `before`; how many went.
    fn collect_tombstones(&self, before: Hlc) -> Result<usize>;
    /// Removes every entry last changed before `before` (resync after being cut off).
    fn discard_before(&self, before: Hlc) -> Result<usize>;
    /// The watermark this site last resynced from, if it ever had to.
    fn resynced_from(&self) -> Result<Option<Hlc>>;
    /// Records [`SyncStore::resynced_from`], durably.
    fn set_resynced_from(&self, at: Hlc) -> Result<()>;
}

impl SyncStore for Store {
    fn site(&self) -> &str {
        Store::site(self)
    }

    fn now(&self) -> Hlc {
        self.clock().now()
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

    async fn merge(&self, entries: Vec<(Vec<u8>, Entry)>) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        Ok(Store::merge(self, entries).await?)
    }

    fn collect_tombstones(&self, before: Hlc) -> Result<usize> {
        Ok(Store::collect_tombstones(self, before)?)
    }

    fn discard_before(&self, before: Hlc) -> Result<usize> {
        Ok(Store::discard_before(self, before)?)
    }

    fn resynced_from(&self) -> Result<Option<Hlc>> {
        let Some(bytes) = self.meta("resynced_from")? else { return Ok(None) };
        let bytes: [u8; 12] = bytes.try_into().map_err(|_| anyhow::anyhow!("corrupt resynced_from"))?;
        let (p, l) = bytes.split_at(8);
        Ok(Some(Hlc {
            physical_ms: u64::from_le_bytes(p.try_into()?),
            logical: u32::from_le_bytes(l.try_into()?),
        }))
    }

    fn set_resynced_from(&self, at: Hlc) -> Result<()> {
        let mut bytes = at.physical_ms.to_le_bytes().to_vec();
        bytes.extend_from_slice(&at.logical.to_le_bytes());
        Ok(self.set_meta("resynced_from", &bytes)?)
    }
}
