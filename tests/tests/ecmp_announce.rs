//! Many directors behind an ECMP router, announced through BIRD (OPERATIONS.md, "Many directors
//! behind ECMP"; CONFIG.md, `[announce]`). Three directors each run the real daemon with
//! `[announce]` and `[sync]`, and BIRD with the shipped `dist/bird/director.conf`; the router
//! runs BIRD with `dist/bird/router.conf` and forwards with `fib_multipath_hash_policy = 1`.
//! Promises kept:
//! - once ready, every director's address is a next hop of the router's route to the VIP, and
//!   client connections through the router reach the masters, spread over the directors;
//! - `mim-lb withdraw` takes one director out of the route (it keeps forwarding) and `mim-lb
//!   announce` puts it back;
//! - a VIP none of whose masters is live on a director is not announced by it;
//! - a VIP added by a reload is announced, one removed is withdrawn;
//! - a clean stop (SIGTERM) withdraws before the process exits.
//!
//! The times the router took to follow are printed (`convergence:` lines).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use mim_lb_tests::{
    Lab, LabSpec,
    bird::{Ecmp, director_mim_lb_config},
    gateway::ServiceSpec,
    keepalived::SyncKey,
};

const PORT: u16 = 7000;
/// How long the whole group may take to come up and be announced: the daemons' first checks
/// and sync pull, BGP sessions opened (connect retry 2 s) and BFD up, on a loaded machine.
const UP_LIMIT: Duration = Duration::from_secs(40);
/// How long the router may take to follow a withdrawal or an announcement: BIRD hears of the
/// route at once (netlink), the update is sent at once; this is room for a loaded machine.
/// The measured times are printed.
const FOLLOW_LIMIT: Duration = Duration::from_secs(10);
/// On a clean stop the daemon keeps forwarding this long after it withdrew: the test sees the
/// route lose the director while the process still runs. The directors start with 0 and get
/// this by a reload (`withdraw_wait_ms` follows reloads).
const WITHDRAW_WAIT_MS: u64 = 4000;

fn all(n: usize) -> BTreeSet<usize> {
    (0..n).collect()
}

fn without(n: usize, i: usize) -> BTreeSet<usize> {
    (0..n).filter(|j| *j != i).collect()
}

fn configs(lab: &Lab, key: &SyncKey, vips: usize, withdraw_wait_ms: u64) -> Vec<String> {
    let services: Vec<ServiceSpec> = (0..vips)
        .map(|k| ServiceSpec { name: format!("web{k}"), vip: lab.vips4()[k].into(), ..ServiceSpec::tcp(lab, PORT) })
        .collect();
    (0..lab.director_count())
        .map(|i| director_mim_lb_config(lab, key, i, &services, "tcp_idle_timeout_s = 2", withdraw_wait_ms))
        .collect()
}

#[test]
fn directors_announce_through_bird_and_withdraw() {
    let mut lab = Lab::new(LabSpec { vips: 2, ..LabSpec::router(3) }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    let first = configs(&lab, &key, 1, 0);
    let (vip, vip2) = (lab.vip4(), lab.vips4()[1]);
    // What an earlier run on director 0 left in the table: a route for a VIP no longer
    // configured, and one for a VIP with other attributes; and a route that is not mim-lb's.
    mim_lb_tests::netns::ip_batch(
        Some(lab.director_ns(0)),
        &[
            format!("route add {vip2}/32 dev lo table 100 proto 250"),
            format!("route add {vip}/32 dev eth0 table 100 proto 250"),
            "route add 192.0.2.0/24 dev lo table 100 proto static".to_owned(),
        ],
        false,
    )
    .unwrap();
    // Two directors first; the third joins once they are announced.
    let mut ecmp = Ecmp::start(&mut lab, key, &first[..2]).unwrap();
    let n = lab.director_count();
    let t = ecmp.wait_nexthops(&lab, vip, &[0, 1].into(), UP_LIMIT).unwrap();
    println!("convergence: directors 0 and 1 next hops of {vip} {:.2} s after both daemons served every master", t.as_secs_f64());
    assert_eq!(ecmp.join(&mut lab, &first[2]).unwrap(), 2);
    ecmp.gateways[2].wait_all_up().unwrap();
    let t = ecmp.wait_nexthops(&lab, vip, &all(n), UP_LIMIT).unwrap();
    println!("convergence: director 2 joined the route {:.2} s after its daemon served every master", t.as_secs_f64());
    let sync = ecmp.gateways[2].status().unwrap().sync.unwrap();
    // One peer's answer is the group's state: pulled from one, the other not needed.
    let pulls: Vec<&str> = sync.peers.iter().map(|p| p.pull.as_str()).collect();
    assert!(
        sync.ready && pulls.iter().filter(|p| **p == "done").count() == 1 && pulls.iter().all(|p| *p == "done" || *p == "from another peer"),
        "director 2 announced before pulling its peers' state: {sync:?}"
    );
    for (i, gw) in ecmp.gateways.iter().enumerate() {
        let a = gw.status().unwrap().announce.expect("status shows [announce]");
        assert!(a.announcing && !a.withdrawn, "director {i}: {a:?}");
        assert_eq!(a.vips.len(), 1, "director {i}: {a:?}");
        assert!(a.vips[0].announced && a.vips[0].vip == vip.to_string(), "director {i}: {a:?}");
        let text = gw.ctl(&["status"]).unwrap();
        assert!(text.contains(&format!("Announce (table 100, protocol 250): announcing {vip}")), "director {i}:\n{text}");
    }

    // The start left the table right: the stale VIP's route gone, the other rewritten, the
    // route that is not mim-lb's untouched.
    let table = lab.run_in(lab.director_ns(0), "ip", &["-4", "route", "show", "table", "100"]).unwrap();
    let lines: BTreeSet<String> = table.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    let want: BTreeSet<String> =
        [format!("{vip} dev lo proto 250 scope link"), "192.0.2.0/24 dev lo proto static scope link".to_owned()].into();
    assert_eq!(lines, want, "director 0's table 100 after the start:\n{table}");

    // Connections through the router reach the masters, and the router's L4 hash spreads them
    // over the directors.
    let before: Vec<u64> = ecmp.gateways.iter().map(|g| g.status().unwrap().services[0].new_flows).collect();
    let names = lab.ask(SocketAddr::new(vip.into(), PORT), 60, Duration::from_secs(3));
    assert!(names.iter().all(|n| lab.master_index(n).is_some()), "{names:?}");
    let carried: Vec<u64> =
        ecmp.gateways.iter().zip(&before).map(|(g, b)| g.status().unwrap().services[0].new_flows - b).collect();
    println!("new flows per director for 60 connections: {carried:?}");
    assert_eq!(carried.iter().sum::<u64>(), 60, "every connection went through one director: {carried:?}");
    assert!(carried.iter().filter(|c| **c > 0).count() >= 2, "the router sent every connection to one director: {carried:?}");

    // `withdraw` takes director 1 out of the route; it still forwards what reaches it.
    let out = ecmp.gateways[1].ctl(&["withdraw"]).unwrap();
    assert!(out.contains("withdrawn"), "{out}");
    let t = ecmp.wait_nexthops(&lab, vip, &without(n, 1), FOLLOW_LIMIT).unwrap();
    println!("convergence: withdraw on director 1 left the router's route in {:.3} s", t.as_secs_f64());
    assert!(ecmp.announced_routes(&lab, 1).unwrap().is_empty(), "director 1 still has its route");
    let a = ecmp.gateways[1].status().unwrap().announce.unwrap();
    assert!(a.withdrawn && !a.announcing && a.vips[0].reason.contains("withdrawn by the operator"), "{a:?}");
    assert!(ecmp.gateways[1].ctl(&["status"]).unwrap().contains("WITHDRAWN by the operator"));
    let names = lab.ask(SocketAddr::new(vip.into(), PORT), 20, Duration::from_secs(3));
    assert!(names.iter().all(|n| lab.master_index(n).is_some()), "{names:?}");
    // ... and `announce` brings it back.
    ecmp.gateways[1].ctl(&["announce"]).unwrap();
    let t = ecmp.wait_nexthops(&lab, vip, &all(n), FOLLOW_LIMIT).unwrap();
    println!("convergence: announce on director 1 was back in the router's route in {:.3} s", t.as_secs_f64());

    // Drained masters still carry their connections: the VIP stays announced (the decision
    // is made at once: its reason would say otherwise).
    for m in 0..lab.master_count() {
        ecmp.gateways[0].ctl(&["drain", "web0", &lab.master_addr4(m).to_string()]).unwrap();
    }
    let a = ecmp.gateways[0].query_status().unwrap().announce.unwrap();
    assert!(a.vips[0].announced && a.vips[0].reason.is_empty(), "every master drained: {a:?}");
    assert_eq!(ecmp.nexthop_directors(&lab, vip).unwrap(), all(n));
    // A director on which no master of the VIP is live steps out; back once one is.
    for m in 0..lab.master_count() {
        ecmp.gateways[0].ctl(&["disable", "web0", &lab.master_addr4(m).to_string()]).unwrap();
    }
    ecmp.wait_nexthops(&lab, vip, &without(n, 0), FOLLOW_LIMIT).unwrap();
    let a = ecmp.gateways[0].status().unwrap().announce.unwrap();
    assert!(!a.vips[0].announced && a.vips[0].reason.contains("no service of this VIP has a master"), "{a:?}");
    ecmp.gateways[0].ctl(&["enable", "web0", &lab.master_addr4(0).to_string()]).unwrap();
    ecmp.wait_nexthops(&lab, vip, &all(n), FOLLOW_LIMIT).unwrap();
    for m in 1..lab.master_count() {
        ecmp.gateways[0].ctl(&["enable", "web0", &lab.master_addr4(m).to_string()]).unwrap();
    }

    // A VIP added by a reload is announced by every director; removed again, it is withdrawn.
    assert!(ecmp.nexthop_directors(&lab, vip2).unwrap().is_empty());
    for (gw, config) in ecmp.gateways.iter().zip(configs(&lab, &ecmp.key, 2, WITHDRAW_WAIT_MS)) {
        gw.write_config(&config).unwrap();
        gw.ctl(&["reload"]).unwrap();
    }
    let t = ecmp.wait_nexthops(&lab, vip2, &all(n), UP_LIMIT).unwrap();
    println!("convergence: {vip2}, added by a reload, announced by all in {:.3} s", t.as_secs_f64());
    let names = lab.ask(SocketAddr::new(vip2.into(), PORT), 10, Duration::from_secs(3));
    assert!(names.iter().all(|n| lab.master_index(n).is_some()), "{names:?}");
    for (gw, config) in ecmp.gateways.iter().zip(configs(&lab, &ecmp.key, 1, WITHDRAW_WAIT_MS)) {
        gw.write_config(&config).unwrap();
        gw.ctl(&["reload"]).unwrap();
    }
    ecmp.wait_nexthops(&lab, vip2, &BTreeSet::new(), FOLLOW_LIMIT).unwrap();
    ecmp.wait_nexthops(&lab, vip, &all(n), FOLLOW_LIMIT).unwrap();

    // The table and protocol are named in BIRD's config too: a reload may not change them.
    let current = configs(&lab, &ecmp.key, 1, WITHDRAW_WAIT_MS);
    ecmp.gateways[0].write_config(&current[0].replace("table = 100", "table = 101")).unwrap();
    let err = format!("{:#}", ecmp.gateways[0].ctl(&["reload"]).expect_err("a new announce table"));
    assert!(err.contains("reload rejected, nothing changed: announce (table, protocol, or the section itself) cannot change while running"), "{err}");
    ecmp.gateways[0].write_config(&current[0]).unwrap();
    assert_eq!(ecmp.nexthop_directors(&lab, vip).unwrap(), all(n));

    // A clean stop withdraws first: the router drops director 2 while its daemon still runs
    // (it forwards for WITHDRAW_WAIT_MS more), and the process then exits cleanly.
    ecmp.begin_stop(2).unwrap();
    // The wait it had from the reload, not the 0 it started with.
    ecmp.gateways[2]
        .proc()
        .wait_for_line(&format!("forwarding what still arrives for {WITHDRAW_WAIT_MS} ms before detaching"), FOLLOW_LIMIT)
        .unwrap();
    let t = ecmp.wait_nexthops(&lab, vip, &without(n, 2), FOLLOW_LIMIT).unwrap();
    println!("convergence: SIGTERM on director 2 left the router's route in {:.3} s", t.as_secs_f64());
    assert!(ecmp.gateways[2].running(), "director 2's daemon exited before the router dropped it ({:.3} s)", t.as_secs_f64());
    assert!(ecmp.announced_routes(&lab, 2).unwrap().is_empty());
    ecmp.gateways[2].stop().unwrap();
    let names = lab.ask(SocketAddr::new(vip.into(), PORT), 20, Duration::from_secs(3));
    assert!(names.iter().all(|n| lab.master_index(n).is_some()), "{names:?}");

    // A director that dies (processes killed, link cut) leaves the route by BFD; back, it
    // pulls its peers' state and is announced again.
    let gone = ecmp.kill(&lab, 0).unwrap();
    ecmp.wait_nexthops(&lab, vip, &[1].into(), FOLLOW_LIMIT).unwrap();
    println!("convergence: director 0 killed and cut off, out of the router's route in {:.3} s (BFD 3 x 100 ms)", gone.elapsed().as_secs_f64());
    // Over its kept pins it pulls a peer's state first, and until then it announces nothing.
    // Its datagrams to director 1 (the only one running) are blackholed for a while, so the
    // pull cannot end before the test has looked: it hears director 1's beacons on the group,
    // asks it, and gets no answer.
    let d1 = format!("{}/32", lab.director_addr4(1));
    lab.run_in(lab.director_ns(0), "ip", &["route", "add", "blackhole", &d1]).unwrap();
    ecmp.revive(&mut lab, 0, &[]).unwrap();
    let blocked_until = std::time::Instant::now() + Duration::from_millis(1500);
    let mut not_ready_seen = 0;
    let mut blocked = true;
    loop {
        let status = ecmp.gateways[0].query_status().unwrap();
        if status.sync.as_ref().unwrap().ready {
            break;
        }
        let a = status.announce.unwrap();
        assert!(!a.vips[0].announced && a.vips[0].reason.starts_with("not ready"), "announced while not ready: {a:?}");
        assert!(!ecmp.nexthop_directors(&lab, vip).unwrap().contains(&0), "the router has director 0 while it is not ready");
        not_ready_seen += 1;
        if blocked && std::time::Instant::now() >= blocked_until {
            lab.run_in(lab.director_ns(0), "ip", &["route", "del", "blackhole", &d1]).unwrap();
            blocked = false;
        }
        assert!(not_ready_seen < 200, "director 0 never became ready: {:?}", status.sync);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(not_ready_seen >= 10, "director 0 was ready while its pull could not be answered ({not_ready_seen} looks)");
    let pulls: Vec<String> = ecmp.gateways[0].status().unwrap().sync.unwrap().peers.iter().map(|p| p.pull.clone()).collect();
    assert_eq!(pulls[0], "done", "it pulled from director 1: {pulls:?}");
    let t = ecmp.wait_nexthops(&lab, vip, &[0, 1].into(), UP_LIMIT).unwrap();
    println!("convergence: director 0 revived, back in the router's route {:.2} s after its daemon was ready", t.as_secs_f64());
}

/// The shipped routing examples are valid for the daemons they are for: BIRD's parser (`bird
/// -p`), as shipped and as the lab renders them, and FRR's (`vtysh --dryrun`, which reports
/// an unknown or misplaced command).
#[test]
fn shipped_bird_and_frr_examples_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let dir = std::env::temp_dir().join(format!("mimlb-{}", mim_lb_tests::gateway::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |program: &str, args: &[&str], file: &std::path::Path| {
        let out = std::process::Command::new(program).args(args).arg(file).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for name in ["director.conf", "router.conf"] {
        check("bird", &["-p", "-c"], &root.join("dist/bird").join(name));
        check("vtysh", &["--dryrun", "-f"], &root.join("dist/frr").join(name));
    }
    // The lab's renderings: only the `define` lines change, and they still parse.
    let router = mim_lb_tests::bird::set_defines(
        &mim_lb_tests::bird::dist_config("router.conf").unwrap(),
        &[("ROUTER", "10.9.9.1".into()), ("DIRECTORS_NET", "10.9.9.0/24".into()), ("VIPS", "[ 10.9.9.0/24{32,32} ]".into())],
    )
    .unwrap();
    std::fs::write(dir.join("router.conf"), router).unwrap();
    check("bird", &["-p", "-c"], &dir.join("router.conf"));
    // A name the example does not define is an error, not silently ignored.
    assert!(mim_lb_tests::bird::set_defines("define A = 1;\n", &[("B", "2".into())]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// IPv6 VIPs get their `/128` route the same way, next to the IPv4 ones (one director, no
/// routing daemon: what is in the table is what a daemon would announce), and `withdraw`
/// removes both.
#[test]
fn ipv6_vips_get_host_routes_too() {
    use mim_lb_tests::gateway::{Gateway, Mode, lab_config};
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let v6 = lab.vip6().unwrap();
    let services = [
        ServiceSpec::tcp(&lab, PORT),
        ServiceSpec { name: "web6".into(), vip: v6.into(), ..ServiceSpec::tcp(&lab, PORT) }.macs_from_neighbours(),
    ];
    let config = format!("{}\n{}", lab_config(&lab, &services, ""), mim_lb_tests::bird::announce_section(0));
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    gw.wait_until("both VIPs announced", Duration::from_secs(20), |s| {
        s.announce.as_ref().is_some_and(|a| a.vips.len() == 2 && a.vips.iter().all(|v| v.announced))
    })
    .unwrap();
    let routes = |family: &str| {
        // A table that never had a route of the family does not exist for it: no routes.
        let out = match lab.run_in(lab.gateway_ns(), "ip", &[family, "route", "show", "table", "100", "proto", "250"]) {
            Ok(out) => out,
            Err(e) if format!("{e:#}").contains("FIB table does not exist") => String::new(),
            Err(e) => panic!("{e:#}"),
        };
        out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>()
    };
    assert_eq!(routes("-4"), [format!("{} dev lo scope link", lab.vip4())]);
    let six = routes("-6");
    assert!(six.len() == 1 && six[0].starts_with(&format!("{v6} dev lo metric")), "{six:?}");
    gw.ctl(&["withdraw"]).unwrap();
    gw.wait_until("nothing announced", Duration::from_secs(10), |s| s.announce.as_ref().is_some_and(|a| !a.announcing)).unwrap();
    assert!(routes("-4").is_empty() && routes("-6").is_empty(), "{:?} {:?}", routes("-4"), routes("-6"));
}
