//! The one module of this crate that uses `unsafe`: a cache prefetch hint.
//!
//! The table's pipelined lookup issues its memory reads ahead of use, as a
//! hardware pipeline keeps many reads in flight. A plain load would do the
//! same but occupies the CPU's reorder buffer until the data arrives; a
//! prefetch instruction retires at once, so a whole burst's reads overlap.

/// Hints the CPU to bring the cache line holding `*p` closer. No effect on
/// targets without a prefetch instruction.
#[inline(always)]
pub fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults and has no effect on the
    // program's memory or its semantics, whatever the address; here the
    // address comes from a live reference anyway.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>((p as *const T).cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
