//! `cargo xtask test`: the whole test suite, as root, with leftovers of killed runs removed.
//!
//! Tests name what they create after their own pid (`mimlb-<pidhex>-...` namespaces,
//! `/sys/fs/bpf/mim-lb-test-<pidhex>-<n>` pin directories). A test process that was killed never
//! ran its cleanup, so anything whose owner pid is gone is garbage, while a concurrent run's
//! objects (owner alive) are left alone.
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::bpffs::{self, BPFFS};
use crate::{setup, util};

const NETNS_PREFIX: &str = "mimlb-";
const PIN_PREFIX: &str = "mim-lb-test-";

/// The owner pid in a lab namespace name `mimlb-<pidhex>-...`.
pub fn netns_owner(name: &str) -> Option<u32> {
    owner_in(name.strip_prefix(NETNS_PREFIX)?)
}

/// The owner pid in a pin directory name `mim-lb-test-<pidhex>-<n>`.
pub fn pin_dir_owner(name: &str) -> Option<u32> {
    owner_in(name.strip_prefix(PIN_PREFIX)?)
}

fn owner_in(rest: &str) -> Option<u32> {
    let hex = rest.split('-').next()?;
    // Anything that does not parse is not ours to judge, so it is kept.
    u32::from_str_radix(hex, 16).ok().filter(|&pid| pid > 0)
}

/// Namespace names from `ip netns list`, whose lines may end in `(id: N)`.
pub fn parse_netns_list(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

pub(crate) fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[derive(Default)]
pub(crate) struct Cleaned {
    netns: usize,
    pin_dirs: usize,
    daemons: usize,
}

/// The routing daemons a test harness runs with their pid files in a `mimlb-<pidhex>-<n>`
/// temp directory (tests/src/frr.rs). They may outlive a killed test run: they change their
/// credentials at start, which may clear the parent-death signal the harness gives them.
const DAEMON_PID_FILES: [&str; 3] = ["zebra.pid", "bgpd.pid", "bfdd.pid"];

/// Kills the daemons recorded in the temp directories of test runs that are gone, each only if
/// its command line names that directory (so a reused pid is left alone). The directories
/// themselves are left to the harness, which removes them (gateway::cleanup_stale_pins).
fn kill_stale_daemons() -> usize {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else { return 0 };
    let mut killed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().and_then(netns_owner).is_none_or(alive) {
            continue;
        }
        let dir = entry.path();
        let Some(dir_text) = dir.to_str() else { continue };
        for file in DAEMON_PID_FILES {
            let Ok(text) = std::fs::read_to_string(dir.join(file)) else { continue };
            let Ok(pid) = text.trim().parse::<i32>() else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // SAFETY: kill(2) of a process whose command line names the dead run's directory.
            if pid > 0 && String::from_utf8_lossy(&cmdline).contains(dir_text) && unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}

pub(crate) fn remove_stale() -> Result<Cleaned> {
    let mut cleaned = Cleaned { daemons: kill_stale_daemons(), ..Cleaned::default() };

    let list = util::stdout_of(util::command("ip").args(["netns", "list"]))?;
    for name in parse_netns_list(&list) {
        if netns_owner(name).is_some_and(|pid| !alive(pid)) {
            // A failure here is not fatal: a lab test that needs this name reports it itself.
            match util::stdout_of(util::command("ip").args(["netns", "delete", name])) {
                Ok(_) => cleaned.netns += 1,
                Err(e) => eprintln!("xtask test: warning: {e:#}"),
            }
        }
    }

    let entries = match std::fs::read_dir(BPFFS) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cleaned),
        Err(e) => return Err(e).with_context(|| format!("listing {BPFFS}")),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {BPFFS}"))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(pin_dir_owner) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => cleaned.pin_dirs += 1,
            Err(e) => eprintln!(
                "xtask test: warning: removing stale pins {}: {e}",
                path.display()
            ),
        }
    }
    Ok(cleaned)
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Keeps Ctrl-C from ending xtask before the post-run cleanup, while the test processes (which
/// get the same Ctrl-C from the terminal) still die of it: a handler, unlike SIG_IGN, is reset
/// to the default by exec, so children do not inherit it.
pub(crate) fn survive_interrupts() {
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            ignore_signal as *const () as libc::sighandler_t,
        );
    }
}

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    if !util::is_root() {
        bail!(
            "`cargo xtask test` must run as root: the tests load XDP programs, create network \
             namespaces and pin maps in bpffs. Try: sudo -E env \"PATH=$PATH\" cargo xtask test"
        );
    }
    setup::ensure()?;
    bpffs::ensure("the test suite")?;
    let before = remove_stale().context("removing leftovers of earlier test runs")?;

    let started = Instant::now();
    survive_interrupts();
    let mut cmd: Command = util::cargo();
    // Not `--workspace`: that includes mim-lb-ebpf, which only builds for the bpf target (its
    // host build fails to link). The workspace's default-members are every other crate, and
    // leaving the selection to default-members lets `-p NAME` in ARGS narrow the run.
    cmd.arg("test").args(&args);
    let status = util::status(&mut cmd)?;
    let elapsed = started.elapsed();

    let after = remove_stale().context("removing what the test run left behind")?;
    let outcome = if status.success() {
        "passed".to_owned()
    } else {
        format!("FAILED ({status})")
    };
    println!(
        "xtask test: {outcome} in {:.1}s; stale lab namespaces removed: {} before, {} after; \
         stale pin dirs removed: {} before, {} after; stale routing daemons killed: {} before, {} \
         after",
        elapsed.as_secs_f64(),
        before.netns,
        after.netns,
        before.pin_dirs,
        after.pin_dirs,
        before.daemons,
        after.daemons,
    );
    Ok(util::exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_hex_pids() {
        assert_eq!(netns_owner("mimlb-1f40-client"), Some(0x1f40));
        assert_eq!(netns_owner("mimlb-ab"), Some(0xab));
        assert_eq!(pin_dir_owner("mim-lb-test-1f40-3"), Some(0x1f40));
    }

    #[test]
    fn foreign_names_have_no_owner() {
        assert_eq!(netns_owner("other-1f40-x"), None);
        assert_eq!(netns_owner("mimlb-client-1"), None);
        assert_eq!(netns_owner("mimlb-0-x"), None);
        assert_eq!(netns_owner("mimlb--x"), None);
        assert_eq!(pin_dir_owner("mim-lb"), None);
        assert_eq!(pin_dir_owner("mim-lb-test-zz-1"), None);
    }

    #[test]
    fn netns_list_with_and_without_ids() {
        let out = "mimlb-1f40-client (id: 2)\nmimlb-1f40-bridge\n\nblue (id: 0)\n";
        assert_eq!(
            parse_netns_list(out),
            ["mimlb-1f40-client", "mimlb-1f40-bridge", "blue"]
        );
    }

    #[test]
    fn own_process_is_alive() {
        assert!(alive(std::process::id()));
    }
}
