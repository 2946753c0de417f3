//! `atoll-kv`: the replicated key-value state of Atoll's handlers.
//!
//! Every key's state is an [`Entry`]: a last-writer-wins register stamped with a hybrid logical
//! clock ([`Hlc`]) and the writing site, plus a CRDT counter of per-site contributions. [`Entry::merge`]
//! is the one rule by which replicas converge: deterministic, commutative, associative, idempotent.
//!
//! [`Store`] keeps entries in redb, namespaced per app and bucket, with group commit (acknowledged
//! means durable) and per-range digests maintained on every write.
//!
//! This crate knows nothing of HTTP or wasmtime.
#![deny(missing_docs)]

pub mod codec;
pub mod entry;
pub mod hlc;
mod identity;
pub mod store;
mod tables;

pub use entry::{Contribution, Entry, EntryError, Read, Register, SiteId, Stamp};
pub use hlc::{Clock, Hlc};
pub use identity::{Boot, Identity};
pub use store::{
    Admission, Bounds, Change, DIGEST_RANGES, KeyPage, KvError, Namespace, Origin, SeenVector, Store,
    StoreConfig, Touched, Write, Written,
};
pub use tables::range_of;
