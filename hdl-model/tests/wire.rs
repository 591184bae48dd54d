#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed set-up is a failed test
//! The sync port's two wires: the in-process hub and UDP on loopback.
//!
//! UDP tests bind 127.0.0.1 on ephemeral ports and wait for datagrams with
//! bounded polling loops (a deadline of a few seconds), never fixed sleeps.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, NatKind, TcpState};
use nicsync_fwif::sync::DeltaUpdate;
use nicsync_model::sync::{
    epoch_from_entropy, DeltaReceiver, DeltaSender, ReceiverConfig, ReceiverEvent, SenderConfig,
};
use nicsync_model::wire::{
    HubConfig, Impairment, InProcessHub, InProcessPort, SyncPort, UdpConfig, UdpPeer, UdpPort, WireError, WireStats,
    MAX_WIRE_FRAME,
};

const DEADLINE: Duration = Duration::from_secs(5);

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A frame whose bytes name its sender and number.
fn frame(from: u16, n: u32) -> Vec<u8> {
    let mut f = vec![0u8; 40 + (n as usize % 64)];
    f[..2].copy_from_slice(&from.to_le_bytes());
    f[2..6].copy_from_slice(&n.to_le_bytes());
    f
}

fn frame_id(f: &[u8]) -> (u16, u32) {
    (u16::from_le_bytes([f[0], f[1]]), u32::from_le_bytes([f[2], f[3], f[4], f[5]]))
}

/// Everything waiting on an in-process port now.
fn drain(p: &mut impl SyncPort) -> Vec<Vec<u8>> {
    let mut buf = [0u8; MAX_WIRE_FRAME];
    let mut out = Vec::new();
    while let Some(n) = p.recv(&mut buf).expect("recv") {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Polls `port` until `want` frames arrived or the deadline passed.
fn recv_n(port: &mut UdpPort, want: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; MAX_WIRE_FRAME];
    let mut out = Vec::new();
    while out.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} frames arrived on {}", out.len(), port.local_addr());
        match port.recv(&mut buf).expect("recv") {
            Some(n) => out.push(buf[..n].to_vec()),
            None => std::thread::yield_now(),
        }
    }
    out
}

/// Polls `port` until `done(stats)` holds; any frame received fails the test.
fn poll_stats_until(port: &mut UdpPort, done: impl Fn(&WireStats) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; MAX_WIRE_FRAME];
    while !done(&port.stats()) {
        assert!(Instant::now() < deadline, "condition not reached: {:?}", port.stats());
        assert_eq!(port.recv(&mut buf).expect("recv"), None, "a datagram that should be dropped was accepted");
        std::thread::yield_now();
    }
}

fn udp_port(member: u16) -> UdpPort {
    UdpPort::bind(UdpConfig::new(member).bind_to(loopback0())).expect("bind loopback")
}

fn connect(ports: &mut [&mut UdpPort]) {
    let addrs: Vec<(u16, SocketAddr)> = ports.iter().map(|p| (p.local_member(), p.local_addr())).collect();
    for p in ports.iter_mut() {
        for &(m, a) in &addrs {
            if m != p.local_member() {
                p.add_peer(UdpPeer { addr: a, member: Some(m) }).expect("add peer");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// In-process hub
// ---------------------------------------------------------------------------

#[test]
fn hub_delivers_to_all_others_not_self() {
    let hub = InProcessHub::new(HubConfig::new());
    let mut ports: Vec<InProcessPort> = [3u16, 1, 2].iter().map(|m| hub.attach(*m).expect("attach")).collect();
    assert_eq!(hub.members(), [1, 2, 3]);
    for (i, p) in ports.iter_mut().enumerate() {
        let f = frame(p.local_member(), i as u32);
        p.send(&f).expect("send");
    }
    for p in &mut ports {
        let me = p.local_member();
        let got: Vec<_> = drain(p).iter().map(|f| frame_id(f).0).collect();
        let mut want: Vec<u16> = [3u16, 1, 2].into_iter().filter(|m| *m != me).collect();
        want.sort_unstable();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, want, "member {me} got {got:?}");
        let s = p.stats();
        assert_eq!((s.frames_sent, s.datagrams_sent, s.frames_received), (1, 2, 2));
    }
    assert!(hub.is_idle());
}

#[test]
fn hub_keeps_order_and_bytes() {
    let hub = InProcessHub::new(HubConfig::new());
    let mut a = hub.attach(1).expect("attach");
    let mut b = hub.attach(2).expect("attach");
    let sent: Vec<_> = (0..100).map(|i| frame(1, i)).collect();
    for f in &sent {
        a.send(f).expect("send");
    }
    assert_eq!(b.pending(), 100);
    assert_eq!(drain(&mut b), sent);
    assert!(drain(&mut a).is_empty());
}

#[test]
fn hub_send_to_reaches_one_member() {
    let hub = InProcessHub::new(HubConfig::new());
    let mut a = hub.attach(1).expect("attach");
    let mut b = hub.attach(2).expect("attach");
    let mut c = hub.attach(3).expect("attach");
    a.send_to(3, &frame(1, 7)).expect("send_to");
    a.send_to(9, &frame(1, 8)).expect("to a member not attached: nothing");
    a.send_to(1, &frame(1, 9)).expect("to itself: nothing");
    assert!(drain(&mut b).is_empty());
    assert_eq!(drain(&mut c), [frame(1, 7)]);
    assert!(drain(&mut a).is_empty());
}

#[test]
fn hub_queue_is_bounded_and_drops_are_counted() {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 8, ..HubConfig::new() });
    let mut a = hub.attach(1).expect("attach");
    let mut b = hub.attach(2).expect("attach");
    for i in 0..20 {
        a.send(&frame(1, i)).expect("a full peer queue is not the sender's error");
    }
    assert_eq!(b.pending(), 8);
    let s = b.stats();
    assert_eq!((s.rx_dropped, s.dropped()), (12, 12));
    // The oldest stay (an RX ring drops what arrives when it is full).
    let got: Vec<u32> = drain(&mut b).iter().map(|f| frame_id(f).1).collect();
    assert_eq!(got, (0..8).collect::<Vec<_>>());
    assert_eq!(a.stats().frames_sent, 20);
    // Room again.
    a.send(&frame(1, 99)).expect("send");
    assert_eq!(drain(&mut b), [frame(1, 99)]);
    assert_eq!(hub.stats(2).map(|s| s.rx_dropped), Some(12));
}

#[test]
fn hub_refuses_oversize_and_small_buffers() {
    let hub = InProcessHub::new(HubConfig::new());
    let mut a = hub.attach(1).expect("attach");
    let mut b = hub.attach(2).expect("attach");
    let big = vec![0u8; MAX_WIRE_FRAME + 1];
    let e = a.send(&big).expect_err("oversize");
    assert!(matches!(e, WireError::Oversize { len, max } if len == MAX_WIRE_FRAME + 1 && max == MAX_WIRE_FRAME));
    assert_eq!(a.stats().oversize_refused, 1);
    a.send(&vec![7u8; MAX_WIRE_FRAME]).expect("the maximum passes");
    let mut small = [0u8; 100];
    assert!(matches!(b.recv(&mut small), Err(WireError::BufferTooSmall { need: MAX_WIRE_FRAME, have: 100 })));
    assert_eq!(b.pending(), 1, "a refused recv consumes nothing");
    assert_eq!(drain(&mut b), [vec![7u8; MAX_WIRE_FRAME]]);
}

#[test]
fn hub_members_attach_detach_and_reattach() {
    let hub = InProcessHub::new(HubConfig::new());
    let mut a = hub.attach(1).expect("attach");
    let b = hub.attach(2).expect("attach");
    assert!(matches!(hub.attach(2), Err(WireError::DuplicateMember(2))));
    a.send(&frame(1, 1)).expect("send");
    drop(b); // a crash: its queue goes with it
    assert_eq!(hub.members(), [1]);
    assert_eq!(hub.stats(2), None);
    a.send(&frame(1, 2)).expect("send to nobody");
    let mut b = hub.attach(2).expect("restart");
    assert_eq!(b.stats(), WireStats::default());
    a.send(&frame(1, 3)).expect("send");
    assert_eq!(drain(&mut b), [frame(1, 3)]);
}

#[test]
fn hub_isolation_partitions_a_member() {
    let hub = InProcessHub::new(HubConfig::new());
    let mut a = hub.attach(1).expect("attach");
    let mut b = hub.attach(2).expect("attach");
    let mut c = hub.attach(3).expect("attach");
    hub.set_isolated(2, true);
    a.send(&frame(1, 1)).expect("send");
    b.send(&frame(2, 1)).expect("send");
    assert!(drain(&mut b).is_empty());
    assert_eq!(drain(&mut c), [frame(1, 1)]);
    assert_eq!(drain(&mut a), Vec::<Vec<u8>>::new());
    assert_eq!(b.stats().partitioned, 1);
    assert_eq!(a.stats().partitioned, 1);
    hub.set_isolated(2, false);
    a.send(&frame(1, 2)).expect("send");
    assert_eq!(drain(&mut b), [frame(1, 2)]);
}

/// Sends 2,000 numbered frames from member 1 under `imp` and returns what
/// members 2 and 3 received, with their counters.
fn impaired_run(seed: u64, imp: Impairment) -> (Vec<Vec<u32>>, Vec<WireStats>) {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 4096, seed, impairment: imp });
    let mut a = hub.attach(1).expect("attach");
    let mut rx = [hub.attach(2).expect("attach"), hub.attach(3).expect("attach")];
    let mut got = vec![Vec::new(), Vec::new()];
    for i in 0..2000 {
        a.send(&frame(1, i)).expect("send");
        if i % 7 == 0 {
            for (r, g) in rx.iter_mut().zip(&mut got) {
                g.extend(drain(r).iter().map(|f| frame_id(f).1));
            }
        }
    }
    for (r, g) in rx.iter_mut().zip(&mut got) {
        g.extend(drain(r).iter().map(|f| frame_id(f).1));
    }
    (got, rx.iter().map(SyncPort::stats).collect())
}

#[test]
fn hub_impairment_is_deterministic_per_seed() {
    let imp = Impairment { loss_ppm: 100_000, dup_ppm: 50_000, reorder_ppm: 50_000 };
    let (a, sa) = impaired_run(42, imp);
    let (b, sb) = impaired_run(42, imp);
    assert_eq!(a, b, "same seed, same deliveries");
    assert_eq!(sa, sb);
    // Other seeds, other deliveries (neighbouring seeds included).
    for seed in [43, 41, 42 ^ (1 << 63)] {
        assert!(impaired_run(seed, imp).0 != a, "seed {seed} replays seed 42");
    }
    for (got, s) in a.iter().zip(&sa) {
        // Every fault happened, and the counters account for every copy.
        assert!(s.impaired_lost > 100 && s.impaired_duplicated > 30 && s.impaired_reordered > 30, "{s:?}");
        assert_eq!(got.len() as u64, 2000 - s.impaired_lost + s.impaired_duplicated);
        assert_eq!(s.frames_received, got.len() as u64);
        assert!(got.windows(2).any(|w| w[1] < w[0]), "something was reordered");
        assert!(got.windows(2).any(|w| w[1] == w[0]), "something was duplicated");
        assert!(got.iter().all(|n| *n < 2000));
    }
    // No impairment: every frame once, in order.
    let (clean, s) = impaired_run(42, Impairment::NONE);
    for g in &clean {
        assert_eq!(*g, (0..2000).collect::<Vec<_>>());
    }
    assert!(s.iter().all(|s| s.dropped() == 0));
}

#[test]
fn hub_reordered_frames_are_never_stuck() {
    // Every copy is held back: each still arrives, once the queue is empty.
    let imp = Impairment { reorder_ppm: 1_000_000, ..Impairment::NONE };
    let hub = InProcessHub::new(HubConfig { queue_capacity: 16, seed: 1, impairment: imp });
    let mut a = hub.attach(1).expect("attach");
    let mut b = hub.attach(2).expect("attach");
    a.send(&frame(1, 0)).expect("send");
    assert_eq!(b.pending(), 1);
    assert_eq!(drain(&mut b), [frame(1, 0)]);
    for i in 1..=3 {
        a.send(&frame(1, i)).expect("send");
    }
    // Each new frame pushes the held one out and is held itself.
    let got: Vec<u32> = drain(&mut b).iter().map(|f| frame_id(f).1).collect();
    assert_eq!(got, [1, 2, 3]);
    assert!(hub.is_idle());
}

#[test]
fn hub_is_shared_between_threads() {
    let hub = InProcessHub::new(HubConfig::new());
    let mut a = hub.attach(1).expect("attach");
    let mut b = hub.attach(2).expect("attach");
    let device = std::thread::spawn(move || {
        // Echoes 500 frames back.
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; MAX_WIRE_FRAME];
        let mut echoed = 0;
        while echoed < 500 {
            assert!(Instant::now() < deadline, "device thread timed out");
            match b.recv(&mut buf).expect("recv") {
                Some(n) => {
                    b.send(&buf[..n]).expect("send");
                    echoed += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        b.stats()
    });
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; MAX_WIRE_FRAME];
    let mut back = Vec::new();
    let mut next = 0;
    while back.len() < 500 {
        assert!(Instant::now() < deadline, "test thread timed out");
        if next < 500 && a.pending() < 64 {
            a.send(&frame(1, next)).expect("send");
            next += 1;
        }
        if let Some(n) = a.recv(&mut buf).expect("recv") {
            back.push(frame_id(&buf[..n]).1);
        }
    }
    let s = device.join().expect("device thread");
    assert_eq!(back, (0..500).collect::<Vec<_>>());
    assert_eq!((s.frames_received, s.frames_sent, s.rx_dropped), (500, 500, 0));
}

// ---------------------------------------------------------------------------
// UDP on loopback
// ---------------------------------------------------------------------------

#[test]
fn udp_two_ports_exchange_datagrams() {
    let mut a = udp_port(1);
    let mut b = udp_port(2);
    assert_ne!(a.local_addr().port(), 0, "the ephemeral port is read back");
    connect(&mut [&mut a, &mut b]);
    let sent: Vec<_> = (0..20).map(|i| frame(1, i)).collect();
    for f in &sent {
        a.send(f).expect("send");
    }
    let big = vec![0xA5u8; MAX_WIRE_FRAME];
    b.send(&big).expect("the maximum frame fits one datagram");
    let mut got = recv_n(&mut b, 20);
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(recv_n(&mut a, 1), [big]);
    assert_eq!(a.stats().frames_sent, 20);
    assert_eq!(a.stats().datagrams_sent, 20);
    assert_eq!(b.stats().frames_received, 20);
    assert_eq!(b.stats().dropped(), 0);
}

#[test]
fn udp_three_ports_broadcast_and_unicast() {
    let mut ports = [udp_port(1), udp_port(2), udp_port(3)];
    {
        let [a, b, c] = &mut ports;
        connect(&mut [a, b, c]);
    }
    for p in &mut ports {
        let m = p.local_member();
        p.send(&frame(m, 0)).expect("send");
    }
    for p in &mut ports {
        let me = p.local_member();
        let mut from: Vec<u16> = recv_n(p, 2).iter().map(|f| frame_id(f).0).collect();
        from.sort_unstable();
        let want: Vec<u16> = [1, 2, 3].into_iter().filter(|m| *m != me).collect();
        assert_eq!(from, want, "member {me}");
    }
    // Unicast to member 3 only; then a broadcast marks the end for member 2.
    ports[0].send_to(3, &frame(1, 1)).expect("send_to");
    ports[0].send(&frame(1, 2)).expect("send");
    let to3: Vec<u32> = recv_n(&mut ports[2], 2).iter().map(|f| frame_id(f).1).collect();
    assert_eq!(to3, [1, 2]);
    assert_eq!(recv_n(&mut ports[1], 1), [frame(1, 2)], "member 2 did not get the unicast frame");
    assert_eq!(ports[0].stats().datagrams_sent, 2 + 1 + 2);
}

#[test]
fn udp_unknown_sender_is_dropped_and_counted() {
    let mut a = udp_port(1);
    let mut b = udp_port(2);
    connect(&mut [&mut a, &mut b]);
    let stranger = UdpSocket::bind(loopback0()).expect("bind");
    stranger.send_to(&frame(9, 1), a.local_addr()).expect("send");
    stranger.send_to(&frame(9, 2), a.local_addr()).expect("send");
    poll_stats_until(&mut a, |s| s.unknown_source == 2);
    // A peer still gets through after them.
    b.send(&frame(2, 3)).expect("send");
    assert_eq!(recv_n(&mut a, 1), [frame(2, 3)]);
    let s = a.stats();
    assert_eq!((s.unknown_source, s.frames_received, s.dropped()), (2, 1, 2));
}

#[test]
fn udp_oversize_is_refused_and_dropped() {
    let mut a = udp_port(1);
    let mut b = udp_port(2);
    connect(&mut [&mut a, &mut b]);
    let e = a.send(&vec![0u8; MAX_WIRE_FRAME + 1]).expect_err("oversize send");
    assert!(matches!(e, WireError::Oversize { len, .. } if len == MAX_WIRE_FRAME + 1));
    assert_eq!(a.stats().oversize_refused, 1);
    assert_eq!(a.stats().datagrams_sent, 0);
    // An oversize datagram from a (raw) peer is dropped, on both receive paths.
    let raw = UdpSocket::bind(loopback0()).expect("bind");
    b.add_peer(UdpPeer { addr: raw.local_addr().expect("addr"), member: None }).expect("add peer");
    raw.send_to(&vec![1u8; 2000], b.local_addr()).expect("send");
    poll_stats_until(&mut b, |s| s.oversize_received == 1);
    raw.send_to(&vec![1u8; MAX_WIRE_FRAME + 1], b.local_addr()).expect("send");
    let deadline = Instant::now() + DEADLINE;
    let mut exact = [0u8; MAX_WIRE_FRAME]; // no room for the extra byte: via the scratch buffer
    while b.stats().oversize_received < 2 {
        assert!(Instant::now() < deadline, "oversize datagram not seen");
        assert_eq!(b.recv(&mut exact).expect("recv"), None);
    }
    raw.send_to(&[5u8; 64], b.local_addr()).expect("send");
    assert_eq!(recv_n(&mut b, 1), [vec![5u8; 64]]);
    let mut small = [0u8; 64];
    assert!(matches!(b.recv(&mut small), Err(WireError::BufferTooSmall { .. })));
}

/// A port's sockets share its address (SO_REUSEPORT, one connected per
/// peer), which would let a second port bind it too and take some of its
/// datagrams: a second port on the same address is refused as before.
#[test]
fn udp_a_second_port_on_a_ports_address_is_refused() {
    let mut a = udp_port(1);
    let mut b = udp_port(2);
    connect(&mut [&mut a, &mut b]);
    let e = UdpPort::bind(UdpConfig::new(3).bind_to(a.local_addr())).expect_err("address in use");
    assert!(matches!(&e, WireError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse), "{e:?}");
    // The peer's datagrams (on the connected socket) still reach it.
    b.send(&frame(2, 1)).expect("send");
    assert_eq!(recv_n(&mut a, 1), [frame(2, 1)]);
}

#[test]
fn udp_bind_and_peer_errors_name_the_address() {
    let taken = UdpSocket::bind(loopback0()).expect("bind");
    let addr = taken.local_addr().expect("addr");
    let e = UdpPort::bind(UdpConfig::new(1).bind_to(addr)).expect_err("address in use");
    match &e {
        WireError::Bind { addr: a, source, .. } => {
            assert_eq!(*a, addr);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&addr.to_string()) && msg.contains("address in use"), "{msg}");

    let mut p = udp_port(1);
    let me = p.local_addr();
    assert!(matches!(p.add_peer(UdpPeer { addr: me, member: None }), Err(WireError::PeerIsSelf(a)) if a == me));
    let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
    p.add_peer(UdpPeer { addr: other, member: Some(2) }).expect("peer");
    assert!(matches!(p.add_peer(UdpPeer { addr: other, member: None }), Err(WireError::DuplicatePeer(_))));
    for bad in ["0.0.0.0:8116", "127.0.0.1:0", "224.0.0.1:8116", "255.255.255.255:8116", "[::1]:8116"] {
        let addr: SocketAddr = bad.parse().unwrap();
        assert!(matches!(p.add_peer(UdpPeer { addr, member: None }), Err(WireError::BadPeer { .. })), "{bad}");
    }
    let addr: SocketAddr = "127.0.0.1:10".parse().unwrap();
    assert!(matches!(p.add_peer(UdpPeer { addr, member: Some(1) }), Err(WireError::BadPeer { .. })));
    assert!(p.remove_peer(other));
    assert!(!p.remove_peer(other));
    assert!(p.peers().is_empty());
    assert_eq!(UdpConfig::new(1).bind.port(), nicsync_fwif::sync::SYNC_UDP_PORT);
}

// ---------------------------------------------------------------------------
// End to end: DeltaSender → UDP → DeltaReceiver
// ---------------------------------------------------------------------------

const CLUSTER: u16 = 7;

fn update(i: u32) -> DeltaUpdate {
    let key = ConnKey::v4(
        [10, 0, (i >> 8) as u8, i as u8].into(),
        1024 + i as u16,
        [192, 0, 2, 1].into(),
        443,
        proto::TCP,
        0,
    );
    let mut st = ConnState::new(TcpState::Established, Direction::Original, ConnFlags::SYNC, 300, i);
    st.generation = (i + 1).into();
    match i % 5 {
        0 => DeltaUpdate::delete(1, key, st),
        1 => DeltaUpdate::upsert(1, key, st, Nat::new(NatKind::Source, [198, 51, 100, 7].into(), 40_000)),
        _ => DeltaUpdate::upsert(1, key, st, Nat::default()),
    }
}

#[test]
fn delta_sync_over_udp_loopback_delivers_in_order() {
    const N: u32 = 400;
    let mut a = udp_port(1);
    let mut b = udp_port(2);
    connect(&mut [&mut a, &mut b]);
    let start = Instant::now();
    let now = || start.elapsed().as_nanos() as u64;
    let mut sender = DeltaSender::new(SenderConfig::new(CLUSTER, 1, epoch_from_entropy(now() ^ 0x51)), now())
        .expect("sender config");
    let mut receiver =
        DeltaReceiver::new(ReceiverConfig::new(CLUSTER, 2, epoch_from_entropy(now() ^ 0x52), 1)).expect("receiver");
    let updates: Vec<DeltaUpdate> = (0..N).map(update).collect();
    let mut submitted = 0usize;
    let mut delivered = Vec::new();
    let mut resets = 0;
    let mut buf = [0u8; MAX_WIRE_FRAME];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "delivered {} of {N}; rx {:?}", delivered.len(), receiver.stats());
        // Bursts of up to 7 updates (partial frames leave after the flush delay).
        for u in updates.iter().skip(submitted).take(7) {
            let seq = sender.submit(u, now()).expect("valid update");
            submitted += 1;
            assert_eq!(seq, submitted as u64);
        }
        let t = now();
        if sender.poll_timeout().is_some_and(|d| d <= t) {
            sender.handle_timeout(t);
        }
        if receiver.poll_timeout().is_some_and(|d| d <= t) {
            receiver.handle_timeout(t);
        }
        while let Some(tx) = sender.poll_transmit() {
            a.transmit(&tx).expect("send");
        }
        while let Some(tx) = receiver.poll_transmit() {
            b.transmit(&tx).expect("send");
        }
        while let Some(n) = b.recv(&mut buf).expect("recv") {
            receiver.handle_datagram(&buf[..n], now()).expect("a well-formed frame");
        }
        while let Some(n) = a.recv(&mut buf).expect("recv") {
            sender.handle_datagram(&buf[..n], now()).expect("a well-formed frame");
        }
        while let Some(ev) = receiver.poll_event() {
            match ev {
                ReceiverEvent::Deliver { seq, update } => delivered.push((seq, update)),
                ReceiverEvent::PeerReset { peer: 1, old_epoch: None, first_seq: 1, .. } => resets += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        // Done when everything arrived and the sender saw it acknowledged
        // (the reverse path works too).
        if delivered.len() == N as usize && sender.acked_through(2) == Some(u64::from(N)) {
            break;
        }
        std::thread::yield_now();
    }
    let want: Vec<(u64, DeltaUpdate)> = updates.iter().enumerate().map(|(i, u)| (i as u64 + 1, *u)).collect();
    assert_eq!(delivered, want, "exactly the updates sent, in order, once");
    assert_eq!(resets, 1);
    let rs = receiver.stats();
    assert_eq!((rs.updates_received, rs.lost_updates, rs.malformed), (u64::from(N), 0, 0));
    assert_eq!(sender.stats().updates_sent, u64::from(N));
    for p in [&a, &b] {
        assert_eq!(p.stats().unknown_source, 0);
        assert_eq!(p.stats().errors, 0);
    }
    assert!(b.stats().frames_received >= u64::from(N) / 16, "{:?}", b.stats());
}
