//! Drives a [`Node`] with tokio: membership over UDP, Full Sync over TCP,
//! and the control socket. Delta Sync does not pass through here: the
//! device's sync unit has its own port.
//!
//! Everything runs on one thread (a current-thread runtime with a
//! `LocalSet`): the node is touched only by the loop in [`serve`], and the
//! socket tasks talk to it through a channel. The device's polling thread
//! is the only other thread, so a member needs two cores at most.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nicsync_fwif::conn::{ConnFlags, ConnState, Direction, TcpState};
use nicsync_fwif::regs::Counter;
use nicsync_vfio::NicDevice;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::control::{self, Reply, Request, MAX_REQUEST_BYTES};
use crate::ctsync::{KernelLink, LinkWake};
use crate::membership::{Destination, MemberState};
use crate::node::{ConnId, Nanos, Node, NodeOutput};
use crate::shadow::KeyHasher;
use crate::table::{ConnEntry, TableError};

/// Where a member listens and how it reaches its peers.
#[derive(Clone, Debug)]
pub struct MemberNet {
    /// Membership (probe) UDP socket.
    pub ccp_bind: SocketAddr,
    /// Full Sync TCP listener.
    pub fs_bind: SocketAddr,
    /// The peers.
    pub peers: Vec<PeerNet>,
}

/// A peer's addresses.
#[derive(Clone, Debug)]
pub struct PeerNet {
    /// Member id.
    pub id: u16,
    /// Its membership socket.
    pub ccp: SocketAddr,
    /// Its Full Sync listeners, tried in order.
    pub full_sync: Vec<SocketAddr>,
}

/// The control socket's settings.
#[derive(Clone, Debug)]
pub struct ControlSocket {
    /// Path.
    pub path: PathBuf,
    /// File mode.
    pub mode: u32,
    /// Users allowed besides the daemon's own.
    pub allow_uids: Vec<u32>,
}

/// Why the member stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A socket could not be set up.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Its address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Another daemon owns the control socket.
    #[error("control socket {0} is in use by a running daemon")]
    ControlInUse(String),
    /// A second stop signal cut an orderly stop short.
    #[error(
        "stopped by a second signal before every peer acknowledged this member's changes ({0} unacknowledged: \
         they may be lost if this member held the only copy)"
    )]
    StopCutShort(u64),
}

/// Counters of the runtime's own sockets.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NetStats {
    /// Membership datagrams from addresses that are no configured peer.
    pub ccp_unknown_source: u64,
    /// Membership datagrams that could not be sent.
    pub ccp_send_errors: u64,
    /// Membership datagrams read without the kernel's receive stamp (taken
    /// as arriving when read; `SO_TIMESTAMPNS` refused, or the stamp
    /// missing).
    pub ccp_unstamped: u64,
    /// Full Sync connections that could not be opened.
    pub fs_connect_failures: u64,
    /// Full Sync connections closed for want of room: at their accept,
    /// [`MAX_FS_INBOUND`] being open already and none idle, or idle (no
    /// REQUEST yet) to make room for a new one.
    pub fs_refused: u64,
    /// Accepts that failed on the Full Sync listener or the control socket
    /// (out of descriptors, mostly); the listener then rests for
    /// [`ACCEPT_REST`].
    pub accept_errors: u64,
    /// Control requests refused (bad JSON, too long, user not allowed).
    pub control_refused: u64,
    /// Control requests read whole at their connection's accept, on the
    /// loop's turn (the others are read by a task of their own).
    pub control_inline: u64,
    /// When each kind of trouble was last warned of (not a counter).
    #[serde(skip)]
    warned: Warned,
}

/// Trouble that every datagram would repeat (a misconfigured peer, an
/// unreachable address) is warned of at most once per
/// [`crate::node::REFUSAL_WARN_EVERY_NS`], with the count so far.
#[derive(Clone, Debug, Default)]
struct Warned {
    unknown_source: Option<std::time::Instant>,
    send_error: Option<std::time::Instant>,
    fs_refused: Option<std::time::Instant>,
    accept_error: Option<std::time::Instant>,
}

/// Whether a warning last given at `last` may be given again now (and
/// notes it given).
fn warn_due(last: &mut Option<std::time::Instant>) -> bool {
    let every = Duration::from_nanos(crate::node::REFUSAL_WARN_EVERY_NS);
    if last.is_some_and(|t| t.elapsed() < every) {
        return false;
    }
    *last = Some(std::time::Instant::now());
    true
}

enum Ev {
    Connected { conn: ConnId, stream: FsStream },
    Data { conn: ConnId, bytes: Vec<u8> },
    Closed { conn: ConnId },
    Control { req: Request, reply: oneshot::Sender<Reply> },
    ControlRefused,
}

impl Ev {
    /// What a loop turn on this event does, for the slow-turn log.
    fn what(&self) -> &'static str {
        match self {
            Ev::Connected { .. } => "full sync connected",
            Ev::Data { .. } => "full sync data",
            Ev::Closed { .. } => "full sync closed",
            Ev::Control { .. } => "control request",
            Ev::ControlRefused => "control refused",
        }
    }
}

/// A loop turn longer than this is logged (debug).
const SLOW_TURN: Duration = Duration::from_millis(20);

/// Sockets a member serves on, bound beforehand (so that an in-process
/// cluster can use ephemeral ports and tell each member the others').
#[derive(Debug)]
pub struct MemberSockets {
    /// Membership datagrams.
    pub ccp: std::net::UdpSocket,
    /// Full Sync listener.
    pub fs: std::net::TcpListener,
}

impl MemberSockets {
    /// Binds both sockets of `net`.
    pub fn bind(net: &MemberNet) -> Result<Self, RuntimeError> {
        let ccp = std::net::UdpSocket::bind(net.ccp_bind).map_err(|source| RuntimeError::Bind {
            what: "membership UDP socket",
            addr: net.ccp_bind.to_string(),
            source,
        })?;
        let fs = std::net::TcpListener::bind(net.fs_bind).map_err(|source| RuntimeError::Bind {
            what: "full sync TCP listener",
            addr: net.fs_bind.to_string(),
            source,
        })?;
        Ok(MemberSockets { ccp, fs })
    }
}

/// Called every millisecond with the node (an in-process cluster drives
/// its workload through it).
pub type TickHook<'a, D> = Box<dyn FnMut(&mut Node<D>, Nanos) + 'a>;

/// Runs `node` until `shutdown` completes. Must run inside a
/// `tokio::task::LocalSet`.
pub async fn serve<D: NicDevice + 'static>(
    node: &mut Node<D>,
    net: &MemberNet,
    control: Option<&ControlSocket>,
    shutdown: impl Future<Output = ()>,
) -> Result<NetStats, RuntimeError> {
    let sockets = MemberSockets::bind(net)?;
    serve_on(node, sockets, net, control, None, shutdown).await
}

/// [`serve`] on sockets bound beforehand, with an optional tick hook.
pub async fn serve_on<D: NicDevice + 'static>(
    node: &mut Node<D>,
    sockets: MemberSockets,
    net: &MemberNet,
    control: Option<&ControlSocket>,
    hook: Option<TickHook<'_, D>>,
    shutdown: impl Future<Output = ()>,
) -> Result<NetStats, RuntimeError> {
    serve_with(node, sockets, net, control, hook, DaemonInputs::default(), shutdown).await
}

/// What a daemon adds to a member's loop ([`serve_with`]).
#[derive(Debug, Default)]
pub struct DaemonInputs {
    /// The kernel's connection tracking as the table's source and sink
    /// (`source = "conntrack"`).
    pub kernel: Option<KernelLink>,
    /// Stop signals that stop the member in order.
    pub orderly: Option<OrderlyStop>,
}

/// A daemon's stop signals ([`serve_with`]): each message on `signals` is
/// one (SIGTERM, SIGINT). The first starts an orderly stop
/// ([`Node::begin_stop`], the peers given up to `drain` to acknowledge this
/// member's changes, then Down announced); a second stops at once.
#[derive(Debug)]
pub struct OrderlyStop {
    /// One message per stop signal.
    pub signals: mpsc::UnboundedReceiver<()>,
    /// The longest wait for the peers' acknowledgements.
    pub drain: Duration,
}

/// The next stop signal; never, without an [`OrderlyStop`] or once its
/// sender is gone.
async fn stop_signal(orderly: &mut Option<OrderlyStop>) {
    match orderly.as_mut() {
        Some(o) => {
            if o.signals.recv().await.is_none() {
                *orderly = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// [`serve_on`], with a daemon's inputs: the kernel's connection tracking
/// and stop signals that stop the member in order (`shutdown` still stops
/// it at once).
pub async fn serve_with<D: NicDevice + 'static>(
    node: &mut Node<D>,
    sockets: MemberSockets,
    net: &MemberNet,
    control: Option<&ControlSocket>,
    mut hook: Option<TickHook<'_, D>>,
    inputs: DaemonInputs,
    shutdown: impl Future<Output = ()>,
) -> Result<NetStats, RuntimeError> {
    let DaemonInputs { mut kernel, mut orderly } = inputs;
    let mut cut_short = None;
    let start = Instant::now();
    let now = || start.elapsed().as_nanos() as Nanos;
    let setup = |what: &'static str, addr: String| move |source| RuntimeError::Bind { what, addr, source };
    sockets.ccp.set_nonblocking(true).map_err(setup("membership UDP socket", net.ccp_bind.to_string()))?;
    sockets.fs.set_nonblocking(true).map_err(setup("full sync TCP listener", net.fs_bind.to_string()))?;
    let ccp = UdpSocket::from_std(sockets.ccp).map_err(setup("membership UDP socket", net.ccp_bind.to_string()))?;
    // A peer counts as heard when its datagram arrived, not when this loop
    // read it: after a stall of the loop, a peer that died meanwhile is not
    // kept alive by its last probes (membership's `handle_datagram_received`).
    if let Err(e) = crate::sys::enable_receive_stamps(&ccp) {
        tracing::warn!(member = node.member_id(), "membership datagrams without receive stamps: {e}");
    }
    // Room for the peers' probes through a stall of the loop of seconds: a
    // full buffer drops the newest, and a member that reads only the
    // oldest after a stall acts on a stale view (docs/cluster.md).
    match crate::sys::set_receive_buffer(&ccp, CCP_RECEIVE_BUFFER) {
        Ok(granted) if granted < CCP_RECEIVE_BUFFER => tracing::warn!(
            member = node.member_id(),
            "membership socket: receive buffer of {granted} bytes (net.core.rmem_max), less than the {CCP_RECEIVE_BUFFER} asked for"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(member = node.member_id(), "membership socket: receive buffer not set: {e}"),
    }
    let fs = TcpListener::from_std(sockets.fs).map_err(setup("full sync TCP listener", net.fs_bind.to_string()))?;
    let ctl = match control {
        Some(c) => Some(bind_control(c).await?),
        None => None,
    };
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Ev>();
    let mut conns: HashMap<ConnId, FsStream> = HashMap::new();
    let mut next_inbound: ConnId = FIRST_INBOUND;
    // After an accept fails (out of descriptors), the listeners rest until
    // then rather than fail again at once, turn after turn.
    let mut fs_rest: Option<tokio::time::Instant> = None;
    let mut control_rest: Option<tokio::time::Instant> = None;
    let mut stats = NetStats::default();
    let by_addr: HashMap<SocketAddr, u16> = net.peers.iter().map(|p| (canonical(p.ccp), p.id)).collect();
    let mut buf = vec![0u8; 65_536];
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    let own_uid = current_uid();
    let mut last_tick = Instant::now();
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut walks = TableWalks::default();
    if let Some(k) = kernel.as_ref() {
        node.record_peer_changes(k.mirrors());
    }
    // The device interrupts when it writes an event (a peer's update
    // applied): the loop reads the event ring at once, not at its tick.
    let events_irq = crate::irq::AsyncEvents::new(node.table_ref().driver_ref());
    let device_input = crate::irq::AsyncInput::new(node.table_ref().driver_ref());
    // What the loop's last turn did and when it began: a turn that holds
    // the loop long is named in the log (peers take a member whose loop
    // stops for dead_after probes for dead).
    let mut turn: (&'static str, Instant) = ("", Instant::now());
    let tokio_start = tokio::time::Instant::from_std(start);
    let timer = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(timer);
    let mut timer_at: Option<tokio::time::Instant> = None;
    loop {
        let took = turn.1.elapsed();
        if !turn.0.is_empty() && took > SLOW_TURN {
            tracing::debug!(
                member = node.member_id(),
                "host loop: a turn ({}) took {:.1} ms",
                turn.0,
                took.as_secs_f64() * 1e3
            );
        }
        turn.0 = "";
        // Membership first when its timer is due, whatever else is ready:
        // a loop kept busy by one source (a conntrack dump, a flood of sync
        // frames) still probes and judges its peers on time, or its peers
        // take it for dead. Seen here: 240 ms without a probe while a dump
        // kept the loop busy, past the conntrack bench's 200 ms dead window.
        // One reading for the timers and the stop: a probe due before the
        // stop's linger ends is sent before the loop ends (it repeats the
        // stop's Down announcement).
        let turn_start = now();
        if node.membership().poll_timeout().is_some_and(|t| t <= turn_start) {
            turn = ("timers", Instant::now());
            drain_ccp(node, &ccp, &by_addr, &mut buf, &mut stats, now());
            node.handle_timeout(now());
        }
        if flush_outputs(node, net, &ccp, &mut conns, &ev_tx, &mut stats) {
            // Stream bytes go out through writer tasks on this thread: let
            // them run before this loop takes its next event, or a Full
            // Sync chunk's acknowledgement would wait for the chunk's
            // writing to the card (a few ms), and the source with it.
            tokio::task::yield_now().await;
        } else if node.table_ref().load_posted() {
            // The card is writing a Full Sync slice: the other tasks on
            // this thread (stream readers, a member served from here) run
            // meanwhile, before the loop comes back to take it in.
            tokio::task::yield_now().await;
        }
        let stopped = node.stop_progress(turn_start);
        if node.is_stopping() {
            // The Down announcement leaves now, not after the next wake.
            flush_outputs(node, net, &ccp, &mut conns, &ev_tx, &mut stats);
        }
        if let Some(r) = stopped {
            tracing::info!(
                member = node.member_id(),
                "orderly stop: done ({:.1} ms to announce Down, {} changes unacknowledged)",
                r.drain_ns as f64 / 1e6,
                r.unacked
            );
            break;
        }
        let next = match (node.poll_timeout(), kernel.as_ref().and_then(KernelLink::poll_timeout)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // One timer, moved only when the deadline moves: a new one each turn
        // made tokio re-register it and wake its own reactor (an eventfd
        // write and an extra turn) every time round the loop.
        let deadline = match next {
            Some(t) => tokio_start + Duration::from_nanos(t),
            None => timer_at
                .filter(|d| *d > tokio::time::Instant::now())
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1)),
        };
        if timer_at != Some(deadline) {
            timer.as_mut().reset(deadline);
            timer_at = Some(deadline);
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = stop_signal(&mut orderly) => {
                if let Some(unacked) = node.stop_cut_short() {
                    tracing::warn!(
                        member = node.member_id(),
                        "a second stop signal: stopping at once, {unacked} of this member's changes not acknowledged by every peer"
                    );
                    cut_short = (unacked > 0).then_some(unacked);
                    break;
                }
                let drain = orderly.as_ref().map_or(Duration::ZERO, |o| o.drain);
                // The delay's held connections first: they are among the
                // changes the peers must acknowledge before Down.
                if let Some(k) = kernel.as_mut() {
                    k.release_held(node);
                }
                node.begin_stop(now(), drain.as_nanos() as Nanos);
            }
            wake = kernel_wake(&mut kernel) => {
                turn = ("conntrack", Instant::now());
                if let Some(k) = kernel.as_mut() {
                    k.handle(wake, node, now());
                }
            }
            _ = device_events(events_irq.as_ref()) => {
                turn = ("device events", Instant::now());
                node.progress(now());
                after_progress(node, &mut kernel, &mut waiters);
            }
            _ = device_input_ready(device_input.as_ref()) => {
                turn = ("sync frames", Instant::now());
                if node.table_ref().driver_ref().device().take_input() {
                    node.progress(now());
                    after_progress(node, &mut kernel, &mut waiters);
                }
            }
            r = ccp.async_io(Interest::READABLE, || crate::sys::recv_stamped(&ccp, &mut buf)) => {
                turn = ("membership", Instant::now());
                if let Ok(d) = r {
                    take_ccp(node, &by_addr, &buf, d, &mut stats, (now(), std::time::SystemTime::now()));
                }
            }
            r = fs.accept(), if fs_rest.is_none() => match r {
                Ok((stream, from)) => {
                    turn = ("full sync accept", Instant::now());
                    let inbound = |conns: &HashMap<ConnId, FsStream>| conns.keys().filter(|c| **c >= FIRST_INBOUND).count();
                    if inbound(&conns) >= MAX_FS_INBOUND {
                        // Room is made by closing the oldest stream that
                        // has not brought its REQUEST: idle connections
                        // cannot keep joiners out.
                        if let Some(idle) = node.fs_oldest_idle_inbound() {
                            stats.fs_refused += 1;
                            node.fs_closed(idle, now());
                            if let Some(s) = conns.remove(&idle) {
                                s.close();
                            }
                        }
                    }
                    if inbound(&conns) >= MAX_FS_INBOUND {
                        // Dropped at once: a member serves few joiners at
                        // a time, and each held stream is a descriptor.
                        stats.fs_refused += 1;
                        if warn_due(&mut stats.warned.fs_refused) {
                            tracing::warn!(
                                member = node.member_id(),
                                "full sync: connection from {from} refused, {MAX_FS_INBOUND} already open ({} refused so far)",
                                stats.fs_refused
                            );
                        }
                    } else {
                        let conn = next_inbound;
                        next_inbound += 1;
                        conns.insert(conn, spawn_stream(conn, stream, ev_tx.clone()));
                        node.fs_accepted(conn, now());
                    }
                }
                Err(e) => {
                    stats.accept_errors += 1;
                    fs_rest = Some(tokio::time::Instant::now() + ACCEPT_REST);
                    if warn_due(&mut stats.warned.accept_error) {
                        tracing::warn!(member = node.member_id(), "full sync listener: accept failed: {e} ({} accept errors so far)", stats.accept_errors);
                    }
                }
            },
            () = rest_until(fs_rest), if fs_rest.is_some() => fs_rest = None,
            () = rest_until(control_rest), if control_rest.is_some() => control_rest = None,
            r = accept_control(&ctl), if control_rest.is_none() => {
                let r = match r {
                    Ok(s) => Some(s),
                    Err(e) => {
                        stats.accept_errors += 1;
                        control_rest = Some(tokio::time::Instant::now() + ACCEPT_REST);
                        if warn_due(&mut stats.warned.accept_error) {
                            tracing::warn!(member = node.member_id(), "control socket: accept failed: {e} ({} accept errors so far)", stats.accept_errors);
                        }
                        None
                    }
                };
                if let Some(stream) = r {
                    turn = ("control request", Instant::now());
                    let allow = control.map_or(&[][..], |c| c.allow_uids.as_slice());
                    let asked = Asked { own_uid, allow };
                    if let Some((stream, pending)) = answer_inline(stream, asked, node, kernel.as_ref(), &mut stats, now()) {
                        tokio::task::spawn_local(control_client(stream, pending, ev_tx.clone()));
                    }
                }
            }
            Some(ev) = ev_rx.recv() => { turn = (ev.what(), Instant::now()); match ev {
                Ev::Connected { conn, stream } => {
                    conns.insert(conn, stream);
                    node.fs_connected(conn, now());
                }
                Ev::Data { conn, bytes } => node.fs_data(conn, &bytes, now()),
                Ev::Closed { conn } => {
                    if let Some(s) = conns.remove(&conn) {
                        s.close();
                    }
                    node.fs_closed(conn, now());
                }
                Ev::Control { req: Request::ConnWait { key, timeout_ms }, reply } => {
                    match control::parse_key(&key) {
                        Ok(k) => match node.table().lookup(&k) {
                            Ok(Some(r)) => {
                                let _ = reply.send(wait_answer(&key, &r));
                            }
                            Ok(None) => {
                                // (At most MAX_WAIT_MS: parse_request_line.)
                                let limit = Duration::from_millis(timeout_ms);
                                waiters.push(Waiter { key: k, text: key, deadline: Instant::now() + limit, limit, reply });
                                node.record_peer_changes(true);
                            }
                            Err(e) => {
                                let _ = reply.send(Reply::err(e.to_string()));
                            }
                        },
                        Err(e) => {
                            let _ = reply.send(Reply::err(e.to_string()));
                        }
                    }
                }
                Ev::Control { req: Request::ConnDigest, reply } => walks.start(WalkKind::digest(), reply),
                Ev::Control { req: Request::ConnList { limit }, reply } => {
                    walks.start(WalkKind::list(limit.unwrap_or(usize::MAX)), reply)
                }
                Ev::Control { req, reply } => {
                    let _ = reply.send(handle_request(node, kernel.as_ref(), &req, &stats, now()));
                }
                Ev::ControlRefused => stats.control_refused += 1,
            }},
            _ = &mut timer => {
                timer_at = None;
                turn = ("timers", Instant::now());
                // What the peers sent while this loop was held up is read
                // before their silence is judged: a member whose own loop
                // stalled must not take its peers for dead (and take over).
                drain_ccp(node, &ccp, &by_addr, &mut buf, &mut stats, now());
                node.handle_timeout(now());
            }
            _ = tick.tick() => {
                turn = ("tick", Instant::now());
                let gap = last_tick.elapsed();
                last_tick = Instant::now();
                if gap > Duration::from_millis(20) {
                    tracing::debug!(member = node.member_id(), "host loop late by {:.1} ms", gap.as_secs_f64() * 1e3);
                }
                if let Some(h) = hook.as_mut() {
                    h(node, now());
                }
                let t0 = Instant::now();
                node.progress(now());
                let t_progress = t0.elapsed();
                if let Some(k) = kernel.as_mut() {
                    k.tick(node, now());
                }
                let t_kernel = t0.elapsed();
                after_progress(node, &mut kernel, &mut waiters);
                let t_after = t0.elapsed();
                walks.step(node);
                let took = t0.elapsed();
                if took > SLOW_TURN {
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    tracing::debug!(
                        member = node.member_id(),
                        "tick took {:.1} ms: progress {:.1}, conntrack {:.1}, waiters {:.1}, walks {:.1}",
                        ms(took),
                        ms(t_progress),
                        ms(t_kernel - t_progress),
                        ms(t_after - t_kernel),
                        ms(took - t_after)
                    );
                }
            }
        }
    }
    if let Some(c) = control {
        let _ = std::fs::remove_file(&c.path);
    }
    match cut_short {
        Some(unacked) => Err(RuntimeError::StopCutShort(unacked)),
        None => Ok(stats),
    }
}

/// What a walk of the card answers, and what it gathers to answer it.
enum WalkKind {
    /// `conn digest`: count and sum of the entries marked for sync, kept
    /// as the walk goes (the digest of a million entries at the end held
    /// the loop for 50 ms), with what each key added, so that a later copy
    /// of an entry (a walk may return one that moved twice) replaces it.
    Digest { count: u64, sum: u64, counted: HashMap<nicsync_fwif::conn::ConnKey, u64, KeyHasher> },
    /// `conn list`: at most `limit` of them, in key order, each once (the
    /// later copy stays).
    List {
        limit: usize,
        entries: Vec<nicsync_fwif::sync::DeltaUpdate>,
        index: HashMap<nicsync_fwif::conn::ConnKey, usize, KeyHasher>,
    },
}

impl WalkKind {
    fn digest() -> Self {
        WalkKind::Digest { count: 0, sum: 0, counted: HashMap::default() }
    }

    fn list(limit: usize) -> Self {
        WalkKind::List { limit, entries: Vec::new(), index: HashMap::default() }
    }

    /// The same request, nothing gathered (a walk starting again).
    fn fresh(&self) -> Self {
        match self {
            WalkKind::Digest { .. } => WalkKind::digest(),
            WalkKind::List { limit, .. } => WalkKind::list(*limit),
        }
    }

    /// Entries gathered.
    fn len(&self) -> usize {
        match self {
            WalkKind::Digest { counted, .. } => counted.len(),
            WalkKind::List { entries, .. } => entries.len(),
        }
    }
}

/// A `conn digest` or `conn list` being answered.
struct TableWalk {
    kind: WalkKind,
    cursor: u32,
    /// Walks restarted because another walk of the card tore this one.
    restarts: u32,
    reply: oneshot::Sender<Reply>,
}

/// `conn digest` and `conn list` walk the card a slice per loop turn
/// ([`WALK_SLICE`]), one request at a time, instead of all at once: a
/// million entries took 0.4 s, long enough for the peers to take the
/// member for dead.
#[derive(Default)]
struct TableWalks {
    queue: std::collections::VecDeque<TableWalk>,
}

/// The loop's time for a walk per turn.
const WALK_SLICE: Duration = Duration::from_millis(2);
/// Walks waiting at most; more are refused.
const MAX_WALKS: usize = 4;
/// Walks torn by another walk of the card (a Full Sync being served
/// refuses them instead) are restarted this many times, then refused.
const MAX_WALK_RESTARTS: u32 = 3;
/// Walk results larger than this are freed on a thread of their own.
const FREE_ELSEWHERE: usize = 65_536;

impl TableWalks {
    fn start(&mut self, kind: WalkKind, reply: oneshot::Sender<Reply>) {
        if self.queue.len() >= MAX_WALKS {
            let _ = reply.send(Reply::err(format!("{MAX_WALKS} table walks are under way; try again")));
            return;
        }
        self.queue.push_back(TableWalk { kind, cursor: 0, restarts: 0, reply });
    }

    /// Walks on for a slice; answers the walk at the head when it is done.
    fn step<D: NicDevice>(&mut self, node: &mut Node<D>) {
        let Some(w) = self.queue.front_mut() else { return };
        let t0 = Instant::now();
        if w.cursor == 0 && w.kind.len() == 0 {
            // Room for the card's entries now: grown one doubling at a
            // time, the last doublings held the loop for 30-60 ms each.
            let n = node.table_ref().len();
            match &mut w.kind {
                WalkKind::Digest { counted, .. } => counted.reserve(n),
                WalkKind::List { entries, index, .. } => {
                    entries.reserve(n);
                    index.reserve(n);
                }
            }
        }
        let mut chunk = Vec::new();
        while t0.elapsed() < WALK_SLICE {
            chunk.clear();
            let next = match node.synced_chunk(w.cursor, &mut chunk) {
                Ok(next) => next,
                // A Full Sync being served owns the card's walker: later.
                Err(TableError::Busy(_)) => return,
                Err(TableError::Refused(nicsync_fwif::cpl::CplStatus::SnapshotTorn))
                    if w.restarts < MAX_WALK_RESTARTS =>
                {
                    w.restarts += 1;
                    w.cursor = 0;
                    w.kind = w.kind.fresh();
                    continue;
                }
                Err(e) => {
                    if let Some(w) = self.queue.pop_front() {
                        let _ = w.reply.send(Reply::err(e.to_string()));
                    }
                    return;
                }
            };
            for u in chunk.drain(..).filter(|u| u.op == nicsync_fwif::sync::DeltaOp::Upsert) {
                w.take(u);
            }
            if next == nicsync_fwif::cmd::SNAPSHOT_DONE {
                if let Some(w) = self.queue.pop_front() {
                    w.answer();
                }
                return;
            }
            w.cursor = next;
        }
    }
}

impl TableWalk {
    /// One entry the walk returned.
    fn take(&mut self, u: nicsync_fwif::sync::DeltaUpdate) {
        use std::collections::hash_map::Entry;
        match &mut self.kind {
            WalkKind::Digest { count, sum, counted } => {
                // As `fullsync::TableDigest` sums them.
                let d = crate::fullsync::record_digest(&u.to_record());
                match counted.insert(u.key, d) {
                    Some(old) => *sum = sum.wrapping_sub(old),
                    None => *count += 1,
                }
                *sum = sum.wrapping_add(d);
            }
            WalkKind::List { entries, index, .. } => match index.entry(u.key) {
                Entry::Occupied(e) => entries[*e.get()] = u,
                Entry::Vacant(v) => {
                    v.insert(entries.len());
                    entries.push(u);
                }
            },
        }
    }

    fn answer(self) {
        let TableWalk { kind, reply, .. } = self;
        let big = kind.len() > FREE_ELSEWHERE;
        let (answer, gathered) = match kind {
            WalkKind::Digest { count, sum, counted } => (
                Reply::ok(json!({"entries": count, "digest": format!("{sum:016x}")})),
                WalkKind::Digest { count, sum, counted },
            ),
            WalkKind::List { limit, mut entries, index } => {
                entries.sort_unstable_by(|a, b| {
                    zerocopy::IntoBytes::as_bytes(&a.key).cmp(zerocopy::IntoBytes::as_bytes(&b.key))
                });
                let list: Vec<_> = entries.iter().take(limit).map(crate::node::update_json).collect();
                (Reply::ok(json!(list)), WalkKind::List { limit, entries, index })
            }
        };
        let _ = reply.send(answer);
        // Freeing what a walk of millions gathered takes the loop tens of
        // milliseconds (every page goes back): another thread does it.
        if big {
            let _ = std::thread::Builder::new().name("nicsync-free".into()).spawn(move || drop(gathered));
        }
    }
}

/// A pending [`Request::ConnWait`].
struct Waiter {
    key: nicsync_fwif::conn::ConnKey,
    text: String,
    deadline: Instant,
    /// How long it waits (for the answer when it ends empty).
    limit: Duration,
    reply: oneshot::Sender<Reply>,
}

/// The answer to a [`Request::ConnWait`] for an entry on the card now.
fn wait_answer(key: &str, r: &nicsync_fwif::conn::ConnRecord) -> Reply {
    let seen = nicsync_conntrack::monotonic_ns();
    Reply::ok(json!({"key": key, "seen_monotonic_ns": seen, "record": crate::node::record_json(r)}))
}

/// After the node read the device's events: the peers' changes go to the
/// waiters (answered as their key arrives, or when their time is up) and,
/// on a Standby with `commit = "always"`, into the kernel.
fn after_progress<D: NicDevice>(node: &mut Node<D>, kernel: &mut Option<KernelLink>, waiters: &mut Vec<Waiter>) {
    let changes = node.take_peer_changes();
    let now = Instant::now();
    let mut i = 0;
    while i < waiters.len() {
        let arrived = changes.iter().any(|(k, removed)| !removed && *k == waiters[i].key);
        if !arrived && now < waiters[i].deadline {
            i += 1;
            continue;
        }
        let w = waiters.swap_remove(i);
        let answer = match node.table().lookup(&w.key) {
            Ok(Some(r)) => wait_answer(&w.text, &r),
            Ok(None) => Reply::err(format!("no connection {} within {} ms", w.text, w.limit.as_millis())),
            Err(e) => Reply::err(e.to_string()),
        };
        let _ = w.reply.send(answer);
    }
    let mirrors = kernel.as_ref().is_some_and(KernelLink::mirrors);
    if let Some(k) = kernel.as_mut().filter(|k| k.mirrors()) {
        for (key, removed) in changes {
            let record = if removed {
                None
            } else {
                match node.table().lookup(&key) {
                    Ok(Some(r)) => Some((r.state, r.nat)),
                    // Removed since: mirrored as the delete it is now.
                    Ok(None) => None,
                    // Not known now: the kernel keeps what it has (a
                    // delete would remove a live connection from it).
                    Err(_) => {
                        k.mirror_skipped();
                        continue;
                    }
                }
            };
            k.mirror(&key, record);
        }
    }
    node.record_peer_changes(mirrors || !waiters.is_empty());
}

async fn device_events(irq: Option<&crate::irq::AsyncEvents>) {
    match irq {
        Some(i) => i.wait().await,
        None => std::future::pending().await,
    }
}

async fn device_input_ready(input: Option<&crate::irq::AsyncInput>) {
    match input {
        Some(i) => i.wait().await,
        None => std::future::pending().await,
    }
}

async fn kernel_wake(k: &mut Option<KernelLink>) -> LinkWake {
    match k {
        Some(k) => k.wait().await,
        None => std::future::pending().await,
    }
}

/// A membership datagram (`d`, in `buf`), read at `now` (the loop's clock,
/// and the wall clock read with it): handled if it comes from a peer's
/// address, counted otherwise.
fn take_ccp<D: NicDevice>(
    node: &mut Node<D>,
    by_addr: &HashMap<SocketAddr, u16>,
    buf: &[u8],
    d: crate::sys::Stamped,
    stats: &mut NetStats,
    (now, wall_now): (Nanos, std::time::SystemTime),
) {
    if !by_addr.contains_key(&canonical(d.from)) {
        stats.ccp_unknown_source += 1;
        if warn_due(&mut stats.warned.unknown_source) {
            tracing::warn!(
                member = node.member_id(),
                "membership: a datagram from {}, which is no peer's membership address ({} so far): is another member configured with a peer's id, or a [[peer]] membership address wrong?",
                d.from,
                stats.ccp_unknown_source
            );
        }
        return;
    }
    if d.arrived.is_none() {
        stats.ccp_unstamped += 1;
    }
    let received = received_at(d.arrived, wall_now, now);
    node.handle_ccp_received(buf.get(..d.len).unwrap_or(buf), received, now);
}

/// When a datagram stamped `arrived` (the wall clock, read `wall_now`)
/// arrived, on the loop's clock (`now`). No stamp, or one not behind the
/// wall clock (stepped back since), counts as arriving now. An age is
/// taken as [`MAX_DATAGRAM_AGE`] at most: old either way (a long pause of
/// the process, or a wall clock stepped forward meanwhile).
fn received_at(arrived: Option<std::time::SystemTime>, wall_now: std::time::SystemTime, now: Nanos) -> Nanos {
    let age = arrived.and_then(|a| wall_now.duration_since(a).ok()).map_or(Duration::ZERO, |a| a.min(MAX_DATAGRAM_AGE));
    now.saturating_sub(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX))
}

/// The most a membership datagram's age counts for: past every dead window
/// a member is configured with in practice, so that it is old at any.
const MAX_DATAGRAM_AGE: Duration = Duration::from_secs(60);

/// Handles every membership datagram waiting in the socket (at most a
/// bounded number), without waiting.
fn drain_ccp<D: NicDevice>(
    node: &mut Node<D>,
    ccp: &UdpSocket,
    by_addr: &HashMap<SocketAddr, u16>,
    buf: &mut [u8],
    stats: &mut NetStats,
    now: Nanos,
) {
    let clocks = (now, std::time::SystemTime::now());
    // Read from the socket itself, not through tokio's readiness: after a
    // stall of this loop the reactor has not looked yet, and `try_io`
    // would find nothing to read. (A WouldBlock here leaves the readiness
    // set; the next `async_io` then finds WouldBlock itself and waits.)
    for _ in 0..MAX_CCP_DRAIN {
        match crate::sys::recv_stamped(ccp, buf) {
            Ok(d) => take_ccp(node, by_addr, buf, d, stats, clocks),
            Err(_) => break,
        }
    }
}

/// Receive buffer asked for on the membership socket: at least 4,000 small
/// datagrams (the kernel counts each at up to 1 KiB, against twice what is
/// asked), some 13 s of three peers' probes at the default interval.
const CCP_RECEIVE_BUFFER: usize = 4 << 20;

/// Membership datagrams read at most before timers run.
const MAX_CCP_DRAIN: usize = 1024;

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Sends or hands over what the node has to send; returns whether stream
/// bytes were handed to a writer task.
fn flush_outputs<D: NicDevice>(
    node: &mut Node<D>,
    net: &MemberNet,
    ccp: &UdpSocket,
    conns: &mut HashMap<ConnId, FsStream>,
    ev_tx: &mpsc::UnboundedSender<Ev>,
    stats: &mut NetStats,
) -> bool {
    let mut streamed = false;
    while let Some(out) = node.poll_output() {
        match out {
            NodeOutput::Ccp { dest, bytes } => {
                for p in &net.peers {
                    if matches!(dest, Destination::Member(m) if m != p.id) {
                        continue;
                    }
                    if let Err(e) = ccp.try_send_to(&bytes, p.ccp) {
                        stats.ccp_send_errors += 1;
                        if warn_due(&mut stats.warned.send_error) {
                            tracing::warn!(
                                member = node.member_id(),
                                "membership: cannot send to member {} at {} ({e}; {} sends failed so far): is it reachable from membership.bind?",
                                p.id,
                                p.ccp,
                                stats.ccp_send_errors
                            );
                        }
                    }
                }
            }
            NodeOutput::FsConnect { conn, peer, attempt } => {
                let addrs = net.peers.iter().find(|p| p.id == peer).map(|p| p.full_sync.clone()).unwrap_or_default();
                let tx = ev_tx.clone();
                if addrs.is_empty() {
                    stats.fs_connect_failures += 1;
                    let _ = tx.send(Ev::Closed { conn });
                    continue;
                }
                let addr = addrs[attempt as usize % addrs.len()];
                tokio::task::spawn_local(async move {
                    match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
                        Ok(Ok(stream)) => {
                            let stream = spawn_stream(conn, stream, tx.clone());
                            let _ = tx.send(Ev::Connected { conn, stream });
                        }
                        _ => {
                            tracing::info!("full sync: cannot connect to {addr}");
                            let _ = tx.send(Ev::Closed { conn });
                        }
                    }
                });
            }
            NodeOutput::FsSend { conn, bytes } => {
                if let Some(s) = conns.get(&conn) {
                    streamed |= s.tx.send(bytes).is_ok();
                }
            }
            NodeOutput::FsClose { conn } => {
                if let Some(s) = conns.remove(&conn) {
                    s.close();
                }
            }
        }
    }
    streamed
}

/// Connection ids from here on are streams this member accepted (below,
/// the ones it opened).
const FIRST_INBOUND: ConnId = 1 << 40;

/// Full Sync streams a member keeps accepted at once. Past it, the oldest
/// that has not brought its REQUEST is closed to make room, and if none
/// is idle the new one is closed at its accept (both counted in
/// `fs_refused`). A joiner holds one, so this is room for a whole cluster
/// joining at once and then some.
const MAX_FS_INBOUND: usize = 64;

/// How long a closed stream's writer may take to hand the peer what it
/// still holds (the last chunk, an abort) before the socket is dropped.
const FS_LINGER: Duration = Duration::from_secs(2);

/// How long a listener rests after its accept failed (EMFILE, ENFILE,
/// ENOBUFS): failing again at once would spin the loop.
const ACCEPT_REST: Duration = Duration::from_millis(100);

async fn rest_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A Full Sync stream as the loop holds it: the sender that feeds its
/// writer task, both tasks' handles, and the flag that tells the reader
/// the stream is closed.
#[derive(Debug)]
struct FsStream {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    reader: tokio::task::AbortHandle,
    writer: tokio::task::AbortHandle,
    closed: std::rc::Rc<std::cell::Cell<bool>>,
}

impl FsStream {
    /// Ends the stream: what the writer holds goes out, then its end is
    /// shut; what the peer still sends is read and dropped (closing a
    /// socket with unread bytes would reset it, and the peer could lose
    /// the last message, an ERROR's code); within [`FS_LINGER`] both tasks
    /// end and the socket is closed whatever the peer does (one that keeps
    /// its end open or keeps sending no longer holds a task, a buffer and
    /// the descriptor).
    fn close(self) {
        self.closed.set(true);
        drop(self.tx);
        let (reader, writer) = (self.reader, self.writer);
        tokio::task::spawn_local(async move {
            tokio::time::sleep(FS_LINGER).await;
            reader.abort();
            writer.abort();
        });
    }
}

/// A reader task that forwards what arrives, and a writer task fed by the
/// returned sender; the stream is shut down when the sender is dropped,
/// and closed by [`FsStream::close`].
fn spawn_stream(conn: ConnId, stream: TcpStream, ev: mpsc::UnboundedSender<Ev>) -> FsStream {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let ev2 = ev.clone();
    let closed = std::rc::Rc::new(std::cell::Cell::new(false));
    let reading = closed.clone();
    let reader = tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                // Closed by this member: dropped.
                Ok(_) if reading.get() => {}
                Ok(n) => {
                    if ev.send(Ev::Data { conn, bytes: buf[..n].to_vec() }).is_err() {
                        break;
                    }
                }
            }
        }
        if !reading.get() {
            let _ = ev.send(Ev::Closed { conn });
        }
    });
    let writer = tokio::task::spawn_local(async move {
        while let Some(bytes) = rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                let _ = ev2.send(Ev::Closed { conn });
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    FsStream { tx, reader: reader.abort_handle(), writer: writer.abort_handle(), closed }
}

async fn bind_control(c: &ControlSocket) -> Result<UnixListener, RuntimeError> {
    let shown = c.path.display().to_string();
    if c.path.exists() {
        // A socket file left by a daemon that died is removed; one that
        // answers belongs to a running daemon.
        if UnixStream::connect(&c.path).await.is_ok() {
            return Err(RuntimeError::ControlInUse(shown));
        }
        let _ = std::fs::remove_file(&c.path);
    }
    if let Some(dir) = c.path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| RuntimeError::Bind {
                what: "control socket directory",
                addr: dir.display().to_string(),
                source,
            })?;
        }
    }
    let l = UnixListener::bind(&c.path).map_err(|source| RuntimeError::Bind {
        what: "control socket",
        addr: shown.clone(),
        source,
    })?;
    std::fs::set_permissions(&c.path, std::fs::Permissions::from_mode(c.mode))
        .map_err(|source| RuntimeError::Bind { what: "control socket permissions", addr: shown, source })?;
    Ok(l)
}

async fn accept_control(l: &Option<UnixListener>) -> std::io::Result<UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

fn current_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(u32::MAX)
}

/// [`handle_request`]'s answer as the line written back: `syncstat`'s
/// straight from its counters (its keys then come in the struct's order,
/// not sorted: a JSON object's keys have none), the rest as [`Reply`]
/// writes itself.
fn answer_line<D: NicDevice>(
    node: &mut Node<D>,
    kernel: Option<&KernelLink>,
    req: &Request,
    net: &NetStats,
    now: Nanos,
) -> Vec<u8> {
    let Request::Syncstat = req else { return reply_line(&handle_request(node, kernel, req, net, now)) };
    let mut out = Vec::with_capacity(4096);
    // `Reply::ok(data)` as serde writes it (`error` is skipped).
    out.extend_from_slice(br#"{"ok":true,"data":"#);
    match serde_json::to_writer(&mut out, &Syncstat::of(node, net, kernel.map(KernelLink::stats))) {
        Ok(()) => {
            out.extend_from_slice(b"}\n");
            out
        }
        Err(e) => reply_line(&syncstat_failed(&e)),
    }
}

fn syncstat_failed(e: &serde_json::Error) -> Reply {
    Reply::err(format!("syncstat could not be written: {e}"))
}

/// `reply` as a line.
fn reply_line(reply: &Reply) -> Vec<u8> {
    let mut out = serde_json::to_vec(reply).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
    out.push(b'\n');
    out
}

/// Whether `req` is answered by the loop's waits or walks of the card over
/// several turns (`conn wait`, `conn digest`, `conn list`), not at once.
/// Every request is named: a new one must be placed.
fn waits_on_loop(req: &Request) -> bool {
    match req {
        Request::ConnWait { .. } | Request::ConnDigest | Request::ConnList { .. } => true,
        Request::State
        | Request::Syncstat
        | Request::Resync { .. }
        | Request::ConnGet { .. }
        | Request::ConnAdd { .. }
        | Request::ConnDel { .. }
        | Request::ConnFlush
        | Request::ReloadKeys => false,
    }
}

/// Whether `req` changes the table or asks for a resync (refused while
/// the member stops: a change made after its last acknowledged one would
/// not reach the peers). Every request is named: a new one must be placed.
fn changes_the_cluster(req: &Request) -> bool {
    match req {
        Request::ConnAdd { .. } | Request::ConnDel { .. } | Request::ConnFlush | Request::Resync { .. } => true,
        Request::State
        | Request::Syncstat
        | Request::ConnGet { .. }
        | Request::ConnWait { .. }
        | Request::ConnDigest
        | Request::ConnList { .. }
        | Request::ReloadKeys => false,
    }
}

/// Who may use the control socket.
#[derive(Clone, Copy)]
struct Asked<'a> {
    own_uid: u32,
    allow: &'a [u32],
}

impl Asked<'_> {
    /// The refusal of a peer with `uid`, if it may not.
    fn refusal(&self, uid: u32) -> Option<Reply> {
        (uid != self.own_uid && !self.allow.contains(&uid))
            .then(|| Reply::err(format!("uid {uid} may not use this daemon (control.allow_uids)")))
    }
}

/// Longest request the loop reads at accept (longer ones, up to
/// [`MAX_REQUEST_BYTES`], go to [`control_client`]).
const INLINE_REQUEST_BYTES: usize = 4096;

/// What [`control_client`] gets of a connection's request.
enum Pending {
    /// Read and parsed at the accept: one the loop answers over turns.
    Parsed(Request),
    /// Not all there at the accept: what had come.
    Partial(Vec<u8>),
}

/// Answers a control connection at its accept when its request is already
/// there (a client writes it as soon as it connects): read, answered and
/// written on the loop's turn, every call non-blocking. Without a task and
/// two more turns of the loop through its channel a `syncstat` costs the
/// daemon 72 us of CPU instead of 88 (53 since it is written straight from
/// its counters), where a monitor polling every 0.5 ms took a sixth of a
/// core. Returns the connection and its request when the request is not
/// all there yet, or waits on the loop ([`waits_on_loop`]):
/// [`control_client`] takes it from there.
fn answer_inline<D: NicDevice>(
    stream: UnixStream,
    asked: Asked<'_>,
    node: &mut Node<D>,
    kernel: Option<&KernelLink>,
    net: &mut NetStats,
    now: Nanos,
) -> Option<(UnixStream, Pending)> {
    use std::io::Read;
    let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let sock = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("control connection dropped: {e}");
            return None;
        }
    };
    if let Some(r) = asked.refusal(uid) {
        net.control_refused += 1;
        write_line(sock, reply_line(&r));
        return None;
    }
    let mut buf = [0u8; INLINE_REQUEST_BYTES];
    let (mut n, mut eof) = (0, false);
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        match (&sock).read(&mut buf[n..]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                write_line(sock, reply_line(&Reply::err(format!("reading request: {e}"))));
                return None;
            }
        }
    }
    let line = match buf[..n].iter().position(|b| *b == b'\n') {
        Some(i) => &buf[..=i],
        None if eof => &buf[..n],
        None => return handed_on(sock, Pending::Partial(buf[..n].to_vec())),
    };
    net.control_inline += 1;
    let req = match control::parse_request_line(line) {
        Ok(req) => req,
        Err(e) => {
            net.control_refused += 1;
            write_line(sock, reply_line(&Reply::err(e)));
            return None;
        }
    };
    if waits_on_loop(&req) {
        return handed_on(sock, Pending::Parsed(req));
    }
    write_line(sock, answer_line(node, kernel, &req, net, now));
    None
}

/// The connection back on the reactor, for [`control_client`].
fn handed_on(sock: std::os::unix::net::UnixStream, pending: Pending) -> Option<(UnixStream, Pending)> {
    match UnixStream::from_std(sock) {
        Ok(s) => Some((s, pending)),
        Err(e) => {
            tracing::debug!("control connection dropped: {e}");
            None
        }
    }
}

/// Longest a control connection's task waits for its client to send its
/// request or take its answer.
const CONTROL_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes `out` to a non-blocking socket; what the socket does not take at
/// once is written by a task (for at most [`CONTROL_IO_TIMEOUT`]). Closed
/// when written.
fn write_line(sock: std::os::unix::net::UnixStream, mut out: Vec<u8>) {
    use std::io::Write;
    let mut done = 0;
    while done < out.len() {
        match (&sock).write(&out[done..]) {
            Ok(0) => return,
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let Ok(mut s) = UnixStream::from_std(sock) else { return };
                let rest = out.split_off(done);
                tokio::task::spawn_local(async move {
                    let _ = tokio::time::timeout(CONTROL_IO_TIMEOUT, s.write_all(&rest)).await;
                });
                return;
            }
            Err(_) => return,
        }
    }
}

/// A control connection whose request was not all there at its accept, or
/// that waits on the loop (its peer was checked at the accept).
async fn control_client(stream: UnixStream, pending: Pending, ev: mpsc::UnboundedSender<Ev>) {
    let (rd, mut wr) = stream.into_split();
    let mut oversize = false;
    let mut rd = BufReader::new(rd.take(match &pending {
        Pending::Partial(read) => (MAX_REQUEST_BYTES + 1).saturating_sub(read.len()) as u64,
        Pending::Parsed(_) => 0,
    }));
    let parsed = match pending {
        Pending::Parsed(req) => Ok(req),
        Pending::Partial(mut line) => {
            let got = tokio::time::timeout(CONTROL_IO_TIMEOUT, rd.read_until(b'\n', &mut line)).await;
            oversize = line.len() > MAX_REQUEST_BYTES;
            match got {
                Ok(Ok(_)) => control::parse_request_line(&line).inspect_err(|_| {
                    let _ = ev.send(Ev::ControlRefused);
                }),
                Ok(Err(e)) => Err(format!("reading request: {e}")),
                Err(_) => Err(format!("no request within {} s", CONTROL_IO_TIMEOUT.as_secs())),
            }
        }
    };
    let reply = match parsed {
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if ev.send(Ev::Control { req, reply: tx }).is_err() {
                return;
            }
            rx.await.unwrap_or_else(|_| Reply::err("daemon is stopping"))
        }
        Err(e) => Reply::err(e),
    };
    let _ = tokio::time::timeout(CONTROL_IO_TIMEOUT, wr.write_all(&reply_line(&reply))).await;
    if oversize {
        // Closed on the rest of a refused request, the socket would be
        // reset: a client reading to the end, or still writing, would get
        // ECONNRESET or EPIPE for the answer's end. The end is sent, and
        // what the client still writes is read and dropped (bounded in
        // bytes and time) before the close.
        let _ = wr.shutdown().await;
        let mut rest = rd.into_inner().into_inner().take(OVERSIZE_DRAIN_BYTES);
        let _ = tokio::time::timeout(OVERSIZE_DRAIN_TIME, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
    }
}

/// What is read and dropped of a refused oversize request after its
/// answer, at most.
const OVERSIZE_DRAIN_BYTES: u64 = 1 << 20;
/// How long a refused oversize request's rest is read and dropped, at most.
const OVERSIZE_DRAIN_TIME: Duration = Duration::from_secs(1);

/// Answers one control request (`kernel`: the conntrack source, whose
/// counters `syncstat` adds).
pub fn handle_request<D: NicDevice>(
    node: &mut Node<D>,
    kernel: Option<&KernelLink>,
    req: &Request,
    net: &NetStats,
    now: Nanos,
) -> Reply {
    if node.is_stopping() && changes_the_cluster(req) {
        return Reply::err("this member is stopping (an orderly stop: SIGTERM); ask another member".to_string());
    }
    match req {
        Request::State => Reply::ok(state_json(node, now)),
        Request::Syncstat => match serde_json::to_value(Syncstat::of(node, net, kernel.map(KernelLink::stats))) {
            Ok(v) => Reply::ok(v),
            Err(e) => syncstat_failed(&e),
        },
        Request::Resync { member } => {
            if let Some(why) = member.and_then(|m| node.resync_refusal(m)) {
                return Reply::err(why);
            }
            let note = member.filter(|m| *m == node.member_id()).and_then(|_| node.own_resync_note());
            match member {
                Some(m) => node.request_peer_resync(*m, now),
                None => {
                    // Every member but the one the others sync from.
                    let source = node.cluster_source();
                    let me = node.member_id();
                    let members: Vec<u16> = node.members().iter().map(|v| v.id).collect();
                    for m in members {
                        let is_source = match source {
                            Some(s) => s == m,
                            // This member is the source when nobody else is.
                            None => m == me,
                        };
                        if !is_source {
                            node.request_peer_resync(m, now);
                        }
                    }
                }
            }
            let requested = member.map_or("all".to_string(), |m| m.to_string());
            match note {
                Some(n) => Reply::ok(json!({"requested": requested, "note": n})),
                None => Reply::ok(json!({"requested": requested})),
            }
        }
        // The loop walks the card a slice per turn for these (`TableWalks`);
        // here only when called directly, in one go.
        Request::ConnList { limit } => match node.list(limit.unwrap_or(usize::MAX)) {
            Ok(list) => Reply::ok(json!(list)),
            Err(e) => Reply::err(e.to_string()),
        },
        Request::ConnGet { key } => {
            let key = match control::parse_key(key) {
                Ok(k) => k,
                Err(e) => return Reply::err(e.to_string()),
            };
            match node.table().lookup(&key) {
                Ok(Some(r)) => Reply::ok(crate::node::record_json(&r)),
                Ok(None) => Reply::err(format!("no connection {key}")),
                Err(e) => Reply::err(e.to_string()),
            }
        }
        Request::ConnAdd { key, tcp_state, timeout_s, mark, sync } => {
            let key = match control::parse_key(key) {
                Ok(k) => k,
                Err(e) => return Reply::err(e.to_string()),
            };
            let is_tcp = key.proto == nicsync_fwif::conn::proto::TCP;
            let tcp = match tcp_state {
                None if is_tcp => TcpState::Established,
                None => TcpState::None,
                Some(name) => match control::parse_tcp_state(name) {
                    Some(t) if is_tcp || t == TcpState::None => t,
                    Some(_) => return Reply::err(format!("{key}: not TCP, so its TCP state is none, not {name:?}")),
                    None => {
                        let names = control::tcp_state_names();
                        return Reply::err(format!("unknown TCP state {name:?} (one of {names})"));
                    }
                },
            };
            let mut flags = ConnFlags::CONFIRMED;
            if *sync {
                flags |= ConnFlags::SYNC;
            }
            let e = ConnEntry::new(ConnState::new(tcp, Direction::Original, flags, *timeout_s, *mark));
            match node.table().upsert(&key, &e) {
                Ok(generation) => Reply::ok(json!({"key": key.to_string(), "generation": generation})),
                Err(e) => Reply::err(e.to_string()),
            }
        }
        Request::ConnDel { key } => {
            let key = match control::parse_key(key) {
                Ok(k) => k,
                Err(e) => return Reply::err(e.to_string()),
            };
            match node.table().delete(&key) {
                Ok(()) => Reply::ok(json!({"deleted": key.to_string()})),
                Err(TableError::NotFound) => Reply::err(format!("no connection {key}")),
                Err(e) => Reply::err(e.to_string()),
            }
        }
        Request::ReloadKeys => match node.reload_keys() {
            Ok((send, accepted)) => Reply::ok(json!({"send_key": send, "keys_accepted": accepted})),
            Err(e) => Reply::err(e),
        },
        // Answered by the loop (it waits); here only when called directly.
        Request::ConnWait { key, .. } => match control::parse_key(key) {
            Ok(k) => match node.table().lookup(&k) {
                Ok(Some(r)) => wait_answer(key, &r),
                Ok(None) => Reply::err(format!("no connection {key}")),
                Err(e) => Reply::err(e.to_string()),
            },
            Err(e) => Reply::err(e.to_string()),
        },
        Request::ConnFlush => match node.table().flush() {
            Ok(n) => Reply::ok(json!({"flushed": n})),
            Err(e) => Reply::err(e.to_string()),
        },
        // As `ConnList`.
        Request::ConnDigest => match node.digest() {
            Ok((count, digest)) => Reply::ok(json!({"entries": count, "digest": format!("{digest:016x}")})),
            Err(e) => Reply::err(e.to_string()),
        },
    }
}

/// `nicsync state --json`.
pub fn state_json<D: NicDevice>(node: &Node<D>, now: Nanos) -> serde_json::Value {
    let members: Vec<serde_json::Value> = node
        .members()
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "state": m.state,
                "alive": m.alive,
                "local": m.is_local,
                "last_heard_ms_ago": m.last_heard_ns.map(|t| now.saturating_sub(t) as f64 / 1e6),
            })
        })
        .collect();
    let state = node.state();
    json!({
        "member_id": node.member_id(),
        "cluster_id": node.config().cluster_id,
        "mode": match node.config().mode { crate::membership::Mode::HighAvailability => "ha", crate::membership::Mode::LoadSharing => "load-sharing" },
        "state": state,
        "active": matches!(state, MemberState::Active | MemberState::ActiveAttention),
        "synced": node.is_synced(),
        "full_sync_in_progress": node.is_pulling(),
        "stopping": node.is_stopping(),
        "sync_source": node.membership().sync_source(),
        "members": members,
    })
}

/// `nicsync syncstat --json`.
pub fn syncstat_json<D: NicDevice>(node: &Node<D>, net: &NetStats) -> serde_json::Value {
    serde_json::to_value(Syncstat::of(node, net, None)).unwrap_or_default()
}

/// The `syncstat` answer, serialized straight from the counters (built
/// as a `serde_json::Value` first, its map of some sixty keys was a third
/// of what a request cost the daemon).
#[derive(Serialize)]
struct Syncstat<'a> {
    updates_sent: u64,
    updates_received: u64,
    updates_applied: u64,
    retrans_requests_sent: u64,
    retrans_updates_sent: u64,
    lost_updates: u64,
    join_history_lost: u64,
    join_history_covered: u64,
    next_seq: u64,
    held_updates: u64,
    hold_drops: u64,
    apply_failed: u64,
    submit_failed: u64,
    malformed_frames: u64,
    auth_failures: u64,
    replays_dropped: u64,
    unknown_member_frames: u64,
    encrypted: bool,
    security: SyncstatSecurity,
    retransmit_queue_depth: u64,
    queue_drops: u64,
    rejects_sent: u64,
    unacked_updates: u64,
    synced_entries: u64,
    table_digest: String,
    divergences_detected: u64,
    merges_completed: u64,
    merges_failed: u64,
    full_syncs_completed: u64,
    full_syncs_failed: u64,
    last_full_sync_ms: Option<f64>,
    last_full_sync_records: u64,
    full_syncs_served: u64,
    full_syncs_serve_failed: u64,
    snapshot_walks_torn: u64,
    resyncs_requested: u64,
    device_resync_events: u64,
    sync_events: u64,
    membership: crate::membership::MembershipStats,
    ccp_rejected: u64,
    recovery: crate::driver::RecoveryStats,
    net: &'a NetStats,
    last_error: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conntrack: Option<crate::ctsync::ConntrackStats>,
}

#[derive(Serialize)]
struct SyncstatSecurity {
    delta_auth_failures: u64,
    delta_replays_dropped: u64,
    delta_unknown_member: u64,
    delta_malformed: u64,
    host: crate::secure::SecurityStats,
}

impl<'a> Syncstat<'a> {
    fn of<D: NicDevice>(
        node: &'a Node<D>,
        net: &'a NetStats,
        conntrack: Option<crate::ctsync::ConntrackStats>,
    ) -> Self {
        let drv = node.table_ref().driver_ref();
        let c = |k: Counter| drv.device_counter(k);
        let s = node.stats();
        let refused = node.refused();
        Syncstat {
            updates_sent: c(Counter::SyncUpdatesSent),
            updates_received: c(Counter::SyncUpdatesReceived),
            updates_applied: c(Counter::SyncUpdatesApplied),
            retrans_requests_sent: c(Counter::SyncRetransRequestsSent),
            retrans_updates_sent: c(Counter::SyncRetransUpdatesSent),
            lost_updates: c(Counter::SyncLostUpdates),
            join_history_lost: c(Counter::SyncHistoryLost),
            join_history_covered: c(Counter::SyncHistoryCovered),
            next_seq: c(Counter::SyncNextSeq),
            held_updates: c(Counter::SyncHeld),
            hold_drops: c(Counter::SyncHoldDrops),
            apply_failed: c(Counter::SyncApplyFailed),
            submit_failed: c(Counter::SyncSubmitFailed),
            malformed_frames: refused.malformed,
            auth_failures: refused.auth_failures,
            replays_dropped: refused.replays_dropped,
            unknown_member_frames: refused.unknown_member,
            encrypted: node.is_sealed(),
            security: SyncstatSecurity {
                delta_auth_failures: c(Counter::SyncAuthFailures),
                delta_replays_dropped: c(Counter::SyncReplaysDropped),
                delta_unknown_member: c(Counter::SyncUnknownMember),
                delta_malformed: c(Counter::SyncMalformed),
                host: node.security_stats(),
            },
            retransmit_queue_depth: c(Counter::SyncQueueDepth),
            queue_drops: c(Counter::SyncQueueDrops),
            rejects_sent: c(Counter::SyncRejectsSent),
            unacked_updates: c(Counter::SyncUnacked),
            synced_entries: c(Counter::SyncEntries),
            table_digest: format!("{:016x}", c(Counter::SyncDigest)),
            divergences_detected: s.divergences_detected,
            merges_completed: s.merges_completed,
            merges_failed: s.merges_failed,
            full_syncs_completed: s.full_syncs_completed,
            full_syncs_failed: s.full_syncs_failed,
            last_full_sync_ms: s.last_full_sync_ms,
            last_full_sync_records: s.last_full_sync_records,
            full_syncs_served: s.full_syncs_served,
            full_syncs_serve_failed: s.full_syncs_serve_failed,
            snapshot_walks_torn: s.snapshot_walks_torn,
            resyncs_requested: s.resyncs_requested,
            device_resync_events: s.device_resync_events,
            sync_events: s.sync_events,
            membership: node.membership().stats(),
            ccp_rejected: s.ccp_rejected,
            recovery: drv.recovery_stats(),
            net,
            last_error: &s.last_error,
            conntrack,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn a_datagram_is_dated_by_its_stamp_on_the_loops_clock() {
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let now: Nanos = 5_000_000_000;
        let ms = Duration::from_millis(1);
        // Waited 30 ms: arrived 30 ms before now.
        assert_eq!(received_at(Some(wall - 30 * ms), wall, now), now - 30_000_000);
        // No stamp, or a wall clock stepped back since: now.
        assert_eq!(received_at(None, wall, now), now);
        assert_eq!(received_at(Some(wall + ms), wall, now), now);
        // Older than the loop's clock: its start.
        assert_eq!(received_at(Some(wall - Duration::from_secs(6)), wall, now), 0);
        // Beyond the longest age that counts: that age.
        let max = MAX_DATAGRAM_AGE.as_nanos() as Nanos;
        let long_ago = Some(wall - MAX_DATAGRAM_AGE - ms);
        assert_eq!(received_at(long_ago, wall, now + max), now);
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A stream the member closed hands the node nothing more of what its
    /// peer sends, and its socket is closed within FS_LINGER (the peer's
    /// writes are then answered by a reset) although the peer keeps its own
    /// end open: before, the reader task held the socket, its buffer and
    /// the descriptor until the peer closed, which a peer that never does
    /// made a descriptor leak.
    #[test]
    fn a_closed_stream_lets_go_of_its_socket_whatever_the_peer_does() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        tokio::task::LocalSet::new().block_on(&rt, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let mut peer = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
            let (ours, _) = listener.accept().await.expect("accept");
            let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Ev>();
            let stream = spawn_stream(7, ours, ev_tx);
            stream.tx.send(b"last words".to_vec()).expect("writer alive");
            stream.close();
            // What the writer held still arrives, then the end.
            let mut got = Vec::new();
            let bound = Duration::from_secs(10);
            tokio::time::timeout(bound, peer.read_to_end(&mut got)).await.expect("end within 10 s").expect("read");
            assert_eq!(got, b"last words");
            // The peer keeps writing: the socket is gone, so a reset comes
            // back and a later write fails. With the reader alive, every
            // write went through and was read.
            let refused = tokio::time::timeout(bound, async {
                loop {
                    if peer.write_all(b"more").await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await;
            assert!(refused.is_ok(), "the peer's writes were still taken 10 s after the close");
            while let Ok(ev) = ev_rx.try_recv() {
                assert!(!matches!(ev, Ev::Data { .. }), "data read after the close");
            }
        });
    }
}
