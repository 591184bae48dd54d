//! The card's table hash (ABI 1.9): one keyed function of a [`ConnKey`]
//! that places it in the card's connection table, seeded by the host
//! through the [`TABLE_HASH_SEED_0`](crate::regs::TABLE_HASH_SEED_0)..`_3`
//! registers.
//!
//! It is part of the ABI, not a private detail of the card, for two
//! reasons:
//!
//! * **Keyed.** Keys come from the traffic a firewall sees, so anyone who
//!   can open connections through it chooses them. With a hash everyone
//!   knows, a sender could aim thousands of keys at the same two buckets
//!   and fill the card's stash (TABLE_FULL for everyone else). With a seed
//!   it does not know, it cannot.
//! * **Shared order.** A card's SNAPSHOT walks its table bucket by bucket,
//!   and a key's first bucket is the high bits of the low 32 bits of this
//!   hash scaled to the bucket count ([`TableHash::order`]), whatever the
//!   table's size. Members seeded alike therefore hand each other a Full
//!   Sync in an order that the receiving card, and a host structure that
//!   indexes by the same bits, write front to back instead of at random,
//!   which in a table of hundreds of megabytes is the difference between a
//!   cache and TLB miss per entry and a stream. A host that keeps its own
//!   copy of the table may index it this way ([`TableHash::order`]); it
//!   must not rely on it for correctness (a device of an older minor uses
//!   its own unkeyed hash).
//!
//! The function: the key's five 64-bit words ([`ConnKey::words`]) folded
//! pairwise through three independent 64×64→128-bit multiplies (wyhash's
//! "mum" step), each input XORed with a word of the secret, then one more
//! multiply to mix. The multiplies do not depend on each other, so a
//! pipeline runs them in parallel lanes. The six secret words are fixed
//! constants XORed with words expanded from the 128-bit seed by
//! SplitMix64 ([`TableHash::new`]).

use crate::conn::ConnKey;

/// The fixed part of the secret (wyhash's and the golden ratio's
/// constants): every seed, 0 included, XORs its expansion into these.
const BASE: [u64; 6] = [
    0xa076_1d64_78bd_642f,
    0xe703_7ed1_a0b4_28db,
    0x8ebc_6af0_9c88_c6e3,
    0x5899_65cc_7537_4cc3,
    0x1d8e_4e27_c47d_124f,
    0x9E37_79B9_7F4A_7C15,
];

/// The table hash under one seed, expanded once (a card latches it at
/// enable; a host keeps it beside the structure it indexes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableHash {
    secret: [u64; 6],
    seed: [u64; 2],
}

/// The seed is a secret (whoever knows it can aim keys at one bucket):
/// never printed, not even in a debug dump.
impl core::fmt::Debug for TableHash {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TableHash { .. }")
    }
}

/// Seed 0: a device's hash before the host writes a seed.
impl Default for TableHash {
    fn default() -> Self {
        TableHash::new([0, 0])
    }
}

/// A seed of the table hash: 128 bits, word 0 first. A secret (whoever
/// knows it can aim keys at one bucket), so a debug dump does not show it.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct TableHashSeed(pub [u64; 2]);

impl core::fmt::Debug for TableHashSeed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TableHashSeed(..)")
    }
}

/// SplitMix64's output function: a bijection of 64-bit words with full
/// avalanche.
const fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline(always)]
const fn mum(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

impl TableHash {
    /// The hash seeded with `seed` (the 128-bit value of the
    /// `TABLE_HASH_SEED` registers, word 0 first).
    pub const fn new(seed: [u64; 2]) -> Self {
        let mut secret = BASE;
        let mut i = 0;
        while i < 6 {
            let s = seed[i & 1].wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            secret[i] ^= splitmix(s ^ seed[(i + 1) & 1].rotate_left(29));
            i += 1;
        }
        TableHash { secret, seed }
    }

    /// The seed it was made from.
    pub const fn seed(&self) -> [u64; 2] {
        self.seed
    }

    /// The seed as the four 32-bit `TABLE_HASH_SEED` register values.
    pub const fn seed_registers(&self) -> [u32; 4] {
        let [a, b] = self.seed;
        [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32]
    }

    /// The seed the four register values give.
    pub const fn seed_from_registers(r: [u32; 4]) -> [u64; 2] {
        [(r[0] as u64) | (r[1] as u64) << 32, (r[2] as u64) | (r[3] as u64) << 32]
    }

    /// The hash of five key words ([`ConnKey::words`]).
    #[inline]
    pub const fn hash_words(&self, w: &[u64; 5]) -> u64 {
        let k = &self.secret;
        let h = mum(w[0] ^ k[0], w[1] ^ k[1]) ^ mum(w[2] ^ k[2], w[3] ^ k[3]) ^ mum(w[4] ^ k[4], k[5]);
        mum(h ^ k[0], k[1])
    }

    /// The hash of `key`.
    #[inline]
    pub fn hash(&self, key: &ConnKey) -> u64 {
        self.hash_words(&key.words())
    }

    /// Where a hash falls in a structure of `n` places, in the order the
    /// card walks its table: the low 32 bits of `h` scaled to `n`, so that
    /// the place grows with them for every `n` (a card's first bucket for
    /// the key is `order(h, buckets)`). `n` must be at most 2^32.
    #[inline]
    pub const fn order(h: u64, n: usize) -> usize {
        ((h as u32 as u64 * n as u64) >> 32) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers, which pin the function (abi.md §5.1 lists them for
    /// a design to check its hash against): any change to it is an ABI
    /// change and fails here.
    #[test]
    fn known_answers() {
        let vectors: [([u64; 2], [u64; 5], u64); 3] = [
            ([0, 0], [0; 5], 0xcd61_52e9_7a52_8acd),
            (
                [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
                [0x0a00_0001_0a00_0002, 0, 0x01bb_0050_0006_0004, 0, 0],
                0xafd2_9df7_f2b6_679b,
            ),
            ([u64::MAX, 1], [1, 2, 3, 4, 5], 0x12e6_af2e_e9b1_ff97),
        ];
        for (seed, words, want) in vectors {
            assert_eq!(TableHash::new(seed).hash_words(&words), want, "seed {seed:x?} words {words:x?}");
        }
        // A key, through its byte layout: 10.0.0.1:40000 -> 192.0.2.9:443
        // TCP, zone 0.
        let key = ConnKey::v4(
            core::net::Ipv4Addr::new(10, 0, 0, 1),
            40000,
            core::net::Ipv4Addr::new(192, 0, 2, 9),
            443,
            crate::conn::proto::TCP,
            0,
        );
        assert_eq!(key.words(), [0x0100_000a, 0, 0x0902_00c0, 0, 0x0406_01bb_9c40]);
        assert_eq!(TableHash::new([1, 2]).hash(&key), 0xba62_21af_ef5c_4d3b);
        assert_eq!(TableHash::order(0xba62_21af_ef5c_4d3b, 1 << 20), 0xef5c_4d3b >> 12);
    }

    #[test]
    fn a_debug_dump_shows_no_seed() {
        extern crate std;
        let dump = std::format!("{:?}", TableHash::new([0x0123_4567_89ab_cdef, 42]));
        assert_eq!(dump, "TableHash { .. }");
        let dump = std::format!("{:?}", Some(TableHashSeed([0x0123_4567_89ab_cdef, 42])));
        assert_eq!(dump, "Some(TableHashSeed(..))");
    }

    #[test]
    fn seeds_round_trip_through_the_registers() {
        let h = TableHash::new([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);
        assert_eq!(h.seed_registers(), [0x89ab_cdef, 0x0123_4567, 0x7654_3210, 0xfedc_ba98]);
        assert_eq!(TableHash::seed_from_registers(h.seed_registers()), h.seed());
    }

    #[test]
    fn every_seed_word_changes_every_hash() {
        let w = [1, 2, 3, 4, 5];
        let base = TableHash::new([7, 9]);
        for seed in [[7 ^ 1, 9], [7, 9 ^ 1], [7 ^ (1 << 63), 9], [7, 9 ^ (1 << 63)]] {
            let other = TableHash::new(seed);
            assert_ne!(base.hash_words(&w), other.hash_words(&w), "seed {seed:x?}");
        }
    }

    #[test]
    fn a_hash_moves_with_every_key_bit() {
        // One flipped input bit changes about half the output bits.
        let t = TableHash::new([3, 5]);
        let w = [0x0a00_0001_0a00_0002, 0, 0x01bb_0050_0006_0004, 0, 0];
        let h = t.hash_words(&w);
        for word in 0..5 {
            for bit in 0..64 {
                let mut x = w;
                x[word] ^= 1 << bit;
                let d = (t.hash_words(&x) ^ h).count_ones();
                assert!((12..=52).contains(&d), "word {word} bit {bit}: {d} output bits changed");
            }
        }
    }

    #[test]
    fn order_grows_with_the_low_word_for_every_size() {
        for n in [1usize, 2, 7, 1000, 1 << 20, 3 << 20, 1 << 32] {
            let mut last = 0;
            for x in (0..=u32::MAX as u64).step_by(65_537) {
                let p = TableHash::order(x | 0xdead_beef_0000_0000, n);
                assert!(p < n && p >= last, "n {n}: {x:#x} at {p} after {last}");
                last = p;
            }
        }
    }
}
