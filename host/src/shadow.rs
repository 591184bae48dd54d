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

use std::collections::{HashMap, VecDeque};

use crate::keymap::KeyMap;

use nicsync_fwif::conn::{ConnFlags, ConnKey, ConnRecord, ConnState, Nat};
use nicsync_fwif::event::{Event, EventKind};
use nicsync_fwif::sync::{DeltaOp, DeltaUpdate};

use crate::table::{TableError, TableOp};

/// The copy's hasher: foldhash, seeded per process. Every table change
/// costs the copy two or three lookups, and SipHash (std's default) made
/// the copy half the cost of writing a Full Sync to the card. Keys come
/// from the network, so the hash stays seeded at random (foldhash's
/// "minimal DoS resistance"): an attacker cannot aim collisions at a seed
/// it does not know.
pub(crate) type KeyHasher = foldhash::fast::RandomState;

/// A set of keys hashed as the copy's are.
pub(crate) type KeySet = std::collections::HashSet<ConnKey, KeyHasher>;

fn is_synced(e: &ShadowEntry) -> bool {
    e.state.conn_flags().contains(ConnFlags::SYNC)
}

/// What the host knows of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, zerocopy::FromZeros)]
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

/// A delete the card remembers (a tombstone): a cluster member's device
/// keeps one for every synced entry deleted, so that a late, older upsert
/// cannot bring the entry back, and numbers a re-insert above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShadowTomb {
    /// The delete's generation.
    pub generation: u32,
    /// The member whose delete it is; 0: this host's own, or unknown.
    pub owner: u16,
}

/// Tombstones the copy keeps, at most (the device keeps 65,536; the oldest
/// go first).
pub const SHADOW_TOMBSTONES: usize = 1 << 16;

/// An entry of the copy, with the mark of the last audit walk that
/// returned it (2 bytes beside the entry's 42: an audit needs no set of the
/// keys it saw, whose fresh pages cost more than the walk's chunks here).
#[derive(Clone, Copy, Debug, zerocopy::FromZeros)]
struct Slot {
    e: ShadowEntry,
    walk: u16,
}

/// The host's copy of the card's connection table.
#[derive(Clone, Debug, Default)]
pub struct ShadowTable {
    map: KeyMap<ConnKey, Slot>,
    /// Tombstones, with the order they were made in (for eviction).
    tombs: HashMap<ConnKey, (ShadowTomb, u64), KeyHasher>,
    tomb_order: VecDeque<(u64, ConnKey)>,
    tomb_seq: u64,
    /// Entries marked for sync (kept as entries change: an audit compares
    /// it with the device's counter every time).
    synced: usize,
    needs_audit: bool,
    /// While an audit walks the card, a turn at a time: the keys whose
    /// entries changed meanwhile (what the walk saw of them may be stale).
    changed: Option<KeySet>,
    /// The current audit walk's mark (never 0, which new entries carry).
    walk: u16,
    /// Entries marked by the current walk, and those of them changed or
    /// removed since (which lost the mark).
    marked: usize,
    marked_then_changed: usize,
}

impl ShadowTable {
    /// An empty copy, hashed with a random seed.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty copy hashed as the card is (`hash`: the card's seed), so
    /// that entries that arrive in the card's order (a Full Sync from a
    /// member seeded alike) are written front to back ([`KeyMap`]).
    pub fn with_hash(hash: nicsync_fwif::hash::TableHash) -> Self {
        ShadowTable { map: KeyMap::with_hash(hash), ..Self::default() }
    }

    /// The hash its entries are placed by.
    pub fn hash(&self) -> &nicsync_fwif::hash::TableHash {
        self.map.hash()
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
        self.map.get(key).map(|s| &s.e)
    }

    /// Brings `key`'s place in the copy towards the CPU ahead of a write
    /// or lookup of it (a hint: see [`KeyMap::prefetch`]).
    #[inline]
    pub fn prefetch(&self, key: &ConnKey) {
        self.map.prefetch(key);
    }

    /// Every entry (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (&ConnKey, &ShadowEntry)> {
        self.map.iter().map(|(k, s)| (k, &s.e))
    }

    /// Notes a change of `key` (its old slot, if any) for an audit's walk.
    fn note_change(&mut self, key: ConnKey, old: Option<&Slot>) {
        if let Some(c) = &mut self.changed {
            c.insert(key);
            if old.is_some_and(|s| s.walk == self.walk) {
                self.marked_then_changed += 1;
            }
        }
    }

    /// Sets the entry of `key` (which ends a tombstone of the key, as an
    /// insert does on the card).
    pub fn set(&mut self, key: ConnKey, e: ShadowEntry) {
        if !self.tombs.is_empty() {
            self.tombs.remove(&key);
        }
        self.synced += usize::from(is_synced(&e));
        if let Some(old) = self.map.insert(key, Slot { e, walk: 0 }) {
            self.synced -= usize::from(is_synced(&old.e));
            self.note_change(key, Some(&old));
        } else {
            self.note_change(key, None);
        }
    }

    /// Room for `entries` entries in all, made at once (see
    /// [`crate::table::ConnTable::reserve_copy`]).
    pub fn reserve(&mut self, entries: usize) {
        self.map.reserve(entries.saturating_sub(self.map.len()));
    }

    /// Removes the entry of `key` (no tombstone).
    pub fn remove(&mut self, key: &ConnKey) -> Option<ShadowEntry> {
        let old = self.map.remove(key)?;
        self.note_change(*key, Some(&old));
        self.synced -= usize::from(is_synced(&old.e));
        Some(old.e)
    }

    /// Forgets everything, tombstones too.
    pub fn clear(&mut self) {
        // An audit's walk in progress compared nothing that still holds.
        self.changed = None;
        self.map.clear();
        self.synced = 0;
        self.tombs.clear();
        self.tomb_order.clear();
    }

    /// Tombstones held.
    pub fn tombstones_len(&self) -> usize {
        self.tombs.len()
    }

    /// The tombstone of `key`.
    pub fn tombstone(&self, key: &ConnKey) -> Option<ShadowTomb> {
        self.tombs.get(key).map(|(t, _)| *t)
    }

    /// Every tombstone (in no particular order).
    pub fn tombstones(&self) -> impl Iterator<Item = (&ConnKey, ShadowTomb)> {
        self.tombs.iter().map(|(k, (t, _))| (k, *t))
    }

    /// Removes `key`'s entry and remembers its delete.
    fn bury(&mut self, key: ConnKey, tomb: ShadowTomb) {
        self.remove(&key);
        self.tomb_seq += 1;
        let seq = self.tomb_seq;
        self.tombs.insert(key, (tomb, seq));
        self.tomb_order.push_back((seq, key));
        while self.tombs.len() > SHADOW_TOMBSTONES {
            let Some((s, k)) = self.tomb_order.pop_front() else { break };
            if self.tombs.get(&k).is_some_and(|(_, cur)| *cur == s) {
                self.tombs.remove(&k);
            }
        }
        // Entries for keys buried again, or brought back, are stale there.
        if self.tomb_order.len() > 2 * SHADOW_TOMBSTONES.max(self.tombs.len()) {
            let tombs = &self.tombs;
            self.tomb_order.retain(|(s, k)| tombs.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }

    /// Removes `key`'s entry as a local delete does on a cluster member's
    /// card: a synced entry leaves a tombstone at the delete's generation,
    /// which the device gave as `device_generation` (0: not told, an AGED
    /// event or a device before ABI 1.5: one above the entry, raised to the
    /// device's generation `floor`, as the device numbers it).
    fn delete_local(&mut self, key: &ConnKey, device_generation: u32, floor: u32) {
        match self.get(key) {
            Some(e) if e.state.conn_flags().contains(ConnFlags::SYNC) => {
                let generation = match device_generation {
                    0 => e.state.generation.get().wrapping_add(1).max(floor),
                    g => g,
                };
                self.bury(*key, ShadowTomb { generation, owner: 0 });
            }
            _ => {
                self.remove(key);
            }
        }
    }

    /// Entries marked for sync (what the device's `sync_entries` counter
    /// counts).
    pub fn synced_len(&self) -> usize {
        self.synced
    }

    /// Whether something (an event overflow) may have been missed, so that
    /// only a full audit can tell what the card holds.
    pub fn needs_audit(&self) -> bool {
        self.needs_audit
    }

    /// Clears the flag (an audit walks the table).
    pub fn audited(&mut self) {
        self.needs_audit = false;
    }

    /// Sets the flag again (an audit's walk was abandoned).
    pub fn mark_needs_audit(&mut self) {
        self.needs_audit = true;
    }

    /// Starts noting the keys whose entries change (an audit's walk
    /// began), with a fresh walk mark.
    pub fn track_changes(&mut self) {
        self.changed = Some(KeySet::default());
        self.restart_marks();
    }

    /// A fresh walk mark (a walk started again from its first slot): no
    /// entry holds it. Marks are 16 bits: when they come round, every old
    /// one is cleared, so that none can pass for the new walk's.
    pub fn restart_marks(&mut self) {
        self.walk = self.walk.wrapping_add(1);
        if self.walk == 0 {
            for s in self.map.values_mut() {
                s.walk = 0;
            }
            self.walk = 1;
        }
        self.marked = 0;
        self.marked_then_changed = 0;
    }

    /// Notes that the card changed `key`'s entry (an event) whether or not
    /// the copy changed with it: an audit's walk leaves it out.
    pub fn note_touched(&mut self, key: ConnKey) {
        let Some(c) = &mut self.changed else { return };
        c.insert(key);
        if let Some(s) = self.map.get_mut(&key) {
            if s.walk == self.walk {
                s.walk = 0;
                self.marked_then_changed += 1;
            }
        }
    }

    /// Marks `key`'s entry as returned by the current walk; false when
    /// there is none or the walk returned it before (an entry that moved
    /// may come twice).
    pub fn mark_walked(&mut self, key: &ConnKey) -> bool {
        let walk = self.walk;
        match self.map.get_mut(key) {
            Some(s) if s.walk != walk => {
                s.walk = walk;
                self.marked += 1;
                true
            }
            _ => false,
        }
    }

    /// Entries the current walk neither returned nor saw change: counted
    /// from the changed keys only. An entry holds the mark from when the
    /// walk returned it until it changes; one that changed is in the
    /// changed set (and the walk does not mark a changed key).
    pub fn unwalked(&self) -> usize {
        let Some(changed) = &self.changed else { return 0 };
        let changed_held = changed.iter().filter(|k| self.map.contains_key(*k)).count();
        let marked_held = self.marked.saturating_sub(self.marked_then_changed);
        self.map.len().saturating_sub(marked_held).saturating_sub(changed_held)
    }

    /// The entries [`ShadowTable::unwalked`] counts (a pass over the copy).
    pub fn unwalked_entries(&self) -> Vec<(ConnKey, ShadowEntry)> {
        let Some(changed) = &self.changed else { return Vec::new() };
        let walk = self.walk;
        self.map.iter().filter(|(k, s)| s.walk != walk && !changed.contains(*k)).map(|(k, s)| (*k, s.e)).collect()
    }

    /// Whether changes are being noted (not since a [`ShadowTable::clear`]).
    pub fn tracking_changes(&self) -> bool {
        self.changed.is_some()
    }

    /// Whether `key`'s entry changed since [`ShadowTable::track_changes`].
    pub fn changed_since_tracked(&self, key: &ConnKey) -> bool {
        self.changed.as_ref().is_some_and(|c| c.contains(key))
    }

    /// Stops noting changes and returns the keys noted.
    pub fn take_changes(&mut self) -> KeySet {
        self.changed.take().unwrap_or_default()
    }

    /// Takes in the outcome of a completed table operation (in ring order).
    /// Only what the device confirmed changes the copy: a success, or a
    /// NOT_FOUND that says an UPDATE's or DELETE's key is absent.
    pub fn record(&mut self, op: &TableOp, res: &Result<u32, TableError>) {
        match (op, res) {
            (TableOp::Insert(k, e), Ok(g)) => {
                let state = ConnState { generation: (*g).into(), ..e.state };
                self.set(*k, ShadowEntry { state, nat: e.nat.unwrap_or_default(), owner: 0 });
            }
            (TableOp::Update(k, e) | TableOp::Upsert(k, e), Ok(g)) => {
                let state = ConnState { generation: (*g).into(), ..e.state };
                // Without a NAT the device keeps the stored one.
                let nat = e.nat.or_else(|| self.get(k).map(|s| s.nat)).unwrap_or_default();
                self.set(*k, ShadowEntry { state, nat, owner: 0 });
            }
            (TableOp::Replica(k, e, owner), Ok(_)) => {
                self.set(*k, ShadowEntry { state: e.state, nat: e.nat.unwrap_or_default(), owner: *owner });
            }
            (TableOp::Delete(k), Ok(g)) => self.delete_local(k, *g, 0),
            (TableOp::Delete(k) | TableOp::Update(k, _), Err(TableError::NotFound)) => {
                self.remove(k);
            }
            (TableOp::ReplicaDelete(k, generation, owner), Ok(_)) => {
                self.bury(*k, ShadowTomb { generation: *generation, owner: *owner });
            }
            _ => {}
        }
    }

    /// Takes in an event the device wrote; returns whether the copy
    /// changed. AGED removes the entry only if it still holds the state the
    /// event reports (events and completions travel on different rings, so
    /// a newer write may already be here); SYNC_REMOVED only if the copy is
    /// not newer than the delete. OVERFLOW (events lost) marks the copy as
    /// needing a full audit. `floor` is the device's generation floor (an
    /// aged synced entry's tombstone is numbered as the device numbers it).
    pub fn apply_event(&mut self, ev: &Event, floor: u32) -> bool {
        match ev.kind {
            // The device sends the removal of an aged synced entry to its
            // peers as its own delete, and keeps a tombstone.
            EventKind::Aged => match self.get(&ev.key) {
                Some(e) if e.state == ev.state => {
                    self.delete_local(&ev.key, 0, floor);
                    true
                }
                _ => false,
            },
            // The peer's delete leaves its tombstone (whose owner the event
            // does not tell).
            EventKind::SyncRemoved => match self.get(&ev.key) {
                Some(e) if e.state.generation.get() <= ev.state.generation.get() => {
                    self.bury(ev.key, ShadowTomb { generation: ev.state.generation.get(), owner: 0 });
                    true
                }
                _ => false,
            },
            // Not over a newer version: one written after the device
            // applied the peer's change (completions may be read before
            // events), or one the card lost and the copy keeps.
            EventKind::SyncUpdated => match self.get(&ev.key) {
                Some(e) if e.state.generation.get() > ev.state.generation.get() => false,
                other => {
                    // The event does not say whose change it was: the owner
                    // the copy held is no longer known to be right.
                    let e = ShadowEntry { state: ev.state, owner: 0, ..other.copied().unwrap_or_default() };
                    self.set(ev.key, e);
                    true
                }
            },
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
            DeltaOp::Upsert => self.set(u.key, ShadowEntry { state: u.state, nat: u.nat, owner: u.owner }),
            DeltaOp::Delete => {
                self.bury(u.key, ShadowTomb { generation: u.state.generation.get(), owner: u.owner });
            }
        }
    }

    /// Takes in a record the device holds (an audit found it, or the copy
    /// is seeded from the card): the remaining time becomes the timeout.
    pub fn adopt(&mut self, rec: &ConnRecord) {
        let owner = self.get(&rec.key).map_or(0, |e| e.owner);
        self.set(rec.key, ShadowEntry { state: rec.state, nat: rec.nat, owner });
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
        assert!(!s.apply_event(&aged(st(0, 1)), 0));
        assert!(s.get(&key(1)).is_some());
        assert!(s.apply_event(&aged(st(1, 1)), 0));
        assert!(s.is_empty());
        let ov = Event { kind: EventKind::Overflow, seq: 9, key: ConnKey::default(), state: st(0, 3) };
        s.apply_event(&ov, 0);
        assert!(s.needs_audit());
        s.audited();
        assert!(!s.needs_audit());
    }

    fn synced(mark: u32, generation: u32) -> ConnState {
        ConnState { flags: ConnFlags::SYNC.bits().into(), ..st(mark, generation) }
    }

    #[test]
    fn deletes_leave_tombstones_as_on_a_members_card() {
        let mut s = ShadowTable::new();
        // A synced entry's delete is remembered one generation above it.
        s.record(&TableOp::Insert(key(1), ConnEntry::new(synced(1, 0))), &Ok(4));
        s.record(&TableOp::Delete(key(1)), &Ok(0));
        assert!(s.get(&key(1)).is_none());
        assert_eq!(s.tombstone(&key(1)), Some(ShadowTomb { generation: 5, owner: 0 }));
        // An entry not marked for sync leaves none (the card keeps none).
        s.record(&TableOp::Insert(key(2), ConnEntry::new(st(1, 0))), &Ok(1));
        s.record(&TableOp::Delete(key(2)), &Ok(0));
        assert_eq!(s.tombstone(&key(2)), None);
        // A re-insert ends the tombstone.
        s.record(&TableOp::Insert(key(1), ConnEntry::new(synced(2, 0))), &Ok(6));
        assert_eq!((s.tombstone(&key(1)), s.tombstones_len()), (None, 0));
        // A Full Sync tombstone, a peer's delete, an aged synced entry.
        s.record(&TableOp::ReplicaDelete(key(3), 9, 2), &Ok(0));
        assert_eq!(s.tombstone(&key(3)), Some(ShadowTomb { generation: 9, owner: 2 }));
        s.apply_event(&Event { kind: EventKind::SyncRemoved, seq: 1, key: key(1), state: st(0, 7) }, 0);
        assert_eq!(s.tombstone(&key(1)).map(|t| t.generation), Some(7));
        s.set(key(4), ShadowEntry { state: synced(1, 3), ..Default::default() });
        s.apply_event(&Event { kind: EventKind::Aged, seq: 2, key: key(4), state: synced(1, 3) }, 0);
        assert_eq!(s.tombstone(&key(4)).map(|t| t.generation), Some(4));
        // A refused delete, or one that found nothing, leaves none.
        s.record(&TableOp::Delete(key(5)), &Err(TableError::NotFound));
        assert_eq!(s.tombstone(&key(5)), None);
        // The count of synced entries follows every change.
        s.apply_event(&Event { kind: EventKind::SyncUpdated, seq: 3, key: key(6), state: synced(1, 1) }, 0);
        s.apply_event(&Event { kind: EventKind::SyncUpdated, seq: 4, key: key(6), state: st(1, 2) }, 0);
        s.record(&TableOp::Upsert(key(7), ConnEntry::new(synced(1, 0))), &Ok(1));
        s.adopt(&ConnRecord { key: key(8), state: synced(1, 1), nat: Nat::default() });
        s.remove(&key(8));
        let count = s.iter().filter(|(_, e)| e.state.conn_flags().contains(ConnFlags::SYNC)).count();
        assert_eq!((s.synced_len(), count), (1, 1));
        s.clear();
        assert_eq!(s.synced_len(), 0);
        assert_eq!(s.tombstones_len(), 0);
    }

    #[test]
    fn tombstones_take_the_devices_generation_and_floor() {
        let mut s = ShadowTable::new();
        // The device says the delete's generation (ABI 1.5): that one.
        s.record(&TableOp::Insert(key(1), ConnEntry::new(synced(1, 0))), &Ok(4));
        s.record(&TableOp::Delete(key(1)), &Ok(600));
        assert_eq!(s.tombstone(&key(1)), Some(ShadowTomb { generation: 600, owner: 0 }));
        // An aged entry: one above it, raised to the floor, as the device
        // numbers it.
        s.set(key(2), ShadowEntry { state: synced(1, 3), ..Default::default() });
        s.apply_event(&Event { kind: EventKind::Aged, seq: 1, key: key(2), state: synced(1, 3) }, 700);
        assert_eq!(s.tombstone(&key(2)).map(|t| t.generation), Some(700));
        s.set(key(3), ShadowEntry { state: synced(1, 900), ..Default::default() });
        s.apply_event(&Event { kind: EventKind::Aged, seq: 2, key: key(3), state: synced(1, 900) }, 700);
        assert_eq!(s.tombstone(&key(3)).map(|t| t.generation), Some(901));
    }

    #[test]
    fn tombstones_are_bounded_oldest_first() {
        let mut s = ShadowTable::new();
        let n = SHADOW_TOMBSTONES as u32 + 10;
        for i in 0..n {
            s.record(&TableOp::ReplicaDelete(key(i), 1, 2), &Ok(0));
        }
        assert_eq!(s.tombstones_len(), SHADOW_TOMBSTONES);
        assert!(s.tombstone(&key(9)).is_none() && s.tombstone(&key(10)).is_some());
        // Burying a key again moves it to the back.
        s.record(&TableOp::ReplicaDelete(key(10), 2, 2), &Ok(0));
        s.record(&TableOp::ReplicaDelete(key(n), 1, 2), &Ok(0));
        assert!(s.tombstone(&key(10)).is_some() && s.tombstone(&key(11)).is_none());
        assert!(s.tomb_order.len() <= 2 * SHADOW_TOMBSTONES + 1);
    }

    #[test]
    fn peer_changes_and_records() {
        let mut s = ShadowTable::new();
        let up = Event { kind: EventKind::SyncUpdated, seq: 1, key: key(1), state: st(5, 3) };
        s.apply_event(&up, 0);
        assert_eq!(s.get(&key(1)).map(|e| e.state), Some(st(5, 3)));
        let older = Event { kind: EventKind::SyncUpdated, seq: 1, key: key(1), state: st(6, 2) };
        assert!(!s.apply_event(&older, 0), "a newer version stays");
        assert_eq!(s.get(&key(1)).map(|e| e.state), Some(st(5, 3)));
        let rm = |g| Event { kind: EventKind::SyncRemoved, seq: 2, key: key(1), state: st(0, g) };
        assert!(!s.apply_event(&rm(2), 0), "an older delete leaves the newer entry");
        assert!(s.apply_event(&rm(4), 0));
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
