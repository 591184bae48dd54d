//! Interrupt-driven completion waiting for async code (tokio `AsyncFd`
//! on the device's completion eventfd).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nicsync_fwif::cpl::Completion;
use nicsync_fwif::regs::{self, IrqCause};
use nicsync_vfio::NicDevice;
use tokio::io::unix::AsyncFd;

use crate::driver::{Driver, DriverError};

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
    /// interrupt between checks. Bounded by the driver's completion timeout.
    pub async fn wait<D: NicDevice>(&self, drv: &mut Driver<D>, tag: u16) -> Result<Completion, DriverError> {
        let limit = drv.config().completion_timeout;
        let start = std::time::Instant::now();
        loop {
            drv.reap();
            if let Some(c) = drv.take_done(tag) {
                return Ok(c);
            }
            if drv.take_lost(tag) {
                return Err(DriverError::CompletionLost(tag));
            }
            let waited = start.elapsed();
            if waited >= limit {
                return Err(DriverError::Timeout { tag, waited });
            }
            match tokio::time::timeout(limit - waited, self.fd.readable()).await {
                Ok(Ok(mut guard)) => {
                    if let Some(fd) = drv.device().irq_fd(regs::VECTOR_COMPLETION) {
                        nicsync_vfio::drain_eventfd(fd);
                    }
                    drv.device().write32(regs::IRQ_STATUS, IrqCause::COMPLETION.bits());
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
