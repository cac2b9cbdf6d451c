//! Any bytes as the tail segment: recovery truncates to a valid prefix, never panics, and a
//! second recovery of its result changes nothing (what it keeps is valid).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = dir.path().join(fjord::log::segment_file_name(0, "log"));
    std::fs::write(&seg, data).expect("write segment");
    let first = fjord::log::recovery::recover(dir.path()).expect("recover");
    let size = first.segments.first().map(|s| s.size).unwrap_or(0);
    assert!(size <= data.len() as u64);
    let again = fjord::log::recovery::recover(dir.path()).expect("recover again");
    assert_eq!(again.segments.first().map(|s| s.size).unwrap_or(0), size);
});
