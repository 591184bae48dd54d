//! The device's DMA engine and IOMMU.
//!
//! The device reaches host memory only through IOMMU windows that the host
//! mapped: an IOVA range backed by a [`HostMemory`]. An access that is not
//! entirely inside one window is a DMA error: the command completes with
//! `DMA_ERROR` (or the device goes FATAL for ring accesses), and host memory
//! outside the windows is never touched.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Host memory as the device's DMA engine sees it. Implemented by the host
/// side (`nicsync-vfio`'s `DmaMemory`); offsets are relative to the start of
/// the window. Methods return `false`/`None` when out of bounds.
pub trait HostMemory: Send + Sync {
    /// Window length in bytes.
    fn len(&self) -> usize;
    /// Whether the window is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies bytes out of host memory.
    fn read(&self, off: usize, out: &mut [u8]) -> bool;
    /// Copies bytes into host memory.
    fn write(&self, off: usize, data: &[u8]) -> bool;
    /// Stores a little-endian u64 with release ordering: everything the
    /// device wrote before is visible to a host that acquires this word.
    fn store_u64_release(&self, off: usize, v: u64) -> bool;

    /// Hints the cache line at `off` toward the reader; no memory access.
    /// The default does nothing.
    fn prefetch(&self, off: usize) {
        let _ = off;
    }

    /// Publishes 16-byte ring entries `(word0, word1)` at `off`, `off + 16`,
    /// ...: every `word1` first, then every `word0` with release ordering,
    /// so a reader that acquires an entry's first word sees its second.
    fn publish_pairs(&self, off: usize, pairs: &[(u64, u64)]) -> bool {
        for (i, (_, w1)) in pairs.iter().enumerate() {
            if !self.write(off + 16 * i + 8, &w1.to_le_bytes()) {
                return false;
            }
        }
        pairs.iter().enumerate().all(|(i, (w0, _))| self.store_u64_release(off + 16 * i, *w0))
    }
}

/// Why a DMA access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA of {len} bytes at IOVA {iova:#x} is outside every IOMMU window")]
pub struct DmaFault {
    /// Address asked for.
    pub iova: u64,
    /// Length asked for.
    pub len: usize,
}

#[derive(Clone)]
struct Window {
    iova: u64,
    len: u64,
    mem: Arc<dyn HostMemory>,
}

/// The IOMMU: a set of non-overlapping windows. Shared between the host
/// side (map/unmap) and the device (translate); the device keeps a cached
/// copy and refreshes it when the generation changes, as an IOTLB would.
pub struct Iommu {
    windows: Mutex<Arc<Vec<Window>>>,
    generation: AtomicU64,
}

impl fmt::Debug for Iommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.snapshot();
        f.debug_struct("Iommu").field("windows", &w.len()).finish()
    }
}

impl Default for Iommu {
    fn default() -> Self {
        Iommu { windows: Mutex::new(Arc::new(Vec::new())), generation: AtomicU64::new(1) }
    }
}

/// Errors from [`Iommu::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The range overlaps an existing window.
    #[error("IOVA range {iova:#x}+{len:#x} overlaps an existing mapping")]
    Overlap {
        /// Start.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// Zero length or address overflow.
    #[error("IOVA range {iova:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Start.
        iova: u64,
        /// Length.
        len: u64,
    },
}

impl Iommu {
    fn snapshot(&self) -> Arc<Vec<Window>> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Maps `mem` at `iova`.
    pub fn map(&self, iova: u64, mem: Arc<dyn HostMemory>) -> Result<(), MapError> {
        let len = mem.len() as u64;
        let end = iova.checked_add(len).filter(|_| len > 0).ok_or(MapError::BadRange { iova, len })?;
        let mut g = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if g.iter().any(|w| iova < w.iova + w.len && w.iova < end) {
            return Err(MapError::Overlap { iova, len });
        }
        let mut v: Vec<Window> = g.as_ref().clone();
        v.push(Window { iova, len, mem });
        *g = Arc::new(v);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Removes the window that starts at `iova`; returns whether one did.
    pub fn unmap(&self, iova: u64) -> bool {
        let mut g = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let before = g.len();
        let v: Vec<Window> = g.iter().filter(|w| w.iova != iova).cloned().collect();
        let removed = v.len() != before;
        *g = Arc::new(v);
        self.generation.fetch_add(1, Ordering::Release);
        removed
    }

    /// Number of windows mapped.
    pub fn window_count(&self) -> usize {
        self.snapshot().len()
    }

    /// A translation cache for the device side.
    pub fn tlb(self: &Arc<Self>) -> Tlb {
        Tlb { iommu: self.clone(), generation: 0, windows: Arc::new(Vec::new()) }
    }
}

/// The device's cached view of the IOMMU.
pub struct Tlb {
    iommu: Arc<Iommu>,
    generation: u64,
    windows: Arc<Vec<Window>>,
}

impl fmt::Debug for Tlb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tlb").field("generation", &self.generation).finish()
    }
}

/// A translated, bounds-checked DMA region: `len` bytes at `iova`.
#[derive(Clone)]
pub struct DmaRegion {
    mem: Arc<dyn HostMemory>,
    base: usize,
    len: usize,
    iova: u64,
}

impl fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaRegion").field("iova", &format_args!("{:#x}", self.iova)).field("len", &self.len).finish()
    }
}

impl Tlb {
    /// Refreshes the cache if the host changed the mappings.
    pub fn refresh(&mut self) {
        let g = self.iommu.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.windows = self.iommu.snapshot();
            self.generation = g;
        }
    }

    /// Whether the host changed the mappings since the last refresh.
    pub fn is_stale(&self) -> bool {
        self.iommu.generation.load(Ordering::Acquire) != self.generation
    }

    /// Translates `len` bytes at `iova`; the whole range must lie in one
    /// window.
    pub fn translate(&mut self, iova: u64, len: usize) -> Result<DmaRegion, DmaFault> {
        self.refresh();
        let fault = DmaFault { iova, len };
        let end = iova.checked_add(len as u64).ok_or(fault)?;
        let w = self.windows.iter().find(|w| iova >= w.iova && end <= w.iova + w.len).ok_or(fault)?;
        Ok(DmaRegion { mem: w.mem.clone(), base: (iova - w.iova) as usize, len, iova })
    }
}

impl DmaRegion {
    /// Length of the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// IOVA of byte 0.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    fn fault(&self, off: usize, len: usize) -> DmaFault {
        DmaFault { iova: self.iova.wrapping_add(off as u64), len }
    }

    fn inside(&self, off: usize, len: usize) -> bool {
        off.checked_add(len).is_some_and(|e| e <= self.len)
    }

    /// Reads bytes at `off` within the region.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<(), DmaFault> {
        if self.inside(off, out.len()) && self.mem.read(self.base + off, out) {
            Ok(())
        } else {
            Err(self.fault(off, out.len()))
        }
    }

    /// Writes bytes at `off` within the region.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), DmaFault> {
        if self.inside(off, data.len()) && self.mem.write(self.base + off, data) {
            Ok(())
        } else {
            Err(self.fault(off, data.len()))
        }
    }

    /// Hints the line at `off` toward the device ahead of use. Not a read:
    /// the host may be writing that memory. Out-of-range offsets are ignored.
    #[inline]
    pub fn prefetch(&self, off: usize) {
        if self.inside(off, 1) {
            self.mem.prefetch(self.base + off);
        }
    }

    /// Publishes 16-byte entries at `off` (see [`HostMemory::publish_pairs`]).
    pub fn publish_pairs(&self, off: usize, pairs: &[(u64, u64)]) -> Result<(), DmaFault> {
        let len = pairs.len() * 16;
        if self.inside(off, len) && self.mem.publish_pairs(self.base + off, pairs) {
            Ok(())
        } else {
            Err(self.fault(off, len))
        }
    }

    /// Release-stores the u64 at `off` (the ownership word of a ring entry).
    pub fn store_u64_release(&self, off: usize, v: u64) -> Result<(), DmaFault> {
        if self.inside(off, 8) && self.mem.store_u64_release(self.base + off, v) {
            Ok(())
        } else {
            Err(self.fault(off, 8))
        }
    }
}

/// Host memory backed by a plain vector, for model unit tests. Accesses
/// take a lock, so it is slow but trivially safe.
#[derive(Debug)]
pub struct VecMemory {
    bytes: Mutex<Vec<u8>>,
}

impl VecMemory {
    /// `len` zero bytes.
    pub fn new(len: usize) -> Self {
        VecMemory { bytes: Mutex::new(vec![0; len]) }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl HostMemory for VecMemory {
    fn len(&self) -> usize {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
    fn read(&self, off: usize, out: &mut [u8]) -> bool {
        let g = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        match off.checked_add(out.len()).and_then(|e| g.get(off..e)) {
            Some(src) => {
                out.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
    fn write(&self, off: usize, data: &[u8]) -> bool {
        let mut g = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        match off.checked_add(data.len()).and_then(|e| g.get_mut(off..e)) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
    fn store_u64_release(&self, off: usize, v: u64) -> bool {
        self.write(off, &v.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_inside_and_outside_windows() {
        let iommu = Arc::new(Iommu::default());
        let mem = Arc::new(VecMemory::new(4096));
        assert!(iommu.map(0x10_000, mem.clone()).is_ok());
        assert_eq!(
            iommu.map(0x10_800, Arc::new(VecMemory::new(4096))),
            Err(MapError::Overlap { iova: 0x10_800, len: 4096 })
        );
        let mut tlb = iommu.tlb();
        assert!(tlb.translate(0x10_000, 4096).is_ok());
        assert!(tlb.translate(0x10_ff0, 32).is_err());
        assert!(tlb.translate(0xffff_ffff_ffff_fff0, 32).is_err());
        assert!(tlb.translate(0, 8).is_err());
        let r = match tlb.translate(0x10_100, 64) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert!(r.write(0, &[1; 64]).is_ok());
        assert!(r.write(60, &[1; 8]).is_err());
        assert!(iommu.unmap(0x10_000));
        assert!(tlb.translate(0x10_000, 8).is_err());
        assert_eq!(mem.contents()[0x100], 1);
    }
}
