#![allow(clippy::expect_used)] // test code: a failed set-up is a failed test
//! Random operation sequences run through the whole stack (`ConnTable` over
//! the driver over the inline emulated device, with a command ring of 8
//! slots so that it wraps constantly) against a `HashMap` reference model of
//! the documented semantics (docs/abi.md, section 10).
//!
//! Every operation's result must match the reference, and so must the whole
//! table (snapshot walk and `len()`) along the way and at the end.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use nicsync::{ConnEntry, ConnTable, DriverConfig, TableError, TableOp};
use nicsync_fwif::conn::{proto, ConnKey, ConnRecord, ConnState, Nat, FAMILY_IPV4, FAMILY_IPV6};
use nicsync_vfio::EmulatedDevice;
use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError};

/// Keys chosen so that near-identical ones coexist: same addresses with a
/// different zone, protocol, port or direction, an IPv4 key and its
/// IPv4-mapped IPv6 twin, all-zero and all-ones addresses.
fn key_pool() -> Vec<ConnKey> {
    let a = Ipv4Addr::new(10, 0, 0, 1);
    let b = Ipv4Addr::new(10, 0, 0, 2);
    let x = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let y = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
    vec![
        ConnKey::v4(a, 1000, b, 80, proto::TCP, 0),
        ConnKey::v4(a, 1000, b, 80, proto::TCP, 1),
        ConnKey::v4(a, 1000, b, 80, proto::UDP, 0),
        ConnKey::v4(b, 80, a, 1000, proto::TCP, 0),
        ConnKey::v4(a, 1001, b, 80, proto::TCP, 0),
        ConnKey::v4(Ipv4Addr::new(192, 0, 2, 1), 0, Ipv4Addr::new(198, 51, 100, 1), 7, proto::ICMP, 0),
        ConnKey::v4(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::UNSPECIFIED, 0, 0, 0),
        ConnKey::v4(Ipv4Addr::BROADCAST, 65535, Ipv4Addr::BROADCAST, 65535, 255, 65535),
        ConnKey::v6(x, 1000, y, 443, proto::TCP, 0),
        ConnKey::v6(x, 1000, y, 443, proto::TCP, 7),
        ConnKey::v6(y, 443, x, 1000, proto::TCP, 0),
        ConnKey::v6(x, 1000, y, 443, proto::SCTP, 0),
        ConnKey::v6(a.to_ipv6_mapped(), 1000, b.to_ipv6_mapped(), 80, proto::TCP, 0),
        ConnKey::v6(Ipv6Addr::UNSPECIFIED, 0, Ipv6Addr::UNSPECIFIED, 0, 0, 0),
        ConnKey::v6(Ipv6Addr::LOCALHOST, 5353, Ipv6Addr::LOCALHOST, 5353, proto::UDP, 0),
        ConnKey::v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 0, y, 0, proto::ICMPV6, 3),
    ]
}

/// A NAT translation, made to fit the key's family when used.
#[derive(Clone, Copy, Debug)]
struct NatGen {
    kind: u8,
    v4: [u8; 4],
    v6: [u8; 16],
    port: u16,
}

impl NatGen {
    fn build(&self, key: &ConnKey) -> Nat {
        if self.kind == 0 {
            // Kind NONE: the other fields are ignored by the device; give it
            // junk to check that nothing of it is stored or reported.
            return Nat { addr: self.v6, port: self.port.into(), kind: 0, family: 0, reserved: [0; 4] };
        }
        let addr = if key.family == FAMILY_IPV4 {
            IpAddr::V4(Ipv4Addr::from(self.v4))
        } else {
            assert_eq!(key.family, FAMILY_IPV6);
            IpAddr::V6(Ipv6Addr::from(self.v6))
        };
        let kind =
            if self.kind == 1 { nicsync_fwif::conn::NatKind::Source } else { nicsync_fwif::conn::NatKind::Destination };
        Nat::new(kind, addr, self.port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    Insert,
    Update,
    Upsert,
    Delete,
}

#[derive(Clone, Copy, Debug)]
struct Write {
    kind: WriteKind,
    key: usize,
    state: ConnState,
    nat: Option<NatGen>,
}

#[derive(Clone, Debug)]
enum Op {
    /// One write; `explicit` turns automatic generations off for it.
    Single {
        w: Write,
        explicit: bool,
    },
    Lookup(usize),
    Batch {
        ws: Vec<Write>,
        explicit: bool,
    },
    Flush,
    /// Advance the virtual clock (aging is off, so only the remaining
    /// timeouts reported by LOOKUP/SNAPSHOT change).
    Advance(u32),
    /// Compare the whole table.
    Snapshot,
}

/// The result of a table operation, reduced to what the reference predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    Ok(u32),
    NotFound,
    Exists,
    TableFull,
    Stale(u32),
}

fn reduce(r: Result<u32, TableError>) -> Result<Res, TestCaseError> {
    match r {
        Ok(g) => Ok(Res::Ok(g)),
        Err(TableError::NotFound) => Ok(Res::NotFound),
        Err(TableError::Exists) => Ok(Res::Exists),
        Err(TableError::TableFull) => Ok(Res::TableFull),
        Err(TableError::Stale { stored }) => Ok(Res::Stale(stored)),
        Err(e) => Err(TestCaseError::fail(format!("unexpected table error: {e}"))),
    }
}

#[derive(Clone, Copy, Debug)]
struct Stored {
    state: ConnState,
    nat: Option<Nat>,
    set_ms: u64,
}

/// The reference model: a map plus the device time.
#[derive(Debug, Default)]
struct Reference {
    map: HashMap<ConnKey, Stored>,
    now_ms: u64,
}

fn normalize(n: Nat) -> Option<Nat> {
    (n.kind != 0).then_some(n)
}

impl Reference {
    fn apply(&mut self, kind: WriteKind, key: ConnKey, state: ConnState, nat: Option<Nat>, auto: bool) -> Res {
        let now = self.now_ms;
        let present = self.map.get_mut(&key);
        match (kind, present) {
            // The generation of the delete: one above the entry (no
            // generation floor here).
            (WriteKind::Delete, Some(s)) => {
                let g = s.state.generation.get().wrapping_add(1);
                self.map.remove(&key);
                Res::Ok(g)
            }
            (WriteKind::Delete, None) | (WriteKind::Update, None) => Res::NotFound,
            (WriteKind::Insert, Some(_)) => Res::Exists,
            (WriteKind::Insert | WriteKind::Upsert, None) => {
                let mut st = state;
                if auto {
                    st.generation = 1.into();
                }
                self.map.insert(key, Stored { state: st, nat: nat.and_then(normalize), set_ms: now });
                Res::Ok(st.generation.get())
            }
            (WriteKind::Update | WriteKind::Upsert, Some(s)) => {
                let g = s.state.generation.get();
                let mut st = state;
                if auto {
                    st.generation = g.wrapping_add(1).into();
                } else if st.generation.get() < g {
                    return Res::Stale(g);
                }
                s.state = st;
                if let Some(n) = nat {
                    s.nat = normalize(n);
                }
                s.set_ms = now;
                Res::Ok(st.generation.get())
            }
        }
    }

    fn record(&self, key: &ConnKey) -> Option<ConnRecord> {
        let s = self.map.get(key)?;
        let mut state = s.state;
        let t = state.timeout_s.get();
        if t != 0 {
            let expires = s.set_ms + t as u64 * 1000;
            let left = expires.saturating_sub(self.now_ms).div_ceil(1000).max(1);
            state.timeout_s = (left as u32).into();
        }
        Some(ConnRecord { key: *key, state, nat: s.nat.unwrap_or_default() })
    }

    fn records(&self) -> HashMap<ConnKey, ConnRecord> {
        self.map.keys().filter_map(|k| self.record(k).map(|r| (*k, r))).collect()
    }
}

fn state_strategy() -> impl Strategy<Value = ConnState> {
    (
        0u8..10,
        0u8..2,
        0u16..=0xFF,
        prop_oneof![3 => Just(0u32), 3 => 1u32..120, 1 => Just(u32::MAX)],
        any::<u32>(),
        prop_oneof![2 => 0u32..4, 1 => any::<u32>()],
    )
        .prop_map(|(tcp, dir, flags, timeout, mark, generation)| ConnState {
            tcp_state: tcp,
            direction: dir,
            flags: flags.into(),
            timeout_s: timeout.into(),
            mark: mark.into(),
            generation: generation.into(),
        })
}

fn nat_strategy() -> impl Strategy<Value = Option<NatGen>> {
    prop_oneof![
        2 => Just(None),
        2 => (0u8..3, any::<[u8; 4]>(), any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(kind, v4, v6, port)| Some(NatGen { kind, v4, v6, port })),
    ]
}

fn write_strategy(keys: usize) -> impl Strategy<Value = Write> {
    (
        prop_oneof![Just(WriteKind::Insert), Just(WriteKind::Update), Just(WriteKind::Upsert), Just(WriteKind::Delete)],
        0..keys,
        state_strategy(),
        nat_strategy(),
    )
        .prop_map(|(kind, key, state, nat)| Write { kind, key, state, nat })
}

fn op_strategy(keys: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (write_strategy(keys), prop::bool::weighted(0.2)).prop_map(|(w, explicit)| Op::Single { w, explicit }),
        5 => (0..keys).prop_map(Op::Lookup),
        2 => (prop::collection::vec(write_strategy(keys), 1..20), prop::bool::weighted(0.2))
            .prop_map(|(ws, explicit)| Op::Batch { ws, explicit }),
        1 => Just(Op::Flush),
        1 => prop_oneof![1u32..2000, Just(60_000u32)].prop_map(Op::Advance),
        1 => Just(Op::Snapshot),
    ]
}

fn table_op(w: &Write, key: ConnKey) -> TableOp {
    let e = ConnEntry { state: w.state, nat: w.nat.map(|n| n.build(&key)) };
    match w.kind {
        WriteKind::Insert => TableOp::Insert(key, e),
        WriteKind::Update => TableOp::Update(key, e),
        WriteKind::Upsert => TableOp::Upsert(key, e),
        WriteKind::Delete => TableOp::Delete(key),
    }
}

fn check_whole_table(table: &mut ConnTable<EmulatedDevice>, r: &Reference, step: usize) -> Result<(), TestCaseError> {
    let mut seen: HashMap<ConnKey, ConnRecord> = HashMap::new();
    for rec in table.snapshot() {
        let rec = rec.map_err(|e| TestCaseError::fail(format!("snapshot failed at step {step}: {e}")))?;
        prop_assert!(seen.insert(rec.key, rec).is_none(), "snapshot returned {} twice (step {step})", rec.key);
    }
    prop_assert_eq!(seen, r.records(), "snapshot differs from the reference at step {}", step);
    prop_assert_eq!(table.len(), r.map.len(), "len() differs at step {}", step);
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let keys = key_pool();
    let dev = EmulatedDevice::inline().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let cfg = DriverConfig {
        cmd_ring_log2: 3,
        evt_ring_log2: 0,
        table_capacity: 1024,
        aging_period_ms: 0,
        ..DriverConfig::default()
    };
    let mut table = ConnTable::open(dev, cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut r = Reference::default();

    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Single { w, explicit } => {
                let key = keys[w.key];
                table.set_auto_generation(!explicit);
                let got = reduce(table.apply(&table_op(w, key)))?;
                let want = r.apply(w.kind, key, w.state, w.nat.map(|n| n.build(&key)), !explicit);
                prop_assert_eq!(got, want, "step {}: {:?} on {}", step, w.kind, key);
            }
            Op::Lookup(i) => {
                let key = keys[*i];
                let got = table
                    .lookup(&key)
                    .map_err(|e| TestCaseError::fail(format!("step {step}: lookup of {key} failed: {e}")))?;
                prop_assert_eq!(got, r.record(&key), "step {}: lookup of {}", step, key);
            }
            Op::Batch { ws, explicit } => {
                table.set_auto_generation(!explicit);
                let tops: Vec<TableOp> = ws.iter().map(|w| table_op(w, keys[w.key])).collect();
                let got =
                    table.batch(&tops).map_err(|e| TestCaseError::fail(format!("step {step}: batch failed: {e}")))?;
                prop_assert_eq!(got.len(), ws.len());
                for (i, (g, w)) in got.into_iter().zip(ws).enumerate() {
                    let key = keys[w.key];
                    let want = r.apply(w.kind, key, w.state, w.nat.map(|n| n.build(&key)), !explicit);
                    prop_assert_eq!(reduce(g)?, want, "step {} batch item {}: {:?} on {}", step, i, w.kind, key);
                }
            }
            Op::Flush => {
                let n = table.flush().map_err(|e| TestCaseError::fail(format!("step {step}: flush: {e}")))?;
                prop_assert_eq!(n, r.map.len() as u64, "step {}: flush count", step);
                r.map.clear();
            }
            Op::Advance(ms) => {
                table.driver_ref().device().nic().advance_time(Duration::from_millis(*ms as u64));
                r.now_ms += *ms as u64;
            }
            Op::Snapshot => check_whole_table(&mut table, &r, step)?,
        }
    }
    check_whole_table(&mut table, &r, ops.len())?;
    for key in &keys {
        let got = table.lookup(key).map_err(|e| TestCaseError::fail(format!("final lookup of {key}: {e}")))?;
        prop_assert_eq!(got, r.record(key), "final lookup of {}", key);
    }
    let st = table.driver().stats();
    prop_assert_eq!(st.bad_completions, 0);
    prop_assert_eq!(st.completions, st.commands_posted);
    prop_assert_eq!(table.driver().slots_in_flight(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x6e69_6373_796e_6301),
        ..ProptestConfig::default()
    })]

    #[test]
    fn table_matches_reference_model(ops in prop::collection::vec(op_strategy(key_pool().len()), 1..200)) {
        run(&ops)?;
    }
}

/// A fixed sequence covering every rule once, so that a regression shows up
/// with a readable failure even before the random cases run.
#[test]
fn documented_semantics_fixed_sequence() {
    let keys = key_pool();
    let nat = NatGen { kind: 1, v4: [203, 0, 113, 9], v6: [0x20; 16], port: 4000 };
    let nat2 = NatGen { kind: 2, v4: [203, 0, 113, 10], v6: [0x21; 16], port: 5000 };
    let none = NatGen { kind: 0, v4: [1; 4], v6: [9; 16], port: 77 };
    let st = |g: u32| ConnState { generation: g.into(), timeout_s: 30.into(), ..ConnState::default() };
    let w = |kind, key, state, nat| Write { kind, key, state, nat };
    let single = |w: Write| Op::Single { w, explicit: false };
    let explicit = |w: Write| Op::Single { w, explicit: true };
    let ops = vec![
        single(w(WriteKind::Update, 0, st(0), None)),      // NotFound
        single(w(WriteKind::Delete, 0, st(0), None)),      // NotFound
        single(w(WriteKind::Insert, 0, st(9), Some(nat))), // gen 1, NAT
        single(w(WriteKind::Insert, 0, st(0), None)),      // Exists
        single(w(WriteKind::Update, 0, st(0), None)),      // gen 2, NAT kept
        Op::Lookup(0),
        single(w(WriteKind::Upsert, 0, st(0), Some(nat2))), // gen 3, NAT replaced
        Op::Lookup(0),
        single(w(WriteKind::Update, 0, st(0), Some(none))), // gen 4, NAT removed
        Op::Lookup(0),
        explicit(w(WriteKind::Update, 0, st(3), None)),       // Stale(4)
        explicit(w(WriteKind::Update, 0, st(4), None)),       // replay: Ok(4)
        explicit(w(WriteKind::Upsert, 0, st(100), None)),     // Ok(100)
        explicit(w(WriteKind::Insert, 8, st(55), Some(nat))), // Ok(55)
        single(w(WriteKind::Upsert, 8, st(0), None)),         // Ok(56)
        Op::Advance(12_345),
        Op::Lookup(8),
        Op::Snapshot,
        Op::Flush,
        Op::Lookup(0),
        single(w(WriteKind::Upsert, 12, st(0), None)), // gen 1
        Op::Batch {
            ws: vec![
                w(WriteKind::Insert, 6, st(0), Some(nat)),
                w(WriteKind::Insert, 6, st(0), None),
                w(WriteKind::Update, 6, st(0), None),
                w(WriteKind::Delete, 6, st(0), None),
                w(WriteKind::Delete, 6, st(0), None),
                w(WriteKind::Upsert, 6, st(0), Some(nat2)),
                w(WriteKind::Insert, 7, st(0), Some(nat)),
                w(WriteKind::Insert, 13, st(0), Some(nat)),
                w(WriteKind::Insert, 14, st(0), Some(nat2)),
            ],
            explicit: false,
        },
        Op::Snapshot,
    ];
    assert!(keys.len() > 14);
    if let Err(e) = run(&ops) {
        panic!("{e}");
    }
}

/// The reference itself, checked against the values docs/abi.md gives, so
/// that the device and the model cannot agree on a wrong rule.
#[test]
fn reference_model_follows_the_documented_rules() {
    let keys = key_pool();
    let k = keys[0];
    let nat = NatGen { kind: 1, v4: [203, 0, 113, 9], v6: [0; 16], port: 4000 }.build(&k);
    let nat2 = NatGen { kind: 2, v4: [203, 0, 113, 10], v6: [0; 16], port: 5000 }.build(&k);
    let none = NatGen { kind: 0, v4: [0; 4], v6: [9; 16], port: 77 }.build(&k);
    let st = |g: u32, t: u32| ConnState { generation: g.into(), timeout_s: t.into(), ..ConnState::default() };
    let mut r = Reference::default();
    assert_eq!(r.apply(WriteKind::Update, k, st(0, 0), None, true), Res::NotFound);
    assert_eq!(r.apply(WriteKind::Delete, k, st(0, 0), None, true), Res::NotFound);
    assert_eq!(r.apply(WriteKind::Insert, k, st(9, 0), Some(nat), true), Res::Ok(1));
    assert_eq!(r.apply(WriteKind::Insert, k, st(0, 0), None, true), Res::Exists);
    assert_eq!(r.apply(WriteKind::Update, k, st(0, 0), None, true), Res::Ok(2));
    assert_eq!(r.record(&k).map(|x| x.nat), Some(nat));
    assert_eq!(r.apply(WriteKind::Upsert, k, st(0, 0), Some(nat2), true), Res::Ok(3));
    assert_eq!(r.record(&k).map(|x| x.nat), Some(nat2));
    assert_eq!(r.apply(WriteKind::Update, k, st(0, 0), Some(none), true), Res::Ok(4));
    assert_eq!(r.record(&k).map(|x| x.nat), Some(Nat::default()));
    assert_eq!(r.apply(WriteKind::Update, k, st(3, 0), None, false), Res::Stale(4));
    assert_eq!(r.apply(WriteKind::Update, k, st(4, 0), None, false), Res::Ok(4));
    assert_eq!(r.apply(WriteKind::Upsert, k, st(100, 5), None, false), Res::Ok(100));
    r.now_ms = 1500;
    assert_eq!(r.record(&k).map(|x| x.state.timeout_s.get()), Some(4));
    r.now_ms = 9000;
    assert_eq!(r.record(&k).map(|x| x.state.timeout_s.get()), Some(1));
    assert_eq!(r.apply(WriteKind::Upsert, keys[1], st(7, 0), None, true), Res::Ok(1));
    assert_eq!(r.apply(WriteKind::Delete, k, st(0, 0), None, true), Res::Ok(101));
    assert_eq!(r.map.len(), 1);
}
