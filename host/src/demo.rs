//! `nicsync demo`: a realistic churn of connections through the rings of
//! the embedded (emulated) device.
//!
//! Connections are born (SYN_SENT), become established, close (FIN_WAIT,
//! TIME_WAIT) and are destroyed, over IPv4 and IPv6, TCP and UDP, a share of
//! them source-NATed; lookups check what the card holds against the host's
//! own copy, and short-lived UDP flows are left to the card's aging, whose
//! events the demo collects at the end.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, NatKind, TcpState};
use nicsync_fwif::event::EventKind;
use nicsync_fwif::regs::Counter;
use nicsync_model::rng::SeededRng;
use nicsync_vfio::NicDevice;
use serde::Serialize;

use crate::driver::DriverError;
use crate::stats::{percentiles, Percentiles};
use crate::table::{ConnEntry, ConnTable, TableError, TableOp};

/// Demo parameters.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Table operations to perform one at a time.
    pub operations: u64,
    /// Connections alive at most.
    pub max_live: usize,
    /// Seed of the workload.
    pub seed: u64,
    /// UDP flows left to aging at the end.
    pub aging_flows: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { operations: 200_000, max_live: 20_000, seed: 0x5eed, aging_flows: 500 }
    }
}

/// What the demo did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DemoReport {
    /// Operations by kind.
    pub ops: HashMap<&'static str, u64>,
    /// Latency of each kind.
    pub latency_ns: HashMap<&'static str, Percentiles>,
    /// All single operations together.
    pub all_latency_ns: Percentiles,
    /// IPv4 / IPv6 connections created.
    pub ipv4_created: u64,
    /// IPv6 connections created.
    pub ipv6_created: u64,
    /// Connections with NAT.
    pub nat_created: u64,
    /// Lookups whose answer differed from the host's copy (must be 0).
    pub mismatches: u64,
    /// Batched operations and their rate.
    pub batch_ops: u64,
    /// Batched rate.
    pub batch_ops_per_s: f64,
    /// Flows removed by the card's aging and reported as events.
    pub aged_events: u64,
    /// Entries on the card at the end.
    pub final_entries: u64,
    /// Entries the host expects at the end.
    pub expected_entries: u64,
    /// Wall time, the wait for aging included.
    pub seconds: f64,
    /// Wall time of the single operations' churn.
    pub churn_seconds: f64,
}

#[derive(Clone, Copy, Debug)]
struct Live {
    key: ConnKey,
    stage: TcpState,
    nat: Option<Nat>,
}

fn new_conn(rng: &mut SeededRng, serial: u32) -> (ConnKey, bool) {
    let v6 = rng.below(4) == 0;
    let sport = 1024 + (serial % 64000) as u16;
    let dport = [443u16, 80, 22, 53, 8443][rng.below(5) as usize];
    let proto = if dport == 53 { proto::UDP } else { proto::TCP };
    let key = if v6 {
        let s = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, (serial >> 16) as u16, serial as u16);
        let d = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1 + rng.below(16) as u16);
        ConnKey::v6(s, sport, d, dport, proto, 0)
    } else {
        let s = Ipv4Addr::from(0x0a00_0000 | (serial & 0x00ff_ffff));
        let d = Ipv4Addr::new(198, 51, 100, 1 + rng.below(200) as u8);
        ConnKey::v4(s, sport, d, dport, proto, 0)
    };
    (key, v6)
}

fn state_for(stage: TcpState, proto_num: u8) -> ConnState {
    let (flags, timeout) = match stage {
        TcpState::SynSent => (ConnFlags::SYNC, 120),
        TcpState::Established => {
            (ConnFlags::SEEN_REPLY | ConnFlags::ASSURED | ConnFlags::CONFIRMED | ConnFlags::SYNC, 432_000)
        }
        TcpState::FinWait => (ConnFlags::SEEN_REPLY | ConnFlags::ASSURED | ConnFlags::CONFIRMED | ConnFlags::SYNC, 120),
        _ => (ConnFlags::SEEN_REPLY | ConnFlags::CONFIRMED | ConnFlags::SYNC, 120),
    };
    let tcp = if proto_num == proto::TCP { stage } else { TcpState::None };
    ConnState::new(tcp, Direction::Original, flags, timeout, 0)
}

/// Runs the demo against `table`. `on_aging_wait` is called while waiting
/// for aging (tests advance a virtual clock there).
pub fn run<D: NicDevice>(
    table: &mut ConnTable<D>,
    opts: &DemoOptions,
    mut on_aging_wait: impl FnMut(),
) -> Result<DemoReport, TableError> {
    let start = Instant::now();
    let mut rng = SeededRng::new(opts.seed);
    let mut live: Vec<Live> = Vec::new();
    let mut index: HashMap<ConnKey, usize> = HashMap::new();
    let mut rep = DemoReport::default();
    let mut lat: HashMap<&'static str, Vec<u64>> = HashMap::new();
    let mut serial = 0u32;
    for _ in 0..opts.operations {
        let roll = rng.below(100);
        let (kind, t) = if live.len() < opts.max_live && (roll < 40 || live.is_empty()) {
            serial += 1;
            let (key, v6) = new_conn(&mut rng, serial);
            let nat = (!v6 && rng.below(3) == 0).then(|| {
                Nat::new(NatKind::Source, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)), 20000 + (serial % 40000) as u16)
            });
            let entry = ConnEntry { state: state_for(TcpState::SynSent, key.proto), nat };
            let t0 = Instant::now();
            table.insert(&key, &entry)?;
            let t = t0.elapsed();
            if v6 {
                rep.ipv6_created += 1;
            } else {
                rep.ipv4_created += 1;
            }
            rep.nat_created += nat.is_some() as u64;
            index.insert(key, live.len());
            live.push(Live { key, stage: TcpState::SynSent, nat });
            ("new", t)
        } else if roll < 55 {
            let i = rng.below(live.len() as u64) as usize;
            let l = live[i];
            let t0 = Instant::now();
            let rec = table.lookup(&l.key)?;
            let t = t0.elapsed();
            let ok = rec.is_some_and(|r| {
                let tcp_ok = l.key.proto != proto::TCP || r.state.tcp() == Some(l.stage);
                tcp_ok
                    && r.nat.nat_kind() == Some(l.nat.map_or(NatKind::None, |n| n.nat_kind().unwrap_or(NatKind::None)))
            });
            rep.mismatches += (!ok) as u64;
            ("lookup", t)
        } else {
            let i = rng.below(live.len() as u64) as usize;
            let l = live[i];
            let next = match l.stage {
                TcpState::SynSent => Some(TcpState::Established),
                TcpState::Established => Some(TcpState::FinWait),
                TcpState::FinWait => Some(TcpState::TimeWait),
                _ => None,
            };
            match next {
                Some(stage) => {
                    let entry = ConnEntry::new(state_for(stage, l.key.proto));
                    let t0 = Instant::now();
                    table.update(&l.key, &entry)?;
                    let t = t0.elapsed();
                    live[i].stage = stage;
                    (stage.name(), t)
                }
                None => {
                    let t0 = Instant::now();
                    table.delete(&l.key)?;
                    let t = t0.elapsed();
                    index.remove(&l.key);
                    live.swap_remove(i);
                    if let Some(moved) = live.get(i) {
                        index.insert(moved.key, i);
                    }
                    ("destroyed", t)
                }
            }
        };
        *rep.ops.entry(kind).or_default() += 1;
        lat.entry(kind).or_default().push(t.as_nanos() as u64);
    }
    rep.churn_seconds = start.elapsed().as_secs_f64();

    // A burst of established-state refreshes, batched.
    let batch: Vec<TableOp> = live
        .iter()
        .filter(|l| l.stage == TcpState::Established)
        .map(|l| TableOp::Update(l.key, ConnEntry::new(state_for(TcpState::Established, l.key.proto))))
        .collect();
    let t0 = Instant::now();
    let results = table.batch(&batch).map_err(TableError::from)?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        return Err(e);
    }
    rep.batch_ops = batch.len() as u64;
    rep.batch_ops_per_s = if secs > 0.0 { batch.len() as f64 / secs } else { 0.0 };

    // Short UDP flows left to the card's aging (1 s timeout).
    let mut aging = Vec::new();
    for i in 0..opts.aging_flows {
        let key = ConnKey::v4(
            Ipv4Addr::new(172, 16, (i >> 8) as u8, i as u8),
            5353,
            Ipv4Addr::new(224, 0, 0, 251),
            5353,
            proto::UDP,
            0,
        );
        aging.push(TableOp::Insert(
            key,
            ConnEntry::new(ConnState::new(TcpState::None, Direction::Original, ConnFlags::empty(), 1, 0)),
        ));
    }
    for r in table.batch(&aging).map_err(TableError::from)? {
        r?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while rep.aged_events < opts.aging_flows as u64 && Instant::now() < deadline {
        on_aging_wait();
        table.driver().poll_events(|e| {
            if e.kind == EventKind::Aged {
                rep.aged_events += 1;
            }
        });
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut all: Vec<u64> = lat.values().flatten().copied().collect();
    rep.all_latency_ns = percentiles(&mut all);
    for (k, mut v) in lat {
        rep.latency_ns.insert(k, percentiles(&mut v));
    }
    rep.final_entries = table.len() as u64;
    rep.expected_entries = live.len() as u64;
    rep.seconds = start.elapsed().as_secs_f64();
    Ok(rep)
}

/// Human-readable report.
pub fn render<D: NicDevice>(rep: &DemoReport, table: &ConnTable<D>) -> String {
    let mut s = String::new();
    s += &format!(
        "churned {} single operations in {:.2} s: {} IPv4 and {} IPv6 connections created ({} with source NAT)\n",
        rep.ops.values().sum::<u64>(),
        rep.churn_seconds,
        rep.ipv4_created,
        rep.ipv6_created,
        rep.nat_created
    );
    s += "operation       count      p50 ns     p99 ns   p99.9 ns\n";
    let order = ["new", "established", "fin_wait", "time_wait", "destroyed", "lookup"];
    for k in order {
        if let (Some(n), Some(p)) = (rep.ops.get(k), rep.latency_ns.get(k)) {
            s += &format!("{k:<12} {n:>8} {:>11.0} {:>10.0} {:>10.0}\n", p.p50, p.p99, p.p999);
        }
    }
    let a = &rep.all_latency_ns;
    s += &format!(
        "{:<12} {:>8} {:>11.0} {:>10.0} {:>10.0}\n",
        "all",
        rep.ops.values().sum::<u64>(),
        a.p50,
        a.p99,
        a.p999
    );
    s += &format!(
        "batched refresh of {} established connections: {:.0} updates/s\n",
        rep.batch_ops, rep.batch_ops_per_s
    );
    s += &format!("aging removed {} short-lived UDP flows and reported each as an event\n", rep.aged_events);
    s += &format!(
        "card holds {} connections, host expects {}; lookups disagreeing with the host: {}\n",
        rep.final_entries, rep.expected_entries, rep.mismatches
    );
    let d = table.driver_ref();
    s += "device counters:";
    for c in [
        Counter::CommandsFetched,
        Counter::Doorbells,
        Counter::InlineDoorbells,
        Counter::InlineMisses,
        Counter::CuckooKicks,
        Counter::EntriesAged,
        Counter::EventsWritten,
    ] {
        s += &format!(" {}={}", c.name(), d.device_counter(c));
    }
    s.push('\n');
    s
}

/// Fails the demo if the card and the host disagree.
pub fn check(rep: &DemoReport) -> Result<(), DriverError> {
    if rep.mismatches > 0 || rep.final_entries != rep.expected_entries {
        return Err(DriverError::Config(format!(
            "card and host disagree: {} lookup mismatches, {} entries on the card vs {} expected",
            rep.mismatches, rep.final_entries, rep.expected_entries
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::DriverConfig;
    use nicsync_vfio::EmulatedDevice;

    #[test]
    fn demo_agrees_with_the_card_and_ages_flows() -> Result<(), Box<dyn std::error::Error>> {
        let dev = EmulatedDevice::inline()?;
        let nic = dev.nic().clone();
        let mut t = ConnTable::open(dev, DriverConfig { aging_period_ms: 100, ..Default::default() })?;
        let opts = DemoOptions { operations: 5_000, max_live: 500, seed: 7, aging_flows: 50 };
        let rep = run(&mut t, &opts, || nic.advance_time(Duration::from_millis(500)))?;
        check(&rep)?;
        assert_eq!(rep.aged_events, 50);
        assert_eq!(rep.ops.values().sum::<u64>(), 5_000);
        assert!(rep.ipv6_created > 0 && rep.nat_created > 0);
        assert!(render(&rep, &t).contains("lookups disagreeing with the host: 0"));
        Ok(())
    }
}
