//! The flow invariant, packet by packet: the real XDP program under BPF_PROG_TEST_RUN with its
//! maps filled by the real control plane. An established flow whose master is up or draining
//! never moves; a SYN always follows the current table and never reaches a master that is
//! draining, disabled or down; the connection table records only what the table cannot
//! reproduce, so neither reused ports nor floods of new flows can move an established one.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use mim_lb::{
    config::{Protocol, ServiceKey},
    director::{Admin, monotonic_ns},
};
use mim_lb_common::reason;
use mim_lb_tests::{
    packet::{Frame, TCP_ACK, TCP_PSH, TCP_SYN},
    testrun::ProgramUnderTest,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const M1: &str = "10.0.0.11";
const M2: &str = "10.0.0.12";
const M3: &str = "10.0.0.13";

const TWO_MASTERS: &str = r#"
interface = "lo"

[[service]]
name = "web"
vip = "10.0.0.100"
port = 7000
[[service.backend]]
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
[[service.backend]]
address = "10.0.0.12"
mac = "02:00:00:00:00:12"
"#;

fn three_masters() -> String {
    format!("{TWO_MASTERS}[[service.backend]]\naddress = \"10.0.0.13\"\nmac = \"02:00:00:00:00:13\"\n")
}

fn web() -> ServiceKey {
    ServiceKey { vip: VIP.into(), port: 7000, protocol: Protocol::Tcp }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The MAC a frame of the client's flow from `sport` is sent to, with `flags`.
fn send(prog: &ProgramUnderTest, sport: u16, flags: u8) -> [u8; 6] {
    let out = prog.run(&Frame::tcp(CLIENT, sport, VIP, 7000, flags).bytes()).unwrap();
    assert_eq!(out.verdict, reason::XDP_TX, "port {sport}: {:?}", out.verdict);
    out.bytes[0..6].try_into().unwrap()
}

/// The master (by address) whose MAC `mac` is.
fn master_of(prog: &ProgramUnderTest, mac: [u8; 6]) -> IpAddr {
    let desired = &prog.director.desired()[&web()];
    *desired.backends.iter().find(|(_, b)| b.mac() == Some(mac)).expect("a master's MAC").0
}

/// Clears every mark the control plane left while it filled the maps (masters come up one by
/// one, as in the daemon), as the sweep does once its timeouts have passed.
fn settle(prog: &mut ProgramUnderTest) {
    settle_key(prog, &web());
}

fn settle_key(prog: &mut ProgramUnderTest, key: &ServiceKey) {
    let idle = Duration::from_secs(1);
    let far = monotonic_ns() + 3_600_000_000_000;
    prog.director.sweep(far, idle, idle).unwrap();
    assert_eq!(prog.director.written()[key].marked(), 0, "the sweep left marks on a settled table");
}

fn recorded_flows(prog: &ProgramUnderTest) -> usize {
    prog.director.dataplane().maps_ro().flows().unwrap().len()
}

/// Reused client ports after a master was added, then after one was drained (the measured
/// defect: 28 and 50 of 90 connections broke). The same ports connect again once the old
/// connections are over: each SYN and the ACK after it must reach the same master, the one the
/// current table names, and never the drained one.
#[test]
fn reused_ports_follow_the_current_table_after_an_add_and_a_drain() {
    let mut prog = ProgramUnderTest::new(TWO_MASTERS).unwrap();
    let ports: Vec<u16> = (41000..41090).collect();
    // The first connections, recorded while the control plane's first marks are there.
    for &p in &ports {
        let syn = send(&prog, p, TCP_SYN);
        assert_eq!(send(&prog, p, TCP_ACK), syn);
    }
    prog.apply(&three_masters()).unwrap();
    settle(&mut prog);
    for &p in &ports {
        let want = prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap();
        let syn = send(&prog, p, TCP_SYN);
        assert_eq!(master_of(&prog, syn), want, "port {p}: a SYN followed an old record, not the table");
        assert_eq!(send(&prog, p, TCP_ACK | TCP_PSH), syn, "port {p}: the ACK after the SYN went elsewhere");
    }

    prog.director.set_admin(&web(), ip(M3), Admin::Drained).unwrap();
    let drained = prog.master_mac(&web(), ip(M3));
    let mut moved_by_drain = 0;
    for &p in &ports {
        let syn = send(&prog, p, TCP_SYN);
        assert_ne!(syn, drained, "port {p}: a new connection reached the drained master");
        assert_eq!(send(&prog, p, TCP_ACK), syn, "port {p}: the ACK after the SYN went elsewhere");
        moved_by_drain += (prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap() != ip(M3)) as usize;
    }
    assert!(moved_by_drain > 20, "the drain moved too few ports to prove anything");
}

/// A SYN on a clean slot records nothing; its flow stays on its master when the slot later
/// changes (added master, drain), because the marked slot remembers its previous master.
#[test]
fn unrecorded_flows_keep_their_master_when_their_slot_changes() {
    let mut prog = ProgramUnderTest::new(TWO_MASTERS).unwrap();
    settle(&mut prog);
    let before = recorded_flows(&prog);
    let flows: Vec<(u16, [u8; 6])> = (42000..42300).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    assert_eq!(recorded_flows(&prog), before, "SYNs on clean slots were recorded");

    prog.apply(&three_masters()).unwrap();
    let marked = prog.director.written()[&web()].marked();
    assert!(marked > 1000, "adding a master marked only {marked} slots");
    let mut on_moved_slots = 0;
    for &(p, mac) in &flows {
        assert_eq!(send(&prog, p, TCP_ACK), mac, "port {p}: an established flow moved when a master was added");
        on_moved_slots += (prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap() == ip(M3)) as usize;
    }
    assert!(on_moved_slots > 30, "too few flows on slots that moved: the test proves nothing");

    // New connections on the moved slots go to the new master, and stay there.
    for p in 43000..43300u16 {
        let syn = send(&prog, p, TCP_SYN);
        assert_eq!(master_of(&prog, syn), prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap());
        assert_eq!(send(&prog, p, TCP_ACK), syn);
    }

    // Draining the first master: its unrecorded flows stay with it.
    prog.director.set_admin(&web(), ip(M1), Admin::Drained).unwrap();
    let m1 = prog.master_mac(&web(), ip(M1));
    let mut kept = 0;
    for &(p, mac) in &flows {
        assert_eq!(send(&prog, p, TCP_ACK), mac, "port {p}: an established flow moved when a master was drained");
        kept += (mac == m1) as usize;
    }
    assert!(kept > 30, "too few flows on the drained master: the test proves nothing");
}

/// A SYN flood of 4x the connection table's size from spoofed sources, then a drain: no
/// established flow moves. On a settled table the flood records nothing at all. After the
/// drain, a third of the slots are marked and record their SYNs: flows opened then are
/// recorded, and those that keep talking keep their records through a second flood of 4x
/// the table, as in a design that looks the table up on every packet; a last change (the
/// master enabled again) moves none of them either.
#[test]
fn a_syn_flood_of_four_times_the_table_moves_no_established_flow() {
    const TABLE: u32 = 1024;
    let mut prog = ProgramUnderTest::with_flow_table(&three_masters(), TABLE).unwrap();
    settle(&mut prog);
    let established: Vec<(u16, [u8; 6])> = (44000..44300).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    for i in 0..4 * TABLE {
        let src = Ipv4Addr::from(0x0a50_0000 + i);
        let out = prog.run(&Frame::tcp(src, 1024 + (i % 50_000) as u16, VIP, 7000, TCP_SYN).bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_TX);
    }
    assert_eq!(recorded_flows(&prog), 0, "a flood of SYNs on a settled table filled the connection table");

    prog.director.set_admin(&web(), ip(M2), Admin::Drained).unwrap();
    let busy: Vec<(u16, [u8; 6])> = (44500..44800).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    let recorded = recorded_flows(&prog);
    assert!(recorded > 50, "only {recorded} of the flows opened after the drain were recorded");
    for chunk in 0..(4 * TABLE / 64) {
        for i in 0..64 {
            let n = chunk * 64 + i;
            prog.run(&Frame::tcp(Ipv4Addr::from(0x0a60_0000 + n), 2048, VIP, 7000, TCP_SYN).bytes()).unwrap();
        }
        for &(p, mac) in &busy {
            assert_eq!(send(&prog, p, TCP_ACK | TCP_PSH), mac, "port {p}: a busy recorded flow moved during the flood");
        }
    }
    prog.director.set_admin(&web(), ip(M2), Admin::Enabled).unwrap();
    let m2 = prog.master_mac(&web(), ip(M2));
    let mut on_drained = 0;
    for &(p, mac) in established.iter().chain(&busy) {
        assert_eq!(send(&prog, p, TCP_ACK), mac, "port {p}: an established flow moved after a SYN flood and two changes");
        on_drained += (mac == m2) as usize;
    }
    assert!(on_drained > 30, "too few flows on the drained master: the test proves nothing");
}

/// A flow recorded after the sweep began reading the connection table, on a slot a later
/// commit changed, keeps its master: the sweep does not clear a mark its read cannot speak for.
#[test]
fn a_sweep_racing_a_commit_keeps_the_marks_new_flows_need() {
    let idle = Duration::from_millis(200);
    let mut prog = ProgramUnderTest::new(&three_masters()).unwrap();
    settle(&mut prog);
    prog.director.set_admin(&web(), ip(M3), Admin::Drained).unwrap();
    std::thread::sleep(idle * 2);

    // The sweep's read begins: nothing recorded yet.
    let read_ns = monotonic_ns();
    let snapshot = prog.director.dataplane().maps_ro().flows().unwrap();
    // While it reads: new connections on the drained master's old slots are recorded on their
    // new masters, and the operator enables the master again, moving those slots back to it.
    let m3 = prog.master_mac(&web(), ip(M3));
    let fresh: Vec<(u16, [u8; 6])> = (45000..45600)
        .filter(|&p| prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap() != ip(M3))
        .map(|p| (p, send(&prog, p, TCP_SYN)))
        .collect();
    prog.director.set_admin(&web(), ip(M3), Admin::Enabled).unwrap();
    let back_on_m3: Vec<&(u16, [u8; 6])> =
        fresh.iter().filter(|(p, _)| prog.table_master(&web(), CLIENT.into(), *p, 7000).unwrap() == ip(M3)).collect();
    assert!(back_on_m3.len() > 20, "too few flows on slots that moved back: the test proves nothing");

    prog.director.sweep_with(&snapshot, read_ns, idle, idle).unwrap();
    for (p, mac) in back_on_m3 {
        assert_ne!(*mac, m3);
        assert_eq!(send(&prog, *p, TCP_ACK), *mac, "port {p}: a flow recorded during the sweep's read moved");
    }
}

/// A table size change by reload keeps every established flow, recorded or not, and new
/// connections follow the new table.
#[test]
fn a_resize_keeps_established_flows_and_new_ones_follow_the_new_table() {
    let mut prog = ProgramUnderTest::new(&three_masters()).unwrap();
    settle(&mut prog);
    let flows: Vec<(u16, [u8; 6])> = (46000..46400).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    prog.apply(&three_masters().replace("port = 7000\n", "port = 7000\ntable_size = 251\n")).unwrap();
    assert_eq!(prog.director.written()[&web()].table_size, 251);
    assert!(prog.director.written()[&web()].resized());
    let mut moved_slots = 0;
    for &(p, mac) in &flows {
        assert_eq!(send(&prog, p, TCP_ACK), mac, "port {p}: an established flow moved on a resize");
        moved_slots += (prog.master_mac(&web(), prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap()) != mac) as usize;
    }
    assert!(moved_slots > 50, "the resize moved too few flows' slots to prove anything");
    for p in 47000..47300u16 {
        let syn = send(&prog, p, TCP_SYN);
        assert_eq!(master_of(&prog, syn), prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap());
        assert_eq!(send(&prog, p, TCP_ACK), syn, "port {p}: a new flow after the resize moved");
    }
    // A master drained while the service is still resized: its flows stay with it.
    prog.director.set_admin(&web(), ip(M1), Admin::Drained).unwrap();
    for &(p, mac) in &flows {
        assert_eq!(send(&prog, p, TCP_ACK), mac, "port {p}: an established flow moved on a drain after a resize");
    }
    // Once the sweep finds no flow on the old table, the resize is over and marks go.
    let idle = Duration::from_secs(1);
    prog.director.set_admin(&web(), ip(M1), Admin::Enabled).unwrap();
    prog.director.sweep(monotonic_ns() + 3_600_000_000_000, idle, idle).unwrap();
    assert!(!prog.director.written()[&web()].resized(), "the resize never ended");
}

/// A backend whose MAC becomes unknown keeps the MAC it was written with: the data path is
/// never given the zero MAC.
#[test]
fn a_backend_whose_mac_becomes_unknown_is_never_written_with_the_zero_mac() {
    let config = TWO_MASTERS.replace("mac = \"02:00:00:00:00:12\"\n", "");
    let mut prog = ProgramUnderTest::new(&config).unwrap();
    prog.director.set_resolved_mac(ip(M2), Ok([2, 0, 0, 0, 0, 0x12])).unwrap();
    let id = prog.backend_id(&web(), ip(M2));
    assert_eq!(prog.director.dataplane().maps_ro().backend(id).unwrap().mac, [2, 0, 0, 0, 0, 0x12]);
    prog.director.set_resolved_mac(ip(M2), Err("no ARP reply".into())).unwrap();
    let entry = prog.director.dataplane().maps_ro().backend(id).unwrap();
    assert_ne!(entry.mac, [0; 6], "the data path was given the zero MAC");
    assert_eq!(entry.state, mim_lb_common::BACKEND_STATE_DOWN);
    for p in 48000..48100u16 {
        assert_ne!(send(&prog, p, TCP_SYN), [0; 6]);
    }
}

/// A commit whose index write the kernel refuses changes nothing the data path reads, and
/// leaves no stale belief behind: the next, different, change goes live exactly as the
/// director believes it. Before, the director kept believing the region the failed commit
/// had written still held what it held before, and the next change skipped the slots where
/// its table matched that belief: the masters came up one by one (M1, M2, M3), so the region
/// not being read holds the M1+M2 table; a failed drain of M1 rewrites M1's slots there, and
/// a drain of M3 afterwards wants M1 back in exactly those slots.
#[test]
fn a_commit_that_fails_part_way_leaves_nothing_half_applied() {
    use mim_lb_tests::fault::FailingMap;
    let mut prog = ProgramUnderTest::pinned(&three_masters()).unwrap();
    settle(&mut prog);
    let live_before = prog.director.written()[&web()].table().to_vec();
    let services = prog.map_id(mim_lb_common::maps::names::SERVICES).unwrap();
    {
        let _failing = FailingMap::swap(services, size_of::<mim_lb_common::ServiceEntry>() as u32).unwrap();
        let err = prog.director.set_admin(&web(), ip(M1), Admin::Drained);
        assert!(err.is_err(), "the commit succeeded with its index writes refused: {err:?}");
    }
    assert_eq!(prog.director.desired()[&web()].backends[&ip(M1)].admin, Admin::Enabled, "a failed drain was adopted");
    let m1_entry = prog.director.dataplane().maps_ro().backend(prog.backend_id(&web(), ip(M1))).unwrap();
    assert_eq!(m1_entry.state, mim_lb_common::BACKEND_STATE_UP, "the failed drain's backend entry stayed written");
    assert_eq!(prog.director.written()[&web()].table(), &live_before[..]);
    let (id, active, size) = {
        let w = &prog.director.written()[&web()];
        (w.id, w.active, w.table_size)
    };
    assert_eq!(prog.director.dataplane().maps_ro().maglev_region(id, active, size).unwrap(), live_before, "the live table changed");

    prog.director.set_admin(&web(), ip(M3), Admin::Drained).unwrap();
    let w = &prog.director.written()[&web()];
    let live = prog.director.dataplane().maps_ro().maglev_region(w.id, w.active, w.table_size).unwrap();
    let wrong = live.iter().zip(w.table()).filter(|(a, b)| a != b).count();
    assert_eq!(wrong, 0, "{wrong} slots of the live table differ from what the director wrote");
    let m1 = prog.master_mac(&web(), ip(M1));
    let mut on_m1 = 0;
    for p in 49000..49300u16 {
        let syn = send(&prog, p, TCP_SYN);
        assert_eq!(master_of(&prog, syn), prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap(), "port {p}");
        assert_ne!(syn, prog.master_mac(&web(), ip(M3)), "port {p}: a new connection reached the drained master");
        on_m1 += (syn == m1) as usize;
    }
    assert!(on_m1 > 100, "M1, never drained, got {on_m1} of 300 new connections");
}

/// A restart on an interface whose MAC changed: forwarded frames carry the new MAC at once,
/// although nothing else changed (before, it was written only with a new service index).
#[test]
fn a_restart_with_a_new_interface_mac_forwards_with_it() {
    let mut prog = ProgramUnderTest::pinned(&three_masters()).unwrap();
    let new_mac = [0x02, 0x47, 0x57, 0x00, 0x00, 0x99];
    let before = prog.run(&Frame::tcp(CLIENT, 50000, VIP, 7000, TCP_SYN).bytes()).unwrap();
    assert_eq!(before.bytes[6..12], mim_lb_tests::testrun::GATEWAY_MAC);
    prog.restart(&three_masters(), new_mac).unwrap();
    let frame = Frame::tcp(CLIENT, 50000, VIP, 7000, TCP_SYN).with_macs(new_mac, [0x02, 0, 0, 0, 0, 1]);
    let after = prog.run(&frame.bytes()).unwrap();
    assert_eq!(after.verdict, reason::XDP_TX);
    assert_eq!(after.bytes[6..12], new_mac, "a forwarded frame still carries the old gateway MAC");
    assert_eq!(after.bytes[0..6], before.bytes[0..6], "the restart moved a flow");
}

/// An upgrade over maps pinned by ABI 1 (before SLOT_SEEN and MAGLEV_OLD): the new maps are
/// created beside the others and every flow keeps its master, recorded or not.
#[test]
fn an_upgrade_over_abi_1_pins_keeps_every_flow() {
    use mim_lb_common::maps::names;
    let mut prog = ProgramUnderTest::pinned(&three_masters()).unwrap();
    // Recorded flows (the slots are marked while the masters come up), then unrecorded ones.
    let recorded: Vec<(u16, [u8; 6])> = (51000..51200).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    assert!(recorded_flows(&prog) > 0);
    settle(&mut prog);
    let unrecorded: Vec<(u16, [u8; 6])> = (52000..52200).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    // What an ABI 1 daemon leaves: no SLOT_SEEN or MAGLEV_OLD pin, abi_version 1.
    let dir = prog.pin_dir().unwrap().to_owned();
    for name in [names::SLOT_SEEN, names::MAGLEV_OLD] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let globals = prog.director.dataplane().maps_ro().globals().unwrap();
    prog.director.dataplane_mut().maps().set_globals(&mim_lb_common::Globals { abi_version: 1, ..globals }).unwrap();

    prog.restart(&three_masters(), mim_lb_tests::testrun::GATEWAY_MAC).unwrap();
    assert!(dir.join(names::SLOT_SEEN).exists() && dir.join(names::MAGLEV_OLD).exists(), "the new maps were not pinned");
    assert_eq!(prog.director.dataplane().maps_ro().globals().unwrap().abi_version, mim_lb_common::ABI_VERSION);
    prog.director.set_admin(&web(), ip(M1), Admin::Drained).unwrap();
    for &(p, mac) in recorded.iter().chain(&unrecorded) {
        assert_eq!(send(&prog, p, TCP_ACK), mac, "port {p}: a flow moved across the upgrade and a drain");
    }
}

/// An upgrade over pins of the release before fragments were placed (no `FRAGMENTS`), or
/// before flow sync (no `FLOW_EVENTS`, `SYNC_STATS`): the stateless maps are created and
/// pinned, and every flow keeps its master (OPERATIONS.md, "Compatibility check").
#[test]
fn an_upgrade_over_pins_without_the_stateless_maps_keeps_every_flow() {
    use mim_lb_common::maps::names;
    let mut prog = ProgramUnderTest::pinned(&three_masters()).unwrap();
    let recorded: Vec<(u16, [u8; 6])> = (53000..53200).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    settle(&mut prog);
    let unrecorded: Vec<(u16, [u8; 6])> = (54000..54200).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    let dir = prog.pin_dir().unwrap().to_owned();
    let added_since = [names::FRAGMENTS, names::FLOW_EVENTS, names::SYNC_STATS];
    for name in added_since {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    prog.restart(&three_masters(), mim_lb_tests::testrun::GATEWAY_MAC).unwrap();
    for name in added_since {
        assert!(dir.join(name).exists(), "{name} was not pinned again");
    }
    for &(p, mac) in recorded.iter().chain(&unrecorded) {
        assert_eq!(send(&prog, p, TCP_ACK), mac, "port {p}: a flow moved across the upgrade");
    }
}

/// UDP has no SYN: every datagram looks its flow up, so a UDP flow keeps its master across an
/// added master and a drain, and a new UDP flow follows the current table.
#[test]
fn udp_flows_keep_their_master_across_changes() {
    let udp = |s: &str| s.replace("port = 7000\n", "port = 5353\nprotocol = \"udp\"\nhealth = { port = 7000 }\n");
    let key = ServiceKey { vip: VIP.into(), port: 5353, protocol: Protocol::Udp };
    let mut prog = ProgramUnderTest::new(&udp(TWO_MASTERS)).unwrap();
    settle_key(&mut prog, &key);
    let datagram = |prog: &ProgramUnderTest, sport: u16| -> [u8; 6] {
        let out = prog.run(&Frame::udp(CLIENT, sport, VIP, 5353).with_payload(b"q").bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_TX);
        out.bytes[0..6].try_into().unwrap()
    };
    let flows: Vec<(u16, [u8; 6])> = (53000..53300).map(|p| (p, datagram(&prog, p))).collect();
    prog.apply(&udp(&three_masters())).unwrap();
    prog.director.set_admin(&key, ip(M1), Admin::Drained).unwrap();
    let m1 = prog.master_mac(&key, ip(M1));
    let mut kept_on_m1 = 0;
    for &(p, mac) in &flows {
        assert_eq!(datagram(&prog, p), mac, "port {p}: a UDP flow moved");
        kept_on_m1 += (mac == m1) as usize;
    }
    assert!(kept_on_m1 > 30, "too few UDP flows on the drained master to prove anything");
    for p in 54000..54300u16 {
        let mac = datagram(&prog, p);
        assert_ne!(mac, m1, "port {p}: a new UDP flow reached the drained master");
        assert_eq!(mac, prog.master_mac(&key, prog.table_master(&key, CLIENT.into(), p, 5353).unwrap()));
    }
}

/// Issue 12's measured defect: masters configured without `mac` (resolved from the neighbour
/// table), then a reload adding a UDP service on the same masters: the new service's backends
/// stayed `down (unresolved)`, because the resolver does not report again an address it
/// already watches. They take the MAC already known for their address.
#[test]
fn a_service_added_by_reload_on_resolved_masters_knows_their_macs() {
    let no_macs = three_masters().replace("mac = \"02:00:00:00:00:11\"\n", "").replace("mac = \"02:00:00:00:00:12\"\n", "").replace("mac = \"02:00:00:00:00:13\"\n", "");
    let mut prog = ProgramUnderTest::new(&no_macs).unwrap();
    for (m, last) in [(M1, 0x11), (M2, 0x12), (M3, 0x13)] {
        prog.director.set_resolved_mac(ip(m), Ok([2, 0, 0, 0, 0, last])).unwrap();
    }
    // The same file with a second service, for UDP, on the same masters.
    let web = &no_macs[no_macs.find("[[service]]").unwrap()..];
    let dns = web
        .replace("name = \"web\"", "name = \"dns\"")
        .replace("port = 7000\n", "port = 5353\nprotocol = \"udp\"\nhealth = { port = 7000 }\n");
    let udp = format!("{no_macs}\n{dns}");
    prog.apply(&udp).unwrap();
    let dns = ServiceKey { vip: VIP.into(), port: 5353, protocol: Protocol::Udp };
    for m in [M1, M2, M3] {
        let (state, why) = prog.director.desired()[&dns].backends[&ip(m)].state();
        assert_eq!(state, mim_lb::director::State::Up, "{m} of the added service: {state} ({why})");
    }
    let out = prog.run(&Frame::udp(CLIENT, 55000, VIP, 5353).bytes()).unwrap();
    assert_eq!(out.verdict, reason::XDP_TX, "the added UDP service forwards nothing");
}

/// A second change of `table_size` while connections still follow the table from before the
/// first one is refused whole, with the reason, once the sweep has cleared slots: those slots'
/// unrecorded flows began on the new table, which no single old table can describe.
#[test]
fn a_second_resize_waits_for_the_first_to_end() {
    let mut prog = ProgramUnderTest::new(&three_masters()).unwrap();
    settle(&mut prog);
    let sized = |n: u32| three_masters().replace("port = 7000\n", &format!("port = 7000\ntable_size = {n}\n"));
    prog.apply(&sized(251)).unwrap();
    // Before the sweep cleared anything, another change is safe: every flow since was recorded.
    prog.apply(&sized(509)).unwrap();
    assert!(prog.director.written()[&web()].resized());
    // Old flows keep their slots marked (those that go to the old table stamp SLOT_SEEN);
    // once marked for a whole idle timeout, the sweep clears the others.
    let idle = Duration::from_millis(300);
    std::thread::sleep(idle + Duration::from_millis(100));
    for p in 60000..60050u16 {
        send(&prog, p, TCP_ACK);
    }
    prog.director.sweep(monotonic_ns(), idle, idle).unwrap();
    let w = &prog.director.written()[&web()];
    assert!(w.resized() && w.marked() > 0 && w.marked() < 509, "marked {} of 509", w.marked());
    let err = prog.director.apply_config(&mim_lb::config::Config::parse(&sized(1021)).unwrap()).unwrap_err();
    assert!(err.to_string().contains("cannot change again yet"), "{err}");
    assert_eq!(prog.director.written()[&web()].table_size, 509, "a refused resize changed the table");
}

/// Only a set of maps an ABI 1 daemon filled may lack the maps added since: from a set this
/// build filled, a missing MAGLEV_OLD held live state (the old table during a resize), so a
/// start over it is refused rather than run with an empty old table.
#[test]
fn a_missing_new_map_is_refused_unless_abi_1_filled_the_set() {
    use mim_lb_common::maps::names;
    let mut prog = ProgramUnderTest::pinned(&three_masters()).unwrap();
    let dir = prog.pin_dir().unwrap().to_owned();
    std::fs::remove_file(dir.join(names::MAGLEV_OLD)).unwrap();
    let err = prog.restart(&three_masters(), mim_lb_tests::testrun::GATEWAY_MAC).unwrap_err();
    assert!(format!("{err:#}").contains("incomplete (missing MAGLEV_OLD)"), "{err:#}");
    assert!(!dir.join(names::MAGLEV_OLD).exists(), "the refused start pinned a new map");
}

/// Once the region the data path does not read is brought up to date (the daemon does it
/// after every event), a change writes exactly the slots it changes: a failover's write, which
/// stands between the verdict and the data path seeing it, is no longer twice as wide.
#[test]
fn after_tidying_a_change_writes_only_the_slots_it_changes() {
    let mut prog = ProgramUnderTest::new(&three_masters()).unwrap();
    settle(&mut prog);
    let tidied = prog.director.tidy();
    assert!(tidied > 1000, "the unread region was already up to date ({tidied} writes): the test proves nothing");
    assert_eq!(prog.director.tidy(), 0, "a second tidy wrote again");
    let before = prog.director.written()[&web()].table().to_vec();
    let weight_zero = three_masters().replace("address = \"10.0.0.11\"\n", "address = \"10.0.0.11\"\nweight = 0\n");
    let report = prog.director.apply_config(&mim_lb::config::Config::parse(&weight_zero).unwrap()).unwrap();
    let after = prog.director.written()[&web()].table();
    let changed = before.iter().zip(after).filter(|(a, b)| a != b).count();
    assert!(changed > 10_000, "draining a third of the table changed only {changed} slots");
    assert_eq!(report.maglev_writes, changed, "the change wrote other slots than its own");
    // The live table is what was written.
    let w = &prog.director.written()[&web()];
    assert_eq!(prog.director.dataplane().maps_ro().maglev_region(w.id, w.active, w.table_size).unwrap(), after);
}

/// A SYN on a clean slot does not look the connection table up, so the sweep must leave no
/// record on a clean slot that names another master. A connection recorded on a marked slot
/// ends; its slot's master changes back; the mark clears. The same client port connects again
/// (on the clean slot, unrecorded) and the slot changes once more: the new connection stays on
/// its master, not on the one the old connection's record named.
#[test]
fn a_reused_port_is_not_claimed_by_a_record_its_slot_no_longer_agrees_with() {
    let mut prog = ProgramUnderTest::new(&three_masters()).unwrap();
    settle(&mut prog);
    let m1 = prog.master_mac(&web(), ip(M1));
    // Ports whose slot M1 owns: drained, they move to M2 or M3 and are marked.
    let ports: Vec<u16> = (61000..62000).filter(|&p| prog.table_master(&web(), CLIENT.into(), p, 7000).unwrap() == ip(M1)).take(100).collect();
    assert!(ports.len() == 100);
    prog.director.set_admin(&web(), ip(M1), Admin::Drained).unwrap();
    let old: Vec<[u8; 6]> = ports.iter().map(|&p| send(&prog, p, TCP_SYN)).collect();
    assert!(old.iter().all(|mac| *mac != m1));
    assert!(recorded_flows(&prog) >= ports.len(), "the connections on marked slots were not recorded");
    // The old connections end; M1 is back; a timeout later the marks are cleared.
    prog.director.set_admin(&web(), ip(M1), Admin::Enabled).unwrap();
    settle(&mut prog);
    for (&p, mac) in ports.iter().zip(&old) {
        // The same ports connect again: their slots are M1's and clean.
        let syn = send(&prog, p, TCP_SYN);
        assert_eq!(syn, m1, "port {p}");
        assert_ne!(syn, *mac);
    }
    prog.director.set_admin(&web(), ip(M1), Admin::Drained).unwrap();
    for &p in &ports {
        assert_eq!(send(&prog, p, TCP_ACK), m1, "port {p}: a new connection went where an old record of its ports said");
    }
}

/// The sweep computes each record's Maglev slot itself (the table may have been resized since
/// the record was made); the data path writes the slot it used into the record. They agree,
/// for both hashes (`maglev` and `maglev-source`) and both families.
#[test]
fn the_sweep_finds_each_record_on_the_slot_the_program_used() {
    // UDP services (every flow recorded), one per hash and family.
    let config = r#"
interface = "lo"
[[service]]
name = "dns4"
vip = "10.0.0.100"
port = 5353
protocol = "udp"
health = { check = "none" }
[[service.backend]]
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
[[service.backend]]
address = "10.0.0.12"
mac = "02:00:00:00:00:12"
[[service]]
name = "dns6"
vip = "fd00::100"
port = 5353
protocol = "udp"
scheduler = "maglev-source"
health = { check = "none" }
[[service.backend]]
address = "fd00::11"
mac = "02:00:00:00:06:11"
[[service.backend]]
address = "fd00::12"
mac = "02:00:00:00:06:12"
"#;
    let prog = ProgramUnderTest::new(config).unwrap();
    let vip6: std::net::Ipv6Addr = "fd00::100".parse().unwrap();
    let client6: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
    for p in 0..300u16 {
        prog.run(&Frame::udp(Ipv4Addr::new(10, 7, (p >> 8) as u8, p as u8), 30000 + p, VIP, 5353).bytes()).unwrap();
        prog.run(&Frame::udp(std::net::Ipv6Addr::from(u128::from(client6) + u128::from(p)), 30000 + p, vip6, 5353).bytes()).unwrap();
    }
    let flows = prog.director.dataplane().maps_ro().flows().unwrap();
    assert!(flows.len() >= 600, "only {} UDP flows recorded", flows.len());
    for (key, entry) in &flows {
        let (service, w) = prog.director.written().iter().find(|(_, w)| w.id == entry.service_id).expect("a record of a known service");
        assert_eq!(mim_lb::director::record_slot(w, key), entry.slot, "{service}: the sweep looks for a record on another slot than the program used");
    }
}

/// Issue 12: a reload changing `table_size` or `scheduler` keeps established flows, TCP and
/// UDP alike (UDP flows are recorded and looked up on every datagram; unrecorded TCP flows
/// follow the old table).
#[test]
fn a_scheduler_or_size_change_keeps_tcp_and_udp_flows() {
    let both = |extra: &str| {
        let tcp = three_masters().replace("port = 7000\n", &format!("port = 7000\n{extra}"));
        let udp = tcp.replace("name = \"web\"", "name = \"dns\"").replace("port = 7000\n", "port = 5353\nprotocol = \"udp\"\nhealth = { port = 7000 }\n");
        format!("{tcp}\n{}", &udp[udp.find("[[service]]").unwrap()..])
    };
    let dns = ServiceKey { vip: VIP.into(), port: 5353, protocol: Protocol::Udp };
    let datagram = |prog: &ProgramUnderTest, sport: u16| -> [u8; 6] {
        let out = prog.run(&Frame::udp(CLIENT, sport, VIP, 5353).bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_TX);
        out.bytes[0..6].try_into().unwrap()
    };
    let mut prog = ProgramUnderTest::new(&both("")).unwrap();
    settle(&mut prog);
    let tcp: Vec<(u16, [u8; 6])> = (56000..56300).map(|p| (p, send(&prog, p, TCP_SYN))).collect();
    let udp: Vec<(u16, [u8; 6])> = (57000..57300).map(|p| (p, datagram(&prog, p))).collect();
    // The second change comes before the sweep cleared any slot of the first: it is allowed.
    for (step, extra) in [("scheduler", "scheduler = \"maglev-source\"\n"), ("table_size", "scheduler = \"maglev-source\"\ntable_size = 251\n")] {
        prog.apply(&both(extra)).unwrap();
        assert!(prog.director.written()[&web()].resized() && prog.director.written()[&dns].resized(), "{step}: no resize");
        for &(p, mac) in &tcp {
            assert_eq!(send(&prog, p, TCP_ACK), mac, "{step}: TCP flow from port {p} moved");
        }
        for &(p, mac) in &udp {
            assert_eq!(datagram(&prog, p), mac, "{step}: UDP flow from port {p} moved");
        }
    }
    // And the change did move slots: new connections from one client now all reach one master.
    let masters: std::collections::BTreeSet<[u8; 6]> = (58000..58050).map(|p| send(&prog, p, TCP_SYN)).collect();
    assert_eq!(masters.len(), 1, "maglev-source sends one client's new connections to one master");
    let moved = tcp.iter().filter(|(_, mac)| !masters.contains(mac)).count();
    assert!(moved > 50, "the change moved too few flows' slots to prove anything");
}
