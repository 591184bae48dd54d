//! nicsync beside a real Linux firewall: `nicsync daemon` processes with
//! `source = "conntrack"` in network namespaces with nftables connection
//! tracking. Needs root and network namespaces (CI runs as root, with
//! `NICSYNC_REQUIRE_NETNS=1` so that it fails instead of skipping); where
//! they cannot be had, each test says so on stderr and returns (a skip,
//! reported as such).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nicsync::control::Request;
use nicsync_conntrack::{from_ct, in_netns, to_ct, CreateMode, CtSocket};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, TcpState};
use serde_json::Value;

/// Creates a namespace, or says why not: `None` is a skip, unless CI asked
/// for the namespaces to be there.
fn netns(tag: &str) -> Option<Netns> {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("nsct-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let why = match Command::new("ip").args(["netns", "add", &name]).output() {
        Ok(o) if o.status.success() => return Some(Netns { name }),
        Ok(o) => format!("`ip netns add` failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("cannot run `ip` (iproute2): {e}"),
    };
    skip_or_fail(&format!("network namespaces cannot be created here ({why}); this test needs root"));
    None
}

fn skip_or_fail(why: &str) {
    if std::env::var_os("NICSYNC_REQUIRE_NETNS").is_some() {
        panic!("{why} (NICSYNC_REQUIRE_NETNS is set: not skipping)");
    }
    eprintln!("SKIPPED: {why}");
}

struct Netns {
    name: String,
}

impl Netns {
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip").args(["netns", "exec", &self.name]).args(args).output().expect("ip netns exec")
    }

    fn sh(&self, script: &str) {
        let o = self.exec(&["sh", "-c", script]);
        assert!(o.status.success(), "in {}: {script}: {}", self.name, String::from_utf8_lossy(&o.stderr));
    }

    /// Turns connection tracking on (a ruleset that uses it) and shortens
    /// the closing TCP states' timeouts so that closed connections go
    /// within the test.
    fn firewall(&self) -> bool {
        let rules = "table inet nicsync_test {\n\
                     chain input { type filter hook input priority 0; policy accept; ct state established,related accept; }\n\
                     chain output { type filter hook output priority 0; policy accept; ct state established,related accept; }\n\
                     }\n";
        let mut child = match Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                skip_or_fail(&format!("cannot run nft (nftables): {e}"));
                return false;
            }
        };
        child.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("write rules");
        let o = child.wait_with_output().expect("nft");
        if !o.status.success() {
            skip_or_fail(&format!("nft could not load a conntrack ruleset: {}", String::from_utf8_lossy(&o.stderr)));
            return false;
        }
        self.sh("cd /proc/sys/net/netfilter && for t in fin_wait close_wait last_ack time_wait close; do \
             echo 1 > nf_conntrack_tcp_timeout_$t; done");
        true
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

mod common;

use common::{wait_for, Daemon};

fn state(d: &Daemon) -> Option<String> {
    d.req(&Request::State).ok().and_then(|v| v["state"].as_str().map(str::to_owned))
}

fn conntrack_stats(d: &Daemon) -> Value {
    d.req(&Request::Syncstat).map(|v| v["conntrack"].clone()).unwrap_or(Value::Null)
}

/// Keys of the entries marked for sync on this member's card.
fn card_keys(d: &Daemon) -> Option<BTreeSet<String>> {
    let v = d.req(&Request::ConnList { limit: None }).ok()?;
    Some(v.as_array()?.iter().filter_map(|e| e["key"].as_str().map(str::to_owned)).collect())
}

fn key_gen(dir: &Path) -> PathBuf {
    let key = dir.join("cluster.key");
    let o = Command::new(env!("CARGO_BIN_EXE_nicsync")).args(["key", "gen"]).arg(&key).output().expect("key gen");
    assert!(o.status.success(), "nicsync key gen: {}", String::from_utf8_lossy(&o.stderr));
    key
}

/// A member's configuration: `me` binds, `peers` (id, address).
fn config(dir: &Path, id: u16, me: Ipv4Addr, peers: &[(u16, Ipv4Addr)], key: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join(format!("m{id}.sock"));
    let mut text = format!(
        "member_id = {id}\ncluster_id = 7\nsource = \"conntrack\"\n\n\
         [device]\ntable_capacity = 262144\n\n\
         [sync]\nbind = \"{me}:8116\"\n\n\
         [membership]\nbind = \"{me}:8117\"\ndead_after = 30\n\n\
         [full_sync]\nbind = \"{me}:8118\"\n\n\
         [control]\nsocket = \"{}\"\n\n\
         [security]\nkey_file = \"{}\"\n\n\
         {extra}\n",
        socket.display(),
        key.display()
    );
    for (pid, addr) in peers {
        text.push_str(&format!(
            "\n[[peer]]\nid = {pid}\nsync = \"{addr}:8116\"\nmembership = \"{addr}:8117\"\nfull_sync = \"{addr}:8118\"\n"
        ));
    }
    let path = dir.join(format!("m{id}.toml"));
    std::fs::write(&path, text).expect("write config");
    (path, socket)
}

fn daemon(ns: &Netns, dir: &Path, id: u16, config: PathBuf, socket: PathBuf) -> Daemon {
    Daemon::new(id, Some(ns.name.clone()), config, socket, dir.join(format!("m{id}.log")))
}

/// Original tuples of namespace `ns`'s TCP connections to `port`, as
/// `conntrack -L` lists them (the conntrack tool when it is installed, the
/// same ctnetlink dump through nicsync's client otherwise). A dump also
/// makes the kernel reap entries that have expired (with DESTROY events).
fn kernel_keys(ns: &Netns, port: u16) -> BTreeSet<String> {
    let o = ns.exec(&["conntrack", "-L", "-p", "tcp", "--dport", &port.to_string()]);
    if o.status.success() {
        let text = String::from_utf8_lossy(&o.stdout);
        return text
            .lines()
            .filter_map(|l| {
                let field = |name: &str| l.split_whitespace().find_map(|w| w.strip_prefix(name));
                Some(format!("tcp {}:{} -> {}:{}", field("src=")?, field("sport=")?, field("dst=")?, field("dport=")?))
            })
            .collect();
    }
    let entries =
        in_netns(&ns.path(), || CtSocket::open().and_then(|mut s| s.dump_all())).expect("netns").expect("dump");
    entries
        .iter()
        .filter_map(|e| from_ct(e).ok())
        .filter(|m| m.key.proto == proto::TCP && m.key.dst_port.get() == port)
        .map(|m| m.key.to_string())
        .collect()
}

fn with_port(keys: &BTreeSet<String>, port: u16) -> BTreeSet<String> {
    let suffix = format!(":{port}");
    keys.iter().filter(|k| k.ends_with(&suffix)).cloned().collect()
}

/// Namespaces A and B joined by a veth pair, A at 10.<net>.0.1, B at .2.
fn pair(tag: &str, net: u8) -> Option<(Netns, Netns, Ipv4Addr, Ipv4Addr)> {
    let a = netns(&format!("{tag}a"))?;
    let b = netns(&format!("{tag}b"))?;
    let (va, vb) =
        (format!("nv{}{}a", std::process::id() % 100_000, net), format!("nv{}{}b", std::process::id() % 100_000, net));
    let ok = Command::new("ip")
        .args(["link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        skip_or_fail("cannot create a veth pair between the namespaces");
        return None;
    }
    let (ia, ib) = (Ipv4Addr::new(10, net, 0, 1), Ipv4Addr::new(10, net, 0, 2));
    a.sh(&format!("ip link set lo up && ip addr add {ia}/24 dev {va} && ip link set {va} up"));
    b.sh(&format!("ip link set lo up && ip addr add {ib}/24 dev {vb} && ip link set {vb} up"));
    if !(a.firewall() && b.firewall()) {
        return None;
    }
    Some((a, b, ia, ib))
}

/// Opens `n` TCP connections to a server, all inside namespace `ns`, and
/// exchanges a byte each way on each (so they are ESTABLISHED and ASSURED).
fn tcp_sessions(ns: &Netns, server: SocketAddr, n: usize) -> (TcpListener, Vec<(TcpStream, TcpStream)>) {
    in_netns(&ns.path(), || {
        let l = TcpListener::bind(server).expect("listen");
        let mut v = Vec::new();
        for _ in 0..n {
            let mut c = TcpStream::connect(server).expect("connect");
            let (mut s, _) = l.accept().expect("accept");
            let mut b = [0u8; 1];
            c.write_all(b"q").expect("send");
            s.read_exact(&mut b).expect("recv");
            s.write_all(b"r").expect("reply");
            c.read_exact(&mut b).expect("recv reply");
            v.push((c, s));
        }
        (l, v)
    })
    .expect("enter namespace")
}

/// Starts `da`, waits for it to be Active, then `db`, until it stands by
/// synced.
fn active_and_standby(mut da: Daemon, mut db: Daemon) -> (Daemon, Daemon) {
    da.start();
    wait_for("member 1 Active", Duration::from_secs(10), &[&da], || (state(&da)?.as_str() == "active").then_some(()));
    db.start();
    wait_for("member 2 Standby and synced", Duration::from_secs(10), &[&da, &db], || {
        let v = db.req(&Request::State).ok()?;
        (v["state"] == "standby" && v["synced"] == true).then_some(())
    });
    (da, db)
}

/// Whether the failover hook of docs/conntrack.md
/// (`examples/conntrack/nicsync-active`, keepalived's check) says `d` is
/// nicsync's Active member.
fn hook_says_active(d: &Daemon) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/conntrack/nicsync-active");
    let bin = Path::new(env!("CARGO_BIN_EXE_nicsync")).parent().expect("bin dir").to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let status = Command::new("sh").arg(script).env("PATH", path).env("NICSYNC_SOCKET", &d.socket).status();
    status.expect("sh").success()
}

#[test]
fn kernel_table_is_mirrored_on_the_peer_and_committed_on_failover() {
    let Some((a, b, ia, ib)) = pair("fo", 79) else { return };
    let dir = tempdir("fo");
    let key = key_gen(&dir);
    let (ca, sa) = config(&dir, 1, ia, &[(2, ib)], &key, "");
    let (cb, sb) = config(&dir, 2, ib, &[(1, ia)], &key, "");
    let (mut da, db) = active_and_standby(daemon(&a, &dir, 1, ca, sa), daemon(&b, &dir, 2, cb, sb));
    assert!(hook_says_active(&da) && !hook_says_active(&db), "the failover hook follows nicsync's Active");

    // Real TCP sessions in A; B's card must list exactly what A's kernel
    // lists.
    const PORT: u16 = 5555;
    let (_listener, mut sessions) = tcp_sessions(&a, SocketAddr::from((ia, PORT)), 6);
    let want = kernel_keys(&a, PORT);
    assert_eq!(want.len(), 6, "A's kernel should track the 6 sessions: {want:?}");
    let t0 = Instant::now();
    wait_for("B's card to match A's kernel", Duration::from_secs(5), &[&da, &db], || {
        (with_port(&card_keys(&db)?, PORT) == want).then_some(())
    });
    eprintln!("B matched A's kernel ({} sessions) {:?} after the check began", want.len(), t0.elapsed());

    // Two sessions close: their entries expire in A's kernel (1 s closing
    // timeouts here), and go from B too.
    for (c, s) in sessions.drain(..2) {
        drop(c);
        drop(s);
    }
    let open: BTreeSet<String> =
        wait_for("A's kernel to drop the closed sessions", Duration::from_secs(20), &[&da], || {
            std::thread::sleep(Duration::from_millis(200));
            let k = kernel_keys(&a, PORT);
            (k.len() == 4).then_some(k)
        });
    wait_for("B to drop the closed sessions", Duration::from_secs(5), &[&da, &db], || {
        (with_port(&card_keys(&db)?, PORT) == open).then_some(())
    });
    let ct_a = conntrack_stats(&da);
    assert!(ct_a["events_destroy"].as_u64().unwrap_or(0) >= 2, "{ct_a}");
    assert!(ct_a["own_traffic"].as_u64().unwrap_or(0) > 0, "the cluster's own flows are seen and left out: {ct_a}");

    // B's kernel does not have them while it is Standby.
    assert!(kernel_keys(&b, PORT).is_empty(), "a Standby keeps synced entries out of its kernel");

    // A dies; B takes over and commits into its kernel.
    da.kill9();
    wait_for("member 2 Active", Duration::from_secs(10), &[&db], || (state(&db)?.as_str() == "active").then_some(()));
    let committed = wait_for("B's kernel to hold the sessions", Duration::from_secs(5), &[&db], || {
        let k = kernel_keys(&b, PORT);
        (k == open).then_some(k)
    });
    assert!(hook_says_active(&db), "the failover hook follows nicsync's Active");
    let ct_b = conntrack_stats(&db);
    assert_eq!(ct_b["last_commit_entries"].as_u64(), Some(committed.len() as u64), "{ct_b}");
    assert_eq!(ct_b["last_commit_failed"].as_u64(), Some(0), "{ct_b}");
    eprintln!("B committed {} entries in {} ms after becoming Active", committed.len(), ct_b["last_commit_ms"]);
    // The sessions' state came across: ESTABLISHED in B's kernel.
    let o = b.exec(&["sh", "-c", &format!("conntrack -L -p tcp --dport {PORT} 2>/dev/null || true")]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.is_empty() || text.lines().all(|l| l.contains("ESTABLISHED")), "{text}");
    drop(sessions);
}

/// A planned switch-over (SIGTERM of the Active) with a sync delay longer
/// than the sessions have lived: the Active has held them back, so B has
/// none of them. Stopping, A syncs what the delay holds, waits for B to
/// acknowledge it, announces itself Down and exits; B takes over and
/// commits the sessions into its kernel. Killed instead, A would take them
/// with it.
#[test]
fn an_orderly_stop_hands_over_the_sessions_the_delay_held() {
    let Some((a, b, ia, ib)) = pair("os", 81) else { return };
    let dir = tempdir("os");
    let key = key_gen(&dir);
    let delay = "[conntrack]\ndelay_ms = 600000\n";
    let (ca, sa) = config(&dir, 1, ia, &[(2, ib)], &key, delay);
    let (cb, sb) = config(&dir, 2, ib, &[(1, ia)], &key, delay);
    let (mut da, db) = active_and_standby(daemon(&a, &dir, 1, ca, sa), daemon(&b, &dir, 2, cb, sb));
    const PORT: u16 = 5556;
    let (_listener, sessions) = tcp_sessions(&a, SocketAddr::from((ia, PORT)), 5);
    let want = kernel_keys(&a, PORT);
    assert_eq!(want.len(), 5, "A's kernel should track the 5 sessions: {want:?}");
    // A has read them and holds them back (the delay): B has none.
    wait_for("A to hold the 5 sessions back", Duration::from_secs(5), &[&da], || {
        (conntrack_stats(&da)["delayed_pending"].as_u64()? >= 5).then_some(())
    });
    assert!(with_port(&card_keys(&db).unwrap_or_default(), PORT).is_empty(), "synced within the delay");

    let logs_before = da.logs().len();
    let status = da.terminate(Duration::from_secs(10)).expect("A exits within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}\n{}", da.logs());
    let stopped = da.logs()[logs_before..].to_string();
    assert!(stopped.contains(" 0 changes unacknowledged"), "B acknowledged what A released:\n{stopped}");
    wait_for("member 2 Active", Duration::from_secs(10), &[&db], || (state(&db)?.as_str() == "active").then_some(()));
    wait_for("B's kernel to hold the sessions", Duration::from_secs(5), &[&db], || {
        (kernel_keys(&b, PORT) == want).then_some(())
    });
    drop(sessions);
}

/// `n` kernel entries of protocol `l4` (ESTABLISHED for TCP), assured and
/// confirmed, from 10.`net`.x.y to 192.0.2.80:443, for one hour.
fn assured_entries(net: u8, n: u32, l4: u8) -> Vec<nicsync_conntrack::CtEntry> {
    let tcp = if l4 == proto::TCP { TcpState::Established } else { TcpState::None };
    let flags = ConnFlags::ASSURED | ConnFlags::CONFIRMED | ConnFlags::SEEN_REPLY;
    (0..n)
        .map(|i| {
            let (a, b) = ((i >> 8) as u8, i as u8);
            let key = ConnKey::v4(
                Ipv4Addr::new(10, net, a, b),
                20_000 + (i % 40_000) as u16,
                Ipv4Addr::new(192, 0, 2, 80),
                443,
                l4,
                0,
            );
            to_ct(&key, &ConnState::new(tcp, Direction::Original, flags, 3600, 0), &Nat::default()).expect("to_ct")
        })
        .collect()
}

/// A lone member in its own namespace (`tag`) with a firewall, its event
/// socket's buffer `event_buffer_bytes`, Active and past its activation
/// dump: the namespace, the scratch directory and the daemon (`None`: no
/// namespaces here, a skip).
fn lone_member(tag: &str, event_buffer_bytes: usize) -> Option<(Netns, ScratchDir, Daemon)> {
    let a = netns(tag)?;
    if !a.firewall() {
        return None;
    }
    a.sh("ip link set lo up");
    let dir = tempdir(tag);
    let key = key_gen(&dir);
    let extra = format!("[conntrack]\nevent_buffer_bytes = {event_buffer_bytes}\n");
    let (ca, sa) = config(&dir, 1, Ipv4Addr::LOCALHOST, &[], &key, &extra);
    let mut da = daemon(&a, &dir, 1, ca, sa);
    da.start();
    wait_for("member 1 Active", Duration::from_secs(10), &[&da], || (state(&da)?.as_str() == "active").then_some(()));
    wait_for("the activation dump", Duration::from_secs(10), &[&da], || {
        (conntrack_stats(&da)["dumps_completed"].as_u64()? >= 1).then_some(())
    });
    Some((a, dir, da))
}

#[test]
fn event_socket_overrun_is_recovered_by_a_dump_with_nothing_lost() {
    // The smallest event buffer: a burst overruns it.
    let Some((a, _dir, da)) = lone_member("ov", 4096) else { return };

    // 40,000 entries created as fast as the kernel takes them.
    const N: u32 = 40_000;
    let entries = assured_entries(200, N, proto::TCP);
    let created =
        in_netns(&a.path(), || CtSocket::open().and_then(|mut s| s.create_batch(&entries, CreateMode::Exclusive)))
            .expect("netns")
            .expect("create");
    assert!(created.failed.is_empty(), "{:?}", &created.failed[..created.failed.len().min(5)]);
    let want: BTreeSet<String> = entries.iter().map(|e| from_ct(e).expect("maps").key.to_string()).collect();
    let t0 = Instant::now();
    wait_for("the card to hold every entry", Duration::from_secs(30), &[&da], || {
        (card_keys(&da)? == want).then_some(())
    });
    let ct = conntrack_stats(&da);
    eprintln!("after {N} creations: card identical {:?} later; {ct}", t0.elapsed());
    assert!(ct["overruns"].as_u64().unwrap_or(0) >= 1, "the burst was meant to overrun the event socket: {ct}");
    assert!(ct["dumps_completed"].as_u64().unwrap_or(0) >= 2, "{ct}");

    // Half of them destroyed at once: the DESTROY events overrun too, and
    // the dump's sweep removes what the lost events would have.
    let doomed: Vec<_> = entries.iter().step_by(2).cloned().collect();
    in_netns(&a.path(), || {
        let mut s = CtSocket::open().expect("socket");
        for e in &doomed {
            s.delete(e).expect("delete");
        }
    })
    .expect("netns");
    let left: BTreeSet<String> =
        entries.iter().skip(1).step_by(2).map(|e| from_ct(e).expect("maps").key.to_string()).collect();
    wait_for("the card to lose the destroyed entries", Duration::from_secs(30), &[&da], || {
        (card_keys(&da)? == left).then_some(())
    });
    let ct = conntrack_stats(&da);
    eprintln!("after {} deletions: {ct}", doomed.len());
    assert_eq!(ct["table_errors"].as_u64(), Some(0), "{ct}");
}

/// The kernel reports an overrun ahead of the events still queued (older
/// than the loss) and drops new events silently until its queue is empty.
/// A daemon paused while 10,000 entries are created and half of them
/// deleted overruns a 1 MiB buffer; resumed, it reads that backlog, and
/// only then dumps. Its dump used to start after the first 1,024 events:
/// the backlog read during it brought back about 300 of the deleted
/// entries, for good (synced, and never aged by the card).
#[test]
fn the_backlog_read_after_an_overrun_brings_back_nothing_deleted() {
    let Some((a, _dir, da)) = lone_member("ob", 1 << 20) else { return };
    const N: u32 = 10_000;
    let entries = assured_entries(201, N, proto::UDP);
    let pid = da.pid().expect("running");
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    in_netns(&a.path(), || {
        let mut s = CtSocket::open().expect("socket");
        let created = s.create_batch(&entries, CreateMode::Exclusive).expect("create");
        assert!(created.failed.is_empty(), "{:?}", &created.failed[..created.failed.len().min(5)]);
        for e in entries.iter().step_by(2) {
            s.delete(e).expect("delete");
        }
    })
    .expect("netns");
    signal("-CONT");
    let left: BTreeSet<String> =
        entries.iter().skip(1).step_by(2).map(|e| from_ct(e).expect("maps").key.to_string()).collect();
    wait_for("the card to hold exactly the entries left", Duration::from_secs(30), &[&da], || {
        (card_keys(&da)? == left).then_some(())
    });
    let ct = conntrack_stats(&da);
    eprintln!("after the backlog: {ct}");
    assert!(ct["overruns"].as_u64().unwrap_or(0) >= 1, "the pause was meant to overrun the event socket: {ct}");
    assert_eq!(ct["table_errors"].as_u64(), Some(0), "{ct}");
}

/// A scratch directory, removed with what it holds when dropped.
struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Kept when the test fails, for the daemons' logs in it.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn tempdir(tag: &str) -> ScratchDir {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "nicsync-ct-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    ScratchDir(d)
}
