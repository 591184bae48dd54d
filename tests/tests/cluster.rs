//! Delta Sync between emulated devices: changes of connections marked for
//! sync, made through one member's rings, reach the other members' tables
//! through their sync units over an in-process wire, with loss, and every
//! member converges. Deterministic: inline devices on virtual clocks,
//! stepped by advancing time.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use nicsync::{ConnEntry, ConnTable, DriverConfig, TableError};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, TcpState};
use nicsync_fwif::event::EventKind;
use nicsync_fwif::regs::Counter;
use nicsync_model::sync::SenderConfig;
use nicsync_model::sync_unit::{SyncUnit, SyncUnitConfig};
use nicsync_model::wire::{HubConfig, Impairment, InProcessHub};
use nicsync_vfio::EmulatedDevice;

type Member = ConnTable<EmulatedDevice>;

fn cluster(n: u16, impairment: Impairment) -> (InProcessHub, Vec<Member>) {
    cluster_with(n, impairment, |_| 100)
}

/// A cluster whose member `id` ages with period `aging_ms(id)` (0: off).
fn cluster_with(n: u16, impairment: Impairment, aging_ms: impl Fn(u16) -> u32) -> (InProcessHub, Vec<Member>) {
    cluster_cfg(n, impairment, |id| DriverConfig { aging_period_ms: aging_ms(id), ..Default::default() })
}

/// A cluster whose member `id` is brought up with `cfg(id)`.
fn cluster_cfg(n: u16, impairment: Impairment, cfg: impl Fn(u16) -> DriverConfig) -> (InProcessHub, Vec<Member>) {
    let hub = InProcessHub::new(HubConfig { queue_capacity: 4096, seed: 7, impairment });
    let members = (1..=n).map(|id| member(&hub, id, (1..=n).filter(|p| *p != id).collect(), cfg(id))).collect();
    (hub, members)
}

/// Member `id` of cluster 1 on `hub`, following `peers`, brought up with `cfg`.
fn member(hub: &InProcessHub, id: u16, peers: Vec<u16>, cfg: DriverConfig) -> Member {
    let dev = EmulatedDevice::inline().expect("device");
    let port = hub.attach(id).expect("attach");
    let unit = SyncUnitConfig { sender: SenderConfig::new(1, id, 0x1000 + id as u32), peers };
    dev.nic().attach_sync(SyncUnit::new(unit, Box::new(port), 0).expect("sync unit"));
    ConnTable::open(dev, cfg).expect("probe")
}

/// Lets every member run its timers and sync unit for `ms` of virtual time.
fn run(members: &[Member], ms: u64) {
    for _ in 0..ms {
        for m in members {
            m.driver_ref().device().nic().advance_time(Duration::from_millis(1));
        }
    }
}

fn key(i: u32) -> ConnKey {
    ConnKey::v4(
        Ipv4Addr::from(0x0a05_0000 + i),
        30000 + (i % 20000) as u16,
        Ipv4Addr::new(192, 0, 2, 80),
        443,
        proto::TCP,
        0,
    )
}

fn synced(tcp: TcpState, mark: u32) -> ConnEntry {
    ConnEntry::new(ConnState::new(tcp, Direction::Original, ConnFlags::SYNC | ConnFlags::CONFIRMED, 3600, mark))
}

/// Key -> (tcp state, mark, generation) of every entry.
fn contents(m: &mut Member) -> BTreeMap<String, (u8, u32, u32)> {
    m.snapshot()
        .map(|r| {
            let r = r.expect("record");
            (format!("{}", r.key), (r.state.tcp_state, r.state.mark.get(), r.state.generation.get()))
        })
        .collect()
}

#[test]
fn changes_marked_for_sync_reach_the_peer() {
    let (_hub, mut m) = cluster(2, Impairment::NONE);
    m[0].insert(&key(1), &synced(TcpState::SynSent, 1)).expect("insert");
    // Not marked for sync: stays local.
    let local = ConnEntry::new(ConnState::new(TcpState::Established, Direction::Original, ConnFlags::CONFIRMED, 60, 0));
    m[0].insert(&key(2), &local).expect("insert");
    run(&m, 5);
    let rec = m[1].lookup(&key(1)).expect("lookup").expect("replicated");
    assert_eq!((rec.state.tcp(), rec.state.generation.get()), (Some(TcpState::SynSent), 1));
    assert!(m[1].lookup(&key(2)).expect("lookup").is_none(), "unsynced entry leaked");
    // The peer's host was told.
    let mut kinds = Vec::new();
    m[1].driver().poll_events(|e| kinds.push(e.kind));
    assert_eq!(kinds, vec![EventKind::SyncUpdated]);

    m[0].update(&key(1), &synced(TcpState::Established, 2)).expect("update");
    run(&m, 5);
    let rec = m[1].lookup(&key(1)).expect("lookup").expect("present");
    assert_eq!(
        (rec.state.tcp(), rec.state.mark.get(), rec.state.generation.get()),
        (Some(TcpState::Established), 2, 2)
    );

    m[0].delete(&key(1)).expect("delete");
    run(&m, 5);
    assert!(m[1].lookup(&key(1)).expect("lookup").is_none(), "delete not replicated");
    let stats = m[1].driver_ref().device().nic().sync_stats().expect("sync");
    assert_eq!(stats.applied, 3);
    assert_eq!(stats.protocol.lost_updates, 0);
    assert_eq!(stats.protocol.updates_sent, 0, "member 2 sent on what it applied (echo)");
}

#[test]
fn members_converge_under_loss() {
    let lossy = Impairment { loss_ppm: 100_000, dup_ppm: 20_000, reorder_ppm: 50_000 };
    let (_hub, mut m) = cluster(3, lossy);
    // Each member owns a share of the connections and churns them.
    for round in 0..5u32 {
        for (idx, member) in m.iter_mut().enumerate() {
            for i in 0..60u32 {
                // A third of the keys are shared by every member, so their
                // changes conflict and the rule must settle them.
                let k = if i % 3 == 0 { key(50_000 + i) } else { key(idx as u32 * 1000 + i) };
                let r = match (round + i) % 4 {
                    0 => member.upsert(&k, &synced(TcpState::SynSent, round)).map(|_| ()),
                    1 | 2 => member.upsert(&k, &synced(TcpState::Established, round)).map(|_| ()),
                    _ => member.delete(&k),
                };
                assert!(matches!(r, Ok(()) | Err(TableError::NotFound)), "{r:?}");
            }
        }
        run(&m, 3);
    }
    // NACKs and retransmissions settle; a loss at the very end of a stream
    // is only noticed from the next ALIVE (every second).
    run(&m, 2500);
    let a = contents(&mut m[0]);
    assert!(!a.is_empty());
    for (i, member) in m.iter_mut().enumerate().skip(1) {
        assert_eq!(contents(member), a, "member {} diverged", i + 1);
    }
    // The devices' running digests agree too, and count every synced entry.
    let digest = |t: &Member| {
        let d = t.driver_ref();
        (
            d.device_counter(nicsync_fwif::regs::Counter::SyncDigest),
            d.device_counter(nicsync_fwif::regs::Counter::SyncEntries),
        )
    };
    assert_eq!(digest(&m[0]).1, a.len() as u64);
    assert!(m.iter().all(|t| digest(t) == digest(&m[0])), "{:?}", m.iter().map(digest).collect::<Vec<_>>());
    let mut nacks = 0;
    for member in &m {
        let st = member.driver_ref().device().nic().sync_stats().expect("sync");
        assert_eq!(st.protocol.lost_updates, 0, "{st:?}");
        nacks += st.protocol.retrans_requests_sent;
    }
    assert!(nacks > 0, "10 % loss but no retransmission was ever asked for");
}

#[test]
fn concurrent_updates_resolve_the_same_way_everywhere() {
    let (_hub, mut m) = cluster(2, Impairment::NONE);
    m[0].insert(&key(9), &synced(TcpState::SynSent, 0)).expect("insert");
    run(&m, 5);
    // Both members update the same connection before hearing of the other:
    // same generation (2), so the higher owner id (member 2) wins on both.
    m[0].update(&key(9), &synced(TcpState::Established, 100)).expect("update on 1");
    m[1].update(&key(9), &synced(TcpState::FinWait, 200)).expect("update on 2");
    run(&m, 10);
    let a = m[0].lookup(&key(9)).expect("lookup").expect("present");
    let b = m[1].lookup(&key(9)).expect("lookup").expect("present");
    assert_eq!(a.state.mark.get(), 200, "member 1 kept its own change");
    assert_eq!(b.state.mark.get(), 200);
    assert_eq!(a.state, b.state);
}

#[test]
fn aging_on_one_member_removes_the_entry_everywhere() {
    // Only member 1 ages: member 2 learns of the expiry through sync.
    let (_hub, mut m) = cluster_with(2, Impairment::NONE, |id| if id == 1 { 100 } else { 0 });
    let short = ConnEntry::new(ConnState::new(TcpState::None, Direction::Original, ConnFlags::SYNC, 1, 0));
    m[0].insert(&key(5), &short).expect("insert");
    run(&m, 5);
    assert!(m[1].lookup(&key(5)).expect("lookup").is_some(), "not replicated");
    run(&m, 1300);
    assert!(m[0].lookup(&key(5)).expect("lookup").is_none(), "did not age on member 1");
    assert!(m[1].lookup(&key(5)).expect("lookup").is_none(), "aging not replicated");
    let mut kinds = Vec::new();
    m[1].driver().poll_events(|e| kinds.push(e.kind));
    assert_eq!(kinds, vec![EventKind::SyncUpdated, EventKind::SyncRemoved]);
}

#[test]
fn updates_lost_beyond_the_retransmit_queue_are_reported_to_the_host() {
    let (hub, mut m) = cluster(2, Impairment::NONE);
    m[0].insert(&key(1), &synced(TcpState::SynSent, 0)).expect("insert");
    run(&m, 5);
    // Member 2 cut off while member 1 makes more changes than its
    // retransmit queue (512) holds.
    hub.set_isolated(2, true);
    for i in 0..800u32 {
        m[0].upsert(&key(100 + i), &synced(TcpState::Established, i)).expect("upsert");
    }
    run(&m, 50);
    hub.set_isolated(2, false);
    m[0].upsert(&key(2000), &synced(TcpState::Established, 1)).expect("upsert");
    run(&m, 500);
    let st = m[1].driver_ref().device().nic().sync_stats().expect("sync");
    assert!(st.protocol.lost_updates > 0, "{st:?}");
    let mut resync = Vec::new();
    m[1].driver().poll_events(|e| {
        if e.kind == EventKind::ResyncNeeded {
            resync.push((e.state.mark.get(), e.state.generation.get()));
        }
    });
    assert!(!resync.is_empty(), "the host was not told");
    assert!(resync.iter().all(|(peer, lost)| *peer == 1 && *lost > 0), "{resync:?}");
    // And delivery goes on after the reported gap.
    assert!(m[1].lookup(&key(2000)).expect("lookup").is_some(), "delivery did not resume after the loss");
}

#[test]
fn a_delete_wins_whichever_member_makes_it() {
    // Member 2 (the higher id) creates, member 1 deletes: gone on both.
    let (_hub, mut m) = cluster(2, Impairment::NONE);
    m[1].insert(&key(3), &synced(TcpState::Established, 1)).expect("insert");
    run(&m, 5);
    assert!(m[0].lookup(&key(3)).expect("lookup").is_some());
    m[0].delete(&key(3)).expect("delete");
    run(&m, 5);
    assert!(m[0].lookup(&key(3)).expect("lookup").is_none());
    assert!(m[1].lookup(&key(3)).expect("lookup").is_none(), "the lower member's delete lost");
}

#[test]
fn aging_by_a_member_that_did_not_create_the_entry() {
    let (_hub, mut m) = cluster_with(2, Impairment::NONE, |id| if id == 1 { 100 } else { 0 });
    let short = ConnEntry::new(ConnState::new(TcpState::None, Direction::Original, ConnFlags::SYNC, 1, 0));
    m[1].insert(&key(6), &short).expect("insert on member 2");
    run(&m, 1300);
    assert!(m[0].lookup(&key(6)).expect("lookup").is_none(), "did not age on member 1");
    assert!(m[1].lookup(&key(6)).expect("lookup").is_none(), "member 2 kept it");
}

#[test]
fn a_delete_racing_an_update_is_not_undone_by_it() {
    let (_hub, mut m) = cluster(2, Impairment::NONE);
    m[0].insert(&key(4), &synced(TcpState::Established, 0)).expect("insert");
    run(&m, 5);
    // Concurrently: member 1 updates (generation 2) while member 2 deletes
    // (its delete carries generation 2, one above the entry it removed).
    // At equal generations the higher owner id wins, so the delete does on
    // both members, and member 1's update must not resurrect the entry on
    // member 2 (the tombstone stops it).
    m[0].update(&key(4), &synced(TcpState::FinWait, 1)).expect("update");
    m[1].delete(&key(4)).expect("delete");
    run(&m, 10);
    assert!(m[0].lookup(&key(4)).expect("lookup").is_none(), "member 1 kept its update");
    assert!(m[1].lookup(&key(4)).expect("lookup").is_none(), "the update resurrected the entry");
    // A later re-insert starts above the tombstone and replicates.
    m[0].insert(&key(4), &synced(TcpState::SynSent, 2)).expect("re-insert");
    run(&m, 5);
    let r = m[1].lookup(&key(4)).expect("lookup").expect("re-insert replicated");
    assert_eq!(r.state.mark.get(), 2);
}

#[test]
fn a_peer_change_that_does_not_fit_is_reported() {
    let (_hub, mut m) = cluster_cfg(2, Impairment::NONE, |id| DriverConfig {
        table_capacity: if id == 2 { 16 } else { 1 << 16 },
        ..Default::default()
    });
    for i in 0..40u32 {
        m[0].insert(&key(300 + i), &synced(TcpState::Established, i)).expect("insert");
    }
    run(&m, 10);
    assert_eq!(m[1].len(), 16);
    let st = m[1].driver_ref().device().nic().sync_stats().expect("sync");
    assert_eq!((st.applied, st.apply_failed), (16, 24));
    let mut resync = 0;
    m[1].driver().poll_events(|e| resync += (e.kind == EventKind::ResyncNeeded) as u32);
    assert_eq!(resync, 24, "every update that did not fit must be reported");
}

/// Every connection that stays put during a walk is in it, however many
/// cuckoo moves and stash refills other inserts and deletes cause between
/// its chunks (the device carries entries moved behind the walk).
#[test]
fn a_sync_snapshot_walk_is_consistent_while_the_table_churns() {
    let (_hub, mut m) =
        cluster_cfg(2, Impairment::NONE, |_| DriverConfig { table_capacity: 4096, ..Default::default() });
    let a = &mut m[0];
    // Near full, so that inserts kick entries around.
    for i in 0..3900u32 {
        a.insert(&key(i), &synced(TcpState::Established, i)).expect("insert");
    }
    let stable: std::collections::BTreeSet<String> =
        (0..3900u32).filter(|i| i % 2 == 0).map(|i| key(i).to_string()).collect();
    a.set_snapshot_chunk_bytes(16 * nicsync_fwif::sync::RECORD_SIZE);
    let (mut cursor, mut out, mut round) = (0u32, Vec::new(), 0u32);
    let kicks_before = a.driver_ref().device_counter(nicsync_fwif::regs::Counter::CuckooKicks);
    loop {
        cursor = a.sync_snapshot_chunk(cursor, &mut out).expect("chunk");
        if cursor == nicsync_fwif::cmd::SNAPSHOT_DONE {
            break;
        }
        // Churn the odd keys and add new ones between chunks.
        round += 1;
        for j in 0..4 {
            let _ = a.delete(&key(1 + 2 * ((round * 4 + j) * 7 % 1950)));
        }
        for j in 0..4 {
            let _ = a.upsert(&key(10_000 + round * 4 + j), &synced(TcpState::SynSent, 0));
        }
    }
    run(&m, 5);
    let a = &mut m[0];
    let kicks = a.driver_ref().device_counter(nicsync_fwif::regs::Counter::CuckooKicks) - kicks_before;
    assert!(kicks > 50, "the churn moved too little ({kicks} kicks): the test proves nothing");
    let seen: std::collections::BTreeSet<String> = out.iter().map(|u| u.key.to_string()).collect();
    let missing: Vec<_> = stable.difference(&seen).collect();
    assert!(missing.is_empty(), "{} stable entries missing from the walk, e.g. {:?}", missing.len(), missing.first());
    assert!(out.iter().all(|u| u.owner == 1));
}

/// Chunks of one record: an entry moved behind the walk fills the next
/// chunk from the carry FIFO alone, and the device answers with the cursor
/// it was given (it examined no position; abi.md 13). That is a walk going
/// on, not a faulty device (the host took it for one and broke the walk
/// off): the walk completes and misses no stable entry. A chunk whose FIFO
/// holds more than one record is torn, and the walk starts again.
#[test]
fn a_chunk_filled_from_the_carry_fifo_alone_keeps_its_cursor() {
    let (_hub, mut m) =
        cluster_cfg(1, Impairment::NONE, |_| DriverConfig { table_capacity: 4096, ..Default::default() });
    let a = &mut m[0];
    for i in 0..3900u32 {
        a.insert(&key(i), &synced(TcpState::Established, i)).expect("insert");
    }
    // The even keys stay; the odd ones make room for new ones.
    let stable: std::collections::BTreeSet<String> =
        (0..3900u32).filter(|i| i % 2 == 0).map(|i| key(i).to_string()).collect();
    let (mut stalls, mut torn, mut round) = (0u32, 0u32, 0u32);
    let out = 'walk: loop {
        let (mut cursor, mut out) = (0u32, Vec::new());
        loop {
            let before = out.len();
            match a.sync_snapshot_chunk_max(cursor, &mut out, nicsync_fwif::sync::RECORD_SIZE) {
                Ok(next) if next == nicsync_fwif::cmd::SNAPSHOT_DONE => break 'walk out,
                Ok(next) => {
                    stalls += u32::from(next == cursor && out.len() > before);
                    cursor = next;
                }
                Err(nicsync::TableError::Refused(nicsync_fwif::cpl::CplStatus::SnapshotTorn)) => {
                    torn += 1;
                    assert!(torn < 50, "torn {torn} times");
                    continue 'walk;
                }
                Err(e) => panic!("chunk at cursor {cursor}: {e}"),
            }
            round += 1;
            if stalls < 3 && round < 1900 {
                let _ = a.delete(&key(2 * round - 1));
                let _ = a.upsert(&key(20_000 + round), &synced(TcpState::SynSent, 0));
            }
        }
    };
    let kicks = a.driver_ref().device_counter(nicsync_fwif::regs::Counter::CuckooKicks);
    assert!(
        stalls >= 1,
        "no chunk came from the carry FIFO alone ({torn} torn, {kicks} kicks): the test proves nothing"
    );
    let seen: std::collections::BTreeSet<String> = out.iter().map(|u| u.key.to_string()).collect();
    let missing: Vec<_> = stable.difference(&seen).collect();
    assert!(missing.is_empty(), "{} stable entries missing from the walk, e.g. {:?}", missing.len(), missing.first());
}

#[test]
fn an_abandoned_or_foreign_cursor_is_refused_as_torn() {
    let (_hub, mut m) = cluster(1, Impairment::NONE);
    for i in 0..100u32 {
        m[0].insert(&key(i), &synced(TcpState::Established, i)).expect("insert");
    }
    m[0].set_snapshot_chunk_bytes(8 * nicsync_fwif::sync::RECORD_SIZE);
    let mut out = Vec::new();
    let next = m[0].sync_snapshot_chunk(0, &mut out).expect("first chunk");
    assert!(next != nicsync_fwif::cmd::SNAPSHOT_DONE);
    let r = m[0].sync_snapshot_chunk(next + 1, &mut out);
    assert!(
        matches!(r, Err(TableError::Refused(nicsync_fwif::cpl::CplStatus::SnapshotTorn))),
        "a cursor the device did not hand out: {r:?}"
    );
}

#[test]
fn replica_writes_keep_their_owner_and_are_not_sent_on() {
    let (_hub, mut m) = cluster(2, Impairment::NONE);
    let e = synced(TcpState::Established, 7);
    let mut e5 = e;
    e5.state.generation = 5.into();
    let r = m[1].batch(&[nicsync::TableOp::Replica(key(1), e5, 1)]).expect("batch");
    assert!(matches!(r[0], Ok(5)), "{r:?}");
    run(&m, 5);
    assert!(m[0].lookup(&key(1)).expect("lookup").is_none(), "a replica write was sent to the peers");
    // An older copy loses.
    let mut e3 = e;
    e3.state.generation = 3.into();
    let r = m[1].batch(&[nicsync::TableOp::Replica(key(1), e3, 1)]).expect("batch");
    assert!(matches!(r[0], Err(TableError::Stale { stored: 5 })), "the winner's generation: {r:?}");
    // The owner came through: member 1's later change at generation 6 wins.
    let mut e6 = synced(TcpState::FinWait, 9);
    e6.state.generation = 6.into();
    m[0].set_auto_generation(false);
    m[0].insert(&key(1), &e6).expect("insert on 1");
    run(&m, 5);
    let got = m[1].lookup(&key(1)).expect("lookup").expect("present");
    assert_eq!((got.state.generation.get(), got.state.mark.get()), (6, 9));
    let mut out = Vec::new();
    m[1].sync_snapshot_chunk(0, &mut out).expect("walk");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].owner, 1);
}

/// How a member that first hears its peer late ends: it never joined (no
/// hold), or it joined and its hold is released after the card was told a
/// Full Sync's cut (SYNC_ALIGN), or without one (it seeded its table).
#[derive(Clone, Copy, Debug, PartialEq)]
enum JoinEnd {
    NotJoining,
    Aligned,
    Released,
}

/// A member that first hears a peer after the peer's queue (512) has let
/// go of the start of its epoch. Opened without the hold, the start is a
/// loss. Opened with it (a cluster member, about to pull a Full Sync) it
/// is history: not asked for while joining; covered by a cut; or, joining
/// ended without one, asked for then, and what is gone counted apart from
/// losses. The host is told of anything gone.
#[test]
fn history_a_joining_member_asks_only_for_what_no_cut_covers() {
    for end in [JoinEnd::NotJoining, JoinEnd::Aligned, JoinEnd::Released] {
        let joining = end != JoinEnd::NotJoining;
        let hub = InProcessHub::new(HubConfig { queue_capacity: 4096, seed: 7, impairment: Impairment::NONE });
        let mut m1 = member(&hub, 1, vec![2], DriverConfig::default());
        for i in 0..800u32 {
            m1.upsert(&key(100 + i), &synced(TcpState::Established, i)).expect("upsert");
        }
        run(std::slice::from_ref(&m1), 10);
        let m2 = member(&hub, 2, vec![1], DriverConfig { sync_hold_at_enable: joining, ..Default::default() });
        let mut both = [m1, m2];
        run(&both, 2_000);
        let c = |m: &Member, k: Counter| m.driver_ref().device_counter(k);
        if joining {
            let none = (c(&both[1], Counter::SyncRetransRequestsSent), c(&both[1], Counter::SyncUpdatesReceived));
            assert_eq!(none, (0, 0), "{end:?}: history is not asked for while joining");
            if end == JoinEnd::Aligned {
                // The cut a server's walk would start at: 801 of member 1.
                let cut = both[0].sync_positions().expect("positions").expect("capability");
                assert_eq!((cut[0].member.get(), cut[0].next_seq.get()), (1, 801), "{cut:?}");
                assert_eq!(both[1].sync_align(&cut).expect("align"), Some(1), "the entry for member 1 aligns");
            }
            both[1].driver().set_sync_hold(false).expect("release");
            run(&both, 2_000);
        }
        let [_, mut m2] = both;
        // The HELLO names 1..=800; the queue still holds 289..=800.
        let (history, lost, covered, received) = match end {
            JoinEnd::NotJoining => (0, 288, 0, 512),
            JoinEnd::Aligned => (0, 0, 800, 0),
            JoinEnd::Released => (288, 0, 0, 512),
        };
        let counts = (c(&m2, Counter::SyncHistoryLost), c(&m2, Counter::SyncLostUpdates));
        assert_eq!(counts, (history, lost), "{end:?}");
        assert_eq!(c(&m2, Counter::SyncHistoryCovered), covered, "{end:?}");
        assert_eq!(c(&m2, Counter::SyncUpdatesReceived), received, "{end:?}");
        let mut resync = 0;
        m2.driver().poll_events(|e| resync += u32::from(e.kind == EventKind::ResyncNeeded));
        assert_eq!(resync, u32::from(end != JoinEnd::Aligned), "{end:?}: the host is told of anything gone");
    }
}

/// A member whose peers' updates are held (a Full Sync under way) does not
/// age: a refresh of an entry may be waiting in its hold buffer, and aged
/// on its old expiry the entry's delete, synced with a generation above
/// the refresh's, would remove the live connection everywhere. It ages
/// again once the held updates are applied.
#[test]
fn a_member_holding_its_peers_updates_does_not_age() {
    let (_hub, mut m) = cluster_with(2, Impairment::NONE, |id| if id == 2 { 100 } else { 0 });
    let short = ConnEntry::new(ConnState::new(TcpState::None, Direction::Original, ConnFlags::SYNC, 1, 0));
    m[0].insert(&key(7), &short).expect("insert");
    run(&m, 10);
    assert!(m[1].lookup(&key(7)).expect("lookup").is_some(), "not replicated");
    m[1].driver().set_sync_hold(true).expect("hold");
    // Member 1 refreshes it every half second; member 2 holds the refreshes.
    for _ in 0..4 {
        run(&m, 500);
        m[0].upsert(&key(7), &short).expect("refresh");
    }
    run(&m, 10);
    assert!(m[1].lookup(&key(7)).expect("lookup").is_some(), "aged while its refreshes were held");
    assert!(m[0].lookup(&key(7)).expect("lookup").is_some(), "member 2's aging removed it everywhere");
    // Released: the refreshes apply, and it ages when it expires.
    m[1].driver().set_sync_hold(false).expect("release");
    run(&m, 1300);
    assert!(m[1].lookup(&key(7)).expect("lookup").is_none(), "did not age after the hold");
    assert!(m[0].lookup(&key(7)).expect("lookup").is_none(), "its aging was not synced");
}

/// `sync_unacked` counts what the peers that are there have not
/// acknowledged: a peer cut off acknowledges nothing, and counts until it
/// has been silent for three ALIVE intervals (an idle peer sends one every
/// interval); then the count is the others' (a stopping member, or one
/// about to pull, waits for it to drain).
#[test]
fn a_peer_silent_for_three_alive_intervals_no_longer_holds_the_unacknowledged_count() {
    use nicsync_fwif::regs::Counter;
    let (hub, mut m) = cluster(3, Impairment::NONE);
    m[0].insert(&key(20), &synced(TcpState::Established, 1)).expect("insert");
    run(&m, 300);
    assert_eq!(m[0].driver_ref().device_counter(Counter::SyncUnacked), 0, "both peers acknowledged");
    hub.set_isolated(3, true);
    m[0].insert(&key(21), &synced(TcpState::Established, 2)).expect("insert");
    run(&m, 300);
    assert_eq!(m[0].driver_ref().device_counter(Counter::SyncUnacked), 1, "member 3 was heard lately");
    run(&m, 3000);
    assert_eq!(m[0].driver_ref().device_counter(Counter::SyncUnacked), 0, "member 3 is gone");
    // Back, it counts again until it has caught up.
    hub.set_isolated(3, false);
    run(&m, 1500);
    assert_eq!(m[0].driver_ref().device_counter(Counter::SyncUnacked), 0, "member 3 caught up");
    assert!(m[2].lookup(&key(21)).expect("lookup").is_some());
}

#[test]
fn held_peer_updates_are_applied_in_arrival_order_on_release() {
    let (_hub, mut m) = cluster(2, Impairment::NONE);
    // Member 2 learns member 1's epoch first (from its first update's
    // frame): held updates are those of a stream it follows, not history
    // from before it heard the peer (see the test above).
    m[0].insert(&key(9), &synced(TcpState::SynSent, 1)).expect("insert");
    run(&m, 10);
    m[1].driver().set_sync_hold(true).expect("hold");
    m[0].insert(&key(1), &synced(TcpState::SynSent, 1)).expect("insert");
    m[0].update(&key(1), &synced(TcpState::Established, 2)).expect("update");
    m[0].insert(&key(2), &synced(TcpState::SynSent, 3)).expect("insert");
    m[0].delete(&key(2)).expect("delete");
    run(&m, 10);
    assert!(m[1].lookup(&key(1)).expect("lookup").is_none(), "applied while held");
    assert_eq!(m[1].driver_ref().device_counter(nicsync_fwif::regs::Counter::SyncHeld), 4);
    m[1].driver().set_sync_hold(false).expect("release");
    run(&m, 2);
    let r = m[1].lookup(&key(1)).expect("lookup").expect("applied on release");
    assert_eq!((r.state.mark.get(), r.state.generation.get()), (2, 2));
    assert!(m[1].lookup(&key(2)).expect("lookup").is_none());
    assert_eq!(m[1].driver_ref().device_counter(nicsync_fwif::regs::Counter::SyncUpdatesApplied), 5);
    assert_eq!(m[0].driver_ref().device_counter(nicsync_fwif::regs::Counter::SyncUpdatesSent), 5);
}

/// A host DELETE of a synced connection with a NAT translation reaches the
/// peers. The device used to send the delete with the stored translation,
/// which the sync wire refuses (a delete carries none): the local delete
/// succeeded and every peer kept the connection for good.
#[test]
fn a_delete_of_a_translated_connection_reaches_the_peers() {
    use nicsync_fwif::conn::{Nat, NatKind};
    let (_hub, mut m) = cluster(2, Impairment::NONE);
    let translated = ConnEntry {
        nat: Some(Nat::new(NatKind::Source, Ipv4Addr::new(198, 51, 100, 7).into(), 40000)),
        ..synced(TcpState::Established, 5)
    };
    m[0].insert(&key(1), &translated).expect("insert");
    run(&m, 5);
    assert!(m[1].lookup(&key(1)).expect("lookup").is_some(), "insert not replicated");
    m[0].delete(&key(1)).expect("delete");
    run(&m, 5);
    assert!(
        m[1].lookup(&key(1)).expect("lookup").is_none(),
        "the delete of a translated connection did not reach the peer"
    );
    let st = m[0].driver_ref().device().nic().sync_stats().expect("sync");
    assert_eq!((st.submit_failed, st.protocol.updates_sent), (0, 2));
}
