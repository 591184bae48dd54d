//! The deterministic cluster simulator (`nicsync sim`).
//!
//! A cluster of emulated devices (inline execution, virtual clocks) and
//! their [`Node`]s runs on one thread in virtual time. Every random choice
//! comes from one seeded generator, so a seed replays a run exactly. The
//! networks are simulated too: Delta Sync over the model's impaired
//! in-process hub, membership datagrams through a lossy, duplicating,
//! reordering queue, Full Sync streams as ordered in-memory pipes that a
//! fault or a crash can break.
//!
//! A run drives churn (inserts, updates, deletes) at the cluster's Active
//! member (HA: the lowest-id Active that is not cut off; load sharing:
//! every such Active, each on its own keys) and injects, at seeded times:
//! a member that joins late (during churn), a crash and restart, a
//! partition of one member, the link between two members cut both ways
//! (each still reaching the others), a manual resync, loss up to 20 %,
//! duplication and reordering. Then the faults stop and the cluster settles. It passes
//! when every live member is synced, all hold identical digests, HA has one
//! Active, and no acknowledged write is missing: every key's last write
//! acknowledged by its member's device is what every member holds, except
//! writes a member acknowledged shortly before it crashed (asynchronous
//! replication cannot promise those; see docs/cluster.md).
//!
//! Tests add operator actions and link faults at fixed times
//! ([`SimConfig::script`]: a flush, a resync request, membership datagrams
//! dropped on one link) to replay a given sequence deterministically.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

pub use crate::secure::RefusedTotals;
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, NatKind, TcpState};
use nicsync_fwif::regs::Counter;
use nicsync_model::rng::SeededRng;
use nicsync_model::seal_port::{SealConfig, SealedPort};
use nicsync_model::sync::SenderConfig;
use nicsync_model::sync_unit::{SyncUnit, SyncUnitConfig};
use nicsync_model::wire::SyncPort;
use nicsync_model::wire::{HubConfig, Impairment, InProcessHub};
use nicsync_seal::{next_boot, ClusterKey, Keyring, SharedKeyring};
use nicsync_vfio::EmulatedDevice;
use std::sync::Arc;

use crate::driver::CompletionMode;
use crate::membership::{Destination, MemberState, Mode, DEFAULT_DEAD_AFTER, DEFAULT_PROBE_INTERVAL_NS};
use crate::node::{ConnId, Nanos, Node, NodeConfig, NodeOutput};
use crate::table::{ConnEntry, ConnTable, TableError};
use crate::DriverConfig;

/// One simulation's settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed.
    pub seed: u64,
    /// Members (at least 3).
    pub members: u16,
    /// HA or load sharing.
    pub mode: Mode,
    /// Virtual time with churn and faults.
    pub churn_ms: u64,
    /// Virtual time allowed to settle afterwards.
    pub settle_ms: u64,
    /// Highest loss rate drawn (per million).
    pub max_loss_ppm: u32,
    /// Operations per millisecond at each writer.
    pub ops_per_ms: u32,
    /// Inject faults (crash, partition, late join, resync, loss).
    pub faults: bool,
    /// Seal sync frames, membership datagrams and Full Sync streams (as a
    /// daemon does by default), with a key drawn from the seed.
    pub sealed: bool,
    /// An attacker on the sync network (needs `sealed`): it records what
    /// it hears and keeps replaying, tampering with and forging sync frames
    /// and membership datagrams during the churn.
    pub attacks: bool,
    /// Device faults on every member's card, recovered by its host from
    /// its own copy of the table (see `nicsync_model::fault`). Odd members
    /// then take their completions by interrupt, even ones poll, so that
    /// both paths meet every fault (spurious interrupts need interrupts).
    pub device_faults: bool,
    /// Operator actions and link faults at fixed virtual times (beside
    /// the seeded faults), for regression tests of a given sequence. The
    /// cluster is checked only after the last of them.
    pub script: Vec<(Nanos, Scripted)>,
}

/// A scripted step of a simulation ([`SimConfig::script`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scripted {
    /// `nicsync conn flush` on member `.0`: its card's table emptied.
    Flush(u16),
    /// `nicsync resync [member]` sent to member `at`.
    Resync {
        /// The member whose control socket takes the request.
        at: u16,
        /// The member to resync; every member but the cluster's source
        /// when `None`.
        member: Option<u16>,
    },
    /// Membership datagrams from `from` to `to` are dropped (`on`) or
    /// carried again.
    DropMembership {
        /// Sender.
        from: u16,
        /// Receiver.
        to: u16,
        /// Dropped from now on (true) or carried again (false).
        on: bool,
    },
    /// An orderly stop of member `.0` (the daemon's SIGTERM,
    /// [`Node::begin_stop`]); it starts again later, as a crashed one does.
    Stop(u16),
    /// Member `.0` crashes (and starts again 100-400 ms later).
    Crash(u16),
}

impl SimConfig {
    /// The defaults for `seed`.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            members: 3,
            mode: Mode::HighAvailability,
            churn_ms: 1000,
            settle_ms: 6000,
            max_loss_ppm: 200_000,
            ops_per_ms: 4,
            faults: true,
            sealed: true,
            attacks: false,
            device_faults: false,
            script: Vec::new(),
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// All checks passed.
    pub converged: bool,
    /// The first failed check.
    pub failure: Option<String>,
    /// Loss rate drawn (per million).
    pub loss_ppm: u32,
    /// Writes acknowledged by a device.
    pub writes_acked: u64,
    /// Writes that failed with a device or driver error (not acknowledged;
    /// their keys are uncertain until the next acknowledged write).
    pub writes_failed: u64,
    /// Keys whose final value was checked.
    pub keys_checked: u64,
    /// Keys not checked (written just before their member crashed, or
    /// whose last write failed with its outcome unknown).
    pub keys_uncertain: u64,
    /// Entries every member holds at the end.
    pub entries: u64,
    /// Full Syncs completed, all members.
    pub full_syncs: u64,
    /// Full Sync attempts that failed (and were retried).
    pub full_syncs_failed: u64,
    /// Full Syncs completed by each member alive at the end (its current
    /// run only: counters restart with a member).
    pub full_syncs_by_member: BTreeMap<u16, u64>,
    /// Realignment merges completed, members alive at the end.
    pub merges_completed: u64,
    /// Table divergences the reference found by digest, members alive at
    /// the end.
    pub divergences_detected: u64,
    /// Times the Active role moved (HA), the most any member alive at the
    /// end saw.
    pub failovers: u64,
    /// The Active members at the end.
    pub actives_at_end: Vec<u16>,
    /// HA: the longest stretch of virtual milliseconds with two or more
    /// members Active at once (a split brain, or the overlap of a handover:
    /// an Active cut off steps down when it loses its quorum, while its
    /// peers take over when they take it for dead).
    pub longest_two_actives_ms: f64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u32>,
    /// Virtual milliseconds until the cluster settled.
    pub settled_after_ms: u64,
    /// At the end: checked (acknowledged, certain) writes whose value the
    /// members' majority does not hold.
    pub lost_connections: u64,
    /// At the end: members not synced or whose table digest differs from
    /// the majority's.
    pub diverged_members: u64,
    /// Sync traffic refused by the members' seals, summed over the members
    /// alive at the end (counters restart with a member).
    pub refused: RefusedTotals,
    /// Peer updates applied by the devices of the members alive at the end.
    pub sync_updates_applied: u64,
    /// Device fault recoveries (resets with rebuild, replays, restores) the
    /// hosts of the members alive at the end made.
    pub device_recoveries: u64,
    /// Spurious completion interrupts the interrupt-driven members' hosts
    /// took and ignored, all members (crashed ones up to their crash).
    pub spurious_interrupts: u64,
    /// Orderly stops that ran to the end.
    pub orderly_stops: u64,
    /// Of the stopped members' changes made before their stops, those no
    /// peer had acknowledged when they announced Down (the drain ran out:
    /// a peer cut off); their keys are uncertain, as a crashed member's.
    pub stop_unacked: u64,
    /// HA: per orderly stop of the Active, virtual milliseconds from its
    /// announcing Down until another member was Active.
    pub stop_handovers_ms: Vec<f64>,
    /// What happened when (virtual milliseconds), for replaying a failure.
    pub timeline: Vec<String>,
}

/// Drops membership datagrams on the (from, to) links a script named.
type DroppedLinks = std::collections::BTreeSet<(u16, u16)>;

/// Member id the attacker's port uses on the sync wire.
const ATTACKER: u16 = 0xBAD;
/// Sync frames and membership datagrams the attacker keeps for replay.
const ATTACKER_MEMORY: usize = 32;

/// The attacker: what it overheard.
#[derive(Default)]
struct Attacker {
    port: Option<nicsync_model::wire::InProcessPort>,
    frames: VecDeque<Vec<u8>>,
    ccp: VecDeque<(u16, Vec<u8>)>,
}

type SimNode = Node<EmulatedDevice>;

/// A member's synced entries: count, digest, and mark by key.
type MemberTable = (u64, u64, HashMap<ConnKey, u32>);

/// What delivering one message does to its member.
type Delivery = Box<dyn FnOnce(&mut SimNode)>;

struct Slot {
    node: Option<SimNode>,
    last_state: Option<MemberState>,
    isolated: bool,
    /// Restart at this time (crashed).
    restart_at: Option<Nanos>,
    incarnation: u32,
}

struct Pipe {
    /// The member and its end of the stream.
    a: (u16, ConnId),
    b: (u16, ConnId),
}

/// What travels in the simulated networks.
enum Msg {
    Ccp { to: u16, bytes: Vec<u8> },
    FsAccept { to: u16, conn: ConnId },
    FsConnected { to: u16, conn: ConnId },
    FsData { to: u16, conn: ConnId, bytes: Vec<u8> },
    FsClosed { to: u16, conn: ConnId },
}

const STEP_NS: Nanos = 250_000;
const LATENCY_NS: Nanos = 50_000;
const KEYS_PER_WRITER: u32 = 1500;
/// Writes a member acknowledged this long before it crashed may be lost.
const CRASH_WINDOW_NS: Nanos = 300_000_000;
/// The peers' time to acknowledge a stopping member's changes
/// (`sync.stop_drain_ms`).
const STOP_DRAIN_NS: Nanos = 200_000_000;
/// Mixed into the seed for the orderly stop's draws, a stream of their own,
/// so that adding them moved none of the other faults' draws.
const STOP_STREAM: u64 = 0x5354_4f50_5354_4f50;

struct Sim {
    cfg: SimConfig,
    rng: SeededRng,
    hub: InProcessHub,
    keys: Option<Arc<SharedKeyring>>,
    attacker: Attacker,
    slots: Vec<Slot>,
    now: Nanos,
    queue: Vec<(Nanos, u64, Msg)>,
    seq: u64,
    pipes: Vec<Pipe>,
    next_conn: ConnId,
    impairment: Impairment,
    /// Key -> (last acknowledged mark or None when deleted, writer, when).
    reference: HashMap<ConnKey, (Option<u32>, u16, Nanos)>,
    uncertain: std::collections::HashSet<ConnKey>,
    report: SimReport,
    mark: u32,
    /// A key whose value on every member is logged as it changes
    /// (`NICSYNC_SIM_TRACE_KEY`, for replaying a failure).
    trace_key: Option<ConnKey>,
    trace_last: HashMap<u16, TracedKey>,
    /// Per member: what it was last seen doing about its table (traced).
    trace_doing: HashMap<u16, String>,
    /// Membership links a script cut.
    dropped_ccp: DroppedLinks,
    /// Links cut between two members, every kind of traffic, both ways
    /// (lower id first).
    cut_links: DroppedLinks,
    /// HA: since when two or more members have been Active.
    two_actives_since: Option<Nanos>,
    /// Draws for orderly stops.
    stop_rng: SeededRng,
    /// HA: when a stopping Active announced Down, until another member is
    /// Active.
    stop_announced: Option<Nanos>,
}

fn sim_key(writer: u16, i: u32) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a00_0000 | (writer as u32) << 16 | i),
        10_000 + (i % 50_000) as u16,
        Ipv4Addr::new(192, 0, 2, 1),
        443,
        proto::TCP,
        0,
    )
}

impl Sim {
    fn new(cfg: SimConfig) -> Self {
        let mut rng = SeededRng::new(cfg.seed);
        let stop_rng = SeededRng::new(cfg.seed ^ STOP_STREAM);
        let loss = if cfg.faults { rng.below(cfg.max_loss_ppm as u64 + 1) as u32 } else { 0 };
        let impairment = Impairment {
            loss_ppm: loss,
            dup_ppm: if cfg.faults { rng.below(20_001) as u32 } else { 0 },
            reorder_ppm: if cfg.faults { rng.below(50_001) as u32 } else { 0 },
        };
        let hub = InProcessHub::new(HubConfig { queue_capacity: 1 << 16, seed: rng.next_u64(), impairment });
        let slots = (0..cfg.members)
            .map(|_| Slot { node: None, last_state: None, isolated: false, restart_at: None, incarnation: 0 })
            .collect();
        let report = SimReport { seed: cfg.seed, loss_ppm: loss, ..Default::default() };
        let keys = if cfg.sealed {
            let mut secret = [0u8; 32];
            for c in secret.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            ClusterKey::new(1, &secret).and_then(|k| Keyring::new(vec![k], 1)).ok().map(SharedKeyring::new)
        } else {
            None
        };
        let attacker = Attacker {
            port: if cfg.attacks && cfg.sealed { hub.attach(ATTACKER).ok() } else { None },
            ..Default::default()
        };
        Sim {
            cfg,
            rng,
            hub,
            keys,
            attacker,
            slots,
            now: 0,
            queue: Vec::new(),
            seq: 0,
            pipes: Vec::new(),
            next_conn: 1 << 48,
            impairment,
            reference: HashMap::new(),
            uncertain: Default::default(),
            report,
            mark: 0,
            trace_key: std::env::var("NICSYNC_SIM_TRACE_KEY").ok().and_then(|k| crate::control::parse_key(&k).ok()),
            trace_last: HashMap::new(),
            trace_doing: HashMap::new(),
            dropped_ccp: DroppedLinks::new(),
            cut_links: DroppedLinks::new(),
            two_actives_since: None,
            stop_rng,
            stop_announced: None,
        }
    }

    fn fault(&mut self, kind: &str) {
        *self.report.faults.entry(kind.to_string()).or_default() += 1;
    }

    fn log(&mut self, what: String) {
        let line = format!("{:>7.1} ms {what}", self.now as f64 / 1e6);
        tracing::debug!("sim: {line}");
        self.report.timeline.push(line);
    }

    fn start_member(&mut self, id: u16) -> Result<(), String> {
        let idx = id as usize - 1;
        let inc = (self.rng.next_u64() as u32) | 1;
        let peers: Vec<u16> = (1..=self.cfg.members).filter(|p| *p != id).collect();
        let dev = EmulatedDevice::inline().map_err(|e| e.to_string())?;
        // The device's clock starts at the simulation's now.
        dev.nic().advance_time(Duration::from_nanos(self.now));
        let port = self.hub.attach(id).map_err(|e| e.to_string())?;
        let mut sender = SenderConfig::new(1, id, inc);
        sender.queue_capacity = 1 << 17;
        let seal = match (&self.keys, self.cfg.sealed) {
            (Some(keys), _) => {
                Some(SealConfig { keys: keys.clone(), boot: next_boot(None).map_err(|e| e.to_string())? })
            }
            (None, true) => return Err("sealed simulation without keys".into()),
            (None, false) => None,
        };
        let port: Box<dyn SyncPort> = match &seal {
            Some(c) => Box::new(SealedPort::new(Box::new(port), c, &peers)),
            None => Box::new(port),
        };
        let unit = SyncUnit::new(SyncUnitConfig { sender, peers: peers.clone() }, port, self.now)
            .map_err(|e| e.to_string())?;
        dev.nic().attach_sync(unit);
        let mut drv = DriverConfig {
            table_capacity: 1 << 16,
            aging_period_ms: 0,
            // A member holds its peers' updates from its first frame.
            sync_hold_at_enable: true,
            // One seed for every member, from the run's: a seed replays.
            table_hash_seed: Some(nicsync_fwif::hash::TableHashSeed([self.cfg.seed, 0x6e69_6373_796e_6373])),
            ..Default::default()
        };
        if self.cfg.device_faults {
            // The host's wait is wall-clock but a stalled inline device only
            // moves with virtual time: a short timeout keeps runs quick.
            drv.completion_timeout = Duration::from_millis(20);
            // Odd members take completions by interrupt, even ones poll:
            // both paths meet every fault (a spurious interrupt needs a
            // member with interrupts enabled).
            if id % 2 == 1 {
                drv.completion_mode = CompletionMode::Interrupt;
            }
        }
        let mut table = ConnTable::open(dev, drv).map_err(|e| e.to_string())?;
        if self.cfg.device_faults {
            // The host keeps its own copy of the table to recover from them.
            // Faults armed on an idle card wait for its next commands, so
            // several can strike one call and the rebuilds it makes: allow
            // a call as many recoveries.
            let rc = crate::table::RecoveryConfig { member: id, max_recoveries: 16, ..Default::default() };
            table.enable_recovery(rc).map_err(|e| e.to_string())?;
            table.driver_ref().device().faults().seed(self.rng.next_u64());
        }
        let mut nc = NodeConfig::new(1, id, peers, inc);
        nc.mode = self.cfg.mode;
        nc.full_sync_timeout_ns = 500_000_000;
        nc.retry_backoff_ns = 50_000_000;
        nc.chunk_records = 256;
        nc.seal = seal;
        // Virtual time runs on across a member's restarts: a deterministic
        // clock for the generation floor.
        nc.generation_clock = crate::node::GenerationClock::DriverMillis;
        let node = Node::new(table, nc, self.now).map_err(|e| e.to_string())?;
        self.log(format!("member {id} starts (incarnation {inc:#x})"));
        let slot = &mut self.slots[idx];
        slot.node = Some(node);
        slot.incarnation = inc;
        slot.restart_at = None;
        Ok(())
    }

    fn crash(&mut self, id: u16) {
        if self.slots[id as usize - 1].node.is_none() {
            return;
        }
        self.fault("crash");
        self.log(format!("member {id} crashes"));
        self.take_down(id, None);
    }

    /// Member `id` stops: crashed (`stopped` is `None`) or at the end of
    /// an orderly stop. It starts again 100-400 ms later.
    fn take_down(&mut self, id: u16, stopped: Option<crate::node::StopReport>) {
        let idx = id as usize - 1;
        let Some(mut n) = self.slots[idx].node.take() else { return };
        Self::absorb_device_faults(&mut self.report, &mut n);
        drop(n);
        // A crashed member's recent writes may not have left it; a stopped
        // one's left it, unless the peers did not all acknowledge them.
        if stopped.is_none_or(|r| r.unacked > 0) {
            // Gone while no other member is synced (the others down, or
            // pulling a Full Sync), it took the cluster's only copy: past
            // what the cluster survives, a member at a time.
            if !self.slots.iter().filter_map(|s| s.node.as_ref()).any(|n| n.is_synced()) {
                self.log(format!("member {id} went with the only synced copy of the table: every key is uncertain"));
                self.uncertain.extend(self.reference.keys().copied());
            }
            let now = self.now;
            // A stopped member wrote nothing during its stop.
            let window = CRASH_WINDOW_NS + stopped.map_or(0, |r| r.drain_ns);
            for (k, (_, w, at)) in &self.reference {
                if *w == id && now.saturating_sub(*at) < window {
                    self.uncertain.insert(*k);
                }
            }
        }
        // Its streams break; the peers see them close.
        let broken: Vec<(u16, ConnId)> = self
            .pipes
            .iter()
            .filter_map(|p| {
                if p.a.0 == id {
                    Some(p.b)
                } else if p.b.0 == id {
                    Some(p.a)
                } else {
                    None
                }
            })
            .collect();
        self.pipes.retain(|p| p.a.0 != id && p.b.0 != id);
        for (to, conn) in broken {
            self.send(LATENCY_NS, Msg::FsClosed { to, conn });
        }
        let rng = if stopped.is_some() { &mut self.stop_rng } else { &mut self.rng };
        let back = 100 + rng.below(300);
        self.slots[idx].restart_at = Some(self.now + back * 1_000_000);
    }

    /// Begins an orderly stop of member `id`.
    fn stop(&mut self, id: u16) {
        let now = self.now;
        let Some(n) = self.slots[id as usize - 1].node.as_mut() else { return };
        if n.is_stopping() {
            return;
        }
        n.begin_stop(now, STOP_DRAIN_NS);
        let state = n.state();
        self.fault("orderly_stop");
        self.log(format!("member {id} stops in order ({state})"));
    }

    fn send(&mut self, delay: Nanos, m: Msg) {
        self.seq += 1;
        self.queue.push((self.now + delay, self.seq, m));
    }

    fn alive(&self, id: u16) -> bool {
        self.slots.get(id as usize - 1).is_some_and(|s| s.node.is_some())
    }

    fn reachable(&self, a: u16, b: u16) -> bool {
        self.alive(a)
            && self.alive(b)
            && !self.slots[a as usize - 1].isolated
            && !self.slots[b as usize - 1].isolated
            && !self.cut_links.contains(&(a.min(b), a.max(b)))
    }

    /// Carries out what a node asked for.
    fn outputs(&mut self, id: u16) {
        let idx = id as usize - 1;
        let mut outs = Vec::new();
        if let Some(n) = &mut self.slots[idx].node {
            while let Some(o) = n.poll_output() {
                outs.push(o);
            }
        }
        for o in outs {
            match o {
                NodeOutput::Ccp { dest, bytes } => {
                    if self.attacker.port.is_some() {
                        if self.attacker.ccp.len() == ATTACKER_MEMORY {
                            self.attacker.ccp.pop_front();
                        }
                        self.attacker.ccp.push_back((id, bytes.clone()));
                    }
                    for to in 1..=self.cfg.members {
                        if to == id || matches!(dest, Destination::Member(m) if m != to) {
                            continue;
                        }
                        if !self.reachable(id, to)
                            || self.dropped_ccp.contains(&(id, to))
                            || self.rng.chance(self.impairment.loss_ppm)
                        {
                            continue;
                        }
                        let jitter =
                            if self.rng.chance(self.impairment.reorder_ppm) { self.rng.below(2_000_000) } else { 0 };
                        self.send(LATENCY_NS + jitter, Msg::Ccp { to, bytes: bytes.clone() });
                        if self.rng.chance(self.impairment.dup_ppm) {
                            self.send(LATENCY_NS + 100_000, Msg::Ccp { to, bytes: bytes.clone() });
                        }
                    }
                }
                NodeOutput::FsConnect { conn, peer, .. } => {
                    if self.reachable(id, peer) {
                        let server_conn = self.next_conn;
                        self.next_conn += 1;
                        self.pipes.push(Pipe { a: (id, conn), b: (peer, server_conn) });
                        self.send(LATENCY_NS, Msg::FsAccept { to: peer, conn: server_conn });
                        self.send(2 * LATENCY_NS, Msg::FsConnected { to: id, conn });
                    } else {
                        // Connection refused or timed out.
                        self.send(1_000_000, Msg::FsClosed { to: id, conn });
                    }
                }
                NodeOutput::FsSend { conn, bytes } => {
                    if let Some(other) = self.other_end(id, conn) {
                        // A stream fault: the connection drops mid-transfer.
                        if self.cfg.faults && self.rng.chance(2_000) {
                            self.fault("stream_drop");
                            self.close_pipe(id, conn);
                        } else {
                            self.send(LATENCY_NS, Msg::FsData { to: other.0, conn: other.1, bytes });
                        }
                    }
                }
                NodeOutput::FsClose { conn } => self.close_pipe(id, conn),
            }
        }
    }

    fn other_end(&self, id: u16, conn: ConnId) -> Option<(u16, ConnId)> {
        self.pipes.iter().find_map(|p| {
            if p.a == (id, conn) {
                Some(p.b)
            } else if p.b == (id, conn) {
                Some(p.a)
            } else {
                None
            }
        })
    }

    /// Breaks every stream `cut` says a fault cut.
    fn close_pipes(&mut self, cut: impl Fn(&Pipe) -> bool) {
        let ends: Vec<(u16, ConnId)> = self.pipes.iter().filter(|p| cut(p)).map(|p| p.a).collect();
        for (m, c) in ends {
            self.close_pipe(m, c);
        }
    }

    fn close_pipe(&mut self, id: u16, conn: ConnId) {
        if let Some(pos) = self.pipes.iter().position(|p| p.a == (id, conn) || p.b == (id, conn)) {
            let p = self.pipes.swap_remove(pos);
            let (mine, other) = if p.a == (id, conn) { (p.a, p.b) } else { (p.b, p.a) };
            // After the data already in flight.
            self.send(LATENCY_NS + 1, Msg::FsClosed { to: other.0, conn: other.1 });
            self.send(LATENCY_NS + 1, Msg::FsClosed { to: mine.0, conn: mine.1 });
        }
    }

    fn deliver_due(&mut self) {
        self.queue.sort_by_key(|(t, s, _)| (*t, *s));
        let due = self.queue.partition_point(|(t, _, _)| *t <= self.now);
        let msgs: Vec<(Nanos, u64, Msg)> = self.queue.drain(..due).collect();
        for (_, _, m) in msgs {
            let now = self.now;
            let (to, f): (u16, Delivery) = match m {
                Msg::Ccp { to, bytes } => (to, Box::new(move |n| n.handle_ccp(&bytes, now))),
                Msg::FsAccept { to, conn } => (to, Box::new(move |n| n.fs_accepted(conn, now))),
                Msg::FsConnected { to, conn } => (to, Box::new(move |n| n.fs_connected(conn, now))),
                Msg::FsData { to, conn, bytes } => (to, Box::new(move |n| n.fs_data(conn, &bytes, now))),
                Msg::FsClosed { to, conn } => (to, Box::new(move |n| n.fs_closed(conn, now))),
            };
            if let Some(n) = self.slots.get_mut(to as usize - 1).and_then(|s| s.node.as_mut()) {
                f(n);
            }
            self.outputs(to);
        }
    }

    /// The members the workload writes through.
    fn writers(&self) -> Vec<u16> {
        let active: Vec<u16> = (1..=self.cfg.members)
            .filter(|id| {
                let s = &self.slots[*id as usize - 1];
                !s.isolated
                    && s.node.as_ref().is_some_and(|n| {
                        // A stopping member refuses writes (runtime::handle_request).
                        matches!(n.state(), MemberState::Active | MemberState::ActiveAttention)
                            && n.is_synced()
                            && !n.is_stopping()
                    })
            })
            .collect();
        match self.cfg.mode {
            Mode::HighAvailability => active.into_iter().take(1).collect(),
            Mode::LoadSharing => active,
        }
    }

    fn churn(&mut self) {
        for w in self.writers() {
            for _ in 0..self.cfg.ops_per_ms.div_ceil((1_000_000 / STEP_NS) as u32) {
                let i = self.rng.below(KEYS_PER_WRITER as u64) as u32;
                let k = sim_key(w, i);
                let present = matches!(self.reference.get(&k), Some((Some(_), _, _)));
                let delete = present && self.rng.below(10) < 4;
                self.mark += 1;
                let mark = self.mark;
                let Some(n) = self.slots[w as usize - 1].node.as_mut() else { continue };
                let r = if delete {
                    n.table().delete(&k).map(|_| None)
                } else {
                    let tcp = if present { TcpState::Established } else { TcpState::SynSent };
                    let st = ConnState::new(tcp, Direction::Original, ConnFlags::SYNC | ConnFlags::CONFIRMED, 0, mark);
                    // A quarter of the connections are translated (their
                    // deletes must still reach every member).
                    let nat = (i % 4 == 0)
                        .then(|| Nat::new(NatKind::Source, Ipv4Addr::new(198, 51, 100, 7).into(), 20_000 + i as u16));
                    n.table().upsert(&k, &ConnEntry { state: st, nat }).map(|_| Some(mark))
                };
                match r {
                    Ok(v) => {
                        self.report.writes_acked += 1;
                        self.reference.insert(k, (v, w, self.now));
                        self.uncertain.remove(&k);
                    }
                    // Absent here. Not a write: a key whose last write is
                    // uncertain (its writer crashed) stays uncertain, since
                    // that write may still surface from a member that got it.
                    Err(TableError::NotFound) => {
                        if !self.uncertain.contains(&k) {
                            self.reference.insert(k, (None, w, self.now));
                        }
                    }
                    // Not acknowledged, and of unknown outcome: the device
                    // may have applied it, and sent it to the peers, before
                    // the fault its host gave up on.
                    Err(TableError::Driver(e)) => {
                        self.log(format!("member {w}: write of {k} failed: {e}"));
                        self.report.writes_failed += 1;
                        self.uncertain.insert(k);
                    }
                    // Refused by the device: nothing changed.
                    Err(_) => {}
                }
            }
        }
    }

    /// Measures how long two or more members are Active at once (HA).
    fn watch_actives(&mut self) {
        if self.cfg.mode != Mode::HighAvailability {
            return;
        }
        let actives = self
            .slots
            .iter()
            .filter_map(|s| s.node.as_ref())
            .filter(|n| matches!(n.state(), MemberState::Active | MemberState::ActiveAttention))
            .count();
        if actives < 2 {
            self.two_actives_since = None;
            return;
        }
        let since = *self.two_actives_since.get_or_insert(self.now);
        let ms = (self.now - since + STEP_NS) as f64 / 1e6;
        self.report.longest_two_actives_ms = self.report.longest_two_actives_ms.max(ms);
    }

    fn step(&mut self, faults: bool) {
        self.now += STEP_NS;
        for id in 1..=self.cfg.members {
            if let Some(t) = self.slots[id as usize - 1].restart_at {
                if t <= self.now && self.start_member(id).is_err() {
                    self.slots[id as usize - 1].restart_at = Some(self.now + 10 * STEP_NS);
                }
            }
            if let Some(n) = self.slots[id as usize - 1].node.as_mut() {
                n.table_ref().driver_ref().device().nic().advance_time(Duration::from_nanos(STEP_NS));
                let now = self.now;
                if n.poll_timeout().is_some_and(|t| t <= now) {
                    n.handle_timeout(now);
                } else {
                    n.progress(now);
                }
                // An interrupt-driven member's event loop wakes on the
                // completion interrupt and takes it (a spurious one is
                // counted and ignored).
                n.table().driver().take_interrupts();
            }
            let stopped = self.slots[id as usize - 1].node.as_mut().and_then(|n| n.stop_progress(self.now));
            self.outputs(id);
            let node = self.slots[id as usize - 1].node.as_ref();
            let (st, stopping) = (node.map(|n| n.state()), node.is_some_and(|n| n.is_stopping()));
            if st.is_some() && st != self.slots[id as usize - 1].last_state {
                let was_active = self.slots[id as usize - 1].last_state.is_some_and(|s| s.is_active());
                self.slots[id as usize - 1].last_state = st;
                if let Some(st) = st {
                    self.log(format!("member {id} is {st}"));
                    let ha = self.cfg.mode == Mode::HighAvailability;
                    if ha && stopping && was_active && st == MemberState::Down {
                        self.stop_announced = Some(self.now);
                    } else if st.is_active() {
                        if let Some(t) = self.stop_announced.take() {
                            self.report.stop_handovers_ms.push((self.now - t) as f64 / 1e6);
                        }
                    }
                }
            }
            if let Some(r) = stopped {
                self.report.orderly_stops += 1;
                self.report.stop_unacked += r.unacked;
                self.log(format!(
                    "member {id} stopped ({:.1} ms to announce Down, {} changes unacknowledged)",
                    r.drain_ns as f64 / 1e6,
                    r.unacked
                ));
                self.take_down(id, Some(r));
            }
        }
        self.deliver_due();
        self.watch_actives();
        if faults {
            self.churn();
            self.attack();
            self.device_fault();
        }
        if let Some(k) = self.trace_key {
            for id in 1..=self.cfg.members {
                // Read from the model's table directly: a LOOKUP would be a
                // command, and take device faults meant for the workload.
                let v = self.slots[id as usize - 1].node.as_ref().and_then(|n| {
                    let core = n.table_ref().driver_ref().device().nic().core();
                    let mut t = nicsync_model::table::Traffic::default();
                    let loc = core.table().find(&k, &mut t)?;
                    core.table().get(loc).map(|s| (s.state.mark.get(), s.state.generation.get(), s.owner))
                });
                let tomb = self.slots[id as usize - 1]
                    .node
                    .as_ref()
                    .and_then(|n| n.table_ref().driver_ref().device().nic().core().tombstone(&k));
                let doing = self.slots[id as usize - 1].node.as_ref().map(|n| n.activity()).unwrap_or_default();
                if self.trace_doing.get(&id) != Some(&doing) {
                    self.trace_doing.insert(id, doing.clone());
                    self.log(format!("trace: member {id} {doing}"));
                }
                let v = (v, tomb);
                if self.trace_last.get(&id) != Some(&v) {
                    self.trace_last.insert(id, v);
                    self.log(format!("trace: member {id} holds {v:?}"));
                }
            }
        }
    }

    /// One step of the attacker: it records the frames its port hears and,
    /// about every 5 ms, replays, tampers with or forges one frame or
    /// membership datagram.
    fn attack(&mut self) {
        let Some(port) = self.attacker.port.as_mut() else { return };
        let mut buf = vec![0u8; nicsync_model::wire::MAX_WIRE_FRAME];
        while let Ok(Some(n)) = port.recv(&mut buf) {
            if self.attacker.frames.len() == ATTACKER_MEMORY {
                self.attacker.frames.pop_front();
            }
            self.attacker.frames.push_back(buf[..n].to_vec());
        }
        if !self.rng.chance(50_000) {
            return;
        }
        let pick = self.rng.below(5);
        let frame = match self.attacker.frames.len() {
            0 => None,
            n => self.attacker.frames.get(self.rng.below(n as u64) as usize).cloned(),
        };
        let ccp = match self.attacker.ccp.len() {
            0 => None,
            n => self.attacker.ccp.get(self.rng.below(n as u64) as usize).cloned(),
        };
        let kind = match (pick, frame, ccp) {
            (0, Some(f), _) => {
                let _ = port.send(&f);
                "replayed_frame"
            }
            (1, Some(mut f), _) => {
                let i = self.rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << self.rng.below(8);
                let _ = port.send(&f);
                "tampered_frame"
            }
            (3, _, Some((from, c))) => {
                let to = 1 + self.rng.below(self.cfg.members as u64) as u16;
                if to != from {
                    self.send(LATENCY_NS, Msg::Ccp { to, bytes: c });
                }
                "replayed_ccp"
            }
            (4, _, Some((_, mut c))) => {
                let i = self.rng.below(c.len() as u64) as usize;
                c[i] ^= 1 << self.rng.below(8);
                let to = 1 + self.rng.below(self.cfg.members as u64) as u16;
                self.send(LATENCY_NS, Msg::Ccp { to, bytes: c });
                "tampered_ccp"
            }
            _ => {
                let len = 16 + self.rng.below(1400) as usize;
                let mut f: Vec<u8> = (0..len).map(|_| self.rng.next_u64() as u8).collect();
                // Half of the forgeries look sealed at first sight.
                if self.rng.below(2) == 0 {
                    f[0] = nicsync_fwif::seal::SEAL_MARK;
                    f[2] = nicsync_fwif::seal::SUITE_AES_256_GCM;
                    f[3] = 0;
                }
                let _ = port.send(&f);
                "forged_frame"
            }
        };
        self.fault(kind);
    }

    /// About every 20 ms, one fault on a random member's card.
    fn device_fault(&mut self) {
        use nicsync_model::fault::Fault as DeviceFault;
        if !self.cfg.device_faults || !self.rng.chance(12_500) {
            return;
        }
        let id = 1 + self.rng.below(self.cfg.members as u64) as u16;
        let fault = match self.rng.below(9) {
            0 => DeviceFault::DropCompletion,
            1 => DeviceFault::Stall { duration: Some(Duration::from_micros(200 + self.rng.below(5_000))) },
            2 => DeviceFault::CorruptCompletionTag,
            3 => DeviceFault::CorruptCompletionPhase,
            4 => DeviceFault::SpuriousInterrupt,
            5 => DeviceFault::DmaError,
            6 => DeviceFault::ResetMidBatch { after: self.rng.below(8) as u32 },
            7 => DeviceFault::LoseEntry,
            _ => DeviceFault::CorruptEventPhase,
        };
        let Some(n) = self.slots[id as usize - 1].node.as_ref() else { return };
        // Counted when it takes effect (see `absorb_device_faults`).
        n.table_ref().driver_ref().device().faults().arm(fault);
    }

    /// Adds the faults that took effect on a member's card, and the spurious
    /// interrupts its host took, to the report (before the card goes away
    /// with a crash, or at the end).
    fn absorb_device_faults(report: &mut SimReport, n: &mut SimNode) {
        n.table().driver().take_interrupts();
        report.spurious_interrupts += n.table_ref().recovery_stats().spurious_interrupts;
        for (kind, v) in n.table_ref().driver_ref().device().faults().injected_by_kind().iter() {
            if v > 0 {
                *report.faults.entry(format!("device_{}", kind.name())).or_default() += v as u32;
            }
        }
    }

    /// Final accounting (whether or not the run converged): members that
    /// diverge from the majority, and checked writes the majority lost.
    fn account(&mut self) {
        let mut tables: Vec<Option<MemberTable>> = Vec::new();
        let mut refused = RefusedTotals::default();
        for id in 1..=self.cfg.members {
            let Some(n) = self.slots[id as usize - 1].node.as_mut() else {
                tables.push(None);
                continue;
            };
            refused.add(&n.refused());
            let synced = n.is_synced();
            // A device fault armed during the churn may still strike the
            // walk (which then starts over): that is not a divergence.
            let mut why = String::from("not synced");
            let table = if synced { (0..4).find_map(|_| Self::digest_of(n).map_err(|e| why = e).ok()) } else { None };
            match &table {
                Some((c, d, _)) => {
                    self.report.timeline.push(format!("member {id} accounted: {c} entries, digest {d:016x}"))
                }
                None => self.report.timeline.push(format!("member {id} accounted: no table ({why})")),
            }
            tables.push(table);
        }
        self.report.refused = refused;
        for id in 1..=self.cfg.members {
            if let Some(n) = self.slots[id as usize - 1].node.as_mut() {
                Self::absorb_device_faults(&mut self.report, n);
            }
        }
        self.report.device_recoveries = (1..=self.cfg.members)
            .filter_map(|id| self.slots[id as usize - 1].node.as_ref())
            .map(|n| {
                let r = n.table_ref().recovery_stats();
                r.resets + r.dma_retries + r.entries_restored
            })
            .sum();
        self.report.sync_updates_applied = (1..=self.cfg.members)
            .filter_map(|id| self.slots[id as usize - 1].node.as_ref())
            .map(|n| n.table_ref().driver_ref().device_counter(Counter::SyncUpdatesApplied))
            .sum();
        let mut votes: HashMap<(u64, u64), usize> = HashMap::new();
        for (c, d, _) in tables.iter().flatten() {
            *votes.entry((*c, *d)).or_default() += 1;
        }
        let majority = votes.iter().max_by_key(|(k, v)| (**v, **k)).map(|(k, _)| *k);
        self.report.diverged_members =
            tables.iter().filter(|t| t.as_ref().map(|(c, d, _)| (*c, *d)) != majority || majority.is_none()).count()
                as u64;
        let Some(map) =
            majority.and_then(|m| tables.iter().flatten().find(|(c, d, _)| (*c, *d) == m)).map(|(_, _, map)| map)
        else {
            self.report.lost_connections =
                self.reference.keys().filter(|k| !self.uncertain.contains(*k)).count() as u64;
            return;
        };
        self.report.lost_connections = self
            .reference
            .iter()
            .filter(|(k, (v, _, _))| !self.uncertain.contains(*k) && map.get(*k).copied() != *v)
            .count() as u64;
    }

    fn schedule_faults(&mut self) -> Vec<(Nanos, Fault)> {
        let mut f = Vec::new();
        if !self.cfg.faults {
            return f;
        }
        let churn = self.cfg.churn_ms * 1_000_000;
        let at = |rng: &mut SeededRng, lo: u64, hi: u64| churn * lo / 100 + rng.below(churn * (hi - lo) / 100);
        let n = self.cfg.members as u64;
        f.push((at(&mut self.rng, 10, 30), Fault::Join((n) as u16)));
        f.push((at(&mut self.rng, 30, 60), Fault::Crash(1 + self.rng.below(n) as u16)));
        let p = 1 + self.rng.below(n) as u16;
        let t = at(&mut self.rng, 40, 80);
        f.push((t, Fault::Isolate(p, true)));
        f.push((t + (50 + self.rng.below(250)) * 1_000_000, Fault::Isolate(p, false)));
        f.push((at(&mut self.rng, 50, 90), Fault::Resync(1 + self.rng.below(n) as u16)));
        // One link between two members cut both ways, each still reaching
        // the others: membership must not elect a second Active across it.
        let a = 1 + self.rng.below(n) as u16;
        let b = 1 + ((u64::from(a) + self.rng.below(n - 1)) % n) as u16;
        let t = at(&mut self.rng, 20, 80);
        f.push((t, Fault::CutLink(a, b, true)));
        f.push((t + (50 + self.rng.below(250)) * 1_000_000, Fault::CutLink(a, b, false)));
        // Drawn from a stream of their own: the draws above are as before.
        f.push((at(&mut self.stop_rng, 20, 90), Fault::StopWriter));
        f.sort_by_key(|x| x.0);
        f
    }

    fn apply(&mut self, f: Fault) {
        match f {
            Fault::Join(_) => {}
            Fault::Crash(id) => self.crash(id),
            Fault::Isolate(id, on) => {
                if on {
                    self.fault("partition");
                }
                self.log(format!("member {id} {}", if on { "cut off" } else { "reconnected" }));
                self.slots[id as usize - 1].isolated = on;
                self.hub.set_isolated(id, on);
                if on {
                    self.close_pipes(|p| p.a.0 == id || p.b.0 == id);
                }
            }
            Fault::CutLink(a, b, on) => {
                if on {
                    self.fault("link_cut");
                }
                self.log(format!("link {a}-{b} {}", if on { "cut" } else { "mended" }));
                let link = (a.min(b), a.max(b));
                if on {
                    self.cut_links.insert(link);
                } else {
                    self.cut_links.remove(&link);
                }
                self.hub.set_link_cut(a, b, on);
                if on {
                    self.close_pipes(|p| (p.a.0.min(p.b.0), p.a.0.max(p.b.0)) == link);
                }
            }
            Fault::Resync(id) => {
                let now = self.now;
                let ls = self.cfg.mode == Mode::LoadSharing;
                let mut done = false;
                if let Some(n) = self.slots[id as usize - 1].node.as_mut() {
                    // Traffic has moved off a member an operator resyncs.
                    if !matches!(n.state(), MemberState::Active | MemberState::ActiveAttention) || ls {
                        n.request_resync(now);
                        done = true;
                    }
                }
                if done {
                    self.fault("manual_resync");
                    self.log(format!("operator resyncs member {id}"));
                }
            }
            Fault::StopWriter => {
                // As an operator does maintenance: on a healthy cluster.
                let healthy = self.cut_links.is_empty()
                    && self.dropped_ccp.is_empty()
                    && self.slots.iter().all(|s| !s.isolated && s.node.as_ref().is_some_and(|n| n.is_synced()));
                let writers = self.writers();
                if !healthy {
                    self.log("no orderly stop: the cluster is not whole".into());
                } else if !writers.is_empty() {
                    let i = self.stop_rng.below(writers.len() as u64) as usize;
                    self.stop(writers[i]);
                }
            }
            Fault::Script(step) => self.scripted(step),
        }
    }

    /// Applies the scripted steps that are due.
    fn run_script(&mut self, script: &mut VecDeque<(Nanos, Scripted)>) {
        while script.front().is_some_and(|(t, _)| *t <= self.now) {
            if let Some((_, step)) = script.pop_front() {
                self.apply(Fault::Script(step));
            }
        }
    }

    fn scripted(&mut self, step: Scripted) {
        let now = self.now;
        self.log(format!("script: {step:?}"));
        match step {
            Scripted::Flush(id) => {
                if let Some(n) = self.slots[id as usize - 1].node.as_mut() {
                    if let Err(e) = n.table().flush() {
                        self.log(format!("member {id}: flush: {e}"));
                    }
                }
            }
            Scripted::Resync { at, member } => {
                if let Some(n) = self.slots[at as usize - 1].node.as_mut() {
                    let req = crate::control::Request::Resync { member };
                    let reply = crate::runtime::handle_request(n, None, &req, &Default::default(), now);
                    self.log(format!("member {at} answers: {reply:?}"));
                }
            }
            Scripted::DropMembership { from, to, on } => {
                if on {
                    self.dropped_ccp.insert((from, to));
                } else {
                    self.dropped_ccp.remove(&(from, to));
                }
            }
            Scripted::Stop(id) => self.stop(id),
            Scripted::Crash(id) => self.crash(id),
        }
    }

    fn digest_of(n: &mut SimNode) -> Result<MemberTable, String> {
        let all = n.synced_entries().map_err(|e| e.to_string())?;
        let (count, digest) = crate::fullsync::digest_updates(all.iter());
        Ok((count, digest, all.iter().map(|u| (u.key, u.state.mark.get())).collect()))
    }

    /// The end-of-run checks; `Ok` when they pass.
    fn check(&mut self) -> Result<(), String> {
        let mut first: Option<(u16, u64, u64, HashMap<ConnKey, u32>)> = None;
        let mut actives = 0;
        for id in 1..=self.cfg.members {
            // A member down for a while (crashed, stopped) is waited for:
            // the cluster has settled once it is back and synced.
            if self.slots[id as usize - 1].node.is_none() && self.slots[id as usize - 1].restart_at.is_some() {
                return Err(format!("member {id} is down, to start again"));
            }
            let Some(n) = self.slots[id as usize - 1].node.as_mut() else { continue };
            if !n.is_synced() {
                return Err(format!("member {id} is not synced ({:?})", n.state()));
            }
            if matches!(n.state(), MemberState::Active | MemberState::ActiveAttention) {
                actives += 1;
            }
            let (count, digest, map) = Self::digest_of(n)?;
            match &first {
                None => first = Some((id, count, digest, map)),
                Some((fid, fc, fd, fmap)) => {
                    if (count, digest) != (*fc, *fd) {
                        let mut keys: Vec<&ConnKey> = fmap.keys().collect();
                        keys.sort_by_key(|k| k.to_string());
                        let diff = keys
                            .into_iter()
                            .map(|k| (k, &fmap[k]))
                            .find(|(k, v)| map.get(*k) != Some(*v))
                            .map(|(k, v)| format!("{k}: member {fid} mark {v}, member {id} {:?}", map.get(k)))
                            .or_else(|| {
                                map.iter()
                                    .find(|(k, _)| !fmap.contains_key(*k))
                                    .map(|(k, v)| format!("{k}: member {fid} none, member {id} mark {v}"))
                            })
                            .unwrap_or_else(|| "same keys and marks (a state or owner differs)".into());
                        let r = self.reference.iter().find(|(k, _)| diff.starts_with(&k.to_string())).map(|(_, v)| *v);
                        return Err(format!(
                            "member {id} holds {count} entries digest {digest:016x}, member {fid} {fc} entries digest {fd:016x}; first difference {diff}; reference {r:?}"
                        ));
                    }
                }
            }
        }
        if self.cfg.mode == Mode::HighAvailability && actives != 1 {
            return Err(format!("{actives} Active members in HA mode"));
        }
        // Two Actives overlap only until a cut-off one notices (its quorum
        // lost, a dead window) or a report reaches it (a probe interval):
        // never for as long as a cut lasts.
        let bound_ms = (DEFAULT_DEAD_AFTER as u64 + 1) * DEFAULT_PROBE_INTERVAL_NS / 1_000_000;
        if self.report.longest_two_actives_ms > bound_ms as f64 {
            return Err(format!(
                "two Actives at once for {:.2} ms, more than a dead window and a probe interval ({bound_ms} ms)",
                self.report.longest_two_actives_ms
            ));
        }
        let Some((_, count, _, map)) = first else { return Err("no live member".into()) };
        self.report.entries = count;
        let (mut checked, mut uncertain) = (0, 0);
        let mut lost = Vec::new();
        for (k, (v, w, _)) in &self.reference {
            if self.uncertain.contains(k) {
                uncertain += 1;
                continue;
            }
            checked += 1;
            let held = map.get(k).copied();
            if held != *v {
                lost.push((k.to_string(), *w, *v, held));
            }
        }
        // The same key whatever the hash order, so a seed replays exactly.
        lost.sort();
        if let Some((k, w, v, held)) = lost.first() {
            return Err(format!(
                "acknowledged write lost: {k} (writer {w}) should be {v:?}, members hold {held:?} ({} such keys)",
                lost.len()
            ));
        }
        self.report.keys_checked = checked;
        self.report.keys_uncertain = uncertain;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Join(u16),
    Crash(u16),
    Isolate(u16, bool),
    /// The link between two members cut (true) or mended.
    CutLink(u16, u16, bool),
    Resync(u16),
    /// An orderly stop of a member writing (HA: the Active), if any.
    StopWriter,
    Script(Scripted),
}

/// A traced key on one member: its entry (mark, generation, owner) and its
/// tombstone (generation, owner), either absent.
type TracedKey = (Option<(u32, u32, u16)>, Option<(u32, u16)>);

/// Runs one seeded simulation.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut sim = Sim::new(cfg.clone());
    let faults = sim.schedule_faults();
    let late = faults.iter().find_map(|(t, f)| if let Fault::Join(id) = f { Some((*t, *id)) } else { None });
    for id in 1..=cfg.members {
        if late.is_some_and(|(_, l)| l == id) {
            sim.slots[id as usize - 1].restart_at = late.map(|(t, _)| t);
            sim.fault("late_join");
            continue;
        }
        if let Err(e) = sim.start_member(id) {
            sim.report.failure = Some(format!("member {id} did not start: {e}"));
            return sim.report;
        }
    }
    let mut pending: VecDeque<(Nanos, Fault)> = faults.into_iter().collect();
    let mut script: Vec<(Nanos, Scripted)> = cfg.script.clone();
    script.sort_by_key(|(t, _)| *t);
    let mut script: VecDeque<(Nanos, Scripted)> = script.into();
    let churn_end = cfg.churn_ms * 1_000_000;
    while sim.now < churn_end {
        while pending.front().is_some_and(|(t, _)| *t <= sim.now) {
            if let Some((_, f)) = pending.pop_front() {
                sim.apply(f);
            }
        }
        sim.run_script(&mut script);
        sim.step(true);
    }
    // Heal: every fault ends, crashed members come back, the wire is clean.
    for (_, f) in pending {
        if let Fault::Isolate(_, false) | Fault::CutLink(_, _, false) = f {
            sim.apply(f);
        }
    }
    for id in 1..=cfg.members {
        if sim.slots[id as usize - 1].isolated {
            sim.apply(Fault::Isolate(id, false));
        }
    }
    sim.impairment = Impairment::NONE;
    sim.hub.set_impairment(Impairment::NONE);
    // Device faults armed during the churn that have not struck yet are
    // disarmed too (a stall in progress ends).
    for s in &sim.slots {
        if let Some(n) = &s.node {
            n.table_ref().driver_ref().device().faults().clear();
        }
    }
    let settle_end = churn_end + cfg.settle_ms * 1_000_000;
    let mut last_err = String::from("did not settle");
    while sim.now < settle_end {
        for _ in 0..(100_000_000 / STEP_NS) {
            sim.run_script(&mut script);
            sim.step(false);
        }
        if !script.is_empty() {
            continue;
        }
        match sim.check() {
            Ok(()) => {
                sim.report.converged = true;
                sim.report.settled_after_ms = (sim.now - churn_end) / 1_000_000;
                break;
            }
            Err(e) => last_err = e,
        }
    }
    if !script.is_empty() {
        last_err = format!("{} scripted steps fall after the end of the run", script.len());
        sim.report.converged = false;
    }
    sim.account();
    for (i, s) in sim.slots.iter().enumerate() {
        if let Some(n) = &s.node {
            let id = i as u16 + 1;
            let st = n.stats();
            sim.report.full_syncs += st.full_syncs_completed;
            sim.report.full_syncs_failed += st.full_syncs_failed;
            sim.report.full_syncs_by_member.insert(id, st.full_syncs_completed);
            sim.report.merges_completed += st.merges_completed;
            sim.report.divergences_detected += st.divergences_detected;
            sim.report.failovers = sim.report.failovers.max(n.membership().stats().failovers);
            if matches!(n.state(), MemberState::Active | MemberState::ActiveAttention) {
                sim.report.actives_at_end.push(id);
            }
        }
    }
    if !sim.report.converged {
        sim.report.failure = Some(last_err);
        for id in 1..=cfg.members {
            if let Some(n) = &sim.slots[id as usize - 1].node {
                let line = format!("member {id} at the end: {}", crate::runtime::syncstat_json(n, &Default::default()));
                sim.report.timeline.push(line);
                let line = format!("member {id} sees: {}", crate::runtime::state_json(n, sim.now));
                sim.report.timeline.push(line);
            }
        }
    }
    sim.report
}
