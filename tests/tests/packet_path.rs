//! Packet-in, packet-out: the real XDP program under BPF_PROG_TEST_RUN, with its maps filled
//! by the real control plane. Each fixture states its input frame, the verdict, the exact
//! output bytes and the reason it must be counted under.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mim_lb::config::{Protocol, ServiceKey};
use mim_lb_common::reason;
use mim_lb_tests::{
    packet::{
        Ext6, Frame, ICMP_FRAG_NEEDED, ICMP_PORT_UNREACHABLE, ICMP_TTL_EXCEEDED, ICMPV6_PACKET_TOO_BIG,
        ICMPV6_TIME_EXCEEDED, ICMPV6_UNREACHABLE, L4, TCP_ACK, TCP_PSH, TCP_SYN, ext_ah, ext_fragment, ext_fragment_id,
        ext_padding,
    },
    testrun::{ProgramUnderTest, forwarded, verdict_name},
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
/// The "sticky" service's VIP: TCP only.
const STICKY_VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

const CONFIG: &str = r#"
interface = "lo"

[[service]]
name = "tcp4"
vip = "10.0.0.100"
port = 7000
protocol = "tcp"
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
name = "udp4"
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

[[service]]
name = "tcp6"
vip = "fd00::100"
port = 7000
[[service.backend]]
address = "fd00::11"
mac = "02:00:00:00:06:11"
[[service.backend]]
address = "fd00::12"
mac = "02:00:00:00:06:12"

[[service]]
name = "sticky"
vip = "10.0.0.101"
port = 7000
scheduler = "maglev-source"
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
name = "sticky-udp"
vip = "10.0.0.103"
port = 5353
protocol = "udp"
scheduler = "maglev-source"
health = { port = 7000 }
[[service.backend]]
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
[[service.backend]]
address = "10.0.0.12"
mac = "02:00:00:00:00:12"

[[service]]
name = "empty"
vip = "10.0.0.102"
port = 7000
[[service.backend]]
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
weight = 0
"#;

fn key(vip: impl Into<IpAddr>, port: u16, protocol: u8) -> ServiceKey {
    let protocol = if protocol == 17 { Protocol::Udp } else { Protocol::Tcp };
    ServiceKey { vip: vip.into(), port, protocol }
}

enum Expect {
    /// XDP_PASS and the frame untouched.
    Passed(u32),
    /// XDP_DROP.
    Dropped(u32),
    /// XDP_TX to the master the control plane's table names for this flow.
    Forwarded(ServiceKey),
    /// A fragment sent with XDP_TX, counted under the reason given, to the master the control
    /// plane's table names for the flow its frame's ports name (every fixture fragment carries
    /// its datagram's ports, so the master its first fragment went to is known).
    Fragment(ServiceKey, u32),
    /// An ICMP error sent with XDP_TX (reason `icmp_error_forwarded`) to the master the
    /// control plane's table names for the flow (client, client port) -> the service.
    Relayed(ServiceKey, IpAddr, u16),
}

struct Case {
    description: &'static str,
    input: Frame,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    let tcp4 = key(VIP4, 7000, 6);
    let with_options = {
        let mut f = Frame::tcp(CLIENT4, 40001, VIP4, 7000, TCP_SYN);
        // Record-route style filler: NOPs then end-of-options, 12 octets (IHL 8).
        f.ipv4_options = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
        f
    };
    let fragment = |offset_field: u16, dst: Ipv4Addr| {
        let mut f = Frame::udp(CLIENT4, 40002, dst, 5353).with_payload(&[7; 32]);
        f.ipv4_frag = offset_field;
        f
    };
    let v6_ext = |ext: Vec<Ext6>| {
        let mut f = Frame::tcp(CLIENT6, 40003, VIP6, 7000, TCP_SYN);
        f.ipv6_ext = ext;
        f
    };
    let tcp_fragment = |offset_field: u16, dst: Ipv4Addr| {
        let mut f = Frame::tcp(CLIENT4, 40002, dst, 7000, TCP_SYN).with_payload(&[7; 32]);
        f.ipv4_frag = offset_field;
        f
    };
    let udp6_ext = |ext: Vec<Ext6>| {
        let mut f = Frame::udp(CLIENT6, 40003, VIP6, 7000).with_payload(&[7; 32]);
        f.ipv6_ext = ext;
        f
    };
    let mut all = vec![
        Case { description: "TCP SYN to a VIP", input: Frame::tcp(CLIENT4, 40000, VIP4, 7000, TCP_SYN), expect: Expect::Forwarded(tcp4) },
        Case { description: "TCP data of an established flow", input: Frame::tcp(CLIENT4, 40000, VIP4, 7000, TCP_ACK | TCP_PSH).with_payload(b"hello"), expect: Expect::Forwarded(tcp4) },
        Case { description: "UDP to a VIP", input: Frame::udp(CLIENT4, 40000, VIP4, 5353).with_payload(b"q"), expect: Expect::Forwarded(key(VIP4, 5353, 17)) },
        Case { description: "TCP to a VIP on a port with no service", input: Frame::tcp(CLIENT4, 40000, VIP4, 22, TCP_SYN), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "UDP to the VIP on the TCP service's port", input: Frame::udp(CLIENT4, 40000, VIP4, 7000), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "TCP to another address", input: Frame::tcp(CLIENT4, 40000, Ipv4Addr::new(10, 0, 0, 2), 7000, TCP_SYN), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "TCP to the VIP, port 0", input: Frame::tcp(CLIENT4, 40000, VIP4, 0, TCP_SYN), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "802.1Q-tagged SYN to a VIP keeps its tag", input: Frame::tcp(CLIENT4, 40010, VIP4, 7000, TCP_SYN).with_vlan(0x8100, 42), expect: Expect::Forwarded(tcp4) },
        Case { description: "802.1ad + 802.1Q (QinQ) SYN to a VIP keeps both tags", input: Frame::tcp(CLIENT4, 40011, VIP4, 7000, TCP_SYN).with_vlan(0x88a8, 100).with_vlan(0x8100, 42), expect: Expect::Forwarded(tcp4) },
        Case { description: "three VLAN tags are passed", input: Frame::tcp(CLIENT4, 40012, VIP4, 7000, TCP_SYN).with_vlan(0x88a8, 1).with_vlan(0x8100, 2).with_vlan(0x8100, 3), expect: Expect::Passed(reason::VLAN_TOO_DEEP) },
        Case { description: "IPv4 with 12 octets of options (IHL 8)", input: with_options, expect: Expect::Forwarded(tcp4) },
        Case { description: "IPv6 SYN to a VIP", input: Frame::tcp(CLIENT6, 40000, VIP6, 7000, TCP_SYN), expect: Expect::Forwarded(key(VIP6, 7000, 6)) },
        Case { description: "IPv6 with hop-by-hop and destination options", input: v6_ext(vec![ext_padding(0, 1), ext_padding(60, 2)]), expect: Expect::Forwarded(key(VIP6, 7000, 6)) },
        Case { description: "IPv6 with a routing header", input: v6_ext(vec![ext_padding(43, 1)]), expect: Expect::Forwarded(key(VIP6, 7000, 6)) },
        Case { description: "IPv6 atomic fragment is a whole datagram", input: v6_ext(vec![ext_fragment(0, false)]), expect: Expect::Forwarded(key(VIP6, 7000, 6)) },
        Case { description: "IPv6 first fragment to a VIP is forwarded", input: v6_ext(vec![ext_fragment_id(0, true, 0x6001)]), expect: Expect::Fragment(key(VIP6, 7000, 6), reason::FRAGMENT_FIRST) },
        Case { description: "IPv6 later fragment of no known datagram is dropped", input: v6_ext(vec![ext_fragment_id(100, false, 0x6002)]), expect: Expect::Dropped(reason::FRAGMENT) },
        Case { description: "IPv6 ESP is passed", input: Frame::new(CLIENT6.into(), VIP6.into(), L4::Other { proto: 50, bytes: vec![0; 16] }), expect: Expect::Passed(reason::IPV6_EXTENSION) },
        Case { description: "IPv6 with five extension headers is passed", input: v6_ext(vec![ext_padding(0, 1), ext_padding(60, 1), ext_padding(60, 1), ext_padding(60, 1), ext_padding(60, 1)]), expect: Expect::Passed(reason::IPV6_EXTENSION) },
        // OPERATIONS.md: "up to four hop-by-hop, routing, destination-options or atomic fragment
        // headers" are walked; a longer chain is passed. Four of every walked kind reach the
        // service, the same four plus one more do not: the limit is exactly four.
        Case { description: "IPv6 with exactly four extension headers, one of each walked kind, is forwarded", input: v6_ext(vec![ext_padding(0, 1), ext_padding(43, 1), ext_fragment(0, false), ext_padding(60, 2)]), expect: Expect::Forwarded(key(VIP6, 7000, 6)) },
        Case { description: "IPv6 with those four and a fifth destination-options header is passed", input: v6_ext(vec![ext_padding(0, 1), ext_padding(43, 1), ext_fragment(0, false), ext_padding(60, 2), ext_padding(60, 1)]), expect: Expect::Passed(reason::IPV6_EXTENSION) },
        Case { description: "IPv6 AH in front of TCP to a VIP is passed", input: v6_ext(vec![ext_ah()]), expect: Expect::Passed(reason::IPV6_EXTENSION) },
        Case { description: "IPv6 AH after a hop-by-hop header is passed", input: v6_ext(vec![ext_padding(0, 1), ext_ah()]), expect: Expect::Passed(reason::IPV6_EXTENSION) },
        Case { description: "IPv4 first fragment to a VIP is forwarded", input: fragment(0x2000, VIP4), expect: Expect::Fragment(key(VIP4, 5353, 17), reason::FRAGMENT_FIRST) },
        Case { description: "IPv4 later fragment of no known datagram is dropped", input: { let mut f = fragment(0x0010, VIP4); f.ipv4_id = 0x4002; f }, expect: Expect::Dropped(reason::FRAGMENT) },
        Case { description: "IPv4 fragment to another address is passed", input: fragment(0x2000, Ipv4Addr::new(10, 0, 0, 2)), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        // The fragment rule is per (VIP, protocol) (OPERATIONS.md, "MTU, ICMP and fragments"):
        // 10.0.0.101 and fd00::100 have TCP services only, so their UDP fragments are the
        // kernel's, while TCP fragments to the same VIP are the program's.
        Case { description: "IPv4 UDP first fragment to a TCP-only VIP is passed", input: fragment(0x2000, STICKY_VIP4), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "IPv4 UDP later fragment to a TCP-only VIP is passed", input: fragment(0x0010, STICKY_VIP4), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "IPv4 TCP first fragment to that VIP is forwarded", input: tcp_fragment(0x2000, STICKY_VIP4), expect: Expect::Fragment(key(STICKY_VIP4, 7000, 6), reason::FRAGMENT_FIRST) },
        Case { description: "IPv6 UDP first fragment to a TCP-only VIP is passed", input: udp6_ext(vec![ext_fragment(0, true)]), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "IPv6 UDP later fragment to a TCP-only VIP is passed", input: udp6_ext(vec![ext_fragment(100, false)]), expect: Expect::Passed(reason::NOT_A_SERVICE) },
        Case { description: "IPv4 don't-fragment flag is not a fragment", input: fragment(0x4000, VIP4), expect: Expect::Forwarded(key(VIP4, 5353, 17)) },
        Case { description: "ICMP echo to a VIP is passed", input: Frame::new(CLIENT4.into(), VIP4.into(), L4::Other { proto: 1, bytes: vec![8, 0, 0, 0, 0, 1, 0, 1] }), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "service whose only master has weight 0 drops", input: Frame::tcp(CLIENT4, 40000, Ipv4Addr::new(10, 0, 0, 102), 7000, TCP_SYN), expect: Expect::Dropped(reason::NO_BACKEND) },
        Case { description: "SYN to a VIP addressed to another host's MAC is dropped", input: Frame::tcp(CLIENT4, 40020, VIP4, 7000, TCP_SYN).with_macs(OTHER_MAC, CLIENT_MAC), expect: Expect::Dropped(reason::FOREIGN_MAC) },
        Case { description: "data to a VIP addressed to another host's MAC is dropped", input: Frame::tcp(CLIENT4, 40021, VIP4, 7000, TCP_ACK).with_macs(OTHER_MAC, CLIENT_MAC), expect: Expect::Dropped(reason::FOREIGN_MAC) },
        Case { description: "broadcast UDP to a VIP is dropped", input: Frame::udp(CLIENT4, 40022, VIP4, 5353).with_macs([0xff; 6], CLIENT_MAC), expect: Expect::Dropped(reason::FOREIGN_MAC) },
        Case { description: "multicast-addressed IPv6 SYN to a VIP is dropped", input: Frame::tcp(CLIENT6, 40023, VIP6, 7000, TCP_SYN).with_macs([0x33, 0x33, 0, 0, 0, 1], CLIENT_MAC), expect: Expect::Dropped(reason::FOREIGN_MAC) },
        Case { description: "fragment to a VIP addressed to another host's MAC is dropped", input: fragment(0x2000, VIP4).with_macs(OTHER_MAC, CLIENT_MAC), expect: Expect::Dropped(reason::FOREIGN_MAC) },
    ];
    all.extend(icmp_cases());
    all
}

/// A router between the gateway and the clients, which sends ICMP errors about the masters'
/// answers (sent from the VIP) back to the VIP.
const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);
/// The next-hop MTU a router reports (1400) in the four octets after the checksum.
const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];

/// ICMP errors about a master's answer: relayed to the flow's master when the quote holds the
/// answer's ports and it came from a service; passed (as all ICMP was) otherwise.
fn icmp_cases() -> Vec<Case> {
    let tcp4 = key(VIP4, 7000, 6);
    let udp4 = key(VIP4, 5353, 17);
    let tcp6 = key(VIP6, 7000, 6);
    // A master's large answer to a client: from VIP:port to the client's port.
    let answer4 = |cport: u16| Frame::tcp(VIP4, 7000, CLIENT4, cport, TCP_ACK | TCP_PSH).with_payload(&[0x5a; 500]);
    let answer6 = |cport: u16| Frame::tcp(VIP6, 7000, CLIENT6, cport, TCP_ACK | TCP_PSH).with_payload(&[0x5a; 500]);
    let frag_needed = |quoted: &Frame, l4: Option<usize>| Frame::icmp_error(ROUTER4, VIP4, ICMP_FRAG_NEEDED, MTU_1400, quoted, l4);
    let too_big = |quoted: &Frame, l4: Option<usize>| Frame::icmp_error(ROUTER6, VIP6, ICMPV6_PACKET_TOO_BIG, [0, 0, 0x05, 0x00], quoted, l4);
    let with_options = |mut f: Frame| {
        // Record-route style filler: NOPs then end-of-options, 12 octets (IHL 8).
        f.ipv4_options = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
        f
    };
    let cut_ip_header = {
        // The quote ends 12 octets into the quoted IPv4 header.
        let mut bytes = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        bytes.extend_from_slice(&answer4(40120).datagram()[..12]);
        Frame::new(ROUTER4.into(), VIP4.into(), L4::Other { proto: 1, bytes })
    };
    let later_fragment = {
        let mut f = Frame::udp(VIP4, 5353, CLIENT4, 40121).with_payload(&[1; 64]);
        f.ipv4_frag = 0x0010;
        f
    };
    let first_fragment = {
        let mut f = Frame::udp(VIP4, 5353, CLIENT4, 40122).with_payload(&[1; 64]);
        f.ipv4_frag = 0x2000;
        f
    };
    let v6_with_ext = {
        let mut f = answer6(40123);
        f.ipv6_ext = vec![ext_padding(60, 1)];
        f
    };
    vec![
        Case { description: "ICMP fragmentation needed quoting a TCP answer, whole quote", input: frag_needed(&answer4(40100), None), expect: Expect::Relayed(tcp4, CLIENT4.into(), 40100) },
        Case { description: "ICMP fragmentation needed, quote of IP header + 8 octets (RFC 792)", input: frag_needed(&answer4(40101), Some(8)), expect: Expect::Relayed(tcp4, CLIENT4.into(), 40101) },
        Case { description: "ICMP fragmentation needed, quote of IP header + 4 octets (the ports)", input: frag_needed(&answer4(40102), Some(4)), expect: Expect::Relayed(tcp4, CLIENT4.into(), 40102) },
        Case { description: "ICMP fragmentation needed, quote of IP header + 3 octets is passed", input: frag_needed(&answer4(40103), Some(3)), expect: Expect::Passed(reason::ICMP_QUOTE_SHORT) },
        Case { description: "ICMP fragmentation needed, quote of the IP header alone is passed", input: frag_needed(&answer4(40104), Some(0)), expect: Expect::Passed(reason::ICMP_QUOTE_SHORT) },
        Case { description: "ICMP fragmentation needed, quote ending inside the IP header is passed", input: cut_ip_header, expect: Expect::Passed(reason::ICMP_QUOTE_SHORT) },
        Case { description: "ICMP fragmentation needed quoting an answer with IPv4 options, IP header + 8", input: frag_needed(&with_options(answer4(40105)), Some(8)), expect: Expect::Relayed(tcp4, CLIENT4.into(), 40105) },
        Case { description: "ICMP fragmentation needed quoting an answer with IPv4 options, IP header + 3 is passed", input: frag_needed(&with_options(answer4(40106)), Some(3)), expect: Expect::Passed(reason::ICMP_QUOTE_SHORT) },
        Case { description: "ICMP error with IPv4 options of its own", input: with_options(frag_needed(&answer4(40107), Some(8))), expect: Expect::Relayed(tcp4, CLIENT4.into(), 40107) },
        Case { description: "ICMP port unreachable quoting a UDP answer", input: Frame::icmp_error(ROUTER4, VIP4, ICMP_PORT_UNREACHABLE, [0; 4], &Frame::udp(VIP4, 5353, CLIENT4, 40108).with_payload(b"answer"), Some(8)), expect: Expect::Relayed(udp4, CLIENT4.into(), 40108) },
        Case { description: "ICMP time exceeded quoting a TCP answer", input: Frame::icmp_error(ROUTER4, VIP4, ICMP_TTL_EXCEEDED, [0; 4], &answer4(40109), Some(8)), expect: Expect::Relayed(tcp4, CLIENT4.into(), 40109) },
        Case { description: "ICMP error about a maglev-source service's answer", input: Frame::icmp_error(ROUTER4, STICKY_VIP4, ICMP_FRAG_NEEDED, MTU_1400, &Frame::tcp(STICKY_VIP4, 7000, CLIENT4, 40110, TCP_ACK), Some(8)), expect: Expect::Relayed(key(STICKY_VIP4, 7000, 6), CLIENT4.into(), 40110) },
        Case { description: "802.1Q-tagged ICMP error keeps its tag", input: frag_needed(&answer4(40111), Some(8)).with_vlan(0x8100, 42), expect: Expect::Relayed(tcp4, CLIENT4.into(), 40111) },
        Case { description: "ICMPv6 packet too big quoting a TCP answer, whole quote", input: too_big(&answer6(40112), None), expect: Expect::Relayed(tcp6, CLIENT6.into(), 40112) },
        Case { description: "ICMPv6 packet too big, quote of IP header + 8 octets", input: too_big(&answer6(40113), Some(8)), expect: Expect::Relayed(tcp6, CLIENT6.into(), 40113) },
        Case { description: "ICMPv6 packet too big, quote of IP header + 4 octets", input: too_big(&answer6(40114), Some(4)), expect: Expect::Relayed(tcp6, CLIENT6.into(), 40114) },
        Case { description: "ICMPv6 packet too big, quote of IP header + 3 octets is passed", input: too_big(&answer6(40115), Some(3)), expect: Expect::Passed(reason::ICMP_QUOTE_SHORT) },
        Case { description: "ICMPv6 destination unreachable quoting a TCP answer", input: Frame::icmp_error(ROUTER6, VIP6, ICMPV6_UNREACHABLE, [0; 4], &answer6(40116), Some(8)), expect: Expect::Relayed(tcp6, CLIENT6.into(), 40116) },
        Case { description: "ICMPv6 time exceeded quoting a TCP answer", input: Frame::icmp_error(ROUTER6, VIP6, ICMPV6_TIME_EXCEEDED, [0; 4], &answer6(40117), Some(8)), expect: Expect::Relayed(tcp6, CLIENT6.into(), 40117) },
        Case { description: "ICMPv6 error after a destination-options header of its own", input: { let mut f = too_big(&answer6(40118), Some(8)); f.ipv6_ext = vec![ext_padding(60, 1)]; f }, expect: Expect::Relayed(tcp6, CLIENT6.into(), 40118) },
        Case { description: "ICMPv6 error quoting an answer with extension headers is passed", input: too_big(&v6_with_ext, Some(16)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMPv6 error quoting UDP from a TCP-only VIP is passed", input: too_big(&Frame::udp(VIP6, 7000, CLIENT6, 40119), Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error quoting an answer from a VIP port with no service is passed", input: frag_needed(&Frame::tcp(VIP4, 22, CLIENT4, 40124, TCP_ACK), Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error to the VIP quoting a packet from another source is passed", input: frag_needed(&Frame::tcp(Ipv4Addr::new(10, 0, 0, 2), 7000, CLIENT4, 40125, TCP_ACK), Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error to another address quoting its own packet is passed", input: Frame::icmp_error(ROUTER4, Ipv4Addr::new(10, 0, 0, 2), ICMP_FRAG_NEEDED, MTU_1400, &Frame::tcp(Ipv4Addr::new(10, 0, 0, 2), 7000, CLIENT4, 40126, TCP_ACK), Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error to another address quoting a VIP's answer is passed", input: Frame::icmp_error(ROUTER4, Ipv4Addr::new(10, 0, 0, 2), ICMP_FRAG_NEEDED, MTU_1400, &answer4(40127), Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error quoting a client's request to the VIP is passed", input: Frame::icmp_error(ROUTER4, CLIENT4, ICMP_FRAG_NEEDED, MTU_1400, &Frame::tcp(CLIENT4, 40128, VIP4, 7000, TCP_ACK), Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error quoting a later fragment of an answer is passed", input: frag_needed(&later_fragment, Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error quoting the first fragment of a UDP answer", input: frag_needed(&first_fragment, Some(8)), expect: Expect::Relayed(udp4, CLIENT4.into(), 40122) },
        Case { description: "ICMP redirect quoting an answer is passed", input: Frame::icmp_error(ROUTER4, VIP4, (5, 1), [10, 0, 0, 253], &answer4(40129), Some(8)), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP echo reply to a VIP is passed", input: Frame::new(CLIENT4.into(), VIP4.into(), L4::Other { proto: 1, bytes: vec![0, 0, 0, 0, 0, 1, 0, 1] }), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMPv6 echo request to a VIP is passed", input: Frame::new(CLIENT6.into(), VIP6.into(), L4::Other { proto: 58, bytes: vec![128, 0, 0, 0, 0, 1, 0, 1] }), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error shorter than an ICMP header is passed", input: Frame::new(ROUTER4.into(), VIP4.into(), L4::Other { proto: 1, bytes: vec![3, 4, 0, 0] }), expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMPv4 error quoting an IPv6 packet is passed", input: { let mut f = too_big(&answer6(40130), Some(8)); f.l4 = L4::Other { proto: 1, bytes: match f.l4 { L4::Other { bytes, .. } => bytes, _ => unreachable!() } }; f.src = ROUTER4.into(); f.dst = VIP4.into(); f }, expect: Expect::Passed(reason::NOT_TCP_UDP) },
        Case { description: "ICMP error about a service with no master drops", input: Frame::icmp_error(ROUTER4, Ipv4Addr::new(10, 0, 0, 102), ICMP_FRAG_NEEDED, MTU_1400, &Frame::tcp(Ipv4Addr::new(10, 0, 0, 102), 7000, CLIENT4, 40131, TCP_ACK), Some(8)), expect: Expect::Dropped(reason::NO_BACKEND) },
        Case { description: "ICMP error about an answer addressed to another host's MAC is dropped", input: frag_needed(&answer4(40132), Some(8)).with_macs(OTHER_MAC, CLIENT_MAC), expect: Expect::Dropped(reason::FOREIGN_MAC) },
    ]
}

/// Another host's unicast MAC, and the client's.
const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// A frame whose IP datagram ends `cut` bytes into its transport header, the rest of that
/// header left in the frame as Ethernet padding: the ports and flags there are not the
/// datagram's.
fn padded_short(frame: Frame, cut: usize) -> Vec<u8> {
    let mut bytes = frame.bytes();
    if frame.src.is_ipv4() {
        let tot_len = (20 + cut) as u16;
        bytes[16..18].copy_from_slice(&tot_len.to_be_bytes());
    } else {
        bytes[18..20].copy_from_slice(&(cut as u16).to_be_bytes());
    }
    bytes
}

/// Frames whose bytes the builder cannot express directly.
fn raw_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 100]);
    let mut bad_ihl = Frame::tcp(CLIENT4, 40004, VIP4, 7000, TCP_SYN).bytes();
    bad_ihl[14] = 0x44; // IHL 4: shorter than the fixed header
    let mut ipv6_as_v4 = Frame::tcp(CLIENT4, 40005, VIP4, 7000, TCP_SYN).bytes();
    ipv6_as_v4[14] = 0x65; // IPv6 version nibble behind an IPv4 EtherType
    let mut bad_doff = Frame::tcp(CLIENT4, 40006, VIP4, 7000, TCP_ACK).bytes();
    bad_doff[14 + 20 + 12] = 0x40; // TCP data offset 4
    // ICMP errors quoting IP header + 8 octets of a master's answer whose IP length ends the
    // quote 3 octets after the quoted IP header: the rest of the ports is Ethernet padding.
    let padded_quote = |v4: bool| {
        let mut bytes = if v4 {
            Frame::icmp_error(ROUTER4, VIP4, ICMP_FRAG_NEEDED, MTU_1400, &Frame::tcp(VIP4, 7000, CLIENT4, 40140, TCP_ACK), Some(8)).bytes()
        } else {
            Frame::icmp_error(ROUTER6, VIP6, ICMPV6_PACKET_TOO_BIG, MTU_1400, &Frame::tcp(VIP6, 7000, CLIENT6, 40141, TCP_ACK), Some(8)).bytes()
        };
        if v4 {
            bytes[16..18].copy_from_slice(&((20 + 8 + 20 + 3) as u16).to_be_bytes());
        } else {
            bytes[18..20].copy_from_slice(&((8 + 40 + 3) as u16).to_be_bytes());
        }
        bytes
    };
    vec![
        ("ICMP error whose IP length ends the quote inside the ports, padded, is passed", padded_quote(true), Expect::Passed(reason::ICMP_QUOTE_SHORT)),
        ("ICMPv6 error whose IP length ends the quote inside the ports, padded, is passed", padded_quote(false), Expect::Passed(reason::ICMP_QUOTE_SHORT)),
        ("ARP request for the VIP is passed", arp, Expect::Passed(reason::NOT_IP)),
        ("IPv4 header length below 20 is malformed", bad_ihl, Expect::Passed(reason::MALFORMED)),
        ("IPv4 EtherType with version 6 is malformed", ipv6_as_v4, Expect::Passed(reason::MALFORMED)),
        ("TCP data offset below 5 is malformed", bad_doff, Expect::Passed(reason::MALFORMED)),
        ("IPv4 UDP datagram ending inside its header, padded, is malformed", padded_short(Frame::udp(CLIENT4, 40030, VIP4, 5353), 4), Expect::Passed(reason::MALFORMED)),
        ("IPv4 TCP segment ending inside its header, padded, is malformed", padded_short(Frame::tcp(CLIENT4, 40031, VIP4, 7000, TCP_SYN), 14), Expect::Passed(reason::MALFORMED)),
        ("IPv4 datagram ending at its IP header, padded, is malformed", padded_short(Frame::tcp(CLIENT4, 40032, VIP4, 7000, TCP_SYN), 0), Expect::Passed(reason::MALFORMED)),
        ("IPv6 UDP datagram ending inside its header, padded, is malformed", padded_short(Frame::udp(CLIENT6, 40033, VIP6, 7000), 6), Expect::Passed(reason::MALFORMED)),
        ("IPv6 TCP segment ending inside its header, padded, is malformed", padded_short(Frame::tcp(CLIENT6, 40034, VIP6, 7000, TCP_SYN), 19), Expect::Passed(reason::MALFORMED)),
    ]
}

/// (description, input frame, expectation, the flow's (source, source port, port) if any).
type Fixture = (String, Vec<u8>, Expect, Option<(IpAddr, u16, u16)>);

fn flow_of(frame: &Frame) -> (IpAddr, u16, u16) {
    match frame.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (frame.src, sport, dport),
        L4::Other { .. } => (frame.src, 0, 0),
    }
}

/// Runs `fixtures` in order on `prog` and describes every one whose verdict, output bytes or
/// counted reason is not what it expects.
fn check(prog: &mut ProgramUnderTest, fixtures: &[Fixture]) -> Vec<String> {
    let mut failures = Vec::new();
    for (description, input, expect, flow) in fixtures {
        let before = prog.reasons().unwrap();
        let out = prog.run(input).unwrap();
        let after = prog.reasons().unwrap();
        let (want_verdict, want_bytes, want_reason) = match expect {
            Expect::Passed(r) => (reason::XDP_PASS, input.clone(), *r),
            Expect::Dropped(r) => (reason::XDP_DROP, out.bytes.clone(), *r),
            Expect::Forwarded(key) => {
                let (src, sport, dport) = flow.expect("forwarded fixtures carry a flow");
                let master = prog.table_master(key, src, sport, dport).expect("the table has a master");
                (reason::XDP_TX, forwarded(input, prog.master_mac(key, master)), reason::FORWARDED)
            }
            Expect::Fragment(key, code) => {
                let (src, sport, dport) = flow.expect("fragment fixtures carry their datagram's flow");
                let master = prog.table_master(key, src, sport, dport).expect("the table has a master");
                (reason::XDP_TX, forwarded(input, prog.master_mac(key, master)), *code)
            }
            Expect::Relayed(key, client, cport) => {
                let master = prog.table_master(key, *client, *cport, key.port).expect("the table has a master");
                (reason::XDP_TX, forwarded(input, prog.master_mac(key, master)), reason::ICMP_ERROR_FORWARDED)
            }
        };
        let counted: Vec<u32> = (0..after.len() as u32)
            .filter(|i| after[*i as usize].packets != before[*i as usize].packets)
            .collect();
        if out.verdict != want_verdict {
            failures.push(format!("{description}: verdict {} want {}", verdict_name(out.verdict), verdict_name(want_verdict)));
        } else if out.bytes != want_bytes {
            failures.push(format!("{description}: output bytes differ\n  got  {:02x?}\n  want {:02x?}", out.bytes, want_bytes));
        } else if counted != vec![want_reason] {
            let names: Vec<&str> = counted.iter().map(|c| reason::name(*c)).collect();
            failures.push(format!("{description}: counted under {names:?}, want [{}]", reason::name(want_reason)));
        }
    }
    failures
}

#[test]
fn fixtures_give_the_expected_verdict_bytes_and_reason() {
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    // Backends come up one by one while the config is applied, which leaves slots marked as
    // changed: there a TCP packet that is not a SYN (and an ICMP error about its flow) goes
    // to the slot's previous master, not the one `table_master` names. A sweep with no flow
    // recorded clears every mark, so every flow here is where the table says.
    prog.settle();
    let mut all: Vec<Fixture> = cases()
        .into_iter()
        .map(|c| (c.description.to_string(), c.input.bytes(), c.expect, Some(flow_of(&c.input))))
        .collect();
    all.extend(raw_cases().into_iter().map(|(d, b, e)| (d.to_string(), b, e, None)));

    let failures = check(&mut prog, &all);
    assert!(failures.is_empty(), "{} of {} fixtures failed:\n{}", failures.len(), all.len(), failures.join("\n"));
}

/// Fragments of one datagram, in the orders a network delivers them: each fixture runs after
/// the ones before it, on the same program, so a later fragment sees what its first fragment
/// left. Every datagram uses an IP id of its own.
fn fragment_sequences() -> Vec<(&'static str, Frame, Expect)> {
    let udp4 = key(VIP4, 5353, 17);
    let tcp4 = key(VIP4, 7000, 6);
    let tcp6 = key(VIP6, 7000, 6);
    let sticky = key(STICKY_VIP4, 7000, 6);
    // Part of UDP datagram `id` from `client`:`port`; `frag` is the flags-and-offset field.
    // The builder puts the ports in every part, so the expected master is known; the program
    // reads them only from a first fragment.
    let udp = |client: Ipv4Addr, port: u16, id: u16, frag: u16| {
        let mut f = Frame::udp(client, port, VIP4, 5353).with_payload(&[9; 32]);
        f.ipv4_id = id;
        f.ipv4_frag = frag;
        f
    };
    let tcp = |dst: Ipv4Addr, port: u16, id: u16, frag: u16| {
        let mut f = Frame::tcp(CLIENT4, port, dst, 7000, TCP_SYN).with_payload(&[9; 32]);
        f.ipv4_id = id;
        f.ipv4_frag = frag;
        f
    };
    let tcp_port = |dst: Ipv4Addr, sport: u16, dport: u16, id: u16, frag: u16| {
        let mut f = Frame::tcp(CLIENT4, sport, dst, dport, TCP_SYN).with_payload(&[9; 32]);
        f.ipv4_id = id;
        f.ipv4_frag = frag;
        f
    };
    let udp_sticky = |port: u16, id: u16, frag: u16| {
        let mut f = Frame::udp(CLIENT4, port, Ipv4Addr::new(10, 0, 0, 103), 5353).with_payload(&[9; 32]);
        f.ipv4_id = id;
        f.ipv4_frag = frag;
        f
    };
    let tcp6_part = |port: u16, id: u32, offset: u16, more: bool| {
        let mut f = Frame::tcp(CLIENT6, port, VIP6, 7000, TCP_SYN).with_payload(&[9; 32]);
        f.ipv6_ext = vec![ext_fragment_id(offset, more, id)];
        f
    };
    const FIRST: u16 = 0x2000;
    const MIDDLE: u16 = 0x2000 | 5; // offset 40 octets, more to come
    const LAST: u16 = 10; // offset 80 octets, the last part
    let other_client = Ipv4Addr::new(10, 0, 0, 2);
    let too_short_first = {
        // A UDP first fragment whose 2 octets of payload end before the destination port.
        let mut f = Frame::new(CLIENT4.into(), VIP4.into(), L4::Other { proto: 17, bytes: vec![0x9c, 0x50] });
        f.ipv4_id = 0x4107;
        f.ipv4_frag = FIRST;
        f
    };
    let mut later_too_short = udp(CLIENT4, 40150, 0x4107, LAST);
    later_too_short.ipv4_id = 0x4107;
    vec![
        ("in order: first fragment", udp(CLIENT4, 40150, 0x4101, FIRST), Expect::Fragment(udp4, reason::FRAGMENT_FIRST)),
        ("in order: middle fragment follows it", udp(CLIENT4, 40150, 0x4101, MIDDLE), Expect::Fragment(udp4, reason::FRAGMENT_FOLLOWED)),
        ("in order: last fragment follows it", udp(CLIENT4, 40150, 0x4101, LAST), Expect::Fragment(udp4, reason::FRAGMENT_FOLLOWED)),
        ("out of order: a later fragment before its first is dropped", udp(CLIENT4, 40151, 0x4102, LAST), Expect::Dropped(reason::FRAGMENT)),
        ("out of order: then the first fragment", udp(CLIENT4, 40151, 0x4102, FIRST), Expect::Fragment(udp4, reason::FRAGMENT_FIRST)),
        ("out of order: then the middle one follows it", udp(CLIENT4, 40151, 0x4102, MIDDLE), Expect::Fragment(udp4, reason::FRAGMENT_FOLLOWED)),
        ("duplicate: first fragment", udp(CLIENT4, 40152, 0x4103, FIRST), Expect::Fragment(udp4, reason::FRAGMENT_FIRST)),
        ("duplicate: the first fragment again goes to the same master", udp(CLIENT4, 40152, 0x4103, FIRST), Expect::Fragment(udp4, reason::FRAGMENT_FIRST)),
        ("duplicate: the last fragment", udp(CLIENT4, 40152, 0x4103, LAST), Expect::Fragment(udp4, reason::FRAGMENT_FOLLOWED)),
        ("duplicate: the last fragment again", udp(CLIENT4, 40152, 0x4103, LAST), Expect::Fragment(udp4, reason::FRAGMENT_FOLLOWED)),
        ("overlapping: first fragment", udp(CLIENT4, 40153, 0x4104, FIRST), Expect::Fragment(udp4, reason::FRAGMENT_FIRST)),
        ("overlapping: a part at offset 8, inside the first, follows it", udp(CLIENT4, 40153, 0x4104, 0x2000 | 1), Expect::Fragment(udp4, reason::FRAGMENT_FOLLOWED)),
        ("lone: a later fragment of a datagram whose first never came is dropped", udp(CLIENT4, 40154, 0x4105, MIDDLE), Expect::Dropped(reason::FRAGMENT)),
        ("same id from another client is another datagram: dropped", udp(other_client, 40150, 0x4101, LAST), Expect::Dropped(reason::FRAGMENT)),
        ("same id and addresses, another protocol, is another datagram: dropped", tcp(VIP4, 40150, 0x4101, LAST), Expect::Dropped(reason::FRAGMENT)),
        ("a TCP first fragment to the same VIP", tcp(VIP4, 40155, 0x4106, FIRST), Expect::Fragment(tcp4, reason::FRAGMENT_FIRST)),
        ("and its last fragment follows it", tcp(VIP4, 40155, 0x4106, LAST), Expect::Fragment(tcp4, reason::FRAGMENT_FOLLOWED)),
        ("a UDP first fragment too short for its ports is dropped", too_short_first, Expect::Dropped(reason::FRAGMENT)),
        ("and its later fragment too", later_too_short, Expect::Dropped(reason::FRAGMENT)),
        ("IPv6 in order: first fragment", tcp6_part(40160, 0x6101, 0, true), Expect::Fragment(tcp6, reason::FRAGMENT_FIRST)),
        ("IPv6 in order: last fragment follows it", tcp6_part(40160, 0x6101, 100, false), Expect::Fragment(tcp6, reason::FRAGMENT_FOLLOWED)),
        ("IPv6 out of order: a later fragment first is dropped", tcp6_part(40161, 0x6102, 100, false), Expect::Dropped(reason::FRAGMENT)),
        ("IPv6 out of order: then the first fragment", tcp6_part(40161, 0x6102, 0, true), Expect::Fragment(tcp6, reason::FRAGMENT_FIRST)),
        ("IPv6 out of order: then a middle one follows it", tcp6_part(40161, 0x6102, 50, true), Expect::Fragment(tcp6, reason::FRAGMENT_FOLLOWED)),
        ("IPv6 lone later fragment is dropped", tcp6_part(40162, 0x6103, 50, true), Expect::Dropped(reason::FRAGMENT)),
        ("IPv6 same id as an IPv4 datagram's is another datagram: dropped", tcp6_part(40160, 0x4101, 100, false), Expect::Dropped(reason::FRAGMENT)),
        // The sticky VIP's only TCP service hashes the client address only: a part that
        // overtook its first fragment goes by its source, where the first one goes too.
        ("maglev-source: a later fragment before its first goes by its source", tcp(STICKY_VIP4, 40170, 0x4201, LAST), Expect::Fragment(sticky, reason::FRAGMENT_BY_SOURCE)),
        ("maglev-source: its first fragment goes to the same master", tcp(STICKY_VIP4, 40170, 0x4201, FIRST), Expect::Fragment(sticky, reason::FRAGMENT_FIRST)),
        ("maglev-source: a middle one follows the first", tcp(STICKY_VIP4, 40170, 0x4201, MIDDLE), Expect::Fragment(sticky, reason::FRAGMENT_FOLLOWED)),
        // UDP flows stay on their recorded master after their slot's mark is cleared, so a
        // clean slot does not name a UDP flow's master: no fragment of UDP goes by source.
        ("maglev-source UDP: a later fragment before its first is dropped", udp_sticky(40171, 0x4202, LAST), Expect::Dropped(reason::FRAGMENT)),
        ("maglev-source: a first fragment to a port with no service is dropped", tcp_port(STICKY_VIP4, 40172, 8443, 0x4203, FIRST), Expect::Dropped(reason::FRAGMENT)),
        ("a first fragment to a port with no service is dropped", tcp_port(VIP4, 40173, 8443, 0x4204, FIRST), Expect::Dropped(reason::FRAGMENT)),
        // The fragment header names destination options, not UDP: its later parts will say
        // the same, so it is one of them (no marker for that protocol: the kernel's).
        ("IPv6 first fragment followed by another extension header is passed", {
            let mut f = Frame::tcp(CLIENT6, 40174, VIP6, 7000, TCP_SYN).with_payload(&[9; 32]);
            f.ipv6_ext = vec![ext_fragment_id(0, true, 0x6104), ext_padding(60, 1)];
            f
        }, Expect::Passed(reason::NOT_A_SERVICE)),
    ]
}

#[test]
fn fragments_of_a_datagram_reach_the_master_of_its_first_fragment() {
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    prog.settle();
    let all: Vec<Fixture> = fragment_sequences()
        .into_iter()
        .map(|(d, f, e)| (d.to_string(), f.bytes(), e, Some(flow_of(&f))))
        .collect();
    let failures = check(&mut prog, &all);
    assert!(failures.is_empty(), "{} of {} fragment fixtures failed:\n{}", failures.len(), all.len(), failures.join("\n"));
}

#[test]
fn a_later_fragment_past_the_timeout_is_dropped() {
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    prog.settle();
    let udp4 = key(VIP4, 5353, 17);
    let part = |frag: u16| {
        let mut f = Frame::udp(CLIENT4, 40180, VIP4, 5353).with_payload(&[9; 32]);
        f.ipv4_id = 0x4301;
        f.ipv4_frag = frag;
        f
    };
    let first = part(0x2000);
    let last = part(10);
    let fixture = |d: &str, f: &Frame, e: Expect| (d.to_string(), f.bytes(), e, Some(flow_of(f)));
    let mut failures = check(&mut prog, &[fixture("first fragment", &first, Expect::Fragment(udp4, reason::FRAGMENT_FIRST))]);
    // The coarse clock the program reads advances by ticks of a few milliseconds.
    std::thread::sleep(std::time::Duration::from_nanos(mim_lb_common::limits::FRAGMENT_TIMEOUT_NS) + std::time::Duration::from_millis(100));
    failures.extend(check(&mut prog, &[fixture("last fragment after the timeout", &last, Expect::Dropped(reason::FRAGMENT))]));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn forwarding_changes_nothing_but_the_two_macs() {
    let prog = ProgramUnderTest::new(CONFIG).unwrap();
    let input = Frame::tcp(CLIENT4, 41000, VIP4, 7000, TCP_ACK | TCP_PSH)
        .with_vlan(0x8100, 7)
        .with_payload(&[0xab; 200])
        .bytes();
    let out = prog.run(&input).unwrap();
    assert_eq!(out.verdict, reason::XDP_TX);
    assert_eq!(out.bytes.len(), input.len());
    assert_eq!(out.bytes[12..], input[12..], "everything after the MACs is untouched");
    assert_eq!(&out.bytes[6..12], &mim_lb_tests::testrun::GATEWAY_MAC);
}

#[test]
fn every_truncation_of_a_valid_frame_is_never_forwarded() {
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    let frames = [
        Frame::tcp(CLIENT4, 42000, VIP4, 7000, TCP_SYN).bytes(),
        Frame::udp(CLIENT4, 42000, VIP4, 5353).bytes(),
        {
            let mut f = Frame::tcp(CLIENT4, 42001, VIP4, 7000, TCP_SYN).with_vlan(0x88a8, 1).with_vlan(0x8100, 2);
            f.ipv4_options = vec![1, 1, 1, 0];
            f.bytes()
        },
        {
            let mut f = Frame::tcp(CLIENT6, 42002, VIP6, 7000, TCP_SYN);
            f.ipv6_ext = vec![ext_padding(0, 1), ext_padding(60, 2)];
            f.bytes()
        },
    ];
    for full in &frames {
        assert_eq!(prog.run(full).unwrap().verdict, reason::XDP_TX, "the whole frame is forwarded");
        let malformed_before = prog.reason_packets(reason::MALFORMED).unwrap();
        let mut ran = 0;
        for len in 0..full.len() {
            let cut = &full[..len];
            match prog.run(cut) {
                Ok(out) => {
                    ran += 1;
                    assert_ne!(out.verdict, reason::XDP_TX, "a frame cut to {len} octets was forwarded");
                    assert_eq!(out.bytes, cut, "a frame cut to {len} octets was modified");
                }
                // The kernel refuses to run XDP on less than an Ethernet header.
                Err(_) if len < 14 => {}
                Err(e) => panic!("frame cut to {len} octets: {e:#}"),
            }
        }
        let malformed = prog.reason_packets(reason::MALFORMED).unwrap() - malformed_before;
        assert_eq!(malformed, ran, "every truncated frame that ran is counted as malformed");
    }
}

#[test]
fn established_flow_keeps_its_master_when_the_table_changes() {
    let tcp4 = key(VIP4, 7000, 6);
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    // Open many flows so some hash to slots that the change below moves.
    let flows: Vec<u16> = (20000..20400).collect();
    let mut first_master = Vec::new();
    for &sport in &flows {
        let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_SYN).bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_TX);
        first_master.push(<[u8; 6]>::try_from(&out.bytes[0..6]).unwrap());
    }

    // A fourth master joins: Maglev gives it about a quarter of the slots.
    let grown = CONFIG.replacen(
        "[[service]]\nname = \"udp4\"",
        "[[service.backend]]\naddress = \"10.0.0.14\"\nmac = \"02:00:00:00:00:14\"\n\n[[service]]\nname = \"udp4\"",
        1,
    );
    prog.apply(&grown).unwrap();

    let mut moved_in_table = 0;
    for (i, &sport) in flows.iter().enumerate() {
        let now_in_table = prog.table_master(&tcp4, CLIENT4.into(), sport, 7000).unwrap();
        if prog.master_mac(&tcp4, now_in_table) != first_master[i] {
            moved_in_table += 1;
        }
        let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_ACK).bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_TX);
        assert_eq!(out.bytes[0..6], first_master[i], "flow from port {sport} moved to another master");
    }
    assert!(moved_in_table > 40, "the change moved only {moved_in_table} of 400 flows' slots: the test proves nothing");

    // New flows on those slots go to the new master.
    let new_mac = prog.master_mac(&tcp4, "10.0.0.14".parse().unwrap());
    let mut to_new = 0;
    for sport in 30000..30400u16 {
        let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_SYN).bytes()).unwrap();
        let want = prog.table_master(&tcp4, CLIENT4.into(), sport, 7000).unwrap();
        assert_eq!(out.bytes[0..6], prog.master_mac(&tcp4, want));
        to_new += (out.bytes[0..6] == new_mac) as usize;
    }
    assert!(to_new > 40, "only {to_new} of 400 new flows reached the new master");
}

/// What happens to the recorded flows of one master (10.0.0.13) when something happens to it:
/// each event, on a fresh program, after opening flows of which some land on that master.
#[test]
fn each_backend_event_moves_or_keeps_the_masters_flows_as_documented() {
    use mim_lb::director::Admin;
    let tcp4 = key(VIP4, 7000, 6);
    let target: IpAddr = "10.0.0.13".parse().unwrap();
    let without_target = CONFIG.replacen(
        "[[service.backend]]\naddress = \"10.0.0.13\"\nmac = \"02:00:00:00:00:13\"\n\n[[service]]\nname = \"udp4\"",
        "[[service]]\nname = \"udp4\"",
        1,
    );
    let weight_zero = CONFIG.replacen(
        "address = \"10.0.0.13\"\nmac = \"02:00:00:00:00:13\"\n",
        "address = \"10.0.0.13\"\nmac = \"02:00:00:00:00:13\"\nweight = 0\n",
        1,
    );
    assert_ne!(without_target, CONFIG);
    assert_ne!(weight_zero, CONFIG);

    type Event = Box<dyn Fn(&mut ProgramUnderTest)>;
    let cases: Vec<(&str, Event, bool)> = vec![
        ("health check fails", Box::new(move |p: &mut ProgramUnderTest| {
            p.director.set_health(&tcp4, target, false, "test: tcp check failed").unwrap();
        }), false),
        ("operator disables it", Box::new(move |p: &mut ProgramUnderTest| {
            p.director.set_admin(&tcp4, target, Admin::Disabled).unwrap();
        }), false),
        ("operator drains it", Box::new(move |p: &mut ProgramUnderTest| {
            p.director.set_admin(&tcp4, target, Admin::Drained).unwrap();
        }), true),
        ("its weight becomes 0", Box::new(move |p: &mut ProgramUnderTest| p.apply(&weight_zero).unwrap()), true),
        ("it is removed from the config", Box::new(move |p: &mut ProgramUnderTest| p.apply(&without_target).unwrap()), true),
    ];
    for (event, apply, flows_stay) in cases {
        let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
        let target_mac = prog.master_mac(&tcp4, target);
        let mut on_target = Vec::new();
        let mut elsewhere = Vec::new();
        for sport in 21000..21300u16 {
            let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_SYN).bytes()).unwrap();
            let mac: [u8; 6] = out.bytes[0..6].try_into().unwrap();
            if mac == target_mac { on_target.push(sport) } else { elsewhere.push((sport, mac)) }
        }
        assert!(on_target.len() > 30, "{event}: too few flows landed on {target} to test");
        apply(&mut prog);

        for &sport in &on_target {
            let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_ACK).bytes()).unwrap();
            assert_eq!(out.verdict, reason::XDP_TX, "{event}");
            if flows_stay {
                assert_eq!(out.bytes[0..6], target_mac, "{event}: flow from port {sport} left its master");
            } else {
                let want = prog.table_master(&tcp4, CLIENT4.into(), sport, 7000).unwrap();
                assert_ne!(want, target, "{event}");
                assert_eq!(out.bytes[0..6], prog.master_mac(&tcp4, want), "{event}: flow from port {sport} not re-steered");
            }
        }
        for &(sport, mac) in &elsewhere {
            let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_ACK).bytes()).unwrap();
            assert_eq!(out.bytes[0..6], mac, "{event}: a flow on another master moved");
        }
        for sport in 30000..30300u16 {
            let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_SYN).bytes()).unwrap();
            assert_eq!(out.verdict, reason::XDP_TX, "{event}");
            assert_ne!(out.bytes[0..6], target_mac, "{event}: a new flow reached {target}");
        }
    }
}

/// The sweep clears slot marks and retires a removed master once its flows have been idle for
/// the timeout, and not before. Time is passed in, so the test does not wait.
#[test]
fn sweep_retires_a_removed_master_only_after_its_flows_go_idle() {
    let tcp4 = key(VIP4, 7000, 6);
    let target: IpAddr = "10.0.0.13".parse().unwrap();
    let idle = std::time::Duration::from_secs(60);
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    let target_mac = prog.master_mac(&tcp4, target);
    let on_target: Vec<u16> = (22000..22300u16)
        .filter(|&sport| prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_SYN).bytes()).unwrap().bytes[0..6] == target_mac)
        .collect();
    assert!(on_target.len() > 30);
    prog.apply(&CONFIG.replacen(
        "[[service.backend]]\naddress = \"10.0.0.13\"\nmac = \"02:00:00:00:00:13\"\n\n[[service]]\nname = \"udp4\"",
        "[[service]]\nname = \"udp4\"",
        1,
    ))
    .unwrap();
    assert!(prog.director.sweep_pending());
    let now = mim_lb::director::monotonic_ns();

    // Within the timeout: the flows may be alive, so nothing is retired and marks stay.
    let early = prog.director.sweep(now, idle, idle).unwrap();
    assert!(early.backends_retired.is_empty(), "{early:?}");
    assert!(early.live_flows >= on_target.len(), "{early:?}");
    assert!(prog.director.desired()[&tcp4].backends.contains_key(&target));
    for &sport in &on_target {
        let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_ACK).bytes()).unwrap();
        assert_eq!(out.bytes[0..6], target_mac);
    }

    // A timeout later, with no packet in between: retired, its records deleted, marks cleared.
    let late = prog.director.sweep(now + idle.as_nanos() as u64 * 2, idle, idle).unwrap();
    assert_eq!(late.backends_retired, vec![(tcp4, target)], "{late:?}");
    assert!(late.flows_deleted >= on_target.len(), "{late:?}");
    assert!(late.marks_cleared > 0, "{late:?}");
    assert!(!prog.director.desired()[&tcp4].backends.contains_key(&target));
    let marked = prog.director.written()[&tcp4].table().iter().filter(|e| *e & mim_lb_common::MAGLEV_SLOT_CHANGED != 0).count();
    assert_eq!(marked, 0, "every mark is cleared once no live flow needs it");
    assert!(!prog.director.sweep_pending());
    for &sport in &on_target {
        let out = prog.run(&Frame::tcp(CLIENT4, sport, VIP4, 7000, TCP_ACK).bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_TX);
        assert_ne!(out.bytes[0..6], target_mac, "a flow still reached the retired master");
    }
}

#[test]
fn source_scheduler_sends_every_connection_of_a_client_to_one_master() {
    let prog = ProgramUnderTest::new(CONFIG).unwrap();
    let vip = Ipv4Addr::new(10, 0, 0, 101);
    let mut masters = std::collections::BTreeSet::new();
    for sport in 50000..50050u16 {
        let out = prog.run(&Frame::tcp(CLIENT4, sport, vip, 7000, TCP_SYN).bytes()).unwrap();
        assert_eq!(out.verdict, reason::XDP_TX);
        masters.insert(out.bytes[0..6].to_vec());
    }
    assert_eq!(masters.len(), 1, "one client reached {} masters", masters.len());
    let mut clients = std::collections::BTreeSet::new();
    for host in 1..=60u8 {
        let out = prog.run(&Frame::tcp(Ipv4Addr::new(10, 9, 0, host), 50000, vip, 7000, TCP_SYN).bytes()).unwrap();
        clients.insert(out.bytes[0..6].to_vec());
    }
    assert_eq!(clients.len(), 3, "60 clients should reach all three masters");
}

#[test]
fn nothing_is_forwarded_before_the_maps_are_filled() {
    let mut prog = ProgramUnderTest::unconfigured().unwrap();
    let input = Frame::tcp(CLIENT4, 40000, VIP4, 7000, TCP_SYN).bytes();
    let out = prog.run(&input).unwrap();
    assert_eq!(out.verdict, reason::XDP_PASS);
    assert_eq!(out.bytes, input);
    assert_eq!(prog.reason_packets(reason::NOT_READY).unwrap(), 1);
}

#[test]
fn udp_flows_are_recorded_and_counted_per_backend() {
    let prog = ProgramUnderTest::new(CONFIG).unwrap();
    let udp = key(VIP4, 5353, 17);
    for _ in 0..3 {
        prog.run(&Frame::udp(CLIENT4, 43000, VIP4, 5353).bytes()).unwrap();
    }
    let master = prog.table_master(&udp, CLIENT4.into(), 43000, 5353).unwrap();
    let id = prog.backend_id(&udp, master);
    let stats = prog.director.dataplane().maps_ro().backend_stats(id).unwrap();
    assert_eq!(stats.packets, 3);
    assert_eq!(stats.new_flows, 1, "the first datagram records the flow; the others find it");
}

/// `mim-lb simulate` runs a second copy of the program over the live maps: it must reach the
/// decision the live program reaches, connection table included, and leave no trace.
#[test]
fn simulation_takes_the_live_decision_and_leaves_no_trace() {
    use mim_lb::simulate::{Flow, established_packet, first_packet, icmp_error_packet};
    let gw = mim_lb_tests::testrun::GATEWAY_MAC;
    let tcp4 = key(VIP4, 7000, 6);
    let mut prog = ProgramUnderTest::pinned(CONFIG).unwrap();
    let simulator = prog.director.dataplane().simulator().unwrap();
    let flows_before = prog.director.dataplane().maps_ro().flows().unwrap().len();
    let reasons_before = prog.reasons().unwrap();

    // New flows: the simulation names the slot's master and records nothing.
    for sport in 23000..23100u16 {
        let flow: Flow = format!("{CLIENT4}:{sport}-{VIP4}:7000/tcp").parse().unwrap();
        let (code, out) = simulator.run(&first_packet(&flow, gw)).unwrap();
        assert_eq!(code, reason::FORWARDED);
        let want = prog.table_master(&tcp4, CLIENT4.into(), sport, 7000).unwrap();
        assert_eq!(out[0..6], prog.master_mac(&tcp4, want));
    }
    assert_eq!(prog.director.dataplane().maps_ro().flows().unwrap().len(), flows_before, "the simulation recorded flows");
    let reasons_after = prog.reasons().unwrap();
    assert_eq!(reasons_after, reasons_before, "the simulation counted packets");

    // Established flows after a table change: the simulation follows the connection table.
    let sports: Vec<u16> = (24000..24400).collect();
    let first: Vec<Vec<u8>> = sports
        .iter()
        .map(|&p| prog.run(&Frame::tcp(CLIENT4, p, VIP4, 7000, TCP_SYN).bytes()).unwrap().bytes[0..6].to_vec())
        .collect();
    prog.apply(&CONFIG.replacen(
        "[[service]]\nname = \"udp4\"",
        "[[service.backend]]\naddress = \"10.0.0.14\"\nmac = \"02:00:00:00:00:14\"\n\n[[service]]\nname = \"udp4\"",
        1,
    ))
    .unwrap();
    let mut moved_slots = 0;
    let flows_before = prog.director.dataplane().maps_ro().flows().unwrap();
    let reasons_before = prog.reasons().unwrap();
    for (i, &sport) in sports.iter().enumerate() {
        let flow: Flow = format!("{CLIENT4}:{sport}-{VIP4}:7000/tcp").parse().unwrap();
        let (code, out) = simulator.run(&established_packet(&flow, gw)).unwrap();
        assert_eq!(code, reason::FORWARDED);
        assert_eq!(out[0..6], first[i][..], "the simulation of an established flow left its master");
        // An ICMP error about the flow's answers is relayed to the flow's master too.
        let (code, out) = simulator.run(&icmp_error_packet(&flow, gw)).unwrap();
        assert_eq!(code, reason::ICMP_ERROR_FORWARDED, "flow from port {sport}");
        assert_eq!(out[0..6], first[i][..], "the simulated ICMP error about flow from port {sport} went elsewhere");
        let now_in_table = prog.table_master(&tcp4, CLIENT4.into(), sport, 7000).unwrap();
        // A new connection from the same port follows the current table, whatever is recorded.
        let (code, out) = simulator.run(&first_packet(&flow, gw)).unwrap();
        assert_eq!(code, reason::FORWARDED);
        assert_eq!(out[0..6], prog.master_mac(&tcp4, now_in_table), "a simulated SYN did not follow the table");
        moved_slots += (prog.master_mac(&tcp4, now_in_table)[..] != first[i][..]) as usize;
    }
    assert!(moved_slots > 40, "only {moved_slots} slots moved: the test proves nothing");
    let mut flows_after = prog.director.dataplane().maps_ro().flows().unwrap();
    let mut flows_before = flows_before;
    flows_before.sort_by_key(|(k, _)| (k.src, k.sport));
    flows_after.sort_by_key(|(k, _)| (k.src, k.sport));
    assert_eq!(flows_after, flows_before, "the simulation changed the connection table");
    assert_eq!(prog.reasons().unwrap(), reasons_before, "the simulation counted packets");

    // Not a service, and no backend: the reason comes back too.
    let other: Flow = format!("{CLIENT4}:1-{VIP4}:22/tcp").parse().unwrap();
    assert_eq!(simulator.run(&first_packet(&other, gw)).unwrap().0, reason::NOT_A_SERVICE);
    let empty: Flow = format!("{CLIENT4}:1-10.0.0.102:7000/tcp").parse().unwrap();
    assert_eq!(simulator.run(&first_packet(&empty, gw)).unwrap().0, reason::NO_BACKEND);
}

/// A change to one service rebuilds that service's table only; an unchanged configuration
/// rebuilds nothing and writes nothing.
#[test]
fn a_change_rebuilds_only_its_own_service() {
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    let same = mim_lb::config::Config::parse(CONFIG).unwrap();
    let report = prog.director.apply_config(&same).unwrap();
    assert_eq!((report.tables_built, report.maglev_writes, report.backend_writes), (0, 0, 0), "{report:?}");
    let heavier = CONFIG.replacen(
        "[[service.backend]]\naddress = \"fd00::12\"\nmac = \"02:00:00:00:06:12\"",
        "[[service.backend]]\naddress = \"fd00::12\"\nmac = \"02:00:00:00:06:12\"\nweight = 300",
        1,
    );
    assert_ne!(heavier, CONFIG);
    let report = prog.director.apply_config(&mim_lb::config::Config::parse(&heavier).unwrap()).unwrap();
    assert_eq!(report.tables_built, 1, "{report:?}");
    assert_eq!(report.changed_services, vec!["tcp6".to_owned()]);
}

/// The connection table, in a comparable order.
fn flow_table(prog: &ProgramUnderTest) -> Vec<(mim_lb_common::FlowKey, mim_lb_common::FlowEntry)> {
    let mut flows = prog.director.dataplane().maps_ro().flows().unwrap();
    flows.sort_by_key(|(k, _)| (k.src, k.dst, k.sport, k.dport, k.proto));
    flows
}

/// An ICMP error about a flow goes where the flow's own packets go now, which after a drain
/// is not the master its slot names: a UDP flow's recorded master, an unrecorded TCP
/// connection's first master. And an ICMP error never creates, refreshes or moves a record.
#[test]
fn icmp_errors_follow_the_flows_master_after_a_drain_and_record_nothing() {
    use mim_lb::director::Admin;
    let tcp4 = key(VIP4, 7000, 6);
    let udp4 = key(VIP4, 5353, 17);
    let drained: IpAddr = "10.0.0.12".parse().unwrap();
    let mut prog = ProgramUnderTest::new(CONFIG).unwrap();
    prog.settle();
    let tcp_mac = prog.master_mac(&tcp4, drained);
    let udp_mac = prog.master_mac(&udp4, drained);
    // Flows opened before the drain: TCP connections (a SYN on a clean slot records nothing)
    // and UDP flows (recorded by their first datagram), those on the master to drain.
    let tcp_on: Vec<u16> = (25000..25300u16)
        .filter(|&p| prog.run(&Frame::tcp(CLIENT4, p, VIP4, 7000, TCP_SYN).bytes()).unwrap().bytes[0..6] == tcp_mac)
        .collect();
    let udp_on: Vec<u16> = (26000..26300u16)
        .filter(|&p| prog.run(&Frame::udp(CLIENT4, p, VIP4, 5353).bytes()).unwrap().bytes[0..6] == udp_mac)
        .collect();
    assert!(tcp_on.len() > 30 && udp_on.len() > 30, "too few flows on {drained}: {} TCP, {} UDP", tcp_on.len(), udp_on.len());
    prog.director.set_admin(&tcp4, drained, Admin::Drained).unwrap();
    prog.director.set_admin(&udp4, drained, Admin::Drained).unwrap();
    // A record's last-seen time is refreshed at most once a second by the flow's packets:
    // let the records age past that, so that a refresh by an ICMP error would show below.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let table_before = flow_table(&prog);
    let relayed_before = prog.reason_packets(reason::ICMP_ERROR_FORWARDED).unwrap();
    let mut relayed = 0;

    for &cport in &tcp_on {
        assert_ne!(prog.table_master(&tcp4, CLIENT4.into(), cport, 7000), Some(drained), "the drain left port {cport}'s slot");
        let answer = Frame::tcp(VIP4, 7000, CLIENT4, cport, TCP_ACK | TCP_PSH).with_payload(&[1; 1400]);
        let error = Frame::icmp_error(ROUTER4, VIP4, ICMP_FRAG_NEEDED, MTU_1400, &answer, Some(8)).bytes();
        let out = prog.run(&error).unwrap();
        assert_eq!((out.verdict, &out.bytes), (reason::XDP_TX, &forwarded(&error, tcp_mac)), "TCP flow from port {cport}");
        relayed += 1;
    }
    for &cport in &udp_on {
        assert_ne!(prog.table_master(&udp4, CLIENT4.into(), cport, 5353), Some(drained), "the drain left port {cport}'s slot");
        let answer = Frame::udp(VIP4, 5353, CLIENT4, cport).with_payload(&[1; 1400]);
        let error = Frame::icmp_error(ROUTER4, VIP4, ICMP_FRAG_NEEDED, MTU_1400, &answer, Some(8)).bytes();
        let out = prog.run(&error).unwrap();
        assert_eq!((out.verdict, &out.bytes), (reason::XDP_TX, &forwarded(&error, udp_mac)), "UDP flow from port {cport}");
        relayed += 1;
    }
    // UDP flows never seen: the error goes to the slot's master, where the flow's first
    // datagram would go, and records nothing, also on the slots the drain marked (where that
    // datagram would be recorded).
    for cport in 27000..27300u16 {
        let answer = Frame::udp(VIP4, 5353, CLIENT4, cport);
        let error = Frame::icmp_error(ROUTER4, VIP4, ICMP_PORT_UNREACHABLE, [0; 4], &answer, None).bytes();
        let out = prog.run(&error).unwrap();
        let want = prog.table_master(&udp4, CLIENT4.into(), cport, 5353).unwrap();
        assert_eq!((out.verdict, &out.bytes), (reason::XDP_TX, &forwarded(&error, prog.master_mac(&udp4, want))), "new UDP flow from port {cport}");
        relayed += 1;
    }
    assert_eq!(flow_table(&prog), table_before, "an ICMP error changed the connection table");
    assert_eq!(prog.reason_packets(reason::ICMP_ERROR_FORWARDED).unwrap() - relayed_before, relayed);

    // The flows' own packets still go where their errors went.
    for &cport in &tcp_on {
        let out = prog.run(&Frame::tcp(CLIENT4, cport, VIP4, 7000, TCP_ACK).bytes()).unwrap();
        assert_eq!(out.bytes[0..6], tcp_mac, "TCP flow from port {cport}");
    }
    for &cport in &udp_on {
        let out = prog.run(&Frame::udp(CLIENT4, cport, VIP4, 5353).bytes()).unwrap();
        assert_eq!(out.bytes[0..6], udp_mac, "UDP flow from port {cport}");
    }
}

/// No cut of an ICMP error frame is relayed unless the cut leaves the quote's ports, and no
/// cut frame is changed unless it is relayed.
#[test]
fn every_truncation_of_an_icmp_error_is_relayed_only_with_its_ports() {
    let prog = ProgramUnderTest::new(CONFIG).unwrap();
    let mut with_options = Frame::tcp(VIP4, 7000, CLIENT4, 42100, TCP_ACK);
    with_options.ipv4_options = vec![1, 1, 1, 0];
    let quotes = [
        with_options,
        Frame::udp(VIP4, 5353, CLIENT4, 42101).with_payload(&[2; 40]),
        Frame::tcp(VIP6, 7000, CLIENT6, 42102, TCP_ACK).with_payload(&[3; 40]),
    ];
    for quoted in &quotes {
        let (router, vip): (IpAddr, IpAddr) = if quoted.src.is_ipv4() { (ROUTER4.into(), VIP4.into()) } else { (ROUTER6.into(), VIP6.into()) };
        let kind = if quoted.src.is_ipv4() { ICMP_FRAG_NEEDED } else { ICMPV6_PACKET_TOO_BIG };
        for l4 in 0..=8 {
            let error = Frame::icmp_error(router, vip, kind, MTU_1400, quoted, Some(l4));
            let out = prog.run(&error.bytes()).unwrap();
            let relayed = out.verdict == reason::XDP_TX;
            assert_eq!(relayed, l4 >= 4, "quote of IP header + {l4} octets from {}: {}", quoted.src, verdict_name(out.verdict));
        }
        // Frames cut anywhere (the IP length still claiming the whole quote): relayed, with
        // only the MACs changed, exactly when the cut leaves the quoted ports in the frame.
        let error = Frame::icmp_error(router, vip, kind, MTU_1400, quoted, Some(8));
        let ports_end = 14 + error.ip_header_len() + 8 + quoted.ip_header_len() + 4;
        let full = error.bytes();
        let whole = prog.run(&full).unwrap();
        assert_eq!(whole.verdict, reason::XDP_TX, "the whole frame is relayed");
        for len in 14..=full.len() {
            let cut = &full[..len];
            let out = prog.run(cut).unwrap();
            if len >= ports_end {
                assert_eq!(out.verdict, reason::XDP_TX, "an ICMP error cut to {len} octets, ports included, was not relayed");
                assert_eq!(out.bytes, forwarded(cut, whole.bytes[0..6].try_into().unwrap()), "an ICMP error cut to {len} octets");
            } else {
                assert_ne!(out.verdict, reason::XDP_TX, "an ICMP error cut to {len} octets, before the ports' end at {ports_end}, was relayed");
                assert_eq!(out.bytes, cut, "an ICMP error cut to {len} octets was modified");
            }
        }
    }
}
