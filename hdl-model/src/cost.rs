//! Cost model: modelled clock cycles per operation.
//!
//! The emulation runs on a CPU, so its measured latency says little about
//! what the FPGA would take. The cost model counts what the hardware
//! pipeline would spend on each command at the design clock, so reports can
//! state a modelled hardware latency beside the measured one. The figures
//! are parameters, not measurements; the defaults describe a 250 MHz design
//! with the table in on-card DDR4 and descriptors fetched by PCIe DMA.

/// Cycle costs of the pipeline stages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostParams {
    /// Core clock in MHz.
    pub clock_mhz: u32,
    /// PCIe read round trip for a descriptor burst (doorbell to data).
    pub dma_read_latency: u32,
    /// Cycles per 64-byte beat of a descriptor burst after the first.
    pub dma_beat: u32,
    /// Decode and validate one descriptor.
    pub decode: u32,
    /// Hash unit latency (pipelined: paid once per command).
    pub hash: u32,
    /// One bucket read from table memory.
    pub bucket_read: u32,
    /// One slot write to table memory.
    pub slot_write: u32,
    /// Compare and select over a bucket's 8 ways.
    pub compare: u32,
    /// Write a completion (posted PCIe write, pipelined).
    pub completion: u32,
}

impl Default for CostParams {
    fn default() -> Self {
        CostParams {
            clock_mhz: 250,
            dma_read_latency: 200,
            dma_beat: 1,
            decode: 2,
            hash: 4,
            bucket_read: 24,
            slot_write: 8,
            compare: 1,
            completion: 4,
        }
    }
}

impl CostParams {
    /// Cycles for one table command given its memory traffic.
    pub fn command_cycles(&self, bucket_reads: u32, slot_writes: u32) -> u64 {
        (self.decode
            + self.hash
            + bucket_reads * (self.bucket_read + self.compare)
            + slot_writes * self.slot_write
            + self.completion) as u64
    }

    /// Cycles to fetch a burst of `n` descriptors after a doorbell.
    pub fn fetch_cycles(&self, n: u32) -> u64 {
        if n == 0 {
            0
        } else {
            (self.dma_read_latency + (n - 1) * self.dma_beat) as u64
        }
    }

    /// Nanoseconds for `cycles` at the clock.
    pub fn cycles_to_ns(&self, cycles: f64) -> f64 {
        cycles * 1000.0 / self.clock_mhz.max(1) as f64
    }
}
