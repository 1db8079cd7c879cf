//! Path-MTU discovery for the masters' answers (OPERATIONS.md, "MTU, ICMP and fragments"): a
//! router between the gateway's segment and a client, with a smaller MTU towards the client,
//! answers a master's large segments with ICMP "fragmentation needed" addressed to the VIP;
//! the gateway relays it to the master, which sends smaller segments, and the client gets the
//! whole answer. Without the relay the answer stalls (a path-MTU black hole).

use std::net::IpAddr;

use mim_lb_tests::{
    Lab, LabSpec, run_in,
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
/// The answer's size: many full-sized segments.
const ANSWER: usize = 200_000;

/// A namespace that is deleted on drop, named like the lab's so `cargo xtask test` removes it
/// if the test is killed.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(ns: &str, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    run_in(ns, "ip", &args).unwrap_or_else(|e| panic!("ip {args:?} in {ns}: {e:#}"));
}

#[test]
fn a_masters_large_answer_reaches_a_client_behind_a_smaller_mtu_ipv4() {
    large_answer_through_a_smaller_mtu(false);
}

#[test]
fn a_masters_large_answer_reaches_a_client_behind_a_smaller_mtu_ipv6() {
    large_answer_through_a_smaller_mtu(true);
}

/// The lab's client namespace becomes the router: a far client behind it whose own link has
/// an MTU of 1500 (so it announces an MSS for 1500), while the router's side of that link
/// has 1200 (IPv4) or 1280 (IPv6): the masters' full-sized answers do not fit.
fn large_answer_through_a_smaller_mtu(v6: bool) {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    // Each master answers any connection with ANSWER bytes, once it has read a request.
    let server = format!(
        "import socket, threading\n\
         s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
         s.bind(('::', {PORT})); s.listen(64)\n\
         def serve(c):\n    try:\n        if c.recv(100): c.sendall(b'x' * {ANSWER})\n    except OSError: pass\n    finally: c.close()\n\
         while True:\n    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
    );
    for i in 0..lab.master_count() {
        let ns = lab.master_ns(i).to_owned();
        lab.spawn_in(&ns, std::process::Command::new("/usr/bin/python3").args(["-c", &server])).unwrap();
    }

    let client = lab.client_ns().to_owned();
    let far = Netns(format!("mimlb-{}-far", lab.id()));
    std::process::Command::new("ip").args(["netns", "add", &far.0]).status().unwrap();
    let mtu = if v6 { 1280 } else { 1200 };
    ip(&client, &format!("link add rt0 mtu {mtu} type veth peer name eth0 netns {}", far.0));
    ip(&far.0, "link set lo up");
    let (far_net, far_addr, vip, router) = if v6 {
        run_in(&client, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]).unwrap();
        ip(&client, "addr add fd77::1/64 dev rt0 nodad");
        ip(&far.0, "addr add fd77::2/64 dev eth0 nodad");
        ("fd77::/64", "fd77::2", IpAddr::from(lab.vip6().unwrap()), lab.client_addr6().unwrap().to_string())
    } else {
        run_in(&client, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
        ip(&client, "addr add 10.77.0.1/24 dev rt0");
        ip(&far.0, "addr add 10.77.0.2/24 dev eth0");
        ("10.77.0.0/24", "10.77.0.2", IpAddr::from(lab.vip4()), lab.client_addr4().to_string())
    };
    ip(&client, "link set rt0 up");
    ip(&far.0, "link set eth0 up");
    ip(&far.0, if v6 { "-6 route add default via fd77::1" } else { "route add default via 10.77.0.1" });
    for i in 0..lab.master_count() {
        let ns = lab.master_ns(i).to_owned();
        ip(&ns, &format!("route add {far_net} via {router}"));
    }

    let service = ServiceSpec { vip, ..ServiceSpec::tcp(&lab, PORT) };
    let config = lab_config(&lab, &[service], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();

    let fetch = format!(
        "import socket\n\
         s = socket.create_connection(('{vip}', {PORT}), timeout=5); s.sendall(b'go')\n\
         n = 0\n\
         while n < {ANSWER}:\n    d = s.recv(65536)\n    if not d: break\n    n += len(d)\n\
         print(n)\n"
    );
    for round in 0..3 {
        let got = run_in(&far.0, "/usr/bin/python3", &["-c", &fetch])
            .unwrap_or_else(|e| panic!("fetch {round} from {far_addr}: the answer stalled: {e:#}"));
        assert_eq!(got.trim(), ANSWER.to_string(), "fetch {round}");
    }
    let relayed = gw.status().unwrap().reasons.iter().find(|r| r.name == "icmp_error_forwarded").map_or(0, |r| r.packets);
    assert!(relayed > 0, "no ICMP error was relayed: the path MTU was learnt some other way");
}
