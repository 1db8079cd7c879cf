//! Batched map reads and writes (`mim_lb::dataplane::batch`) on the real program's maps, filled
//! by the real control plane, against the per-element path they replace (which is also the
//! fallback on kernels without the batch commands).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use aya::maps::MapData;
use mim_lb::{
    config::{Protocol, ServiceKey},
    dataplane::batch::{self, BatchError},
    director::read_pinned_flows,
};
use mim_lb_common::{FlowEntry, FlowKey, limits, maps::names};
use mim_lb_tests::{
    packet::Frame,
    testrun::ProgramUnderTest,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

const CONFIG: &str = r#"
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
[[service.backend]]
address = "10.0.0.13"
mac = "02:00:00:00:00:13"

[[service]]
name = "dns"
vip = "10.0.0.100"
port = 5353
protocol = "udp"
health = { port = 7000 }
[[service.backend]]
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
[[service.backend]]
address = "10.0.0.12"
mac = "02:00:00:00:00:12"
"#;

fn web() -> ServiceKey {
    ServiceKey { vip: VIP.into(), port: 7000, protocol: Protocol::Tcp }
}

fn dns() -> ServiceKey {
    ServiceKey { vip: VIP.into(), port: 5353, protocol: Protocol::Udp }
}

/// A distinct flow for each `i`, with a value that tells them apart too.
fn flow(i: u32) -> (FlowKey, FlowEntry) {
    let key = FlowKey {
        src: [u32::from(Ipv4Addr::new(10, 2, 0, 0)).wrapping_add(i / 50_000).to_be(), 0, 0, 0],
        dst: [u32::from(VIP).to_be(), 0, 0, 0],
        sport: (10_000 + (i % 50_000) as u16).to_be(),
        dport: 7000u16.to_be(),
        proto: 6,
        family: 4,
        _pad0: [0; 2],
    };
    let entry = FlowEntry { backend_id: 1 + i % 3, service_id: 0, slot: i % 65_537, flags: 0, last_seen_ns: u64::from(i) * 1_000 };
    (key, entry)
}

fn pinned_flows(prog: &ProgramUnderTest) -> (std::path::PathBuf, MapData) {
    let path = prog.director.dataplane().pin_dir().expect("pinned").join(names::FLOWS);
    let data = MapData::from_pin(&path).unwrap();
    (path, data)
}

fn pinned_map(prog: &ProgramUnderTest, name: &str) -> MapData {
    MapData::from_pin(prog.director.dataplane().pin_dir().expect("pinned").join(name)).unwrap()
}

/// The flows as a map, checking that none was returned twice.
fn as_map(flows: Vec<(FlowKey, FlowEntry)>, what: &str) -> HashMap<FlowKey, FlowEntry> {
    let n = flows.len();
    let map: HashMap<FlowKey, FlowEntry> = flows.into_iter().collect();
    assert_eq!(map.len(), n, "{what} returned a flow twice");
    map
}

#[test]
fn an_empty_connection_table_reads_as_empty() {
    let prog = ProgramUnderTest::pinned(CONFIG).unwrap();
    let (path, data) = pinned_flows(&prog);
    let maps = prog.director.dataplane().maps_ro();
    assert_eq!(maps.flows().unwrap(), vec![]);
    assert_eq!(maps.flows_per_element().unwrap(), vec![]);
    assert_eq!(read_pinned_flows(&path).unwrap(), vec![]);
    assert_eq!(batch::lookup_hash::<FlowKey, FlowEntry>(&data, 1).unwrap(), vec![]);
}

/// More flows than one batch holds, written from userspace with known values: every reader
/// returns exactly them, each once.
#[test]
fn batch_reads_return_exactly_the_flows_inserted() {
    let prog = ProgramUnderTest::pinned(CONFIG).unwrap();
    let (path, data) = pinned_flows(&prog);
    let n = 3 * batch::HASH_BATCH as u32 + 123;
    let (keys, values): (Vec<FlowKey>, Vec<FlowEntry>) = (0..n).map(flow).unzip();
    assert_eq!(batch::update(&data, &keys, &values).unwrap(), n as usize);
    let expected: HashMap<FlowKey, FlowEntry> = keys.into_iter().zip(values).collect();

    let maps = prog.director.dataplane().maps_ro();
    assert_eq!(as_map(maps.flows().unwrap(), "MapsRo::flows"), expected);
    assert_eq!(as_map(read_pinned_flows(&path).unwrap(), "read_pinned_flows"), expected);
    assert_eq!(as_map(maps.flows_per_element().unwrap(), "the per-element path"), expected);
    // A batch of one: every bucket holding two flows or more is refused (ENOSPC) until the
    // buffer grows to fit it.
    for start in [1, 7] {
        let got = batch::lookup_hash::<FlowKey, FlowEntry>(&data, start).unwrap();
        assert_eq!(as_map(got, &format!("a walk starting at {start} per call")), expected);
    }
}

/// Flows the program itself recorded (UDP datagrams through BPF_PROG_TEST_RUN: every UDP flow
/// is recorded, where a TCP SYN is only on a marked slot) read back the same through both
/// paths, the sweep's included.
#[test]
fn flows_recorded_by_the_program_read_back_the_same_both_ways() {
    let mut prog = ProgramUnderTest::pinned(CONFIG).unwrap();
    for sport in 20_000..20_500u16 {
        prog.run(&Frame::udp(Ipv4Addr::new(10, 0, 0, 1), sport, VIP, 5353).bytes()).unwrap();
    }
    let maps = prog.director.dataplane().maps_ro();
    let batched = as_map(maps.flows().unwrap(), "MapsRo::flows");
    assert_eq!(batched.len(), 500);
    assert_eq!(batched, as_map(maps.flows_per_element().unwrap(), "the per-element path"));
    let sports: std::collections::BTreeSet<u16> = batched.keys().map(|k| u16::from_be(k.sport)).collect();
    assert_eq!(sports, (20_000..20_500).collect());
    // The sweep reads the same table the daemon's way.
    let flip = prog.director.set_health(&dns(), "10.0.0.12".parse().unwrap(), false, "test").unwrap();
    assert!(flip.is_some());
    let report = prog.director.sweep(mim_lb::director::monotonic_ns(), std::time::Duration::from_secs(60), std::time::Duration::from_secs(60)).unwrap();
    assert_eq!(report.flows_seen, 500);
}

/// Every region of every service, both halves, read one element at a time.
fn all_regions(prog: &ProgramUnderTest) -> Vec<((u32, u32), Vec<u32>)> {
    let maps = prog.director.dataplane().maps_ro();
    let ids = [prog.service_id(&web()), prog.service_id(&dns())];
    let mut out = Vec::new();
    for id in ids {
        for half in 0..2 {
            out.push(((id, half), maps.maglev_region_per_element(id, half, limits::MAGLEV_MAX_TABLE_SIZE).unwrap()));
        }
    }
    out
}

/// A batch write changes the slots it is given, to their last given value, and not one other
/// entry of any region.
#[test]
fn a_batch_write_writes_exactly_the_given_slots() {
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    let svc = &prog.director.written()[&web()];
    let (id, half, size) = (svc.id, 1 - svc.active, svc.table_size);
    let before = all_regions(&prog);
    let last = limits::MAGLEV_MAX_TABLE_SIZE - 1;
    let writes = [(0, 0x00ab_cdef), (1, 7), (size - 1, 9), (last, 11), (500, 5), (500, 6)];
    let written = prog.director.dataplane_mut().maps().set_maglev_entries(id, half, writes).unwrap();
    assert_eq!(written, writes.len());

    let want: HashMap<u32, u32> = writes.into_iter().collect();
    for ((region, before), (_, after)) in before.iter().zip(all_regions(&prog)) {
        for (slot, (b, a)) in before.iter().zip(&after).enumerate() {
            let slot = slot as u32;
            match want.get(&slot).filter(|_| *region == (id, half)) {
                Some(v) => assert_eq!(a, v, "region {region:?} slot {slot}"),
                None => assert_eq!(a, b, "region {region:?} slot {slot} changed without being written"),
            }
        }
    }
}

/// The same writes through the batch and the per-element path leave the same table, and both
/// say how many entries they wrote.
#[test]
fn batch_and_per_element_writes_leave_the_same_table() {
    let mut batched = ProgramUnderTest::new(CONFIG).unwrap();
    let mut single = ProgramUnderTest::new(CONFIG).unwrap();
    let id = batched.service_id(&web());
    assert_eq!(id, single.service_id(&web()));
    let full: Vec<(u32, u32)> =
        (0..limits::MAGLEV_MAX_TABLE_SIZE).map(|s| (s, s.wrapping_mul(2_654_435_761) >> 8)).collect();
    let sparse: Vec<(u32, u32)> = (0..limits::MAGLEV_MAX_TABLE_SIZE).step_by(97).map(|s| (s, s | 0x8000_0000)).collect();
    for (half, writes) in [(0, &full), (1, &sparse)] {
        let a = batched.director.dataplane_mut().maps().set_maglev_entries(id, half, writes.iter().copied()).unwrap();
        let b = single.director.dataplane_mut().maps().set_maglev_entries_per_element(id, half, writes.iter().copied()).unwrap();
        assert_eq!((a, b), (writes.len(), writes.len()));
    }
    assert_eq!(all_regions(&batched), all_regions(&single));
    let region = batched.director.dataplane().maps_ro().maglev_region(id, 0, limits::MAGLEV_MAX_TABLE_SIZE).unwrap();
    assert_eq!(region, full.iter().map(|p| p.1).collect::<Vec<_>>());
}

/// The array readers give what their per-element fallbacks give, on tables the control plane
/// filled.
#[test]
fn batch_reads_of_arrays_match_the_per_element_path() {
    let prog = ProgramUnderTest::new(CONFIG).unwrap();
    let maps = prog.director.dataplane().maps_ro();
    for (key, svc) in prog.director.written() {
        for half in 0..2 {
            let batched = maps.maglev_region(svc.id, half, svc.table_size).unwrap();
            assert_eq!(batched, maps.maglev_region_per_element(svc.id, half, svc.table_size).unwrap(), "{key:?} half {half}");
            if half == svc.active {
                assert_eq!(batched, svc.table(), "{key:?}: not the table the director wrote");
            }
        }
    }
    let backends = maps.backends().unwrap();
    assert_eq!(backends.len(), 5, "{backends:?}");
    assert_eq!(backends, maps.backends_per_element().unwrap());
    let mut in_use = 0;
    for half in 0..2 {
        let slots = maps.service_half(half).unwrap();
        assert_eq!(slots, maps.service_half_per_element(half).unwrap(), "half {half}");
        in_use += slots.len();
    }
    assert!(in_use >= 2, "no service slot written");
}

#[test]
fn array_ranges_start_and_end_where_asked() {
    let prog = ProgramUnderTest::pinned(CONFIG).unwrap();
    let data = pinned_map(&prog, names::MAGLEV);
    let svc = &prog.director.written()[&web()];
    let base = limits::maglev_index(svc.id, svc.active, 0);
    let table = svc.table();
    for (start, len) in [(0, 1), (1, 2), (1000, 3000), (svc.table_size - 5, 5), (0, svc.table_size)] {
        let got = batch::lookup_array::<u32>(&data, base + start, len).unwrap();
        assert_eq!(got, table[start as usize..(start + len) as usize], "{start}+{len}");
    }
    assert!(batch::lookup_array::<u32>(&data, base, 0).unwrap().is_empty());
    let end = limits::maglev_map_entries(prog.director.dataplane().service_room());
    assert_eq!(batch::lookup_array::<u32>(&data, end - 2, 2).unwrap().len(), 2, "the last two entries");
    assert!(matches!(batch::lookup_array::<u32>(&data, end - 2, 3), Err(BatchError::OutOfRange { .. })));
}

/// Wrong types are refused before any syscall could write past a buffer.
#[test]
fn batch_calls_refuse_maps_that_do_not_fit_the_types() {
    let prog = ProgramUnderTest::pinned(CONFIG).unwrap();
    let (_, flows) = pinned_flows(&prog);
    let maglev = pinned_map(&prog, names::MAGLEV);
    let stats = pinned_map(&prog, names::SERVICE_STATS);
    assert!(matches!(batch::lookup_hash::<u32, FlowEntry>(&flows, 16), Err(BatchError::Size { what: "key", .. })));
    assert!(matches!(batch::lookup_hash::<FlowKey, u64>(&flows, 16), Err(BatchError::Size { what: "value", .. })));
    assert!(matches!(batch::lookup_array::<u64>(&maglev, 0, 4), Err(BatchError::Size { what: "value", .. })));
    assert!(matches!(batch::lookup_array::<FlowEntry>(&flows, 0, 4), Err(BatchError::MapType { .. })));
    assert!(matches!(batch::lookup_hash::<u32, u32>(&maglev, 16), Err(BatchError::MapType { .. })));
    assert!(matches!(batch::lookup_array::<mim_lb_common::TrafficStats>(&stats, 0, 1), Err(BatchError::MapType { .. })));
    assert!(matches!(batch::update::<u32, u32>(&maglev, &[1, 2], &[1]), Err(BatchError::Lengths { .. })));
}
