#![allow(clippy::expect_used)] // test code: a failed set-up is a failed test
//! LOAD (ABI 1.6, docs/abi.md section 10): a buffer of Full Sync records
//! applied by one descriptor must do exactly what the chained REPLICA
//! writes it stands for do, record by record: the same answers and the
//! same table, tombstones included. With fault recovery, the faults the
//! model can inject strike LOADs and the card still ends as it would have
//! without them. The device checks its buffers before it applies anything.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nicsync::table::RecoveryConfig;
use nicsync::{ConnTable, DriverConfig, TableError};
use nicsync_fwif::cmd::{CommandDescriptor, LOAD_MAX_RECORDS};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnRecord, ConnState, Nat, NatKind};
use nicsync_fwif::cpl::CplStatus;
use nicsync_fwif::regs::{Capabilities, Counter};
use nicsync_fwif::sync::{DeltaOp, DeltaRecord, DeltaUpdate};
use nicsync_model::fault::{Fault, FaultKind};
use nicsync_model::rng::SeededRng;
use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::EmulatedDevice;

type Table = ConnTable<EmulatedDevice>;

/// Keys the records draw from: few enough that records meet the same
/// connection often (conflicts, tombstones, re-inserts).
const KEYS: u64 = 96;

fn cfg() -> DriverConfig {
    DriverConfig {
        cmd_ring_log2: 8,
        table_capacity: 4096,
        aging_period_ms: 0,
        completion_timeout: Duration::from_millis(100),
        ..DriverConfig::default()
    }
}

fn open(load: bool) -> Table {
    let mut m = ModelConfig::default();
    if !load {
        m.capabilities -= Capabilities::LOAD;
    }
    let dev = EmulatedDevice::new(m, ExecMode::Inline).expect("device");
    let mut t = ConnTable::open(dev, cfg()).expect("probe");
    assert_eq!(t.driver_ref().info().caps.contains(Capabilities::LOAD), load);
    t.set_auto_generation(false);
    t
}

fn key(i: u64) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a07_0000 + i as u32),
        2000 + i as u16,
        Ipv4Addr::new(192, 0, 2, 7),
        443,
        proto::TCP,
        0,
    )
}

/// A Full Sync record drawn by `rng`: mostly owners' entries, some
/// deletes, and about one in thirty malformed in one of the ways the
/// device must refuse.
fn record(rng: &mut SeededRng) -> DeltaRecord {
    let k = key(rng.below(KEYS));
    let generation = 1 + rng.below(6) as u32;
    let owner = 1 + rng.below(3) as u16;
    let mut u = if rng.below(5) == 0 {
        let state = ConnState { generation: generation.into(), ..ConnState::default() };
        DeltaUpdate { op: DeltaOp::Delete, owner, key: k, state, nat: Nat::default() }
    } else {
        let mut state = ConnState::new(
            nicsync_fwif::conn::TcpState::Established,
            nicsync_fwif::conn::Direction::Original,
            ConnFlags::SYNC,
            0,
            rng.below(1000) as u32,
        );
        state.generation = generation.into();
        let nat = match rng.below(3) {
            0 => Nat::new(NatKind::Source, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 4000 + rng.below(100) as u16),
            _ => Nat::default(),
        };
        DeltaUpdate { op: DeltaOp::Upsert, owner, key: k, state, nat }
    }
    .to_record();
    match rng.below(30) {
        0 => u.owner = 0.into(),
        1 => u.op = 9,
        2 => u.reserved = [0, 1, 0, 0],
        3 => u.key.family = 5,
        _ => {}
    }
    u
}

/// An answer with what may be compared between the two paths.
fn answer(r: &Result<u32, TableError>) -> String {
    match r {
        Ok(g) => format!("ok {g}"),
        Err(TableError::Stale { stored }) => format!("stale {stored}"),
        Err(TableError::TableFull) => "full".into(),
        Err(TableError::Refused(s)) => format!("refused {s}"),
        Err(e) => format!("other {e}"),
    }
}

/// Whether the card holds `k`.
fn on_card(t: &Table, k: &ConnKey) -> bool {
    let nic = t.driver_ref().device().nic();
    let core = nic.core();
    core.table().find(k, &mut nicsync_model::table::Traffic::default()).is_some()
}

/// The card's entries (sorted) and the tombstones of every key.
fn contents(t: &mut Table) -> (Vec<ConnRecord>, Vec<Option<(u32, u16)>>) {
    let mut recs: Vec<ConnRecord> = t.snapshot().map(|r| r.expect("snapshot")).collect();
    recs.sort_by_key(|r| format!("{:?}", r.key));
    let nic = t.driver_ref().device().nic();
    let tombs = (0..KEYS).map(|i| nic.core().tombstone(&key(i))).collect();
    (recs, tombs)
}

/// Random chunks (one past `LOAD_MAX_RECORDS`, split in two LOADs) through
/// LOAD on one card and through chained REPLICA pairs on another: the
/// same answer for every record, the same table and tombstones after
/// every chunk, and the device counted what it examined and refused.
#[test]
fn load_answers_as_the_replica_writes_would() {
    for seed in 1..=12u64 {
        let mut rng = SeededRng::new(seed);
        let (mut by_load, mut by_pairs) = (open(true), open(false));
        let mut sent = 0u64;
        let mut refused = 0u64;
        for round in 0..8 {
            let n = if round == 3 { LOAD_MAX_RECORDS as u64 + 100 } else { 1 + rng.below(400) };
            let records: Vec<DeltaRecord> = (0..n).map(|_| record(&mut rng)).collect();
            let a = by_load.load(&records).expect("load");
            let b = by_pairs.load(&records).expect("pairs");
            assert_eq!(a.len(), records.len());
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(answer(x), answer(y), "seed {seed} round {round} record {i}: {:?}", records[i]);
            }
            refused += a.iter().filter(|r| matches!(r, Err(TableError::Refused(CplStatus::Malformed)))).count() as u64;
            sent += n;
            assert_eq!(contents(&mut by_load), contents(&mut by_pairs), "seed {seed} round {round}");
        }
        assert!(refused > 0, "seed {seed}: the draw had malformed records");
        let drv = by_load.driver_ref();
        assert_eq!(drv.device_counter(Counter::LoadRecords), sent);
        assert_eq!(drv.device_counter(Counter::LoadRecordsMalformed), refused);
        assert_eq!(by_pairs.driver_ref().device_counter(Counter::LoadRecords), 0, "no LOAD without the capability");
    }
}

/// `load_post` then `load_take`, with other commands between, answers as
/// `load` does and leaves the same table, with fault recovery off (one
/// LOAD on the ring while the caller works) and on (written at the post).
/// A post left untaken is settled by the next: its records are applied,
/// and its own take answers `None` (the caller treats it as unwritten).
#[test]
fn a_posted_load_is_taken_in_as_load_would_answer() {
    for recovery in [false, true] {
        let mut rng = SeededRng::new(77);
        let (mut posted, mut direct) = (open(true), open(true));
        if recovery {
            for t in [&mut posted, &mut direct] {
                t.enable_recovery(RecoveryConfig::default()).expect("recovery");
            }
        }
        let other = key(KEYS + 1);
        let st = nicsync::ConnEntry::new(ConnState {
            flags: ConnFlags::SYNC.bits().into(),
            generation: 1.into(),
            ..ConnState::default()
        });
        for round in 0..6 {
            let records: Vec<DeltaRecord> =
                (0..1 + rng.below(LOAD_MAX_RECORDS as u64)).map(|_| record(&mut rng)).collect();
            let ticket = posted.load_post(&records).expect("post");
            assert!(posted.load_posted());
            // Commands of the caller's own while the card writes.
            let looked = posted.lookup(&other).expect("lookup between");
            assert_eq!(looked.is_some(), round > 0, "round {round}");
            if round == 0 {
                posted.upsert(&other, &st).expect("upsert between");
                direct.upsert(&other, &st).expect("upsert");
            }
            let a = posted.load_take(ticket).expect("posted").expect("take");
            assert!(!posted.load_posted() && posted.load_take(ticket).is_none());
            let b = direct.load(&records).expect("load");
            let (a, b): (Vec<String>, Vec<String>) = (a.iter().map(answer).collect(), b.iter().map(answer).collect());
            assert_eq!(a, b, "recovery {recovery} round {round}");
            assert_eq!(contents(&mut posted), contents(&mut direct), "recovery {recovery} round {round}");
        }
        // Posted and never taken: the next post settles it first.
        let first: Vec<DeltaRecord> = (0..50).map(|_| record(&mut rng)).collect();
        let second: Vec<DeltaRecord> = (0..50).map(|_| record(&mut rng)).collect();
        let dropped = posted.load_post(&first).expect("post");
        let ticket = posted.load_post(&second).expect("post again");
        assert!(posted.load_take(dropped).is_none(), "the first post's outcome was dropped: its take says so");
        let _ = posted.load_take(ticket).expect("posted").expect("take");
        direct.load(&first).expect("load");
        direct.load(&second).expect("load");
        assert_eq!(contents(&mut posted), contents(&mut direct), "recovery {recovery}: the untaken post was applied");
    }
}

/// A LOAD whose record or status buffer is not inside an IOMMU window
/// completes DMA_ERROR and applies nothing.
#[test]
fn load_outside_the_iommu_window_applies_nothing() {
    let mut t = open(true);
    let mut rng = SeededRng::new(3);
    let good: Vec<DeltaRecord> = (0..50).map(|_| record(&mut rng)).filter(|r| r.owner.get() != 0).collect();
    t.load(&good).expect("load");
    let before = contents(&mut t);
    // Somewhere no window covers.
    let nowhere = 0x7fff_0000_0000u64;
    let scratch = nicsync_vfio::NicDevice::alloc_dma(t.driver_ref().device(), 4096).expect("dma");
    // Past the end of the 4 KiB window: 100 records are 8,800 bytes.
    let last = scratch.iova() + scratch.len() as u64 - 88;
    let cases = [
        (nowhere, scratch.iova(), 10),
        (scratch.iova(), nowhere, 10),
        (last, scratch.iova(), 2),
        (scratch.iova(), scratch.iova(), 100),
    ];
    for (records, statuses, count) in cases {
        let d = CommandDescriptor::load(0, records, statuses, count);
        let c = t.driver().execute(&d, None).expect("completion");
        assert_eq!(c.status, CplStatus::DmaError);
    }
    assert_eq!(contents(&mut t), before);
    assert_eq!(t.driver_ref().device_counter(Counter::LoadRecords), good.len() as u64);
    // No record, or more than one LOAD may carry: refused as malformed.
    for count in [0, LOAD_MAX_RECORDS + 1] {
        let d = CommandDescriptor::load(0, scratch.iova(), scratch.iova(), count);
        assert_eq!(t.driver().execute(&d, None).expect("completion").status, CplStatus::Malformed);
    }
    assert_eq!(contents(&mut t), before);
}

/// Fault recovery: a LOAD whose completion is dropped or garbled, that
/// meets a DMA error or a reset, or that brings an older version of an
/// entry the card lost, still leaves the card (after an audit) exactly as
/// the same records leave a card without faults.
#[test]
fn faults_striking_loads_leave_the_table_as_without_them() {
    let mut rng = SeededRng::new(11);
    let dev = EmulatedDevice::inline().expect("device");
    let faults = dev.faults();
    let mut t = ConnTable::open(dev, cfg()).expect("probe");
    t.set_auto_generation(false);
    t.enable_recovery(RecoveryConfig { member: 1, ..RecoveryConfig::default() }).expect("recovery");
    let mut reference = open(false);
    let arms = [
        Some(Fault::DropCompletion),
        Some(Fault::CorruptCompletionTag),
        Some(Fault::DmaError),
        Some(Fault::ResetMidBatch { after: 0 }),
        Some(Fault::LoseEntry),
        Some(Fault::CorruptCompletionPhase),
        None,
    ];
    for (round, fault) in arms.into_iter().enumerate() {
        let mut records: Vec<DeltaRecord> = (0..300).map(|_| record(&mut rng)).collect();
        match fault {
            // A lost entry: found when an older record of it takes (one
            // is put first), and the records after it run again.
            Some(Fault::LoseEntry) => {
                faults.arm(Fault::LoseEntry);
                t.driver_ref().device().nic().advance_time(Duration::from_millis(1));
                let lost = (0..KEYS)
                    .map(key)
                    .find(|k| t.shadow().is_some_and(|s| s.get(k).is_some()) && !on_card(&t, k))
                    .expect("the card lost an entry the copy holds");
                let older = DeltaUpdate {
                    op: DeltaOp::Upsert,
                    owner: 1,
                    key: lost,
                    state: ConnState::default(),
                    nat: Nat::default(),
                };
                records.insert(0, older.to_record());
            }
            Some(f) => faults.arm(f),
            None => {}
        }
        let got = t.load(&records).expect("load under faults");
        let want = reference.load(&records).expect("reference");
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert_eq!(answer(x), answer(y), "round {round} ({fault:?}) record {i}");
        }
    }
    faults.clear();
    for kind in [
        FaultKind::DropCompletion,
        FaultKind::CorruptCompletionTag,
        FaultKind::DmaError,
        FaultKind::ResetMidBatch,
        FaultKind::LoseEntry,
        FaultKind::CorruptCompletionPhase,
    ] {
        assert_eq!(faults.injected(kind), 1, "{kind:?}");
    }
    let s = t.recovery_stats();
    assert!(s.resets >= 2 && s.dma_retries >= 1 && s.lost_entries_detected >= 1, "{s:?}");
    // The card already agrees with its copy: the audit finds nothing.
    let r = t.audit_full().expect("audit");
    assert_eq!((r.missing, r.different, r.adopted, r.forgotten), (0, 0, 0, 0), "{r:?}");
    assert_eq!(contents(&mut t), contents(&mut reference));
}

/// Faults armed at random (seeded) while the model runs on its own polling
/// thread, so that they strike LOADs at any point of their execution and
/// the host's waits race the device: every record is answered as on a card
/// without faults, and after an audit the card holds what that card holds.
#[test]
fn loads_under_chaos_on_the_polling_thread() {
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    dev.start_poller(None).expect("poller");
    let faults = dev.faults();
    let mut t =
        ConnTable::open(dev, DriverConfig { completion_timeout: Duration::from_millis(200), ..cfg() }).expect("probe");
    t.set_auto_generation(false);
    t.enable_recovery(RecoveryConfig { member: 1, max_recoveries: 32, ..RecoveryConfig::default() }).expect("recovery");
    let mut reference = open(false);
    faults.seed(17);
    let p = |x: f64, n: u64| nicsync_model::fault::Trigger::probability(x).limit(n);
    faults.arm_with(Fault::DropCompletion, p(0.05, 2));
    faults.arm_with(Fault::CorruptCompletionTag, p(0.05, 2));
    faults.arm_with(Fault::DmaError, p(0.05, 2));
    faults.arm_with(Fault::ResetMidBatch { after: 0 }, p(0.05, 2));
    faults.arm_with(Fault::LoseEntry, p(0.01, 3));
    let mut rng = SeededRng::new(23);
    for round in 0..40 {
        let records: Vec<DeltaRecord> = (0..200).map(|_| record(&mut rng)).collect();
        let got = t.load(&records).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let want = reference.load(&records).expect("reference");
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert_eq!(answer(x), answer(y), "round {round} record {i}");
        }
    }
    faults.clear();
    let injected = faults.injected_by_kind();
    assert!(injected.iter().filter(|(_, n)| *n > 0).count() >= 3, "{injected:?}");
    t.audit_full().expect("audit");
    assert_eq!(contents(&mut t), contents(&mut reference), "after {injected:?}");
}
