//! The one module of this crate that uses `unsafe`: a cache prefetch hint
//! and huge pages for the host's copy of the card's table
//! ([`crate::keymap`]).
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

/// Smallest table worth huge pages.
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `table`'s memory with transparent huge pages
/// (`MADV_HUGEPAGE`, which Debian's default `enabled = madvise` honours),
/// for a table of at least 8 MiB: the copy's lookups land at random across
/// hundreds of megabytes, and with 4 KiB pages nearly every one also missed
/// the TLB, a page walk that costs more than the memory access itself under
/// a hypervisor. A hint: where the kernel refuses, the table works as is.
pub(crate) fn advise_huge_pages<T>(table: &mut [T]) {
    let bytes = std::mem::size_of_val(table);
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    let start = table.as_mut_ptr() as usize;
    // Whole huge pages inside the table only: the advice covers whole
    // pages, and the memory around the table is not ours to advise.
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + bytes) & !(HUGE_PAGE - 1);
    if end <= first {
        return;
    }
    // SAFETY: the range lies within `table`, which this call borrows
    // mutably, and MADV_HUGEPAGE changes neither its contents nor its
    // validity: it only tells the kernel which page size to back it with.
    let rc = unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_HUGEPAGE) refused");
    }
}
