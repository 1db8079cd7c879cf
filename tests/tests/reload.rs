//! What CONFIG.md ("What a reload can and cannot change") and OPERATIONS.md ("Backend
//! states") promise of a reload, proved packet by packet: the real XDP program under
//! BPF_PROG_TEST_RUN with its maps filled by the real control plane, which the daemon's
//! reload drives (`Director::apply_config`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use mim_lb::{
    config::{Config, Protocol, ServiceKey},
    director::{Admin, monotonic_ns},
    status::{DaemonFacts, Status},
};
use mim_lb_common::reason;
use mim_lb_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    testrun::ProgramUnderTest,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// `[[service]] name` on VIP:`port`, with the masters 10.0.0.`n` for each `n` of `masters`.
fn service(name: &str, port: u16, masters: &[u8]) -> String {
    let mut text = format!("\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\n");
    for n in masters {
        text += &format!("[[service.backend]]\naddress = \"10.0.0.{n}\"\nmac = \"02:00:00:00:00:{n:02x}\"\n");
    }
    text
}

fn config(services: &[String]) -> String {
    format!("interface = \"lo\"\n{}", services.concat())
}

fn key(port: u16) -> ServiceKey {
    ServiceKey { vip: VIP.into(), port, protocol: Protocol::Tcp }
}

fn master(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 0, 0, n).into()
}

/// The master a frame of the client's flow from `sport` to `port` is sent to.
fn sent_to(prog: &ProgramUnderTest, port: u16, sport: u16, flags: u8) -> IpAddr {
    let out = prog.run(&Frame::tcp(CLIENT, sport, VIP, port, flags).bytes()).unwrap();
    assert_eq!(out.verdict, reason::XDP_TX, "port {port} from {sport}");
    let mac: [u8; 6] = out.bytes[0..6].try_into().unwrap();
    let backends = &prog.director.desired()[&key(port)].backends;
    *backends.iter().find(|(_, b)| b.mac() == Some(mac)).expect("the MAC of one of the service's masters").0
}

/// What `mim-lb status` would show, read from the maps as the daemon reads them.
fn status(prog: &ProgramUnderTest) -> Status {
    let checks = BTreeMap::new();
    let facts = DaemonFacts { interface: "lo", xdp_mode: "generic".into(), pin_dir: String::new(), uptime: Duration::ZERO, checks: &checks, held: None };
    mim_lb::status::collect(&prog.director, &facts).unwrap()
}

fn state(status: &Status, port: u16, backend: IpAddr) -> String {
    let s = status.services.iter().find(|s| s.port == port).expect("the service in the status");
    s.backends.iter().find(|b| b.address == backend).expect("the backend in the status").state.clone()
}

/// The operator drains one master and disables another; a reload that changes the group
/// (another master re-weighted, one added) keeps both: no new flow reaches either, and the
/// drained one keeps its established flows. Fails if a reload rebuilds a backend that stays
/// from the file alone (admin back to enabled).
#[test]
fn a_reload_keeps_the_operators_drain_and_disable() {
    let mut prog = ProgramUnderTest::new(&config(&[service("web", 7000, &[11, 12, 13])])).unwrap();
    let on_drained: Vec<u16> = (20000..20300).filter(|&p| sent_to(&prog, 7000, p, TCP_SYN) == master(11)).collect();
    assert!(on_drained.len() > 30, "too few flows on the master to drain");
    prog.director.set_admin(&key(7000), master(11), Admin::Drained).unwrap();
    prog.director.set_admin(&key(7000), master(12), Admin::Disabled).unwrap();

    let changed = config(&[service("web", 7000, &[11, 12, 13, 14]).replacen(
        "mac = \"02:00:00:00:00:0d\"\n",
        "mac = \"02:00:00:00:00:0d\"\nweight = 300\n",
        1,
    )]);
    assert!(changed.contains("weight = 300"), "the reload must change something");
    // The added master comes up (as its checks would make it): the table is rebuilt from
    // the backends the reload produced, so a forgotten drain or disable would show.
    prog.apply(&changed).unwrap();

    let after = status(&prog);
    assert_eq!(state(&after, 7000, master(11)), "draining");
    assert_eq!(state(&after, 7000, master(12)), "disabled");
    for &p in &on_drained {
        assert_eq!(sent_to(&prog, 7000, p, TCP_ACK), master(11), "a drained master's flow from {p} moved");
    }
    let mut reached = std::collections::BTreeSet::new();
    for p in 30000..30400 {
        reached.insert(sent_to(&prog, 7000, p, TCP_SYN));
    }
    assert_eq!(reached, [master(13), master(14)].into(), "new flows after the reload");
}

/// A service left out of the file is gone at once: not in the status, and every frame to
/// its VIP:port, new or of a flow it had, is passed unchanged as `not_a_service` (to the
/// gateway's kernel). The service that stays keeps forwarding. Fails if a removed service
/// lingers like a removed backend, or its index entry is left behind.
#[test]
fn a_service_removed_by_reload_is_gone_at_once() {
    let both = config(&[service("web", 7000, &[11, 12]), service("api", 7001, &[11, 12])]);
    let mut prog = ProgramUnderTest::new(&both).unwrap();
    let established: Vec<u16> = (21000..21050).collect();
    for &p in &established {
        sent_to(&prog, 7001, p, TCP_SYN);
    }
    prog.apply(&config(&[service("web", 7000, &[11, 12])])).unwrap();

    assert!(status(&prog).services.iter().all(|s| s.port != 7001), "the removed service is still in the status");
    let before = prog.reason_packets(reason::NOT_A_SERVICE).unwrap();
    let mut sent = 0;
    for &p in &established {
        for flags in [TCP_ACK, TCP_SYN] {
            let input = Frame::tcp(CLIENT, p, VIP, 7001, flags).bytes();
            let out = prog.run(&input).unwrap();
            assert_eq!((out.verdict, &out.bytes), (reason::XDP_PASS, &input), "a frame to the removed service from {p}");
            sent += 1;
        }
    }
    assert_eq!(prog.reason_packets(reason::NOT_A_SERVICE).unwrap() - before, sent);
    for p in 22000..22020 {
        sent_to(&prog, 7000, p, TCP_SYN);
    }
}

/// 4095 masters in one service, as many as there are backend ids, none checked (up at once).
/// Master `k` is 10.1.(k / 256).(k % 256).
fn full_config(masters: impl Iterator<Item = u32>) -> String {
    let mut text = format!("interface = \"lo\"\n[[service]]\nname = \"big\"\nvip = \"{VIP}\"\nport = 7000\n[service.health]\ncheck = \"none\"\n");
    for k in masters {
        let (hi, lo) = ((k >> 8) as u8, k as u8);
        text += &format!("[[service.backend]]\naddress = \"10.1.{hi}.{lo}\"\nmac = \"02:00:00:01:{hi:02x}:{lo:02x}\"\n");
    }
    text
}

/// One master of 4095 is left out by a reload: it is `removing`, and keeps its id while its
/// flows may live. A second reload that adds a new master needs a 4096th id: it is refused
/// whole, naming the reason, and nothing changes (desired state, table, status, where new
/// flows go). Once the removed master is retired, the same file applies. Fails if a removing
/// backend's id is handed out again, or a refused reload leaves part of itself applied.
#[test]
fn a_reload_that_runs_out_of_backend_ids_is_refused_whole() {
    let max = mim_lb_common::limits::MAX_BACKENDS - 1;
    let mut prog = ProgramUnderTest::new(&full_config(0..max)).unwrap();
    let (removed, added): (IpAddr, IpAddr) = (Ipv4Addr::new(10, 1, 0, 0).into(), Ipv4Addr::new(10, 1, 15, 255).into());
    prog.apply(&full_config(1..max)).unwrap();
    assert_eq!(state(&status(&prog), 7000, removed), "removing");
    let desired_before = prog.director.desired().clone();
    let table_before = prog.director.written()[&key(7000)].table().to_vec();
    let status_before = status(&prog);

    let next = Config::parse(&full_config(1..=max)).expect("4095 masters are a valid file");
    let err = prog.director.apply_config(&next).expect_err("a reload needing 4096 backend ids was applied");
    assert!(err.to_string().contains("no free backend id"), "{err}");

    assert!(prog.director.desired() == &desired_before, "the refused reload changed the desired state");
    assert_eq!(prog.director.written()[&key(7000)].table(), &table_before[..], "the refused reload changed the table");
    let status_after = status(&prog);
    assert_eq!(state(&status_after, 7000, removed), "removing");
    assert!(status_after.services[0].backends.iter().all(|b| b.address != added), "the refused reload added a master");
    assert_eq!(status_after.services[0].backends.len(), status_before.services[0].backends.len());
    for p in 20000..20200 {
        let want = prog.table_master(&key(7000), CLIENT.into(), p, 7000).unwrap();
        assert_eq!(sent_to(&prog, 7000, p, TCP_SYN), want, "flow from {p}");
    }

    // Retired (no flow was ever recorded on it), its id is free, and the same file applies.
    let far = monotonic_ns() + 3_600_000_000_000;
    prog.director.sweep(far, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    prog.director.apply_config(&next).expect("the reload once the removed master is retired");
    assert!(prog.director.desired()[&key(7000)].backends.contains_key(&added));
}

/// Sends `n` SYNs of new flows to `port`; returns how many reached `backend`.
fn syns(prog: &ProgramUnderTest, port: u16, first: u16, n: u16, backend: IpAddr) -> u64 {
    (first..first + n).filter(|&p| sent_to(prog, port, p, TCP_SYN) == backend).count() as u64
}

/// A service removed and added again, and a new master given the id of a retired one, start
/// their counters at 0 (status and per-id stats), then count only their own traffic. Fails
/// if a reused id inherits what its previous owner counted.
#[test]
fn counters_of_a_reused_service_or_backend_id_restart_at_0() {
    let both = [service("web", 7000, &[11, 12, 13]), service("api", 7001, &[11, 12])];
    let mut prog = ProgramUnderTest::new(&config(&both)).unwrap();
    let (api_id, m13_id) = (prog.service_id(&key(7001)), prog.backend_id(&key(7000), master(13)));
    syns(&prog, 7001, 20000, 50, master(11));
    let to_13 = syns(&prog, 7000, 20000, 300, master(13));
    assert!(to_13 > 0 && prog.director.dataplane().maps_ro().service_stats(api_id).unwrap().packets == 50);

    // The service goes and comes back; master 13 goes, is retired, and master 14 comes.
    prog.apply(&config(&[both[0].clone()])).unwrap();
    prog.apply(&config(&both)).unwrap();
    prog.apply(&config(&[service("web", 7000, &[11, 12]), both[1].clone()])).unwrap();
    let far = monotonic_ns() + 3_600_000_000_000;
    prog.director.sweep(far, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    assert!(!prog.director.desired()[&key(7000)].backends.contains_key(&master(13)), "master 13 was not retired");
    prog.apply(&config(&[service("web", 7000, &[11, 12, 14]), both[1].clone()])).unwrap();
    assert_eq!(prog.service_id(&key(7001)), api_id, "the service did not get its id back: the test proves nothing");
    assert_eq!(prog.backend_id(&key(7000), master(14)), m13_id, "master 14 did not get 13's id: the test proves nothing");

    let stats = prog.director.dataplane().maps_ro();
    let (svc, backend) = (stats.service_stats(api_id).unwrap(), stats.backend_stats(m13_id).unwrap());
    assert_eq!((svc.packets, svc.bytes, svc.new_flows), (0, 0, 0), "the recreated service's counters");
    assert_eq!((backend.packets, backend.bytes, backend.new_flows), (0, 0, 0), "the reused backend id's counters");
    let s = status(&prog);
    let api = s.services.iter().find(|s| s.port == 7001).unwrap();
    assert_eq!((api.packets, api.new_flows), (0, 0), "status of the recreated service");
    let web = s.services.iter().find(|s| s.port == 7000).unwrap();
    let b14 = web.backends.iter().find(|b| b.address == master(14)).unwrap();
    assert_eq!((b14.packets, b14.new_flows), (0, 0), "status of the new master");

    // From 0, they count what they are sent.
    let to_14 = syns(&prog, 7000, 40000, 300, master(14));
    syns(&prog, 7001, 40000, 7, master(11));
    let stats = prog.director.dataplane().maps_ro();
    assert_eq!(stats.backend_stats(m13_id).unwrap().new_flows, to_14);
    assert_eq!(stats.service_stats(api_id).unwrap().new_flows, 7);
}
