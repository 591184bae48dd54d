//! The device's sync port: how Delta Sync frames leave and reach the card.
//!
//! [`crate::sync`] decides *what* to send; a [`SyncPort`] moves the bytes. It
//! is a datagram port, like the NIC's sync Ethernet port: one frame per
//! [`SyncPort::send`], one frame per [`SyncPort::recv`], nothing reassembled,
//! nothing guaranteed (loss, duplication and reordering are the protocol's
//! business, not the wire's). Two wires implement it:
//!
//! * [`InProcessHub`] / [`InProcessPort`]: an in-memory broadcast segment for
//!   members in one process (the deterministic simulator, `nicsync cluster`,
//!   benchmarks). Each attached port has a bounded receive queue, as a NIC
//!   has an RX ring: a frame that finds it full is dropped and counted.
//!   Optional seeded impairment ([`Impairment`]: loss, duplication,
//!   reordering) and partitions ([`InProcessHub::set_isolated`]) make faults
//!   reproducible from a seed.
//! * [`UdpPort`]: real datagrams on a non-blocking [`UdpSocket`], for
//!   multi-process and multi-host clusters. It binds to a configurable
//!   address (default `0.0.0.0:`[`SYNC_UDP_PORT`], ClusterXL's 8116), sends
//!   each frame to every configured peer by unicast, and accepts datagrams
//!   only from configured peers. Each peer gets its own socket connected to
//!   it and bound to the same address (`SO_REUSEPORT`): the kernel hands it
//!   that peer's datagrams, and sending on it skips `sendto`'s route lookup;
//!   the unconnected socket hears everyone else, and is read one receive in
//!   8 when the peers' sockets are empty. The port's
//!   readiness descriptor is an epoll set of all its sockets.
//!
//! A driver moves frames between a state machine and a port:
//!
//! ```text
//!   while let Some(t) = machine.poll_transmit() { port.transmit(&t)?; }
//!   while let Some(n) = port.recv(&mut buf)?   { machine.handle_datagram(&buf[..n], now); }
//! ```
//!
//! # Limits and rules
//!
//! * **Size.** A frame is at most [`MAX_WIRE_FRAME`] bytes (1,472: one UDP
//!   payload in a 1,500-byte Ethernet MTU, the frame format's
//!   [`MAX_DATAGRAM`]). Larger frames are refused by `send` with
//!   [`WireError::Oversize`]; larger datagrams arriving on UDP are dropped and
//!   counted ([`WireStats::oversize_received`]). `recv` wants a buffer of at
//!   least [`MAX_WIRE_FRAME`] bytes, so that every acceptable datagram fits, and
//!   refuses a smaller one without consuming anything.
//! * **Nothing from the network panics or allocates without bound.** Queues
//!   are bounded by configuration; a UDP `recv` call discards at most
//!   [`RECV_DISCARD_BUDGET`] unacceptable datagrams before it returns, so a
//!   flood cannot pin the caller.
//! * **Addressing.** [`SyncPort::send`] goes to every other member;
//!   [`SyncPort::send_to`] to one member where the wire knows its address
//!   (in-process always; UDP when the peer was configured with its member
//!   id), and to everyone otherwise. That is safe: NACK, ACK and LOST
//!   elements name their target member, and a retransmitted DELTA reaching a
//!   member that did not ask for it is a duplicate it drops.
//! * **Trust.** The UDP port drops datagrams whose source address is not a
//!   configured peer ([`WireStats::unknown_source`]). That is a filter, not
//!   authentication: a source address can be forged, and the frames carry a
//!   checksum, not a MAC. The sync network must be trusted or isolated, as
//!   ClusterXL's and conntrackd's are.
//! * **Multicast / broadcast.** The UDP port sends one unicast datagram per
//!   peer. Multicast (one datagram for all peers, as ClusterXL's sync
//!   network may use) is a later option; multicast and broadcast peer
//!   addresses are refused today ([`WireError::BadPeer`]).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nicsync_fwif::sync::{MAX_DATAGRAM, SYNC_UDP_PORT};

use crate::rng::SeededRng;

use crate::sync::{Destination, Transmit};

/// Largest frame a sync port carries (one UDP payload in a 1,500-byte MTU).
pub const MAX_WIRE_FRAME: usize = MAX_DATAGRAM;

/// Unacceptable datagrams (oversize, unknown source, unreachable reports) a
/// [`UdpPort::recv`] call discards at most before it returns `Ok(None)`.
pub const RECV_DISCARD_BUDGET: usize = 256;

/// Free frame buffers an [`InProcessHub`] keeps for reuse at most.
const SPARE_BUFFERS: usize = 256;

/// Why a sync port operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The seal could not be applied (its counter is exhausted: restart
    /// the member).
    #[error("the sync port could not seal the frame")]
    Sealing,
    /// A frame larger than [`MAX_WIRE_FRAME`] was given to `send`.
    #[error("frame of {len} bytes exceeds the sync port's maximum of {max} bytes")]
    Oversize {
        /// Frame length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The buffer given to `recv` cannot hold every frame.
    #[error("receive buffer of {have} bytes is smaller than the {need} bytes a frame may need")]
    BufferTooSmall {
        /// Bytes needed ([`MAX_WIRE_FRAME`]).
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// A member id is attached twice to one in-process segment.
    #[error("member {0} is already attached to this in-process sync segment")]
    DuplicateMember(u16),
    /// The UDP socket could not be bound.
    #[error("cannot bind the sync port to {addr}: {hint}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What it means and what to do.
        hint: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The socket was bound but could not be set up (non-blocking mode,
    /// local address).
    #[error("cannot set up the sync port on {addr}")]
    Setup {
        /// The address.
        addr: SocketAddr,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// A peer address that cannot be used.
    #[error("sync peer {addr} refused: {reason}")]
    BadPeer {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: &'static str,
    },
    /// The same peer address configured twice.
    #[error("sync peer {0} is configured twice")]
    DuplicatePeer(SocketAddr),
    /// A peer address that is this port's own.
    #[error("sync peer {0} is this port's own address")]
    PeerIsSelf(SocketAddr),
    /// Sending to a peer failed (the frame still went to the other peers).
    #[error("sending a sync frame to {peer} failed")]
    Send {
        /// The peer (the first that failed in this call).
        peer: SocketAddr,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Receiving failed.
    #[error("receiving on the sync port {addr} failed")]
    Recv {
        /// The local address.
        addr: SocketAddr,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

/// Counters of one sync port. Fields a wire does not use stay 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames accepted by `send`/`send_to`.
    pub frames_sent: u64,
    /// Copies put on the wire: one per peer reached (UDP: datagrams sent;
    /// in-process: frames offered to a peer's queue before impairment).
    pub datagrams_sent: u64,
    /// Frames returned by `recv`.
    pub frames_received: u64,
    /// Frames `send` refused as larger than [`MAX_WIRE_FRAME`].
    pub oversize_refused: u64,
    /// Datagrams received larger than [`MAX_WIRE_FRAME`] (or truncated to
    /// it), dropped (UDP).
    pub oversize_received: u64,
    /// Datagrams from an address that is not a configured peer, dropped (UDP).
    pub unknown_source: u64,
    /// Frames that arrived at a full receive queue, dropped (in-process; the
    /// receiving port counts them, as a NIC counts RX ring overruns).
    pub rx_dropped: u64,
    /// Copies not sent because the socket's send buffer was full (UDP).
    pub tx_dropped: u64,
    /// Peers reported unreachable (ICMP port unreachable surfacing as a
    /// refused or reset error); the datagram is lost (UDP).
    pub unreachable: u64,
    /// Other I/O errors.
    pub errors: u64,
    /// Frames lost to [`Impairment::loss_ppm`] (in-process, receiving port).
    pub impaired_lost: u64,
    /// Frames duplicated by [`Impairment::dup_ppm`] (in-process, receiving port).
    pub impaired_duplicated: u64,
    /// Frames held back by [`Impairment::reorder_ppm`] (in-process, receiving port).
    pub impaired_reordered: u64,
    /// Frames not delivered because the sender or the receiver was isolated
    /// (in-process, receiving port).
    pub partitioned: u64,
    /// Sealed ports: datagrams that failed authentication (bad tag, unknown
    /// key id, a plain frame, or an inner sender that differs from the
    /// sealed one), dropped.
    pub auth_failures: u64,
    /// Sealed ports: authentic datagrams refused by the replay window.
    pub replays_dropped: u64,
    /// Sealed ports: datagrams from a member id that is not a peer.
    pub unknown_member: u64,
    /// Sealed ports: datagrams too short or with an unknown suite or
    /// non-zero reserved bytes in the seal header.
    pub malformed: u64,
}

impl WireStats {
    /// Adds `o` field by field, saturating.
    pub fn merge(&mut self, o: &WireStats) {
        self.frames_sent = self.frames_sent.saturating_add(o.frames_sent);
        self.datagrams_sent = self.datagrams_sent.saturating_add(o.datagrams_sent);
        self.frames_received = self.frames_received.saturating_add(o.frames_received);
        self.oversize_refused = self.oversize_refused.saturating_add(o.oversize_refused);
        self.oversize_received = self.oversize_received.saturating_add(o.oversize_received);
        self.unknown_source = self.unknown_source.saturating_add(o.unknown_source);
        self.rx_dropped = self.rx_dropped.saturating_add(o.rx_dropped);
        self.tx_dropped = self.tx_dropped.saturating_add(o.tx_dropped);
        self.unreachable = self.unreachable.saturating_add(o.unreachable);
        self.errors = self.errors.saturating_add(o.errors);
        self.impaired_lost = self.impaired_lost.saturating_add(o.impaired_lost);
        self.impaired_duplicated = self.impaired_duplicated.saturating_add(o.impaired_duplicated);
        self.impaired_reordered = self.impaired_reordered.saturating_add(o.impaired_reordered);
        self.partitioned = self.partitioned.saturating_add(o.partitioned);
        self.auth_failures = self.auth_failures.saturating_add(o.auth_failures);
        self.replays_dropped = self.replays_dropped.saturating_add(o.replays_dropped);
        self.unknown_member = self.unknown_member.saturating_add(o.unknown_member);
        self.malformed = self.malformed.saturating_add(o.malformed);
    }

    /// Frames dropped on this port for any reason (queue full, oversize,
    /// unknown source, unreachable, impairment, partition, and on sealed
    /// ports authentication, replay, unknown member, malformed seal).
    pub fn dropped(&self) -> u64 {
        [
            self.rx_dropped,
            self.tx_dropped,
            self.oversize_received,
            self.unknown_source,
            self.unreachable,
            self.impaired_lost,
            self.partitioned,
            self.auth_failures,
            self.replays_dropped,
            self.unknown_member,
            self.malformed,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// The device's sync port: a datagram port for Delta Sync frames.
pub trait SyncPort: Send {
    /// Sends one frame to every other member. Refuses a frame larger than
    /// [`MAX_WIRE_FRAME`] ([`WireError::Oversize`]). Success means the frame
    /// was handed to the wire, not that anyone received it.
    fn send(&mut self, frame: &[u8]) -> Result<(), WireError>;

    /// Sends one frame to `member`. A wire that does not know the member's
    /// address sends it to everyone (see the module docs); this default
    /// always does.
    fn send_to(&mut self, member: u16, frame: &[u8]) -> Result<(), WireError> {
        let _ = member;
        self.send(frame)
    }

    /// Sends a [`Transmit`] of a sync state machine where it says.
    fn transmit(&mut self, t: &Transmit) -> Result<(), WireError> {
        match t.dest {
            Destination::All => self.send(&t.frame),
            Destination::Member(m) => self.send_to(m, &t.frame),
        }
    }

    /// Takes the next received frame into `buf` (at least [`MAX_WIRE_FRAME`]
    /// bytes) and returns its length; `Ok(None)` when none is waiting (never
    /// blocks). Bytes of `buf` past the returned length are unspecified.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError>;

    /// The member id this port belongs to.
    fn local_member(&self) -> u16;

    /// The port's counters.
    fn stats(&self) -> WireStats;

    /// A descriptor that becomes readable when a frame arrives (a
    /// duplicate the caller owns), so that a device thread with nothing
    /// to do can sleep until the wire has something; `None` when the port
    /// has none (the in-process wire).
    fn readiness_fd(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }
}

fn check_frame(frame: &[u8], stats: &mut WireStats) -> Result<(), WireError> {
    if frame.len() > MAX_WIRE_FRAME {
        stats.oversize_refused += 1;
        return Err(WireError::Oversize { len: frame.len(), max: MAX_WIRE_FRAME });
    }
    Ok(())
}

fn check_buf(buf: &[u8]) -> Result<(), WireError> {
    if buf.len() < MAX_WIRE_FRAME {
        return Err(WireError::BufferTooSmall { need: MAX_WIRE_FRAME, have: buf.len() });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// In-process wire
// ---------------------------------------------------------------------------

/// Faults an [`InProcessHub`] applies to every copy of a frame towards a
/// receiving port, drawn from the hub's seeded generator. Rates are per
/// million.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Impairment {
    /// Copies lost.
    pub loss_ppm: u32,
    /// Copies delivered twice.
    pub dup_ppm: u32,
    /// Copies held back and delivered after later ones (or when the queue
    /// would otherwise be empty, so none is held for ever).
    pub reorder_ppm: u32,
}

impl Impairment {
    /// A perfect wire.
    pub const NONE: Impairment = Impairment { loss_ppm: 0, dup_ppm: 0, reorder_ppm: 0 };
}

/// Configuration of an [`InProcessHub`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// Frames each port's receive queue holds (at least 1; 0 is taken as 1).
    pub queue_capacity: usize,
    /// Seed of the impairment generator.
    pub seed: u64,
    /// Faults applied to deliveries.
    pub impairment: Impairment,
}

impl HubConfig {
    /// A perfect segment with 1,024-frame receive queues.
    pub fn new() -> Self {
        HubConfig { queue_capacity: 1024, seed: 0, impairment: Impairment::NONE }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One attached port's receive side.
struct Slot {
    id: u64,
    member: u16,
    queue: VecDeque<Vec<u8>>,
    /// A frame held back by reordering: delivered after the frames queued
    /// after it, or when the queue is empty.
    held: Option<Vec<u8>>,
    stats: WireStats,
}

impl Slot {
    fn occupancy(&self) -> usize {
        self.queue.len() + usize::from(self.held.is_some())
    }
}

struct HubState {
    capacity: usize,
    impairment: Impairment,
    rng: SeededRng,
    /// Attached ports, by member id.
    slots: Vec<Slot>,
    /// Members cut off from everyone (kept across detach and re-attach: a
    /// partition is the network's, not the port's).
    isolated: Vec<u16>,
    /// Links cut between two members, both ways (lower id first).
    cut_links: Vec<(u16, u16)>,
    next_id: u64,
    spare: Vec<Vec<u8>>,
}

impl HubState {
    fn slot_index(&self, id: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }

    fn buffer(&mut self, frame: &[u8]) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(frame);
        b
    }

    fn recycle(&mut self, b: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(b);
        }
    }

    /// Offers one copy of `frame` from `from` to slot `to`.
    fn deliver(&mut self, from: u16, to: usize, frame: &[u8]) {
        let member = self.slots[to].member;
        if self.isolated.contains(&from)
            || self.isolated.contains(&member)
            || self.cut_links.contains(&(from.min(member), from.max(member)))
        {
            self.slots[to].stats.partitioned += 1;
            return;
        }
        let imp = self.impairment;
        if self.rng.chance(imp.loss_ppm) {
            self.slots[to].stats.impaired_lost += 1;
            return;
        }
        let copies = if self.rng.chance(imp.dup_ppm) {
            self.slots[to].stats.impaired_duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.slots[to].occupancy() >= self.capacity {
                self.slots[to].stats.rx_dropped += 1;
                continue;
            }
            let reorder = self.rng.chance(imp.reorder_ppm);
            let b = self.buffer(frame);
            let slot = &mut self.slots[to];
            if reorder {
                if let Some(prev) = slot.held.take() {
                    slot.queue.push_back(prev);
                }
                slot.held = Some(b);
                slot.stats.impaired_reordered += 1;
            } else {
                slot.queue.push_back(b);
            }
        }
    }
}

impl fmt::Debug for HubState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubState")
            .field("capacity", &self.capacity)
            .field("impairment", &self.impairment)
            .field("members", &self.slots.iter().map(|s| s.member).collect::<Vec<_>>())
            .field("isolated", &self.isolated)
            .finish_non_exhaustive()
    }
}

/// An in-memory broadcast segment joining the sync ports of members in one
/// process. Cloning gives another handle to the same segment; it is
/// thread-safe, so a device thread and a test thread can share it.
///
/// Deterministic: deliveries go to ports in member id order, and the
/// impairment draws come from one generator seeded by [`HubConfig::seed`],
/// so the same sequence of calls gives the same deliveries.
#[derive(Clone, Debug)]
pub struct InProcessHub {
    state: Arc<Mutex<HubState>>,
}

impl InProcessHub {
    /// An empty segment.
    pub fn new(cfg: HubConfig) -> Self {
        let state = HubState {
            capacity: cfg.queue_capacity.max(1),
            impairment: cfg.impairment,
            rng: SeededRng::new(cfg.seed),
            slots: Vec::new(),
            isolated: Vec::new(),
            cut_links: Vec::new(),
            next_id: 0,
            spare: Vec::new(),
        };
        InProcessHub { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attaches a port for `member`. Frames sent before it attached are not
    /// seen. Dropping the port detaches it (a crashed member), after which
    /// the id may attach again (a restart).
    pub fn attach(&self, member: u16) -> Result<InProcessPort, WireError> {
        let mut st = self.lock();
        let at = match st.slots.binary_search_by_key(&member, |s| s.member) {
            Ok(_) => return Err(WireError::DuplicateMember(member)),
            Err(at) => at,
        };
        let id = st.next_id;
        st.next_id += 1;
        st.slots.insert(at, Slot { id, member, queue: VecDeque::new(), held: None, stats: WireStats::default() });
        Ok(InProcessPort { state: self.state.clone(), id, member })
    }

    /// Attached members, in id order.
    pub fn members(&self) -> Vec<u16> {
        self.lock().slots.iter().map(|s| s.member).collect()
    }

    /// Cuts `member` off from everyone (true) or reconnects it (false).
    /// Frames already queued stay queued.
    pub fn set_isolated(&self, member: u16, isolated: bool) {
        let mut st = self.lock();
        st.isolated.retain(|m| *m != member);
        if isolated {
            st.isolated.push(member);
        }
    }

    /// Cuts the link between members `a` and `b`, both ways (true), or
    /// mends it (false); each still reaches every other member. Frames
    /// already queued stay queued.
    pub fn set_link_cut(&self, a: u16, b: u16, cut: bool) {
        let link = (a.min(b), a.max(b));
        let mut st = self.lock();
        st.cut_links.retain(|l| *l != link);
        if cut {
            st.cut_links.push(link);
        }
    }

    /// Changes the faults from now on (the generator continues its sequence).
    pub fn set_impairment(&self, impairment: Impairment) {
        self.lock().impairment = impairment;
    }

    /// The counters of `member`'s port, if attached.
    pub fn stats(&self, member: u16) -> Option<WireStats> {
        let st = self.lock();
        st.slots.iter().find(|s| s.member == member).map(|s| s.stats)
    }

    /// Frames waiting in `member`'s receive queue (0 when not attached).
    pub fn pending(&self, member: u16) -> usize {
        let st = self.lock();
        st.slots.iter().find(|s| s.member == member).map_or(0, Slot::occupancy)
    }

    /// True when no frame waits in any queue.
    pub fn is_idle(&self) -> bool {
        self.lock().slots.iter().all(|s| s.occupancy() == 0)
    }
}

/// One member's port on an [`InProcessHub`]. Detaches when dropped.
#[derive(Debug)]
pub struct InProcessPort {
    state: Arc<Mutex<HubState>>,
    id: u64,
    member: u16,
}

impl InProcessPort {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frames waiting in this port's receive queue.
    pub fn pending(&self) -> usize {
        let st = self.lock();
        st.slot_index(self.id).map_or(0, |i| st.slots[i].occupancy())
    }

    /// Sends to every other port, or only to `only`.
    fn send_inner(&mut self, only: Option<u16>, frame: &[u8]) -> Result<(), WireError> {
        let (id, member) = (self.id, self.member);
        let mut st = self.lock();
        let Some(me) = st.slot_index(id) else { return Ok(()) };
        check_frame(frame, &mut st.slots[me].stats)?;
        st.slots[me].stats.frames_sent += 1;
        for to in 0..st.slots.len() {
            let m = st.slots[to].member;
            if to == me || only.is_some_and(|o| o != m) {
                continue;
            }
            st.slots[me].stats.datagrams_sent += 1;
            st.deliver(member, to, frame);
        }
        Ok(())
    }
}

impl SyncPort for InProcessPort {
    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        self.send_inner(None, frame)
    }

    /// Sends to `member` only; a member not attached gets nothing (a dead host).
    fn send_to(&mut self, member: u16, frame: &[u8]) -> Result<(), WireError> {
        self.send_inner(Some(member), frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        check_buf(buf)?;
        let mut st = self.lock();
        let Some(me) = st.slot_index(self.id) else { return Ok(None) };
        let slot = &mut st.slots[me];
        let Some(b) = slot.queue.pop_front().or_else(|| slot.held.take()) else { return Ok(None) };
        // Every queued frame passed `check_frame`, so it fits `buf`.
        let n = b.len().min(buf.len());
        buf[..n].copy_from_slice(&b[..n]);
        slot.stats.frames_received += 1;
        st.recycle(b);
        Ok(Some(n))
    }

    fn local_member(&self) -> u16 {
        self.member
    }

    fn stats(&self) -> WireStats {
        let st = self.lock();
        st.slot_index(self.id).map_or_else(WireStats::default, |i| st.slots[i].stats)
    }
}

impl Drop for InProcessPort {
    fn drop(&mut self) {
        let mut st = self.lock();
        if let Some(i) = st.slot_index(self.id) {
            let slot = st.slots.remove(i);
            for b in slot.queue.into_iter().chain(slot.held) {
                st.recycle(b);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// UDP wire
// ---------------------------------------------------------------------------

/// A peer of a [`UdpPort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpPeer {
    /// The peer's sync address: where it is bound, and so the source address
    /// of its datagrams.
    pub addr: SocketAddr,
    /// The peer's member id, when known: [`SyncPort::send_to`] then reaches
    /// it alone.
    pub member: Option<u16>,
}

/// Configuration of a [`UdpPort`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpConfig {
    /// This member's id.
    pub member: u16,
    /// Local address to bind ([`UdpConfig::default_bind`] by default). On a
    /// host with several addresses, bind the sync address itself: peers
    /// recognise this member by the source address of its datagrams.
    pub bind: SocketAddr,
    /// Where frames go, and the only sources accepted.
    pub peers: Vec<UdpPeer>,
}

impl UdpConfig {
    /// Member `member` bound to the default address, with no peers yet.
    pub fn new(member: u16) -> Self {
        UdpConfig { member, bind: Self::default_bind(), peers: Vec::new() }
    }

    /// `0.0.0.0:8116` ([`SYNC_UDP_PORT`], as ClusterXL).
    pub fn default_bind() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, SYNC_UDP_PORT))
    }

    /// Binds to `addr` instead (port 0: an ephemeral port, see
    /// [`UdpPort::local_addr`]).
    pub fn bind_to(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Adds a peer known only by its address.
    pub fn peer(mut self, addr: SocketAddr) -> Self {
        self.peers.push(UdpPeer { addr, member: None });
        self
    }

    /// Adds a peer with its member id.
    pub fn member_peer(mut self, member: u16, addr: SocketAddr) -> Self {
        self.peers.push(UdpPeer { addr, member: Some(member) });
        self
    }
}

/// A sync port on non-blocking UDP sockets (see the module docs): one
/// unconnected socket bound to the sync address, and per peer one connected
/// socket bound to the same address (`SO_REUSEPORT`). The kernel hands a
/// connected socket its peer's datagrams and the unconnected one everything
/// else; sending on a connected socket skips the route lookup `sendto`
/// makes (0.35 us a datagram on loopback here, about 0.4 us off a one-way
/// delta). A peer whose socket cannot be made goes through the unconnected
/// one.
#[derive(Debug)]
pub struct UdpPort {
    socket: UdpSocket,
    member: u16,
    local: SocketAddr,
    peers: Vec<UdpPeer>,
    /// Per peer (same order): its connected socket.
    links: Vec<Option<UdpSocket>>,
    /// The next link a receive looks at first (round robin).
    next_link: usize,
    /// Receives since the unconnected socket was last read.
    since_main: u32,
    /// Every socket of the port, readable as one.
    ready: Option<crate::sys::ReadinessSet>,
    /// Receive buffer one byte longer than the largest frame, so that an
    /// oversize datagram shows as one.
    scratch: Box<[u8]>,
    stats: WireStats,
}

/// The address as it appears as a datagram source: IPv4-mapped IPv6
/// addresses (from a dual-stack socket) compare as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn bind_hint(kind: io::ErrorKind) -> &'static str {
    match kind {
        io::ErrorKind::AddrInUse => {
            "address in use: another member or process holds this port; stop it or configure another sync port"
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied: ports below 1024 need privileges (CAP_NET_BIND_SERVICE); use a higher port"
        }
        io::ErrorKind::AddrNotAvailable => "address not available: it is not assigned to any interface of this host",
        _ => "the system refused the address",
    }
}

/// The unconnected socket reads one receive in this many when the connected
/// ones had nothing: it hears only datagrams from sources that are not
/// peers (counted and dropped), and an empty read costs a system call.
const MAIN_READ_EVERY: u32 = 8;

/// What one receive on a sync socket gave.
enum Received {
    /// A datagram of this length, in the buffer.
    Frame(usize),
    /// Nothing usable (oversize, an unreachable report, an interrupted
    /// call): counted where it is an event, and the next receive tried.
    Discarded,
    /// The socket had nothing.
    Empty,
}

/// Classifies a receive's result, counting what it discards.
fn received(stats: &mut WireStats, local: SocketAddr, res: io::Result<usize>) -> Result<Received, WireError> {
    match res {
        Ok(n) if n > MAX_WIRE_FRAME => {
            stats.oversize_received += 1;
            Ok(Received::Discarded)
        }
        Ok(n) => Ok(Received::Frame(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received::Empty),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Received::Discarded),
        // A peer's port was closed (an ICMP report, on the next receive).
        Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset) => {
            stats.unreachable += 1;
            Ok(Received::Discarded)
        }
        Err(source) => {
            stats.errors += 1;
            Err(WireError::Recv { addr: local, source })
        }
    }
}

/// A non-blocking UDP socket bound to `local` with `SO_REUSEPORT`, and
/// connected to `peer` if given.
fn shared_socket(local: SocketAddr, peer: Option<SocketAddr>) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.bind(&local.into())?;
    if let Some(p) = peer {
        s.connect(&p.into())?;
    }
    s.set_nonblocking(true)?;
    Ok(s.into())
}

impl UdpPort {
    /// Binds the socket, makes it non-blocking and adds the configured peers.
    pub fn bind(cfg: UdpConfig) -> Result<Self, WireError> {
        let addr = cfg.bind;
        let bind_err = |source: io::Error| WireError::Bind { addr, hint: bind_hint(source.kind()), source };
        // The port's sockets share the address (SO_REUSEPORT), which would
        // also let a second member bound to it by mistake share it silently:
        // a plain bind first says whether anyone holds it.
        if addr.port() != 0 {
            drop(UdpSocket::bind(addr).map_err(bind_err)?);
        }
        let socket = shared_socket(addr, None).map_err(bind_err)?;
        let local = socket.local_addr().map_err(|source| WireError::Setup { addr, source })?;
        let ready = crate::sys::ReadinessSet::new().ok();
        if let Some(r) = &ready {
            if let Err(e) = r.add(std::os::fd::AsFd::as_fd(&socket)) {
                tracing::warn!("sync port {local}: readiness set: {e}");
            }
        }
        let mut port = UdpPort {
            socket,
            member: cfg.member,
            local,
            peers: Vec::with_capacity(cfg.peers.len()),
            links: Vec::with_capacity(cfg.peers.len()),
            next_link: 0,
            since_main: 0,
            ready,
            scratch: vec![0u8; MAX_WIRE_FRAME + 1].into_boxed_slice(),
            stats: WireStats::default(),
        };
        for p in cfg.peers {
            port.add_peer(p)?;
        }
        Ok(port)
    }

    /// The bound address (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The peers.
    pub fn peers(&self) -> &[UdpPeer] {
        &self.peers
    }

    /// Adds a peer (membership changes; ports bound to ephemeral ports learn
    /// each other's addresses after binding).
    pub fn add_peer(&mut self, peer: UdpPeer) -> Result<(), WireError> {
        let addr = canonical(peer.addr);
        let bad = |reason| Err(WireError::BadPeer { addr, reason });
        let ip = addr.ip();
        if ip.is_unspecified() || addr.port() == 0 {
            return bad("unspecified address or port 0");
        }
        if ip.is_multicast() || matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
            return bad("multicast and broadcast are not supported yet; list each peer's unicast address");
        }
        if ip.is_ipv4() != self.local.ip().to_canonical().is_ipv4() {
            return bad("its address family differs from the bound address's");
        }
        if peer.member == Some(self.member) {
            return bad("its member id is this port's own");
        }
        if addr == canonical(self.local) {
            return Err(WireError::PeerIsSelf(addr));
        }
        if self.peers.iter().any(|p| p.addr == addr) {
            return Err(WireError::DuplicatePeer(addr));
        }
        // Without a readiness set a sleeping device thread would not hear
        // a connected socket: then everything goes through the shared one.
        let link = match self.ready.as_ref().map(|_| shared_socket(self.local, Some(addr))) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                tracing::warn!(
                    "sync port {}: no connected socket for peer {addr} ({e}); sending with sendto",
                    self.local
                );
                None
            }
        };
        if let (Some(r), Some(s)) = (&self.ready, &link) {
            if let Err(e) = r.add(std::os::fd::AsFd::as_fd(s)) {
                tracing::warn!("sync port {}: readiness set: {e}", self.local);
            }
        }
        self.peers.push(UdpPeer { addr, member: peer.member });
        self.links.push(link);
        Ok(())
    }

    /// Removes the peer at `addr`; returns whether it was there.
    pub fn remove_peer(&mut self, addr: SocketAddr) -> bool {
        let addr = canonical(addr);
        let Some(i) = self.peers.iter().position(|p| p.addr == addr) else { return false };
        self.peers.remove(i);
        // Closing the connected socket takes it out of the readiness set.
        self.links.remove(i);
        true
    }

    /// Sends to every peer `pick` accepts; per-peer failures are counted and
    /// the first hard one returned after all were tried.
    fn send_filtered(&mut self, frame: &[u8], pick: impl Fn(&UdpPeer) -> bool) -> Result<(), WireError> {
        check_frame(frame, &mut self.stats)?;
        self.stats.frames_sent += 1;
        let mut first_err = None;
        for (p, link) in self.peers.iter().zip(&self.links).filter(|(p, _)| pick(p)) {
            let sent = match link {
                Some(s) => s.send(frame),
                None => self.socket.send_to(frame, p.addr),
            };
            match sent {
                Ok(_) => self.stats.datagrams_sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stats.tx_dropped += 1,
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset) => {
                    self.stats.unreachable += 1
                }
                Err(source) => {
                    self.stats.errors += 1;
                    if first_err.is_none() {
                        first_err = Some(WireError::Send { peer: p.addr, source });
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl SyncPort for UdpPort {
    /// One unicast datagram per peer. A full socket buffer drops that copy
    /// ([`WireStats::tx_dropped`]) and is not an error: the protocol
    /// recovers loss. Other failures are counted and the first returned
    /// after every peer was tried.
    fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        self.send_filtered(frame, |_| true)
    }

    /// To the peers configured with `member`'s id; to every peer when none is.
    fn send_to(&mut self, member: u16, frame: &[u8]) -> Result<(), WireError> {
        if self.peers.iter().any(|p| p.member == Some(member)) {
            self.send_filtered(frame, |p| p.member == Some(member))
        } else {
            self.send_filtered(frame, |_| true)
        }
    }

    /// The next datagram from a configured peer: first from the peers'
    /// connected sockets (round robin), then, one call in `MAIN_READ_EVERY`
    /// when they had nothing (every call for a peer
    /// without one), from the unconnected socket. Oversize datagrams and
    /// datagrams from other sources are dropped and counted, up to
    /// [`RECV_DISCARD_BUDGET`] per call.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        check_buf(buf)?;
        // With room for one byte more than a frame, receive in place;
        // otherwise through the scratch buffer.
        let direct = buf.len() > MAX_WIRE_FRAME;
        let mut budget = RECV_DISCARD_BUDGET;
        let links = self.links.len();
        for k in 0..links {
            let i = (self.next_link + k) % links;
            let Some(sock) = &self.links[i] else { continue };
            while budget > 0 {
                budget -= 1;
                let res = if direct { sock.recv(&mut buf[..=MAX_WIRE_FRAME]) } else { sock.recv(&mut self.scratch) };
                match received(&mut self.stats, self.local, res)? {
                    Received::Empty => break,
                    Received::Discarded => {}
                    Received::Frame(n) => {
                        if !direct {
                            buf[..n].copy_from_slice(&self.scratch[..n]);
                        }
                        self.stats.frames_received += 1;
                        self.next_link = (i + 1) % links;
                        return Ok(Some(n));
                    }
                }
            }
        }
        self.since_main += 1;
        if self.links.iter().all(Option::is_some) && self.since_main < MAIN_READ_EVERY {
            return Ok(None);
        }
        self.since_main = 0;
        while budget > 0 {
            budget -= 1;
            let res = if direct {
                self.socket.recv_from(&mut buf[..=MAX_WIRE_FRAME])
            } else {
                self.socket.recv_from(&mut self.scratch)
            };
            let (res, src) = match res {
                Ok((n, src)) => (Ok(n), Some(src)),
                Err(e) => (Err(e), None),
            };
            match received(&mut self.stats, self.local, res)? {
                Received::Empty => return Ok(None),
                Received::Discarded => {}
                Received::Frame(n) => {
                    let from_peer = src.map(canonical).is_some_and(|a| self.peers.iter().any(|p| p.addr == a));
                    if !from_peer {
                        self.stats.unknown_source += 1;
                        continue;
                    }
                    if !direct {
                        buf[..n].copy_from_slice(&self.scratch[..n]);
                    }
                    self.stats.frames_received += 1;
                    return Ok(Some(n));
                }
            }
        }
        Ok(None)
    }

    fn local_member(&self) -> u16 {
        self.member
    }

    fn stats(&self) -> WireStats {
        self.stats
    }

    /// The port's readiness set (all its sockets); the unconnected socket
    /// where the set could not be made.
    fn readiness_fd(&self) -> Option<std::os::fd::OwnedFd> {
        match &self.ready {
            Some(r) => r.try_clone().ok(),
            None => self.socket.try_clone().ok().map(std::os::fd::OwnedFd::from),
        }
    }
}
