//! The driver's bookkeeping of tags across losses, resets and ring laps:
//! a replayed command reads its own response, a loss is reported once and
//! never replayed, and an outcome collected later survives the ring coming
//! round to its tag.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use nicsync::driver::{Driver, DriverConfig, DriverError};
use nicsync::{ConnEntry, ConnTable};
use nicsync_fwif::cmd::{CommandDescriptor, ConnOp, Opcode};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, TcpState};
use nicsync_fwif::cpl::CplStatus;
use nicsync_fwif::sync::{DeltaOp, DeltaRecord, DeltaUpdate};
use nicsync_model::fault::Fault;
use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::EmulatedDevice;

/// A 16-slot ring, so that a few commands wrap it.
fn cfg() -> DriverConfig {
    DriverConfig {
        cmd_ring_log2: 4,
        table_capacity: 4096,
        aging_period_ms: 0,
        completion_timeout: Duration::from_millis(100),
        ..DriverConfig::default()
    }
}

fn key(i: u32) -> ConnKey {
    ConnKey::v4(Ipv4Addr::from(0x0a00_0000 + i), 1024 + i as u16, Ipv4Addr::new(198, 51, 100, 9), 443, proto::TCP, 0)
}

fn state(mark: u32) -> ConnState {
    ConnState { tcp_state: TcpState::Established as u8, mark: mark.into(), ..ConnState::default() }
}

fn insert(i: u32) -> (CommandDescriptor, Option<CommandDescriptor>) {
    ConnOp { key: key(i), state: state(i), nat: None, auto_generation: true, replica_owner: None }
        .encode(Opcode::Insert, 0)
}

/// A LOOKUP replayed after a reset under another tag has the device write
/// its record to the new tag's response area, where `read_response` of the
/// new tag looks (it kept its first tag's address, so the reader found a
/// zeroed or stale record).
#[test]
fn a_replayed_lookup_answers_in_its_new_tags_response_area() {
    let dev = EmulatedDevice::inline().expect("device");
    let faults = dev.faults();
    let mut drv = Driver::probe(dev, cfg()).expect("probe");
    // One command first, so that the replayed ones get other tags.
    let (d, e) = insert(1);
    assert_eq!(drv.execute(&d, e.as_ref()).expect("insert").status, CplStatus::Success);
    faults.arm(Fault::Stall { duration: None });
    let (d, e) = insert(2);
    let t_insert = drv.post(&d, e.as_ref()).expect("post");
    let lookup = CommandDescriptor::lookup(0, &key(2), drv.next_response_iova());
    let t_lookup = drv.post(&lookup, None).expect("post");
    drv.ring();
    assert!(matches!(drv.wait(t_insert), Err(DriverError::Timeout { .. })));
    let pending = drv.reinit().expect("reinit");
    assert_eq!(pending.len(), 2);
    let new = drv.replay(&pending).expect("replay");
    assert_ne!(new[1], t_lookup, "the test needs the LOOKUP under another tag");
    assert_eq!(drv.wait(new[0]).expect("insert").status, CplStatus::Success);
    assert_eq!(drv.wait(new[1]).expect("lookup").status, CplStatus::Success);
    assert_eq!(drv.read_response(new[1]).expect("response").key, key(2));
}

/// A driver whose first command (an insert of key 1, the last of its
/// batch) lost its completion, reported to its wait at the timeout; the
/// device's fault injector and that command's tag.
fn lost_at_the_timeout() -> (Driver<EmulatedDevice>, nicsync_model::fault::FaultInjector, u16) {
    let dev = EmulatedDevice::inline().expect("device");
    let faults = dev.faults();
    let mut drv = Driver::probe(dev, cfg()).expect("probe");
    faults.arm(Fault::DropCompletion);
    let (d, e) = insert(1);
    let tag = drv.post(&d, e.as_ref()).expect("post");
    drv.ring();
    assert!(matches!(drv.wait(tag), Err(DriverError::CompletionLost(t)) if t == tag));
    (drv, faults, tag)
}

/// A command whose completion is reported lost at its wait's timeout is no
/// longer in flight: a reinit does not hand it back for replay (its caller
/// may resend it: it would run twice), a later completion does not count
/// the loss again, and its tag holds no outcome left to claim.
#[test]
fn a_loss_reported_at_the_timeout_is_counted_once_and_never_replayed() {
    let (mut drv, faults, tag) = lost_at_the_timeout();
    // Asked again, at once: nothing to wait for.
    assert!(matches!(drv.wait(tag), Err(DriverError::UnknownTag(t)) if t == tag));
    let (d, e) = insert(2);
    assert_eq!(drv.execute(&d, e.as_ref()).expect("next").status, CplStatus::Success);
    assert_eq!(drv.recovery_stats().lost_completions, 1);
    assert_eq!(drv.stats().lost_completions, 1);
    assert!(!drv.is_unclaimed(tag));
    // Stall the device with one command in flight: only it is replayed.
    faults.arm(Fault::Stall { duration: None });
    let (d, e) = insert(3);
    let t3 = drv.post(&d, e.as_ref()).expect("post");
    drv.ring();
    assert!(matches!(drv.wait(t3), Err(DriverError::Timeout { .. })));
    let pending = drv.reinit().expect("reinit");
    assert_eq!(pending.iter().map(|p| p.tag).collect::<Vec<_>>(), vec![t3]);
}

/// After a loss reported at the timeout, the ring's freed slots can all be
/// posted again and complete: the driver's view of the device's head moved
/// past the lost command. It used to stay behind, so a full ring's tail
/// met it and every later completion was refused (`Timeout`, then
/// `RingFull` for good).
#[test]
fn a_full_ring_after_a_loss_at_the_timeout_completes() {
    let (mut drv, _faults, _tag) = lost_at_the_timeout();
    for lap in 0..3 {
        let mut tags = Vec::new();
        for i in 0..drv.free_slots() {
            let (d, e) = insert(100 * (lap + 1) + i);
            tags.push(drv.post(&d, e.as_ref()).expect("post"));
        }
        assert!(tags.len() >= 14, "a ring of 16 slots holds 15 in flight: {}", tags.len());
        drv.ring();
        for t in tags {
            assert_eq!(drv.wait(t).expect("completion").status, CplStatus::Success);
        }
    }
    assert_eq!(drv.stats().lost_completions, 1);
    assert_eq!(drv.stats().bad_completions, 0);
}

/// A LOAD posted by `load_post` keeps its outcome for `load_take` while
/// more than a ring's worth of other commands run in between (the ring
/// comes round to its tag): posting over the tag used to forget it, and a
/// Full Sync slice then failed.
#[test]
fn a_posted_loads_outcome_survives_a_lap_of_the_ring() {
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Inline).expect("device");
    let mut t = ConnTable::open(dev, cfg()).expect("open");
    let mut st = ConnState::new(TcpState::Established, Direction::Original, ConnFlags::SYNC, 0, 5);
    st.generation = 1.into();
    let records: Vec<DeltaRecord> = (0..4)
        .map(|i| {
            DeltaUpdate { op: DeltaOp::Upsert, owner: 2, key: key(100 + i), state: st, nat: Nat::default() }.to_record()
        })
        .collect();
    let ticket = t.load_post(&records).expect("post");
    for i in 0..40 {
        t.upsert(&key(i), &ConnEntry::new(state(i))).expect("upsert");
    }
    let results = t.load_take(ticket).expect("the posted LOAD").expect("its outcome");
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for i in 0..4 {
        assert!(t.lookup(&key(100 + i)).expect("lookup").is_some());
    }
}
