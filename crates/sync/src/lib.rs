//! `atoll-sync`: replication of key-value state between Atoll sites, active-active.
//!
//! Two paths carry a write to every peer: the **push** path streams each acknowledged write to
//! every peer within milliseconds, and **anti-entropy** reconciles each pair of sites on a timer by
//! descending a digest tree into the ranges that differ and exchanging just the differing entries.
//! Everything received goes through atoll-kv's merge, so order and duplication never matter. The
//! protocol and its correctness argument are in `ALGORITHM.md`.
//!
//! Layers: [`message`] (wire format), [`reconcile`] (pure anti-entropy steps), [`node`] (one
//! site's replication state over a [`SyncStore`] and a [`Transport`]), [`auth`] (HMAC proof of the
//! peer secret), [`http`] (the transport and the `/_atoll/sync/` endpoints) and [`driver`] (timers).
#![deny(missing_docs)]

pub mod auth;
pub mod driver;
pub mod frontier;
pub mod http;
pub mod membership;
pub mod message;
pub mod node;
pub mod reconcile;
pub mod store;

pub use node::{Node, NodeConfig, Peer, Transport};
pub use store::SyncStore;
