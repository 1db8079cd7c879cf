//! Project tasks, run as `cargo xtask <command>`.
//!
//! Every command except `setup` first checks that the machine can build mim-lb (nightly with
//! rust-src, bpf-linker, the lab's network tools) and installs what is missing, so a fresh
//! Debian machine needs nothing but cargo before its first `cargo xtask test`.
mod baseline;
mod bench;
mod bpffs;
mod build_ebpf;
mod deb;
mod fuzz;
mod lab;
mod run;
mod setup;
mod soak;
mod test;
mod util;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "mim-lb project tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing needs: Debian packages, the nightly toolchain with
    /// rust-src, and bpf-linker
    Setup {
        /// Only report what is missing (exit status 1 if anything is)
        #[arg(long)]
        check: bool,
    },
    /// Build mim-lb, which compiles and embeds the XDP program
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Build mim-lb (release) and run `mim-lb run ARGS...`
    Run {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Run the test suite as root (`cargo test ARGS...` over every crate but the bpf-only one),
    /// removing namespaces and bpffs pins that killed test runs left behind
    Test {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CARGO_TEST_ARGS"
        )]
        args: Vec<OsString>,
    },
    /// The demo: a lab of network namespaces with a client, a gateway running mim-lb and
    /// masters; traffic through the VIP while a master fails and returns, or with
    /// `--directors 2` while the active one of two directors (keepalived) dies and returns
    /// (`mim-lb-lab ARGS...`; `cargo xtask lab --help` for its options)
    // Its --help is the demo's own, which lists the options.
    #[command(disable_help_flag = true)]
    Lab {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Fuzz the XDP program: mutated and random frames through BPF_PROG_TEST_RUN, every
    /// outcome checked (`mim-lb-fuzz ARGS...`: --frames N, --seed S, --batch N; `cargo xtask
    /// fuzz -- --help` for all)
    Fuzz {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// The soak: the namespace lab for `--minutes N` under a random schedule (`--seed S` replays
    /// one) of master deaths, drains, reloads, SIGHUPs and daemon restarts, with long-lived and
    /// short TCP and UDP traffic; exits non-zero on a broken invariant (`mim-lb-soak ARGS...`;
    /// `cargo xtask soak --help` for its options)
    #[command(disable_help_flag = true)]
    Soak {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Run the benchmarks (`mim-lb-bench ARGS...`)
    Bench {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Build the Debian package (daemon, systemd unit, example config, man pages, shell
    /// completions) with dpkg-deb
    Deb(deb::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Setup { check } => setup::main(check),
        Cmd::BuildEbpf { release } => build_ebpf::main(release),
        Cmd::Run { args } => run::main(args),
        Cmd::Test { args } => test::main(args),
        Cmd::Lab { args } => lab::main(args),
        Cmd::Soak { args } => soak::main(args),
        Cmd::Bench { args } => bench::main(args),
        Cmd::Deb(args) => deb::main(args),
        Cmd::Fuzz { args } => fuzz::main(args),
    };
    // Printed here rather than by returning the error: anyhow's Debug form adds a backtrace
    // whenever RUST_BACKTRACE is set, which buries the one line that matters in CI logs.
    result.unwrap_or_else(|err| {
        eprintln!("xtask: error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(line: &[&str]) -> Vec<OsString> {
        match Cli::try_parse_from(line).unwrap().command {
            Cmd::Run { args }
            | Cmd::Test { args }
            | Cmd::Lab { args }
            | Cmd::Soak { args }
            | Cmd::Bench { args }
            | Cmd::Fuzz { args } => {
                args
            }
            _ => panic!("not a pass-through command"),
        }
    }

    #[test]
    fn pass_through_args_keep_hyphens_and_inner_separators() {
        let got = args_of(&["xtask", "test", "--", "-p", "mim-lb", "--", "--nocapture"]);
        assert_eq!(got, ["-p", "mim-lb", "--", "--nocapture"]);
        assert_eq!(
            args_of(&["xtask", "run", "--", "--config", "x.toml"]),
            ["--config", "x.toml"]
        );
        assert_eq!(args_of(&["xtask", "lab", "up", "-v"]), ["up", "-v"]);
        assert_eq!(
            args_of(&["xtask", "lab", "--keep", "--masters", "5"]),
            ["--keep", "--masters", "5"]
        );
        assert_eq!(args_of(&["xtask", "lab", "--help"]), ["--help"]);
        assert!(args_of(&["xtask", "bench"]).is_empty());
        assert_eq!(
            args_of(&["xtask", "fuzz", "--seed", "7", "--frames", "10"]),
            ["--seed", "7", "--frames", "10"]
        );
        assert_eq!(args_of(&["xtask", "soak", "--minutes", "2", "--seed", "7"]), ["--minutes", "2", "--seed", "7"]);
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
