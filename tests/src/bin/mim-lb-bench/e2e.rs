//! End to end against what operators would use instead (issue 11): one namespace lab (client,
//! gateway, three masters), the same workloads from the same load generator, and on the
//! gateway in interleaved rounds: mim-lb in native and in generic XDP, HAProxy (a userspace
//! TCP proxy), nftables netdev forwarding (the kernel rewriting the MAC by a hash of the flow,
//! no state, no health) and no director at all (the client talks to one master: the floor
//! of the lab itself). IPVS would be the other obvious peer; this kernel is built without it.
//!
//! Workloads: short connections (connect, one request, one short answer, close) at a ladder
//! of offered rates and with closed-loop workers; 1 MiB answers. For each: rate, failures,
//! latency percentiles, the machine's busy CPU time per unit of work, the gateway's bytes.
//! A director's own CPU is its run's minus the no-director run's at the same step.

mod account;
mod director;
pub(crate) mod load;
pub mod maps;
pub(crate) mod service;
mod tables;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mim_lb_tests::{Lab, LabSpec, in_netns, netns::set_sysctls};

use crate::interrupt;
use crate::report::Section;
use account::{CpuTimes, LabCpu, parse_net_dev, parse_sockstat, percentile};
pub use director::Kind;
use director::Running;
use load::{Ask, Outcome, Pace, Plan};

const PORT: u16 = 8000;
/// Longest one connection may take, connect to close: a SYN lost once is retried after 1 s
/// and still counts (in the tail latency); lost twice, it is a failure.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections in flight at most; a start beyond it is counted as failed ("not started").
const MAX_IN_FLIGHT: usize = 4000;
/// A ladder step "sustains" its offered rate when it achieves this share of it without
/// failures beyond [`SUSTAINED_FAILURES`] of its connections.
const SUSTAINED_SHARE: f64 = 0.95;
const SUSTAINED_FAILURES: f64 = 0.001;
/// "At the no-director rate" for 1 MiB answers: within the run-to-run noise of the lab.
const LARGE_GOAL: f64 = 0.95;

pub struct Settings {
    pub rounds: usize,
    /// Offered rates of new short connections per second, one step each.
    pub rates: Vec<u32>,
    /// Closed-loop workers of the last short-connection step (0: no such step).
    pub workers: usize,
    pub step: Duration,
    pub large_bytes: usize,
    pub large_workers: usize,
    pub large_step: Duration,
    pub directors: Vec<Kind>,
    /// Idle connections held open while one short-connection step (the first rate) runs again
    /// (0: not measured).
    pub idle: usize,
}

/// The gateway's memory while idle connections are held, against before they were opened.
struct IdleSample {
    opened: usize,
    failed: usize,
    rss_kib: Option<f64>,
    tcp_sockets: f64,
    tcp_kib: f64,
}

/// The gateway's memory as the benchmark sees it.
struct GatewayMemory {
    rss_kib: Option<f64>,
    tcp_inuse: u64,
    tcp_pages: u64,
}

impl GatewayMemory {
    fn read(lab: &Lab, pid: Option<u32>) -> Result<GatewayMemory> {
        let text = in_netns(lab.gateway_ns(), || std::fs::read_to_string("/proc/thread-self/net/sockstat"))?
            .context("reading the gateway's /proc/net/sockstat")?;
        let (tcp_inuse, tcp_pages) = parse_sockstat(&text)?;
        Ok(GatewayMemory { rss_kib: pid.and_then(rss_of), tcp_inuse, tcp_pages })
    }

    fn growth(&self, later: &GatewayMemory, opened: usize, failed: usize) -> IdleSample {
        IdleSample {
            opened,
            failed,
            rss_kib: self.rss_kib.zip(later.rss_kib).map(|(a, b)| b - a),
            tcp_sockets: later.tcp_inuse as f64 - self.tcp_inuse as f64,
            tcp_kib: (later.tcp_pages as f64 - self.tcp_pages as f64) * page_kib(),
        }
    }
}

fn page_kib() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 { page as f64 / 1024.0 } else { 4.0 }
}

/// One step's measurement in one round.
struct Sample {
    outcome: Outcome,
    /// The lab's processes' CPU time over the step (see [`LabCpu`]).
    cpu_ms: f64,
    /// The director's process alone (also in `cpu_ms`).
    director_ms: f64,
    /// The whole machine's busy time over the step.
    machine_ms: f64,
    /// Bytes through the gateway's interface, received plus sent.
    gateway_bytes: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.outcome.ok as f64 / self.outcome.elapsed.as_secs_f64().max(1e-9)
    }
    fn cpu_per(&self, unit: f64) -> f64 {
        if self.outcome.ok == 0 { f64::NAN } else { self.cpu_ms * unit / self.outcome.ok as f64 }
    }
    fn director_per(&self, unit: f64) -> f64 {
        if self.outcome.ok == 0 { f64::NAN } else { self.director_ms * unit / self.outcome.ok as f64 }
    }
    fn machine_per(&self, unit: f64) -> f64 {
        if self.outcome.ok == 0 { f64::NAN } else { self.machine_ms * unit / self.outcome.ok as f64 }
    }
    /// Latency percentile in ms.
    fn latency_ms(&self, p: f64) -> f64 {
        let mut v = self.outcome.latencies_us.clone();
        v.sort_unstable();
        percentile(&v, p).map_or(f64::NAN, |us| f64::from(us) / 1000.0)
    }
}

/// Labels of the short-connection steps, in order.
fn short_steps(s: &Settings) -> Vec<(String, Pace)> {
    let mut v: Vec<(String, Pace)> = s.rates.iter().map(|r| (format!("{r}/s"), Pace::Rate(*r))).collect();
    if s.workers > 0 {
        v.push((format!("{} workers", s.workers), Pace::Workers(s.workers)));
    }
    v
}

/// Samples per (director, step); step `short.len()` is the 1 MiB one.
type Samples = BTreeMap<(usize, usize), Vec<Sample>>;

pub fn measure(s: &Settings) -> Result<Vec<Section>> {
    if s.directors.is_empty() || s.rounds == 0 {
        bail!("the end-to-end benchmark needs at least one director and one round");
    }
    raise_nofile();
    let mut lab = Lab::new(LabSpec { ipv6: false, ..LabSpec::default() })?;
    // Room for many short connections in a row from one client address.
    for ns in [lab.client_ns().to_owned(), lab.gateway_ns().to_owned()] {
        set_sysctls(&ns, &[("net.ipv4.ip_local_port_range", "1024 65535")])?;
    }
    let masters = service::Masters::start(&lab, PORT)?;
    let steps = short_steps(s);
    let mut samples: Samples = BTreeMap::new();
    let mut rss_kib: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut idle: BTreeMap<usize, Vec<IdleSample>> = BTreeMap::new();
    let mut map_memory: Option<Vec<maps::MapMemory>> = None;
    for round in 0..s.rounds {
        // Each round starts with another director, so none always runs first (or last).
        for k in 0..s.directors.len() {
            let d = (round + k) % s.directors.len();
            let kind = s.directors[d];
            interrupt::check()?;
            eprintln!("mim-lb-bench: e2e round {}/{}: {} ...", round + 1, s.rounds, kind.name());
            let running = Running::start(kind, &mut lab, PORT)?;
            let target = Running::target(&lab, kind, PORT);
            warm_up(&lab, target).with_context(|| format!("{} does not answer{}", kind.name(), running.log_tail()))?;
            if let (None, Some(dir)) = (&map_memory, running.pin_dir()) {
                map_memory = Some(maps::pinned(dir)?);
            }
            let served_before = masters.served();
            let cpu = LabCpu::new(running.pid());
            for (i, (_, pace)) in steps.iter().enumerate() {
                let plan = Plan {
                    target,
                    ask: Ask::Short,
                    pace: *pace,
                    duration: s.step,
                    max_in_flight: MAX_IN_FLIGHT,
                    timeout: CONNECTION_TIMEOUT,
                };
                samples.entry((d, i)).or_default().push(step(&lab, &cpu, &plan)?);
            }
            let plan = Plan {
                target,
                ask: Ask::Large(s.large_bytes),
                pace: Pace::Workers(s.large_workers),
                duration: s.large_step,
                max_in_flight: s.large_workers,
                timeout: CONNECTION_TIMEOUT.max(s.large_step),
            };
            samples.entry((d, steps.len())).or_default().push(step(&lab, &cpu, &plan)?);
            if s.idle > 0 {
                let (sample, short) = with_idle(&lab, &running, &cpu, target, s)?;
                idle.entry(d).or_default().push(sample);
                samples.entry((d, steps.len() + 1)).or_default().push(short);
            }
            let served: Vec<u64> = masters.served().iter().zip(&served_before).map(|(a, b)| a - b).collect();
            check_path(kind, &served)?;
            if let Some(kib) = running.pid().and_then(rss_of) {
                rss_kib.entry(d).or_default().push(kib);
            }
            drop(running);
        }
    }
    drop(masters);
    drop(lab);
    let mut sections = tables::report(s, &steps, &samples, &rss_kib, &idle);
    if let Some(m) = map_memory {
        sections.push(tables::maps_section(&m));
    }
    Ok(sections)
}

/// Opens `s.idle` idle connections through the director, reads the gateway's memory, and runs
/// the first short-connection step again while they are held.
fn with_idle(lab: &Lab, running: &Running, cpu: &LabCpu, target: std::net::SocketAddr, s: &Settings) -> Result<(IdleSample, Sample)> {
    let before = GatewayMemory::read(lab, running.pid())?;
    let held = load::Idle::open(lab.client_ns(), target, s.idle, Duration::from_secs(2))?;
    let during = GatewayMemory::read(lab, running.pid())?;
    let plan = Plan {
        target,
        ask: Ask::Short,
        pace: s.rates.first().map_or(Pace::Workers(s.workers.max(1)), |r| Pace::Rate(*r)),
        duration: s.step,
        max_in_flight: MAX_IN_FLIGHT,
        timeout: CONNECTION_TIMEOUT,
    };
    let short = step(lab, cpu, &plan)?;
    let sample = before.growth(&during, held.opened, held.failed);
    drop(held);
    Ok((sample, short))
}

/// Connects until the director answers every connection of a short burst, within 20 s: it
/// may still be starting (HAProxy binding, mim-lb's first health checks), and the lab's
/// neighbour caches fill here rather than in the first measurement.
fn warm_up(lab: &Lab, target: std::net::SocketAddr) -> Result<()> {
    let plan = Plan {
        target,
        ask: Ask::Short,
        pace: Pace::Workers(2),
        duration: Duration::from_millis(300),
        max_in_flight: 2,
        timeout: Duration::from_secs(1),
    };
    let mut last = Outcome::default();
    for _ in 0..40 {
        interrupt::check()?;
        last = load::run(lab.client_ns(), &plan)?;
        if last.failures() == 0 && last.ok >= 10 {
            return Ok(());
        }
        interrupt::sleep(Duration::from_millis(200))?;
    }
    bail!("after 20 s a burst still had {} failures ({:?}) and {} answers", last.failures(), last.failed, last.ok)
}

/// A run that did not go where it claims is no measurement of that director: with a
/// director every master must have answered, without one only master 1.
fn check_path(kind: Kind, served: &[u64]) -> Result<()> {
    let bad = if kind.balances() {
        served.contains(&0)
    } else {
        served.iter().skip(1).any(|n| *n > 0) || served[0] == 0
    };
    if bad {
        bail!("{}: the masters answered {served:?} requests: not the path this run measures", kind.name());
    }
    Ok(())
}

fn step(lab: &Lab, cpu: &LabCpu, plan: &Plan) -> Result<Sample> {
    let bytes0 = gateway_bytes(lab)?;
    let (machine0, lab0) = (CpuTimes::read()?, cpu.read());
    let outcome = load::run(lab.client_ns(), plan)?;
    let (machine1, lab1) = (CpuTimes::read()?, cpu.read());
    let used = lab0.until(&lab1);
    let bytes1 = gateway_bytes(lab)?;
    interrupt::check()?;
    Ok(Sample {
        outcome,
        cpu_ms: used.total,
        director_ms: used.director,
        machine_ms: machine0.busy_ms_until(&machine1),
        gateway_bytes: bytes1.saturating_sub(bytes0),
    })
}

/// Received plus sent bytes of the gateway's interface so far.
fn gateway_bytes(lab: &Lab) -> Result<u64> {
    let ifname = lab.gateway_ifname().to_owned();
    // /proc/thread-self/net is the reading thread's namespace.
    let text = in_netns(lab.gateway_ns(), || std::fs::read_to_string("/proc/thread-self/net/dev"))?
        .context("reading the gateway's /proc/net/dev")?;
    let (rx, tx) = parse_net_dev(&text, &ifname)?;
    Ok(rx + tx)
}

/// VmRSS of a process in KiB.
fn rss_of(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raises the soft open file limit to the hard one: the load generator and the masters hold
/// thousands of sockets. (A container may forbid raising the hard limit; this does not try.)
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!("mim-lb-bench: warning: cannot raise the open file limit to {}", lim.rlim_max);
            }
        }
    }
}
