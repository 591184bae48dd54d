//! The host's half of sync security: sealed membership datagrams and sealed
//! Full Sync streams (the device seals Delta Sync itself, see
//! `nicsync_model::seal_port`).
//!
//! A [`NodeSecurity`] sits between a [`crate::node::Node`] and its driver:
//! membership datagrams are sealed on the way out and opened on the way in
//! (with a replay window per peer), and every Full Sync stream runs through
//! a [`SecureChannel`]. What fails is dropped (a stream is closed) and
//! counted in [`SecurityStats`].

use std::collections::HashMap;

use nicsync_fwif::seal::SEAL_OVERHEAD;
use nicsync_model::seal_port::SealConfig;
use nicsync_seal::channel::{ChannelError, SecureChannel};
use nicsync_seal::{Opener, Refusal, Sealer, TrafficClass};

/// Full Sync stream id, as the node numbers them.
pub type ConnId = u64;

/// Counters of the host's sealing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SecurityStats {
    /// Membership datagrams that failed authentication (or came plain, or
    /// spoke for a member other than the one that sealed them).
    pub ccp_auth_failures: u64,
    /// Authentic membership datagrams refused as replays.
    pub ccp_replays_dropped: u64,
    /// Membership datagrams sealed by a member that is not a peer.
    pub ccp_unknown_member: u64,
    /// Membership datagrams with a malformed seal.
    pub ccp_malformed: u64,
    /// Full Sync streams closed because a record failed authentication or
    /// the hello named an unknown key.
    pub fs_auth_failures: u64,
    /// Full Sync streams closed over a malformed hello, a wrong cluster or
    /// member, or an oversized record.
    pub fs_malformed: u64,
    /// Full Sync hellos from a member that is not a peer.
    pub fs_unknown_member: u64,
}

/// Sealed traffic refused, device and host together: what `nicsync
/// syncstat` reports as totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RefusedTotals {
    /// Authentication failures (delta, membership, Full Sync).
    pub auth_failures: u64,
    /// Replays dropped.
    pub replays_dropped: u64,
    /// Datagrams sealed by a non-member.
    pub unknown_member: u64,
    /// Malformed seals and frames.
    pub malformed: u64,
}

impl RefusedTotals {
    /// The totals of the device's counters (`delta`) and the host's.
    pub fn of(delta: &RefusedTotals, host: &SecurityStats) -> Self {
        RefusedTotals {
            auth_failures: delta.auth_failures + host.ccp_auth_failures + host.fs_auth_failures,
            replays_dropped: delta.replays_dropped + host.ccp_replays_dropped,
            unknown_member: delta.unknown_member + host.ccp_unknown_member + host.fs_unknown_member,
            malformed: delta.malformed + host.ccp_malformed + host.fs_malformed,
        }
    }

    /// Adds `o`.
    pub fn add(&mut self, o: &RefusedTotals) {
        self.auth_failures += o.auth_failures;
        self.replays_dropped += o.replays_dropped;
        self.unknown_member += o.unknown_member;
        self.malformed += o.malformed;
    }
}

/// Sealing state of one member's host.
#[derive(Debug)]
pub struct NodeSecurity {
    cfg: SealConfig,
    cluster: u16,
    member: u16,
    peers: Vec<u16>,
    ccp_sealer: Sealer,
    ccp_opener: Opener,
    channels: HashMap<ConnId, SecureChannel>,
    scratch: Vec<u8>,
    stats: SecurityStats,
}

impl NodeSecurity {
    /// Member `member` of cluster `cluster`, talking to `peers`.
    pub fn new(cfg: SealConfig, cluster: u16, member: u16, peers: &[u16]) -> Self {
        let peers: Vec<u16> = peers.iter().copied().filter(|p| *p != member).collect();
        NodeSecurity {
            ccp_sealer: Sealer::new(cfg.keys.clone(), TrafficClass::Membership, member, cfg.boot),
            ccp_opener: Opener::new(cfg.keys.clone(), TrafficClass::Membership, &peers),
            cfg,
            cluster,
            member,
            peers,
            channels: HashMap::new(),
            scratch: Vec::new(),
            stats: SecurityStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> SecurityStats {
        self.stats
    }

    /// Seals an outgoing membership datagram (`None` if this boot's counter
    /// is exhausted: the datagram is dropped, as by a lossy network).
    pub fn seal_ccp(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; bytes.len() + SEAL_OVERHEAD];
        let n = self.ccp_sealer.seal(bytes, &mut out).ok()?;
        out.truncate(n);
        Some(out)
    }

    /// Opens an incoming membership datagram; why not (counted) if it does
    /// not open. A datagram that speaks for a member other than the one
    /// that sealed it is refused as not authentic (a member holding the
    /// key may not speak for another, as the card checks Delta Sync
    /// frames): counted in `ccp_auth_failures`.
    pub fn open_ccp(&mut self, bytes: &[u8]) -> Result<&[u8], Refusal> {
        if self.scratch.len() < bytes.len() {
            self.scratch.resize(bytes.len(), 0);
        }
        match self.ccp_opener.open(bytes, &mut self.scratch) {
            Ok(o) => {
                let plain = &self.scratch[..o.len];
                // One that does not parse is left to membership to refuse
                // (and count as malformed).
                if crate::membership::Message::parse(plain).is_ok_and(|v| v.header.sender != o.sender) {
                    self.stats.ccp_auth_failures += 1;
                    return Err(Refusal::Auth);
                }
                Ok(plain)
            }
            Err(e) => {
                let s = &mut self.stats;
                let c = match e.refusal() {
                    Refusal::Auth => &mut s.ccp_auth_failures,
                    Refusal::Malformed => &mut s.ccp_malformed,
                    Refusal::UnknownMember => &mut s.ccp_unknown_member,
                    Refusal::Replay => &mut s.ccp_replays_dropped,
                };
                *c += 1;
                Err(e.refusal())
            }
        }
    }

    /// This member's sealing key: its id and fingerprint (what `nicsync key
    /// show` prints on every member, to compare).
    pub fn send_key(&self) -> (u8, String) {
        let ring = self.cfg.keys.get();
        let k = ring.send_key();
        (k.id(), k.fingerprint())
    }

    /// This member opened stream `conn` to pull from `peer`: returns the
    /// hello to write first.
    pub fn fs_client(&mut self, conn: ConnId, peer: u16) -> Result<Vec<u8>, ChannelError> {
        let (ch, hello) = SecureChannel::client(self.cfg.keys.clone(), self.cluster, self.member, peer)?;
        self.channels.insert(conn, ch);
        Ok(hello)
    }

    /// A peer opened stream `conn` to this member.
    pub fn fs_server(&mut self, conn: ConnId) {
        let ch = SecureChannel::server(self.cfg.keys.clone(), self.cluster, self.member, &self.peers);
        self.channels.insert(conn, ch);
    }

    /// Bytes arrived on `conn`: the plaintext they carry, and bytes to write
    /// back. An error (counted) means: close the stream. Bytes for a stream
    /// this side already dropped yield nothing.
    pub fn fs_receive(&mut self, conn: ConnId, bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ChannelError> {
        let (mut plain, mut wire) = (Vec::new(), Vec::new());
        // A stream this side already closed: what still arrives is dropped.
        let Some(ch) = self.channels.get_mut(&conn) else { return Ok((plain, wire)) };
        match ch.receive(bytes, &mut plain, &mut wire) {
            Ok(()) => Ok((plain, wire)),
            Err(e) => {
                match &e {
                    ChannelError::AuthFailed | ChannelError::UnknownKey(_) => self.stats.fs_auth_failures += 1,
                    ChannelError::UnknownMember(_) => self.stats.fs_unknown_member += 1,
                    _ => self.stats.fs_malformed += 1,
                }
                Err(e)
            }
        }
    }

    /// Seals `plain` for `conn` (held back until the handshake is done).
    pub fn fs_send(&mut self, conn: ConnId, plain: &[u8]) -> Result<Vec<u8>, ChannelError> {
        let Some(ch) = self.channels.get_mut(&conn) else {
            return Err(ChannelError::BadHello("no channel for this stream"));
        };
        let mut wire = Vec::with_capacity(plain.len() + 64);
        ch.send(plain, &mut wire)?;
        Ok(wire)
    }

    /// Stream `conn` is gone.
    pub fn fs_drop(&mut self, conn: ConnId) {
        self.channels.remove(&conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Membership, MembershipParams, Mode};

    /// A probe of member `id` of cluster 1 (members 1, 2, 3).
    fn probe_of(id: u16) -> Vec<u8> {
        let peers = (1..=3).filter(|p| *p != id).collect();
        let mut m = Membership::new(MembershipParams::new(1, id, peers, Mode::HighAvailability, 7), 0).expect("params");
        m.handle_timeout(0);
        m.poll_transmit().expect("a probe").bytes
    }

    /// A member that holds the key seals as itself (its seal's sender is
    /// authenticated) but may not speak for another member inside: member
    /// 3's seal around member 1's probe is refused, as the card refuses a
    /// Delta Sync frame whose inner sender differs. It used to be taken as
    /// member 1's.
    #[test]
    fn a_membership_datagram_speaks_only_for_the_member_that_sealed_it() {
        let keys = nicsync_seal::SharedKeyring::new(nicsync_seal::Keyring::ephemeral().expect("keys"));
        let cfg = |boot| SealConfig { keys: keys.clone(), boot };
        let mut two = NodeSecurity::new(cfg(1), 1, 2, &[1, 3]);
        let mut one = NodeSecurity::new(cfg(1), 1, 1, &[2, 3]);
        let mut three = NodeSecurity::new(cfg(1), 1, 3, &[1, 2]);
        let genuine = one.seal_ccp(&probe_of(1)).expect("sealed");
        assert!(two.open_ccp(&genuine).is_ok());
        let forged = three.seal_ccp(&probe_of(1)).expect("sealed");
        assert_eq!(two.open_ccp(&forged).err(), Some(Refusal::Auth));
        assert_eq!(two.stats().ccp_auth_failures, 1);
        let own = three.seal_ccp(&probe_of(3)).expect("sealed");
        assert!(two.open_ccp(&own).is_ok(), "member 3 speaking for itself");
    }
}
