//! FRR (Debian's `frr`) in a lab with a router ([`crate::LabSpec::router`]), the counterpart of
//! [`crate::bird`]: the router's FRR takes the VIPs' routes from every director over BGP (with
//! BFD) and installs one ECMP route per VIP; each director's FRR imports its mim-lb's
//! `[announce]` table (`ip import-table`) and announces it. The configs are the shipped
//! examples, `dist/frr/router.conf` and `dist/frr/director.conf`, with only their site-specific
//! values (addresses, the VIPs' prefix, the host name) replaced by the lab's.
//!
//! Every [`Frr`] runs its own `zebra`, `bgpd` and `bfdd` in the foreground, with every file
//! (pid files, the zebra socket, the vty sockets, bfdd's control socket) in a directory of its
//! own, and no TCP vty; the integrated config is applied the way the system's `frrinit` does
//! it, by `vtysh -b` (here `vtysh --vty_socket DIR --config_dir DIR -b`) to daemons started
//! without one.
//! No system FRR is used or touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Lab;
use crate::bird::{ANNOUNCE_TABLE, RoutingDaemon};
use crate::gateway::unique_suffix;
use crate::process::Proc;

/// Where Debian installs the daemons (they are not on PATH).
const FRR_LIBEXEC: &str = "/usr/lib/frr";
/// Started in this order: bgpd and bfdd connect to zebra's socket.
const DAEMONS: [&str; 3] = ["zebra", "bgpd", "bfdd"];

/// The shipped example `dist/frr/<name>`.
pub fn dist_config(name: &str) -> Result<String> {
    let path = crate::bird::repo_root().join("dist/frr").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `template` with every whole word equal to a `from` of `values` replaced by its `to`, outside
/// comments (`!` lines). Every `from` must occur, so that a changed example value fails here
/// rather than leaving the example's value in place. Whole words, so that the router's
/// 192.0.2.1 does not match inside a director's 192.0.2.11.
pub fn set_values(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut used = vec![false; values.len()];
    let mut out = String::new();
    for line in template.lines() {
        if line.trim_start().starts_with('!') {
            out.push_str(line);
        } else {
            let indent = &line[..line.len() - line.trim_start().len()];
            let words: Vec<&str> = line
                .split_whitespace()
                .map(|w| match values.iter().position(|(from, _)| *from == w) {
                    Some(k) => {
                        used[k] = true;
                        values[k].1.as_str()
                    }
                    None => w,
                })
                .collect();
            out.push_str(indent);
            out.push_str(&words.join(" "));
        }
        out.push('\n');
    }
    if let Some(k) = used.iter().position(|u| !u) {
        bail!("the FRR example has no `{}` outside comments", values[k].0);
    }
    Ok(out)
}

/// The lab's directors' segment as a /24 (the VIPs are on it too).
fn segment(lab: &Lab) -> Result<String> {
    let o = lab.router_addr4().context("the lab has no router (LabSpec::router)")?.octets();
    Ok(format!("{}.{}.{}.0/24", o[0], o[1], o[2]))
}

/// The router's FRR config: the shipped example for this lab (its address, the segment, the
/// VIPs' prefix).
pub fn router_config(lab: &Lab) -> Result<String> {
    let router = lab.router_addr4().context("the lab has no router (LabSpec::router)")?;
    let segment = segment(lab)?;
    set_values(
        &dist_config("router.conf")?,
        &[("192.0.2.1", router.to_string()), ("192.0.2.0/24", segment.clone()), ("203.0.113.0/24", segment)],
    )
}

/// Director `i`'s FRR config: the shipped example with its address, the router's, and its
/// name. The example's table is the lab's.
pub fn director_config(lab: &Lab, i: usize) -> Result<String> {
    let router = lab.router_addr4().context("the lab has no router (LabSpec::router)")?;
    debug_assert_eq!(ANNOUNCE_TABLE, 100, "the example imports table 100");
    set_values(
        &dist_config("director.conf")?,
        &[
            ("192.0.2.11", lab.director_addr4(i).to_string()),
            ("192.0.2.1", router.to_string()),
            ("director1", format!("director{}", i + 1)),
        ],
    )
}

/// Kills the FRR daemons whose pid files are in `dir`, the directory of an [`Frr`] whose test
/// process is gone. The lab starts every process with a parent-death signal, but FRR's daemons
/// change their credentials and capabilities at start, which may clear it (a zebra started
/// that way outlived its SIGKILLed parent in a trial), and would then keep a killed run's
/// namespaces alive. A pid counts only if that process names `dir` in its
/// command line, so a reused pid is left alone. Returns how many were killed.
pub fn kill_stale_daemons(dir: &Path) -> usize {
    let Some(dir_text) = dir.to_str() else { return 0 };
    let mut killed = 0;
    for daemon in DAEMONS {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{daemon}.pid"))) else { continue };
        let Ok(pid) = text.trim().parse::<i32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid > 0 && String::from_utf8_lossy(&cmdline).contains(dir_text) {
            // SAFETY: kill(2) of a process checked above to be one of this harness's daemons.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}

/// zebra, bgpd and bfdd in a namespace, configured by vtysh. Dropping it stops them and
/// removes its directory.
pub struct Frr {
    ns: String,
    dir: PathBuf,
    procs: Vec<Proc>,
}

impl Frr {
    /// Writes `config` and starts the daemons in `ns`; returns once vtysh applied the config.
    pub fn start(lab: &mut Lab, ns: &str, config: &str) -> Result<Frr> {
        // Under the temp dir and named like the daemons' directories, so that `cargo xtask
        // test` removes it after a killed run.
        let dir = std::env::temp_dir().join(format!("mimlb-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("frr.conf"), config).context("writing frr.conf")?;
        // Each daemon starts with an empty config of its own: without -f it would read
        // /etc/frr/<daemon>.conf.
        std::fs::write(dir.join("empty.conf"), "").context("writing empty.conf")?;
        // vtysh -b reads its own settings from the same directory (or complains).
        std::fs::write(dir.join("vtysh.conf"), "").context("writing vtysh.conf")?;
        let mut frr = Frr { ns: ns.to_owned(), dir, procs: Vec::new() };
        frr.restart(lab)?;
        Ok(frr)
    }

    /// Starts the daemons again with the same config (after [`Frr::kill`]).
    pub fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        if !self.procs.is_empty() {
            bail!("FRR in {} is running already", self.ns);
        }
        // Killed daemons leave their sockets behind: a new bgpd would wait on the dead zebra's,
        // and the wait below would take a dead daemon's vty socket for the new one's (vtysh
        // then configures nothing, and says so only on stderr).
        for daemon in DAEMONS {
            let _ = std::fs::remove_file(self.dir.join(format!("{daemon}.vty")));
        }
        let _ = std::fs::remove_file(self.dir.join("zserv.api"));
        let _ = std::fs::remove_file(self.dir.join("bfdd.sock"));
        for daemon in DAEMONS {
            let mut cmd = self.command(daemon);
            let ns = self.ns.clone();
            let proc = lab.spawn_in(&ns, &mut cmd).with_context(|| format!("starting {daemon} (apt-get install frr)"))?;
            self.procs.push(proc);
            // zebra's socket must exist before the others start, or they retry for a while.
            let ready = if daemon == "zebra" { "zserv.api" } else { "" };
            self.wait_for(daemon, &[&format!("{daemon}.vty"), ready])?;
        }
        // `vtysh -b` as at boot (frrinit), from this directory's frr.conf. Either way (`-f`
        // too) bgpd holds its peers for about 5 s after it starts ("released from
        // config-pending hold" with `debug bgp neighbor-events`): a director with FRR joins the
        // route about 5 s after it is ready, where one with BIRD takes under a second.
        let dir = self.dir.to_str().expect("utf-8 path").to_owned();
        let out = self.vtysh_args(&["--config_dir", &dir, "-b"])?;
        // Any complaint is a failure.
        if !out.trim().is_empty() {
            bail!("vtysh -b (frr.conf) in {} complained:\n{out}", self.ns);
        }
        // ...and one that reached no daemon says nothing on stdout: bgpd must have its part.
        let running = self.vtysh("show running-config")?;
        if !running.contains("\nrouter bgp ") {
            bail!("FRR in {} did not take its config:\n{running}", self.ns);
        }
        Ok(())
    }

    /// `DAEMON` with this instance's files: `-u root -g frrvty` because the daemons insist
    /// that their user be in the vty group (frrvty), which root is not; bfdd's control socket
    /// and every vty socket in the directory; no TCP vty (`-P 0`).
    fn command(&self, daemon: &str) -> Command {
        let mut cmd = Command::new(format!("{FRR_LIBEXEC}/{daemon}"));
        cmd.arg("-f")
            .arg(self.dir.join("empty.conf"))
            .arg("-i")
            .arg(self.dir.join(format!("{daemon}.pid")))
            .arg("-z")
            .arg(self.dir.join("zserv.api"))
            .arg("--vty_socket")
            .arg(&self.dir)
            .args(["-P", "0", "-u", "root", "-g", "frrvty", "--log", "stdout"]);
        if daemon == "bfdd" {
            cmd.arg("--bfdctl").arg(self.dir.join("bfdd.sock"));
        }
        cmd
    }

    /// Waits until `files` (those not empty) exist in the directory.
    fn wait_for(&self, daemon: &str, files: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !files.iter().filter(|f| !f.is_empty()).all(|f| self.dir.join(f).exists()) {
            if !self.running() || Instant::now() >= deadline {
                bail!("{daemon} in {} did not come up:\n{}", self.ns, self.tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Every daemon is running.
    pub fn running(&self) -> bool {
        !self.procs.is_empty() && self.procs.iter().all(|p| matches!(p.try_exit_status(), Ok(None)))
    }

    /// `vtysh --vty_socket DIR -c COMMAND`: its output.
    pub fn vtysh(&self, command: &str) -> Result<String> {
        self.vtysh_args(&["-c", command])
    }

    fn vtysh_args(&self, args: &[&str]) -> Result<String> {
        let dir = self.dir.to_str().expect("utf-8 path");
        let mut all = vec!["--vty_socket", dir];
        all.extend_from_slice(args);
        crate::netns::run_in(&self.ns, "vtysh", &all)
    }

    /// SIGKILL to every daemon: no BGP notification, no withdrawal.
    pub fn kill(&mut self) -> Result<()> {
        for proc in &self.procs {
            let _ = proc.signal(libc::SIGKILL);
        }
        for proc in self.procs.drain(..) {
            proc.wait_exit(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// The last lines each daemon logged.
    pub fn tail(&self, n: usize) -> String {
        self.procs.iter().map(|p| format!("{}:\n{}", p.label(), p.tail(n))).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        // In reverse: zebra last, so that it removes the routes bgpd gave it.
        for proc in self.procs.drain(..).rev() {
            let _ = proc.signal(libc::SIGTERM);
            if proc.wait_exit(Duration::from_secs(5)).is_err() {
                proc.signal_group(libc::SIGKILL);
                let _ = proc.wait_exit(Duration::from_secs(2));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RoutingDaemon for Frr {
    fn start_router(lab: &mut Lab, edit: &dyn Fn(&str) -> String) -> Result<Self> {
        let ns = lab.router_ns().context("the lab has no router")?.to_owned();
        Frr::start(lab, &ns, &edit(&router_config(lab)?))
    }

    fn start_director(lab: &mut Lab, i: usize, edit: &dyn Fn(&str) -> String) -> Result<Self> {
        let ns = lab.director_ns(i).to_owned();
        Frr::start(lab, &ns, &edit(&director_config(lab, i)?))
    }

    fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        Frr::restart(self, lab)
    }

    fn kill(&mut self) -> Result<()> {
        Frr::kill(self)
    }

    fn sessions(&self) -> String {
        let bgp = self.vtysh("show bgp summary").unwrap_or_else(|e| format!("{e:#}"));
        let bfd = self.vtysh("show bfd peers brief").unwrap_or_else(|e| format!("{e:#}"));
        format!("{bgp}\n{bfd}")
    }
}
