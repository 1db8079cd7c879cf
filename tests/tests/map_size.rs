//! The maps indexed by service id are sized from the configuration at start (`max_services`,
//! or by default twice the services configured, at least 8), and that room bounds what a
//! reload may serve and what a restart over pinned maps accepts. The real program under
//! BPF_PROG_TEST_RUN, maps filled by the real control plane; sizes read from the kernel's map
//! info (what `bpftool map show` prints).

use std::net::{IpAddr, Ipv4Addr};

use mim_lb::config::{Config, ServiceKey};
use mim_lb_common::{limits, maps::names, reason};
use mim_lb_tests::{
    packet::{Frame, TCP_ACK, TCP_SYN},
    testrun::{GATEWAY_MAC, ProgramUnderTest, forwarded, verdict_name},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// TCP services `s{i}` on port 7000 of VIPs 10.0.1.{i}, two masters each, after `head`
/// (top-level keys such as `max_services`).
fn config_of(head: &str, which: impl IntoIterator<Item = u8>) -> String {
    let mut text = format!("interface = \"lo\"\n{head}\n");
    for i in which {
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"10.0.1.{i}\"\nport = 7000\nprotocol = \"tcp\"\n\
             [[service.backend]]\naddress = \"10.0.2.{i}\"\nmac = \"02:00:00:00:02:{i:02x}\"\n\
             [[service.backend]]\naddress = \"10.0.3.{i}\"\nmac = \"02:00:00:00:03:{i:02x}\"\n"
        ));
    }
    text
}

/// Services 1 to `n`.
fn services(head: &str, n: u8) -> String {
    config_of(head, 1..=n)
}

fn vip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, i)
}

fn key(i: u8) -> ServiceKey {
    ServiceKey { vip: IpAddr::V4(vip(i)), port: 7000, protocol: mim_lb::config::Protocol::Tcp }
}

/// The entries of the pinned map `name`, from the kernel's map info.
fn max_entries(prog: &ProgramUnderTest, name: &str) -> u32 {
    let dir = prog.pin_dir().expect("pinned");
    aya::maps::MapInfo::from_pin(dir.join(name)).expect("map info").max_entries()
}

/// Room for services the pinned Maglev maps were made with, checked on all three.
fn room(prog: &ProgramUnderTest) -> u32 {
    let maglev = max_entries(prog, names::MAGLEV);
    let room = maglev / limits::maglev_map_entries(1);
    assert_eq!(maglev, limits::maglev_map_entries(room), "MAGLEV holds whole services");
    assert_eq!(max_entries(prog, names::SLOT_SEEN), limits::slot_map_entries(room), "SLOT_SEEN follows MAGLEV");
    assert_eq!(max_entries(prog, names::MAGLEV_OLD), limits::slot_map_entries(room), "MAGLEV_OLD follows MAGLEV");
    assert_eq!(prog.director.dataplane().service_room(), room, "the control plane knows the room");
    room
}

/// A SYN to service `i` is forwarded, unchanged but for its MACs, to the master the control
/// plane's table names.
fn assert_forwards(prog: &ProgramUnderTest, i: u8, sport: u16) {
    let input = Frame::tcp(CLIENT, sport, vip(i), 7000, TCP_SYN).bytes();
    let out = prog.run(&input).unwrap();
    assert_eq!(out.verdict, reason::XDP_TX, "service {i}: {}", verdict_name(out.verdict));
    let master = prog.table_master(&key(i), CLIENT.into(), sport, 7000).expect("a master");
    assert_eq!(out.bytes, forwarded(&input, prog.master_mac(&key(i), master)), "service {i}");
}

/// A SYN to service `i` is not a service's (passed to the kernel).
fn assert_not_served(prog: &ProgramUnderTest, i: u8) {
    let out = prog.run(&Frame::tcp(CLIENT, 40_000, vip(i), 7000, TCP_SYN).bytes()).unwrap();
    assert_eq!(out.verdict, reason::XDP_PASS, "service {i} is not served: {}", verdict_name(out.verdict));
}

#[test]
fn map_sizes_follow_the_configuration() {
    // One service, no max_services: room for 8 (the default's floor), 16 MiB instead of 128.
    let prog = ProgramUnderTest::pinned(&services("", 1)).unwrap();
    assert_eq!(room(&prog), 8);
    assert_forwards(&prog, 1, 40_001);
    drop(prog);

    // Explicit: exactly what it says.
    let prog = ProgramUnderTest::pinned(&services("max_services = 1", 1)).unwrap();
    assert_eq!(room(&prog), 1);
    assert_forwards(&prog, 1, 40_002);
    drop(prog);

    // By default twice the services configured.
    let prog = ProgramUnderTest::pinned(&services("", 5)).unwrap();
    assert_eq!(room(&prog), 10);
    for i in 1..=5 {
        assert_forwards(&prog, i, 40_003);
    }
    drop(prog);

    // ...at most MAX_SERVICES.
    let config = Config::parse(&services("", 40)).unwrap();
    assert_eq!(config.service_room(), (limits::MAX_SERVICES, 40));
}

#[test]
fn reload_within_the_room_adds_services() {
    let mut prog = ProgramUnderTest::pinned(&services("max_services = 3", 1)).unwrap();
    assert_eq!(room(&prog), 3);
    assert_not_served(&prog, 3);
    prog.apply(&services("max_services = 3", 3)).unwrap();
    for i in 1..=3 {
        assert_forwards(&prog, i, 40_010 + u16::from(i));
    }
    // The last service's regions end at the map's last entry: its live table was written
    // there, whole.
    let id = prog.service_id(&key(3));
    assert_eq!(id, 2, "ids fill the room from 0");
    let svc = &prog.director.written()[&key(3)];
    let region = prog.director.dataplane().maps_ro().maglev_region(id, svc.active, svc.table_size).unwrap();
    assert_eq!(region, svc.table(), "the last service's live region holds its table");
}

#[test]
fn reload_beyond_the_room_is_refused_whole() {
    // One service by default: room for 8. Nine is one too many.
    let mut prog = ProgramUnderTest::pinned(&services("", 1)).unwrap();
    assert_eq!(room(&prog), 8);
    let input = Frame::tcp(CLIENT, 40_100, vip(1), 7000, TCP_SYN).bytes();
    let before = prog.run(&input).unwrap().bytes;
    let err = prog.director.apply_config(&Config::parse(&services("", 9)).unwrap()).unwrap_err().to_string();
    assert!(err.starts_with("max_services: the maps were sized at start for 8 services"), "{err}");
    assert!(err.contains("needs 9") && err.contains("Restart mim-lb with a larger max_services"), "{err}");
    // Nothing changed: one service, served as before; none of the others.
    assert_eq!(prog.director.desired().len(), 1);
    assert_eq!(prog.director.written().len(), 1);
    assert_eq!(prog.run(&input).unwrap().bytes, before);
    for i in 2..=9 {
        assert_not_served(&prog, i);
    }

    // A full room: replacing a service needs room for both until the flip, so it is refused
    // too, and removing first then adding works.
    let mut prog = ProgramUnderTest::pinned(&services("max_services = 2", 2)).unwrap();
    let s2_for_s3 = config_of("max_services = 2", [1, 3]);
    let err = prog.director.apply_config(&Config::parse(&s2_for_s3).unwrap()).unwrap_err().to_string();
    assert!(err.starts_with("max_services: the maps were sized at start for 2 services, and this configuration needs 3"), "{err}");
    assert_forwards(&prog, 2, 40_200);
    assert_not_served(&prog, 3);
    prog.apply(&services("max_services = 2", 1)).unwrap();
    prog.apply(&s2_for_s3).unwrap();
    assert_forwards(&prog, 1, 40_201);
    assert_forwards(&prog, 3, 40_201);
    assert_not_served(&prog, 2);
}

#[test]
fn restart_over_pins_keeps_their_size_or_refuses() {
    let mut prog = ProgramUnderTest::pinned(&services("", 2)).unwrap();
    assert_eq!(room(&prog), 8);
    // An established flow recorded on a marked slot would show a lost table; a recorded flow
    // in FLOWS shows the connection table is the same map.
    let flows_id = prog.map_id(names::FLOWS).unwrap();
    let maglev_id = prog.map_id(names::MAGLEV).unwrap();
    let input = Frame::tcp(CLIENT, 40_300, vip(1), 7000, TCP_ACK).bytes();
    let before = prog.run(&input).unwrap().bytes;

    // A configuration asking for a smaller room: the pinned maps are reused as they are, and
    // the limits follow them (room for 8, not 4).
    prog.restart(&services("max_services = 4", 2), GATEWAY_MAC).unwrap();
    assert_eq!(room(&prog), 8);
    assert_eq!(prog.map_id(names::MAGLEV).unwrap(), maglev_id, "MAGLEV reused");
    assert_eq!(prog.map_id(names::FLOWS).unwrap(), flows_id, "FLOWS reused");
    assert_eq!(prog.run(&input).unwrap().bytes, before);

    // More services than the pins have room for, or an explicit larger room: refused, naming
    // the key and the way out, with the pins and the running program untouched.
    for config in [services("", 9), services("max_services = 16", 2)] {
        let err = format!("{:#}", prog.restart(&config, GATEWAY_MAC).unwrap_err());
        assert!(err.contains("MAGLEV holds room for 8 services and this configuration needs"), "{err}");
        assert!(err.contains("max_services") && err.contains("detach"), "{err}");
        assert_eq!(prog.map_id(names::MAGLEV).unwrap(), maglev_id);
        assert_eq!(prog.map_id(names::FLOWS).unwrap(), flows_id);
        assert_eq!(room(&prog), 8);
        assert_eq!(prog.run(&input).unwrap().bytes, before, "the running program still forwards");
    }
    // And within the pinned room, after a restart with the default rule, a reload may use it
    // all.
    prog.restart(&services("", 2), GATEWAY_MAC).unwrap();
    prog.apply(&services("", 8)).unwrap();
    assert_forwards(&prog, 8, 40_301);
}

/// An upgrade from a build with fixed sizes (room for 64 services, whatever the config held):
/// the new build reuses those maps at their size, with every flow, and serves up to 64.
#[test]
fn an_upgrade_over_fixed_size_pins_keeps_them() {
    // The old layout is exactly room for MAX_SERVICES.
    let mut prog = ProgramUnderTest::pinned(&services(&format!("max_services = {}", limits::MAX_SERVICES), 1)).unwrap();
    assert_eq!(max_entries(&prog, names::MAGLEV), limits::MAGLEV_MAP_ENTRIES, "the old fixed size");
    let flows_id = prog.map_id(names::FLOWS).unwrap();
    let input = Frame::tcp(CLIENT, 40_400, vip(1), 7000, TCP_ACK).bytes();
    let before = prog.run(&input).unwrap().bytes;
    prog.restart(&services("", 1), GATEWAY_MAC).unwrap();
    assert_eq!(room(&prog), limits::MAX_SERVICES);
    assert_eq!(prog.map_id(names::FLOWS).unwrap(), flows_id);
    assert_eq!(prog.run(&input).unwrap().bytes, before);
    prog.apply(&services("", 20)).unwrap();
    assert_forwards(&prog, 20, 40_401);
}

/// A service entry whose table is larger than a region would read into the next service's
/// regions: the program refuses it (an internal error) rather than forward by another
/// service's table.
#[test]
fn a_table_larger_than_a_region_reads_nothing_of_another_service() {
    let prog = ProgramUnderTest::pinned(&services("max_services = 2", 2)).unwrap();
    let (half, slot, mut entry) = {
        let maps = prog.director.dataplane().maps_ro();
        let g = maps.globals().unwrap();
        let half = g.active_services & 1;
        let (slot, entry) = maps
            .service_half(half)
            .unwrap()
            .into_iter()
            .find(|(_, e)| e.flags & mim_lb_common::SERVICE_F_VIP_MARKER == 0 && e.service_id == prog.service_id(&key(1)))
            .expect("service 1 in the index");
        (half, slot, entry)
    };
    assert_eq!(entry.service_id, 0, "service 1 is the first");
    // Three regions' worth: slots past two regions land in service 2's first region.
    entry.table_size = 3 * limits::MAGLEV_MAX_TABLE_SIZE;
    let mut prog = prog;
    prog.director.dataplane_mut().maps().set_service_slot(half, slot, &entry).unwrap();
    let mut found = 0;
    for sport in 1024..u16::MAX {
        let (s, family) = mim_lb::dataplane::service_index::addr_words(CLIENT.into());
        let (d, _) = mim_lb::dataplane::service_index::addr_words(vip(1).into());
        let h = mim_lb_common::hash::flow_hash(family, &s, &d, sport.to_be(), 7000u16.to_be(), 6);
        if mim_lb_common::hash::table_slot(h, entry.table_size) < 2 * limits::MAGLEV_MAX_TABLE_SIZE {
            continue;
        }
        let out = prog.run(&Frame::tcp(CLIENT, sport, vip(1), 7000, TCP_SYN).bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_DROP, "port {sport}: {}", verdict_name(out.verdict));
        found += 1;
        if found == 20 {
            break;
        }
    }
    assert_eq!(found, 20);
    assert_eq!(prog.reason_packets(reason::INTERNAL).unwrap(), 20);
}
