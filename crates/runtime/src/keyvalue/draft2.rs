//! `wasi:keyvalue@0.2.0-draft2` (Spin): s64 increment, string cursor, compare-and-swap.

use wasmtime::component::Resource;

use super::{Bucket, Cas, Fail, KvView, Outcome};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit/wasi-keyvalue-0.2.0-draft2",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": crate::keyvalue::Bucket,
            "wasi:keyvalue/atomics.cas": crate::keyvalue::Cas,
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

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<String>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        guest(
            self.list(&bucket, cursor.as_deref())
                .map(|r| r.map(|(keys, cursor)| store::KeyResponse { keys, cursor })),
        )
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
        delta: i64,
    ) -> wasmtime::Result<Result<i64, store::Error>> {
        guest(KvView::increment(self, &bucket, &key, delta).await)
    }

    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), atomics::CasError>> {
        Ok(match KvView::swap(self, cas, value).await? {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cas)) => Err(atomics::CasError::CasFailed(cas)),
            Err(fail) => Err(atomics::CasError::StoreError(
                guest::<()>(Ok(Err(fail)))?.err().unwrap_or(store::Error::AccessDenied),
            )),
        })
    }
}

impl atomics::HostCas for KvView<'_> {
    async fn new(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Resource<Cas>, store::Error>> {
        guest(self.new_cas(&bucket, key))
    }

    async fn current(
        &mut self,
        cas: Resource<Cas>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        Ok(Ok(self.table.get(&cas)?.current.clone()))
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<(String, Option<Vec<u8>>)>, store::Error>> {
        guest(KvView::get_many(self, &bucket, keys))
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
