//! The end-to-end benchmark's report: medians over rounds, own costs paired with the floor,
//! ratios to the peers, goals. Pure: it only reads the samples.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::account::{own_ratio, paired_overhead, ratio};
use super::director::Kind;
use super::load::Pace;
use super::maps::MapMemory;
use super::{CONNECTION_TIMEOUT, IdleSample, LARGE_GOAL, MAX_IN_FLIGHT, SUSTAINED_FAILURES, SUSTAINED_SHARE, Sample, Samples, Settings};
use crate::report::{Section, median};

/// The report's sections from every round's samples.
pub fn report(
    s: &Settings,
    steps: &[(String, Pace)],
    samples: &Samples,
    rss: &BTreeMap<usize, Vec<f64>>,
    idle: &BTreeMap<usize, Vec<IdleSample>>,
) -> Vec<Section> {
    let index = |k: Kind| s.directors.iter().position(|d| *d == k);
    let c = Ctx { s, steps, samples, floor: index(Kind::NoDirector), haproxy: index(Kind::Haproxy), nft: index(Kind::Nftables) };
    let judged = c.judged_steps();
    let mut sections = vec![short_section(&c, &judged), large_section(&c), goals_section(&c, &judged), memory_section(s, rss)];
    if s.idle > 0 {
        sections.push(idle_section(s, steps, samples, idle));
    }
    sections
}

/// What every section reads: the settings, the samples, and where the peers are.
struct Ctx<'a> {
    s: &'a Settings,
    steps: &'a [(String, Pace)],
    samples: &'a Samples,
    floor: Option<usize>,
    haproxy: Option<usize>,
    nft: Option<usize>,
}

impl Ctx<'_> {
    fn summary(&self, d: usize, step: usize, unit: f64) -> Option<StepSummary> {
        self.samples.get(&(d, step)).map(|v| summarize(v, unit))
    }

    /// Director `d`'s own CPU per `unit` answers at `step`: paired round by round with the
    /// floor's (see [`paired_overhead`]).
    fn own(&self, d: Option<usize>, step: usize, unit: f64) -> Option<f64> {
        let per = |d: usize| -> Option<Vec<f64>> { Some(self.samples.get(&(d, step))?.iter().map(|x| x.cpu_per(unit)).collect()) };
        paired_overhead(&per(d?)?, &per(self.floor?)?)
    }

    /// The steps the goals are judged at: the offered rates every director sustained.
    fn judged_steps(&self) -> Vec<usize> {
        let sustained = |i: usize| {
            let Pace::Rate(r) = self.steps[i].1 else { return false };
            (0..self.s.directors.len()).all(|d| {
                self.summary(d, i, 1000.0).is_some_and(|x| {
                    x.rate >= SUSTAINED_SHARE * f64::from(r) && (x.failures as f64) <= SUSTAINED_FAILURES * x.ok as f64
                })
            })
        };
        (0..self.steps.len()).filter(|i| sustained(*i)).collect()
    }

    /// "-" in a peer's own column and in the floor's row.
    fn vs_column(&self, d: usize, peer: Option<usize>, ratio: Option<f64>) -> String {
        if Some(d) == peer || Some(d) == self.floor { "-".into() } else { fmt_ratio(ratio) }
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

fn short_section(c: &Ctx, judged: &[usize]) -> Section {
    let (s, steps, samples) = (c.s, c.steps, c.samples);
    let (haproxy, nft) = (c.haproxy, c.nft);
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
        let own_of = |d: Option<usize>| c.own(d, i, 1000.0);
        let (own_haproxy, own_nft) = (own_of(haproxy), own_of(nft));
        let mut step_json = serde_json::Map::new();
        for (d, kind) in s.directors.iter().enumerate() {
            let Some(x) = c.summary(d, i, 1000.0) else { continue };
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
                c.vs_column(d, haproxy, vs(own_haproxy)),
                c.vs_column(d, nft, vs(own_nft)),
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

    short
}

fn large_section(c: &Ctx) -> Section {
    let (s, steps) = (c.s, c.steps);
    let (floor, haproxy, nft) = (c.floor, c.haproxy, c.nft);
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
    let floor_large = floor.and_then(|f| c.summary(f, li, 1.0 / unit_mib));
    let own_large = |d: Option<usize>| c.own(d, li, 1.0 / unit_mib);
    let (own_haproxy_l, own_nft_l) = (own_large(haproxy), own_large(nft));
    let mut large_json = serde_json::Map::new();
    for (d, kind) in s.directors.iter().enumerate() {
        let Some(x) = c.summary(d, li, 1.0 / unit_mib) else { continue };
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
            c.vs_column(d, haproxy, vs(own_haproxy_l)),
            c.vs_column(d, nft, vs(own_nft_l)),
        ]);
        large_json.insert(
            kind.key().into(),
            json!({ "mib_per_s": x.mib_s, "of_no_director": of_floor, "failures": x.failures, "gateway_bytes_per_answer": x.bytes_per,
                    "cpu_ms_per_mib": x.cpu, "own_cpu_ms_per_mib": own, "machine_cpu_ms_per_mib": x.machine }),
        );
    }
    large.json = Value::Object(large_json);

    large
}

fn goals_section(c: &Ctx, judged: &[usize]) -> Section {
    let (s, steps) = (c.s, c.steps);
    let index = |k: Kind| s.directors.iter().position(|d| *d == k);
    let (floor, nft) = (c.floor, c.nft);
    let haproxy = c.haproxy;
    let li = steps.len();
    let floor_large = floor.and_then(|f| c.summary(f, li, 1.0));
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
            own_ratio(c.own(Some(d), at, 1000.0)?, c.own(of, at, 1000.0)?)
        };
        let p99 = |at: usize| -> Option<f64> { ratio(c.summary(d, at, 1000.0)?.p99, c.summary(nft?, at, 1000.0)?.p99) };
        for &i in judged {
            let at = steps[i].0.as_str();
            goal("own CPU per short connection <= 1/3 of HAProxy's", at, own_short(i, haproxy), 1.0 / 3.0, true);
            goal("own CPU per short connection <= the nftables path's", at, own_short(i, nft), 1.0, true);
            goal("p99 latency of short connections <= the nftables path's", at, p99(i), 1.0, true);
        }
        let large_rate = c.summary(d, li, 1.0).zip(floor_large.as_ref()).and_then(|(x, f)| ratio(x.mib_s, f.mib_s));
        goal(&format!("1 MiB answers at the no-director rate (>= {LARGE_GOAL}x)"), "1 MiB", large_rate, LARGE_GOAL, false);
    }
    goals.json = Value::Array(goals_json);

    goals
}

fn memory_section(s: &Settings, rss: &BTreeMap<usize, Vec<f64>>) -> Section {
    // Memory of the directors' processes at the end of each round (no idle connections held).
    let mut memory = Section::new("end to end: director processes", &["director", "RSS KiB (median)"]);
    memory.method = vec!["VmRSS of the director's process on the gateway after its round's workloads (nftables and no director have none).".into()];
    for (d, v) in rss {
        memory.row(vec![s.directors[*d].name().into(), fmt(median(v), 0)]);
    }
    memory.json = json!(rss.iter().map(|(d, v)| (s.directors[*d].key().to_owned(), median(v))).collect::<BTreeMap<_, _>>());
    memory
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

pub fn maps_section(maps: &[MapMemory]) -> Section {
    let mut section = Section::new("end to end: mim-lb's maps", &["map", "type", "entries", "key B", "value B", "kernel KiB"]);
    section.method = vec![
        "The kernel memory of every map the daemon pinned, at the lab's config (one TCP service of 3 masters, every other setting at its default: the Maglev maps sized for it, room for 8 services), \
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
