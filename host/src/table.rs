//! The connection-table API: insert, update, delete, lookup, batches and
//! snapshot iteration over the NIC-resident table.

use nicsync_fwif::cmd::{CommandDescriptor, ConnOp, DescFlags, Opcode, SNAPSHOT_DONE};
use nicsync_fwif::conn::{ConnKey, ConnRecord, ConnState, Nat};
use nicsync_fwif::cpl::{Completion, CplStatus};
use nicsync_fwif::sync::{DeltaRecord, DeltaUpdate, RECORD_SIZE};
use nicsync_vfio::{DmaBuffer, NicDevice};
use zerocopy::FromBytes;

use crate::driver::{Driver, DriverConfig, DriverError};

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

/// Size of the host buffer that receives a SNAPSHOT chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The NIC-resident connection table.
pub struct ConnTable<D: NicDevice> {
    drv: Driver<D>,
    auto_generation: bool,
    snap_buf: Option<DmaBuffer>,
    snap_bytes: usize,
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
        ConnTable { drv, auto_generation: true, snap_buf: None, snap_bytes: SNAPSHOT_CHUNK_BYTES }
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

    /// Entries resident on the card.
    pub fn len(&self) -> usize {
        self.drv.table_count() as usize
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
        let c = self.drv.execute(&d, None)?;
        status_result(&c)
    }

    /// Runs a batch: every operation is posted, with one doorbell per
    /// ring-full, and the results come back in order.
    pub fn batch(&mut self, ops: &[TableOp]) -> Result<Vec<Result<u32, TableError>>, DriverError> {
        let mut results: Vec<Option<Result<u32, TableError>>> = (0..ops.len()).map(|_| None).collect();
        let mut tags: std::collections::VecDeque<(u16, usize)> = std::collections::VecDeque::new();
        let mut next = 0;
        while next < ops.len() || !tags.is_empty() {
            while next < ops.len() {
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
                        self.wait_for_free_slot()?;
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

    fn wait_for_free_slot(&mut self) -> Result<(), DriverError> {
        let start = std::time::Instant::now();
        loop {
            self.drv.reap();
            if self.drv.free_slots() > 0 {
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
    fn snapshot_raw(&mut self, cursor: u32, sync: bool, size: usize) -> Result<(u32, Vec<u8>), TableError> {
        if self.snap_buf.is_none() {
            self.snap_buf = Some(self.drv.device().alloc_dma(self.snap_bytes).map_err(DriverError::from)?);
        }
        let (iova, len) = match &self.snap_buf {
            Some(b) => (b.iova(), b.len().min(u32::MAX as usize) as u32),
            None => return Err(TableError::Refused(CplStatus::Internal)),
        };
        let d = if sync {
            CommandDescriptor::snapshot_sync_records(0, iova, len, cursor)
        } else {
            CommandDescriptor::snapshot(0, iova, len, cursor)
        };
        let c = self.drv.execute(&d, None)?;
        let r = status_result(&c)?;
        let count = (r & 0xFFFF_FFFF) as usize;
        let next = (r >> 32) as u32;
        if count * size > len as usize {
            return Err(TableError::BadRecord(format!("device claims {count} records in a {len}-byte buffer")));
        }
        if next != SNAPSHOT_DONE && next <= cursor {
            return Err(TableError::BadRecord(format!("snapshot cursor went from {cursor} to {next}")));
        }
        let mut raw = vec![0u8; count * size];
        if let Some(b) = &self.snap_buf {
            b.mem().read(0, &mut raw).map_err(DriverError::from)?;
        }
        Ok((next, raw))
    }

    fn snapshot_chunk(&mut self, cursor: u32, out: &mut Vec<ConnRecord>) -> Result<u32, TableError> {
        let (next, raw) = self.snapshot_raw(cursor, false, ConnRecord::SIZE)?;
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
        let (next, raw) = self.snapshot_raw(cursor, true, RECORD_SIZE)?;
        out.reserve(raw.len() / RECORD_SIZE);
        for chunk in raw.chunks_exact(RECORD_SIZE) {
            let rec = DeltaRecord::read_from_bytes(chunk).unwrap_or_default();
            let u = rec.decode().map_err(|e| TableError::BadRecord(e.to_string()))?;
            if u.owner == 0 {
                return Err(TableError::BadRecord(format!("snapshot sync record {:?} without an owner", u.op)));
            }
            out.push(u);
        }
        Ok(next)
    }
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
            match self.table.snapshot_chunk(self.cursor, &mut chunk) {
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
