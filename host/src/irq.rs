//! Interrupt-driven completion waiting for async code (tokio `AsyncFd`
//! on the device's completion eventfd).

use std::os::fd::{AsRawFd, RawFd};

use nicsync_fwif::cpl::Completion;
use nicsync_fwif::regs::{self, IrqCause};
use nicsync_vfio::NicDevice;
use tokio::io::unix::AsyncFd;

use crate::driver::{Driver, DriverError};

/// The completion eventfd's number. It is only registered with the
/// reactor, never closed through this type: the device owns the fd.
#[derive(Debug)]
struct IrqFdNumber(RawFd);

impl AsRawFd for IrqFdNumber {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Waits for completion interrupts in async code. Must be dropped before
/// the device it was made from.
#[derive(Debug)]
pub struct AsyncCompletions {
    fd: AsyncFd<IrqFdNumber>,
}

impl AsyncCompletions {
    /// Registers the device's completion eventfd with the tokio reactor.
    pub fn new<D: NicDevice>(drv: &Driver<D>) -> Result<Self, DriverError> {
        let fd = drv
            .device()
            .irq_fd(regs::VECTOR_COMPLETION)
            .ok_or_else(|| DriverError::Config("device has no completion interrupt".into()))?;
        let fd = AsyncFd::new(IrqFdNumber(fd.as_raw_fd()))
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
