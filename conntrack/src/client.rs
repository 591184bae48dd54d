//! ctnetlink sockets: [`EventSocket`] (subscription) and [`CtSocket`]
//! (requests: dump, bulk create, delete, flush).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use crate::entry::{self, CtEntry, MsgKind, ParseError};
use crate::sys;
use crate::wire::{self, MsgBuf, NlMsgs};
use crate::CtError;

/// Receive buffer asked for on the event socket (SO_RCVBUFFORCE, else
/// SO_RCVBUF, which the kernel caps at `net.core.rmem_max`).
pub const EVENT_RCVBUF: usize = 64 << 20;
/// Receive buffer asked for on the request socket: room for every error of
/// a full batch (each one costs a whole skb of truesize).
pub const REQUEST_RCVBUF: usize = 8 << 20;
/// Largest datagram read: dumps come in skbs of at most 32 KiB.
const RECV_BUF: usize = 64 << 10;
/// Most messages in one `sendmsg` (bounds the acks the kernel may queue).
pub const MAX_MSGS_PER_SEND: usize = 1024;
/// Most bytes in one `sendmsg` (below the default `wmem_default`).
const MAX_BYTES_PER_SEND: usize = 128 << 10;
/// How long a request waits for the kernel's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Event multicast groups to join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Groups {
    /// NFNLGRP_CONNTRACK_NEW.
    pub new: bool,
    /// NFNLGRP_CONNTRACK_UPDATE.
    pub update: bool,
    /// NFNLGRP_CONNTRACK_DESTROY.
    pub destroy: bool,
}

impl Groups {
    /// All three groups.
    pub const ALL: Groups = Groups { new: true, update: true, destroy: true };

    fn mask(self) -> u32 {
        let bit = |on: bool, g: u32| if on { 1 << (g - 1) } else { 0 };
        bit(self.new, wire::NFNLGRP_CONNTRACK_NEW)
            | bit(self.update, wire::NFNLGRP_CONNTRACK_UPDATE)
            | bit(self.destroy, wire::NFNLGRP_CONNTRACK_DESTROY)
    }
}

/// One conntrack event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtEvent {
    /// A new entry.
    New(CtEntry),
    /// A change to an entry.
    Update(CtEntry),
    /// An entry was destroyed.
    Destroy(CtEntry),
    /// The socket's receive buffer overran (ENOBUFS): events were lost,
    /// and the caller must re-dump the table to resynchronise.
    Overrun,
    /// A message that could not be parsed: as lossy as an overrun.
    Unparsed(ParseError),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> CtError {
    move |source| CtError::Io { op, source }
}

/// Sets a buffer size with the *FORCE option (root may exceed rmem_max),
/// falling back to the capped one.
fn set_buf(fd: &OwnedFd, force: libc::c_int, plain: libc::c_int, bytes: usize) -> Result<(), CtError> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if sys::set_int(fd, libc::SOL_SOCKET, force, v).is_err() {
        sys::set_int(fd, libc::SOL_SOCKET, plain, v).map_err(io_err("setsockopt(SO_*BUF)"))?;
    }
    Ok(())
}

/// A non-blocking subscription to conntrack events.
#[derive(Debug)]
pub struct EventSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl EventSocket {
    /// Subscribes, in the calling thread's network namespace, with an
    /// [`EVENT_RCVBUF`] receive buffer.
    pub fn open(groups: Groups) -> Result<Self, CtError> {
        Self::open_with_buffer(groups, EVENT_RCVBUF)
    }

    /// Subscribes with a receive buffer of `rcvbuf` bytes (the kernel
    /// doubles it and has a floor).
    pub fn open_with_buffer(groups: Groups, rcvbuf: usize) -> Result<Self, CtError> {
        let fd = sys::netfilter_socket(true).map_err(io_err("socket(NETLINK_NETFILTER)"))?;
        set_buf(&fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, rcvbuf)?;
        sys::bind(&fd, groups.mask()).map_err(io_err("bind(conntrack groups)"))?;
        Ok(EventSocket { fd, buf: vec![0; RECV_BUF] })
    }

    /// The receive buffer the kernel granted (bytes, as SO_RCVBUF reports).
    pub fn receive_buffer(&self) -> Result<usize, CtError> {
        let v = sys::get_int(&self.fd, libc::SOL_SOCKET, libc::SO_RCVBUF).map_err(io_err("getsockopt(SO_RCVBUF)"))?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    /// Reads every event queued now, without blocking, calling `f` for each
    /// (an overrun is reported as [`CtEvent::Overrun`] and reading goes
    /// on). Returns the number of events delivered.
    pub fn read(&mut self, mut f: impl FnMut(CtEvent)) -> Result<usize, CtError> {
        self.read_with_origin(|ev, _| f(ev))
    }

    /// [`EventSocket::read`], also giving each event's origin: the netlink
    /// port id of the socket whose request caused it ([`CtSocket::port_id`]),
    /// 0 when the kernel's own packet path did (and for overruns). A daemon
    /// that commits entries itself uses it to recognise its own changes.
    pub fn read_with_origin(&mut self, f: impl FnMut(CtEvent, u32)) -> Result<usize, CtError> {
        self.read_up_to(usize::MAX, f).map(|(n, _)| n)
    }

    /// [`EventSocket::read_with_origin`], stopping once `max` events were
    /// delivered (a caller with other work interleaves it with reading a
    /// flood). Returns the events delivered and whether the socket was
    /// drained (`false`: more may be queued; read again without waiting).
    pub fn read_up_to(&mut self, max: usize, mut f: impl FnMut(CtEvent, u32)) -> Result<(usize, bool), CtError> {
        let mut n = 0;
        loop {
            if n >= max {
                return Ok((n, false));
            }
            let len = match sys::recv_from(&self.fd, &mut self.buf) {
                // Events come from the kernel (port 0): a datagram another
                // process sent to this socket is none of them.
                // (Counted against `max`: a flood of them must not keep
                // the caller here.)
                Ok((_, sender)) if sender != 0 => {
                    n += 1;
                    continue;
                }
                Ok((len, _)) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((n, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    f(CtEvent::Overrun, 0);
                    n += 1;
                    continue;
                }
                Err(e) => return Err(CtError::Io { op: "recv(events)", source: e }),
            };
            if len > self.buf.len() {
                // A truncated event is a lost event.
                f(CtEvent::Overrun, 0);
                n += 1;
                continue;
            }
            for msg in NlMsgs::new(&self.buf[..len]) {
                let origin = msg.as_ref().map_or(0, |m| m.pid);
                let ev = match msg {
                    Err(e) => CtEvent::Unparsed(e.into()),
                    Ok(m) if m.ty == wire::NLMSG_OVERRUN => CtEvent::Overrun,
                    Ok(m) if m.ty < 0x10 => continue, // NOOP, DONE, ERROR: not events
                    Ok(m) => match entry::parse_msg(&m) {
                        Ok((MsgKind::New, e)) => CtEvent::New(e),
                        Ok((MsgKind::Update, e)) => CtEvent::Update(e),
                        Ok((MsgKind::Destroy, e)) => CtEvent::Destroy(e),
                        Err(e) => CtEvent::Unparsed(e),
                    },
                };
                f(ev, origin);
                n += 1;
            }
        }
    }
}

impl AsFd for EventSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// How [`CtSocket::create_batch`] treats an entry that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// NLM_F_CREATE|NLM_F_REPLACE: create, or update the existing entry.
    Upsert,
    /// NLM_F_CREATE|NLM_F_EXCL: create; an existing entry fails with EEXIST.
    Exclusive,
}

/// What a bulk create achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Entries the kernel accepted.
    pub ok: usize,
    /// Entries it refused: (index in the input, errno).
    pub failed: Vec<(usize, i32)>,
    /// Entries the kernel answered for: the outcome covers the input's
    /// first `answered` (all of it, unless the exchange broke off:
    /// [`CtSocket::create_batch_partial`]).
    pub answered: usize,
}

/// A blocking request socket (dump, create, delete, flush).
#[derive(Debug)]
pub struct CtSocket {
    fd: OwnedFd,
    port_id: u32,
    seq: u32,
    buf: Vec<u8>,
    msg: MsgBuf,
}

impl CtSocket {
    /// Opens a request socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, CtError> {
        let fd = sys::netfilter_socket(false).map_err(io_err("socket(NETLINK_NETFILTER)"))?;
        set_buf(&fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, REQUEST_RCVBUF)?;
        set_buf(&fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 2 * MAX_BYTES_PER_SEND)?;
        // Acks without the echoed request: smaller, so more fit.
        sys::set_int(&fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1).map_err(io_err("NETLINK_CAP_ACK"))?;
        sys::set_recv_timeout(&fd, REQUEST_TIMEOUT).map_err(io_err("SO_RCVTIMEO"))?;
        let port_id = sys::bind(&fd, 0).map_err(io_err("bind"))?;
        Ok(CtSocket { fd, port_id, seq: 1, buf: vec![0; RECV_BUF], msg: MsgBuf::new() })
    }

    /// The netlink port id the kernel gave this socket: the origin that
    /// events caused by its requests carry ([`EventSocket::read_with_origin`]).
    pub fn port_id(&self) -> u32 {
        self.port_id
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send_msg(&mut self) -> Result<(), CtError> {
        let sent = sys::send(&self.fd, self.msg.as_bytes()).map_err(io_err("send"))?;
        if sent != self.msg.len() {
            return Err(CtError::ShortSend { sent, len: self.msg.len() });
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<usize, CtError> {
        loop {
            match sys::recv(&self.fd, &mut self.buf) {
                Ok(len) if len > self.buf.len() => return Err(CtError::Truncated(len)),
                Ok(len) => return Ok(len),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(CtError::Timeout),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Err(CtError::AcksLost),
                Err(e) => return Err(CtError::Io { op: "recv", source: e }),
            }
        }
    }

    /// Dumps the whole table (every family), calling `f` for each entry.
    ///
    /// A message that does not parse does not stop the dump (the rest
    /// must be drained to keep the socket in step); the first such error is
    /// returned once the dump is complete.
    pub fn dump(&mut self, mut f: impl FnMut(CtEntry)) -> Result<usize, CtError> {
        let seq = self.next_seq();
        self.msg.clear();
        self.msg.begin(wire::IPCTNL_MSG_CT_GET, wire::NLM_F_REQUEST | wire::NLM_F_DUMP, seq, 0);
        self.msg.end();
        self.send_msg()?;
        let mut n = 0;
        let mut first_err = None;
        loop {
            let len = self.recv()?;
            for m in NlMsgs::new(&self.buf[..len]) {
                let m = m.map_err(CtError::Wire)?;
                if m.seq != seq {
                    continue; // a late answer to an earlier request
                }
                match m.ty {
                    wire::NLMSG_DONE => return first_err.map_or(Ok(n), Err),
                    wire::NLMSG_ERROR => {
                        let errno = wire::error_code(m.payload).map_err(CtError::Wire)?;
                        return Err(CtError::Kernel { op: "dump", errno });
                    }
                    t if t < 0x10 => {}
                    _ => match entry::parse_msg(&m) {
                        Ok((_, e)) => {
                            f(e);
                            n += 1;
                        }
                        Err(e) => {
                            first_err.get_or_insert(CtError::Parse(e));
                        }
                    },
                }
            }
        }
    }

    /// Dumps the whole table into a vector.
    pub fn dump_all(&mut self) -> Result<Vec<CtEntry>, CtError> {
        let mut v = Vec::new();
        self.dump(|e| v.push(e))?;
        Ok(v)
    }

    /// Upserts one entry; if the kernel has it already and refuses its NAT
    /// binding (`EOPNOTSUPP`: ctnetlink cannot change an existing entry's
    /// NAT), upserts it again without the binding, so that its state,
    /// status, mark and timeout are updated and it keeps the NAT it was
    /// created with.
    pub fn upsert_keeping_nat(&mut self, entry: &CtEntry) -> Result<BatchOutcome, CtError> {
        let out = self.create_batch(std::slice::from_ref(entry), CreateMode::Upsert)?;
        let refused_nat = out.failed.iter().any(|&(_, errno)| errno == libc::EOPNOTSUPP);
        if !refused_nat || (entry.nat_src.is_none() && entry.nat_dst.is_none()) {
            return Ok(out);
        }
        let plain = CtEntry { nat_src: None, nat_dst: None, ..entry.clone() };
        self.create_batch(std::slice::from_ref(&plain), CreateMode::Upsert)
    }

    /// Creates (or, with [`CreateMode::Upsert`], updates) entries, many per
    /// `sendmsg`. Each entry's outcome is checked: only the last message of
    /// a send asks for an ack, and since the kernel handles a datagram's
    /// messages in order, its ack means every earlier error has already
    /// been queued.
    pub fn create_batch(&mut self, entries: &[CtEntry], mode: CreateMode) -> Result<BatchOutcome, CtError> {
        match self.create_batch_partial(entries, mode) {
            (out, None) => Ok(out),
            (_, Some(e)) => Err(e),
        }
    }

    /// [`CtSocket::create_batch`] that, when the exchange with the kernel
    /// breaks off (a send or a receive fails), still says what the kernel
    /// answered before: the outcome of the entries up to the last send it
    /// acknowledged whole, with the error.
    pub fn create_batch_partial(&mut self, entries: &[CtEntry], mode: CreateMode) -> (BatchOutcome, Option<CtError>) {
        let mut out = BatchOutcome::default();
        let error = self.send_batch(entries, mode, &mut out).err();
        out.failed.retain(|&(i, _)| i < out.answered);
        out.ok = out.answered - out.failed.len();
        (out, error)
    }

    /// The sends and acknowledgements of [`CtSocket::create_batch_partial`];
    /// `out.answered` moves past each send acknowledged whole.
    fn send_batch(&mut self, entries: &[CtEntry], mode: CreateMode, out: &mut BatchOutcome) -> Result<(), CtError> {
        let flags = wire::NLM_F_REQUEST
            | wire::NLM_F_CREATE
            | match mode {
                CreateMode::Upsert => wire::NLM_F_REPLACE,
                CreateMode::Exclusive => wire::NLM_F_EXCL,
            };
        let mut start = 0;
        while start < entries.len() {
            self.msg.clear();
            let first_seq = self.seq.wrapping_add(1);
            let mut end = start;
            while end < entries.len() && end - start < MAX_MSGS_PER_SEND && self.msg.len() < MAX_BYTES_PER_SEND {
                let last = end + 1 == entries.len()
                    || end + 1 - start == MAX_MSGS_PER_SEND
                    || self.msg.len() + 512 >= MAX_BYTES_PER_SEND;
                let seq = self.next_seq();
                let fl = if last { flags | wire::NLM_F_ACK } else { flags };
                entry::encode(&mut self.msg, wire::IPCTNL_MSG_CT_NEW, fl, seq, &entries[end]);
                end += 1;
                if last {
                    break;
                }
            }
            self.send_msg()?;
            let last_seq = self.seq;
            self.wait_acks(first_seq, last_seq, |i, errno| out.failed.push((start + i, errno)))?;
            start = end;
            out.answered = start;
        }
        Ok(())
    }

    /// Reads answers until the one for `last_seq`; reports errors of
    /// messages `first_seq..=last_seq` by their index in the send.
    fn wait_acks(&mut self, first_seq: u32, last_seq: u32, mut failed: impl FnMut(usize, i32)) -> Result<(), CtError> {
        let span = last_seq.wrapping_sub(first_seq);
        loop {
            let len = self.recv()?;
            let mut done = false;
            for m in NlMsgs::new(&self.buf[..len]) {
                let m = m.map_err(CtError::Wire)?;
                let idx = m.seq.wrapping_sub(first_seq);
                if m.ty != wire::NLMSG_ERROR || idx > span {
                    continue;
                }
                let errno = wire::error_code(m.payload).map_err(CtError::Wire)?;
                if errno != 0 {
                    failed(idx as usize, errno);
                }
                done |= m.seq == last_seq;
            }
            if done {
                return Ok(());
            }
        }
    }

    fn simple(&mut self, op: &'static str, msg: u8, family: u8, e: Option<&CtEntry>) -> Result<(), CtError> {
        let seq = self.next_seq();
        self.msg.clear();
        self.msg.begin(msg, wire::NLM_F_REQUEST | wire::NLM_F_ACK, seq, family);
        if let Some(e) = e {
            // A delete names the entry by its original tuple and zone.
            entry::encode_key(&mut self.msg, e);
        }
        self.msg.end();
        self.send_msg()?;
        let mut result = Ok(());
        self.wait_acks(seq, seq, |_, errno| result = Err(CtError::Kernel { op, errno }))?;
        result
    }

    /// Deletes the entry with `e`'s original tuple and zone.
    pub fn delete(&mut self, e: &CtEntry) -> Result<(), CtError> {
        let fam = e.orig.family().ok_or(CtError::Parse(ParseError::Family("orig tuple")))?;
        self.simple("delete", wire::IPCTNL_MSG_CT_DELETE, fam, Some(e))
    }

    /// Deletes every entry (of every family) in this namespace.
    pub fn flush(&mut self) -> Result<(), CtError> {
        self.simple("flush", wire::IPCTNL_MSG_CT_DELETE, 0, None)
    }
}

impl AsFd for CtSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path`
/// (e.g. `/run/netns/NAME`). Sockets opened in `f` stay in that namespace
/// whichever thread uses them afterwards.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, CtError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            sys::enter_netns(path).map_err(|source| CtError::Netns { path: path.display().to_string(), source })?;
            Ok(f())
        })
        .join()
        .map_err(|_| CtError::Netns { path: path.display().to_string(), source: io::Error::other("thread panicked") })?
    })
}
