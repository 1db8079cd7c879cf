//! Per-packet cost of the real XDP program with BPF_PROG_TEST_RUN, next to reference programs
//! loaded in the same run (`mim-lb-ebpf/src/bin/bench_floor.rs`), and next to the program of
//! an earlier commit (`baseline`, issue 7's comparison).
//!
//! The repeat trap: with `repeat = N` the kernel runs the program N times on one buffer, each
//! run on what the previous one left there. A benchmark is only honest if every one of those
//! runs took the path it claims, so each case is followed by a proof from the program's own
//! counters and the connection table: e.g. the old program recorded a repeated SYN's flow on
//! the first run only, so its new flows cannot be measured with a repeat at all; they are
//! measured one run per distinct SYN instead. The program forwards only frames addressed to the
//! gateway's MAC, so every master here has that MAC (see [`config`]): a forwarded frame is
//! addressed to the gateway again, and the next run takes the same path.

mod baseline;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use mim_lb::{
    config::{Protocol, ServiceKey},
    dataplane::{program::BENCH_FLOOR_OBJECT, service_index::addr_words},
};
use mim_lb_common::{FlowEntry, FlowKey, MAGLEV_BACKEND_MASK, MAGLEV_SLOT_CHANGED, hash, maglev_entry, maglev_prev, reason};
use mim_lb_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    testrun::{GATEWAY_MAC, ProgramUnderTest},
};
use serde_json::json;

pub use self::baseline::Baseline;
use crate::interrupt;
use crate::report::{Section, goal_verdict, median};

pub struct Settings {
    pub repeat: u32,
    pub runs: usize,
    pub new_flows: u32,
    /// The earlier program to compare with (issue 7), or why there is none.
    pub baseline: Baseline,
    /// Another earlier program (object, commit) to compare with on the paths every version
    /// shares (`--previous`).
    pub previous: Option<(PathBuf, String)>,
}

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PORT: u16 = 7000;

/// Goals from the issue, as the most allowed ratio to the floor.
const GOAL_ESTABLISHED: f64 = 1.5;
const GOAL_NOT_A_SERVICE: f64 = 1.2;
const GOAL_NEW_FLOW: f64 = 3.0;

/// The per-packet configuration: an IPv4 and an IPv6 service with `backends` masters each,
/// checked by nothing, so every master is up as soon as it is configured.
///
/// Every master has the gateway's own MAC. With `repeat`, each run sees the frame the previous
/// run forwarded, whose destination is the master's MAC, and the program forwards only frames
/// addressed to the gateway (any other it passes as `foreign_mac`): with masters of their own
/// MACs, every run after the first would take that other path. Which master a frame went to
/// is proven by the masters' packet counters instead.
fn config(backends: u32) -> String {
    let mac = GATEWAY_MAC.map(|b| format!("{b:02x}")).join(":");
    let mut c = String::from("interface = \"lo\"\n");
    for (name, vip) in [("bench4", IpAddr::from(VIP4)), ("bench6", IpAddr::from(VIP6))] {
        c += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {PORT}\n[service.health]\ncheck = \"none\"\n"
        );
        for i in 0..backends {
            let address: IpAddr = if vip.is_ipv4() {
                Ipv4Addr::new(10, 1, 0, 1 + i as u8).into()
            } else {
                Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1 + i as u16).into()
            };
            c += &format!("[[service.backend]]\naddress = \"{address}\"\nmac = \"{mac}\"\n");
        }
    }
    c
}

fn key(vip: IpAddr) -> ServiceKey {
    ServiceKey { vip, port: PORT, protocol: Protocol::Tcp }
}

/// One measurement of one program on one frame.
#[derive(Clone, Copy)]
struct Sample {
    /// ns per run as the kernel reports it (total / repeat, truncated to whole ns).
    kernel_ns: f64,
    /// ns per run from this thread's CPU time around the call (the syscall's own cost spread
    /// over `repeat` runs): the same time at sub-ns resolution when `repeat` is large.
    cpu_ns: f64,
    retval: u32,
}

impl Sample {
    /// The figure reported: CPU time for long runs (finer than the kernel's whole ns), the
    /// kernel's timer for single runs (CPU time would add the whole syscall).
    fn ns(&self, repeat: u32) -> f64 {
        if repeat >= 10_000 { self.cpu_ns } else { self.kernel_ns }
    }
}

pub(crate) fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Runs `program` on `frame` `repeat` times in one BPF_PROG_TEST_RUN; returns the timing and
/// the frame the last run left.
fn run(program: &Xdp, frame: &[u8], repeat: u32) -> Result<(Sample, Vec<u8>)> {
    interrupt::check()?;
    let mut out = vec![0u8; frame.len() + 256];
    let before = thread_cpu_ns();
    let r = program
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    let cpu = thread_cpu_ns() - before;
    out.truncate(r.data_size_out as usize);
    Ok((
        Sample {
            kernel_ns: r.duration.as_nanos() as f64,
            cpu_ns: cpu as f64 / f64::from(repeat.max(1)),
            retval: r.return_value,
        },
        out,
    ))
}

/// Every reason counter, every service's new-flow counter and every master's packet counter,
/// to prove what runs did.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Counters {
    reasons: Vec<u64>,
    new_flows: Vec<u64>,
    /// Packets forwarded to each master, by backend id.
    masters: BTreeMap<u32, u64>,
}

impl Counters {
    fn read(prog: &ProgramUnderTest) -> Result<Counters> {
        let maps = prog.director.dataplane().maps_ro();
        let reasons = maps.reason_counters()?.iter().map(|c| c.packets).collect();
        let mut new_flows = Vec::new();
        let mut masters = BTreeMap::new();
        for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
            let service = &prog.director.desired()[&key(vip)];
            new_flows.push(maps.service_stats(service.id)?.new_flows);
            for b in service.backends.values() {
                masters.insert(b.id, maps.backend_stats(b.id)?.packets);
            }
        }
        Ok(Counters { reasons, new_flows, masters })
    }

    /// Asserts that between `self` and `after` exactly `packets` packets were counted, all
    /// under `code`, and `new_flows` new flows were counted (the program counts a flow as new
    /// when the packet opens it: every SYN it forwards, whether it records the flow or not).
    fn prove(&self, after: &Counters, case: &str, code: u32, packets: u64, new_flows: u64) -> Result<()> {
        for (c, (a, b)) in self.reasons.iter().zip(&after.reasons).enumerate() {
            let expected = if c as u32 == code { packets } else { 0 };
            ensure!(
                b - a == expected,
                "{case}: {} packets counted as {}, expected {expected}: a run did not take the measured path",
                b - a,
                reason::name(c as u32)
            );
        }
        let opened: u64 = after.new_flows.iter().zip(&self.new_flows).map(|(b, a)| b - a).sum();
        ensure!(
            opened == new_flows,
            "{case}: {opened} new flows counted, expected {new_flows}: a run did not take the measured path"
        );
        Ok(())
    }

    /// Asserts that between `self` and `after` master `id` got `packets` packets and no other
    /// master any.
    fn prove_master(&self, after: &Counters, case: &str, id: u32, packets: u64) -> Result<()> {
        for (b, n) in &after.masters {
            let got = n - self.masters.get(b).copied().unwrap_or(0);
            let expected = if *b == id { packets } else { 0 };
            ensure!(
                got == expected,
                "{case}: master {b} got {got} packets, expected {expected}: a run did not take the measured path"
            );
        }
        Ok(())
    }
}

/// The live Maglev slot of `vip`'s service for a TCP flow from `client:sport`, and its entry.
fn slot_of(prog: &ProgramUnderTest, client: IpAddr, sport: u16, vip: IpAddr) -> (u32, u32) {
    let svc = &prog.director.written()[&key(vip)];
    let (s, family) = addr_words(client);
    let (d, _) = addr_words(vip);
    let slot = hash::table_slot(hash::flow_hash(family, &s, &d, sport.to_be(), PORT.to_be(), 6), svc.table_size);
    (slot, svc.table()[slot as usize])
}

fn slot_entry(prog: &ProgramUnderTest, client: IpAddr, sport: u16, vip: IpAddr) -> u32 {
    slot_of(prog, client, sport, vip).1
}

fn clean(entry: u32) -> bool {
    entry & MAGLEV_SLOT_CHANGED == 0
}

/// A marked slot that changed hands and remembers its previous master: a flow recorded there
/// and one that began before the change go to different masters.
fn changed_hands(entry: u32) -> bool {
    let (owner, prev) = (entry & MAGLEV_BACKEND_MASK, maglev_prev(entry));
    entry & MAGLEV_SLOT_CHANGED != 0 && prev != 0 && prev != owner
}

/// The first source port from `from` of a flow of `vip`'s service from `client` whose live
/// Maglev entry satisfies `wanted`, and that entry.
fn find_flow(prog: &ProgramUnderTest, client: IpAddr, vip: IpAddr, from: u16, wanted: fn(u32) -> bool) -> Result<(u16, u32)> {
    (from..u16::MAX)
        .map(|p| (p, slot_entry(prog, client, p, vip)))
        .find(|(_, e)| wanted(*e))
        .with_context(|| format!("no flow of {vip} from port {from} on hashes to the wanted kind of slot"))
}

/// The connection-table key of a TCP flow to the service on `vip`.
fn flow_key(client: IpAddr, sport: u16, vip: IpAddr) -> FlowKey {
    let (src, family) = addr_words(client);
    let (dst, _) = addr_words(vip);
    FlowKey { src, dst, sport: sport.to_be(), dport: PORT.to_be(), proto: 6, family, _pad0: [0; 2] }
}

/// Leaves a record of the TCP flow `client:sport` -> `vip` on master `on`, made by the program
/// itself: the flow's slot is marked by hand, with `on` as its master and another as its
/// previous one, for one SYN (a SYN on a marked slot whose unrecorded flows go elsewhere is
/// recorded), then the control plane's entry is put back. On a clean slot the record is never
/// consulted; a run that consulted it would go to `on`.
fn plant_record(prog: &mut ProgramUnderTest, client: IpAddr, sport: u16, vip: IpAddr, on: u32) -> Result<()> {
    let (slot, entry) = slot_of(prog, client, sport, vip);
    let svc = &prog.director.written()[&key(vip)];
    let (id, half) = (svc.id, svc.active);
    let prev = other_master(prog, vip, on)?;
    prog.director.dataplane_mut().maps().set_maglev_entries(id, half, [(slot, maglev_entry(on, prev, true))])?;
    let ran = prog.run(&Frame::tcp(client, sport, vip, PORT, TCP_SYN).bytes());
    prog.director.dataplane_mut().maps().set_maglev_entries(id, half, [(slot, entry)])?;
    ran?;
    ensure!(
        record_of(prog, &flow_key(client, sport, vip))?.is_some_and(|r| r.backend_id == on),
        "planting a record of {client}:{sport} on master {on}: the SYN did not record it"
    );
    Ok(())
}

/// A master of `vip`'s service other than `id`.
fn other_master(prog: &ProgramUnderTest, vip: IpAddr, id: u32) -> Result<u32> {
    prog.director.desired()[&key(vip)].backends.values().map(|b| b.id).find(|b| *b != id).context("the service has one master")
}

fn record_of(prog: &ProgramUnderTest, key: &FlowKey) -> Result<Option<FlowEntry>> {
    Ok(prog.director.dataplane().maps_ro().flow(key)?)
}

/// `CLOCK_MONOTONIC_COARSE`, the clock the program stamps records with.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The reference programs, loaded once.
struct References {
    ebpf: Ebpf,
}

impl References {
    const NAMES: [&'static str; 6] =
        ["bench_floor", "bench_service_hash", "bench_hashes", "bench_clock", "bench_clock_coarse", "bench_flow_insert"];

    fn load() -> Result<References> {
        let mut ebpf = Ebpf::load(BENCH_FLOOR_OBJECT).context("loading the reference programs")?;
        for name in Self::NAMES {
            let p: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(References { ebpf })
    }

    fn get(&self, name: &str) -> Result<&Xdp> {
        Ok(self.ebpf.program(name).with_context(|| format!("{name} missing"))?.try_into()?)
    }
}

/// Per-round samples of several programs measured interleaved (one of each per round), so
/// that a burst of load elsewhere hits all of them alike.
struct Interleaved {
    names: Vec<&'static str>,
    samples: Vec<Vec<Sample>>,
    repeat: u32,
}

impl Interleaved {
    fn measure(programs: &[(&'static str, &Xdp)], frame: &[u8], repeat: u32, runs: usize) -> Result<Interleaved> {
        let each: Vec<(&'static str, &Xdp, &[u8])> = programs.iter().map(|(n, p)| (*n, *p, frame)).collect();
        Self::measure_each(&each, repeat, runs)
    }

    /// Like [`Interleaved::measure`], each program on a frame of its own. Each round starts
    /// with the next program, so that none is always first or always after the same one.
    fn measure_each(programs: &[(&'static str, &Xdp, &[u8])], repeat: u32, runs: usize) -> Result<Interleaved> {
        let k = programs.len();
        let mut samples = vec![Vec::with_capacity(runs); k];
        for round in 0..runs {
            for i in (0..k).map(|j| (j + round) % k) {
                let (_, p, frame) = programs[i];
                samples[i].push(run(p, frame, repeat)?.0);
            }
        }
        Ok(Interleaved { names: programs.iter().map(|(n, _, _)| *n).collect(), samples, repeat })
    }

    fn index(&self, name: &str) -> usize {
        self.names.iter().position(|n| *n == name).expect("measured program")
    }

    fn per_round(&self, name: &str) -> Vec<f64> {
        self.samples[self.index(name)].iter().map(|s| s.ns(self.repeat)).collect()
    }

    fn ns(&self, name: &str) -> f64 {
        median(&self.per_round(name))
    }

    /// Median over rounds of `a`'s time divided by `b`'s in the same round.
    fn ratio(&self, a: &str, b: &str) -> f64 {
        let (a, b) = (self.per_round(a), self.per_round(b));
        median(&a.iter().zip(&b).map(|(x, y)| x / y).collect::<Vec<_>>())
    }

    /// Median over rounds of `a`'s time above `floor`'s divided by `b`'s, all in the same
    /// round: how two programs compare once the harness's own cost is taken out.
    fn ratio_above(&self, a: &str, b: &str, floor: &str) -> f64 {
        let (a, b, f) = (self.per_round(a), self.per_round(b), self.per_round(floor));
        median(&(0..f.len()).map(|r| (a[r] - f[r]) / (b[r] - f[r])).collect::<Vec<_>>())
    }

    fn kernel_ns(&self, name: &str) -> f64 {
        median(&self.samples[self.index(name)].iter().map(|s| s.kernel_ns).collect::<Vec<_>>())
    }

    fn retvals(&self, name: &str) -> Vec<u32> {
        self.samples[self.index(name)].iter().map(|s| s.retval).collect()
    }
}

/// What every warm case needs: the floor, the reference programs and the run settings.
struct Warm<'a> {
    floor: &'a Xdp,
    refs: &'a References,
    repeat: u32,
    runs: usize,
}

impl Warm<'_> {
    /// Program runs of one program in one case.
    fn total(&self) -> u64 {
        u64::from(self.repeat) * self.runs as u64
    }

    fn measure(&self, programs: &[(&'static str, &Xdp)], frame: &[u8]) -> Result<Interleaved> {
        Interleaved::measure(programs, frame, self.repeat, self.runs)
    }
}

/// One run of `program` on `frame`, timed by the kernel (CPU time would add the syscall).
fn single(program: &Xdp, frame: &[u8]) -> Result<f64> {
    Ok(run(program, frame, 1)?.0.kernel_ns)
}

struct Row {
    case: &'static str,
    ns: f64,
    floor: f64,
    ratio: f64,
    goal: Option<f64>,
    json: serde_json::Value,
}

impl Row {
    fn warm(case: &'static str, m: &Interleaved, goal: Option<f64>) -> Row {
        Row {
            case,
            ns: m.ns("mim-lb"),
            floor: m.ns("floor"),
            ratio: m.ratio("mim-lb", "floor"),
            goal,
            json: json!({
                "ns": m.ns("mim-lb"), "floor_ns": m.ns("floor"), "ratio": m.ratio("mim-lb", "floor"),
                "kernel_ns": m.kernel_ns("mim-lb"), "floor_kernel_ns": m.kernel_ns("floor"),
                "goal": goal, "repeat": m.repeat, "runs": m.samples[0].len(),
            }),
        }
    }

    /// A reference program measured in the same rounds as a case's floor.
    fn reference(case: &'static str, m: &Interleaved, name: &str) -> Row {
        Row {
            case,
            ns: m.ns(name),
            floor: m.ns("floor"),
            ratio: m.ratio(name, "floor"),
            goal: None,
            json: json!({
                "ns": m.ns(name), "floor_ns": m.ns("floor"), "ratio": m.ratio(name, "floor"),
                "kernel_ns": m.kernel_ns(name), "floor_kernel_ns": m.kernel_ns("floor"),
                "repeat": m.repeat, "runs": m.samples[0].len(),
            }),
        }
    }

    fn cold(case: &'static str, ns: f64, floor: f64, goal: Option<f64>, flows: usize) -> Row {
        let ratio = ns / floor;
        let json = json!({"ns": ns, "floor_ns": floor, "ratio": ratio, "goal": goal, "flows": flows});
        Row { case, ns, floor, ratio, goal, json }
    }
}

/// Everything the per-packet section reports, measured on the current program.
struct Measured {
    est4: Interleaved,
    est6: Interleaved,
    pass: Interleaved,
    syn_clean: Interleaved,
    cold: Cold,
    recorded: Interleaved,
    unrecorded: Interleaved,
    syn_marked: Interleaved,
}

/// Returns the per-packet section, issue 7's comparison with the baseline program, the
/// program sizes, and the comparison with `--previous` if one was given.
pub fn measure(settings: &Settings, dump_xlated: Option<&Path>) -> Result<(Section, Section, Section, Option<Section>)> {
    let refs = References::load()?;
    let w = Warm { floor: refs.get("bench_floor")?, refs: &refs, repeat: settings.repeat, runs: settings.runs };
    let mut prog = ProgramUnderTest::new(&config(3))?;
    let sizes = program_sizes(&prog, &refs, dump_xlated)?;
    let (v4, v6) = (IpAddr::from(VIP4), IpAddr::from(VIP6));

    let est4 = established(&w, &mut prog, CLIENT4.into(), v4, "established IPv4", true)?;
    let est6 = established(&w, &mut prog, CLIENT6.into(), v6, "established IPv6", false)?;
    let pass = not_a_service(&w, &prog)?;
    let syn_clean = syn_on_clean_slot(&w, &prog)?;
    let cold = cold_flows(&w, &prog, settings.new_flows)?;
    // A fourth master takes over about a quarter of the slots, which are marked changed.
    prog.apply(&config(4))?;
    let recorded = changed_recorded(&w, &prog)?;
    let unrecorded = changed_unrecorded(&w, &prog)?;
    let syn_marked = syn_on_marked_slot(&w, &prog)?;
    drop(prog);
    let m = Measured { est4, est6, pass, syn_clean, cold, recorded, unrecorded, syn_marked };

    let comparison = baseline::measure(&w, &settings.baseline, settings.new_flows)?;
    let previous = match &settings.previous {
        Some((path, commit)) => Some(baseline::measure_previous(&w, path, commit)?),
        None => None,
    };
    Ok((section(&m, settings), comparison, sizes, previous))
}

/// Established flow: an ACK on a slot the control plane's table shows unmarked. The flow has
/// a record naming another master (see [`plant_record`]), so a run that consulted the
/// connection table would have gone there: all runs on the slot's master, forwarded, with 0
/// new flows, prove every run took the fast path.
fn established(w: &Warm, prog: &mut ProgramUnderTest, client: IpAddr, vip: IpAddr, case: &'static str, variants: bool) -> Result<Interleaved> {
    let (sport, entry) = find_flow(prog, client, vip, 40_000, clean)?;
    let owner = entry & MAGLEV_BACKEND_MASK;
    plant_record(prog, client, sport, vip, other_master(prog, vip, owner)?)?;
    let frame = Frame::tcp(client, sport, vip, PORT, TCP_ACK).with_payload(&[0; 64]).bytes();
    let before = Counters::read(prog)?;
    let mut programs = vec![("floor", w.floor), ("mim-lb", prog.director.dataplane().program())];
    if variants {
        programs.push(("hashes", w.refs.get("bench_hashes")?));
    }
    let m = w.measure(&programs, &frame)?;
    let after = Counters::read(prog)?;
    before.prove(&after, case, reason::FORWARDED, w.total(), 0)?;
    before.prove_master(&after, case, owner, w.total())?;
    Ok(m)
}

/// Not for a service: another address of the same network, passed untouched.
fn not_a_service(w: &Warm, prog: &ProgramUnderTest) -> Result<Interleaved> {
    let other = Frame::tcp(CLIENT4, 40000, Ipv4Addr::new(10, 0, 0, 2), 22, TCP_ACK).with_payload(&[0; 64]).bytes();
    let before = Counters::read(prog)?;
    let programs =
        [("floor", w.floor), ("mim-lb", prog.director.dataplane().program()), ("service_hash", w.refs.get("bench_service_hash")?)];
    let m = w.measure(&programs, &other)?;
    before.prove(&Counters::read(prog)?, "not a service", reason::NOT_A_SERVICE, w.total(), 0)?;
    ensure!(m.retvals("mim-lb").iter().all(|v| *v == reason::XDP_PASS), "not a service: not passed");
    Ok(m)
}

/// A SYN on a clean slot, repeated: every run looks for a record an earlier connection on the
/// same addresses and ports may have left (to delete it), finds none, records nothing and
/// goes to the slot's master. Its flow has no record before or after.
fn syn_on_clean_slot(w: &Warm, prog: &ProgramUnderTest) -> Result<Interleaved> {
    let case = "SYN on a clean slot";
    let (port, entry) = find_flow(prog, CLIENT4.into(), VIP4.into(), 30_000, clean)?;
    let syn = Frame::tcp(CLIENT4, port, VIP4, PORT, TCP_SYN).bytes();
    let key = flow_key(CLIENT4.into(), port, VIP4.into());
    ensure!(record_of(prog, &key)?.is_none(), "{case}: the flow has a record before the runs");
    let before = Counters::read(prog)?;
    let m = w.measure(&[("floor", w.floor), ("mim-lb", prog.director.dataplane().program())], &syn)?;
    let after = Counters::read(prog)?;
    before.prove(&after, case, reason::FORWARDED, w.total(), w.total())?;
    before.prove_master(&after, case, entry & MAGLEV_BACKEND_MASK, w.total())?;
    ensure!(record_of(prog, &key)?.is_none(), "{case}: a run recorded the flow");
    Ok(m)
}

/// New flows one run each, cold: SYNs of distinct flows on a table with no marked slot, each
/// run once on mim-lb and on the floor, then their ACKs.
struct Cold {
    syn: f64,
    floor: f64,
    acks: f64,
    flows: usize,
    acks_on_clean: usize,
}

/// Each SYN has its own 5-tuple and is run once, on mim-lb and on the floor in turn; then the
/// ACKs of those on clean slots (all of them here), one run each. Single runs include the
/// kernel timer's fixed cost and caches cooled by the syscall, on both sides. None is recorded.
fn cold_flows(w: &Warm, prog: &ProgramUnderTest, n: u32) -> Result<Cold> {
    let flow = |i: u32, flags: u8| {
        let client = IpAddr::from(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i / 50_000));
        let sport = 10_000 + (i % 50_000) as u16;
        (client, sport, Frame::tcp(client, sport, VIP4, PORT, flags).bytes())
    };
    let program = prog.director.dataplane().program();
    let recorded_before = prog.director.dataplane().maps_ro().flows()?.len();
    let before = Counters::read(prog)?;
    let (mut syn_ns, mut floor_ns) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (_, _, syn) = flow(i, TCP_SYN);
        syn_ns.push(single(program, &syn)?);
        floor_ns.push(single(w.floor, &syn)?);
    }
    before.prove(&Counters::read(prog)?, "new flows", reason::FORWARDED, u64::from(n), u64::from(n))?;
    let recorded = prog.director.dataplane().maps_ro().flows()?.len();
    ensure!(recorded == recorded_before, "new flows: {} SYNs on clean slots were recorded", recorded - recorded_before);

    // Only ACKs on clean slots: those take the fast path.
    let acks: Vec<Vec<u8>> = (0..n)
        .map(|i| flow(i, TCP_ACK))
        .filter(|(client, sport, _)| clean(slot_entry(prog, *client, *sport, VIP4.into())))
        .map(|(_, _, frame)| frame)
        .collect();
    let before = Counters::read(prog)?;
    let mut ack_ns = Vec::new();
    for f in &acks {
        ack_ns.push(single(program, f)?);
    }
    before.prove(&Counters::read(prog)?, "ACKs once each", reason::FORWARDED, acks.len() as u64, 0)?;
    Ok(Cold { syn: median(&syn_ns), floor: median(&floor_ns), acks: median(&ack_ns), flows: n as usize, acks_on_clean: acks.len() })
}

/// An established flow on a slot whose master changed, recorded (its SYN came on the marked
/// slot): every run finds its record. An unrecorded flow there goes to the slot's previous
/// master, so all runs on the slot's master prove that every run found the record.
fn changed_recorded(w: &Warm, prog: &ProgramUnderTest) -> Result<Interleaved> {
    let case = "changed slot, recorded";
    let v4 = IpAddr::from(VIP4);
    let (port, entry) = find_flow(prog, CLIENT4.into(), v4, 20_000, changed_hands)?;
    let owner = entry & MAGLEV_BACKEND_MASK;
    prog.run(&Frame::tcp(CLIENT4, port, VIP4, PORT, TCP_SYN).bytes())?;
    ensure!(
        record_of(prog, &flow_key(CLIENT4.into(), port, v4))?.is_some_and(|r| r.backend_id == owner),
        "{case}: the SYN on a marked slot was not recorded on the slot's master"
    );
    let ack = Frame::tcp(CLIENT4, port, VIP4, PORT, TCP_ACK).with_payload(&[0; 64]).bytes();
    let programs = [
        ("floor", w.floor),
        ("mim-lb", prog.director.dataplane().program()),
        ("clock", w.refs.get("bench_clock")?),
        ("clock_coarse", w.refs.get("bench_clock_coarse")?),
    ];
    let before = Counters::read(prog)?;
    let m = w.measure(&programs, &ack)?;
    let after = Counters::read(prog)?;
    before.prove(&after, case, reason::FORWARDED, w.total(), 0)?;
    before.prove_master(&after, case, owner, w.total())?;
    Ok(m)
}

/// An established flow on a slot whose master changed, unrecorded (it began before the
/// change): every run misses in the connection table and goes to the slot's previous master,
/// stamping the slot's `SLOT_SEEN`. All runs on the previous master (not the slot's) prove it.
fn changed_unrecorded(w: &Warm, prog: &ProgramUnderTest) -> Result<Interleaved> {
    let case = "changed slot, unrecorded";
    let v4 = IpAddr::from(VIP4);
    let (port, entry) = find_flow(prog, CLIENT4.into(), v4, 25_000, changed_hands)?;
    let key = flow_key(CLIENT4.into(), port, v4);
    ensure!(record_of(prog, &key)?.is_none(), "{case}: the flow has a record before the runs");
    let ack = Frame::tcp(CLIENT4, port, VIP4, PORT, TCP_ACK).with_payload(&[0; 64]).bytes();
    let before = Counters::read(prog)?;
    let m = w.measure(&[("floor", w.floor), ("mim-lb", prog.director.dataplane().program())], &ack)?;
    let after = Counters::read(prog)?;
    before.prove(&after, case, reason::FORWARDED, w.total(), 0)?;
    before.prove_master(&after, case, maglev_prev(entry), w.total())?;
    ensure!(record_of(prog, &key)?.is_none(), "{case}: a run recorded the flow");
    Ok(m)
}

/// A SYN on a marked slot, repeated: every run records its flow on the slot's master (an LRU
/// insert that replaces the previous run's record). The record is there afterwards, stamped by
/// one of the last runs.
fn syn_on_marked_slot(w: &Warm, prog: &ProgramUnderTest) -> Result<Interleaved> {
    let case = "SYN on a marked slot";
    let v4 = IpAddr::from(VIP4);
    let (port, entry) = find_flow(prog, CLIENT4.into(), v4, 50_000, changed_hands)?;
    let owner = entry & MAGLEV_BACKEND_MASK;
    let syn = Frame::tcp(CLIENT4, port, VIP4, PORT, TCP_SYN).bytes();
    let before = Counters::read(prog)?;
    let programs = [
        ("floor", w.floor),
        ("mim-lb", prog.director.dataplane().program()),
        ("flow_insert", w.refs.get("bench_flow_insert")?),
    ];
    let m = w.measure(&programs, &syn)?;
    let after = Counters::read(prog)?;
    let now = coarse_now_ns();
    // The reference inserted the same flow's record (it flips a MAC bit if an insert failed).
    ensure!(m.retvals("flow_insert").iter().all(|v| *v == reason::XDP_TX), "{case}: the insert reference did not forward");
    let reference: aya::maps::HashMap<_, FlowKey, FlowEntry> =
        aya::maps::HashMap::try_from(w.refs.ebpf.map("BENCH_FLOWS").context("BENCH_FLOWS missing")?)?;
    let key = flow_key(CLIENT4.into(), port, v4);
    ensure!(reference.get(&key, 0).is_ok(), "{case}: the insert reference recorded nothing");
    let (_, out) = run(w.refs.get("bench_flow_insert")?, &syn, 1)?;
    ensure!(out[6..12] == syn[0..6], "{case}: an insert of the reference failed");
    before.prove(&after, case, reason::FORWARDED, w.total(), w.total())?;
    before.prove_master(&after, case, owner, w.total())?;
    let record = record_of(prog, &flow_key(CLIENT4.into(), port, v4))?.with_context(|| format!("{case}: no record"))?;
    ensure!(record.backend_id == owner, "{case}: recorded on master {}, not the slot's {owner}", record.backend_id);
    // The round took far longer than this: a record from the first runs only would be older.
    let last_round_ns = m.per_round("mim-lb").last().copied().unwrap_or(0.0) * f64::from(w.repeat);
    let age = now.saturating_sub(record.last_seen_ns);
    ensure!(
        (age as f64) < last_round_ns / 2.0 + 20e6,
        "{case}: the record was last written {age} ns ago, before the last round ({last_round_ns:.0} ns)"
    );
    Ok(m)
}

/// The per-packet table and its notes.
fn section(m: &Measured, settings: &Settings) -> Section {
    let (repeat, runs, n) = (settings.repeat, settings.runs, m.cold.flows);
    let rows = [
        Row::warm("established flow, IPv4 (TCP ACK, clean slot)", &m.est4, Some(GOAL_ESTABLISHED)),
        Row::warm("established flow, IPv6 (TCP ACK, clean slot)", &m.est6, None),
        Row::warm("not for a service (passed)", &m.pass, Some(GOAL_NOT_A_SERVICE)),
        Row::warm("new flow: SYN on a clean slot (no table access; nothing recorded)", &m.syn_clean, Some(GOAL_NEW_FLOW)),
        Row::warm("new flow: SYN on a changed slot (flow recorded every run)", &m.syn_marked, Some(GOAL_NEW_FLOW)),
        Row::reference("reference: floor + the insert alone (key, coarse clock, one LRU insert)", &m.syn_marked, "flow_insert"),
        Row::warm("established flow on a changed slot, recorded (table lookup finds it)", &m.recorded, None),
        Row::warm("established flow on a changed slot, began before (lookup misses; previous master)", &m.unrecorded, None),
        Row::cold("new flow (TCP SYN, clean slot), 1 run each, cold", m.cold.syn, m.cold.floor, Some(GOAL_NEW_FLOW), n),
        Row::cold("their ACKs (clean slot), 1 run each, cold", m.cold.acks, m.cold.floor, None, m.cold.acks_on_clean),
    ];
    let mut section = Section::new("Per-packet cost (BPF_PROG_TEST_RUN)", &["case", "ns/pkt", "floor ns", "ratio", "goal"]);
    section.method = vec![
        format!(
            "Warm rows: one BPF_PROG_TEST_RUN of {repeat} runs per measurement, {runs} rounds; each round measures the floor and mim-lb back to back, starting with the next program each round; \
             ns/pkt and floor ns are medians over rounds, ratio is the median of the per-round ratios."
        ),
        "ns from this thread's CPU time over the call / repeat (sub-ns resolution; the kernel's own figure is whole ns, in the JSON).".into(),
        format!(
            "Cold rows: {n} distinct flows, one run each, median; both sides include the kernel timer's fixed cost (clock reads) and caches cooled by the syscall."
        ),
        "Floor: swap the two MACs, XDP_TX (the least an XDP forwarder does). Every row's path is proven by mim-lb's counters (reasons, new flows, \
         packets per master) and its connection table. Every master has the gateway's MAC, so a forwarded frame is addressed to the gateway \
         again and the next run takes the same path."
            .into(),
    ];
    for r in &rows {
        section.row(vec![
            r.case.to_string(),
            format!("{:.1}", r.ns),
            format!("{:.1}", r.floor),
            format!("{:.2}x", r.ratio),
            r.goal.map_or("-".into(), |g| goal_verdict(r.ratio, g)),
        ]);
    }
    section.notes = notes(m);
    let json_rows: serde_json::Map<String, serde_json::Value> =
        rows.iter().map(|r| (r.case.to_string(), r.json.clone())).collect();
    section.json = json!({
        "rows": json_rows,
        "reference_programs_ns": {
            "floor_plus_service_hash": m.pass.ns("service_hash"),
            "floor_plus_ktime_get_ns": m.recorded.ns("clock"),
            "floor_plus_ktime_get_coarse_ns": m.recorded.ns("clock_coarse"),
            "floor": m.est4.ns("floor"),
            "floor_plus_mim_lb_hashes": m.est4.ns("hashes"),
            "floor_plus_flow_insert": m.syn_marked.ns("flow_insert"),
        },
    });
    section
}

fn notes(m: &Measured) -> Vec<String> {
    let (est4, pass, recorded) = (&m.est4, &m.pass, &m.recorded);
    let hashes = est4.ns("hashes") - est4.ns("floor");
    let over_floor = est4.ns("mim-lb") - est4.ns("floor");
    let above = |i: &Interleaved| i.ns("mim-lb") - i.ns("floor");
    let above_ref = |i: &Interleaved, name: &str| i.ns(name) - i.ns("floor");
    vec![
        format!(
            "Where a packet for no service spends its {:.1} ns above the floor: the floor plus only the service-slot hash costs {:.1} ns, i.e. {:.1} ns is that hash; \
             the rest is parsing, the service-index lookup and the reason counter.",
            above(pass),
            pass.ns("service_hash"),
            pass.ns("service_hash") - pass.ns("floor"),
        ),
        format!(
            "Where an established IPv4 packet's {over_floor:.1} ns above the floor go: the floor plus only mim-lb's two hashes \
             (service slot and flow hash over the IPv4 words, 2 + 4 blocks; same code) costs {:.1} ns, i.e. {hashes:.1} ns ({:.0}%) is hashing.",
            est4.ns("hashes"),
            100.0 * hashes / over_floor
        ),
        format!(
            "New flows, warm: a SYN on a clean slot (the usual case: the table remembers where it went) costs {:.1} ns above the floor, {:+.1} against \
             an established packet, whose path it takes (no connection-table access; one more counter). On a changed slot, where \
             the flow is recorded (an LRU insert replacing the previous run's record, the clock read), it costs {:.1} ns above the floor.",
            above(&m.syn_clean),
            above(&m.syn_clean) - over_floor,
            above(&m.syn_marked),
        ),
        format!(
            "The connection-table insert apart: the floor plus the insert alone (the flow's key from the packet, a coarse clock read, one insert into an LRU \
             map of mim-lb's key, value and size, replacing the last run's record as mim-lb's runs do) costs {ins:.1} ns above the floor, in the same \
             rounds as the SYN on a changed slot. That SYN costs {marked:.1} ns above the floor, {diff:.1} ns more than a SYN on a clean slot \
             ({clean:.1} ns, no table access, the usual new flow; an established packet {est:.1} ns): what recording a flow adds to a SYN (the \
             insert, its clock read, the marked slot's checks). The costs do not simply add (the reference parses and builds the key itself, and \
             the CPU overlaps work), so read the difference as what a recorded SYN pays for its record, and the reference as the insert's own price.",
            ins = above_ref(&m.syn_marked, "flow_insert"),
            marked = above(&m.syn_marked),
            diff = above(&m.syn_marked) - above(&m.syn_clean),
            clean = above(&m.syn_clean),
            est = over_floor,
        ),
        format!(
            "On a changed slot, a recorded flow costs {:.1} ns above the floor (lookup that finds it, clock read to refresh last_seen_ns at most once a second); \
             a flow that began before the change {:.1} ns (lookup that misses, clock read to stamp SLOT_SEEN for the sweep, its previous master).",
            above(recorded),
            above(&m.unrecorded),
        ),
        format!(
            "mim-lb reads the tick-resolution clock (bpf_ktime_get_coarse_ns): the floor plus one such read costs {2:.1} ns ({3:.1} ns over the floor), \
             the floor plus one bpf_ktime_get_ns {0:.1} ns ({1:.1} ns over).",
            recorded.ns("clock"),
            recorded.ns("clock") - recorded.ns("floor"),
            recorded.ns("clock_coarse"),
            recorded.ns("clock_coarse") - recorded.ns("floor"),
        ),
        format!(
            "Cold penalty: an established ACK costs {:.0} ns when run once vs {:.1} ns warm; the cold floor is {:.0} ns vs {:.1} ns warm.",
            m.cold.acks,
            est4.ns("mim-lb"),
            m.cold.floor,
            est4.ns("floor"),
        ),
    ]
}

/// Instruction counts and JIT sizes of every program measured.
fn program_sizes(prog: &ProgramUnderTest, refs: &References, dump: Option<&Path>) -> Result<Section> {
    let mut s = Section::new("Program size (as loaded)", &["program", "xlated insns", "jited bytes", "verifier insns processed"]);
    s.method = vec![
        "xlated = BPF instructions after the verifier's rewrites (inlined map lookups), the program the JIT compiles.".into(),
    ];
    let mut json_rows = serde_json::Map::new();
    let mut programs: Vec<(&str, &Xdp)> = vec![("mim_lb", prog.director.dataplane().program())];
    for name in References::NAMES {
        programs.push((name, refs.get(name)?));
    }
    for (name, p) in programs {
        let info = p.info().with_context(|| format!("program info of {name}"))?;
        let xlated = info.size_translated().unwrap_or(0) / 8;
        let verified = info.verified_instruction_count();
        s.row(vec![
            name.to_string(),
            xlated.to_string(),
            info.size_jitted().to_string(),
            verified.map_or("-".into(), |v| v.to_string()),
        ]);
        json_rows.insert(
            name.into(),
            json!({"xlated_insns": xlated, "jited_bytes": info.size_jitted(), "verified_insns": verified, "id": info.id()}),
        );
        if let Some(dir) = dump {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let out = std::process::Command::new("bpftool")
                .args(["prog", "dump", "xlated", "id", &info.id().to_string(), "linum"])
                .output()
                .context("running bpftool (for --dump-xlated)")?;
            if !out.status.success() {
                bail!("bpftool prog dump xlated: {}", String::from_utf8_lossy(&out.stderr));
            }
            let path = dir.join(format!("{name}.xlated.txt"));
            std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    s.json = serde_json::Value::Object(json_rows);
    Ok(s)
}
