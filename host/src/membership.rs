//! Cluster membership and health: the nicsync counterpart of ClusterXL's
//! Cluster Control Protocol (CCP) health checks, as a sans-IO state machine
//! plus its UDP wire format.
//!
//! Every member runs one [`Membership`]. It probes its peers periodically,
//! notices when a peer goes silent or restarts, and elects which member
//! forwards traffic (Active) and which wait (Standby). Like the Delta Sync
//! machines in `nicsync_model::sync` it never reads a clock, opens a socket
//! or starts a thread: time is a `u64` of nanoseconds ([`Nanos`]) passed in,
//! and the host's loop moves bytes and time:
//!
//! ```text
//!   loop {
//!       feed received datagrams:  m.handle_datagram(bytes, now)
//!       feed expired timers:      if m.poll_timeout() <= now { m.handle_timeout(now) }
//!       send what is queued:      while let Some(t) = m.poll_transmit() { udp.send(t) }
//!       react:                    while let Some(ev) = m.poll_event() { … }
//!   }
//! ```
//!
//! # Member states
//!
//! | [`MemberState`] | meaning | ClusterXL |
//! |---|---|---|
//! | `DOWN` | not synced (starting, resyncing) or failed; never forwards | DOWN / INIT |
//! | `READY` | synced ([`Membership::set_synced`]); the election decides next | READY |
//! | `STANDBY` | synced, waiting to take over | STANDBY |
//! | `ACTIVE` | forwards traffic | ACTIVE |
//! | `ACTIVE ATTENTION` | forwards traffic but has a problem (e.g. lost sync updates, [`Membership::set_attention`]) | ACTIVE(!) / ACTIVE ATTENTION |
//!
//! # Rules
//!
//! * **Liveness.** A peer is alive while it was heard from (any accepted
//!   message) within `dead_after × probe_interval`
//!   ([`MembershipParams::dead_window_ns`]). When that passes it is marked
//!   dead and `DOWN` ([`MembershipEvent::PeerDied`], then a
//!   [`MembershipEvent::PeerStateChanged`] if it was not `DOWN`). The next
//!   message from it revives it with the state it reports.
//! * **Restarts.** Each process start picks a random non-zero
//!   *incarnation*. A message with a new incarnation is
//!   [`MembershipEvent::PeerRestarted`]: the peer is taken as `DOWN` (its
//!   table is gone) until it reports otherwise, and its sequence numbers
//!   start afresh. Messages of the incarnation before are stale.
//! * **Ordering.** Every message carries the sender's message counter
//!   (`seq`, serial-number arithmetic); one not newer than the last
//!   accepted from that sender and incarnation is stale (a duplicate or a
//!   reordered old state) and rejected ([`CcpError::Stale`]).
//! * **Election, High Availability** (re-run on every change). Only what
//!   this member hears counts: a peer is *eligible* if it is alive and
//!   `READY` or `STANDBY` (i.e. synced).
//!   * If some alive peer is `ACTIVE`/`ACTIVE ATTENTION`, or an alive
//!     peer's latest probe says it hears a member in those states that this
//!     member does not hear (*vouched for*: the link between the two is
//!     cut, not the member), a `READY` member becomes `STANDBY` and a
//!     `STANDBY` one stays. An Active member keeps its role when a lower-id
//!     member joins: no pre-emption (ClusterXL's "Maintain current active
//!     Cluster Member"). A member that takes a peer for dead probes all
//!     others at once, so that a vouch ends within a network delay of the
//!     last voucher's verdict.
//!   * If none is, the eligible member with the lowest member id becomes
//!     Active, among this one and the alive peers whose latest probe says
//!     they hear a quorum (a member that cannot receive is passed over,
//!     though it is heard); members that yielded (below) rank after all
//!     others. Everyone applies the same order, so exactly one member
//!     moves. A `READY` member first *listens* for up to one dead window
//!     after it started (or until it has heard every configured peer), so
//!     that a restarted member does not seize the role from an Active it
//!     has not heard yet; and it holds for one probe interval after
//!     becoming `READY` (unless it has no peers), so that members synced at
//!     the same moment see each other `READY` and only the lowest id moves
//!     instead of all of them for one network delay. Neither wait applies
//!     to a `STANDBY` member taking over.
//!   * If two Actives hear each other (a healed split brain, or two members
//!     that decided on views one message apart), or an Active is vouched for
//!     beside this one (two Actives apart, for as long as a report is
//!     stale), the one with the higher id steps down to `STANDBY`. A member
//!     that sees a peer become Active beside another probes at once, so
//!     that two Actives that cannot hear each other learn of each other
//!     within a network delay.
//!   * **Heard by a quorum** (three or more members). An Active steps down
//!     when fewer than a majority of the cluster (itself included) hear it
//!     by their latest probes (a peer heard for less than a dead window is
//!     taken to): its datagrams are not getting out, and the members that
//!     do not hear it elect another.
//!   * **Taken for dead.** An Active member that hears an Active peer
//!     whose probes report it `DOWN` steps down, whatever the ids, once it
//!     has heard that peer without a break for a whole dead window. The
//!     peer cannot hear it (a one-way link: it would never learn of the
//!     conflict), or could not (this member stalled past a dead window,
//!     and the peer took over meanwhile): either way the peer holds the
//!     role, and yielding to it ends the split brain at once and without a
//!     second switch-over back.
//! * **Election, Load Sharing.** Every `READY` member becomes Active
//!   immediately; several Actives are the point.
//! * **Manual failover.** [`Membership::request_standby`] asks a member
//!   (this one, or a peer by a `STATE_CHANGE` command) to give up Active.
//!   It goes `STANDBY` with the *yield* flag, which its messages carry:
//!   everyone ranks it after the other eligible members, so the next one
//!   takes over. In HA the flag clears once another member is Active (from
//!   then on the usual no-pre-emption rule keeps it `STANDBY`); in LS the
//!   member stays `STANDBY` while any other member is Active, and until it
//!   goes `DOWN`. A request to a member that is not Active, or to the only
//!   member that could be Active, is ignored and counted
//!   ([`MembershipStats::commands_ignored`]).
//! * **Attention** does not move the role: `ACTIVE ⇄ ACTIVE ATTENTION`, and
//!   a member that becomes Active while the flag is set goes straight to
//!   `ACTIVE ATTENTION`. The host clears the flag (e.g. after a resync).
//! * **Announcements.** Every local transition is broadcast at once as a
//!   `STATE_CHANGE` and repeated by every probe, so a lost datagram delays
//!   a peer's view by one probe interval at most.
//!
//! # Timing
//!
//! A failed Active is last heard at or before the moment it fails, so every
//! peer declares it dead at most `dead_after × probe_interval` later (plus
//! the network delay). In a pair the other member takes over in that same
//! call; with three or more, the next member takes over once every peer
//! it hears has said so too (the probe each sends when it declares the
//! death, one network delay later; a lost one is repeated by the next
//! periodic probe). Failover therefore completes within
//! `dead_after × probe_interval` plus the delivery delay and timer slack,
//! inside one more probe interval unless a peer's verdict is lost or
//! its loop stalled (below). With the defaults ([`DEFAULT_PROBE_INTERVAL_NS`] = 10 ms,
//! [`DEFAULT_DEAD_AFTER`] = 5) that is ≤ 50 ms (60 ms with the margin);
//! a peer is declared dead only after 4 consecutive probes are lost (the
//! 5th is late). An orderly stop ([`Membership::set_down`]) is announced
//! and fails over within one network delay.
//!
//! **Stalls.** A member's loop may not run for a while (its host busy).
//! Its peers' datagrams wait in its socket meanwhile; two rules keep them
//! from deciding wrongly. A datagram counts from when the host received it
//! ([`Membership::handle_datagram_received`]; the daemon passes the
//! kernel's receive stamp), not from when it is read, so the last probes
//! of an Active that died during the stall do not keep it alive for the
//! stall's length. And time the member did not run is not held against
//! its peers beyond leaving each [`STALL_GRACE_INTERVALS`] probe intervals
//! of life after the stall: time to read what queued, and, should the
//! socket have dropped the newest datagrams (its buffer full), a probe
//! interval for the next one. A peer that died meanwhile is judged a dead
//! window after it was last heard, or two probe intervals after the stall
//! if that is later. The other members, which wait for this one's
//! verdict, take over as late and no later.
//!
//! # Wire format
//!
//! One message per UDP datagram: a 36-byte [`CcpHeader`] followed by
//! `count` 4-byte [`EntryWire`]s. Little-endian throughout.
//!
//! | offset | size | field | rule |
//! |---|---|---|---|
//! | 0 | 4 | `magic` | [`CCP_MAGIC`] (the bytes `NCCP`) |
//! | 4 | 1 | `version` | [`CCP_VERSION`] |
//! | 5 | 1 | `kind` | [`MessageKind`] |
//! | 6 | 2 | `flags` | only [`FLAG_YIELD`], and only with state `STANDBY` |
//! | 8 | 2 | `cluster_id` | receivers reject other clusters |
//! | 10 | 2 | `sender` | member id of the sender |
//! | 12 | 4 | `incarnation` | random per process start, never 0 |
//! | 16 | 4 | `seq` | sender's message counter (every kind) |
//! | 20 | 1 | `state` | sender's [`MemberState`] (1..=5) |
//! | 21 | 1 | `mode` | sender's [`Mode`]; must match the receiver's |
//! | 22 | 1 | `count` | entries that follow, ≤ [`MAX_ENTRIES`] |
//! | 23 | 1 | `reserved` | zero |
//! | 24 | 8 | `digest` | sender's table digest (its card's `sync_digest`) |
//! | 32 | 4 | `checksum` | CRC-32C of the message with this field zero |
//!
//! An entry is `member: u16, state: u8, flags: u8`. The only flag is
//! [`ENTRY_FLAG_HEARD`] (bit 0, PROBE only): the sender hears that member
//! (version 2; version 1 had a zero byte there).
//!
//! | kind | entries | meaning | CCP analogue |
//! |---|---|---|---|
//! | `PROBE` (1) | 0..=64, strictly ascending ids, not the sender | periodic, to all: my state and my view of every peer | cluster-member probing, health-status report |
//! | `STATE_CHANGE` (2) | exactly 1: (target, state) | target = sender: "I am now in `state`" (announcement; must equal the header's state); otherwise a command "member target, go to `state`": `STANDBY` (give up Active), `DOWN` (resync: pull a Full Sync) or `READY` (merge the sender's table); others are ignored | state-change command |
//! | `QUERY` (3) | 0 | "who is there?": answered by a PROBE to the asker; sent at start | querying for cluster membership |
//!
//! [`Message::parse`] checks, in order: header length, magic, version,
//! entry count bound, exact length, checksum, kind, flags, incarnation,
//! state, mode, reserved byte, count for the kind, then every entry (its
//! flags, its state, its place), and returns a [`CcpError`] naming the
//! first fault. It never panics and never
//! allocates. [`Membership::handle_datagram`] then rejects messages of
//! another cluster, from its own member id, from member ids it was not
//! configured with, of the other mode, stale ones, and a dead peer's read
//! more than a dead window after they arrived; all are counted
//! ([`MembershipStats::malformed`], [`MembershipStats::rejected`]).
//!
//! # Limits
//!
//! * The checksum is not authentication: the sync network must be trusted
//!   or isolated, as ClusterXL's is.
//! * A `STATE_CHANGE` command is one datagram, not retransmitted; if it is
//!   lost the administrator repeats it. Announcements need no retransmission
//!   (probes repeat the state).
//! * Everything is bounded: at most [`MAX_PEERS`] peers, fixed at
//!   construction (unknown senders are rejected, entries naming unknown
//!   members are ignored), at most [`TX_QUEUE_LIMIT`] queued datagrams and
//!   [`EVENT_QUEUE_LIMIT`] queued events (the oldest event is dropped and
//!   counted).

use core::fmt;
use std::collections::VecDeque;

use nicsync_fwif::sync::crc32c;
use serde::Serialize;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Time in nanoseconds, from an origin the caller chooses (monotonic).
pub type Nanos = u64;

/// Message magic: the bytes `N C C P` read as a little-endian `u32`.
pub const CCP_MAGIC: u32 = u32::from_le_bytes(*b"NCCP");
/// Version of this message format.
pub const CCP_VERSION: u8 = 2;
/// Size of [`CcpHeader`].
pub const HEADER_SIZE: usize = 36;
/// Size of [`EntryWire`].
pub const ENTRY_SIZE: usize = 4;
/// Entries per message at most.
pub const MAX_ENTRIES: usize = 64;
/// Peers per member at most (a PROBE lists every peer).
pub const MAX_PEERS: usize = MAX_ENTRIES;
/// Size of the largest message.
pub const MAX_MESSAGE: usize = HEADER_SIZE + MAX_ENTRIES * ENTRY_SIZE;
/// Byte offset of the checksum field.
pub const CHECKSUM_OFFSET: usize = 32;
/// Header flag: the sender (in `STANDBY`) yields Active to any other
/// eligible member (manual failover).
pub const FLAG_YIELD: u16 = 1 << 0;
/// Entry flag (PROBE only): the sender hears this member (it is alive in
/// the sender's view), so that peers can tell whether a candidate has a
/// quorum of its own.
pub const ENTRY_FLAG_HEARD: u8 = 1 << 0;
/// Recommended probe interval: 10 ms.
pub const DEFAULT_PROBE_INTERVAL_NS: Nanos = 10_000_000;
/// Recommended number of probe intervals without news before a peer is dead.
pub const DEFAULT_DEAD_AFTER: u32 = 5;
/// Life a member's stall leaves its peers, in probe intervals: long enough
/// for its loop to read what they sent during the stall, or to receive
/// their next probe if the socket dropped the newest (see
/// `Membership::expire`); never more than the stall itself.
pub const STALL_GRACE_INTERVALS: u64 = 2;
/// Datagrams waiting in [`Membership::poll_transmit`] at most; more are
/// dropped and counted.
pub const TX_QUEUE_LIMIT: usize = 256;
/// Events waiting in [`Membership::poll_event`] at most; the oldest is
/// dropped and counted.
pub const EVENT_QUEUE_LIMIT: usize = 1024;

const _: () = {
    assert!(MAX_MESSAGE == 292);
    assert!(MAX_ENTRIES <= u8::MAX as usize);
    assert!(CHECKSUM_OFFSET + 4 == HEADER_SIZE);
};

/// State of a cluster member (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum MemberState {
    /// Not synced or failed; never forwards.
    Down = 1,
    /// Synced; waiting for the election.
    Ready = 2,
    /// Synced; takes over when the Active fails.
    Standby = 3,
    /// Forwards traffic.
    Active = 4,
    /// Forwards traffic with a problem that does not stop it.
    ActiveAttention = 5,
}

impl MemberState {
    /// Every state.
    pub const ALL: [MemberState; 5] = [
        MemberState::Down,
        MemberState::Ready,
        MemberState::Standby,
        MemberState::Active,
        MemberState::ActiveAttention,
    ];

    /// Decodes a state byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u8 == b)
    }

    /// The state byte.
    pub const fn to_wire(self) -> u8 {
        self as u8
    }

    /// Upper-case name, as `nicsync` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            MemberState::Down => "DOWN",
            MemberState::Ready => "READY",
            MemberState::Standby => "STANDBY",
            MemberState::Active => "ACTIVE",
            MemberState::ActiveAttention => "ACTIVE ATTENTION",
        }
    }

    /// `ACTIVE` or `ACTIVE ATTENTION`.
    pub const fn is_active(self) -> bool {
        matches!(self, MemberState::Active | MemberState::ActiveAttention)
    }

    /// `READY` or `STANDBY`: synced and free to become Active.
    pub const fn is_eligible(self) -> bool {
        matches!(self, MemberState::Ready | MemberState::Standby)
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Cluster mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Mode {
    /// Exactly one member is Active.
    #[default]
    HighAvailability = 1,
    /// Every healthy member is Active.
    LoadSharing = 2,
}

impl Mode {
    /// Decodes a mode byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(Mode::HighAvailability),
            2 => Some(Mode::LoadSharing),
            _ => None,
        }
    }

    /// The mode byte.
    pub const fn to_wire(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::HighAvailability => "High Availability",
            Mode::LoadSharing => "Load Sharing",
        })
    }
}

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// Periodic health report: my state and my view of every peer.
    Probe = 1,
    /// Announcement of my new state, or a command to another member.
    StateChange = 2,
    /// Membership query, answered by a PROBE to the asker.
    Query = 3,
}

impl MessageKind {
    /// Decodes a kind byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(MessageKind::Probe),
            2 => Some(MessageKind::StateChange),
            3 => Some(MessageKind::Query),
            _ => None,
        }
    }

    /// Upper-case name.
    pub const fn name(self) -> &'static str {
        match self {
            MessageKind::Probe => "PROBE",
            MessageKind::StateChange => "STATE_CHANGE",
            MessageKind::Query => "QUERY",
        }
    }

    /// Smallest and largest entry count.
    pub const fn count_bounds(self) -> (usize, usize) {
        match self {
            MessageKind::Probe => (0, MAX_ENTRIES),
            MessageKind::StateChange => (1, 1),
            MessageKind::Query => (0, 0),
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 28-byte message header as it is on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CcpHeader {
    /// [`CCP_MAGIC`].
    pub magic: U32,
    /// [`CCP_VERSION`].
    pub version: u8,
    /// [`MessageKind`] byte.
    pub kind: u8,
    /// Flags ([`FLAG_YIELD`]).
    pub flags: U16,
    /// Cluster of the sender.
    pub cluster_id: U16,
    /// Member id of the sender.
    pub sender: U16,
    /// Sender's incarnation, never 0.
    pub incarnation: U32,
    /// Sender's message counter.
    pub seq: U32,
    /// Sender's [`MemberState`] byte.
    pub state: u8,
    /// Sender's [`Mode`] byte.
    pub mode: u8,
    /// Entries after the header.
    pub count: u8,
    /// Zero.
    pub reserved: u8,
    /// The sender's table digest (its device's `sync_digest`), so that
    /// members can see that their tables differ without walking them.
    pub digest: U64,
    /// CRC-32C of the message with this field zero ([`checksum`]).
    pub checksum: U32,
}
nicsync_fwif::assert_layout!(
    CcpHeader,
    size = HEADER_SIZE,
    magic = 0,
    version = 4,
    kind = 5,
    flags = 6,
    cluster_id = 8,
    sender = 10,
    incarnation = 12,
    seq = 16,
    state = 20,
    mode = 21,
    count = 22,
    reserved = 23,
    digest = 24,
    checksum = CHECKSUM_OFFSET
);

/// One (member, state) entry as it is on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EntryWire {
    /// Member id.
    pub member: U16,
    /// [`MemberState`] byte.
    pub state: u8,
    /// [`ENTRY_FLAG_HEARD`] in a PROBE; zero otherwise.
    pub flags: u8,
}
nicsync_fwif::assert_layout!(EntryWire, size = ENTRY_SIZE, member = 0, state = 2, flags = 3);

/// A decoded entry: a member and a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Member id.
    pub member: u16,
    /// Its state (PROBE: as the sender sees it; STATE_CHANGE: the new or
    /// requested state).
    pub state: MemberState,
    /// PROBE: the sender hears this member ([`ENTRY_FLAG_HEARD`]); always
    /// false in other kinds.
    pub heard: bool,
}

impl Entry {
    /// An entry without the heard flag (STATE_CHANGE, or a member the
    /// sender does not hear).
    pub const fn new(member: u16, state: MemberState) -> Self {
        Entry { member, state, heard: false }
    }

    fn to_wire(self) -> EntryWire {
        let flags = if self.heard { ENTRY_FLAG_HEARD } else { 0 };
        EntryWire { member: self.member.into(), state: self.state.to_wire(), flags }
    }
}

impl EntryWire {
    /// The decoded entry; `None` if the state byte is invalid (never for
    /// entries of a parsed message).
    pub fn get(&self) -> Option<Entry> {
        MemberState::from_wire(self.state).map(|state| Entry {
            member: self.member.get(),
            state,
            heard: self.flags & ENTRY_FLAG_HEARD != 0,
        })
    }
}

/// A checked header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Kind.
    pub kind: MessageKind,
    /// [`FLAG_YIELD`] is set.
    pub yielding: bool,
    /// Cluster id.
    pub cluster_id: u16,
    /// Member id of the sender.
    pub sender: u16,
    /// Sender's incarnation (non-zero).
    pub incarnation: u32,
    /// Sender's message counter.
    pub seq: u32,
    /// Sender's state.
    pub state: MemberState,
    /// Sender's mode.
    pub mode: Mode,
    /// Sender's table digest.
    pub digest: u64,
}

/// A message that passed every check of [`Message::parse`], borrowing the
/// caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageView<'a> {
    /// The header.
    pub header: Header,
    entries: &'a [EntryWire],
}

impl<'a> MessageView<'a> {
    /// The entries (validated).
    pub fn entries(&self) -> impl Iterator<Item = Entry> + 'a {
        self.entries.iter().filter_map(EntryWire::get)
    }

    /// Number of entries.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// The (target, state) of a STATE_CHANGE; `None` for other kinds.
    pub fn target(&self) -> Option<Entry> {
        match self.header.kind {
            MessageKind::StateChange => self.entries().next(),
            _ => None,
        }
    }

    /// Whether this is a STATE_CHANGE announcing the sender's own state.
    pub fn is_announcement(&self) -> bool {
        self.target().is_some_and(|t| t.member == self.header.sender)
    }

    /// An owned copy.
    pub fn to_message(&self) -> Message {
        let h = &self.header;
        Message {
            kind: h.kind,
            yielding: h.yielding,
            cluster_id: h.cluster_id,
            sender: h.sender,
            incarnation: h.incarnation,
            seq: h.seq,
            state: h.state,
            mode: h.mode,
            digest: h.digest,
            entries: self.entries().collect(),
        }
    }
}

/// An owned message, for encoding (and [`MessageView::to_message`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Kind.
    pub kind: MessageKind,
    /// Sets [`FLAG_YIELD`] (only with `state == Standby`).
    pub yielding: bool,
    /// Cluster id.
    pub cluster_id: u16,
    /// Member id of the sender.
    pub sender: u16,
    /// Sender's incarnation (non-zero).
    pub incarnation: u32,
    /// Sender's message counter.
    pub seq: u32,
    /// Sender's state.
    pub state: MemberState,
    /// Sender's mode.
    pub mode: Mode,
    /// Sender's table digest.
    pub digest: u64,
    /// Entries (module docs for each kind's rules).
    pub entries: Vec<Entry>,
}

/// Why a message was refused, by [`Message::parse`] (malformed) or by
/// [`Membership::handle_datagram`] (well-formed but not acceptable here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CcpError {
    /// Fewer bytes than the header, or than its entry count needs.
    #[error("message truncated: {have} of {need} bytes")]
    Truncated {
        /// Bytes the message needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
    /// More bytes than the header and its entries.
    #[error("{extra} bytes after the entries")]
    TrailingBytes {
        /// Bytes too many.
        extra: usize,
    },
    /// Not a CCP message.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// Unsupported version.
    #[error("unsupported CCP version {0}")]
    BadVersion(u8),
    /// The checksum does not match.
    #[error("checksum {stored:#010x} does not match {computed:#010x}")]
    Checksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// Unknown kind byte.
    #[error("unknown CCP message kind {0}")]
    BadKind(u8),
    /// Undefined flag bits, or the yield flag with a state other than STANDBY.
    #[error("invalid flags {0:#06x}")]
    BadFlags(u16),
    /// Incarnation 0.
    #[error("incarnation 0")]
    ZeroIncarnation,
    /// Invalid state byte (header or entry).
    #[error("invalid member state {0}")]
    BadState(u8),
    /// Invalid mode byte.
    #[error("invalid mode {0}")]
    BadMode(u8),
    /// A reserved field is not zero.
    #[error("reserved field is not zero")]
    ReservedNonZero,
    /// An entry's flags other than [`ENTRY_FLAG_HEARD`] in a PROBE.
    #[error("entry {index} has invalid flags {flags:#04x}")]
    BadEntryFlags {
        /// Index of the entry.
        index: usize,
        /// The flags byte.
        flags: u8,
    },
    /// More than [`MAX_ENTRIES`] entries.
    #[error("{0} entries exceed {max}", max = MAX_ENTRIES)]
    TooManyEntries(usize),
    /// Entry count outside the kind's bounds.
    #[error("{kind} with {count} entries")]
    BadCount {
        /// Kind.
        kind: MessageKind,
        /// Entries.
        count: usize,
    },
    /// A PROBE entry out of order, repeated or naming the sender, or an
    /// announcement whose state differs from the header's.
    #[error("entry {index} is invalid")]
    BadEntry {
        /// Index of the entry.
        index: usize,
    },
    /// Another cluster's message.
    #[error("message of cluster {got}, this is cluster {expected}")]
    WrongCluster {
        /// This member's cluster.
        expected: u16,
        /// The message's cluster.
        got: u16,
    },
    /// A message that claims to come from this member's own id (a loop, or
    /// two members configured with one id).
    #[error("message from this member's own id {0}")]
    OwnMemberId(u16),
    /// A sender that is not a configured peer.
    #[error("message from unknown member {0}")]
    UnknownMember(u16),
    /// A sender in the other cluster mode (misconfiguration).
    #[error("peer runs {theirs}, this member {ours}")]
    ModeMismatch {
        /// This member's mode.
        ours: Mode,
        /// The sender's mode.
        theirs: Mode,
    },
    /// A duplicate, a message older than one already accepted, or one of
    /// the sender's previous incarnation.
    #[error("stale message from member {member}")]
    Stale {
        /// The sender.
        member: u16,
    },
    /// A message of a peer taken for dead that reached this host longer
    /// than a dead window before it was read (it waited out a stall of
    /// this member's loop): it does not say the peer is alive now.
    #[error("message from member {member} read more than a dead window after it arrived")]
    Late {
        /// The sender.
        member: u16,
    },
}

/// The message checksum: CRC-32C of `msg` with the 4 bytes at
/// [`CHECKSUM_OFFSET`] taken as zero.
pub fn checksum(msg: &[u8]) -> u32 {
    let field = CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4;
    if msg.len() <= MAX_MESSAGE {
        let mut buf = [0u8; MAX_MESSAGE];
        let Some(dst) = buf.get_mut(..msg.len()) else { return 0 };
        dst.copy_from_slice(msg);
        if let Some(f) = dst.get_mut(field) {
            f.fill(0);
        } else if let Some(f) = dst.get_mut(CHECKSUM_OFFSET..) {
            f.fill(0);
        }
        crc32c(dst)
    } else {
        let mut v = msg.to_vec();
        if let Some(f) = v.get_mut(field) {
            f.fill(0);
        }
        crc32c(&v)
    }
}

impl Message {
    /// Checks a received message completely and returns a view of it
    /// (order of checks in the module docs). Never panics, never allocates.
    pub fn parse(buf: &[u8]) -> Result<MessageView<'_>, CcpError> {
        let (hdr, payload) =
            CcpHeader::ref_from_prefix(buf).map_err(|_| CcpError::Truncated { need: HEADER_SIZE, have: buf.len() })?;
        if hdr.magic.get() != CCP_MAGIC {
            return Err(CcpError::BadMagic(hdr.magic.get()));
        }
        if hdr.version != CCP_VERSION {
            return Err(CcpError::BadVersion(hdr.version));
        }
        let count = hdr.count as usize;
        if count > MAX_ENTRIES {
            return Err(CcpError::TooManyEntries(count));
        }
        let need = HEADER_SIZE + count * ENTRY_SIZE;
        if buf.len() < need {
            return Err(CcpError::Truncated { need, have: buf.len() });
        }
        if buf.len() > need {
            return Err(CcpError::TrailingBytes { extra: buf.len() - need });
        }
        let computed = checksum(buf);
        if computed != hdr.checksum.get() {
            return Err(CcpError::Checksum { stored: hdr.checksum.get(), computed });
        }
        let kind = MessageKind::from_wire(hdr.kind).ok_or(CcpError::BadKind(hdr.kind))?;
        let flags = hdr.flags.get();
        if flags & !FLAG_YIELD != 0 {
            return Err(CcpError::BadFlags(flags));
        }
        let incarnation = hdr.incarnation.get();
        if incarnation == 0 {
            return Err(CcpError::ZeroIncarnation);
        }
        let state = MemberState::from_wire(hdr.state).ok_or(CcpError::BadState(hdr.state))?;
        let mode = Mode::from_wire(hdr.mode).ok_or(CcpError::BadMode(hdr.mode))?;
        if hdr.reserved != 0 {
            return Err(CcpError::ReservedNonZero);
        }
        let yielding = flags & FLAG_YIELD != 0;
        if yielding && state != MemberState::Standby {
            return Err(CcpError::BadFlags(flags));
        }
        let (lo, hi) = kind.count_bounds();
        if count < lo || count > hi {
            return Err(CcpError::BadCount { kind, count });
        }
        let entries =
            <[EntryWire]>::ref_from_bytes(payload).map_err(|_| CcpError::Truncated { need, have: buf.len() })?;
        let sender = hdr.sender.get();
        let mut prev: Option<u16> = None;
        let allowed_flags = if kind == MessageKind::Probe { ENTRY_FLAG_HEARD } else { 0 };
        for (index, e) in entries.iter().enumerate() {
            if e.flags & !allowed_flags != 0 {
                return Err(CcpError::BadEntryFlags { index, flags: e.flags });
            }
            let es = MemberState::from_wire(e.state).ok_or(CcpError::BadState(e.state))?;
            let member = e.member.get();
            match kind {
                MessageKind::Probe => {
                    if member == sender || prev.is_some_and(|p| member <= p) {
                        return Err(CcpError::BadEntry { index });
                    }
                    prev = Some(member);
                }
                MessageKind::StateChange => {
                    if member == sender && es != state {
                        return Err(CcpError::BadEntry { index });
                    }
                }
                MessageKind::Query => {}
            }
        }
        Ok(MessageView {
            header: Header {
                kind,
                yielding,
                cluster_id: hdr.cluster_id.get(),
                sender,
                incarnation,
                seq: hdr.seq.get(),
                state,
                mode,
                digest: hdr.digest.get(),
            },
            entries,
        })
    }

    /// Encodes the message; fails with the error [`Message::parse`] would
    /// report at a receiver if the message breaks a rule.
    pub fn encode(&self) -> Result<Vec<u8>, CcpError> {
        let count = self.entries.len();
        if count > MAX_ENTRIES {
            return Err(CcpError::TooManyEntries(count));
        }
        let hdr = CcpHeader {
            magic: CCP_MAGIC.into(),
            version: CCP_VERSION,
            kind: self.kind as u8,
            flags: (if self.yielding { FLAG_YIELD } else { 0 }).into(),
            cluster_id: self.cluster_id.into(),
            sender: self.sender.into(),
            incarnation: self.incarnation.into(),
            seq: self.seq.into(),
            state: self.state.to_wire(),
            mode: self.mode.to_wire(),
            count: count as u8,
            reserved: 0,
            digest: self.digest.into(),
            checksum: 0.into(),
        };
        let mut out = Vec::with_capacity(HEADER_SIZE + count * ENTRY_SIZE);
        out.extend_from_slice(hdr.as_bytes());
        for e in &self.entries {
            out.extend_from_slice(e.to_wire().as_bytes());
        }
        let crc = checksum(&out);
        if let Some(f) = out.get_mut(CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4) {
            f.copy_from_slice(&crc.to_le_bytes());
        }
        Message::parse(&out)?;
        Ok(out)
    }
}

/// Whether `count` members (the one asking included) are a majority of a
/// cluster of `total`; a pair needs none ([`Membership::has_quorum`]).
fn is_majority(count: usize, total: usize) -> bool {
    total < 3 || 2 * count > total
}

/// `a` is later than `b` in serial-number arithmetic (RFC 1982).
fn seq_newer(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 0x8000_0000
}

/// Configuration of a [`Membership`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipParams {
    /// Cluster id written in and required of every message.
    pub cluster_id: u16,
    /// This member's id.
    pub member_id: u16,
    /// Every other member's id (at most [`MAX_PEERS`], distinct, not
    /// `member_id`; any order).
    pub peers: Vec<u16>,
    /// Cluster mode; every member must use the same.
    pub mode: Mode,
    /// Probe period ([`DEFAULT_PROBE_INTERVAL_NS`]).
    pub probe_interval_ns: Nanos,
    /// Probe periods without news after which a peer is dead (≥ 2;
    /// [`DEFAULT_DEAD_AFTER`]).
    pub dead_after: u32,
    /// This process start's incarnation: random and non-zero (e.g.
    /// `nicsync_model::sync::epoch_from_entropy`).
    pub incarnation: u32,
}

impl MembershipParams {
    /// Parameters with the default timings.
    pub fn new(cluster_id: u16, member_id: u16, peers: Vec<u16>, mode: Mode, incarnation: u32) -> Self {
        MembershipParams {
            cluster_id,
            member_id,
            peers,
            mode,
            probe_interval_ns: DEFAULT_PROBE_INTERVAL_NS,
            dead_after: DEFAULT_DEAD_AFTER,
            incarnation,
        }
    }

    /// `dead_after × probe_interval`: how long a peer stays alive unheard
    /// (saturating).
    pub fn dead_window_ns(&self) -> Nanos {
        self.probe_interval_ns.saturating_mul(self.dead_after as u64)
    }

    fn check(&self) -> Result<(), ParamError> {
        if self.incarnation == 0 {
            return Err(ParamError::ZeroIncarnation);
        }
        if self.probe_interval_ns == 0 {
            return Err(ParamError::ZeroProbeInterval);
        }
        if self.dead_after < 2 {
            return Err(ParamError::DeadAfterTooSmall(self.dead_after));
        }
        if self.probe_interval_ns.checked_mul(self.dead_after as u64).is_none() {
            return Err(ParamError::DeadWindowOverflow);
        }
        if self.peers.len() > MAX_PEERS {
            return Err(ParamError::TooManyPeers(self.peers.len()));
        }
        if self.peers.contains(&self.member_id) {
            return Err(ParamError::PeerIsSelf(self.member_id));
        }
        let mut sorted = self.peers.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w.first() == w.get(1)) {
            return Err(ParamError::DuplicatePeer(w.first().copied().unwrap_or_default()));
        }
        Ok(())
    }
}

/// Why [`MembershipParams`] were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// Incarnation 0 is reserved.
    #[error("incarnation 0 is reserved")]
    ZeroIncarnation,
    /// The probe interval is 0.
    #[error("probe interval must be positive")]
    ZeroProbeInterval,
    /// `dead_after` below 2: a peer would be declared dead between two
    /// on-time probes.
    #[error("dead_after must be at least 2, not {0}")]
    DeadAfterTooSmall(u32),
    /// `dead_after × probe_interval` does not fit 64 bits.
    #[error("dead_after × probe interval overflows")]
    DeadWindowOverflow,
    /// More than [`MAX_PEERS`] peers.
    #[error("{0} peers exceed {max}", max = MAX_PEERS)]
    TooManyPeers(usize),
    /// A peer listed twice.
    #[error("peer {0} listed twice")]
    DuplicatePeer(u16),
    /// The member lists itself as a peer.
    #[error("member {0} lists itself as a peer")]
    PeerIsSelf(u16),
}

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Every peer.
    All,
    /// One member.
    Member(u16),
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CcpTransmit {
    /// Where it goes.
    pub dest: Destination,
    /// The encoded message (at most [`MAX_MESSAGE`] bytes).
    pub bytes: Vec<u8>,
}

/// What changed, for the host to react to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// This member changed state.
    LocalStateChanged {
        /// Before.
        from: MemberState,
        /// After.
        to: MemberState,
    },
    /// A peer changed state (as reported by it, or `DOWN` on death/restart).
    PeerStateChanged {
        /// The peer.
        member: u16,
        /// Before.
        from: MemberState,
        /// After.
        to: MemberState,
    },
    /// A peer was not heard for a dead window (followed by its change to
    /// `DOWN`).
    PeerDied {
        /// The peer.
        member: u16,
    },
    /// A peer came back with a new incarnation (followed by its change to
    /// `DOWN` and then to what it reports).
    PeerRestarted {
        /// The peer.
        member: u16,
    },
    /// This member now forwards traffic (after the matching
    /// [`MembershipEvent::LocalStateChanged`]).
    BecameActive,
    /// This member no longer forwards traffic.
    LostActive,
    /// A peer (an operator's `nicsync resync`) asked this member to resync
    /// (a `STATE_CHANGE` command "go DOWN"): its host should pull a Full
    /// Sync.
    ResyncRequested {
        /// The member that asked.
        by: u16,
    },
    /// A peer (the Active realigning the cluster) asked this member to
    /// merge the peer's table into its own (a `STATE_CHANGE` command "go
    /// READY"): its host pulls a Full Sync and applies it under the
    /// conflict rule without emptying its table first.
    MergeRequested {
        /// The member that asked.
        by: u16,
    },
}

/// What an operator reads in the log: "this member STANDBY -> ACTIVE",
/// "member 2 DOWN -> STANDBY", "member 2 not heard within the dead window".
impl fmt::Display for MembershipEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MembershipEvent::LocalStateChanged { from, to } => write!(f, "this member {from} -> {to}"),
            MembershipEvent::PeerStateChanged { member, from, to } => write!(f, "member {member} {from} -> {to}"),
            MembershipEvent::PeerDied { member } => write!(f, "member {member} not heard within the dead window"),
            MembershipEvent::PeerRestarted { member } => write!(f, "member {member} restarted (a new incarnation)"),
            MembershipEvent::BecameActive => f.write_str("this member is Active"),
            MembershipEvent::LostActive => f.write_str("this member is no longer Active"),
            MembershipEvent::ResyncRequested { by } => write!(f, "member {by} asks this member to resync"),
            MembershipEvent::MergeRequested { by } => write!(f, "member {by} asks this member to merge its table"),
        }
    }
}

/// One member as this member sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemberView {
    /// Member id.
    pub id: u16,
    /// State (a dead peer is `DOWN`).
    pub state: MemberState,
    /// Heard within the dead window (always true for the local member).
    pub alive: bool,
    /// When it was last heard (`None` for the local member and peers never
    /// heard).
    pub last_heard_ns: Option<Nanos>,
    /// Its incarnation (0 for a peer never heard).
    pub incarnation: u32,
    /// This is the local member.
    pub is_local: bool,
}

/// Membership counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MembershipStats {
    /// PROBEs sent (periodic and answers to QUERY).
    pub probes_sent: u64,
    /// Times this member found it had not run for two probe intervals or
    /// more (its loop held up; a wake a little late is not one): the
    /// peers' silence in that time was not counted against them.
    pub local_stalls: u64,
    /// PROBEs accepted.
    pub probes_received: u64,
    /// QUERYs sent.
    pub queries_sent: u64,
    /// QUERYs accepted.
    pub queries_received: u64,
    /// STATE_CHANGE announcements sent.
    pub announcements_sent: u64,
    /// STATE_CHANGE messages accepted (announcements and commands).
    pub state_msgs_received: u64,
    /// STATE_CHANGE commands sent to peers.
    pub commands_sent: u64,
    /// Commands addressed to this member received.
    pub commands_received: u64,
    /// Requests (local or received) that were not carried out: the member
    /// was not Active, no other member could take over, the target is
    /// unknown or dead, or the state asked for is not `STANDBY`.
    pub commands_ignored: u64,
    /// Datagrams refused by [`Message::parse`].
    pub malformed: u64,
    /// Well-formed messages refused: other cluster, own id, unknown
    /// member, other mode, stale.
    pub rejected: u64,
    /// Of `rejected`: other clusters.
    pub foreign_cluster: u64,
    /// Of `rejected`: own id or unknown member ids.
    pub unknown_sender: u64,
    /// Of `rejected`: stale (duplicate, reordered, previous incarnation).
    pub stale: u64,
    /// Of `rejected`: late (a dead peer's message read more than a dead
    /// window after it arrived, [`Membership::handle_datagram_received`]).
    pub late: u64,
    /// Local state transitions.
    pub state_changes: u64,
    /// Times the Active role (HA) moved from one member to another, as
    /// seen here.
    pub failovers: u64,
    /// Times this member stepped down from Active: because of another
    /// Active (split brain or one-way link), or because it lost its
    /// quorum or was not heard by one.
    pub step_downs: u64,
    /// Peers declared dead.
    pub peer_deaths: u64,
    /// Peer restarts (new incarnations) seen.
    pub peer_restarts: u64,
    /// Datagrams dropped because the transmit queue was full.
    pub tx_drops: u64,
    /// Events dropped because the event queue was full.
    pub events_dropped: u64,
}

/// What this member knows of one peer.
#[derive(Clone, Debug)]
struct Peer {
    id: u16,
    state: MemberState,
    alive: bool,
    last_heard: Option<Nanos>,
    /// Start of the current stretch of hearing it (or of its incarnation).
    alive_since: Nanos,
    /// 0 until first heard.
    incarnation: u32,
    /// The incarnation before the current one (0 if none).
    prev_incarnation: u32,
    last_seq: Option<u32>,
    yielding: bool,
    /// Its latest PROBE's view, restricted to members known here.
    reports: Vec<Entry>,
    /// Its table digest and since when it has had it.
    digest: (u64, Nanos),
}

impl Peer {
    fn new(id: u16) -> Self {
        Peer {
            id,
            state: MemberState::Down,
            alive: false,
            last_heard: None,
            alive_since: 0,
            incarnation: 0,
            prev_incarnation: 0,
            last_seq: None,
            yielding: false,
            reports: Vec::new(),
            digest: (0, 0),
        }
    }

    fn report(&self, member: u16) -> Option<&Entry> {
        self.reports.iter().find(|e| e.member == member)
    }

    fn reported(&self, member: u16) -> Option<MemberState> {
        self.report(member).map(|e| e.state)
    }

    /// Whether it is alive and hears `member`: its latest probe says so, or
    /// it has not said otherwise yet (heard for less than `dead_ns`, whose
    /// probes may predate `member`'s first message, or no probe at all).
    fn hears(&self, member: u16, now: Nanos, dead_ns: Nanos) -> bool {
        self.alive && (now < self.alive_since.saturating_add(dead_ns) || self.report(member).is_none_or(|e| e.heard))
    }

    /// Whether its latest PROBE says it hears a majority of the `total`
    /// members (itself included), as [`Membership::has_quorum`] asks of
    /// this member; a pair needs none. Without a PROBE yet, it has not
    /// said so.
    fn reports_quorum(&self, total: usize) -> bool {
        is_majority(1 + self.reports.iter().filter(|e| e.heard).count(), total)
    }
}

/// The membership state machine of one member (module docs).
#[derive(Debug)]
pub struct Membership {
    p: MembershipParams,
    dead_ns: Nanos,
    /// When this member last looked at its peers' silence (see
    /// [`Membership::expire`]).
    last_expire: Nanos,
    state: MemberState,
    attention: bool,
    yielding: bool,
    listen_until: Nanos,
    listen_done: bool,
    /// A `READY` member waits until then before it may become Active.
    ready_hold_until: Option<Nanos>,
    /// This member's table digest, sent in every message.
    digest: u64,
    /// When this member last gained a quorum (None: it has none). It may
    /// become Active only two probe intervals later, long enough to hear
    /// an Active the others already have.
    quorum_since: Option<Nanos>,
    next_probe: Nanos,
    seq: u32,
    /// Sorted by id.
    peers: Vec<Peer>,
    /// Member last seen becoming Active (HA), for counting failovers.
    last_active: Option<u16>,
    tx: VecDeque<CcpTransmit>,
    events: VecDeque<MembershipEvent>,
    stats: MembershipStats,
}

impl Membership {
    /// A member starting at `now` in `DOWN`; it queries the cluster at once
    /// and probes every `probe_interval_ns`.
    pub fn new(p: MembershipParams, now: Nanos) -> Result<Self, ParamError> {
        Self::with_digest(p, 0, now)
    }

    /// [`Membership::new`] for a member whose table already holds entries
    /// (`digest`, as [`Membership::set_digest`]): its first QUERY says so.
    /// A QUERY that said 0 made the peers take it for empty until its first
    /// probe, one interval later, and an empty peer deciding meanwhile who
    /// seeds the cluster seeded over it (and emptied it by a Full Sync).
    pub fn with_digest(p: MembershipParams, digest: u64, now: Nanos) -> Result<Self, ParamError> {
        p.check()?;
        let mut p = p;
        p.peers.sort_unstable();
        let dead_ns = p.dead_window_ns();
        let peers = p.peers.iter().map(|&id| Peer::new(id)).collect();
        let mut m = Membership {
            dead_ns,
            last_expire: now,
            state: MemberState::Down,
            attention: false,
            yielding: false,
            listen_until: now.saturating_add(dead_ns),
            listen_done: p.peers.is_empty(),
            ready_hold_until: None,
            digest,
            quorum_since: None,
            next_probe: now.saturating_add(p.probe_interval_ns),
            seq: 0,
            peers,
            last_active: None,
            tx: VecDeque::new(),
            events: VecDeque::new(),
            stats: MembershipStats::default(),
            p,
        };
        m.send(Destination::All, MessageKind::Query, Vec::new());
        Ok(m)
    }

    /// The parameters (peers sorted).
    pub fn params(&self) -> &MembershipParams {
        &self.p
    }

    /// This member's state.
    pub fn local_state(&self) -> MemberState {
        self.state
    }

    /// Whether this member forwards traffic.
    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }

    /// Every member: this one first, then the peers by id.
    pub fn members(&self) -> Vec<MemberView> {
        let mut v = Vec::with_capacity(1 + self.peers.len());
        v.push(MemberView {
            id: self.p.member_id,
            state: self.state,
            alive: true,
            last_heard_ns: None,
            incarnation: self.p.incarnation,
            is_local: true,
        });
        v.extend(self.peers.iter().map(|p| MemberView {
            id: p.id,
            state: p.state,
            alive: p.alive,
            last_heard_ns: p.last_heard,
            incarnation: p.incarnation,
            is_local: false,
        }));
        v
    }

    /// The view `reporter` sent in its latest PROBE (entries about members
    /// known here), if it is a peer that sent one.
    pub fn peer_report(&self, reporter: u16) -> Option<&[Entry]> {
        self.peer(reporter).map(|p| p.reports.as_slice())
    }

    /// The peer a joining member should full-sync from: in HA the alive
    /// Active peer (lowest id if several), else the lowest-id alive
    /// `STANDBY` peer (synced, and safer than starting empty); in LS the
    /// lowest-id alive Active or `STANDBY` peer. Never this member.
    pub fn sync_source(&self) -> Option<u16> {
        let alive = || self.peers.iter().filter(|p| p.alive);
        match self.p.mode {
            Mode::HighAvailability => alive()
                .find(|p| p.state.is_active())
                .or_else(|| alive().find(|p| p.state == MemberState::Standby))
                .map(|p| p.id),
            Mode::LoadSharing => alive().find(|p| p.state.is_active() || p.state == MemberState::Standby).map(|p| p.id),
        }
    }

    /// Counters.
    pub fn stats(&self) -> MembershipStats {
        self.stats
    }

    /// Parses a received datagram and handles it. Parse faults are counted
    /// in [`MembershipStats::malformed`], refusals in
    /// [`MembershipStats::rejected`]; either way the error is returned and
    /// the datagram changes nothing (the time it came at may: a peer whose
    /// dead window ended by then is declared dead, and the election run).
    pub fn handle_datagram(&mut self, bytes: &[u8], now: Nanos) -> Result<(), CcpError> {
        self.handle_datagram_received(bytes, now, now)
    }

    /// [`Membership::handle_datagram`] for a datagram that the host received
    /// at `received` (its kernel's receive stamp, on the clock of `now`) and
    /// reads only now: its sender was heard then, not now. A datagram that
    /// waited in the socket while this member's loop stalled would otherwise
    /// keep a peer that died meanwhile alive for the length of the stall.
    /// A stamp later than `now` counts as `now`. A datagram that arrived
    /// longer than a dead window ago does not bring a dead peer back (it is
    /// dropped, counted in [`MembershipStats::late`]).
    pub fn handle_datagram_received(&mut self, bytes: &[u8], received: Nanos, now: Nanos) -> Result<(), CcpError> {
        self.expire(now);
        let view = match Message::parse(bytes) {
            Ok(v) => v,
            Err(e) => {
                self.stats.malformed += 1;
                // Refused, but the time it came at may have ended a peer's
                // dead window: the election runs as it would after an
                // accepted one.
                self.elect(now);
                return Err(e);
            }
        };
        if let Err(e) = self.accept(&view, received.min(now), now) {
            self.stats.rejected += 1;
            self.elect(now);
            match e {
                CcpError::WrongCluster { .. } => self.stats.foreign_cluster += 1,
                CcpError::OwnMemberId(_) | CcpError::UnknownMember(_) => self.stats.unknown_sender += 1,
                CcpError::Stale { .. } => self.stats.stale += 1,
                CcpError::Late { .. } => self.stats.late += 1,
                _ => {}
            }
            return Err(e);
        }
        self.elect(now);
        Ok(())
    }

    /// When [`Membership::handle_timeout`] next has work (the next probe, a
    /// peer's death, the end of listening).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        let mut t = self.next_probe;
        for p in self.peers.iter().filter(|p| p.alive) {
            if let Some(h) = p.last_heard {
                t = t.min(h.saturating_add(self.dead_ns));
            }
        }
        if self.state == MemberState::Ready {
            if !self.listen_done {
                t = t.min(self.listen_until);
            }
            if let Some(h) = self.ready_hold_until {
                t = t.min(h);
            }
        }
        Some(t)
    }

    /// Runs the timers due at `now`: peer deaths, the election, the probe.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.expire(now);
        self.elect(now);
        if now >= self.next_probe {
            self.send_probe(Destination::All);
            let next = self.next_probe.saturating_add(self.p.probe_interval_ns);
            self.next_probe = if next > now { next } else { now.saturating_add(self.p.probe_interval_ns) };
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<CcpTransmit> {
        self.tx.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// The host finished (or needs no) Full Sync: `DOWN → READY`; the
    /// election then moves it to `STANDBY` or Active. No effect in other
    /// states.
    pub fn set_synced(&mut self, now: Nanos) {
        self.expire(now);
        if self.state == MemberState::Down {
            self.transition(MemberState::Ready);
            if !self.peers.is_empty() {
                self.ready_hold_until = Some(now.saturating_add(self.p.probe_interval_ns));
            }
        }
        self.elect(now);
    }

    /// Back to `DOWN` (a resync starts, or the device failed); announced at
    /// once, so an Active fails over within one network delay.
    pub fn set_down(&mut self, now: Nanos) {
        self.expire(now);
        self.transition(MemberState::Down);
        self.elect(now);
    }

    /// Sets or clears the attention flag: `ACTIVE ⇄ ACTIVE ATTENTION`; a
    /// member not Active remembers it for when it becomes Active.
    pub fn set_attention(&mut self, on: bool, now: Nanos) {
        self.expire(now);
        self.attention = on;
        match (self.state, on) {
            (MemberState::Active, true) => self.transition(MemberState::ActiveAttention),
            (MemberState::ActiveAttention, false) => self.transition(MemberState::Active),
            _ => {}
        }
        self.elect(now);
    }

    /// Admin: asks `target` (this member or a peer) to give up Active
    /// (manual failover; module docs). For a peer this sends a
    /// `STATE_CHANGE` command to it.
    pub fn request_standby(&mut self, target: u16, now: Nanos) {
        self.expire_and_elect(now);
        if target == self.p.member_id {
            self.local_standby(now);
            return;
        }
        self.command(target, MemberState::Standby);
    }

    /// Sends peer `target` the `STATE_CHANGE` command "go to `state`"
    /// (counted as ignored if the target is this member or not alive).
    fn command(&mut self, target: u16, state: MemberState) {
        if target != self.p.member_id && self.peer(target).is_some_and(|p| p.alive) {
            let entry = Entry::new(target, state);
            if self.send(Destination::Member(target), MessageKind::StateChange, vec![entry]) {
                self.stats.commands_sent += 1;
            }
        } else {
            self.stats.commands_ignored += 1;
        }
    }

    /// Admin: asks peer `target` to resync (a `STATE_CHANGE` command "go
    /// DOWN"; the peer's host pulls a Full Sync). Like every command it is
    /// one datagram; the operator repeats it if it is lost.
    pub fn request_resync(&mut self, target: u16, now: Nanos) {
        self.expire_and_elect(now);
        self.command(target, MemberState::Down);
    }

    /// Asks peer `target` to merge this member's table into its own (a
    /// `STATE_CHANGE` command "go READY").
    pub fn request_merge(&mut self, target: u16, now: Nanos) {
        self.expire_and_elect(now);
        self.command(target, MemberState::Ready);
    }

    /// The table digest this member reports from now on.
    pub fn set_digest(&mut self, digest: u64) {
        self.digest = digest;
    }

    /// Peer `id`'s last reported table digest and since when it has
    /// reported that value (`None` for an unknown or never-heard peer).
    pub fn peer_digest(&self, id: u16) -> Option<(u64, Nanos)> {
        self.peers.iter().find(|p| p.id == id && p.last_heard.is_some()).map(|p| p.digest)
    }

    /// Sends a QUERY to every peer (answered by PROBEs).
    pub fn query(&mut self, now: Nanos) {
        self.expire_and_elect(now);
        self.send(Destination::All, MessageKind::Query, Vec::new());
    }

    fn peer_index(&self, id: u16) -> Option<usize> {
        self.peers.binary_search_by_key(&id, |p| p.id).ok()
    }

    fn peer(&self, id: u16) -> Option<&Peer> {
        self.peer_index(id).and_then(|i| self.peers.get(i))
    }

    fn push_event(&mut self, e: MembershipEvent) {
        if self.events.len() >= EVENT_QUEUE_LIMIT {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(e);
    }

    /// Queues a message; false if it was dropped.
    fn send(&mut self, dest: Destination, kind: MessageKind, entries: Vec<Entry>) -> bool {
        self.seq = self.seq.wrapping_add(1);
        if self.tx.len() >= TX_QUEUE_LIMIT {
            self.stats.tx_drops += 1;
            return false;
        }
        let msg = Message {
            kind,
            yielding: self.yielding && self.state == MemberState::Standby,
            cluster_id: self.p.cluster_id,
            sender: self.p.member_id,
            incarnation: self.p.incarnation,
            seq: self.seq,
            state: self.state,
            mode: self.p.mode,
            digest: self.digest,
            entries,
        };
        match msg.encode() {
            Ok(bytes) => {
                self.tx.push_back(CcpTransmit { dest, bytes });
                match kind {
                    MessageKind::Probe => self.stats.probes_sent += 1,
                    MessageKind::Query => self.stats.queries_sent += 1,
                    MessageKind::StateChange => {}
                }
                true
            }
            Err(_) => {
                self.stats.tx_drops += 1;
                false
            }
        }
    }

    fn send_probe(&mut self, dest: Destination) {
        let entries = self.peers.iter().map(|p| Entry { member: p.id, state: p.state, heard: p.alive }).collect();
        self.send(dest, MessageKind::Probe, entries);
    }

    /// Marks peers unheard for a dead window as dead; ends listening.
    ///
    /// Time this member itself did not run (its host's loop held up for
    /// longer than a probe interval) is not held against the peers: what
    /// they sent meanwhile waits unread in its socket, and is read right
    /// after. Without this, a member whose loop stalled for a dead window
    /// took its live peers for dead and took over. The credit is only what
    /// a peer needs to be read: [`STALL_GRACE_INTERVALS`] probe intervals
    /// of life left after the stall. The whole stall would delay this
    /// member's verdict on a peer that died meanwhile, and with it the
    /// failover of the members that wait for it (`vouched_actives`).
    fn expire(&mut self, now: Nanos) -> bool {
        let gap = now.saturating_sub(self.last_expire);
        self.last_expire = self.last_expire.max(now);
        if gap > self.p.probe_interval_ns {
            let credit = gap - self.p.probe_interval_ns;
            let grace = self.p.probe_interval_ns.saturating_mul(STALL_GRACE_INTERVALS);
            let floor = now.saturating_sub(self.dead_ns).saturating_add(grace);
            if gap >= 2 * self.p.probe_interval_ns {
                self.stats.local_stalls += 1;
            }
            if gap >= self.dead_ns {
                // Its peers heard nothing for as long: they may have taken
                // this member for dead (an Active's peer then took over).
                tracing::warn!(
                    member = self.p.member_id,
                    "this member was not run for {:.1} ms, longer than the dead window ({:.1} ms)",
                    gap as f64 / 1e6,
                    self.dead_ns as f64 / 1e6
                );
            }
            for p in self.peers.iter_mut().filter(|p| p.alive) {
                p.last_heard = p.last_heard.map(|h| h.max(floor).min(h.saturating_add(credit)).min(now));
            }
        }
        let dead_ns = self.dead_ns;
        let mut events = Vec::new();
        let mut died = false;
        for p in self.peers.iter_mut().filter(|p| p.alive) {
            let Some(h) = p.last_heard else { continue };
            if h.saturating_add(dead_ns) > now {
                continue;
            }
            p.alive = false;
            p.yielding = false;
            p.reports.clear();
            died = true;
            self.stats.peer_deaths += 1;
            events.push(MembershipEvent::PeerDied { member: p.id });
            if p.state != MemberState::Down {
                events.push(MembershipEvent::PeerStateChanged { member: p.id, from: p.state, to: MemberState::Down });
                p.state = MemberState::Down;
            }
        }
        for e in events {
            self.push_event(e);
        }
        if died {
            // Peers that cannot hear the dead one wait for this member's
            // report of it before they take over (`vouched_actives`): tell
            // them now rather than at the next probe.
            self.send_probe(Destination::All);
        }
        if !self.listen_done && (now >= self.listen_until || self.peers.iter().all(|p| p.last_heard.is_some())) {
            self.listen_done = true;
        }
        if self.ready_hold_until.is_some_and(|h| now >= h) {
            self.ready_hold_until = None;
        }
        died
    }

    /// [`Membership::expire`], then the election if a peer died: whatever
    /// call found the death (a resync request, a query), the survivor
    /// takes over in it, not at its next probe. (A datagram is read first
    /// and the election run after it: it may be the dead one's last probe,
    /// stamped before its deadline.)
    fn expire_and_elect(&mut self, now: Nanos) {
        if self.expire(now) {
            self.elect(now);
        }
    }

    /// Applies an accepted message; refuses it without side effects.
    fn accept(&mut self, view: &MessageView<'_>, heard: Nanos, now: Nanos) -> Result<(), CcpError> {
        let h = view.header;
        let me = self.p.member_id;
        if h.cluster_id != self.p.cluster_id {
            return Err(CcpError::WrongCluster { expected: self.p.cluster_id, got: h.cluster_id });
        }
        if h.sender == me {
            return Err(CcpError::OwnMemberId(h.sender));
        }
        let idx = self.peer_index(h.sender).ok_or(CcpError::UnknownMember(h.sender))?;
        if h.mode != self.p.mode {
            return Err(CcpError::ModeMismatch { ours: self.p.mode, theirs: h.mode });
        }
        let reports: Vec<Entry> = if h.kind == MessageKind::Probe {
            view.entries().filter(|e| e.member == me || self.peer_index(e.member).is_some()).collect()
        } else {
            Vec::new()
        };
        let mut events = Vec::new();
        let mut became_active = false;
        {
            let p = self.peers.get_mut(idx).ok_or(CcpError::UnknownMember(h.sender))?;
            if !p.alive && heard.saturating_add(self.dead_ns) <= now {
                return Err(CcpError::Late { member: h.sender });
            }
            let restarted = p.incarnation != 0 && h.incarnation != p.incarnation;
            if restarted && h.incarnation == p.prev_incarnation {
                return Err(CcpError::Stale { member: h.sender });
            }
            if !restarted && p.last_seq.is_some_and(|last| !seq_newer(h.seq, last)) {
                return Err(CcpError::Stale { member: h.sender });
            }
            // Accepted from here on.
            if restarted {
                p.prev_incarnation = p.incarnation;
                p.reports.clear();
                p.yielding = false;
                p.alive_since = now;
                self.stats.peer_restarts += 1;
                events.push(MembershipEvent::PeerRestarted { member: p.id });
                if p.state != MemberState::Down {
                    events.push(MembershipEvent::PeerStateChanged {
                        member: p.id,
                        from: p.state,
                        to: MemberState::Down,
                    });
                    p.state = MemberState::Down;
                }
            }
            p.incarnation = h.incarnation;
            p.last_seq = Some(h.seq);
            p.last_heard = Some(p.last_heard.map_or(heard, |h| h.max(heard)));
            if p.digest.0 != h.digest || restarted {
                p.digest = (h.digest, now);
            }
            if !p.alive {
                p.alive = true;
                p.alive_since = now;
            }
            p.yielding = h.yielding;
            if p.state != h.state {
                events.push(MembershipEvent::PeerStateChanged { member: p.id, from: p.state, to: h.state });
                became_active = !p.state.is_active() && h.state.is_active();
                p.state = h.state;
            }
            if h.kind == MessageKind::Probe {
                p.reports = reports;
            }
        }
        for e in events {
            self.push_event(e);
        }
        if became_active {
            self.note_active(h.sender);
            let other_active = self.peers.iter().any(|p| p.id != h.sender && p.alive && p.state.is_active());
            if self.p.mode == Mode::HighAvailability && other_active {
                // Two Actives that may not hear each other (the link
                // between them cut): this probe reports each to the other
                // now, not at the next periodic one, and the higher id
                // yields (`vouched_actives`).
                self.send_probe(Destination::All);
            }
        }
        match h.kind {
            MessageKind::Probe => self.stats.probes_received += 1,
            MessageKind::Query => {
                self.stats.queries_received += 1;
                self.send_probe(Destination::Member(h.sender));
            }
            MessageKind::StateChange => {
                self.stats.state_msgs_received += 1;
                if let Some(t) = view.target() {
                    if t.member == me {
                        self.stats.commands_received += 1;
                        if t.state == MemberState::Standby {
                            self.local_standby(now);
                        } else if t.state == MemberState::Ready {
                            // "Merge my table into yours" (realignment).
                            self.push_event(MembershipEvent::MergeRequested { by: h.sender });
                        } else if t.state == MemberState::Down {
                            // "Go DOWN": resync (the host pulls a Full
                            // Sync and goes Down for its length).
                            self.push_event(MembershipEvent::ResyncRequested { by: h.sender });
                        } else {
                            self.stats.commands_ignored += 1;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives up Active with the yield flag, if another member can take over.
    fn local_standby(&mut self, now: Nanos) {
        let other = self.peers.iter().any(|p| p.alive && (p.state.is_eligible() || p.state.is_active()));
        if !self.state.is_active() || !other {
            self.stats.commands_ignored += 1;
            return;
        }
        self.yielding = true;
        self.transition(MemberState::Standby);
        self.elect(now);
    }

    /// Counts a failover when the Active role (HA) moves to `member`.
    fn note_active(&mut self, member: u16) {
        if self.p.mode != Mode::HighAvailability {
            return;
        }
        if self.last_active.is_some_and(|prev| prev != member) {
            self.stats.failovers += 1;
        }
        self.last_active = Some(member);
    }

    fn active_state(&self) -> MemberState {
        if self.attention {
            MemberState::ActiveAttention
        } else {
            MemberState::Active
        }
    }

    /// Changes the local state, raises its events and announces it.
    fn transition(&mut self, to: MemberState) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        if to != MemberState::Standby {
            self.yielding = false;
        }
        if to != MemberState::Ready {
            self.ready_hold_until = None;
        }
        self.stats.state_changes += 1;
        self.push_event(MembershipEvent::LocalStateChanged { from, to });
        if !from.is_active() && to.is_active() {
            self.push_event(MembershipEvent::BecameActive);
            self.note_active(self.p.member_id);
        } else if from.is_active() && !to.is_active() {
            self.push_event(MembershipEvent::LostActive);
        }
        let me = Entry::new(self.p.member_id, to);
        if self.send(Destination::All, MessageKind::StateChange, vec![me]) {
            self.stats.announcements_sent += 1;
        }
    }

    /// Re-runs the election (module docs) for this member.
    fn elect(&mut self, now: Nanos) {
        match self.p.mode {
            Mode::HighAvailability => self.elect_ha(now),
            Mode::LoadSharing => self.elect_ls(),
        }
    }

    /// Whether this member sees a majority of the cluster (itself
    /// included). Clusters of three or more members need one to have an
    /// Active, so that a member cut off from the others does not become a
    /// second Active whose changes the others never see; a pair cannot
    /// have a majority without both members, so it goes without.
    pub fn has_quorum(&self) -> bool {
        is_majority(self.peers.iter().filter(|p| p.alive).count() + 1, self.peers.len() + 1)
    }

    /// The peers alive, the cluster's size, and whether those peers alone
    /// (this member gone) would be a majority: whether one of them can be
    /// Active after this member stops.
    pub fn quorum_without_self(&self) -> (usize, usize, bool) {
        let alive = self.peers.iter().filter(|p| p.alive).count();
        let total = self.peers.len() + 1;
        (alive, total, alive > 0 && is_majority(alive, total))
    }

    /// Members this one does not hear that a peer it hears reports hearing
    /// in an Active state: the link between them is cut, not the member
    /// (ClusterXL's members likewise probe through each other before they
    /// take a peer for dead). A report is at most a probe interval old, and
    /// a member that takes the Active for dead tells its peers at once; but
    /// a peer's verdict lags like this member's own (a dead window), and up
    /// to a probe interval past the end of that peer's stall, if its loop
    /// stalled (module docs, Timing).
    fn vouched_actives(&self) -> impl Iterator<Item = u16> + '_ {
        let me = self.p.member_id;
        self.peers.iter().filter(|p| p.alive).flat_map(move |p| {
            p.reports
                .iter()
                .filter(move |e| {
                    e.heard && e.state.is_active() && e.member != me && self.peer(e.member).is_some_and(|q| !q.alive)
                })
                .map(|e| e.member)
        })
    }

    /// Whether a majority of the cluster (this member included) hears this
    /// member, by its peers' latest probes. A peer heard for less than a
    /// dead window is taken to hear it (its probes may predate this
    /// member's first message). Without it, an Active whose datagrams reach
    /// too few peers would stay Active beside the one they elect: it hears
    /// them, so it keeps its quorum. A pair needs none (see
    /// [`Membership::has_quorum`]; the rule "taken for dead" covers it).
    fn heard_by_quorum(&self, now: Nanos) -> bool {
        is_majority(self.hearers(self.p.member_id, now) + 1, self.peers.len() + 1)
    }

    /// Whether a majority of the cluster hears peer `id`, as far as this
    /// member can tell: itself (it hears the peer), the peer, and the other
    /// peers that hear it ([`Peer::hears`]). A candidate that most members
    /// cannot hear would step down as soon as it took over.
    fn peer_heard_by_quorum(&self, id: u16, now: Nanos) -> bool {
        is_majority(self.hearers(id, now) + 2, self.peers.len() + 1)
    }

    /// Peers other than `id` that hear member `id` ([`Peer::hears`]).
    fn hearers(&self, id: u16, now: Nanos) -> usize {
        self.peers.iter().filter(|q| q.id != id && q.hears(id, now, self.dead_ns)).count()
    }

    fn elect_ha(&mut self, now: Nanos) {
        let me = self.p.member_id;
        let active_peer =
            self.peers.iter().any(|p| p.alive && p.state.is_active()) || self.vouched_actives().next().is_some();
        let quorum = self.has_quorum();
        if !quorum {
            self.quorum_since = None;
        } else if self.quorum_since.is_none() {
            self.quorum_since = Some(now);
        }
        let settled = self.quorum_since.is_some_and(|t| now >= t.saturating_add(2 * self.p.probe_interval_ns));
        match self.state {
            MemberState::Down => {}
            MemberState::Active | MemberState::ActiveAttention if !quorum || !self.heard_by_quorum(now) => {
                self.stats.step_downs += 1;
                self.transition(MemberState::Standby);
            }
            MemberState::Active | MemberState::ActiveAttention => {
                let dead_ns = self.dead_ns;
                let conflict = self.peers.iter().filter(|p| p.alive && p.state.is_active()).any(|p| {
                    p.id < me
                        || (p.reported(me) == Some(MemberState::Down) && now >= p.alive_since.saturating_add(dead_ns))
                }) || self.vouched_actives().any(|q| q < me);
                if conflict {
                    self.stats.step_downs += 1;
                    self.transition(MemberState::Standby);
                }
            }
            MemberState::Ready | MemberState::Standby => {
                if active_peer {
                    self.yielding = false;
                    self.transition(MemberState::Standby);
                    return;
                }
                if !quorum
                    || !self.heard_by_quorum(now)
                    || (self.peers.len() >= 2 && !settled)
                    || (self.state == MemberState::Ready && (!self.listen_done || self.ready_hold_until.is_some()))
                {
                    return;
                }
                let mine = (self.yielding, me);
                let total = self.peers.len() + 1;
                let best = self
                    .peers
                    .iter()
                    .filter(|p| {
                        p.alive
                            && p.state.is_eligible()
                            && p.reports_quorum(total)
                            && self.peer_heard_by_quorum(p.id, now)
                    })
                    .map(|p| (p.yielding, p.id))
                    .fold(mine, core::cmp::min);
                if best == mine {
                    self.transition(self.active_state());
                }
            }
        }
    }

    fn elect_ls(&mut self) {
        match self.state {
            MemberState::Ready => self.transition(self.active_state()),
            MemberState::Standby => {
                let other_active = self.peers.iter().any(|p| p.alive && p.state.is_active());
                if !self.yielding || !other_active {
                    self.transition(self.active_state());
                }
            }
            MemberState::Down | MemberState::Active | MemberState::ActiveAttention => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const I: Nanos = DEFAULT_PROBE_INTERVAL_NS;
    const DEAD: u32 = DEFAULT_DEAD_AFTER;
    const LAT: Nanos = 50_000;
    const MS: Nanos = 1_000_000;
    const CLUSTER: u16 = 7;
    /// Failover bound the brief asks for: dead window plus one interval.
    const BOUND: Nanos = DEAD as Nanos * I + I;

    fn params(id: u16, n: u16, mode: Mode, inc: u32) -> MembershipParams {
        MembershipParams {
            cluster_id: CLUSTER,
            member_id: id,
            peers: (1..=n).filter(|&x| x != id).collect(),
            mode,
            probe_interval_ns: I,
            dead_after: DEAD,
            incarnation: inc,
        }
    }

    /// A member started over a table that holds entries says so in its
    /// first QUERY, not only from its first probe on.
    #[test]
    fn the_first_query_carries_the_tables_digest() {
        let mut a = Membership::new(params(1, 2, Mode::HighAvailability, 5), 0).expect("params");
        let mut b = Membership::with_digest(params(2, 2, Mode::HighAvailability, 6), 0xdead_beef, 0).expect("params");
        let mut queries = 0;
        while let Some(t) = b.poll_transmit() {
            queries += 1;
            a.handle_datagram(&t.bytes, MS).expect("datagram");
        }
        assert_eq!(queries, 1);
        assert_eq!(a.peer_digest(2).map(|d| d.0), Some(0xdead_beef));
    }

    struct Node {
        m: Membership,
        up: bool,
        /// Not driven (a stalled loop): what arrives waits in `backlog`.
        paused: bool,
        /// With the time each arrived.
        backlog: Vec<(Nanos, Vec<u8>)>,
        events: Vec<MembershipEvent>,
    }

    /// Deterministic in-memory network: every datagram arrives `LAT` after
    /// it was sent, in sending order; blocked (from, to) links and members
    /// that are not up drop it.
    struct Net {
        n: u16,
        mode: Mode,
        nodes: BTreeMap<u16, Node>,
        now: Nanos,
        queue: Vec<(Nanos, u64, u16, u16, Vec<u8>)>,
        order: u64,
        blocked: BTreeSet<(u16, u16)>,
        next_inc: u32,
        errors: Vec<(u16, u16, CcpError)>,
        /// Percentage of datagrams lost at random.
        loss_pct: u64,
        /// Datagrams a stalled member's socket holds at most: the newest
        /// are dropped beyond it, as a full socket buffer drops them.
        backlog_cap: usize,
        rng: Rng,
    }

    impl Net {
        fn new(n: u16, mode: Mode) -> Self {
            let mut net = Net {
                n,
                mode,
                nodes: BTreeMap::new(),
                now: 0,
                queue: Vec::new(),
                order: 0,
                blocked: BTreeSet::new(),
                next_inc: 1000,
                errors: Vec::new(),
                loss_pct: 0,
                backlog_cap: usize::MAX,
                rng: Rng(0x9E37_79B9_7F4A_7C15),
            };
            for id in 1..=n {
                net.restart(id);
            }
            net
        }

        /// (Re)starts `id` with a new incarnation, `DOWN`, links intact.
        fn restart(&mut self, id: u16) {
            self.next_inc += 1;
            let m = Membership::new(params(id, self.n, self.mode, self.next_inc), self.now).unwrap();
            self.nodes.insert(id, Node { m, up: true, paused: false, backlog: Vec::new(), events: Vec::new() });
        }

        fn kill(&mut self, id: u16) {
            self.nodes.get_mut(&id).unwrap().up = false;
        }

        /// Stops driving `id` (its loop stalls); datagrams to it queue.
        fn pause(&mut self, id: u16) {
            self.nodes.get_mut(&id).unwrap().paused = true;
        }

        /// Drives `id` again: it reads what queued first (with the time each
        /// arrived, as the daemon's kernel stamps), then its timers run, as
        /// the daemon's loop does after a stall.
        fn resume(&mut self, id: u16) {
            self.resume_with(id, false);
        }

        /// [`Net::resume`], with `id`'s timers first if `timers_first` (a
        /// loop that judges its peers before it reads its socket).
        fn resume_with(&mut self, id: u16, timers_first: bool) {
            let now = self.now;
            let node = self.nodes.get_mut(&id).unwrap();
            node.paused = false;
            if timers_first {
                node.m.handle_timeout(now);
            }
            for (arrived, bytes) in std::mem::take(&mut node.backlog) {
                if let Err(e) = node.m.handle_datagram_received(&bytes, arrived, now) {
                    self.errors.push((0, id, e));
                }
            }
        }

        fn isolate(&mut self, id: u16) {
            for x in (1..=self.n).filter(|&x| x != id) {
                self.blocked.insert((id, x));
                self.blocked.insert((x, id));
            }
        }

        fn heal(&mut self) {
            self.blocked.clear();
        }

        fn m(&mut self, id: u16) -> &mut Membership {
            &mut self.nodes.get_mut(&id).unwrap().m
        }

        fn state(&self, id: u16) -> MemberState {
            self.nodes[&id].m.local_state()
        }

        fn events(&self, id: u16) -> &[MembershipEvent] {
            &self.nodes[&id].events
        }

        /// Members that are up and Active.
        fn actives(&self) -> Vec<u16> {
            self.nodes.iter().filter(|(_, n)| n.up && n.m.is_active()).map(|(&id, _)| id).collect()
        }

        fn sync_all(&mut self) {
            let now = self.now;
            for node in self.nodes.values_mut().filter(|n| n.up) {
                node.m.set_synced(now);
            }
        }

        fn collect(&mut self) {
            let (n, now) = (self.n, self.now);
            for (&id, node) in self.nodes.iter_mut() {
                while let Some(t) = node.m.poll_transmit() {
                    if !node.up {
                        continue;
                    }
                    let dests: Vec<u16> = match t.dest {
                        Destination::All => (1..=n).filter(|&x| x != id).collect(),
                        Destination::Member(x) => vec![x],
                    };
                    for d in dests {
                        let lost = self.loss_pct > 0 && self.rng.below(100) < self.loss_pct;
                        if !lost && !self.blocked.contains(&(id, d)) {
                            self.queue.push((now + LAT, self.order, id, d, t.bytes.clone()));
                            self.order += 1;
                        }
                    }
                }
                while let Some(e) = node.m.poll_event() {
                    node.events.push(e);
                }
            }
        }

        fn run_until(&mut self, t: Nanos) {
            for _ in 0..10_000_000u32 {
                self.collect();
                let next_q = self.queue.iter().map(|q| q.0).min();
                let next_t = self.nodes.values().filter(|n| n.up && !n.paused).filter_map(|n| n.m.poll_timeout()).min();
                let next = match [next_q, next_t].into_iter().flatten().min() {
                    Some(x) if x <= t => x.max(self.now),
                    _ => {
                        self.now = t;
                        return;
                    }
                };
                self.now = next;
                let (mut due, rest): (Vec<_>, Vec<_>) = self.queue.drain(..).partition(|q| q.0 <= next);
                self.queue = rest;
                due.sort_by_key(|q| (q.0, q.1));
                for (_, _, from, to, bytes) in due {
                    if self.blocked.contains(&(from, to)) {
                        continue;
                    }
                    let node = self.nodes.get_mut(&to).unwrap();
                    if !node.up {
                        continue;
                    }
                    if node.paused {
                        if node.backlog.len() < self.backlog_cap {
                            node.backlog.push((next, bytes));
                        }
                        continue;
                    }
                    if let Err(e) = node.m.handle_datagram(&bytes, next) {
                        self.errors.push((from, to, e));
                    }
                }
                for node in self.nodes.values_mut().filter(|n| n.up && !n.paused) {
                    if node.m.poll_timeout().is_some_and(|d| d <= next) {
                        node.m.handle_timeout(next);
                    }
                }
            }
            panic!("simulation does not advance");
        }

        /// Runs in 100 µs steps until `t`, calling `check` after each.
        fn run_checked(&mut self, t: Nanos, mut check: impl FnMut(&Net)) {
            while self.now < t {
                let step = (self.now + 100_000).min(t);
                self.run_until(step);
                check(self);
            }
        }
    }

    /// 3 HA members up and synced: 1 Active, 2 and 3 Standby.
    fn ha3() -> Net {
        ha(3)
    }

    /// `n` HA members up and synced: 1 Active, the others Standby.
    fn ha(n: u16) -> Net {
        let mut net = Net::new(n, Mode::HighAvailability);
        net.run_until(MS);
        net.sync_all();
        // Quorum, then two probe intervals to settle, then the election.
        net.run_until(60 * MS);
        net
    }

    /// The call that finds a peer dead runs the election, whatever it is:
    /// here a refused datagram arriving when the Active's dead window ends
    /// makes the Standby of a pair Active at once. It used to wait for the
    /// next probe (up to an interval later).
    #[test]
    fn the_call_that_finds_the_active_dead_takes_over() {
        let mut net = ha(2);
        assert_eq!(net.actives(), vec![1]);
        let mut b = net.nodes.remove(&2).expect("member 2").m;
        let mut t = net.now;
        loop {
            t += I / 2;
            assert!(b.handle_datagram(&[0u8; 3], t).is_err());
            if !b.members().iter().any(|v| v.id == 1 && v.alive) {
                break;
            }
            assert!(t < net.now + BOUND, "member 1 never declared dead");
        }
        assert!(b.is_active(), "dead Active found, no takeover: {:?}", b.local_state());
    }

    /// A member woken a little late by its probe timer (jitter of a
    /// microsecond) has not stalled: `local_stalls` counts real stalls (two
    /// intervals or more). It counted about every second wake.
    #[test]
    fn timer_jitter_is_not_a_stall() {
        let mut m = Membership::new(params(1, 1, Mode::HighAvailability, 5), 0).expect("params");
        for k in 1..=100u64 {
            m.handle_timeout(k * I + (k % 2) * 1_000);
        }
        assert_eq!(m.stats().local_stalls, 0);
        m.handle_timeout(103 * I);
        assert_eq!(m.stats().local_stalls, 1, "a stall of two intervals");
    }

    #[test]
    fn ha_cold_start_elects_lowest_id() {
        let net = ha3();
        assert_eq!(net.actives(), vec![1]);
        assert_eq!(net.state(2), MemberState::Standby);
        assert_eq!(net.state(3), MemberState::Standby);
        assert!(net.events(1).contains(&MembershipEvent::BecameActive));
        assert!(net.errors.is_empty(), "{:?}", net.errors);
        for id in 1..=3 {
            let views = net.nodes[&id].m.members();
            assert_eq!(views.len(), 3);
            assert!(views[0].is_local && views[0].id == id);
            assert!(views.iter().all(|v| v.alive));
            let active: Vec<u16> = views.iter().filter(|v| v.state.is_active()).map(|v| v.id).collect();
            assert_eq!(active, vec![1], "view of {id}");
            assert_eq!(net.nodes[&id].m.stats().failovers, 0);
            assert_eq!(net.nodes[&id].m.stats().step_downs, 0);
            assert!(!net.events(id).contains(&MembershipEvent::LostActive), "no flapping at start");
        }
        assert_eq!(net.nodes[&2].m.sync_source(), Some(1));
        // The local member reports its peers in probes.
        let report = net.nodes[&2].m.peer_report(1).unwrap();
        assert_eq!(
            report,
            &[
                Entry { member: 2, state: MemberState::Standby, heard: true },
                Entry { member: 3, state: MemberState::Standby, heard: true }
            ]
        );
    }

    #[test]
    fn ha_sync_before_hearing_anyone_still_one_active() {
        let mut net = Net::new(3, Mode::HighAvailability);
        net.sync_all(); // at t = 0, before any QUERY answer arrived
        let mut max_actives = 0;
        net.run_checked(100 * MS, |n| max_actives = max_actives.max(n.actives().len()));
        assert_eq!(max_actives, 1);
        assert_eq!(net.actives(), vec![1]);
    }

    #[test]
    fn ha_failover_restart_no_preemption() {
        let mut net = ha3();
        net.run_until(200 * MS);
        let t_kill = net.now;
        net.kill(1);
        let mut took_over = None;
        net.run_checked(t_kill + BOUND, |n| {
            assert!(n.actives().len() <= 1, "two actives at {}", n.now);
            if took_over.is_none() && n.state(2).is_active() {
                took_over = Some(n.now);
            }
        });
        let took_over = took_over.expect("member 2 took over");
        assert!(took_over - t_kill <= DEAD as Nanos * I + 2 * LAT, "failover took {} ns", took_over - t_kill);
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(3), MemberState::Standby);
        for id in [2, 3] {
            assert!(net.events(id).contains(&MembershipEvent::PeerDied { member: 1 }));
            assert_eq!(net.nodes[&id].m.stats().failovers, 1);
            assert!(!net.nodes[&id].m.members()[1].alive);
        }
        assert!(net.events(2).contains(&MembershipEvent::BecameActive));

        // Member 1 restarts: new incarnation, DOWN, full-syncs from 2.
        net.run_until(net.now + 50 * MS);
        net.restart(1);
        net.run_until(net.now + 2 * MS);
        assert_eq!(net.state(1), MemberState::Down);
        for id in [2, 3] {
            assert!(net.events(id).contains(&MembershipEvent::PeerRestarted { member: 1 }));
            assert_eq!(net.nodes[&id].m.stats().peer_restarts, 1);
        }
        assert_eq!(net.nodes[&1].m.sync_source(), Some(2));
        let before = net.events(2).len();
        {
            let t = net.now;
            net.m(1).set_synced(t)
        };
        net.run_checked(net.now + 1_000 * MS, |n| assert_eq!(n.actives(), vec![2]));
        assert_eq!(net.state(1), MemberState::Standby);
        assert_eq!(net.state(3), MemberState::Standby);
        assert!(!net.events(2)[before..].contains(&MembershipEvent::LostActive));
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    #[test]
    fn orderly_down_fails_over_within_a_network_delay() {
        let mut net = ha3();
        let t = net.now;
        net.m(1).set_down(t);
        net.run_until(t + 2 * LAT);
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(1), MemberState::Down);
        assert_eq!(net.nodes[&1].m.sync_source(), Some(2));
    }

    #[test]
    fn load_sharing_all_active() {
        let mut net = Net::new(3, Mode::LoadSharing);
        net.run_until(MS);
        net.sync_all();
        net.run_until(20 * MS);
        assert_eq!(net.actives(), vec![1, 2, 3]);
        net.kill(1);
        net.run_until(net.now + BOUND);
        assert_eq!(net.actives(), vec![2, 3]);
        net.restart(1);
        net.run_until(net.now + 2 * MS);
        assert_eq!(net.nodes[&1].m.sync_source(), Some(2));
        {
            let t = net.now;
            net.m(1).set_synced(t)
        };
        net.run_until(net.now + 2 * MS);
        assert_eq!(net.actives(), vec![1, 2, 3]);
        // Manual standby in LS: 3 stands by while others are Active.
        {
            let t = net.now;
            net.m(3).request_standby(3, t)
        };
        net.run_until(net.now + 100 * MS);
        assert_eq!(net.actives(), vec![1, 2]);
        assert_eq!(net.state(3), MemberState::Standby);
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    #[test]
    fn a_cut_off_member_is_never_a_second_active() {
        // The Active is cut off: without a quorum it steps down, and 2
        // (which sees 3) takes over; after healing 1 stays Standby.
        let mut net = ha3();
        net.isolate(1);
        net.run_until(net.now + BOUND + 3 * I);
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(1), MemberState::Standby);
        assert!(!net.nodes[&1].m.has_quorum());
        net.heal();
        net.run_until(net.now + BOUND);
        assert_eq!(net.actives(), vec![2]);
        net.run_checked(net.now + 500 * MS, |n| assert_eq!(n.actives(), vec![2]));

        // A Standby is cut off: alone, it stays Standby; the Active keeps its role.
        net.isolate(3);
        net.run_checked(net.now + BOUND + 3 * I, |n| assert!(n.actives().len() <= 1));
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(3), MemberState::Standby);
        net.heal();
        net.run_until(net.now + BOUND);
        assert_eq!(net.actives(), vec![2]);
    }

    /// What a stopping member says of the members it leaves: two of three
    /// can carry on, one of three cannot (no majority), the last of a pair
    /// can.
    #[test]
    fn who_can_carry_on_without_this_member() {
        let mut net = ha3();
        assert_eq!(net.nodes[&1].m.quorum_without_self(), (2, 3, true));
        net.kill(3);
        net.run_until(net.now + BOUND + 3 * I);
        assert_eq!(net.nodes[&1].m.quorum_without_self(), (1, 3, false));
        let net = ha(2);
        assert_eq!(net.nodes[&1].m.quorum_without_self(), (1, 2, true));
    }

    #[test]
    fn a_pair_needs_no_quorum() {
        let mut net = ha(2);
        assert_eq!(net.actives(), vec![1]);
        net.kill(1);
        net.run_until(net.now + BOUND + 3 * I);
        assert_eq!(net.actives(), vec![2]);
    }

    #[test]
    fn lossy_network_converges_to_one_active() {
        // 35 % loss: peers are declared dead now and then, members split and
        // heal; once the loss stops, one Active remains and all views agree.
        for seed in 1..=8u64 {
            lossy_run(seed);
        }
    }

    fn lossy_run(seed: u64) {
        let mut net = Net::new(4, Mode::HighAvailability);
        net.rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        net.loss_pct = 35;
        net.run_until(MS);
        net.sync_all();
        net.run_until(2_000 * MS);
        net.loss_pct = 0;
        net.run_until(net.now + 3 * I);
        assert_eq!(net.actives().len(), 1, "seed {seed}");
        let active = net.actives()[0];
        for id in 1..=4 {
            let views = net.nodes[&id].m.members();
            assert!(views.iter().all(|v| v.alive), "view of {id}: {views:?}");
            let seen: Vec<u16> = views.iter().filter(|v| v.state.is_active()).map(|v| v.id).collect();
            assert_eq!(seen, vec![active], "view of {id}");
        }
        assert!(net.errors.is_empty(), "seed {seed}: {:?}", net.errors);
    }

    #[test]
    fn one_way_link_does_not_leave_two_actives() {
        // 2 stops hearing 1, but 1 still hears 2, and 3 hears 1: 3 vouches
        // for the Active, so nothing moves.
        let mut net = ha3();
        net.blocked.insert((1, 2));
        net.run_checked(net.now + 3 * BOUND, |n| assert_eq!(n.actives(), vec![1]));
        assert_eq!(net.state(2), MemberState::Standby);
        assert_eq!(net.nodes[&1].m.stats().step_downs, 0);
        // In a pair nobody vouches: 2 takes over, and 1, hearing 2's probes
        // report it DOWN for a dead window, yields.
        let mut net = ha(2);
        net.blocked.insert((1, 2));
        net.run_until(net.now + BOUND);
        net.run_until(net.now + BOUND);
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(1), MemberState::Standby);
        assert_eq!(net.nodes[&1].m.stats().step_downs, 1);
        net.run_checked(net.now + 500 * MS, |n| assert_eq!(n.actives(), vec![2]));
    }

    #[test]
    fn a_link_cut_between_two_members_that_a_third_hears_leaves_one_active() {
        // 1 (Active) and 2 stop hearing each other; 3 hears both. Each of 1
        // and 2 still has a quorum (itself and 3), so quorum alone left two
        // Actives; 3's probes vouch for 1, and 2 stays Standby.
        let mut net = ha3();
        net.blocked.insert((1, 2));
        net.blocked.insert((2, 1));
        net.run_checked(net.now + 3 * BOUND, |n| assert_eq!(n.actives(), vec![1]));
        assert_eq!(net.state(2), MemberState::Standby);
        assert!(net.nodes[&2].m.members().iter().any(|v| v.id == 1 && !v.alive), "2 takes 1 for dead");
        // 1 fails: 3 stops vouching for it, and 2 takes over.
        net.kill(1);
        let t = net.now;
        net.run_until(t + BOUND);
        assert_eq!(net.actives(), vec![2]);
        net.heal();
        net.restart(1);
        net.run_checked(net.now + 300 * MS, |n| assert!(n.actives().len() <= 1, "{:?}", n.actives()));
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    /// Cold start with the link between 1 and 2 cut: each gains its quorum
    /// through 3 at the same moment, and neither can know of the other's
    /// takeover. 3, seeing a second Active beside the first, probes at
    /// once, so the two Actives last a few network delays, not until 3's
    /// next periodic probe (10 ms here before).
    #[test]
    fn two_actives_through_a_third_member_last_a_network_delay() {
        for start_us in [0, 1_000, 3_000, 7_000] {
            let mut net = Net::new(3, Mode::HighAvailability);
            net.blocked.insert((1, 2));
            net.blocked.insert((2, 1));
            net.run_until(MS + start_us * 1_000);
            net.sync_all();
            let (mut since, mut longest): (Option<Nanos>, Option<Nanos>) = (None, None);
            net.run_checked(500 * MS, |n| {
                if n.actives().len() > 1 {
                    since.get_or_insert(n.now);
                } else if let Some(s) = since.take() {
                    longest = longest.max(Some(n.now - s));
                }
            });
            let longest = longest.expect("1 and 2 never both took over: the case is not exercised");
            // Announcement to 3, 3's probe back: two network delays (as
            // seen by a check every 100 µs).
            assert!(longest <= 4 * LAT, "from {start_us} µs: two Actives for {:.2} ms", longest as f64 / 1e6);
            assert_eq!(net.actives(), vec![1]);
            assert!(net.errors.is_empty(), "{:?}", net.errors);
        }
    }

    #[test]
    fn an_active_that_only_a_minority_hears_hands_over_and_stays_down() {
        // Of four members, 3 and 4 stop hearing the Active 1 (1 still hears
        // everyone, and 2 hears it). A majority no longer hears 1: it steps
        // down, and must not take over again at once (it still has a quorum
        // of members it hears and the lowest id), nor may 2 keep waiting
        // for it: 2 takes over, and nothing moves after.
        let mut net = ha(4);
        net.blocked.insert((1, 3));
        net.blocked.insert((1, 4));
        net.run_until(net.now + BOUND + 3 * I);
        assert_eq!(net.actives(), vec![2]);
        let changes = net.nodes[&1].m.stats().state_changes;
        net.run_checked(net.now + 300 * MS, |n| assert_eq!(n.actives(), vec![2]));
        assert_eq!(net.nodes[&1].m.stats().state_changes, changes, "1 does not flap");
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    #[test]
    fn an_active_that_a_peer_reports_beside_a_lower_active_yields() {
        // 2 took over from 1, which it cannot hear. Should a report of 3 say
        // that it hears 1 Active (two Actives apart, as stale or lost reports
        // could leave them for a moment), the higher id yields; it takes
        // over again once 3 reports 1 gone.
        let mut net = ha3();
        net.kill(1);
        net.run_until(net.now + BOUND);
        assert_eq!(net.actives(), vec![2]);
        let now = net.now;
        let inc3 = net.next_inc - 2; // 1, 2, 3 started in order
        let probe = |seq: u32, one: MemberState| Message {
            incarnation: inc3,
            ..msg(
                MessageKind::Probe,
                3,
                seq,
                vec![
                    Entry { member: 1, state: one, heard: one != MemberState::Down },
                    Entry { member: 2, state: MemberState::Active, heard: true },
                ],
            )
        };
        let m = net.m(2);
        m.handle_datagram(&probe(1 << 30, MemberState::Active).encode().unwrap(), now).unwrap();
        assert_eq!(m.local_state(), MemberState::Standby);
        assert_eq!(m.stats().step_downs, 1);
        m.handle_datagram(&probe((1 << 30) + 1, MemberState::Down).encode().unwrap(), now).unwrap();
        m.handle_timeout(now + 2 * I);
        assert_eq!(m.local_state(), MemberState::Active);
    }

    #[test]
    fn an_active_that_a_majority_cannot_hear_steps_down() {
        // 1's datagrams reach nobody, while it hears 2 and 3: they take it
        // for dead and 2 takes over. 1 keeps a quorum of members it hears,
        // but their probes say they do not hear it, and it yields.
        let mut net = ha3();
        net.blocked.insert((1, 2));
        net.blocked.insert((1, 3));
        // 1 yields on the first probe after 2's takeover that reports it
        // unheard: the two overlap for at most a probe interval (they
        // cannot hear each other's conflict, only 1 hears 2).
        let mut overlap = 0;
        net.run_checked(net.now + BOUND + 2 * I, |n| overlap += u64::from(n.actives().len() > 1));
        assert!(overlap * 100_000 <= I + 2 * LAT, "two Actives for {overlap} steps of 100 µs");
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(1), MemberState::Standby);
        assert!(net.nodes[&1].m.has_quorum());
        net.run_checked(net.now + 300 * MS, |n| assert_eq!(n.actives(), vec![2]));
    }

    #[test]
    fn a_member_that_cannot_receive_does_not_hold_up_the_election() {
        // Nothing reaches the Active any more (an inbound filter): it loses
        // its quorum and steps down. Its peers still hear it, Standby and
        // first by id, but its probes say it hears nobody, so they pass it
        // over and 2 takes over.
        let mut net = ha3();
        net.blocked.insert((2, 1));
        net.blocked.insert((3, 1));
        let t = net.now;
        net.run_checked(t + BOUND + 3 * I, |n| assert!(n.actives().len() <= 1, "{:?}", n.actives()));
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(1), MemberState::Standby);
        net.run_checked(net.now + 300 * MS, |n| assert_eq!(n.actives(), vec![2]));
        // Healed, 1 stays Standby (no pre-emption).
        net.heal();
        net.run_checked(net.now + 300 * MS, |n| assert_eq!(n.actives(), vec![2]));
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    /// The Active's loop stalls past a dead window: its peer takes over (it
    /// cannot tell a stall from a death). When the stalled member resumes,
    /// it reads the peer's probes reporting it `DOWN` before it sends
    /// anything, and yields at once: never two Actives that both send, and
    /// no second switch-over back to the lower id.
    #[test]
    fn stalled_active_yields_to_the_peer_that_took_over() {
        let mut net = ha(2);
        assert_eq!(net.actives(), vec![1]);
        net.pause(1);
        let t = net.now;
        net.run_until(t + DEAD as Nanos * I + 3 * I);
        assert_eq!(net.state(2), MemberState::Active, "the peer took over during the stall");
        net.resume(1);
        assert_eq!(net.state(1), MemberState::Standby, "yields on reading the queued probes");
        let t = net.now;
        net.run_checked(t + 500 * MS, |n| assert_eq!(n.actives(), vec![2]));
        assert_eq!(net.nodes[&1].m.stats().step_downs, 1);
        assert_eq!(net.nodes[&2].m.stats().step_downs, 0);
        assert_eq!(net.nodes[&2].m.stats().failovers, 1);
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    /// A Standby's loop stalls just after the Active dies. The Active's
    /// last probes, read after the stall, count from when they arrived
    /// (`handle_datagram_received`), and the stall itself gives the peers
    /// only two probe intervals to be heard (`STALL_GRACE_INTERVALS`), so
    /// this Standby's verdict, which the other Standby waits for (until
    /// then it vouches for the Active), is not late: the failover ends
    /// within the bound, or two probe intervals after the stall where the
    /// stall outlasts it. It took up to the stall plus a dead window when the probes
    /// counted from when they were read and the whole stall was credited to
    /// the peers (70 ms after a 20 ms stall, 90 ms after 40 ms).
    #[test]
    fn a_standby_stall_does_not_delay_the_failover() {
        for stall_ms in [5, 20, 34, 40, 45, 70, 120] {
            for offset_ms in [0, 3, 7] {
                let mut net = ha3();
                let t0 = net.now;
                net.kill(1);
                net.run_until(t0 + offset_ms * MS);
                net.pause(2);
                let t = net.now;
                net.run_until(t + stall_ms * MS);
                net.resume(2);
                let resumed = net.now;
                let mut took_over = None;
                net.run_checked(resumed + BOUND + 5 * I, |n| {
                    assert!(n.actives().len() <= 1, "{:?}", n.actives());
                    if took_over.is_none() && !n.actives().is_empty() {
                        took_over = Some(n.now);
                    }
                });
                let took_over = took_over.expect("nobody took over");
                assert!(
                    // (a network delay and the check's 100 µs step)
                    took_over <= (t0 + BOUND).max(resumed + STALL_GRACE_INTERVALS * I + 3 * LAT),
                    "stall {stall_ms} ms from {offset_ms} ms: failover took {:.1} ms",
                    (took_over - t0) as f64 / 1e6
                );
                assert_eq!(net.actives(), vec![2]);
                assert!(net.errors.is_empty(), "{:?}", net.errors);
            }
        }
    }

    #[test]
    fn attention_flag() {
        let mut net = ha3();
        let t = net.now;
        net.m(1).set_attention(true, t);
        assert_eq!(net.state(1), MemberState::ActiveAttention);
        net.run_until(t + 2 * LAT);
        assert_eq!(net.nodes[&2].m.members()[1].state, MemberState::ActiveAttention);
        assert_eq!(net.actives(), vec![1]);
        {
            let t = net.now;
            net.m(1).set_attention(false, t)
        };
        assert_eq!(net.state(1), MemberState::Active);
        assert!(!net.events(1).contains(&MembershipEvent::LostActive));

        // A Standby with the flag set takes over in ACTIVE ATTENTION.
        {
            let t = net.now;
            net.m(2).set_attention(true, t)
        };
        assert_eq!(net.state(2), MemberState::Standby);
        net.kill(1);
        net.run_until(net.now + BOUND);
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(2), MemberState::ActiveAttention);
        {
            let t = net.now;
            net.m(2).set_attention(false, t)
        };
        assert_eq!(net.state(2), MemberState::Active);
    }

    #[test]
    fn request_standby_moves_active() {
        let mut net = ha3();
        // Remote command from 3 to the Active 1.
        {
            let t = net.now;
            net.m(3).request_standby(1, t)
        };
        let t = net.now;
        net.run_checked(t + 5 * MS, |n| assert!(n.actives().len() <= 1));
        assert_eq!(net.actives(), vec![2]);
        assert_eq!(net.state(1), MemberState::Standby);
        assert_eq!(net.nodes[&3].m.stats().commands_sent, 1);
        assert_eq!(net.nodes[&1].m.stats().commands_received, 1);
        net.run_checked(net.now + 500 * MS, |n| assert_eq!(n.actives(), vec![2]));
        // Local request on the Active 2: 1 (yield cleared) takes over.
        {
            let t = net.now;
            net.m(2).request_standby(2, t)
        };
        net.run_until(net.now + 5 * MS);
        assert_eq!(net.actives(), vec![1]);
        assert_eq!(net.state(2), MemberState::Standby);
        // Asking a Standby is ignored.
        {
            let t = net.now;
            net.m(3).request_standby(3, t)
        };
        assert_eq!(net.state(3), MemberState::Standby);
        assert_eq!(net.nodes[&3].m.stats().commands_ignored, 1);
        // Alone of three, the Active has no quorum left and steps down (a
        // pair keeps its Active: see a_pair_needs_no_quorum).
        net.kill(3);
        net.kill(2);
        net.run_until(net.now + BOUND + I);
        assert_eq!(net.state(1), MemberState::Standby);
        assert!(net.errors.is_empty(), "{:?}", net.errors);
    }

    #[test]
    fn single_member_becomes_active() {
        let mut m = Membership::new(MembershipParams::new(1, 5, vec![], Mode::HighAvailability, 9), 0).unwrap();
        assert_eq!(m.local_state(), MemberState::Down);
        m.set_synced(1);
        assert_eq!(m.local_state(), MemberState::Active);
        assert_eq!(m.sync_source(), None);
        let evs: Vec<_> = core::iter::from_fn(|| m.poll_event()).collect();
        assert_eq!(
            evs,
            vec![
                MembershipEvent::LocalStateChanged { from: MemberState::Down, to: MemberState::Ready },
                MembershipEvent::LocalStateChanged { from: MemberState::Ready, to: MemberState::Active },
                MembershipEvent::BecameActive,
            ]
        );
        assert!(m.poll_timeout().unwrap() > 1);
    }

    #[test]
    fn params_checked() {
        let ok = params(1, 3, Mode::HighAvailability, 1);
        assert!(Membership::new(ok.clone(), 0).is_ok());
        let bad = |f: &dyn Fn(&mut MembershipParams)| {
            let mut p = ok.clone();
            f(&mut p);
            Membership::new(p, 0).err()
        };
        assert_eq!(bad(&|p| p.incarnation = 0), Some(ParamError::ZeroIncarnation));
        assert_eq!(bad(&|p| p.probe_interval_ns = 0), Some(ParamError::ZeroProbeInterval));
        assert_eq!(bad(&|p| p.dead_after = 1), Some(ParamError::DeadAfterTooSmall(1)));
        assert_eq!(bad(&|p| p.probe_interval_ns = u64::MAX), Some(ParamError::DeadWindowOverflow));
        assert_eq!(bad(&|p| p.peers = vec![2, 1]), Some(ParamError::PeerIsSelf(1)));
        assert_eq!(bad(&|p| p.peers = vec![2, 3, 2]), Some(ParamError::DuplicatePeer(2)));
        assert_eq!(bad(&|p| p.peers = (2..=66).collect()), Some(ParamError::TooManyPeers(65)));
        assert!(Membership::new(MembershipParams { peers: (2..=65).collect(), ..ok }, 0).is_ok());
    }

    #[test]
    fn state_names_and_serde() {
        let names: Vec<String> = MemberState::ALL.iter().map(|s| s.to_string()).collect();
        assert_eq!(names, ["DOWN", "READY", "STANDBY", "ACTIVE", "ACTIVE ATTENTION"]);
        let json: Vec<String> = MemberState::ALL.iter().map(|s| serde_json::to_string(s).unwrap()).collect();
        assert_eq!(json, ["\"down\"", "\"ready\"", "\"standby\"", "\"active\"", "\"active_attention\""]);
        for s in MemberState::ALL {
            assert_eq!(MemberState::from_wire(s.to_wire()), Some(s));
        }
        assert_eq!(MemberState::from_wire(0), None);
    }

    // ---- wire format ----

    fn msg(kind: MessageKind, sender: u16, seq: u32, entries: Vec<Entry>) -> Message {
        Message {
            kind,
            yielding: false,
            cluster_id: CLUSTER,
            sender,
            incarnation: 77,
            seq,
            state: MemberState::Standby,
            mode: Mode::HighAvailability,
            digest: 0x1234_5678_9abc_def0,
            entries,
        }
    }

    fn probe_from(sender: u16, seq: u32) -> Message {
        let entries = [1u16, 2, 3]
            .into_iter()
            .filter(|&x| x != sender)
            .map(|member| Entry::new(member, MemberState::Standby))
            .collect();
        msg(MessageKind::Probe, sender, seq, entries)
    }

    /// Writes a correct checksum into raw bytes.
    fn reseal(b: &mut [u8]) {
        if b.len() >= HEADER_SIZE {
            let c = checksum(b);
            b[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&c.to_le_bytes());
        }
    }

    #[test]
    fn encode_parse_roundtrip() {
        let mut y = msg(MessageKind::StateChange, 2, 9, vec![Entry::new(2, MemberState::Standby)]);
        y.yielding = true;
        let cases = [
            probe_from(2, 1),
            msg(MessageKind::Probe, 2, u32::MAX, vec![]),
            msg(MessageKind::Query, 3, 5, vec![]),
            msg(MessageKind::StateChange, 2, 6, vec![Entry::new(1, MemberState::Standby)]),
            y,
        ];
        for m in cases {
            let b = m.encode().unwrap();
            assert_eq!(b.len(), HEADER_SIZE + m.entries.len() * ENTRY_SIZE);
            assert_eq!(&b[..4], b"NCCP");
            let v = Message::parse(&b).unwrap();
            assert_eq!(v.to_message(), m);
        }
        let full =
            msg(MessageKind::Probe, 100, 1, (0..64).map(|member| Entry::new(member, MemberState::Down)).collect());
        assert_eq!(full.encode().unwrap().len(), MAX_MESSAGE);
    }

    #[test]
    fn encode_refuses_what_parse_refuses() {
        let e = |m: Message| m.encode().err();
        let mut m = probe_from(2, 1);
        m.entries.reverse();
        assert_eq!(e(m), Some(CcpError::BadEntry { index: 1 }));
        let m = msg(MessageKind::Probe, 2, 1, vec![Entry::new(2, MemberState::Down)]);
        assert_eq!(e(m), Some(CcpError::BadEntry { index: 0 }));
        let m = msg(MessageKind::Query, 2, 1, vec![Entry::new(1, MemberState::Down)]);
        assert_eq!(e(m), Some(CcpError::BadCount { kind: MessageKind::Query, count: 1 }));
        let m = msg(MessageKind::StateChange, 2, 1, vec![]);
        assert_eq!(e(m), Some(CcpError::BadCount { kind: MessageKind::StateChange, count: 0 }));
        let m = msg(MessageKind::StateChange, 2, 1, vec![Entry::new(2, MemberState::Active)]);
        assert_eq!(e(m), Some(CcpError::BadEntry { index: 0 }));
        let mut m = probe_from(2, 1);
        m.yielding = true;
        m.state = MemberState::Active;
        assert_eq!(e(m), Some(CcpError::BadFlags(FLAG_YIELD)));
        let mut m = probe_from(2, 1);
        m.incarnation = 0;
        assert_eq!(e(m), Some(CcpError::ZeroIncarnation));
        let m =
            msg(MessageKind::Probe, 2, 1, (0..65).map(|member| Entry::new(member + 3, MemberState::Down)).collect());
        assert_eq!(e(m), Some(CcpError::TooManyEntries(65)));
    }

    #[test]
    fn parser_faults_are_named() {
        let good = probe_from(2, 1).encode().unwrap();
        let p = |b: &[u8]| Message::parse(b).err();
        assert_eq!(p(&good[..10]), Some(CcpError::Truncated { need: HEADER_SIZE, have: 10 }));
        assert_eq!(p(&good[..good.len() - 1]), Some(CcpError::Truncated { need: good.len(), have: good.len() - 1 }));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(p(&long), Some(CcpError::TrailingBytes { extra: 1 }));
        let edit = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            reseal(&mut b);
            b
        };
        assert_eq!(p(&edit(0, b'X')), Some(CcpError::BadMagic(u32::from_le_bytes(*b"XCCP"))));
        assert_eq!(p(&edit(4, 1)), Some(CcpError::BadVersion(1)), "version 1 had no heard flag");
        assert_eq!(p(&edit(5, 9)), Some(CcpError::BadKind(9)));
        assert_eq!(p(&edit(7, 1)), Some(CcpError::BadFlags(0x100)));
        assert_eq!(p(&edit(20, 0)), Some(CcpError::BadState(0)));
        assert_eq!(p(&edit(21, 3)), Some(CcpError::BadMode(3)));
        assert_eq!(p(&edit(23, 1)), Some(CcpError::ReservedNonZero));
        assert_eq!(p(&edit(HEADER_SIZE + 2, 6)), Some(CcpError::BadState(6)));
        assert_eq!(p(&edit(HEADER_SIZE + 3, 2)), Some(CcpError::BadEntryFlags { index: 0, flags: 2 }));
        assert!(p(&edit(HEADER_SIZE + 3, ENTRY_FLAG_HEARD)).is_none(), "a PROBE entry may say heard");
        let mut change =
            msg(MessageKind::StateChange, 2, 1, vec![Entry::new(2, MemberState::Standby)]).encode().unwrap();
        change[HEADER_SIZE + 3] = ENTRY_FLAG_HEARD;
        reseal(&mut change);
        assert_eq!(
            p(&change),
            Some(CcpError::BadEntryFlags { index: 0, flags: ENTRY_FLAG_HEARD }),
            "only PROBEs say heard"
        );
        let mut b = good.clone();
        b[12..16].fill(0);
        reseal(&mut b);
        assert_eq!(p(&b), Some(CcpError::ZeroIncarnation));
        let mut b = good.clone();
        b[HEADER_SIZE] ^= 1;
        assert!(matches!(p(&b), Some(CcpError::Checksum { .. })));
        assert_eq!(p(&[]), Some(CcpError::Truncated { need: HEADER_SIZE, have: 0 }));
    }

    #[test]
    fn bad_datagrams_rejected_and_counted() {
        let mut m = Membership::new(params(1, 3, Mode::HighAvailability, 5), 0).unwrap();
        let good = probe_from(2, 1).encode().unwrap();
        let mut t = 1;
        let mut feed = |m: &mut Membership, b: &[u8]| {
            t += 1;
            m.handle_datagram(b, t).err()
        };
        // Malformed.
        assert!(matches!(feed(&mut m, &good[..good.len() - 2]), Some(CcpError::Truncated { .. })));
        let mut b = good.clone();
        b[0] = 0;
        assert!(matches!(feed(&mut m, &b), Some(CcpError::BadMagic(_))));
        let mut b = good.clone();
        b[CHECKSUM_OFFSET] ^= 0xFF;
        assert!(matches!(feed(&mut m, &b), Some(CcpError::Checksum { .. })));
        let mut b = msg(MessageKind::Probe, 2, 1, vec![]).encode().unwrap();
        b[22] = 65;
        b.extend((0..65u16).flat_map(|i| {
            let mut e = [0u8; 4];
            e[..2].copy_from_slice(&(i + 10).to_le_bytes());
            e[2] = 1;
            e
        }));
        reseal(&mut b);
        assert_eq!(feed(&mut m, &b), Some(CcpError::TooManyEntries(65)));
        assert_eq!(m.stats().malformed, 4);
        // Well-formed but not for us.
        let mut other = probe_from(2, 1);
        other.cluster_id = 8;
        assert_eq!(feed(&mut m, &other.encode().unwrap()), Some(CcpError::WrongCluster { expected: CLUSTER, got: 8 }));
        assert_eq!(feed(&mut m, &probe_from(1, 1).encode().unwrap()), Some(CcpError::OwnMemberId(1)));
        assert_eq!(feed(&mut m, &probe_from(9, 1).encode().unwrap()), Some(CcpError::UnknownMember(9)));
        let mut ls = probe_from(2, 1);
        ls.mode = Mode::LoadSharing;
        assert!(matches!(feed(&mut m, &ls.encode().unwrap()), Some(CcpError::ModeMismatch { .. })));
        let s = m.stats();
        assert_eq!((s.rejected, s.foreign_cluster, s.unknown_sender), (4, 1, 2));
        assert_eq!(m.members()[1].incarnation, 0, "nothing was learnt from refused datagrams");
        // Accepted, then the duplicate is stale.
        assert_eq!(feed(&mut m, &good), None);
        assert_eq!(feed(&mut m, &good), Some(CcpError::Stale { member: 2 }));
        assert_eq!(feed(&mut m, &probe_from(2, 0).encode().unwrap()), Some(CcpError::Stale { member: 2 }));
        assert_eq!(feed(&mut m, &probe_from(2, 2).encode().unwrap()), None);
        let s = m.stats();
        assert_eq!((s.malformed, s.rejected, s.stale, s.probes_received), (4, 6, 2, 2));
        // Entries about unknown members are ignored.
        let mut p = probe_from(2, 3);
        p.entries.push(Entry::new(40, MemberState::Active));
        assert_eq!(feed(&mut m, &p.encode().unwrap()), None);
        assert_eq!(m.peer_report(2).map(<[Entry]>::len), Some(2));
    }

    #[test]
    fn restart_and_previous_incarnation() {
        let mut m = Membership::new(params(1, 2, Mode::HighAvailability, 5), 0).unwrap();
        let a = probe_from(2, 10);
        m.handle_datagram(&a.encode().unwrap(), 1).unwrap();
        assert_eq!(m.members()[1].state, MemberState::Standby);
        while m.poll_event().is_some() {}
        let mut b = msg(MessageKind::Query, 2, 1, vec![]);
        b.incarnation = 78;
        b.state = MemberState::Down;
        m.handle_datagram(&b.encode().unwrap(), 2).unwrap();
        let evs: Vec<_> = core::iter::from_fn(|| m.poll_event()).collect();
        assert_eq!(
            evs,
            vec![
                MembershipEvent::PeerRestarted { member: 2 },
                MembershipEvent::PeerStateChanged { member: 2, from: MemberState::Standby, to: MemberState::Down },
            ]
        );
        assert_eq!(m.members()[1].incarnation, 78);
        // The QUERY is answered by a PROBE to the asker (after the start QUERY).
        let tx: Vec<_> = core::iter::from_fn(|| m.poll_transmit()).collect();
        let last = tx.last().unwrap();
        assert_eq!(last.dest, Destination::Member(2));
        assert_eq!(Message::parse(&last.bytes).unwrap().header.kind, MessageKind::Probe);
        // A late message of the old incarnation is stale, not a restart.
        assert_eq!(m.handle_datagram(&probe_from(2, 11).encode().unwrap(), 3), Err(CcpError::Stale { member: 2 }));
        assert_eq!(m.stats().peer_restarts, 1);
    }

    #[test]
    fn death_and_revival_same_incarnation() {
        let mut m = Membership::new(params(1, 2, Mode::HighAvailability, 5), 0).unwrap();
        m.handle_datagram(&probe_from(2, 1).encode().unwrap(), 0).unwrap();
        let deadline = m.poll_timeout().unwrap();
        assert_eq!(deadline, I, "first probe due before the dead window");
        // Driven as a host loop does: at every probe.
        for k in 1..DEAD as Nanos {
            m.handle_timeout(k * I);
        }
        m.handle_timeout(DEAD as Nanos * I - 1);
        assert!(m.members()[1].alive);
        m.handle_timeout(DEAD as Nanos * I);
        assert!(!m.members()[1].alive);
        assert_eq!(m.members()[1].state, MemberState::Down);
        let evs: Vec<_> = core::iter::from_fn(|| m.poll_event()).collect();
        assert!(evs.contains(&MembershipEvent::PeerDied { member: 2 }));
        m.handle_datagram(&probe_from(2, 2).encode().unwrap(), DEAD as Nanos * I + 5).unwrap();
        assert!(m.members()[1].alive);
        assert_eq!(m.members()[1].state, MemberState::Standby);
        assert_eq!(m.stats().peer_restarts, 0);
    }

    /// A stall read back as badly as a loop can: the member's timers run
    /// before it reads its socket, and the socket kept only the oldest
    /// datagrams of the stall or none (a full buffer drops the newest). The
    /// Active's next probe still comes within the life the stall leaves it
    /// (`STALL_GRACE_INTERVALS`): the stalled Standby does not take over.
    /// (This network's delay is fixed, so one interval of life would do
    /// here; the second is for a real network's jitter and timer slack.)
    #[test]
    fn a_stalled_standby_that_read_only_the_oldest_datagrams_keeps_its_active() {
        for timers_first in [false, true] {
            for cap in [0, 3] {
                for k in 0..8 {
                    let mut net = ha(2);
                    net.backlog_cap = cap;
                    net.pause(2);
                    let t = net.now;
                    let stall = 3 * DEAD as Nanos * I + k * 1_300_000;
                    net.run_until(t + stall);
                    net.resume_with(2, timers_first);
                    let t = net.now;
                    net.run_checked(t + 300 * MS, |n| assert_eq!(n.actives(), vec![1], "stall {stall} cap {cap}"));
                    assert_eq!(net.state(2), MemberState::Standby);
                    assert_eq!(net.nodes[&2].m.stats().peer_deaths, 0, "stall {stall} cap {cap} {timers_first}");
                    assert!(net.errors.is_empty(), "{:?}", net.errors);
                }
            }
        }
    }

    /// A member whose own loop did not run for several dead windows does
    /// not take its peer for dead: the peer's probes waited unread, and the
    /// first one read keeps it alive. Silence while the member runs still
    /// kills it after the dead window.
    #[test]
    fn a_members_own_stall_is_not_held_against_its_peers() {
        let mut m = Membership::new(params(1, 2, Mode::HighAvailability, 5), 0).unwrap();
        m.handle_datagram(&probe_from(2, 1).encode().unwrap(), 0).unwrap();
        let stall = 3 * DEAD as Nanos * I;
        m.handle_datagram(&probe_from(2, 2).encode().unwrap(), stall).unwrap();
        let evs: Vec<_> = core::iter::from_fn(|| m.poll_event()).collect();
        assert!(!evs.contains(&MembershipEvent::PeerDied { member: 2 }), "{evs:?}");
        assert!(m.members()[1].alive);
        assert_eq!(m.stats().local_stalls, 1);
        // Now running at every probe, hearing nothing: dead after the window.
        let mut t = stall;
        while m.members()[1].alive {
            t += I;
            m.handle_timeout(t);
            assert!(t <= stall + DEAD as Nanos * I, "the silent peer never died");
        }
        assert_eq!(t, stall + DEAD as Nanos * I);
    }

    /// A datagram counts from when it arrived (its receive stamp): read a
    /// dead window later, it does not bring a peer taken for dead back, and
    /// an alive peer's silence counts from the stamp. A stamp ahead of the
    /// reading counts as the reading.
    #[test]
    fn a_datagram_counts_from_when_it_arrived() {
        let mut m = Membership::new(params(1, 2, Mode::HighAvailability, 5), 0).unwrap();
        m.handle_datagram(&probe_from(2, 1).encode().unwrap(), 0).unwrap();
        let mut t = 0;
        while m.members()[1].alive {
            t += I;
            m.handle_timeout(t);
        }
        let late = probe_from(2, 2).encode().unwrap();
        let now = t + I / 2;
        let arrived = now - DEAD as Nanos * I;
        assert_eq!(m.handle_datagram_received(&late, arrived, now), Err(CcpError::Late { member: 2 }));
        assert!(!m.members()[1].alive);
        assert_eq!((m.stats().late, m.stats().rejected), (1, 1));
        // Arrived within the window: alive again, heard when it arrived.
        let arrived = now - I;
        m.handle_datagram_received(&probe_from(2, 3).encode().unwrap(), arrived, now).unwrap();
        assert_eq!((m.members()[1].alive, m.members()[1].last_heard_ns), (true, Some(arrived)));
        // An older stamp than the last one does not move it back.
        m.handle_datagram_received(&probe_from(2, 4).encode().unwrap(), arrived - 1, now).unwrap();
        assert_eq!(m.members()[1].last_heard_ns, Some(arrived));
        // A stamp ahead of the reading counts as the reading.
        m.handle_datagram_received(&probe_from(2, 5).encode().unwrap(), now + I, now).unwrap();
        assert_eq!(m.members()[1].last_heard_ns, Some(now));
    }

    #[test]
    fn queues_are_bounded() {
        let mut m = Membership::new(params(1, 2, Mode::HighAvailability, 5), 0).unwrap();
        for seq in 1..=(TX_QUEUE_LIMIT as u32 + 100) {
            let q = msg(MessageKind::Query, 2, seq, vec![]);
            m.handle_datagram(&q.encode().unwrap(), seq as Nanos).unwrap();
        }
        let n = core::iter::from_fn(|| m.poll_transmit()).count();
        assert_eq!(n, TX_QUEUE_LIMIT);
        assert_eq!(m.stats().tx_drops, 101); // 1 QUERY at start + 256 answers fit
        for seq in 0..(EVENT_QUEUE_LIMIT as u32 + 10) {
            let mut p = probe_from(2, 1000 + seq);
            p.state = if seq % 2 == 0 { MemberState::Down } else { MemberState::Standby };
            m.handle_datagram(&p.encode().unwrap(), 1000 + seq as Nanos).unwrap();
            while m.poll_transmit().is_some() {}
        }
        assert_eq!(core::iter::from_fn(|| m.poll_event()).count(), EVENT_QUEUE_LIMIT);
        assert!(m.stats().events_dropped > 0);
    }

    /// xorshift64*, deterministic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    #[test]
    fn fuzz_never_panics() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        let mut m = Membership::new(params(1, 4, Mode::HighAvailability, 5), 0).unwrap();
        m.set_synced(0);
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        for s in [2u16, 3, 4] {
            seeds.push(probe_from(s, 1).encode().unwrap());
            seeds.push(msg(MessageKind::Query, s, 1, vec![]).encode().unwrap());
            seeds
                .push(msg(MessageKind::StateChange, s, 1, vec![Entry::new(1, MemberState::Standby)]).encode().unwrap());
            let mut a = msg(MessageKind::StateChange, s, 1, vec![Entry::new(s, MemberState::Active)]);
            a.state = MemberState::Active;
            seeds.push(a.encode().unwrap());
        }
        let mut now = 0;
        let mut accepted = 0u64;
        for _ in 0..10_000 {
            let mut b = match rng.below(4) {
                0 => (0..rng.below(400)).map(|_| rng.next() as u8).collect::<Vec<u8>>(),
                _ => {
                    let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
                    for _ in 0..=rng.below(4) {
                        match rng.below(4) {
                            0 => b.truncate(rng.below(b.len() as u64 + 1) as usize),
                            1 => b.push(rng.next() as u8),
                            _ => {
                                if !b.is_empty() {
                                    let at = rng.below(b.len() as u64) as usize;
                                    b[at] = rng.next() as u8;
                                }
                            }
                        }
                    }
                    b
                }
            };
            if rng.below(2) == 0 {
                // Past the checksum, so the deeper checks are exercised too.
                reseal(&mut b);
            }
            let _ = Message::parse(&b);
            now += rng.below(3 * I);
            if m.handle_datagram(&b, now).is_ok() {
                accepted += 1;
            }
            if m.poll_timeout().is_some_and(|t| t <= now) {
                m.handle_timeout(now);
            }
            if rng.below(50) == 0 {
                m.request_standby(rng.below(6) as u16, now);
            }
            while m.poll_transmit().is_some() {}
            while m.poll_event().is_some() {}
        }
        let s = m.stats();
        assert_eq!(s.malformed + s.rejected + accepted, 10_000);
        assert!(accepted > 0 && s.malformed > 0 && s.rejected > 0, "{s:?}");
        assert!(m.members().len() == 4);
    }
}
