//! Many directors behind an ECMP router, announced through FRR (OPERATIONS.md, "Many directors
//! behind ECMP"): the FRR examples run live, as `ecmp_announce.rs` runs the BIRD ones. Three
//! directors each run the real daemon with `[announce]` and `[sync]`, and FRR (zebra, bgpd,
//! bfdd) with the shipped `dist/frr/director.conf`; the router runs FRR with
//! `dist/frr/router.conf` and forwards with `fib_multipath_hash_policy = 1`. Promises kept:
//! - zebra imports mim-lb's `[announce]` table (`ip import-table`), bgpd announces it, and
//!   once ready every director's address is a next hop of the router's route to the VIP;
//!   client connections through the router reach the masters, spread over the directors;
//! - `mim-lb withdraw` takes one director out of the route and `mim-lb announce` puts it back;
//! - a director that dies (link cut, processes killed) leaves the route by BFD;
//! - (a limit) any host route in the table is announced, whatever its protocol number.
//!
//! And the halves interoperate: an FRR router with BIRD directors.
//!
//! The times the router took to follow are printed (`convergence:` lines).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec,
    bird::{Bird, Ecmp, director_mim_lb_config},
    frr::Frr,
    gateway::ServiceSpec,
    keepalived::SyncKey,
};

const PORT: u16 = 7000;
/// How long the whole group may take to come up and be announced: the daemons' first checks
/// and sync pull, BGP sessions opened (connect timer 2 s) and BFD up, on a loaded machine.
const UP_LIMIT: Duration = Duration::from_secs(40);
/// How long the router may take to follow a withdrawal, an announcement or a death: room for a
/// loaded machine; the measured times are printed.
const FOLLOW_LIMIT: Duration = Duration::from_secs(10);

fn all(n: usize) -> BTreeSet<usize> {
    (0..n).collect()
}

fn without(n: usize, i: usize) -> BTreeSet<usize> {
    (0..n).filter(|j| *j != i).collect()
}

fn configs(lab: &Lab, key: &SyncKey) -> Vec<String> {
    let service = ServiceSpec::tcp(lab, PORT);
    (0..lab.director_count())
        .map(|i| director_mim_lb_config(lab, key, i, std::slice::from_ref(&service), "tcp_idle_timeout_s = 2", 0))
        .collect()
}

/// Connections from the client through the router reach the masters, spread over the
/// directors.
fn spread<R, D>(lab: &Lab, ecmp: &Ecmp<R, D>) -> Vec<u64> {
    let vip = lab.vip4();
    let before: Vec<u64> = ecmp.gateways.iter().map(|g| g.status().unwrap().services[0].new_flows).collect();
    let names = lab.ask(SocketAddr::new(vip.into(), PORT), 60, Duration::from_secs(3));
    assert!(names.iter().all(|n| lab.master_index(n).is_some()), "{names:?}");
    let carried: Vec<u64> =
        ecmp.gateways.iter().zip(&before).map(|(g, b)| g.status().unwrap().services[0].new_flows - b).collect();
    assert_eq!(carried.iter().sum::<u64>(), 60, "every connection went through one director: {carried:?}");
    assert!(carried.iter().filter(|c| **c > 0).count() >= 2, "the router sent every connection to one director: {carried:?}");
    carried
}

/// Waits until `frr` has `n` BFD sessions, all up; returns how long that took.
fn wait_bfd_up(frr: &Frr, n: usize) -> Duration {
    let started = Instant::now();
    loop {
        let brief = frr.vtysh("show bfd peers brief").unwrap();
        let up = brief.lines().filter(|l| l.split_whitespace().last() == Some("up")).count();
        if up == n && brief.contains(&format!("Session count: {n}")) {
            return started.elapsed();
        }
        assert!(started.elapsed() < FOLLOW_LIMIT, "BFD sessions not all up after {FOLLOW_LIMIT:?}:\n{brief}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A router lab of three directors, the masters serving, `R` on the router and `D` on the
/// directors with the shipped examples, every daemon serving every master.
fn three_directors<R: mim_lb_tests::bird::RoutingDaemon, D: mim_lb_tests::bird::RoutingDaemon>() -> (Lab, Ecmp<R, D>) {
    let mut lab = Lab::new(LabSpec::router(3)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    let configs = configs(&lab, &key);
    let ecmp = Ecmp::<R, D>::launch(&mut lab, key, &configs, &|c| c.to_owned()).unwrap();
    (lab, ecmp)
}

#[test]
fn directors_announce_through_frr_and_withdraw() {
    let (mut lab, mut ecmp) = three_directors::<Frr, Frr>();
    let (vip, n) = (lab.vip4(), lab.director_count());
    let t = ecmp.wait_nexthops(&lab, vip, &all(n), UP_LIMIT).unwrap();
    println!("convergence: all 3 directors next hops of {vip} {:.2} s after every daemon served every master", t.as_secs_f64());

    // What made it: zebra took mim-lb's route from table 100 as a "table" route, and bgpd
    // announced it; the router installed it from BGP with a next hop per director.
    let rib = ecmp.speakers[0].vtysh("show ip route table").unwrap();
    assert!(rib.contains(&format!("{vip}/32")), "director 0's zebra did not import table 100:\n{rib}");
    let route = lab.run_in(lab.router_ns().unwrap(), "ip", &["-4", "route", "show", &vip.to_string()]).unwrap();
    assert!(route.contains("proto bgp"), "{route}");

    let carried = spread(&lab, &ecmp);
    println!("new flows per director for 60 connections: {carried:?}");

    // Unlike BIRD's example, FRR's cannot keep only mim-lb's protocol number (OPERATIONS.md):
    // another host route in the table is announced too, which is why the table must be
    // mim-lb's alone. If this stops holding, the docs' warning is stale.
    let o = lab.router_addr4().unwrap().octets();
    let other = std::net::Ipv4Addr::new(o[0], o[1], o[2], 200);
    let route = format!("{other}/32");
    lab.run_in(lab.director_ns(0), "ip", &["route", "add", &route, "dev", "lo", "table", "100", "proto", "static"]).unwrap();
    ecmp.wait_nexthops(&lab, other, &[0].into(), FOLLOW_LIMIT).unwrap();
    lab.run_in(lab.director_ns(0), "ip", &["route", "del", &route, "table", "100"]).unwrap();
    ecmp.wait_nexthops(&lab, other, &BTreeSet::new(), FOLLOW_LIMIT).unwrap();

    // `withdraw` takes director 1 out of the route; `announce` brings it back.
    let out = ecmp.withdraw(1).unwrap();
    assert!(out.contains("withdrawn"), "{out}");
    let t = ecmp.wait_nexthops(&lab, vip, &without(n, 1), FOLLOW_LIMIT).unwrap();
    println!("convergence: withdraw on director 1 left the router's route in {:.3} s", t.as_secs_f64());
    let names = lab.ask(SocketAddr::new(vip.into(), PORT), 20, Duration::from_secs(3));
    assert!(names.iter().all(|n| lab.master_index(n).is_some()), "{names:?}");
    ecmp.announce(1).unwrap();
    let t = ecmp.wait_nexthops(&lab, vip, &all(n), FOLLOW_LIMIT).unwrap();
    println!("convergence: announce on director 1 was back in the router's route in {:.3} s", t.as_secs_f64());

    // A director that dies leaves the route by BFD (the BGP hold time is 3 s), once its BFD
    // session is up: it comes up after the BGP session that asked for it.
    let t = wait_bfd_up(&ecmp.router, n);
    println!("BFD: all {n} sessions up at the router {:.2} s later", t.as_secs_f64());
    // The example's timers (its `directors` profile), not FRR's 300 ms defaults: 100 ms both
    // ways, as set here and as the peer set it.
    let peers = ecmp.router.vtysh("show bfd peers").unwrap();
    assert_eq!(peers.matches("Transmission interval: 100ms").count(), 2 * n, "{peers}");
    assert_eq!(peers.matches("Receive interval: 100ms").count(), 2 * n, "{peers}");
    let gone = ecmp.kill(&lab, 2).unwrap();
    ecmp.wait_nexthops(&lab, vip, &without(n, 2), FOLLOW_LIMIT).unwrap();
    let took = gone.elapsed();
    println!("convergence: director 2 killed and cut off, out of the router's route in {:.3} s", took.as_secs_f64());
    let bfd = ecmp.router.vtysh("show bfd peers brief").unwrap();
    let names = lab.ask(SocketAddr::new(vip.into(), PORT), 20, Duration::from_secs(3));
    assert!(names.iter().all(|n| lab.master_index(n).is_some()), "{names:?}");
    assert!(took < Duration::from_millis(2500), "director 2 left the route after {took:?}: the BGP hold time, not BFD\n{bfd}");

    // Back, it is announced again.
    ecmp.revive(&mut lab, 2, &[]).unwrap();
    ecmp.gateways[2].wait_all_up().unwrap();
    let t = ecmp.wait_nexthops(&lab, vip, &all(n), UP_LIMIT).unwrap();
    println!("convergence: director 2 revived, back in the router's route {:.2} s after its daemon was ready", t.as_secs_f64());
}

/// The halves interoperate: FRR's router config takes BIRD's directors.
#[test]
fn frr_router_takes_bird_directors() {
    let (lab, ecmp) = three_directors::<Frr, Bird>();
    let (vip, n) = (lab.vip4(), lab.director_count());
    let t = ecmp.wait_nexthops(&lab, vip, &all(n), UP_LIMIT).unwrap();
    println!("convergence: all 3 BIRD directors next hops of {vip} at the FRR router {:.2} s after every daemon was ready", t.as_secs_f64());
    let carried = spread(&lab, &ecmp);
    println!("new flows per director for 60 connections: {carried:?}");
    ecmp.withdraw(0).unwrap();
    ecmp.wait_nexthops(&lab, vip, &without(n, 0), FOLLOW_LIMIT).unwrap();
}

/// The lab's renderings of the FRR examples: every example value is replaced (a changed
/// example fails here), whole words only, and the result still parses.
#[test]
fn frr_examples_render_for_the_lab() {
    use mim_lb_tests::frr::set_values;
    assert!(set_values("neighbor 192.0.2.1 bfd\n", &[("192.0.2.9", "x".into())]).is_err());
    assert_eq!(
        set_values("! 192.0.2.1 in a comment\n neighbor 192.0.2.11 bfd\n", &[("192.0.2.1", "R".into()), ("192.0.2.11", "D".into())])
            .unwrap_err()
            .to_string(),
        "the FRR example has no `192.0.2.1` outside comments"
    );
    let lab = Lab::new(LabSpec::router(2)).unwrap();
    let dir = std::env::temp_dir().join(format!("mimlb-{}", mim_lb_tests::gateway::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let rendered = [
        ("router.conf", mim_lb_tests::frr::router_config(&lab).unwrap()),
        ("director.conf", mim_lb_tests::frr::director_config(&lab, 1).unwrap()),
    ];
    for (name, text) in rendered {
        assert!(!text.lines().filter(|l| !l.starts_with('!')).any(|l| l.contains("192.0.2.") || l.contains("203.0.113.")), "{name}:\n{text}");
        let file = dir.join(name);
        std::fs::write(&file, &text).unwrap();
        let out = std::process::Command::new("vtysh").arg("--dryrun").arg("-f").arg(&file).output().unwrap();
        assert!(out.status.success(), "{name}: {}{}\n{text}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
