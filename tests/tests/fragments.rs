//! Fragmented datagrams through the real program (OPERATIONS.md, "MTU, ICMP and fragments"):
//! a client sends UDP requests larger than the lab's MTU, which leave it in fragments; every
//! request must be answered, each by exactly one master, which is only possible if all the
//! fragments of a datagram reached the same master (a master holding part of a datagram
//! cannot reassemble it and answers nothing).

use std::net::SocketAddr;
use std::time::Duration;

use mim_lb_tests::{
    Lab, LabSpec, count_names, in_netns,
    client::udp_ask_with,
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// Requests per address family: enough that every master gets some.
const REQUESTS: usize = 60;
/// A request of 4,000 bytes leaves a client with an MTU of 1,500 in three fragments.
const REQUEST_BYTES: usize = 4000;
const T: Duration = Duration::from_secs(3);

#[test]
fn udp_requests_of_4000_bytes_are_all_answered_each_by_one_master() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    lab.start_udp_servers(UDP_PORT).unwrap();
    // UDP masters are checked with TCP on the TCP port: a UDP service has no handshake to check.
    let udp = |name: &str, vip: std::net::IpAddr| ServiceSpec {
        name: name.into(),
        vip,
        port: UDP_PORT,
        protocol: "udp",
        health: format!("port = {PORT}\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1"),
        ..ServiceSpec::tcp(&lab, PORT)
    };
    let services = [udp("udp4", lab.vip4().into()), udp("udp6", lab.vip6().unwrap().into())];
    let config = lab_config(&lab, &services, "");
    let gw = Gateway::start(&mut lab, &config, Mode::Native).unwrap();
    gw.wait_all_up().unwrap();

    let request = vec![0x42u8; REQUEST_BYTES];
    let vips = [SocketAddr::new(lab.vip4().into(), UDP_PORT), SocketAddr::new(lab.vip6().unwrap().into(), UDP_PORT)];
    let names: Vec<String> = in_netns(lab.client_ns(), || {
        let mut names = Vec::new();
        for vip in vips {
            for i in 0..REQUESTS {
                let name = udp_ask_with(vip, None, &request, T)
                    .unwrap_or_else(|e| panic!("request {} of {REQUESTS} to {vip}: {e:#}", i + 1));
                names.push(name);
            }
        }
        names
    })
    .unwrap();

    // Every master answered some (the datagrams spread like whole ones), and the masters
    // answered exactly as many requests as were sent: none twice, none in part.
    let counts = count_names(&names);
    for i in 0..lab.master_count() {
        assert!(counts.get(&lab.master_name(i)).copied().unwrap_or(0) > 0, "{} answered none: {counts:?}", lab.master_name(i));
    }
    let answered: u64 = (0..lab.master_count()).map(|i| lab.served(i).udp_answered).sum();
    assert_eq!(answered, names.len() as u64, "masters answered {answered} requests for {} sent", names.len());

    // The program saw each datagram as a first fragment and two later ones, and dropped none.
    let status = gw.status().unwrap();
    let count = |name: &str| status.reasons.iter().find(|r| r.name == name).map_or(0, |r| r.packets);
    let sent = names.len() as u64;
    assert_eq!(count("fragment_first"), sent, "first fragments: {:?}", status.reasons);
    assert_eq!(count("fragment_followed"), 2 * sent, "later fragments: {:?}", status.reasons);
    assert_eq!(count("fragment"), 0, "fragments dropped: {:?}", status.reasons);
}
