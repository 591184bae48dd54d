//! Three `nicsync daemon` processes on loopback: real UDP for Delta Sync
//! and membership, real TCP for Full Sync, the control socket for churn
//! and digests. One member is killed with SIGKILL in the middle of the
//! churn and restarted; it pulls a Full Sync and every member ends with the
//! same digest.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nicsync::control::{call, Request};
use serde_json::Value;

struct Member {
    id: u16,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn start(&mut self) {
        let log = std::fs::File::create(&self.log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_nicsync"))
            .args(["daemon", "--config"])
            .arg(&self.config)
            .env("NICSYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nicsync daemon");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            let _ = c.wait();
        }
    }

    fn req(&self, r: &Request) -> Result<Value, String> {
        call(&self.socket, r, Duration::from_secs(5)).map_err(|e| e.to_string())
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_udp() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

fn free_tcp() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

fn wait_for<T>(what: &str, timeout: Duration, members: &[Member], mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t.elapsed() > timeout {
            let logs: Vec<String> = members.iter().map(|m| format!("--- member {}:\n{}", m.id, m.logs())).collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_configs(dir: &Path, n: u16) -> Vec<Member> {
    let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (free_udp(), free_udp(), free_tcp())).collect();
    (1..=n)
        .map(|id| {
            let (s, m, f) = ports[id as usize - 1];
            let socket = dir.join(format!("m{id}.sock"));
            let mut text = format!(
                "member_id = {id}\ncluster_id = 7\nmode = \"ha\"\n\
                 [device]\ntable_capacity = 65536\naging_period_ms = 0\n\
                 [sync]\nbind = \"127.0.0.1:{s}\"\n\
                 [membership]\nbind = \"127.0.0.1:{m}\"\n\
                 [full_sync]\nbind = \"127.0.0.1:{f}\"\n\
                 [control]\nsocket = \"{}\"\n",
                socket.display()
            );
            for p in (1..=n).filter(|p| *p != id) {
                let (ps, pm, pf) = ports[p as usize - 1];
                text.push_str(&format!(
                    "[[peer]]\nid = {p}\nsync = \"127.0.0.1:{ps}\"\nmembership = \"127.0.0.1:{pm}\"\nfull_sync = [\"127.0.0.1:{pf}\"]\n"
                ));
            }
            let config = dir.join(format!("m{id}.toml"));
            std::fs::write(&config, text).unwrap();
            Member { id, config, socket, log: dir.join(format!("m{id}.log")), child: None }
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
            tcp_state: if i % 3 == 0 { "syn_sent".into() } else { "established".into() },
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
    let st = members[v].req(&Request::Syncstat).expect("syncstat");
    assert_eq!(st["full_syncs_failed"].as_u64(), Some(0), "{st}");
    let state = members[v].req(&Request::State).expect("state");
    assert_eq!(state["state"].as_str(), Some("standby"), "{state}");
    // The control socket is the daemon's own, mode 0600.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&members[a].socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let _ = std::fs::remove_dir_all(&dir);
}
