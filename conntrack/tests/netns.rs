#![allow(clippy::expect_used)] // test code: a failed set-up is a failed test
//! Against the real kernel, inside a throw-away network namespace: bulk
//! CT_NEW, dump, events, delete, flush. Needs root (CI runs as root); it
//! fails, never skips, when it cannot create the namespace.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use nicsync_conntrack::{
    from_ct, in_netns, to_ct, CreateMode, CtEntry, CtError, CtEvent, CtSocket, EventSocket, Groups, Tuple,
    COMMIT_STATUS,
};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, NatKind, TcpState};

/// A network namespace deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("nicsync-ct-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let out = Command::new("ip").args(["netns", "add", &name]).output();
        match out {
            Ok(o) if o.status.success() => Netns { name },
            Ok(o) => panic!(
                "this test needs root and network namespaces (CI runs it as root): `ip netns add {name}` failed \
                 (euid {}): {}",
                euid(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("this test needs iproute2's `ip` and root: cannot run `ip netns add`: {e}"),
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn euid() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2).unwrap_or("?").to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

fn open(ns: &Netns) -> (EventSocket, CtSocket) {
    in_netns(&ns.path(), || {
        let ev = EventSocket::open(Groups::ALL).expect("event socket");
        let ct = CtSocket::open().expect("request socket");
        (ev, ct)
    })
    .expect("enter the test namespace")
}

/// The i-th test connection as a nicsync record: mostly IPv4 TCP
/// ESTABLISHED, every 10th IPv6 UDP, every 50th with source NAT, some in
/// zone 5.
fn record(i: u32) -> (ConnKey, ConnState, Nat) {
    let sport = 10_000 + (i % 50_000) as u16;
    let zone = if i % 7 == 0 { 5 } else { 0 };
    let (key, tcp) = if i % 10 == 3 {
        let s = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, (i >> 16) as u16, i as u16);
        let d = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
        (ConnKey::v6(s, sport, d, 53, proto::UDP, zone), TcpState::None)
    } else {
        let s = Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8);
        (ConnKey::v4(s, sport, Ipv4Addr::new(10, 2, 0, 1), 443, proto::TCP, zone), TcpState::Established)
    };
    let flags = ConnFlags::ASSURED | ConnFlags::CONFIRMED | ConnFlags::SEEN_REPLY;
    let state = ConnState::new(tcp, Direction::Original, flags, 600, i);
    let nat = if i % 50 == 0 && key.family == 4 {
        Nat::new(NatKind::Source, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 20_000 + (i / 50) as u16)
    } else {
        Nat::default()
    };
    (key, state, nat)
}

fn drain(ev: &mut EventSocket) -> Vec<CtEvent> {
    let mut v = Vec::new();
    ev.read(|e| v.push(e)).expect("read events");
    v
}

#[test]
fn bulk_create_dump_events_delete_flush_in_a_namespace() {
    let ns = Netns::new("main");
    let (mut ev, mut ct) = open(&ns);
    assert!(ev.receive_buffer().expect("SO_RCVBUF") >= 4 << 20, "event receive buffer was not enlarged");
    ct.flush().expect("flush a fresh table");
    assert!(ct.dump_all().expect("dump").is_empty());
    drain(&mut ev);

    const N: u32 = 1000;
    let records: Vec<_> = (0..N).map(record).collect();
    let entries: Vec<_> = records.iter().map(|(k, s, n)| to_ct(k, s, n).expect("to_ct")).collect();
    let t0 = Instant::now();
    let out = ct.create_batch(&entries, CreateMode::Exclusive).expect("create batch");
    let dt = t0.elapsed();
    assert_eq!(out.failed, vec![], "kernel refused entries (index, errno)");
    assert_eq!((out.ok, out.answered), (N as usize, N as usize));
    println!("CT_NEW bulk create: {N} entries in {dt:?} = {:.0} entries/s", f64::from(N) / dt.as_secs_f64());

    // The dump returns every entry, with the fields that were committed.
    let want: HashMap<ConnKey, &(ConnKey, ConnState, Nat)> = records.iter().map(|r| (r.0, r)).collect();
    let dumped = ct.dump_all().expect("dump");
    assert_eq!(dumped.len(), N as usize);
    for e in &dumped {
        let m = from_ct(e).expect("dumped entry maps");
        let (_, s, n) = want.get(&m.key).unwrap_or_else(|| panic!("unexpected entry {:?}", m.key));
        assert_eq!(m.nat, *n, "{:?}", m.key);
        assert_eq!(m.state.tcp(), s.tcp(), "{:?}", m.key);
        assert_eq!(m.state.mark.get(), s.mark.get());
        let t = m.state.timeout_s.get();
        assert!((590..=600).contains(&t), "timeout {t} of {:?}", m.key);
        assert_eq!(e.status & COMMIT_STATUS, COMMIT_STATUS, "status {:#x} of {:?}", e.status, m.key);
        let want_nat = if n.nat_kind() == Some(NatKind::Source) { ConnFlags::SRC_NAT } else { ConnFlags::empty() };
        assert_eq!(m.state.conn_flags() & (ConnFlags::SRC_NAT | ConnFlags::DST_NAT), want_nat);
        assert!(e.id.is_some(), "dump carries CTA_ID");
    }
    let keys: HashSet<ConnKey> = dumped.iter().map(|e| from_ct(e).expect("maps").key).collect();
    assert_eq!(keys.len(), N as usize, "dump returned duplicates");

    // One NEW event per created entry, queued before the acks came back.
    let events = drain(&mut ev);
    assert!(!events.contains(&CtEvent::Overrun), "event socket overran");
    let new: HashSet<ConnKey> = events
        .iter()
        .filter_map(|e| match e {
            CtEvent::New(e) => Some(from_ct(e).expect("event maps").key),
            _ => None,
        })
        .collect();
    assert_eq!(new.len(), N as usize, "NEW events for {} of {N} entries ({} events)", new.len(), events.len());

    // Creating again exclusively fails per entry with EEXIST; upserting
    // updates the mark and reports UPDATE events.
    let again = ct.create_batch(&entries[..10], CreateMode::Exclusive).expect("batch");
    assert_eq!(again.ok, 0);
    assert!(again.failed.iter().all(|&(_, e)| e == libc::EEXIST), "{:?}", again.failed);
    let mut remarked: Vec<_> = entries[1..6].to_vec();
    for e in &mut remarked {
        e.mark = 0xabcd;
        // NAT bindings are refused on an existing entry (none in 1..6).
        assert!(e.nat_src.is_none());
    }
    let up = ct.create_batch(&remarked, CreateMode::Upsert).expect("upsert");
    assert_eq!(up.failed, vec![]);
    // ctnetlink cannot change the NAT of an existing entry: an update that
    // carries a NAT binding is refused, which the commit path must handle.
    assert!(entries[0].nat_src.is_some());
    let nat_up = ct.create_batch(&entries[..1], CreateMode::Upsert).expect("upsert");
    assert_eq!(nat_up.failed, vec![(0, libc::EOPNOTSUPP)]);
    // The retry without the binding updates the rest and keeps the NAT.
    let mut remarked_nat = entries[0].clone();
    remarked_nat.mark = 0xabcd;
    let kept = ct.upsert_keeping_nat(&remarked_nat).expect("upsert keeping the NAT");
    assert_eq!((kept.ok, kept.failed.clone()), (1, vec![]));
    let now = ct.dump_all().expect("dump").into_iter().find(|e| e.orig == entries[0].orig).expect("still there");
    assert_eq!(now.mark, 0xabcd);
    assert_eq!(now.reply, entries[0].reply, "the NAT it was created with");
    let updates = drain(&mut ev).into_iter().filter(|e| matches!(e, CtEvent::Update(u) if u.mark == 0xabcd)).count();
    assert_eq!(updates, 6, "UPDATE events for the re-marked entries");
    // And back to 0: an update carries the mark even when it is 0 (left
    // out, the kernel kept the old one).
    let unmarked: Vec<_> = remarked.iter().map(|e| CtEntry { mark: 0, ..e.clone() }).collect();
    assert_eq!(ct.create_batch(&unmarked, CreateMode::Upsert).expect("upsert").failed, vec![]);
    let marks: Vec<u32> = ct
        .dump_all()
        .expect("dump")
        .into_iter()
        .filter(|e| unmarked.iter().any(|u| u.orig == e.orig))
        .map(|e| e.mark)
        .collect();
    assert_eq!(marks, vec![0; 5]);
    drain(&mut ev);

    // Delete 100: each gets a DESTROY event and leaves the dump.
    let gone: Vec<_> = entries.iter().step_by(10).cloned().collect();
    for e in &gone {
        ct.delete(e).expect("delete");
    }
    let destroyed: HashSet<Tuple> = drain(&mut ev)
        .into_iter()
        .filter_map(|e| match e {
            CtEvent::Destroy(e) => Some(e.orig),
            _ => None,
        })
        .collect();
    assert_eq!(destroyed, gone.iter().map(|e| e.orig).collect::<HashSet<_>>());
    assert_eq!(ct.dump_all().expect("dump").len(), (N - 100) as usize);
    match ct.delete(&gone[0]) {
        Err(CtError::Kernel { errno, .. }) => assert_eq!(errno, libc::ENOENT),
        other => panic!("deleting a missing entry: {other:?}"),
    }

    ct.flush().expect("flush");
    assert!(ct.dump_all().expect("dump").is_empty());
    drop(ns);
}

#[test]
fn bulk_create_rate_100k() {
    let ns = Netns::new("rate");
    let ct = in_netns(&ns.path(), CtSocket::open).expect("enter namespace");
    let mut ct = ct.expect("request socket");
    const N: u32 = 100_000;
    let entries: Vec<_> = (0..N)
        .map(|i| {
            let key = ConnKey::v4(
                Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
                1024 + (i % 60_000) as u16,
                Ipv4Addr::new(192, 0, 2, 1),
                80,
                proto::TCP,
                0,
            );
            let st = ConnState::new(TcpState::Established, Direction::Original, ConnFlags::ASSURED, 3600, 0);
            to_ct(&key, &st, &Nat::default()).expect("to_ct")
        })
        .collect();
    let t0 = Instant::now();
    let out = ct.create_batch(&entries, CreateMode::Exclusive).expect("create batch");
    let dt = t0.elapsed();
    assert_eq!(
        (out.ok, out.failed.len()),
        (N as usize, 0),
        "first failures: {:?}",
        &out.failed[..out.failed.len().min(5)]
    );
    println!(
        "CT_NEW bulk create (no listener): {N} ESTABLISHED/ASSURED entries in {dt:?} = {:.0} entries/s",
        f64::from(N) / dt.as_secs_f64()
    );
    let t1 = Instant::now();
    let n = ct.dump(|_| {}).expect("dump");
    println!("dump: {n} entries in {:?}", t1.elapsed());
    assert_eq!(n, N as usize);
}

#[test]
fn overrun_is_reported_and_the_socket_keeps_working() {
    let ns = Netns::new("overrun");
    let (mut ev, mut ct) = in_netns(&ns.path(), || {
        (
            EventSocket::open_with_buffer(Groups::ALL, 4096).expect("event socket"),
            CtSocket::open().expect("request socket"),
        )
    })
    .expect("enter namespace");
    // Events are queued while CT_NEW is processed, so 500 NEW events cannot
    // all fit into a few KiB by the time the batch is acknowledged.
    let entries: Vec<_> = (0..500)
        .map(|i| {
            let (k, s, n) = record(i);
            to_ct(&k, &s, &n).expect("to_ct")
        })
        .collect();
    assert_eq!(ct.create_batch(&entries, CreateMode::Exclusive).expect("batch").ok, 500);
    let events = drain(&mut ev);
    assert!(events.contains(&CtEvent::Overrun), "no Overrun among {} events", events.len());
    let news = events.iter().filter(|e| matches!(e, CtEvent::New(_))).count();
    assert!(news < 500, "all {news} events fit: the test did not overrun");
    // After the overrun the subscription still delivers.
    ct.delete(&entries[0]).expect("delete");
    let after = drain(&mut ev);
    assert!(after.iter().any(|e| matches!(e, CtEvent::Destroy(d) if d.orig == entries[0].orig)), "{after:?}");
}
