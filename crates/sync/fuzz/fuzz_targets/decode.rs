//! The sync message decoder on arbitrary bytes: it must return a value or an error, never panic,
//! and whatever it accepts must re-encode to the same bytes.
#![no_main]

use atoll_sync::message::{Reply, Request, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode::<Request>(data) {
        assert_eq!(decode::<Request>(&encode(&request)).ok(), Some(request));
    }
    if let Ok(reply) = decode::<Reply>(data) {
        assert_eq!(decode::<Reply>(&encode(&reply)).ok(), Some(reply));
    }
});
