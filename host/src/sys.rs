//! The one module of this crate that uses `unsafe`: a cache prefetch hint
//! for the host's copy of the card's table ([`crate::keymap`]).
//!
//! A plain load would bring the line too, but it holds the CPU's reorder
//! buffer until the data arrives; a prefetch instruction retires at once,
//! so the reads of a whole batch of writes overlap.
#![allow(unsafe_code)]

/// Hints the CPU to bring every cache line `*p` spans closer (a value that
/// starts near the end of a line spills into the next one or two). No
/// effect on targets without a prefetch instruction.
#[inline(always)]
pub(crate) fn prefetch<T>(p: &T) {
    let start = (p as *const T).cast::<u8>();
    let end = start as usize + std::mem::size_of::<T>().max(1);
    let mut line = start as usize & !63;
    while line < end {
        // An address within `*p` (its start, then each following line's):
        // only the address is used, nothing is read through it.
        prefetch_line(start.wrapping_add(line.saturating_sub(start as usize)));
        line += 64;
    }
}

#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults and has no effect on the
    // program's memory or its semantics, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
