//! `nicsync daemon` processes for the integration tests: started (in a
//! network namespace if given), asked over their control sockets, killed
//! with SIGKILL, their logs shown when a wait times out.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nicsync::control::{call, Request};
use serde_json::Value;

/// One daemon process.
pub struct Daemon {
    /// Its member id.
    pub id: u16,
    /// The network namespace it runs in (`ip netns exec`), if any.
    pub netns: Option<String>,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
    /// Its log (stderr), appended to across restarts.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon not started yet.
    pub fn new(id: u16, netns: Option<String>, config: PathBuf, socket: PathBuf, log: PathBuf) -> Daemon {
        Daemon { id, netns, config, socket, log, child: None }
    }

    /// Starts it (again).
    pub fn start(&mut self) {
        // Appended: a restarted member's log keeps its first life's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the daemon: the child is the daemon.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(env!("CARGO_BIN_EXE_nicsync"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_nicsync")),
        };
        let child = cmd
            .args(["daemon", "--config"])
            .arg(&self.config)
            .env("NICSYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nicsync daemon");
        self.child = Some(child);
    }

    /// Kills it with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            let _ = c.wait();
        }
    }

    /// Sends it SIGTERM (an orderly stop) and waits up to `limit` for it
    /// to exit; its exit status, or `None` if it did not exit in time (it
    /// is then killed).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // (Gone already: its status.)
        if let Some(status) = c.try_wait().expect("wait") {
            return Some(status);
        }
        let sent = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("kill -TERM");
        assert!(sent.success(), "kill -TERM {}", c.id());
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(status) = c.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// One control request.
    pub fn req(&self, r: &Request) -> Result<Value, String> {
        call(&self.socket, r, Duration::from_secs(10)).map_err(|e| e.to_string())
    }

    /// What it logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` every 20 ms until it gives a value; after `timeout`, fails
/// the test with `daemons`' logs.
pub fn wait_for<T>(what: &str, timeout: Duration, daemons: &[&Daemon], mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t.elapsed() > timeout {
            let logs: Vec<String> = daemons.iter().map(|d| format!("--- member {}:\n{}", d.id, d.logs())).collect();
            panic!("timed out after {timeout:?} waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
