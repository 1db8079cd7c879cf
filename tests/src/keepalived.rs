//! keepalived (Debian's, real VRRP) on a lab's directors, moving the IPv4 VIPs between them as
//! it would between two mim-lb machines, and [`Directors`]: the daemon and keepalived on every
//! director of a lab, with the failures a test inflicts on one of them.
//!
//! What the lab needed (see also /work/shared/notes/xdp-lab-facts.md):
//! - sub-second adverts need VRRPv3 (`vrrp_version 3` before the instance);
//! - every instance has its own pid files (`-p`, `-r`, `-c`), or the second refuses to start;
//! - `kill -9` of keepalived leaves the VIP on the interface, so a dead director is its
//!   processes killed *and* its link down ([`Directors::kill`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::gateway::{Gateway, Mode, ServiceSpec, lab_config, mim_lb_binary};
use crate::lab::HOST_IFNAME;
use crate::process::Proc;
use crate::Lab;

/// How the directors run VRRP.
#[derive(Debug, Clone)]
pub struct VrrpSpec {
    /// Between adverts. A backup takes over after about three missed ones (VRRPv3's master
    /// down interval), so this sets how long the VIP is nowhere after the master dies: about
    /// 0.65 s with 200 ms, which leaves a loaded machine some scheduling delay before a backup
    /// takes over by mistake.
    pub advert_int: Duration,
    pub virtual_router_id: u8,
    /// Make `mim-lb ready` a `track_script`: a director whose daemon is not ready (or not
    /// running) goes to FAULT and gives up the VIP, and one that starts does not claim it
    /// before its daemon says it is ready (`init_fail`).
    pub track_ready: bool,
}

impl Default for VrrpSpec {
    fn default() -> Self {
        VrrpSpec { advert_int: Duration::from_millis(200), virtual_router_id: 51, track_ready: true }
    }
}

/// Director `i`'s VRRP priority: director 0 highest, so it is the master whenever it can be and
/// takes the VIP back when it returns (every instance preempts).
pub fn priority(i: usize) -> u8 {
    200 - 20 * i.min(9) as u8
}

/// keepalived's config for director `i`, whose daemon listens on `socket`. Both directors
/// start as BACKUP and the election (priority, preempt) decides: a director that starts never
/// grabs the VIP before it has heard whether a better one is there.
pub fn config_for(lab: &Lab, i: usize, socket: &Path, spec: &VrrpSpec) -> String {
    let advert = spec.advert_int.as_secs_f64();
    // keepalived takes one statement per line, and no `;`.
    let mut c = format!(
        "global_defs {{\n\
         \x20   router_id mimlb-d{i}\n\
         \x20   vrrp_version 3\n\
         \x20   script_user root\n\
         \x20   # Gratuitous ARPs at once when becoming master, again a second later in case\n\
         \x20   # the first burst was ignored, and not after that.\n\
         \x20   vrrp_garp_master_delay 1\n\
         \x20   vrrp_garp_master_repeat 3\n\
         \x20   vrrp_garp_master_refresh 0\n\
         }}\n"
    );
    if spec.track_ready {
        c += &format!(
            "vrrp_script mim_lb_ready {{\n\
             \x20   script \"{} ready --quiet --timeout 1s --socket {}\"\n\
             \x20   # Whole seconds only (keepalived 2.2).\n\
             \x20   interval 1\n\
             \x20   timeout 2\n\
             \x20   rise 1\n\
             \x20   fall 1\n\
             \x20   init_fail\n\
             }}\n",
            mim_lb_binary().display(),
            socket.display()
        );
    }
    c += &format!(
        "vrrp_instance mimlb {{\n\
         \x20   state BACKUP\n\
         \x20   interface {HOST_IFNAME}\n\
         \x20   virtual_router_id {}\n\
         \x20   priority {}\n\
         \x20   advert_int {advert}\n\
         \x20   preempt\n\
         \x20   virtual_ipaddress {{\n",
        spec.virtual_router_id,
        priority(i)
    );
    for vip in lab.vips4() {
        c += &format!("        {vip}/32 dev {HOST_IFNAME}\n");
    }
    c += "    }\n";
    if spec.track_ready {
        c += "    track_script {\n        mim_lb_ready\n    }\n";
    }
    c += "}\n";
    c
}

/// keepalived running on one director of a lab. Dropping it stops it (SIGTERM to its process
/// group, which gives the VIP up cleanly) and removes its files.
pub struct Keepalived {
    director: usize,
    ns: String,
    dir: PathBuf,
    proc: Option<Proc>,
}

/// `mimlb-<pid hex>-<n>` like the daemons' directories, so that `cargo xtask test` removes it
/// after a killed run (see [`crate::gateway::cleanup_stale_pins`]).
fn unique_dir() -> PathBuf {
    std::env::temp_dir().join(format!("mimlb-{}", crate::gateway::unique_suffix()))
}

impl Keepalived {
    /// Writes director `i`'s config (tracking the daemon on `socket`) and starts keepalived in
    /// the director's namespace, in the foreground, logging to its output.
    pub fn start(lab: &mut Lab, i: usize, socket: &Path, spec: &VrrpSpec) -> Result<Keepalived> {
        let config = config_for(lab, i, socket, spec);
        Keepalived::start_with_config(lab, i, &config)
    }

    /// Starts keepalived on director `i` with `config` as it is (e.g. the shipped example).
    pub fn start_with_config(lab: &mut Lab, i: usize, config: &str) -> Result<Keepalived> {
        let dir = unique_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ka = Keepalived { director: i, ns: lab.director_ns(i).to_owned(), dir, proc: None };
        std::fs::write(ka.config_path(), config).context("writing keepalived.conf")?;
        ka.restart(lab)?;
        Ok(ka)
    }

    /// Starts keepalived again with the same config (after [`Keepalived::kill`]), and waits
    /// until its VRRP process has read the config.
    pub fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        if self.proc.as_ref().is_some_and(|p| matches!(p.try_exit_status(), Ok(None))) {
            bail!("keepalived on director {} is running already", self.director);
        }
        // The killed one's pid files name processes that may still be zombies for a moment
        // (their parent is gone), which keepalived takes for a running instance.
        for f in ["keepalived.pid", "vrrp.pid", "checkers.pid"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        let mut cmd = Command::new("keepalived");
        // -n: foreground; -l: log to stdout; -D: detailed; -P: VRRP only (no IPVS checker).
        cmd.args(["-n", "-l", "-D", "-P", "-f"])
            .arg(self.config_path())
            .arg("-p")
            .arg(self.dir.join("keepalived.pid"))
            .arg("-r")
            .arg(self.dir.join("vrrp.pid"))
            .arg("-c")
            .arg(self.dir.join("checkers.pid"));
        let ns = self.ns.clone();
        let proc = lab.spawn_in(&ns, &mut cmd)?;
        self.proc = Some(proc.clone());
        // Logged by the VRRP process once it has read the config and opened its sockets. Not
        // "Entering ... STATE": an instance whose track script starts failed (`init_fail`)
        // begins in FAULT without saying so.
        proc.wait_for_line("Startup complete", Duration::from_secs(10))
            .context("waiting for keepalived's VRRP instance to start")?;
        Ok(())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("keepalived.conf")
    }

    pub fn director(&self) -> usize {
        self.director
    }

    /// The keepalived process (its VRRP child is in its process group).
    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    /// SIGKILL to keepalived and its VRRP child at once: neither can give the VIP up or send
    /// a last advert, as when the machine dies. The VIP stays on the interface.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.take() {
            proc.signal_group(libc::SIGKILL);
            proc.wait_exit(Duration::from_secs(10)).context("waiting for the killed keepalived")?;
        }
        Ok(())
    }

    /// The last `n` lines keepalived logged.
    pub fn tail(&self, n: usize) -> String {
        self.proc.as_ref().map(|p| p.tail(n)).unwrap_or_default()
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Some(proc) = self.proc.take() {
            proc.signal_group(libc::SIGTERM);
            if proc.wait_exit(Duration::from_secs(5)).is_err() {
                proc.signal_group(libc::SIGKILL);
                let _ = proc.wait_exit(Duration::from_secs(2));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directors on the segment that have the lab's first IPv4 VIP on their `eth0` now. A
/// director cut off the segment is left out: a killed keepalived leaves the VIP on the
/// interface, where nobody can see it.
pub fn vip_holders(lab: &Lab) -> Result<Vec<usize>> {
    let vip = lab.vip4();
    let mut holders = Vec::new();
    for i in 0..lab.director_count() {
        if lab.director_addrs4(i)?.contains(&vip) && lab.director_connected(i)? {
            holders.push(i);
        }
    }
    Ok(holders)
}

/// Waits until director `i` alone holds the VIP; returns how long that took.
pub fn wait_sole_holder(lab: &Lab, i: usize, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let holders = vip_holders(lab)?;
        if holders == [i] {
            return Ok(started.elapsed());
        }
        if Instant::now() >= deadline {
            bail!("director {i} is not the only holder of {} within {timeout:?}: held by {holders:?}", lab.vip4());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One config per director of `lab`: [`lab_config`] of `services` with `extra` and then
/// `own(i)`, the part that differs between directors (a `[sync]` section's `listen` and
/// `peers`), at the top.
pub fn director_configs(lab: &Lab, services: &[ServiceSpec], extra: &str, own: impl Fn(usize) -> String) -> Vec<String> {
    (0..lab.director_count()).map(|i| lab_config(lab, services, &format!("{extra}\n{}", own(i)))).collect()
}

/// The daemon and keepalived on every director of a lab, each daemon with its own config.
/// Declare it after the [`Lab`], so that it is dropped (daemons stopped, files removed) first.
pub struct Directors {
    gateways: Vec<Gateway>,
    keepalived: Vec<Keepalived>,
}

impl Directors {
    /// Starts `mim-lb run` on every director, director `i` with `configs[i]` (the same
    /// services on each; a per-director part such as `[sync]` is the caller's to add, e.g. with
    /// [`director_configs`]), waits until each sees every backend up, then starts keepalived on
    /// each and waits until director 0 alone holds the VIP.
    pub fn start(lab: &mut Lab, mode: Mode, configs: &[String], spec: VrrpSpec) -> Result<Directors> {
        let mut directors = Directors::start_daemons(lab, mode, configs)?;
        let texts: Vec<String> =
            (0..lab.director_count()).map(|i| config_for(lab, i, directors.gateways[i].socket(), &spec)).collect();
        directors.start_keepalived(lab, &texts)?;
        // The first script run, then three adverts' worth of silence: a few seconds at most.
        directors.wait_master(lab, 0, Duration::from_secs(15))?;
        Ok(directors)
    }

    /// The first half of [`Directors::start`]: the daemons only, each with every backend up.
    pub fn start_daemons(lab: &mut Lab, mode: Mode, configs: &[String]) -> Result<Directors> {
        if configs.len() != lab.director_count() {
            bail!("{} configs for {} directors", configs.len(), lab.director_count());
        }
        let mut gateways = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            let gw = Gateway::start_on(lab, i, config, mode, &[]).with_context(|| format!("starting mim-lb on director {i}"))?;
            gateways.push(gw);
        }
        for gw in &gateways {
            gw.wait_all_up().with_context(|| format!("director {}", gw.director()))?;
        }
        Ok(Directors { gateways, keepalived: Vec::new() })
    }

    /// The second half: keepalived on director `i` with `texts[i]` as its config, on each.
    /// Returns once each has started, not once one is master.
    pub fn start_keepalived(&mut self, lab: &mut Lab, texts: &[String]) -> Result<()> {
        if texts.len() != self.gateways.len() || !self.keepalived.is_empty() {
            bail!("keepalived needs one config per director, started once");
        }
        for (i, text) in texts.iter().enumerate() {
            let ka = Keepalived::start_with_config(lab, i, text).with_context(|| format!("starting keepalived on director {i}"))?;
            self.keepalived.push(ka);
        }
        Ok(())
    }

    /// Waits until no director's table has a changed slot. Backends come up one after
    /// another, so every start leaves slots marked with the master they had first, and a
    /// director sends the unrecorded flows of a marked slot to that previous master: a flow
    /// that began on another director, recorded nowhere here, would go there and be reset.
    /// Marks clear one `tcp_idle_timeout_s` after the change (give the directors a short one).
    /// Without flow sync, a failover keeps connections only between settled tables; with it,
    /// see [`Directors::wait_synced`].
    pub fn wait_settled(&self, timeout: Duration) -> Result<()> {
        self.wait_all("a settled table (no changed slot)", timeout, |s| s.services.iter().all(|s| s.changed_slots == 0))
    }

    pub fn gateway(&self, i: usize) -> &Gateway {
        &self.gateways[i]
    }

    /// Polls the status of every director whose daemon runs until `done` holds for each (e.g.
    /// a master marked down by both before a kill), for at most `timeout` in all.
    pub fn wait_all(&self, what: &str, timeout: Duration, done: impl Fn(&mim_lb::status::Status) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for gw in self.gateways.iter().filter(|gw| gw.running()) {
            let left = deadline.saturating_duration_since(Instant::now());
            gw.wait_until(what, left, &done).with_context(|| format!("director {}", gw.director()))?;
        }
        Ok(())
    }

    /// Director `i`'s daemon, to stop or restart it alone.
    pub fn gateway_mut(&mut self, i: usize) -> &mut Gateway {
        &mut self.gateways[i]
    }

    pub fn keepalived(&self, i: usize) -> &Keepalived {
        &self.keepalived[i]
    }

    /// The director that alone holds the VIP, if exactly one does.
    pub fn holder(&self, lab: &Lab) -> Result<Option<usize>> {
        let holders = vip_holders(lab)?;
        Ok(match holders[..] {
            [i] => Some(i),
            _ => None,
        })
    }

    /// Waits until director `i` alone holds the VIP (keepalived made it MASTER and the others
    /// gave the VIP up); on timeout the error carries every keepalived's last lines.
    pub fn wait_master(&self, lab: &Lab, i: usize, timeout: Duration) -> Result<Duration> {
        wait_sole_holder(lab, i, timeout).map_err(|e| {
            let logs: Vec<String> = self
                .keepalived
                .iter()
                .map(|ka| format!("--- keepalived on director {} ---\n{}", ka.director(), ka.tail(15)))
                .collect();
            e.context(logs.join("\n"))
        })
    }

    /// Director `i` dies: SIGKILL to its mim-lb and to keepalived (with its VRRP child) at
    /// once, and its link goes down on the bridge side. Its XDP program and pins stay, and so
    /// does the VIP on its `eth0`, unreachable, as on a machine that lost power. Returns the
    /// moment it was off the segment: whatever started after it cannot have gone through it.
    pub fn kill(&mut self, lab: &Lab, i: usize) -> Result<Instant> {
        if !self.gateways[i].running() {
            bail!("director {i}'s daemon is not running: nothing to kill");
        }
        // Signals first, all of them, and only then the waits: keepalived must not see the
        // daemon gone (its track_script) and give the VIP up the clean way.
        if let Some(ka) = self.keepalived[i].proc() {
            ka.signal_group(libc::SIGKILL);
        }
        self.gateways[i].proc().signal(libc::SIGKILL)?;
        lab.cut_director(i)?;
        let gone = Instant::now();
        self.keepalived[i].kill()?;
        self.gateways[i].kill()?;
        Ok(gone)
    }

    /// Brings director `i` back after [`Directors::kill`]: [`Directors::reconnect`], the daemon
    /// started again over its pins with `daemon_args` (e.g. `--keep-pinned`) and serving, then
    /// keepalived. Returns at once after that: keepalived takes the VIP back (if `i` has the
    /// highest priority) once `mim-lb ready` passes and a master down interval has passed, which
    /// [`Directors::wait_master`] waits for.
    pub fn revive(&mut self, lab: &mut Lab, i: usize, daemon_args: &[&str]) -> Result<()> {
        self.reconnect(lab, i)?;
        self.restart_daemon(lab, i, daemon_args)?;
        self.restart_keepalived(lab, i)
    }

    /// Puts killed director `i` back on the segment, without its VIP: the one the killed
    /// keepalived left is removed first (a restarted machine has none, and keepalived, once
    /// running, would not claim it before winning the election).
    pub fn reconnect(&mut self, lab: &Lab, i: usize) -> Result<()> {
        let have = lab.director_addrs4(i)?;
        let lines: Vec<String> = lab
            .vips4()
            .iter()
            .filter(|v| have.contains(v))
            .map(|v| format!("addr del {v}/32 dev {HOST_IFNAME}"))
            .collect();
        if !lines.is_empty() {
            crate::netns::ip_batch(Some(lab.director_ns(i)), &lines, false)?;
        }
        lab.reconnect_director(i)
    }

    /// Starts director `i`'s daemon again (same config and pins) and waits until it serves.
    pub fn restart_daemon(&mut self, lab: &mut Lab, i: usize, daemon_args: &[&str]) -> Result<()> {
        self.gateways[i].restart(lab, daemon_args).with_context(|| format!("restarting mim-lb on director {i}"))
    }

    /// Starts director `i`'s keepalived again (same config).
    pub fn restart_keepalived(&mut self, lab: &mut Lab, i: usize) -> Result<()> {
        self.keepalived[i].restart(lab).with_context(|| format!("restarting keepalived on director {i}"))
    }
}

/// A pair's shared flow-sync key, in a file of its own (mode 600) removed on drop.
pub struct SyncKey(pub PathBuf);

impl SyncKey {
    pub fn new(lab: &Lab) -> Result<SyncKey> {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("mimlb-sync-{}.key", lab.id()));
        std::fs::write(&path, format!("a test key for lab {} of at least 32 bytes\n", lab.id()))
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(SyncKey(path))
    }
}

impl Drop for SyncKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Director `i`'s `[sync]` section for a pair: it listens on its own address, the other
/// director is its peer, and both use `key`.
pub fn sync_section(lab: &Lab, key: &SyncKey, i: usize) -> String {
    format!(
        "[sync]\nlisten = \"{}:7946\"\npeers = [\"{}:7946\"]\nkey_file = \"{}\"\n",
        lab.director_addr4(i),
        lab.director_addr4(1 - i),
        key.0.display()
    )
}

/// The multicast group of [`group_sync_section`]: every lab has a bridge of its own, so labs
/// side by side do not hear each other.
pub const SYNC_GROUP: &str = "239.255.77.1:7947";

/// Director `i`'s `[sync]` section for a group of every director of the lab: the others are
/// its peers, changes go to [`SYNC_GROUP`], all use `key`.
pub fn group_sync_section(lab: &Lab, key: &SyncKey, i: usize) -> String {
    let peers: Vec<String> = (0..lab.director_count()).filter(|&j| j != i).map(|j| format!("\"{}:7946\"", lab.director_addr4(j))).collect();
    format!(
        "[sync]\nlisten = \"{}:7946\"\npeers = [{}]\nkey_file = \"{}\"\ngroup = \"{SYNC_GROUP}\"\n",
        lab.director_addr4(i),
        peers.join(", "),
        key.0.display()
    )
}

impl Directors {
    /// Waits until every running director is ready and sees its peers up, with the same
    /// tables (flow sync).
    pub fn wait_synced(&self, timeout: Duration) -> Result<()> {
        self.wait_all("ready, with every peer up and the same tables", timeout, |s| {
            s.sync.as_ref().is_some_and(|y| y.ready && y.peers.iter().all(|p| p.state == "up" && p.tables_agree == Some(true)))
        })
    }
}
