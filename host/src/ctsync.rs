//! Linux conntrack as the table's source and sink (`source = "conntrack"`).
//!
//! **Source.** The kernel's connection-tracking events (NEW, UPDATE,
//! DESTROY, over ctnetlink) become table operations on the card, in
//! batches through the rings; the card's sync unit carries the synced ones
//! to the peers. Only an Active member sources: a Standby's kernel is not
//! the cluster's reference, so its events are counted and left alone. When
//! a member becomes Active, and after every event-socket overrun (ENOBUFS:
//! events were lost), the kernel's table is dumped and the card brought in
//! line: entries the dump shows are upserted, entries this member learnt
//! from its kernel that the dump no longer shows are deleted. Events that
//! arrive while a dump runs win over the dump for the keys they name.
//!
//! **Selective and delayed sync.** A [`SyncFilter`] decides which entries
//! are marked for sync (the others stay on this member's card only); with a
//! delay, a new connection is marked for sync only once it has lived that
//! long, so connections shorter than the delay never reach the peers.
//! Once an entry is synced it stays synced until it is destroyed, so that a
//! peer never keeps a stale copy of it.
//!
//! **Sink.** On becoming Active, the member commits the entries synced to
//! it into its own kernel (conntrackd's `-c`), in bulk, from a thread of
//! its own so that membership keeps running, and reports how many and how
//! long. A Standby keeps them out of its kernel unless `commit = "always"`,
//! which mirrors every change the peers send into the kernel as it comes.
//!
//! The decisions are made by [`KernelFeed`], a sans-IO state machine (unit
//! tested with no kernel); [`KernelLink`] drives it with the sockets.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nicsync_conntrack::{self as ct, CreateMode, CtEntry, CtEvent, CtSocket, EventSocket, Groups};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Nat, TcpState};
use nicsync_vfio::NicDevice;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::membership::MemberState;
use crate::node::{Nanos, Node};
use crate::shadow::{KeyHasher, KeySet};
use crate::table::{ConnEntry, TableError, TableOp};

/// When a member writes synced entries into its own kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CommitMode {
    /// On becoming Active (the default): a Standby's kernel holds only its
    /// own traffic until it takes over.
    #[default]
    OnActive,
    /// On becoming Active, and on a Standby every change the peers send as
    /// it arrives (a warm kernel; costs a netlink request per change).
    Always,
    /// Never: the kernel is left alone (monitoring, or another tool
    /// commits).
    Never,
}

impl CommitMode {
    /// The configuration string.
    pub fn as_str(self) -> &'static str {
        match self {
            CommitMode::OnActive => "on-active",
            CommitMode::Always => "always",
            CommitMode::Never => "never",
        }
    }
}

/// An address prefix (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

impl Prefix {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len.min(32))) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len.min(128))) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{s:?}: not an address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(Prefix { addr, len })
    }
}

/// Which entries are marked for sync. Each list that is not empty must
/// admit the entry; an empty list admits everything.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SyncFilter {
    /// IP protocol numbers.
    pub protocols: Vec<u8>,
    /// The source or the destination must be inside one of these.
    pub addresses: Vec<Prefix>,
    /// Neither the source nor the destination may be inside one of these.
    pub ignore_addresses: Vec<Prefix>,
    /// The source or the destination port must be inside one of these
    /// ranges (entries without ports never match a port list).
    pub ports: Vec<(u16, u16)>,
    /// Neither port may be inside one of these ranges.
    pub ignore_ports: Vec<(u16, u16)>,
    /// TCP entries must be in one of these states (other protocols are not
    /// concerned).
    pub tcp_states: Vec<TcpState>,
}

impl SyncFilter {
    /// Whether the filter has no list set (admits everything).
    pub fn is_empty(&self) -> bool {
        self.protocols.is_empty()
            && self.addresses.is_empty()
            && self.ignore_addresses.is_empty()
            && self.ports.is_empty()
            && self.ignore_ports.is_empty()
            && self.tcp_states.is_empty()
    }

    /// Whether an entry with this key and state is to be synced.
    pub fn admits(&self, key: &ConnKey, state: &ConnState) -> bool {
        if !self.protocols.is_empty() && !self.protocols.contains(&key.proto) {
            return false;
        }
        let ips = [key.src_ip(), key.dst_ip()];
        let inside = |list: &[Prefix]| ips.iter().flatten().any(|ip| list.iter().any(|p| p.contains(*ip)));
        if !self.addresses.is_empty() && !inside(&self.addresses) {
            return false;
        }
        if inside(&self.ignore_addresses) {
            return false;
        }
        let has_ports = matches!(key.proto, proto::TCP | proto::UDP | proto::SCTP);
        let ports = [key.src_port.get(), key.dst_port.get()];
        let in_range =
            |list: &[(u16, u16)]| has_ports && ports.iter().any(|p| list.iter().any(|(a, b)| a <= p && p <= b));
        if !self.ports.is_empty() && !in_range(&self.ports) {
            return false;
        }
        if in_range(&self.ignore_ports) {
            return false;
        }
        if key.proto == proto::TCP && !self.tcp_states.is_empty() {
            match state.tcp() {
                Some(s) if self.tcp_states.contains(&s) => {}
                _ => return false,
            }
        }
        true
    }
}

/// `[conntrack]`: how the kernel's table feeds the card and back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// When synced entries are written into this member's kernel.
    pub commit: CommitMode,
    /// A new connection is synced only once it has lived this long (zero:
    /// at once).
    pub delay: Duration,
    /// Which entries are synced.
    pub filter: SyncFilter,
    /// Receive buffer asked for the event socket (bytes).
    pub event_buffer_bytes: usize,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            commit: CommitMode::OnActive,
            delay: Duration::ZERO,
            filter: SyncFilter::default(),
            event_buffer_bytes: ct::client::EVENT_RCVBUF,
        }
    }
}

/// Counters of the conntrack source and sink (`syncstat`'s `conntrack`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ConntrackStats {
    /// NEW events.
    pub events_new: u64,
    /// UPDATE events.
    pub events_update: u64,
    /// DESTROY events.
    pub events_destroy: u64,
    /// Events caused by this daemon's own commits (recognised by their
    /// netlink origin and not fed back).
    pub events_own: u64,
    /// Events received while not Active (not sourced).
    pub events_while_standby: u64,
    /// Events and dump entries of the cluster's own sync, membership and
    /// Full Sync traffic: never sourced (replicating them would be noise,
    /// and committing them on a peer would be wrong).
    pub own_traffic: u64,
    /// Events or dump entries nicsync cannot represent (double NAT,
    /// non-echo ICMP, ...): left out.
    pub unmappable: u64,
    /// Messages that did not parse (handled as an overrun).
    pub unparsed: u64,
    /// Event-socket overruns (ENOBUFS): each starts a resynchronising dump.
    pub overruns: u64,
    /// Dumps started (on becoming Active and after overruns).
    pub dumps_started: u64,
    /// Dumps completed.
    pub dumps_completed: u64,
    /// Dumps that failed (retried).
    pub dumps_failed: u64,
    /// Entries the dumps delivered.
    pub dump_entries: u64,
    /// Entries a dump removed from the card: gone from the kernel while
    /// their DESTROY events were lost.
    pub dump_removed: u64,
    /// Duration of the last dump, from its start to the card being in line.
    pub last_dump_ms: Option<f64>,
    /// Table changes put on the card, synced or not.
    pub table_ops: u64,
    /// Events and dump entries that changed nothing nicsync carries (the
    /// card already had them): not sent.
    pub unchanged: u64,
    /// TCP UPDATE events without protocol info (a mark, label or helper
    /// change) that kept the TCP state the card had.
    pub kept_tcp_state: u64,
    /// Table operations the card refused (table full, ...).
    pub table_errors: u64,
    /// Entries currently known from this member's kernel.
    pub entries_known: u64,
    /// Upserts left on this member's card only by the sync filter.
    pub filtered: u64,
    /// New connections held back by the sync delay.
    pub delayed: u64,
    /// Held connections that outlived the delay and were then synced.
    pub delayed_synced: u64,
    /// Held connections destroyed within the delay: never synced.
    pub delayed_never_synced: u64,
    /// Connections held right now.
    pub delayed_pending: u64,
    /// Commits into the kernel (takeovers, plus one per change mirrored on a
    /// Standby with `commit = "always"`).
    pub commits: u64,
    /// Entries written into the kernel by the last takeover commit.
    pub last_commit_entries: u64,
    /// Entries the kernel already held at the last takeover commit.
    pub last_commit_present: u64,
    /// Entries the kernel refused at the last takeover commit.
    pub last_commit_failed: u64,
    /// Synced entries that could not be expressed for the kernel.
    pub last_commit_unmappable: u64,
    /// Time from becoming Active to the last takeover commit's end.
    pub last_commit_ms: Option<f64>,
    /// Entries committed in all.
    pub committed_entries: u64,
    /// Kernel refusals in all (errno counts in the log).
    pub commit_failed: u64,
    /// Changes mirrored into the kernel on a Standby (`commit = "always"`).
    pub mirrored: u64,
    /// Changes (upserts; never deletes) not mirrored: the commit thread had
    /// [`MIRROR_QUEUE`] of them waiting (a flood of peer updates faster
    /// than the kernel takes them one request each), the member became
    /// Active before their turn (its takeover commit then writes what the
    /// card holds), or the card's entry could not be read.
    pub mirror_dropped: u64,
    /// The last error the source or sink met.
    pub last_error: Option<String>,
}

/// What the feed remembers of an entry it learnt from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Known {
    /// Marked for sync.
    synced: bool,
    /// [`fingerprint`] of what the card holds (0: not known).
    print: u64,
    /// Number of the last dump that showed it (0: none): the sweep at the
    /// end of a dump walks this map once, without a set of the keys seen
    /// (a million hashed lookups held the member's loop for 0.2 s).
    dump: u32,
    /// The TCP state the card was given (0: none, or not known): an UPDATE
    /// the kernel sends without protocol info (a mark, label or helper
    /// change) keeps it.
    tcp: u8,
}

/// A hash of what nicsync carries of an entry, less what the kernel changes
/// without news (the timeout) and what the card assigns (the generation):
/// an event or dump entry with the same fingerprint changes nothing.
///
/// Hashed as the copy's keys are (foldhash, seeded at random once per
/// process: the entries come from the kernel, on behalf of whoever opens
/// connections, and no one can aim two at one fingerprint without the
/// seed); SipHash took a few percent of a busy member's loop.
fn fingerprint(state: &ConnState, nat: &Nat) -> u64 {
    use std::hash::BuildHasher;
    static SEED: std::sync::OnceLock<KeyHasher> = std::sync::OnceLock::new();
    let fields = (state.tcp_state, state.direction, state.flags.get(), state.mark.get());
    SEED.get_or_init(KeyHasher::default).hash_one((fields, zerocopy::IntoBytes::as_bytes(nat))) | 1
}

/// Entries in this network namespace's connection tracking table, as
/// `nf_conntrack_count` tells; `None` if it cannot be read.
fn kernel_entry_count() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count").ok()?.trim().parse().ok()
}

/// An entry held back by the sync delay.
#[derive(Clone, Copy, Debug)]
struct Held {
    until: Nanos,
    entry: ConnEntry,
}

/// The dump in progress.
#[derive(Debug, Default)]
struct Resync {
    started: Nanos,
    /// Its number (from 1), as [`Known::dump`] records it.
    number: u32,
    /// Keys that events named since the dump began: their events win.
    touched: KeySet,
    /// Another overrun came during this dump: dump again when it ends.
    again: bool,
}

/// What the runtime must do after feeding an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedAction {
    /// Nothing more.
    None,
    /// Events were lost: dump the kernel's table.
    Dump,
}

/// The source's decisions, with no I/O: what goes on the card, marked for
/// sync or not, when held entries are released, what a dump changes.
#[derive(Debug)]
pub struct KernelFeed {
    cfg: ConntrackConfig,
    /// Keys learnt from this member's kernel, with whether they are synced.
    known: HashMap<ConnKey, Known, KeyHasher>,
    held: HashMap<ConnKey, Held, KeyHasher>,
    hold_queue: VecDeque<(Nanos, ConnKey)>,
    /// Deletes whose whole batch failed (the card was being recovered):
    /// sent again with the next events, unless the key came back since.
    redo_deletes: Vec<ConnKey>,
    resync: Option<Resync>,
    /// Dumps begun (numbers them).
    dumps: u32,
    own_port: u32,
    active: bool,
    /// This member's cluster sockets (address, port; an unspecified
    /// address matches any of this host's).
    binds: Vec<(IpAddr, u16)>,
    /// The peers' cluster sockets.
    peers: Vec<(IpAddr, u16)>,
    stats: ConntrackStats,
}

impl KernelFeed {
    /// A feed with nothing known, not Active.
    pub fn new(cfg: ConntrackConfig) -> Self {
        KernelFeed {
            cfg,
            known: HashMap::default(),
            held: HashMap::default(),
            hold_queue: VecDeque::new(),
            redo_deletes: Vec::new(),
            resync: None,
            dumps: 0,
            own_port: 0,
            active: false,
            binds: Vec::new(),
            peers: Vec::new(),
            stats: ConntrackStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ConntrackConfig {
        &self.cfg
    }

    /// The netlink port id of the socket this daemon commits with: events
    /// it caused are not fed back.
    pub fn set_own_port(&mut self, port: u32) {
        self.own_port = port;
    }

    /// The cluster's own sockets: this member's binds and its peers'
    /// addresses. The cluster's connections (sync, membership, Full Sync)
    /// are never sourced: those with a peer's socket at one end, those
    /// with a bind of this member at one end, and, for a bind to the
    /// unspecified address, only those whose other end is a peer's
    /// address (a forwarded connection to another host's port 8118 is not
    /// the cluster's).
    pub fn set_cluster_endpoints(&mut self, binds: &[std::net::SocketAddr], peers: &[std::net::SocketAddr]) {
        let canon = |eps: &[std::net::SocketAddr]| eps.iter().map(|a| (a.ip().to_canonical(), a.port())).collect();
        self.binds = canon(binds);
        self.peers = canon(peers);
    }

    fn is_cluster_traffic(&self, key: &ConnKey) -> bool {
        if !matches!(key.proto, proto::TCP | proto::UDP) || self.binds.is_empty() && self.peers.is_empty() {
            return false;
        }
        let (Some(src), Some(dst)) = (key.src_ip(), key.dst_ip()) else { return false };
        let (src, dst) = (src.to_canonical(), dst.to_canonical());
        let ends = [(src, key.src_port.get(), dst), (dst, key.dst_port.get(), src)];
        let a_peer = |ip: &IpAddr| self.peers.iter().any(|(a, _)| a == ip);
        ends.iter().any(|(ip, port, other)| {
            self.peers.iter().any(|(a, p)| p == port && a == ip)
                || self.binds.iter().any(|(a, p)| p == port && (a == ip || a.is_unspecified() && a_peer(other)))
        })
    }

    /// Whether this member sources (it is Active). Leaving Active drops the
    /// held entries' timers (the next Active decides for them).
    pub fn set_active(&mut self, active: bool) {
        if self.active && !active {
            self.held.clear();
            self.hold_queue.clear();
            self.redo_deletes.clear();
            self.resync = None;
            // What a Standby's card holds of the entries kept off the
            // cluster (filtered, or held by the delay) is not this member's
            // to know any more: a Full Sync empties the card and brings
            // back only synced entries. The dump at the next takeover puts
            // them on the card again rather than take them for unchanged.
            for k in self.known.values_mut().filter(|k| !k.synced) {
                k.print = 0;
            }
        }
        self.active = active;
    }

    /// Whether a dump is in progress.
    pub fn dumping(&self) -> bool {
        self.resync.is_some()
    }

    /// Whether `key` was learnt from this member's kernel.
    pub fn knows(&self, key: &ConnKey) -> bool {
        self.known.contains_key(key)
    }

    /// The counters.
    pub fn stats(&self) -> ConntrackStats {
        let mut s = self.stats.clone();
        s.entries_known = self.known.len() as u64;
        s.delayed_pending = self.held.len() as u64;
        s
    }

    /// Records an error for `syncstat`.
    pub fn note_error(&mut self, why: String) {
        tracing::warn!("conntrack: {why}");
        self.stats.last_error = Some(why);
    }

    /// Feeds one event; table operations are appended to `ops`.
    pub fn event(&mut self, ev: CtEvent, origin: u32, now: Nanos, ops: &mut Vec<TableOp>) -> FeedAction {
        let (entry, destroy) = match ev {
            CtEvent::New(e) => {
                self.stats.events_new += 1;
                (e, false)
            }
            CtEvent::Update(e) => {
                self.stats.events_update += 1;
                (e, false)
            }
            CtEvent::Destroy(e) => {
                self.stats.events_destroy += 1;
                (e, true)
            }
            CtEvent::Overrun => {
                self.stats.overruns += 1;
                return self.lost();
            }
            CtEvent::Unparsed(e) => {
                self.stats.unparsed += 1;
                self.note_error(format!("event did not parse ({e}): resynchronising"));
                return self.lost();
            }
        };
        let mut mapped = match ct::from_ct(&entry) {
            Ok(m) => m,
            Err(_) => {
                self.stats.unmappable += 1;
                return FeedAction::None;
            }
        };
        if self.is_cluster_traffic(&mapped.key) {
            self.stats.own_traffic += 1;
            return FeedAction::None;
        }
        if origin != 0 && origin == self.own_port {
            // The kernel telling us about our own commit: the card already
            // has it, and it is in the kernel now.
            self.stats.events_own += 1;
            if destroy {
                self.known.remove(&mapped.key);
            } else {
                // In the kernel now: a dump in progress must not take it
                // for gone if its batch naming it came before this event.
                let dump = self.resync.as_ref().map_or(0, |r| r.number);
                if let Some(r) = self.resync.as_mut() {
                    r.touched.insert(mapped.key);
                }
                let tcp = mapped.state.tcp_state;
                self.known.insert(mapped.key, Known { synced: true, print: 0, dump, tcp });
            }
            return FeedAction::None;
        }
        if !self.active {
            self.stats.events_while_standby += 1;
            if destroy {
                // Gone from this kernel: at a takeover the card's entry is
                // committed again rather than skipped as "the kernel may
                // have it" (then swept by the dump after, everywhere).
                self.known.remove(&mapped.key);
            }
            return FeedAction::None;
        }
        if let Some(r) = self.resync.as_mut() {
            r.touched.insert(mapped.key);
        }
        // The kernel leaves protocol info out of an UPDATE that changed
        // something else (a mark, a label, a helper): the TCP state is then
        // not NONE but what it was.
        if !destroy && entry.tcp_state.is_none() && mapped.key.proto == proto::TCP {
            if let Some(k) = self.known.get(&mapped.key).filter(|k| k.tcp != 0) {
                mapped.state.tcp_state = k.tcp;
                self.stats.kept_tcp_state += 1;
            }
        }
        if destroy {
            self.forget(&mapped.key, ops);
        } else {
            self.learn(mapped.key, mapped.state, mapped.nat, true, now, ops);
        }
        FeedAction::None
    }

    fn lost(&mut self) -> FeedAction {
        if !self.active {
            // A Standby reads DESTROY events only to keep `known` honest
            // (a takeover skips the card's entries this kernel may hold).
            // Some are lost now: the takeover commits every entry instead
            // (those this kernel has answer EEXIST), rather than skip one
            // this kernel dropped and then sweep it from the cluster as
            // gone.
            self.known.clear();
            return FeedAction::None;
        }
        match self.resync.as_mut() {
            Some(r) => {
                r.again = true;
                FeedAction::None
            }
            None => FeedAction::Dump,
        }
    }

    fn forget(&mut self, key: &ConnKey, ops: &mut Vec<TableOp>) {
        self.known.remove(key);
        if self.held.remove(key).is_some() {
            self.stats.delayed_never_synced += 1;
            // The queue keeps a gone connection's place until its delay
            // ends: under a flood of short connections (a SYN flood, with a
            // delay of minutes) it would grow with rate × delay. Compacted
            // once it is mostly such places (amortised: each pass at least
            // halves it).
            if self.hold_queue.len() > 2 * self.held.len() + HOLD_QUEUE_SLACK {
                let held = &self.held;
                self.hold_queue.retain(|(until, k)| held.get(k).is_some_and(|h| h.until == *until));
            }
        }
        ops.push(TableOp::Delete(*key));
    }

    /// Puts an entry on the card; `fresh` when an event (not a dump) shows
    /// it, so that the delay applies to it.
    fn learn(&mut self, key: ConnKey, mut state: ConnState, nat: Nat, fresh: bool, now: Nanos, ops: &mut Vec<TableOp>) {
        // The kernel ages its entries and says so with DESTROY; its timeout
        // is refreshed by packets without events, so the card must not age
        // them on its own.
        state.timeout_s = 0.into();
        let prior = self.known.get(&key).copied();
        let dump = match (&self.resync, fresh) {
            (Some(r), false) => r.number,
            _ => prior.map_or(0, |p| p.dump),
        };
        let synced = prior.map(|k| k.synced);
        let held = self.held.contains_key(&key);
        let sync = match synced {
            Some(true) => true,
            _ if !self.cfg.filter.admits(&key, &state) => {
                self.stats.filtered += 1;
                false
            }
            _ if held => false,
            // New to this member, or admitted only now (a TCP-state filter
            // that refused its first states), seen by an event: hold it for
            // the delay.
            None | Some(false) if fresh && !self.cfg.delay.is_zero() => {
                let until = now.saturating_add(self.cfg.delay.as_nanos() as u64);
                self.hold_queue.push_back((until, key));
                self.stats.delayed += 1;
                self.held.insert(key, Held { until, entry: ConnEntry { state, nat: Some(nat) } });
                false
            }
            _ => true,
        };
        if let Some(h) = self.held.get_mut(&key) {
            h.entry = ConnEntry { state, nat: Some(nat) };
        }
        if sync {
            state.flags = (state.conn_flags() | ConnFlags::SYNC).bits().into();
        }
        let print = fingerprint(&state, &nat);
        self.known.insert(key, Known { synced: sync, print, dump, tcp: state.tcp_state });
        if prior.is_some_and(|p| p.synced == sync && p.print == print) {
            // The card has this already (a dump after an overrun, or an
            // event about the timeout only): nothing to send.
            self.stats.unchanged += 1;
            return;
        }
        self.stats.table_ops += 1;
        ops.push(TableOp::Upsert(key, ConnEntry { state, nat: Some(nat) }));
    }

    /// The deletes of failed batches again (those whose key this member has
    /// not learnt again since), into `ops`.
    pub fn redo_failed_deletes(&mut self, ops: &mut Vec<TableOp>) {
        for k in std::mem::take(&mut self.redo_deletes) {
            if !self.known.contains_key(&k) {
                ops.push(TableOp::Delete(k));
            }
        }
    }

    /// When the next held entry is due.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.hold_queue.front().map(|(t, _)| *t)
    }

    /// Releases the held entries that are due: those still admitted are
    /// marked for sync.
    pub fn handle_timeout(&mut self, now: Nanos, ops: &mut Vec<TableOp>) {
        while let Some(&(until, key)) = self.hold_queue.front() {
            if until > now {
                break;
            }
            self.hold_queue.pop_front();
            let Some(h) = self.held.get(&key).copied() else { continue };
            if h.until != until {
                continue;
            }
            self.held.remove(&key);
            let mut state = h.entry.state;
            if !self.cfg.filter.admits(&key, &state) {
                continue;
            }
            state.flags = (state.conn_flags() | ConnFlags::SYNC).bits().into();
            let print = h.entry.nat.map_or(0, |n| fingerprint(&state, &n));
            let dump = self.known.get(&key).map_or(0, |k| k.dump);
            self.known.insert(key, Known { synced: true, print, dump, tcp: state.tcp_state });
            self.stats.delayed_synced += 1;
            self.stats.table_ops += 1;
            ops.push(TableOp::Upsert(key, ConnEntry { state, nat: h.entry.nat }));
        }
    }

    /// A dump of the kernel's table begins.
    pub fn begin_dump(&mut self, now: Nanos) {
        self.stats.dumps_started += 1;
        self.dumps = self.dumps.wrapping_add(1).max(1);
        self.resync = Some(Resync { started: now, number: self.dumps, ..Default::default() });
    }

    /// Room for `entries` known entries in all, made before a dump or a
    /// commit brings them (growing a map of a million entries one doubling
    /// at a time rehashes it whole, in the member's loop, each time).
    pub fn reserve(&mut self, entries: usize) {
        self.known.reserve(entries.saturating_sub(self.known.len()));
    }

    /// Entries of the dump in progress.
    pub fn dump_entries(&mut self, entries: &[CtEntry], now: Nanos, ops: &mut Vec<TableOp>) {
        if !self.active {
            return;
        }
        for e in entries {
            self.stats.dump_entries += 1;
            let Ok(m) = ct::from_ct(e) else {
                self.stats.unmappable += 1;
                continue;
            };
            if self.is_cluster_traffic(&m.key) {
                self.stats.own_traffic += 1;
                continue;
            }
            let Some(r) = self.resync.as_ref() else { return };
            if r.touched.contains(&m.key) {
                let n = r.number;
                if let Some(k) = self.known.get_mut(&m.key) {
                    k.dump = n;
                }
                continue;
            }
            // Already on the card in this state: nothing to send.
            self.learn(m.key, m.state, m.nat, false, now, ops);
        }
    }

    /// The dump ended. On success, what this member learnt from its kernel
    /// and the dump no longer shows is deleted. Returns whether to dump
    /// again (an overrun came meanwhile, or the dump failed).
    pub fn end_dump(&mut self, result: Result<(), String>, now: Nanos, ops: &mut Vec<TableOp>) -> bool {
        let Some(r) = self.resync.take() else { return false };
        if let Err(e) = result {
            self.stats.dumps_failed += 1;
            self.note_error(format!("dump of the kernel's table failed: {e}"));
            return self.active;
        }
        if !self.active {
            return false;
        }
        let gone: Vec<ConnKey> = self
            .known
            .iter()
            .filter(|(k, v)| v.dump != r.number && (r.touched.is_empty() || !r.touched.contains(*k)))
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            self.forget(k, ops);
        }
        self.stats.dump_removed += gone.len() as u64;
        self.stats.dumps_completed += 1;
        self.stats.last_dump_ms = Some(now.saturating_sub(r.started) as f64 / 1e6);
        r.again
    }

    /// Counts the outcome of operations this feed produced (`ops`, in
    /// order; `Err` when the whole batch failed). A write the card did not
    /// take is not remembered as on the card: the next event or dump
    /// showing the entry sends it again.
    pub fn table_results(&mut self, ops: &[TableOp], results: Result<&[Result<u32, TableError>], String>) {
        let failed = |feed: &mut Self, op: &TableOp| {
            if let TableOp::Upsert(k, _) = op {
                if let Some(known) = feed.known.get_mut(k) {
                    known.print = 0;
                }
            }
        };
        match results {
            Ok(results) => {
                for (op, r) in ops.iter().zip(results) {
                    match r {
                        Ok(_) | Err(TableError::NotFound) => {}
                        Err(e) => {
                            self.stats.table_errors += 1;
                            self.stats.last_error = Some(format!("card refused a table change: {e}"));
                            failed(self, op);
                        }
                    }
                }
            }
            Err(why) => {
                self.stats.table_errors += ops.len() as u64;
                self.note_error(format!("table batch failed: {why}"));
                for op in ops {
                    failed(self, op);
                    // No later event or dump names a connection the kernel
                    // destroyed: left on the card, it would stay there
                    // (synced, never aged).
                    if let TableOp::Delete(k) = op {
                        self.redo_deletes.push(*k);
                    }
                }
            }
        }
    }

    /// Entries committed into the kernel are this member's kernel's now
    /// (with the TCP state the card holds, which an UPDATE without
    /// protocol info keeps).
    pub fn committed(&mut self, keys: &[(ConnKey, u8)]) {
        self.reserve(self.known.len() + keys.len());
        for &(k, tcp) in keys {
            let dump = self.known.get(&k).map_or(0, |k| k.dump);
            self.known.insert(k, Known { synced: true, print: 0, dump, tcp });
        }
    }
}

/// The kernel's default timeout for an entry in this state (the
/// `nf_conntrack_*_timeout*` sysctls' defaults), used when committing an
/// entry whose timeout the kernel drives (0 on the card). The next packet
/// refreshes it to whatever the committing kernel is configured with.
pub fn default_timeout_s(key: &ConnKey, state: &ConnState) -> u32 {
    match key.proto {
        proto::TCP => match state.tcp() {
            Some(TcpState::Established) => 432_000,
            Some(TcpState::SynSent | TcpState::SynSent2 | TcpState::FinWait | TcpState::TimeWait) => 120,
            Some(TcpState::SynRecv | TcpState::CloseWait) => 60,
            Some(TcpState::LastAck) => 30,
            Some(TcpState::Close) => 10,
            _ => 300,
        },
        proto::UDP => {
            if state.conn_flags().contains(ConnFlags::ASSURED) {
                120
            } else {
                30
            }
        }
        proto::ICMP | proto::ICMPV6 => 30,
        _ => 600,
    }
}

/// The kernel entry that commits a card entry.
pub fn commit_entry(key: &ConnKey, state: &ConnState, nat: &Nat) -> Result<CtEntry, ct::MapError> {
    let mut s = *state;
    if s.timeout_s.get() == 0 {
        s.timeout_s = default_timeout_s(key, state).into();
    }
    ct::to_ct(key, &s, nat)
}

// ---------------------------------------------------------------------------
// The I/O side.

/// Messages from the dump and commit threads.
#[derive(Debug)]
pub(crate) enum LinkMsg {
    /// Entries of dump number `.0`.
    DumpEntries(u64, Vec<CtEntry>),
    /// Dump number `.0` ended.
    DumpDone(u64, Result<(), String>),
    CommitDone(CommitReport),
}

#[derive(Debug)]
enum CommitJob {
    /// A takeover: write these, report.
    /// `keys`: each entry's key and the TCP state the card holds for it.
    Takeover { entries: Vec<CtEntry>, keys: Vec<(ConnKey, u8)>, unmappable: u64, since: Instant },
    /// A Standby mirroring one change (`commit = "always"`), sent while
    /// the link was in mirroring spell `spell` (one ends at each takeover).
    Mirror { upsert: Option<Box<CtEntry>>, delete: Option<Box<CtEntry>>, spell: u64 },
}

#[derive(Debug)]
pub(crate) struct CommitReport {
    takeover: bool,
    keys_ok: Vec<(ConnKey, u8)>,
    written: u64,
    present: u64,
    failed: Vec<i32>,
    unmappable: u64,
    since: Instant,
    error: Option<String>,
}

impl CommitReport {
    /// Nothing done yet.
    fn new(takeover: bool, unmappable: u64, since: Instant) -> Self {
        CommitReport {
            takeover,
            keys_ok: Vec::new(),
            written: 0,
            present: 0,
            failed: Vec::new(),
            unmappable,
            since,
            error: None,
        }
    }

    /// Takes in what the kernel answered for a takeover commit of `keys`
    /// (in the order sent): what it wrote, had already (`EEXIST`) and
    /// refused, and the keys that are in it now. A commit that broke off
    /// partway reports what got in before, with its error, not nothing.
    fn take_outcome(
        &mut self,
        keys: &[(ConnKey, u8)],
        out: &nicsync_conntrack::BatchOutcome,
        error: Option<ct::CtError>,
    ) {
        let answered = keys.get(..out.answered).unwrap_or(keys);
        let mut bad = vec![false; answered.len()];
        for &(i, errno) in &out.failed {
            if errno == libc::EEXIST {
                self.present += 1;
            } else {
                self.failed.push(errno);
                if let Some(b) = bad.get_mut(i) {
                    *b = true;
                }
            }
        }
        self.written = out.ok as u64;
        self.keys_ok = answered.iter().zip(&bad).filter(|(_, b)| !**b).map(|(k, _)| *k).collect();
        if let Some(e) = error {
            let left = keys.len() - answered.len();
            self.error = Some(format!("{e} ({left} entries not answered for)"));
        }
    }
}

/// Places in the delay's queue beyond twice the connections held before
/// it is compacted.
const HOLD_QUEUE_SLACK: usize = 4096;

/// Mirror jobs (one netlink request each) a Standby lets wait for the
/// commit thread before it drops the next ones (counted): a flood of peer
/// updates faster than the kernel takes them would otherwise queue without
/// bound, and hold a takeover's commit behind it.
pub const MIRROR_QUEUE: usize = 65_536;

/// Mirror jobs waiting, shared by the link and its commit thread.
#[derive(Debug, Default)]
struct MirrorQueue {
    pending: AtomicUsize,
    /// Bumped at each takeover: jobs of an earlier spell are dropped.
    spell: AtomicU64,
    /// Jobs dropped as of an earlier spell.
    stale: AtomicU64,
}

/// Batches per dump message.
const DUMP_BATCH: usize = 4096;

/// Retry delay for a failed dump.
const DUMP_RETRY: Duration = Duration::from_secs(1);

/// Walking of the card for a takeover commit per loop tick.
const WALK_BUDGET: Duration = Duration::from_millis(3);

/// Table operations per batch through the rings.
const OPS_PER_BATCH: usize = 1024;

/// Table operations, and events read, per turn of the member's loop: a
/// flood of events is worked off in turns between which membership probes
/// go out (a loop held for tens of milliseconds looks dead to the peers:
/// turns of 8,192 took 40-50 ms here, back to back, and the Standby took
/// over in the middle of a flood).
const OPS_PER_TURN: usize = 1024;

/// Why the conntrack link could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The kernel's conntrack could not be reached.
    #[error("conntrack: {0} (is nf_conntrack loaded, and does the daemon have CAP_NET_ADMIN?)")]
    Kernel(#[from] ct::CtError),
    /// The event socket could not be registered.
    #[error("conntrack: registering the event socket: {0}")]
    Io(#[from] std::io::Error),
    /// A worker thread could not be started.
    #[error("conntrack: starting the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
}

/// The conntrack source and sink of a running member: the event socket in
/// the member's loop, a thread for dumps, a thread for commits.
pub struct KernelLink {
    feed: KernelFeed,
    events: AsyncFd<EventSocket>,
    tx: mpsc::UnboundedSender<LinkMsg>,
    rx: mpsc::UnboundedReceiver<LinkMsg>,
    commit_tx: std_mpsc::Sender<CommitJob>,
    /// Mirror jobs waiting for the commit thread, and the spell they
    /// belong to (shared with it).
    mirrors: Arc<MirrorQueue>,
    /// Table operations decided and not yet put on the card: applied
    /// [`OPS_PER_TURN`] per turn of the member's loop.
    ops: Vec<TableOp>,
    /// The last read stopped at its budget: more events may be queued.
    more_events: bool,
    /// Number of the dump in progress (or last started).
    dump_number: u64,
    was_active: bool,
    /// The takeover's walk of the card, a chunk per tick, so that the
    /// member's loop (membership probes) keeps running through a large
    /// table.
    walk: Option<TakeoverWalk>,
    /// A takeover commit runs; the activation dump waits for it.
    committing: bool,
    dump_wanted: bool,
    dump_retry_at: Option<Instant>,
    /// Room to make in the card's host copy when the dump's first entries
    /// come (the kernel's count when it began).
    reserve_copy: Option<usize>,
}

impl std::fmt::Debug for KernelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLink").field("feed", &self.feed).finish_non_exhaustive()
    }
}

/// A takeover commit being gathered from the card.
#[derive(Debug)]
struct TakeoverWalk {
    cursor: u32,
    seen: KeySet,
    entries: Vec<CtEntry>,
    keys: Vec<(ConnKey, u8)>,
    unmappable: u64,
    since: Instant,
    chunk: Vec<nicsync_fwif::sync::DeltaUpdate>,
}

/// What woke the member's loop for the link.
#[derive(Debug)]
pub(crate) enum LinkWake {
    /// Events are queued on the socket.
    Events,
    /// Table operations of an earlier turn are left.
    Apply,
    /// A thread reported.
    Msg(LinkMsg),
}

impl KernelLink {
    /// Subscribes to the kernel's events in the calling thread's network
    /// namespace and starts the commit thread. Must run inside a tokio
    /// runtime.
    pub fn open(
        cfg: ConntrackConfig,
        binds: &[std::net::SocketAddr],
        peers: &[std::net::SocketAddr],
    ) -> Result<Self, LinkError> {
        let events = EventSocket::open_with_buffer(Groups::ALL, cfg.event_buffer_bytes)?;
        let granted = events.receive_buffer().unwrap_or(0);
        tracing::info!(
            "conntrack: subscribed to NEW/UPDATE/DESTROY events ({} KiB receive buffer), commit {}, sync delay {} ms{}",
            granted / 1024,
            cfg.commit.as_str(),
            cfg.delay.as_millis(),
            if cfg.filter.is_empty() { "" } else { ", sync filter set" }
        );
        let mut sock = CtSocket::open()?;
        let mut feed = KernelFeed::new(cfg);
        feed.set_own_port(sock.port_id());
        feed.set_cluster_endpoints(binds, peers);
        let (tx, rx) = mpsc::unbounded_channel();
        let (commit_tx, commit_rx) = std_mpsc::channel::<CommitJob>();
        let report = tx.clone();
        let mirrors = Arc::new(MirrorQueue::default());
        let queue = Arc::clone(&mirrors);
        std::thread::Builder::new()
            .name("nicsync-ct-commit".into())
            .spawn(move || {
                while let Ok(job) = commit_rx.recv() {
                    if let CommitJob::Mirror { spell, upsert, .. } = &job {
                        queue.pending.fetch_sub(1, Ordering::AcqRel);
                        // An upsert queued before a takeover is dropped:
                        // the takeover commit wrote what the card held. A
                        // delete never is: the takeover does not remove
                        // what the card no longer holds, and the dump after
                        // it would find the connection in the kernel and
                        // sync it back to every member.
                        if upsert.is_some() && *spell != queue.spell.load(Ordering::Acquire) {
                            queue.stale.fetch_add(1, Ordering::AcqRel);
                            continue;
                        }
                    }
                    let msg = run_commit(&mut sock, job);
                    if report.send(LinkMsg::CommitDone(msg)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| LinkError::Thread("commit", e))?;
        Ok(KernelLink {
            feed,
            events: AsyncFd::new(events)?,
            tx,
            rx,
            commit_tx,
            mirrors,
            ops: Vec::new(),
            more_events: false,
            dump_number: 0,
            was_active: false,
            walk: None,
            committing: false,
            dump_wanted: false,
            reserve_copy: None,
            dump_retry_at: None,
        })
    }

    /// The counters.
    pub fn stats(&self) -> ConntrackStats {
        let mut s = self.feed.stats();
        s.mirror_dropped += self.mirrors.stale.load(Ordering::Acquire);
        s
    }

    /// Waits for events or a thread's report; at once while work of an
    /// earlier turn is left (events still queued, table operations not yet
    /// applied).
    pub(crate) async fn wait(&mut self) -> LinkWake {
        if !self.ops.is_empty() {
            return LinkWake::Apply;
        }
        if self.more_events {
            return LinkWake::Events;
        }
        tokio::select! {
            g = self.events.readable_mut() => {
                if let Ok(mut g) = g {
                    // Cleared before reading: whatever comes after the read
                    // drains the socket raises readiness again.
                    g.clear_ready();
                }
                LinkWake::Events
            }
            Some(m) = self.rx.recv() => LinkWake::Msg(m),
        }
    }

    /// Handles what [`KernelLink::wait`] returned.
    pub(crate) fn handle<D: NicDevice>(&mut self, wake: LinkWake, node: &mut Node<D>, now: Nanos) {
        match wake {
            LinkWake::Events => self.read_events(node, now),
            LinkWake::Apply => self.apply(node),
            LinkWake::Msg(m) => self.on_msg(m, node, now),
        }
    }

    fn read_events<D: NicDevice>(&mut self, node: &mut Node<D>, now: Nanos) {
        let mut lost = false;
        self.feed.redo_failed_deletes(&mut self.ops);
        let feed = &mut self.feed;
        let ops = &mut self.ops;
        let r = self.events.get_mut().read_up_to(OPS_PER_TURN, |ev, origin| {
            if feed.event(ev, origin, now, ops) == FeedAction::Dump {
                lost = true;
            }
        });
        match r {
            Ok((_, drained)) => self.more_events = !drained,
            Err(e) => {
                self.more_events = false;
                self.feed.note_error(format!("reading events: {e}"));
                lost = true;
            }
        }
        if lost {
            tracing::warn!("conntrack: events were lost (socket overrun): dumping the kernel's table");
            self.dump_wanted = true;
        }
        self.apply(node);
        self.start_dump_if_wanted(now);
    }

    /// Puts up to [`OPS_PER_TURN`] of the decided operations on the card,
    /// in order; the rest wait for the next turn.
    fn apply<D: NicDevice>(&mut self, node: &mut Node<D>) {
        if self.ops.is_empty() {
            return;
        }
        let n = self.ops.len().min(OPS_PER_TURN);
        for chunk in self.ops[..n].chunks(OPS_PER_BATCH) {
            match node.table().batch(chunk) {
                Ok(results) => self.feed.table_results(chunk, Ok(&results)),
                Err(e) => self.feed.table_results(chunk, Err(e.to_string())),
            }
        }
        self.ops.drain(..n);
    }

    fn on_msg<D: NicDevice>(&mut self, msg: LinkMsg, node: &mut Node<D>, now: Nanos) {
        match msg {
            // A dump abandoned when the member left Active (its thread
            // still running) must not feed, or end, the one after it.
            LinkMsg::DumpEntries(n, _) | LinkMsg::DumpDone(n, _) if n != self.dump_number => {}
            LinkMsg::DumpEntries(_, entries) => {
                if let Some(n) = self.reserve_copy.take() {
                    node.table().reserve_copy(n);
                }
                self.feed.dump_entries(&entries, now, &mut self.ops);
                self.apply(node);
            }
            LinkMsg::DumpDone(_, result) => {
                let failed = result.is_err();
                if self.feed.end_dump(result, now, &mut self.ops) {
                    self.dump_wanted = true;
                    if failed {
                        self.dump_retry_at = Some(Instant::now() + DUMP_RETRY);
                    }
                }
                self.apply(node);
                if let Some(ms) = self.feed.stats.last_dump_ms.filter(|_| !failed) {
                    tracing::info!(
                        "conntrack: kernel table dumped and the card in line in {ms:.1} ms ({} entries known)",
                        self.feed.known.len()
                    );
                }
                self.start_dump_if_wanted(now);
            }
            LinkMsg::CommitDone(r) => self.on_commit_done(r, now),
        }
    }

    fn on_commit_done(&mut self, r: CommitReport, now: Nanos) {
        self.feed.committed(&r.keys_ok);
        let s = &mut self.feed.stats;
        s.commits += 1;
        s.committed_entries += r.written;
        s.commit_failed += r.failed.len() as u64;
        if let Some(e) = &r.error {
            self.feed.note_error(format!("commit into the kernel: {e}"));
        }
        if !r.failed.is_empty() {
            let mut by_errno: HashMap<i32, u64> = HashMap::new();
            for e in &r.failed {
                *by_errno.entry(*e).or_default() += 1;
            }
            let list: Vec<String> =
                by_errno.iter().map(|(e, n)| format!("{n} × {}", std::io::Error::from_raw_os_error(*e))).collect();
            self.feed.note_error(format!(
                "the kernel refused {} committed entries: {}",
                r.failed.len(),
                list.join(", ")
            ));
        }
        if r.takeover {
            let ms = r.since.elapsed().as_secs_f64() * 1e3;
            let s = &mut self.feed.stats;
            s.last_commit_entries = r.written;
            s.last_commit_present = r.present;
            s.last_commit_failed = r.failed.len() as u64;
            s.last_commit_unmappable = r.unmappable;
            s.last_commit_ms = Some(ms);
            tracing::info!(
                "conntrack: committed {} entries into the kernel in {ms:.1} ms since becoming Active ({} already there, {} refused, {} not expressible)",
                r.written,
                r.present,
                r.failed.len(),
                r.unmappable
            );
            self.committing = false;
            // Now the kernel is the reference: bring the card in line
            // with it (its own entries the cluster did not have).
            self.dump_wanted = true;
            self.start_dump_if_wanted(now);
        } else {
            self.feed.stats.mirrored += r.written;
        }
    }

    fn start_dump_if_wanted(&mut self, now: Nanos) {
        if !self.dump_wanted || self.feed.dumping() || self.committing || !self.feed.active {
            return;
        }
        // Not before the event socket is drained. The kernel reports an
        // overrun (ENOBUFS) ahead of the events still queued, which are
        // older than the loss, and drops every new event without a word
        // until its queue is empty: a dump started earlier would pass
        // entries whose DESTROY is dropped after, and the stale events read
        // during it would win over what it shows.
        if self.more_events {
            return;
        }
        if self.dump_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.dump_wanted = false;
        self.dump_retry_at = None;
        self.feed.begin_dump(now);
        // The kernel says how many entries it holds (in this namespace):
        // room for them now, not one doubling at a time during the dump.
        if let Some(n) = kernel_entry_count() {
            self.feed.reserve(n);
            self.reserve_copy = Some(n);
        }
        self.dump_number += 1;
        let number = self.dump_number;
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new().name("nicsync-ct-dump".into()).spawn(move || {
            let result = (|| {
                let mut sock = CtSocket::open().map_err(|e| e.to_string())?;
                let mut batch = Vec::with_capacity(DUMP_BATCH);
                let mut closed = false;
                sock.dump(|e| {
                    batch.push(e);
                    if batch.len() == DUMP_BATCH {
                        closed |= tx.send(LinkMsg::DumpEntries(number, std::mem::take(&mut batch))).is_err();
                    }
                })
                .map_err(|e| e.to_string())?;
                if !batch.is_empty() && !closed {
                    let _ = tx.send(LinkMsg::DumpEntries(number, batch));
                }
                Ok(())
            })();
            let _ = tx.send(LinkMsg::DumpDone(number, result));
        });
        if let Err(e) = spawned {
            let mut ops = Vec::new();
            self.feed.end_dump(Err(format!("starting the dump thread: {e}")), now, &mut ops);
            self.dump_wanted = true;
            self.dump_retry_at = Some(Instant::now() + DUMP_RETRY);
        }
    }

    /// Called every loop tick: follows the member's state (a takeover
    /// commits), releases held entries, retries dumps.
    pub fn tick<D: NicDevice>(&mut self, node: &mut Node<D>, now: Nanos) {
        let active = matches!(node.state(), MemberState::Active | MemberState::ActiveAttention);
        if active != self.was_active {
            self.was_active = active;
            self.feed.set_active(active);
            if active {
                self.on_activate();
            } else {
                self.committing = false;
                self.dump_wanted = false;
                self.walk = None;
            }
        }
        // A few milliseconds of walking per tick: a million entries take a
        // fraction of a second, and probes still go out every tick.
        let budget = Instant::now();
        while self.walk.is_some() && budget.elapsed() < WALK_BUDGET {
            if !self.walk_step(node) {
                break;
            }
        }
        if active {
            self.feed.handle_timeout(now, &mut self.ops);
            self.apply(node);
            self.start_dump_if_wanted(now);
        }
    }

    /// When the next held entry is due.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.feed.poll_timeout()
    }

    /// The member begins an orderly stop ([`Node::begin_stop`]): an Active
    /// syncs the connections the delay holds back now, since it will not
    /// be there to sync them when their delay ends, and the member taking
    /// over would not have them. Every change queued for the card goes on
    /// it now, not a turn's share ([`OPS_PER_TURN`]), so that the stop's
    /// drain, which begins next, waits for the peers to acknowledge them.
    pub fn release_held<D: NicDevice>(&mut self, node: &mut Node<D>) {
        if self.was_active {
            self.feed.handle_timeout(Nanos::MAX, &mut self.ops);
        }
        while !self.ops.is_empty() {
            self.apply(node);
        }
    }

    /// Whether a Standby mirrors the peers' changes into its kernel
    /// (`commit = "always"`).
    pub fn mirrors(&self) -> bool {
        self.feed.config().commit == CommitMode::Always
    }

    fn on_activate(&mut self) {
        let since = Instant::now();
        // Mirror jobs still queued are dropped by the commit thread.
        self.mirrors.spell.fetch_add(1, Ordering::AcqRel);
        self.dump_wanted = true;
        if self.feed.config().commit == CommitMode::Never {
            tracing::info!("conntrack: Active; commit = \"never\": the kernel's table is left alone");
            return;
        }
        // The dump waits for the commit: the kernel becomes the reference
        // only once it holds the cluster's entries.
        self.committing = true;
        self.walk = Some(TakeoverWalk {
            cursor: 0,
            seen: KeySet::default(),
            entries: Vec::new(),
            keys: Vec::new(),
            unmappable: 0,
            since,
            chunk: Vec::new(),
        });
    }

    /// Reads one chunk of the card's synced entries for the takeover
    /// commit; at the end, hands them to the commit thread.
    fn walk_step<D: NicDevice>(&mut self, node: &mut Node<D>) -> bool {
        let Some(w) = self.walk.as_mut() else { return false };
        w.chunk.clear();
        let next = match node.synced_chunk(w.cursor, &mut w.chunk) {
            Ok(n) => n,
            Err(TableError::Busy(_)) => return false, // a Full Sync walk first
            Err(e) => {
                self.walk = None;
                self.committing = false;
                self.feed.note_error(format!("reading the card's synced entries for the takeover commit: {e}"));
                return false;
            }
        };
        for u in w.chunk.iter().filter(|u| u.op == nicsync_fwif::sync::DeltaOp::Upsert) {
            // A walk may show an entry twice; this kernel may have it.
            if self.feed.knows(&u.key) || !w.seen.insert(u.key) {
                continue;
            }
            match commit_entry(&u.key, &u.state, &u.nat) {
                Ok(e) => {
                    w.entries.push(e);
                    w.keys.push((u.key, u.state.tcp_state));
                }
                Err(_) => w.unmappable += 1,
            }
        }
        w.cursor = next;
        if next != nicsync_fwif::cmd::SNAPSHOT_DONE {
            return true;
        }
        let Some(w) = self.walk.take() else { return false };
        tracing::info!("conntrack: Active: committing {} synced entries into the kernel", w.entries.len());
        let job = CommitJob::Takeover { entries: w.entries, keys: w.keys, unmappable: w.unmappable, since: w.since };
        if self.commit_tx.send(job).is_err() {
            self.committing = false;
            self.feed.note_error("the commit thread has stopped".into());
        }
        false
    }

    /// A peer's change not mirrored (its card entry could not be read).
    pub(crate) fn mirror_skipped(&mut self) {
        self.feed.stats.mirror_dropped += 1;
    }

    /// Mirrors a change a peer sent into this Standby's kernel
    /// (`commit = "always"`): `record` is the card's entry now, `None` when
    /// it was removed (`removed_key`).
    pub fn mirror(&mut self, key: &ConnKey, record: Option<(ConnState, Nat)>) {
        if self.feed.config().commit != CommitMode::Always || self.was_active {
            return;
        }
        // Upserts only: a delete dropped would leave a closed connection in
        // this kernel, which the dump after a takeover syncs back (deletes
        // are bounded by what the card held).
        if record.is_some() && self.mirrors.pending.load(Ordering::Acquire) >= MIRROR_QUEUE {
            self.feed.stats.mirror_dropped += 1;
            return;
        }
        let spell = self.mirrors.spell.load(Ordering::Acquire);
        let job = match record {
            Some((state, nat)) => match commit_entry(key, &state, &nat) {
                Ok(e) => CommitJob::Mirror { upsert: Some(Box::new(e)), delete: None, spell },
                Err(_) => return,
            },
            None => match commit_entry(key, &ConnState::default(), &Nat::default()) {
                Ok(e) => CommitJob::Mirror { upsert: None, delete: Some(Box::new(e)), spell },
                Err(_) => return,
            },
        };
        self.mirrors.pending.fetch_add(1, Ordering::AcqRel);
        if self.commit_tx.send(job).is_err() {
            self.mirrors.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn run_commit(sock: &mut CtSocket, job: CommitJob) -> CommitReport {
    match job {
        CommitJob::Takeover { entries, keys, unmappable, since } => {
            let mut report = CommitReport::new(true, unmappable, since);
            let (out, error) = sock.create_batch_partial(&entries, CreateMode::Exclusive);
            report.take_outcome(&keys, &out, error);
            report
        }
        CommitJob::Mirror { upsert, delete, .. } => {
            let mut report = CommitReport::new(false, 0, Instant::now());
            if let Some(e) = upsert {
                // A NATed entry the kernel has already keeps its binding
                // (the kernel refuses to change it); the rest is updated.
                match sock.upsert_keeping_nat(e.as_ref()) {
                    Ok(out) => {
                        report.written = out.ok as u64;
                        report.failed = out.failed.iter().map(|(_, errno)| *errno).collect();
                    }
                    Err(err) => report.error = Some(err.to_string()),
                }
            }
            if let Some(e) = delete {
                match sock.delete(&e) {
                    Ok(()) => report.written += 1,
                    Err(ct::CtError::Kernel { errno, .. }) if errno == libc::ENOENT => {}
                    Err(err) => report.error = Some(err.to_string()),
                }
            }
            report
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicsync_conntrack::{status, Tuple};

    fn ct_entry(src: [u8; 4], sport: u16, dport: u16, tcp: u8) -> CtEntry {
        let orig = Tuple {
            src: IpAddr::from(src),
            dst: "192.0.2.1".parse().unwrap(),
            proto: proto::TCP,
            src_port: sport,
            dst_port: dport,
            icmp: None,
        };
        CtEntry {
            orig,
            reply: orig.inverted(),
            tcp_state: Some(tcp),
            timeout_s: Some(300),
            status: status::ASSURED | status::CONFIRMED | status::SEEN_REPLY,
            mark: 0,
            zone: 0,
            id: None,
            nat_src: None,
            nat_dst: None,
        }
    }

    fn key_of(e: &CtEntry) -> ConnKey {
        ct::from_ct(e).unwrap().key
    }

    fn synced(op: &TableOp) -> bool {
        match op {
            TableOp::Upsert(_, e) => e.state.conn_flags().contains(ConnFlags::SYNC),
            _ => false,
        }
    }

    fn active(cfg: ConntrackConfig) -> KernelFeed {
        let mut f = KernelFeed::new(cfg);
        f.set_active(true);
        f
    }

    /// An established TCP connection from `src`.
    fn established(src: [u8; 4]) -> CtEntry {
        ct_entry(src, 1000, 443, TcpState::Established as u8)
    }

    /// A takeover commit that broke off partway (the kernel answered for
    /// the first three of five entries, then the socket failed) reports
    /// what got in and what was already there, not nothing, and says how
    /// many were left unanswered.
    #[test]
    fn a_commit_that_broke_off_reports_what_got_in() {
        let keys: Vec<(ConnKey, u8)> =
            (1..=5).map(|i| (key_of(&established([10, 0, 0, i])), TcpState::Established as u8)).collect();
        let mut r = CommitReport::new(true, 0, Instant::now());
        let out = ct::BatchOutcome { ok: 1, failed: vec![(1, libc::EEXIST), (2, libc::ENOMEM)], answered: 3 };
        let broke = ct::CtError::Io { op: "recv", source: std::io::Error::from_raw_os_error(libc::ENOBUFS) };
        r.take_outcome(&keys, &out, Some(broke));
        assert_eq!((r.written, r.present, r.failed.as_slice()), (1, 1, [libc::ENOMEM].as_slice()));
        // In the kernel now: the one written and the one it had.
        assert_eq!(r.keys_ok, vec![keys[0], keys[1]]);
        assert!(r.error.as_deref().is_some_and(|e| e.ends_with("(2 entries not answered for)")), "{:?}", r.error);
    }

    /// A TCP-state filter that refuses a connection's first states does
    /// not let it past the delay once a later state is admitted.
    #[test]
    fn a_connection_admitted_late_by_the_filter_still_waits_for_the_delay() {
        let filter = SyncFilter { tcp_states: vec![TcpState::Established], ..Default::default() };
        let mut f = active(ConntrackConfig { delay: Duration::from_secs(3), filter, ..Default::default() });
        let mut ops = Vec::new();
        let e = |tcp| ct_entry([10, 0, 0, 1], 1000, 443, tcp);
        f.event(CtEvent::New(e(TcpState::SynSent as u8)), 0, 0, &mut ops);
        f.event(CtEvent::Update(e(TcpState::Established as u8)), 0, 10_000_000, &mut ops);
        f.event(CtEvent::Destroy(e(TcpState::Close as u8)), 0, 50_000_000, &mut ops);
        assert!(!ops.iter().any(synced), "a 50 ms connection was synced despite a 3 s delay: {ops:?}");
        assert_eq!((f.stats().delayed, f.stats().delayed_never_synced), (1, 1));
        // One that lives past the delay is synced when it ends.
        let mut ops = Vec::new();
        let e = |tcp| ct_entry([10, 0, 0, 2], 1000, 443, tcp);
        f.event(CtEvent::New(e(TcpState::SynSent as u8)), 0, 0, &mut ops);
        f.event(CtEvent::Update(e(TcpState::Established as u8)), 0, 10_000_000, &mut ops);
        f.handle_timeout(3_010_000_000, &mut ops);
        assert!(ops.last().is_some_and(synced), "{ops:?}");
    }

    /// An UPDATE without protocol info (a mark change) keeps the TCP state.
    #[test]
    fn an_update_without_protocol_info_keeps_the_tcp_state() {
        let mut f = active(ConntrackConfig::default());
        let mut ops = Vec::new();
        f.event(CtEvent::New(established([10, 0, 0, 1])), 0, 0, &mut ops);
        let mut e = ct_entry([10, 0, 0, 1], 1000, 443, 0);
        e.tcp_state = None;
        e.mark = 7;
        f.event(CtEvent::Update(e), 0, 1, &mut ops);
        let Some(TableOp::Upsert(_, entry)) = ops.last() else { panic!("no upsert: {ops:?}") };
        assert_eq!(entry.state.tcp(), Some(TcpState::Established));
        assert_eq!(entry.state.mark.get(), 7);
        assert_eq!(f.stats().kept_tcp_state, 1);
        // So does an entry this member committed into its kernel at a
        // takeover (known from the card, not from an event).
        let committed = established([10, 0, 0, 2]);
        f.committed(&[(key_of(&committed), TcpState::Established as u8)]);
        let mut e = committed;
        e.tcp_state = None;
        e.mark = 9;
        f.event(CtEvent::Update(e), 0, 2, &mut ops);
        let Some(TableOp::Upsert(_, entry)) = ops.last() else { panic!("no upsert: {ops:?}") };
        assert_eq!((entry.state.tcp(), entry.state.mark.get()), (Some(TcpState::Established), 9));
    }

    /// A Standby forgets what its kernel destroyed: after a takeover the
    /// card's copy is committed, and the dump that follows does not delete
    /// it from the card (and the cluster).
    #[test]
    fn a_standby_forgets_what_its_kernel_destroyed() {
        let mut f = active(ConntrackConfig::default());
        let e = established([10, 0, 0, 1]);
        let mut ops = Vec::new();
        f.event(CtEvent::New(e.clone()), 0, 0, &mut ops);
        f.set_active(false);
        f.event(CtEvent::Destroy(e.clone()), 0, 1, &mut ops);
        assert!(!f.knows(&key_of(&e)), "the takeover's commit would skip it");
        f.set_active(true);
        ops.clear();
        f.begin_dump(2);
        f.dump_entries(&[], 3, &mut ops);
        f.end_dump(Ok(()), 4, &mut ops);
        assert!(ops.is_empty(), "{ops:?}");
    }

    /// The kernel's event for the member's own commit, read after the dump
    /// batch that named the entry, does not make the dump take it for gone.
    #[test]
    fn an_own_commit_seen_during_a_dump_is_not_swept() {
        let mut f = active(ConntrackConfig::default());
        f.set_own_port(77);
        let e = established([10, 0, 0, 1]);
        f.committed(&[(key_of(&e), TcpState::Established as u8)]);
        let mut ops = Vec::new();
        f.begin_dump(1);
        f.dump_entries(std::slice::from_ref(&e), 2, &mut ops);
        f.event(CtEvent::New(e.clone()), 77, 3, &mut ops);
        ops.clear();
        f.end_dump(Ok(()), 4, &mut ops);
        assert!(ops.is_empty(), "the dump showed it, yet it was deleted: {ops:?}");
        assert!(f.knows(&key_of(&e)));
    }

    /// A change the card refused is sent again by the next event showing the
    /// same entry, not taken as already on the card.
    #[test]
    fn a_change_the_card_refused_is_sent_again() {
        let mut f = active(ConntrackConfig::default());
        let e = established([10, 0, 0, 1]);
        let mut ops = Vec::new();
        f.event(CtEvent::New(e.clone()), 0, 0, &mut ops);
        f.table_results(&ops, Ok(&[Err(TableError::Refused(nicsync_fwif::cpl::CplStatus::TableFull))]));
        let mut again = Vec::new();
        f.event(CtEvent::Update(e.clone()), 0, 1, &mut again);
        assert_eq!(again.len(), 1, "{again:?}");
        // Taken this time: an identical event then changes nothing.
        f.table_results(&again, Ok(&[Ok(1)]));
        let mut third = Vec::new();
        f.event(CtEvent::Update(e), 0, 2, &mut third);
        assert!(third.is_empty(), "{third:?}");
        // A whole batch that failed is sent again too.
        let e2 = established([10, 0, 0, 2]);
        let mut ops = Vec::new();
        f.event(CtEvent::New(e2.clone()), 0, 3, &mut ops);
        f.table_results(&ops, Err("the device stalled".into()));
        let mut again = Vec::new();
        f.event(CtEvent::Update(e2), 0, 4, &mut again);
        assert_eq!(again.len(), 1, "{again:?}");
    }

    /// A delete whose batch failed (the card being recovered) is sent
    /// again with the next events: no later event names the connection,
    /// and left on the card it would stay (synced, never aged). Not if the
    /// connection came back meanwhile.
    #[test]
    fn a_delete_whose_batch_failed_is_sent_again() {
        let mut f = active(ConntrackConfig::default());
        let (gone, back) = (established([10, 0, 0, 1]), established([10, 0, 0, 2]));
        let mut ops = Vec::new();
        for e in [&gone, &back] {
            f.event(CtEvent::New(e.clone()), 0, 0, &mut ops);
            f.event(CtEvent::Destroy(e.clone()), 0, 1, &mut ops);
        }
        let deletes: Vec<TableOp> = ops.iter().filter(|o| matches!(o, TableOp::Delete(_))).copied().collect();
        f.table_results(&deletes, Err("the device stalled".into()));
        f.event(CtEvent::New(back.clone()), 0, 2, &mut Vec::new());
        let mut again = Vec::new();
        f.redo_failed_deletes(&mut again);
        assert_eq!(again, vec![TableOp::Delete(key_of(&gone))]);
        let mut third = Vec::new();
        f.redo_failed_deletes(&mut third);
        assert!(third.is_empty(), "sent again once per failure: {third:?}");
    }

    #[test]
    fn events_become_synced_upserts_and_deletes_with_the_kernel_driving_timeouts() {
        let mut f = active(ConntrackConfig::default());
        let e = ct_entry([10, 0, 0, 1], 1000, 443, 3);
        let mut ops = Vec::new();
        f.event(CtEvent::New(e.clone()), 0, 0, &mut ops);
        assert_eq!(ops.len(), 1);
        assert!(synced(&ops[0]));
        let TableOp::Upsert(k, entry) = ops[0] else { panic!("not an upsert") };
        assert_eq!(k, key_of(&e));
        assert_eq!(entry.state.timeout_s.get(), 0, "the kernel ages its entries, not the card");
        f.event(CtEvent::Destroy(e.clone()), 0, 1, &mut ops);
        assert_eq!(ops[1], TableOp::Delete(key_of(&e)));
        assert_eq!(f.stats().entries_known, 0);
    }

    #[test]
    fn own_commits_and_a_standby_s_events_are_not_fed_back() {
        let mut f = KernelFeed::new(ConntrackConfig::default());
        f.set_own_port(77);
        let mut ops = Vec::new();
        f.event(CtEvent::New(ct_entry([10, 0, 0, 1], 1, 2, 3)), 0, 0, &mut ops);
        assert!(ops.is_empty());
        assert_eq!(f.stats().events_while_standby, 1);
        f.set_active(true);
        f.event(CtEvent::New(ct_entry([10, 0, 0, 2], 1, 2, 3)), 77, 0, &mut ops);
        assert!(ops.is_empty());
        assert_eq!(f.stats().events_own, 1);
        assert!(f.knows(&key_of(&ct_entry([10, 0, 0, 2], 1, 2, 3))));
    }

    #[test]
    fn filter_keeps_entries_local_and_once_synced_stays_synced() {
        let cfg = ConntrackConfig {
            filter: SyncFilter { tcp_states: vec![TcpState::Established], ..Default::default() },
            ..Default::default()
        };
        let mut f = active(cfg);
        let mut ops = Vec::new();
        f.event(CtEvent::New(ct_entry([10, 0, 0, 1], 1, 2, 1)), 0, 0, &mut ops); // SYN_SENT
        f.event(CtEvent::Update(ct_entry([10, 0, 0, 1], 1, 2, 3)), 0, 1, &mut ops); // ESTABLISHED
        f.event(CtEvent::Update(ct_entry([10, 0, 0, 1], 1, 2, 4)), 0, 2, &mut ops); // FIN_WAIT
        assert_eq!(ops.iter().map(synced).collect::<Vec<_>>(), vec![false, true, true]);
        assert_eq!(f.stats().filtered, 1);
    }

    #[test]
    fn address_port_and_protocol_lists() {
        let filter = SyncFilter {
            protocols: vec![proto::TCP],
            addresses: vec!["10.0.0.0/8".parse().unwrap()],
            ignore_addresses: vec!["10.9.0.0/16".parse().unwrap()],
            ports: vec![(443, 443), (8000, 8099)],
            ignore_ports: vec![(8080, 8080)],
            tcp_states: vec![],
        };
        let k = |src: [u8; 4], dport: u16, p: u8| ConnKey::v4(src.into(), 40000, [192, 0, 2, 1].into(), dport, p, 0);
        let s = ConnState::default();
        assert!(filter.admits(&k([10, 1, 0, 1], 443, proto::TCP), &s));
        assert!(filter.admits(&k([10, 1, 0, 1], 8001, proto::TCP), &s));
        assert!(!filter.admits(&k([10, 1, 0, 1], 8080, proto::TCP), &s));
        assert!(!filter.admits(&k([10, 9, 0, 1], 443, proto::TCP), &s));
        assert!(!filter.admits(&k([11, 1, 0, 1], 443, proto::TCP), &s));
        assert!(!filter.admits(&k([10, 1, 0, 1], 443, proto::UDP), &s));
        assert!(SyncFilter::default().admits(&k([1, 2, 3, 4], 1, proto::UDP), &s));
        let v6: Prefix = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8::9".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
    }

    /// A flood of connections that end within the delay (a SYN flood)
    /// leaves the delay's queue no longer than twice what it holds, with
    /// slack, and the connection that lives is still synced on time.
    #[test]
    fn short_connections_do_not_grow_the_delay_s_queue() {
        let cfg = ConntrackConfig { delay: Duration::from_secs(60), ..Default::default() };
        let mut f = active(cfg);
        let mut ops = Vec::new();
        let long = ct_entry([10, 9, 9, 9], 1, 2, 3);
        f.event(CtEvent::New(long.clone()), 0, 0, &mut ops);
        for i in 0..50_000u32 {
            let e = ct_entry([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1000, 80, 1);
            f.event(CtEvent::New(e.clone()), 0, 1, &mut ops);
            f.event(CtEvent::Destroy(e), 0, 2, &mut ops);
            ops.clear();
        }
        assert!(f.hold_queue.len() <= 2 * f.held.len() + HOLD_QUEUE_SLACK, "{} queued", f.hold_queue.len());
        f.handle_timeout(60_000_000_000, &mut ops);
        assert_eq!(ops.iter().map(|o| *o.key()).collect::<Vec<_>>(), vec![key_of(&long)]);
        assert!(synced(&ops[0]));
        assert_eq!(f.stats().delayed_never_synced, 50_000);
    }

    #[test]
    fn delay_holds_new_connections_and_short_ones_are_never_synced() {
        let cfg = ConntrackConfig { delay: Duration::from_secs(3), ..Default::default() };
        let mut f = active(cfg);
        let short = ct_entry([10, 0, 0, 1], 1, 2, 3);
        let long = ct_entry([10, 0, 0, 2], 1, 2, 3);
        let mut ops = Vec::new();
        f.event(CtEvent::New(short.clone()), 0, 0, &mut ops);
        f.event(CtEvent::New(long.clone()), 0, 0, &mut ops);
        f.event(CtEvent::Update(long.clone()), 0, 1_000_000_000, &mut ops);
        f.event(CtEvent::Destroy(short.clone()), 0, 2_000_000_000, &mut ops);
        assert!(ops.iter().all(|o| !synced(o)), "nothing synced within the delay");
        assert_eq!(f.poll_timeout(), Some(3_000_000_000));
        ops.clear();
        f.handle_timeout(2_999_999_999, &mut ops);
        assert!(ops.is_empty());
        f.handle_timeout(3_000_000_000, &mut ops);
        assert_eq!(ops.len(), 1);
        assert!(synced(&ops[0]));
        assert_eq!(*ops[0].key(), key_of(&long));
        let s = f.stats();
        assert_eq!((s.delayed, s.delayed_synced, s.delayed_never_synced, s.delayed_pending), (2, 1, 1, 0));
    }

    #[test]
    fn a_dump_after_an_overrun_restores_the_missed_and_removes_the_gone() {
        let mut f = active(ConntrackConfig::default());
        let kept = ct_entry([10, 0, 0, 1], 1, 2, 3);
        let gone = ct_entry([10, 0, 0, 2], 1, 2, 3);
        let missed = ct_entry([10, 0, 0, 3], 1, 2, 3);
        let raced = ct_entry([10, 0, 0, 4], 1, 2, 3);
        let mut ops = Vec::new();
        f.event(CtEvent::New(kept.clone()), 0, 0, &mut ops);
        f.event(CtEvent::New(gone.clone()), 0, 0, &mut ops);
        assert_eq!(f.event(CtEvent::Overrun, 0, 1, &mut ops), FeedAction::Dump);
        f.begin_dump(1);
        // During the dump: `raced` is destroyed after the dump read it.
        f.event(CtEvent::Destroy(raced.clone()), 0, 2, &mut ops);
        assert_eq!(f.event(CtEvent::Overrun, 0, 2, &mut ops), FeedAction::None, "one dump at a time");
        ops.clear();
        f.dump_entries(&[kept.clone(), missed.clone(), raced.clone()], 3, &mut ops);
        // `kept` is on the card as the dump shows it: not sent again.
        assert_eq!(ops.iter().map(|o| *o.key()).collect::<Vec<_>>(), vec![key_of(&missed)]);
        assert_eq!(f.stats().unchanged, 1);
        ops.clear();
        assert!(f.end_dump(Ok(()), 4_000_000, &mut ops), "the second overrun asks for another dump");
        assert_eq!(ops, vec![TableOp::Delete(key_of(&gone))]);
        let s = f.stats();
        assert_eq!((s.dump_removed, s.dumps_completed, s.overruns, s.entries_known), (1, 1, 2, 2));
        assert_eq!(s.last_dump_ms, Some(3.999999));
    }

    /// Events lost on a Standby may be DESTROYs: nothing learnt from this
    /// kernel is trusted to be in it any more, so that the takeover
    /// commits the card's entry instead of skipping it (and then sweeping
    /// it from the cluster, as gone from this kernel).
    #[test]
    fn an_overrun_on_a_standby_forgets_what_the_kernel_was_known_to_hold() {
        let mut f = active(ConntrackConfig::default());
        let e = established([10, 0, 0, 1]);
        let mut ops = Vec::new();
        f.event(CtEvent::New(e.clone()), 0, 0, &mut ops);
        f.set_active(false);
        assert!(f.knows(&key_of(&e)));
        assert_eq!(f.event(CtEvent::Overrun, 0, 1, &mut ops), FeedAction::None);
        assert!(!f.knows(&key_of(&e)), "the takeover commits it");
        assert_eq!(f.stats().entries_known, 0);
    }

    /// An entry kept off the cluster (here by the filter) is on the card
    /// only while nothing empties it: after a spell as Standby (a Full Sync
    /// may have emptied the card) the takeover's dump puts it back.
    #[test]
    fn an_unsynced_entry_goes_back_on_the_card_after_a_spell_as_standby() {
        let cfg = ConntrackConfig {
            filter: SyncFilter { protocols: vec![proto::UDP], ..Default::default() },
            ..Default::default()
        };
        let mut f = active(cfg);
        let local = established([10, 0, 0, 1]);
        let mut ops = Vec::new();
        f.event(CtEvent::New(local.clone()), 0, 0, &mut ops);
        assert_eq!(ops.len(), 1);
        assert!(!synced(&ops[0]));
        // Shown again while Active: the card has it.
        f.begin_dump(1);
        ops.clear();
        f.dump_entries(std::slice::from_ref(&local), 2, &mut ops);
        assert!(ops.is_empty(), "{ops:?}");
        f.end_dump(Ok(()), 3, &mut ops);
        f.set_active(false);
        f.set_active(true);
        f.begin_dump(4);
        f.dump_entries(std::slice::from_ref(&local), 5, &mut ops);
        assert_eq!(ops.iter().map(|o| *o.key()).collect::<Vec<_>>(), vec![key_of(&local)]);
        assert!(!synced(&ops[0]));
    }

    #[test]
    fn the_cluster_s_own_traffic_is_never_sourced() {
        let mut f = active(ConntrackConfig::default());
        // Binds 192.0.2.1:8116 and 0.0.0.0:8118; the peer 10.0.0.1 at
        // :8116 and :8118.
        f.set_cluster_endpoints(
            &["192.0.2.1:8116".parse().unwrap(), "0.0.0.0:8118".parse().unwrap()],
            &["10.0.0.1:8116".parse().unwrap(), "10.0.0.1:8118".parse().unwrap()],
        );
        let mut ops = Vec::new();
        // ct_entry(src, sport, dport, _): to 192.0.2.1 (this member).
        f.event(CtEvent::New(ct_entry([10, 0, 0, 1], 8116, 8116, 3)), 0, 0, &mut ops);
        f.event(CtEvent::New(ct_entry([10, 0, 0, 1], 40000, 8118, 3)), 0, 0, &mut ops);
        f.event(CtEvent::New(ct_entry([10, 0, 0, 1], 8118, 40000, 3)), 0, 0, &mut ops);
        f.event(CtEvent::New(ct_entry([10, 0, 0, 9], 40000, 8116, 3)), 0, 0, &mut ops);
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(f.stats().own_traffic, 4);
        // Not the cluster's: another port, and a wildcard bind's port
        // between two hosts that are not peers.
        f.event(CtEvent::New(ct_entry([10, 0, 0, 1], 40000, 8117, 3)), 0, 0, &mut ops);
        f.event(CtEvent::New(ct_entry([10, 0, 0, 7], 40000, 8118, 3)), 0, 0, &mut ops);
        assert_eq!(ops.len(), 2);
        assert_eq!(f.stats().own_traffic, 4);
    }

    #[test]
    fn unmappable_entries_are_counted_and_left_out() {
        let mut f = active(ConntrackConfig::default());
        let mut e = ct_entry([10, 0, 0, 1], 1, 2, 3);
        e.reply = Tuple {
            src: "172.16.0.1".parse().unwrap(),
            dst: "203.0.113.1".parse().unwrap(),
            proto: proto::TCP,
            src_port: 9,
            dst_port: 9,
            icmp: None,
        };
        let mut ops = Vec::new();
        f.event(CtEvent::New(e), 0, 0, &mut ops);
        assert!(ops.is_empty());
        assert_eq!(f.stats().unmappable, 1);
    }

    #[test]
    fn commit_entries_get_the_kernel_s_default_timeouts() {
        let key = ConnKey::v4([10, 0, 0, 1].into(), 1, [10, 0, 0, 2].into(), 2, proto::TCP, 0);
        let st = ConnState::new(TcpState::Established, nicsync_fwif::conn::Direction::Original, ConnFlags::SYNC, 0, 0);
        assert_eq!(commit_entry(&key, &st, &Nat::default()).unwrap().timeout_s, Some(432_000));
        let st = ConnState::new(TcpState::Established, nicsync_fwif::conn::Direction::Original, ConnFlags::SYNC, 77, 0);
        assert_eq!(commit_entry(&key, &st, &Nat::default()).unwrap().timeout_s, Some(77));
    }
}
