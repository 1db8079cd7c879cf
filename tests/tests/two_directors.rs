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
            held: None,
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

/// The destination MAC `prog` gives a TCP packet of flow `n` with `flags`.
fn mac_of(prog: &ProgramUnderTest, n: u16, flags: u8) -> [u8; 6] {
    let src = Ipv4Addr::new(10, 9, (n >> 8) as u8, n as u8);
    let out = prog.run(&Frame::tcp(src, 40000 + n, VIP, 7000, flags).bytes()).unwrap();
    assert_eq!(out.verdict, reason::XDP_TX);
    out.bytes[0..6].try_into().unwrap()
}

/// A flow recorded on one director while the other has not seen a master change yet (its
/// health checks lag) reaches the same master on both once the record is shared: the import
/// marks the slot where the receiving director had it clean. Without the import, the second
/// director sends the flow to the master its own table names, and the connection breaks on
/// a failover.
#[test]
fn a_shared_record_sends_an_established_flow_where_the_peer_sent_it() {
    use mim_lb::director::sweep::monotonic_ns;
    use mim_lb_tests::packet::TCP_ACK;
    let mut a = director(&config(&[0, 1, 2, 3]));
    let mut b = director(&config(&[0, 1, 2, 3]));
    for i in 0..4 {
        set(&mut a, i, true);
        set(&mut b, i, true);
    }
    // Only A has seen master 0 fail so far. New connections on its former slots are recorded.
    set(&mut a, 0, false);
    // B sees no SYN (A carries the traffic): its choice is read off its table.
    let b_choice = |b: &ProgramUnderTest, n: u16| {
        let src = IpAddr::V4(Ipv4Addr::new(10, 9, (n >> 8) as u8, n as u8));
        b.master_mac(&web(), b.table_master(&web(), src, 40000 + n, 7000).unwrap())
    };
    let moved: Vec<(u16, [u8; 6])> =
        (0..600).map(|n| (n, mac_of(&a, n, TCP_SYN))).filter(|&(n, mac)| b_choice(&b, n) != mac).collect();
    assert!(moved.len() > 50, "only {} connections moved off master 0", moved.len());
    for &(n, mac) in &moved {
        assert_ne!(mac_of(&b, n, TCP_ACK), mac, "before sharing, B sends flow {n} by its own table");
    }

    let unrecorded_before: Vec<[u8; 6]> = (600..1200).map(|n| mac_of(&b, n, TCP_ACK)).collect();
    let flows = a.director.dataplane().maps_ro().flows().unwrap();
    let now = monotonic_ns();
    let records = a.director.export_records(&flows, now);
    assert!(records.len() >= moved.len(), "A records (at least) the connections on changed slots");
    let report = b.director.import_records(&records, now).unwrap();
    assert_eq!(report.written, records.len());
    assert!(report.slots_marked > 0, "{report:?}");
    for &(n, mac) in &moved {
        assert_eq!(mac_of(&b, n, TCP_ACK), mac, "flow {n} after sharing");
        assert_eq!(mac_of(&a, n, TCP_ACK), mac);
    }
    // Flows nobody recorded go where they went before the import (a slot the import marks
    // keeps sending them to its master, as the clean slot did).
    let unrecorded_after: Vec<[u8; 6]> = (600..1200).map(|n| mac_of(&b, n, TCP_ACK)).collect();
    assert_eq!(unrecorded_after, unrecorded_before);
    // A record B holds newer than the one shared is kept.
    let again = b.director.import_records(&records, now - 1_000_000_000).unwrap();
    assert_eq!(again.kept_local, records.len());
}

/// The director's count of marked slots of the service.
fn marked(prog: &ProgramUnderTest) -> usize {
    prog.director.written()[&web()].marked()
}

/// When one director's sweep clears marks, a peer holding the same marks clears them too, so
/// that the two keep sending the slots' unrecorded flows to the same master; marks that differ
/// (another previous master) are left alone.
#[test]
fn marks_a_peer_cleared_are_cleared_where_they_are_alike() {
    use mim_lb::director::sweep::monotonic_ns;
    let mut a = director(&config(&[0, 1, 2, 3]));
    let mut b = director(&config(&[0, 1, 2, 3]));
    let mut c = director(&config(&[0, 1, 2, 3]));
    for i in 0..4 {
        set(&mut a, i, true);
        set(&mut b, i, true);
    }
    // C saw its masters come up in another order: other previous masters on some slots.
    for i in [3, 2, 1, 0] {
        set(&mut c, i, true);
    }
    for p in [&mut a, &mut b, &mut c] {
        set(p, 1, false);
    }
    assert!(marked(&a) > 0);
    assert_eq!(a.director.written()[&web()].table(), b.director.written()[&web()].table());

    let later = monotonic_ns() + 10_000_000_000;
    let idle = std::time::Duration::from_secs(1);
    let report = a.director.sweep_with(&[], later, idle, idle).unwrap();
    assert_eq!(marked(&a), 0, "{report:?}");
    let before_c = marked(&c);
    let wire: Vec<_> = report.cleared.iter().map(|(service, size, entries)| (*service, *size, a.director.wire_marks(service, entries))).collect();
    // Before its own first sweep, a director clears nothing on a peer's word.
    for (service, size, marks) in &wire {
        assert_eq!(b.director.import_cleared(service, *size, marks, later).unwrap(), 0);
    }
    // Nor while its own flows use the marks: B sends unrecorded flows to the previous master.
    // A sweep of its own first (one whose read began at time 0 clears nothing, whatever
    // time the test has taken so far).
    b.director.sweep_with(&[], 0, idle, idle).unwrap();
    let seen_now = (monotonic_ns() >> mim_lb_common::limits::SEEN_SHIFT) as u32;
    let w = &b.director.written()[&web()];
    let id = w.id;
    let stamps: Vec<(u32, u32)> = (0..w.table_size).filter(|s| mim_lb::director::marks::is_marked(w.table()[*s as usize])).map(|s| (s, seen_now)).collect();
    let stamped = stamps.len();
    b.director.dataplane_mut().maps().set_slot_seen(id, &stamps).unwrap();
    for (service, size, marks) in &wire {
        assert_eq!(b.director.import_cleared(service, *size, marks, monotonic_ns()).unwrap(), 0, "B cleared marks its own flows use");
    }
    assert_eq!(marked(&b), stamped);
    // Once its own facts allow it too, it follows.
    c.director.sweep_with(&[], 0, idle, idle).unwrap();
    for (service, size, marks) in &wire {
        b.director.import_cleared(service, *size, marks, later + 5_000_000_000).unwrap();
        c.director.import_cleared(service, *size, marks, later + 5_000_000_000).unwrap();
    }
    assert_eq!(marked(&b), 0, "B held the same marks");
    assert_eq!(a.director.written()[&web()].table(), b.director.written()[&web()].table());
    // C's marks remember another previous master (the first to come up there): left alone.
    assert_eq!(marked(&c), before_c, "C cleared marks it does not hold alike");

    // After a peer's whole state with the same table, marks the peer did not report go,
    // unless this director's own flows use them.
    let none = std::collections::HashMap::new();
    let w = &c.director.written()[&web()];
    let (id, stamped_slot) = (w.id, (0..w.table_size).find(|s| mim_lb::director::marks::is_marked(w.table()[*s as usize])).unwrap());
    let now = monotonic_ns();
    c.director.dataplane_mut().maps().set_slot_seen(id, &[(stamped_slot, (now >> mim_lb_common::limits::SEEN_SHIFT) as u32)]).unwrap();
    c.director.settle_marks_after_pull(&[web()], &none, &[], now, idle).unwrap();
    assert_eq!(marked(&c), 1, "the one slot an unrecorded flow of C's own just used keeps its mark");
    c.director.settle_marks_after_pull(&[web()], &none, &[], now + 10_000_000_000, idle).unwrap();
    assert_eq!(marked(&c), 0);
}
