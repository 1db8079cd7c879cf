//! The soak (issue 10): the namespace lab under a long random schedule of what operators and
//! failures do to a director (masters that die and come back, drains and enables, valid and
//! invalid reloads by `mim-lb reload` and by SIGHUP, daemon restarts over kept pins after
//! SIGTERM and after SIGKILL) while long-lived and short TCP and UDP flows run, and the
//! daemon's memory, descriptors and connection table are sampled. [`run`] returns a
//! [`SoakReport`]; the run failed if it lists any broken invariant:
//!
//! - a long-lived flow ended although its master did not die while it was open (a master that
//!   is up or draining keeps its flows, whatever else happens);
//! - a short connection or request failed outside the window a master's death excuses
//!   ([`judge::Timers::excused_window`]: from the short timeout before the death to
//!   `fall × interval + timeout` plus a stated noise allowance after it);
//! - a dead master was not `down` within that same bound, or a revived one not back within
//!   `rise × interval + timeout` plus the allowance;
//! - after a step, the daemon's status disagrees with what the soak did (a drain lost over a
//!   restart, a weight not applied, a refused reload that changed something);
//! - a valid reload was refused or an invalid one accepted;
//! - the daemon's RSS or descriptor count grew by more than the limit after warm-up, within
//!   one run of the daemon ([`judge::judge_flatness`]).
//!
//! The schedule comes from a seeded generator ([`plan`]); the seed is in the report and
//! replays the same sequence of steps. Every wait is bounded, and the run ends at its
//! deadline.

pub mod flows;
pub mod judge;
pub mod plan;
pub mod report;
pub mod sampler;
mod steps;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::capture::mac_to_string;
use crate::gateway::{Gateway, Mode};
use crate::{Lab, LabSpec};
use flows::{FlowTiming, Pool, Shorts};
use judge::Timers;
use plan::{MasterModel, Rng};
pub use report::SoakReport;
use sampler::{Sampler, Watched};

pub const TCP_PORT: u16 = 7000;
pub const UDP_PORT: u16 = 7001;
/// Masters in the soak's lab: enough that two can be dead or drained at once while two still
/// take new connections ([`plan::MIN_TAKING_NEW`]).
pub const MASTERS: usize = 4;
/// Long-lived flows of each protocol kept on every master that takes new connections.
pub const FLOWS_PER_MASTER: usize = 2;
/// The gateway's `flow_table_size`.
pub const FLOW_TABLE_SIZE: u32 = 4096;

/// The services' health checks: a check every 250 ms that fails after 250 ms, down after 3
/// failures, up after 2 passes. Detection of a dead master is then at most 1 s
/// (OPERATIONS.md), while a live master on a loaded machine would need three checks in a row
/// to take over 250 ms to be taken down by mistake.
pub const TIMERS: Timers = Timers {
    interval: Duration::from_millis(250),
    timeout: Duration::from_millis(250),
    rise: 2,
    fall: 3,
    // Two cores shared with builds and other test runs: a check task, the daemon's map write
    // or the soak's status poll can each be a few hundred milliseconds late. One second covers
    // that without excusing a real outage (a master that stays in the table after it died
    // would fail connections for as long as the test runs).
    noise: Duration::from_secs(1),
    in_flight: Duration::from_millis(900),
};

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub duration: Duration,
    pub seed: u64,
    /// Print every step as it happens (to stderr).
    pub verbose: bool,
    /// Most growth of the RSS and descriptor floors within one run of the daemon, in percent.
    pub limit_pct: f64,
}

impl SoakSpec {
    /// Runs of 10 minutes and more are held to issue 10's 5% growth limit. Shorter ones (the
    /// 2-minute run in the suite) get 10%: their daemon runs are 30 to 60 s, so what is judged
    /// is the minute right after warm-up, while the allocator's pools are still filling (a
    /// 2-minute run's second daemon grew 3.4% over the 16 s it was judged, in one step).
    pub fn new(duration: Duration, seed: u64) -> SoakSpec {
        let limit_pct = if duration >= Duration::from_secs(600) { 5.0 } else { 10.0 };
        SoakSpec { duration, seed, verbose: false, limit_pct }
    }

    /// Resources are sampled every 2 s in short runs, every 5 s in long ones.
    pub fn sample_every(&self) -> Duration {
        (self.duration / 60).clamp(Duration::from_secs(2), Duration::from_secs(5))
    }

    /// Samples of a run of the daemon younger than this are not judged: it is still loading
    /// its program, starting its check tasks and growing its allocator's pools.
    pub fn warm_up(&self) -> Duration {
        (self.duration / 8).clamp(Duration::from_secs(15), Duration::from_secs(60))
    }

    /// The daemon is restarted only after it has run this long, so that each run is long
    /// enough to watch its memory over: a sixth of the soak, at least 30 s, at most 5 min.
    pub fn min_run(&self) -> Duration {
        (self.duration / 6).clamp(Duration::from_secs(30), Duration::from_secs(300))
    }
}

/// A seed from the system's randomness, for runs not asked to replay one.
pub fn random_seed() -> u64 {
    crate::netns::random_u64()
}

fn health(extra: &str) -> String {
    format!(
        "interval_ms = {}\ntimeout_ms = {}\nrise = {}\nfall = {}\n{extra}",
        TIMERS.interval.as_millis(),
        TIMERS.timeout.as_millis(),
        TIMERS.rise,
        TIMERS.fall
    )
}

/// The gateway's config: a TCP and a UDP service on the first VIP with every master at the
/// given weights; the UDP one is checked over the masters' TCP port.
pub fn soak_config(lab: &Lab, weights: &[u32]) -> String {
    // A small connection table, so that it fills within the first minutes (short UDP requests
    // each leave a record, and records expire only by eviction: OPERATIONS.md) and the rest of
    // the soak runs with the LRU evicting, which the long-lived flows, talking several times a
    // second, must survive.
    let mut text = format!("interface = \"{}\"\nflow_table_size = {FLOW_TABLE_SIZE}\nudp_idle_timeout_s = 30\n", lab.gateway_ifname());
    for (name, port, protocol, check) in
        [("tcp-7000", TCP_PORT, "tcp", String::new()), ("udp-7001", UDP_PORT, "udp", format!("port = {TCP_PORT}"))]
    {
        // Flap damping off: the schedule kills and revives masters faster than its defaults
        // allow (three deaths of one master within a minute hold it down for 30 s), and every
        // revival here must be taken within the rise bound. Damping has its own test
        // (tests/tests/flap_damping.rs).
        text += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{}\"\nport = {port}\nprotocol = \"{protocol}\"\n[service.health]\n{}\n\
             [service.flap_damping]\nmax_changes = 0\n",
            lab.vip4(),
            health(&check)
        );
        for (i, w) in weights.iter().enumerate() {
            text += &format!(
                "[[service.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = {w}\n",
                lab.master_addr4(i),
                mac_to_string(&lab.master_mac(i))
            );
        }
    }
    text
}

/// Runs the soak. An error means the soak itself could not run (the lab could not be built,
/// the daemon not started); broken invariants are in the report.
pub fn run(spec: &SoakSpec) -> Result<SoakReport> {
    let mut lab = Lab::new(LabSpec { masters: MASTERS, ipv6: false, ..LabSpec::default() })?;
    lab.start_tcp_servers(TCP_PORT)?;
    lab.start_udp_servers(UDP_PORT)?;
    let models = vec![MasterModel { alive: true, drained: false, weight: 1 }; MASTERS];
    let weights: Vec<u32> = models.iter().map(|m| m.weight).collect();
    let config = soak_config(&lab, &weights);
    let gw = Gateway::start_with_args(&mut lab, &config, Mode::Generic, &["--keep-pinned"])
        .context("starting mim-lb")?;
    gw.wait_all_up()?;

    let tcp_target = SocketAddr::new(lab.vip4().into(), TCP_PORT);
    let udp_target = SocketAddr::new(lab.vip4().into(), UDP_PORT);
    fill_connection_table(lab.client_ns(), udp_target)?;
    let t0 = Instant::now();
    let timing = FlowTiming::default();
    let sampler = Sampler::start(gw.pin_dir(), spec.sample_every(), t0)?;
    sampler.watch(Some(Watched { pid: gw.proc().pid(), run: 0, since: Instant::now() }));
    let shorts = Shorts::start(lab.client_ns(), tcp_target, udp_target, timing.clone(), t0)?;
    let pool = Pool::new(lab.client_ns(), tcp_target, udp_target, timing, t0);

    let mut soak = steps::Soak::new(spec, lab, gw, models, t0, sampler, pool);
    soak.run_schedule(&mut Rng::new(spec.seed), &shorts);
    let shorts = shorts.finish();
    Ok(soak.finish(shorts))
}

/// Fills the connection table before the soak starts: one datagram from each of twice
/// `FLOW_TABLE_SIZE` fresh sockets, each a UDP flow of its own and so a record. Records expire
/// only by eviction (OPERATIONS.md), so the short UDP requests fill the table anyway, in a few
/// minutes; the daemon's memory follows (its sweep reads the whole table), and the first
/// 30-minute run's first daemon grew 5.2% after a 60 s warm-up while the table filled, then
/// stopped. Filled first, the table is at its steady size when warm-up ends, in short runs
/// too, and the whole soak runs with the LRU evicting.
fn fill_connection_table(client_ns: &str, target: SocketAddr) -> Result<()> {
    crate::netns::in_netns(client_ns, || -> Result<()> {
        for _ in 0..2 * FLOW_TABLE_SIZE {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).context("binding UDP")?;
            socket.send_to(b"who?\n", target).context("filling the connection table")?;
        }
        Ok(())
    })?
}
