//! The NIC-resident connection table: a bucketized cuckoo hash.
//!
//! Card memory holds `buckets × 8` fixed-size slots. Every key has two
//! candidate buckets (two hash functions); a lookup reads both buckets (one
//! wide burst each) and compares an 8-bit fingerprint before the full key,
//! as a hardware pipeline would. An insert into two full buckets moves
//! residents to their alternate bucket along the shortest path found by a
//! bounded breadth-first search (the kick-out FSM); if none exists the entry
//! goes to a small fully associative stash (a CAM), and when that is full
//! the insert answers TABLE_FULL. Capacity is fixed at reset; the bucket
//! count is sized for a load factor of at most [`TARGET_LOAD`].

use nicsync_fwif::conn::{ConnKey, ConnState, Nat};
use nicsync_fwif::hash::TableHash;

/// Slots per bucket.
pub const WAYS: usize = 8;
/// Largest fraction of slots used when the table holds `capacity` entries.
pub const TARGET_LOAD: f64 = 0.95;
/// Entries in the overflow stash.
pub const STASH_SIZE: usize = 16;
/// Bucket reads the kick-out search may spend per insert.
pub const MAX_SEARCH_BUCKETS: usize = 128;

/// One stored connection (96 bytes with padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Slot {
    /// Key.
    pub key: ConnKey,
    /// State (timeout_s as last written).
    pub state: ConnState,
    /// NAT translation.
    pub nat: Nat,
    /// Absolute expiry in device milliseconds; 0 never expires.
    pub expires_ms: u64,
    /// Cluster member that made the last change (conflict resolution).
    pub owner: u16,
}

const EMPTY_SLOT: Slot = Slot { key: ZERO_KEY, state: ZERO_STATE, nat: ZERO_NAT, expires_ms: 0, owner: 0 };
const ZERO_KEY: ConnKey = zero_key();
const ZERO_STATE: ConnState = zero_state();
const ZERO_NAT: Nat = zero_nat();

const fn zero_key() -> ConnKey {
    ConnKey {
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: zerocopy::little_endian::U16::ZERO,
        dst_port: zerocopy::little_endian::U16::ZERO,
        proto: 0,
        family: 0,
        zone: zerocopy::little_endian::U16::ZERO,
    }
}
const fn zero_state() -> ConnState {
    ConnState {
        tcp_state: 0,
        direction: 0,
        flags: zerocopy::little_endian::U16::ZERO,
        timeout_s: zerocopy::little_endian::U32::ZERO,
        mark: zerocopy::little_endian::U32::ZERO,
        generation: zerocopy::little_endian::U32::ZERO,
    }
}
const fn zero_nat() -> Nat {
    Nat { addr: [0; 16], port: zerocopy::little_endian::U16::ZERO, kind: 0, family: 0, reserved: [0; 4] }
}

/// A key's two candidate buckets and its fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// First candidate bucket.
    pub b1: usize,
    /// Second candidate bucket.
    pub b2: usize,
    /// Fingerprint (never 0, which marks a free way).
    pub fp: u8,
    /// The key's hash ([`CuckooTable::hash_of`]), which the card's other keyed
    /// structures (its tombstones) index by too: one hash per command.
    pub hash: u64,
}

/// Where an entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Slot index in the bucket array (`bucket * WAYS + way`).
    Slot(usize),
    /// Stash index.
    Stash(usize),
}

/// Outcome of an insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The key is present.
    Exists(Location),
    /// No room: capacity reached, or no kick-out path and the stash is full.
    Full,
}

/// Memory traffic of one operation, for the cost model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bucket reads.
    pub bucket_reads: u32,
    /// Slot writes.
    pub slot_writes: u32,
    /// Cuckoo displacements.
    pub kicks: u32,
}

/// The table.
pub struct CuckooTable {
    slots: Vec<Slot>,
    /// Per slot: 0 = empty, else the key's fingerprint (never 0).
    fps: Vec<u8>,
    stash: Vec<(u8, Slot)>,
    buckets: usize,
    capacity: usize,
    len: usize,
    /// Scratch for the kick-out search: (bucket, parent node, way taken).
    bfs: Vec<(usize, usize, usize)>,
    /// The snapshot walk in progress, if any (see [`SnapshotWalk`]).
    walk: Option<SnapshotWalk>,
    /// The key hash, seeded as the host asked (ABI 1.9).
    hash: TableHash,
}

/// Its shape and fill only: the slots of a large table are hundreds of
/// megabytes, and free ones keep what they last held (see `clear`).
impl std::fmt::Debug for CuckooTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CuckooTable")
            .field("capacity", &self.capacity)
            .field("buckets", &self.buckets)
            .field("len", &self.len)
            .field("stash", &self.stash.len())
            .field("walk", &self.walk)
            .finish()
    }
}

/// Entries a snapshot walk can carry (see [`SnapshotWalk`]).
pub const WALK_CARRY_CAPACITY: usize = 4096;

/// A snapshot walk in progress, which keeps the walk consistent while the
/// table changes under it.
///
/// A walk visits positions in order (bucket slots, then the stash). Inserts,
/// updates and deletes during the walk are the sync stream's business (they
/// come after the snapshot's sequence number), but a *move* of an
/// unchanged entry (a cuckoo kick-out, a stash refill, a stash compaction)
/// from a position not yet walked to one already walked would hide it from
/// the walk. Such entries are copied into a small carry FIFO that the next
/// chunk emits first, as a hardware walker would with a move-log FIFO. A
/// move the other way at worst shows an entry twice, which a reader that
/// upserts does not mind. If the FIFO overflows the walk is *torn* and must
/// start again.
#[derive(Debug, Default)]
pub struct SnapshotWalk {
    /// Positions below this have been walked.
    pub walked: usize,
    /// Entries moved behind the walk, to emit next.
    pub carry: Vec<Slot>,
    /// The carry overflowed: the walk is no longer consistent.
    pub torn: bool,
}

/// Word-wise key comparison (the derived array equality calls memcmp).
#[inline]
fn same_key(a: &[u64; 5], b: &[u64; 5]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
}

/// A mask with the high bit of byte `i` set where `fps[i] == fp`.
#[inline]
fn fp_matches(fps: &[u8], fp: u8) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&fps[..8]);
    let x = u64::from_le_bytes(b) ^ (fp as u64 * 0x0101_0101_0101_0101);
    // Exact zero-byte detection (no false positives across bytes).
    let y = (x & 0x7F7F_7F7F_7F7F_7F7F).wrapping_add(0x7F7F_7F7F_7F7F_7F7F);
    !(y | x | 0x7F7F_7F7F_7F7F_7F7F)
}

/// The two candidate buckets and the fingerprint of a hash.
#[inline]
fn placement(h: u64, buckets: usize) -> Placement {
    // The first bucket in the ABI's order (`TableHash::order`): a walk of
    // the buckets meets keys in the order of their hashes' low words.
    let b1 = TableHash::order(h, buckets);
    // The second from the high word, scaled the same way.
    let mut b2 = TableHash::order((h >> 32) ^ 0x5bd1_e995, buckets);
    if b2 == b1 {
        b2 = (b1 + 1) % buckets;
    }
    // The fingerprint comes from the hash's lowest byte, which neither
    // bucket index depends on: `TableHash::order` takes a bucket from the
    // high bits of its 32-bit input, so bits 24-31 (the fingerprint before) were all
    // but the same for every key whose first bucket is b1, and a lookup
    // compared the full key of nearly every way it held (a cache miss per
    // compare in a large table). 0 means empty, so it maps to 1.
    let fp = (h as u8).max(1);
    Placement { b1, b2, fp, hash: h }
}

/// `n` copies of `fill`, every page resident (as a card's memory is: a page
/// first written by a command would charge that command the fault), on
/// transparent huge pages where the kernel grants them.
///
/// Card memory has no TLB; with 4 KiB pages nearly every access to a large
/// table also walked the page tables, which the model's command pipeline
/// showed as prefetches stalled on their translation (15 % of the device
/// thread during `bench sync`'s sustained churn over a 1 M-entry card).
/// Huge pages: sustained churn +6-9 % (4 alternating pairs each), and a 4
/// M-entry card comes up in 60 ms instead of 170. The exception is memory
/// the hypervisor has not backed yet (the first run after boot), where the
/// kernel zeroes each 2 MiB page as the hypervisor faults it in: 0.45-0.55 s
/// instead of 0.18. The advice is given before the fill, which writes every
/// page: advice after it would find the pages already 4 KiB.
fn card_memory<T: Copy>(n: usize, fill: T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    crate::sys::advise_huge_pages(v.spare_capacity_mut());
    v.resize(n, fill);
    crate::sys::make_resident(&mut v);
    v
}

/// How far ahead of the key it applies a pipeline reads a key's buckets
/// ([`CuckooTable::prefetch_step`]), and its matching slot.
pub const PIPELINE_BUCKETS_AHEAD: usize = 8;
/// See [`PIPELINE_BUCKETS_AHEAD`].
pub const PIPELINE_SLOTS_AHEAD: usize = 4;

impl CuckooTable {
    /// A table for `capacity` entries (at least 1), placing keys by `hash`.
    pub fn new(capacity: usize, hash: TableHash) -> Self {
        let capacity = capacity.max(1);
        let slots_needed = (capacity as f64 / TARGET_LOAD).ceil() as usize;
        let buckets = slots_needed.div_ceil(WAYS).max(2);
        CuckooTable {
            slots: card_memory(buckets * WAYS, EMPTY_SLOT),
            fps: card_memory(buckets * WAYS, 0),
            stash: Vec::with_capacity(STASH_SIZE),
            buckets,
            capacity,
            len: 0,
            bfs: Vec::with_capacity(MAX_SEARCH_BUCKETS * WAYS),
            walk: None,
            hash,
        }
    }

    /// Starts a snapshot walk (dropping any walk in progress).
    pub fn begin_walk(&mut self) {
        self.walk = Some(SnapshotWalk::default());
    }

    /// The walk in progress.
    pub fn walk_mut(&mut self) -> Option<&mut SnapshotWalk> {
        self.walk.as_mut()
    }

    /// Ends the walk in progress.
    pub fn end_walk(&mut self) -> Option<SnapshotWalk> {
        self.walk.take()
    }

    /// Records that the entry now at position `to` came from `from`.
    #[inline]
    fn note_move(&mut self, from: usize, to: usize) {
        let Some(w) = &mut self.walk else { return };
        if from >= w.walked && to < w.walked {
            if w.carry.len() < WALK_CARRY_CAPACITY {
                let s = if to < self.slots.len() { self.slots[to] } else { self.stash[to - self.slots.len()].1 };
                w.carry.push(s);
            } else {
                w.torn = true;
            }
        }
    }

    /// Removes stash entry `i`, moving the last one into its place.
    fn stash_take(&mut self, i: usize) -> (u8, Slot) {
        let last = self.slots.len() + self.stash.len() - 1;
        let out = self.stash.swap_remove(i);
        if i < self.stash.len() {
            self.note_move(last, self.slots.len() + i);
        }
        out
    }

    /// Entries the table accepts.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries resident.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no entry is resident.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key hash it places keys by.
    pub fn hash(&self) -> &TableHash {
        &self.hash
    }

    /// The hash of `key` (which the card's tombstones also index by).
    #[inline]
    pub fn hash_of(&self, key: &ConnKey) -> u64 {
        self.hash.hash(key)
    }

    /// Bucket count.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Slot positions a snapshot cursor walks (bucket slots, then stash).
    pub fn cursor_end(&self) -> usize {
        self.slots.len() + STASH_SIZE
    }

    /// Bytes of card memory the table occupies (slots, fingerprints, stash).
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * (std::mem::size_of::<Slot>() + 1) + STASH_SIZE * (std::mem::size_of::<Slot>() + 1)
    }

    /// Stage 1 of a pipelined lookup: loads both candidate buckets'
    /// fingerprints (the model's stand-in for a memory read issued ahead of
    /// use; the values are discarded).
    #[inline]
    pub fn prefetch_buckets(&self, Placement { b1, b2, .. }: Placement) {
        if let (Some(a), Some(b)) = (self.fps.get(b1 * WAYS), self.fps.get(b2 * WAYS)) {
            crate::sys::prefetch(a);
            crate::sys::prefetch(b);
        }
    }

    /// Stage 2: loads both cache lines of the slot whose fingerprint
    /// matches, so the key compare and the state write at execution hit.
    #[inline]
    pub fn prefetch_slots(&self, Placement { b1, b2, fp, .. }: Placement) {
        for b in [b1, b2] {
            let m = fp_matches(&self.fps[b * WAYS..(b + 1) * WAYS], fp);
            if m != 0 {
                self.prefetch_slot(b * WAYS + (m.trailing_zeros() / 8) as usize);
                return;
            }
        }
        // No fingerprint matches: most likely a new key, which an insert
        // writes into the first free way of its first bucket (see
        // `insert_at`); that slot is loaded now so the write does not wait
        // for memory.
        if let Some(w) = self.free_way(b1) {
            self.prefetch_slot(b1 * WAYS + w);
        }
    }

    /// Starts a software pipeline over keys placed in order (`None`: not a
    /// table access): the first [`PIPELINE_BUCKETS_AHEAD`] keys' buckets.
    pub fn prefetch_start(&self, placed: &[Option<Placement>]) {
        for p in placed.iter().take(PIPELINE_BUCKETS_AHEAD).flatten() {
            self.prefetch_buckets(*p);
        }
    }

    /// One step of that pipeline, before key `i` is applied: the buckets of
    /// the key [`PIPELINE_BUCKETS_AHEAD`] on, and the slot of the one
    /// [`PIPELINE_SLOTS_AHEAD`] on (its buckets fetched by then), so that
    /// key `i`'s reads have arrived (LOAD and the peer updates of a frame).
    #[inline]
    pub fn prefetch_step(&self, placed: &[Option<Placement>], i: usize) {
        if let Some(Some(p)) = placed.get(i + PIPELINE_BUCKETS_AHEAD) {
            self.prefetch_buckets(*p);
        }
        if let Some(Some(p)) = placed.get(i + PIPELINE_SLOTS_AHEAD) {
            self.prefetch_slots(*p);
        }
    }

    /// Both cache lines of slot `i`.
    #[inline]
    fn prefetch_slot(&self, i: usize) {
        if let Some(s) = self.slots.get(i) {
            crate::sys::prefetch(&s.key);
            crate::sys::prefetch(&s.expires_ms);
        }
    }

    /// Finds `key`.
    #[inline]
    pub fn find(&self, key: &ConnKey, t: &mut Traffic) -> Option<Location> {
        let Placement { b1, b2, fp, .. } = placement(self.hash_of(key), self.buckets);
        self.find_placed(key, b1, b2, fp, t)
    }

    /// The placement of `key` (no memory access).
    #[inline]
    pub fn placement_of(&self, key: &ConnKey) -> Placement {
        placement(self.hash_of(key), self.buckets)
    }

    /// Finds `key` at a placement computed earlier by
    /// [`CuckooTable::prefetch_buckets`] for this same key (the pipelined
    /// path: the hash is computed once per command).
    #[inline]
    pub fn find_at(&self, key: &ConnKey, Placement { b1, b2, fp, .. }: Placement, t: &mut Traffic) -> Option<Location> {
        self.find_placed(key, b1, b2, fp, t)
    }

    #[inline]
    fn find_placed(&self, key: &ConnKey, b1: usize, b2: usize, fp: u8, t: &mut Traffic) -> Option<Location> {
        // 0 marks a free slot, whose contents are stale: no key has it.
        if fp == 0 {
            return None;
        }
        let want = key.words();
        for b in [b1, b2] {
            t.bucket_reads += 1;
            let base = b * WAYS;
            // Compare all eight fingerprints at once (SWAR), as the
            // hardware compares a bucket's ways in parallel.
            let mut m = fp_matches(&self.fps[base..base + WAYS], fp);
            while m != 0 {
                let w = (m.trailing_zeros() / 8) as usize;
                if same_key(&self.slots[base + w].key.words(), &want) {
                    return Some(Location::Slot(base + w));
                }
                m &= m - 1;
            }
        }
        if !self.stash.is_empty() {
            return self.stash.iter().position(|(f, s)| *f == fp && s.key == *key).map(Location::Stash);
        }
        None
    }

    /// The entry at `loc`.
    pub fn get(&self, loc: Location) -> Option<&Slot> {
        match loc {
            Location::Slot(i) => (self.fps.get(i).copied().unwrap_or(0) != 0).then(|| &self.slots[i]),
            Location::Stash(i) => self.stash.get(i).map(|(_, s)| s),
        }
    }

    /// The entry at `loc`, mutably.
    pub fn get_mut(&mut self, loc: Location) -> Option<&mut Slot> {
        match loc {
            Location::Slot(i) => {
                if self.fps.get(i).copied().unwrap_or(0) != 0 {
                    self.slots.get_mut(i)
                } else {
                    None
                }
            }
            Location::Stash(i) => self.stash.get_mut(i).map(|(_, s)| s),
        }
    }

    /// Inserts a new entry.
    pub fn insert(&mut self, slot: Slot, t: &mut Traffic) -> Result<Location, InsertError> {
        self.insert_at(slot, None, t)
    }

    /// Inserts a new entry whose placement may have been computed already
    /// (by [`CuckooTable::prefetch_buckets`] for this same key).
    pub fn insert_at(&mut self, slot: Slot, at: Option<Placement>, t: &mut Traffic) -> Result<Location, InsertError> {
        let Placement { b1, b2, fp, .. } = at.unwrap_or_else(|| placement(self.hash_of(&slot.key), self.buckets));
        if let Some(loc) = self.find_placed(&slot.key, b1, b2, fp, t) {
            return Err(InsertError::Exists(loc));
        }
        if self.len >= self.capacity {
            return Err(InsertError::Full);
        }
        for b in [b1, b2] {
            if let Some(w) = self.free_way(b) {
                return Ok(self.place(b * WAYS + w, fp, slot, t));
            }
        }
        if let Some(i) = self.kick_out(b1, b2, t) {
            return Ok(self.place(i, fp, slot, t));
        }
        if self.stash.len() < STASH_SIZE {
            self.stash.push((fp, slot));
            self.len += 1;
            t.slot_writes += 1;
            return Ok(Location::Stash(self.stash.len() - 1));
        }
        Err(InsertError::Full)
    }

    fn place(&mut self, i: usize, fp: u8, slot: Slot, t: &mut Traffic) -> Location {
        self.slots[i] = slot;
        self.fps[i] = fp;
        self.len += 1;
        t.slot_writes += 1;
        Location::Slot(i)
    }

    fn free_way(&self, b: usize) -> Option<usize> {
        self.fps[b * WAYS..(b + 1) * WAYS].iter().position(|f| *f == 0)
    }

    /// Breadth-first search for a chain of moves that frees a slot in `b1`
    /// or `b2`; performs the moves and returns the freed slot index.
    fn kick_out(&mut self, b1: usize, b2: usize, t: &mut Traffic) -> Option<usize> {
        const ROOT: usize = usize::MAX;
        self.bfs.clear();
        self.bfs.push((b1, ROOT, 0));
        self.bfs.push((b2, ROOT, 0));
        let mut head = 0;
        let mut found = None;
        'search: while head < self.bfs.len() && head < MAX_SEARCH_BUCKETS {
            let (b, _, _) = self.bfs[head];
            t.bucket_reads += 1;
            for w in 0..WAYS {
                let i = b * WAYS + w;
                let Placement { b1: a1, b2: a2, .. } = placement(self.hash_of(&self.slots[i].key), self.buckets);
                let alt = if a1 == b { a2 } else { a1 };
                if let Some(fw) = self.free_way(alt) {
                    found = Some((head, w, alt * WAYS + fw));
                    break 'search;
                }
                if self.bfs.len() < MAX_SEARCH_BUCKETS * WAYS {
                    self.bfs.push((alt, head, w));
                }
            }
            head += 1;
        }
        let (mut node, mut way, mut dest) = found?;
        // Walk back to the root, moving each resident one step.
        loop {
            let (b, parent, parent_way) = self.bfs[node];
            let src = b * WAYS + way;
            self.slots[dest] = self.slots[src];
            self.fps[dest] = self.fps[src];
            self.fps[src] = 0;
            self.note_move(src, dest);
            t.kicks += 1;
            t.slot_writes += 1;
            if parent == ROOT {
                return Some(src);
            }
            dest = src;
            node = parent;
            way = parent_way;
        }
    }

    /// Removes the entry at `loc`, returning it.
    pub fn remove(&mut self, loc: Location, t: &mut Traffic) -> Option<Slot> {
        t.slot_writes += 1;
        match loc {
            Location::Slot(i) if self.fps.get(i).copied().unwrap_or(0) != 0 => {
                self.fps[i] = 0;
                self.len -= 1;
                // Its fingerprint cleared, the slot is free: its contents
                // are never read again (see `clear`).
                let s = self.slots[i];
                self.refill_from_stash(i / WAYS, None);
                Some(s)
            }
            Location::Stash(i) if i < self.stash.len() => {
                self.len -= 1;
                Some(self.stash_take(i).1)
            }
            _ => None,
        }
    }

    /// A slot freed in bucket `b` takes back a stashed entry that belongs
    /// there, so the stash drains as the table empties. During an aging
    /// sweep (`live_at`), only an entry still live then moves: an expired
    /// one stays in the stash, which the same sweep visits at its end.
    fn refill_from_stash(&mut self, b: usize, live_at: Option<u64>) {
        let (buckets, hash) = (self.buckets, self.hash);
        let pos = self.stash.iter().position(|(_, s)| {
            let Placement { b1: a1, b2: a2, .. } = placement(hash.hash(&s.key), buckets);
            let live = live_at.is_none_or(|now| s.expires_ms == 0 || s.expires_ms > now);
            (a1 == b || a2 == b) && live
        });
        if let (Some(p), Some(w)) = (pos, self.free_way(b)) {
            let from = self.slots.len() + p;
            let (fp, s) = self.stash_take(p);
            self.slots[b * WAYS + w] = s;
            self.fps[b * WAYS + w] = fp;
            self.note_move(from, b * WAYS + w);
        }
    }

    /// Removes every entry: clears the fingerprints only (a slot whose
    /// fingerprint is 0 is free, and nothing reads a free slot's contents),
    /// as a design clears the tag RAM beside its table memory. Rewriting
    /// every slot of a 4 M-entry table took tens of milliseconds of a
    /// joining member's Full Sync, which empties the table first.
    pub fn clear(&mut self) {
        self.fps.fill(0);
        self.stash.clear();
        self.len = 0;
    }

    /// The entry at snapshot position `pos` (bucket slots first, then the
    /// stash), if occupied.
    pub fn at_cursor(&self, pos: usize) -> Option<&Slot> {
        if pos < self.slots.len() {
            (self.fps[pos] != 0).then(|| &self.slots[pos])
        } else {
            self.stash.get(pos - self.slots.len()).map(|(_, s)| s)
        }
    }

    /// Removes entries of buckets `[from, to)` (and, when `to` is the
    /// bucket count, the stash) that expired at or before `now_ms`; calls
    /// `on_expired` for each.
    pub fn expire_range(&mut self, from: usize, to: usize, now_ms: u64, mut on_expired: impl FnMut(&Slot)) -> usize {
        let mut n = 0;
        let expired = |s: &Slot| s.expires_ms != 0 && s.expires_ms <= now_ms;
        for i in from * WAYS..to.min(self.buckets) * WAYS {
            if self.fps[i] != 0 && expired(&self.slots[i]) {
                on_expired(&self.slots[i]);
                self.fps[i] = 0;
                self.len -= 1;
                n += 1;
                self.refill_from_stash(i / WAYS, Some(now_ms));
            }
        }
        if to >= self.buckets {
            let mut i = 0;
            while i < self.stash.len() {
                if expired(&self.stash[i].1) {
                    on_expired(&self.stash[i].1);
                    self.stash_take(i);
                    self.len -= 1;
                    n += 1;
                } else {
                    i += 1;
                }
            }
        }
        n
    }

    /// Entries currently in the stash.
    pub fn stash_len(&self) -> usize {
        self.stash.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    fn key(i: u32) -> ConnKey {
        ConnKey::v4(Ipv4Addr::from(0x0a00_0000 | i), (i % 60000) as u16, Ipv4Addr::new(192, 0, 2, 1), 443, 6, 0)
    }

    fn slot(i: u32) -> Slot {
        Slot { key: key(i), state: ConnState::default(), nat: Nat::default(), expires_ms: 0, owner: 0 }
    }

    #[test]
    fn card_memory_fills_every_element() {
        // Large enough for the huge-page advice (8 MiB), not a whole number
        // of huge pages: every element, the tail's included, holds the fill.
        let n = (9 << 20) / std::mem::size_of::<Slot>() + 3;
        let m = card_memory(n, slot(7));
        assert_eq!(m.len(), n);
        assert!(m.iter().all(|s| s.key == key(7)));
    }

    #[test]
    fn fills_to_capacity_then_refuses() {
        let cap = 20_000;
        let mut t = CuckooTable::new(cap, TableHash::default());
        let mut tr = Traffic::default();
        for i in 0..cap as u32 {
            assert!(t.insert(slot(i), &mut tr).is_ok(), "insert {i} failed at len {}", t.len());
        }
        assert_eq!(t.len(), cap);
        assert_eq!(t.insert(slot(cap as u32 + 1), &mut tr), Err(InsertError::Full));
        for i in 0..cap as u32 {
            assert!(t.find(&key(i), &mut tr).is_some(), "lost {i}");
        }
        assert!(matches!(t.insert(slot(7), &mut tr), Err(InsertError::Exists(_))));
    }

    #[test]
    fn remove_and_reinsert() {
        let mut t = CuckooTable::new(1000, TableHash::default());
        let mut tr = Traffic::default();
        for i in 0..1000 {
            assert!(t.insert(slot(i), &mut tr).is_ok());
        }
        for i in (0..1000).step_by(2) {
            let loc = t.find(&key(i), &mut tr);
            assert!(loc.is_some_and(|l| t.remove(l, &mut tr).is_some()));
        }
        assert_eq!(t.len(), 500);
        for i in 0..1000 {
            assert_eq!(t.find(&key(i), &mut tr).is_some(), i % 2 == 1);
        }
        for i in (0..1000).step_by(2) {
            assert!(t.insert(slot(i), &mut tr).is_ok());
        }
        assert_eq!(t.len(), 1000);
    }

    #[test]
    fn expiry_scans_ranges() {
        let mut t = CuckooTable::new(100, TableHash::default());
        let mut tr = Traffic::default();
        for i in 0..100 {
            let mut s = slot(i);
            s.expires_ms = if i < 40 { 1000 } else { 0 };
            assert!(t.insert(s, &mut tr).is_ok());
        }
        let mut seen = 0;
        let b = t.buckets();
        assert_eq!(t.expire_range(0, b, 999, |_| seen += 1), 0);
        assert_eq!(t.expire_range(0, b / 2, 1000, |_| seen += 1) + t.expire_range(b / 2, b, 1000, |_| seen += 1), 40);
        assert_eq!(seen, 40);
        assert_eq!(t.len(), 60);
    }

    #[test]
    fn fingerprint_match_mask_is_exact() {
        let fps = [3u8, 0, 3, 0x83, 1, 3, 255, 0];
        let m = fp_matches(&fps, 3);
        let ways: Vec<u32> = (0..8).filter(|i| m & (0x80 << (8 * i)) != 0).collect();
        assert_eq!(ways, vec![0, 2, 5]);
        assert_eq!(fp_matches(&[0; 8], 1), 0);
        assert_eq!(fp_matches(&[255; 8], 255).count_ones(), 8);
    }

    #[test]
    fn fingerprints_do_not_follow_the_bucket() {
        // Keys that share a first bucket must still tell each other apart
        // by fingerprint, or every lookup compares full keys. With 255
        // values, two such keys share one about 0.4 % of the time.
        for buckets in [64usize, 1 << 17, 1 << 19] {
            let mut by_bucket: HashMap<usize, Vec<u8>> = HashMap::new();
            for i in 0..200_000 {
                let Placement { b1, fp, .. } = placement(TableHash::default().hash(&key(i)), buckets);
                by_bucket.entry(b1).or_default().push(fp);
            }
            let (mut same, mut pairs) = (0u64, 0u64);
            for fps in by_bucket.values() {
                for (j, a) in fps.iter().enumerate().take(16) {
                    for b in &fps[j + 1..fps.len().min(16)] {
                        pairs += 1;
                        same += u64::from(a == b);
                    }
                }
            }
            let rate = same as f64 / pairs as f64;
            assert!(rate < 0.01, "{buckets} buckets: {:.1} % of same-bucket pairs share a fingerprint", rate * 100.0);
        }
    }

    #[test]
    fn million_entries_fit_in_128_bytes_each() {
        let t = CuckooTable::new(1_000_000, TableHash::default());
        let per_entry = t.memory_bytes() as f64 / 1_000_000.0;
        assert!(per_entry <= 128.0, "{per_entry} bytes per entry");
        assert_eq!(std::mem::size_of::<Slot>(), 96);
    }
}
