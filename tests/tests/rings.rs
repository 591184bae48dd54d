#![allow(clippy::expect_used)] // test code: a failed set-up is a failed test
//! Rings, capacity, aging and snapshot over the inline emulated device:
//! wraparound and phase flips across many laps, chained commands across the
//! ring end, ring-full back-pressure, a full table, aging events, event-ring
//! overflow, and multi-chunk snapshots.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use nicsync::driver::RESPONSE_STRIDE;
use nicsync::{ConnEntry, ConnTable, DriverConfig, DriverError, TableError, TableOp};
use nicsync_fwif::cmd::{CommandDescriptor, DescFlags, Opcode};
use nicsync_fwif::conn::{proto, ConnKey, ConnState, Nat, NatKind, FAMILY_IPV4};
use nicsync_fwif::cpl::CplStatus;
use nicsync_fwif::event::{Event, EventKind};
use nicsync_fwif::hash::{TableHash, TableHashSeed};
use nicsync_fwif::regs::{Counter, Status};
use nicsync_vfio::EmulatedDevice;

fn open(cfg: DriverConfig) -> ConnTable<EmulatedDevice> {
    let dev = EmulatedDevice::inline().expect("emulated device");
    ConnTable::open(dev, cfg).expect("probe of the emulated device")
}

fn cfg(cmd_ring_log2: u32) -> DriverConfig {
    DriverConfig { cmd_ring_log2, table_capacity: 1 << 16, aging_period_ms: 0, ..DriverConfig::default() }
}

fn key4(i: u32) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a00_0000 + i),
        (i % 50_000) as u16 + 1,
        Ipv4Addr::new(192, 0, 2, 1),
        443,
        proto::TCP,
        0,
    )
}

fn key6(i: u32) -> ConnKey {
    let src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (i >> 16) as u16, i as u16);
    ConnKey::v6(src, (i % 60_000) as u16, Ipv6Addr::LOCALHOST, 53, proto::UDP, (i % 7) as u16)
}

/// A mix of IPv4 and IPv6 keys.
fn key(i: u32) -> ConnKey {
    if i % 3 == 0 {
        key6(i)
    } else {
        key4(i)
    }
}

fn nat_for(k: &ConnKey, i: u32) -> Nat {
    let addr = if k.family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i % 250) as u8))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, i as u16))
    };
    let kind = if i % 2 == 0 { NatKind::Source } else { NatKind::Destination };
    Nat::new(kind, addr, 1024 + (i % 60_000) as u16)
}

fn state(mark: u32, timeout_s: u32) -> ConnState {
    ConnState {
        tcp_state: 3,
        flags: 0x7.into(),
        timeout_s: timeout_s.into(),
        mark: mark.into(),
        ..ConnState::default()
    }
}

/// Small deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
}

/// Index of the slot the next command will take (the driver's tail).
fn tail_of(t: &ConnTable<EmulatedDevice>) -> u32 {
    let d = t.driver_ref();
    ((d.next_response_iova() - d.response_iova(0)) / RESPONSE_STRIDE as u64) as u32
}

fn counter(t: &mut ConnTable<EmulatedDevice>, c: Counter) -> u64 {
    t.driver().device_counter(c)
}

/// Tens of thousands of single operations and batches (some chained with a
/// NAT translation) on rings of 4, 8 and 16 slots: every result is checked
/// against a reference map, and at the end every posted command completed
/// exactly once, no completion was rejected, and there was exactly one
/// doorbell per API call (every batch fits in the ring).
#[test]
fn wraparound_many_laps_single_ops_and_batches() {
    for log2 in 2..=4u32 {
        let mut t = open(cfg(log2));
        let size = 1u32 << log2;
        let mut rng = Lcg(0x5eed ^ log2 as u64);
        let mut reference: HashMap<ConnKey, (u32, Option<Nat>, u32)> = HashMap::new();
        let mut calls = 0u64;
        let mut slots = 0u64;
        let mut errors = 0u64;
        let mut tails_seen = HashSet::new();
        let pool = 64;
        let ops_target = 20_000;
        let mut ops = 0;

        let check =
            |r: Result<u32, TableError>, op: &TableOp, reference: &mut HashMap<ConnKey, (u32, Option<Nat>, u32)>| {
                match *op {
                    TableOp::Insert(k, e) => match reference.get(&k) {
                        Some(_) => assert!(matches!(r, Err(TableError::Exists)), "insert of present {k}: {r:?}"),
                        None => {
                            assert_eq!(r.expect("insert"), 1);
                            reference.insert(k, (1, e.nat, e.state.mark.get()));
                        }
                    },
                    TableOp::Update(k, e) | TableOp::Upsert(k, e) => match reference.get_mut(&k) {
                        Some(v) => {
                            v.0 += 1;
                            assert_eq!(r.expect("update"), v.0);
                            if e.nat.is_some() {
                                v.1 = e.nat;
                            }
                            v.2 = e.state.mark.get();
                        }
                        None if matches!(op, TableOp::Update(..)) => {
                            assert!(matches!(r, Err(TableError::NotFound)), "update of absent {k}: {r:?}")
                        }
                        None => {
                            assert_eq!(r.expect("upsert"), 1);
                            reference.insert(k, (1, e.nat, e.state.mark.get()));
                        }
                    },
                    TableOp::Delete(k) => match reference.remove(&k) {
                        // The generation of the delete: one above the entry.
                        Some((g, ..)) => assert_eq!(r.expect("delete"), g + 1),
                        None => assert!(matches!(r, Err(TableError::NotFound)), "delete of absent {k}: {r:?}"),
                    },
                    TableOp::Replica(..) | TableOp::ReplicaDelete(..) => unreachable!("this test posts no replicas"),
                }
            };

        let make_op = |rng: &mut Lcg| -> TableOp {
            let i = rng.below(pool);
            let k = key(i);
            let nat = (rng.below(3) == 0).then(|| nat_for(&k, rng.next()));
            let e = ConnEntry { state: state(rng.next(), 0), nat };
            match rng.below(4) {
                0 => TableOp::Insert(k, e),
                1 => TableOp::Update(k, e),
                2 => TableOp::Upsert(k, e),
                _ => TableOp::Delete(k),
            }
        };
        let op_slots = |op: &TableOp| match op {
            TableOp::Insert(_, e) | TableOp::Update(_, e) | TableOp::Upsert(_, e) => 1 + e.nat.is_some() as u64,
            TableOp::Delete(_) => 1,
            TableOp::Replica(..) | TableOp::ReplicaDelete(..) => 2,
        };

        while ops < ops_target {
            tails_seen.insert(tail_of(&t));
            match rng.below(10) {
                0..=5 => {
                    let op = make_op(&mut rng);
                    let r = t.apply(&op);
                    errors += r.is_err() as u64;
                    check(r, &op, &mut reference);
                    slots += op_slots(&op);
                    ops += 1;
                }
                6 | 7 => {
                    let k = key(rng.below(pool));
                    let rec = t.lookup(&k).expect("lookup");
                    match reference.get(&k) {
                        Some(&(g, nat, mark)) => {
                            let rec = rec.expect("present key");
                            assert_eq!(rec.key, k);
                            assert_eq!(rec.state.generation.get(), g);
                            assert_eq!(rec.state.mark.get(), mark);
                            assert_eq!(rec.nat, nat.unwrap_or_default());
                        }
                        None => {
                            assert!(rec.is_none());
                            errors += 1;
                        }
                    }
                    slots += 1;
                    ops += 1;
                }
                _ => {
                    // A batch that fits in the free slots: one doorbell.
                    let mut batch = Vec::new();
                    let mut used = 0;
                    let want = 1 + rng.below(size - 1);
                    while batch.len() < want as usize {
                        let op = make_op(&mut rng);
                        if used + op_slots(&op) > (size - 1) as u64 {
                            break;
                        }
                        used += op_slots(&op);
                        batch.push(op);
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    let results = t.batch(&batch).expect("batch");
                    assert_eq!(results.len(), batch.len());
                    for (r, op) in results.into_iter().zip(&batch) {
                        errors += r.is_err() as u64;
                        check(r, op, &mut reference);
                    }
                    slots += used;
                    ops += batch.len();
                }
            }
            calls += 1;
        }

        let st = t.driver().stats();
        assert_eq!(st.bad_completions, 0, "ring of {size}");
        assert_eq!(st.completions, st.commands_posted, "ring of {size}");
        assert_eq!(st.doorbells, calls, "one doorbell per call, ring of {size}");
        assert_eq!(t.driver().slots_in_flight(), 0);
        assert_eq!(t.driver().free_slots(), size - 1);
        assert_eq!(counter(&mut t, Counter::Doorbells), st.doorbells);
        assert_eq!(counter(&mut t, Counter::BadDoorbells), 0);
        assert_eq!(counter(&mut t, Counter::CompletionsWritten), st.completions);
        assert_eq!(counter(&mut t, Counter::CommandsFetched), slots);
        assert_eq!(counter(&mut t, Counter::CommandErrors), errors);
        assert_eq!(counter(&mut t, Counter::CommandsMalformed), 0);
        // Many laps of the command ring, hence many of the completion ring
        // (twice as large) and many phase flips.
        assert!(slots / size as u64 > 1000, "only {} laps", slots / size as u64);
        assert_eq!(tails_seen.len(), size as usize, "every slot was a starting slot");
        assert_eq!(t.len(), reference.len());
        assert!(!t.driver().status().contains(Status::FATAL));
    }
}

/// A batch much larger than the ring: posted in ring-fulls, one doorbell
/// each, results in order.
#[test]
fn batch_larger_than_the_ring() {
    let mut t = open(cfg(2));
    let ops: Vec<TableOp> = (0..200)
        .map(|i| {
            let k = key(i % 50);
            let nat = (i % 3 == 0).then(|| nat_for(&k, i));
            let e = ConnEntry { state: state(i, 0), nat };
            if i < 100 {
                TableOp::Insert(k, e) // 50..100: EXISTS
            } else if i < 150 {
                TableOp::Upsert(k, e)
            } else {
                TableOp::Delete(k)
            }
        })
        .collect();
    let res = t.batch(&ops).expect("batch");
    for (i, r) in res.iter().enumerate() {
        match i {
            0..50 => assert_eq!(r.as_ref().ok(), Some(&1), "op {i}"),
            50..100 => assert!(matches!(r, Err(TableError::Exists)), "op {i}: {r:?}"),
            100..150 => assert_eq!(r.as_ref().ok(), Some(&2), "op {i}"),
            // The deletes say their generation: one above the entry's 2.
            _ => assert_eq!(r.as_ref().ok(), Some(&3), "op {i}"),
        }
    }
    let st = t.driver().stats();
    assert_eq!(st.commands_posted, 200);
    assert_eq!(st.completions, 200);
    assert_eq!(st.bad_completions, 0);
    // At most 3 slots per doorbell: at least ceil(slots / 3) doorbells.
    let slots: u64 = (0..200u32).map(|i| if i < 150 && i % 3 == 0 { 2 } else { 1 }).sum();
    assert!(st.doorbells >= slots.div_ceil(3), "{} doorbells for {slots} slots", st.doorbells);
    assert!(st.doorbells <= 200);
    assert!(t.is_empty());
}

/// A command with a NAT translation takes two slots; started at every slot
/// of the ring, including the last, where its EXT descriptor wraps to slot
/// 0, it completes once and stores the translation.
#[test]
fn chained_nat_commands_cross_the_ring_end() {
    for log2 in 2..=4u32 {
        let mut t = open(cfg(log2));
        let size = 1u32 << log2;
        let mut crossings = 0;
        let mut fetched = 0u64;
        for i in 0..(8 * size) {
            let start = tail_of(&t);
            let k = key(i);
            let nat = nat_for(&k, i);
            let g = t.insert(&k, &ConnEntry { state: state(i, 0), nat: Some(nat) }).expect("chained insert");
            assert_eq!(g, 1);
            assert_eq!(tail_of(&t), (start + 2) % size, "a chained command takes two slots");
            if start == size - 1 {
                crossings += 1;
            }
            fetched += 2;
            // A single-slot command shifts the start by one, so that every
            // start position (and the ring end) is visited.
            if i % 2 == 0 {
                let rec = t.lookup(&k).expect("lookup").expect("present");
                assert_eq!(rec.nat, nat);
                assert_eq!(rec.state.mark.get(), i);
                fetched += 1;
            }
            // UPDATE with a new translation, chained too.
            let nat2 = nat_for(&k, i + 1);
            let g = t.update(&k, &ConnEntry { state: state(i + 1, 0), nat: Some(nat2) }).expect("chained update");
            assert_eq!(g, 2);
            fetched += 2;
            let rec = t.lookup(&k).expect("lookup").expect("present");
            assert_eq!(rec.nat, nat2);
            fetched += 1;
        }
        assert!(crossings >= 2, "ring of {size}: only {crossings} chains crossed the end");

        // Batches of chained commands only: with 3 free slots in a ring of
        // 4, each doorbell carries one pair and the next pair starts where
        // the previous ended.
        let ops: Vec<TableOp> = (1000..1040)
            .map(|i| {
                let k = key(i);
                TableOp::Upsert(k, ConnEntry { state: state(i, 0), nat: Some(nat_for(&k, i)) })
            })
            .collect();
        let res = t.batch(&ops).expect("batch of chains");
        assert!(res.iter().all(|r| matches!(r, Ok(1))), "{res:?}");
        fetched += 80;
        for i in 1000..1040 {
            let k = key(i);
            let rec = t.lookup(&k).expect("lookup").expect("present");
            assert_eq!(rec.nat, nat_for(&k, i));
            fetched += 1;
        }

        let st = t.driver().stats();
        assert_eq!(st.bad_completions, 0);
        assert_eq!(st.completions, st.commands_posted);
        assert_eq!(counter(&mut t, Counter::CommandsFetched), fetched);
        assert_eq!(counter(&mut t, Counter::CommandsMalformed), 0);
        assert_eq!(counter(&mut t, Counter::CommandErrors), 0);
    }
}

/// Raw posts: a chain posted from the last slot with `Driver::post`, tags
/// equal to slot indices lap after lap.
#[test]
fn raw_posts_tags_follow_slots_over_many_laps() {
    let mut t = open(cfg(2));
    let drv = t.driver();
    let size = drv.ring_size();
    let mut expected_tag = 0u32;
    for lap in 0..2000u32 {
        // Fill every free slot with NOPs, ring once, collect.
        let mut tags = Vec::new();
        while drv.free_slots() > 0 {
            let tag = drv.post(&CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0), None).expect("post");
            assert_eq!(tag as u32, expected_tag, "lap {lap}");
            expected_tag = (expected_tag + 1) % size;
            tags.push(tag);
        }
        assert_eq!(tags.len(), size as usize - 1);
        drv.ring();
        assert_eq!(drv.reap(), tags.len());
        for tag in tags {
            let c = drv.take_done(tag).expect("completion reaped");
            assert_eq!((c.tag, c.status, c.opcode), (tag, CplStatus::Success, Opcode::Nop as u8));
            assert!(drv.take_done(tag).is_none(), "taken twice");
        }
    }
    let st = drv.stats();
    assert_eq!(st.doorbells, 2000);
    assert_eq!(st.completions, 2000 * 3);
    assert_eq!(st.bad_completions, 0);
}

/// Posting more than `free_slots` without ringing fails with RingFull and
/// leaves the ring intact; the device fetches nothing before the doorbell.
#[test]
fn ring_full_when_posting_past_free_slots() {
    let mut t = open(cfg(3));
    let k = key4(1);
    let nat = nat_for(&k, 1);
    let drv = t.driver();
    assert_eq!(drv.free_slots(), 7);
    let nop = CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0);
    let mut tags = Vec::new();
    for _ in 0..6 {
        tags.push(drv.post(&nop, None).expect("post"));
    }
    assert_eq!(drv.free_slots(), 1);
    // A two-slot command does not fit in the last slot.
    let (ins, ext) = nicsync_fwif::cmd::ConnOp {
        key: k,
        state: state(1, 0),
        nat: Some(nat),
        auto_generation: true,
        replica_owner: None,
    }
    .encode(Opcode::Insert, 0);
    match drv.post(&ins, ext.as_ref()) {
        Err(DriverError::RingFull { in_flight }) => assert_eq!(in_flight, 6),
        other => panic!("expected RingFull, got {other:?}"),
    }
    tags.push(drv.post(&nop, None).expect("last slot"));
    assert_eq!(drv.free_slots(), 0);
    match drv.post(&nop, None) {
        Err(DriverError::RingFull { in_flight }) => assert_eq!(in_flight, 7),
        other => panic!("expected RingFull, got {other:?}"),
    }
    let e = drv.post(&nop, None).expect_err("still full");
    assert!(e.to_string().contains("ring full"), "{e}");
    assert_eq!(drv.device_counter(Counter::CommandsFetched), 0, "nothing fetched before the doorbell");
    assert_eq!(drv.stats().commands_posted, 7);
    drv.ring();
    assert_eq!(drv.stats().doorbells, 1);
    assert_eq!(drv.reap(), 7);
    for tag in tags {
        assert_eq!(drv.take_done(tag).map(|c| c.status), Some(CplStatus::Success));
    }
    assert_eq!(drv.free_slots(), 7);
    assert_eq!(drv.device_counter(Counter::CommandsFetched), 7);
    // The refused chain can now be posted.
    let c = drv.execute(&ins, ext.as_ref()).expect("chain after drain");
    assert_eq!((c.status, c.result), (CplStatus::Success, 1));
    assert_eq!(t.lookup(&k).expect("lookup").expect("present").nat, nat);
}

/// A table of capacity 1000 takes exactly 1000 entries; the next insert is
/// TABLE_FULL (counted), updates of present keys still work, and a delete
/// makes room for exactly one more.
#[test]
fn full_table() {
    let mut t =
        open(DriverConfig { cmd_ring_log2: 4, table_capacity: 1000, aging_period_ms: 0, ..DriverConfig::default() });
    assert_eq!(t.driver().info().capacity, 1000);
    let mut accepted = 0u32;
    let mut i = 0u32;
    loop {
        match t.insert(&key(i), &ConnEntry::new(state(i, 0))) {
            Ok(g) => {
                assert_eq!(g, 1);
                accepted += 1;
            }
            Err(TableError::TableFull) => break,
            Err(e) => panic!("insert {i}: {e}"),
        }
        i += 1;
        assert!(i <= 2000, "the table never filled");
    }
    assert_eq!(accepted, 1000, "exactly the capacity is accepted");
    assert_eq!(t.len(), 1000);
    assert_eq!(counter(&mut t, Counter::TableFull), 1);

    // A new key through UPSERT is refused too; present keys still update;
    // INSERT of a present key is EXISTS, not TABLE_FULL.
    assert!(matches!(t.upsert(&key(5000), &ConnEntry::new(state(0, 0))), Err(TableError::TableFull)));
    assert_eq!(counter(&mut t, Counter::TableFull), 2);
    assert_eq!(t.update(&key(7), &ConnEntry::new(state(77, 0))).expect("update when full"), 2);
    assert_eq!(t.upsert(&key(8), &ConnEntry::new(state(88, 0))).expect("upsert of present when full"), 2);
    assert!(matches!(t.insert(&key(9), &ConnEntry::new(state(0, 0))), Err(TableError::Exists)));
    assert_eq!(counter(&mut t, Counter::TableFull), 2);
    assert_eq!(t.len(), 1000);

    t.delete(&key(3)).expect("delete");
    assert_eq!(t.len(), 999);
    assert_eq!(t.insert(&key(5000), &ConnEntry::new(state(5, 0))).expect("insert after delete"), 1);
    assert!(matches!(t.insert(&key(5001), &ConnEntry::new(state(0, 0))), Err(TableError::TableFull)));
    assert_eq!(counter(&mut t, Counter::TableFull), 3);
    assert!(t.lookup(&key(3)).expect("lookup").is_none());
    assert!(t.lookup(&key(5000)).expect("lookup").is_some());
    assert!(t.lookup(&key(5001)).expect("lookup").is_none());

    // Every resident entry is there exactly once.
    let mut seen = HashSet::new();
    for rec in t.snapshot() {
        let rec = rec.expect("snapshot");
        assert!(seen.insert(rec.key), "{} twice", rec.key);
    }
    let want: HashSet<ConnKey> = (0..1000).filter(|&i| i != 3).chain([5000]).map(key).collect();
    assert_eq!(seen, want);

    // FLUSH empties it; it fills again to exactly the capacity.
    assert_eq!(t.flush().expect("flush"), 1000);
    assert!(t.is_empty());
    let ops: Vec<TableOp> = (10_000..11_001).map(|i| TableOp::Insert(key(i), ConnEntry::new(state(i, 0)))).collect();
    let res = t.batch(&ops).expect("batch");
    assert!(res[..1000].iter().all(|r| matches!(r, Ok(1))));
    assert!(matches!(res[1000], Err(TableError::TableFull)));
    assert_eq!(t.len(), 1000);
    assert_eq!(counter(&mut t, Counter::TableFull), 4);
}

fn drain_events(t: &mut ConnTable<EmulatedDevice>) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        let n = t.driver().poll_events(|e| out.push(e));
        if n == 0 {
            return out;
        }
    }
}

fn aged_keys(events: &[Event]) -> HashSet<ConnKey> {
    let mut keys = HashSet::new();
    for e in events {
        assert_eq!(e.kind, EventKind::Aged, "{e:?}");
        assert!(keys.insert(e.key), "aged twice: {}", e.key);
    }
    keys
}

/// Entries age out between `timeout` and `timeout + period`; each produces
/// one AGED event with the state as last written; entries without a
/// timeout never age; UPDATE restarts the timer.
#[test]
fn aging_removes_exactly_the_expired_entries() {
    let mut t = open(DriverConfig {
        cmd_ring_log2: 4,
        evt_ring_log2: 6,
        table_capacity: 4096,
        aging_period_ms: 100,
        ..DriverConfig::default()
    });
    let nic = t.driver_ref().device().nic().clone();
    let a: Vec<ConnKey> = (0..10).map(key).collect(); // timeout 1 s
    let b: Vec<ConnKey> = (10..20).map(key).collect(); // timeout 2 s
    let c: Vec<ConnKey> = (20..30).map(key).collect(); // never
    let d: Vec<ConnKey> = (30..35).map(key).collect(); // 1 s, restarted at 0.6 s
    for (set, timeout) in [(&a, 1), (&b, 2), (&c, 0), (&d, 1)] {
        for (i, k) in set.iter().enumerate() {
            t.insert(k, &ConnEntry::new(state(i as u32, timeout))).expect("insert");
        }
    }
    assert_eq!(t.len(), 35);

    nic.advance_time(Duration::from_millis(600));
    for (i, k) in d.iter().enumerate() {
        assert_eq!(t.update(k, &ConnEntry::new(state(100 + i as u32, 1))).expect("update"), 2);
    }
    nic.advance_time(Duration::from_millis(399)); // t = 999 ms: nothing has expired
    assert!(drain_events(&mut t).is_empty());
    assert_eq!(t.len(), 35);
    let rec = t.lookup(&b[0]).expect("lookup").expect("present");
    assert_eq!(rec.state.timeout_s.get(), 2, "1.001 s left, rounded up");

    // t = 1000..1100 ms: one full sweep after A's expiry.
    nic.advance_time(Duration::from_millis(1));
    nic.advance_time(Duration::from_millis(100));
    let ev = drain_events(&mut t);
    assert_eq!(aged_keys(&ev), a.iter().copied().collect());
    for e in &ev {
        let i = a.iter().position(|k| *k == e.key).expect("an A key") as u32;
        let mut want = state(i, 1);
        want.generation = 1.into();
        assert_eq!(e.state, want, "the state as last written");
    }
    assert_eq!(t.len(), 25);
    for k in &a {
        assert!(t.lookup(k).expect("lookup").is_none());
    }
    assert_eq!(t.lookup(&b[0]).expect("lookup").expect("present").state.timeout_s.get(), 1);

    // t = 1700: D (restarted at 600) is gone, B is not.
    nic.advance_time(Duration::from_millis(600));
    let ev = drain_events(&mut t);
    assert_eq!(aged_keys(&ev), d.iter().copied().collect());
    for e in &ev {
        let i = d.iter().position(|k| *k == e.key).expect("a D key") as u32;
        assert_eq!(e.state.mark.get(), 100 + i);
        assert_eq!(e.state.generation.get(), 2);
    }
    assert_eq!(t.len(), 20);

    // t = 2100: B is gone.
    nic.advance_time(Duration::from_millis(400));
    assert_eq!(aged_keys(&drain_events(&mut t)), b.iter().copied().collect());

    // An hour later only C remains.
    nic.advance_time(Duration::from_secs(3600));
    assert!(drain_events(&mut t).is_empty());
    assert_eq!(t.len(), 10);
    let left: HashSet<ConnKey> = t.snapshot().map(|r| r.expect("snapshot").key).collect();
    assert_eq!(left, c.iter().copied().collect());

    assert_eq!(counter(&mut t, Counter::EntriesAged), 25);
    assert_eq!(counter(&mut t, Counter::EventsWritten), 25);
    assert_eq!(counter(&mut t, Counter::EventsDropped), 0);
    let st = t.driver().stats();
    assert_eq!((st.events, st.bad_events, st.events_lost), (25, 0, 0));
    assert!(!t.driver().status().contains(Status::EVENT_OVERFLOW));
}

/// A 4-entry event ring (3 usable) and 15 entries aging: 3 events are
/// written, 12 dropped and counted, STATUS.EVENT_OVERFLOW is set, and once
/// the host makes room one OVERFLOW event reports the 12 lost with the
/// sequence number jumping by 12. Later events flow normally.
#[test]
fn event_ring_overflow() {
    let mut t = open(DriverConfig {
        cmd_ring_log2: 3,
        evt_ring_log2: 2,
        table_capacity: 1024,
        aging_period_ms: 100,
        ..DriverConfig::default()
    });
    let nic = t.driver_ref().device().nic().clone();
    for i in 0..10 {
        t.insert(&key(i), &ConnEntry::new(state(i, 1))).expect("insert");
    }
    for i in 10..15 {
        t.insert(&key(i), &ConnEntry::new(state(i, 2))).expect("insert");
    }
    nic.advance_time(Duration::from_millis(1100));
    assert_eq!(counter(&mut t, Counter::EventsWritten), 3);
    assert_eq!(counter(&mut t, Counter::EventsDropped), 7);
    assert!(t.driver().status().contains(Status::EVENT_OVERFLOW));
    // More aging while the ring is still full: dropped too.
    nic.advance_time(Duration::from_millis(1000));
    assert_eq!(counter(&mut t, Counter::EntriesAged), 15);
    assert_eq!(counter(&mut t, Counter::EventsDropped), 12);
    assert_eq!(t.len(), 0);

    let mut first = Vec::new();
    assert_eq!(t.driver().poll_events(|e| first.push(e)), 3);
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(first.iter().all(|e| e.kind == EventKind::Aged));
    // Consuming made room: the OVERFLOW event is there now.
    let mut second = Vec::new();
    assert_eq!(t.driver().poll_events(|e| second.push(e)), 1);
    let ov = second[0];
    assert_eq!(ov.kind, EventKind::Overflow);
    assert_eq!(ov.state.generation.get(), 12, "events lost");
    assert_eq!(ov.seq, 3 + 12, "seq is the last sequence number used");
    assert_eq!(ov.key, ConnKey::default());
    let st = t.driver().stats();
    assert_eq!((st.events, st.events_lost, st.bad_events), (4, 12, 0));
    assert!(t.driver().status().contains(Status::EVENT_OVERFLOW), "sticky until reset");

    // Events flow again, numbered on.
    for i in 100..102 {
        t.insert(&key(i), &ConnEntry::new(state(i, 1))).expect("insert");
    }
    nic.advance_time(Duration::from_millis(1100));
    let ev = drain_events(&mut t);
    assert_eq!(
        ev.iter().map(|e| (e.kind, e.seq)).collect::<Vec<_>>(),
        vec![(EventKind::Aged, 16), (EventKind::Aged, 17)]
    );
    assert_eq!(aged_keys(&ev), [key(100), key(101)].into_iter().collect());
    assert_eq!(counter(&mut t, Counter::EventsDropped), 12);
    assert_eq!(counter(&mut t, Counter::EventsWritten), 6);

    // And the device still works.
    t.insert(&key(7), &ConnEntry::new(state(7, 0))).expect("insert after overflow");
    assert!(t.lookup(&key(7)).expect("lookup").is_some());
}

/// More entries than one 1 MiB snapshot chunk holds (13107 records): the
/// walk takes several SNAPSHOT commands and returns every entry once.
#[test]
fn snapshot_larger_than_one_chunk() {
    let per_chunk = nicsync::table::SNAPSHOT_CHUNK_BYTES / nicsync_fwif::conn::ConnRecord::SIZE;
    assert_eq!(per_chunk, 13107);
    let n = 30_000u32;
    let mut t = open(DriverConfig { table_capacity: 1 << 15, aging_period_ms: 0, ..DriverConfig::default() });
    let mut want = HashMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let ops: Vec<TableOp> = chunk
            .iter()
            .map(|&i| {
                let k = key(i);
                let nat = (i % 5 == 0).then(|| nat_for(&k, i));
                want.insert(k, (i, nat.unwrap_or_default()));
                TableOp::Insert(k, ConnEntry { state: state(i, 0), nat })
            })
            .collect();
        assert!(t.batch(&ops).expect("batch").iter().all(|r| matches!(r, Ok(1))));
    }
    assert_eq!(t.len(), n as usize);
    let posted = t.driver().stats().commands_posted;
    let mut seen = HashSet::new();
    for rec in t.snapshot() {
        let rec = rec.expect("snapshot record");
        assert!(seen.insert(rec.key), "{} returned twice", rec.key);
        let (mark, nat) = want.get(&rec.key).copied().expect("a key that was inserted");
        assert_eq!(rec.state.mark.get(), mark);
        assert_eq!(rec.state.generation.get(), 1);
        assert_eq!(rec.nat, nat);
    }
    assert_eq!(seen.len(), n as usize);
    let chunks = t.driver().stats().commands_posted - posted;
    assert!(chunks >= (n as u64).div_ceil(per_chunk as u64), "{chunks} SNAPSHOT commands");
    // A second walk gives the same.
    assert_eq!(t.snapshot().count(), n as usize);
}

/// Keys that all hash to the same two buckets of a table of `capacity`
/// entries under `hash` (found with the model's own placement function),
/// so that the cuckoo search has no way out and the stash fills: what a
/// sender who knew the card's seed could aim at it.
fn colliding_keys(hash: TableHash, capacity: usize, n: usize) -> Vec<ConnKey> {
    let t = nicsync_model::table::CuckooTable::new(capacity, hash);
    let pair = |k: &ConnKey| {
        let nicsync_model::table::Placement { b1, b2, .. } = t.placement_of(k);
        (b1.min(b2), b1.max(b2))
    };
    let target = pair(&key4(0));
    let mut out = vec![key4(0)];
    let mut i = 1;
    while out.len() < n {
        let k = key4(i);
        if pair(&k) == target {
            out.push(k);
        }
        i += 1;
        assert!(i < 10_000_000, "no colliding keys found");
    }
    out
}

const BUCKET_SLOTS: usize = 2 * nicsync_model::table::WAYS;
const STASH: usize = nicsync_model::table::STASH_SIZE;

fn stash_len(t: &ConnTable<EmulatedDevice>) -> usize {
    t.driver_ref().device().nic().core().table().stash_len()
}

/// A table of `capacity` entries on a 16-slot ring, without aging.
fn small_table(capacity: usize) -> ConnTable<EmulatedDevice> {
    open(DriverConfig {
        cmd_ring_log2: 4,
        table_capacity: capacity as u32,
        aging_period_ms: 0,
        ..DriverConfig::default()
    })
}

/// The hash the card places keys by.
fn card_hash(t: &ConnTable<EmulatedDevice>) -> TableHash {
    *t.driver_ref().device().nic().core().table().hash()
}

/// The card places keys by the ABI's hash under the seed the host wrote
/// (a random one when the configuration names none), and a SNAPSHOT
/// returns them in that hash's order (`TableHash::order`), which is what
/// lets a member seeded alike store a Full Sync front to back.
#[test]
fn the_card_hashes_with_the_hosts_seed_and_walks_in_its_order() {
    let seed = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
    let mut t = open(DriverConfig {
        table_hash_seed: Some(TableHashSeed(seed)),
        aging_period_ms: 0,
        ..DriverConfig::default()
    });
    assert_eq!(card_hash(&t), TableHash::new(seed));
    assert_eq!(t.driver_ref().table_hash(), TableHash::new(seed));
    // Few keys in a large table: every one in its first bucket.
    for i in 0..2000 {
        t.insert(&key4(i), &ConnEntry::new(state(i, 0))).expect("insert");
    }
    let buckets = t.driver_ref().device().nic().core().table().buckets();
    let hash = TableHash::new(seed);
    let order: Vec<usize> =
        t.snapshot().map(|r| TableHash::order(hash.hash(&r.expect("snapshot").key), buckets)).collect();
    assert_eq!(order.len(), 2000);
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "a SNAPSHOT out of the hash's order");
    // No seed configured: a random one, different for each driver.
    let a = open(DriverConfig::default());
    let b = open(DriverConfig::default());
    assert_ne!(card_hash(&a), card_hash(&b));
    assert_ne!(card_hash(&a), TableHash::default(), "the reset seed is not kept");
    assert_eq!(a.driver_ref().table_hash(), card_hash(&a));
}

/// A device of an older minor (no `TABLE_HASH_SEED`) ignores the seed and
/// still works; the host's own structures stay seeded.
#[test]
fn a_card_without_the_seed_capability_ignores_it() {
    use nicsync_fwif::regs::Capabilities;
    let model = nicsync_model::ModelConfig {
        capabilities: Capabilities::all() - Capabilities::TABLE_HASH_SEED,
        ..Default::default()
    };
    let dev = EmulatedDevice::new(model, nicsync_model::ExecMode::Inline).expect("emulated device");
    let mut t =
        ConnTable::open(dev, DriverConfig { table_hash_seed: Some(TableHashSeed([9, 9])), ..DriverConfig::default() })
            .expect("probe");
    assert_eq!(card_hash(&t), TableHash::default());
    assert_eq!(t.driver_ref().table_hash(), TableHash::new([9, 9]));
    t.insert(&key4(1), &ConnEntry::new(state(1, 0))).expect("insert");
    assert!(t.lookup(&key4(1)).expect("lookup").is_some());
}

/// Keys aimed at one pair of buckets under one seed (what a sender who
/// knew the hash could send) spread under the card's own seed: the stash
/// stays nearly empty and nothing is refused. The same keys under the
/// seed they were made for fill the stash (`stash_holds_colliding_keys`).
#[test]
fn keys_aimed_at_one_bucket_spread_under_an_unknown_seed() {
    let capacity = 100;
    let mut t = small_table(capacity);
    let aimed = colliding_keys(TableHash::new([1, 2]), capacity, BUCKET_SLOTS + STASH + 2);
    assert_ne!(card_hash(&t), TableHash::new([1, 2]));
    for (i, k) in aimed.iter().enumerate() {
        t.insert(k, &ConnEntry::new(state(i as u32, 0))).expect("no TABLE_FULL");
    }
    assert!(stash_len(&t) < 4, "{} stashed", stash_len(&t));
    assert_eq!(counter(&mut t, Counter::TableFull), 0);
}

/// Keys sharing both candidate buckets: 16 go to the buckets, 16 to the
/// stash, the next is TABLE_FULL although the table is nearly empty (as
/// documented). Stashed entries are found, updated, walked by SNAPSHOT,
/// deleted, and move back into a bucket when a slot there frees.
#[test]
fn stash_holds_colliding_keys() {
    let capacity = 100;
    let mut t = small_table(capacity);
    let keys = colliding_keys(card_hash(&t), capacity, BUCKET_SLOTS + STASH + 2);
    let (fit, extra) = keys.split_at(BUCKET_SLOTS + STASH);
    for (i, k) in fit.iter().enumerate() {
        assert_eq!(t.insert(k, &ConnEntry::new(state(i as u32, 0))).expect("insert"), 1, "key {i}");
    }
    assert_eq!(stash_len(&t), STASH);
    assert!(matches!(t.insert(&extra[0], &ConnEntry::new(state(0, 0))), Err(TableError::TableFull)));
    assert!(matches!(t.upsert(&extra[0], &ConnEntry::new(state(0, 0))), Err(TableError::TableFull)));
    assert_eq!(counter(&mut t, Counter::TableFull), 2);
    // Other buckets are unaffected: a key whose candidate buckets are
    // neither of the full two (the table's hash seed is random, so any
    // fixed key could share one).
    let layout = nicsync_model::table::CuckooTable::new(capacity, card_hash(&t));
    let buckets = |k: &ConnKey| {
        let p = layout.placement_of(k);
        [p.b1, p.b2]
    };
    let full = buckets(&keys[0]);
    let other = (0..).map(key6).find(|k| buckets(k).iter().all(|b| !full.contains(b))).expect("a key");
    t.insert(&other, &ConnEntry::new(state(999, 0))).expect("insert elsewhere");
    assert_eq!(t.len(), BUCKET_SLOTS + STASH + 1);

    for (i, k) in fit.iter().enumerate() {
        let rec = t.lookup(k).expect("lookup").expect("present");
        assert_eq!(rec.state.mark.get(), i as u32);
    }
    // Update every entry (stashed ones included) with a NAT translation.
    for (i, k) in fit.iter().enumerate() {
        let e = ConnEntry { state: state(1000 + i as u32, 0), nat: Some(nat_for(k, i as u32)) };
        assert_eq!(t.update(k, &e).expect("update"), 2);
    }
    let walked: HashMap<ConnKey, (u32, Nat)> = t
        .snapshot()
        .map(|r| {
            let r = r.expect("snapshot");
            (r.key, (r.state.mark.get(), r.nat))
        })
        .collect();
    assert_eq!(walked.len(), BUCKET_SLOTS + STASH + 1);
    for (i, k) in fit.iter().enumerate() {
        assert_eq!(walked.get(k), Some(&(1000 + i as u32, nat_for(k, i as u32))), "key {i}");
    }

    // Deleting a bucket-resident key lets a stashed one move into the
    // bucket; then the extra key fits in the stash.
    t.delete(&fit[0]).expect("delete");
    assert_eq!(stash_len(&t), STASH - 1);
    assert_eq!(t.insert(&extra[0], &ConnEntry::new(state(7, 0))).expect("room again"), 1);
    assert_eq!(stash_len(&t), STASH);
    assert!(matches!(t.insert(&extra[1], &ConnEntry::new(state(0, 0))), Err(TableError::TableFull)));
    for k in fit[1..].iter().chain(&extra[..1]) {
        assert!(t.lookup(k).expect("lookup").is_some(), "{k} lost");
    }
    // Delete everything: every key is found wherever it lives.
    for k in fit[1..].iter().chain(&extra[..1]) {
        t.delete(k).expect("delete");
    }
    assert_eq!(stash_len(&t), 0);
    assert_eq!(t.len(), 1);
    assert_eq!(t.snapshot().count(), 1);
    assert_eq!(t.driver().stats().bad_completions, 0);
}

/// Aging of colliding keys that fill both buckets and the stash, all with
/// the same timeout: one full sweep after they expire removes every one
/// ("it lives between t and t + P/1000 seconds", docs/abi.md section 12).
#[test]
fn aging_sweeps_stashed_entries_in_one_pass() {
    let capacity = 100;
    let mut t = open(DriverConfig {
        cmd_ring_log2: 4,
        evt_ring_log2: 6,
        table_capacity: capacity as u32,
        aging_period_ms: 100,
        ..DriverConfig::default()
    });
    let keys = colliding_keys(card_hash(&t), capacity, BUCKET_SLOTS + STASH);
    for (i, k) in keys.iter().enumerate() {
        t.insert(k, &ConnEntry::new(state(i as u32, 1))).expect("insert");
    }
    assert_eq!(stash_len(&t), STASH);
    let nic = t.driver_ref().device().nic().clone();
    nic.advance_time(Duration::from_millis(1100));
    let ev = drain_events(&mut t);
    assert_eq!(t.len(), 0, "{} expired entries survived a full sweep 100 ms after expiry", t.len());
    assert_eq!(aged_keys(&ev), keys.iter().copied().collect());
}

/// Whatever else is in the ring, a batch returns: when its first command
/// cannot be posted and none of its own commands is in flight, it must
/// reap (or fail with RingFull) rather than retry forever.
#[test]
fn batch_returns_when_the_ring_is_full_of_other_commands() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut t = open(cfg(2));
        let drv = t.driver();
        // Three NOPs posted by hand and not waited for fill the 4-slot ring.
        for _ in 0..3 {
            drv.post(&CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0), None).expect("post");
        }
        let r = t.batch(&[TableOp::Insert(key(1), ConnEntry::new(state(1, 0)))]).map(|v| v.len());
        let _ = tx.send(format!("{r:?}"));
    });
    // A watchdog, not a timing assertion: the batch never returns today.
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(r) => assert!(r == "Ok(1)" || r.contains("RingFull"), "{r}"),
        Err(_) => panic!("ConnTable::batch did not return within 20 s (spinning on RingFull)"),
    }
}

/// `GENERATION_FLOOR`: a change the device numbers itself gets at least the
/// floor (so a member that restarted numbers its changes above those of its
/// previous life); at 0 generations count from 1 per key. The driver never
/// lowers it and writes it again after a device reset.
#[test]
fn the_generation_floor_numbers_changes_above_it() {
    let mut t = open(cfg(6));
    let e = |mark| ConnEntry::new(state(mark, 60));
    assert_eq!(t.insert(&key(1), &e(1)).expect("insert"), 1);
    assert_eq!(t.update(&key(1), &e(2)).expect("update"), 2);
    t.driver().raise_generation_floor(1000);
    assert_eq!(t.update(&key(1), &e(3)).expect("update"), 1000);
    assert_eq!(t.update(&key(1), &e(4)).expect("update"), 1001, "one above the stored entry");
    assert_eq!(t.upsert(&key(2), &e(5)).expect("upsert"), 1000);
    t.driver().raise_generation_floor(10);
    assert_eq!(t.driver_ref().generation_floor(), 1000, "never lowered");
    assert_eq!(t.insert(&key(3), &e(6)).expect("insert"), 1000);
    // A DELETE says the generation of the delete: one above the entry,
    // raised to the floor.
    let r = t.batch(&[TableOp::Delete(key(1)), TableOp::Delete(key(2))]).expect("batch");
    assert_eq!(r.into_iter().map(|x| x.expect("delete")).collect::<Vec<_>>(), [1002, 1001]);
    t.driver().reinit().expect("reinit");
    assert_eq!(t.insert(&key(4), &e(7)).expect("insert after a reset"), 1000);
}
