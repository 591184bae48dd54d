//! Criterion benchmarks of the data path's CPU cost, with the device model
//! run inline (in the caller's thread), so the figures are the work of the
//! driver and the model without cross-core effects. Cross-core latency and
//! throughput against this machine's floor are `nicsync bench ring`.

#![allow(clippy::expect_used)] // a benchmark that cannot set up has nothing to measure
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nicsync::{ConnEntry, ConnTable, DriverConfig, TableOp};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_model::table::{CuckooTable, Slot, Traffic};
use nicsync_vfio::EmulatedDevice;

fn key(i: u32) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a00_0000 | i),
        (1024 + i % 60000) as u16,
        Ipv4Addr::new(192, 0, 2, 1),
        443,
        proto::TCP,
        0,
    )
}

fn state() -> ConnState {
    ConnState::new(TcpState::Established, Direction::Original, ConnFlags::ASSURED, 3600, 0)
}

fn table(n: u32) -> ConnTable<EmulatedDevice> {
    let dev = EmulatedDevice::inline().expect("emulated device");
    let mut t =
        ConnTable::open(dev, DriverConfig { table_capacity: n.max(1 << 16), ..Default::default() }).expect("probe");
    let ops: Vec<TableOp> = (0..n).map(|i| TableOp::Insert(key(i), ConnEntry::new(state()))).collect();
    for r in t.batch(&ops).expect("batch") {
        r.expect("insert");
    }
    t
}

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("inline");
    let mut t = table(4096);
    let mut i = 0u32;
    g.bench_function("update_roundtrip", |b| {
        b.iter(|| {
            i = (i + 1) % 4096;
            t.update(&key(i), &ConnEntry::new(state())).expect("update")
        })
    });
    let ops: Vec<TableOp> = (0..256).map(|i| TableOp::Update(key(i), ConnEntry::new(state()))).collect();
    g.throughput(Throughput::Elements(ops.len() as u64));
    g.bench_function("batch_256_updates", |b| b.iter(|| t.batch(&ops).expect("batch")));
    g.finish();
}

fn cuckoo(c: &mut Criterion) {
    let mut g = c.benchmark_group("cuckoo");
    let n = 100_000u32;
    g.bench_function("fill_100k", |b| {
        b.iter_batched(
            || CuckooTable::new(n as usize, nicsync_fwif::hash::TableHash::default()),
            |mut t| {
                let mut tr = Traffic::default();
                for i in 0..n {
                    let s = Slot { key: key(i), state: state(), nat: Default::default(), expires_ms: 0, owner: 0 };
                    t.insert(s, &mut tr).expect("insert");
                }
                t
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The CPU cost of each side separately, per command: the device model
/// stepped by hand over a full ring of updates, and the host's posting and
/// reaping around it. (The device is brought up by its polling thread,
/// which is then stopped so this thread can step it.)
fn split(c: &mut Criterion) {
    use nicsync_fwif::cmd::{CommandDescriptor, DescFlags, Opcode};
    use nicsync_model::{ExecMode, ModelConfig};
    use std::time::{Duration, Instant};

    const N: u32 = 4096;
    let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread).expect("emulated device");
    dev.start_poller(None).expect("poller");
    let mut t = ConnTable::open(dev, DriverConfig { table_capacity: 1 << 16, ..Default::default() }).expect("probe");
    let ops: Vec<TableOp> = (0..N).map(|i| TableOp::Insert(key(i), ConnEntry::new(state()))).collect();
    for r in t.batch(&ops).expect("batch") {
        r.expect("insert");
    }
    t.driver_ref().device().stop_poller();
    let nic = t.driver_ref().device().nic().clone();
    let descs: Vec<CommandDescriptor> = (0..N)
        .map(|i| CommandDescriptor::conn(Opcode::Update, DescFlags::AUTO_GENERATION, 0, &key(i), &state()))
        .collect();
    let full = t.driver().free_slots() as usize;
    let mut next = 0usize;
    let mut g = c.benchmark_group("split");
    let mut phase = |which: u8, burst: usize, iters: u64| {
        let mut spent = Duration::ZERO;
        // The design's state, held for the whole run: this thread is the
        // device's only runner here.
        let mut core = nic.core();
        for _ in 0..iters {
            let drv = t.driver();
            let t0 = Instant::now();
            for _ in 0..burst {
                drv.post(&descs[next], None).expect("post");
                next = (next + 1) % descs.len();
            }
            drv.ring();
            let t1 = Instant::now();
            while core.poll() {}
            let t2 = Instant::now();
            let n = drv.poll_completions(|_| {});
            let t3 = Instant::now();
            assert_eq!(n, burst);
            spent += match which {
                0 => t1 - t0,
                1 => t2 - t1,
                _ => t3 - t2,
            };
        }
        spent
    };
    for (name, burst) in [("single", 1usize), ("ring", full)] {
        g.throughput(Throughput::Elements(burst as u64));
        g.bench_function(format!("{name}/host_post_and_ring"), |b| b.iter_custom(|n| phase(0, burst, n)));
        g.bench_function(format!("{name}/device_execute"), |b| b.iter_custom(|n| phase(1, burst, n)));
        g.bench_function(format!("{name}/host_reap"), |b| b.iter_custom(|n| phase(2, burst, n)));
    }
    g.finish();
}

criterion_group!(benches, ring, cuckoo, split);
criterion_main!(benches);
