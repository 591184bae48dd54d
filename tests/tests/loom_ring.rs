#![allow(clippy::expect_used)] // test code: a failed set-up is a failed test
//! A loom model of the ring protocol shared by the completion and event
//! rings: the producer (device) writes an entry's body, then its first
//! word carrying the phase bit with release ordering; the consumer (host)
//! acquires that word, checks the phase it expects (starting at 1, flipping
//! at every wrap), reads the body, and reports its head so the producer
//! knows the slot is free again. Loom explores every interleaving and
//! every permitted reordering of the relaxed body accesses.
//!
//! The model mirrors `ProducerRing::push_burst` in hdl-model and
//! `ConsumerRing::peek/advance` in the host driver: same index arithmetic,
//! same phase rule, same one-empty-slot fullness test.

use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

const PHASE_SHIFT: u32 = 56;

struct Ring {
    size: u32,
    word0: Vec<AtomicU64>,
    body: Vec<AtomicU64>,
    head: AtomicU32,
}

fn run(size: u32, entries: u64) {
    loom::model(move || {
        let ring = Arc::new(Ring {
            size,
            word0: (0..size).map(|_| AtomicU64::new(0)).collect(),
            body: (0..size).map(|_| AtomicU64::new(0)).collect(),
            head: AtomicU32::new(0),
        });
        let producer = {
            let ring = ring.clone();
            thread::spawn(move || {
                let (mut tail, mut phase) = (0u32, 1u64);
                for i in 0..entries {
                    // One slot stays empty: full when tail + 1 == head.
                    while (tail + 1) % ring.size == ring.head.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                    ring.body[tail as usize].store(1000 + i, Ordering::Relaxed);
                    ring.word0[tail as usize].store(i | phase << PHASE_SHIFT, Ordering::Release);
                    tail += 1;
                    if tail == ring.size {
                        tail = 0;
                        phase ^= 1;
                    }
                }
            })
        };
        let (mut head, mut phase) = (0u32, 1u64);
        for i in 0..entries {
            let w = loop {
                let w = ring.word0[head as usize].load(Ordering::Acquire);
                if w >> PHASE_SHIFT == phase {
                    break w;
                }
                thread::yield_now();
            };
            // In order, never a stale body.
            assert_eq!(w & 0xFFFF_FFFF, i, "entries out of order");
            assert_eq!(ring.body[head as usize].load(Ordering::Relaxed), 1000 + i, "body read before it was written");
            head += 1;
            if head == ring.size {
                head = 0;
                phase ^= 1;
            }
            ring.head.store(head, Ordering::Release);
        }
        producer.join().expect("producer thread");
    });
}

#[test]
fn entries_arrive_in_order_with_their_bodies_across_a_wrap() {
    // Three entries through a 2-entry ring: the phase flips and the
    // producer waits for the consumer's head in between.
    run(2, 3);
}

#[test]
fn four_entry_ring_one_lap() {
    run(4, 3);
}

/// The same protocol with the body written *after* the phase word (the
/// bug the ordering prevents): loom must find the stale read.
#[test]
#[should_panic]
fn loom_catches_body_written_after_the_phase_word() {
    loom::model(|| {
        let word0 = Arc::new(AtomicU64::new(0));
        let body = Arc::new(AtomicU64::new(0));
        let (w2, b2) = (word0.clone(), body.clone());
        let p = thread::spawn(move || {
            w2.store(1 << PHASE_SHIFT, Ordering::Release);
            b2.store(1000, Ordering::Relaxed);
        });
        if word0.load(Ordering::Acquire) >> PHASE_SHIFT == 1 {
            assert_eq!(body.load(Ordering::Relaxed), 1000);
        }
        p.join().expect("producer thread");
    });
}
