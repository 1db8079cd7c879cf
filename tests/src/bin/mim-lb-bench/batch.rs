//! Control-plane map access: the batched calls the control plane makes
//! (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`) against the per-element path they replaced,
//! the same operation on the same map, back to back in every round:
//!
//! - the sweep's read of a full-size connection table (`read_pinned_flows`);
//! - the write of a whole Maglev region, of what a first failover writes, and of the slots one
//!   master's failure moves; the read of a whole region.

use std::collections::HashSet;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use aya::maps::MapData;
use mim_lb::{dataplane::batch, director::read_pinned_flows};
use mim_lb_common::{FlowEntry, FlowKey, MAGLEV_BACKEND_MASK, limits, maps::names};
use mim_lb_tests::testrun::ProgramUnderTest;
use serde_json::json;

use crate::interrupt;
use crate::per_packet::thread_cpu_ns;
use crate::rebuild::{backend_addr, config, config_checked, key, ms};
use crate::report::{Section, median};

pub struct Settings {
    /// Flows written into the connection table (of the default 1M entries).
    pub flows: u32,
    /// Rounds of the flow-table read.
    pub flow_runs: usize,
    /// Rounds of each Maglev measurement.
    pub maglev_runs: usize,
}

/// The goals: a sweep read of 1M flows in under 300 ms, a single-master flip
/// written in under 5 ms.
const SWEEP_GOAL_MS: f64 = 300.0;
const FLIP_GOAL_MS: f64 = 5.0;

/// One operation timed both ways: wall-clock, and this thread's CPU time (user and kernel),
/// which waiting for a CPU on a loaded machine does not inflate.
#[derive(Default)]
struct Pair {
    name: String,
    entries: usize,
    batch_ms: Vec<f64>,
    single_ms: Vec<f64>,
    batch_cpu_ms: Vec<f64>,
    single_cpu_ms: Vec<f64>,
}

impl Pair {
    fn new(name: impl Into<String>, entries: usize) -> Pair {
        Pair { name: name.into(), entries, ..Pair::default() }
    }

    /// Median over rounds of per-element / batch in the same round.
    fn ratio(&self) -> f64 {
        let r: Vec<f64> = self.batch_ms.iter().zip(&self.single_ms).map(|(b, s)| s / b).collect();
        median(&r)
    }

    fn us_per_entry(&self, v: &[f64]) -> f64 {
        1e3 * median(v) / self.entries.max(1) as f64
    }

    fn row(&self, goal: String) -> Vec<String> {
        vec![
            self.name.clone(),
            self.entries.to_string(),
            format!("{:.2}", median(&self.batch_ms)),
            format!("{:.2}", median(&self.single_ms)),
            format!("{:.1}x", self.ratio()),
            format!("{:.2} / {:.2}", median(&self.batch_cpu_ms), median(&self.single_cpu_ms)),
            format!("{:.3} / {:.3}", self.us_per_entry(&self.batch_ms), self.us_per_entry(&self.single_ms)),
            goal,
        ]
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "entries": self.entries, "batch_ms": self.batch_ms, "per_element_ms": self.single_ms,
            "batch_cpu_ms": self.batch_cpu_ms, "per_element_cpu_ms": self.single_cpu_ms,
            "per_element_over_batch": self.ratio(),
        })
    }

    /// Times `op(true)` (batched) and `op(false)` (per element) once per round, alternating
    /// which goes first so that neither always runs on caches the other warmed.
    fn time(&mut self, runs: usize, mut op: impl FnMut(bool) -> Result<()>) -> Result<()> {
        for round in 0..runs {
            interrupt::check()?;
            for batched in if round % 2 == 0 { [true, false] } else { [false, true] } {
                let (started, cpu) = (Instant::now(), thread_cpu_ns());
                op(batched)?;
                let (elapsed, cpu) = (ms(started.elapsed()), (thread_cpu_ns() - cpu) as f64 / 1e6);
                let (wall, cpus) = if batched {
                    (&mut self.batch_ms, &mut self.batch_cpu_ms)
                } else {
                    (&mut self.single_ms, &mut self.single_cpu_ms)
                };
                wall.push(elapsed);
                cpus.push(cpu);
            }
        }
        Ok(())
    }
}

pub fn measure(settings: &Settings) -> Result<Section> {
    let (flows, table) = read_flows(settings.flows, settings.flow_runs.max(1))?;
    let maglev = maglev(settings.maglev_runs.max(1))?;

    let mut s = Section::new(
        "Control plane: batched map access vs one syscall per element",
        &["operation", "entries", "batch ms", "per-element ms", "per-element / batch", "CPU ms (batch / per-element)", "us per entry (batch / per-element)", "goal"],
    );
    s.method = vec![
        "Each row is one operation done both ways on the same map, back to back in every round (which goes first alternates); ms are wall-clock medians over rounds, the ratio is the median of the per-round ratios of wall-clock times, CPU ms the medians of the thread's CPU time (user and kernel; the syscalls' work is kernel time).".into(),
        "Batch: BPF_MAP_LOOKUP_BATCH / BPF_MAP_UPDATE_BATCH (mim_lb::dataplane::batch), what the control plane uses now. Per-element: the path it used before and falls back to on kernels without them: GET_NEXT_KEY plus a lookup per flow, one update or lookup syscall per Maglev slot.".into(),
        format!(
            "Flows: a connection table of {} entries (the default flow_table_size) holding {} flows written from userspace; batch = read_pinned_flows (the sweep's read, on a map fd of its own), per-element = MapsRo::flows_per_element. Both returned the same flows (checked).",
            table.capacity, table.present
        ),
        format!(
            "Maglev: a 3-master service whose masters came up one by one (as the daemon's health checks pass), then the first failover of one master, which writes {} entries; every write goes to the region the data path does not read. {} rounds ({} for the flows).",
            maglev.flip.entries, settings.maglev_runs.max(1), settings.flow_runs.max(1)
        ),
    ];
    let per_million = median(&flows.batch_ms) * 1e6 / flows.entries.max(1) as f64;
    s.row(flows.row(format!("1M in < {SWEEP_GOAL_MS:.0} ms: {}", verdict(per_million, SWEEP_GOAL_MS))));
    s.row(maglev.full.row("-".into()));
    s.row(maglev.flip.row(format!("< {FLIP_GOAL_MS:.0} ms: {}", verdict(median(&maglev.flip.batch_ms), FLIP_GOAL_MS))));
    s.row(maglev.moved.row("-".into()));
    s.row(maglev.read.row("-".into()));
    s.notes = vec![
        format!(
            "Sweep read: {per_million:.0} ms per 1M flows batched ({:.0} ms of CPU time), {:.0} ms one flow at a time ({:.2} vs {:.2} us per flow). The {} flows were written in {:.0} ms with BPF_MAP_UPDATE_BATCH.",
            median(&flows.batch_cpu_ms) * 1e6 / flows.entries.max(1) as f64,
            median(&flows.single_ms) * 1e6 / flows.entries.max(1) as f64,
            flows.us_per_entry(&flows.batch_ms),
            flows.us_per_entry(&flows.single_ms),
            table.present,
            table.fill_ms
        ),
        format!(
            "A first failover's Maglev writes ({} entries) take {:.2} ms batched ({:.2} ms of CPU time) against the goal of {FLIP_GOAL_MS:.0} ms; the whole health flip also builds the table (see the rebuild section).",
            maglev.flip.entries,
            median(&maglev.flip.batch_ms),
            median(&maglev.flip.batch_cpu_ms)
        ),
        "Absolute times vary several-fold between machines (and with load on a shared one); the ratios, both sides measured in the same round, are what carries over.".into(),
    ];
    s.json = json!({
        "flow_table": { "capacity": table.capacity, "flows": table.present, "fill_ms": table.fill_ms },
        "read_flows": flows.json(),
        "write_full_region": maglev.full.json(),
        "write_first_failover": maglev.flip.json(),
        "write_moved_slots": maglev.moved.json(),
        "read_full_region": maglev.read.json(),
    });
    Ok(s)
}

fn verdict(ms: f64, goal: f64) -> &'static str {
    if ms < goal { "ok" } else { "MISSED" }
}

struct FlowTable {
    capacity: u32,
    present: usize,
    fill_ms: f64,
}

/// Fills a default-size connection table with `flows` flows from userspace, then times the
/// sweep's read of it both ways.
fn read_flows(flows: u32, runs: usize) -> Result<(Pair, FlowTable)> {
    let capacity = limits::DEFAULT_FLOW_TABLE_SIZE;
    ensure!(flows <= capacity, "--batch-flows {flows} is more than the table's {capacity} entries");
    let prog = ProgramUnderTest::pinned_with_flow_table(&config(3), capacity)?;
    let path = prog.director.dataplane().pin_dir().context("the program is pinned")?.join(names::FLOWS);
    let fill_ms = fill(&MapData::from_pin(&path)?, flows)?;

    let mut pair = Pair::new(format!("read the connection table ({flows} flows)"), flows as usize);
    let (mut batched, mut single) = (0, 0);
    pair.time(runs, |batch| {
        if batch {
            batched = read_pinned_flows(&path)?.len();
        } else {
            single = prog.director.dataplane().maps_ro().flows_per_element()?.len();
        }
        Ok(())
    })?;
    // Both ways read the same table: an LRU table may have evicted a few near full, but
    // never between two reads with nothing writing.
    let a: HashSet<FlowKey> = read_pinned_flows(&path)?.into_iter().map(|(k, _)| k).collect();
    let b: HashSet<FlowKey> = prog.director.dataplane().maps_ro().flows_per_element()?.into_iter().map(|(k, _)| k).collect();
    ensure!(a == b && batched == a.len() && single == a.len(), "the batch read and the per-element read disagree");
    ensure!(a.len() as f64 >= 0.99 * f64::from(flows), "only {} of {flows} flows are in the table", a.len());
    pair.entries = a.len();
    Ok((pair, FlowTable { capacity, present: a.len(), fill_ms }))
}

/// Writes `flows` distinct flows into the connection table, 65,536 per batch; returns ms.
pub(crate) fn fill(map: &MapData, flows: u32) -> Result<f64> {
    let started = Instant::now();
    let mut next = 0;
    while next < flows {
        interrupt::check()?;
        let end = flows.min(next + 65_536);
        let (keys, values): (Vec<FlowKey>, Vec<FlowEntry>) = (next..end).map(flow).unzip();
        batch::update(map, &keys, &values)?;
        next = end;
    }
    Ok(ms(started.elapsed()))
}

/// Flow `i`: one client address per 50,000 source ports, as SYNs to the bench's service
/// would record them.
fn flow(i: u32) -> (FlowKey, FlowEntry) {
    let key = FlowKey {
        src: [(0x0a02_0000 + i / 50_000).to_be(), 0, 0, 0],
        dst: [u32::from(std::net::Ipv4Addr::new(10, 0, 0, 100)).to_be(), 0, 0, 0],
        sport: (10_000 + (i % 50_000) as u16).to_be(),
        dport: 7000u16.to_be(),
        proto: 6,
        family: 4,
        _pad0: [0; 2],
    };
    (key, FlowEntry { backend_id: 1 + i % 3, service_id: 0, slot: i % 65_537, flags: 0, last_seen_ns: 1 })
}

struct Maglev {
    full: Pair,
    flip: Pair,
    moved: Pair,
    read: Pair,
}

/// The Maglev writes of a first failover, a whole region, and the slots that move, each
/// written both ways into the region the data path does not read; and a whole-region read.
fn maglev(runs: usize) -> Result<Maglev> {
    let mut prog = ProgramUnderTest::new(&config_checked(3, "tcp"))?;
    // As the daemon does after every event: the region the flip writes holds the live table.
    prog.director.tidy();
    let before = prog.director.written()[&key()].clone();
    let target = prog.director.dataplane().maps_ro().maglev_region(before.id, 1 - before.active, before.table_size)?;
    prog.director.set_health(&key(), backend_addr(1), false, "bench: failover")?.context("the flip changed nothing")?;
    let after = prog.director.written()[&key()].clone();
    let (id, spare, size) = (after.id, 1 - after.active, after.table_size);
    let slots = |keep: &dyn Fn(u32, u32) -> bool, other: &[u32]| -> Vec<(u32, u32)> {
        (0..).zip(after.table().iter().zip(other)).filter(|(_, (a, b))| keep(**a, **b)).map(|(s, (a, _))| (s, *a)).collect()
    };
    let full = slots(&|_, _| true, after.table());
    let flip = slots(&|a, b| a != b, &target);
    let moved = slots(&|a, b| a & MAGLEV_BACKEND_MASK != b & MAGLEV_BACKEND_MASK, before.table());

    let mut pairs = Vec::new();
    for (name, writes) in [
        (format!("write a whole Maglev region ({size} slots)"), &full),
        ("write a first failover of a 3-master service (what the director writes)".to_string(), &flip),
        ("write the slots one master's failure moves (3 -> 2 masters)".to_string(), &moved),
    ] {
        let mut pair = Pair::new(name, writes.len());
        pair.time(runs, |batched| {
            let mut maps = prog.director.dataplane_mut().maps();
            let n = if batched {
                maps.set_maglev_entries(id, spare, writes.iter().copied())?
            } else {
                maps.set_maglev_entries_per_element(id, spare, writes.iter().copied())?
            };
            ensure!(n == writes.len(), "{n} of {} entries written", writes.len());
            Ok(())
        })?;
        let region = prog.director.dataplane().maps_ro().maglev_region_per_element(id, spare, size)?;
        ensure!(writes.iter().all(|&(s, v)| region[s as usize] == v), "the region does not hold what was written");
        pairs.push(pair);
    }
    let mut read = Pair::new(format!("read a whole Maglev region ({size} slots)"), size as usize);
    let maps = prog.director.dataplane().maps_ro();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    read.time(runs, |batched| {
        if batched {
            a = maps.maglev_region(id, spare, size)?;
        } else {
            b = maps.maglev_region_per_element(id, spare, size)?;
        }
        Ok(())
    })?;
    ensure!(a == b && a == after.table(), "the two reads of the region disagree");
    let mut pairs = pairs.into_iter();
    let (full, flip, moved) = (pairs.next().unwrap(), pairs.next().unwrap(), pairs.next().unwrap());
    Ok(Maglev { full, flip, moved, read })
}
