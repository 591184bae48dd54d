#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed set-up is a failed test
//! The inline doorbell (`CMD_INLINE`, docs/abi.md section 6.4): the driver
//! uses it by default and the device then takes the batch's first
//! descriptor from the window instead of fetching it by DMA; the register
//! doorbell still works when it is off or not offered; torn, busy and
//! mismatched window writes fall back safely; a descriptor whose `aux` is
//! not zero goes through `CMD_DOORBELL`; and the same workload gives the
//! same results either way.
//!
//! Everything is deterministic: the device runs inline in every MMIO write
//! (`ExecMode::Inline`) or only when the test steps it (`ExecMode::Manual`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use nicsync::{ConnEntry, ConnTable, DriverConfig, TableOp};
use nicsync_fwif::cmd::{CommandDescriptor, DescFlags, Opcode};
use nicsync_fwif::conn::{proto, ConnKey, ConnRecord, ConnState, Nat, NatKind, FAMILY_IPV4};
use nicsync_fwif::cpl::{Completion, CplStatus};
use nicsync_fwif::regs::{self, Capabilities, Counter, Status};
use nicsync_model::{CostParams, ExecMode, ModelConfig, Nic};
use nicsync_vfio::{DeviceError, DmaBuffer, EmulatedDevice, NicDevice};

// ---------------------------------------------------------------------------
// Helpers.

fn cfg(cmd_ring_log2: u32, inline_doorbell: bool) -> DriverConfig {
    DriverConfig {
        cmd_ring_log2,
        table_capacity: 4096,
        aging_period_ms: 0,
        inline_doorbell,
        // One seed for both runs: their tables are walked in one order.
        table_hash_seed: Some(nicsync_fwif::hash::TableHashSeed([0x5eed, 2])),
        ..DriverConfig::default()
    }
}

fn model() -> ModelConfig {
    ModelConfig { virtual_clock: true, ..ModelConfig::default() }
}

/// What the host did on the bus, as a [`Logged`] device saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mmio {
    /// A 32-bit register write (offset, value).
    Write32(u32, u32),
    /// A 64-byte window write through `NicDevice::write_inline` (offset).
    Inline(u32),
}

/// The emulated device behind a wrapper that logs every MMIO write.
struct Logged {
    inner: EmulatedDevice,
    log: Mutex<Vec<Mmio>>,
}

impl Logged {
    fn new(inner: EmulatedDevice) -> Self {
        Logged { inner, log: Mutex::new(Vec::new()) }
    }

    fn take_log(&self) -> Vec<Mmio> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl NicDevice for Logged {
    fn read32(&self, offset: u32) -> u32 {
        self.inner.read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        self.log.lock().unwrap().push(Mmio::Write32(offset, value));
        self.inner.write32(offset, value)
    }
    fn write_inline(&self, offset: u32, words: &[u64; 8]) {
        self.log.lock().unwrap().push(Mmio::Inline(offset));
        self.inner.write_inline(offset, words)
    }
    fn write_combining(&self) -> bool {
        self.inner.write_combining()
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
        self.inner.alloc_dma(len)
    }
    fn irq_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.inner.irq_fd(vector)
    }
    fn reset(&self) -> Result<(), DeviceError> {
        self.inner.reset()
    }
    fn describe(&self) -> String {
        format!("logged {}", self.inner.describe())
    }
}

/// A [`Logged`] device that keeps the trait's default `write_inline`:
/// sixteen 32-bit writes, words 1..8 then word 0, low half first, as the
/// VFIO backend issues it.
struct Split(Logged);

impl NicDevice for Split {
    fn read32(&self, offset: u32) -> u32 {
        self.0.read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        self.0.write32(offset, value)
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
        self.0.alloc_dma(len)
    }
    fn irq_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.0.irq_fd(vector)
    }
    fn reset(&self) -> Result<(), DeviceError> {
        self.0.reset()
    }
    fn describe(&self) -> String {
        format!("split {}", self.0.describe())
    }
    // Claims write-combining so the driver rings inline, to check that the
    // device reassembles a window that arrives as 32-bit halves.
    fn write_combining(&self) -> bool {
        true
    }
}

fn open(cfg: DriverConfig) -> ConnTable<EmulatedDevice> {
    ConnTable::open(EmulatedDevice::inline().expect("emulated device"), cfg).expect("probe")
}

fn logged(model: ModelConfig) -> Logged {
    Logged::new(EmulatedDevice::new(model, ExecMode::Inline).expect("emulated device"))
}

fn open_logged(model: ModelConfig, cfg: DriverConfig) -> ConnTable<Logged> {
    let t = ConnTable::open(logged(model), cfg).expect("probe");
    t.driver_ref().device().take_log(); // drop the bring-up writes
    t
}

/// A device in `ExecMode::Manual`: it runs only when the test calls
/// `Nic::step`/`run_until_idle`. A polling thread serves the probe (reset
/// and enable wait for the device) and is stopped before the test starts.
fn open_manual(cfg: DriverConfig) -> ConnTable<EmulatedDevice> {
    let dev = EmulatedDevice::new(model(), ExecMode::Manual).expect("emulated device");
    dev.start_poller(None).expect("poller for the probe");
    let t = ConnTable::open(dev, cfg).expect("probe");
    t.driver_ref().device().stop_poller();
    t
}

/// Lets a Manual device stop promptly when the driver is dropped.
fn close_manual(t: ConnTable<EmulatedDevice>) {
    t.driver_ref().device().start_poller(None).expect("poller for the shutdown");
    drop(t);
}

fn nic_of(t: &ConnTable<EmulatedDevice>) -> Arc<Nic> {
    t.driver_ref().device().nic().clone()
}

fn counter<D: NicDevice>(t: &mut ConnTable<D>, c: Counter) -> u64 {
    t.driver().device_counter(c)
}

/// (doorbells, inline_doorbells, inline_misses, bad_doorbells) as the device counts them.
fn doorbell_counters<D: NicDevice>(t: &mut ConnTable<D>) -> (u64, u64, u64, u64) {
    (
        counter(t, Counter::Doorbells),
        counter(t, Counter::InlineDoorbells),
        counter(t, Counter::InlineMisses),
        counter(t, Counter::BadDoorbells),
    )
}

fn key4(i: u32) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a02_0000 + i),
        2000 + (i % 50_000) as u16,
        Ipv4Addr::new(192, 0, 2, 9),
        443,
        proto::TCP,
        0,
    )
}

fn key6(i: u32) -> ConnKey {
    let src = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, (i >> 16) as u16, i as u16);
    ConnKey::v6(src, (i % 60_000) as u16, Ipv6Addr::LOCALHOST, 53, proto::UDP, (i % 5) as u16)
}

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

fn state(mark: u32) -> ConnState {
    ConnState { tcp_state: 3, flags: 0x7.into(), mark: mark.into(), ..ConnState::default() }
}

fn nop() -> CommandDescriptor {
    CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0)
}

fn insert_desc(k: &ConnKey, mark: u32) -> CommandDescriptor {
    CommandDescriptor::conn(Opcode::Insert, DescFlags::AUTO_GENERATION, 0, k, &state(mark))
}

/// The eight little-endian words of a descriptor as the window holds them.
fn window_words(d: &CommandDescriptor) -> [u64; 8] {
    let mut w = [0u64; 8];
    w[0] = d.opcode as u64 | (d.flags as u64) << 8 | (d.tag.get() as u64) << 16 | (d.aux.get() as u64) << 32;
    for (word, bytes) in w[1..].iter_mut().zip(d.body.chunks_exact(8)) {
        *word = u64::from_le_bytes(bytes.try_into().unwrap());
    }
    w
}

/// `d` as it lies in ring slot `slot` (the driver's tag is the slot index),
/// with `aux` carrying an inline doorbell for `tail` with sequence `seq`.
fn window_for(d: &CommandDescriptor, slot: u16, tail: u16, seq: u16) -> [u64; 8] {
    let mut d = *d;
    d.tag = slot.into();
    d.aux = regs::inline_doorbell(tail, seq).into();
    window_words(&d)
}

/// Manual mode: post, ring, run the device until idle, take the completion.
fn exec_manual(t: &mut ConnTable<EmulatedDevice>, d: &CommandDescriptor) -> Completion {
    let nic = nic_of(t);
    let drv = t.driver();
    let tag = drv.post(d, None).expect("post");
    drv.ring();
    nic.run_until_idle();
    drv.wait(tag).expect("completion written by the stepped device")
}

/// Manual mode: a LOOKUP through `exec_manual`.
fn lookup_manual(t: &mut ConnTable<EmulatedDevice>, k: &ConnKey) -> Option<ConnRecord> {
    let resp = t.driver_ref().next_response_iova();
    let c = exec_manual(t, &CommandDescriptor::lookup(0, k, resp));
    match c.status {
        CplStatus::Success => Some(t.driver_ref().read_response(c.tag).expect("response")),
        CplStatus::NotFound => None,
        s => panic!("lookup of {k}: {s}"),
    }
}

/// The device and the driver still work (inline device).
fn still_works<D: NicDevice>(t: &mut ConnTable<D>, i: u32) {
    let k = key4(900_000 + i);
    let nat = nat_for(&k, i);
    assert_eq!(t.insert(&k, &ConnEntry { state: state(i), nat: Some(nat) }).expect("insert"), 1);
    let rec = t.lookup(&k).expect("lookup").expect("the key just inserted");
    assert_eq!((rec.key, rec.state.mark.get(), rec.nat), (k, i, nat));
    assert!(!t.driver().status().contains(Status::FATAL));
    assert_eq!(t.driver().stats().bad_completions, 0);
}

/// Single commands of every kind (some with a chained EXT), each rung on
/// its own. Returns how many doorbells that took.
fn single_commands<D: NicDevice>(t: &mut ConnTable<D>) -> u64 {
    let mut rung = 0;
    for i in 0..20 {
        let k = key(i);
        let nat = (i % 4 == 0).then(|| nat_for(&k, i));
        assert_eq!(t.insert(&k, &ConnEntry { state: state(i), nat }).expect("insert"), 1);
        assert_eq!(t.update(&k, &ConnEntry::new(state(i + 100))).expect("update"), 2);
        let rec = t.lookup(&k).expect("lookup").expect("present");
        assert_eq!((rec.state.mark.get(), rec.nat), (i + 100, nat.unwrap_or_default()));
        rung += 3;
        if i % 2 == 0 {
            t.delete(&k).expect("delete");
            assert!(t.lookup(&k).expect("lookup").is_none());
            rung += 2;
        }
    }
    let c = t.driver().execute(&nop(), None).expect("nop");
    assert_eq!(c.status, CplStatus::Success);
    rung + 1
}

// ---------------------------------------------------------------------------
// (a) On by default.

/// By default the driver rings every batch through the window (one 64-byte
/// write, never `CMD_DOORBELL`), and the device takes every batch's first
/// descriptor from it: `inline_doorbells` equals the doorbells, there are
/// no misses, and a NOP alone costs no modelled descriptor fetch.
#[test]
fn driver_rings_inline_by_default() {
    assert!(DriverConfig::default().inline_doorbell);
    let mut t = open_logged(model(), cfg(3, true));
    assert!(t.driver_ref().uses_inline_doorbell());
    assert!(t.driver_ref().info().caps.contains(Capabilities::INLINE_DOORBELL));

    let singles = single_commands(&mut t);
    // A batch: one doorbell, its first descriptor inline, the rest by DMA.
    let ops: Vec<TableOp> = (100..105).map(|i| TableOp::Insert(key(i), ConnEntry::new(state(i)))).collect();
    assert!(t.batch(&ops).expect("batch").iter().all(|r| matches!(r, Ok(1))));

    let st = t.driver().stats();
    assert_eq!(st.doorbells, singles + 1);
    assert_eq!(st.bad_completions, 0);
    assert_eq!(doorbell_counters(&mut t), (st.doorbells, st.doorbells, 0, 0));
    let log = t.driver_ref().device().take_log();
    let inline_writes = log.iter().filter(|m| **m == Mmio::Inline(regs::CMD_INLINE)).count() as u64;
    assert_eq!(inline_writes, st.doorbells, "one window write per doorbell");
    assert!(!log.iter().any(|m| matches!(m, Mmio::Write32(regs::CMD_DOORBELL, _))), "register doorbell: {log:?}");

    // One NOP alone: only its execution is modelled, no descriptor fetch.
    let cost = CostParams::default();
    let before = counter(&mut t, Counter::ModelCycles);
    t.driver().execute(&nop(), None).expect("nop");
    assert_eq!(counter(&mut t, Counter::ModelCycles) - before, cost.command_cycles(0, 0));
    still_works(&mut t, 0);
    assert_eq!(counter(&mut t, Counter::InlineMisses), 0);
}

/// A device whose `write_inline` is the trait's default (sixteen 32-bit
/// writes, word 0's upper half last, as on an uncached BAR mapping) still
/// gets every copy whole: the sequence changes only with the last write.
#[test]
fn default_write_inline_as_ordered_32_bit_writes() {
    let mut t = ConnTable::open(Split(logged(model())), cfg(3, true)).expect("probe");
    t.driver_ref().device().0.take_log();
    assert!(t.driver_ref().uses_inline_doorbell());
    let singles = single_commands(&mut t);
    let st = t.driver().stats();
    assert_eq!(st.doorbells, singles);
    assert_eq!(doorbell_counters(&mut t), (singles, singles, 0, 0));
    let log = t.driver_ref().device().0.take_log();
    let window: Vec<u32> = log
        .iter()
        .filter_map(|m| match m {
            Mmio::Write32(o, _) if (regs::CMD_INLINE..regs::CMD_INLINE + regs::CMD_INLINE_SIZE).contains(o) => Some(*o),
            _ => None,
        })
        .collect();
    assert_eq!(window.len() as u64, 16 * singles);
    for w in window.chunks_exact(16) {
        assert_eq!(w[15], regs::CMD_INLINE + 4, "word 0's upper half (the sequence) goes last");
        assert_eq!(w[14], regs::CMD_INLINE);
    }
    assert!(!log.iter().any(|m| matches!(m, Mmio::Write32(regs::CMD_DOORBELL, _))));
    still_works(&mut t, 0);
}

// ---------------------------------------------------------------------------
// (b) Off, or not offered.

fn check_register_doorbells(mut t: ConnTable<Logged>) {
    assert!(!t.driver_ref().uses_inline_doorbell());
    let singles = single_commands(&mut t);
    let st = t.driver().stats();
    assert_eq!(st.doorbells, singles);
    assert_eq!(doorbell_counters(&mut t), (singles, 0, 0, 0));
    let log = t.driver_ref().device().take_log();
    assert!(!log.iter().any(|m| matches!(m, Mmio::Inline(_))), "window written: {log:?}");
    let rung = log.iter().filter(|m| matches!(m, Mmio::Write32(regs::CMD_DOORBELL, _))).count() as u64;
    assert_eq!(rung, singles);
    // A NOP alone pays the descriptor fetch.
    let cost = CostParams::default();
    let before = counter(&mut t, Counter::ModelCycles);
    t.driver().execute(&nop(), None).expect("nop");
    assert_eq!(counter(&mut t, Counter::ModelCycles) - before, cost.fetch_cycles(1) + cost.command_cycles(0, 0));
    still_works(&mut t, 0);
    assert_eq!(doorbell_counters(&mut t).1, 0);
}

/// With `inline_doorbell: false` the driver writes `CMD_DOORBELL` only, and
/// everything works as before.
#[test]
fn register_doorbell_when_disabled() {
    check_register_doorbells(open_logged(model(), cfg(3, false)));
}

/// A device without the `INLINE_DOORBELL` capability gets register
/// doorbells even though the driver's default asks for inline ones.
#[test]
fn register_doorbell_when_not_offered() {
    let m = ModelConfig { capabilities: Capabilities::all() - Capabilities::INLINE_DOORBELL, ..model() };
    check_register_doorbells(open_logged(m, cfg(3, true)));
}

// ---------------------------------------------------------------------------
// (c) Torn, partial and busy window writes.

/// 32-bit writes straight into the window: words 1..8 and the low half of
/// word 0 do not ring (the sequence has not changed), and a word 0 whose
/// `aux` has bit 16 set (an odd sequence: the busy mark) is ignored, as is
/// the same through `mmio_write_inline`. Nothing is fetched, counted or
/// completed; the driver's own doorbell afterwards works normally.
#[test]
fn torn_and_busy_window_writes_are_ignored() {
    let mut t = open(cfg(3, true));
    let nic = nic_of(&t);
    t.insert(&key(1), &ConnEntry::new(state(1))).expect("insert"); // slot 0, sequence 2
    let k = key(2);
    let d = insert_desc(&k, 2);
    let tag = t.driver().post(&d, None).expect("post"); // slot 1, not rung
    assert_eq!(tag, 1);
    let before = doorbell_counters(&mut t);
    let fetched = counter(&mut t, Counter::CommandsFetched);
    let nothing_happened = |t: &mut ConnTable<EmulatedDevice>, what: &str| {
        assert_eq!(doorbell_counters(t), before, "{what}");
        assert_eq!(counter(t, Counter::CommandsFetched), fetched, "{what}");
        assert_eq!(t.driver().reap(), 0, "{what}: a completion appeared");
    };

    // Everything but word 0's upper half, with a valid next sequence.
    let good = window_for(&d, 1, 2, 0x0040);
    for i in (1..8).chain(0..1) {
        nic.mmio_write(regs::CMD_INLINE + 8 * i, good[i as usize] as u32);
        if i != 0 {
            nic.mmio_write(regs::CMD_INLINE + 8 * i + 4, (good[i as usize] >> 32) as u32);
        }
        nothing_happened(&mut t, &format!("after word {i}"));
    }
    // Word 0's upper half with the busy bit (aux bit 16): an odd sequence.
    for seq in [0x0041u16, 0x0001, 0xFFFF] {
        let busy = window_for(&d, 1, 2, seq);
        assert_ne!(busy[0] & 1 << 48, 0);
        nic.mmio_write(regs::CMD_INLINE + 4, (busy[0] >> 32) as u32);
        nothing_happened(&mut t, &format!("busy sequence {seq:#06x} by 32-bit write"));
        nic.mmio_write_inline(regs::CMD_INLINE, &busy);
        nothing_happened(&mut t, &format!("busy sequence {seq:#06x} by 64-byte write"));
    }
    // A 64-byte write anywhere but at CMD_INLINE is not a doorbell either.
    nic.mmio_write_inline(regs::CMD_INLINE + 8, &good);
    nothing_happened(&mut t, "window write at CMD_INLINE + 8");
    nic.mmio_write_inline(0x400, &good);
    nothing_happened(&mut t, "window write at 0x400 (no register there)");

    // The driver's doorbell (its own next sequence) runs the command from
    // the window.
    t.driver().ring();
    let c = t.driver().wait(tag).expect("completion");
    assert_eq!((c.status, c.result), (CplStatus::Success, 1));
    let (db, inl, miss, bad) = doorbell_counters(&mut t);
    assert_eq!((db, inl, miss, bad), (before.0 + 1, before.1 + 1, before.2, before.3));
    assert!(t.lookup(&k).expect("lookup").is_some());
    still_works(&mut t, 0);
}

/// An inline doorbell whose tail is outside the ring is counted in
/// `bad_doorbells`, ignored, and leaves the device idle.
#[test]
fn inline_doorbell_with_a_tail_outside_the_ring() {
    let mut t = open(cfg(3, true));
    let nic = nic_of(&t);
    t.insert(&key(1), &ConnEntry::new(state(1))).expect("insert");
    let before = doorbell_counters(&mut t);
    for (n, tail) in [8u16, 9, 0xFFFF].into_iter().enumerate() {
        nic.mmio_write_inline(regs::CMD_INLINE, &window_for(&nop(), 1, tail, 0x1000 + 2 * n as u16));
        assert_eq!(doorbell_counters(&mut t), (before.0, before.1, before.2, before.3 + n as u64 + 1), "tail {tail}");
        assert!(!nic.step(), "an ignored inline doorbell left work pending");
    }
    assert_eq!(t.driver().reap(), 0);
    still_works(&mut t, 0);
    assert_eq!(counter(&mut t, Counter::BadDoorbells), 3);
}

// ---------------------------------------------------------------------------
// (d) A copy that is not the ring head's.

/// Two commands posted, then an inline doorbell (written by hand) whose
/// copy is the second one's, with a tail covering both: the device must not
/// use the copy for the head, so it fetches both by DMA and counts a miss,
/// and both commands complete correctly.
#[test]
fn copy_that_is_not_the_head_is_fetched_by_dma() {
    let mut t = open_manual(cfg(3, true));
    let nic = nic_of(&t);
    let (k1, k2) = (key(1), key(2));
    let (a, b) = (insert_desc(&k1, 10), insert_desc(&k2, 20));
    let drv = t.driver();
    assert_eq!(drv.post(&a, None).expect("post"), 0);
    assert_eq!(drv.post(&b, None).expect("post"), 1);
    let before = doorbell_counters(&mut t);
    assert_eq!(before, (0, 0, 0, 0));
    // The driver has not rung yet, so its next sequence is 2: use another.
    t.driver_ref().device().write_inline(regs::CMD_INLINE, &window_for(&b, 1, 2, 0x4000));
    assert_eq!(t.driver().reap(), 0, "the Manual device ran before it was stepped");
    nic.run_until_idle();
    assert_eq!(doorbell_counters(&mut t), (1, 0, 1, 0), "(doorbells, inline, misses, bad)");
    assert_eq!(counter(&mut t, Counter::CommandsFetched), 2);
    // The driver takes completions only for slots it rang itself (a head
    // beyond that would be a faulty device): ring its own doorbell for the
    // batch, a tail the device already has, which posts nothing new.
    let drv = t.driver();
    drv.ring();
    nic.run_until_idle();
    assert_eq!(counter(&mut t, Counter::CommandsFetched), 2, "nothing new to fetch");
    let drv = t.driver();
    assert_eq!(drv.reap(), 2);
    for tag in [0u16, 1] {
        let c = drv.take_done(tag).expect("completed");
        assert_eq!((c.opcode, c.status, c.result), (Opcode::Insert as u8, CplStatus::Success, 1), "tag {tag}");
    }
    for (k, mark) in [(k1, 10u32), (k2, 20)] {
        let rec = lookup_manual(&mut t, &k).expect("present");
        assert_eq!((rec.state.mark.get(), rec.state.generation.get()), (mark, 1));
    }
    let c = exec_manual(&mut t, &insert_desc(&key(3), 30));
    assert_eq!((c.status, c.result), (CplStatus::Success, 1));
    // One miss: the hand-written copy (not the head). The driver's catch-up
    // doorbell posted nothing new and was ignored.
    assert_eq!(counter(&mut t, Counter::InlineMisses), 1);
    assert_eq!(counter(&mut t, Counter::InlineDoorbells), 3, "the later doorbells used their copies");
    assert_eq!(t.driver().stats().bad_completions, 0);
    assert_eq!(t.len(), 3);
    close_manual(t);
}

/// An inline doorbell and then a register doorbell, both pending when the
/// device next polls (Manual mode): the register's later tail wins and the
/// older inline doorbell posts nothing new (its copy is not used, so a late
/// inline doorbell can never move the tail back); slot 0 is fetched by DMA
/// and both commands complete.
#[test]
fn inline_then_register_doorbell_in_one_poll() {
    let mut t = open_manual(cfg(3, true));
    let nic = nic_of(&t);
    let drv = t.driver();
    let first = drv.post(&nop(), None).expect("post");
    drv.ring(); // inline: slot 0's copy, tail 1
    let mut bad = nop();
    bad.aux = 1.into();
    let second = drv.post(&bad, None).expect("post");
    drv.ring(); // aux != 0: CMD_DOORBELL = 2
    nic.run_until_idle();
    assert_eq!(drv.reap(), 2);
    assert_eq!(drv.take_done(first).map(|c| c.status), Some(CplStatus::Success));
    assert_eq!(drv.take_done(second).map(|c| c.status), Some(CplStatus::Malformed));
    assert_eq!(doorbell_counters(&mut t).1, 0, "slot 0 came by DMA, not from the superseded window");
    assert_eq!(counter(&mut t, Counter::CommandsFetched), 2);
    close_manual(t);
}

// ---------------------------------------------------------------------------
// (e) A descriptor that cannot travel inline.

/// `aux` carries the doorbell in the window, so a first descriptor whose
/// own `aux` is not zero goes through `CMD_DOORBELL`: the device fetches
/// the slot as posted and completes it MALFORMED. Later in a batch, such a
/// descriptor is fetched by DMA behind an inline first one.
#[test]
fn nonzero_aux_goes_through_the_register_and_completes_malformed() {
    let mut t = open_logged(model(), cfg(4, true));
    t.insert(&key(1), &ConnEntry::new(state(1))).expect("insert");
    t.driver_ref().device().take_log();
    let malformed = counter(&mut t, Counter::CommandsMalformed);

    // Alone: a NOP and an INSERT, each with an aux that looks like an inline
    // doorbell's and one that does not.
    let mut cases = Vec::new();
    for aux in [regs::inline_doorbell(5, 2), 1, 0x8000_0000] {
        let mut d = nop();
        d.aux = aux.into();
        cases.push(d);
        let mut d = insert_desc(&key(2), 2);
        d.aux = aux.into();
        cases.push(d);
    }
    for (i, d) in cases.iter().enumerate() {
        let (db, inl, miss, _) = doorbell_counters(&mut t);
        let c = t.driver().execute(d, None).expect("completion");
        assert_eq!((c.status, c.opcode), (CplStatus::Malformed, d.opcode), "case {i}");
        let log = t.driver_ref().device().take_log();
        let tail = (c.tag as u32 + 1) % 16;
        assert_eq!(log.first(), Some(&Mmio::Write32(regs::CMD_DOORBELL, tail)), "case {i}: {log:?}");
        assert!(!log.iter().any(|m| matches!(m, Mmio::Inline(_))), "case {i}: {log:?}");
        assert_eq!(doorbell_counters(&mut t), (db + 1, inl, miss, 0), "case {i}");
    }
    assert_eq!(counter(&mut t, Counter::CommandsMalformed), malformed + cases.len() as u64);
    assert!(t.lookup(&key(2)).expect("lookup").is_none(), "a MALFORMED insert had an effect");

    // Second in a batch: the first goes inline, the second is fetched.
    let (db, inl, miss, _) = doorbell_counters(&mut t);
    let drv = t.driver();
    let first = drv.post(&insert_desc(&key(3), 3), None).expect("post");
    let mut bad = nop();
    bad.aux = 7.into();
    let second = drv.post(&bad, None).expect("post");
    drv.ring();
    assert_eq!(drv.reap(), 2);
    assert_eq!(drv.take_done(first).map(|c| (c.status, c.result)), Some((CplStatus::Success, 1)));
    assert_eq!(drv.take_done(second).map(|c| c.status), Some(CplStatus::Malformed));
    assert_eq!(doorbell_counters(&mut t), (db + 1, inl + 1, miss, 0));
    let log = t.driver_ref().device().take_log();
    assert!(log.contains(&Mmio::Inline(regs::CMD_INLINE)), "{log:?}");
    assert!(!log.iter().any(|m| matches!(m, Mmio::Write32(regs::CMD_DOORBELL, _))), "{log:?}");
    still_works(&mut t, 0);
}

// ---------------------------------------------------------------------------
// (f) Same workload, inline and register.

#[derive(Clone, Debug)]
enum Step {
    Apply(TableOp),
    Lookup(ConnKey),
    Batch(Vec<TableOp>),
    Flush,
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

/// About 2,000 operations: single ops (a third with a chained NAT
/// translation), lookups, batches of 1..=12 (larger than the free slots of
/// the 8-slot ring at times) and two FLUSHes, over a pool of 96 keys.
fn workload() -> Vec<Step> {
    let mut rng = Lcg(0x1d00_4be1);
    let op = |rng: &mut Lcg| {
        let k = key(rng.below(96));
        let nat = (rng.below(3) == 0).then(|| nat_for(&k, rng.next()));
        let e = ConnEntry { state: ConnState { timeout_s: rng.below(4).into(), ..state(rng.next()) }, nat };
        match rng.below(4) {
            0 => TableOp::Insert(k, e),
            1 => TableOp::Update(k, e),
            2 => TableOp::Upsert(k, e),
            _ => TableOp::Delete(k),
        }
    };
    let mut steps = Vec::new();
    let mut ops = 0;
    while ops < 2000 {
        let s = match rng.below(20) {
            0..=11 => Step::Apply(op(&mut rng)),
            12..=16 => Step::Lookup(key(rng.below(96))),
            _ => Step::Batch((0..1 + rng.below(12)).map(|_| op(&mut rng)).collect()),
        };
        ops += match &s {
            Step::Batch(b) => b.len(),
            _ => 1,
        };
        steps.push(s);
    }
    let n = steps.len();
    steps.insert(2 * n / 3, Step::Flush);
    steps.insert(n / 3, Step::Flush);
    steps
}

struct Run {
    results: Vec<String>,
    snapshot: Vec<ConnRecord>,
    len: usize,
    doorbells: u64,
    counters: Vec<(Counter, u64)>,
}

fn run_workload(steps: &[Step], inline: bool) -> Run {
    let mut t = open(cfg(3, inline));
    assert_eq!(t.driver_ref().uses_inline_doorbell(), inline);
    let mut results = Vec::new();
    for s in steps {
        match s {
            Step::Apply(op) => results.push(format!("{:?}", t.apply(op))),
            Step::Lookup(k) => results.push(format!("{:?}", t.lookup(k))),
            Step::Batch(ops) => {
                for r in t.batch(ops).expect("batch") {
                    results.push(format!("{r:?}"));
                }
            }
            Step::Flush => results.push(format!("{:?}", t.flush())),
        }
    }
    let snapshot: Vec<ConnRecord> = t.snapshot().map(|r| r.expect("snapshot")).collect();
    let st = t.driver().stats();
    assert_eq!(st.bad_completions, 0);
    assert_eq!(st.completions, st.commands_posted);
    let counters = Counter::ALL.iter().map(|&c| (c, counter(&mut t, c))).collect();
    Run { results, snapshot, len: t.len(), doorbells: st.doorbells, counters }
}

/// The same mixed workload with the inline doorbell on and off: the same
/// result for every operation, the same table at the end (walked in the
/// same order), the same doorbells, fetches and errors. Only the doorbell
/// path differs: every inline doorbell's copy was used, and the modelled
/// fetch time is lower.
#[test]
fn same_workload_same_results_inline_or_not() {
    let steps = workload();
    let on = run_workload(&steps, true);
    let off = run_workload(&steps, false);
    assert!(on.results.len() >= 2000);
    assert_eq!(on.results.len(), off.results.len());
    for (i, (a, b)) in on.results.iter().zip(&off.results).enumerate() {
        assert_eq!(a, b, "operation {i}");
    }
    assert!(on.results.iter().any(|r| r.starts_with("Ok(Some")), "no lookup hit");
    assert!(on.results.iter().any(|r| r.contains("NotFound")), "no NOT_FOUND");
    assert!(on.results.iter().any(|r| r.contains("Exists")), "no EXISTS");
    assert!(!on.snapshot.is_empty());
    assert_eq!(on.snapshot, off.snapshot);
    assert_eq!(on.len, off.len);
    assert_eq!(on.len, on.snapshot.len());
    assert_eq!(on.doorbells, off.doorbells);
    let get = |r: &Run, c: Counter| r.counters.iter().find(|(x, _)| *x == c).map(|(_, v)| *v).unwrap();
    for (c, v) in &on.counters {
        match c {
            Counter::InlineDoorbells => {
                assert_eq!(*v, on.doorbells, "every inline copy used");
                assert_eq!(get(&off, *c), 0);
            }
            Counter::ModelCycles => assert!(*v < get(&off, *c), "inline {v} vs register {}", get(&off, *c)),
            _ => assert_eq!(*v, get(&off, *c), "{}", c.name()),
        }
    }
    assert_eq!(get(&on, Counter::InlineMisses), 0);
    assert_eq!(get(&on, Counter::Doorbells), on.doorbells);
}

// ---------------------------------------------------------------------------
// Mixing register and inline doorbells.

/// A register doorbell must not be lost because its value equals the last
/// `CMD_DOORBELL` value while inline doorbells moved the tail in between.
/// Ring of 4: three inline doorbells take the tail to 3; a NOP with a
/// non-zero `aux` posted at slot 3 is rung through `CMD_DOORBELL = 0`,
/// the value that register has held since reset.
#[test]
fn register_doorbell_repeating_an_old_value_after_inline_doorbells() {
    let mut t = open(cfg(2, true));
    for _ in 0..3 {
        assert_eq!(t.driver().execute(&nop(), None).expect("nop").status, CplStatus::Success);
    }
    assert_eq!(doorbell_counters(&mut t), (3, 3, 0, 0));
    let mut bad = nop();
    bad.aux = 1.into();
    let drv = t.driver();
    let tag = drv.post(&bad, None).expect("post");
    assert_eq!(tag, 3);
    drv.ring(); // CMD_DOORBELL = 0
    assert_eq!(drv.reap(), 1, "the register doorbell (tail 0) was ignored");
    assert_eq!(drv.take_done(tag).map(|c| c.status), Some(CplStatus::Malformed));
    assert_eq!(doorbell_counters(&mut t).0, 4);
    still_works(&mut t, 0);
}

/// A register doorbell and then an inline doorbell, both pending when the
/// device next polls (Manual mode; in Thread mode a race): the later,
/// inline tail must win. Today the device reads the window first and the
/// register second, and takes the register's older tail.
#[test]
fn register_then_inline_doorbell_in_one_poll() {
    let mut t = open_manual(cfg(3, true));
    let nic = nic_of(&t);
    let drv = t.driver();
    let mut bad = nop();
    bad.aux = 1.into();
    let first = drv.post(&bad, None).expect("post");
    drv.ring(); // aux != 0: CMD_DOORBELL = 1
    let second = drv.post(&nop(), None).expect("post");
    drv.ring(); // inline: slot 1's copy, tail 2
    nic.run_until_idle();
    let got = drv.reap();
    let done = (drv.take_done(first).map(|c| c.status), drv.take_done(second).map(|c| c.status));
    // Let the device stop promptly even when the assertions fail.
    t.driver_ref().device().start_poller(None).expect("poller");
    assert_eq!(got, 2, "completions after both doorbells: {done:?}");
    assert_eq!(done, (Some(CplStatus::Malformed), Some(CplStatus::Success)));
}

/// An inline copy naming a slot outside the doorbell's range (here written
/// by hand) must not be kept and used later for whatever the host has since
/// posted in that slot. With register doorbells afterwards (driver with the
/// inline doorbell off), the device runs the stale copy (a DELETE) in place
/// of the LOOKUP posted there.
#[test]
fn stale_copy_outside_the_doorbell_range_is_not_used_later() {
    let mut t = open(cfg(3, false));
    let nic = nic_of(&t);
    let k1 = key(1);
    t.insert(&k1, &ConnEntry::new(state(1))).expect("insert"); // slot 0
    let drv = t.driver();
    let tag = drv.post(&nop(), None).expect("post"); // slot 1
    assert_eq!(tag, 1);
    // An inline doorbell for slot 1 (tail 2) whose copy names slot 3.
    let delete = CommandDescriptor::conn(Opcode::Delete, DescFlags::empty(), 0, &k1, &ConnState::default());
    nic.mmio_write_inline(regs::CMD_INLINE, &window_for(&delete, 3, 2, 0x4000));
    drv.ring(); // CMD_DOORBELL = 2: nothing new for the device
    assert_eq!(drv.wait(tag).expect("nop").status, CplStatus::Success);
    t.insert(&key(2), &ConnEntry::new(state(2))).expect("insert"); // slot 2
                                                                   // A LOOKUP in slot 3.
    let drv = t.driver();
    let resp = drv.next_response_iova();
    let tag = drv.post(&CommandDescriptor::lookup(0, &k1, resp), None).expect("post");
    assert_eq!(tag, 3);
    drv.ring();
    assert_eq!(drv.reap(), 1);
    let bad = drv.stats().bad_completions;
    let c = drv.take_done(tag).map(|c| (c.opcode, c.status));
    let len = t.len();
    assert_eq!(
        (c, bad, len),
        (Some((Opcode::Lookup as u8, CplStatus::Success)), 0, 2),
        "(lookup, bad completions, entries)"
    );
}
