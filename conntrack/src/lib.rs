//! Linux conntrack integration for nicsync.
//!
//! This crate connects nicsync to the kernel's connection-tracking table
//! through ctnetlink (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`):
//!
//! * [`EventSocket`]: a non-blocking subscription to the NEW, UPDATE and
//!   DESTROY event groups, with a large receive buffer (`SO_RCVBUFFORCE`
//!   when the process may, else `SO_RCVBUF`, capped by `rmem_max`). Its raw
//!   fd goes into the caller's poll loop; [`EventSocket::read`] drains what
//!   is queued. When the kernel could not queue an event (`ENOBUFS`) the
//!   reader gets [`CtEvent::Overrun`]: events were lost and the caller must
//!   re-dump the table to resynchronise.
//! * [`CtSocket`]: blocking requests with a 10 s answer timeout:
//!   [`CtSocket::dump`] (`IPCTNL_MSG_CT_GET` + `NLM_F_DUMP`, multi-part,
//!   `NLMSG_ERROR` surfaced), [`CtSocket::create_batch`] (`IPCTNL_MSG_CT_NEW`
//!   with `NLM_F_CREATE` and `NLM_F_REPLACE` or `NLM_F_EXCL`, up to
//!   [`MAX_MSGS_PER_SEND`] messages per `sendmsg`, every entry's outcome
//!   checked), [`CtSocket::delete`] and [`CtSocket::flush`].
//! * [`in_netns`]: runs a closure on a thread inside another network
//!   namespace (sockets opened there stay there), for tests and for
//!   firewalls that live in a namespace.
//! * [`parse`] / [`parse_msg`] / [`encode`]: a checked parser of ctnetlink
//!   conntrack messages into a plain [`CtEntry`], and the encoder back.
//!   The parser reads outside bytes as bounds-checked views: it never
//!   panics and never allocates, whatever it is given (`parse` is the
//!   entry point for a fuzz target); unknown attributes are skipped.
//! * [`from_ct`] / [`to_ct`]: the mapping between a [`CtEntry`] and
//!   nicsync's `ConnKey`/`ConnState`/`Nat` (below).
//!
//! # Why ctnetlink is encoded here rather than with a crate
//!
//! The candidates were checked (November 2026). `netlink-packet-netfilter`
//! 0.4.0 (source read) has a ctnetlink module, but it knows only the
//! tuples (addresses, ports), status, timeout, mark and the TCP protoinfo:
//! no `CTA_ZONE`, no `CTA_ID`, no ICMP id/type/code, no `CTA_NAT_SRC`/
//! `CTA_NAT_DST`; everything else becomes a `DefaultNla` that copies its
//! payload into a `Vec` (an allocation per attribute from outside bytes);
//! it needs `bitflags >= 2.10`, which conflicts with the workspace's
//! `=2.9.4` pin, and pulls in `netlink-packet-core` and `derive_more`. The
//! socket side (event groups, `ENOBUFS` as an event, batched sends with
//! ack accounting) would still be ours to write. `neli`,
//! `netlink-packet-core` and `netlink-sys` provide generic netlink framing
//! and sockets with no ctnetlink attribute definitions. The framing
//! ctnetlink needs is small (a 16-byte header, a 4-byte nfgenmsg, 4-byte
//! attribute headers with nesting), so this crate implements it on `libc`
//! sockets ([`wire`]), with the system calls fenced into one module (`sys`,
//! the only place with `unsafe`). Byte order follows the kernel: netlink
//! and attribute headers are host-endian, ctnetlink payloads big-endian.
//!
//! # Mapping and its limits
//!
//! conntrack → nicsync ([`from_ct`]):
//!
//! * key: the original tuple plus `CTA_ZONE`. ICMP/ICMPv6 entries are keyed
//!   by identifier (`dst_port`, `src_port` 0, as the nicsync ABI says); the
//!   type is not in the key, so only echo queries (type 8 / 128), whose
//!   reply type is known, are mapped ([`MapError::IcmpType`] otherwise).
//! * TCP state: nicsync's `TcpState` uses conntrack's values, SYN_SENT (1)
//!   to SYN_SENT2 (9), so the mapping is by value; anything else is
//!   refused. Non-TCP entries get `TcpState::None`.
//! * NAT: derived from the reply tuple. Source NAT when the reply's
//!   destination (address or port) differs from the original source,
//!   destination NAT when the reply's source differs from the original
//!   destination. nicsync's `Nat` holds one translation, so an entry with
//!   both ([`MapError::DoubleNat`]) and ICMP identifier translation
//!   ([`MapError::UnexpectedReply`]) cannot be expressed; port ranges and
//!   NAT helpers (sequence adjustment) are not carried either.
//! * flags: SEEN_REPLY, ASSURED, CONFIRMED, DYING and OFFLOAD/HW_OFFLOAD
//!   map to their `ConnFlags`; SRC_NAT/DST_NAT are set from the derived NAT
//!   so that they always agree with it. `SYNC` is nicsync's own (selective
//!   sync) and is left to the caller.
//! * timeout and mark are carried as they are; a conntrack timeout of 0
//!   (about to expire) becomes 1, because 0 means "never ages" in nicsync.
//! * not carried: `CTA_ID` (kernel-local), the direction of the last packet
//!   (ctnetlink does not report it: `Direction::Original` is used), TCP
//!   window tracking (scale, flags, sequence numbers), counters, labels,
//!   helpers, expectations, secmark. The generation is nicsync's and is 0.
//!
//! nicsync → conntrack ([`to_ct`]): the original tuple from the key, the
//! reply tuple as its inverse with the NAT translation applied, the NAT also
//! requested as `CTA_NAT_SRC`/`CTA_NAT_DST` (a one-address, one-port
//! binding, as conntrackd commits it), status ASSURED|CONFIRMED|SEEN_REPLY
//! (the kernel sets CONFIRMED itself when it inserts), the TCP state and
//! the timeout (nicsync's "never ages" becomes the longest timeout conntrack
//! can hold, [`NEVER_AGES_TIMEOUT_S`]). The kernel refuses NAT attributes
//! when it *updates* an existing entry (`EOPNOTSUPP`), so committing NATed
//! entries over existing ones needs a retry without them.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod entry;
pub mod map;
#[allow(unsafe_code)]
mod sys;
pub mod wire;

pub use client::{
    in_netns, BatchOutcome, CreateMode, CtEvent, CtSocket, EventSocket, Groups, EVENT_RCVBUF, MAX_MSGS_PER_SEND,
};
pub use entry::{encode, parse, parse_msg, status, CtEntry, Icmp, MsgKind, NatBinding, ParseError, Tuple};
pub use map::{from_ct, to_ct, MapError, Mapped, COMMIT_STATUS, NEVER_AGES_TIMEOUT_S};
pub use sys::monotonic_ns;

/// Errors of the ctnetlink sockets.
#[derive(Debug, thiserror::Error)]
pub enum CtError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// The call.
        op: &'static str,
        /// Its error.
        source: std::io::Error,
    },
    /// The kernel answered a request with an error.
    #[error("kernel refused {op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// The request.
        op: &'static str,
        /// Positive errno.
        errno: i32,
    },
    /// The kernel sent bytes that are not well-formed netlink.
    #[error("malformed netlink from the kernel: {0}")]
    Wire(wire::WireError),
    /// A dumped entry could not be parsed.
    #[error("unparsable conntrack entry: {0}")]
    Parse(ParseError),
    /// A datagram was larger than the receive buffer.
    #[error("netlink datagram of {0} bytes truncated")]
    Truncated(usize),
    /// The kernel accepted only part of a datagram.
    #[error("short send: {sent} of {len} bytes")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes offered.
        len: usize,
    },
    /// No answer within the request timeout.
    #[error("no answer from ctnetlink within the timeout")]
    Timeout,
    /// The request socket's receive buffer overran: some answers were
    /// lost, so the outcome of the last batch is unknown.
    #[error("ctnetlink answers lost (ENOBUFS on the request socket)")]
    AcksLost,
    /// Entering a network namespace failed.
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        /// The namespace file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}
