//! The emulated device: the FPGA design's software model, in process.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nicsync_fwif::regs;
use nicsync_model::fault::FaultInjector;
use nicsync_model::{ExecMode, HostMemory, InterruptSink, ModelConfig, Nic, Poller};

use crate::dma::{pin_current_thread, DmaMemory, EventFd};
use crate::{DeviceError, DmaBuffer, DmaUnmap, NicDevice};

/// First IOVA handed out; buffers are separated by an unmapped guard page
/// so that a DMA overrunning one buffer faults instead of hitting the next.
const IOVA_BASE: u64 = 0x1_0000_0000;
const GUARD: u64 = 4096;

impl HostMemory for DmaMemory {
    fn len(&self) -> usize {
        DmaMemory::len(self)
    }
    fn read(&self, off: usize, out: &mut [u8]) -> bool {
        DmaMemory::read(self, off, out).is_ok()
    }
    fn write(&self, off: usize, data: &[u8]) -> bool {
        DmaMemory::write(self, off, data).is_ok()
    }
    fn store_u64_release(&self, off: usize, v: u64) -> bool {
        self.store_u64(off, v, Ordering::Release).is_ok()
    }
    fn prefetch(&self, off: usize) {
        DmaMemory::prefetch(self, off)
    }
    fn publish_pairs(&self, off: usize, pairs: &[(u64, u64)]) -> bool {
        DmaMemory::publish_pairs(self, off, pairs).is_ok()
    }
}

struct IrqLines {
    fds: Vec<EventFd>,
}

impl InterruptSink for IrqLines {
    fn raise(&self, vector: u16) {
        if let Some(fd) = self.fds.get(vector as usize) {
            fd.signal();
        }
    }
}

struct EmulatedUnmap {
    nic: Arc<Nic>,
}

impl DmaUnmap for EmulatedUnmap {
    fn unmap(&self, iova: u64, _len: usize) {
        if !self.nic.iommu().unmap(iova) {
            tracing::warn!(iova, "unmap of an IOVA that was not mapped");
        }
    }
}

/// The device side of doorbells and of the sync port's receive interrupt
/// for a polling thread that sleeps while idle ([`nicsync_model::Idle::Wait`]).
#[derive(Debug)]
struct DeviceWaker {
    /// Signalled by host MMIO writes while the thread is armed.
    doorbell: EventFd,
    /// A sleeping poller serves the device ([`EmulatedDevice::waiting_idle`]):
    /// only then do host writes pay for the check below.
    in_use: AtomicBool,
    armed: AtomicBool,
    /// Times a host write signalled the sleeping thread (it could not run
    /// the design itself, or left timed work for it).
    signals: AtomicU64,
    /// When the sleeping thread plans to wake, in ns since `epoch`.
    wake_at_ns: AtomicU64,
    /// The host watches the sync port and takes what arrives itself
    /// ([`NicDevice::input_fd`]): the sleeping thread leaves the port to
    /// it, so that a frame wakes one thread, not two racing for the design.
    host_input: AtomicBool,
    epoch: std::time::Instant,
    nic: Arc<Nic>,
    /// The sync port's descriptor (a duplicate), fetched when first needed.
    sync_fd: Mutex<Option<std::os::fd::OwnedFd>>,
}

impl DeviceWaker {
    /// After a host write: wake the thread if it is (about to be) asleep.
    /// A spinning poller never sleeps: its host's writes stop at the
    /// relaxed load (the ring path is measured in nanoseconds).
    ///
    /// A thread that is (about to be) asleep is not woken when the design
    /// is free: the writer runs it itself ([`Nic::try_run`]) and finds its
    /// completions at once, where waking the thread costs tens of
    /// microseconds, and milliseconds when the woken thread is queued
    /// behind the writer on a busy CPU (the writer spins for it meanwhile).
    /// When the design is busy (the thread is taking its last look before
    /// sleeping), or has more than a turn of work, the thread is signalled
    /// as before, so no write is missed.
    #[inline]
    fn rung(&self) {
        if !self.in_use.load(Ordering::Relaxed) {
            return;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.armed.load(Ordering::SeqCst) {
            let helped = self.nic.try_run();
            self.after_help(helped);
        }
    }

    /// After a host thread ran the design (or could not): the sleeping
    /// thread is signalled if the design still has work, or timed work due
    /// before the thread planned to wake (so that it sleeps for the right
    /// time). Returns whether the host thread did anything.
    fn after_help(&self, helped: Option<nicsync_model::Helped>) -> bool {
        let wake = match helped {
            None => true,
            Some(h) => h.next_timer.is_some_and(|t| {
                let due = self.since_epoch_ns().saturating_add(t.as_nanos() as u64);
                due < self.wake_at_ns.load(Ordering::SeqCst)
            }),
        };
        if wake && self.armed.load(Ordering::SeqCst) {
            self.signals.fetch_add(1, Ordering::Relaxed);
            self.doorbell.signal();
        }
        helped.is_some_and(|h| h.did)
    }

    fn since_epoch_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

impl nicsync_model::IdleWait for DeviceWaker {
    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn wait(&self, timeout: std::time::Duration) {
        let wake_at = self.since_epoch_ns().saturating_add(timeout.as_nanos() as u64);
        self.wake_at_ns.store(wake_at, Ordering::SeqCst);
        let mut sync = self.sync_fd.lock().unwrap_or_else(PoisonError::into_inner);
        if sync.is_none() {
            *sync = self.nic.sync_readiness_fd();
        }
        let mut fds = vec![self.doorbell.as_fd()];
        if let Some(f) = sync.as_ref().filter(|_| !self.host_input.load(Ordering::Relaxed)) {
            fds.push(f.as_fd());
        }
        // A failed wait degrades to a nap of `timeout` at worst.
        if crate::dma::wait_any_readable(&fds, timeout).is_err() {
            std::thread::sleep(timeout);
        }
        self.doorbell.take();
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    fn wake(&self) {
        self.doorbell.signal();
    }
}

/// The in-process emulated nicsync device.
pub struct EmulatedDevice {
    nic: Arc<Nic>,
    waker: Arc<DeviceWaker>,
    irq: Arc<IrqLines>,
    next_iova: AtomicU64,
    unmap: Arc<EmulatedUnmap>,
    poller: Mutex<Option<Poller>>,
    hugepages: bool,
    /// Emulated devices of other members on this machine that a host
    /// thread waiting on this one runs meanwhile ([`EmulatedDevice::assist_peers`]).
    peers: Mutex<Vec<Arc<Nic>>>,
    /// Whether `peers` holds any: a wait looks here, not at the lock.
    has_peers: AtomicBool,
}

impl std::fmt::Debug for EmulatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedDevice").field("mode", &self.nic.mode()).finish_non_exhaustive()
    }
}

impl EmulatedDevice {
    /// A device with the given model configuration and execution mode. In
    /// [`ExecMode::Thread`], call [`EmulatedDevice::start_poller`] (or serve
    /// [`EmulatedDevice::nic`] from a shared [`Poller`]).
    pub fn new(cfg: ModelConfig, mode: ExecMode) -> Result<Self, DeviceError> {
        let nic = Nic::new(cfg, mode);
        let fds = (0..regs::VECTOR_COUNT).map(|_| EventFd::new()).collect::<Result<Vec<_>, _>>()?;
        let irq = Arc::new(IrqLines { fds });
        nic.set_interrupt_sink(Some(irq.clone()));
        let waker = Arc::new(DeviceWaker {
            doorbell: EventFd::new()?,
            in_use: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            signals: AtomicU64::new(0),
            wake_at_ns: AtomicU64::new(0),
            host_input: AtomicBool::new(false),
            epoch: std::time::Instant::now(),
            nic: nic.clone(),
            sync_fd: Mutex::new(None),
        });
        Ok(EmulatedDevice {
            waker,
            unmap: Arc::new(EmulatedUnmap { nic: nic.clone() }),
            nic,
            irq,
            next_iova: AtomicU64::new(IOVA_BASE),
            poller: Mutex::new(None),
            hugepages: false,
            peers: Mutex::new(Vec::new()),
            has_peers: AtomicBool::new(false),
        })
    }

    /// Emulated devices of other members sharing this machine (an
    /// in-process cluster, a benchmark's peer) that a host thread waiting
    /// for this device's completions runs meanwhile, when no other thread
    /// runs them at that moment: their sync ports' input and their command
    /// pipelines ([`Nic::try_take_input`]). On a machine with fewer cores
    /// than emulated devices, the time a host spends waiting for its card
    /// then does the peer card's work instead of spinning, beside the
    /// polling thread that runs this card.
    pub fn assist_peers(&self, peers: Vec<Arc<Nic>>) {
        let mut held = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        self.has_peers.store(!peers.is_empty(), Ordering::Relaxed);
        *held = peers;
    }

    /// The default embedded device: default model, deterministic inline
    /// execution.
    pub fn inline() -> Result<Self, DeviceError> {
        Self::new(ModelConfig { virtual_clock: true, ..Default::default() }, ExecMode::Inline)
    }

    /// Back DMA buffers with huge pages where the system has them.
    pub fn with_hugepages(mut self, on: bool) -> Self {
        self.hugepages = on;
        self
    }

    /// The model.
    pub fn nic(&self) -> &Arc<Nic> {
        &self.nic
    }

    /// The model's fault injector: arm faults here (from any thread) to
    /// exercise the host's recovery (see `nicsync_model::fault`).
    pub fn faults(&self) -> FaultInjector {
        self.nic.shared().faults().clone()
    }

    /// Starts the device's own polling thread, pinned to `cpu` if given.
    pub fn start_poller(&self, cpu: Option<usize>) -> Result<(), DeviceError> {
        self.start_poller_with(cpu, nicsync_model::Idle::Spin)
    }

    /// Starts the device's own polling thread with an idle policy.
    pub fn start_poller_with(&self, cpu: Option<usize>, idle: nicsync_model::Idle) -> Result<(), DeviceError> {
        let p = nicsync_model::Poller::spawn_with(vec![self.nic.clone()], idle, move || {
            if let Some(c) = cpu {
                if let Err(e) = pin_current_thread(c) {
                    tracing::warn!("cannot pin the device thread to CPU {c}: {e}");
                }
            }
        })
        .map_err(|e| DeviceError::Io { what: "spawn device thread", source: e })?;
        *self.poller.lock().unwrap_or_else(PoisonError::into_inner) = Some(p);
        Ok(())
    }

    /// An idle policy for [`EmulatedDevice::start_poller_with`] that sleeps
    /// until a doorbell, a sync frame or `max_wait` once `after_sweeps`
    /// sweeps found nothing: low idle CPU and a wake-up in microseconds (an
    /// interrupt-driven device, where [`nicsync_model::Idle::Nap`] costs up
    /// to a nap of latency).
    pub fn waiting_idle(&self, after_sweeps: u32, max_wait: std::time::Duration) -> nicsync_model::Idle {
        // Set before any poller can arm: the thread that starts the poller
        // publishes it with the spawn.
        self.waker.in_use.store(true, Ordering::Relaxed);
        nicsync_model::Idle::Wait { after_sweeps, max_wait, waiter: self.waker.clone() }
    }

    /// Times a host write woke the sleeping device thread (see
    /// [`EmulatedDevice::waiting_idle`]); writes the host thread ran itself
    /// are not counted.
    pub fn doorbell_signals(&self) -> u64 {
        self.waker.signals.load(Ordering::Relaxed)
    }

    /// Whether the device thread is asleep, or about to be (armed).
    pub fn device_thread_armed(&self) -> bool {
        self.waker.armed.load(Ordering::SeqCst)
    }

    /// Stops the polling thread, if any.
    pub fn stop_poller(&self) {
        self.poller.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

impl NicDevice for EmulatedDevice {
    fn assist(&self) -> bool {
        let mut did = self.waker.in_use.load(Ordering::Relaxed) && self.waker.after_help(self.nic.try_run());
        if self.has_peers.load(Ordering::Relaxed) {
            for peer in self.peers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                did |= peer.try_take_input().is_some_and(|h| h.did);
            }
        }
        did
    }

    fn input_fd(&self) -> Option<std::os::fd::OwnedFd> {
        if !self.waker.in_use.load(Ordering::Relaxed) {
            return None;
        }
        let fd = self.nic.sync_readiness_fd()?;
        // From now on the host takes the frames; the thread still takes
        // them in its sweeps and when its longest sleep ends.
        self.waker.host_input.store(true, Ordering::Relaxed);
        Some(fd)
    }

    fn take_input(&self) -> bool {
        self.waker.in_use.load(Ordering::Relaxed) && self.waker.after_help(self.nic.try_take_input())
    }

    #[inline]
    fn read32(&self, offset: u32) -> u32 {
        self.nic.mmio_read(offset)
    }

    #[inline]
    fn write32(&self, offset: u32, value: u32) {
        self.nic.mmio_write(offset, value);
        self.waker.rung();
    }

    #[inline]
    fn write_inline(&self, offset: u32, words: &[u64; 8]) {
        self.nic.mmio_write_inline(offset, words);
        self.waker.rung();
    }

    fn write_combining(&self) -> bool {
        true
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
        let mem = Arc::new(DmaMemory::allocate(len, self.hugepages)?);
        let span = mem.len() as u64 + GUARD;
        let iova = self.next_iova.fetch_add(span, Ordering::Relaxed);
        self.nic.iommu().map(iova, mem.clone()).map_err(|e| DeviceError::DmaMap {
            iova,
            len,
            reason: e.to_string(),
        })?;
        Ok(DmaBuffer::new(mem, iova, Some(self.unmap.clone())))
    }

    fn irq_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.irq.fds.get(vector as usize).map(|f| f.as_fd())
    }

    fn reset(&self) -> Result<(), DeviceError> {
        // A function-level reset of the model is its CONTROL.RESET.
        self.nic.mmio_write(regs::CONTROL, regs::Control::RESET.bits());
        Ok(())
    }

    fn describe(&self) -> String {
        format!("emulated ({:?} execution)", self.nic.mode())
    }
}

impl Drop for EmulatedDevice {
    fn drop(&mut self) {
        self.stop_poller();
    }
}
