//! Sync traffic security for nicsync.
//!
//! A cluster member trusts what arrives on its sync port to rewrite its
//! firewall state, so every Delta Sync frame, every membership datagram and
//! the Full Sync stream are authenticated and encrypted, by default, with
//! AES-256-GCM (from `ring`):
//!
//! * [`keys`]: the cluster key file (mode 0600), keyrings holding the keys
//!   that open (one or two during a rotation) and the one that seals, key
//!   derivation per traffic class, boot numbers that keep nonces unique
//!   across restarts;
//! * [`datagram`]: sealing and opening datagrams, with a replay window per
//!   sender;
//! * [`channel`]: the sealed Full Sync stream (a handshake with fresh random
//!   values from both sides, then sealed records).
//!
//! The threat model and the formats are in docs/security.md.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod channel;
pub mod datagram;
pub mod keys;

pub use datagram::{OpenError, Opened, Opener, Refusal, SealError, Sealer, REPLAY_WINDOW};
pub use keys::{next_boot, ClusterKey, KeyError, KeyFile, Keyring, KeyringHandle, SharedKeyring, TrafficClass};
pub use nicsync_fwif::seal::SEAL_OVERHEAD;
