#![no_main]
//! Fuzz target `delta_frame`: see `nicsync_fuzz::delta_frame` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::delta_frame::run(data));
