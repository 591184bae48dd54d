//! Opening the device named on the command line or in a config file.

use std::os::fd::BorrowedFd;

use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::{DeviceError, DeviceSpec, DmaBuffer, EmulatedDevice, NicDevice, VfioDevice};

/// Either backend, with static dispatch on the data path.
#[derive(Debug)]
pub enum AnyDevice {
    /// The in-process emulated device.
    Emulated(EmulatedDevice),
    /// A real device through VFIO.
    Vfio(VfioDevice),
}

/// Options for the emulated device.
#[derive(Clone, Debug)]
pub struct EmulatedOptions {
    /// Model configuration.
    pub model: ModelConfig,
    /// Execution mode; Thread starts the polling thread.
    pub mode: ExecMode,
    /// CPU to pin the polling thread to.
    pub cpu: Option<usize>,
    /// What the polling thread does when idle.
    pub idle: nicsync_model::Idle,
}

impl Default for EmulatedOptions {
    fn default() -> Self {
        EmulatedOptions { model: ModelConfig::default(), mode: ExecMode::Thread, cpu: None, idle: Default::default() }
    }
}

/// Opens a device.
pub fn open(spec: &DeviceSpec, emu: &EmulatedOptions) -> Result<AnyDevice, DeviceError> {
    match spec {
        DeviceSpec::Emulated => {
            let d = EmulatedDevice::new(emu.model.clone(), emu.mode)?;
            if emu.mode == ExecMode::Thread {
                d.start_poller_with(emu.cpu, emu.idle.clone())?;
            }
            Ok(AnyDevice::Emulated(d))
        }
        DeviceSpec::Vfio(bdf) => Ok(AnyDevice::Vfio(VfioDevice::open(bdf)?)),
    }
}

impl AnyDevice {
    /// The emulated device, if that is what this is.
    pub fn emulated(&self) -> Option<&EmulatedDevice> {
        match self {
            AnyDevice::Emulated(e) => Some(e),
            AnyDevice::Vfio(_) => None,
        }
    }
}

impl NicDevice for AnyDevice {
    #[inline]
    fn read32(&self, offset: u32) -> u32 {
        match self {
            AnyDevice::Emulated(d) => d.read32(offset),
            AnyDevice::Vfio(d) => d.read32(offset),
        }
    }
    #[inline]
    fn write32(&self, offset: u32, value: u32) {
        match self {
            AnyDevice::Emulated(d) => d.write32(offset, value),
            AnyDevice::Vfio(d) => d.write32(offset, value),
        }
    }
    #[inline]
    fn write_inline(&self, offset: u32, words: &[u64; 8]) {
        match self {
            AnyDevice::Emulated(d) => d.write_inline(offset, words),
            AnyDevice::Vfio(d) => d.write_inline(offset, words),
        }
    }
    fn write_combining(&self) -> bool {
        match self {
            AnyDevice::Emulated(d) => d.write_combining(),
            AnyDevice::Vfio(d) => d.write_combining(),
        }
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
        match self {
            AnyDevice::Emulated(d) => d.alloc_dma(len),
            AnyDevice::Vfio(d) => d.alloc_dma(len),
        }
    }
    fn irq_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        match self {
            AnyDevice::Emulated(d) => d.irq_fd(vector),
            AnyDevice::Vfio(d) => d.irq_fd(vector),
        }
    }
    fn reset(&self) -> Result<(), DeviceError> {
        match self {
            AnyDevice::Emulated(d) => d.reset(),
            AnyDevice::Vfio(d) => d.reset(),
        }
    }
    fn assist(&self) -> bool {
        match self {
            AnyDevice::Emulated(d) => d.assist(),
            AnyDevice::Vfio(d) => d.assist(),
        }
    }
    fn input_fd(&self) -> Option<std::os::fd::OwnedFd> {
        match self {
            AnyDevice::Emulated(d) => d.input_fd(),
            AnyDevice::Vfio(d) => d.input_fd(),
        }
    }
    fn take_input(&self) -> bool {
        match self {
            AnyDevice::Emulated(d) => d.take_input(),
            AnyDevice::Vfio(d) => d.take_input(),
        }
    }
    fn describe(&self) -> String {
        match self {
            AnyDevice::Emulated(d) => d.describe(),
            AnyDevice::Vfio(d) => d.describe(),
        }
    }
}
