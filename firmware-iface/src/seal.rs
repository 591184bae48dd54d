//! The sealed envelope: how a sync datagram is authenticated and encrypted.
//!
//! Every Delta Sync frame and every membership (CCP) datagram travels sealed
//! by default: a 16-byte [`SealHeader`] in clear, then the frame encrypted
//! with an AEAD (AES-256-GCM), then the 16-byte tag. The header is the
//! AEAD's associated data, so each of its fields is authenticated; its last
//! twelve bytes are the AEAD nonce.
//!
//! | offset | size | field | rule |
//! |---|---|---|---|
//! | 0 | 1 | `mark` | [`SEAL_MARK`]; a plain frame starts with another byte (`N` of `NSYN`) |
//! | 1 | 1 | `key_id` | which cluster key sealed it (two work during a rotation) |
//! | 2 | 1 | `suite` | [`SUITE_AES_256_GCM`] |
//! | 3 | 1 | `reserved` | 0 |
//! | 4 | 2 | `sender` | sender's member id; a receiver checks it against the frame inside |
//! | 6 | 4 | `boot` | sender's boot number: greater on every start of the sender (persisted) |
//! | 10 | 6 | `counter` | frames sealed since that boot, 48 bits, never reused |
//! | 16 | n | ciphertext | the frame |
//! | 16 + n | 16 | tag | AEAD tag |
//!
//! The nonce `sender ‖ boot ‖ counter` never repeats under one key: members
//! have distinct ids, a member's boot number grows across restarts and its
//! counter within one boot. Different traffic (Delta Sync from the device,
//! CCP from the host) is sealed with different keys derived from the
//! cluster key, so the two counters never collide either.
//!
//! The seal costs [`SEAL_OVERHEAD`] bytes, which is why a sync frame is at
//! most [`crate::sync::MAX_FRAME`] = 1,472 − 32 bytes: sealed, it still fits
//! one UDP payload in a 1,500-byte MTU.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::assert_layout;

/// First byte of a sealed datagram (format version 1).
pub const SEAL_MARK: u8 = 0xE1;
/// Cipher suite 1: AES-256-GCM with a 96-bit nonce and a 128-bit tag.
pub const SUITE_AES_256_GCM: u8 = 1;
/// Size of the [`SealHeader`].
pub const SEAL_HEADER_SIZE: usize = 16;
/// Size of the AEAD tag.
pub const SEAL_TAG_SIZE: usize = 16;
/// Bytes a seal adds to a frame.
pub const SEAL_OVERHEAD: usize = SEAL_HEADER_SIZE + SEAL_TAG_SIZE;
/// Byte range of the nonce inside the header.
pub const NONCE_RANGE: core::ops::Range<usize> = 4..16;
/// Largest counter value (48 bits).
pub const MAX_COUNTER: u64 = (1 << 48) - 1;

/// The clear header of a sealed datagram (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SealHeader {
    /// [`SEAL_MARK`].
    pub mark: u8,
    /// Cluster key id.
    pub key_id: u8,
    /// Cipher suite.
    pub suite: u8,
    /// Zero.
    pub reserved: u8,
    /// Sender member id.
    pub sender: U16,
    /// Sender boot number.
    pub boot: U32,
    /// Low 32 bits of the counter.
    pub counter_lo: U32,
    /// High 16 bits of the counter.
    pub counter_hi: U16,
}
assert_layout!(
    SealHeader,
    size = SEAL_HEADER_SIZE,
    mark = 0,
    key_id = 1,
    suite = 2,
    reserved = 3,
    sender = 4,
    boot = 6,
    counter_lo = 10,
    counter_hi = 14
);
const _: () = assert!(NONCE_RANGE.end - NONCE_RANGE.start == 12 && NONCE_RANGE.end == SEAL_HEADER_SIZE);

/// Why bytes are not a sealed datagram (before any cryptography).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealFormatError {
    /// Shorter than a header and a tag.
    Truncated,
    /// The first byte is not [`SEAL_MARK`] (a plain frame, or garbage).
    NotSealed,
    /// A cipher suite this build does not know.
    UnknownSuite(u8),
    /// A reserved byte is not zero.
    Reserved,
}

impl core::fmt::Display for SealFormatError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SealFormatError::Truncated => f.write_str("shorter than a seal header and tag"),
            SealFormatError::NotSealed => f.write_str("not a sealed datagram (plain or unknown format)"),
            SealFormatError::UnknownSuite(s) => write!(f, "unknown cipher suite {s}"),
            SealFormatError::Reserved => f.write_str("reserved header byte is not zero"),
        }
    }
}

impl SealHeader {
    /// The 48-bit counter.
    pub fn counter(&self) -> u64 {
        u64::from(self.counter_lo.get()) | (u64::from(self.counter_hi.get()) << 32)
    }

    /// A header for `counter` (at most [`MAX_COUNTER`]; higher bits dropped).
    pub fn new(key_id: u8, sender: u16, boot: u32, counter: u64) -> Self {
        SealHeader {
            mark: SEAL_MARK,
            key_id,
            suite: SUITE_AES_256_GCM,
            reserved: 0,
            sender: sender.into(),
            boot: boot.into(),
            counter_lo: (counter as u32).into(),
            counter_hi: ((counter >> 32) as u16).into(),
        }
    }

    /// Checks the clear part of a sealed datagram and returns its header.
    /// Says nothing of authenticity: that takes the key.
    pub fn new_checked(datagram: &[u8]) -> Result<SealHeader, SealFormatError> {
        if datagram.len() < SEAL_OVERHEAD {
            return Err(SealFormatError::Truncated);
        }
        let (h, _) = SealHeader::read_from_prefix(datagram).map_err(|_| SealFormatError::Truncated)?;
        if h.mark != SEAL_MARK {
            return Err(SealFormatError::NotSealed);
        }
        if h.suite != SUITE_AES_256_GCM {
            return Err(SealFormatError::UnknownSuite(h.suite));
        }
        if h.reserved != 0 {
            return Err(SealFormatError::Reserved);
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let h = SealHeader::new(7, 3, 0xDEAD_BEEF, MAX_COUNTER);
        assert_eq!(h.counter(), MAX_COUNTER);
        let mut d = [0u8; 40];
        d[..16].copy_from_slice(h.as_bytes());
        assert_eq!(SealHeader::new_checked(&d), Ok(h));
        assert_eq!(SealHeader::new_checked(&d[..31]), Err(SealFormatError::Truncated));
        let mut plain = d;
        plain[0] = b'N';
        assert_eq!(SealHeader::new_checked(&plain), Err(SealFormatError::NotSealed));
        let mut suite = d;
        suite[2] = 9;
        assert_eq!(SealHeader::new_checked(&suite), Err(SealFormatError::UnknownSuite(9)));
        let mut res = d;
        res[3] = 1;
        assert_eq!(SealHeader::new_checked(&res), Err(SealFormatError::Reserved));
    }
}
