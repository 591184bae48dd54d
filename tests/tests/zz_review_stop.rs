//! Throwaway review test: does a stopping member start a pull?
use nicsync::sim::{run, Scripted, SimConfig};

#[test]
fn a_stopping_standby_pulls_when_asked() {
    std::env::set_var("NICSYNC_SIM_TRACE_KEY", "tcp 10.0.0.1:1 -> 10.0.0.2:2");
    for seed in [1u64, 2, 3] {
        let mut cfg = SimConfig::new(seed);
        cfg.faults = false;
        cfg.churn_ms = 400;
        let keep_going = Scripted::DropMembership { from: 1, to: 2, on: false };
        cfg.script = vec![
            (400_000_000, Scripted::Stop(2)),
            (400_000_000, Scripted::Resync { at: 1, member: Some(2) }),
            (1_400_000_000, keep_going),
        ];
        let r = run(&cfg);
        let tl = &r.timeline;
        let from = tl.iter().position(|l| l.contains("member 2 stops in order")).expect("stop");
        let to = tl.iter().position(|l| l.contains("member 2 stopped (")).expect("stopped");
        let window: Vec<&String> = tl[from..=to].iter().collect();
        for l in &window {
            if l.contains("member 2") || l.contains("member 1 answers") {
                println!("seed {seed}: {l}");
            }
        }
        let pulled = window
            .iter()
            .any(|l| l.contains("trace: member 2 pulling") || l.contains("trace: member 2 waiting to pull"));
        println!("seed {seed}: pull started while stopping: {pulled}; converged {}", r.converged);
    }
}
