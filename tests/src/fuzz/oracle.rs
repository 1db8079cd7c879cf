//! What the XDP program must do with a frame, decided from the documented contract
//! (OPERATIONS.md, "MTU, ICMP and fragments" and "Reason codes") by a classifier of its own:
//! plain slices and offsets, no code shared with the program's parser. It names the one
//! reason the frame must be counted under and, for a frame to be sent to a master, the
//! service and the flow it belongs to.
//!
//! Fragments are the one rule with state: a later fragment follows the first fragment of its
//! datagram that the oracle saw sent ([`Oracle::later_fragment`]), as the program's
//! `FRAGMENTS` map does. The fuzzer forgets both together (`Oracle::forget_fragments` and the
//! map) often enough that no record reaches the program's two-second timeout.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mim_lb_common::reason;

use super::services::{Service, TCP, UDP};

/// What the program must do with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub reason: u32,
    /// Set exactly when `reason` sends the frame to a master (XDP_TX).
    pub target: Option<Target>,
}

/// A frame sent to a master: which service, and the flow client:port -> VIP:port it belongs
/// to (for an ICMP error, the flow of the quoted answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: usize,
    pub client: IpAddr,
    pub client_port: u16,
}

pub struct Oracle<'a> {
    services: &'a [Service],
    gateway_mac: [u8; 6],
    /// Datagrams whose first fragment was sent, by reassembly key: where it went.
    fragments: HashMap<FragmentKey, Target>,
}

/// A datagram, as IP reassembly names it: source, destination, protocol, identification.
type FragmentKey = (IpAddr, IpAddr, u8, u32);

/// Which part of a datagram an IP packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Whole,
    /// Offset 0 with more to come: its transport header is there.
    First(u32),
    /// A non-zero offset: no transport header.
    Later(u32),
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// VLAN tags and IPv6 extension headers the program reads (OPERATIONS.md).
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXTENSIONS: usize = 4;

/// The part of the frame an IP datagram covers: headers must lie inside both the frame and
/// the datagram's own length (what follows is Ethernet padding). A header past the frame but
/// inside the datagram is a truncated frame (`malformed`); one past the datagram is
/// `malformed` too, except in an ICMP quote, where it is a short quote.
struct Datagram<'f> {
    frame: &'f [u8],
    end: usize,
}

impl<'f> Datagram<'f> {
    /// `n` bytes at `at`, or the reason: `past_end` past the datagram, `malformed` past the frame.
    fn bytes(&self, at: usize, n: usize, past_end: u32) -> Result<&'f [u8], u32> {
        if at + n > self.end {
            return Err(past_end);
        }
        self.frame.get(at..at + n).ok_or(reason::MALFORMED)
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The L3 facts that decide: addresses, the protocol, where its header starts, and whether
/// the datagram is a fragment.
struct Ip<'f> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: usize,
    part: Part,
    datagram: Datagram<'f>,
}

impl<'a> Oracle<'a> {
    pub fn new(services: &'a [Service], gateway_mac: [u8; 6]) -> Self {
        Oracle { services, gateway_mac, fragments: HashMap::new() }
    }

    /// Forgets every first fragment seen (the fuzzer empties the program's map at once).
    pub fn forget_fragments(&mut self) {
        self.fragments.clear();
    }

    pub fn classify(&mut self, frame: &[u8]) -> Expected {
        match self.classify_inner(frame) {
            Ok(e) => e,
            Err(reason) => Expected { reason, target: None },
        }
    }

    fn classify_inner(&mut self, frame: &[u8]) -> Result<Expected, u32> {
        let (ether_type, l3) = ethernet(frame)?;
        let ip = match ether_type {
            ETH_IPV4 => ipv4(frame, l3)?,
            ETH_IPV6 => ipv6(frame, l3)?,
            _ => unreachable!("ethernet() returns IP only"),
        };
        match ip.part {
            Part::Whole => {}
            Part::First(id) => return self.first_fragment(frame, &ip, id),
            Part::Later(id) => return self.later_fragment(frame, &ip, id),
        }
        match ip.proto {
            TCP | UDP => self.whole(frame, &ip),
            ICMP if ip.src.is_ipv4() => self.icmp_error(frame, &ip),
            ICMPV6 if ip.src.is_ipv6() => self.icmp_error(frame, &ip),
            _ => Err(reason::NOT_TCP_UDP),
        }
    }

    /// A first fragment (OPERATIONS.md, "MTU, ICMP and fragments"): a TCP or UDP one whose
    /// transport header is whole goes where the whole datagram would (`fragment_first`), and
    /// its datagram is remembered; any other is placed as a later fragment is.
    fn first_fragment(&mut self, frame: &[u8], ip: &Ip, id: u32) -> Result<Expected, u32> {
        if !matches!(ip.proto, TCP | UDP) {
            return self.later_fragment(frame, ip, id);
        }
        let header = if ip.proto == TCP { 20 } else { 8 };
        let h = match ip.datagram.bytes(ip.l4, header, reason::FRAGMENT) {
            Ok(h) if ip.proto != TCP || h[12] >> 4 >= 5 => h,
            // Its ports cannot be read (or its header is not one): no better than a later part.
            _ => return self.later_fragment(frame, ip, id),
        };
        let (sport, dport) = (be16(&h[0..2]), be16(&h[2..4]));
        let Some(service) = self.service(ip.dst, dport, ip.proto) else {
            // No service on that port: dropped where the VIP has one for the protocol.
            let vip_has_proto = self.services.iter().any(|s| s.vip == ip.dst && s.proto == ip.proto);
            return Err(match (vip_has_proto, self.to_gateway(frame)) {
                (false, _) => reason::NOT_A_SERVICE,
                (true, false) => reason::FOREIGN_MAC,
                (true, true) => reason::FRAGMENT,
            });
        };
        let sent = self.send(frame, service, ip.src, sport, reason::FRAGMENT_FIRST)?;
        if let Some(target) = sent.target {
            self.fragments.insert((ip.src, ip.dst, ip.proto, id), target);
        }
        Ok(sent)
    }

    /// A later fragment: to the master its datagram's first fragment went to; with none seen,
    /// by its source where the VIP's only service for the protocol hashes the source alone
    /// (every slot is clean: the config never changes during a run); else dropped. A VIP
    /// with no service of the protocol leaves it to the kernel.
    fn later_fragment(&self, frame: &[u8], ip: &Ip, id: u32) -> Result<Expected, u32> {
        let of_vip: Vec<usize> =
            (0..self.services.len()).filter(|i| self.services[*i].vip == ip.dst && self.services[*i].proto == ip.proto).collect();
        if of_vip.is_empty() {
            return Err(reason::NOT_A_SERVICE);
        }
        if !self.to_gateway(frame) {
            return Err(reason::FOREIGN_MAC);
        }
        if let Some(target) = self.fragments.get(&(ip.src, ip.dst, ip.proto, id)) {
            return Ok(Expected { reason: reason::FRAGMENT_FOLLOWED, target: Some(*target) });
        }
        match of_vip[..] {
            // TCP only: a UDP flow may stay recorded on another master than its clean slot's.
            [only] if ip.proto == TCP && self.services[only].source_hash && !self.services[only].masters.is_empty() => Ok(Expected {
                reason: reason::FRAGMENT_BY_SOURCE,
                target: Some(Target { service: only, client: ip.src, client_port: 0 }),
            }),
            _ => Err(reason::FRAGMENT),
        }
    }

    /// A whole TCP segment or UDP datagram.
    fn whole(&self, frame: &[u8], ip: &Ip) -> Result<Expected, u32> {
        let header = if ip.proto == TCP { 20 } else { 8 };
        let h = ip.datagram.bytes(ip.l4, header, reason::MALFORMED)?;
        if ip.proto == TCP && h[12] >> 4 < 5 {
            return Err(reason::MALFORMED);
        }
        let (sport, dport) = (be16(&h[0..2]), be16(&h[2..4]));
        let service = self.service(ip.dst, dport, ip.proto).ok_or(reason::NOT_A_SERVICE)?;
        self.send(frame, service, ip.src, sport, reason::FORWARDED)
    }

    /// An ICMP or ICMPv6 message: a relayed error about a service's answer, or the kernel's.
    fn icmp_error(&self, frame: &[u8], ip: &Ip) -> Result<Expected, u32> {
        let d = &ip.datagram;
        let icmp = d.bytes(ip.l4, 8, reason::NOT_TCP_UDP).map_err(|_| reason::NOT_TCP_UDP)?;
        let relayed = if ip.src.is_ipv4() { matches!(icmp[0], 3 | 11) } else { matches!(icmp[0], 1..=3) };
        if !relayed {
            return Err(reason::NOT_TCP_UDP);
        }
        let quote = ip.l4 + 8;
        let (qsrc, qdst, qproto, ports_at) = if ip.src.is_ipv4() {
            let q = d.bytes(quote, 20, reason::ICMP_QUOTE_SHORT)?;
            let ihl = (q[0] & 0x0f) as usize * 4;
            // Only a whole datagram or a first fragment quotes ports.
            if q[0] >> 4 != 4 || ihl < 20 || be16(&q[6..8]) & 0x1fff != 0 {
                return Err(reason::NOT_TCP_UDP);
            }
            (v4(&q[12..16]), v4(&q[16..20]), q[9], quote + ihl)
        } else {
            let q = d.bytes(quote, 40, reason::ICMP_QUOTE_SHORT)?;
            if q[0] >> 4 != 6 {
                return Err(reason::NOT_TCP_UDP);
            }
            (v6(&q[8..24]), v6(&q[24..40]), q[6], quote + 40)
        };
        // About a TCP or UDP packet sent from the address the error is addressed to.
        if !(qproto == TCP || qproto == UDP) || qsrc != ip.dst {
            return Err(reason::NOT_TCP_UDP);
        }
        let ports = d.bytes(ports_at, 4, reason::ICMP_QUOTE_SHORT)?;
        let (qsport, qdport) = (be16(&ports[0..2]), be16(&ports[2..4]));
        let service = self.service(qsrc, qsport, qproto).ok_or(reason::NOT_TCP_UDP)?;
        self.send(frame, service, qdst, qdport, reason::ICMP_ERROR_FORWARDED)
    }

    /// The outcome for a packet of `service` from client:port.
    fn send(&self, frame: &[u8], service: usize, client: IpAddr, client_port: u16, sent: u32) -> Result<Expected, u32> {
        if !self.to_gateway(frame) {
            return Err(reason::FOREIGN_MAC);
        }
        if self.services[service].masters.is_empty() {
            return Err(reason::NO_BACKEND);
        }
        Ok(Expected { reason: sent, target: Some(Target { service, client, client_port }) })
    }

    /// The configured service at vip:port/proto. Port 0 is never a service.
    fn service(&self, vip: IpAddr, port: u16, proto: u8) -> Option<usize> {
        if port == 0 {
            return None;
        }
        self.services.iter().position(|s| s.vip == vip && s.port == port && s.proto == proto)
    }

    fn to_gateway(&self, frame: &[u8]) -> bool {
        frame[0..6] == self.gateway_mac
    }
}

/// The EtherType after up to two VLAN tags, if it is IP, and where the IP header starts.
fn ethernet(frame: &[u8]) -> Result<(u16, usize), u32> {
    let mut ether_type = be16(frame.get(12..14).ok_or(reason::MALFORMED)?);
    let mut at = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != TPID_8021Q && ether_type != TPID_8021AD {
            break;
        }
        ether_type = be16(frame.get(at + 2..at + 4).ok_or(reason::MALFORMED)?);
        at += 4;
    }
    match ether_type {
        ETH_IPV4 | ETH_IPV6 => Ok((ether_type, at)),
        TPID_8021Q | TPID_8021AD => Err(reason::VLAN_TOO_DEEP),
        _ => Err(reason::NOT_IP),
    }
}

fn v4(b: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn v6(b: &[u8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()))
}

fn ipv4(frame: &[u8], at: usize) -> Result<Ip<'_>, u32> {
    let h = frame.get(at..at + 20).ok_or(reason::MALFORMED)?;
    let ihl = (h[0] & 0x0f) as usize * 4;
    let total = be16(&h[2..4]) as usize;
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl {
        return Err(reason::MALFORMED);
    }
    Ok(Ip {
        src: v4(&h[12..16]),
        dst: v4(&h[16..20]),
        proto: h[9],
        l4: at + ihl,
        // An offset makes a later part; more-fragments at offset 0 the first. DF and the
        // reserved bit make no fragment.
        part: match (be16(&h[6..8]) & 0x1fff, be16(&h[6..8]) & 0x2000 != 0, u32::from(be16(&h[4..6]))) {
            (0, false, _) => Part::Whole,
            (0, true, id) => Part::First(id),
            (_, _, id) => Part::Later(id),
        },
        datagram: Datagram { frame, end: at + total },
    })
}

fn ipv6(frame: &[u8], at: usize) -> Result<Ip<'_>, u32> {
    let h = frame.get(at..at + 40).ok_or(reason::MALFORMED)?;
    if h[0] >> 4 != 6 {
        return Err(reason::MALFORMED);
    }
    let datagram = Datagram { frame, end: at + 40 + be16(&h[4..6]) as usize };
    let mut next = h[6];
    let mut l4 = at + 40;
    let mut part = Part::Whole;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units after the first 8.
            0 | 43 | 60 => {
                let e = datagram.bytes(l4, 2, reason::MALFORMED)?;
                next = e[0];
                l4 += (e[1] as usize + 1) * 8;
            }
            44 => {
                let e = datagram.bytes(l4, 8, reason::MALFORMED)?;
                next = e[0];
                let offset = be16(&e[2..4]) >> 3;
                let more = e[3] & 1 != 0;
                // The identification of the last fragment header walked names the datagram.
                let id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                if offset != 0 {
                    part = Part::Later(id);
                    break;
                }
                // Offset 0: the first part, placed by its ports only when TCP or UDP follows at
                // once (else it is named like its later parts, by that next header), or an
                // atomic fragment (a whole datagram, unless a first part's header came before).
                if more && !matches!(next, TCP | UDP) {
                    part = Part::Later(id);
                    break;
                }
                part = match part {
                    Part::First(_) => Part::First(id),
                    _ if more => Part::First(id),
                    other => other,
                };
                l4 += 8;
            }
            _ => break,
        }
    }
    if part == Part::Whole && matches!(next, 0 | 43 | 44 | 60 | 50 | 51 | 135 | 139 | 140) {
        return Err(reason::IPV6_EXTENSION);
    }
    Ok(Ip { src: v6(&h[8..24]), dst: v6(&h[24..40]), proto: next, l4, part, datagram })
}
