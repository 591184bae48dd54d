#![no_main]
//! Fuzz target `ccp`: see `nicsync_fuzz::ccp` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::ccp::run(data));
