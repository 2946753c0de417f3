//! `spin:key-value/key-value@3.0.0` (Spin 4: spin-sdk 6 and 7), for WASI 0.3 guests: every
//! function is async, and `get-keys` answers a stream.
//!
//! Spin's semantics: a store is opened by label; `default` is always allowed, any other label
//! only if the app was deployed with it (`atoll deploy --kv-store LABEL`), else `access-denied`.
//! A label is the app's bucket of that name, so `wasi:keyvalue` opening the same name sees the
//! same data. Deleting a missing key succeeds; `get-keys` lists exactly the live keys (up to
//! 10,000). A request has at most 16 calls in flight (each holds its value on the host).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use atoll_kv::{Namespace, Store, Write};
use wasmtime::component::{Accessor, FutureReader, Resource, StreamReader};

use super::{Bucket, Fail, HasKv, KvView, Listed, all_keys, outcome};

mod generated {
    wasmtime::component::bindgen!({
        inline: "package atoll:host; world spin-kv { import spin:key-value/key-value@3.0.0; }",
        path: "../../wit/spin-key-value-3.0.0",
        imports: { default: trappable },
        with: {
            "spin:key-value/key-value.store": crate::keyvalue::Bucket,
        },
    });
}

use generated::spin::key_value::key_value::{self as kv, Error};

/// Adds `spin:key-value@3.0.0` to a linker (of an engine with the component model's async
/// support).
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    kv::add_to_linker::<T, HasKv>(linker, view)
}

/// A failure as Spin's error variant.
fn spin<T>(result: wasmtime::Result<Result<T, Fail>>) -> wasmtime::Result<Result<T, Error>> {
    Ok(result?.map_err(|fail| match fail {
        Fail::NoSuchStore => Error::NoSuchStore,
        Fail::AccessDenied => Error::AccessDenied,
        Fail::Other(reason) => Error::Other(reason),
    }))
}

/// The most Spin key-value calls one request may have in flight: each holds its value on the
/// host, outside the guest's memory cap, so a guest starting thousands at once is refused past
/// this (`other`), as a WASI 0.2 guest (one call at a time) never could be.
const MAX_IN_FLIGHT: usize = 16;

/// One of a request's calls in flight, counted until dropped.
struct Call(Arc<AtomicUsize>);

impl Drop for Call {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether an operation writes: writes pass the store's write gate, reads its read gate.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    Read,
    Write,
}

/// What operation `op` needs, taken from the request's state before it awaits anything, and its
/// place among the request's calls in flight; counted, and past the store's gate (closed while
/// the site resyncs, and to writes while its clock is off: the request fails with 503, as for
/// `wasi:keyvalue`).
fn target<U>(
    accessor: &Accessor<U, HasKv>,
    bucket: &Resource<Bucket>,
    op: &'static str,
    access: Access,
) -> wasmtime::Result<Result<Target, Fail>> {
    let target = match take(accessor, bucket)? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    super::count(op);
    let store = &target.0;
    let gate = if access == Access::Write { store.write_gate() } else { store.gate() };
    Ok(outcome(gate)?.map(|()| target))
}

/// The request's store, the bucket's namespace, a place among its calls in flight, and where
/// the request notes what it saw.
type Target = (Store, Namespace, Call, Option<std::sync::Arc<atoll_kv::Touched>>);

/// The request's store, the bucket's namespace and a place among its calls in flight.
fn take<U>(
    accessor: &Accessor<U, HasKv>,
    bucket: &Resource<Bucket>,
) -> wasmtime::Result<Result<Target, Fail>> {
    accessor.with(|mut access| {
        let view = access.get();
        let ns = view.table.get(bucket)?.ns.clone();
        let counter = view.ctx.in_flight.clone();
        let call = Call(counter.clone());
        if counter.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            return Ok(Err(Fail::Other(format!(
                "more than {MAX_IN_FLIGHT} key-value calls in flight in one request"
            ))));
        }
        let touched = view.ctx.touched.clone();
        Ok(view.ctx.store.clone().map(|store| (store, ns, call, touched)).ok_or(Fail::NoSuchStore))
    })
}

async fn write<U>(
    accessor: &Accessor<U, HasKv>,
    bucket: &Resource<Bucket>,
    key: &str,
    write: Write,
    op: &'static str,
) -> wasmtime::Result<Result<(), Fail>> {
    let (store, ns, _call, touched) = match target(accessor, bucket, op, Access::Write)? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    Ok(super::write(&store, touched.as_deref(), &ns, key, write).await?.map(drop))
}

fn read(
    accessor: &Accessor<impl Sized, HasKv>,
    bucket: &Resource<Bucket>,
    key: &str,
) -> wasmtime::Result<Result<Option<Vec<u8>>, Fail>> {
    let (store, ns, _call, touched) = match target(accessor, bucket, "get", Access::Read)? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    super::read(&store, touched.as_deref(), &ns, key)
}

/// Every live key of the bucket, up to [`super::MAX_KEYS`]; past them, the keys so far and why the
/// listing stopped (the stream holds the first ones, the result future says why).
fn keys(
    accessor: &Accessor<impl Sized, HasKv>,
    bucket: &Resource<Bucket>,
) -> wasmtime::Result<Result<Listed, Fail>> {
    let (store, ns, _call, touched) = match target(accessor, bucket, "list", Access::Read)? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    super::listed(&store, touched.as_deref(), all_keys(&store, &ns))
}

impl kv::Host for KvView<'_> {}

impl kv::HostStore for KvView<'_> {
    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl<T: Send> kv::HostStoreWithStore<T> for HasKv {
    async fn open(
        accessor: &Accessor<T, Self>,
        label: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, Error>> {
        accessor.with(|mut access| spin(access.get().open_label(&label)))
    }

    async fn get(
        accessor: &Accessor<T, Self>,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        spin(read(accessor, &bucket, &key))
    }

    async fn set(
        accessor: &Accessor<T, Self>,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        spin(write(accessor, &bucket, &key, Write::Set(value), "set").await)
    }

    async fn delete(
        accessor: &Accessor<T, Self>,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), Error>> {
        spin(write(accessor, &bucket, &key, Write::Delete, "delete").await)
    }

    async fn exists(
        accessor: &Accessor<T, Self>,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, Error>> {
        spin(read(accessor, &bucket, &key).map(|r| r.map(|v| v.is_some())))
    }

    async fn get_keys(
        accessor: &Accessor<T, Self>,
        bucket: Resource<Bucket>,
    ) -> wasmtime::Result<(StreamReader<String>, FutureReader<Result<(), Error>>)> {
        let (keys, result) = match keys(accessor, &bucket)? {
            Ok((keys, None)) => (keys, Ok(())),
            Ok((keys, Some(stopped))) => (keys, spin(Ok(Err(stopped)))?),
            Err(e) => (Vec::new(), spin(Ok(Err(e)))?),
        };
        accessor.with(|mut access| {
            let stream = StreamReader::new(&mut access, keys)?;
            let future =
                FutureReader::new(&mut access, std::future::ready(Ok::<_, wasmtime::Error>(result)))?;
            Ok((stream, future))
        })
    }
}
