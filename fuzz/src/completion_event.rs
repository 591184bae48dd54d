//! `completion_event`: the host's checks on everything a (faulty or
//! hostile) device writes: registers at probe, completion entries, event
//! entries, LOOKUP records, SNAPSHOT chunks and LOAD statuses.
//!
//! The harness brings the real driver up ([`ConnTable::open`]) on
//! [`ScriptedDevice`], a device model that does nothing on its own: its
//! registers look healthy, and whenever the host rings the doorbell it
//! answers each posted command as the fuzz input says (an honest-looking
//! completion with a chosen status and result, a raw 16-byte entry, none at
//! all, a wrong ring head, a duplicate), writes the LOOKUP record, SNAPSHOT
//! records or LOAD statuses the input gives, and posts events. The host
//! side runs table operations chosen by the same input. Nothing is asserted beyond
//! "no panic, no hang, no runaway allocation": the driver must turn every
//! lie into an error.
//!
//! Input: a 12-byte header, then one byte stream read in the order the two
//! sides need it (host operation bytes and device answer bytes
//! interleave; past its end every byte reads 0, so the device then answers
//! SUCCESS with zero results).
//!
//! Header: `flags: u8` (bit 0: ABI minor from `minor`; bit 1: capabilities
//! from `caps`; bit 2: granted capacity from `capacity`; bit 3: DEVICE_ID
//! wrong), `rings: u8` (bits 0-1: command ring log2 - 2, bits 2-3: event
//! ring log2 - 1, 0 meaning none), `minor: u8`, `fatal_at: u8` (the device
//! reports FATAL from that doorbell on; 0 never), `caps: u32`,
//! `capacity: u32`.
//!
//! Host operations (byte % 10): insert, lookup, delete, upsert, flush,
//! batch (or the same as Full Sync records through `ConnTable::load`, by
//! LOAD where the device claims it), snapshot walk, sync-snapshot chunk,
//! events, raw post + reap;
//! see [`run`]. Device answers per command: byte % 8 (0-3 honest, 4 raw,
//! 5 none, 6 wrong head, 7 twice), then status, result and data.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nicsync::table::{ConnEntry, ConnTable, TableOp};
use nicsync::{CompletionMode, DriverConfig};
use nicsync_fwif::cmd::{
    CommandDescriptor, DescFlags, LoadBody, LoadStatus, LookupBody, Opcode, SnapshotBody, DESC_SIZE, SNAPSHOT_DONE,
};
use nicsync_fwif::conn::{ConnRecord, Nat};
use nicsync_fwif::cpl::{CompletionEntry, CPL_SIZE, PHASE_BIT};
use nicsync_fwif::event::{EventEntry, EventKind, EVT_SIZE};
use nicsync_fwif::regs::{self, Capabilities, Control, Status};
use nicsync_fwif::sync::{DeltaOp, DeltaRecord, DeltaUpdate, RECORD_SIZE};
use nicsync_vfio::{DeviceError, DmaBuffer, DmaMemory, NicDevice};
use zerocopy::{FromBytes, IntoBytes};

use crate::{key, nat_for, state, trace};

/// Size of the input header.
pub const HEADER: usize = 12;
/// Host operations per run at most.
const MAX_OPS: usize = 48;
/// Commands the device answers per doorbell at most.
const MAX_PER_DOORBELL: usize = 64;
/// LOAD statuses the scripted device writes at most (the rest keep what
/// the host left there).
const MAX_LOAD_STATUSES: usize = 64;
/// Records of a snapshot walk the harness takes at most.
const MAX_WALK: usize = 96;

/// The fuzz bytes, read front to back by host and device alike.
#[derive(Debug)]
struct Script {
    bytes: Vec<u8>,
    pos: usize,
}

impl Script {
    fn u8(&mut self) -> u8 {
        let b = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }
}

/// Values the device reports at probe.
#[derive(Debug, Clone, Copy)]
struct Probe {
    flags: u8,
    minor: u8,
    fatal_at: u8,
    caps: u32,
    capacity: u32,
}

#[derive(Debug)]
struct Ring {
    tail: u32,
    phase: bool,
}

#[derive(Debug)]
struct Inner {
    script: Script,
    probe: Probe,
    regs: HashMap<u32, u32>,
    bufs: Vec<(u64, Arc<DmaMemory>)>,
    next_iova: u64,
    cmd_head: u32,
    cpl: Ring,
    evt: Ring,
    doorbells: u32,
}

/// A device whose every answer comes from the fuzz input (module docs).
#[derive(Debug)]
pub struct ScriptedDevice {
    inner: Mutex<Inner>,
}

impl ScriptedDevice {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn host_u8(&self) -> u8 {
        self.lock().script.u8()
    }

    fn done(&self) -> bool {
        self.lock().script.done()
    }
}

impl Inner {
    fn reg(&self, off: u32) -> u32 {
        self.regs.get(&off).copied().unwrap_or(0)
    }

    /// The buffer holding `len` bytes at `iova`, and the offset in it.
    fn at(&self, iova: u64, len: usize) -> Option<(Arc<DmaMemory>, usize)> {
        self.bufs.iter().find_map(|(base, m)| {
            let off = iova.checked_sub(*base)? as usize;
            (off.checked_add(len)? <= m.len()).then(|| (m.clone(), off))
        })
    }

    fn ring_base(&self, lo: u32, hi: u32) -> u64 {
        (self.reg(hi) as u64) << 32 | self.reg(lo) as u64
    }

    /// Writes one completion entry (body first, then the phase word).
    fn push_cpl(&mut self, word0: u64, result: u64) {
        let log2 = self.reg(regs::CPL_LOG2_SIZE).min(16);
        let size = 1u32 << log2;
        let Some((m, off)) = self.at(self.ring_base(regs::CPL_BASE_LO, regs::CPL_BASE_HI), CPL_SIZE << log2) else {
            return;
        };
        let slot = off + self.cpl.tail as usize * CPL_SIZE;
        let phase = if self.cpl.phase { (PHASE_BIT as u64) << 56 } else { 0 };
        let _ = m.write(slot + 8, &result.to_le_bytes());
        let _ = m.store_u64(slot, (word0 & !(1u64 << 56)) | phase, Ordering::Release);
        self.cpl.tail += 1;
        if self.cpl.tail >= size {
            self.cpl.tail = 0;
            self.cpl.phase = !self.cpl.phase;
        }
    }

    /// Writes one event entry (body first, then the phase word).
    fn push_evt(&mut self, mut e: EventEntry) {
        let log2 = self.reg(regs::EVT_LOG2_SIZE);
        if log2 == 0 || log2 > 16 {
            return;
        }
        let size = 1u32 << log2;
        let Some((m, off)) = self.at(self.ring_base(regs::EVT_BASE_LO, regs::EVT_BASE_HI), EVT_SIZE << log2) else {
            return;
        };
        e.phase = (e.phase & !PHASE_BIT) | u8::from(self.evt.phase);
        let slot = off + self.evt.tail as usize * EVT_SIZE;
        let b = e.as_bytes();
        let _ = m.write(slot + 8, &b[8..]);
        let w0 = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let _ = m.store_u64(slot, w0, Ordering::Release);
        self.evt.tail += 1;
        if self.evt.tail >= size {
            self.evt.tail = 0;
            self.evt.phase = !self.evt.phase;
        }
    }

    /// A record for a LOOKUP or SNAPSHOT answer: a valid one (for `k`, or
    /// an arbitrary key), or raw bytes.
    fn record(&mut self, size: usize, k: Option<nicsync_fwif::conn::ConnKey>) -> Vec<u8> {
        let how = self.script.u8();
        let key = k.unwrap_or_else(|| key(how >> 2));
        match how % 4 {
            0 | 1 if size == RECORD_SIZE => {
                let st = state(self.script.u8().into(), self.script.u8().into());
                let u = if how % 4 == 0 {
                    DeltaUpdate::upsert(self.script.u8().into(), key, st, nat_for(&key))
                } else {
                    DeltaUpdate::delete(self.script.u8().into(), key, st)
                };
                let mut v = u.to_record().as_bytes().to_vec();
                v.resize(size, 0);
                v
            }
            0 | 1 => {
                let nat = if how % 4 == 0 { nat_for(&key) } else { Nat::default() };
                let rec = ConnRecord { key, state: state(self.script.u8().into(), self.script.u8().into()), nat };
                let mut v = rec.as_bytes().to_vec();
                v.resize(size, 0);
                v
            }
            2 => {
                // Valid but for one byte.
                let mut v = self.record_valid_bytes(size, key);
                let at = self.script.u8() as usize % size;
                v[at] = self.script.u8();
                v
            }
            _ => self.script.take(size),
        }
    }

    fn record_valid_bytes(&mut self, size: usize, key: nicsync_fwif::conn::ConnKey) -> Vec<u8> {
        let mut v = if size == RECORD_SIZE {
            DeltaUpdate::upsert(1, key, state(1, 1), nat_for(&key)).to_record().as_bytes().to_vec()
        } else {
            ConnRecord { key, state: state(1, 1), nat: nat_for(&key) }.as_bytes().to_vec()
        };
        v.resize(size, 0);
        v
    }

    /// The result word of a well-formed answer to `d`, writing the data it
    /// returns (LOOKUP record, SNAPSHOT records).
    fn answer(&mut self, d: &CommandDescriptor) -> u64 {
        match Opcode::from_wire(d.opcode) {
            Some(Opcode::Lookup) => {
                let body: LookupBody = zerocopy::transmute!(d.body);
                let echo = self.script.u8() % 4 != 0;
                let rec = self.record(ConnRecord::SIZE, echo.then_some(body.key));
                if let Some((m, off)) = self.at(body.resp_addr.get(), rec.len()) {
                    let _ = m.write(off, &rec);
                }
                0
            }
            Some(Opcode::Snapshot) => {
                let body: SnapshotBody = zerocopy::transmute!(d.body);
                let sync = d.flags & DescFlags::SYNC_RECORDS.bits() != 0;
                let size = if sync { RECORD_SIZE } else { ConnRecord::SIZE };
                let count = self.script.u8() as u32;
                let cursor = body.cursor.get();
                let next = match self.script.u8() % 4 {
                    0 => SNAPSHOT_DONE,
                    1 => cursor.saturating_add(count.max(1)),
                    2 => self.script.u32(),
                    _ => cursor,
                };
                let fits = (body.buf_len.get() as usize / size).min(count as usize);
                for j in 0..fits {
                    let rec = self.record(size, None);
                    if let Some((m, off)) = self.at(body.buf_addr.get().wrapping_add((j * size) as u64), size) {
                        let _ = m.write(off, &rec);
                    }
                }
                count as u64 | (next as u64) << 32
            }
            Some(Opcode::Load) => {
                // A status per record (any byte, with reserved bytes and
                // result from the input), then any count of SUCCESS.
                let body: LoadBody = zerocopy::transmute!(d.body);
                let n = (body.count.get() as usize).min(MAX_LOAD_STATUSES);
                for j in 0..n {
                    let honest = self.script.u8() % 4 != 0;
                    let st = LoadStatus {
                        status: if honest { self.script.u8() % 8 } else { self.script.u8() },
                        reserved: if honest { [0; 3] } else { [self.script.u8(), 0, 0] },
                        result: self.script.u32().into(),
                    };
                    let at = body.status_addr.get().wrapping_add((j * std::mem::size_of::<LoadStatus>()) as u64);
                    if let Some((m, off)) = self.at(at, std::mem::size_of::<LoadStatus>()) {
                        let _ = m.write(off, st.as_bytes());
                    }
                }
                self.script.u8().into()
            }
            Some(Opcode::Flush) => self.script.u8().into(),
            Some(Opcode::Insert | Opcode::Update | Opcode::Upsert) => self.script.u32().into(),
            _ => 0,
        }
    }

    /// The device's reaction to a doorbell: answers every posted command.
    fn doorbell(&mut self, tail: u32) {
        self.doorbells = self.doorbells.saturating_add(1);
        let log2 = self.reg(regs::CMD_LOG2_SIZE).min(16);
        let size = 1u32 << log2;
        if tail >= size {
            return;
        }
        let Some((cmd, off)) = self.at(self.ring_base(regs::CMD_BASE_LO, regs::CMD_BASE_HI), DESC_SIZE << log2) else {
            return;
        };
        let read = |slot: u32| {
            let mut b = [0u8; DESC_SIZE];
            let _ = cmd.read(off + slot as usize * DESC_SIZE, &mut b);
            CommandDescriptor::read_from_bytes(&b).unwrap_or_else(|_| CommandDescriptor::zeroed())
        };
        let mask = size - 1;
        let mut n = 0;
        while self.cmd_head != tail && n < MAX_PER_DOORBELL {
            n += 1;
            let d = read(self.cmd_head);
            let next = (self.cmd_head + 1) & mask;
            let slots = if d.is_chained() && next != tail && read(next).opcode == Opcode::Ext as u8 { 2 } else { 1 };
            let head = (self.cmd_head + slots) & mask;
            let how = self.script.u8() % 8;
            let s = self.script.u8();
            trace!(
                "device: slot {} opcode {:#04x} tag {} ({} slots): answer {how}, status byte {s}",
                self.cmd_head,
                d.opcode,
                d.tag.get(),
                slots
            );
            let status: u64 = if s < 176 { 0 } else { (s % 12).into() };
            let word0 =
                |head: u32| d.tag.get() as u64 | status << 16 | (d.opcode as u64) << 24 | (head as u64 & 0xFFFF) << 32;
            match how {
                4 => {
                    let raw = self.script.take(CPL_SIZE);
                    let e = CompletionEntry::read_from_bytes(&raw).unwrap_or_default();
                    let b = e.as_bytes();
                    let w0 = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                    let w1 = u64::from_le_bytes(b[8..].try_into().unwrap_or_default());
                    self.push_cpl(w0, w1);
                }
                5 => {}
                6 => {
                    let result = self.answer(&d);
                    let wrong = self.script.u16() as u32;
                    self.push_cpl(word0(wrong), result);
                }
                7 => {
                    let result = self.answer(&d);
                    self.push_cpl(word0(head), result);
                    self.push_cpl(word0(head), result);
                }
                _ => {
                    let result = self.answer(&d);
                    self.push_cpl(word0(head), result);
                }
            }
            self.cmd_head = head;
        }
        // Unsolicited events.
        for _ in 0..self.script.u8() % 4 {
            let e = match self.script.u8() % 3 {
                0 => EventEntry::read_from_bytes(&self.script.take(EVT_SIZE)).unwrap_or_default(),
                1 => {
                    let k = key(self.script.u8());
                    let kind = [EventKind::Aged, EventKind::SyncUpdated, EventKind::SyncRemoved]
                        [self.script.u8() as usize % 3] as u8;
                    EventEntry { seq: self.script.u32().into(), kind, key: k, state: state(2, 3), ..Default::default() }
                }
                _ => {
                    let mut st = state(0, 0);
                    st.generation = self.script.u32().into();
                    let kind = [EventKind::Overflow, EventKind::ResyncNeeded][self.script.u8() as usize % 2] as u8;
                    EventEntry { seq: self.script.u32().into(), kind, state: st, ..Default::default() }
                }
            };
            self.push_evt(e);
        }
    }
}

impl NicDevice for ScriptedDevice {
    fn read32(&self, offset: u32) -> u32 {
        let g = self.lock();
        let p = g.probe;
        match offset {
            regs::DEVICE_ID if p.flags & 8 != 0 => regs::DEVICE_ID_VALUE ^ 1,
            regs::DEVICE_ID => regs::DEVICE_ID_VALUE,
            regs::ABI_VERSION => {
                let minor = if p.flags & 1 != 0 { p.minor.into() } else { nicsync_fwif::ABI_MINOR };
                regs::pack_version(nicsync_fwif::ABI_MAJOR, minor)
            }
            regs::CAPABILITIES if p.flags & 2 != 0 => p.caps,
            regs::CAPABILITIES => Capabilities::all().bits(),
            regs::TABLE_MAX_CAPACITY => 1 << 20,
            regs::TABLE_CAPACITY if p.flags & 4 != 0 && g.reg(regs::CONTROL) & Control::ENABLE.bits() != 0 => {
                p.capacity
            }
            regs::CLOCK_MHZ => 250,
            regs::STATUS => {
                let mut s = Status::READY;
                if g.reg(regs::CONTROL) & Control::ENABLE.bits() != 0 {
                    s |= Status::ENABLED;
                }
                if p.fatal_at != 0 && g.doorbells >= p.fatal_at as u32 {
                    s |= Status::FATAL;
                }
                s.bits()
            }
            regs::CMD_HEAD => g.cmd_head,
            off => g.reg(off),
        }
    }

    fn write32(&self, offset: u32, value: u32) {
        let mut g = self.lock();
        match offset {
            regs::CONTROL if value & Control::RESET.bits() != 0 => {
                g.regs.insert(regs::CONTROL, 0);
                g.cmd_head = 0;
                g.cpl = Ring { tail: 0, phase: true };
                g.evt = Ring { tail: 0, phase: true };
            }
            regs::CMD_DOORBELL => g.doorbell(value),
            off => {
                g.regs.insert(off, value);
            }
        }
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
        let mem = Arc::new(DmaMemory::allocate(len, false)?);
        let mut g = self.lock();
        let iova = g.next_iova;
        g.next_iova += mem.len() as u64 + 4096;
        g.bufs.push((iova, mem.clone()));
        Ok(DmaBuffer::new(mem, iova, None))
    }

    fn irq_fd(&self, _vector: u16) -> Option<BorrowedFd<'_>> {
        None
    }

    fn reset(&self) -> Result<(), DeviceError> {
        self.write32(regs::CONTROL, Control::RESET.bits());
        Ok(())
    }

    fn describe(&self) -> String {
        "scripted (fuzz)".into()
    }
}

/// The decoders alone, on the raw input.
fn decode_raw(data: &[u8]) {
    for c in data.chunks_exact(CPL_SIZE).take(8) {
        if let Ok(e) = CompletionEntry::read_from_bytes(c) {
            let _ = e.decode().map_err(|e| e.to_string());
        }
    }
    for c in data.chunks_exact(EVT_SIZE).take(4) {
        if let Ok(e) = EventEntry::read_from_bytes(c) {
            let _ = e.decode().map_err(|e| e.to_string());
        }
    }
    for c in data.chunks_exact(ConnRecord::SIZE).take(4) {
        if let Ok(r) = ConnRecord::read_from_bytes(c) {
            let _ = r.validate().map_err(|e| e.to_string());
        }
    }
    for c in data.chunks_exact(RECORD_SIZE).take(4) {
        if let Ok(r) = DeltaRecord::read_from_bytes(c) {
            if let Ok(u) = r.decode() {
                assert_eq!(u.to_record(), r, "a decoded record does not encode back to itself");
            }
        }
    }
}

fn entry(dev: &ScriptedDevice, i: u8) -> (nicsync_fwif::conn::ConnKey, ConnEntry) {
    let k = key(i);
    let mut st = state(dev.host_u8().into(), 0);
    st.generation = (dev.host_u8() as u32).into();
    let nat = (i & 0x40 != 0).then(|| nat_for(&k));
    (k, ConnEntry { state: st, nat })
}

/// The target.
pub fn run(data: &[u8]) {
    decode_raw(data);
    if data.len() < HEADER {
        return;
    }
    let (h, body) = data.split_at(HEADER);
    let probe = Probe {
        flags: h[0],
        minor: h[2],
        fatal_at: h[3],
        caps: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
        capacity: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
    };
    let cmd_ring_log2 = 2 + u32::from(h[1] & 3).min(2);
    let evt = u32::from((h[1] >> 2) & 3);
    let evt_ring_log2 = if evt == 0 { 0 } else { 1 + evt };
    let dev = Arc::new(ScriptedDevice {
        inner: Mutex::new(Inner {
            script: Script { bytes: body.to_vec(), pos: 0 },
            probe,
            regs: HashMap::new(),
            bufs: Vec::new(),
            next_iova: 0x1_0000_0000,
            cmd_head: 0,
            cpl: Ring { tail: 0, phase: true },
            evt: Ring { tail: 0, phase: true },
            doorbells: 0,
        }),
    });
    let cfg = DriverConfig {
        cmd_ring_log2,
        evt_ring_log2,
        table_capacity: 1 << 12,
        aging_period_ms: 0,
        completion_mode: CompletionMode::Poll,
        completion_timeout: Duration::ZERO,
        bringup_timeout: Duration::from_millis(100),
        ..DriverConfig::default()
    };
    let mut t = match ConnTable::open(dev.clone(), cfg) {
        Ok(t) => t,
        Err(e) => {
            trace!("probe failed: {e}");
            return;
        }
    };
    t.set_snapshot_chunk_bytes(RECORD_SIZE * (1 + dev.host_u8() as usize % 8));
    for _ in 0..MAX_OPS {
        if dev.done() {
            break;
        }
        let op = dev.host_u8();
        let i = dev.host_u8();
        trace!("host: op {} (byte {op}) on key {i}", op % 10);
        match op % 10 {
            0 => {
                let (k, e) = entry(&dev, i);
                let r = t.insert(&k, &e);
                trace!("  insert {k} nat {}: {r:?}", e.nat.is_some());
            }
            1 => {
                let r = t.lookup(&key(i));
                trace!("  lookup {}: {r:?}", key(i));
                if let Ok(Some(rec)) = r {
                    assert!(rec.validate().is_ok(), "lookup returned a record that does not validate");
                    assert_eq!(rec.key, key(i), "lookup returned another key's record");
                }
            }
            2 => {
                let r = t.delete(&key(i));
                trace!("  delete {}: {r:?}", key(i));
            }
            3 => {
                let (k, e) = entry(&dev, i);
                let r = if i & 1 == 0 { t.upsert(&k, &e) } else { t.update(&k, &e) };
                trace!("  upsert/update {k}: {r:?}");
            }
            4 => {
                let r = t.flush();
                trace!("  flush: {r:?}");
            }
            5 => {
                let n = i as usize % 12;
                let ops: Vec<TableOp> = (0..n)
                    .map(|j| {
                        let (k, e) = entry(&dev, i.wrapping_add(j as u8));
                        match dev.host_u8() % 6 {
                            0 => TableOp::Insert(k, e),
                            1 => TableOp::Update(k, e),
                            2 => TableOp::Upsert(k, e),
                            3 => TableOp::Delete(k),
                            4 => TableOp::Replica(k, e, 2),
                            _ => TableOp::ReplicaDelete(k, 9, 3),
                        }
                    })
                    .collect();
                trace!(
                    "  batch of {}: {:?}",
                    ops.len(),
                    ops.iter().map(|o| format!("{o:?}").chars().take(12).collect::<String>()).collect::<Vec<_>>()
                );
                if dev.host_u8() & 1 == 0 {
                    let r = t.batch(&ops);
                    trace!("  batch: {r:?}");
                    if let Ok(results) = r {
                        assert_eq!(results.len(), ops.len(), "batch lost results");
                    }
                } else {
                    // The same as Full Sync records, written by LOAD where
                    // the device claims the capability.
                    let records: Vec<DeltaRecord> = ops
                        .iter()
                        .map(|o| match o {
                            TableOp::Delete(k) | TableOp::ReplicaDelete(k, ..) => {
                                let st = nicsync_fwif::conn::ConnState { generation: 9.into(), ..Default::default() };
                                DeltaUpdate::delete(3, *k, st).to_record()
                            }
                            other => {
                                let (k, e) = match other {
                                    TableOp::Insert(k, e)
                                    | TableOp::Update(k, e)
                                    | TableOp::Upsert(k, e)
                                    | TableOp::Replica(k, e, _) => (*k, *e),
                                    _ => (*other.key(), ConnEntry::default()),
                                };
                                DeltaUpdate::upsert(2, k, e.state, e.nat.unwrap_or_default()).to_record()
                            }
                        })
                        .collect();
                    let r = t.load(&records);
                    trace!("  load: {r:?}");
                    if let Ok(results) = r {
                        assert_eq!(results.len(), records.len(), "load lost results");
                    }
                }
            }
            6 => {
                for rec in t.snapshot().take(MAX_WALK) {
                    if let Ok(rec) = rec {
                        assert!(rec.validate().is_ok(), "snapshot returned a record that does not validate");
                    }
                }
            }
            7 => {
                let mut out = Vec::new();
                let cursor = if i & 1 == 0 { 0 } else { dev.host_u8().into() };
                let _ = t.sync_snapshot_chunk(cursor, &mut out);
                for u in &out {
                    assert!(u.validate().is_ok() && u.owner != 0, "sync snapshot returned a bad update");
                    let _ = u.op == DeltaOp::Delete;
                }
            }
            8 => {
                let mut n = 0u32;
                t.driver().poll_events(|ev| {
                    if ev.kind == EventKind::Aged {
                        assert!(ev.key.validate().is_ok(), "an aged event passed with a bad key");
                    }
                    n += 1;
                });
            }
            _ => {
                // A raw descriptor from the host side, then reap.
                let raw: Vec<u8> = (0..DESC_SIZE).map(|_| dev.host_u8()).collect();
                let d = CommandDescriptor::read_from_bytes(&raw).unwrap_or_else(|_| CommandDescriptor::zeroed());
                let drv = t.driver();
                if let Ok(tag) = drv.post(&d, None) {
                    drv.ring();
                    drv.reap();
                    let _ = drv.take_done(tag);
                    let _ = drv.take_lost(tag);
                }
                let _ = drv.stats();
                let _ = drv.free_slots();
            }
        }
    }
}
