//! `fermyon:spin/key-value@2.0.0` (Spin 2 and 3: spin-sdk 2–5), for WASI 0.2 and 0.3 guests:
//! the same semantics as [`super::spin`] with synchronous functions and `get-keys` as a list.
//!
//! `get-keys` answers every live key, or, past [`super::MAX_KEYS`], the error `other` rather than
//! a list silently cut short.

use wasmtime::component::Resource;

use super::{Bucket, Fail, KvView, Outcome};

mod generated {
    wasmtime::component::bindgen!({
        inline: "package atoll:host; world spin-kv { import fermyon:spin/key-value@2.0.0; }",
        path: "../../wit/fermyon-spin-2.0.0",
        imports: { default: async | trappable },
        with: {
            "fermyon:spin/key-value.store": crate::keyvalue::Bucket,
        },
    });
}

use generated::fermyon::spin::key_value::{self as kv, Error};

/// Adds `fermyon:spin/key-value@2.0.0` to a linker.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    kv::add_to_linker::<T, super::HasKv>(linker, view)
}

/// A failure as this interface's error variant.
fn spin<T>(outcome: Outcome<T>) -> wasmtime::Result<Result<T, Error>> {
    Ok(outcome?.map_err(|fail| match fail {
        Fail::NoSuchStore => Error::NoSuchStore,
        Fail::AccessDenied => Error::AccessDenied,
        Fail::Other(reason) => Error::Other(reason),
    }))
}

impl kv::Host for KvView<'_> {}

impl kv::HostStore for KvView<'_> {
    async fn open(&mut self, label: String) -> wasmtime::Result<Result<Resource<Bucket>, Error>> {
        spin(self.open_label(&label))
    }

    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        spin(KvView::get(self, &bucket, &key))
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        spin(KvView::set(self, &bucket, &key, value).await)
    }

    /// Deleting a missing key succeeds (a tombstone over nothing).
    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<(), Error>> {
        spin(KvView::delete(self, &bucket, &key).await)
    }

    async fn exists(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, Error>> {
        spin(KvView::get(self, &bucket, &key).map(|r| r.map(|v| v.is_some())))
    }

    async fn get_keys(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<Result<Vec<String>, Error>> {
        spin(self.keys(&bucket).map(|r| {
            r.and_then(|(keys, stopped)| match stopped {
                None => Ok(keys),
                Some(why) => Err(why),
            })
        }))
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}
