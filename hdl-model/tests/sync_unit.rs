//! The sync unit's order of work on the device: frames leave after the
//! updates that fill them are submitted (the pipeline sends them after it
//! has written their completions), and a received frame's updates are
//! delivered before the port is read again.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, TcpState};
use nicsync_fwif::sync::DeltaUpdate;
use nicsync_model::sync::{ReceiverEvent, SenderConfig};
use nicsync_model::sync_unit::{SyncUnit, SyncUnitConfig};
use nicsync_model::wire::{HubConfig, InProcessHub, SyncPort, WireError, WireStats};

/// A port that counts the reads and sends made through it.
struct Counting {
    inner: Box<dyn SyncPort>,
    reads: Arc<AtomicU64>,
    sends: Arc<AtomicU64>,
}

impl SyncPort for Counting {
    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        self.sends.fetch_add(1, Ordering::Relaxed);
        self.inner.send(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.recv(buf)
    }

    fn local_member(&self) -> u16 {
        self.inner.local_member()
    }

    fn stats(&self) -> WireStats {
        self.inner.stats()
    }
}

struct Counted {
    unit: SyncUnit,
    reads: Arc<AtomicU64>,
    sends: Arc<AtomicU64>,
}

fn unit(hub: &InProcessHub, id: u16) -> Counted {
    let (reads, sends) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let port =
        Counting { inner: Box::new(hub.attach(id).expect("attach")), reads: reads.clone(), sends: sends.clone() };
    let mut sender = SenderConfig::new(1, id, 0x77 + id as u32);
    // Every update its own frame, at once.
    sender.flush_delay_ns = 0;
    let cfg = SyncUnitConfig { sender, peers: vec![3 - id] };
    Counted { unit: SyncUnit::new(cfg, Box::new(port), 0).expect("unit"), reads, sends }
}

fn update(i: u32) -> DeltaUpdate {
    let key = ConnKey::v4(Ipv4Addr::new(10, 9, 0, i as u8), 1000, Ipv4Addr::new(192, 0, 2, 9), 443, proto::TCP, 0);
    let st = ConnState::new(TcpState::Established, Direction::Original, ConnFlags::SYNC, 60, i);
    DeltaUpdate::upsert(1, key, st, Nat::default())
}

/// Two units that have exchanged their opening frames (HELLO), with the
/// counts reset.
fn pair(hub: &InProcessHub) -> (Counted, Counted) {
    let (mut a, mut b) = (unit(hub, 1), unit(hub, 2));
    for u in [&mut a, &mut b] {
        u.unit.transmit_submitted();
    }
    for u in [&mut a, &mut b] {
        while delivered(&mut u.unit).0 {}
        u.reads.store(0, Ordering::Relaxed);
        u.sends.store(0, Ordering::Relaxed);
    }
    (a, b)
}

fn delivered(u: &mut SyncUnit) -> (bool, Vec<u32>) {
    let mut marks = Vec::new();
    let more = u.pump(0, |ev| {
        if let ReceiverEvent::Deliver { update, .. } = ev {
            marks.push(update.state.mark.get());
        }
    });
    (more, marks)
}

#[test]
fn submitted_updates_leave_when_the_pipeline_sends_them() {
    let hub = InProcessHub::new(HubConfig::new());
    let (mut a, mut b) = pair(&hub);
    for i in 1..=3 {
        a.unit.submit(&update(i), 0);
    }
    assert_eq!(a.sends.load(Ordering::Relaxed), 0, "a frame left before the pipeline sent it");
    assert!(a.unit.transmit_submitted(), "it says it sent (the poller lets the peers' devices run)");
    assert_eq!(a.sends.load(Ordering::Relaxed), 3);
    assert!(!a.unit.transmit_submitted(), "nothing more to send");
    let mut all = Vec::new();
    while let (true, marks) = delivered(&mut b.unit) {
        all.extend(marks);
    }
    assert_eq!(all, [1, 2, 3]);
}

#[test]
fn a_long_run_of_submissions_does_not_fill_the_senders_queue() {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 1 << 14, ..HubConfig::new() });
    let (mut a, mut b) = pair(&hub);
    // Far more one-update frames than the sender queues (1,024), with no
    // transmit_submitted call: the unit sends on its own as they build up.
    let n = 5_000;
    for i in 0..n {
        a.unit.submit(&update(i), 0);
    }
    a.unit.transmit_submitted();
    assert_eq!(a.unit.stats().protocol.tx_drops, 0);
    let mut got = 0;
    while let (true, marks) = delivered(&mut b.unit) {
        got += marks.len();
    }
    assert_eq!(got, n as usize);
}

#[test]
fn a_frames_updates_are_delivered_before_the_port_is_read_again() {
    let hub = InProcessHub::new(HubConfig::new());
    let (mut a, mut b) = pair(&hub);
    a.unit.submit(&update(1), 0);
    a.unit.submit(&update(2), 0);
    a.unit.transmit_submitted();
    // One read, one frame, its update delivered, and "there may be more".
    assert_eq!(delivered(&mut b.unit), (true, vec![1]));
    assert_eq!(b.reads.load(Ordering::Relaxed), 1);
    assert_eq!(delivered(&mut b.unit), (true, vec![2]));
    assert_eq!(b.reads.load(Ordering::Relaxed), 2);
    // Then the read that finds nothing.
    assert_eq!(delivered(&mut b.unit), (false, vec![]));
    assert_eq!(b.reads.load(Ordering::Relaxed), 3);
}
