//! What counting the connections each master holds (`director::held`) costs the data path.
//! The counts add nothing per packet: they come from the daemon's reads of the connection
//! table on a thread of its own. What such a read could cost a packet is contention for the
//! table (its bucket locks, caches, memory bandwidth) while it runs, so this measures the
//! per-packet cost of a UDP datagram of a recorded flow (a lookup in the table on every
//! packet) alone and while another thread reads a full-size table and counts it in a loop,
//! the same rounds interleaved. The daemon reads at most a tenth of the time
//! (`held::next_count_in`); this is the worst case, reads back to back.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use aya::{
    maps::MapData,
    programs::{TestRun as _, TestRunOptions},
};
use mim_lb::director::{held, read_pinned_flows};
use mim_lb_common::{limits, maps::names, reason};
use mim_lb_tests::{packet::Frame, testrun::{GATEWAY_MAC, ProgramUnderTest}};
use serde_json::json;

use crate::interrupt;
use crate::per_packet::thread_cpu_ns;
use crate::report::{Section, median};

pub struct Settings {
    /// Flows in the (1M-entry) connection table the reader reads.
    pub flows: u32,
    /// Interleaved rounds (quiet, reading).
    pub runs: usize,
    /// Program runs per BPF_PROG_TEST_RUN.
    pub repeat: u32,
}

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PORT: u16 = 7000;

/// One UDP service with three masters, all with the gateway's MAC: a forwarded frame is
/// addressed to the gateway again, so every repeated run takes the same path.
fn config() -> String {
    let mac = GATEWAY_MAC.map(|b| format!("{b:02x}")).join(":");
    let mut c = format!(
        "interface = \"lo\"\n[[service]]\nname = \"count4\"\nvip = \"{VIP4}\"\nport = {PORT}\nprotocol = \"udp\"\n[service.health]\ncheck = \"none\"\n"
    );
    for i in 0..3u8 {
        c += &format!("[[service.backend]]\naddress = \"10.1.0.{}\"\nmac = \"{mac}\"\n", 1 + i);
    }
    c
}

/// ns per packet from this thread's CPU time around one BPF_PROG_TEST_RUN of `repeat` runs.
fn ns_per_packet(prog: &ProgramUnderTest, frame: &[u8], repeat: u32) -> Result<f64> {
    interrupt::check()?;
    let mut out = vec![0u8; frame.len() + 256];
    let before = thread_cpu_ns();
    let r = prog
        .director
        .dataplane()
        .program()
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    let cpu = thread_cpu_ns() - before;
    ensure!(r.return_value == XDP_TX, "the datagram was not forwarded (XDP verdict {})", r.return_value);
    Ok(cpu as f64 / f64::from(repeat))
}

/// The verdict of a forwarded packet.
const XDP_TX: u32 = 3;

pub fn measure(settings: &Settings) -> Result<Section> {
    let capacity = limits::DEFAULT_FLOW_TABLE_SIZE;
    ensure!(settings.flows <= capacity, "--counting-flows {} is more than the table's {capacity} entries", settings.flows);
    let mut prog = ProgramUnderTest::pinned_with_flow_table(&config(), capacity)?;
    let path = prog.director.dataplane().pin_dir().context("the program is pinned")?.join(names::FLOWS);
    crate::batch::fill(&MapData::from_pin(&path)?, settings.flows)?;
    let frame = Frame::udp(IpAddr::from(Ipv4Addr::new(10, 0, 0, 1)), 40_000, IpAddr::from(VIP4), PORT).with_payload(&[0; 64]).bytes();
    // The first datagram records the flow; every later one finds its record.
    prog.run(&frame)?;
    let forwarded_before = prog.reason_packets(reason::FORWARDED)?;

    let (mut quiet, mut reading, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let reads = Arc::new(AtomicU64::new(0));
    for _ in 0..settings.runs {
        let q = ns_per_packet(&prog, &frame, settings.repeat)?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (stop, reads, path) = (Arc::clone(&stop), Arc::clone(&reads), path.clone());
            std::thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let flows = read_pinned_flows(&path)?;
                    let counts = held::count_records(&flows, mim_lb::director::monotonic_ns(), Duration::from_secs(900), Duration::from_secs(300));
                    std::hint::black_box(counts);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        // Measured once the reader is under way.
        let started = reads.load(Ordering::Relaxed);
        let mut waited = 0;
        while reads.load(Ordering::Relaxed) == started && waited < 200 {
            std::thread::sleep(Duration::from_millis(5));
            waited += 1;
        }
        let r = ns_per_packet(&prog, &frame, settings.repeat);
        stop.store(true, Ordering::Relaxed);
        reader.join().map_err(|_| anyhow::anyhow!("the reader panicked"))??;
        let r = r?;
        quiet.push(q);
        reading.push(r);
        ratios.push(r / q);
    }
    let forwarded = prog.reason_packets(reason::FORWARDED)? - forwarded_before;
    let expected = 2 * settings.runs as u64 * u64::from(settings.repeat);
    ensure!(forwarded == expected, "forwarded {forwarded} datagrams, expected {expected}: not every run took the recorded path");

    let mut section = Section::new(
        "Connection counts: the data path while the connection table is read and counted",
        &["case", "ns/packet, quiet", "ns/packet, table read meanwhile", "ratio (median of rounds)"],
    );
    section.method = vec![format!(
        "A UDP datagram of a recorded flow (one lookup in the connection table per packet, {} runs per BPF_PROG_TEST_RUN, this thread's CPU time), \
         {} rounds, each quiet then while another thread reads the {capacity}-entry table holding {} flows with read_pinned_flows and counts it \
         (held::count_records) back to back, as the daemon's count reads do at most a tenth of the time. {} reads in all.",
        settings.repeat,
        settings.runs,
        settings.flows,
        reads.load(Ordering::Relaxed)
    )];
    let (q, r, ratio) = (median(&quiet), median(&reading), median(&ratios));
    section.row(vec!["UDP, recorded flow".into(), format!("{q:.1}"), format!("{r:.1}"), format!("{ratio:.2}x")]);
    section.notes = vec![
        "Counting adds no instruction to the data path; what a read can cost a packet is sharing the table and the caches with it. \
         On a machine of 2 CPUs shared with other work, ratios within about 10% of 1 are noise."
            .into(),
    ];
    section.json = json!({ "quiet_ns": quiet, "reading_ns": reading, "ratios": ratios, "median_ratio": ratio, "reads": reads.load(Ordering::Relaxed) });
    Ok(section)
}
