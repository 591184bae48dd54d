//! The map under the host's copy of the card's table ([`crate::shadow`]):
//! open addressing with linear probing, each entry in one slot beside its
//! key, so that finding a key (or the free slot for a new one) is one
//! memory access where `std`'s map takes two (its control bytes, then the
//! entry), and so that the access can be issued ahead of use
//! ([`KeyMap::prefetch`]), as the card's own pipeline issues its reads.
//!
//! Why it exists: a Full Sync writes a million entries into the copy, each
//! at a random place in a table of about 180 MB, and every one missed the
//! caches and the TLB twice; the copy cost as much as the card's own work.
//!
//! * At most half the slots hold an entry (the table doubles beyond), so a
//!   search for an absent key ends within a few neighbouring slots.
//! * A removal shifts the entries behind it back (no tombstones), so
//!   searches never grow longer with churn.
//! * [`KeyMap::clear`] is O(1): slots carry the epoch they were written in,
//!   and only slots of the current epoch are full (all are reset when the
//!   16-bit epoch comes round). Emptying a table of a million entries
//!   touches none of its 180 MB, which would hold the member's loop tens of
//!   milliseconds.
//! * Keys come from the network: the hash is seeded (by the card's seed,
//!   or at random), so no sender can aim collisions at it.
//! * It hashes as the card does ([`TableHash`], ABI 1.9), and a key's home
//!   slot is where [`TableHash::order`] puts it: given the card's seed, the
//!   order in which a card walks its table (a Full Sync's order, when the
//!   members share a seed) is this map's slot order too, so that a Full
//!   Sync fills the copy front to back, a stream of writes instead of a
//!   cache and TLB miss per entry (about a fifth less time for a 1 M-entry
//!   pull in `bench conntrack`).

use std::hash::BuildHasher;

use nicsync_fwif::conn::ConnKey;
use nicsync_fwif::hash::TableHash;
use zerocopy::FromZeros;

/// A key the map can hold: five words for [`TableHash::hash_words`].
pub trait MapKey: Copy + Eq + FromZeros {
    /// The words the hash reads ([`ConnKey::words`] for a connection key).
    fn hash_words(&self) -> [u64; 5];
}

impl MapKey for ConnKey {
    #[inline]
    fn hash_words(&self) -> [u64; 5] {
        self.words()
    }
}

/// A seed no one outside this process can guess: `std`'s per-process
/// random keys (taken from the operating system), hashed.
pub fn random_seed() -> [u64; 2] {
    let s = std::hash::RandomState::new();
    [s.hash_one(0x6e69_6373_796e_6331_u64), s.hash_one(0x6e69_6373_796e_6332_u64)]
}

/// One slot: full when `epoch` is the map's (never, while all zero).
#[derive(Clone, Copy, Debug, FromZeros)]
struct Slot<K, V> {
    epoch: u16,
    key: K,
    value: V,
}

/// A map from keys to small `Copy` values (see the module documentation).
#[derive(Clone)]
pub struct KeyMap<K, V> {
    slots: Box<[Slot<K, V>]>,
    /// `slots.len() - 1` (a power of two minus one), 0 while there is none.
    mask: usize,
    len: usize,
    epoch: u16,
    hash: TableHash,
}

/// Its size only: the slots of a large copy are hundreds of megabytes, and
/// free ones keep what they last held.
impl<K, V> std::fmt::Debug for KeyMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMap").field("len", &self.len).field("slots", &self.slots.len()).finish()
    }
}

impl<K, V> Default for KeyMap<K, V> {
    fn default() -> Self {
        KeyMap { slots: Box::default(), mask: 0, len: 0, epoch: 1, hash: TableHash::new(random_seed()) }
    }
}

/// Fewest slots a map that holds anything has.
const MIN_SLOTS: usize = 16;

/// Entries a growth moves per batch of fetches ahead.
const REHASH_AHEAD: usize = 16;

/// Most slots a map may have: [`TableHash::order`] places a hash among
/// at most 2^32.
const MAX_SLOTS: usize = 1 << 32;

impl<K: MapKey, V: Copy + FromZeros> KeyMap<K, V> {
    /// An empty map hashed with a random seed (no memory until the first
    /// insert).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map hashed with `hash` (the card's, to share its order).
    pub fn with_hash(hash: TableHash) -> Self {
        KeyMap { slots: Box::default(), mask: 0, len: 0, epoch: 1, hash }
    }

    /// The hash it places keys by.
    pub fn hash(&self) -> &TableHash {
        &self.hash
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated (twice the entries it can hold before it grows).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn home(&self, key: &K) -> usize {
        TableHash::order(self.hash.hash_words(&key.hash_words()), self.slots.len())
    }

    #[inline]
    fn is_full(&self, i: usize) -> bool {
        self.slots[i].epoch == self.epoch
    }

    /// The slot holding `key`, or the free slot where the search ended.
    #[inline]
    fn find(&self, key: &K) -> Result<usize, usize> {
        let mut i = self.home(key);
        // At most half the slots are full: the search meets a free one.
        loop {
            let s = &self.slots[i];
            if s.epoch != self.epoch {
                return Err(i);
            }
            if s.key == *key {
                return Ok(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Brings the slot where a search for `key` starts towards the CPU, so
    /// that a lookup or insert of `key` a little later finds it in cache.
    /// Only a hint: it changes nothing and has no effect on an empty map.
    #[inline]
    pub fn prefetch(&self, key: &K) {
        if self.slots.is_empty() {
            return;
        }
        // Every line of the slot (one of 86 bytes spans two or three).
        crate::sys::prefetch(&self.slots[self.home(key)]);
    }

    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: &K) -> Option<&V> {
        if self.len == 0 {
            return None;
        }
        self.find(key).ok().map(|i| &self.slots[i].value)
    }

    /// The value of `key`, to change in place.
    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        if self.len == 0 {
            return None;
        }
        let i = self.find(key).ok()?;
        Some(&mut self.slots[i].value)
    }

    /// Whether `key` has an entry.
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// Sets the value of `key`; returns the one it replaced.
    #[inline]
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.slots.is_empty() {
            self.reserve(1);
        }
        let free = match self.find(&key) {
            Ok(i) => return Some(std::mem::replace(&mut self.slots[i].value, value)),
            // A new entry: the table grows first if it would pass half
            // full (not for a replaced value, which adds nothing).
            Err(_) if (self.len + 1) * 2 > self.slots.len() => {
                self.reserve(1);
                match self.find(&key) {
                    Ok(i) | Err(i) => i,
                }
            }
            Err(i) => i,
        };
        self.slots[free] = Slot { epoch: self.epoch, key, value };
        self.len += 1;
        None
    }

    /// Removes `key`'s entry; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        if self.len == 0 {
            return None;
        }
        let mut hole = self.find(key).ok()?;
        let value = self.slots[hole].value;
        self.len -= 1;
        // Shift back the entries behind the hole that may not stay past it:
        // one whose search starts at or before the hole (cyclically) would
        // no longer be found across a free slot.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if !self.is_full(j) {
                break;
            }
            let home = self.home(&self.slots[j].key);
            // Distance from the entry's home to where it is, and to the hole.
            let at = j.wrapping_sub(home) & self.mask;
            let to_hole = hole.wrapping_sub(home) & self.mask;
            if to_hole < at {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole].epoch = self.epoch.wrapping_sub(1);
        Some(value)
    }

    /// Forgets every entry, keeping the memory (O(1); see the module
    /// documentation; once in 65,535 clears, when the epoch comes round,
    /// every slot is rewritten).
    pub fn clear(&mut self) {
        self.len = 0;
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            // Slots of every old epoch would read as full again in time.
            for s in &mut self.slots {
                s.epoch = 0;
            }
            self.epoch = 1;
        }
    }

    /// Room for `additional` more entries without growing.
    pub fn reserve(&mut self, additional: usize) {
        let want = self.len.saturating_add(additional);
        if want.saturating_mul(2) <= self.slots.len() {
            return;
        }
        // As `std`'s collections do, a size past the address space is a
        // bug of the caller (the copy's is bounded by the card's capacity).
        let Some(slots) =
            want.checked_mul(2).and_then(|n| n.max(MIN_SLOTS).checked_next_power_of_two()).filter(|n| *n <= MAX_SLOTS)
        else {
            panic!("KeyMap: capacity overflow ({want} entries)");
        };
        // Resident at once when the map is first sized (a member's start);
        // a growth's memory is mapped as it is written, spread over the
        // writes rather than one stall of the caller's loop.
        let resident = self.slots.is_empty();
        let old = std::mem::replace(&mut self.slots, zeroed_slots(slots, resident));
        let old_epoch = self.epoch;
        self.mask = slots - 1;
        self.epoch = 1;
        // Moved a few at a time, each one's new place fetched ahead while
        // the ones before it are written (the keys are distinct: each goes
        // to the first free slot from its home).
        let mut batch: Vec<(usize, Slot<K, V>)> = Vec::with_capacity(REHASH_AHEAD);
        for s in old.iter().filter(|s| s.epoch == old_epoch) {
            let home = self.home(&s.key);
            crate::sys::prefetch(&self.slots[home]);
            batch.push((home, Slot { epoch: 1, ..*s }));
            if batch.len() == REHASH_AHEAD {
                self.place_new(&mut batch);
            }
        }
        self.place_new(&mut batch);
    }

    /// Writes entries whose keys the map does not hold, each at the first
    /// free slot from its home.
    fn place_new(&mut self, batch: &mut Vec<(usize, Slot<K, V>)>) {
        for (home, s) in batch.drain(..) {
            let mut i = home;
            while self.is_full(i) {
                i = (i + 1) & self.mask;
            }
            self.slots[i] = s;
        }
    }

    /// Every entry, in slot order (no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let epoch = self.epoch;
        self.slots.iter().filter(move |s| s.epoch == epoch).map(|s| (&s.key, &s.value))
    }

    /// Every value, to change in place.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        let epoch = self.epoch;
        self.slots.iter_mut().filter(move |s| s.epoch == epoch).map(|s| &mut s.value)
    }
}

/// `n` empty slots in zeroed memory: a large table is mapped by the
/// kernel as it is first written, not written through here (a million
/// entries' table is 180 MB), and on huge pages where the kernel gives
/// them (see [`crate::sys::advise_huge_pages`]).
fn zeroed_slots<K: FromZeros + Copy, V: FromZeros + Copy>(n: usize, resident: bool) -> Box<[Slot<K, V>]> {
    match <[Slot<K, V>]>::new_box_zeroed_with_elems(n) {
        Ok(mut b) => {
            // On huge pages, and (`resident`) mapped now: a fresh table's
            // pages were otherwise zeroed as the first writes reached them,
            // 2 MiB at a time, on the data path (a third of a member's time
            // during its first 100,000 connections in `bench conntrack`).
            nicsync_model::advise_huge_pages(&mut b);
            if resident {
                nicsync_model::make_resident(&mut b);
            }
            b
        }
        Err(_) => std::alloc::handle_alloc_error(
            std::alloc::Layout::array::<Slot<K, V>>(n).unwrap_or(std::alloc::Layout::new::<Slot<K, V>>()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use nicsync_model::rng::SeededRng;

    use super::*;

    impl MapKey for u32 {
        fn hash_words(&self) -> [u64; 5] {
            [u64::from(*self), 0, 0, 0, 0]
        }
    }

    fn check(m: &KeyMap<u32, u64>, model: &HashMap<u32, u64>) {
        assert_eq!(m.len(), model.len());
        for (k, v) in model {
            assert_eq!(m.get(k), Some(v), "key {k}");
        }
        let mut seen: Vec<(u32, u64)> = m.iter().map(|(k, v)| (*k, *v)).collect();
        seen.sort_unstable();
        let mut want: Vec<(u32, u64)> = model.iter().map(|(k, v)| (*k, *v)).collect();
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn agrees_with_std_under_random_churn() {
        for seed in 1..=8u64 {
            // Seeded, so that a failure repeats.
            let mut rng = SeededRng::new(seed);
            let mut m = KeyMap::<u32, u64>::new();
            let mut model = HashMap::new();
            // A small key space, so that inserts hit present keys and
            // removals find them, and the probe runs wrap and interleave.
            for step in 0..20_000u64 {
                let k = (rng.next_u64() % 600) as u32;
                match rng.next_u64() % 10 {
                    0..=4 => assert_eq!(m.insert(k, step), model.insert(k, step)),
                    5..=8 => assert_eq!(m.remove(&k), model.remove(&k)),
                    _ => {
                        if let Some(v) = m.get_mut(&k) {
                            *v += 1;
                        }
                        if let Some(v) = model.get_mut(&k) {
                            *v += 1;
                        }
                    }
                }
                if step % 997 == 0 {
                    check(&m, &model);
                }
            }
            check(&m, &model);
            assert!(m.len() * 2 <= m.slots(), "at most half full");
        }
    }

    /// Where `key` sits.
    fn slot_of(m: &KeyMap<u32, u64>, key: u32) -> Option<usize> {
        m.find(&key).ok()
    }

    /// How many of `keys`, inserted in turn into an empty map hashed by
    /// `hash`, landed before the key inserted just before them.
    fn written_backwards(hash: TableHash, keys: &[u32]) -> usize {
        let mut m = KeyMap::<u32, u64>::with_hash(hash);
        m.reserve(keys.len());
        let mut last = None;
        let mut back = 0;
        for &k in keys {
            assert_eq!(m.insert(k, 1), None);
            let at = slot_of(&m, k);
            back += usize::from(at <= last);
            last = at;
        }
        back
    }

    #[test]
    fn keys_in_the_cards_order_are_written_front_to_back() {
        // What a Full Sync from a card seeded alike looks like: keys in the
        // order of their hashes' low words (the card's bucket order). Each
        // lands after the one before, so the copy is written as a stream
        // (but for one wrap past the end of the table, to its start).
        let hash = TableHash::new([0x1234, 0x5678]);
        let n = 50_000u32;
        let mut keys: Vec<u32> = (0..n).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
        keys.sort_by_key(|k| hash.hash_words(&k.hash_words()) as u32);
        let wrapped = written_backwards(hash, &keys);
        assert!(wrapped <= 1, "{wrapped} keys were written behind the one before");
        // Any other seed scatters them.
        let back = written_backwards(TableHash::new([0x1234, 0x5679]), &keys);
        assert!(back > n as usize / 4, "only {back} of {n} went backwards under another seed");
    }

    #[test]
    fn a_removal_keeps_the_entries_behind_it_findable() {
        // Many keys, few slots: long runs, with some wrapping past the end.
        let mut m = KeyMap::<u32, u64>::new();
        for k in 0..8 {
            m.insert(k, u64::from(k));
        }
        for k in (0..8).step_by(2) {
            assert_eq!(m.remove(&k), Some(u64::from(k)));
        }
        for k in 0..8 {
            assert_eq!(m.get(&k).copied(), (k % 2 == 1).then_some(u64::from(k)), "key {k}");
        }
        assert_eq!(m.remove(&0), None);
    }

    #[test]
    fn clear_forgets_everything_and_keeps_the_memory() {
        let mut m = KeyMap::<u32, u64>::new();
        m.reserve(1000);
        let slots = m.slots();
        // More clears than epochs, so that the epoch comes round.
        for round in 0..70_000u32 {
            let k = round % 50;
            m.insert(k, u64::from(round));
            assert_eq!(m.len(), 1);
            assert_eq!(m.iter().count(), 1);
            m.clear();
            assert!(m.is_empty());
            assert_eq!(m.get(&k), None);
        }
        assert_eq!(m.slots(), slots);
        for k in 0..1000 {
            m.insert(k, 1);
        }
        assert_eq!(m.slots(), slots, "a reserve holds");
        assert_eq!(m.values_mut().count(), 1000);
    }

    #[test]
    fn replacing_a_value_at_half_full_does_not_grow() {
        let mut m = KeyMap::<u32, u64>::new();
        m.reserve(8);
        let slots = m.slots();
        for k in 0..(slots / 2) as u32 {
            m.insert(k, 0);
        }
        assert_eq!(m.len() * 2, slots);
        assert_eq!(m.insert(0, 1), Some(0));
        assert_eq!(m.slots(), slots, "a replaced value adds nothing");
        assert_eq!(m.insert(u32::MAX, 2), None);
        assert_eq!(m.slots(), slots * 2, "a new entry past half grows the table");
        assert_eq!(m.get(&0), Some(&1));
        assert_eq!(format!("{m:?}"), format!("KeyMap {{ len: {}, slots: {} }}", slots / 2 + 1, slots * 2));
    }

    #[test]
    fn growth_keeps_every_entry() {
        let mut m = KeyMap::<u32, u64>::new();
        for k in 0..100_000u32 {
            m.insert(k, u64::from(k) * 3);
            m.prefetch(&(k + 1));
        }
        assert_eq!(m.len(), 100_000);
        assert!((0..100_000u32).all(|k| m.get(&k) == Some(&(u64::from(k) * 3))));
        assert!(m.contains_key(&99_999) && !m.contains_key(&100_000));
    }
}
