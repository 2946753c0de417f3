//! Paths of the example and test guests, built for `wasm32-wasip2` by this crate's build script.
//!
//! Tests read the components with `std::fs::read(atoll_test_guests::HELLO)`.
#![deny(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/guests.rs"));
