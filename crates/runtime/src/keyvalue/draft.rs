//! `wasi:keyvalue@0.2.0-draft` (wasmtime, wasmCloud): u64 increment, u64 (offset) cursor.

use wasmtime::component::Resource;

use super::{Bucket, Fail, KvView, Outcome};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit/wasi-keyvalue-0.2.0-draft",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": crate::keyvalue::Bucket,
        },
    });
}

use generated::wasi::keyvalue::{atomics, batch, store};

/// Adds this version's interfaces to the linker.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, super::HasKv>(linker, view)?;
    atomics::add_to_linker::<T, super::HasKv>(linker, view)?;
    batch::add_to_linker::<T, super::HasKv>(linker, view)
}

fn guest<T>(outcome: Outcome<T>) -> wasmtime::Result<Result<T, store::Error>> {
    Ok(outcome?.map_err(|fail| match fail {
        Fail::NoSuchStore => store::Error::NoSuchStore,
        Fail::Other(reason) => store::Error::Other(reason),
    }))
}

impl store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> wasmtime::Result<Result<Resource<Bucket>, store::Error>> {
        guest(KvView::open(self, &identifier))
    }
}

impl store::HostBucket for KvView<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        guest(KvView::get(self, &bucket, &key))
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        guest(KvView::set(self, &bucket, &key, value).await)
    }

    async fn delete(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        guest(KvView::delete(self, &bucket, &key).await)
    }

    async fn exists(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, store::Error>> {
        guest(KvView::get(self, &bucket, &key).map(|r| r.map(|v| v.is_some())))
    }

    /// This version's cursor is a position in the key order: the page starting at that many keys.
    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let skip = cursor.unwrap_or(0);
        let mut skipped = 0u64;
        let mut after: Option<String> = None;
        loop {
            let (keys, next) = match self.list(&bucket, after.as_deref())? {
                Ok(page) => page,
                Err(e) => return guest(Ok(Err(e))),
            };
            let n = keys.len() as u64;
            if skipped + n > skip || next.is_none() {
                let from = (skip - skipped).min(n) as usize;
                let keys: Vec<String> = keys.into_iter().skip(from).collect();
                let cursor = next.is_some().then_some(skipped + n);
                return Ok(Ok(store::KeyResponse { keys, cursor }));
            }
            skipped += n;
            after = next;
        }
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<Result<u64, store::Error>> {
        let Ok(delta) = i64::try_from(delta) else {
            return guest(Ok(Err(Fail::Other("increment delta exceeds i64::MAX".into()))));
        };
        guest(KvView::increment(self, &bucket, &key, delta).await.map(|r| {
            r.and_then(|total| {
                u64::try_from(total).map_err(|_| Fail::Other(format!("the counter is negative ({total})")))
            })
        }))
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
        guest(
            KvView::get_many(self, &bucket, keys)
                .map(|r| r.map(|pairs| pairs.into_iter().map(|(k, v)| v.map(|v| (k, v))).collect())),
        )
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        guest(KvView::set_many(self, &bucket, key_values).await)
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        guest(KvView::delete_many(self, &bucket, keys).await)
    }
}
