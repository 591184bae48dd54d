//! Interrupt-driven completion waiting for async code (tokio `AsyncFd`
//! on the device's completion eventfd).
//!
//! [`AsyncCompletions::wait`] makes the checks the driver's own wait makes
//! ([`Driver::wait`]): a device found `FATAL` or reset by itself, entries
//! with a wrong phase, a completion lost at the end of its batch, a stall,
//! spurious interrupts (counted and slept through). It sleeps on the
//! interrupt in slices, so that a device that raises nothing any more (it
//! reset itself, or went `FATAL`) is noticed within a slice, not at the
//! completion timeout. It does not recover: an error for which
//! [`DriverError::needs_recovery`] holds is returned, and the caller
//! recovers (`ConnTable::recover`, or `Driver::reinit` and
//! `Driver::replay`, docs/faults.md). The eventfd stays the same across a
//! re-initialisation, so the same `AsyncCompletions` serves the device
//! after it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use nicsync_fwif::cpl::Completion;
use nicsync_fwif::regs;
use nicsync_vfio::NicDevice;
use tokio::io::unix::AsyncFd;

use crate::driver::{Driver, DriverError, INTERRUPT_SLICE};

/// A duplicate of the completion eventfd, owned here, so the reactor never
/// holds a descriptor number that the device could close and the process
/// reuse.
#[derive(Debug)]
struct IrqFd(OwnedFd);

impl AsRawFd for IrqFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Waits for completion interrupts in async code.
#[derive(Debug)]
pub struct AsyncCompletions {
    fd: AsyncFd<IrqFd>,
}

impl AsyncCompletions {
    /// Registers the device's completion eventfd with the tokio reactor.
    pub fn new<D: NicDevice>(drv: &Driver<D>) -> Result<Self, DriverError> {
        if drv.config().completion_mode != crate::driver::CompletionMode::Interrupt {
            return Err(DriverError::Config("async completions need CompletionMode::Interrupt".into()));
        }
        let fd = drv
            .device()
            .irq_fd(regs::VECTOR_COMPLETION)
            .ok_or_else(|| DriverError::Config("device has no completion interrupt".into()))?;
        let owned = fd
            .try_clone_to_owned()
            .map_err(|e| nicsync_vfio::DeviceError::Io { what: "duplicate the interrupt eventfd", source: e })?;
        let fd = AsyncFd::new(IrqFd(owned))
            .map_err(|e| nicsync_vfio::DeviceError::Io { what: "register eventfd with tokio", source: e })?;
        Ok(AsyncCompletions { fd })
    }

    /// Waits until the completion of `tag` arrives, sleeping on the
    /// interrupt between checks. Bounded by the driver's completion
    /// timeout; fails as [`Driver::wait`] does.
    pub async fn wait<D: NicDevice>(&self, drv: &mut Driver<D>, tag: u16) -> Result<Completion, DriverError> {
        if let Some(r) = drv.outcome(tag) {
            return r;
        }
        let start = Instant::now();
        loop {
            drv.reap();
            if let Some(c) = drv.take_done(tag) {
                return Ok(c);
            }
            if drv.take_lost(tag) {
                return Err(DriverError::CompletionLost(tag));
            }
            let Some(left) = drv.check_wait(tag, start)? else { continue };
            match tokio::time::timeout(left.min(INTERRUPT_SLICE), self.fd.readable()).await {
                Ok(Ok(mut guard)) => {
                    // Drained before the ring is looked at again: an
                    // interrupt raised after this wakes the next sleep.
                    drv.count_wakeup();
                    drv.take_interrupts();
                    guard.clear_ready();
                }
                Ok(Err(e)) => {
                    return Err(nicsync_vfio::DeviceError::Io { what: "wait for interrupt", source: e }.into())
                }
                Err(_) => {}
            }
        }
    }
}

/// Waits for event interrupts in async code: the device wrote an event (a
/// peer's update applied, an entry aged) and the loop should read the event
/// ring now rather than at its next tick ([`DriverConfig::event_interrupts`]
/// with polled completions).
///
/// [`DriverConfig::event_interrupts`]: crate::driver::DriverConfig::event_interrupts
#[derive(Debug)]
pub struct AsyncEvents {
    fd: AsyncFd<IrqFd>,
}

impl AsyncEvents {
    /// Registers the device's event eventfd with the tokio reactor; `None`
    /// when the driver was not asked for event interrupts, the device has
    /// none, or completions are interrupt-driven: the driver's waits then
    /// drain the event vector too ([`Driver::take_interrupts`], which
    /// counts every signal against the device's count), and a drain the
    /// reactor had not seen yet would swallow the wake-up. The caller reads
    /// the event ring on its ticks instead.
    pub fn new<D: NicDevice>(drv: &Driver<D>) -> Option<Self> {
        if !drv.config().event_interrupts || drv.config().completion_mode == crate::driver::CompletionMode::Interrupt {
            return None;
        }
        let owned = drv.device().irq_fd(regs::VECTOR_EVENT)?.try_clone_to_owned().ok()?;
        AsyncFd::new(IrqFd(owned)).ok().map(|fd| AsyncEvents { fd })
    }

    /// Waits for the next event interrupt and takes it.
    pub async fn wait(&self) {
        if let Ok(mut g) = self.fd.readable().await {
            nicsync_vfio::drain_eventfd(std::os::fd::AsFd::as_fd(&g.get_inner().0));
            g.clear_ready();
        }
    }
}

/// Waits in async code for input the device takes on the host's thread
/// ([`NicDevice::input_fd`]: an emulated device's sync port while its own
/// thread sleeps when idle). The loop that wakes on a peer's frame applies
/// it itself ([`NicDevice::take_input`]) and reads the resulting events in
/// the same turn: one wake-up on the path from the peer instead of two (the
/// device thread's, then the host's on its interrupt).
#[derive(Debug)]
pub struct AsyncInput {
    fd: AsyncFd<IrqFd>,
}

impl AsyncInput {
    /// Registers the device's input descriptor with the tokio reactor;
    /// `None` when the device has none.
    pub fn new<D: NicDevice>(drv: &Driver<D>) -> Option<Self> {
        let owned = drv.device().input_fd()?;
        AsyncFd::new(IrqFd(owned)).ok().map(|fd| AsyncInput { fd })
    }

    /// Waits until input is there. Readiness is cleared before the caller
    /// takes the input, so a frame that arrives meanwhile wakes it again;
    /// what the caller leaves (the device thread took it first, or more
    /// than a turn came) the device's own thread takes.
    pub async fn wait(&self) {
        if let Ok(mut g) = self.fd.readable().await {
            g.clear_ready();
        }
    }
}
