//! Any frame body: decoding returns a request or an error, never panics or aborts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = bytes::Bytes::copy_from_slice(data);
    let _ = fjord::server::decode_request(&frame);
});
