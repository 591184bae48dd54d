//! A scriptable register file for driver unit tests: registers hold what
//! the test put there, every write is logged, and DMA buffers are plain
//! memory that nothing reads. It models no behaviour beyond CONTROL.RESET
//! self-clearing, so tests can present a device that is wrong in exactly
//! one way (bad id, old ABI, missing capability, never ready).

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nicsync_fwif::regs;

use crate::dma::DmaMemory;
use crate::{DeviceError, DmaBuffer, NicDevice};

/// A register file with scripted contents.
#[derive(Debug, Default)]
pub struct MockDevice {
    regs: Mutex<HashMap<u32, u32>>,
    writes: Mutex<Vec<(u32, u32)>>,
    next_iova: AtomicU64,
}

impl MockDevice {
    /// An empty register file (every register reads 0).
    pub fn new() -> Self {
        MockDevice { next_iova: AtomicU64::new(0x1000_0000), ..Default::default() }
    }

    /// A register file whose header looks like a healthy nicsync device
    /// that is READY.
    pub fn healthy() -> Self {
        let m = Self::new();
        m.set(regs::DEVICE_ID, regs::DEVICE_ID_VALUE);
        m.set(regs::ABI_VERSION, regs::pack_version(nicsync_fwif::ABI_MAJOR, nicsync_fwif::ABI_MINOR));
        m.set(regs::CAPABILITIES, regs::Capabilities::all().bits());
        m.set(regs::STATUS, regs::Status::READY.bits());
        m.set(regs::TABLE_MAX_CAPACITY, 1 << 20);
        m.set(regs::CLOCK_MHZ, 250);
        m
    }

    /// Sets a register's value.
    pub fn set(&self, off: u32, v: u32) {
        self.regs.lock().unwrap_or_else(PoisonError::into_inner).insert(off, v);
    }

    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<(u32, u32)> {
        self.writes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl NicDevice for MockDevice {
    fn read32(&self, offset: u32) -> u32 {
        self.regs.lock().unwrap_or_else(PoisonError::into_inner).get(&offset).copied().unwrap_or(0)
    }

    fn write32(&self, offset: u32, value: u32) {
        self.writes.lock().unwrap_or_else(PoisonError::into_inner).push((offset, value));
        let stored = if offset == regs::CONTROL { value & !regs::Control::RESET.bits() } else { value };
        self.set(offset, stored);
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
        let mem = Arc::new(DmaMemory::allocate(len, false)?);
        let iova = self.next_iova.fetch_add(mem.len() as u64, Ordering::Relaxed);
        Ok(DmaBuffer::new(mem, iova, None))
    }

    fn irq_fd(&self, _vector: u16) -> Option<BorrowedFd<'_>> {
        None
    }

    fn reset(&self) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported { backend: "mock", what: "function-level reset" })
    }

    fn describe(&self) -> String {
        "mock".into()
    }
}
