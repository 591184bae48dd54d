//! The one module of this crate that uses `unsafe`: a cache prefetch hint,
//! and a set of descriptors that reads as one (epoll).
//!
//! The table's pipelined lookup issues its memory reads ahead of use, as a
//! hardware pipeline keeps many reads in flight. A plain load would do the
//! same but occupies the CPU's reorder buffer until the data arrives; a
//! prefetch instruction retires at once, so a whole burst's reads overlap.
//!
//! A UDP sync port receives on several sockets (one connected per peer, one
//! for everything else); a device thread or an event loop that sleeps until
//! the port has something waits on one descriptor: a [`ReadinessSet`].
//!
//! The card's table memory is made resident when the table is sized
//! ([`make_resident`]): a card's memory is there from power-on, whereas a
//! zero-filled host array is mapped page by page on first write, and each
//! fault (about 10 µs under this machine's hypervisor) landed on the
//! command that first wrote the page: on a fresh 4 M-entry table, nearly
//! every single new connection's insert.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

/// Descriptors that read as one: a level-triggered epoll instance, itself
/// readable (to `poll`, or to another epoll such as tokio's) while any of
/// its members is. A member closed elsewhere leaves the set by itself.
#[derive(Debug)]
pub struct ReadinessSet {
    epoll: OwnedFd,
}

impl ReadinessSet {
    /// An empty set.
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointer; it returns a new
        // descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned open by epoll_create1 and nothing
        // else owns it.
        Ok(ReadinessSet { epoll: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Adds `member`, watched for input.
    pub fn add(&self, member: BorrowedFd<'_>) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: member.as_raw_fd() as u64 };
        // SAFETY: both descriptors are open for the call (the set owns its
        // own, `member` is borrowed), and `ev` is a live epoll_event the
        // kernel only reads.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, member.as_raw_fd(), &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A descriptor of the set, readable while a member is.
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.epoll.try_clone()
    }
}

/// The whole `page`-sized pages inside `mem`, as an address range: advice
/// covers whole pages, and the memory around `mem` is not ours to advise.
fn whole_pages<T>(mem: &[T], page: usize) -> Option<(usize, usize)> {
    let start = mem.as_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + std::mem::size_of_val(mem)) & !(page - 1);
    (end > first).then_some((first, end))
}

/// Smallest table worth huge pages.
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `mem` with transparent huge pages
/// (`MADV_HUGEPAGE`, which Debian's default `enabled = madvise` honours),
/// for an array of at least 8 MiB: a table whose accesses land at random
/// across hundreds of megabytes missed the TLB on nearly every one with 4
/// KiB pages, a page walk that costs more than the memory access itself
/// under a hypervisor. A hint: where the kernel refuses, the memory works
/// as is. (The host's copy of the card's table and the card's own memory
/// take it: `table::card_memory`.)
pub fn advise_huge_pages<T>(mem: &mut [T]) {
    if std::mem::size_of_val(mem) < HUGE_PAGE_MIN_BYTES {
        return;
    }
    let Some((first, end)) = whole_pages(mem, HUGE_PAGE) else { return };
    // SAFETY: the range lies within `mem`, which this call borrows
    // mutably, and MADV_HUGEPAGE changes neither its contents nor its
    // validity: it only tells the kernel which page size to back it with.
    let rc = unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_HUGEPAGE) refused");
    }
}

/// Smallest array worth populating ahead: a small table's pages fill
/// within its first few commands anyway.
const RESIDENT_MIN_BYTES: usize = 1 << 20;
const PAGE: usize = 4096;

/// Makes the pages of `mem` resident now, so that no later write to it
/// takes a page fault. Contents are unchanged. A zero-filled vector is
/// allocated mapped to the kernel's shared zero page, and its first write to
/// each page faults; a kernel without `MADV_POPULATE_WRITE` (before 5.14)
/// gets each page touched instead.
pub fn make_resident<T: Copy>(mem: &mut [T]) {
    if std::mem::size_of_val(mem) < RESIDENT_MIN_BYTES {
        return;
    }
    let Some((first, end)) = whole_pages(mem, PAGE) else { return };
    // SAFETY: [first, end) is page-aligned and lies inside `mem`'s
    // allocation, which this function borrows exclusively;
    // MADV_POPULATE_WRITE faults the pages in as a write of their current
    // contents would, and changes nothing they hold.
    let populated = unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_POPULATE_WRITE) == 0 };
    if !populated {
        for page in (first..end).step_by(PAGE) {
            // SAFETY: `page` is inside `mem`'s allocation (first <= page <
            // end), exclusively borrowed and initialised (a `T: Copy`
            // slice): a byte read and written back leaves the contents as
            // they were while forcing the page in.
            unsafe {
                let p = page as *mut u8;
                p.write_volatile(p.read_volatile());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `mem` the kernel reports resident (mincore).
    fn resident_pages(mem: &[u8]) -> usize {
        let start = (mem.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (mem.as_ptr() as usize + mem.len()) & !(PAGE - 1);
        let mut vec = vec![0u8; (end - start) / PAGE];
        // SAFETY: [start, end) is page-aligned and inside `mem`'s live
        // allocation; `vec` has one byte per page of it, as mincore writes.
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn a_zeroed_array_is_resident_after_make_resident_and_unchanged() {
        // Above glibc's largest mmap threshold (32 MiB), so that the
        // allocation is a fresh mapping, not heap memory other tests used.
        let len = 64 << 20;
        let mut mem = vec![0u8; len];
        let pages = (len - PAGE) / PAGE;
        // A zeroed allocation this large is mapped lazily: most of its
        // pages are not there yet (what made a fresh card's inserts fault).
        assert!(resident_pages(&mem) < pages / 2, "the allocation was populated already");
        mem[12345] = 7;
        make_resident(&mut mem);
        assert!(resident_pages(&mem) >= pages - 1, "{} of {pages} pages resident", resident_pages(&mem));
        assert_eq!(mem[12345], 7);
        assert_eq!(mem.iter().map(|b| *b as u64).sum::<u64>(), 7);
    }
}
