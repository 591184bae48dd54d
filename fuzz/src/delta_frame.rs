//! `delta_frame`: sync-port frames ([`Frame::parse`]) and the Delta Sync
//! state machines that consume them ([`DeltaSender`], [`DeltaReceiver`]).
//!
//! A sender (member [`SENDER`], epoch [`SENDER_EPOCH`]) and a receiver
//! (member [`RECEIVER`], following the sender) are wired back to back;
//! the fuzz input injects datagrams into both, moves time, submits updates
//! and drops or delivers what they send each other.
//!
//! Input: one flags byte, then operations until the input ends:
//!
//! | op byte % 5 | operands | action |
//! |---|---|---|
//! | 0 | `len: u16`, `len` bytes | a datagram for both machines (its CRC fixed when flags bit 0 is set) |
//! | 1 | `dt: u16` | time advances `dt` µs; due timers run |
//! | 2 | 88 bytes | a [`DeltaRecord`]; if it decodes, the sender submits it |
//! | 3 | `mask: u8` | frames in flight are delivered (bit 0: sender to receiver, bit 1: receiver to sender, bit 2: sender flushes first) |
//! | 4 | `epoch: u32`, `seq: u64` | the receiver restarts at (epoch, seq), as after a Full Sync |
//!
//! Checks: `parse` never panics; a parsed frame's iterators agree with its
//! header; the receiver delivers each epoch's numbers strictly increasing
//! (its documented promise), whatever it is fed.

use nicsync_fwif::sync::{checksum, Body, DeltaRecord, Frame, CHECKSUM_OFFSET, HEADER_SIZE};
use nicsync_model::sync::{DeltaReceiver, DeltaSender, ReceiverConfig, ReceiverEvent, SenderConfig};
use zerocopy::FromBytes;

use crate::Reader;

/// Cluster id of both machines.
pub const CLUSTER: u16 = 7;
/// The sender's member id.
pub const SENDER: u16 = 1;
/// The sender's epoch.
pub const SENDER_EPOCH: u32 = 0x5EED_0001;
/// The receiver's member id.
pub const RECEIVER: u16 = 2;
/// The receiver's own epoch (in its NACK and ACK headers).
pub const RECEIVER_EPOCH: u32 = 0x5EED_0002;
/// Largest datagram the harness builds.
pub const MAX_LEN: usize = 2048;
/// Frames moved between the machines per op at most.
const MAX_HOPS: usize = 64;

/// Sets the checksum field of a would-be frame to the CRC of its bytes
/// (when it is long enough to have one), so the fuzzer gets past the CRC.
pub fn fix_checksum(buf: &mut [u8]) {
    if buf.len() >= HEADER_SIZE {
        let crc = checksum(buf);
        buf[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Parses one datagram and checks the view against its header.
fn parse_and_check(buf: &[u8]) {
    if let Ok(view) = Frame::parse(buf) {
        let h = view.header;
        let n = h.count as usize;
        match view.body {
            Body::Delta(r) => {
                assert_eq!(r.len(), n);
                let mut expect = h.seq;
                for (seq, u) in view.updates() {
                    assert_eq!(seq, expect);
                    assert!(u.validate().is_ok(), "parse accepted a record that does not validate");
                    expect += 1;
                }
                assert_eq!(view.next_seq(), Some(h.seq + n as u64));
            }
            Body::Nack(r) | Body::Lost(r) => assert_eq!((r.len(), view.ranges().count()), (n, n)),
            Body::Ack(a) => assert_eq!((a.len(), view.acks().count()), (n, n)),
            Body::Alive | Body::Hello { .. } => assert_eq!(view.next_seq(), Some(h.seq)),
        }
    }
}

struct Harness {
    tx: DeltaSender,
    rx: DeltaReceiver,
    now: u64,
    /// Frames the sender sent, not yet delivered (bounded).
    s2r: Vec<Vec<u8>>,
    r2s: Vec<Vec<u8>>,
    /// Last delivered (epoch, seq), to check the ordering promise.
    last: Option<(u32, u64)>,
}

impl Harness {
    fn new() -> Option<Self> {
        let mut scfg = SenderConfig::new(CLUSTER, SENDER, SENDER_EPOCH);
        scfg.queue_capacity = 32;
        scfg.tx_queue_limit = 64;
        scfg.max_peers = 4;
        let mut rcfg = ReceiverConfig::new(CLUSTER, RECEIVER, RECEIVER_EPOCH, SENDER);
        rcfg.reorder_capacity = 48;
        rcfg.max_nack_retries = 3;
        rcfg.ack_every = 8;
        rcfg.tx_queue_limit = 16;
        Some(Harness {
            tx: DeltaSender::new(scfg, 0).ok()?,
            rx: DeltaReceiver::new(rcfg).ok()?,
            now: 0,
            s2r: Vec::new(),
            r2s: Vec::new(),
            last: None,
        })
    }

    fn collect(&mut self) {
        while let Some(t) = self.tx.poll_transmit() {
            if self.s2r.len() < MAX_HOPS {
                self.s2r.push(t.frame);
            }
        }
        while let Some(t) = self.rx.poll_transmit() {
            if self.r2s.len() < MAX_HOPS {
                self.r2s.push(t.frame);
            }
        }
        while let Some(ev) = self.rx.poll_event() {
            match ev {
                ReceiverEvent::Deliver { seq, update } => {
                    assert!(update.validate().is_ok(), "delivered an update that does not validate");
                    let epoch = self.rx.epoch().unwrap_or(0);
                    if let Some((e, s)) = self.last {
                        assert!(e != epoch || seq > s, "delivered {seq} of epoch {epoch:#x} after {s}");
                    }
                    self.last = Some((epoch, seq));
                }
                ReceiverEvent::PeerReset { .. } => self.last = None,
                ReceiverEvent::ResyncNeeded { .. } => {}
            }
        }
    }

    fn datagram(&mut self, bytes: &[u8]) {
        parse_and_check(bytes);
        // One side through handle_datagram, the other through parse +
        // handle_frame: both entry points are public.
        let _ = self.rx.handle_datagram(bytes, self.now);
        if let Ok(view) = Frame::parse(bytes) {
            self.tx.handle_frame(&view, self.now);
        }
        self.collect();
    }

    fn timers(&mut self) {
        if self.tx.poll_timeout().is_some_and(|t| t <= self.now) {
            self.tx.handle_timeout(self.now);
        }
        if self.rx.poll_timeout().is_some_and(|t| t <= self.now) {
            self.rx.handle_timeout(self.now);
        }
        self.collect();
    }

    fn deliver(&mut self, mask: u8) {
        if mask & 4 != 0 {
            self.tx.flush();
            self.collect();
        }
        if mask & 1 != 0 {
            for f in std::mem::take(&mut self.s2r) {
                let _ = self.rx.handle_datagram(&f, self.now);
            }
        }
        if mask & 2 != 0 {
            for f in std::mem::take(&mut self.r2s) {
                let _ = self.tx.handle_datagram(&f, self.now);
            }
        }
        self.collect();
    }
}

/// The target.
pub fn run(data: &[u8]) {
    // The parser alone, on the raw input.
    parse_and_check(data);

    let mut r = Reader::new(data);
    let fix = r.u8() & 1 != 0;
    let Some(mut h) = Harness::new() else { return };
    h.collect();
    let mut ops = 0;
    while !r.is_empty() && ops < 256 {
        ops += 1;
        match r.u8() % 5 {
            0 => {
                let len = (r.u16() as usize).min(MAX_LEN);
                let mut buf = r.take(len).to_vec();
                if fix {
                    fix_checksum(&mut buf);
                }
                h.datagram(&buf);
            }
            1 => {
                h.now = h.now.saturating_add(r.u16() as u64 * 1000);
                h.timers();
            }
            2 => {
                let raw: [u8; 88] = r.array();
                if let Ok(rec) = DeltaRecord::read_from_bytes(&raw) {
                    if let Ok(u) = rec.decode() {
                        let _ = h.tx.submit(&u, h.now);
                        h.collect();
                    }
                }
            }
            3 => {
                let mask = r.u8();
                h.deliver(mask);
            }
            _ => {
                let (epoch, seq) = (r.u32(), r.u64());
                h.rx.start_at(epoch, seq, h.now);
                h.last = None;
                h.collect();
            }
        }
    }
}
