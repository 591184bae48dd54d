//! Sealing and opening datagrams (Delta Sync frames, membership datagrams).
//!
//! A [`Sealer`] turns a frame into a sealed datagram (layout in
//! `nicsync_fwif::seal`); an [`Opener`] checks one and returns the frame.
//! The opener drops, with a reason the caller counts:
//!
//! * bytes that are not a sealed datagram ([`OpenError::Format`]);
//! * a sender that is not a configured peer ([`OpenError::UnknownMember`]),
//!   before any cryptography;
//! * an unknown key id or a failed tag ([`OpenError::UnknownKey`],
//!   [`OpenError::AuthFailed`]);
//! * a replay ([`OpenError::Replay`]): each sender has a window of the last
//!   [`REPLAY_WINDOW`] counters of its current boot; older boots, counters
//!   below the window and counters seen before are refused. The window moves
//!   only for datagrams that authenticated, so forged datagrams cannot push
//!   it.

use std::sync::Arc;

use nicsync_fwif::seal::{SealFormatError, SealHeader, MAX_COUNTER, NONCE_RANGE, SEAL_HEADER_SIZE, SEAL_OVERHEAD};
use ring::aead::{Aad, Nonce, Tag};
use zerocopy::IntoBytes;

use crate::keys::{KeyringHandle, SharedKeyring, TrafficClass};

/// Counters a replay window remembers per sender.
pub const REPLAY_WINDOW: u64 = 256;
const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// Why a datagram could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The output buffer cannot hold the sealed datagram.
    #[error("output buffer of {have} bytes cannot hold a sealed datagram of {need} bytes")]
    OutputTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// This boot sealed 2^48 datagrams: restart with a new boot number.
    #[error("the seal counter of this boot is exhausted; restart the member")]
    CounterExhausted,
    /// The AEAD refused (it does not for valid lengths).
    #[error("the AEAD refused to seal")]
    Crypto,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a well-formed sealed datagram.
    #[error("malformed sealed datagram: {0}")]
    Format(SealFormatError),
    /// The sender is not a configured peer.
    #[error("datagram from member {0}, which is not a configured peer")]
    UnknownMember(u16),
    /// Sealed with a key this member does not hold.
    #[error("datagram sealed with unknown key id {0}")]
    UnknownKey(u8),
    /// The tag does not verify: tampered, truncated, or another key.
    #[error("authentication failed")]
    AuthFailed,
    /// Authentic but seen before (or too old).
    #[error("replayed datagram")]
    Replay,
    /// The output buffer cannot hold the frame.
    #[error("output buffer of {have} bytes cannot hold a frame of {need} bytes")]
    OutputTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
}

/// The counter a dropped datagram belongs to: every [`OpenError`] falls in
/// exactly one, so the device's and the host's counters agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Failed authentication: bad tag, unknown key id, or a plain frame.
    Auth,
    /// Authentic but seen before or too old.
    Replay,
    /// Sealed by a member id that is not a peer.
    UnknownMember,
    /// Too short, unknown suite, reserved bytes set, or no room to open.
    Malformed,
}

impl OpenError {
    /// Which counter this refusal goes to.
    pub fn refusal(&self) -> Refusal {
        match self {
            OpenError::Format(SealFormatError::NotSealed) | OpenError::AuthFailed | OpenError::UnknownKey(_) => {
                Refusal::Auth
            }
            OpenError::Format(_) | OpenError::OutputTooSmall { .. } => Refusal::Malformed,
            OpenError::UnknownMember(_) => Refusal::UnknownMember,
            OpenError::Replay => Refusal::Replay,
        }
    }
}

/// Seals what one member sends of one traffic class.
#[derive(Debug)]
pub struct Sealer {
    keys: KeyringHandle,
    class: TrafficClass,
    sender: u16,
    boot: u32,
    counter: u64,
}

impl Sealer {
    /// A sealer for member `sender`, boot `boot` (from
    /// [`crate::keys::next_boot`]).
    pub fn new(keys: Arc<SharedKeyring>, class: TrafficClass, sender: u16, boot: u32) -> Self {
        Sealer { keys: KeyringHandle::new(keys), class, sender, boot, counter: 0 }
    }

    /// Datagrams sealed so far.
    pub fn sealed(&self) -> u64 {
        self.counter
    }

    /// Seals `frame` into `out`, which must hold `frame.len() +`
    /// [`SEAL_OVERHEAD`] bytes; returns the datagram's length.
    pub fn seal(&mut self, frame: &[u8], out: &mut [u8]) -> Result<usize, SealError> {
        let need = frame.len() + SEAL_OVERHEAD;
        if out.len() < need {
            return Err(SealError::OutputTooSmall { need, have: out.len() });
        }
        if self.counter > MAX_COUNTER {
            return Err(SealError::CounterExhausted);
        }
        let (sender, boot, counter, class) = (self.sender, self.boot, self.counter, self.class);
        let key = self.keys.current().send_key();
        let header = SealHeader::new(key.id(), sender, boot, counter);
        let (hdr, rest) = out.split_at_mut(SEAL_HEADER_SIZE);
        hdr.copy_from_slice(header.as_bytes());
        let nonce = nonce_of(hdr);
        let (body, tail) = rest.split_at_mut(frame.len());
        body.copy_from_slice(frame);
        let tag: Tag = key
            .aead(class)
            .seal_in_place_separate_tag(nonce, Aad::from(&hdr[..]), body)
            .map_err(|_| SealError::Crypto)?;
        tail[..tag.as_ref().len()].copy_from_slice(tag.as_ref());
        self.counter += 1;
        Ok(need)
    }
}

fn nonce_of(hdr: &[u8]) -> Nonce {
    let mut n = [0u8; 12];
    n.copy_from_slice(&hdr[NONCE_RANGE]);
    Nonce::assume_unique_for_key(n)
}

/// The replay window of one sender: its boot and the last
/// [`REPLAY_WINDOW`] counters, bit `i` standing for `top - i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayWindow {
    boot: u32,
    top: u64,
    bits: [u64; WORDS],
}

impl ReplayWindow {
    fn new(boot: u32, counter: u64) -> Self {
        let mut bits = [0; WORDS];
        bits[0] = 1;
        ReplayWindow { boot, top: counter, bits }
    }

    /// Whether `(boot, counter)` would be accepted.
    pub fn check(&self, boot: u32, counter: u64) -> bool {
        if boot != self.boot {
            return boot > self.boot;
        }
        if counter > self.top {
            return true;
        }
        let back = self.top - counter;
        back < REPLAY_WINDOW && self.bits[(back / 64) as usize] & (1 << (back % 64)) == 0
    }

    /// Records `(boot, counter)` (which [`ReplayWindow::check`] accepted).
    fn commit(&mut self, boot: u32, counter: u64) {
        if boot > self.boot {
            *self = ReplayWindow::new(boot, counter);
            return;
        }
        if counter > self.top {
            self.shift(counter - self.top);
            self.top = counter;
            self.bits[0] |= 1;
        } else {
            let back = self.top - counter;
            self.bits[(back / 64) as usize] |= 1 << (back % 64);
        }
    }

    /// Moves every bit `by` places towards the old end.
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        for i in (0..WORDS).rev() {
            let lo = if i >= words { self.bits[i - words] } else { 0 };
            let carry = if bits > 0 && i > words { self.bits[i - words - 1] >> (64 - bits) } else { 0 };
            self.bits[i] = if bits > 0 { (lo << bits) | carry } else { lo };
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    member: u16,
    window: Option<ReplayWindow>,
}

/// What [`Opener::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The authenticated sender.
    pub sender: u16,
    /// Length of the frame written to the output.
    pub len: usize,
}

/// Opens the datagrams one member receives of one traffic class.
#[derive(Debug)]
pub struct Opener {
    keys: KeyringHandle,
    class: TrafficClass,
    peers: Vec<Peer>,
}

impl Opener {
    /// An opener accepting datagrams from `peers`.
    pub fn new(keys: Arc<SharedKeyring>, class: TrafficClass, peers: &[u16]) -> Self {
        let mut o = Opener { keys: KeyringHandle::new(keys), class, peers: Vec::new() };
        for p in peers {
            o.add_peer(*p);
        }
        o
    }

    /// Accepts datagrams from `member` too.
    pub fn add_peer(&mut self, member: u16) {
        if !self.peers.iter().any(|p| p.member == member) {
            self.peers.push(Peer { member, window: None });
        }
    }

    /// Checks `datagram` and writes the frame inside to `out` (which must
    /// hold `datagram.len() - SEAL_HEADER_SIZE` bytes: the frame and, while
    /// it is checked, the tag).
    pub fn open(&mut self, datagram: &[u8], out: &mut [u8]) -> Result<Opened, OpenError> {
        let header = SealHeader::new_checked(datagram).map_err(OpenError::Format)?;
        let sender = header.sender.get();
        let idx = self.peers.iter().position(|p| p.member == sender).ok_or(OpenError::UnknownMember(sender))?;
        let (boot, counter) = (header.boot.get(), header.counter());
        // Cheap refusal of an obvious replay before spending an AEAD on it;
        // the window itself moves only after the tag verified.
        if self.peers[idx].window.is_some_and(|w| !w.check(boot, counter)) {
            return Err(OpenError::Replay);
        }
        let sealed = &datagram[SEAL_HEADER_SIZE..];
        if out.len() < sealed.len() {
            return Err(OpenError::OutputTooSmall { need: sealed.len(), have: out.len() });
        }
        let class = self.class;
        let ring = self.keys.current();
        let key = ring.get(header.key_id).ok_or(OpenError::UnknownKey(header.key_id))?;
        let buf = &mut out[..sealed.len()];
        buf.copy_from_slice(sealed);
        let hdr = &datagram[..SEAL_HEADER_SIZE];
        let len =
            key.aead(class).open_in_place(nonce_of(hdr), Aad::from(hdr), buf).map_err(|_| OpenError::AuthFailed)?.len();
        let peer = &mut self.peers[idx];
        match &mut peer.window {
            Some(w) => w.commit(boot, counter),
            None => peer.window = Some(ReplayWindow::new(boot, counter)),
        }
        Ok(Opened { sender, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{ClusterKey, Keyring};

    fn ring(id: u8, secret: u8) -> Keyring {
        Keyring::new(vec![ClusterKey::new(id, &[secret; 32]).expect("key")], id).expect("ring")
    }

    fn pair() -> (Sealer, Opener) {
        let shared = SharedKeyring::new(ring(1, 9));
        (Sealer::new(shared.clone(), TrafficClass::Delta, 1, 100), Opener::new(shared, TrafficClass::Delta, &[1, 2]))
    }

    fn seal(s: &mut Sealer, frame: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; frame.len() + SEAL_OVERHEAD];
        let n = s.seal(frame, &mut out).expect("seal");
        out.truncate(n);
        out
    }

    #[test]
    fn round_trip_and_ciphertext_hides_the_frame() {
        let (mut s, mut o) = pair();
        let frame = b"NSYN a delta frame with a secret key 10.0.0.1".to_vec();
        let d = seal(&mut s, &frame);
        assert!(!d.windows(6).any(|w| w == b"secret"));
        let mut out = vec![0u8; 2048];
        let r = o.open(&d, &mut out).expect("open");
        assert_eq!(r, Opened { sender: 1, len: frame.len() });
        assert_eq!(&out[..r.len], &frame[..]);
    }

    #[test]
    fn tampering_anywhere_fails_authentication() {
        let (mut s, _) = pair();
        let d = seal(&mut s, &[0x42; 100]);
        let mut out = vec![0u8; 2048];
        for i in 0..d.len() {
            let (_, mut o) = pair();
            let mut t = d.clone();
            t[i] ^= 0x01;
            let r = o.open(&t, &mut out);
            assert!(r.is_err(), "flip at byte {i} accepted");
        }
        let (_, mut o) = pair();
        assert_eq!(o.open(&d[..d.len() - 1], &mut out), Err(OpenError::AuthFailed));
        assert!(matches!(o.open(&d[..20], &mut out), Err(OpenError::Format(_))));
    }

    #[test]
    fn replays_and_old_boots_are_dropped() {
        let (mut s, mut o) = pair();
        let mut out = vec![0u8; 2048];
        let d: Vec<Vec<u8>> = (0..400).map(|i| seal(&mut s, &[i as u8; 20])).collect();
        o.open(&d[5], &mut out).expect("first");
        assert_eq!(o.open(&d[5], &mut out), Err(OpenError::Replay));
        // Reordered within the window: accepted once.
        o.open(&d[3], &mut out).expect("late but new");
        assert_eq!(o.open(&d[3], &mut out), Err(OpenError::Replay));
        o.open(&d[399], &mut out).expect("jump ahead");
        // 399 - 100 >= 256: below the window.
        assert_eq!(o.open(&d[100], &mut out), Err(OpenError::Replay));
        o.open(&d[300], &mut out).expect("inside the window");
        // A new boot resets the window; the old boot is then refused.
        let shared = SharedKeyring::new(ring(1, 9));
        let mut s2 = Sealer::new(shared, TrafficClass::Delta, 1, 101);
        o.open(&seal(&mut s2, b"x"), &mut out).expect("new boot");
        assert_eq!(o.open(&d[398], &mut out), Err(OpenError::Replay));
    }

    #[test]
    fn wrong_key_member_and_class_are_refused() {
        let mut out = vec![0u8; 2048];
        let (mut s, mut o) = pair();
        let mut other = Sealer::new(SharedKeyring::new(ring(1, 10)), TrafficClass::Delta, 1, 100);
        assert_eq!(o.open(&seal(&mut other, b"x"), &mut out), Err(OpenError::AuthFailed));
        let mut unknown_id = Sealer::new(SharedKeyring::new(ring(3, 9)), TrafficClass::Delta, 1, 100);
        assert_eq!(o.open(&seal(&mut unknown_id, b"x"), &mut out), Err(OpenError::UnknownKey(3)));
        let mut stranger = Sealer::new(SharedKeyring::new(ring(1, 9)), TrafficClass::Delta, 7, 100);
        assert_eq!(o.open(&seal(&mut stranger, b"x"), &mut out), Err(OpenError::UnknownMember(7)));
        let mut ccp = Sealer::new(SharedKeyring::new(ring(1, 9)), TrafficClass::Membership, 1, 100);
        assert_eq!(o.open(&seal(&mut ccp, b"x"), &mut out), Err(OpenError::AuthFailed));
        // Forged datagrams do not move the window: the genuine one still opens.
        o.open(&seal(&mut s, b"ok"), &mut out).expect("genuine");
    }

    #[test]
    fn rotation_opens_both_keys_while_both_are_listed() {
        let old = ClusterKey::new(1, &[1; 32]).expect("k");
        let new = ClusterKey::new(2, &[2; 32]).expect("k");
        let shared_rx = SharedKeyring::new(Keyring::new(vec![old, new], 1).expect("ring"));
        let mut o = Opener::new(shared_rx, TrafficClass::Delta, &[5]);
        let tx = SharedKeyring::new(ring(1, 1));
        let mut s = Sealer::new(tx.clone(), TrafficClass::Delta, 5, 1);
        let mut out = vec![0u8; 2048];
        o.open(&seal(&mut s, b"a"), &mut out).expect("old key");
        tx.replace(ring(2, 2));
        let d = seal(&mut s, b"b");
        assert_eq!(d[1], 2, "sealed with the new key id");
        o.open(&d, &mut out).expect("new key");
    }

    #[test]
    fn window_shift_keeps_the_right_bits() {
        let mut w = ReplayWindow::new(1, 0);
        for c in [1u64, 63, 64, 65, 127, 128, 200] {
            assert!(w.check(1, c));
            w.commit(1, c);
        }
        for c in [0u64, 1, 63, 64, 65, 127, 128, 200] {
            assert!(!w.check(1, c), "{c} seen");
        }
        for c in [2u64, 62, 66, 129, 199, 201] {
            assert!(w.check(1, c), "{c} not seen");
        }
        w.commit(1, 1000);
        assert!(!w.check(1, 744));
        assert!(w.check(1, 745));
    }
}
