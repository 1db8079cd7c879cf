//! No flow lost while the set of directors behind an ECMP router changes (issue 9;
//! OPERATIONS.md, "Many directors behind ECMP"). Four directors in a router lab, each with
//! the real daemon (`[announce]`, `[sync]` with a multicast group) and BIRD; the router
//! spreads flows over their routes by the L4 hash. Long-lived connections to every master and
//! a stream of new ones run through it all:
//! - (c) a fourth director joins (it pulls its peers' state before it announces);
//! - (a) a director is killed (processes killed, link cut): the router drops it by BFD;
//! - (b) a master is drained on every director, connections are opened on the slots that
//!   changed (each recorded only by the director its SYN reached), and a director is killed
//!   at once;
//! - (d) a director is withdrawn (it leaves the route and keeps forwarding what still reaches
//!   it), then stopped.
//!
//! Pass: every long-lived connection keeps exchanging data throughout; new connections fail
//! only until the router's route converged (each event's time is printed, with which
//! director carried how many new flows).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec, echo_all,
    bird::{Ecmp, director_mim_lb_config},
    continuity::{Traffic, TrafficSpec},
    gateway::ServiceSpec,
    keepalived::SyncKey,
};

const PORT: u16 = 7000;
const UP_LIMIT: Duration = Duration::from_secs(40);
const FOLLOW_LIMIT: Duration = Duration::from_secs(10);
/// Traffic before and after each event.
const SETTLE: Duration = Duration::from_secs(2);

/// The two tests build a router lab each (a router, three or four directors with BIRD and
/// mim-lb, masters): on a two-CPU machine, both at once stretch the sync lag (about 10 ms on
/// its own) past the moment scenario (b) kills a director right after opening connections,
/// which is what OPERATIONS.md says can be lost ("the sync lag"). They take turns.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn set(v: &[usize]) -> BTreeSet<usize> {
    v.iter().copied().collect()
}

/// New flows each director carried so far (None: not running).
fn carried(ecmp: &Ecmp) -> Vec<Option<u64>> {
    ecmp.gateways.iter().map(|g| g.running().then(|| g.status().map(|s| s.services[0].new_flows).unwrap_or(0))).collect()
}

fn print_carried(what: &str, before: &[Option<u64>], after: &[Option<u64>]) {
    let per: Vec<String> = after
        .iter()
        .enumerate()
        .map(|(i, a)| match (before.get(i).copied().flatten(), a) {
            (b, Some(a)) => format!("director {i}: {}", a - b.unwrap_or(0)),
            (_, None) => format!("director {i}: gone"),
        })
        .collect();
    println!("new flows carried {what}: {}", per.join(", "));
}

/// Waits until `directors` all hold the same recorded flows (their pinned connection tables'
/// keys), and returns how long that took.
fn wait_same_records(ecmp: &Ecmp, directors: &[usize], limit: Duration) -> Duration {
    let started = Instant::now();
    let keys = |d: usize| -> BTreeSet<Vec<u8>> {
        let path = ecmp.gateways[d].pin_dir().join(mim_lb_common::maps::names::FLOWS);
        mim_lb::director::sweep::read_pinned_flows(&path)
            .unwrap()
            .into_iter()
            .map(|(k, _)| format!("{:?}", (k.src, k.dst, k.sport, k.dport, k.proto)).into_bytes())
            .collect()
    };
    loop {
        let sets: Vec<BTreeSet<Vec<u8>>> = directors.iter().map(|&d| keys(d)).collect();
        if sets.windows(2).all(|w| w[0] == w[1]) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "the directors' records still differ after {limit:?}: {:?}", sets.iter().map(|s| s.len()).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn directors_join_die_and_leave_under_traffic_without_losing_a_flow() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(LabSpec::router(4)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    let vip = lab.vip4();
    let target = SocketAddr::new(vip.into(), PORT);
    let configs: Vec<String> = (0..4)
        .map(|i| director_mim_lb_config(&lab, &key, i, &[ServiceSpec::tcp(&lab, PORT)], "tcp_idle_timeout_s = 60", 1000))
        .collect();
    let mut ecmp = Ecmp::start(&mut lab, key, &configs[..3]).unwrap();
    ecmp.wait_nexthops(&lab, vip, &set(&[0, 1, 2]), UP_LIMIT).unwrap();
    let traffic = Traffic::start(&lab, TrafficSpec::new(target)).unwrap();
    std::thread::sleep(SETTLE);

    // (c) A fourth director joins.
    let mut c0 = carried(&ecmp);
    let joined = Instant::now();
    let i = ecmp.join(&mut lab, &configs[3]).unwrap();
    assert_eq!(i, 3);
    let t = ecmp.wait_nexthops(&lab, vip, &set(&[0, 1, 2, 3]), UP_LIMIT).unwrap();
    println!("convergence (c): director 3 in the router's route {:.2} s after it was started", t.as_secs_f64());
    let pulls: Vec<String> = ecmp.gateways[3].status().unwrap().sync.unwrap().peers.iter().map(|p| p.pull.clone()).collect();
    assert_eq!(pulls.iter().filter(|p| *p == "done").count(), 1, "the joiner pulled from one peer: {pulls:?}");
    std::thread::sleep(SETTLE);
    let c1 = carried(&ecmp);
    print_carried("around the join", &c0, &c1);
    assert!(c1[3].unwrap() > 0, "the router sent the joined director nothing: {c1:?}");
    c0 = c1;

    // (a) A director is killed.
    let killed = ecmp.kill(&lab, 0).unwrap();
    let t = ecmp.wait_nexthops(&lab, vip, &set(&[1, 2, 3]), FOLLOW_LIMIT).unwrap();
    let converged_a = killed.elapsed();
    println!("convergence (a): director 0 killed, out of the router's route {:.3} s after (checked every 20 ms; waited {:.3} s)", converged_a.as_secs_f64(), t.as_secs_f64());
    std::thread::sleep(SETTLE);
    let c1 = carried(&ecmp);
    print_carried("around the kill of director 0", &c0, &c1);
    c0 = c1;

    // (b) A master change, connections on the slots it changed, and a director killed at once.
    let drained = lab.master_addr4(0).to_string();
    for d in 1..4 {
        ecmp.gateways[d].ctl(&["drain", &format!("{vip}:{PORT}"), &drained]).unwrap();
    }
    let mut opened = lab.hold(target, 40, Duration::from_secs(3));
    echo_all(&mut opened, "after the drain", Duration::from_secs(5));
    // Each of these connections is recorded by the director its SYN reached, and the router
    // moves flows among all the survivors after the kill. What a director recorded within the
    // sync lag before it died can be lost (OPERATIONS.md, "What can be lost"); so the kill
    // comes the moment every director holds every record, and the time that took is printed.
    let sync_lag = wait_same_records(&ecmp, &[1, 2, 3], Duration::from_secs(5));
    println!("(b): every director held every record {:.1} ms after the last connection answered", sync_lag.as_secs_f64() * 1e3);
    let changed = Instant::now();
    ecmp.kill(&lab, 1).unwrap();
    echo_all(&mut opened, "right after director 1 was killed", Duration::from_secs(10));
    ecmp.wait_nexthops(&lab, vip, &set(&[2, 3]), FOLLOW_LIMIT).unwrap();
    let converged_b = changed.elapsed();
    println!("convergence (b): director 1 killed right after a drain, out of the route {:.3} s after", converged_b.as_secs_f64());
    echo_all(&mut opened, "after the route converged", Duration::from_secs(5));
    std::thread::sleep(SETTLE);
    let c1 = carried(&ecmp);
    print_carried("around the drain and the kill of director 1", &c0, &c1);
    c0 = c1;

    // (d) A director is withdrawn, keeps forwarding, and leaves.
    let withdrawn = Instant::now();
    ecmp.withdraw(2).unwrap();
    let t = ecmp.wait_nexthops(&lab, vip, &set(&[3]), FOLLOW_LIMIT).unwrap();
    println!("convergence (d): director 2 withdrawn, out of the route in {:.3} s", t.as_secs_f64());
    std::thread::sleep(SETTLE);
    echo_all(&mut opened, "after director 2 was withdrawn", Duration::from_secs(5));
    ecmp.gateways[2].stop().unwrap();
    std::thread::sleep(SETTLE);
    echo_all(&mut opened, "after director 2 left", Duration::from_secs(5));
    let c1 = carried(&ecmp);
    print_carried("around director 2's withdrawal and stop", &c0, &c1);

    let report = traffic.finish_after(SETTLE);
    let end = Instant::now();
    println!("{}", report.summary("the whole run", joined));
    assert!(report.broken_held().is_empty(), "long-lived connections broke: {}", report.summary("the whole run", joined));
    // With ECMP a new connection fails only if the router hashed it to the director that went
    // away, and only until the router's route has dropped that director; one that starts after
    // must not fail. A join and a withdrawal move flows between live directors: nothing may
    // fail at all.
    let windows = [
        ("director 3 joining", joined, killed, None),
        ("director 0 killed", killed, changed, Some(converged_a)),
        ("a drain and director 1 killed", changed, withdrawn, Some(converged_b)),
        ("director 2 withdrawn and stopped", withdrawn, end, None),
    ];
    for (what, from, to, converged) in windows {
        let failed: Vec<_> = report.attempts.iter().filter(|a| a.started >= from && a.started < to && a.outcome.is_err()).collect();
        let late: Vec<_> = failed.iter().filter(|a| converged.is_none_or(|c| a.started >= from + c)).collect();
        println!(
            "{what}: {} new connections failed, the last one begun {:?} after it (the route converged after {:?})",
            failed.len(),
            failed.iter().map(|a| a.started - from).max(),
            converged
        );
        let shown: Vec<String> = late
            .iter()
            .map(|a| format!("  +{:?} (connection {}): {}", a.started - from, a.number, a.outcome.as_ref().err().map_or("", |e| e.as_str())))
            .collect();
        assert!(late.is_empty(), "{what}: {} new connections failed that began after the route converged ({converged:?}):\n{}", late.len(), shown.join("\n"));
    }
    drop(opened);
    drop(ecmp);
}

/// Fragments behind an ECMP router (OPERATIONS.md, "MTU, ICMP and fragments"): the router
/// hashes a fragment without its ports, so a flow's fragmented datagrams may take another
/// director than its whole ones. The Linux router keeps each datagram's fragments together
/// (every director counts exactly two later fragments per first one, none dropped), and every
/// director sends a flow to the same master: from one client port, a small request and a
/// 4,000-byte one (three fragments) are answered by the same master.
#[test]
fn fragments_and_whole_datagrams_of_a_flow_reach_one_master_through_different_directors() {
    let _turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const UDP_PORT: u16 = 7001;
    let mut lab = Lab::new(LabSpec::router(3)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    lab.start_udp_servers(UDP_PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    let vip = lab.vip4();
    let udp = ServiceSpec { name: "udp".into(), ..ServiceSpec::udp_checked_by_tcp(&lab, UDP_PORT, PORT) };
    let configs: Vec<String> = (0..3).map(|i| director_mim_lb_config(&lab, &key, i, std::slice::from_ref(&udp), "", 1000)).collect();
    let ecmp = Ecmp::start(&mut lab, key, &configs).unwrap();
    ecmp.wait_nexthops(&lab, vip, &set(&[0, 1, 2]), UP_LIMIT).unwrap();

    let target = SocketAddr::new(vip.into(), UDP_PORT);
    let big = vec![0x42u8; 4000];
    const FLOWS: u16 = 60;
    // One socket per flow (its port chosen by the kernel), asking twice: the same 5-tuple.
    let answers: Vec<(u16, String, String)> = mim_lb_tests::in_netns(lab.client_ns(), || {
        let ask = |socket: &std::net::UdpSocket, request: &[u8]| {
            socket.send(request).unwrap();
            let mut buf = [0u8; 1500];
            let n = socket.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()
        };
        (0..FLOWS)
            .map(|_| {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.connect(target).unwrap();
                socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let port = socket.local_addr().unwrap().port();
                (port, ask(&socket, b"who?\n"), ask(&socket, &big))
            })
            .collect()
    })
    .unwrap();
    for (port, small, large) in &answers {
        assert_eq!(small, large, "client port {port}: the whole datagram and the fragmented one went to different masters");
    }

    let count = |i: usize, name: &str| {
        ecmp.gateways[i].status().unwrap().reasons.iter().find(|r| r.name == name).map_or(0, |r| r.packets)
    };
    let first: Vec<u64> = (0..3).map(|i| count(i, "fragment_first")).collect();
    let followed: Vec<u64> = (0..3).map(|i| count(i, "fragment_followed")).collect();
    let dropped: Vec<u64> = (0..3).map(|i| count(i, "fragment")).collect();
    let whole: Vec<u64> = (0..3).map(|i| count(i, "forwarded")).collect();
    println!("per director: first fragments {first:?}, later fragments {followed:?}, fragments dropped {dropped:?}, forwarded {whole:?}");
    assert_eq!(first.iter().sum::<u64>(), u64::from(FLOWS), "{first:?}");
    assert_eq!(followed.iter().sum::<u64>(), 2 * u64::from(FLOWS), "{followed:?}");
    assert_eq!(dropped.iter().sum::<u64>(), 0);
    for i in 0..3 {
        assert_eq!(followed[i], 2 * first[i], "director {i}: a datagram's fragments took more than one director: {first:?} {followed:?}");
    }
    assert!(whole.iter().filter(|c| **c > 0).count() >= 2, "the whole datagrams were spread by their ports: {whole:?}");
    drop(ecmp);
}
