//! Two directors in front of the same masters must send every new connection to the same
//! master: their tables are a pure function of the configuration and the masters' health, not
//! of the order things happened in. Each director here is the real program with maps filled
//! by the real control plane; the `table_digest` of `mim-lb status` is what operators compare.

use std::net::{IpAddr, Ipv4Addr};

use mim_lb::config::{Protocol, ServiceKey};
use mim_lb_common::reason;
use mim_lb_tests::{
    packet::{Frame, TCP_SYN},
    testrun::ProgramUnderTest,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const MASTERS: [&str; 4] = ["10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"];

/// A TCP service on the masters, listed in `order`, health-checked (so each starts down and
/// comes up when the test says so).
fn config(order: &[usize]) -> String {
    let mut c = String::from("interface = \"lo\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 7000\n");
    for &i in order {
        c += &format!("[[service.backend]]\naddress = \"{}\"\nmac = \"02:00:00:00:00:{:02x}\"\n", MASTERS[i], 0x11 + i);
    }
    c
}

fn web() -> ServiceKey {
    ServiceKey { vip: VIP.into(), port: 7000, protocol: Protocol::Tcp }
}

fn ip(i: usize) -> IpAddr {
    MASTERS[i].parse().unwrap()
}

/// A director that has applied `config` with every master still down.
fn director(config: &str) -> ProgramUnderTest {
    let mut prog = ProgramUnderTest::unconfigured().unwrap();
    prog.director.apply_config(&mim_lb::config::Config::parse(config).unwrap()).unwrap();
    prog
}

fn set(prog: &mut ProgramUnderTest, i: usize, up: bool) {
    prog.director.set_health(&web(), ip(i), up, "test").unwrap();
}

fn digest(prog: &ProgramUnderTest) -> String {
    prog.director.written()[&web()].digest().to_owned()
}

/// Where each of `n` new connections goes, by master MAC.
fn choices(prog: &ProgramUnderTest, n: u16) -> Vec<[u8; 6]> {
    (0..n)
        .map(|p| {
            let out = prog.run(&Frame::tcp(Ipv4Addr::new(10, 9, (p >> 8) as u8, p as u8), 40000 + p, VIP, 7000, TCP_SYN).bytes()).unwrap();
            assert_eq!(out.verdict, reason::XDP_TX);
            out.bytes[0..6].try_into().unwrap()
        })
        .collect()
}

#[test]
fn two_directors_agree_whatever_order_their_masters_came_up_in() {
    let mut a = director(&config(&[0, 1, 2, 3]));
    let mut b = director(&config(&[3, 1, 0, 2]));
    for i in [0, 1, 2, 3] {
        set(&mut a, i, true);
    }
    for i in [2, 3, 0, 1] {
        set(&mut b, i, true);
    }
    assert_ne!(a.backend_id(&web(), ip(0)), b.backend_id(&web(), ip(0)), "the two directors number the masters alike: the test proves less");
    assert_eq!(digest(&a), digest(&b), "two directors with the same masters up disagree");
    assert_eq!(choices(&a, 2000), choices(&b, 2000), "two directors with equal digests send new connections apart");

    // The same failover on both, then a master back: still one decision.
    set(&mut a, 1, false);
    assert_ne!(digest(&a), digest(&b), "a master's failure left the digest as it was");
    set(&mut b, 1, false);
    assert_eq!(digest(&a), digest(&b));
    set(&mut b, 1, true);
    set(&mut a, 1, true);
    assert_eq!(digest(&a), digest(&b));
    assert_eq!(choices(&a, 2000), choices(&b, 2000));
    // The status the operator reads shows it.
    let status_digest = |p: &ProgramUnderTest| {
        let facts = mim_lb::status::DaemonFacts {
            interface: "lo",
            xdp_mode: "test".into(),
            pin_dir: String::new(),
            uptime: std::time::Duration::ZERO,
            checks: &Default::default(),
        };
        mim_lb::status::collect(&p.director, &facts).unwrap().services[0].table_digest.clone()
    };
    assert_eq!(status_digest(&a), digest(&a));
    assert_eq!(status_digest(&a), status_digest(&b));
}

/// A director restarted over its pins reads its table back with the same digest.
#[test]
fn a_restarted_director_shows_the_same_digest() {
    let full = config(&[0, 1, 2, 3]).replace("port = 7000\n", "port = 7000\nhealth = { check = \"none\" }\n");
    let mut prog = ProgramUnderTest::pinned(&full).unwrap();
    let before = digest(&prog);
    assert_eq!(before.len(), 16);
    prog.restart(&full, mim_lb_tests::testrun::GATEWAY_MAC).unwrap();
    assert_eq!(digest(&prog), before);
}
