//! `nicsync chaos`: a fault campaign.
//!
//! Seeded simulated clusters ([`crate::sim`]: three members on emulated
//! devices, sealed sync traffic, virtual time) run back to back until the
//! wall-clock budget is spent. Each one churns connections through the
//! Active while everything that can go wrong does, at random:
//!
//! * **device faults** on any member's card: dropped, corrupted (tag,
//!   phase) completions, stalls, spurious interrupts, DMA errors, a reset in
//!   the middle of a batch, an entry the table silently loses; the host
//!   detects and recovers them from its own copy of the table. Odd members
//!   take their completions by interrupt, even ones poll (as `nicsync sim
//!   --device-faults` runs them), so both paths meet every fault, and
//!   spurious interrupts strike hosts that have interrupts enabled;
//! * **network faults**: loss (up to 20 %), duplication, reordering, a
//!   partitioned member, Full Sync streams cut midway;
//! * **attacks** on the sync network: replayed, tampered and forged delta
//!   frames and membership datagrams;
//! * **member faults**: a crash and restart, a late join, a manual resync.
//!
//! At the end of each run the faults stop and the cluster settles; then
//! every member's table digest is compared and every write the workload had
//! acknowledged is looked up. `lost_connections` and `diverged_members` must
//! be 0.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::sim::{self, RefusedTotals, SimConfig};

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// Wall-clock budget: runs start until it is spent.
    pub seconds: f64,
    /// Seed of the first run (the next runs take the following seeds).
    pub seed: u64,
    /// Virtual milliseconds of churn and faults per run.
    pub churn_ms: u64,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions { seconds: 60.0, seed: 0xC4A05, churn_ms: 2000 }
    }
}

/// The campaign's result (`--json` keys).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChaosReport {
    /// Wall-clock seconds spent.
    pub seconds: f64,
    /// Simulated cluster runs.
    pub runs: u64,
    /// Seeds of the runs, first and last (replay one with
    /// `nicsync sim --seed S --device-faults --attacks`).
    pub seeds: (u64, u64),
    /// Virtual milliseconds of churn under faults, all runs.
    pub churn_ms: u64,
    /// Faults injected, all kinds.
    pub faults_injected: u64,
    /// Faults injected, by kind.
    pub faults_by_kind: BTreeMap<String, u64>,
    /// Table updates the workload made that a device acknowledged.
    pub updates_applied: u64,
    /// Peer updates applied by the members' devices (Delta Sync), counted
    /// on the members alive at the end of each run.
    pub sync_updates_applied: u64,
    /// Acknowledged writes missing or wrong at the end (must be 0).
    pub lost_connections: u64,
    /// Members whose table differed from the majority at the end (must be 0).
    pub diverged_members: u64,
    /// Sealed traffic the members refused (the attacks' effect).
    pub refused: RefusedTotals,
    /// Device fault recoveries the hosts made.
    pub device_recoveries: u64,
    /// Spurious completion interrupts the interrupt-driven members' hosts
    /// took and ignored.
    pub spurious_interrupts: u64,
    /// Device fault kinds that never struck (every kind should, in a
    /// campaign of some length).
    pub device_faults_missing: Vec<String>,
    /// Runs that did not converge, with the first check that failed.
    pub failed_runs: Vec<(u64, String)>,
}

impl ChaosReport {
    /// Whether nothing was lost and nothing diverged.
    pub fn passed(&self) -> bool {
        self.lost_connections == 0 && self.diverged_members == 0 && self.failed_runs.is_empty() && self.runs > 0
    }
}

/// The simulator settings of one chaos run.
pub fn run_config(seed: u64, churn_ms: u64) -> SimConfig {
    let mut cfg = SimConfig::new(seed);
    cfg.churn_ms = churn_ms;
    cfg.sealed = true;
    cfg.attacks = true;
    cfg.device_faults = true;
    cfg
}

/// Runs the campaign.
pub fn run(o: &ChaosOptions) -> ChaosReport {
    let started = Instant::now();
    let mut r = ChaosReport { seeds: (o.seed, o.seed), ..Default::default() };
    let mut seed = o.seed;
    // At least one run, however small the budget.
    while r.runs == 0 || started.elapsed().as_secs_f64() < o.seconds {
        let rep = sim::run(&run_config(seed, o.churn_ms));
        r.runs += 1;
        r.seeds.1 = seed;
        r.churn_ms += o.churn_ms;
        for (k, v) in &rep.faults {
            *r.faults_by_kind.entry(k.clone()).or_default() += u64::from(*v);
            r.faults_injected += u64::from(*v);
        }
        r.updates_applied += rep.writes_acked;
        r.sync_updates_applied += rep.sync_updates_applied;
        r.lost_connections += rep.lost_connections;
        r.diverged_members += rep.diverged_members;
        r.device_recoveries += rep.device_recoveries;
        r.spurious_interrupts += rep.spurious_interrupts;
        r.refused.auth_failures += rep.refused.auth_failures;
        r.refused.replays_dropped += rep.refused.replays_dropped;
        r.refused.unknown_member += rep.refused.unknown_member;
        r.refused.malformed += rep.refused.malformed;
        if !rep.converged {
            r.failed_runs.push((seed, rep.failure.unwrap_or_default()));
        }
        seed = seed.wrapping_add(1);
    }
    r.seconds = started.elapsed().as_secs_f64();
    r.device_faults_missing = nicsync_model::fault::FaultKind::ALL
        .iter()
        .map(|k| format!("device_{}", k.name()))
        .filter(|k| r.faults_by_kind.get(k).is_none_or(|n| *n == 0))
        .collect();
    r
}

/// The report as text.
pub fn render(r: &ChaosReport) -> String {
    let mut out = format!(
        "nicsync chaos: {} runs (seeds {}..={}) in {:.1} s, {} virtual ms of churn\n",
        r.runs, r.seeds.0, r.seeds.1, r.seconds, r.churn_ms
    );
    out.push_str(&format!("  faults injected: {}\n", r.faults_injected));
    for (k, v) in &r.faults_by_kind {
        out.push_str(&format!("    {k:<26} {v}\n"));
    }
    out.push_str(&format!(
        "  updates applied: {} by the workload, {} by Delta Sync; device recoveries: {}; spurious interrupts ignored: {}\n",
        r.updates_applied, r.sync_updates_applied, r.device_recoveries, r.spurious_interrupts
    ));
    if !r.device_faults_missing.is_empty() {
        out.push_str(&format!("  device faults that never struck: {}\n", r.device_faults_missing.join(", ")));
    }
    out.push_str(&format!(
        "  refused: {} authentication failures, {} replays, {} unknown member, {} malformed\n",
        r.refused.auth_failures, r.refused.replays_dropped, r.refused.unknown_member, r.refused.malformed
    ));
    out.push_str(&format!(
        "  lost connections: {}, diverged members: {} -> {}\n",
        r.lost_connections,
        r.diverged_members,
        if r.passed() { "PASSED" } else { "FAILED" }
    ));
    for (s, why) in &r.failed_runs {
        out.push_str(&format!("  seed {s} failed: {why}\n"));
    }
    out
}
