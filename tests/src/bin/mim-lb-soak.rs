//! `cargo xtask soak --minutes N [--seed S]`: the namespace lab under a long random schedule
//! of master deaths, drains, reloads, SIGHUPs and daemon restarts, with long-lived and short
//! TCP and UDP traffic (see `mim_lb_tests::soak`). Prints the report; exits 1 when an
//! invariant broke, 2 when the soak could not run. Everything it made is removed on the way
//! out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mim_lb_tests::soak::{self, SoakSpec};

#[derive(Parser)]
#[command(name = "cargo xtask soak", bin_name = "cargo xtask soak", about = "mim-lb soak: the lab under a long random schedule of failures and operator actions")]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=24 * 60))]
    minutes: u64,
    /// Replays the schedule of an earlier run (its report prints the seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Print only the report, not every step as it happens.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(soak::random_seed);
    let mut spec = SoakSpec::new(Duration::from_secs(args.minutes * 60), seed);
    spec.verbose = !args.quiet;
    eprintln!("mim-lb soak: {} minutes, seed {seed} (replay with --seed {seed})", args.minutes);
    let report = match soak::run(&spec) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("mim-lb soak: could not run: {e:#}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.text());
    if let Some(path) = &args.json
        && let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&report.json()).unwrap_or_default())
    {
        eprintln!("mim-lb soak: writing {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
