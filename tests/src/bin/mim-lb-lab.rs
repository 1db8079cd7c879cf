//! `cargo xtask lab`: the demo to run first. Builds a lab of network namespaces with a client,
//! a gateway running mim-lb, masters and slaves; sends requests through the VIP, kills one
//! master's service, brings it back, and shows what the clients saw and what mim-lb said.
//!
//! Exit status: 0 when the story held, 1 when it did not (the summary says why) or the demo
//! failed, 130 after Ctrl-C. Everything it made is removed before it exits.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use mim_lb_tests::demo::{self, Options, signals};
use mim_lb_tests::gateway::Mode;
use mim_lb_tests::lab::{MAX_MASTERS, MAX_SLAVES};

#[derive(Parser)]
#[command(
    name = "cargo xtask lab",
    bin_name = "cargo xtask lab",
    about = "The mim-lb demo: a client, a gateway running mim-lb, masters and slaves in network \
             namespaces; traffic through the VIP while one master's service dies and comes back",
    after_help = "Examples:\n  cargo xtask lab\n  cargo xtask lab --keep\n  cargo xtask lab --masters 5 --requests-per-second 200\n  cargo xtask lab --directors 2   (two directors with keepalived; the active one dies)\n  cargo xtask lab --directors 3 --ecmp   (three directors behind an ECMP router; one dies, one is withdrawn)\n  cargo xtask lab --non-interactive   (CI: plain lines, short phases)"
)]
struct Args {
    /// Leave the lab running after the summary (until Ctrl-C), with the commands to look around.
    #[arg(long)]
    keep: bool,
    /// Masters behind the VIP.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=MAX_MASTERS as i64))]
    masters: u16,
    /// Slave hosts the masters hand out.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=MAX_SLAVES as i64))]
    slaves: u16,
    /// Requests the client sends per second, each on new connections.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=i64::from(demo::traffic::MAX_RATE)))]
    requests_per_second: u32,
    /// The master whose service is killed (1 = master-1).
    #[arg(long, default_value_t = 2)]
    kill: u16,
    /// Seconds of traffic per phase [default: 6 on a terminal, 3 otherwise].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=600))]
    phase_seconds: Option<u16>,
    /// Milliseconds between mim-lb's health checks of each master.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=10_000))]
    check_interval_ms: u32,
    /// How mim-lb attaches its XDP program to the gateway's interface.
    #[arg(long, value_enum, default_value_t = XdpMode::Native)]
    xdp_mode: XdpMode,
    /// Directors in front of the masters [default: 1, or 3 with --ecmp]. With 2, each runs
    /// mim-lb and keepalived, and the story kills the active director (not a master's service)
    /// and brings it back. More than 2 need --ecmp.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=demo::ecmp::MAX_DIRECTORS as i64))]
    directors: Option<u8>,
    /// The directors (2 to 8) sit behind a router that spreads connections over them by ECMP,
    /// each announcing the VIP with BIRD; the story kills one, brings it back, and withdraws
    /// another (needs bird2).
    #[arg(long)]
    ecmp: bool,
    /// Plain lines instead of a live table, short phases, and a last line `summary-json: {...}`
    /// for scripts (the default when stdout is not a terminal).
    #[arg(long)]
    non_interactive: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpMode {
    Native,
    Generic,
}

fn options(args: &Args) -> Result<Options> {
    if args.kill == 0 || args.kill > args.masters {
        bail!("--kill {} names no master: there are {} (master-1 to master-{})", args.kill, args.masters, args.masters);
    }
    let directors = args.directors.unwrap_or(if args.ecmp { 3 } else { 1 });
    if args.ecmp && directors < 2 {
        bail!("--ecmp needs 2 to {} directors, not {directors} (e.g. --directors 3 --ecmp)", demo::ecmp::MAX_DIRECTORS);
    }
    if !args.ecmp && directors > 2 {
        bail!(
            "--directors {directors} needs --ecmp: more than two directors run behind an ECMP router \
             (try: cargo xtask lab --directors {directors} --ecmp)"
        );
    }
    let live = !args.non_interactive && std::io::stdout().is_terminal();
    let phase = args.phase_seconds.unwrap_or(if live { 6 } else { 3 });
    Ok(Options {
        masters: args.masters.into(),
        slaves: args.slaves.into(),
        rate: args.requests_per_second,
        phase: Duration::from_secs(phase.into()),
        kill: usize::from(args.kill) - 1,
        live,
        keep: args.keep,
        mode: match args.xdp_mode {
            XdpMode::Native => Mode::Native,
            XdpMode::Generic => Mode::Generic,
        },
        check_interval: Duration::from_millis(args.check_interval_ms.into()),
        directors: directors.into(),
        ecmp: args.ecmp,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = options(&args).and_then(|opts| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the lab must run as root: it creates network namespaces and loads XDP programs \
                 (try: sudo -E env \"PATH=$PATH\" cargo xtask lab)"
            );
        }
        signals::install().context("installing the Ctrl-C handler")?;
        if opts.ecmp {
            demo::ecmp::run(&opts).map(|summary| summary.problems())
        } else if opts.directors > 1 {
            demo::pair::run(&opts).map(|summary| summary.problems())
        } else {
            demo::run(&opts).map(|summary| summary.problems())
        }
    });
    match result {
        // Ctrl-C ends a kept lab normally; its story was told.
        Ok(problems) if problems.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        // A Ctrl-C also reaches the CLI processes the demo runs, so whatever error it caused
        // counts as the interruption it is.
        Err(_) if signals::interrupted() => ExitCode::from(signals::EXIT_INTERRUPTED),
        Err(err) => {
            eprintln!("mim-lb-lab: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
