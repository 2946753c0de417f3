//! The site's key-value store on redb, with group commit and range digests.
//!
//! Layout (store format version 4), in one redb file:
//! - `meta`: `"format"` → u64, `"hlc"` → the highest HLC issued (physical u64, logical u32),
//!   `"seen"` → what the store holds of each site's writes (see `seen.rs`; added without a
//!   format change: a store without it starts from nothing),
//!   `"stale_digests"` → the ranges whose `digests` row is behind (see below).
//! - `entries`: composite key → encoded [`Entry`] (see [`crate::codec`]). The composite key is
//!   `len(app) app len(bucket) bucket key`, so one app's keys can never be named by another app,
//!   whatever bucket or key it passes, and each (app, bucket) is one contiguous range.
//! - `digests`: range (the first 12 bits of SHA-256 of the composite key; 4096 ranges) → the
//!   range's digest: the 16-byte wrapping sum, over the range's entries, of the first 16 bytes of
//!   SHA-256(composite key ‖ encoded entry). Two stores holding the same entries have equal
//!   digests, whatever order they were written in. Kept in memory and moved in O(1) per write
//!   (subtract the old entry's hash, add the new one's); the rows are written lazily, and the
//!   ones behind are listed in `meta` (see [`derived`]).
//! - `index`: range (2 bytes, big-endian) ‖ composite key → nothing: one range's keys are one
//!   scan, which is what replication lists when a range's digest differs (their hashes are
//!   computed from `entries` then). An index row changes only when its key appears or is
//!   removed; such changes go first to `journal` (sequence number → the change), appended in
//!   order, and are folded into `index` in batches (see [`derived`]).
//! - `tombstones`: composite key of each entry that is a tombstone → the HLC reading of *this
//!   site* when the tombstone arrived here (by a local delete or a merge). Collection goes by
//!   arrival, not by the tombstone's own stamp: a tombstone stamped long ago by another site can
//!   arrive late, after the replication sessions that the collection rule counts on.
//! - `set_aside`: composite key → when a resync discarded it, the watermark, and the entry: this
//!   site's contributions to it, put back when a peer shows the register is live (see
//!   [`Store::discard_before`]). Looked up by merges only while it holds rows.
//!
//! Writes go through one writer thread that takes every write waiting (up to
//! [`StoreConfig::max_batch`]) into one transaction, commits it durably, and only then answers each
//! writer: acknowledged means durable, at the cost of one fsync per batch, not per write. When
//! the last batch held several writers' jobs, the next one waits a moment (at most 300 µs, and
//! only while writes keep coming) for those just answered to send their next write: a commit
//! costs mostly the pages it dirties and its fsync, so fewer, larger batches serve more writers.
//! After a batch of one job (a lone writer) the next batch does not wait.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

pub(crate) mod derived;
mod horizon;
mod seen;
mod writer;

pub use seen::{SeenVector, Touched};

use crate::codec;
use crate::entry::{Entry, EntryError, SiteId};
use crate::hlc::{Clock, Hlc};
use crate::identity::Identity;
use crate::tables::{ENTRIES, INDEX, META, SET_ASIDE, TOMBSTONES, decode_hlc, encode_hlc, entry_hash};
use derived::Derived;
use horizon::{begin_resync, read_resync};
use writer::{Job, Op, Shared, write_loop};

/// The store format this build reads and writes (formats 2, before incarnations, and 3, before
/// the index journal, are upgraded in place when opened; an older build refuses format 4, whose
/// index and digests tables may lag behind the journal).
pub const STORE_FORMAT: u64 = 4;
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
    /// Index changes kept in the journal (and in memory) before they are folded into the index.
    pub fold_at: usize,
    /// Ranges whose stored digest may lag before the digests are written.
    pub flush_at: usize,
    /// Write the lagging digests when the store is dropped, so the next open has nothing to
    /// recompute. Tests that model a crash by dropping the store turn it off.
    pub flush_at_close: bool,
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
            fold_at: derived::FOLD_AT,
            flush_at: derived::FLUSH_AT,
            flush_at_close: true,
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
    /// Delete if the current value equals `expected`; atomic at this site (what was read is
    /// what goes: a value written since stays).
    DeleteIf {
        /// The value expected now.
        expected: Vec<u8>,
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
    /// Why guests may not use the store now, if they may not, and whether they may still read
    /// (the writer checks it for guests' writes too).
    gate: Arc<RwLock<Option<(String, bool)>>>,
    /// Merged tombstones stamped before this, for keys this store does not hold, are not stored
    /// ([`Store::set_tombstone_floor`]).
    floor: Arc<Mutex<Hlc>>,
    /// When the resync under way began, if one is (a cache of the meta table).
    resync: Mutex<Option<Hlc>>,
    /// The set-aside table may hold rows (the writer looks only then).
    aside: Arc<AtomicBool>,
    /// The range digests and the index changes not yet folded (see [`derived`]).
    derived: Arc<RwLock<Derived>>,
    /// What decides which entries from other sites may be merged ([`Store::set_admission`]).
    admission: RwLock<Option<Admission>>,
    /// What the store holds of each site's writes ([`Store::seen`]).
    seen: Arc<RwLock<SeenVector>>,
}

/// Decides whether an entry from another site may be merged: `Err(reason)` refuses it.
pub type Admission = Arc<dyn Fn(&[u8], &Entry) -> Result<(), String> + Send + Sync>;

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
        // A clean stop leaves no digest to recompute at the next open (a crash does).
        if self.config.flush_at_close
            && let Err(e) = derived::flush(&self.db, &self.derived)
        {
            tracing::warn!(
                "kv: the range digests were not written at close ({e}): the next open recomputes them"
            );
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
        let aside;
        let derived;
        let seen;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let format = meta.get("format").map_err(storage)?.map(|v| v.value().to_vec());
            let fresh = format.is_none();
            if let Some(bytes) = format {
                let found = bytes.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX);
                // Format 2 differs only by having no identity: it gets one below. Format 3 only
                // by having no journal and no stale digests.
                if found != STORE_FORMAT && found != 2 && found != 3 {
                    return Err(KvError::UnknownFormat { found });
                }
            }
            meta.insert("format", STORE_FORMAT.to_le_bytes().as_slice()).map_err(storage)?;
            if let Some(hlc) = meta.get("hlc").map_err(storage)? {
                clock.observe(decode_hlc(hlc.value())?);
            }
            identity = Identity::open(&mut meta, &config.site, fresh, &clock)?;
            resync = read_resync(&meta)?;
            // Absent in a store written before session tokens: empty (see `seen`).
            seen = match meta.get("seen").map_err(storage)? {
                Some(row) => seen::decode(row.value())
                    .ok_or_else(|| KvError::Storage("the store's \"seen\" row cannot be read".into()))?,
                None => SeenVector::default(),
            };
            // What this boot reports as its clock at open is on disk before anyone hears it, so
            // the next boot opens at or after it (peers check exactly that).
            meta.insert("hlc", encode_hlc(identity.opened_at).as_slice()).map_err(storage)?;
            txn.open_table(ENTRIES).map_err(storage)?;
            txn.open_table(INDEX).map_err(storage)?;
            txn.open_table(TOMBSTONES).map_err(storage)?;
            derived = Derived::load(&txn, &mut meta, config.fold_at.max(1), config.flush_at.max(1))?;
            aside = !txn.open_table(SET_ASIDE).map_err(storage)?.is_empty().map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        let aside = Arc::new(AtomicBool::new(aside));
        let derived = Arc::new(RwLock::new(derived));

        let db = Arc::new(db);
        let (feed, _) = tokio::sync::broadcast::channel(config.change_feed.max(1));
        let clock = Arc::new(clock);
        let (jobs, queue) = std::sync::mpsc::sync_channel(config.queue.max(1));
        let writer_id = Arc::new(RwLock::new(identity.writer()));
        let durable = Arc::new(Mutex::new(identity.opened_at));
        let floor = Arc::new(Mutex::new(Hlc::ZERO));
        let gate = Arc::new(RwLock::new(None));
        let seen = Arc::new(RwLock::new(seen));
        let writer = {
            let shared = Shared {
                gate: gate.clone(),
                site: writer_id.clone(),
                durable: durable.clone(),
                floor: floor.clone(),
                aside: aside.clone(),
                derived: derived.clone(),
                seen: seen.clone(),
            };

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
                gate,
                floor,
                resync: Mutex::new(resync),
                aside,
                derived,
                admission: RwLock::new(None),
                seen,
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

    /// What this store holds of each site's writes: per site name, a clock reading at or after
    /// the stamp of every change of that site's it holds (see `store/seen.rs`). Moves before the
    /// writes of a batch are acknowledged; kept in the store, so it survives a restart.
    pub fn seen(&self) -> SeenVector {
        self.inner.seen.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a new random incarnation, durably, and stamps every later write with it: what a site
    /// does when it learns that its data dir is an older copy of itself (a restore), so that it
    /// never reuses a stamp or a counter contribution it made before. In the same transaction the
    /// store starts a resync ([`Store::resync_began`]): guests wait until it is finished. Returns the
    /// new identity.
    pub fn reincarnate(&self) -> Result<Identity, KvError> {
        let txn = self.inner.db.begin_write().map_err(storage)?;
        let began;
        let next = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            // As stored: a resync committed just before this transaction changed it.
            let mut next = Identity::load(&meta)?;
            next.previous = next.incarnation;
            next.incarnation = Identity::random_incarnation(next.incarnation);
            next.save(&mut meta)?;
            // An older copy may hold what its peers deleted since: it pulls everything (and
            // drops what its peers tell it to) before guests use it again.
            began = begin_resync(&mut meta, &self.inner.clock)?;
            next
        };
        self.commit_with_writer(txn, next.writer())?;
        *self.inner.resync.lock().unwrap_or_else(|e| e.into_inner()) = Some(began);
        *self.inner.identity.write().unwrap_or_else(|e| e.into_inner()) = next.clone();
        Ok(next)
    }

    /// Says durably that the data reaches back to `since` (if that is earlier than what the
    /// identity says): what a site seeded from a backup taken at `since` does before anyone hears
    /// it, so that peers that collected tombstones since then make it resync rather than take
    /// values those tombstones deleted (see atoll-sync's ALGORITHM.md, "Membership and identity").
    pub fn reach_back_to(&self, since: Hlc) -> Result<Identity, KvError> {
        let txn = self.inner.db.begin_write().map_err(storage)?;
        let next = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut next = Identity::load(&meta)?;
            next.since = next.since.min(since);
            next.save(&mut meta)?;
            next
        };
        txn.commit().map_err(storage)?;
        let mut identity = self.inner.identity.write().unwrap_or_else(|e| e.into_inner());
        identity.since = next.since;
        Ok(identity.clone())
    }

    /// Calls `each` with every entry's composite key and stored bytes ([`crate::codec`]), in key
    /// order, from one read transaction (a consistent snapshot, taken when this is called),
    /// without holding the entries in memory: what a backup streams. Stops at `each`'s first error.
    pub fn scan_encoded<E: From<KvError>>(
        &self,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(ENTRIES).map_err(storage)?;
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            each(k.value(), v.value())?;
        }
        Ok(())
    }

    /// Commits `txn`, which changes the writer id to `writer`: set before the commit, so that a
    /// batch the writer thread commits right after (it reads the id once it holds the write lock)
    /// stamps with it; put back if the commit fails.
    pub(super) fn commit_with_writer(
        &self,
        txn: redb::WriteTransaction,
        writer: String,
    ) -> Result<(), KvError> {
        let previous =
            std::mem::replace(&mut *self.inner.writer_id.write().unwrap_or_else(|e| e.into_inner()), writer);
        txn.commit().map_err(|e| {
            *self.inner.writer_id.write().unwrap_or_else(|e| e.into_inner()) = previous;
            storage(e)
        })
    }

    /// Tombstones merged from other sites for keys this store does not hold are not stored when
    /// stamped before `floor`: replication sets it below its collection watermark, where every
    /// site is known to have held such a tombstone, so storing it again would only make sites
    /// that collect at different moments echo it back and forth (see atoll-sync's ALGORITHM.md).
    pub fn set_tombstone_floor(&self, floor: Hlc) {
        *self.inner.floor.lock().unwrap_or_else(|e| e.into_inner()) = floor;
    }

    /// Sets what decides which entries from other sites are merged (the embedder's rules for
    /// its reserved namespaces, say); the function reports what it refuses.
    pub fn set_admission(&self, admission: Admission) {
        *self.inner.admission.write().unwrap_or_else(|e| e.into_inner()) = Some(admission);
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
        self.get_noting(ns, key, None)
    }

    /// [`Store::get`], noting what was read in `touched` (a request's, for its session token).
    pub fn get_noting(
        &self,
        ns: &Namespace,
        key: &[u8],
        touched: Option<&Touched>,
    ) -> Result<Option<Vec<u8>>, KvError> {
        check("key", key.len(), self.bounds().max_key)?;
        let entry = self.entry(&ns.key(key))?;
        if let (Some(touched), Some(entry)) = (touched, &entry) {
            touched.read(entry, &self.seen());
        }
        Ok(entry.and_then(|e| e.read().into_bytes()))
    }

    /// Notes in `touched` an acknowledged write of this site's; with `read_back`, the key's
    /// entry as it is now too (an increment's total or a failed swap showed the writer more than
    /// its own write).
    pub fn note_write(
        &self,
        touched: &Touched,
        ns: &Namespace,
        read_back: Option<&[u8]>,
    ) -> Result<(), KvError> {
        // The entry first: the vector read after it covers it (it moves before a commit).
        let entry = match read_back {
            Some(key) => self.entry(&ns.key(key))?,
            None => None,
        };
        let seen = self.seen();
        touched.wrote(self.site(), &seen);
        if let Some(entry) = entry {
            touched.read(&entry, &seen);
        }
        Ok(())
    }

    /// Whether `key` has a value.
    pub fn exists(&self, ns: &Namespace, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.get(ns, key)?.is_some())
    }

    /// The entry of `key` (a tombstone too), as replication holds it: stamps and counter parts.
    pub fn entry_of(&self, ns: &Namespace, key: &[u8]) -> Result<Option<Entry>, KvError> {
        check("key", key.len(), self.bounds().max_key)?;
        self.entry(&ns.key(key))
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
        // The snapshot and the pending index changes at the same commit.
        let (txn, keys) = {
            let derived = self.inner.derived.read().unwrap_or_else(|e| e.into_inner());
            let txn = self.inner.db.begin_read().map_err(storage)?;
            let keys = derived.range_keys(&txn.open_table(INDEX).map_err(storage)?, range)?;
            (txn, keys)
        };
        let entries = txn.open_table(ENTRIES).map_err(storage)?;
        let mut out = Vec::with_capacity(keys.len());
        for composite in keys {
            let encoded = entries
                .get(composite.as_slice())
                .map_err(storage)?
                .ok_or_else(|| storage("index names a missing entry"))?;
            let hash = entry_hash(&composite, encoded.value());
            out.push((composite, hash));
        }
        Ok(out)
    }

    /// Up to `limit` keys of the bucket (tombstones skipped) after `cursor` (exclusive), in key
    /// order, and the cursor of the next page if there is one.
    pub fn list_keys(&self, ns: &Namespace, cursor: Option<&[u8]>, limit: usize) -> Result<KeyPage, KvError> {
        self.list_prefix(ns, b"", cursor, limit)
    }

    /// [`Store::list_keys`] of the keys starting with `key_prefix` only.
    pub fn list_prefix(
        &self,
        ns: &Namespace,
        key_prefix: &[u8],
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyPage, KvError> {
        let limit = limit.clamp(1, self.bounds().max_page);
        let prefix = ns.key(key_prefix);
        let start = match cursor {
            Some(c) => {
                let mut s = ns.key(c);
                s.push(0); // the smallest key after the cursor
                s.max(prefix.clone())
            }
            None => prefix.clone(),
        };
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(ENTRIES).map_err(storage)?;
        let mut keys = Vec::new();
        for item in table.range(start.as_slice()..).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            if !k.value().starts_with(prefix.as_slice()) {
                break;
            }
            let key = &k.value()[prefix.len() - key_prefix.len()..];
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
        self.submit(self.local(ns, writes)?, false).await
    }

    /// [`Store::write_many`] for a guest: refused ([`KvError::Unavailable`]) if the gate is closed
    /// to writes when the writer commits it, not only when the guest asked (a resync may begin
    /// in between).
    pub async fn guest_write_many(
        &self,
        ns: &Namespace,
        writes: Vec<(Vec<u8>, Write)>,
    ) -> Result<Vec<Result<Written, KvError>>, KvError> {
        self.submit(self.local(ns, writes)?, true).await
    }

    /// [`Store::write`] for a guest (see [`Store::guest_write_many`]).
    pub async fn guest_write(&self, ns: &Namespace, key: &[u8], write: Write) -> Result<Written, KvError> {
        self.guest_write_many(ns, vec![(key.to_vec(), write)]).await?.pop().unwrap_or(Err(KvError::Closed))
    }

    fn local(&self, ns: &Namespace, writes: Vec<(Vec<u8>, Write)>) -> Result<Vec<(Vec<u8>, Op)>, KvError> {
        let bounds = *self.bounds();
        let mut composite = Vec::with_capacity(writes.len());
        for (key, write) in writes {
            check("key", key.len(), bounds.max_key)?;
            if let Write::Set(v) | Write::CompareAndSwap { new: v, .. } = &write {
                check("value", v.len(), bounds.max_value)?;
            }
            composite.push((ns.key(&key), Op::Local(write)));
        }
        Ok(composite)
    }

    /// Waits until every write submitted before it is committed, and moves the durable clock
    /// ([`Store::durable_hlc`]) past them: replication reads it as the start of a session, which
    /// must be after the arrival of every tombstone the session can see and before that of any
    /// it cannot.
    pub async fn barrier(&self) -> Result<Hlc, KvError> {
        self.submit(Vec::new(), false).await?;
        Ok(self.durable_hlc())
    }

    /// Merges entries received from another site (composite key, entry), as replication does;
    /// returns how many changed this store. Order and duplication do not matter.
    /// Entries the admission ([`Store::set_admission`]) refuses are left out.
    pub async fn merge(&self, items: Vec<(Vec<u8>, Entry)>) -> Result<usize, KvError> {
        let admission = self.inner.admission.read().unwrap_or_else(|e| e.into_inner()).clone();
        let ops = items
            .into_iter()
            .filter(|(k, e)| admission.as_ref().is_none_or(|admit| admit(k, e).is_ok()))
            .map(|(k, e)| (k, Op::Merge(e)))
            .collect();
        let results = self.submit(ops, false).await?;
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

    async fn submit(
        &self,
        writes: Vec<(Vec<u8>, Op)>,
        guest: bool,
    ) -> Result<Vec<Result<Written, KvError>>, KvError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let jobs =
            self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(KvError::Closed)?;
        // `send` waits when the queue is full: back-pressure rather than unbounded buffering.
        jobs.send(Job { writes, reply, guest }).map_err(|_| KvError::Closed)?;
        answer.await.map_err(|_| KvError::Closed)
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
        Ok(self.inner.derived.read().unwrap_or_else(|e| e.into_inner()).digests.clone())
    }
}
