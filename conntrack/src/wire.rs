//! Netlink, nfnetlink and ctnetlink framing: constants, checked views over
//! received bytes and a builder for requests.
//!
//! Byte order: netlink message headers and attribute headers are in host
//! order; ctnetlink attribute *payloads* (u16/u32 values, ports, addresses)
//! are big-endian, as ctnetlink has always encoded them.

use thiserror::Error;

/// `struct nlmsghdr` size.
pub const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg` size.
pub const NFGENMSG_LEN: usize = 4;
/// `struct nlattr` header size.
pub const NLA_HDRLEN: usize = 4;

/// Netlink control message types.
pub const NLMSG_NOOP: u16 = 1;
/// An error or an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// End of a multi-part (dump) reply.
pub const NLMSG_DONE: u16 = 3;
/// Data lost.
pub const NLMSG_OVERRUN: u16 = 4;

/// Netlink message flags.
pub const NLM_F_REQUEST: u16 = 0x1;
/// Part of a multi-part reply.
pub const NLM_F_MULTI: u16 = 0x2;
/// Ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 0x4;
/// Dump the whole table (ROOT|MATCH).
pub const NLM_F_DUMP: u16 = 0x300;
/// Replace an existing entry.
pub const NLM_F_REPLACE: u16 = 0x100;
/// Do not touch an existing entry.
pub const NLM_F_EXCL: u16 = 0x200;
/// Create the entry if it does not exist.
pub const NLM_F_CREATE: u16 = 0x400;

/// Attribute type bit: payload is nested attributes.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// Attribute type bit: payload is in network byte order.
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// Mask of the attribute type proper.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// nfnetlink subsystem id of ctnetlink.
pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;
/// nfnetlink version byte.
pub const NFNETLINK_V0: u8 = 0;

/// ctnetlink message types (low byte of `nlmsg_type`).
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
/// Get one entry, or dump the table.
pub const IPCTNL_MSG_CT_GET: u8 = 1;
/// Delete one entry, or flush the table.
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;

/// Multicast groups (bit `n - 1` of `nl_groups`).
pub const NFNLGRP_CONNTRACK_NEW: u32 = 1;
/// Updates of existing entries.
pub const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
/// Destroyed entries.
pub const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

/// Top-level ctnetlink attributes (`enum ctattr_type`).
#[allow(missing_docs)] // names as in linux/netfilter/nfnetlink_conntrack.h
pub mod cta {
    pub const TUPLE_ORIG: u16 = 1;
    pub const TUPLE_REPLY: u16 = 2;
    pub const STATUS: u16 = 3;
    pub const PROTOINFO: u16 = 4;
    pub const NAT_SRC: u16 = 6;
    pub const TIMEOUT: u16 = 7;
    pub const MARK: u16 = 8;
    pub const ID: u16 = 12;
    pub const NAT_DST: u16 = 13;
    pub const ZONE: u16 = 18;

    /// `enum ctattr_tuple`.
    pub const TUPLE_IP: u16 = 1;
    pub const TUPLE_PROTO: u16 = 2;
    pub const TUPLE_ZONE: u16 = 3;

    /// `enum ctattr_ip`.
    pub const IP_V4_SRC: u16 = 1;
    pub const IP_V4_DST: u16 = 2;
    pub const IP_V6_SRC: u16 = 3;
    pub const IP_V6_DST: u16 = 4;

    /// `enum ctattr_l4proto`.
    pub const PROTO_NUM: u16 = 1;
    pub const PROTO_SRC_PORT: u16 = 2;
    pub const PROTO_DST_PORT: u16 = 3;
    pub const PROTO_ICMP_ID: u16 = 4;
    pub const PROTO_ICMP_TYPE: u16 = 5;
    pub const PROTO_ICMP_CODE: u16 = 6;
    pub const PROTO_ICMPV6_ID: u16 = 7;
    pub const PROTO_ICMPV6_TYPE: u16 = 8;
    pub const PROTO_ICMPV6_CODE: u16 = 9;

    /// `enum ctattr_protoinfo` / `enum ctattr_protoinfo_tcp`.
    pub const PROTOINFO_TCP: u16 = 1;
    pub const PROTOINFO_TCP_STATE: u16 = 1;

    /// `enum ctattr_nat` / `enum ctattr_protonat`.
    pub const NAT_V4_MINIP: u16 = 1;
    pub const NAT_V4_MAXIP: u16 = 2;
    pub const NAT_PROTO: u16 = 3;
    pub const NAT_V6_MINIP: u16 = 4;
    pub const NAT_V6_MAXIP: u16 = 5;
    pub const PROTONAT_PORT_MIN: u16 = 1;
    pub const PROTONAT_PORT_MAX: u16 = 2;
}

/// Why received bytes are not a well-formed netlink message or attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than a header needs.
    #[error("truncated {what}: {have} bytes, need {need}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A length field points outside the buffer or below the header size.
    #[error("bad {what} length {len} (buffer {have})")]
    BadLength {
        /// What was being read.
        what: &'static str,
        /// The length field.
        len: usize,
        /// Bytes available.
        have: usize,
    },
    /// An attribute payload has the wrong size for its type.
    #[error("attribute {attr} has {len} payload bytes, expected {expected}")]
    AttrSize {
        /// Attribute type.
        attr: u16,
        /// Payload length.
        len: usize,
        /// Expected length.
        expected: usize,
    },
    /// Nesting deeper than any ctnetlink message uses.
    #[error("attributes nested too deep")]
    TooDeep,
}

/// Rounds up to the 4-byte netlink alignment.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A checked view of one netlink message.
#[derive(Debug, Clone, Copy)]
pub struct NlMsg<'a> {
    /// `nlmsg_type`.
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub pid: u32,
    /// Payload after the 16-byte header.
    pub payload: &'a [u8],
}

fn u16_ne(b: &[u8], at: usize) -> u16 {
    // Callers check the bounds; a short read yields 0 instead of a panic.
    match b.get(at..at + 2) {
        Some(s) => u16::from_ne_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(s) => u32::from_ne_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

/// Iterator over the netlink messages of one datagram.
#[derive(Debug, Clone)]
pub struct NlMsgs<'a> {
    rest: &'a [u8],
}

impl<'a> NlMsgs<'a> {
    /// Messages in `buf` (one `recv`).
    pub fn new(buf: &'a [u8]) -> Self {
        NlMsgs { rest: buf }
    }
}

impl<'a> Iterator for NlMsgs<'a> {
    type Item = Result<NlMsg<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let have = self.rest.len();
        if have < NLMSG_HDRLEN {
            self.rest = &[];
            return Some(Err(WireError::Truncated { what: "nlmsghdr", have, need: NLMSG_HDRLEN }));
        }
        let len = u32_ne(self.rest, 0) as usize;
        if len < NLMSG_HDRLEN || len > have {
            self.rest = &[];
            return Some(Err(WireError::BadLength { what: "nlmsg", len, have }));
        }
        let msg = NlMsg {
            ty: u16_ne(self.rest, 4),
            flags: u16_ne(self.rest, 6),
            seq: u32_ne(self.rest, 8),
            pid: u32_ne(self.rest, 12),
            payload: &self.rest[NLMSG_HDRLEN..len],
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    }
}

/// The errno of an `NLMSG_ERROR` payload (0 = acknowledgement), negated to
/// a positive errno.
pub fn error_code(payload: &[u8]) -> Result<i32, WireError> {
    if payload.len() < 4 {
        return Err(WireError::Truncated { what: "nlmsgerr", have: payload.len(), need: 4 });
    }
    let e = u32_ne(payload, 0) as i32;
    Ok(e.checked_neg().unwrap_or(i32::MAX))
}

/// A checked view of one attribute.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    /// Type with the NESTED/NET_BYTEORDER bits masked off.
    pub ty: u16,
    /// Payload (without padding).
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    /// Nested attributes inside this one.
    pub fn nested(&self) -> Attrs<'a> {
        Attrs::new(self.payload)
    }

    fn exact<const N: usize>(&self) -> Result<[u8; N], WireError> {
        self.payload.try_into().map_err(|_| WireError::AttrSize { attr: self.ty, len: self.payload.len(), expected: N })
    }

    /// A u8 payload.
    pub fn u8(&self) -> Result<u8, WireError> {
        Ok(self.exact::<1>()?[0])
    }

    /// A big-endian u16 payload.
    pub fn be16(&self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.exact()?))
    }

    /// A big-endian u32 payload.
    pub fn be32(&self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.exact()?))
    }

    /// A 4-byte address payload.
    pub fn v4(&self) -> Result<[u8; 4], WireError> {
        self.exact()
    }

    /// A 16-byte address payload.
    pub fn v6(&self) -> Result<[u8; 16], WireError> {
        self.exact()
    }
}

/// Iterator over a run of attributes.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    /// Attributes in `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Attrs { rest: buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let have = self.rest.len();
        if have < NLA_HDRLEN {
            self.rest = &[];
            return Some(Err(WireError::Truncated { what: "nlattr", have, need: NLA_HDRLEN }));
        }
        let len = u16_ne(self.rest, 0) as usize;
        if len < NLA_HDRLEN || len > have {
            self.rest = &[];
            return Some(Err(WireError::BadLength { what: "nlattr", len, have }));
        }
        let attr = Attr { ty: u16_ne(self.rest, 2) & NLA_TYPE_MASK, payload: &self.rest[NLA_HDRLEN..len] };
        // The last attribute may omit its padding.
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(attr))
    }
}

/// Builds a buffer of netlink requests (several per `sendmsg`).
#[derive(Debug, Default)]
pub struct MsgBuf {
    buf: Vec<u8>,
    /// Start of the message being built.
    msg_start: usize,
    /// Starts of the open nests.
    nests: Vec<usize>,
}

impl MsgBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes built so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Bytes built so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing has been built.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.nests.clear();
        self.msg_start = 0;
    }

    /// Starts a ctnetlink message with its nfgenmsg header.
    pub fn begin(&mut self, msg: u8, flags: u16, seq: u32, family: u8) {
        self.msg_start = self.buf.len();
        let ty = (u16::from(NFNL_SUBSYS_CTNETLINK) << 8) | u16::from(msg);
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in end()
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // pid 0: to the kernel
        self.buf.extend_from_slice(&[family, NFNETLINK_V0, 0, 0]);
    }

    /// Finishes the message started by [`MsgBuf::begin`].
    pub fn end(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Appends a raw attribute.
    pub fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = (NLA_HDRLEN + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    /// A u8 attribute.
    pub fn u8(&mut self, ty: u16, v: u8) {
        self.attr(ty, &[v]);
    }

    /// A big-endian u16 attribute.
    pub fn be16(&mut self, ty: u16, v: u16) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// A big-endian u32 attribute.
    pub fn be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// Opens a nested attribute; close it with [`MsgBuf::nest_end`].
    pub fn nest(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    /// Closes the innermost open nest.
    pub fn nest_end(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn pad(&mut self) {
        let padded = align4(self.buf.len());
        self.buf.resize(padded, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_reject_lengths_past_the_buffer() {
        // len 12 but only 8 bytes.
        let b = [12u8, 0, 1, 0, 0, 0, 0, 0];
        let v: Vec<_> = Attrs::new(&b).collect();
        assert!(matches!(v.as_slice(), [Err(WireError::BadLength { len: 12, have: 8, .. })]));
        // len below the header size.
        let b = [2u8, 0, 1, 0];
        assert!(matches!(Attrs::new(&b).next(), Some(Err(WireError::BadLength { .. }))));
    }

    #[test]
    fn last_attribute_may_omit_padding_and_flags_are_masked() {
        let mut b = vec![5u8, 0];
        b.extend_from_slice(&(7u16 | NLA_F_NESTED | NLA_F_NET_BYTEORDER).to_ne_bytes());
        b.push(9);
        let v: Vec<_> = Attrs::new(&b).collect::<Result<_, _>>().unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ty, 7);
        assert_eq!(v[0].u8().unwrap(), 9);
    }

    #[test]
    fn builder_patches_lengths_and_nests() {
        let mut m = MsgBuf::new();
        m.begin(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, 7, 2);
        m.nest(cta::TUPLE_ORIG);
        m.be16(cta::PROTO_SRC_PORT, 0x1234);
        m.nest_end();
        m.end();
        let msgs: Vec<_> = NlMsgs::new(m.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].ty, 0x0101);
        assert_eq!(msgs[0].seq, 7);
        let outer: Vec<_> = Attrs::new(&msgs[0].payload[NFGENMSG_LEN..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(outer[0].ty, cta::TUPLE_ORIG);
        let inner: Vec<_> = outer[0].nested().collect::<Result<_, _>>().unwrap();
        assert_eq!(inner[0].be16().unwrap(), 0x1234);
    }

    #[test]
    fn truncated_message_header_is_an_error() {
        let b = [20u8, 0, 0, 0, 1, 0];
        assert!(matches!(NlMsgs::new(&b).next(), Some(Err(WireError::Truncated { .. }))));
    }
}
