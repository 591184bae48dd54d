//! The nicsync firmware interface (ABI).
//!
//! This crate is the single definition of everything that crosses the PCIe
//! boundary between the host driver and the nicsync device (the FPGA design,
//! or its software model in `nicsync-model`):
//!
//! * [`regs`]: the BAR0 register map, the register-block header checked at
//!   probe time, and the control/status/interrupt bits;
//! * [`conn`]: the connection key (IPv4/IPv6 5-tuple, L4 protocol, zone), the
//!   connection state, the NAT translation and the 80-byte connection record
//!   that LOOKUP and SNAPSHOT write into host memory;
//! * [`cmd`]: the 64-byte command descriptor, its opcodes and its checked
//!   decoding into a [`cmd::Command`];
//! * [`cpl`]: the 16-byte completion entry with its phase bit and status;
//! * [`event`]: the 64-byte event entry (aging, overflow);
//! * [`sync`]: the Delta Sync frames of the sync port;
//! * [`seal`]: the sealed (authenticated, encrypted) envelope around them.
//!
//! All multi-byte fields are little-endian (`zerocopy::little_endian`), every
//! wire struct is `repr(C)` with alignment 1, and sizes and offsets are
//! asserted at compile time. Wire structs are plain bytes: they are always
//! valid to read, and they become meaningful only through the `decode`/
//! `validate` functions, which reject reserved values instead of trusting
//! them. `docs/abi.md` is checked against these definitions by a test.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cmd;
pub mod conn;
pub mod cpl;
pub mod event;
pub mod hash;
pub mod regs;
pub mod seal;
pub mod sync;

/// ABI major version: a host refuses a device whose major version differs.
pub const ABI_MAJOR: u16 = 1;
/// ABI minor version: additions that an older host may ignore (1: the
/// inline doorbell window and its counters; 2: the sync event kinds; 3:
/// consistent SNAPSHOT walks with SNAPSHOT_TORN, `Control::SYNC_HOLD` and
/// the sync counters; 4: the sync security counters; 5:
/// `GENERATION_FLOOR`; 6: LOAD; 7: the `SYNC_HISTORY_LOST` counter; 8:
/// SYNC_POSITIONS, SYNC_ALIGN and the `SYNC_HISTORY_COVERED` counter; 9:
/// the seeded table hash, `TABLE_HASH_SEED_0..3`; 10: the
/// `SYNC_SUBMIT_FAILED` counter).
pub const ABI_MINOR: u16 = 10;
/// Oldest device minor this host drives: features newer than that are
/// used only when their capability bit says the device has them.
pub const MIN_DEVICE_ABI_MINOR: u16 = 0;

/// Asserts at compile time that a wire struct has the given size and that
/// its fields sit at the given byte offsets.
#[macro_export]
macro_rules! assert_layout {
    ($ty:ty, size = $size:expr $(, $field:ident = $off:expr)* $(,)?) => {
        const _: () = {
            assert!(::core::mem::size_of::<$ty>() == $size);
            assert!(::core::mem::align_of::<$ty>() == 1);
            $( assert!(::core::mem::offset_of!($ty, $field) == $off); )*
        };
    };
}
