//! Connection key, state, NAT translation and record.

use bitflags::bitflags;
use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::assert_layout;

/// Address family byte of a [`ConnKey`] for IPv4.
pub const FAMILY_IPV4: u8 = 4;
/// Address family byte of a [`ConnKey`] for IPv6.
pub const FAMILY_IPV6: u8 = 6;

/// IANA protocol numbers the device knows by name (any value is accepted).
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
}

/// Connection key: the original-direction 5-tuple plus conntrack zone.
///
/// IPv4 addresses occupy the first 4 bytes of their 16-byte field; the other
/// 12 bytes must be zero so that every connection has exactly one key.
#[derive(Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnKey {
    /// Source address (original direction).
    pub src_addr: [u8; 16],
    /// Destination address (original direction).
    pub dst_addr: [u8; 16],
    /// Source port (0 for port-less protocols).
    pub src_port: U16,
    /// Destination port (ICMP: id).
    pub dst_port: U16,
    /// IANA L4 protocol number.
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Conntrack zone.
    pub zone: U16,
}
assert_layout!(
    ConnKey,
    size = 40,
    src_addr = 0,
    dst_addr = 16,
    src_port = 32,
    dst_port = 34,
    proto = 36,
    family = 37,
    zone = 38
);

/// The key's 40 bytes in one write: equal keys have equal bytes (no
/// padding), and hosts keep millions of keys in hash maps, where the
/// derived impl's twelve writes (a length before each array) cost a keyed
/// hasher more than the bytes do.
impl core::hash::Hash for ConnKey {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
    }
}

/// Why a [`ConnKey`] is not well-formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// Family byte is neither 4 nor 6.
    BadFamily(u8),
    /// An IPv4 key has non-zero bytes past the 4-byte address.
    NonCanonicalV4,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::BadFamily(b) => write!(f, "address family byte {b} is neither 4 nor 6"),
            KeyError::NonCanonicalV4 => f.write_str("IPv4 key has non-zero padding after the address"),
        }
    }
}

impl ConnKey {
    /// An IPv4 key.
    pub fn v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8, zone: u16) -> Self {
        let mut k = ConnKey {
            proto,
            family: FAMILY_IPV4,
            zone: zone.into(),
            src_port: sport.into(),
            dst_port: dport.into(),
            ..Default::default()
        };
        k.src_addr[..4].copy_from_slice(&src.octets());
        k.dst_addr[..4].copy_from_slice(&dst.octets());
        k
    }

    /// An IPv6 key.
    pub fn v6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8, zone: u16) -> Self {
        ConnKey {
            src_addr: src.octets(),
            dst_addr: dst.octets(),
            src_port: sport.into(),
            dst_port: dport.into(),
            proto,
            family: FAMILY_IPV6,
            zone: zone.into(),
        }
    }

    /// A key from generic addresses (both must be of the same family; a
    /// mixed pair is mapped to IPv6).
    pub fn new(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8, zone: u16) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Self::v4(s, sport, d, dport, proto, zone),
            (s, d) => Self::v6(to_v6(s), sport, to_v6(d), dport, proto, zone),
        }
    }

    /// Checks the family byte and the canonical IPv4 padding.
    #[inline]
    pub fn validate(&self) -> Result<(), KeyError> {
        match self.family {
            FAMILY_IPV6 => Ok(()),
            FAMILY_IPV4 => {
                if v4_padding(&self.src_addr) | v4_padding(&self.dst_addr) == 0 {
                    Ok(())
                } else {
                    Err(KeyError::NonCanonicalV4)
                }
            }
            other => Err(KeyError::BadFamily(other)),
        }
    }

    /// The key as five little-endian words (for hashing and comparing).
    #[inline]
    pub fn words(&self) -> [u64; 5] {
        zerocopy::transmute!(*self)
    }

    /// Source address, if the family byte is valid.
    pub fn src_ip(&self) -> Option<IpAddr> {
        addr(self.family, &self.src_addr)
    }

    /// Destination address, if the family byte is valid.
    pub fn dst_ip(&self) -> Option<IpAddr> {
        addr(self.family, &self.dst_addr)
    }
}

/// Bytes 4..16 of an address field, OR-ed together as words (0 when the
/// IPv4 padding is canonical).
#[inline]
fn v4_padding(a: &[u8; 16]) -> u64 {
    let w: [u32; 4] = zerocopy::transmute!(*a);
    (w[1] | w[2] | w[3]) as u64
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn addr(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_IPV4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        FAMILY_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

impl fmt::Debug for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::ICMP => "icmp",
            proto::ICMPV6 => "icmpv6",
            proto::SCTP => "sctp",
            _ => "proto",
        };
        if name == "proto" {
            write!(f, "proto{} ", self.proto)?;
        } else {
            write!(f, "{name} ")?;
        }
        match (self.src_ip(), self.dst_ip()) {
            (Some(IpAddr::V6(s)), Some(IpAddr::V6(d))) => {
                write!(f, "[{s}]:{} -> [{d}]:{}", self.src_port.get(), self.dst_port.get())?
            }
            (Some(s), Some(d)) => write!(f, "{s}:{} -> {d}:{}", self.src_port.get(), self.dst_port.get())?,
            _ => write!(f, "<family {}>", self.family)?,
        }
        if self.zone.get() != 0 {
            write!(f, " zone {}", self.zone.get())?;
        }
        Ok(())
    }
}

/// TCP connection-tracking state (values as in Linux conntrack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    /// No TCP state (non-TCP protocols).
    None = 0,
    /// SYN sent.
    SynSent = 1,
    /// SYN received.
    SynRecv = 2,
    /// Established.
    Established = 3,
    /// FIN wait.
    FinWait = 4,
    /// Close wait.
    CloseWait = 5,
    /// Last ACK.
    LastAck = 6,
    /// Time wait.
    TimeWait = 7,
    /// Closed.
    Close = 8,
    /// Simultaneous open.
    SynSent2 = 9,
}

impl TcpState {
    /// Every state, by value.
    pub const ALL: [TcpState; 10] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::SynSent2,
    ];

    /// Decodes a wire byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        Self::ALL.get(b as usize).copied()
    }

    /// Lower-case name as conntrack prints it.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::None => "none",
            TcpState::SynSent => "syn_sent",
            TcpState::SynRecv => "syn_recv",
            TcpState::Established => "established",
            TcpState::FinWait => "fin_wait",
            TcpState::CloseWait => "close_wait",
            TcpState::LastAck => "last_ack",
            TcpState::TimeWait => "time_wait",
            TcpState::Close => "close",
            TcpState::SynSent2 => "syn_sent2",
        }
    }
}

/// Direction of the packet that last changed the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    /// Original direction (initiator to responder).
    Original = 0,
    /// Reply direction.
    Reply = 1,
}

impl Direction {
    /// Decodes a wire byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            0 => Some(Direction::Original),
            1 => Some(Direction::Reply),
            _ => None,
        }
    }
}

bitflags! {
    /// Connection flags ([`ConnState::flags`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ConnFlags: u16 {
        /// Traffic seen in both directions.
        const SEEN_REPLY = 1 << 0;
        /// Assured: will not be dropped early under pressure.
        const ASSURED = 1 << 1;
        /// Confirmed: committed to the table.
        const CONFIRMED = 1 << 2;
        /// Source NAT applies (translation in the NAT part).
        const SRC_NAT = 1 << 3;
        /// Destination NAT applies.
        const DST_NAT = 1 << 4;
        /// Changes to this entry are synchronised to the cluster.
        const SYNC = 1 << 5;
        /// Offloaded: the data path forwards it in hardware.
        const OFFLOAD = 1 << 6;
        /// Being torn down.
        const DYING = 1 << 7;
    }
}

/// Connection state as carried in descriptors, events and records.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnState {
    /// [`TcpState`] byte.
    pub tcp_state: u8,
    /// [`Direction`] byte.
    pub direction: u8,
    /// [`ConnFlags`] bits.
    pub flags: U16,
    /// Seconds until the entry expires (commands: from now; records: what
    /// remains). 0 means "never ages".
    pub timeout_s: U32,
    /// Firewall mark.
    pub mark: U32,
    /// Per-connection generation; an update carrying an older generation
    /// than the stored one is refused as stale (conflict resolution).
    pub generation: U32,
}
assert_layout!(ConnState, size = 16, tcp_state = 0, direction = 1, flags = 2, timeout_s = 4, mark = 8, generation = 12);

/// Why a [`ConnState`] or [`Nat`] is not well-formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Unknown TCP state byte.
    BadTcpState(u8),
    /// Unknown direction byte.
    BadDirection(u8),
    /// Undefined flag bits set.
    BadFlags(u16),
    /// Unknown NAT kind byte.
    BadNatKind(u8),
    /// NAT address family does not match the key's.
    NatFamilyMismatch,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::BadTcpState(b) => write!(f, "unknown TCP state {b}"),
            StateError::BadDirection(b) => write!(f, "unknown direction {b}"),
            StateError::BadFlags(b) => write!(f, "undefined connection flag bits {b:#06x}"),
            StateError::BadNatKind(b) => write!(f, "unknown NAT kind {b}"),
            StateError::NatFamilyMismatch => f.write_str("NAT address family differs from the key's"),
        }
    }
}

impl ConnState {
    /// A state with the given fields and generation 0.
    pub fn new(tcp: TcpState, dir: Direction, flags: ConnFlags, timeout_s: u32, mark: u32) -> Self {
        ConnState {
            tcp_state: tcp as u8,
            direction: dir as u8,
            flags: flags.bits().into(),
            timeout_s: timeout_s.into(),
            mark: mark.into(),
            generation: 0.into(),
        }
    }

    /// Checks every enumerated field.
    pub fn validate(&self) -> Result<(), StateError> {
        TcpState::from_wire(self.tcp_state).ok_or(StateError::BadTcpState(self.tcp_state))?;
        Direction::from_wire(self.direction).ok_or(StateError::BadDirection(self.direction))?;
        ConnFlags::from_bits(self.flags.get()).ok_or(StateError::BadFlags(self.flags.get()))?;
        Ok(())
    }

    /// The TCP state, if valid.
    pub fn tcp(&self) -> Option<TcpState> {
        TcpState::from_wire(self.tcp_state)
    }

    /// The flags, with undefined bits dropped.
    pub fn conn_flags(&self) -> ConnFlags {
        ConnFlags::from_bits_truncate(self.flags.get())
    }
}

/// NAT translation kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NatKind {
    /// No translation.
    None = 0,
    /// Source address/port rewritten to the translation.
    Source = 1,
    /// Destination address/port rewritten to the translation.
    Destination = 2,
}

impl NatKind {
    /// Decodes a wire byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            0 => Some(NatKind::None),
            1 => Some(NatKind::Source),
            2 => Some(NatKind::Destination),
            _ => None,
        }
    }

    /// Lower-case name (`none`, `source`, `destination`).
    pub const fn name(self) -> &'static str {
        match self {
            NatKind::None => "none",
            NatKind::Source => "source",
            NatKind::Destination => "destination",
        }
    }
}

/// NAT translation of a connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Nat {
    /// Translated address (IPv4 in the first 4 bytes, rest zero).
    pub addr: [u8; 16],
    /// Translated port.
    pub port: U16,
    /// [`NatKind`] byte.
    pub kind: u8,
    /// Address family of `addr` ([`FAMILY_IPV4`]/[`FAMILY_IPV6`]), 0 when kind is None.
    pub family: u8,
    /// Reserved, zero.
    pub reserved: [u8; 4],
}
assert_layout!(Nat, size = 24, addr = 0, port = 16, kind = 18, family = 19, reserved = 20);

impl Nat {
    /// A translation to `addr:port`.
    pub fn new(kind: NatKind, addr: IpAddr, port: u16) -> Self {
        let mut n = Nat { kind: kind as u8, port: port.into(), ..Default::default() };
        match addr {
            IpAddr::V4(a) => {
                n.family = FAMILY_IPV4;
                n.addr[..4].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                n.family = FAMILY_IPV6;
                n.addr = a.octets();
            }
        }
        n
    }

    /// The translation kind, if valid.
    pub fn nat_kind(&self) -> Option<NatKind> {
        NatKind::from_wire(self.kind)
    }

    /// The translated address, if any.
    pub fn ip(&self) -> Option<IpAddr> {
        addr(self.family, &self.addr)
    }

    /// Checks the kind and that the family matches the key's.
    pub fn validate(&self, key_family: u8) -> Result<(), StateError> {
        match NatKind::from_wire(self.kind) {
            None => Err(StateError::BadNatKind(self.kind)),
            Some(NatKind::None) => Ok(()),
            Some(_) if self.family != key_family => Err(StateError::NatFamilyMismatch),
            Some(_) if self.family == FAMILY_IPV4 && self.addr[4..].iter().any(|b| *b != 0) => {
                Err(StateError::NatFamilyMismatch)
            }
            Some(_) => Ok(()),
        }
    }
}

/// A whole connection entry as the device writes it into host memory
/// (LOOKUP result, SNAPSHOT chunk element).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnRecord {
    /// The key.
    pub key: ConnKey,
    /// The state; `timeout_s` holds the seconds that remain.
    pub state: ConnState,
    /// The NAT translation (kind None if there is none).
    pub nat: Nat,
}
assert_layout!(ConnRecord, size = 80, key = 0, state = 40, nat = 56);

impl ConnRecord {
    /// Validates every part, as a host must before trusting a record the
    /// device wrote.
    pub fn validate(&self) -> Result<(), RecordError> {
        self.key.validate().map_err(RecordError::Key)?;
        self.state.validate().map_err(RecordError::State)?;
        self.nat.validate(self.key.family).map_err(RecordError::State)?;
        Ok(())
    }
}

/// Why a [`ConnRecord`] is not well-formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The key is malformed.
    Key(KeyError),
    /// The state or NAT part is malformed.
    State(StateError),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Key(e) => write!(f, "key: {e}"),
            RecordError::State(e) => write!(f, "state: {e}"),
        }
    }
}
