//! DMA-able host memory and eventfds: the one module of this crate that
//! uses `unsafe`.
//!
//! # Access discipline
//! Memory shared with a device is never reached through Rust references
//! (`&[u8]`, `&mut T`): the device may change it at any time, which would
//! break the aliasing rules a reference promises. Every access goes through
//! a raw pointer into the mapping:
//!
//! * bulk data (descriptors, records) is copied with volatile loads/stores,
//!   8 bytes at a time when aligned, so the compiler neither elides nor
//!   merges them;
//! * the one word of each ring entry that carries ownership (the completion
//!   or event word holding the phase bit) is accessed as an `AtomicU64`
//!   with acquire/release ordering. A device written in Rust (the emulated
//!   one, on another thread) then synchronises with the host exactly as the
//!   memory model requires, and against real hardware the same instruction
//!   is a plain aligned 8-byte access.
//!
//! We do not use `volatile-register`/`VolatileCell`: it forms `&VolatileCell`
//! references into device memory, which permits spurious reads (an open
//! soundness issue). Raw-pointer volatile access has no such hole.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapMut, MmapOptions};

use crate::DeviceError;

/// Page-aligned, zero-initialised host memory that a device may DMA into.
///
/// The mapping lives as long as the value; it is handed to devices as an
/// `Arc<DmaMemory>` so that an IOMMU mapping can keep it alive.
pub struct DmaMemory {
    map: MmapMut,
    ptr: NonNull<u8>,
    len: usize,
    hugepages: bool,
}

// SAFETY: DmaMemory owns its mapping; every access goes through raw-pointer
// volatile or atomic operations with bounds checks, never through shared
// Rust references, so concurrent use from several threads (and by a device)
// cannot create aliasing `&mut`. The mapping is unmapped only on drop.
unsafe impl Send for DmaMemory {}
// SAFETY: see `Send` above: all methods take `&self` and perform only
// volatile/atomic accesses, which are defined under concurrency.
unsafe impl Sync for DmaMemory {}

impl fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMemory").field("len", &self.len).field("hugepages", &self.hugepages).finish()
    }
}

impl DmaMemory {
    /// Allocates `len` bytes (rounded up to a page) of anonymous memory.
    /// With `hugepages`, tries 2 MiB huge pages first and falls back to
    /// normal pages (reported by [`DmaMemory::is_hugepage`]).
    ///
    /// The pages are faulted in at once (`MAP_POPULATE`), as VFIO's DMA
    /// mapping pins them: a device never reaches a page that is not
    /// present. Left lazy, the first touch of each ring page cost a page
    /// fault on the data path, and the model's prefetch hint at an idle
    /// ring's next slot walked the page tables on every idle poll.
    pub fn allocate(len: usize, hugepages: bool) -> Result<Self, DeviceError> {
        if len == 0 {
            return Err(DeviceError::DmaAlloc { len, reason: "zero-length buffer".into() });
        }
        // Each size rounded to its own page: a buffer that falls back to
        // normal pages does not populate 2 MiB.
        let round = |page: usize| len.div_ceil(page) * page;
        let huge = hugepages
            .then(|| MmapOptions::new().len(round(2 << 20)).huge(Some(21)).populate().map_anon().ok())
            .flatten();
        let used_huge = huge.is_some();
        let mut map = match huge {
            Some(m) => m,
            None => MmapOptions::new()
                .len(round(4096))
                .populate()
                .map_anon()
                .map_err(|e| DeviceError::DmaAlloc { len, reason: e.to_string() })?,
        };
        let ptr = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| DeviceError::DmaAlloc { len, reason: "mmap returned null".into() })?;
        Ok(DmaMemory { len: map.len(), map, ptr, hugepages: used_huge })
    }

    /// Length in bytes (page-rounded).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers are at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether huge pages back this buffer.
    pub fn is_hugepage(&self) -> bool {
        self.hugepages
    }

    /// Host virtual address of the first byte, for IOMMU mapping calls.
    pub fn host_addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Locks the pages in memory so that the IOMMU mapping stays valid.
    pub fn lock(&self) -> Result<(), DeviceError> {
        self.map.lock().map_err(|e| DeviceError::DmaAlloc { len: self.len, reason: format!("mlock: {e}") })
    }

    fn check(&self, off: usize, len: usize) -> Result<(), DeviceError> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DeviceError::OutOfBounds { offset: off, len, size: self.len }),
        }
    }

    /// `check`, and `off` 8-aligned: whole little-endian words.
    fn check_words(&self, off: usize, len: usize) -> Result<(), DeviceError> {
        self.check(off, len)?;
        if off % 8 != 0 {
            return Err(DeviceError::Misaligned { offset: off });
        }
        Ok(())
    }

    /// Volatile copy from the buffer at `off` into `out`.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<(), DeviceError> {
        self.check(off, out.len())?;
        let base = self.ptr.as_ptr();
        if off % 8 == 0 && out.len() % 8 == 0 {
            for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                // SAFETY: `check` proved off + out.len() <= len, so every
                // 8-byte word read here lies inside the live mapping; the
                // mapping is page-aligned and `off + 8 * i` is a multiple of
                // 8, so the u64 pointer is aligned.
                let v = unsafe { std::ptr::read_volatile(base.add(off + 8 * i).cast::<u64>()) };
                chunk.copy_from_slice(&v.to_ne_bytes());
            }
        } else {
            for (i, b) in out.iter_mut().enumerate() {
                // SAFETY: `check` proved off + i < len: the byte is inside
                // the live mapping; u8 has no alignment requirement.
                *b = unsafe { std::ptr::read_volatile(base.add(off + i)) };
            }
        }
        Ok(())
    }

    /// Volatile copy of `data` into the buffer at `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), DeviceError> {
        self.check(off, data.len())?;
        let base = self.ptr.as_ptr();
        if off % 8 == 0 && data.len() % 8 == 0 {
            for (i, chunk) in data.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(chunk);
                // SAFETY: `check` proved the word lies inside the live
                // mapping, and off + 8 * i is 8-aligned in a page-aligned
                // mapping. No Rust reference to this memory exists.
                unsafe { std::ptr::write_volatile(base.add(off + 8 * i).cast::<u64>(), u64::from_ne_bytes(w)) };
            }
        } else {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: `check` proved off + i < len; bytes need no alignment.
                unsafe { std::ptr::write_volatile(base.add(off + i), *b) };
            }
        }
        Ok(())
    }

    /// Volatile stores of eight little-endian words at `off` (8-aligned):
    /// a 64-byte descriptor written as whole words.
    #[inline]
    pub fn write_words(&self, off: usize, words: &[u64; 8]) -> Result<(), DeviceError> {
        self.check_words(off, 64)?;
        let base = self.ptr.as_ptr();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: `check_words` proved off + 64 <= len, so every word is
            // inside the live mapping; off is 8-aligned in a page-aligned
            // mapping. No Rust reference to this memory exists.
            unsafe { std::ptr::write_volatile(base.add(off + 8 * i).cast::<u64>(), w.to_le()) };
        }
        Ok(())
    }

    /// Volatile loads of eight little-endian words at `off` (8-aligned).
    #[inline]
    pub fn read_words(&self, off: usize, out: &mut [u64; 8]) -> Result<(), DeviceError> {
        self.check_words(off, 64)?;
        let base = self.ptr.as_ptr();
        for (i, w) in out.iter_mut().enumerate() {
            // SAFETY: `check_words` proved off + 64 <= len, so every word is
            // inside the live mapping; off is 8-aligned in a page-aligned
            // mapping. No Rust reference to this memory exists.
            *w = u64::from_le(unsafe { std::ptr::read_volatile(base.add(off + 8 * i).cast::<u64>()) });
        }
        Ok(())
    }

    fn atomic_at(&self, off: usize) -> Result<&AtomicU64, DeviceError> {
        self.check_words(off, 8)?;
        // SAFETY: the word is inside the mapping (checked), 8-aligned
        // (checked; the mapping is page-aligned), lives as long as `self`
        // (the returned reference borrows `self`), and is only ever accessed
        // atomically or by volatile copies that the ring protocol orders
        // after an acquire of this same word, as AtomicU64::from_ptr
        // requires. An &AtomicU64 is an interior-mutable reference, so it
        // does not assert the bytes are unchanging.
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast::<u64>()) })
    }

    /// Atomic load of the little-endian-on-wire u64 at `off` (8-aligned).
    pub fn load_u64(&self, off: usize, order: Ordering) -> Result<u64, DeviceError> {
        Ok(u64::from_le(self.atomic_at(off)?.load(order)))
    }

    /// Atomic store of `v` as little-endian at `off` (8-aligned).
    pub fn store_u64(&self, off: usize, v: u64, order: Ordering) -> Result<(), DeviceError> {
        self.atomic_at(off)?.store(v.to_le(), order);
        Ok(())
    }

    /// Publishes 16-byte ring entries `(word0, word1)` at `off` (8-aligned):
    /// every `word1` with a volatile store, then every `word0` with a
    /// release store, so a reader that acquires an entry's first word sees
    /// its second. One bounds check for the whole burst.
    pub fn publish_pairs(&self, off: usize, pairs: &[(u64, u64)]) -> Result<(), DeviceError> {
        self.check_words(off, pairs.len() * 16)?;
        let base = self.ptr.as_ptr();
        for (i, (_, w1)) in pairs.iter().enumerate() {
            // SAFETY: `check_words` proved off + 16 * len <= self.len, so the word
            // at off + 16 i + 8 is inside the live mapping; it is 8-aligned
            // (off is, and the mapping is page-aligned).
            unsafe { std::ptr::write_volatile(base.add(off + 16 * i + 8).cast::<u64>(), w1.to_le()) };
        }
        for (i, (w0, _)) in pairs.iter().enumerate() {
            // SAFETY: as above, in bounds and 8-aligned; the word is only
            // accessed atomically by readers (the ring protocol), as
            // AtomicU64::from_ptr requires, and lives as long as `self`.
            let a = unsafe { AtomicU64::from_ptr(base.add(off + 16 * i).cast::<u64>()) };
            a.store(w0.to_le(), Ordering::Release);
        }
        Ok(())
    }

    /// Hints the CPU to bring the line at `off` into its cache. Not a read:
    /// no memory access happens in the abstract machine, so it cannot race
    /// a concurrent writer. Out-of-range offsets are ignored.
    #[inline]
    pub fn prefetch(&self, off: usize) {
        let Some(p) = self.hint_address(off) else { return };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: PREFETCHT0 is a hint: it never faults and neither reads
        // nor writes memory as far as the program can observe; the address
        // is inside the live mapping (`hint_address`) in any case.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }

    /// Hints the CPU to take the line at `off` for writing (PREFETCHW):
    /// the line is fetched, and other cores' copies invalidated, before the
    /// stores that fill it reach it. A producer that writes a run of slots
    /// the consumer read on its last lap would otherwise stall on each
    /// line's ownership in turn, its store buffer full of the line's words.
    /// Like [`DmaMemory::prefetch`], not an access in the abstract machine;
    /// out-of-range offsets are ignored.
    #[inline]
    pub fn prefetch_write(&self, off: usize) {
        let Some(p) = self.hint_address(off) else { return };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: PREFETCHW is a hint: it never faults, and the program
        // cannot observe it as a read or a write (CPUs without it execute
        // it as a NOP). The address is inside the live mapping
        // (`hint_address`) in any case.
        unsafe {
            core::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }

    /// The address of byte `off` for a cache hint, if it is in the buffer.
    #[inline]
    fn hint_address(&self, off: usize) -> Option<*const u8> {
        (off < self.len).then(|| self.ptr.as_ptr().cast_const().wrapping_add(off))
    }

    /// Zeroes the whole buffer (volatile).
    pub fn clear(&self) {
        let zero = [0u8; 64];
        let mut off = 0;
        while off < self.len {
            let n = (self.len - off).min(64);
            // Bounds hold by construction of the loop.
            let _ = self.write(off, &zero[..n]);
            off += n;
        }
    }
}

/// A Linux eventfd (non-blocking, close-on-exec): the interrupt line of an
/// emulated device, or the MSI-X target of a real one.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates an eventfd.
    pub fn new() -> Result<Self, DeviceError> {
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(DeviceError::Io { what: "eventfd", source: std::io::Error::last_os_error() });
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        Ok(EventFd { fd: unsafe { OwnedFd::from_raw_fd(raw) } })
    }

    /// Adds 1 to the counter (raises the interrupt).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local u64 to a descriptor we
        // own. A full counter (EAGAIN) means the interrupt is already
        // pending, so the result can be ignored.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
    }

    /// Reads and resets the counter; 0 if nothing was pending.
    pub fn take(&self) -> u64 {
        drain_eventfd(self.fd.as_fd())
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_page_and_starts_zeroed() -> Result<(), DeviceError> {
        let m = DmaMemory::allocate(100, false)?;
        assert_eq!(m.len(), 4096);
        let mut b = [0xFFu8; 64];
        m.read(4032, &mut b)?;
        assert_eq!(b, [0u8; 64]);
        Ok(())
    }

    #[test]
    fn bounds_are_checked() -> Result<(), DeviceError> {
        let m = DmaMemory::allocate(4096, false)?;
        let mut b = [0u8; 16];
        assert!(m.read(4090, &mut b).is_err());
        assert!(m.write(usize::MAX, &b).is_err());
        assert!(m.load_u64(4092, Ordering::Relaxed).is_err());
        assert!(matches!(m.load_u64(4, Ordering::Relaxed), Err(DeviceError::Misaligned { offset: 4 })));
        Ok(())
    }

    #[test]
    fn aligned_and_unaligned_copies_agree() -> Result<(), DeviceError> {
        let m = DmaMemory::allocate(4096, false)?;
        let data: Vec<u8> = (0..64u8).collect();
        m.write(64, &data)?;
        m.write(129, &data[..13])?;
        let mut a = [0u8; 64];
        m.read(64, &mut a)?;
        assert_eq!(&a[..], &data[..]);
        let mut u = [0u8; 13];
        m.read(129, &mut u)?;
        assert_eq!(&u[..], &data[..13]);
        m.store_u64(8, 0x0102_0304_0506_0708, Ordering::Release)?;
        let mut w = [0u8; 8];
        m.read(8, &mut w)?;
        assert_eq!(w, 0x0102_0304_0506_0708u64.to_le_bytes());
        Ok(())
    }

    #[test]
    fn prefetch_hints_change_nothing() -> Result<(), DeviceError> {
        let m = DmaMemory::allocate(8192, false)?;
        let data: Vec<u8> = (0..=255u8).cycle().take(8192).collect();
        m.write(0, &data)?;
        for off in (0..8192).step_by(64).chain([8192, usize::MAX]) {
            m.prefetch(off);
            m.prefetch_write(off);
        }
        let mut back = vec![0u8; 8192];
        m.read(0, &mut back)?;
        assert_eq!(back, data);
        Ok(())
    }

    #[test]
    fn eventfd_counts() -> Result<(), DeviceError> {
        let e = EventFd::new()?;
        assert_eq!(e.take(), 0);
        e.signal();
        e.signal();
        assert_eq!(e.take(), 2);
        assert_eq!(e.take(), 0);
        Ok(())
    }
}

// ===========================================================================
// VFIO IOMMU mappings (appended for `real.rs`, the VFIO backend).
//
// `PciIommu::map` is `unsafe`: the IOMMU lets the device write to the host
// pages for as long as the mapping exists, so the pages must outlive it. The
// guard below owns that invariant, so that `real.rs` stays free of `unsafe`.
// ===========================================================================

/// IOMMU mappings of [`DmaMemory`] in a VFIO container (used by the VFIO
/// backend).
pub(crate) mod iommu_map {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use pci_driver::backends::vfio::VfioContainer;
    use pci_driver::regions::Permissions;

    use super::DmaMemory;

    /// A live IOMMU mapping of a whole [`DmaMemory`] at an IOVA.
    ///
    /// The guard keeps the memory alive while the device can reach it: the
    /// pages are released only after a successful unmap. If the unmap fails
    /// they are leaked on purpose, since the device could otherwise DMA into
    /// memory that the allocator has reused. Dropping the guard unmaps.
    pub(crate) struct IommuMapping {
        container: Arc<VfioContainer>,
        /// `Some` while mapped.
        mem: Mutex<Option<Arc<DmaMemory>>>,
        iova: u64,
        len: usize,
    }

    impl std::fmt::Debug for IommuMapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("IommuMapping")
                .field("iova", &format_args!("{:#x}", self.iova))
                .field("len", &self.len)
                .finish()
        }
    }

    impl IommuMapping {
        /// Maps all of `mem` (read/write for the device) at `iova`.
        ///
        /// The caller checks alignment and IOVA validity; the kernel
        /// re-checks both and fails the call rather than mapping wrongly.
        pub(crate) fn map(container: Arc<VfioContainer>, mem: Arc<DmaMemory>, iova: u64) -> io::Result<Self> {
            let len = mem.len();
            // SAFETY: [host_addr, host_addr + len) is exactly the live
            // anonymous mapping owned by `mem`. The returned guard holds an
            // `Arc` to `mem` and gives it up only after the IOMMU mapping is
            // removed (or never, if removal fails), so the device can never
            // reach pages that were unmapped or reused. Host code accesses
            // the memory only through raw-pointer volatile/atomic operations
            // (see the module docs), so device writes cannot invalidate any
            // Rust reference. If the ioctl fails nothing was mapped.
            unsafe { container.iommu().map(iova, len, mem.host_addr(), Permissions::ReadWrite) }?;
            Ok(IommuMapping { container, mem: Mutex::new(Some(mem)), iova, len })
        }

        /// The mapped IOVA.
        pub(crate) fn iova(&self) -> u64 {
            self.iova
        }

        /// The mapped length in bytes.
        pub(crate) fn len(&self) -> usize {
            self.len
        }

        /// Removes the mapping; a second call does nothing. On failure the
        /// memory is leaked (see the type docs) and the error returned.
        pub(crate) fn unmap(&self) -> io::Result<()> {
            let mut slot = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                return Ok(());
            }
            match self.container.iommu().unmap(self.iova, self.len) {
                Ok(()) => {
                    *slot = None;
                    Ok(())
                }
                Err(e) => {
                    if let Some(mem) = slot.take() {
                        std::mem::forget(mem);
                    }
                    Err(e)
                }
            }
        }
    }

    impl Drop for IommuMapping {
        fn drop(&mut self) {
            if let Err(e) = self.unmap() {
                tracing::warn!(iova = self.iova, len = self.len, "IOMMU unmap failed, leaking the DMA buffer: {e}");
            }
        }
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<(), DeviceError> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(DeviceError::Io { what: "pin thread", source: std::io::Error::from_raw_os_error(libc::EINVAL) });
    }
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: passes a pointer to a live, initialised cpu_set_t and its
    // exact size; pid 0 names the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(DeviceError::Io { what: "sched_setaffinity", source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Waits until `fd` is readable or `timeout` passes; returns whether it
/// became readable. Used by the driver to sleep on an interrupt eventfd.
pub fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: std::time::Duration) -> Result<bool, DeviceError> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // Rounded up: a sub-millisecond remainder must not become a busy poll(0).
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: passes one live, initialised pollfd and a count of 1; the
    // descriptor is borrowed for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(DeviceError::Io { what: "poll", source: e });
    }
    Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
}

/// Waits until one of `fds` is readable or `timeout` passes (microsecond
/// resolution: `ppoll`). Interrupted waits return early; the caller loops.
pub fn wait_any_readable(fds: &[std::os::fd::BorrowedFd<'_>], timeout: std::time::Duration) -> Result<(), DeviceError> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|f| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: passes a live, initialised array of `pfds.len()` pollfds whose
    // descriptors are borrowed for the call, a live timespec, and no signal
    // mask (null: unchanged).
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(DeviceError::Io { what: "ppoll", source: e });
        }
    }
    Ok(())
}

/// Reads and clears an eventfd's counter without owning it; 0 if nothing
/// was pending.
pub fn drain_eventfd(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live local u64 from a borrowed descriptor.
    let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(v).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}
