//! Runs fuzz inputs through a harness without libFuzzer (stable toolchain,
//! debug build, so a debugger and `NICSYNC_FUZZ_TRACE=1` work):
//!
//! ```text
//! NICSYNC_FUZZ_TRACE=1 cargo run --manifest-path fuzz/Cargo.toml --example replay -- TARGET FILE...
//! ```

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(target) = args.next() else {
        eprintln!("usage: replay TARGET FILE...");
        std::process::exit(2);
    };
    let run: fn(&[u8]) = match target.as_str() {
        "ccp" => nicsync_fuzz::ccp::run,
        "cmd_descriptor" => nicsync_fuzz::cmd_descriptor::run,
        "completion_event" => nicsync_fuzz::completion_event::run,
        "config" => nicsync_fuzz::config::run,
        "control_request" => nicsync_fuzz::control_request::run,
        "ctnetlink" => nicsync_fuzz::ctnetlink::run,
        "delta_frame" => nicsync_fuzz::delta_frame::run,
        "fullsync_chunk" => nicsync_fuzz::fullsync_chunk::run,
        "seal" => nicsync_fuzz::seal::run,
        other => {
            eprintln!("unknown target {other}");
            std::process::exit(2);
        }
    };
    for f in args {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{f}: {e}"));
        eprintln!("== {f} ({} bytes)", data.len());
        run(&data);
        eprintln!("== {f}: ok");
    }
}
