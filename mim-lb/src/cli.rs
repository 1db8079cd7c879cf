//! Command-line interface: argument definitions and dispatch, nothing else.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    check,
    config::Config,
    control::{client, protocol::Request},
    daemon, detach, drain_wait, prepare_backend, status, watch,
};

/// Where the daemon listens unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mim-lb/control.sock";

/// The config file the control commands read the socket from when given neither `--socket`
/// nor `--config` (the one the shipped systemd unit runs with).
pub const DEFAULT_CONFIG: &str = "/etc/mim-lb/mim-lb.toml";

/// The whole `mim-lb` binary: runs the command and turns an error into one message and exit
/// status 1. Printed here rather than by returning the error from `main`: anyhow's Debug form
/// adds a backtrace whenever RUST_BACKTRACE is set, which buries the line that matters.
pub fn main_exit() -> std::process::ExitCode {
    match main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let mut shown = err.to_string();
            eprintln!("mim-lb: error: {shown}");
            for cause in err.chain().skip(1) {
                // Many errors already end with their cause's text; say each thing once.
                let text = cause.to_string();
                if !shown.contains(&text) {
                    // A rejected config lists one problem per line: keep them aligned.
                    eprintln!("  caused by: {}", text.replace('\n', "\n             "));
                }
                shown = text;
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses the command line and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    let top = cli.socket.as_deref();
    if let Some(path) = top
        && !cli.command.talks_to_the_daemon()
    {
        bail!(
            "--socket {} is for the commands that talk to a running daemon (status, drain, enable, disable, reload, \
             simulate, ready, withdraw, announce); `run` and `detach` take the socket from the config's control_socket",
            path.display()
        );
    }
    match cli.command {
        Command::Run(args) => daemon::run(args),
        Command::Check(args) => check::run(&args),
        Command::Status(args) if args.watch.is_some() => {
            watch::run(&args.socket.path(top)?, args.watch.expect("guarded"), args.count)
        }
        Command::Status(args) => {
            let response = ask(&args.socket.path(top)?, &Request::Status)?;
            let status = response.status.context("the daemon sent no status")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
            Ok(())
        }
        Command::Drain(DrainArgs { target: t, wait, timeout }) => {
            let socket = t.socket.path(top)?;
            say(&socket, &Request::Drain { service: t.service.clone(), backend: t.backend })?;
            let drained_at = std::time::Instant::now();
            if wait { drain_wait::wait(&socket, &t.service, t.backend, drained_at, timeout) } else { Ok(()) }
        }
        Command::Enable(t) => say(&t.socket.path(top)?, &Request::Enable { service: t.service, backend: t.backend }),
        Command::Disable(t) => say(&t.socket.path(top)?, &Request::Disable { service: t.service, backend: t.backend }),
        Command::Reload(args) => say(&args.path(top)?, &Request::Reload),
        Command::Simulate(args) => {
            let response = ask(&args.socket.path(top)?, &Request::Simulate { flow: args.flow })?;
            let sim = response.simulation.context("the daemon sent no simulation")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&sim)?);
            } else {
                match (&sim.backend, &sim.service) {
                    (Some(backend), Some(service)) => println!(
                        "{} -> {backend} ({}) of {service}: {} ({})",
                        sim.flow,
                        sim.mac.as_deref().unwrap_or("?"),
                        sim.verdict,
                        sim.reason
                    ),
                    _ => println!("{} -> {} ({})", sim.flow, sim.verdict, sim.reason),
                }
                if let Some(new) = sim.new_backend.filter(|new| Some(*new) != sim.backend) {
                    println!("  a new connection from the same port would reach {new}");
                }
                if let Some(est) = sim.established_backend.filter(|est| Some(*est) != sim.backend) {
                    println!("  an established connection on these ports, begun before its slot changed, stays on {est}");
                }
            }
            Ok(())
        }
        Command::Ready(args) => {
            let response = client::request_within(&args.socket.path(top)?, &Request::Ready, args.timeout)?;
            if !response.ok {
                bail!("not ready: {}", response.error.unwrap_or_else(|| "no reason given".into()));
            }
            if !args.quiet {
                println!("{}", response.message.unwrap_or_else(|| "ready".into()));
            }
            Ok(())
        }
        Command::Withdraw(args) => say(&args.path(top)?, &Request::Withdraw),
        Command::Announce(args) => say(&args.path(top)?, &Request::Announce),
        Command::Detach(args) => detach::run(&args),
        Command::PrepareBackend(args) => prepare_backend::run(&args),
        Command::ExampleConfig => {
            print!("{}", Config::example());
            Ok(())
        }
        Command::Completions { shell } => {
            crate::manual::completions(shell, &mut std::io::stdout());
            Ok(())
        }
        Command::ManPages { dir } => {
            for page in crate::manual::write_man_pages(&dir).with_context(|| format!("writing into {}", dir.display()))? {
                println!("{}", page.display());
            }
            Ok(())
        }
    }
}

/// Sends a request; a refusal by the daemon becomes an error with its reason.
fn ask(socket: &std::path::Path, request: &Request) -> anyhow::Result<crate::control::protocol::Response> {
    let response = client::request(socket, request)?;
    if !response.ok {
        bail!("{}", response.error.unwrap_or_else(|| "the daemon refused without a reason".into()));
    }
    Ok(response)
}

/// Sends a request and prints the daemon's answer.
fn say(socket: &std::path::Path, request: &Request) -> anyhow::Result<()> {
    let response = ask(socket, request)?;
    if let Some(message) = response.message {
        println!("{message}");
    }
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "mim-lb",
    version,
    about = "XDP packet director: one VIP in front of a group of master servers (LVS direct-routing style)",
    after_help = "Examples:\n  mim-lb check --config /etc/mim-lb/mim-lb.toml\n  mim-lb run --config /etc/mim-lb/mim-lb.toml\n  mim-lb status\n  mim-lb drain 10.0.0.100:7000 10.0.0.11\n  mim-lb prepare-backend --vip 10.0.0.100   (on each master)"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// The daemon's control socket, for the commands that talk to it; also accepted after
    /// the command (`mim-lb status --socket PATH`), which wins.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, fill its maps from the config, attach it, and serve: health
    /// checks, the control socket, reloads on SIGHUP. On SIGINT/SIGTERM, detach and remove
    /// the pins (unless --keep-pinned).
    #[command(after_help = "Examples:\n  mim-lb run --config /etc/mim-lb/mim-lb.toml\n  mim-lb run --config lab.toml --interface veth0 --xdp-mode generic\n  mim-lb run --config /etc/mim-lb/mim-lb.toml --keep-pinned   (restart/upgrade without losing flows)")]
    Run(RunArgs),
    /// Validate a config file without touching the kernel and print what `run` would do.
    #[command(after_help = "Example:\n  mim-lb check --config /etc/mim-lb/mim-lb.toml")]
    Check(CheckArgs),
    /// Show services, backends (state, weight, share, connections held, last check, slow start
    /// step, flap damping hold) and counters; --watch follows them with rates.
    #[command(after_help = "Examples:\n  mim-lb status\n  mim-lb status --config /etc/mim-lb/mim-lb.toml\n  mim-lb status --json | jq '.services[].backends[] | {address, state, active_connections}'\n  mim-lb status --json | jq '.services[].backends[] | select(.slow_start or .held_down) | {address, slow_start, held_down, reason}'\n  mim-lb status --watch            (redraw every 2 s with rates, like watch ipvsadm -Ln --rate)\n  mim-lb status --watch 1 --count 5 > log.txt")]
    Status(StatusArgs),
    /// Stop sending new flows to a backend; its established flows stay until they end. With
    /// --wait, return once it holds no active connection.
    #[command(after_help = "Examples:\n  mim-lb drain 10.0.0.100:7000 10.0.0.11\n  mim-lb drain mim-master 10.0.0.11\n  mim-lb drain mim-master 10.0.0.11 --wait --timeout 10m && systemctl -H master1 restart mim-master\n\n--wait: a connection counts as active while it sent a packet within the last 5 s (a UDP\nflow: until it expires); see OPERATIONS.md, \"Connection counts\" and \"Rolling update\".")]
    Drain(DrainArgs),
    /// Put a drained or disabled backend back into service.
    #[command(after_help = "Example:\n  mim-lb enable 10.0.0.100:7000 10.0.0.11")]
    Enable(Target),
    /// Take a backend out of service now: its flows move to other masters (health checks
    /// keep running and are reported).
    #[command(after_help = "Example:\n  mim-lb disable 10.0.0.100:7000 10.0.0.11")]
    Disable(Target),
    /// Re-read the daemon's config file and apply the difference (also on SIGHUP). An invalid
    /// file is rejected whole and nothing changes.
    #[command(after_help = "Example:\n  mim-lb reload")]
    Reload(SocketArg),
    /// Which master a flow would reach now, by running the live XDP program on a synthetic
    /// packet (nothing is recorded or counted).
    #[command(after_help = "Examples:\n  mim-lb simulate --flow 192.0.2.7:40000-10.0.0.100:7000/tcp\n  mim-lb simulate --flow '[2001:db8::7]:40000-[2001:db8::100]:7000/udp'")]
    Simulate(SimulateArgs),
    /// Exit 0 if this director is ready to carry the VIP (program attached, tables written,
    /// the peers' flow state pulled), 1 otherwise: keepalived's `track_script`.
    #[command(after_help = "Examples:\n  mim-lb ready && echo ready\n  mim-lb ready --quiet --timeout 1s   (keepalived track_script)")]
    Ready(ReadyArgs),
    /// Remove this director's VIP routes from its `[announce]` table, so that the routing
    /// daemon withdraws them and the router sends it no new traffic; it keeps forwarding what
    /// still arrives. Until `mim-lb announce` or a restart.
    #[command(after_help = "Examples:\n  mim-lb withdraw                 (take this director out of ECMP)\n  mim-lb status | grep Announce   (WITHDRAWN by the operator)")]
    Withdraw(SocketArg),
    /// Undo `mim-lb withdraw`: put the routes of the VIPs this director can serve back.
    #[command(after_help = "Example:\n  mim-lb announce")]
    Announce(SocketArg),
    /// Take a stopped daemon's program off the interface and remove its pinned maps (what
    /// `run --keep-pinned`, and so the systemd unit, leaves forwarding on stop).
    #[command(after_help = "Example:\n  systemctl stop mim-lb && mim-lb detach --config /etc/mim-lb/mim-lb.toml")]
    Detach(DetachArgs),
    /// Configure this host as a master for direct routing: the VIP on lo, ARP and reverse-path
    /// settings (run on each master, not on the gateway).
    PrepareBackend(prepare_backend::Args),
    /// Print an example configuration (three masters behind one VIP).
    #[command(after_help = "Example:\n  mim-lb example-config > /etc/mim-lb/mim-lb.toml")]
    ExampleConfig,
    /// Print a shell completion script (the Debian package installs them already).
    #[command(after_help = "Examples:\n  mim-lb completions bash > /etc/bash_completion.d/mim-lb\n  mim-lb completions zsh > \"${fpath[1]}/_mim-lb\"")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (section 8) into DIR: what `cargo xtask deb` packages.
    #[command(hide = true)]
    ManPages {
        dir: PathBuf,
    },
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
    /// On stop, leave the program attached and the maps pinned, so the next `mim-lb run`
    /// takes over every recorded flow.
    #[arg(long)]
    pub keep_pinned: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The configuration the daemon ran with (its pin_dir and control_socket).
    #[arg(long, short)]
    pub config: PathBuf,
}

/// Where a running daemon listens.
#[derive(Debug, clap::Args)]
pub struct SocketArg {
    /// The daemon's control socket (its config's `control_socket`) [env: MIM_LB_SOCKET,
    /// which --config overrides] [default: the control_socket of /etc/mim-lb/mim-lb.toml if
    /// it exists, else /run/mim-lb/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Read the socket from this config file (its `control_socket`); `--socket` wins.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl SocketArg {
    /// The socket to use: this command's `--socket`, else the one given before the command,
    /// else the `control_socket` of `--config`, else `MIM_LB_SOCKET`, else that of the
    /// default config file when there is one, else the default socket.
    pub fn path(&self, before_the_command: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
        let env = std::env::var_os("MIM_LB_SOCKET").filter(|v| !v.is_empty()).map(PathBuf::from);
        self.resolve(before_the_command, env, std::path::Path::new(DEFAULT_CONFIG))
    }

    /// [`SocketArg::path`] with the environment's socket and the default config file given.
    fn resolve(
        &self,
        before_the_command: Option<&std::path::Path>,
        env: Option<PathBuf>,
        default_config: &std::path::Path,
    ) -> anyhow::Result<PathBuf> {
        if let Some(socket) = self.socket.clone().or_else(|| before_the_command.map(std::path::Path::to_path_buf)) {
            return Ok(socket);
        }
        if let Some(file) = &self.config {
            let config = Config::from_file(file)
                .with_context(|| format!("reading the control socket from {}", file.display()))?;
            return Ok(config.control_socket);
        }
        if let Some(env) = env {
            return Ok(env);
        }
        if default_config.exists() {
            // A broken default file must not keep `status` from a daemon that runs.
            match Config::from_file(default_config) {
                Ok(config) => return Ok(config.control_socket),
                Err(e) => eprintln!("mim-lb: warning: {e:#}; trying {DEFAULT_SOCKET}"),
            }
        }
        Ok(PathBuf::from(DEFAULT_SOCKET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(socket: Option<&str>, config: Option<&std::path::Path>) -> SocketArg {
        SocketArg { socket: socket.map(PathBuf::from), config: config.map(std::path::Path::to_path_buf) }
    }

    #[test]
    fn the_socket_comes_from_the_flags_then_the_config_then_the_environment_then_the_default_file() {
        let dir = std::env::temp_dir().join(format!("mim-lb-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mim-lb.toml");
        let example = Config::example().replace(
            "control_socket = \"/run/mim-lb/control.sock\"",
            "control_socket = \"/run/elsewhere/ctl.sock\"",
        );
        assert!(example.contains("/run/elsewhere/ctl.sock"), "the example names its control_socket");
        std::fs::write(&file, example).unwrap();
        let missing = dir.join("missing.toml");
        let p = |a: SocketArg, before: Option<&str>, env: Option<&str>, default: &std::path::Path| {
            a.resolve(before.map(std::path::Path::new), env.map(PathBuf::from), default).map(|p| p.display().to_string())
        };
        let elsewhere = "/run/elsewhere/ctl.sock".to_owned();
        // The default config file, when nothing else is given; the default socket without it.
        assert_eq!(p(arg(None, None), None, None, &file).unwrap(), elsewhere);
        assert_eq!(p(arg(None, None), None, None, &missing).unwrap(), DEFAULT_SOCKET);
        // MIM_LB_SOCKET before the default file; --config before MIM_LB_SOCKET.
        assert_eq!(p(arg(None, None), None, Some("/env.sock"), &file).unwrap(), "/env.sock");
        assert_eq!(p(arg(None, Some(&file)), None, Some("/env.sock"), &missing).unwrap(), elsewhere);
        // --socket, after or before the command, before everything.
        assert_eq!(p(arg(Some("/a.sock"), Some(&file)), Some("/b.sock"), Some("/env.sock"), &file).unwrap(), "/a.sock");
        assert_eq!(p(arg(None, Some(&file)), Some("/b.sock"), None, &file).unwrap(), "/b.sock");
        // A --config that cannot be read is an error naming it.
        let err = format!("{:#}", p(arg(None, Some(&missing)), None, None, &file).unwrap_err());
        assert!(err.contains("reading the control socket from") && err.contains("missing.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

impl Command {
    /// Whether the command talks to a running daemon over its control socket.
    fn talks_to_the_daemon(&self) -> bool {
        matches!(
            self,
            Command::Status(_)
                | Command::Drain(_)
                | Command::Enable(_)
                | Command::Disable(_)
                | Command::Reload(_)
                | Command::Simulate(_)
                | Command::Ready(_)
                | Command::Withdraw(_)
                | Command::Announce(_)
        )
    }
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the stable JSON form (documented in OPERATIONS.md).
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Redraw every INTERVAL (seconds, or a duration such as 500ms; default 2) with per-second
    /// rates of packets, bytes and new flows; on a terminal in place, else one frame after
    /// another.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2", value_parser = watch::parse_interval)]
    pub watch: Option<std::time::Duration>,
    /// With --watch: stop after this many frames.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub target: Target,
    /// Then wait until the backend holds no active connection (a progress line on a
    /// terminal, plain lines otherwise).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (500ms, 30s, 10m, ...) with exit status 1; the
    /// backend stays drained. Without it, --wait waits as long as it takes.
    #[arg(long, value_name = "DURATION", requires = "wait", value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// The service: VIP:PORT, VIP:PORT/udp, [IPv6]:PORT, or its name.
    pub service: String,
    /// The backend's address.
    pub backend: IpAddr,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, clap::Args)]
pub struct ReadyArgs {
    /// Print nothing when ready (the reason still goes to stderr when not).
    #[arg(long, short)]
    pub quiet: bool,
    /// How long to wait for the daemon's answer; a daemon that does not answer in time is
    /// not ready.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// SRC:SPORT-VIP:PORT/PROTO, IPv6 addresses in brackets.
    #[arg(long)]
    pub flow: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum XdpModeArg {
    Auto,
    Native,
    Generic,
}
