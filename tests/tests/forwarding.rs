//! Real traffic through the real program: a client, a gateway running `mim-lb run`, and three
//! masters on a bridge, each in its own namespace. Connections to the VIP must all succeed,
//! spread over the masters, and be answered by the masters directly.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mim_lb_tests::{
    Capture, Lab, LabSpec, count_names, in_netns, tcp_ask_many, udp_ask,
    gateway::{Gateway, Mode, ServiceSpec, lab_config, run_failing},
};

const PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const CONNECTIONS: usize = 300;
const T: Duration = Duration::from_secs(3);

/// Every master's share of `names` is within 20%..47% (300 connections over 3 masters).
fn assert_spread(lab: &Lab, names: &[String], what: &str) -> BTreeMap<String, usize> {
    let counts = count_names(names);
    for i in 0..lab.master_count() {
        let n = counts.get(&lab.master_name(i)).copied().unwrap_or(0);
        let share = n as f64 / names.len() as f64;
        assert!(
            (0.20..=0.47).contains(&share),
            "{what}: {} got {n} of {} ({:.1}%): {counts:?}",
            lab.master_name(i),
            names.len(),
            share * 100.0
        );
    }
    counts
}

/// TCP to an IPv4 and an IPv6 VIP and UDP to an IPv4 VIP, in one XDP mode.
fn spread_in(mode: Mode) {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    lab.start_udp_servers(UDP_PORT).unwrap();
    let tcp4 = ServiceSpec::tcp(&lab, PORT);
    let tcp6 = ServiceSpec { name: "tcp6".into(), vip: lab.vip6().unwrap().into(), ..ServiceSpec::tcp(&lab, PORT) };
    // UDP masters are checked with TCP on the TCP port: a UDP service has no handshake to check.
    let udp4 = ServiceSpec { name: "udp4".into(), ..ServiceSpec::udp_checked_by_tcp(&lab, UDP_PORT, PORT) };
    let config = lab_config(&lab, &[tcp4, tcp6, udp4], "");
    let gw = Gateway::start(&mut lab, &config, mode).unwrap();
    gw.wait_all_up().unwrap();

    let vip4 = SocketAddr::new(lab.vip4().into(), PORT);
    let vip6 = SocketAddr::new(lab.vip6().unwrap().into(), PORT);
    let client_capture = Capture::start(lab.client_ns(), "eth0").unwrap();
    let gateway_capture = Capture::start(lab.gateway_ns(), "eth0").unwrap();
    let (names4, names6) = in_netns(lab.client_ns(), || {
        (tcp_ask_many(vip4, CONNECTIONS, T).unwrap(), tcp_ask_many(vip6, CONNECTIONS, T).unwrap())
    })
    .unwrap();
    let counts4 = assert_spread(&lab, &names4, "TCP over IPv4");
    assert_spread(&lab, &names6, "TCP over IPv6");
    let client_frames = client_capture.stop();
    let gateway_frames = gateway_capture.stop();

    // The client sent to the gateway's MAC, and every answer from a VIP came from a master's.
    let master_macs: Vec<[u8; 6]> = (0..lab.master_count()).map(|i| lab.master_mac(i)).collect();
    let vips: [IpAddr; 2] = [lab.vip4().into(), lab.vip6().unwrap().into()];
    let to_vip: Vec<_> = client_frames
        .iter()
        .filter(|f| f.outgoing && f.is_tcp() && f.dst_ip.is_some_and(|ip| vips.contains(&ip)))
        .collect();
    assert!(to_vip.len() >= 2 * CONNECTIONS, "only {} frames to the VIPs captured", to_vip.len());
    assert!(to_vip.iter().all(|f| f.dst_mac == lab.gateway_mac()));
    let answers: Vec<_> = client_frames
        .iter()
        .filter(|f| !f.outgoing && f.is_tcp() && f.src_ip.is_some_and(|ip| vips.contains(&ip)))
        .collect();
    assert!(answers.len() >= 2 * CONNECTIONS, "only {} answers from the VIPs captured", answers.len());
    for f in &answers {
        assert!(master_macs.contains(&f.src_mac), "an answer from {:?} came from MAC {:?}", f.src_ip, f.src_mac);
    }
    // Nothing from the VIPs ever touched the gateway: the masters answer the client directly.
    // (The gateway's own ARP and neighbour advertisements for the VIP are not answers.)
    let through_gateway: Vec<_> = gateway_frames
        .iter()
        .filter(|f| (f.is_tcp() || f.is_udp()) && f.src_ip.is_some_and(|ip| vips.contains(&ip)))
        .collect();
    assert!(through_gateway.is_empty(), "answers from the VIP passed through the gateway: {through_gateway:#?}");

    // The program's own counters agree with what the masters saw.
    let status = gw.status().unwrap();
    let service = status.services.iter().find(|s| s.name == format!("tcp-{PORT}")).unwrap();
    assert_eq!(service.new_flows, CONNECTIONS as u64, "one new flow per connection");
    for b in &service.backends {
        let i = (0..lab.master_count()).find(|&i| IpAddr::from(lab.master_addr4(i)) == b.address).unwrap();
        assert_eq!(b.new_flows as usize, counts4[&lab.master_name(i)], "new flows of {}", b.address);
    }
    let reasons: BTreeMap<&str, u64> = status.reasons.iter().map(|r| (r.name.as_str(), r.packets)).collect();
    assert!(reasons["forwarded"] >= (4 * 2 * CONNECTIONS) as u64, "{reasons:?}");

    // UDP: one datagram per source port, answered from the VIP by a master.
    let udp_vip = SocketAddr::new(lab.vip4().into(), UDP_PORT);
    let udp_names: Vec<String> = in_netns(lab.client_ns(), || {
        (0..CONNECTIONS).map(|_| udp_ask(udp_vip, None, T).unwrap()).collect()
    })
    .unwrap();
    assert_spread(&lab, &udp_names, "UDP");
    drop(gw);
}

#[test]
fn connections_spread_over_three_masters_in_native_mode() {
    spread_in(Mode::Native);
}

#[test]
fn connections_spread_over_three_masters_in_generic_mode() {
    spread_in(Mode::Generic);
}

/// The daemon removes what it made when it stops: the attachment and every pin.
#[test]
fn clean_stop_detaches_and_removes_the_pins() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let mut gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    assert!(gw.pin_dir().join("FLOWS").exists());
    let xdp = lab.run_in(lab.gateway_ns(), "ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert!(xdp.contains("xdpgeneric"), "not attached: {xdp}");
    // keepalived's track_script: ready while serving, not once stopped.
    assert!(gw.ctl(&["ready"]).unwrap().starts_with("ready: serving 1 services"));
    assert_eq!(gw.ctl(&["ready", "--quiet", "--timeout", "500ms"]).unwrap(), "");
    gw.stop().unwrap();
    let err = format!("{:#}", gw.ctl(&["ready", "--quiet"]).unwrap_err());
    assert!(err.contains("no mim-lb daemon is running"), "{err}");
    assert!(!gw.pin_dir().exists(), "pins left behind");
    let xdp = lab.run_in(lab.gateway_ns(), "ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert!(!xdp.contains("xdp"), "still attached: {xdp}");
    assert!(!gw.socket().exists(), "control socket left behind");
}

/// `--keep-pinned` (what the systemd unit uses) leaves the program forwarding after a stop;
/// `mim-lb detach` then takes it off, and refuses while a daemon runs.
#[test]
fn keep_pinned_keeps_forwarding_until_detach() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let mut gw = Gateway::start_with_args(&mut lab, &config, Mode::Generic, &["--keep-pinned"]).unwrap();
    gw.wait_all_up().unwrap();
    let config_path = gw.config_path();
    let err = gw.ctl(&["detach", "--config", config_path.to_str().unwrap()]).unwrap_err();
    assert!(format!("{err:#}").contains("daemon is running"), "{err:#}");

    gw.stop().unwrap();
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let names = in_netns(lab.client_ns(), || tcp_ask_many(vip, 20, T)).unwrap().unwrap();
    assert!(names.iter().all(|n| *n == lab.master_name(0)), "the stopped daemon's program stopped forwarding");

    // A start whose config no longer fits the pinned maps is refused, and the running program
    // is left as it was.
    gw.write_config(&format!("flow_table_size = 2048\n{config}")).unwrap();
    let (status, log) = run_failing(&mut lab, &config_path).unwrap();
    assert!(!status.success() && log.contains("flow_table_size was 1048576 and is now 2048"), "{log}");
    let names = in_netns(lab.client_ns(), || tcp_ask_many(vip, 5, T)).unwrap().unwrap();
    assert!(names.iter().all(|n| *n == lab.master_name(0)), "a refused start disturbed the running program: {names:?}");

    let said = gw.ctl(&["detach", "--config", config_path.to_str().unwrap()]).unwrap();
    assert!(said.contains("detached mim-lb from eth0"), "{said}");
    assert!(!gw.pin_dir().exists());
    let xdp = lab.run_in(lab.gateway_ns(), "ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert!(!xdp.contains("xdp"), "still attached: {xdp}");
    // Without the program, the gateway's own kernel answers the VIP (and refuses the port): a
    // refusal, not a timeout.
    let err = in_netns(lab.client_ns(), || mim_lb_tests::tcp_ask(vip, T)).unwrap().expect_err("the VIP answered after detach");
    let kind = err.root_cause().downcast_ref::<std::io::Error>().map(std::io::Error::kind);
    assert_eq!(kind, Some(std::io::ErrorKind::ConnectionRefused), "{err:#}");
}

/// A second daemon on the same pins (even with another control socket) refuses to start
/// instead of taking over the first one's maps and program.
#[test]
fn a_second_daemon_on_the_same_pins_refuses_to_start() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    let other = gw.config_path().with_file_name("second.toml");
    let socket = gw.config_path().with_file_name("second.sock");
    std::fs::write(&other, format!("pin_dir = \"{}\"\ncontrol_socket = \"{}\"\n{config}", gw.pin_dir().display(), socket.display())).unwrap();
    let (status, log) = run_failing(&mut lab, &other).unwrap();
    let pins = gw.pin_dir().display();
    assert!(!status.success(), "the second daemon started:\n{log}");
    assert!(log.contains(&format!("another mim-lb is running with pin_dir {pins} (it holds a lock on {pins})")), "{log}");
    // The first one is unharmed.
    assert_eq!(gw.status().unwrap().services[0].backends[0].state, "up");
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let names = in_netns(lab.client_ns(), || tcp_ask_many(vip, 5, T)).unwrap().unwrap();
    let masters: Vec<String> = (0..lab.master_count()).map(|i| lab.master_name(i)).collect();
    assert!(names.iter().all(|n| masters.contains(n)), "connections reached something other than a master: {names:?}");
}

/// What `ip -d link show eth0` says is attached in the gateway namespace: `xdp` (native) or
/// `xdpgeneric`, or None.
fn attached_mode(lab: &Lab) -> Option<&'static str> {
    let link = lab.run_in(lab.gateway_ns(), "ip", &["-d", "link", "show", "eth0"]).unwrap();
    if link.contains("xdpgeneric") {
        Some("generic")
    } else if link.contains("xdp") {
        Some("native")
    } else {
        None
    }
}

/// The mode in use agrees everywhere: the log, `status`, the kernel; and connections work.
fn assert_runs_in(lab: &Lab, gw: &Gateway, mode: &str) {
    assert_eq!(gw.status().unwrap().xdp_mode, mode, "status");
    assert_eq!(attached_mode(lab), Some(mode), "ip -d link show eth0");
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let names = in_netns(lab.client_ns(), || tcp_ask_many(vip, 20, T)).unwrap().unwrap();
    assert_eq!(names.len(), 20);
}

/// The default `xdp_mode = "auto"`: on a veth, whose driver has native XDP, it runs natively;
/// when the driver refuses (veth refuses native XDP while its peer's MTU is above what a
/// single-buffer program can take), it falls back to generic mode and logs why.
#[test]
fn auto_mode_runs_native_and_falls_back_to_generic_when_refused() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Auto).unwrap();
    gw.wait_all_up().unwrap();
    gw.proc().wait_for_line("attached to eth0 in native mode", T).unwrap();
    assert_runs_in(&lab, &gw, "native");
    drop(gw);

    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let port = lab.gateway_peer_ifname().to_owned();
    lab.run_in(lab.bridge_ns(), "ip", &["link", "set", "dev", &port, "mtu", "9000"]).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Auto).unwrap();
    gw.wait_all_up().unwrap();
    let line = gw.proc().wait_for_line("falling back to generic mode", T).unwrap();
    // The log says why: veth's refusal is ERANGE.
    assert!(line.contains("attaching to interface eth0 in native mode: "), "{line}");
    assert!(line.contains("Numerical result out of range"), "the reason is not logged: {line}");
    gw.proc().wait_for_line("attached to eth0 in generic mode", T).unwrap();
    assert_runs_in(&lab, &gw, "generic");
}

/// A start in another explicitly requested mode over a kept attachment removes it and makes a
/// new one in that mode; `auto` takes over the attachment in whatever mode it is.
#[test]
fn a_restart_in_another_mode_remakes_the_pinned_attachment() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let mut gw = Gateway::start_with_args(&mut lab, &config, Mode::Generic, &["--keep-pinned"]).unwrap();
    gw.wait_all_up().unwrap();
    assert_runs_in(&lab, &gw, "generic");

    for (mode, expect_log, runs_in) in [
        (Mode::Native, "detaching it and attaching anew", "native"),
        (Mode::Auto, "replaced the running program on eth0 (native mode) atomically", "native"),
        (Mode::Generic, "detaching it and attaching anew", "generic"),
        (Mode::Auto, "replaced the running program on eth0 (generic mode) atomically", "generic"),
    ] {
        gw.stop().unwrap();
        gw.set_mode(&lab, mode).unwrap();
        gw.restart(&mut lab, &["--keep-pinned"]).unwrap();
        gw.proc().wait_for_line(expect_log, T).unwrap_or_else(|e| panic!("--xdp-mode {}: {e:#}", mode.name()));
        assert_runs_in(&lab, &gw, runs_in);
    }
}

/// The `abi_version` in the GLOBALS pinned under `pin_dir`; with `set`, writes it first, as
/// another build of mim-lb would have left it.
fn pinned_abi_version(pin_dir: &std::path::Path, set: Option<u32>) -> u32 {
    use aya::maps::{Array, Map, MapData};
    use mim_lb_common::{Globals, maps::names};
    let map = Map::from_map_data(MapData::from_pin(pin_dir.join(names::GLOBALS)).unwrap()).unwrap();
    let mut globals: Array<MapData, Globals> = Array::try_from(map).unwrap();
    if let Some(version) = set {
        let g = globals.get(&0, 0).unwrap();
        globals.set(0, Globals { abi_version: version, ..g }, 0).unwrap();
    }
    globals.get(&0, 0).unwrap().abi_version
}

/// A start over pins it cannot use fails with the documented message and leaves the earlier
/// run's program attached and forwarding, with its pins as they were.
fn assert_refused(lab: &mut Lab, gw: &mut Gateway, why: &str) {
    let (status, log) = gw.restart_failing(lab, &["--keep-pinned"]).unwrap();
    assert!(!status.success(), "the start over unusable pins succeeded:\n{log}");
    assert!(log.contains("do not fit this version or configuration of mim-lb"), "{log}");
    assert!(log.contains(why), "the refusal does not say {why:?}:\n{log}");
    assert!(log.contains("The program that uses them is still forwarding"), "{log}");
    assert!(gw.pin_dir().join("XDP_LINK").exists(), "the refused start removed the link pin");
    assert_eq!(attached_mode(lab), Some("generic"), "the refused start touched the attachment");
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let names = in_netns(lab.client_ns(), || tcp_ask_many(vip, 10, T)).unwrap().unwrap();
    assert_eq!(names.len(), 10, "the earlier program stopped forwarding after a refused start");
}

/// Beyond a changed flow_table_size (above): maps filled by an ABI this build cannot read,
/// and a set missing a map (other than the two an ABI 1 set lacks), are refused.
#[test]
fn pins_of_another_abi_or_an_incomplete_set_are_refused_while_the_program_forwards() {
    use mim_lb_common::{ABI_VERSION, maps::names};
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let mut gw = Gateway::start_with_args(&mut lab, &config, Mode::Generic, &["--keep-pinned"]).unwrap();
    gw.wait_all_up().unwrap();
    gw.stop().unwrap();

    let future = ABI_VERSION + 1;
    pinned_abi_version(gw.pin_dir(), Some(future));
    assert_refused(&mut lab, &mut gw, &format!("they were filled by ABI version {future}, this build speaks {ABI_VERSION}"));
    assert_eq!(pinned_abi_version(gw.pin_dir(), None), future, "the refused start rewrote GLOBALS");
    // Put back, the same pins are taken over again.
    pinned_abi_version(gw.pin_dir(), Some(ABI_VERSION));
    gw.restart(&mut lab, &["--keep-pinned"]).unwrap();
    gw.proc().wait_for_line("replaced the running program", T).unwrap();
    gw.stop().unwrap();

    std::fs::remove_file(gw.pin_dir().join(names::BACKENDS)).unwrap();
    assert_refused(&mut lab, &mut gw, &format!("the set is incomplete (missing {})", names::BACKENDS));
    assert!(!gw.pin_dir().join(names::BACKENDS).exists(), "the refused start pinned a new map");
}

/// SIGTERM while the daemon is still starting (here: maps loaded, not yet attached) is a
/// clean stop once it has started, as a service manager's stop must be: exit status 0,
/// program detached, pins removed. It used to kill the daemon outright (the handler was
/// installed only after `ready`), leaving the program attached and the pins behind.
#[test]
fn sigterm_during_the_start_stops_the_daemon_cleanly() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let mut gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.stop().unwrap();

    let proc = gw.restart_no_wait(&mut lab, &[]).unwrap();
    proc.wait_for_line("XDP program loaded", T).unwrap();
    proc.signal(libc::SIGTERM).unwrap();
    let status = proc.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "SIGTERM during the start ended the daemon with {status}:\n{}", proc.tail(20));
    proc.wait_for_line("SIGTERM: stopping", T).unwrap();
    assert!(!gw.pin_dir().exists(), "pins left behind");
    assert_eq!(attached_mode(&lab), None, "the program stayed attached");
}

/// A start on another interface (`--interface`) over a kept attachment removes it from the
/// old interface and attaches anew; the next start on the first interface moves it back.
#[test]
fn a_restart_on_another_interface_remakes_the_pinned_attachment() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    // A second interface, connected to nothing (a veth pair: the dummy driver may be absent).
    lab.run_in(lab.gateway_ns(), "ip", &["link", "add", "mimother0", "type", "veth", "peer", "name", "mimother1"]).unwrap();
    lab.run_in(lab.gateway_ns(), "ip", &["link", "set", "mimother0", "up"]).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let mut gw = Gateway::start_with_args(&mut lab, &config, Mode::Generic, &["--keep-pinned"]).unwrap();
    gw.wait_all_up().unwrap();
    let on_other = |lab: &Lab| lab.run_in(lab.gateway_ns(), "ip", &["-d", "link", "show", "mimother0"]).unwrap().contains("xdpgeneric");

    gw.stop().unwrap();
    gw.restart(&mut lab, &["--keep-pinned", "--interface", "mimother0"]).unwrap();
    gw.proc().wait_for_line("detaching it and attaching anew", T).unwrap();
    assert_eq!(gw.status().unwrap().interface, "mimother0");
    assert!(on_other(&lab), "nothing attached to the new interface");
    assert_eq!(attached_mode(&lab), None, "the old interface kept its attachment");

    gw.stop().unwrap();
    gw.restart(&mut lab, &["--keep-pinned"]).unwrap();
    gw.proc().wait_for_line("detaching it and attaching anew", T).unwrap();
    assert!(!on_other(&lab), "the other interface kept its attachment");
    assert_runs_in(&lab, &gw, "generic");
}

/// A fresh start holds its masters' first verdicts until each has had `rise` checks and
/// applies them together: the first table has every live master at once and no slot marked
/// as changed, whatever order the checks happened to pass in (two directors started side by
/// side must not remember different previous masters). `mim-lb ready` says not ready until
/// then.
#[test]
fn the_first_health_verdicts_of_a_fresh_start_land_together() {
    let mut lab = Lab::new(LabSpec::masters(3)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let mut service = ServiceSpec::tcp(&lab, PORT);
    service.health = "interval_ms = 1000\ntimeout_ms = 500\nrise = 3\nfall = 2".into();
    let config = lab_config(&lab, &[service], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    let err = format!("{:#}", gw.ctl(&["ready", "--quiet"]).unwrap_err());
    assert!(err.contains("not ready: waiting for the first health checks of 3 masters"), "{err}");
    let status = gw.status().unwrap();
    assert!(status.services[0].backends.iter().all(|b| b.state == "down"), "a master came up alone: {status:?}");
    // Meanwhile VIP traffic is dropped as no_backend.
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let early = in_netns(lab.client_ns(), || mim_lb_tests::tcp_ask(vip, Duration::from_millis(300))).unwrap();
    assert!(early.is_err(), "a connection was answered before the first round: {early:?}");
    let dropped = gw.status().unwrap().reasons.iter().find(|r| r.name == "no_backend").unwrap().packets;
    assert!(dropped > 0, "the early SYN was not counted as no_backend");
    gw.proc().wait_for_line("first round of health checks complete: 3 masters up", T).unwrap();
    let status = gw.wait_all_up().unwrap();
    assert_eq!(status.services[0].changed_slots, 0, "the bring-up marked slots");
    assert!(gw.ctl(&["ready"]).is_ok());
}
