//! Completions by interrupt: the device model on its own polling thread
//! raises the completion eventfd (with moderation), and the driver sleeps
//! on it, blocking or through tokio's `AsyncFd`. No timing assertions: the
//! tests check that work completes and that interrupts were taken.
#![allow(clippy::expect_used)]

use std::net::Ipv4Addr;

use nicsync::irq::AsyncCompletions;
use nicsync::{CompletionMode, ConnEntry, ConnTable, DriverConfig};
use nicsync_fwif::cmd::{CommandDescriptor, DescFlags, Opcode};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_fwif::regs::Counter;
use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::EmulatedDevice;

fn key(i: u32) -> ConnKey {
    ConnKey::v4(Ipv4Addr::from(0x0a01_0000 | i), 40000, Ipv4Addr::new(192, 0, 2, 7), 443, proto::TCP, 0)
}

fn state() -> ConnState {
    ConnState::new(TcpState::Established, Direction::Original, ConnFlags::ASSURED, 600, 0)
}

fn threaded(coalesce_count: u32, coalesce_usec: u32) -> ConnTable<EmulatedDevice> {
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    dev.start_poller(None).expect("poller");
    let cfg = DriverConfig {
        completion_mode: CompletionMode::Interrupt,
        irq_coalesce_count: coalesce_count,
        irq_coalesce_usec: coalesce_usec,
        ..Default::default()
    };
    ConnTable::open(dev, cfg).expect("probe")
}

#[test]
fn blocking_waits_sleep_on_the_completion_interrupt() {
    let mut t = threaded(1, 0);
    for i in 0..200 {
        t.insert(&key(i), &ConnEntry::new(state())).expect("insert");
    }
    for i in 0..200 {
        assert!(t.lookup(&key(i)).expect("lookup").is_some());
    }
    // The driver slept on the eventfd and was woken by the device. (Not
    // every wait sleeps: a completion may be there before the first sleep.)
    assert!(t.driver().stats().interrupts > 0, "the driver never woke on an interrupt");
    assert!(t.driver().device_counter(Counter::Interrupts) > 0);
}

#[test]
fn moderated_interrupts_still_complete_every_command() {
    // 16 completions or 20 µs per interrupt: a batch of 1000 completes and
    // the device raised fewer interrupts than completions.
    let mut t = threaded(16, 20);
    let ops: Vec<nicsync::TableOp> =
        (0..1000).map(|i| nicsync::TableOp::Insert(key(i), ConnEntry::new(state()))).collect();
    for r in t.batch(&ops).expect("batch") {
        r.expect("insert");
    }
    assert_eq!(t.len(), 1000);
    let raised = t.driver().device_counter(Counter::Interrupts);
    assert!(raised > 0 && raised < 1000, "moderation: {raised} interrupts for 1000 completions");
}

#[test]
fn async_waits_through_tokio_asyncfd() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut t = threaded(1, 0);
        let irq = AsyncCompletions::new(t.driver_ref()).expect("async completions");
        for i in 0..100 {
            let drv = t.driver();
            let d = CommandDescriptor::conn(Opcode::Insert, DescFlags::AUTO_GENERATION, 0, &key(i), &state());
            let tag = drv.post(&d, None).expect("post");
            drv.ring();
            let c = irq.wait(drv, tag).await.expect("completion");
            assert_eq!(c.status, nicsync_fwif::cpl::CplStatus::Success);
        }
        drop(irq);
        assert_eq!(t.len(), 100);
        assert!(t.driver().device_counter(Counter::Interrupts) > 0);
    });
}

#[test]
fn interrupt_mode_needs_an_interrupt_line() {
    let m = nicsync_vfio::MockDevice::healthy();
    let cfg = DriverConfig { completion_mode: CompletionMode::Interrupt, ..Default::default() };
    let e = nicsync::Driver::probe(m, cfg).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("interrupt"), "{e}");
}

/// The same operations give the same results with the device on its own
/// polling thread (busy-polled completions) as with inline execution.
#[test]
fn polling_thread_matches_inline_execution() {
    use nicsync::TableOp;
    let ops: Vec<TableOp> = (0..3000u32)
        .map(|i| {
            let k = key(i % 500);
            match i % 5 {
                0 | 1 => TableOp::Insert(k, ConnEntry::new(state())),
                2 => TableOp::Update(k, ConnEntry::new(state())),
                3 => TableOp::Upsert(k, ConnEntry::new(state())),
                _ => TableOp::Delete(k),
            }
        })
        .collect();
    let run = |mut t: ConnTable<EmulatedDevice>| {
        let results: Vec<String> = t.batch(&ops).expect("batch").into_iter().map(|r| format!("{r:?}")).collect();
        let mut snap: Vec<String> = t.snapshot().map(|r| format!("{:?}", r.expect("record").key)).collect();
        snap.sort();
        (results, snap)
    };
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    dev.start_poller(None).expect("poller");
    let threaded = run(ConnTable::open(dev, DriverConfig::default()).expect("probe"));
    let inline =
        run(ConnTable::open(EmulatedDevice::inline().expect("device"), DriverConfig::default()).expect("probe"));
    assert_eq!(threaded, inline);
    assert!(!inline.1.is_empty());
}
