//! The 64-byte event entry (device to host, unsolicited).

use core::fmt;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::assert_layout;
use crate::conn::{ConnKey, ConnState};
use crate::cpl::PHASE_BIT;

/// Size of an event entry.
pub const EVT_SIZE: usize = 64;

/// Event kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    /// Aging removed an expired connection (key and last state attached).
    Aged = 1,
    /// Events were dropped because the ring was full; `seq` is the last
    /// sequence number used, `state.generation` holds how many were lost,
    /// and the host should resynchronise by SNAPSHOT.
    Overflow = 2,
    /// A peer's change was applied to the table (key and new state).
    SyncUpdated = 3,
    /// A peer's deletion was applied (key and the last state), or came for
    /// a key the card does not hold (key and the delete's state: its
    /// generation), so that a host copy still holding it drops it.
    SyncRemoved = 4,
    /// Updates from a peer were lost for good: `state.mark` is the peer's
    /// member id, `state.generation` how many; the member needs a Full Sync.
    ResyncNeeded = 5,
}

impl EventKind {
    /// Decodes a kind byte.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(EventKind::Aged),
            2 => Some(EventKind::Overflow),
            3 => Some(EventKind::SyncUpdated),
            4 => Some(EventKind::SyncRemoved),
            5 => Some(EventKind::ResyncNeeded),
            _ => None,
        }
    }
}

/// An event as the device writes it; `phase` is written last.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EventEntry {
    /// Event sequence number (every event, dropped ones included, takes one).
    pub seq: U32,
    /// [`EventKind`] byte.
    pub kind: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
    /// Phase bit in bit 0 (byte 7, as in completions). Written last.
    pub phase: u8,
    /// Connection concerned (zero for Overflow).
    pub key: ConnKey,
    /// Its state when the event happened.
    pub state: ConnState,
}
assert_layout!(EventEntry, size = EVT_SIZE, seq = 0, kind = 4, reserved = 5, phase = 7, key = 8, state = 48);

/// A checked event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Kind.
    pub kind: EventKind,
    /// Sequence number.
    pub seq: u32,
    /// Connection key.
    pub key: ConnKey,
    /// Connection state.
    pub state: ConnState,
}

/// Why an event entry cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventError {
    /// Unknown kind byte.
    BadKind(u8),
    /// Reserved bits set.
    Reserved,
    /// An event about a connection with a malformed key.
    BadKey,
    /// An event about a connection with a malformed state (a TCP state,
    /// direction or flag the ABI does not define).
    BadState,
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::BadKind(b) => write!(f, "unknown event kind {b}"),
            EventError::Reserved => f.write_str("reserved event bits set"),
            EventError::BadKey => f.write_str("event carries a malformed key"),
            EventError::BadState => f.write_str("event carries a malformed connection state"),
        }
    }
}

impl EventEntry {
    /// The phase bit.
    pub fn phase_bit(&self) -> bool {
        self.phase & PHASE_BIT != 0
    }

    /// Checks the entry.
    pub fn decode(&self) -> Result<Event, EventError> {
        if self.reserved != [0; 2] || self.phase & !PHASE_BIT != 0 {
            return Err(EventError::Reserved);
        }
        let kind = EventKind::from_wire(self.kind).ok_or(EventError::BadKind(self.kind))?;
        if matches!(kind, EventKind::Aged | EventKind::SyncUpdated | EventKind::SyncRemoved) {
            // The host's copy takes the state in, and may write it back to
            // the card in a rebuild, which would refuse it.
            self.key.validate().map_err(|_| EventError::BadKey)?;
            self.state.validate().map_err(|_| EventError::BadState)?;
        }
        Ok(Event { kind, seq: self.seq.get(), key: self.key, state: self.state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::TcpState;

    fn aged() -> EventEntry {
        let key = ConnKey::v4([10, 0, 0, 1].into(), 1000, [10, 0, 0, 2].into(), 80, 6, 0);
        let state = ConnState { tcp_state: TcpState::Established as u8, ..ConnState::default() };
        EventEntry { seq: 7.into(), kind: EventKind::Aged as u8, reserved: [0; 2], phase: 1, key, state }
    }

    #[test]
    fn an_event_about_a_connection_carries_a_well_formed_state() {
        assert_eq!(aged().decode().map(|e| e.seq), Ok(7));
        for kind in [EventKind::Aged, EventKind::SyncUpdated, EventKind::SyncRemoved] {
            let mut e = aged();
            e.kind = kind as u8;
            e.state.tcp_state = 0xFF;
            assert_eq!(e.decode(), Err(EventError::BadState), "{kind:?}");
            let mut e = aged();
            e.kind = kind as u8;
            e.state.direction = 2;
            assert_eq!(e.decode(), Err(EventError::BadState), "{kind:?}");
        }
        // An OVERFLOW's state is a count, not a connection's.
        let mut e = aged();
        e.kind = EventKind::Overflow as u8;
        e.state.tcp_state = 0xFF;
        assert!(e.decode().is_ok());
    }
}
