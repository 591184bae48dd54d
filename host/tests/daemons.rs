//! Three `nicsync daemon` processes on loopback: real UDP for Delta Sync
//! and membership, real TCP for Full Sync, the control socket for churn
//! and digests. One member is killed with SIGKILL in the middle of the
//! churn and restarted; it pulls a Full Sync and every member ends with the
//! same digest.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use nicsync::control::Request;
use serde_json::Value;

mod common;

use common::Daemon as Member;

fn free_udp() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

fn free_tcp() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

fn wait_for<T>(what: &str, timeout: Duration, members: &[Member], f: impl FnMut() -> Option<T>) -> T {
    common::wait_for(what, timeout, &members.iter().collect::<Vec<_>>(), f)
}

/// Members probe every 10 ms and declare a peer dead after 30 missed probes
/// (300 ms, not the default 50 ms): three daemons and the test share a
/// small, busy CI machine, where a host loop can be late by tens of
/// milliseconds, and a false failover would move the Active under the test.
fn write_configs(dir: &Path, n: u16) -> Vec<Member> {
    nicsync_seal::KeyFile::generate().unwrap().write(&dir.join("cluster.key")).unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (free_udp(), free_udp(), free_tcp())).collect();
    (1..=n)
        .map(|id| {
            let (s, m, f) = ports[id as usize - 1];
            let socket = dir.join(format!("m{id}.sock"));
            let mut text = format!(
                "member_id = {id}\ncluster_id = 7\nmode = \"ha\"\n\
                 [device]\ntable_capacity = 65536\naging_period_ms = 0\n\
                 [sync]\nbind = \"127.0.0.1:{s}\"\n\
                 [membership]\nbind = \"127.0.0.1:{m}\"\ndead_after = 30\n\
                 [full_sync]\nbind = \"127.0.0.1:{f}\"\n\
                 [control]\nsocket = \"{}\"\n\
                 [security]\nkey_file = \"{}\"\n",
                socket.display(),
                dir.join("cluster.key").display()
            );
            for p in (1..=n).filter(|p| *p != id) {
                let (ps, pm, pf) = ports[p as usize - 1];
                text.push_str(&format!(
                    "[[peer]]\nid = {p}\nsync = \"127.0.0.1:{ps}\"\nmembership = \"127.0.0.1:{pm}\"\nfull_sync = [\"127.0.0.1:{pf}\"]\n"
                ));
            }
            let config = dir.join(format!("m{id}.toml"));
            std::fs::write(&config, text).unwrap();
            Member::new(id, None, config, socket, dir.join(format!("m{id}.log")))
        })
        .collect()
}

fn conn(i: u32) -> String {
    format!("tcp 10.9.{}.{}:{} -> 192.0.2.7:443", (i >> 8) & 0xff, i & 0xff, 20_000 + i % 40_000)
}

#[test]
fn three_daemons_survive_a_kill_and_converge() {
    let dir = std::env::temp_dir().join(format!("nicsync-daemons-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut members = write_configs(&dir, 3);
    for m in &mut members {
        m.start();
    }
    // One Active, two Standbys.
    let active = wait_for("one Active member", Duration::from_secs(20), &members, || {
        let states: Vec<(u16, String)> = members
            .iter()
            .filter_map(|m| m.req(&Request::State).ok().map(|v| (m.id, v["state"].as_str().unwrap_or("").to_string())))
            .collect();
        let actives: Vec<u16> = states.iter().filter(|(_, s)| s == "active").map(|(id, _)| *id).collect();
        (states.len() == 3 && actives.len() == 1 && states.iter().filter(|(_, s)| s == "standby").count() == 2)
            .then(|| actives[0])
    });
    let victim = if active == 3 { 2 } else { 3 };
    let a = active as usize - 1;

    // Churn through the Active's control socket; kill a Standby midway.
    let mut added = 0u32;
    for i in 0..1500u32 {
        let r = members[a].req(&Request::ConnAdd {
            key: conn(i),
            tcp_state: Some(if i % 3 == 0 { "syn_sent".into() } else { "established".into() }),
            timeout_s: 0,
            mark: i,
            sync: true,
        });
        r.unwrap_or_else(|e| panic!("conn add {i}: {e}"));
        added += 1;
        if i % 5 == 4 {
            members[a].req(&Request::ConnDel { key: conn(i - 2) }).expect("conn del");
        }
        if i == 600 {
            members[victim as usize - 1].kill9();
        }
        if i == 1000 {
            members[victim as usize - 1].start();
        }
    }
    assert_eq!(added, 1500);

    // The restarted member pulls a Full Sync; every digest agrees.
    let v = victim as usize - 1;
    wait_for("the restarted member to full-sync", Duration::from_secs(30), &members, || {
        let st = members[v].req(&Request::Syncstat).ok()?;
        (st["full_syncs_completed"].as_u64()? >= 1).then_some(())
    });
    let digests = wait_for("equal digests", Duration::from_secs(30), &members, || {
        let ds: Vec<Value> = members.iter().filter_map(|m| m.req(&Request::ConnDigest).ok()).collect();
        (ds.len() == 3 && ds.iter().all(|d| d == &ds[0])).then_some(ds)
    });
    // 1500 added, 300 deleted.
    assert_eq!(digests[0]["entries"].as_u64(), Some(1200), "{digests:?}");
    // `conn list` walks the card across loop turns too: every entry once,
    // in key order, and a limit is kept.
    let list = members[v].req(&Request::ConnList { limit: None }).expect("conn list");
    let keys: Vec<&str> = list.as_array().expect("a list").iter().filter_map(|e| e["key"].as_str()).collect();
    assert_eq!(keys.len(), 1200);
    let parsed: Vec<nicsync_fwif::conn::ConnKey> =
        keys.iter().map(|k| nicsync::control::parse_key(k).expect("key")).collect();
    assert!(parsed.windows(2).all(|w| zerocopy::IntoBytes::as_bytes(&w[0]) < zerocopy::IntoBytes::as_bytes(&w[1])));
    let some = members[v].req(&Request::ConnList { limit: Some(7) }).expect("conn list");
    assert_eq!(some.as_array().map(Vec::len), Some(7));
    let st = members[v].req(&Request::Syncstat).expect("syncstat");
    assert_eq!(st["full_syncs_failed"].as_u64(), Some(0), "{st}");
    // Every membership datagram came with the kernel's receive stamp (it
    // dates the peer's silence from its arrival, not from its reading).
    assert!(st["membership"]["probes_received"].as_u64().unwrap_or(0) > 0, "{st}");
    assert_eq!(st["net"]["ccp_unstamped"].as_u64(), Some(0), "{st}");
    let state = members[v].req(&Request::State).expect("state");
    assert_eq!(state["state"].as_str(), Some("standby"), "{state}");
    // A resync that would do nothing is refused, saying why: a member
    // that is not in the cluster, and the HA Active asked through a
    // Standby (it ignores a peer's request: its table is the cluster's).
    let unknown = members[v].req(&Request::Resync { member: Some(9) });
    assert!(unknown.as_ref().is_err_and(|e| e.contains("member 9 is not in this cluster")), "{unknown:?}");
    let r = members[v].req(&Request::Resync { member: Some(active) });
    assert!(r.as_ref().is_err_and(|e| e.contains("is the cluster's reference")), "{r:?}");
    // The control socket is the daemon's own, mode 0600.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&members[a].socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // `conn wait` on a Standby answers when the Active's update reaches it
    // (the card's event interrupt wakes the Standby's loop; its tick alone
    // would answer too, so this checks the answer, not its speed).
    let waiter = &members[v];
    let key = "tcp 10.250.0.1:4242 -> 192.0.2.9:443".to_string();
    let wait = std::thread::scope(|s| {
        let h = s.spawn(|| waiter.req(&Request::ConnWait { key: key.clone(), timeout_ms: 10_000 }));
        // The wait is registered before the update is made: the entry is
        // not there yet.
        std::thread::sleep(Duration::from_millis(100));
        members[a]
            .req(&Request::ConnAdd {
                key: key.clone(),
                tcp_state: Some("established".into()),
                timeout_s: 0,
                mark: 7,
                sync: true,
            })
            .expect("conn add");
        h.join().expect("waiter thread")
    });
    let wait = wait.expect("conn wait");
    assert_eq!(wait["key"].as_str(), Some(key.as_str()), "{wait}");
    assert_eq!(wait["record"]["mark"].as_u64(), Some(7), "{wait}");
    assert!(wait["seen_monotonic_ns"].as_u64().unwrap_or(0) > 0, "{wait}");
    let late = members[v].req(&Request::ConnWait { key: "tcp 10.250.0.2:1 -> 192.0.2.9:443".into(), timeout_ms: 50 });
    assert!(late.is_err_and(|e| e.contains("within 50 ms")), "a wait for a key that never comes ends with an error");
    // A TCP state for a connection of another protocol is refused.
    let udp = |state: Option<&str>| Request::ConnAdd {
        key: format!("udp 10.250.0.9:{} -> 192.0.2.9:53", if state.is_some() { 5353 } else { 5354 }),
        tcp_state: state.map(Into::into),
        timeout_s: 0,
        mark: 0,
        sync: true,
    };
    let refused = members[a].req(&udp(Some("established")));
    assert!(refused.as_ref().is_err_and(|e| e.contains("not TCP")), "{refused:?}");
    members[a].req(&udp(Some("none"))).expect("a UDP entry in TCP state none");
    // Left out, the state is the protocol's: none for UDP.
    let added = members[a].req(&udp(None)).expect("a UDP entry without a TCP state");
    let got = members[a].req(&Request::ConnGet { key: "udp 10.250.0.9:5354 -> 192.0.2.9:53".into() }).expect("get");
    assert_eq!(got["tcp_state"], "none", "{added} {got}");

    // An orderly stop of the Active (SIGTERM) right after a burst of
    // writes: it waits for its peers to acknowledge them, announces itself
    // Down and exits; a Standby takes over on the announcement, before it
    // would have taken the member for dead, and holds every write.
    for i in 0..300u32 {
        members[a]
            .req(&Request::ConnAdd {
                key: conn(5000 + i),
                tcp_state: Some("established".into()),
                timeout_s: 0,
                mark: i,
                sync: true,
            })
            .expect("conn add");
    }
    let logs_before: Vec<usize> = members.iter().map(|m| m.logs().len()).collect();
    let status = members[a].terminate(Duration::from_secs(10)).expect("the Active exits within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}\n{}", members[a].logs());
    let stopped = &members[a].logs()[logs_before[a]..];
    assert!(
        stopped.contains("orderly stop: done") && stopped.contains(" 0 changes unacknowledged"),
        "the stopping member's peers acknowledged everything:\n{stopped}"
    );
    let others: Vec<&Member> = members.iter().filter(|m| m.id != active).collect();
    let next = wait_for("a Standby to take over", Duration::from_secs(20), &members, || {
        others.iter().find(|m| m.req(&Request::State).ok().is_some_and(|v| v["state"] == "active")).map(|m| m.id)
    });
    // The new Active took over on the announcement: its log shows it
    // Active before it took the stopped member for dead (30 probes later).
    let n = next as usize - 1;
    let log = members[n].logs()[logs_before[n]..].to_string();
    let took_over = log
        .find("this member STANDBY -> ACTIVE")
        .unwrap_or_else(|| panic!("member {next} never logged its takeover:\n{log}"));
    let died = log.find(&format!("member {active} not heard within the dead window")).unwrap_or(usize::MAX);
    assert!(took_over < died, "member {next} took member {active} for dead before it took over:\n{log}");
    // A stopping member refuses changes; the two left hold every write.
    let digests = wait_for("equal digests of the two left", Duration::from_secs(30), &members, || {
        let ds: Vec<Value> = others.iter().filter_map(|m| m.req(&Request::ConnDigest).ok()).collect();
        (ds.len() == 2 && ds[0] == ds[1]).then_some(ds)
    });
    // 1200 from the churn, the waited key, two UDP entries and the burst.
    assert_eq!(digests[0]["entries"].as_u64(), Some(1200 + 1 + 2 + 300), "{digests:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seals `frame` as member `sender` would (or as a forger holding `keys`).
fn seal(sealer: &mut nicsync_seal::Sealer, frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; frame.len() + nicsync_seal::SEAL_OVERHEAD];
    let n = sealer.seal(frame, &mut out).unwrap();
    out.truncate(n);
    out
}

fn delta_frame(origin: &nicsync_fwif::sync::Origin, seq: u64, key: &str, mark: u32) -> Vec<u8> {
    use nicsync_fwif::conn::{ConnFlags, ConnState, Direction, Nat, TcpState};
    use nicsync_fwif::sync::{DeltaUpdate, DeltaWriter, MAX_FRAME};
    let key = nicsync::control::parse_key(key).unwrap();
    let mut state =
        ConnState::new(TcpState::Established, Direction::Original, ConnFlags::CONFIRMED | ConnFlags::SYNC, 0, mark);
    state.generation = 5.into();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut w = DeltaWriter::new(&mut buf, *origin, seq, false).unwrap();
    w.push(&DeltaUpdate::upsert(origin.member_id, key, state, Nat::default())).unwrap();
    let n = w.finish().unwrap();
    buf.truncate(n);
    buf
}

/// A daemon whose peer 2 is this test: real UDP datagrams, sealed right,
/// tampered, truncated, replayed, under a wrong key, from a stranger, in
/// clear, and too short. Only the genuine ones change the table; every other
/// is dropped and counted; the daemon keeps serving.
/// Member 1 in a daemon (sealed with a fresh key file), its peer 2 played
/// by the test's own sockets, and the daemon Active (alone).
struct TestPeer {
    dir: std::path::PathBuf,
    members: Vec<Member>,
    key_file: std::path::PathBuf,
    /// The peer's sync and membership sockets.
    peer_sync: UdpSocket,
    peer_ccp: UdpSocket,
    /// The daemon's.
    daemon_sync: std::net::SocketAddr,
    daemon_ccp: std::net::SocketAddr,
}

/// [`TestPeer`], its `[sync]` section followed by `sync_extra`.
fn daemon_with_a_test_peer(name: &str, sync_extra: &str) -> TestPeer {
    let dir = std::env::temp_dir().join(format!("nicsync-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("cluster.key");
    nicsync_seal::KeyFile::generate().unwrap().write(&key_file).unwrap();
    let peer_sync = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let peer_ccp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let (s, m, f) = (free_udp(), free_udp(), free_tcp());
    let socket = dir.join("m1.sock");
    let text = format!(
        "member_id = 1\ncluster_id = 7\n[device]\ntable_capacity = 65536\naging_period_ms = 0\n\
         [sync]\nbind = \"127.0.0.1:{s}\"\n{sync_extra}[membership]\nbind = \"127.0.0.1:{m}\"\n\
         [full_sync]\nbind = \"127.0.0.1:{f}\"\n[control]\nsocket = \"{}\"\n\
         [security]\nkey_file = \"{}\"\n\
         [[peer]]\nid = 2\nsync = \"{}\"\nmembership = \"{}\"\nfull_sync = [\"127.0.0.1:{}\"]\n",
        socket.display(),
        key_file.display(),
        peer_sync.local_addr().unwrap(),
        peer_ccp.local_addr().unwrap(),
        free_tcp()
    );
    let config = dir.join("m1.toml");
    std::fs::write(&config, text).unwrap();
    let mut members = vec![Member::new(1, None, config, socket, dir.join("m1.log"))];
    members[0].start();
    wait_for("member 1 Active alone", Duration::from_secs(20), &members, || {
        members[0].req(&Request::State).ok().filter(|v| v["state"] == "active")
    });
    TestPeer {
        dir,
        members,
        key_file,
        peer_sync,
        peer_ccp,
        daemon_sync: std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, s)),
        daemon_ccp: std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, m)),
    }
}

#[test]
fn forged_datagrams_are_dropped_and_counted_by_a_running_daemon() {
    use nicsync_fwif::sync::{Frame, Origin, MAX_FRAME};
    use nicsync_seal::{Keyring, Sealer, SharedKeyring, TrafficClass};

    let TestPeer { dir, members, key_file, peer_sync, peer_ccp, daemon_sync, daemon_ccp } =
        daemon_with_a_test_peer("forgery", "");
    let keys = SharedKeyring::new(Keyring::load(&key_file).unwrap());
    let mut genuine = Sealer::new(keys.clone(), TrafficClass::Delta, 2, 1);
    let origin = Origin { cluster_id: 7, member_id: 2, epoch: 0x5eed };
    let mut hello = vec![0u8; MAX_FRAME];
    let n = Frame::encode_hello(&mut hello, &origin, 1, 1).unwrap();
    peer_sync.send_to(&seal(&mut genuine, &hello[..n]), daemon_sync).unwrap();
    let good = seal(&mut genuine, &delta_frame(&origin, 1, "tcp 10.77.0.1:1000 -> 192.0.2.7:443", 1));
    peer_sync.send_to(&good, daemon_sync).unwrap();
    let get = |k: &str| members[0].req(&Request::ConnGet { key: k.into() });
    wait_for("the genuine update applied", Duration::from_secs(10), &members, || {
        get("tcp 10.77.0.1:1000 -> 192.0.2.7:443").ok()
    });

    let forged_key = "tcp 10.66.6.6:666 -> 192.0.2.7:443";
    let forged = delta_frame(&origin, 2, forged_key, 666);
    // Tampered: one ciphertext bit.
    let mut tampered = seal(&mut genuine, &forged);
    tampered[40] ^= 0x10;
    // Truncated: the tag cut short.
    let mut truncated = seal(&mut genuine, &forged);
    truncated.truncate(truncated.len() - 5);
    // Wrong key, same key id (and a later boot, so that it is not refused
    // as a replay before its tag is even checked).
    let other = SharedKeyring::new(Keyring::ephemeral().unwrap());
    let wrong_key = seal(&mut Sealer::new(other, TrafficClass::Delta, 2, 2), &forged);
    // A member id that is not a peer (with the right key).
    let stranger_origin = Origin { member_id: 9, ..origin };
    let stranger = seal(
        &mut Sealer::new(keys.clone(), TrafficClass::Delta, 9, 1),
        &delta_frame(&stranger_origin, 1, forged_key, 9),
    );
    for d in [&tampered, &truncated, &good, &wrong_key, &stranger, &forged, &vec![0xE1u8; 10]] {
        peer_sync.send_to(d, daemon_sync).unwrap();
    }
    // Membership: a datagram in clear.
    peer_ccp.send_to(b"NCCP forged membership datagram in clear", daemon_ccp).unwrap();

    // Counters are published by the device's housekeeping: poll them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let v = members[0].req(&Request::Syncstat).unwrap();
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        // tampered, truncated, wrong key, plain delta frame; plain membership datagram
        let all = n("auth_failures") >= 5
            && n("replays_dropped") >= 1
            && n("unknown_member_frames") >= 1
            && n("malformed_frames") >= 1;
        if all || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(stats["auth_failures"], 5, "{stats}");
    assert_eq!(stats["replays_dropped"], 1, "{stats}");
    assert_eq!(stats["unknown_member_frames"], 1, "{stats}");
    assert_eq!(stats["malformed_frames"], 1, "{stats}");
    assert_eq!(stats["security"]["host"]["ccp_auth_failures"], 1, "{stats}");
    assert_eq!(stats["encrypted"], true);
    // Not only counted: a member whose key is not the peers' hears nobody,
    // and the log says why and what to compare.
    let log = members[0].logs();
    assert!(log.contains("did not open (authentication failed") && log.contains("nicsync key show"), "{log}");
    // Nor is a membership datagram from an address no peer has.
    let stranger_ccp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    stranger_ccp.send_to(b"NCCP from nowhere", daemon_ccp).unwrap();
    wait_for("the stranger warned of", Duration::from_secs(10), &members, || {
        let warned =
            format!("a datagram from {}, which is no peer's membership address", stranger_ccp.local_addr().ok()?);
        members[0].logs().contains(&warned).then_some(())
    });
    assert!(get(forged_key).is_err(), "a forged update reached the table");
    // Still serving: the control socket answers and the table takes writes.
    members[0]
        .req(&Request::ConnAdd {
            key: "tcp 10.1.1.1:1 -> 192.0.2.7:443".into(),
            tcp_state: Some("established".into()),
            timeout_s: 0,
            mark: 0,
            sync: true,
        })
        .unwrap();
    assert!(get("tcp 10.1.1.1:1 -> 192.0.2.7:443").is_ok());
    // And it still takes the genuine peer's next update.
    peer_sync
        .send_to(&seal(&mut genuine, &delta_frame(&origin, 2, "tcp 10.77.0.2:1000 -> 192.0.2.7:443", 2)), daemon_sync)
        .unwrap();
    wait_for("the next genuine update applied", Duration::from_secs(10), &members, || {
        get("tcp 10.77.0.2:1000 -> 192.0.2.7:443").ok()
    });

    // Rotation, step 1 on the daemon's side: a second key is added to the
    // file and reloaded; the peer (this test) switches to it at once and
    // the daemon opens both.
    let mut file = nicsync_seal::KeyFile::read(&key_file).unwrap();
    let new_id = file.add_key().unwrap();
    file.write(&key_file).unwrap();
    let r = members[0].req(&Request::ReloadKeys).unwrap();
    assert_eq!(r["keys_accepted"], 2, "{r}");
    assert_eq!(r["send_key"], 1, "{r}");
    file.use_key(new_id).unwrap();
    let rotated = SharedKeyring::new(file.keyring(&key_file).unwrap());
    let mut genuine2 = Sealer::new(rotated, TrafficClass::Delta, 2, 3);
    let d = seal(&mut genuine2, &delta_frame(&origin, 3, "tcp 10.77.0.3:1000 -> 192.0.2.7:443", 3));
    assert_eq!(d[1], new_id, "sealed with the new key id");
    peer_sync.send_to(&d, daemon_sync).unwrap();
    wait_for("an update sealed with the new key applied", Duration::from_secs(10), &members, || {
        get("tcp 10.77.0.3:1000 -> 192.0.2.7:443").ok()
    });
    // A key file that loosened its mode is refused on reload; the daemon
    // keeps its keys.
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = members[0].req(&Request::ReloadKeys).unwrap_err();
    assert!(e.contains("chmod 600"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second stop signal while the peers have not acknowledged this
/// member's changes (peer 2, played by the test, never does) stops the
/// daemon at once, says how many, and exits with a failure: a service
/// manager must not record a stop that may have lost changes as clean.
#[test]
fn a_second_stop_signal_with_changes_unacknowledged_exits_with_a_failure() {
    use nicsync_fwif::sync::{Frame, Origin, MAX_FRAME};
    use nicsync_seal::{Keyring, Sealer, SharedKeyring, TrafficClass};

    let TestPeer { dir, mut members, key_file, peer_sync, daemon_sync, .. } =
        daemon_with_a_test_peer("second-signal", "stop_drain_ms = 60000\n");
    // The peer says hello, so that it counts among those who must
    // acknowledge, then never does.
    let keys = SharedKeyring::new(Keyring::load(&key_file).unwrap());
    let mut sealer = Sealer::new(keys, TrafficClass::Delta, 2, 1);
    let origin = Origin { cluster_id: 7, member_id: 2, epoch: 0x5eed };
    let mut hello = vec![0u8; MAX_FRAME];
    let n = Frame::encode_hello(&mut hello, &origin, 1, 1).unwrap();
    peer_sync.send_to(&seal(&mut sealer, &hello[..n]), daemon_sync).unwrap();
    for i in 0..3 {
        members[0]
            .req(&Request::ConnAdd {
                key: format!("tcp 10.3.3.{i}:1 -> 192.0.2.7:443"),
                tcp_state: Some("established".into()),
                timeout_s: 0,
                mark: 0,
                sync: true,
            })
            .unwrap();
    }
    wait_for("the changes unacknowledged", Duration::from_secs(10), &members, || {
        let v = members[0].req(&Request::Syncstat).ok()?;
        (v["unacked_updates"] == 3).then_some(())
    });
    let pid = members[0].pid().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_for("the orderly stop under way", Duration::from_secs(10), &members, || {
        members[0].req(&Request::State).ok().filter(|v| v["stopping"] == true)
    });
    let status = members[0].terminate(Duration::from_secs(10)).expect("exited on the second signal");
    let log = members[0].logs();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("a second stop signal: stopping at once, 3 of this member's changes not acknowledged"),
        "{log}"
    );
    assert!(log.contains("stopped by a second signal before every peer acknowledged"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One member alone, without encryption, its top-level config keys
/// followed by `top`, started and answering: its directory (removed by the
/// caller), the member, and its control socket.
fn lone_member(name: &str, top: &str) -> (std::path::PathBuf, Vec<Member>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("nicsync-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (s, m, f) = (free_udp(), free_udp(), free_tcp());
    let socket = dir.join("m1.sock");
    let text = format!(
        "member_id = 1\ncluster_id = 7\n{top}[device]\ntable_capacity = 65536\n\
         [sync]\nbind = \"127.0.0.1:{s}\"\n[membership]\nbind = \"127.0.0.1:{m}\"\n\
         [full_sync]\nbind = \"127.0.0.1:{f}\"\n[control]\nsocket = \"{}\"\n\
         [security]\nencryption = false\n",
        socket.display(),
    );
    let config = dir.join("m1.toml");
    std::fs::write(&config, text).unwrap();
    let mut members = vec![Member::new(1, None, config, socket.clone(), dir.join("m1.log"))];
    members[0].start();
    wait_for("member 1 answers", Duration::from_secs(20), &members, || members[0].req(&Request::State).ok());
    (dir, members, socket)
}

#[test]
fn nice_applies_to_every_thread_of_the_daemon() {
    // The lowest priority: setting it needs no privilege whatever the
    // test runs at.
    let (dir, members, _) = lone_member("nice", "nice = 19\n");
    let pid = members[0].pid().expect("running");
    let tasks = nicsync::member::thread_nice_values(pid).unwrap();
    // The daemon's loop and its device's polling thread at least.
    assert!(tasks.len() >= 2, "{tasks:?}");
    assert!(tasks.iter().all(|(_, n)| *n == Some(19)), "every thread at nice 19: {tasks:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One line sent over a fresh connection in the given pieces, with a pause
/// between them; then the answer, parsed.
fn ask_in_pieces(socket: &Path, pieces: &[&[u8]], half_close: bool) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            // Long enough for the daemon to accept and find the request
            // incomplete, so the rest arrives after its first read.
            std::thread::sleep(Duration::from_millis(50));
        }
        s.write_all(p).unwrap();
    }
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap_or_else(|e| {
        panic!("reading the answer to {} bytes: {e}", pieces.iter().map(|p| p.len()).sum::<usize>())
    });
    assert!(out.ends_with('\n') && out.matches('\n').count() == 1, "one answer line: {out:?}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn control_requests_in_pieces_long_or_malformed_are_answered() {
    let (dir, _members, socket) = lone_member("control", "");
    let refused = |v: &serde_json::Value| v["data"]["net"]["control_refused"].as_u64().unwrap();
    let inline = |v: &serde_json::Value| v["data"]["net"]["control_inline"].as_u64().unwrap();
    let first = ask_in_pieces(&socket, &[b"{\"cmd\":\"syncstat\"}\n"], false);
    let before = refused(&first);

    // A request written as soon as the client connects is (almost always:
    // the loop may accept before it lands) read whole at the accept.
    for _ in 0..20 {
        assert_eq!(ask_in_pieces(&socket, &[b"{\"cmd\":\"state\"}\n"], false)["data"]["member_id"], 1);
    }
    let now_inline = inline(&ask_in_pieces(&socket, &[b"{\"cmd\":\"syncstat\"}\n"], false));
    assert!(
        now_inline >= inline(&first) + 10,
        "{} of 20 answered at the accept",
        now_inline.saturating_sub(inline(&first) + 1)
    );

    // Whole at once (answered at the accept), and split (answered by the
    // connection's own reader).
    let whole = ask_in_pieces(&socket, &[b"{\"cmd\":\"state\"}\n"], false);
    assert_eq!(whole["ok"], true, "{whole}");
    let split = ask_in_pieces(&socket, &[b"{\"cmd\":", b"\"state\"}\n"], false);
    assert_eq!(split["ok"], true, "{split}");
    assert_eq!((&whole["data"]["member_id"], &split["data"]["member_id"]), (&1.into(), &1.into()));
    // No newline: the end of the request is the client's half-close.
    let unterminated = ask_in_pieces(&socket, &[b"{\"cmd\":\"state\"}"], true);
    assert_eq!(unterminated["ok"], true, "{unterminated}");
    // Longer than what the loop reads at the accept, still within the limit.
    let padded = format!("{{{}\"cmd\":\"state\"}}\n", " ".repeat(10_000));
    let long = ask_in_pieces(&socket, &[padded.as_bytes()], false);
    assert_eq!(long["ok"], true, "{long}");
    // A request that waits on the loop (a walk of the card).
    let digest = ask_in_pieces(&socket, &[b"{\"cmd\":\"conn_digest\"}\n"], false);
    assert_eq!(digest["ok"], true, "{digest}");
    assert_eq!(digest["data"]["entries"], 0, "{digest}");

    // Refused: not JSON, an unknown command, past the size limit.
    let bad = ask_in_pieces(&socket, &[b"hello\n"], false);
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("bad request"), "{bad}");
    let unknown = ask_in_pieces(&socket, &[b"{\"cmd\":\"reboot\"}\n"], false);
    assert_eq!(unknown["ok"], false, "{unknown}");
    let huge = format!("{{{}\"cmd\":\"state\"}}\n", " ".repeat(nicsync::control::MAX_REQUEST_BYTES));
    let too_long = ask_in_pieces(&socket, &[huge.as_bytes()], false);
    assert_eq!(too_long["ok"], false, "{too_long}");
    assert!(too_long["error"].as_str().unwrap().contains("longer than"), "{too_long}");
    // A connection's task sends its refusal to the loop before it answers,
    // and the loop counts it when it takes it from its channel, which may
    // be after the answer reached the client. A request answered through
    // that channel (a walk) comes after every refusal sent before it: once
    // it is answered, each of them is counted, and nothing more can come.
    let barrier = ask_in_pieces(&socket, &[b"{\"cmd\":\"conn_digest\"}\n"], false);
    assert_eq!(barrier["ok"], true, "{barrier}");
    let after = refused(&ask_in_pieces(&socket, &[b"{\"cmd\":\"syncstat\"}\n"], false));
    assert_eq!(after - before, 3, "three refusals counted, no more");
    // A wait longer than the daemon allows is refused, not cut short.
    let long_wait = format!(
        "{{\"cmd\":\"conn_wait\",\"key\":\"tcp 10.0.0.1:1 -> 10.0.0.2:2\",\"timeout_ms\":{}}}\n",
        nicsync::control::MAX_WAIT_MS + 1
    );
    let refused_wait = ask_in_pieces(&socket, &[long_wait.as_bytes()], false);
    assert_eq!(refused_wait["ok"], false, "{refused_wait}");
    assert!(refused_wait["error"].as_str().unwrap().contains("at most 60000 ms"), "{refused_wait}");
    // syncstat's keys, nested ones as `outer.inner` (a member without
    // the conntrack source has no `conntrack`): others read them.
    let mut keys = Vec::new();
    key_tree(&first["data"], "", &mut keys);
    keys.sort();
    assert_eq!(keys, SYNCSTAT_KEYS, "syncstat's keys");
    let _ = std::fs::remove_dir_all(&dir);
}

fn key_tree(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(map) = v.as_object() {
        for (k, inner) in map {
            let name = format!("{prefix}{k}");
            key_tree(inner, &format!("{name}."), out);
            out.push(name);
        }
    }
}

/// `syncstat --json`'s key tree, sorted.
const SYNCSTAT_KEYS: &[&str] = &[
    "apply_failed",
    "auth_failures",
    "ccp_rejected",
    "device_resync_events",
    "divergences_detected",
    "encrypted",
    "full_syncs_completed",
    "full_syncs_failed",
    "full_syncs_serve_failed",
    "full_syncs_served",
    "held_updates",
    "hold_drops",
    "join_history_covered",
    "join_history_lost",
    "last_error",
    "last_full_sync_ms",
    "last_full_sync_records",
    "lost_updates",
    "malformed_frames",
    "membership",
    "membership.announcements_sent",
    "membership.commands_ignored",
    "membership.commands_received",
    "membership.commands_sent",
    "membership.events_dropped",
    "membership.failovers",
    "membership.foreign_cluster",
    "membership.late",
    "membership.local_stalls",
    "membership.malformed",
    "membership.peer_deaths",
    "membership.peer_restarts",
    "membership.probes_received",
    "membership.probes_sent",
    "membership.queries_received",
    "membership.queries_sent",
    "membership.rejected",
    "membership.stale",
    "membership.state_changes",
    "membership.state_msgs_received",
    "membership.step_downs",
    "membership.tx_drops",
    "membership.unknown_sender",
    "merges_completed",
    "merges_failed",
    "net",
    "net.accept_errors",
    "net.ccp_send_errors",
    "net.ccp_unknown_source",
    "net.ccp_unstamped",
    "net.control_inline",
    "net.control_refused",
    "net.fs_connect_failures",
    "net.fs_refused",
    "next_seq",
    "queue_drops",
    "recovery",
    "recovery.audit_walks",
    "recovery.audits",
    "recovery.commands_replayed",
    "recovery.corrupt_completions",
    "recovery.corrupt_events",
    "recovery.device_resets_detected",
    "recovery.dma_errors",
    "recovery.dma_retries",
    "recovery.entries_adopted",
    "recovery.entries_restored",
    "recovery.fatal_errors",
    "recovery.lost_completions",
    "recovery.lost_entries_detected",
    "recovery.phase_anomalies",
    "recovery.resets",
    "recovery.spurious_interrupts",
    "recovery.stalls",
    "recovery.timeouts",
    "recovery.tombstones_restored",
    "recovery.unexpected_tags",
    "rejects_sent",
    "replays_dropped",
    "resyncs_requested",
    "retrans_requests_sent",
    "retrans_updates_sent",
    "retransmit_queue_depth",
    "security",
    "security.delta_auth_failures",
    "security.delta_malformed",
    "security.delta_replays_dropped",
    "security.delta_unknown_member",
    "security.host",
    "security.host.ccp_auth_failures",
    "security.host.ccp_malformed",
    "security.host.ccp_replays_dropped",
    "security.host.ccp_unknown_member",
    "security.host.fs_auth_failures",
    "security.host.fs_malformed",
    "security.host.fs_unknown_member",
    "snapshot_walks_torn",
    "submit_failed",
    "sync_events",
    "synced_entries",
    "table_digest",
    "unacked_updates",
    "unknown_member_frames",
    "updates_applied",
    "updates_received",
    "updates_sent",
];

/// `nicsync daemon --check`: a configuration whose key file is missing is
/// refused with the fix, exit 1; with the key there it prints the
/// configuration, every key explicit (which loads as the same), says what
/// the member would be, starts nothing and exits 0.
#[test]
fn check_mode_validates_without_starting() {
    let dir = std::env::temp_dir().join(format!("nicsync-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("cluster.key");
    // In a directory the daemon would create (as systemd's
    // RuntimeDirectory= is created only when the service starts).
    let socket = dir.join("run").join("nicsync").join("m1.sock");
    let config = dir.join("m1.toml");
    let text = format!(
        "member_id = 1\ncluster_id = 7\n[control]\nsocket = \"{}\"\n[security]\nkey_file = \"{}\"\n",
        socket.display(),
        key_file.display()
    );
    std::fs::write(&config, text).unwrap();
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_nicsync"))
            .args(["daemon", "--check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not exist") && err.contains("nicsync key gen"), "{err}");
    nicsync_seal::KeyFile::generate().unwrap().write(&key_file).unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("configuration OK: member 1 of cluster 7"), "{err}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let again = nicsync::config::Config::parse(&printed, Path::new("printed.toml")).unwrap();
    assert_eq!(again, nicsync::config::Config::load(&config).unwrap());
    assert!(!socket.exists(), "a check starts no daemon");
    let _ = std::fs::remove_dir_all(&dir);
}
