//! The real device: an FPGA SmartNIC bound to `vfio-pci`, driven through the
//! `pci-driver` crate.
//!
//! # Flow
//!
//! [`VfioDevice::open`] first runs [`precheck`] against `/sys` and `/dev`, so
//! that the usual set-up mistakes (IOMMU off, `vfio-pci` not loaded, device
//! bound to another driver, group node not accessible) come back as errors
//! that say what to run, rather than as a bare `ENOENT` from deep inside
//! `pci-driver`. Then:
//!
//! 1. `VfioPciDevice::open` creates a VFIO container holding the device's
//!    IOMMU group (type1v2 IOMMU) and opens the device in it;
//! 2. BAR0 must be at least [`regs::BAR0_SIZE`] bytes and read/write; it is
//!    memory-mapped when VFIO allows it;
//! 3. memory decoding and bus mastering are enabled in the command register
//!    (bus mastering is what lets the device DMA into the rings);
//! 4. if the device has MSI-X, [`regs::VECTOR_COUNT`] vectors are wired to
//!    eventfds ([`NicDevice::irq_fd`]); otherwise the driver polls.
//!
//! [`NicDevice::alloc_dma`] allocates [`DmaMemory`] (2 MiB huge pages when
//! available), locks it, and maps it into the container's IOMMU domain at an
//! IOVA from a bump allocator that starts at [`IOVA_BASE`], aligned to the
//! buffer's page size and kept inside the IOMMU's valid IOVA ranges. IOVAs
//! are never reused: the driver allocates its rings once. Dropping the
//! [`DmaBuffer`] unmaps it; the pages are freed only after a successful
//! unmap (the guard and its one `unsafe` call live in [`crate::dma`]).
//!
//! # Memory access discipline
//!
//! Registers are accessed with `pci-driver`'s region `read_le_u32` /
//! `write_le_u32`. On a memory-mapped BAR these are raw-pointer
//! `read_volatile` / `write_volatile`; on a BAR that VFIO will not let us
//! map they are `pread` / `pwrite` on the VFIO device file (slower, one
//! system call per register). Neither path ever forms a Rust reference into
//! BAR or DMA memory, which the device may change at any time.
//!
//! # Testing
//!
//! This path cannot run on a machine without a device bound to `vfio-pci`
//! (and an IOMMU): CI and the emulated backend never reach it. Its unit tests
//! cover what can be checked without hardware: address parsing, every
//! pre-check message (against fake sysfs and /dev trees), and IOVA placement.
//!
//! # Binding a device (once per boot)
//!
//! ```text
//! # kernel command line: intel_iommu=on (Intel) or amd_iommu=on (AMD), reboot
//! sudo modprobe vfio-pci
//! echo vfio-pci     | sudo tee /sys/bus/pci/devices/0000:01:00.0/driver_override
//! echo 0000:01:00.0 | sudo tee /sys/bus/pci/devices/0000:01:00.0/driver/unbind  # if bound
//! echo 0000:01:00.0 | sudo tee /sys/bus/pci/drivers_probe
//! sudo chown $USER /dev/vfio/<group>   # or run as root; also raise `ulimit -l`
//! ```

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nicsync_fwif::regs;
use pci_driver::backends::vfio::{VfioContainer, VfioPciDevice};
use pci_driver::device::PciDevice;
use pci_driver::regions::{MappedOwningPciRegion, OwningPciRegion, PciRegion, Permissions};

use crate::dma::iommu_map::IommuMapping;
use crate::dma::EventFd;
use crate::{DeviceError, DmaBuffer, DmaMemory, DmaUnmap, NicDevice};

/// First IOVA handed out by the DMA bump allocator (4 GiB: clear of the
/// low addresses that some platforms reserve).
pub const IOVA_BASE: u64 = 0x1_0000_0000;

/// Page size of huge-page-backed [`DmaMemory`].
const HUGE_PAGE: u64 = 2 << 20;
/// Page size of normal [`DmaMemory`].
const SMALL_PAGE: u64 = 4096;

/// The driver `vfio-pci` registers under in sysfs.
const VFIO_DRIVER: &str = "vfio-pci";

/// Parses a PCI address `DDDD:BB:DD.F` (domain, bus, device, function, in
/// hex as `lspci -D` prints them), or `BB:DD.F` meaning domain 0.
///
/// Field widths are exact (4, 2, 2 and 1 hex digits), the device must be
/// below 32 and the function below 8. Returns `(domain, bus, device,
/// function)`.
pub fn parse_bdf(s: &str) -> Option<(u16, u8, u8, u8)> {
    let (domain, rest) = match s.len() {
        12 => (s.get(..4)?, s.get(4..)?.strip_prefix(':')?),
        7 => ("0000", s),
        _ => return None,
    };
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let domain = hex_field(domain, 4)?;
    let bus = hex_field(bus, 2)?;
    let device = hex_field(device, 2)?;
    let function = hex_field(function, 1)?;
    if device >= 32 || function >= 8 {
        return None;
    }
    Some((
        u16::try_from(domain).ok()?,
        u8::try_from(bus).ok()?,
        u8::try_from(device).ok()?,
        u8::try_from(function).ok()?,
    ))
}

/// Exactly `width` hex digits (no sign, no prefix) as a number.
fn hex_field(s: &str, width: usize) -> Option<u32> {
    if s.len() != width || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// The canonical sysfs spelling of a PCI address (`0000:01:00.0`).
fn canonical_bdf(s: &str) -> Option<String> {
    let (d, b, dev, f) = parse_bdf(s)?;
    Some(format!("{d:04x}:{b:02x}:{dev:02x}.{f:x}"))
}

fn not_bound(bdf: &str, reason: impl Into<String>) -> DeviceError {
    DeviceError::NotBound { bdf: bdf.to_string(), reason: reason.into() }
}

/// The last component of a symlink's target (`.../drivers/nvme` → `nvme`),
/// `None` if `link` is not a symlink. Dangling links are fine.
fn link_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The commands that bind `bdf` to vfio-pci (`sysfs` is the sysfs root).
fn bind_commands(sysfs: &Path, bdf: &str, bound: bool) -> String {
    let dev = sysfs.join("bus/pci/devices").join(bdf);
    let probe = sysfs.join("bus/pci/drivers_probe");
    let unbind =
        if bound { format!("echo {bdf} | sudo tee {}; ", dev.join("driver/unbind").display()) } else { String::new() };
    format!(
        "sudo modprobe vfio-pci; {unbind}echo {VFIO_DRIVER} | sudo tee {}; echo {bdf} | sudo tee {}",
        dev.join("driver_override").display(),
        probe.display()
    )
}

/// Checks, before `pci-driver` is involved, that `bdf` can be opened
/// through VFIO, and explains how to fix it when it cannot.
///
/// `sysfs` and `dev` are the roots of sysfs and devtmpfs (`/sys`, `/dev`;
/// tests pass fake trees). Returns the device's sysfs directory
/// (`<sysfs>/bus/pci/devices/<bdf>`).
///
/// The IOMMU group is checked before the driver: without an IOMMU group
/// `vfio-pci` cannot bind, so "bind it to vfio-pci" would be the wrong
/// advice.
pub fn precheck(sysfs: &Path, dev: &Path, bdf: &str) -> Result<PathBuf, DeviceError> {
    let Some(bdf) = canonical_bdf(bdf) else {
        return Err(not_bound(
            bdf,
            "not a PCI address: expected DDDD:BB:DD.F in hex (device 00-1f, function 0-7) such \
             as 0000:01:00.0; `lspci -D` lists them",
        ));
    };
    let bdf = bdf.as_str();

    let vfio_dir = dev.join("vfio");
    if !vfio_dir.is_dir() {
        return Err(DeviceError::VfioUnavailable(format!(
            "{} does not exist: the vfio-pci module is not loaded or the IOMMU is off. Enable the \
             IOMMU on the kernel command line (intel_iommu=on for Intel, amd_iommu=on for AMD; \
             also VT-d/AMD-Vi in the firmware) and reboot, then run `sudo modprobe vfio-pci`",
            vfio_dir.display()
        )));
    }
    let container = vfio_dir.join("vfio");
    if !container.exists() {
        return Err(DeviceError::VfioUnavailable(format!(
            "{} (the VFIO container device) does not exist: the vfio module is not fully loaded; \
             run `sudo modprobe vfio-pci`",
            container.display()
        )));
    }

    let dir = sysfs.join("bus/pci/devices").join(bdf);
    if !dir.is_dir() {
        return Err(not_bound(
            bdf,
            format!("no such PCI device ({} does not exist); `lspci -D` lists the devices", dir.display()),
        ));
    }

    let Some(group_name) = link_name(&dir.join("iommu_group")) else {
        return Err(not_bound(
            bdf,
            format!(
                "the device has no IOMMU group ({} is missing): the IOMMU is off or not supported. \
                 VFIO needs it to confine the device's DMA. Enable it on the kernel command line \
                 (intel_iommu=on or amd_iommu=on; VT-d/AMD-Vi in the firmware) and reboot",
                dir.join("iommu_group").display()
            ),
        ));
    };
    let Ok(group) = group_name.parse::<u32>() else {
        return Err(not_bound(bdf, format!("unexpected IOMMU group name '{group_name}' in sysfs")));
    };

    match link_name(&dir.join("driver")) {
        None => {
            return Err(not_bound(
                bdf,
                format!(
                    "the device is not bound to any driver; bind it to {VFIO_DRIVER}: {}",
                    bind_commands(sysfs, bdf, false)
                ),
            ))
        }
        Some(driver) if driver != VFIO_DRIVER => {
            return Err(not_bound(
                bdf,
                format!(
                    "the device is bound to driver '{driver}', not {VFIO_DRIVER}; rebind it: {}",
                    bind_commands(sysfs, bdf, true)
                ),
            ))
        }
        Some(_) => {}
    }

    let node = vfio_dir.join(group.to_string());
    if !node.exists() {
        let noiommu = vfio_dir.join(format!("noiommu-{group}"));
        let reason = if noiommu.exists() {
            format!(
                "IOMMU group {group} is in VFIO no-IOMMU mode ({} exists); nicsync needs a real \
                 IOMMU to map DMA memory: enable it (intel_iommu=on or amd_iommu=on) and unset \
                 enable_unsafe_noiommu_mode",
                noiommu.display()
            )
        } else {
            format!(
                "{} does not exist although the device is bound to {VFIO_DRIVER}: IOMMU group \
                 {group} is not usable. Every device in the group must be bound to {VFIO_DRIVER} \
                 or to no driver (see {})",
                node.display(),
                sysfs.join(format!("kernel/iommu_groups/{group}/devices")).display()
            )
        };
        return Err(not_bound(bdf, reason));
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(&node) {
        return Err(group_open_error(bdf, &node, group, &e));
    }
    Ok(dir)
}

/// Explains why the VFIO group node `node` could not be opened.
fn group_open_error(bdf: &str, node: &Path, group: u32, e: &io::Error) -> DeviceError {
    let node = node.display();
    let reason = match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::PermissionDenied, _) => format!(
            "permission denied opening {node}: run as root, or give your user the group node \
             (`sudo chown $USER {node}` or a udev rule) and raise the locked-memory limit \
             (`ulimit -l`), since VFIO pins DMA memory"
        ),
        (_, Some(libc::EBUSY)) => format!(
            "{node} is busy: IOMMU group {group} is already open in another process (another \
             nicsync instance, a VM, or a DPDK/SPDK application)"
        ),
        _ => format!("cannot open {node}: {e}"),
    };
    not_bound(bdf, reason)
}

/// Turns a `pci-driver` open failure into an actionable error.
fn open_error(bdf: &str, e: &io::Error) -> DeviceError {
    let hint = match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::PermissionDenied, _) => "; run as root or give your user the /dev/vfio nodes",
        (_, Some(libc::EBUSY)) => "; the IOMMU group is already open in another process",
        _ if e.to_string().contains("viable") => "",
        _ => "; check `dmesg` for vfio messages, and that every device in the IOMMU group is bound to vfio-pci or unbound",
    };
    not_bound(bdf, format!("VFIO could not open the device: {e}{hint}"))
}

/// Rounds `v` up to a multiple of `align` (a power of two).
fn align_up(v: u64, align: u64) -> Option<u64> {
    if !align.is_power_of_two() {
        return None;
    }
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// Where to put `len` bytes with the given alignment: the lowest address at
/// or above `cursor` such that the whole range fits in one of `ranges`
/// (sorted, non-overlapping, end exclusive). An empty `ranges` means the
/// IOMMU reported no constraint.
fn place_iova(cursor: u64, len: u64, align: u64, ranges: &[Range<u64>]) -> Option<u64> {
    let everything = 0..u64::MAX;
    let ranges = if ranges.is_empty() { std::slice::from_ref(&everything) } else { ranges };
    ranges.iter().find_map(|r| {
        let start = align_up(cursor.max(r.start), align)?;
        let end = start.checked_add(len)?;
        (end <= r.end).then_some(start)
    })
}

/// Counts an error; true when it should be logged (the 1st, 2nd, 4th, 8th...
/// occurrence), so that a polling loop cannot flood the log.
fn should_log(counter: &AtomicU64) -> bool {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    n.is_power_of_two()
}

/// BAR0: memory-mapped when VFIO allows it, else accessed by system calls.
enum Bar0 {
    Mapped(MappedOwningPciRegion),
    Unmapped(OwningPciRegion),
}

impl Bar0 {
    fn region(&self) -> &dyn PciRegion {
        match self {
            Bar0::Mapped(m) => m,
            Bar0::Unmapped(u) => u,
        }
    }
}

/// The IOVA bump allocator of one container.
struct IovaSpace {
    next: Mutex<u64>,
    /// Valid IOVA ranges reported by VFIO (sorted, end exclusive).
    ranges: Vec<Range<u64>>,
    /// IOMMU page size: IOVAs and host addresses must be multiples of it.
    align: u64,
    /// Most simultaneous mappings the IOMMU driver allows.
    max_mappings: u32,
}

impl IovaSpace {
    /// Reserves `len` bytes aligned to `align`.
    fn reserve(&self, len: u64, align: u64) -> Option<u64> {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let iova = place_iova(*next, len, align.max(self.align), &self.ranges)?;
        *next = iova.checked_add(len)?;
        Some(iova)
    }
}

/// Undoes one DMA buffer's IOMMU mapping when the buffer is dropped.
struct VfioUnmap {
    mapping: IommuMapping,
    bdf: String,
}

impl DmaUnmap for VfioUnmap {
    fn unmap(&self, iova: u64, len: usize) {
        if iova != self.mapping.iova() || len != self.mapping.len() {
            tracing::warn!(
                bdf = %self.bdf,
                "DMA unmap of {len} bytes at {iova:#x} does not match the mapping of {} bytes at {:#x}; unmapping the latter",
                self.mapping.len(),
                self.mapping.iova()
            );
        }
        if let Err(e) = self.mapping.unmap() {
            tracing::warn!(
                bdf = %self.bdf,
                "IOMMU unmap of {} bytes at {:#x} failed, leaking the buffer: {e}",
                self.mapping.len(),
                self.mapping.iova()
            );
        }
    }
}

/// A nicsync device bound to `vfio-pci`.
pub struct VfioDevice {
    bdf: String,
    bar0: Bar0,
    /// Eventfds of MSI-X vectors 0..n; empty when interrupts are not wired.
    irqs: Vec<EventFd>,
    iova: IovaSpace,
    container: Arc<VfioContainer>,
    pci: VfioPciDevice,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
}

impl fmt::Debug for VfioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioDevice")
            .field("bdf", &self.bdf)
            .field("bar0_mapped", &matches!(self.bar0, Bar0::Mapped(_)))
            .field("msix_vectors", &self.irqs.len())
            .finish_non_exhaustive()
    }
}

impl VfioDevice {
    /// Opens the device at PCI address `bdf` (`0000:01:00.0` or `01:00.0`),
    /// which must be bound to `vfio-pci`; see the module docs for the
    /// set-up and the steps taken.
    pub fn open(bdf: &str) -> Result<VfioDevice, DeviceError> {
        // The host orders its ring writes before the doorbell with
        // `fence(Release)`, which on x86-64 (uncached BAR0, TSO) is enough.
        // Elsewhere a device-scope store barrier (Linux `wmb()`) would be
        // needed, which Rust does not emit (abi.md 7): refused, rather
        // than run with a doorbell that can overtake its descriptors.
        if !cfg!(target_arch = "x86_64") {
            return Err(DeviceError::Unsupported {
                backend: "vfio",
                what: "real devices on this CPU architecture (x86-64 only: the doorbell needs a device-scope barrier here)",
            });
        }
        let dir = precheck(Path::new("/sys"), Path::new("/dev"), bdf)?;
        // precheck accepted it, so it parses.
        let bdf = canonical_bdf(bdf).unwrap_or_else(|| bdf.to_string());
        let pci = VfioPciDevice::open(&dir).map_err(|e| open_error(&bdf, &e))?;

        let bar0 = Self::setup_bar0(&bdf, &pci)?;
        enable_bus_master(&pci).map_err(|source| DeviceError::Io { what: "enable PCI bus mastering", source })?;

        let container = Arc::clone(pci.container());
        let iommu = container.iommu();
        let mut ranges = iommu.valid_iova_ranges().to_vec();
        ranges.sort_by_key(|r| r.start);
        let iova = IovaSpace {
            next: Mutex::new(IOVA_BASE),
            ranges,
            align: (iommu.alignment() as u64).max(SMALL_PAGE),
            max_mappings: iommu.max_num_mappings(),
        };

        let irqs = Self::setup_msix(&bdf, &pci)?;
        tracing::info!(
            bdf = %bdf,
            bar0_mapped = matches!(bar0, Bar0::Mapped(_)),
            msix_vectors = irqs.len(),
            "opened VFIO device"
        );
        Ok(VfioDevice {
            bdf,
            bar0,
            irqs,
            iova,
            container,
            pci,
            read_errors: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        })
    }

    /// Checks BAR0 and maps its register block when possible.
    fn setup_bar0(bdf: &str, pci: &VfioPciDevice) -> Result<Bar0, DeviceError> {
        let Some(bar0) = pci.bar(0) else {
            return Err(not_bound(
                bdf,
                "the device has no BAR0 (or it is disabled): is the nicsync FPGA image loaded?",
            ));
        };
        let size = PciRegion::len(&bar0);
        if size < regs::BAR0_SIZE as u64 {
            return Err(not_bound(
                bdf,
                format!(
                    "BAR0 is {size:#x} bytes, nicsync needs at least {:#x}: is the nicsync FPGA image loaded?",
                    regs::BAR0_SIZE
                ),
            ));
        }
        if PciRegion::permissions(&bar0) != Permissions::ReadWrite {
            return Err(not_bound(bdf, "VFIO does not allow both reading and writing BAR0"));
        }
        if !bar0.is_mappable() {
            tracing::warn!(bdf, "BAR0 cannot be memory-mapped; register access falls back to system calls");
            return Ok(Bar0::Unmapped(bar0));
        }
        match bar0.map(..regs::BAR0_SIZE as u64, Permissions::ReadWrite) {
            Ok(m) => Ok(Bar0::Mapped(m)),
            Err(e) => {
                tracing::warn!(bdf, "cannot mmap BAR0 ({e}); register access falls back to system calls");
                Ok(Bar0::Unmapped(bar0))
            }
        }
    }

    /// Wires MSI-X vectors to eventfds; none when the device has no MSI-X
    /// or enabling fails (the driver then polls).
    fn setup_msix(bdf: &str, pci: &VfioPciDevice) -> Result<Vec<EventFd>, DeviceError> {
        let interrupts = pci.interrupts();
        let msix = interrupts.msi_x();
        let max = msix.max();
        if max == 0 {
            tracing::info!(bdf, "device has no MSI-X; interrupts are not wired, the driver polls");
            return Ok(Vec::new());
        }
        let want = usize::from(regs::VECTOR_COUNT);
        let n = want.min(max);
        if n < want {
            tracing::warn!(bdf, "device offers {max} MSI-X vectors, nicsync uses {want}; wiring {n}");
        }
        let fds = (0..n).map(|_| EventFd::new()).collect::<Result<Vec<_>, _>>()?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        match msix.enable(&raw) {
            Ok(()) => Ok(fds),
            Err(e) => {
                tracing::warn!(bdf, "cannot enable MSI-X ({e}); interrupts are not wired, the driver polls");
                Ok(Vec::new())
            }
        }
    }

    /// The canonical PCI address (`0000:01:00.0`).
    pub fn bdf(&self) -> &str {
        &self.bdf
    }
}

/// Sets memory-space decoding and bus mastering (command register bits 1
/// and 2): without bus mastering the device cannot DMA or send MSI-X.
fn enable_bus_master(pci: &VfioPciDevice) -> io::Result<()> {
    let config = pci.config();
    let command = config.command();
    command.memory_space_enable().write(true)?;
    command.bus_master_enable().write(true)
}

impl NicDevice for VfioDevice {
    fn read32(&self, offset: u32) -> u32 {
        match self.bar0.region().read_le_u32(u64::from(offset)) {
            Ok(v) => v,
            Err(e) => {
                if should_log(&self.read_errors) {
                    tracing::warn!(bdf = %self.bdf, "BAR0 read at {offset:#x} failed: {e}; returning all-ones");
                }
                0xFFFF_FFFF
            }
        }
    }

    fn write32(&self, offset: u32, value: u32) {
        if let Err(e) = self.bar0.region().write_le_u32(u64::from(offset), value) {
            if should_log(&self.write_errors) {
                tracing::warn!(bdf = %self.bdf, "BAR0 write of {value:#x} at {offset:#x} failed: {e}");
            }
        }
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer, DeviceError> {
        let mem = Arc::new(DmaMemory::allocate(len, true)?);
        mem.lock().map_err(|e| match e {
            DeviceError::DmaAlloc { len, reason } => DeviceError::DmaAlloc {
                len,
                reason: format!(
                    "{reason}; raise the locked-memory limit (`ulimit -l`, or LimitMEMLOCK= for a \
                     systemd service): VFIO pins DMA memory"
                ),
            },
            other => other,
        })?;
        let size = mem.len();
        let page = if mem.is_hugepage() { HUGE_PAGE } else { SMALL_PAGE };
        if (mem.host_addr() as usize as u64) % self.iova.align != 0 {
            return Err(DeviceError::DmaMap {
                iova: 0,
                len: size,
                reason: format!("host buffer is not aligned to the IOMMU page size ({:#x})", self.iova.align),
            });
        }
        let Some(iova) = self.iova.reserve(size as u64, page) else {
            return Err(DeviceError::DmaMap {
                iova: 0,
                len: size,
                reason: format!("no room left in the IOMMU's valid IOVA ranges {:x?}", self.iova.ranges),
            });
        };
        let mapping = IommuMapping::map(Arc::clone(&self.container), Arc::clone(&mem), iova).map_err(|e| {
            DeviceError::DmaMap {
                iova,
                len: size,
                reason: format!(
                    "{e} (common causes: the locked-memory limit, `ulimit -l`, is too low for VFIO to \
                     pin the buffer; or the IOMMU's limit of {} mappings is reached)",
                    self.iova.max_mappings
                ),
            }
        })?;
        tracing::debug!(bdf = %self.bdf, iova, len = size, hugepage = mem.is_hugepage(), "mapped DMA buffer");
        let unmap: Arc<dyn DmaUnmap> = Arc::new(VfioUnmap { mapping, bdf: self.bdf.clone() });
        Ok(DmaBuffer::new(mem, iova, Some(unmap)))
    }

    fn irq_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.irqs.get(usize::from(vector)).map(AsFd::as_fd)
    }

    fn reset(&self) -> Result<(), DeviceError> {
        match self.pci.reset() {
            Ok(()) => {
                // The kernel restores the saved config space after a reset;
                // make sure the device can still DMA anyway.
                enable_bus_master(&self.pci)
                    .map_err(|source| DeviceError::Io { what: "re-enable PCI bus mastering after reset", source })
            }
            // VFIO_DEVICE_RESET fails with EINVAL when the device has no
            // reset method the kernel can use (no FLR, PM or bus reset).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
                Err(DeviceError::Unsupported { backend: "vfio", what: "function-level reset (the device offers none)" })
            }
            Err(e) => Err(DeviceError::Reset(format!("VFIO reset of {}: {e}", self.bdf))),
        }
    }

    fn describe(&self) -> String {
        format!("vfio {}", self.bdf)
    }
}

impl Drop for VfioDevice {
    fn drop(&mut self) {
        if !self.irqs.is_empty() {
            if let Err(e) = self.pci.interrupts().msi_x().disable() {
                tracing::warn!(bdf = %self.bdf, "cannot disable MSI-X: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::sync::atomic::AtomicUsize;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn parses_full_and_short_addresses() {
        assert_eq!(parse_bdf("0000:01:00.0"), Some((0, 1, 0, 0)));
        assert_eq!(parse_bdf("abcd:ef:1f.7"), Some((0xabcd, 0xef, 0x1f, 7)));
        assert_eq!(parse_bdf("ABCD:EF:1F.7"), Some((0xabcd, 0xef, 0x1f, 7)));
        assert_eq!(parse_bdf("3b:00.1"), Some((0, 0x3b, 0, 1)));
        assert_eq!(parse_bdf("ffff:ff:1f.7"), Some((0xffff, 0xff, 0x1f, 7)));
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "0000:01:00",
            "0000:01:00.",
            "0000:01:20.0", // device 32
            "0000:01:00.8", // function 8
            "0000:0g:00.0",
            "00000:01:00.0",
            "000:01:00.0",
            "0000:1:00.0",
            "0000:01:0.0",
            "0000:01:00.00",
            "0000-01:00.0",
            "0000:01-00.0",
            "0000:01:00:0",
            "+000:01:00.0",
            "0000:+1:00.0",
            "0x00:01:00.0",
            " 0000:01:00.0",
            "0000:01:00.0 ",
            "1:00.0",
            "01:00.0.0",
            "emulated",
            "vfio:0000:01:00.0",
            "0000:01:00.\u{e9}",
            "\u{e9}000:01:00.0",
        ] {
            assert_eq!(parse_bdf(bad), None, "{bad:?} should be rejected");
        }
    }

    #[test]
    fn canonical_form_is_lowercase_with_domain() {
        assert_eq!(canonical_bdf("3B:00.1").as_deref(), Some("0000:3b:00.1"));
        assert_eq!(canonical_bdf("ABCD:EF:1F.7").as_deref(), Some("abcd:ef:1f.7"));
    }

    /// A fake `/sys` + `/dev` under the temp dir, removed on drop.
    struct Fake {
        root: PathBuf,
    }

    impl Fake {
        fn new(tag: &str) -> io::Result<Fake> {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let root = std::env::temp_dir().join(format!("nicsync-vfio-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("sys/bus/pci/devices"))?;
            std::fs::create_dir_all(root.join("dev"))?;
            Ok(Fake { root })
        }
        fn sys(&self) -> PathBuf {
            self.root.join("sys")
        }
        fn dev(&self) -> PathBuf {
            self.root.join("dev")
        }
        fn with_vfio(self) -> io::Result<Self> {
            std::fs::create_dir_all(self.dev().join("vfio"))?;
            std::fs::write(self.dev().join("vfio/vfio"), b"")?;
            Ok(self)
        }
        fn device_dir(&self, bdf: &str) -> PathBuf {
            self.sys().join("bus/pci/devices").join(bdf)
        }
        fn with_device(self, bdf: &str) -> io::Result<Self> {
            std::fs::create_dir_all(self.device_dir(bdf))?;
            Ok(self)
        }
        fn with_group(self, bdf: &str, group: &str) -> io::Result<Self> {
            symlink(format!("../../../kernel/iommu_groups/{group}"), self.device_dir(bdf).join("iommu_group"))?;
            Ok(self)
        }
        fn with_driver(self, bdf: &str, driver: &str) -> io::Result<Self> {
            symlink(format!("../../../bus/pci/drivers/{driver}"), self.device_dir(bdf).join("driver"))?;
            Ok(self)
        }
        fn with_node(self, name: &str) -> io::Result<Self> {
            std::fs::write(self.dev().join("vfio").join(name), b"")?;
            Ok(self)
        }
        /// A device bound to vfio-pci in group 7, with its group node.
        fn ready(tag: &str, bdf: &str) -> io::Result<Self> {
            Fake::new(tag)?
                .with_vfio()?
                .with_device(bdf)?
                .with_group(bdf, "7")?
                .with_driver(bdf, "vfio-pci")?
                .with_node("7")
        }
        fn check(&self, bdf: &str) -> Result<PathBuf, DeviceError> {
            precheck(&self.sys(), &self.dev(), bdf)
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// The `NotBound` reason, or a description of the wrong outcome.
    fn reason(r: Result<PathBuf, DeviceError>) -> String {
        match r {
            Err(DeviceError::NotBound { reason, .. }) => reason,
            other => format!("unexpected: {other:?}"),
        }
    }

    fn assert_mentions(text: &str, words: &[&str]) {
        for w in words {
            assert!(text.contains(w), "{text:?} should mention {w:?}");
        }
    }

    #[test]
    fn accepts_a_bound_device() -> TestResult {
        let fake = Fake::ready("ok", "0000:01:00.0")?;
        assert_eq!(fake.check("0000:01:00.0")?, fake.device_dir("0000:01:00.0"));
        assert_eq!(fake.check("01:00.0")?, fake.device_dir("0000:01:00.0"));
        let fake = Fake::ready("upper", "0000:0a:1f.7")?;
        assert_eq!(fake.check("0000:0A:1F.7")?, fake.device_dir("0000:0a:1f.7"));
        Ok(())
    }

    #[test]
    fn bad_address_is_explained() -> TestResult {
        let fake = Fake::ready("badaddr", "0000:01:00.0")?;
        let r = fake.check("0000:01:00");
        assert!(matches!(&r, Err(DeviceError::NotBound { bdf, .. }) if bdf == "0000:01:00"));
        assert_mentions(&reason(r), &["not a PCI address", "0000:01:00.0", "lspci -D"]);
        Ok(())
    }

    #[test]
    fn missing_dev_vfio_means_module_or_iommu() -> TestResult {
        let fake = Fake::new("novfio")?.with_device("0000:01:00.0")?;
        match fake.check("0000:01:00.0") {
            Err(DeviceError::VfioUnavailable(msg)) => {
                assert_mentions(&msg, &["vfio-pci", "not loaded", "IOMMU", "intel_iommu=on", "amd_iommu=on"]);
                assert_mentions(&msg, &["modprobe vfio-pci", "/dev/vfio"]);
            }
            other => panic!("expected VfioUnavailable, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn missing_container_node_is_explained() -> TestResult {
        let fake = Fake::new("nocontainer")?.with_device("0000:01:00.0")?;
        std::fs::create_dir_all(fake.dev().join("vfio"))?;
        match fake.check("0000:01:00.0") {
            Err(DeviceError::VfioUnavailable(msg)) => assert_mentions(&msg, &["vfio/vfio", "modprobe vfio-pci"]),
            other => panic!("expected VfioUnavailable, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn missing_device_is_reported() -> TestResult {
        let fake = Fake::new("nodev")?.with_vfio()?;
        let r = fake.check("0000:01:00.0");
        assert!(matches!(&r, Err(DeviceError::NotBound { bdf, .. }) if bdf == "0000:01:00.0"));
        assert_mentions(&reason(r), &["no such PCI device", "lspci -D"]);
        Ok(())
    }

    #[test]
    fn missing_iommu_group_explains_the_iommu() -> TestResult {
        let fake =
            Fake::new("nogroup")?.with_vfio()?.with_device("0000:01:00.0")?.with_driver("0000:01:00.0", "nvme")?;
        assert_mentions(
            &reason(fake.check("0000:01:00.0")),
            &["no IOMMU group", "intel_iommu=on", "amd_iommu=on", "reboot"],
        );
        Ok(())
    }

    #[test]
    fn unbound_device_gets_bind_commands() -> TestResult {
        let fake = Fake::new("nodriver")?.with_vfio()?.with_device("0000:01:00.0")?.with_group("0000:01:00.0", "7")?;
        let msg = reason(fake.check("0000:01:00.0"));
        assert_mentions(&msg, &["not bound to any driver", "modprobe vfio-pci", "driver_override", "drivers_probe"]);
        assert!(!msg.contains("unbind"), "{msg}");
        Ok(())
    }

    #[test]
    fn other_driver_is_named_with_rebind_commands() -> TestResult {
        let fake = Fake::new("nvme")?
            .with_vfio()?
            .with_device("0000:01:00.0")?
            .with_group("0000:01:00.0", "7")?
            .with_driver("0000:01:00.0", "nvme")?;
        let msg = reason(fake.check("0000:01:00.0"));
        assert_mentions(&msg, &["'nvme'", "not vfio-pci", "driver/unbind", "driver_override", "drivers_probe"]);
        assert_mentions(&msg, &["echo vfio-pci", "echo 0000:01:00.0"]);
        Ok(())
    }

    #[test]
    fn odd_group_name_is_reported() -> TestResult {
        let fake = Fake::new("oddgroup")?
            .with_vfio()?
            .with_device("0000:01:00.0")?
            .with_group("0000:01:00.0", "seven")?
            .with_driver("0000:01:00.0", "vfio-pci")?;
        assert_mentions(&reason(fake.check("0000:01:00.0")), &["'seven'"]);
        Ok(())
    }

    #[test]
    fn missing_group_node_explains_viability() -> TestResult {
        let fake = Fake::new("nonode")?
            .with_vfio()?
            .with_device("0000:01:00.0")?
            .with_group("0000:01:00.0", "7")?
            .with_driver("0000:01:00.0", "vfio-pci")?;
        assert_mentions(&reason(fake.check("0000:01:00.0")), &["vfio/7", "group 7", "iommu_groups/7/devices"]);
        Ok(())
    }

    #[test]
    fn noiommu_group_is_refused() -> TestResult {
        let fake = Fake::new("noiommu")?
            .with_vfio()?
            .with_device("0000:01:00.0")?
            .with_group("0000:01:00.0", "7")?
            .with_driver("0000:01:00.0", "vfio-pci")?
            .with_node("noiommu-7")?;
        assert_mentions(&reason(fake.check("0000:01:00.0")), &["no-IOMMU", "noiommu-7"]);
        Ok(())
    }

    #[test]
    fn unreadable_group_node_mentions_permissions() -> TestResult {
        let fake = Fake::ready("perm", "0000:01:00.0")?;
        let node = fake.dev().join("vfio/7");
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o000))?;
        if OpenOptions::new().read(true).write(true).open(&node).is_ok() {
            // Running as root (or with CAP_DAC_OVERRIDE): permissions do not
            // apply; the message itself is covered by `group_open_errors`.
            return Ok(());
        }
        assert_mentions(&reason(fake.check("0000:01:00.0")), &["permission denied", "vfio/7", "chown", "ulimit -l"]);
        Ok(())
    }

    #[test]
    fn unopenable_group_node_is_reported() -> TestResult {
        let fake = Fake::new("isdir")?
            .with_vfio()?
            .with_device("0000:01:00.0")?
            .with_group("0000:01:00.0", "7")?
            .with_driver("0000:01:00.0", "vfio-pci")?;
        // A directory exists but cannot be opened for writing (EISDIR).
        std::fs::create_dir_all(fake.dev().join("vfio/7"))?;
        assert_mentions(&reason(fake.check("0000:01:00.0")), &["cannot open", "vfio/7"]);
        Ok(())
    }

    #[test]
    fn group_open_errors() {
        let node = Path::new("/dev/vfio/7");
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let msg = reason(Err(group_open_error("0000:01:00.0", node, 7, &denied)));
        assert_mentions(&msg, &["permission denied", "/dev/vfio/7", "chown", "root"]);
        let busy = io::Error::from_raw_os_error(libc::EBUSY);
        let msg = reason(Err(group_open_error("0000:01:00.0", node, 7, &busy)));
        assert_mentions(&msg, &["busy", "group 7", "another process"]);
        let other = io::Error::from_raw_os_error(libc::ENXIO);
        assert_mentions(&reason(Err(group_open_error("0000:01:00.0", node, 7, &other))), &["cannot open /dev/vfio/7"]);
    }

    #[test]
    fn open_errors_keep_the_cause() {
        let e = io::Error::other("Group is not viable; are all devices in the group bound to vfio or unbound?");
        assert_mentions(&reason(Err(open_error("0000:01:00.0", &e))), &["not viable"]);
        let e = io::Error::from_raw_os_error(libc::EBUSY);
        assert_mentions(&reason(Err(open_error("0000:01:00.0", &e))), &["another process"]);
    }

    #[test]
    fn open_without_the_device_fails_cleanly() {
        // No machine running these tests has this device bound to vfio-pci.
        assert!(VfioDevice::open("0000:ff:1f.7").is_err());
        assert!(matches!(
            VfioDevice::open("not-a-device"),
            Err(DeviceError::NotBound { .. }) | Err(DeviceError::VfioUnavailable(_))
        ));
    }

    #[test]
    fn iova_placement() {
        const G: u64 = 1 << 30;
        let ranges = [0x1000..0xfee0_0000, 0xfef0_0000..(1 << 48)];
        // Starts at the cursor, aligned.
        assert_eq!(place_iova(IOVA_BASE, 4096, 4096, &ranges), Some(IOVA_BASE));
        assert_eq!(place_iova(IOVA_BASE + 1, 4096, 4096, &ranges), Some(IOVA_BASE + 4096));
        assert_eq!(place_iova(IOVA_BASE + 4096, HUGE_PAGE, HUGE_PAGE, &ranges), Some(IOVA_BASE + HUGE_PAGE));
        // Skips a hole: a buffer that would straddle the MSI window moves past it.
        assert_eq!(place_iova(0xfed0_0000, HUGE_PAGE, HUGE_PAGE, &ranges), Some(0xff00_0000));
        assert_eq!(place_iova(0xfed0_0000, 4096, 4096, &ranges), Some(0xfed0_0000));
        // A cursor below every range moves to the first.
        assert_eq!(place_iova(0, 4096, 4096, &ranges), Some(0x1000));
        // Exhaustion and overflow.
        assert_eq!(place_iova((1 << 48) - 4096, 8192, 4096, &ranges), None);
        assert_eq!(place_iova(u64::MAX - 10, 4096, 4096, &ranges), None);
        assert_eq!(place_iova(IOVA_BASE, u64::MAX, 4096, &ranges), None);
        // No ranges reported: anything goes.
        assert_eq!(place_iova(IOVA_BASE, G, G, &[]), Some(IOVA_BASE));
        // Bad alignment.
        assert_eq!(place_iova(IOVA_BASE, 4096, 3, &ranges), None);
    }

    #[test]
    fn iova_space_bumps_and_respects_iommu_alignment() {
        let space = IovaSpace {
            next: Mutex::new(IOVA_BASE),
            ranges: vec![0x1000..0xfee0_0000, 0xfef0_0000..(1 << 40)],
            align: 64 << 10,
            max_mappings: 65535,
        };
        assert_eq!(space.reserve(4096, SMALL_PAGE), Some(IOVA_BASE));
        assert_eq!(space.reserve(4096, SMALL_PAGE), Some(IOVA_BASE + (64 << 10)));
        assert_eq!(space.reserve(HUGE_PAGE, HUGE_PAGE), Some(IOVA_BASE + HUGE_PAGE));
        assert_eq!(space.reserve(1 << 40, SMALL_PAGE), None);
        assert_eq!(space.reserve(4096, SMALL_PAGE), Some(IOVA_BASE + 2 * HUGE_PAGE));
    }

    #[test]
    fn error_logging_is_rate_limited() {
        let c = AtomicU64::new(0);
        let logged: Vec<bool> = (0..9).map(|_| should_log(&c)).collect();
        assert_eq!(logged, [true, true, false, true, false, false, false, true, false]);
    }

    /// Prints what the pre-checks say about every PCI device of this host.
    /// Informational: `cargo test -p nicsync-vfio -- --ignored --nocapture`.
    #[test]
    #[ignore = "depends on the host's devices"]
    fn precheck_host_devices() -> TestResult {
        for entry in std::fs::read_dir("/sys/bus/pci/devices")? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            match precheck(Path::new("/sys"), Path::new("/dev"), &name) {
                Ok(dir) => println!("{name}: ready ({})", dir.display()),
                Err(e) => println!("{name}: {e}"),
            }
        }
        Ok(())
    }
}
