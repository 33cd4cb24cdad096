//! The preamble decoder on arbitrary bytes: it never panics, never claims
//! more bytes than it was given or than MAX_LEN, and whatever it decodes
//! re-encodes to the bytes it consumed (extensions aside).
#![no_main]

use dataplane_common::preamble::{decode, encode, Decoded, MAX_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Decoded::Complete { preamble, len }) => {
            assert!(len <= data.len() && len <= MAX_LEN);
            let mut again = Vec::new();
            encode(&preamble, &mut again);
            let header = again.len() - 2; // everything but the (empty) extension length
            assert_eq!(&again[..header], &data[..header]);
        }
        Ok(Decoded::NeedMore(n)) => assert!(n >= 1 && data.len() + n <= MAX_LEN),
        Err(_) => {}
    }
});
