#![no_main]
//! Fuzz target `cmd_descriptor`: see `nicsync_fuzz::cmd_descriptor` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::cmd_descriptor::run(data));
