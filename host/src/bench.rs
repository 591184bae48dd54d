//! `nicsync bench ring`: the data path measured against this machine's
//! own floor, in one run.
//!
//! * `baseline_rtt_ns`: a bare ping-pong of one cache line between the two
//!   threads (and CPUs) that the driver and the device model then use;
//! * `update_rtt_ns`: one connection UPDATE, posted until its completion is
//!   seen, with the model on its own polling thread;
//! * `baseline_spsc_ops_per_s`: a bare single-producer single-consumer ring
//!   of 64-byte slots between the same two CPUs;
//! * `batch_updates_per_s`: sustained UPDATEs with batching (one doorbell
//!   per batch) through the driver and the model;
//! * `model_cycles_per_update`: the cost model's cycles per update at
//!   `model_clock_mhz`;
//! * `table_1m`: one million connections inserted through the rings, with
//!   the card memory they take.
//!
//! Throughputs are the median of several repetitions; latencies are
//! percentiles over all samples after a warm-up.

use std::hint::spin_loop;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nicsync_fwif::cmd::{CommandDescriptor, DescFlags, Opcode};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_fwif::regs::Counter;
use nicsync_model::{ExecMode, ModelConfig};
use nicsync_vfio::{pin_current_thread, EmulatedDevice};
use serde::Serialize;

use crate::driver::{Driver, DriverConfig, DriverError};
use crate::stats::{median, percentiles, Percentiles};
use crate::table::{ConnEntry, ConnTable, TableOp};

/// Parameters of a run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Updates per latency run and per throughput repetition.
    pub updates: u64,
    /// Throughput repetitions (median reported).
    pub repetitions: usize,
    /// Connections the throughput run cycles through.
    pub working_set: u32,
    /// Also insert one million connections and report bytes per entry.
    pub million: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { updates: 200_000, repetitions: 5, working_set: 65_536, million: true }
    }
}

/// Where the threads ran.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadPlacement {
    /// CPUs available to the process.
    pub cpus: usize,
    /// CPU of the driver (and ping-pong initiator, SPSC producer).
    pub driver_cpu: Option<usize>,
    /// CPU of the device model's polling thread (and ping-pong responder,
    /// SPSC consumer).
    pub device_cpu: Option<usize>,
    /// Busy-polling threads during the measurement.
    pub busy_threads: usize,
    /// Whether every pin to those CPUs succeeded (false: the scheduler chose,
    /// and the figures are less trustworthy).
    pub pinned: bool,
    /// Only one CPU: both busy threads shared it and the figures mean
    /// little.
    pub shared_cpu: bool,
}

/// The table-capacity figure.
#[derive(Clone, Debug, Serialize)]
pub struct MillionReport {
    /// Entries resident after the inserts.
    pub entries: u64,
    /// Card memory of the table divided by the entries.
    pub bytes_per_entry: f64,
    /// Insert rate through the rings.
    pub inserts_per_s: f64,
    /// Cuckoo displacements performed.
    pub cuckoo_kicks: u64,
}

/// The JSON report (`nicsync bench ring --json`).
#[derive(Clone, Debug, Serialize)]
pub struct RingReport {
    /// Bare core-to-core ping-pong.
    pub baseline_rtt_ns: Percentiles,
    /// One update's round trip, posted with the inline doorbell (the
    /// descriptor written with the doorbell, abi.md §6.4; see
    /// `update_doorbell`).
    pub update_rtt_ns: Percentiles,
    /// How `update_rtt_ns` rings the device: "inline" (the emulated
    /// device's write-combined window; the VFIO backend does not map it yet
    /// and rings the register, as `update_rtt_register_doorbell_ns`).
    pub update_doorbell: &'static str,
    /// The same with the doorbell written to the CMD_DOORBELL register (the
    /// device then fetches the descriptor by DMA).
    pub update_rtt_register_doorbell_ns: Percentiles,
    /// A NOP's round trip: the ring protocol without table work.
    pub nop_rtt_ns: Percentiles,
    /// The ring protocol's own floor: a bare ping-pong of a 64-byte
    /// descriptor (seven words, then the sequence word) answered by a
    /// 16-byte completion (result, then the phase word), between the same
    /// two threads, with no driver or model code. What `update_rtt_ns`
    /// would be if the software on its critical path cost nothing.
    pub protocol_floor_rtt_ns: Percentiles,
    /// Batched update throughput (median of repetitions).
    pub batch_updates_per_s: f64,
    /// Every repetition's throughput.
    pub batch_updates_per_s_runs: Vec<f64>,
    /// Bare SPSC ring throughput (median of repetitions).
    pub baseline_spsc_ops_per_s: f64,
    /// Every repetition's SPSC throughput.
    pub baseline_spsc_ops_per_s_runs: Vec<f64>,
    /// The same ring with indices published every 16 items (a tuned ring,
    /// for reference; the ratio target uses the textbook one).
    pub baseline_spsc_batched16_ops_per_s: f64,
    /// Modelled cycles per update (cost model).
    pub model_cycles_per_update: f64,
    /// Clock the cost model assumes.
    pub model_clock_mhz: u32,
    /// Modelled hardware time per update at that clock, amortised over the
    /// batches of the throughput run (a throughput cost, not a single
    /// update's latency: a burst shares one fetch's DMA latency).
    pub model_ns_per_update: f64,
    /// update_rtt p50 / baseline_rtt p50 (target <= 1.25). Both are
    /// measured in [`RTT_ROUNDS`] alternating rounds and pooled, so that a
    /// move of the vCPUs during the run lands on both alike.
    pub update_rtt_ratio_p50: f64,
    /// Per round: its update p50 over its bare p50.
    pub update_rtt_ratio_p50_rounds: Vec<f64>,
    /// The median of those: robust to a move of the vCPUs mid-run, which
    /// can put the pooled p50s in different placements.
    pub update_rtt_ratio_p50_round_median: f64,
    /// Per round: its bare round trip's p50 (which placement it had).
    pub baseline_rtt_p50_rounds: Vec<f64>,
    /// Median cost of the timer pair around each latency sample.
    pub timer_overhead_ns: f64,
    /// The same ratio with the timer cost taken out of both (stricter).
    pub update_rtt_ratio_p50_timer_corrected: f64,
    /// batch / spsc (target >= 0.33).
    pub batch_to_spsc_ratio: f64,
    /// batch / the tuned SPSC ring (indices published every 16 items).
    pub batch_to_spsc_batched16_ratio: f64,
    /// One million entries resident.
    pub table_1m: Option<MillionReport>,
    /// Thread placement.
    pub threads: ThreadPlacement,
    /// The bare round trip measured again at the end of the run (p50).
    pub baseline_rtt_end_ns_p50: f64,
    /// Whether every bare round trip of the run (each round's and the one
    /// at the end) agrees with the others within a factor of 1.5. A
    /// hypervisor may move the two vCPUs between cores that share a cache
    /// and cores that do not in the middle of a run (the round trip then
    /// goes from about 100 to about 500 ns): the pooled ratios of such a run
    /// mix two machines; read the per-round ones.
    pub placement_stable: bool,
    /// Latency samples per latency run.
    pub samples: u64,
    /// Command ring slots in the throughput run (the driver posts every free
    /// slot, then rings once).
    pub ring_slots: u32,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Driver failure.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// Device failure.
    #[error(transparent)]
    Device(#[from] nicsync_vfio::DeviceError),
    /// A table operation failed where it must not.
    #[error("benchmark table operation failed: {0}")]
    Table(String),
    /// A helper thread could not be started.
    #[error("cannot start a benchmark thread: {0}")]
    Thread(std::io::Error),
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn placement() -> ThreadPlacement {
    let n = cpus();
    let (d, m) = if n >= 2 { (Some(0), Some(1)) } else { (None, None) };
    ThreadPlacement { cpus: n, driver_cpu: d, device_cpu: m, busy_threads: 2, pinned: n >= 2, shared_cpu: n < 2 }
}

/// Set when a pin fails anywhere in the run (reported as `pinned: false`).
static PIN_FAILED: AtomicBool = AtomicBool::new(false);

fn pin(cpu: Option<usize>) {
    if let Some(c) = cpu {
        if let Err(e) = pin_current_thread(c) {
            PIN_FAILED.store(true, Ordering::Relaxed);
            tracing::warn!("cannot pin to CPU {c}: {e}");
        }
    }
}

/// Cost of one `Instant::now()` pair around nothing (median), which every
/// latency sample here includes; reported so ratios can be read without it.
fn timer_overhead_ns() -> f64 {
    let mut v: Vec<u64> = (0..20_000)
        .map(|_| {
            let t0 = Instant::now();
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    percentiles(&mut v).p50
}

/// Waits until a helper thread has reached its CPU. This thread is
/// usually pinned already, and a thread it spawns starts on its CPU: had
/// it spun at once, the helper would have waited for the scheduler to
/// preempt it (about 4 ms here) before it could even move to its own CPU,
/// and a timed run would have counted that wait (the SPSC baseline lost
/// half its rate on 1 M items that way).
fn await_ready(ready: &AtomicBool) {
    while !ready.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
}

/// A cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Line(AtomicU64);

/// A responder on the device's CPU: calls `step` over and over until
/// dropped. Started, and waited for on its CPU, before anything is timed.
struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    fn start(name: &str, place: &ThreadPlacement, mut step: impl FnMut() + Send + 'static) -> Result<Self, BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = spawn_on_device_cpu(name, place, move || {
            while !s2.load(Ordering::Relaxed) {
                step();
            }
        })?;
        Ok(Responder { stop, thread: Some(thread) })
    }
}

/// Runs `body` on a thread pinned to the device's CPU, pins this thread to
/// the driver's, and returns once the helper is on its CPU (see
/// [`await_ready`]), so that the caller may start its clock.
fn spawn_on_device_cpu(
    name: &str,
    place: &ThreadPlacement,
    body: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, BenchError> {
    let ready = Arc::new(AtomicBool::new(false));
    let (r2, cpu) = (ready.clone(), place.device_cpu);
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            pin(cpu);
            r2.store(true, Ordering::Release);
            body();
        })
        .map_err(BenchError::Thread)?;
    pin(place.driver_cpu);
    await_ready(&ready);
    Ok(thread)
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Times `exchange(i)` for i = 1, 2, …; the first `warmup` are dropped.
fn time_exchanges(samples: u64, warmup: u64, exchange: impl FnMut(u64)) -> Percentiles {
    percentiles(&mut exchange_samples(samples, warmup, exchange))
}

/// [`time_exchanges`]'s samples, in nanoseconds, unsorted.
fn exchange_samples(samples: u64, warmup: u64, mut exchange: impl FnMut(u64)) -> Vec<u64> {
    let mut out = Vec::with_capacity(samples as usize);
    for i in 1..=(samples + warmup) {
        let t0 = Instant::now();
        exchange(i);
        let dt = t0.elapsed().as_nanos() as u64;
        if i > warmup {
            out.push(dt);
        }
    }
    out
}

/// Bare ping-pong: the initiator writes a sequence number to one line, the
/// responder echoes it on another.
pub fn baseline_rtt(samples: u64, warmup: u64, place: &ThreadPlacement) -> Result<Percentiles, BenchError> {
    Ok(percentiles(&mut baseline_rtt_samples(samples, warmup, place)?))
}

/// [`baseline_rtt`]'s samples, unsorted.
fn baseline_rtt_samples(samples: u64, warmup: u64, place: &ThreadPlacement) -> Result<Vec<u64>, BenchError> {
    let ping = Arc::new(Line::default());
    let pong = Arc::new(Line::default());
    let (p2, q2) = (ping.clone(), pong.clone());
    let mut last = 0;
    let _responder = Responder::start("baseline-responder", place, move || {
        let v = p2.0.load(Ordering::Acquire);
        if v != last {
            last = v;
            q2.0.store(v, Ordering::Release);
        } else {
            spin_loop();
        }
    })?;
    Ok(exchange_samples(samples, warmup, |i| {
        ping.0.store(i, Ordering::Release);
        while pong.0.load(Ordering::Acquire) != i {
            spin_loop();
        }
    }))
}

/// The ring protocol with no software around it: the initiator writes a
/// 64-byte descriptor (words 1-7, then word 0 with a sequence number), the
/// responder copies it and answers with a 16-byte completion (word 1, then
/// word 0 with the sequence), as the driver and the model exchange them.
pub fn protocol_floor_rtt(samples: u64, warmup: u64, place: &ThreadPlacement) -> Result<Percentiles, BenchError> {
    #[repr(align(128))]
    #[derive(Default)]
    struct Words([AtomicU64; 8]);
    let desc = Arc::new(Words::default());
    let cpl = Arc::new(Words::default());
    let (d2, c2) = (desc.clone(), cpl.clone());
    let mut last = 0;
    let _responder = Responder::start("floor-responder", place, move || {
        let w0 = d2.0[0].load(Ordering::Acquire);
        if w0 == last {
            spin_loop();
            return;
        }
        last = w0;
        let mut body = 0u64;
        for w in &d2.0[1..] {
            body = body.wrapping_add(w.load(Ordering::Relaxed));
        }
        c2.0[1].store(body, Ordering::Relaxed);
        c2.0[0].store(w0, Ordering::Release);
    })?;
    Ok(time_exchanges(samples, warmup, |i| {
        for (k, w) in desc.0.iter().enumerate().skip(1) {
            w.store(i ^ k as u64, Ordering::Relaxed);
        }
        desc.0[0].store(i, Ordering::Release);
        while cpl.0[0].load(Ordering::Acquire) != i {
            spin_loop();
        }
        std::hint::black_box(cpl.0[1].load(Ordering::Relaxed));
    }))
}

/// Bare SPSC ring of 64-byte slots with `slots` entries, moving `ops`
/// items from this thread to the device CPU; each side publishes its index
/// every `publish_every` items (1: the textbook ring, as rigtorp's
/// SPSCQueue; each side caches the other's index). Returns items per second.
pub fn baseline_spsc(ops: u64, slots: usize, publish_every: u64, place: &ThreadPlacement) -> Result<f64, BenchError> {
    let every = publish_every.max(1);
    #[repr(align(64))]
    struct Slot([AtomicU64; 8]);
    let ring: Arc<Vec<Slot>> = Arc::new((0..slots).map(|_| Slot(Default::default())).collect());
    let head = Arc::new(Line::default()); // consumer position
    let tail = Arc::new(Line::default()); // producer position
    let (r2, h2, t2) = (ring.clone(), head.clone(), tail.clone());
    let n = slots as u64;
    let consumer = spawn_on_device_cpu("baseline-consumer", place, move || {
        let mut pos = 0u64;
        let mut sum = 0u64;
        let mut seen_tail = 0u64;
        while pos < ops {
            if pos == seen_tail {
                seen_tail = t2.0.load(Ordering::Acquire);
                if pos == seen_tail {
                    spin_loop();
                    continue;
                }
            }
            let s = &r2[(pos % n) as usize];
            for w in &s.0 {
                sum = sum.wrapping_add(w.load(Ordering::Relaxed));
            }
            pos += 1;
            if pos % every == 0 || pos == seen_tail {
                h2.0.store(pos, Ordering::Release);
            }
        }
        h2.0.store(pos, Ordering::Release);
        std::hint::black_box(sum);
    })?;
    let start = Instant::now();
    let mut pos = 0u64;
    let mut seen_head = 0u64;
    while pos < ops {
        if pos - seen_head >= n - 1 {
            seen_head = head.0.load(Ordering::Acquire);
            if pos - seen_head >= n - 1 {
                spin_loop();
                continue;
            }
        }
        let s = &ring[(pos % n) as usize];
        for (i, w) in s.0.iter().enumerate() {
            w.store(pos ^ i as u64, Ordering::Relaxed);
        }
        pos += 1;
        if pos % every == 0 || pos == ops {
            tail.0.store(pos, Ordering::Release);
        }
    }
    while head.0.load(Ordering::Acquire) < ops {
        spin_loop();
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = consumer.join();
    Ok(ops as f64 / secs)
}

fn bench_key(i: u32) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a00_0000 | (i & 0x00ff_ffff)),
        (1024 + i % 60000) as u16,
        Ipv4Addr::new(192, 0, 2, 10),
        443,
        proto::TCP,
        0,
    )
}

fn established(timeout_s: u32) -> ConnState {
    ConnState::new(
        TcpState::Established,
        Direction::Original,
        ConnFlags::SEEN_REPLY | ConnFlags::ASSURED | ConnFlags::CONFIRMED,
        timeout_s,
        0,
    )
}

fn emulated(capacity: u32, place: &ThreadPlacement) -> Result<ConnTable<EmulatedDevice>, BenchError> {
    emulated_with(capacity, place, true)
}

fn emulated_with(
    capacity: u32,
    place: &ThreadPlacement,
    inline: bool,
) -> Result<ConnTable<EmulatedDevice>, BenchError> {
    let dev = EmulatedDevice::new(
        ModelConfig { max_capacity: capacity.max(1 << 16), ..Default::default() },
        ExecMode::Thread,
    )?;
    dev.start_poller(place.device_cpu)?;
    let cfg =
        DriverConfig { table_capacity: capacity, aging_period_ms: 0, inline_doorbell: inline, ..Default::default() };
    Ok(ConnTable::open(dev, cfg)?)
}

/// What a round-trip run posts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RttCommand {
    /// UPDATE of one resident connection.
    Update,
    /// NOP: the ring protocol alone, without table work.
    Nop,
}

/// Round trip of single commands, device on its own polling thread,
/// doorbells inline or through the register.
pub fn command_rtt(
    samples: u64,
    warmup: u64,
    place: &ThreadPlacement,
    what: RttCommand,
    inline: bool,
) -> Result<Percentiles, BenchError> {
    let mut t = emulated_with(1 << 16, place, inline)?;
    pin(place.driver_cpu);
    let key = bench_key(1);
    t.insert(&key, &ConnEntry::new(established(3600))).map_err(|e| BenchError::Table(e.to_string()))?;
    Ok(percentiles(&mut command_samples(&mut t, &key, what, samples, warmup, 0)?))
}

/// Times `samples` single commands (after `warmup` untimed ones) on `t`,
/// whose device is polled by its own thread; an UPDATE sets the mark of
/// `key` (resident) to `first`, `first + 1`, …
fn command_samples(
    t: &mut ConnTable<EmulatedDevice>,
    key: &ConnKey,
    what: RttCommand,
    samples: u64,
    warmup: u64,
    first: u64,
) -> Result<Vec<u64>, BenchError> {
    let drv = t.driver();
    let mut state = established(3600);
    let mut out = Vec::with_capacity(samples as usize);
    for i in first..(first + samples + warmup) {
        state.mark = (i as u32).into();
        let d = if what == RttCommand::Nop {
            CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0)
        } else {
            CommandDescriptor::conn(Opcode::Update, DescFlags::AUTO_GENERATION, 0, key, &state)
        };
        let t0 = Instant::now();
        let c = drv.execute(&d, None)?;
        let dt = t0.elapsed().as_nanos() as u64;
        if c.status != nicsync_fwif::cpl::CplStatus::Success {
            return Err(BenchError::Table(format!("update failed: {}", c.status)));
        }
        if i >= first + warmup {
            out.push(dt);
        }
    }
    Ok(out)
}

/// Rounds in which [`interleaved_update_rtt`] measures the bare and the
/// update round trip in turn.
pub const RTT_ROUNDS: u64 = 10;

/// What [`interleaved_update_rtt`] measured.
#[derive(Clone, Debug)]
pub struct InterleavedRtt {
    /// The bare round trip, all rounds' samples.
    pub baseline: Percentiles,
    /// The update round trip (inline doorbell), all rounds' samples.
    pub update: Percentiles,
    /// Per round: its update p50 over its bare p50.
    pub round_ratios: Vec<f64>,
    /// Per round: its bare p50, which tells the placements apart.
    pub round_baselines: Vec<f64>,
}

/// The bare round trip and an UPDATE's round trip, measured in
/// [`RTT_ROUNDS`] alternating rounds on the same two CPUs (the model's
/// polling thread stopped while the bare responder runs, and started
/// again), so that both figures come from the same placements of the
/// vCPUs: the hypervisor moves them every few minutes, and a bare round
/// trip measured once, before or after, can belong to another placement
/// than the figure it is compared with.
pub fn interleaved_update_rtt(
    samples: u64,
    warmup: u64,
    place: &ThreadPlacement,
) -> Result<InterleavedRtt, BenchError> {
    let mut t = emulated_with(1 << 16, place, true)?;
    pin(place.driver_cpu);
    let key = bench_key(1);
    t.insert(&key, &ConnEntry::new(established(3600))).map_err(|e| BenchError::Table(e.to_string()))?;
    // At least `samples` in all.
    let per = samples.div_ceil(RTT_ROUNDS).max(100);
    let warm = (warmup / RTT_ROUNDS).max(100);
    let (mut bare, mut update, mut round_ratios, mut round_baselines) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let p50 = |v: &[u64]| {
        let mut v = v.to_vec();
        percentiles(&mut v).p50
    };
    for r in 0..RTT_ROUNDS {
        let b = with_poller_stopped(t.driver_ref().device(), place, || baseline_rtt_samples(per, warm, place))?;
        let u = command_samples(&mut t, &key, RttCommand::Update, per, warm, r * (per + warm))?;
        let b50 = p50(&b);
        round_ratios.push(p50(&u) / b50.max(1.0));
        round_baselines.push(b50);
        bare.extend(b);
        update.extend(u);
    }
    Ok(InterleavedRtt {
        baseline: percentiles(&mut bare),
        update: percentiles(&mut update),
        round_ratios,
        round_baselines,
    })
}

/// Runs `f` (a baseline, which takes the device's CPU) with `dev`'s polling
/// thread stopped, then starts the thread again on the device's CPU, even
/// if `f` failed, and pins this thread back to the driver's.
fn with_poller_stopped<T>(
    dev: &EmulatedDevice,
    place: &ThreadPlacement,
    f: impl FnOnce() -> Result<T, BenchError>,
) -> Result<T, BenchError> {
    dev.stop_poller();
    let r = f();
    dev.start_poller(place.device_cpu)?;
    pin(place.driver_cpu);
    r
}

/// The smallest and the largest of `xs` ((inf, -inf) if none).
fn span<'a>(xs: impl IntoIterator<Item = &'a f64>) -> (f64, f64) {
    xs.into_iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

/// Keeps the ring full of UPDATEs over `working_set` connections: post
/// every free slot, ring once, reap. Returns updates/s per repetition and
/// modelled cycles per update. Before each repetition the model's polling
/// thread is stopped and `beside` runs (the baselines, on the same two
/// CPUs), so that each repetition and its baselines share a placement of
/// the vCPUs.
pub fn batch_throughput(
    updates: u64,
    reps: usize,
    working_set: u32,
    place: &ThreadPlacement,
    mut beside: impl FnMut() -> Result<(), BenchError>,
) -> Result<(Vec<f64>, f64, u32, u32), BenchError> {
    let mut t = emulated(working_set.max(1 << 16), place)?;
    pin(place.driver_cpu);
    let ops: Vec<TableOp> =
        (0..working_set).map(|i| TableOp::Insert(bench_key(i), ConnEntry::new(established(3600)))).collect();
    for r in t.batch(&ops)? {
        r.map_err(|e| BenchError::Table(e.to_string()))?;
    }
    let drv = t.driver();
    let descs: Vec<CommandDescriptor> = (0..working_set)
        .map(|i| {
            CommandDescriptor::conn(Opcode::Update, DescFlags::AUTO_GENERATION, 0, &bench_key(i), &established(3600))
        })
        .collect();
    let clock = drv.info().clock_mhz;
    let mut runs = Vec::with_capacity(reps);
    let (mut all_cycles, mut all_cmds) = (0u64, 0u64);
    for _ in 0..reps {
        with_poller_stopped(drv.device(), place, &mut beside)?;
        // Untimed: the new thread reaching its CPU and the caches warming.
        pump(drv, &descs, (updates / 20).max(1_000))?;
        let c0 = drv.device_counter(Counter::ModelCycles);
        let f0 = drv.device_counter(Counter::CommandsFetched);
        let start = Instant::now();
        let done = pump(drv, &descs, updates)?;
        let secs = start.elapsed().as_secs_f64();
        runs.push(done as f64 / secs);
        // Counters are published by housekeeping: wait until the device's
        // count covers every command of this repetition.
        let deadline = Instant::now() + Duration::from_secs(1);
        while drv.device_counter(Counter::CommandsFetched) - f0 < done && Instant::now() < deadline {
            spin_loop();
        }
        all_cycles += drv.device_counter(Counter::ModelCycles) - c0;
        all_cmds += drv.device_counter(Counter::CommandsFetched) - f0;
    }
    Ok((runs, all_cycles as f64 / all_cmds.max(1) as f64, clock, drv.ring_size()))
}

/// Streams `total` descriptors from `descs` (cycling) through the ring.
fn pump(drv: &mut Driver<EmulatedDevice>, descs: &[CommandDescriptor], total: u64) -> Result<u64, BenchError> {
    let mut posted = 0u64;
    let mut completed = 0u64;
    let mut errors = 0u64;
    let mut next = 0usize;
    let mut idle_since: Option<Instant> = None;
    while completed < total {
        while posted < total && drv.free_slots() > 0 {
            drv.post(&descs[next], None)?;
            next += 1;
            if next == descs.len() {
                next = 0;
            }
            posted += 1;
        }
        drv.ring();
        let mut n = 0u64;
        let consumed = drv.poll_completions(|c| {
            n += 1;
            if c.status != nicsync_fwif::cpl::CplStatus::Success {
                errors += 1;
            }
        });
        if consumed as u64 != n {
            return Err(BenchError::Table(format!("{} completions rejected", consumed as u64 - n)));
        }
        completed += n;
        if n == 0 {
            let t = *idle_since.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(5) {
                return Err(BenchError::Table("device stopped completing".into()));
            }
            // Back off a little: re-reading the completion line while the
            // device is writing it would bounce the line between the cores.
            for _ in 0..8 {
                spin_loop();
            }
        } else {
            idle_since = None;
        }
    }
    if errors > 0 {
        return Err(BenchError::Table(format!("{errors} updates failed")));
    }
    Ok(completed)
}

/// Inserts one million connections through the rings.
pub fn million(place: &ThreadPlacement) -> Result<MillionReport, BenchError> {
    const N: u32 = 1_000_000;
    let mut t = emulated(N, place)?;
    pin(place.driver_cpu);
    let ops: Vec<TableOp> = (0..N).map(|i| TableOp::Insert(bench_key(i), ConnEntry::new(established(0)))).collect();
    let start = Instant::now();
    let results = t.batch(&ops)?;
    let secs = start.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(BenchError::Table(format!("{failed} of {N} inserts failed")));
    }
    let entries = t.len() as u64;
    let kicks = t.driver().device_counter(Counter::CuckooKicks);
    let bytes = match t.driver_ref().device().nic().core().table().memory_bytes() {
        b if entries > 0 => b as f64 / entries as f64,
        _ => 0.0,
    };
    Ok(MillionReport { entries, bytes_per_entry: bytes, inserts_per_s: N as f64 / secs, cuckoo_kicks: kicks })
}

/// Runs everything.
pub fn run(opts: &BenchOptions) -> Result<RingReport, BenchError> {
    let place = placement();
    let samples = opts.updates.max(1000);
    let warmup = (samples / 10).max(1000);
    let rtt = interleaved_update_rtt(samples, warmup, &place)?;
    let (baseline, update) = (rtt.baseline, rtt.update);
    let floor = protocol_floor_rtt(samples, warmup, &place)?;
    let update_reg = command_rtt(samples, warmup, &place, RttCommand::Update, false)?;
    let nop = command_rtt(samples, warmup, &place, RttCommand::Nop, true)?;
    let slots = 1usize << DriverConfig::default().cmd_ring_log2;
    let mut spsc_runs = Vec::with_capacity(opts.repetitions);
    let mut spsc16_runs = Vec::with_capacity(opts.repetitions);
    let items = opts.updates.max(100_000) * 5;
    let (batch_runs, cycles, clock, ring_slots) =
        batch_throughput(items, opts.repetitions, opts.working_set, &place, || {
            spsc_runs.push(baseline_spsc(items, slots, 1, &place)?);
            spsc16_runs.push(baseline_spsc(items, slots, 16, &place)?);
            Ok(())
        })?;
    let table_1m = if opts.million { Some(million(&place)?) } else { None };
    let batch = median(&mut batch_runs.clone());
    let spsc = median(&mut spsc_runs.clone());
    let spsc16 = median(&mut spsc16_runs);
    let timer = timer_overhead_ns();
    let end = baseline_rtt(samples.min(20_000), warmup.min(2_000), &place)?;
    // Stable: no round's bare round trip, nor the one at the end, 1.5
    // times another's (the pooled p50 alone hides a move within the rounds).
    let (lo, hi) = span(rtt.round_baselines.iter().chain([&baseline.p50, &end.p50]));
    let lo = lo.max(1.0);
    let mut threads = place;
    threads.pinned &= !PIN_FAILED.load(Ordering::Relaxed);
    Ok(RingReport {
        update_rtt_ratio_p50: update.p50 / baseline.p50.max(1.0),
        update_rtt_ratio_p50_round_median: median(&mut rtt.round_ratios.clone()),
        update_rtt_ratio_p50_rounds: rtt.round_ratios,
        baseline_rtt_p50_rounds: rtt.round_baselines,
        timer_overhead_ns: timer,
        update_rtt_ratio_p50_timer_corrected: (update.p50 - timer).max(1.0) / (baseline.p50 - timer).max(1.0),
        batch_to_spsc_ratio: batch / spsc.max(1.0),
        batch_to_spsc_batched16_ratio: batch / spsc16.max(1.0),
        baseline_rtt_ns: baseline,
        update_rtt_ns: update,
        update_rtt_register_doorbell_ns: update_reg,
        update_doorbell: "inline",
        nop_rtt_ns: nop,
        protocol_floor_rtt_ns: floor,
        batch_updates_per_s: batch,
        batch_updates_per_s_runs: batch_runs,
        baseline_spsc_ops_per_s: spsc,
        baseline_spsc_ops_per_s_runs: spsc_runs,
        baseline_spsc_batched16_ops_per_s: spsc16,
        model_cycles_per_update: cycles,
        model_clock_mhz: clock,
        model_ns_per_update: cycles * 1000.0 / clock.max(1) as f64,
        table_1m,
        threads,
        baseline_rtt_end_ns_p50: end.p50,
        placement_stable: hi / lo <= 1.5,
        samples,
        ring_slots,
    })
}

/// Human-readable report.
pub fn render(r: &RingReport) -> String {
    let mut s = String::new();
    let p = |x: &Percentiles| format!("p50 {:>7.0} ns  p99 {:>7.0} ns  p99.9 {:>7.0} ns", x.p50, x.p99, x.p999);
    s += &format!(
        "threads: driver on CPU {:?}, device model on CPU {:?} ({} CPUs, {} busy-polling threads, pinned: {})\n",
        r.threads.driver_cpu, r.threads.device_cpu, r.threads.cpus, r.threads.busy_threads, r.threads.pinned
    );
    if !r.placement_stable {
        let rounds: Vec<String> = r.baseline_rtt_p50_rounds.iter().map(|b| format!("{b:.0}")).collect();
        s += &format!(
            "WARNING: the bare round trip moved during the run (per round {} ns, {:.0} ns at the end): the vCPUs \
             changed cores; the pooled ratios below mix placements, the per-round ones do not\n",
            rounds.join("/"),
            r.baseline_rtt_end_ns_p50
        );
    }
    s += &format!("baseline core-to-core RTT   {}\n", p(&r.baseline_rtt_ns));
    s += &format!("ring protocol floor         {}\n", p(&r.protocol_floor_rtt_ns));
    s += &format!("update RTT (rings + model)  {}\n", p(&r.update_rtt_ns));
    s += &format!(
        "  ratio p50 {:.2} (target <= 1.25); {:.2} without the {:.0} ns timer cost\n",
        r.update_rtt_ratio_p50, r.update_rtt_ratio_p50_timer_corrected, r.timer_overhead_ns
    );
    let mut rounds = r.update_rtt_ratio_p50_rounds.clone();
    if !rounds.is_empty() {
        let (lo, hi) = span(&rounds);
        s += &format!(
            "  bare and update round trips in {} alternating rounds: per-round ratio median {:.2}, {:.2}-{:.2}\n",
            rounds.len(),
            median(&mut rounds),
            lo,
            hi
        );
    }
    s += &format!("update RTT, register doorbell {}\n", p(&r.update_rtt_register_doorbell_ns));
    s += &format!("NOP RTT (protocol only)     {}\n", p(&r.nop_rtt_ns));
    s += &format!("baseline SPSC 64-byte slots {:>12.0} ops/s\n", r.baseline_spsc_ops_per_s);
    s += &format!("  (indices published every 16: {:.0} ops/s)\n", r.baseline_spsc_batched16_ops_per_s);
    s += &format!(
        "batched updates             {:>12.0} updates/s ({} slots per ring)\n",
        r.batch_updates_per_s, r.ring_slots
    );
    s += &format!(
        "  ratio to SPSC {:.2} (target >= 0.33; >= 10 M/s); {:.2} to the tuned ring\n",
        r.batch_to_spsc_ratio, r.batch_to_spsc_batched16_ratio
    );
    s += &format!(
        "cost model: {:.1} cycles per update at {} MHz = {:.0} ns modelled hardware time\n",
        r.model_cycles_per_update, r.model_clock_mhz, r.model_ns_per_update
    );
    if let Some(m) = &r.table_1m {
        s += &format!(
            "1M table: {} entries resident, {:.1} bytes/entry (target <= 128), {:.0} inserts/s, {} cuckoo kicks\n",
            m.entries, m.bytes_per_entry, m.inserts_per_s, m.cuckoo_kicks
        );
    }
    s
}
