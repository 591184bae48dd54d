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
            || CuckooTable::new(n as usize),
            |mut t| {
                let mut tr = Traffic::default();
                for i in 0..n {
                    let s = Slot { key: key(i), state: state(), nat: Default::default(), expires_ms: 0 };
                    t.insert(s, &mut tr).expect("insert");
                }
                t
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, ring, cuckoo);
criterion_main!(benches);
