//! The device's sync unit: Delta Sync on the card, as HyperSync does it.
//!
//! It owns this member's [`DeltaSender`], one [`DeltaReceiver`] per peer and
//! the [`SyncPort`] they talk through. The design hands it every table
//! change marked for sync (host commands and aging); the unit numbers them
//! and sends them to the peers. What arrives from peers comes back to the
//! design as [`ReceiverEvent`]s, which it applies to its own table under the
//! conflict rule and reports to its host as events. The unit runs inside the
//! design's housekeeping, so it is stepped exactly like the rest of the
//! model (deterministically in Inline and Manual modes).

use std::fmt;

use nicsync_fwif::cmd::SyncPosition;
use nicsync_fwif::sync::{DeltaUpdate, Frame};

use crate::sync::{
    ConfigError, DeltaReceiver, DeltaSender, Nanos, ReceiverConfig, ReceiverEvent, SenderConfig, SyncStats,
};
use crate::wire::{SyncPort, WireStats, MAX_WIRE_FRAME};

/// Reads of the port per pump, or per runner's poll across the calls it
/// makes (a bound on work per poll).
pub const RX_BUDGET: usize = 256;

/// ALIVE intervals of silence after which a peer no longer counts in
/// [`SyncUnit::unacked`] (two would do for an idle peer; one more for loss).
pub const SILENT_ALIVE_INTERVALS: u64 = 3;

/// Frames a run of [`SyncUnit::submit`] calls may leave queued before they
/// are sent from within it (a command burst completes at most 64 updates).
const SUBMIT_HOLD_FRAMES: usize = 64;

/// What the sync unit is configured with.
#[derive(Clone, Debug)]
pub struct SyncUnitConfig {
    /// Sender settings (cluster id, member id, epoch, queue sizes, timers).
    pub sender: SenderConfig,
    /// The other members whose changes this member applies.
    pub peers: Vec<u16>,
}

/// Counters of the unit beyond the protocol's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnitStats {
    /// Protocol counters of the sender and every receiver, merged.
    pub protocol: SyncStats,
    /// Peer updates applied to the table.
    pub applied: u64,
    /// Peer updates that lost to the stored entry under the conflict rule.
    pub superseded: u64,
    /// Peer updates that could not be applied (table full).
    pub apply_failed: u64,
    /// Local changes the sender refused (invalid update).
    pub submit_failed: u64,
    /// Datagrams that did not parse.
    pub malformed: u64,
    /// Port errors (send or receive).
    pub port_errors: u64,
    /// The port's own counters (with the seal's: authentication failures,
    /// replays, unknown members).
    pub port: WireStats,
}

/// The sync unit of one device.
pub struct SyncUnit {
    sender: DeltaSender,
    receivers: Vec<DeltaReceiver>,
    port: Box<dyn SyncPort>,
    buf: Vec<u8>,
    pub(crate) stats: UnitStats,
}

impl fmt::Debug for SyncUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncUnit")
            .field("member", &self.sender.config().member_id)
            .field("peers", &self.receivers.len())
            .finish_non_exhaustive()
    }
}

impl SyncUnit {
    /// A descriptor readable when a frame arrives on the sync port (see
    /// [`SyncPort::readiness_fd`]).
    pub fn readiness_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.port.readiness_fd()
    }

    /// A unit sending and receiving through `port`.
    pub fn new(cfg: SyncUnitConfig, port: Box<dyn SyncPort>, now: Nanos) -> Result<Self, ConfigError> {
        let s = &cfg.sender;
        let receivers = cfg
            .peers
            .iter()
            .filter(|p| **p != s.member_id)
            .map(|p| DeltaReceiver::new(ReceiverConfig::new(s.cluster_id, s.member_id, s.epoch, *p)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sender = DeltaSender::new(cfg.sender, now)?;
        sender.expect_peers(&cfg.peers, now);
        Ok(SyncUnit { sender, receivers, port, buf: vec![0; MAX_WIRE_FRAME], stats: UnitStats::default() })
    }

    /// Whether the member is joining (see [`DeltaReceiver::set_joining`]).
    pub fn set_joining(&mut self, joining: bool, now: Nanos) {
        for r in &mut self.receivers {
            r.set_joining(joining, now);
        }
    }

    /// Where the streams stand (SYNC_POSITIONS): this member's own first,
    /// then, per peer whose epoch is followed, the number before which
    /// everything was applied ([`DeltaReceiver::applied_next`]). No peer's
    /// entry if `unapplied` (peer updates are held, or some did not reach
    /// the table: they are not in it).
    pub fn positions(&self, unapplied: bool) -> Vec<SyncPosition> {
        let c = self.sender.config();
        let mut out = vec![SyncPosition::new(c.member_id, c.epoch, self.sender.next_seq())];
        if !unapplied {
            out.extend(
                self.receivers
                    .iter()
                    .filter_map(|r| Some(SyncPosition::new(r.config().peer, r.epoch()?, r.applied_next().max(1)))),
            );
        }
        out
    }

    /// A Full Sync's cut (SYNC_ALIGN): each entry naming a peer aligns that
    /// peer's receiver ([`DeltaReceiver::align`]); entries naming this
    /// member or no peer, and invalid ones, are skipped. Returns how many
    /// aligned.
    pub fn align(&mut self, cut: &[SyncPosition], now: Nanos) -> u64 {
        let mut aligned = 0;
        for (i, p) in cut.iter().enumerate().filter(|(_, p)| p.is_valid()) {
            // One entry per member: a repeated one is skipped.
            if cut[..i].iter().any(|q| q.member == p.member) {
                continue;
            }
            if let Some(r) = self.receivers.iter_mut().find(|r| r.config().peer == p.member.get()) {
                aligned += u64::from(r.align(p.epoch.get(), p.next_seq.get(), now));
            }
        }
        aligned
    }

    /// This member's id.
    pub fn member(&self) -> u16 {
        self.sender.config().member_id
    }

    /// The sequence number the next local update will get.
    pub fn next_seq(&self) -> u64 {
        self.sender.next_seq()
    }

    /// Local updates that some peer heard from lately has not acknowledged
    /// yet. A peer silent for [`SILENT_ALIVE_INTERVALS`] ALIVE intervals
    /// (an idle one sends one each) is gone, dead or cut off: it
    /// acknowledges nothing, and a host waiting for the count to drain (a
    /// stop, a pull) would wait out its bound for it.
    pub fn unacked(&self, now: Nanos) -> u64 {
        let last = self.sender.next_seq().saturating_sub(1);
        let silent = self.sender.config().alive_interval_ns.saturating_mul(SILENT_ALIVE_INTERVALS);
        let low = self
            .receivers
            .iter()
            .filter(|r| r.last_heard().is_some_and(|t| now.saturating_sub(t) <= silent))
            .map(|r| self.sender.acked_through(r.config().peer).unwrap_or(0))
            .min()
            .unwrap_or(last);
        last.saturating_sub(low)
    }

    /// Counters, with the protocol's merged in.
    pub fn stats(&self) -> UnitStats {
        let mut st = self.stats;
        st.port = self.port.stats();
        st.protocol = self.sender.stats();
        for r in &self.receivers {
            st.protocol.merge(&r.stats());
        }
        st
    }

    /// Queues a local table change for the peers.
    pub fn submit(&mut self, update: &DeltaUpdate, now: Nanos) {
        if self.sender.submit(update, now).is_err() {
            self.stats.submit_failed += 1;
        }
        // Callers send after a burst; a long run of submissions (aging, a
        // full ring with no flush delay) must not fill the sender's queue.
        if self.sender.frames_waiting() >= SUBMIT_HOLD_FRAMES {
            self.transmit_submitted();
        }
    }

    /// Sends the frames the updates submitted since the last call completed
    /// (or, with no flush delay, each of them). The command pipeline calls
    /// it after it has written the completions of a burst: as on the card,
    /// where the MAC sends beside the pipeline, a command's completion does
    /// not wait for a datagram to leave (a UDP send costs microseconds).
    pub fn transmit_submitted(&mut self) -> bool {
        let mut sent = false;
        while let Some(t) = self.sender.poll_transmit() {
            sent = true;
            if self.port.transmit(&t).is_err() {
                self.stats.port_errors += 1;
            }
            self.sender.recycle(t);
        }
        sent
    }

    /// Runs timers, takes what the port has, sends what is due, and hands
    /// every receiver event to `on_event` in order.
    ///
    /// It stops taking frames after the first one that gives a receiver
    /// something to deliver, and returns true: the caller applies those
    /// updates, then calls again for the rest. A frame's updates thus reach
    /// the table before the port is asked for the next one: on a socket,
    /// the final empty read costs a system call, which is not the delivered
    /// update's latency. False: the port had nothing more, or its
    /// [`RX_BUDGET`] reads were spent (a runner that calls again shares one
    /// budget through [`SyncUnit::pump_within`]).
    pub fn pump(&mut self, now: Nanos, on_event: impl FnMut(ReceiverEvent)) -> bool {
        let mut reads = RX_BUDGET;
        self.pump_within(now, &mut reads, on_event)
    }

    /// [`SyncUnit::pump`] with a budget of port reads shared between calls:
    /// each read (one that finds nothing included) takes one, and none is
    /// made once it is spent. A runner that calls again after each frame
    /// with updates bounds its work per poll with one budget.
    pub fn pump_within(&mut self, now: Nanos, reads: &mut usize, mut on_event: impl FnMut(ReceiverEvent)) -> bool {
        if self.sender.poll_timeout().is_some_and(|t| t <= now) {
            self.sender.handle_timeout(now);
        }
        for r in &mut self.receivers {
            if r.poll_timeout().is_some_and(|t| t <= now) {
                r.handle_timeout(now);
            }
        }
        let mut more = false;
        while *reads > 0 {
            *reads -= 1;
            let n = match self.port.recv(&mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(_) => {
                    self.stats.port_errors += 1;
                    break;
                }
            };
            // Parsed once, handed to the sender (NACK/ACK) and to every
            // receiver (each takes only its own peer's frames).
            match Frame::parse(&self.buf[..n]) {
                Ok(view) => {
                    self.sender.handle_frame(&view, now);
                    for r in &mut self.receivers {
                        r.handle_frame(&view, now);
                    }
                }
                Err(_) => self.stats.malformed += 1,
            }
            if self.receivers.iter().any(DeltaReceiver::has_events) {
                more = true;
                break;
            }
        }
        self.flush_transmits();
        for r in &mut self.receivers {
            while let Some(ev) = r.poll_event() {
                on_event(ev);
            }
        }
        more
    }

    fn flush_transmits(&mut self) {
        self.transmit_submitted();
        for r in &mut self.receivers {
            while let Some(t) = r.poll_transmit() {
                if self.port.transmit(&t).is_err() {
                    self.stats.port_errors += 1;
                }
                r.recycle(t);
            }
        }
    }

    /// The earliest time the sender or a receiver has timed work (a batch
    /// to flush, a NACK or ACK due, a keepalive).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.receivers.iter().filter_map(DeltaReceiver::poll_timeout).chain(self.sender.poll_timeout()).min()
    }

    /// The command ring is empty: sends a partial frame now if the sender is
    /// configured to ([`crate::sync::SenderConfig::flush_when_idle`]).
    pub fn idle_flush(&mut self) -> bool {
        if !self.sender.flush_when_idle() {
            return false;
        }
        self.flush_transmits();
        true
    }

    /// Sends whatever the sender has batched without waiting for its delay.
    pub fn flush(&mut self) {
        self.sender.flush();
        self.flush_transmits();
    }
}
