//! Full Sync: a joining member pulls a consistent copy of an active member's
//! connection table over one TCP connection.
//!
//! A member that joins the cluster (or rejoins after it lost Delta Sync
//! updates) has an empty or stale table. Its host, the *client*, connects to
//! the host of an active member, the *server*, which walks a snapshot of its
//! device table and streams it in chunks of [`DeltaRecord`]s. The snapshot is
//! consistent at the server's Delta Sync sequence number `snapshot_seq`
//! (sent in BEGIN): the client applies the chunks, then the server's delta
//! updates after `snapshot_seq`, and has then converged. BEGIN also carries
//! the walk's *cut* (version 2): where it starts in every member's stream
//! (SYNC_POSITIONS on the server's card), which the client hands to its own
//! card (SYNC_ALIGN) so that it asks its peers for none of the history the
//! snapshot holds (docs/cluster.md, `join_history_covered`).
//!
//! Everything here is sans-IO, in the manner of quinn-proto:
//! [`FullSyncServer`] and [`FullSyncClient`] own no socket, clock or thread.
//! The driver hands them the bytes it read and the time `now` (nanoseconds
//! on any monotonic clock), writes what `poll_transmit` gives it, and calls
//! `handle_timeout` at the instant `poll_timeout` names. [`StreamDecoder`]
//! and [`encode`] are the wire format on its own.
//!
//! # Messages
//!
//! Every message is a 32-byte [`FsHeader`] followed by `payload_len` bytes.
//! All integers are little-endian.
//!
//! | kind | value | direction | `index` | `count` | payload |
//! |---|---|---|---|---|---|
//! | REQUEST | 1 | client → server | 0 | 0 | [`RequestBody`] (8): requested records per chunk, reserved |
//! | BEGIN | 2 | server → client | 0 | cut entries, 0..=65 | [`BeginBody`] (24): `snapshot_seq`, sender epoch, agreed records per chunk, estimated records; then `count` × 16-byte [`SyncPosition`] (the cut) |
//! | CHUNK | 3 | server → client | chunk number, from 0 | records, 1..=agreed | `count` × 88-byte [`DeltaRecord`] |
//! | ACK | 4 | client → server | chunk applied; after END: number of chunks | 0 | none |
//! | END | 5 | server → client | 0 | total records | [`EndBody`] (8): table digest |
//! | ERROR | 6 | either | 0 | 0 | `u32` code ([`error_code`]) + 0..=256 bytes of UTF-8 reason |
//!
//! | offset | size | header field | rule |
//! |---|---|---|---|
//! | 0 | 4 | `magic` | [`FS_MAGIC`], the bytes `NFSY` |
//! | 4 | 1 | `version` | [`FS_VERSION`] |
//! | 5 | 1 | `kind` | [`MsgKind`] |
//! | 6 | 2 | `flags` | 0, or [`FLAG_NO_CHECKSUM`] on an authenticated stream |
//! | 8 | 2 | `cluster_id` | the receiver's cluster |
//! | 10 | 2 | `sender` | member id of the sender; the same for a whole session |
//! | 12 | 4 | `session` | chosen by the client, never 0, echoed by the server (ERROR: 0 = "unknown") |
//! | 16 | 4 | `index` | table above |
//! | 20 | 4 | `count` | table above |
//! | 24 | 4 | `payload_len` | at most [`MAX_PAYLOAD`] (16 MiB), exact for the kind |
//! | 28 | 4 | `checksum` | CRC-32C (Castagnoli) of the header with this field zero, then the payload; 0 with [`FLAG_NO_CHECKSUM`] |
//!
//! A stream inside the cluster's sealed channel (docs/security.md: every
//! byte authenticated by AES-256-GCM) carries no checksum: its messages set
//! [`FLAG_NO_CHECKSUM`] and a zero `checksum`, since the seal already
//! refuses any changed byte, and the CRC-32C of every chunk, on both
//! sides, cost 8 % of a 1,000,000-entry Full Sync here (about 40 ms of
//! 510). A decoder accepts the flag only when its stream is
//! authenticated ([`StreamDecoder::authenticated`],
//! [`FullSyncParams::authenticated`]); on a plain stream such a message
//! fails its checksum ([`FsError::Checksum`]).
//!
//! The decoder checks magic, version and the payload limit as soon as the 32
//! header bytes are in, before it buffers a byte of payload; then the
//! checksum over the whole message; then kind, flags, the per-kind rules of
//! the table and every record ([`DeltaRecord::validate`]). The first fault
//! ends the stream with an [`FsError`] naming it. A flipped bit anywhere
//! after the version byte is therefore reported as [`FsError::Checksum`],
//! except in `payload_len`, where it may also show as [`FsError::TooLong`]
//! or as a stream that never completes ([`FsError::Timeout`]).
//!
//! # Exchange
//!
//! ```text
//!  client                                    server
//!  new(): REQUEST ───────────────────────►   wants_begin()
//!                                            begin(snapshot_seq, epoch, estimate)
//!         ◄─────────────────────── BEGIN     wants_chunk(): push_chunk(records)
//!         ◄─────────────────────── CHUNK 0
//!  event Chunk 0, host applies it
//!  chunk_applied(0): ACK 0 ──────────────►   wants_chunk(): push_chunk(records)
//!         ◄─────────────────────── CHUNK 1
//!   …                                         …
//!  chunk_applied(n-1): ACK n-1 ──────────►   wants_chunk(): push_chunk(&[])
//!         ◄─────────────────────── END (count, digest)
//!  count and digest match: Done
//!  final ACK n ──────────────────────────►   Done
//! ```
//!
//! The server waits for a REQUEST, then for the driver's [`begin`]
//! (`wants_begin`), sends BEGIN, and then alternates between waiting for the
//! driver's next records (`wants_chunk`) and waiting for the ACK of the chunk
//! it sent. An empty [`push_chunk`] sends END; the server is done when the
//! client's *final ACK*, whose index is the number of chunks, arrives: that
//! ACK means "I received every chunk in order, and the count and the digest
//! match". It does not mean the joiner's table is written: its host may
//! still be writing the last chunk or two, and a joiner whose write then
//! fails pulls again, although the server counted the session served. The client waits for BEGIN, then alternates
//! between waiting for a CHUNK or END and waiting for its host to apply the
//! chunk it delivered ([`chunk_applied`] sends the ACK). It reports Done only
//! after an END whose count and digest match every record it received, in
//! order, without gaps: never a half table marked as synced.
//!
//! Any malformed message, wrong cluster, session or sender, unexpected kind,
//! chunk out of order, limit exceeded or timeout fails the side that sees
//! it: its outcome becomes `Err`, it queues an ERROR for the peer (best
//! effort; none in answer to an ERROR) and ignores all further input. An
//! ERROR from the peer fails the receiver with [`FsError::Remote`].
//!
//! # Why stop-and-wait with large chunks
//!
//! Exactly one chunk is unacknowledged at any time, and the client
//! acknowledges a chunk only once its host has *taken* it to apply
//! ([`FullSyncClient::chunk_applied`]). That makes the client's apply rate
//! the flow control (the server walks its device table no faster than the
//! client can insert) and bounds the memory of both sides to a chunk or
//! two. nicsync's host takes a chunk at once when it is writing no other,
//! and otherwise when it finishes the one it is writing, so the server
//! walks and sends chunk n+1 while the client writes chunk n; a failed
//! session leaves the client with the records it wrote, which it counts.
//! TCP already provides ordering and retransmission, so a window would buy
//! only the overlap of one round trip per chunk, which large chunks make
//! negligible: with the default [`DEFAULT_CHUNK_RECORDS`] (32,768 records,
//! 2.75 MiB per chunk) a table of one million connections takes 31 round
//! trips, about 3 ms at a 100 µs data-centre round trip, against the 64 ms
//! the 80 MB need on a 10 Gb/s link. Each chunk also costs both hosts a
//! fixed amount of work (buffers, a SNAPSHOT walk's start, the stream's
//! reads): 8,192-record chunks made the same pull about 7 % slower here
//! (638 against 595 ms, medians of four alternating pairs), 2,048-record
//! ones about a third (794 ms).
//!
//! # Digest
//!
//! END carries the digest of the records sent (tombstones included: a
//! snapshot carries its deletes as records), defined so that, over a table
//! without tombstones, it also compares the tables of converged members
//! (`nicsync conn digest`, which walks live entries only):
//! the wrapping sum, modulo 2^64, of [`record_digest`] over all records,
//! which does not depend on the order the table is walked in. The record
//! hash covers:
//!
//! * the member that owns the record;
//! * the whole key (addresses, ports, protocol, family, zone);
//! * the state's TCP state, direction, flags, mark and generation, and
//!   whether the entry ages at all (`timeout_s != 0`);
//! * the NAT part (address, port, kind, family, reserved), taken as all zero
//!   when its kind is None (the device reports untranslated entries so).
//!
//! It leaves out the *value* of `timeout_s`: a record carries the seconds
//! that remain, which differ between members and change by the second.
//! Everything covered is replicated verbatim by Delta Sync, so converged
//! members have equal digests. The hash mixes the ten little-endian 64-bit
//! words of that canonical form (exact definition at [`record_digest`]); it
//! is part of the protocol's version (2) and must not change without a
//! version change. It does not cover the record's op: an op changed on
//! the way is caught by the message checksum (in clear) or the seal's
//! authentication, not by END.
//!
//! # Timeouts
//!
//! `timeout_ns` bounds every step that waits on the peer: the REQUEST after
//! the server is created, BEGIN after the client is created
//! ([`BEGIN_WAIT_TIMEOUTS`] times it: the source may be serving another
//! joiner's walk first), each CHUNK or
//! END after the client's ACK (the server's device walk for the next chunk
//! included), and each ACK after the server's CHUNK or END (the transfer of
//! the chunk and the client's apply included). Steps that wait on the local
//! driver (`begin`, `push_chunk`, `chunk_applied`) have no deadline here.
//! The server waits [`ACK_WAIT_TIMEOUTS`] times it for each ACK, and the
//! client as long for each CHUNK or END (a transfer, on a lossy link TCP's
//! retransmissions, is part of those waits). A server's deadline is not
//! moved by partial messages; a client's, waiting for a CHUNK or END, is
//! moved on by each part that arrives, up to [`PROGRESS_WAIT_TIMEOUTS`]
//! timeouts for one message.
//!
//! [`begin`]: FullSyncServer::begin
//! [`push_chunk`]: FullSyncServer::push_chunk
//! [`chunk_applied`]: FullSyncClient::chunk_applied

use std::collections::VecDeque;
use std::fmt;

use nicsync_fwif::cmd::{SyncPosition, MAX_POSITIONS};
use nicsync_fwif::sync::{DeltaOp, DeltaRecord, RecordFault};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Time in nanoseconds on the driver's monotonic clock.
pub type Nanos = u64;

/// Message magic: the bytes `N F S Y` read as a little-endian `u32`.
pub const FS_MAGIC: u32 = u32::from_le_bytes(*b"NFSY");
/// Version of this protocol (2: BEGIN carries the snapshot's cut, and
/// [`FLAG_NO_CHECKSUM`]). A peer speaking another version is refused with
/// [`FsError::BadVersion`]: the members of a cluster run one release.
pub const FS_VERSION: u8 = 2;
/// Header flag: no checksum; the stream is authenticated (see the module
/// docs).
pub const FLAG_NO_CHECKSUM: u16 = 0x0001;
/// Size of the message header.
pub const HEADER_SIZE: usize = 32;
/// Byte offset of the checksum field in the header.
pub const CHECKSUM_OFFSET: usize = 28;
/// Size of one [`DeltaRecord`] on the wire.
pub const RECORD_SIZE: usize = nicsync_fwif::sync::RECORD_SIZE;

/// Why a snapshot record is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotRecordError {
    /// The record itself is malformed.
    #[error("{0}")]
    Record(RecordFault),
    /// Every entry has an owner member.
    #[error("snapshot record without an owner")]
    NoOwner,
}

/// Checks a snapshot record: well-formed, with an owner. UPSERT records
/// are entries, DELETE records tombstones (recent deletes, so that the
/// reader ranks later changes as the writer does).
pub fn check_record(r: &DeltaRecord) -> Result<(), SnapshotRecordError> {
    r.validate().map_err(SnapshotRecordError::Record)?;
    if r.owner.get() == 0 {
        return Err(SnapshotRecordError::NoOwner);
    }
    Ok(())
}
/// Largest `payload_len` a receiver accepts (16 MiB).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Most records one CHUNK can carry.
pub const MAX_CHUNK_RECORDS: u32 = (MAX_PAYLOAD / RECORD_SIZE) as u32;
/// Most bytes of reason text in an ERROR.
pub const MAX_REASON: usize = 256;
/// Records per chunk a [`FullSyncParams::new`] asks for (2.75 MiB chunks;
/// see "Why stop-and-wait with large chunks").
pub const DEFAULT_CHUNK_RECORDS: u32 = 32768;
/// Step timeout of [`FullSyncParams::new`] (10 s).
pub const DEFAULT_TIMEOUT_NS: Nanos = 10_000_000_000;
/// Size of a REQUEST payload.
pub const REQUEST_SIZE: usize = 8;
/// Size of a BEGIN payload.
pub const BEGIN_SIZE: usize = 24;
/// Size of an END payload.
pub const END_SIZE: usize = 8;
/// Size of the code that starts an ERROR payload.
pub const ERROR_CODE_SIZE: usize = 4;

const _: () = {
    assert!(core::mem::size_of::<DeltaRecord>() == RECORD_SIZE);
    assert!(MAX_CHUNK_RECORDS == 190_650);
    assert!(MAX_PAYLOAD <= u32::MAX as usize);
    assert!(ERROR_CODE_SIZE + MAX_REASON <= MAX_PAYLOAD);
};

/// Codes carried by ERROR messages.
pub mod error_code {
    /// A malformed or unexpected message, or a chunk out of order.
    pub const PROTOCOL: u32 = 1;
    /// A message failed its CRC-32C.
    pub const CHECKSUM: u32 = 2;
    /// The sender waited too long for the peer.
    pub const TIMEOUT: u32 = 3;
    /// END's count or digest does not match the records received.
    pub const MISMATCH: u32 = 4;
    /// Wrong cluster, session or sender.
    pub const WRONG_PEER: u32 = 5;
    /// The sender gave up for a local reason (its driver, an overflow).
    pub const ABORTED: u32 = 6;
}

/// Message kinds (the header's `kind` byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgKind {
    /// Client asks for a snapshot.
    Request = 1,
    /// Server starts the snapshot.
    Begin = 2,
    /// Server sends records.
    Chunk = 3,
    /// Client has applied a chunk (or, after END, verified the table).
    Ack = 4,
    /// Server has sent every record.
    End = 5,
    /// Either side gives up.
    Error = 6,
}

impl MsgKind {
    /// Every kind.
    pub const ALL: [MsgKind; 6] =
        [MsgKind::Request, MsgKind::Begin, MsgKind::Chunk, MsgKind::Ack, MsgKind::End, MsgKind::Error];

    /// Decodes a kind byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == b)
    }

    /// Upper-case name.
    pub const fn name(self) -> &'static str {
        match self {
            MsgKind::Request => "REQUEST",
            MsgKind::Begin => "BEGIN",
            MsgKind::Chunk => "CHUNK",
            MsgKind::Ack => "ACK",
            MsgKind::End => "END",
            MsgKind::Error => "ERROR",
        }
    }
}

impl fmt::Display for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 32-byte message header as it is on the wire (module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FsHeader {
    /// [`FS_MAGIC`].
    pub magic: U32,
    /// [`FS_VERSION`].
    pub version: u8,
    /// [`MsgKind`] byte.
    pub kind: u8,
    /// Zero, or [`FLAG_NO_CHECKSUM`].
    pub flags: U16,
    /// Cluster of the sender.
    pub cluster_id: U16,
    /// Member id of the sender.
    pub sender: U16,
    /// Session id chosen by the client.
    pub session: U32,
    /// CHUNK and ACK: chunk number; otherwise 0.
    pub index: U32,
    /// CHUNK: records in it; END: total records; otherwise 0.
    pub count: U32,
    /// Payload bytes after the header.
    pub payload_len: U32,
    /// CRC-32C of the header with this field zero, followed by the payload.
    pub checksum: U32,
}
nicsync_fwif::assert_layout!(
    FsHeader,
    size = HEADER_SIZE,
    magic = 0,
    version = 4,
    kind = 5,
    flags = 6,
    cluster_id = 8,
    sender = 10,
    session = 12,
    index = 16,
    count = 20,
    payload_len = 24,
    checksum = CHECKSUM_OFFSET
);

/// Payload of REQUEST.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestBody {
    /// Most records per CHUNK the client accepts, 1..=[`MAX_CHUNK_RECORDS`].
    pub chunk_records: U32,
    /// Reserved (future option bits), zero.
    pub reserved: U32,
}
nicsync_fwif::assert_layout!(RequestBody, size = REQUEST_SIZE, chunk_records = 0, reserved = 4);

/// Payload of BEGIN.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BeginBody {
    /// The server's Delta Sync sequence number the snapshot is consistent at.
    pub snapshot_seq: U64,
    /// The server's Delta Sync epoch.
    pub epoch: U32,
    /// Agreed records per chunk: 1..= the client's request.
    pub chunk_records: U32,
    /// The server's estimate of the records to come (a hint, not checked).
    pub estimated_records: U64,
}
nicsync_fwif::assert_layout!(
    BeginBody,
    size = BEGIN_SIZE,
    snapshot_seq = 0,
    epoch = 8,
    chunk_records = 12,
    estimated_records = 16
);

/// Payload of END.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EndBody {
    /// [`TableDigest::digest`] of every record sent.
    pub digest: U64,
}
nicsync_fwif::assert_layout!(EndBody, size = END_SIZE, digest = 0);

/// Why a Full Sync session failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// Not a Full Sync stream (or the stream lost its framing).
    #[error("bad magic {0:#010x}: not a Full Sync stream")]
    BadMagic(u32),
    /// Unsupported protocol version.
    #[error("unsupported Full Sync version {0}")]
    BadVersion(u8),
    /// Unknown kind byte.
    #[error("unknown message kind {0:#04x}")]
    BadKind(u8),
    /// Header flags are not zero.
    #[error("header flags {0:#06x} are not zero")]
    BadFlags(u16),
    /// `payload_len` above [`MAX_PAYLOAD`] (refused before buffering).
    #[error("payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong {
        /// The header's `payload_len`.
        len: u32,
    },
    /// `payload_len` wrong for the kind (or for a CHUNK's `count`).
    #[error("{kind} with {len} payload bytes and count {count}")]
    BadLength {
        /// The kind.
        kind: MsgKind,
        /// The header's `count`.
        count: u32,
        /// The header's `payload_len`.
        len: u32,
    },
    /// A header or body field breaks its rule (module docs).
    #[error("{kind}: {field} = {value} is not allowed")]
    BadField {
        /// The kind.
        kind: MsgKind,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// An ERROR reason is not UTF-8.
    #[error("ERROR reason is not UTF-8")]
    BadReason,
    /// The CRC-32C does not match.
    #[error("checksum mismatch: header says {expected:#010x}, the bytes give {got:#010x}")]
    Checksum {
        /// The header's checksum.
        expected: u32,
        /// The checksum of the bytes received.
        got: u32,
    },
    /// A record is malformed.
    #[error("chunk {chunk}, record {index}: {reason}")]
    BadRecord {
        /// Chunk number.
        chunk: u32,
        /// Index of the record in the chunk.
        index: u32,
        /// What is wrong.
        reason: SnapshotRecordError,
    },
    /// A message of another cluster.
    #[error("message of cluster {got}, this is cluster {expected}")]
    WrongCluster {
        /// Our cluster.
        expected: u16,
        /// The message's.
        got: u16,
    },
    /// A message of another session.
    #[error("message of session {got:#x}, this session is {expected:#x}")]
    WrongSession {
        /// Our session.
        expected: u32,
        /// The message's.
        got: u32,
    },
    /// A message from another member than the session's peer.
    #[error("message from member {got}, the peer is member {expected}")]
    WrongSender {
        /// The peer's member id.
        expected: u16,
        /// The message's.
        got: u16,
    },
    /// A message the state does not allow (a CHUNK before the last one was
    /// acknowledged included).
    #[error("{kind} not expected while {state}")]
    UnexpectedKind {
        /// What the receiver was doing.
        state: &'static str,
        /// The kind received.
        kind: MsgKind,
    },
    /// A CHUNK or ACK with the wrong chunk number.
    #[error("chunk number {got} out of order, expected {expected}")]
    OutOfOrder {
        /// The number expected.
        expected: u32,
        /// The number received.
        got: u32,
    },
    /// A chunk with more records than agreed (or given to `push_chunk`).
    #[error("chunk of {count} records exceeds the agreed {max}")]
    TooManyRecords {
        /// Records in the chunk.
        count: u64,
        /// The agreed maximum.
        max: u32,
    },
    /// END's count differs from the records received.
    #[error("END says {expected} records, {got} were received")]
    CountMismatch {
        /// END's count.
        expected: u64,
        /// Records received.
        got: u64,
    },
    /// END's digest differs from the digest of the records received.
    #[error("END digest {expected:#018x} differs from the records' {got:#018x}")]
    DigestMismatch {
        /// END's digest.
        expected: u64,
        /// Digest of the records received.
        got: u64,
    },
    /// The peer did not answer in time.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// The peer sent ERROR.
    #[error("peer failed with code {code}: {reason}")]
    Remote {
        /// Its code ([`error_code`]).
        code: u32,
        /// Its reason.
        reason: String,
    },
    /// The local driver aborted the session ([`FullSyncServer::abort`]).
    #[error("aborted (code {code}): {reason}")]
    Aborted {
        /// The code sent.
        code: u32,
        /// The reason sent.
        reason: String,
    },
    /// The local driver called the API out of turn.
    #[error("API misuse: {what}")]
    Misuse {
        /// What was wrong.
        what: &'static str,
    },
    /// A counter does not fit its wire field.
    #[error("{what} does not fit its wire field")]
    Overflow {
        /// The counter.
        what: &'static str,
    },
    /// The peer closed the connection before the session finished.
    #[error("the peer closed the connection")]
    Closed,
}

impl FsError {
    /// The [`error_code`] an ERROR reporting this failure carries.
    pub fn code(&self) -> u32 {
        match self {
            FsError::Checksum { .. } => error_code::CHECKSUM,
            FsError::Timeout { .. } => error_code::TIMEOUT,
            FsError::CountMismatch { .. } | FsError::DigestMismatch { .. } => error_code::MISMATCH,
            FsError::WrongCluster { .. } | FsError::WrongSession { .. } | FsError::WrongSender { .. } => {
                error_code::WRONG_PEER
            }
            FsError::Remote { code, .. } | FsError::Aborted { code, .. } => *code,
            FsError::Misuse { .. } | FsError::Overflow { .. } | FsError::Closed => error_code::ABORTED,
            FsError::BadMagic(_)
            | FsError::BadVersion(_)
            | FsError::BadKind(_)
            | FsError::BadFlags(_)
            | FsError::TooLong { .. }
            | FsError::BadLength { .. }
            | FsError::BadField { .. }
            | FsError::BadReason
            | FsError::BadRecord { .. }
            | FsError::UnexpectedKind { .. }
            | FsError::OutOfOrder { .. }
            | FsError::TooManyRecords { .. } => error_code::PROTOCOL,
        }
    }
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Client asks for a snapshot.
    Request {
        /// Most records per chunk the client accepts.
        chunk_records: u32,
    },
    /// Server starts the snapshot.
    Begin {
        /// Delta Sync sequence number the snapshot is consistent at.
        snapshot_seq: u64,
        /// The server's Delta Sync epoch.
        epoch: u32,
        /// Agreed records per chunk.
        chunk_records: u32,
        /// Estimated records (a hint).
        estimated_records: u64,
        /// Where the snapshot was cut in each member's Delta Sync stream
        /// (SYNC_POSITIONS on the server; empty from a card without it).
        cut: Vec<SyncPosition>,
    },
    /// Records.
    Chunk {
        /// Chunk number, from 0.
        index: u32,
        /// The records, each validated.
        records: Vec<DeltaRecord>,
    },
    /// The client applied chunk `index` (after END: `index` = number of
    /// chunks, the table is verified).
    Ack {
        /// Chunk number.
        index: u32,
    },
    /// Every record was sent.
    End {
        /// Total records.
        count: u32,
        /// [`TableDigest::digest`] of them.
        digest: u64,
    },
    /// The sender gives up.
    Error {
        /// [`error_code`].
        code: u32,
        /// Reason (at most [`MAX_REASON`] bytes are sent).
        reason: String,
    },
}

impl Message {
    /// The kind.
    pub fn kind(&self) -> MsgKind {
        match self {
            Message::Request { .. } => MsgKind::Request,
            Message::Begin { .. } => MsgKind::Begin,
            Message::Chunk { .. } => MsgKind::Chunk,
            Message::Ack { .. } => MsgKind::Ack,
            Message::End { .. } => MsgKind::End,
            Message::Error { .. } => MsgKind::Error,
        }
    }
}

/// A decoded message with its header's addressing fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The sender's cluster.
    pub cluster_id: u16,
    /// The sender's member id.
    pub sender: u16,
    /// The session.
    pub session: u32,
    /// The message.
    pub message: Message,
}

/// The longest prefix of `s` of at most [`MAX_REASON`] bytes that ends on a
/// character boundary.
fn clip_reason(s: &str) -> &str {
    let mut n = s.len().min(MAX_REASON);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s.get(..n).unwrap_or("")
}

fn sat_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Appends one message from its parts and seals it with its checksum
/// (none with `no_checksum`: [`FLAG_NO_CHECKSUM`]).
#[allow(clippy::too_many_arguments)]
fn encode_parts(
    no_checksum: bool,
    kind: MsgKind,
    cluster_id: u16,
    sender: u16,
    session: u32,
    index: u32,
    count: u32,
    payload: &[&[u8]],
    out: &mut Vec<u8>,
) {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let start = out.len();
    out.reserve(HEADER_SIZE + len);
    let hdr = FsHeader {
        magic: FS_MAGIC.into(),
        version: FS_VERSION,
        kind: kind as u8,
        flags: if no_checksum { FLAG_NO_CHECKSUM } else { 0 }.into(),
        cluster_id: cluster_id.into(),
        sender: sender.into(),
        session: session.into(),
        index: index.into(),
        count: count.into(),
        payload_len: sat_u32(len).into(),
        checksum: 0.into(),
    };
    out.extend_from_slice(hdr.as_bytes());
    for p in payload {
        out.extend_from_slice(p);
    }
    if no_checksum {
        return;
    }
    let crc = crc32c::crc32c(out.get(start..).unwrap_or(&[]));
    if let Some(field) = out.get_mut(start + CHECKSUM_OFFSET..start + HEADER_SIZE) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
}

/// The header fields every message of one side of a session shares.
#[derive(Clone, Copy, Debug)]
struct Sender {
    cluster_id: u16,
    member_id: u16,
    session: u32,
    no_checksum: bool,
}

impl Sender {
    fn parts(&self, kind: MsgKind, index: u32, count: u32, payload: &[&[u8]], out: &mut Vec<u8>) {
        let (c, s, sess) = (self.cluster_id, self.member_id, self.session);
        encode_parts(self.no_checksum, kind, c, s, sess, index, count, payload, out);
    }
}

fn encode_chunk(from: Sender, index: u32, records: &[DeltaRecord], out: &mut Vec<u8>) {
    from.parts(MsgKind::Chunk, index, sat_u32(records.len()), &[records.as_bytes()], out);
}

/// Appends one message to `out`.
///
/// No check is made: a CHUNK of more than [`MAX_CHUNK_RECORDS`] records is
/// written as it is and refused by the receiver. An ERROR reason is cut to
/// [`MAX_REASON`] bytes at a character boundary.
pub fn encode(msg: &Message, cluster_id: u16, sender: u16, session: u32, out: &mut Vec<u8>) {
    let from = Sender { cluster_id, member_id: sender, session, no_checksum: false };
    encode_from(msg, from, out)
}

/// [`encode`] without the checksum ([`FLAG_NO_CHECKSUM`]), for a stream
/// the transport authenticates.
pub fn encode_unchecked(msg: &Message, cluster_id: u16, sender: u16, session: u32, out: &mut Vec<u8>) {
    let from = Sender { cluster_id, member_id: sender, session, no_checksum: true };
    encode_from(msg, from, out)
}

fn encode_from(msg: &Message, from: Sender, out: &mut Vec<u8>) {
    match msg {
        Message::Request { chunk_records } => {
            let b = RequestBody { chunk_records: (*chunk_records).into(), reserved: 0.into() };
            from.parts(MsgKind::Request, 0, 0, &[b.as_bytes()], out);
        }
        Message::Begin { snapshot_seq, epoch, chunk_records, estimated_records, cut } => {
            let b = BeginBody {
                snapshot_seq: (*snapshot_seq).into(),
                epoch: (*epoch).into(),
                chunk_records: (*chunk_records).into(),
                estimated_records: (*estimated_records).into(),
            };
            from.parts(MsgKind::Begin, 0, sat_u32(cut.len()), &[b.as_bytes(), cut.as_bytes()], out);
        }
        Message::Chunk { index, records } => encode_chunk(from, *index, records, out),
        Message::Ack { index } => from.parts(MsgKind::Ack, *index, 0, &[], out),
        Message::End { count, digest } => {
            let b = EndBody { digest: (*digest).into() };
            from.parts(MsgKind::End, 0, *count, &[b.as_bytes()], out);
        }
        Message::Error { code, reason } => {
            let code = code.to_le_bytes();
            let reason = clip_reason(reason);
            from.parts(MsgKind::Error, 0, 0, &[&code, reason.as_bytes()], out);
        }
    }
}

/// The message checksum: CRC-32C of `header` with its checksum field taken
/// as zero, followed by `payload`.
pub fn checksum(header: &[u8; HEADER_SIZE], payload: &[u8]) -> u32 {
    let mut h = *header;
    if let Some(field) = h.get_mut(CHECKSUM_OFFSET..HEADER_SIZE) {
        field.fill(0);
    }
    crc32c::crc32c_append(crc32c::crc32c(&h), payload)
}

/// Checks what must be known before a payload is buffered; returns the
/// payload length.
fn check_header(hdr: &[u8; HEADER_SIZE]) -> Result<usize, FsError> {
    let h: FsHeader = zerocopy::transmute!(*hdr);
    if h.magic.get() != FS_MAGIC {
        return Err(FsError::BadMagic(h.magic.get()));
    }
    if h.version != FS_VERSION {
        return Err(FsError::BadVersion(h.version));
    }
    let len = h.payload_len.get();
    if len as usize > MAX_PAYLOAD {
        return Err(FsError::TooLong { len });
    }
    Ok(len as usize)
}

/// Checks a complete message (checksum, kind, per-kind rules, records).
/// On an `authenticated` stream a message may go without its checksum.
fn parse_message(hdr: &[u8; HEADER_SIZE], payload: &[u8], authenticated: bool) -> Result<Envelope, FsError> {
    let h: FsHeader = zerocopy::transmute!(*hdr);
    let unchecked = authenticated && h.flags.get() == FLAG_NO_CHECKSUM && h.checksum.get() == 0;
    if !unchecked {
        let got = checksum(hdr, payload);
        if got != h.checksum.get() {
            return Err(FsError::Checksum { expected: h.checksum.get(), got });
        }
    }
    let kind = MsgKind::from_wire(h.kind).ok_or(FsError::BadKind(h.kind))?;
    if h.flags.get() != 0 && !unchecked {
        return Err(FsError::BadFlags(h.flags.get()));
    }
    let (session, index, count) = (h.session.get(), h.index.get(), h.count.get());
    let len = h.payload_len.get();
    let bad_len = || FsError::BadLength { kind, count, len };
    let zero = |field: &'static str, value: u32| {
        if value == 0 {
            Ok(())
        } else {
            Err(FsError::BadField { kind, field, value: value.into() })
        }
    };
    let exact = |n: usize| if payload.len() == n { Ok(()) } else { Err(bad_len()) };
    let records_ok = |field: &'static str, n: u32| {
        if (1..=MAX_CHUNK_RECORDS).contains(&n) {
            Ok(())
        } else {
            Err(FsError::BadField { kind, field, value: n.into() })
        }
    };
    if kind != MsgKind::Error && session == 0 {
        return Err(FsError::BadField { kind, field: "session", value: 0 });
    }
    let message = match kind {
        MsgKind::Request => {
            zero("index", index)?;
            zero("count", count)?;
            exact(REQUEST_SIZE)?;
            let b = RequestBody::read_from_bytes(payload).map_err(|_| bad_len())?;
            zero("reserved", b.reserved.get())?;
            records_ok("chunk_records", b.chunk_records.get())?;
            Message::Request { chunk_records: b.chunk_records.get() }
        }
        MsgKind::Begin => {
            zero("index", index)?;
            if count > MAX_POSITIONS {
                return Err(FsError::BadField { kind, field: "count", value: count.into() });
            }
            exact(BEGIN_SIZE + count as usize * SyncPosition::SIZE)?;
            let (body, cut) = payload.split_at(BEGIN_SIZE);
            let b = BeginBody::read_from_bytes(body).map_err(|_| bad_len())?;
            records_ok("chunk_records", b.chunk_records.get())?;
            let cut = <[SyncPosition]>::ref_from_bytes(cut).map_err(|_| bad_len())?;
            if let Some(i) = cut.iter().position(|p| !p.is_valid()) {
                return Err(FsError::BadField { kind, field: "cut entry", value: i as u64 });
            }
            Message::Begin {
                snapshot_seq: b.snapshot_seq.get(),
                epoch: b.epoch.get(),
                chunk_records: b.chunk_records.get(),
                estimated_records: b.estimated_records.get(),
                cut: cut.to_vec(),
            }
        }
        MsgKind::Chunk => {
            records_ok("count", count)?;
            if u64::from(count) * RECORD_SIZE as u64 != payload.len() as u64 {
                return Err(bad_len());
            }
            let recs = <[DeltaRecord]>::ref_from_bytes(payload).map_err(|_| bad_len())?;
            for (i, r) in recs.iter().enumerate() {
                check_record(r).map_err(|reason| FsError::BadRecord { chunk: index, index: sat_u32(i), reason })?;
            }
            Message::Chunk { index, records: recs.to_vec() }
        }
        MsgKind::Ack => {
            zero("count", count)?;
            exact(0)?;
            Message::Ack { index }
        }
        MsgKind::End => {
            zero("index", index)?;
            exact(END_SIZE)?;
            let b = EndBody::read_from_bytes(payload).map_err(|_| bad_len())?;
            Message::End { count, digest: b.digest.get() }
        }
        MsgKind::Error => {
            zero("index", index)?;
            zero("count", count)?;
            if payload.len() > ERROR_CODE_SIZE + MAX_REASON {
                return Err(bad_len());
            }
            let (code, reason) = payload.split_first_chunk::<ERROR_CODE_SIZE>().ok_or_else(bad_len)?;
            let reason = std::str::from_utf8(reason).map_err(|_| FsError::BadReason)?;
            Message::Error { code: u32::from_le_bytes(*code), reason: reason.to_owned() }
        }
    };
    Ok(Envelope { cluster_id: h.cluster_id.get(), sender: h.sender.get(), session, message })
}

/// Reserves room for `extra` more bytes, growing geometrically but never
/// past `cap` bytes in all, so that no more is allocated than the header
/// announced and the bytes received justify.
fn reserve_capped(buf: &mut Vec<u8>, extra: usize, cap: usize) {
    let want = buf.len() + extra;
    if want > buf.capacity() {
        let target = want.max(cap.min(buf.capacity().saturating_mul(2)));
        buf.reserve_exact(target - buf.len());
    }
}

/// Incremental decoder of the byte stream (TCP gives arbitrary splits).
///
/// It keeps at most one partial message: the header (32 bytes) and then
/// the payload bytes received so far, never more than the header's
/// `payload_len`, which is checked against [`MAX_PAYLOAD`] before a byte of
/// payload is buffered. The first fault ends the stream: the error is
/// returned once and every later byte is discarded.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    hdr: [u8; HEADER_SIZE],
    hdr_len: usize,
    /// Payload length of the message whose header is complete.
    need: Option<usize>,
    payload: Vec<u8>,
    ready: VecDeque<Result<Envelope, FsError>>,
    failed: bool,
    /// The transport authenticates the stream: messages without a
    /// checksum ([`FLAG_NO_CHECKSUM`]) are taken.
    authenticated: bool,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty decoder of a stream the transport authenticates: it also
    /// takes messages without a checksum ([`FLAG_NO_CHECKSUM`]).
    pub fn authenticated() -> Self {
        Self::with_authentication(true)
    }

    /// [`StreamDecoder::authenticated`] if `authenticated`, else
    /// [`StreamDecoder::new`].
    pub fn with_authentication(authenticated: bool) -> Self {
        StreamDecoder { authenticated, ..Self::default() }
    }

    /// Takes bytes from the stream; complete messages (or the stream's
    /// fault) are then returned by [`next_message`](Self::next_message) or
    /// [`next_frame`](Self::next_frame), in order.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.failed {
            let (used, res) = self.feed(bytes);
            bytes = bytes.get(used..).unwrap_or(&[]);
            if let Some(r) = res {
                self.ready.push_back(r);
            } else if used == 0 {
                break;
            }
        }
    }

    /// The next complete message (without its addressing fields).
    pub fn next_message(&mut self) -> Option<Result<Message, FsError>> {
        self.next_frame().map(|r| r.map(|e| e.message))
    }

    /// The next complete message with its addressing fields.
    pub fn next_frame(&mut self) -> Option<Result<Envelope, FsError>> {
        self.ready.pop_front()
    }

    /// Takes bytes until one message is complete or `bytes` is used up;
    /// returns the bytes taken and the message, if one completed. After a
    /// fault every byte is taken and discarded.
    ///
    /// This is the primitive under [`push`](Self::push), for callers that
    /// act on each message before decoding the next.
    pub fn feed(&mut self, bytes: &[u8]) -> (usize, Option<Result<Envelope, FsError>>) {
        if self.failed {
            return (bytes.len(), None);
        }
        let mut used = 0;
        let need = match self.need {
            Some(n) => n,
            None => {
                let take = (HEADER_SIZE - self.hdr_len).min(bytes.len());
                if let (Some(dst), Some(src)) = (self.hdr.get_mut(self.hdr_len..self.hdr_len + take), bytes.get(..take))
                {
                    dst.copy_from_slice(src);
                }
                self.hdr_len += take;
                used = take;
                if self.hdr_len < HEADER_SIZE {
                    return (used, None);
                }
                match check_header(&self.hdr) {
                    Ok(n) => {
                        self.need = Some(n);
                        self.payload.clear();
                        n
                    }
                    Err(e) => return (bytes.len(), Some(self.fail(e))),
                }
            }
        };
        let rest = bytes.get(used..).unwrap_or(&[]);
        let take = need.saturating_sub(self.payload.len()).min(rest.len());
        reserve_capped(&mut self.payload, take, need);
        self.payload.extend_from_slice(rest.get(..take).unwrap_or(&[]));
        used += take;
        if self.payload.len() < need {
            return (used, None);
        }
        self.need = None;
        self.hdr_len = 0;
        let res = parse_message(&self.hdr, &self.payload, self.authenticated);
        self.payload.clear();
        match res {
            Ok(env) => (used, Some(Ok(env))),
            Err(e) => (bytes.len(), Some(self.fail(e))),
        }
    }

    fn fail(&mut self, e: FsError) -> Result<Envelope, FsError> {
        self.failed = true;
        self.payload = Vec::new();
        self.need = None;
        self.hdr_len = 0;
        Err(e)
    }

    /// Bytes of the partial message held.
    pub fn buffered(&self) -> usize {
        self.hdr_len + self.payload.len()
    }

    /// Whether the stream failed (every later byte is discarded).
    pub fn is_failed(&self) -> bool {
        self.failed
    }
}

const DIGEST_SEED_KEY: u64 = 0x6e66_7379_2d6b_6579; // "nfsy-key"
const DIGEST_SEED_STATE: u64 = 0x6e66_7379_2d73_7461; // "nfsy-sta"
const DIGEST_MUL_KEY: u64 = 0x9E37_79B9_7F4A_7C15;
const DIGEST_MUL_STATE: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// One absorbing step: a bijection of `h` for every word `w`.
#[inline]
fn absorb(h: u64, w: u64, mul: u64) -> u64 {
    (h ^ w).wrapping_mul(mul).rotate_left(31)
}

/// MurmurHash3's 64-bit finaliser (a bijection with full avalanche).
#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The 64-bit hash of one record, as summed into a [`TableDigest`].
///
/// Covers the owner member, the key (all 40 bytes), the state without the value of
/// `timeout_s` (TCP state, direction, flags, mark, generation, and one bit
/// "ages": `timeout_s != 0`) and the NAT part (all 24 bytes, taken as zero
/// when the kind is None); not the op. As ten little-endian words: the key's five
/// words `k0..k4`, `s0 = tcp_state | direction << 8 | flags << 16 | ages << 32 | owner << 40`,
/// `s1 = mark | generation << 32`, and the NAT's three words `n0..n2`.
/// Lane `a` absorbs `k0..k4` from seed `"nfsy-key"`, lane `b` absorbs
/// `s0, s1, n0, n1, n2` from seed `"nfsy-sta"`, each word by
/// `h = rotl64((h ^ w) * M, 31)` (`M` = `0x9E3779B97F4A7C15` and
/// `0xC2B2AE3D27D4EB4F`); the hash is `fmix64(a ^ fmix64(b))` with
/// MurmurHash3's finaliser.
pub fn record_digest(r: &DeltaRecord) -> u64 {
    let key: [u64; 5] = zerocopy::transmute!(r.key);
    let s = &r.state;
    let ages = u64::from(s.timeout_s.get() != 0);
    let s0 = u64::from(s.tcp_state)
        | u64::from(s.direction) << 8
        | u64::from(s.flags.get()) << 16
        | ages << 32
        | u64::from(r.owner.get()) << 40;
    let s1 = u64::from(s.mark.get()) | u64::from(s.generation.get()) << 32;
    let nat: [u64; 3] = if r.nat.kind == 0 { [0; 3] } else { zerocopy::transmute!(r.nat) };
    let mut a = DIGEST_SEED_KEY;
    for w in key {
        a = absorb(a, u64::from_le(w), DIGEST_MUL_KEY);
    }
    let mut b = DIGEST_SEED_STATE;
    for w in [s0, s1, u64::from_le(nat[0]), u64::from_le(nat[1]), u64::from_le(nat[2])] {
        b = absorb(b, w, DIGEST_MUL_STATE);
    }
    fmix64(a ^ fmix64(b))
}

/// An order-independent digest of a set of records: their count and the
/// wrapping sum of their [`record_digest`]s. Records can be added and
/// removed in any order, so a table can keep its digest up to date.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableDigest {
    count: u64,
    sum: u64,
}

impl TableDigest {
    /// The digest of no records (count 0, digest 0).
    pub const fn new() -> Self {
        TableDigest { count: 0, sum: 0 }
    }

    /// Adds one record.
    pub fn add(&mut self, r: &DeltaRecord) {
        self.count = self.count.wrapping_add(1);
        self.sum = self.sum.wrapping_add(record_digest(r));
    }

    /// Adds every record of a slice.
    pub fn add_all(&mut self, rs: &[DeltaRecord]) {
        for r in rs {
            self.add(r);
        }
    }

    /// Takes one record out (it must have been added).
    pub fn remove(&mut self, r: &DeltaRecord) {
        self.count = self.count.wrapping_sub(1);
        self.sum = self.sum.wrapping_sub(record_digest(r));
    }

    /// Records counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The digest.
    pub fn digest(&self) -> u64 {
        self.sum
    }
}

/// Count and digest ([`TableDigest`]) of some records.
pub fn digest_records<'a, I: IntoIterator<Item = &'a DeltaRecord>>(records: I) -> (u64, u64) {
    let mut d = TableDigest::new();
    for r in records {
        d.add(r);
    }
    (d.count(), d.digest())
}

/// Count and digest of the entries (UPSERTs; tombstones are left out)
/// among some sync updates (see [`record_digest`]). The caller removes
/// duplicates.
pub fn digest_updates<'a, I: IntoIterator<Item = &'a nicsync_fwif::sync::DeltaUpdate>>(updates: I) -> (u64, u64) {
    let mut d = TableDigest::new();
    for u in updates.into_iter().filter(|u| u.op == DeltaOp::Upsert) {
        d.add(&u.to_record());
    }
    (d.count(), d.digest())
}

/// Settings of either side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullSyncParams {
    /// The cluster; messages of other clusters are refused.
    pub cluster_id: u16,
    /// This member's id (the header's `sender`).
    pub member_id: u16,
    /// Client: records per chunk to ask for; server: the most it sends.
    /// Clamped to 1..=[`MAX_CHUNK_RECORDS`].
    pub chunk_records: u32,
    /// Longest wait for the peer in one step (module docs, Timeouts).
    pub timeout_ns: Nanos,
    /// The stream runs inside a channel that authenticates every byte (the
    /// cluster's sealed Full Sync): messages go without the checksum
    /// ([`FLAG_NO_CHECKSUM`]) and are taken without one. Never on a plain
    /// TCP stream: there the checksum is the only check.
    pub authenticated: bool,
}

impl FullSyncParams {
    /// Settings with [`DEFAULT_CHUNK_RECORDS`] and [`DEFAULT_TIMEOUT_NS`].
    pub fn new(cluster_id: u16, member_id: u16) -> Self {
        FullSyncParams {
            cluster_id,
            member_id,
            chunk_records: DEFAULT_CHUNK_RECORDS,
            timeout_ns: DEFAULT_TIMEOUT_NS,
            authenticated: false,
        }
    }

    fn clamped(mut self) -> Self {
        self.chunk_records = self.chunk_records.clamp(1, MAX_CHUNK_RECORDS);
        self
    }
}

/// What both sides share: settings, decoder, transmit buffer, peer identity
/// and deadline.
#[derive(Debug)]
struct Link {
    p: FullSyncParams,
    dec: StreamDecoder,
    tx: Vec<u8>,
    /// Session id (0 until the server has seen the REQUEST).
    session: u32,
    /// The peer's member id, once known.
    peer: Option<u16>,
    deadline: Option<Nanos>,
}

impl Link {
    fn new(p: FullSyncParams, session: u32) -> Self {
        let dec = StreamDecoder::with_authentication(p.authenticated);
        Link { p: p.clamped(), dec, tx: Vec::new(), session, peer: None, deadline: None }
    }

    fn sender(&self) -> Sender {
        let p = &self.p;
        Sender { cluster_id: p.cluster_id, member_id: p.member_id, session: self.session, no_checksum: p.authenticated }
    }

    fn send(&mut self, msg: &Message) {
        encode_from(msg, self.sender(), &mut self.tx);
    }

    fn send_chunk(&mut self, index: u32, records: &[DeltaRecord]) {
        encode_chunk(self.sender(), index, records, &mut self.tx);
    }

    fn wait(&mut self, now: Nanos) {
        self.deadline = Some(now.saturating_add(self.p.timeout_ns));
    }

    /// A wait that covers a chunk's transfer ([`ACK_WAIT_TIMEOUTS`]).
    fn wait_transfer(&mut self, now: Nanos) {
        self.deadline = Some(now.saturating_add(self.p.timeout_ns.saturating_mul(ACK_WAIT_TIMEOUTS)));
    }
}

/// The client waits this many timeouts for BEGIN (a source serves one
/// walk at a time; a second joiner waits for the first's to end), one for
/// every later message.
pub const BEGIN_WAIT_TIMEOUTS: u64 = 6;

/// The server waits this many timeouts for a chunk's ACK, and the client
/// as long for the first part of the next chunk (or END) after its ACK or
/// BEGIN: each wait covers a transfer, which on a lossy link is TCP's
/// retransmissions and their backoff (5 % of the packets dropped made 2.75
/// MiB chunks miss a one-timeout wait again and again, and the pull never
/// ended), and the joiner's write of a chunk or the source's walk of the
/// next. The client sees the transfer go on: each part of a message it
/// receives moves its deadline on, up to [`PROGRESS_WAIT_TIMEOUTS`]
/// timeouts for one message.
pub const ACK_WAIT_TIMEOUTS: u64 = 5;

/// The longest a client waits for one message whose parts keep coming (a
/// trickle cannot hold it for ever).
pub const PROGRESS_WAIT_TIMEOUTS: u64 = 30;

impl Link {
    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.tx.is_empty() {
            return false;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut self.tx);
        } else {
            out.extend_from_slice(&self.tx);
            self.tx.clear();
        }
        true
    }

    /// Drops what is queued, queues an ERROR unless the failure is the
    /// peer's ERROR, and stops listening.
    fn fail(&mut self, e: &FsError) {
        self.tx.clear();
        self.deadline = None;
        self.dec = StreamDecoder::with_authentication(self.p.authenticated);
        let msg = match e {
            FsError::Remote { .. } => return,
            FsError::Aborted { code, reason } => Message::Error { code: *code, reason: reason.clone() },
            other => Message::Error { code: other.code(), reason: other.to_string() },
        };
        self.send(&msg);
    }

    /// Checks cluster, session and sender of a message; an ERROR of the
    /// session (or of session 0) becomes [`FsError::Remote`].
    fn check(&mut self, env: Envelope) -> Result<Message, FsError> {
        if env.cluster_id != self.p.cluster_id {
            return Err(FsError::WrongCluster { expected: self.p.cluster_id, got: env.cluster_id });
        }
        let is_error = matches!(env.message, Message::Error { .. });
        if self.session != 0 && env.session != self.session && !(is_error && env.session == 0) {
            return Err(FsError::WrongSession { expected: self.session, got: env.session });
        }
        if let Message::Error { code, reason } = env.message {
            return Err(FsError::Remote { code, reason });
        }
        match self.peer {
            Some(p) if p != env.sender => return Err(FsError::WrongSender { expected: p, got: env.sender }),
            Some(_) => {}
            None => self.peer = Some(env.sender),
        }
        Ok(env.message)
    }
}

/// What a finished server sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerDone {
    /// Records sent.
    pub records: u64,
    /// Chunks sent.
    pub chunks: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    AwaitRequest,
    AwaitBegin,
    NeedChunk,
    AwaitAck(u32),
    AwaitFinalAck,
    Done,
    Failed,
}

impl ServerState {
    fn name(self) -> &'static str {
        match self {
            ServerState::AwaitRequest => "awaiting REQUEST",
            ServerState::AwaitBegin => "awaiting the local begin()",
            ServerState::NeedChunk => "awaiting the local push_chunk()",
            ServerState::AwaitAck(_) => "awaiting ACK",
            ServerState::AwaitFinalAck => "awaiting the final ACK",
            ServerState::Done => "done",
            ServerState::Failed => "failed",
        }
    }
}

/// The serving side of one Full Sync session (one TCP connection).
///
/// A driver loop, for each readable, writable or timer event:
///
/// ```text
/// read bytes        -> handle_bytes(bytes, now)   (EOF -> handle_eof())
/// wants_begin()     -> begin(snapshot_seq, epoch, estimated_records, now)
/// wants_chunk()     -> push_chunk(next <= chunk_records() records, or &[] at the end, now)
/// poll_transmit(&mut buf) -> write buf
/// poll_timeout()    -> sleep until then, handle_timeout(now)
/// outcome()         -> Some: close (after writing what poll_transmit gave)
/// ```
#[derive(Debug)]
pub struct FullSyncServer {
    link: Link,
    state: ServerState,
    /// Agreed records per chunk.
    chunk_records: u32,
    chunks: u32,
    digest: TableDigest,
    outcome: Option<Result<ServerDone, FsError>>,
}

impl FullSyncServer {
    /// A server waiting for a REQUEST until `now + timeout_ns`.
    pub fn new(p: FullSyncParams, now: Nanos) -> Self {
        let mut link = Link::new(p, 0);
        link.wait(now);
        let chunk_records = link.p.chunk_records;
        FullSyncServer {
            link,
            state: ServerState::AwaitRequest,
            chunk_records,
            chunks: 0,
            digest: TableDigest::new(),
            outcome: None,
        }
    }

    /// Takes bytes read from the socket. Ignored once finished.
    pub fn handle_bytes(&mut self, mut bytes: &[u8], now: Nanos) {
        // Receipt starts no deadline on this side: after a REQUEST or an
        // ACK the server waits for its own driver.
        let _ = now;
        while !bytes.is_empty() && self.outcome.is_none() {
            let (used, res) = self.link.dec.feed(bytes);
            bytes = bytes.get(used..).unwrap_or(&[]);
            match res {
                Some(Ok(env)) => {
                    if let Err(e) = self.on_message(env) {
                        self.fail(e);
                    }
                }
                Some(Err(e)) => self.fail(e),
                None if used == 0 => break,
                None => {}
            }
        }
    }

    fn on_message(&mut self, env: Envelope) -> Result<(), FsError> {
        let session = env.session;
        let msg = self.link.check(env)?;
        let state = self.state;
        match (state, msg) {
            (ServerState::AwaitRequest, Message::Request { chunk_records }) => {
                // The decoder refuses session 0 outside ERROR.
                self.link.session = session;
                self.chunk_records = chunk_records.min(self.link.p.chunk_records);
                self.state = ServerState::AwaitBegin;
                self.link.deadline = None;
                Ok(())
            }
            (ServerState::AwaitAck(expected), Message::Ack { index }) => {
                if index != expected {
                    return Err(FsError::OutOfOrder { expected, got: index });
                }
                self.state = ServerState::NeedChunk;
                self.link.deadline = None;
                Ok(())
            }
            (ServerState::AwaitFinalAck, Message::Ack { index }) => {
                if index != self.chunks {
                    return Err(FsError::OutOfOrder { expected: self.chunks, got: index });
                }
                self.state = ServerState::Done;
                self.link.deadline = None;
                self.outcome = Some(Ok(ServerDone { records: self.digest.count(), chunks: self.chunks }));
                Ok(())
            }
            (_, msg) => Err(FsError::UnexpectedKind { state: state.name(), kind: msg.kind() }),
        }
    }

    fn fail(&mut self, e: FsError) {
        if self.outcome.is_some() {
            return;
        }
        self.link.fail(&e);
        self.state = ServerState::Failed;
        self.outcome = Some(Err(e));
    }

    /// Starts the snapshot (after [`wants_begin`](Self::wants_begin)):
    /// sends BEGIN with the agreed chunk size. Out of turn it fails the
    /// session with [`FsError::Misuse`]; ignored once finished.
    pub fn begin(&mut self, snapshot_seq: u64, epoch: u32, estimated_records: u64, now: Nanos) {
        self.begin_at(snapshot_seq, epoch, estimated_records, Vec::new(), now)
    }

    /// [`begin`](Self::begin) with the snapshot's cut: where the walk
    /// starts in each member's Delta Sync stream (SYNC_POSITIONS, at most
    /// [`MAX_POSITIONS`] entries; more fail the session with
    /// [`FsError::Misuse`]).
    pub fn begin_at(
        &mut self,
        snapshot_seq: u64,
        epoch: u32,
        estimated_records: u64,
        cut: Vec<SyncPosition>,
        now: Nanos,
    ) {
        if self.outcome.is_some() {
            return;
        }
        if self.state != ServerState::AwaitBegin {
            return self.fail(FsError::Misuse { what: "begin() without wants_begin()" });
        }
        if cut.len() > MAX_POSITIONS as usize || cut.iter().any(|p| !p.is_valid()) {
            return self.fail(FsError::Misuse { what: "begin_at() with a cut that BEGIN cannot carry" });
        }
        let _ = now; // the next wait is for the local push_chunk()
        let chunk_records = self.chunk_records;
        self.link.send(&Message::Begin { snapshot_seq, epoch, chunk_records, estimated_records, cut });
        self.state = ServerState::NeedChunk;
    }

    /// A valid REQUEST arrived and [`begin`](Self::begin) was not called yet.
    pub fn wants_begin(&self) -> bool {
        self.state == ServerState::AwaitBegin
    }

    /// Begun, the previous chunk acknowledged, not finished: the driver
    /// should call [`push_chunk`](Self::push_chunk) with the next records.
    pub fn wants_chunk(&self) -> bool {
        self.state == ServerState::NeedChunk
    }

    /// Records per chunk agreed with the client (before the REQUEST: this
    /// side's maximum). [`push_chunk`](Self::push_chunk) takes at most this.
    pub fn chunk_records(&self) -> u32 {
        self.chunk_records
    }

    /// Sends the next chunk: at most [`chunk_records`](Self::chunk_records)
    /// records, each valid; an empty slice ends the stream with END. Called
    /// out of turn, with too many or with invalid records it fails the
    /// session; ignored once finished.
    pub fn push_chunk(&mut self, records: &[DeltaRecord], now: Nanos) {
        if self.outcome.is_some() {
            return;
        }
        if self.state != ServerState::NeedChunk {
            return self.fail(FsError::Misuse { what: "push_chunk() without wants_chunk()" });
        }
        if records.is_empty() {
            let Ok(count) = u32::try_from(self.digest.count()) else {
                return self.fail(FsError::Overflow { what: "END record count" });
            };
            self.link.send(&Message::End { count, digest: self.digest.digest() });
            self.state = ServerState::AwaitFinalAck;
            self.link.wait_transfer(now);
            return;
        }
        if records.len() > self.chunk_records as usize {
            let count = records.len() as u64;
            return self.fail(FsError::TooManyRecords { count, max: self.chunk_records });
        }
        let index = self.chunks;
        let Some(next) = index.checked_add(1) else {
            return self.fail(FsError::Overflow { what: "chunk number" });
        };
        for (i, r) in records.iter().enumerate() {
            if let Err(reason) = check_record(r) {
                return self.fail(FsError::BadRecord { chunk: index, index: sat_u32(i), reason });
            }
        }
        self.digest.add_all(records);
        self.link.send_chunk(index, records);
        self.chunks = next;
        self.state = ServerState::AwaitAck(index);
        self.link.wait_transfer(now);
    }

    /// Appends the bytes to write to the socket; false when there are none.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        self.link.poll_transmit(out)
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due, if the server
    /// is waiting for the client.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.link.deadline
    }

    /// Fails the session with [`FsError::Timeout`] if the deadline passed.
    pub fn handle_timeout(&mut self, now: Nanos) {
        if self.link.deadline.is_some_and(|d| now >= d) {
            let what = match self.state {
                ServerState::AwaitRequest => "REQUEST",
                ServerState::AwaitFinalAck => "the final ACK",
                _ => "ACK",
            };
            self.fail(FsError::Timeout { what });
        }
    }

    /// The peer closed its side of the connection: fails the session unless
    /// it is finished.
    pub fn handle_eof(&mut self) {
        self.fail(FsError::Closed);
    }

    /// Gives up: sends ERROR with `code` and `reason` (cut to
    /// [`MAX_REASON`] bytes) and fails with [`FsError::Aborted`]. Ignored
    /// once finished.
    pub fn abort(&mut self, code: u32, reason: &str) {
        self.fail(FsError::Aborted { code, reason: clip_reason(reason).to_owned() });
    }

    /// Whether the server still waits for the REQUEST (nothing authentic
    /// has come on the stream yet).
    pub fn awaiting_request(&self) -> bool {
        self.state == ServerState::AwaitRequest && self.outcome.is_none()
    }

    /// `Some` once finished: `Ok` after the client's final ACK confirmed the
    /// whole table, `Err` on failure.
    pub fn outcome(&self) -> Option<Result<ServerDone, FsError>> {
        self.outcome.clone()
    }

    /// The session id (0 before the REQUEST).
    pub fn session(&self) -> u32 {
        self.link.session
    }

    /// The client's member id, once known.
    pub fn peer(&self) -> Option<u16> {
        self.link.peer
    }
}

/// What a finished client received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientDone {
    /// Records received (and verified by count and digest).
    pub records: u64,
    /// Chunks received.
    pub chunks: u32,
}

/// What the client tells its driver, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server started the snapshot.
    Begin {
        /// Server's Delta Sync sequence number the snapshot is consistent
        /// at: replay its deltas after this one once the snapshot is applied.
        snapshot_seq: u64,
        /// Server's Delta Sync epoch.
        epoch: u32,
        /// The server's estimate of the records to come (a hint).
        estimated_records: u64,
        /// Where the snapshot was cut in each member's Delta Sync stream:
        /// hand it to the card (SYNC_ALIGN) before the hold is released.
        cut: Vec<SyncPosition>,
    },
    /// Records to apply; then call [`FullSyncClient::chunk_applied`].
    Chunk {
        /// Chunk number, from 0.
        index: u32,
        /// The records, each validated.
        records: Vec<DeltaRecord>,
    },
    /// Every chunk arrived in order and END's count and digest match: the
    /// table is complete. Flush [`poll_transmit`](FullSyncClient::poll_transmit)
    /// (the final ACK) before closing.
    Done {
        /// Records received.
        records: u64,
        /// Whether the digest matched: always true here (a mismatch is
        /// reported as `Failed(DigestMismatch)`), kept for logging.
        digest_ok: bool,
    },
    /// The session failed; the table is not synced.
    Failed(FsError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    AwaitBegin,
    /// Waiting for CHUNK `next` or END.
    AwaitChunk(u32),
    /// Chunk delivered, waiting for the local chunk_applied().
    Applying(u32),
    Done,
    Failed,
}

impl ClientState {
    fn name(self) -> &'static str {
        match self {
            ClientState::AwaitBegin => "awaiting BEGIN",
            ClientState::AwaitChunk(_) => "awaiting CHUNK or END",
            ClientState::Applying(_) => "applying a chunk (not yet acknowledged)",
            ClientState::Done => "done",
            ClientState::Failed => "failed",
        }
    }
}

/// The pulling side of one Full Sync session (one TCP connection).
///
/// A driver loop, for each readable, writable or timer event:
///
/// ```text
/// read bytes        -> handle_bytes(bytes, now)   (EOF -> handle_eof())
/// poll_event()      -> Begin: prepare the table; Chunk: apply, then chunk_applied(index, now);
///                      Done: synced; Failed: not synced
/// poll_transmit(&mut buf) -> write buf
/// poll_timeout()    -> sleep until then, handle_timeout(now)
/// outcome()         -> Some: close (after writing what poll_transmit gave)
/// ```
#[derive(Debug)]
pub struct FullSyncClient {
    link: Link,
    state: ClientState,
    /// Requested, then agreed, records per chunk.
    chunk_records: u32,
    chunks: u32,
    digest: TableDigest,
    events: VecDeque<ClientEvent>,
    outcome: Option<Result<ClientDone, FsError>>,
    /// When the first part of the message being received came.
    message_since: Option<Nanos>,
}

impl FullSyncClient {
    /// A client for session `session` (non-zero; 0 fails the session with
    /// [`FsError::Misuse`]). Queues the REQUEST at once and waits for BEGIN
    /// until `now + timeout_ns`.
    pub fn new(p: FullSyncParams, session: u32, now: Nanos) -> Self {
        let link = Link::new(p, session);
        let chunk_records = link.p.chunk_records;
        let mut c = FullSyncClient {
            link,
            state: ClientState::AwaitBegin,
            chunk_records,
            chunks: 0,
            digest: TableDigest::new(),
            events: VecDeque::new(),
            outcome: None,
            message_since: None,
        };
        if session == 0 {
            c.fail(FsError::Misuse { what: "session id 0" });
        } else {
            c.link.send(&Message::Request { chunk_records });
            // A source walks one snapshot at a time: a joiner may wait for
            // its turn behind another's pull before BEGIN comes, and the
            // wait for BEGIN allows for that.
            let wait = c.link.p.timeout_ns.saturating_mul(BEGIN_WAIT_TIMEOUTS);
            c.link.deadline = Some(now.saturating_add(wait));
        }
        c
    }

    /// Takes bytes read from the socket. Ignored once finished.
    pub fn handle_bytes(&mut self, mut bytes: &[u8], now: Nanos) {
        while !bytes.is_empty() && self.outcome.is_none() {
            let (used, res) = self.link.dec.feed(bytes);
            bytes = bytes.get(used..).unwrap_or(&[]);
            match res {
                Some(Ok(env)) => {
                    self.message_since = None;
                    if let Err(e) = self.on_message(env, now) {
                        self.fail(e);
                    }
                }
                Some(Err(e)) => self.fail(e),
                None if used == 0 => break,
                None => {}
            }
        }
        // Part of a CHUNK or END arrived: the transfer goes on (slowly on a
        // lossy link), and the deadline with it, up to a bound per message.
        if self.outcome.is_none() && self.link.dec.buffered() > 0 && matches!(self.state, ClientState::AwaitChunk(_)) {
            let since = *self.message_since.get_or_insert(now);
            let bound = since.saturating_add(self.link.p.timeout_ns.saturating_mul(PROGRESS_WAIT_TIMEOUTS));
            let moved = now.saturating_add(self.link.p.timeout_ns).min(bound);
            if let Some(d) = &mut self.link.deadline {
                *d = (*d).max(moved);
            }
        }
    }

    fn on_message(&mut self, env: Envelope, now: Nanos) -> Result<(), FsError> {
        let msg = self.link.check(env)?;
        let state = self.state;
        match (state, msg) {
            (
                ClientState::AwaitBegin,
                Message::Begin { snapshot_seq, epoch, chunk_records, estimated_records, cut },
            ) => {
                if chunk_records > self.chunk_records {
                    return Err(FsError::BadField {
                        kind: MsgKind::Begin,
                        field: "chunk_records",
                        value: chunk_records.into(),
                    });
                }
                self.chunk_records = chunk_records;
                self.events.push_back(ClientEvent::Begin { snapshot_seq, epoch, estimated_records, cut });
                self.state = ClientState::AwaitChunk(0);
                self.link.wait_transfer(now);
                Ok(())
            }
            (ClientState::AwaitChunk(expected), Message::Chunk { index, records }) => {
                if index != expected {
                    return Err(FsError::OutOfOrder { expected, got: index });
                }
                if records.len() > self.chunk_records as usize {
                    return Err(FsError::TooManyRecords { count: records.len() as u64, max: self.chunk_records });
                }
                let Some(next) = self.chunks.checked_add(1) else {
                    return Err(FsError::Overflow { what: "chunk number" });
                };
                self.digest.add_all(&records);
                self.chunks = next;
                self.state = ClientState::Applying(index);
                self.link.deadline = None;
                self.events.push_back(ClientEvent::Chunk { index, records });
                Ok(())
            }
            (ClientState::AwaitChunk(_), Message::End { count, digest }) => {
                let got = self.digest.count();
                if u64::from(count) != got {
                    return Err(FsError::CountMismatch { expected: count.into(), got });
                }
                if digest != self.digest.digest() {
                    return Err(FsError::DigestMismatch { expected: digest, got: self.digest.digest() });
                }
                // The final ACK: its index is the number of chunks.
                self.link.send(&Message::Ack { index: self.chunks });
                self.link.deadline = None;
                self.state = ClientState::Done;
                self.outcome = Some(Ok(ClientDone { records: got, chunks: self.chunks }));
                self.events.push_back(ClientEvent::Done { records: got, digest_ok: true });
                Ok(())
            }
            (_, msg) => Err(FsError::UnexpectedKind { state: state.name(), kind: msg.kind() }),
        }
    }

    fn fail(&mut self, e: FsError) {
        if self.outcome.is_some() {
            return;
        }
        self.link.fail(&e);
        self.state = ClientState::Failed;
        self.events.push_back(ClientEvent::Failed(e.clone()));
        self.outcome = Some(Err(e));
    }

    /// The next event, in order.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The host has taken chunk `index` to apply to its own table (written,
    /// or queued to be written next: see "Why stop-and-wait with large
    /// chunks"): acknowledges it (stop-and-wait: the server sends the next
    /// one only now). Any other
    /// index than the chunk delivered last fails the session with
    /// [`FsError::Misuse`]; ignored once finished.
    pub fn chunk_applied(&mut self, index: u32, now: Nanos) {
        if self.outcome.is_some() {
            return;
        }
        match self.state {
            ClientState::Applying(i) if i == index => {
                self.link.send(&Message::Ack { index });
                // `chunks` is `index + 1` here; it was checked not to overflow.
                self.state = ClientState::AwaitChunk(self.chunks);
                self.link.wait_transfer(now);
            }
            _ => self.fail(FsError::Misuse { what: "chunk_applied() for a chunk not awaiting it" }),
        }
    }

    /// Appends the bytes to write to the socket; false when there are none.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        self.link.poll_transmit(out)
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due, if the client
    /// is waiting for the server.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.link.deadline
    }

    /// Fails the session with [`FsError::Timeout`] if the deadline passed.
    pub fn handle_timeout(&mut self, now: Nanos) {
        if self.link.deadline.is_some_and(|d| now >= d) {
            let what = match self.state {
                ClientState::AwaitBegin => "BEGIN",
                _ => "CHUNK or END",
            };
            self.fail(FsError::Timeout { what });
        }
    }

    /// The peer closed its side of the connection: fails the session unless
    /// it is finished.
    pub fn handle_eof(&mut self) {
        self.fail(FsError::Closed);
    }

    /// Gives up: sends ERROR with `code` and `reason` (cut to
    /// [`MAX_REASON`] bytes) and fails with [`FsError::Aborted`]. Ignored
    /// once finished.
    pub fn abort(&mut self, code: u32, reason: &str) {
        self.fail(FsError::Aborted { code, reason: clip_reason(reason).to_owned() });
    }

    /// `Some` once finished: `Ok` after a verified END, `Err` on failure.
    pub fn outcome(&self) -> Option<Result<ClientDone, FsError>> {
        self.outcome.clone()
    }

    /// Records per chunk: requested, then agreed by BEGIN.
    pub fn chunk_records(&self) -> u32 {
        self.chunk_records
    }

    /// The session id.
    pub fn session(&self) -> u32 {
        self.link.session
    }

    /// The server's member id, once known.
    pub fn peer(&self) -> Option<u16> {
        self.link.peer
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use nicsync_fwif::conn::{
        proto, ConnFlags, ConnKey, ConnState, Direction, KeyError, Nat, NatKind, TcpState, FAMILY_IPV4,
    };
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const CLUSTER: u16 = 7;
    const SERVER_ID: u16 = 1;
    const CLIENT_ID: u16 = 2;
    const SESSION: u32 = 0x00C0_FFEE;
    const TIMEOUT: Nanos = 1_000_000_000;

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn params(member_id: u16, chunk_records: u32) -> FullSyncParams {
        FullSyncParams { cluster_id: CLUSTER, member_id, chunk_records, timeout_ns: TIMEOUT, authenticated: false }
    }

    fn record(i: u32) -> DeltaRecord {
        let b = i.to_be_bytes();
        let key = if i % 5 == 0 {
            let a = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (i >> 16) as u16, i as u16);
            ConnKey::v6(a, 1024 + (i % 50_000) as u16, Ipv6Addr::LOCALHOST, 443, proto::TCP, 0)
        } else {
            let p = if i % 3 == 0 { proto::UDP } else { proto::TCP };
            let a = Ipv4Addr::new(10, b[1], b[2], b[3]);
            ConnKey::v4(a, (i % 60_000) as u16 + 1, Ipv4Addr::new(192, 168, 0, 1), 80, p, (i % 4) as u16)
        };
        let tcp = TcpState::ALL[(i % 10) as usize];
        let mut state =
            ConnState::new(tcp, Direction::Original, ConnFlags::CONFIRMED | ConnFlags::SYNC, 100 + i % 1000, i);
        state.generation = (i / 3).into();
        let nat = if i % 7 == 0 {
            let to = if key.family == FAMILY_IPV4 {
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))
            } else {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1))
            };
            Nat::new(NatKind::Source, to, 40_000 + (i % 1000) as u16)
        } else {
            Nat::default()
        };
        let r = nicsync_fwif::sync::DeltaUpdate::upsert(1 + (i % 3) as u16, key, state, nat).to_record();
        assert_eq!(check_record(&r), Ok(()));
        r
    }

    fn table(n: u32) -> Vec<DeltaRecord> {
        (0..n).map(record).collect()
    }

    /// Delivers a random prefix (usually all) of `pipe` in pieces of random
    /// sizes, as TCP reads would.
    fn carry(pipe: &mut Vec<u8>, rng: &mut XorShift, mut deliver: impl FnMut(&[u8])) {
        let n = if rng.below(4) == 0 { rng.below(pipe.len() as u64 + 1) as usize } else { pipe.len() };
        let mut off = 0;
        while off < n {
            let max = match rng.below(3) {
                0 => 8,
                1 => 300,
                _ => 70_000,
            };
            let len = (1 + rng.below(max) as usize).min(n - off);
            deliver(&pipe[off..off + len]);
            off += len;
        }
        pipe.drain(..n);
    }

    #[derive(Debug)]
    struct Run {
        got: Vec<DeltaRecord>,
        begin: Option<(u64, u32, u64)>,
        server: Result<ServerDone, FsError>,
        client: Result<ClientDone, FsError>,
        dones: usize,
        max_chunk: usize,
    }

    /// A server and a client wired byte to byte, with random splits.
    fn transfer(rows: &[DeltaRecord], server_chunk: u32, client_chunk: u32, seed: u64) -> Run {
        let mut rng = XorShift(seed);
        let mut now = 0;
        let mut server = FullSyncServer::new(params(SERVER_ID, server_chunk), now);
        let mut client = FullSyncClient::new(params(CLIENT_ID, client_chunk), SESSION, now);
        let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
        let (mut pos, mut got, mut begin, mut dones, mut max_chunk) = (0, Vec::new(), None, 0, 0);
        for _ in 0..1_000_000 {
            now += 1_000;
            client.poll_transmit(&mut c2s);
            carry(&mut c2s, &mut rng, |b| server.handle_bytes(b, now));
            if server.wants_begin() {
                server.begin(42, 9, rows.len() as u64, now);
            }
            if server.wants_chunk() {
                let n = (server.chunk_records() as usize).min(rows.len() - pos);
                server.push_chunk(&rows[pos..pos + n], now);
                pos += n;
            }
            server.poll_transmit(&mut s2c);
            carry(&mut s2c, &mut rng, |b| client.handle_bytes(b, now));
            while let Some(ev) = client.poll_event() {
                match ev {
                    ClientEvent::Begin { snapshot_seq, epoch, estimated_records, .. } => {
                        begin = Some((snapshot_seq, epoch, estimated_records))
                    }
                    ClientEvent::Chunk { index, records } => {
                        max_chunk = max_chunk.max(records.len());
                        got.extend_from_slice(&records);
                        client.chunk_applied(index, now);
                    }
                    ClientEvent::Done { digest_ok, .. } => {
                        assert!(digest_ok);
                        dones += 1;
                    }
                    ClientEvent::Failed(e) => panic!("client failed: {e}"),
                }
            }
            if let (Some(s), Some(c)) = (server.outcome(), client.outcome()) {
                if c2s.is_empty() && s2c.is_empty() && !client.poll_transmit(&mut c2s) {
                    return Run { got, begin, server: s, client: c, dones, max_chunk };
                }
            }
        }
        panic!("the transfer did not finish");
    }

    #[test]
    fn ten_thousand_records_in_chunks_of_256_with_random_splits() {
        let rows = table(10_000);
        for seed in [0x9E37_79B9_7F4A_7C15, 1, 0xDEAD_BEEF] {
            let run = transfer(&rows, 256, 256, seed);
            assert_eq!(run.got, rows);
            assert_eq!(run.begin, Some((42, 9, 10_000)));
            assert_eq!(run.server, Ok(ServerDone { records: 10_000, chunks: 40 }));
            assert_eq!(run.client, Ok(ClientDone { records: 10_000, chunks: 40 }));
            assert_eq!(run.dones, 1);
            assert_eq!(run.max_chunk, 256);
        }
    }

    #[test]
    fn chunk_size_is_the_smaller_of_both_sides() {
        let rows = table(1_000);
        let run = transfer(&rows, 50, 100, 3);
        assert_eq!(run.got, rows);
        assert_eq!(run.client, Ok(ClientDone { records: 1_000, chunks: 20 }));
        let run = transfer(&rows, 100, 30, 4);
        assert_eq!(run.got, rows);
        assert_eq!(run.max_chunk, 30);
        assert_eq!(run.server, Ok(ServerDone { records: 1_000, chunks: 34 }));
        // Out-of-range settings are clamped.
        let s = FullSyncServer::new(FullSyncParams { chunk_records: 0, ..params(1, 0) }, 0);
        assert_eq!(s.chunk_records(), 1);
        let c = FullSyncClient::new(FullSyncParams { chunk_records: u32::MAX, ..params(2, 0) }, 1, 0);
        assert_eq!(c.chunk_records(), MAX_CHUNK_RECORDS);
    }

    #[test]
    fn empty_table() {
        let run = transfer(&[], 256, 256, 5);
        assert!(run.got.is_empty());
        assert_eq!(run.server, Ok(ServerDone { records: 0, chunks: 0 }));
        assert_eq!(run.client, Ok(ClientDone { records: 0, chunks: 0 }));
        assert_eq!(run.dones, 1);
        let run = transfer(&table(256), 256, 256, 6);
        assert_eq!(run.client, Ok(ClientDone { records: 256, chunks: 1 }));
    }

    fn enc_as(msg: &Message, cluster: u16, sender: u16, session: u32) -> Vec<u8> {
        let mut v = Vec::new();
        encode(msg, cluster, sender, session, &mut v);
        v
    }

    /// Server → client message.
    fn s2c(msg: &Message) -> Vec<u8> {
        enc_as(msg, CLUSTER, SERVER_ID, SESSION)
    }

    /// Client → server message.
    fn c2s(msg: &Message) -> Vec<u8> {
        enc_as(msg, CLUSTER, CLIENT_ID, SESSION)
    }

    fn begin(chunk_records: u32) -> Message {
        Message::Begin { snapshot_seq: 5, epoch: 1, chunk_records, estimated_records: 10, cut: Vec::new() }
    }

    fn chunk(index: u32, records: &[DeltaRecord]) -> Message {
        Message::Chunk { index, records: records.to_vec() }
    }

    fn end(records: &[DeltaRecord]) -> Message {
        let (count, digest) = digest_records(records);
        Message::End { count: count as u32, digest }
    }

    /// Recomputes a hand-edited message's checksum.
    fn reseal(m: &mut [u8]) {
        let hdr: [u8; HEADER_SIZE] = m[..HEADER_SIZE].try_into().unwrap();
        let c = checksum(&hdr, &m[HEADER_SIZE..]);
        m[CHECKSUM_OFFSET..HEADER_SIZE].copy_from_slice(&c.to_le_bytes());
    }

    fn decode_one(bytes: &[u8]) -> Result<Envelope, FsError> {
        let mut d = StreamDecoder::new();
        d.push(bytes);
        let r = d.next_frame().expect("a complete message");
        assert!(d.next_frame().is_none());
        r
    }

    /// Feeds segments to a client (chunk size 4), applying every chunk.
    fn drive_client(c: &mut FullSyncClient, segs: &[Vec<u8>]) -> Vec<ClientEvent> {
        let mut evs = Vec::new();
        for s in segs {
            c.handle_bytes(s, 0);
            while let Some(ev) = c.poll_event() {
                if let ClientEvent::Chunk { index, .. } = &ev {
                    c.chunk_applied(*index, 0);
                }
                evs.push(ev);
            }
        }
        evs
    }

    fn new_client() -> FullSyncClient {
        let mut c = FullSyncClient::new(params(CLIENT_ID, 4), SESSION, 0);
        let mut req = Vec::new();
        assert!(c.poll_transmit(&mut req));
        assert_eq!(decode_one(&req).unwrap().message, Message::Request { chunk_records: 4 });
        c
    }

    fn client_fails_with(segs: &[Vec<u8>]) -> FsError {
        let mut c = new_client();
        let evs = drive_client(&mut c, segs);
        assert!(!evs.iter().any(|e| matches!(e, ClientEvent::Done { .. })));
        let err = c.outcome().expect("finished").expect_err("failed");
        assert_eq!(evs.last(), Some(&ClientEvent::Failed(err.clone())));
        if !matches!(err, FsError::Remote { .. }) {
            let mut out = Vec::new();
            assert!(c.poll_transmit(&mut out), "an ERROR is queued");
            let env = decode_one(&out).unwrap();
            assert_eq!(env.session, SESSION);
            assert!(matches!(env.message, Message::Error { code, .. } if code == err.code()));
        }
        err
    }

    /// The server → client stream of a clean 10-record session in chunks of 4.
    fn clean_server_stream() -> (Vec<DeltaRecord>, Vec<Vec<u8>>) {
        let rows = table(10);
        let segs = vec![
            s2c(&begin(4)),
            s2c(&chunk(0, &rows[0..4])),
            s2c(&chunk(1, &rows[4..8])),
            s2c(&chunk(2, &rows[8..10])),
            s2c(&end(&rows)),
        ];
        (rows, segs)
    }

    #[test]
    fn crafted_clean_stream_is_accepted() {
        let (rows, segs) = clean_server_stream();
        let mut c = new_client();
        let evs = drive_client(&mut c, &segs);
        let got: Vec<DeltaRecord> = evs
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Chunk { records, .. } => Some(records.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(got, rows);
        assert_eq!(evs.last(), Some(&ClientEvent::Done { records: 10, digest_ok: true }));
        assert_eq!(c.outcome(), Some(Ok(ClientDone { records: 10, chunks: 3 })));
        assert_eq!(c.peer(), Some(SERVER_ID));
        // ACK 0, 1, 2 went out with the applies; the final ACK is 3.
        let mut out = Vec::new();
        assert!(c.poll_transmit(&mut out));
        let mut d = StreamDecoder::new();
        d.push(&out);
        let mut acks = Vec::new();
        while let Some(m) = d.next_message() {
            acks.push(m.unwrap());
        }
        assert_eq!(acks.last(), Some(&Message::Ack { index: 3 }));
        // Once done, further input is ignored.
        c.handle_bytes(b"garbage that is not a message at all.............", 1);
        c.handle_timeout(u64::MAX);
        assert_eq!(c.outcome(), Some(Ok(ClientDone { records: 10, chunks: 3 })));
        assert_eq!(c.poll_event(), None);
    }

    #[test]
    fn stop_and_wait_is_enforced() {
        let rows = table(10);
        let mut server = FullSyncServer::new(params(SERVER_ID, 4), 0);
        let mut client = FullSyncClient::new(params(CLIENT_ID, 4), SESSION, 0);
        let mut wire = Vec::new();
        client.poll_transmit(&mut wire);
        assert!(!server.wants_begin());
        server.handle_bytes(&wire, 1);
        wire.clear();
        assert!(server.wants_begin() && !server.wants_chunk());
        assert_eq!(server.poll_timeout(), None, "waiting on the local driver");
        assert_eq!((server.session(), server.peer()), (SESSION, Some(CLIENT_ID)));
        server.begin(7, 3, 10, 2);
        assert!(server.wants_chunk() && !server.wants_begin());
        server.push_chunk(&rows[..4], 3);
        assert!(!server.wants_chunk(), "one unacknowledged chunk at most");
        assert_eq!(server.poll_timeout(), Some(3 + ACK_WAIT_TIMEOUTS * TIMEOUT), "the chunk's transfer included");
        assert!(server.poll_transmit(&mut wire));
        assert!(!server.poll_transmit(&mut wire));
        client.handle_bytes(&wire, 4);
        wire.clear();
        assert_eq!(
            client.poll_event(),
            Some(ClientEvent::Begin { snapshot_seq: 7, epoch: 3, estimated_records: 10, cut: Vec::new() })
        );
        assert_eq!(client.poll_event(), Some(ClientEvent::Chunk { index: 0, records: rows[..4].to_vec() }));
        assert_eq!(client.poll_event(), None);
        assert!(!client.poll_transmit(&mut wire), "no ACK before the chunk is applied");
        assert_eq!(client.poll_timeout(), None, "waiting on the local host");
        assert!(!server.wants_chunk());
        client.chunk_applied(0, 5);
        assert_eq!(client.poll_timeout(), Some(5 + ACK_WAIT_TIMEOUTS * TIMEOUT), "the next chunk's transfer included");
        assert!(client.poll_transmit(&mut wire));
        server.handle_bytes(&wire, 6);
        assert!(server.wants_chunk());
        assert_eq!(server.poll_timeout(), None);
        assert_eq!(server.outcome(), None);
    }

    #[test]
    fn server_refuses_a_second_chunk_before_the_ack() {
        let rows = table(10);
        let mut server = FullSyncServer::new(params(SERVER_ID, 4), 0);
        server.handle_bytes(&c2s(&Message::Request { chunk_records: 4 }), 0);
        server.begin(1, 1, 10, 0);
        server.push_chunk(&rows[..4], 0);
        server.push_chunk(&rows[4..8], 0);
        assert!(matches!(server.outcome(), Some(Err(FsError::Misuse { .. }))));
        let mut out = Vec::new();
        assert!(server.poll_transmit(&mut out));
        // Only the ERROR: the unsent chunk was dropped.
        assert!(matches!(decode_one(&out).unwrap().message, Message::Error { code: error_code::ABORTED, .. }));
    }

    #[test]
    fn client_refuses_a_chunk_before_it_acknowledged_the_last() {
        let rows = table(8);
        let mut c = new_client();
        let mut both = s2c(&begin(4));
        both.extend(s2c(&chunk(0, &rows[..4])));
        both.extend(s2c(&chunk(1, &rows[4..8])));
        c.handle_bytes(&both, 0);
        assert_eq!(
            c.outcome(),
            Some(Err(FsError::UnexpectedKind { state: ClientState::Applying(0).name(), kind: MsgKind::Chunk }))
        );
        // The events delivered before stay; the failure comes last; a late
        // chunk_applied is ignored.
        assert!(matches!(c.poll_event(), Some(ClientEvent::Begin { .. })));
        assert!(matches!(c.poll_event(), Some(ClientEvent::Chunk { index: 0, .. })));
        assert!(matches!(c.poll_event(), Some(ClientEvent::Failed(FsError::UnexpectedKind { .. }))));
        c.chunk_applied(0, 1);
        assert_eq!(c.poll_event(), None);
    }

    #[test]
    fn flipped_bit_anywhere_in_the_server_stream_fails_the_client() {
        let (_, segs) = clean_server_stream();
        let stream: Vec<u8> = segs.concat();
        // Message start offsets, to name the field a bit belongs to.
        let mut starts = Vec::new();
        let mut off = 0;
        for s in &segs {
            starts.push(off);
            off += s.len();
        }
        let mut checksum_failures = 0;
        for bit in 0..stream.len() * 8 {
            let mut flipped = stream.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let mut c = new_client();
            let mut segs2 = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                segs2.push(flipped[starts[i]..starts[i] + s.len()].to_vec());
            }
            let evs = drive_client(&mut c, &segs2);
            if c.outcome().is_none() {
                c.handle_timeout(u64::MAX);
            }
            assert!(!evs.iter().any(|e| matches!(e, ClientEvent::Done { .. })), "bit {bit}: Done");
            let err = c.outcome().expect("finished").expect_err("failed");
            let start = starts.iter().rev().find(|s| **s <= bit / 8).copied().unwrap_or(0);
            match bit / 8 - start {
                0..=3 => assert!(matches!(err, FsError::BadMagic(_)), "bit {bit}: {err}"),
                4 => assert!(matches!(err, FsError::BadVersion(_)), "bit {bit}: {err}"),
                24..=27 => assert!(
                    matches!(err, FsError::Checksum { .. } | FsError::TooLong { .. } | FsError::Timeout { .. }),
                    "bit {bit}: {err}"
                ),
                _ => {
                    assert!(matches!(err, FsError::Checksum { .. }), "bit {bit}: {err}");
                    checksum_failures += 1;
                }
            }
        }
        assert!(checksum_failures > 7000);
    }

    /// Feeds segments to a server (chunk size 4, 10 records), driving it.
    fn drive_server(s: &mut FullSyncServer, rows: &[DeltaRecord], segs: &[Vec<u8>]) {
        let mut pos = 0;
        for seg in segs {
            s.handle_bytes(seg, 0);
            if s.wants_begin() {
                s.begin(1, 1, rows.len() as u64, 0);
            }
            if s.wants_chunk() {
                let n = 4.min(rows.len() - pos);
                s.push_chunk(&rows[pos..pos + n], 0);
                pos += n;
            }
        }
    }

    #[test]
    fn flipped_bit_anywhere_in_the_client_stream_fails_the_server() {
        let rows = table(10);
        let segs: Vec<Vec<u8>> = [
            Message::Request { chunk_records: 4 },
            Message::Ack { index: 0 },
            Message::Ack { index: 1 },
            Message::Ack { index: 2 },
            Message::Ack { index: 3 },
        ]
        .iter()
        .map(c2s)
        .collect();
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        drive_server(&mut s, &rows, &segs);
        assert_eq!(s.outcome(), Some(Ok(ServerDone { records: 10, chunks: 3 })));
        let stream = segs.concat();
        for bit in 0..stream.len() * 8 {
            let mut flipped = stream.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let mut segs2 = vec![flipped[..HEADER_SIZE + 8].to_vec()];
            segs2.extend(flipped[HEADER_SIZE + 8..].chunks(HEADER_SIZE).map(<[u8]>::to_vec));
            let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
            drive_server(&mut s, &rows, &segs2);
            if s.outcome().is_none() {
                s.handle_timeout(u64::MAX);
            }
            let err = s.outcome().expect("finished").expect_err("failed");
            let at = if bit / 8 < HEADER_SIZE + 8 { bit / 8 } else { (bit / 8 - HEADER_SIZE - 8) % HEADER_SIZE };
            match at {
                0..=3 => assert!(matches!(err, FsError::BadMagic(_)), "bit {bit}: {err}"),
                4 => assert!(matches!(err, FsError::BadVersion(_)), "bit {bit}: {err}"),
                24..=27 => {}
                _ => assert!(matches!(err, FsError::Checksum { .. }), "bit {bit}: {err}"),
            }
        }
    }

    #[test]
    fn truncated_stream_times_out() {
        let (_, mut segs) = clean_server_stream();
        let last = segs.last_mut().unwrap();
        last.truncate(last.len() - 5);
        let mut c = new_client();
        drive_client(&mut c, &segs);
        assert_eq!(c.outcome(), None);
        let t = c.poll_timeout().expect("waiting for END");
        c.handle_timeout(t - 1);
        assert_eq!(c.outcome(), None);
        c.handle_timeout(t);
        assert_eq!(c.outcome(), Some(Err(FsError::Timeout { what: "CHUNK or END" })));
        assert_eq!(c.poll_timeout(), None);
        let mut out = Vec::new();
        assert!(c.poll_transmit(&mut out));
        assert!(matches!(decode_one(&out).unwrap().message, Message::Error { code: error_code::TIMEOUT, .. }));

        // A client that never hears BEGIN (it allows for a wait in the
        // source's queue of walks).
        let mut c = FullSyncClient::new(params(CLIENT_ID, 4), SESSION, 100);
        let begin_wait = BEGIN_WAIT_TIMEOUTS * TIMEOUT;
        assert_eq!(c.poll_timeout(), Some(100 + begin_wait));
        c.handle_timeout(100 + TIMEOUT);
        assert_eq!(c.outcome(), None, "still waiting for its turn");
        c.handle_timeout(100 + begin_wait);
        assert_eq!(c.outcome(), Some(Err(FsError::Timeout { what: "BEGIN" })));

        // A server that never hears the REQUEST, or an ACK.
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 10);
        s.handle_timeout(10 + TIMEOUT);
        assert_eq!(s.outcome(), Some(Err(FsError::Timeout { what: "REQUEST" })));
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        drive_server(&mut s, &table(10), &[c2s(&Message::Request { chunk_records: 4 })]);
        let mut half = c2s(&Message::Ack { index: 0 });
        half.truncate(20);
        s.handle_bytes(&half, 50);
        let ack_wait = ACK_WAIT_TIMEOUTS * TIMEOUT;
        assert_eq!(s.poll_timeout(), Some(ack_wait), "a server's deadline is not moved by partial messages");
        s.handle_timeout(ack_wait);
        assert_eq!(s.outcome(), Some(Err(FsError::Timeout { what: "ACK" })));

        // A client receiving a chunk slowly (a lossy link): each part moves
        // its deadline on, up to PROGRESS_WAIT_TIMEOUTS for the message.
        let mut c = new_client();
        drive_client(&mut c, &[s2c(&begin(4))]);
        let chunk = s2c(&chunk(0, &table(4)));
        let mut last = c.poll_timeout().expect("waiting for a chunk");
        let first_part_at = last - 1;
        let bound = first_part_at + PROGRESS_WAIT_TIMEOUTS * TIMEOUT;
        let mut moves = 0;
        for part in chunk[..chunk.len() - 1].chunks(4) {
            // Each part just before the deadline.
            c.handle_bytes(part, last - 1);
            assert_eq!(c.outcome(), None);
            let d = c.poll_timeout().expect("deadline");
            assert!(d <= bound, "bounded per message");
            if d == last {
                break;
            }
            assert!(d > last, "the deadline moves on with the parts");
            (last, moves) = (d, moves + 1);
        }
        assert!(moves >= PROGRESS_WAIT_TIMEOUTS as usize - 1, "moved {moves} times");
        assert_eq!(last, bound, "until the bound");
        c.handle_timeout(bound);
        assert_eq!(c.outcome(), Some(Err(FsError::Timeout { what: "CHUNK or END" })));

        // A closed connection.
        let mut c = new_client();
        drive_client(&mut c, &segs[..2]);
        c.handle_eof();
        assert_eq!(c.outcome(), Some(Err(FsError::Closed)));
    }

    #[test]
    fn wrong_session_cluster_or_sender() {
        let rows = table(4);
        let b = begin(4);
        assert_eq!(
            client_fails_with(&[enc_as(&b, CLUSTER, SERVER_ID, SESSION + 1)]),
            FsError::WrongSession { expected: SESSION, got: SESSION + 1 }
        );
        assert_eq!(
            client_fails_with(&[enc_as(&b, CLUSTER + 1, SERVER_ID, SESSION)]),
            FsError::WrongCluster { expected: CLUSTER, got: CLUSTER + 1 }
        );
        assert_eq!(
            client_fails_with(&[s2c(&b), enc_as(&chunk(0, &rows), CLUSTER, 9, SESSION)]),
            FsError::WrongSender { expected: SERVER_ID, got: 9 }
        );
        assert_eq!(
            client_fails_with(&[s2c(&b), enc_as(&chunk(0, &rows), CLUSTER, SERVER_ID, SESSION + 1)]),
            FsError::WrongSession { expected: SESSION, got: SESSION + 1 }
        );

        let req = Message::Request { chunk_records: 4 };
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        s.handle_bytes(&enc_as(&req, CLUSTER + 1, CLIENT_ID, SESSION), 0);
        assert_eq!(s.outcome(), Some(Err(FsError::WrongCluster { expected: CLUSTER, got: CLUSTER + 1 })));
        let mut out = Vec::new();
        assert!(s.poll_transmit(&mut out));
        let env = decode_one(&out).unwrap();
        assert_eq!((env.session, env.sender), (0, SERVER_ID), "ERROR before a session is known");
        assert!(matches!(env.message, Message::Error { code: error_code::WRONG_PEER, .. }));

        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        drive_server(&mut s, &rows, &[c2s(&req)]);
        s.handle_bytes(&enc_as(&Message::Ack { index: 0 }, CLUSTER, CLIENT_ID, SESSION + 1), 0);
        assert_eq!(s.outcome(), Some(Err(FsError::WrongSession { expected: SESSION, got: SESSION + 1 })));

        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        drive_server(&mut s, &rows, &[c2s(&req)]);
        s.handle_bytes(&enc_as(&Message::Ack { index: 0 }, CLUSTER, 3, SESSION), 0);
        assert_eq!(s.outcome(), Some(Err(FsError::WrongSender { expected: CLIENT_ID, got: 3 })));

        // Session 0 is refused from the client too.
        let c = FullSyncClient::new(params(CLIENT_ID, 4), 0, 0);
        assert!(matches!(c.outcome(), Some(Err(FsError::Misuse { .. }))));
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        s.handle_bytes(&enc_as(&req, CLUSTER, CLIENT_ID, 0), 0);
        assert_eq!(s.outcome(), Some(Err(FsError::BadField { kind: MsgKind::Request, field: "session", value: 0 })));
    }

    #[test]
    fn chunks_and_acks_out_of_order() {
        let rows = table(8);
        assert_eq!(
            client_fails_with(&[s2c(&begin(4)), s2c(&chunk(1, &rows[..4]))]),
            FsError::OutOfOrder { expected: 0, got: 1 }
        );
        assert_eq!(
            client_fails_with(&[s2c(&begin(4)), s2c(&chunk(0, &rows[..4])), s2c(&chunk(0, &rows[4..]))]),
            FsError::OutOfOrder { expected: 1, got: 0 }
        );
        assert_eq!(
            client_fails_with(&[s2c(&chunk(0, &rows[..4]))]),
            FsError::UnexpectedKind { state: "awaiting BEGIN", kind: MsgKind::Chunk }
        );

        let req = c2s(&Message::Request { chunk_records: 4 });
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        drive_server(&mut s, &rows, &[req.clone(), c2s(&Message::Ack { index: 1 })]);
        assert_eq!(s.outcome(), Some(Err(FsError::OutOfOrder { expected: 0, got: 1 })));
        // Final ACK with the wrong number (8 records: chunks 0 and 1, END).
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        let acks = [0, 1, 3].map(|index| c2s(&Message::Ack { index }));
        drive_server(&mut s, &rows, &[req.clone(), acks[0].clone(), acks[1].clone(), acks[2].clone()]);
        assert_eq!(s.outcome(), Some(Err(FsError::OutOfOrder { expected: 2, got: 3 })));
        // A client that speaks before it is asked to.
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        s.handle_bytes(&req, 0);
        s.handle_bytes(&c2s(&Message::Ack { index: 0 }), 0);
        assert_eq!(
            s.outcome(),
            Some(Err(FsError::UnexpectedKind { state: "awaiting the local begin()", kind: MsgKind::Ack }))
        );
    }

    #[test]
    fn end_count_or_digest_mismatch() {
        let rows = table(4);
        let (_, digest) = digest_records(&rows);
        let head = [s2c(&begin(4)), s2c(&chunk(0, &rows))];
        let with_end = |m: Message| {
            let mut v = head.to_vec();
            v.push(s2c(&m));
            v
        };
        assert_eq!(
            client_fails_with(&with_end(Message::End { count: 5, digest })),
            FsError::CountMismatch { expected: 5, got: 4 }
        );
        assert_eq!(
            client_fails_with(&with_end(Message::End { count: 4, digest: digest ^ 1 })),
            FsError::DigestMismatch { expected: digest ^ 1, got: digest }
        );
        // END before BEGIN, or END that repeats chunk 0's records.
        assert!(matches!(client_fails_with(&[s2c(&end(&rows))]), FsError::UnexpectedKind { .. }));
        let mut twice = rows.clone();
        twice.extend_from_slice(&rows);
        assert!(matches!(client_fails_with(&with_end(end(&twice))), FsError::CountMismatch { .. }));
        let mut err = client_fails_with(&with_end(Message::End { count: 4, digest: 0 }));
        assert_eq!(err.code(), error_code::MISMATCH);
        err = client_fails_with(&[s2c(&begin(4)), s2c(&end(&rows))]);
        assert_eq!(err, FsError::CountMismatch { expected: 4, got: 0 });
    }

    #[test]
    fn chunk_limits() {
        let rows = table(5);
        // More records than agreed.
        assert_eq!(
            client_fails_with(&[s2c(&begin(4)), s2c(&chunk(0, &rows))]),
            FsError::TooManyRecords { count: 5, max: 4 }
        );
        assert_eq!(
            client_fails_with(&[s2c(&begin(2)), s2c(&chunk(0, &rows[..3]))]),
            FsError::TooManyRecords { count: 3, max: 2 }
        );
        // A server that agrees to more than was asked.
        assert_eq!(
            client_fails_with(&[s2c(&begin(8))]),
            FsError::BadField { kind: MsgKind::Begin, field: "chunk_records", value: 8 }
        );
        // The server refuses too many or invalid records from its driver.
        let req = c2s(&Message::Request { chunk_records: 4 });
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        s.handle_bytes(&req, 0);
        s.begin(1, 1, 5, 0);
        s.push_chunk(&rows, 0);
        assert_eq!(s.outcome(), Some(Err(FsError::TooManyRecords { count: 5, max: 4 })));
        let mut bad = rows[..3].to_vec();
        bad[2].key.family = 9;
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        s.handle_bytes(&req, 0);
        s.begin(1, 1, 5, 0);
        s.push_chunk(&bad, 0);
        assert_eq!(
            s.outcome(),
            Some(Err(FsError::BadRecord {
                chunk: 0,
                index: 2,
                reason: SnapshotRecordError::Record(RecordFault::Key(KeyError::BadFamily(9)))
            }))
        );
        // An invalid record on the wire.
        assert_eq!(
            client_fails_with(&[s2c(&begin(4)), s2c(&chunk(0, &bad))]),
            FsError::BadRecord {
                chunk: 0,
                index: 2,
                reason: SnapshotRecordError::Record(RecordFault::Key(KeyError::BadFamily(9)))
            }
        );
        // Misuse of the client API.
        let mut c = new_client();
        drive_client(&mut c, &[s2c(&begin(4))]);
        c.chunk_applied(0, 0);
        assert!(matches!(c.outcome(), Some(Err(FsError::Misuse { .. }))));
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        s.begin(1, 1, 1, 0);
        assert!(matches!(s.outcome(), Some(Err(FsError::Misuse { .. }))));
    }

    #[test]
    fn oversized_payload_is_refused_before_buffering() {
        let mut m = s2c(&Message::Ack { index: 0 });
        m[24..28].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        let mut d = StreamDecoder::new();
        d.push(&m[..HEADER_SIZE - 1]);
        assert!(d.next_message().is_none());
        d.push(&m[HEADER_SIZE - 1..]);
        assert_eq!(d.next_message(), Some(Err(FsError::TooLong { len: MAX_PAYLOAD as u32 + 1 })));
        assert!(d.is_failed());
        d.push(&[0; 4096]);
        assert_eq!(d.buffered(), 0);
        assert!(d.next_message().is_none());
        assert_eq!(d.payload.capacity(), 0);

        // At the limit: accepted, but buffered only as bytes come.
        let mut m = s2c(&Message::Ack { index: 0 });
        m[24..28].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        let mut d = StreamDecoder::new();
        d.push(&m);
        d.push(&[0; 1000]);
        assert!(d.next_message().is_none());
        assert_eq!(d.buffered(), HEADER_SIZE + 1000);
        assert!(d.payload.capacity() < 4096, "capacity {}", d.payload.capacity());

        // Through the client.
        let mut m = s2c(&chunk(0, &table(1)));
        m[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(client_fails_with(&[s2c(&begin(4)), m]), FsError::TooLong { len: u32::MAX });
    }

    #[test]
    fn error_from_the_peer_surfaces_as_remote() {
        let rows = table(6);
        // Server aborts mid-stream.
        let mut server = FullSyncServer::new(params(SERVER_ID, 4), 0);
        let mut client = FullSyncClient::new(params(CLIENT_ID, 4), SESSION, 0);
        let mut wire = Vec::new();
        client.poll_transmit(&mut wire);
        server.handle_bytes(&wire, 0);
        wire.clear();
        server.begin(1, 1, 6, 0);
        server.push_chunk(&rows[..4], 0);
        server.poll_transmit(&mut wire);
        client.handle_bytes(&wire, 0);
        wire.clear();
        client.chunk_applied(0, 0);
        server.abort(77, "table walk failed");
        assert_eq!(server.outcome(), Some(Err(FsError::Aborted { code: 77, reason: "table walk failed".into() })));
        server.poll_transmit(&mut wire);
        client.handle_bytes(&wire, 0);
        wire.clear();
        assert_eq!(client.outcome(), Some(Err(FsError::Remote { code: 77, reason: "table walk failed".into() })));
        assert!(!client.poll_transmit(&mut wire), "no ERROR in answer to an ERROR");
        // Further input to the failed server is ignored.
        server.handle_bytes(&c2s(&Message::Ack { index: 0 }), 0);
        server.push_chunk(&rows[4..], 0);
        assert!(matches!(server.outcome(), Some(Err(FsError::Aborted { .. }))));

        // A client failure reaches the server.
        let mut server = FullSyncServer::new(params(SERVER_ID, 4), 0);
        drive_server(&mut server, &rows, &[c2s(&Message::Request { chunk_records: 4 })]);
        let mut c = new_client();
        drive_client(&mut c, &[s2c(&begin(4))]);
        c.handle_timeout(u64::MAX);
        c.poll_transmit(&mut wire);
        server.handle_bytes(&wire, 0);
        wire.clear();
        assert!(matches!(
            server.outcome(),
            Some(Err(FsError::Remote { code: error_code::TIMEOUT, ref reason })) if reason.contains("CHUNK or END")
        ));
        // An ERROR with session 0 (sent before the server knew the session).
        let err = Message::Error { code: error_code::PROTOCOL, reason: "bad magic".into() };
        assert_eq!(
            client_fails_with(&[enc_as(&err, CLUSTER, SERVER_ID, 0)]),
            FsError::Remote { code: error_code::PROTOCOL, reason: "bad magic".into() }
        );
        // The client aborts.
        let mut c = new_client();
        c.abort(5, "host table full");
        c.poll_transmit(&mut wire);
        let env = decode_one(&wire).unwrap();
        assert_eq!(env.message, Message::Error { code: 5, reason: "host table full".into() });
    }

    #[test]
    fn garbage_to_the_server_is_answered_with_error() {
        let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
        s.handle_bytes(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", 0);
        assert_eq!(s.outcome(), Some(Err(FsError::BadMagic(u32::from_le_bytes(*b"GET ")))));
        let mut out = Vec::new();
        assert!(s.poll_transmit(&mut out));
        let env = decode_one(&out).unwrap();
        assert!(matches!(env.message, Message::Error { code: error_code::PROTOCOL, .. }));
        assert_eq!(env.session, 0);
    }

    #[test]
    fn error_reason_is_clipped_and_checked() {
        let long = "é".repeat(200);
        let m = s2c(&Message::Error { code: 3, reason: long.clone() });
        assert_eq!(m.len(), HEADER_SIZE + ERROR_CODE_SIZE + 256);
        match decode_one(&m).unwrap().message {
            Message::Error { code: 3, reason } => assert_eq!(reason, "é".repeat(128)),
            other => panic!("{other:?}"),
        }
        let odd = format!("x{long}");
        let m = s2c(&Message::Error { code: 3, reason: odd });
        assert_eq!(m.len(), HEADER_SIZE + ERROR_CODE_SIZE + 255);
        let mut m = s2c(&Message::Error { code: 3, reason: "ab".into() });
        m[HEADER_SIZE + 4] = 0xff;
        reseal(&mut m);
        assert_eq!(decode_one(&m), Err(FsError::BadReason));
        let mut m = s2c(&Message::Error { code: 3, reason: String::new() });
        m.truncate(HEADER_SIZE + 2);
        m[24..28].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut m);
        assert_eq!(decode_one(&m), Err(FsError::BadLength { kind: MsgKind::Error, count: 0, len: 2 }));
    }

    #[test]
    fn header_rules() {
        let rows = table(3);
        let ok = s2c(&chunk(4, &rows));
        assert_eq!(
            decode_one(&ok),
            Ok(Envelope { cluster_id: CLUSTER, sender: SERVER_ID, session: SESSION, message: chunk(4, &rows) })
        );
        let edit = |at: usize, bytes: &[u8]| {
            let mut m = ok.clone();
            m[at..at + bytes.len()].copy_from_slice(bytes);
            reseal(&mut m);
            decode_one(&m)
        };
        assert_eq!(edit(5, &[9]), Err(FsError::BadKind(9)));
        assert_eq!(edit(6, &[1, 0]), Err(FsError::BadFlags(1)));
        assert_eq!(edit(12, &[0; 4]), Err(FsError::BadField { kind: MsgKind::Chunk, field: "session", value: 0 }));
        assert_eq!(
            edit(20, &2u32.to_le_bytes()),
            Err(FsError::BadLength { kind: MsgKind::Chunk, count: 2, len: 3 * RECORD_SIZE as u32 })
        );
        assert_eq!(edit(20, &[0; 4]), Err(FsError::BadField { kind: MsgKind::Chunk, field: "count", value: 0 }));
        assert_eq!(
            edit(HEADER_SIZE + RECORD_SIZE + 49, &[7]),
            Err(FsError::BadRecord {
                chunk: 4,
                index: 1,
                reason: SnapshotRecordError::Record(RecordFault::State(nicsync_fwif::conn::StateError::BadDirection(
                    7
                )))
            })
        );
        let ack = c2s(&Message::Ack { index: 2 });
        let mut m = ack.clone();
        m[20] = 1;
        reseal(&mut m);
        assert_eq!(decode_one(&m), Err(FsError::BadField { kind: MsgKind::Ack, field: "count", value: 1 }));
        let req = c2s(&Message::Request { chunk_records: 4 });
        let mut m = req.clone();
        m[HEADER_SIZE + 4] = 1;
        reseal(&mut m);
        assert_eq!(decode_one(&m), Err(FsError::BadField { kind: MsgKind::Request, field: "reserved", value: 1 }));
        let mut m = req.clone();
        m[HEADER_SIZE..HEADER_SIZE + 4].copy_from_slice(&0u32.to_le_bytes());
        reseal(&mut m);
        assert_eq!(decode_one(&m), Err(FsError::BadField { kind: MsgKind::Request, field: "chunk_records", value: 0 }));
        let mut m = s2c(&begin(4));
        m[16] = 1;
        reseal(&mut m);
        assert_eq!(decode_one(&m), Err(FsError::BadField { kind: MsgKind::Begin, field: "index", value: 1 }));
        let mut m = s2c(&Message::End { count: 1, digest: 2 });
        m.push(0);
        m[24] += 1;
        reseal(&mut m);
        assert_eq!(decode_one(&m), Err(FsError::BadLength { kind: MsgKind::End, count: 1, len: 9 }));
        let mut m = ok.clone();
        m[4] = 1;
        assert_eq!(decode_one(&m), Err(FsError::BadVersion(1)), "version 1's BEGIN had no cut");
    }

    #[test]
    fn an_authenticated_stream_goes_without_checksums_and_only_it_may() {
        let rows = table(20);
        let msg = chunk(0, &rows[..5]);
        let mut m = Vec::new();
        encode_unchecked(&msg, CLUSTER, SERVER_ID, SESSION, &mut m);
        let h = FsHeader::read_from_bytes(&m[..HEADER_SIZE]).expect("header");
        assert_eq!((h.flags.get(), h.checksum.get()), (FLAG_NO_CHECKSUM, 0));
        let mut d = StreamDecoder::authenticated();
        d.push(&m);
        assert_eq!(d.next_frame().expect("a message").map(|e| e.message), Ok(msg.clone()));
        // A plain stream refuses it: there the checksum is the only check.
        assert!(matches!(decode_one(&m), Err(FsError::Checksum { expected: 0, .. })));
        // An authenticated stream still checks a checksum that is there.
        let mut m = s2c(&msg);
        m[HEADER_SIZE + 3] ^= 1;
        let mut d = StreamDecoder::authenticated();
        d.push(&m);
        assert!(matches!(d.next_frame(), Some(Err(FsError::Checksum { .. }))));
        // A whole transfer between authenticated ends.
        let auth = |id| FullSyncParams { authenticated: true, ..params(id, 4) };
        let mut server = FullSyncServer::new(auth(SERVER_ID), 0);
        let mut client = FullSyncClient::new(auth(CLIENT_ID), SESSION, 0);
        let (mut c2s_wire, mut s2c_wire) = (Vec::new(), Vec::new());
        let mut got = Vec::new();
        for now in 0..100 {
            client.poll_transmit(&mut c2s_wire);
            server.handle_bytes(&c2s_wire, now);
            c2s_wire.clear();
            if server.wants_begin() {
                server.begin(1, 1, rows.len() as u64, now);
            }
            if server.wants_chunk() {
                let from = got.len().min(rows.len());
                let n = 4.min(rows.len() - from);
                server.push_chunk(&rows[from..from + n], now);
            }
            server.poll_transmit(&mut s2c_wire);
            assert!(s2c_wire.is_empty() || s2c_wire[6] == FLAG_NO_CHECKSUM as u8);
            client.handle_bytes(&s2c_wire, now);
            s2c_wire.clear();
            while let Some(ev) = client.poll_event() {
                match ev {
                    ClientEvent::Chunk { index, records } => {
                        got.extend(records);
                        client.chunk_applied(index, now);
                    }
                    ClientEvent::Failed(e) => panic!("{e}"),
                    _ => {}
                }
            }
            if client.outcome().is_some() {
                break;
            }
        }
        assert!(matches!(client.outcome(), Some(Ok(_))), "{:?}", client.outcome());
        assert_eq!(got, rows);
    }

    #[test]
    fn begin_carries_the_cut() {
        let cut = vec![SyncPosition::new(1, 0x77, 801), SyncPosition::new(3, 9, 1)];
        let msg = Message::Begin { snapshot_seq: 801, epoch: 0x77, chunk_records: 4, estimated_records: 5, cut };
        let m = s2c(&msg);
        assert_eq!(m.len(), HEADER_SIZE + BEGIN_SIZE + 2 * SyncPosition::SIZE);
        assert_eq!(decode_one(&m).map(|e| e.message), Ok(msg));
        // count and length must agree; an entry naming no stream is refused.
        let mut bad = m.clone();
        bad[20] = 1;
        reseal(&mut bad);
        assert!(matches!(decode_one(&bad), Err(FsError::BadLength { kind: MsgKind::Begin, .. })), "{bad:?}");
        let mut bad = m.clone();
        bad[HEADER_SIZE + BEGIN_SIZE + SyncPosition::SIZE + 8..][..8].fill(0);
        reseal(&mut bad);
        let e = Err(FsError::BadField { kind: MsgKind::Begin, field: "cut entry", value: 1 });
        assert_eq!(decode_one(&bad), e);
        let mut bad = m;
        bad[20..24].copy_from_slice(&(MAX_POSITIONS + 1).to_le_bytes());
        reseal(&mut bad);
        let e = Err(FsError::BadField { kind: MsgKind::Begin, field: "count", value: u64::from(MAX_POSITIONS) + 1 });
        assert_eq!(decode_one(&bad), e);
        // A server cannot send a cut BEGIN cannot carry.
        let mut server = FullSyncServer::new(params(SERVER_ID, 4), 0);
        let mut client = FullSyncClient::new(params(CLIENT_ID, 4), SESSION, 0);
        let mut wire = Vec::new();
        client.poll_transmit(&mut wire);
        server.handle_bytes(&wire, 1);
        assert!(server.wants_begin());
        server.begin_at(1, 1, 1, vec![SyncPosition::new(0, 1, 1)], 0);
        assert!(matches!(server.outcome(), Some(Err(FsError::Misuse { .. }))));
    }

    #[test]
    fn decoding_is_independent_of_splits() {
        let rows = table(20);
        let msgs = vec![
            Message::Request { chunk_records: 9 },
            begin(9),
            chunk(0, &rows[..9]),
            Message::Ack { index: 0 },
            chunk(1, &rows[9..]),
            end(&rows),
            Message::Error { code: 1, reason: "bye".into() },
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            encode(m, CLUSTER, SERVER_ID, SESSION, &mut stream);
        }
        let mut rng = XorShift(77);
        for round in 0..20 {
            let mut d = StreamDecoder::new();
            let mut off = 0;
            while off < stream.len() {
                let n = if round == 0 { 1 } else { 1 + rng.below(100) as usize }.min(stream.len() - off);
                d.push(&stream[off..off + n]);
                off += n;
            }
            let mut got = Vec::new();
            while let Some(m) = d.next_message() {
                got.push(m.unwrap());
            }
            assert_eq!(got, msgs);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut d = StreamDecoder::new();
            d.push(&bytes);
            let mut errors = 0;
            while let Some(m) = d.next_message() {
                errors += usize::from(m.is_err());
            }
            assert!(errors <= 1);
            let mut c = new_client();
            c.handle_bytes(&bytes, 0);
            let mut s = FullSyncServer::new(params(SERVER_ID, 4), 0);
            s.handle_bytes(&bytes, 0);
        }
        let (_, segs) = clean_server_stream();
        let stream = segs.concat();
        for _ in 0..2000 {
            let mut g = stream.clone();
            let at = rng.below(g.len() as u64) as usize;
            g[at] = g[at].wrapping_add(1 + rng.below(255) as u8);
            let mut c = new_client();
            drive_client(&mut c, &[g]);
            assert!(!matches!(c.outcome(), Some(Ok(_))));
        }
    }

    #[test]
    fn checksum_is_crc32c_of_the_message() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let m = s2c(&chunk(0, &table(3)));
        let stored = u32::from_le_bytes(m[CHECKSUM_OFFSET..HEADER_SIZE].try_into().unwrap());
        let mut z = m.clone();
        z[CHECKSUM_OFFSET..HEADER_SIZE].fill(0);
        assert_eq!(stored, crc32c::crc32c(&z));
        assert_eq!(&m[..4], b"NFSY");
    }

    #[test]
    fn digest_covers_what_converged_members_share() {
        let rows = table(100);
        let (n, d) = digest_records(&rows);
        assert_eq!(n, 100);
        let rev: Vec<DeltaRecord> = rows.iter().rev().copied().collect();
        assert_eq!(digest_records(&rev), (n, d), "order independent");
        let mut t = TableDigest::new();
        t.add_all(&rows);
        assert_eq!((t.count(), t.digest()), (n, d));
        t.remove(&rows[3]);
        let mut without = rows.clone();
        without.remove(3);
        assert_eq!((t.count(), t.digest()), digest_records(&without));

        let r = rows[7];
        let h = record_digest(&r);
        // The remaining seconds differ between members: not covered.
        let mut x = r;
        x.state.timeout_s = 5.into();
        assert_eq!(record_digest(&x), h);
        // Whether the entry ages at all is.
        x.state.timeout_s = 0.into();
        assert_ne!(record_digest(&x), h);
        // An untranslated entry's NAT bytes are not.
        let mut y = rows[1];
        let hy = record_digest(&y);
        y.nat.addr[0] = 1;
        y.nat.port = 9.into();
        assert_eq!(record_digest(&y), hy);
        // Every replicated field is.
        let edits: [fn(&mut DeltaRecord); 10] = [
            |r| r.key.src_addr[3] ^= 1,
            |r| r.key.dst_port = (r.key.dst_port.get() + 1).into(),
            |r| r.key.zone = (r.key.zone.get() + 1).into(),
            |r| r.state.tcp_state ^= 1,
            |r| r.state.direction ^= 1,
            |r| r.state.flags = (r.state.flags.get() ^ ConnFlags::ASSURED.bits()).into(),
            |r| r.state.mark = (r.state.mark.get() + 1).into(),
            |r| r.state.generation = (r.state.generation.get() + 1).into(),
            |r| r.nat.port = (r.nat.port.get() + 1).into(),
            |r| r.nat.addr[2] ^= 0x80,
        ];
        for (i, e) in edits.iter().enumerate() {
            let mut z = r;
            e(&mut z);
            assert_ne!(record_digest(&z), h, "edit {i}");
        }
        // Distinct records give distinct hashes.
        let mut hs: Vec<u64> = table(10_000).iter().map(record_digest).collect();
        hs.sort_unstable();
        hs.dedup();
        assert_eq!(hs.len(), 10_000);
        assert_eq!(digest_records(&[]), (0, 0));
    }
}
