//! `nicsync bench conntrack`: nicsync beside netfilter's conntrackd, on the
//! same machine and the same workload (docs/conntrack.md, "Comparison with
//! conntrackd").
//!
//! Two network namespaces, A and B, joined by a veth pair, each with an
//! nftables table whose `ct state` rule keeps conntrack active. For each
//! system in turn (conntrackd first, then nicsync) a member runs in each
//! namespace, and the bench:
//!
//! 1. **live replication**: injects N ESTABLISHED TCP entries (status
//!    ASSURED|CONFIRMED|SEEN_REPLY, distinct tuples, a one-day timeout) into
//!    A's kernel table through ctnetlink in batches, and measures the rate
//!    until B holds all N and how long after the end of the injection B
//!    still lagged;
//! 2. **single new connection**: K times, one entry is created in A's
//!    kernel and the time until B holds it is measured;
//! 3. **full resync**: with the members stopped, A's kernel is loaded with
//!    M entries; the members start, B's copy is emptied and a full resync
//!    from A is requested; timed until B holds all M, verified entry by
//!    entry (conntrackd) or by digest (nicsync); then again with P % of the
//!    sync link's packets dropped by an nftables `numgen` rule (this kernel
//!    has no netem).
//!
//! How "B holds it" is observed:
//!
//! * conntrackd: B's external cache, read through B's UNIX control socket
//!   with conntrackd's own request protocol (connect, one native-endian
//!   `int` request code, read the text answer until EOF): `STATS` (21,
//!   `conntrackd -s`) for the external cache's "current active connections",
//!   `DUMP_EXTERNAL` (17, `-e`) to verify the entry set, `FLUSH_EXT_CACHE`
//!   (34, `-f external`) and `REQUEST_DUMP` (23, `-n`). conntrackd has no
//!   event interface for its caches, so presence is polled; each poll is one
//!   round trip, and a single connection's arrival is bracketed between the
//!   send of the last poll that missed it and the answer of the first poll
//!   that saw it; the midpoint is reported, with both bounds.
//! * nicsync: B's `syncstat` (`synced_entries`, `table_digest`,
//!   `full_syncs_completed`, `last_full_sync_ms`) on its control socket,
//!   polled the same way as conntrackd for the live and resync parts (`conn
//!   digest` walks only to verify); a single connection is timed by `conn
//!   wait` (B's daemon stamps the moment it learns from its card that the
//!   key arrived, with CLOCK_MONOTONIC, which every namespace of the machine
//!   shares), and also by the same polling as conntrackd, for an
//!   apples-to-apples check.
//!
//! Everything the bench creates (namespaces, the veth pair with them,
//! daemons, the temporary directory) is removed and the sysctls it raised
//! are restored on every exit path: normal end, error, and SIGINT, SIGTERM
//! or SIGHUP. Daemons run under `setpriv --pdeathsig KILL` where available,
//! so that even a killed bench leaves none behind.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nicsync_conntrack::{in_netns, monotonic_ns, to_ct, CreateMode, CtEntry, CtSocket};
use nicsync_fwif::conn::{proto, ConnFlags, ConnKey, ConnState, Direction, Nat, TcpState};
use serde::Serialize;
use serde_json::Value;

use crate::control::Request;

use crate::stats::percentile;

/// Command-line options of `nicsync bench conntrack`.
#[derive(clap::Args, Clone, Debug)]
pub struct CtBenchArgs {
    /// Entries injected into A's kernel for the live replication.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    pub entries: u32,
    /// Entries in the full resync.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..=4_000_000))]
    pub resync_entries: u32,
    /// Single new connections timed, one after the other (median and p90).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub singles: u32,
    /// Percent of the sync link's packets dropped in the second resync (0
    /// skips it).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub loss_percent: u8,
    /// A resync (or live replication) whose peer's count has not changed
    /// for this many seconds is reported incomplete, with the fraction it
    /// reached.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub stall_seconds: u64,
    /// Period of the polls of the peer while it catches up (live
    /// replication, resync), microseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=100_000))]
    pub poll_us: u64,
    /// The nice value both systems' daemons run at (nicsync's `nice`;
    /// conntrackd, whose `Nice` 1.4.7 ignores, under nice(1)), checked in
    /// /proc once they answer: -20 is what conntrackd's example
    /// configuration sets, so that its daemon is not starved by the traffic
    /// it replicates; 0 is the default priority (the injector's, for a
    /// bench started at 0).
    #[arg(long, default_value_t = -20, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub daemon_nice: i32,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Leave conntrackd out.
    #[arg(long)]
    pub skip_conntrackd: bool,
    /// Leave nicsync out.
    #[arg(long)]
    pub skip_nicsync: bool,
    /// The conntrackd binary.
    #[arg(long, default_value = "conntrackd")]
    pub conntrackd: PathBuf,
    /// Keep the temporary directory (configurations and daemon logs) and
    /// say where it is.
    #[arg(long)]
    pub keep_logs: bool,
}

/// Addresses of the veth pair (a /30 of its own; each namespace is private,
/// so concurrent runs do not collide).
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
/// conntrackd's sync port (UDP, both directions).
const CTD_PORT: u16 = 3780;
/// nicsync's ports (docs/config.md).
const NS_SYNC_PORT: u16 = 8116;
const NS_MEMBERSHIP_PORT: u16 = 8117;
const NS_FULL_SYNC_PORT: u16 = 8118;
/// Destinations of the three workloads, so that their tuples never meet.
const LIVE_DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SINGLE_DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const RESYNC_DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// Timeout of the injected entries: longer than any run.
const ENTRY_TIMEOUT_S: u32 = 86_400;
/// Probes a peer may miss before the member takes it for dead (probes
/// every 10 ms): see the configuration `ns_config` writes.
const DEAD_AFTER: u32 = 20;
/// nf_conntrack_max the bench needs at least (global since Linux 4.x).
const CONNTRACK_MAX: u64 = 4_194_304;
/// Idle time between two single connections.
const SINGLE_GAP: Duration = Duration::from_millis(20);
/// How long after the end of the live injection the injecting thread polls
/// the peer back to back (then only the periodic poller goes on): long
/// enough to bracket the usual sub-millisecond lags within one poll round
/// trip, short enough that a peer far behind is not kept busy answering.
const END_POLL_WINDOW: Duration = Duration::from_millis(5);
/// Longest wait for one single connection.
const SINGLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a daemon to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for members to settle (a table loaded, a peer caught up).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

// conntrackd's UNIX-socket request codes (include/conntrackd.h, 1.4.x;
// checked against `strace conntrackd -s|-e|-f external|-n`).
const CTD_DUMP_EXTERNAL: i32 = 17;
const CTD_STATS: i32 = 21;
const CTD_REQUEST_DUMP: i32 = 23;
const CTD_FLUSH_EXT_CACHE: i32 = 34;

/// The results (`--json`). Figures of a system that was skipped or failed
/// are null; `*_error` says why it failed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CtBenchReport {
    /// Entries injected for the live replication (N).
    pub entries: u32,
    /// Entries in the full resync (M).
    pub resync_entries: u32,
    /// Single connections timed (K).
    pub singles: u32,
    /// Loss on the sync link in the second resync, percent.
    pub loss_percent: u8,
    /// The nice value both systems' daemons ran at (`--daemon-nice`).
    pub daemon_nice: i32,
    /// Live replication: N / (first entry injected → peer holds all N).
    pub nicsync_entries_per_s: Option<f64>,
    /// As above, conntrackd.
    pub conntrackd_entries_per_s: Option<f64>,
    /// Live replication: end of the injection → peer holds all N (0 when
    /// it already did).
    pub nicsync_lag_at_end_ms: Option<f64>,
    /// As above, conntrackd.
    pub conntrackd_lag_at_end_ms: Option<f64>,
    /// Entries the peer still lacked when the injection ended.
    pub nicsync_lag_entries_at_end: Option<u64>,
    /// As above, conntrackd.
    pub conntrackd_lag_entries_at_end: Option<u64>,
    /// The rate at which A's kernel accepted the N entries while nicsync
    /// listened.
    pub nicsync_kernel_entries_per_s: Option<f64>,
    /// As above, with conntrackd listening.
    pub conntrackd_kernel_entries_per_s: Option<f64>,
    /// The rate at which A's kernel accepted the M resync entries with no
    /// daemon listening (the kernel's own pace), in the nicsync run.
    pub nicsync_run_kernel_alone_entries_per_s: Option<f64>,
    /// As above, in the conntrackd run.
    pub conntrackd_run_kernel_alone_entries_per_s: Option<f64>,
    /// Single new connection, created in A's kernel → on B's card (`conn
    /// wait`, both ends on CLOCK_MONOTONIC): median, µs.
    pub nicsync_single_latency_us: Option<f64>,
    /// 90th percentile of the same.
    pub nicsync_single_latency_p90_us: Option<f64>,
    /// The same connection timed like conntrackd's (polling B's `syncstat`):
    /// median of the bracket midpoints, µs.
    pub nicsync_single_latency_polled_us: Option<f64>,
    /// Single new connection, created in A's kernel → in B's external
    /// cache: median of the bracket midpoints, µs.
    pub conntrackd_single_latency_us: Option<f64>,
    /// 90th percentile of the same.
    pub conntrackd_single_latency_p90_us: Option<f64>,
    /// Medians of the brackets' lower and upper bounds, µs.
    pub conntrackd_single_latency_bounds_us: Option<[f64; 2]>,
    /// Median round trip of one poll of B's control socket, µs (the
    /// brackets' width is about two of these).
    pub conntrackd_poll_rtt_us: Option<f64>,
    /// Median round trip of one `syncstat` poll of nicsync's B, µs.
    pub nicsync_poll_rtt_us: Option<f64>,
    /// Median duration of the single connections' create requests in A's
    /// kernel (ctnetlink send to acknowledgement), in the conntrackd run,
    /// µs: part of every single-connection figure, since each is timed
    /// from before its request.
    pub conntrackd_single_create_us: Option<f64>,
    /// As above, in the nicsync run (`conn wait` and polled singles).
    pub nicsync_single_create_us: Option<f64>,
    /// Single connections never seen at the peer within 5 s.
    pub nicsync_singles_missed: Option<u32>,
    /// As above, conntrackd.
    pub conntrackd_singles_missed: Option<u32>,
    /// Full resync of M entries without loss: request → peer holds all M
    /// (wall clock, ms). Named for the default M of one million.
    pub nicsync_resync_1m_ms: Option<f64>,
    /// As above, conntrackd.
    pub conntrackd_resync_1m_ms: Option<f64>,
    /// nicsync's own timing of that Full Sync (`last_full_sync_ms`).
    pub nicsync_resync_daemon_ms: Option<f64>,
    /// The first resync into a peer that never held the entries (its
    /// memory not yet grown for them), untimed in `resync_speedup`, where
    /// both peers are warm: conntrackd, B's first `-n` (request → B holds
    /// all M, as the timed one).
    pub conntrackd_resync_cold_ms: Option<f64>,
    /// nicsync's first, cold Full Sync: B's pull when it joins, the
    /// daemon's own timing (`last_full_sync_ms`).
    pub nicsync_resync_cold_daemon_ms: Option<f64>,
    /// The lossless resync ended with exactly the M entries at the peer
    /// (conntrackd: entry by entry from its external cache; nicsync: equal
    /// digests and counts, and sampled keys present).
    pub nicsync_resync_verified: Option<bool>,
    /// As above, conntrackd.
    pub conntrackd_resync_verified: Option<bool>,
    /// The resync under loss ended with every entry at the peer, verified.
    pub nicsync_resync_complete_under_loss: Option<bool>,
    /// As above, conntrackd.
    pub conntrackd_resync_complete_under_loss: Option<bool>,
    /// Duration of the resync under loss (to completion, or to the stall).
    pub nicsync_resync_loss_ms: Option<f64>,
    /// As above, conntrackd.
    pub conntrackd_resync_loss_ms: Option<f64>,
    /// Fraction of the M entries the peer held at the end of the resync
    /// under loss.
    pub nicsync_resync_loss_fraction: Option<f64>,
    /// As above, conntrackd.
    pub conntrackd_resync_loss_fraction: Option<f64>,
    /// `nicsync_entries_per_s / conntrackd_entries_per_s`.
    pub entries_per_s_ratio: Option<f64>,
    /// `conntrackd_single_latency_us / nicsync_single_latency_us` (`conn
    /// wait` against conntrackd's polled brackets: two methods).
    pub single_latency_speedup: Option<f64>,
    /// `conntrackd_single_latency_us / nicsync_single_latency_polled_us`:
    /// both timed by one method (polling the peer's control socket), the
    /// like-for-like comparison.
    pub single_latency_speedup_polled: Option<f64>,
    /// `conntrackd_resync_1m_ms / nicsync_resync_1m_ms`.
    pub resync_speedup: Option<f64>,
    /// Why the nicsync run failed, if it did.
    pub nicsync_error: Option<String>,
    /// Why the conntrackd run failed, if it did.
    pub conntrackd_error: Option<String>,
    /// `conntrackd -v`.
    pub conntrackd_version: Option<String>,
    /// This build of nicsync.
    pub nicsync_version: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPUs available.
    pub cpus: usize,
    /// One-minute load average when the run started and when it ended
    /// (other work on the machine disturbs every figure).
    pub load_average: [f64; 2],
    /// What else the run observed (retries, missing entries, …).
    pub notes: Vec<String>,
}

/// Runs the bench and prints its report; fails if a system's run failed.
pub fn main(args: &CtBenchArgs) -> Result<()> {
    let r = run(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", render(&r));
    }
    let failed: Vec<String> = [("conntrackd", &r.conntrackd_error), ("nicsync", &r.nicsync_error)]
        .iter()
        .filter_map(|(n, e)| e.as_ref().map(|e| format!("{n}: {e}")))
        .collect();
    if !failed.is_empty() {
        bail!("bench conntrack: {}", failed.join("; "));
    }
    Ok(())
}

/// Runs the comparison and returns its report.
pub fn run(args: &CtBenchArgs) -> Result<CtBenchReport> {
    if args.skip_conntrackd && args.skip_nicsync {
        bail!("--skip-conntrackd and --skip-nicsync together leave nothing to measure");
    }
    preflight(args)?;
    let mut rep = CtBenchReport {
        entries: args.entries,
        resync_entries: args.resync_entries,
        singles: args.singles,
        loss_percent: args.loss_percent,
        daemon_nice: args.daemon_nice,
        nicsync_version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ..Default::default()
    };
    if !args.skip_conntrackd {
        rep.conntrackd_version = Some(conntrackd_version(&args.conntrackd)?);
    }
    rep.load_average[0] = load_average();
    if rep.load_average[0] > 1.0 {
        rep.notes.push(format!(
            "the machine was busy when the run started (load average {:.2} on {} CPUs): figures may be disturbed",
            rep.load_average[0], rep.cpus
        ));
    }
    let work = Workload::new(args)?;
    let mut env = Env::setup(args)?;
    rep.notes.append(&mut env.notes);
    if !args.skip_conntrackd {
        let mut notes = Vec::new();
        let r = run_conntrackd(&mut env, &work, args, &mut rep, &mut notes);
        rep.notes.extend(notes.into_iter().map(|n| format!("conntrackd: {n}")));
        if let Err(e) = r {
            rep.conntrackd_error = Some(format!("{e:#}{}", env.logs_hint()));
        }
        env.stop_daemons();
    }
    if !args.skip_nicsync {
        let mut notes = Vec::new();
        let r = run_nicsync(&mut env, &work, args, &mut rep, &mut notes);
        rep.notes.extend(notes.into_iter().map(|n| format!("nicsync: {n}")));
        if let Err(e) = r {
            rep.nicsync_error = Some(format!("{e:#}{}", env.logs_hint()));
        }
        env.stop_daemons();
    }
    rep.entries_per_s_ratio = ratio(rep.nicsync_entries_per_s, rep.conntrackd_entries_per_s);
    rep.single_latency_speedup = ratio(rep.conntrackd_single_latency_us, rep.nicsync_single_latency_us);
    rep.single_latency_speedup_polled = ratio(rep.conntrackd_single_latency_us, rep.nicsync_single_latency_polled_us);
    rep.resync_speedup = ratio(rep.conntrackd_resync_1m_ms, rep.nicsync_resync_1m_ms);
    if args.keep_logs {
        rep.notes.push(format!("configurations and daemon logs kept in {}", env.dir.display()));
    }
    rep.load_average[1] = load_average();
    let warnings = env.teardown();
    rep.notes.extend(warnings.into_iter().map(|w| format!("cleanup: {w}")));
    Ok(rep)
}

/// The one-minute load average (0 if unknown).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse().ok()))
        .unwrap_or(0.0)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Preconditions

fn preflight(args: &CtBenchArgs) -> Result<()> {
    // /proc/self belongs to the process's effective uid.
    let euid =
        std::fs::metadata("/proc/self").map(|m| m.uid()).context("cannot read /proc/self (is /proc mounted?)")?;
    if euid != 0 {
        bail!(
            "bench conntrack needs root (effective uid {euid}): it creates network namespaces and a veth pair, loads \
             nftables rules, raises net.netfilter.nf_conntrack_max and runs the daemons; run it as root \
             (bench/compare-conntrackd.sh does)"
        );
    }
    let mut missing = Vec::new();
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        if which(Path::new(tool)).is_none() {
            missing.push(format!("{tool} ({pkg})"));
        }
    }
    if !args.skip_conntrackd && which(&args.conntrackd).is_none() {
        missing.push(format!("{} (conntrackd)", args.conntrackd.display()));
    }
    if !missing.is_empty() {
        bail!(
            "missing {}: install them (Debian: apt-get install -y conntrackd conntrack nftables iproute2), or run \
             bench/compare-conntrackd.sh, which does",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The path of an executable, searched in PATH when it has no slash.
fn which(tool: &Path) -> Option<PathBuf> {
    let runnable = |p: &Path| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if tool.components().count() > 1 {
        return runnable(tool).unwrap_or(false).then(|| tool.to_path_buf());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| runnable(p).unwrap_or(false))
}

fn conntrackd_version(bin: &Path) -> Result<String> {
    let out = Command::new(bin).arg("-v").output().with_context(|| format!("cannot run {} -v", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // "Connection tracking userspace daemon v1.4.7. Licensed under GPLv2."
    Ok(text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v').filter(|v| v.starts_with(|c: char| c.is_ascii_digit())))
        .map(|v| v.trim_end_matches('.').to_owned())
        .unwrap_or_else(|| text.lines().next().unwrap_or("?").trim().to_owned()))
}

// ---------------------------------------------------------------------------
// The workload

/// The three sets of entries, as conntrack entries and nicsync keys.
struct Workload {
    live: Vec<CtEntry>,
    singles: Vec<(ConnKey, CtEntry)>,
    resync: Vec<CtEntry>,
    live_tuples: HashSet<Tuple4>,
    resync_tuples: HashSet<Tuple4>,
    resync_keys_sample: Vec<ConnKey>,
}

/// (source, source port, destination, destination port) of a TCP entry.
type Tuple4 = (Ipv4Addr, u16, Ipv4Addr, u16);

fn key(i: u32, dst: Ipv4Addr) -> ConnKey {
    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i / 60_000);
    ConnKey::v4(src, 1024 + (i % 60_000) as u16, dst, 443, proto::TCP, 0)
}

fn tuple4(i: u32, dst: Ipv4Addr) -> Tuple4 {
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i / 60_000), 1024 + (i % 60_000) as u16, dst, 443)
}

fn ct_entry(k: &ConnKey) -> Result<CtEntry> {
    let st = ConnState::new(TcpState::Established, Direction::Original, ConnFlags::ASSURED, ENTRY_TIMEOUT_S, 0);
    to_ct(k, &st, &Nat::default()).map_err(|e| anyhow!("cannot build the conntrack entry for {k}: {e}"))
}

impl Workload {
    fn new(args: &CtBenchArgs) -> Result<Workload> {
        let live = (0..args.entries).map(|i| ct_entry(&key(i, LIVE_DST))).collect::<Result<Vec<_>>>()?;
        let singles = (0..args.singles)
            .map(|i| {
                let k = key(i, SINGLE_DST);
                Ok((k, ct_entry(&k)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let resync = (0..args.resync_entries).map(|i| ct_entry(&key(i, RESYNC_DST))).collect::<Result<Vec<_>>>()?;
        let step = (args.resync_entries / 256).max(1);
        Ok(Workload {
            live,
            singles,
            resync,
            live_tuples: (0..args.entries).map(|i| tuple4(i, LIVE_DST)).collect(),
            resync_tuples: (0..args.resync_entries).map(|i| tuple4(i, RESYNC_DST)).collect(),
            resync_keys_sample: (0..args.resync_entries).step_by(step as usize).map(|i| key(i, RESYNC_DST)).collect(),
        })
    }
}

/// Creates `entries` in a kernel table, in batches; the time it took.
fn inject(ct: &mut CtSocket, entries: &[CtEntry]) -> Result<Duration> {
    let t0 = Instant::now();
    let out = ct.create_batch(entries, CreateMode::Exclusive).context("ctnetlink bulk create in A")?;
    let dt = t0.elapsed();
    if let Some(&(i, errno)) = out.failed.first() {
        bail!(
            "A's kernel refused {} of {} entries (first: #{i}, {}); is nf_conntrack_max large enough?",
            out.failed.len(),
            entries.len(),
            std::io::Error::from_raw_os_error(errno)
        );
    }
    Ok(dt)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------
// The environment and its cleanup

/// What must be undone, shared with the signal thread.
#[derive(Debug, Default)]
struct Registry {
    children: Vec<(String, Child)>,
    netns: Vec<String>,
    sysctls: Vec<(PathBuf, String)>,
    dir: Option<PathBuf>,
    keep_dir: bool,
}

fn lock(reg: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    reg.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills the daemons (by their pids), then deletes the namespaces (which
/// takes the veth pair with them), restores the sysctls and removes the
/// temporary directory. Idempotent. Returns what could not be undone.
fn cleanup(reg: &Mutex<Registry>) -> Vec<String> {
    let mut r = lock(reg);
    let mut warnings = kill_children(&mut r.children);
    for ns in std::mem::take(&mut r.netns) {
        match Command::new("ip").args(["netns", "del", &ns]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => warnings.push(format!("ip netns del {ns}: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => warnings.push(format!("ip netns del {ns}: {e}")),
        }
    }
    for (path, value) in std::mem::take(&mut r.sysctls).into_iter().rev() {
        if let Err(e) = std::fs::write(&path, &value) {
            warnings.push(format!("cannot restore {} to {value}: {e}", path.display()));
        }
    }
    if let Some(dir) = r.dir.take() {
        if !r.keep_dir {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warnings.push(format!("cannot remove {}: {e}", dir.display()));
            }
        }
    }
    warnings
}

fn kill_children(children: &mut Vec<(String, Child)>) -> Vec<String> {
    let mut warnings = Vec::new();
    for (name, mut child) in children.drain(..) {
        if let Ok(None) = child.try_wait() {
            if let Err(e) = child.kill() {
                warnings.push(format!("cannot kill {name} (pid {}): {e}", child.id()));
            }
        }
        let _ = child.wait();
    }
    warnings
}

/// Cleans up and exits on SIGINT, SIGTERM or SIGHUP.
fn install_signal_cleanup(reg: Arc<Mutex<Registry>>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("signal runtime")?;
    let (mut int, mut term, mut hup) = {
        let _g = rt.enter();
        (
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::hangup()).context("SIGHUP handler")?,
        )
    };
    std::thread::Builder::new()
        .name("ctbench-signals".into())
        .spawn(move || {
            let name = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    _ = hup.recv() => "SIGHUP",
                }
            });
            let warnings = cleanup(&reg);
            eprintln!("nicsync bench conntrack: {name}: stopped the daemons, removed the namespaces, restored sysctls");
            for w in warnings {
                eprintln!("  cleanup: {w}");
            }
            std::process::exit(130);
        })
        .context("signal thread")?;
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}").replace('"', "");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace of the bench.
#[derive(Debug)]
struct Ns {
    name: String,
    veth: String,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
    ct: CtSocket,
}

impl Ns {
    /// UDP datagrams this namespace dropped because a socket's receive
    /// buffer was full (`Udp: RcvbufErrors` of /proc/net/snmp).
    fn udp_rcvbuf_errors(&self) -> Option<u64> {
        let snmp = self.exec(&["cat", "/proc/net/snmp"]).ok()?;
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next()?, udp.next()?);
        let i = names.split_whitespace().position(|w| w == "RcvbufErrors")?;
        values.split_whitespace().nth(i)?.parse().ok()
    }

    fn exec(&self, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    fn nft(&self, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).context("writing to nft")?;
        }
        let out = child.wait_with_output().context("waiting for nft")?;
        if !out.status.success() {
            bail!("nft in {} refused {script:?}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

/// The two namespaces, the temporary directory and the daemons.
struct Env {
    reg: Arc<Mutex<Registry>>,
    dir: PathBuf,
    a: Ns,
    b: Ns,
    setpriv: bool,
    /// What set-up could not do (a sysctl it could not raise).
    notes: Vec<String>,
}

/// The bench's nftables table: conntrack on for every packet (the `ct
/// state` rules, as a stateful firewall has them), and an empty chain at a
/// priority before them that the loss rules go into. Each system leaves
/// its own sync traffic out of what it replicates (conntrackd: its
/// `Filter` section; nicsync: by itself).
const NFT_TABLE: &str = "nicsync_ctbench";

fn nft_ruleset() -> String {
    format!(
        "table inet {NFT_TABLE} {{
  chain loss {{ type filter hook input priority filter - 10; policy accept; }}
  chain input {{ type filter hook input priority filter; policy accept;
    ct state established,related accept
    ct state new accept
  }}
  chain output {{ type filter hook output priority filter; policy accept;
    ct state established,related accept
    ct state new accept
  }}
}}
"
    )
}

impl Env {
    fn setup(args: &CtBenchArgs) -> Result<Env> {
        let pid = std::process::id();
        let reg = Arc::new(Mutex::new(Registry { keep_dir: args.keep_logs, ..Default::default() }));
        install_signal_cleanup(reg.clone())?;
        // From here on, an error returns through `Env`'s Drop or the guard.
        let guard = CleanupGuard(Some(reg.clone()));
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let dir = std::env::temp_dir().join(format!("nicsync-ctbench-{pid}-{stamp}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the temporary directory {}", dir.display()))?;
        lock(&reg).dir = Some(dir.clone());

        let (na, nb) = (format!("nsctb-{pid}-a"), format!("nsctb-{pid}-b"));
        let (va, vb) = (format!("ctb{pid}a"), format!("ctb{pid}b"));
        for n in [&na, &nb] {
            run_cmd(Command::new("ip").args(["netns", "add", n])).map_err(|e| {
                anyhow!(
                    "cannot create network namespace {n} (this bench needs root and network namespaces; in a \
                     container, CAP_SYS_ADMIN and a writable /run/netns): {e:#}"
                )
            })?;
            lock(&reg).netns.push(n.clone());
        }
        run_cmd(
            Command::new("ip")
                .args(["link", "add", &va, "netns", &na, "type", "veth", "peer", "name", &vb, "netns", &nb]),
        )
        .context("cannot create the veth pair")?;
        for (n, v, a) in [(&na, &va, ADDR_A), (&nb, &vb, ADDR_B)] {
            run_cmd(Command::new("ip").args(["-n", n, "addr", "add", &format!("{a}/30"), "dev", v]))?;
            run_cmd(Command::new("ip").args(["-n", n, "link", "set", v, "up"]))?;
            run_cmd(Command::new("ip").args(["-n", n, "link", "set", "lo", "up"]))?;
        }
        let open = |n: &str| -> Result<CtSocket> {
            let path = PathBuf::from("/run/netns").join(n);
            in_netns(&path, CtSocket::open)
                .with_context(|| format!("entering {n}"))?
                .with_context(|| format!("ctnetlink socket in {n}"))
        };
        let a = Ns { name: na.clone(), veth: va, addr: ADDR_A, peer: ADDR_B, ct: open(&na)? };
        let b = Ns { name: nb.clone(), veth: vb, addr: ADDR_B, peer: ADDR_A, ct: open(&nb)? };
        for ns in [&a, &b] {
            ns.nft(&nft_ruleset()).context("loading the conntrack ruleset (is nftables installed?)")?;
        }
        // Global sysctls (only the initial namespace may write them): room
        // for every entry, and a hash table sized for them. A failure is
        // noted, not fatal: the injection says so if the table is full.
        let mut notes = Vec::new();
        let need = (u64::from(args.entries) + u64::from(args.resync_entries) + u64::from(args.singles)) * 2 + 65_536;
        let buckets =
            (u64::from(args.entries).max(u64::from(args.resync_entries))).next_power_of_two().clamp(1 << 16, 1 << 21);
        for (path, want) in [("nf_conntrack_max", need.max(CONNTRACK_MAX)), ("nf_conntrack_buckets", buckets)] {
            let path = Path::new("/proc/sys/net/netfilter").join(path);
            if let Err(e) = raise_sysctl(&reg, &path, want) {
                notes.push(format!("{e:#}"));
            }
        }
        let setpriv = which(Path::new("setpriv")).is_some();
        guard.disarm();
        Ok(Env { reg, dir, a, b, setpriv, notes })
    }

    fn logs_hint(&self) -> String {
        if lock(&self.reg).keep_dir {
            format!(" (logs in {})", self.dir.display())
        } else {
            String::new()
        }
    }

    /// Starts `args` in namespace `ns` as a tracked child, its output to
    /// `log`; it is killed if the bench dies (pdeathsig) and on cleanup.
    fn spawn(&self, name: &str, ns: &Ns, args: &[&str], log: &Path) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone().context("log file")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]);
        if self.setpriv {
            cmd.args(["setpriv", "--pdeathsig", "KILL", "--"]);
        }
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        let mut reg = lock(&self.reg);
        let child = cmd.spawn().with_context(|| format!("cannot start {name}: {}", args.join(" ")))?;
        reg.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails unless every thread of the named daemon runs at nice `want`
    /// (read back from /proc: the comparison is only fair if both systems'
    /// daemons run where the report says they do).
    fn check_nice(&self, name: &str, want: i32) -> Result<()> {
        let pid = {
            let reg = lock(&self.reg);
            let (_, child) =
                reg.children.iter().find(|(n, _)| n == name).ok_or_else(|| anyhow!("{name}: not started"))?;
            child.id()
        };
        let threads = crate::member::thread_nice_values(pid).with_context(|| format!("{name}: /proc/{pid}/task"))?;
        match threads.iter().find(|(_, nice)| *nice != Some(want)) {
            Some((thread, nice)) => {
                bail!("{name} (pid {pid}) runs thread {thread} at nice {nice:?}, not {want} as --daemon-nice asks")
            }
            None => Ok(()),
        }
    }

    /// Whether the named daemon has exited, and how.
    fn exited(&self, name: &str) -> Option<String> {
        let mut reg = lock(&self.reg);
        let (_, child) = reg.children.iter_mut().find(|(n, _)| n == name)?;
        match child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    fn stop_daemons(&self) {
        let mut reg = lock(&self.reg);
        let _ = kill_children(&mut reg.children);
    }

    /// Empties both kernel tables.
    fn flush_kernels(&mut self) -> Result<()> {
        self.a.ct.flush().context("flushing A's conntrack table")?;
        self.b.ct.flush().context("flushing B's conntrack table")?;
        Ok(())
    }

    /// Drops `percent` % of the packets on the given ports, in both
    /// directions (each namespace drops that share of what it receives).
    fn set_loss(&self, percent: u8, udp: &[u16], tcp: &[u16]) -> Result<()> {
        for ns in [&self.a, &self.b] {
            // One segment per packet, as on a wire of 1500-byte frames: a
            // veth carries TCP's GSO packets (up to 64 KiB) whole, and the
            // rules would drop 5 % of those, far fewer losses than 5 % of
            // a real link's packets. Taken by connections opened from now
            // on (a Full Sync's).
            ns.exec(&["ip", "link", "set", "dev", &ns.veth, "gso_max_segs", "1"])
                .context("one segment per packet on the veth (gso_max_segs 1)")?;
            let mut s = format!("flush chain inet {NFT_TABLE} loss\n");
            // A packet from the port to the same port must be dropped at
            // most once: the second rule leaves those to the first.
            for (l4, ports) in [("udp", udp), ("tcp", tcp)] {
                for p in ports {
                    let _ = writeln!(
                        s,
                        "add rule inet {NFT_TABLE} loss {l4} dport {p} numgen random mod 100 < {percent} counter drop"
                    );
                    let _ = writeln!(
                        s,
                        "add rule inet {NFT_TABLE} loss {l4} sport {p} {l4} dport != {p} numgen random mod 100 < \
                         {percent} counter drop"
                    );
                }
            }
            ns.nft(&s)?;
        }
        Ok(())
    }

    fn clear_loss(&self) -> Result<()> {
        for ns in [&self.a, &self.b] {
            ns.nft(&format!("flush chain inet {NFT_TABLE} loss\n"))?;
            ns.exec(&["ip", "link", "set", "dev", &ns.veth, "gso_max_segs", "65535"])
                .context("restoring gso_max_segs on the veth")?;
        }
        Ok(())
    }

    /// Packets the loss rules dropped (both namespaces).
    fn loss_drops(&self) -> u64 {
        let mut total = 0;
        for ns in [&self.a, &self.b] {
            if let Ok(out) = ns.exec(&["nft", "list", "chain", "inet", NFT_TABLE, "loss"]) {
                total += out
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .filter(|w| w[0] == "packets")
                    .filter_map(|w| w[1].parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        total
    }

    fn teardown(self) -> Vec<String> {
        cleanup(&self.reg)
    }
}

/// Cleans up if set-up fails half-way.
struct CleanupGuard(Option<Arc<Mutex<Registry>>>);

impl CleanupGuard {
    /// Set-up succeeded: `Env` owns the cleanup now.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(reg) = self.0.take() {
            for w in cleanup(&reg) {
                eprintln!("nicsync bench conntrack: cleanup: {w}");
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for w in cleanup(&self.reg) {
            eprintln!("nicsync bench conntrack: cleanup: {w}");
        }
    }
}

/// Raises a global sysctl to at least `want`, remembering the old value.
fn raise_sysctl(reg: &Mutex<Registry>, path: &Path, want: u64) -> Result<()> {
    let old = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let cur: u64 = old.trim().parse().with_context(|| format!("{} holds {old:?}", path.display()))?;
    if cur >= want {
        return Ok(());
    }
    std::fs::write(path, want.to_string()).with_context(|| format!("cannot raise {} to {want}", path.display()))?;
    lock(reg).sysctls.push((path.to_path_buf(), old.trim().to_owned()));
    Ok(())
}

// ---------------------------------------------------------------------------
// Observing the peer

/// How the bench reads what member B holds.
#[derive(Clone, Debug)]
enum Counter {
    /// conntrackd's external cache, through its control socket.
    Conntrackd(PathBuf),
    /// nicsync's `synced_entries`, through its control socket.
    Nicsync(PathBuf),
}

impl Counter {
    fn count(&self) -> Result<u64> {
        match self {
            Counter::Conntrackd(p) => ctd_cache_count(p, "external"),
            Counter::Nicsync(p) => {
                let v = ns_call(p, &Request::Syncstat)?;
                v["synced_entries"].as_u64().ok_or_else(|| anyhow!("syncstat without synced_entries: {v}"))
            }
        }
    }
}

/// When a poll first saw the target: bracketed between the send of the
/// last poll that missed it (or the start) and the answer of the first
/// that saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    after: Instant,
    before: Instant,
    count: u64,
}

impl Seen {
    fn mid(&self) -> Instant {
        self.after + (self.before - self.after) / 2
    }
}

/// How a poll ended.
#[derive(Clone, Copy, Debug)]
enum Polled {
    /// The count reached the target.
    Reached(Seen),
    /// It stopped growing at `count`, last changed at `since`.
    Stalled { count: u64, since: Instant },
}

/// Polls until the count reaches `target`. Gives up when the count has not
/// changed for `stall` once `armed` is set, or when `abort` is set.
fn poll_until(
    c: &Counter,
    target: u64,
    start: Instant,
    period: Duration,
    stall: Duration,
    armed: &AtomicBool,
    abort: &AtomicBool,
) -> Result<Polled> {
    let mut after = start;
    let mut last = (u64::MAX, Instant::now());
    loop {
        let s = Instant::now();
        let n = c.count()?;
        let r = Instant::now();
        if n >= target {
            return Ok(Polled::Reached(Seen { after: after.max(start), before: r, count: n }));
        }
        after = s;
        if n != last.0 {
            last = (n, r);
        } else if armed.load(Ordering::Acquire) && r - last.1 >= stall {
            return Ok(Polled::Stalled { count: n, since: last.1 });
        }
        if abort.load(Ordering::Acquire) {
            return Ok(Polled::Stalled { count: n, since: last.1 });
        }
        std::thread::sleep(period);
    }
}

/// Errors count as "not yet" until the time is up; the last one is then
/// reported.
fn wait_for(what: &str, limit: Duration, period: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let last = f();
        if let Ok(true) = last {
            return Ok(());
        }
        if t0.elapsed() >= limit {
            return match last {
                Err(e) => Err(e.context(format!("timed out after {limit:?} waiting for {what}"))),
                Ok(_) => bail!("timed out after {limit:?} waiting for {what}"),
            };
        }
        std::thread::sleep(period);
    }
}

/// Waits until a count has stopped changing for `quiet`.
fn wait_stable(what: &str, quiet: Duration, mut f: impl FnMut() -> Result<u64>) -> Result<u64> {
    let t0 = Instant::now();
    let mut last = (f()?, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let n = f()?;
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return Ok(n);
        }
        if t0.elapsed() > SETTLE_TIMEOUT {
            bail!("{what} still changing after {SETTLE_TIMEOUT:?} (last {n})");
        }
    }
}

/// Live replication figures.
struct Live {
    entries_per_s: f64,
    lag_at_end_ms: f64,
    lag_entries: u64,
    kernel_entries_per_s: f64,
}

/// Injects the live workload into A while polling B; B's count must reach
/// `base + N`.
fn live_replication(env: &mut Env, c: &Counter, work: &Workload, period: Duration, stall: Duration) -> Result<Live> {
    let base = c.count()?;
    let n = work.live.len() as u64;
    let target = base + n;
    let armed = AtomicBool::new(false);
    let abort = AtomicBool::new(false);
    let a = &mut env.a;
    let (inj, end, at_end, polled) = std::thread::scope(|s| {
        let start = Instant::now();
        let (armed, abort) = (&armed, &abort);
        let h = s.spawn(move || poll_until(c, target, start, period, stall, armed, abort));
        let inj = inject(&mut a.ct, &work.live);
        let end = Instant::now();
        armed.store(true, Ordering::Release);
        if inj.is_err() {
            abort.store(true, Ordering::Release);
        }
        let at_end = poll_after_end(c, target, end, abort);
        let polled = h.join().map_err(|_| anyhow!("the polling thread panicked"));
        (inj.map(|d| (start, d)), end, at_end, polled)
    });
    let (start, inj) = inj?;
    let seen = match polled?? {
        Polled::Reached(seen) => seen,
        Polled::Stalled { count: held, .. } => bail!(
            "the peer stopped at {} of {n} entries (no growth for {stall:?} after the injection ended)",
            held.saturating_sub(base)
        ),
    };
    let at_end = at_end?;
    let done = at_end.bracket(&seen).mid().max(start);
    Ok(Live {
        entries_per_s: rate(work.live.len(), done - start),
        lag_at_end_ms: ms(done.saturating_duration_since(end)),
        lag_entries: target.saturating_sub(at_end.first),
        kernel_entries_per_s: rate(work.live.len(), inj),
    })
}

/// What the injecting thread's polls saw after the injection ended.
struct EndPolls {
    /// The count at the first poll.
    first: u64,
    /// Send of the last poll that missed all N.
    last_miss: Option<Instant>,
    /// Answer of the poll that saw all N (none if the window ran out).
    first_hit: Option<Instant>,
}

impl EndPolls {
    /// The moment B held all N, bracketed by both threads' polls: after the
    /// send of every poll that missed it, before the answer of every poll
    /// that saw it (the count only grows).
    fn bracket(&self, seen: &Seen) -> Seen {
        Seen {
            after: self.last_miss.map_or(seen.after, |t| seen.after.max(t)),
            before: self.first_hit.map_or(seen.before, |t| seen.before.min(t)),
            count: seen.count,
        }
    }
}

/// Polls back to back from the end of the injection until the peer holds
/// `target`, for at most [`END_POLL_WINDOW`]: the periodic poller alone
/// brackets the end within one period (500 µs), which made a lag of a few
/// dozen entries read as about 0.3 ms whatever it was.
fn poll_after_end(c: &Counter, target: u64, end: Instant, abort: &AtomicBool) -> Result<EndPolls> {
    let mut first_count = None;
    let mut last_miss = None;
    loop {
        let s = Instant::now();
        let n = c.count()?;
        let r = Instant::now();
        let first = *first_count.get_or_insert(n);
        if n >= target {
            return Ok(EndPolls { first, last_miss, first_hit: Some(r) });
        }
        last_miss = Some(s);
        if r - end >= END_POLL_WINDOW || abort.load(Ordering::Acquire) {
            return Ok(EndPolls { first, last_miss, first_hit: None });
        }
    }
}

/// Single-connection figures.
#[derive(Default)]
struct Singles {
    /// Estimates (µs), sorted.
    est: Vec<f64>,
    lo: Vec<f64>,
    hi: Vec<f64>,
    rtt: Vec<f64>,
    /// How long each create request in A's kernel took (µs).
    create: Vec<f64>,
    missed: u32,
    /// What the polls saw for the first connection never seen.
    first_miss: Option<String>,
}

impl Singles {
    fn sorted(v: &[f64]) -> Vec<u64> {
        let mut s: Vec<u64> = v.iter().map(|x| (x * 1000.0).round() as u64).collect();
        s.sort_unstable();
        s
    }

    fn pct(v: &[f64], q: f64) -> Option<f64> {
        (!v.is_empty()).then(|| percentile(&Self::sorted(v), q) / 1000.0)
    }
}

/// Creates one entry in A's kernel.
fn create_one(ct: &mut CtSocket, e: &CtEntry) -> Result<()> {
    inject(ct, std::slice::from_ref(e)).map(|_| ())
}

/// Times single connections by polling B's count back to back from a
/// second thread that starts before the entry is created, so that the
/// bracket is about two poll round trips wide whatever the create costs.
fn singles_polled(env: &mut Env, c: &Counter, entries: &[(ConnKey, CtEntry)]) -> Result<Singles> {
    let mut out = Singles::default();
    for (_, e) in entries {
        std::thread::sleep(SINGLE_GAP);
        let base = c.count()?;
        let stop = AtomicBool::new(false);
        let a = &mut env.a;
        let (created, polls) = std::thread::scope(|s| {
            let stop = &stop;
            let h = s.spawn(move || -> Result<Vec<(Instant, Instant, u64)>> {
                let mut polls = Vec::new();
                let t0 = Instant::now();
                loop {
                    let s = Instant::now();
                    let n = c.count()?;
                    let r = Instant::now();
                    polls.push((s, r, n));
                    if n > base || stop.load(Ordering::Acquire) || r - t0 > SINGLE_TIMEOUT {
                        return Ok(polls);
                    }
                }
            });
            // Let the poller get going, then create.
            std::thread::sleep(Duration::from_micros(300));
            let t_c = Instant::now();
            let created = create_one(&mut a.ct, e).map(|_| (t_c, t_c.elapsed()));
            if created.is_err() {
                stop.store(true, Ordering::Release);
            }
            (created, h.join().map_err(|_| anyhow!("the polling thread panicked")))
        });
        let (t_c, took) = created?;
        out.create.push(us(took));
        let polls = polls??;
        out.rtt.extend(polls.iter().map(|(s, r, _)| us(*r - *s)));
        match polls.iter().position(|p| p.2 > base) {
            Some(j) => {
                // The last poll that missed it was handled after its send;
                // the first that saw it, before its answer.
                let after = if j > 0 { polls[j - 1].0.max(t_c) } else { t_c };
                let (lo, hi) =
                    (us(after.saturating_duration_since(t_c)), us(polls[j].1.saturating_duration_since(t_c)));
                out.lo.push(lo);
                out.hi.push(hi);
                out.est.push((lo + hi) / 2.0);
            }
            None => {
                out.missed += 1;
                if out.first_miss.is_none() {
                    let (lo, hi) = polls.iter().fold((u64::MAX, 0), |(lo, hi), p| (lo.min(p.2), hi.max(p.2)));
                    // Did it come once the back-to-back polling stopped?
                    let mut late = None;
                    let t_late = Instant::now();
                    while late.is_none() && t_late.elapsed() < Duration::from_secs(3) {
                        std::thread::sleep(Duration::from_millis(50));
                        if c.count()? > base {
                            late = Some(t_late.elapsed());
                        }
                    }
                    out.first_miss = Some(format!(
                        "{} polls over {:.0} ms after the create saw counts {lo}..={hi}, {base} before; {}",
                        polls.len(),
                        polls.last().map_or(0.0, |p| ms(p.1.saturating_duration_since(t_c))),
                        match late {
                            Some(d) => format!("polled every 50 ms after that, it was there {:.0} ms later", ms(d)),
                            None => "still missing 3 s later".to_owned(),
                        }
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Resync figures.
#[derive(Default)]
struct Resync {
    /// Request → all M held (None: it stalled).
    done_ms: Option<f64>,
    /// Request → the last time the count changed.
    elapsed_ms: f64,
    fraction: f64,
    verified: bool,
    daemon_ms: Option<f64>,
}

// ---------------------------------------------------------------------------
// conntrackd

/// One request on conntrackd's UNIX control socket: the request code as a
/// native-endian int, then its text answer until the daemon closes.
fn ctd_request(path: &Path, code: i32, timeout: Duration) -> Result<String> {
    let mut s = UnixStream::connect(path).with_context(|| format!("cannot reach conntrackd at {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(&code.to_ne_bytes()).context("conntrackd control socket: send")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).context("conntrackd control socket: read")?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// "current active connections" of conntrackd's internal or external
/// cache, from its STATS answer.
fn ctd_cache_count(path: &Path, which: &str) -> Result<u64> {
    let text = ctd_request(path, CTD_STATS, Duration::from_secs(10))?;
    parse_ctd_count(&text, which).ok_or_else(|| anyhow!("conntrackd stats without a {which} cache count: {text:?}"))
}

fn parse_ctd_count(text: &str, which: &str) -> Option<u64> {
    let head = format!("cache {which}:");
    let rest = &text[text.find(&head)? + head.len()..];
    let line = rest.lines().find(|l| l.trim_start().starts_with("current active connections:"))?;
    line.rsplit(|c: char| c.is_whitespace() || c == ':').find(|w| !w.is_empty())?.parse().ok()
}

/// TCP tuples in a conntrackd cache dump ("tcp 6 ESTABLISHED src=… dst=…
/// sport=… dport=… [ASSURED] …"): the first src/dst/sport/dport of each
/// line (the original direction).
fn parse_ctd_dump(text: &str) -> (HashSet<Tuple4>, usize) {
    let mut set = HashSet::new();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name));
        let t = (|| {
            Some((
                field("src=")?.parse().ok()?,
                field("sport=")?.parse().ok()?,
                field("dst=")?.parse().ok()?,
                field("dport=")?.parse().ok()?,
            ))
        })();
        if let Some(t) = t {
            set.insert(t);
        }
    }
    (set, lines)
}

/// Compares B's external cache with the expected tuples; a note when they
/// differ.
fn ctd_verify(ctl: &Path, want: &HashSet<Tuple4>) -> Result<(bool, Option<String>)> {
    let dump = ctd_request(ctl, CTD_DUMP_EXTERNAL, Duration::from_secs(300)).context("dumping B's external cache")?;
    let (got, lines) = parse_ctd_dump(&dump);
    let missing = want.difference(&got).count();
    let extra = got.difference(want).count();
    let dup = lines.saturating_sub(got.len());
    if missing == 0 && extra == 0 && dup == 0 {
        Ok((true, None))
    } else {
        Ok((
            false,
            Some(format!(
                "B's external cache: {missing} expected entries missing, {extra} unexpected, {dup} duplicates"
            )),
        ))
    }
}

/// Writes a file only the owner may read (configurations name key files
/// and sockets).
fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// The directory a path is in.
fn dir_of(p: &Path) -> PathBuf {
    p.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Appends both daemons' network, resend-queue and queue statistics to
/// `conntrackd-stats.txt` in the bench's directory (kept with
/// --keep-logs), for looking into a stalled resync.
fn ctd_save_stats(dir: &Path, when: &str) {
    let mut text = String::new();
    for tag in ["a", "b"] {
        let ctl = dir.join(format!("conntrackd-{tag}.ctl"));
        for (code, what) in [(CTD_STATS, "stats"), (28, "network"), (32, "rsqueue"), (36, "queue")] {
            let out = ctd_request(&ctl, code, Duration::from_secs(10)).unwrap_or_else(|e| format!("{e:#}\n"));
            let _ = write!(text, "=== conntrackd {tag} -s {what} (resync {when})\n{out}\n");
        }
    }
    let path = dir.join("conntrackd-stats.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path) {
        let _ = f.write_all(text.as_bytes());
    }
}

struct CtdPaths {
    conf: [PathBuf; 2],
    ctl: [PathBuf; 2],
    log: [PathBuf; 2],
}

fn ctd_config(dir: &Path, me: &Ns, tag: &str) -> (String, PathBuf) {
    let ctl = dir.join(format!("conntrackd-{tag}.ctl"));
    let conf = format!(
        "# conntrackd for nicsync bench conntrack, member {tag}: FTFW over unicast UDP.
Sync {{
\tMode FTFW {{
\t\tResendQueueSize 131072
\t}}
\tUDP {{
\t\tIPv4_address {me}
\t\tIPv4_Destination_Address {peer}
\t\tPort {CTD_PORT}
\t\tInterface {veth}
\t\tSndSocketBuffer 8388608
\t\tRcvSocketBuffer 8388608
\t\tChecksum on
\t}}
}}
General {{
\tHashSize 1048576
\tHashLimit 8388608
\tLogFile {log}
\tSyslog off
\tLockFile {lock}
\tUNIX {{
\t\tPath {ctl}
\t}}
\tNetlinkBufferSize 67108864
\tNetlinkBufferSizeMaxGrowth 134217728
\tFilter From Kernelspace {{
\t\tAddress Ignore {{
\t\t\tIPv4_address 127.0.0.1
\t\t\tIPv4_address {me}
\t\t\tIPv4_address {peer}
\t\t}}
\t}}
}}
",
        me = me.addr,
        peer = me.peer,
        veth = me.veth,
        log = dir.join(format!("conntrackd-{tag}.log")).display(),
        lock = dir.join(format!("conntrackd-{tag}.lock")).display(),
        ctl = ctl.display(),
    );
    (conf, ctl)
}

fn ctd_start(env: &Env, args: &CtBenchArgs, p: &CtdPaths) -> Result<()> {
    let bin = args.conntrackd.display().to_string();
    for (i, (ns, tag)) in [(&env.a, "a"), (&env.b, "b")].into_iter().enumerate() {
        let name = format!("conntrackd-{tag}");
        // A daemon that was killed leaves its lock file and socket behind.
        let _ = std::fs::remove_file(env.dir.join(format!("conntrackd-{tag}.lock")));
        let _ = std::fs::remove_file(&p.ctl[i]);
        let conf = p.conf[i].display().to_string();
        // conntrackd 1.4.7 ignores its `Nice` setting ("deprecated nice
        // configuration, ignoring"): it is started under nice(1), which
        // adds to the bench's own value, so that it ends at --daemon-nice
        // as nicsync's daemon does by its `nice` key.
        let by = (args.daemon_nice - crate::sys::nice().unwrap_or(0)).to_string();
        env.spawn(&name, ns, &["nice", "-n", &by, &bin, "-C", &conf], &p.log[i].with_extension("out"))?;
        let ctl = p.ctl[i].clone();
        let t0 = Instant::now();
        loop {
            if let Some(st) = env.exited(&name) {
                let out = std::fs::read_to_string(p.log[i].with_extension("out")).unwrap_or_default();
                let log = std::fs::read_to_string(&p.log[i]).unwrap_or_default();
                bail!("conntrackd did not start in {} (exit {st}): {}{}", ns.name, tail(&out), tail(&log));
            }
            if ctd_cache_count(&ctl, "internal").is_ok() {
                env.check_nice(&name, args.daemon_nice)?;
                break;
            }
            if t0.elapsed() > START_TIMEOUT {
                bail!("conntrackd in {} did not answer on {} within {START_TIMEOUT:?}", ns.name, ctl.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let t = lines[lines.len().saturating_sub(5)..].join(" | ");
    if t.is_empty() {
        String::new()
    } else {
        format!(" [{t}]")
    }
}

fn run_conntrackd(
    env: &mut Env,
    work: &Workload,
    args: &CtBenchArgs,
    rep: &mut CtBenchReport,
    notes: &mut Vec<String>,
) -> Result<()> {
    let stall = Duration::from_secs(args.stall_seconds);
    let period = Duration::from_micros(args.poll_us);
    let mut paths = CtdPaths { conf: Default::default(), ctl: Default::default(), log: Default::default() };
    for (i, (ns, tag)) in [(&env.a, "a"), (&env.b, "b")].into_iter().enumerate() {
        let (conf, ctl) = ctd_config(&env.dir, ns, tag);
        let path = env.dir.join(format!("conntrackd-{tag}.conf"));
        write_private(&path, &conf)?;
        paths.conf[i] = path;
        paths.ctl[i] = ctl;
        paths.log[i] = env.dir.join(format!("conntrackd-{tag}.log"));
    }
    let ctl_b = paths.ctl[1].clone();
    let counter = Counter::Conntrackd(ctl_b.clone());

    // 1 and 2: live replication and single connections, from empty tables.
    env.flush_kernels()?;
    ctd_start(env, args, &paths)?;
    std::thread::sleep(Duration::from_millis(500));
    let live = live_replication(env, &counter, work, period, stall).context("live replication")?;
    rep.conntrackd_entries_per_s = Some(live.entries_per_s);
    rep.conntrackd_lag_at_end_ms = Some(live.lag_at_end_ms);
    rep.conntrackd_lag_entries_at_end = Some(live.lag_entries);
    rep.conntrackd_kernel_entries_per_s = Some(live.kernel_entries_per_s);
    let (ok, why) = ctd_verify(&ctl_b, &work.live_tuples).context("verifying the live replication")?;
    if !ok {
        notes.push(format!("live replication: {}", why.unwrap_or_default()));
    }

    let s = singles_polled(env, &counter, &work.singles).context("single connections")?;
    rep.conntrackd_single_latency_us = Singles::pct(&s.est, 0.5);
    rep.conntrackd_single_latency_p90_us = Singles::pct(&s.est, 0.9);
    rep.conntrackd_single_latency_bounds_us =
        Singles::pct(&s.lo, 0.5).zip(Singles::pct(&s.hi, 0.5)).map(|(a, b)| [a, b]);
    rep.conntrackd_poll_rtt_us = Singles::pct(&s.rtt, 0.5);
    rep.conntrackd_single_create_us = Singles::pct(&s.create, 0.5);
    rep.conntrackd_singles_missed = Some(s.missed);
    if let Some(m) = &s.first_miss {
        notes.push(format!("{} single connections never seen at B (first: {m})", s.missed));
    }

    // 3: full resync. A's kernel is loaded while no daemon runs, then the
    // daemons start (A dumps its table into its internal cache).
    env.stop_daemons();
    env.flush_kernels()?;
    let m = work.resync.len() as u64;
    let dt = inject(&mut env.a.ct, &work.resync).context("loading A's kernel for the resync")?;
    rep.conntrackd_run_kernel_alone_entries_per_s = Some(rate(work.resync.len(), dt));
    // Fresh logs and lock files for the second start.
    for p in paths.log.iter() {
        let _ = std::fs::remove_file(p);
    }
    ctd_start(env, args, &paths)?;
    let ctl_a = paths.ctl[0].clone();
    wait_for(
        "conntrackd A to load A's table into its internal cache",
        SETTLE_TIMEOUT,
        Duration::from_millis(50),
        || Ok(ctd_cache_count(&ctl_a, "internal")? >= m),
    )?;
    let settled = wait_stable("B's external cache", Duration::from_secs(2), || counter.count())?;
    if settled > 0 {
        notes.push(format!("B received {settled} entries when the daemons started (before the timed resync)"));
    }

    // A first resync, outside the comparison: B's external cache fills
    // for the first time, its memory growing as it goes. nicsync's B
    // pulled its first Full Sync when it joined, so that both timed
    // resyncs below start from a peer that held the entries before.
    let cold = ctd_resync(&ctl_b, &counter, work, (period, stall), notes).context("first (cold) resync")?;
    rep.conntrackd_resync_cold_ms = cold.done_ms;
    let drops0 = env.b.udp_rcvbuf_errors();
    let r = ctd_resync(&ctl_b, &counter, work, (period, stall), notes).context("resync without loss")?;
    note_rcvbuf_drops(notes, "resync without loss", drops0, env.b.udp_rcvbuf_errors());
    rep.conntrackd_resync_1m_ms = r.done_ms;
    rep.conntrackd_resync_verified = Some(r.verified);
    if r.done_ms.is_none() {
        notes.push(format!("resync without loss stalled at {:.1} %", r.fraction * 100.0));
    }

    if args.loss_percent > 0 {
        env.set_loss(args.loss_percent, &[CTD_PORT], &[])?;
        let drops0 = env.b.udp_rcvbuf_errors();
        let r = ctd_resync(&ctl_b, &counter, work, (period, stall), notes);
        note_rcvbuf_drops(notes, "resync under loss", drops0, env.b.udp_rcvbuf_errors());
        let drops = env.loss_drops();
        env.clear_loss()?;
        let r = r.context("resync under loss")?;
        notes.push(format!("loss rules dropped {drops} sync packets during the resync under loss"));
        rep.conntrackd_resync_complete_under_loss = Some(r.done_ms.is_some() && r.verified);
        rep.conntrackd_resync_loss_ms = Some(r.done_ms.unwrap_or(r.elapsed_ms));
        rep.conntrackd_resync_loss_fraction = Some(r.fraction);
    }
    Ok(())
}

/// Notes datagrams B's kernel dropped for a full receive buffer during a
/// resync (a loss the nftables rules did not cause).
fn note_rcvbuf_drops(notes: &mut Vec<String>, what: &str, before: Option<u64>, after: Option<u64>) {
    if let (Some(b), Some(a)) = (before, after) {
        if a > b {
            notes.push(format!("{what}: B's kernel dropped {} sync datagrams for a full receive buffer", a - b));
        }
    }
}

/// Flushes B's external cache, asks B to request a dump from A (`-n`), and
/// times it until B holds all M or stalls.
fn ctd_resync(
    ctl_b: &Path,
    counter: &Counter,
    work: &Workload,
    (period, stall): (Duration, Duration),
    notes: &mut Vec<String>,
) -> Result<Resync> {
    let m = work.resync.len() as u64;
    ctd_request(ctl_b, CTD_FLUSH_EXT_CACHE, Duration::from_secs(60)).context("flushing B's external cache")?;
    wait_for("B's external cache to empty", Duration::from_secs(60), Duration::from_millis(10), || {
        Ok(counter.count()? == 0)
    })?;
    let t0 = Instant::now();
    ctd_request(ctl_b, CTD_REQUEST_DUMP, Duration::from_secs(10)).context("requesting a resync at B")?;
    let armed = AtomicBool::new(true);
    let abort = AtomicBool::new(false);
    // The request itself travels on the (lossy) link: re-issue it, as an
    // operator would, if nothing arrived within a second; at most 3 times.
    let mut retries = 0;
    while retries < 3 {
        let first = poll_until(counter, 1, Instant::now(), period, Duration::from_secs(1), &armed, &abort)?;
        if let Polled::Reached(_) = first {
            break;
        }
        retries += 1;
        ctd_request(ctl_b, CTD_REQUEST_DUMP, Duration::from_secs(10)).context("re-requesting a resync at B")?;
    }
    if retries > 0 {
        notes.push(format!("the resync request was re-issued {retries} time(s): nothing arrived within 1 s"));
    }
    let outcome = poll_until(counter, m, t0, period, stall, &armed, &abort)?;
    let mut r = Resync::default();
    match outcome {
        Polled::Reached(seen) => {
            r.done_ms = Some(ms(seen.mid() - t0));
            r.elapsed_ms = ms(seen.before - t0);
            r.fraction = seen.count as f64 / m as f64;
        }
        Polled::Stalled { count, since } => {
            r.elapsed_ms = ms(since.saturating_duration_since(t0));
            r.fraction = count as f64 / m as f64;
        }
    }
    ctd_save_stats(&dir_of(ctl_b), if r.done_ms.is_some() { "done" } else { "stalled" });
    let (ok, why) = ctd_verify(ctl_b, &work.resync_tuples)?;
    r.verified = ok;
    if let (Some(why), Some(_)) = (why, r.done_ms) {
        notes.push(format!("resync: {why}"));
    }
    Ok(r)
}

// ---------------------------------------------------------------------------
// nicsync

/// One request to a nicsync daemon's control socket (one JSON object per
/// line each way).
fn ns_call(path: &Path, req: &Request) -> Result<Value> {
    ns_call_timeout(path, req, Duration::from_secs(30))
}

fn ns_call_timeout(path: &Path, req: &Request, timeout: Duration) -> Result<Value> {
    let s =
        UnixStream::connect(path).with_context(|| format!("cannot reach the nicsync daemon at {}", path.display()))?;
    ns_exchange(s, req, timeout)
}

fn ns_exchange(mut s: UnixStream, req: &Request, timeout: Duration) -> Result<Value> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line).context("nicsync control socket: send")?;
    let mut buf = String::new();
    BufReader::new(s.take(64 << 20)).read_line(&mut buf).context("nicsync control socket: read")?;
    let reply: crate::control::Reply =
        serde_json::from_str(&buf).with_context(|| format!("nicsync daemon sent a malformed reply: {buf:?}"))?;
    if reply.ok {
        Ok(reply.data.unwrap_or(Value::Null))
    } else {
        bail!("nicsync daemon refused {req:?}: {}", reply.error.unwrap_or_default())
    }
}

fn ns_config(dir: &Path, me: &Ns, id: u16, peer_id: u16, key_file: &Path, nice: i32) -> (String, PathBuf) {
    let sock = dir.join(format!("nicsync-{id}.sock"));
    let conf = format!(
        "# nicsync for nicsync bench conntrack: member {id}, its kernel's conntrack table as the source.
member_id = {id}
cluster_id = 1
mode = \"ha\"
source = \"conntrack\"
nice = {nice}

[device]
kind = \"emulated\"
table_capacity = 4194304

[sync]
bind = \"{a}:{NS_SYNC_PORT}\"

[membership]
bind = \"{a}:{NS_MEMBERSHIP_PORT}\"
# Both members, both kernels and the injector share this machine's cores:
# a peer is taken for dead after 200 ms of silence, not the default 50 ms
# (meant for members with cores of their own), so that a flood does not
# fail the cluster over in the middle of a measurement.
dead_after = {DEAD_AFTER}

[full_sync]
bind = \"{a}:{NS_FULL_SYNC_PORT}\"

[control]
socket = \"{sock}\"

[security]
key_file = \"{key}\"

[conntrack]
commit = \"on-active\"

[[peer]]
id = {peer_id}
sync = \"{p}:{NS_SYNC_PORT}\"
membership = \"{p}:{NS_MEMBERSHIP_PORT}\"
full_sync = \"{p}:{NS_FULL_SYNC_PORT}\"
",
        a = me.addr,
        p = me.peer,
        sock = sock.display(),
        key = key_file.display(),
    );
    (conf, sock)
}

struct NsPaths {
    conf: [PathBuf; 2],
    sock: [PathBuf; 2],
    log: [PathBuf; 2],
    /// The nice value the daemons must run at (`--daemon-nice`).
    nice: i32,
}

fn ns_state(sock: &Path) -> Result<String> {
    let v = ns_call(sock, &Request::State)?;
    Ok(v["state"].as_str().unwrap_or("?").to_owned())
}

fn ns_syncstat(sock: &Path) -> Result<Value> {
    ns_call(sock, &Request::Syncstat)
}

fn ns_digest(sock: &Path) -> Result<(u64, String)> {
    let v = ns_call(sock, &Request::ConnDigest)?;
    let n = v["entries"].as_u64().ok_or_else(|| anyhow!("conn digest without entries: {v}"))?;
    Ok((n, v["digest"].as_str().unwrap_or("").to_owned()))
}

/// Starts member `i` (0: A, 1: B) and waits until its control socket
/// answers and it reached one of `states`.
fn ns_start_one(env: &Env, p: &NsPaths, i: usize, states: &[&str]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the nicsync binary")?;
    let (ns, name) = if i == 0 { (&env.a, "nicsync-a") } else { (&env.b, "nicsync-b") };
    let conf = p.conf[i].display().to_string();
    env.spawn(name, ns, &[&exe.display().to_string(), "daemon", "--config", &conf], &p.log[i])?;
    let t0 = Instant::now();
    loop {
        if let Some(st) = env.exited(name) {
            let log = std::fs::read_to_string(&p.log[i]).unwrap_or_default();
            bail!("nicsync daemon did not start in {} (exit {st}):{}", ns.name, tail(&log));
        }
        if let Ok(s) = ns_state(&p.sock[i]) {
            if states.contains(&s.as_str()) {
                return env.check_nice(name, p.nice);
            }
        }
        if t0.elapsed() > START_TIMEOUT {
            let s = ns_state(&p.sock[i]).unwrap_or_else(|e| format!("{e:#}"));
            bail!(
                "nicsync member {} in {} did not reach {states:?} within {START_TIMEOUT:?} (state: {s})",
                i + 1,
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ns_start(env: &Env, p: &NsPaths) -> Result<()> {
    // A first, so that it is Active (it seeds the cluster with its table).
    ns_start_one(env, p, 0, &["active", "active_attention"])?;
    ns_start_one(env, p, 1, &["standby"])
}

/// `synced_entries` and `table_digest` from `syncstat`: the card's own
/// running count and digest, cheap to read (no table walk).
fn ns_counters(sock: &Path) -> Result<(u64, String)> {
    let v = ns_syncstat(sock)?;
    let n = v["synced_entries"].as_u64().ok_or_else(|| anyhow!("syncstat without synced_entries: {v}"))?;
    Ok((n, v["table_digest"].as_str().unwrap_or("").to_owned()))
}

/// Waits until both members hold `want` entries with equal digests.
fn ns_wait_converged(p: &NsPaths, want: u64) -> Result<()> {
    let mut last = None;
    let r = wait_for("the members to hold the same entries", SETTLE_TIMEOUT, Duration::from_millis(20), || {
        let a = ns_counters(&p.sock[0])?;
        let b = ns_counters(&p.sock[1])?;
        let ok = a.0 == want && b.0 == want && a.1 == b.1;
        last = Some((a, b));
        Ok(ok)
    });
    r.map_err(|e| match last {
        Some((a, b)) => e.context(format!("want {want} entries; A holds {} ({}), B holds {} ({})", a.0, a.1, b.0, b.1)),
        None => e,
    })
}

/// `conn digest` on both members (a walk of each table), retried while a
/// member is busy serving a Full Sync.
fn ns_digests(p: &NsPaths) -> Result<((u64, String), (u64, String))> {
    let mut out = None;
    wait_for("conn digest on both members", Duration::from_secs(30), Duration::from_millis(50), || {
        out = Some((ns_digest(&p.sock[0])?, ns_digest(&p.sock[1])?));
        Ok(true)
    })?;
    out.ok_or_else(|| anyhow!("conn digest gave no answer"))
}

/// `conn wait` on B, then the entry created in A: the daemon's
/// CLOCK_MONOTONIC stamp minus the one taken just before the create.
fn singles_waited(env: &mut Env, sock_b: &Path, entries: &[(ConnKey, CtEntry)]) -> Result<Singles> {
    let mut out = Singles::default();
    for (k, e) in entries {
        std::thread::sleep(SINGLE_GAP);
        let stream = UnixStream::connect(sock_b).with_context(|| format!("cannot reach {}", sock_b.display()))?;
        let req = Request::ConnWait { key: k.to_string(), timeout_ms: SINGLE_TIMEOUT.as_millis() as u64 };
        let a = &mut env.a;
        let (created, reply) = std::thread::scope(|s| {
            let h = s.spawn(|| ns_exchange(stream, &req, SINGLE_TIMEOUT + Duration::from_secs(5)));
            // Give the daemon time to register the wait before the entry
            // exists (a late registration would only make the figure larger).
            std::thread::sleep(Duration::from_millis(3));
            let t_c = monotonic_ns();
            let created = create_one(&mut a.ct, e).map(|_| (t_c, monotonic_ns().saturating_sub(t_c)));
            (created, h.join().map_err(|_| anyhow!("the waiting thread panicked")))
        });
        let (t_c, took) = created?;
        out.create.push(took as f64 / 1e3);
        let v = match reply? {
            Ok(v) => v,
            // The daemon answers "no connection … in time" when the wait ran out.
            Err(e) if format!("{e:#}").contains("in time") => {
                out.missed += 1;
                continue;
            }
            Err(e) => return Err(e.context(format!("conn wait {k}"))),
        };
        let seen = v["seen_monotonic_ns"]
            .as_u64()
            .ok_or_else(|| anyhow!("conn wait answered without seen_monotonic_ns: {v}"))?;
        if seen < t_c {
            bail!("conn wait reported {k} at B before it was created in A ({seen} < {t_c})");
        }
        out.est.push((seen - t_c) as f64 / 1e3);
    }
    Ok(out)
}

fn run_nicsync(
    env: &mut Env,
    work: &Workload,
    args: &CtBenchArgs,
    rep: &mut CtBenchReport,
    notes: &mut Vec<String>,
) -> Result<()> {
    let stall = Duration::from_secs(args.stall_seconds);
    let period = Duration::from_micros(args.poll_us);
    let exe = std::env::current_exe().context("cannot find the nicsync binary")?;
    let key_file = env.dir.join("cluster.key");
    run_cmd(Command::new(&exe).args(["key", "gen"]).arg(&key_file)).context("nicsync key gen")?;
    let mut p =
        NsPaths { conf: Default::default(), sock: Default::default(), log: Default::default(), nice: args.daemon_nice };
    for (i, (ns, id, peer)) in [(&env.a, 1u16, 2u16), (&env.b, 2, 1)].into_iter().enumerate() {
        let (conf, sock) = ns_config(&env.dir, ns, id, peer, &key_file, args.daemon_nice);
        let path = env.dir.join(format!("nicsync-{id}.toml"));
        write_private(&path, &conf)?;
        p.conf[i] = path;
        p.sock[i] = sock;
        p.log[i] = env.dir.join(format!("nicsync-{id}.log"));
    }
    let sock_b = p.sock[1].clone();
    let counter = Counter::Nicsync(sock_b.clone());

    // 1 and 2: live replication and single connections, from empty tables.
    env.flush_kernels()?;
    ns_start(env, &p)?;
    ns_wait_converged(&p, 0)?;
    let live = live_replication(env, &counter, work, period, stall).context("live replication")?;
    rep.nicsync_entries_per_s = Some(live.entries_per_s);
    rep.nicsync_lag_at_end_ms = Some(live.lag_at_end_ms);
    rep.nicsync_lag_entries_at_end = Some(live.lag_entries);
    rep.nicsync_kernel_entries_per_s = Some(live.kernel_entries_per_s);
    if let Err(e) = ns_wait_converged(&p, work.live.len() as u64) {
        notes.push(format!("live replication: {e:#}"));
    }

    let waited = singles_waited(env, &sock_b, &work.singles).context("single connections (conn wait)")?;
    rep.nicsync_single_latency_us = Singles::pct(&waited.est, 0.5);
    rep.nicsync_single_latency_p90_us = Singles::pct(&waited.est, 0.9);
    rep.nicsync_singles_missed = Some(waited.missed);
    // As many again, timed by polling B as conntrackd is (fresh tuples:
    // the first ones exist now).
    let k0 = work.singles.len() as u32;
    let polled_entries: Vec<(ConnKey, CtEntry)> = (k0..2 * k0)
        .map(|i| {
            let k = key(i, SINGLE_DST);
            Ok((k, ct_entry(&k)?))
        })
        .collect::<Result<_>>()?;
    let polled = singles_polled(env, &counter, &polled_entries).context("single connections (polled)")?;
    let expect = (work.live.len() + 2 * work.singles.len()) as u64;
    if let Err(e) = ns_wait_converged(&p, expect) {
        let kernel = env.a.ct.dump(|_| {}).map_or_else(|e| format!("? ({e})"), |n| n.to_string());
        let ct = ns_syncstat(&p.sock[0]).map(|v| v["conntrack"].to_string()).unwrap_or_default();
        notes.push(format!("after the single connections: {e:#}; A's kernel holds {kernel}; A's conntrack stats {ct}"));
    }
    rep.nicsync_single_latency_polled_us = Singles::pct(&polled.est, 0.5);
    rep.nicsync_poll_rtt_us = Singles::pct(&polled.rtt, 0.5);
    let creates: Vec<f64> = waited.create.iter().chain(&polled.create).copied().collect();
    rep.nicsync_single_create_us = Singles::pct(&creates, 0.5);
    if polled.missed > 0 {
        notes.push(format!(
            "{} polled single connections never seen at B (first: {})",
            polled.missed,
            polled.first_miss.as_deref().unwrap_or("?")
        ));
    }

    // 3: full resync. A's kernel is loaded while no daemon runs; A dumps it
    // at start, B pulls it when it joins.
    env.stop_daemons();
    env.flush_kernels()?;
    for s in &p.sock {
        let _ = std::fs::remove_file(s);
    }
    let m = work.resync.len() as u64;
    let dt = inject(&mut env.a.ct, &work.resync).context("loading A's kernel for the resync")?;
    rep.nicsync_run_kernel_alone_entries_per_s = Some(rate(work.resync.len(), dt));
    ns_start_one(env, &p, 0, &["active", "active_attention"])?;
    wait_for("member A to load its kernel table", SETTLE_TIMEOUT, Duration::from_millis(50), || {
        Ok(ns_counters(&p.sock[0])?.0 >= m)
    })?;
    ns_start_one(env, &p, 1, &["standby"])?;
    ns_wait_converged(&p, m)?;
    // B's join was its first, cold Full Sync (conntrackd's B has a cold
    // resync of its own before the timed ones).
    rep.nicsync_resync_cold_daemon_ms = ns_syncstat(&p.sock[1])?["last_full_sync_ms"].as_f64();

    let r = ns_resync(&p, work, (period, stall), notes).context("resync without loss")?;
    rep.nicsync_resync_1m_ms = r.done_ms;
    rep.nicsync_resync_daemon_ms = r.daemon_ms;
    rep.nicsync_resync_verified = Some(r.verified);
    if r.done_ms.is_none() {
        notes.push(format!("resync without loss stalled at {:.1} %", r.fraction * 100.0));
    }

    if args.loss_percent > 0 {
        env.set_loss(args.loss_percent, &[NS_SYNC_PORT, NS_MEMBERSHIP_PORT], &[NS_FULL_SYNC_PORT])?;
        let r = ns_resync(&p, work, (period, stall), notes);
        let drops = env.loss_drops();
        env.clear_loss()?;
        let r = r.context("resync under loss")?;
        notes.push(format!("loss rules dropped {drops} sync packets during the resync under loss"));
        rep.nicsync_resync_complete_under_loss = Some(r.done_ms.is_some() && r.verified);
        rep.nicsync_resync_loss_ms = Some(r.done_ms.unwrap_or(r.elapsed_ms));
        rep.nicsync_resync_loss_fraction = Some(r.fraction);
    }
    Ok(())
}

/// Flushes B's table, requests a Full Sync of B, and times it until B has
/// completed a Full Sync and holds what A holds (the card's count and
/// running digest, from `syncstat`, equal to A's); then verifies with
/// `conn digest` walks of both tables and sampled keys.
fn ns_resync(
    p: &NsPaths,
    work: &Workload,
    (period, stall): (Duration, Duration),
    notes: &mut Vec<String>,
) -> Result<Resync> {
    let m = work.resync.len() as u64;
    let (sa, sb) = (&p.sock[0], &p.sock[1]);
    let (held_a, digest_a) = ns_counters(sa)?;
    if held_a != m {
        bail!("A holds {held_a} entries, not the {m} of its kernel");
    }
    let before = ns_syncstat(sb)?["full_syncs_completed"].as_u64().unwrap_or(0);
    ns_call(sb, &Request::ConnFlush).context("conn flush at B")?;
    let t0 = Instant::now();
    ns_call(sa, &Request::Resync { member: Some(2) }).context("resync 2")?;
    let mut last: (u64, u64, String, Instant) = (u64::MAX, 0, String::new(), t0);
    let mut r = Resync::default();
    let mut after = t0;
    loop {
        let s = Instant::now();
        let st = ns_syncstat(sb)?;
        let now = Instant::now();
        let done = st["full_syncs_completed"].as_u64().unwrap_or(0);
        let held = st["synced_entries"].as_u64().unwrap_or(0);
        let digest = st["table_digest"].as_str().unwrap_or("").to_owned();
        if done > before && held == m && digest == digest_a {
            r.done_ms = Some(ms((after + (now - after) / 2) - t0));
            r.elapsed_ms = ms(now - t0);
            r.daemon_ms = st["last_full_sync_ms"].as_f64();
            break;
        }
        after = s;
        if (held, done, &digest) != (last.0, last.1, &last.2) {
            last = (held, done, digest, now);
        } else if now - last.3 >= stall {
            r.elapsed_ms = ms(last.3 - t0);
            r.fraction = held as f64 / m as f64;
            if done > before && held == m {
                notes.push(format!(
                    "resync: B completed {} Full Sync(s) and holds {held} entries, but its digest {} is not A's {digest_a}",
                    done - before,
                    last.2
                ));
            }
            return Ok(r);
        }
        std::thread::sleep(period);
    }
    // Verify: table walks agree, A holds the M entries, sampled keys at B.
    let ((na, da), (nb, db)) = ns_digests(p)?;
    r.fraction = nb as f64 / m as f64;
    let mut missing = 0;
    let mut first_err = None;
    for k in &work.resync_keys_sample {
        if let Err(e) = ns_call(sb, &Request::ConnGet { key: k.to_string() }) {
            missing += 1;
            first_err.get_or_insert_with(|| format!("{e:#}"));
        }
    }
    r.verified = na == m && nb == m && da == db && missing == 0;
    if !r.verified {
        notes.push(format!(
            "resync check: A holds {na} (digest {da}), B holds {nb} (digest {db}), {missing} of {} sampled keys \
             missing at B{}",
            work.resync_keys_sample.len(),
            first_err.map(|e| format!(" (first: {e})")).unwrap_or_default()
        ));
    }
    Ok(r)
}

// ---------------------------------------------------------------------------
// Rendering

/// The report as text: both systems side by side, with ratios.
pub fn render(r: &CtBenchReport) -> String {
    let f = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"));
    let b = |v: Option<bool>| v.map_or_else(|| "-".to_owned(), |v| if v { "yes".into() } else { "NO".into() });
    let x = |v: Option<f64>| v.map_or_else(String::new, |v| format!("x{v:.2}"));
    let mut out = format!(
        "nicsync bench conntrack: {} entries live, {} single connections, resync of {} entries, {} % loss\n  \
         conntrackd {}, nicsync {}, kernel {}, {} CPUs, load average {:.2} at the start, {:.2} at the end\n  \
         both daemons at nice {}\n\n",
        r.entries,
        r.singles,
        r.resync_entries,
        r.loss_percent,
        r.conntrackd_version.as_deref().unwrap_or("(skipped)"),
        r.nicsync_version,
        r.kernel,
        r.cpus,
        r.load_average[0],
        r.load_average[1],
        r.daemon_nice
    );
    let _ = writeln!(out, "  {:<44} {:>14} {:>14} {:>9}", "", "conntrackd", "nicsync", "ratio");
    let mut row = |name: &str, c: String, n: String, ratio: String| {
        let _ = writeln!(out, "  {name:<44} {c:>14} {n:>14} {ratio:>9}");
    };
    row(
        "live replication (entries/s)",
        f(r.conntrackd_entries_per_s, 0),
        f(r.nicsync_entries_per_s, 0),
        x(r.entries_per_s_ratio),
    );
    row(
        "  kernel accepted them at (entries/s)",
        f(r.conntrackd_kernel_entries_per_s, 0),
        f(r.nicsync_kernel_entries_per_s, 0),
        String::new(),
    );
    row(
        "  peer lag at end of injection (ms)",
        f(r.conntrackd_lag_at_end_ms, 1),
        f(r.nicsync_lag_at_end_ms, 1),
        String::new(),
    );
    row(
        "  entries missing at end of injection",
        r.conntrackd_lag_entries_at_end.map_or("-".into(), |v| v.to_string()),
        r.nicsync_lag_entries_at_end.map_or("-".into(), |v| v.to_string()),
        String::new(),
    );
    row(
        "single new connection, median (us)",
        f(r.conntrackd_single_latency_us, 0),
        f(r.nicsync_single_latency_us, 0),
        x(r.single_latency_speedup),
    );
    row("  p90 (us)", f(r.conntrackd_single_latency_p90_us, 0), f(r.nicsync_single_latency_p90_us, 0), String::new());
    row(
        "  timed by polling the peer, median (us)",
        f(r.conntrackd_single_latency_us, 0),
        f(r.nicsync_single_latency_polled_us, 0),
        x(r.single_latency_speedup_polled),
    );
    row(
        "  one poll round trip, median (us)",
        f(r.conntrackd_poll_rtt_us, 0),
        f(r.nicsync_poll_rtt_us, 0),
        String::new(),
    );
    row(
        "  A's kernel create alone, median (us)",
        f(r.conntrackd_single_create_us, 0),
        f(r.nicsync_single_create_us, 0),
        String::new(),
    );
    row(
        &format!("full resync of {} entries (ms)", r.resync_entries),
        f(r.conntrackd_resync_1m_ms, 0),
        f(r.nicsync_resync_1m_ms, 0),
        x(r.resync_speedup),
    );
    row(
        "  first, cold resync (ms; nicsync: the daemon's own timing)",
        f(r.conntrackd_resync_cold_ms, 0),
        f(r.nicsync_resync_cold_daemon_ms, 0),
        String::new(),
    );
    row(
        "  every entry at the peer, verified",
        b(r.conntrackd_resync_verified),
        b(r.nicsync_resync_verified),
        String::new(),
    );
    row(
        &format!("resync under {} % loss: complete", r.loss_percent),
        b(r.conntrackd_resync_complete_under_loss),
        b(r.nicsync_resync_complete_under_loss),
        String::new(),
    );
    row(
        "  fraction reached (%)",
        f(r.conntrackd_resync_loss_fraction.map(|v| v * 100.0), 1),
        f(r.nicsync_resync_loss_fraction.map(|v| v * 100.0), 1),
        String::new(),
    );
    row(
        "  duration (ms; to the stall if incomplete)",
        f(r.conntrackd_resync_loss_ms, 0),
        f(r.nicsync_resync_loss_ms, 0),
        String::new(),
    );
    let _ = writeln!(
        out,
        "\n  ratio: how many times better nicsync did than conntrackd (below 1: worse); live replication's is the \
         ratio of the rates at which A's kernel took the entries (each system kept pace with it)"
    );
    if let Some([lo, hi]) = r.conntrackd_single_latency_bounds_us {
        let _ =
            writeln!(out, "  conntrackd's single-connection brackets: median lower bound {lo:.0} us, upper {hi:.0} us");
    }
    for (n, e) in [("conntrackd", &r.conntrackd_error), ("nicsync", &r.nicsync_error)] {
        if let Some(e) = e {
            let _ = writeln!(out, "  {n} FAILED: {e}");
        }
    }
    for n in &r.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_polls_tighten_the_periodic_bracket() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        // The periodic poller missed at 0 and saw all N at 600 µs; the end
        // polls missed at 100 and saw it at 180: the arrival lies in
        // 100..180.
        let seen = Seen { after: at(0), before: at(600), count: 10 };
        let end = EndPolls { first: 7, last_miss: Some(at(100)), first_hit: Some(at(180)) };
        let b = end.bracket(&seen);
        assert_eq!((b.after, b.before), (at(100), at(180)));
        assert_eq!(b.mid(), at(140));
        // The first end poll already saw all N: its answer bounds the
        // arrival from above, and nothing new bounds it from below (it may
        // well have come before the injection ended).
        let end = EndPolls { first: 10, last_miss: None, first_hit: Some(at(50)) };
        let b = end.bracket(&seen);
        assert_eq!((b.after, b.before), (at(0), at(50)));
        // The window ran out before the end polls saw it: their last miss
        // still raises the lower bound, the periodic poller's answer stays
        // the upper one.
        let end = EndPolls { first: 3, last_miss: Some(at(400)), first_hit: None };
        let b = end.bracket(&seen);
        assert_eq!((b.after, b.before), (at(400), at(600)));
    }

    #[test]
    fn conntrackd_stats_count() {
        let text =
            "cache internal:\ncurrent active connections:\t          12\nconnections created:\t\t  3\tfailed:\t 0\n\n\
                    cache external:\ncurrent active connections:\t       99871\nconnections created:\t\t 1\n";
        assert_eq!(parse_ctd_count(text, "internal"), Some(12));
        assert_eq!(parse_ctd_count(text, "external"), Some(99871));
        assert_eq!(parse_ctd_count("garbage", "external"), None);
    }

    #[test]
    fn conntrackd_dump_tuples() {
        let text = "tcp      6 ESTABLISHED src=100.64.0.2 dst=198.51.100.1 sport=20000 dport=443 [ASSURED] mark=0 \
                    [active since 1s]\n\
                    tcp      6 ESTABLISHED src=100.64.0.3 dst=198.51.100.1 sport=20000 dport=443 src=198.51.100.1 \
                    dst=100.64.0.3 sport=443 dport=20000 [ASSURED] mark=0\n";
        let (set, lines) = parse_ctd_dump(text);
        assert_eq!(lines, 2);
        assert!(set.contains(&(Ipv4Addr::new(100, 64, 0, 2), 20000, Ipv4Addr::new(198, 51, 100, 1), 443)));
        assert!(set.contains(&(Ipv4Addr::new(100, 64, 0, 3), 20000, Ipv4Addr::new(198, 51, 100, 1), 443)));
    }

    #[test]
    fn workload_tuples_are_distinct_and_match_keys() {
        let n = 200_000;
        let set: HashSet<Tuple4> = (0..n).map(|i| tuple4(i, LIVE_DST)).collect();
        assert_eq!(set.len(), n as usize);
        for i in [0, 59_999, 60_000, 199_999] {
            let k = key(i, LIVE_DST);
            let t = tuple4(i, LIVE_DST);
            assert_eq!(k.to_string(), format!("tcp {}:{} -> {}:{}", t.0, t.1, t.2, t.3));
        }
    }

    #[test]
    fn ruleset_tracks_and_has_a_loss_chain() {
        let r = nft_ruleset();
        assert!(r.contains("ct state established,related accept"));
        assert!(r.contains("chain loss"));
    }
}
