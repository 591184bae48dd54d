//! A cluster member's host side: membership, Full Sync and the device, as
//! one sans-IO state machine.
//!
//! This is what ClusterXL's `fwd`/`cxld` daemons do on a member, above the
//! NIC that runs Delta Sync on its own (see `hdl-model`'s sync unit):
//!
//! * **Membership** ([`crate::membership`]): probes, member states and the
//!   HA / load-sharing election.
//! * **Full Sync** ([`crate::fullsync`]): a member that starts, or that lost
//!   updates, pulls a consistent snapshot of a synced member's table. It sets
//!   the device's `SYNC_HOLD` first, so that the deltas arriving meanwhile
//!   are held on the card; once the source answers (BEGIN) it empties its
//!   table (a source that never answers leaves it as it was), writes every snapshot
//!   record with a REPLICA upsert (owner kept, conflict rule applied), and
//!   releases the hold, which applies the held deltas in arrival order. Only
//!   then does it report itself synced (Down → Ready → Standby/Active). A
//!   failed or interrupted transfer is retried (the next address of the
//!   peer first, then after a backoff); a half-written table is never
//!   reported as synced.
//! * **Serving Full Sync**: a walk of the device table with SYNC_RECORDS
//!   SNAPSHOT chunks, consistent from its start (the device carries entries
//!   that cuckoo moves put behind the walk), streamed chunk by chunk. One
//!   walk runs at a time per device; later requests wait their turn.
//!
//! Nothing here touches a socket or a clock. The driver (the daemon's
//! tokio loop, the in-process cluster, the seeded simulator) hands in
//! datagrams, stream bytes and connection events with the current time,
//! and carries out the [`NodeOutput`]s it polls. The device is driven
//! synchronously through the rings (a few microseconds per call).

use std::collections::{HashMap, VecDeque};

use nicsync_fwif::cmd::SNAPSHOT_DONE;
use nicsync_fwif::event::EventKind;
use nicsync_fwif::regs::Counter;
use nicsync_fwif::sync::DeltaUpdate;
use nicsync_seal::Refusal;
use nicsync_vfio::NicDevice;

use crate::fullsync::{self, ClientEvent, FullSyncClient, FullSyncParams, FullSyncServer};
use crate::membership::{self, MemberState, MemberView, Membership, MembershipParams, Mode};
use crate::secure::{NodeSecurity, RefusedTotals, SecurityStats};
use crate::table::{ConnTable, TableError};
use nicsync_model::seal_port::SealConfig;

/// Time in nanoseconds, from an origin the driver chooses.
pub type Nanos = u64;

/// Identifies one Full Sync stream connection for the driver.
pub type ConnId = u64;

/// How a member is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Cluster id (frames of other clusters are dropped).
    pub cluster_id: u16,
    /// This member's id (non-zero).
    pub member_id: u16,
    /// The other members.
    pub peers: Vec<u16>,
    /// High availability or load sharing.
    pub mode: Mode,
    /// Probe period.
    pub probe_interval_ns: Nanos,
    /// Probes missed before a member is taken as dead.
    pub dead_after: u32,
    /// Records per Full Sync chunk.
    pub chunk_records: u32,
    /// A Full Sync that makes no progress for this long fails.
    pub full_sync_timeout_ns: Nanos,
    /// Wait after a failed Full Sync before the next try.
    pub retry_backoff_ns: Nanos,
    /// Random non-zero number of this process start.
    pub incarnation: u32,
    /// A member that hears no peer at all declares its table the
    /// cluster's after this long (a cluster of one, or every peer down).
    pub alone_after_ns: Nanos,
    /// Keys that seal membership datagrams and Full Sync streams (the
    /// device's sync port is sealed with the same, see
    /// [`crate::member::emulated_node`]); `None` runs them in clear.
    pub seal: Option<SealConfig>,
    /// The key file `seal`'s keys came from ([`Node::reload_keys`]).
    pub key_file: Option<std::path::PathBuf>,
    /// What the card's generation floor follows (see [`GenerationClock`]).
    pub generation_clock: GenerationClock,
}

/// What a member's card numbers its own changes above
/// ([`nicsync_fwif::regs::GENERATION_FLOOR`]), so that a member that
/// restarted numbers them above those of its previous life. That life's
/// last changes may still reach the peers after the restart (a peer cut
/// off then learns of them late); the restarted member, which no longer
/// knows them, would otherwise number its next change of the same key
/// alike, and the conflict rule could keep the older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationClock {
    /// Generations count from 1 per key.
    Off,
    /// Seconds since 2024-01-01 on the system clock, one more at start (a
    /// process restart takes longer than the second this leaves).
    WallSeconds,
    /// Milliseconds of the driver's time (`now`), for a driver whose clock
    /// runs on across a member's restarts (the simulator).
    DriverMillis,
}

/// How often [`Node::progress`] brings the card's generation floor up to
/// its clock.
const FLOOR_CHECK_NS: Nanos = 10_000_000;

/// 2024-01-01T00:00:00Z in seconds since the Unix epoch.
const GENERATION_EPOCH_S: u64 = 1_704_067_200;

impl GenerationClock {
    /// The floor at driver time `now` (0: none).
    pub fn floor(self, now: Nanos) -> u32 {
        match self {
            GenerationClock::Off => 0,
            GenerationClock::WallSeconds => {
                let unix =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                u32::try_from(unix.saturating_sub(GENERATION_EPOCH_S)).unwrap_or(u32::MAX)
            }
            GenerationClock::DriverMillis => u32::try_from(now / 1_000_000).unwrap_or(u32::MAX),
        }
    }
}

impl NodeConfig {
    /// Defaults for member `member_id` of a cluster of `peers`.
    pub fn new(cluster_id: u16, member_id: u16, peers: Vec<u16>, incarnation: u32) -> Self {
        NodeConfig {
            cluster_id,
            member_id,
            peers,
            mode: Mode::HighAvailability,
            probe_interval_ns: crate::membership::DEFAULT_PROBE_INTERVAL_NS,
            dead_after: crate::membership::DEFAULT_DEAD_AFTER,
            chunk_records: 1024,
            full_sync_timeout_ns: 2_000_000_000,
            retry_backoff_ns: 100_000_000,
            incarnation: incarnation.max(1),
            alone_after_ns: 500_000_000,
            seal: None,
            key_file: None,
            generation_clock: GenerationClock::WallSeconds,
        }
    }
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeOutput {
    /// Send a membership datagram.
    Ccp {
        /// To all peers or one.
        dest: membership::Destination,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// Open a Full Sync stream to `peer`; `attempt` counts the tries of
    /// this sync (a driver with several addresses for the peer uses
    /// address `attempt % n`). Answer with [`Node::fs_connected`] or
    /// [`Node::fs_closed`].
    FsConnect {
        /// The new stream.
        conn: ConnId,
        /// The member to pull from.
        peer: u16,
        /// Try number, from 0.
        attempt: u32,
    },
    /// Write bytes on a stream.
    FsSend {
        /// The stream.
        conn: ConnId,
        /// What to write.
        bytes: Vec<u8>,
    },
    /// Close a stream (after its last bytes).
    FsClose {
        /// The stream.
        conn: ConnId,
    },
}

/// Counters of the host side (the device's sync counters are separate).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct NodeStats {
    /// Full Syncs pulled to the end and applied.
    pub full_syncs_completed: u64,
    /// Full Sync attempts that failed (each retried).
    pub full_syncs_failed: u64,
    /// Duration of the last completed Full Sync.
    pub last_full_sync_ms: Option<f64>,
    /// Records in the last completed Full Sync.
    pub last_full_sync_records: u64,
    /// Standbys found with a table digest different from the Active's
    /// (each asked to resync).
    pub divergences_detected: u64,
    /// Merge pulls (realignments) completed.
    pub merges_completed: u64,
    /// Merge pulls that failed.
    pub merges_failed: u64,
    /// Full Syncs served to peers to the end.
    pub full_syncs_served: u64,
    /// Full Syncs served that failed.
    pub full_syncs_serve_failed: u64,
    /// SNAPSHOT walks that tore (restarted by the peer's retry).
    pub snapshot_walks_torn: u64,
    /// Resyncs started: by an operator, a peer's request or the device.
    pub resyncs_requested: u64,
    /// Resync requests of peers ignored because this member is the Active.
    pub resync_requests_ignored: u64,
    /// RESYNC_NEEDED events from the device (lost updates, no room, hold overflow).
    pub device_resync_events: u64,
    /// SYNC_UPDATED / SYNC_REMOVED events from the device.
    pub sync_events: u64,
    /// Membership datagrams refused.
    pub ccp_rejected: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// Where this member is in joining the cluster.
#[derive(Debug)]
enum Phase {
    /// Just started: listening for the others before choosing a source.
    Listening { until: Nanos },
    /// Pulling a Full Sync.
    Pulling(Box<Pull>),
    /// Waiting before the next Full Sync try.
    Backoff { until: Nanos, attempt: u32 },
    /// Synced.
    Synced,
}

#[derive(Debug)]
struct Pull {
    conn: ConnId,
    peer: u16,
    attempt: u32,
    client: Option<FullSyncClient>,
    started: Nanos,
    records: u64,
    /// Set when the transfer is over (either way) and the stream must go.
    finished: bool,
    /// Chunks received and not yet written to the card, oldest first (at
    /// most two: see [`pump_pull`]), with how many of the first's records
    /// are written.
    pending: VecDeque<(u32, Vec<nicsync_fwif::sync::DeltaRecord>)>,
    written: usize,
    /// The chunk received while an earlier one waited to be written: it is
    /// acknowledged once that one is written.
    unacked: Option<u32>,
    /// The server's END arrived (the records it counted).
    done: Option<u64>,
    /// Where the server's snapshot was cut in each member's Delta Sync
    /// stream (from BEGIN), told to the card once the pull is done.
    cut: Vec<nicsync_fwif::cmd::SyncPosition>,
    /// The slice of the first pending chunk posted to the card
    /// (`ConnTable::load_post`) and not taken in yet: its ticket,
    /// `from..to`, and whether it ends the chunk.
    posted: Option<(crate::table::LoadTicket, usize, usize, bool)>,
    /// Peer updates the card reported lost (RESYNC_NEEDED) during the
    /// pull: those after the snapshot's cut are in neither the snapshot
    /// nor the held updates.
    lost_events: u64,
    /// What it does with the table it writes into.
    emptying: Emptying,
}

/// What a pull does with the table it writes into ([`Pull`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Emptying {
    /// Nothing: a merge writes into the table as it is.
    Never,
    /// A Full Sync before its source's BEGIN: the table is emptied then,
    /// not before, so that a pull whose source is dead or unreachable
    /// leaves it as it was.
    AtBegin,
    /// BEGIN came: emptied before the first write.
    Due,
    /// Emptied (or its FLUSH failed): no member's table until the pull is
    /// done.
    Done,
}

impl Pull {
    fn new(conn: ConnId, peer: u16, attempt: u32, now: Nanos) -> Self {
        Pull {
            conn,
            peer,
            attempt,
            client: None,
            started: now,
            records: 0,
            finished: false,
            pending: VecDeque::new(),
            written: 0,
            unacked: None,
            done: None,
            cut: Vec::new(),
            posted: None,
            lost_events: 0,
            emptying: Emptying::Never,
        }
    }

    /// Gives up the slice still posted to the card, if any: settled now,
    /// its outcome no longer matters (the pull or merge is over).
    fn drop_write<D: NicDevice>(&mut self, table: &mut ConnTable<D>) {
        if self.posted.take().is_some() {
            table.drop_posted_load();
        }
    }

    /// Chunks wait to be written: the loop must come back at once.
    fn has_work(&self) -> bool {
        !self.pending.is_empty() || self.emptying == Emptying::Due
    }
}

#[derive(Debug)]
struct Serve {
    conn: ConnId,
    server: FullSyncServer,
    /// When the stream came (an audit ended since lets the walk begin).
    accepted: Nanos,
    /// Owns the device's walk.
    walking: bool,
    cursor: u32,
    walk_done: bool,
    /// Records walked and not sent yet (from `pos`), checked, as they go
    /// on the wire.
    buf: Vec<nicsync_fwif::sync::DeltaRecord>,
    pos: usize,
    closed: bool,
}

/// What [`Node::audit_table`] came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuditState {
    /// Done: whether it walked the card, and whether it found (and
    /// restored) anything.
    Done { walked: bool, found: bool },
    /// Walking the card, a chunk per turn: ask again.
    Walking,
    /// Not now (a walk served, a pull): an audit under way was abandoned.
    Refused,
}

/// After an audit that walked the card, the next waits this long per entry
/// on the card: a walk costs about 0.5 µs an entry here, so walks take at
/// most a twentieth of the loop's time (10 s between walks of a million).
const AUDIT_WAIT_PER_ENTRY_NS: u64 = 10_000;

/// A misconfiguration that refuses every datagram (a wrong key, a peer
/// given another's id) is warned of at most this often (with the counts).
pub const REFUSAL_WARN_EVERY_NS: Nanos = 10_000_000_000;

/// A [`Node::progress`] longer than this is logged (debug), by part.
const SLOW_PROGRESS: std::time::Duration = std::time::Duration::from_millis(20);

/// One cluster member's host logic over its device table.
pub struct Node<D: NicDevice> {
    cfg: NodeConfig,
    table: ConnTable<D>,
    ms: Membership,
    phase: Phase,
    serving: Vec<Serve>,
    out: VecDeque<NodeOutput>,
    next_conn: ConnId,
    stats: NodeStats,
    /// Set by an operator or the device: resync this member's table.
    resync_wanted: bool,
    /// The wanted resync (the device's, for lost updates) merges the
    /// peers' tables into this one instead of replacing it with a Full
    /// Sync (see [`Node::drive_pull`]).
    resync_by_merge: bool,
    scratch: Vec<u8>,
    session_seed: u32,
    /// Peers asked to resync that have not yet been seen going Down:
    /// (member, next send, sends so far). The request is one datagram, so
    /// it is repeated until the peer acts on it.
    resync_asks: Vec<(u16, Nanos, u32)>,
    /// Whether the table is this member's own, not emptied for a pull that
    /// has not finished: only such a table may become the cluster's.
    table_own: bool,
    /// When this member started.
    started: Nanos,
    /// When the generation floor was last brought up to the clock.
    floor_checked: Nanos,
    /// Since when it has been looking for an Active to pull from.
    looking_since: Option<Nanos>,
    /// The merge pull in progress (realignment; the member stays in its
    /// state meanwhile).
    merge: Option<Box<Pull>>,
    /// Peers to merge from next.
    merge_queue: VecDeque<u16>,
    /// Ask the peers to merge this member's table when the queue is done.
    ask_merge_after: bool,
    /// Per peer whose merge failed: failures so far in this round of
    /// merges (the next tries its next address, after a growing backoff),
    /// and the earliest time of the next try.
    merge_retries: HashMap<u16, (u32, Nanos)>,
    /// A peer died, restarted or came back, since (this member's clock):
    /// realign once this member is the reference, if that is soon.
    realign_due: Option<Nanos>,
    /// Peers this member took for dead and has not heard since: hearing
    /// one again is a healed partition.
    taken_for_dead: Vec<u16>,
    /// Report this member synced when the merge queue is done (a load
    /// sharing member resyncing, or just past its pull: see
    /// [`Node::merge_from_peers`]).
    rejoin_after_merges: bool,
    /// This member's table digest and since when it has had that value.
    digest: (u64, Nanos),
    /// When a digest mismatch last made this member realign (at most one
    /// a second).
    last_realign_for_divergence: Option<Nanos>,
    /// Since when it has been waiting for its own updates to be
    /// acknowledged before a pull.
    drain_since: Option<Nanos>,
    /// An orderly stop under way ([`Node::begin_stop`]).
    stop: Option<Stopping>,
    /// Sealing of membership datagrams and Full Sync streams.
    security: Option<NodeSecurity>,
    /// When a membership datagram that did not open was last warned of.
    auth_warned_at: Option<Nanos>,
    /// Changes the peers made to this member's card, kept for the caller
    /// when asked for ([`Node::record_peer_changes`]).
    peer_changes: Option<Vec<(nicsync_fwif::conn::ConnKey, bool)>>,
    /// Outputs already on the wire's terms (sealed, or a handshake): they
    /// leave before [`Node::out`], whose items are sealed as they leave.
    raw_out: VecDeque<NodeOutput>,
    /// Device resets the table made to recover from faults, as last seen
    /// (with fault recovery on): a new one is acted upon.
    resets_seen: u64,
    /// Device events lost (the ring overflowed, or an entry was garbled),
    /// as last seen: a new loss is acted upon.
    events_lost_seen: u64,
    /// When the table (with fault recovery on) is audited next.
    next_audit: Nanos,
    /// When the audit last took a step (a walk takes one chunk per moment
    /// of the loop, whoever asks: `progress` runs once per input).
    audit_stepped_at: Option<Nanos>,
    /// When the last audit ended, and what it came to.
    last_audit: Option<(Nanos, AuditState)>,
}

/// Times a resync request is repeated before it is given up.
const RESYNC_ASK_TRIES: u32 = 100;

/// An orderly stop under way ([`Node::begin_stop`]).
#[derive(Clone, Copy, Debug)]
struct Stopping {
    /// When it began.
    since: Nanos,
    /// The drain of this member's own changes ends here at the latest.
    drain_until: Nanos,
    /// The sequence number of this member's last change when the stop
    /// began: the drain waits for every peer to acknowledge it. Changes
    /// made after it (a conntrack source's kernel events go on) are not
    /// waited for, or a busy member would wait for its whole drain.
    last_change: u64,
    /// When Down was announced, and this member's changes some peer had
    /// not acknowledged then.
    announced: Option<(Nanos, u64)>,
}

/// How an orderly stop went ([`Node::stop_progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopReport {
    /// This member's changes made before the stop that some peer had not
    /// acknowledged when it announced itself Down (0 unless the drain ran
    /// out: a peer dead or cut off, or one that cannot keep up).
    pub unacked: u64,
    /// From the start of the stop until the announcement.
    pub drain_ns: Nanos,
}

impl<D: NicDevice> std::fmt::Debug for Node<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("member", &self.cfg.member_id)
            .field("state", &self.ms.local_state())
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// Why a node could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Membership parameters refused.
    #[error("membership: {0}")]
    Membership(String),
    /// The device refused.
    #[error("device: {0}")]
    Table(#[from] TableError),
}

impl<D: NicDevice> Node<D> {
    /// A member over `table` (a device brought up with a sync unit whose
    /// member id is `cfg.member_id`). It starts Down and listens for one
    /// dead interval before it picks a member to pull a Full Sync from, or
    /// finds itself alone.
    pub fn new(mut table: ConnTable<D>, cfg: NodeConfig, now: Nanos) -> Result<Self, NodeError> {
        let digest = table.driver_ref().device_counter(Counter::SyncDigest);
        let ms = Membership::with_digest(
            MembershipParams {
                cluster_id: cfg.cluster_id,
                member_id: cfg.member_id,
                peers: cfg.peers.clone(),
                mode: cfg.mode,
                probe_interval_ns: cfg.probe_interval_ns,
                dead_after: cfg.dead_after,
                incarnation: cfg.incarnation,
            },
            digest,
            now,
        )
        .map_err(|e| NodeError::Membership(e.to_string()))?;
        // A new member holds the peers' updates from its first moment, so
        // that none is applied before the snapshot it will pull (a table
        // opened with `DriverConfig::sync_hold_at_enable` holds from its
        // enable; this is for one that was not).
        table.driver().set_sync_hold(true).map_err(|e| NodeError::Table(e.into()))?;
        // One above the clock at start: a restart within the clock's unit
        // still numbers above the previous life's start.
        if cfg.generation_clock != GenerationClock::Off {
            table.driver().raise_generation_floor(cfg.generation_clock.floor(now).saturating_add(1));
        }
        let listen = cfg.probe_interval_ns.saturating_mul(cfg.dead_after as u64 + 1);
        let security = cfg.seal.clone().map(|c| NodeSecurity::new(c, cfg.cluster_id, cfg.member_id, &cfg.peers));
        let resets_seen = table.recovery_stats().resets;
        Ok(Node {
            security,
            auth_warned_at: None,
            raw_out: VecDeque::new(),
            session_seed: cfg.incarnation,
            cfg,
            table,
            ms,
            phase: Phase::Listening { until: now.saturating_add(listen) },
            serving: Vec::new(),
            out: VecDeque::new(),
            next_conn: 1,
            stats: NodeStats::default(),
            resync_wanted: false,
            resync_by_merge: false,
            scratch: Vec::new(),
            resync_asks: Vec::new(),
            table_own: true,
            started: now,
            floor_checked: now,
            looking_since: None,
            drain_since: None,
            stop: None,
            merge: None,
            merge_queue: VecDeque::new(),
            ask_merge_after: false,
            merge_retries: HashMap::new(),
            realign_due: None,
            taken_for_dead: Vec::new(),
            rejoin_after_merges: false,
            digest: (0, 0),
            last_realign_for_divergence: None,
            resets_seen,
            events_lost_seen: 0,
            next_audit: now,
            audit_stepped_at: None,
            last_audit: None,
            peer_changes: None,
        })
    }

    /// Starts an orderly stop (the daemon's SIGTERM): this member's own
    /// table changes made so far (its card's position, from SYNC_POSITIONS)
    /// get up to `drain_ns` to be acknowledged by every peer (the card's
    /// `sync_next_seq` and `sync_unacked` counters), and the Full Syncs it
    /// serves to end; then it announces itself Down, so that the peers fail
    /// over within a network delay instead of a dead window, and hold every
    /// change it made. Meanwhile it goes on as before (a conntrack source
    /// keeps putting its kernel's events on the card), but starts no pull,
    /// resync or merge; [`Node::stop_progress`] drives it and says when the
    /// member may exit. Calling it again changes nothing.
    pub fn begin_stop(&mut self, now: Nanos, drain_ns: Nanos) {
        if self.stop.is_none() {
            tracing::info!(
                member = self.cfg.member_id,
                "orderly stop: waiting up to {:.0} ms for the peers to acknowledge this member's changes",
                drain_ns as f64 / 1e6
            );
            let (alive, total, quorum) = self.ms.quorum_without_self();
            if !quorum && !self.cfg.peers.is_empty() {
                tracing::warn!(
                    member = self.cfg.member_id,
                    "orderly stop: {alive} of the cluster's {total} members are left alive: no majority, so no member \
                     will be Active (nor forward traffic) until more come back"
                );
            }
            // The card's own position, from a command: its counters are
            // published off the command path and may lag the last writes.
            // (The counters read later only lag: they can make the drain
            // wait longer, never end it early.)
            let next = match self.table.sync_positions() {
                Ok(Some(p)) if !p.is_empty() => p[0].next_seq.get(),
                _ => self.table.driver_ref().device_counter(Counter::SyncNextSeq),
            };
            let last_change = next.saturating_sub(1);
            self.stop =
                Some(Stopping { since: now, drain_until: now.saturating_add(drain_ns), last_change, announced: None });
        }
    }

    /// Whether an orderly stop is under way.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_some()
    }

    /// Of this member's changes up to `last_change` (its card's sequence
    /// number), how many some peer heard within three ALIVE intervals has
    /// not acknowledged.
    fn changes_unacknowledged(&self, last_change: u64) -> u64 {
        // Every such peer has acknowledged up to `last - unacked`.
        let drv = self.table.driver_ref();
        let last = drv.device_counter(Counter::SyncNextSeq).saturating_sub(1);
        let acked = last.saturating_sub(drv.device_counter(Counter::SyncUnacked));
        last_change.saturating_sub(acked)
    }

    /// An orderly stop cut short (a second signal): how many of the
    /// changes it was draining the peers had not acknowledged (`None`: no
    /// stop under way).
    pub fn stop_cut_short(&self) -> Option<u64> {
        let stop = self.stop.as_ref()?;
        Some(match stop.announced {
            Some((_, unacked)) => unacked,
            None => self.changes_unacknowledged(stop.last_change),
        })
    }

    /// Drives an orderly stop ([`Node::begin_stop`]): once the peers have
    /// acknowledged this member's changes, or the drain ran out, announces
    /// Down; then lingers one probe interval, so that the periodic probe
    /// repeats the announcement should its datagram be lost. Returns the
    /// report once the member may exit, `None` before (and when no stop
    /// was asked for).
    pub fn stop_progress(&mut self, now: Nanos) -> Option<StopReport> {
        let stop = self.stop.as_mut()?;
        let since = stop.since;
        let (announced, unacked) = match stop.announced {
            Some(a) => a,
            None => {
                let last_change = stop.last_change;
                let unacked = self.changes_unacknowledged(last_change);
                let stop = self.stop.as_mut()?;
                // A Full Sync it serves is a member's only way to its
                // table: it is let finish within the drain too.
                if (unacked > 0 || !self.serving.is_empty()) && now < stop.drain_until {
                    return None;
                }
                stop.announced = Some((now, unacked));
                let drained = now.saturating_sub(since);
                if unacked > 0 {
                    self.note_error(format!(
                        "orderly stop: {unacked} of this member's changes not acknowledged by every peer after {:.0} ms; announcing Down anyway",
                        drained as f64 / 1e6
                    ));
                }
                tracing::info!(
                    member = self.cfg.member_id,
                    "orderly stop: announcing Down after {:.1} ms ({unacked} unacknowledged)",
                    drained as f64 / 1e6
                );
                self.ms.set_down(now);
                while let Some(t) = self.ms.poll_transmit() {
                    self.out.push_back(NodeOutput::Ccp { dest: t.dest, bytes: t.bytes });
                }
                (now, unacked)
            }
        };
        let linger = if self.cfg.peers.is_empty() { 0 } else { self.cfg.probe_interval_ns };
        (now >= announced.saturating_add(linger))
            .then(|| StopReport { unacked, drain_ns: announced.saturating_sub(since) })
    }

    /// Keeps (or stops keeping) the keys the peers' sync updates changed on
    /// this member's card, for [`Node::take_peer_changes`] (a Standby
    /// mirroring them into its kernel).
    pub fn record_peer_changes(&mut self, on: bool) {
        if !on {
            self.peer_changes = None;
        } else if self.peer_changes.is_none() {
            self.peer_changes = Some(Vec::new());
        }
    }

    /// The keys the peers changed since the last call, in order, each with
    /// whether it was removed.
    pub fn take_peer_changes(&mut self) -> Vec<(nicsync_fwif::conn::ConnKey, bool)> {
        self.peer_changes.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Counters of the host's sealing (zero when it runs in clear).
    pub fn security_stats(&self) -> SecurityStats {
        self.security.as_ref().map(NodeSecurity::stats).unwrap_or_default()
    }

    /// Reads the key file again and installs its keys for the device's sync
    /// port, membership and Full Sync (a rotation step); returns the send
    /// key id and how many keys are accepted.
    pub fn reload_keys(&mut self) -> Result<(u8, usize), String> {
        let (Some(seal), Some(path)) = (&self.cfg.seal, &self.cfg.key_file) else {
            return Err("this member runs without sync encryption (no key file)".into());
        };
        let ring = nicsync_seal::Keyring::load(path).map_err(|e| e.to_string())?;
        let r = (ring.send_key().id(), ring.keys().len());
        seal.keys.replace(ring);
        tracing::info!(member = self.cfg.member_id, "sync keys reloaded: send key {}, {} accepted", r.0, r.1);
        Ok(r)
    }

    /// Sealed traffic this member refused: the device's sync port
    /// (`sync_*` counters) and the host's membership and Full Sync.
    pub fn refused(&self) -> RefusedTotals {
        let drv = self.table.driver_ref();
        let delta = RefusedTotals {
            auth_failures: drv.device_counter(Counter::SyncAuthFailures),
            replays_dropped: drv.device_counter(Counter::SyncReplaysDropped),
            unknown_member: drv.device_counter(Counter::SyncUnknownMember),
            malformed: drv.device_counter(Counter::SyncMalformed),
        };
        RefusedTotals::of(&delta, &self.security_stats())
    }

    /// Whether membership and Full Sync are sealed.
    pub fn is_sealed(&self) -> bool {
        self.security.is_some()
    }

    /// This member's id.
    pub fn member_id(&self) -> u16 {
        self.cfg.member_id
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The device table (for the application's own inserts and lookups).
    pub fn table(&mut self) -> &mut ConnTable<D> {
        &mut self.table
    }

    /// The device table, shared.
    pub fn table_ref(&self) -> &ConnTable<D> {
        &self.table
    }

    /// This member's state.
    pub fn state(&self) -> MemberState {
        self.ms.local_state()
    }

    /// Every member as this one sees it.
    pub fn members(&self) -> Vec<MemberView> {
        self.ms.members()
    }

    /// The membership machine (statistics, views).
    pub fn membership(&self) -> &Membership {
        &self.ms
    }

    /// Host-side counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Whether a Full Sync is being pulled now.
    pub fn is_pulling(&self) -> bool {
        matches!(self.phase, Phase::Pulling(_))
    }

    /// What the member is doing about its table, in words (for the
    /// simulator's key trace): listening, pulling or merging from whom, or
    /// synced.
    pub fn activity(&self) -> String {
        let merge = self.merge.as_ref().map(|p| format!(", merging from {}", p.peer)).unwrap_or_default();
        match &self.phase {
            Phase::Listening { .. } => "listening".into(),
            Phase::Pulling(p) => format!("pulling from {}", p.peer),
            Phase::Backoff { .. } => "waiting to pull".into(),
            Phase::Synced => format!("synced{merge}"),
        }
    }

    /// Whether this member holds a synced table.
    pub fn is_synced(&self) -> bool {
        matches!(self.phase, Phase::Synced)
    }

    /// Full Syncs being served now.
    pub fn serving(&self) -> usize {
        self.serving.len()
    }

    /// A membership datagram arrived.
    pub fn handle_ccp(&mut self, bytes: &[u8], now: Nanos) {
        self.handle_ccp_received(bytes, now, now);
    }

    /// A membership datagram that arrived at `received` (the host's receive
    /// stamp) is read at `now` ([`Membership::handle_datagram_received`]).
    pub fn handle_ccp_received(&mut self, bytes: &[u8], received: Nanos, now: Nanos) {
        let plain = match &mut self.security {
            Some(sec) => match sec.open_ccp(bytes) {
                Ok(p) => p,
                // Counted by the security layer; nothing moved. A member
                // whose key is not the peers' hears nobody and stays READY:
                // said in the log, not only in a counter.
                Err(why @ (Refusal::Auth | Refusal::UnknownMember)) => {
                    if self.auth_warned_at.is_none_or(|t| now.saturating_sub(t) >= REFUSAL_WARN_EVERY_NS) {
                        self.auth_warned_at = Some(now);
                        let (id, fp) = sec.send_key();
                        let s = sec.stats();
                        tracing::warn!(
                            member = self.cfg.member_id,
                            "membership: a datagram from a peer's address did not open ({}; {} failed to authenticate, {} from a member id that is not a peer, so far): do the members share the cluster key file (this member seals with key {id}, fingerprint {fp}; compare `nicsync key show` on each) and the member ids?",
                            if why == Refusal::Auth { "authentication failed" } else { "sealed by a member id that is not a peer" },
                            s.ccp_auth_failures,
                            s.ccp_unknown_member,
                        );
                    }
                    return;
                }
                Err(_) => return,
            },
            None => bytes,
        };
        if self.ms.handle_datagram_received(plain, received, now).is_err() {
            self.stats.ccp_rejected += 1;
        }
        self.progress(now);
    }

    /// An operator (or a peer's request) wants this member to pull a fresh
    /// Full Sync: it goes Down until the sync is done.
    pub fn request_resync(&mut self, now: Nanos) {
        self.stats.resyncs_requested += 1;
        self.resync_wanted = true;
        self.progress(now);
    }

    /// Why an operator's resync of member `target` would do nothing, if it
    /// would: `target` is not in the cluster, or it is a peer that is the
    /// cluster's reference as this member sees it (the Active in HA, the
    /// lowest-id Active in load sharing), which ignores a peer's request
    /// (its table is the cluster's). This member itself never refuses: asked
    /// directly, even the reference resyncs (in HA it steps down first).
    pub fn resync_refusal(&self, target: u16) -> Option<String> {
        let members = self.ms.members();
        let Some(view) = members.iter().find(|v| v.id == target) else {
            let ids: Vec<String> = members.iter().map(|v| v.id.to_string()).collect();
            return Some(format!("member {target} is not in this cluster (members {})", ids.join(", ")));
        };
        if view.is_local {
            return None;
        }
        let reference = match self.cfg.mode {
            Mode::HighAvailability => target,
            Mode::LoadSharing => members
                .iter()
                .filter(|v| (v.alive || v.is_local) && v.state.is_active())
                .map(|v| v.id)
                .min()
                .unwrap_or(target),
        };
        (view.alive && view.state.is_active() && reference == target).then(|| {
            format!(
                "member {target} is the cluster's reference (the Active{}): it ignores a peer's resync request, \
                 its table being the cluster's; ask it through its own control socket to resync it anyway",
                if self.cfg.mode == Mode::LoadSharing { " with the lowest id" } else { "" }
            )
        })
    }

    /// What an operator's resync of this member itself does beyond a
    /// pull, when it does more: the HA Active steps down first.
    pub fn own_resync_note(&self) -> Option<&'static str> {
        (self.cfg.mode == Mode::HighAvailability && self.is_reference())
            .then_some("this member is the Active: it steps down (the next member takes over), then pulls")
    }

    /// Asks member `target` to resync (through the membership channel,
    /// repeated until the peer is seen Down, i.e. pulling).
    pub fn request_peer_resync(&mut self, target: u16, now: Nanos) {
        if target == self.cfg.member_id {
            self.request_resync(now);
        } else {
            if !self.resync_asks.iter().any(|a| a.0 == target) {
                self.resync_asks.push((target, now, 0));
            }
            self.progress(now);
        }
    }

    /// The member the others sync from: this one when it is the
    /// cluster's reference, else the peer it would pull from itself
    /// ([`Membership::sync_source`], which never names this member).
    pub fn cluster_source(&self) -> Option<u16> {
        if self.is_reference() {
            Some(self.cfg.member_id)
        } else {
            self.ms.sync_source()
        }
    }

    /// Whether this member's table is the cluster's reference: the Active
    /// in HA; in load sharing the lowest-id Active. The reference realigns
    /// the others and checks their digests; it never empties itself.
    fn is_reference(&self) -> bool {
        let me = self.ms.local_state();
        if !matches!(me, MemberState::Active | MemberState::ActiveAttention) || !self.is_synced() {
            return false;
        }
        match self.cfg.mode {
            Mode::HighAvailability => true,
            Mode::LoadSharing => !self
                .ms
                .members()
                .iter()
                .any(|m| !m.is_local && m.alive && m.state.is_active() && m.id < self.cfg.member_id),
        }
    }

    /// Anti-entropy. Every member reports its device's running table digest
    /// in its probes. When the reference (the Active; in load sharing the
    /// lowest-id Active) sees a synced peer whose digest differs from its
    /// own, with both unchanged for three probe intervals (a quiet table,
    /// so not replication lag), their tables have diverged in a way no
    /// retransmission will mend (a dead member's last updates reached some
    /// members only, say): the reference realigns every member to the
    /// union. Never silent divergence.
    fn check_divergence(&mut self, now: Nanos) {
        let mine = self.table.driver_ref().device_counter(Counter::SyncDigest);
        if mine != self.digest.0 {
            self.digest = (mine, now);
        }
        self.ms.set_digest(mine);
        if !self.is_reference() || self.merge.is_some() || !self.merge_queue.is_empty() {
            return;
        }
        tracing::trace!(
            member = self.cfg.member_id,
            "anti-entropy check at {now}: digest {mine:016x} since {}",
            self.digest.1
        );
        let quiet = self.cfg.probe_interval_ns.saturating_mul(3);
        if now.saturating_sub(self.digest.1) < quiet {
            return;
        }
        let peers = self.synced_peers(None);
        // Any member may be the one missing changes: in load sharing every
        // member writes; in HA a new Active may lack its predecessor's last
        // writes that reached some Standbys only (a Standby resynced from a
        // peer that lacked them, then took over). Copying the reference's
        // table onto the others would erase those writes everywhere, so the
        // reference realigns instead: it merges every peer's table into its
        // own under the conflict rule, then has them merge it, and every
        // member ends with the union (deletes travel as tombstones).
        // A peer this member has asked to resync (an operator's request)
        // differs on purpose, its table perhaps emptied for the pull: a
        // realignment would merge it instead of the Full Sync asked for.
        let asked = |p: &u16| self.resync_asks.iter().any(|(target, _, _)| target == p);
        let differs = peers
            .iter()
            .filter(|p| !asked(p))
            .filter_map(|p| self.ms.peer_digest(*p))
            .any(|(d, since)| d != mine && now.saturating_sub(since) >= quiet);
        let recent = self.last_realign_for_divergence.is_some_and(|t| now.saturating_sub(t) < 1_000_000_000);
        // Before the realignment: the card may have lost entries the host's
        // copy still holds (the audit restores them).
        if !differs || recent {
            return;
        }
        // An audit walking the card decides when it is done; one that
        // restored entries changed the digest, which must settle again.
        if matches!(self.audit_table(now), AuditState::Done { found: false, .. } | AuditState::Refused)
            && self.is_reference()
        {
            self.last_realign_for_divergence = Some(now);
            self.stats.divergences_detected += 1;
            self.note_error(format!("a peer's table digest differs from this member's {mine:016x}: realigning"));
            self.realign(now);
        }
    }

    fn drive_resync_asks(&mut self, now: Nanos) {
        let views = self.ms.members();
        let every = self.cfg.probe_interval_ns.saturating_mul(3);
        let mut gave_up = Vec::new();
        self.resync_asks.retain_mut(|(target, next, tries)| {
            let down = views.iter().any(|v| v.id == *target && v.alive && v.state == MemberState::Down);
            if down && *tries > 0 {
                return false;
            }
            if *tries >= RESYNC_ASK_TRIES {
                gave_up.push(*target);
                return false;
            }
            if *next <= now {
                self.ms.request_resync(*target, now);
                *tries += 1;
                *next = now.saturating_add(every);
            }
            true
        });
        for t in gave_up {
            self.note_error(format!("member {t} did not act on the resync request"));
        }
    }

    /// Admin: member `target` (or this one) gives up Active.
    pub fn request_standby(&mut self, target: u16, now: Nanos) {
        self.ms.request_standby(target, now);
        self.progress(now);
    }

    /// A peer opened a Full Sync stream to this member.
    pub fn fs_accepted(&mut self, conn: ConnId, now: Nanos) {
        if let Some(sec) = &mut self.security {
            sec.fs_server(conn);
        }
        let server = FullSyncServer::new(self.fs_params(), now);
        self.serving.push(Serve {
            conn,
            server,
            accepted: now,
            walking: false,
            cursor: 0,
            walk_done: false,
            buf: Vec::new(),
            pos: 0,
            closed: false,
        });
        self.progress(now);
    }

    /// The oldest stream accepted that has not brought its REQUEST yet: a
    /// listener at its limit closes it (with [`Node::fs_closed`]) to make
    /// room, so that idle connections cannot keep joiners out.
    pub fn fs_oldest_idle_inbound(&self) -> Option<ConnId> {
        self.serving
            .iter()
            .filter(|s| !s.closed && s.server.awaiting_request())
            .min_by_key(|s| s.accepted)
            .map(|s| s.conn)
    }

    /// The stream this member opened ([`NodeOutput::FsConnect`]) is up.
    pub fn fs_connected(&mut self, conn: ConnId, now: Nanos) {
        if let Some(sec) = &mut self.security {
            let peer = match (&self.phase, &self.merge) {
                (Phase::Pulling(p), _) if p.conn == conn => Some(p.peer),
                (_, Some(m)) if m.conn == conn => Some(m.peer),
                _ => None,
            };
            if let Some(peer) = peer {
                match sec.fs_client(conn, peer) {
                    Ok(hello) => self.raw_out.push_back(NodeOutput::FsSend { conn, bytes: hello }),
                    Err(e) => {
                        self.note_error(format!("full sync: {e}"));
                        self.raw_out.push_back(NodeOutput::FsClose { conn });
                        self.fs_closed(conn, now);
                        return;
                    }
                }
            }
        }
        let params = self.fs_params();
        self.session_seed = self.session_seed.wrapping_mul(0x9E37_79B9).wrapping_add(conn as u32) | 1;
        let session = self.session_seed;
        if let Phase::Pulling(p) = &mut self.phase {
            if p.conn == conn && p.client.is_none() {
                p.client = Some(FullSyncClient::new(params, session, now));
            }
        }
        if let Some(p) = &mut self.merge {
            if p.conn == conn && p.client.is_none() {
                p.client = Some(FullSyncClient::new(params, session, now));
            }
        }
        self.progress(now);
    }

    /// Bytes arrived on a Full Sync stream.
    pub fn fs_data(&mut self, conn: ConnId, bytes: &[u8], now: Nanos) {
        let Some(sec) = &mut self.security else {
            self.fs_plain(conn, bytes, now);
            return;
        };
        match sec.fs_receive(conn, bytes) {
            Ok((plain, wire)) => {
                if !wire.is_empty() {
                    self.raw_out.push_back(NodeOutput::FsSend { conn, bytes: wire });
                }
                if !plain.is_empty() {
                    self.fs_plain(conn, &plain, now);
                }
            }
            Err(e) => {
                tracing::warn!(member = self.cfg.member_id, "full sync stream refused: {e}");
                self.note_error(format!("full sync stream refused: {e}"));
                self.raw_out.push_back(NodeOutput::FsClose { conn });
                self.fs_closed(conn, now);
            }
        }
    }

    fn fs_plain(&mut self, conn: ConnId, bytes: &[u8], now: Nanos) {
        if let Phase::Pulling(p) = &mut self.phase {
            if p.conn == conn {
                if let Some(c) = &mut p.client {
                    c.handle_bytes(bytes, now);
                }
            }
        }
        if let Some(p) = &mut self.merge {
            if p.conn == conn {
                if let Some(c) = &mut p.client {
                    c.handle_bytes(bytes, now);
                }
            }
        }
        if let Some(s) = self.serving.iter_mut().find(|s| s.conn == conn) {
            s.server.handle_bytes(bytes, now);
        }
        self.progress(now);
    }

    /// A Full Sync stream closed, failed to connect, or broke.
    pub fn fs_closed(&mut self, conn: ConnId, now: Nanos) {
        if let Some(sec) = &mut self.security {
            sec.fs_drop(conn);
        }
        // A server closes its end after END: a pull that has it only has
        // chunks left to write (see `pump_pull`), and completes.
        if let Phase::Pulling(p) = &mut self.phase {
            if p.conn == conn && !p.finished && p.done.is_none() {
                let why = "full sync stream closed before the end".to_string();
                self.pull_failed(why, now);
            }
        }
        if self.merge.as_ref().is_some_and(|p| p.conn == conn && !p.finished && p.done.is_none()) {
            if let Some(p) = self.end_merge() {
                self.merge_failed(p.peer, "stream closed before the end".into(), now);
            }
        }
        if let Some(s) = self.serving.iter_mut().find(|s| s.conn == conn) {
            s.closed = true;
        }
        self.progress(now);
    }

    /// When the driver must call [`Node::handle_timeout`] at the latest.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        let mut t = self.ms.poll_timeout();
        let mut min = |x: Option<Nanos>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Nanos| t.min(x)));
            }
        };
        match &self.phase {
            Phase::Listening { until } | Phase::Backoff { until, .. } => min(self.stop.is_none().then_some(*until)),
            // A stopping member leaves its pull and merge as they are
            // (drive_pull, drive_merges): their work is not due.
            Phase::Pulling(p) => {
                min(p.client.as_ref().and_then(|c| c.poll_timeout()));
                min((p.has_work() && self.stop.is_none()).then_some(0));
            }
            Phase::Synced => {}
        }
        if let Some(p) = &self.merge {
            min(p.client.as_ref().and_then(|c| c.poll_timeout()));
            min((p.has_work() && self.stop.is_none()).then_some(0));
        } else if self.stop.is_none() {
            // The first retry due of a peer still queued (one with none is
            // started at once).
            min(self.merge_queue.iter().filter_map(|p| self.merge_retries.get(p).map(|(_, at)| *at)).min());
        }
        for s in &self.serving {
            min(s.server.poll_timeout());
        }
        // An audit's walk goes on a chunk per turn.
        min(self.table.audit_walking().then_some(0));
        t
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Nanos) {
        if self.ms.poll_timeout().is_some_and(|t| t <= now) {
            self.ms.handle_timeout(now);
        }
        if let Phase::Pulling(p) = &mut self.phase {
            if let Some(c) = &mut p.client {
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.handle_timeout(now);
                }
            }
        }
        if let Some(c) = self.merge.as_mut().and_then(|p| p.client.as_mut()) {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
        for s in &mut self.serving {
            if s.server.poll_timeout().is_some_and(|t| t <= now) {
                s.server.handle_timeout(now);
            }
        }
        self.progress(now);
    }

    /// The next thing the driver must do.
    pub fn poll_output(&mut self) -> Option<NodeOutput> {
        if let Some(o) = self.raw_out.pop_front() {
            return Some(o);
        }
        loop {
            let o = self.out.pop_front()?;
            let Some(sec) = &mut self.security else { return Some(o) };
            match o {
                NodeOutput::Ccp { dest, bytes } => {
                    if let Some(bytes) = sec.seal_ccp(&bytes) {
                        return Some(NodeOutput::Ccp { dest, bytes });
                    }
                }
                NodeOutput::FsSend { conn, bytes } => match sec.fs_send(conn, &bytes) {
                    Ok(w) if w.is_empty() => {}
                    Ok(w) => return Some(NodeOutput::FsSend { conn, bytes: w }),
                    // The stream is gone or failed; its close is on its way.
                    Err(_) => {}
                },
                NodeOutput::FsClose { conn } => {
                    sec.fs_drop(conn);
                    return Some(NodeOutput::FsClose { conn });
                }
                other => return Some(other),
            }
        }
    }

    /// Everything that can move without new input: device events, the
    /// join/resync logic, the Full Sync streams in both directions, and
    /// membership transmissions. Called after every input; a driver may
    /// call it more often.
    pub fn progress(&mut self, now: Nanos) {
        let t0 = std::time::Instant::now();
        if now.saturating_sub(self.floor_checked) >= FLOOR_CHECK_NS && self.cfg.generation_clock != GenerationClock::Off
        {
            self.floor_checked = now;
            let floor = self.cfg.generation_clock.floor(now);
            self.table.driver().raise_generation_floor(floor);
        }
        self.poll_device_events(now);
        let t_events = t0.elapsed();
        self.watch_device(now);
        let t_audit = t0.elapsed();
        self.drive_pull(now);
        let t_pull = t0.elapsed();
        self.drive_serving(now);
        let t_serve = t0.elapsed();
        let mut realign = false;
        while let Some(ev) = self.ms.poll_event() {
            // State changes, deaths and restarts are rare and what an
            // operator looks for first after a failover: logged where the
            // default filter shows them.
            let notable = matches!(
                ev,
                membership::MembershipEvent::LocalStateChanged { .. }
                    | membership::MembershipEvent::PeerStateChanged { .. }
                    | membership::MembershipEvent::PeerDied { .. }
                    | membership::MembershipEvent::PeerRestarted { .. }
            );
            if notable {
                tracing::info!(member = self.cfg.member_id, "membership: {ev}");
            } else {
                tracing::debug!(member = self.cfg.member_id, "membership: {ev}");
            }
            match ev {
                membership::MembershipEvent::ResyncRequested { by } => {
                    // In HA the Active's table is the cluster's: a request
                    // that reaches it (sent when the asker was Active) is
                    // stale.
                    if self.is_reference() {
                        tracing::info!(
                            member = self.cfg.member_id,
                            "ignoring a resync request of member {by}: this member is Active"
                        );
                        self.stats.resync_requests_ignored += 1;
                    } else {
                        self.stats.resyncs_requested += 1;
                        self.resync_wanted = true;
                    }
                }
                membership::MembershipEvent::MergeRequested { by }
                    if self.is_synced() && !self.merge_queue.contains(&by) =>
                {
                    self.merge_queue.push_back(by);
                }
                membership::MembershipEvent::PeerDied { member } => {
                    realign = true;
                    if !self.taken_for_dead.contains(&member) {
                        self.taken_for_dead.push(member);
                    }
                    self.source_died(member, now);
                }
                membership::MembershipEvent::PeerRestarted { member } => {
                    realign = true;
                    self.taken_for_dead.retain(|m| *m != member);
                }
                // A peer heard again after this member took it for dead (a
                // partition healed): on its side of the partition it may
                // have been Active and taken writes this side lacks. (Not
                // a peer first heard, or one whose READY was missed.)
                membership::MembershipEvent::PeerStateChanged { member, from: MemberState::Down, to }
                    if to != MemberState::Down && self.taken_for_dead.contains(&member) =>
                {
                    self.taken_for_dead.retain(|m| *m != member);
                    realign = true;
                }
                _ => {}
            }
        }
        // A member that is not the reference yet keeps the reason for when
        // it is, if that is within two dead windows (a takeover): it may
        // take over before the peers concerned are merged (seed 590 of
        // `sim --device-faults --attacks`: the member that took over after
        // a partition healed lacked the other side's writes, and an
        // operator's resync of that side then erased them).
        if realign {
            self.realign_due = Some(now);
        }
        let window = self.cfg.probe_interval_ns.saturating_mul(u64::from(self.cfg.dead_after)).saturating_mul(2);
        if self.realign_due.is_some_and(|t| now.saturating_sub(t) > window) {
            self.realign_due = None;
        }
        if self.realign_due.is_some() && self.is_reference() {
            self.realign_due = None;
            self.realign(now);
        }
        self.drive_merges(now);
        if self.resync_wanted {
            self.drive_pull(now);
        }
        self.check_divergence(now);
        self.drive_resync_asks(now);
        while let Some(t) = self.ms.poll_transmit() {
            self.out.push_back(NodeOutput::Ccp { dest: t.dest, bytes: t.bytes });
        }
        let total = t0.elapsed();
        if total > SLOW_PROGRESS {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            tracing::debug!(
                member = self.cfg.member_id,
                "progress took {:.1} ms: events {:.1}, audit {:.1}, pull {:.1}, serving {:.1}, the rest {:.1}",
                ms(total),
                ms(t_events),
                ms(t_audit - t_events),
                ms(t_pull - t_audit),
                ms(t_serve - t_pull),
                ms(total - t_serve)
            );
        }
    }

    fn fs_params(&self) -> FullSyncParams {
        FullSyncParams {
            cluster_id: self.cfg.cluster_id,
            member_id: self.cfg.member_id,
            chunk_records: self.cfg.chunk_records,
            timeout_ns: self.cfg.full_sync_timeout_ns,
            // A sealed member's streams pass through its secure channel
            // (fs_data), which authenticates every byte.
            authenticated: self.security.is_some(),
        }
    }

    fn note_error(&mut self, why: String) {
        tracing::warn!(member = self.cfg.member_id, "{why}");
        self.stats.last_error = Some(why);
    }

    fn poll_device_events(&mut self, now: Nanos) {
        let mut resync = 0u64;
        let mut synced = 0u64;
        // Through the table, so that a host copy kept for fault recovery
        // follows what the device did on its own (aging, peer updates).
        let changes = &mut self.peer_changes;
        self.table.poll_events(|e| match e.kind {
            EventKind::ResyncNeeded => resync += 1,
            EventKind::SyncUpdated | EventKind::SyncRemoved => {
                synced += 1;
                if let Some(c) = changes.as_mut() {
                    c.push((e.key, e.kind == EventKind::SyncRemoved));
                }
            }
            _ => {}
        });
        self.stats.sync_events += synced;
        // An event the device wrote and this host never read may have been
        // a RESYNC_NEEDED (or a peer's change the host must follow): a
        // loss is acted upon as one, the table checked against the peers'.
        let lost = self.table.driver_ref().events_lost();
        if lost > self.events_lost_seen {
            self.note_error(format!(
                "{} device events lost (overflowed or garbled): taking it for lost sync updates",
                lost - self.events_lost_seen
            ));
            self.events_lost_seen = lost;
            resync += 1;
        }
        if resync > 0 {
            self.stats.device_resync_events += resync;
            if let Phase::Pulling(p) = &mut self.phase {
                // The snapshot replaces the table only up to its cut: what
                // was lost after it is repaired by merging the peers'
                // tables once the pull is done (pull_done).
                p.lost_events += resync;
                self.note_error(format!(
                    "device reported {resync} lost or unapplied sync updates during a full sync: merging the peers' tables after it"
                ));
            } else if matches!(self.phase, Phase::Synced) {
                if self.is_reference() {
                    // The Active's table is the cluster's: it missed a
                    // peer's updates (a dead Active's last ones, or a
                    // Standby's), so the peers may hold what it lacks.
                    // They pull from it; it never empties itself.
                    self.note_error(format!(
                        "device reported {resync} lost or unapplied sync updates: realigning with the peers"
                    ));
                    self.realign(now);
                } else {
                    self.note_error(format!("device reported {resync} lost or unapplied sync updates: resync"));
                    self.resync_wanted = true;
                    self.resync_by_merge = true;
                }
            }
        }
    }

    /// Whether a SNAPSHOT walk of this member's device is being served.
    fn walking(&self) -> bool {
        self.serving.iter().any(|s| s.walking)
    }

    /// With fault recovery on (see `ConnTable::enable_recovery`): starts
    /// an audit of the table once per probe interval (after one that
    /// walked, 10 µs per entry later), takes an audit's walk on a chunk per
    /// turn, and acts on a device reset the table made to recover.
    fn watch_device(&mut self, now: Nanos) {
        if self.table.recovery_config().is_none() {
            return;
        }
        if now >= self.next_audit || self.table.audit_walking() {
            // A walk of a large table is not repeated at every probe (a
            // flood of peer updates that overflows the event ring would
            // otherwise keep the loop walking a chunk a turn): the next
            // audit waits in proportion to the table, in this node's time,
            // so that a simulation replays exactly.
            let every = match self.audit_table(now) {
                AuditState::Walking => {
                    self.after_device_reset(now);
                    return;
                }
                AuditState::Done { walked: true, .. } => {
                    (self.table.len() as u64).saturating_mul(AUDIT_WAIT_PER_ENTRY_NS)
                }
                AuditState::Done { walked: false, .. } | AuditState::Refused => 0,
            };
            self.next_audit = now.saturating_add(self.cfg.probe_interval_ns.max(every).max(1));
        }
        self.after_device_reset(now);
    }

    /// Compares the card with the host's copy and restores what the card
    /// lost (`ConnTable::audit_step`): `Done(whether it found anything)`,
    /// or `Walking` while it walks the card, a chunk per call (the loop's
    /// next turns take it on). `Refused` (an audit under way abandoned)
    /// while a walk of the device is served (an audit that walks would
    /// tear it) or a Full Sync is pulled (the table is being replaced).
    fn audit_table(&mut self, now: Nanos) -> AuditState {
        if self.table.recovery_config().is_none() || self.walking() || self.is_pulling() {
            self.table.audit_cancel();
            return AuditState::Refused;
        }
        if self.audit_stepped_at == Some(now) {
            // One step a moment: a walk's next chunk, or a new audit after
            // one that just ended, waits for the loop's next turn.
            if self.table.audit_walking() {
                return AuditState::Walking;
            }
            if let Some((t, state)) = self.last_audit {
                if t == now {
                    return state;
                }
            }
        }
        self.audit_stepped_at = Some(now);
        let report = match self.table.audit_step() {
            Ok(Some(r)) => r,
            Ok(None) => return AuditState::Walking,
            Err(e) => {
                self.note_error(format!("audit: {e}"));
                let state = AuditState::Done { walked: false, found: false };
                self.last_audit = Some((now, state));
                return state;
            }
        };
        let restored = report.missing + report.different;
        if restored > 0 {
            tracing::warn!(
                member = self.cfg.member_id,
                missing = report.missing,
                different = report.different,
                "audit: the card lost entries; restored from the host's copy"
            );
        }
        self.after_device_reset(now);
        let state = AuditState::Done { walked: report.walked, found: restored > 0 || report.recovered };
        self.last_audit = Some((now, state));
        state
    }

    /// After the table reset the device to recover from a fault and rebuilt
    /// its table from the host's copy: a Full Sync pull in progress starts
    /// again (the updates the card held for it are gone), and the cluster's
    /// reference realigns with the peers (its table is the cluster's; they
    /// may hold changes it lost). Another member keeps its rebuilt table:
    /// emptying it for a pull would risk the only copy of some changes if
    /// the source died meanwhile. The copy knows no owner for the peers'
    /// changes it learnt from events (a rebuilt entry is this member's), so
    /// the table may differ from the reference's in owners; the
    /// reference's anti-entropy check then has it resync.
    fn after_device_reset(&mut self, now: Nanos) {
        let resets = self.table.recovery_stats().resets;
        if resets == self.resets_seen {
            return;
        }
        self.resets_seen = resets;
        match self.phase {
            Phase::Pulling(_) => {
                self.pull_failed("full sync: the device was reset during the pull; again".into(), now);
            }
            Phase::Synced if self.is_reference() => {
                self.note_error("device reset and rebuilt from the host's copy: realigning with the peers".into());
                self.realign(now);
            }
            // The card may have applied peer updates whose events its host
            // never read before the reset (their sequence numbers taken,
            // so no peer sends them again): the copy, and the card rebuilt
            // from it, lack them. The member merges its peers' tables, as
            // after lost events (sim seed 4500 with device faults and
            // attacks: a Standby's rebuilt card lacked the last write of an
            // Active that stopped, and the one member left holding it
            // crashed).
            Phase::Synced => {
                self.note_error("device reset and rebuilt from the host's copy: merging the peers' tables".into());
                self.resync_wanted = true;
                self.resync_by_merge = true;
            }
            Phase::Listening { .. } | Phase::Backoff { .. } => {}
        }
    }

    /// Join, resync and the pulling side of Full Sync.
    fn drive_pull(&mut self, now: Nanos) {
        // A member that is stopping pulls nothing: a pull or resync would
        // take it out of Down, which it announced, or keep it Down.
        if self.stop.is_some() {
            return;
        }
        match &self.phase {
            Phase::Listening { until } if *until <= now => self.start_pull(0, now),
            Phase::Backoff { until, attempt } if *until <= now => {
                let attempt = *attempt;
                self.start_pull(attempt, now)
            }
            Phase::Synced if self.resync_wanted => {
                self.ms.set_down(now);
                // In load sharing no member's table is the cluster's: each
                // holds its own writes, and a resync that emptied this
                // table would lose those that reached no other member, or
                // reached only members that emptied theirs too. It merges
                // every peer's table into its own instead (the union, under
                // the conflict rule), Down until done. So does an HA
                // member that lost updates: it may hold the newest writes
                // of an Active that died or was cut off, which the member
                // it would copy lacks (deletes it missed come with the
                // peers' tombstones). An operator's resync still replaces
                // the table with the Active's (a Full Sync).
                if self.cfg.mode == Mode::LoadSharing || self.resync_by_merge {
                    tracing::info!(member = self.cfg.member_id, "resync: merging the peers' tables");
                    if !self.merge_from_peers(None) {
                        self.ms.set_synced(now);
                    }
                } else {
                    self.start_pull(0, now)
                }
            }
            _ => {}
        }
        self.resync_wanted = false;
        self.resync_by_merge = false;
        let Phase::Pulling(p) = &mut self.phase else { return };
        match pump_pull(&mut self.table, &mut self.out, p, now) {
            Some(Err(why)) => self.pull_failed(why, now),
            Some(Ok(records)) => self.pull_done(records, now),
            None => {}
        }
    }

    /// The merge pulls of a realignment (see [`Node::realign`]).
    fn drive_merges(&mut self, now: Nanos) {
        // (Nor merges: one that ends reports the member synced again.)
        if self.stop.is_some() {
            return;
        }
        if let Some(p) = &mut self.merge {
            match pump_pull(&mut self.table, &mut self.out, p, now) {
                Some(Err(why)) => {
                    if let Some(p) = self.end_merge() {
                        self.merge_failed(p.peer, why, now);
                    }
                }
                Some(Ok(records)) => {
                    if let Some(p) = self.end_merge() {
                        tracing::info!(
                            member = self.cfg.member_id,
                            "merge: done, {records} records from member {}",
                            p.peer
                        );
                        self.stats.merges_completed += 1;
                        self.merge_retries.remove(&p.peer);
                    }
                }
                None => return,
            }
        }
        if !self.is_synced() {
            self.merge_queue.clear();
            self.rejoin_after_merges = false;
            self.merge_retries.clear();
            return;
        }
        // The first peer in the queue whose retry (if it failed) is due;
        // dead peers leave the queue.
        self.merge_queue.retain(|peer| self.ms.members().iter().any(|v| v.id == *peer && v.alive));
        let due = |peer: &u16| self.merge_retries.get(peer).is_none_or(|(_, at)| *at <= now);
        if let Some(i) = self.merge_queue.iter().position(due) {
            if let Some(peer) = self.merge_queue.remove(i) {
                let attempt = self.merge_retries.get(&peer).map_or(0, |(n, _)| *n);
                let conn = self.next_conn;
                self.next_conn += 1;
                tracing::info!(member = self.cfg.member_id, "merge: pulling from member {peer}");
                self.out.push_back(NodeOutput::FsConnect { conn, peer, attempt });
                self.merge = Some(Box::new(Pull::new(conn, peer, attempt, now)));
            }
            return;
        }
        if !self.merge_queue.is_empty() {
            // Every peer left failed last time: wait for the first retry.
            return;
        }
        self.merge_retries.clear();
        if self.rejoin_after_merges {
            self.rejoin_after_merges = false;
            tracing::info!(member = self.cfg.member_id, "merges done: synced");
            self.ms.set_synced(now);
            self.ms.set_attention(false, now);
        }
        // Every merge done: the peers now merge this member's table, which
        // holds the union.
        if self.ask_merge_after {
            self.ask_merge_after = false;
            self.ms.set_attention(false, now);
            let peers: Vec<u16> = self.ms.members().iter().filter(|m| !m.is_local && m.alive).map(|m| m.id).collect();
            for p in peers {
                self.ms.request_merge(p, now);
            }
        }
    }

    /// After a member died or restarted, or this Active found updates
    /// missing, its last updates may have reached some members and not
    /// others, and no retransmission will settle it (its queue died with
    /// it). The Active merges every peer's table into its own under the
    /// conflict rule, one after another, then asks them to merge its table,
    /// which then holds the union: every member ends with the same table,
    /// and no change any member holds is lost.
    ///
    /// Until the realignment is done the Active is ACTIVE ATTENTION: it
    /// lacked updates, and its peers may still hold what it lacks.
    fn realign(&mut self, now: Nanos) {
        // A stopping member asks no peer to merge from it: the streams
        // would outlast it.
        if self.stop.is_some() {
            return;
        }
        for p in self.synced_peers(None) {
            if !self.merge_queue.contains(&p) {
                self.merge_queue.push_back(p);
            }
        }
        self.ask_merge_after = true;
        // (With no peer to merge from, there is nothing to wait for: no
        // attention, and no announcement of it and of its end.)
        if !self.merge_queue.is_empty() {
            self.ms.set_attention(true, now);
        }
    }

    /// A merge pull from `peer` failed: it is tried again after the Full
    /// Sync backoff, while the peer lives (its table may hold what this
    /// member lacks, and nothing else brings it: a member that went Down
    /// to merge stays Down until then, an Active stays in ACTIVE
    /// ATTENTION).
    ///
    /// The retry tries the peer's next Full Sync address, after a backoff
    /// that doubles with each failure (`retry_backoff`, up to 64 times
    /// that); the peer goes to the back of the queue, so that the others'
    /// merges go on meanwhile. Warned of at the 1st, 2nd, 4th, 8th, …
    /// failure of a peer (every failure is counted, and is `last_error`).
    fn merge_failed(&mut self, peer: u16, why: String, now: Nanos) {
        self.stats.merges_failed += 1;
        let failures = self.merge_retries.get(&peer).map_or(0, |(n, _)| *n) + 1;
        let backoff = self.cfg.retry_backoff_ns.saturating_mul(1 << (failures - 1).min(6));
        self.merge_retries.insert(peer, (failures, now.saturating_add(backoff)));
        let what = format!("merge from member {peer}: {why}; trying again ({failures} failures)");
        if failures.is_power_of_two() {
            self.note_error(what);
        } else {
            self.stats.last_error = Some(what);
        }
        if !self.merge_queue.contains(&peer) {
            self.merge_queue.push_back(peer);
        }
    }

    /// Membership took `peer` for dead: a pull or merge from it is given
    /// up now (its stream may stay open, a source hung, for the whole wait
    /// for BEGIN), and the member looks for another source.
    fn source_died(&mut self, peer: u16, now: Nanos) {
        if let Phase::Pulling(p) = &self.phase {
            if p.peer == peer && !p.finished && p.done.is_none() {
                self.pull_failed(format!("full sync: member {peer}, the source, was taken for dead"), now);
            }
        }
        if self.merge.as_ref().is_some_and(|p| p.peer == peer && !p.finished && p.done.is_none())
            && self.end_merge().is_some()
        {
            self.stats.merges_failed += 1;
            self.note_error(format!("merge from member {peer}: it was taken for dead"));
        }
    }

    /// Ends the merge pull under way, however it ended: the slice still
    /// posted to the card is given up and the stream closed (each way out
    /// of a merge did a part of this before, and a failed pump left the
    /// slice posted). Returns the pull, for its peer.
    fn end_merge(&mut self) -> Option<Box<Pull>> {
        let mut p = self.merge.take()?;
        p.drop_write(&mut self.table);
        self.out.push_back(NodeOutput::FsClose { conn: p.conn });
        Some(p)
    }

    /// The member to pull from: an Active; a Standby only when no Active
    /// has been heard for a dead window since this member began to look
    /// (so that a member that hears a Standby first does not pull a copy
    /// that lags the Active's).
    fn pull_source(&mut self, now: Nanos) -> Option<u16> {
        let src = self.ms.sync_source()?;
        let active = self.ms.members().iter().any(|v| v.id == src && v.alive && v.state.is_active());
        if active {
            self.looking_since = None;
            return Some(src);
        }
        let since = *self.looking_since.get_or_insert(now);
        let window = self.cfg.probe_interval_ns.saturating_mul(self.cfg.dead_after as u64 + 1);
        (now.saturating_sub(since) >= window).then_some(src)
    }

    fn start_pull(&mut self, attempt: u32, now: Nanos) {
        if self.ms.sync_source().is_some() && self.pull_source(now).is_none() {
            let wait = self.cfg.probe_interval_ns.max(1);
            self.phase = Phase::Backoff { until: now.saturating_add(wait), attempt };
            return;
        }
        let Some(peer) = self.ms.sync_source() else {
            if self.may_seed(now) {
                // Nobody synced is alive: this member's table is the cluster's.
                tracing::info!(member = self.cfg.member_id, "no synced peer: this member's table is the cluster's");
                if let Err(e) = self.table.driver().set_sync_hold(false) {
                    self.note_error(format!("releasing sync hold: {e}"));
                }
                self.phase = Phase::Synced;
                self.ms.set_synced(now);
                self.ms.set_attention(false, now);
            } else {
                // Wait for a synced member to pull from. What a pull that
                // did not finish left in the table (its source died, or
                // the table was rebuilt from the host's copy mid-pull) is
                // no member's table, and this one never seeds from it:
                // emptied, it does not keep a restarted member from
                // seeding as if this one held the cluster's table.
                if !self.table_own && self.table.driver_ref().device_counter(Counter::SyncDigest) != 0 {
                    if let Err(e) = self.table.flush() {
                        self.note_error(format!("emptying what an unfinished pull left: {e}"));
                    }
                }
                let wait = self.cfg.probe_interval_ns.max(1);
                self.phase = Phase::Backoff { until: now.saturating_add(wait), attempt };
            }
            return;
        };
        // This member's own last changes must reach the source first, or
        // the snapshot would lack them and emptying the table lose them
        // (bounded: a dead peer never acknowledges).
        let unacked = self.table.driver_ref().device_counter(Counter::SyncUnacked);
        let since = *self.drain_since.get_or_insert(now);
        if unacked > 0 && now.saturating_sub(since) < self.cfg.full_sync_timeout_ns / 2 {
            self.phase = Phase::Backoff { until: now.saturating_add(self.cfg.probe_interval_ns.max(1)), attempt };
            return;
        }
        self.drain_since = None;
        // Hold the peers' deltas on the card from now on (a new member
        // holds from its start); they are applied after the snapshot, in
        // arrival order. The table is emptied, tombstones too, once the
        // source's BEGIN arrives (pump_pull): it becomes the source's
        // (entries and recent deletes), then what happened since. Held,
        // the table takes no peer update meanwhile and the card does not
        // age it (a held refresh would lose to the aged entry's delete),
        // so that it does not change, and a source that never
        // answers (dead, unreachable) leaves it as it was: a resync asked
        // of the last member holding the table just as the Active died
        // used to empty it for nothing. In HA the source is the Active,
        // which has every update it made itself, so nothing this member
        // applied before the hold can be missing from the snapshot unless
        // its sender is dead (and then the Active's word is the cluster's).
        if let Err(e) = self.table.driver().set_sync_hold(true) {
            self.note_error(format!("full sync: setting sync hold: {e}"));
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        tracing::info!(member = self.cfg.member_id, "full sync: pulling from member {peer} (try {attempt})");
        self.out.push_back(NodeOutput::FsConnect { conn, peer, attempt });
        let mut pull = Pull::new(conn, peer, attempt, now);
        pull.emptying = Emptying::AtBegin;
        self.phase = Phase::Pulling(Box::new(pull));
    }

    /// Whether this member may declare its own table the cluster's, when
    /// no synced member is alive:
    ///
    /// * never after its table was emptied for a pull that has not
    ///   finished;
    /// * every member is heard and none is synced (a cold start): the
    ///   lowest id among those holding entries seeds the cluster (the
    ///   lowest id of all if none does);
    /// * no peer is heard: after [`NodeConfig::alone_after_ns`] from start,
    ///   so that a member restarted into a short partition waits for the
    ///   cluster instead of becoming a rival Active with an empty table;
    /// * some peers are heard, none synced, others missing: the missing
    ///   may hold the table, so only after ten times that.
    fn may_seed(&self, now: Nanos) -> bool {
        if !self.table_own {
            // Emptied for a pull: it holds nothing to offer; it waits for a
            // member that does.
            return false;
        }
        let views = self.ms.members();
        let alive: Vec<u16> = views.iter().filter(|v| !v.is_local && v.alive).map(|v| v.id).collect();
        let waited = now.saturating_sub(self.started);
        if alive.is_empty() {
            return waited >= self.cfg.alone_after_ns;
        }
        // Among those here, members holding entries (a non-zero digest in
        // their probes) come first: a member restarted with an empty table
        // must not seed over one that kept the cluster's.
        let mine = self.table.driver_ref().device_counter(Counter::SyncDigest) != 0;
        let with_data: Vec<u16> =
            alive.iter().copied().filter(|p| self.ms.peer_digest(*p).is_some_and(|(d, _)| d != 0)).collect();
        let lowest_of_my_kind = if mine {
            with_data.iter().all(|p| *p > self.cfg.member_id)
        } else {
            with_data.is_empty() && alive.iter().all(|p| *p > self.cfg.member_id)
        };
        if alive.len() == self.cfg.peers.len() {
            // A cold start: everybody is here and nobody is synced.
            return lowest_of_my_kind;
        }
        // Some members are missing and those here hold nothing synced: the
        // missing ones may hold the cluster's table (cut off, not dead).
        // Only after a long wait does one here seed.
        waited >= self.cfg.alone_after_ns.saturating_mul(10) && lowest_of_my_kind
    }

    fn pull_failed(&mut self, why: String, now: Nanos) {
        let Phase::Pulling(p) = &mut self.phase else { return };
        p.finished = true;
        p.drop_write(&mut self.table);
        if p.emptying == Emptying::Done {
            self.table_own = false;
        }
        let (conn, attempt) = (p.conn, p.attempt);
        self.stats.full_syncs_failed += 1;
        self.note_error(why);
        self.out.push_back(NodeOutput::FsClose { conn });
        // The next address of the same peer at once, then wait.
        let wait = if attempt % 2 == 0 { 0 } else { self.cfg.retry_backoff_ns };
        self.phase = Phase::Backoff { until: now.saturating_add(wait), attempt: attempt + 1 };
    }

    fn pull_done(&mut self, records: u64, now: Nanos) {
        let Phase::Pulling(p) = &mut self.phase else { return };
        p.finished = true;
        let (conn, started, source, lost) = (p.conn, p.started, p.peer, p.lost_events);
        let cut = std::mem::take(&mut p.cut);
        self.out.push_back(NodeOutput::FsClose { conn });
        // The card learns which history the snapshot held before the hold
        // clears: it asks its peers only for the rest (none, unless the
        // source lagged a peer), not for every update of their epochs.
        if let Err(e) = self.table.sync_align(&cut) {
            self.note_error(format!("full sync: telling the card the snapshot's cut: {e}"));
        }
        if let Err(e) = self.table.driver().set_sync_hold(false) {
            self.note_error(format!("full sync: releasing sync hold: {e}"));
        }
        self.stats.full_syncs_completed += 1;
        self.table_own = true;
        self.looking_since = None;
        tracing::info!(member = self.cfg.member_id, "full sync: done, {records} records");
        self.stats.last_full_sync_records = records;
        self.stats.last_full_sync_ms = Some(now.saturating_sub(started) as f64 / 1e6);
        self.phase = Phase::Synced;
        // In load sharing the source is one writer among several: another
        // writer's update it had not yet received when its walk began, and
        // that reached this member before its hold (or before it started),
        // is in neither the snapshot nor the held updates. Every other
        // writer holds its own updates: merging their tables closes that
        // gap before this member reports itself synced.
        //
        // Updates lost during the pull (RESYNC_NEEDED: a peer's retransmit
        // queue no longer held them, or the hold buffer overflowed) may be
        // newer than the snapshot, in either mode: then every synced peer's
        // table, the source's too (the lost ones may be its own), is merged
        // in before this member reports itself synced.
        let merge_except = match (lost > 0, self.cfg.mode) {
            (true, _) => Some(None),
            (false, Mode::LoadSharing) => Some(Some(source)),
            (false, Mode::HighAvailability) => None,
        };
        if merge_except.is_some_and(|except| self.merge_from_peers(except)) {
            return;
        }
        self.ms.set_synced(now);
        self.ms.set_attention(false, now);
    }

    /// The live peers holding a synced table (Standby or Active), but
    /// `except`.
    fn synced_peers(&self, except: Option<u16>) -> Vec<u16> {
        self.ms
            .members()
            .iter()
            .filter(|m| {
                !m.is_local
                    && m.alive
                    && Some(m.id) != except
                    && (m.state == MemberState::Standby || m.state.is_active())
            })
            .map(|m| m.id)
            .collect()
    }

    /// Queues a merge pull from every live peer holding a synced table
    /// (Standby or Active), but `except`, and has this member report itself
    /// synced once they are done; returns whether any was queued.
    fn merge_from_peers(&mut self, except: Option<u16>) -> bool {
        let peers = self.synced_peers(except);
        for p in &peers {
            if !self.merge_queue.contains(p) {
                self.merge_queue.push_back(*p);
            }
        }
        self.rejoin_after_merges = !peers.is_empty();
        self.rejoin_after_merges
    }

    /// The serving side: one device walk at a time, chunk by chunk.
    fn drive_serving(&mut self, now: Nanos) {
        // What the card lost must not go out as the cluster's table: a
        // walk waits for an audit that ended since the stream came (a
        // turn's chunk of it at most here; one ended since is enough, or a
        // card that keeps disagreeing would hold the walk for ever).
        let walk_free = !self.serving.iter().any(|s| s.walking);
        let since = self.serving.iter().filter(|s| s.server.wants_begin() && !s.closed).map(|s| s.accepted).min();
        let audited = match since {
            Some(t) if walk_free => {
                self.last_audit.is_some_and(|(done, _)| done >= t)
                    || !matches!(self.audit_table(now), AuditState::Walking)
            }
            _ => true,
        };
        let mut i = 0;
        while i < self.serving.len() {
            let walk_free = !self.serving.iter().any(|s| s.walking);
            let s = &mut self.serving[i];
            if s.server.wants_begin() && walk_free && !s.closed && audited {
                let seq = self.table.driver_ref().device_counter(Counter::SyncNextSeq);
                let estimate = self.table.len() as u64;
                // The walk's cut, just before its first chunk: the client's
                // card then asks its peers for none of the history the
                // snapshot holds. Without it the client asks for all of it.
                let cut = match self.table.sync_positions() {
                    Ok(cut) => cut.unwrap_or_default(),
                    Err(e) => {
                        let why = format!("serving full sync: reading the sync positions: {e}");
                        tracing::warn!(member = self.cfg.member_id, "{why}");
                        self.stats.last_error = Some(why);
                        Vec::new()
                    }
                };
                s.server.begin_at(seq, self.cfg.incarnation, estimate, cut, now);
                s.walking = true;
            }
            while s.server.wants_chunk() && !s.closed {
                // The size agreed with the client (at most this member's
                // own): a joiner configured for smaller chunks gets them.
                let want = s.server.chunk_records().max(1) as usize;
                while s.buf.len() - s.pos < want && !s.walk_done {
                    if s.pos > 0 {
                        s.buf.drain(..s.pos);
                        s.pos = 0;
                    }
                    match self.table.sync_snapshot_records(s.cursor, &mut s.buf) {
                        Ok(next) if next == SNAPSHOT_DONE => s.walk_done = true,
                        Ok(next) => s.cursor = next,
                        Err(e) => {
                            if matches!(e, TableError::Refused(nicsync_fwif::cpl::CplStatus::SnapshotTorn)) {
                                self.stats.snapshot_walks_torn += 1;
                            }
                            s.server.abort(crate::fullsync::error_code::ABORTED, &format!("snapshot walk failed: {e}"));
                            s.walk_done = true;
                            s.buf.clear();
                            s.pos = 0;
                            break;
                        }
                    }
                }
                let end = (s.pos + want).min(s.buf.len());
                s.server.push_chunk(&s.buf[s.pos..end], now);
                s.pos = end;
                if s.server.outcome().is_some() {
                    break;
                }
            }
            self.scratch.clear();
            while s.server.poll_transmit(&mut self.scratch) {}
            if !self.scratch.is_empty() {
                self.out.push_back(NodeOutput::FsSend { conn: s.conn, bytes: std::mem::take(&mut self.scratch) });
            }
            let finished = match s.server.outcome() {
                Some(Ok(_)) => {
                    self.stats.full_syncs_served += 1;
                    true
                }
                Some(Err(e)) => {
                    self.stats.full_syncs_serve_failed += 1;
                    let why = format!("serving full sync: {e}");
                    tracing::warn!(member = self.cfg.member_id, "{why}");
                    self.stats.last_error = Some(why);
                    true
                }
                None if s.closed => {
                    self.stats.full_syncs_serve_failed += 1;
                    tracing::warn!(member = self.cfg.member_id, "serving full sync: the stream closed before the end");
                    true
                }
                None => false,
            };
            if finished {
                let conn = self.serving[i].conn;
                if !self.serving[i].closed {
                    self.out.push_back(NodeOutput::FsClose { conn });
                }
                self.serving.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Every entry marked for sync, once each (a walk may return an entry
    /// that moved during it twice), in key order.
    pub fn synced_entries(&mut self) -> Result<Vec<DeltaUpdate>, TableError> {
        if self.serving.iter().any(|s| s.walking) {
            return Err(TableError::Busy("a full sync is being served; try again".into()));
        }
        let mut all = Vec::new();
        let mut cursor = 0;
        loop {
            cursor = self.table.sync_snapshot_chunk(cursor, &mut all)?;
            if cursor == SNAPSHOT_DONE {
                break;
            }
        }
        // Sorted in place, not through a map: a million entries in a
        // BTreeMap held the member's loop for a second.
        all.retain(|u| u.op == nicsync_fwif::sync::DeltaOp::Upsert);
        // Stable, so that of an entry returned twice the later copy stays.
        all.sort_by(|a, b| zerocopy::IntoBytes::as_bytes(&a.key).cmp(zerocopy::IntoBytes::as_bytes(&b.key)));
        let mut out: Vec<DeltaUpdate> = Vec::with_capacity(all.len());
        for u in all {
            match out.last_mut() {
                Some(last) if last.key == u.key => *last = u,
                _ => out.push(u),
            }
        }
        Ok(out)
    }

    /// One chunk of a walk over the entries marked for sync, from `cursor`
    /// (0 to start); returns the next cursor, `SNAPSHOT_DONE` at the end.
    /// A walk may return an entry that moved during it twice. Refused
    /// (`Busy`) while a Full Sync is being served from the card's walker or
    /// an audit walks it, so that neither walk tears the other; the caller
    /// tries again later.
    pub fn synced_chunk(&mut self, cursor: u32, out: &mut Vec<DeltaUpdate>) -> Result<u32, TableError> {
        if self.walking() {
            return Err(TableError::Busy("a full sync is being served; try again".into()));
        }
        if self.table.audit_walking() {
            return Err(TableError::Busy("an audit is walking the card; try again".into()));
        }
        // Short chunks: a walk for an operator takes a slice of the loop.
        self.table.sync_snapshot_chunk_max(cursor, out, crate::table::SHORT_CHUNK_BYTES)
    }

    /// Count and order-independent digest of the entries marked for sync
    /// (equal on converged members; see [`fullsync::digest_updates`]).
    pub fn digest(&mut self) -> Result<(u64, u64), TableError> {
        // A walk being served owns the device's walker; do not tear it.
        if self.serving.iter().any(|s| s.walking) {
            return Err(TableError::Busy("a full sync is being served; try again".into()));
        }
        let all = self.synced_entries()?;
        Ok(fullsync::digest_updates(all.iter()))
    }
}

impl<D: NicDevice> Node<D> {
    /// Up to `limit` entries marked for sync, as JSON objects.
    pub fn list(&mut self, limit: usize) -> Result<Vec<serde_json::Value>, TableError> {
        let all = self.synced_entries()?;
        Ok(all.iter().take(limit).map(update_json).collect())
    }
}

/// Runs one pull's client: takes in the chunks that arrived, acknowledges
/// them, writes them to the card (REPLICA writes under the conflict rule)
/// and queues what to send. `Some` when the transfer is over.
///
/// A chunk is acknowledged when it arrives whole and checked, before it is
/// written, if no earlier chunk still waits to be written: the server then
/// reads and sends the next chunk while this member writes this one, rather
/// than both sides taking turns. A chunk that arrives while one waits is
/// acknowledged once that one is written, so at most two are held. A
/// write that fails still fails the transfer (the member stays Down and
/// pulls again); END completes it only once every chunk is written.
///
/// A slice is posted to the card (`ConnTable::load_post`) and taken in at
/// the next call: the card writes it while the loop decodes what arrived
/// (and, on a member that also serves, walks its own table), instead of
/// the loop waiting for the card.
fn pump_pull<D: NicDevice>(
    table: &mut ConnTable<D>,
    out: &mut VecDeque<NodeOutput>,
    p: &mut Pull,
    now: Nanos,
) -> Option<Result<u64, String>> {
    let client = p.client.as_mut()?;
    let mut fail = None;
    if let Some((ticket, from, to, last)) = p.posted.take() {
        // None: another writer's post settled this one, outcome unseen.
        let lost = || Err(crate::driver::DriverError::Config("the slice's LOAD was settled by another write".into()));
        let written = table.load_take(ticket).unwrap_or_else(lost);
        let index = p.pending.front().map_or(0, |c| c.0);
        let bad = match written {
            Ok(results) => results.into_iter().find_map(|r| match r {
                Ok(_) | Err(TableError::Stale { .. }) => None,
                Err(e) => Some(e.to_string()),
            }),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = bad {
            fail = Some(format!("full sync: writing chunk {index}: {e}"));
        } else {
            p.records += (to - from) as u64;
            p.written = to;
            if last {
                p.pending.pop_front();
                p.written = 0;
                if let Some(next) = p.unacked.take() {
                    client.chunk_applied(next, now);
                }
            }
        }
    }
    while let Some(ev) = client.poll_event() {
        match ev {
            ClientEvent::Begin { estimated_records, cut, .. } => {
                // The source answered: the table becomes its snapshot, then
                // what the card held since the pull began (start_pull).
                // Emptied before the first write (below), after the first
                // chunk's ACK has left.
                if p.emptying == Emptying::AtBegin {
                    p.emptying = Emptying::Due;
                }
                table.reserve_copy(usize::try_from(estimated_records).unwrap_or(usize::MAX));
                p.cut = cut;
            }
            ClientEvent::Chunk { index, records } => {
                if p.pending.is_empty() {
                    client.chunk_applied(index, now);
                } else {
                    p.unacked = Some(index);
                }
                p.pending.push_back((index, records));
            }
            ClientEvent::Done { records, .. } => p.done = Some(records),
            ClientEvent::Failed(e) => {
                fail = Some(format!("full sync from member {}: {e}", p.peer));
                break;
            }
        }
    }
    // An acknowledgement queued now leaves before this call writes to the
    // card (the loop sends it, then comes back at once for the slice): the
    // server walks and sends its next chunk while this member writes the
    // ones it holds. Writing a slice first held the ACK back by that slice
    // (2,048 records into the card and the host's copy), and the server,
    // idle meanwhile, then took about as long to produce the next chunk:
    // the two members took turns. With one slice per chunk (chunk_records
    // 2,048) a 1,000,000-entry pull took 949 ms that way and takes 794.
    let acked = transmit(client, p.conn, out);
    let writes = !acked && (!p.pending.is_empty() || p.done.is_some());
    if p.emptying == Emptying::Due && fail.is_none() && writes {
        p.emptying = Emptying::Done;
        if let Err(e) = table.flush() {
            fail = Some(format!("full sync: emptying the table: {e}"));
        }
    }
    // One slice of a chunk per call: the loop's turn stays short (the first
    // chunks of a large pull take a page fault per record in the freshly
    // reserved copy, 10 us each here: 80-90 ms for a chunk of 8,192), and
    // the loop comes back at once for the rest (`has_work`).
    if let (None, false, Some((_, records))) = (&fail, acked, p.pending.front()) {
        let from = p.written.min(records.len());
        let to = (from + PULL_SLICE_RECORDS).min(records.len());
        match table.load_post(&records[from..to]) {
            Ok(ticket) => p.posted = Some((ticket, from, to, to == records.len())),
            Err(e) => fail = Some(format!("full sync: writing chunk {}: {e}", p.pending.front().map_or(0, |c| c.0))),
        }
    }
    if let Some(why) = fail {
        p.finished = true;
        return Some(Err(why));
    }
    match p.done {
        Some(r) if p.pending.is_empty() && p.emptying != Emptying::Due => {
            p.finished = true;
            Some(Ok(r))
        }
        _ => None,
    }
}

/// Records of a Full Sync chunk a pull writes to the card per call.
const PULL_SLICE_RECORDS: usize = 2048;

/// Queues what the client has to send; whether there was anything.
fn transmit(client: &mut FullSyncClient, conn: ConnId, out: &mut VecDeque<NodeOutput>) -> bool {
    let mut bytes = Vec::new();
    while client.poll_transmit(&mut bytes) {}
    if bytes.is_empty() {
        return false;
    }
    out.push_back(NodeOutput::FsSend { conn, bytes });
    true
}

/// An entry of `conn list`: its record and the member that owns it.
pub fn update_json(u: &DeltaUpdate) -> serde_json::Value {
    let mut v = record_json(&nicsync_fwif::conn::ConnRecord { key: u.key, state: u.state, nat: u.nat });
    if let Some(o) = v.as_object_mut() {
        o.insert("owner".into(), u.owner.into());
    }
    v
}

/// A record as the control socket shows it.
pub fn record_json(r: &nicsync_fwif::conn::ConnRecord) -> serde_json::Value {
    use nicsync_fwif::conn::NatKind;
    let nat = match r.nat.nat_kind() {
        Some(NatKind::None) => None,
        kind => Some(serde_json::json!({
            "kind": kind.map_or("unknown", NatKind::name),
            "addr": r.nat.ip().map(|a| a.to_string()),
            "port": r.nat.port.get(),
        })),
    };
    let flags: Vec<String> = r.state.conn_flags().iter_names().map(|(n, _)| n.to_ascii_lowercase()).collect();
    serde_json::json!({
        "key": r.key.to_string(),
        "tcp_state": r.state.tcp().map(nicsync_fwif::conn::TcpState::name),
        "flags": flags,
        "timeout_s": r.state.timeout_s.get(),
        "mark": r.state.mark.get(),
        "generation": r.state.generation.get(),
        "nat": nat,
    })
}
