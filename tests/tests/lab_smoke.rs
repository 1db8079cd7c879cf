//! The lab harness on its own, without the XDP program: namespaces, addressing, services,
//! captures, processes and cleanup.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Capture, Lab, LabSpec, TcpHold, cleanup_stale_labs, in_netns, mac_to_string, tcp_ask,
    tcp_ask_many, udp_ask,
};

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(3);

fn lab() -> Lab {
    Lab::new(LabSpec::default()).expect("building the lab")
}

/// Namespaces of the given lab id (or of a full namespace name) that `ip netns list` shows.
fn leftover_namespaces(id: &str) -> Vec<String> {
    let (lab_prefix, full_name) = (format!("mimlb-{id}-"), id.to_owned());
    let out = mim_lb_tests::output_within(Command::new("ip").args(["netns", "list"]), mim_lb_tests::RUN_TIMEOUT).expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(&lab_prefix) || *name == full_name)
        .map(str::to_owned)
        .collect()
}

/// Asks every master directly at its own address and checks, from a capture on the client's
/// interface, that each answer came from that master's MAC to the client's MAC.
fn check_direct_tcp(lab: &Lab, v6: bool) {
    let capture = Capture::start(lab.client_ns(), "eth0").unwrap();
    let addrs: Vec<IpAddr> = (0..lab.master_count())
        .map(|i| if v6 { lab.master_addr6(i).unwrap().into() } else { lab.master_addr4(i).into() })
        .collect();
    for (i, ip) in addrs.iter().enumerate() {
        let name = in_netns(lab.client_ns(), || tcp_ask(SocketAddr::new(*ip, PORT), T))
            .unwrap()
            .unwrap();
        assert_eq!(name, lab.master_name(i));
    }
    let frames = capture.stop();
    for (i, ip) in addrs.iter().enumerate() {
        let answers: Vec<_> = frames
            .iter()
            .filter(|f| !f.outgoing && f.is_tcp() && f.src_ip == Some(*ip))
            .filter(|f| f.src_port == Some(PORT))
            .collect();
        assert!(!answers.is_empty(), "no frame from {ip}:{PORT} captured");
        for f in answers {
            assert_eq!(
                f.src_mac,
                lab.master_mac(i),
                "answer from {ip} came from {}",
                mac_to_string(&f.src_mac)
            );
            assert_eq!(f.dst_mac, lab.client_mac());
        }
    }
}

#[test]
fn masters_answer_tcp_from_their_own_mac() {
    let mut lab = lab();
    lab.start_tcp_servers(PORT).unwrap();
    check_direct_tcp(&lab, false);
    check_direct_tcp(&lab, true);
    for i in 0..lab.master_count() {
        assert_eq!(lab.served(i).tcp_accepted, 2);
    }
}

#[test]
fn udp_servers_answer_from_the_address_asked() {
    let mut lab = lab();
    lab.start_udp_servers(PORT).unwrap();
    for i in 0..lab.master_count() {
        let v4 = SocketAddr::new(lab.master_addr4(i).into(), PORT);
        let v6 = SocketAddr::new(lab.master_addr6(i).unwrap().into(), PORT);
        let (a4, a6) = in_netns(lab.client_ns(), || {
            (udp_ask(v4, None, T).unwrap(), udp_ask(v6, Some(40_000), T).unwrap())
        })
        .unwrap();
        assert_eq!(a4, lab.master_name(i));
        assert_eq!(a6, lab.master_name(i));
        // A datagram to the VIP must be answered from the VIP, or a connected client (and a
        // real one behind the balancer) would drop it. Inside the master the VIP is local.
        let vip4 = SocketAddr::new(lab.vip4().into(), PORT);
        let vip6 = SocketAddr::new(lab.vip6().unwrap().into(), PORT);
        let (b4, b6) = in_netns(lab.master_ns(i), || {
            (udp_ask(vip4, None, T).unwrap(), udp_ask(vip6, None, T).unwrap())
        })
        .unwrap();
        assert_eq!(b4, lab.master_name(i));
        assert_eq!(b6, lab.master_name(i));
        assert_eq!(lab.served(i).udp_answered, 4);
    }
}

/// Without the director, frames for the VIP go to the gateway: it alone answers ARP and ND
/// for the VIP, and the masters stay silent about it.
#[test]
fn vip_resolves_to_the_gateway() {
    let lab = lab();
    let capture = Capture::start(lab.client_ns(), "eth0").unwrap();
    let vip4 = SocketAddr::new(lab.vip4().into(), PORT);
    let vip6 = SocketAddr::new(lab.vip6().unwrap().into(), PORT);
    in_netns(lab.client_ns(), || {
        // Nothing listens on the gateway, so these fail; only the frames matter.
        let _ = udp_ask(vip4, None, Duration::from_millis(300));
        let _ = udp_ask(vip6, None, Duration::from_millis(300));
    })
    .unwrap();
    let frames = capture.stop();
    for vip in [IpAddr::from(lab.vip4()), IpAddr::from(lab.vip6().unwrap())] {
        let sent: Vec<_> =
            frames.iter().filter(|f| f.outgoing && f.is_udp() && f.dst_ip == Some(vip)).collect();
        assert!(!sent.is_empty(), "no datagram to {vip} captured: {frames:#?}");
        for f in sent {
            assert_eq!(f.dst_mac, lab.gateway_mac(), "datagram to {vip} went to {}", mac_to_string(&f.dst_mac));
        }
    }
    let master_macs: Vec<[u8; 6]> = (0..lab.master_count()).map(|i| lab.master_mac(i)).collect();
    // ARP replies and neighbour advertisements are unicast; multicast (MLD reports) is noise.
    let from_masters: Vec<_> = frames
        .iter()
        .filter(|f| !f.outgoing && master_macs.contains(&f.src_mac) && f.dst_mac[0] & 1 == 0)
        .collect();
    assert!(from_masters.is_empty(), "a master answered for the VIP: {from_masters:#?}");
    // The caller attaches its XDP_PASS program here; it must exist in the bridge namespace.
    lab.run_in(lab.bridge_ns(), "ip", &["link", "show", lab.gateway_peer_ifname()]).unwrap();
}

#[test]
fn many_sequential_and_held_connections() {
    let mut lab = lab();
    lab.start_tcp_servers(PORT).unwrap();
    let addr = SocketAddr::new(lab.master_addr4(1).into(), PORT);
    let names = in_netns(lab.client_ns(), || tcp_ask_many(addr, 300, T)).unwrap().unwrap();
    assert!(names.iter().all(|n| *n == lab.master_name(1)));

    let mut held: Vec<TcpHold> = in_netns(lab.client_ns(), || {
        (0..lab.master_count())
            .flat_map(|i| std::iter::repeat_n(i, 10))
            .map(|i| TcpHold::connect(SocketAddr::new(lab.master_addr4(i).into(), PORT), T))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .unwrap()
    .unwrap();
    // Past the server's hold window, so the connections are open because they asked to be.
    std::thread::sleep(mim_lb_tests::servers::HOLD_WINDOW + Duration::from_millis(200));
    for (k, conn) in held.iter_mut().enumerate() {
        conn.echo(&format!("line {k}"), T).unwrap();
    }
    for i in 0..lab.master_count() {
        assert_eq!(lab.served(i).tcp_open, 10);
    }
    // The held sockets belong to the client namespace; using them from here is fine.
    assert_eq!(held[0].name(), lab.master_name(0));
    drop(held);
}

#[test]
fn two_labs_at_once_do_not_collide() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Lab::new(LabSpec::masters(2)).unwrap());
        let b = s.spawn(|| Lab::new(LabSpec::masters(2)).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let names_a: BTreeSet<&String> = a.namespaces().iter().collect();
    assert!(b.namespaces().iter().all(|n| !names_a.contains(n)));
    assert_ne!(a.id(), b.id());
    for ns in a.namespaces().iter().chain(b.namespaces()) {
        assert!(ns.starts_with("mimlb-"), "{ns}");
    }
    std::thread::scope(|s| {
        for mut lab in [a, b] {
            s.spawn(move || {
                lab.start_tcp_servers(PORT).unwrap();
                let addr = SocketAddr::new(lab.master_addr4(1).into(), PORT);
                let name = in_netns(lab.client_ns(), || tcp_ask(addr, T)).unwrap().unwrap();
                assert_eq!(name, lab.master_name(1));
            });
        }
    });
}

#[test]
fn drop_removes_namespaces_and_processes() {
    let mut lab = Lab::new(LabSpec { masters: 1, ipv6: false, vips: 2, ..LabSpec::default() }).unwrap();
    let id = lab.id().to_owned();
    assert_eq!(leftover_namespaces(&id).len(), 4, "bridge, client, gateway, one master");
    assert!(lab.vip6().is_none());
    let proc = lab
        .spawn_in(lab.master_ns(0).to_owned().as_str(), Command::new("sleep").arg("600"))
        .unwrap();
    let pid = proc.pid() as i32;
    drop(lab);
    assert_eq!(leftover_namespaces(&id), Vec::<String>::new());
    // SAFETY: signal 0 only probes; the pid was reaped by the lab, so ESRCH is expected.
    assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "sleep survived its lab");
}

#[test]
fn panicking_test_still_cleans_up() {
    let mut id = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = lab();
        id = lab.id().to_owned();
        lab.start_tcp_servers(PORT).unwrap();
        let _ = lab.spawn_in(lab.gateway_ns().to_owned().as_str(), Command::new("sleep").arg("600"));
        panic!("deliberate panic with a lab alive");
    }));
    assert!(result.is_err());
    assert!(!id.is_empty());
    assert_eq!(leftover_namespaces(&id), Vec::<String>::new());
}

#[test]
fn spawned_process_runs_in_its_namespace() {
    let mut lab = lab();
    let gw = lab.gateway_ns().to_owned();
    let proc = lab
        .spawn_in(
            &gw,
            Command::new("sh").args([
                "-c",
                "trap 'echo got-hup' HUP; echo starting; ip -o addr show dev eth0 >&2; \
                 echo ready; while true; do sleep 0.05; done",
            ]),
        )
        .unwrap();
    proc.wait_for_line("ready", T).unwrap();
    // stderr is a separate pipe, so its line may arrive after "ready".
    proc.wait_for_line(&format!("{}/32", lab.vip4()), T).unwrap();
    assert!(proc.lines().contains(&"starting".to_owned()));
    let since = proc.line_count();
    lab.kill(&proc, libc::SIGHUP).unwrap();
    proc.wait_for_line_since(since, "got-hup", T).unwrap();
    let err = proc.wait_for_line("never printed", Duration::from_millis(200)).unwrap_err();
    assert!(err.to_string().contains("never printed"));

    // A process that ends early makes waiting fail at once, not at the timeout.
    let short = lab.spawn_in(&gw, Command::new("sh").args(["-c", "echo bye; exit 3"])).unwrap();
    let started = Instant::now();
    let err = short.wait_for_line("ready", Duration::from_secs(20)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{err:#}");
    assert_eq!(short.wait_exit(T).unwrap().code(), Some(3));
    // After wait_exit, lines() holds everything printed, even output that reaches the pipe
    // after the exit (here from a child the shell left behind): a refused start's last line
    // used to be missed this way.
    let late = lab
        .spawn_in(&gw, Command::new("sh").args(["-c", "(sleep 0.3; echo late >&2) & echo early; exit 4"]))
        .unwrap();
    assert_eq!(late.wait_exit(T).unwrap().code(), Some(4));
    assert_eq!(late.lines(), ["early", "late"]);

    let out = lab.run_in(lab.master_ns(0), "ip", &["-o", "addr", "show", "dev", "lo"]).unwrap();
    assert!(out.contains(&format!("{}/32", lab.vip4())), "{out}");
    let err = lab.run_in(lab.client_ns(), "ip", &["link", "show", "nosuchif"]).unwrap_err();
    assert!(format!("{err:#}").contains("nosuchif"), "{err:#}");
}

#[test]
fn hosts_have_tx_checksum_offload_off() {
    let lab = lab();
    let mut namespaces = vec![lab.client_ns(), lab.gateway_ns()];
    namespaces.extend((0..lab.master_count()).map(|i| lab.master_ns(i)));
    for ns in namespaces {
        let on = in_netns(ns, || mim_lb_tests::netns::tx_checksum_enabled("eth0")).unwrap().unwrap();
        assert!(!on, "tx checksum offload still on in {ns}");
    }
}

#[test]
fn stale_lab_namespaces_are_removed() {
    let lab = Lab::new(LabSpec { masters: 1, ipv6: false, vips: 1, ..LabSpec::default() }).unwrap();
    // A pid that surely is dead: a child that was already reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("mimlb-{dead:x}-stale{:x}-br", std::process::id());
    let ok = mim_lb_tests::output_within(Command::new("ip").args(["netns", "add", &stale]), mim_lb_tests::RUN_TIMEOUT).unwrap().status;
    assert!(ok.success());
    let removed = cleanup_stale_labs().unwrap();
    assert!(removed >= 1);
    assert_eq!(leftover_namespaces(&stale), Vec::<String>::new());
    // This process is alive, so its lab is kept.
    assert_eq!(leftover_namespaces(lab.id()).len(), 4);
}

#[test]
fn masters_hand_out_slaves_in_turn_and_the_client_reaches_them_directly() {
    use mim_lb_tests::master_service::{SlaveOffer, ask_for_slave, greet_slave};
    const SLAVE_PORT: u16 = 9000;
    let mut lab = Lab::new(LabSpec { masters: 2, slaves: 2, ..LabSpec::default() }).unwrap();
    let slaves: Vec<SocketAddr> =
        (0..2).map(|i| SocketAddr::new(lab.slave_addr4(i).into(), SLAVE_PORT)).collect();
    lab.start_slave_servers(SLAVE_PORT).unwrap();
    lab.start_master_service(0, PORT, slaves.clone()).unwrap();

    // Straight to master-1 (no gateway here): it names its slaves in turn, and each slave it
    // names greets the client, which reaches it on the segment, not through a master.
    let master = SocketAddr::new(lab.master_addr4(0).into(), PORT);
    let (offers, greetings) = in_netns(lab.client_ns(), || {
        let offers: Vec<SlaveOffer> = (0..4).map(|_| ask_for_slave(master, T).unwrap()).collect();
        let greetings: Vec<String> = offers.iter().map(|o| greet_slave(o.slave, T).unwrap()).collect();
        (offers, greetings)
    })
    .unwrap();
    let named: Vec<SocketAddr> = offers.iter().map(|o| o.slave).collect();
    assert_eq!(named, [slaves[0], slaves[1], slaves[0], slaves[1]]);
    assert!(offers.iter().all(|o| o.master == "master-1"), "{offers:?}");
    assert_eq!(greetings, ["slave-1", "slave-2", "slave-1", "slave-2"]);
    assert_eq!(lab.slave_served(0).tcp_accepted, 2);

    // Slaves are plain hosts: the VIP is the masters' and the gateway's only.
    let lo = lab.run_in(lab.slave_ns(0), "ip", &["-o", "addr", "show", "dev", "lo"]).unwrap();
    assert!(!lo.contains(&lab.vip4().to_string()), "a slave holds the VIP: {lo}");
    let lo = lab.run_in(lab.master_ns(0), "ip", &["-o", "addr", "show", "dev", "lo"]).unwrap();
    assert!(lo.contains(&lab.vip4().to_string()), "the master lacks the VIP: {lo}");

    // A stopped master service refuses, as a dead process's port does.
    assert_eq!(lab.stop_servers(0, PORT), 1);
    let err = in_netns(lab.client_ns(), || ask_for_slave(master, T).unwrap_err()).unwrap();
    assert_eq!(err.kind(), "refused", "{err}");
}

/// Whether `ns` reaches `to` with one ping (within a second).
fn pings(lab: &Lab, ns: &str, to: std::net::Ipv4Addr) -> bool {
    lab.run_in(ns, "ping", &["-c", "1", "-W", "1", &to.to_string()]).is_ok()
}

/// Whether `ns` reaches `to` within 5 s: after a cut, the neighbour entry may have failed, and
/// ARP tries again only once a second.
fn pings_soon(lab: &Lab, ns: &str, to: std::net::Ipv4Addr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if pings(lab, ns, to) {
            return true;
        }
    }
    false
}

/// Two directors: their own addresses and MACs, no VIP on either (keepalived's to move), the
/// client reaches both; a cut director is unreachable until it is reconnected; partitioned
/// directors reach the client but not each other.
#[test]
fn two_directors_share_the_segment_and_can_be_cut_off_and_partitioned() {
    let lab = Lab::new(LabSpec { directors: 2, ..LabSpec::default() }).unwrap();
    assert_eq!(lab.director_count(), 2);
    assert_eq!(lab.director_ns(0), lab.gateway_ns());
    assert_ne!(lab.director_ns(0), lab.director_ns(1));
    assert_eq!(lab.director_addr4(0).octets()[3], 2);
    assert_eq!(lab.director_addr4(1).octets()[3], 3);
    assert_ne!(lab.director_mac(0), lab.director_mac(1));
    for i in 0..2 {
        assert_eq!(lab.director_addrs4(i).unwrap(), [lab.director_addr4(i)], "director {i}: only its own address");
        assert!(lab.director_connected(i).unwrap());
        assert!(pings(&lab, lab.client_ns(), lab.director_addr4(i)), "the client does not reach director {i}");
    }
    // Nobody holds the VIP yet: the client's ARP for it goes unanswered.
    assert!(!pings(&lab, lab.client_ns(), lab.vip4()));

    lab.cut_director(1).unwrap();
    assert!(!lab.director_connected(1).unwrap());
    assert!(!pings(&lab, lab.client_ns(), lab.director_addr4(1)), "a cut director still answers");
    lab.reconnect_director(1).unwrap();
    assert!(lab.director_connected(1).unwrap());
    assert!(pings_soon(&lab, lab.client_ns(), lab.director_addr4(1)), "a reconnected director does not answer");

    lab.set_directors_partitioned(true).unwrap();
    assert!(!pings(&lab, lab.director_ns(0), lab.director_addr4(1)), "partitioned directors still reach each other");
    assert!(pings(&lab, lab.director_ns(0), lab.client_addr4()) && pings(&lab, lab.director_ns(1), lab.client_addr4()));
    lab.set_directors_partitioned(false).unwrap();
    assert!(pings_soon(&lab, lab.director_ns(0), lab.director_addr4(1)), "healed directors do not reach each other");
}

/// The one-director lab is as it always was: the gateway holds the VIPs, both families.
#[test]
fn one_director_holds_the_vips() {
    let lab = lab();
    assert_eq!(lab.director_count(), 1);
    assert!(lab.director_addrs4(0).unwrap().contains(&lab.vip4()));
    assert!(pings(&lab, lab.client_ns(), lab.vip4()));
}
