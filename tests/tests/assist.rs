//! Emulated devices sharing a machine with fewer cores than devices: a
//! polling thread passes over a device that another thread runs at that
//! moment (instead of blocking on it), and a host thread waiting for its
//! own card runs the peer cards it was given
//! (`EmulatedDevice::assist_peers`). `bench sync`'s sustained churn runs
//! this way. Each test fails by a command timing out, never by a slow pass.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use nicsync::table::{ConnEntry, ConnTable};
use nicsync::{DriverConfig, DriverError, TableError};
use nicsync_fwif::cmd::CommandDescriptor;
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_fwif::cpl::CplStatus;
use nicsync_model::{ExecMode, Idle, ModelConfig, Poller};
use nicsync_vfio::EmulatedDevice;

/// A device brought up by a thread of its own, then left with none.
fn card(completion_timeout: Duration) -> ConnTable<EmulatedDevice> {
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("device");
    dev.start_poller(None).expect("poller");
    let cfg = DriverConfig { table_capacity: 1 << 12, aging_period_ms: 0, completion_timeout, ..Default::default() };
    let t = ConnTable::open(dev, cfg).expect("bring-up");
    t.driver_ref().device().stop_poller();
    t
}

fn entry(i: u32) -> (ConnKey, ConnEntry) {
    let key = ConnKey::v4(Ipv4Addr::new(10, 0, 0, 1), 1000 + i as u16, Ipv4Addr::new(10, 0, 0, 2), 443, proto::TCP, 0);
    let state = ConnState::new(TcpState::Established, Direction::Original, ConnFlags::CONFIRMED, 0, i);
    (key, ConnEntry::new(state))
}

/// One polling thread serves A and B. While a test thread holds B's
/// design (as a host assisting B does), A's commands still complete: the
/// thread leaves B for that sweep instead of waiting for it.
#[test]
fn a_polling_thread_passes_over_a_device_another_thread_runs() {
    let mut a = card(Duration::from_secs(2));
    let b = card(Duration::from_secs(2));
    let nics = vec![a.driver_ref().device().nic().clone(), b.driver_ref().device().nic().clone()];
    let _poller = Poller::spawn_with(nics, Idle::Spin, || {}).expect("poller");
    let held = b.driver_ref().device().nic().core();
    for i in 0..100 {
        let (k, e) = entry(i);
        a.insert(&k, &e).expect("A's command completes while B's design is held");
    }
    drop(held);
    assert_eq!(a.len(), 100);
}

/// A's card has no thread, so A's command never completes; B's has none
/// either. A's host, waiting (until its timeout) for A, runs B, which
/// answers the command posted to it.
#[test]
fn a_host_waiting_for_its_card_runs_the_peers() {
    let mut a = card(Duration::from_millis(100));
    let mut b = card(Duration::from_secs(2));
    let (k, e) = entry(1);
    let posted = |b: &mut ConnTable<EmulatedDevice>| {
        let d = b.driver();
        let tag = d.next_tag();
        let desc = CommandDescriptor::lookup(tag, &k, d.next_response_iova());
        d.post(&desc, None).expect("post");
        d.ring();
        tag
    };

    // Without assistance nothing runs B.
    let tag = posted(&mut b);
    assert!(matches!(a.insert(&k, &e), Err(TableError::Driver(DriverError::Timeout { .. }))));
    assert_eq!(b.driver().poll_completions(|_| {}), 0, "B ran with no one to run it");

    a.driver_ref().device().assist_peers(vec![b.driver_ref().device().nic().clone()]);
    assert!(matches!(a.insert(&k, &e), Err(TableError::Driver(DriverError::Timeout { .. }))));
    let mut got = Vec::new();
    b.driver().poll_completions(|c| got.push(c));
    assert_eq!(got.len(), 1, "A's host ran B while it waited");
    assert_eq!((got[0].tag, got[0].status), (tag, CplStatus::NotFound));
}
