//! The `nicsync` command.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nicsync::bench::{self, BenchOptions};
use nicsync::demo::{self, DemoOptions};
use nicsync::device::{self, EmulatedOptions};
use nicsync::{ConnTable, DriverConfig};
use nicsync_vfio::DeviceSpec;

/// nicsync: a firewall connection table resident on the NIC, kept identical
/// across cluster members. Runs on the embedded emulated device by default.
#[derive(Parser, Debug)]
#[command(name = "nicsync", version, about, long_about = None)]
struct Cli {
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
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NICSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nicsync: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => run_demo(a),
        Command::Sim(a) => run_sim(a),
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
    if a.json {
        let mut out = serde_json::json!({"seeds": seeds.len(), "converged": converged, "failed_seeds": failed});
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
        println!(
            "{} seeds, {} converged, {} failed {:?}; {} acknowledged writes checked, {} full syncs, {:.1} s",
            seeds.len(),
            converged,
            failed.len(),
            failed,
            acked,
            syncs,
            started.elapsed().as_secs_f64()
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} of {} seeds did not converge (replay one with --seed S)", failed.len(), seeds.len())
    }
}
