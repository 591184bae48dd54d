#![allow(clippy::expect_used)] // test code: a failed set-up is a failed test
//! Device faults survived (docs/faults.md). For every fault the model can
//! inject, a table of 1,000 connections is built, the fault is armed and
//! strikes during a batch of updates, deletes and inserts, and the test
//! proves that every operation returned what it would have without the
//! fault, that the card then holds exactly the connections an independent
//! expected map says (state, generation, NAT), and that the counter of the
//! recovery moved. Each scenario also runs once without recovery, to show
//! that the fault does break it there (so the recovery is what saves it).
//!
//! The device runs inline (every MMIO write runs the design to quiescence),
//! so the faults strike at the same command in every run; one test runs the
//! model on its polling thread with faults armed at random (seeded).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nicsync::driver::{CompletionMode, RecoveryStats};
use nicsync::table::{AuditReport, RecoveryConfig};
use nicsync::{ConnEntry, ConnTable, Driver, DriverConfig, DriverError, TableError, TableOp};
use nicsync_fwif::cmd::{CommandDescriptor, DescFlags, Opcode};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Nat, NatKind};
use nicsync_fwif::cpl::CplStatus;
use nicsync_fwif::regs::{self, Counter, Status};
use nicsync_model::fault::{Fault, FaultInjector, FaultKind, Trigger};
use nicsync_model::rng::SeededRng;
use nicsync_model::sync::SenderConfig;
use nicsync_model::sync_unit::{SyncUnit, SyncUnitConfig};
use nicsync_model::wire::{HubConfig, Impairment, InProcessHub};
use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::EmulatedDevice;

type Table = ConnTable<EmulatedDevice>;

/// Connections in the table before the fault.
const N: u32 = 1000;

fn cfg() -> DriverConfig {
    DriverConfig {
        // 256 slots: a batch of 1,100 operations takes several doorbells.
        cmd_ring_log2: 8,
        table_capacity: 8192,
        aging_period_ms: 0,
        completion_timeout: Duration::from_millis(100),
        // One seed, so that runs compared with each other walk and age
        // their tables in the same order.
        table_hash_seed: Some(nicsync_fwif::hash::TableHashSeed([0x5eed, 1])),
        ..DriverConfig::default()
    }
}

fn key(i: u32) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a00_0000 + i),
        1024 + (i % 50_000) as u16,
        Ipv4Addr::new(198, 51, 100, 9),
        443,
        proto::TCP,
        0,
    )
}

fn nat(i: u32) -> Nat {
    Nat::new(NatKind::Source, IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i % 250) as u8 + 1)), 2000 + (i % 1000) as u16)
}

fn state(mark: u32) -> ConnState {
    ConnState { tcp_state: 3, mark: mark.into(), ..ConnState::default() }
}

/// What a connection must look like on the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Want {
    mark: u32,
    generation: u32,
    nat: Nat,
}

/// The expected table, kept by the test from its own operations (the
/// device numbers generations: 1 on insert, +1 per update).
#[derive(Default)]
struct Expected(HashMap<ConnKey, Want>);

impl Expected {
    /// Applies `op` as the device would if it succeeded.
    fn apply(&mut self, op: &TableOp) {
        match op {
            TableOp::Insert(k, e) => {
                self.0.insert(*k, Want { mark: e.state.mark.get(), generation: 1, nat: e.nat.unwrap_or_default() });
            }
            TableOp::Update(k, e) => {
                let w = self.0.get_mut(k).expect("the test updates only present keys");
                w.mark = e.state.mark.get();
                w.generation += 1;
                if let Some(n) = e.nat {
                    w.nat = n;
                }
            }
            TableOp::Delete(k) => {
                self.0.remove(k);
            }
            other => panic!("not used here: {other:?}"),
        }
    }
}

fn open_with(dev: EmulatedDevice, cfg: DriverConfig, recovery: bool) -> (Table, FaultInjector) {
    let faults = dev.faults();
    let mut t = ConnTable::open(dev, cfg).expect("probe");
    if recovery {
        t.enable_recovery(RecoveryConfig::default()).expect("enable recovery");
    }
    (t, faults)
}

fn open(recovery: bool) -> (Table, FaultInjector) {
    open_with(EmulatedDevice::inline().expect("emulated device"), cfg(), recovery)
}

/// Inserts keys 0..N (every fourth with a NAT translation).
fn populate(t: &mut Table, want: &mut Expected) {
    let ops: Vec<TableOp> = (0..N)
        .map(|i| TableOp::Insert(key(i), ConnEntry { state: state(i), nat: (i % 4 == 0).then(|| nat(i)) }))
        .collect();
    let res = t.batch(&ops).expect("populate");
    assert!(res.iter().all(Result::is_ok), "populate failed");
    ops.iter().for_each(|op| want.apply(op));
}

/// Round `r` of churn over the present keys: most are updated (some with
/// a new NAT), every tenth deleted, and 100 new keys inserted.
fn churn(r: u32, want: &Expected) -> Vec<TableOp> {
    let mut present: Vec<ConnKey> = want.0.keys().copied().collect();
    present.sort_by_key(|k| k.src_ip().map(|ip| format!("{ip:?}")));
    let mut ops = Vec::new();
    for (n, k) in present.iter().enumerate() {
        let n = n as u32;
        match (n + r) % 10 {
            3 => ops.push(TableOp::Delete(*k)),
            7 => ops.push(TableOp::Update(*k, ConnEntry { state: state(50_000 + n + r), nat: Some(nat(n + r)) })),
            _ => ops.push(TableOp::Update(*k, ConnEntry::new(state(10_000 + n + 7 * r)))),
        }
    }
    let base = N + 1000 * (r + 1);
    ops.extend((0..100).map(|j| TableOp::Insert(key(base + j), ConnEntry::new(state(base + j)))));
    ops
}

/// Runs `ops` as one batch; on success updates `want`.
fn run(t: &mut Table, ops: &[TableOp], want: &mut Expected) -> Result<(), String> {
    let res = t.batch(ops).map_err(|e| format!("batch failed: {e}"))?;
    let bad: Vec<String> =
        res.iter().zip(ops).filter_map(|(r, op)| r.as_ref().err().map(|e| format!("{op:?}: {e}"))).take(3).collect();
    if !bad.is_empty() {
        return Err(format!("operations failed: {bad:?}"));
    }
    ops.iter().for_each(|op| want.apply(op));
    Ok(())
}

/// Differences between the card's table (a SNAPSHOT walk of the device)
/// and the expected map.
fn differences(t: &mut Table, want: &Expected) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for r in t.snapshot() {
        match r {
            Ok(rec) => {
                seen.insert(rec.key, rec);
            }
            Err(e) => {
                out.push(format!("walk failed: {e}"));
                return out;
            }
        }
    }
    for (k, w) in &want.0 {
        match seen.get(k) {
            None => out.push(format!("{k} missing")),
            Some(rec) => {
                let got = Want { mark: rec.state.mark.get(), generation: rec.state.generation.get(), nat: rec.nat };
                if got != *w || rec.state.tcp_state != 3 {
                    out.push(format!("{k}: card {got:?}, expected {w:?}"));
                }
            }
        }
    }
    out.extend(seen.keys().filter(|k| !want.0.contains_key(k)).map(|k| format!("{k} should not be there")));
    out
}

fn assert_intact(t: &mut Table, want: &Expected) {
    let diff = differences(t, want);
    assert!(diff.is_empty(), "{} differences, first: {:?}", diff.len(), &diff[..diff.len().min(5)]);
    assert_eq!(t.len(), want.0.len(), "TABLE_COUNT");
    assert!(!t.driver().status().contains(Status::FATAL));
    // A reset for recovery wrote the same seed: the card and the host's
    // copy still hash alike.
    let card = *t.driver_ref().device().nic().core().table().hash();
    assert_eq!(card, t.driver_ref().table_hash(), "the card lost the host's seed");
    if let Some(copy) = t.shadow() {
        assert_eq!(*copy.hash(), card, "the copy hashes otherwise than the card");
    }
}

/// One fault scenario: populate, arm, churn, check. With recovery the
/// churn must succeed and the table be intact; returns the statistics.
fn survives(arm: impl FnOnce(&FaultInjector), kind: FaultKind) -> RecoveryStats {
    let (mut t, faults) = open(true);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    arm(&faults);
    let ops = churn(0, &want);
    run(&mut t, &ops, &mut want).expect("the batch completes despite the fault");
    assert_eq!(faults.injected(kind), 1, "the fault struck once");
    assert_intact(&mut t, &want);
    // And the device goes on working normally.
    let ops = churn(1, &want);
    run(&mut t, &ops, &mut want).expect("the next batch");
    assert_intact(&mut t, &want);
    t.recovery_stats()
}

/// The same scenario without recovery: the fault must show, as a failed
/// call or a table that differs from the expected one.
fn breaks_without_recovery(arm: impl FnOnce(&FaultInjector), kind: FaultKind) {
    let (mut t, faults) = open(false);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    arm(&faults);
    let ops = churn(0, &want);
    let outcome = run(&mut t, &ops, &mut want);
    assert_eq!(faults.injected(kind), 1);
    let diff = if outcome.is_ok() { differences(&mut t, &want) } else { Vec::new() };
    assert!(outcome.is_err() || !diff.is_empty(), "without recovery the fault went unnoticed");
}

// ---------------------------------------------------------------------------
// One test per fault kind.

#[test]
fn dropped_completion_mid_batch() {
    let arm = |f: &FaultInjector| f.arm_with(Fault::DropCompletion, Trigger::after(300));
    let s = survives(arm, FaultKind::DropCompletion);
    assert!(s.lost_completions >= 1 && s.resets >= 1 && s.commands_replayed >= 1, "{s:?}");
    breaks_without_recovery(arm, FaultKind::DropCompletion);
}

/// The last completion of a call dropped: nothing later reveals it, so the
/// wait times out, and `CMD_HEAD` shows the device was past the command.
#[test]
fn dropped_last_completion_times_out() {
    let (mut t, faults) = open(true);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    faults.arm(Fault::DropCompletion);
    let op = TableOp::Update(key(5), ConnEntry::new(state(77)));
    assert_eq!(t.apply(&op).expect("update survives"), 2);
    want.apply(&op);
    let s = t.recovery_stats();
    assert_eq!((s.timeouts, s.stalls, s.lost_completions, s.resets), (1, 0, 1, 1), "{s:?}");
    assert_intact(&mut t, &want);

    let (mut t, faults) = open(false);
    populate(&mut t, &mut Expected::default());
    faults.arm(Fault::DropCompletion);
    let e = t.apply(&op).err();
    assert!(matches!(e, Some(TableError::Driver(DriverError::CompletionLost(_)))), "{e:?}");
}

#[test]
fn stalled_device() {
    let arm = |f: &FaultInjector| f.arm(Fault::Stall { duration: None });
    let s = survives(arm, FaultKind::Stall);
    assert!(s.timeouts >= 1 && s.stalls >= 1 && s.resets >= 1, "{s:?}");
    breaks_without_recovery(arm, FaultKind::Stall);
}

/// A stall shorter than the completion timeout is only a delay.
#[test]
fn short_stall_is_only_a_delay() {
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    dev.start_poller(None).expect("poller");
    let (mut t, faults) = open_with(dev, DriverConfig { completion_timeout: Duration::from_secs(5), ..cfg() }, true);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    faults.arm(Fault::Stall { duration: Some(Duration::from_millis(20)) });
    let ops = churn(0, &want);
    run(&mut t, &ops, &mut want).expect("batch");
    assert_eq!(faults.injected(FaultKind::Stall), 1);
    assert_eq!(t.recovery_stats().resets, 0);
    assert_intact(&mut t, &want);
}

#[test]
fn corrupted_completion_tag() {
    let arm = |f: &FaultInjector| f.arm_with(Fault::CorruptCompletionTag, Trigger::after(300));
    let s = survives(arm, FaultKind::CorruptCompletionTag);
    assert!(s.corrupt_completions >= 1 && s.lost_completions >= 1 && s.resets >= 1, "{s:?}");
    breaks_without_recovery(arm, FaultKind::CorruptCompletionTag);
}

/// Both ways a flipped tag bit can land: on the next command, still in
/// flight (refused: its head does not end that command), or on the
/// previous one, already completed (refused: a duplicate).
#[test]
fn corrupted_tags_are_never_credited_to_another_command() {
    for after in [300, 301] {
        let s = survives(
            |f: &FaultInjector| f.arm_with(Fault::CorruptCompletionTag, Trigger::after(after)),
            FaultKind::CorruptCompletionTag,
        );
        assert_eq!(s.corrupt_completions, 1, "after {after}: {s:?}");
    }
}

#[test]
fn corrupted_completion_phase() {
    let arm = |f: &FaultInjector| f.arm_with(Fault::CorruptCompletionPhase, Trigger::after(300));
    let s = survives(arm, FaultKind::CorruptCompletionPhase);
    assert!(s.phase_anomalies >= 1 && s.lost_completions >= 1 && s.resets >= 1, "{s:?}");
    breaks_without_recovery(arm, FaultKind::CorruptCompletionPhase);
}

/// The skipped entry is rewritten with the old phase: when the ring comes
/// round it is not taken for new (which would complete a command twice).
#[test]
fn skipped_phase_entry_is_not_taken_on_the_next_lap() {
    let (mut t, faults) = open(true);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    faults.arm_with(Fault::CorruptCompletionPhase, Trigger::after(10));
    // Several laps of the 512-entry completion ring after the fault.
    for r in 0..4 {
        let ops = churn(r, &want);
        run(&mut t, &ops, &mut want).expect("batch");
    }
    let s = t.recovery_stats();
    assert_eq!((s.phase_anomalies, s.corrupt_completions, s.unexpected_tags), (1, 0, 0), "{s:?}");
    assert_intact(&mut t, &want);
}

#[test]
fn spurious_interrupts() {
    let cfg = DriverConfig { completion_mode: CompletionMode::Interrupt, ..cfg() };
    let (mut t, faults) = open_with(EmulatedDevice::inline().expect("device"), cfg, true);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    for r in 0..3 {
        faults.arm(Fault::SpuriousInterrupt);
        // The driver sleeps on the interrupt (as a daemon waiting for
        // completions does): the interrupt has no cause and brings nothing.
        assert!(t.driver().sleep_for_interrupt(Duration::from_secs(5)).expect("sleep"), "woken");
        assert_eq!(t.recovery_stats().spurious_interrupts, r + 1);
        let ops = churn(r as u32, &want);
        run(&mut t, &ops, &mut want).expect("batch after a spurious interrupt");
    }
    assert_eq!(faults.injected(FaultKind::SpuriousInterrupt), 3);
    let s = t.recovery_stats();
    assert_eq!((s.resets, s.corrupt_completions, s.lost_completions), (0, 0, 0), "{s:?}");
    assert_intact(&mut t, &want);
    // A real completion interrupt is not counted as spurious.
    let tag = t.driver().post(&CommandDescriptor::header(Opcode::Nop, DescFlags::IRQ_NOW, 0), None).expect("post");
    t.driver().ring();
    assert!(t.driver().sleep_for_interrupt(Duration::from_secs(5)).expect("sleep"));
    assert_eq!(t.driver().wait(tag).expect("nop").status, CplStatus::Success);
    assert_eq!(t.recovery_stats().spurious_interrupts, 3);
}

#[test]
fn dma_error_on_a_write_makes_the_device_fatal() {
    let arm = |f: &FaultInjector| f.arm_with(Fault::DmaError, Trigger::after(300));
    let s = survives(arm, FaultKind::DmaError);
    assert!(s.fatal_errors >= 1 && s.resets >= 1, "{s:?}");
    breaks_without_recovery(arm, FaultKind::DmaError);
}

/// A DMA_ERROR completion (the response write failed, nothing written) is
/// retried, without a reset.
#[test]
fn dma_error_on_a_lookup_is_retried() {
    let (mut t, faults) = open(true);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    faults.arm(Fault::DmaError);
    let rec = t.lookup(&key(8)).expect("lookup").expect("present");
    assert_eq!((rec.state.mark.get(), rec.nat), (8, nat(8)));
    assert_eq!(faults.injected(FaultKind::DmaError), 1);
    let s = t.recovery_stats();
    assert_eq!((s.dma_errors, s.dma_retries, s.resets), (1, 1, 0), "{s:?}");
    // The audit walk's SNAPSHOT too.
    faults.arm(Fault::DmaError);
    let r = t.audit_full().expect("audit");
    assert_eq!((r.walked, r.missing, r.different, r.adopted), (true, 0, 0, 0), "{r:?}");
    assert_eq!(t.recovery_stats().dma_retries, 2);
    assert_intact(&mut t, &want);

    let (mut t, faults) = open(false);
    populate(&mut t, &mut Expected::default());
    faults.arm(Fault::DmaError);
    assert!(matches!(t.lookup(&key(8)), Err(TableError::Refused(CplStatus::DmaError))));
}

#[test]
fn device_reset_mid_batch() {
    let arm = |f: &FaultInjector| f.arm(Fault::ResetMidBatch { after: 300 });
    let s = survives(arm, FaultKind::ResetMidBatch);
    assert!(s.device_resets_detected >= 1 && s.resets >= 1 && s.entries_restored >= 900, "{s:?}");
    breaks_without_recovery(arm, FaultKind::ResetMidBatch);
}

/// Populates, then loses one entry (the next housekeeping pass, run here by
/// a step of the design) and checks that the card holds one fewer.
fn lose_one(recovery: bool) -> (Table, FaultInjector, Expected) {
    let (mut t, faults) = open(recovery);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    faults.arm(Fault::LoseEntry);
    t.driver_ref().device().nic().step();
    assert_eq!(faults.injected(FaultKind::LoseEntry), 1);
    assert_eq!(t.len(), N as usize - 1, "an entry was lost");
    (t, faults, want)
}

/// Entry loss found by an audit: the count disagrees, the walk finds the
/// entry missing, it is restored from the host's copy.
#[test]
fn lost_entry_found_by_audit() {
    let (mut t, _faults, want) = lose_one(true);
    assert_eq!(differences(&mut t, &want).len(), 1, "the loss shows before the audit");
    let r = t.audit().expect("audit");
    let expect = AuditReport {
        device_entries: u64::from(N) - 1,
        shadow_entries: u64::from(N),
        walked: true,
        missing: 1,
        ..Default::default()
    };
    assert_eq!(r, expect);
    let s = t.recovery_stats();
    assert_eq!((s.lost_entries_detected, s.entries_restored, s.audits, s.audit_walks, s.resets), (1, 1, 1, 1, 0));
    assert_intact(&mut t, &want);
    // Nothing to do now: the quick check agrees and nothing is walked.
    assert!(!t.audit().expect("audit").walked);
}

/// An audit walks the card a chunk per step, so that an event loop is
/// held for a chunk at a time, not for the whole table (1 M entries took
/// 0.8-1.2 s in one go); the host writes between the steps. The lost entry
/// is found and restored, the new connections written meanwhile are left
/// to their own writes, and another walk of the card abandons the audit's,
/// which the next audit walks again.
#[test]
fn an_audit_walks_a_chunk_per_step_with_writes_between() {
    let (mut t, faults, mut want) = lose_one(true);
    assert_eq!(differences(&mut t, &want).len(), 1, "the loss shows before the audit");
    t.set_snapshot_chunk_bytes(100 * nicsync_fwif::conn::ConnRecord::SIZE);
    let mut steps = 0u32;
    let report = loop {
        if let Some(r) = t.audit_step().expect("audit step") {
            break r;
        }
        steps += 1;
        assert!(t.audit_walking());
        let ops: Vec<TableOp> = (0..10)
            .map(|j| {
                let i = 20_000 + steps * 10 + j;
                TableOp::Insert(key(i), ConnEntry::new(state(i)))
            })
            .collect();
        run(&mut t, &ops, &mut want).expect("writes between the steps");
    };
    assert!(steps >= 9, "a walk of {N} entries in chunks of 100 took {steps} steps");
    assert!(!t.audit_walking());
    assert!(report.walked);
    assert_eq!((report.missing, report.adopted, report.different, report.forgotten), (1, 0, 0, 0), "{report:?}");
    assert_intact(&mut t, &want);
    assert_eq!(t.recovery_stats().audit_walks, 1);

    // Abandoned by another walk of the card, and walked again next time.
    faults.arm(Fault::LoseEntry);
    t.driver_ref().device().nic().step();
    assert_eq!(t.audit_step().expect("audit step"), None);
    assert!(t.audit_walking());
    let walked = t.snapshot().count();
    assert_eq!(walked, want.0.len() - 1);
    assert!(!t.audit_walking(), "the other walk tore the audit's");
    let report = t.audit().expect("audit");
    assert_eq!((report.walked, report.missing), (true, 1), "{report:?}");
    assert_intact(&mut t, &want);
}

/// Entry loss found on the data path: an UPDATE of a connection that cannot
/// have aged answers NOT_FOUND; the entry is restored and the update run
/// again, in the middle of the batch.
#[test]
fn lost_entry_found_by_the_data_path() {
    let (mut t, _faults, mut want) = lose_one(true);
    let ops = churn(0, &want);
    run(&mut t, &ops, &mut want).expect("batch");
    let s = t.recovery_stats();
    assert_eq!((s.lost_entries_detected, s.entries_restored, s.resets), (1, 1, 0), "{s:?}");
    assert_intact(&mut t, &want);

    let (mut t, _faults, mut want) = lose_one(false);
    assert!(run(&mut t, &churn(0, &want), &mut want).is_err(), "without recovery the update fails");
}

/// The host's copy follows events: an entry that aged is not brought back
/// by a rebuild.
#[test]
fn aged_entries_stay_gone_after_a_rebuild() {
    let cfg = DriverConfig { aging_period_ms: 100, ..cfg() };
    let (mut t, faults) = open_with(EmulatedDevice::inline().expect("device"), cfg, true);
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    let short: Vec<TableOp> = (0..10)
        .map(|i| TableOp::Insert(key(90_000 + i), ConnEntry::new(ConnState { timeout_s: 1.into(), ..state(i) })))
        .collect();
    assert!(t.batch(&short).expect("batch").iter().all(Result::is_ok));
    t.driver_ref().device().nic().advance_time(Duration::from_secs(3));
    assert_eq!(t.len(), N as usize, "the short-lived entries aged");
    faults.arm(Fault::ResetMidBatch { after: 0 });
    let ops = churn(0, &want);
    run(&mut t, &ops, &mut want).expect("batch");
    assert_eq!(t.recovery_stats().resets, 1);
    assert_intact(&mut t, &want);
    let mut aged = 0;
    t.poll_events(|e| aged += usize::from(e.kind == nicsync_fwif::event::EventKind::Aged));
    assert_eq!(aged, 10, "the events read during the recovery are handed on");
}

/// An event written with a garbled phase bit looks unwritten in front of
/// the events after it. The driver looks past it, skips it as an event
/// lost (the ring held still behind it for good: the device filled it and
/// dropped every later event), and the host's copy, which may now miss a
/// removal, is audited: the entry whose AGED event was garbled is
/// forgotten, not restored.
#[test]
fn an_event_with_a_garbled_phase_is_skipped_and_the_copy_audited() {
    let (mut t, faults) = aged_100_after(true, |f| f.arm_with(Fault::CorruptEventPhase, Trigger::after(10)));
    let mut aged = Vec::new();
    for _ in 0..1000 {
        t.poll_events(|e| aged.push(e.seq));
        if aged.len() == 99 {
            break;
        }
    }
    assert_eq!(faults.injected(FaultKind::CorruptEventPhase), 1);
    assert_eq!(aged.len(), 99, "every event but the garbled one, in order");
    assert_eq!(aged, (1..=100).filter(|s| *s != 11).collect::<Vec<u32>>());
    let st = t.driver_ref().stats();
    assert_eq!((st.events, st.bad_events), (99, 1));
    assert_eq!(t.recovery_stats().phase_anomalies, 1);
    assert_eq!(t.shadow().map(|c| (c.len(), c.needs_audit())), Some((1, true)));
    let report = t.audit().expect("audit");
    assert_eq!((report.missing, report.forgotten), (0, 1), "{report:?}");
    assert_eq!(t.shadow().map(|c| c.len()), Some(0));
    assert_eq!(t.len(), 0, "nothing restored");
    // Events flow on up to the skipped entry's place on the next lap: a
    // ring of 1,024 entries, the first 100 events in slots 0..100 (the
    // garbled one in slot 10), these 934 in 100..1024 and 0..10. Slot 10,
    // not written again yet, must not be taken for new (its inverted phase
    // is the next lap's: it is rewritten when skipped).
    let more: Vec<TableOp> = (200..1134)
        .map(|i| TableOp::Insert(key(i), ConnEntry::new(ConnState { timeout_s: 1.into(), ..state(i) })))
        .collect();
    assert!(t.batch(&more).expect("batch").iter().all(Result::is_ok));
    t.driver_ref().device().nic().advance_time(Duration::from_secs(3));
    let mut later = Vec::new();
    for _ in 0..200 {
        t.poll_events(|e| later.push(e.seq));
    }
    assert_eq!(later.len(), 934, "{:?}", &later[later.len().saturating_sub(3)..]);
    assert!(later.windows(2).all(|w| w[1] == w[0] + 1), "in order, none twice");
    assert_eq!(t.driver_ref().stats().bad_events, 1);
}

/// The card resets itself while events wait behind a garbled one: the
/// host takes them all in before it rebuilds the card from its copy
/// (reading past the garbled entry at once, not once in 64 polls), so the
/// entries they removed are not brought back. Only the entry whose event
/// was garbled is (its removal is unknown to the host).
#[test]
fn events_behind_a_garbled_one_reach_the_copy_before_a_rebuild() {
    let (mut t, faults) = aged_100_after(true, |f| f.arm_with(Fault::CorruptEventPhase, Trigger::after(10)));
    faults.arm(Fault::ResetMidBatch { after: 0 });
    t.insert(&key(500), &ConnEntry::new(state(500))).expect("insert through the reset");
    assert_eq!(t.recovery_stats().resets, 1);
    assert_eq!(t.len(), 2, "the new entry and the one whose AGED event was garbled");
}

/// A table (with the host's copy or not) whose 100 entries, each with a
/// timeout of 1 s, have aged on the card, their events not yet read.
fn aged_100(recovery: bool) -> Table {
    aged_100_after(recovery, |_| {}).0
}

/// [`aged_100`], with faults armed by `arm` before the entries are written;
/// also the device's fault injector.
fn aged_100_after(recovery: bool, arm: impl FnOnce(&FaultInjector)) -> (Table, FaultInjector) {
    let cfg = DriverConfig { aging_period_ms: 100, ..cfg() };
    let (mut t, faults) = open_with(EmulatedDevice::inline().expect("device"), cfg, recovery);
    arm(&faults);
    let short: Vec<TableOp> = (0..100)
        .map(|i| TableOp::Insert(key(i), ConnEntry::new(ConnState { timeout_s: 1.into(), ..state(i) })))
        .collect();
    assert!(t.batch(&short).expect("batch").iter().all(Result::is_ok));
    t.driver_ref().device().nic().advance_time(Duration::from_secs(3));
    assert_eq!(t.len(), 0, "every entry aged on the card");
    (t, faults)
}

/// The copy takes in events a few at a time (each one's place fetched
/// ahead): the caller still gets every event once, in the device's order,
/// and the copy drops every entry that aged.
#[test]
fn events_reach_the_caller_in_order_through_the_copy() {
    let events = |recovery: bool| {
        let mut t = aged_100(recovery);
        let mut seen = Vec::new();
        t.poll_events(|e| seen.push((e.kind, e.key)));
        if let Some(copy) = t.shadow() {
            assert!(copy.is_empty(), "the copy dropped every aged entry ({} left)", copy.len());
        }
        seen
    };
    let direct = events(false);
    assert_eq!(direct.len(), 100, "every entry aged");
    assert_eq!(events(true), direct, "same events, same order, with the copy in between");
}

/// A caller whose closure panics part way through loses no event: those
/// it did not take come with the next call, each once.
#[test]
fn events_not_taken_before_a_panic_come_with_the_next_call() {
    let mut t = aged_100(true);
    let mut seen = Vec::new();
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.poll_events(|e| {
            if seen.len() == 3 {
                panic!("the caller fails on its fourth event");
            }
            seen.push(e.key);
        })
    }));
    assert!(first.is_err());
    assert_eq!(seen.len(), 3);
    t.poll_events(|e| seen.push(e.key));
    assert_eq!(seen.len(), 99, "the event the closure panicked on is consumed, the rest come");
    seen.sort_by_key(|k| k.to_string());
    seen.dedup();
    assert_eq!(seen.len(), 99, "each once");
    assert!(t.shadow().is_some_and(|c| c.is_empty()), "the copy took in all 100");
}

/// Every kind armed at random (seeded) while the model runs on its polling
/// thread, over several batches; the table is intact at the end.
#[test]
fn chaos_on_the_polling_thread() {
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    dev.start_poller(None).expect("poller");
    let cfg = DriverConfig { completion_timeout: Duration::from_millis(200), ..cfg() };
    let (mut t, faults) = open_with(dev, cfg, false);
    // Faults strike rebuilds too: allow as many recoveries as are armed.
    t.enable_recovery(RecoveryConfig { max_recoveries: 32, ..RecoveryConfig::default() }).expect("recovery");
    let mut want = Expected::default();
    populate(&mut t, &mut want);
    faults.seed(42);
    // Per command, per batch (stall) and per housekeeping pass (lost
    // entry), each kind a few times at most.
    let p = |x: f64, n: u64| Trigger::probability(x).limit(n);
    faults.arm_with(Fault::DropCompletion, p(0.0003, 3));
    faults.arm_with(Fault::CorruptCompletionTag, p(0.0003, 3));
    faults.arm_with(Fault::CorruptCompletionPhase, p(0.0003, 3));
    faults.arm_with(Fault::DmaError, p(0.0002, 2));
    faults.arm_with(Fault::ResetMidBatch { after: 0 }, p(0.0002, 2));
    faults.arm_with(Fault::Stall { duration: Some(Duration::from_micros(200)) }, p(0.05, 2));
    faults.arm_with(Fault::LoseEntry, p(0.0001, 1));
    for r in 0..6 {
        let ops = churn(r, &want);
        run(&mut t, &ops, &mut want).unwrap_or_else(|e| panic!("round {r}: {e}"));
    }
    faults.clear();
    let injected = faults.injected_by_kind();
    assert!(injected.iter().filter(|(_, n)| *n > 0).count() >= 4, "{injected:?}");
    t.audit_full().expect("audit");
    assert_intact(&mut t, &want);
    let s = t.recovery_stats();
    eprintln!("injected {injected:?}\nrecovery {s:?}");
    assert!(s.resets >= 1, "{s:?} after {injected:?}");
}

/// A cluster member's table (sync unit on an in-process wire, recovery
/// as member `id`) and its fault injector.
fn cluster_member(hub: &InProcessHub, id: u16, peers: Vec<u16>, recovery: bool) -> (Table, FaultInjector) {
    cluster_member_with(hub, id, peers, recovery, cfg())
}

/// [`cluster_member`] with driver settings.
fn cluster_member_with(
    hub: &InProcessHub,
    id: u16,
    peers: Vec<u16>,
    recovery: bool,
    cfg: DriverConfig,
) -> (Table, FaultInjector) {
    let dev = EmulatedDevice::inline().expect("device");
    let port = hub.attach(id).expect("attach");
    let unit = SyncUnitConfig { sender: SenderConfig::new(1, id, 0x100 + u32::from(id)), peers };
    dev.nic().attach_sync(SyncUnit::new(unit, Box::new(port), 0).expect("sync unit"));
    let (mut t, faults) = open_with(dev, cfg, false);
    if recovery {
        t.enable_recovery(RecoveryConfig { member: id, ..RecoveryConfig::default() }).expect("recovery");
    }
    (t, faults)
}

fn synced_state(mark: u32) -> ConnState {
    ConnState { flags: ConnFlags::SYNC.bits().into(), ..state(mark) }
}

/// A cluster member's card remembers the deletes of synced entries
/// (tombstones), so that a re-insert is numbered above the delete every
/// peer remembers. A rebuild after a reset keeps them: without them the
/// re-insert would be numbered 1, below the peers' tombstone, and the peers
/// would refuse it (and a peer's older copy could bring the entry back).
/// A delete the reset strikes is replayed and leaves its tombstone too.
/// Polled and interrupt-driven completions alike.
/// Member 1 with fault recovery (completions `mode`), member 2 without,
/// on an unimpaired in-process wire seeded with `seed`.
fn recovering_pair(mode: CompletionMode, seed: u64) -> (InProcessHub, Table, FaultInjector, Table) {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 4096, seed, impairment: Impairment::NONE });
    let cfg = DriverConfig { completion_mode: mode, ..cfg() };
    let (a, faults) = cluster_member_with(&hub, 1, vec![2], true, cfg);
    let (b, _) = cluster_member(&hub, 2, vec![1], false);
    (hub, a, faults, b)
}

/// Lets 20 ms of the model's time pass on both members (frames delivered,
/// acknowledged).
fn settle_pair(a: &Table, b: &Table) {
    for _ in 0..20 {
        for t in [a, b] {
            t.driver_ref().device().nic().advance_time(Duration::from_millis(1));
        }
    }
}

#[test]
fn tombstones_survive_a_rebuild() {
    for mode in [CompletionMode::Poll, CompletionMode::Interrupt] {
        let (_hub, mut a, faults, mut b) = recovering_pair(mode, 7);
        let k = key(7);
        assert_eq!(a.insert(&k, &ConnEntry::new(synced_state(1))).expect("insert"), 1);
        a.delete(&k).expect("delete");
        settle_pair(&a, &b);
        assert!(b.lookup(&k).expect("lookup").is_none(), "the peer applied the delete");
        assert_eq!(a.shadow().and_then(|s| s.tombstone(&k)).map(|t| t.generation), Some(2));
        // The card resets before the re-insert runs: rebuilt, then replayed.
        faults.arm(Fault::ResetMidBatch { after: 0 });
        let g = a.insert(&k, &ConnEntry::new(synced_state(2))).expect("re-insert");
        let s = a.recovery_stats();
        assert_eq!((s.resets, s.tombstones_restored), (1, 1), "{s:?}");
        assert_eq!(g, 3, "numbered above the delete, as without the reset");
        settle_pair(&a, &b);
        let held = b.lookup(&k).expect("lookup").map(|r| (r.state.mark.get(), r.state.generation.get()));
        assert_eq!(held, Some((2, 3)), "the peer took the re-insert");
        // An older copy of the entry cannot come back over the tombstone of
        // another deleted key either.
        let k2 = key(8);
        a.insert(&k2, &ConnEntry::new(synced_state(5))).expect("insert");
        a.delete(&k2).expect("delete");
        a.recover().expect("recover");
        let stale = TableOp::Replica(k2, ConnEntry::new(ConnState { generation: 1.into(), ..synced_state(5) }), 2);
        assert!(matches!(a.apply(&stale), Err(TableError::Stale { .. })), "the tombstone was rebuilt");
        assert!(a.lookup(&k2).expect("lookup").is_none());
        // A reset that strikes the delete itself: replayed on the rebuilt
        // card, it leaves its tombstone there, and the re-insert goes above it.
        let k3 = key(9);
        assert_eq!(a.insert(&k3, &ConnEntry::new(synced_state(6))).expect("insert"), 1);
        faults.arm(Fault::ResetMidBatch { after: 0 });
        a.delete(&k3).expect("delete, replayed");
        assert_eq!(a.recovery_stats().resets, 3, "{mode:?}");
        assert_eq!(a.insert(&k3, &ConnEntry::new(synced_state(7))).expect("re-insert"), 3, "{mode:?}");
        settle_pair(&a, &b);
        let held = b.lookup(&k3).expect("lookup").map(|r| (r.state.mark.get(), r.state.generation.get()));
        assert_eq!(held, Some((7, 3)), "{mode:?}: the peer took the re-insert");
    }
}

/// A FLUSH empties the copy with the card: the events the card wrote
/// before it (peer updates applied) are read first, not after, when they
/// would put back into the copy entries the card no longer holds (and an
/// audit would then restore them to the card).
#[test]
fn a_flush_leaves_no_earlier_event_to_refill_the_copy() {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 4096, seed: 5, impairment: Impairment::NONE });
    let (mut a, _) = cluster_member(&hub, 1, vec![2], false);
    let (mut b, _) = cluster_member(&hub, 2, vec![1], true);
    for i in 0..10 {
        a.insert(&key(i), &ConnEntry::new(synced_state(i))).expect("insert");
    }
    settle_pair(&a, &b);
    assert_eq!(b.len(), 10, "the peer's card applied the updates (their events not read yet)");
    assert_eq!(b.flush().expect("flush"), 10);
    let r = b.audit_full().expect("audit");
    assert_eq!((b.len(), b.shadow().map(|s| s.len())), (0, Some(0)), "{r:?}");
    assert_eq!(r.missing, 0, "{r:?}");
}

/// A standby's audit right after its card applied a peer's updates on the
/// sync port's fast path (no housekeeping pass since): the card publishes
/// its entry count and sync digest with the change, so the quick check
/// agrees at once. Stale counters made it walk the whole table under load.
#[test]
fn an_audit_after_peer_updates_agrees_without_a_walk() {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 4096, seed: 3, impairment: Impairment::NONE });
    let (mut a, _) = cluster_member(&hub, 1, vec![2], false);
    let (mut b, _) = cluster_member(&hub, 2, vec![1], true);
    // One update the usual way: the members know each other's epoch.
    a.insert(&key(100), &ConnEntry::new(synced_state(100))).expect("insert");
    settle_pair(&a, &b);
    b.audit().expect("audit");
    // Member 2's clock ahead of the frames to come (nothing to do yet).
    b.driver_ref().device().nic().advance_time(Duration::from_millis(30));
    for i in 0..100 {
        a.insert(&key(i), &ConnEntry::new(synced_state(i))).expect("insert");
    }
    // Member 1's frames leave; member 2 only takes them in on the fast path.
    for _ in 0..20 {
        a.driver_ref().device().nic().advance_time(Duration::from_millis(1));
    }
    while b.driver_ref().device().nic().core().sync_fast() {}
    assert_eq!(b.len(), 101, "the peer applied the updates");
    let r = b.audit().expect("audit");
    assert!(!r.walked && !r.inconclusive, "{r:?}");
    assert_eq!((r.device_entries, r.shadow_entries), (101, 101), "{r:?}");
    assert_eq!(b.recovery_stats().audit_walks, 0);
}

/// A merge or Full Sync record (a REPLICA write) older than what the
/// member's copy holds takes on a card that lost the entry, where a card
/// that kept it would refuse it as STALE: the table puts the newer version
/// back and answers STALE, and its copy keeps the newer version.
#[test]
fn an_older_replica_does_not_replace_an_entry_the_card_lost() {
    let hub = InProcessHub::new(HubConfig::new());
    let (mut t, faults) = cluster_member(&hub, 1, vec![2], true);
    let k = key(3);
    t.insert(&k, &ConnEntry::new(synced_state(1))).expect("insert");
    assert_eq!(t.update(&k, &ConnEntry::new(synced_state(2))).expect("update"), 2);
    faults.arm(Fault::LoseEntry);
    t.driver_ref().device().nic().step();
    assert_eq!((faults.injected(FaultKind::LoseEntry), t.len()), (1, 0), "the only entry was lost");
    let older = ConnEntry::new(ConnState { generation: 1.into(), ..synced_state(7) });
    assert!(matches!(t.apply(&TableOp::Replica(k, older, 2)), Err(TableError::Stale { stored: 2 })));
    let held = t.lookup(&k).expect("lookup").map(|r| (r.state.mark.get(), r.state.generation.get()));
    assert_eq!(held, Some((2, 2)), "the newer version is back");
    assert_eq!(t.shadow().and_then(|s| s.get(&k)).map(|e| e.state.mark.get()), Some(2));
    // An older delete does not remove it either.
    faults.arm(Fault::LoseEntry);
    t.driver_ref().device().nic().step();
    assert!(matches!(t.apply(&TableOp::ReplicaDelete(k, 1, 2)), Err(TableError::Stale { stored: 2 })));
    assert_eq!(t.lookup(&k).expect("lookup").map(|r| r.state.generation.get()), Some(2));
    assert_eq!(t.recovery_stats().lost_entries_detected, 2);
}

/// A write that lands on a card that lost the connection (a loss leaves no
/// tombstone) takes there as a new entry, numbered from 1: below the
/// version the member's copy and its peers hold. The peers refuse it, and
/// the member's next changes of the connection too (an equal generation
/// loses to a higher owner), so an acknowledged write is lost: seed 96 of
/// `nicsync sim --device-faults --attacks`. The table sees that the device
/// numbered the write no higher than the copy's version, puts that version
/// back and runs the write again, so that it goes out above it. Polled and
/// interrupt-driven completions alike.
#[test]
fn a_write_over_an_entry_the_card_lost_is_numbered_above_the_copy() {
    for mode in [CompletionMode::Poll, CompletionMode::Interrupt] {
        let (_hub, mut a, faults, mut b) = recovering_pair(mode, 11);
        let held =
            |t: &mut Table| t.lookup(&key(5)).expect("lookup").map(|r| (r.state.mark.get(), r.state.generation.get()));
        let k = key(5);
        assert_eq!(a.upsert(&k, &ConnEntry::new(synced_state(1))).expect("upsert"), 1);
        assert_eq!(a.upsert(&k, &ConnEntry::new(synced_state(2))).expect("upsert"), 2);
        settle_pair(&a, &b);
        assert_eq!(held(&mut b), Some((2, 2)), "{mode:?}: the peer took the update");
        faults.arm(Fault::LoseEntry);
        a.driver_ref().device().nic().step();
        assert_eq!((faults.injected(FaultKind::LoseEntry), a.len()), (1, 0), "{mode:?}: the only entry was lost");
        let g = a.upsert(&k, &ConnEntry::new(synced_state(3))).expect("upsert over the loss");
        assert_eq!(g, 3, "{mode:?}: numbered above the version the copy and the peer hold, as without the loss");
        settle_pair(&a, &b);
        assert_eq!(held(&mut a), Some((3, 3)), "{mode:?}");
        assert_eq!(held(&mut b), Some((3, 3)), "{mode:?}: the peer took the write");
        let s = a.recovery_stats();
        assert_eq!((s.lost_entries_detected, s.entries_restored, s.resets), (1, 1, 0), "{mode:?}: {s:?}");
        // An INSERT over a lost entry answers EXISTS, as a card that kept
        // it would, and leaves it as it was.
        faults.arm(Fault::LoseEntry);
        a.driver_ref().device().nic().step();
        assert_eq!(a.len(), 0, "{mode:?}");
        let r = a.insert(&k, &ConnEntry::new(synced_state(9)));
        assert!(matches!(r, Err(TableError::Exists)), "{mode:?}: {r:?}");
        settle_pair(&a, &b);
        assert_eq!(held(&mut a), Some((3, 3)), "{mode:?}");
        assert_eq!(held(&mut b), Some((3, 3)), "{mode:?}");
        assert_eq!(a.shadow().and_then(|s| s.get(&k)).map(|e| e.state.generation.get()), Some(3));
    }
}

/// `AsyncCompletions` (tokio) makes the driver's checks while it waits and
/// survives a device reset: a device that reset itself is reported as such
/// within a sleep slice (not as a timeout after the completion timeout), a
/// spurious interrupt during a wait is counted and slept through, and once
/// the table has recovered (reset, rebuilt from its copy) the same
/// `AsyncCompletions` waits on the rebuilt device's interrupts.
#[test]
fn async_completions_survive_a_device_reset() {
    use nicsync::irq::AsyncCompletions;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
        dev.start_poller(None).expect("poller");
        let cfg = DriverConfig {
            completion_mode: CompletionMode::Interrupt,
            irq_coalesce_count: 1,
            irq_coalesce_usec: 0,
            completion_timeout: Duration::from_secs(5),
            ..cfg()
        };
        let (mut t, faults) = open_with(dev, cfg, true);
        let mut want = Expected::default();
        populate(&mut t, &mut want);
        let irq = AsyncCompletions::new(t.driver_ref()).expect("async completions");
        let insert =
            |i: u32| CommandDescriptor::conn(Opcode::Insert, DescFlags::AUTO_GENERATION, 0, &key(i), &state(i));
        let post = |t: &mut Table, i: u32| {
            let tag = t.driver().post(&insert(i), None).expect("post");
            t.driver().ring();
            tag
        };
        // A spurious interrupt while the device holds a command back.
        faults.arm(Fault::Stall { duration: Some(Duration::from_millis(100)) });
        let tag = post(&mut t, N);
        faults.arm(Fault::SpuriousInterrupt);
        let c = irq.wait(t.driver(), tag).await.expect("completion after the stall");
        assert_eq!(c.status, CplStatus::Success);
        t.driver().take_interrupts();
        assert_eq!(faults.injected(FaultKind::SpuriousInterrupt), 1);
        assert_eq!(t.recovery_stats().spurious_interrupts, 1, "{:?}", t.recovery_stats());

        // The device resets itself before the next command.
        faults.arm(Fault::ResetMidBatch { after: 0 });
        let tag = post(&mut t, N + 1);
        let t0 = std::time::Instant::now();
        let e = irq.wait(t.driver(), tag).await.err();
        assert!(matches!(e, Some(DriverError::DeviceReset { .. })), "{e:?}");
        assert!(e.is_some_and(|e| e.needs_recovery()));
        assert!(t0.elapsed() < Duration::from_secs(2), "noticed in {:?}, not at the completion timeout", t0.elapsed());

        // The caller recovers; the same AsyncCompletions serves the device.
        t.recover().expect("recover");
        assert_eq!(t.recovery_stats().resets, 1);
        let woken = t.driver_ref().stats().interrupts;
        // Held until the waiter has gone to sleep on the interrupt: a biased
        // join! polls the wait first, so the stall is released only once
        // the wait is pending (a timed stall let a descheduled test thread
        // find the completion already there, without an interrupt to take).
        faults.arm(Fault::Stall { duration: None });
        let tag = post(&mut t, N + 2);
        let release = async { faults.clear() };
        let (c, ()) = tokio::join!(biased; irq.wait(t.driver(), tag), release);
        let c = c.expect("completion after the reset");
        assert_eq!(c.status, CplStatus::Success);
        assert!(t.driver_ref().stats().interrupts > woken, "woken by the rebuilt device's interrupt");
        for i in N + 3..N + 20 {
            let tag = post(&mut t, i);
            assert_eq!(irq.wait(t.driver(), tag).await.expect("completion").status, CplStatus::Success);
        }
        drop(irq);
        // The card holds the copy it was rebuilt from and what was inserted
        // since (the insert before the reset went round the copy: gone).
        for i in N + 2..N + 20 {
            want.0.insert(key(i), Want { mark: i, generation: 1, nat: Nat::default() });
        }
        assert_intact(&mut t, &want);
    });
}

/// Commands whose completions never come (posted by code that then gave
/// up on them) hold their ring slots until the device is reset. A table
/// with recovery resets and rebuilds then, rather than failing this call and
/// every later one with `RingFull` after a completion timeout each.
#[test]
fn slots_held_by_lost_commands_are_freed_by_a_recovery() {
    let cfg = DriverConfig { cmd_ring_log2: 2, completion_timeout: Duration::from_millis(20), ..cfg() };
    let (mut t, faults) = open_with(EmulatedDevice::inline().expect("device"), cfg, true);
    t.insert(&key(1), &ConnEntry::new(state(1))).expect("insert");
    faults.arm(Fault::Stall { duration: None });
    let nop = CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0);
    for _ in 0..3 {
        t.driver().post(&nop, None).expect("post");
    }
    t.driver().ring();
    assert_eq!(t.driver_ref().free_slots(), 0, "the stalled commands fill the ring");
    for i in 2..6 {
        t.insert(&key(i), &ConnEntry::new(state(i))).expect("the table recovers and inserts");
    }
    assert_eq!(t.recovery_stats().resets, 1);
    for i in 1..6 {
        assert_eq!(t.lookup(&key(i)).expect("lookup").map(|r| r.state.mark.get()), Some(i));
    }
}

/// `SYNC_HOLD` (set while a Full Sync is pulled) holds again after the
/// driver re-initialised the device, whose reset cleared it.
#[test]
fn sync_hold_is_kept_across_a_reinit() {
    let hub = InProcessHub::new(HubConfig::new());
    let (mut t, _) = cluster_member(&hub, 1, vec![2], true);
    let hold = |t: &Table| {
        nicsync_fwif::regs::Control::from_bits_truncate(t.driver_ref().device().nic().mmio_read(regs::CONTROL))
            .contains(nicsync_fwif::regs::Control::SYNC_HOLD)
    };
    t.driver().set_sync_hold(true).expect("hold");
    t.recover().expect("recover");
    assert!(hold(&t), "held again after the reset");
    t.driver().set_sync_hold(false).expect("release");
    t.recover().expect("recover");
    assert!(!hold(&t));
}

// ---------------------------------------------------------------------------
// The driver's part on its own, and the device against bad input.

/// `Driver::reinit` hands back what was in flight, read from the ring, and
/// `Driver::replay` posts it again.
#[test]
fn driver_reinit_returns_in_flight_commands_for_replay() {
    let dev = EmulatedDevice::inline().expect("device");
    let faults = dev.faults();
    let mut drv = Driver::probe(dev, cfg()).expect("probe");
    faults.arm(Fault::Stall { duration: None });
    let descs: Vec<_> = (0..5)
        .map(|i| nicsync_fwif::cmd::ConnOp {
            key: key(i),
            state: state(i),
            nat: (i == 2).then(|| nat(i)),
            auto_generation: true,
            replica_owner: None,
        })
        .map(|op| op.encode(Opcode::Insert, 0))
        .collect();
    let tags: Vec<u16> = descs.iter().map(|(d, e)| drv.post(d, e.as_ref()).expect("post")).collect();
    drv.ring();
    assert!(matches!(drv.wait(tags[0]), Err(DriverError::Timeout { .. })));
    assert_eq!(drv.recovery_stats().stalls, 1);
    let pending = drv.reinit().expect("reinit");
    assert_eq!(pending.len(), 5);
    for (p, (d, e)) in pending.iter().zip(&descs) {
        assert_eq!((p.desc.opcode, p.desc.body, p.ext.map(|x| x.body)), (d.opcode, d.body, e.map(|x| x.body)));
    }
    assert!(!faults.is_stalled(), "the reset ended the stall");
    let new = drv.replay(&pending).expect("replay");
    for tag in new {
        assert_eq!(drv.wait(tag).expect("completion").status, CplStatus::Success);
    }
    assert_eq!(drv.table_count(), 5);
    assert_eq!((drv.recovery_stats().resets, drv.recovery_stats().commands_replayed), (1, 5));
}

/// Sets byte `i` of a descriptor's 64 wire bytes (the tag, bytes 2..4, is
/// the driver's to set).
fn set_byte(d: &mut CommandDescriptor, i: usize, b: u8) {
    match i {
        0 => d.opcode = b,
        1 => d.flags = b,
        4..=7 => {
            let shift = 8 * (i - 4);
            d.aux = ((d.aux.get() & !(0xFF << shift)) | u32::from(b) << shift).into();
        }
        8..=63 => d.body[i - 8] = b,
        _ => {}
    }
}

/// The device survives whatever the host posts: thousands of descriptors,
/// random or valid ones with random bytes changed, complete one by one with
/// a defined status, the device never goes FATAL, and the host never sees a
/// completion it must refuse.
#[test]
fn device_survives_random_descriptors() {
    let dev = EmulatedDevice::inline().expect("device");
    let mut t = ConnTable::open(dev, DriverConfig { cmd_ring_log2: 5, ..cfg() }).expect("probe");
    let mut rng = SeededRng::new(2024);
    let mut posted = 0u64;
    let mut statuses = HashMap::new();
    for round in 0..400u32 {
        let mut tags = Vec::new();
        for _ in 0..1 + rng.below(16) {
            let mut d = CommandDescriptor::conn(Opcode::Insert, DescFlags::empty(), 0, &key(round), &state(round));
            if rng.below(3) == 0 {
                for i in 0..64 {
                    set_byte(&mut d, i, rng.next_u64() as u8);
                }
            } else {
                for _ in 0..1 + rng.below(3) {
                    set_byte(&mut d, rng.below(64) as usize, rng.next_u64() as u8);
                }
                d.opcode = [0u8, 1, 2, 3, 4, 5, 6, 7, 0x7F, 0x42][rng.below(10) as usize];
            }
            // A chain's length is the host's to know; chains are covered in
            // bad_input.rs.
            d.flags &= !DescFlags::CHAIN.bits();
            tags.push(t.driver().post(&d, None).expect("post"));
            posted += 1;
        }
        t.driver().ring();
        for tag in tags {
            let c = t.driver().wait(tag).expect("every descriptor completes");
            *statuses.entry(c.status.name()).or_insert(0u32) += 1;
        }
    }
    assert!(!t.driver().status().contains(Status::FATAL));
    assert_eq!(t.driver().stats().bad_completions, 0);
    assert_eq!(t.driver().device_counter(Counter::CommandsFetched), posted);
    assert_eq!(t.driver().device_counter(Counter::CompletionsWritten), posted);
    assert!(statuses.len() >= 4, "a spread of outcomes: {statuses:?}");
    let k = key(1_000_000);
    t.insert(&k, &ConnEntry { state: state(1), nat: Some(nat(1)) }).expect("still works");
    assert_eq!(t.lookup(&k).expect("lookup").map(|r| r.nat), Some(nat(1)));
}

/// A copy that holds an entry the card deleted (it missed the delete; in
/// the load-sharing simulator with device faults, seed 15): the audit finds
/// it missing and restores it, and the card refuses the restore as STALE,
/// since its tombstone is newer. The copy then forgets the entry; it kept
/// it before, and every audit after (one a probe interval) found the same
/// entry missing, walked the whole card and tried again.
#[test]
fn a_restore_the_cards_tombstone_refuses_makes_the_copy_forget_the_entry() {
    let hub = InProcessHub::new(HubConfig::new());
    let (mut t, _) = cluster_member(&hub, 1, vec![2], true);
    let k = key(3);
    assert_eq!(t.insert(&k, &ConnEntry::new(synced_state(3))).expect("insert"), 1);
    t.delete(&k).expect("delete");
    let stale = nicsync::shadow::ShadowEntry {
        state: ConnState { generation: 1.into(), ..synced_state(3) },
        nat: Nat::default(),
        owner: 1,
    };
    t.shadow_mut().expect("copy").set(k, stale);
    let first = t.audit_full().expect("audit");
    assert_eq!(first.missing, 1, "{first:?}");
    assert!(t.shadow().expect("copy").get(&k).is_none(), "the copy forgot the entry the card's tombstone beats");
    let again = t.audit_full().expect("audit");
    assert_eq!((again.missing, again.different), (0, 0), "{again:?}");
    assert!(t.lookup(&k).expect("lookup").is_none());
}
