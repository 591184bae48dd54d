//! The one module of this crate that uses `unsafe`: a cache prefetch hint
//! for the host's copy of the card's table ([`crate::keymap`]), and the
//! daemon's scheduling priority ([`set_nice`]).
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

/// Sets the calling thread's nice value to `nice` (-20..=19); the threads it
/// starts afterwards inherit it. (On Linux, `setpriority(PRIO_PROCESS, 0)`
/// changes the calling thread only, so the daemon calls this before it
/// starts any other.)
pub(crate) fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; an out-of-range value is clamped by the kernel, a refused one
    // reported through errno.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's nice value.
pub(crate) fn nice() -> std::io::Result<i32> {
    // getpriority may return -1 as a value: errno tells it apart.
    // SAFETY: __errno_location returns this thread's errno, valid for the
    // thread's life; getpriority takes plain integers.
    let v = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let err = std::io::Error::last_os_error();
    if v == -1 && err.raw_os_error().unwrap_or(0) != 0 {
        Err(err)
    } else {
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn set_nice_changes_the_calling_thread_and_its_children() -> std::io::Result<()> {
        let before = super::nice()?;
        // Raising the value (a lower priority) needs no privilege.
        let (own, child) = std::thread::spawn(|| -> std::io::Result<(i32, i32)> {
            super::set_nice(19)?;
            let own = super::nice()?;
            let child =
                std::thread::spawn(super::nice).join().map_err(|_| std::io::Error::other("child panicked"))??;
            Ok((own, child))
        })
        .join()
        .map_err(|_| std::io::Error::other("thread panicked"))??;
        assert_eq!((own, child), (19, 19));
        assert_eq!(super::nice()?, before, "another thread's priority changed");
        Ok(())
    }
}
