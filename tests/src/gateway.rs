//! The real `mim-lb run` on a lab's gateway: writes its config, starts it in the gateway's
//! namespace as an operator would, talks to it through its control socket with the real CLI,
//! and removes everything it made (process, pins, files) when dropped, also on panic.

use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mim_lb::{
    dataplane::{Dataplane, LoadOptions, ServiceRoom},
    status::{BackendStatus, Status},
};

use crate::capture::mac_to_string;
use crate::netns::{in_netns, run_in_with_env};
use crate::process::Proc;
use crate::Lab;

/// The daemon binary under test: `mim-lb-dut`, built by cargo next to the test binaries
/// (integration tests run from `<target>/<profile>/deps/`, this crate's other binaries from
/// `<target>/<profile>/`).
pub fn mim_lb_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let mut dir = exe.parent().expect("an executable lives in a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("mim-lb-dut")
}

/// How the XDP program is attached in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Native,
    Generic,
    /// Generic, chosen by the config's `xdp_mode = "generic"` rather than `--xdp-mode`,
    /// which would override the file on reloads too (for tests that change `xdp_mode`).
    GenericFromFile,
    /// `--xdp-mode auto`: native where the driver allows it, else generic.
    Auto,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic | Mode::GenericFromFile => "generic",
            Mode::Auto => "auto",
        }
    }
}

/// One service for [`lab_config`].
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// Lines of `[service.health]`; empty for the default.
    pub health: String,
    /// Masters (lab indexes) and whether their MAC is written in the config.
    pub masters: Vec<(usize, bool)>,
}

impl ServiceSpec {
    /// A TCP service on the lab's first IPv4 VIP with every master, MACs configured, checked
    /// by TCP every 100 ms (up after 1 success, down after 2 failures).
    pub fn tcp(lab: &Lab, port: u16) -> ServiceSpec {
        ServiceSpec {
            name: format!("tcp-{port}"),
            vip: lab.vip4().into(),
            port,
            protocol: "tcp",
            health: "interval_ms = 100\ntimeout_ms = 100\nrise = 1\nfall = 2".into(),
            masters: (0..lab.master_count()).map(|i| (i, true)).collect(),
        }
    }

    /// A UDP service on `port` of the lab's first IPv4 VIP with every master, checked by TCP on
    /// `tcp_port` (a UDP service has no handshake to check) every 100 ms.
    pub fn udp_checked_by_tcp(lab: &Lab, port: u16, tcp_port: u16) -> ServiceSpec {
        ServiceSpec {
            name: format!("udp-{port}"),
            port,
            protocol: "udp",
            health: format!("port = {tcp_port}\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1"),
            ..ServiceSpec::tcp(lab, tcp_port)
        }
    }

    /// The same service with no master's MAC in the config: the daemon resolves them from
    /// the neighbour table.
    pub fn macs_from_neighbours(mut self) -> ServiceSpec {
        for master in &mut self.masters {
            master.1 = false;
        }
        self
    }
}

/// What a refused reload or command could have changed in a status, without the counters and
/// check ages that move on their own: the tables' digests and every master's state, admin,
/// weight, slots and MAC.
pub fn status_shape(s: &mim_lb::status::Status) -> String {
    let mut text = format!("{} {} {}\n", s.interface, s.xdp_mode, s.pin_dir);
    for svc in &s.services {
        text += &format!("{} {}:{} {} {}\n", svc.name, svc.vip, svc.port, svc.table_size, svc.table_digest);
        for b in &svc.backends {
            text += &format!("  {} {} {} {} {} {:?}\n", b.address, b.state, b.admin, b.weight, b.slots, b.mac);
        }
    }
    text
}

/// A config for the lab's gateway. `extra` goes at the top (e.g. `tcp_idle_timeout_s = 3`).
pub fn lab_config(lab: &Lab, services: &[ServiceSpec], extra: &str) -> String {
    let mut text = format!("interface = \"{}\"\n{extra}\n", lab.gateway_ifname());
    for s in services {
        text += &format!(
            "\n[[service]]\nname = \"{}\"\nvip = \"{}\"\nport = {}\nprotocol = \"{}\"\n",
            s.name, s.vip, s.port, s.protocol
        );
        if !s.health.is_empty() {
            text += &format!("[service.health]\n{}\n", s.health);
        }
        for &(i, with_mac) in &s.masters {
            let address: IpAddr = if s.vip.is_ipv4() {
                lab.master_addr4(i).into()
            } else {
                lab.master_addr6(i).expect("the lab has IPv6").into()
            };
            text += &format!("[[service.backend]]\naddress = \"{address}\"\n");
            if with_mac {
                text += &format!("mac = \"{}\"\n", mac_to_string(&lab.master_mac(i)));
            }
        }
    }
    text
}

/// Where a gateway keeps its pins: `<bpffs>/mim-lb-test-<pid hex>-<n>`.
const PIN_PREFIX: &str = "/sys/fs/bpf/mim-lb-test-";

/// Removes pin directories (and config directories) of gateways whose process is gone: a run
/// that was killed before its `Drop` could remove them. Returns how many were removed; those
/// of live processes are left alone.
pub fn cleanup_stale_pins() -> Result<usize> {
    let (bpffs, prefix) = PIN_PREFIX.rsplit_once('/').expect("an absolute path");
    let mut removed = 0;
    for (dir, prefix) in [(Path::new(bpffs).to_path_buf(), prefix), (std::env::temp_dir(), "mimlb-")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(owner_pid) else {
                continue;
            };
            if !Path::new(&format!("/proc/{owner}")).exists() {
                // FRR's daemons outlive a killed run; their pid files are in the directory.
                crate::frr::kill_stale_daemons(&entry.path());
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => removed += 1,
                    // Another run removing the same leftovers got there first.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", entry.path().display())),
                }
            }
        }
    }
    Ok(removed)
}

/// Runs `mim-lb run --xdp-mode generic --config CONFIG` in the gateway namespace, expecting it
/// to fail (e.g. a second daemon): returns its exit status and everything it printed, or an
/// error if it is still running after 20 s.
pub fn run_failing(lab: &mut Lab, config: &Path) -> Result<(std::process::ExitStatus, String)> {
    let mut cmd = Command::new(mim_lb_binary());
    cmd.args(["run", "--xdp-mode", "generic", "--config"]).arg(config);
    let ns = lab.gateway_ns().to_owned();
    let proc = lab.spawn_in(&ns, &mut cmd)?;
    let status = proc.wait_exit(Duration::from_secs(20)).context("waiting for the failing start to end")?;
    Ok((status, proc.lines().join("\n")))
}

/// The pid in `<pid hex>-<n>`.
fn owner_pid(suffix: &str) -> Option<u32> {
    let (hex, n) = suffix.split_once('-')?;
    n.parse::<u32>().ok()?;
    u32::from_str_radix(hex, 16).ok().filter(|pid| *pid > 0)
}

/// A running `mim-lb run` on the lab's gateway (or on one of its directors).
pub struct Gateway {
    proc: Option<Proc>,
    /// The lab director it runs on (0: the gateway).
    director: usize,
    ns: String,
    dir: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
    mode: Mode,
    /// RLIMIT_NOFILE (soft, hard) the daemon starts with; None inherits the test's.
    nofile: Option<(u64, u64)>,
    /// A command the daemon is started under (e.g. `setpriv ...`), which execs it.
    wrapper: Vec<String>,
    /// The XDP_PASS program on the gateway's bridge port (native mode on veth needs it).
    _peer_pass: Option<Dataplane>,
}

/// `<pid hex>-<n>`, unique in this process: the suffix of every directory a test makes, so that
/// [`cleanup_stale_pins`] can tell whose it is.
pub fn unique_suffix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{:x}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl Gateway {
    /// Writes `config` (which must not set pin_dir or control_socket: the test picks unique
    /// ones), starts the daemon, and waits until it is serving.
    pub fn start(lab: &mut Lab, config: &str, mode: Mode) -> Result<Gateway> {
        Gateway::start_with_args(lab, config, mode, &[])
    }

    /// [`Gateway::start`] with more arguments for `mim-lb run` (e.g. `--keep-pinned`).
    pub fn start_with_args(lab: &mut Lab, config: &str, mode: Mode, args: &[&str]) -> Result<Gateway> {
        Gateway::start_with(lab, 0, config, mode, args, None, &[])
    }

    /// [`Gateway::start_with_args`] on director `director` of a lab with several
    /// ([`crate::LabSpec::directors`]); each gets its own pin dir, control socket and config
    /// file. Director 0 is the gateway [`Gateway::start`] uses.
    pub fn start_on(lab: &mut Lab, director: usize, config: &str, mode: Mode, args: &[&str]) -> Result<Gateway> {
        if director >= lab.director_count() {
            bail!("the lab has {} directors, there is no director {director}", lab.director_count());
        }
        Gateway::start_with(lab, director, config, mode, args, None, &[])
    }

    /// [`Gateway::start`] with the daemon's open file limit set to `soft` and `hard`
    /// (RLIMIT_NOFILE), as a service manager would; restarts keep it.
    pub fn start_with_nofile(lab: &mut Lab, config: &str, mode: Mode, soft: u64, hard: u64) -> Result<Gateway> {
        Gateway::start_with(lab, 0, config, mode, &[], Some((soft, hard)), &[])
    }

    fn start_with(
        lab: &mut Lab,
        director: usize,
        config: &str,
        mode: Mode,
        args: &[&str],
        nofile: Option<(u64, u64)>,
        wrapper: &[&str],
    ) -> Result<Gateway> {
        let suffix = unique_suffix();
        let dir = std::env::temp_dir().join(format!("mimlb-{suffix}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut gw = Gateway {
            proc: None,
            director,
            ns: lab.director_ns(director).to_owned(),
            pin_dir: PathBuf::from(format!("{PIN_PREFIX}{suffix}")),
            socket: dir.join("control.sock"),
            dir,
            mode,
            nofile,
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            _peer_pass: None,
        };
        gw.set_mode(lab, mode)?;
        gw.write_config(config)?;
        gw.launch(lab, args)?;
        Ok(gw)
    }

    /// Starts the daemon again (after [`Gateway::stop`] or [`Gateway::kill`]) with the same
    /// config file and pins.
    pub fn restart(&mut self, lab: &mut Lab, extra_args: &[&str]) -> Result<()> {
        self.launch(lab, extra_args)
    }

    /// Starts the daemon again with the same config file and pins, expecting the start to
    /// fail: returns its exit status and everything it logged.
    pub fn restart_failing(&mut self, lab: &mut Lab, extra_args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
        let proc = self.spawn(lab, extra_args)?;
        let status = proc.wait_exit(Duration::from_secs(20)).context("waiting for the failing start to end")?;
        Ok((status, proc.lines().join("\n")))
    }

    /// The mode of the next (re)start. Native and auto (which is native on veth unless the
    /// driver refuses) need the XDP_PASS program on the peer, or XDP_TX frames are dropped.
    pub fn set_mode(&mut self, lab: &Lab, mode: Mode) -> Result<()> {
        self.mode = mode;
        if mode != Mode::Generic && self._peer_pass.is_none() {
            self._peer_pass = Some(attach_peer_pass(lab, self.director)?);
        }
        Ok(())
    }

    /// Starts the daemon again with the same config file and pins, without waiting for it to
    /// serve (to act on it while it starts).
    pub fn restart_no_wait(&mut self, lab: &mut Lab, extra_args: &[&str]) -> Result<Proc> {
        self.spawn(lab, extra_args)
    }

    fn launch(&mut self, lab: &mut Lab, extra_args: &[&str]) -> Result<()> {
        let proc = self.spawn(lab, extra_args)?;
        proc.wait_for_line("ready: serving", Duration::from_secs(20))
            .context("waiting for mim-lb to start")?;
        Ok(())
    }

    /// [`Gateway::start`] with the daemon started under `wrapper` (a command that execs the
    /// rest of its arguments, e.g. `setpriv --bounding-set ...`); restarts keep it.
    pub fn start_wrapped(lab: &mut Lab, config: &str, mode: Mode, wrapper: &[&str]) -> Result<Gateway> {
        Gateway::start_with(lab, 0, config, mode, &[], None, wrapper)
    }

    fn spawn(&mut self, lab: &mut Lab, extra_args: &[&str]) -> Result<Proc> {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(mim_lb_binary());
                c
            }
            None => Command::new(mim_lb_binary()),
        };
        cmd.args(["--log-level", "info,mim_lb=debug", "run", "--config"]).arg(self.config_path());
        if self.mode != Mode::GenericFromFile {
            cmd.args(["--xdp-mode", self.mode.name()]);
        }
        cmd.args(extra_args);
        if let Some((soft, hard)) = self.nofile {
            // SAFETY: only setrlimit(2), which is async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let ns = self.ns.clone();
        let proc = lab.spawn_in(&ns, &mut cmd)?;
        self.proc = Some(proc.clone());
        Ok(proc)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("mim-lb.toml")
    }

    /// Replaces the config file (for reloads), adding the test's pin dir and socket.
    pub fn write_config(&self, config: &str) -> Result<()> {
        let text = format!(
            "pin_dir = \"{}\"\ncontrol_socket = \"{}\"\n{config}",
            self.pin_dir.display(),
            self.socket.display()
        );
        std::fs::write(self.config_path(), text).context("writing the config")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The lab director this daemon runs on (0 for [`Gateway::start`]).
    pub fn director(&self) -> usize {
        self.director
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Whether the daemon process is running (started and not yet exited).
    pub fn running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| matches!(p.try_exit_status(), Ok(None)))
    }

    /// The daemon process.
    pub fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("started")
    }

    /// Runs `mim-lb ARGS...` in the gateway namespace, pointed at this daemon's socket
    /// (MIM_LB_SOCKET), and returns its stdout; a non-zero exit is an error carrying stderr.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let socket = self.socket.to_str().expect("utf-8 path");
        run_in_with_env(&self.ns, mim_lb_binary().to_str().expect("utf-8 path"), args, &[("MIM_LB_SOCKET", socket)])
    }

    /// The status, asked over the control socket from this process: no CLI process per
    /// question, for polling several times a second.
    pub fn query_status(&self) -> Result<Status> {
        let response = mim_lb::control::client::request(&self.socket, &mim_lb::control::protocol::Request::Status)?;
        if !response.ok {
            bail!("mim-lb refused to give its status: {}", response.error.unwrap_or_default());
        }
        response.status.context("mim-lb answered without a status")
    }

    pub fn status(&self) -> Result<Status> {
        let json = self.ctl(&["status", "--json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing status JSON: {json}"))
    }

    /// The status of one backend.
    pub fn backend(&self, address: IpAddr) -> Result<BackendStatus> {
        self.status()?
            .services
            .into_iter()
            .flat_map(|s| s.backends)
            .find(|b| b.address == address)
            .with_context(|| format!("no backend {address} in the status"))
    }

    /// Polls the status until `done` holds for it, for at most `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&Status) -> bool) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{what}: not reached within {timeout:?}; status:\n{}", mim_lb::status::render(&status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every backend of every service is up.
    pub fn wait_all_up(&self) -> Result<Status> {
        self.wait_until("every backend up", Duration::from_secs(20), |s| {
            s.services.iter().all(|svc| svc.backends.iter().all(|b| b.state == "up"))
        })
    }

    /// SIGTERM, and waits for the daemon to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.take() {
            proc.signal(libc::SIGTERM)?;
            let status = proc.wait_exit(Duration::from_secs(10))?;
            if !status.success() {
                bail!("mim-lb exited with {status}:\n{}", proc.tail(30));
            }
        }
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.take() {
            proc.signal(libc::SIGKILL)?;
            proc.wait_exit(Duration::from_secs(10))?;
        }
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(proc) = self.proc.take() {
            proc.stop_politely();
        }
        // A killed or --keep-pinned daemon leaves its pins (and a pinned attachment, which goes
        // with the lab's namespace); remove them whatever happened.
        if self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loads the object (unpinned) in this process and attaches its XDP_PASS program to the
/// bridge port of director `director` (0: the gateway), inside the bridge namespace. Native
/// XDP_TX on a veth drops frames unless the peer has an XDP program.
fn attach_peer_pass(lab: &Lab, director: usize) -> Result<Dataplane> {
    let peer = lab.director_peer_ifname(director).to_owned();
    in_netns(lab.bridge_ns(), move || -> Result<Dataplane> {
        let mut dataplane = Dataplane::load(&LoadOptions {
            flow_table_size: 1024,
            // Only its pass program runs: the smallest maps.
            service_room: ServiceRoom::exactly(1),
            ..LoadOptions::default()
        })?;
        dataplane
            .pass_program_mut()
            .attach(&peer, aya::programs::XdpMode::Driver)
            .with_context(|| format!("attaching XDP_PASS to {peer}"))?;
        Ok(dataplane)
    })?
}
