#![no_main]
//! Fuzz target `control_request`: see `nicsync_fuzz::control_request` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::control_request::run(data));
