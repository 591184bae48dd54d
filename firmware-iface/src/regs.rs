//! BAR0 register map.
//!
//! BAR0 is 4 KiB of 32-bit registers. It opens with a read-only header
//! (device id, ABI version, capabilities) that the host checks before it
//! touches anything else, then the control block, the three ring blocks, the
//! interrupt moderation block and, from [`COUNTER_BASE`], 64-bit counters
//! exposed as low/high register pairs.
//!
//! Rings are in host memory; the device reaches them by DMA through the
//! IOMMU. The host owns the command-ring tail ([`CMD_DOORBELL`]) and the
//! consumer heads of the completion and event rings ([`CPL_HEAD`],
//! [`EVT_HEAD`]); the device owns [`CMD_HEAD`].

use bitflags::bitflags;

/// Size of BAR0 in bytes.
pub const BAR0_SIZE: usize = 0x1000;

/// Value of [`DEVICE_ID`]: ASCII "NSYC".
pub const DEVICE_ID_VALUE: u32 = 0x4359_534E;

/// Read-only: device identifier, [`DEVICE_ID_VALUE`].
pub const DEVICE_ID: u32 = 0x000;
/// Read-only: ABI version, major in bits 31:16, minor in bits 15:0.
pub const ABI_VERSION: u32 = 0x004;
/// Read-only: [`Capabilities`].
pub const CAPABILITIES: u32 = 0x008;
/// Read-only: hardware revision of the design (informational).
pub const HW_REVISION: u32 = 0x00C;
/// Read/write: [`Control`].
pub const CONTROL: u32 = 0x010;
/// Read-only: [`Status`].
pub const STATUS: u32 = 0x014;
/// Write-1-to-clear: [`IrqCause`] bits raised since last cleared.
pub const IRQ_STATUS: u32 = 0x018;
/// Read/write: [`IrqCause`] bits that may raise an interrupt.
pub const IRQ_MASK: u32 = 0x01C;

/// Read/write: command ring IOVA, low 32 bits (64-byte aligned).
pub const CMD_BASE_LO: u32 = 0x020;
/// Read/write: command ring IOVA, high 32 bits.
pub const CMD_BASE_HI: u32 = 0x024;
/// Read/write: log2 of the command ring's slot count.
pub const CMD_LOG2_SIZE: u32 = 0x028;
/// Write: command ring tail (the doorbell): slots before it are posted.
pub const CMD_DOORBELL: u32 = 0x02C;
/// Read-only: command ring head: the next slot the device will fetch.
pub const CMD_HEAD: u32 = 0x030;

/// Read/write: completion ring IOVA, low 32 bits (64-byte aligned).
pub const CPL_BASE_LO: u32 = 0x040;
/// Read/write: completion ring IOVA, high 32 bits.
pub const CPL_BASE_HI: u32 = 0x044;
/// Read/write: log2 of the completion ring's entry count.
pub const CPL_LOG2_SIZE: u32 = 0x048;
/// Write: completion ring head: entries before it have been consumed.
pub const CPL_HEAD: u32 = 0x04C;

/// Read/write: event ring IOVA, low 32 bits (64-byte aligned).
pub const EVT_BASE_LO: u32 = 0x050;
/// Read/write: event ring IOVA, high 32 bits.
pub const EVT_BASE_HI: u32 = 0x054;
/// Read/write: log2 of the event ring's entry count.
pub const EVT_LOG2_SIZE: u32 = 0x058;
/// Write: event ring head: entries before it have been consumed.
pub const EVT_HEAD: u32 = 0x05C;

/// Read/write before enable: requested table capacity in entries; reads
/// back the capacity the device actually provides.
pub const TABLE_CAPACITY: u32 = 0x060;
/// Read-only: the largest table capacity this device supports.
pub const TABLE_MAX_CAPACITY: u32 = 0x064;
/// Read-only: the design's core clock in MHz (used by the cost model).
pub const CLOCK_MHZ: u32 = 0x068;
/// Read-only: device time in milliseconds since reset (wraps).
pub const DEVICE_TIME_MS: u32 = 0x06C;
/// Read/write: raise a completion interrupt after this many completions.
pub const IRQ_COALESCE_COUNT: u32 = 0x070;
/// Read/write: ... or this many microseconds after the first pending one.
pub const IRQ_COALESCE_USEC: u32 = 0x074;
/// Read/write: aging scan period in milliseconds (0 disables aging).
pub const AGING_PERIOD_MS: u32 = 0x078;
/// Read-only: number of entries resident in the table.
pub const TABLE_COUNT: u32 = 0x07C;
/// Read/write: the lowest generation the device gives a change it numbers
/// itself (INSERT, UPDATE, UPSERT and DELETE without a given generation):
/// such a change gets the higher of this and one above the key's stored
/// entry or tombstone. 0 at reset: generations count from 1 per key. A
/// host raises it with time (the daemon writes the seconds since
/// 2024-01-01 every second, one more at start) so that a member that
/// restarted numbers its changes above those of its previous life, which
/// it no longer knows and which may still reach the peers late.
pub const GENERATION_FLOOR: u32 = 0x080;
/// Read/write (ABI 1.9, [`Capabilities::TABLE_HASH_SEED`]): bits 31:0 of
/// the 128-bit seed of the table hash ([`crate::hash::TableHash`]); `_1`
/// to `_3` hold bits 63:32, 95:64 and 127:96. 0 at reset. The device
/// takes the seed when ENABLE sizes its table: a table re-enabled with a
/// different seed (or capacity) starts empty, as after a reset. A host
/// writes a seed that senders of traffic cannot guess, the same on every
/// member of a cluster (so that a Full Sync arrives in the receiving
/// card's own order).
pub const TABLE_HASH_SEED_0: u32 = 0x084;
/// See [`TABLE_HASH_SEED_0`]: seed bits 63:32.
pub const TABLE_HASH_SEED_1: u32 = 0x088;
/// See [`TABLE_HASH_SEED_0`]: seed bits 95:64.
pub const TABLE_HASH_SEED_2: u32 = 0x08C;
/// See [`TABLE_HASH_SEED_0`]: seed bits 127:96.
pub const TABLE_HASH_SEED_3: u32 = 0x090;
/// The four seed registers, word 0 first.
pub const TABLE_HASH_SEED: [u32; 4] = [TABLE_HASH_SEED_0, TABLE_HASH_SEED_1, TABLE_HASH_SEED_2, TABLE_HASH_SEED_3];

/// Write-only, 64 bytes (0x0C0..0x100): the inline doorbell. The host
/// writes a copy of a batch's first descriptor here, with `aux` set to
/// [`inline_doorbell`]`(new_tail, seq)`, as one 64-byte write-combined
/// write whose first 8-byte word lands last. The device takes it as a
/// doorbell for `new_tail` and uses the copy instead of fetching that first
/// descriptor by DMA (as Mellanox BlueFlame does), saving a PCIe read round
/// trip on small batches. The ring slot must hold the same descriptor.
pub const CMD_INLINE: u32 = 0x0C0;
/// Size of the [`CMD_INLINE`] window.
pub const CMD_INLINE_SIZE: u32 = 64;

/// The `aux` word of an inline doorbell: the new command-ring tail in bits
/// 15:0 and the host's inline-doorbell sequence in bits 31:16. The
/// sequence advances by 2 for every inline doorbell and is never 0; odd
/// values (bit 16 set) are reserved: a device may use them internally to
/// mark a window write in progress, and ignores such a word.
pub const fn inline_doorbell(tail: u16, seq: u16) -> u32 {
    (seq as u32) << 16 | tail as u32
}

/// The sequence that follows `seq` (even, never 0).
pub const fn next_inline_seq(seq: u16) -> u16 {
    match seq.wrapping_add(2) & !1 {
        0 => 2,
        s => s,
    }
}

/// Peer updates the sync unit holds at most while [`Control::SYNC_HOLD`] is set.
pub const SYNC_HOLD_CAPACITY: u32 = 1 << 20;

/// First counter register. Counter `i` ([`Counter`]) is at
/// `COUNTER_BASE + 8 * i` (low 32 bits) and `+ 4` (high 32 bits). Read high,
/// low, high and retry if high changed.
pub const COUNTER_BASE: u32 = 0x100;

/// Device counters, in register order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Counter {
    /// Commands fetched from the command ring.
    CommandsFetched = 0,
    /// Completions written.
    CompletionsWritten = 1,
    /// Commands that completed with a non-success status.
    CommandErrors = 2,
    /// Commands rejected as malformed or with an unknown opcode.
    CommandsMalformed = 3,
    /// DMA accesses that fell outside every IOMMU window.
    DmaErrors = 4,
    /// Inserts refused because the table was full.
    TableFull = 5,
    /// Entries removed by aging.
    EntriesAged = 6,
    /// Events written to the event ring.
    EventsWritten = 7,
    /// Events dropped because the event ring was full.
    EventsDropped = 8,
    /// Interrupts raised.
    Interrupts = 9,
    /// Modelled core clock cycles spent on commands (cost model).
    ModelCycles = 10,
    /// Cuckoo displacements performed by inserts.
    CuckooKicks = 11,
    /// Doorbell writes received.
    Doorbells = 12,
    /// Doorbell writes with a tail outside the ring, ignored.
    BadDoorbells = 13,
    /// Inline doorbells whose descriptor copy was used (no DMA fetch).
    InlineDoorbells = 14,
    /// Inline doorbells whose copy was torn or did not match the ring head
    /// (the descriptor was fetched by DMA instead).
    InlineMisses = 15,
    /// Delta Sync: local updates sent to the peers for the first time.
    SyncUpdatesSent = 16,
    /// Delta Sync: peer updates received in order (each once).
    SyncUpdatesReceived = 17,
    /// Delta Sync: peer updates applied to the table.
    SyncUpdatesApplied = 18,
    /// Delta Sync: ranges asked for again (NACKs sent).
    SyncRetransRequestsSent = 19,
    /// Delta Sync: updates sent again in answer to peers' NACKs.
    SyncRetransUpdatesSent = 20,
    /// Delta Sync: peer updates that can no longer be recovered (each
    /// raised a RESYNC_NEEDED event).
    SyncLostUpdates = 21,
    /// Delta Sync (gauge): the sequence number the sync unit will give the
    /// next local update. A SNAPSHOT walk started after reading it holds
    /// every change numbered below it.
    SyncNextSeq = 22,
    /// Delta Sync (gauge): peer updates held while [`Control::SYNC_HOLD`] is set.
    SyncHeld = 23,
    /// Delta Sync: held updates dropped because the hold buffer was full
    /// (each overflow raised a RESYNC_NEEDED event).
    SyncHoldDrops = 24,
    /// Delta Sync: peer updates that did not fit the table.
    SyncApplyFailed = 25,
    /// Delta Sync: datagrams refused as malformed.
    SyncMalformed = 26,
    /// Delta Sync (gauge): local updates some peer has not acknowledged yet
    /// (the next number less one, less the lowest acknowledged number of any
    /// configured peer heard from within three ALIVE intervals: one silent
    /// longer is gone, and acknowledges nothing). A host about to replace
    /// its table by a peer's snapshot waits for it to drain, so that its own
    /// last changes are in the snapshot; so does one that stops.
    SyncUnacked = 27,
    /// Delta Sync (gauge): order-independent digest of the entries marked
    /// for sync (wrapping sum of a hash of key, state without its timeout,
    /// NAT and owner), kept up to date on every change. Members compare it
    /// to find divergence without walking their tables.
    SyncDigest = 28,
    /// Delta Sync (gauge): entries marked for sync.
    SyncEntries = 29,
    /// Delta Sync (gauge): updates in the retransmit queue.
    SyncQueueDepth = 30,
    /// Delta Sync: frames dropped because the transmit queue was full, and
    /// updates not buffered because a reorder buffer was full (asked for
    /// again).
    SyncQueueDrops = 31,
    /// Delta Sync: updates this member told a peer it can no longer resend
    /// (LOST answers: ClusterXL's reject notifications).
    SyncRejectsSent = 32,
    /// Sync security: sealed frames that failed authentication (bad tag,
    /// unknown key id, or an inner sender that differs from the sealed one).
    SyncAuthFailures = 33,
    /// Sync security: authentic frames dropped as replays (outside or
    /// already seen in the sender's replay window).
    SyncReplaysDropped = 34,
    /// Sync security: frames from a member id that is not a configured peer.
    SyncUnknownMember = 35,
    /// LOAD (ABI 1.6): sync records examined, whatever their status.
    LoadRecords = 36,
    /// LOAD (ABI 1.6): sync records refused as MALFORMED.
    LoadRecordsMalformed = 37,
    /// Delta Sync (ABI 1.7): updates a peer had sent before this member,
    /// joining, first followed it, and no longer had when asked (each
    /// raised RESYNC_NEEDED: the Full Sync carries them). Not counted in
    /// [`Counter::SyncLostUpdates`].
    SyncHistoryLost = 38,
    /// Delta Sync (ABI 1.8): history a joining member never asked for
    /// because a Full Sync's cut (SYNC_ALIGN) covered it.
    SyncHistoryCovered = 39,
    /// Delta Sync (ABI 1.10): local changes marked for sync that the sync
    /// unit could not send (an update the wire refuses). The peers never
    /// see them; 0 unless the design is at fault.
    SyncSubmitFailed = 40,
}

impl Counter {
    /// Every counter, in register order.
    pub const ALL: [Counter; 41] = [
        Counter::CommandsFetched,
        Counter::CompletionsWritten,
        Counter::CommandErrors,
        Counter::CommandsMalformed,
        Counter::DmaErrors,
        Counter::TableFull,
        Counter::EntriesAged,
        Counter::EventsWritten,
        Counter::EventsDropped,
        Counter::Interrupts,
        Counter::ModelCycles,
        Counter::CuckooKicks,
        Counter::Doorbells,
        Counter::BadDoorbells,
        Counter::InlineDoorbells,
        Counter::InlineMisses,
        Counter::SyncUpdatesSent,
        Counter::SyncUpdatesReceived,
        Counter::SyncUpdatesApplied,
        Counter::SyncRetransRequestsSent,
        Counter::SyncRetransUpdatesSent,
        Counter::SyncLostUpdates,
        Counter::SyncNextSeq,
        Counter::SyncHeld,
        Counter::SyncHoldDrops,
        Counter::SyncApplyFailed,
        Counter::SyncMalformed,
        Counter::SyncUnacked,
        Counter::SyncDigest,
        Counter::SyncEntries,
        Counter::SyncQueueDepth,
        Counter::SyncQueueDrops,
        Counter::SyncRejectsSent,
        Counter::SyncAuthFailures,
        Counter::SyncReplaysDropped,
        Counter::SyncUnknownMember,
        Counter::LoadRecords,
        Counter::LoadRecordsMalformed,
        Counter::SyncHistoryLost,
        Counter::SyncHistoryCovered,
        Counter::SyncSubmitFailed,
    ];

    /// Register offset of this counter's low half.
    pub const fn offset(self) -> u32 {
        COUNTER_BASE + 8 * self as u32
    }

    /// Stable snake_case name, used in reports and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::CommandsFetched => "commands_fetched",
            Counter::CompletionsWritten => "completions_written",
            Counter::CommandErrors => "command_errors",
            Counter::CommandsMalformed => "commands_malformed",
            Counter::DmaErrors => "dma_errors",
            Counter::TableFull => "table_full",
            Counter::EntriesAged => "entries_aged",
            Counter::EventsWritten => "events_written",
            Counter::EventsDropped => "events_dropped",
            Counter::Interrupts => "interrupts",
            Counter::ModelCycles => "model_cycles",
            Counter::CuckooKicks => "cuckoo_kicks",
            Counter::Doorbells => "doorbells",
            Counter::BadDoorbells => "bad_doorbells",
            Counter::InlineDoorbells => "inline_doorbells",
            Counter::InlineMisses => "inline_misses",
            Counter::SyncUpdatesSent => "sync_updates_sent",
            Counter::SyncUpdatesReceived => "sync_updates_received",
            Counter::SyncUpdatesApplied => "sync_updates_applied",
            Counter::SyncRetransRequestsSent => "sync_retrans_requests_sent",
            Counter::SyncRetransUpdatesSent => "sync_retrans_updates_sent",
            Counter::SyncLostUpdates => "sync_lost_updates",
            Counter::SyncNextSeq => "sync_next_seq",
            Counter::SyncHeld => "sync_held",
            Counter::SyncHoldDrops => "sync_hold_drops",
            Counter::SyncApplyFailed => "sync_apply_failed",
            Counter::SyncMalformed => "sync_malformed",
            Counter::SyncUnacked => "sync_unacked",
            Counter::SyncDigest => "sync_digest",
            Counter::SyncEntries => "sync_entries",
            Counter::SyncQueueDepth => "sync_queue_depth",
            Counter::SyncQueueDrops => "sync_queue_drops",
            Counter::SyncRejectsSent => "sync_rejects_sent",
            Counter::SyncAuthFailures => "sync_auth_failures",
            Counter::SyncReplaysDropped => "sync_replays_dropped",
            Counter::SyncUnknownMember => "sync_unknown_member",
            Counter::LoadRecords => "load_records",
            Counter::LoadRecordsMalformed => "load_records_malformed",
            Counter::SyncHistoryLost => "sync_history_lost",
            Counter::SyncHistoryCovered => "sync_history_covered",
            Counter::SyncSubmitFailed => "sync_submit_failed",
        }
    }
}

bitflags! {
    /// [`CAPABILITIES`] bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Capabilities: u32 {
        /// Connection table commands (INSERT, UPDATE, DELETE, LOOKUP).
        const CONN_TABLE = 1 << 0;
        /// IPv6 keys.
        const IPV6 = 1 << 1;
        /// NAT translations (chained EXT descriptors).
        const NAT = 1 << 2;
        /// Aging with AGED events.
        const AGING = 1 << 3;
        /// SNAPSHOT command.
        const SNAPSHOT = 1 << 4;
        /// Event ring.
        const EVENTS = 1 << 5;
        /// MSI-X interrupts with moderation.
        const MSIX = 1 << 6;
        /// Cost-model cycle counter ([`Counter::ModelCycles`]).
        const COST_MODEL = 1 << 7;
        /// Inline doorbell window ([`CMD_INLINE`]).
        const INLINE_DOORBELL = 1 << 8;
        /// Delta Sync unit with [`Control::SYNC_HOLD`], the sync counters
        /// and consistent SNAPSHOT walks (SNAPSHOT_TORN).
        const SYNC = 1 << 9;
        /// LOAD command (ABI 1.6): a buffer of sync records applied as
        /// REPLICA writes by one descriptor.
        const LOAD = 1 << 10;
        /// SYNC_POSITIONS and SYNC_ALIGN (ABI 1.8): a Full Sync's cut in
        /// each peer's stream, so that a joining member asks for none of
        /// the history its snapshot holds.
        const SYNC_ALIGN = 1 << 11;
        /// The table hash is [`crate::hash::TableHash`] under the seed in
        /// `TABLE_HASH_SEED_0..3` (ABI 1.9). Without it the device hashes
        /// keys its own way and ignores those registers.
        const TABLE_HASH_SEED = 1 << 12;
    }
}

bitflags! {
    /// [`CONTROL`] bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Control: u32 {
        /// Start fetching commands (rings must be programmed first).
        const ENABLE = 1 << 0;
        /// Reset the device: rings, table and counters. Self-clearing.
        const RESET = 1 << 1;
        /// Allow interrupts to be raised.
        const IRQ_ENABLE = 1 << 2;
        /// Hold peer updates: the sync unit keeps receiving (and asking for
        /// what is missing) but buffers what arrives, up to
        /// [`SYNC_HOLD_CAPACITY`] updates, instead of applying it. Clearing
        /// the bit applies the held updates in arrival order. A host sets it
        /// for the length of a Full Sync. On overflow the held updates are
        /// dropped, counted ([`Counter::SyncHoldDrops`]) and a RESYNC_NEEDED
        /// event is raised.
        const SYNC_HOLD = 1 << 3;
    }
}

bitflags! {
    /// [`STATUS`] bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Status: u32 {
        /// Out of reset and ready to be configured.
        const READY = 1 << 0;
        /// Enabled and fetching commands.
        const ENABLED = 1 << 1;
        /// A fatal error stopped the device (bad ring configuration); reset
        /// to recover.
        const FATAL = 1 << 2;
        /// At least one event was dropped because the event ring was full.
        const EVENT_OVERFLOW = 1 << 3;
    }
}

bitflags! {
    /// [`IRQ_STATUS`] / [`IRQ_MASK`] causes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct IrqCause: u32 {
        /// Completions were written.
        const COMPLETION = 1 << 0;
        /// Events were written.
        const EVENT = 1 << 1;
        /// The device became FATAL.
        const ERROR = 1 << 2;
    }
}

/// Interrupt vector used for completions.
pub const VECTOR_COMPLETION: u16 = 0;
/// Interrupt vector used for events and errors.
pub const VECTOR_EVENT: u16 = 1;
/// Number of interrupt vectors.
pub const VECTOR_COUNT: u16 = 2;

/// Smallest supported log2 ring size.
pub const MIN_LOG2_RING: u32 = 2;
/// Largest supported log2 ring size (indices travel as `u16` in completions).
pub const MAX_LOG2_RING: u32 = 15;

/// Splits an ABI version register value into (major, minor).
pub const fn split_version(v: u32) -> (u16, u16) {
    ((v >> 16) as u16, (v & 0xFFFF) as u16)
}

/// Packs (major, minor) into an ABI version register value.
pub const fn pack_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

/// A register, for documentation and tooling.
#[derive(Clone, Copy, Debug)]
pub struct RegisterInfo {
    /// Name of the constant.
    pub name: &'static str,
    /// Byte offset in BAR0.
    pub offset: u32,
    /// "RO", "RW", "WO" or "W1C".
    pub access: &'static str,
    /// One line on its meaning.
    pub summary: &'static str,
}

macro_rules! reg {
    ($name:ident, $acc:literal, $sum:literal) => {
        RegisterInfo { name: stringify!($name), offset: $name, access: $acc, summary: $sum }
    };
}

/// Every fixed register, in offset order.
pub const REGISTERS: &[RegisterInfo] = &[
    reg!(DEVICE_ID, "RO", "device identifier 0x4359534E (\"NSYC\")"),
    reg!(ABI_VERSION, "RO", "ABI major (31:16) and minor (15:0)"),
    reg!(CAPABILITIES, "RO", "capability bits"),
    reg!(HW_REVISION, "RO", "hardware revision"),
    reg!(CONTROL, "RW", "ENABLE, RESET, IRQ_ENABLE"),
    reg!(STATUS, "RO", "READY, ENABLED, FATAL, EVENT_OVERFLOW"),
    reg!(IRQ_STATUS, "W1C", "interrupt causes raised"),
    reg!(IRQ_MASK, "RW", "interrupt causes enabled"),
    reg!(CMD_BASE_LO, "RW", "command ring IOVA, low"),
    reg!(CMD_BASE_HI, "RW", "command ring IOVA, high"),
    reg!(CMD_LOG2_SIZE, "RW", "command ring log2 slot count"),
    reg!(CMD_DOORBELL, "WO", "command ring tail (doorbell)"),
    reg!(CMD_HEAD, "RO", "command ring head"),
    reg!(CPL_BASE_LO, "RW", "completion ring IOVA, low"),
    reg!(CPL_BASE_HI, "RW", "completion ring IOVA, high"),
    reg!(CPL_LOG2_SIZE, "RW", "completion ring log2 entry count"),
    reg!(CPL_HEAD, "WO", "completion ring consumer head"),
    reg!(EVT_BASE_LO, "RW", "event ring IOVA, low"),
    reg!(EVT_BASE_HI, "RW", "event ring IOVA, high"),
    reg!(EVT_LOG2_SIZE, "RW", "event ring log2 entry count"),
    reg!(EVT_HEAD, "WO", "event ring consumer head"),
    reg!(TABLE_CAPACITY, "RW", "requested / provided table capacity"),
    reg!(TABLE_MAX_CAPACITY, "RO", "largest supported capacity"),
    reg!(CLOCK_MHZ, "RO", "core clock in MHz"),
    reg!(DEVICE_TIME_MS, "RO", "device time in ms since power-on (RESET does not restart it)"),
    reg!(IRQ_COALESCE_COUNT, "RW", "completions per interrupt"),
    reg!(IRQ_COALESCE_USEC, "RW", "interrupt holdoff in µs"),
    reg!(AGING_PERIOD_MS, "RW", "aging scan period in ms, 0 = off"),
    reg!(TABLE_COUNT, "RO", "entries resident"),
    reg!(GENERATION_FLOOR, "RW", "lowest generation of a change the device numbers itself (0 = count from 1)"),
    reg!(TABLE_HASH_SEED_0, "RW", "table hash seed, bits 31:0 (taken when ENABLE sizes the table)"),
    reg!(TABLE_HASH_SEED_1, "RW", "table hash seed, bits 63:32"),
    reg!(TABLE_HASH_SEED_2, "RW", "table hash seed, bits 95:64"),
    reg!(TABLE_HASH_SEED_3, "RW", "table hash seed, bits 127:96"),
    reg!(CMD_INLINE, "WO", "inline doorbell: 64-byte copy of a batch's first descriptor, word 0 last"),
];

const _: () = {
    assert!(COUNTER_BASE as usize + 8 * Counter::ALL.len() <= BAR0_SIZE);
    let mut i = 1;
    while i < REGISTERS.len() {
        assert!(REGISTERS[i - 1].offset < REGISTERS[i].offset);
        assert!(REGISTERS[i].offset < COUNTER_BASE);
        i += 1;
    }
    assert!(CMD_INLINE % 64 == 0 && CMD_INLINE + CMD_INLINE_SIZE <= COUNTER_BASE);
    let mut c = 0;
    while c < Counter::ALL.len() {
        assert!(Counter::ALL[c] as usize == c);
        c += 1;
    }
};
