//! `fullsync_chunk`: the Full Sync stream decoder and both state machines
//! ([`FullSyncClient`], [`FullSyncServer`]) fed arbitrary bytes as the TCP
//! stream from the peer, cut into pieces at fuzz-chosen points.
//!
//! Input: `flags: u8`, `cuts: u8`, then `cuts % 16` piece sizes (one byte
//! each, size `b + 1`, used in turn), then the stream.
//!
//! | flags bit | meaning |
//! |---|---|
//! | 0 | be the server (the stream is the client's); else the client |
//! | 1 | fix the CRC of every complete message in the stream first |
//! | 2 | the local driver misbehaves now and then (wrong `chunk_applied` index, early `push_chunk`) |
//! | 3 | end with EOF |
//! | 4-5 | records per chunk asked for / allowed: 1, 2, 4 or 16 |
//! | 6 | the stream is authenticated (a sealed channel): messages without a checksum (`FLAG_NO_CHECKSUM`) are taken, and this side sends none |
//!
//! The client is member [`CLIENT`] of cluster [`CLUSTER`] with session
//! [`SESSION`]; the server is member [`SERVER`] and sends [`SERVER_RECORDS`]
//! records from [`server_records`].
//!
//! Checks: the decoder never panics and every message it accepts encodes
//! back to the same bytes; a client that reports Done delivered exactly the
//! records it counts, and reports nothing after Done or Failed; a server
//! that finishes sent every record.

use nicsync::fullsync::{
    checksum, encode, encode_unchecked, ClientEvent, FullSyncClient, FullSyncParams, FullSyncServer, StreamDecoder,
    CHECKSUM_OFFSET, HEADER_SIZE,
};
use nicsync_fwif::sync::{DeltaRecord, DeltaUpdate};

use crate::{key, nat_for, state, Reader};

/// Cluster id of both sides.
pub const CLUSTER: u16 = 7;
/// Member id of the client.
pub const CLIENT: u16 = 2;
/// Member id of the server.
pub const SERVER: u16 = 1;
/// The client's session id.
pub const SESSION: u32 = 0x5EED_F00D;
/// Records the server has to send.
pub const SERVER_RECORDS: usize = 5;
/// Step timeout of both sides.
pub const TIMEOUT_NS: u64 = 1_000_000_000;
/// Time that passes per piece.
const STEP_NS: u64 = 50_000_000;

/// The records the server walks.
pub fn server_records() -> Vec<DeltaRecord> {
    (0..SERVER_RECORDS as u8)
        .map(|i| {
            let k = key(i);
            if i == 3 {
                DeltaUpdate::delete(SERVER, k, state(0, 7)).to_record()
            } else {
                DeltaUpdate::upsert(SERVER, k, state(i.into(), 1), nat_for(&k)).to_record()
            }
        })
        .collect()
}

/// Records per chunk for a flags byte.
pub fn chunk_records(flags: u8) -> u32 {
    [1, 2, 4, 16][((flags >> 4) & 3) as usize]
}

/// Rewrites the checksum of every complete message in `stream`.
pub fn fix_checksums(stream: &mut [u8]) {
    let mut off = 0;
    while stream.len() - off >= HEADER_SIZE {
        let len = u32::from_le_bytes([stream[off + 24], stream[off + 25], stream[off + 26], stream[off + 27]]) as usize;
        let Some(end) = (off + HEADER_SIZE).checked_add(len).filter(|e| *e <= stream.len()) else { break };
        let mut hdr = [0u8; HEADER_SIZE];
        hdr.copy_from_slice(&stream[off..off + HEADER_SIZE]);
        let crc = checksum(&hdr, &stream[off + HEADER_SIZE..end]);
        stream[off + CHECKSUM_OFFSET..off + CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        off = end;
    }
}

/// Whether flags say the stream is authenticated (bit 6).
fn authenticated(flags: u8) -> bool {
    flags & 0x40 != 0
}

fn decoder(flags: u8) -> StreamDecoder {
    StreamDecoder::with_authentication(authenticated(flags))
}

/// The decoder on its own: every accepted message re-encodes to its bytes
/// (without its checksum where it came without one).
fn decode_round_trip(flags: u8, stream: &[u8]) {
    let mut dec = decoder(flags);
    let mut rest = stream;
    while !rest.is_empty() {
        let (used, res) = dec.feed(rest);
        match res {
            Some(Ok(env)) => {
                let mut out = Vec::new();
                let unchecked = rest.get(6).is_some_and(|f| f & 1 != 0);
                let enc = if unchecked { encode_unchecked } else { encode };
                enc(&env.message, env.cluster_id, env.sender, env.session, &mut out);
                assert!(out == rest[..used], "a decoded message does not encode back to its bytes: {:?}", env);
            }
            Some(Err(e)) => {
                let _ = (e.to_string(), e.code());
                break;
            }
            None if used == 0 => break,
            None => {}
        }
        rest = &rest[used..];
    }
}

fn pieces<'a>(stream: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = if cuts.is_empty() { rest.len() } else { cuts[i % cuts.len()] as usize + 1 };
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
        i += 1;
    }
    out
}

fn params(member: u16, flags: u8) -> FullSyncParams {
    FullSyncParams {
        cluster_id: CLUSTER,
        member_id: member,
        chunk_records: chunk_records(flags),
        timeout_ns: TIMEOUT_NS,
        authenticated: authenticated(flags),
    }
}

fn run_client(flags: u8, parts: &[&[u8]], tx: &mut Vec<u8>) {
    let misbehave = flags & 4 != 0;
    let mut c = FullSyncClient::new(params(CLIENT, flags), SESSION, 0);
    let (mut now, mut delivered, mut finished) = (0u64, 0u64, false);
    let mut drain = |c: &mut FullSyncClient, now: u64, k: usize| {
        while let Some(ev) = c.poll_event() {
            assert!(!finished, "client event after Done/Failed: {ev:?}");
            match ev {
                ClientEvent::Begin { .. } => {}
                ClientEvent::Chunk { index, records } => {
                    assert!(!records.is_empty() && records.len() <= c.chunk_records() as usize);
                    delivered += records.len() as u64;
                    let index = if misbehave && k % 7 == 3 { index.wrapping_add(1) } else { index };
                    c.chunk_applied(index, now);
                }
                ClientEvent::Done { records, digest_ok } => {
                    assert!(digest_ok);
                    assert_eq!(records, delivered, "Done counts other records than were delivered");
                    assert!(matches!(c.outcome(), Some(Ok(_))));
                    finished = true;
                }
                ClientEvent::Failed(e) => {
                    let _ = e.to_string();
                    assert!(matches!(c.outcome(), Some(Err(_))));
                    finished = true;
                }
            }
        }
    };
    for (k, p) in parts.iter().enumerate() {
        c.handle_bytes(p, now);
        drain(&mut c, now, k);
        now += STEP_NS;
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
        c.poll_transmit(tx);
        drain(&mut c, now, k);
    }
    if flags & 8 != 0 {
        c.handle_eof();
        drain(&mut c, now, 0);
    }
    let _ = (c.session(), c.peer());
}

fn run_server(flags: u8, parts: &[&[u8]], tx: &mut Vec<u8>) {
    let misbehave = flags & 4 != 0;
    let records = server_records();
    let mut s = FullSyncServer::new(params(SERVER, flags), 0);
    let (mut now, mut sent) = (0u64, 0usize);
    let mut act = |s: &mut FullSyncServer, now: u64, k: usize| {
        if s.wants_begin() {
            s.begin(41, 0xE90C, records.len() as u64, now);
        }
        if s.wants_chunk() || (misbehave && k % 5 == 2) {
            let n = (s.chunk_records() as usize).min(records.len() - sent);
            s.push_chunk(&records[sent..sent + n], now);
            sent += n;
        }
    };
    for (k, p) in parts.iter().enumerate() {
        s.handle_bytes(p, now);
        act(&mut s, now, k);
        now += STEP_NS;
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now);
        }
        s.poll_transmit(tx);
    }
    if flags & 8 != 0 {
        s.handle_eof();
    }
    if let Some(Ok(done)) = s.outcome() {
        assert_eq!(done.records as usize, records.len(), "server finished without sending every record");
    }
    let _ = (s.session(), s.peer());
}

/// The target.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let ncuts = r.u8() as usize % 16;
    let cuts = r.take(ncuts).to_vec();
    let mut stream = r.rest().to_vec();
    if flags & 2 != 0 {
        fix_checksums(&mut stream);
    }
    decode_round_trip(flags, &stream);
    let parts = pieces(&stream, &cuts);
    let mut tx = Vec::new();
    if flags & 1 != 0 {
        run_server(flags, &parts, &mut tx);
    } else {
        run_client(flags, &parts, &mut tx);
    }
    // What a side sends must itself decode (by a peer as authenticated).
    let mut dec = decoder(flags);
    dec.push(&tx);
    while let Some(m) = dec.next_frame() {
        assert!(m.is_ok(), "a state machine sent a message its peer refuses: {m:?}");
    }
}
