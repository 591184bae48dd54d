//! `seal`: the sealed envelope of sync and membership datagrams
//! ([`Opener::open`], `SealHeader::new_checked`, the replay window), the
//! receiving end of the sealed Full Sync channel
//! ([`SecureChannel::receive`], server side, before and during its
//! handshake) and the cluster key file ([`KeyFile::parse`]).
//!
//! The member under test holds keys 1 and 2 ([`SECRETS`]) and accepts
//! [`PEERS`]. Datagrams are either raw bytes or sealed by the harness with
//! a fuzz-chosen key, sender, boot and counter (so the replay window and
//! what follows authentication are reached), optionally tampered with.
//!
//! Input: `flags: u8` (bit 0: membership traffic class instead of Delta),
//! then operations until the input ends:
//!
//! | op byte % 4 | operands | action |
//! |---|---|---|
//! | 0 | `len: u16`, bytes | a raw datagram to open |
//! | 1 | `key: u8`, `sender: u8`, `boot: u32`, `counter: u64`, `flip: u16`, `len: u16`, frame | a datagram sealed with key `key % 3` (0: an unknown key) by member `sender % 5`, byte `flip % len` xored with `flip >> 8` when that is not 0 |
//! | 2 | `len: u16`, bytes | bytes of the Full Sync channel, to the server end |
//! | 3 | `len: u16`, bytes | a key file (UTF-8, lossy) |
//!
//! Checks: an opened datagram is the frame that was sealed; a tampered one
//! never opens; an opened frame goes on to its parser.

use std::path::Path;
use std::sync::Arc;

use nicsync_fwif::seal::{SealHeader, MAX_COUNTER, NONCE_RANGE, SEAL_OVERHEAD};
use nicsync_seal::channel::SecureChannel;
use nicsync_seal::{ClusterKey, KeyFile, Keyring, Opener, SharedKeyring, TrafficClass};
use ring::aead::{Aad, Nonce};
use zerocopy::IntoBytes;

use crate::{trace, Reader};

/// The cluster's keys (id, secret).
pub const SECRETS: [(u8, [u8; 32]); 2] = [(1, [7; 32]), (2, [9; 32])];
/// Members the opener accepts.
pub const PEERS: [u16; 3] = [1, 2, 3];
/// Cluster id of the channel.
pub const CLUSTER: u16 = 7;
/// Largest datagram or piece the harness builds.
const MAX_LEN: usize = 2048;

/// The member's keyring (key 1 seals).
pub fn keyring() -> Option<Arc<SharedKeyring>> {
    let keys = SECRETS.iter().map(|(id, s)| ClusterKey::new(*id, s).ok()).collect::<Option<Vec<_>>>()?;
    Some(SharedKeyring::new(Keyring::new(keys, 1).ok()?))
}

/// Seals `frame` as member `sender` would, with any key, boot and counter.
pub fn seal(key: &ClusterKey, class: TrafficClass, sender: u16, boot: u32, counter: u64, frame: &[u8]) -> Vec<u8> {
    let header = SealHeader::new(key.id(), sender, boot, counter & MAX_COUNTER);
    let mut out = Vec::with_capacity(frame.len() + SEAL_OVERHEAD);
    out.extend_from_slice(header.as_bytes());
    let mut body = frame.to_vec();
    let mut n = [0u8; 12];
    n.copy_from_slice(&out[NONCE_RANGE]);
    let Ok(tag) =
        key.aead(class).seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(&out[..]), &mut body)
    else {
        return Vec::new();
    };
    out.extend_from_slice(&body);
    out.extend_from_slice(tag.as_ref());
    out
}

fn after_open(class: TrafficClass, frame: &[u8]) {
    match class {
        TrafficClass::Delta => {
            let _ = nicsync_fwif::sync::Frame::parse(frame);
        }
        TrafficClass::Membership => {
            let _ = nicsync::membership::Message::parse(frame);
        }
    }
}

/// The target.
pub fn run(data: &[u8]) {
    let _ = SealHeader::new_checked(data).map_err(|e| e.to_string());
    let mut r = Reader::new(data);
    let class = if r.u8() & 1 != 0 { TrafficClass::Membership } else { TrafficClass::Delta };
    let Some(keys) = keyring() else { return };
    let ring = keys.get();
    let mut opener = Opener::new(keys.clone(), class, &PEERS);
    let mut channel = SecureChannel::server(keys.clone(), CLUSTER, 1, &PEERS);
    let (mut plain, mut wire) = (Vec::new(), Vec::new());
    let mut out = vec![0u8; MAX_LEN + SEAL_OVERHEAD];
    let mut ops = 0;
    while !r.is_empty() && ops < 64 {
        ops += 1;
        match r.u8() % 4 {
            0 => {
                let len = (r.u16() as usize).min(MAX_LEN);
                let d = r.take(len);
                if let Ok(o) = opener.open(d, &mut out) {
                    after_open(class, &out[..o.len]);
                }
            }
            1 => {
                let (k, sender, boot, counter, flip) = (r.u8() % 3, r.u8() % 5, r.u32(), r.u64(), r.u16());
                let len = (r.u16() as usize).min(MAX_LEN);
                let frame = r.take(len);
                let Some(key) = ring.get(k.max(1)) else { continue };
                let sealed = seal(key, class, sender.into(), boot, counter, frame);
                if sealed.is_empty() {
                    continue;
                }
                let mut d = sealed.clone();
                if k == 0 {
                    d[1] = 0xEE; // a key id the ring does not hold
                }
                if flip >> 8 != 0 {
                    let at = (flip & 0xFF) as usize % d.len();
                    d[at] ^= (flip >> 8) as u8;
                }
                let tampered = d != sealed;
                let res = opener.open(&d, &mut out);
                trace!("sealed key {k} sender {sender} boot {boot} counter {counter} tampered {tampered}: {res:?}");
                match res {
                    Ok(o) => {
                        assert!(!tampered, "a tampered datagram opened");
                        assert!(&out[..o.len] == frame && o.sender == u16::from(sender), "opened another frame");
                        after_open(class, &out[..o.len]);
                    }
                    Err(e) => {
                        let _ = e.to_string();
                    }
                }
            }
            2 => {
                let len = (r.u16() as usize).min(MAX_LEN);
                let bytes = r.take(len);
                if let Err(e) = channel.receive(bytes, &mut plain, &mut wire) {
                    let _ = e.to_string();
                }
                let _ = (channel.is_open(), channel.peer());
                plain.clear();
                wire.clear();
            }
            _ => {
                let len = (r.u16() as usize).min(MAX_LEN);
                let text = String::from_utf8_lossy(r.take(len));
                if let Ok(kf) = KeyFile::parse(&text, Path::new("fuzz.key")) {
                    let _ = kf.keyring(Path::new("fuzz.key"));
                    let again = kf.render();
                    if let Err(e) = KeyFile::parse(&again, Path::new("fuzz-again.key")) {
                        panic!("a rendered key file does not parse: {e}\n{again}");
                    }
                }
            }
        }
    }
}
