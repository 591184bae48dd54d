//! The `nicsync` command.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nicsync::bench::{self, BenchOptions};
use nicsync::control::Request;
use nicsync::demo::{self, DemoOptions};
use nicsync::device::{self, EmulatedOptions};
use nicsync::{ConnTable, DriverConfig};
use nicsync_vfio::DeviceSpec;

/// nicsync: a firewall connection table resident on the NIC, kept identical
/// across cluster members. Runs on the embedded emulated device by default.
#[derive(Parser, Debug)]
#[command(name = "nicsync", version, long_about = None)]
struct Cli {
    /// Control socket of the daemon to talk to (state, syncstat, resync,
    /// conn, key reload) [default: /run/nicsync/nicsync.sock]. A daemon's
    /// own is its configuration's `control.socket`.
    #[arg(long, global = true)]
    socket: Option<std::path::PathBuf>,
    /// Seconds to wait for the daemon's answer (a health check wants a
    /// few; a hung daemon is reported, not waited on for ever).
    #[arg(long, global = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    answer_timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Drive a realistic churn of connections through the rings and print
    /// what happened and the latency percentiles.
    Demo(DemoArgs),
    /// Deterministic simulation of a cluster under faults; a failing seed
    /// replays exactly with --seed.
    Sim(SimArgs),
    /// Fault campaign: simulated clusters under churn with device faults,
    /// network faults, attacks and crashes, checked for lost connections and
    /// diverged members at the end (exits non-zero if any).
    Chaos(ChaosArgs),
    /// Run one cluster member (see docs/config.md).
    Daemon {
        /// The member's TOML configuration.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Check the configuration (and the key file) and print it with
        /// every key explicit, then exit: 0 if it would start.
        #[arg(long)]
        check: bool,
    },
    /// Members, their states and this member's role (like `cphaprob state`).
    State {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Sync statistics (like `cphaprob syncstat`).
    Syncstat {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Manual Full Sync of one member, or of every member but the one the
    /// others sync from.
    Resync {
        /// The member to resync (default: all).
        member: Option<u16>,
    },
    /// The daemon's connection table.
    Conn {
        #[command(subcommand)]
        which: ConnCommand,
    },
    /// The cluster key file that seals sync traffic (docs/security.md):
    /// create, rotate in three steps (add, use, retire), reload a daemon.
    Key {
        #[command(subcommand)]
        which: KeyCommand,
    },
    /// N members in this process on emulated devices: churn, a member
    /// killed and rejoined, and whether the digests converged.
    Cluster(ClusterArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Device: "emulated" (default) or a PCI address bound to vfio-pci.
    #[arg(long, default_value = "emulated")]
    device: DeviceSpec,
    /// Single table operations to perform.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    operations: u64,
    /// Most connections alive at once.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=4_000_000))]
    max_live: u32,
    /// Workload seed.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key file (mode 0600) with one random key, id 1, sending.
    Gen {
        /// The file to create.
        file: std::path::PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Rotation step 1: add a new random key that opens but does not seal
    /// yet; copy the file to every member and reload each.
    Add {
        /// The key file.
        file: std::path::PathBuf,
    },
    /// Rotation step 2: seal with key ID (on every member, then reload).
    Use {
        /// The key file.
        file: std::path::PathBuf,
        /// The key id.
        id: u8,
    },
    /// Rotation step 3: remove key ID (on every member, then reload).
    Retire {
        /// The key file.
        file: std::path::PathBuf,
        /// The key id.
        id: u8,
    },
    /// Key ids, which one seals, and fingerprints (never the keys).
    Show {
        /// The key file.
        file: std::path::PathBuf,
    },
    /// Make the daemon (--socket) read its key file again.
    Reload,
}

#[derive(Subcommand, Debug)]
enum ConnCommand {
    /// Entries marked for sync.
    List {
        /// JSON array.
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One entry, e.g. `nicsync conn get "tcp 10.0.0.1:40000 -> 192.0.2.1:443"`.
    Get {
        /// "PROTO SRC:PORT -> DST:PORT [zone N]", as `conn list` prints it
        /// (e.g. "tcp 10.0.0.1:40000 -> 192.0.2.1:443"; IPv6 addresses in
        /// brackets; ICMP echo: "icmp SRC:0 -> DST:ID", the echo identifier
        /// in the destination port).
        key: String,
        /// One JSON object (what it always prints; taken for symmetry with
        /// the other commands).
        #[arg(long)]
        json: bool,
    },
    /// Insert or update an entry (marked for sync unless --no-sync).
    Add {
        /// "PROTO SRC:PORT -> DST:PORT [zone N]", as `conn list` prints it
        /// (e.g. "tcp 10.0.0.1:40000 -> 192.0.2.1:443"; IPv6 addresses in
        /// brackets; ICMP echo: "icmp SRC:0 -> DST:ID", the echo identifier
        /// in the destination port).
        key: String,
        /// TCP state (established, syn_sent, fin_wait, …) [default:
        /// established for TCP, none for other protocols].
        #[arg(long)]
        state: Option<String>,
        /// Seconds until it ages (0: never).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// Firewall mark.
        #[arg(long, default_value_t = 0)]
        mark: u32,
        /// Keep it local to this member.
        #[arg(long)]
        no_sync: bool,
    },
    /// Delete an entry.
    Del {
        /// "PROTO SRC:PORT -> DST:PORT [zone N]", as `conn list` prints it
        /// (e.g. "tcp 10.0.0.1:40000 -> 192.0.2.1:443"; IPv6 addresses in
        /// brackets; ICMP echo: "icmp SRC:0 -> DST:ID", the echo identifier
        /// in the destination port).
        key: String,
    },
    /// Count and order-independent digest of the synced entries (equal on
    /// converged members).
    Digest {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Wait until an entry is on this member's card (at once if it is, else
    /// when a peer's update puts it there); prints when the host saw it
    /// (CLOCK_MONOTONIC ns).
    Wait {
        /// "PROTO SRC:PORT -> DST:PORT [zone N]", as `conn list` prints it
        /// (e.g. "tcp 10.0.0.1:40000 -> 192.0.2.1:443"; IPv6 addresses in
        /// brackets; ICMP echo: "icmp SRC:0 -> DST:ID", the echo identifier
        /// in the destination port).
        key: String,
        /// Give up after this many milliseconds (at most 60000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=nicsync::control::MAX_WAIT_MS))]
        timeout_ms: u64,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove every entry from this member's card only (nothing is sent to
    /// the peers); `nicsync resync` then pulls the cluster's table again.
    Flush,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// Members.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=8))]
    members: u16,
    /// Seconds of churn.
    #[arg(long, default_value_t = 3.0, value_parser = parse_seconds, allow_hyphen_values = true)]
    seconds: f64,
    /// New connections per second at the Active member (each lives about
    /// a second).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    conn_rate: u32,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SimArgs {
    /// Seeds to run (0, 1, …, N-1; --first shifts them).
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Run this one seed only (and print its report).
    #[arg(long)]
    seed: Option<u64>,
    /// Members (at least 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(3..=16))]
    members: u16,
    /// Load-sharing mode instead of high availability.
    #[arg(long)]
    load_sharing: bool,
    /// Virtual milliseconds of churn and faults per run.
    #[arg(long, default_value_t = 1000)]
    churn_ms: u64,
    /// Device faults on every member's card (as `nicsync chaos`).
    #[arg(long)]
    device_faults: bool,
    /// An attacker on the sync network (as `nicsync chaos`).
    #[arg(long)]
    attacks: bool,
    /// Run the sync traffic in clear.
    #[arg(long)]
    plain: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ChaosArgs {
    /// Wall-clock seconds: simulated cluster runs start until they are spent.
    #[arg(long, default_value_t = 60.0, value_parser = parse_seconds, allow_hyphen_values = true)]
    seconds: f64,
    /// Seed of the first run.
    #[arg(long, default_value_t = 0xC4A05)]
    seed: u64,
    /// Virtual milliseconds of churn and faults per run.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    churn_ms: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// nicsync beside netfilter's conntrackd on one workload, in two network
    /// namespaces (needs root; docs/conntrack.md).
    Conntrack(nicsync::bench_ct::CtBenchArgs),
    /// Full Sync, Delta Sync latency and throughput, and failover.
    Sync {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Connections in the Full Sync.
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=8_000_000))]
        conns: u64,
        /// Latency samples per wire.
        #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
        samples: u64,
        /// Seconds of sustained churn (three repetitions; the median is
        /// reported).
        #[arg(long, default_value_t = 3.0, value_parser = parse_seconds, allow_hyphen_values = true)]
        seconds: f64,
        /// Failovers measured.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        failovers: u64,
    },
    /// Ring round trip and throughput against this machine's floor.
    Ring {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Samples per latency run; updates per throughput repetition are
        /// five times this.
        #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1_000..=100_000_000))]
        updates: u64,
        /// Throughput repetitions (the median is reported).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        repetitions: u64,
        /// Skip the one-million-entry table run.
        #[arg(long)]
        no_million: bool,
        /// Connections the throughput run cycles through.
        #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        working_set: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The simulator and the fault campaign inject faults by the thousand,
    // and the members warn of each as they would of a real one: by default
    // they say only errors; their reports tell what happened.
    // A daemon logs what an operator looks for after the fact (state
    // changes, failovers, Full Syncs, takeover commits, stops) at info, as
    // keepalived and conntrackd do; a command run by hand only warns.
    // `cluster` runs its members in one process on a machine it shares
    // with their device threads: their warnings of loop stalls are the
    // machine's, and its report says whether the members converged.
    let default_level = match cli.command {
        Command::Sim(_) | Command::Chaos(_) | Command::Cluster(_) => "error",
        Command::Daemon { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NICSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in a file, nor in the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nicsync: error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once (a cause whose text its
/// parent's message already includes is not repeated).
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The daemon the command talks to: its control socket, and how long its
/// answer is waited for.
struct Ctl {
    path: std::path::PathBuf,
    timeout: std::time::Duration,
}

fn control(ctl: &Ctl, req: &Request) -> anyhow::Result<serde_json::Value> {
    // A wait answers when its time is up: give the daemon that and more.
    let wait_ms = match req {
        Request::ConnWait { timeout_ms, .. } => *timeout_ms,
        _ => 0,
    };
    let timeout = ctl.timeout + std::time::Duration::from_millis(wait_ms);
    Ok(nicsync::control::call(&ctl.path, req, timeout)?)
}

fn render_state(v: &serde_json::Value) -> String {
    let mut out = format!(
        "cluster {} ({}), member {}: {}{}{}\n",
        v["cluster_id"],
        v["mode"].as_str().unwrap_or("?"),
        v["member_id"],
        v["state"].as_str().unwrap_or("?").to_uppercase().replace('_', " "),
        if v["full_sync_in_progress"].as_bool() == Some(true) { " (full sync in progress)" } else { "" },
        if v["stopping"].as_bool() == Some(true) { " (stopping)" } else { "" }
    );
    out.push_str("  ID  STATE              ALIVE  LAST HEARD\n");
    for m in v["members"].as_array().into_iter().flatten() {
        let heard = match m["last_heard_ms_ago"].as_f64() {
            Some(ms) => format!("{ms:.1} ms ago"),
            None if m["local"].as_bool() == Some(true) => "(this member)".into(),
            None => "never".into(),
        };
        out.push_str(&format!(
            "  {:<3} {:<18} {:<6} {}\n",
            m["id"].to_string(),
            m["state"].as_str().unwrap_or("?").to_uppercase().replace('_', " "),
            if m["alive"].as_bool() == Some(true) { "yes" } else { "no" },
            heard
        ));
    }
    out
}

fn render_flat(v: &serde_json::Value, prefix: &str) -> String {
    let mut out = String::new();
    if let Some(o) = v.as_object() {
        for (k, x) in o {
            if x.is_object() {
                out.push_str(&render_flat(x, &format!("{prefix}{k}.")));
            } else {
                out.push_str(&format!("{prefix}{k:<28} {x}\n"));
            }
        }
    }
    out
}

fn run_conn(socket: &Ctl, which: ConnCommand) -> anyhow::Result<()> {
    match which {
        ConnCommand::List { json, limit } => {
            let v = control(socket, &Request::ConnList { limit })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in v.as_array().into_iter().flatten() {
                    // "  nat source 203.0.113.1:40000", as `conntrack -L`
                    // users look for it.
                    let nat = match &e["nat"] {
                        serde_json::Value::Object(n) => {
                            let addr = n.get("addr").and_then(serde_json::Value::as_str).unwrap_or("?");
                            // An IPv6 address in brackets, as in keys.
                            let addr = if addr.contains(':') { format!("[{addr}]") } else { addr.to_string() };
                            format!(
                                "  nat {} {addr}:{}",
                                n.get("kind").and_then(serde_json::Value::as_str).unwrap_or("?"),
                                n.get("port").unwrap_or(&serde_json::Value::Null)
                            )
                        }
                        _ => String::new(),
                    };
                    println!(
                        "{}  {}  mark {}  gen {}  owner {}  timeout {}s{nat}",
                        e["key"].as_str().unwrap_or("?"),
                        e["tcp_state"].as_str().unwrap_or("-"),
                        e["mark"],
                        e["generation"],
                        e["owner"],
                        e["timeout_s"]
                    );
                }
            }
        }
        ConnCommand::Get { key, json: _ } => {
            println!("{}", serde_json::to_string_pretty(&control(socket, &Request::ConnGet { key })?)?)
        }
        ConnCommand::Add { key, state, timeout, mark, no_sync } => {
            let req = Request::ConnAdd { key, tcp_state: state, timeout_s: timeout, mark, sync: !no_sync };
            let v = control(socket, &req)?;
            println!("{} (generation {})", v["key"].as_str().unwrap_or("?"), v["generation"]);
        }
        ConnCommand::Del { key } => {
            let v = control(socket, &Request::ConnDel { key })?;
            println!("deleted {}", v["deleted"].as_str().unwrap_or("?"));
        }
        ConnCommand::Digest { json } => {
            let v = control(socket, &Request::ConnDigest)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{} entries, digest {}", v["entries"], v["digest"].as_str().unwrap_or("?"));
            }
        }
        ConnCommand::Wait { key, timeout_ms, json } => {
            let v = control(socket, &Request::ConnWait { key, timeout_ms })?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{} seen at {} ns (CLOCK_MONOTONIC)",
                    v["key"].as_str().unwrap_or("?"),
                    v["seen_monotonic_ns"]
                );
            }
        }
        ConnCommand::Flush => {
            let v = control(socket, &Request::ConnFlush)?;
            println!("flushed {} entries from this member's card", v["flushed"]);
        }
    }
    Ok(())
}

/// The longest run a `--seconds` asks for: a day.
const MAX_SECONDS: f64 = 86_400.0;

/// A `--seconds` value: a number of seconds from 0 to [`MAX_SECONDS`].
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.0..=MAX_SECONDS).contains(&v) {
        return Err(format!("{s} is not between 0 and {MAX_SECONDS} seconds"));
    }
    Ok(v)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = Ctl {
        path: cli.socket.clone().unwrap_or_else(|| nicsync::config::DEFAULT_CONTROL_SOCKET.into()),
        timeout: std::time::Duration::from_secs(cli.answer_timeout),
    };
    match cli.command {
        Command::Demo(a) => run_demo(a),
        Command::Sim(a) => run_sim(a),
        Command::Chaos(a) => {
            let o = nicsync::chaos::ChaosOptions { seconds: a.seconds, seed: a.seed, churn_ms: a.churn_ms };
            let r = nicsync::chaos::run(&o);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", nicsync::chaos::render(&r));
            }
            if !r.passed() {
                anyhow::bail!(
                    "chaos: {} lost connections, {} diverged members, {} failed runs",
                    r.lost_connections,
                    r.diverged_members,
                    r.failed_runs.len()
                );
            }
            Ok(())
        }
        Command::Daemon { config, check } => {
            if let Some(s) = &cli.socket {
                anyhow::bail!(
                    "--socket {} names a daemon to talk to; a daemon's own control socket is its configuration's \
                     control.socket (see docs/config.md)",
                    s.display()
                );
            }
            let cfg = nicsync::config::Config::load(&config)?;
            if check {
                let verdict = nicsync::member::check_config(&cfg)?;
                print!("{}", cfg.to_toml());
                eprintln!("{}: {verdict}", config.display());
                return Ok(());
            }
            nicsync::member::run_daemon(&cfg)
        }
        Command::State { json } => {
            let v = control(&socket, &Request::State)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_state(&v));
            }
            Ok(())
        }
        Command::Syncstat { json } => {
            let v = control(&socket, &Request::Syncstat)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_flat(&v, ""));
            }
            Ok(())
        }
        Command::Resync { member } => {
            let v = control(&socket, &Request::Resync { member })?;
            println!("resync requested: {}", v["requested"].as_str().unwrap_or("?"));
            if let Some(note) = v["note"].as_str() {
                println!("  {note}");
            }
            Ok(())
        }
        Command::Conn { which } => run_conn(&socket, which),
        Command::Key { which } => run_key(&socket, which),
        Command::Cluster(a) => {
            let opts =
                nicsync::cluster::ClusterOptions { members: a.members, seconds: a.seconds, conn_rate: a.conn_rate };
            let r = nicsync::cluster::run(&opts)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", nicsync::cluster::render(&r));
            }
            if !r.converged {
                anyhow::bail!("the members' digests did not converge");
            }
            Ok(())
        }
        Command::Bench { which: BenchCommand::Sync { json, conns, samples, seconds, failovers } } => {
            let o = nicsync::bench_sync::SyncBenchOptions {
                conns,
                samples: samples as usize,
                sustain_seconds: seconds,
                failovers: failovers as usize,
            };
            let r = nicsync::bench_sync::run(&o)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", nicsync::bench_sync::render(&r));
            }
            Ok(())
        }
        Command::Bench { which: BenchCommand::Conntrack(a) } => nicsync::bench_ct::main(&a),
        Command::Bench { which: BenchCommand::Ring { json, updates, repetitions, no_million, working_set } } => {
            let opts = BenchOptions { updates, repetitions: repetitions as usize, million: !no_million, working_set };
            let r = bench::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", bench::render(&r));
            }
            Ok(())
        }
    }
}

fn run_key(socket: &Ctl, which: KeyCommand) -> anyhow::Result<()> {
    use nicsync_seal::KeyFile;
    let show = |f: &KeyFile, path: &std::path::Path| -> anyhow::Result<()> {
        let ring = f.keyring(path)?;
        for k in ring.keys() {
            let role = if k.id() == f.send { "seals and opens" } else { "opens" };
            println!("key {:>3}  fingerprint {}  {role}", k.id(), k.fingerprint());
        }
        Ok(())
    };
    match which {
        KeyCommand::Gen { file, force } => {
            if file.exists() && !force {
                anyhow::bail!(
                    "{} exists; pass --force to replace it (every member must then get the new file)",
                    file.display()
                );
            }
            let f = KeyFile::generate()?;
            f.write(&file)?;
            println!("wrote {} (mode 0600); copy it to every member of the cluster", file.display());
            show(&f, &file)
        }
        KeyCommand::Add { file } => {
            let mut f = KeyFile::read(&file)?;
            let id = f.add_key()?;
            f.write(&file)?;
            println!("added key {id} (opens only); copy {} to every member, run `nicsync key reload` on each, then `nicsync key use {} {id}`", file.display(), file.display());
            show(&f, &file)
        }
        KeyCommand::Use { file, id } => {
            let mut f = KeyFile::read(&file)?;
            f.use_key(id)?;
            f.write(&file)?;
            println!("key {id} now seals; do the same on every member and reload each");
            show(&f, &file)
        }
        KeyCommand::Retire { file, id } => {
            let mut f = KeyFile::read(&file)?;
            f.retire(id)?;
            f.write(&file)?;
            println!("key {id} removed; do the same on every member and reload each");
            show(&f, &file)
        }
        KeyCommand::Show { file } => {
            let f = KeyFile::read(&file)?;
            show(&f, &file)
        }
        KeyCommand::Reload => {
            let v = control(socket, &Request::ReloadKeys)?;
            println!("keys reloaded: key {} seals, {} key(s) open", v["send_key"], v["keys_accepted"]);
            Ok(())
        }
    }
}

fn run_demo(a: DemoArgs) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let emu = EmulatedOptions { cpu: (cpus >= 2).then_some(1), ..Default::default() };
    let dev = device::open(&a.device, &emu)?;
    if !a.json {
        println!("nicsync demo on {}", nicsync_vfio::NicDevice::describe(&dev));
    }
    let cfg = DriverConfig {
        table_capacity: a.max_live.saturating_mul(2).max(1 << 16),
        aging_period_ms: 200,
        ..Default::default()
    };
    let mut table = ConnTable::open(dev, cfg)?;
    let opts =
        DemoOptions { operations: a.operations, max_live: a.max_live as usize, seed: a.seed, ..Default::default() };
    let rep = demo::run(&mut table, &opts, || {})?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", demo::render(&rep, &table));
    }
    demo::check(&rep)?;
    Ok(())
}

fn run_sim(a: SimArgs) -> anyhow::Result<()> {
    let seeds: Vec<u64> = match a.seed {
        Some(s) => vec![s],
        None => (a.first..a.first.saturating_add(a.seeds)).collect(),
    };
    let mode = if a.load_sharing {
        nicsync::membership::Mode::LoadSharing
    } else {
        nicsync::membership::Mode::HighAvailability
    };
    let mut failed = Vec::new();
    let mut reports = Vec::new();
    let started = std::time::Instant::now();
    for s in &seeds {
        let mut cfg = nicsync::sim::SimConfig::new(*s);
        cfg.members = a.members;
        cfg.mode = mode;
        cfg.churn_ms = a.churn_ms;
        cfg.device_faults = a.device_faults;
        cfg.attacks = a.attacks;
        cfg.sealed = !a.plain;
        if cfg.attacks && !cfg.sealed {
            anyhow::bail!(
                "--attacks needs sealed traffic (drop --plain): in clear, forged frames are accepted by design"
            );
        }
        let r = nicsync::sim::run(&cfg);
        if !r.converged {
            if !a.json {
                eprintln!("seed {s}: FAILED: {}", r.failure.as_deref().unwrap_or("?"));
            }
            failed.push(*s);
        }
        reports.push(r);
    }
    let converged = seeds.len() - failed.len();
    // Orderly stops (one per seed with faults): how many, what their drains
    // left unacknowledged, and the longest handover of an Active's.
    let stops: u64 = reports.iter().map(|r| r.orderly_stops).sum();
    let stop_unacked: u64 = reports.iter().map(|r| r.stop_unacked).sum();
    let handover = reports.iter().flat_map(|r| r.stop_handovers_ms.iter().copied()).fold(0.0, f64::max);
    if a.json {
        let longest = reports.iter().map(|r| r.longest_two_actives_ms).fold(0.0, f64::max);
        let mut out = serde_json::json!({
            "seeds": seeds.len(),
            "converged": converged,
            "failed_seeds": failed,
            "longest_two_actives_ms": longest,
            "orderly_stops": stops,
            "orderly_stop_unacked_updates": stop_unacked,
            "longest_orderly_stop_handover_ms": handover,
        });
        if a.seed.is_some() {
            out["report"] = serde_json::to_value(&reports[0])?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if a.seed.is_some() {
            println!("{}", serde_json::to_string_pretty(&reports[0])?);
        }
        let acked: u64 = reports.iter().map(|r| r.writes_acked).sum();
        let syncs: u64 = reports.iter().map(|r| r.full_syncs).sum();
        let longest = reports.iter().map(|r| r.longest_two_actives_ms).fold(0.0, f64::max);
        println!(
            "{} seeds, {} converged, {} failed {:?}; {} acknowledged writes checked, {} full syncs, \
             two Actives at once for {:.1} ms at the longest; {} orderly stops ({} updates unacknowledged, \
             an Active's handover {:.1} ms at the longest), {:.1} s",
            seeds.len(),
            converged,
            failed.len(),
            failed,
            acked,
            syncs,
            longest,
            stops,
            stop_unacked,
            handover,
            started.elapsed().as_secs_f64()
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} of {} seeds did not converge (replay one with --seed S)", failed.len(), seeds.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The forms the README and the docs show parse (a global option that
    /// shared its name with `conn add --timeout` made every `conn add`
    /// panic while its arguments were read).
    #[test]
    fn the_documented_forms_parse() {
        let key = "tcp 10.0.0.1:40000 -> 192.0.2.1:443";
        let forms: [&[&str]; 8] = [
            &["nicsync", "--socket", "/tmp/s.sock", "conn", "add", key],
            &["nicsync", "conn", "add", key, "--timeout", "30", "--mark", "7", "--no-sync"],
            &["nicsync", "--answer-timeout", "2", "--socket", "/tmp/s.sock", "state", "--json"],
            &["nicsync", "conn", "wait", key, "--timeout-ms", "500"],
            &["nicsync", "syncstat", "--json"],
            &["nicsync", "resync", "3"],
            &["nicsync", "daemon", "--config", "m1.toml", "--check"],
            &["nicsync", "key", "show", "/etc/nicsync/cluster.key"],
        ];
        for args in forms {
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{args:?}: {e}");
            }
        }
        let cli = Cli::try_parse_from(["nicsync", "conn", "add", key, "--timeout", "45"]).expect("parses");
        assert_eq!(cli.answer_timeout, 30, "the default answer timeout, whatever the entry's");
        let Command::Conn { which: ConnCommand::Add { timeout, .. } } = cli.command else { panic!("not conn add") };
        assert_eq!(timeout, 45);
    }
}
