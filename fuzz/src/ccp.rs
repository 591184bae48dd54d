//! `ccp`: membership (CCP) datagrams: [`Message::parse`] and
//! [`Membership::handle_datagram`] (or, with flag bit 2,
//! [`Membership::handle_datagram_received`]: each datagram read some time
//! after it arrived, as after a stall of the member's loop), with time,
//! local commands and the member's own timers interleaved.
//!
//! The member under test is [`LOCAL`] of cluster [`CLUSTER`], with peers
//! [`PEERS`].
//!
//! Input: `flags: u8` (bit 0: fix the CRC of every datagram; bit 1: Load
//! Sharing instead of High Availability; bit 2: datagrams carry the time
//! they waited), then operations until the input ends:
//!
//! | op byte % 6 | operands | action |
//! |---|---|---|
//! | 0 | (bit 2: `age: u16`, × 100 µs), `len: u16`, `len` bytes | a datagram |
//! | 1 | `dt: u16` | time advances `dt` × 100 µs; due timers run |
//! | 2 | none | `set_synced` |
//! | 3 | `b: u8` | `set_attention(b & 1)` |
//! | 4 | `b: u8` | `request_standby`/`request_resync`/`request_merge` (b % 3) of member `b / 3 % 6` |
//! | 5 | `b: u8` | `set_down`, `query` or `set_digest` |
//!
//! Checks: `parse` never panics, and a message it accepts encodes back to
//! the same bytes; the member's queues stay bounded.

use nicsync::membership::{
    checksum, Membership, MembershipParams, Message, Mode, CHECKSUM_OFFSET, EVENT_QUEUE_LIMIT, HEADER_SIZE,
    TX_QUEUE_LIMIT,
};

use crate::Reader;

/// Cluster id.
pub const CLUSTER: u16 = 7;
/// The member under test.
pub const LOCAL: u16 = 1;
/// Its peers.
pub const PEERS: [u16; 3] = [2, 3, 4];
/// Its incarnation.
pub const INCARNATION: u32 = 0x1111_2222;
/// Largest datagram the harness builds.
const MAX_LEN: usize = 1024;

/// Sets the checksum of a would-be message to the CRC of its bytes.
pub fn fix_checksum(buf: &mut [u8]) {
    if buf.len() >= HEADER_SIZE {
        let crc = checksum(buf);
        buf[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

fn parse_round_trip(buf: &[u8]) {
    match Message::parse(buf) {
        Ok(view) => {
            let _ = (view.entry_count(), view.target(), view.is_announcement());
            let msg = view.to_message();
            match msg.encode() {
                Ok(bytes) => assert!(bytes == buf, "a parsed message does not encode back to its bytes"),
                Err(e) => panic!("a parsed message does not encode: {e:?}"),
            }
        }
        Err(e) => {
            let _ = format!("{e:?}");
        }
    }
}

/// The target.
pub fn run(data: &[u8]) {
    parse_round_trip(data);
    let mut r = Reader::new(data);
    let flags = r.u8();
    let mode = if flags & 2 != 0 { Mode::LoadSharing } else { Mode::HighAvailability };
    let Ok(mut m) = Membership::new(MembershipParams::new(CLUSTER, LOCAL, PEERS.to_vec(), mode, INCARNATION), 0) else {
        return;
    };
    let mut now = 0u64;
    let mut ops = 0;
    while !r.is_empty() && ops < 256 {
        ops += 1;
        match r.u8() % 6 {
            0 => {
                let age = if flags & 4 != 0 { r.u16() as u64 * 100_000 } else { 0 };
                let len = (r.u16() as usize).min(MAX_LEN);
                let mut buf = r.take(len).to_vec();
                if flags & 1 != 0 {
                    fix_checksum(&mut buf);
                }
                parse_round_trip(&buf);
                if flags & 4 != 0 {
                    let _ = m.handle_datagram_received(&buf, now.saturating_sub(age), now);
                } else {
                    let _ = m.handle_datagram(&buf, now);
                }
            }
            1 => {
                now = now.saturating_add(r.u16() as u64 * 100_000);
                if m.poll_timeout().is_some_and(|t| t <= now) {
                    m.handle_timeout(now);
                }
            }
            2 => m.set_synced(now),
            3 => m.set_attention(r.bool(), now),
            4 => {
                let b = r.u8();
                let target = (b / 3) as u16 % 6;
                match b % 3 {
                    0 => m.request_standby(target, now),
                    1 => m.request_resync(target, now),
                    _ => m.request_merge(target, now),
                }
            }
            _ => match r.u8() % 3 {
                0 => m.set_down(now),
                1 => m.query(now),
                _ => m.set_digest(now),
            },
        }
        // Queues are bounded whether or not the host drains them; drain
        // only now and then so that the bounds are exercised too.
        if ops % 4 == 0 {
            let mut n = 0;
            while let Some(t) = m.poll_transmit() {
                n += 1;
                parse_round_trip(&t.bytes);
                assert!(Message::parse(&t.bytes).is_ok(), "the member sent a message it would refuse");
            }
            assert!(n <= TX_QUEUE_LIMIT, "transmit queue exceeded its bound: {n}");
            let mut e = 0;
            while m.poll_event().is_some() {
                e += 1;
            }
            assert!(e <= EVENT_QUEUE_LIMIT, "event queue exceeded its bound: {e}");
        }
    }
    let _ = (m.members(), m.sync_source(), m.stats(), m.local_state(), m.is_active(), m.has_quorum());
    for p in PEERS {
        let _ = (m.peer_report(p), m.peer_digest(p));
    }
}
