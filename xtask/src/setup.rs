//! Finds what this machine lacks to build and test mim-lb, and installs it.
//!
//! Probing is split from parsing so the decisions (what counts as installed, what to run, when
//! to give up and print instructions) are plain functions with tests; the probe itself runs a
//! handful of short commands so that every other xtask command can afford it on each start.
use std::collections::BTreeSet;
use std::fmt;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

use crate::util;

struct Package {
    name: &'static str,
    /// A command the package provides: the only evidence available where dpkg is not.
    provides: Option<&'static str>,
    /// Needed only to compile bpf-linker, so not wanted once a working bpf-linker exists.
    for_bpf_linker: bool,
}

const fn tool(name: &'static str, provides: &'static str) -> Package {
    Package {
        name,
        provides: Some(provides),
        for_bpf_linker: false,
    }
}

const fn llvm(name: &'static str) -> Package {
    Package {
        name,
        provides: None,
        for_bpf_linker: true,
    }
}

const PACKAGES: &[Package] = &[
    tool("build-essential", "cc"),
    tool("pkg-config", "pkg-config"),
    tool("bpftool", "bpftool"),
    tool("iproute2", "ip"),
    tool("ethtool", "ethtool"),
    tool("iputils-ping", "ping"),
    tool("tcpdump", "tcpdump"),
    tool("procps", "sysctl"),
    // VRRP between the two directors of the namespace tests that move the VIP.
    tool("keepalived", "keepalived"),
    // BGP for the ECMP lab: the router and every director run their own `bird` (`-c conf -s
    // sock -P pid` in their namespace); the system's bird service is neither needed nor used
    // (Debian's postinst starts it on a machine with systemd; that does not matter).
    tool("bird2", "bird"),
    // `vtysh --dryrun` checks the shipped FRR examples (no FRR daemon is run).
    tool("frr", "vtysh"),
    // The status page test loads the page in a headless browser.
    tool("chromium-headless-shell", "chromium-headless-shell"),
    // A pseudo-terminal for the CLI in tests of what it draws on a terminal (`script`).
    tool("bsdutils", "script"),
    // The end-to-end benchmark's peers: a userspace TCP proxy and the kernel's netdev
    // forwarding, measured next to mim-lb in the same lab.
    tool("haproxy", "haproxy"),
    tool("nftables", "nft"),
    llvm("llvm-22-dev"),
    llvm("libpolly-22-dev"),
    llvm("libzstd-dev"),
];

/// aya-build compiles the eBPF crate with `cargo +nightly ... -Z build-std=core`.
pub(crate) const NIGHTLY: &str = "nightly";
const RUST_SRC: &str = "rust-src";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker's build script does not find Debian's versioned LLVM on its own.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// Whether package state came from dpkg, rather than from commands found on PATH.
    pub dpkg: bool,
    pub wanted_packages: Vec<&'static str>,
    pub missing_packages: Vec<&'static str>,
    pub rustup: bool,
    pub nightly: bool,
    pub rust_src: bool,
    /// `bpf-linker --version` output when it runs.
    pub bpf_linker: Option<String>,
}

impl State {
    pub fn complete(&self) -> bool {
        self.missing_packages.is_empty()
            && self.nightly
            && self.rust_src
            && self.bpf_linker.is_some()
    }

    fn lines(&self) -> Vec<String> {
        let how = if self.dpkg {
            ""
        } else {
            " (no dpkg here: judged by the commands on PATH)"
        };
        let packages = if self.missing_packages.is_empty() {
            format!("ok ({})", self.wanted_packages.join(" "))
        } else {
            format!("MISSING {}", self.missing_packages.join(" "))
        };
        let ok = |present: bool| if present { "ok" } else { "MISSING" };
        vec![
            format!("Debian packages{how}: {packages}"),
            format!(
                "{NIGHTLY} toolchain: {}",
                if self.rustup {
                    ok(self.nightly)
                } else {
                    "MISSING (no rustup)"
                }
            ),
            format!("{RUST_SRC} for {NIGHTLY}: {}", ok(self.rust_src)),
            match &self.bpf_linker {
                Some(version) => format!("bpf-linker: ok ({version})"),
                None => "bpf-linker: MISSING".to_owned(),
            },
        ]
    }

    fn missing_summary(&self) -> String {
        let mut missing: Vec<String> = self
            .missing_packages
            .iter()
            .map(|p| p.to_string())
            .collect();
        if !self.nightly {
            missing.push(format!("{NIGHTLY} toolchain"));
        }
        if !self.rust_src {
            missing.push(RUST_SRC.to_owned());
        }
        if self.bpf_linker.is_none() {
            missing.push("bpf-linker".to_owned());
        }
        missing.join(", ")
    }
}

/// Names that dpkg reports as installed, from `dpkg-query -W -f='${Package}\t${Status}\n'`.
/// The third status word is the state; "deinstall ok config-files" is a removed package.
pub fn parse_dpkg_installed(output: &str) -> BTreeSet<&str> {
    output
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once('\t')?;
            (status.split_whitespace().nth(2) == Some("installed")).then_some(name.trim())
        })
        .collect()
}

/// Whether `rustup toolchain list` shows the toolchain that `+nightly` selects. Dated
/// nightlies (`nightly-2025-01-01-...`) are other toolchains and do not count.
pub fn parse_has_nightly(toolchain_list: &str) -> bool {
    toolchain_list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name == NIGHTLY
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// Whether `rustup component list --installed` shows `component`. Only host-independent
/// components (rust-src) are asked about, and those print without a target triple.
pub fn parse_has_component(component_list: &str, component: &str) -> bool {
    component_list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| name == component)
}

fn wanted_packages(have_bpf_linker: bool) -> Vec<&'static Package> {
    PACKAGES
        .iter()
        .filter(|p| !p.for_bpf_linker || !have_bpf_linker)
        .collect()
}

/// Looks at the machine. Only failing to run a probe that exists is an error.
pub fn probe() -> Result<State> {
    let bpf_linker = match util::find_program("bpf-linker") {
        Some(path) => {
            let out = util::capture(Command::new(&path).arg("--version"))?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        None => None,
    };

    let rustup = util::find_program("rustup");
    let nightly = match &rustup {
        Some(r) => parse_has_nightly(&util::stdout_of(
            Command::new(r).args(["toolchain", "list"]),
        )?),
        None => false,
    };
    // Asked only when nightly exists: recent rustup would install a missing toolchain to answer.
    let rust_src = match (&rustup, nightly) {
        (Some(r), true) => parse_has_component(
            &util::stdout_of(Command::new(r).args([
                "component",
                "list",
                "--toolchain",
                NIGHTLY,
                "--installed",
            ]))?,
            RUST_SRC,
        ),
        _ => false,
    };

    let wanted = wanted_packages(bpf_linker.is_some());
    let wanted_packages: Vec<&'static str> = wanted.iter().map(|p| p.name).collect();
    let (dpkg, missing_packages) = match util::find_program("dpkg-query") {
        Some(dpkg_query) => {
            // dpkg-query exits 1 when some name is unknown to it; the output still lists the rest.
            let out = util::capture(
                Command::new(dpkg_query)
                    .args(["-W", "-f=${Package}\t${Status}\n"])
                    .args(&wanted_packages),
            )?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let installed = parse_dpkg_installed(&stdout);
            (
                true,
                wanted_packages
                    .iter()
                    .copied()
                    .filter(|p| !installed.contains(p))
                    .collect(),
            )
        }
        None => {
            let missing = wanted
                .iter()
                .filter(|p| {
                    p.provides
                        .is_none_or(|cmd| util::find_program(cmd).is_none())
                })
                .map(|p| p.name)
                .collect();
            (false, missing)
        }
    };

    Ok(State {
        dpkg,
        wanted_packages,
        missing_packages,
        rustup: rustup.is_some(),
        nightly,
        rust_src,
        bpf_linker,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    AptGet,
    Rustup,
    Cargo,
}

/// One command of the installation, kept as data so it can be either run or printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What the step installs, for the progress line.
    pub what: &'static str,
    pub tool: Tool,
    pub needs_root: bool,
    pub env: Vec<(&'static str, &'static str)>,
    pub args: Vec<String>,
    /// Tried when the step fails, e.g. without `--locked` if the locked dependency set no
    /// longer builds.
    pub fallback_args: Option<Vec<String>>,
}

impl Step {
    fn program(&self) -> &'static str {
        match self.tool {
            Tool::AptGet => "apt-get",
            Tool::Rustup => "rustup",
            Tool::Cargo => "cargo",
        }
    }

    fn command(&self, args: &[String]) -> Command {
        let mut cmd = match self.tool {
            // Away from the workspace so its .cargo/config.toml cannot affect the install.
            Tool::Cargo => {
                let mut c = util::cargo();
                c.current_dir(std::env::temp_dir());
                c
            }
            _ => util::command(self.program()),
        };
        cmd.envs(self.env.iter().copied()).args(args);
        cmd
    }

    /// The line a person would type, as root or through sudo.
    fn manual_line(&self, as_root: bool) -> String {
        let mut words: Vec<String> = Vec::new();
        if self.needs_root && !as_root {
            words.push("sudo".to_owned());
            if !self.env.is_empty() {
                // sudo's env_reset may refuse VAR=value; env(1) always passes it.
                words.push("env".to_owned());
            }
        }
        words.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        words.push(self.program().to_owned());
        words.extend(self.args.iter().cloned());
        words.join(" ")
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.manual_line(true))
    }
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The commands that bring `state` to complete, in the order they must run.
pub fn plan(state: &State) -> Vec<Step> {
    let mut steps = Vec::new();
    if !state.missing_packages.is_empty() {
        steps.push(Step {
            what: "Debian package lists",
            tool: Tool::AptGet,
            needs_root: true,
            env: vec![],
            args: strings(&["update"]),
            fallback_args: None,
        });
        let mut args = strings(&["install", "-y", "--no-install-recommends"]);
        args.extend(state.missing_packages.iter().map(|p| p.to_string()));
        steps.push(Step {
            what: "Debian packages",
            tool: Tool::AptGet,
            needs_root: true,
            env: vec![("DEBIAN_FRONTEND", "noninteractive")],
            args,
            fallback_args: None,
        });
    }
    if !state.nightly {
        steps.push(Step {
            what: "the nightly toolchain",
            tool: Tool::Rustup,
            needs_root: false,
            env: vec![],
            args: strings(&["toolchain", "install", NIGHTLY, "--profile", "minimal"]),
            fallback_args: None,
        });
    }
    if !state.rust_src {
        steps.push(Step {
            what: "rust-src for nightly",
            tool: Tool::Rustup,
            needs_root: false,
            env: vec![],
            args: strings(&["component", "add", RUST_SRC, "--toolchain", NIGHTLY]),
            fallback_args: None,
        });
    }
    if state.bpf_linker.is_none() {
        let unlocked = strings(&[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
        let mut locked = unlocked.clone();
        locked.insert(4, "--locked".to_owned());
        steps.push(Step {
            what: "bpf-linker (compiles against LLVM 22: takes a minute or two)",
            tool: Tool::Cargo,
            needs_root: false,
            env: vec![("LLVM_PREFIX", LLVM_PREFIX)],
            args: locked,
            fallback_args: Some(unlocked),
        });
    }
    steps
}

/// What the machine can do for itself.
#[derive(Debug, Clone, Copy)]
pub struct Abilities {
    pub root: bool,
    pub apt_get: bool,
    pub rustup: bool,
}

/// Why `steps` cannot run here; empty when they can.
pub fn blockers(state: &State, steps: &[Step], can: Abilities) -> Vec<String> {
    let mut why = Vec::new();
    if steps.iter().any(|s| s.tool == Tool::AptGet) {
        if !can.apt_get {
            why.push(format!(
                "apt-get not found (not Debian?): install your distribution's equivalents of: {}",
                state.missing_packages.join(" ")
            ));
        } else if !can.root {
            why.push("installing Debian packages needs root".to_owned());
        }
    }
    if steps.iter().any(|s| s.tool == Tool::Rustup) && !can.rustup {
        why.push("rustup not found: install it from https://rustup.rs (cargo alone cannot add a nightly toolchain)".to_owned());
    }
    why
}

fn run_step(step: &Step) -> Result<()> {
    let result = util::run(&mut step.command(&step.args));
    match (&result, &step.fallback_args) {
        (Err(e), Some(fallback)) => {
            eprintln!("xtask setup: {e:#}; trying again without the lock file's versions");
            util::run(&mut step.command(fallback))
        }
        _ => result,
    }
    .with_context(|| match step.tool {
        Tool::AptGet => {
            "installing Debian packages; `apt-cache policy llvm-22-dev` shows whether the \
                         configured sources have LLVM 22 (stock Debian 12 needs apt.llvm.org)"
                .to_owned()
        }
        Tool::Rustup => "installing the nightly toolchain with rustup".to_owned(),
        Tool::Cargo => format!("building bpf-linker {BPF_LINKER_VERSION} against {LLVM_PREFIX}"),
    })
}

fn print_state(state: &State) {
    for line in state.lines() {
        println!("xtask setup: {line}");
    }
}

fn install(state: &State) -> Result<()> {
    let steps = plan(state);
    let can = Abilities {
        root: util::is_root(),
        apt_get: util::find_program("apt-get").is_some(),
        rustup: state.rustup,
    };
    let why = blockers(state, &steps, can);
    if !why.is_empty() {
        eprintln!("xtask setup: cannot install here:");
        for reason in &why {
            eprintln!("  - {reason}");
        }
        eprintln!(
            "{}, then try again:",
            if can.apt_get {
                "Run these commands"
            } else {
                "Run the equivalent of these commands"
            }
        );
        for step in &steps {
            eprintln!("  {}", step.manual_line(can.root));
        }
        bail!("missing: {}", state.missing_summary());
    }
    for step in &steps {
        println!("xtask setup: installing {}", step.what);
        run_step(step)?;
    }
    let after = probe()?;
    if !after.complete() {
        print_state(&after);
        bail!(
            "still missing after installing: {}",
            after.missing_summary()
        );
    }
    println!("xtask setup: done");
    Ok(())
}

/// For every other command: silent and quick when all is present, installs otherwise.
pub fn ensure() -> Result<()> {
    let state = probe().context("checking build prerequisites")?;
    if state.complete() {
        return Ok(());
    }
    print_state(&state);
    install(&state).context("installing build prerequisites (`cargo xtask setup` does only this)")
}

pub fn main(check_only: bool) -> Result<ExitCode> {
    let state = probe()?;
    print_state(&state);
    if state.complete() {
        println!("xtask setup: everything needed to build and test is present");
        return Ok(ExitCode::SUCCESS);
    }
    if check_only {
        println!(
            "xtask setup: missing: {}; `cargo xtask setup` installs it",
            state.missing_summary()
        );
        return Ok(ExitCode::FAILURE);
    }
    install(&state)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete_state() -> State {
        State {
            dpkg: true,
            wanted_packages: vec!["bpftool"],
            missing_packages: vec![],
            rustup: true,
            nightly: true,
            rust_src: true,
            bpf_linker: Some("bpf-linker 0.13.0".into()),
        }
    }

    const ROOT_DEBIAN: Abilities = Abilities {
        root: true,
        apt_get: true,
        rustup: true,
    };

    #[test]
    fn dpkg_counts_only_installed_state() {
        let out = "bpftool\tinstall ok installed\n\
                   tcpdump\tdeinstall ok config-files\n\
                   ethtool\thold ok installed\n\
                   procps\tinstall ok unpacked\n\
                   garbage line\n";
        assert_eq!(
            parse_dpkg_installed(out),
            BTreeSet::from(["bpftool", "ethtool"])
        );
        assert!(parse_dpkg_installed("").is_empty());
    }

    #[test]
    fn nightly_means_the_undated_channel() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(parse_has_nightly(list));
        assert!(parse_has_nightly("nightly (default)\n"));
        assert!(!parse_has_nightly(
            "stable-x86_64-unknown-linux-gnu (default)\nnightly-2025-01-01-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!parse_has_nightly("no installed toolchains\n"));
    }

    #[test]
    fn rust_src_component() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(parse_has_component(list, "rust-src"));
        assert!(!parse_has_component(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
        assert!(parse_has_component("rust-src (installed)\n", "rust-src"));
    }

    #[test]
    fn llvm_wanted_only_without_bpf_linker() {
        let names = |have| {
            wanted_packages(have)
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
        };
        assert!(names(false).contains(&"llvm-22-dev"));
        assert!(!names(true).contains(&"llvm-22-dev"));
        assert!(names(true).contains(&"bpftool"));
    }

    #[test]
    fn nothing_to_do_when_complete() {
        assert!(complete_state().complete());
        assert!(plan(&complete_state()).is_empty());
    }

    #[test]
    fn fresh_machine_plan_runs_in_dependency_order() {
        let state = State {
            missing_packages: vec!["llvm-22-dev", "bpftool"],
            nightly: false,
            rust_src: false,
            bpf_linker: None,
            ..complete_state()
        };
        let lines: Vec<String> = plan(&state).iter().map(|s| s.to_string()).collect();
        assert_eq!(
            lines,
            [
                "apt-get update",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends llvm-22-dev bpftool",
                "rustup toolchain install nightly --profile minimal",
                "rustup component add rust-src --toolchain nightly",
                "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \
                 --no-default-features --features llvm-22",
            ]
        );
        let steps = plan(&state);
        let cargo = steps.last().unwrap();
        assert!(
            !cargo
                .fallback_args
                .as_ref()
                .unwrap()
                .contains(&"--locked".to_owned())
        );
        assert!(blockers(&state, &steps, ROOT_DEBIAN).is_empty());
    }

    #[test]
    fn only_rust_src_missing_needs_neither_root_nor_apt() {
        let state = State {
            rust_src: false,
            ..complete_state()
        };
        let steps = plan(&state);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].tool, Tool::Rustup);
        let user = Abilities {
            root: false,
            apt_get: false,
            rustup: true,
        };
        assert!(blockers(&state, &steps, user).is_empty());
    }

    #[test]
    fn missing_packages_as_user_print_sudo_lines() {
        let state = State {
            missing_packages: vec!["tcpdump"],
            ..complete_state()
        };
        let steps = plan(&state);
        let user = Abilities {
            root: false,
            ..ROOT_DEBIAN
        };
        assert_eq!(
            blockers(&state, &steps, user),
            ["installing Debian packages needs root"]
        );
        let lines: Vec<String> = steps.iter().map(|s| s.manual_line(false)).collect();
        assert_eq!(
            lines,
            [
                "sudo apt-get update",
                "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tcpdump",
            ]
        );
    }

    #[test]
    fn not_debian_or_no_rustup_is_reported() {
        let state = State {
            missing_packages: vec!["bpftool"],
            nightly: false,
            ..complete_state()
        };
        let steps = plan(&state);
        let why = blockers(
            &state,
            &steps,
            Abilities {
                root: true,
                apt_get: false,
                rustup: false,
            },
        );
        assert_eq!(why.len(), 2);
        assert!(why[0].contains("apt-get not found") && why[0].contains("bpftool"));
        assert!(why[1].contains("rustup"));
    }

    #[test]
    fn state_lines_name_what_is_missing() {
        let state = State {
            missing_packages: vec!["tcpdump"],
            bpf_linker: None,
            ..complete_state()
        };
        let lines = state.lines();
        assert!(lines[0].contains("MISSING tcpdump"));
        assert_eq!(lines[3], "bpf-linker: MISSING");
        assert_eq!(state.missing_summary(), "tcpdump, bpf-linker");
    }
}
