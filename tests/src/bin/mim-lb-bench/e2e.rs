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
mod load;
mod maps;
mod service;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mim_lb_tests::{Lab, LabSpec, in_netns, netns::set_sysctls};
use serde_json::{Value, json};

use crate::interrupt;
use crate::report::{Section, median};
use account::{CpuTimes, LabCpu, own_ratio, paired_overhead, parse_net_dev, parse_sockstat, percentile, ratio};
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
    let mut sections = report(s, &steps, &samples, &rss_kib, &idle);
    if let Some(m) = map_memory {
        sections.push(maps_section(&m));
    }
    Ok(sections)
}

fn maps_section(maps: &[maps::MapMemory]) -> Section {
    let mut section = Section::new("end to end: mim-lb's maps", &["map", "type", "entries", "key B", "value B", "kernel KiB"]);
    section.method = vec![
        "The kernel memory of every map the daemon pinned, at the lab's config (one TCP service of 3 masters, every other setting at its default), \
         from `bpftool -j map show pinned` (bytes_memlock). The daemon's RSS is in the director processes' section."
            .into(),
    ];
    for m in maps {
        section.row(vec![
            m.name.clone(),
            m.kind.clone(),
            m.max_entries.to_string(),
            m.key.to_string(),
            m.value.to_string(),
            fmt(m.bytes as f64 / 1024.0, 0),
        ]);
    }
    let total: u64 = maps.iter().map(|m| m.bytes).sum();
    section.row(vec!["all maps".into(), String::new(), String::new(), String::new(), String::new(), fmt(total as f64 / 1024.0, 0)]);
    section.json = json!({
        "total_bytes": total,
        "maps": maps.iter().map(|m| json!({
            "name": m.name, "type": m.kind, "max_entries": m.max_entries, "key_bytes": m.key, "value_bytes": m.value, "bytes": m.bytes,
        })).collect::<Vec<_>>(),
    });
    section
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

/// Per director (index into `s.directors`), the medians over rounds of one step.
struct StepSummary {
    rate: f64,
    failures: u64,
    ok: u64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu: f64,
    director: f64,
    machine: f64,
    bytes_per: f64,
    mib_s: f64,
}

fn summarize(v: &[Sample], cpu_unit: f64) -> StepSummary {
    let m = |f: &dyn Fn(&Sample) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    StepSummary {
        rate: m(&|x| x.rate()),
        failures: v.iter().map(|x| x.outcome.failures()).sum(),
        ok: v.iter().map(|x| x.outcome.ok).sum(),
        p50: m(&|x| x.latency_ms(50.0)),
        p99: m(&|x| x.latency_ms(99.0)),
        p999: m(&|x| x.latency_ms(99.9)),
        cpu: m(&|x| x.cpu_per(cpu_unit)),
        director: m(&|x| x.director_per(cpu_unit)),
        machine: m(&|x| x.machine_per(cpu_unit)),
        bytes_per: m(&|x| x.gateway_bytes as f64 / (x.outcome.ok.max(1)) as f64),
        mib_s: m(&|x| x.outcome.bytes as f64 / (1 << 20) as f64 / x.outcome.elapsed.as_secs_f64().max(1e-9)),
    }
}

/// Director `d`'s own CPU per `unit` answers at step `step`: paired round by round with the
/// floor's (see [`paired_overhead`]).
fn own(samples: &Samples, d: Option<usize>, floor: Option<usize>, step: usize, unit: f64) -> Option<f64> {
    let per = |d: usize| -> Option<Vec<f64>> { Some(samples.get(&(d, step))?.iter().map(|x| x.cpu_per(unit)).collect()) };
    paired_overhead(&per(d?)?, &per(floor?)?)
}

fn fmt(x: f64, digits: usize) -> String {
    if x.is_finite() { format!("{x:.digits$}") } else { "-".into() }
}

fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r.is_finite() => format!("{r:.2}x"),
        Some(_) => "inf".into(),
    }
}

fn report(
    s: &Settings,
    steps: &[(String, Pace)],
    samples: &Samples,
    rss: &BTreeMap<usize, Vec<f64>>,
    idle: &BTreeMap<usize, Vec<IdleSample>>,
) -> Vec<Section> {
    let index = |k: Kind| s.directors.iter().position(|d| *d == k);
    let (floor, haproxy, nft) = (index(Kind::NoDirector), index(Kind::Haproxy), index(Kind::Nftables));
    let summary = |d: usize, step: usize, unit: f64| samples.get(&(d, step)).map(|v| summarize(v, unit));

    // Short connections.
    let mut short = Section::new(
        "end to end: short connections",
        &["step", "director", "conn/s", "failed", "p50 ms", "p99 ms", "p99.9 ms", "CPU-ms/1k", "own CPU-ms/1k", "of it director process", "x HAProxy's", "x nftables'", "machine CPU-ms/1k"],
    );
    short.method = vec![
        format!(
            "Namespace lab: client, gateway (the director), 3 masters on one bridge of veths. Each round sets up every director in turn (a different one first each round), \
             runs every step on it, and removes it; {} rounds, medians over rounds. Steps of {:.1} s: new connections started at an offered rate (open loop, at most {MAX_IN_FLIGHT} in flight), \
             then by {} closed-loop workers. A connection: connect, `S\\n`, the master's name, the master closes; it fails after {} s.",
            s.rounds,
            s.step.as_secs_f64(),
            s.workers,
            CONNECTION_TIMEOUT.as_secs()
        ),
        "Load generator: our own (tokio, one thread, in the client's namespace); masters' service: our own (tokio, one thread for all three). Latency: connect to the answer's end, per connection.".into(),
        "CPU: the lab's CPU time over the step, per 1,000 answered connections: this process (load generator and masters, with the kernel work they run: on veth a frame's whole \
         receive path, the gateway's XDP or nftables included, runs in the sender's softirq, and without IRQ time accounting that time is the sender's), the director's process (HAProxy, \
         mim-lb's daemon) and the ksoftirqd threads. `own` subtracts the no-director run's at the same step in the same round (client, masters and the lab's bridge cost the same in both), median over rounds; \
         `of it director process` is HAProxy's or mim-lb's daemon's own process time (health checks and timers for mim-lb: its data path runs in the senders' softirq). \
         `machine` is the whole machine's busy time (/proc/stat, user+nice+system+irq+softirq+steal) for comparison: it also holds whatever else runs on the machine."
            .into(),
        "Directors: mim-lb (the real daemon, health checks every 100 ms); HAProxy (Debian, mode tcp, balance roundrobin, TCP checks every 100 ms, default threads); \
         nftables netdev ingress on the gateway's eth0 (ether daddr set jhash(ip saddr . tcp sport) mod 3 map {master MACs}, fwd to eth0: no state, no health); \
         no director (the client connects to master 1's own address). IPVS is not built into this kernel (CONFIG_IP_VS is not set), so it is not measured."
            .into(),
    ];
    let mut short_json = serde_json::Map::new();
    for (i, (label, _)) in steps.iter().enumerate() {
        let own_of = |d: Option<usize>| own(samples, d, floor, i, 1000.0);
        let (own_haproxy, own_nft) = (own_of(haproxy), own_of(nft));
        let mut step_json = serde_json::Map::new();
        for (d, kind) in s.directors.iter().enumerate() {
            let Some(x) = summary(d, i, 1000.0) else { continue };
            let own = own_of(Some(d));
            let vs = |other: Option<f64>| own.zip(other).and_then(|(a, b)| own_ratio(a, b));
            short.row(vec![
                label.clone(),
                kind.name().into(),
                fmt(x.rate, 0),
                format!("{} of {}", x.failures, x.ok + x.failures),
                fmt(x.p50, 2),
                fmt(x.p99, 2),
                fmt(x.p999, 2),
                fmt(x.cpu, 0),
                own.map_or("-".into(), |o| fmt(o, 0)),
                fmt(x.director, 0),
                if Some(d) == haproxy || Some(d) == floor { "-".into() } else { fmt_ratio(vs(own_haproxy)) },
                if Some(d) == nft || Some(d) == floor { "-".into() } else { fmt_ratio(vs(own_nft)) },
                fmt(x.machine, 0),
            ]);
            step_json.insert(
                kind.key().into(),
                json!({
                    "conn_per_s": x.rate, "failures": x.failures, "answered": x.ok,
                    "p50_ms": x.p50, "p99_ms": x.p99, "p999_ms": x.p999,
                    "cpu_ms_per_1k": x.cpu, "own_cpu_ms_per_1k": own, "director_process_cpu_ms_per_1k": x.director,
                    "machine_cpu_ms_per_1k": x.machine,
                    "rounds": samples[&(d, i)].iter().map(|y| json!({
                        "conn_per_s": y.rate(), "failures": y.outcome.failures(), "failed": y.outcome.failed,
                        "answered": y.outcome.ok, "cpu_ms": y.cpu_ms, "director_cpu_ms": y.director_ms, "machine_cpu_ms": y.machine_ms,
                        "p99_ms": y.latency_ms(99.0),
                    })).collect::<Vec<_>>(),
                }),
            );
        }
        short_json.insert(label.clone(), Value::Object(step_json));
    }
    // The steps the goals are judged at: the offered rates every director sustained.
    let sustained = |i: usize| {
        let Pace::Rate(r) = steps[i].1 else { return false };
        (0..s.directors.len()).all(|d| {
            summary(d, i, 1000.0).is_some_and(|x| {
                x.rate >= SUSTAINED_SHARE * f64::from(r) && (x.failures as f64) <= SUSTAINED_FAILURES * x.ok as f64
            })
        })
    };
    let judged: Vec<usize> = (0..steps.len()).filter(|i| sustained(*i)).collect();
    short.notes.push(if judged.is_empty() {
        "No offered rate was sustained by every director: the goals on short connections cannot be judged in this run.".into()
    } else {
        format!(
            "Goals on short connections are judged at every offered rate every director sustained ({:.0}% of it answered, failures at most {:.1}%): {}.",
            SUSTAINED_SHARE * 100.0,
            SUSTAINED_FAILURES * 100.0,
            judged.iter().map(|i| steps[*i].0.as_str()).collect::<Vec<_>>().join(", ")
        )
    });
    short.notes.push(
        "An own CPU of 0 is a director that cost no more than the floor within the noise; a ratio to an own CPU of 0 is `-` (both 0) or `inf`.".into(),
    );
    short.json = json!({ "steps": short_json, "judged_at": judged.iter().map(|i| steps[*i].0.clone()).collect::<Vec<_>>() });

    // 1 MiB answers.
    let li = steps.len();
    let unit_mib = s.large_bytes as f64 / (1 << 20) as f64;
    let mut large = Section::new(
        format!("end to end: {} KiB answers", s.large_bytes / 1024),
        &["director", "MiB/s", "x no director", "gateway KiB/answer", "CPU-ms/MiB", "own CPU-ms/MiB", "x HAProxy's", "x nftables'"],
    );
    large.method = vec![format!(
        "{} closed-loop workers for {:.1} s, each connection asking `L {}` and reading it to the master's close. Gateway KiB: bytes in and out of the gateway's eth0 per answer \
         (a direct-routing director sees only the client's side; a proxy carries the answer twice). CPU as for short connections, per MiB answered.",
        s.large_workers,
        s.large_step.as_secs_f64(),
        s.large_bytes
    )];
    let floor_large = floor.and_then(|f| summary(f, li, 1.0 / unit_mib));
    let own_large = |d: Option<usize>| own(samples, d, floor, li, 1.0 / unit_mib);
    let (own_haproxy_l, own_nft_l) = (own_large(haproxy), own_large(nft));
    let mut large_json = serde_json::Map::new();
    for (d, kind) in s.directors.iter().enumerate() {
        let Some(x) = summary(d, li, 1.0 / unit_mib) else { continue };
        let own = own_large(Some(d));
        let vs = |other: Option<f64>| own.zip(other).and_then(|(a, b)| own_ratio(a, b));
        let of_floor = floor_large.as_ref().and_then(|f| ratio(x.mib_s, f.mib_s));
        large.row(vec![
            kind.name().into(),
            fmt(x.mib_s, 0),
            fmt_ratio(of_floor),
            fmt(x.bytes_per / 1024.0, 1),
            fmt(x.cpu, 1),
            own.map_or("-".into(), |o| fmt(o, 1)),
            if Some(d) == haproxy || Some(d) == floor { "-".into() } else { fmt_ratio(vs(own_haproxy_l)) },
            if Some(d) == nft || Some(d) == floor { "-".into() } else { fmt_ratio(vs(own_nft_l)) },
        ]);
        large_json.insert(
            kind.key().into(),
            json!({ "mib_per_s": x.mib_s, "of_no_director": of_floor, "failures": x.failures, "gateway_bytes_per_answer": x.bytes_per,
                    "cpu_ms_per_mib": x.cpu, "own_cpu_ms_per_mib": own, "machine_cpu_ms_per_mib": x.machine }),
        );
    }
    large.json = Value::Object(large_json);

    // Goals, per XDP mode.
    let mut goals = Section::new("end to end: goals", &["goal", "mim-lb mode", "step", "measured", "verdict"]);
    let mut goals_json = Vec::new();
    for kind in [Kind::MimLbNative, Kind::MimLbGeneric] {
        let Some(d) = index(kind) else { continue };
        let mode = if kind == Kind::MimLbNative { "native" } else { "generic" };
        let mut goal = |name: &str, at: &str, measured: Option<f64>, limit: f64, at_most: bool| {
            let verdict = match measured {
                None => "not measured".to_owned(),
                Some(m) if (at_most && m <= limit) || (!at_most && m >= limit) => "ok".into(),
                Some(_) => "MISSED".into(),
            };
            let shown = measured.map_or("-".into(), |m| if m.is_finite() { format!("{m:.3}x") } else { "inf".into() });
            goals.row(vec![name.into(), mode.into(), at.into(), shown, verdict.clone()]);
            let measured = measured.filter(|m| m.is_finite());
            goals_json.push(json!({ "goal": name, "mode": mode, "step": at, "measured": measured, "limit": limit, "verdict": verdict }));
        };
        let own_short = |at: usize, of: Option<usize>| -> Option<f64> {
            own_ratio(own(samples, Some(d), floor, at, 1000.0)?, own(samples, of, floor, at, 1000.0)?)
        };
        let p99 = |at: usize| -> Option<f64> { ratio(summary(d, at, 1000.0)?.p99, summary(nft?, at, 1000.0)?.p99) };
        for &i in &judged {
            let at = steps[i].0.as_str();
            goal("own CPU per short connection <= 1/3 of HAProxy's", at, own_short(i, haproxy), 1.0 / 3.0, true);
            goal("own CPU per short connection <= the nftables path's", at, own_short(i, nft), 1.0, true);
            goal("p99 latency of short connections <= the nftables path's", at, p99(i), 1.0, true);
        }
        let large_rate = summary(d, li, 1.0).zip(floor_large.as_ref()).and_then(|(x, f)| ratio(x.mib_s, f.mib_s));
        goal(&format!("1 MiB answers at the no-director rate (>= {LARGE_GOAL}x)"), "1 MiB", large_rate, LARGE_GOAL, false);
    }
    goals.json = Value::Array(goals_json);

    // Memory of the directors' processes at the end of each round (no idle connections held).
    let mut memory = Section::new("end to end: director processes", &["director", "RSS KiB (median)"]);
    memory.method = vec!["VmRSS of the director's process on the gateway after its round's workloads (nftables and no director have none).".into()];
    for (d, v) in rss {
        memory.row(vec![s.directors[*d].name().into(), fmt(median(v), 0)]);
    }
    memory.json = json!(rss.iter().map(|(d, v)| (s.directors[*d].key().to_owned(), median(v))).collect::<BTreeMap<_, _>>());
    let mut sections = vec![short, large, goals, memory];
    if s.idle > 0 {
        sections.push(idle_section(s, steps, samples, idle));
    }
    sections
}

fn idle_section(s: &Settings, steps: &[(String, Pace)], samples: &Samples, idle: &BTreeMap<usize, Vec<IdleSample>>) -> Section {
    let step_label = steps.first().map_or("-".to_owned(), |(l, _)| l.clone());
    let mut section = Section::new(
        format!("end to end: {} idle connections", s.idle),
        &["director", "held", "failed to open", "director RSS +KiB", "gateway TCP sockets +", "kernel TCP memory +KiB", "conn/s while held", "p99 ms while held", "p99 ms without"],
    );
    section.method = vec![format!(
        "After the other workloads, the client opens {} connections through the director one after another (each asks `H\\n`: the master holds it open and silent),          then the {step_label} short-connection step runs again while they are held. Growth from before they were opened: the director process's VmRSS, TCP sockets in the          gateway's namespace (/proc/net/sockstat inuse), and the pages all TCP sockets of the machine hold (sockstat mem: machine-wide, so the client's and the masters'          sockets are in it too, the same for every director). mim-lb's connection table is allocated in full at start, so it does not grow. Medians over rounds.",
        s.idle
    )];
    let mut json = serde_json::Map::new();
    for (d, v) in idle {
        let m = |f: &dyn Fn(&IdleSample) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        let rss = v.iter().all(|x| x.rss_kib.is_some()).then(|| m(&|x| x.rss_kib.unwrap_or(0.0)));
        let held = samples.get(&(*d, steps.len() + 1)).map(|v| summarize(v, 1000.0));
        let without = samples.get(&(*d, 0)).map(|v| summarize(v, 1000.0));
        section.row(vec![
            s.directors[*d].name().into(),
            fmt(m(&|x| x.opened as f64), 0),
            fmt(m(&|x| x.failed as f64), 0),
            rss.map_or("-".into(), |r| fmt(r, 0)),
            fmt(m(&|x| x.tcp_sockets), 0),
            fmt(m(&|x| x.tcp_kib), 0),
            held.as_ref().map_or("-".into(), |h| fmt(h.rate, 0)),
            held.as_ref().map_or("-".into(), |h| fmt(h.p99, 2)),
            without.as_ref().map_or("-".into(), |h| fmt(h.p99, 2)),
        ]);
        json.insert(
            s.directors[*d].key().into(),
            json!({
                "opened": m(&|x| x.opened as f64), "failed": m(&|x| x.failed as f64), "director_rss_growth_kib": rss,
                "gateway_tcp_sockets_growth": m(&|x| x.tcp_sockets), "kernel_tcp_memory_growth_kib": m(&|x| x.tcp_kib),
                "conn_per_s_while_held": held.as_ref().map(|h| h.rate), "p99_ms_while_held": held.as_ref().map(|h| h.p99),
                "failures_while_held": held.as_ref().map(|h| h.failures),
            }),
        );
    }
    section.json = Value::Object(json);
    section
}
