//! BIRD 2 (Debian's `bird2`) in a lab with a router ([`crate::LabSpec::router`]): the router
//! takes the VIPs' routes from every director over BGP (with BFD) and installs one ECMP route
//! per VIP; each director's BIRD announces the routes its mim-lb keeps in the `[announce]`
//! table. The configs are the shipped examples, `dist/bird/router.conf` and
//! `dist/bird/director.conf`, with only their `define` lines set to the lab's values: a change
//! to the examples is a change to what this lab runs.
//!
//! [`Ecmp`] runs the whole set (the router's BIRD, and mim-lb with BIRD on every director; or
//! any [`RoutingDaemon`], such as FRR in [`crate::frr`], on either side) and
//! does to a director what a test needs: withdraw, stop, kill (processes and link), start
//! again; [`Ecmp::wait_nexthops`] waits for the router's route to a VIP to have exactly a given
//! set of directors as next hops, and says how long that took.
//!
//! Every BIRD runs in the foreground with its own files (`-c conf -s sock -P pid`) in a
//! directory of its own; no system BIRD is used or touched.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::gateway::{Gateway, Mode, ServiceSpec, lab_config, unique_suffix};
use crate::keepalived::SyncKey;
use crate::process::Proc;
use crate::Lab;

/// The repository's root (for `dist/`).
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_owned()
}

/// The shipped example `dist/bird/<name>`.
pub fn dist_config(name: &str) -> Result<String> {
    let path = repo_root().join("dist/bird").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `template` with each `define NAME = ...;` line of `values` given the new value. Every name
/// must have its line, so a renamed constant in the example fails here rather than leaving
/// the example's value in place.
pub fn set_defines(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut lines: Vec<String> = template.lines().map(str::to_owned).collect();
    for (name, value) in values {
        let prefix = format!("define {name} =");
        let line = lines
            .iter_mut()
            .find(|l| l.starts_with(&prefix))
            .with_context(|| format!("the BIRD example has no `define {name} = ...;` line"))?;
        *line = format!("define {name} = {value};");
    }
    Ok(lines.join("\n") + "\n")
}

/// The `[announce]` table and protocol number the lab's directors use.
pub const ANNOUNCE_TABLE: u32 = 100;
pub const ANNOUNCE_PROTOCOL: u8 = 250;

/// The router's BIRD config: the shipped example for this lab (the segment, its VIPs).
pub fn router_config(lab: &Lab) -> Result<String> {
    let router = lab.router_addr4().context("the lab has no router (LabSpec::router)")?;
    let o = router.octets();
    let segment = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    set_defines(
        &dist_config("router.conf")?,
        &[
            ("ROUTER", router.to_string()),
            ("DIRECTORS_NET", segment.clone()),
            // Every VIP of the lab is on the segment's /24.
            ("VIPS", format!("[ {segment}{{32,32}} ]")),
        ],
    )
}

/// Director `i`'s BIRD config: the shipped example with its address and the router's.
pub fn director_config(lab: &Lab, i: usize) -> Result<String> {
    let router = lab.router_addr4().context("the lab has no router (LabSpec::router)")?;
    set_defines(
        &dist_config("director.conf")?,
        &[
            ("DIRECTOR", lab.director_addr4(i).to_string()),
            ("ROUTER", router.to_string()),
            ("ANNOUNCE_TABLE", ANNOUNCE_TABLE.to_string()),
            ("ANNOUNCE_PROTOCOL", ANNOUNCE_PROTOCOL.to_string()),
        ],
    )
}

/// One BIRD process in a namespace. Dropping it stops it and removes its directory.
pub struct Bird {
    ns: String,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Bird {
    /// Writes `config` and starts `bird -f` in `ns`; returns once it answers on its socket.
    pub fn start(lab: &mut Lab, ns: &str, config: &str) -> Result<Bird> {
        // Under the temp dir and named like the daemons' directories, so that `cargo xtask
        // test` removes it after a killed run.
        let dir = std::env::temp_dir().join(format!("mimlb-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("bird.conf"), config).context("writing bird.conf")?;
        let mut bird = Bird { ns: ns.to_owned(), dir, proc: None };
        bird.restart(lab)?;
        Ok(bird)
    }

    /// Starts BIRD again with the same config (after [`Bird::kill`]).
    pub fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        if self.running() {
            bail!("BIRD in {} is running already", self.ns);
        }
        let mut cmd = Command::new("bird");
        // -f: foreground (the lab owns the process); -d would log debug to the terminal.
        cmd.arg("-f")
            .arg("-c")
            .arg(self.dir.join("bird.conf"))
            .arg("-s")
            .arg(self.socket())
            .arg("-P")
            .arg(self.dir.join("bird.pid"));
        let ns = self.ns.clone();
        self.proc = Some(lab.spawn_in(&ns, &mut cmd).context("starting bird (apt-get install bird2)")?);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(out) = self.birdc(&["show", "status"])
                && out.contains("Daemon is up and running")
            {
                return Ok(());
            }
            if !self.running() || Instant::now() >= deadline {
                bail!("BIRD in {} did not come up:\n{}", self.ns, self.proc.as_ref().map(|p| p.tail(20)).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    pub fn running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| matches!(p.try_exit_status(), Ok(None)))
    }

    /// `birdc -s SOCK ARGS...`: its output.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let socket = self.socket();
        let mut all = vec!["-s", socket.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        crate::netns::run_in(&self.ns, "birdc", &all)
    }

    /// SIGKILL: no BGP notification, no withdrawal; the peer finds out by BFD or the hold time.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.take() {
            proc.signal(libc::SIGKILL)?;
            proc.wait_exit(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// The last lines BIRD logged.
    pub fn tail(&self, n: usize) -> String {
        self.proc.as_ref().map(|p| p.tail(n)).unwrap_or_default()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        if let Some(proc) = self.proc.take() {
            proc.stop_politely();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next hops of the router's kernel route to `vip` (`ip -4 route show VIP` in the router's
/// namespace): one address for a single path, one per `nexthop via` line for ECMP, none
/// without a route.
pub fn router_nexthops(lab: &Lab, vip: Ipv4Addr) -> Result<BTreeSet<Ipv4Addr>> {
    let ns = lab.router_ns().context("the lab has no router")?;
    let out = lab.run_in(ns, "ip", &["-4", "route", "show", &vip.to_string()])?;
    Ok(parse_nexthops(&out))
}

/// The gateways in `ip route show` output: `via A` on the route's line, or on each `nexthop`
/// line of a multipath route.
pub fn parse_nexthops(out: &str) -> BTreeSet<Ipv4Addr> {
    out.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect()
}

/// `[announce]` for the lab's directors, with `withdraw_wait_ms`.
pub fn announce_section(withdraw_wait_ms: u64) -> String {
    format!("[announce]\ntable = {ANNOUNCE_TABLE}\nprotocol = {ANNOUNCE_PROTOCOL}\nwithdraw_wait_ms = {withdraw_wait_ms}\n")
}

/// Director `i`'s whole mim-lb config: `services`, `extra` at the top, `[announce]` and
/// `[sync]` with every other director and the sync group.
pub fn director_mim_lb_config(lab: &Lab, key: &SyncKey, i: usize, services: &[ServiceSpec], extra: &str, withdraw_wait_ms: u64) -> String {
    // `extra` (top-level keys) goes before the services, the sections after them.
    format!("{}\n{}\n{}", lab_config(lab, services, extra), crate::keepalived::group_sync_section(lab, key, i), announce_section(withdraw_wait_ms))
}

/// What [`Ecmp`] needs of a routing daemon (BIRD, or FRR in [`crate::frr`]) on the router
/// and on a director: started with the lab's rendering of its shipped example (passed through
/// `edit` first), killed, started again, and its sessions shown when a wait fails.
pub trait RoutingDaemon: Sized {
    fn start_router(lab: &mut Lab, edit: &dyn Fn(&str) -> String) -> Result<Self>;
    fn start_director(lab: &mut Lab, i: usize, edit: &dyn Fn(&str) -> String) -> Result<Self>;
    /// Starts again with the same config after [`RoutingDaemon::kill`].
    fn restart(&mut self, lab: &mut Lab) -> Result<()>;
    /// SIGKILL: no BGP notification, no withdrawal.
    fn kill(&mut self) -> Result<()>;
    /// The BGP (and BFD) sessions, for an error message.
    fn sessions(&self) -> String;
}

impl RoutingDaemon for Bird {
    fn start_router(lab: &mut Lab, edit: &dyn Fn(&str) -> String) -> Result<Self> {
        let ns = lab.router_ns().context("the lab has no router")?.to_owned();
        Bird::start(lab, &ns, &edit(&router_config(lab)?))
    }

    fn start_director(lab: &mut Lab, i: usize, edit: &dyn Fn(&str) -> String) -> Result<Self> {
        let ns = lab.director_ns(i).to_owned();
        Bird::start(lab, &ns, &edit(&director_config(lab, i)?))
    }

    fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        Bird::restart(self, lab)
    }

    fn kill(&mut self) -> Result<()> {
        Bird::kill(self)
    }

    fn sessions(&self) -> String {
        self.birdc(&["show", "protocols"]).unwrap_or_default()
    }
}

/// The router's routing daemon (`R`), and mim-lb with a routing daemon (`D`) on every director
/// of a router lab; BIRD on both unless said otherwise. Declare it after the [`Lab`], so that
/// it is dropped first.
pub struct Ecmp<R = Bird, D = Bird> {
    pub router: R,
    pub gateways: Vec<Gateway>,
    /// The directors' routing daemons, by director.
    pub speakers: Vec<D>,
    /// Declared last: the directors' configs name its file.
    pub key: SyncKey,
}

impl Ecmp {
    /// Starts the router's BIRD, then on directors `0..configs.len()` mim-lb with `configs[i]`
    /// (see [`director_mim_lb_config`]) and BIRD, and waits until every daemon sees every
    /// backend up. Fewer configs than the lab has directors leaves the others to
    /// [`Ecmp::join`] later.
    pub fn start(lab: &mut Lab, key: SyncKey, configs: &[String]) -> Result<Ecmp> {
        Ecmp::start_edited(lab, key, configs, |c| c.to_owned())
    }

    /// [`Ecmp::start`] with every BIRD config (router and directors) passed through `edit`
    /// first: a variant of the shipped examples (e.g. a benchmark without BFD).
    pub fn start_edited(lab: &mut Lab, key: SyncKey, configs: &[String], edit: impl Fn(&str) -> String) -> Result<Ecmp> {
        Ecmp::launch(lab, key, configs, &edit)
    }
}

impl<R: RoutingDaemon, D: RoutingDaemon> Ecmp<R, D> {
    /// [`Ecmp::start_edited`] with any routing daemons: `R` on the router, `D` on the
    /// directors (e.g. `Ecmp::<Frr, Frr>::launch`).
    pub fn launch(lab: &mut Lab, key: SyncKey, configs: &[String], edit: &dyn Fn(&str) -> String) -> Result<Self> {
        let router = R::start_router(lab, edit).context("starting the routing daemon on the router")?;
        let mut gateways = Vec::new();
        let mut speakers = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            gateways.push(Gateway::start_on(lab, i, config, Mode::Generic, &[]).with_context(|| format!("starting mim-lb on director {i}"))?);
            speakers.push(D::start_director(lab, i, edit).with_context(|| format!("starting the routing daemon on director {i}"))?);
        }
        for gw in &gateways {
            gw.wait_all_up().with_context(|| format!("director {}", gw.director()))?;
        }
        Ok(Ecmp { router, gateways, speakers, key })
    }

    /// Starts the next director of the lab that is not running yet (its routing daemon, then
    /// mim-lb with `config`) and returns its index; it joins the router's route once it is ready (it pulls its
    /// peers' state first), which [`Ecmp::wait_nexthops`] waits for.
    pub fn join(&mut self, lab: &mut Lab, config: &str) -> Result<usize> {
        let i = self.gateways.len();
        if i >= lab.director_count() {
            bail!("all {} directors of the lab run already", lab.director_count());
        }
        // The routing daemon first, as on a machine where it starts at boot: its session is up
        // by the time mim-lb is ready, and the route goes out as soon as mim-lb writes it.
        self.speakers.push(D::start_director(lab, i, &|c| c.to_owned()).with_context(|| format!("starting the routing daemon on director {i}"))?);
        self.gateways.push(Gateway::start_on(lab, i, config, Mode::Generic, &[]).with_context(|| format!("starting mim-lb on director {i}"))?);
        Ok(i)
    }

    /// `mim-lb withdraw` on director `i` (it leaves the route, keeps forwarding).
    pub fn withdraw(&self, i: usize) -> Result<String> {
        self.gateways[i].ctl(&["withdraw"])
    }

    /// `mim-lb announce` on director `i`.
    pub fn announce(&self, i: usize) -> Result<String> {
        self.gateways[i].ctl(&["announce"])
    }

    /// The directors whose address is a next hop of the router's route to `vip`.
    pub fn nexthop_directors(&self, lab: &Lab, vip: Ipv4Addr) -> Result<BTreeSet<usize>> {
        let hops = router_nexthops(lab, vip)?;
        Ok((0..lab.director_count()).filter(|i| hops.contains(&lab.director_addr4(*i))).collect())
    }

    /// Waits until the router's route to `vip` has exactly `want` (director indices) as next
    /// hops (none: no route); returns how long that took. On timeout the error shows the route
    /// and the BGP sessions.
    pub fn wait_nexthops(&self, lab: &Lab, vip: Ipv4Addr, want: &BTreeSet<usize>, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let have = self.nexthop_directors(lab, vip)?;
            if &have == want {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                let route = lab.run_in(lab.router_ns().expect("router"), "ip", &["-4", "route", "show", &vip.to_string()])?;
                let sessions = self.router.sessions();
                bail!("the router's next hops for {vip}: directors {have:?}, not {want:?}, after {timeout:?}\nroute: {route}\n{sessions}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VIPs in director `i`'s `[announce]` table (`ip route show table T proto P`).
    pub fn announced_routes(&self, lab: &Lab, i: usize) -> Result<BTreeSet<String>> {
        let out = lab.run_in(
            lab.director_ns(i),
            "ip",
            &["-4", "route", "show", "table", &ANNOUNCE_TABLE.to_string(), "proto", &ANNOUNCE_PROTOCOL.to_string()],
        )?;
        Ok(out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect())
    }

    /// Director `i` dies as a machine that lost power: its link is cut on the bridge side
    /// first, so that nothing it would send on the way out (the BGP session closed by the
    /// kernel when the routing daemon dies) reaches the router, which must notice by BFD; then
    /// its mim-lb and routing daemon get SIGKILL. Returns the moment it was off the segment.
    pub fn kill(&mut self, lab: &Lab, i: usize) -> Result<Instant> {
        lab.cut_director(i)?;
        let gone = Instant::now();
        self.gateways[i].proc().signal(libc::SIGKILL)?;
        self.speakers[i].kill()?;
        self.gateways[i].kill()?;
        Ok(gone)
    }

    /// Brings director `i` back after [`Ecmp::kill`]: the link, the daemon over its pins (with
    /// `daemon_args`), then the routing daemon. Its routes come back once the daemon is ready.
    /// The daemon goes first: the killed one left its routes in the table (a namespace keeps
    /// them, where a machine that lost power would have rebooted with an empty table), and the
    /// new one removes them before the routing daemon could announce them.
    pub fn revive(&mut self, lab: &mut Lab, i: usize, daemon_args: &[&str]) -> Result<()> {
        lab.reconnect_director(i)?;
        self.gateways[i].restart(lab, daemon_args).with_context(|| format!("restarting mim-lb on director {i}"))?;
        self.speakers[i].restart(lab).with_context(|| format!("restarting the routing daemon on director {i}"))
    }

    /// SIGTERM to director `i`'s mim-lb (a clean stop: it withdraws first); returns at once
    /// with the moment it was sent. The routing daemon keeps running.
    pub fn begin_stop(&self, i: usize) -> Result<Instant> {
        self.gateways[i].proc().signal(libc::SIGTERM)?;
        Ok(Instant::now())
    }
}
