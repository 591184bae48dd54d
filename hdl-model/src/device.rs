//! The device core: register side effects, command fetch and execution,
//! completion and event rings, interrupt moderation and aging.
//!
//! [`Shared`] is what the host reaches (BAR0 registers and the IOMMU);
//! [`Core`] is the design's internal state, run by whoever steps it (the
//! caller, an inline MMIO hook, or a polling thread). Host writes reach the
//! core only through registers, never by direct calls, exactly as on the
//! hardware.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use nicsync_fwif::cmd::{
    Command, CommandDescriptor, ConnOp, DecodeError, LoadStatus, Opcode, SyncPosition, DESC_SIZE, SNAPSHOT_DONE,
};
use nicsync_fwif::conn::{ConnFlags, ConnKey, ConnRecord, ConnState, Nat};
use nicsync_fwif::cpl::{CplStatus, CPL_SIZE, PHASE_BIT};
use nicsync_fwif::event::{EventKind, EVT_SIZE};
use nicsync_fwif::hash::TableHash;
use nicsync_fwif::regs::{self, Capabilities, Control, Counter, IrqCause, Status};
use nicsync_fwif::sync::{DeltaOp, DeltaRecord, DeltaUpdate, RECORD_SIZE};
use zerocopy::{FromZeros, IntoBytes};

use crate::cost::CostParams;
use crate::dma::{DmaRegion, Iommu, Tlb};
use crate::fault::{Fault, FaultInjector, FaultKind};
use crate::sync::{precedence, ReceiverEvent};
use crate::sync_unit::SyncUnit;
use crate::table::{CuckooTable, InsertError, Placement, Slot, Traffic};

/// Receives the device's interrupts (an eventfd, an MSI-X vector).
pub trait InterruptSink: Send + Sync {
    /// Raises interrupt `vector`.
    fn raise(&self, vector: u16);
}

/// Where the device's notion of time comes from.
#[derive(Debug)]
pub enum Clock {
    /// Wall-clock time since reset (the polling-thread mode).
    Real(Instant),
    /// Time advanced only by the caller (deterministic tests/simulation).
    Virtual(AtomicU64),
}

impl Clock {
    /// Nanoseconds since the clock started.
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Real(t) => t.elapsed().as_nanos() as u64,
            Clock::Virtual(ns) => ns.load(Ordering::Acquire),
        }
    }
}

/// Static configuration of a modelled device (what the bitstream fixes).
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Largest table capacity (TABLE_MAX_CAPACITY).
    pub max_capacity: u32,
    /// Capacity after reset until the host writes TABLE_CAPACITY.
    pub default_capacity: u32,
    /// Cost-model parameters (and the clock reported in CLOCK_MHZ).
    pub cost: CostParams,
    /// DEVICE_ID (tests change it to exercise probe failures).
    pub device_id: u32,
    /// ABI_VERSION register value.
    pub abi_version: u32,
    /// CAPABILITIES register value.
    pub capabilities: Capabilities,
    /// HW_REVISION.
    pub hw_revision: u32,
    /// Use a virtual clock advanced by the caller instead of wall time.
    pub virtual_clock: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_capacity: 1 << 24,
            default_capacity: 1 << 16,
            cost: CostParams::default(),
            device_id: regs::DEVICE_ID_VALUE,
            abi_version: regs::pack_version(nicsync_fwif::ABI_MAJOR, nicsync_fwif::ABI_MINOR),
            capabilities: Capabilities::all(),
            hw_revision: 1,
            virtual_clock: false,
        }
    }
}

/// A 32-bit register alone on its cache line, so that the emulated
/// doorbells do not false-share with registers the other side writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct PaddedU32(pub AtomicU32);

/// The doorbell register as the core sees it: the last value written in
/// bits 31:0 and a count of writes in bits 63:32, so that a write repeating
/// the previous value is still a doorbell (every MMIO write is an event on
/// the bus, not a level).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct DoorbellReg(pub AtomicU64);

/// What the device publishes for the host to read: the entry count and
/// the counters, on cache lines of their own.
#[derive(Debug)]
#[repr(align(128))]
struct Published {
    table_count: AtomicU32,
    counters: [AtomicU64; NCOUNTERS],
}

/// The inline doorbell window: 64 bytes on their own cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct InlineWindow(pub [AtomicU64; 8]);

/// Bit of word 0 (aux bit 16) that marks a window write in progress.
const INLINE_BUSY: u64 = 1 << 48;

const NREGS: usize = regs::BAR0_SIZE / 4;
const NCOUNTERS: usize = Counter::ALL.len();

/// The host-visible side of the device.
pub struct Shared {
    pub(crate) cfg: ModelConfig,
    regs: Box<[AtomicU32]>,
    pub(crate) doorbell: DoorbellReg,
    inline: InlineWindow,
    cpl_head: PaddedU32,
    evt_head: PaddedU32,
    cmd_head: PaddedU32,
    /// Written by the device on every burst: kept off the lines of the
    /// fields the host reads on its doorbell path.
    published: Published,
    pub(crate) iommu: Arc<Iommu>,
    irq: Mutex<Option<Arc<dyn InterruptSink>>>,
    pub(crate) clock: Clock,
    /// Faults armed from outside (tests, chaos runs).
    pub(crate) faults: FaultInjector,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("status", &self.reg(regs::STATUS)).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(cfg: ModelConfig) -> Self {
        let clock = if cfg.virtual_clock { Clock::Virtual(AtomicU64::new(0)) } else { Clock::Real(Instant::now()) };
        let s = Shared {
            regs: (0..NREGS).map(|_| AtomicU32::new(0)).collect(),
            doorbell: DoorbellReg::default(),
            inline: InlineWindow::default(),
            cpl_head: PaddedU32::default(),
            evt_head: PaddedU32::default(),
            cmd_head: PaddedU32::default(),
            published: Published {
                table_count: AtomicU32::new(0),
                counters: std::array::from_fn(|_| AtomicU64::new(0)),
            },
            iommu: Arc::new(Iommu::default()),
            irq: Mutex::new(None),
            clock,
            faults: FaultInjector::new(),
            cfg,
        };
        s.power_on_registers();
        s.set(regs::STATUS, Status::READY.bits());
        s
    }

    fn power_on_registers(&self) {
        let c = &self.cfg;
        for r in self.regs.iter() {
            r.store(0, Ordering::Relaxed);
        }
        self.set(regs::DEVICE_ID, c.device_id);
        self.set(regs::ABI_VERSION, c.abi_version);
        self.set(regs::CAPABILITIES, c.capabilities.bits());
        self.set(regs::HW_REVISION, c.hw_revision);
        self.set(regs::TABLE_CAPACITY, c.default_capacity.min(c.max_capacity));
        self.set(regs::TABLE_MAX_CAPACITY, c.max_capacity);
        self.set(regs::CLOCK_MHZ, c.cost.clock_mhz);
        self.set(regs::IRQ_COALESCE_COUNT, 1);
        self.doorbell.0.store(0, Ordering::Relaxed);
        for p in [&self.cpl_head, &self.evt_head, &self.cmd_head] {
            p.0.store(0, Ordering::Relaxed);
        }
        for w in &self.inline.0 {
            w.store(0, Ordering::Relaxed);
        }
        self.published.table_count.store(0, Ordering::Relaxed);
        for c in &self.published.counters {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn slot(&self, off: u32) -> Option<&AtomicU32> {
        if off % 4 != 0 {
            return None;
        }
        self.regs.get(off as usize / 4)
    }

    pub(crate) fn reg(&self, off: u32) -> u32 {
        self.slot(off).map_or(0, |r| r.load(Ordering::Acquire))
    }

    /// The lowest generation of a change the device numbers itself
    /// ([`regs::GENERATION_FLOOR`]).
    #[inline]
    fn generation_floor(&self) -> u32 {
        self.reg(regs::GENERATION_FLOOR)
    }

    fn set(&self, off: u32, v: u32) {
        if let Some(r) = self.slot(off) {
            r.store(v, Ordering::Release);
        }
    }

    fn set_status(&self, set: Status, clear: Status) {
        if let Some(r) = self.slot(regs::STATUS) {
            let mut cur = r.load(Ordering::Acquire);
            // Nothing to change (say, EVENT_OVERFLOW set again for every
            // event an overflowing ring drops): a plain load, without the
            // locked read-modify-write, which drains the store buffer.
            if (cur & !clear.bits()) | set.bits() == cur {
                return;
            }
            loop {
                let new = (cur & !clear.bits()) | set.bits();
                match r.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(x) => cur = x,
                }
            }
        }
    }

    /// A BAR0 read. Unaligned or out-of-range offsets read as all ones, as
    /// a PCIe completer abort would.
    pub fn mmio_read(&self, off: u32) -> u32 {
        if off % 4 != 0 || off as usize >= regs::BAR0_SIZE {
            return u32::MAX;
        }
        match off {
            regs::CMD_DOORBELL | regs::CPL_HEAD | regs::EVT_HEAD => 0,
            regs::CMD_HEAD => self.cmd_head.0.load(Ordering::Acquire),
            regs::TABLE_COUNT => self.published.table_count.load(Ordering::Acquire),
            regs::DEVICE_TIME_MS => (self.clock.now_ns() / 1_000_000) as u32,
            o if o >= regs::COUNTER_BASE => {
                let i = ((o - regs::COUNTER_BASE) / 8) as usize;
                match self.published.counters.get(i) {
                    Some(c) => {
                        let v = c.load(Ordering::Acquire);
                        if (o - regs::COUNTER_BASE) % 8 == 0 {
                            v as u32
                        } else {
                            (v >> 32) as u32
                        }
                    }
                    None => 0,
                }
            }
            o => self.reg(o),
        }
    }

    /// A 64-byte write-combined write. The emulated bus delivers it
    /// atomically, as one PCIe TLP would be: the window's word 0 is first
    /// marked busy, then the data and finally word 0 land, and the core
    /// reads the window under that seqlock.
    pub fn mmio_write_inline(&self, off: u32, words: &[u64; 8]) {
        if off != regs::CMD_INLINE || words[0] & INLINE_BUSY != 0 {
            for (i, w) in words.iter().enumerate().skip(1).chain(words.iter().enumerate().take(1)) {
                // Past the end of BAR0 the writes are ignored (mmio_write);
                // past the end of the address space as well (they do not
                // wrap onto the registers at 0).
                let Some(at) = off.checked_add(8 * i as u32) else { continue };
                self.mmio_write(at, *w as u32);
                if let Some(high) = at.checked_add(4) {
                    self.mmio_write(high, (*w >> 32) as u32);
                }
            }
            return;
        }
        let w = &self.inline.0;
        w[0].store(w[0].load(Ordering::Relaxed) | INLINE_BUSY, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        for i in 1..8 {
            w[i].store(words[i], Ordering::Relaxed);
        }
        w[0].store(words[0], Ordering::Release);
    }

    /// Reads the inline window consistently: word 0 and the descriptor, or
    /// None while a write is in progress or if one raced the read.
    fn read_inline(&self) -> Option<[u64; 8]> {
        let w = &self.inline.0;
        let w0 = w[0].load(Ordering::Acquire);
        if w0 & INLINE_BUSY != 0 {
            return None;
        }
        let mut out = [w0, 0, 0, 0, 0, 0, 0, 0];
        for i in 1..8 {
            out[i] = w[i].load(Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::Acquire);
        (w[0].load(Ordering::Relaxed) == w0).then_some(out)
    }

    /// Word 0 of the inline window (sequence in bits 63:48).
    #[inline]
    fn inline_word0(&self) -> u64 {
        self.inline.0[0].load(Ordering::Acquire)
    }

    /// A BAR0 write. Writes to read-only or undefined registers are ignored.
    pub fn mmio_write(&self, off: u32, v: u32) {
        if (regs::CMD_INLINE..regs::CMD_INLINE + regs::CMD_INLINE_SIZE).contains(&off) && off % 4 == 0 {
            // 32-bit writes into the window update their half of the word;
            // the device acts when word 0's sequence changes.
            let i = ((off - regs::CMD_INLINE) / 8) as usize;
            let shift = if off % 8 == 0 { 0 } else { 32 };
            let mask = !(0xFFFF_FFFFu64 << shift);
            let a = &self.inline.0[i];
            let new = (a.load(Ordering::Relaxed) & mask) | ((v as u64) << shift);
            a.store(new, if i == 0 { Ordering::Release } else { Ordering::Relaxed });
            return;
        }
        match off {
            regs::CMD_DOORBELL => {
                // One writer per device (the driver holds it exclusively),
                // so a plain load and store count the writes.
                let writes = (self.doorbell.0.load(Ordering::Relaxed) >> 32).wrapping_add(1);
                self.doorbell.0.store(writes << 32 | v as u64, Ordering::Release);
            }
            regs::CPL_HEAD => self.cpl_head.0.store(v, Ordering::Release),
            regs::EVT_HEAD => self.evt_head.0.store(v, Ordering::Release),
            regs::IRQ_STATUS => {
                if let Some(r) = self.slot(off) {
                    r.fetch_and(!v, Ordering::AcqRel);
                }
            }
            regs::CONTROL
            | regs::IRQ_MASK
            | regs::CMD_BASE_LO
            | regs::CMD_BASE_HI
            | regs::CMD_LOG2_SIZE
            | regs::CPL_BASE_LO
            | regs::CPL_BASE_HI
            | regs::CPL_LOG2_SIZE
            | regs::EVT_BASE_LO
            | regs::EVT_BASE_HI
            | regs::EVT_LOG2_SIZE
            | regs::TABLE_CAPACITY
            | regs::IRQ_COALESCE_COUNT
            | regs::IRQ_COALESCE_USEC
            | regs::AGING_PERIOD_MS
            | regs::GENERATION_FLOOR
            | regs::TABLE_HASH_SEED_0
            | regs::TABLE_HASH_SEED_1
            | regs::TABLE_HASH_SEED_2
            | regs::TABLE_HASH_SEED_3 => self.set(off, v),
            _ => {}
        }
    }

    /// Installs the interrupt sink.
    pub fn set_interrupt_sink(&self, sink: Option<Arc<dyn InterruptSink>>) {
        *self.irq.lock().unwrap_or_else(PoisonError::into_inner) = sink;
    }

    fn interrupt_sink(&self) -> Option<Arc<dyn InterruptSink>> {
        self.irq.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Current counter values.
    pub fn counter(&self, c: Counter) -> u64 {
        self.published.counters[c as usize].load(Ordering::Acquire)
    }

    /// The device's fault injector (see [`crate::fault`]).
    pub fn faults(&self) -> &FaultInjector {
        &self.faults
    }
}

/// A ring the device writes (completions, events).
#[derive(Debug)]
struct ProducerRing {
    region: DmaRegion,
    size: u32,
    tail: u32,
    phase: bool,
    /// Last consumer head read from the register.
    head_cache: u32,
}

impl ProducerRing {
    fn has_space(&mut self, head_reg: &PaddedU32) -> bool {
        if (self.tail + 1) & (self.size - 1) != self.head_cache {
            return true;
        }
        let h = head_reg.0.load(Ordering::Acquire);
        if h < self.size {
            self.head_cache = h;
        }
        (self.tail + 1) & (self.size - 1) != self.head_cache
    }

    fn space(&mut self, head_reg: &PaddedU32) -> u32 {
        let h = head_reg.0.load(Ordering::Acquire);
        if h < self.size {
            self.head_cache = h;
        }
        self.head_cache.wrapping_sub(self.tail).wrapping_sub(1) & (self.size - 1)
    }

    /// Writes 16-byte entries `(word0, result)`: every result first, then
    /// every first word with its phase bit, with release ordering. Entry
    /// `invert` (an injected fault) gets the wrong phase.
    fn push_burst(&mut self, entries: &mut [(u64, u64)], invert: Option<usize>) -> Result<(), crate::dma::DmaFault> {
        let mut rest = entries;
        let mut base = 0;
        while !rest.is_empty() {
            // Up to the ring's end, then from its start.
            let n = rest.len().min((self.size - self.tail) as usize);
            let phase = if self.phase { (PHASE_BIT as u64) << 56 } else { 0 };
            let (now, later) = rest.split_at_mut(n);
            for e in now.iter_mut() {
                e.0 |= phase;
            }
            if let Some(e) = invert.and_then(|j| j.checked_sub(base)).and_then(|j| now.get_mut(j)) {
                e.0 ^= (PHASE_BIT as u64) << 56;
            }
            base += n;
            self.region.publish_pairs(self.tail as usize * CPL_SIZE, now)?;
            self.tail += n as u32;
            if self.tail == self.size {
                self.tail = 0;
                self.phase = !self.phase;
            }
            rest = later;
        }
        Ok(())
    }

    /// Writes `body` (everything after the first 8 bytes) then the first
    /// word with the phase bit (inverted, as a fault, with
    /// `invert_phase`), with release ordering.
    fn push(
        &mut self,
        entry_size: usize,
        word0: u64,
        body: &[u8],
        invert_phase: bool,
    ) -> Result<(), crate::dma::DmaFault> {
        let off = self.tail as usize * entry_size;
        self.region.write(off + 8, body)?;
        let phase = if self.phase != invert_phase { PHASE_BIT as u64 } else { 0 };
        self.region.store_u64_release(off, word0 | (phase << 56))?;
        self.tail += 1;
        if self.tail == self.size {
            self.tail = 0;
            self.phase = !self.phase;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct CmdRing {
    region: DmaRegion,
    size: u32,
    head: u32,
    /// Tail from the last valid doorbell (register or inline).
    tail: u32,
    /// Last CMD_DOORBELL register state seen (write count and value).
    last_db: u64,
    /// Last inline-doorbell sequence seen (word 0 bits 63:48).
    last_inline_seq: u64,
    /// The inline copy of the descriptor at the slot its tag names.
    inline: Option<CommandDescriptor>,
}

/// Held peer updates applied per housekeeping pass once SYNC_HOLD clears.
const HOLD_DRAIN_PER_PASS: usize = 256;

/// How many descriptors are decoded and prefetched ahead of execution.
const FETCH_BURST: usize = 64;

/// Deleted synced keys with the (generation, owner) of their delete: a
/// set-associative table of [`TOMBSTONES`] entries in [`TOMBSTONE_WAYS`]-way
/// sets, as a hardware design would build it beside the connection table.
/// A new tombstone takes a free way of its key's set or evicts the set's
/// oldest one, so a tombstone lives for about the last [`TOMBSTONES`]
/// deletes: long enough to outlive any retransmission of an older upsert.
#[derive(Debug, Default)]
struct Tombstones {
    /// `TOMBSTONES` slots, set by set.
    slots: Vec<Tombstone>,
    /// Per set: its ways' fingerprints and ages, in one cache line.
    sets: Vec<TombstoneSet>,
    /// Live tombstones.
    len: usize,
    /// Recording counter (wrapping; ages are compared as distances from it).
    stamp: u32,
}

/// What a lookup or a record reads of a set before it touches a slot: per
/// way a 16-bit fingerprint of the key (0: free), so that a lookup touches
/// a slot only on a match, as the table's buckets do, and when it was
/// recorded (the oldest of a full set is evicted first). One line, so a
/// record that evicts reads no more memory than a lookup.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct TombstoneSet {
    fps: [u16; TOMBSTONE_WAYS],
    stamps: [u32; TOMBSTONE_WAYS],
}

#[derive(Debug, Clone, Copy, Default)]
struct Tombstone {
    key: ConnKey,
    generation: u32,
    owner: u16,
}

/// Tombstones kept.
const TOMBSTONES: usize = 65_536;
/// Ways per tombstone set.
const TOMBSTONE_WAYS: usize = 8;

impl Tombstones {
    /// The set index and fingerprint of a key whose hash (the table's,
    /// [`CuckooTable::hash_of`]: computed once per command) is `h`. The
    /// caller always gives the hash, so tombstones are placed by the table's
    /// seed whatever it is.
    fn place(h: u64) -> (usize, u16) {
        let sets = TOMBSTONES / TOMBSTONE_WAYS;
        ((h >> 17) as usize % sets, ((h >> 48) as u16) | 1)
    }

    /// The slots of `key`'s set.
    #[cfg(test)]
    fn set_of(&self, key: &ConnKey) -> std::ops::Range<usize> {
        let set = Self::place(TableHash::default().hash(key)).0;
        set * TOMBSTONE_WAYS..(set + 1) * TOMBSTONE_WAYS
    }

    /// The slot of the tombstone of `key` (hash `h`), if it has one.
    fn find(&self, key: &ConnKey, h: u64) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let (set, fp) = Self::place(h);
        self.find_in(set, fp, key)
    }

    fn find_in(&self, set: usize, fp: u16, key: &ConnKey) -> Option<usize> {
        let fps = &self.sets.get(set)?.fps;
        (0..TOMBSTONE_WAYS)
            .map(|w| set * TOMBSTONE_WAYS + w)
            .zip(fps)
            .find(|(i, f)| **f == fp && self.slots.get(*i).is_some_and(|t| t.key == *key))
            .map(|(i, _)| i)
    }

    /// Records the tombstone of `key` (hash `h`).
    fn record(&mut self, key: ConnKey, h: u64, generation: u32, owner: u16) {
        if self.slots.is_empty() {
            self.slots = vec![Tombstone::default(); TOMBSTONES];
            self.sets = vec![TombstoneSet::default(); TOMBSTONES / TOMBSTONE_WAYS];
        }
        self.stamp = self.stamp.wrapping_add(1);
        let (set, fp) = Self::place(h);
        let way = match self.find_in(set, fp, &key) {
            Some(i) => i % TOMBSTONE_WAYS,
            None => {
                let (w, free) = self.free_or_oldest(set);
                if free {
                    self.len += 1;
                }
                w
            }
        };
        self.slots[set * TOMBSTONE_WAYS + way] = Tombstone { key, generation, owner };
        let s = &mut self.sets[set];
        s.fps[way] = fp;
        s.stamps[way] = self.stamp;
    }

    /// The way of `set` a new tombstone takes: a free one (true), or the
    /// set's oldest.
    fn free_or_oldest(&self, set: usize) -> (usize, bool) {
        let Some(s) = self.sets.get(set) else { return (0, true) };
        match (0..TOMBSTONE_WAYS).find(|w| s.fps[*w] == 0) {
            Some(w) => (w, true),
            None => {
                let now = self.stamp;
                ((0..TOMBSTONE_WAYS).max_by_key(|w| now.wrapping_sub(s.stamps[*w])).unwrap_or(0), false)
            }
        }
    }

    /// [`Tombstones::record`] for these tests, hashing `key` with seed 0.
    #[cfg(test)]
    fn record_key(&mut self, key: ConnKey, generation: u32, owner: u16) {
        self.record(key, TableHash::default().hash(&key), generation, owner);
    }

    /// [`Tombstones::find`] for these tests, hashing `key` with seed 0.
    #[cfg(test)]
    fn find_key(&self, key: &ConnKey) -> Option<usize> {
        self.find(key, TableHash::default().hash(key))
    }

    #[cfg(test)]
    fn forget(&mut self, key: &ConnKey) {
        if let Some(i) = self.find_key(key) {
            self.forget_at(i, key);
        }
    }

    /// Frees slot `i`, found by [`Tombstones::find`] for `key`, if it
    /// still holds `key`'s tombstone (a record in between may have given
    /// the slot to another key, whose tombstone must stay).
    fn forget_at(&mut self, i: usize, key: &ConnKey) {
        if self.slots.get(i).is_none_or(|t| t.key != *key) {
            return;
        }
        if let Some(fp) = self.sets.get_mut(i / TOMBSTONE_WAYS).map(|s| &mut s.fps[i % TOMBSTONE_WAYS]) {
            if *fp != 0 {
                *fp = 0;
                self.len -= 1;
            }
        }
    }

    /// Issues the read of the slot a tombstone of the key whose hash is `h`
    /// would be written to (its own, a free one or the set's oldest), as
    /// [`Tombstones::record`] chooses it, so that the delete's write of the
    /// key does not wait for that line. It reads the set: the peer pipeline
    /// calls it four updates after the set's prefetch; a command burst
    /// calls it in its slot stage, right after the burst's set prefetches,
    /// so there its read may wait for the set's line (measured a gain all
    /// the same: cluster.md, "Conflicts").
    #[inline]
    fn prefetch_victim(&self, h: u64) {
        let (set, fp) = Self::place(h);
        let Some(s) = self.sets.get(set) else { return };
        // A fingerprint match is most likely the key's own tombstone.
        let way = (0..TOMBSTONE_WAYS).find(|w| s.fps[*w] == fp).unwrap_or_else(|| self.free_or_oldest(set).0);
        if let Some(t) = self.slots.get(set * TOMBSTONE_WAYS + way) {
            crate::sys::prefetch(t);
        }
    }

    /// Issues the read of the set of the key whose hash is `h`, so that a
    /// lookup a few commands later hits: the pipelines call it beside the
    /// table's bucket reads.
    #[inline]
    fn prefetch(&self, h: u64) {
        if self.len == 0 {
            return;
        }
        if let Some(s) = self.sets.get(Self::place(h).0) {
            crate::sys::prefetch(s);
        }
    }

    #[cfg(test)]
    fn generation(&self, key: &ConnKey) -> Option<u32> {
        self.find_key(key).map(|i| self.slots[i].generation)
    }

    /// Live tombstones.
    fn len(&self) -> usize {
        self.len
    }

    /// Every live tombstone: (key, generation, owner).
    fn entries(&self) -> Vec<(ConnKey, u32, u16)> {
        let fps = self.sets.iter().flat_map(|s| s.fps);
        self.slots.iter().zip(fps).filter(|(_, fp)| *fp != 0).map(|(t, _)| (t.key, t.generation, t.owner)).collect()
    }

    /// Whether the tombstone at `at` (the one of `u`'s key, if any) wins
    /// over `u`.
    fn beats_at(&self, at: Option<usize>, u: &DeltaUpdate) -> Option<u32> {
        let t = self.slots[at?];
        let state = ConnState { generation: t.generation.into(), ..Default::default() };
        let tomb = DeltaUpdate { op: DeltaOp::Delete, owner: t.owner, key: u.key, state, nat: Nat::default() };
        (precedence(u, &tomb) != std::cmp::Ordering::Greater).then_some(t.generation)
    }
}

/// Internal state of the design.
pub struct Core {
    shared: Arc<Shared>,
    table: CuckooTable,
    tlb: Tlb,
    enabled: bool,
    fatal: bool,
    last_control: u32,
    cmd: Option<CmdRing>,
    cpl: Option<ProducerRing>,
    evt: Option<ProducerRing>,
    evt_seq: u32,
    evt_lost: u32,
    irq_sink: Option<Arc<dyn InterruptSink>>,
    pending_cpl: u32,
    first_pending_ns: u64,
    aging_cursor: usize,
    last_aging_ns: u64,
    counters: [u64; NCOUNTERS],
    counters_dirty: bool,
    /// Device time sampled by housekeeping (and after a runner's sleep:
    /// [`Core::sample_clock`]); commands use it for expiry so the command
    /// path never reads the clock (as hardware stamps with a free-running
    /// counter register, not a call).
    now_ns: u64,
    descs: [CommandDescriptor; FETCH_BURST + 1],
    /// Completions of the burst being executed (word 0, result).
    cpls: [(u64, u64); FETCH_BURST],
    /// This member's id in the cluster (0 without a sync unit).
    member: u16,
    /// Delta Sync, when the device is part of a cluster.
    sync: Option<SyncUnit>,
    /// A command burst sent sync frames since the poller last asked (see
    /// [`Core::take_sync_sent`]).
    sync_sent: bool,
    /// Scratch for the sync unit's events.
    sync_events: Vec<ReceiverEvent>,
    /// Tombstones a SYNC_RECORDS walk emits after the table (copied when
    /// the walk reaches them).
    walk_tombs: Option<Vec<(ConnKey, u32, u16)>>,
    /// Peer updates held while `Control::SYNC_HOLD` is set, in arrival order.
    held: std::collections::VecDeque<DeltaUpdate>,
    /// `Control::SYNC_HOLD` as last seen.
    hold: bool,
    /// Digest of the entries marked for sync.
    digest: SyncDigest,
    /// Recently deleted synced keys (a bounded tombstone table).
    tombstones: Tombstones,
    /// Table placements of the burst's commands, by burst index.
    placed: [Option<Placement>; FETCH_BURST + 1],
    /// LOAD's staging: the records read from the host, their placements
    /// and the statuses to write back (kept to reuse their memory).
    load_records: Vec<DeltaRecord>,
    load_placed: Vec<Option<Placement>>,
    load_statuses: Vec<LoadStatus>,
    /// Table placements of the peer updates being applied.
    peer_placed: Vec<Option<Placement>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("enabled", &self.enabled)
            .field("fatal", &self.fatal)
            .field("entries", &self.table.len())
            .finish_non_exhaustive()
    }
}

/// What one command did: status, result word, traffic.
struct Outcome {
    status: CplStatus,
    result: u64,
}

impl Outcome {
    fn ok(result: u64) -> Self {
        Outcome { status: CplStatus::Success, result }
    }
    fn err(status: CplStatus) -> Self {
        Outcome { status, result: 0 }
    }
}

impl Core {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let tlb = shared.iommu.tlb();
        Core {
            // Card memory is sized (and first touched) by the device itself
            // at enable, on the thread that runs the design, not here on
            // whichever thread built the model.
            table: CuckooTable::new(1, TableHash::default()),
            tlb,
            enabled: false,
            fatal: false,
            last_control: 0,
            cmd: None,
            cpl: None,
            evt: None,
            evt_seq: 0,
            evt_lost: 0,
            irq_sink: None,
            pending_cpl: 0,
            first_pending_ns: 0,
            aging_cursor: 0,
            last_aging_ns: 0,
            counters: [0; NCOUNTERS],
            counters_dirty: false,
            now_ns: 0,
            descs: [CommandDescriptor::zeroed(); FETCH_BURST + 1],
            cpls: [(0, 0); FETCH_BURST],
            placed: [None; FETCH_BURST + 1],
            load_records: Vec::new(),
            load_placed: Vec::new(),
            load_statuses: Vec::new(),
            peer_placed: Vec::new(),
            member: 0,
            sync: None,
            sync_sent: false,
            sync_events: Vec::new(),
            held: std::collections::VecDeque::new(),
            hold: false,
            digest: SyncDigest::default(),
            walk_tombs: None,
            tombstones: Tombstones::default(),
            shared,
        }
    }

    /// The table (for tests and reports).
    pub fn table(&self) -> &CuckooTable {
        &self.table
    }

    /// The (generation, owner) of `key`'s tombstone, if one is kept (for
    /// tests and the simulator's key trace).
    pub fn tombstone(&self, key: &ConnKey) -> Option<(u32, u16)> {
        let t = &self.tombstones;
        t.find(key, self.table.hash_of(key)).map(|i| (t.slots[i].generation, t.slots[i].owner))
    }

    fn count(&mut self, c: Counter, n: u64) {
        self.counters[c as usize] += n;
        self.counters_dirty = true;
    }

    /// Publishes the entry count and the sync digest (count and sum) at
    /// once, outside housekeeping: the host checks its copy against them
    /// right after the completions or events of the change that moved them,
    /// so they must never lag those.
    fn publish_table(&mut self) {
        let published = &self.shared.published;
        published.table_count.store(self.table.len() as u32, Ordering::Release);
        for (c, v) in [(Counter::SyncEntries, self.digest.count), (Counter::SyncDigest, self.digest.sum)] {
            if self.counters[c as usize] != v {
                self.counters[c as usize] = v;
                published.counters[c as usize].store(v, Ordering::Release);
            }
        }
    }

    fn publish(&mut self) {
        self.publish_table();
        if self.counters_dirty {
            for (a, v) in self.shared.published.counters.iter().zip(self.counters.iter()) {
                a.store(*v, Ordering::Release);
            }
            self.shared.published.table_count.store(self.table.len() as u32, Ordering::Release);
            self.counters_dirty = false;
        }
    }

    /// Runs the design for one poll: control changes, then every posted
    /// command. Returns whether anything was done. Cheap when idle: three
    /// loads (CONTROL, the inline window's word 0, CMD_DOORBELL).
    #[inline]
    pub fn poll(&mut self) -> bool {
        let ctl = self.shared.reg(regs::CONTROL);
        if ctl != self.last_control {
            self.apply_control(ctl);
            return true;
        }
        if !self.enabled {
            return false;
        }
        let Some(c) = &mut self.cmd else { return false };
        let mut rung = false;
        // Ring sizes are powers of two (checked at enable): masks, not divisions.
        let ahead = |x: u32, c: &CmdRing| x.wrapping_sub(c.head) & (c.size - 1);
        // The register first, then the window: the host rings in order, so
        // an inline doorbell written before this register value is visible
        // to the window load that follows, and is judged in this same poll
        // (it can never arrive "late" and move the tail back).
        let db = self.shared.doorbell.0.load(Ordering::Acquire);
        let w0 = self.shared.inline_word0();
        if db != c.last_db {
            c.last_db = db;
            rung = true;
            let tail = db as u32;
            if tail >= c.size {
                self.counters[Counter::BadDoorbells as usize] += 1;
            } else {
                self.counters[Counter::Doorbells as usize] += 1;
                if ahead(tail, c) >= ahead(c.tail, c) {
                    c.tail = tail;
                }
            }
        }
        if w0 >> 48 != c.last_inline_seq && w0 & INLINE_BUSY == 0 {
            c.last_inline_seq = w0 >> 48;
            rung = true;
            let tail = ((w0 >> 32) & 0xFFFF) as u32;
            if tail >= c.size {
                self.counters[Counter::BadDoorbells as usize] += 1;
            } else {
                self.counters[Counter::Doorbells as usize] += 1;
                // A doorbell no newer than what the device already has
                // (say, the register said more) posts nothing.
                if ahead(tail, c) > ahead(c.tail, c) {
                    // The window's copy of the batch's first descriptor:
                    // used only if read whole, from this same write, and
                    // naming the first slot this doorbell posts (the tail
                    // so far; if earlier doorbells were overwritten before
                    // the device saw them, the slot is fetched by DMA).
                    c.inline = match self.shared.read_inline() {
                        Some(mut words) if words[0] == w0 => {
                            // aux (word 0's upper half) carried the doorbell:
                            // cleared in the word, not with a 4-byte store
                            // into a copy that is then moved in 16-byte
                            // pieces (each would wait for that store).
                            words[0] &= 0xFFFF_FFFF;
                            let tag = (words[0] >> 16) as u16;
                            (u32::from(tag) == c.tail).then(|| zerocopy::transmute!(words))
                        }
                        _ => None,
                    };
                    if c.inline.is_none() {
                        self.counters[Counter::InlineMisses as usize] += 1;
                    }
                    c.tail = tail;
                }
            }
        }
        if rung {
            self.counters_dirty = true;
        }
        if c.tail == c.head {
            // Nothing more to do: a partial sync frame may leave now.
            if let Some(unit) = self.sync.as_mut().filter(|_| self.enabled) {
                if unit.idle_flush() {
                    return true;
                }
            }
            if !rung && c.last_inline_seq == 0 {
                // Idle, with register doorbells: hint the next slot's line
                // toward the device so its fetch overlaps the doorbell's
                // (a prefetch: no access the host's writes could race).
                c.region.prefetch(c.head as usize * DESC_SIZE);
            }
            return rung;
        }
        let tail = c.tail;
        self.process_commands(tail) || rung
    }

    /// The sync port's fast path: sends what is due, takes what arrived and
    /// applies it (a polling runner calls it between idle polls). No-op
    /// without a sync unit or while disabled.
    pub fn sync_fast(&mut self) -> bool {
        self.sync_fast_frames(crate::sync_unit::RX_BUDGET)
    }

    /// Whether a command burst sent sync frames since the last call: a
    /// poller serving several devices then lets the others take their
    /// turn (and read their ports) at once, as peers' cards would receive
    /// the frames beside their own pipelines, instead of after the rest of
    /// this device's turn.
    pub fn take_sync_sent(&mut self) -> bool {
        std::mem::take(&mut self.sync_sent)
    }

    /// [`Core::sync_fast`] that stops after `frames` frames with updates: a
    /// runner that takes one, then does its other work (doorbells, other
    /// devices) before it looks again, does not hold a delivered update's
    /// successor behind a read of the port that finds nothing (a system
    /// call on UDP).
    pub fn sync_fast_frames(&mut self, frames: usize) -> bool {
        if !self.enabled || self.sync.is_none() {
            return false;
        }
        self.now_ns = self.shared.clock.now_ns();
        // Counters follow at the next housekeeping, off the delta path.
        self.pump_sync(frames)
    }

    /// Reads the clock into the device time that commands stamp expiries
    /// with. Housekeeping does so on every pass; a runner that polls after
    /// a sleep, or a host thread running the design in its stead, calls
    /// this first, or a command would stamp its entry with the time of the
    /// last pass (an entry then aged out at once if that was longer ago
    /// than its timeout).
    pub fn sample_clock(&mut self) {
        self.now_ns = self.shared.clock.now_ns();
    }

    /// Time-driven work: interrupt holdoff expiry and aging. Called by the
    /// runners less often than [`Core::poll`].
    pub fn housekeeping(&mut self) -> bool {
        if !self.enabled {
            return false;
        }
        let now = self.shared.clock.now_ns();
        self.now_ns = now;
        let mut did = false;
        if self.shared.faults.active() {
            did |= self.housekeeping_faults();
        }
        let usec = self.shared.reg(regs::IRQ_COALESCE_USEC) as u64;
        if self.pending_cpl > 0 && usec > 0 && now.saturating_sub(self.first_pending_ns) >= usec * 1000 {
            self.raise(IrqCause::COMPLETION, regs::VECTOR_COMPLETION);
            did = true;
        }
        if self.evt_lost > 0 {
            did |= self.flush_overflow_event();
        }
        did |= self.age(now);
        did |= self.pump_sync(crate::sync_unit::RX_BUDGET);
        self.refresh_sync_counters();
        // Counters are published here, off the command path: they lag the
        // rings by at most one housekeeping period (POLL_BATCH polls).
        self.publish();
        did
    }

    fn apply_control(&mut self, ctl: u32) {
        let c = Control::from_bits_truncate(ctl);
        if c.contains(Control::RESET) {
            self.reset();
            return;
        }
        let was = Control::from_bits_truncate(self.last_control);
        self.last_control = ctl;
        if c.contains(Control::ENABLE) && !was.contains(Control::ENABLE) && self.fatal {
            // FATAL is cleared only by RESET: the state it left (a batch
            // stopped halfway, CMD_HEAD behind commands already applied)
            // must not run again.
            tracing::warn!("ENABLE refused: the device is FATAL until RESET");
        } else if c.contains(Control::ENABLE) && !was.contains(Control::ENABLE) {
            match self.enable() {
                Ok(()) => {
                    self.enabled = true;
                    self.shared.set_status(Status::ENABLED, Status::empty());
                }
                Err(why) => self.go_fatal(why),
            }
        } else if !c.contains(Control::ENABLE) && was.contains(Control::ENABLE) {
            self.enabled = false;
            self.shared.set_status(Status::empty(), Status::ENABLED);
        }
        self.irq_sink = if c.contains(Control::IRQ_ENABLE) { self.shared.interrupt_sink() } else { None };
        let hold = c.contains(Control::SYNC_HOLD);
        // Clearing the bit starts the drain (see `drain_held`).
        self.hold = hold;
        self.mark_joining();
    }

    fn reset(&mut self) {
        tracing::debug!("device reset");
        self.shared.faults.on_reset();
        // STATUS reads 0 (not READY) until the reset is complete; READY is
        // the last thing set, so a host that waits for it never has its
        // configuration writes clobbered by the reset still in progress.
        self.shared.set(regs::STATUS, 0);
        self.shared.power_on_registers();
        // Emptied now; sized to TABLE_CAPACITY at enable.
        self.table = CuckooTable::new(1, TableHash::default());
        self.tombstones = Tombstones::default();
        self.held = std::collections::VecDeque::new();
        self.hold = false;
        self.mark_joining();
        self.walk_tombs = None;
        self.digest = SyncDigest::default();
        self.enabled = false;
        self.fatal = false;
        self.last_control = 0;
        self.cmd = None;
        self.cpl = None;
        self.evt = None;
        self.evt_seq = 0;
        self.evt_lost = 0;
        self.irq_sink = None;
        self.pending_cpl = 0;
        self.aging_cursor = 0;
        self.last_aging_ns = self.shared.clock.now_ns();
        self.counters = [0; NCOUNTERS];
        self.counters_dirty = true;
        self.publish();
        // RESET self-clears, then READY.
        self.shared.set(regs::CONTROL, 0);
        self.shared.set(regs::STATUS, Status::READY.bits());
    }

    fn go_fatal(&mut self, why: String) {
        tracing::warn!("device fatal: {why}");
        self.fatal = true;
        self.enabled = false;
        self.shared.set_status(Status::FATAL, Status::ENABLED);
        self.raise(IrqCause::ERROR, regs::VECTOR_EVENT);
    }

    fn ring_region(
        &mut self,
        lo: u32,
        hi: u32,
        log2: u32,
        entry: usize,
        name: &str,
    ) -> Result<(DmaRegion, u32), String> {
        let base = (self.shared.reg(hi) as u64) << 32 | self.shared.reg(lo) as u64;
        let log2 = self.shared.reg(log2);
        if !(regs::MIN_LOG2_RING..=regs::MAX_LOG2_RING).contains(&log2) {
            return Err(format!(
                "{name} ring log2 size {log2} outside {}..={}",
                regs::MIN_LOG2_RING,
                regs::MAX_LOG2_RING
            ));
        }
        if base % 64 != 0 {
            return Err(format!("{name} ring base {base:#x} is not 64-byte aligned"));
        }
        let size = 1u32 << log2;
        let region = self.tlb.translate(base, size as usize * entry).map_err(|e| format!("{name} ring: {e}"))?;
        Ok((region, size))
    }

    fn enable(&mut self) -> Result<(), String> {
        let cap_req = self.shared.reg(regs::TABLE_CAPACITY);
        let cap = cap_req.clamp(1, self.shared.cfg.max_capacity);
        self.shared.set(regs::TABLE_CAPACITY, cap);
        // A device without the capability keeps hashing with seed 0.
        let hash = if self.shared.cfg.capabilities.contains(Capabilities::TABLE_HASH_SEED) {
            TableHash::new(TableHash::seed_from_registers(regs::TABLE_HASH_SEED.map(|r| self.shared.reg(r))))
        } else {
            TableHash::default()
        };
        if hash != *self.table.hash() {
            // Tombstones placed by the old hash could no longer be found.
            self.tombstones = Tombstones::default();
        }
        if cap as usize != self.table.capacity() || hash != *self.table.hash() {
            // A new, empty table: nothing of the old one is summed, walked
            // or left to sweep.
            self.table = CuckooTable::new(cap as usize, hash);
            self.digest = SyncDigest::default();
            self.walk_tombs = None;
            self.aging_cursor = 0;
        }
        let (cr, cs) =
            self.ring_region(regs::CMD_BASE_LO, regs::CMD_BASE_HI, regs::CMD_LOG2_SIZE, DESC_SIZE, "command")?;
        let (pr, ps) =
            self.ring_region(regs::CPL_BASE_LO, regs::CPL_BASE_HI, regs::CPL_LOG2_SIZE, CPL_SIZE, "completion")?;
        let evt = if self.shared.reg(regs::EVT_LOG2_SIZE) != 0 {
            let (er, es) =
                self.ring_region(regs::EVT_BASE_LO, regs::EVT_BASE_HI, regs::EVT_LOG2_SIZE, EVT_SIZE, "event")?;
            Some(ProducerRing { region: er, size: es, tail: 0, phase: true, head_cache: 0 })
        } else {
            None
        };
        let head = self.shared.cmd_head.0.load(Ordering::Acquire) % cs;
        self.cmd = Some(CmdRing {
            region: cr,
            size: cs,
            head,
            tail: head,
            last_db: self.shared.doorbell.0.load(Ordering::Acquire),
            last_inline_seq: self.shared.inline_word0() >> 48,
            inline: None,
        });
        self.cpl = Some(ProducerRing { region: pr, size: ps, tail: 0, phase: true, head_cache: 0 });
        self.evt = evt;
        self.now_ns = self.shared.clock.now_ns();
        self.last_aging_ns = self.now_ns;
        Ok(())
    }

    /// Re-translates the rings if the host changed IOMMU mappings; a ring
    /// that is no longer mapped makes the device FATAL.
    fn revalidate_rings(&mut self) -> bool {
        if !self.tlb.is_stale() {
            return true;
        }
        self.tlb.refresh();
        let check = |r: &DmaRegion, tlb: &mut Tlb| tlb.translate(r.iova(), r.len()).is_ok();
        let ok = self.cmd.as_ref().is_some_and(|c| check(&c.region, &mut self.tlb))
            && self.cpl.as_ref().is_some_and(|c| check(&c.region, &mut self.tlb))
            && self.evt.as_ref().is_none_or(|c| check(&c.region, &mut self.tlb));
        if !ok {
            self.go_fatal("a ring was unmapped from the IOMMU while enabled".into());
        }
        ok
    }

    /// Fetches and executes the posted commands up to `tail`; returns
    /// whether anything was done (false while an injected stall holds).
    fn process_commands(&mut self, tail: u32) -> bool {
        // The one check of the fault injector on this path: a relaxed load
        // per batch; per-command checks below only test this local.
        let faults = self.shared.faults.active();
        if faults && self.shared.faults.batch_stalled(self.shared.clock.now_ns()) {
            return false;
        }
        if !self.revalidate_rings() {
            return true;
        }
        let (size, mut head) = match &self.cmd {
            Some(c) => (c.size, c.head),
            None => return true,
        };
        let now_ms = self.now_ns / 1_000_000;
        let mut completed = 0u32;
        let mut irq_now = false;
        let mut cycles = 0u64;
        let mut ncpl = 0usize;
        // An injected fault that ends the run: reset, or FATAL.
        let mut abort: Option<Fault> = None;
        while head != tail && abort.is_none() {
            let posted = tail.wrapping_sub(head) & (size - 1);
            let space = match &mut self.cpl {
                Some(p) => p.space(&self.shared.cpl_head),
                None => 0,
            };
            if space == 0 {
                break; // back-pressure: the host has not consumed completions
            }
            // Fetch a burst (one more slot than we execute, for a chained tail).
            let want = (posted as usize).min(FETCH_BURST).min(space as usize);
            let fetch = (posted as usize).min(want + 1);
            match self.fetch(head, fetch) {
                Ok(c) => cycles += c,
                Err(e) => {
                    self.go_fatal(format!("command ring fetch: {e}"));
                    return true;
                }
            }
            self.prefetch(fetch);
            let mut i = 0;
            let mut invert_phase = None;
            while i < want {
                // The header fields, copied; the body is read in place by
                // decode (a copy of the whole descriptor just before made
                // decode's wide unaligned loads wait for the copy's stores
                // to drain: no store-to-load forwarding across them).
                let (opcode, flags, tag) = {
                    let d = &self.descs[i];
                    (d.opcode, d.flags, d.tag.get())
                };
                let fault = if faults { self.shared.faults.command_fault() } else { None };
                let response_dma = |op: u8| {
                    [Opcode::Lookup, Opcode::Snapshot, Opcode::Load, Opcode::SyncPositions, Opcode::SyncAlign]
                        .iter()
                        .any(|o| *o as u8 == op)
                };
                match fault {
                    Some(Fault::ResetMidBatch { .. }) => abort = fault,
                    Some(Fault::DmaError) if !response_dma(opcode) => abort = fault,
                    _ => {}
                }
                if abort.is_some() {
                    break;
                }
                let chained = flags & nicsync_fwif::cmd::DescFlags::CHAIN.bits() != 0;
                let has_ext = chained && i + 1 < fetch && self.descs[i + 1].opcode == Opcode::Ext as u8;
                let slots = if has_ext { 2 } else { 1 };
                self.counters[Counter::CommandsFetched as usize] += slots as u64;
                // Matched by reference: the decoded command is read where
                // decode wrote it, not copied first.
                let decoded = self.descs[i].decode(has_ext.then(|| &self.descs[i + 1]));
                let (outcome, traffic) = match &decoded {
                    // An injected failure of the response write: the
                    // command is aborted before it writes anything.
                    Ok(_) if fault == Some(Fault::DmaError) => (self.dma_error(), Traffic::default()),
                    Ok(cmd) => self.execute(cmd, self.placed[i], now_ms),
                    Err(e) => {
                        self.counters[Counter::CommandsMalformed as usize] += 1;
                        let st = match *e {
                            DecodeError::UnknownOpcode(_) => CplStatus::InvalidOpcode,
                            _ => CplStatus::Malformed,
                        };
                        (Outcome::err(st), Traffic::default())
                    }
                };
                cycles += self.shared.cfg.cost.command_cycles(traffic.bucket_reads, traffic.slot_writes);
                self.counters[Counter::CuckooKicks as usize] += traffic.kicks as u64;
                if outcome.status != CplStatus::Success {
                    self.counters[Counter::CommandErrors as usize] += 1;
                }
                head = (head + slots) & (size - 1);
                i += slots as usize;
                let mut word0 =
                    tag as u64 | (outcome.status as u64) << 16 | (opcode as u64) << 24 | (head as u64) << 32;
                irq_now |= flags & nicsync_fwif::cmd::DescFlags::IRQ_NOW.bits() != 0;
                match fault {
                    Some(Fault::DropCompletion) => continue,
                    Some(Fault::CorruptCompletionTag) => word0 ^= 1,
                    Some(Fault::CorruptCompletionPhase) => invert_phase = Some(ncpl),
                    _ => {}
                }
                self.cpls[ncpl] = (word0, outcome.result);
                ncpl += 1;
                completed += 1;
            }
            // The table's entry count is visible before the completions that
            // changed it. Completions of a burst are written together
            // (bodies, then the phase words), as a design would coalesce
            // posted writes; the host sees each entry only once its body is
            // in place.
            self.publish_table();
            let pushed = match &mut self.cpl {
                Some(p) => p.push_burst(&mut self.cpls[..ncpl], invert_phase),
                None => Ok(()),
            };
            ncpl = 0;
            if let Err(e) = pushed {
                self.go_fatal(format!("completion ring write: {e}"));
                return true;
            }
            // The frames this burst's updates completed leave after its
            // completions (at most one burst of them is queued).
            if let Some(unit) = &mut self.sync {
                self.sync_sent |= unit.transmit_submitted();
            }
        }
        if let Some(c) = &mut self.cmd {
            c.head = head;
        }
        self.shared.cmd_head.0.store(head, Ordering::Release);
        self.counters[Counter::CompletionsWritten as usize] += completed as u64;
        self.counters[Counter::ModelCycles as usize] += cycles;
        self.counters_dirty = true;
        match abort {
            Some(Fault::ResetMidBatch { .. }) => {
                tracing::warn!("injected fault: device reset in the middle of a batch");
                self.reset();
                return true;
            }
            Some(_) => {
                self.counters[Counter::DmaErrors as usize] += 1;
                self.go_fatal("command ring fetch: injected DMA fault".into());
                return true;
            }
            None => {}
        }
        if completed > 0 {
            if self.pending_cpl == 0 {
                self.first_pending_ns = self.now_ns;
            }
            self.pending_cpl = self.pending_cpl.saturating_add(completed);
            let threshold = self.shared.reg(regs::IRQ_COALESCE_COUNT).max(1);
            if irq_now || self.pending_cpl >= threshold {
                self.raise(IrqCause::COMPLETION, regs::VECTOR_COMPLETION);
            }
        }
        true
    }

    /// Injected faults that strike outside the command path: a spurious
    /// interrupt, a lost table entry.
    fn housekeeping_faults(&mut self) -> bool {
        let mut did = false;
        if let Some(sink) = self.irq_sink.clone() {
            if self.shared.faults.housekeeping_fault(FaultKind::SpuriousInterrupt) {
                // No cause bit in IRQ_STATUS and not counted: a glitch.
                sink.raise(regs::VECTOR_COMPLETION);
                did = true;
            }
        }
        if !self.table.is_empty() && self.shared.faults.housekeeping_fault(FaultKind::LoseEntry) {
            did |= self.lose_entry();
        }
        did
    }

    /// Removes one entry chosen by the injector's generator, as a memory
    /// fault would: no event, nothing sent to the peers. The entry count
    /// and the sync digest follow (they are kept beside the table).
    fn lose_entry(&mut self) -> bool {
        let end = self.table.cursor_end();
        let start = self.shared.faults.below(end as u64) as usize;
        let victim = (0..end).map(|k| (start + k) % end).find_map(|pos| self.table.at_cursor(pos).map(|s| s.key));
        let mut t = Traffic::default();
        let Some(loc) = victim.and_then(|k| self.table.find(&k, &mut t)) else { return false };
        match self.table.remove(loc, &mut t) {
            Some(gone) => {
                tracing::warn!(key = %gone.key, "injected fault: table entry lost");
                self.digest.sub(&gone);
                self.counters_dirty = true;
                true
            }
            None => false,
        }
    }

    fn fetch(&mut self, head: u32, n: usize) -> Result<u64, crate::dma::DmaFault> {
        let Some(c) = &mut self.cmd else { return Ok(0) };
        let mut from = 0;
        // The inline doorbell's copy stands in for the DMA read of its slot
        // when the burst starts there; any other copy is stale once the
        // burst covers its slot.
        if let Some(d) = c.inline.take() {
            let slot = d.tag.get() as u32;
            if slot == head {
                self.descs[0] = d;
                from = 1;
                self.counters[Counter::InlineDoorbells as usize] += 1;
            } else if slot.wrapping_sub(head) & (c.size - 1) >= n as u32 {
                c.inline = Some(d);
            } else {
                self.counters[Counter::InlineMisses as usize] += 1;
            }
        }
        // At most two contiguous DMA reads: up to the ring's end, then from
        // its start.
        let start = (head + from as u32) & (c.size - 1);
        let rest = n - from;
        let first = rest.min((c.size - start) as usize);
        // A burst that is all inline copy reads nothing.
        if first > 0 {
            c.region.read(start as usize * DESC_SIZE, self.descs[from..from + first].as_mut_bytes())?;
        }
        if first < rest {
            c.region.read(0, self.descs[from + first..n].as_mut_bytes())?;
        }
        Ok(self.shared.cfg.cost.fetch_cycles(rest as u32))
    }

    /// Hashes every table command of a fetched burst once, and for bursts
    /// issues their table reads before executing any, as a pipelined design
    /// overlaps its memory accesses.
    fn prefetch(&mut self, n: usize) {
        // Stage 0: hash every table command (arithmetic only).
        for (d, p) in self.descs[..n].iter().zip(self.placed.iter_mut()) {
            // INSERT, UPDATE, DELETE, LOOKUP and UPSERT bodies start with
            // the key; the placement is used only if the command decodes.
            *p = if (1..=4).contains(&d.opcode) || d.opcode == Opcode::Upsert as u8 {
                let body: nicsync_fwif::cmd::ConnBody = zerocopy::transmute!(d.body);
                Some(self.table.placement_of(&body.key))
            } else {
                None
            };
        }
        if n > 1 {
            // Stage 1: every bucket's fingerprints, in one tight loop so the
            // loads are in flight together; stage 2: the matching slots.
            for p in self.placed[..n].iter().flatten() {
                self.table.prefetch_buckets(*p);
            }
            // Tombstones are read only by the commands that may insert or
            // delete (an UPDATE or LOOKUP of an absent key reads none).
            // Without these reads (and the peer pipeline's) ahead, bench
            // sync's sustained churn ran 9 % slower (6 alternating pairs).
            let writes = [Opcode::Insert as u8, Opcode::Upsert as u8, Opcode::Delete as u8];
            for (d, p) in self.descs[..n].iter().zip(self.placed.iter()) {
                if let Some(p) = p.filter(|_| writes.contains(&d.opcode)) {
                    self.tombstones.prefetch(p.hash);
                }
            }
            for (d, p) in self.descs[..n].iter().zip(self.placed.iter()) {
                if let Some(p) = p {
                    self.table.prefetch_slots(*p);
                    if d.opcode == Opcode::Delete as u8 {
                        self.tombstones.prefetch_victim(p.hash);
                    }
                }
            }
        }
    }

    fn find(&self, key: &ConnKey, at: Option<Placement>, t: &mut Traffic) -> Option<crate::table::Location> {
        match at {
            Some(p) => self.table.find_at(key, p, t),
            None => self.table.find(key, t),
        }
    }

    fn expiry(now_ms: u64, st: &ConnState) -> u64 {
        match st.timeout_s.get() {
            0 => 0,
            t => now_ms + t as u64 * 1000,
        }
    }

    fn execute(&mut self, cmd: &Command, at: Option<Placement>, now_ms: u64) -> (Outcome, Traffic) {
        let mut t = Traffic::default();
        let out = match *cmd {
            Command::Nop => Outcome::ok(0),
            Command::Insert(ref op) => self.insert(op, at, now_ms, &mut t),
            Command::Update(ref op) => self.update(op, at, now_ms, false, &mut t),
            Command::Upsert(ref op) => match op.replica_owner {
                Some(owner) => self.replica(op, owner, at),
                None => self.update(op, at, now_ms, true, &mut t),
            },
            Command::Delete { ref key, replica: Some((owner, generation)) } => {
                let state = ConnState { generation: generation.into(), ..Default::default() };
                let u = DeltaUpdate { op: DeltaOp::Delete, owner, key: *key, state, nat: Nat::default() };
                // SUCCESS answers the generation of the delete, as for a
                // local DELETE: here the owner's.
                match self.apply_change(&u, at) {
                    Applied::Done | Applied::Nothing => Outcome::ok(generation as u64),
                    Applied::Superseded(g) => Outcome { status: CplStatus::Stale, result: g as u64 },
                    Applied::Full => Outcome::err(CplStatus::Internal),
                }
            }
            Command::Delete { ref key, replica: None } => match self.find(key, at, &mut t) {
                Some(loc) => {
                    let mut generation = 0;
                    if let Some(gone) = self.table.remove(loc, &mut t) {
                        self.digest.sub(&gone);
                        generation = self.delete_generation(&gone);
                        self.sync_local(DeltaOp::Delete, &gone, false, at);
                    }
                    Outcome::ok(generation as u64)
                }
                None => Outcome::err(CplStatus::NotFound),
            },
            Command::Lookup { ref key, resp_addr } => match self.find(key, at, &mut t) {
                Some(loc) => match self.table.get(loc).copied() {
                    Some(s) => self.write_records(resp_addr, &[record(&s, now_ms)]),
                    None => Outcome::err(CplStatus::Internal),
                },
                None => Outcome::err(CplStatus::NotFound),
            },
            Command::Snapshot { buf_addr, buf_len, cursor, sync_records } => {
                self.snapshot(buf_addr, buf_len, cursor, sync_records, now_ms, &mut t)
            }
            Command::Flush => {
                // Everything goes, tombstones too: what was deleted before
                // is forgotten with what was present.
                let n = self.table.len();
                self.table.clear();
                self.tombstones = Tombstones::default();
                self.digest = SyncDigest::default();
                Outcome::ok(n as u64)
            }
            Command::Load { buf_addr, status_addr, count } => self.load(buf_addr, status_addr, count, &mut t),
            Command::SyncPositions { buf_addr, entries } => self.sync_positions(buf_addr, entries),
            Command::SyncAlign { buf_addr, entries } => self.sync_align(buf_addr, entries),
        };
        (out, t)
    }

    /// The generation of a change this device numbers itself after one at
    /// `generation`: one above, raised to the floor.
    #[inline]
    fn next_generation(generation: u32, floor: u32) -> u32 {
        generation.wrapping_add(1).max(floor)
    }

    /// The generation of a local delete of `s` (the DELETE's `result`, and
    /// the tombstone's).
    fn delete_generation(&self, s: &Slot) -> u32 {
        Self::next_generation(s.state.generation.get(), self.shared.generation_floor())
    }

    fn insert(&mut self, op: &ConnOp, at: Option<Placement>, now_ms: u64, t: &mut Traffic) -> Outcome {
        let mut state = op.state;
        // The key's tombstone, looked up once: it numbers an automatic
        // generation and is freed by a successful insert.
        let tomb = self.tombstones.find(&op.key, key_hash(&self.table, &op.key, at));
        if op.auto_generation {
            // Above a tombstone of the same key, so the re-insert beats the
            // delete on every peer.
            let floor = self.shared.generation_floor();
            state.generation = tomb
                .map(|i| self.tombstones.slots[i].generation)
                .map_or(floor.max(1), |g| Self::next_generation(g, floor))
                .into();
        }
        let slot = Slot {
            key: op.key,
            state,
            nat: op.nat.unwrap_or_default(),
            expires_ms: Self::expiry(now_ms, &state),
            owner: self.member,
        };
        match self.table.insert_at(slot, at, t) {
            Ok(_) => {
                self.digest.add(&slot);
                if let Some(i) = tomb {
                    self.tombstones.forget_at(i, &op.key);
                }
                self.sync_local(DeltaOp::Upsert, &slot, false, at);
                Outcome::ok(state.generation.get() as u64)
            }
            Err(InsertError::Exists(_)) => Outcome::err(CplStatus::Exists),
            Err(InsertError::Full) => {
                self.counters[Counter::TableFull as usize] += 1;
                Outcome::err(CplStatus::TableFull)
            }
        }
    }

    fn update(&mut self, op: &ConnOp, at: Option<Placement>, now_ms: u64, upsert: bool, t: &mut Traffic) -> Outcome {
        let Some(loc) = self.find(&op.key, at, t) else {
            return if upsert { self.insert(op, at, now_ms, t) } else { Outcome::err(CplStatus::NotFound) };
        };
        let member = self.member;
        let clustered = self.sync.is_some();
        let Some(s) = self.table.get_mut(loc) else { return Outcome::err(CplStatus::Internal) };
        let stored = s.state.generation.get();
        let was_synced = s.state.conn_flags().contains(ConnFlags::SYNC);
        let mut state = op.state;
        if op.auto_generation {
            state.generation = Self::next_generation(stored, self.shared.generation_floor()).into();
        } else if state.generation.get() < stored
            // In a cluster, an equal generation wins only over a lower
            // owner id: a write that would lose on the peers is refused
            // here rather than applied locally alone.
            || (clustered && state.generation.get() == stored && member < s.owner)
        {
            return Outcome { status: CplStatus::Stale, result: stored as u64 };
        }
        // The digest terms are hashed in place, and the slot is copied out
        // only for the sync unit: a whole-slot reload right after these
        // narrower stores waited for them to drain.
        let before = SyncDigest::hash(s);
        s.state = state;
        if let Some(n) = op.nat {
            s.nat = n;
        }
        s.expires_ms = Self::expiry(now_ms, &state);
        s.owner = self.member;
        let after = SyncDigest::hash(s);
        // Copied only when sent (`then_some(*s)` copied it every time).
        let written = if was_synced || after.is_some() { Some(*s) } else { None };
        self.digest.replace(before, after);
        t.slot_writes += 1;
        if let Some(w) = written {
            self.sync_local(DeltaOp::Upsert, &w, was_synced, at);
        }
        Outcome::ok(state.generation.get() as u64)
    }

    /// Hands a local change of a connection marked for sync (before or
    /// after the change) to the sync unit (no-op without one). A delete is
    /// sent one generation above the entry it removes, so that it beats
    /// that entry on every peer whatever their owner ids, and is remembered
    /// as a tombstone here.
    /// `at`: the key's placement, if the caller has it (its hash indexes
    /// the tombstones).
    #[inline]
    fn sync_local(&mut self, op: DeltaOp, s: &Slot, was_synced: bool, at: Option<Placement>) {
        if self.sync.is_none() || !(was_synced || s.state.conn_flags().contains(ConnFlags::SYNC)) {
            return;
        }
        let mut state = s.state;
        let mut nat = s.nat;
        if op == DeltaOp::Delete {
            state.generation = self.delete_generation(s).into();
            // A delete carries no translation (the wire refuses one that
            // does: every peer would keep the connection).
            nat = Nat::default();
        }
        let Some(unit) = &mut self.sync else { return };
        let u = DeltaUpdate { op, owner: self.member, key: s.key, state, nat };
        unit.submit(&u, self.now_ns);
        if op == DeltaOp::Delete {
            self.tombstones.record(s.key, key_hash(&self.table, &s.key, at), state.generation.get(), self.member);
        }
    }

    /// Applies a change made by member `u.owner` under the conflict rule
    /// (generation, then owner, then DELETE over UPSERT). Deleted keys leave
    /// a tombstone, so a late, older upsert cannot bring them back.
    fn apply_change(&mut self, u: &DeltaUpdate, at: Option<Placement>) -> Applied {
        let mut t = Traffic::default();
        let now_ms = self.now_ns / 1_000_000;
        let found = self.find(&u.key, at, &mut t);
        // A key in the table has no tombstone (an insert frees it).
        let h = key_hash(&self.table, &u.key, at);
        let tomb = if found.is_none() { self.tombstones.find(&u.key, h) } else { None };
        let beaten = match found.and_then(|loc| self.table.get(loc).copied()) {
            Some(s) => {
                let stored =
                    DeltaUpdate { op: DeltaOp::Upsert, owner: s.owner, key: s.key, state: s.state, nat: s.nat };
                (precedence(u, &stored) != std::cmp::Ordering::Greater).then_some(s.state.generation.get())
            }
            None => self.tombstones.beats_at(tomb, u),
        };
        if let Some(generation) = beaten {
            return Applied::Superseded(generation);
        }
        match (u.op, found) {
            (DeltaOp::Delete, None) => {
                self.tombstones.record(u.key, h, u.state.generation.get(), u.owner);
                Applied::Nothing
            }
            (DeltaOp::Delete, Some(loc)) => {
                self.tombstones.record(u.key, h, u.state.generation.get(), u.owner);
                match self.table.remove(loc, &mut t) {
                    Some(gone) => {
                        self.digest.sub(&gone);
                        Applied::Done
                    }
                    None => Applied::Nothing,
                }
            }
            (DeltaOp::Upsert, Some(loc)) => match self.table.get_mut(loc) {
                Some(s) => {
                    let before = SyncDigest::hash(s);
                    s.state = u.state;
                    s.nat = u.nat;
                    s.owner = u.owner;
                    s.expires_ms = Self::expiry(now_ms, &u.state);
                    self.digest.replace(before, SyncDigest::hash(s));
                    Applied::Done
                }
                None => Applied::Nothing,
            },
            (DeltaOp::Upsert, None) => {
                let slot = Slot {
                    key: u.key,
                    state: u.state,
                    nat: u.nat,
                    expires_ms: Self::expiry(now_ms, &u.state),
                    owner: u.owner,
                };
                if self.table.insert_at(slot, at, &mut t).is_ok() {
                    self.digest.add(&slot);
                    if let Some(i) = tomb {
                        self.tombstones.forget_at(i, &u.key);
                    }
                    Applied::Done
                } else {
                    self.counters[Counter::TableFull as usize] += 1;
                    Applied::Full
                }
            }
        }
    }

    /// Applies a peer's change and tells the host by an event. A change
    /// applied here is never sent on again.
    fn apply_peer(&mut self, u: &DeltaUpdate, at: Option<Placement>) {
        let outcome = self.apply_change(u, at);
        let Some(unit) = &mut self.sync else { return };
        match outcome {
            Applied::Superseded(_) => unit.stats.superseded += 1,
            // Nothing to remove: the delete only left its tombstone. Told
            // all the same: the card may have lost the entry without a
            // word (a memory fault), and a host copy that still holds it
            // would bring it back in a rebuild, over the delete.
            Applied::Nothing => {
                if u.op == DeltaOp::Delete {
                    self.post_event(EventKind::SyncRemoved, &u.key, &u.state);
                }
            }
            Applied::Done => {
                unit.stats.applied += 1;
                let kind = if u.op == DeltaOp::Delete { EventKind::SyncRemoved } else { EventKind::SyncUpdated };
                self.post_event(kind, &u.key, &u.state);
            }
            Applied::Full => {
                // No room: this member's copy is now incomplete, which its
                // host must repair with a Full Sync.
                unit.stats.apply_failed += 1;
                let st = ConnState { generation: 1.into(), mark: (u.owner as u32).into(), ..Default::default() };
                self.post_event(EventKind::ResyncNeeded, &ConnKey::default(), &st);
            }
        }
    }

    /// A REPLICA upsert from the host (a Full Sync entry): the conflict
    /// rule as for a peer's change, but no event and no sync.
    fn replica(&mut self, op: &ConnOp, owner: u16, at: Option<Placement>) -> Outcome {
        let u =
            DeltaUpdate { op: DeltaOp::Upsert, owner, key: op.key, state: op.state, nat: op.nat.unwrap_or_default() };
        match self.apply_change(&u, at) {
            Applied::Done | Applied::Nothing => Outcome::ok(op.state.generation.get() as u64),
            Applied::Superseded(g) => Outcome { status: CplStatus::Stale, result: g as u64 },
            Applied::Full => Outcome::err(CplStatus::TableFull),
        }
    }

    /// Runs the sync unit: timers, received frames, transmissions; applies
    /// what peers sent and reports lost updates to the host.
    fn pump_sync(&mut self, frames: usize) -> bool {
        let mut did = false;
        // A frame's updates are applied before the port is read again (see
        // SyncUnit::pump), for at most `frames` frames that carried some,
        // and RX_BUDGET reads of the port in all.
        let mut reads = crate::sync_unit::RX_BUDGET;
        for _ in 0..frames.max(1) {
            let (applied, more) = self.pump_sync_once(&mut reads);
            did |= applied;
            if !more {
                break;
            }
        }
        let drained = self.drain_held();
        if did || drained {
            self.publish_table();
        }
        did || drained
    }

    /// One [`SyncUnit::pump`] and the updates it delivered: (whether any
    /// were, whether the port may hold more).
    fn pump_sync_once(&mut self, reads: &mut usize) -> (bool, bool) {
        let Some(unit) = &mut self.sync else { return (false, false) };
        let mut events = std::mem::take(&mut self.sync_events);
        let more = unit.pump_within(self.now_ns, reads, |ev| events.push(ev));
        let did = !events.is_empty();
        // Software-pipelined like LOAD (`CuckooTable::prefetch_step`):
        // every update hashed first, its reads issued a few updates ahead.
        let mut placed = std::mem::take(&mut self.peer_placed);
        placed.clear();
        placed.extend(events.iter().map(|ev| match ev {
            ReceiverEvent::Deliver { update, .. } => Some(self.table.placement_of(&update.key)),
            _ => None,
        }));
        self.table.prefetch_start(&placed);
        for p in placed.iter().take(crate::table::PIPELINE_BUCKETS_AHEAD).flatten() {
            self.tombstones.prefetch(p.hash);
        }
        for i in 0..events.len() {
            self.table.prefetch_step(&placed, i);
            if let Some(Some(p)) = placed.get(i + crate::table::PIPELINE_BUCKETS_AHEAD) {
                self.tombstones.prefetch(p.hash);
            }
            let slot_stage = i + crate::table::PIPELINE_SLOTS_AHEAD;
            if let (Some(ReceiverEvent::Deliver { update, .. }), Some(Some(p))) =
                (events.get(slot_stage), placed.get(slot_stage))
            {
                if update.op == DeltaOp::Delete {
                    self.tombstones.prefetch_victim(p.hash);
                }
            }
            let Some(ev) = events.get(i).cloned() else { break };
            match ev {
                // Behind the held ones while they drain, to keep the order.
                ReceiverEvent::Deliver { update, .. } if self.hold || !self.held.is_empty() => self.hold_peer(update),
                ReceiverEvent::Deliver { update, .. } => self.apply_peer(&update, placed.get(i).copied().flatten()),
                ReceiverEvent::ResyncNeeded { peer, lost, .. } => {
                    let st = ConnState {
                        generation: (lost.min(u32::MAX as u64) as u32).into(),
                        mark: (peer as u32).into(),
                        ..Default::default()
                    };
                    self.post_event(EventKind::ResyncNeeded, &ConnKey::default(), &st);
                }
                ReceiverEvent::PeerReset { .. } => {}
            }
        }
        events.clear();
        self.sync_events = events;
        self.peer_placed = placed;
        (did, more)
    }

    /// Applies held updates after SYNC_HOLD was cleared, a bounded number
    /// per housekeeping pass (as the design drains its hold buffer beside
    /// the command pipeline rather than stopping it).
    fn drain_held(&mut self) -> bool {
        if self.hold || self.held.is_empty() {
            return false;
        }
        for _ in 0..HOLD_DRAIN_PER_PASS {
            match self.held.pop_front() {
                Some(u) => self.apply_peer(&u, None),
                None => break,
            }
        }
        if self.held.is_empty() {
            self.held = std::collections::VecDeque::new();
        }
        true
    }

    /// Buffers a peer update while the host holds sync (a Full Sync is
    /// being written); on overflow drops them all and asks for a resync.
    fn hold_peer(&mut self, u: DeltaUpdate) {
        if self.held.len() < regs::SYNC_HOLD_CAPACITY as usize {
            self.held.push_back(u);
            return;
        }
        let dropped = self.held.len() as u64 + 1;
        self.held = std::collections::VecDeque::new();
        self.counters[Counter::SyncHoldDrops as usize] += dropped;
        self.counters_dirty = true;
        let st = ConnState { generation: (dropped.min(u32::MAX as u64) as u32).into(), ..Default::default() };
        self.post_event(EventKind::ResyncNeeded, &ConnKey::default(), &st);
    }

    /// Copies the sync unit's counters into the counter registers.
    fn refresh_sync_counters(&mut self) {
        let Some(unit) = &self.sync else { return };
        let st = unit.stats();
        let vals = [
            (Counter::SyncUpdatesSent, st.protocol.updates_sent),
            (Counter::SyncUpdatesReceived, st.protocol.updates_received),
            (Counter::SyncUpdatesApplied, st.applied),
            (Counter::SyncRetransRequestsSent, st.protocol.retrans_requests_sent),
            (Counter::SyncRetransUpdatesSent, st.protocol.retrans_updates_sent),
            (Counter::SyncLostUpdates, st.protocol.lost_updates),
            (Counter::SyncHistoryLost, st.protocol.history_lost),
            (Counter::SyncHistoryCovered, st.protocol.history_covered),
            (Counter::SyncNextSeq, unit.next_seq()),
            (Counter::SyncHeld, self.held.len() as u64),
            (Counter::SyncApplyFailed, st.apply_failed),
            (Counter::SyncMalformed, st.malformed + st.protocol.malformed + st.port.malformed),
            (Counter::SyncUnacked, unit.unacked(self.now_ns)),
            (Counter::SyncDigest, self.digest.sum),
            (Counter::SyncEntries, self.digest.count),
            (Counter::SyncQueueDepth, st.protocol.queue_depth),
            (Counter::SyncQueueDrops, st.protocol.tx_drops + st.protocol.reorder_drops),
            (Counter::SyncRejectsSent, st.protocol.lost_updates_reported),
            (Counter::SyncAuthFailures, st.port.auth_failures),
            (Counter::SyncReplaysDropped, st.port.replays_dropped),
            (Counter::SyncUnknownMember, st.port.unknown_member),
            (Counter::SyncSubmitFailed, st.submit_failed),
        ];
        for (c, v) in vals {
            if self.counters[c as usize] != v {
                self.counters[c as usize] = v;
                self.counters_dirty = true;
            }
        }
    }

    /// How long until the design has timed work (a sync batch to flush, a
    /// NACK or ACK due, a coalesced interrupt to raise); `None` when
    /// nothing is timed. A thread that sleeps while idle wakes by then.
    pub fn time_to_next_timer(&self) -> Option<std::time::Duration> {
        let now = self.shared.clock.now_ns();
        let mut next = self.sync.as_ref().and_then(SyncUnit::poll_timeout);
        let usec = u64::from(self.shared.reg(regs::IRQ_COALESCE_USEC));
        // A completion interrupt that goes nowhere (interrupts off, or the
        // cause masked: a polling host) is not timed work: its status bit
        // can wait for the next housekeeping pass.
        let unmasked = self.irq_sink.is_some()
            && IrqCause::from_bits_truncate(self.shared.reg(regs::IRQ_MASK)).contains(IrqCause::COMPLETION);
        if self.pending_cpl > 0 && usec > 0 && unmasked {
            let due = self.first_pending_ns.saturating_add(usec * 1000);
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        next.map(|t| std::time::Duration::from_nanos(t.saturating_sub(now)))
    }

    /// A descriptor readable when a sync frame arrives (see
    /// [`crate::wire::SyncPort::readiness_fd`]).
    pub fn sync_readiness_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.sync.as_ref()?.readiness_fd()
    }

    /// Attaches the sync unit (replacing any).
    pub fn attach_sync(&mut self, unit: SyncUnit) {
        self.member = unit.member();
        self.sync = Some(unit);
        self.mark_joining();
    }

    /// Tells the receivers whether the member is joining: while SYNC_HOLD
    /// is set, a Full Sync is about to replace, or is replacing, the table
    /// (a cluster member enables its device with the hold set and releases
    /// it once synced). What a peer had sent before a HELLO adopted then is
    /// the Full Sync's to carry (`SyncStats::history_lost`).
    fn mark_joining(&mut self) {
        if let Some(unit) = &mut self.sync {
            unit.set_joining(self.hold, self.now_ns);
        }
    }

    /// SYNC_POSITIONS: the sync unit's positions written to `buf_addr`
    /// (room for `entries`); the result is how many were written. Without
    /// a sync unit there is no stream: nothing is written, result 0.
    fn sync_positions(&mut self, buf_addr: u64, entries: u32) -> Outcome {
        let Some(unit) = &self.sync else { return Outcome::ok(0) };
        // Peer updates held, dropped from the hold, or that did not fit the
        // table are not in it: no peer's position can be vouched for.
        let drops = self.counters[Counter::SyncHoldDrops as usize];
        let unapplied = self.hold || !self.held.is_empty() || drops > 0 || unit.stats.apply_failed > 0;
        let mut pos = unit.positions(unapplied);
        pos.truncate(entries as usize);
        match self.tlb.translate(buf_addr, pos.len() * SyncPosition::SIZE) {
            Ok(r) => match r.write(0, pos.as_bytes()) {
                Ok(()) => Outcome::ok(pos.len() as u64),
                Err(_) => self.dma_error(),
            },
            Err(_) => self.dma_error(),
        }
    }

    /// SYNC_ALIGN: `entries` positions read from `buf_addr` align the
    /// receivers (see [`SyncUnit::align`]); the result is how many did.
    /// Only a joining member (SYNC_HOLD set) takes a cut: at any other
    /// time it aligns nothing (a synced member's streams are its own).
    fn sync_align(&mut self, buf_addr: u64, entries: u32) -> Outcome {
        if self.sync.is_none() || !self.hold {
            return Outcome::ok(0);
        }
        let mut cut = vec![SyncPosition::default(); entries as usize];
        let read = self.tlb.translate(buf_addr, cut.len() * SyncPosition::SIZE).map(|r| r.read(0, cut.as_mut_bytes()));
        if !matches!(read, Ok(Ok(()))) {
            return self.dma_error();
        }
        let now = self.now_ns;
        let Some(unit) = &mut self.sync else { return Outcome::ok(0) };
        Outcome::ok(unit.align(&cut, now))
    }

    /// The sync unit's counters, if one is attached.
    pub fn sync_stats(&self) -> Option<crate::sync_unit::UnitStats> {
        self.sync.as_ref().map(SyncUnit::stats)
    }

    fn write_records(&mut self, addr: u64, recs: &[ConnRecord]) -> Outcome {
        let len = recs.len() * ConnRecord::SIZE;
        match self.tlb.translate(addr, len) {
            Ok(r) => match r.write(0, recs.as_bytes()) {
                Ok(()) => Outcome::ok(recs.len() as u64),
                Err(_) => self.dma_error(),
            },
            Err(_) => self.dma_error(),
        }
    }

    /// LOAD: `count` sync records read from `buf_addr`, each applied as
    /// its REPLICA write, one [`LoadStatus`] each written to `status_addr`
    /// (abi.md, LOAD). Both buffers are translated before anything is
    /// applied, so a DMA_ERROR has done nothing.
    fn load(&mut self, buf_addr: u64, status_addr: u64, count: u32, t: &mut Traffic) -> Outcome {
        let n = count as usize;
        let (records, statuses) = match (
            self.tlb.translate(buf_addr, n * RECORD_SIZE),
            self.tlb.translate(status_addr, n * std::mem::size_of::<LoadStatus>()),
        ) {
            (Ok(r), Ok(s)) => (r, s),
            _ => return self.dma_error(),
        };
        let mut recs = std::mem::take(&mut self.load_records);
        recs.clear();
        recs.resize(n, DeltaRecord::new_zeroed());
        if records.read(0, recs.as_mut_bytes()).is_err() {
            self.load_records = recs;
            return self.dma_error();
        }
        // Hash every record first (arithmetic only), then run a few records
        // behind the bucket reads, as the pipeline of the descriptor path
        // overlaps its table reads.
        let mut placed = std::mem::take(&mut self.load_placed);
        placed.clear();
        placed.extend(recs.iter().map(|r| Some(self.table.placement_of(&r.key))));
        self.table.prefetch_start(&placed);
        let mut out = std::mem::take(&mut self.load_statuses);
        out.clear();
        let mut took = 0u64;
        let mut malformed = 0u64;
        for (i, r) in recs.iter().enumerate() {
            self.table.prefetch_step(&placed, i);
            let (status, result) = match r.decode() {
                Ok(u) if u.owner != 0 => {
                    t.bucket_reads += 2;
                    match self.apply_change(&u, placed.get(i).copied().flatten()) {
                        Applied::Done | Applied::Nothing => (CplStatus::Success, u.state.generation.get()),
                        Applied::Superseded(g) => (CplStatus::Stale, g),
                        Applied::Full => (CplStatus::TableFull, 0),
                    }
                }
                _ => {
                    malformed += 1;
                    (CplStatus::Malformed, 0)
                }
            };
            took += (status == CplStatus::Success) as u64;
            t.slot_writes += (status == CplStatus::Success) as u32;
            out.push(LoadStatus { status: status as u8, reserved: [0; 3], result: result.into() });
        }
        let written = statuses.write(0, out.as_bytes());
        self.counters[Counter::LoadRecords as usize] += n as u64;
        // Modelled beside the table traffic (`t`, charged by the caller):
        // the records' DMA read, a burst of 64-byte beats, and each
        // record's decode and hash.
        let cost = &self.shared.cfg.cost;
        let beats = (n * RECORD_SIZE).div_ceil(64) as u32;
        self.counters[Counter::ModelCycles as usize] +=
            cost.fetch_cycles(beats) + n as u64 * u64::from(cost.decode + cost.hash);
        self.counters[Counter::LoadRecordsMalformed as usize] += malformed;
        self.load_records = recs;
        self.load_placed = placed;
        self.load_statuses = out;
        if written.is_err() {
            // Translated above, so only a window unmapped meanwhile gets
            // here, after the records took effect: the host cannot know
            // which did, so the device stops rather than answer.
            self.go_fatal("LOAD status write failed after its records were applied".into());
            return Outcome::err(CplStatus::Internal);
        }
        Outcome::ok(took)
    }

    fn dma_error(&mut self) -> Outcome {
        self.counters[Counter::DmaErrors as usize] += 1;
        Outcome::err(CplStatus::DmaError)
    }

    fn snapshot(&mut self, addr: u64, len: u32, cursor: u32, sync: bool, now_ms: u64, t: &mut Traffic) -> Outcome {
        let region = match self.tlb.translate(addr, len as usize) {
            Ok(r) => r,
            Err(_) => return self.dma_error(),
        };
        let size = if sync { nicsync_fwif::sync::RECORD_SIZE } else { ConnRecord::SIZE };
        let max = len as usize / size;
        // Cursor 0 starts a walk; any other cursor must continue the walk
        // in progress exactly where its last chunk ended, or the moves made
        // since were not tracked for it (see `table::SnapshotWalk`).
        if cursor == 0 {
            self.table.begin_walk();
            self.walk_tombs = None;
        }
        let carry = match self.table.walk_mut() {
            Some(w) if w.walked == cursor as usize && !w.torn && w.carry.len() <= max => std::mem::take(&mut w.carry),
            _ => {
                self.table.end_walk();
                return Outcome::err(CplStatus::SnapshotTorn);
            }
        };
        let table_end = self.table.cursor_end();
        // Sync records go on past the table with the tombstones, as DELETE
        // records, so that the reader's deletes rank as the writer's did.
        let end = match (&self.walk_tombs, sync) {
            (_, false) => table_end,
            (Some(t), true) => table_end + t.len(),
            (None, true) => table_end + self.tombstones.len(),
        };
        let mut pos = cursor as usize;
        let mut n = 0usize;
        // Staged in 8-record bursts, as the DMA engine would write them.
        let mut buf = [0u8; 8 * nicsync_fwif::sync::RECORD_SIZE];
        let mut fill = 0;
        let mut carried = carry.iter();
        let member = self.member;
        while n < max {
            let out = &mut buf[fill * size..(fill + 1) * size];
            let emitted = match carried.next() {
                Some(s) => encode_walk_slot(s, sync, member, now_ms, out),
                None if pos < table_end => {
                    if pos % crate::table::WAYS == 0 {
                        t.bucket_reads += 1;
                    }
                    pos += 1;
                    self.table.at_cursor(pos - 1).is_some_and(|s| encode_walk_slot(s, sync, member, now_ms, out))
                }
                None if pos < end => {
                    // The tombstones, as they were when the walk reached them.
                    let tombs = self.walk_tombs.get_or_insert_with(|| {
                        let mut v = self.tombstones.entries();
                        // In key order, so that a run replays exactly.
                        v.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                        v
                    });
                    let i = pos - table_end;
                    pos += 1;
                    match tombs.get(i) {
                        Some(&(key, generation, owner)) => {
                            let state = ConnState { generation: generation.into(), ..Default::default() };
                            let owner = if owner == 0 { member } else { owner };
                            let u = DeltaUpdate { op: DeltaOp::Delete, owner, key, state, nat: Nat::default() };
                            out.copy_from_slice(u.to_record().as_bytes());
                            true
                        }
                        None => false,
                    }
                }
                None => break,
            };
            if !emitted {
                continue;
            }
            fill += 1;
            n += 1;
            if fill == 8 {
                if region.write((n - fill) * size, &buf[..fill * size]).is_err() {
                    return self.dma_error();
                }
                fill = 0;
            }
        }
        if fill > 0 && region.write((n - fill) * size, &buf[..fill * size]).is_err() {
            return self.dma_error();
        }
        let next = if pos >= end {
            self.table.end_walk();
            SNAPSHOT_DONE
        } else {
            if let Some(w) = self.table.walk_mut() {
                w.walked = pos;
            }
            pos as u32
        };
        Outcome::ok(n as u64 | (next as u64) << 32)
    }

    fn raise(&mut self, cause: IrqCause, vector: u16) {
        if let Some(r) = self.shared.slot(regs::IRQ_STATUS) {
            // Read first: in polling mode the bit stays set, and a plain
            // load is much cheaper than a locked read-modify-write.
            if r.load(Ordering::Acquire) & cause.bits() != cause.bits() {
                r.fetch_or(cause.bits(), Ordering::AcqRel);
            }
        }
        if cause.contains(IrqCause::COMPLETION) {
            self.pending_cpl = 0;
        }
        let mask = IrqCause::from_bits_truncate(self.shared.reg(regs::IRQ_MASK));
        if let Some(sink) = self.irq_sink.clone() {
            if mask.intersects(cause) {
                // Counted (and published) before the host can wake on it.
                self.count(Counter::Interrupts, 1);
                self.publish();
                sink.raise(vector);
            }
        }
    }

    fn post_event(&mut self, kind: EventKind, key: &nicsync_fwif::conn::ConnKey, state: &ConnState) {
        self.evt_seq = self.evt_seq.wrapping_add(1);
        let Some(ring) = &mut self.evt else {
            self.count(Counter::EventsDropped, 1);
            return;
        };
        if self.evt_lost > 0 || !ring.has_space(&self.shared.evt_head) {
            self.evt_lost = self.evt_lost.saturating_add(1);
            self.count(Counter::EventsDropped, 1);
            self.shared.set_status(Status::EVENT_OVERFLOW, Status::empty());
            return;
        }
        let mut body = [0u8; EVT_SIZE - 8];
        body[..40].copy_from_slice(key.as_bytes());
        body[40..].copy_from_slice(state.as_bytes());
        let word0 = self.evt_seq as u64 | (kind as u64) << 32;
        let garble = self.shared.faults.active() && self.shared.faults.housekeeping_fault(FaultKind::CorruptEventPhase);
        if let Err(e) = ring.push(EVT_SIZE, word0, &body, garble) {
            self.go_fatal(format!("event ring write: {e}"));
            return;
        }
        self.count(Counter::EventsWritten, 1);
        self.raise(IrqCause::EVENT, regs::VECTOR_EVENT);
    }

    /// After drops, one OVERFLOW event (once there is room) tells the host
    /// how many were lost; its `seq` is the last sequence number used.
    fn flush_overflow_event(&mut self) -> bool {
        let Some(ring) = &mut self.evt else { return false };
        if !ring.has_space(&self.shared.evt_head) {
            return false;
        }
        let mut body = [0u8; EVT_SIZE - 8];
        body[40 + 12..40 + 16].copy_from_slice(&self.evt_lost.to_le_bytes());
        let word0 = self.evt_seq as u64 | (EventKind::Overflow as u64) << 32;
        if let Err(e) = ring.push(EVT_SIZE, word0, &body, false) {
            self.go_fatal(format!("event ring write: {e}"));
            return true;
        }
        self.evt_lost = 0;
        self.count(Counter::EventsWritten, 1);
        self.raise(IrqCause::EVENT, regs::VECTOR_EVENT);
        true
    }

    /// The aging scanner sweeps the whole table once per AGING_PERIOD_MS,
    /// a share of buckets proportional to the time elapsed; off with a
    /// period of 0, and while peer updates are held.
    fn age(&mut self, now_ns: u64) -> bool {
        let period_ms = self.shared.reg(regs::AGING_PERIOD_MS) as u64;
        // Nor while the peers' updates are held (SYNC_HOLD set, or held
        // ones not yet applied): the table lags them, and an entry a peer
        // refreshed meanwhile would expire here on its old expiry and send
        // a delete that beats the refresh everywhere.
        if period_ms == 0 || self.hold || !self.held.is_empty() {
            self.last_aging_ns = now_ns;
            return false;
        }
        let elapsed = now_ns.saturating_sub(self.last_aging_ns);
        let buckets = self.table.buckets();
        let period_ns = period_ms as u128 * 1_000_000;
        let share = (buckets as u128 * elapsed as u128 / period_ns) as usize;
        if share == 0 {
            return false;
        }
        if share >= buckets {
            // A whole period or more has passed: one full sweep, no backlog.
            self.last_aging_ns = now_ns;
        } else {
            // Advance by exactly the time those buckets stand for, keeping
            // the remainder, so a sweep takes one period, not up to two.
            self.last_aging_ns += (share as u128 * period_ns / buckets as u128) as u64;
        }
        let mut remaining = share.min(buckets);
        let now_ms = now_ns / 1_000_000;
        let mut aged = Vec::new();
        while remaining > 0 {
            let from = self.aging_cursor;
            let to = (from + remaining).min(buckets);
            self.table.expire_range(from, to, now_ms, |s| aged.push(*s));
            remaining -= to - from;
            self.aging_cursor = if to >= buckets { 0 } else { to };
        }
        self.count(Counter::EntriesAged, aged.len() as u64);
        for slot in &aged {
            self.digest.sub(slot);
            self.post_event(EventKind::Aged, &slot.key, &slot.state);
            // Peers age the entry on their own clocks too; the delete makes
            // the removal certain (and is harmless if they were first).
            let gone = Slot { nat: Nat::default(), expires_ms: 0, owner: self.member, ..*slot };
            self.sync_local(DeltaOp::Delete, &gone, false, None);
        }
        !aged.is_empty()
    }
}

/// The running digest of the entries marked for sync: their count and the
/// wrapping sum of a 64-bit hash of each (key, state without its timeout,
/// NAT, owner). Kept up to date on every change, as a hardware accumulator
/// beside the table would be, so that members can compare tables without
/// walking them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SyncDigest {
    sum: u64,
    count: u64,
}

impl SyncDigest {
    fn hash(s: &Slot) -> Option<u64> {
        if !s.state.conn_flags().contains(ConnFlags::SYNC) {
            return None;
        }
        let mix = |h: u64, w: u64| (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        let mut h = 0x6e73_796e_6364_6967u64;
        for w in s.key.words() {
            h = mix(h, w);
        }
        let st = &s.state;
        h = mix(h, u64::from(st.tcp_state) | u64::from(st.direction) << 8 | u64::from(st.flags.get()) << 16);
        h = mix(h, u64::from(st.mark.get()) | u64::from(st.generation.get()) << 32);
        h = mix(h, u64::from(st.timeout_s.get() != 0) | u64::from(s.owner) << 8);
        if s.nat.kind != 0 {
            let n: [u64; 3] = zerocopy::transmute!(s.nat);
            for w in n {
                h = mix(h, w);
            }
        }
        Some(h ^ (h >> 31))
    }

    fn add(&mut self, s: &Slot) {
        self.replace(None, Self::hash(s));
    }

    /// Swaps one entry's term for another (`None`: not synced).
    fn replace(&mut self, old: Option<u64>, new: Option<u64>) {
        if let Some(h) = old {
            self.sum = self.sum.wrapping_sub(h);
            self.count = self.count.saturating_sub(1);
        }
        if let Some(h) = new {
            self.sum = self.sum.wrapping_add(h);
            self.count += 1;
        }
    }

    fn sub(&mut self, s: &Slot) {
        self.replace(Self::hash(s), None);
    }
}

/// Writes the walk record of `s` into `out` (a sync record of an entry
/// marked for sync when `sync`, else a `ConnRecord`); false if it is not
/// part of this walk.
fn encode_walk_slot(s: &Slot, sync: bool, member: u16, now_ms: u64, out: &mut [u8]) -> bool {
    let r = record(s, now_ms);
    if !sync {
        out.copy_from_slice(r.as_bytes());
        return true;
    }
    if !s.state.conn_flags().contains(ConnFlags::SYNC) {
        return false;
    }
    let owner = if s.owner == 0 { member } else { s.owner };
    let u = DeltaUpdate { op: DeltaOp::Upsert, owner, key: r.key, state: r.state, nat: r.nat };
    out.copy_from_slice(u.to_record().as_bytes());
    true
}

/// What applying a change under the conflict rule did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// Written or removed.
    Done,
    /// The stored entry or a tombstone won; its generation.
    Superseded(u32),
    /// A delete of an absent key (its tombstone recorded).
    Nothing,
    /// No room for the new entry.
    Full,
}

/// The hash of `key`: from its placement where the caller computed one.
#[inline]
fn key_hash(table: &CuckooTable, key: &ConnKey, at: Option<Placement>) -> u64 {
    at.map_or_else(|| table.hash_of(key), |p| p.hash)
}

fn record(s: &Slot, now_ms: u64) -> ConnRecord {
    let mut state = s.state;
    state.timeout_s = if s.expires_ms == 0 {
        0.into()
    } else {
        (s.expires_ms.saturating_sub(now_ms).div_ceil(1000).max(1) as u32).into()
    };
    ConnRecord { key: s.key, state, nat: if s.nat.kind == 0 { Nat::default() } else { s.nat } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A device stepped after an idle spell stamps a new entry's expiry with
    /// the time now, not the time of its last housekeeping pass: an entry
    /// inserted 10 s after that pass with a 5 s timeout used to expire at
    /// 5 s and be aged out in the same step.
    #[test]
    fn a_command_after_an_idle_spell_stamps_the_time_now() {
        use crate::dma::HostMemory;
        use nicsync_fwif::cmd::DescFlags;
        let (nic, cmd) = rings();
        nic.mmio_write(regs::AGING_PERIOD_MS, 1000);
        nic.mmio_write(regs::CONTROL, Control::ENABLE.bits());
        nic.step();
        nic.advance_time(std::time::Duration::from_secs(10));
        let k = key(1);
        let state = ConnState { timeout_s: 5.into(), ..Default::default() };
        let d = CommandDescriptor::conn(Opcode::Insert, DescFlags::empty(), 0, &k, &state);
        assert!(cmd.write(0, d.as_bytes()));
        nic.mmio_write(regs::CMD_DOORBELL, 1);
        nic.step();
        let c = nic.core();
        let mut t = Traffic::default();
        let at = c.table.find(&k, &mut t).expect("inserted, and not aged at once");
        assert_eq!(c.table.get(at).expect("slot").expires_ms, 15_000);
    }

    fn key(i: u32) -> ConnKey {
        ConnKey::v4(Ipv4Addr::from(i), 1, Ipv4Addr::new(192, 0, 2, 1), 2, 6, 0)
    }

    /// A manual device with a 4-slot command ring (NOPs in every slot;
    /// returned) and completion ring mapped, not yet enabled.
    fn rings() -> (Arc<crate::Nic>, Arc<crate::dma::VecMemory>) {
        use crate::dma::VecMemory;
        let nic =
            crate::Nic::new(ModelConfig { virtual_clock: true, ..ModelConfig::default() }, crate::ExecMode::Manual);
        // An all-zero descriptor is a NOP.
        let cmd = Arc::new(VecMemory::new(4 * DESC_SIZE));
        let cpl = Arc::new(VecMemory::new(4 * CPL_SIZE));
        nic.iommu().map(0x10000, cmd.clone()).expect("map");
        nic.iommu().map(0x20000, cpl).expect("map");
        for (reg, v) in [
            (regs::CMD_BASE_LO, 0x10000),
            (regs::CMD_LOG2_SIZE, 2),
            (regs::CPL_BASE_LO, 0x20000),
            (regs::CPL_LOG2_SIZE, 2),
            (regs::TABLE_CAPACITY, 64),
        ] {
            nic.mmio_write(reg, v);
        }
        (nic, cmd)
    }

    /// FATAL is cleared only by RESET (abi.md): a device that went FATAL
    /// (here at enable; in general in the middle of a batch, its CMD_HEAD
    /// behind commands it applied) refuses ENABLE until then. It used to
    /// take it, and would have run those commands again.
    #[test]
    fn fatal_is_cleared_only_by_reset() {
        let (nic, _cmd) = rings();
        nic.mmio_write(regs::CMD_LOG2_SIZE, 31);
        nic.mmio_write(regs::CONTROL, Control::ENABLE.bits());
        nic.step();
        let status = || Status::from_bits_truncate(nic.mmio_read(regs::STATUS));
        assert!(status().contains(Status::FATAL), "{:?}", status());
        nic.mmio_write(regs::CMD_LOG2_SIZE, 2);
        nic.mmio_write(regs::CONTROL, 0);
        nic.mmio_write(regs::CONTROL, Control::ENABLE.bits());
        nic.step();
        assert_eq!(status() & (Status::FATAL | Status::ENABLED), Status::FATAL, "ENABLE taken while FATAL");
        nic.mmio_write(regs::CONTROL, Control::RESET.bits());
        nic.step();
        assert!(!status().contains(Status::FATAL));
    }

    /// Registers the host sets cannot overflow the device's arithmetic (a
    /// debug build would panic): an inline write at the top of the
    /// address space (it does not wrap onto the registers at 0), a
    /// coalescing count of 2^32 - 1.
    #[test]
    fn host_settings_cannot_overflow_the_device() {
        let (nic, _cmd) = rings();
        nic.mmio_write_inline(0xFFFF_FFF8, &[0; 8]);
        nic.mmio_write(regs::IRQ_COALESCE_COUNT, u32::MAX);
        nic.mmio_write(regs::CONTROL, Control::ENABLE.bits());
        nic.step();
        nic.core().pending_cpl = u32::MAX - 1;
        nic.mmio_write(regs::CMD_DOORBELL, 3);
        nic.step();
        let c = nic.core();
        assert_eq!(c.counters[Counter::CompletionsWritten as usize], 3, "the NOPs completed");
        assert_eq!(c.pending_cpl, 0, "the count reached (saturated), the interrupt is raised");
    }

    #[test]
    fn tombstone_ages_survive_the_counter_wrapping() {
        let mut t = Tombstones::default();
        t.record_key(key(0), 1, 1);
        let set = t.set_of(&key(0));
        let same: Vec<u32> = (1..2_000_000u32).filter(|i| t.set_of(&key(*i)) == set).take(TOMBSTONE_WAYS).collect();
        // The set's first tombstone is recorded just before the counter
        // wraps, the others after it: the first is still the oldest.
        t.forget(&key(0));
        assert_eq!(t.len(), 0);
        t.stamp = u32::MAX - 1;
        for i in &same[..TOMBSTONE_WAYS] {
            t.record_key(key(*i), 1, 1);
        }
        assert_eq!(t.len(), TOMBSTONE_WAYS);
        t.record_key(key(0), 2, 1);
        assert_eq!(t.generation(&key(same[0])), None, "the oldest, from before the wrap, goes");
        assert_eq!(t.generation(&key(same[1])), Some(1));
        assert_eq!(t.generation(&key(0)), Some(2));
        assert_eq!(t.len(), TOMBSTONE_WAYS);
    }

    #[test]
    fn a_stale_tombstone_slot_frees_nothing() {
        let mut t = Tombstones::default();
        t.record_key(key(0), 1, 1);
        let i = t.find_key(&key(0)).expect("recorded");
        // The slot is no longer key 0's (forgotten, then taken by another
        // key of the set): freeing it for key 0 leaves the other alone.
        t.forget(&key(0));
        let set = t.set_of(&key(0));
        let other = (1..2_000_000u32).find(|j| t.set_of(&key(*j)) == set).expect("a key of the same set");
        t.record_key(key(other), 3, 1);
        assert_eq!(t.find_key(&key(other)), Some(i), "the free way is reused");
        t.forget_at(i, &key(0));
        assert_eq!(t.generation(&key(other)), Some(3));
        assert_eq!(t.len(), 1);
        t.forget_at(i, &key(other));
        assert_eq!((t.generation(&key(other)), t.len()), (None, 0));
    }

    #[test]
    fn tombstones_evict_the_oldest_of_a_set_only() {
        let mut t = Tombstones::default();
        t.record_key(key(0), 1, 1);
        t.forget(&key(0));
        assert_eq!(t.generation(&key(0)), None);
        t.record_key(key(0), 5, 2); // a newer recording of the same key
        assert_eq!(t.len(), 1);
        // Keys of the same set as key 0: the set holds TOMBSTONE_WAYS.
        let set = t.set_of(&key(0));
        let same: Vec<u32> = (1..2_000_000u32).filter(|i| t.set_of(&key(*i)) == set).take(TOMBSTONE_WAYS).collect();
        assert_eq!(same.len(), TOMBSTONE_WAYS);
        for i in &same[..TOMBSTONE_WAYS - 1] {
            t.record_key(key(*i), 1, 1);
        }
        assert_eq!(t.generation(&key(0)), Some(5), "full set, nothing evicted yet");
        // Re-recording a key refreshes it, without taking a way.
        t.record_key(key(0), 6, 2);
        t.record_key(key(same[TOMBSTONE_WAYS - 1]), 1, 1);
        assert_eq!(t.generation(&key(same[0])), None, "the set's oldest goes first");
        assert_eq!(t.generation(&key(0)), Some(6));
        assert_eq!(t.len(), TOMBSTONE_WAYS);
        // Other sets are untouched, and the table never grows.
        for i in 0..3 * TOMBSTONES as u32 {
            t.record_key(key(1_000_000 + i), 1, 1);
        }
        assert!(t.len() <= TOMBSTONES);
        assert_eq!(t.entries().len(), t.len());
    }
}
