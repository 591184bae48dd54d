//! Sync-port frames: the Delta Sync wire format.
//!
//! When the device applies a change to a connection marked for sync (a host
//! command or aging), it emits a *delta record* on its sync port, as
//! Check Point's HyperSync does from the SecureXL/NIC layer. Records are
//! packed into frames that fit one UDP payload (default port
//! [`SYNC_UDP_PORT`], ClusterXL's 8116) or one message of the in-process
//! wire. Besides the records, a handful of control frames make the stream
//! reliable in the manner of conntrackd's FTFW mode and pfsync:
//!
//! | opcode | from → to | meaning | ClusterXL / conntrackd analogue |
//! |---|---|---|---|
//! | [`DELTA`](SyncOpcode::Delta) | sender → all (or one, when retransmitting) | `count` consecutive updates, the first numbered `seq` | delta sync update; FTFW data message |
//! | [`NACK`](SyncOpcode::Nack) | receiver → sender | "resend `[from, to]` of your epoch `target_epoch`" | ClusterXL retransmission request; FTFW NACK |
//! | [`ACK`](SyncOpcode::Ack) | receiver → sender | "I hold everything of your epoch up to `through`" | FTFW ACK (window of 300) |
//! | [`ALIVE`](SyncOpcode::Alive) | sender → all | heartbeat; `seq` is the next number the sender will assign, so a receiver learns of loss at the tail of the stream | FTFW ALIVE (every second) |
//! | [`HELLO`](SyncOpcode::Hello) | sender → all (or the asker) | "I (re)started: epoch `epoch` begins at `first_seq`"; receivers reset instead of NACKing the old epoch forever | FTFW HELLO |
//! | [`LOST`](SyncOpcode::Lost) | sender → receiver | "I can no longer resend `[from, to]`": the receiver counts lost updates and needs a resync | ClusterXL "lost updates" → full sync |
//!
//! # Frame layout
//!
//! Every frame is a 32-byte [`SyncHeader`] followed by `payload_len` bytes
//! holding `count` elements of the size the opcode selects. All fields are
//! little-endian.
//!
//! | offset | size | field | rule |
//! |---|---|---|---|
//! | 0 | 4 | `magic` | [`SYNC_MAGIC`] (the bytes `NSYN`) |
//! | 4 | 1 | `version` | [`SYNC_VERSION`] |
//! | 5 | 1 | `opcode` | [`SyncOpcode`] |
//! | 6 | 2 | `flags` | [`FrameFlags`]; undefined bits zero |
//! | 8 | 2 | `cluster_id` | receivers drop frames of other clusters |
//! | 10 | 2 | `sender` | member id of the sender |
//! | 12 | 4 | `epoch` | sender's session id, never 0; new on every restart |
//! | 16 | 8 | `seq` | DELTA: first record's number; ALIVE/HELLO: next number to be assigned; others: 0 |
//! | 24 | 2 | `count` | number of payload elements |
//! | 26 | 2 | `payload_len` | `count × element size`, at most [`MAX_PAYLOAD`] |
//! | 28 | 4 | `checksum` | CRC-32C of the whole frame with this field zero |
//!
//! | opcode | element | size | count |
//! |---|---|---|---|
//! | DELTA | [`DeltaRecord`] | 88 | 1..=[`MAX_RECORDS`] (16) |
//! | NACK, LOST | [`RangeBody`] | 24 | 1..=[`MAX_RANGES`] |
//! | ACK | [`AckBody`] | 16 | 1..=[`MAX_ACKS`] |
//! | HELLO | [`HelloBody`] | 8 | 1 |
//! | ALIVE | none | 0 | 0 |
//!
//! # Design choices
//!
//! * **64-bit sequence numbers.** At the 500,000 connections per second the
//!   cluster must sustain, with at least three updates per connection, a
//!   32-bit number wraps in under 48 minutes; every comparison would then
//!   need serial-number arithmetic (RFC 1982) and a window that can never
//!   exceed 2^31, and a receiver that was partitioned for an hour could
//!   mistake old for new. A `u64` does not wrap in the life of the cluster,
//!   so all comparisons are plain integer comparisons. The cost is 4 bytes
//!   per *frame*, not per record (see next point). Sequence number 0 is
//!   never assigned; it means "none".
//! * **Records are consecutive.** A DELTA frame carries the number of its
//!   first record; record `i` is `seq + i`. The sender numbers updates in
//!   the order the table applied them and never skips, so a per-record
//!   number would be 8 redundant bytes per record. Retransmissions are
//!   repacked from the retransmit queue and obey the same rule.
//! * **88-byte records, 16 per frame.** A record is op, flags, owner member
//!   id, 4 reserved bytes, then key (40), state (16) and NAT (24) at 8-byte
//!   aligned offsets, as a 64-bit FPGA datapath wants them. 16 records make a
//!   1,440-byte frame ([`MAX_DELTA_FRAME`]); sealed (32 bytes more, see
//!   [`crate::seal`]) it fills one 1,472-byte UDP payload (1,500-byte MTU
//!   less 28 bytes of IPv4 and UDP headers). Control frames are bounded by
//!   the same 1,440 bytes ([`MAX_FRAME`]).
//! * **Epochs.** Every frame names the sender's epoch, a random non-zero
//!   session id chosen at start. Sequence numbers are only meaningful within
//!   an epoch, so a restarted sender does not have to remember its old
//!   numbers and a receiver can tell a restart from loss.
//! * **CRC-32C.** The in-process wire has no UDP checksum, and a flipped bit
//!   in a record would silently corrupt a peer's table. CRC-32C (Castagnoli,
//!   as iSCSI and SCTP) is one small block in an FPGA and detects every
//!   error of up to 3 bits in a frame of this size. It is not
//!   authentication: that is the seal's job ([`crate::seal`]), on by
//!   default; the CRC still guards a cluster that runs without it.
//! * **Strict parsing.** [`Frame::parse`] checks magic, version, lengths,
//!   checksum, opcode, flags, counts, sequence rules, reserved fields and
//!   every record, returns a [`FrameError`] naming the first fault, never
//!   panics and never allocates: the view borrows the caller's buffer.

use bitflags::bitflags;
use core::cmp::Ordering;
use core::fmt;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::assert_layout;
use crate::conn::{ConnKey, ConnState, KeyError, Nat, StateError};
use crate::seal::SEAL_OVERHEAD;

/// Frame magic: the bytes `N S Y N` read as a little-endian `u32`.
pub const SYNC_MAGIC: u32 = u32::from_le_bytes(*b"NSYN");
/// Version of this frame format.
pub const SYNC_VERSION: u8 = 2;
/// Default UDP port of the sync network (ClusterXL uses 8116 too).
pub const SYNC_UDP_PORT: u16 = 8116;
/// Size of the frame header.
pub const HEADER_SIZE: usize = 32;
/// Largest UDP payload that fits a 1,500-byte Ethernet MTU over IPv4.
pub const MAX_DATAGRAM: usize = 1472;
/// Largest `payload_len` a receiver accepts: a full frame, sealed, still
/// fits one datagram.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - SEAL_OVERHEAD - HEADER_SIZE;
/// Size of a [`DeltaRecord`].
pub const RECORD_SIZE: usize = 88;
/// Records per DELTA frame at most.
pub const MAX_RECORDS: usize = MAX_PAYLOAD / RECORD_SIZE;
/// Size of a [`RangeBody`].
pub const RANGE_SIZE: usize = 24;
/// Ranges per NACK or LOST frame at most.
pub const MAX_RANGES: usize = MAX_PAYLOAD / RANGE_SIZE;
/// Size of an [`AckBody`].
pub const ACK_SIZE: usize = 16;
/// Acknowledgements per ACK frame at most.
pub const MAX_ACKS: usize = MAX_PAYLOAD / ACK_SIZE;
/// Size of a [`HelloBody`].
pub const HELLO_SIZE: usize = 8;
/// Size of the largest frame of any opcode (a buffer of this size holds
/// every frame); sealed, it is [`MAX_DATAGRAM`].
pub const MAX_FRAME: usize = MAX_DATAGRAM - SEAL_OVERHEAD;
/// Size of a full DELTA frame.
pub const MAX_DELTA_FRAME: usize = HEADER_SIZE + MAX_RECORDS * RECORD_SIZE;
/// Byte offset of the checksum field in the header.
pub const CHECKSUM_OFFSET: usize = 28;

const _: () = {
    assert!(MAX_RECORDS == 16);
    assert!(MAX_DELTA_FRAME == 1440);
    assert!(MAX_DELTA_FRAME <= MAX_DATAGRAM);
    assert!(HEADER_SIZE + MAX_RANGES * RANGE_SIZE <= MAX_FRAME);
    assert!(HEADER_SIZE + MAX_ACKS * ACK_SIZE <= MAX_FRAME);
    assert!(MAX_RANGES == 58);
    assert!(MAX_ACKS == 88);
    assert!(MAX_FRAME + SEAL_OVERHEAD == MAX_DATAGRAM);
    assert!(MAX_PAYLOAD <= u16::MAX as usize);
};

/// Frame opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SyncOpcode {
    /// Consecutive delta records.
    Delta = 1,
    /// Retransmission request for sequence ranges.
    Nack = 2,
    /// Cumulative acknowledgement.
    Ack = 3,
    /// Heartbeat with the sender's next sequence number.
    Alive = 4,
    /// Start of an epoch (sender started or restarted).
    Hello = 5,
    /// Ranges the sender can no longer retransmit.
    Lost = 6,
}

impl SyncOpcode {
    /// Every opcode.
    pub const ALL: [SyncOpcode; 6] =
        [SyncOpcode::Delta, SyncOpcode::Nack, SyncOpcode::Ack, SyncOpcode::Alive, SyncOpcode::Hello, SyncOpcode::Lost];

    /// Decodes an opcode byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|o| *o as u8 == b)
    }

    /// Upper-case name.
    pub const fn name(self) -> &'static str {
        match self {
            SyncOpcode::Delta => "DELTA",
            SyncOpcode::Nack => "NACK",
            SyncOpcode::Ack => "ACK",
            SyncOpcode::Alive => "ALIVE",
            SyncOpcode::Hello => "HELLO",
            SyncOpcode::Lost => "LOST",
        }
    }

    /// Size of one payload element.
    pub const fn element_size(self) -> usize {
        match self {
            SyncOpcode::Delta => RECORD_SIZE,
            SyncOpcode::Nack | SyncOpcode::Lost => RANGE_SIZE,
            SyncOpcode::Ack => ACK_SIZE,
            SyncOpcode::Alive => 0,
            SyncOpcode::Hello => HELLO_SIZE,
        }
    }

    /// Smallest and largest element count.
    pub const fn count_bounds(self) -> (usize, usize) {
        match self {
            SyncOpcode::Delta => (1, MAX_RECORDS),
            SyncOpcode::Nack | SyncOpcode::Lost => (1, MAX_RANGES),
            SyncOpcode::Ack => (1, MAX_ACKS),
            SyncOpcode::Alive => (0, 0),
            SyncOpcode::Hello => (1, 1),
        }
    }

    /// Flags this opcode may carry.
    pub const fn allowed_flags(self) -> FrameFlags {
        match self {
            SyncOpcode::Delta => FrameFlags::RETRANSMIT,
            _ => FrameFlags::empty(),
        }
    }
}

bitflags! {
    /// Frame header flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct FrameFlags: u16 {
        /// DELTA only: the records are a retransmission answering a NACK.
        const RETRANSMIT = 1 << 0;
    }
}

/// The 32-byte frame header as it is on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SyncHeader {
    /// [`SYNC_MAGIC`].
    pub magic: U32,
    /// [`SYNC_VERSION`].
    pub version: u8,
    /// [`SyncOpcode`] byte.
    pub opcode: u8,
    /// [`FrameFlags`] bits.
    pub flags: U16,
    /// Cluster the sender belongs to.
    pub cluster_id: U16,
    /// Member id of the sender.
    pub sender: U16,
    /// Sender's epoch (session id), never 0.
    pub epoch: U32,
    /// Sequence number; meaning depends on the opcode (module docs).
    pub seq: U64,
    /// Payload elements.
    pub count: U16,
    /// Payload bytes after the header.
    pub payload_len: U16,
    /// CRC-32C of the frame with this field zero ([`checksum`]).
    pub checksum: U32,
}
assert_layout!(
    SyncHeader,
    size = HEADER_SIZE,
    magic = 0,
    version = 4,
    opcode = 5,
    flags = 6,
    cluster_id = 8,
    sender = 10,
    epoch = 12,
    seq = 16,
    count = 24,
    payload_len = 26,
    checksum = CHECKSUM_OFFSET
);

/// What a delta record does to the peer's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DeltaOp {
    /// Insert the connection or replace its state (generation rules apply).
    Upsert = 1,
    /// Remove the connection (generation rules apply).
    Delete = 2,
}

impl DeltaOp {
    /// Decodes an op byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(DeltaOp::Upsert),
            2 => Some(DeltaOp::Delete),
            _ => None,
        }
    }
}

/// One delta record as it is on the wire (88 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DeltaRecord {
    /// [`DeltaOp`] byte.
    pub op: u8,
    /// Reserved, zero.
    pub flags: u8,
    /// Member that made the change (conflict tie-break).
    pub owner: U16,
    /// Reserved, zero.
    pub reserved: [u8; 4],
    /// Connection key.
    pub key: ConnKey,
    /// New state (DELETE: the last state; its generation orders the delete).
    pub state: ConnState,
    /// NAT translation (all zero for DELETE).
    pub nat: Nat,
}
assert_layout!(
    DeltaRecord,
    size = RECORD_SIZE,
    op = 0,
    flags = 1,
    owner = 2,
    reserved = 4,
    key = 8,
    state = 48,
    nat = 64
);

/// Body of NACK and LOST: a sequence range of one sender's epoch.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RangeBody {
    /// Member the range refers to (NACK: the sender asked; LOST: the
    /// receiver told).
    pub target: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// Epoch of `target`'s stream the numbers belong to. In a NACK, 0 with
    /// `from = to = 0` asks the target for a HELLO.
    pub target_epoch: U32,
    /// First sequence number, inclusive.
    pub from: U64,
    /// Last sequence number, inclusive.
    pub to: U64,
}
assert_layout!(RangeBody, size = RANGE_SIZE, target = 0, reserved = 2, target_epoch = 4, from = 8, to = 16);

/// Body of ACK.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AckBody {
    /// Member whose stream is acknowledged.
    pub target: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// Epoch of `target`'s stream.
    pub target_epoch: U32,
    /// Every update up to and including this number was received (or
    /// declared lost); 0 when none.
    pub through: U64,
}
assert_layout!(AckBody, size = ACK_SIZE, target = 0, reserved = 2, target_epoch = 4, through = 8);

/// Body of HELLO.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HelloBody {
    /// First sequence number of the epoch (the header's `seq` is the next
    /// one to be assigned).
    pub first_seq: U64,
}
assert_layout!(HelloBody, size = HELLO_SIZE, first_seq = 0);

/// A checked delta update (a [`DeltaRecord`] decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeltaUpdate {
    /// What to do.
    pub op: DeltaOp,
    /// Member that made the change.
    pub owner: u16,
    /// Connection key.
    pub key: ConnKey,
    /// State (for DELETE the last state, whose generation orders it).
    pub state: ConnState,
    /// NAT translation (`Nat::default()` for DELETE).
    pub nat: Nat,
}

/// The order of precedence between two versions of a connection: the
/// higher generation wins; equal generations go to the higher owner member
/// id; then DELETE beats UPSERT; then the record bytes decide. Two updates
/// compare `Equal` only when they are identical, so this is a total order
/// and every member picks the same winner whatever order updates arrive
/// in. A device keeps the stored version unless the new one is `Greater`
/// (docs/abi.md, the conflict rule); a host that keeps a copy of the table
/// applies the same rule to know what its card must have answered.
pub fn precedence(a: &DeltaUpdate, b: &DeltaUpdate) -> Ordering {
    a.state
        .generation
        .get()
        .cmp(&b.state.generation.get())
        .then(a.owner.cmp(&b.owner))
        .then(op_rank(a.op).cmp(&op_rank(b.op)))
        .then_with(|| a.to_record().as_bytes().cmp(b.to_record().as_bytes()))
}

fn op_rank(op: DeltaOp) -> u8 {
    match op {
        DeltaOp::Upsert => 0,
        DeltaOp::Delete => 1,
    }
}

impl DeltaUpdate {
    /// An UPSERT.
    pub fn upsert(owner: u16, key: ConnKey, state: ConnState, nat: Nat) -> Self {
        DeltaUpdate { op: DeltaOp::Upsert, owner, key, state, nat }
    }

    /// A DELETE.
    pub fn delete(owner: u16, key: ConnKey, state: ConnState) -> Self {
        DeltaUpdate { op: DeltaOp::Delete, owner, key, state, nat: Nat::default() }
    }

    /// The wire form.
    pub fn to_record(&self) -> DeltaRecord {
        DeltaRecord {
            op: self.op as u8,
            flags: 0,
            owner: self.owner.into(),
            reserved: [0; 4],
            key: self.key,
            state: self.state,
            nat: self.nat,
        }
    }

    /// Checks that the wire form would be accepted by [`Frame::parse`].
    pub fn validate(&self) -> Result<(), RecordFault> {
        self.to_record().validate().map(|_| ())
    }
}

/// Why a [`DeltaRecord`] is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// Unknown op byte.
    BadOp(u8),
    /// A reserved field (record flags, reserved bytes, NAT reserved) is not zero.
    ReservedNonZero,
    /// Malformed key.
    Key(KeyError),
    /// Malformed state or NAT.
    State(StateError),
    /// A DELETE carries a non-zero NAT part.
    DeleteWithNat,
}

impl fmt::Display for RecordFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordFault::BadOp(b) => write!(f, "unknown delta op {b}"),
            RecordFault::ReservedNonZero => f.write_str("reserved record field is not zero"),
            RecordFault::Key(e) => write!(f, "key: {e}"),
            RecordFault::State(e) => write!(f, "state: {e}"),
            RecordFault::DeleteWithNat => f.write_str("DELETE carries a NAT translation"),
        }
    }
}

impl DeltaRecord {
    /// Checks every field; returns the op.
    pub fn validate(&self) -> Result<DeltaOp, RecordFault> {
        let op = DeltaOp::from_wire(self.op).ok_or(RecordFault::BadOp(self.op))?;
        if self.flags != 0 || self.reserved != [0; 4] || self.nat.reserved != [0; 4] {
            return Err(RecordFault::ReservedNonZero);
        }
        self.key.validate().map_err(RecordFault::Key)?;
        self.state.validate().map_err(RecordFault::State)?;
        match op {
            DeltaOp::Upsert => self.nat.validate(self.key.family).map_err(RecordFault::State)?,
            DeltaOp::Delete if self.nat != Nat::default() => return Err(RecordFault::DeleteWithNat),
            DeltaOp::Delete => {}
        }
        Ok(op)
    }

    /// Validates and decodes.
    pub fn decode(&self) -> Result<DeltaUpdate, RecordFault> {
        let op = self.validate()?;
        Ok(self.update_with_op(op))
    }

    fn update_with_op(&self, op: DeltaOp) -> DeltaUpdate {
        DeltaUpdate { op, owner: self.owner.get(), key: self.key, state: self.state, nat: self.nat }
    }
}

/// A decoded NACK or LOST range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqRange {
    /// Member whose stream the range refers to.
    pub target: u16,
    /// That member's epoch (0 only in a HELLO request).
    pub target_epoch: u32,
    /// First number, inclusive.
    pub from: u64,
    /// Last number, inclusive.
    pub to: u64,
}

impl SeqRange {
    /// A NACK element asking `target` to send a HELLO (the asker does not
    /// know `target`'s current epoch).
    pub const fn hello_request(target: u16) -> Self {
        SeqRange { target, target_epoch: 0, from: 0, to: 0 }
    }

    /// Whether this is a HELLO request.
    pub const fn is_hello_request(&self) -> bool {
        self.target_epoch == 0
    }

    /// Updates in the range (0 for a HELLO request).
    pub const fn len(&self) -> u64 {
        if self.is_hello_request() || self.to < self.from {
            0
        } else {
            self.to - self.from + 1
        }
    }

    /// Whether the range holds no update.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wire rules: `1 <= from <= to` with a non-zero epoch, or (NACK only)
    /// the HELLO request form.
    fn valid(&self, allow_hello_request: bool) -> bool {
        if self.target_epoch == 0 {
            allow_hello_request && self.from == 0 && self.to == 0
        } else {
            self.from >= 1 && self.from <= self.to
        }
    }

    fn to_wire(self) -> RangeBody {
        RangeBody {
            target: self.target.into(),
            reserved: 0.into(),
            target_epoch: self.target_epoch.into(),
            from: self.from.into(),
            to: self.to.into(),
        }
    }
}

impl RangeBody {
    /// The decoded range.
    pub fn get(&self) -> SeqRange {
        SeqRange {
            target: self.target.get(),
            target_epoch: self.target_epoch.get(),
            from: self.from.get(),
            to: self.to.get(),
        }
    }
}

/// A decoded ACK element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AckEntry {
    /// Member whose stream is acknowledged.
    pub target: u16,
    /// That member's epoch (never 0).
    pub target_epoch: u32,
    /// Everything up to and including this number is held.
    pub through: u64,
}

impl AckEntry {
    fn to_wire(self) -> AckBody {
        AckBody {
            target: self.target.into(),
            reserved: 0.into(),
            target_epoch: self.target_epoch.into(),
            through: self.through.into(),
        }
    }
}

impl AckBody {
    /// The decoded acknowledgement.
    pub fn get(&self) -> AckEntry {
        AckEntry { target: self.target.get(), target_epoch: self.target_epoch.get(), through: self.through.get() }
    }
}

/// Who sends a frame: the header's cluster, member and epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Cluster id.
    pub cluster_id: u16,
    /// Member id of the sender.
    pub member_id: u16,
    /// The sender's epoch (non-zero).
    pub epoch: u32,
}

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Opcode.
    pub opcode: SyncOpcode,
    /// Flags.
    pub flags: FrameFlags,
    /// Cluster id.
    pub cluster_id: u16,
    /// Member id of the sender.
    pub sender: u16,
    /// Sender's epoch (non-zero).
    pub epoch: u32,
    /// Sequence field (meaning by opcode; module docs).
    pub seq: u64,
    /// Payload elements.
    pub count: u16,
}

/// The checked payload of a frame, borrowing the parsed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body<'a> {
    /// Validated records; record `i` has number `header.seq + i`.
    Delta(&'a [DeltaRecord]),
    /// Retransmission requests.
    Nack(&'a [RangeBody]),
    /// Acknowledgements.
    Ack(&'a [AckBody]),
    /// Heartbeat; `header.seq` is the sender's next number.
    Alive,
    /// Epoch start; `header.seq` is the sender's next number.
    Hello {
        /// First number of the epoch.
        first_seq: u64,
    },
    /// Unrecoverable ranges.
    Lost(&'a [RangeBody]),
}

/// A frame that passed every check of [`Frame::parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameView<'a> {
    /// The header.
    pub header: Header,
    /// The payload.
    pub body: Body<'a>,
}

impl<'a> FrameView<'a> {
    /// The updates of a DELTA frame with their sequence numbers (empty for
    /// other opcodes).
    pub fn updates(&self) -> impl Iterator<Item = (u64, DeltaUpdate)> + 'a {
        let (first, recs): (u64, &'a [DeltaRecord]) = match self.body {
            Body::Delta(r) => (self.header.seq, r),
            _ => (0, &[]),
        };
        recs.iter().enumerate().map(move |(i, r)| {
            // Validated by `parse`: the op byte is known.
            let op = if r.op == DeltaOp::Delete as u8 { DeltaOp::Delete } else { DeltaOp::Upsert };
            (first + i as u64, r.update_with_op(op))
        })
    }

    /// The ranges of a NACK or LOST frame (empty for other opcodes).
    pub fn ranges(&self) -> impl Iterator<Item = SeqRange> + 'a {
        let r: &'a [RangeBody] = match self.body {
            Body::Nack(r) | Body::Lost(r) => r,
            _ => &[],
        };
        r.iter().map(RangeBody::get)
    }

    /// The entries of an ACK frame (empty for other opcodes).
    pub fn acks(&self) -> impl Iterator<Item = AckEntry> + 'a {
        let r: &'a [AckBody] = match self.body {
            Body::Ack(r) => r,
            _ => &[],
        };
        r.iter().map(AckBody::get)
    }

    /// One past the highest number this frame shows the sender has
    /// assigned: DELTA `seq + count`, ALIVE and HELLO `seq`; None otherwise.
    pub fn next_seq(&self) -> Option<u64> {
        match self.body {
            Body::Delta(r) => Some(self.header.seq + r.len() as u64),
            Body::Alive | Body::Hello { .. } => Some(self.header.seq),
            _ => None,
        }
    }
}

/// Why a frame was refused by [`Frame::parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header, or than the header's `payload_len` says.
    Truncated {
        /// Bytes the frame needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
    /// More bytes than header plus `payload_len`.
    TrailingBytes {
        /// Bytes too many.
        extra: usize,
    },
    /// Not a sync frame.
    BadMagic(u32),
    /// Unsupported format version.
    BadVersion(u8),
    /// `payload_len` above [`MAX_PAYLOAD`].
    PayloadTooLarge(usize),
    /// The checksum does not match.
    BadChecksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// Unknown opcode byte.
    BadOpcode(u8),
    /// Undefined flag bits, or a flag the opcode does not take.
    BadFlags(u16),
    /// The header's epoch is 0.
    ZeroEpoch,
    /// `payload_len` is not `count ×` the opcode's element size.
    CountMismatch {
        /// Header count.
        count: u16,
        /// Header payload length.
        payload_len: u16,
    },
    /// Count outside the opcode's bounds.
    BadCount {
        /// Opcode.
        opcode: SyncOpcode,
        /// Header count.
        count: u16,
    },
    /// Sequence field breaks the opcode's rule (0 where a number is needed,
    /// non-zero where none is, or records that would pass `u64::MAX`).
    BadSeq(u64),
    /// A reserved body field is not zero.
    ReservedNonZero,
    /// A NACK/LOST range is empty or misuses epoch 0, an ACK names epoch 0,
    /// or a HELLO's first number is 0 or after its next number.
    BadRange {
        /// Index of the element.
        index: u16,
    },
    /// A delta record is malformed.
    BadRecord {
        /// Index of the record in the frame.
        index: u16,
        /// What is wrong.
        fault: RecordFault,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Truncated { need, have } => write!(f, "frame truncated: {have} of {need} bytes"),
            FrameError::TrailingBytes { extra } => write!(f, "{extra} bytes after the payload"),
            FrameError::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            FrameError::BadVersion(v) => write!(f, "unsupported sync version {v}"),
            FrameError::PayloadTooLarge(n) => write!(f, "payload of {n} bytes exceeds {MAX_PAYLOAD}"),
            FrameError::BadChecksum { stored, computed } => {
                write!(f, "checksum {stored:#010x} does not match {computed:#010x}")
            }
            FrameError::BadOpcode(b) => write!(f, "unknown sync opcode {b:#04x}"),
            FrameError::BadFlags(b) => write!(f, "invalid frame flags {b:#06x}"),
            FrameError::ZeroEpoch => f.write_str("epoch 0"),
            FrameError::CountMismatch { count, payload_len } => {
                write!(f, "{count} elements do not make {payload_len} payload bytes")
            }
            FrameError::BadCount { opcode, count } => write!(f, "{} frame with {count} elements", opcode.name()),
            FrameError::BadSeq(s) => write!(f, "invalid sequence field {s}"),
            FrameError::ReservedNonZero => f.write_str("reserved field is not zero"),
            FrameError::BadRange { index } => write!(f, "element {index}: invalid range"),
            FrameError::BadRecord { index, fault } => write!(f, "record {index}: {fault}"),
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The caller's buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The DELTA frame holds [`MAX_RECORDS`] records (or the buffer is full).
    Full,
    /// A DELTA frame without records.
    Empty,
    /// The origin's epoch is 0.
    ZeroEpoch,
    /// A sequence number breaks the opcode's rule.
    BadSeq(u64),
    /// More elements than one frame holds, or none.
    BadCount(usize),
    /// An element breaks the wire rules (see [`FrameError::BadRange`]).
    BadRange {
        /// Index of the element.
        index: usize,
    },
    /// A record is malformed.
    Record(RecordFault),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall { need, have } => write!(f, "buffer of {have} bytes, {need} needed"),
            EncodeError::Full => f.write_str("frame full"),
            EncodeError::Empty => f.write_str("DELTA frame without records"),
            EncodeError::ZeroEpoch => f.write_str("epoch 0"),
            EncodeError::BadSeq(s) => write!(f, "invalid sequence number {s}"),
            EncodeError::BadCount(n) => write!(f, "{n} elements do not fit one frame"),
            EncodeError::BadRange { index } => write!(f, "element {index}: invalid range"),
            EncodeError::Record(e) => write!(f, "record: {e}"),
        }
    }
}

/// CRC-32C's polynomial, reflected.
#[cfg(any(test, not(feature = "hw-crc")))]
const CRC32C_POLY: u32 = 0x82F6_3B78;
/// Slicing-by-8 tables: `CRC32C_TABLES[k][b]` is the CRC of byte `b`
/// followed by `k` zero bytes, so eight input bytes fold in one step (as an
/// FPGA folds a 64-bit word per clock).
#[cfg(any(test, not(feature = "hw-crc")))]
const CRC32C_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ CRC32C_POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// Folds `bytes` into the CRC-32C register `crc` (not inverted): through
/// the CPU's CRC instructions with the `hw-crc` feature, else by table.
#[inline]
fn crc32c_update(crc: u32, bytes: &[u8]) -> u32 {
    #[cfg(feature = "hw-crc")]
    {
        // The crate takes and returns the finished (inverted) value.
        !crc32c::crc32c_append(!crc, bytes)
    }
    #[cfg(not(feature = "hw-crc"))]
    {
        crc32c_update_portable(crc, bytes)
    }
}

/// The portable definition of [`crc32c_update`], one 64-bit word per step.
#[cfg(any(test, not(feature = "hw-crc")))]
fn crc32c_update_portable(mut crc: u32, bytes: &[u8]) -> u32 {
    let t = &CRC32C_TABLES;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let lo = crc ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        crc = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][w[4] as usize]
            ^ t[2][w[5] as usize]
            ^ t[1][w[6] as usize]
            ^ t[0][w[7] as usize];
    }
    for &b in words.remainder() {
        crc = t[0][((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32C (Castagnoli) of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    !crc32c_update(!0, bytes)
}

/// The frame checksum: CRC-32C of `frame` with the 4 bytes at
/// [`CHECKSUM_OFFSET`] taken as zero.
pub fn checksum(frame: &[u8]) -> u32 {
    let split = frame.len().min(CHECKSUM_OFFSET);
    let (head, rest) = frame.split_at(split);
    let mut crc = crc32c_update(!0, head);
    let field = rest.len().min(4);
    crc = crc32c_update(crc, &[0u8; 4][..field]);
    crc = crc32c_update(crc, rest.get(field..).unwrap_or(&[]));
    !crc
}

/// Parsing and encoding of sync frames.
#[derive(Clone, Copy, Debug)]
pub struct Frame;

impl Frame {
    /// Checks a received frame completely and returns a view of it.
    ///
    /// Order of checks: length of the header, magic, version, payload
    /// length (too large, truncated, trailing bytes), checksum, opcode,
    /// flags, epoch, count against length, count bounds, sequence field,
    /// then every payload element. The first fault is returned.
    pub fn parse(buf: &[u8]) -> Result<FrameView<'_>, FrameError> {
        let (hdr, payload) = SyncHeader::ref_from_prefix(buf)
            .map_err(|_| FrameError::Truncated { need: HEADER_SIZE, have: buf.len() })?;
        if hdr.magic.get() != SYNC_MAGIC {
            return Err(FrameError::BadMagic(hdr.magic.get()));
        }
        if hdr.version != SYNC_VERSION {
            return Err(FrameError::BadVersion(hdr.version));
        }
        let plen = hdr.payload_len.get() as usize;
        if plen > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge(plen));
        }
        if payload.len() < plen {
            return Err(FrameError::Truncated { need: HEADER_SIZE + plen, have: buf.len() });
        }
        if payload.len() > plen {
            return Err(FrameError::TrailingBytes { extra: payload.len() - plen });
        }
        let computed = checksum(buf);
        if computed != hdr.checksum.get() {
            return Err(FrameError::BadChecksum { stored: hdr.checksum.get(), computed });
        }
        let opcode = SyncOpcode::from_wire(hdr.opcode).ok_or(FrameError::BadOpcode(hdr.opcode))?;
        let flags = FrameFlags::from_bits(hdr.flags.get()).ok_or(FrameError::BadFlags(hdr.flags.get()))?;
        if !opcode.allowed_flags().contains(flags) {
            return Err(FrameError::BadFlags(hdr.flags.get()));
        }
        let epoch = hdr.epoch.get();
        if epoch == 0 {
            return Err(FrameError::ZeroEpoch);
        }
        let count = hdr.count.get();
        if count as usize * opcode.element_size() != plen {
            return Err(FrameError::CountMismatch { count, payload_len: hdr.payload_len.get() });
        }
        let (lo, hi) = opcode.count_bounds();
        if (count as usize) < lo || count as usize > hi {
            return Err(FrameError::BadCount { opcode, count });
        }
        let seq = hdr.seq.get();
        let seq_ok = match opcode {
            SyncOpcode::Delta => seq != 0 && seq.checked_add(count as u64).is_some(),
            SyncOpcode::Alive | SyncOpcode::Hello => seq != 0,
            SyncOpcode::Nack | SyncOpcode::Ack | SyncOpcode::Lost => seq == 0,
        };
        if !seq_ok {
            return Err(FrameError::BadSeq(seq));
        }
        let mismatch = || FrameError::CountMismatch { count, payload_len: hdr.payload_len.get() };
        let body = match opcode {
            SyncOpcode::Delta => {
                let recs = <[DeltaRecord]>::ref_from_bytes(payload).map_err(|_| mismatch())?;
                for (i, r) in recs.iter().enumerate() {
                    r.validate().map_err(|fault| FrameError::BadRecord { index: i as u16, fault })?;
                }
                Body::Delta(recs)
            }
            SyncOpcode::Nack | SyncOpcode::Lost => {
                let ranges = <[RangeBody]>::ref_from_bytes(payload).map_err(|_| mismatch())?;
                let nack = opcode == SyncOpcode::Nack;
                for (i, r) in ranges.iter().enumerate() {
                    if r.reserved.get() != 0 {
                        return Err(FrameError::ReservedNonZero);
                    }
                    if !r.get().valid(nack) {
                        return Err(FrameError::BadRange { index: i as u16 });
                    }
                }
                if nack {
                    Body::Nack(ranges)
                } else {
                    Body::Lost(ranges)
                }
            }
            SyncOpcode::Ack => {
                let acks = <[AckBody]>::ref_from_bytes(payload).map_err(|_| mismatch())?;
                for (i, a) in acks.iter().enumerate() {
                    if a.reserved.get() != 0 {
                        return Err(FrameError::ReservedNonZero);
                    }
                    if a.target_epoch.get() == 0 {
                        return Err(FrameError::BadRange { index: i as u16 });
                    }
                }
                Body::Ack(acks)
            }
            SyncOpcode::Alive => Body::Alive,
            SyncOpcode::Hello => {
                let h = HelloBody::read_from_bytes(payload).map_err(|_| mismatch())?;
                let first_seq = h.first_seq.get();
                if first_seq == 0 || first_seq > seq {
                    return Err(FrameError::BadRange { index: 0 });
                }
                Body::Hello { first_seq }
            }
        };
        Ok(FrameView {
            header: Header {
                opcode,
                flags,
                cluster_id: hdr.cluster_id.get(),
                sender: hdr.sender.get(),
                epoch,
                seq,
                count,
            },
            body,
        })
    }

    /// Encodes an ALIVE frame; `next_seq` is the next number the sender
    /// will assign. Returns the frame length.
    pub fn encode_alive(buf: &mut [u8], origin: &Origin, next_seq: u64) -> Result<usize, EncodeError> {
        if next_seq == 0 {
            return Err(EncodeError::BadSeq(next_seq));
        }
        seal(buf, origin, SyncOpcode::Alive, FrameFlags::empty(), next_seq, 0, 0)
    }

    /// Encodes a HELLO frame for an epoch starting at `first_seq` whose next
    /// number is `next_seq`.
    pub fn encode_hello(buf: &mut [u8], origin: &Origin, first_seq: u64, next_seq: u64) -> Result<usize, EncodeError> {
        if next_seq == 0 {
            return Err(EncodeError::BadSeq(next_seq));
        }
        if first_seq == 0 || first_seq > next_seq {
            return Err(EncodeError::BadRange { index: 0 });
        }
        let body = HelloBody { first_seq: first_seq.into() };
        put(buf, HEADER_SIZE, body.as_bytes())?;
        seal(buf, origin, SyncOpcode::Hello, FrameFlags::empty(), next_seq, 1, HELLO_SIZE)
    }

    /// Encodes a NACK frame (retransmission requests or HELLO requests).
    pub fn encode_nack(buf: &mut [u8], origin: &Origin, ranges: &[SeqRange]) -> Result<usize, EncodeError> {
        encode_ranges(buf, origin, SyncOpcode::Nack, ranges)
    }

    /// Encodes a LOST frame.
    pub fn encode_lost(buf: &mut [u8], origin: &Origin, ranges: &[SeqRange]) -> Result<usize, EncodeError> {
        encode_ranges(buf, origin, SyncOpcode::Lost, ranges)
    }

    /// Encodes an ACK frame.
    pub fn encode_ack(buf: &mut [u8], origin: &Origin, acks: &[AckEntry]) -> Result<usize, EncodeError> {
        if acks.is_empty() || acks.len() > MAX_ACKS {
            return Err(EncodeError::BadCount(acks.len()));
        }
        for (i, a) in acks.iter().enumerate() {
            if a.target_epoch == 0 {
                return Err(EncodeError::BadRange { index: i });
            }
            put(buf, HEADER_SIZE + i * ACK_SIZE, a.to_wire().as_bytes())?;
        }
        seal(buf, origin, SyncOpcode::Ack, FrameFlags::empty(), 0, acks.len(), acks.len() * ACK_SIZE)
    }
}

fn encode_ranges(buf: &mut [u8], origin: &Origin, op: SyncOpcode, ranges: &[SeqRange]) -> Result<usize, EncodeError> {
    if ranges.is_empty() || ranges.len() > MAX_RANGES {
        return Err(EncodeError::BadCount(ranges.len()));
    }
    for (i, r) in ranges.iter().enumerate() {
        if !r.valid(op == SyncOpcode::Nack) {
            return Err(EncodeError::BadRange { index: i });
        }
        put(buf, HEADER_SIZE + i * RANGE_SIZE, r.to_wire().as_bytes())?;
    }
    seal(buf, origin, op, FrameFlags::empty(), 0, ranges.len(), ranges.len() * RANGE_SIZE)
}

/// Copies `bytes` into `buf` at `at`, or reports the size needed.
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), EncodeError> {
    let need = at + bytes.len();
    let have = buf.len();
    buf.get_mut(at..need).ok_or(EncodeError::BufferTooSmall { need, have })?.copy_from_slice(bytes);
    Ok(())
}

/// Writes the header of a frame whose payload is already in place, then
/// the checksum. Returns the frame length.
fn seal(
    buf: &mut [u8],
    origin: &Origin,
    op: SyncOpcode,
    flags: FrameFlags,
    seq: u64,
    count: usize,
    payload_len: usize,
) -> Result<usize, EncodeError> {
    if origin.epoch == 0 {
        return Err(EncodeError::ZeroEpoch);
    }
    let len = HEADER_SIZE + payload_len;
    if buf.len() < len {
        return Err(EncodeError::BufferTooSmall { need: len, have: buf.len() });
    }
    let hdr = SyncHeader {
        magic: SYNC_MAGIC.into(),
        version: SYNC_VERSION,
        opcode: op as u8,
        flags: flags.bits().into(),
        cluster_id: origin.cluster_id.into(),
        sender: origin.member_id.into(),
        epoch: origin.epoch.into(),
        seq: seq.into(),
        count: (count as u16).into(),
        payload_len: (payload_len as u16).into(),
        checksum: 0.into(),
    };
    put(buf, 0, hdr.as_bytes())?;
    let frame = buf.get_mut(..len).ok_or(EncodeError::BufferTooSmall { need: len, have: 0 })?;
    let crc = checksum(frame);
    put(frame, CHECKSUM_OFFSET, &crc.to_le_bytes())?;
    Ok(len)
}

/// Builds a DELTA frame in a caller's buffer, record by record.
///
/// ```
/// # use nicsync_fwif::sync::*;
/// # use nicsync_fwif::conn::*;
/// # use core::net::Ipv4Addr;
/// let origin = Origin { cluster_id: 1, member_id: 2, epoch: 0xABCD };
/// let key = ConnKey::v4(Ipv4Addr::new(10, 0, 0, 1), 1234, Ipv4Addr::new(10, 0, 0, 2), 80, proto::TCP, 0);
/// let up = DeltaUpdate::upsert(2, key, ConnState::default(), Nat::default());
/// let mut buf = [0u8; MAX_FRAME];
/// let mut w = DeltaWriter::new(&mut buf, origin, 100, false).unwrap();
/// assert_eq!(w.push(&up).unwrap(), 100);
/// let len = w.finish().unwrap();
/// let view = Frame::parse(&buf[..len]).unwrap();
/// assert_eq!(view.updates().next(), Some((100, up)));
/// ```
#[derive(Debug)]
pub struct DeltaWriter<'a> {
    buf: &'a mut [u8],
    origin: Origin,
    first_seq: u64,
    flags: FrameFlags,
    count: usize,
    limit: usize,
}

impl<'a> DeltaWriter<'a> {
    /// Starts a frame whose first record gets number `first_seq`;
    /// `retransmit` sets [`FrameFlags::RETRANSMIT`].
    pub fn new(buf: &'a mut [u8], origin: Origin, first_seq: u64, retransmit: bool) -> Result<Self, EncodeError> {
        if origin.epoch == 0 {
            return Err(EncodeError::ZeroEpoch);
        }
        if first_seq == 0 || first_seq.checked_add(MAX_RECORDS as u64).is_none() {
            return Err(EncodeError::BadSeq(first_seq));
        }
        let need = HEADER_SIZE + RECORD_SIZE;
        if buf.len() < need {
            return Err(EncodeError::BufferTooSmall { need, have: buf.len() });
        }
        let limit = ((buf.len() - HEADER_SIZE) / RECORD_SIZE).min(MAX_RECORDS);
        let flags = if retransmit { FrameFlags::RETRANSMIT } else { FrameFlags::empty() };
        Ok(DeltaWriter { buf, origin, first_seq, flags, count: 0, limit })
    }

    /// Appends a record after validating it; returns its sequence number.
    pub fn push_record(&mut self, rec: &DeltaRecord) -> Result<u64, EncodeError> {
        if self.count >= self.limit {
            return Err(EncodeError::Full);
        }
        rec.validate().map_err(EncodeError::Record)?;
        put(self.buf, HEADER_SIZE + self.count * RECORD_SIZE, rec.as_bytes())?;
        self.count += 1;
        Ok(self.first_seq + self.count as u64 - 1)
    }

    /// Appends an update; returns its sequence number.
    pub fn push(&mut self, update: &DeltaUpdate) -> Result<u64, EncodeError> {
        self.push_record(&update.to_record())
    }

    /// Records written so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no record was written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether another record fits.
    pub fn is_full(&self) -> bool {
        self.count >= self.limit
    }

    /// Writes the header and checksum; returns the frame length.
    pub fn finish(self) -> Result<usize, EncodeError> {
        if self.count == 0 {
            return Err(EncodeError::Empty);
        }
        seal(
            self.buf,
            &self.origin,
            SyncOpcode::Delta,
            self.flags,
            self.first_seq,
            self.count,
            self.count * RECORD_SIZE,
        )
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::conn::{proto, ConnFlags, Direction, NatKind, TcpState};
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::vec::Vec;

    const O: Origin = Origin { cluster_id: 7, member_id: 3, epoch: 0xDEAD_BEEF };

    fn key(i: u32) -> ConnKey {
        ConnKey::v4(Ipv4Addr::from(0x0a00_0000 | i), 1000 + i as u16, Ipv4Addr::new(192, 0, 2, 1), 443, proto::TCP, 0)
    }

    fn update(i: u32) -> DeltaUpdate {
        let mut st = ConnState::new(TcpState::Established, Direction::Reply, ConnFlags::SYNC, 300, i);
        st.generation = i.into();
        match i % 3 {
            0 => DeltaUpdate::upsert(3, key(i), st, Nat::default()),
            1 => {
                DeltaUpdate::upsert(3, key(i), st, Nat::new(NatKind::Source, IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)), 9))
            }
            _ => DeltaUpdate::delete(3, key(i), st),
        }
    }

    fn delta(n: u32, first: u64) -> Vec<u8> {
        let mut buf = [0u8; MAX_FRAME];
        let mut w = DeltaWriter::new(&mut buf, O, first, false).expect("writer");
        for i in 0..n {
            w.push(&update(i)).expect("push");
        }
        let len = w.finish().expect("finish");
        buf[..len].to_vec()
    }

    /// Recomputes the checksum after a test edited a frame.
    fn reseal(f: &mut [u8]) {
        let crc = checksum(f);
        f[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }

    fn set_u16(f: &mut [u8], off: usize, v: u16) {
        f[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn control_frames() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; MAX_FRAME];
        let n = Frame::encode_alive(&mut buf, &O, 42).expect("alive");
        out.push(buf[..n].to_vec());
        let n = Frame::encode_hello(&mut buf, &O, 1, 42).expect("hello");
        out.push(buf[..n].to_vec());
        let r = [SeqRange { target: 1, target_epoch: 5, from: 3, to: 9 }, SeqRange::hello_request(2)];
        let n = Frame::encode_nack(&mut buf, &O, &r).expect("nack");
        out.push(buf[..n].to_vec());
        let n = Frame::encode_lost(&mut buf, &O, &r[..1]).expect("lost");
        out.push(buf[..n].to_vec());
        let n = Frame::encode_ack(&mut buf, &O, &[AckEntry { target: 1, target_epoch: 5, through: 0 }]).expect("ack");
        out.push(buf[..n].to_vec());
        out
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Both CRC back ends (the CPU's instructions with `hw-crc`, the tables
    /// without) against a bit-at-a-time CRC-32C, over lengths and offsets
    /// that cover every tail and alignment, and from several registers.
    #[test]
    fn crc32c_back_ends_agree_with_the_bitwise_definition() {
        fn bitwise(mut crc: u32, bytes: &[u8]) -> u32 {
            for &b in bytes {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 != 0 { (crc >> 1) ^ CRC32C_POLY } else { crc >> 1 };
                }
            }
            crc
        }
        let mut data = [0u8; 300];
        let mut x = 0x9E37_79B9u32;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for start in [0u32, !0, 0x1234_5678] {
            for off in 0..9 {
                for len in (0..40).chain([63, 64, 65, 127, 128, 255, 290]) {
                    let bytes = &data[off..off + len];
                    let want = bitwise(start, bytes);
                    assert_eq!(crc32c_update(start, bytes), want, "start {start:#x} off {off} len {len}");
                    assert_eq!(crc32c_update_portable(start, bytes), want, "portable: off {off} len {len}");
                }
            }
        }
    }

    #[test]
    fn magic_spells_nsyn() {
        assert_eq!(&SYNC_MAGIC.to_le_bytes(), b"NSYN");
    }

    #[test]
    fn delta_roundtrip_full_frame() {
        let f = delta(MAX_RECORDS as u32, 1000);
        assert_eq!(f.len(), MAX_DELTA_FRAME);
        let v = Frame::parse(&f).expect("parse");
        assert_eq!(v.header.opcode, SyncOpcode::Delta);
        assert_eq!(v.header.cluster_id, 7);
        assert_eq!(v.header.sender, 3);
        assert_eq!(v.header.epoch, 0xDEAD_BEEF);
        assert_eq!(v.header.seq, 1000);
        assert_eq!(v.next_seq(), Some(1016));
        let ups: Vec<_> = v.updates().collect();
        assert_eq!(ups.len(), MAX_RECORDS);
        for (i, (seq, u)) in ups.iter().enumerate() {
            assert_eq!(*seq, 1000 + i as u64);
            assert_eq!(*u, update(i as u32));
        }
    }

    #[test]
    fn ipv6_record_roundtrip() {
        let k = ConnKey::v6(Ipv6Addr::LOCALHOST, 1, Ipv6Addr::UNSPECIFIED, 2, proto::UDP, 9);
        let nat = Nat::new(NatKind::Destination, IpAddr::V6(Ipv6Addr::LOCALHOST), 80);
        let u = DeltaUpdate::upsert(65535, k, ConnState::default(), nat);
        let mut buf = [0u8; MAX_FRAME];
        let mut w = DeltaWriter::new(&mut buf, O, u64::MAX - 16, true).expect("writer");
        w.push(&u).expect("push");
        let n = w.finish().expect("finish");
        let v = Frame::parse(&buf[..n]).expect("parse");
        assert_eq!(v.header.flags, FrameFlags::RETRANSMIT);
        assert_eq!(v.updates().next(), Some((u64::MAX - 16, u)));
    }

    #[test]
    fn control_roundtrip() {
        let fs = control_frames();
        let v = Frame::parse(&fs[0]).expect("alive");
        assert_eq!((v.body, v.next_seq()), (Body::Alive, Some(42)));
        let v = Frame::parse(&fs[1]).expect("hello");
        assert_eq!((v.body, v.next_seq()), (Body::Hello { first_seq: 1 }, Some(42)));
        let v = Frame::parse(&fs[2]).expect("nack");
        let r: Vec<_> = v.ranges().collect();
        assert_eq!(r, [SeqRange { target: 1, target_epoch: 5, from: 3, to: 9 }, SeqRange::hello_request(2)]);
        assert_eq!(r[0].len(), 7);
        assert!(r[1].is_hello_request() && r[1].is_empty());
        let v = Frame::parse(&fs[3]).expect("lost");
        assert_eq!(v.header.opcode, SyncOpcode::Lost);
        assert_eq!(v.ranges().count(), 1);
        let v = Frame::parse(&fs[4]).expect("ack");
        assert_eq!(v.acks().collect::<Vec<_>>(), [AckEntry { target: 1, target_epoch: 5, through: 0 }]);
        assert_eq!(v.updates().count(), 0);
    }

    #[test]
    fn truncation_at_every_byte_is_refused() {
        let mut frames = control_frames();
        frames.push(delta(MAX_RECORDS as u32, 1));
        frames.push(delta(1, 1));
        for f in &frames {
            for cut in 0..f.len() {
                match Frame::parse(&f[..cut]) {
                    Err(FrameError::Truncated { have, .. }) => assert_eq!(have, cut),
                    other => panic!("cut at {cut} of {}: {other:?}", f.len()),
                }
            }
            assert!(Frame::parse(f).is_ok());
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut f = delta(2, 1);
        f.push(0);
        assert_eq!(Frame::parse(&f), Err(FrameError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn bad_magic_and_version() {
        let mut f = delta(1, 1);
        f[0] ^= 0xFF;
        assert!(matches!(Frame::parse(&f), Err(FrameError::BadMagic(_))));
        let mut f = delta(1, 1);
        // Version 1 (before the seal made room for itself) and a future one.
        for v in [1, SYNC_VERSION + 1] {
            f[4] = v;
            reseal(&mut f);
            assert_eq!(Frame::parse(&f), Err(FrameError::BadVersion(v)));
        }
    }

    #[test]
    fn every_unknown_opcode_is_refused() {
        for b in 0..=255u8 {
            let mut f = control_frames().remove(0);
            f[5] = b;
            reseal(&mut f);
            match SyncOpcode::from_wire(b) {
                Some(SyncOpcode::Alive) => assert!(Frame::parse(&f).is_ok()),
                Some(_) => assert!(Frame::parse(&f).is_err(), "ALIVE bytes as {b}"),
                None => assert_eq!(Frame::parse(&f), Err(FrameError::BadOpcode(b))),
            }
        }
    }

    #[test]
    fn flags_are_checked_per_opcode() {
        let mut f = delta(1, 1);
        set_u16(&mut f, 6, 0x8000);
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadFlags(0x8000)));
        let mut f = control_frames().remove(0);
        set_u16(&mut f, 6, FrameFlags::RETRANSMIT.bits());
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadFlags(1)));
    }

    #[test]
    fn count_and_length_must_agree() {
        // count says 3, payload holds 2 records.
        let mut f = delta(2, 1);
        set_u16(&mut f, 24, 3);
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::CountMismatch { count: 3, payload_len: 176 }));
        // payload length not a multiple of the record size.
        let mut f = delta(2, 1);
        f.pop();
        set_u16(&mut f, 26, 175);
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::CountMismatch { count: 2, payload_len: 175 }));
        // empty DELTA.
        let mut f = delta(1, 1);
        f.truncate(HEADER_SIZE);
        set_u16(&mut f, 24, 0);
        set_u16(&mut f, 26, 0);
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadCount { opcode: SyncOpcode::Delta, count: 0 }));
        // ALIVE with a payload.
        let mut f = control_frames().remove(0);
        f.extend_from_slice(&[0; 8]);
        set_u16(&mut f, 26, 8);
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::CountMismatch { count: 0, payload_len: 8 }));
        // payload length over the maximum.
        let mut f = delta(1, 1);
        set_u16(&mut f, 26, MAX_PAYLOAD as u16 + 1);
        assert_eq!(Frame::parse(&f), Err(FrameError::PayloadTooLarge(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn seventeen_records_are_refused() {
        // Hand-build a 17-record frame (the writer refuses to).
        let mut f = delta(16, 1);
        let rec = f[HEADER_SIZE..HEADER_SIZE + RECORD_SIZE].to_vec();
        f.extend_from_slice(&rec);
        set_u16(&mut f, 24, 17);
        set_u16(&mut f, 26, (17 * RECORD_SIZE) as u16);
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::PayloadTooLarge(17 * RECORD_SIZE)));
        let mut buf = [0u8; 2 * MAX_DELTA_FRAME];
        let mut w = DeltaWriter::new(&mut buf, O, 1, false).expect("writer");
        for i in 0..16 {
            w.push(&update(i)).expect("push");
        }
        assert!(w.is_full());
        assert_eq!(w.push(&update(0)), Err(EncodeError::Full));
    }

    #[test]
    fn checksum_catches_every_single_bit_flip() {
        let f = delta(3, 9);
        for bit in 0..f.len() * 8 {
            let mut g = f.clone();
            g[bit / 8] ^= 1 << (bit % 8);
            assert!(Frame::parse(&g).is_err(), "flip of bit {bit} accepted");
        }
        let mut g = f.clone();
        g[HEADER_SIZE + 50] ^= 4;
        assert!(matches!(Frame::parse(&g), Err(FrameError::BadChecksum { .. })));
    }

    #[test]
    fn sequence_rules() {
        let mut f = delta(1, 1);
        f[16..24].copy_from_slice(&0u64.to_le_bytes());
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadSeq(0)));
        let mut f = delta(2, 1);
        f[16..24].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadSeq(u64::MAX - 1)));
        let mut f = control_frames().remove(2);
        f[16] = 1;
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadSeq(1)));
        let mut buf = [0u8; 64];
        assert_eq!(Frame::encode_alive(&mut buf, &O, 0), Err(EncodeError::BadSeq(0)));
        assert_eq!(Frame::encode_hello(&mut buf, &O, 5, 4), Err(EncodeError::BadRange { index: 0 }));
        assert_eq!(Frame::encode_hello(&mut buf, &O, 0, 4), Err(EncodeError::BadRange { index: 0 }));
        // HELLO whose first number is past its next one.
        let mut f = control_frames().remove(1);
        f[HEADER_SIZE..HEADER_SIZE + 8].copy_from_slice(&43u64.to_le_bytes());
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadRange { index: 0 }));
    }

    #[test]
    fn zero_epoch_is_refused() {
        let mut f = delta(1, 1);
        f[12..16].copy_from_slice(&[0; 4]);
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::ZeroEpoch));
        let mut buf = [0u8; 64];
        let o = Origin { epoch: 0, ..O };
        assert_eq!(Frame::encode_alive(&mut buf, &o, 1), Err(EncodeError::ZeroEpoch));
    }

    #[test]
    fn ranges_are_checked() {
        let mut buf = [0u8; MAX_FRAME];
        let bad = [SeqRange { target: 1, target_epoch: 5, from: 9, to: 3 }];
        assert_eq!(Frame::encode_nack(&mut buf, &O, &bad), Err(EncodeError::BadRange { index: 0 }));
        let zero = [SeqRange { target: 1, target_epoch: 5, from: 0, to: 3 }];
        assert_eq!(Frame::encode_nack(&mut buf, &O, &zero), Err(EncodeError::BadRange { index: 0 }));
        // A HELLO request is a NACK form only.
        let hr = [SeqRange::hello_request(1)];
        assert_eq!(Frame::encode_lost(&mut buf, &O, &hr), Err(EncodeError::BadRange { index: 0 }));
        assert_eq!(Frame::encode_nack(&mut buf, &O, &[]), Err(EncodeError::BadCount(0)));
        let many = [SeqRange { target: 1, target_epoch: 5, from: 1, to: 1 }; MAX_RANGES + 1];
        assert_eq!(Frame::encode_nack(&mut buf, &O, &many), Err(EncodeError::BadCount(MAX_RANGES + 1)));
        let n = Frame::encode_nack(&mut buf, &O, &many[..MAX_RANGES]).expect("MAX_RANGES ranges fit");
        assert!(n <= MAX_DATAGRAM);
        // Tampered on the wire: range reversed, reserved set.
        let mut f = buf[..n].to_vec();
        f[HEADER_SIZE + 8] = 2; // from = 2 > to = 1
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadRange { index: 0 }));
        let mut f = buf[..n].to_vec();
        f[HEADER_SIZE + RANGE_SIZE + 2] = 1;
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::ReservedNonZero));
        assert_eq!(
            Frame::encode_ack(&mut buf, &O, &[AckEntry { target: 1, target_epoch: 0, through: 1 }]),
            Err(EncodeError::BadRange { index: 0 })
        );
    }

    #[test]
    fn bad_records_are_refused_with_their_index() {
        let base = delta(3, 1);
        let rec1 = HEADER_SIZE + RECORD_SIZE;
        let cases: [(usize, u8, RecordFault); 5] = [
            (0, 9, RecordFault::BadOp(9)),
            (1, 1, RecordFault::ReservedNonZero),
            (5, 1, RecordFault::ReservedNonZero),
            (8 + 37, 5, RecordFault::Key(KeyError::BadFamily(5))),
            (48, 77, RecordFault::State(StateError::BadTcpState(77))),
        ];
        for (off, val, fault) in cases {
            let mut f = base.clone();
            f[rec1 + off] = val;
            reseal(&mut f);
            assert_eq!(Frame::parse(&f), Err(FrameError::BadRecord { index: 1, fault }), "offset {off}");
        }
        // Record 2 is a DELETE (update(2)); give it a NAT part.
        let mut f = base.clone();
        f[HEADER_SIZE + 2 * RECORD_SIZE + 64] = 1;
        reseal(&mut f);
        assert_eq!(Frame::parse(&f), Err(FrameError::BadRecord { index: 2, fault: RecordFault::DeleteWithNat }));
        // The writer refuses what the parser would.
        let mut bad = update(0).to_record();
        bad.op = 0;
        let mut buf = [0u8; MAX_FRAME];
        let mut w = DeltaWriter::new(&mut buf, O, 1, false).expect("writer");
        assert_eq!(w.push_record(&bad), Err(EncodeError::Record(RecordFault::BadOp(0))));
        assert!(w.is_empty());
        assert_eq!(w.finish(), Err(EncodeError::Empty));
    }

    #[test]
    fn small_buffers_are_reported() {
        let mut buf = [0u8; HEADER_SIZE + RECORD_SIZE - 1];
        assert!(matches!(DeltaWriter::new(&mut buf, O, 1, false), Err(EncodeError::BufferTooSmall { .. })));
        let mut buf = [0u8; HEADER_SIZE + RECORD_SIZE * 2];
        let mut w = DeltaWriter::new(&mut buf, O, 1, false).expect("writer");
        w.push(&update(1)).expect("1");
        w.push(&update(2)).expect("2");
        assert_eq!(w.push(&update(3)), Err(EncodeError::Full));
        assert_eq!(w.finish(), Ok(HEADER_SIZE + 2 * RECORD_SIZE));
        let mut buf = [0u8; HEADER_SIZE + 4];
        assert_eq!(
            Frame::encode_hello(&mut buf, &O, 1, 1),
            Err(EncodeError::BufferTooSmall { need: HEADER_SIZE + 8, have: HEADER_SIZE + 4 })
        );
        let mut buf = [0u8; HEADER_SIZE - 1];
        assert!(matches!(Frame::encode_alive(&mut buf, &O, 1), Err(EncodeError::BufferTooSmall { .. })));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: xorshift bytes of every length, and
        // valid frames with random bytes overwritten.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = [0u8; MAX_DATAGRAM + 8];
        for len in 0..buf.len() {
            for b in buf.iter_mut().take(len) {
                *b = next() as u8;
            }
            assert!(Frame::parse(&buf[..len]).is_err());
        }
        let f = delta(4, 1);
        for _ in 0..2000 {
            let mut g = f.clone();
            let at = next() as usize % g.len();
            g[at] = g[at].wrapping_add(1 + (next() % 255) as u8);
            assert!(Frame::parse(&g).is_err());
        }
    }
}
