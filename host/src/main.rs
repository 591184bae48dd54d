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
