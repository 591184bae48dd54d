//! Delta Sync: the reliable stream of table changes between cluster members.
//!
//! This is the part of the design that HyperSync puts on the NIC: every
//! change the device applies to a connection marked for sync becomes a
//! numbered delta update, updates are packed into frames
//! ([`nicsync_fwif::sync`]) on the sync port, and every peer applies them
//! in order, exactly once. The state machines here are *sans-IO*, in the
//! style of `quinn-proto`: they never read a clock, open a socket or start
//! a thread. Time is a `u64` of nanoseconds ([`Nanos`]) passed into every
//! call; the driver (the device model's core, a tokio task over UDP, or the
//! seeded simulator in `tests/sync_sim.rs`) moves bytes and time:
//!
//! ```text
//!   loop {
//!       feed received datagrams:  x.handle_datagram(bytes, now)
//!       feed expired timers:      if x.poll_timeout() <= now { x.handle_timeout(now) }
//!       send what is queued:      while let Some(t) = x.poll_transmit() { wire.send(t) }
//!       (receivers) apply:        while let Some(ev) = rx.poll_event() { … }
//!   }
//! ```
//!
//! # The protocol
//!
//! * [`DeltaSender`] (one per member) numbers each submitted update
//!   (consecutive `u64`s within an *epoch*), packs them into DELTA frames
//!   that leave when [`MAX_RECORDS`] are waiting or after a short
//!   [`SenderConfig::flush_delay_ns`], and keeps the last
//!   [`SenderConfig::queue_capacity`] updates (default 512, as ClusterXL)
//!   in a retransmit queue. It answers a NACK with a retransmission of what
//!   the queue still holds and a LOST for what fell out of it. Every
//!   [`SenderConfig::alive_interval_ns`] (default 1 s, conntrackd's ALIVE
//!   period) it sends ALIVE with its next sequence number, so receivers
//!   detect loss at the tail of the stream. It starts by sending HELLO with
//!   its epoch: a restarted sender is a new epoch, and receivers reset
//!   instead of asking a process that no longer has those numbers.
//! * [`DeltaReceiver`] (one per peer) delivers that peer's updates in
//!   sequence order exactly once ([`ReceiverEvent::Deliver`]). It buffers
//!   frames that arrive early (up to [`ReceiverConfig::reorder_capacity`]
//!   updates), drops duplicates, and when it sees a gap (from a later frame
//!   or an ALIVE) it NACKs the missing ranges, repeating after a timeout
//!   that doubles up to a ceiling. It acknowledges progress with ACK every
//!   [`ReceiverConfig::ack_every`] updates (conntrackd's window is 300) or
//!   after [`ReceiverConfig::ack_interval_ns`].
//! * **No silent divergence.** An update a receiver can no longer get (the
//!   sender answered LOST, the sender restarted with a gap outstanding, or
//!   [`ReceiverConfig::max_nack_retries`] NACKs went unanswered) is counted
//!   in [`SyncStats::lost_updates`] (in [`SyncStats::history_lost`] when it
//!   predates a HELLO adopted while the member was joining) and raises
//!   [`ReceiverEvent::ResyncNeeded`]: the member must then fetch a Full
//!   Sync, as ClusterXL does after lost updates.
//! * **Epochs.** Frames of an epoch the receiver does not know are dropped
//!   and counted ([`SyncStats::unknown_epoch`]); unless the epoch is one the
//!   receiver already retired, it then asks the sender for a HELLO (a NACK
//!   element with epoch 0), so a receiver that missed the HELLO catches up.
//!   A HELLO with a new epoch resets the receiver to the epoch's first
//!   number ([`ReceiverEvent::PeerReset`]) and is acknowledged at once; the
//!   sender repeats it to each expected peer that has not acknowledged it
//!   ([`DeltaSender::expect_peers`]).
//! * **Joining.** A member that joins (its device holds sync for a Full
//!   Sync, [`DeltaReceiver::set_joining`]) and adopts a peer's epoch from a
//!   HELLO does not ask for what the peer sent before it: that is
//!   *history*, which the Full Sync's snapshot carries. It follows the
//!   stream from the HELLO on. The snapshot's server tells at which number
//!   of each peer's stream its table was cut ([`DeltaReceiver::align`]):
//!   history up to there is covered; history after it, if any (a server
//!   that lagged that peer), is asked for. History still unaccounted for
//!   when the member stops joining without a cut (it seeded its table
//!   itself) is asked for then. Either way nothing is silently skipped:
//!   what the peer no longer has is counted in [`SyncStats::history_lost`]
//!   and raises a resync. History asked for late is delivered after the
//!   later updates already delivered: the one exception to the in-order
//!   delivery above, harmless under the conflict rule (generation, then
//!   owner; a delete's tombstone beats an older upsert for as long as the
//!   tombstone is kept).
//! * **Conflicts.** Members apply each other's updates through the device's
//!   generation rule; [`resolve`] is the deterministic order behind it
//!   (generation, then owner member id, then the record itself), so members
//!   converge whatever order updates arrive in.
//!
//! | here | ClusterXL / HyperSync | conntrackd (FTFW) |
//! |---|---|---|
//! | DELTA, sequence number per update | delta sync packet, sequence number | data message, `seq` |
//! | retransmit queue (512) | "sending queue" of 512 updates | resend queue (131072) |
//! | NACK | retransmission request | NACK |
//! | LOST → [`ReceiverEvent::ResyncNeeded`] | lost updates → full sync | `conntrackd -n` (request resync) |
//! | ALIVE every interval | — (CCP probes report health, not stream position) | ALIVE every second |
//! | ACK every N updates | — | ACK window (300) |
//! | HELLO with a new epoch | member restart → full sync | HELLO |
//! | [`SyncStats`] | `cphaprob syncstat` | `conntrackd -s` |
//!
//! The defaults here are for a NIC on a dedicated sync link: a 50 µs flush
//! delay, a 200 µs grace before the first NACK (reordering), then NACKs
//! after 2 ms, 4 ms, … up to 100 ms, giving up after 20 unanswered (about
//! 1.5 s).
//!
//! **Sizing the queue.** The retransmit queue covers
//! `queue_capacity / update rate` seconds of history; a gap must be NACKed
//! and answered within that window, or it becomes a LOST. ClusterXL's 512
//! updates cover 1 s at 512 updates/s but only 0.34 ms at 1.5 million
//! updates/s (500,000 connections/s with three updates each), less than a
//! NACK round trip with these timers. At such rates configure a queue of
//! the size conntrackd uses (131,072 updates: 87 ms at 1.5 M/s, 11.5 MB of
//! 88-byte records), and keep the NACK ceiling well inside the window, so
//! that several NACKs fit in it (the simulator uses a 8 ms ceiling against
//! a window of about 200 ms at 20 % loss).
//!
//! # Limits
//!
//! * Updates a sender emitted after the last frame that reached a receiver,
//!   just before it crashed, cannot be detected by that receiver: no later
//!   frame names them (conntrackd has the same window, up to one ALIVE
//!   period). The restart itself is visible ([`ReceiverEvent::PeerReset`])
//!   and is a membership event: the restarted member full-syncs, and its
//!   connections are taken over from the state its peers hold.
//! * Frames carry a checksum, not a MAC: a well-formed frame with the right
//!   cluster, sender and epoch is believed. The sync network must be
//!   trusted or isolated, as ClusterXL's and conntrackd's are.
//! * Buffers are bounded by configuration (retransmit queue, reorder
//!   buffer, transmit queues, ACK table). Delivery events accumulate until
//!   [`DeltaReceiver::poll_event`] drains them: at most a frame's records
//!   plus the reorder buffer per call.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};

use nicsync_fwif::sync::{
    AckEntry, Body, DeltaRecord, DeltaUpdate, DeltaWriter, EncodeError, Frame, FrameError, FrameView, Origin,
    RecordFault, SeqRange, SyncOpcode, MAX_FRAME, MAX_RANGES, MAX_RECORDS,
};

/// Time in nanoseconds, from an origin the caller chooses (monotonic).
pub type Nanos = u64;

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Every member of the cluster (multicast/broadcast on the sync network).
    All,
    /// One member.
    Member(u16),
}

/// A frame to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where it goes.
    pub dest: Destination,
    /// The encoded frame (at most [`MAX_FRAME`] bytes).
    pub frame: Vec<u8>,
}

/// Delta Sync counters, named as `nicsync syncstat` reports them. A sender
/// fills the sender fields, a receiver the receiver fields; [`SyncStats::merge`]
/// adds a member's together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Updates sent for the first time (sender).
    pub updates_sent: u64,
    /// Updates delivered in order, each once (receiver).
    pub updates_received: u64,
    /// Frames sent, retransmissions and control frames included.
    pub frames_sent: u64,
    /// Frames accepted (well-formed, this cluster, addressed here, known epoch).
    pub frames_received: u64,
    /// Ranges asked for in NACKs (receiver).
    pub retrans_requests_sent: u64,
    /// NACK ranges received (sender).
    pub retrans_requests_received: u64,
    /// Updates sent again in answer to NACKs (sender).
    pub retrans_updates_sent: u64,
    /// Updates this receiver will never get; each raised a resync (receiver).
    /// History a joining member could not get is counted apart, in
    /// [`SyncStats::history_lost`].
    pub lost_updates: u64,
    /// Updates a peer had sent before a HELLO this receiver adopted while
    /// the member was joining (its device held sync: a Full Sync was about
    /// to replace its table), that the peer no longer had (receiver). They
    /// raise a resync like any loss. Whether a number is history is fixed
    /// when the HELLO is adopted; it is asked for only where the Full
    /// Sync's cut does not cover it ([`DeltaReceiver::align`], once the
    /// pull is done), or when the member stops joining without a cut: by
    /// then the member may be synced, and the resync is a merge.
    pub history_lost: u64,
    /// History a Full Sync's cut covered, so that it was never asked for
    /// (receiver; see [`DeltaReceiver::align`]).
    pub history_covered: u64,
    /// Updates named in LOST answers (sender).
    pub lost_updates_reported: u64,
    /// [`ReceiverEvent::ResyncNeeded`] events raised (receiver).
    pub resyncs_requested: u64,
    /// Updates received again after delivery or while buffered (receiver).
    pub duplicates: u64,
    /// Updates in the retransmit queue now (sender gauge).
    pub queue_depth: u64,
    /// Updates held out of order now (receiver gauge).
    pub reorder_depth: u64,
    /// Updates not buffered because the reorder buffer was full; they are
    /// asked for again (receiver).
    pub reorder_drops: u64,
    /// Frames dropped because the transmit queue was full.
    pub tx_drops: u64,
    /// Datagrams refused by [`Frame::parse`].
    pub malformed: u64,
    /// Well-formed frames of another cluster.
    pub foreign_cluster: u64,
    /// Frames of an epoch this receiver does not know (stale or unannounced).
    pub unknown_epoch: u64,
    /// Epochs started by the peer and adopted (receiver; the first counts).
    pub epoch_changes: u64,
    /// HELLO frames sent (sender).
    pub hello_sent: u64,
    /// HELLO requests sent (receiver).
    pub hello_requests_sent: u64,
    /// ALIVE frames sent (sender).
    pub alive_sent: u64,
    /// ACK frames sent (receiver).
    pub acks_sent: u64,
    /// ACK elements received for this sender's current epoch (sender).
    pub acks_received: u64,
}

impl SyncStats {
    /// Adds `o` field by field, saturating (gauges too: a member's total).
    pub fn merge(&mut self, o: &SyncStats) {
        self.updates_sent = self.updates_sent.saturating_add(o.updates_sent);
        self.updates_received = self.updates_received.saturating_add(o.updates_received);
        self.frames_sent = self.frames_sent.saturating_add(o.frames_sent);
        self.frames_received = self.frames_received.saturating_add(o.frames_received);
        self.retrans_requests_sent = self.retrans_requests_sent.saturating_add(o.retrans_requests_sent);
        self.retrans_requests_received = self.retrans_requests_received.saturating_add(o.retrans_requests_received);
        self.retrans_updates_sent = self.retrans_updates_sent.saturating_add(o.retrans_updates_sent);
        self.lost_updates = self.lost_updates.saturating_add(o.lost_updates);
        self.history_lost = self.history_lost.saturating_add(o.history_lost);
        self.history_covered = self.history_covered.saturating_add(o.history_covered);
        self.lost_updates_reported = self.lost_updates_reported.saturating_add(o.lost_updates_reported);
        self.resyncs_requested = self.resyncs_requested.saturating_add(o.resyncs_requested);
        self.duplicates = self.duplicates.saturating_add(o.duplicates);
        self.queue_depth = self.queue_depth.saturating_add(o.queue_depth);
        self.reorder_depth = self.reorder_depth.saturating_add(o.reorder_depth);
        self.reorder_drops = self.reorder_drops.saturating_add(o.reorder_drops);
        self.tx_drops = self.tx_drops.saturating_add(o.tx_drops);
        self.malformed = self.malformed.saturating_add(o.malformed);
        self.foreign_cluster = self.foreign_cluster.saturating_add(o.foreign_cluster);
        self.unknown_epoch = self.unknown_epoch.saturating_add(o.unknown_epoch);
        self.epoch_changes = self.epoch_changes.saturating_add(o.epoch_changes);
        self.hello_sent = self.hello_sent.saturating_add(o.hello_sent);
        self.hello_requests_sent = self.hello_requests_sent.saturating_add(o.hello_requests_sent);
        self.alive_sent = self.alive_sent.saturating_add(o.alive_sent);
        self.acks_sent = self.acks_sent.saturating_add(o.acks_sent);
        self.acks_received = self.acks_received.saturating_add(o.acks_received);
    }
}

/// Why a configuration is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Epoch 0 is reserved.
    #[error("epoch 0 is reserved")]
    ZeroEpoch,
    /// Sequence number 0 is reserved.
    #[error("sequence numbers start at 1 or later")]
    ZeroFirstSeq,
    /// Records per frame outside `1..=MAX_RECORDS`.
    #[error("records per frame must be 1..={max}, not {0}", max = MAX_RECORDS)]
    RecordsPerFrame(usize),
    /// The retransmit queue must hold at least one frame's worth.
    #[error("retransmit queue of {queue} is smaller than a frame of {frame}")]
    QueueTooSmall {
        /// Configured queue capacity.
        queue: usize,
        /// Configured records per frame.
        frame: usize,
    },
    /// A limit that must be positive is 0.
    #[error("{0} must be positive")]
    Zero(&'static str),
    /// A receiver configured to receive from itself.
    #[error("a receiver's peer must differ from the local member")]
    PeerIsSelf,
}

/// Why an update was not accepted by [`DeltaSender::submit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The update would not pass [`Frame::parse`] at a peer.
    #[error("invalid update: {0}")]
    Invalid(RecordFault),
}

/// Derives a non-zero epoch from caller-provided entropy (random bytes, a
/// boot counter mixed with the time). The state machines never draw random
/// numbers themselves.
pub fn epoch_from_entropy(x: u64) -> u32 {
    let mut h = x ^ 0x9E37_79B9_7F4A_7C15;
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    ((h ^ (h >> 32)) as u32).max(1)
}

/// Configuration of a [`DeltaSender`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderConfig {
    /// Cluster id written in every frame.
    pub cluster_id: u16,
    /// This member's id.
    pub member_id: u16,
    /// This run's epoch (non-zero; random, see [`epoch_from_entropy`]).
    pub epoch: u32,
    /// Number of the first update of the epoch.
    pub first_seq: u64,
    /// Updates kept for retransmission (ClusterXL: 512).
    pub queue_capacity: usize,
    /// Records per DELTA frame (1..=[`MAX_RECORDS`]).
    pub max_records_per_frame: usize,
    /// How long a partial frame may wait for more updates.
    pub flush_delay_ns: Nanos,
    /// Send a partial frame as soon as the device has no more commands to
    /// process ([`DeltaSender::flush_when_idle`]), rather than after the
    /// flush delay: under load frames still fill (the ring is rarely empty),
    /// and a lone change leaves at once (interrupt-moderation style).
    pub flush_when_idle: bool,
    /// ALIVE period.
    pub alive_interval_ns: Nanos,
    /// Tail probe: this long after updates were sent and while some peer
    /// has not acknowledged them all, an early ALIVE tells the receivers
    /// the last number, so that a loss at the end of a burst is asked for
    /// now rather than at the next periodic ALIVE (0: off). The probe backs
    /// off by doubling, up to eight times this (and the ALIVE period).
    pub tail_probe_ns: Nanos,
    /// Frames waiting in [`DeltaSender::poll_transmit`] at most.
    pub tx_queue_limit: usize,
    /// Peers whose ACKs are remembered at most.
    pub max_peers: usize,
}

impl SenderConfig {
    /// The defaults for a member.
    pub fn new(cluster_id: u16, member_id: u16, epoch: u32) -> Self {
        SenderConfig {
            cluster_id,
            member_id,
            epoch,
            first_seq: 1,
            queue_capacity: 512,
            max_records_per_frame: MAX_RECORDS,
            flush_delay_ns: 50_000,
            flush_when_idle: false,
            alive_interval_ns: 1_000_000_000,
            tail_probe_ns: 20_000_000,
            tx_queue_limit: 1024,
            max_peers: 64,
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.epoch == 0 {
            return Err(ConfigError::ZeroEpoch);
        }
        if self.first_seq == 0 {
            return Err(ConfigError::ZeroFirstSeq);
        }
        if self.max_records_per_frame == 0 || self.max_records_per_frame > MAX_RECORDS {
            return Err(ConfigError::RecordsPerFrame(self.max_records_per_frame));
        }
        if self.queue_capacity < self.max_records_per_frame {
            return Err(ConfigError::QueueTooSmall { queue: self.queue_capacity, frame: self.max_records_per_frame });
        }
        if self.alive_interval_ns == 0 {
            return Err(ConfigError::Zero("alive_interval_ns"));
        }
        if self.tx_queue_limit == 0 {
            return Err(ConfigError::Zero("tx_queue_limit"));
        }
        Ok(())
    }
}

/// Bounded queue of frames waiting for `poll_transmit`.
#[derive(Debug)]
struct TxQueue {
    frames: VecDeque<Transmit>,
    limit: usize,
    /// Buffers of sent frames handed back ([`DeltaSender::recycle`]), each
    /// [`MAX_FRAME`] bytes long and all zero, for the next frames: a fresh
    /// zeroed allocation per frame was a tenth of a one-update delta's
    /// path through the card.
    spare: Vec<Vec<u8>>,
}

/// Sent-frame buffers a [`TxQueue`] keeps for reuse.
const SPARE_FRAMES: usize = 8;

impl TxQueue {
    fn new(limit: usize) -> Self {
        TxQueue { frames: VecDeque::new(), limit, spare: Vec::new() }
    }

    /// Queues a frame encoded by `encode` into a zeroed buffer (a recycled
    /// one if any); counts a drop when the queue is full (or, which cannot
    /// happen with checked inputs, when encoding fails).
    fn push(
        &mut self,
        stats: &mut SyncStats,
        dest: Destination,
        encode: impl FnOnce(&mut [u8]) -> Result<usize, EncodeError>,
    ) -> bool {
        if self.frames.len() >= self.limit {
            stats.tx_drops += 1;
            return false;
        }
        let mut frame = self.spare.pop().unwrap_or_else(|| vec![0u8; MAX_FRAME]);
        match encode(&mut frame) {
            Ok(len) => {
                frame.truncate(len);
                self.frames.push_back(Transmit { dest, frame });
                stats.frames_sent += 1;
                true
            }
            Err(_) => {
                self.recycle(frame);
                stats.tx_drops += 1;
                false
            }
        }
    }

    /// Takes back a frame's buffer once it is sent, zeroed over
    /// [`MAX_FRAME`] bytes, so an encoder always starts from zeros, as
    /// with a fresh buffer.
    fn recycle(&mut self, mut frame: Vec<u8>) {
        if self.spare.len() >= SPARE_FRAMES || frame.capacity() < MAX_FRAME {
            return;
        }
        frame.clear();
        frame.resize(MAX_FRAME, 0);
        self.spare.push(frame);
    }
}

/// The sending half of Delta Sync for one member (see the module docs).
#[derive(Debug)]
pub struct DeltaSender {
    cfg: SenderConfig,
    origin: Origin,
    /// Number the next submitted update gets.
    next_seq: u64,
    /// Updates submitted but not yet sent: the last `unflushed` entries of
    /// `queue`.
    unflushed: usize,
    flush_deadline: Option<Nanos>,
    /// Retransmit queue: `queue[i]` has number `queue_base + i`.
    queue: VecDeque<DeltaRecord>,
    queue_base: u64,
    alive_deadline: Nanos,
    /// Next tail probe and the wait after it.
    tail_probe: Option<(Nanos, Nanos)>,
    /// Highest ACK per peer, for the current epoch.
    acks: BTreeMap<u16, u64>,
    /// Peers expected to learn this epoch (see [`DeltaSender::expect_peers`]).
    peers: Vec<u16>,
    /// Next HELLO to the expected peers that have not acknowledged the
    /// epoch yet, and the wait after it.
    hello_retry: Option<(Nanos, Nanos)>,
    /// When HELLO was last repeated.
    hello_last: Nanos,
    tx: TxQueue,
    stats: SyncStats,
}

impl DeltaSender {
    /// A sender starting its epoch at `now`; its first frame is HELLO.
    pub fn new(cfg: SenderConfig, now: Nanos) -> Result<Self, ConfigError> {
        cfg.check()?;
        let origin = Origin { cluster_id: cfg.cluster_id, member_id: cfg.member_id, epoch: cfg.epoch };
        let mut s = DeltaSender {
            cfg,
            origin,
            next_seq: cfg.first_seq,
            unflushed: 0,
            flush_deadline: None,
            queue: VecDeque::with_capacity(cfg.queue_capacity),
            queue_base: cfg.first_seq,
            alive_deadline: now.saturating_add(cfg.alive_interval_ns),
            tail_probe: None,
            acks: BTreeMap::new(),
            peers: Vec::new(),
            hello_retry: None,
            hello_last: now,
            tx: TxQueue::new(cfg.tx_queue_limit),
            stats: SyncStats::default(),
        };
        s.send_hello(Destination::All);
        Ok(s)
    }

    /// The peers that must learn this epoch: HELLO is repeated to each one
    /// that has not acknowledged it (receivers acknowledge a HELLO at once),
    /// from [`SenderConfig::tail_probe_ns`] after the start and then at
    /// doubling intervals up to [`SenderConfig::alive_interval_ns`]. A peer
    /// that missed the HELLO (cut off when this member started) would
    /// otherwise learn the epoch only from a later frame, and until then
    /// keep waiting on what the previous epoch left unanswered, instead of
    /// closing it: this member's last changes before it restarted reach
    /// it late, after this member has written the same keys again.
    pub fn expect_peers(&mut self, peers: &[u16], now: Nanos) {
        self.peers = peers.iter().copied().filter(|p| *p != self.cfg.member_id).collect();
        let wait = self.hello_wait_min();
        self.hello_retry = (!self.peers.is_empty()).then(|| (now.saturating_add(wait), wait));
    }

    /// Expected peers that have not acknowledged this epoch yet.
    pub fn peers_unaware(&self) -> usize {
        self.unaware().count()
    }

    /// The expected peers that have not acknowledged this epoch.
    fn unaware(&self) -> impl Iterator<Item = u16> + '_ {
        self.peers.iter().copied().filter(|p| !self.acks.contains_key(p))
    }

    fn hello_wait_min(&self) -> Nanos {
        match self.cfg.tail_probe_ns {
            0 => self.cfg.alive_interval_ns.max(1),
            t => t.min(self.cfg.alive_interval_ns).max(1),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SenderConfig {
        &self.cfg
    }

    /// The epoch.
    pub fn epoch(&self) -> u32 {
        self.cfg.epoch
    }

    /// Number the next submitted update will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Oldest number still in the retransmit queue (`next_seq` when empty).
    pub fn queue_base(&self) -> u64 {
        self.queue_base
    }

    /// Counters (with the current queue depth).
    pub fn stats(&self) -> SyncStats {
        let mut s = self.stats;
        s.queue_depth = self.queue.len() as u64;
        s
    }

    /// The highest number `member` acknowledged in this epoch.
    pub fn acked_through(&self, member: u16) -> Option<u64> {
        self.acks.get(&member).copied()
    }

    /// Takes one table change: numbers it, queues it for retransmission and
    /// sends it in the current frame, which leaves when full or after the
    /// flush delay. Returns its sequence number.
    pub fn submit(&mut self, update: &DeltaUpdate, now: Nanos) -> Result<u64, SubmitError> {
        let rec = update.to_record();
        rec.validate().map_err(SubmitError::Invalid)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.queue.len() == self.cfg.queue_capacity {
            self.queue.pop_front();
            self.queue_base += 1;
        }
        self.queue.push_back(rec);
        self.unflushed += 1;
        self.stats.updates_sent += 1;
        // The tail probe asks the peers to acknowledge what they have not
        // yet: a tail probe's wait after a new update is the shortest
        // again, whatever it backed off to while earlier ones went
        // unacknowledged (under steady writes it stood at 160 ms, and a
        // stopping member, docs/cluster.md, waited for it).
        if self.cfg.tail_probe_ns > 0 {
            let soon = now.saturating_add(self.cfg.tail_probe_ns);
            if self.tail_probe.is_none_or(|(at, _)| at > soon) {
                self.tail_probe = Some((soon, self.cfg.tail_probe_ns));
            }
        }
        if self.unflushed >= self.cfg.max_records_per_frame || self.cfg.flush_delay_ns == 0 {
            self.flush();
        } else if self.flush_deadline.is_none() {
            self.flush_deadline = Some(now.saturating_add(self.cfg.flush_delay_ns));
        }
        Ok(seq)
    }

    /// The device found its command ring empty: with
    /// [`SenderConfig::flush_when_idle`], a partial frame leaves now.
    /// Returns whether one did.
    pub fn flush_when_idle(&mut self) -> bool {
        if !self.cfg.flush_when_idle || self.unflushed == 0 {
            return false;
        }
        self.flush();
        true
    }

    /// Sends the partial frame now.
    pub fn flush(&mut self) {
        self.flush_deadline = None;
        if self.unflushed == 0 {
            return;
        }
        let first = self.next_seq - self.unflushed as u64;
        self.unflushed = 0;
        self.send_deltas(first, self.next_seq - 1, Destination::All, false);
    }

    /// Next time [`DeltaSender::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        let t = match self.flush_deadline {
            Some(f) => f.min(self.alive_deadline),
            None => self.alive_deadline,
        };
        let t = self.hello_retry.map_or(t, |(h, _)| h.min(t));
        Some(self.tail_probe.map_or(t, |(p, _)| p.min(t)))
    }

    /// Whether some peer that acknowledged anything has not acknowledged
    /// every update sent (or none has acknowledged yet).
    fn unacknowledged(&self) -> bool {
        let last = self.next_seq - 1;
        last >= self.cfg.first_seq && (self.acks.is_empty() || self.acks.values().any(|a| *a < last))
    }

    /// Runs the timers due at `now`: the flush delay, the tail probe,
    /// HELLO repeats and ALIVE.
    pub fn handle_timeout(&mut self, now: Nanos) {
        if self.flush_deadline.is_some_and(|d| d <= now) {
            self.flush();
        }
        if let Some((_, wait)) = self.hello_retry.filter(|(at, _)| *at <= now) {
            let unaware: Vec<u16> = self.unaware().collect();
            for p in &unaware {
                self.send_hello(Destination::Member(*p));
            }
            self.hello_last = now;
            self.hello_retry = (!unaware.is_empty()).then(|| {
                let wait = wait.saturating_mul(2).min(self.cfg.alive_interval_ns.max(1));
                (now.saturating_add(wait), wait)
            });
        }
        if let Some((at, wait)) = self.tail_probe.filter(|(at, _)| *at <= now) {
            let _ = at;
            if self.unacknowledged() {
                self.flush();
                let (origin, next) = (self.origin, self.next_seq);
                if self.tx.push(&mut self.stats, Destination::All, |b| Frame::encode_alive(b, &origin, next)) {
                    self.stats.alive_sent += 1;
                }
                let wait = wait
                    .saturating_mul(2)
                    .min(self.cfg.tail_probe_ns.saturating_mul(8))
                    .min(self.cfg.alive_interval_ns);
                self.tail_probe = Some((now.saturating_add(wait), wait));
            } else {
                self.tail_probe = None;
            }
        }
        if self.alive_deadline <= now {
            self.flush();
            let (origin, next) = (self.origin, self.next_seq);
            if self.tx.push(&mut self.stats, Destination::All, |b| Frame::encode_alive(b, &origin, next)) {
                self.stats.alive_sent += 1;
            }
            self.alive_deadline = now.saturating_add(self.cfg.alive_interval_ns);
        }
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.tx.frames.pop_front()
    }

    /// Hands back a frame from [`Self::poll_transmit`] once it is sent, so
    /// that its buffer carries a later frame (optional: a frame not handed
    /// back is simply freed).
    pub fn recycle(&mut self, t: Transmit) {
        self.tx.recycle(t.frame);
    }

    /// Frames waiting in [`DeltaSender::poll_transmit`].
    pub fn frames_waiting(&self) -> usize {
        self.tx.frames.len()
    }

    /// Parses a received datagram and handles it; returns the parse error
    /// (also counted in [`SyncStats::malformed`]).
    pub fn handle_datagram(&mut self, bytes: &[u8], now: Nanos) -> Result<(), FrameError> {
        let view = parse_counting(bytes, &mut self.stats)?;
        self.handle_frame(&view, now);
        Ok(())
    }

    /// Handles a parsed frame: NACK and ACK elements addressed to this
    /// member. Everything else is none of the sender's business.
    pub fn handle_frame(&mut self, view: &FrameView<'_>, now: Nanos) {
        let h = &view.header;
        if h.cluster_id != self.cfg.cluster_id {
            self.stats.foreign_cluster += 1;
            return;
        }
        // A peer that does not know this epoch yet is reachable again: it
        // gets the HELLO now rather than at the next repeat, which may be
        // up to an ALIVE interval away (at most one per minimum wait).
        if let Some((at, wait)) = self.hello_retry {
            let soon = self.hello_last.saturating_add(self.hello_wait_min()).max(now);
            if at > soon && self.unaware().any(|p| p == h.sender) {
                self.hello_retry = Some((soon, wait));
            }
        }
        if h.sender == self.cfg.member_id {
            return;
        }
        let (me, epoch) = (self.cfg.member_id, self.cfg.epoch);
        match view.body {
            Body::Nack(_) => {
                self.stats.frames_received += 1;
                let mut hello_sent = false;
                for r in view.ranges().filter(|r| r.target == me) {
                    self.stats.retrans_requests_received += 1;
                    if r.target_epoch != epoch {
                        // A HELLO request, or a NACK for an epoch this
                        // sender does not have: tell the asker where it is.
                        if !hello_sent {
                            self.send_hello(Destination::Member(h.sender));
                            hello_sent = true;
                        }
                        continue;
                    }
                    self.answer_nack(h.sender, r.from, r.to);
                }
            }
            Body::Ack(_) => {
                self.stats.frames_received += 1;
                for a in view.acks().filter(|a| a.target == me && a.target_epoch == epoch) {
                    self.stats.acks_received += 1;
                    let through = a.through.min(self.next_seq - 1);
                    if let Some(t) = self.acks.get_mut(&h.sender) {
                        *t = (*t).max(through);
                    } else if self.acks.len() < self.cfg.max_peers {
                        self.acks.insert(h.sender, through);
                    }
                }
            }
            _ => {}
        }
    }

    /// Retransmits `[from, to]` to `member`, or says LOST for the part that
    /// left the queue. Numbers not sent yet are ignored.
    fn answer_nack(&mut self, member: u16, from: u64, to: u64) {
        let sent_end = self.next_seq - self.unflushed as u64; // exclusive
        let from = from.max(self.cfg.first_seq);
        let to = to.min(sent_end.saturating_sub(1));
        if from > to {
            return;
        }
        if from < self.queue_base {
            let lost_to = to.min(self.queue_base - 1);
            let range = SeqRange { target: member, target_epoch: self.cfg.epoch, from, to: lost_to };
            let origin = self.origin;
            if self.tx.push(&mut self.stats, Destination::Member(member), |b| Frame::encode_lost(b, &origin, &[range]))
            {
                self.stats.lost_updates_reported = self.stats.lost_updates_reported.saturating_add(range.len());
            }
        }
        let from = from.max(self.queue_base);
        if from <= to {
            self.send_deltas(from, to, Destination::Member(member), true);
        }
    }

    /// Sends queued updates `[from, to]` (all in the queue) as DELTA frames.
    fn send_deltas(&mut self, from: u64, to: u64, dest: Destination, retransmit: bool) {
        let per = self.cfg.max_records_per_frame as u64;
        let mut first = from;
        while first <= to {
            let last = to.min(first + per - 1);
            let lo = (first - self.queue_base) as usize;
            let hi = (last - self.queue_base) as usize;
            let (queue, origin) = (&self.queue, self.origin);
            let sent = self.tx.push(&mut self.stats, dest, |b| {
                let mut w = DeltaWriter::new(b, origin, first, retransmit)?;
                for r in queue.range(lo..=hi) {
                    w.push_record(r)?;
                }
                w.finish()
            });
            if sent && retransmit {
                self.stats.retrans_updates_sent += last - first + 1;
            }
            first = last + 1;
        }
    }

    fn send_hello(&mut self, dest: Destination) {
        // Updates waiting for the flush go first, so that the HELLO's next
        // number covers only sent updates.
        self.flush();
        let (origin, first, next) = (self.origin, self.cfg.first_seq, self.next_seq);
        if self.tx.push(&mut self.stats, dest, |b| Frame::encode_hello(b, &origin, first, next)) {
            self.stats.hello_sent += 1;
        }
    }
}

/// Configuration of a [`DeltaReceiver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Cluster id; frames of other clusters are dropped.
    pub cluster_id: u16,
    /// This member's id (the sender of NACK and ACK frames).
    pub local_member: u16,
    /// This member's epoch (written in NACK and ACK headers).
    pub local_epoch: u32,
    /// The member whose stream this receiver follows.
    pub peer: u16,
    /// Out-of-order updates held at most.
    pub reorder_capacity: usize,
    /// Wait after a gap appears before the first NACK (reordering grace).
    pub nack_delay_ns: Nanos,
    /// Wait for an answer before the second NACK; doubles after each.
    pub nack_timeout_ns: Nanos,
    /// Ceiling of the NACK timeout.
    pub nack_timeout_max_ns: Nanos,
    /// NACKs without progress before the gap is declared lost.
    pub max_nack_retries: u32,
    /// Send an ACK after this many delivered updates.
    pub ack_every: u64,
    /// Send an ACK this long after unacknowledged progress.
    pub ack_interval_ns: Nanos,
    /// Frames waiting in [`DeltaReceiver::poll_transmit`] at most.
    pub tx_queue_limit: usize,
}

impl ReceiverConfig {
    /// The defaults for following `peer`.
    pub fn new(cluster_id: u16, local_member: u16, local_epoch: u32, peer: u16) -> Self {
        ReceiverConfig {
            cluster_id,
            local_member,
            local_epoch,
            peer,
            reorder_capacity: 1024,
            nack_delay_ns: 200_000,
            nack_timeout_ns: 2_000_000,
            nack_timeout_max_ns: 100_000_000,
            max_nack_retries: 20,
            ack_every: 256,
            ack_interval_ns: 200_000_000,
            tx_queue_limit: 64,
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.local_epoch == 0 {
            return Err(ConfigError::ZeroEpoch);
        }
        if self.peer == self.local_member {
            return Err(ConfigError::PeerIsSelf);
        }
        if self.nack_timeout_ns == 0 {
            return Err(ConfigError::Zero("nack_timeout_ns"));
        }
        if self.ack_every == 0 {
            return Err(ConfigError::Zero("ack_every"));
        }
        if self.tx_queue_limit == 0 {
            return Err(ConfigError::Zero("tx_queue_limit"));
        }
        Ok(())
    }
}

/// Why a receiver asks for a resync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResyncReason {
    /// The sender answered LOST: the updates left its retransmit queue.
    LostReported,
    /// The peer restarted (new epoch) while updates of the old one were missing.
    PeerRestarted,
    /// [`ReceiverConfig::max_nack_retries`] NACKs brought nothing.
    Unanswered,
}

/// What a receiver reports to its driver, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Apply this update (numbers strictly increase within an epoch).
    Deliver {
        /// Sequence number in the peer's epoch.
        seq: u64,
        /// The update.
        update: DeltaUpdate,
    },
    /// Updates were lost: this member's copy of the peer's changes is
    /// incomplete and must be repaired by a Full Sync.
    ResyncNeeded {
        /// The peer.
        peer: u16,
        /// The epoch the updates belonged to.
        epoch: u32,
        /// Updates lost in this incident.
        lost: u64,
        /// Last number concerned; delivery continues after it.
        through: u64,
        /// Why.
        reason: ResyncReason,
    },
    /// The peer started an epoch (first HELLO seen, or a restart).
    PeerReset {
        /// The peer.
        peer: u16,
        /// The epoch followed before, if any.
        old_epoch: Option<u32>,
        /// The new epoch.
        new_epoch: u32,
        /// Its first number, where delivery starts.
        first_seq: u64,
    },
}

/// Retired epochs remembered, so that late frames of an old run are not
/// taken for a run whose HELLO was missed.
const RETIRED_EPOCHS: usize = 4;

#[derive(Clone, Copy, Debug)]
struct NackState {
    deadline: Nanos,
    timeout: Nanos,
    attempts: u32,
    /// `expected` when the attempts were last reset (progress detector).
    mark: u64,
}

/// The receiving half of Delta Sync for one peer (see the module docs).
#[derive(Debug)]
pub struct DeltaReceiver {
    cfg: ReceiverConfig,
    origin: Origin,
    epoch: Option<u32>,
    retired: [u32; RETIRED_EPOCHS],
    retired_next: usize,
    /// Next number to deliver.
    expected: u64,
    /// One past the highest number the peer is known to have sent.
    peer_next: u64,
    /// Updates received ahead of `expected` (all keys > `expected`).
    buffer: BTreeMap<u64, DeltaRecord>,
    nack: Option<NackState>,
    hello_request_after: Nanos,
    last_acked: u64,
    ack_deadline: Option<Nanos>,
    tx: TxQueue,
    events: VecDeque<ReceiverEvent>,
    stats: SyncStats,
    /// The member is joining (its device holds sync for a Full Sync): an
    /// epoch adopted now marks what came before the HELLO as history.
    joining: bool,
    /// One past the last number of the current epoch's history (0: none).
    history_end: u64,
    /// History not asked for yet, `from..to`: skipped when the epoch was
    /// adopted while joining, until a cut covers it or joining ends.
    unasked_history: Option<(u64, u64)>,
    /// Numbers passed already (delivered, or declared lost) that a rewind
    /// to ask for history put back above `expected`, `from..to`: never
    /// delivered twice, never asked for again.
    passed: Option<(u64, u64)>,
    /// The lowest number of the current epoch declared lost (or below it):
    /// nothing from there on is known to be in the table
    /// ([`DeltaReceiver::applied_next`]).
    first_loss: Option<u64>,
    /// When a frame of the peer (of this cluster) last came.
    last_heard: Option<Nanos>,
}

impl DeltaReceiver {
    /// A receiver that knows no epoch of its peer yet: it waits for a HELLO
    /// (or asks for one when frames arrive), or for [`DeltaReceiver::start_at`].
    pub fn new(cfg: ReceiverConfig) -> Result<Self, ConfigError> {
        cfg.check()?;
        Ok(DeltaReceiver {
            cfg,
            origin: Origin { cluster_id: cfg.cluster_id, member_id: cfg.local_member, epoch: cfg.local_epoch },
            epoch: None,
            retired: [0; RETIRED_EPOCHS],
            retired_next: 0,
            expected: 0,
            peer_next: 0,
            buffer: BTreeMap::new(),
            nack: None,
            hello_request_after: 0,
            last_acked: 0,
            ack_deadline: None,
            tx: TxQueue::new(cfg.tx_queue_limit),
            events: VecDeque::new(),
            stats: SyncStats::default(),
            joining: false,
            history_end: 0,
            unasked_history: None,
            passed: None,
            first_loss: None,
            last_heard: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ReceiverConfig {
        &self.cfg
    }

    /// The peer's epoch being followed.
    pub fn epoch(&self) -> Option<u32> {
        self.epoch
    }

    /// When a frame of the peer (any kind, of this cluster) last came.
    pub fn last_heard(&self) -> Option<Nanos> {
        self.last_heard
    }

    /// Next number to be delivered.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Every number of the current epoch before this one was delivered:
    /// [`DeltaReceiver::expected`], or the first number declared lost
    /// since the epoch began (outside the history), if lower. A Full
    /// Sync's cut reports this, not `expected`: what was lost is not in
    /// the table the snapshot copies.
    pub fn applied_next(&self) -> u64 {
        self.first_loss.map_or(self.expected, |f| f.min(self.expected))
    }

    /// Counters (with the current reorder depth).
    pub fn stats(&self) -> SyncStats {
        let mut s = self.stats;
        s.reorder_depth = self.buffer.len() as u64;
        s
    }

    /// Whether the member is joining (see the module docs and
    /// [`SyncStats::history_lost`]): the device sets it while the host
    /// holds sync for a Full Sync. A member that stops joining with history
    /// no cut covered asks for it now.
    pub fn set_joining(&mut self, joining: bool, now: Nanos) {
        self.joining = joining;
        if !joining {
            if let Some((from, to)) = self.unasked_history.take() {
                self.rewind(from, to, now);
            }
        }
    }

    /// History not asked for yet (`from..to`), if any.
    pub fn pending_history(&self) -> Option<(u64, u64)> {
        self.unasked_history
    }

    /// A Full Sync's snapshot holds everything this peer sent in `epoch`
    /// before `next_seq` (the server's position in the peer's stream when
    /// its walk began). Pending history up to there is covered; after it,
    /// it is asked for. A receiver that follows no epoch yet starts at
    /// `next_seq` ([`DeltaReceiver::start_at`]). Returns false, changing
    /// nothing, for another epoch than the one followed (or a retired one):
    /// the pending history is then asked for when joining ends.
    pub fn align(&mut self, epoch: u32, next_seq: u64, now: Nanos) -> bool {
        match self.epoch {
            None if !self.retired.contains(&epoch) && next_seq >= 1 => {
                self.start_at(epoch, next_seq, now);
                true
            }
            Some(e) if e == epoch => {
                if let Some((from, to)) = self.unasked_history.take() {
                    let cut = next_seq.clamp(from, to);
                    self.stats.history_covered = self.stats.history_covered.saturating_add(cut - from);
                    if cut < to {
                        self.rewind(cut, to, now);
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Asks for `from..to` (numbers below `expected` never asked for):
    /// `expected` goes back to `from`, and what was delivered since `to`
    /// is skipped when the stream reaches it again.
    fn rewind(&mut self, from: u64, to: u64, now: Nanos) {
        if from >= to || from >= self.expected {
            return;
        }
        if self.expected > to {
            self.passed = Some((to, self.expected));
        }
        self.expected = from;
        self.last_acked = self.last_acked.min(from - 1);
        self.after_change(now);
    }

    /// Past numbers passed already (see `passed`).
    fn skip_passed(&mut self) {
        if let Some((from, to)) = self.passed {
            if self.expected >= from {
                self.expected = self.expected.max(to);
                self.passed = None;
            }
        }
    }

    /// Whether `seq` was passed already (see `passed`).
    fn was_passed(&self, seq: u64) -> bool {
        self.passed.is_some_and(|(from, to)| (from..to).contains(&seq))
    }

    /// Follows `epoch` from `next_seq` on, e.g. after a Full Sync whose
    /// snapshot was consistent at that point of the peer's stream. Buffered
    /// updates before `next_seq` are discarded.
    pub fn start_at(&mut self, epoch: u32, next_seq: u64, now: Nanos) {
        if self.epoch.is_some_and(|e| e != epoch) {
            self.retire_current();
        }
        self.epoch = Some(epoch);
        self.history_end = 0;
        self.unasked_history = None;
        self.passed = None;
        self.first_loss = None;
        self.expected = next_seq.max(1);
        self.peer_next = self.peer_next.max(self.expected);
        self.buffer = self.buffer.split_off(&self.expected);
        self.last_acked = self.expected - 1;
        self.nack = None;
        self.drain_buffer();
        self.after_change(now);
    }

    /// Parses a received datagram and handles it; returns the parse error
    /// (also counted in [`SyncStats::malformed`]).
    pub fn handle_datagram(&mut self, bytes: &[u8], now: Nanos) -> Result<(), FrameError> {
        let view = parse_counting(bytes, &mut self.stats)?;
        self.handle_frame(&view, now);
        Ok(())
    }

    /// Handles a parsed frame from the sync network. Frames of other senders
    /// and NACK/ACK frames (a sender's business) are ignored.
    pub fn handle_frame(&mut self, view: &FrameView<'_>, now: Nanos) {
        let h = &view.header;
        if h.cluster_id != self.cfg.cluster_id {
            self.stats.foreign_cluster += 1;
            return;
        }
        if h.sender != self.cfg.peer {
            return;
        }
        // Any frame of the peer says it is there (an idle one sends ALIVE
        // every interval), whoever it is for.
        self.last_heard = Some(now);
        if matches!(h.opcode, SyncOpcode::Nack | SyncOpcode::Ack) {
            return;
        }
        if self.epoch != Some(h.epoch) {
            if let Body::Hello { first_seq } = view.body {
                if !self.retired.contains(&h.epoch) {
                    self.stats.frames_received += 1;
                    self.adopt_epoch(h.epoch, first_seq, h.seq, now);
                    return;
                }
            }
            self.stats.unknown_epoch += 1;
            if !self.retired.contains(&h.epoch) {
                self.request_hello(now);
            }
            return;
        }
        self.stats.frames_received += 1;
        match view.body {
            Body::Delta(_) => {
                for (seq, update) in view.updates() {
                    self.accept(seq, update.to_record());
                }
            }
            Body::Lost(_) => {
                let (me, epoch) = (self.cfg.local_member, h.epoch);
                let mut through = 0;
                for r in view.ranges().filter(|r| r.target == me && r.target_epoch == epoch) {
                    through = through.max(r.to);
                }
                // The sender's queue is a contiguous suffix of its stream:
                // if it lost `to`, it lost everything before it as well. A
                // LOST answers a NACK, which never goes past what this
                // receiver knows was sent; neither does the loss counted.
                let through = through.min(self.peer_next.saturating_sub(1));
                if through >= self.expected {
                    self.declare_lost(through, ResyncReason::LostReported);
                }
            }
            // A repeated HELLO: this receiver's acknowledgement was lost.
            Body::Hello { .. } => self.send_ack(),
            // An ALIVE asks whether everything before its number arrived
            // (the sender's tail probe repeats it until told). With nothing
            // missing, the answer is an ACK even though nothing new came:
            // the one the sender waits for was lost, or never sent (a
            // stream started at a Full Sync's cut). Unanswered, the sender
            // would count those updates unacknowledged for as long as it
            // sends nothing new.
            Body::Alive => {
                if view.next_seq().is_some_and(|n| n <= self.expected) && self.expected > 1 {
                    self.send_ack();
                }
            }
            Body::Nack(_) | Body::Ack(_) => {}
        }
        if let Some(n) = view.next_seq() {
            self.peer_next = self.peer_next.max(n);
        }
        self.after_change(now);
    }

    /// Next time [`DeltaReceiver::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        match (self.nack.map(|n| n.deadline), self.ack_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the timers due at `now`: NACK (re)transmission, giving up, ACK.
    pub fn handle_timeout(&mut self, now: Nanos) {
        if let Some(mut n) = self.nack.filter(|n| n.deadline <= now) {
            if n.attempts >= self.cfg.max_nack_retries {
                let through = self.peer_next - 1;
                self.declare_lost(through, ResyncReason::Unanswered);
                self.nack = None;
                self.after_change(now);
            } else {
                self.send_nack();
                n.attempts += 1;
                n.deadline = now.saturating_add(n.timeout);
                n.timeout = n.timeout.saturating_mul(2).min(self.cfg.nack_timeout_max_ns.max(self.cfg.nack_timeout_ns));
                self.nack = Some(n);
            }
        }
        if self.ack_deadline.is_some_and(|d| d <= now) {
            self.ack_deadline = None;
            if self.expected.saturating_sub(1) > self.last_acked {
                self.send_ack();
            }
        }
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.tx.frames.pop_front()
    }

    /// Hands back a frame from [`Self::poll_transmit`] once it is sent, so
    /// that its buffer carries a later frame (optional: a frame not handed
    /// back is simply freed).
    pub fn recycle(&mut self, t: Transmit) {
        self.tx.recycle(t.frame);
    }

    /// Whether [`DeltaReceiver::poll_event`] has something.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next event (deliveries, resync requests, peer resets), in order.
    /// Drain after every call that can deliver.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// Takes one update of the current epoch.
    fn accept(&mut self, seq: u64, rec: DeltaRecord) {
        if seq < self.expected || self.buffer.contains_key(&seq) || self.was_passed(seq) {
            self.stats.duplicates += 1;
        } else if seq == self.expected {
            self.deliver(seq, &rec);
            self.drain_buffer();
        } else if self.buffer.len() < self.cfg.reorder_capacity {
            self.buffer.insert(seq, rec);
        } else {
            self.stats.reorder_drops += 1;
        }
    }

    fn deliver(&mut self, seq: u64, rec: &DeltaRecord) {
        // Records reach here only from validated frames or from a buffer
        // filled from them; `decode` cannot fail, but a record that did would
        // be counted as lost rather than applied.
        match rec.decode() {
            Ok(update) => {
                self.events.push_back(ReceiverEvent::Deliver { seq, update });
                self.stats.updates_received += 1;
            }
            Err(_) => self.stats.lost_updates += 1,
        }
        self.expected = seq + 1;
        self.skip_passed();
    }

    fn drain_buffer(&mut self) {
        self.skip_passed();
        while let Some(rec) = self.buffer.remove(&self.expected) {
            self.deliver(self.expected, &rec);
        }
    }

    /// Everything missing up to `through` will never come: deliver what is
    /// buffered up to there, count the rest, raise a resync, continue after.
    fn declare_lost(&mut self, through: u64, reason: ResyncReason) {
        if through < self.expected {
            return;
        }
        let rest = self.buffer.split_off(&(through + 1));
        let held = std::mem::replace(&mut self.buffer, rest);
        let first = self.expected;
        // Numbers in `lo..=hi` that nothing held and that were not
        // passed before a rewind: `first` >= 1 and `through` < u64::MAX
        // (a number a frame can name), so no bound wraps.
        let passed = self.passed;
        let missing = |lo: u64, hi: u64| {
            let had = passed.map_or(0, |(from, to)| to.min(hi + 1).saturating_sub(from.max(lo)));
            (hi - lo + 1) - held.range(lo..=hi).count() as u64 - had
        };
        let lost = missing(first, through);
        for (seq, rec) in &held {
            self.deliver(*seq, rec);
        }
        self.expected = self.expected.max(through + 1);
        self.peer_next = self.peer_next.max(self.expected);
        self.drain_buffer();
        if lost > 0 {
            // Of the missing numbers, those below the history's end are
            // history.
            let end = self.history_end.min(through + 1);
            let history = if end > first { missing(first, end - 1) } else { 0 };
            // Saturating: the counts come from numbers a peer chose.
            self.stats.history_lost = self.stats.history_lost.saturating_add(history);
            self.stats.lost_updates = self.stats.lost_updates.saturating_add(lost - history);
            // Nothing from the first missing number on is known to be in
            // the table, history or not (a merge may bring it, which this
            // receiver does not see): a Full Sync this member serves must
            // not claim it. The first missing number outside the history
            // (or one below it: a lower cut only asks for more), or the
            // first asked for inside it.
            let at = if history > 0 { first } else { first.max(self.history_end) };
            self.first_loss = Some(self.first_loss.map_or(at, |f| f.min(at)));
            self.stats.resyncs_requested += 1;
            let epoch = self.epoch.unwrap_or(0);
            self.events.push_back(ReceiverEvent::ResyncNeeded { peer: self.cfg.peer, epoch, lost, through, reason });
        }
    }

    /// The peer announced a new epoch: close the old one and follow it.
    fn adopt_epoch(&mut self, epoch: u32, first_seq: u64, next_seq: u64, now: Nanos) {
        let old = self.epoch;
        if old.is_some() {
            // What the old epoch still owed us will never come.
            if self.peer_next > self.expected {
                self.declare_lost(self.peer_next - 1, ResyncReason::PeerRestarted);
            }
            self.retire_current();
        }
        self.events.push_back(ReceiverEvent::PeerReset {
            peer: self.cfg.peer,
            old_epoch: old,
            new_epoch: epoch,
            first_seq,
        });
        self.stats.epoch_changes += 1;
        self.epoch = Some(epoch);
        self.peer_next = next_seq;
        // What the peer sent before this HELLO is history while joining:
        // the Full Sync carries it, so it is not asked for (see `align`).
        self.history_end = if self.joining { next_seq } else { 0 };
        self.unasked_history = (self.joining && next_seq > first_seq).then_some((first_seq, next_seq));
        self.passed = None;
        self.first_loss = None;
        self.expected = if self.unasked_history.is_some() { next_seq } else { first_seq };
        self.buffer.clear();
        self.nack = None;
        self.last_acked = self.expected - 1;
        self.ack_deadline = None;
        // Tell the sender at once that its epoch is known here (it repeats
        // the HELLO until told).
        self.send_ack();
        self.after_change(now);
    }

    fn retire_current(&mut self) {
        if let Some(e) = self.epoch.take() {
            self.retired[self.retired_next] = e;
            self.retired_next = (self.retired_next + 1) % RETIRED_EPOCHS;
        }
    }

    /// Re-arms the NACK and ACK timers after the state changed.
    fn after_change(&mut self, now: Nanos) {
        if self.expected < self.peer_next {
            // `expected` is missing (it would have been drained otherwise).
            match &mut self.nack {
                None => {
                    self.nack = Some(NackState {
                        deadline: now.saturating_add(self.cfg.nack_delay_ns),
                        timeout: self.cfg.nack_timeout_ns,
                        attempts: 0,
                        mark: self.expected,
                    })
                }
                Some(n) if n.mark != self.expected => {
                    // Progress: the sender is answering. Start counting
                    // again, and ask for the rest soon if it does not come.
                    n.attempts = 0;
                    n.timeout = self.cfg.nack_timeout_ns;
                    n.mark = self.expected;
                    n.deadline = n.deadline.min(now.saturating_add(self.cfg.nack_timeout_ns));
                }
                Some(_) => {}
            }
        } else {
            self.nack = None;
        }
        let progress = self.expected.saturating_sub(1).saturating_sub(self.last_acked);
        if progress >= self.cfg.ack_every {
            self.send_ack();
            self.ack_deadline = None;
        } else if progress > 0 && self.ack_deadline.is_none() {
            self.ack_deadline = Some(now.saturating_add(self.cfg.ack_interval_ns));
        }
    }

    /// NACKs the missing ranges between `expected` and `peer_next`.
    fn send_nack(&mut self) {
        let Some(epoch) = self.epoch else { return };
        let mut ranges = [SeqRange::hello_request(self.cfg.peer); MAX_RANGES];
        let mut n = 0;
        let mut cur = self.expected;
        // What is here already, in order: buffered numbers, and the block
        // passed before a rewind (no buffered number lies in it).
        let mut passed = self.passed;
        let held = self.buffer.keys().map(|&seq| (seq, seq + 1));
        let mut held = held.peekable();
        loop {
            let next = match (passed, held.peek()) {
                (Some(d), Some(&b)) if d.0 < b.0 => passed.take(),
                (_, Some(_)) => held.next(),
                (Some(_), None) => passed.take(),
                (None, None) => None,
            };
            let Some((from, to)) = next else { break };
            if n == MAX_RANGES {
                break;
            }
            if from > cur {
                ranges[n] = SeqRange { target: self.cfg.peer, target_epoch: epoch, from: cur, to: from - 1 };
                n += 1;
            }
            cur = cur.max(to);
        }
        if n < MAX_RANGES && cur < self.peer_next {
            ranges[n] = SeqRange { target: self.cfg.peer, target_epoch: epoch, from: cur, to: self.peer_next - 1 };
            n += 1;
        }
        if n == 0 {
            return;
        }
        let origin = self.origin;
        let dest = Destination::Member(self.cfg.peer);
        if self.tx.push(&mut self.stats, dest, |b| Frame::encode_nack(b, &origin, &ranges[..n])) {
            self.stats.retrans_requests_sent += n as u64;
        }
    }

    fn request_hello(&mut self, now: Nanos) {
        if now < self.hello_request_after {
            return;
        }
        self.hello_request_after = now.saturating_add(self.cfg.nack_timeout_ns);
        let origin = self.origin;
        let req = [SeqRange::hello_request(self.cfg.peer)];
        let dest = Destination::Member(self.cfg.peer);
        if self.tx.push(&mut self.stats, dest, |b| Frame::encode_nack(b, &origin, &req)) {
            self.stats.hello_requests_sent += 1;
        }
    }

    fn send_ack(&mut self) {
        let Some(epoch) = self.epoch else { return };
        let through = self.expected.saturating_sub(1);
        let origin = self.origin;
        let ack = [AckEntry { target: self.cfg.peer, target_epoch: epoch, through }];
        let dest = Destination::Member(self.cfg.peer);
        if self.tx.push(&mut self.stats, dest, |b| Frame::encode_ack(b, &origin, &ack)) {
            self.stats.acks_sent += 1;
            self.last_acked = through;
        }
    }
}

pub use nicsync_fwif::sync::precedence;

/// The deterministic conflict rule: of two versions of one connection, the
/// one with precedence ([`precedence`]). Commutative, associative and
/// idempotent, so members that saw the same updates in any order agree.
pub fn resolve<'a>(a: &'a DeltaUpdate, b: &'a DeltaUpdate) -> &'a DeltaUpdate {
    if precedence(a, b) == Ordering::Less {
        b
    } else {
        a
    }
}

/// Parses a datagram, counting a malformed one in `stats`.
fn parse_counting<'a>(bytes: &'a [u8], stats: &mut SyncStats) -> Result<FrameView<'a>, FrameError> {
    Frame::parse(bytes).inspect_err(|_| stats.malformed += 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicsync_fwif::conn::{ConnKey, ConnState, Nat};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const CLUSTER: u16 = 9;
    const SENDER: u16 = 1;
    const ME: u16 = 2;
    const MY_EPOCH: u32 = 0x0202;

    fn key(i: u32) -> ConnKey {
        ConnKey::v4(Ipv4Addr::from(0x0a00_0000 | i), 1000, Ipv4Addr::new(192, 0, 2, 1), 443, 6, 0)
    }

    fn up(i: u32) -> DeltaUpdate {
        let st = ConnState { generation: i.into(), mark: i.into(), ..ConnState::default() };
        DeltaUpdate::upsert(SENDER, key(i), st, Nat::default())
    }

    fn sender(epoch: u32) -> DeltaSender {
        let mut c = SenderConfig::new(CLUSTER, SENDER, epoch);
        c.queue_capacity = 32;
        DeltaSender::new(c, 0).expect("sender")
    }

    fn receiver() -> DeltaReceiver {
        let mut c = ReceiverConfig::new(CLUSTER, ME, MY_EPOCH, SENDER);
        c.nack_delay_ns = 0;
        c.ack_every = 8;
        DeltaReceiver::new(c).expect("receiver")
    }

    fn frames(s: &mut DeltaSender) -> Vec<Transmit> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn rx_frames(r: &mut DeltaReceiver) -> Vec<Transmit> {
        std::iter::from_fn(|| r.poll_transmit()).collect()
    }

    fn events(r: &mut DeltaReceiver) -> Vec<ReceiverEvent> {
        std::iter::from_fn(|| r.poll_event()).collect()
    }

    fn delivered(ev: &[ReceiverEvent]) -> Vec<u64> {
        ev.iter().filter_map(|e| if let ReceiverEvent::Deliver { seq, .. } = e { Some(*seq) } else { None }).collect()
    }

    fn opcode(t: &Transmit) -> SyncOpcode {
        Frame::parse(&t.frame).expect("own frame parses").header.opcode
    }

    fn feed(r: &mut DeltaReceiver, fs: &[Transmit], now: Nanos) {
        for f in fs {
            r.handle_datagram(&f.frame, now).expect("valid");
        }
    }

    #[test]
    fn recycled_frame_buffers_give_the_same_bytes() {
        // Two senders with the same history: one hands every sent frame
        // back, the other never does. A long frame, then shorter ones
        // (fewer records, then a HELLO), must come out byte for byte the
        // same, whatever the reused buffer held before.
        let (mut reuse, mut fresh) = (sender(7), sender(7));
        let mut got = Vec::new();
        for round in 0..3u32 {
            let n = [20, 1, 3][round as usize];
            for i in 0..n {
                reuse.submit(&up(round * 100 + i), 0).expect("submit");
                fresh.submit(&up(round * 100 + i), 0).expect("submit");
            }
            reuse.flush();
            fresh.flush();
            if round == 2 {
                reuse.send_hello(Destination::All);
                fresh.send_hello(Destination::All);
            }
            let (sent, expected) = (frames(&mut reuse), frames(&mut fresh));
            assert_eq!(sent.len(), expected.len(), "round {round}");
            for (a, b) in sent.into_iter().zip(expected) {
                assert_eq!(a.frame, b.frame, "round {round}");
                got.push(a.frame.len());
                reuse.recycle(a);
            }
        }
        assert!(reuse.tx.spare.len() <= SPARE_FRAMES && !reuse.tx.spare.is_empty());
        assert!(reuse.tx.spare.iter().all(|b| b.len() == MAX_FRAME && b.iter().all(|x| *x == 0)));
        // A full frame went first, shorter ones reused its buffer after.
        let longest = got.iter().position(|l| *l == MAX_FRAME);
        assert!(longest.is_some_and(|i| got[i + 1..].iter().any(|l| *l < MAX_FRAME)), "frame lengths: {got:?}");
    }

    #[test]
    fn config_is_checked() {
        let mut c = SenderConfig::new(1, 1, 0);
        assert_eq!(DeltaSender::new(c, 0).err(), Some(ConfigError::ZeroEpoch));
        c.epoch = 1;
        c.max_records_per_frame = 17;
        assert_eq!(DeltaSender::new(c, 0).err(), Some(ConfigError::RecordsPerFrame(17)));
        c.max_records_per_frame = 16;
        c.queue_capacity = 8;
        assert!(matches!(DeltaSender::new(c, 0), Err(ConfigError::QueueTooSmall { .. })));
        let r = ReceiverConfig::new(1, 3, 1, 3);
        assert_eq!(DeltaReceiver::new(r).err(), Some(ConfigError::PeerIsSelf));
        assert_ne!(epoch_from_entropy(0), 0);
        assert_ne!(epoch_from_entropy(1), epoch_from_entropy(2));
    }

    #[test]
    fn sender_starts_with_hello_then_batches() {
        let mut s = sender(77);
        let f = frames(&mut s);
        assert_eq!(f.len(), 1);
        assert_eq!(opcode(&f[0]), SyncOpcode::Hello);
        assert_eq!(f[0].dest, Destination::All);
        for i in 0..20 {
            assert_eq!(s.submit(&up(i), 10), Ok(1 + i as u64));
        }
        // 16 filled a frame; 4 wait for the flush delay.
        let f = frames(&mut s);
        assert_eq!(f.len(), 1);
        assert_eq!(Frame::parse(&f[0].frame).expect("delta").header.count, 16);
        assert_eq!(s.poll_timeout(), Some(10 + 50_000));
        s.handle_timeout(10 + 50_000);
        let f = frames(&mut s);
        let v = Frame::parse(&f[0].frame).expect("delta");
        assert_eq!((v.header.seq, v.header.count), (17, 4));
        assert_eq!(s.stats().updates_sent, 20);
        // ALIVE after the interval, carrying the next number.
        s.handle_timeout(1_000_000_000);
        let f = frames(&mut s);
        let v = Frame::parse(&f[0].frame).expect("alive");
        assert_eq!((v.header.opcode, v.header.seq), (SyncOpcode::Alive, 21));
        // Invalid updates never reach the wire.
        let mut bad = up(1);
        bad.key.family = 9;
        assert!(s.submit(&bad, 0).is_err());
        assert_eq!(s.next_seq(), 21);
    }

    #[test]
    fn in_order_delivery_and_acks() {
        let mut s = sender(77);
        let mut r = receiver();
        for i in 0..40 {
            s.submit(&up(i), 0).expect("submit");
        }
        s.flush();
        let f = frames(&mut s);
        feed(&mut r, &f, 1);
        let ev = events(&mut r);
        assert!(matches!(ev[0], ReceiverEvent::PeerReset { old_epoch: None, new_epoch: 77, first_seq: 1, .. }));
        assert_eq!(delivered(&ev), (1..=40).collect::<Vec<_>>());
        // Duplicates are dropped and counted.
        feed(&mut r, &f, 2);
        assert!(delivered(&events(&mut r)).is_empty());
        assert_eq!(r.stats().duplicates, 40);
        // An ACK went back after every 8 updates; the last covers 40.
        let acks = rx_frames(&mut r);
        assert!(acks.iter().all(|t| opcode(t) == SyncOpcode::Ack && t.dest == Destination::Member(SENDER)));
        for a in &acks {
            s.handle_datagram(&a.frame, 3).expect("ack");
        }
        assert_eq!(s.acked_through(ME), Some(40));
    }

    #[test]
    fn gap_is_nacked_and_filled_by_retransmission() {
        let mut s = sender(77);
        let mut r = receiver();
        feed(&mut r, &frames(&mut s), 0);
        for i in 0..48 {
            s.submit(&up(i), 0).expect("submit");
        }
        let f = frames(&mut s);
        assert_eq!(f.len(), 3);
        // Lose the middle frame (17..=32).
        feed(&mut r, &[f[0].clone(), f[2].clone()], 1);
        assert_eq!(delivered(&events(&mut r)), (1..=16).collect::<Vec<_>>());
        assert_eq!(r.stats().reorder_depth, 16);
        assert_eq!(r.poll_timeout(), Some(1));
        r.handle_timeout(1);
        let nack: Vec<_> = rx_frames(&mut r).into_iter().filter(|t| opcode(t) == SyncOpcode::Nack).collect();
        assert_eq!(nack.len(), 1);
        let v = Frame::parse(&nack[0].frame).expect("nack");
        assert_eq!(v.ranges().collect::<Vec<_>>(), [SeqRange { target: SENDER, target_epoch: 77, from: 17, to: 32 }]);
        s.handle_datagram(&nack[0].frame, 2).expect("nack");
        let re = frames(&mut s);
        assert_eq!(re.len(), 1);
        assert_eq!(re[0].dest, Destination::Member(ME));
        assert_eq!(s.stats().retrans_updates_sent, 16);
        feed(&mut r, &re, 3);
        assert_eq!(delivered(&events(&mut r)), (17..=48).collect::<Vec<_>>());
        assert_eq!(r.poll_timeout().filter(|t| *t < 1_000_000), None, "no NACK pending");
        assert_eq!(r.stats().lost_updates, 0);
    }

    #[test]
    fn renack_backs_off_then_gives_up() {
        let mut s = sender(77);
        let mut r = receiver();
        feed(&mut r, &frames(&mut s), 0);
        for i in 0..20 {
            s.submit(&up(i), 0).expect("submit");
        }
        s.flush();
        let f = frames(&mut s);
        feed(&mut r, &f[1..], 0); // 17..=20 arrive, 1..=16 never do
        let mut times = Vec::new();
        let mut now = 0;
        while let Some(t) = r.poll_timeout() {
            if t > 10_000_000_000 {
                break;
            }
            now = t;
            r.handle_timeout(now);
            if rx_frames(&mut r).iter().any(|t| opcode(t) == SyncOpcode::Nack) {
                times.push(now);
            }
        }
        assert_eq!(times.len(), 20, "{times:?}");
        let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(&gaps[..4], [2_000_000, 4_000_000, 8_000_000, 16_000_000]);
        assert!(gaps.iter().all(|g| *g <= 100_000_000));
        assert_eq!(gaps.last(), Some(&100_000_000));
        let ev = events(&mut r);
        assert_eq!(delivered(&ev), (17..=20).collect::<Vec<_>>());
        assert!(ev.iter().any(|e| matches!(
            e,
            ReceiverEvent::ResyncNeeded { lost: 16, through: 20, reason: ResyncReason::Unanswered, .. }
        )));
        assert_eq!(r.stats().lost_updates, 16);
        let _ = now;
    }

    #[test]
    fn lost_answer_counts_and_raises_resync() {
        let mut s = sender(77); // queue of 32
        let mut r = receiver();
        feed(&mut r, &frames(&mut s), 0);
        for i in 0..64 {
            s.submit(&up(i), 0).expect("submit");
        }
        let f = frames(&mut s);
        feed(&mut r, &f[3..], 1); // 49..=64 arrive
        r.handle_timeout(1);
        let nack = rx_frames(&mut r);
        for n in &nack {
            s.handle_datagram(&n.frame, 2).expect("nack");
        }
        let answer = frames(&mut s);
        let ops: Vec<_> = answer.iter().map(opcode).collect();
        assert_eq!(ops, [SyncOpcode::Lost, SyncOpcode::Delta]);
        assert_eq!(s.stats().lost_updates_reported, 32);
        assert_eq!(s.stats().queue_depth, 32);
        feed(&mut r, &answer, 3);
        let ev = events(&mut r);
        // After the PeerReset of the HELLO: the resync, then deliveries.
        assert!(matches!(ev[0], ReceiverEvent::PeerReset { .. }));
        assert!(matches!(
            ev[1],
            ReceiverEvent::ResyncNeeded { lost: 32, through: 32, reason: ResyncReason::LostReported, .. }
        ));
        assert_eq!(delivered(&ev), (33..=64).collect::<Vec<_>>());
        assert_eq!(r.stats().lost_updates, 32);
        assert_eq!(r.stats().resyncs_requested, 1);
        // A repeated LOST changes nothing.
        feed(&mut r, &answer[..1], 4);
        assert!(events(&mut r).is_empty());
    }

    /// A receiver that first hears a peer long after the peer's epoch began
    /// asks for the whole epoch; what the peer's queue no longer holds is
    /// answered LOST. Joining, that is history (the Full Sync carries it),
    /// counted apart from losses; a loss after the HELLO is a loss either way.
    /// Four rounds of the receiver's timers and frames to the sender, and
    /// the sender's answers back; the receiver's events are appended to
    /// `ev`.
    fn exchange(s: &mut DeltaSender, r: &mut DeltaReceiver, now: &mut Nanos, ev: &mut Vec<ReceiverEvent>) {
        for _ in 0..4 {
            r.handle_timeout(*now);
            for t in rx_frames(r) {
                s.handle_datagram(&t.frame, *now).expect("to sender");
            }
            feed(r, &frames(s), *now);
            ev.extend(events(r));
            *now += 1;
        }
    }

    /// A sender (queue of 32, epoch 77) that sent 1..=64 before the
    /// receiver heard of it, and a receiver (joining or not) that then
    /// adopted its epoch from a HELLO naming 65 as the next number.
    fn heard_late(joining: bool) -> (DeltaSender, DeltaReceiver, Nanos, Vec<ReceiverEvent>) {
        let mut s = sender(77);
        let _ = frames(&mut s); // the start's HELLO, never heard
        for i in 1..=64 {
            s.submit(&up(i), 0).expect("submit");
        }
        s.flush();
        let _ = frames(&mut s); // 1..=64, never heard
        let mut r = receiver();
        r.set_joining(joining, 0);
        // An ALIVE of an unknown epoch: the receiver asks for a HELLO.
        s.handle_timeout(2_000_000_000);
        feed(&mut r, &frames(&mut s), 1);
        let (mut now, mut ev) = (2, Vec::new());
        exchange(&mut s, &mut r, &mut now, &mut ev);
        assert!(matches!(ev[0], ReceiverEvent::PeerReset { first_seq: 1, .. }), "{ev:?}");
        (s, r, now, ev)
    }

    /// Sorted, and checked for numbers delivered twice.
    fn delivered_once(ev: &[ReceiverEvent]) -> Vec<u64> {
        let mut d = delivered(ev);
        let n = d.len();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), n, "a number was delivered twice: {ev:?}");
        d
    }

    #[test]
    fn history_a_joining_receiver_asks_for_only_when_joining_ends_without_a_cut() {
        for joining in [true, false] {
            let (mut s, mut r, mut now, mut ev) = heard_late(joining);
            if joining {
                // History is the Full Sync's: not asked for, nothing lost.
                assert!(delivered(&ev).is_empty(), "{ev:?}");
                assert_eq!(r.stats().retrans_requests_sent, 0);
                assert_eq!(r.pending_history(), Some((1, 65)));
                assert_eq!(r.expected(), 65);
            } else {
                assert_eq!(delivered(&ev), (33..=64).collect::<Vec<_>>());
                assert_eq!(r.stats().lost_updates, 32, "1..=32 fell out of the queue");
            }
            // After the HELLO: 66 more, of which only the last frame
            // arrives; 65..=98 fall out of the queue: lost either way.
            for i in 65..=130 {
                s.submit(&up(i), now).expect("submit");
            }
            s.flush();
            let f = frames(&mut s);
            feed(&mut r, &f[f.len() - 1..], now);
            exchange(&mut s, &mut r, &mut now, &mut ev);
            if joining {
                assert_eq!((r.stats().history_lost, r.stats().lost_updates), (0, 34));
                // Joining ends with no cut (the member seeded its table):
                // the history is asked for now; what arrived since is not
                // delivered again.
                r.set_joining(false, now);
                assert_eq!(r.pending_history(), None);
                exchange(&mut s, &mut r, &mut now, &mut ev);
            }
            // Asked for late, all of the history had fallen out of the
            // queue by then (33..=64 with the last 66 updates).
            let st = r.stats();
            let (history, lost) = if joining { (64, 34) } else { (0, 66) };
            assert_eq!((st.history_lost, st.lost_updates), (history, lost), "joining {joining}: {st:?}");
            assert_eq!(st.resyncs_requested, 2, "joining {joining}: {st:?}");
            assert_eq!(st.history_covered, 0);
            let want: Vec<u64> = if joining { (99..=130).collect() } else { (33..=64).chain(99..=130).collect() };
            assert_eq!(delivered_once(&ev), want, "joining {joining}");
            assert_eq!(r.expected(), 131);
            assert_eq!(r.stats().reorder_depth, 0);
        }
    }

    #[test]
    fn history_a_cut_covers_is_never_asked_for_and_the_rest_is() {
        // The cut at the HELLO's number or later: all history covered.
        for cut in [65, 90] {
            let (mut s, mut r, mut now, mut ev) = heard_late(true);
            assert!(r.align(77, cut, now));
            assert_eq!(r.pending_history(), None);
            r.set_joining(false, now);
            exchange(&mut s, &mut r, &mut now, &mut ev);
            let st = r.stats();
            assert_eq!((st.history_covered, st.history_lost, st.lost_updates), (64, 0, 0), "{st:?}");
            assert_eq!(st.retrans_requests_sent, 0, "{st:?}");
            assert!(delivered(&ev).is_empty());
        }
        // A cut inside the history (a server that lagged this peer): the
        // rest of it is asked for at once, while still joining.
        let (mut s, mut r, mut now, mut ev) = heard_late(true);
        for i in 65..=70 {
            s.submit(&up(i), now).expect("submit");
        }
        s.flush();
        feed(&mut r, &frames(&mut s), now);
        ev.extend(events(&mut r));
        assert!(r.align(77, 40, now));
        exchange(&mut s, &mut r, &mut now, &mut ev);
        let st = r.stats();
        assert_eq!((st.history_covered, st.history_lost, st.lost_updates), (39, 0, 0), "{st:?}");
        assert_eq!(delivered_once(&ev), (40..=70).collect::<Vec<_>>());
        assert_eq!(r.expected(), 71);
        // A later cut changes nothing: the history is settled.
        assert!(r.align(77, 1, now));
        assert_eq!(r.expected(), 71);
    }

    #[test]
    fn history_a_cut_of_another_epoch_is_ignored_and_one_before_any_starts_the_stream() {
        let (mut s, mut r, mut now, mut ev) = heard_late(true);
        assert!(!r.align(78, 65, now), "not the epoch followed");
        assert_eq!(r.pending_history(), Some((1, 65)));
        r.set_joining(false, now);
        exchange(&mut s, &mut r, &mut now, &mut ev);
        assert_eq!(r.stats().history_lost, 32, "asked for when joining ended: 1..=32 gone");
        assert_eq!(delivered_once(&ev), (33..=64).collect::<Vec<_>>());
        // The lost history is not claimed as applied (SYNC_POSITIONS): a
        // Full Sync this member serves would tell its joiner so.
        assert_eq!(r.applied_next(), 1);

        // No epoch followed yet: the cut starts the stream there, and the
        // HELLO of that epoch is then only acknowledged.
        let mut s = sender(77);
        let hello = frames(&mut s);
        let mut r = receiver();
        r.set_joining(true, 0);
        assert!(r.align(77, 1, 0));
        assert_eq!((r.epoch(), r.expected()), (Some(77), 1));
        feed(&mut r, &hello, 1);
        assert!(events(&mut r).is_empty(), "no PeerReset: the epoch is the one aligned to");
        assert_eq!(r.stats().epoch_changes, 0);
    }

    /// The receiver's last ACK is lost and the sender sends nothing new:
    /// its tail probe (an ALIVE) is answered with an ACK, so the updates do
    /// not stay unacknowledged (an orderly stop waits for them; the
    /// simulator found one that waited out its whole drain this way).
    #[test]
    fn an_alive_is_answered_with_an_ack_when_the_last_one_was_lost() {
        let mut s = sender(77);
        let mut r = receiver();
        feed(&mut r, &frames(&mut s), 0);
        for a in rx_frames(&mut r) {
            s.handle_datagram(&a.frame, 0).expect("hello ack");
        }
        for i in 0..5 {
            s.submit(&up(i), 0).expect("submit");
        }
        s.flush();
        feed(&mut r, &frames(&mut s), 1);
        assert_eq!(delivered(&events(&mut r)), (1..=5).collect::<Vec<_>>());
        // The ACK of 1..=5 (after the ACK interval) is lost.
        let t = r.poll_timeout().expect("an ACK timer");
        r.handle_timeout(t);
        let lost = rx_frames(&mut r);
        assert_eq!(lost.iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Ack]);
        assert_eq!(s.acked_through(ME), Some(0));
        // The sender's tail probe: an ALIVE, answered by an ACK of 5.
        let probe = s.poll_timeout().expect("a tail probe");
        s.handle_timeout(probe);
        let alive = frames(&mut s);
        assert_eq!(alive.iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Alive]);
        feed(&mut r, &alive, probe);
        let acks = rx_frames(&mut r);
        assert_eq!(acks.iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Ack]);
        for a in &acks {
            s.handle_datagram(&a.frame, probe).expect("ack");
        }
        assert_eq!(s.acked_through(ME), Some(5));
        assert!(delivered(&events(&mut r)).is_empty(), "nothing delivered twice");
    }

    #[test]
    fn trailing_loss_is_learned_from_alive() {
        let mut s = sender(77);
        let mut r = receiver();
        feed(&mut r, &frames(&mut s), 0);
        // The HELLO is acknowledged at once.
        assert_eq!(rx_frames(&mut r).iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Ack]);
        for i in 0..5 {
            s.submit(&up(i), 0).expect("submit");
        }
        s.flush();
        let _lost = frames(&mut s);
        s.handle_timeout(1_000_000_000);
        feed(&mut r, &frames(&mut s), 1_000_000_000);
        assert_eq!(r.poll_timeout(), Some(1_000_000_000));
        r.handle_timeout(1_000_000_000);
        let nack = rx_frames(&mut r);
        let v = Frame::parse(&nack[0].frame).expect("nack");
        assert_eq!(v.ranges().next().map(|r| (r.from, r.to)), Some((1, 5)));
    }

    #[test]
    fn restart_resets_and_unknown_epochs_ask_for_hello() {
        let mut s = sender(77);
        let mut r = receiver();
        feed(&mut r, &frames(&mut s), 0);
        s.submit(&up(0), 0).expect("submit");
        s.flush();
        let old = frames(&mut s);
        feed(&mut r, &old, 1);
        let _acks = rx_frames(&mut r);
        // Restart; the new HELLO is lost; a DELTA of the new epoch arrives.
        let mut s2 = sender(88);
        let _hello = frames(&mut s2);
        s2.submit(&up(1), 2).expect("submit");
        s2.flush();
        feed(&mut r, &frames(&mut s2), 3);
        assert_eq!(r.stats().unknown_epoch, 1);
        let req = rx_frames(&mut r);
        let v = Frame::parse(&req[0].frame).expect("hello request");
        assert!(v.ranges().all(|x| x.is_hello_request()));
        s2.handle_datagram(&req[0].frame, 4).expect("nack");
        let hello = frames(&mut s2);
        assert_eq!(opcode(&hello[0]), SyncOpcode::Hello);
        feed(&mut r, &hello, 5);
        let ev = events(&mut r);
        assert!(ev
            .iter()
            .any(|e| matches!(e, ReceiverEvent::PeerReset { old_epoch: Some(77), new_epoch: 88, first_seq: 1, .. })));
        // Nothing of epoch 77 was missing: no loss.
        assert_eq!(r.stats().lost_updates, 0);
        // The update sent before the HELLO is NACKed and retransmitted.
        r.handle_timeout(5);
        for n in rx_frames(&mut r) {
            s2.handle_datagram(&n.frame, 6).expect("nack");
        }
        feed(&mut r, &frames(&mut s2), 7);
        assert_eq!(delivered(&events(&mut r)), [1]);
        // A late frame of the retired epoch is dropped without a HELLO request.
        feed(&mut r, &old, 8);
        assert_eq!(r.stats().unknown_epoch, 2);
        assert!(rx_frames(&mut r).iter().all(|t| opcode(t) != SyncOpcode::Nack));
    }

    #[test]
    fn a_hello_is_repeated_to_a_peer_until_it_acknowledges() {
        let mut s = sender(77);
        s.expect_peers(&[SENDER, ME], 0);
        assert_eq!(s.peers_unaware(), 1, "itself is not a peer");
        let _lost_hello = frames(&mut s);
        let first = s.config().tail_probe_ns;
        assert_eq!(s.poll_timeout(), Some(first));
        s.handle_timeout(first);
        let again = frames(&mut s);
        assert_eq!(again.iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Hello]);
        assert_eq!(again[0].dest, Destination::Member(ME));
        // The next repeat waits twice as long.
        assert_eq!(s.poll_timeout(), Some(3 * first));
        let mut r = receiver();
        feed(&mut r, &again, first);
        let ack = rx_frames(&mut r);
        assert_eq!(ack.iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Ack]);
        s.handle_datagram(&ack[0].frame, first).expect("ack");
        assert_eq!(s.peers_unaware(), 0);
        s.handle_timeout(3 * first);
        assert!(frames(&mut s).is_empty(), "no HELLO once the peer knows the epoch");
        // A repeated HELLO (its acknowledgement lost) is acknowledged again.
        feed(&mut r, &again, 4 * first);
        assert_eq!(rx_frames(&mut r).iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Ack]);
    }

    #[test]
    fn a_peer_heard_from_gets_the_hello_without_waiting_for_the_repeat() {
        let mut s = sender(77);
        s.expect_peers(&[ME], 0);
        let min = s.config().tail_probe_ns;
        // Cut off: the repeats back off towards the ALIVE interval.
        let mut now = 0;
        for _ in 0..5 {
            now = s.poll_timeout().expect("timer");
            s.handle_timeout(now);
            let _lost = frames(&mut s);
        }
        let next = s.poll_timeout().expect("timer");
        assert!(next > now + 4 * min);
        // The peer is heard again (its own HELLO): the repeat comes at once.
        let mut peer = DeltaSender::new(SenderConfig::new(CLUSTER, ME, 99), now + min).expect("peer");
        for f in frames(&mut peer) {
            s.handle_datagram(&f.frame, now + min).expect("frame");
        }
        assert_eq!(s.poll_timeout(), Some(now + min));
        s.handle_timeout(now + min);
        assert_eq!(frames(&mut s).iter().map(opcode).collect::<Vec<_>>(), [SyncOpcode::Hello]);
    }

    #[test]
    fn restart_with_gap_counts_old_epoch_loss() {
        let mut s = sender(77);
        let mut r = receiver();
        feed(&mut r, &frames(&mut s), 0);
        for i in 0..32 {
            s.submit(&up(i), 0).expect("submit");
        }
        let f = frames(&mut s);
        feed(&mut r, &f[1..], 1); // 1..=16 missing
        let mut s2 = sender(88);
        feed(&mut r, &frames(&mut s2), 2);
        let ev = events(&mut r);
        assert!(ev.iter().any(|e| matches!(
            e,
            ReceiverEvent::ResyncNeeded { lost: 16, epoch: 77, reason: ResyncReason::PeerRestarted, .. }
        )));
        assert_eq!(delivered(&ev), (17..=32).collect::<Vec<_>>());
        assert_eq!(r.epoch(), Some(88));
        assert_eq!(r.expected(), 1);
    }

    #[test]
    fn foreign_cluster_and_other_senders_are_ignored() {
        let mut c = SenderConfig::new(CLUSTER + 1, SENDER, 5);
        c.queue_capacity = 16;
        let mut other = DeltaSender::new(c, 0).expect("sender");
        let mut r = receiver();
        feed(&mut r, &frames(&mut other), 0);
        assert_eq!(r.stats().foreign_cluster, 1);
        assert_eq!(r.epoch(), None);
        let mut third = DeltaSender::new(SenderConfig::new(CLUSTER, 7, 5), 0).expect("sender");
        feed(&mut r, &frames(&mut third), 0);
        assert_eq!(r.epoch(), None);
        assert!(r.handle_datagram(b"garbage", 0).is_err());
        assert_eq!(r.stats().malformed, 1);
    }

    #[test]
    fn reorder_buffer_is_bounded() {
        let mut s = sender(77);
        let mut c = ReceiverConfig::new(CLUSTER, ME, MY_EPOCH, SENDER);
        c.reorder_capacity = 20;
        let mut r = DeltaReceiver::new(c).expect("receiver");
        feed(&mut r, &frames(&mut s), 0);
        for i in 0..64 {
            s.submit(&up(i), 0).expect("submit");
        }
        let f = frames(&mut s);
        feed(&mut r, &f[1..], 1);
        assert_eq!(r.stats().reorder_depth, 20);
        assert_eq!(r.stats().reorder_drops, 28);
    }

    #[test]
    fn start_at_follows_from_a_snapshot_point() {
        let mut s = sender(77);
        let _ = frames(&mut s);
        let mut r = receiver();
        for i in 0..20 {
            s.submit(&up(i), 0).expect("submit");
        }
        s.flush();
        r.start_at(77, 10, 0);
        feed(&mut r, &frames(&mut s), 1);
        assert_eq!(delivered(&events(&mut r)), (10..=20).collect::<Vec<_>>());
        assert_eq!(r.stats().unknown_epoch, 0);
    }

    /// A well-formed frame with hostile contents: any opcode, the real or a
    /// random epoch, extreme sequence numbers, ranges for anyone.
    fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
        let seq = prop_oneof![Just(1u64), Just(u64::MAX - 16), Just(u64::MAX), 1u64..100, any::<u64>()];
        let epoch = prop_oneof![Just(77u32), Just(88u32), 1u32..=u32::MAX];
        let member = prop_oneof![Just(SENDER), Just(ME), any::<u16>()];
        (0u8..6, epoch.clone(), member.clone(), seq.clone(), seq.clone(), seq, epoch, member, 1usize..17).prop_map(
            |(op, epoch, target, a, b, c, target_epoch, sender, n)| {
                let o = Origin { cluster_id: CLUSTER, member_id: sender, epoch };
                let (lo, hi) = (a.min(b), a.max(b));
                let range = SeqRange { target, target_epoch, from: lo, to: hi };
                let mut buf = vec![0u8; MAX_FRAME];
                let len = match op {
                    0 => {
                        let first = c.min(u64::MAX - 16);
                        let mut w = DeltaWriter::new(&mut buf, o, first, false).expect("writer");
                        for i in 0..n {
                            w.push(&up(i as u32)).expect("push");
                        }
                        w.finish()
                    }
                    1 => Frame::encode_nack(&mut buf, &o, &[range]),
                    2 => Frame::encode_lost(&mut buf, &o, &[range]),
                    3 => Frame::encode_alive(&mut buf, &o, c),
                    4 => Frame::encode_hello(&mut buf, &o, lo, hi),
                    _ => Frame::encode_ack(&mut buf, &o, &[AckEntry { target, target_epoch, through: c }]),
                };
                buf.truncate(len.unwrap_or(0));
                buf
            },
        )
    }

    fn arb_update() -> impl Strategy<Value = DeltaUpdate> {
        // Small domains, so that ties in generation and owner are common.
        (0u32..3, 0u16..3, any::<bool>(), 0u32..3, 0u32..2).prop_map(|(generation, owner, del, mark, k)| {
            let st = ConnState { generation: generation.into(), mark: mark.into(), ..ConnState::default() };
            if del {
                DeltaUpdate::delete(owner, key(k), st)
            } else {
                DeltaUpdate::upsert(owner, key(k), st, Nat::default())
            }
        })
    }

    fn fold_resolve<'a>(mut it: impl Iterator<Item = &'a DeltaUpdate>) -> Option<DeltaUpdate> {
        let first = it.next().copied();
        it.fold(first, |acc, u| acc.map(|a| *resolve(&a, u)))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn precedence_is_a_total_order(a in arb_update(), b in arb_update(), c in arb_update()) {
            // Antisymmetric, and Equal only for identical updates.
            prop_assert_eq!(precedence(&a, &b), precedence(&b, &a).reverse());
            prop_assert_eq!(precedence(&a, &b) == Ordering::Equal, a == b);
            prop_assert_eq!(precedence(&a, &a), Ordering::Equal);
            // Transitive.
            if precedence(&a, &b) != Ordering::Greater && precedence(&b, &c) != Ordering::Greater {
                prop_assert_ne!(precedence(&a, &c), Ordering::Greater);
            }
            // Generation first, then owner.
            if a.state.generation.get() != b.state.generation.get() {
                prop_assert_eq!(precedence(&a, &b), a.state.generation.get().cmp(&b.state.generation.get()));
            } else if a.owner != b.owner {
                prop_assert_eq!(precedence(&a, &b), a.owner.cmp(&b.owner));
            }
        }

        #[test]
        fn hostile_frames_never_break_the_machines(hostile in prop::collection::vec(arb_frame(), 1..40)) {
            let mut s = sender(77);
            let mut r = receiver();
            feed(&mut r, &frames(&mut s), 0);
            for i in 0..40 {
                s.submit(&up(i), 0).expect("submit");
            }
            let mut now = 1;
            let mut last: BTreeMap<u32, u64> = BTreeMap::new();
            let mut epoch = None;
            for f in &hostile {
                now += 1_000_000;
                let _ = r.handle_datagram(f, now);
                let _ = s.handle_datagram(f, now);
                for t in [r.poll_timeout(), s.poll_timeout()].into_iter().flatten() {
                    r.handle_timeout(t.max(now));
                    s.handle_timeout(t.max(now));
                }
                while let Some(t) = r.poll_transmit() {
                    prop_assert!(Frame::parse(&t.frame).is_ok());
                }
                while let Some(t) = s.poll_transmit() {
                    prop_assert!(Frame::parse(&t.frame).is_ok());
                    prop_assert!(t.frame.len() <= MAX_FRAME);
                }
                while let Some(ev) = r.poll_event() {
                    match ev {
                        ReceiverEvent::PeerReset { new_epoch, .. } => epoch = Some(new_epoch),
                        ReceiverEvent::Deliver { seq, .. } => {
                            let e = epoch.expect("delivery inside an epoch");
                            let prev = last.insert(e, seq);
                            prop_assert!(prev.is_none_or(|p| p < seq), "{:?} then {}", prev, seq);
                        }
                        ReceiverEvent::ResyncNeeded { .. } => {}
                    }
                }
                prop_assert!(r.stats().reorder_depth <= r.config().reorder_capacity as u64);
                prop_assert!(s.stats().queue_depth <= 32);
            }
        }

        #[test]
        fn resolve_is_order_independent(v in prop::collection::vec(arb_update(), 1..8), rot in 0usize..8) {
            prop_assert_eq!(resolve(&v[0], &v[v.len() - 1]), resolve(&v[v.len() - 1], &v[0]));
            let forward = fold_resolve(v.iter());
            let backward = fold_resolve(v.iter().rev());
            let mut rotated = v.clone();
            rotated.rotate_left(rot % v.len());
            let rotated = fold_resolve(rotated.iter());
            let max = v.iter().max_by(|a, b| precedence(a, b)).copied();
            prop_assert_eq!(forward, backward);
            prop_assert_eq!(forward, rotated);
            prop_assert_eq!(forward, max);
        }
    }
}
