//! The host's own copy of the connection table, kept so that a faulty
//! device can be reset and its table rebuilt without losing a connection.
//!
//! A [`ShadowTable`] maps each key to the state, NAT and owner the card
//! holds for it, as far as the host knows. It is opt-in
//! (`ConnTable::enable_recovery`): the connection table then keeps it
//! current from every successful completion ([`ShadowTable::record`]), in
//! ring order, and from the device's events ([`ShadowTable::apply_event`]:
//! aged entries, peers' changes applied by the sync unit). A cluster member
//! that reads events itself, or writes entries learnt from a Full Sync,
//! feeds them here too ([`ShadowTable::apply_update`]).
//!
//! Events carry a key and a state but no NAT and no owner, so an entry
//! learnt only from a `SYNC_UPDATED` event keeps the NAT and owner the copy
//! already had (none and 0 for a new one); [`ShadowTable::apply_update`]
//! and an audit walk give the full entry.

use std::collections::HashMap;

use nicsync_fwif::conn::{ConnFlags, ConnKey, ConnRecord, ConnState, Nat};
use nicsync_fwif::event::{Event, EventKind};
use nicsync_fwif::sync::{DeltaOp, DeltaUpdate};

use crate::table::{TableError, TableOp};

/// What the host knows of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShadowEntry {
    /// The state as last written (`timeout_s` as the writer gave it, not
    /// what remains).
    pub state: ConnState,
    /// The NAT translation (kind `None`: no translation).
    pub nat: Nat,
    /// The member that owns the entry (REPLICA writes, peers' changes); 0:
    /// this host's own, or unknown.
    pub owner: u16,
}

impl ShadowEntry {
    /// Whether a record the device wrote holds this entry: same state but
    /// for the time that remains (only "never ages" must agree), same NAT.
    pub fn matches(&self, rec: &ConnRecord) -> bool {
        let (a, b) = (&self.state, &rec.state);
        a.tcp_state == b.tcp_state
            && a.direction == b.direction
            && a.flags == b.flags
            && a.mark == b.mark
            && a.generation == b.generation
            && (a.timeout_s.get() == 0) == (b.timeout_s.get() == 0)
            && self.nat == rec.nat
    }

    /// Whether the device may remove this entry by itself (it has a
    /// timeout): a missing entry that cannot have aged was lost.
    pub fn can_age(&self) -> bool {
        self.state.timeout_s.get() != 0
    }
}

/// The host's copy of the card's connection table.
#[derive(Clone, Debug, Default)]
pub struct ShadowTable {
    map: HashMap<ConnKey, ShadowEntry>,
    needs_audit: bool,
}

impl ShadowTable {
    /// An empty copy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &ConnKey) -> Option<&ShadowEntry> {
        self.map.get(key)
    }

    /// Every entry (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (&ConnKey, &ShadowEntry)> {
        self.map.iter()
    }

    /// Sets the entry of `key`.
    pub fn set(&mut self, key: ConnKey, e: ShadowEntry) {
        self.map.insert(key, e);
    }

    /// Removes the entry of `key`.
    pub fn remove(&mut self, key: &ConnKey) -> Option<ShadowEntry> {
        self.map.remove(key)
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Entries marked for sync (what the device's `sync_entries` counter
    /// counts).
    pub fn synced_len(&self) -> usize {
        self.map.values().filter(|e| e.state.conn_flags().contains(ConnFlags::SYNC)).count()
    }

    /// Whether something (an event overflow) may have been missed, so that
    /// only a full audit can tell what the card holds.
    pub fn needs_audit(&self) -> bool {
        self.needs_audit
    }

    /// Clears the flag (an audit walked the table).
    pub fn audited(&mut self) {
        self.needs_audit = false;
    }

    /// Takes in the outcome of a completed table operation (in ring order).
    /// Only what the device confirmed changes the copy: a success, or a
    /// NOT_FOUND that says an UPDATE's or DELETE's key is absent.
    pub fn record(&mut self, op: &TableOp, res: &Result<u32, TableError>) {
        match (op, res) {
            (TableOp::Insert(k, e), Ok(g)) => {
                let state = ConnState { generation: (*g).into(), ..e.state };
                self.map.insert(*k, ShadowEntry { state, nat: e.nat.unwrap_or_default(), owner: 0 });
            }
            (TableOp::Update(k, e) | TableOp::Upsert(k, e), Ok(g)) => {
                let state = ConnState { generation: (*g).into(), ..e.state };
                // Without a NAT the device keeps the stored one.
                let nat = e.nat.or_else(|| self.map.get(k).map(|s| s.nat)).unwrap_or_default();
                self.map.insert(*k, ShadowEntry { state, nat, owner: 0 });
            }
            (TableOp::Replica(k, e, owner), Ok(_)) => {
                self.map.insert(*k, ShadowEntry { state: e.state, nat: e.nat.unwrap_or_default(), owner: *owner });
            }
            (TableOp::Delete(k), Ok(_) | Err(TableError::NotFound))
            | (TableOp::Update(k, _), Err(TableError::NotFound))
            | (TableOp::ReplicaDelete(k, _, _), Ok(_)) => {
                self.map.remove(k);
            }
            _ => {}
        }
    }

    /// Takes in an event the device wrote; returns whether the copy
    /// changed. AGED removes the entry only if it still holds the state the
    /// event reports (events and completions travel on different rings, so
    /// a newer write may already be here); SYNC_REMOVED only if the copy is
    /// not newer than the delete. OVERFLOW (events lost) marks the copy as
    /// needing a full audit.
    pub fn apply_event(&mut self, ev: &Event) -> bool {
        match ev.kind {
            EventKind::Aged => match self.map.get(&ev.key) {
                Some(e) if e.state == ev.state => self.map.remove(&ev.key).is_some(),
                _ => false,
            },
            EventKind::SyncRemoved => match self.map.get(&ev.key) {
                Some(e) if e.state.generation.get() <= ev.state.generation.get() => self.map.remove(&ev.key).is_some(),
                _ => false,
            },
            EventKind::SyncUpdated => {
                let e = self.map.entry(ev.key).or_default();
                e.state = ev.state;
                true
            }
            EventKind::Overflow => {
                self.needs_audit = true;
                false
            }
            EventKind::ResyncNeeded => false,
        }
    }

    /// Takes in a full change (a Full Sync record, a peer's update): key,
    /// state, NAT and owner.
    pub fn apply_update(&mut self, u: &DeltaUpdate) {
        match u.op {
            DeltaOp::Upsert => {
                self.map.insert(u.key, ShadowEntry { state: u.state, nat: u.nat, owner: u.owner });
            }
            DeltaOp::Delete => {
                self.map.remove(&u.key);
            }
        }
    }

    /// Takes in a record the device holds (an audit found it, or the copy
    /// is seeded from the card): the remaining time becomes the timeout.
    pub fn adopt(&mut self, rec: &ConnRecord) {
        let owner = self.map.get(&rec.key).map_or(0, |e| e.owner);
        self.map.insert(rec.key, ShadowEntry { state: rec.state, nat: rec.nat, owner });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::ConnEntry;
    use nicsync_fwif::conn::{NatKind, FAMILY_IPV4};
    use std::net::{IpAddr, Ipv4Addr};

    fn key(i: u32) -> ConnKey {
        ConnKey::v4(Ipv4Addr::from(i), 1, Ipv4Addr::new(192, 0, 2, 1), 2, 6, 0)
    }

    fn st(mark: u32, generation: u32) -> ConnState {
        ConnState { tcp_state: 3, mark: mark.into(), generation: generation.into(), ..Default::default() }
    }

    #[test]
    fn completions_in_order() {
        let mut s = ShadowTable::new();
        let nat = Nat::new(NatKind::Source, IpAddr::V4(Ipv4Addr::LOCALHOST), 9);
        s.record(&TableOp::Insert(key(1), ConnEntry { state: st(1, 0), nat: Some(nat) }), &Ok(1));
        assert_eq!(s.get(&key(1)).map(|e| (e.state.generation.get(), e.nat)), Some((1, nat)));
        // An update without NAT keeps it; the device's generation is taken.
        s.record(&TableOp::Update(key(1), ConnEntry::new(st(2, 0))), &Ok(2));
        let e = s.get(&key(1)).copied().unwrap_or_default();
        assert_eq!((e.state.mark.get(), e.state.generation.get(), e.nat.family), (2, 2, FAMILY_IPV4));
        // Refusals change nothing.
        s.record(&TableOp::Insert(key(1), ConnEntry::new(st(9, 0))), &Err(TableError::Exists));
        s.record(&TableOp::Update(key(1), ConnEntry::new(st(9, 0))), &Err(TableError::Stale { stored: 5 }));
        assert_eq!(s.get(&key(1)).map(|e| e.state.mark.get()), Some(2));
        s.record(&TableOp::Delete(key(1)), &Ok(0));
        assert!(s.is_empty());
        s.record(&TableOp::Replica(key(2), ConnEntry::new(st(3, 7)), 4), &Ok(7));
        assert_eq!(s.get(&key(2)).map(|e| e.owner), Some(4));
        s.record(&TableOp::Update(key(2), ConnEntry::new(st(3, 7))), &Err(TableError::NotFound));
        assert!(s.is_empty(), "NOT_FOUND: the device says it is gone");
    }

    #[test]
    fn aged_event_removes_only_the_state_it_reports() {
        let mut s = ShadowTable::new();
        s.set(key(1), ShadowEntry { state: st(1, 1), ..Default::default() });
        let aged = |state| Event { kind: EventKind::Aged, seq: 1, key: key(1), state };
        // The entry was written again after it aged: the event is old news.
        assert!(!s.apply_event(&aged(st(0, 1))));
        assert!(s.get(&key(1)).is_some());
        assert!(s.apply_event(&aged(st(1, 1))));
        assert!(s.is_empty());
        let ov = Event { kind: EventKind::Overflow, seq: 9, key: ConnKey::default(), state: st(0, 3) };
        s.apply_event(&ov);
        assert!(s.needs_audit());
        s.audited();
        assert!(!s.needs_audit());
    }

    #[test]
    fn peer_changes_and_records() {
        let mut s = ShadowTable::new();
        let up = Event { kind: EventKind::SyncUpdated, seq: 1, key: key(1), state: st(5, 3) };
        s.apply_event(&up);
        assert_eq!(s.get(&key(1)).map(|e| e.state), Some(st(5, 3)));
        let rm = |g| Event { kind: EventKind::SyncRemoved, seq: 2, key: key(1), state: st(0, g) };
        assert!(!s.apply_event(&rm(2)), "an older delete leaves the newer entry");
        assert!(s.apply_event(&rm(4)));
        let u = DeltaUpdate { op: DeltaOp::Upsert, owner: 3, key: key(2), state: st(1, 1), nat: Nat::default() };
        s.apply_update(&u);
        assert_eq!(s.get(&key(2)).map(|e| e.owner), Some(3));
        let rec = ConnRecord { key: key(2), state: ConnState { timeout_s: 0.into(), ..st(1, 1) }, nat: Nat::default() };
        assert!(s.get(&key(2)).is_some_and(|e| e.matches(&rec)));
        s.adopt(&ConnRecord { state: st(2, 2), ..rec });
        assert_eq!(s.get(&key(2)).map(|e| (e.state.mark.get(), e.owner)), Some((2, 3)));
        s.apply_update(&DeltaUpdate { op: DeltaOp::Delete, ..u });
        assert!(s.is_empty());
    }
}
