//! The `wasi:keyvalue` host, bound to atoll-kv, in the two versions guests use today:
//! `0.2.0-draft` (wasmtime, wasmCloud) in [`draft`] and `0.2.0-draft2` (Spin) in [`draft2`]. Both
//! are thin adapters over one implementation here, so they read and write the same data.
//!
//! A guest sees only its own app's buckets: the namespace is built from the app name the host
//! holds, never from anything the guest passes. Bound violations and refused operations are
//! errors the guest can handle (`error::other`); a storage failure traps the request with
//! [`StorageUnavailable`], which the host answers with 503.

/// The host items that are the same in both versions, written once. The generated types differ
/// per version, so this is a macro, expanded in each version's module (where `store` and `batch`
/// name that version's generated interfaces); each version passes the methods that differ.
macro_rules! common_host {
    (
        bucket_methods: { $($bucket_methods:tt)* }
        batch_methods: { $($batch_methods:tt)* }
    ) => {
        fn guest<T>(outcome: super::Outcome<T>) -> wasmtime::Result<Result<T, store::Error>> {
            Ok(outcome?.map_err(|fail| match fail {
                super::Fail::NoSuchStore => store::Error::NoSuchStore,
                super::Fail::AccessDenied => store::Error::AccessDenied,
                super::Fail::Other(reason) => store::Error::Other(reason),
            }))
        }

        /// Adds this version's interfaces to the linker.
        pub(crate) fn add_to_linker<T: Send + 'static>(
            linker: &mut wasmtime::component::Linker<T>,
            view: fn(&mut T) -> KvView<'_>,
        ) -> wasmtime::Result<()> {
            store::add_to_linker::<T, super::HasKv>(linker, view)?;
            atomics::add_to_linker::<T, super::HasKv>(linker, view)?;
            batch::add_to_linker::<T, super::HasKv>(linker, view)
        }

        impl store::Host for KvView<'_> {
            async fn open(&mut self, identifier: String) -> wasmtime::Result<Result<Resource<Bucket>, store::Error>> {
                guest(KvView::open(self, &identifier))
            }
        }

        impl store::HostBucket for KvView<'_> {
            async fn get(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
                guest(KvView::get(self, &bucket, &key))
            }

            async fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), store::Error>> {
                guest(KvView::set(self, &bucket, &key, value).await)
            }

            async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<(), store::Error>> {
                guest(KvView::delete(self, &bucket, &key).await)
            }

            async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<bool, store::Error>> {
                guest(KvView::get(self, &bucket, &key).map(|r| r.map(|v| v.is_some())))
            }

            async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
                self.table.delete(bucket)?;
                Ok(())
            }

            $($bucket_methods)*
        }

        impl batch::Host for KvView<'_> {
            async fn set_many(&mut self, bucket: Resource<Bucket>, key_values: Vec<(String, Vec<u8>)>) -> wasmtime::Result<Result<(), store::Error>> {
                guest(KvView::set_many(self, &bucket, key_values).await)
            }

            async fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> wasmtime::Result<Result<(), store::Error>> {
                guest(KvView::delete_many(self, &bucket, keys).await)
            }

            $($batch_methods)*
        }
    };
}

pub(crate) mod draft;
pub(crate) mod draft2;
pub(crate) mod spin;
pub(crate) mod spin2;

use std::sync::Arc;

use atoll_kv::{KvError, Namespace, Store, Touched, Write, Written};
use wasmtime::component::{HasData, Resource, ResourceTable};

static OPERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Guests' key-value operations in this process so far (what `atoll_kv_operations_total` counts,
/// all ops together): read once a second for the status page's history.
pub fn operations() -> u64 {
    OPERATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one operation `op` (the metric and the process-wide total).
pub(crate) fn count(op: &'static str) {
    OPERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!("atoll_kv_operations_total", "op" => op).increment(1);
}

/// The store failed (I/O error, corrupt file, shut down): the request fails with 503.
#[derive(Debug, thiserror::Error)]
#[error("the key-value store is unavailable: {0}")]
pub struct StorageUnavailable(pub String);

/// What a request's store data holds for `wasi:keyvalue`.
pub(crate) struct KvCtx {
    pub(crate) store: Option<Store>,
    pub(crate) app: Arc<str>,
    /// The store labels Spin's key-value interfaces may open besides `default`.
    pub(crate) labels: Arc<[String]>,
    /// Spin key-value calls of this request in flight (its functions are async: a WASI 0.3
    /// guest may start many at once).
    pub(crate) in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Where the request's calls note what they read and wrote (see [`atoll_kv::Touched`]), if
    /// the caller asked.
    pub(crate) touched: Option<Arc<Touched>>,
}

/// An open bucket.
pub struct Bucket {
    ns: Namespace,
}

/// A compare-and-swap handle (draft2): the key and the value read when it was made.
pub struct Cas {
    ns: Namespace,
    key: String,
    current: Option<Vec<u8>>,
}

/// The view the generated host traits are implemented on.
pub(crate) struct KvView<'a> {
    pub(crate) ctx: &'a KvCtx,
    pub(crate) table: &'a mut ResourceTable,
}

/// Marker for `add_to_linker`.
pub(crate) struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

/// A failure the guest sees as its version's `error` variant.
pub(crate) enum Fail {
    NoSuchStore,
    /// A Spin store label the app was not deployed with.
    AccessDenied,
    Other(String),
}

/// The most keys Spin's `get-keys` answers: they are gathered on the host before the guest
/// gets them.
pub(crate) const MAX_KEYS: usize = 10_000;

/// The keys listed, and why the listing stopped short if it did.
pub(crate) type Listed = (Vec<String>, Option<Fail>);

/// Every live key of `ns`, page by page, up to [`MAX_KEYS`]; past them, the first ones and why
/// the listing stopped (Spin's `get-keys`).
pub(crate) fn all_keys(store: &Store, ns: &Namespace) -> Outcome<Listed> {
    let (mut all, mut after) = (Vec::new(), None::<Vec<u8>>);
    loop {
        let (keys, next) = match outcome(store.list_keys(ns, after.as_deref(), store.bounds().max_page))? {
            Ok(page) => page,
            Err(e) => return Ok(Err(e)),
        };
        all.extend(keys.into_iter().map(|k| String::from_utf8_lossy(&k).into_owned()));
        // More than the cap, whatever the page size: listed or still to come.
        if all.len() > MAX_KEYS || (all.len() == MAX_KEYS && next.is_some()) {
            all.truncate(MAX_KEYS);
            let why =
                format!("the store holds more than {MAX_KEYS} keys: only the first {MAX_KEYS} are listed");
            return Ok(Ok((all, Some(Fail::Other(why)))));
        }
        match next {
            Some(cursor) => after = Some(cursor),
            None => return Ok(Ok((all, None))),
        }
    }
}

/// Reads `key`, noting the entry in `touched`.
pub(crate) fn read(
    store: &Store,
    touched: Option<&Touched>,
    ns: &Namespace,
    key: &str,
) -> Outcome<Option<Vec<u8>>> {
    outcome(store.get_noting(ns, key.as_bytes(), touched))
}

/// Writes `key`, noting the acknowledged write in `touched` (with the entry as it is after, for
/// an increment or a swap: what they answer shows more than the write).
pub(crate) async fn write(
    store: &Store,
    touched: Option<&Touched>,
    ns: &Namespace,
    key: &str,
    write: Write,
) -> Outcome<Written> {
    let read_back = matches!(write, Write::Increment(_) | Write::CompareAndSwap { .. });
    let written = outcome(store.guest_write(ns, key.as_bytes(), write).await)?;
    match (&written, touched) {
        (Ok(_), Some(touched)) => {
            outcome(store.note_write(touched, ns, read_back.then_some(key.as_bytes())))?.ok();
        }
        // A refused increment (not a number, an overflow) still told the guest what the key holds.
        (Err(_), Some(touched)) if read_back => {
            outcome(store.get_noting(ns, key.as_bytes(), Some(touched)))?.ok();
        }
        _ => {}
    }
    Ok(written)
}

/// A listing, noting everything the store holds in `touched` (the keys it did not return are
/// something seen too).
pub(crate) fn listed<T>(store: &Store, touched: Option<&Touched>, listing: Outcome<T>) -> Outcome<T> {
    if let Some(touched) = touched {
        touched.all(&store.seen());
    }
    listing
}

/// The outcome of an operation: `Err` traps (storage failure), `Ok(Err)` is the guest's error.
pub(crate) type Outcome<T> = wasmtime::Result<Result<T, Fail>>;

fn outcome<T>(result: Result<T, KvError>) -> Outcome<T> {
    match result {
        Ok(v) => Ok(Ok(v)),
        Err(KvError::Storage(e)) => Err(StorageUnavailable(e).into()),
        Err(KvError::Closed) => Err(StorageUnavailable("the store is closed".into()).into()),
        Err(KvError::Unavailable(reason)) => Err(StorageUnavailable(reason).into()),
        Err(other) => Ok(Err(Fail::Other(other.to_string()))),
    }
}

impl KvView<'_> {
    fn store(&self) -> Result<&Store, Fail> {
        self.ctx.store.as_ref().ok_or(Fail::NoSuchStore)
    }

    fn open(&mut self, identifier: &str) -> Outcome<Resource<Bucket>> {
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        // Closed to guests while the site resyncs (writes: see `write`).
        outcome(store.gate())?.ok();
        let ns = match outcome(Namespace::new(&self.ctx.app, identifier, store.bounds()))? {
            Ok(ns) => ns,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(self.table.push(Bucket { ns })?))
    }

    /// Opens a Spin store by label: `default` always, any other only if the app was deployed
    /// with it (Spin's `key_value_stores`), else `access-denied`.
    fn open_label(&mut self, label: &str) -> Outcome<Resource<Bucket>> {
        if label != "default" && !self.ctx.labels.iter().any(|l| l == label) {
            return Ok(Err(Fail::AccessDenied));
        }
        self.open(label)
    }

    /// Every live key of the bucket, up to [`MAX_KEYS`] (Spin's `get-keys`).
    fn keys(&self, bucket: &Resource<Bucket>) -> Outcome<Listed> {
        match self.listing(bucket)? {
            Ok((store, ns)) => listed(store, self.ctx.touched.as_deref(), all_keys(store, &ns)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// The store and the bucket's namespace for a listing: counted, past the read gate.
    fn listing(&self, bucket: &Resource<Bucket>) -> Outcome<(&Store, Namespace)> {
        let ns = self.ns(bucket)?;
        count("list");
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        outcome(store.gate())?.ok();
        Ok(Ok((store, ns)))
    }

    fn ns(&self, bucket: &Resource<Bucket>) -> wasmtime::Result<Namespace> {
        Ok(self.table.get(bucket)?.ns.clone())
    }

    fn get(&self, bucket: &Resource<Bucket>, key: &str) -> Outcome<Option<Vec<u8>>> {
        let ns = self.ns(bucket)?;
        count("get");
        match self.store() {
            Ok(store) => {
                // Checked on every read, not only at open: a resync may begin while a request
                // holds a bucket.
                outcome(store.gate())?.ok();
                read(store, self.ctx.touched.as_deref(), &ns, key)
            }
            Err(e) => Ok(Err(e)),
        }
    }

    async fn write(&mut self, bucket: &Resource<Bucket>, key: &str, op_write: Write) -> Outcome<Written> {
        let ns = self.ns(bucket)?;
        let op = match op_write {
            Write::Set(_) => "set",
            Write::Delete | Write::DeleteIf { .. } => "delete",
            Write::Increment(_) => "increment",
            Write::CompareAndSwap { .. } => "compare_and_swap",
        };
        count(op);
        match self.store() {
            Ok(store) => {
                // Closed to guest writes while the site resyncs, has a clock off, is refused by
                // its peers or waits for them to confirm it (the request fails with 503).
                outcome(store.write_gate())?.ok();
                write(store, self.ctx.touched.as_deref(), &ns, key, op_write).await
            }
            Err(e) => Ok(Err(e)),
        }
    }

    async fn set(&mut self, bucket: &Resource<Bucket>, key: &str, value: Vec<u8>) -> Outcome<()> {
        Ok(self.write(bucket, key, Write::Set(value)).await?.map(drop))
    }

    async fn delete(&mut self, bucket: &Resource<Bucket>, key: &str) -> Outcome<()> {
        Ok(self.write(bucket, key, Write::Delete).await?.map(drop))
    }

    async fn increment(&mut self, bucket: &Resource<Bucket>, key: &str, delta: i64) -> Outcome<i64> {
        Ok(self.write(bucket, key, Write::Increment(delta)).await?.and_then(|w| match w {
            Written::Total(total) => Ok(total),
            other => Err(Fail::Other(format!("unexpected store answer {other:?}"))),
        }))
    }

    /// One page of keys after `after` (exclusive; `None`: from the start).
    fn list(&self, bucket: &Resource<Bucket>, after: Option<&str>) -> Outcome<(Vec<String>, Option<String>)> {
        let (store, ns) = match self.listing(bucket)? {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let page = store.bounds().max_page;
        let listing = outcome(store.list_keys(&ns, after.map(str::as_bytes), page));
        Ok(listed(store, self.ctx.touched.as_deref(), listing)?.map(|(keys, next)| {
            let keys = keys.into_iter().map(|k| String::from_utf8_lossy(&k).into_owned()).collect();
            (keys, next.map(|c| String::from_utf8_lossy(&c).into_owned()))
        }))
    }

    async fn set_many(&mut self, bucket: &Resource<Bucket>, pairs: Vec<(String, Vec<u8>)>) -> Outcome<()> {
        let writes = pairs.into_iter().map(|(k, v)| (k.into_bytes(), Write::Set(v))).collect();
        self.write_many(bucket, writes).await
    }

    async fn delete_many(&mut self, bucket: &Resource<Bucket>, keys: Vec<String>) -> Outcome<()> {
        let writes = keys.into_iter().map(|k| (k.into_bytes(), Write::Delete)).collect();
        self.write_many(bucket, writes).await
    }

    /// Several writes in one transaction; the first refused one is the guest's error.
    async fn write_many(&mut self, bucket: &Resource<Bucket>, writes: Vec<(Vec<u8>, Write)>) -> Outcome<()> {
        let ns = self.ns(bucket)?;
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        outcome(store.write_gate())?.ok();
        let results = match outcome(store.guest_write_many(&ns, writes).await)? {
            Ok(results) => results,
            Err(e) => return Ok(Err(e)),
        };
        let (mut wrote, mut first_refused) = (false, None);
        for result in results {
            match outcome(result)? {
                Ok(_) => wrote = true,
                Err(e) => first_refused = first_refused.or(Some(e)),
            }
        }
        if let (true, Some(touched)) = (wrote, &self.ctx.touched) {
            outcome(store.note_write(touched, &ns, None))?.ok();
        }
        Ok(first_refused.map_or(Ok(()), Err))
    }

    fn get_many(
        &self,
        bucket: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Outcome<Vec<(String, Option<Vec<u8>>)>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            match self.get(bucket, &key)? {
                Ok(value) => out.push((key, value)),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(out))
    }

    fn new_cas(&mut self, bucket: &Resource<Bucket>, key: String) -> Outcome<Resource<Cas>> {
        let ns = self.ns(bucket)?;
        let current = match self.get(bucket, &key)? {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(self.table.push(Cas { ns, key, current })?))
    }

    /// Swaps if the value is still what the handle read. `Ok(Ok(Err(cas)))`: it changed; the
    /// returned handle holds the new current value.
    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<Result<(), Resource<Cas>>, Fail>> {
        let Cas { ns, key, current } = self.table.delete(cas)?;
        let store = match self.store() {
            Ok(s) => s.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let swap = Write::CompareAndSwap { expected: current, new: value };
        outcome(store.write_gate())?.ok();
        let touched = self.ctx.touched.clone();
        match write(&store, touched.as_deref(), &ns, &key, swap).await? {
            Ok(Written::Swapped(true)) => Ok(Ok(Ok(()))),
            Ok(_) => {
                let now = match read(&store, touched.as_deref(), &ns, &key)? {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                };
                Ok(Ok(Err(self.table.push(Cas { ns, key, current: now })?)))
            }
            Err(e) => Ok(Err(e)),
        }
    }
}
