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
