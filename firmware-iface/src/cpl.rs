//! The 16-byte completion entry.
//!
//! The device writes each entry's body first and its `phase` byte last
//! (after a write barrier). The expected phase starts at 1 and flips each
//! time the consumer wraps, so a host sees a new entry when the phase bit
//! equals the one it expects, and never has to clear entries.

use core::fmt;
use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::assert_layout;

/// Size of a completion entry.
pub const CPL_SIZE: usize = 16;

/// Bit 0 of [`CompletionEntry::phase`].
pub const PHASE_BIT: u8 = 1;

/// A completion as the device writes it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CompletionEntry {
    /// Tag of the completed command.
    pub tag: U16,
    /// [`CplStatus`] byte.
    pub status: u8,
    /// Opcode of the completed command.
    pub opcode: u8,
    /// Command ring head after this command (slots before it are free).
    pub cmd_head: U16,
    /// Reserved, zero.
    pub reserved: u8,
    /// Phase bit in bit 0; other bits zero. Written last.
    pub phase: u8,
    /// Opcode-specific result (SNAPSHOT: count | next_cursor << 32;
    /// INSERT/UPDATE/UPSERT: stored generation).
    pub result: U64,
}
assert_layout!(
    CompletionEntry,
    size = CPL_SIZE,
    tag = 0,
    status = 2,
    opcode = 3,
    cmd_head = 4,
    reserved = 6,
    phase = 7,
    result = 8
);

/// Completion status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CplStatus {
    /// Done.
    Success = 0,
    /// No such connection.
    NotFound = 1,
    /// INSERT of a key that is present.
    Exists = 2,
    /// No room in the table.
    TableFull = 3,
    /// Opcode not defined.
    InvalidOpcode = 4,
    /// Flags, reserved fields, key, state or chain malformed.
    Malformed = 5,
    /// A DMA address fell outside every IOMMU window.
    DmaError = 6,
    /// UPDATE/UPSERT carried an older generation than the stored one.
    Stale = 7,
    /// Device-internal error.
    Internal = 8,
    /// SNAPSHOT: the walk is no longer consistent (too many entries moved
    /// behind it, or the cursor does not continue the device's walk); start
    /// again at cursor 0.
    SnapshotTorn = 9,
}

impl CplStatus {
    /// Decodes a status byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        Some(match b {
            0 => CplStatus::Success,
            1 => CplStatus::NotFound,
            2 => CplStatus::Exists,
            3 => CplStatus::TableFull,
            4 => CplStatus::InvalidOpcode,
            5 => CplStatus::Malformed,
            6 => CplStatus::DmaError,
            7 => CplStatus::Stale,
            8 => CplStatus::Internal,
            9 => CplStatus::SnapshotTorn,
            _ => return None,
        })
    }

    /// Upper-case name.
    pub const fn name(self) -> &'static str {
        match self {
            CplStatus::Success => "SUCCESS",
            CplStatus::NotFound => "NOT_FOUND",
            CplStatus::Exists => "EXISTS",
            CplStatus::TableFull => "TABLE_FULL",
            CplStatus::InvalidOpcode => "INVALID_OPCODE",
            CplStatus::Malformed => "MALFORMED",
            CplStatus::DmaError => "DMA_ERROR",
            CplStatus::Stale => "STALE",
            CplStatus::Internal => "INTERNAL",
            CplStatus::SnapshotTorn => "SNAPSHOT_TORN",
        }
    }

    /// Every status.
    pub const ALL: [CplStatus; 10] = [
        CplStatus::Success,
        CplStatus::NotFound,
        CplStatus::Exists,
        CplStatus::TableFull,
        CplStatus::InvalidOpcode,
        CplStatus::Malformed,
        CplStatus::DmaError,
        CplStatus::Stale,
        CplStatus::Internal,
        CplStatus::SnapshotTorn,
    ];
}

impl fmt::Display for CplStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A completion the host has checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Tag.
    pub tag: u16,
    /// Status.
    pub status: CplStatus,
    /// Opcode byte of the completed command, as posted (an undefined one
    /// completes with INVALID_OPCODE and is echoed unchanged).
    pub opcode: u8,
    /// Command ring head reported by the device.
    pub cmd_head: u16,
    /// Result word.
    pub result: u64,
}

/// Why a completion entry cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CplError {
    /// Unknown status byte.
    BadStatus(u8),
    /// Reserved bits set.
    Reserved,
}

impl fmt::Display for CplError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CplError::BadStatus(b) => write!(f, "unknown completion status {b}"),
            CplError::Reserved => f.write_str("reserved completion bits set"),
        }
    }
}

impl CompletionEntry {
    /// The phase bit.
    pub fn phase_bit(&self) -> bool {
        self.phase & PHASE_BIT != 0
    }

    /// Checks the fields that do not depend on host state (tag range and
    /// ring head are the ring's to check).
    pub fn decode(&self) -> Result<Completion, CplError> {
        if self.reserved != 0 || self.phase & !PHASE_BIT != 0 {
            return Err(CplError::Reserved);
        }
        Ok(Completion {
            tag: self.tag.get(),
            status: CplStatus::from_wire(self.status).ok_or(CplError::BadStatus(self.status))?,
            opcode: self.opcode,
            cmd_head: self.cmd_head.get(),
            result: self.result.get(),
        })
    }
}
