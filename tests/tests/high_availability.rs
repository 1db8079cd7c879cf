//! What makes mim-lb a high-availability tool: failed masters leave, recovered ones return,
//! operators drain, disable and reload without breaking live connections, and the daemon
//! restarts without losing flows. Real namespaces, the real daemon, real connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec, TcpHold, count_names, in_netns, tcp_ask, tcp_ask_many,
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
const HEALTH_PORT: u16 = 8080;
const T: Duration = Duration::from_secs(3);
/// Health settings of these tests: 100 ms between checks, 2 to change state either way.
const HEALTH: &str = "interval_ms = 100\ntimeout_ms = 100\nrise = 2\nfall = 2";

fn vip(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.vip4().into(), PORT)
}

fn start(lab: &mut Lab, health: &str, extra: &str) -> Gateway {
    let service = ServiceSpec { health: health.into(), ..ServiceSpec::tcp(lab, PORT) };
    let config = lab_config(lab, &[service], extra);
    let gw = Gateway::start(lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    gw
}

fn addr(lab: &Lab, i: usize) -> IpAddr {
    lab.master_addr4(i).into()
}

fn wait_state(gw: &Gateway, backend: IpAddr, state: &str) -> Duration {
    let started = Instant::now();
    gw.wait_until(&format!("{backend} {state}"), Duration::from_secs(10), |s| {
        s.services.iter().flat_map(|s| &s.backends).any(|b| b.address == backend && b.state == state)
    })
    .unwrap();
    started.elapsed()
}

/// `n` connections through the VIP; every one must succeed.
fn ask(lab: &Lab, n: usize) -> Vec<String> {
    lab.ask(vip(lab), n, T)
}

/// Opens `n` held connections through the VIP.
fn hold(lab: &Lab, n: usize) -> Vec<TcpHold> {
    lab.hold(vip(lab), n, T)
}

fn echo_all(held: &mut [TcpHold], round: &str) {
    mim_lb_tests::echo_all(held, round, T);
}

fn echo_all_within(held: &mut [TcpHold], round: &str, timeout: Duration) {
    mim_lb_tests::echo_all(held, round, timeout);
}

#[test]
fn a_killed_master_stops_getting_connections_and_comes_back_after_rise() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, HEALTH, "");
    let victim = lab.master_name(1);

    let killed = Instant::now();
    assert_eq!(lab.stop_servers(1, PORT), 1);
    let took = wait_state(&gw, addr(&lab, 1), "down");
    eprintln!("master-2 marked down {:?} after its server died", killed.elapsed());
    // Detection needs `fall` failed checks: about fall x interval, plus the check's own time.
    assert!(took < Duration::from_secs(5));
    let reason = gw.backend(addr(&lab, 1)).unwrap().reason;
    assert!(reason.contains("tcp check"), "the reason names the check: {reason:?}");

    let names = ask(&lab, 150);
    assert!(!names.contains(&victim), "a new connection reached the dead master");
    assert_eq!(count_names(&names).len(), 2, "the two survivors share the connections");

    lab.start_tcp_server(1, PORT).unwrap();
    wait_state(&gw, addr(&lab, 1), "up");
    let names = ask(&lab, 150);
    let back = names.iter().filter(|n| **n == victim).count();
    assert!(back >= 20, "the recovered master got only {back} of 150 connections");
}

#[test]
fn http_and_command_checks_catch_a_master_that_accepts_tcp_but_is_unhealthy() {
    let mut lab = Lab::new(LabSpec { vips: 2, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let flags = lab.start_http_health(HEALTH_PORT).unwrap();
    let marker_dir = std::env::temp_dir().join(format!("mimlb-marks-{:x}", std::process::id()));
    std::fs::create_dir_all(&marker_dir).unwrap();
    let _cleanup = RemoveOnDrop(marker_dir.clone());

    // Two services on the same masters: one checked over HTTP, one by a command that fails
    // while a marker file for the backend exists.
    let http = ServiceSpec {
        name: "http-checked".into(),
        health: format!("check = \"http\"\nport = {HEALTH_PORT}\npath = \"/health\"\nexpect_body = \"ok\"\n{HEALTH}"),
        ..ServiceSpec::tcp(&lab, PORT)
    };
    let command = ServiceSpec {
        name: "command-checked".into(),
        vip: lab.vips4()[1].into(),
        health: format!(
            "check = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"test ! -e {}/down-$0\", \"{{address}}\"]\n{HEALTH}",
            marker_dir.display()
        ),
        ..ServiceSpec::tcp(&lab, PORT)
    };
    let config = lab_config(&lab, &[http, command], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();

    flags[0].store(false, Ordering::Relaxed);
    std::fs::write(marker_dir.join(format!("down-{}", addr(&lab, 2))), "").unwrap();
    let status = gw
        .wait_until("both unhealthy masters down", Duration::from_secs(10), |s| {
            let state = |svc: &str, a: IpAddr| {
                s.services.iter().find(|x| x.name == svc).unwrap().backends.iter().find(|b| b.address == a).unwrap().state.clone()
            };
            state("http-checked", addr(&lab, 0)) == "down" && state("command-checked", addr(&lab, 2)) == "down"
        })
        .unwrap();
    let http_service = status.services.iter().find(|s| s.name == "http-checked").unwrap();
    let b = http_service.backends.iter().find(|b| b.address == addr(&lab, 0)).unwrap();
    assert!(b.reason.contains("503"), "http reason: {:?}", b.reason);
    // Only the unhealthy backend of each service went down.
    for s in &status.services {
        let down: Vec<IpAddr> = s.backends.iter().filter(|b| b.state != "up").map(|b| b.address).collect();
        assert_eq!(down.len(), 1, "{}: {down:?}", s.name);
    }

    // The masters still accept TCP, but no new connection reaches the one its check rejects.
    let names = ask(&lab, 100);
    assert!(!names.contains(&lab.master_name(0)), "the HTTP-unhealthy master got connections");
    let vip2 = SocketAddr::new(lab.vips4()[1].into(), PORT);
    let names2 = in_netns(lab.client_ns(), || tcp_ask_many(vip2, 100, T)).unwrap().unwrap();
    assert!(!names2.contains(&lab.master_name(2)), "the command-unhealthy master got connections");

    flags[0].store(true, Ordering::Relaxed);
    wait_state(&gw, addr(&lab, 0), "up");
}

struct RemoveOnDrop(std::path::PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_drained_master_keeps_its_connections_and_a_disabled_one_loses_them() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, HEALTH, "");
    let target = lab.master_name(0);
    let mut held = hold(&lab, 30);
    let on_target: Vec<usize> = (0..held.len()).filter(|&k| held[k].name() == target).collect();
    assert!(!on_target.is_empty(), "no held connection landed on {target}");
    // Past the servers' hold window: these connections are open because they asked to be.
    std::thread::sleep(Duration::from_millis(2200));

    let said = gw.ctl(&["drain", &format!("{}:{PORT}", lab.vip4()), &addr(&lab, 0).to_string()]).unwrap();
    assert!(said.contains("-> draining"), "{said}");
    assert_eq!(gw.backend(addr(&lab, 0)).unwrap().state, "draining");
    echo_all(&mut held, "after drain");
    let names = ask(&lab, 100);
    assert!(!names.contains(&target), "a new connection reached the drained master");
    echo_all(&mut held, "after new connections");

    gw.ctl(&["disable", "tcp-7000", &addr(&lab, 0).to_string()]).unwrap();
    assert_eq!(gw.backend(addr(&lab, 0)).unwrap().state, "disabled");
    // Their next packets go to another master, which knows no such connection and answers
    // with a reset (OPERATIONS.md, "Backend states"): a reset, not a timeout.
    for &k in &on_target {
        let err = held[k].echo("after disable", T).expect_err("a connection stayed on the disabled master");
        let kind = err.root_cause().downcast_ref::<std::io::Error>().map(std::io::Error::kind);
        assert_eq!(kind, Some(std::io::ErrorKind::ConnectionReset), "{err:#}");
    }
    let mut others: Vec<TcpHold> = held.into_iter().filter(|h| h.name() != target).collect();
    echo_all(&mut others, "others after disable");

    gw.ctl(&["enable", "tcp-7000", &addr(&lab, 0).to_string()]).unwrap();
    wait_state(&gw, addr(&lab, 0), "up");
    let names = ask(&lab, 100);
    assert!(names.contains(&target), "the enabled master gets new connections again");

    // Errors name what is wrong.
    let err = gw.ctl(&["drain", "10.9.9.9:1", "10.0.0.1"]).unwrap_err();
    assert!(format!("{err:#}").contains("no service 10.9.9.9:1"), "{err:#}");
    let err = gw.ctl(&["drain", "tcp-7000", "10.9.9.9"]).unwrap_err();
    assert!(format!("{err:#}").contains("has no backend 10.9.9.9"), "{err:#}");
}

#[test]
fn reload_adds_a_fourth_master_and_an_invalid_reload_changes_nothing() {
    let mut lab = Lab::new(LabSpec::masters(4)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let three = ServiceSpec { health: HEALTH.into(), masters: (0..3).map(|i| (i, true)).collect(), ..ServiceSpec::tcp(&lab, PORT) };
    let config = lab_config(&lab, std::slice::from_ref(&three), "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    assert!(!ask(&lab, 100).contains(&lab.master_name(3)));
    let mut held = hold(&lab, 30);
    std::thread::sleep(Duration::from_millis(2200));

    let four = ServiceSpec { masters: (0..4).map(|i| (i, true)).collect(), ..three.clone() };
    gw.write_config(&lab_config(&lab, &[four], "")).unwrap();
    let said = gw.ctl(&["reload"]).unwrap();
    assert!(said.contains("applied"), "{said}");
    wait_state(&gw, addr(&lab, 3), "up");
    let names = ask(&lab, 200);
    let to_new = names.iter().filter(|n| **n == lab.master_name(3)).count();
    assert!(to_new >= 20, "the new master got {to_new} of 200 connections");
    echo_all(&mut held, "after adding a master");

    // A bad file is rejected whole, with the key and the reason; nothing changes.
    let before = gw.status().unwrap();
    gw.write_config(&format!("{}\nbogus_key = 1\n", lab_config(&lab, std::slice::from_ref(&three), ""))).unwrap();
    let err = gw.ctl(&["reload"]).unwrap_err();
    assert!(format!("{err:#}").contains("bogus_key"), "{err:#}");
    let invalid = ServiceSpec { masters: vec![(0, true)], ..three.clone() };
    gw.write_config(&lab_config(&lab, &[invalid], "tcp_idle_timeout_s = 0")).unwrap();
    let err = gw.ctl(&["reload"]).unwrap_err();
    assert!(format!("{err:#}").contains("tcp_idle_timeout_s"), "{err:#}");
    // SIGHUP takes the same path and is refused the same way.
    gw.proc().signal(libc::SIGHUP).unwrap();
    gw.proc().wait_for_line("SIGHUP: reload rejected", T).unwrap();
    let after = gw.status().unwrap();
    let states = |s: &mim_lb::status::Status| {
        s.services.iter().flat_map(|s| s.backends.iter().map(|b| (b.address, b.state.clone(), b.slots))).collect::<Vec<_>>()
    };
    assert_eq!(states(&before), states(&after), "a rejected reload changed the state");
    echo_all(&mut held, "after rejected reloads");
    assert_eq!(count_names(&ask(&lab, 200)).len(), 4);
}

#[test]
fn a_removed_master_drains_then_leaves() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    // A short idle timeout so that the removed master leaves within the test.
    let gw = start(&mut lab, HEALTH, "tcp_idle_timeout_s = 2");
    let mut held = hold(&lab, 30);
    let target = lab.master_name(2);
    let kept: Vec<usize> = (0..held.len()).filter(|&k| held[k].name() == target).collect();
    assert!(!kept.is_empty());

    let two = ServiceSpec { health: HEALTH.into(), masters: vec![(0, true), (1, true)], ..ServiceSpec::tcp(&lab, PORT) };
    gw.write_config(&lab_config(&lab, &[two], "tcp_idle_timeout_s = 2")).unwrap();
    gw.ctl(&["reload"]).unwrap();
    assert_eq!(gw.backend(addr(&lab, 2)).unwrap().state, "removing");
    // Its connections keep working while they are used, for longer than the idle timeout
    // (a line every 300 ms: a wide margin against the 2 s timeout on a loaded machine)...
    for round in 0..11 {
        for &k in &kept {
            held[k].echo(&format!("removing {round}"), T).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!ask(&lab, 60).contains(&target));
    assert!(gw.backend(addr(&lab, 2)).is_ok(), "removed while its flows were alive");
    // ...and once they fall silent for the idle timeout, the master is gone for good.
    drop(held);
    gw.wait_until("the removed master retired", Duration::from_secs(15), |s| {
        s.services[0].backends.iter().all(|b| b.address != addr(&lab, 2))
    })
    .unwrap();
    gw.proc().wait_for_line("removed: no live flow left on it", T).unwrap();
}

/// Echo timeout for the hitless checks: no more than Linux's minimum retransmission timeout
/// (200 ms), so a segment lost during a restart shows as a failed echo rather than a late one.
const FAST: Duration = Duration::from_millis(200);

/// The counters a hitless restart must carry over: drops and passes that mean "no master"
/// or "not filled yet" must not grow, forwarded ones must not restart from zero.
#[derive(Debug, Clone)]
struct Carried {
    no_backend: u64,
    not_ready: u64,
    forwarded: u64,
    backend_packets: std::collections::BTreeMap<IpAddr, u64>,
}

fn carried(s: &mim_lb::status::Status) -> Carried {
    let reason = |name: &str| s.reasons.iter().find(|r| r.name == name).map_or(0, |r| r.packets);
    Carried {
        no_backend: reason("no_backend"),
        not_ready: reason("not_ready"),
        forwarded: reason("forwarded"),
        backend_packets: s.services.iter().flat_map(|s| &s.backends).map(|b| (b.address, b.packets)).collect(),
    }
}

/// The first status after a restart: every master is as it was (health up, the drained one
/// still draining), nothing was dropped for want of a master or passed as not ready, and the
/// forwarded counters went on from where they were.
fn assert_hitless(gw: &Gateway, before: &Carried, drained: IpAddr, what: &str) -> Carried {
    let s = gw.query_status().unwrap();
    for b in s.services.iter().flat_map(|s| &s.backends) {
        let want = if b.address == drained { "draining" } else { "up" };
        assert_eq!((b.health.as_str(), b.state.as_str()), ("up", want), "{what}: {} in the first status", b.address);
    }
    let after = carried(&s);
    assert_eq!(after.no_backend, before.no_backend, "{what}: no_backend grew");
    assert_eq!(after.not_ready, before.not_ready, "{what}: not_ready grew");
    assert!(after.forwarded >= before.forwarded, "{what}: forwarded went back: {before:?} -> {after:?}");
    for (b, n) in &before.backend_packets {
        assert!(after.backend_packets[b] >= *n, "{what}: packets of {b} went back: {before:?} -> {after:?}");
    }
    after
}

/// One held connection echoing every 10 ms on a thread of its own, so that the whole restart
/// window carries traffic; stopped by [`Chatter::finish`], which fails on the first lost echo.
struct Chatter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(TcpHold, usize, anyhow::Result<()>)>,
}

impl Chatter {
    fn start(mut conn: TcpHold) -> Chatter {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                if let Err(e) = conn.echo(&format!("chatter {n}"), FAST) {
                    return (conn, n, Err(e));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (conn, n, Ok(()))
        });
        Chatter { stop, thread }
    }

    fn finish(self) -> TcpHold {
        self.stop.store(true, Ordering::Relaxed);
        let (conn, n, result) = self.thread.join().unwrap();
        result.unwrap_or_else(|e| panic!("the chattering connection lost echo {n}: {e:#}"));
        assert!(n > 20, "the chattering connection made only {n} echoes");
        conn
    }
}

/// No held connection retransmitted anything: the gateway lost none of their segments.
fn assert_no_retransmits(held: &[TcpHold], what: &str) {
    for (k, h) in held.iter().enumerate() {
        assert_eq!(h.retransmits().unwrap(), 0, "{what}: held connection {k} to {} retransmitted", h.name());
    }
}

/// The daemon stops (`--keep-pinned`) or dies (SIGKILL) and starts again while connections
/// are exchanging data: the restarts are hitless. Echoes must come back within 200 ms (a lost
/// segment waits at least that long to be retransmitted) and no segment is retransmitted at
/// all; no packet is dropped for want of a master or passed as not ready; counters carry on.
#[test]
fn restarts_keep_long_lived_connections() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let service = ServiceSpec { health: HEALTH.into(), ..ServiceSpec::tcp(&lab, PORT) };
    let config = lab_config(&lab, &[service], "");
    let mut gw = Gateway::start_with_args(&mut lab, &config, Mode::Native, &["--keep-pinned"]).unwrap();
    gw.wait_all_up().unwrap();
    let mut held = hold(&lab, 30);
    // Enough traffic that counters reset by a restart could not climb back during it.
    ask(&lab, 200);
    std::thread::sleep(Duration::from_millis(2200));
    echo_all_within(&mut held, "before", FAST);

    gw.ctl(&["drain", "tcp-7000", &addr(&lab, 0).to_string()]).unwrap();
    let chatter = Chatter::start(held.pop().unwrap());
    let before = carried(&gw.query_status().unwrap());
    gw.stop().unwrap();
    assert!(gw.pin_dir().join("XDP_LINK").exists(), "--keep-pinned removed the link pin");
    echo_all_within(&mut held, "while no daemon runs", FAST);
    gw.restart(&mut lab, &["--keep-pinned"]).unwrap();
    let before = assert_hitless(&gw, &before, addr(&lab, 0), "a --keep-pinned restart");
    gw.proc().wait_for_line("replaced the running program", T).unwrap();
    echo_all_within(&mut held, "after a --keep-pinned restart", FAST);

    gw.kill().unwrap();
    echo_all_within(&mut held, "after SIGKILL", FAST);
    gw.restart(&mut lab, &[]).unwrap();
    assert_hitless(&gw, &before, addr(&lab, 0), "a start after SIGKILL");
    echo_all_within(&mut held, "after restarting from a crash", FAST);
    held.push(chatter.finish());
    assert_no_retransmits(&held, "across both restarts");
    let names = ask(&lab, 60);
    assert!(!names.contains(&lab.master_name(0)), "the drained master took new connections after restarts");
    let name = in_netns(lab.client_ns(), || tcp_ask(vip(&lab), T)).unwrap().unwrap();
    assert!(lab.master_index(&name).is_some());
}

/// Backends configured without a MAC are resolved from the neighbour table and used; one whose
/// address nobody answers for is down, with the reason shown.
#[test]
fn backends_without_a_mac_are_resolved_and_used() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let service = ServiceSpec { health: HEALTH.into(), ..ServiceSpec::tcp(&lab, PORT) }.macs_from_neighbours();
    let octets = lab.master_addr4(0).octets();
    let nobody = std::net::Ipv4Addr::new(octets[0], octets[1], octets[2], 200);
    let config = format!("{}[[service.backend]]\naddress = \"{nobody}\"\n", lab_config(&lab, &[service], ""));
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    let status = gw
        .wait_until("the masters resolved and up", Duration::from_secs(15), |s| {
            s.services[0].backends.iter().filter(|b| b.state == "up").count() == 3
        })
        .unwrap();
    for i in 0..lab.master_count() {
        let b = status.services[0].backends.iter().find(|b| b.address == addr(&lab, i)).unwrap();
        assert_eq!(b.mac_source, "neighbour");
        assert_eq!(b.mac.as_deref(), Some(mim_lb_tests::mac_to_string(&lab.master_mac(i)).as_str()));
    }
    let unresolved = gw
        .wait_until("the missing host reported", Duration::from_secs(15), |s| {
            s.services[0].backends.iter().any(|b| b.address == IpAddr::from(nobody) && b.reason.contains("no ARP reply"))
        })
        .unwrap();
    let b = unresolved.services[0].backends.iter().find(|b| b.address == IpAddr::from(nobody)).unwrap();
    assert_eq!((b.state.as_str(), b.mac.as_deref()), ("down", None));
    let names = ask(&lab, 150);
    assert_eq!(count_names(&names).len(), 3, "every resolved master takes connections");
}

/// The gateway interface's MAC changes while the daemon runs (an operator's `ip link set
/// address`, a bond failing over): forwarded frames carry the new source MAC within a couple
/// of seconds, and connections keep working. `arp_notify` makes the kernel announce the new
/// address, as an operator changing it should.
#[test]
fn a_gateway_mac_change_while_running_is_picked_up() {
    use mim_lb_tests::{Capture, mac_to_string};
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, HEALTH, "");
    // Connections work before the change (ask fails the test otherwise).
    ask(&lab, 5);

    let new_mac = [0x02, 0xab, 0xcd, 0x00, 0x00, 0x77];
    let ifname = lab.gateway_ifname().to_owned();
    lab.run_in(lab.gateway_ns(), "sysctl", &["-qw", &format!("net.ipv4.conf.{ifname}.arp_notify=1")]).unwrap();
    lab.run_in(lab.gateway_ns(), "ip", &["link", "set", "dev", &ifname, "address", &mac_to_string(&new_mac)]).unwrap();
    gw.proc().wait_for_line("forwarded frames carry it from now on", Duration::from_secs(5)).unwrap();

    let captures: Vec<Capture> = (0..lab.master_count()).map(|i| Capture::start(lab.master_ns(i), "eth0").unwrap()).collect();
    let names = ask(&lab, 30);
    assert_eq!(names.len(), 30);
    let vip4: IpAddr = lab.vip4().into();
    let to_masters: Vec<_> = captures
        .into_iter()
        .flat_map(|c| c.stop())
        .filter(|f| !f.outgoing && f.is_tcp() && f.dst_ip == Some(vip4))
        .collect();
    assert!(to_masters.len() >= 30, "only {} forwarded frames captured", to_masters.len());
    let old: Vec<_> = to_masters.iter().filter(|f| f.src_mac != new_mac).collect();
    assert!(old.is_empty(), "{} forwarded frames still carry another source MAC, e.g. {:?}", old.len(), old[0].src_mac);
}

/// A start over kept pins that fails after taking over the running program leaves it
/// forwarding with its maps, pins and link: live connections survive, and the next start with
/// a good config takes over again. The failure here is a second change of `table_size` while
/// connections still follow the table from before the first one.
#[test]
fn a_failed_start_over_kept_pins_keeps_forwarding() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let sized = |lab: &Lab, size: Option<u32>| {
        let service = ServiceSpec { health: HEALTH.into(), ..ServiceSpec::tcp(lab, PORT) };
        let config = lab_config(lab, &[service], "tcp_idle_timeout_s = 1");
        match size {
            Some(n) => config.replace("protocol = \"tcp\"\n", &format!("protocol = \"tcp\"\ntable_size = {n}\n")),
            None => config,
        }
    };
    let config = sized(&lab, None);
    let mut gw = Gateway::start_with_args(&mut lab, &config, Mode::Generic, &["--keep-pinned"]).unwrap();
    gw.wait_all_up().unwrap();
    gw.wait_until("a settled table", Duration::from_secs(15), |s| s.services.iter().all(|s| s.changed_slots == 0)).unwrap();
    let mut held = hold(&lab, 30);

    gw.write_config(&sized(&lab, Some(251))).unwrap();
    gw.ctl(&["reload"]).unwrap();
    // The held connections keep talking, so their slots stay marked while the others clear.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        echo_all(&mut held, "during the resize");
        let s = gw.status().unwrap();
        let svc = &s.services[0];
        if svc.resizing && svc.changed_slots < 251 {
            break;
        }
        assert!(Instant::now() < deadline, "the resize never reached a partly cleared table: {} slots marked, resizing {}", svc.changed_slots, svc.resizing);
        std::thread::sleep(Duration::from_millis(200));
    }
    gw.stop().unwrap();

    gw.write_config(&sized(&lab, Some(509))).unwrap();
    let (status, log) = gw.restart_failing(&mut lab, &["--keep-pinned"]).unwrap();
    assert!(!status.success(), "the start succeeded: {log}");
    assert!(log.contains("cannot change again yet"), "{log}");
    assert!(log.contains("stays attached"), "{log}");
    assert!(gw.pin_dir().join("XDP_LINK").exists(), "the failed start removed the link pin");
    echo_all(&mut held, "after a failed start over kept pins");

    gw.write_config(&sized(&lab, Some(251))).unwrap();
    gw.restart(&mut lab, &["--keep-pinned"]).unwrap();
    gw.proc().wait_for_line("replaced the running program", T).unwrap();
    echo_all(&mut held, "after the next start");
}

/// The maps keep the room for services they were made with across restarts over their pins
/// (CONFIG.md, `max_services`): a start asking for less reuses them as they are and says so;
/// one needing more than they hold is refused, naming the key and the way out, while the
/// program keeps forwarding the held connections; a fitting file takes over again.
#[test]
fn a_restart_over_pins_keeps_their_room_or_is_refused() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = |lab: &Lab, n: u16, top: &str| {
        // Every service checks the masters' one server, on PORT.
        let specs: Vec<ServiceSpec> = (0..n)
            .map(|i| ServiceSpec { health: format!("{HEALTH}\nport = {PORT}"), ..ServiceSpec::tcp(lab, PORT + i) })
            .collect();
        lab_config(lab, &specs, top)
    };
    let first = config(&lab, 1, "");
    let mut gw = Gateway::start_with_args(&mut lab, &first, Mode::Generic, &["--keep-pinned"]).unwrap();
    gw.proc().wait_for_line("maps sized for 8 services", T).unwrap();
    gw.wait_all_up().unwrap();
    let mut held = hold(&lab, 20);

    gw.stop().unwrap();
    gw.write_config(&config(&lab, 1, "max_services = 4")).unwrap();
    gw.restart(&mut lab, &["--keep-pinned"]).unwrap();
    gw.proc()
        .wait_for_line(
            "the pinned maps hold room for 8 services, kept as they are (the configuration asks for 4, max_services); reloads may serve up to 8",
            T,
        )
        .unwrap();
    gw.proc().wait_for_line("replaced the running program", T).unwrap();
    echo_all(&mut held, "after a restart asking for less room");

    gw.stop().unwrap();
    gw.write_config(&config(&lab, 9, "")).unwrap();
    let (status, log) = gw.restart_failing(&mut lab, &["--keep-pinned"]).unwrap();
    assert!(!status.success(), "the start succeeded: {log}");
    assert!(log.contains("MAGLEV holds room for 8 services and this configuration needs 9"), "{log}");
    assert!(log.contains("max_services") && log.contains("detach"), "{log}");
    assert!(gw.pin_dir().join("XDP_LINK").exists(), "the refused start removed the link pin");
    echo_all(&mut held, "after a refused start");

    gw.write_config(&config(&lab, 8, "")).unwrap();
    gw.restart(&mut lab, &["--keep-pinned"]).unwrap();
    gw.proc().wait_for_line("replaced the running program", T).unwrap();
    gw.wait_all_up().unwrap();
    echo_all(&mut held, "after a start filling the pinned room");
}

/// A master configured without `mac` changes its MAC and announces it (arp_notify): the daemon
/// sees it through the neighbour table, `status` shows the new MAC, frames go to it, and held
/// connections to that master and the others keep talking (a MAC change alone moves no flow).
#[test]
fn a_masters_mac_change_is_followed_without_moving_its_flows() {
    use mim_lb_tests::{Capture, mac_to_string};
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let service = ServiceSpec { health: HEALTH.into(), ..ServiceSpec::tcp(&lab, PORT) }.macs_from_neighbours();
    let config = lab_config(&lab, &[service], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    let mut held = hold(&lab, 30);
    let on_first = held.iter().filter(|h| h.name() == lab.master_name(0)).count();
    assert!(on_first > 0, "no held connection on the master whose MAC changes: the test proves less");
    echo_all(&mut held, "before");

    let new_mac = [0x02, 0x5a, 0x5a, 0x00, 0x00, 0x42];
    let master = lab.master_ns(0).to_owned();
    lab.run_in(&master, "sysctl", &["-qw", "net.ipv4.conf.eth0.arp_notify=1"]).unwrap();
    lab.run_in(&master, "ip", &["link", "set", "dev", "eth0", "address", &mac_to_string(&new_mac)]).unwrap();
    let shown = mac_to_string(&new_mac);
    gw.wait_until("the new MAC in status", Duration::from_secs(10), |s| {
        s.services.iter().flat_map(|s| &s.backends).any(|b| b.address == addr(&lab, 0) && b.mac.as_deref() == Some(shown.as_str()))
    })
    .unwrap();
    assert_eq!(gw.backend(addr(&lab, 0)).unwrap().state, "up");

    let capture = Capture::start(&master, "eth0").unwrap();
    echo_all(&mut held, "after the MAC change");
    let names = ask(&lab, 60);
    let frames = capture.stop();
    let vip4: IpAddr = lab.vip4().into();
    let to_master: Vec<_> = frames.iter().filter(|f| !f.outgoing && f.is_tcp() && f.dst_ip == Some(vip4)).collect();
    assert!(names.contains(&lab.master_name(0)), "no new connection reached the master after its MAC change");
    assert!(!to_master.is_empty(), "no forwarded frame reached the master after its MAC change");
    assert!(to_master.iter().all(|f| f.dst_mac == new_mac), "forwarded frames still go to the old MAC");
}
