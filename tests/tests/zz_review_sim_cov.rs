//! Throwaway review test: how often the seeded orderly stop runs, is skipped, or masks the crash.
use nicsync::sim::{run, SimConfig};

#[test]
fn seeded_stop_coverage() {
    let n: u64 = std::env::var("SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let (mut stops, mut skipped, mut none_writer, mut no_crash, mut failed) = (0, 0, 0, 0, 0);
    for seed in 1..=n {
        let r = run(&SimConfig::new(seed));
        let tl = r.timeline.join("\n");
        let began = r.faults.get("orderly_stop").copied().unwrap_or(0);
        if began > 0 {
            stops += 1;
        }
        if tl.contains("no orderly stop: the cluster is not whole") {
            skipped += 1;
        }
        if began == 0 && !tl.contains("no orderly stop") {
            none_writer += 1;
        }
        if r.faults.get("crash").copied().unwrap_or(0) == 0 {
            no_crash += 1;
        }
        if r.stop_unacked > 0 || tl.contains("only copy") {
            println!("seed {seed}: stop_unacked {} handovers {:?}", r.stop_unacked, r.stop_handovers_ms);
        }
        if !r.converged {
            failed += 1;
            println!("seed {seed} failed: {:?}", r.failure);
        }
    }
    println!("{n} seeds: stop began {stops}, skipped (not whole) {skipped}, no writer {none_writer}, no crash counted {no_crash}, failed {failed}");
}
