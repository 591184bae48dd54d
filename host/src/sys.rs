//! The one module of this crate that uses `unsafe`: a cache prefetch hint
//! for the host's copy of the card's table ([`crate::keymap`]), the
//! daemon's scheduling priority ([`set_nice`]), and the kernel's receive
//! stamps on membership datagrams ([`enable_receive_stamps`],
//! [`recv_stamped`]).
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

/// Turns on the kernel's receive stamps (`SO_TIMESTAMPNS`) on `sock`: each
/// datagram read with [`recv_stamped`] then says when it reached the host.
pub(crate) fn enable_receive_stamps(sock: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    set_socket_option(sock, libc::SO_TIMESTAMPNS, 1)
}

/// Asks for a receive buffer of `bytes` on `sock`: past the system's
/// `rmem_max` where the process may (`SO_RCVBUFFORCE`, root or
/// `CAP_NET_ADMIN`), up to it otherwise. Returns the buffer the kernel
/// granted (it doubles what is asked, for its bookkeeping).
pub(crate) fn set_receive_buffer(sock: &impl std::os::fd::AsFd, bytes: usize) -> std::io::Result<usize> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if set_socket_option(sock, libc::SO_RCVBUFFORCE, want).is_err() {
        set_socket_option(sock, libc::SO_RCVBUF, want)?;
    }
    socket2::SockRef::from(sock).recv_buffer_size()
}

/// `setsockopt(SOL_SOCKET, name, value)` for an integer option.
fn set_socket_option(sock: &impl std::os::fd::AsFd, name: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt reads `len` bytes at `&value`, a live c_int of
    // this frame; the descriptor is borrowed, so open, for the call.
    let rc = unsafe {
        libc::setsockopt(sock.as_fd().as_raw_fd(), libc::SOL_SOCKET, name, (&value as *const libc::c_int).cast(), len)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A datagram read by [`recv_stamped`].
#[derive(Debug)]
pub(crate) struct Stamped {
    /// Its length (the first bytes of the buffer).
    pub len: usize,
    /// Its sender.
    pub from: std::net::SocketAddr,
    /// When it reached the host (`CLOCK_REALTIME`), if the kernel said.
    pub arrived: Option<std::time::SystemTime>,
}

/// Room for a timestamp's control message (a `cmsghdr` and a `timespec`,
/// 32 bytes on 64-bit Linux) and one more; u64s for the header's alignment.
const CONTROL_WORDS: usize = 16;

/// Reads one datagram from `sock` into `buf` (an error of kind
/// `WouldBlock` when none waits, on a non-blocking socket), with its
/// receive stamp where [`enable_receive_stamps`] turned them on. A
/// datagram longer than `buf` is cut to it, as `recv_from` does.
pub(crate) fn recv_stamped(sock: &impl std::os::fd::AsFd, buf: &mut [u8]) -> std::io::Result<Stamped> {
    use std::os::fd::AsRawFd;
    let mut name = socket2::SockAddrStorage::zeroed();
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain integers and pointers (and, on some targets,
    // private padding), for which all zeros is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut socket2::SockAddrStorage).cast();
    msg.msg_namelen = name.size_of();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` points into a live local of this
    // frame (`name`, `iov`, `control`) or into `buf`, borrowed mutably for
    // the call, with the length the kernel may write beside it; the
    // descriptor is borrowed, so open.
    let n = unsafe { libc::recvmsg(sock.as_fd().as_raw_fd(), &mut msg, 0) };
    let len = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    // The kernel writes the address's full length back, even where it cut
    // the address to the storage (never, for IP: at most 28 of 128 bytes).
    let name_len = msg.msg_namelen.min(name.size_of());
    // SAFETY: the kernel wrote the sender's address into `name`, which
    // holds `name_len` bytes of it: the length it gave, at most the
    // storage's size.
    let from = unsafe { socket2::SockAddr::new(name, name_len) }
        .as_socket()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "datagram from a non-IP address"))?;
    // (size_t in glibc, socklen_t in musl: at most the buffer's size)
    let control_len = msg.msg_controllen as usize;
    let mut bytes = [0u8; CONTROL_WORDS * 8];
    for (chunk, w) in bytes.chunks_exact_mut(8).zip(control) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    let arrived = bytes.get(..control_len).and_then(receive_stamp);
    Ok(Stamped { len: len.min(buf.len()), from, arrived })
}

/// The `SCM_TIMESTAMPNS` stamp among the control messages `control`, read
/// field by field (`cmsghdr`: length, level, type, then the data at the
/// header's aligned size); `None` if there is none, or it is malformed or
/// not a `timespec` as this build lays it out (a 32-bit target built for
/// 64-bit time reads the kernel's older, shorter one as none).
fn receive_stamp(control: &[u8]) -> Option<std::time::SystemTime> {
    const WORD: usize = std::mem::size_of::<usize>();
    let align = |n: usize| n.div_ceil(WORD) * WORD;
    let header = align(std::mem::size_of::<libc::cmsghdr>());
    let sec_len = std::mem::size_of::<libc::time_t>();
    let nsec_len = std::mem::size_of::<libc::c_long>();
    let int = |b: &[u8]| -> Option<i64> {
        match b.len() {
            4 => Some(i64::from(i32::from_ne_bytes(b.try_into().ok()?))),
            8 => Some(i64::from_ne_bytes(b.try_into().ok()?)),
            _ => None,
        }
    };
    let mut at = 0;
    while let Some(h) = control.get(at..at + header) {
        let len = usize::try_from(int(h.get(..WORD)?)?).ok()?;
        let level = int(h.get(WORD..WORD + 4)?)?;
        let kind = int(h.get(WORD + 4..WORD + 8)?)?;
        if len < header {
            return None;
        }
        if level == i64::from(libc::SOL_SOCKET) && kind == i64::from(libc::SCM_TIMESTAMPNS) {
            let data = control.get(at + header..at + len)?;
            if data.len() != std::mem::size_of::<libc::timespec>() {
                return None;
            }
            let sec = u64::try_from(int(data.get(..sec_len)?)?).ok()?;
            let nsec =
                u32::try_from(int(data.get(sec_len..sec_len + nsec_len)?)?).ok().filter(|&n| n < 1_000_000_000)?;
            return std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(sec, nsec));
        }
        at += align(len);
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn set_nice_changes_the_calling_thread_and_its_children() -> std::io::Result<()> {
        let before = nice()?;
        // Raising the value (a lower priority) needs no privilege.
        let (own, child) = std::thread::spawn(|| -> std::io::Result<(i32, i32)> {
            set_nice(19)?;
            let own = nice()?;
            let child = std::thread::spawn(nice).join().map_err(|_| std::io::Error::other("child panicked"))??;
            Ok((own, child))
        })
        .join()
        .map_err(|_| std::io::Error::other("thread panicked"))??;
        assert_eq!((own, child), (19, 19));
        assert_eq!(nice()?, before, "another thread's priority changed");
        Ok(())
    }

    #[test]
    fn a_receive_buffer_grows_as_far_as_allowed() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = socket2::SockRef::from(&sock).recv_buffer_size().unwrap();
        let granted = set_receive_buffer(&sock, 8 << 20).unwrap();
        assert!(granted >= before, "{granted} < {before}");
        // Past rmem_max only where the process may force it.
        let forced = set_socket_option(&sock, libc::SO_RCVBUFFORCE, 8 << 20).is_ok();
        if forced {
            assert!(granted >= 8 << 20, "{granted}");
        }
    }

    #[test]
    fn a_stamped_datagram_says_when_it_arrived() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_receive_stamps(&rx).unwrap();
        let before = std::time::SystemTime::now();
        tx.send_to(b"probe", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 64];
        let d = recv_stamped(&rx, &mut buf).unwrap();
        let after = std::time::SystemTime::now();
        assert_eq!(&buf[..d.len], b"probe");
        assert_eq!(d.from, tx.local_addr().unwrap());
        let arrived = d.arrived.expect("no receive stamp");
        assert!(before <= arrived && arrived <= after, "{before:?} {arrived:?} {after:?}");
        // Without stamps turned on, none.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"x", plain.local_addr().unwrap()).unwrap();
        let d = recv_stamped(&plain, &mut buf).unwrap();
        assert_eq!((d.len, d.arrived), (1, None));
        // Nothing waiting on a non-blocking socket: WouldBlock.
        plain.set_nonblocking(true).unwrap();
        let e = recv_stamped(&plain, &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }

    /// Laid out as on 64-bit Linux (an 8-byte length, 16-byte header).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn malformed_control_messages_give_no_stamp() {
        assert_eq!(receive_stamp(&[]), None);
        // A header whose length is below the header's own size.
        assert_eq!(receive_stamp(&[0u8; 32]), None);
        // A timestamp message cut short.
        let mut c = vec![0u8; 24];
        c[..8].copy_from_slice(&32usize.to_ne_bytes());
        c[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        c[12..16].copy_from_slice(&libc::SCM_TIMESTAMPNS.to_ne_bytes());
        assert_eq!(receive_stamp(&c), None);
        // Whole, it reads.
        c.resize(32, 0);
        c[16..24].copy_from_slice(&5i64.to_ne_bytes());
        c[24..32].copy_from_slice(&7i64.to_ne_bytes());
        let stamp = Some(std::time::UNIX_EPOCH + std::time::Duration::new(5, 7));
        assert_eq!(receive_stamp(&c), stamp);
        // After another control message (of 20 bytes, aligned to 24), it
        // is still found.
        let mut other = vec![0u8; 24];
        other[..8].copy_from_slice(&20usize.to_ne_bytes());
        other[8..12].copy_from_slice(&libc::SOL_IP.to_ne_bytes());
        other[12..16].copy_from_slice(&libc::IP_TTL.to_ne_bytes());
        assert_eq!(receive_stamp(&[other.as_slice(), &c].concat()), stamp);
        // Data of another length than a timespec's is refused.
        let mut long = c.clone();
        long[..8].copy_from_slice(&40usize.to_ne_bytes());
        long.resize(40, 0);
        assert_eq!(receive_stamp(&long), None);
        // A nanosecond field of a second or more is refused.
        c[24..32].copy_from_slice(&1_000_000_000i64.to_ne_bytes());
        assert_eq!(receive_stamp(&c), None);
    }
}
