//! The sync port's crypto engine: sealed Delta Sync frames.
//!
//! A [`SealedPort`] sits between the sync unit and a wire, as an inline
//! AES-GCM engine sits in front of a NIC's sync MAC: every frame the unit
//! sends leaves sealed (authenticated and encrypted, `nicsync_fwif::seal`),
//! and every datagram that arrives is opened before the unit sees it. What
//! does not open is dropped and counted in [`WireStats`]:
//!
//! | counter | what |
//! |---|---|
//! | `auth_failures` | bad tag, unknown key id, a plain (unsealed) frame, or a frame whose inner sender differs from the sealed sender |
//! | `replays_dropped` | authentic, but already seen or older than the sender's replay window |
//! | `unknown_member` | sealed by a member id that is not a configured peer (checked before any cryptography) |
//! | `malformed` | too short for a seal, unknown cipher suite, reserved bytes set |
//!
//! The keys come from the host (a [`SharedKeyring`] standing for the card's
//! key registers); a reload after a rotation step takes effect on the next
//! frame.

use std::fmt;
use std::sync::Arc;

use nicsync_fwif::seal::SEAL_OVERHEAD;
use nicsync_seal::{OpenError, Opener, Refusal, Sealer, SharedKeyring, TrafficClass};

use crate::wire::{SyncPort, WireError, WireStats, MAX_WIRE_FRAME, RECV_DISCARD_BUDGET};

/// Byte range of the sender member id in a sync frame header.
const FRAME_SENDER: core::ops::Range<usize> = 10..12;

/// How a member seals its sync port.
#[derive(Clone, Debug)]
pub struct SealConfig {
    /// The cluster keys.
    pub keys: Arc<SharedKeyring>,
    /// This member's boot number ([`nicsync_seal::next_boot`]).
    pub boot: u32,
}

/// A sync port that seals what it sends and opens what it receives.
pub struct SealedPort {
    inner: Box<dyn SyncPort>,
    sealer: Sealer,
    opener: Opener,
    sealed: Box<[u8]>,
    scratch: Box<[u8]>,
    stats: WireStats,
}

impl fmt::Debug for SealedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedPort").field("member", &self.inner.local_member()).finish_non_exhaustive()
    }
}

impl SealedPort {
    /// Seals `inner`, accepting frames from `peers`.
    pub fn new(inner: Box<dyn SyncPort>, cfg: &SealConfig, peers: &[u16]) -> Self {
        let member = inner.local_member();
        let peers: Vec<u16> = peers.iter().copied().filter(|p| *p != member).collect();
        SealedPort {
            sealer: Sealer::new(cfg.keys.clone(), TrafficClass::Delta, member, cfg.boot),
            opener: Opener::new(cfg.keys.clone(), TrafficClass::Delta, &peers),
            inner,
            sealed: vec![0u8; MAX_WIRE_FRAME + SEAL_OVERHEAD].into_boxed_slice(),
            scratch: vec![0u8; MAX_WIRE_FRAME + 1].into_boxed_slice(),
            stats: WireStats::default(),
        }
    }

    fn seal(&mut self, frame: &[u8]) -> Result<usize, WireError> {
        if frame.len() + SEAL_OVERHEAD > MAX_WIRE_FRAME {
            self.stats.oversize_refused += 1;
            return Err(WireError::Oversize { len: frame.len() + SEAL_OVERHEAD, max: MAX_WIRE_FRAME });
        }
        self.sealer.seal(frame, &mut self.sealed).map_err(|_| {
            self.stats.errors += 1;
            WireError::Sealing
        })
    }

    fn count(&mut self, e: OpenError) {
        let c = match e.refusal() {
            Refusal::Auth => &mut self.stats.auth_failures,
            Refusal::Malformed => &mut self.stats.malformed,
            Refusal::UnknownMember => &mut self.stats.unknown_member,
            Refusal::Replay => &mut self.stats.replays_dropped,
        };
        *c += 1;
    }
}

impl SyncPort for SealedPort {
    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        let n = self.seal(frame)?;
        self.inner.send(&self.sealed[..n])
    }

    fn send_to(&mut self, member: u16, frame: &[u8]) -> Result<(), WireError> {
        let n = self.seal(frame)?;
        self.inner.send_to(member, &self.sealed[..n])
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        if buf.len() < MAX_WIRE_FRAME {
            return Err(WireError::BufferTooSmall { need: MAX_WIRE_FRAME, have: buf.len() });
        }
        for _ in 0..RECV_DISCARD_BUDGET {
            let Some(n) = self.inner.recv(&mut self.scratch)? else { return Ok(None) };
            match self.opener.open(&self.scratch[..n], buf) {
                Ok(o) => {
                    // The seal authenticates its sender; the frame inside
                    // must name the same one (else a member holding the
                    // key speaks for another).
                    let inner = buf.get(FRAME_SENDER).map(|b| u16::from_le_bytes([b[0], b[1]]));
                    if inner.is_some_and(|s| s != o.sender) {
                        self.stats.auth_failures += 1;
                        continue;
                    }
                    return Ok(Some(o.len));
                }
                Err(e) => self.count(e),
            }
        }
        Ok(None)
    }

    fn local_member(&self) -> u16 {
        self.inner.local_member()
    }

    fn stats(&self) -> WireStats {
        let mut s = self.inner.stats();
        s.merge(&self.stats);
        s
    }

    fn readiness_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.inner.readiness_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HubConfig, InProcessHub};
    use nicsync_seal::Keyring;

    fn keys() -> Arc<SharedKeyring> {
        SharedKeyring::new(Keyring::ephemeral().expect("keys"))
    }

    fn frame(sender: u16, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; 200];
        f[10..12].copy_from_slice(&sender.to_le_bytes());
        f
    }

    #[test]
    fn frames_cross_sealed_and_forgeries_are_counted() {
        let hub = InProcessHub::new(HubConfig::new());
        let k = keys();
        let cfg = |boot| SealConfig { keys: k.clone(), boot };
        let mut a = SealedPort::new(Box::new(hub.attach(1).expect("a")), &cfg(1), &[1, 2]);
        let mut b = SealedPort::new(Box::new(hub.attach(2).expect("b")), &cfg(1), &[1, 2]);
        let mut raw = hub.attach(3).expect("raw");
        let mut buf = vec![0u8; MAX_WIRE_FRAME];
        a.send(&frame(1, 7)).expect("send");
        assert_eq!(b.recv(&mut buf).expect("recv"), Some(200));
        assert_eq!(&buf[..200], &frame(1, 7)[..]);
        // The raw port saw ciphertext only.
        let n = raw.recv(&mut buf).expect("raw").expect("a datagram");
        assert_eq!(n, 200 + SEAL_OVERHEAD);
        let captured = buf[..n].to_vec();
        assert!(!captured.windows(8).any(|w| w == [7u8; 8]));
        // A plain frame, a tampered copy, a replay, a stranger: all dropped.
        raw.send(&frame(3, 1)).expect("plain");
        // Tampered: a new counter in the (authenticated) header, so that it
        // is not caught as a replay first.
        let mut t = captured.clone();
        t[12] ^= 4;
        raw.send(&t).expect("tampered");
        raw.send(&captured).expect("replay");
        let mut stranger = SealedPort::new(Box::new(raw), &cfg(1), &[1, 2]);
        stranger.send(&frame(3, 2)).expect("stranger");
        assert_eq!(b.recv(&mut buf).expect("recv"), None);
        let s = b.stats();
        assert_eq!((s.auth_failures, s.replays_dropped, s.unknown_member), (2, 1, 1), "{s:?}");
        // A key holder that lies about the inner sender.
        let mut liar = SealedPort::new(Box::new(hub.attach(4).expect("liar")), &cfg(1), &[1, 2]);
        let mut b2 = SealedPort::new(Box::new(hub.attach(5).expect("b2")), &cfg(1), &[4]);
        liar.send(&frame(1, 3)).expect("send");
        assert_eq!(b2.recv(&mut buf).expect("recv"), None);
        assert_eq!(b2.stats().auth_failures, 1);
    }

    #[test]
    fn a_full_frame_still_fits_one_datagram_sealed() {
        let hub = InProcessHub::new(HubConfig::new());
        let k = keys();
        let cfg = SealConfig { keys: k, boot: 1 };
        let mut a = SealedPort::new(Box::new(hub.attach(1).expect("a")), &cfg, &[2]);
        let mut b = SealedPort::new(Box::new(hub.attach(2).expect("b")), &cfg, &[1]);
        let mut f = vec![0u8; nicsync_fwif::sync::MAX_FRAME];
        f[10..12].copy_from_slice(&1u16.to_le_bytes());
        a.send(&f).expect("max frame");
        let mut buf = vec![0u8; MAX_WIRE_FRAME];
        assert_eq!(b.recv(&mut buf).expect("recv"), Some(f.len()));
        assert!(matches!(a.send(&vec![0u8; f.len() + 1]), Err(WireError::Oversize { .. })));
    }
}
