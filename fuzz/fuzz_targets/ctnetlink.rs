#![no_main]
//! Fuzz target `ctnetlink`: see `nicsync_fuzz::ctnetlink` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::ctnetlink::run(data));
