//! Many directors behind an ECMP router (issue 9), in the router lab (client, router running
//! BIRD with the shipped example, three directors each with mim-lb, `[announce]`, a sync
//! group and BIRD, three masters):
//!
//! - Convergence after a director loss: a director is killed (processes and link) under a
//!   stream of new connections; the time until the router's route no longer has it, and the
//!   new connections that failed meanwhile. Baseline: the detection time the routing setup
//!   configures (BFD 3 x 100 ms; BGP hold time 3 s with BFD off), a ratio to it.
//! - New connections per second across the directors: a closed-loop load of short
//!   connections with the router's route holding 1, 2 or 3 directors (the others withdrawn),
//!   interleaved rounds on one lab. Baseline: one director, in the same rounds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mim_lb_tests::{
    Lab, LabSpec,
    bird::{Ecmp, director_mim_lb_config},
    continuity::{Traffic, TrafficSpec},
    gateway::ServiceSpec,
    keepalived::SyncKey,
};
use serde_json::json;

use crate::e2e::load::{self, Ask, Pace, Plan};
use crate::e2e::service::Masters;
use crate::interrupt;
use crate::report::{Section, median};

const PORT: u16 = 7000;
/// The e2e service (one request, one answer) for the connection-rate load.
const LOAD_PORT: u16 = 8000;
const UP_LIMIT: Duration = Duration::from_secs(40);
const SETTLE: Duration = Duration::from_secs(2);

pub struct Settings {
    /// Director kills per detection setup (a new lab each).
    pub rounds: usize,
    /// Rounds of the connection-rate ladder (1, 2, 3 directors each), and each step's length.
    pub rate_rounds: usize,
    pub step: Duration,
    pub workers: usize,
}

/// A detection setup: its name, the edit of the shipped BIRD configs, the detection time it
/// configures.
type Setup = (&'static str, fn(&str) -> String, Duration);

fn setups() -> Vec<Setup> {
    vec![
        ("BFD 3 x 100 ms (the shipped examples)", |c: &str| c.to_owned(), Duration::from_millis(300)),
        ("BFD off, BGP hold time 3 s", |c: &str| c.replace("bfd on;", "bfd off;"), Duration::from_secs(3)),
    ]
}

/// A router lab with `directors` directors, the masters' TCP service running, and each
/// director's config for `services`.
fn router_lab(directors: usize, services: impl Fn(&Lab) -> Vec<ServiceSpec>) -> Result<(Lab, SyncKey, Vec<String>)> {
    let mut lab = Lab::new(LabSpec::router(directors))?;
    lab.start_tcp_servers(PORT)?;
    let key = SyncKey::new(&lab)?;
    let services = services(&lab);
    let configs = (0..directors).map(|i| director_mim_lb_config(&lab, &key, i, &services, "", 1000)).collect();
    Ok((lab, key, configs))
}

struct Loss {
    route_out: Duration,
    failed: usize,
    started_in_window: usize,
    last_failure_start: Option<Duration>,
    held_broken: usize,
}

fn kill_round(edit: fn(&str) -> String, limit: Duration) -> Result<Loss> {
    let (mut lab, key, configs) = router_lab(3, |lab| vec![ServiceSpec::tcp(lab, PORT)])?;
    let vip = lab.vip4();
    let mut ecmp = Ecmp::start_edited(&mut lab, key, &configs, edit)?;
    ecmp.wait_nexthops(&lab, vip, &(0..3).collect(), UP_LIMIT)?;
    let traffic = Traffic::start(&lab, TrafficSpec::new(SocketAddr::new(vip.into(), PORT)))?;
    interrupt::sleep(SETTLE)?;
    let killed = ecmp.kill(&lab, 2)?;
    ecmp.wait_nexthops(&lab, vip, &[0, 1].into(), limit)?;
    let route_out = killed.elapsed();
    interrupt::sleep(SETTLE)?;
    let report = traffic.finish();
    let window: Vec<_> = report.attempts.iter().filter(|a| a.started >= killed && a.started < killed + route_out).collect();
    let failed: Vec<_> = report.attempts.iter().filter(|a| a.started >= killed && a.outcome.is_err()).collect();
    drop(ecmp);
    Ok(Loss {
        route_out,
        failed: failed.len(),
        started_in_window: window.len(),
        last_failure_start: failed.iter().map(|a| a.started - killed).max(),
        held_broken: report.broken_held().len(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn convergence(settings: &Settings) -> Result<Section> {
    let mut s = Section::new(
        "ECMP: convergence after a director loss (issue 9)",
        &[
            "detection",
            "rounds",
            "kill -> out of the router's route (min / median / max)",
            "median / configured detection",
            "new connections failed (median)",
            "of those begun before convergence (median)",
            "last failure begun after the kill (max)",
            "long-lived broken",
        ],
    );
    s.method = vec![
        "Router lab: the client behind a router namespace (BIRD 2 with dist/bird/router.conf, fib_multipath_hash_policy=1), three directors \
         (mim-lb with [announce] and a sync group, BIRD with dist/bird/director.conf), three masters. A new lab per round."
            .into(),
        "Traffic: 3 long-lived connections per master (a line every 50 ms) and a new connection every 20 ms (900 ms limit). After 2 s \
         director 2 is killed: its link cut on the bridge side, then SIGKILL to its mim-lb and BIRD. The router's route is read every \
         20 ms (`ip route show VIP`) until director 2 is gone from it; the traffic runs 2 s more."
            .into(),
        "Baseline: the detection time the routing setup configures; with BFD off the examples' hold time (3 s) decides.".into(),
    ];
    let mut json_rows = Vec::new();
    for (name, edit, detect) in setups() {
        let mut losses = Vec::new();
        for r in 0..settings.rounds {
            eprintln!("mim-lb-bench: ECMP convergence, {name}, round {} of {} ...", r + 1, settings.rounds);
            losses.push(kill_round(edit, detect * 4 + Duration::from_secs(5)).with_context(|| format!("{name}, round {}", r + 1))?);
        }
        let outs: Vec<f64> = losses.iter().map(|l| ms(l.route_out)).collect();
        let med = median(&outs);
        let failed: Vec<f64> = losses.iter().map(|l| l.failed as f64).collect();
        let window: Vec<f64> = losses.iter().map(|l| l.started_in_window as f64).collect();
        let last = losses.iter().filter_map(|l| l.last_failure_start).max();
        let broken: usize = losses.iter().map(|l| l.held_broken).sum();
        s.row(vec![
            name.into(),
            losses.len().to_string(),
            format!(
                "{:.0} / {:.0} / {:.0} ms",
                outs.iter().cloned().fold(f64::INFINITY, f64::min),
                med,
                outs.iter().cloned().fold(0.0, f64::max)
            ),
            format!("{:.2}x", med / ms(detect)),
            format!("{:.0}", median(&failed)),
            format!("{:.0}", median(&window)),
            last.map_or("-".into(), |d| format!("{:.0} ms", ms(d))),
            broken.to_string(),
        ]);
        json_rows.push(json!({
            "detection": name, "configured_ms": ms(detect), "route_out_ms": outs,
            "failed": failed, "begun_before_convergence": window,
            "last_failure_start_ms": last.map(ms), "held_broken": broken,
        }));
    }
    s.notes = vec![
        "A new connection fails when the router hashed it to the dead director before its route converged: about a third of those \
         begun in that window (one of three next hops); the rest, and every long-lived connection, carry on through the others."
            .into(),
    ];
    s.json = json!({ "rows": json_rows });
    Ok(s)
}

/// Leaves exactly `k` directors (the first ones) in the router's route.
fn route_through(ecmp: &Ecmp, lab: &Lab, k: usize) -> Result<()> {
    for i in 0..ecmp.gateways.len() {
        if i < k { ecmp.announce(i)? } else { ecmp.withdraw(i)? };
    }
    let want: BTreeSet<usize> = (0..k).collect();
    ecmp.wait_nexthops(lab, lab.vip4(), &want, Duration::from_secs(15))?;
    Ok(())
}

fn rates(settings: &Settings) -> Result<Section> {
    // The load's own service (one request, one answer) next to the lab's on every master,
    // health-checked on the lab's port.
    let (mut lab, key, configs) = router_lab(3, |lab| {
        vec![
            ServiceSpec::tcp(lab, PORT),
            ServiceSpec { name: "load".into(), port: LOAD_PORT, health: format!("port = {PORT}"), ..ServiceSpec::tcp(lab, PORT) },
        ]
    })?;
    let masters = Masters::start(&lab, LOAD_PORT)?;
    let ecmp = Ecmp::start(&mut lab, key, &configs)?;
    let vip = lab.vip4();
    ecmp.wait_nexthops(&lab, vip, &(0..3).collect(), UP_LIMIT)?;
    let plan = Plan {
        target: SocketAddr::new(vip.into(), LOAD_PORT),
        ask: Ask::Short,
        pace: Pace::Workers(settings.workers),
        duration: settings.step,
        max_in_flight: settings.workers,
        timeout: Duration::from_secs(2),
    };
    // (k, round) -> (rate, failures, p50 ms, p99 ms, per-director share)
    let mut results: Vec<(usize, f64, u64, f64, f64, Vec<u64>)> = Vec::new();
    for round in 0..settings.rate_rounds {
        // Every other round runs the other way round, so that a drift of the machine's load
        // within a round does not always fall on the same step.
        let order = if round % 2 == 0 { [1, 2, 3] } else { [3, 2, 1] };
        for k in order {
            eprintln!("mim-lb-bench: ECMP connection rate, round {} of {}, {k} directors ...", round + 1, settings.rate_rounds);
            route_through(&ecmp, &lab, k)?;
            let before: Vec<u64> = ecmp.gateways.iter().map(|g| g.status().map(|s| s.services[1].new_flows)).collect::<Result<_>>()?;
            let out = load::run(lab.client_ns(), &plan)?;
            interrupt::check()?;
            let after: Vec<u64> = ecmp.gateways.iter().map(|g| g.status().map(|s| s.services[1].new_flows)).collect::<Result<_>>()?;
            let mut lat: Vec<f64> = out.latencies_us.iter().map(|&u| f64::from(u) / 1e3).collect();
            lat.sort_by(f64::total_cmp);
            let pct = |p: f64| if lat.is_empty() { 0.0 } else { lat[((lat.len() - 1) as f64 * p) as usize] };
            results.push((
                k,
                out.ok as f64 / out.elapsed.as_secs_f64(),
                out.failures(),
                pct(0.5),
                pct(0.99),
                after.iter().zip(&before).map(|(a, b)| a - b).collect(),
            ));
        }
    }
    drop(masters);
    drop(ecmp);
    let mut s = Section::new(
        "ECMP: new connections per second across the directors (issue 9)",
        &["directors in the route", "rounds", "connections/s (median)", "/ one director", "failed", "p50 ms", "p99 ms", "new flows per director (last round)"],
    );
    s.method = vec![format!(
        "The router lab above, one lab: a closed loop of {} workers, each opening a connection, asking one short line and closing, for \
         {:.0} s per step, with the router's route holding 1, 2 or 3 directors (`mim-lb withdraw` on the others, `announce` back), in \
         {} interleaved rounds (1, 2, 3 directors, then 3, 2, 1, ...). Baseline: one director, in the same rounds.",
        settings.workers,
        settings.step.as_secs_f64(),
        settings.rate_rounds
    )];
    let base = median(&results.iter().filter(|r| r.0 == 1).map(|r| r.1).collect::<Vec<_>>());
    let mut json_rows = Vec::new();
    for k in [1, 2, 3] {
        let rs: Vec<_> = results.iter().filter(|r| r.0 == k).collect();
        let rate = median(&rs.iter().map(|r| r.1).collect::<Vec<_>>());
        s.row(vec![
            k.to_string(),
            rs.len().to_string(),
            format!("{rate:.0}"),
            format!("{:.2}x", rate / base),
            rs.iter().map(|r| r.2).sum::<u64>().to_string(),
            format!("{:.2}", median(&rs.iter().map(|r| r.3).collect::<Vec<_>>())),
            format!("{:.2}", median(&rs.iter().map(|r| r.4).collect::<Vec<_>>())),
            format!("{:?}", rs.last().map(|r| r.5.clone()).unwrap_or_default()),
        ]);
        json_rows.push(json!({ "directors": k, "rates": rs.iter().map(|r| r.1).collect::<Vec<_>>(), "failed": rs.iter().map(|r| r.2).sum::<u64>() }));
    }
    s.notes = vec![
        "Every part of this lab (client, router, directors, masters) shares this machine's CPUs, so more directors cannot add capacity \
         here: the ratio shows what spreading over the directors costs, and the last column that each carries its share. On separate \
         machines each director adds its NIC and CPU."
            .into(),
    ];
    s.json = json!({ "rows": json_rows, "workers": settings.workers, "step_s": settings.step.as_secs_f64() });
    Ok(s)
}

pub fn measure(settings: &Settings) -> Result<Vec<Section>> {
    if settings.rounds == 0 || settings.rate_rounds == 0 {
        bail!("the ECMP benchmark needs at least one round of each part");
    }
    Ok(vec![convergence(settings)?, rates(settings)?])
}
