//! The 64-byte command descriptor.
//!
//! Every descriptor starts with an 8-byte header (opcode, flags, tag, aux);
//! the 56-byte body is read through the view that the opcode selects, as
//! NVMe reads its command dwords. A command that needs more than one slot
//! (a connection with a NAT translation) sets [`DescFlags::CHAIN`] and
//! continues in the next ring slot with an [`Opcode::Ext`] descriptor; the
//! pair completes once, under the first descriptor's tag.

use bitflags::bitflags;
use core::fmt;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::assert_layout;
use crate::conn::{ConnKey, ConnState, KeyError, Nat, StateError};

/// Size of one command descriptor (one ring slot).
pub const DESC_SIZE: usize = 64;

/// Command opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Does nothing; completes with SUCCESS.
    Nop = 0x00,
    /// Adds a connection; EXISTS if the key is present, TABLE_FULL if there
    /// is no room.
    Insert = 0x01,
    /// Replaces a connection's state; NOT_FOUND if absent, STALE if the
    /// stored generation is newer.
    Update = 0x02,
    /// Removes a connection; NOT_FOUND if absent.
    Delete = 0x03,
    /// Writes the connection's [`crate::conn::ConnRecord`] to `resp_addr`.
    Lookup = 0x04,
    /// Writes records from slot position `cursor` on into a host buffer.
    Snapshot = 0x05,
    /// Removes every connection.
    Flush = 0x06,
    /// Inserts or replaces (generation rules as Update).
    Upsert = 0x07,
    /// Applies a host buffer of sync records as REPLICA writes, one status
    /// per record (ABI 1.6, capability `LOAD`).
    Load = 0x08,
    /// Writes the sync unit's stream positions: this member's next sequence
    /// number and, per peer followed, the next number expected, as
    /// [`SyncPosition`] entries (ABI 1.8, capability `SYNC_ALIGN`).
    SyncPositions = 0x09,
    /// Tells the sync unit where a Full Sync's snapshot was cut in each
    /// peer's stream ([`SyncPosition`] entries from the server's
    /// SYNC_POSITIONS; ABI 1.8, capability `SYNC_ALIGN`).
    SyncAlign = 0x0A,
    /// Continuation of the previous descriptor (never valid on its own).
    Ext = 0x7F,
}

impl Opcode {
    /// Decodes an opcode byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        Some(match b {
            0x00 => Opcode::Nop,
            0x01 => Opcode::Insert,
            0x02 => Opcode::Update,
            0x03 => Opcode::Delete,
            0x04 => Opcode::Lookup,
            0x05 => Opcode::Snapshot,
            0x06 => Opcode::Flush,
            0x07 => Opcode::Upsert,
            0x08 => Opcode::Load,
            0x09 => Opcode::SyncPositions,
            0x0A => Opcode::SyncAlign,
            0x7F => Opcode::Ext,
            _ => return None,
        })
    }

    /// Upper-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Opcode::Nop => "NOP",
            Opcode::Insert => "INSERT",
            Opcode::Update => "UPDATE",
            Opcode::Delete => "DELETE",
            Opcode::Lookup => "LOOKUP",
            Opcode::Snapshot => "SNAPSHOT",
            Opcode::Flush => "FLUSH",
            Opcode::Upsert => "UPSERT",
            Opcode::Load => "LOAD",
            Opcode::SyncPositions => "SYNC_POSITIONS",
            Opcode::SyncAlign => "SYNC_ALIGN",
            Opcode::Ext => "EXT",
        }
    }

    /// Every opcode.
    pub const ALL: [Opcode; 12] = [
        Opcode::Nop,
        Opcode::Insert,
        Opcode::Update,
        Opcode::Delete,
        Opcode::Lookup,
        Opcode::Snapshot,
        Opcode::Flush,
        Opcode::Upsert,
        Opcode::Load,
        Opcode::SyncPositions,
        Opcode::SyncAlign,
        Opcode::Ext,
    ];
}

bitflags! {
    /// Descriptor flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct DescFlags: u8 {
        /// The command continues in the next slot (an EXT descriptor).
        const CHAIN = 1 << 0;
        /// The device assigns the generation: stored + 1, or 1 if new.
        const AUTO_GENERATION = 1 << 1;
        /// Raise an interrupt for this completion regardless of coalescing.
        const IRQ_NOW = 1 << 2;
        /// UPSERT or DELETE (ABI 1.3): apply a copy of another member's
        /// change, as a Full Sync does (an entry, or a delete's tombstone
        /// whose generation is in the body's state). The chained EXT
        /// (required; NAT none for DELETE) names the owner member. The
        /// device applies it under the conflict rule, as if the owner's
        /// sync unit had sent it (STALE if the stored entry or a tombstone
        /// wins), does not send it to the peers and posts no event. Not
        /// with AUTO_GENERATION.
        const REPLICA = 1 << 3;
        /// SNAPSHOT only (ABI 1.3): write 88-byte sync records
        /// ([`crate::sync::DeltaRecord`], op UPSERT, with the owner) of the
        /// entries marked for sync, instead of 80-byte `ConnRecord`s of
        /// every entry.
        const SYNC_RECORDS = 1 << 4;
    }
}

/// The raw 64-byte descriptor.
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommandDescriptor {
    /// [`Opcode`] byte.
    pub opcode: u8,
    /// [`DescFlags`] bits.
    pub flags: u8,
    /// Host-chosen tag, echoed in the completion.
    pub tag: U16,
    /// Reserved for the opcode, zero today.
    pub aux: U32,
    /// Opcode-specific body.
    pub body: [u8; 56],
}
assert_layout!(CommandDescriptor, size = DESC_SIZE, opcode = 0, flags = 1, tag = 2, aux = 4, body = 8);

impl fmt::Debug for CommandDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandDescriptor")
            .field("opcode", &self.opcode)
            .field("flags", &self.flags)
            .field("tag", &self.tag.get())
            .finish_non_exhaustive()
    }
}

/// Body of INSERT, UPDATE, UPSERT and DELETE (state ignored by DELETE).
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnBody {
    /// Connection key.
    pub key: ConnKey,
    /// New state.
    pub state: ConnState,
}
assert_layout!(ConnBody, size = 56, key = 0, state = 40);

/// Body of LOOKUP.
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LookupBody {
    /// Connection key.
    pub key: ConnKey,
    /// IOVA of an 80-byte buffer for the [`crate::conn::ConnRecord`].
    pub resp_addr: U64,
    /// Reserved, zero.
    pub reserved: [u8; 8],
}
assert_layout!(LookupBody, size = 56, key = 0, resp_addr = 40, reserved = 48);

/// Body of SNAPSHOT.
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SnapshotBody {
    /// IOVA of the buffer that receives records.
    pub buf_addr: U64,
    /// Buffer length in bytes (a multiple of 80 is used).
    pub buf_len: U32,
    /// Slot position to start from (0 for the first chunk; then the
    /// completion's next cursor).
    pub cursor: U32,
    /// Reserved, zero.
    pub reserved: [u8; 40],
}
assert_layout!(SnapshotBody, size = 56, buf_addr = 0, buf_len = 8, cursor = 12, reserved = 16);

/// Body of LOAD (ABI 1.6).
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LoadBody {
    /// IOVA of `count` packed 88-byte sync records
    /// ([`crate::sync::DeltaRecord`], op UPSERT or DELETE, owner non-zero).
    pub buf_addr: U64,
    /// IOVA of `count` 8-byte [`LoadStatus`] entries the device writes.
    pub status_addr: U64,
    /// Records to apply, 1 to [`LOAD_MAX_RECORDS`].
    pub count: U32,
    /// Reserved, zero.
    pub reserved: [u8; 36],
}
assert_layout!(LoadBody, size = 56, buf_addr = 0, status_addr = 8, count = 16, reserved = 20);

/// Most records one LOAD applies (352 KiB of records, 32 KiB of statuses).
pub const LOAD_MAX_RECORDS: u32 = 4096;

/// What LOAD did with one record (8 bytes, written at `status_addr` in
/// record order).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LoadStatus {
    /// A [`crate::cpl::CplStatus`] byte: SUCCESS, STALE, TABLE_FULL or
    /// MALFORMED.
    pub status: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// SUCCESS: the generation stored (an UPSERT's) or recorded (a
    /// DELETE's tombstone); STALE: the generation of the version that won
    /// (the stored entry's or tombstone's); otherwise 0.
    pub result: U32,
}
assert_layout!(LoadStatus, size = 8, status = 0, reserved = 1, result = 4);

/// Body of SYNC_POSITIONS and SYNC_ALIGN (ABI 1.8).
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PositionsBody {
    /// IOVA of `entries` packed 16-byte [`SyncPosition`]s.
    pub buf_addr: U64,
    /// SYNC_POSITIONS: room for this many entries; SYNC_ALIGN: entries to
    /// read. 1 to [`MAX_POSITIONS`].
    pub entries: U32,
    /// Reserved, zero.
    pub reserved: [u8; 44],
}
assert_layout!(PositionsBody, size = 56, buf_addr = 0, entries = 8, reserved = 12);

/// Most entries one SYNC_POSITIONS or SYNC_ALIGN names: this member and 64
/// peers.
pub const MAX_POSITIONS: u32 = 65;

/// One member's position in a Delta Sync stream (16 bytes).
///
/// SYNC_POSITIONS writes this member's own stream first (`member` is this
/// member, `next_seq` the number its next update gets), then one entry per
/// peer whose epoch the unit follows (`next_seq`: every earlier number was
/// applied to the table; the first one lost, if any, else the next one
/// expected). While SYNC_HOLD is set, or held updates are still being
/// applied, or after a peer update was dropped from the hold or did not fit
/// the table, the peers' entries are left out (they are not all in the
/// table). SYNC_ALIGN reads such a list: for each peer's stream the joining
/// member's table now holds everything before `next_seq` (docs/abi.md,
/// "SYNC_POSITIONS and SYNC_ALIGN").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SyncPosition {
    /// Member whose stream this is.
    pub member: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// That member's epoch (non-zero).
    pub epoch: U32,
    /// The stream's next number (non-zero).
    pub next_seq: U64,
}
assert_layout!(SyncPosition, size = 16, member = 0, reserved = 2, epoch = 4, next_seq = 8);

impl SyncPosition {
    /// Size in bytes.
    pub const SIZE: usize = core::mem::size_of::<SyncPosition>();

    /// An entry.
    pub fn new(member: u16, epoch: u32, next_seq: u64) -> Self {
        SyncPosition { member: member.into(), reserved: 0.into(), epoch: epoch.into(), next_seq: next_seq.into() }
    }

    /// Whether the entry can name a stream: member, epoch and number
    /// non-zero, reserved zero.
    pub fn is_valid(&self) -> bool {
        self.member.get() != 0 && self.epoch.get() != 0 && self.next_seq.get() != 0 && self.reserved.get() == 0
    }
}

/// Body of EXT (continuation).
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExtBody {
    /// NAT translation of the connection.
    pub nat: Nat,
    /// Owner member id of a [`DescFlags::REPLICA`] write (non-zero); zero
    /// otherwise.
    pub owner: U16,
    /// Reserved, zero.
    pub reserved: [u8; 30],
}
assert_layout!(ExtBody, size = 56, nat = 0, owner = 24, reserved = 26);

/// SNAPSHOT completion `result`: records written in bits 31:0, next cursor
/// in bits 63:32; [`SNAPSHOT_DONE`] as the next cursor ends the walk.
pub const SNAPSHOT_DONE: u32 = u32::MAX;

/// A decoded, validated command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// NOP.
    Nop,
    /// INSERT.
    Insert(ConnOp),
    /// UPDATE.
    Update(ConnOp),
    /// UPSERT.
    Upsert(ConnOp),
    /// DELETE.
    Delete {
        /// Key to remove.
        key: ConnKey,
        /// [`DescFlags::REPLICA`]: the (owner, generation) of another
        /// member's delete (a Full Sync tombstone).
        replica: Option<(u16, u32)>,
    },
    /// LOOKUP.
    Lookup {
        /// Key to find.
        key: ConnKey,
        /// Where the record goes.
        resp_addr: u64,
    },
    /// SNAPSHOT.
    Snapshot {
        /// Where the records go.
        buf_addr: u64,
        /// Buffer length.
        buf_len: u32,
        /// First slot position.
        cursor: u32,
        /// Write sync records of synced entries ([`DescFlags::SYNC_RECORDS`]).
        sync_records: bool,
    },
    /// FLUSH.
    Flush,
    /// SYNC_POSITIONS.
    SyncPositions {
        /// Where the entries go.
        buf_addr: u64,
        /// Room for this many.
        entries: u32,
    },
    /// SYNC_ALIGN.
    SyncAlign {
        /// Where the entries are.
        buf_addr: u64,
        /// How many.
        entries: u32,
    },
    /// LOAD.
    Load {
        /// Where the records are.
        buf_addr: u64,
        /// Where the statuses go.
        status_addr: u64,
        /// How many records.
        count: u32,
    },
}

/// The payload of INSERT/UPDATE/UPSERT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnOp {
    /// Connection key.
    pub key: ConnKey,
    /// State to store.
    pub state: ConnState,
    /// NAT translation from a chained EXT descriptor. INSERT without one
    /// stores no translation; UPDATE/UPSERT without one keep the stored one.
    pub nat: Option<Nat>,
    /// Let the device assign the generation.
    pub auto_generation: bool,
    /// A [`DescFlags::REPLICA`] write of this owner's entry (UPSERT only).
    pub replica_owner: Option<u16>,
}

/// Why a descriptor was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Opcode byte not defined (or EXT on its own).
    UnknownOpcode(u8),
    /// Undefined flag bits, or a flag that this opcode does not take.
    BadFlags(u8),
    /// A reserved field is not zero.
    ReservedNonZero,
    /// CHAIN set but no EXT descriptor follows within the posted slots.
    MissingExt,
    /// Malformed key.
    Key(KeyError),
    /// Malformed state or NAT.
    State(StateError),
    /// SNAPSHOT buffer smaller than one record.
    BufferTooSmall,
    /// REPLICA without an EXT naming a non-zero owner, or an owner without
    /// REPLICA.
    BadOwner,
    /// LOAD of no record or more than [`LOAD_MAX_RECORDS`]; SYNC_POSITIONS
    /// or SYNC_ALIGN of no entry or more than [`MAX_POSITIONS`].
    BadCount(u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnknownOpcode(b) => write!(f, "unknown opcode {b:#04x}"),
            DecodeError::BadFlags(b) => write!(f, "invalid descriptor flags {b:#04x}"),
            DecodeError::ReservedNonZero => f.write_str("reserved field is not zero"),
            DecodeError::MissingExt => f.write_str("CHAIN set but no EXT descriptor follows"),
            DecodeError::Key(e) => write!(f, "key: {e}"),
            DecodeError::State(e) => write!(f, "state: {e}"),
            DecodeError::BufferTooSmall => f.write_str("buffer smaller than one record"),
            DecodeError::BadOwner => {
                f.write_str("REPLICA needs a chained EXT with a non-zero owner (and only REPLICA takes one)")
            }
            DecodeError::BadCount(n) => write!(f, "LOAD of {n} records (1 to {LOAD_MAX_RECORDS})"),
        }
    }
}

impl CommandDescriptor {
    /// An all-zero descriptor (a NOP with tag 0).
    pub fn zeroed() -> Self {
        FromZeros::new_zeroed()
    }

    /// A connection command (INSERT/UPDATE/UPSERT/DELETE).
    pub fn conn(op: Opcode, flags: DescFlags, tag: u16, key: &ConnKey, state: &ConnState) -> Self {
        let mut d = Self::header(op, flags, tag);
        d.body = zerocopy::transmute!(ConnBody { key: *key, state: *state });
        d
    }

    /// A LOOKUP.
    pub fn lookup(tag: u16, key: &ConnKey, resp_addr: u64) -> Self {
        let mut d = Self::header(Opcode::Lookup, DescFlags::empty(), tag);
        d.body = zerocopy::transmute!(LookupBody { key: *key, resp_addr: resp_addr.into(), reserved: [0; 8] });
        d
    }

    /// A SNAPSHOT.
    pub fn snapshot(tag: u16, buf_addr: u64, buf_len: u32, cursor: u32) -> Self {
        let mut d = Self::header(Opcode::Snapshot, DescFlags::empty(), tag);
        d.body = zerocopy::transmute!(SnapshotBody {
            buf_addr: buf_addr.into(),
            buf_len: buf_len.into(),
            cursor: cursor.into(),
            reserved: [0; 40],
        });
        d
    }

    /// SNAPSHOT with [`DescFlags::SYNC_RECORDS`]: 88-byte sync records of
    /// the entries marked for sync, with their owners.
    pub fn snapshot_sync_records(tag: u16, buf_addr: u64, buf_len: u32, cursor: u32) -> Self {
        let mut d = Self::snapshot(tag, buf_addr, buf_len, cursor);
        d.flags |= DescFlags::SYNC_RECORDS.bits();
        d
    }

    /// A LOAD of `count` sync records at `buf_addr`, statuses to
    /// `status_addr`.
    pub fn load(tag: u16, buf_addr: u64, status_addr: u64, count: u32) -> Self {
        let mut d = Self::header(Opcode::Load, DescFlags::empty(), tag);
        d.body = zerocopy::transmute!(LoadBody {
            buf_addr: buf_addr.into(),
            status_addr: status_addr.into(),
            count: count.into(),
            reserved: [0; 36],
        });
        d
    }

    /// SYNC_POSITIONS (`align` false) or SYNC_ALIGN (`align` true) over
    /// `entries` [`SyncPosition`]s at `buf_addr`.
    pub fn positions(tag: u16, align: bool, buf_addr: u64, entries: u32) -> Self {
        let op = if align { Opcode::SyncAlign } else { Opcode::SyncPositions };
        let mut d = Self::header(op, DescFlags::empty(), tag);
        d.body = zerocopy::transmute!(PositionsBody {
            buf_addr: buf_addr.into(),
            entries: entries.into(),
            reserved: [0; 44]
        });
        d
    }

    /// An EXT continuation carrying a NAT translation.
    pub fn ext(tag: u16, nat: &Nat) -> Self {
        let mut d = Self::header(Opcode::Ext, DescFlags::empty(), tag);
        d.body = zerocopy::transmute!(ExtBody { nat: *nat, owner: 0.into(), reserved: [0; 30] });
        d
    }

    /// A REPLICA DELETE: member `owner`'s delete of `key` at `generation`
    /// (two descriptors: DELETE and its EXT).
    pub fn replica_delete(tag: u16, key: &ConnKey, generation: u32, owner: u16) -> (Self, Self) {
        let state = ConnState { generation: generation.into(), ..Default::default() };
        let d = Self::conn(Opcode::Delete, DescFlags::REPLICA | DescFlags::CHAIN, tag, key, &state);
        (d, Self::ext_replica(tag, &Nat::default(), owner))
    }

    /// An EXT descriptor for a [`DescFlags::REPLICA`] write by `owner`.
    pub fn ext_replica(tag: u16, nat: &Nat, owner: u16) -> Self {
        let mut d = Self::header(Opcode::Ext, DescFlags::empty(), tag);
        d.body = zerocopy::transmute!(ExtBody { nat: *nat, owner: owner.into(), reserved: [0; 30] });
        d
    }

    /// A descriptor with only the header set.
    pub fn header(op: Opcode, flags: DescFlags, tag: u16) -> Self {
        CommandDescriptor { opcode: op as u8, flags: flags.bits(), tag: tag.into(), aux: 0.into(), body: [0; 56] }
    }

    /// The flags, if all defined.
    pub fn desc_flags(&self) -> Option<DescFlags> {
        DescFlags::from_bits(self.flags)
    }

    /// Whether the command continues in the next slot.
    pub fn is_chained(&self) -> bool {
        self.flags & DescFlags::CHAIN.bits() != 0
    }

    /// Decodes and validates this descriptor. `ext` is the next slot's
    /// descriptor when this one is chained and the slot was posted.
    pub fn decode(&self, ext: Option<&CommandDescriptor>) -> Result<Command, DecodeError> {
        let op = Opcode::from_wire(self.opcode).ok_or(DecodeError::UnknownOpcode(self.opcode))?;
        let flags = self.desc_flags().ok_or(DecodeError::BadFlags(self.flags))?;
        if self.aux.get() != 0 {
            return Err(DecodeError::ReservedNonZero);
        }
        let conn_op = matches!(op, Opcode::Insert | Opcode::Update | Opcode::Upsert);
        let allowed = match op {
            Opcode::Upsert => DescFlags::CHAIN | DescFlags::AUTO_GENERATION | DescFlags::IRQ_NOW | DescFlags::REPLICA,
            Opcode::Delete => DescFlags::IRQ_NOW | DescFlags::REPLICA | DescFlags::CHAIN,
            _ if conn_op => DescFlags::CHAIN | DescFlags::AUTO_GENERATION | DescFlags::IRQ_NOW,
            Opcode::Snapshot => DescFlags::IRQ_NOW | DescFlags::SYNC_RECORDS,
            Opcode::Ext => DescFlags::empty(),
            _ => DescFlags::IRQ_NOW,
        };
        let chain_without_replica =
            op == Opcode::Delete && flags.contains(DescFlags::CHAIN) && !flags.contains(DescFlags::REPLICA);
        if !allowed.contains(flags)
            || flags.contains(DescFlags::REPLICA | DescFlags::AUTO_GENERATION)
            || chain_without_replica
        {
            return Err(DecodeError::BadFlags(self.flags));
        }
        let empty_body = || self.body.iter().all(|b| *b == 0);
        match op {
            Opcode::Nop | Opcode::Flush => {
                if !empty_body() {
                    return Err(DecodeError::ReservedNonZero);
                }
                Ok(if op == Opcode::Nop { Command::Nop } else { Command::Flush })
            }
            Opcode::Ext => Err(DecodeError::UnknownOpcode(self.opcode)),
            Opcode::Insert | Opcode::Update | Opcode::Upsert => {
                // Read in place: a copy of the body first costs more than
                // the checks (this runs for every command).
                let body: &ConnBody = zerocopy::transmute_ref!(&self.body);
                body.key.validate().map_err(DecodeError::Key)?;
                body.state.validate().map_err(DecodeError::State)?;
                let replica = flags.contains(DescFlags::REPLICA);
                let e = match flags.contains(DescFlags::CHAIN) {
                    true => Some(decode_ext(ext.ok_or(DecodeError::MissingExt)?, body.key.family)?),
                    false => None,
                };
                let owner = e.map_or(0, |e| e.owner.get());
                if replica != (owner != 0) {
                    return Err(DecodeError::BadOwner);
                }
                let o = ConnOp {
                    key: body.key,
                    state: body.state,
                    nat: e.map(|e| e.nat),
                    auto_generation: flags.contains(DescFlags::AUTO_GENERATION),
                    replica_owner: replica.then_some(owner),
                };
                Ok(match op {
                    Opcode::Insert => Command::Insert(o),
                    Opcode::Update => Command::Update(o),
                    _ => Command::Upsert(o),
                })
            }
            Opcode::Delete => {
                let body: &ConnBody = zerocopy::transmute_ref!(&self.body);
                body.key.validate().map_err(DecodeError::Key)?;
                let replica = if flags.contains(DescFlags::REPLICA) {
                    let ext = ext.ok_or(DecodeError::MissingExt)?;
                    let e = decode_ext(ext, body.key.family)?;
                    let owner = e.owner.get();
                    if owner == 0 || e.nat != Nat::default() {
                        return Err(DecodeError::BadOwner);
                    }
                    Some((owner, body.state.generation.get()))
                } else {
                    None
                };
                Ok(Command::Delete { key: body.key, replica })
            }
            Opcode::Lookup => {
                let body: LookupBody = zerocopy::transmute!(self.body);
                body.key.validate().map_err(DecodeError::Key)?;
                if body.reserved != [0; 8] {
                    return Err(DecodeError::ReservedNonZero);
                }
                Ok(Command::Lookup { key: body.key, resp_addr: body.resp_addr.get() })
            }
            Opcode::Snapshot => {
                let body: SnapshotBody = zerocopy::transmute!(self.body);
                if body.reserved != [0; 40] {
                    return Err(DecodeError::ReservedNonZero);
                }
                let sync_records = flags.contains(DescFlags::SYNC_RECORDS);
                let record = if sync_records { crate::sync::RECORD_SIZE } else { crate::conn::ConnRecord::SIZE };
                if (body.buf_len.get() as usize) < record {
                    return Err(DecodeError::BufferTooSmall);
                }
                Ok(Command::Snapshot {
                    buf_addr: body.buf_addr.get(),
                    buf_len: body.buf_len.get(),
                    cursor: body.cursor.get(),
                    sync_records,
                })
            }
            Opcode::Load => {
                let body: LoadBody = zerocopy::transmute!(self.body);
                if body.reserved != [0; 36] {
                    return Err(DecodeError::ReservedNonZero);
                }
                let count = body.count.get();
                if count == 0 || count > LOAD_MAX_RECORDS {
                    return Err(DecodeError::BadCount(count));
                }
                Ok(Command::Load { buf_addr: body.buf_addr.get(), status_addr: body.status_addr.get(), count })
            }
            Opcode::SyncPositions | Opcode::SyncAlign => {
                let body: PositionsBody = zerocopy::transmute!(self.body);
                if body.reserved != [0; 44] {
                    return Err(DecodeError::ReservedNonZero);
                }
                let (buf_addr, entries) = (body.buf_addr.get(), body.entries.get());
                if entries == 0 || entries > MAX_POSITIONS {
                    return Err(DecodeError::BadCount(entries));
                }
                Ok(if op == Opcode::SyncAlign {
                    Command::SyncAlign { buf_addr, entries }
                } else {
                    Command::SyncPositions { buf_addr, entries }
                })
            }
        }
    }
}

/// The EXT's body, checked, in place: the caller copies the NAT out of the
/// descriptor itself. (Returned by value, the NAT went through the stack
/// field by field, and the whole-word loads that copied it on stalled on
/// those narrow stores: a tenth of a Full Sync write's time.)
fn decode_ext(ext: &CommandDescriptor, key_family: u8) -> Result<&ExtBody, DecodeError> {
    if ext.opcode != Opcode::Ext as u8 || ext.flags != 0 || ext.aux.get() != 0 {
        return Err(DecodeError::MissingExt);
    }
    let body: &ExtBody = zerocopy::transmute_ref!(&ext.body);
    if body.reserved != [0; 30] || body.nat.reserved != [0; 4] {
        return Err(DecodeError::ReservedNonZero);
    }
    body.nat.validate(key_family).map_err(DecodeError::State)?;
    Ok(body)
}

impl ConnOp {
    /// Descriptors for this operation under `op`: one, or two when a NAT
    /// translation is present.
    pub fn encode(&self, op: Opcode, tag: u16) -> (CommandDescriptor, Option<CommandDescriptor>) {
        let mut flags = DescFlags::empty();
        if self.nat.is_some() {
            flags |= DescFlags::CHAIN;
        }
        if self.auto_generation {
            flags |= DescFlags::AUTO_GENERATION;
        }
        if let Some(owner) = self.replica_owner {
            // A replica always carries its full state, NAT included.
            flags |= DescFlags::REPLICA | DescFlags::CHAIN;
            let d = CommandDescriptor::conn(op, flags, tag, &self.key, &self.state);
            return (d, Some(CommandDescriptor::ext_replica(tag, &self.nat.unwrap_or_default(), owner)));
        }
        let d = CommandDescriptor::conn(op, flags, tag, &self.key, &self.state);
        (d, self.nat.as_ref().map(|n| CommandDescriptor::ext(tag, n)))
    }
}

impl crate::conn::ConnRecord {
    /// Size of a record in bytes.
    pub const SIZE: usize = core::mem::size_of::<crate::conn::ConnRecord>();
}
