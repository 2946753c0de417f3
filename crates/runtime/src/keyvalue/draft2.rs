//! `wasi:keyvalue@0.2.0-draft2` (Spin): s64 increment, string cursor, compare-and-swap.

use wasmtime::component::Resource;

use super::{Bucket, Cas, KvView};

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

common_host! {
    bucket_methods: {
        /// This version's cursor is the last key of the previous page.
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
    }
    batch_methods: {
        async fn get_many(
            &mut self,
            bucket: Resource<Bucket>,
            keys: Vec<String>,
        ) -> wasmtime::Result<Result<Vec<(String, Option<Vec<u8>>)>, store::Error>> {
            guest(KvView::get_many(self, &bucket, keys))
        }
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
            Err(fail) => match guest::<()>(Ok(Err(fail)))? {
                Err(e) => Err(atomics::CasError::StoreError(e)),
                Ok(()) => Ok(()),
            },
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
