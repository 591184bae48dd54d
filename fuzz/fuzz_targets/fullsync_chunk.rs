#![no_main]
//! Fuzz target `fullsync_chunk`: see `nicsync_fuzz::fullsync_chunk` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::fullsync_chunk::run(data));
