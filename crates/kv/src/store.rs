//! The site's key-value store on redb, with group commit and range digests.
//!
//! Layout (store format version 2), in one redb file:
//! - `meta`: `"format"` → u64, `"hlc"` → the highest HLC issued (physical u64, logical u32).
//! - `entries`: composite key → encoded [`Entry`] (see [`crate::codec`]). The composite key is
//!   `len(app) app len(bucket) bucket key`, so one app's keys can never be named by another app,
//!   whatever bucket or key it passes, and each (app, bucket) is one contiguous range.
//! - `digests`: range (the first 12 bits of SHA-256 of the composite key; 4096 ranges) → the
//!   range's digest: the 16-byte wrapping sum, over the range's entries, of the first 16 bytes of
//!   SHA-256(composite key ‖ encoded entry). Updated in O(1) per write (subtract the old entry's
//!   hash, add the new one's), in the write's transaction. Two stores holding the same entries
//!   have equal digests, whatever order they were written in. Small: read whole in ~1 ms.
//! - `index`: range (2 bytes, big-endian) ‖ composite key → nothing: one range's keys are one
//!   scan, which is what replication lists when a range's digest differs (their hashes are
//!   computed from `entries` then). An index row changes only when its key appears or is
//!   removed, so an overwrite (the common write) changes one `entries` row and one digest row; an
//!   index row holding the hash would change on every write (measured: ~35 % fewer writes/s).
//! - `tombstones`: composite key of each entry that is a tombstone → the HLC reading of *this
//!   site* when the tombstone arrived here (by a local delete or a merge). Collection goes by
//!   arrival, not by the tombstone's own stamp: a tombstone stamped long ago by another site can
//!   arrive late, after the replication sessions that the collection rule counts on.
//!
//! Writes go through one writer thread that takes every write waiting (up to
//! [`StoreConfig::max_batch`]) into one transaction, commits it durably, and only then answers each
//! writer: acknowledged means durable, at the cost of one fsync per batch, not per write.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use std::sync::{Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::codec;
use crate::entry::{Entry, EntryError, SiteId, Stamp};
use crate::hlc::{Clock, Hlc};
use crate::identity::Identity;
use crate::tables::{
    DIGESTS, ENTRIES, INDEX, META, TOMBSTONES, Tables, decode_hlc, decode_u128, encode_hlc, entry_hash,
    index_key,
};

/// The store format this build reads and writes (format 2, before incarnations, is upgraded in
/// place when opened).
pub const STORE_FORMAT: u64 = 3;
/// How many ranges the key-hash space is cut into for digests.
pub const DIGEST_RANGES: u32 = 4096;

/// Limits on what a guest may store. Oversize requests get [`KvError::TooLarge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Longest key, in bytes.
    pub max_key: usize,
    /// Largest value, in bytes.
    pub max_value: usize,
    /// Longest bucket identifier, in bytes.
    pub max_bucket: usize,
    /// Most keys in one page of a listing.
    pub max_page: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds { max_key: 1024, max_value: 1 << 20, max_bucket: 255, max_page: 1000 }
    }
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This site's name. The stamps of its writes and its counter contributions carry its
    /// *writer id*, the name plus the data dir's incarnation ([`Identity::writer`]).
    pub site: SiteId,
    /// Limits on keys, values, buckets and pages.
    pub bounds: Bounds,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// Most writes waiting for the writer; beyond it writers wait for room.
    pub queue: usize,
    /// Most committed batches the change feed ([`Store::changes`]) buffers for a slow reader;
    /// a reader further behind is told how many it missed.
    pub change_feed: usize,
}

impl StoreConfig {
    /// Defaults for site `site`.
    pub fn new(site: impl Into<SiteId>) -> StoreConfig {
        StoreConfig {
            site: site.into(),
            bounds: Bounds::default(),
            max_batch: 1024,
            queue: 8192,
            change_feed: 4096,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// A key, value, bucket name or page size is over its bound.
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The operation does not apply to the key's value.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The database could not be read or written (disk full, corrupt file, ...).
    #[error("storage failure: {0}")]
    Storage(String),
    /// The database has a format this build does not read.
    #[error("the store has format version {found}, this build reads version {STORE_FORMAT}")]
    UnknownFormat {
        /// The version found.
        found: u64,
    },
    /// The store is shut down.
    #[error("the store is closed")]
    Closed,
    /// Guests may not use the store now (the site is resyncing, or its clock is off); the text
    /// names the cause.
    #[error("{0}")]
    Unavailable(String),
}

pub(crate) fn storage(e: impl std::fmt::Display) -> KvError {
    KvError::Storage(e.to_string())
}

/// One app's bucket: where a guest's keys live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    app: String,
    bucket: String,
}

impl Namespace {
    /// The bucket `identifier` of `app` (`""` and `"default"` are the default bucket).
    pub fn new(app: &str, identifier: &str, bounds: &Bounds) -> Result<Namespace, KvError> {
        let bucket = if identifier.is_empty() { "default" } else { identifier };
        check("bucket identifier", bucket.len(), bounds.max_bucket.min(255))?;
        check("app name", app.len(), 255)?;
        Ok(Namespace { app: app.to_owned(), bucket: bucket.to_owned() })
    }

    /// The app.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Splits a composite key (as in [`Change`] and [`Store::entries`]) into its namespace and key.
    pub fn split(composite: &[u8]) -> Option<(Namespace, &[u8])> {
        let (&app_len, rest) = composite.split_first()?;
        let app = std::str::from_utf8(rest.get(..app_len as usize)?).ok()?;
        let rest = &rest[app_len as usize..];
        let (&bucket_len, rest) = rest.split_first()?;
        let bucket = std::str::from_utf8(rest.get(..bucket_len as usize)?).ok()?;
        let key = &rest[bucket_len as usize..];
        Some((Namespace { app: app.to_owned(), bucket: bucket.to_owned() }, key))
    }

    fn prefix(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(2 + self.app.len() + self.bucket.len());
        p.push(self.app.len() as u8);
        p.extend_from_slice(self.app.as_bytes());
        p.push(self.bucket.len() as u8);
        p.extend_from_slice(self.bucket.as_bytes());
        p
    }

    /// The composite key of `key` in this namespace.
    pub fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.prefix();
        k.extend_from_slice(key);
        k
    }
}

fn check(what: &'static str, size: usize, limit: usize) -> Result<(), KvError> {
    if size > limit { Err(KvError::TooLarge { what, size, limit }) } else { Ok(()) }
}

/// A change to one key, applied by the writer.
#[derive(Debug, Clone)]
pub enum Write {
    /// Set a value.
    Set(Vec<u8>),
    /// Delete (write a tombstone).
    Delete,
    /// Add to the counter.
    Increment(i64),
    /// Set `new` if the current value equals `expected` (`None`: absent); atomic at this site.
    CompareAndSwap {
        /// The value expected now.
        expected: Option<Vec<u8>>,
        /// The value to set.
        new: Vec<u8>,
    },
}

/// What a write returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Set or delete done.
    Done,
    /// The counter's new total.
    Total(i64),
    /// Whether the compare-and-swap swapped.
    Swapped(bool),
}

/// Where a committed change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A write made at this site.
    Local,
    /// An entry received from another site that changed this store.
    Merged,
}

/// One committed change to a key, as published on the change feed ([`Store::changes`]).
#[derive(Debug, Clone)]
pub struct Change {
    /// The composite key (see [`Namespace::split`]).
    pub key: Vec<u8>,
    /// The entry after the change.
    pub entry: Entry,
    /// Where it came from.
    pub origin: Origin,
}

/// One page of a key listing: the keys, and the cursor of the next page if there is one.
pub type KeyPage = (Vec<Vec<u8>>, Option<Vec<u8>>);

type Reply = tokio::sync::oneshot::Sender<Vec<Result<Written, KvError>>>;

/// What the writer applies to one composite key.
enum Op {
    /// A write made here.
    Local(Write),
    /// An entry received from another site, merged in.
    Merge(Entry),
}

struct Job {
    writes: Vec<(Vec<u8>, Op)>,
    reply: Reply,
}

/// The store. Cheap to clone; reads run on the caller's thread, writes through the writer thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    jobs: std::sync::Mutex<Option<std::sync::mpsc::SyncSender<Job>>>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
    clock: Arc<Clock>,
    config: StoreConfig,
    feed: tokio::sync::broadcast::Sender<Arc<Vec<Change>>>,
    /// Who this store is (a cache of the meta table; changed only with it).
    identity: RwLock<Identity>,
    /// The writer id stamped on local writes, read by the writer thread at each batch.
    writer_id: Arc<RwLock<String>>,
    /// The clock's high-water mark as of the last durable commit.
    durable: Arc<Mutex<Hlc>>,
    /// Why guests may not use the store now, if they may not, and whether they may still read.
    gate: RwLock<Option<(String, bool)>>,
    /// Merged tombstones stamped before this, for keys this store does not hold, are not stored
    /// ([`Store::set_tombstone_floor`]).
    floor: Arc<Mutex<Hlc>>,
    /// When the resync under way began, if one is (a cache of the meta table).
    resync: Mutex<Option<Hlc>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

impl Store {
    /// Opens (or creates) the store at `path`, checks its format, restores the clock's high-water
    /// mark, and starts the writer thread.
    pub fn open(path: &Path, config: StoreConfig, clock: Clock) -> Result<Store, KvError> {
        Store::start(Database::create(path).map_err(storage)?, config, clock)
    }

    /// [`Store::open`] on another redb storage backend: in memory, or one that injects I/O
    /// failures in tests.
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        config: StoreConfig,
        clock: Clock,
    ) -> Result<Store, KvError> {
        Store::start(Database::builder().create_with_backend(backend).map_err(storage)?, config, clock)
    }

    fn start(db: Database, config: StoreConfig, clock: Clock) -> Result<Store, KvError> {
        let txn = db.begin_write().map_err(storage)?;
        let identity;
        let resync;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let format = meta.get("format").map_err(storage)?.map(|v| v.value().to_vec());
            let fresh = format.is_none();
            if let Some(bytes) = format {
                let found = bytes.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX);
                // Format 2 differs only by having no identity: it gets one below.
                if found != STORE_FORMAT && found != 2 {
                    return Err(KvError::UnknownFormat { found });
                }
            }
            meta.insert("format", STORE_FORMAT.to_le_bytes().as_slice()).map_err(storage)?;
            if let Some(hlc) = meta.get("hlc").map_err(storage)? {
                clock.observe(decode_hlc(hlc.value())?);
            }
            identity = Identity::open(&mut meta, &config.site, fresh, &clock)?;
            resync = read_resync(&meta)?;
            // What this boot reports as its clock at open is on disk before anyone hears it, so
            // the next boot opens at or after it (peers check exactly that).
            meta.insert("hlc", encode_hlc(identity.opened_at).as_slice()).map_err(storage)?;
            txn.open_table(ENTRIES).map_err(storage)?;
            txn.open_table(DIGESTS).map_err(storage)?;
            txn.open_table(INDEX).map_err(storage)?;
            txn.open_table(TOMBSTONES).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;

        let db = Arc::new(db);
        let (feed, _) = tokio::sync::broadcast::channel(config.change_feed.max(1));
        let clock = Arc::new(clock);
        let (jobs, queue) = std::sync::mpsc::sync_channel(config.queue.max(1));
        let writer_id = Arc::new(RwLock::new(identity.writer()));
        let durable = Arc::new(Mutex::new(identity.opened_at));
        let floor = Arc::new(Mutex::new(Hlc::ZERO));
        let writer = {
            let shared = Shared { site: writer_id.clone(), durable: durable.clone(), floor: floor.clone() };
            let (db, clock, max_batch, feed) =
                (db.clone(), clock.clone(), config.max_batch.max(1), feed.clone());
            std::thread::Builder::new()
                .name("atoll-kv-writer".into())
                .spawn(move || write_loop(&db, &clock, &shared, max_batch, &queue, &feed))
                .map_err(storage)?
        };
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                jobs: std::sync::Mutex::new(Some(jobs)),
                writer: std::sync::Mutex::new(Some(writer)),
                clock,
                config,
                feed,
                identity: RwLock::new(identity),
                writer_id,
                durable,
                gate: RwLock::new(None),
                floor,
                resync: Mutex::new(resync),
            }),
        })
    }

    /// This store's site name.
    pub fn site(&self) -> &str {
        &self.inner.config.site
    }

    /// Who this store is: name, incarnation, boot count, and how far its data reaches back.
    pub fn identity(&self) -> Identity {
        self.inner.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The clock's high-water mark as of the last durable commit: every stamp this store ever
    /// sent anywhere is at most this (changes are published after their commit).
    pub fn durable_hlc(&self) -> Hlc {
        *self.inner.durable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a new random incarnation, durably, and stamps every later write with it: what a site
    /// does when it learns that its data dir is an older copy of itself (a restore), so that it
    /// never reuses a stamp or a counter contribution it made before. In the same transaction the
    /// store starts a resync ([`Store::resyncing`]): guests wait until it is finished. Returns the
    /// new identity.
    pub fn reincarnate(&self) -> Result<Identity, KvError> {
        let txn = self.inner.db.begin_write().map_err(storage)?;
        let began;
        let next = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut next = self.identity();
            next.previous = next.incarnation;
            next.incarnation = Identity::random_incarnation(next.incarnation);
            next.save(&mut meta)?;
            // An older copy may hold what its peers deleted since: it pulls everything (and
            // drops what its peers tell it to) before guests use it again.
            began = begin_resync(&mut meta, &self.inner.clock)?;
            next
        };
        txn.commit().map_err(storage)?;
        *self.inner.resync.lock().unwrap_or_else(|e| e.into_inner()) = Some(began);
        *self.inner.writer_id.write().unwrap_or_else(|e| e.into_inner()) = next.writer();
        *self.inner.identity.write().unwrap_or_else(|e| e.into_inner()) = next.clone();
        Ok(next)
    }

    /// Tombstones merged from other sites for keys this store does not hold are not stored when
    /// stamped before `floor`: replication sets it below its collection watermark, where every
    /// site is known to have held such a tombstone, so storing it again would only make sites
    /// that collect at different moments echo it back and forth (see atoll-sync's ALGORITHM.md).
    pub fn set_tombstone_floor(&self, floor: Hlc) {
        *self.inner.floor.lock().unwrap_or_else(|e| e.into_inner()) = floor;
    }

    /// Closes the store to guests (`Some(reason)`) or opens it again (`None`): to their writes
    /// only (`writes_only`), or to their reads too. Replication and the host's own records are not
    /// affected; a guest sees [`KvError::Unavailable`].
    pub fn set_gate(&self, reason: Option<String>, writes_only: bool) {
        *self.inner.gate.write().unwrap_or_else(|e| e.into_inner()) = reason.map(|r| (r, writes_only));
    }

    /// `Err(Unavailable(reason))` while guests may not read the store.
    pub fn gate(&self) -> Result<(), KvError> {
        match &*self.inner.gate.read().unwrap_or_else(|e| e.into_inner()) {
            Some((reason, false)) => Err(KvError::Unavailable(reason.clone())),
            _ => Ok(()),
        }
    }

    /// `Err(Unavailable(reason))` while guests may not write to the store.
    pub fn write_gate(&self) -> Result<(), KvError> {
        match &*self.inner.gate.read().unwrap_or_else(|e| e.into_inner()) {
            Some((reason, _)) => Err(KvError::Unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    /// Subscribes to the change feed: every committed change, one batch per commit, published
    /// after the commit is durable. Publishing never waits for a reader: a reader more than
    /// [`StoreConfig::change_feed`] batches behind gets `Lagged` and must catch up another way
    /// (replication falls back to anti-entropy).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<Vec<Change>>> {
        self.inner.feed.subscribe()
    }

    /// The bounds guests are held to.
    pub fn bounds(&self) -> &Bounds {
        &self.inner.config.bounds
    }

    /// The clock stamping this store's writes.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The value of `key`: its bytes, a counter's total as decimal ASCII, or `None`.
    pub fn get(&self, ns: &Namespace, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        check("key", key.len(), self.bounds().max_key)?;
        Ok(self.entry(&ns.key(key))?.and_then(|e| e.read().into_bytes()))
    }

    /// Whether `key` has a value.
    pub fn exists(&self, ns: &Namespace, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.get(ns, key)?.is_some())
    }

    fn entry(&self, composite: &[u8]) -> Result<Option<Entry>, KvError> {
        Ok(self.entries_at(std::slice::from_ref(&composite))?.pop().map(|(_, e)| e))
    }

    /// The entries at these composite keys, those that exist, in one read transaction.
    pub fn entries_at<K: AsRef<[u8]>>(&self, composites: &[K]) -> Result<Vec<(Vec<u8>, Entry)>, KvError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(ENTRIES).map_err(storage)?;
        let mut out = Vec::with_capacity(composites.len());
        for k in composites {
            if let Some(v) = table.get(k.as_ref()).map_err(storage)? {
                out.push((k.as_ref().to_vec(), codec::decode(v.value()).map_err(storage)?));
            }
        }
        Ok(out)
    }

    /// The composite keys of range `range` with their entry hashes (what its digest sums), in key
    /// order: one contiguous index scan.
    pub fn range_items(&self, range: u32) -> Result<Vec<(Vec<u8>, u128)>, KvError> {
        let prefix = index_key(range, &[]);
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(INDEX).map_err(storage)?;
        let entries = txn.open_table(ENTRIES).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.range(prefix.as_slice()..).map_err(storage)? {
            let (k, _) = item.map_err(storage)?;
            let Some(composite) = k.value().strip_prefix(prefix.as_slice()) else { break };
            let encoded = entries
                .get(composite)
                .map_err(storage)?
                .ok_or_else(|| storage("index names a missing entry"))?;
            out.push((composite.to_vec(), entry_hash(composite, encoded.value())));
        }
        Ok(out)
    }

    /// Up to `limit` keys of the bucket (tombstones skipped) after `cursor` (exclusive), in key
    /// order, and the cursor of the next page if there is one.
    pub fn list_keys(&self, ns: &Namespace, cursor: Option<&[u8]>, limit: usize) -> Result<KeyPage, KvError> {
        let limit = limit.clamp(1, self.bounds().max_page);
        let prefix = ns.prefix();
        let start = match cursor {
            Some(c) => {
                let mut s = ns.key(c);
                s.push(0); // the smallest key after the cursor
                s
            }
            None => prefix.clone(),
        };
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(ENTRIES).map_err(storage)?;
        let mut keys = Vec::new();
        for item in table.range(start.as_slice()..).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let Some(key) = k.value().strip_prefix(prefix.as_slice()) else { break };
            if codec::decode(v.value()).map_err(storage)?.read().into_bytes().is_none() {
                continue;
            }
            if keys.len() == limit {
                let next = keys.last().cloned();
                return Ok((keys, next));
            }
            keys.push(key.to_vec());
        }
        Ok((keys, None))
    }

    /// Applies one write and waits until it is durable.
    pub async fn write(&self, ns: &Namespace, key: &[u8], write: Write) -> Result<Written, KvError> {
        self.write_many(ns, vec![(key.to_vec(), write)]).await?.pop().unwrap_or(Err(KvError::Closed))
    }

    /// Applies several writes in one transaction and waits until they are durable; each write
    /// has its own result (one refused write does not refuse the others).
    pub async fn write_many(
        &self,
        ns: &Namespace,
        writes: Vec<(Vec<u8>, Write)>,
    ) -> Result<Vec<Result<Written, KvError>>, KvError> {
        let bounds = *self.bounds();
        let mut composite = Vec::with_capacity(writes.len());
        for (key, write) in writes {
            check("key", key.len(), bounds.max_key)?;
            if let Write::Set(v) | Write::CompareAndSwap { new: v, .. } = &write {
                check("value", v.len(), bounds.max_value)?;
            }
            composite.push((ns.key(&key), Op::Local(write)));
        }
        self.submit(composite).await
    }

    /// Waits until every write submitted before it is committed, and moves the durable clock
    /// ([`Store::durable_hlc`]) past them: replication reads it as the start of a session, which
    /// must be after the arrival of every tombstone the session can see and before that of any
    /// it cannot.
    pub async fn barrier(&self) -> Result<Hlc, KvError> {
        self.submit(Vec::new()).await?;
        Ok(self.durable_hlc())
    }

    /// Merges entries received from another site (composite key, entry), as replication does;
    /// returns how many changed this store. Order and duplication do not matter.
    pub async fn merge(&self, items: Vec<(Vec<u8>, Entry)>) -> Result<usize, KvError> {
        let ops = items.into_iter().map(|(k, e)| (k, Op::Merge(e))).collect();
        let results = self.submit(ops).await?;
        let mut changed = 0;
        for r in results {
            if r? == Written::Done {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Every entry with its composite key, in key order (a full scan: for full resync and tests).
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Entry)>, KvError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(ENTRIES).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            out.push((k.value().to_vec(), codec::decode(v.value()).map_err(storage)?));
        }
        Ok(out)
    }

    async fn submit(&self, writes: Vec<(Vec<u8>, Op)>) -> Result<Vec<Result<Written, KvError>>, KvError> {
        let composite = writes;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let jobs =
            self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(KvError::Closed)?;
        // `send` waits when the queue is full: back-pressure rather than unbounded buffering.
        jobs.send(Job { writes: composite, reply }).map_err(|_| KvError::Closed)?;
        answer.await.map_err(|_| KvError::Closed)
    }

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
            let collected = match meta.get(COLLECTED).map_err(storage)? {
                Some(v) => decode_hlc(v.value())?,
                None => Hlc::ZERO,
            };
            meta.insert(COLLECTED, encode_hlc(collected.max(before)).as_slice()).map_err(storage)?;
        }
        {
            let mut tables = Tables::open(&txn)?;
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
        }
        txn.commit().map_err(storage)?;
        Ok(removed)
    }

    /// The tombstone collection watermark: tombstones that arrived before it are gone.
    pub fn collected(&self) -> Result<Hlc, KvError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(META).map_err(storage)?;
        match table.get(COLLECTED).map_err(storage)? {
            Some(v) => decode_hlc(v.value()),
            None => Ok(Hlc::ZERO),
        }
    }

    /// Starts a resync from the collection watermark `before` of a peer that cut this site off:
    /// removes every entry whose register was written before `before` (its increments with it),
    /// tombstone or not, since it may be a value deleted elsewhere whose tombstone is gone; and,
    /// in the same transaction, records that the data now reaches back only to `before`
    /// ([`Identity::since`]) and that a resync is under way ([`Store::resyncing`]). Returns how
    /// many entries went.
    ///
    /// A value goes by its register's stamp, not the entry's last change: an increment made
    /// recently on top of a value deleted (and collected) elsewhere would otherwise bring the
    /// deleted value back. A counter on no value goes by its last change.
    pub fn discard_before(&self, before: Hlc) -> Result<usize, KvError> {
        // A full scan: only for resync after being cut off.
        // A register written before `before` may be a value deleted elsewhere: it goes, with the
        // increments on it. Increments on no value (a counter never set) go only if they are all
        // older: newer ones cannot bring any deleted value back.
        let doomed = |e: &Entry| {
            e.stamp.hlc < before
                && (matches!(e.register, crate::entry::Register::Value(_)) || e.changed.hlc < before)
        };
        let txn = self.inner.db.begin_write().map_err(storage)?;
        let mut removed = 0;
        let mut identity = self.identity();
        let began;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            identity.since = identity.since.max(before);
            identity.save(&mut meta)?;
            began = begin_resync(&mut meta, &self.inner.clock)?;
        }
        {
            let mut tables = Tables::open(&txn)?;
            let mut found = Vec::new();
            for item in tables.entries.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                if doomed(&codec::decode(v.value()).map_err(storage)?) {
                    found.push((k.value().to_vec(), v.value().to_vec()));
                }
            }
            for (composite, encoded) in found {
                tables.replace(&composite, Some(&encoded), None)?;
                tables.tombstones.remove(composite.as_slice()).map_err(storage)?;
                removed += 1;
            }
        }
        txn.commit().map_err(storage)?;
        *self.inner.identity.write().unwrap_or_else(|e| e.into_inner()) = identity;
        *self.inner.resync.lock().unwrap_or_else(|e| e.into_inner()) = Some(began);
        Ok(removed)
    }

    /// Whether a resync started by [`Store::discard_before`] or [`Store::reincarnate`] has not
    /// been finished.
    pub fn resyncing(&self) -> Result<bool, KvError> {
        Ok(self.resync_began()?.is_some())
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

    /// Every [`Store::meta`] value whose name starts with `prefix`, by name (without `sync/`).
    pub fn meta_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(META).map_err(storage)?;
        let start = format!("sync/{prefix}");
        let mut out = Vec::new();
        for item in table.range(start.as_str()..).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let Some(name) = k.value().strip_prefix("sync/") else { break };
            if !name.starts_with(prefix) {
                break;
            }
            out.push((name.to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// A value replication keeps about itself in the store's meta table (under `sync/`).
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KvError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(META).map_err(storage)?;
        Ok(table.get(format!("sync/{name}").as_str()).map_err(storage)?.map(|v| v.value().to_vec()))
    }

    /// Sets a [`Store::meta`] value, durably.
    pub fn set_meta(&self, name: &str, value: &[u8]) -> Result<(), KvError> {
        let txn = self.inner.db.begin_write().map_err(storage)?;
        txn.open_table(META)
            .map_err(storage)?
            .insert(format!("sync/{name}").as_str(), value)
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// The digest of every range, in range order (see the module docs).
    pub fn digests(&self) -> Result<Vec<u128>, KvError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(DIGESTS).map_err(storage)?;
        let mut out = vec![0u128; DIGEST_RANGES as usize];
        for item in table.iter().map_err(storage)? {
            let (range, sum) = item.map_err(storage)?;
            out[range.value() as usize] = decode_u128(sum.value())?;
        }
        Ok(out)
    }
}

const COLLECTED: &str = "collected";
const RESYNCING: &str = "resyncing";

/// Marks a resync under way from now, unless one already is (it keeps its start); returns the
/// start.
fn begin_resync(meta: &mut redb::Table<&str, &[u8]>, clock: &Clock) -> Result<Hlc, KvError> {
    if let Some(began) = read_resync(meta)? {
        return Ok(began);
    }
    let began = clock.now();
    meta.insert(RESYNCING, encode_hlc(began).as_slice()).map_err(storage)?;
    // The clock never reads below it again, even after a crash and a clock stepped back.
    meta.insert("hlc", encode_hlc(began).as_slice()).map_err(storage)?;
    Ok(began)
}

/// When the resync under way began, if one is: the HLC stored under `"resyncing"` (a one-byte
/// marker from before the start was stored counts as begun after everything).
fn read_resync(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Option<Hlc>, KvError> {
    let Some(v) = meta.get(RESYNCING).map_err(storage)? else { return Ok(None) };
    if v.value().len() == 1 {
        return Ok(Some(Hlc { physical_ms: u64::MAX, logical: u32::MAX }));
    }
    Ok(Some(decode_hlc(v.value())?))
}

/// Each job's results, in order.
type BatchResults = Vec<Vec<Result<Written, KvError>>>;

/// The writer thread: group commit.
/// What the writer thread shares with the store.
struct Shared {
    /// The writer id to stamp local writes with.
    site: Arc<RwLock<String>>,
    /// The clock as of the last durable commit.
    durable: Arc<Mutex<Hlc>>,
    /// See [`Store::set_tombstone_floor`].
    floor: Arc<Mutex<Hlc>>,
}

fn write_loop(
    db: &Database,
    clock: &Clock,
    shared: &Shared,
    max_batch: usize,
    queue: &std::sync::mpsc::Receiver<Job>,
    feed: &tokio::sync::broadcast::Sender<Arc<Vec<Change>>>,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        let mut pending: usize = batch[0].writes.len();
        while pending < max_batch {
            match queue.try_recv() {
                Ok(job) => {
                    pending += job.writes.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let writer_id = shared.site.read().unwrap_or_else(|e| e.into_inner()).clone();
        let floor = *shared.floor.lock().unwrap_or_else(|e| e.into_inner());
        match commit_batch(db, clock, &writer_id, floor, &batch) {
            Ok((results, changes, persisted)) => {
                *shared.durable.lock().unwrap_or_else(|e| e.into_inner()) = persisted;
                if !changes.is_empty() {
                    // No receiver is fine; a lagging one is told by the channel.
                    let _ = feed.send(Arc::new(changes));
                }
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!("kv commit failed: {e}");
                for job in batch {
                    let n = job.writes.len();
                    let _ = job.reply.send(vec![Err(e.clone()); n]);
                }
            }
        }
    }
}

fn commit_batch(
    db: &Database,
    clock: &Clock,
    site: &str,
    floor: Hlc,
    batch: &[Job],
) -> Result<(BatchResults, Vec<Change>, Hlc), KvError> {
    let txn = db.begin_write().map_err(storage)?;
    // A barrier (an empty job) moves the clock, so the durable clock passes everything before it.
    if batch.iter().any(|job| job.writes.is_empty()) {
        clock.now();
    }
    let persisted;
    let mut results = Vec::with_capacity(batch.len());
    let mut changes = Vec::new();
    {
        let mut tables = Tables::open(&txn)?;
        for job in batch {
            let mut job_results = Vec::with_capacity(job.writes.len());
            for (composite, write) in &job.writes {
                let old =
                    tables.entries.get(composite.as_slice()).map_err(storage)?.map(|v| v.value().to_vec());
                let current = match &old {
                    Some(bytes) => codec::decode(bytes).map_err(storage)?,
                    None => Entry::absent(),
                };
                let origin = match write {
                    Op::Local(_) => Origin::Local,
                    Op::Merge(_) => Origin::Merged,
                };
                let change = match write {
                    Op::Local(write) => {
                        apply(&current, write, Stamp { hlc: clock.now(), site: site.to_owned() })
                    }
                    // A tombstone every site held, for a key collected here: nothing to store.
                    Op::Merge(remote)
                        if old.is_none() && remote.is_tombstone() && remote.changed.hlc < floor =>
                    {
                        Ok(None)
                    }
                    Op::Merge(remote) => {
                        clock.observe(remote.changed.hlc);
                        let merged = current.merge(remote);
                        Ok((merged != current).then_some((merged, Written::Done)))
                    }
                };
                let (next, written) = match change {
                    Ok(Some(change)) => change,
                    // Nothing to write: a compare-and-swap that did not match, or a merge that
                    // brought nothing new.
                    Ok(None) => {
                        job_results.push(Ok(Written::Swapped(false)));
                        continue;
                    }
                    Err(e) => {
                        job_results.push(Err(e));
                        continue;
                    }
                };
                let encoded = codec::encode(&next);
                tables.replace(composite, old.as_deref(), Some(&encoded))?;
                if next.is_tombstone() {
                    // Arrival here, on this site's clock: after every session already started.
                    let arrived = encode_hlc(clock.now());
                    tables.tombstones.insert(composite.as_slice(), arrived.as_slice()).map_err(storage)?;
                } else if old.is_some() && current.is_tombstone() {
                    tables.tombstones.remove(composite.as_slice()).map_err(storage)?;
                }
                changes.push(Change { key: composite.clone(), entry: next, origin });
                job_results.push(Ok(written));
            }
            results.push(job_results);
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        persisted = clock.last();
        meta.insert("hlc", encode_hlc(persisted).as_slice()).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    Ok((results, changes, persisted))
}

/// The entry after `write`; `None` when a compare-and-swap does not match.
fn apply(current: &Entry, write: &Write, stamp: Stamp) -> Result<Option<(Entry, Written)>, KvError> {
    Ok(Some(match write {
        Write::Set(v) => (Entry::set(v.clone(), stamp), Written::Done),
        Write::Delete => (Entry::delete(stamp), Written::Done),
        Write::Increment(delta) => {
            let (next, total) = current.increment(*delta, stamp)?;
            (next, Written::Total(total))
        }
        Write::CompareAndSwap { expected, new } => {
            if current.read().into_bytes() != *expected {
                return Ok(None);
            }
            (Entry::set(new.clone(), stamp), Written::Swapped(true))
        }
    }))
}
