//! The crate's only unsafe code: the netlink socket system calls and
//! `setns`. Every function here is a safe wrapper whose arguments are
//! owned buffers and file descriptors, so the callers stay safe code.

use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Opens an `AF_NETLINK`/`NETLINK_NETFILTER` socket, close-on-exec.
pub fn netfilter_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: socket(2) takes no pointers; the returned descriptor is new and
    // owned by nobody else, so OwnedFd may take it (checked non-negative).
    unsafe {
        let fd = cvt(libc::socket(libc::AF_NETLINK, ty, libc::NETLINK_NETFILTER))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Binds to the given multicast group mask; returns the port id the kernel
/// assigned.
pub fn bind(fd: &OwnedFd, groups: u32) -> io::Result<u32> {
    // SAFETY: sockaddr_nl is plain old data for which all-zero is valid.
    let mut sa: libc::sockaddr_nl = unsafe { mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = groups;
    let len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `sa` is a valid sockaddr_nl that lives across the call and
    // `len` is its size; `fd` is an open socket borrowed for the call.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_nl).cast(), len) })?;
    let mut out_len = len;
    // SAFETY: getsockname writes at most `out_len` bytes into `sa`, which is
    // exactly that large and exclusively borrowed for the call.
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), (&mut sa as *mut libc::sockaddr_nl).cast(), &mut out_len) })?;
    Ok(sa.nl_pid)
}

/// Sets an integer socket option.
pub fn set_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, val: libc::c_int) -> io::Result<()> {
    let len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option value pointer points to a live c_int of `len` bytes.
    cvt(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&val as *const libc::c_int).cast(), len) })?;
    Ok(())
}

/// Reads an integer socket option.
pub fn get_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`, which is that
    // large and exclusively borrowed for the call.
    cvt(unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut val as *mut libc::c_int).cast(), &mut len) })?;
    Ok(val)
}

/// Sets SO_RCVTIMEO.
pub fn set_recv_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    let len = mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: the option value pointer points to a live timeval of `len` bytes.
    cvt(unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), len)
    })?;
    Ok(())
}

/// Sends one datagram to the kernel (the unbound default destination of a
/// netlink socket is port 0, the kernel).
pub fn send(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, initialised slice of `buf.len()` bytes.
    cvt_size(unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) })
}

/// Receives one datagram. Returns its full length (MSG_TRUNC), which
/// exceeds `buf.len()` if it was truncated.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is exclusively borrowed and `buf.len()` bytes long; the
    // kernel writes at most that many (MSG_TRUNC only changes the return
    // value). `fd` is an open socket borrowed for the call.
    cvt_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) })
}

/// [`recv`], also giving the sender's netlink port id (0: the kernel).
pub fn recv_from(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, u32)> {
    // SAFETY: all-zero bytes are a valid `sockaddr_nl` (integers only).
    let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `buf` is exclusively borrowed and `buf.len()` bytes long; the
    // kernel writes at most that many (MSG_TRUNC only changes the return
    // value), and at most `from_len` bytes into `from`, which is a
    // `sockaddr_nl` of that size, exclusively borrowed. `fd` is an open
    // socket borrowed for the call.
    let n = cvt_size(unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            std::ptr::addr_of_mut!(from).cast(),
            &mut from_len,
        )
    })?;
    Ok((n, from.nl_pid))
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: setns takes no pointers; `f` is an open namespace file that
    // lives across the call. It changes only this thread's namespace.
    cvt(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every network namespace
/// of a machine, so that times taken in different namespaces (a firewall's
/// kernel and its peer's daemon) can be subtracted.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`, which is valid,
    // exclusively borrowed and lives across the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}
