//! `nicsync bench sync`: Full Sync, Delta Sync latency and throughput, and
//! failover, each against its target, measured in one run.
//!
//! Every part runs emulated devices served by one device thread (two
//! devices polled in turn) and one host thread; the UDP floor uses an echo
//! thread instead of the device thread. So at most two threads are busy
//! at any time, on a two-core machine. In the sustained churn the host
//! thread, while it waits for its own card, runs the peer's
//! ([`EmulatedDevice::assist_peers`]).

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_fwif::event::EventKind;
use nicsync_fwif::regs::Counter;
use nicsync_model::seal_port::{SealConfig, SealedPort};
use nicsync_model::sync::SenderConfig;
use nicsync_model::sync_unit::{SyncUnit, SyncUnitConfig};
use nicsync_model::wire::{HubConfig, InProcessHub, SyncPort, UdpConfig, UdpPort};
use nicsync_model::{ExecMode, Idle, ModelConfig, Poller};
use nicsync_vfio::EmulatedDevice;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::member::{emulated_node, entropy, RETRANSMIT_QUEUE};
use crate::membership::MemberState;
use crate::node::{Node, NodeConfig};
use crate::runtime::{MemberNet, MemberSockets, PeerNet, TickHook};
use crate::stats::{median, percentiles, Percentiles};
use crate::table::{ConnEntry, ConnTable, TableOp};
use crate::DriverConfig;

/// What to measure.
#[derive(Clone, Debug)]
pub struct SyncBenchOptions {
    /// Connections in the Full Sync.
    pub conns: u64,
    /// Latency samples per wire.
    pub samples: usize,
    /// Seconds of sustained churn.
    pub sustain_seconds: f64,
    /// Failovers measured (the median is reported).
    pub failovers: usize,
}

impl Default for SyncBenchOptions {
    fn default() -> Self {
        SyncBenchOptions { conns: 1_000_000, samples: 5_000, sustain_seconds: 3.0, failovers: 5 }
    }
}

/// The results (`--json` keys).
#[derive(Clone, Debug, Serialize)]
pub struct SyncBenchReport {
    /// Connections moved by the Full Sync.
    pub full_sync_entries: u64,
    /// Full Sync duration, connect to the last chunk applied, into a
    /// joiner that keeps the host's copy of its table (a daemon's default:
    /// the copy is filled, and its memory first touched, as the chunks
    /// come).
    pub full_sync_ms: f64,
    /// The same into a joiner without the host's copy (`[device]
    /// fault_recovery = false`; what this bench reported before
    /// 2026-11-25).
    pub full_sync_no_copy_ms: f64,
    /// Full Sync rate.
    pub full_sync_entries_per_s: f64,
    /// The joining member's `lost_updates` when its Full Sync completed
    /// (0: the source's history it could not get is join history).
    pub full_sync_joiner_lost_updates: u64,
    /// The joining member's `join_history_lost` then: history no cut
    /// covered and the source no longer had (0: the snapshot's cut covers
    /// the source's whole epoch).
    pub full_sync_joiner_history_lost: u64,
    /// The joining member's `join_history_covered` then: the source's
    /// updates from before the joiner first heard it that the snapshot's
    /// cut covered, so that they were never asked for.
    pub full_sync_joiner_history_covered: u64,
    /// Updates the source resent on NACKs during the Full Sync (0 on a
    /// clean link: the joiner asks for none of the history).
    pub full_sync_source_retrans_updates: u64,
    /// A's host posts an update until B's device holds it (B's event), in
    /// process.
    pub delta_latency_ns: Percentiles,
    /// The same over UDP on loopback.
    pub delta_latency_udp_ns: Percentiles,
    /// A bare UDP ping-pong between two sockets on loopback: the floor.
    pub baseline_udp_rtt_ns: Percentiles,
    /// `delta_latency_udp_ns.p50 / baseline_udp_rtt_ns.p50`.
    pub delta_udp_to_rtt_ratio_p50: f64,
    /// New connections per second (each new, established, destroyed) one
    /// member sustained while syncing to a peer: the median of three
    /// back-to-back repetitions.
    pub sustained_conn_per_s: f64,
    /// The same in updates per second.
    pub sustained_updates_per_s: f64,
    /// Updates the peer could not recover, dropped from its hold or could
    /// not apply, over every repetition (must be 0).
    pub lost_updates: u64,
    /// Whether the peer ended every repetition with every update received
    /// and the same synced entries as the source (count and running
    /// digest of both cards).
    pub peer_caught_up: bool,
    /// Median of the failovers: the Active dies until a Standby is Active,
    /// default probe settings (10 ms, dead after 5).
    pub failover_ms: f64,
    /// Every failover measured.
    pub failover_ms_runs: Vec<f64>,
    /// Median of the orderly handovers: the Active is told to stop (the
    /// daemon's SIGTERM: it drains, announces itself Down, lingers a probe
    /// interval) until the Standby is Active. Both are sampled by the
    /// members' 1 ms loop tick, so a figure below 1-2 ms reads as that.
    pub orderly_handover_ms: f64,
    /// Every orderly handover measured.
    pub orderly_handover_ms_runs: Vec<f64>,
    /// Whether the figures above were measured sealed (AES-256-GCM on the
    /// sync port, membership and Full Sync), as a daemon runs by default.
    pub encrypted: bool,
    /// `delta_latency_ns` with the sync port in clear.
    pub plain_delta_latency_ns: Percentiles,
    /// `sustained_conn_per_s` with the sync port in clear.
    pub plain_sustained_conn_per_s: f64,
    /// `sustained_updates_per_s` with the sync port in clear.
    pub plain_sustained_updates_per_s: f64,
    /// `1 - sustained_updates_per_s / plain_sustained_updates_per_s`: the
    /// share of delta throughput the encryption costs.
    pub encryption_throughput_cost: f64,
    /// `delta_latency_ns.p50 - plain_delta_latency_ns.p50`.
    pub encryption_added_latency_ns_p50: f64,
    /// Threads and where they ran.
    pub threads: String,
    /// Each target and whether it was met.
    pub targets: Vec<Target>,
}

/// One target of the issue.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What.
    pub name: String,
    /// Measured.
    pub value: f64,
    /// The bound.
    pub bound: f64,
    /// Met.
    pub met: bool,
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncBenchError {
    /// Setting up a member.
    #[error("{0}")]
    Member(#[from] crate::member::MemberError),
    /// A table operation.
    #[error("{0}")]
    Table(#[from] crate::TableError),
    /// The driver.
    #[error("{0}")]
    Driver(#[from] crate::DriverError),
    /// Sockets and threads.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The device.
    #[error("{0}")]
    Device(#[from] nicsync_vfio::DeviceError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn key(i: u64) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a00_0000 | (i as u32 & 0x00ff_ffff)),
        1024 + (i % 60_000) as u16,
        Ipv4Addr::new(192, 0, 2, 1 + ((i >> 24) as u8 & 0x3f)),
        443,
        proto::TCP,
        0,
    )
}

fn entry(tcp: TcpState, mark: u32) -> ConnEntry {
    ConnEntry::new(ConnState::new(tcp, Direction::Original, ConnFlags::SYNC | ConnFlags::CONFIRMED, 0, mark))
}

/// Runs every part.
pub fn run(o: &SyncBenchOptions) -> Result<SyncBenchReport, SyncBenchError> {
    // Runs to be compared alternate (plain and sealed in process; the bare
    // UDP round trip and the delta over UDP), so that a noisy spell of the
    // machine, or the hypervisor moving its vCPUs, does not land on one
    // side of a ratio only.
    let per_round = o.samples / LATENCY_ROUNDS;
    let mut plain_runs = Vec::new();
    let mut sealed_runs = Vec::new();
    let mut rtt_runs = Vec::new();
    let mut udp_runs = Vec::new();
    for _ in 0..LATENCY_ROUNDS {
        plain_runs.extend(delta_latency(false, false, per_round)?);
        sealed_runs.extend(delta_latency(false, true, per_round)?);
        rtt_runs.extend(udp_rtt(per_round.max(500))?);
        udp_runs.extend(delta_latency(true, true, per_round)?);
    }
    let plain_in = percentiles(&mut plain_runs);
    let delta_in = percentiles(&mut sealed_runs);
    let baseline = percentiles(&mut rtt_runs);
    let delta_udp = percentiles(&mut udp_runs);
    // Plain and sealed repetitions alternate; the median rates are
    // reported (the machine is noisy), the loss check covers all of them.
    let (mut plain, mut sealed) = (Sustained::new(), Sustained::new());
    for _ in 0..SUSTAIN_REPETITIONS {
        plain.add(sustained(o.sustain_seconds / SUSTAIN_REPETITIONS as f64, false)?);
        sealed.add(sustained(o.sustain_seconds / SUSTAIN_REPETITIONS as f64, true)?);
    }
    let (plain_conn_rate, plain_upd_rate) = plain.rates();
    let (conn_rate, upd_rate) = sealed.rates();
    let (lost, caught_up) = (plain.lost + sealed.lost, plain.caught_up && sealed.caught_up);
    let cost = if plain_upd_rate > 0.0 { 1.0 - upd_rate / plain_upd_rate } else { 0.0 };
    let added = delta_in.p50 - plain_in.p50;
    let full = full_sync(o.conns, true)?;
    // The card-only path, as this bench measured it before 2026-11-25 (its
    // members kept no host copy then).
    let full_no_copy_ms = full_sync(o.conns, false)?.ms;
    let (full_ms, full_entries) = (full.ms, full.records);
    let (mut runs, mut handovers) = failovers(o.failovers)?;
    let failover = median(&mut runs.clone());
    runs.sort_by(|a, b| a.total_cmp(b));
    let handover = median(&mut handovers.clone());
    handovers.sort_by(|a, b| a.total_cmp(b));
    let full_rate = if full_ms > 0.0 { full_entries as f64 / (full_ms / 1e3) } else { 0.0 };
    let ratio = if baseline.p50 > 0.0 { delta_udp.p50 / baseline.p50 } else { 0.0 };
    let t = |name: &str, value: f64, bound: f64, met: bool| Target { name: name.into(), value, bound, met };
    let targets = vec![
        t("full_sync_ms of 1,000,000 < 500", full_ms, 500.0, full_ms < 500.0 && full_entries >= 1_000_000),
        t("delta_latency_ns.p50 < 2000", delta_in.p50, 2000.0, delta_in.p50 < 2000.0),
        t(
            "delta_latency_udp_ns.p50 <= baseline_udp_rtt_ns.p50",
            delta_udp.p50,
            baseline.p50,
            delta_udp.p50 <= baseline.p50,
        ),
        // Issue 3's rate is the sync protocol's, before encryption; issue 4
        // allows the seal up to 25 % of it (the last targets).
        t(
            "plain_sustained_conn_per_s >= 500000 with 0 lost",
            plain_conn_rate,
            500_000.0,
            plain_conn_rate >= 500_000.0 && lost == 0 && caught_up,
        ),
        // The daemon seals by default: the same bound on the sealed rate.
        t(
            "sustained_conn_per_s (sealed) >= 500000 with 0 lost",
            conn_rate,
            500_000.0,
            conn_rate >= 500_000.0 && lost == 0 && caught_up,
        ),
        t("failover_ms <= 100", failover, 100.0, failover <= 100.0),
        t("encryption_throughput_cost <= 0.25", cost, 0.25, cost <= 0.25),
        t("encryption_added_latency_ns_p50 <= 1000", added, 1000.0, added <= 1000.0),
    ];
    Ok(SyncBenchReport {
        full_sync_entries: full_entries,
        full_sync_ms: full_ms,
        full_sync_no_copy_ms: full_no_copy_ms,
        full_sync_entries_per_s: full_rate,
        full_sync_joiner_lost_updates: full.joiner_lost,
        full_sync_joiner_history_lost: full.joiner_history_lost,
        full_sync_joiner_history_covered: full.joiner_history_covered,
        full_sync_source_retrans_updates: full.source_retrans,
        delta_latency_ns: delta_in,
        delta_latency_udp_ns: delta_udp,
        baseline_udp_rtt_ns: baseline,
        delta_udp_to_rtt_ratio_p50: ratio,
        sustained_conn_per_s: conn_rate,
        sustained_updates_per_s: upd_rate,
        lost_updates: lost,
        peer_caught_up: caught_up,
        failover_ms: failover,
        failover_ms_runs: runs,
        orderly_handover_ms: handover,
        orderly_handover_ms_runs: handovers,
        encrypted: true,
        plain_delta_latency_ns: plain_in,
        plain_sustained_conn_per_s: plain_conn_rate,
        plain_sustained_updates_per_s: plain_upd_rate,
        encryption_throughput_cost: cost,
        encryption_added_latency_ns_p50: added,
        threads: "latency: 1 device thread polling both devices in turn + 1 host thread; \
                  throughput: the same, the host running the peer's device while it waits for its own \
                  (the device thread skips a device the host runs); \
                  full sync: the same, both members' hosts on one tokio thread; \
                  failover: 1 device thread per member + both members' hosts on one tokio thread; \
                  every member keeps the host's copy of its table, as a daemon does by default; \
                  UDP floor: 1 echo thread + 1 host thread"
            .into(),
        targets,
    })
}

/// Bare UDP round trips between two sockets on loopback (echo thread).
fn udp_rtt(samples: usize) -> Result<Vec<u64>, SyncBenchError> {
    let a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    a.connect(b.local_addr()?)?;
    b.connect(a.local_addr()?)?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !flag.load(Ordering::Relaxed) {
            if let Ok(n) = b.recv(&mut buf) {
                let _ = b.send(&buf[..n]);
            } else {
                std::hint::spin_loop();
            }
        }
    });
    // One delta frame's worth of bytes, as the delta wire sends.
    let msg = [0x5au8; 120];
    let mut buf = [0u8; 2048];
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        a.send(&msg)?;
        let deadline = t + Duration::from_secs(1);
        loop {
            if a.recv(&mut buf).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            std::hint::spin_loop();
        }
        if i >= samples / 10 {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    Ok(out)
}

/// A pair of devices with sync units on the given ports, brought up, served
/// by one polling thread.
fn pair(
    ports: PortPair,
    capacity: u32,
    flush_delay_ns: u64,
    sealed: bool,
) -> Result<(ConnTable<EmulatedDevice>, ConnTable<EmulatedDevice>, Poller), SyncBenchError> {
    let mut tables = Vec::new();
    let keys = bench_keys()?;
    for (id, port) in [(1u16, ports.0), (2u16, ports.1)] {
        let port: Box<dyn SyncPort> = if sealed {
            let boot = nicsync_seal::next_boot(None).map_err(|e| SyncBenchError::Other(e.to_string()))?;
            Box::new(SealedPort::new(port, &SealConfig { keys: keys.clone(), boot }, &[3 - id]))
        } else {
            port
        };
        let dev = EmulatedDevice::new(ModelConfig::default(), ExecMode::Thread)?;
        let mut sender = SenderConfig::new(1, id, entropy());
        sender.queue_capacity = RETRANSMIT_QUEUE;
        sender.flush_delay_ns = flush_delay_ns;
        let peer = 3 - id;
        let unit = SyncUnit::new(SyncUnitConfig { sender, peers: vec![peer] }, port, 0)
            .map_err(|e| SyncBenchError::Other(e.to_string()))?;
        dev.nic().attach_sync(unit);
        dev.start_poller(None)?;
        let mut t =
            ConnTable::open(dev, DriverConfig { table_capacity: capacity, aging_period_ms: 0, ..Default::default() })?;
        // With the host's copy of the table a daemon keeps by default
        // (`[device] fault_recovery`): each change is applied to it too.
        t.enable_recovery(crate::table::RecoveryConfig { member: id, ..Default::default() })?;
        t.driver_ref().device().stop_poller();
        tables.push(t);
    }
    let b = tables.pop().ok_or_else(|| SyncBenchError::Other("no device".into()))?;
    let a = tables.pop().ok_or_else(|| SyncBenchError::Other("no device".into()))?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nics = vec![a.driver_ref().device().nic().clone(), b.driver_ref().device().nic().clone()];
    let poller = Poller::spawn_with(nics, Idle::Spin, move || {
        if cpus >= 2 {
            let _ = nicsync_vfio::pin_current_thread(1);
        }
    })?;
    Ok((a, b, poller))
}

/// A fresh cluster key for one benchmark run.
fn bench_keys() -> Result<std::sync::Arc<nicsync_seal::SharedKeyring>, SyncBenchError> {
    let ring = nicsync_seal::Keyring::ephemeral().map_err(|e| SyncBenchError::Other(e.to_string()))?;
    Ok(nicsync_seal::SharedKeyring::new(ring))
}

/// Latency runs alternate between plain and sealed this many times.
const LATENCY_ROUNDS: usize = 4;

/// The two ends of a sync wire.
type PortPair = (Box<dyn SyncPort>, Box<dyn SyncPort>);

/// A member of the failover pair: its kill switch, its stop signal (an
/// orderly stop), task and device thread.
type Running = (Switches, tokio::task::JoinHandle<Node<EmulatedDevice>>, Poller);

/// How a member of the failover pair is stopped: killed (the loop ends
/// at once) or signalled (an orderly stop).
type Switches = (oneshot::Sender<()>, tokio::sync::mpsc::UnboundedSender<()>);

fn udp_ports() -> Result<PortPair, SyncBenchError> {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let wire = |e: nicsync_model::wire::WireError| SyncBenchError::Other(e.to_string());
    let mut a = UdpPort::bind(UdpConfig::new(1).bind_to(any)).map_err(wire)?;
    let mut b = UdpPort::bind(UdpConfig::new(2).bind_to(any)).map_err(wire)?;
    a.add_peer(nicsync_model::wire::UdpPeer { addr: b.local_addr(), member: Some(2) }).map_err(wire)?;
    b.add_peer(nicsync_model::wire::UdpPeer { addr: a.local_addr(), member: Some(1) }).map_err(wire)?;
    Ok((Box::new(a), Box::new(b)))
}

/// One update at a time: A's host posts it (and waits for its
/// completion), B's host sees B's SYNC_UPDATED event. Frames leave at once
/// (no batching delay), as a latency-sensitive configuration would set it.
fn delta_latency(udp: bool, sealed: bool, samples: usize) -> Result<Vec<u64>, SyncBenchError> {
    let ports: PortPair = if udp {
        udp_ports()?
    } else {
        let hub = InProcessHub::new(HubConfig::new());
        (
            Box::new(hub.attach(1).map_err(|e| SyncBenchError::Other(e.to_string()))?),
            Box::new(hub.attach(2).map_err(|e| SyncBenchError::Other(e.to_string()))?),
        )
    };
    let (mut a, mut b, poller) = pair(ports, 1 << 16, 0, sealed)?;
    let warm = samples / 10;
    let mut out = Vec::with_capacity(samples);
    for i in 0..(samples + warm) as u64 {
        let k = key(i % 30_000);
        let t = Instant::now();
        a.upsert(&k, &entry(TcpState::Established, i as u32))?;
        let deadline = t + Duration::from_secs(2);
        let mut seen = false;
        while !seen {
            b.poll_events(|e| {
                if e.kind == EventKind::SyncUpdated && e.key == k && e.state.mark.get() == i as u32 {
                    seen = true;
                }
            });
            if Instant::now() > deadline {
                return Err(SyncBenchError::Other(format!("update {i} did not reach the peer within 2 s")));
            }
        }
        if i >= warm as u64 {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    // The drivers stop their devices while the poller still runs them.
    drop(a);
    drop(b);
    drop(poller);
    Ok(out)
}

/// Repetitions of the sustained churn.
const SUSTAIN_REPETITIONS: usize = 3;

/// Repetitions of the sustained churn, gathered.
struct Sustained {
    conn_rates: Vec<f64>,
    update_rates: Vec<f64>,
    lost: u64,
    caught_up: bool,
}

impl Sustained {
    fn new() -> Self {
        Sustained { conn_rates: Vec::new(), update_rates: Vec::new(), lost: 0, caught_up: true }
    }

    fn add(&mut self, (conns, updates, lost, caught_up): (f64, f64, u64, bool)) {
        self.conn_rates.push(conns);
        self.update_rates.push(updates);
        self.lost += lost;
        self.caught_up &= caught_up;
    }

    /// Median connections and updates per second.
    fn rates(&mut self) -> (f64, f64) {
        (median(&mut self.conn_rates), median(&mut self.update_rates))
    }
}

/// New connections at full speed on A (each: SYN_SENT, ESTABLISHED, then
/// destroyed) for `seconds`, synced to B over the in-process wire. Returns
/// (conn/s, updates/s at that rate, updates B lost or could not apply,
/// whether B got every update and ended with A's synced entries).
fn sustained(seconds: f64, sealed: bool) -> Result<(f64, f64, u64, bool), SyncBenchError> {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 1 << 16, seed: 1, ..HubConfig::new() });
    let ports: PortPair = (
        Box::new(hub.attach(1).map_err(|e| SyncBenchError::Other(e.to_string()))?),
        Box::new(hub.attach(2).map_err(|e| SyncBenchError::Other(e.to_string()))?),
    );
    let (mut a, mut b, poller) = pair(ports, 1 << 20, 50_000, sealed)?;
    // The peer stands for another machine with a card of its own; here it
    // shares this machine's two cores. A's host runs B's card while it
    // waits for its own completions (instead of spinning), and the polling
    // thread runs A's card, and B's whenever A's host is not: B's card no
    // longer takes turns with A's on one thread (the limit before: 367-373
    // k conn/s sealed against 472-477 k, 2026-11-24).
    a.driver_ref().device().assist_peers(vec![b.driver_ref().device().nic().clone()]);
    const BATCH: u64 = 1024;
    let mut ops = Vec::with_capacity(3 * BATCH as usize);
    let mut conns = 0u64;
    let live = 65_536u64;
    let rep = Instant::now();
    {
        while rep.elapsed().as_secs_f64() < seconds {
            ops.clear();
            for j in 0..BATCH {
                let i = conns + j;
                ops.push(TableOp::Upsert(key(i % (1 << 22)), entry(TcpState::SynSent, i as u32)));
                ops.push(TableOp::Upsert(key(i % (1 << 22)), entry(TcpState::Established, i as u32)));
                if i >= live {
                    ops.push(TableOp::Delete(key((i - live) % (1 << 22))));
                }
            }
            let r = a.batch(&ops)?;
            if let Some(e) = r.into_iter().find_map(|x| x.err()) {
                return Err(SyncBenchError::Other(format!("churn: {e}")));
            }
            conns += BATCH;
            // B's host keeps its event ring drained.
            b.poll_events(|_| {});
        }
    }
    let conn_rate = conns as f64 / rep.elapsed().as_secs_f64();
    // B catches up (bounded): it received every update A sent (read again
    // each time: the counter is published as A's card gets to it), and the
    // two cards hold the same synced entries (their counts and running
    // digests, the ones anti-entropy compares), so that "0 lost" is checked
    // against B's table, not only the protocol's counters.
    let c = |t: &ConnTable<EmulatedDevice>, k: Counter| t.driver_ref().device_counter(k);
    let t = Instant::now();
    let mut caught_up = false;
    while t.elapsed() < Duration::from_secs(10) {
        b.poll_events(|_| {});
        let received = c(&b, Counter::SyncUpdatesReceived) >= c(&a, Counter::SyncUpdatesSent);
        let same = (c(&a, Counter::SyncEntries), c(&a, Counter::SyncDigest))
            == (c(&b, Counter::SyncEntries), c(&b, Counter::SyncDigest));
        if received && same {
            caught_up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = c(&a, Counter::SyncUpdatesSent);
    let lost = c(&b, Counter::SyncLostUpdates) + c(&b, Counter::SyncHoldDrops) + c(&b, Counter::SyncApplyFailed);
    drop(a);
    drop(b);
    drop(poller);
    // Updates per connection: the same in every repetition.
    let per_conn = if conns > 0 { sent as f64 / conns as f64 } else { 0.0 };
    Ok((conn_rate, conn_rate * per_conn, lost, caught_up))
}

/// Two members on loopback sockets (membership UDP, Full Sync TCP), both on
/// this thread's tokio loop; `hooks` watch them.
struct Duo {
    addrs: Vec<(SocketAddr, SocketAddr)>,
}

impl Duo {
    fn new() -> Result<Self, SyncBenchError> {
        let mut addrs = Vec::new();
        for _ in 0..2 {
            let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            let s = MemberSockets::bind(&MemberNet { ccp_bind: any, fs_bind: any, peers: Vec::new() })
                .map_err(|e| SyncBenchError::Other(e.to_string()))?;
            addrs.push((s.ccp.local_addr()?, s.fs.local_addr()?));
        }
        Ok(Duo { addrs })
    }

    fn net(&self, id: u16) -> MemberNet {
        let peer = 3 - id;
        MemberNet {
            ccp_bind: self.addrs[id as usize - 1].0,
            fs_bind: self.addrs[id as usize - 1].1,
            peers: vec![PeerNet {
                id: peer,
                ccp: self.addrs[peer as usize - 1].0,
                full_sync: vec![self.addrs[peer as usize - 1].1],
            }],
        }
    }

    /// Runs `node` as member `id` until its kill switch fires or its
    /// orderly stop ends; returns it.
    fn spawn(
        &self,
        id: u16,
        node: Node<EmulatedDevice>,
        hook: TickHook<'static, EmulatedDevice>,
    ) -> Result<(Switches, tokio::task::JoinHandle<Node<EmulatedDevice>>), SyncBenchError> {
        let net = self.net(id);
        let sockets = MemberSockets::bind(&net).map_err(|e| SyncBenchError::Other(e.to_string()))?;
        let (tx, rx) = oneshot::channel::<()>();
        let (signal, signals) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::task::spawn_local(async move {
            let mut node = node;
            let shutdown = async {
                let _ = rx.await;
            };
            let inputs = crate::runtime::DaemonInputs {
                kernel: None,
                orderly: Some(crate::runtime::OrderlyStop { signals, drain: crate::config::DEFAULT_STOP_DRAIN }),
            };
            let _ = crate::runtime::serve_with(&mut node, sockets, &net, None, Some(hook), inputs, shutdown).await;
            node
        });
        Ok(((tx, signal), task))
    }
}

fn new_member(
    id: u16,
    hub: &InProcessHub,
    capacity: u32,
    keys: &std::sync::Arc<nicsync_seal::SharedKeyring>,
    host_copy: bool,
) -> Result<Node<EmulatedDevice>, SyncBenchError> {
    let mut cfg = NodeConfig::new(1, id, vec![3 - id], entropy());
    if let Ok(c) = std::env::var("NICSYNC_CHUNK") {
        cfg.chunk_records = c.parse().unwrap_or(1024);
    }
    let boot = nicsync_seal::next_boot(None).map_err(|e| SyncBenchError::Other(e.to_string()))?;
    cfg.seal = Some(SealConfig { keys: keys.clone(), boot });
    let port = hub.attach(id).map_err(|e| SyncBenchError::Other(e.to_string()))?;
    let drv = DriverConfig { table_capacity: capacity, aging_period_ms: 0, ..Default::default() };
    let mut node = emulated_node(cfg, Box::new(port), drv, ExecMode::Thread, 0)?;
    // The host's copy, as a daemon keeps it by default.
    if host_copy {
        node.table().enable_recovery(crate::table::RecoveryConfig { member: id, ..Default::default() })?;
    }
    Ok(node)
}

/// Fills member 1 with `conns` synced connections and lets member 2 join:
/// the time of its Full Sync over TCP on loopback.
/// What a Full Sync run measured: duration, records, and the joiner's
/// lost and join-history counters when it completed.
struct FullSyncRun {
    ms: f64,
    records: u64,
    joiner_lost: u64,
    joiner_history_lost: u64,
    joiner_history_covered: u64,
    source_retrans: u64,
}

fn full_sync(conns: u64, host_copy: bool) -> Result<FullSyncRun, SyncBenchError> {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 1 << 16, ..HubConfig::new() });
    let capacity = ((conns * 5 / 4).next_power_of_two()).clamp(1 << 16, 1 << 24) as u32;
    let keys = bench_keys()?;
    let mut a = new_member(1, &hub, capacity, &keys, host_copy)?;
    // A fills its table through its own thread for the bring-up; then one
    // poller serves both devices.
    a.table_ref().driver_ref().device().start_poller(None)?;
    let mut ops = Vec::with_capacity(8192);
    let mut i = 0;
    while i < conns {
        ops.clear();
        for j in i..(i + 8192).min(conns) {
            ops.push(TableOp::Upsert(key(j), entry(TcpState::Established, j as u32)));
        }
        for r in a.table().batch(&ops)? {
            r?;
        }
        i += 8192;
    }
    a.table_ref().driver_ref().device().stop_poller();
    let b = new_member(2, &hub, capacity, &keys, host_copy)?;
    let nics =
        vec![a.table_ref().driver_ref().device().nic().clone(), b.table_ref().driver_ref().device().nic().clone()];
    let source = nics[0].clone();
    let poller = Poller::spawn_with(nics, Idle::Spin, || {})?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let result: Result<FullSyncRun, SyncBenchError> = local.block_on(&rt, async move {
        let duo = Duo::new()?;
        let done = Rc::new(RefCell::new(None::<FullSyncRun>));
        let (sa, ta) = duo.spawn(1, a, Box::new(|_, _| {}))?;
        let d = done.clone();
        let hook_b: TickHook<'static, EmulatedDevice> = Box::new(move |n: &mut Node<EmulatedDevice>, _| {
            let st = n.stats();
            if st.full_syncs_completed > 0 && d.borrow().is_none() {
                let drv = n.table_ref().driver_ref();
                *d.borrow_mut() = Some(FullSyncRun {
                    ms: st.last_full_sync_ms.unwrap_or(0.0),
                    records: st.last_full_sync_records,
                    joiner_lost: drv.device_counter(Counter::SyncLostUpdates),
                    joiner_history_lost: drv.device_counter(Counter::SyncHistoryLost),
                    joiner_history_covered: drv.device_counter(Counter::SyncHistoryCovered),
                    source_retrans: source.shared().counter(Counter::SyncRetransUpdatesSent),
                });
            }
        });
        let (sb, tb) = duo.spawn(2, b, hook_b)?;
        let t = Instant::now();
        while done.borrow().is_none() && t.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = sa.0.send(());
        let _ = sb.0.send(());
        let _ = ta.await;
        let _ = tb.await;
        let r = done.borrow_mut().take();
        r.ok_or_else(|| SyncBenchError::Other("the Full Sync did not finish within 60 s".into()))
    });
    drop(poller);
    result
}

/// Kills the Active of a pair, again and again, and as many times stops it
/// in order, alternately: how long until the other is Active (killed,
/// stopped).
fn failovers(runs: usize) -> Result<(Vec<f64>, Vec<f64>), SyncBenchError> {
    let hub = InProcessHub::new(HubConfig::new());
    let keys = bench_keys()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let duo = Duo::new()?;
        let states: Rc<RefCell<[Option<MemberState>; 2]>> = Rc::new(RefCell::new([None, None]));
        let watch = |id: u16| -> TickHook<'static, EmulatedDevice> {
            let s = states.clone();
            Box::new(move |n: &mut Node<EmulatedDevice>, _| s.borrow_mut()[id as usize - 1] = Some(n.state()))
        };
        let mut members: [Option<Running>; 2] = [None, None];
        let start = |id: u16| -> Result<_, SyncBenchError> {
            let node = new_member(id, &hub, 1 << 16, &keys, true)?;
            let nic = node.table_ref().driver_ref().device().nic().clone();
            let poller =
                Poller::spawn_with(vec![nic], Idle::Nap { after_sweeps: 64, nap: Duration::from_micros(50) }, || {})?;
            let (tx, task) = duo.spawn(id, node, watch(id))?;
            Ok((tx, task, poller))
        };
        members[0] = Some(start(1)?);
        members[1] = Some(start(2)?);
        let (mut killed_runs, mut stopped_runs) = (Vec::new(), Vec::new());
        for run in 0..runs * 2 {
            let orderly = run % 2 == 1;
            // Wait for one Active and one Standby.
            let t = Instant::now();
            let active = loop {
                let s = *states.borrow();
                match s {
                    [Some(MemberState::Active), Some(MemberState::Standby)] => break 1u16,
                    [Some(MemberState::Standby), Some(MemberState::Active)] => break 2u16,
                    _ => {}
                }
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(SyncBenchError::Other(format!("no Active/Standby pair: {s:?}")));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let other = 3 - active;
            // Let the pair run a little, then the Active dies, or is told
            // to stop (it runs on meanwhile: its task ends after).
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ((kill, signal), task, poller) =
                members[active as usize - 1].take().ok_or_else(|| SyncBenchError::Other("gone".into()))?;
            let stopped = Instant::now();
            let task = if orderly {
                let _ = signal.send(());
                Some((kill, task))
            } else {
                let _ = kill.send(());
                drop(task.await);
                states.borrow_mut()[active as usize - 1] = None;
                None
            };
            loop {
                if matches!(states.borrow()[other as usize - 1], Some(MemberState::Active)) {
                    break;
                }
                if stopped.elapsed() > Duration::from_secs(5) {
                    return Err(SyncBenchError::Other("no failover within 5 s".into()));
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let ms = stopped.elapsed().as_secs_f64() * 1e3;
            if let Some((kill, task)) = task {
                stopped_runs.push(ms);
                // Its stop ends after a probe interval's linger; bounded
                // by the drain, then killed.
                let task = std::pin::pin!(task);
                match tokio::time::timeout(crate::config::DEFAULT_STOP_DRAIN * 2, task).await {
                    Ok(node) => drop(node),
                    Err(_) => {
                        let _ = kill.send(());
                        return Err(SyncBenchError::Other("an orderly stop did not end".into()));
                    }
                }
                states.borrow_mut()[active as usize - 1] = None;
            } else {
                killed_runs.push(ms);
            }
            drop(poller);
            members[active as usize - 1] = Some(start(active)?);
        }
        for m in members.iter_mut() {
            if let Some(((kill, _), task, poller)) = m.take() {
                let _ = kill.send(());
                drop(task.await);
                drop(poller);
            }
        }
        Ok((killed_runs, stopped_runs))
    })
}

/// A figure with the precision its size needs.
fn shown(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

/// The report as text.
pub fn render(r: &SyncBenchReport) -> String {
    let p = |x: &Percentiles| format!("p50 {:.0} ns, p99 {:.0} ns, p99.9 {:.0} ns", x.p50, x.p99, x.p999);
    let mut out = String::from("nicsync bench sync\n");
    out.push_str(&format!("  threads: {}\n", r.threads));
    out.push_str(&format!(
        "  full sync: {} entries in {:.1} ms ({:.0} entries/s) over TCP on loopback; \
         the joiner counted {} lost updates, {} of join history lost and {} covered by the cut; \
         the source resent {} updates\n",
        r.full_sync_entries,
        r.full_sync_ms,
        r.full_sync_entries_per_s,
        r.full_sync_joiner_lost_updates,
        r.full_sync_joiner_history_lost,
        r.full_sync_joiner_history_covered,
        r.full_sync_source_retrans_updates
    ));
    out.push_str(&format!("  delta latency, in process: {}\n", p(&r.delta_latency_ns)));
    out.push_str(&format!("  delta latency, UDP:        {}\n", p(&r.delta_latency_udp_ns)));
    out.push_str(&format!("  bare UDP round trip:       {}\n", p(&r.baseline_udp_rtt_ns)));
    out.push_str(&format!(
        "  sustained: {:.0} connections/s ({:.0} updates/s), {} lost, peer caught up: {}\n",
        r.sustained_conn_per_s, r.sustained_updates_per_s, r.lost_updates, r.peer_caught_up
    ));
    out.push_str(&format!("  failover: median {:.1} ms of {:?}\n", r.failover_ms, r.failover_ms_runs));
    out.push_str(&format!(
        "  orderly handover (SIGTERM): median {:.1} ms of {:?}\n",
        r.orderly_handover_ms, r.orderly_handover_ms_runs
    ));
    out.push_str(&format!(
        "  encryption (AES-256-GCM, figures above sealed): in clear {:.0} updates/s and {}; costs {:.1} % of \
         throughput, adds {:.0} ns to the p50\n",
        r.plain_sustained_updates_per_s,
        p(&r.plain_delta_latency_ns),
        r.encryption_throughput_cost * 100.0,
        r.encryption_added_latency_ns_p50
    ));
    for t in &r.targets {
        out.push_str(&format!(
            "  [{}] {}: {} (bound {})\n",
            if t.met { "met" } else { "MISSED" },
            t.name,
            shown(t.value),
            shown(t.bound)
        ));
    }
    out
}
