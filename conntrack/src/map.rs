//! Mapping between [`CtEntry`] and nicsync's connection record
//! ([`ConnKey`], [`ConnState`], [`Nat`]).

use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, NatKind, TcpState};
use thiserror::Error;

use crate::entry::{status, CtEntry, Icmp, NatBinding, Tuple};

/// Timeout sent to the kernel for a nicsync record that never ages
/// (`timeout_s == 0`): the kernel clamps `timeout * HZ` to `INT_MAX`
/// jiffies, so this is "as long as conntrack can express".
pub const NEVER_AGES_TIMEOUT_S: u32 = u32::MAX;

/// Status a committed entry carries (what conntrackd's commit sets).
pub const COMMIT_STATUS: u32 = status::ASSURED | status::CONFIRMED | status::SEEN_REPLY;

/// Why an entry cannot be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MapError {
    /// The original and reply tuples are of different address families, or
    /// the two addresses of a tuple are.
    #[error("address families of the tuples differ")]
    Family,
    /// Both source and destination are translated: nicsync's [`Nat`] holds
    /// one translation.
    #[error("both source and destination NAT: not expressible as one nicsync Nat")]
    DoubleNat,
    /// The protocol or ICMP identifier differs between the tuples in a way
    /// that is not address/port NAT.
    #[error("reply tuple is not the inverse of the original modulo address/port NAT")]
    UnexpectedReply,
    /// ICMP entry of a type whose reply type is unknown: nicsync keys ICMP
    /// by identifier only, so the type could not be reconstructed.
    #[error("ICMP type {0} cannot be keyed (only echo queries are)")]
    IcmpType(u8),
    /// A TCP state byte that conntrack does not store in its table.
    #[error("unknown TCP conntrack state {0}")]
    TcpState(u8),
    /// The nicsync record is malformed.
    #[error("malformed nicsync record: {0}")]
    Record(&'static str),
}

/// A nicsync connection as the mapping produces and takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// The key (original tuple and zone).
    pub key: ConnKey,
    /// The state (generation 0, direction Original: see the crate docs).
    pub state: ConnState,
    /// The translation (kind None if the reply tuple is the plain inverse).
    pub nat: Nat,
}

fn is_icmp(p: u8) -> bool {
    p == proto::ICMP || p == proto::ICMPV6
}

fn echo_request(p: u8) -> u8 {
    if p == proto::ICMPV6 {
        128
    } else {
        8
    }
}

/// Maps a conntrack entry onto a nicsync key, state and NAT.
pub fn from_ct(e: &CtEntry) -> Result<Mapped, MapError> {
    let fam = e.orig.family().ok_or(MapError::Family)?;
    if e.reply.family() != Some(fam) {
        return Err(MapError::Family);
    }
    let o = &e.orig;
    let r = &e.reply;
    if r.proto != o.proto {
        return Err(MapError::UnexpectedReply);
    }
    let (sport, dport) = if is_icmp(o.proto) {
        let i = o.icmp.unwrap_or(Icmp { id: 0, ty: echo_request(o.proto), code: 0 });
        if i.ty != echo_request(o.proto) {
            return Err(MapError::IcmpType(i.ty));
        }
        if r.icmp.map(|x| x.id) != Some(i.id) {
            // ICMP id translation has no place in nicsync's Nat.
            return Err(MapError::UnexpectedReply);
        }
        (0, i.id)
    } else {
        (o.src_port, o.dst_port)
    };
    let key = ConnKey::new(o.src, sport, o.dst, dport, o.proto, e.zone);

    // SNAT rewrites the source, so replies come back to the translated
    // address: reply.dst != orig.src. DNAT: reply.src != orig.dst.
    let ports = !is_icmp(o.proto);
    let snat = r.dst != o.src || (ports && r.dst_port != o.src_port);
    let dnat = r.src != o.dst || (ports && r.src_port != o.dst_port);
    let nat = match (snat, dnat) {
        (false, false) => Nat::default(),
        (true, false) => Nat::new(NatKind::Source, r.dst, if ports { r.dst_port } else { 0 }),
        (false, true) => Nat::new(NatKind::Destination, r.src, if ports { r.src_port } else { 0 }),
        (true, true) => return Err(MapError::DoubleNat),
    };

    let tcp = match e.tcp_state {
        Some(s) if o.proto == proto::TCP => TcpState::from_wire(s).ok_or(MapError::TcpState(s))?,
        _ => TcpState::None,
    };
    let mut flags = ConnFlags::empty();
    for (ct, f) in [
        (status::SEEN_REPLY, ConnFlags::SEEN_REPLY),
        (status::ASSURED, ConnFlags::ASSURED),
        (status::CONFIRMED, ConnFlags::CONFIRMED),
        (status::OFFLOAD | status::HW_OFFLOAD, ConnFlags::OFFLOAD),
        (status::DYING, ConnFlags::DYING),
    ] {
        if e.status & ct != 0 {
            flags |= f;
        }
    }
    // From the tuples, not the status bits, so that the flags always agree
    // with `nat`.
    if snat {
        flags |= ConnFlags::SRC_NAT;
    }
    if dnat {
        flags |= ConnFlags::DST_NAT;
    }
    // conntrack reports 0 for an entry about to expire; nicsync's 0 means
    // "never ages".
    let timeout = match e.timeout_s {
        Some(0) | None => 1,
        Some(t) => t,
    };
    let state = ConnState::new(tcp, Direction::Original, flags, timeout, e.mark);
    Ok(Mapped { key, state, nat })
}

/// Builds the conntrack entry that commits a nicsync connection into the
/// kernel (CT_NEW): both tuples, NAT applied to the reply tuple and
/// requested as a CTA_NAT binding, status [`COMMIT_STATUS`], the timeout.
pub fn to_ct(key: &ConnKey, state: &ConnState, nat: &Nat) -> Result<CtEntry, MapError> {
    key.validate().map_err(|_| MapError::Record("key"))?;
    state.validate().map_err(|_| MapError::Record("state"))?;
    nat.validate(key.family).map_err(|_| MapError::Record("nat"))?;
    let (Some(src), Some(dst)) = (key.src_ip(), key.dst_ip()) else { return Err(MapError::Record("key family")) };
    let p = key.proto;
    let orig = if is_icmp(p) {
        Tuple {
            src,
            dst,
            proto: p,
            src_port: 0,
            dst_port: 0,
            icmp: Some(Icmp { id: key.dst_port.get(), ty: echo_request(p), code: 0 }),
        }
    } else {
        Tuple { src, dst, proto: p, src_port: key.src_port.get(), dst_port: key.dst_port.get(), icmp: None }
    };
    let mut reply = orig.inverted();
    let ports = crate::entry::has_ports(p);
    let mut e = CtEntry {
        orig,
        reply,
        tcp_state: None,
        timeout_s: Some(match state.timeout_s.get() {
            0 => NEVER_AGES_TIMEOUT_S,
            t => t,
        }),
        status: COMMIT_STATUS,
        mark: state.mark.get(),
        zone: key.zone.get(),
        id: None,
        nat_src: None,
        nat_dst: None,
    };
    if let (Some(kind), Some(addr)) = (nat.nat_kind(), nat.ip()) {
        let port = nat.port.get();
        let binding = NatBinding { addr, port: ports.then_some(port) };
        match kind {
            NatKind::None => {}
            NatKind::Source => {
                reply.dst = addr;
                if ports {
                    reply.dst_port = port;
                }
                e.status |= status::SRC_NAT;
                e.nat_src = Some(binding);
            }
            NatKind::Destination => {
                reply.src = addr;
                if ports {
                    reply.src_port = port;
                }
                e.status |= status::DST_NAT;
                e.nat_dst = Some(binding);
            }
        }
    }
    e.reply = reply;
    if p == proto::TCP {
        let s = state.tcp().ok_or(MapError::Record("tcp state"))?;
        e.tcp_state = Some(s as u8);
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{CtEntry, Tuple};

    fn tuple(src: &str, sp: u16, dst: &str, dp: u16, p: u8) -> Tuple {
        Tuple { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto: p, src_port: sp, dst_port: dp, icmp: None }
    }

    fn entry(orig: Tuple, reply: Tuple) -> CtEntry {
        CtEntry {
            orig,
            reply,
            tcp_state: Some(3),
            timeout_s: Some(300),
            status: status::ASSURED | status::CONFIRMED | status::SEEN_REPLY,
            mark: 42,
            zone: 3,
            id: Some(1),
            nat_src: None,
            nat_dst: None,
        }
    }

    #[test]
    fn plain_tcp_maps_key_state_and_no_nat() {
        let o = tuple("10.0.0.1", 1234, "10.0.0.2", 80, 6);
        let m = from_ct(&entry(o, o.inverted())).unwrap();
        assert_eq!(m.key, ConnKey::v4([10, 0, 0, 1].into(), 1234, [10, 0, 0, 2].into(), 80, 6, 3));
        assert_eq!(m.state.tcp(), Some(TcpState::Established));
        assert_eq!(m.state.conn_flags(), ConnFlags::ASSURED | ConnFlags::CONFIRMED | ConnFlags::SEEN_REPLY);
        assert_eq!((m.state.timeout_s.get(), m.state.mark.get()), (300, 42));
        assert_eq!(m.nat.nat_kind(), Some(NatKind::None));
    }

    #[test]
    fn every_conntrack_tcp_state_maps_by_value() {
        let o = tuple("10.0.0.1", 1, "10.0.0.2", 2, 6);
        for (ct, want) in [
            (1, TcpState::SynSent),
            (2, TcpState::SynRecv),
            (3, TcpState::Established),
            (4, TcpState::FinWait),
            (5, TcpState::CloseWait),
            (6, TcpState::LastAck),
            (7, TcpState::TimeWait),
            (8, TcpState::Close),
            (9, TcpState::SynSent2),
        ] {
            let mut e = entry(o, o.inverted());
            e.tcp_state = Some(ct);
            assert_eq!(from_ct(&e).unwrap().state.tcp(), Some(want));
        }
        let mut e = entry(o, o.inverted());
        e.tcp_state = Some(10);
        assert_eq!(from_ct(&e), Err(MapError::TcpState(10)));
    }

    #[test]
    fn snat_and_dnat_are_derived_from_the_reply_tuple() {
        let o = tuple("10.0.0.1", 1234, "192.0.2.1", 80, 6);
        let snat = tuple("192.0.2.1", 80, "203.0.113.5", 61000, 6);
        let m = from_ct(&entry(o, snat)).unwrap();
        assert_eq!(m.nat, Nat::new(NatKind::Source, "203.0.113.5".parse().unwrap(), 61000));
        assert!(m.state.conn_flags().contains(ConnFlags::SRC_NAT));

        let dnat = tuple("172.16.0.9", 8080, "10.0.0.1", 1234, 6);
        let m = from_ct(&entry(o, dnat)).unwrap();
        assert_eq!(m.nat, Nat::new(NatKind::Destination, "172.16.0.9".parse().unwrap(), 8080));
        assert!(m.state.conn_flags().contains(ConnFlags::DST_NAT));

        let both = tuple("172.16.0.9", 8080, "203.0.113.5", 61000, 6);
        assert_eq!(from_ct(&entry(o, both)), Err(MapError::DoubleNat));
    }

    #[test]
    fn round_trip_through_nicsync_preserves_the_entry() {
        let o = tuple("10.0.0.1", 1234, "192.0.2.1", 80, 6);
        for reply in [
            o.inverted(),
            tuple("192.0.2.1", 80, "203.0.113.5", 61000, 6),
            tuple("172.16.0.9", 8080, "10.0.0.1", 1234, 6),
        ] {
            let e = entry(o, reply);
            let m = from_ct(&e).unwrap();
            let back = to_ct(&m.key, &m.state, &m.nat).unwrap();
            assert_eq!((back.orig, back.reply), (e.orig, e.reply));
            assert_eq!((back.tcp_state, back.timeout_s, back.mark, back.zone), (Some(3), Some(300), 42, 3));
            assert_eq!(back.status & COMMIT_STATUS, COMMIT_STATUS);
            assert_eq!(from_ct(&back).unwrap(), m);
        }
    }

    #[test]
    fn to_ct_requests_the_nat_binding() {
        let key = ConnKey::v4([10, 0, 0, 1].into(), 5000, [192, 0, 2, 1].into(), 53, proto::UDP, 0);
        let state = ConnState::new(TcpState::None, Direction::Original, ConnFlags::ASSURED, 0, 0);
        let nat = Nat::new(NatKind::Source, "203.0.113.5".parse().unwrap(), 40000);
        let e = to_ct(&key, &state, &nat).unwrap();
        assert_eq!(e.nat_src, Some(NatBinding { addr: "203.0.113.5".parse().unwrap(), port: Some(40000) }));
        assert_eq!(e.nat_dst, None);
        assert_eq!(e.status & status::SRC_NAT, status::SRC_NAT);
        assert_eq!(e.tcp_state, None);
        assert_eq!(e.timeout_s, Some(NEVER_AGES_TIMEOUT_S));
        assert_eq!(e.reply, tuple("192.0.2.1", 53, "203.0.113.5", 40000, 17));
    }

    #[test]
    fn icmp_echo_is_keyed_by_id_and_other_types_are_refused() {
        let mut o = tuple("2001:db8::1", 0, "2001:db8::2", 0, proto::ICMPV6);
        o.icmp = Some(Icmp { id: 99, ty: 128, code: 0 });
        let m = from_ct(&entry(o, o.inverted())).unwrap();
        assert_eq!((m.key.src_port.get(), m.key.dst_port.get(), m.key.family), (0, 99, 6));
        assert_eq!(m.state.tcp(), Some(TcpState::None));
        let back = to_ct(&m.key, &m.state, &m.nat).unwrap();
        assert_eq!((back.orig, back.reply), (o, o.inverted()));

        o.icmp = Some(Icmp { id: 99, ty: 3, code: 1 });
        assert_eq!(from_ct(&entry(o, o.inverted())), Err(MapError::IcmpType(3)));
    }

    #[test]
    fn expiring_entry_does_not_become_never_aging_and_family_mix_is_refused() {
        let o = tuple("10.0.0.1", 1, "10.0.0.2", 2, 17);
        let mut e = entry(o, o.inverted());
        e.timeout_s = Some(0);
        assert_eq!(from_ct(&e).unwrap().state.timeout_s.get(), 1);
        e.reply = tuple("2001:db8::2", 2, "2001:db8::1", 1, 17);
        assert_eq!(from_ct(&e), Err(MapError::Family));
    }

    #[test]
    fn malformed_record_is_refused() {
        let mut key = ConnKey::v4([10, 0, 0, 1].into(), 1, [10, 0, 0, 2].into(), 2, 6, 0);
        key.family = 9;
        let state = ConnState::default();
        assert_eq!(to_ct(&key, &state, &Nat::default()), Err(MapError::Record("key")));
    }
}
