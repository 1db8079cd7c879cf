//! Per-packet cost of the real XDP program with BPF_PROG_TEST_RUN, next to reference programs
//! loaded in the same run (`mim-lb-ebpf/src/bin/bench_floor.rs`).
//!
//! The repeat trap: with `repeat = N` the kernel runs the program N times on one buffer, each
//! run on what the previous one left there. A benchmark is only honest if every one of those
//! runs took the path it claims, so each case is followed by a proof from the program's own
//! counters (and its output frame): e.g. a repeated SYN records its flow on the first run
//! only, so new flows cannot be measured with a repeat at all; they are measured one run per
//! distinct SYN instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use mim_lb::{
    config::{Protocol, ServiceKey},
    dataplane::{program::BENCH_FLOOR_OBJECT, service_index::addr_words},
};
use mim_lb_common::{BACKEND_F_IN_USE, BackendEntry, MAGLEV_BACKEND_MASK, MAGLEV_SLOT_CHANGED, hash, reason};
use mim_lb_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    testrun::{ProgramUnderTest, forwarded},
};
use serde_json::json;

use crate::interrupt;
use crate::report::{Section, goal_verdict, median};

pub struct Settings {
    pub repeat: u32,
    pub runs: usize,
    pub new_flows: u32,
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
fn config(backends: u32) -> String {
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
            let family = if vip.is_ipv4() { 4 } else { 6 };
            c += &format!("[[service.backend]]\naddress = \"{address}\"\nmac = \"02:00:00:0{family}:00:{:02x}\"\n", i + 1);
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

/// Every reason counter and every service's new-flow counter, to prove what runs did.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Counters {
    reasons: Vec<u64>,
    new_flows: Vec<u64>,
}

impl Counters {
    fn read(prog: &ProgramUnderTest) -> Result<Counters> {
        let maps = prog.director.dataplane().maps_ro();
        let reasons = maps.reason_counters()?.iter().map(|c| c.packets).collect();
        let mut new_flows = Vec::new();
        for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
            let id = prog.service_id(&key(vip));
            new_flows.push(maps.service_stats(id)?.new_flows);
        }
        Ok(Counters { reasons, new_flows })
    }

    /// Asserts that between `self` and `after` exactly `packets` packets were counted, all
    /// under `code`, and `new_flows` new flows were recorded.
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
        let recorded: u64 = after.new_flows.iter().zip(&self.new_flows).map(|(b, a)| b - a).sum();
        ensure!(
            recorded == new_flows,
            "{case}: {recorded} new flows recorded, expected {new_flows}: a run did not take the measured path"
        );
        Ok(())
    }
}

/// A flow (source port) of `vip`'s service from `client` whose Maglev slot is (or is not)
/// marked changed in the table the control plane wrote, and the master that slot names.
fn find_flow(prog: &ProgramUnderTest, client: IpAddr, vip: IpAddr, changed: bool, from: u16) -> Result<(u16, u32)> {
    let svc = &prog.director.written()[&key(vip)];
    let (s, family) = addr_words(client);
    let (d, _) = addr_words(vip);
    (from..u16::MAX)
        .find_map(|p| {
            let h = hash::flow_hash(family, &s, &d, p.to_be(), PORT.to_be(), 6);
            let entry = svc.table()[hash::table_slot(h, svc.table_size) as usize];
            ((entry & MAGLEV_SLOT_CHANGED != 0) == changed).then_some((p, entry & MAGLEV_BACKEND_MASK))
        })
        .with_context(|| format!("no flow of {vip} hashes to a slot with changed={changed}"))
}

fn mac_of(prog: &ProgramUnderTest, vip: IpAddr, backend_id: u32) -> Result<[u8; 6]> {
    let desired = &prog.director.desired()[&key(vip)];
    let (addr, _) = desired
        .backends
        .iter()
        .find(|(_, b)| b.id == backend_id)
        .with_context(|| format!("no backend with id {backend_id}"))?;
    Ok(prog.master_mac(&key(vip), *addr))
}

/// The reference programs, loaded once.
struct References {
    ebpf: Ebpf,
}

impl References {
    const NAMES: [&'static str; 5] =
        ["bench_floor", "bench_service_hash", "bench_hashes", "bench_clock", "bench_clock_coarse"];

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
        let mut samples = vec![Vec::with_capacity(runs); programs.len()];
        for _ in 0..runs {
            for (i, (_, p)) in programs.iter().enumerate() {
                samples[i].push(run(p, frame, repeat)?.0);
            }
        }
        Ok(Interleaved { names: programs.iter().map(|(n, _)| *n).collect(), samples, repeat })
    }

    fn index(&self, name: &str) -> usize {
        self.names.iter().position(|n| *n == name).expect("measured program")
    }

    fn ns(&self, name: &str) -> f64 {
        let r = self.repeat;
        median(&self.samples[self.index(name)].iter().map(|s| s.ns(r)).collect::<Vec<_>>())
    }

    /// Median over rounds of `a`'s time divided by `b`'s in the same round.
    fn ratio(&self, a: &str, b: &str) -> f64 {
        let r = self.repeat;
        let (a, b) = (&self.samples[self.index(a)], &self.samples[self.index(b)]);
        median(&a.iter().zip(b).map(|(x, y)| x.ns(r) / y.ns(r)).collect::<Vec<_>>())
    }

    fn kernel_ns(&self, name: &str) -> f64 {
        median(&self.samples[self.index(name)].iter().map(|s| s.kernel_ns).collect::<Vec<_>>())
    }

    fn retvals(&self, name: &str) -> Vec<u32> {
        self.samples[self.index(name)].iter().map(|s| s.retval).collect()
    }
}

struct Row {
    case: &'static str,
    ns: f64,
    floor: f64,
    ratio: f64,
    goal: Option<f64>,
    json: serde_json::Value,
}

pub fn measure(settings: &Settings, dump_xlated: Option<&Path>) -> Result<(Section, Section)> {
    let refs = References::load()?;
    let floor = refs.get("bench_floor")?;
    let mut prog = ProgramUnderTest::new(&config(3))?;
    let (repeat, runs) = (settings.repeat, settings.runs);
    let total = u64::from(repeat) * runs as u64;
    let mut rows: Vec<Row> = Vec::new();
    let mut notes = Vec::new();
    let v4: IpAddr = VIP4.into();
    let v6: IpAddr = VIP6.into();

    let sizes = program_sizes(&prog, &refs, dump_xlated)?;

    // Established flow: an ACK on a slot the control plane's table shows unmarked, of a flow
    // the program never saw. Had any run consulted the connection table, it would have
    // missed there and recorded the flow, so "0 new flows" proves every run took the fast
    // path; the output frame proves it went to the slot's master.
    let established = |prog: &mut ProgramUnderTest, client: IpAddr, vip: IpAddr, case: &'static str, variants: bool| -> Result<Interleaved> {
        let (sport, master) = find_flow(prog, client, vip, false, 40_000)?;
        let frame = Frame::tcp(client, sport, vip, PORT, TCP_ACK).with_payload(&[0; 64]).bytes();
        let before = Counters::read(prog)?;
        let mut programs = vec![("floor", floor), ("mim-lb", prog.director.dataplane().program())];
        if variants {
            programs.push(("hashes", refs.get("bench_hashes")?));
        }
        let m = Interleaved::measure(&programs, &frame, repeat, runs)?;
        before.prove(&Counters::read(prog)?, case, reason::FORWARDED, total, 0)?;
        let (_, out) = run(prog.director.dataplane().program(), &frame, 1)?;
        ensure!(out == forwarded(&frame, mac_of(prog, vip, master)?), "{case}: the frame did not go to the slot's master");
        Ok(m)
    };

    let est4 = established(&mut prog, CLIENT4.into(), v4, "established IPv4", true)?;
    let est6 = established(&mut prog, CLIENT6.into(), v6, "established IPv6", false)?;

    // Not for a service: another address of the same network, passed untouched.
    let other = Frame::tcp(CLIENT4, 40000, Ipv4Addr::new(10, 0, 0, 2), 22, TCP_ACK).with_payload(&[0; 64]).bytes();
    let before = Counters::read(&prog)?;
    let pass = Interleaved::measure(
        &[("floor", floor), ("mim-lb", prog.director.dataplane().program()), ("service_hash", refs.get("bench_service_hash")?)],
        &other,
        repeat,
        runs,
    )?;
    before.prove(&Counters::read(&prog)?, "not a service", reason::NOT_A_SERVICE, total, 0)?;
    ensure!(pass.retvals("mim-lb").iter().all(|v| *v == reason::XDP_PASS), "not a service: not passed");

    // A SYN of a flow already recorded, repeated: it consults the connection table (SYNs
    // always do) and finds its flow every time. 0 new flows proves every run found it.
    let (syn_port, _) = find_flow(&prog, CLIENT4.into(), v4, false, 30_000)?;
    let syn = Frame::tcp(CLIENT4, syn_port, VIP4, PORT, TCP_SYN).bytes();
    prog.run(&syn)?;
    let before = Counters::read(&prog)?;
    let syn_hit = Interleaved::measure(&[("floor", floor), ("mim-lb", prog.director.dataplane().program())], &syn, repeat, runs)?;
    before.prove(&Counters::read(&prog)?, "SYN of a recorded flow", reason::FORWARDED, total, 0)?;

    // New flows: each SYN has its own 5-tuple and is run once (a repeated SYN finds its own
    // flow from the second run on). Each SYN is measured on mim-lb and on the floor in turn;
    // then the same SYNs again (now recorded: the lookup finds them), and their ACKs (on clean
    // slots: no lookup), all one run each. The single-run figures include the kernel timer's
    // fixed cost and cold caches, on both sides.
    let n = settings.new_flows;
    let flow = |i: u32, flags: u8| {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i / 50_000);
        Frame::tcp(client, 10_000 + (i % 50_000) as u16, VIP4, PORT, flags).bytes()
    };
    let syns: Vec<Vec<u8>> = (0..n).map(|i| flow(i, TCP_SYN)).collect();
    let program = prog.director.dataplane().program();
    let single = |p: &Xdp, f: &[u8]| -> Result<f64> { Ok(run(p, f, 1)?.0.kernel_ns) };
    let before = Counters::read(&prog)?;
    let (mut new_ns, mut new_floor) = (Vec::new(), Vec::new());
    for f in &syns {
        new_ns.push(single(program, f)?);
        new_floor.push(single(floor, f)?);
    }
    before.prove(&Counters::read(&prog)?, "new flows", reason::FORWARDED, u64::from(n), u64::from(n))?;
    let before = Counters::read(&prog)?;
    let mut again_ns = Vec::new();
    for f in &syns {
        again_ns.push(single(program, f)?);
    }
    before.prove(&Counters::read(&prog)?, "recorded SYNs, once each", reason::FORWARDED, u64::from(n), 0)?;
    let cold_acks: Vec<Vec<u8>> = (0..n)
        .map(|i| flow(i, TCP_ACK))
        .filter(|f| {
            // Only ACKs on clean slots: those take the fast path.
            let (s, d) = (&f[26..30], &f[30..34]);
            let src = [u32::from_ne_bytes(s.try_into().unwrap()), 0, 0, 0];
            let dst = [u32::from_ne_bytes(d.try_into().unwrap()), 0, 0, 0];
            let sport = u16::from_ne_bytes([f[34], f[35]]);
            let svc = &prog.director.written()[&key(v4)];
            let h = hash::flow_hash(mim_lb_common::FAMILY_V4, &src, &dst, sport, PORT.to_be(), 6);
            svc.table()[hash::table_slot(h, svc.table_size) as usize] & MAGLEV_SLOT_CHANGED == 0
        })
        .collect();
    let before = Counters::read(&prog)?;
    let mut ack_ns = Vec::new();
    for f in &cold_acks {
        ack_ns.push(single(program, f)?);
    }
    before.prove(&Counters::read(&prog)?, "ACKs once each", reason::FORWARDED, cold_acks.len() as u64, 0)?;
    // What recording a flow adds (lookup miss, clock read, LRU insert, counters), per flow:
    // the same SYN's first run minus its second.
    let record_cost = median(&new_ns.iter().zip(&again_ns).map(|(a, b)| a - b).collect::<Vec<_>>());
    let cold_floor = median(&new_floor);
    let cold_new = median(&new_ns);

    // Established flow on a slot whose master changed: it must consult the connection table.
    // Flows are recorded on their masters, then a fourth master is added, which takes over
    // about a quarter of the slots. A recorded flow on a slot that changed hands still goes
    // to its old master: a frame that reaches the old master (not the slot's new one) proves
    // the lookup happened, and 0 new flows that it found the flow every time.
    let ports = 20_000..20_200u16;
    for p in ports.clone() {
        prog.run(&Frame::tcp(CLIENT4, p, VIP4, PORT, TCP_SYN).bytes())?;
    }
    let before_change: Vec<u32> = prog.director.written()[&key(v4)].table().to_vec();
    prog.apply(&config(4))?;
    let svc = &prog.director.written()[&key(v4)];
    let (s, _) = addr_words(CLIENT4.into());
    let (d, _) = addr_words(v4);
    let (old_port, old_master) = ports
        .clone()
        .find_map(|p| {
            let slot = hash::table_slot(hash::flow_hash(mim_lb_common::FAMILY_V4, &s, &d, p.to_be(), PORT.to_be(), 6), svc.table_size) as usize;
            let (old, new) = (before_change[slot] & MAGLEV_BACKEND_MASK, svc.table()[slot]);
            (new & MAGLEV_SLOT_CHANGED != 0 && new & MAGLEV_BACKEND_MASK != old).then_some((p, old))
        })
        .context("changed slot: none of the recorded flows is on a slot that changed hands")?;
    let changed = Frame::tcp(CLIENT4, old_port, VIP4, PORT, TCP_ACK).with_payload(&[0; 64]).bytes();
    let before = Counters::read(&prog)?;
    let lookup = Interleaved::measure(
        &[
            ("floor", floor),
            ("mim-lb", prog.director.dataplane().program()),
            ("clock", refs.get("bench_clock")?),
            ("clock_coarse", refs.get("bench_clock_coarse")?),
        ],
        &changed,
        repeat,
        runs,
    )?;
    before.prove(&Counters::read(&prog)?, "changed slot", reason::FORWARDED, total, 0)?;
    let (_, out) = run(prog.director.dataplane().program(), &changed, 1)?;
    ensure!(
        out == forwarded(&changed, mac_of(&prog, v4, old_master)?),
        "changed slot: the frame did not go to the recorded (old) master"
    );

    // New flow, warm: a flow recorded on a master that (by a hand-made entry in the backend
    // map) is in use but keeps no flows is re-steered and recorded again by every run: a
    // lookup that finds the flow, then an LRU insert that replaces it, the clock read and the
    // new-flow counters. That is at least the work of a real new flow (whose lookup misses
    // and whose insert replaces nothing), and it repeats: "new flows == runs" proves every
    // run recorded the flow.
    let (re_port, re_master) = find_flow(&prog, CLIENT4.into(), v4, false, 50_000)?;
    let re_syn = Frame::tcp(CLIENT4, re_port, VIP4, PORT, TCP_SYN).bytes();
    prog.run(&re_syn)?;
    let original = prog.director.dataplane().maps_ro().backend(re_master)?;
    prog.director
        .dataplane_mut()
        .maps()
        .set_backend(re_master, &BackendEntry { flags: BACKEND_F_IN_USE, ..original })?;
    let before = Counters::read(&prog)?;
    let rerecord = Interleaved::measure(&[("floor", floor), ("mim-lb", prog.director.dataplane().program())], &re_syn, repeat, runs);
    let after = Counters::read(&prog);
    prog.director.dataplane_mut().maps().set_backend(re_master, &original)?;
    let rerecord = rerecord?;
    before.prove(&after?, "re-recorded flow", reason::FORWARDED, total, total)?;

    let row = |case, m: &Interleaved, goal| Row {
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
    };
    rows.push(row("established flow, IPv4 (TCP ACK, clean slot)", &est4, Some(GOAL_ESTABLISHED)));
    rows.push(row("established flow, IPv6 (TCP ACK, clean slot)", &est6, None));
    rows.push(row("not for a service (passed)", &pass, Some(GOAL_NOT_A_SERVICE)));
    rows.push(row("established flow on a changed slot (table lookup)", &lookup, None));
    rows.push(row("SYN of a recorded flow (table lookup)", &syn_hit, None));
    let warm_floor = est4.ns("floor");
    rows.push(row("new flow, warm (lookup + flow recorded every run)", &rerecord, Some(GOAL_NEW_FLOW)));
    rows.push(Row {
        case: "new flow (TCP SYN), 1 run each, cold",
        ns: cold_new,
        floor: cold_floor,
        ratio: cold_new / cold_floor,
        goal: Some(GOAL_NEW_FLOW),
        json: json!({"ns": cold_new, "floor_ns": cold_floor, "ratio": cold_new / cold_floor, "goal": GOAL_NEW_FLOW, "flows": n}),
    });
    let again = median(&again_ns);
    rows.push(Row {
        case: "same SYNs again (recorded), 1 run each, cold",
        ns: again,
        floor: cold_floor,
        ratio: again / cold_floor,
        goal: None,
        json: json!({"ns": again, "floor_ns": cold_floor, "ratio": again / cold_floor, "flows": n}),
    });
    let acks = median(&ack_ns);
    rows.push(Row {
        case: "their ACKs (clean slot), 1 run each, cold",
        ns: acks,
        floor: cold_floor,
        ratio: acks / cold_floor,
        goal: None,
        json: json!({"ns": acks, "floor_ns": cold_floor, "ratio": acks / cold_floor, "flows": cold_acks.len()}),
    });

    let mut section = Section::new("Per-packet cost (BPF_PROG_TEST_RUN)", &["case", "ns/pkt", "floor ns", "ratio", "goal"]);
    section.method = vec![
        format!(
            "Warm rows: one BPF_PROG_TEST_RUN of {repeat} runs per measurement, {runs} rounds; each round measures the floor and mim-lb back to back; \
             ns/pkt and floor ns are medians over rounds, ratio is the median of the per-round ratios."
        ),
        "ns from this thread's CPU time over the call / repeat (sub-ns resolution; the kernel's own figure is whole ns, in the JSON).".into(),
        format!(
            "Cold rows: {n} distinct flows, one run each, median; both sides include the kernel timer's fixed cost (clock reads) and caches cooled by the syscall."
        ),
        "Floor: swap the two MACs, XDP_TX (the least an XDP forwarder does). Every row's path is proven by mim-lb's counters and output frame.".into(),
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
    let hashes = est4.ns("hashes") - est4.ns("floor");
    let over_floor = est4.ns("mim-lb") - est4.ns("floor");
    notes.push(format!(
        "Where a packet for no service spends its {:.1} ns above the floor: the floor plus only the service-slot hash costs {:.1} ns, i.e. {:.1} ns is that hash; \
         the rest is parsing, the service-index lookup and the reason counter.",
        pass.ns("mim-lb") - pass.ns("floor"),
        pass.ns("service_hash"),
        pass.ns("service_hash") - pass.ns("floor"),
    ));
    notes.push(format!(
        "Where an established IPv4 packet's {over_floor:.1} ns above the floor go: the floor plus only mim-lb's two hashes \
         (service slot and flow hash over the IPv4 words, 2 + 4 blocks; same code) costs {:.1} ns, i.e. {hashes:.1} ns ({:.0}%) is hashing.",
        est4.ns("hashes"),
        100.0 * hashes / over_floor
    ));
    notes.push(format!(
        "New flows, warm: a SYN that finds its flow costs {:.1} ns; recording the flow on every run as well costs {:.1} ns (a hand-made state: \
         the flow's master keeps no flows, so each run re-records it; at least the work of a real new flow). Cold, recording a flow adds \
         {record_cost:.0} ns to a SYN (median per flow of its first run minus its second).",
        syn_hit.ns("mim-lb"),
        rerecord.ns("mim-lb")
    ));
    notes.push(format!(
        "A packet on a changed slot reads the clock on every packet, a flow being recorded once more; mim-lb reads the tick-resolution clock \
         (bpf_ktime_get_coarse_ns): the floor plus one such read costs {2:.1} ns ({3:.1} ns over the floor), the floor plus one bpf_ktime_get_ns {0:.1} ns ({1:.1} ns over).",
        lookup.ns("clock"),
        lookup.ns("clock") - lookup.ns("floor"),
        lookup.ns("clock_coarse"),
        lookup.ns("clock_coarse") - lookup.ns("floor"),
    ));
    notes.push(format!(
        "Cold penalty: an established ACK costs {acks:.0} ns when run once vs {:.1} ns warm; the cold floor is {cold_floor:.0} ns vs {warm_floor:.1} ns warm.",
        est4.ns("mim-lb")
    ));
    let json_rows: serde_json::Map<String, serde_json::Value> =
        rows.iter().map(|r| (r.case.to_string(), r.json.clone())).collect();
    section.json = json!({
        "rows": json_rows,
        "reference_programs_ns": {
            "floor_plus_service_hash": pass.ns("service_hash"),
            "floor_plus_ktime_get_ns": lookup.ns("clock"),
            "floor_plus_ktime_get_coarse_ns": lookup.ns("clock_coarse"),
            "floor": est4.ns("floor"),
            "floor_plus_mim_lb_hashes": est4.ns("hashes"),
        },
    });
    section.notes = notes;
    Ok((section, sizes))
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
