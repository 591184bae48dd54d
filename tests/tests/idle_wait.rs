//! A device thread that sleeps while idle (`Idle::Wait`) must be woken by
//! what a real card's interrupts would wake: a doorbell from the host and a
//! sync frame from the wire. Each device here sleeps up to 60 s at a time,
//! so a missed wake-up shows as a command timing out (the driver waits
//! 2 s) or a frame not applied within the test's bound, never as a slow
//! pass.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use nicsync::table::{ConnEntry, ConnTable};
use nicsync::DriverConfig;
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_model::sync::SenderConfig;
use nicsync_model::sync_unit::{SyncUnit, SyncUnitConfig};
use nicsync_model::wire::{UdpConfig, UdpPeer, UdpPort};
use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::EmulatedDevice;

const SLEEP: Duration = Duration::from_secs(60);

fn member(id: u16, port: UdpPort, flush_when_idle: bool) -> ConnTable<EmulatedDevice> {
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    let mut sender = SenderConfig::new(1, id, 7 + u32::from(id));
    sender.flush_when_idle = flush_when_idle;
    // No timer of the sender's may wake the thread within the test: only
    // the doorbell and the wire can.
    sender.alive_interval_ns = 120_000_000_000;
    sender.tail_probe_ns = 0;
    let unit = SyncUnit::new(SyncUnitConfig { sender, peers: vec![3 - id] }, Box::new(port), 0).expect("unit");
    dev.nic().attach_sync(unit);
    let idle = dev.waiting_idle(4, SLEEP);
    dev.start_poller_with(None, idle).expect("poller");
    ConnTable::open(dev, DriverConfig { table_capacity: 1 << 12, aging_period_ms: 0, ..Default::default() })
        .expect("bring-up")
}

fn synced(i: u32) -> (ConnKey, ConnEntry) {
    let key = ConnKey::v4(Ipv4Addr::new(10, 0, 0, 1), 1000 + i as u16, Ipv4Addr::new(10, 0, 0, 2), 443, proto::TCP, 0);
    let flags = ConnFlags::CONFIRMED | ConnFlags::SYNC;
    (key, ConnEntry::new(ConnState::new(TcpState::Established, Direction::Original, flags, 0, i)))
}

fn pair(flush_when_idle: bool) -> (ConnTable<EmulatedDevice>, ConnTable<EmulatedDevice>) {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut pa = UdpPort::bind(UdpConfig::new(1).bind_to(any)).expect("udp");
    let mut pb = UdpPort::bind(UdpConfig::new(2).bind_to(any)).expect("udp");
    pa.add_peer(UdpPeer { addr: pb.local_addr(), member: Some(2) }).expect("peer");
    pb.add_peer(UdpPeer { addr: pa.local_addr(), member: Some(1) }).expect("peer");
    (member(1, pa, flush_when_idle), member(2, pb, flush_when_idle))
}

/// B's card has the entry: read through B's sync counters, which take the
/// design's lock but ring no doorbell (a doorbell would wake B and hide a
/// missed receive wake-up).
fn applied_at_b(b: &ConnTable<EmulatedDevice>) -> u64 {
    b.driver_ref().device().nic().sync_stats().map_or(0, |s| s.applied)
}

#[test]
fn doorbells_and_sync_frames_wake_a_sleeping_device() {
    let (mut a, b) = pair(true);
    for i in 0..20u32 {
        // Let both threads fall asleep, then wake A with a doorbell (the
        // upsert would time out otherwise) and B with the frame A sends.
        std::thread::sleep(Duration::from_millis(20));
        let before = applied_at_b(&b);
        let (k, e) = synced(i);
        a.upsert(&k, &e).expect("a sleeping device answers a doorbell");
        let t = Instant::now();
        while applied_at_b(&b) == before {
            assert!(t.elapsed() < Duration::from_secs(10), "update {i}: B slept through the sync frame");
            std::thread::yield_now();
        }
    }
}

#[test]
fn a_partial_frame_waits_for_its_flush_timer_not_for_the_longest_sleep() {
    // Without flush-when-idle the lone update sits in a partial frame until
    // the flush delay (50 µs): the sleeping thread must wake for that timer.
    let (mut a, b) = pair(false);
    std::thread::sleep(Duration::from_millis(20));
    let (k, e) = synced(1);
    a.upsert(&k, &e).expect("upsert");
    let t = Instant::now();
    while applied_at_b(&b) == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the flush timer did not wake the device");
        std::thread::yield_now();
    }
}

/// A host write to a device whose thread sleeps is run on the writing
/// thread (the design's lock is free): the completion is there when the
/// write returns and the thread is never signalled. When the design is
/// busy (here a test thread holds its lock, as the device thread does
/// during its last look before sleeping), the write signals the thread,
/// which then answers.
#[test]
fn a_sleeping_device_is_run_by_the_writer_or_woken() {
    // No sync unit: no timed work that would make the writer wake the
    // thread to re-plan its sleep (a_partial_frame_waits_... covers that).
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    let idle = dev.waiting_idle(4, SLEEP);
    dev.start_poller_with(None, idle).expect("poller");
    let mut a =
        ConnTable::open(dev, DriverConfig { table_capacity: 1 << 12, aging_period_ms: 0, ..Default::default() })
            .expect("bring-up");
    let until_armed = |a: &ConnTable<EmulatedDevice>| {
        let t = Instant::now();
        while !a.driver_ref().device().device_thread_armed() {
            assert!(t.elapsed() < Duration::from_secs(10), "the device thread never went to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Past its last look before sleeping (which holds the lock).
        std::thread::sleep(Duration::from_millis(5));
    };
    // Counted from here: the bring-up's writes may have come while the
    // thread took its last look before its first sleep, and woken it (19
    // such signals made this test fail a few times in a hundred runs).
    let before = a.driver_ref().device().doorbell_signals();
    for i in 0..20u32 {
        until_armed(&a);
        let (k, e) = synced(i);
        a.upsert(&k, &e).expect("upsert");
    }
    let signals = a.driver_ref().device().doorbell_signals() - before;
    assert_eq!(signals, 0, "the writer ran the sleeping device itself");

    until_armed(&a);
    let nic = a.driver_ref().device().nic().clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let _g = nic.core();
        locked_tx.send(()).expect("send");
        std::thread::sleep(Duration::from_millis(50));
    });
    locked_rx.recv().expect("locked");
    let (k, e) = synced(100);
    a.upsert(&k, &e).expect("a busy design's thread is woken and answers");
    holder.join().expect("holder");
    assert!(a.driver_ref().device().doorbell_signals() > before, "the busy design's thread was signalled");
}
