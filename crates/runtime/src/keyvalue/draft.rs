//! `wasi:keyvalue@0.2.0-draft` (wasmtime, wasmCloud): u64 increment, u64 (offset) cursor.

use wasmtime::component::Resource;

use super::{Bucket, Fail, KvView};

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

common_host! {
    bucket_methods: {
        /// This version's cursor is a position in the key order: the page starting after that
        /// many keys.
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
    }
    batch_methods: {
        async fn get_many(
            &mut self,
            bucket: Resource<Bucket>,
            keys: Vec<String>,
        ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
            guest(KvView::get_many(self, &bucket, keys).map(|r| {
                r.map(|pairs| pairs.into_iter().map(|(k, v)| v.map(|v| (k, v))).collect())
            }))
        }
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
