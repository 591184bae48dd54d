#![no_main]
//! Fuzz target `config`: see `nicsync_fuzz::config` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nicsync_fuzz::config::run(data));
