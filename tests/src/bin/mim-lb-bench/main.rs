//! `cargo xtask bench`: per-packet cost of the real XDP program with BPF_PROG_TEST_RUN, next to
//! a floor program (swap MACs, XDP_TX) loaded in the same run. Reports ns/packet and the ratio
//! to the floor. Every measurement proves, with the program's own counters, that each run took
//! the path it claims to measure.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use clap::Parser;
use mim_lb::{config::Config, dataplane::program::BENCH_FLOOR_OBJECT, config::ServiceKey};
use mim_lb_common::{MAGLEV_SLOT_CHANGED, reason};
use mim_lb_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    testrun::ProgramUnderTest,
};

#[derive(Parser)]
#[command(about = "Per-packet cost of the mim-lb XDP program against a floor program")]
struct Args {
    /// Program runs per measurement (BPF_PROG_TEST_RUN repeat).
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
    /// Measurements per case; the median is reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Distinct new flows measured one run each.
    #[arg(long, default_value_t = 20_000)]
    new_flows: u32,
    /// Backends in the table-rebuild measurement.
    #[arg(long, default_value_t = 1000)]
    rebuild_backends: u32,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn config(backends: u32) -> String {
    // No health check: every backend is up as soon as it is configured, so one apply is one
    // table build and write.
    let mut c = String::from(
        "interface = \"lo\"\n[[service]]\nname = \"bench\"\nvip = \"10.0.0.100\"\nport = 7000\n[service.health]\ncheck = \"none\"\n",
    );
    for i in 0..backends {
        c += &format!(
            "[[service.backend]]\naddress = \"10.1.{}.{}\"\nmac = \"02:00:00:01:{:02x}:{:02x}\"\n",
            i / 250,
            i % 250 + 1,
            i / 256,
            i % 256
        );
    }
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ns per run of `program` on `frame`, `repeat` times, median of `runs`.
fn per_packet(program: &Xdp, frame: &[u8], repeat: u32, runs: usize) -> Result<f64> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut out = vec![0u8; frame.len() + 64];
        let r = program
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        samples.push(r.duration.as_nanos() as f64);
    }
    Ok(median(samples))
}

/// ns of one run on each of `frames` (repeat 1), median over frames.
fn per_packet_each(program: &Xdp, frames: &[Vec<u8>]) -> Result<f64> {
    let mut samples = Vec::with_capacity(frames.len());
    for frame in frames {
        let mut out = vec![0u8; frame.len() + 64];
        let r = program
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        samples.push(r.duration.as_nanos() as f64);
    }
    Ok(median(samples))
}

struct Row {
    case: &'static str,
    ns: f64,
    floor: f64,
    goal: Option<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut floor_obj = Ebpf::load(BENCH_FLOOR_OBJECT).context("loading the floor program")?;
    let floor: &mut Xdp = floor_obj
        .program_mut("bench_floor")
        .context("floor program missing")?
        .try_into()?;
    floor.load().context("loading the floor program")?;
    let floor: &Xdp = floor;

    let mut prog = ProgramUnderTest::new(&config(3))?;
    let key = ServiceKey { vip: VIP.into(), port: 7000, protocol: mim_lb::config::Protocol::Tcp };
    let mut rows = Vec::new();

    // Established flow: an ACK on a clean slot (the control plane's table says so).
    let established = Frame::tcp(CLIENT, 40000, VIP, 7000, TCP_ACK).with_payload(&[0; 64]).bytes();
    prog.run(&Frame::tcp(CLIENT, 40000, VIP, 7000, TCP_SYN).bytes())?;
    let fwd_before = prog.reason_packets(reason::FORWARDED)?;
    let flows_before = total_new_flows(&mut prog, &key)?;
    let ns = per_packet(prog.director.dataplane().program(), &established, args.repeat, args.runs)?;
    let fl = per_packet(floor, &established, args.repeat, args.runs)?;
    let runs = args.repeat as u64 * args.runs as u64;
    ensure!(prog.reason_packets(reason::FORWARDED)? - fwd_before == runs, "established: not every run was forwarded");
    ensure!(total_new_flows(&mut prog, &key)? == flows_before, "established: a run recorded a flow");
    rows.push(Row { case: "established flow (TCP ACK, clean slot)", ns, floor: fl, goal: Some(1.5) });

    // Not for a service: passed untouched.
    let other = Frame::tcp(CLIENT, 40000, Ipv4Addr::new(10, 0, 0, 2), 22, TCP_ACK).with_payload(&[0; 64]).bytes();
    let before = prog.reason_packets(reason::NOT_A_SERVICE)?;
    let ns = per_packet(prog.director.dataplane().program(), &other, args.repeat, args.runs)?;
    let fl = per_packet(floor, &other, args.repeat, args.runs)?;
    ensure!(prog.reason_packets(reason::NOT_A_SERVICE)? - before == runs, "non-service: not every run was passed as not_a_service");
    rows.push(Row { case: "not for a service (passed)", ns, floor: fl, goal: Some(1.2) });

    // New flows: each SYN has its own 5-tuple, one run each (a repeated SYN would find its own
    // flow from the second run on). The floor is measured the same way.
    let frames: Vec<Vec<u8>> = (0..args.new_flows)
        .map(|i| {
            let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i / 50_000);
            Frame::tcp(client, 10_000 + (i % 50_000) as u16, VIP, 7000, TCP_SYN).bytes()
        })
        .collect();
    let flows_before = total_new_flows(&mut prog, &key)?;
    let ns = per_packet_each(prog.director.dataplane().program(), &frames)?;
    let fl = per_packet_each(floor, &frames)?;
    ensure!(
        total_new_flows(&mut prog, &key)? - flows_before == args.new_flows as u64,
        "new flows: not every SYN recorded a new flow"
    );
    rows.push(Row { case: "new flow (TCP SYN, recorded), 1 run each", ns, floor: fl, goal: Some(3.0) });

    // Established flow on a slot whose master changed: it must consult the connection table.
    prog.apply(&config(4))?;
    let svc = &prog.director.written()[&key];
    let sport = (20000..60000u16)
        .find(|&p| {
            let (s, _) = mim_lb::dataplane::service_index::addr_words(CLIENT.into());
            let (d, _) = mim_lb::dataplane::service_index::addr_words(VIP.into());
            let h = mim_lb_common::hash::flow_hash(&s, &d, p.to_be(), 7000u16.to_be(), 6);
            svc.table()[(h % svc.table_size) as usize] & MAGLEV_SLOT_CHANGED != 0
        })
        .context("no flow hashes to a changed slot")?;
    prog.run(&Frame::tcp(CLIENT, sport, VIP, 7000, TCP_SYN).bytes())?;
    let changed = Frame::tcp(CLIENT, sport, VIP, 7000, TCP_ACK).with_payload(&[0; 64]).bytes();
    let flows_before = total_new_flows(&mut prog, &key)?;
    let ns = per_packet(prog.director.dataplane().program(), &changed, args.repeat, args.runs)?;
    let fl = per_packet(floor, &changed, args.repeat, args.runs)?;
    ensure!(total_new_flows(&mut prog, &key)? == flows_before, "changed slot: a run recorded a flow");
    rows.push(Row { case: "established flow on a changed slot (table lookup)", ns, floor: fl, goal: None });

    println!("mim-lb per-packet cost, BPF_PROG_TEST_RUN, repeat {} x {} runs (median)", args.repeat, args.runs);
    println!("machine: {}", machine());
    println!("{:<52} {:>9} {:>9} {:>7} {:>6}", "case", "ns/pkt", "floor ns", "ratio", "goal");
    for r in &rows {
        let ratio = r.ns / r.floor;
        let goal = match r.goal {
            Some(g) if ratio <= g => format!("<={g} ok"),
            Some(g) => format!("<={g} MISSED"),
            None => "-".into(),
        };
        println!("{:<52} {:>9.1} {:>9.1} {:>6.2}x {:>6}", r.case, r.ns, r.floor, ratio, goal);
    }

    rebuild(&args)?;
    Ok(())
}

/// Time to build and write one service's Maglev table with many backends.
fn rebuild(args: &Args) -> Result<()> {
    let small = config(3);
    let big = config(args.rebuild_backends);
    let mut prog = ProgramUnderTest::new(&small)?;
    let started = Instant::now();
    let parsed = Config::parse(&big).map_err(|e| anyhow::anyhow!("{e}"))?;
    let report = prog.director.apply_config(&parsed)?;
    let elapsed = started.elapsed();
    if report.maglev_writes == 0 {
        bail!("rebuild wrote nothing");
    }
    println!(
        "table rebuild: 3 -> {} backends, {} Maglev entries written in {:.1} ms",
        args.rebuild_backends,
        report.maglev_writes,
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}

fn total_new_flows(prog: &mut ProgramUnderTest, key: &ServiceKey) -> Result<u64> {
    let id = prog.service_id(key);
    Ok(prog.director.dataplane().maps_ro().service_stats(id)?.new_flows)
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    format!("{cpu}, {} CPUs, kernel {}", std::thread::available_parallelism().map_or(0, |n| n.get()), kernel.trim())
}
