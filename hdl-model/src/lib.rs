//! Software model of the nicsync FPGA design.
//!
//! The model behaves as the hardware would, seen from the host: a BAR0
//! register file with doorbells; command descriptors fetched by DMA through
//! an IOMMU (an address outside every mapped window is a DMA error, never a
//! host crash); completion and event rings with phase bits and interrupt
//! moderation; the connection table in fixed-capacity card memory as a
//! bucketized cuckoo hash; aging that removes expired entries and reports
//! them as events; counters readable through registers; and a cost model
//! that counts the clock cycles the design would spend.
//!
//! Three ways to run it ([`ExecMode`]):
//! * [`ExecMode::Thread`]: its own polling thread, as the real device runs
//!   concurrently with the host (benchmarks, the daemon);
//! * [`ExecMode::Inline`]: every MMIO write runs the design to quiescence
//!   in the caller's thread (deterministic, used by tests);
//! * [`ExecMode::Manual`]: nothing runs until the caller calls
//!   [`Nic::step`] (simulation; one thread can serve several devices with
//!   [`Poller`]).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cost;
pub mod device;
pub mod dma;
pub mod fault;
pub mod rng;
pub mod seal_port;
pub mod sync;
pub mod sync_unit;
#[allow(unsafe_code)]
mod sys;
pub mod table;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

pub use cost::CostParams;
pub use device::{Clock, Core, InterruptSink, ModelConfig, Shared};
pub use dma::{HostMemory, Iommu};
/// Memory helpers for large tables, shared with the host's copy of the
/// card's table: made resident ahead of use, and on huge pages.
pub use sys::{advise_huge_pages, make_resident};

/// How the model's design logic is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecMode {
    /// Runs inside each MMIO write (deterministic).
    Inline,
    /// Runs only when [`Nic::step`] is called.
    Manual,
    /// Runs on a polling thread started with [`Nic::spawn_poller`] or a
    /// shared [`Poller`].
    Thread,
}

/// One modelled device.
pub struct Nic {
    shared: Arc<Shared>,
    /// The design's state, in an allocation of its own: the polling thread
    /// writes it constantly, and it must not share a cache line with the
    /// fields the host reads on every MMIO write (`shared`, `mode`).
    core: Box<CoreCell>,
    mode: ExecMode,
}

/// The core's lock, aligned to cache lines so nothing shares them.
#[repr(align(128))]
struct CoreCell(Mutex<Core>);

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl Nic {
    /// A device out of power-on reset.
    pub fn new(cfg: ModelConfig, mode: ExecMode) -> Arc<Self> {
        let shared = Arc::new(Shared::new(cfg));
        let core = Box::new(CoreCell(Mutex::new(Core::new(shared.clone()))));
        Arc::new(Nic { shared, core, mode })
    }

    /// The execution mode.
    pub fn mode(&self) -> ExecMode {
        self.mode
    }

    /// The host-visible side (registers, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The IOMMU the host maps DMA memory into.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.shared.iommu
    }

    /// Reads a BAR0 register.
    #[inline]
    pub fn mmio_read(&self, off: u32) -> u32 {
        self.shared.mmio_read(off)
    }

    /// Writes a BAR0 register; in [`ExecMode::Inline`] the design then runs
    /// until it has nothing left to do.
    #[inline]
    pub fn mmio_write(&self, off: u32, v: u32) {
        self.shared.mmio_write(off, v);
        if self.mode == ExecMode::Inline {
            self.run_until_idle();
        }
    }

    /// A 64-byte write to the inline doorbell window (word 0 last); in
    /// [`ExecMode::Inline`] the design then runs.
    #[inline]
    pub fn mmio_write_inline(&self, off: u32, words: &[u64; 8]) {
        self.shared.mmio_write_inline(off, words);
        if self.mode == ExecMode::Inline {
            self.run_until_idle();
        }
    }

    /// Makes the device a cluster member: its sync unit sends the changes
    /// of connections marked for sync and applies its peers'.
    pub fn attach_sync(&self, unit: sync_unit::SyncUnit) {
        self.core().attach_sync(unit);
    }

    /// A descriptor readable when a sync frame arrives, for a device thread
    /// that sleeps while idle ([`Idle::Wait`]); `None` without a sync unit
    /// or on a wire that has none.
    pub fn sync_readiness_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.core().sync_readiness_fd()
    }

    /// The sync unit's counters, if the device is a cluster member.
    pub fn sync_stats(&self) -> Option<sync_unit::UnitStats> {
        self.core().sync_stats()
    }

    /// Installs where interrupts go (None: interrupts are not wired).
    pub fn set_interrupt_sink(&self, sink: Option<Arc<dyn InterruptSink>>) {
        self.shared.set_interrupt_sink(sink);
    }

    /// Locks the design state (tests inspect the table through it).
    pub fn core(&self) -> MutexGuard<'_, Core> {
        self.core.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the command pipeline on the calling thread until it has nothing
    /// left to do (bounded), if no other thread runs the design now: a host
    /// thread that would otherwise wait for a sleeping device thread to wake
    /// does the device's work itself. `None` when the design is busy on
    /// another thread (its lock is taken) or still had work after the
    /// bound: then its own thread must run; `Some(did_anything)` when it
    /// was left with nothing to do.
    pub fn try_run(&self) -> Option<Helped> {
        let mut c = self.try_core()?;
        // The thread that keeps the design's time was asleep.
        c.sample_clock();
        for n in 0..POLL_BATCH {
            if !c.poll() {
                return Some(Helped { did: n > 0, next_timer: c.time_to_next_timer() });
            }
        }
        None
    }

    /// [`Nic::try_run`] for the sync port: takes in what arrived on it and
    /// applies it on the calling thread (a host woken by the frame itself,
    /// rather than by the device thread's interrupt after it was woken by
    /// the frame), then runs the command pipeline. `None` when the design
    /// is busy on another thread.
    pub fn try_take_input(&self) -> Option<Helped> {
        let mut c = self.try_core()?;
        // (sync_fast samples the clock before the polls that follow it.)
        let mut did = false;
        for _ in 0..POLL_BATCH {
            let more = c.sync_fast() | c.poll();
            did |= more;
            if !more {
                break;
            }
        }
        Some(Helped { did, next_timer: c.time_to_next_timer() })
    }

    /// The design state if no other thread holds it now.
    fn try_core(&self) -> Option<MutexGuard<'_, Core>> {
        match self.core.0.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Runs one poll plus housekeeping; returns whether anything was done.
    pub fn step(&self) -> bool {
        let mut c = self.core();
        c.sample_clock();
        let a = c.poll();
        let b = c.housekeeping();
        a || b
    }

    /// Steps until a step does nothing (bounded, in case the host keeps
    /// ringing from another thread).
    pub fn run_until_idle(&self) {
        let mut c = self.core();
        c.sample_clock();
        for _ in 0..1_000_000 {
            let a = c.poll();
            let b = c.housekeeping();
            if !(a || b) {
                break;
            }
        }
    }

    /// Advances a virtual clock (no effect on a real one). In
    /// [`ExecMode::Inline`] the design then runs its timers and aging.
    pub fn advance_time(&self, d: Duration) {
        if let Clock::Virtual(ns) = &self.shared.clock {
            ns.fetch_add(d.as_nanos() as u64, Ordering::AcqRel);
        }
        if self.mode == ExecMode::Inline {
            self.run_until_idle();
        }
    }

    /// Starts a polling thread that runs this device until the handle is
    /// dropped. `on_start` runs first in the new thread (pin it there).
    pub fn spawn_poller(self: &Arc<Self>, on_start: impl FnOnce() + Send + 'static) -> std::io::Result<Poller> {
        Poller::spawn(vec![self.clone()], on_start)
    }
}

/// What a host thread that ran the design itself ([`Nic::try_run`],
/// [`Nic::try_take_input`]) left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Helped {
    /// Whether it did anything.
    pub did: bool,
    /// When the design's next timed work falls due (a partial frame's
    /// flush, an acknowledgement, a coalesced interrupt): a sleeping device
    /// thread must be woken to recompute its sleep if that is sooner than
    /// it planned to wake.
    pub next_timer: Option<Duration>,
}

/// A polling thread serving one or more devices in turn. Stops and joins
/// when dropped.
#[derive(Debug)]
pub struct Poller {
    stop: Arc<AtomicBool>,
    waiter: Option<Arc<dyn IdleWait>>,
    thread: Option<JoinHandle<()>>,
    devices: usize,
}

/// How a polling thread sleeps until work comes ([`Idle::Wait`]): the
/// device side of a doorbell and of the sync port's receive interrupt.
///
/// The protocol closes the race with a doorbell rung just as the thread
/// goes to sleep: the thread calls [`IdleWait::arm`], polls every device
/// once more, and only then [`IdleWait::wait`]s; whoever rings a doorbell
/// (or raises any other wake-up) after writing it checks the armed flag
/// with sequentially consistent ordering and wakes the thread.
pub trait IdleWait: Send + Sync + std::fmt::Debug {
    /// The thread is about to sleep: wake-ups from now on must reach it.
    fn arm(&self);
    /// Sleeps until a wake-up or `timeout` (housekeeping still runs that
    /// often).
    fn wait(&self, timeout: Duration);
    /// The thread is awake and polling again.
    fn disarm(&self);
    /// Wakes the thread now, whether or not it is armed (it is being
    /// stopped).
    fn wake(&self);
}

/// What a polling thread does when its devices have no work.
#[derive(Clone, Debug, Default)]
pub enum Idle {
    /// Keep spinning: lowest latency, one core used up (benchmarks, a
    /// dedicated core on an appliance).
    #[default]
    Spin,
    /// After `after_sweeps` sweeps over every device found nothing to do,
    /// sleep `nap` between sweeps until work comes: a wake-up costs up to
    /// `nap` of latency, and an idle device costs almost no CPU (several
    /// members on one small machine).
    Nap {
        /// Idle sweeps (each `POLL_BATCH` polls per device) before napping.
        after_sweeps: u32,
        /// Sleep between sweeps while idle.
        nap: Duration,
    },
    /// After `after_sweeps` idle sweeps, sleep until a doorbell, a sync
    /// frame or `max_wait` (an interrupt-driven device): an idle device
    /// costs almost no CPU and wakes within a thread wake-up (microseconds),
    /// not a nap.
    Wait {
        /// Idle sweeps before sleeping.
        after_sweeps: u32,
        /// Longest sleep (timers: aging, retransmission).
        max_wait: Duration,
        /// What it sleeps on.
        waiter: Arc<dyn IdleWait>,
    },
}

/// After a sleep: the devices' time moves on before their next commands
/// stamp expiries with it (housekeeping, which also samples it, runs only
/// after a turn of polls).
fn sample_clocks(nics: &[Arc<Nic>]) {
    for nic in nics {
        nic.core().sample_clock();
    }
}

/// Polls per turn when one thread serves several devices.
const MULTI_DEVICE_TURN: u32 = 8;

/// Idle polls of a device's turn between runs of its sync port's fast path
/// (the first idle poll of a turn runs it too, so a device sharing the
/// thread, whose turn is [`MULTI_DEVICE_TURN`] polls, reads its port once a
/// turn). Over UDP each run costs a receive system call even when nothing
/// came; one every 4 polls slowed a one-way delta over loopback from 5.3 to
/// 6.0 us (the poller spent its time in empty reads), and one every poll to
/// 9.5 us. Counting idle polls across turns instead (one read every two
/// turns) found a peer's frames later and was slower still.
const SYNC_POLL_EVERY: u32 = 16;

/// Polls between checks of the stop flag and runs of housekeeping.
const POLL_BATCH: u32 = 256;

impl Poller {
    /// Starts one thread for `nics`, busy-polling each in turn.
    pub fn spawn(nics: Vec<Arc<Nic>>, on_start: impl FnOnce() + Send + 'static) -> std::io::Result<Poller> {
        Self::spawn_with(nics, Idle::Spin, on_start)
    }

    /// Starts one thread for `nics`, polling each in turn, and behaving as
    /// `idle` says when none has work.
    pub fn spawn_with(
        nics: Vec<Arc<Nic>>,
        idle: Idle,
        on_start: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Poller> {
        let stop = Arc::new(AtomicBool::new(false));
        let devices = nics.len();
        let waiter = match &idle {
            Idle::Wait { waiter, .. } => Some(waiter.clone()),
            _ => None,
        };
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("nicsync-device".into()).spawn(move || {
            on_start();
            let mut idle_sweeps = 0u32;
            // Several devices take short turns, so that none waits long for
            // the thread (a device's latency is the others' turn length);
            // housekeeping still comes every POLL_BATCH polls of a device.
            let single = nics.len() == 1;
            let turn = if single { POLL_BATCH } else { MULTI_DEVICE_TURN };
            let mut polled = vec![0u32; nics.len()];
            // Per device: its sync port delivered a frame at its last look
            // and may hold more.
            let mut rx_more = vec![false; nics.len()];
            while !flag.load(Ordering::Relaxed) {
                let mut busy = false;
                for (i, nic) in nics.iter().enumerate() {
                    // The lock is held for a burst of polls and released
                    // between bursts, so tests can inspect the core. With
                    // several devices, one that another thread runs now (a
                    // host assisting it) is left to that thread for this
                    // sweep, not waited for, and the sweep is not idle. A
                    // thread of one device waits for it as before: it has
                    // nothing else to do, and a sweep taken for idle sent a
                    // daemon's device thread to sleep while its host ran it
                    // (`bench conntrack`'s live part ended further behind).
                    let mut g = if single {
                        nic.core()
                    } else if let Some(g) = nic.try_core() {
                        g
                    } else {
                        busy = true;
                        continue;
                    };
                    let mut k = 0;
                    while k < turn {
                        k += 1;
                        if g.poll() {
                            busy = true;
                            if g.take_sync_sent() && nics.len() > 1 {
                                break;
                            }
                        } else if rx_more[i] || (k - 1) % SYNC_POLL_EVERY == 0 {
                            // The sync port runs beside the command
                            // pipeline: frames go out and come in while
                            // the rings are idle, not only at housekeeping.
                            // One frame with updates first; after one, the
                            // other devices get their turn before this port
                            // is read again (a read that finds nothing
                            // costs a system call on UDP, and a peer's next
                            // delta would wait behind it), then up to the
                            // full budget, in case a flood has begun.
                            let frames = if rx_more[i] { sync_unit::RX_BUDGET } else { 1 };
                            rx_more[i] = g.sync_fast_frames(frames);
                            busy |= rx_more[i];
                            if rx_more[i] && nics.len() > 1 {
                                break;
                            }
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    polled[i] += k;
                    if polled[i] >= POLL_BATCH {
                        polled[i] = 0;
                        busy |= g.housekeeping();
                    }
                }
                idle_sweeps = if busy { 0 } else { idle_sweeps.saturating_add(1) };
                match &idle {
                    Idle::Spin => {}
                    Idle::Nap { after_sweeps, nap } => {
                        if idle_sweeps >= *after_sweeps {
                            std::thread::sleep(*nap);
                            sample_clocks(&nics);
                        }
                    }
                    Idle::Wait { after_sweeps, max_wait, waiter } => {
                        if idle_sweeps >= *after_sweeps {
                            waiter.arm();
                            std::sync::atomic::fence(Ordering::SeqCst);
                            // One more look after arming: a doorbell rung
                            // before the flag was seen is found here.
                            let mut work = false;
                            let mut wait = *max_wait;
                            for nic in &nics {
                                let mut g = nic.core();
                                work |= g.poll() | g.sync_fast();
                                if let Some(t) = g.time_to_next_timer() {
                                    wait = wait.min(t);
                                }
                            }
                            if work {
                                idle_sweeps = 0;
                            } else if !wait.is_zero() {
                                waiter.wait(wait);
                                sample_clocks(&nics);
                            }
                            waiter.disarm();
                        }
                    }
                }
            }
        })?;
        Ok(Poller { stop, waiter, thread: Some(thread), devices })
    }

    /// Devices this thread serves.
    pub fn devices(&self) -> usize {
        self.devices
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = &self.waiter {
            w.wake();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
