//! Control-plane cost of a table change: Maglev build alone, build + write of a whole table,
//! and a one-backend health flip on a big service (what a failover costs the director).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use mim_lb::{
    config::{Config, Protocol, ServiceKey},
    director::{build_table, monotonic_ns},
};
use mim_lb_tests::{
    packet::{Frame, TCP_SYN},
    testrun::ProgramUnderTest,
};
use serde_json::json;

use crate::interrupt;
use crate::report::{Section, max, median, min};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PORT: u16 = 7000;

pub(crate) fn key() -> ServiceKey {
    ServiceKey { vip: VIP.into(), port: PORT, protocol: Protocol::Tcp }
}

/// One service with `backends` masters and no health check (all up once configured).
pub(crate) fn config(backends: u32) -> String {
    config_checked(backends, "none")
}

/// One service with `backends` masters checked by `check`: configured down, they come up one
/// commit each as their checks pass (`ProgramUnderTest` reports them healthy in turn), as in
/// the daemon.
pub(crate) fn config_checked(backends: u32, check: &str) -> String {
    let mut c = format!(
        "interface = \"lo\"\n[[service]]\nname = \"bench\"\nvip = \"{VIP}\"\nport = {PORT}\n[service.health]\ncheck = \"{check}\"\n"
    );
    for i in 0..backends {
        c += &format!(
            "[[service.backend]]\naddress = \"{}\"\nmac = \"02:00:00:01:{:02x}:{:02x}\"\n",
            backend_addr(i),
            i / 256,
            i % 256
        );
    }
    c
}

pub(crate) fn backend_addr(i: u32) -> IpAddr {
    Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250 + 1) as u8).into()
}

pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn parse(text: &str) -> Result<Config> {
    Config::parse(text).map_err(|e| anyhow!("bench config: {e}"))
}

pub fn measure(backends: u32, runs: usize, sweep_flows: u32) -> Result<Section> {
    let big = parse(&config(backends))?;
    let runs = runs.max(1);

    // 1. Build + write: a fresh data path with 3 masters, then the config with `backends`:
    //    one full table computed and written into the region the data path does not read,
    //    then the index flip.
    let mut apply_ms = Vec::new();
    let mut writes = 0;
    let mut table_size = 0;
    for _ in 0..runs {
        interrupt::check()?;
        let mut prog = ProgramUnderTest::new(&config(3))?;
        let started = Instant::now();
        let report = prog.director.apply_config(&big)?;
        apply_ms.push(ms(started.elapsed()));
        ensure!(report.maglev_writes > 0 && report.index_flipped, "the rebuild wrote no table");
        writes = report.maglev_writes;
        table_size = prog.director.written()[&key()].table_size;
    }

    // 2. The Maglev build alone, on the same members the director builds from.
    let prog = {
        let mut p = ProgramUnderTest::new(&config(3))?;
        p.director.apply_config(&big)?;
        p
    };
    let desired = &prog.director.desired()[&key()];
    let mut build_ms = Vec::new();
    for _ in 0..runs.max(5) {
        interrupt::check()?;
        let started = Instant::now();
        let table = build_table(desired);
        build_ms.push(ms(started.elapsed()));
        // The same table the director wrote (ignoring changed marks): same inputs, same code.
        ensure!(
            table.iter().zip(prog.director.written()[&key()].table()).all(|(a, b)| *a == b & mim_lb_common::MAGLEV_BACKEND_MASK),
            "the Maglev build disagrees with the table the director wrote"
        );
    }

    // 3. Health flips of one master, down, up, down, ... as the health checker reports them
    //    on failover and recovery, on a service that started with all its masters (as after
    //    the daemon starts): each commit rebuilds the table, marks the slots that changed
    //    master, writes the entries that differ from what the target region holds, and flips
    //    the index.
    let big_flips = flips(backends, runs, false)?;
    let small_flips = flips(3, runs, true)?;
    let small_build = build_only(3, runs)?;

    // 4. The sweep over a connection table of `flows` recorded flows.
    let (sweep_ms, flows_seen) = sweep(sweep_flows, runs)?;

    let mut s = Section::new(
        format!("Control plane: table rebuild, health flip, sweep (table size {table_size})"),
        &["operation", "median ms", "min ms", "max ms", "entries written"],
    );
    s.method = vec![
        format!("Wall-clock time of the control plane's own calls (Director::apply_config / set_health / sweep, maglev::build), {runs} or more runs each."),
        "Maglev entries are written with BPF_MAP_UPDATE_BATCH, up to 65,536 per syscall (the batch section compares it with one syscall per entry); the data path keeps reading the other region until the index flips.".into(),
        "A health flip is what the daemon does when a check verdict changes, before the data path sees it: it is part of every failover.".into(),
    ];
    let row = |name: String, v: &[f64], writes: String| {
        vec![name, format!("{:.1}", median(v)), format!("{:.1}", min(v)), format!("{:.1}", max(v)), writes]
    };
    s.row(row(format!("{backends} backends: maglev::build only"), &build_ms, "-".into()));
    s.row(row(format!("3 -> {backends} backends: build + write + flip"), &apply_ms, writes.to_string()));
    for (n, f, start) in [
        (backends, &big_flips, "all up in one commit (unchecked or reload)"),
        (3, &small_flips, "up one by one as checks passed"),
    ] {
        s.row(row(format!("{n} backends: first flip (down) after {start}"), &f.first_down, f.writes(&f.first_down_writes)));
        s.row(row(format!("{n} backends: flip back up"), &f.first_up, f.writes(&f.first_up_writes)));
        s.row(row(format!("{n} backends: later flips"), &f.later, f.writes(&f.later_writes)));
    }
    s.row(row("3 backends: maglev::build only".into(), &small_build, "-".into()));
    s.row(row(format!("sweep of {flows_seen} recorded flows"), &sweep_ms, "-".into()));
    let rest_ms = median(&apply_ms) - median(&build_ms);
    s.notes.push(format!(
        "Of a full rebuild, {:.1} ms is the Maglev build; the other {rest_ms:.1} ms are the {writes} Maglev writes (batched; the batch section times a whole region's write alone), \
         the new backends' entries and counters (one syscall each) and the director's own bookkeeping.",
        median(&build_ms),
    ));
    s.notes.push(
        "A flip writes what differs from the region the data path does not read; the daemon brings that region up to date after every event \
         (Director::tidy), and so does this benchmark before each flip, so a flip writes exactly the slots that change master."
            .into(),
    );
    s.notes.push(format!(
        "The sweep (every 30 s with the default idle timeouts, while any slot is marked changed) reads the whole connection table (BPF_MAP_LOOKUP_BATCH, 8,192 flows a call) and works on the copy: \
         {:.2} us per flow here for both, so about {:.0} ms for 1M flows (the default flow_table_size); the batch section times the read alone on a full-size table. The daemon reads it on a blocking thread of its own, so health verdicts and the control socket do not wait for it.",
        1e3 * median(&sweep_ms) / flows_seen.max(1) as f64,
        1e3 * median(&sweep_ms) / flows_seen.max(1) as f64 * 1e6 / 1e3
    ));
    s.json = json!({
        "backends": backends,
        "table_size": table_size,
        "build_only_ms": build_ms,
        "build_only_3_backends_ms": small_build,
        "build_write_flip_ms": apply_ms,
        "entries_written_full": writes,
        "health_flips": { backends.to_string(): big_flips.json(), "3": small_flips.json() },
        "sweep": { "flows": flows_seen, "ms": sweep_ms },
    });
    Ok(s)
}

/// Timings of health flips on fresh data paths.
#[derive(Default)]
struct Flips {
    first_down: Vec<f64>,
    first_down_writes: Vec<usize>,
    first_up: Vec<f64>,
    first_up_writes: Vec<usize>,
    later: Vec<f64>,
    later_writes: Vec<usize>,
}

impl Flips {
    fn writes(&self, w: &[usize]) -> String {
        let (lo, hi) = (w.iter().min().copied().unwrap_or(0), w.iter().max().copied().unwrap_or(0));
        if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "first_down_ms": self.first_down, "first_down_writes": self.first_down_writes,
            "first_up_ms": self.first_up, "first_up_writes": self.first_up_writes,
            "later_ms": self.later, "later_writes": self.later_writes,
        })
    }
}

/// One timed health flip; returns (ms, entries the commit wrote).
fn flip(prog: &mut ProgramUnderTest, victim: IpAddr, up: bool) -> Result<(f64, usize)> {
    interrupt::check()?;
    // As the daemon does after every event: the region the flip writes is up to date first.
    prog.director.tidy();
    let svc = &prog.director.written()[&key()];
    let target = prog.director.dataplane().maps_ro().maglev_region(svc.id, 1 - svc.active, svc.table_size)?;
    let started = Instant::now();
    let change = prog.director.set_health(&key(), victim, up, "bench: health flip")?;
    let elapsed = ms(started.elapsed());
    change.context("set_health changed nothing")?;
    let live = prog.director.written()[&key()].table();
    Ok((elapsed, live.iter().zip(&target).filter(|(a, b)| a != b).count()))
}

/// Health flips of the middle master on fresh data paths whose masters came up all at once
/// (`ramp` false) or one commit each (`ramp` true, like a daemon whose checks pass in turn).
fn flips(backends: u32, runs: usize, ramp: bool) -> Result<Flips> {
    let victim = backend_addr(backends / 2);
    let mut f = Flips::default();
    for _ in 0..runs {
        let mut prog = ProgramUnderTest::new(&if ramp { config_checked(backends, "tcp") } else { config(backends) })?;
        let (t, w) = flip(&mut prog, victim, false)?;
        f.first_down.push(t);
        f.first_down_writes.push(w);
        let (t, w) = flip(&mut prog, victim, true)?;
        f.first_up.push(t);
        f.first_up_writes.push(w);
        for up in [false, true] {
            let (t, w) = flip(&mut prog, victim, up)?;
            f.later.push(t);
            f.later_writes.push(w);
        }
    }
    Ok(f)
}

fn build_only(backends: u32, runs: usize) -> Result<Vec<f64>> {
    let prog = ProgramUnderTest::new(&config(backends))?;
    let desired = &prog.director.desired()[&key()];
    let mut out = Vec::new();
    for _ in 0..runs.max(5) {
        interrupt::check()?;
        let started = Instant::now();
        let table = build_table(desired);
        out.push(ms(started.elapsed()));
        ensure!(table.len() == desired.table_size as usize, "the Maglev build returned a short table");
    }
    Ok(out)
}

/// Records `flows` flows through the program, then times the sweep after each of `runs`
/// health flips (a flip marks slots, which is what makes the sweep read the table). A SYN is
/// recorded only on a marked slot whose unrecorded flows go elsewhere, so one master is
/// drained first (its slots are marked, remembering it) and only SYNs that hash to those
/// slots are sent; then it is enabled again. Returns the times and how many flows the sweep saw.
fn sweep(flows: u32, runs: usize) -> Result<(Vec<f64>, usize)> {
    let mut prog = ProgramUnderTest::new(&config(3))?;
    let victim = backend_addr(1);
    prog.director.set_admin(&key(), victim, mim_lb::director::Admin::Drained)?;
    let (table, size) = {
        let w = &prog.director.written()[&key()];
        (w.table().to_vec(), w.table_size)
    };
    let (vip, _) = mim_lb::dataplane::service_index::addr_words(VIP.into());
    let mut sent = 0;
    for i in 0..flows.saturating_mul(8) {
        if sent == flows {
            break;
        }
        if i % 4096 == 0 {
            interrupt::check()?;
        }
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i / 50_000);
        let sport = 10_000 + (i % 50_000) as u16;
        let (src, family) = mim_lb::dataplane::service_index::addr_words(client.into());
        let h = mim_lb_common::hash::flow_hash(family, &src, &vip, sport.to_be(), PORT.to_be(), 6);
        if mim_lb::director::marks::is_marked(table[mim_lb_common::hash::table_slot(h, size) as usize]) {
            prog.run(&Frame::tcp(client, sport, VIP, PORT, TCP_SYN).bytes())?;
            sent += 1;
        }
    }
    ensure!(sent == flows, "only {sent} of {flows} flows hash to the drained master's slots");
    prog.director.set_admin(&key(), victim, mim_lb::director::Admin::Enabled)?;
    let mut times = Vec::new();
    let mut seen = 0;
    for r in 0..runs.max(3) {
        flip(&mut prog, victim, r % 2 == 1)?;
        ensure!(prog.director.sweep_pending(), "no slot marked after a flip: the sweep would do nothing");
        let started = Instant::now();
        let report = prog.director.sweep(monotonic_ns(), Duration::from_secs(900), Duration::from_secs(300))?;
        times.push(ms(started.elapsed()));
        seen = report.flows_seen;
    }
    Ok((times, seen))
}
