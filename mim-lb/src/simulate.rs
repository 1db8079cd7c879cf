//! `mim-lb simulate`: where a flow goes now. The answer comes from the live program run on
//! synthetic packets of the flow over the live maps, not from a re-implementation of its
//! logic, so it is right by construction, connection table included: a TCP packet of an
//! established connection (where the flow's packets go) and a SYN (where a new connection
//! from the same port would go), or one UDP datagram.

use std::net::{IpAddr, SocketAddr};

use mim_lb_common::reason;

use crate::{
    config::{ServiceKey, format_mac},
    dataplane::Simulator,
    director::Director,
    status::Simulation,
};

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("{0:?} is not a flow: write SRC:SPORT-VIP:PORT/PROTO, e.g. 192.0.2.7:40000-10.0.0.100:7000/tcp (IPv6 in brackets)")]
    BadFlow(String),
    #[error("the source {src} and destination {dst} are of different address families")]
    MixedFamilies { src: IpAddr, dst: IpAddr },
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
}

/// A flow as the operator writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: SocketAddr,
    pub service: ServiceKey,
}

impl std::str::FromStr for Flow {
    type Err = SimulateError;

    fn from_str(s: &str) -> Result<Flow, SimulateError> {
        let bad = || SimulateError::BadFlow(s.to_owned());
        let (src, dst) = s.split_once('-').ok_or_else(bad)?;
        let src: SocketAddr = src.trim().parse().map_err(|_| bad())?;
        let service: ServiceKey = dst.trim().parse().map_err(|_| bad())?;
        if src.is_ipv4() != service.vip.is_ipv4() {
            return Err(SimulateError::MixedFamilies { src: src.ip(), dst: service.vip });
        }
        Ok(Flow { src, service })
    }
}

/// The first packet of `flow`: Ethernet (to `dst_mac`), IPv4 or IPv6, then a TCP SYN or an
/// empty UDP datagram. The program reads no checksum, so none is computed beyond IPv4's.
pub fn first_packet(flow: &Flow, dst_mac: [u8; 6]) -> Vec<u8> {
    packet(flow, dst_mac, TCP_SYN)
}

/// A packet of `flow` once it is established: a TCP ACK, or a UDP datagram.
pub fn established_packet(flow: &Flow, dst_mac: [u8; 6]) -> Vec<u8> {
    packet(flow, dst_mac, TCP_ACK)
}

/// An ICMP error about the master's answers on `flow`, as a router between the gateway and
/// the client sends it to the VIP: "fragmentation needed" (ICMPv4 type 3 code 4, next-hop MTU
/// 1400) or "packet too big" (ICMPv6 type 2, MTU 1280), quoting the answer (from VIP:port to
/// the client's address and port) cut to its IP header and 8 octets, as RFC 792 allows. Sent
/// from the client's address (the program does not read the router's).
pub fn icmp_error_packet(flow: &Flow, dst_mac: [u8; 6]) -> Vec<u8> {
    let answer = Flow {
        src: SocketAddr::new(flow.service.vip, flow.service.port),
        service: ServiceKey { vip: flow.src.ip(), port: flow.src.port(), protocol: flow.service.protocol },
    };
    let answer = packet(&answer, dst_mac, TCP_ACK);
    let v4 = flow.src.is_ipv4();
    let ip_header = if v4 { 20 } else { 40 };
    let quote = &answer[14..14 + ip_header + 8];
    let mut icmp = if v4 { vec![3, 4, 0, 0, 0, 0, 0x05, 0x78] } else { vec![2, 0, 0, 0, 0, 0, 0x05, 0x00] };
    icmp.extend_from_slice(quote);
    let proto = if v4 { 1 } else { 58 };
    ip_frame(flow.src.ip(), flow.service.vip, dst_mac, proto, false, icmp)
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

fn packet(flow: &Flow, dst_mac: [u8; 6], tcp_flags: u8) -> Vec<u8> {
    let tcp = flow.service.protocol == crate::config::Protocol::Tcp;
    let mut l4 = Vec::new();
    l4.extend_from_slice(&flow.src.port().to_be_bytes());
    l4.extend_from_slice(&flow.service.port.to_be_bytes());
    if tcp {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&8u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    ip_frame(flow.src.ip(), flow.service.vip, dst_mac, flow.service.protocol.number(), true, l4)
}

/// An Ethernet frame to `dst_mac` carrying an IP packet from `src` to `dst` (the same family:
/// `Flow::from_str` refuses mixed ones) with `payload` of protocol `proto`; IPv4 with its
/// header checksum, and don't-fragment when `df`.
fn ip_frame(src: IpAddr, dst: IpAddr, dst_mac: [u8; 6], proto: u8, df: bool, payload: Vec<u8>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 40 + payload.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, if df { 0x40 } else { 0 }, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            frame.extend(ip);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[proto, 64]);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
        }
        _ => {}
    }
    frame.extend(payload);
    frame
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What one simulated packet did: its reason code and, when forwarded, the MAC it was sent
/// to and the master of the service with that MAC.
struct Outcome {
    code: u32,
    mac: Option<[u8; 6]>,
    backend: Option<IpAddr>,
}

/// Runs the simulation of `flow` and names the master the program chose.
pub fn run(director: &Director, simulator: &Simulator, flow: &str) -> Result<Simulation, SimulateError> {
    let parsed: Flow = flow.parse()?;
    let service = director.desired().get(&parsed.service);
    let outcome = |frame: Vec<u8>| -> Result<Outcome, SimulateError> {
        let (code, out) = simulator.run(&frame)?;
        let sent = code == reason::FORWARDED || code == reason::ICMP_ERROR_FORWARDED;
        let mac: Option<[u8; 6]> = (sent && out.len() >= 6).then(|| out[0..6].try_into().expect("six bytes"));
        // The frame carries only the MAC; within the service it names one master (two
        // masters with one MAC would be one host, and either answer is that host).
        let backend = mac.and_then(|mac| {
            service.and_then(|s| s.backends.iter().find(|(_, b)| b.mac() == Some(mac))).map(|(addr, _)| *addr)
        });
        Ok(Outcome { code, mac, backend })
    };
    let new = outcome(first_packet(&parsed, director.gateway_mac()))?;
    let established = outcome(established_packet(&parsed, director.gateway_mac()))?;
    let icmp_error = outcome(icmp_error_packet(&parsed, director.gateway_mac()))?;
    let recorded = director.dataplane().maps_ro().flow(&flow_key(&parsed))?.is_some();
    let now = if recorded { &established } else { &new };
    let verdict = match reason::verdict(now.code) {
        reason::XDP_TX => "XDP_TX",
        reason::XDP_DROP => "XDP_DROP",
        _ => "XDP_PASS",
    };
    Ok(Simulation {
        flow: format!("{}-{}", parsed.src, parsed.service),
        verdict: verdict.into(),
        reason: reason::name(now.code).into(),
        service: service.map(|s| s.name.clone()),
        backend: now.backend,
        mac: now.mac.map(|mac| format_mac(&mac)),
        new_backend: new.backend,
        established_backend: established.backend,
        icmp_error_backend: icmp_error.backend,
    })
}

/// The connection table's key for `flow`.
fn flow_key(flow: &Flow) -> mim_lb_common::FlowKey {
    use crate::dataplane::service_index::addr_words;
    let (src, family) = addr_words(flow.src.ip());
    let (dst, _) = addr_words(flow.service.vip);
    mim_lb_common::FlowKey {
        src,
        dst,
        sport: flow.src.port().to_be(),
        dport: flow.service.port.to_be(),
        proto: flow.service.protocol.number(),
        family,
        _pad0: [0; 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_parse_in_both_families() {
        let f: Flow = "192.0.2.7:40000-10.0.0.100:7000/tcp".parse().unwrap();
        assert_eq!(f.src, "192.0.2.7:40000".parse().unwrap());
        assert_eq!(f.service.to_string(), "10.0.0.100:7000/tcp");
        let f: Flow = "[2001:db8::7]:40000-[2001:db8::100]:53/udp".parse().unwrap();
        assert_eq!(f.service.to_string(), "[2001:db8::100]:53/udp");
        assert!("192.0.2.7:40000".parse::<Flow>().is_err());
        assert!("192.0.2.7-10.0.0.100:7000".parse::<Flow>().is_err());
        assert!(matches!(
            "192.0.2.7:1-[2001:db8::100]:53/udp".parse::<Flow>(),
            Err(SimulateError::MixedFamilies { .. })
        ));
    }

    #[test]
    fn first_packets_are_well_formed() {
        let f: Flow = "192.0.2.7:40000-10.0.0.100:7000/tcp".parse().unwrap();
        let frame = first_packet(&f, [2, 0, 0, 0, 0, 2]);
        assert_eq!(frame.len(), 14 + 20 + 20);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(checksum(&frame[14..34]), 0, "the IPv4 header checksum verifies");
        assert_eq!(frame[14 + 20 + 13], 0x02, "a SYN");
        let f: Flow = "[2001:db8::7]:40000-[2001:db8::100]:53/udp".parse().unwrap();
        let frame = first_packet(&f, [2, 0, 0, 0, 0, 2]);
        assert_eq!(frame.len(), 14 + 40 + 8);
        assert_eq!(frame[14 + 6], 17);
    }

    #[test]
    fn icmp_errors_quote_the_answer() {
        let f: Flow = "192.0.2.7:40000-10.0.0.100:7000/tcp".parse().unwrap();
        let frame = icmp_error_packet(&f, [2, 0, 0, 0, 0, 2]);
        assert_eq!(frame.len(), 14 + 20 + 8 + 20 + 8);
        assert_eq!(checksum(&frame[14..34]), 0, "the IPv4 header checksum verifies");
        assert_eq!((frame[14 + 9], frame[34], frame[35]), (1, 3, 4), "ICMP fragmentation needed");
        assert_eq!(&frame[30..34], &[10, 0, 0, 100], "to the VIP");
        let quote = &frame[42..];
        assert_eq!((&quote[12..16], &quote[16..20]), (&[10, 0, 0, 100][..], &[192, 0, 2, 7][..]), "an answer from the VIP to the client");
        assert_eq!((&quote[20..22], &quote[22..24]), (&7000u16.to_be_bytes()[..], &40000u16.to_be_bytes()[..]));
        let f: Flow = "[2001:db8::7]:40000-[2001:db8::100]:53/udp".parse().unwrap();
        let frame = icmp_error_packet(&f, [2, 0, 0, 0, 0, 2]);
        assert_eq!(frame.len(), 14 + 40 + 8 + 40 + 8);
        assert_eq!((frame[14 + 6], frame[54]), (58, 2), "ICMPv6 packet too big");
        assert_eq!(frame[62 + 6], 17, "quoting UDP");
    }
}
