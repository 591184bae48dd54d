//! `nicsync cluster`: the main job on the embedded default.
//!
//! N members run in this process on emulated devices: Delta Sync between
//! the devices over the in-process wire, membership over real UDP sockets
//! and Full Sync over real TCP connections on loopback, each member driven
//! by the same tokio loop the daemon uses. One device thread serves every
//! device in turn and one host thread runs every member, so the job needs
//! two cores whatever N is. The Active member takes a churn of new
//! connections (each inserted, established and later destroyed); a third
//! of the way in the Active is killed (its device and host vanish at once),
//! a Standby takes over, and at two thirds the killed member restarts,
//! pulls a Full Sync and rejoins. At the end the members' digests must
//! agree.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_model::seal_port::SealConfig;
use nicsync_model::wire::{HubConfig, InProcessHub};
use nicsync_model::{ExecMode, Idle, Nic, Poller};
use nicsync_vfio::EmulatedDevice;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::member::{emulated_node, entropy};
use crate::membership::MemberState;
use crate::node::{Node, NodeConfig};
use crate::runtime::{MemberNet, MemberSockets, PeerNet, TickHook};
use crate::table::{ConnEntry, TableOp};
use crate::DriverConfig;

/// What `nicsync cluster` runs.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Members (2..=8).
    pub members: u16,
    /// Seconds of churn.
    pub seconds: f64,
    /// New connections per second at the Active.
    pub conn_rate: u32,
}

/// One member at the end.
#[derive(Clone, Debug, Serialize)]
pub struct MemberReport {
    /// Member id.
    pub id: u16,
    /// Its state.
    pub state: MemberState,
    /// Synced entries.
    pub entries: u64,
    /// Their digest.
    pub digest: String,
    /// `nicsync syncstat --json` of the member.
    pub syncstat: serde_json::Value,
}

/// What happened.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    /// Members.
    pub members: u16,
    /// Threads and where they ran.
    pub threads: String,
    /// Connections opened at the Active.
    pub connections_opened: u64,
    /// Table operations acknowledged by the Active's device.
    pub operations_acked: u64,
    /// The member killed.
    pub killed: u16,
    /// Milliseconds from the kill until another member was Active.
    pub failover_ms: Option<f64>,
    /// Milliseconds from the restart until the killed member was synced.
    pub rejoin_ms: Option<f64>,
    /// Milliseconds after the churn until the digests agreed.
    pub converged_after_ms: Option<f64>,
    /// Whether every member holds the same table.
    pub converged: bool,
    /// Every member.
    pub member_reports: Vec<MemberReport>,
}

/// Shared between the members' tick hooks and the driver.
#[derive(Default)]
struct Shared {
    churn: bool,
    next_conn: u64,
    /// Connections open, oldest first (key, member that opened it).
    open: VecDeque<ConnKey>,
    opened: u64,
    acked: u64,
    /// Per member: (state, synced, digest) from its last tick.
    views: BTreeMap<u16, (MemberState, bool)>,
    digests: BTreeMap<u16, Option<(u64, u64)>>,
    want_digest: bool,
    reports: BTreeMap<u16, MemberReport>,
    want_report: bool,
    ops: Vec<TableOp>,
    /// When a member last walked its table for a digest: walks are spread
    /// out so that the shared host thread never stalls for long.
    last_walk: Option<Instant>,
}

fn conn_key(i: u64) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a00_0000 | (i as u32 & 0x00ff_ffff)),
        1024 + (i % 60_000) as u16,
        Ipv4Addr::new(192, 0, 2, (i >> 24) as u8 | 1),
        443,
        proto::TCP,
        0,
    )
}

fn state(tcp: TcpState, mark: u32) -> ConnEntry {
    ConnEntry::new(ConnState::new(tcp, Direction::Original, ConnFlags::SYNC | ConnFlags::CONFIRMED, 0, mark))
}

/// The hook that drives member `id`: churn while Active, and answers the
/// driver's questions.
fn hook(id: u16, shared: Rc<RefCell<Shared>>, per_tick: u64) -> TickHook<'static, EmulatedDevice> {
    Box::new(move |node: &mut Node<EmulatedDevice>, _now| {
        let mut sh = shared.borrow_mut();
        let st = node.state();
        sh.views.insert(id, (st, node.is_synced()));
        if sh.churn && matches!(st, MemberState::Active | MemberState::ActiveAttention) && node.is_synced() {
            let mut ops = std::mem::take(&mut sh.ops);
            ops.clear();
            for _ in 0..per_tick {
                let i = sh.next_conn;
                sh.next_conn += 1;
                let k = conn_key(i);
                ops.push(TableOp::Upsert(k, state(TcpState::SynSent, i as u32)));
                ops.push(TableOp::Upsert(k, state(TcpState::Established, i as u32)));
                sh.open.push_back(k);
                sh.opened += 1;
            }
            // Connections live about a second (1000 ticks).
            while sh.open.len() as u64 > per_tick * 1000 {
                if let Some(k) = sh.open.pop_front() {
                    ops.push(TableOp::Delete(k));
                }
            }
            if let Ok(results) = node.table().batch(&ops) {
                sh.acked += results.iter().filter(|r| r.is_ok()).count() as u64;
            }
            sh.ops = ops;
        }
        let walk_ok = sh.last_walk.is_none_or(|t| t.elapsed() >= Duration::from_millis(20));
        if sh.want_digest && !sh.digests.contains_key(&id) && walk_ok {
            sh.last_walk = Some(Instant::now());
            if let Ok(d) = node.digest() {
                sh.digests.insert(id, Some(d));
            }
            return;
        }
        if sh.want_report && !sh.reports.contains_key(&id) && walk_ok {
            sh.last_walk = Some(Instant::now());
            let Ok((entries, digest)) = node.digest() else { return };
            let r = MemberReport {
                id,
                state: st,
                entries,
                digest: format!("{digest:016x}"),
                syncstat: crate::runtime::syncstat_json(node, &Default::default()),
            };
            sh.reports.insert(id, r);
        }
    })
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Node<EmulatedDevice>>,
    nic: Arc<Nic>,
}

/// Starts member `id` on the given addresses. The device is brought up on
/// a thread of its own (allocating and clearing a million-entry table
/// takes tens of milliseconds, which would stall the other members'
/// probes on the shared host thread).
#[allow(clippy::too_many_arguments)]
async fn start(
    id: u16,
    n: u16,
    hub: &InProcessHub,
    addrs: &[(SocketAddr, SocketAddr)],
    sockets: MemberSockets,
    shared: Rc<RefCell<Shared>>,
    per_tick: u64,
    keys: &Arc<nicsync_seal::SharedKeyring>,
) -> anyhow::Result<Running> {
    let peers: Vec<u16> = (1..=n).filter(|p| *p != id).collect();
    let mut node_cfg = NodeConfig::new(1, id, peers.clone(), entropy());
    node_cfg.seal = Some(SealConfig { keys: keys.clone(), boot: nicsync_seal::next_boot(None)? });
    let port = hub.attach(id)?;
    // Room for a second of connections at the highest rate offered.
    let drv = DriverConfig { table_capacity: 1 << 18, aging_period_ms: 0, ..Default::default() };
    let node = tokio::task::spawn_blocking(move || emulated_node(node_cfg, Box::new(port), drv, ExecMode::Thread, 0))
        .await??;
    let nic = node.table_ref().driver_ref().device().nic().clone();
    let net = MemberNet {
        ccp_bind: addrs[id as usize - 1].0,
        fs_bind: addrs[id as usize - 1].1,
        peers: peers
            .iter()
            .map(|p| PeerNet { id: *p, ccp: addrs[*p as usize - 1].0, full_sync: vec![addrs[*p as usize - 1].1] })
            .collect(),
    };
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::task::spawn_local(async move {
        let mut node = node;
        let h = hook(id, shared, per_tick);
        let shutdown = async {
            let _ = rx.await;
        };
        if let Err(e) = crate::runtime::serve_on(&mut node, sockets, &net, None, Some(h), shutdown).await {
            tracing::warn!(member = id, "member stopped: {e}");
        }
        node
    });
    Ok(Running { stop, task, nic })
}

fn respawn(nics: &[Arc<Nic>]) -> std::io::Result<Poller> {
    Poller::spawn_with(nics.to_vec(), Idle::Spin, || {})
}

/// Runs the in-process cluster.
pub fn run(opts: &ClusterOptions) -> anyhow::Result<ClusterReport> {
    anyhow::ensure!((2..=8).contains(&opts.members), "--members must be 2..=8");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, drive(opts))
}

async fn drive(opts: &ClusterOptions) -> anyhow::Result<ClusterReport> {
    let n = opts.members;
    let hub = InProcessHub::new(HubConfig { queue_capacity: 1 << 16, seed: entropy() as u64, ..HubConfig::new() });
    let shared = Rc::new(RefCell::new(Shared::default()));
    let per_tick = (u64::from(opts.conn_rate) / 1000).max(1);
    // Sealed as a daemon runs by default, with a key for this run.
    let keys = nicsync_seal::SharedKeyring::new(nicsync_seal::Keyring::ephemeral()?);
    // Ephemeral loopback ports, known to every member before it starts.
    let mut sockets = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let s = MemberSockets::bind(&MemberNet { ccp_bind: any, fs_bind: any, peers: Vec::new() })?;
        addrs.push((s.ccp.local_addr()?, s.fs.local_addr()?));
        sockets.push(s);
    }
    let mut running: BTreeMap<u16, Running> = BTreeMap::new();
    for (i, s) in sockets.into_iter().enumerate() {
        let id = i as u16 + 1;
        running.insert(id, start(id, n, &hub, &addrs, s, shared.clone(), per_tick, &keys).await?);
    }
    let mut poller = Some(respawn(&running.values().map(|r| r.nic.clone()).collect::<Vec<_>>())?);
    let third = Duration::from_secs_f64(opts.seconds.max(0.3) / 3.0);
    let tick = Duration::from_millis(5);

    // Wait for an Active, then churn.
    let t0 = Instant::now();
    while !shared.borrow().views.values().any(|(s, synced)| s.is_active() && *synced) {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "no member became Active");
        tokio::time::sleep(tick).await;
    }
    shared.borrow_mut().churn = true;
    tokio::time::sleep(third).await;

    // Kill the Active: host and device vanish together.
    let killed = shared.borrow().views.iter().find(|(_, (s, _))| s.is_active()).map(|(id, _)| *id).unwrap_or(1);
    let victim = running.remove(&killed).ok_or_else(|| anyhow::anyhow!("member {killed} is not running"))?;
    let _ = victim.stop.send(());
    let node = victim.task.await?;
    drop(node);
    drop(poller.take());
    let mut nics: Vec<Arc<Nic>> = running.values().map(|r| r.nic.clone()).collect();
    drop(victim.nic);
    poller = Some(respawn(&nics)?);
    shared.borrow_mut().views.remove(&killed);
    let t_kill = Instant::now();
    let mut failover_ms = None;
    let deadline = t_kill + third;
    while Instant::now() < deadline {
        if failover_ms.is_none() && shared.borrow().views.iter().any(|(id, (s, _))| *id != killed && s.is_active()) {
            failover_ms = Some(t_kill.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // Rejoin on the same addresses.
    let s = MemberSockets::bind(&MemberNet {
        ccp_bind: addrs[killed as usize - 1].0,
        fs_bind: addrs[killed as usize - 1].1,
        peers: Vec::new(),
    })?;
    let r = start(killed, n, &hub, &addrs, s, shared.clone(), per_tick, &keys).await?;
    nics.push(r.nic.clone());
    running.insert(killed, r);
    drop(poller.take());
    poller = Some(respawn(&nics)?);
    let t_rejoin = Instant::now();
    let mut rejoin_ms = None;
    let deadline = t_rejoin + third;
    while Instant::now() < deadline {
        if rejoin_ms.is_none() && shared.borrow().views.get(&killed).is_some_and(|(_, synced)| *synced) {
            rejoin_ms = Some(t_rejoin.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shared.borrow_mut().churn = false;

    // Settle: the digests must agree.
    let t_end = Instant::now();
    let mut converged_after_ms = None;
    while t_end.elapsed() < Duration::from_secs(10) {
        if rejoin_ms.is_none() && shared.borrow().views.get(&killed).is_some_and(|(_, synced)| *synced) {
            rejoin_ms = Some(t_rejoin.elapsed().as_secs_f64() * 1e3);
        }
        {
            let mut sh = shared.borrow_mut();
            sh.digests.clear();
            sh.want_digest = true;
        }
        // A digest walks the whole table: not too often on the one host
        // thread the members share.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sh = shared.borrow();
        let all_synced = sh.views.len() == n as usize && sh.views.values().all(|(_, synced)| *synced);
        let ds: Vec<Option<(u64, u64)>> = sh.digests.values().copied().collect();
        if all_synced && ds.len() == n as usize && ds.iter().all(|d| d.is_some() && *d == ds[0]) {
            converged_after_ms = Some(t_end.elapsed().as_secs_f64() * 1e3);
            break;
        }
    }
    {
        let mut sh = shared.borrow_mut();
        sh.want_digest = false;
        sh.want_report = true;
    }
    let t_rep = Instant::now();
    while shared.borrow().reports.len() < n as usize && t_rep.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (_, r) in std::mem::take(&mut running) {
        let _ = r.stop.send(());
        let node = r.task.await?;
        drop(node);
    }
    drop(poller);
    let sh = shared.borrow();
    Ok(ClusterReport {
        members: n,
        threads: format!("1 device thread polling {n} emulated devices in turn; 1 host thread running {n} members"),
        connections_opened: sh.opened,
        operations_acked: sh.acked,
        killed,
        failover_ms,
        rejoin_ms,
        converged_after_ms,
        converged: converged_after_ms.is_some(),
        member_reports: sh.reports.values().cloned().collect(),
    })
}

/// The report as text.
pub fn render(r: &ClusterReport) -> String {
    let mut out = format!("nicsync cluster: {} members ({})\n", r.members, r.threads);
    out.push_str(&format!(
        "  churn: {} connections opened, {} operations acknowledged by the Active's device\n",
        r.connections_opened, r.operations_acked
    ));
    let ms = |x: Option<f64>| x.map_or("never".to_string(), |v| format!("{v:.1} ms"));
    out.push_str(&format!(
        "  member {} killed: failover after {}; restarted, synced after {}\n",
        r.killed,
        ms(r.failover_ms),
        ms(r.rejoin_ms)
    ));
    out.push_str("  ID  STATE              ENTRIES   DIGEST            SENT      RECEIVED  NACKS   LOST  FULL SYNCS\n");
    for m in &r.member_reports {
        let s = |k: &str| m.syncstat[k].to_string();
        out.push_str(&format!(
            "  {:<3} {:<18} {:<9} {}  {:<9} {:<9} {:<7} {:<5} {}\n",
            m.id,
            m.state.to_string(),
            m.entries,
            m.digest,
            s("updates_sent"),
            s("updates_received"),
            s("retrans_requests_sent"),
            s("lost_updates"),
            s("full_syncs_completed")
        ));
    }
    out.push_str(&format!(
        "  digests {}{}\n",
        if r.converged { "CONVERGED" } else { "DIFFER" },
        r.converged_after_ms.map_or(String::new(), |v| format!(" ({v:.0} ms after the churn stopped)"))
    ));
    out
}
