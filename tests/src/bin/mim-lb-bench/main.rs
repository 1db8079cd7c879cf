//! `cargo xtask bench`: what mim-lb costs and how fast it reacts, each number next to a
//! baseline measured in the same run.
//!
//! - per-packet: the real XDP program under BPF_PROG_TEST_RUN against a floor program (and
//!   reference variants), every path proven by the program's counters;
//! - rebuild: the control plane's Maglev build and table write, and a one-master health flip;
//! - batch: the control plane's batched map reads and writes (a full-size connection table, a
//!   Maglev region, a failover's writes) against one syscall per element;
//! - memory: the kernel memory of every map at the defaults, sized from the configuration,
//!   next to the old fixed sizes loaded in the same run;
//! - failover: the real daemon in the namespace lab, a master killed under a stream of new
//!   connections, and restarted;
//! - directors: two directors with flow sync and keepalived: the active one killed under
//!   traffic, the sync's lag, and its traffic and CPU per new flow;
//! - sync-scale: 3, 4 and 6 directors, the sync traffic of a known load of new flows with
//!   changes sent to each peer (the baseline) and to a multicast group;
//! - ecmp: three directors behind a BIRD router: convergence after a director loss against the
//!   configured detection time (BFD, hold time), and new connections per second through 1, 2
//!   and 3 of them;
//! - e2e (only when asked for, `--only e2e`): short connections and 1 MiB answers through
//!   mim-lb (native and generic XDP), HAProxy, nftables netdev forwarding and no director, in
//!   interleaved rounds on one lab.
//!
//! Benchmarks report; they never fail on a timing. They fail only when a measurement cannot
//! be trusted (a run took another path than the one it claims to measure) or cannot be made.
//! Everything they create (labs, daemons, pins) is removed on the way out, also on error or
//! Ctrl-C.

mod batch;
mod counting;
mod directors;
mod e2e;
mod ecmp;
mod failover;
mod interrupt;
mod memory;
mod per_packet;
mod rebuild;
mod report;
mod sync_scale;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bench {
    PerPacket,
    Rebuild,
    Batch,
    Failover,
    Directors,
    Counting,
    Memory,
    E2e,
    SyncScale,
    Ecmp,
}

#[derive(Parser)]
#[command(about = "mim-lb benchmarks: per-packet cost, table rebuild, batched map access, failover time, two directors, end to end")]
struct Args {
    /// Which benchmarks to run (comma-separated). `e2e` runs only when named: it takes
    /// minutes and measures other software (HAProxy, nftables) next to mim-lb.
    #[arg(long, value_delimiter = ',', default_values = ["per-packet", "rebuild", "batch", "counting", "memory", "failover", "directors", "sync-scale", "ecmp"])]
    only: Vec<Bench>,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the report as Markdown to this file.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,

    /// Program runs per per-packet measurement (BPF_PROG_TEST_RUN repeat).
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
    /// Measurements (rounds) per per-packet case; medians are reported.
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Distinct new flows measured one run each.
    #[arg(long, default_value_t = 20_000)]
    new_flows: u32,
    /// Turn the kernel's BPF run-time statistics on while measuring per-packet cost (what
    /// `kernel.bpf_stats_enabled=1` or a profiler does: two clock reads per program run), to
    /// compare with numbers taken that way. Off by default: it is not how packets are served.
    #[arg(long)]
    bpf_stats: bool,
    /// Save `bpftool prog dump xlated ... linum` of every measured program in this directory.
    #[arg(long, value_name = "DIR")]
    dump_xlated: Option<PathBuf>,
    /// The XDP object of an earlier commit, measured next to the current program (`cargo xtask
    /// bench` builds issue 7's baseline and sets this).
    #[arg(long, value_name = "FILE", env = "MIM_LB_BENCH_BASELINE")]
    baseline: Option<PathBuf>,
    /// The commit the baseline object was built from, for the report.
    #[arg(long, value_name = "COMMIT", env = "MIM_LB_BENCH_BASELINE_COMMIT", default_value = "the baseline")]
    baseline_commit: String,
    /// Also compare the current XDP program with this earlier build of it (an object built from
    /// another commit) on the paths every version shares: what a change costs per packet.
    #[arg(long, value_name = "FILE")]
    previous: Option<PathBuf>,
    /// The commit the --previous object was built from, for the report.
    #[arg(long, value_name = "COMMIT", default_value = "the previous commit")]
    previous_commit: String,
    /// Why there is no baseline object (`cargo xtask bench` sets this when building it failed).
    #[arg(long, value_name = "REASON", env = "MIM_LB_BENCH_BASELINE_MISSING")]
    baseline_missing: Option<String>,

    /// Backends in the table-rebuild measurement.
    #[arg(long, default_value_t = 1000)]
    rebuild_backends: u32,
    /// Repetitions of each rebuild measurement.
    #[arg(long, default_value_t = 5)]
    rebuild_runs: usize,
    /// Recorded flows in the sweep measurement (at most the test flow table's 65,536).
    #[arg(long, default_value_t = 50_000)]
    sweep_flows: u32,

    /// Flows written into the default-size (1M-entry) connection table for the batch read
    /// measurement.
    #[arg(long, default_value_t = 1_000_000)]
    batch_flows: u32,
    /// Rounds of the connection-table read, each reading it batched and one flow at a time
    /// (the latter takes a second or more per million flows).
    #[arg(long, default_value_t = 3)]
    batch_flow_runs: usize,
    /// Rounds of each batched-vs-per-element Maglev measurement.
    #[arg(long, default_value_t = 9)]
    batch_runs: usize,

    /// Flows in the connection table read while the counting benchmark measures packets.
    #[arg(long, default_value_t = 1_000_000)]
    counting_flows: u32,
    /// Interleaved rounds (quiet, table read meanwhile) of the counting benchmark.
    #[arg(long, default_value_t = 9)]
    counting_runs: usize,

    /// Failover rounds (kill + restart of one master each).
    #[arg(long, default_value_t = 5)]
    failover_rounds: usize,
    /// Health check interval in the failover lab (ms).
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Health check timeout in the failover lab (ms).
    #[arg(long, default_value_t = 100)]
    timeout_ms: u64,
    /// Failed checks in a row that take a master down.
    #[arg(long, default_value_t = 2)]
    fall: u32,
    /// Passed checks in a row that bring a master back.
    #[arg(long, default_value_t = 2)]
    rise: u32,
    /// Masters in the failover lab.
    #[arg(long, default_value_t = 3)]
    masters: usize,
    /// How long the client keeps connecting after the master is reported down, and after it
    /// is back, to see that no failure follows (ms).
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Attach in native (driver) mode in the failover lab instead of generic.
    #[arg(long)]
    native: bool,

    /// Director failover rounds (a new two-director lab each, the active director killed).
    #[arg(long, default_value_t = 3)]
    director_rounds: usize,
    /// New UDP flows per second while the flow sync's lag is sampled.
    #[arg(long, default_value_t = 500)]
    lag_rate: u32,
    /// How long the flow sync's lag is sampled (s).
    #[arg(long, default_value_t = 10)]
    lag_s: u64,
    /// New UDP flows per second of each sync traffic and CPU step (comma-separated); each step
    /// runs with and without sync, on pairs of its own.
    #[arg(long, value_delimiter = ',', default_values_t = [1000u32, 5000])]
    flow_rates: Vec<u32>,
    /// How long each sync traffic and CPU step sends (s); rate x this must stay under 64,000
    /// (one client source port per flow).
    #[arg(long, default_value_t = 10)]
    load_s: u64,

    /// Group sizes of the sync-scale benchmark (directors, comma-separated), each measured with
    /// changes sent to each peer and to a multicast group.
    #[arg(long, value_delimiter = ',', default_values_t = [3usize, 4, 6])]
    sync_sizes: Vec<usize>,
    /// New UDP flows per second through director 0 in the sync-scale benchmark, and for how long
    /// (s); rate x this must stay under 64,000.
    #[arg(long, default_value_t = 2000)]
    sync_rate: u32,
    #[arg(long, default_value_t = 5)]
    sync_s: u64,

    /// Director kills per detection setup in the ECMP benchmark (a new lab each).
    #[arg(long, default_value_t = 3)]
    ecmp_rounds: usize,
    /// Interleaved rounds of the ECMP connection-rate steps (1, 2, 3 directors), each step's
    /// length (ms) and its closed-loop workers.
    #[arg(long, default_value_t = 3)]
    ecmp_rate_rounds: usize,
    #[arg(long, default_value_t = 4000)]
    ecmp_step_ms: u64,
    #[arg(long, default_value_t = 16)]
    ecmp_workers: usize,

    /// End-to-end rounds: every director in turn, every step, per round; medians reported.
    #[arg(long, default_value_t = 3)]
    e2e_rounds: usize,
    /// Offered rates of new short connections per second (comma-separated), one step each.
    #[arg(long, value_delimiter = ',', default_values_t = [1000u32, 2000, 4000, 8000])]
    e2e_rates: Vec<u32>,
    /// Closed-loop workers of the last short-connection step (0: no such step).
    #[arg(long, default_value_t = 32)]
    e2e_workers: usize,
    /// Length of each short-connection step (ms).
    #[arg(long, default_value_t = 3000)]
    e2e_step_ms: u64,
    /// Closed-loop workers asking for 1 MiB answers.
    #[arg(long, default_value_t = 4)]
    e2e_large_workers: usize,
    /// Length of the 1 MiB answer step (ms).
    #[arg(long, default_value_t = 3000)]
    e2e_large_ms: u64,
    /// Idle connections held through each director while the first short-connection step runs
    /// again (0: skip). Each costs this process two descriptors (client and master end) and
    /// HAProxy two, so it must stay under half the open file limit.
    #[arg(long, default_value_t = 8000)]
    e2e_idle: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    interrupt::install();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mim-lb-bench: error: {e:#}");
            if interrupt::interrupted() { ExitCode::from(130) } else { ExitCode::FAILURE }
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let mut report = report::Report {
        machine: report::Machine::probe(),
        settings: json!({
            "repeat": args.repeat, "runs": args.runs, "new_flows": args.new_flows, "bpf_stats": args.bpf_stats,
            "rebuild_backends": args.rebuild_backends, "rebuild_runs": args.rebuild_runs, "sweep_flows": args.sweep_flows,
            "batch_flows": args.batch_flows, "counting_flows": args.counting_flows, "counting_runs": args.counting_runs, "batch_flow_runs": args.batch_flow_runs, "batch_runs": args.batch_runs,
            "failover_rounds": args.failover_rounds, "interval_ms": args.interval_ms,
            "timeout_ms": args.timeout_ms, "fall": args.fall, "rise": args.rise,
            "masters": args.masters, "settle_ms": args.settle_ms, "native": args.native,
            "director_rounds": args.director_rounds, "lag_rate": args.lag_rate, "lag_s": args.lag_s,
            "flow_rates": args.flow_rates, "load_s": args.load_s,
            "sync_sizes": args.sync_sizes, "sync_rate": args.sync_rate, "sync_s": args.sync_s,
            "ecmp_rounds": args.ecmp_rounds, "ecmp_rate_rounds": args.ecmp_rate_rounds, "ecmp_step_ms": args.ecmp_step_ms, "ecmp_workers": args.ecmp_workers,
            "e2e_rounds": args.e2e_rounds, "e2e_rates": args.e2e_rates, "e2e_workers": args.e2e_workers,
            "e2e_step_ms": args.e2e_step_ms, "e2e_large_workers": args.e2e_large_workers, "e2e_large_ms": args.e2e_large_ms, "e2e_idle": args.e2e_idle,
        }),
        sections: Vec::new(),
    };
    let wants = |b| args.only.contains(&b);
    if wants(Bench::PerPacket) {
        eprintln!("mim-lb-bench: per-packet cost ...");
        let baseline = match (&args.baseline, &args.baseline_missing) {
            (Some(path), _) => per_packet::Baseline::Object { path: path.clone(), commit: args.baseline_commit.clone() },
            (None, Some(why)) => per_packet::Baseline::Missing(why.clone()),
            (None, None) => per_packet::Baseline::Missing("no --baseline object given (`cargo xtask bench` builds one)".into()),
        };
        let previous = args.previous.clone().map(|p| (p, args.previous_commit.clone()));
        let settings = per_packet::Settings { repeat: args.repeat, runs: args.runs, new_flows: args.new_flows, baseline, previous };
        // Held while measuring: the kernel keeps the statistics on while the fd is open.
        let stats = if args.bpf_stats {
            Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context("turning BPF run-time statistics on")?)
        } else {
            None
        };
        let (mut packets, baseline, sizes, previous) = per_packet::measure(&settings, args.dump_xlated.as_deref())?;
        if stats.is_some() {
            packets.title += " with BPF run-time statistics on";
        }
        drop(stats);
        report.sections.push(packets);
        report.sections.push(baseline);
        report.sections.extend(previous);
        report.sections.push(sizes);
    }
    if wants(Bench::Rebuild) {
        eprintln!("mim-lb-bench: table rebuild ...");
        report.sections.push(rebuild::measure(args.rebuild_backends, args.rebuild_runs, args.sweep_flows)?);
    }
    if wants(Bench::Batch) {
        eprintln!("mim-lb-bench: batched map access ...");
        let settings = batch::Settings { flows: args.batch_flows, flow_runs: args.batch_flow_runs, maglev_runs: args.batch_runs };
        report.sections.push(batch::measure(&settings)?);
    }
    if wants(Bench::Counting) {
        eprintln!("mim-lb-bench: connection counting ...");
        let settings = counting::Settings { flows: args.counting_flows, runs: args.counting_runs, repeat: args.repeat };
        report.sections.push(counting::measure(&settings)?);
    }
    if wants(Bench::Memory) {
        eprintln!("mim-lb-bench: map memory ...");
        report.sections.push(memory::measure()?);
    }
    if wants(Bench::Failover) {
        eprintln!("mim-lb-bench: failover ...");
        let settings = failover::Settings {
            rounds: args.failover_rounds,
            interval_ms: args.interval_ms,
            timeout_ms: args.timeout_ms,
            rise: args.rise,
            fall: args.fall,
            masters: args.masters,
            settle_ms: args.settle_ms,
            native: args.native,
        };
        report.sections.push(failover::measure(&settings)?);
    }
    if wants(Bench::Directors) {
        eprintln!("mim-lb-bench: two directors ...");
        let settings = directors::Settings {
            rounds: args.director_rounds,
            lag_s: args.lag_s,
            lag_rate: args.lag_rate,
            rates: args.flow_rates.clone(),
            load_s: args.load_s,
        };
        report.sections.extend(directors::measure(&settings)?);
    }
    if wants(Bench::SyncScale) {
        eprintln!("mim-lb-bench: sync traffic as the group grows ...");
        let settings = sync_scale::Settings { sizes: args.sync_sizes.clone(), rate: args.sync_rate, secs: args.sync_s };
        report.sections.push(sync_scale::measure(&settings)?);
    }
    if wants(Bench::Ecmp) {
        eprintln!("mim-lb-bench: many directors behind ECMP ...");
        let settings = ecmp::Settings {
            rounds: args.ecmp_rounds,
            rate_rounds: args.ecmp_rate_rounds,
            step: std::time::Duration::from_millis(args.ecmp_step_ms),
            workers: args.ecmp_workers,
        };
        report.sections.extend(ecmp::measure(&settings)?);
    }
    if wants(Bench::E2e) {
        eprintln!("mim-lb-bench: end to end ...");
        let settings = e2e::Settings {
            rounds: args.e2e_rounds,
            rates: args.e2e_rates.clone(),
            workers: args.e2e_workers,
            step: std::time::Duration::from_millis(args.e2e_step_ms),
            large_bytes: 1 << 20,
            large_workers: args.e2e_large_workers,
            large_step: std::time::Duration::from_millis(args.e2e_large_ms),
            directors: e2e::Kind::ALL.to_vec(),
            idle: args.e2e_idle,
        };
        report.sections.extend(e2e::measure(&settings)?);
    }
    report.machine.finish();

    print!("{}", report.text());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.markdown()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
