//! The connection-table API: insert, update, delete, lookup, batches and
//! snapshot iteration over the NIC-resident table.
//!
//! With [`ConnTable::enable_recovery`] the table also keeps the host's own
//! copy of the card's table ([`ShadowTable`]) and survives device faults:
//! an operation whose outcome a fault left unknown (a timeout, a lost or
//! garbled completion, a FATAL device, one that reset itself) makes it
//! reset and re-initialise the device, rebuild the card's table from the
//! copy and replay, in order, every operation of the call not yet settled;
//! a DMA_ERROR is retried, an entry found missing that cannot have aged is
//! restored, and [`ConnTable::audit`] compares the card with the copy.
//! docs/faults.md has the details.

use std::collections::VecDeque;

use nicsync_fwif::cmd::{
    CommandDescriptor, ConnOp, DescFlags, LoadStatus, Opcode, SyncPosition, LOAD_MAX_RECORDS, MAX_POSITIONS,
    SNAPSHOT_DONE,
};
use nicsync_fwif::conn::{ConnKey, ConnRecord, ConnState, Nat};
use nicsync_fwif::cpl::{Completion, CplStatus};
use nicsync_fwif::event::Event;
use nicsync_fwif::regs::{Capabilities, Counter};
use nicsync_fwif::sync::{precedence, DeltaRecord, DeltaUpdate, RECORD_SIZE};
use nicsync_vfio::{DmaBuffer, NicDevice};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::driver::{Driver, DriverConfig, DriverError, RecoveryStats};
use crate::shadow::{ShadowEntry, ShadowTable};

/// A connection's state plus its optional NAT translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEntry {
    /// State.
    pub state: ConnState,
    /// NAT translation (None: none; on update: keep the stored one).
    pub nat: Option<Nat>,
}

impl ConnEntry {
    /// An entry without NAT.
    pub fn new(state: ConnState) -> Self {
        ConnEntry { state, nat: None }
    }
}

/// Why a table operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The key is absent.
    #[error("no such connection")]
    NotFound,
    /// INSERT of a present key.
    #[error("connection exists")]
    Exists,
    /// No room on the card.
    #[error("connection table full")]
    TableFull,
    /// The stored generation is newer.
    #[error("stale update: stored generation {stored} is newer")]
    Stale {
        /// Generation on the card.
        stored: u32,
    },
    /// The device refused the command.
    #[error("device refused the command: {0}")]
    Refused(CplStatus),
    /// The device wrote a record that does not validate.
    #[error("device returned a malformed record: {0}")]
    BadRecord(String),
    /// The table is in use by something that must not be disturbed (a
    /// snapshot walk being served); try again.
    #[error("busy: {0}")]
    Busy(String),
    /// Driver or device failure.
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// One operation of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableOp {
    /// INSERT.
    Insert(ConnKey, ConnEntry),
    /// UPDATE (device-assigned generation unless the state carries one and
    /// `explicit_generation` is used).
    Update(ConnKey, ConnEntry),
    /// UPSERT.
    Upsert(ConnKey, ConnEntry),
    /// DELETE.
    Delete(ConnKey),
    /// REPLICA UPSERT: a copy of member `owner`'s entry (Full Sync),
    /// applied under the conflict rule, not sent to the peers.
    Replica(ConnKey, ConnEntry, u16),
    /// REPLICA DELETE: member `owner`'s delete at generation `generation`
    /// (a Full Sync tombstone): (key, generation, owner).
    ReplicaDelete(ConnKey, u32, u16),
}

impl TableOp {
    /// The REPLICA write a Full Sync record stands for: a DELETE record as
    /// its owner's delete (tombstone), anything else as the owner's entry.
    /// The device checks the record; nothing is checked here.
    pub fn from_record(r: &DeltaRecord) -> Self {
        if r.op == nicsync_fwif::sync::DeltaOp::Delete as u8 {
            TableOp::ReplicaDelete(r.key, r.state.generation.get(), r.owner.get())
        } else {
            TableOp::Replica(r.key, ConnEntry { state: r.state, nat: Some(r.nat) }, r.owner.get())
        }
    }

    /// The connection it concerns.
    pub fn key(&self) -> &ConnKey {
        match self {
            TableOp::Insert(k, _)
            | TableOp::Update(k, _)
            | TableOp::Upsert(k, _)
            | TableOp::Delete(k)
            | TableOp::Replica(k, _, _)
            | TableOp::ReplicaDelete(k, _, _) => k,
        }
    }
}

/// How a connection table recovers from device faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryConfig {
    /// Resets (with rebuild and replay) one call may make before it gives
    /// up and returns the fault.
    pub max_recoveries: u32,
    /// Retries of one command after DMA_ERROR, or after a NOT_FOUND for an
    /// entry the card lost.
    pub max_retries: u32,
    /// This member's id in a cluster (0: standalone). When set, entries are
    /// rebuilt as REPLICA upserts of their owners (this member for its
    /// own), which the device neither numbers anew nor sends to the peers,
    /// and audits compare the device's `sync_entries` counter too.
    pub member: u16,
    /// Torn SNAPSHOT walks an audit starts again before giving up.
    pub walk_retries: u32,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig { max_recoveries: 4, max_retries: 3, member: 0, walk_retries: 8 }
    }
}

/// What an audit found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditReport {
    /// Entries on the card (`TABLE_COUNT`) when the audit started.
    pub device_entries: u64,
    /// Entries in the host's copy then.
    pub shadow_entries: u64,
    /// Whether the card's table was walked (the quick check disagreed, or
    /// a full audit was asked for).
    pub walked: bool,
    /// The card's counters moved during the quick check (peer updates
    /// being applied): nothing was concluded and nothing walked; the next
    /// audit checks again.
    pub inconclusive: bool,
    /// Entries of the copy missing on the card: restored.
    pub missing: u64,
    /// Entries on both that differ: restored from the copy, or taken into
    /// it when the card's generation is newer (a peer's change).
    pub different: u64,
    /// Entries the card holds that the copy lacked, or newer there: taken
    /// into the copy.
    pub adopted: u64,
    /// Entries of the copy the card lacks that the device may have removed
    /// itself (events were lost): dropped from the copy.
    pub forgotten: u64,
    /// Restores the device refused.
    pub restore_failures: u64,
    /// A fault struck during the audit: the device was reset and its table
    /// rebuilt from the copy instead.
    pub recovered: bool,
}

/// The recovery state of a table: configuration, the host's copy, events
/// read during recoveries and audits that the caller has not taken yet.
#[derive(Debug)]
struct Recovery {
    cfg: RecoveryConfig,
    shadow: ShadowTable,
    events: VecDeque<Event>,
    /// A call gave up on a fault (or a rebuild failed): the card's state is
    /// unknown, and the next call starts with a recovery.
    unsettled: bool,
    /// An audit's walk of the card in progress ([`ConnTable::audit_step`]).
    audit: Option<Box<AuditWalk>>,
}

/// A SNAPSHOT chunk for walks that share an event loop's turn (an audit's,
/// an operator's `conn list`): 6,553 connection records or 5,957 sync
/// records, a few milliseconds of the loop. It must hold more than the
/// device's carry FIFO (4,096 entries moved behind the walk), or a busy
/// table would tear the walk at every chunk.
pub const SHORT_CHUNK_BYTES: usize = 512 * 1024;

/// An audit's walk of the card, a chunk per [`ConnTable::audit_step`], so
/// that a member's loop is never held for a whole table (a walk of 1 M
/// entries with its comparison took 0.8-1.2 s in one go, four times the
/// dead window of the conntrack bench's members: their peers took them for
/// dead). Each chunk's records are compared with the copy as they come;
/// entries changed since the walk began are left out (their events or the
/// host's own writes told the copy), and so are entries the walk already
/// returned (one that moved may come twice; the copy marks each entry the
/// walk returns).
#[derive(Debug)]
struct AuditWalk {
    report: AuditReport,
    /// Events had been lost before the walk began.
    needs: bool,
    /// Device resets when it began: one since ends the audit (`recovered`).
    resets: u64,
    /// Times the walk was torn and started again.
    torn: u32,
    cursor: u32,
    /// Keys whose copy is to be written back to the card at the end.
    restore: Vec<ConnKey>,
    chunk: Vec<ConnRecord>,
}

/// Events kept for the caller while recovering, at most.
const HELD_EVENTS: usize = 1 << 16;

/// Events whose places in the copy are fetched ahead of applying them.
const EVENTS_AHEAD: usize = 8;

/// SNAPSHOT chunks in a row that may return their own cursor (each filled
/// by entries the table moved behind the walk) before the device is taken
/// for faulty: a healthy one moves on once its carry FIFO is empty.
const MAX_SNAPSHOT_STALLS: u32 = 64;

/// How many completions ahead of the one taken in a batch's write to the
/// copy is fetched.
const COPY_PREFETCH_AHEAD: usize = 8;

/// What a posted command of a recovering batch stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Posted {
    /// Operation `i` of the batch.
    Op(usize),
    /// The restore of the entry operation `i` concerns, from the copy.
    Restore(usize),
}

/// A recovering batch's state that settling a completion may change.
struct Settle<'a> {
    retries: &'a mut [u32],
    todo: &'a mut VecDeque<Posted>,
    in_flight: &'a VecDeque<(u16, Posted)>,
    cfg: RecoveryConfig,
    recoveries: u32,
}

/// How a recovering batch goes on after a completion.
enum Settled {
    /// Done (or queued again).
    Next,
    /// The operation must run again in order: reset, rebuild, replay.
    Replay,
}

/// Maps a completion status to the table result.
fn status_result(c: &Completion) -> Result<u64, TableError> {
    match c.status {
        CplStatus::Success => Ok(c.result),
        CplStatus::NotFound => Err(TableError::NotFound),
        CplStatus::Exists => Err(TableError::Exists),
        CplStatus::TableFull => Err(TableError::TableFull),
        CplStatus::Stale => Err(TableError::Stale { stored: c.result as u32 }),
        s => Err(TableError::Refused(s)),
    }
}

/// Where LOAD's statuses start in its host buffer, after room for the
/// most records one LOAD takes.
const LOAD_STATUS_OFFSET: usize = LOAD_MAX_RECORDS as usize * RECORD_SIZE;

/// A table-level failure where a driver error is expected (the recovering
/// paths return the driver's error type): a driver error as it is, any
/// other as a configuration error carrying its message.
fn into_driver(e: TableError) -> DriverError {
    match e {
        TableError::Driver(d) => d,
        other => DriverError::Config(other.to_string()),
    }
}

/// Whether LOAD must refuse `r` as MALFORMED (abi.md, LOAD).
fn load_refuses(r: &DeltaRecord) -> bool {
    r.owner.get() == 0 || r.validate().is_err()
}

/// Checks the statuses a LOAD of `records` wrote (see [`ConnTable::load`])
/// and turns them into the results the single writes would have had.
/// `took` is the completion's result, the number of SUCCESS statuses. Only
/// what LOAD may write for each record passes: SUCCESS with the record's
/// own generation, STALE (with the winner's generation) or TABLE_FULL
/// for a valid record, MALFORMED for exactly the records LOAD refuses;
/// reserved bytes zero.
fn parse_load_statuses(
    records: &[DeltaRecord],
    statuses: &[LoadStatus],
    took: u64,
) -> Result<Vec<Result<u32, TableError>>, String> {
    let mut out = Vec::with_capacity(statuses.len());
    let mut ok = 0u64;
    for (i, (r, s)) in records.iter().zip(statuses).enumerate() {
        if s.reserved != [0; 3] {
            return Err(format!("record {i}: reserved bytes {:?}", s.reserved));
        }
        let g = s.result.get();
        let refused = load_refuses(r);
        out.push(match CplStatus::from_wire(s.status) {
            Some(CplStatus::Success) if !refused && g == r.state.generation.get() => {
                ok += 1;
                Ok(g)
            }
            // STALE carries the winning version's generation (not checked:
            // only the card knows it), TABLE_FULL nothing.
            Some(st @ CplStatus::Stale) | Some(st @ CplStatus::TableFull)
                if !refused && (st == CplStatus::Stale || g == 0) =>
            {
                let c = Completion { tag: 0, status: st, opcode: Opcode::Load as u8, cmd_head: 0, result: g.into() };
                status_result(&c).map(|r| r as u32)
            }
            Some(CplStatus::Malformed) if refused && g == 0 => Err(TableError::Refused(CplStatus::Malformed)),
            _ => return Err(format!("record {i}: status byte {} with result {g}", s.status)),
        });
    }
    if statuses.len() != records.len() {
        return Err(format!("{} statuses for {} records", statuses.len(), records.len()));
    }
    if ok != took {
        return Err(format!("{ok} records SUCCESS, the completion says {took}"));
    }
    Ok(out)
}

/// Size of the host buffer that receives a SNAPSHOT chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The NIC-resident connection table.
pub struct ConnTable<D: NicDevice> {
    drv: Driver<D>,
    auto_generation: bool,
    snap_buf: Option<DmaBuffer>,
    /// SNAPSHOT chunks in a row whose cursor did not move (records from
    /// the carry FIFO only).
    snap_stalls: u32,
    snap_bytes: usize,
    /// LOAD's records, then its statuses (allocated at the first LOAD).
    load_buf: Option<DmaBuffer>,
    /// SYNC_POSITIONS' and SYNC_ALIGN's entries (allocated at first use).
    pos_buf: Option<DmaBuffer>,
    /// The LOAD [`ConnTable::load_post`] posted, not yet taken in, with its
    /// ticket.
    posted_load: Option<(LoadTicket, PostedLoad)>,
    /// The last ticket given.
    load_tickets: u64,
    /// Fault recovery, when enabled (boxed: the fast path only tests it).
    rec: Option<Box<Recovery>>,
}

impl<D: NicDevice> std::fmt::Debug for ConnTable<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable").field("driver", &self.drv).finish_non_exhaustive()
    }
}

impl<D: NicDevice> ConnTable<D> {
    /// Brings the device up and wraps it.
    pub fn open(dev: D, cfg: DriverConfig) -> Result<Self, DriverError> {
        Ok(Self::new(Driver::probe(dev, cfg)?))
    }

    /// Wraps a driver.
    pub fn new(drv: Driver<D>) -> Self {
        ConnTable {
            drv,
            auto_generation: true,
            snap_buf: None,
            snap_stalls: 0,
            snap_bytes: SNAPSHOT_CHUNK_BYTES,
            load_buf: None,
            pos_buf: None,
            posted_load: None,
            load_tickets: 0,
            rec: None,
        }
    }

    /// Sets the size of the host buffer a SNAPSHOT chunk is written into
    /// (default [`SNAPSHOT_CHUNK_BYTES`]; at least one sync record). Smaller
    /// chunks make more, shorter commands.
    pub fn set_snapshot_chunk_bytes(&mut self, bytes: usize) {
        self.snap_bytes = bytes.max(RECORD_SIZE);
        self.snap_buf = None;
    }

    /// With `false`, INSERT/UPDATE/UPSERT carry the caller's generation and
    /// the device refuses older ones (cluster sync); with `true` (the
    /// default) the device numbers generations itself.
    pub fn set_auto_generation(&mut self, on: bool) {
        self.auto_generation = on;
    }

    /// The driver.
    pub fn driver(&mut self) -> &mut Driver<D> {
        &mut self.drv
    }

    /// The driver, shared.
    pub fn driver_ref(&self) -> &Driver<D> {
        &self.drv
    }

    /// Makes room in the host's copy (when fault recovery keeps one) for
    /// `entries` entries in all, at most the card's capacity: a Full Sync
    /// or a kernel dump about to bring a million entries would otherwise
    /// grow it one doubling at a time, each rehashing the whole copy while
    /// the member's loop waits.
    pub fn reserve_copy(&mut self, entries: usize) {
        let cap = self.drv.config().table_capacity as usize;
        if let Some(r) = &mut self.rec {
            r.shadow.reserve(entries.min(cap));
        }
    }

    /// Entries resident on the card: its `TABLE_COUNT`, which is never
    /// more than the capacity it granted (a higher reading, such as the
    /// all-ones of a device gone from the bus, is taken as the capacity:
    /// it sizes the host's copy).
    pub fn len(&self) -> usize {
        self.drv.table_count().min(self.drv.info().capacity) as usize
    }

    /// Whether the card holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn conn_op(&self, key: &ConnKey, e: &ConnEntry) -> ConnOp {
        ConnOp { key: *key, state: e.state, nat: e.nat, auto_generation: self.auto_generation, replica_owner: None }
    }

    fn encode(&self, op: &TableOp) -> (CommandDescriptor, Option<CommandDescriptor>) {
        match op {
            TableOp::Insert(k, e) => self.conn_op(k, e).encode(Opcode::Insert, 0),
            TableOp::Update(k, e) => self.conn_op(k, e).encode(Opcode::Update, 0),
            TableOp::Upsert(k, e) => self.conn_op(k, e).encode(Opcode::Upsert, 0),
            TableOp::Delete(k) => {
                (CommandDescriptor::conn(Opcode::Delete, DescFlags::empty(), 0, k, &ConnState::default()), None)
            }
            TableOp::Replica(k, e, owner) => {
                ConnOp { key: *k, state: e.state, nat: e.nat, auto_generation: false, replica_owner: Some(*owner) }
                    .encode(Opcode::Upsert, 0)
            }
            TableOp::ReplicaDelete(k, generation, owner) => {
                let (d, ext) = CommandDescriptor::replica_delete(0, k, *generation, *owner);
                (d, Some(ext))
            }
        }
    }

    /// Runs one operation and waits for it. Returns the stored generation
    /// (0 for DELETE).
    #[inline]
    pub fn apply(&mut self, op: &TableOp) -> Result<u32, TableError> {
        if self.rec.is_some() {
            let mut r = self.batch_recovering(std::slice::from_ref(op))?;
            return r.pop().unwrap_or(Err(TableError::Refused(CplStatus::Internal)));
        }
        let (d, ext) = self.encode(op);
        let c = self.drv.execute(&d, ext.as_ref())?;
        status_result(&c).map(|r| r as u32)
    }

    /// Inserts a new connection; returns its generation.
    pub fn insert(&mut self, key: &ConnKey, e: &ConnEntry) -> Result<u32, TableError> {
        self.apply(&TableOp::Insert(*key, *e))
    }

    /// Replaces a connection's state; returns the new generation.
    pub fn update(&mut self, key: &ConnKey, e: &ConnEntry) -> Result<u32, TableError> {
        self.apply(&TableOp::Update(*key, *e))
    }

    /// Inserts or replaces.
    pub fn upsert(&mut self, key: &ConnKey, e: &ConnEntry) -> Result<u32, TableError> {
        self.apply(&TableOp::Upsert(*key, *e))
    }

    /// Removes a connection.
    pub fn delete(&mut self, key: &ConnKey) -> Result<(), TableError> {
        self.apply(&TableOp::Delete(*key)).map(|_| ())
    }

    /// Reads a connection; `Ok(None)` if absent.
    pub fn lookup(&mut self, key: &ConnKey) -> Result<Option<ConnRecord>, TableError> {
        let Some(cfg) = self.rec.as_ref().map(|r| r.cfg) else { return self.lookup_once(key) };
        self.settle_first()?;
        let (mut recoveries, mut retries) = (0, 0);
        loop {
            self.make_room(1)?;
            match self.lookup_once(key) {
                // A LOOKUP changes nothing: running it again is safe.
                Err(TableError::Refused(CplStatus::DmaError)) if retries < cfg.max_retries => {
                    retries += 1;
                    self.drv.recovery_mut().count_dma_retry();
                }
                Err(TableError::Driver(e)) if e.needs_recovery() && recoveries < cfg.max_recoveries => {
                    recoveries += 1;
                    self.recover()?;
                    self.drv.recovery_mut().commands_replayed += 1;
                }
                Err(TableError::Driver(e)) if e.needs_recovery() => {
                    self.give_up();
                    return Err(e.into());
                }
                Ok(None) if retries < cfg.max_retries && self.lost_on_card(key) => {
                    retries += 1;
                    self.drv.recovery_mut().lost_entries_detected += 1;
                    self.restore_keys(&[*key])?;
                }
                r => return r,
            }
        }
    }

    fn lookup_once(&mut self, key: &ConnKey) -> Result<Option<ConnRecord>, TableError> {
        let resp = self.drv.next_response_iova();
        let d = CommandDescriptor::lookup(0, key, resp);
        let tag = self.drv.post(&d, None)?;
        self.drv.ring();
        let c = self.drv.wait(tag)?;
        match status_result(&c) {
            Ok(_) => {
                let rec = self.drv.read_response(tag)?;
                rec.validate().map_err(|e| TableError::BadRecord(e.to_string()))?;
                if rec.key != *key {
                    return Err(TableError::BadRecord(format!("asked for {key}, device answered {}", rec.key)));
                }
                Ok(Some(rec))
            }
            Err(TableError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes every connection; returns how many there were.
    pub fn flush(&mut self) -> Result<u64, TableError> {
        let d = CommandDescriptor::header(Opcode::Flush, DescFlags::empty(), 0);
        let Some(cfg) = self.rec.as_ref().map(|r| r.cfg) else {
            let c = self.drv.execute(&d, None)?;
            return status_result(&c);
        };
        self.settle_first()?;
        let mut recoveries = 0;
        loop {
            self.make_room(1)?;
            match self.drv.execute(&d, None) {
                Ok(c) => {
                    let r = status_result(&c);
                    if r.is_ok() {
                        // An audit's walk compared what is gone now.
                        self.audit_cancel();
                        // Events the card wrote before the FLUSH are read
                        // (and reach the caller) before the copy empties:
                        // read after, they would put back into the copy
                        // entries the card no longer holds, which an audit
                        // would then put back on the card. Events of peer
                        // updates applied after the FLUSH and read here go
                        // too: the copy then lacks entries the card holds,
                        // which the next audit takes in (its counts
                        // differ). A Full Sync holds the peers' updates
                        // (SYNC_HOLD) around its FLUSH, so none come.
                        self.absorb_events();
                        if let Some(rec) = &mut self.rec {
                            rec.shadow.clear();
                        }
                    }
                    return r;
                }
                Err(e) if e.needs_recovery() && recoveries < cfg.max_recoveries => {
                    recoveries += 1;
                    self.recover()?;
                    self.drv.recovery_mut().commands_replayed += 1;
                }
                Err(e) => {
                    if e.needs_recovery() {
                        self.give_up();
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// Writes Full Sync records (sync records with their owners) to the
    /// card as the REPLICA writes they stand for ([`TableOp::from_record`]),
    /// in order, with one result per record, as [`ConnTable::batch`] of
    /// those writes would return (and with recovery on, as it would take
    /// them into the copy). A device with LOAD (ABI 1.6) takes up to
    /// [`LOAD_MAX_RECORDS`] of them per descriptor, reading them from host
    /// memory: 88 bytes an entry instead of a chained pair of descriptors;
    /// one without it gets the pairs.
    pub fn load(&mut self, records: &[DeltaRecord]) -> Result<Vec<Result<u32, TableError>>, DriverError> {
        self.drop_posted_load();
        if !self.drv.info().caps.contains(Capabilities::LOAD) {
            return self.load_by_pairs(records);
        }
        let mut out = Vec::with_capacity(records.len());
        for chunk in records.chunks(LOAD_MAX_RECORDS as usize) {
            match self.rec.as_ref().map(|r| r.cfg) {
                None => self.load_chunk(chunk, &mut out)?,
                Some(cfg) => self.load_chunk_recovering(chunk, cfg, &mut out)?,
            }
        }
        Ok(out)
    }

    /// [`ConnTable::load`] in two steps, so that the caller works while the
    /// card writes: posts one LOAD of `records` (at most
    /// [`LOAD_MAX_RECORDS`]) and returns; [`ConnTable::load_take`] then
    /// waits for it and gives what [`ConnTable::load`] would have. Other
    /// commands may run in between (each completion is kept by its tag).
    /// Where one posted LOAD cannot do it (fault recovery on, a card
    /// without LOAD, more records, a full ring), the records are written
    /// now, as [`ConnTable::load`] does, and the take gives the outcome.
    /// One post at a time: a post, or a [`ConnTable::load`], before the
    /// take waits for the earlier LOAD and drops its outcome, and that
    /// LOAD's take then answers `None`: its caller must treat the slice as
    /// not written.
    pub fn load_post(&mut self, records: &[DeltaRecord]) -> Result<LoadTicket, DriverError> {
        self.drop_posted_load();
        let one = self.rec.is_none()
            && self.drv.info().caps.contains(Capabilities::LOAD)
            && !records.is_empty()
            && records.len() <= LOAD_MAX_RECORDS as usize
            && self.drv.can_post(1);
        let posted = if one {
            let d = self.stage_load(records)?;
            let tag = self.drv.post(&d, None)?;
            self.drv.ring();
            // Other commands may run before the take and the ring come
            // round to this tag: its outcome is kept for the take.
            self.drv.keep_outcome(tag);
            PostedLoad::InFlight { tag, records: records.to_vec() }
        } else {
            PostedLoad::Done(self.load(records))
        };
        self.load_tickets += 1;
        let ticket = LoadTicket(self.load_tickets);
        self.posted_load = Some((ticket, posted));
        Ok(ticket)
    }

    /// The outcome of the LOAD [`ConnTable::load_post`] posted with
    /// `ticket` (waiting for its completion); `None` if that LOAD is not
    /// the one posted (never posted, taken, or dropped by a later post).
    pub fn load_take(&mut self, ticket: LoadTicket) -> Option<Result<Vec<Result<u32, TableError>>, DriverError>> {
        if self.posted_load.as_ref().is_none_or(|(t, _)| *t != ticket) {
            return None;
        }
        self.take_posted_load()
    }

    fn take_posted_load(&mut self) -> Option<Result<Vec<Result<u32, TableError>>, DriverError>> {
        Some(match self.posted_load.take()?.1 {
            PostedLoad::Done(r) => r,
            PostedLoad::InFlight { tag, records } => self.drv.take_kept(tag).map(|c| self.load_outcome(&records, &c)),
        })
    }

    /// Whether a LOAD posted by [`ConnTable::load_post`] awaits its take.
    pub fn load_posted(&self) -> bool {
        self.posted_load.is_some()
    }

    /// Settles a posted LOAD nobody took in, so that the LOAD buffer is
    /// free again (its caller gave up on it).
    pub fn drop_posted_load(&mut self) {
        if let Some(Err(e)) = self.take_posted_load() {
            tracing::warn!("a LOAD posted and never taken in failed: {e}");
        }
    }

    /// [`ConnTable::load`] by chained descriptor pairs (a device without
    /// LOAD, or the rest of a chunk after a rebuild). A record that LOAD
    /// would answer MALFORMED is answered so here and not sent.
    fn load_by_pairs(&mut self, records: &[DeltaRecord]) -> Result<Vec<Result<u32, TableError>>, DriverError> {
        let ops: Vec<TableOp> = records.iter().filter(|r| !load_refuses(r)).map(TableOp::from_record).collect();
        let mut done = self.batch(&ops)?.into_iter();
        Ok(records
            .iter()
            .map(|r| match load_refuses(r) {
                false => done.next().unwrap_or(Err(TableError::Refused(CplStatus::Internal))),
                true => Err(TableError::Refused(CplStatus::Malformed)),
            })
            .collect())
    }

    /// Copies `records` (at most LOAD_MAX_RECORDS) to the LOAD buffer and
    /// returns the LOAD descriptor for them.
    fn stage_load(&mut self, records: &[DeltaRecord]) -> Result<CommandDescriptor, DriverError> {
        let bytes = LOAD_STATUS_OFFSET + LOAD_MAX_RECORDS as usize * std::mem::size_of::<LoadStatus>();
        let b = lazy_dma(&self.drv, &mut self.load_buf, bytes)?;
        b.mem().write(0, records.as_bytes())?;
        let statuses = b.iova() + LOAD_STATUS_OFFSET as u64;
        // The last LOAD's statuses are overwritten with ones no device
        // writes, so a device that completes without writing them is caught.
        let unwritten = vec![0xFF; records.len() * std::mem::size_of::<LoadStatus>()];
        b.mem().write(LOAD_STATUS_OFFSET, &unwritten)?;
        Ok(CommandDescriptor::load(0, b.iova(), statuses, records.len() as u32))
    }

    /// The per-record outcomes of a LOAD of `records` that completed with
    /// SUCCESS and `took` as its result, read back and checked (see
    /// [`parse_load_statuses`]). `Err` names what the device got wrong.
    fn load_statuses(&self, records: &[DeltaRecord], took: u64) -> Result<Vec<Result<u32, TableError>>, String> {
        let mut st = vec![LoadStatus::new_zeroed(); records.len()];
        let Some(b) = &self.load_buf else { return Err("no LOAD buffer".into()) };
        b.mem().read(LOAD_STATUS_OFFSET, st.as_mut_bytes()).map_err(|e| e.to_string())?;
        parse_load_statuses(records, &st, took)
    }

    fn load_chunk(
        &mut self,
        records: &[DeltaRecord],
        out: &mut Vec<Result<u32, TableError>>,
    ) -> Result<(), DriverError> {
        let d = self.stage_load(records)?;
        let c = self.drv.execute(&d, None)?;
        out.extend(self.load_outcome(records, &c));
        Ok(())
    }

    /// Per-record outcomes of the LOAD of `records` that completed with `c`.
    fn load_outcome(&mut self, records: &[DeltaRecord], c: &Completion) -> Vec<Result<u32, TableError>> {
        if c.status != CplStatus::Success {
            // Nothing was applied (DMA_ERROR, MALFORMED; a device that
            // failed after applying goes FATAL, which `execute` reports as
            // an error): each record has the command's answer.
            return records.iter().map(|_| status_result(c).map(|r| r as u32)).collect();
        }
        match self.load_statuses(records, c.result) {
            Ok(r) => r,
            Err(why) => {
                self.drv.recovery_mut().corrupt_completions += 1;
                let why = format!("LOAD statuses: {why}");
                records.iter().map(|_| Err(TableError::BadRecord(why.clone()))).collect()
            }
        }
    }

    /// [`ConnTable::load_chunk`] with recovery. The records are taken into
    /// the copy one by one from their statuses, as the single writes'
    /// completions would be. A fault, a DMA_ERROR that persists, statuses
    /// that cannot be trusted, or a record that took over a newer version
    /// in the copy (the card had lost it) rebuild the card from the copy as
    /// it stands, and the records not yet taken in run again as single
    /// writes under [`ConnTable::batch`]'s recovery, which settles each of
    /// them however the card answers.
    fn load_chunk_recovering(
        &mut self,
        records: &[DeltaRecord],
        cfg: RecoveryConfig,
        out: &mut Vec<Result<u32, TableError>>,
    ) -> Result<(), DriverError> {
        self.settle_first().map_err(into_driver)?;
        self.make_room(1).map_err(into_driver)?;
        let d = self.stage_load(records)?;
        let mut retries = 0;
        let statuses = loop {
            match self.drv.execute(&d, None) {
                Ok(c) if c.status == CplStatus::DmaError && retries < cfg.max_retries => {
                    retries += 1;
                    self.drv.recovery_mut().count_dma_retry();
                }
                Ok(c) if c.status == CplStatus::Success => match self.load_statuses(records, c.result) {
                    Ok(s) => break Some(s),
                    Err(why) => {
                        tracing::warn!("LOAD statuses: {why}: rebuilding the card");
                        self.drv.recovery_mut().corrupt_completions += 1;
                        break None;
                    }
                },
                Ok(c) => {
                    tracing::warn!(status = %c.status, "LOAD refused: rebuilding the card");
                    break None;
                }
                Err(e) if e.needs_recovery() => {
                    tracing::warn!("LOAD: {e}: rebuilding the card");
                    break None;
                }
                Err(e) => return Err(e),
            }
        };
        let mut taken = 0;
        if let Some(statuses) = statuses {
            // What the card removed by itself (aged) is in the copy's view
            // before a record's take is judged against it.
            self.absorb_events();
            for (i, (r, res)) in records.iter().zip(statuses).enumerate() {
                if let (Some(rec), Some(ahead)) = (&self.rec, records.get(i + COPY_PREFETCH_AHEAD)) {
                    rec.shadow.prefetch(&ahead.key);
                }
                let op = TableOp::from_record(r);
                // A card that holds the copy's version refuses one it
                // beats as STALE: this one had lost it.
                if res.is_ok() && self.copy_wins(&op).is_some() {
                    tracing::warn!(key = %r.key, "LOAD: a record took over a version the card must have held: rebuilding the card");
                    self.drv.recovery_mut().lost_entries_detected += 1;
                    break;
                }
                if let Some(rec) = &mut self.rec {
                    rec.shadow.record(&op, &res);
                }
                out.push(res);
                taken += 1;
            }
            if taken == records.len() {
                return Ok(());
            }
        }
        self.recover().map_err(into_driver)?;
        self.drv.recovery_mut().commands_replayed += (records.len() - taken) as u64;
        out.extend(self.load_by_pairs(&records[taken..])?);
        Ok(())
    }

    /// Runs a batch: every operation is posted, with one doorbell per
    /// ring-full, and the results come back in order.
    pub fn batch(&mut self, ops: &[TableOp]) -> Result<Vec<Result<u32, TableError>>, DriverError> {
        if self.rec.is_some() {
            return self.batch_recovering(ops);
        }
        let mut results: Vec<Option<Result<u32, TableError>>> = (0..ops.len()).map(|_| None).collect();
        let mut tags: std::collections::VecDeque<(u16, usize)> = std::collections::VecDeque::new();
        let mut next = 0;
        while next < ops.len() || !tags.is_empty() {
            // One of our tags whose outcome is still to be taken (behind a
            // lost completion) must not be posted over.
            while next < ops.len() && (tags.is_empty() || !self.drv.is_unclaimed(self.drv.next_tag())) {
                let (d, ext) = self.encode(&ops[next]);
                match self.drv.post(&d, ext.as_ref()) {
                    Ok(tag) => {
                        tags.push_back((tag, next));
                        next += 1;
                    }
                    Err(DriverError::RingFull { .. }) if tags.is_empty() => {
                        // The ring is full of commands that are not ours:
                        // reap theirs (kept for their owners) until a slot
                        // frees, within the completion timeout.
                        self.wait_for_free_slot(1 + ext.is_some() as u32)?;
                    }
                    Err(DriverError::RingFull { .. }) => break,
                    Err(e) => return Err(e),
                }
            }
            self.drv.ring();
            // Wait for the oldest, then take every following one that is
            // already done (completions come in ring order from a sane
            // device; any other order is still handled, just later).
            if let Some((tag, i)) = tags.pop_front() {
                let c = self.drv.wait(tag)?;
                results[i] = Some(status_result(&c).map(|r| r as u32));
            }
            while let Some(&(tag, i)) = tags.front() {
                match self.drv.take_done(tag) {
                    Some(c) => {
                        results[i] = Some(status_result(&c).map(|r| r as u32));
                        tags.pop_front();
                    }
                    None => break,
                }
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(Err(TableError::Refused(CplStatus::Internal)))).collect())
    }

    /// A SNAPSHOT chunk with recovery: a DMA_ERROR (nothing written, the
    /// walk where it was) is retried; after a fault the device is reset
    /// and rebuilt, which ends any walk: SNAPSHOT_TORN tells the caller to
    /// start again at cursor 0.
    fn snapshot_command_recovering(
        &mut self,
        d: &CommandDescriptor,
        cfg: RecoveryConfig,
    ) -> Result<Completion, TableError> {
        if self.rec.as_ref().is_some_and(|r| r.unsettled) {
            // The card is rebuilt first; any walk in progress is gone.
            self.settle_first()?;
            return Err(TableError::Refused(CplStatus::SnapshotTorn));
        }
        if !self.make_room(1)? {
            return Err(TableError::Refused(CplStatus::SnapshotTorn));
        }
        let mut retries = 0;
        loop {
            match self.drv.execute(d, None) {
                Ok(c) if c.status == CplStatus::DmaError && retries < cfg.max_retries => {
                    retries += 1;
                    self.drv.recovery_mut().count_dma_retry();
                }
                Ok(c) => return Ok(c),
                Err(e) if e.needs_recovery() => {
                    self.recover()?;
                    return Err(TableError::Refused(CplStatus::SnapshotTorn));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    // ---- fault recovery ---------------------------------------------------

    /// Keeps the host's own copy of the card's table from now on and
    /// recovers from device faults (see the module documentation). The copy
    /// starts as what the card holds (a SNAPSHOT walk; nothing to walk on a
    /// fresh device).
    pub fn enable_recovery(&mut self, cfg: RecoveryConfig) -> Result<(), TableError> {
        self.rec = None;
        let mut shadow = ShadowTable::with_hash(self.drv.table_hash());
        // Room for an eighth of the card from the start: a member filling
        // up does not rehash the copy at every doubling below that (the
        // memory comes zeroed and is mapped only as it is written).
        shadow.reserve((self.drv.config().table_capacity as usize / 8).max(self.len()));
        if !self.is_empty() {
            for r in self.snapshot() {
                shadow.adopt(&r?);
            }
        }
        self.rec = Some(Box::new(Recovery { cfg, shadow, events: VecDeque::new(), unsettled: false, audit: None }));
        Ok(())
    }

    /// Stops keeping the copy and recovering; returns the copy.
    pub fn disable_recovery(&mut self) -> Option<ShadowTable> {
        self.rec.take().map(|r| r.shadow)
    }

    /// The recovery configuration, when recovery is enabled.
    pub fn recovery_config(&self) -> Option<RecoveryConfig> {
        self.rec.as_ref().map(|r| r.cfg)
    }

    /// The host's copy of the table, when recovery is enabled.
    pub fn shadow(&self) -> Option<&ShadowTable> {
        self.rec.as_ref().map(|r| &r.shadow)
    }

    /// The host's copy, to feed it what this table does not see itself
    /// (events read through [`ConnTable::driver`], Full Sync records).
    pub fn shadow_mut(&mut self) -> Option<&mut ShadowTable> {
        self.rec.as_mut().map(|r| &mut r.shadow)
    }

    /// Faults detected and recoveries made (driver and table).
    pub fn recovery_stats(&self) -> RecoveryStats {
        self.drv.recovery_stats()
    }

    /// Consumes the device's events and calls `f` for each, first those read
    /// during recoveries and audits; with recovery enabled each also updates
    /// the host's copy ([`ShadowTable::apply_event`]). Use this rather than
    /// `driver().poll_events` when recovery is enabled.
    pub fn poll_events(&mut self, mut f: impl FnMut(Event)) -> usize {
        let floor = self.drv.generation_floor();
        let Some(r) = &mut self.rec else { return self.drv.poll_events(f) };
        // Into the copy first, a few at a time: each event's place in the
        // copy is fetched as it is read and the event applied eight reads
        // later (a Standby takes in a peer's whole flood this way, one
        // random place in the copy per event). No caller code runs
        // meanwhile; the events then join those kept from recoveries and
        // audits, and go to the caller from that queue, so an event the
        // caller has not taken (its closure panicked) is still there for
        // the next call.
        let mut ahead: [Option<Event>; EVENTS_AHEAD] = [None; EVENTS_AHEAD];
        let mut at = 0usize;
        let lost = self.drv.events_lost();
        self.drv.poll_events(|ev| {
            r.shadow.prefetch(&ev.key);
            if let Some(old) = ahead[at % EVENTS_AHEAD].replace(ev) {
                r.shadow.apply_event(&old, floor);
                r.events.push_back(old);
            }
            at += 1;
        });
        if self.drv.events_lost() != lost {
            // An event the driver could not read is one lost, as if the
            // ring had overflowed: the copy may miss a removal.
            r.shadow.mark_needs_audit();
        }
        for i in 0..EVENTS_AHEAD {
            if let Some(ev) = ahead[(at + i) % EVENTS_AHEAD].take() {
                r.shadow.apply_event(&ev, floor);
                r.events.push_back(ev);
            }
        }
        let mut n = 0;
        while let Some(ev) = r.events.pop_front() {
            n += 1;
            f(ev);
        }
        n
    }

    /// Reads the device's events into the copy, keeping them for the
    /// caller's next [`ConnTable::poll_events`].
    fn absorb_events(&mut self) {
        let Some(r) = &mut self.rec else { return };
        let floor = self.drv.generation_floor();
        let lost = self.drv.events_lost();
        // Every event written, those behind a garbled one too: this runs
        // before a reset (whose ring starts again empty) and before the
        // copy is judged against the card.
        self.drv.poll_events_all(|ev| {
            r.shadow.apply_event(&ev, floor);
            // The card changed the entry, whatever the copy made of it (an
            // AGED event of a state the copy does not hold leaves it): an
            // audit's walk under way leaves the key out.
            r.shadow.note_touched(ev.key);
            if r.events.len() >= HELD_EVENTS {
                r.events.pop_front();
            }
            r.events.push_back(ev);
        });
        if self.drv.events_lost() != lost {
            r.shadow.mark_needs_audit();
        }
    }

    /// Resets and re-initialises the device and rebuilds its table from the
    /// host's copy (retried if a fault strikes the rebuild, up to
    /// `max_recoveries` times). Operations in flight are not replayed here:
    /// the call that was running them does it.
    pub fn recover(&mut self) -> Result<(), TableError> {
        let Some(cfg) = self.rec.as_ref().map(|r| r.cfg) else {
            return Err(DriverError::Config("fault recovery is not enabled".into()).into());
        };
        // Aged entries the device already reported must not come back.
        self.absorb_events();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.reinit_and_rebuild() {
                Ok(()) => {
                    if let Some(r) = &mut self.rec {
                        r.unsettled = false;
                    }
                    return Ok(());
                }
                Err(e) if e.needs_recovery() && attempts < cfg.max_recoveries.max(1) => {
                    tracing::warn!("fault while rebuilding the table: {e}; again");
                }
                Err(e) => {
                    self.give_up();
                    return Err(e.into());
                }
            }
        }
    }

    /// Marks the card's state as unknown after a call gave up on a fault:
    /// the next call recovers first.
    fn give_up(&mut self) {
        if let Some(r) = &mut self.rec {
            r.unsettled = true;
        }
    }

    /// Recovers first if an earlier call gave up on a fault.
    fn settle_first(&mut self) -> Result<(), TableError> {
        if self.rec.as_ref().is_some_and(|r| r.unsettled) {
            tracing::warn!("the card's state is unknown since a call gave up on a fault: recovering first");
            self.recover()?;
        }
        Ok(())
    }

    /// With recovery on, makes room in the ring for a command of `slots`
    /// slots: waits for completions, and if the slots are still held after
    /// the completion timeout (by commands whose completions never came,
    /// left by a call that gave up), recovers, since only a reset frees
    /// them. Returns whether the card was left as it was (false: it was
    /// rebuilt).
    fn make_room(&mut self, slots: u32) -> Result<bool, TableError> {
        if self.drv.can_post(slots) || self.wait_for_free_slot(slots).is_ok() {
            return Ok(true);
        }
        tracing::warn!(in_flight = self.drv.slots_in_flight(), "command slots held by lost commands: recovering");
        self.recover()?;
        Ok(false)
    }

    fn reinit_and_rebuild(&mut self) -> Result<(), DriverError> {
        self.drv.reinit()?;
        let Some(r) = &self.rec else { return Ok(()) };
        let member = r.cfg.member;
        let mut cmds: Vec<_> = r.shadow.iter().map(|(k, e)| restore_desc(member, k, e, false)).collect();
        let entries = cmds.len();
        // A cluster member's card also remembers recent deletes: without
        // them a re-insert would be numbered from 1, below the delete the
        // peers remember, and a peer's stale copy could bring a deleted
        // entry back.
        if member != 0 {
            cmds.extend(r.shadow.tombstones().map(|(k, t)| {
                let owner = if t.owner != 0 { t.owner } else { member };
                let (d, ext) = CommandDescriptor::replica_delete(0, k, t.generation, owner);
                (d, Some(ext))
            }));
        }
        let cpls = self.run_encoded(&cmds)?;
        let ok = cpls[..entries.min(cpls.len())].iter().filter(|c| c.status == CplStatus::Success).count();
        let tombs = cpls.get(entries..).map_or(0, |t| t.iter().filter(|c| c.status == CplStatus::Success).count());
        if ok + tombs < cmds.len() {
            tracing::error!(failed = cmds.len() - ok - tombs, "entries could not be rebuilt on the card");
        }
        tracing::warn!(entries = ok, tombstones = tombs, "card table rebuilt from the host's copy");
        let stats = self.drv.recovery_mut();
        stats.entries_restored += ok as u64;
        stats.tombstones_restored += tombs as u64;
        Ok(())
    }

    /// If a card holding the copy's entry of the REPLICA write `op`'s
    /// connection would refuse the write as STALE under the conflict rule
    /// ([`precedence`]: generation, then owner, then DELETE over UPSERT,
    /// then the record's bytes), the generation of that entry. `None` for
    /// any other operation, or when the copy has no entry (a tombstone is
    /// not asked: the card keeps fewer than the copy). An entry whose owner
    /// the copy does not know (0: this member's own write, or a peer's
    /// change taken from an event, which does not carry the owner) is
    /// compared by generation alone: it wins only if it is newer.
    fn copy_wins(&self, op: &TableOp) -> Option<u32> {
        let r = self.rec.as_ref()?;
        let (key, u) = match op {
            TableOp::Replica(k, e, owner) => (k, DeltaUpdate::upsert(*owner, *k, e.state, e.nat.unwrap_or_default())),
            TableOp::ReplicaDelete(k, generation, owner) => {
                let state = ConnState { generation: (*generation).into(), ..ConnState::default() };
                (k, DeltaUpdate::delete(*owner, *k, state))
            }
            _ => return None,
        };
        let e = r.shadow.get(key)?;
        let g = e.state.generation.get();
        let wins = match e.owner {
            0 => g > u.state.generation.get(),
            owner => precedence(&u, &DeltaUpdate::upsert(owner, *key, e.state, e.nat)) != std::cmp::Ordering::Greater,
        };
        wins.then_some(g)
    }

    /// Whether the write `op`, which succeeded and stored generation
    /// `stored`, could not have succeeded so on a card holding the copy's
    /// version of its connection: an INSERT (that card answers EXISTS), an
    /// UPSERT or UPDATE numbered by the device no higher than the copy's
    /// version (that card numbers above what it holds), or one carrying an
    /// explicit generation that loses to the copy's version (STALE there).
    /// Then the card did not hold the connection when the write ran.
    fn took_over_copy(&self, op: &TableOp, stored: u32) -> bool {
        let Some(r) = self.rec.as_ref() else { return false };
        if !matches!(op, TableOp::Insert(..) | TableOp::Update(..) | TableOp::Upsert(..)) {
            return false;
        }
        let Some(e) = r.shadow.get(op.key()) else { return false };
        let held = e.state.generation.get();
        match op {
            TableOp::Insert(..) => true,
            TableOp::Update(..) | TableOp::Upsert(..) if self.auto_generation => stored <= held,
            TableOp::Update(_, w) | TableOp::Upsert(_, w) => {
                let g = w.state.generation.get();
                // A cluster member's card refuses an equal generation over
                // a higher owner too.
                let owner = if e.owner != 0 { e.owner } else { r.cfg.member };
                g < held || (g == held && r.cfg.member != 0 && r.cfg.member < owner)
            }
            _ => false,
        }
    }

    /// Whether the card's lack of `key` is a loss: the copy still holds it
    /// once the device's events are read (the device reports every entry
    /// it removes by itself, aged or deleted by a peer, by an event), and
    /// the copy can be trusted to (see [`ConnTable::certainly_lost`]).
    fn lost_on_card(&mut self, key: &ConnKey) -> bool {
        if self.rec.as_ref().is_none_or(|r| r.shadow.get(key).is_none()) {
            return false;
        }
        self.absorb_events();
        let trusted = self.events_trusted();
        match self.rec.as_ref().and_then(|r| r.shadow.get(key)) {
            Some(e) => self.certainly_lost(e, trusted),
            None => false,
        }
    }

    /// Whether no event has been lost (since the last audit that walked to
    /// its end, and since the device's reset): then the copy knows of every
    /// removal. An audit's walk under way clears the copy's flag when it
    /// starts; what it was set for still holds until the walk ends.
    fn events_trusted(&self) -> bool {
        let overflow = self.drv.status().contains(nicsync_fwif::regs::Status::EVENT_OVERFLOW);
        !overflow
            && self.rec.as_ref().is_some_and(|r| !r.shadow.needs_audit() && !r.audit.as_ref().is_some_and(|w| w.needs))
    }

    /// Whether an entry of the copy that the card lacks was lost by the
    /// card: always if no event was lost; otherwise only when nothing but
    /// aging could remove it (no peers) and it cannot age.
    fn certainly_lost(&self, e: &ShadowEntry, events_trusted: bool) -> bool {
        let aging = self.drv.config().aging_period_ms != 0;
        let standalone = self.rec.as_ref().is_some_and(|r| r.cfg.member == 0);
        events_trusted || (standalone && (!aging || !e.can_age()))
    }

    /// Writes the copy's entries of `keys` to the card; returns how many the
    /// device refused.
    fn restore_keys(&mut self, keys: &[ConnKey]) -> Result<u64, DriverError> {
        let Some(r) = &self.rec else { return Ok(0) };
        let (keys, cmds): (Vec<ConnKey>, Vec<_>) =
            keys.iter().filter_map(|k| r.shadow.get(k).map(|e| (*k, restore_desc(r.cfg.member, k, e, true)))).unzip();
        let cpls = self.run_encoded(&cmds)?;
        let ok = cpls.iter().filter(|c| c.status == CplStatus::Success).count() as u64;
        self.drv.recovery_mut().entries_restored += ok;
        // STALE: the card holds a newer version of the connection (a
        // tombstone: a peer's delete whose event was lost). A lost entry
        // leaves none, so the copy is the one behind: it forgets the entry,
        // or every audit would find it missing and try again.
        if let Some(r) = &mut self.rec {
            for (k, c) in keys.iter().zip(&cpls) {
                if c.status == CplStatus::Stale {
                    tracing::debug!(key = %k, "audit: the card holds a newer version; the copy forgets its entry");
                    r.shadow.remove(k);
                }
            }
        }
        Ok(cpls.len() as u64 - ok)
    }

    /// Runs encoded commands in order, one doorbell per ring-full, without
    /// recovery; returns their completions.
    fn run_encoded(
        &mut self,
        cmds: &[(CommandDescriptor, Option<CommandDescriptor>)],
    ) -> Result<Vec<Completion>, DriverError> {
        let mut out = Vec::with_capacity(cmds.len());
        let mut tags = VecDeque::new();
        let mut next = 0;
        while next < cmds.len() || !tags.is_empty() {
            while let Some((d, ext)) = cmds.get(next) {
                if !tags.is_empty() && self.drv.is_unclaimed(self.drv.next_tag()) {
                    break;
                }
                match self.drv.post(d, ext.as_ref()) {
                    Ok(tag) => {
                        tags.push_back(tag);
                        next += 1;
                    }
                    Err(DriverError::RingFull { .. }) if tags.is_empty() => {
                        self.wait_for_free_slot(1 + ext.is_some() as u32)?
                    }
                    Err(DriverError::RingFull { .. }) => break,
                    Err(e) => return Err(e),
                }
            }
            self.drv.ring();
            if let Some(tag) = tags.pop_front() {
                out.push(self.drv.wait(tag)?);
            }
            while let Some(c) = tags.front().and_then(|t| self.drv.take_done(*t)) {
                out.push(c);
                tags.pop_front();
            }
        }
        Ok(out)
    }

    /// [`ConnTable::batch`] with recovery. Results are settled strictly in
    /// order, and each settled operation updates the copy, so that at any
    /// time the copy is the card's table as of the last settled operation.
    /// After a fault the card is rebuilt from the copy and every operation
    /// not settled is posted again, in order: each takes effect once, as
    /// the caller sees it.
    fn batch_recovering(&mut self, ops: &[TableOp]) -> Result<Vec<Result<u32, TableError>>, DriverError> {
        let Some(cfg) = self.rec.as_ref().map(|r| r.cfg) else { return self.batch(ops) };
        self.settle_first().map_err(into_driver)?;
        let mut results: Vec<Option<Result<u32, TableError>>> = (0..ops.len()).map(|_| None).collect();
        let mut retries = vec![0u32; ops.len()];
        let mut todo: VecDeque<Posted> = (0..ops.len()).map(Posted::Op).collect();
        let mut tags: VecDeque<(u16, Posted)> = VecDeque::new();
        let mut recoveries = 0;
        while !todo.is_empty() || !tags.is_empty() {
            let mut fault = None;
            // The ring stayed full of commands that are not this call's
            // past the completion timeout: lost ones, freed only by a reset.
            let mut stuck = false;
            while let Some(&p) = todo.front() {
                if !tags.is_empty() && self.drv.is_unclaimed(self.drv.next_tag()) {
                    break;
                }
                let (d, ext) = match p {
                    Posted::Op(i) => self.encode(&ops[i]),
                    Posted::Restore(i) => match self.rec.as_ref().and_then(|r| r.shadow.get(ops[i].key())) {
                        Some(e) => restore_desc(cfg.member, ops[i].key(), e, true),
                        None => {
                            todo.pop_front();
                            continue;
                        }
                    },
                };
                match self.drv.post(&d, ext.as_ref()) {
                    Ok(tag) => {
                        tags.push_back((tag, p));
                        todo.pop_front();
                    }
                    Err(DriverError::RingFull { .. }) if tags.is_empty() => {
                        if let Err(e) = self.wait_for_free_slot(1 + ext.is_some() as u32) {
                            stuck = true;
                            fault = Some(e);
                            break;
                        }
                    }
                    Err(DriverError::RingFull { .. }) => break,
                    Err(e) => {
                        fault = Some(e);
                        break;
                    }
                }
            }
            self.drv.ring();
            let mut replay = false;
            // The oldest, then every following one already done.
            let mut first = true;
            while fault.is_none() && !replay {
                let Some(&(tag, p)) = tags.front() else { break };
                let c = if first {
                    first = false;
                    match self.drv.wait(tag) {
                        Ok(c) => c,
                        Err(e) => {
                            fault = Some(e);
                            break;
                        }
                    }
                } else {
                    match self.drv.take_done(tag) {
                        Some(c) => c,
                        None => break,
                    }
                };
                tags.pop_front();
                // The copy's place of a write a few completions on is
                // fetched now, while this one and those between are taken
                // in (each takes in its own write to the copy).
                if let (Some(r), Some((_, Posted::Op(j) | Posted::Restore(j)))) =
                    (&self.rec, tags.get(COPY_PREFETCH_AHEAD - 1))
                {
                    r.shadow.prefetch(ops[*j].key());
                }
                let ctx = Settle { retries: &mut retries, todo: &mut todo, in_flight: &tags, cfg, recoveries };
                replay = matches!(self.settle(ops, p, &c, &mut results, ctx), Settled::Replay);
            }
            let faulted = match fault {
                Some(e) if !(e.needs_recovery() || stuck) => return Err(e),
                Some(e) if recoveries >= cfg.max_recoveries => {
                    self.give_up();
                    return Err(e);
                }
                Some(_) => true,
                None => false,
            };
            if faulted || replay {
                recoveries += 1;
                self.recover().map_err(into_driver)?;
                let posted = tags.iter().filter(|(_, p)| matches!(p, Posted::Op(_))).count();
                self.drv.recovery_mut().commands_replayed += posted as u64;
                tags.clear();
                todo = (0..ops.len()).filter(|i| results[*i].is_none()).map(Posted::Op).collect();
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(Err(TableError::Refused(CplStatus::Internal)))).collect())
    }

    /// Takes in one completion of a recovering batch.
    fn settle(
        &mut self,
        ops: &[TableOp],
        p: Posted,
        c: &Completion,
        results: &mut [Option<Result<u32, TableError>>],
        ctx: Settle<'_>,
    ) -> Settled {
        let Settle { retries, todo, in_flight, cfg, recoveries } = ctx;
        let i = match p {
            Posted::Restore(i) => {
                if c.status == CplStatus::Success {
                    self.drv.recovery_mut().entries_restored += 1;
                } else {
                    tracing::warn!(key = %ops[i].key(), status = %c.status, "restore refused");
                }
                return Settled::Next;
            }
            Posted::Op(i) => i,
        };
        let op = &ops[i];
        let res = status_result(c).map(|r| r as u32);
        // Running the operation again out of order is safe only if nothing
        // in flight after it concerns the same connection.
        let alone = || {
            in_flight.iter().all(|(_, q)| match q {
                Posted::Op(j) | Posted::Restore(j) => ops[*j].key() != op.key(),
            })
        };
        let missing = matches!(op, TableOp::Update(..) | TableOp::Delete(..))
            && c.status == CplStatus::NotFound
            && self.lost_on_card(op.key());
        // A write that took as a new entry on a card that had lost the
        // connection (a loss leaves no tombstone): numbered from 1, below
        // the version the copy and the peers hold, it would be refused by
        // the peers (and so would the member's next changes of it). Put the
        // copy's version back and run the write again, as for NOT_FOUND.
        let missing = missing
            || (c.status == CplStatus::Success
                && self.took_over_copy(op, c.result as u32)
                && self.lost_on_card(op.key())
                && self.took_over_copy(op, c.result as u32));
        // A REPLICA write (a merge or Full Sync record) that took although
        // the copy holds a version of the connection that beats it: a card
        // holding that version refuses it as STALE, so it had lost it.
        let newer = self.copy_wins(op).filter(|_| c.status == CplStatus::Success);
        if c.status == CplStatus::DmaError {
            // Nothing was done (abi.md 11): the command may run again.
            self.drv.recovery_mut().dma_errors += 1;
            if retries[i] < cfg.max_retries {
                retries[i] += 1;
                if alone() {
                    let r = self.drv.recovery_mut();
                    r.dma_retries += 1;
                    r.commands_replayed += 1;
                    todo.push_front(Posted::Op(i));
                    return Settled::Next;
                }
                if recoveries < cfg.max_recoveries {
                    return Settled::Replay;
                }
            }
        } else if missing {
            // The card lost the entry (see `lost_on_card`): put it back,
            // then run the operation again.
            self.drv.recovery_mut().lost_entries_detected += 1;
            if retries[i] < cfg.max_retries {
                retries[i] += 1;
                if alone() {
                    self.drv.recovery_mut().commands_replayed += 1;
                    todo.push_front(Posted::Op(i));
                    todo.push_front(Posted::Restore(i));
                    return Settled::Next;
                }
                // A full rebuild puts it back.
                if recoveries < cfg.max_recoveries {
                    return Settled::Replay;
                }
            }
        } else if let Some(stored) = newer {
            // Put the newer version back over the older one; the write
            // answers what it would have on a sane card.
            self.drv.recovery_mut().lost_entries_detected += 1;
            if retries[i] < cfg.max_retries {
                retries[i] += 1;
                if alone() {
                    todo.push_front(Posted::Restore(i));
                    results[i] = Some(Err(TableError::Stale { stored }));
                    return Settled::Next;
                }
                // A full rebuild puts it back; run again, it is refused.
                if recoveries < cfg.max_recoveries {
                    return Settled::Replay;
                }
            }
        }
        if let Some(r) = &mut self.rec {
            r.shadow.record(op, &res);
        }
        results[i] = Some(res);
        Settled::Next
    }

    /// Compares the card's table with the host's copy and repairs it: a
    /// quick check first (`TABLE_COUNT`, and `sync_entries` for a cluster
    /// member, against the copy), then, if they disagree or events were
    /// lost, a SNAPSHOT walk. Entries missing on the card, or older there,
    /// are restored from the copy; entries only on the card, or newer there,
    /// are taken into it. Cheap when all agrees: a daemon calls it
    /// periodically.
    pub fn audit(&mut self) -> Result<AuditReport, TableError> {
        self.audit_with(false)
    }

    /// [`ConnTable::audit`] that always walks the table (finds entries
    /// changed in place, which no counter shows).
    pub fn audit_full(&mut self) -> Result<AuditReport, TableError> {
        self.audit_with(true)
    }

    fn audit_with(&mut self, full: bool) -> Result<AuditReport, TableError> {
        loop {
            if let Some(report) = self.audit_step_with(full)? {
                return Ok(report);
            }
        }
    }

    /// [`ConnTable::audit`] a step at a time, for an event loop that must
    /// not be held for a whole table: the quick check, and when a walk is
    /// needed, one SNAPSHOT chunk of it per call, compared with the copy at
    /// once. `None` while the walk goes on (call again); the report when
    /// the audit is done. A walk in progress is abandoned by a flush, and
    /// by another walk of the card (which tears it); an abandoned audit
    /// leaves the next one to walk again.
    pub fn audit_step(&mut self) -> Result<Option<AuditReport>, TableError> {
        self.audit_step_with(false)
    }

    /// Whether an audit's walk is in progress ([`ConnTable::audit_step`]).
    pub fn audit_walking(&self) -> bool {
        self.rec.as_ref().is_some_and(|r| r.audit.is_some())
    }

    /// Abandons an audit's walk in progress, if any.
    pub fn audit_cancel(&mut self) {
        let Some(w) = self.rec.as_mut().and_then(|r| r.audit.take()) else { return };
        self.audit_walk_ended(&w);
        tracing::debug!(cursor = w.cursor, "audit: walk abandoned");
    }

    /// An audit's walk that ends before its comparison (abandoned, or
    /// overtaken by a rebuild): the copy stops noting changes, what the
    /// walk took into it stays taken, and what made the audit walk is
    /// still unsettled.
    fn audit_walk_ended(&mut self, w: &AuditWalk) {
        self.drv.recovery_mut().entries_adopted += w.report.adopted;
        let Some(r) = &mut self.rec else { return };
        r.shadow.take_changes();
        if w.needs {
            r.shadow.mark_needs_audit();
        }
    }

    fn audit_step_with(&mut self, full: bool) -> Result<Option<AuditReport>, TableError> {
        let Some(cfg) = self.rec.as_ref().map(|r| r.cfg) else {
            return Err(DriverError::Config("fault recovery is not enabled".into()).into());
        };
        let walking = match &self.rec {
            // The copy was emptied under the walk: nothing it compared holds.
            Some(r) if r.audit.is_some() && !r.shadow.tracking_changes() => {
                self.audit_cancel();
                false
            }
            Some(r) => r.audit.is_some(),
            None => false,
        };
        if !walking {
            if let Some(report) = self.audit_check(full) {
                return Ok(Some(report));
            }
        }
        self.audit_walk_chunk(cfg)
    }

    /// The quick check: the report when it settles the audit, `None` when
    /// the card must be walked (the walk is then set up).
    fn audit_check(&mut self, full: bool) -> Option<AuditReport> {
        let cfg = self.rec.as_ref().map(|r| r.cfg)?;
        self.drv.recovery_mut().audits += 1;
        self.absorb_events();
        let device_entries = u64::from(self.drv.table_count());
        let (shadow_entries, synced, needs) = match &self.rec {
            Some(r) => (r.shadow.len() as u64, r.shadow.synced_len() as u64, r.shadow.needs_audit()),
            None => (0, 0, false),
        };
        let mut report = AuditReport { device_entries, shadow_entries, ..Default::default() };
        let device_synced = self.drv.device_counter(Counter::SyncEntries);
        let agree = device_entries == shadow_entries && (cfg.member == 0 || device_synced == synced);
        if agree && !full && !needs {
            return Some(report);
        }
        if !full && !needs {
            // The card may be changing under the check (a peer's updates
            // applied between the events read and the counters read). Read
            // the events again, then the counters: if the card moved, the
            // check says nothing (the next one, when it is still, will); if
            // it stood still, the copy now agrees or the difference is real.
            self.absorb_events();
            let (again, synced_again) =
                (u64::from(self.drv.table_count()), self.drv.device_counter(Counter::SyncEntries));
            if again != device_entries || synced_again != device_synced {
                report.inconclusive = true;
                return Some(report);
            }
            let (shadow_now, synced_now) = match &self.rec {
                Some(r) => (r.shadow.len() as u64, r.shadow.synced_len() as u64),
                None => (0, 0),
            };
            if again == shadow_now && (cfg.member == 0 || synced_again == synced_now) {
                return Some(report);
            }
        }
        self.drv.recovery_mut().audit_walks += 1;
        report.walked = true;
        tracing::debug!(
            device_entries,
            shadow_entries,
            device_synced,
            synced,
            needs,
            full,
            "audit: the card and the copy disagree: walking the card"
        );
        let resets = self.drv.recovery_stats().resets;
        let r = self.rec.as_mut()?;
        // Events lost from here on set the flag again for the next audit.
        r.shadow.audited();
        r.shadow.track_changes();
        r.audit = Some(Box::new(AuditWalk {
            report,
            needs,
            resets,
            torn: 0,
            cursor: 0,
            restore: Vec::new(),
            chunk: Vec::new(),
        }));
        None
    }

    /// One chunk of the audit's walk, compared with the copy; at the end of
    /// the walk, the entries of the copy it did not return, and the report.
    fn audit_walk_chunk(&mut self, cfg: RecoveryConfig) -> Result<Option<AuditReport>, TableError> {
        let Some(mut w) = self.rec.as_mut().and_then(|r| r.audit.take()) else {
            return Err(TableError::Refused(CplStatus::Internal));
        };
        // A fault since the walk began: the card was rebuilt from the copy,
        // which is what the audit would have made it.
        let recovered = |table: &mut Self, w: Box<AuditWalk>| {
            table.audit_walk_ended(&w);
            Ok(Some(AuditReport { recovered: true, ..w.report }))
        };
        if self.drv.recovery_stats().resets > w.resets {
            return recovered(self, w);
        }
        let mut chunk = std::mem::take(&mut w.chunk);
        let next = match self.snapshot_chunk(w.cursor, &mut chunk, SHORT_CHUNK_BYTES) {
            Ok(next) => next,
            Err(TableError::Refused(CplStatus::SnapshotTorn)) if self.drv.recovery_stats().resets > w.resets => {
                return recovered(self, w);
            }
            Err(TableError::Refused(CplStatus::SnapshotTorn)) if w.torn < cfg.walk_retries => {
                // Started again from the first slot, comparing everything
                // again (an entry returned before the tear may be lost
                // since): fresh marks, and what the first pass concluded
                // forgotten, but for what it took into the copy (changed
                // keys, left out from here on).
                w.torn += 1;
                w.cursor = 0;
                w.chunk = chunk;
                w.restore.clear();
                w.report.different = 0;
                if let Some(r) = &mut self.rec {
                    r.shadow.restart_marks();
                    r.audit = Some(w);
                }
                return Ok(None);
            }
            Err(e) => {
                self.audit_walk_ended(&w);
                return Err(e);
            }
        };
        // The card's changes so far reach the copy (and mark their keys)
        // before the chunk is compared with it.
        self.absorb_events();
        let Some(r) = &mut self.rec else { return Ok(None) };
        for rec in &chunk {
            if r.shadow.changed_since_tracked(&rec.key) {
                continue;
            }
            match r.shadow.get(&rec.key).copied() {
                Some(_) if !r.shadow.mark_walked(&rec.key) => {} // returned before
                Some(e) if e.matches(rec) => {}
                Some(e) => {
                    w.report.different += 1;
                    if rec.state.generation.get() <= e.state.generation.get() {
                        w.restore.push(rec.key);
                    } else {
                        r.shadow.adopt(rec);
                        w.report.adopted += 1;
                    }
                }
                None => {
                    r.shadow.adopt(rec);
                    w.report.adopted += 1;
                }
            }
        }
        w.chunk = chunk;
        if next != SNAPSHOT_DONE {
            w.cursor = next;
            r.audit = Some(w);
            return Ok(None);
        }
        self.audit_finish(*w).map(Some)
    }

    /// The end of an audit's walk: entries of the copy the walk did not
    /// return are restored (lost by the card) or dropped (removed by the
    /// device with their events lost), and the restores are made.
    fn audit_finish(&mut self, w: AuditWalk) -> Result<AuditReport, TableError> {
        let AuditWalk { mut report, needs, mut restore, .. } = w;
        // Entries that aged or that peers changed or deleted meanwhile.
        self.absorb_events();
        let trusted = self.events_trusted() && !needs;
        let Some(r) = &mut self.rec else { return Ok(report) };
        // Entries of the copy the walk did not return, counted without a
        // pass over the copy; the pass only when the card lacks some.
        let lost = if r.shadow.unwalked() > 0 { r.shadow.unwalked_entries() } else { Vec::new() };
        let changed = r.shadow.take_changes();
        let mut forget = Vec::new();
        for (k, e) in lost {
            if self.certainly_lost(&e, trusted) {
                tracing::debug!(key = %k, generation = e.state.generation.get(), owner = e.owner, "audit: missing on the card");
                report.missing += 1;
                restore.push(k);
            } else {
                // Removed by the device with its event lost, or lost.
                forget.push(k);
            }
        }
        // A key compared earlier in the walk and changed since is the
        // change's business.
        restore.retain(|k| !changed.contains(k));
        let Some(r) = &mut self.rec else { return Ok(report) };
        for k in &forget {
            r.shadow.remove(k);
        }
        report.forgotten = forget.len() as u64;
        let stats = self.drv.recovery_mut();
        stats.lost_entries_detected += report.missing;
        stats.entries_adopted += report.adopted;
        if !restore.is_empty() {
            tracing::warn!(missing = report.missing, different = report.different, "audit: restoring entries");
            report.restore_failures = self.restore_keys(&restore)?;
        }
        Ok(report)
    }

    fn wait_for_free_slot(&mut self, slots: u32) -> Result<(), DriverError> {
        let start = std::time::Instant::now();
        loop {
            self.drv.reap();
            // Free slots are not enough: the command may need two, or the
            // tail slot may still be reserved by a lost completion (then
            // only a reset frees it, and this ends at the timeout).
            if self.drv.can_post(slots) {
                return Ok(());
            }
            if start.elapsed() >= self.drv.config().completion_timeout {
                return Err(DriverError::RingFull { in_flight: self.drv.slots_in_flight() });
            }
            std::hint::spin_loop();
        }
    }

    /// Walks the whole table chunk by chunk (SNAPSHOT commands into a 1 MiB
    /// host buffer). The walk is consistent only while nothing else changes
    /// the table: an insert, delete or cuckoo move during it can make an
    /// entry, even an unchanged one, appear twice or not at all (see
    /// docs/abi.md, SNAPSHOT). A device whose cursor does not advance, or
    /// that needs more chunks than the table has slots, ends the walk with an
    /// error.
    pub fn snapshot(&mut self) -> Snapshot<'_, D> {
        Snapshot { table: self, cursor: 0, chunk: Vec::new(), pos: 0, done: false, chunks: 0 }
    }

    /// Runs one SNAPSHOT chunk (`sync`: with SYNC_RECORDS) into the host
    /// buffer and returns the next cursor and the bytes of the records it
    /// wrote (`size` each), after checking what the device claims.
    fn snapshot_raw(
        &mut self,
        cursor: u32,
        sync: bool,
        size: usize,
        max_bytes: usize,
    ) -> Result<(u32, Vec<u8>), TableError> {
        let b = lazy_dma(&self.drv, &mut self.snap_buf, self.snap_bytes)?;
        let (iova, len) = (b.iova(), b.len().min(max_bytes.max(size)).min(u32::MAX as usize) as u32);
        let d = if sync {
            CommandDescriptor::snapshot_sync_records(0, iova, len, cursor)
        } else {
            CommandDescriptor::snapshot(0, iova, len, cursor)
        };
        let c = match self.rec.as_ref().map(|r| r.cfg) {
            None => self.drv.execute(&d, None)?,
            Some(cfg) => self.snapshot_command_recovering(&d, cfg)?,
        };
        let r = status_result(&c)?;
        let count = (r & 0xFFFF_FFFF) as usize;
        let next = (r >> 32) as u32;
        if count * size > len as usize {
            return Err(TableError::BadRecord(format!("device claims {count} records in a {len}-byte buffer")));
        }
        // A chunk filled by the carry FIFO alone examines no position and
        // returns its own cursor (abi.md 13: the FIFO may hold exactly what
        // the buffer takes); it has records, and such chunks do not go on
        // for ever.
        let stalled = next == cursor && count > 0 && cursor != 0;
        self.snap_stalls = if stalled { self.snap_stalls + 1 } else { 0 };
        if next != SNAPSHOT_DONE
            && (next < cursor || next == cursor && !stalled || self.snap_stalls > MAX_SNAPSHOT_STALLS)
        {
            return Err(TableError::BadRecord(format!(
                "snapshot cursor went from {cursor} to {next} ({count} records)"
            )));
        }
        let mut raw = vec![0u8; count * size];
        if let Some(b) = &self.snap_buf {
            b.mem().read(0, &mut raw).map_err(DriverError::from)?;
        }
        Ok((next, raw))
    }

    fn snapshot_chunk(&mut self, cursor: u32, out: &mut Vec<ConnRecord>, max_bytes: usize) -> Result<u32, TableError> {
        let (next, raw) = self.snapshot_raw(cursor, false, ConnRecord::SIZE, max_bytes)?;
        out.clear();
        for chunk in raw.chunks_exact(ConnRecord::SIZE) {
            let rec = ConnRecord::read_from_bytes(chunk).unwrap_or_default();
            rec.validate().map_err(|e| TableError::BadRecord(e.to_string()))?;
            out.push(rec);
        }
        Ok(next)
    }

    /// One chunk of a walk over the entries marked for sync, as sync
    /// updates with their owners (SNAPSHOT with SYNC_RECORDS), appended to
    /// `out`: UPSERTs for the entries, then DELETEs for the tombstones.
    /// Start with cursor 0 and pass the returned cursor back until it is
    /// [`SNAPSHOT_DONE`]. The walk is consistent: every entry present from
    /// its start to its end is returned at least once, whatever changes
    /// meanwhile; if the device cannot keep that promise the chunk fails
    /// with `Refused(SNAPSHOT_TORN)` and the walk must start again. Only one
    /// walk runs at a time on a device.
    pub fn sync_snapshot_chunk(&mut self, cursor: u32, out: &mut Vec<DeltaUpdate>) -> Result<u32, TableError> {
        self.sync_snapshot_chunk_max(cursor, out, usize::MAX)
    }

    /// [`ConnTable::sync_snapshot_chunk`] as the records themselves, each
    /// checked as the decode would ([`DeltaRecord::validate`], an owner):
    /// what a Full Sync server sends on as it is, without decoding every
    /// record and encoding it again.
    pub fn sync_snapshot_records(&mut self, cursor: u32, out: &mut Vec<DeltaRecord>) -> Result<u32, TableError> {
        self.sync_snapshot_records_max(cursor, out, usize::MAX)
    }

    fn sync_snapshot_records_max(
        &mut self,
        cursor: u32,
        out: &mut Vec<DeltaRecord>,
        max_bytes: usize,
    ) -> Result<u32, TableError> {
        if cursor == 0 {
            // One walk at a time on a device: this one tears the audit's.
            self.audit_cancel();
        }
        let (next, raw) = self.snapshot_raw(cursor, true, RECORD_SIZE, max_bytes)?;
        let recs = <[DeltaRecord]>::ref_from_bytes(&raw)
            .map_err(|_| TableError::BadRecord(format!("{} bytes of sync records", raw.len())))?;
        for r in recs {
            let op = r.validate().map_err(|e| TableError::BadRecord(e.to_string()))?;
            if r.owner.get() == 0 {
                return Err(TableError::BadRecord(format!("snapshot sync record {op:?} without an owner")));
            }
        }
        out.extend_from_slice(recs);
        Ok(next)
    }

    /// [`ConnTable::sync_snapshot_chunk`] into at most `max_bytes` of the
    /// buffer: shorter chunks for a walk that takes a slice of an event
    /// loop's turn ([`SHORT_CHUNK_BYTES`]).
    pub fn sync_snapshot_chunk_max(
        &mut self,
        cursor: u32,
        out: &mut Vec<DeltaUpdate>,
        max_bytes: usize,
    ) -> Result<u32, TableError> {
        let mut recs = Vec::new();
        let next = self.sync_snapshot_records_max(cursor, &mut recs, max_bytes)?;
        out.reserve(recs.len());
        for r in &recs {
            out.push(r.decode().map_err(|e| TableError::BadRecord(e.to_string()))?);
        }
        Ok(next)
    }

    /// Where the card's Delta Sync streams stand (SYNC_POSITIONS): its own
    /// next number first, then, per peer it follows, the next number it
    /// expects (none while it holds its peers' updates). Taken just before
    /// a Full Sync's walk, it is the walk's cut ([`ConnTable::sync_align`]).
    /// `Ok(None)` from a card without the `SYNC_ALIGN` capability.
    pub fn sync_positions(&mut self) -> Result<Option<Vec<SyncPosition>>, TableError> {
        if !self.drv.info().caps.contains(Capabilities::SYNC_ALIGN) {
            return Ok(None);
        }
        let b = lazy_dma(&self.drv, &mut self.pos_buf, POSITIONS_BYTES)?;
        let d = CommandDescriptor::positions(0, false, b.iova(), MAX_POSITIONS);
        let c = self.drv.execute(&d, None)?;
        let n = status_result(&c)?;
        if n == 0 || n > u64::from(MAX_POSITIONS) {
            return Err(TableError::BadRecord(format!("SYNC_POSITIONS wrote {n} entries (1 to {MAX_POSITIONS})")));
        }
        let mut out = vec![SyncPosition::default(); n as usize];
        b.mem().read(0, out.as_mut_bytes()).map_err(DriverError::from)?;
        if let Some(bad) = out.iter().find(|p| !p.is_valid()) {
            return Err(TableError::BadRecord(format!("SYNC_POSITIONS wrote an invalid entry {bad:?}")));
        }
        Ok(Some(out))
    }

    /// Tells the card where a Full Sync's snapshot was cut in each peer's
    /// stream (SYNC_ALIGN with the server's [`ConnTable::sync_positions`]),
    /// so that it asks for none of the history the snapshot holds. Returns
    /// how many entries aligned a stream; `Ok(None)` from a card without
    /// the `SYNC_ALIGN` capability (it asks for all of it when the hold
    /// clears).
    pub fn sync_align(&mut self, cut: &[SyncPosition]) -> Result<Option<u64>, TableError> {
        if !self.drv.info().caps.contains(Capabilities::SYNC_ALIGN) || cut.is_empty() {
            return Ok(None);
        }
        let cut = &cut[..cut.len().min(MAX_POSITIONS as usize)];
        let b = lazy_dma(&self.drv, &mut self.pos_buf, POSITIONS_BYTES)?;
        b.mem().write(0, cut.as_bytes()).map_err(DriverError::from)?;
        let d = CommandDescriptor::positions(0, true, b.iova(), cut.len() as u32);
        let c = self.drv.execute(&d, None)?;
        let n = status_result(&c)?;
        if n > cut.len() as u64 {
            return Err(TableError::BadRecord(format!("SYNC_ALIGN aligned {n} of {} entries", cut.len())));
        }
        Ok(Some(n))
    }
}

/// Bytes of the SYNC_POSITIONS / SYNC_ALIGN buffer.
const POSITIONS_BYTES: usize = MAX_POSITIONS as usize * SyncPosition::SIZE;

/// The DMA buffer kept in `slot`, allocated (`bytes`) at its first use.
fn lazy_dma<'a, D: NicDevice>(
    drv: &Driver<D>,
    slot: &'a mut Option<DmaBuffer>,
    bytes: usize,
) -> Result<&'a DmaBuffer, DriverError> {
    let b = match slot.take() {
        Some(b) => b,
        None => drv.device().alloc_dma(bytes)?,
    };
    Ok(slot.insert(b))
}

/// Names one [`ConnTable::load_post`], for its [`ConnTable::load_take`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadTicket(u64);

/// A LOAD posted by [`ConnTable::load_post`].
enum PostedLoad {
    /// On the ring: its tag, and a copy of its records (their statuses are
    /// judged against them).
    InFlight { tag: u16, records: Vec<DeltaRecord> },
    /// Written at the post already (see [`ConnTable::load_post`]).
    Done(Result<Vec<Result<u32, TableError>>, DriverError>),
}

/// Iterator over the table's records (see [`ConnTable::snapshot`]).
pub struct Snapshot<'a, D: NicDevice> {
    table: &'a mut ConnTable<D>,
    cursor: u32,
    chunk: Vec<ConnRecord>,
    pos: usize,
    done: bool,
    chunks: u64,
}

impl<D: NicDevice> std::fmt::Debug for Snapshot<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("cursor", &self.cursor).finish_non_exhaustive()
    }
}

/// The command that writes the copy's entry of `key` back to the card:
/// an UPSERT with the copy's generation (a REPLICA upsert of its owner in a
/// cluster), with its NAT when it has one or when `nat_always` (to clear a
/// translation the card still holds).
fn restore_desc(
    member: u16,
    key: &ConnKey,
    e: &ShadowEntry,
    nat_always: bool,
) -> (CommandDescriptor, Option<CommandDescriptor>) {
    let owner = if e.owner != 0 { e.owner } else { member };
    let op = ConnOp {
        key: *key,
        state: e.state,
        nat: (nat_always || e.nat.kind != 0).then_some(e.nat),
        auto_generation: false,
        replica_owner: (owner != 0).then_some(owner),
    };
    op.encode(Opcode::Upsert, 0)
}

impl<D: NicDevice> Iterator for Snapshot<'_, D> {
    type Item = Result<ConnRecord, TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.pos < self.chunk.len() {
                self.pos += 1;
                return Some(Ok(self.chunk[self.pos - 1]));
            }
            if self.done {
                return None;
            }
            // A healthy device fills every chunk but the last, so a walk takes
            // at most capacity / records-per-chunk + 1 chunks; one that needs
            // far more is not advancing and is faulty.
            self.chunks += 1;
            let per_chunk = (self.table.snap_bytes / ConnRecord::SIZE).max(1) as u64;
            let limit = self.table.drv.info().capacity as u64 / per_chunk + 64;
            if self.chunks > limit {
                self.done = true;
                return Some(Err(TableError::BadRecord(format!("snapshot needed more than {limit} chunks"))));
            }
            let mut chunk = std::mem::take(&mut self.chunk);
            if self.cursor == 0 {
                // One walk at a time on a device: this one tears the audit's.
                self.table.audit_cancel();
            }
            match self.table.snapshot_chunk(self.cursor, &mut chunk, usize::MAX) {
                Ok(next) => {
                    self.chunk = chunk;
                    self.pos = 0;
                    if next == SNAPSHOT_DONE {
                        self.done = true;
                    } else {
                        self.cursor = next;
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicsync_fwif::conn::ConnState;
    use nicsync_fwif::sync::DeltaUpdate;

    fn st(status: CplStatus, result: u32) -> LoadStatus {
        LoadStatus { status: status as u8, reserved: [0; 3], result: result.into() }
    }

    /// A valid record at `generation`, and one LOAD refuses (owner 0).
    fn rec(generation: u32) -> DeltaRecord {
        let state = ConnState { generation: generation.into(), ..ConnState::default() };
        let key = ConnKey::v4([10, 0, 0, 1].into(), 1000, [10, 0, 0, 2].into(), 80, 6, 0);
        DeltaUpdate::upsert(2, key, state, Nat::default()).to_record()
    }

    fn refused() -> DeltaRecord {
        DeltaRecord { owner: 0.into(), ..rec(1) }
    }

    /// A device that reads all ones (gone from the bus, or faulty) reports
    /// no more entries than its capacity: the count sizes the host's copy,
    /// which a count of 2^32 - 1 made panic on a capacity overflow.
    #[test]
    fn a_table_count_above_the_capacity_reads_as_the_capacity() {
        use nicsync_fwif::regs::{self, Status};
        use nicsync_vfio::MockDevice;
        let m = std::sync::Arc::new(MockDevice::healthy());
        m.set(regs::STATUS, (Status::READY | Status::ENABLED).bits());
        let cfg = DriverConfig {
            table_capacity: 4096,
            bringup_timeout: std::time::Duration::from_millis(50),
            ..Default::default()
        };
        let mut t = ConnTable::new(Driver::probe(m.clone(), cfg).expect("probe"));
        m.set(regs::TABLE_COUNT, 4000);
        assert_eq!(t.len(), 4000);
        m.set(regs::TABLE_COUNT, u32::MAX);
        assert_eq!(t.len(), 4096);
        m.set(regs::TABLE_COUNT, 0);
        t.enable_recovery(RecoveryConfig::default()).expect("recovery on an empty table");
    }

    #[test]
    fn load_statuses_answer_as_the_single_writes() {
        let records = [rec(7), rec(3), rec(4), refused()];
        let statuses = [
            st(CplStatus::Success, 7),
            st(CplStatus::Stale, 0),
            st(CplStatus::TableFull, 0),
            st(CplStatus::Malformed, 0),
        ];
        let got = parse_load_statuses(&records, &statuses, 1);
        let got: Vec<String> = got.unwrap_or_default().iter().map(|r| format!("{r:?}")).collect();
        assert_eq!(got, ["Ok(7)", "Err(Stale { stored: 0 })", "Err(TableFull)", "Err(Refused(Malformed))"]);
    }

    /// What a faulty device may write instead: each is refused with what
    /// it got wrong, never taken as an answer.
    #[test]
    fn load_statuses_from_a_faulty_device_are_refused() {
        let mut reserved = st(CplStatus::Success, 1);
        reserved.reserved[1] = 1;
        let unwritten = LoadStatus { status: 0xFF, reserved: [0xFF; 3], result: u32::MAX.into() };
        let cases: [(&[DeltaRecord], &[LoadStatus], u64, &str); 9] = [
            (&[rec(1)], &[st(CplStatus::Success, 1)], 2, "1 records SUCCESS, the completion says 2"),
            (&[rec(1), rec(1)], &[st(CplStatus::Success, 1), st(CplStatus::Stale, 0)], 2, "1 records SUCCESS"),
            (&[rec(1)], &[st(CplStatus::NotFound, 0)], 0, "record 0: status byte 1"),
            (&[rec(1)], &[st(CplStatus::TableFull, 9)], 0, "record 0: status byte 3 with result 9"),
            (&[rec(1)], &[LoadStatus { status: 0xEE, ..st(CplStatus::Success, 0) }], 0, "status byte 238"),
            (&[rec(1)], &[reserved], 1, "record 0: reserved bytes"),
            (&[rec(1)], &[unwritten], 0, "record 0: reserved bytes"),
            (&[rec(5)], &[st(CplStatus::Success, 6)], 1, "record 0: status byte 0 with result 6"),
            (&[refused()], &[st(CplStatus::Success, 1)], 1, "record 0: status byte 0"),
        ];
        for (records, statuses, took, why) in cases {
            match parse_load_statuses(records, statuses, took) {
                Err(e) => assert!(e.contains(why), "{e:?} should say {why:?}"),
                Ok(r) => panic!("{statuses:?} taken: {r:?}"),
            }
        }
        // A valid record answered MALFORMED.
        let r = parse_load_statuses(&[rec(1)], &[st(CplStatus::Malformed, 0)], 0);
        assert!(r.is_err(), "{r:?}");
    }
}
