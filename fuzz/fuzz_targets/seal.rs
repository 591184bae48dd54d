#![no_main]
//! Fuzz target `seal`: see `nicsync_fuzz::seal` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::seal::run(data));
