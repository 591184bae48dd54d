//! The sealed Full Sync stream: a sans-IO secure channel over TCP.
//!
//! Each side first sends a 48-byte hello in clear:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `NSFS` |
//! | 4 | 1 | version 1 |
//! | 5 | 1 | role: 1 client (puller), 2 server |
//! | 6 | 1 | key id (the server answers with the client's) |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 2 | sender member id |
//! | 10 | 2 | intended receiver's member id |
//! | 12 | 2 | cluster id |
//! | 14 | 2 | reserved, 0 |
//! | 16 | 32 | fresh random value |
//!
//! Both sides then derive two AES-256-GCM keys (client→server,
//! server→client) from the cluster key with HKDF, over both hellos. Fresh
//! random values from both sides make every session's keys new, so a
//! recorded session cannot be replayed to either side, and binding the
//! hellos binds the member ids. Everything after the hellos is records:
//!
//! | size | field |
//! |---|---|
//! | 4 | `len`: ciphertext length including the tag, little-endian (the AAD) |
//! | len | ciphertext ‖ 16-byte tag; nonce = 4 zero bytes ‖ the record number (u64 LE) |
//!
//! A peer without the key fails at its first record. Records are at most
//! [`MAX_RECORD`] bytes of plaintext; a larger length is refused before
//! anything is buffered.

use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::keys::{KeyError, SharedKeyring};

/// Size of a hello.
pub const HELLO_LEN: usize = 48;
/// Largest plaintext of one record.
pub const MAX_RECORD: usize = 1 << 20;
/// Bytes a record adds to its plaintext (length and tag).
pub const RECORD_OVERHEAD: usize = 4 + TAG_LEN;
const TAG_LEN: usize = 16;
const MAGIC: &[u8; 4] = b"NSFS";
const VERSION: u8 = 1;
const ROLE_CLIENT: u8 = 1;
const ROLE_SERVER: u8 = 2;

/// Why the channel failed (the connection must be closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The peer's hello is malformed or names the wrong cluster or member.
    #[error("bad full sync hello: {0}")]
    BadHello(&'static str),
    /// The peer is not a configured member.
    #[error("full sync hello from member {0}, which is not a configured peer")]
    UnknownMember(u16),
    /// The peer sealed with a key this member does not hold.
    #[error("full sync peer uses unknown key id {0}")]
    UnknownKey(u8),
    /// A record failed authentication.
    #[error("full sync record failed authentication")]
    AuthFailed,
    /// A record longer than [`MAX_RECORD`] was announced.
    #[error("full sync record of {0} bytes exceeds the limit")]
    RecordTooLarge(usize),
    /// Key derivation or randomness failed.
    #[error("full sync channel setup failed: {0}")]
    Setup(String),
}

impl From<KeyError> for ChannelError {
    fn from(e: KeyError) -> Self {
        ChannelError::Setup(e.to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    role: u8,
    key_id: u8,
    from: u16,
    to: u16,
    cluster: u16,
    random: [u8; 32],
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4] = VERSION;
        b[5] = self.role;
        b[6] = self.key_id;
        b[8..10].copy_from_slice(&self.from.to_le_bytes());
        b[10..12].copy_from_slice(&self.to.to_le_bytes());
        b[12..14].copy_from_slice(&self.cluster.to_le_bytes());
        b[16..48].copy_from_slice(&self.random);
        b
    }

    fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, ChannelError> {
        if &b[0..4] != MAGIC {
            return Err(ChannelError::BadHello("wrong magic (a peer without full sync security?)"));
        }
        if b[4] != VERSION {
            return Err(ChannelError::BadHello("unsupported version"));
        }
        if b[7] != 0 || b[14] != 0 || b[15] != 0 {
            return Err(ChannelError::BadHello("reserved bytes not zero"));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut random = [0u8; 32];
        random.copy_from_slice(&b[16..48]);
        Ok(Hello { role: b[5], key_id: b[6], from: u16_at(8), to: u16_at(10), cluster: u16_at(12), random })
    }
}

#[derive(Debug)]
struct Keys {
    send: LessSafeKey,
    recv: LessSafeKey,
}

#[derive(Debug)]
enum Phase {
    /// Client: hello sent, waiting for the server's.
    ClientWaiting {
        hello: [u8; HELLO_LEN],
    },
    /// Server: waiting for the client's hello.
    ServerWaiting,
    Open(Box<Keys>),
    Failed,
}

/// One end of a sealed Full Sync stream (see the module docs).
#[derive(Debug)]
pub struct SecureChannel {
    keys: Arc<SharedKeyring>,
    local: u16,
    cluster: u16,
    peers: Vec<u16>,
    phase: Phase,
    inbuf: Vec<u8>,
    /// Plaintext the client was asked to send before the server answered.
    pending: Vec<u8>,
    send_ctr: u64,
    recv_ctr: u64,
}

fn random32() -> Result<[u8; 32], ChannelError> {
    let mut r = [0u8; 32];
    SystemRandom::new().fill(&mut r).map_err(|_| ChannelError::Setup("no randomness".into()))?;
    Ok(r)
}

fn nonce(ctr: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&ctr.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl SecureChannel {
    /// The puller's end, asking `peer`; returns the channel and the hello to
    /// send first.
    pub fn client(
        keys: Arc<SharedKeyring>,
        cluster: u16,
        local: u16,
        peer: u16,
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        let key_id = keys.get().send_key().id();
        let hello = Hello { role: ROLE_CLIENT, key_id, from: local, to: peer, cluster, random: random32()? }.encode();
        let ch = SecureChannel {
            keys,
            local,
            cluster,
            peers: vec![peer],
            phase: Phase::ClientWaiting { hello },
            inbuf: Vec::new(),
            pending: Vec::new(),
            send_ctr: 0,
            recv_ctr: 0,
        };
        Ok((ch, hello.to_vec()))
    }

    /// The serving end, accepting pullers among `peers`.
    pub fn server(keys: Arc<SharedKeyring>, cluster: u16, local: u16, peers: &[u16]) -> Self {
        SecureChannel {
            keys,
            local,
            cluster,
            peers: peers.to_vec(),
            phase: Phase::ServerWaiting,
            inbuf: Vec::new(),
            pending: Vec::new(),
            send_ctr: 0,
            recv_ctr: 0,
        }
    }

    /// Whether the handshake finished.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// The peer member this channel talks to, once known.
    pub fn peer(&self) -> Option<u16> {
        match self.phase {
            Phase::Open(_) | Phase::ClientWaiting { .. } => self.peers.first().copied(),
            _ => None,
        }
    }

    fn derive(
        &self,
        client_hello: &[u8; HELLO_LEN],
        server_hello: &[u8; HELLO_LEN],
        key_id: u8,
        client: bool,
    ) -> Result<Keys, ChannelError> {
        let ring = self.keys.get();
        let key = ring.get(key_id).ok_or(ChannelError::UnknownKey(key_id))?;
        let c2s = key.session_key(&[b"nicsync full sync", client_hello, server_hello, b"c2s"])?;
        let s2c = key.session_key(&[b"nicsync full sync", client_hello, server_hello, b"s2c"])?;
        Ok(if client { Keys { send: c2s, recv: s2c } } else { Keys { send: s2c, recv: c2s } })
    }

    /// Seals `plain` as records appended to `wire` (held until the
    /// handshake finishes on the client).
    pub fn send(&mut self, plain: &[u8], wire: &mut Vec<u8>) -> Result<(), ChannelError> {
        match &self.phase {
            Phase::Open(_) => self.seal_records(plain, wire),
            Phase::ClientWaiting { .. } => {
                self.pending.extend_from_slice(plain);
                Ok(())
            }
            Phase::ServerWaiting => Err(ChannelError::Setup("server cannot send before the client's hello".into())),
            Phase::Failed => Err(ChannelError::AuthFailed),
        }
    }

    fn seal_records(&mut self, plain: &[u8], wire: &mut Vec<u8>) -> Result<(), ChannelError> {
        let Phase::Open(keys) = &self.phase else { return Err(ChannelError::AuthFailed) };
        for piece in plain.chunks(MAX_RECORD) {
            let len = (piece.len() + TAG_LEN) as u32;
            let hdr = len.to_le_bytes();
            wire.extend_from_slice(&hdr);
            let start = wire.len();
            wire.extend_from_slice(piece);
            let tag = keys
                .send
                .seal_in_place_separate_tag(nonce(self.send_ctr), Aad::from(&hdr), &mut wire[start..])
                .map_err(|_| ChannelError::Setup("seal failed".into()))?;
            wire.extend_from_slice(tag.as_ref());
            self.send_ctr += 1;
        }
        Ok(())
    }

    /// Takes bytes from the stream: appends what they decrypt to to `plain`,
    /// and what must be sent back (the server's hello, the client's held
    /// records) to `wire`. An error is final: close the connection.
    pub fn receive(&mut self, bytes: &[u8], plain: &mut Vec<u8>, wire: &mut Vec<u8>) -> Result<(), ChannelError> {
        if matches!(self.phase, Phase::Failed) {
            return Err(ChannelError::AuthFailed);
        }
        self.inbuf.extend_from_slice(bytes);
        let r = self.process(plain, wire);
        if r.is_err() {
            self.phase = Phase::Failed;
            self.inbuf = Vec::new();
        }
        r
    }

    fn process(&mut self, plain: &mut Vec<u8>, wire: &mut Vec<u8>) -> Result<(), ChannelError> {
        let mut off = 0;
        loop {
            let avail = &self.inbuf[off..];
            match &self.phase {
                Phase::ServerWaiting | Phase::ClientWaiting { .. } => {
                    if avail.len() < HELLO_LEN {
                        break;
                    }
                    let mut hb = [0u8; HELLO_LEN];
                    hb.copy_from_slice(&avail[..HELLO_LEN]);
                    off += HELLO_LEN;
                    self.handshake(&hb, wire)?;
                }
                Phase::Open(_) => {
                    if avail.len() < 4 {
                        break;
                    }
                    let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
                    if !(TAG_LEN..=MAX_RECORD + TAG_LEN).contains(&len) {
                        return Err(ChannelError::RecordTooLarge(len));
                    }
                    if avail.len() < 4 + len {
                        break;
                    }
                    let hdr = [avail[0], avail[1], avail[2], avail[3]];
                    let start = off + 4;
                    let Phase::Open(keys) = &self.phase else { break };
                    let body = &mut self.inbuf[start..start + len];
                    let out = keys
                        .recv
                        .open_in_place(nonce(self.recv_ctr), Aad::from(&hdr), body)
                        .map_err(|_| ChannelError::AuthFailed)?;
                    plain.extend_from_slice(out);
                    self.recv_ctr += 1;
                    off = start + len;
                }
                Phase::Failed => return Err(ChannelError::AuthFailed),
            }
        }
        self.inbuf.drain(..off);
        Ok(())
    }

    fn handshake(&mut self, hb: &[u8; HELLO_LEN], wire: &mut Vec<u8>) -> Result<(), ChannelError> {
        let h = Hello::decode(hb)?;
        if h.cluster != self.cluster {
            return Err(ChannelError::BadHello("another cluster"));
        }
        if h.to != self.local {
            return Err(ChannelError::BadHello("meant for another member"));
        }
        if !self.peers.contains(&h.from) {
            return Err(ChannelError::UnknownMember(h.from));
        }
        match std::mem::replace(&mut self.phase, Phase::Failed) {
            Phase::ServerWaiting => {
                if h.role != ROLE_CLIENT {
                    return Err(ChannelError::BadHello("expected a client hello"));
                }
                if self.keys.get().get(h.key_id).is_none() {
                    return Err(ChannelError::UnknownKey(h.key_id));
                }
                let mine = Hello {
                    role: ROLE_SERVER,
                    key_id: h.key_id,
                    from: self.local,
                    to: h.from,
                    cluster: self.cluster,
                    random: random32()?,
                }
                .encode();
                let keys = self.derive(hb, &mine, h.key_id, false)?;
                wire.extend_from_slice(&mine);
                self.peers = vec![h.from];
                self.phase = Phase::Open(Box::new(keys));
            }
            Phase::ClientWaiting { hello } => {
                if h.role != ROLE_SERVER {
                    return Err(ChannelError::BadHello("expected a server hello"));
                }
                if h.key_id != hello[6] {
                    return Err(ChannelError::BadHello("server answered with another key id"));
                }
                let keys = self.derive(&hello, hb, h.key_id, true)?;
                self.phase = Phase::Open(Box::new(keys));
                let pending = std::mem::take(&mut self.pending);
                self.seal_records(&pending, wire)?;
            }
            _ => return Err(ChannelError::BadHello("unexpected hello")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{ClusterKey, Keyring};

    fn shared(secret: u8) -> Arc<SharedKeyring> {
        SharedKeyring::new(Keyring::new(vec![ClusterKey::new(1, &[secret; 32]).expect("k")], 1).expect("r"))
    }

    /// Runs a session; the client sends `req`, the server answers `resp`.
    fn session(ck: u8, sk: u8, req: &[u8], resp: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ChannelError> {
        let (mut c, hello) = SecureChannel::client(shared(ck), 9, 1, 2)?;
        let mut s = SecureChannel::server(shared(sk), 9, 2, &[1, 3]);
        let mut to_s = hello;
        c.send(req, &mut to_s)?;
        let (mut got_s, mut to_c) = (Vec::new(), Vec::new());
        s.receive(&to_s, &mut got_s, &mut to_c)?;
        let (mut got_c, mut more) = (Vec::new(), Vec::new());
        // The server's hello first: the client then releases its request.
        c.receive(&to_c[..HELLO_LEN], &mut got_c, &mut more)?;
        s.receive(&more, &mut got_s, &mut Vec::new())?;
        let mut ans = Vec::new();
        s.send(resp, &mut ans)?;
        // Byte by byte, to exercise reassembly.
        for b in to_c[HELLO_LEN..].iter().chain(ans.iter()) {
            c.receive(std::slice::from_ref(b), &mut got_c, &mut Vec::new())?;
        }
        Ok((got_s, got_c))
    }

    #[test]
    fn a_session_carries_both_directions() {
        let big = vec![0x5a; MAX_RECORD + 100];
        let (s, c) = session(4, 4, b"pull from seq 17", &big).expect("session");
        assert_eq!(s, b"pull from seq 17");
        assert_eq!(c, big);
    }

    #[test]
    fn wrong_key_fails_at_the_first_record() {
        assert_eq!(session(4, 5, b"req", b"resp"), Err(ChannelError::AuthFailed));
    }

    #[test]
    fn hello_checks() {
        let (_, hello) = SecureChannel::client(shared(1), 9, 7, 2).expect("c");
        let mut s = SecureChannel::server(shared(1), 9, 2, &[1]);
        assert_eq!(s.receive(&hello, &mut Vec::new(), &mut Vec::new()), Err(ChannelError::UnknownMember(7)));
        let (_, hello) = SecureChannel::client(shared(1), 8, 1, 2).expect("c");
        let mut s = SecureChannel::server(shared(1), 9, 2, &[1]);
        assert!(matches!(s.receive(&hello, &mut Vec::new(), &mut Vec::new()), Err(ChannelError::BadHello(_))));
        let mut s = SecureChannel::server(shared(1), 9, 2, &[1]);
        let plain = vec![b'N'; 64];
        assert!(matches!(s.receive(&plain, &mut Vec::new(), &mut Vec::new()), Err(ChannelError::BadHello(_))));
    }

    /// Client 1 and server 2 of cluster 9 after both hellos; the client's
    /// hello, to replay.
    fn handshake() -> (SecureChannel, SecureChannel, Vec<u8>) {
        let (mut c, hello) = SecureChannel::client(shared(1), 9, 1, 2).expect("c");
        let mut s = SecureChannel::server(shared(1), 9, 2, &[1]);
        let mut sh = Vec::new();
        s.receive(&hello, &mut Vec::new(), &mut sh).expect("hello");
        c.receive(&sh, &mut Vec::new(), &mut Vec::new()).expect("server hello");
        (c, s, hello)
    }

    #[test]
    fn tampered_and_oversized_records_are_refused() {
        let (mut c, mut s, hello) = handshake();
        let mut rec = Vec::new();
        c.send(b"chunk", &mut rec).expect("send");
        let mut bad = rec.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let mut s2 = SecureChannel::server(shared(1), 9, 2, &[1]);
        s2.receive(&hello, &mut Vec::new(), &mut Vec::new()).expect("hello");
        assert_eq!(s2.receive(&bad, &mut Vec::new(), &mut Vec::new()), Err(ChannelError::AuthFailed));
        let mut huge = (u32::MAX).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(matches!(s.receive(&huge, &mut Vec::new(), &mut Vec::new()), Err(ChannelError::RecordTooLarge(_))));
    }

    #[test]
    fn replaying_a_recorded_session_fails() {
        // Record a client's hello and first record, replay both to a fresh
        // server: its new random value gives new keys, so the record fails.
        let (mut c, _, hello) = handshake();
        let mut rec = Vec::new();
        c.send(b"resync", &mut rec).expect("send");
        let mut s2 = SecureChannel::server(shared(1), 9, 2, &[1]);
        let mut wire = Vec::new();
        s2.receive(&hello, &mut Vec::new(), &mut wire).expect("replayed hello accepted");
        assert_eq!(s2.receive(&rec, &mut Vec::new(), &mut Vec::new()), Err(ChannelError::AuthFailed));
    }
}
