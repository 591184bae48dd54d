//! Device access for nicsync.
//!
//! The driver in `nicsync` needs very little from a device: 32-bit register
//! reads and writes in BAR0, a doorbell write, DMA-able memory mapped at an
//! IOVA the device can reach, interrupt eventfds and a reset. That is the
//! [`NicDevice`] trait, owned by this project (the `pci-driver` crate's own
//! traits are sealed). Three implementations:
//!
//! * [`EmulatedDevice`]: the in-process software model of the FPGA design
//!   (`nicsync-model`), the embedded default;
//! * [`VfioDevice`]: a real device bound to `vfio-pci`, through `pci-driver`;
//! * [`MockDevice`]: a scriptable register file for driver unit tests.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[allow(unsafe_code)]
pub mod dma;
pub mod emulated;
pub mod mock;
pub mod real;

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

pub use dma::{drain_eventfd, pin_current_thread, wait_any_readable, wait_readable, DmaMemory, EventFd};
pub use emulated::EmulatedDevice;
pub use mock::MockDevice;
pub use real::VfioDevice;

/// Errors from device access.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// DMA memory could not be allocated or locked.
    #[error("cannot allocate {len} bytes of DMA memory: {reason}")]
    DmaAlloc {
        /// Bytes asked for.
        len: usize,
        /// Why.
        reason: String,
    },
    /// The IOMMU refused a mapping.
    #[error("cannot map {len} bytes at IOVA {iova:#x} for DMA: {reason}")]
    DmaMap {
        /// IOVA asked for.
        iova: u64,
        /// Length.
        len: usize,
        /// Why.
        reason: String,
    },
    /// An access fell outside a DMA buffer.
    #[error("access of {len} bytes at offset {offset} is outside a {size}-byte DMA buffer")]
    OutOfBounds {
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
        /// Buffer size.
        size: usize,
    },
    /// An atomic access was not 8-byte aligned.
    #[error("atomic access at offset {offset} is not 8-byte aligned")]
    Misaligned {
        /// Offset.
        offset: usize,
    },
    /// VFIO is not available on this host.
    #[error("VFIO is not available: {0}")]
    VfioUnavailable(String),
    /// The PCI device is not usable through VFIO.
    #[error("PCI device {bdf}: {reason}")]
    NotBound {
        /// The device address.
        bdf: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device did not come out of reset.
    #[error("device reset failed: {0}")]
    Reset(String),
    /// A feature this backend does not have.
    #[error("not supported by the {backend} backend: {what}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What was asked for.
        what: &'static str,
    },
}

/// What the nicsync driver needs from a device.
///
/// Register offsets are BAR0 byte offsets from `nicsync_fwif::regs`.
/// Implementations must be cheap to call from the data path: `write32` of
/// the doorbell is on every batch.
pub trait NicDevice: Send + Sync {
    /// Reads a 32-bit register.
    fn read32(&self, offset: u32) -> u32;
    /// Writes a 32-bit register.
    fn write32(&self, offset: u32, value: u32);
    /// A 64-byte write-combined write of `words` at `offset` (64-aligned),
    /// words 1..8 first and word 0 last: the inline doorbell
    /// (`regs::CMD_INLINE`). The default issues it as 32-bit writes in that
    /// order.
    fn write_inline(&self, offset: u32, words: &[u64; 8]) {
        for (i, w) in words.iter().enumerate().skip(1).chain(words.iter().enumerate().take(1)) {
            let off = offset + 8 * i as u32;
            self.write32(off, *w as u32);
            self.write32(off + 4, (*w >> 32) as u32);
        }
    }
    /// Whether [`NicDevice::write_inline`] reaches the device as one
    /// write-combined burst (true for the emulated bus). The driver uses the
    /// inline doorbell only then; the VFIO backend maps BAR0 uncached today.
    fn write_combining(&self) -> bool {
        false
    }
    /// Allocates DMA-able memory of at least `len` bytes and maps it into
    /// the device's IOMMU domain.
    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError>;
    /// The eventfd signalled by interrupt `vector`, if interrupts are wired.
    fn irq_fd(&self, vector: u16) -> Option<BorrowedFd<'_>>;
    /// Resets the device at the bus level (function-level reset); the
    /// driver's CONTROL.RESET is tried first.
    fn reset(&self) -> Result<(), DeviceError>;
    /// A one-line description ("emulated", "vfio 0000:01:00.0").
    fn describe(&self) -> String;
    /// Lets the device run on the calling thread while the driver waits
    /// for it: an emulated device whose own thread sleeps while idle runs
    /// its command pipeline here if that thread is not running it (asleep,
    /// or waiting for a CPU the caller holds). Returns whether it did any
    /// work. Hardware runs by itself: the default does nothing.
    fn assist(&self) -> bool {
        false
    }
    /// A descriptor that becomes readable when the device has input it
    /// would take on the calling thread through [`NicDevice::take_input`]
    /// (an emulated device's sync port, while its own thread sleeps when
    /// idle). Asking for it makes the caller responsible for watching it:
    /// the device's sleeping thread then wakes for it only at its longest
    /// sleep. `None`: the device takes its input by itself (hardware).
    fn input_fd(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }
    /// Takes the input [`NicDevice::input_fd`] signalled on the calling
    /// thread if the device's own thread is not at it already; returns
    /// whether anything was done.
    fn take_input(&self) -> bool {
        false
    }
}

/// Forwards [`NicDevice`] through a smart pointer.
macro_rules! forward_nic_device {
    ($ptr:ident) => {
        impl<T: NicDevice + ?Sized> NicDevice for $ptr<T> {
            fn read32(&self, offset: u32) -> u32 {
                (**self).read32(offset)
            }
            fn write32(&self, offset: u32, value: u32) {
                (**self).write32(offset, value)
            }
            fn write_inline(&self, offset: u32, words: &[u64; 8]) {
                (**self).write_inline(offset, words)
            }
            fn write_combining(&self) -> bool {
                (**self).write_combining()
            }
            fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
                (**self).alloc_dma(len)
            }
            fn irq_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
                (**self).irq_fd(vector)
            }
            fn reset(&self) -> Result<(), DeviceError> {
                (**self).reset()
            }
            fn describe(&self) -> String {
                (**self).describe()
            }
            fn assist(&self) -> bool {
                (**self).assist()
            }
            fn input_fd(&self) -> Option<std::os::fd::OwnedFd> {
                (**self).input_fd()
            }
            fn take_input(&self) -> bool {
                (**self).take_input()
            }
        }
    };
}
forward_nic_device!(Arc);
forward_nic_device!(Box);

/// Undoes an IOMMU mapping when the buffer is dropped.
pub trait DmaUnmap: Send + Sync {
    /// Removes the mapping of `len` bytes at `iova`.
    fn unmap(&self, iova: u64, len: usize);
}

/// DMA memory mapped for a device: host memory plus the IOVA at which the
/// device sees it. Dropping it unmaps it.
pub struct DmaBuffer {
    mem: Arc<DmaMemory>,
    iova: u64,
    unmap: Option<Arc<dyn DmaUnmap>>,
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.mem.len())
            .finish()
    }
}

impl DmaBuffer {
    /// Wraps memory already mapped at `iova`; `unmap` runs on drop.
    pub fn new(mem: Arc<DmaMemory>, iova: u64, unmap: Option<Arc<dyn DmaUnmap>>) -> Self {
        DmaBuffer { mem, iova, unmap }
    }

    /// The device-visible address of byte 0.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The memory.
    pub fn mem(&self) -> &DmaMemory {
        &self.mem
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if let Some(u) = self.unmap.take() {
            u.unmap(self.iova, self.mem.len());
        }
    }
}

/// Which device to open, as chosen on the command line or in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The in-process emulated device (the default).
    Emulated,
    /// A PCI device bound to vfio-pci, by address (e.g. `0000:01:00.0`).
    Vfio(String),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "emulated" || s.is_empty() {
            return Ok(DeviceSpec::Emulated);
        }
        let bdf = s.strip_prefix("vfio:").unwrap_or(s);
        if real::parse_bdf(bdf).is_some() {
            Ok(DeviceSpec::Vfio(bdf.to_string()))
        } else {
            Err(format!("'{s}' is neither 'emulated' nor a PCI address like 0000:01:00.0"))
        }
    }
}
