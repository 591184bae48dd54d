//! The ring driver: bring-up, command submission with one doorbell per
//! batch, completions by phase bit (polling or interrupt), events.
//!
//! Nothing the device writes is trusted: every completion is decoded and
//! checked (known status and opcode, a tag that is in flight, an opcode
//! that matches what was posted), and a bad one is counted and skipped, so
//! a faulty device cannot make the driver index out of bounds, complete the
//! wrong command or panic. Since the device completes in ring order, the
//! first valid completion after a garbled one tells the driver (by its
//! command head) that the device went past the garbled command: its slots
//! are freed and its waiter gets `CompletionLost`, so the ring never shrinks.
//!
//! Faults are detected here and counted in [`RecoveryStats`]: completions
//! that fail the checks, entries skipped because their phase bit is wrong
//! while a later one was written (`phase_anomalies`), waits that time out
//! (told apart by `CMD_HEAD`: a stalled device, or a completion lost at the
//! end of a batch), a device found `FATAL` or no longer `ENABLED` (it reset
//! itself), interrupt signals the device did not raise (spurious).
//! [`Driver::reinit`] resets the device, programs the same rings again and
//! re-enables it; rebuilding the table and replaying what was in flight is
//! the connection table's job (`ConnTable::enable_recovery`,
//! docs/faults.md).

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use nicsync_fwif::cmd::{CommandDescriptor, LookupBody, Opcode, DESC_SIZE};
use nicsync_fwif::conn::ConnRecord;
use nicsync_fwif::cpl::{Completion, CompletionEntry, CplError, CPL_SIZE, PHASE_BIT};
use nicsync_fwif::event::{Event, EventEntry, EVT_SIZE};
use nicsync_fwif::hash::{TableHash, TableHashSeed};
use nicsync_fwif::regs::{self, Capabilities, Control, Counter, IrqCause, Status};
use nicsync_fwif::{ABI_MAJOR, MIN_DEVICE_ABI_MINOR};
use nicsync_vfio::{DeviceError, DmaBuffer, NicDevice};
use zerocopy::{FromBytes, IntoBytes};

/// How the driver learns that completions arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionMode {
    /// Busy-poll the phase bit (lowest latency, one core).
    Poll,
    /// Sleep on the completion interrupt's eventfd (moderated).
    Interrupt,
}

/// Bring-up parameters.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// log2 of command ring slots (the completion ring gets twice as many).
    pub cmd_ring_log2: u32,
    /// log2 of event ring entries (0: no event ring).
    pub evt_ring_log2: u32,
    /// Table capacity to request.
    pub table_capacity: u32,
    /// Aging scan period (0 disables aging).
    pub aging_period_ms: u32,
    /// Completions per interrupt.
    pub irq_coalesce_count: u32,
    /// Interrupt holdoff.
    pub irq_coalesce_usec: u32,
    /// Polling or interrupts.
    pub completion_mode: CompletionMode,
    /// How long to wait for one completion before declaring the device hung.
    pub completion_timeout: Duration,
    /// How long reset and enable may take.
    pub bringup_timeout: Duration,
    /// Capabilities the host insists on.
    pub required_caps: Capabilities,
    /// Ring with the inline doorbell (a copy of the batch's first
    /// descriptor in BAR0) when the device offers it.
    pub inline_doorbell: bool,
    /// With polled completions, still take an interrupt when the device
    /// writes an event (a peer's update applied, an entry aged), so that an
    /// event loop learns of it at once ([`crate::runtime`] waits on the
    /// event vector's eventfd). Ignored where the device has no event
    /// interrupt; implied by [`CompletionMode::Interrupt`].
    pub event_interrupts: bool,
    /// Enable the device with `Control::SYNC_HOLD` already set: a cluster
    /// member that will pull a Full Sync holds its peers' updates from the
    /// first frame its device takes, and counts what a peer had sent before
    /// it first heard it as join history, not as lost (cluster.md,
    /// `join_history_lost`). Ignored by a device without `Capabilities::SYNC`.
    pub sync_hold_at_enable: bool,
    /// The seed of the card's table hash (ABI 1.9, `TABLE_HASH_SEED_0..3`),
    /// written at every bring-up of a device that has
    /// `Capabilities::TABLE_HASH_SEED`. It must be secret from whoever
    /// sends the traffic (see `nicsync_fwif::hash`); members of one
    /// cluster should share it, so that a Full Sync arrives in the order
    /// the receiving card and the host's copy store it. `None`: a random
    /// seed chosen at open and kept for the driver's life.
    pub table_hash_seed: Option<TableHashSeed>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            cmd_ring_log2: 10,
            evt_ring_log2: 10,
            table_capacity: 1 << 16,
            aging_period_ms: 1000,
            irq_coalesce_count: 32,
            irq_coalesce_usec: 50,
            completion_mode: CompletionMode::Poll,
            completion_timeout: Duration::from_secs(2),
            bringup_timeout: Duration::from_secs(2),
            required_caps: Capabilities::CONN_TABLE | Capabilities::IPV6 | Capabilities::SNAPSHOT,
            inline_doorbell: true,
            event_interrupts: false,
            sync_hold_at_enable: false,
            table_hash_seed: None,
        }
    }
}

/// Driver errors.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Device access failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The device is not a nicsync device.
    #[error("not a nicsync device: DEVICE_ID reads {found:#010x}, expected {:#010x}", regs::DEVICE_ID_VALUE)]
    NotNicsync {
        /// What was read.
        found: u32,
    },
    /// ABI major versions differ (or the device's minor is older).
    #[error(
        "ABI version mismatch: device speaks {dev_major}.{dev_minor}, this host needs {ABI_MAJOR}.x with x >= {MIN_DEVICE_ABI_MINOR}; \
         update the {side}"
    )]
    AbiMismatch {
        /// Device major.
        dev_major: u16,
        /// Device minor.
        dev_minor: u16,
        /// Which side to update.
        side: &'static str,
    },
    /// Capabilities the host needs are missing.
    #[error("device lacks required capabilities: {0:?}")]
    MissingCapabilities(Capabilities),
    /// Bad driver configuration.
    #[error("invalid driver configuration: {0}")]
    Config(String),
    /// Reset or enable did not finish in time.
    #[error("device did not {what} within {timeout:?} (STATUS={status:#x})")]
    BringUpTimeout {
        /// The step.
        what: &'static str,
        /// The limit.
        timeout: Duration,
        /// STATUS at the time.
        status: u32,
    },
    /// The device reported a fatal error.
    #[error("device is in FATAL state (STATUS={0:#x}); it must be reset")]
    Fatal(u32),
    /// No free command slots (too many commands in flight).
    #[error("command ring full: {in_flight} slots in flight")]
    RingFull {
        /// Slots in flight.
        in_flight: u32,
    },
    /// A completion did not arrive in time.
    #[error("no completion for tag {tag} within {waited:?}; the device may be hung")]
    Timeout {
        /// The tag waited for.
        tag: u16,
        /// How long.
        waited: Duration,
    },
    /// A tag that is not in flight was waited for.
    #[error("tag {0} is not in flight")]
    UnknownTag(u16),
    /// The device went past the command but its completion was lost or
    /// garbled (counted in `bad_completions`): its outcome is unknown.
    #[error("the completion of tag {0} was lost or garbled by the device; the command's outcome is unknown")]
    CompletionLost(u16),
    /// The device left the enabled state without being asked: it was reset
    /// (by itself or from outside) and lost its table and rings.
    #[error("the device is no longer enabled (STATUS={status:#x}): it was reset and must be re-initialised")]
    DeviceReset {
        /// STATUS at the time.
        status: u32,
    },
}

impl DriverError {
    /// Whether this error means the device's state is unknown or lost, so
    /// that a host keeping its own copy of the table should reset the
    /// device, rebuild and replay: a timeout, a lost completion, `FATAL`, or
    /// a device that reset itself.
    pub fn needs_recovery(&self) -> bool {
        matches!(
            self,
            DriverError::Timeout { .. }
                | DriverError::CompletionLost(_)
                | DriverError::Fatal(_)
                | DriverError::DeviceReset { .. }
        )
    }
}

/// Counters the driver keeps about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Commands posted.
    pub commands_posted: u64,
    /// Doorbell writes.
    pub doorbells: u64,
    /// Valid completions consumed.
    pub completions: u64,
    /// Completion entries rejected (bad fields, unknown tag, wrong opcode).
    pub bad_completions: u64,
    /// Events consumed.
    pub events: u64,
    /// Event entries rejected, or skipped for a wrong phase bit while a
    /// later entry had been written: each is an event lost.
    pub bad_events: u64,
    /// Events the device reported as dropped (overflow).
    pub events_lost: u64,
    /// Commands the device passed whose completion never arrived valid:
    /// their waiters got `CompletionLost`.
    pub lost_completions: u64,
    /// Interrupt wake-ups.
    pub interrupts: u64,
}

/// Faults detected and recoveries made (driver and connection table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryStats {
    /// Waits for a completion that ran out of time.
    pub timeouts: u64,
    /// ... of which with the device not past the command: it had stopped.
    pub stalls: u64,
    /// Commands the device went past without a valid completion (dropped or
    /// garbled): seen from a later completion, or at a timeout.
    pub lost_completions: u64,
    /// Completion entries rejected by the checks (fields, tag, opcode, head).
    pub corrupt_completions: u64,
    /// ... of which named a tag that is not in flight (a duplicate or one
    /// never posted).
    pub unexpected_tags: u64,
    /// Completion and event entries skipped because their phase bit was
    /// wrong while a later entry had been written.
    pub phase_anomalies: u64,
    /// Event entries rejected by the checks.
    pub corrupt_events: u64,
    /// Interrupt signals the device did not raise (beyond its `INTERRUPTS`
    /// count; see [`Driver::take_interrupts`]).
    pub spurious_interrupts: u64,
    /// DMA_ERROR completions.
    pub dma_errors: u64,
    /// Commands retried after a DMA_ERROR.
    pub dma_retries: u64,
    /// Times the device was found no longer enabled (it had reset).
    pub device_resets_detected: u64,
    /// Times the device was found FATAL.
    pub fatal_errors: u64,
    /// Resets and re-initialisations made to recover.
    pub resets: u64,
    /// Commands posted again after a recovery or a retry.
    pub commands_replayed: u64,
    /// Entries written back to the card from the host's copy.
    pub entries_restored: u64,
    /// Deletes a cluster member's card remembered (tombstones) written back
    /// to it from the host's copy after a reset.
    pub tombstones_restored: u64,
    /// Entries found missing on the card outside a rebuild (an audit, or a
    /// NOT_FOUND for an entry that cannot have aged).
    pub lost_entries_detected: u64,
    /// Entries the card held that the host's copy lacked, adopted into it.
    pub entries_adopted: u64,
    /// Audits run.
    pub audits: u64,
    /// Audits that walked the card's table (a quick check disagreed).
    pub audit_walks: u64,
}

impl RecoveryStats {
    /// A DMA_ERROR completion whose command runs again (nothing was done).
    pub(crate) fn count_dma_retry(&mut self) {
        self.dma_errors += 1;
        self.dma_retries += 1;
        self.commands_replayed += 1;
    }
}

/// A command still in flight when the device was re-initialised, read back
/// from the command ring (see [`Driver::reinit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingCommand {
    /// The tag it had.
    pub tag: u16,
    /// Its descriptor.
    pub desc: CommandDescriptor,
    /// Its EXT continuation, if chained.
    pub ext: Option<CommandDescriptor>,
}

/// What the device said at probe time.
#[derive(Clone, Copy, Debug)]
pub struct DeviceInfo {
    /// ABI major.
    pub abi_major: u16,
    /// ABI minor.
    pub abi_minor: u16,
    /// Capabilities.
    pub caps: Capabilities,
    /// Table capacity granted.
    pub capacity: u32,
    /// Largest capacity.
    pub max_capacity: u32,
    /// Design clock.
    pub clock_mhz: u32,
    /// Hardware revision.
    pub hw_revision: u32,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    opcode: u8,
    slots: u8,
}

/// The host side of a ring the device produces into (completions, events).
#[derive(Debug)]
struct ConsumerRing {
    buf: DmaBuffer,
    size: u32,
    head: u32,
    phase: bool,
    /// Entries consumed since the head was last reported to the device.
    unreported: u32,
}

impl ConsumerRing {
    fn new(buf: DmaBuffer, size: u32) -> Self {
        ConsumerRing { buf, size, head: 0, phase: true, unreported: 0 }
    }

    /// Back to the state after reset, with the memory zeroed so that no
    /// stale entry carries the phase the next lap expects.
    fn restart(&mut self) {
        self.buf.mem().clear();
        self.head = 0;
        self.phase = true;
        self.unreported = 0;
    }

    /// Whether entry `k` places after the head has been written (phase as
    /// expected there).
    fn fresh_at(&self, entry: usize, k: u32) -> bool {
        let idx = (self.head + k) & (self.size - 1);
        let expect = self.phase ^ (self.head + k >= self.size);
        match self.buf.mem().load_u64(idx as usize * entry, Ordering::Acquire) {
            Ok(w) => ((w >> 56) as u8 & PHASE_BIT != 0) == expect,
            Err(_) => false,
        }
    }

    /// If the entry at the head is unwritten but one of the next `limit`
    /// (fewer than the ring's size) is written, the device garbled the
    /// phase of (or skipped) the ones in between, which can never become
    /// valid: skips them, each rewritten with this lap's phase so that the
    /// next lap does not take it for new, and returns how many. The head
    /// is looked at again before each (the device may have written it
    /// meanwhile: then it is read, not overwritten).
    fn skip_garbled(&mut self, entry: usize, limit: u32) -> u32 {
        if self.peek(entry).is_some() {
            return 0;
        }
        let limit = limit.min(self.size - 1);
        let Some(k) = (1..=limit).find(|k| self.fresh_at(entry, *k)) else { return 0 };
        let mut skipped = 0;
        for _ in 0..k {
            if self.peek(entry).is_some() {
                break;
            }
            let word = if self.phase { u64::from(PHASE_BIT) << 56 } else { 0 };
            let _ = self.buf.mem().store_u64(self.head as usize * entry, word, Ordering::Relaxed);
            self.advance();
            skipped += 1;
        }
        skipped
    }

    /// The first 8 bytes of the entry at head, if the device has written it
    /// (phase matches). Acquire: the rest of the entry is visible after.
    #[inline]
    fn peek(&self, entry: usize) -> Option<u64> {
        let w = self.buf.mem().load_u64(self.head as usize * entry, Ordering::Acquire).ok()?;
        let phase = (w >> 56) as u8 & PHASE_BIT != 0;
        (phase == self.phase).then_some(w)
    }

    #[inline]
    fn advance(&mut self) {
        self.head += 1;
        self.unreported += 1;
        if self.head == self.size {
            self.head = 0;
            self.phase = !self.phase;
        }
    }
}

/// The driver for one device.
pub struct Driver<D: NicDevice> {
    dev: D,
    cfg: DriverConfig,
    info: DeviceInfo,
    cmd: DmaBuffer,
    cmd_size: u32,
    tail: u32,
    rung_tail: u32,
    slots_in_flight: u32,
    cpl: ConsumerRing,
    evt: Option<ConsumerRing>,
    responses: DmaBuffer,
    in_flight: Vec<Option<InFlight>>,
    /// Slots of the command posted at each tag (kept after completion, to
    /// walk the ring by commands).
    slot_len: Vec<u8>,
    /// Tags whose completion was lost (see `reconcile`).
    lost: Vec<bool>,
    /// The device's head as of the last valid completion.
    dev_head: u32,
    done: Vec<Option<Completion>>,
    /// A tag whose outcome its caller collects later, after other posts
    /// ([`Driver::keep_outcome`]; `u32::MAX`: none). A lone integer, so that
    /// the check on every post is one compare.
    keep_tag: u32,
    /// That outcome, kept aside when a post reused its tag.
    kept: Option<(u16, Result<Completion, DriverError>)>,
    /// Polls of the event ring in a row that found nothing at its head
    /// (every [`EVENT_LOOKAHEAD_EVERY`]th looks past it).
    evt_idle_polls: u32,
    stats: DriverStats,
    recovery: RecoveryStats,
    /// Whether doorbells go through the inline window.
    use_inline: bool,
    /// Sequence of the last inline doorbell (even, never 0).
    inline_seq: u16,
    /// Whether the host asked for `SYNC_HOLD` (kept across a reinit).
    sync_hold: bool,
    /// The generation floor last written (kept across a reinit).
    generation_floor: u32,
    /// Interrupt signals taken against what the device counted.
    irq: IrqTally,
}

/// Interrupt signals the host took against the interrupts the device says
/// it raised (its `INTERRUPTS` counter), since the device was enabled: the
/// device counts an interrupt before it signals it, so signals beyond the
/// count were raised by nothing (spurious).
#[derive(Clone, Copy, Debug, Default)]
struct IrqTally {
    /// `INTERRUPTS` when the count started.
    base: u64,
    /// Signals taken since, on every vector.
    signals: u64,
    /// Signals found spurious since.
    spurious: u64,
}

impl<D: NicDevice> std::fmt::Debug for Driver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("device", &self.dev.describe()).field("info", &self.info).finish_non_exhaustive()
    }
}

/// Reads of a 64-bit counter's two halves before its high word is taken
/// as unstable ([`Driver::device_counter`]).
const COUNTER_READ_TRIES: u32 = 4;

/// Completion (and event) entries past a stale head looked at for a
/// written one.
const PHASE_LOOKAHEAD: u32 = 16;

/// An empty event ring is looked past its head for a written entry (one
/// whose phase the device garbled in front of it) once in this many polls
/// that find nothing: each look reads up to [`PHASE_LOOKAHEAD`] lines the
/// device may be about to write, which every poll would pay for nothing.
const EVENT_LOOKAHEAD_EVERY: u32 = 64;

/// Longest sleep on the completion interrupt between two looks at the
/// device: one that reset itself or went `FATAL` raises nothing.
pub(crate) const INTERRUPT_SLICE: Duration = Duration::from_millis(10);

/// Bytes reserved per command slot for a LOOKUP response.
pub const RESPONSE_STRIDE: usize = 128;

impl<D: NicDevice> Driver<D> {
    /// Brings the device up: reset, header check, ring allocation,
    /// configuration, enable.
    pub fn probe(dev: D, mut cfg: DriverConfig) -> Result<Self, DriverError> {
        // Chosen once: a reset for recovery writes the same seed, so the
        // host's copy of the table keeps its order.
        cfg.table_hash_seed = Some(cfg.table_hash_seed.unwrap_or_else(|| TableHashSeed(crate::keymap::random_seed())));
        if !(regs::MIN_LOG2_RING..regs::MAX_LOG2_RING).contains(&cfg.cmd_ring_log2) {
            return Err(DriverError::Config(format!(
                "cmd_ring_log2 {} outside {}..{}",
                cfg.cmd_ring_log2,
                regs::MIN_LOG2_RING,
                regs::MAX_LOG2_RING
            )));
        }
        if cfg.evt_ring_log2 != 0 && !(regs::MIN_LOG2_RING..=regs::MAX_LOG2_RING).contains(&cfg.evt_ring_log2) {
            return Err(DriverError::Config(format!("evt_ring_log2 {} out of range", cfg.evt_ring_log2)));
        }
        let info = Self::check_header(&dev, &cfg)?;
        Self::reset_device(&dev, &cfg)?;

        let cmd_size = 1u32 << cfg.cmd_ring_log2;
        // The completion ring is twice the command ring and its head is
        // reported every quarter ring: completions the device may still
        // write (at most cmd_size - 1) plus consumed-but-unreported ones (at
        // most cpl_size / 4) always fit, so the device never stalls on a
        // head the host has not yet written.
        let cpl_log2 = cfg.cmd_ring_log2 + 1;
        let cpl_size = 1u32 << cpl_log2;
        let cmd = dev.alloc_dma(cmd_size as usize * DESC_SIZE)?;
        let cpl = dev.alloc_dma(cpl_size as usize * CPL_SIZE)?;
        let responses = dev.alloc_dma(cmd_size as usize * RESPONSE_STRIDE)?;
        let evt = if cfg.evt_ring_log2 > 0 {
            let n = 1u32 << cfg.evt_ring_log2;
            Some(ConsumerRing::new(dev.alloc_dma(n as usize * EVT_SIZE)?, n))
        } else {
            None
        };

        let hold = cfg.sync_hold_at_enable && info.caps.contains(Capabilities::SYNC);
        let capacity = Self::program(&dev, &cfg, &cmd, &cpl, evt.as_ref().map(|e| &e.buf), &info, hold)?;
        let info = DeviceInfo { capacity, ..info };
        // Inline only where the 64-byte write is one burst: through an
        // uncached BAR it would be sixteen slow writes instead of one.
        let use_inline =
            cfg.inline_doorbell && info.caps.contains(Capabilities::INLINE_DOORBELL) && dev.write_combining();
        tracing::info!(device = %dev.describe(), abi = %format!("{}.{}", info.abi_major, info.abi_minor), capacity, "device enabled");
        let mut drv = Driver {
            dev,
            info,
            cmd,
            cmd_size,
            tail: 0,
            rung_tail: 0,
            slots_in_flight: 0,
            cpl: ConsumerRing::new(cpl, cpl_size),
            evt,
            responses,
            in_flight: vec![None; cmd_size as usize],
            slot_len: vec![1; cmd_size as usize],
            lost: vec![false; cmd_size as usize],
            dev_head: 0,
            done: vec![None; cmd_size as usize],
            keep_tag: u32::MAX,
            kept: None,
            evt_idle_polls: 0,
            stats: DriverStats::default(),
            recovery: RecoveryStats::default(),
            use_inline,
            inline_seq: 0,
            sync_hold: hold,
            generation_floor: 0,
            irq: IrqTally::default(),
            cfg,
        };
        drv.restart_irq_tally();
        Ok(drv)
    }

    /// Programs the rings and settings into a device out of reset, enables
    /// it (with SYNC_HOLD if `hold`) and waits until it says so; returns the
    /// capacity it granted.
    fn program(
        dev: &D,
        cfg: &DriverConfig,
        cmd: &DmaBuffer,
        cpl: &DmaBuffer,
        evt: Option<&DmaBuffer>,
        info: &DeviceInfo,
        hold: bool,
    ) -> Result<u32, DriverError> {
        let split = |v: u64| (v as u32, (v >> 32) as u32);
        let (lo, hi) = split(cmd.iova());
        dev.write32(regs::CMD_BASE_LO, lo);
        dev.write32(regs::CMD_BASE_HI, hi);
        dev.write32(regs::CMD_LOG2_SIZE, cfg.cmd_ring_log2);
        let (lo, hi) = split(cpl.iova());
        dev.write32(regs::CPL_BASE_LO, lo);
        dev.write32(regs::CPL_BASE_HI, hi);
        dev.write32(regs::CPL_LOG2_SIZE, cfg.cmd_ring_log2 + 1);
        if let Some(e) = evt {
            let (lo, hi) = split(e.iova());
            dev.write32(regs::EVT_BASE_LO, lo);
            dev.write32(regs::EVT_BASE_HI, hi);
            dev.write32(regs::EVT_LOG2_SIZE, cfg.evt_ring_log2);
        }
        if cfg.table_capacity > info.max_capacity {
            return Err(DriverError::Config(format!(
                "table capacity {} exceeds the device's maximum {}",
                cfg.table_capacity, info.max_capacity
            )));
        }
        dev.write32(regs::TABLE_CAPACITY, cfg.table_capacity);
        // The capabilities read at probe (a register the device could
        // change meanwhile is not read twice).
        if let (true, Some(seed)) = (info.caps.contains(Capabilities::TABLE_HASH_SEED), cfg.table_hash_seed) {
            for (reg, word) in regs::TABLE_HASH_SEED.into_iter().zip(TableHash::new(seed.0).seed_registers()) {
                dev.write32(reg, word);
            }
        }
        dev.write32(regs::AGING_PERIOD_MS, cfg.aging_period_ms);
        dev.write32(regs::IRQ_COALESCE_COUNT, cfg.irq_coalesce_count);
        dev.write32(regs::IRQ_COALESCE_USEC, cfg.irq_coalesce_usec);
        let polled_events = cfg.completion_mode == CompletionMode::Poll
            && cfg.event_interrupts
            && dev.irq_fd(regs::VECTOR_EVENT).is_some();
        let mask = if polled_events {
            // Completions are polled: only events and errors interrupt.
            IrqCause::EVENT | IrqCause::ERROR
        } else {
            IrqCause::COMPLETION | IrqCause::EVENT | IrqCause::ERROR
        };
        dev.write32(regs::IRQ_MASK, mask.bits());
        let mut ctl = Control::ENABLE;
        if hold {
            ctl |= Control::SYNC_HOLD;
        }
        if polled_events {
            ctl |= Control::IRQ_ENABLE;
        }
        if cfg.completion_mode == CompletionMode::Interrupt {
            if cfg.irq_coalesce_usec == 0 && cfg.irq_coalesce_count > 1 {
                return Err(DriverError::Config(
                    "interrupt mode with irq_coalesce_count > 1 needs irq_coalesce_usec > 0, \
                     or a lone completion would never raise an interrupt"
                        .into(),
                ));
            }
            if dev.irq_fd(regs::VECTOR_COMPLETION).is_none() {
                return Err(DriverError::Config(
                    "interrupt completion mode, but the device has no interrupt eventfd".into(),
                ));
            }
            ctl |= Control::IRQ_ENABLE;
        }
        dev.write32(regs::CONTROL, ctl.bits());
        wait_until(
            cfg.bringup_timeout,
            "enable",
            || {
                let s = Status::from_bits_truncate(dev.read32(regs::STATUS));
                if s.contains(Status::FATAL) {
                    return Some(Err(DriverError::Fatal(s.bits())));
                }
                s.contains(Status::ENABLED).then_some(Ok(()))
            },
            || dev.read32(regs::STATUS),
        )??;
        Ok(dev.read32(regs::TABLE_CAPACITY))
    }

    fn check_header(dev: &D, cfg: &DriverConfig) -> Result<DeviceInfo, DriverError> {
        let id = dev.read32(regs::DEVICE_ID);
        if id != regs::DEVICE_ID_VALUE {
            return Err(DriverError::NotNicsync { found: id });
        }
        let (dev_major, dev_minor) = regs::split_version(dev.read32(regs::ABI_VERSION));
        // MIN_DEVICE_ABI_MINOR is 0 today, which makes this trivially
        // false; it is kept for when the host needs a newer minor.
        #[allow(clippy::absurd_extreme_comparisons)]
        let too_old = dev_minor < MIN_DEVICE_ABI_MINOR;
        if dev_major != ABI_MAJOR || too_old {
            let side = if dev_major > ABI_MAJOR { "host software" } else { "device firmware" };
            return Err(DriverError::AbiMismatch { dev_major, dev_minor, side });
        }
        let caps = Capabilities::from_bits_truncate(dev.read32(regs::CAPABILITIES));
        let mut need = cfg.required_caps;
        if cfg.evt_ring_log2 > 0 {
            need |= Capabilities::EVENTS;
        }
        if cfg.completion_mode == CompletionMode::Interrupt {
            need |= Capabilities::MSIX;
        }
        if !caps.contains(need) {
            return Err(DriverError::MissingCapabilities(need - caps));
        }
        Ok(DeviceInfo {
            abi_major: dev_major,
            abi_minor: dev_minor,
            caps,
            capacity: 0,
            max_capacity: dev.read32(regs::TABLE_MAX_CAPACITY),
            clock_mhz: dev.read32(regs::CLOCK_MHZ),
            hw_revision: dev.read32(regs::HW_REVISION),
        })
    }

    fn reset_device(dev: &D, cfg: &DriverConfig) -> Result<(), DriverError> {
        dev.write32(regs::CONTROL, Control::RESET.bits());
        wait_until(
            cfg.bringup_timeout,
            "leave reset",
            || {
                let c = dev.read32(regs::CONTROL);
                let s = Status::from_bits_truncate(dev.read32(regs::STATUS));
                (c & Control::RESET.bits() == 0 && s.contains(Status::READY)).then_some(())
            },
            || dev.read32(regs::STATUS),
        )
    }

    /// What the device reported at probe.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The configuration in force.
    pub fn config(&self) -> &DriverConfig {
        &self.cfg
    }

    /// The table hash under the seed this driver writes (the card's own
    /// where it has `Capabilities::TABLE_HASH_SEED`; a host structure that
    /// indexes by it shares the card's order then, and is merely seeded
    /// otherwise).
    pub fn table_hash(&self) -> TableHash {
        TableHash::new(self.cfg.table_hash_seed.unwrap_or_default().0)
    }

    /// Driver-side counters.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Faults detected and recoveries made.
    pub fn recovery_stats(&self) -> RecoveryStats {
        self.recovery
    }

    /// The recovery counters, for the layers above that recover.
    pub(crate) fn recovery_mut(&mut self) -> &mut RecoveryStats {
        &mut self.recovery
    }

    /// Re-initialises the device after a fault: `CONTROL.RESET`, the same
    /// rings (zeroed) and settings programmed again, enable. The device's
    /// table is empty afterwards. Returns the commands that were in flight
    /// (posted, no completion consumed), read back from the command ring in
    /// ring order, for the caller to replay ([`Driver::replay`]) once it has
    /// rebuilt what it needs; commands already reported lost are not
    /// included, and every tag is free again.
    pub fn reinit(&mut self) -> Result<Vec<PendingCommand>, DriverError> {
        let pending = self.pending_commands();
        tracing::warn!(in_flight = pending.len(), "re-initialising the device");
        // Judged while the device's count of them is still there.
        self.take_interrupts();
        Self::reset_device(&self.dev, &self.cfg)?;
        // Zeroed while the device is in reset, before it can write them.
        self.cpl.restart();
        if let Some(e) = &mut self.evt {
            e.restart();
        }
        let evt = self.evt.as_ref().map(|e| &e.buf);
        // The reset cleared CONTROL: a hold the host had set (a Full Sync
        // being pulled) holds again from the enable. What the card held is
        // gone; the puller learns of the reset from `resets` and starts over.
        self.info.capacity =
            Self::program(&self.dev, &self.cfg, &self.cmd, &self.cpl.buf, evt, &self.info, self.sync_hold)?;
        self.tail = 0;
        self.rung_tail = 0;
        self.slots_in_flight = 0;
        self.dev_head = 0;
        self.in_flight.iter_mut().for_each(|f| *f = None);
        self.slot_len.iter_mut().for_each(|l| *l = 1);
        self.lost.iter_mut().for_each(|l| *l = false);
        self.done.iter_mut().for_each(|d| *d = None);
        self.keep_tag = u32::MAX;
        self.kept = None;
        self.restart_irq_tally();
        self.recovery.resets += 1;
        // So did the generation floor: a rebuilt card must not number a
        // change below what it numbered before.
        if self.generation_floor != 0 {
            self.dev.write32(regs::GENERATION_FLOOR, self.generation_floor);
        }
        Ok(pending)
    }

    /// The commands in flight, in ring order from the device's last known
    /// head, read back from the command ring (host memory the device only
    /// reads).
    fn pending_commands(&self) -> Vec<PendingCommand> {
        let mask = self.cmd_size - 1;
        let read = |slot: u32| {
            let mut b = [0u8; DESC_SIZE];
            self.cmd.mem().read(slot as usize * DESC_SIZE, &mut b).ok()?;
            CommandDescriptor::read_from_bytes(&b).ok()
        };
        let mut out = Vec::new();
        let mut s = self.dev_head;
        for _ in 0..self.cmd_size {
            if s == self.tail {
                break;
            }
            let len = u32::from(self.slot_len[s as usize].max(1));
            if let Some(f) = self.in_flight[s as usize] {
                if let Some(desc) = read(s) {
                    let ext = if f.slots > 1 { read((s + 1) & mask) } else { None };
                    out.push(PendingCommand { tag: s as u16, desc, ext });
                }
            }
            s = (s + len) & mask;
        }
        out
    }

    /// Posts `cmds` again (after [`Driver::reinit`]) and rings once;
    /// returns their new tags, in order.
    pub fn replay(&mut self, cmds: &[PendingCommand]) -> Result<Vec<u16>, DriverError> {
        let mut tags = Vec::with_capacity(cmds.len());
        for c in cmds {
            let mut desc = c.desc;
            if desc.opcode == Opcode::Lookup as u8 {
                // Its response area is its tag's: the new tag's now, or
                // the record lands where the new tag's reader never looks.
                let mut body: LookupBody = zerocopy::transmute!(desc.body);
                if body.resp_addr.get() == self.response_iova(c.tag) {
                    body.resp_addr = self.next_response_iova().into();
                    desc.body = zerocopy::transmute!(body);
                }
            }
            tags.push(self.post(&desc, c.ext.as_ref())?);
        }
        self.ring();
        self.recovery.commands_replayed += cmds.len() as u64;
        Ok(tags)
    }

    /// Command ring slots.
    pub fn ring_size(&self) -> u32 {
        self.cmd_size
    }

    /// Free command slots (one stays empty to tell full from empty).
    #[inline]
    pub fn free_slots(&self) -> u32 {
        self.cmd_size - 1 - self.slots_in_flight
    }

    /// Commands posted but not yet completed, in slots.
    pub fn slots_in_flight(&self) -> u32 {
        self.slots_in_flight
    }

    /// Reads a device counter (high, low, high until stable, a few times;
    /// a high word that never holds still gives its last reading, low
    /// word 0).
    pub fn device_counter(&self, c: Counter) -> u64 {
        let off = c.offset();
        let mut hi = self.dev.read32(off + 4);
        // A few tries: the high word moves once per 2^32 counts, so a
        // second read that differs again is a device whose register does
        // not hold still (faulty, or gone), which must not hang the host.
        for _ in 0..COUNTER_READ_TRIES {
            let lo = self.dev.read32(off);
            let again = self.dev.read32(off + 4);
            if again == hi {
                return (hi as u64) << 32 | lo as u64;
            }
            hi = again;
        }
        (hi as u64) << 32
    }

    /// Whether [`Driver::post`] would accept a command of `slots` slots now:
    /// enough free slots, and none of them still reserved by a command whose
    /// completion never came back.
    pub fn can_post(&self, slots: u32) -> bool {
        self.free_slots() >= slots
            && (0..slots).all(|i| self.in_flight[((self.tail + i) & (self.cmd_size - 1)) as usize].is_none())
    }

    /// Writes one command (one or two descriptors) into the ring without
    /// ringing the doorbell; returns its tag. `ext` is the EXT continuation
    /// for chained commands.
    #[inline]
    pub fn post(&mut self, desc: &CommandDescriptor, ext: Option<&CommandDescriptor>) -> Result<u16, DriverError> {
        let slots = 1 + ext.is_some() as u32;
        if self.free_slots() < slots {
            return Err(DriverError::RingFull { in_flight: self.slots_in_flight });
        }
        let tag = self.tail as u16;
        if self.in_flight[tag as usize].is_some() {
            // Its completion never came back valid (counted in
            // bad_completions): the slot stays reserved until the device is
            // reset, so a late completion can never be credited to a new
            // command under the same tag.
            return Err(DriverError::RingFull { in_flight: self.slots_in_flight });
        }
        // The tag goes in as part of word 0, computed in a register: a copy
        // of the descriptor with its 2-byte tag stored into it made every
        // later whole-word read of it wait for that store to drain (no
        // store-to-load forwarding across stores of different widths).
        let words = with_tag(desc, tag);
        self.write_slot(self.tail, &words)?;
        if let Some(e) = ext {
            self.write_slot((self.tail + 1) & (self.cmd_size - 1), &with_tag(e, tag))?;
        }
        if u32::from(tag) == self.keep_tag {
            self.keep_aside(tag);
        }
        self.in_flight[tag as usize] = Some(InFlight { opcode: desc.opcode, slots: slots as u8 });
        self.slot_len[tag as usize] = slots as u8;
        self.lost[tag as usize] = false;
        self.done[tag as usize] = None;
        self.tail = (self.tail + slots) & (self.cmd_size - 1);
        self.slots_in_flight += slots;
        self.stats.commands_posted += 1;
        // Only within a burst: a lone command's post touches no other line.
        if self.slots_in_flight > slots && self.free_slots() > WRITE_AHEAD_SLOTS {
            let ahead = (self.tail + WRITE_AHEAD_SLOTS) & (self.cmd_size - 1);
            self.cmd.mem().prefetch_write(ahead as usize * DESC_SIZE);
        }
        Ok(tag)
    }

    #[inline]
    fn write_slot(&self, slot: u32, words: &[u64; 8]) -> Result<(), DriverError> {
        self.cmd.mem().write_words(slot as usize * DESC_SIZE, words)?;
        Ok(())
    }

    /// Has the outcome of `tag` (a command in flight, or one whose outcome
    /// is not yet taken) kept for [`Driver::take_kept`] even if posts reuse
    /// the tag meanwhile; one tag at a time (a later call replaces it).
    /// Posting otherwise forgets a tag's unclaimed outcome.
    pub fn keep_outcome(&mut self, tag: u16) {
        self.keep_tag = u32::from(tag);
        self.kept = None;
    }

    /// The ring came round to the kept tag: its outcome is set aside rather
    /// than forgotten.
    #[cold]
    fn keep_aside(&mut self, tag: u16) {
        self.keep_tag = u32::MAX;
        self.kept = self.outcome(tag).map(|o| (tag, o));
    }

    /// The outcome of the tag given to [`Driver::keep_outcome`]: kept aside
    /// if a post reused the tag, else as [`Driver::wait`] finds it. Ends the
    /// keeping. `UnknownTag` if `tag` is not the one kept.
    pub fn take_kept(&mut self, tag: u16) -> Result<Completion, DriverError> {
        if self.keep_tag == u32::from(tag) {
            self.keep_tag = u32::MAX;
            return self.wait(tag);
        }
        match self.kept.take() {
            Some((k, outcome)) if k == tag => outcome,
            other => {
                self.kept = other;
                Err(DriverError::UnknownTag(tag))
            }
        }
    }

    /// The tag the next posted command will get.
    #[inline]
    pub fn next_tag(&self) -> u16 {
        self.tail as u16
    }

    /// Whether `tag` holds an outcome nobody has taken yet: a reaped
    /// completion ([`Driver::take_done`]) or a loss ([`Driver::take_lost`]).
    /// Posting reuses the tag and forgets it, so a caller that collects its
    /// outcomes later must not post while its next tag is unclaimed.
    #[inline]
    pub fn is_unclaimed(&self, tag: u16) -> bool {
        self.done.get(tag as usize).is_some_and(Option::is_some)
            || self.lost.get(tag as usize).copied().unwrap_or(false)
    }

    /// IOVA of the LOOKUP response area of `tag`.
    pub fn response_iova(&self, tag: u16) -> u64 {
        self.responses.iova() + tag as u64 * RESPONSE_STRIDE as u64
    }

    /// IOVA of the response area the next posted command will get.
    pub fn next_response_iova(&self) -> u64 {
        self.response_iova(self.tail as u16)
    }

    /// Reads the record the device wrote for LOOKUP `tag`.
    pub fn read_response(&self, tag: u16) -> Result<ConnRecord, DriverError> {
        let mut b = [0u8; ConnRecord::SIZE];
        self.responses.mem().read(tag as usize * RESPONSE_STRIDE, &mut b)?;
        Ok(ConnRecord::read_from_bytes(&b).unwrap_or_default())
    }

    /// Rings the doorbell once for everything posted since the last ring.
    /// Release fence first: the descriptors are visible before the tail.
    #[inline]
    pub fn ring(&mut self) {
        if self.tail != self.rung_tail {
            fence(Ordering::Release);
            // The batch's first descriptor, read back from its slot word by
            // word as it was written, into place and never moved: a copy
            // kept aside, or moved, is reloaded in wider pieces than it was
            // stored in, and each such load waits for the stores to drain.
            let mut words = [0u64; 8];
            let inline = self.use_inline
                && self.cmd.mem().read_words(self.rung_tail as usize * DESC_SIZE, &mut words).is_ok()
                // A descriptor whose aux is not zero cannot travel inline
                // (aux, bits 63:32 of word 0, carries the doorbell there):
                // ring the register so the device fetches, and judges, the
                // slot as posted.
                && words[0] >> 32 == 0;
            if inline {
                self.inline_seq = regs::next_inline_seq(self.inline_seq);
                words[0] |= u64::from(regs::inline_doorbell(self.tail as u16, self.inline_seq)) << 32;
                self.dev.write_inline(regs::CMD_INLINE, &words);
            } else {
                self.dev.write32(regs::CMD_DOORBELL, self.tail);
            }
            self.rung_tail = self.tail;
            self.stats.doorbells += 1;
        }
    }

    /// Whether doorbells carry the first descriptor inline.
    pub fn uses_inline_doorbell(&self) -> bool {
        self.use_inline
    }

    /// Consumes every completion the device has written; calls `f` for
    /// each valid one (in ring order). Returns how many entries were
    /// consumed (valid or not).
    #[inline]
    pub fn poll_completions(&mut self, mut f: impl FnMut(Completion)) -> usize {
        let mut n = 0;
        while let Some(w0) = self.cpl.peek(CPL_SIZE) {
            let off = self.cpl.head as usize * CPL_SIZE;
            let mut result = [0u8; 8];
            let read_ok = self.cpl.buf.mem().read(off + 8, &mut result).is_ok();
            self.cpl.advance();
            n += 1;
            let mut e = CompletionEntry::default();
            e.as_mut_bytes()[..8].copy_from_slice(&w0.to_le_bytes());
            e.as_mut_bytes()[8..].copy_from_slice(&result);
            match self.accept(&e, read_ok) {
                Ok(c) => f(c),
                Err(why) => {
                    self.stats.bad_completions += 1;
                    self.recovery.corrupt_completions += 1;
                    tracing::warn!("ignoring completion from device: {why}");
                }
            }
        }
        if self.cpl.unreported >= self.cpl.size / 4 {
            self.report_cpl_head();
        }
        n
    }

    fn report_cpl_head(&mut self) {
        self.dev.write32(regs::CPL_HEAD, self.cpl.head);
        self.cpl.unreported = 0;
    }

    /// Checks a completion against what is in flight.
    fn accept(&mut self, e: &CompletionEntry, read_ok: bool) -> Result<Completion, String> {
        if !read_ok {
            return Err("completion entry unreadable".into());
        }
        let c = e.decode().map_err(|e: CplError| e.to_string())?;
        let slot = self.in_flight.get_mut(c.tag as usize).ok_or_else(|| format!("tag {} out of range", c.tag))?;
        let Some(f) = *slot else {
            self.recovery.unexpected_tags += 1;
            return Err(format!("tag {} is not in flight (a duplicate, or never posted)", c.tag));
        };
        if c.cmd_head as u32 >= self.cmd_size {
            return Err(format!("command head {} outside the {}-slot ring", c.cmd_head, self.cmd_size));
        }
        if f.opcode != c.opcode {
            return Err(format!(
                "tag {} completed as opcode {:#04x} but was posted as {:#04x}",
                c.tag, c.opcode, f.opcode
            ));
        }
        // The device's head is the head after this very command (abi.md
        // 6.2), and lies within the slots rung, in ring order from the last
        // head it reported: a completion whose tag was garbled into another
        // in-flight command's fails here. Ring sizes are powers of two:
        // positions wrap with a mask, not a division (this runs for every
        // completion).
        let mask = self.cmd_size - 1;
        let ahead = |x: u32| x.wrapping_sub(self.dev_head) & mask;
        let head = c.cmd_head as u32;
        if head != (c.tag as u32 + f.slots as u32) & mask
            || ahead(head) > ahead(self.rung_tail)
            || head == self.dev_head
        {
            return Err(format!(
                "command head {head} does not end tag {} within the slots rung (device head {}, rung tail {})",
                c.tag, self.dev_head, self.rung_tail
            ));
        }
        let slot = &mut self.in_flight[c.tag as usize];
        *slot = None;
        self.slots_in_flight -= f.slots as u32;
        self.stats.completions += 1;
        if self.dev_head == c.tag as u32 {
            // The usual case: exactly the next command, nothing skipped.
            self.dev_head = head;
        } else {
            self.reconcile(head, c.tag);
        }
        Ok(c)
    }

    /// The device completes in ring order, so a command it has passed
    /// (behind `head`) that is still in flight had its completion lost or
    /// garbled: free its slots and fail its waiter, rather than keep the
    /// slots until a reset.
    fn reconcile(&mut self, head: u32, completed: u16) {
        let mut s = self.dev_head;
        let mut steps = 0;
        while s != head && steps < self.cmd_size {
            let len = u32::from(self.slot_len[s as usize].max(1));
            if s != completed as u32 {
                if let Some(f) = self.in_flight[s as usize].take() {
                    self.slots_in_flight -= f.slots as u32;
                    self.lost[s as usize] = true;
                    self.stats.lost_completions += 1;
                    self.recovery.lost_completions += 1;
                }
            }
            s = (s + len) & (self.cmd_size - 1);
            steps += 1;
        }
        self.dev_head = head;
    }

    /// Consumes available completions, remembering them by tag.
    #[inline]
    pub fn reap(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.done);
        let n = self.poll_completions(|c| done[c.tag as usize] = Some(c));
        self.done = done;
        n
    }

    /// Takes the completion of `tag` if it has been reaped.
    #[inline]
    pub fn take_done(&mut self, tag: u16) -> Option<Completion> {
        self.done.get_mut(tag as usize).and_then(Option::take)
    }

    /// Whether `tag`'s completion was lost (see `reconcile`); reported once.
    pub fn take_lost(&mut self, tag: u16) -> bool {
        match self.lost.get_mut(tag as usize) {
            Some(l) if *l => {
                *l = false;
                true
            }
            _ => false,
        }
    }

    /// Waits for the completion of `tag` (polling or interrupts, per the
    /// configuration), up to the completion timeout.
    pub fn wait(&mut self, tag: u16) -> Result<Completion, DriverError> {
        if let Some(r) = self.outcome(tag) {
            return r;
        }
        let mut spins = 0u32;
        let mut start: Option<Instant> = None;
        loop {
            // Take ours straight out of the ring; keep others by tag.
            let mut mine = None;
            let mut done = std::mem::take(&mut self.done);
            self.poll_completions(|c| {
                if c.tag == tag {
                    mine = Some(c);
                } else {
                    done[c.tag as usize] = Some(c);
                }
            });
            self.done = done;
            if let Some(c) = mine {
                return Ok(c);
            }
            if self.take_lost(tag) {
                return Err(DriverError::CompletionLost(tag));
            }
            spins += 1;
            let interrupts = self.cfg.completion_mode == CompletionMode::Interrupt;
            // A device that can run on this thread (an emulated one whose
            // own thread is not running it) does, now and then, and before
            // any sleep.
            if (interrupts || spins % 64 == 0) && self.dev.assist() {
                continue;
            }
            // Polling mode spins and looks at the clock now and then;
            // interrupt mode sleeps on the completion interrupt as soon as
            // the completion is not there.
            if interrupts || spins % 1024 == 0 {
                let t0 = *start.get_or_insert_with(Instant::now);
                let Some(left) = self.check_wait(tag, t0)? else { continue };
                if interrupts {
                    self.sleep_for_interrupt(left.min(INTERRUPT_SLICE))?;
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// The outcome of `tag` if a wait needs no waiting: its completion
    /// already taken off the ring, its loss already found, or a tag that is
    /// not in flight (`UnknownTag`).
    pub(crate) fn outcome(&mut self, tag: u16) -> Option<Result<Completion, DriverError>> {
        if self.in_flight.get(tag as usize).is_none_or(Option::is_none)
            && self.done.get(tag as usize).is_none_or(Option::is_none)
            && !self.lost.get(tag as usize).copied().unwrap_or(false)
        {
            return Some(Err(DriverError::UnknownTag(tag)));
        }
        if let Some(c) = self.take_done(tag) {
            return Some(Ok(c));
        }
        if self.take_lost(tag) {
            return Some(Err(DriverError::CompletionLost(tag)));
        }
        None
    }

    /// The checks of a wait for `tag`, started at `t0`, whose completion is
    /// not there yet: the device's state (`FATAL`, or reset by itself),
    /// entries with a wrong phase in front of later ones (skipped: then
    /// `None`, look at the ring again at once), and the completion timeout
    /// (a completion lost at the end of its batch if `CMD_HEAD` went past
    /// the command, a stall otherwise). Returns the time left to wait.
    pub(crate) fn check_wait(&mut self, tag: u16, t0: Instant) -> Result<Option<Duration>, DriverError> {
        if self.cpl.unreported > 0 {
            self.report_cpl_head();
        }
        self.check_device()?;
        if self.skip_phase_anomalies() > 0 {
            return Ok(None);
        }
        let waited = t0.elapsed();
        if waited >= self.cfg.completion_timeout {
            self.recovery.timeouts += 1;
            if self.device_passed(tag) {
                // Nothing later came to reveal it: the last completion of
                // its batch was lost. Reported to this waiter, it is no
                // longer in flight: a later completion's reconcile must not
                // count it again (nor leave its tag unclaimed), and a reinit
                // must not hand it back for replay. A late completion for it
                // is refused as not in flight. The device's head moves past
                // it too (CMD_HEAD said so): left behind, the head would
                // meet the tail once the freed slots were posted again, and
                // every later completion would fail its head check.
                self.recovery.lost_completions += 1;
                self.stats.lost_completions += 1;
                if let Some(f) = self.in_flight[tag as usize].take() {
                    self.slots_in_flight -= u32::from(f.slots);
                    self.reconcile((u32::from(tag) + u32::from(f.slots)) & (self.cmd_size - 1), tag);
                }
                return Err(DriverError::CompletionLost(tag));
            }
            self.recovery.stalls += 1;
            return Err(DriverError::Timeout { tag, waited });
        }
        Ok(Some(self.cfg.completion_timeout - waited))
    }

    /// Reads STATUS: a FATAL device, or one no longer enabled (it reset
    /// itself), is an error the caller must recover from.
    pub fn check_device(&mut self) -> Result<(), DriverError> {
        let status = Status::from_bits_truncate(self.dev.read32(regs::STATUS));
        if status.contains(Status::FATAL) {
            self.recovery.fatal_errors += 1;
            return Err(DriverError::Fatal(status.bits()));
        }
        if !status.contains(Status::ENABLED) {
            self.recovery.device_resets_detected += 1;
            return Err(DriverError::DeviceReset { status: status.bits() });
        }
        Ok(())
    }

    /// Whether the device's command head (`CMD_HEAD`) is past the command
    /// at `tag`, within what was rung.
    fn device_passed(&self, tag: u16) -> bool {
        let Some(f) = self.in_flight.get(tag as usize).copied().flatten() else { return false };
        let mask = self.cmd_size - 1;
        let ahead = |x: u32| x.wrapping_sub(self.dev_head) & mask;
        let head = self.dev.read32(regs::CMD_HEAD) & mask;
        ahead(head) >= ahead(tag as u32) + f.slots as u32 && ahead(head) <= ahead(self.rung_tail)
    }

    /// If the entry at the head is unwritten but a later one is written,
    /// the device garbled the phase of (or skipped) the ones in between:
    /// they can never become valid. Skips them, so that the later
    /// completions are consumed (and reveal the skipped commands as lost);
    /// returns how many. Each skipped entry is rewritten with the phase of
    /// this lap, so that the next lap does not take it for new.
    fn skip_phase_anomalies(&mut self) -> u32 {
        if self.cpl.peek(CPL_SIZE).is_some() {
            return 0;
        }
        // Written in order: the device cannot have written more entries
        // past the head than there are commands in flight. A few are
        // enough to look at (more garbled in a row end in a timeout), and
        // reading further would pull lines the device is writing.
        let limit = self.slots_in_flight.min(PHASE_LOOKAHEAD);
        let skipped = self.cpl.skip_garbled(CPL_SIZE, limit);
        if skipped > 0 {
            tracing::warn!(skipped, "completion entries with a wrong phase skipped");
        }
        self.recovery.phase_anomalies += skipped as u64;
        self.stats.bad_completions += skipped as u64;
        skipped
    }

    /// Blocks on the completion interrupt until it fires or `timeout`.
    /// Interrupts already served are taken first ([`Driver::take_interrupts`])
    /// and the ring looked at once more, so that only a new interrupt wakes
    /// it; a spurious one is counted and tolerated (the caller looks at the
    /// ring, finds nothing and sleeps again).
    pub fn sleep_for_interrupt(&mut self, timeout: Duration) -> Result<bool, DriverError> {
        if self.dev.irq_fd(regs::VECTOR_COMPLETION).is_none() {
            return Ok(false);
        }
        self.take_interrupts();
        if self.cpl.peek(CPL_SIZE).is_some() {
            return Ok(true);
        }
        let fired = match self.dev.irq_fd(regs::VECTOR_COMPLETION) {
            Some(fd) => nicsync_vfio::wait_readable(fd, timeout)?,
            None => false,
        };
        if fired {
            self.stats.interrupts += 1;
            self.take_interrupts();
        }
        Ok(fired)
    }

    /// Takes the interrupts signalled since the last look, without
    /// waiting: drains the completion vector's eventfd (and the event
    /// vector's, which the driver does not sleep on), then acknowledges
    /// `IRQ_STATUS.COMPLETION`. Returns the completion vector's signals.
    ///
    /// Signals are checked against the device's `INTERRUPTS` counter: the
    /// device counts every interrupt it raises before it signals it, so
    /// signals beyond its count were raised by nothing. Those are spurious:
    /// counted (`spurious_interrupts`) and otherwise ignored (a waiter
    /// looks at the ring, finds nothing new and sleeps again). While the
    /// device is not enabled (it reset itself and restarted its counters)
    /// signals are not judged. Where the event vector has no eventfd, its
    /// interrupts count without a signal and can hide as many spurious ones:
    /// the count is then a lower bound.
    ///
    /// The waits call it before they sleep and when they wake; a host that
    /// sleeps on the eventfd itself calls it when it wakes. Nothing to take
    /// in polling mode (interrupts are not enabled).
    pub fn take_interrupts(&mut self) -> u64 {
        if self.cfg.completion_mode != CompletionMode::Interrupt {
            return 0;
        }
        let Some(fd) = self.dev.irq_fd(regs::VECTOR_COMPLETION) else { return 0 };
        let n = nicsync_vfio::drain_eventfd(fd);
        let others = self.dev.irq_fd(regs::VECTOR_EVENT).map_or(0, nicsync_vfio::drain_eventfd);
        if n + others > 0 && self.status().contains(Status::ENABLED) {
            // Signals first, then the count: every signal taken was counted.
            let raised = self.device_counter(Counter::Interrupts).wrapping_sub(self.irq.base);
            self.irq.signals += n + others;
            let excess = self.irq.signals.saturating_sub(raised);
            if excess > self.irq.spurious {
                let new = excess - self.irq.spurious;
                self.irq.spurious = excess;
                self.recovery.spurious_interrupts += new;
                tracing::debug!(new, "spurious interrupt: signalled, but not raised by the device");
            }
        }
        self.dev.write32(regs::IRQ_STATUS, IrqCause::COMPLETION.bits());
        n
    }

    /// Starts the tally of interrupt signals again, on a device just
    /// enabled: what was signalled before is dropped.
    fn restart_irq_tally(&mut self) {
        let base = self.device_counter(Counter::Interrupts);
        for v in [regs::VECTOR_COMPLETION, regs::VECTOR_EVENT] {
            if let Some(fd) = self.dev.irq_fd(v) {
                nicsync_vfio::drain_eventfd(fd);
            }
        }
        self.irq = IrqTally { base, ..IrqTally::default() };
    }

    /// Counts a wake-up by the completion interrupt (for waits outside the
    /// driver, see [`crate::irq::AsyncCompletions`]).
    pub(crate) fn count_wakeup(&mut self) {
        self.stats.interrupts += 1;
    }

    /// Posts one command, rings, and waits for its completion.
    #[inline]
    pub fn execute(
        &mut self,
        desc: &CommandDescriptor,
        ext: Option<&CommandDescriptor>,
    ) -> Result<Completion, DriverError> {
        let tag = self.post(desc, ext)?;
        self.ring();
        self.wait(tag)
    }

    /// Consumes every event the device has written; calls `f` for each
    /// valid one.
    pub fn poll_events(&mut self, f: impl FnMut(Event)) -> usize {
        self.poll_events_with(false, f)
    }

    /// [`Driver::poll_events`], looking past an unwritten head for written
    /// entries every time (not once in [`EVENT_LOOKAHEAD_EVERY`] empty
    /// polls): before the device is reset, whose event ring starts again
    /// empty, every event it wrote is taken in, those behind a garbled one
    /// included, or the host's copy rebuilt onto the card would lack them.
    pub fn poll_events_all(&mut self, f: impl FnMut(Event)) -> usize {
        self.poll_events_with(true, f)
    }

    fn poll_events_with(&mut self, thorough: bool, mut f: impl FnMut(Event)) -> usize {
        let Some(ring) = &mut self.evt else { return 0 };
        let mut n = 0;
        loop {
            if ring.peek(EVT_SIZE).is_none() {
                if n > 0 && !thorough {
                    self.evt_idle_polls = 0;
                    break;
                }
                self.evt_idle_polls = self.evt_idle_polls.wrapping_add(1);
                if !thorough && self.evt_idle_polls % EVENT_LOOKAHEAD_EVERY != 0 {
                    break;
                }
                // Written in order: a written entry past an unwritten head
                // means the device garbled the phase of the ones between.
                // They would hold the head for good (the device fills the
                // ring behind them, then drops every event): skipped, and
                // counted as events lost.
                let k = ring.skip_garbled(EVT_SIZE, PHASE_LOOKAHEAD);
                if k == 0 {
                    // Nothing garbled, or the head was written meanwhile.
                    if ring.peek(EVT_SIZE).is_none() {
                        break;
                    }
                    continue;
                }
                n += k as usize;
                tracing::warn!(skipped = k, "event entries with a wrong phase skipped");
                self.stats.bad_events += u64::from(k);
                self.recovery.phase_anomalies += u64::from(k);
                continue;
            }
            let mut e = EventEntry::default();
            let ok = ring.buf.mem().read(ring.head as usize * EVT_SIZE, e.as_mut_bytes()).is_ok();
            ring.advance();
            n += 1;
            match (ok, e.decode()) {
                (true, Ok(ev)) => {
                    self.stats.events += 1;
                    if ev.kind == nicsync_fwif::event::EventKind::Overflow {
                        self.stats.events_lost += ev.state.generation.get() as u64;
                    }
                    f(ev)
                }
                (_, Err(why)) => {
                    self.stats.bad_events += 1;
                    self.recovery.corrupt_events += 1;
                    tracing::warn!("ignoring event from device: {why}");
                }
                (false, _) => {
                    self.stats.bad_events += 1;
                    self.recovery.corrupt_events += 1;
                }
            }
        }
        if n > 0 {
            self.dev.write32(regs::EVT_HEAD, ring.head);
            ring.unreported = 0;
        }
        n
    }

    /// Events the host never read: reported dropped by the device
    /// (overflow), or rejected or skipped by this driver. The host's copy of
    /// the table may miss what they said.
    pub fn events_lost(&self) -> u64 {
        self.stats.events_lost + self.stats.bad_events
    }

    /// Device status register.
    pub fn status(&self) -> Status {
        Status::from_bits_truncate(self.dev.read32(regs::STATUS))
    }

    /// Entries resident in the device's table.
    pub fn table_count(&self) -> u32 {
        self.dev.read32(regs::TABLE_COUNT)
    }

    /// Raises the device's generation floor ([`regs::GENERATION_FLOOR`]) to
    /// `floor`; a lower value than the last one is ignored (the floor never
    /// goes down, so a change is never numbered below an earlier one for
    /// want of it). A device older than ABI minor 5 has no such register
    /// and numbers generations from 1 per key: nothing is written and the
    /// floor stays 0.
    pub fn raise_generation_floor(&mut self, floor: u32) {
        if self.info.abi_minor < 5 {
            return;
        }
        if floor > self.generation_floor {
            self.generation_floor = floor;
            self.dev.write32(regs::GENERATION_FLOOR, floor);
        }
    }

    /// The generation floor last written (0: never).
    pub fn generation_floor(&self) -> u32 {
        self.generation_floor
    }

    /// Sets or clears [`Control::SYNC_HOLD`]: while set, the device buffers
    /// the peer updates it receives instead of applying them; clearing it
    /// applies them in arrival order (used for the length of a Full Sync).
    pub fn set_sync_hold(&mut self, on: bool) -> Result<(), DriverError> {
        if !self.info.caps.contains(Capabilities::SYNC) {
            return Err(DriverError::MissingCapabilities(Capabilities::SYNC));
        }
        self.sync_hold = on;
        // RESET self-clears and is never written back: a read of all ones
        // (a device gone from the bus) would otherwise reset the card and
        // empty its table.
        let ctl = Control::from_bits_truncate(self.dev.read32(regs::CONTROL)) - Control::RESET;
        let want = if on { ctl | Control::SYNC_HOLD } else { ctl - Control::SYNC_HOLD };
        if want != ctl {
            self.dev.write32(regs::CONTROL, want.bits());
        }
        Ok(())
    }
}

/// How far ahead of the slot it writes `post` takes a free slot's line for
/// writing (`nicsync_vfio::DmaMemory::prefetch_write`): the device read
/// that line on the ring's last lap, and a run of posts otherwise waited
/// for each line's ownership in turn. Only a free slot is touched, never
/// one the device has yet to read, and only within a burst. `bench ring`'s
/// batch, 6 alternating pairs on two vCPUs without a shared L3: median +2
/// %, and no repetition under 10 M/s (2 of 6 before); 8 slots ahead was too
/// close to gain.
const WRITE_AHEAD_SLOTS: u32 = 32;

/// `d` as eight little-endian words, with `tag` in bits 31:16 of word 0
/// (the descriptor layout: opcode, flags, tag, aux).
#[inline]
fn with_tag(d: &CommandDescriptor, tag: u16) -> [u64; 8] {
    let mut w: [u64; 8] = zerocopy::transmute!(*d);
    for x in &mut w {
        *x = u64::from_le(*x);
    }
    w[0] = (w[0] & !0xFFFF_0000) | u64::from(tag) << 16;
    w
}

fn wait_until<T>(
    timeout: Duration,
    what: &'static str,
    mut ready: impl FnMut() -> Option<T>,
    status: impl Fn() -> u32,
) -> Result<T, DriverError> {
    let start = Instant::now();
    loop {
        if let Some(v) = ready() {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            return Err(DriverError::BringUpTimeout { what, timeout, status: status() });
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl<D: NicDevice> Drop for Driver<D> {
    fn drop(&mut self) {
        // Stop the device, and wait until it says so, before the rings are
        // unmapped (they are dropped after this).
        self.dev.write32(regs::CONTROL, 0);
        let stopped = wait_until(
            self.cfg.bringup_timeout.min(Duration::from_millis(100)),
            "stop",
            || {
                let s = Status::from_bits_truncate(self.dev.read32(regs::STATUS));
                (!s.contains(Status::ENABLED)).then_some(())
            },
            || self.dev.read32(regs::STATUS),
        );
        if let Err(e) = stopped {
            // The buffers stay valid until the IOMMU unmaps them, so this is
            // safe; reset so the device stops touching them at all.
            tracing::warn!("{e}; resetting before the rings are unmapped");
            self.dev.write32(regs::CONTROL, Control::RESET.bits());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicsync_vfio::MockDevice;

    fn quick() -> DriverConfig {
        DriverConfig { bringup_timeout: Duration::from_millis(20), ..Default::default() }
    }

    #[test]
    fn refuses_a_device_that_is_not_nicsync() {
        let m = MockDevice::healthy();
        m.set(regs::DEVICE_ID, 0x8086_1234);
        let e = Driver::probe(m, quick()).map(|_| ()).err();
        assert!(matches!(e, Some(DriverError::NotNicsync { found: 0x8086_1234 })), "{e:?}");
    }

    #[test]
    fn refuses_other_abi_majors_with_advice() {
        for (major, side) in [(ABI_MAJOR + 1, "host software"), (ABI_MAJOR - 1, "device firmware")] {
            let m = MockDevice::healthy();
            m.set(regs::ABI_VERSION, regs::pack_version(major, 3));
            let e = Driver::probe(m, quick()).map(|_| ()).err();
            let msg = e.as_ref().map(|e| e.to_string()).unwrap_or_default();
            assert!(matches!(e, Some(DriverError::AbiMismatch { .. })), "{msg}");
            assert!(msg.contains(&format!("{major}.3")) && msg.contains(side), "{msg}");
        }
    }

    #[test]
    fn names_missing_capabilities() {
        let m = MockDevice::healthy();
        m.set(regs::CAPABILITIES, (Capabilities::all() - Capabilities::SNAPSHOT).bits());
        let e = Driver::probe(m, quick()).map(|_| ()).err();
        assert!(matches!(e, Some(DriverError::MissingCapabilities(c)) if c == Capabilities::SNAPSHOT), "{e:?}");
    }

    #[test]
    fn times_out_on_a_device_that_never_enables() {
        let m = MockDevice::healthy();
        let e = Driver::probe(m, quick()).map(|_| ()).err();
        assert!(matches!(e, Some(DriverError::BringUpTimeout { what: "enable", .. })), "{e:?}");
    }

    #[test]
    fn programs_rings_before_enabling() {
        let m = std::sync::Arc::new(MockDevice::healthy());
        let _ = Driver::probe(m.clone(), quick());
        let writes = m.writes();
        let pos = |off| writes.iter().position(|(o, _)| *o == off);
        let enable = writes.iter().position(|(o, v)| *o == regs::CONTROL && v & Control::ENABLE.bits() != 0);
        for r in [regs::CMD_BASE_LO, regs::CPL_BASE_LO, regs::EVT_BASE_LO, regs::TABLE_CAPACITY] {
            assert!(pos(r) < enable && pos(r).is_some(), "register {r:#x} written after ENABLE");
        }
        assert_eq!(writes.first(), Some(&(regs::CONTROL, Control::RESET.bits())));
    }

    /// A device gone from the bus reads all ones: clearing the sync hold
    /// must not write back RESET (which would empty the card).
    #[test]
    fn clearing_the_sync_hold_of_an_all_ones_device_writes_no_reset() {
        let m = std::sync::Arc::new(MockDevice::healthy());
        m.set(regs::STATUS, (Status::READY | Status::ENABLED).bits());
        let mut drv = Driver::probe(m.clone(), quick()).expect("probe");
        m.set(regs::CONTROL, u32::MAX);
        drv.set_sync_hold(false).expect("hold");
        let (off, v) = *m.writes().last().expect("a write");
        assert_eq!(off, regs::CONTROL);
        assert_eq!(v & Control::RESET.bits(), 0, "RESET written back: {v:#x}");
        assert_eq!(v & Control::SYNC_HOLD.bits(), 0);
    }

    #[test]
    fn rejects_bad_ring_sizes() {
        let cfg = DriverConfig { cmd_ring_log2: 1, ..quick() };
        assert!(matches!(Driver::probe(MockDevice::healthy(), cfg), Err(DriverError::Config(_))));
    }
}
