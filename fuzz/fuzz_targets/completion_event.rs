#![no_main]
//! Fuzz target `completion_event`: see `nicsync_fuzz::completion_event` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::completion_event::run(data));
