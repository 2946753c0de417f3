//! Integration tests of atoll-kv.

mod merge_properties;
mod store;
