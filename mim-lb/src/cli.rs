//! Command-line interface: argument definitions and dispatch, nothing else.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{check, config::Config, daemon, prepare_backend};

/// Parses the command line and runs the command: the whole `mim-lb` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Run(args) => daemon::run(args),
        Command::Check(args) => check::run(&args),
        Command::PrepareBackend(args) => prepare_backend::run(&args),
        Command::ExampleConfig => {
            print!("{}", Config::example());
            Ok(())
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "mim-lb",
    version,
    about = "XDP packet director: one VIP in front of a group of master servers (LVS direct-routing style)",
    after_help = "Examples:\n  mim-lb check --config /etc/mim-lb/mim-lb.toml\n  mim-lb run --config /etc/mim-lb/mim-lb.toml\n  mim-lb run --config lab.toml --interface veth0 --xdp-mode generic"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, fill its maps from the config, attach it, and serve until
    /// SIGINT/SIGTERM (then detach and remove the pinned maps).
    #[command(after_help = "Example:\n  mim-lb run --config /etc/mim-lb/mim-lb.toml --xdp-mode native")]
    Run(RunArgs),
    /// Validate a config file without touching the kernel and print what `run` would do.
    #[command(after_help = "Example:\n  mim-lb check --config /etc/mim-lb/mim-lb.toml")]
    Check(CheckArgs),
    /// Configure this host as a master for direct routing: the VIP on lo, ARP and reverse-path
    /// settings (run on each master, not on the gateway).
    PrepareBackend(prepare_backend::Args),
    /// Print an example configuration (three masters behind one VIP).
    ExampleConfig,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Interface to attach to (overrides `interface` in the file).
    #[arg(long)]
    pub interface: Option<String>,
    /// XDP attach mode (overrides `xdp_mode` in the file).
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeArg>,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum XdpModeArg {
    Auto,
    Native,
    Generic,
}
