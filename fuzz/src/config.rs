//! `config`: the daemon's configuration file ([`Config::parse`]) on
//! arbitrary text (the input, decoded as UTF-8 with replacement characters,
//! as a file the daemon reads would have to be valid UTF-8 to get there).
//!
//! Checks: `parse` never panics; its error message formats; a file that
//! parses writes back ([`Config::to_toml`]) to a file that parses to the
//! same configuration (the documented contract of `to_toml`).

use std::path::Path;

use nicsync::config::Config;

/// The target.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new("fuzz.toml")) {
        Ok(cfg) => {
            let again = cfg.to_toml();
            match Config::parse(&again, Path::new("fuzz-again.toml")) {
                Ok(cfg2) => assert!(cfg2 == cfg, "to_toml does not round-trip:\n{again}"),
                Err(e) => panic!("to_toml wrote a file that does not parse: {e}\n{again}"),
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
