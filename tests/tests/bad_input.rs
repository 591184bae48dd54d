#![allow(clippy::expect_used)] // test code: a failed set-up is a failed test
//! Bad input on both sides of the ring: malformed descriptors, DMA outside
//! the IOMMU windows, devices that fail the probe, completions the host did
//! not ask for or that a faulty device garbled, bad doorbells. Each gives a
//! clear error (or an error completion), and the device and driver keep
//! working afterwards: every case that brings a device up ends with a
//! successful insert (with a chained NAT translation) and lookup.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use nicsync::{ConnEntry, ConnTable, Driver, DriverConfig, DriverError};
use nicsync_fwif::cmd::{CommandDescriptor, ConnOp, DescFlags, Opcode};
use nicsync_fwif::conn::{proto, ConnKey, ConnRecord, ConnState, Nat, NatKind};
use nicsync_fwif::cpl::{Completion, CompletionEntry, CplError, CplStatus, CPL_SIZE};
use nicsync_fwif::regs::{self, Capabilities, Counter, Status};
use nicsync_fwif::{ABI_MAJOR, ABI_MINOR};
use nicsync_model::dma::DmaRegion;
use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::{EmulatedDevice, NicDevice};

type Table = ConnTable<EmulatedDevice>;

fn cfg(cmd_ring_log2: u32) -> DriverConfig {
    DriverConfig { cmd_ring_log2, table_capacity: 4096, aging_period_ms: 0, ..DriverConfig::default() }
}

fn open(cmd_ring_log2: u32) -> Table {
    let dev = EmulatedDevice::inline().expect("emulated device");
    ConnTable::open(dev, cfg(cmd_ring_log2)).expect("probe")
}

fn key(i: u32) -> ConnKey {
    ConnKey::v4(Ipv4Addr::from(0x0a01_0000 + i), 1000 + i as u16, Ipv4Addr::new(192, 0, 2, 7), 80, proto::TCP, 0)
}

fn key6(i: u32) -> ConnKey {
    ConnKey::v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16), 1, Ipv6Addr::LOCALHOST, 2, proto::UDP, 0)
}

fn st(mark: u32) -> ConnState {
    ConnState { tcp_state: 3, mark: mark.into(), ..ConnState::default() }
}

fn nat4() -> Nat {
    Nat::new(NatKind::Source, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 4000)
}

/// The device and the driver still work: a fresh key (with a chained NAT
/// translation) is inserted and found.
fn still_works<D: NicDevice>(t: &mut ConnTable<D>, i: u32) {
    let k = key(100_000 + i);
    let g = t.insert(&k, &ConnEntry { state: st(i), nat: Some(nat4()) }).expect("insert after bad input");
    assert_eq!(g, 1);
    let rec = t.lookup(&k).expect("lookup after bad input").expect("the key just inserted");
    assert_eq!((rec.key, rec.state.mark.get(), rec.nat), (k, i, nat4()));
    assert!(!t.driver().status().contains(Status::FATAL));
}

fn exec(t: &mut Table, d: &CommandDescriptor, ext: Option<&CommandDescriptor>) -> Completion {
    t.driver().execute(d, ext).expect("the device answers")
}

fn counter(t: &mut Table, c: Counter) -> u64 {
    t.driver().device_counter(c)
}

fn insert_desc(k: &ConnKey, flags: DescFlags) -> CommandDescriptor {
    CommandDescriptor::conn(Opcode::Insert, flags, 0, k, &st(1))
}

// ---------------------------------------------------------------------------
// Descriptors the device refuses.

/// Every undefined opcode byte completes INVALID_OPCODE, echoes the byte,
/// has no effect and is counted as malformed.
#[test]
fn unknown_opcodes_complete_invalid_opcode() {
    let mut t = open(3);
    let mut n = 0;
    for op in (0u8..=255).filter(|b| Opcode::from_wire(*b).is_none()) {
        let mut d = CommandDescriptor::zeroed();
        d.opcode = op;
        // A body that would be a valid INSERT, to show it is not executed.
        d.body = CommandDescriptor::conn(Opcode::Insert, DescFlags::empty(), 0, &key(1), &st(1)).body;
        let tag = t.driver().post(&d, None).expect("post");
        t.driver().ring();
        let c = t.driver().wait(tag).expect("INVALID_OPCODE completion");
        assert_eq!((c.tag, c.status, c.opcode, c.result), (tag, CplStatus::InvalidOpcode, op, 0), "opcode {op:#04x}");
        n += 1;
    }
    assert_eq!(n, 256 - Opcode::ALL.len() as u64);
    assert_eq!(counter(&mut t, Counter::CommandsMalformed), n);
    assert_eq!(counter(&mut t, Counter::CommandErrors), n);
    assert!(t.is_empty());
    assert_eq!(t.driver().stats().bad_completions, 0);
    still_works(&mut t, 0);
}

/// The brief's case: opcode 0x42 through post + ring + wait.
#[test]
fn opcode_0x42() {
    let mut t = open(3);
    let mut d = CommandDescriptor::zeroed();
    d.opcode = 0x42;
    let tag = t.driver().post(&d, None).expect("post");
    t.driver().ring();
    let c = t.driver().wait(tag).expect("completion");
    assert_eq!(c.status, CplStatus::InvalidOpcode);
    assert_eq!(c.opcode, 0x42);
    assert_eq!(t.driver().slots_in_flight(), 0);
    still_works(&mut t, 0);
}

/// Malformed keys, states, flags, aux and reserved fields: MALFORMED, no
/// effect on the table.
#[test]
fn malformed_descriptors() {
    let mut t = open(3);
    t.insert(&key(1), &ConnEntry::new(st(1))).expect("insert");
    let mut cases: Vec<(&str, CommandDescriptor)> = Vec::new();

    for family in [0u8, 5, 44, 255] {
        let mut k = key(2);
        k.family = family;
        cases.push(("bad family (insert)", insert_desc(&k, DescFlags::AUTO_GENERATION)));
        cases.push(("bad family (lookup)", CommandDescriptor::lookup(0, &k, 0)));
        let mut k1 = key(1);
        k1.family = family;
        cases
            .push(("bad family (delete)", CommandDescriptor::conn(Opcode::Delete, DescFlags::empty(), 0, &k1, &st(0))));
    }
    for (which, byte) in [(0, 4), (0, 15), (1, 4), (1, 15)] {
        let mut k = key(1);
        if which == 0 {
            k.src_addr[byte] = 1;
        } else {
            k.dst_addr[byte] = 0x80;
        }
        cases.push(("non-canonical IPv4 (insert)", insert_desc(&k, DescFlags::empty())));
        cases.push((
            "non-canonical IPv4 (upsert)",
            CommandDescriptor::conn(Opcode::Upsert, DescFlags::empty(), 0, &k, &st(5)),
        ));
        cases.push((
            "non-canonical IPv4 (delete)",
            CommandDescriptor::conn(Opcode::Delete, DescFlags::empty(), 0, &k, &st(0)),
        ));
        cases.push(("non-canonical IPv4 (lookup)", CommandDescriptor::lookup(0, &k, 0)));
    }
    for aux in [1u32, 0x8000_0000] {
        let mut d = insert_desc(&key(2), DescFlags::empty());
        d.aux = aux.into();
        cases.push(("aux non-zero (insert)", d));
        let mut d = CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0);
        d.aux = aux.into();
        cases.push(("aux non-zero (nop)", d));
    }
    for flags in [0x08u8, 0x10, 0x80, 0xF8] {
        let mut d = insert_desc(&key(2), DescFlags::empty());
        d.flags = flags;
        cases.push(("undefined flags", d));
    }
    // Defined flags on opcodes that do not take them.
    cases.push((
        "AUTO_GENERATION on DELETE",
        CommandDescriptor::conn(Opcode::Delete, DescFlags::AUTO_GENERATION, 0, &key(1), &st(0)),
    ));
    cases.push(("CHAIN on LOOKUP", {
        let mut d = CommandDescriptor::lookup(0, &key(1), 0);
        d.flags = DescFlags::CHAIN.bits();
        d
    }));
    cases.push(("AUTO_GENERATION on FLUSH", CommandDescriptor::header(Opcode::Flush, DescFlags::AUTO_GENERATION, 0)));
    // States.
    for (tcp, dir, flags) in [(10u8, 0u8, 0u16), (255, 0, 0), (3, 2, 0), (3, 0, 0x100), (3, 0, 0x8000)] {
        let s = ConnState { tcp_state: tcp, direction: dir, flags: flags.into(), ..ConnState::default() };
        cases.push(("bad state (insert)", CommandDescriptor::conn(Opcode::Insert, DescFlags::empty(), 0, &key(2), &s)));
        cases.push(("bad state (update)", CommandDescriptor::conn(Opcode::Update, DescFlags::empty(), 0, &key(1), &s)));
    }
    // Bodies that must be zero, reserved bytes.
    for op in [Opcode::Nop, Opcode::Flush] {
        let mut d = CommandDescriptor::header(op, DescFlags::empty(), 0);
        d.body[55] = 1;
        cases.push(("non-zero NOP/FLUSH body", d));
    }
    let mut d = CommandDescriptor::lookup(0, &key(1), 0);
    d.body[48] = 1; // LookupBody::reserved
    cases.push(("LOOKUP reserved", d));
    let mut d = CommandDescriptor::snapshot(0, 0, 4096, 0);
    d.body[16] = 1; // SnapshotBody::reserved
    cases.push(("SNAPSHOT reserved", d));
    cases.push(("SNAPSHOT buffer < 80 bytes", CommandDescriptor::snapshot(0, 0, 79, 0)));

    for (i, (what, d)) in cases.iter().enumerate() {
        let c = exec(&mut t, d, None);
        assert_eq!(c.status, CplStatus::Malformed, "case {i}: {what}");
        assert_eq!(c.opcode, d.opcode, "case {i}: {what}");
    }
    let n = cases.len() as u64;
    assert_eq!(counter(&mut t, Counter::CommandsMalformed), n);
    assert_eq!(counter(&mut t, Counter::DmaErrors), 0, "a malformed LOOKUP/SNAPSHOT does no DMA");
    // Nothing changed: key 1 is still there, untouched (the malformed
    // FLUSH did not flush, the malformed UPDATEs did not update); key 2 is
    // absent.
    assert_eq!(t.len(), 1);
    let rec = t.lookup(&key(1)).expect("lookup").expect("present");
    assert_eq!((rec.state.generation.get(), rec.state.mark.get()), (1, 1));
    assert!(t.lookup(&key(2)).expect("lookup").is_none());
    assert_eq!(t.driver().stats().bad_completions, 0);
    still_works(&mut t, 1);
}

/// Chaining errors: CHAIN without an EXT (last posted slot, or followed by
/// another command, or by a stale EXT from an earlier lap that was not
/// posted), a lone EXT, bad EXT descriptors, CHAIN on DELETE.
#[test]
fn chain_errors() {
    let mut t = open(2); // 4 slots, so the stale-EXT case is quick to set up
    let nat = nat4();

    // CHAIN set, nothing posted after it.
    let c = exec(&mut t, &insert_desc(&key(1), DescFlags::CHAIN), None);
    assert_eq!(c.status, CplStatus::Malformed);
    assert!(t.lookup(&key(1)).expect("lookup").is_none());

    // CHAIN set, followed (same doorbell) by another command: the first is
    // MALFORMED alone, the second runs on its own.
    let drv = t.driver();
    let a = drv.post(&insert_desc(&key(2), DescFlags::CHAIN | DescFlags::AUTO_GENERATION), None).expect("post");
    let b = drv.post(&insert_desc(&key(3), DescFlags::AUTO_GENERATION), None).expect("post");
    drv.ring();
    let ca = drv.wait(a).expect("a");
    let cb = drv.wait(b).expect("b");
    assert_eq!((ca.status, cb.status, cb.result), (CplStatus::Malformed, CplStatus::Success, 1));
    assert!(t.lookup(&key(2)).expect("lookup").is_none());
    assert!(t.lookup(&key(3)).expect("lookup").is_some());

    // A stale EXT left in the next slot by an earlier lap is not consumed:
    // put a chained command at slots s, s+1, go round, then post a CHAIN
    // descriptor alone at slot s.
    let start = {
        let d = t.driver_ref();
        ((d.next_response_iova() - d.response_iova(0)) / nicsync::driver::RESPONSE_STRIDE as u64) as u32
    };
    let s = start;
    let (ins, ext) = ConnOp { key: key(4), state: st(4), nat: Some(nat), auto_generation: true, replica_owner: None }
        .encode(Opcode::Insert, 0);
    assert_eq!(exec(&mut t, &ins, ext.as_ref()).status, CplStatus::Success);
    // Two NOPs bring the tail back to s.
    for _ in 0..2 {
        exec(&mut t, &CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0), None);
    }
    let fetched = counter(&mut t, Counter::CommandsFetched);
    let c = exec(&mut t, &insert_desc(&key(5), DescFlags::CHAIN), None);
    assert_eq!(c.tag as u32, s);
    assert_eq!(c.status, CplStatus::Malformed);
    assert_eq!(counter(&mut t, Counter::CommandsFetched), fetched + 1, "the stale EXT was not fetched as part of it");
    assert!(t.lookup(&key(5)).expect("lookup").is_none());

    // A lone EXT: INVALID_OPCODE; with flags or aux set: MALFORMED.
    let c = exec(&mut t, &CommandDescriptor::ext(0, &nat), None);
    assert_eq!((c.status, c.opcode), (CplStatus::InvalidOpcode, Opcode::Ext as u8));
    for flags in [0x80u8, DescFlags::CHAIN.bits(), DescFlags::AUTO_GENERATION.bits()] {
        let mut e = CommandDescriptor::ext(0, &nat);
        e.flags = flags;
        assert_eq!(exec(&mut t, &e, None).status, CplStatus::Malformed, "EXT alone with flags {flags:#x}");
    }
    let mut e = CommandDescriptor::ext(0, &nat);
    e.aux = 3.into();
    assert_eq!(exec(&mut t, &e, None).status, CplStatus::Malformed);

    // Bad EXT descriptors after a CHAIN: MALFORMED, both slots consumed.
    let nat6 = Nat::new(NatKind::Destination, IpAddr::V6(Ipv6Addr::LOCALHOST), 1);
    let mut bad_exts: Vec<(&str, CommandDescriptor)> = Vec::new();
    bad_exts.push(("NAT family differs from the key's", CommandDescriptor::ext(0, &nat6)));
    let mut n = nat;
    n.kind = 3;
    bad_exts.push(("undefined NAT kind", CommandDescriptor::ext(0, &n)));
    let mut n = nat;
    n.reserved[2] = 1;
    bad_exts.push(("NAT reserved", CommandDescriptor::ext(0, &n)));
    let mut n = nat;
    n.addr[9] = 1;
    bad_exts.push(("non-canonical IPv4 NAT address", CommandDescriptor::ext(0, &n)));
    let mut d = CommandDescriptor::ext(0, &nat);
    d.body[40] = 1;
    bad_exts.push(("ExtBody reserved", d));
    let mut d = CommandDescriptor::ext(0, &nat);
    d.flags = DescFlags::CHAIN.bits();
    bad_exts.push(("EXT with flags", d));
    let mut d = CommandDescriptor::ext(0, &nat);
    d.aux = 1.into();
    bad_exts.push(("EXT with aux", d));
    for (what, ext) in &bad_exts {
        let fetched = counter(&mut t, Counter::CommandsFetched);
        let c = exec(&mut t, &insert_desc(&key(6), DescFlags::CHAIN | DescFlags::AUTO_GENERATION), Some(ext));
        assert_eq!(c.status, CplStatus::Malformed, "{what}");
        assert_eq!(counter(&mut t, Counter::CommandsFetched), fetched + 2, "{what}: both slots consumed");
        assert!(t.lookup(&key(6)).expect("lookup").is_none(), "{what}: no effect");
    }
    // A chained UPDATE with a bad EXT leaves the stored entry alone.
    let before = t.lookup(&key(4)).expect("lookup").expect("present");
    let upd =
        CommandDescriptor::conn(Opcode::Update, DescFlags::CHAIN | DescFlags::AUTO_GENERATION, 0, &key(4), &st(99));
    assert_eq!(exec(&mut t, &upd, Some(&CommandDescriptor::ext(0, &nat6))).status, CplStatus::Malformed);
    assert_eq!(t.lookup(&key(4)).expect("lookup"), Some(before));

    // CHAIN on an opcode that does not take it, EXT following: MALFORMED,
    // both slots consumed, the key is not deleted.
    let del = CommandDescriptor::conn(Opcode::Delete, DescFlags::CHAIN, 0, &key(4), &st(0));
    let fetched = counter(&mut t, Counter::CommandsFetched);
    assert_eq!(exec(&mut t, &del, Some(&CommandDescriptor::ext(0, &nat))).status, CplStatus::Malformed);
    assert_eq!(counter(&mut t, Counter::CommandsFetched), fetched + 2);
    assert!(t.lookup(&key(4)).expect("lookup").is_some());

    // A NAT of kind NONE is fine with any family.
    let none = Nat { kind: NatKind::None as u8, ..Nat::default() };
    let (ins, ext) = ConnOp { key: key6(7), state: st(7), nat: Some(none), auto_generation: true, replica_owner: None }
        .encode(Opcode::Insert, 0);
    assert_eq!(exec(&mut t, &ins, ext.as_ref()).status, CplStatus::Success);

    assert_eq!(t.driver().stats().bad_completions, 0);
    assert_eq!(t.driver().slots_in_flight(), 0);
    still_works(&mut t, 2);
}

/// docs/abi.md section 10: EXT accepts no flag ("Flags accepted: —"), a
/// flag not listed makes the command MALFORMED, and a lone EXT is
/// INVALID_OPCODE "(MALFORMED if its flags or aux are invalid too: those
/// are checked first)". So a lone EXT with IRQ_NOW is MALFORMED.
#[test]
fn lone_ext_with_irq_now_is_malformed() {
    let mut t = open(3);
    let mut e = CommandDescriptor::ext(0, &nat4());
    e.flags = DescFlags::IRQ_NOW.bits();
    assert_eq!(exec(&mut t, &e, None).status, CplStatus::Malformed);
    still_works(&mut t, 0);
}

// ---------------------------------------------------------------------------
// DMA outside the IOMMU windows.

/// LOOKUP and SNAPSHOT into addresses that are not mapped, that overrun a
/// mapped buffer into its guard page, that start before it, that wrap the
/// address space, or that were unmapped: DMA_ERROR, counted, nothing
/// written; the boundary case that just fits succeeds.
#[test]
fn dma_outside_the_iommu_window() {
    let mut t = open(3);
    for i in 0..40 {
        t.insert(&key(i), &ConnEntry::new(st(i))).expect("insert");
    }
    let buf = t.driver_ref().device().alloc_dma(4096).expect("alloc");
    let len = buf.len() as u64;
    let iova = buf.iova();
    buf.mem().write(0, &vec![0xAA; buf.len()]).expect("fill");
    let untouched = |b: &nicsync_vfio::DmaBuffer| {
        let mut v = vec![0u8; b.len()];
        b.mem().read(0, &mut v).expect("read");
        v.iter().all(|x| *x == 0xAA)
    };

    let lookups = [
        ("unmapped address", 0xdead_0000u64),
        ("overruns into the guard page", iova + len - 40),
        ("starts in the guard page", iova + len),
        ("starts before the window", iova - 8),
        ("wraps the address space", u64::MAX - 40),
        ("address zero", 0),
    ];
    let mut dma_errors = 0;
    for (what, addr) in lookups {
        let c = exec(&mut t, &CommandDescriptor::lookup(0, &key(1), addr), None);
        assert_eq!(c.status, CplStatus::DmaError, "LOOKUP: {what}");
        dma_errors += 1;
        assert_eq!(counter(&mut t, Counter::DmaErrors), dma_errors, "LOOKUP: {what}");
        assert!(untouched(&buf), "LOOKUP: {what}: memory written");
    }
    // An absent key is NOT_FOUND before any DMA is tried.
    let c = exec(&mut t, &CommandDescriptor::lookup(0, &key(999), 0xdead_0000), None);
    assert_eq!(c.status, CplStatus::NotFound);
    assert_eq!(counter(&mut t, Counter::DmaErrors), dma_errors);

    let snapshots = [
        ("unmapped address", 0xdead_0000u64, 4096u32),
        ("overruns into the guard page by 8 bytes", iova, len as u32 + 8),
        ("overruns by one byte", iova + 80, len as u32 - 79),
        ("starts in the guard page", iova + len, 80),
        ("starts before the window", iova - 80, 160),
        ("wraps the address space", u64::MAX - 100, 4096),
    ];
    for (what, addr, blen) in snapshots {
        let c = exec(&mut t, &CommandDescriptor::snapshot(0, addr, blen, 0), None);
        assert_eq!(c.status, CplStatus::DmaError, "SNAPSHOT: {what}");
        dma_errors += 1;
        assert_eq!(counter(&mut t, Counter::DmaErrors), dma_errors, "SNAPSHOT: {what}");
        assert!(untouched(&buf), "SNAPSHOT: {what}: memory written");
    }

    // Exactly at the end of the window: fits.
    let c = exec(&mut t, &CommandDescriptor::lookup(0, &key(1), iova + len - ConnRecord::SIZE as u64), None);
    assert_eq!((c.status, c.result), (CplStatus::Success, 1));
    let mut raw = vec![0u8; buf.len()];
    buf.mem().read(0, &mut raw).expect("read");
    let tail = &raw[raw.len() - ConnRecord::SIZE..];
    assert_eq!(&tail[..4], &key(1).src_addr[..4], "the record landed at the end");
    assert!(raw[..raw.len() - ConnRecord::SIZE].iter().all(|x| *x == 0xAA));
    let c = exec(&mut t, &CommandDescriptor::snapshot(0, iova, len as u32, 0), None);
    assert_eq!(c.status, CplStatus::Success);
    assert_eq!(c.result & 0xFFFF_FFFF, 40);

    // A buffer that was unmapped (dropped) is no longer reachable.
    let old = t.driver_ref().device().alloc_dma(4096).expect("alloc");
    let old_iova = old.iova();
    drop(old);
    let c = exec(&mut t, &CommandDescriptor::lookup(0, &key(1), old_iova), None);
    assert_eq!(c.status, CplStatus::DmaError, "use after unmap");
    dma_errors += 1;
    assert_eq!(counter(&mut t, Counter::DmaErrors), dma_errors);

    assert_eq!(t.driver().stats().bad_completions, 0);
    still_works(&mut t, 3);
    assert_eq!(t.snapshot().count(), 41);
}

// ---------------------------------------------------------------------------
// Probe failures.

fn device_with(f: impl FnOnce(&mut ModelConfig)) -> EmulatedDevice {
    let mut m = ModelConfig { virtual_clock: true, ..ModelConfig::default() };
    f(&mut m);
    EmulatedDevice::new(m, ExecMode::Inline).expect("emulated device")
}

#[test]
fn abi_version_mismatch() {
    for (major, minor, side) in
        [(2u16, 0u16, "host software"), (0, 9, "device firmware"), (ABI_MAJOR + 7, 3, "host software")]
    {
        let dev = device_with(|m| m.abi_version = regs::pack_version(major, minor));
        match ConnTable::open(dev, cfg(3)) {
            Err(e @ DriverError::AbiMismatch { .. }) => {
                let DriverError::AbiMismatch { dev_major, dev_minor, side: s } = &e else { unreachable!() };
                assert_eq!((*dev_major, *dev_minor, *s), (major, minor, side));
                let msg = e.to_string();
                assert!(msg.contains(&format!("{major}.{minor}")), "device version missing: {msg}");
                assert!(msg.contains(&format!("{ABI_MAJOR}.")), "host version missing: {msg}");
                assert!(msg.contains(side), "{msg}");
            }
            Err(e) => panic!("{major}.{minor}: expected AbiMismatch, got {e}"),
            Ok(_) => panic!("{major}.{minor}: accepted"),
        }
    }
    // A newer minor of the same major is compatible.
    let dev = device_with(|m| m.abi_version = regs::pack_version(ABI_MAJOR, ABI_MINOR + 5));
    let mut t = ConnTable::open(dev, cfg(3)).expect("newer minor accepted");
    assert_eq!(t.driver().info().abi_minor, ABI_MINOR + 5);
    still_works(&mut t, 4);
}

#[test]
fn wrong_device_id() {
    for id in [0u32, 0xFFFF_FFFF, 0x8086_10D3, regs::DEVICE_ID_VALUE.swap_bytes()] {
        let dev = device_with(|m| m.device_id = id);
        match ConnTable::open(dev, cfg(3)) {
            Err(DriverError::NotNicsync { found }) => assert_eq!(found, id),
            Err(e) => panic!("{id:#x}: expected NotNicsync, got {e}"),
            Ok(_) => panic!("{id:#x}: accepted"),
        }
    }
    let dev = device_with(|m| m.device_id = 0x1234_5678);
    let msg = ConnTable::open(dev, cfg(3)).map(|_| ()).expect_err("refused").to_string();
    assert!(msg.contains("0x12345678") && msg.contains("not a nicsync device"), "{msg}");
}

#[test]
fn missing_capabilities() {
    for missing in [Capabilities::CONN_TABLE, Capabilities::IPV6, Capabilities::SNAPSHOT, Capabilities::EVENTS] {
        let dev = device_with(|m| m.capabilities = Capabilities::all() - missing);
        match ConnTable::open(dev, cfg(3)) {
            Err(DriverError::MissingCapabilities(c)) => assert_eq!(c, missing),
            Err(e) => panic!("{missing:?}: expected MissingCapabilities, got {e}"),
            Ok(_) => panic!("{missing:?}: accepted"),
        }
    }
    // Several missing at once are all named.
    let dev = device_with(|m| m.capabilities = Capabilities::NAT | Capabilities::AGING);
    match ConnTable::open(dev, cfg(3)) {
        Err(e @ DriverError::MissingCapabilities(_)) => {
            let want = Capabilities::CONN_TABLE | Capabilities::IPV6 | Capabilities::SNAPSHOT | Capabilities::EVENTS;
            assert!(matches!(e, DriverError::MissingCapabilities(c) if c == want), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("CONN_TABLE") && msg.contains("SNAPSHOT"), "{msg}");
        }
        other => panic!("expected MissingCapabilities, got {other:?}"),
    }
    // EVENTS is only needed with an event ring.
    let dev = device_with(|m| m.capabilities = Capabilities::all() - Capabilities::EVENTS);
    let mut t = ConnTable::open(dev, DriverConfig { evt_ring_log2: 0, ..cfg(3) }).expect("no event ring, no EVENTS");
    still_works(&mut t, 5);
}

/// A configuration the device cannot take is refused without harm: the
/// same device then comes up with a good one.
#[test]
fn bad_configuration_then_good_one_on_the_same_device() {
    let dev = Arc::new(device_with(|m| m.max_capacity = 10_000));
    for bad in [
        DriverConfig { cmd_ring_log2: 1, ..cfg(3) },
        DriverConfig { cmd_ring_log2: 16, ..cfg(3) },
        DriverConfig { evt_ring_log2: 1, ..cfg(3) },
        DriverConfig { table_capacity: 10_001, ..cfg(3) },
    ] {
        match Driver::probe(dev.clone(), bad.clone()) {
            Err(DriverError::Config(msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("{bad:?}: expected a configuration error, got {e}"),
            Ok(_) => panic!("{bad:?}: accepted"),
        }
    }
    let mut t =
        ConnTable::new(Driver::probe(dev.clone(), DriverConfig { table_capacity: 10_000, ..cfg(3) }).expect("probe"));
    assert_eq!(t.driver().info().capacity, 10_000);
    still_works(&mut t, 6);
}

// ---------------------------------------------------------------------------
// Completions the driver must not trust.

/// The completion ring as the device sees it, for forging entries in place
/// the way a faulty device would write them.
fn completion_ring(t: &Table) -> (DmaRegion, u32) {
    let dev = t.driver_ref().device();
    let base = (dev.read32(regs::CPL_BASE_HI) as u64) << 32 | dev.read32(regs::CPL_BASE_LO) as u64;
    let size = 1u32 << dev.read32(regs::CPL_LOG2_SIZE);
    let mut tlb = dev.nic().iommu().tlb();
    let region = tlb.translate(base, size as usize * CPL_SIZE).expect("completion ring is mapped");
    (region, size)
}

/// Posts a NOP, rings (the inline device completes it at once), lets
/// `garble` rewrite the 16 bytes of its completion entry, then reaps.
/// Returns the tag and whether the driver accepted a completion for it.
fn post_and_garble(t: &mut Table, garble: impl FnOnce(&mut [u8; 16], u16)) -> (u16, Option<Completion>) {
    let drv = t.driver();
    let tag = drv.post(&CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0), None).expect("post");
    drv.ring();
    let written = drv.device_counter(Counter::CompletionsWritten);
    let (region, size) = completion_ring(t);
    let off = ((written - 1) % size as u64) as usize * CPL_SIZE;
    let mut e = [0u8; 16];
    region.read(off, &mut e).expect("read entry");
    assert_eq!(u16::from_le_bytes([e[0], e[1]]), tag, "found the entry of the command just posted");
    garble(&mut e, tag);
    // Body first, then the ownership word, as the device writes.
    region.write(off + 8, &e[8..]).expect("write body");
    region.store_u64_release(off, u64::from_le_bytes(e[..8].try_into().expect("8 bytes"))).expect("write word 0");
    let drv = t.driver();
    assert_eq!(drv.reap(), 1, "the garbled entry is consumed");
    (tag, drv.take_done(tag))
}

#[test]
fn garbled_completions_are_counted_and_skipped() {
    type Garble = fn(&mut [u8; 16], u16);
    let cases: [(&str, Garble); 8] = [
        ("tag out of range", |e, _| e[..2].copy_from_slice(&0xFFFFu16.to_le_bytes())),
        ("tag just past the ring", |e, _| e[..2].copy_from_slice(&8u16.to_le_bytes())),
        ("tag not in flight", |e, tag| e[..2].copy_from_slice(&((tag + 3) % 8).to_le_bytes())),
        ("undefined status", |e, _| e[2] = 0x99),
        ("status one past the last", |e, _| e[2] = CplStatus::SnapshotTorn as u8 + 1),
        ("wrong opcode", |e, _| e[3] = Opcode::Delete as u8),
        ("reserved byte set", |e, _| e[6] = 0x01),
        ("phase byte high bits set", |e, _| e[7] |= 0x80),
    ];
    for (what, garble) in cases {
        let mut t = open(3);
        // Some traffic first, so the ring is not at its start.
        for i in 0..5 {
            t.insert(&key(i), &ConnEntry::new(st(i))).expect("insert");
        }
        let before = t.driver().stats();
        let (tag, got) = post_and_garble(&mut t, garble);
        let after = t.driver().stats();
        assert!(got.is_none(), "{what}: garbled completion accepted for tag {tag}");
        assert_eq!(after.bad_completions, before.bad_completions + 1, "{what}");
        assert_eq!(after.completions, before.completions, "{what}");
        // The driver goes on: several laps of the ring.
        for i in 0..20 {
            still_works(&mut t, 10 + i);
        }
        assert_eq!(t.driver().stats().bad_completions, before.bad_completions + 1, "{what}: nothing else rejected");
        // The next valid completion showed the device had gone past the
        // garbled command: its slot came back and its waiter is told.
        assert_eq!(t.driver().stats().lost_completions, before.lost_completions + 1, "{what}: slot not reclaimed");
        assert_eq!(t.driver().slots_in_flight(), 0, "{what}: slots leaked");
    }
}

/// A waiter whose completion was garbled is told so as soon as the device
/// completes a later command, instead of waiting for the timeout.
#[test]
fn waiter_of_a_garbled_completion_gets_completion_lost() {
    let mut t = open(3);
    let (tag, got) = post_and_garble(&mut t, |e, _| e[2] = 0x99);
    assert!(got.is_none());
    t.insert(&key(77), &ConnEntry::new(st(77))).expect("a later command completes");
    let r = t.driver().wait(tag);
    assert!(matches!(r, Err(nicsync::DriverError::CompletionLost(x)) if x == tag), "{r:?} {:?}", t.driver().stats());
    assert_eq!(t.driver().slots_in_flight(), 0);
}

/// Per docs/abi.md section 13 the host checks that a completion's
/// `cmd_head` lies inside the command ring.
#[test]
fn completion_with_cmd_head_outside_the_ring_is_rejected() {
    let mut t = open(3);
    let before = t.driver().stats();
    let (_, got) = post_and_garble(&mut t, |e, _| e[4..6].copy_from_slice(&0xFFFFu16.to_le_bytes()));
    assert!(got.is_none(), "accepted a completion with cmd_head 0xffff in a ring of 8: {got:?}");
    assert_eq!(t.driver().stats().bad_completions, before.bad_completions + 1);
    still_works(&mut t, 0);
}

/// A doorbell written behind the driver's back, covering slots the driver
/// never posted: the device completes tags that are not in flight (and a
/// NOP under a tag the driver posted as INSERT). The driver counts each as
/// bad, never completes the wrong command, and gets back in step.
#[test]
fn completions_for_tags_the_driver_did_not_post() {
    let mut t = open(3); // 8 slots, all zero: NOPs with tag 0
    t.driver_ref().device().write32(regs::CMD_DOORBELL, 3);
    assert_eq!(t.driver().reap(), 3);
    let st0 = t.driver().stats();
    assert_eq!((st0.bad_completions, st0.completions), (3, 0));

    // The driver posts at slot 0; the device runs slots 3..8 (zero: NOPs
    // with tag 0, now in flight as an INSERT) and then slot 0.
    let k = key(1);
    let g = t.insert(&k, &ConnEntry::new(st(1))).expect("insert completes under its own tag");
    assert_eq!(g, 1);
    let s = t.driver().stats();
    assert_eq!(s.bad_completions, 3 + 5, "the five NOPs completed as tag 0 were rejected");
    assert_eq!(s.completions, 1);
    assert_eq!(counter(&mut t, Counter::CommandsFetched), 9);
    assert_eq!(t.driver().slots_in_flight(), 0);
    assert!(t.lookup(&k).expect("lookup").is_some());
    for i in 0..20 {
        still_works(&mut t, i);
    }
    assert_eq!(t.driver().stats().bad_completions, 8);
}

/// Waiting for a tag that is not in flight fails at once with UnknownTag
/// (it does not wait for the completion timeout), in range or not; a tag
/// whose completion was already taken is not in flight either.
#[test]
fn waiting_for_a_tag_not_in_flight() {
    let mut t = open(3);
    let drv = t.driver();
    for tag in [0u16, 5, 7, 8, 1000, u16::MAX] {
        assert!(matches!(drv.wait(tag), Err(DriverError::UnknownTag(x)) if x == tag), "tag {tag}");
        assert!(drv.take_done(tag).is_none());
    }
    let tag = drv.post(&CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0), None).expect("post");
    drv.ring();
    assert_eq!(drv.wait(tag).expect("nop").status, CplStatus::Success);
    let e = drv.wait(tag).expect_err("already taken");
    assert!(matches!(e, DriverError::UnknownTag(x) if x == tag));
    assert!(e.to_string().contains("not in flight"), "{e}");
    assert_eq!(drv.stats().bad_completions, 0);
    still_works(&mut t, 0);
}

/// A doorbell value >= the ring size is ignored and counted.
#[test]
fn bad_doorbell_is_counted_and_ignored() {
    let mut t = open(3);
    t.insert(&key(1), &ConnEntry::new(st(1))).expect("insert");
    let fetched = counter(&mut t, Counter::CommandsFetched);
    let doorbells = counter(&mut t, Counter::Doorbells);
    for (n, tail) in [8u32, 1000, u32::MAX].into_iter().enumerate() {
        t.driver_ref().device().write32(regs::CMD_DOORBELL, tail);
        assert_eq!(counter(&mut t, Counter::BadDoorbells), n as u64 + 1, "tail {tail}");
    }
    assert_eq!(counter(&mut t, Counter::CommandsFetched), fetched);
    assert_eq!(counter(&mut t, Counter::Doorbells), doorbells);
    assert_eq!(t.driver().reap(), 0, "no completion for an ignored doorbell");
    assert!(!t.driver().status().contains(Status::FATAL));
    for i in 0..20 {
        still_works(&mut t, i);
    }
    assert_eq!(counter(&mut t, Counter::BadDoorbells), 3);
    assert_eq!(t.driver().stats().bad_completions, 0);
}

/// `CompletionEntry::decode` on its own: every undefined status and every
/// reserved bit is refused; an undefined opcode byte is carried through
/// (it is the echo of an INVALID_OPCODE command).
#[test]
fn completion_entry_decode() {
    let good = CompletionEntry {
        tag: 5.into(),
        status: CplStatus::Success as u8,
        opcode: Opcode::Insert as u8,
        cmd_head: 6.into(),
        reserved: 0,
        phase: 1,
        result: 7.into(),
    };
    let c = good.decode().expect("valid entry");
    assert_eq!((c.tag, c.status, c.opcode, c.cmd_head, c.result), (5, CplStatus::Success, 1, 6, 7));
    for s in 0..=255u8 {
        let e = CompletionEntry { status: s, ..good };
        match CplStatus::from_wire(s) {
            Some(st) => assert_eq!(e.decode().map(|c| c.status), Ok(st)),
            None => assert_eq!(e.decode(), Err(CplError::BadStatus(s))),
        }
    }
    for r in 1..=255u8 {
        assert_eq!(CompletionEntry { reserved: r, ..good }.decode(), Err(CplError::Reserved));
    }
    for p in 2..=255u8 {
        assert_eq!(CompletionEntry { phase: p, ..good }.decode(), Err(CplError::Reserved), "phase {p:#x}");
    }
    let e = CompletionEntry { status: CplStatus::InvalidOpcode as u8, opcode: 0x42, ..good };
    assert_eq!(e.decode().map(|c| c.opcode), Ok(0x42));
}

/// An ignored doorbell is no work: once it has been counted, a step of the
/// design must report that it did nothing, or `Nic::run_until_idle` (run on
/// every MMIO write in Inline mode) spins to its 1,000,000-step bound on
/// every register write until a valid doorbell replaces it.
#[test]
fn pending_bad_doorbell_is_idle() {
    let mut t = open(3);
    let nic = t.driver_ref().device().nic().clone();
    t.driver_ref().device().write32(regs::CMD_DOORBELL, 100);
    assert_eq!(counter(&mut t, Counter::BadDoorbells), 1);
    assert!(!nic.step(), "a step with only an ignored doorbell pending claims to have done work");
    still_works(&mut t, 0);
}
