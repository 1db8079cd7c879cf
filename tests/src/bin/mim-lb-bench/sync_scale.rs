//! Sync traffic as the group grows (issue 9): N directors (3, 4, 6 by default), the real
//! daemon on each with `[sync]` naming all the others, once with changes sent to each peer
//! (the baseline, measured in the same run) and once to a multicast group (`[sync] group`).
//! A known load of new UDP flows (each one recorded and shared) goes through director 0;
//! every director's sync frames and bytes are counted from a capture of its `eth0`, and every
//! other director's connection table is read afterwards to check that it holds every record.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mim_lb_tests::{
    Capture, Lab, LabSpec,
    gateway::Mode,
    keepalived::{Directors, director_configs},
};
use serde_json::json;

use crate::directors::{PORT, Ports, SYNC_PORT, SyncKey, UDP_PORT, cpu_ms, send_flows, udp_new_flows, udp_service};
use crate::interrupt;
use crate::report::Section;

const GROUP: &str = "239.255.77.1:7947";
const GROUP_PORT: u16 = 7947;
const PHASE_LIMIT: Duration = Duration::from_secs(30);

pub struct Settings {
    /// Group sizes (directors), each measured both ways.
    pub sizes: Vec<usize>,
    /// New flows per second through director 0, and for how long.
    pub rate: u32,
    pub secs: u64,
}

/// One group size, one way of sending.
struct Run {
    n: usize,
    group: bool,
    recorded: u64,
    /// Sync frames (and bytes, Ethernet header included) each director sent.
    sent: Vec<(u64, u64)>,
    /// Sync frames each director received.
    received: Vec<u64>,
    /// Daemon CPU (utime + stime) of each director over the window.
    cpu_ms: Vec<f64>,
    /// Records of the load each other director holds afterwards.
    held: Vec<usize>,
    window_s: f64,
}

fn sync_section(lab: &Lab, key: &SyncKey, i: usize, group: bool) -> String {
    let peers: Vec<String> =
        (0..lab.director_count()).filter(|&j| j != i).map(|j| format!("\"{}:{SYNC_PORT}\"", lab.director_addr4(j))).collect();
    let mut s = format!(
        "[sync]\nlisten = \"{}:{SYNC_PORT}\"\npeers = [{}]\nkey_file = \"{}\"\n",
        lab.director_addr4(i),
        peers.join(", "),
        key.0.display()
    );
    if group {
        s += &format!("group = \"{GROUP}\"\n");
    }
    s
}

/// UDP flows to the load's service that director `i`'s connection table holds.
fn held_flows(directors: &Directors, i: usize) -> Result<usize> {
    let path = directors.gateway(i).pin_dir().join(mim_lb_common::maps::names::FLOWS);
    let flows = mim_lb::director::sweep::read_pinned_flows(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(flows.iter().filter(|(k, _)| k.proto == mim_lb_common::PROTO_UDP && u16::from_be(k.dport) == UDP_PORT).count())
}

fn run(n: usize, group: bool, settings: &Settings) -> Result<Run> {
    let mut lab = Lab::new(LabSpec { directors: n, ipv6: false, ..LabSpec::default() })?;
    lab.start_tcp_servers(PORT)?;
    let key = SyncKey::new(&lab)?;
    let configs = director_configs(&lab, &[udp_service(&lab)], "", |i| sync_section(&lab, &key, i, group));
    let directors = Directors::start_daemons(&mut lab, Mode::Generic, &configs)?;
    directors.wait_synced(PHASE_LIMIT)?;
    // Director 0 answers ARP for the VIP: the whole load goes through it.
    lab.run_in(lab.director_ns(0), "ip", &["addr", "add", &format!("{}/32", lab.vip4()), "dev", "eth0"])?;
    let captures: Vec<Capture> = (0..n)
        .map(|i| Capture::start_with_limits(lab.director_ns(i), "eth0", 2_000_000, Duration::from_secs(300)))
        .collect::<Result<_>>()?;
    let pids: Vec<u32> = (0..n).map(|i| directors.gateway(i).proc().pid()).collect();
    let cpu_before: Vec<f64> = pids.iter().map(|&p| cpu_ms(p)).collect::<Result<_>>()?;
    let flows_before = udp_new_flows(&directors.gateway(0).status()?);
    let started = Instant::now();
    let count = settings.rate * settings.secs as u32;
    let first_port = Ports::new().take(count)?;
    let (sent_flows, failed, _) = send_flows(&lab, SocketAddrV4::new(lab.vip4(), UDP_PORT), first_port, settings.rate, count)?;
    if failed > 0 {
        bail!("{failed} of {count} flows could not be sent");
    }
    interrupt::sleep(Duration::from_secs(1))?;
    let cpu_after: Vec<f64> = pids.iter().map(|&p| cpu_ms(p)).collect::<Result<_>>()?;
    let window_s = started.elapsed().as_secs_f64();
    let recorded = udp_new_flows(&directors.gateway(0).status()?) - flows_before;
    let mut sent = Vec::new();
    let mut received = Vec::new();
    for capture in captures {
        let frames = capture.stop();
        let out = frames.iter().filter(|f| f.is_udp() && f.outgoing && f.src_port == Some(SYNC_PORT));
        sent.push(out.fold((0, 0), |(c, b), f| (c + 1, b + f.len as u64)));
        received.push(
            frames.iter().filter(|f| f.is_udp() && !f.outgoing && matches!(f.dst_port, Some(SYNC_PORT) | Some(GROUP_PORT))).count() as u64,
        );
    }
    let held = (1..n).map(|i| held_flows(&directors, i)).collect::<Result<Vec<_>>>()?;
    if recorded < u64::from(sent_flows) * 9 / 10 {
        bail!("director 0 recorded {recorded} of {sent_flows} flows");
    }
    drop(directors);
    drop(key);
    Ok(Run {
        n,
        group,
        recorded,
        sent,
        received,
        cpu_ms: cpu_before.iter().zip(&cpu_after).map(|(b, a)| a - b).collect(),
        held,
        window_s,
    })
}

pub fn measure(settings: &Settings) -> Result<Section> {
    let mut runs = Vec::new();
    for &n in &settings.sizes {
        if !(2..=mim_lb_tests::lab::MAX_DIRECTORS).contains(&n) {
            bail!("{n} directors: the lab holds 2 to {}", mim_lb_tests::lab::MAX_DIRECTORS);
        }
        for group in [false, true] {
            eprintln!("mim-lb-bench: sync traffic, {n} directors, changes to {} ...", if group { "the group" } else { "each peer" });
            runs.push(run(n, group, settings).with_context(|| format!("{n} directors, group {group}"))?);
        }
    }
    Ok(section(settings, &runs))
}

fn section(settings: &Settings, runs: &[Run]) -> Section {
    let mut s = Section::new(
        "Sync traffic as the group grows (issue 9)",
        &[
            "directors",
            "changes go",
            "flows recorded",
            "frames / 1k flows: director 0 sends",
            "each other director sends (mean)",
            "all directors send",
            "kB / 1k flows, all directors send",
            "all / each-peer (bytes)",
            "frames each other director receives / 1k flows",
            "daemon CPU ms / 1k flows: director 0, others (mean)",
            "records held by the others (min, max)",
        ],
    );
    s.method = vec![
        format!(
            "N directors in one lab (IPv4), the real daemon on each (generic XDP) with `[sync]` naming every other; director 0 holds the VIP \
             (an address on its eth0) and carries {} new UDP flows/s for {} s, each recorded and shared. Each N runs twice, each on a new lab: \
             changes to each peer (acknowledged; the baseline) and to the group {GROUP}.",
            settings.rate, settings.secs
        ),
        "Frames and bytes: a capture on every director's eth0 over the load and 1 s after it, every UDP frame from the sync port (7946; \
         group datagrams leave from it too), Ethernet header included: state, acknowledgements, NACKs, hellos and beacons. The window ends \
         before the daemons' first periodic refresh (30 s after their start)."
            .into(),
        "Records held: each other director's connection table read from its pins after the window: flows of the load's service."
            .into(),
    ];
    let per_k = |v: f64, flows: u64| if flows == 0 { 0.0 } else { v * 1000.0 / flows as f64 };
    let mut json_runs = Vec::new();
    for r in runs {
        let others = r.n - 1;
        let all_frames: u64 = r.sent.iter().map(|x| x.0).sum();
        let all_bytes: u64 = r.sent.iter().map(|x| x.1).sum();
        let others_frames = r.sent[1..].iter().map(|x| x.0).sum::<u64>() as f64 / others as f64;
        let others_received = r.received[1..].iter().sum::<u64>() as f64 / others as f64;
        let others_cpu = r.cpu_ms[1..].iter().sum::<f64>() / others as f64;
        let baseline = runs.iter().find(|b| b.n == r.n && !b.group);
        let ratio = baseline.map(|b| {
            let bb: u64 = b.sent.iter().map(|x| x.1).sum();
            per_k(all_bytes as f64, r.recorded) / per_k(bb as f64, b.recorded)
        });
        s.row(vec![
            r.n.to_string(),
            if r.group { "group".into() } else { "each peer".into() },
            r.recorded.to_string(),
            format!("{:.1}", per_k(r.sent[0].0 as f64, r.recorded)),
            format!("{:.1}", per_k(others_frames, r.recorded)),
            format!("{:.1}", per_k(all_frames as f64, r.recorded)),
            format!("{:.1}", per_k(all_bytes as f64, r.recorded) / 1000.0),
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            format!("{:.1}", per_k(others_received, r.recorded)),
            format!("{:.1}, {:.1}", per_k(r.cpu_ms[0], r.recorded), per_k(others_cpu, r.recorded)),
            format!("{}, {}", r.held.iter().min().unwrap_or(&0), r.held.iter().max().unwrap_or(&0)),
        ]);
        json_runs.push(json!({
            "directors": r.n, "group": r.group, "recorded": r.recorded, "window_s": r.window_s,
            "sent_frames": r.sent.iter().map(|x| x.0).collect::<Vec<_>>(),
            "sent_bytes": r.sent.iter().map(|x| x.1).collect::<Vec<_>>(),
            "received_frames": r.received, "cpu_ms": r.cpu_ms, "held": r.held,
        }));
    }
    s.notes = vec![
        "With changes to each peer, director 0 sends each batch of records once per peer and every peer acknowledges each: what all \
         directors send grows with N. To the group, director 0 sends each batch once whatever N, and the others send only their \
         beacons (and NACKs for what they missed)."
            .into(),
    ];
    s.json = json!({ "rate": settings.rate, "secs": settings.secs, "runs": json_runs });
    s
}
