//! Fault injection: the ways a real device goes wrong, on demand.
//!
//! A [`FaultInjector`] is a cheap, cloneable handle shared by the host side
//! (tests, `nicsync chaos`) and the device core. The host arms faults on it
//! from any thread; the core takes them at its next opportunity, whichever
//! runs it (a [`crate::Poller`] thread, an inline MMIO write, or
//! [`crate::Nic::step`]). With nothing armed the core pays one relaxed
//! atomic load per batch of commands and per housekeeping pass, nothing
//! per command.
//!
//! Each fault fires at an *opportunity* of its kind:
//!
//! | Fault | Opportunity | What the device does |
//! |---|---|---|
//! | [`Fault::DropCompletion`] | a command | executes it, writes no completion |
//! | [`Fault::CorruptCompletionTag`] | a command | executes it, writes its completion with tag bit 0 flipped |
//! | [`Fault::CorruptCompletionPhase`] | a command | executes it, writes its completion with the phase bit inverted |
//! | [`Fault::DmaError`] | a command | LOOKUP/SNAPSHOT: the response write fails, `DMA_ERROR`, nothing written; any other command: its descriptor fetch fails and the device goes `FATAL` (abi.md §5) |
//! | [`Fault::ResetMidBatch`] | a command, after `after` of them | resets itself before executing it (table, rings and registers as after `RESET`) |
//! | [`Fault::Stall`] | a batch (a poll with commands posted) | stops fetching commands for the duration, or until a reset or [`FaultInjector::clear`] |
//! | [`Fault::SpuriousInterrupt`] | a housekeeping pass with interrupts enabled | raises the completion vector with no cause in `IRQ_STATUS`, not counted in `INTERRUPTS` (a glitch, not an interrupt the design raised) |
//! | [`Fault::LoseEntry`] | a housekeeping pass with a non-empty table | silently removes one entry (chosen by the seeded generator): no event, no sync |
//! | [`Fault::CorruptEventPhase`] | an event written | writes it with the phase bit inverted |
//!
//! A [`Trigger`] says when an armed fault fires: after `skip`
//! opportunities, with a probability per opportunity (from the injector's
//! seeded generator, so a seed replays a run), at most `times` times.
//! Every fault that takes effect is counted by kind ([`FaultCounts`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::rng::SeededRng;

/// A fault the model can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A command is executed but its completion is never written.
    DropCompletion,
    /// The command pipeline stops fetching for `duration` of device time,
    /// or, with `None`, until the device is reset or the injector cleared.
    Stall {
        /// How long, in device time (virtual or real, as the model runs).
        duration: Option<Duration>,
    },
    /// A completion is written with a wrong tag (bit 0 flipped: the tag of
    /// a neighbouring command).
    CorruptCompletionTag,
    /// A completion is written with its phase bit inverted (it looks
    /// unwritten to the host until the ring comes round).
    CorruptCompletionPhase,
    /// An interrupt with no cause (and not counted in `INTERRUPTS`).
    SpuriousInterrupt,
    /// A DMA transfer of a command fails (see the module table).
    DmaError,
    /// The device resets itself in the middle of a batch, after executing
    /// `after` more commands.
    ResetMidBatch {
        /// Commands executed (from arming) before the reset.
        after: u32,
    },
    /// The table loses one entry, silently.
    LoseEntry,
    /// An event is written with its phase bit inverted (it looks unwritten
    /// to the host, in front of the events written after it).
    CorruptEventPhase,
}

/// The kind of a [`Fault`], without its parameters (for counting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// [`Fault::DropCompletion`].
    DropCompletion = 0,
    /// [`Fault::Stall`].
    Stall = 1,
    /// [`Fault::CorruptCompletionTag`].
    CorruptCompletionTag = 2,
    /// [`Fault::CorruptCompletionPhase`].
    CorruptCompletionPhase = 3,
    /// [`Fault::SpuriousInterrupt`].
    SpuriousInterrupt = 4,
    /// [`Fault::DmaError`].
    DmaError = 5,
    /// [`Fault::ResetMidBatch`].
    ResetMidBatch = 6,
    /// [`Fault::LoseEntry`].
    LoseEntry = 7,
    /// [`Fault::CorruptEventPhase`].
    CorruptEventPhase = 8,
}

const NKINDS: usize = 9;

impl FaultKind {
    /// Every kind, in order.
    pub const ALL: [FaultKind; NKINDS] = [
        FaultKind::DropCompletion,
        FaultKind::Stall,
        FaultKind::CorruptCompletionTag,
        FaultKind::CorruptCompletionPhase,
        FaultKind::SpuriousInterrupt,
        FaultKind::DmaError,
        FaultKind::ResetMidBatch,
        FaultKind::LoseEntry,
        FaultKind::CorruptEventPhase,
    ];

    /// Stable snake_case name, for reports and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            FaultKind::DropCompletion => "drop_completion",
            FaultKind::Stall => "stall",
            FaultKind::CorruptCompletionTag => "corrupt_completion_tag",
            FaultKind::CorruptCompletionPhase => "corrupt_completion_phase",
            FaultKind::SpuriousInterrupt => "spurious_interrupt",
            FaultKind::DmaError => "dma_error",
            FaultKind::ResetMidBatch => "reset_mid_batch",
            FaultKind::LoseEntry => "lose_entry",
            FaultKind::CorruptEventPhase => "corrupt_event_phase",
        }
    }

    const fn bit(self) -> u32 {
        1 << self as u32
    }

    /// Whether this kind fires at a command.
    const fn per_command(self) -> bool {
        matches!(
            self,
            FaultKind::DropCompletion
                | FaultKind::CorruptCompletionTag
                | FaultKind::CorruptCompletionPhase
                | FaultKind::DmaError
                | FaultKind::ResetMidBatch
        )
    }
}

impl Fault {
    /// Its kind.
    pub const fn kind(&self) -> FaultKind {
        match self {
            Fault::DropCompletion => FaultKind::DropCompletion,
            Fault::Stall { .. } => FaultKind::Stall,
            Fault::CorruptCompletionTag => FaultKind::CorruptCompletionTag,
            Fault::CorruptCompletionPhase => FaultKind::CorruptCompletionPhase,
            Fault::SpuriousInterrupt => FaultKind::SpuriousInterrupt,
            Fault::DmaError => FaultKind::DmaError,
            Fault::ResetMidBatch { .. } => FaultKind::ResetMidBatch,
            Fault::LoseEntry => FaultKind::LoseEntry,
            Fault::CorruptEventPhase => FaultKind::CorruptEventPhase,
        }
    }
}

/// When an armed fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    /// Opportunities that pass before the fault may fire.
    pub skip: u64,
    /// How many times it fires (`None`: until disarmed).
    pub times: Option<u64>,
    /// Chance per eligible opportunity, in parts per million (1,000,000:
    /// every one).
    pub ppm: u32,
}

impl Trigger {
    /// At the next opportunity, once.
    pub const fn once() -> Self {
        Trigger { skip: 0, times: Some(1), ppm: 1_000_000 }
    }

    /// Once, after `skip` opportunities have passed.
    pub const fn after(skip: u64) -> Self {
        Trigger { skip, times: Some(1), ppm: 1_000_000 }
    }

    /// At each of the next `n` opportunities.
    pub const fn times(n: u64) -> Self {
        Trigger { skip: 0, times: Some(n), ppm: 1_000_000 }
    }

    /// At each opportunity with probability `p` (0..=1), until disarmed.
    pub fn probability(p: f64) -> Self {
        let ppm = (p.clamp(0.0, 1.0) * 1_000_000.0).round() as u32;
        Trigger { skip: 0, times: None, ppm }
    }

    /// The same trigger, firing at most `n` times.
    pub const fn limit(self, n: u64) -> Self {
        Trigger { times: Some(n), ..self }
    }
}

/// Faults injected so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts(pub [u64; NKINDS]);

impl FaultCounts {
    /// Faults of `kind` that took effect.
    pub fn get(&self, kind: FaultKind) -> u64 {
        self.0[kind as usize]
    }

    /// Every fault that took effect.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// (kind, count) for every kind, in [`FaultKind::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (FaultKind, u64)> + '_ {
        FaultKind::ALL.iter().map(|k| (*k, self.0[*k as usize]))
    }
}

/// A stall in progress: [`FaultState::mask`] bit and end time.
const STALLED: u32 = 1 << NKINDS;
const COMMAND_KINDS: u32 = {
    let mut m = 0;
    let mut i = 0;
    while i < NKINDS {
        if FaultKind::ALL[i].per_command() {
            m |= FaultKind::ALL[i].bit();
        }
        i += 1;
    }
    m
};

#[derive(Debug)]
struct Armed {
    fault: Fault,
    trigger: Trigger,
    /// Opportunities seen.
    seen: u64,
    /// Times fired.
    fired: u64,
}

#[derive(Debug)]
struct Plan {
    armed: Vec<Armed>,
    rng: SeededRng,
}

#[derive(Debug)]
struct FaultState {
    /// Kinds armed (bit per [`FaultKind`]) and [`STALLED`]: the one word
    /// the device reads on its fast path.
    mask: AtomicU32,
    /// Device time (ns) at which a stall ends; `u64::MAX`: until cleared.
    stall_until: AtomicU64,
    plan: Mutex<Plan>,
    injected: [AtomicU64; NKINDS],
}

/// Arms faults in a modelled device and counts those injected. Clones
/// share one state.
#[derive(Clone, Debug)]
pub struct FaultInjector(Arc<FaultState>);

impl Default for FaultInjector {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultInjector {
    /// Nothing armed; the generator seeded with 0.
    pub fn new() -> Self {
        FaultInjector(Arc::new(FaultState {
            mask: AtomicU32::new(0),
            stall_until: AtomicU64::new(0),
            plan: Mutex::new(Plan { armed: Vec::new(), rng: SeededRng::new(0) }),
            injected: std::array::from_fn(|_| AtomicU64::new(0)),
        }))
    }

    fn plan(&self) -> MutexGuard<'_, Plan> {
        self.0.plan.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reseeds the generator behind probabilities and victim choice.
    pub fn seed(&self, seed: u64) {
        self.plan().rng = SeededRng::new(seed);
    }

    /// Arms `fault` for its next opportunity, once.
    pub fn arm(&self, fault: Fault) {
        self.arm_with(fault, Trigger::once());
    }

    /// Arms `fault` with a trigger. [`Fault::ResetMidBatch`]'s `after`
    /// adds to the trigger's `skip`.
    pub fn arm_with(&self, fault: Fault, mut trigger: Trigger) {
        if let Fault::ResetMidBatch { after } = fault {
            trigger.skip = trigger.skip.saturating_add(u64::from(after));
        }
        if trigger.times == Some(0) {
            return;
        }
        let mut p = self.plan();
        p.armed.push(Armed { fault, trigger, seen: 0, fired: 0 });
        self.update_mask(&p);
    }

    /// Disarms every fault of `kind` (a stall in progress goes on; see
    /// [`FaultInjector::clear`]).
    pub fn disarm(&self, kind: FaultKind) {
        let mut p = self.plan();
        p.armed.retain(|a| a.fault.kind() != kind);
        self.update_mask(&p);
    }

    /// Disarms everything and ends a stall in progress.
    pub fn clear(&self) {
        let mut p = self.plan();
        p.armed.clear();
        self.0.mask.fetch_and(!STALLED, Ordering::AcqRel);
        self.update_mask(&p);
    }

    /// Whether a fault of `kind` is armed.
    pub fn is_armed(&self, kind: FaultKind) -> bool {
        self.0.mask.load(Ordering::Acquire) & kind.bit() != 0
    }

    /// Whether the command pipeline is stalled now.
    pub fn is_stalled(&self) -> bool {
        self.0.mask.load(Ordering::Acquire) & STALLED != 0
    }

    /// Faults of `kind` that took effect.
    pub fn injected(&self, kind: FaultKind) -> u64 {
        self.0.injected[kind as usize].load(Ordering::Acquire)
    }

    /// Every kind's count.
    pub fn injected_by_kind(&self) -> FaultCounts {
        FaultCounts(std::array::from_fn(|i| self.0.injected[i].load(Ordering::Acquire)))
    }

    fn update_mask(&self, p: &Plan) {
        let armed = p.armed.iter().fold(0, |m, a| m | a.fault.kind().bit());
        // The stall bit is set and cleared outside the plan lock: keep it.
        let _ = self.0.mask.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| Some(m & STALLED | armed));
    }

    fn count(&self, kind: FaultKind) {
        self.0.injected[kind as usize].fetch_add(1, Ordering::AcqRel);
    }

    // ---- the device's side ------------------------------------------------

    /// Whether anything is armed or stalled: the device's one relaxed load
    /// per batch and per housekeeping pass.
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.0.mask.load(Ordering::Relaxed) != 0
    }

    /// One opportunity for the armed faults matching `pick`; returns the
    /// first that fires (the others keep their turn for the next one).
    fn opportunity(&self, pick: impl Fn(FaultKind) -> bool) -> Option<Fault> {
        let mut p = self.plan();
        let Plan { armed, rng } = &mut *p;
        let mut fired = None;
        for a in armed.iter_mut().filter(|a| pick(a.fault.kind())) {
            a.seen += 1;
            if fired.is_none() && a.seen > a.trigger.skip && rng.chance(a.trigger.ppm) {
                a.fired += 1;
                fired = Some(a.fault);
            }
        }
        if fired.is_some() {
            armed.retain(|a| a.trigger.times.is_none_or(|t| a.fired < t));
            self.update_mask(&p);
        }
        if let Some(f) = fired {
            self.count(f.kind());
        }
        fired
    }

    /// The fault for the command about to execute, if one fires.
    #[inline]
    pub(crate) fn command_fault(&self) -> Option<Fault> {
        if self.0.mask.load(Ordering::Relaxed) & COMMAND_KINDS == 0 {
            return None;
        }
        self.opportunity(FaultKind::per_command)
    }

    /// Whether the batch about to be fetched is held by a stall (one that
    /// is in progress, or one that fires now).
    pub(crate) fn batch_stalled(&self, now_ns: u64) -> bool {
        let m = self.0.mask.load(Ordering::Acquire);
        if m & STALLED != 0 {
            if now_ns < self.0.stall_until.load(Ordering::Acquire) {
                return true;
            }
            self.0.mask.fetch_and(!STALLED, Ordering::AcqRel);
        }
        if m & FaultKind::Stall.bit() == 0 {
            return false;
        }
        match self.opportunity(|k| k == FaultKind::Stall) {
            Some(Fault::Stall { duration }) => {
                let until = duration.map_or(u64::MAX, |d| now_ns.saturating_add(d.as_nanos() as u64));
                self.0.stall_until.store(until, Ordering::Release);
                self.0.mask.fetch_or(STALLED, Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }

    /// Whether a fault of `kind` (a housekeeping or an event kind) fires
    /// now.
    pub(crate) fn housekeeping_fault(&self, kind: FaultKind) -> bool {
        self.0.mask.load(Ordering::Relaxed) & kind.bit() != 0 && self.opportunity(|k| k == kind).is_some()
    }

    /// A number below `n` from the seeded generator (victim choice).
    pub(crate) fn below(&self, n: u64) -> u64 {
        self.plan().rng.below(n)
    }

    /// A device reset ends a stall.
    pub(crate) fn on_reset(&self) {
        self.0.mask.fetch_and(!STALLED, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_skip_limit_and_count() {
        let f = FaultInjector::new();
        assert!(!f.active());
        f.arm_with(Fault::DropCompletion, Trigger::after(2).limit(2));
        assert!(f.active() && f.is_armed(FaultKind::DropCompletion));
        let fired: Vec<bool> = (0..6).map(|_| f.command_fault().is_some()).collect();
        assert_eq!(fired, [false, false, true, true, false, false]);
        assert!(!f.active(), "exhausted faults disarm themselves");
        assert_eq!(f.injected(FaultKind::DropCompletion), 2);
        assert_eq!(f.injected_by_kind().total(), 2);
    }

    #[test]
    fn reset_mid_batch_counts_commands() {
        let f = FaultInjector::new();
        f.arm(Fault::ResetMidBatch { after: 3 });
        let at = (0..10).position(|_| f.command_fault().is_some());
        assert_eq!(at, Some(3));
    }

    #[test]
    fn one_fault_per_opportunity_the_other_waits() {
        let f = FaultInjector::new();
        f.arm(Fault::DropCompletion);
        f.arm(Fault::CorruptCompletionTag);
        assert_eq!(f.command_fault(), Some(Fault::DropCompletion));
        assert_eq!(f.command_fault(), Some(Fault::CorruptCompletionTag));
        assert_eq!(f.command_fault(), None);
    }

    #[test]
    fn stall_for_a_time_then_until_cleared() {
        let f = FaultInjector::new();
        f.arm(Fault::Stall { duration: Some(Duration::from_micros(5)) });
        assert!(f.batch_stalled(1_000));
        assert!(f.batch_stalled(5_999));
        assert!(!f.batch_stalled(6_000));
        assert!(!f.active());
        f.arm(Fault::Stall { duration: None });
        assert!(f.batch_stalled(0) && f.batch_stalled(u64::MAX - 1));
        f.on_reset();
        assert!(!f.batch_stalled(0));
        assert_eq!(f.injected(FaultKind::Stall), 2);
    }

    #[test]
    fn probability_replays_with_a_seed() {
        let run = |seed| {
            let f = FaultInjector::new();
            f.seed(seed);
            f.arm_with(Fault::LoseEntry, Trigger::probability(0.3));
            (0..200).map(|_| f.housekeeping_fault(FaultKind::LoseEntry)).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        let n = a.iter().filter(|x| **x).count();
        assert!((30..90).contains(&n), "{n} of 200 at p = 0.3");
    }
}
