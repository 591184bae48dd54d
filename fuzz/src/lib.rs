//! Harnesses behind the nicsync fuzz targets.
//!
//! Each module holds one target's `run(data)`; the files in `fuzz_targets/`
//! only hand libFuzzer's input to it, and `examples/gen_corpus.rs` writes
//! the seed corpora in the input formats documented here (and runs every
//! seed through its harness). See `docs/fuzzing.md`.
//!
//! The harnesses assert only what the code promises whatever the input:
//! no panic, no hang, bounded memory, plus a few documented round trips and
//! invariants (named at each `assert!`).

pub mod ccp;
pub mod cmd_descriptor;
pub mod completion_event;
pub mod config;
pub mod control_request;
pub mod ctnetlink;
pub mod delta_frame;
pub mod fullsync_chunk;
pub mod seal;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, NatKind, TcpState};

/// Whether `NICSYNC_FUZZ_TRACE` is set: the harnesses then print what they
/// do to stderr (for reading a crash or timeout input, docs/fuzzing.md).
pub fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("NICSYNC_FUZZ_TRACE").is_some())
}

/// `eprintln!` when [`tracing`] is on.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::tracing() {
            eprintln!($($arg)*);
        }
    };
}

/// Reads the fuzz input front to back; past its end every read yields
/// zeros (so a harness never has to check lengths).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// Exactly `N` bytes, zero-padded at the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let src = self.take(N);
        out[..src.len()].copy_from_slice(src);
        out
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A bool from one byte's low bit.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
}

/// A valid key, one of a small family the seeds and harnesses share
/// (IPv4 for even `i`, IPv6 for odd).
pub fn key(i: u8) -> ConnKey {
    let p = [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP][(i as usize / 2) % 4];
    if i % 2 == 0 {
        ConnKey::v4(Ipv4Addr::new(10, 0, 0, i), 1000 + i as u16, Ipv4Addr::new(192, 0, 2, 1), 443, p, 0)
    } else {
        ConnKey::v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16), 1000, Ipv6Addr::LOCALHOST, 53, p, i as u16)
    }
}

/// A valid state with the given mark and generation.
pub fn state(mark: u32, generation: u32) -> ConnState {
    let mut s =
        ConnState::new(TcpState::Established, Direction::Original, ConnFlags::CONFIRMED | ConnFlags::SYNC, 300, mark);
    s.generation = generation.into();
    s
}

/// A valid source NAT for `key`'s family.
pub fn nat_for(key: &ConnKey) -> Nat {
    if key.family == nicsync_fwif::conn::FAMILY_IPV4 {
        Nat::new(NatKind::Source, Ipv4Addr::new(203, 0, 113, 9).into(), 4000)
    } else {
        Nat::new(NatKind::Destination, Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 9).into(), 4000)
    }
}
