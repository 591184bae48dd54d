//! Putting a member together: device, sync unit, table and [`Node`], from
//! a daemon configuration or for an in-process cluster; and the daemon
//! itself (`nicsync daemon`).

use std::time::Duration;

use nicsync_model::seal_port::{SealConfig, SealedPort};
use nicsync_model::sync::{epoch_from_entropy, SenderConfig};
use nicsync_model::sync_unit::{SyncUnit, SyncUnitConfig};
use nicsync_model::wire::{SyncPort, UdpConfig, UdpPort};
use nicsync_model::{ExecMode, Idle, ModelConfig};
use nicsync_seal::{next_boot, Keyring, SharedKeyring};
use nicsync_vfio::{EmulatedDevice, NicDevice};

use crate::config::{ClusterMode, Config, DeviceKind, TableSource};
use crate::ctsync::KernelLink;
use crate::device::AnyDevice;
use crate::membership::Mode;
use crate::node::{Node, NodeConfig};
use crate::runtime::{ControlSocket, MemberNet, PeerNet};
use crate::table::{ConnTable, RecoveryConfig};
use crate::DriverConfig;

/// Updates each member keeps for retransmission: conntrackd's resend
/// queue (131,072); ClusterXL's 512 would cover a third of a millisecond at
/// the 1.5 million updates per second the cluster must sustain.
pub const RETRANSMIT_QUEUE: usize = 1 << 17;

/// Why a member could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The device.
    #[error("device: {0}")]
    Device(#[from] nicsync_vfio::DeviceError),
    /// The sync port.
    #[error("sync port: {0}")]
    Wire(#[from] nicsync_model::wire::WireError),
    /// The sync unit's settings.
    #[error("sync unit: {0}")]
    Sync(#[from] nicsync_model::sync::ConfigError),
    /// Bring-up.
    #[error("{0}")]
    Driver(#[from] crate::DriverError),
    /// The node.
    #[error("{0}")]
    Node(#[from] crate::node::NodeError),
    /// Something this build cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// The connection table (enabling fault recovery).
    #[error("{0}")]
    Table(#[from] crate::TableError),
    /// Sync security: the key file or the boot number.
    #[error("security: {0}")]
    Security(#[from] nicsync_seal::KeyError),
    /// Encryption is on but no key file is configured.
    #[error(
        "sync encryption is on (the default) but no security.key_file is set: create a key with \
         `nicsync key gen FILE`, copy it to every member (mode 0600) and set security.key_file = \"FILE\"; \
         or set security.encryption = false to run the sync traffic in clear"
    )]
    NoKeyFile,
    /// The configured key file does not exist.
    #[error(
        "security.key_file {0} does not exist: create the cluster key with `nicsync key gen {0}` on one member \
         and copy it (mode 0600) to the same path on every member"
    )]
    KeyFileMissing(String),
}

/// The sealing a configuration asks for: `None` when encryption is off
/// (with a warning), the keys and this start's boot number otherwise.
pub fn seal_from_config(cfg: &Config) -> Result<Option<SealConfig>, MemberError> {
    if !cfg.security.encryption {
        tracing::warn!(
            member = cfg.member_id,
            "security.encryption = false: Delta Sync, membership and Full Sync run IN CLEAR; anyone who can reach \
             the sync network can read and rewrite this member's connection table"
        );
        return Ok(None);
    }
    let key_file = cfg.security.key_file.as_ref().ok_or(MemberError::NoKeyFile)?;
    if !key_file.exists() {
        return Err(MemberError::KeyFileMissing(key_file.display().to_string()));
    }
    let ring = Keyring::load(key_file)?;
    let boot = next_boot(cfg.security.boot_file_for(cfg.member_id).as_deref())?;
    tracing::info!(
        member = cfg.member_id,
        "sync security: AES-256-GCM, send key {} (fingerprint {}), {} key(s) accepted, boot {boot}",
        ring.send_key().id(),
        ring.send_key().fingerprint(),
        ring.keys().len()
    );
    Ok(Some(SealConfig { keys: SharedKeyring::new(ring), boot }))
}

/// What `nicsync daemon --check` finds: the configuration parsed and
/// checked (done by the caller), the key file there, private and
/// well formed, the boot file's directory there, and the control socket's
/// one there or creatable (the daemon creates it, as systemd's
/// `RuntimeDirectory=` does `/run/nicsync` only when the service starts).
/// Nothing is written (the boot number is not taken). Returns one line
/// that says what this member would be.
pub fn check_config(cfg: &Config) -> Result<String, MemberError> {
    let dir_of = |path: &std::path::Path| {
        path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")).to_path_buf()
    };
    let not_a_dir = |what: &str, path: &std::path::Path, dir: &std::path::Path| {
        MemberError::Unsupported(format!("{what} {}: {} is not a directory", path.display(), dir.display()))
    };
    // The nearest part of the socket's directory that exists must be one.
    let socket_dir = dir_of(&cfg.control.socket);
    if let Some(existing) = socket_dir.ancestors().find(|d| d.exists()) {
        if !existing.is_dir() {
            return Err(not_a_dir("control.socket", &cfg.control.socket, existing));
        }
    }
    let security = if cfg.security.encryption {
        let key_file = cfg.security.key_file.as_ref().ok_or(MemberError::NoKeyFile)?;
        if !key_file.exists() {
            return Err(MemberError::KeyFileMissing(key_file.display().to_string()));
        }
        let ring = Keyring::load(key_file)?;
        // The boot file's directory is not created: it must be there.
        if let Some(boot) = cfg.security.boot_file_for(cfg.member_id) {
            let dir = dir_of(&boot);
            if !dir.is_dir() {
                return Err(not_a_dir("security.boot_file", &boot, &dir));
            }
        }
        format!(
            "sealed with key {} (fingerprint {}), {} key(s) accepted",
            ring.send_key().id(),
            ring.send_key().fingerprint(),
            ring.keys().len()
        )
    } else {
        "sync traffic IN CLEAR (security.encryption = false)".to_string()
    };
    let peers: Vec<String> = cfg.peers.iter().map(|p| p.id.to_string()).collect();
    Ok(format!(
        "configuration OK: member {} of cluster {} ({}), peers [{}], source {}, {security}",
        cfg.member_id,
        cfg.cluster_id,
        cfg.mode.as_str(),
        peers.join(", "),
        cfg.source.as_str()
    ))
}

/// The seed of the card's table hash for a member sealed with `seal`: the
/// cluster key's (`ClusterKey::table_hash_seed`), the same on every member
/// that holds the key, so that a Full Sync arrives in the order the
/// joiner's card and copy store it. `None` (a member in clear): the driver
/// picks a random seed, which no sender of traffic can guess, at the cost
/// of that order (a Full Sync then writes the joiner's copy at random).
pub fn cluster_table_hash_seed(seal: Option<&SealConfig>) -> Option<nicsync_fwif::hash::TableHashSeed> {
    seal.map(|s| nicsync_fwif::hash::TableHashSeed(s.keys.get().send_key().table_hash_seed()))
}

/// A random non-zero number for this process start (epoch, incarnation).
pub fn entropy() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let addr = &t as *const u64 as u64;
    epoch_from_entropy(t ^ (u64::from(std::process::id()) << 32) ^ addr.rotate_left(17))
}

/// An emulated device with its sync unit on `port`, brought up and
/// wrapped in a [`Node`]. The device is in `mode`; in Thread mode it has
/// its own thread for the bring-up only, and the caller serves it after (a
/// [`nicsync_model::Poller`] shared by several devices, or
/// [`EmulatedDevice::start_poller_with`]).
pub fn emulated_node(
    node_cfg: NodeConfig,
    port: Box<dyn SyncPort>,
    drv: DriverConfig,
    mode: ExecMode,
    now: u64,
) -> Result<Node<EmulatedDevice>, MemberError> {
    let model = ModelConfig { virtual_clock: mode == ExecMode::Inline, ..Default::default() };
    let dev = EmulatedDevice::new(model, mode)?;
    let mut sender = SenderConfig::new(node_cfg.cluster_id, node_cfg.member_id, node_cfg.incarnation);
    sender.queue_capacity = RETRANSMIT_QUEUE;
    let port: Box<dyn SyncPort> = match &node_cfg.seal {
        Some(seal) => Box::new(SealedPort::new(port, seal, &node_cfg.peers)),
        None => port,
    };
    let unit = SyncUnit::new(SyncUnitConfig { sender, peers: node_cfg.peers.clone() }, port, 0)?;
    dev.nic().attach_sync(unit);
    // Bring-up needs the device running; a shared poller takes over after.
    if mode == ExecMode::Thread {
        dev.start_poller_with(None, Idle::Nap { after_sweeps: 16, nap: Duration::from_micros(50) })?;
    }
    // A member holds its peers' updates from its first frame (Node::new).
    let table_hash_seed = drv.table_hash_seed.or_else(|| cluster_table_hash_seed(node_cfg.seal.as_ref()));
    let table = ConnTable::open(dev, DriverConfig { sync_hold_at_enable: true, table_hash_seed, ..drv })?;
    let node = Node::new(table, node_cfg, now)?;
    if mode == ExecMode::Thread {
        node.table_ref().driver_ref().device().stop_poller();
    }
    Ok(node)
}

/// The node, network and control settings a daemon configuration names.
/// The emulated device gets its own polling thread that naps when idle
/// (several members may share a small machine).
pub fn from_config(cfg: &Config) -> Result<(Node<AnyDevice>, MemberNet, ControlSocket), MemberError> {
    let inc = entropy();
    let peers: Vec<u16> = cfg.peers.iter().map(|p| p.id).collect();
    let mut nc = NodeConfig::new(cfg.cluster_id, cfg.member_id, peers.clone(), inc);
    nc.mode = match cfg.mode {
        ClusterMode::HighAvailability => Mode::HighAvailability,
        ClusterMode::LoadSharing => Mode::LoadSharing,
    };
    nc.probe_interval_ns = cfg.membership.probe_interval.as_nanos() as u64;
    nc.dead_after = cfg.membership.dead_after;
    nc.chunk_records = cfg.full_sync.chunk_records;
    nc.full_sync_timeout_ns = cfg.full_sync.timeout.as_nanos() as u64;
    nc.seal = seal_from_config(cfg)?;
    nc.key_file = cfg.security.key_file.clone().filter(|_| nc.seal.is_some());
    let drv = DriverConfig {
        table_capacity: cfg.device.table_capacity,
        aging_period_ms: cfg.device.aging_period_ms,
        // The loop learns of the peers' updates when the card writes them.
        event_interrupts: true,
        // The largest event ring: a Standby's card writes an event per
        // peer update, 200,000 a second in a flood; a ring of 1,024
        // overflowed within milliseconds, and every overflow makes the
        // host's copy walk the whole card to find what it missed.
        evt_ring_log2: nicsync_fwif::regs::MAX_LOG2_RING,
        // A member holds its peers' updates from its first frame: it pulls
        // a Full Sync (or seeds) before it applies any (see Node::new).
        sync_hold_at_enable: true,
        table_hash_seed: cluster_table_hash_seed(nc.seal.as_ref()),
        // A member syncs (SYNC_HOLD, REPLICA writes, SYNC_RECORDS walks)
        // and carries NAT translations (a conntrack source's): a card
        // without them is refused at probe, by name, not sent commands it
        // does not define (abi.md 3).
        required_caps: DriverConfig::default().required_caps
            | nicsync_fwif::regs::Capabilities::SYNC
            | nicsync_fwif::regs::Capabilities::NAT
            | nicsync_fwif::regs::Capabilities::EVENTS,
        ..Default::default()
    };
    let node = match &cfg.device.kind {
        DeviceKind::Emulated => {
            let model = ModelConfig { max_capacity: cfg.device.table_capacity.max(1 << 16), ..Default::default() };
            let dev = EmulatedDevice::new(model, ExecMode::Thread)?;
            let mut udp = UdpConfig::new(cfg.member_id).bind_to(cfg.sync.bind);
            for p in &cfg.peers {
                udp = udp.member_peer(p.id, p.sync);
            }
            let port: Box<dyn SyncPort> = match &nc.seal {
                Some(seal) => Box::new(SealedPort::new(Box::new(UdpPort::bind(udp)?), seal, &peers)),
                None => Box::new(UdpPort::bind(udp)?),
            };
            let mut sender = SenderConfig::new(cfg.cluster_id, cfg.member_id, inc);
            sender.queue_capacity = RETRANSMIT_QUEUE;
            // A lone change leaves at once; under load frames still fill.
            sender.flush_when_idle = true;
            let unit = SyncUnit::new(SyncUnitConfig { sender, peers }, port, 0)?;
            dev.nic().attach_sync(unit);
            // Interrupt-driven when idle: asleep until a doorbell, a sync
            // frame or the next timer, so an idle member costs almost no
            // CPU and a change wakes it within microseconds.
            // It sleeps after one idle sweep (256 polls, tens of
            // microseconds): on a machine with fewer cores than busy
            // threads, a device still spinning after its work is done takes
            // the CPU its host and its peers need next (64 sweeps made a
            // single connection's trip to the peer 3 to 13 times slower).
            let idle = dev.waiting_idle(1, Duration::from_millis(1));
            dev.start_poller_with(None, idle)?;
            let mut table = ConnTable::open(AnyDevice::Emulated(dev), drv)?;
            if cfg.device.fault_recovery {
                table.enable_recovery(RecoveryConfig { member: cfg.member_id, ..Default::default() })?;
            }
            Node::new(table, nc, 0)?
        }
        DeviceKind::Vfio { bdf } => {
            // The sync port of a real card is configured by its firmware
            // (no ABI register block for it yet): the host side runs as is.
            let spec: nicsync_vfio::DeviceSpec = bdf.parse().map_err(MemberError::Unsupported)?;
            let dev = crate::device::open(&spec, &Default::default())?;
            tracing::warn!(
                "VFIO device {}: its sync port is configured by the card's firmware; sync.bind and the peers' sync addresses are not programmed",
                dev.describe()
            );
            let mut table = ConnTable::open(dev, drv)?;
            if cfg.device.fault_recovery {
                table.enable_recovery(RecoveryConfig { member: cfg.member_id, ..Default::default() })?;
            }
            Node::new(table, nc, 0)?
        }
    };
    let net = MemberNet {
        ccp_bind: cfg.membership.bind,
        fs_bind: cfg.full_sync.bind,
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerNet { id: p.id, ccp: p.membership, full_sync: p.full_sync.clone() })
            .collect(),
    };
    let ctl = ControlSocket {
        path: cfg.control.socket.clone(),
        mode: cfg.control.socket_mode,
        allow_uids: cfg.control.allow_uids.clone(),
    };
    Ok((node, net, ctl))
}

/// Each thread of process `pid`: its name and nice value, read from
/// `/proc/PID/task/*/stat` (field 19, counted after the name in
/// parentheses, which may hold spaces); `None` where a line does not parse.
/// How a deployment, or a bench, checks that `nice` took effect.
pub fn thread_nice_values(pid: u32) -> std::io::Result<Vec<(String, Option<i32>)>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(t?.path().join("stat"))?;
        let name = stat.split(['(', ')']).nth(1).unwrap_or("?").to_owned();
        let nice = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().nth(16)).and_then(|v| v.parse().ok());
        out.push((name, nice));
    }
    Ok(out)
}

/// Runs the member a configuration describes until SIGINT or SIGTERM,
/// which stop it in order (a second one at once).
pub fn run_daemon(cfg: &Config) -> anyhow::Result<()> {
    // Before any thread starts: each inherits it.
    if let Some(n) = cfg.nice {
        crate::sys::set_nice(n).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    " (a value below the current one needs root, CAP_SYS_NICE or an RLIMIT_NICE that allows it)"
                }
                _ => "",
            };
            anyhow::anyhow!("nice = {n}: cannot set the daemon's scheduling priority: {e}{hint}")
        })?;
    }
    let (mut node, net, ctl) = from_config(cfg)?;
    tracing::info!(
        member = cfg.member_id,
        "nicsync daemon: cluster {} mode {}, sync {}, membership {}, full sync {}, control {}",
        cfg.cluster_id,
        cfg.mode.as_str(),
        cfg.sync.bind,
        cfg.membership.bind,
        cfg.full_sync.bind,
        cfg.control.socket.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let stats = local.block_on(&rt, async {
        // Stop signals: the first stops the member in order (its peers
        // acknowledge its changes, then it announces itself Down), a
        // second at once (runtime::OrderlyStop).
        use anyhow::Context as _;
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let (tx, signals) = tokio::sync::mpsc::unbounded_channel();
        tokio::task::spawn_local(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
        let orderly = crate::runtime::OrderlyStop { signals, drain: cfg.sync.stop_drain };
        let kernel = match cfg.source {
            TableSource::Conntrack => {
                let binds = [cfg.sync.bind, cfg.membership.bind, cfg.full_sync.bind];
                let mut peers = Vec::new();
                for p in &cfg.peers {
                    peers.extend([p.sync, p.membership]);
                    peers.extend(p.full_sync.iter().copied());
                }
                Some(KernelLink::open(cfg.conntrack.clone(), &binds, &peers)?)
            }
            TableSource::Control => None,
        };
        let sockets = crate::runtime::MemberSockets::bind(&net)?;
        crate::runtime::serve_with(
            &mut node,
            sockets,
            &net,
            Some(&ctl),
            None,
            crate::runtime::DaemonInputs { kernel, orderly: Some(orderly) },
            std::future::pending(),
        )
        .await
        .map_err(anyhow::Error::from)
    })?;
    let stats = serde_json::to_string(&stats).unwrap_or_else(|e| format!("({e})"));
    tracing::info!(member = cfg.member_id, "nicsync daemon stopped; its sockets' counters: {stats}");
    Ok(())
}
