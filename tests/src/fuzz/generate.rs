//! Frames for the fuzzer: valid frames of every shape the program parses (TCP and UDP over
//! IPv4 and IPv6, VLAN stacks, IPv4 options, IPv6 extension chains, fragments, ICMP errors
//! quoting a master's answer), aimed mostly at configured services, then mutated field by
//! field (lengths, IHL, flags, ports, addresses, next headers, the quote's fields),
//! truncated, padded or shifted; and some pure random bytes. Everything comes from one
//! seeded generator, so a seed gives the same frames on every machine.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::packet::{Ext6, Frame, L4, ext_ah, ext_fragment, ext_fragment_id, ext_padding};
use crate::testrun::GATEWAY_MAC;

use super::services::{Service, TCP, UDP};

/// One step of how a frame was made, for failure reports.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// A valid frame of this shape.
    Base(&'static str),
    /// `width` bytes at `at` set to a chosen value.
    Field { at: usize, width: usize },
    Truncate(usize),
    Pad(usize),
    Insert { at: usize, len: usize },
    Delete { at: usize, len: usize },
    /// Random bytes from the start, this long.
    Random(usize),
}

pub struct Generated {
    pub bytes: Vec<u8>,
    pub steps: Vec<Step>,
}

/// The largest frame generated: below what BPF_PROG_TEST_RUN takes for XDP in one page.
const MAX_FRAME: usize = 1600;

pub struct Generator<'a> {
    services: &'a [Service],
    rng: fastrand::Rng,
}

/// Where the fields of a built frame are, for mutations that know what they change.
struct Layout {
    /// (offset, width) of every header field worth mutating.
    fields: Vec<(usize, usize)>,
}

impl<'a> Generator<'a> {
    pub fn new(services: &'a [Service], seed: u64) -> Self {
        Generator { services, rng: fastrand::Rng::with_seed(seed) }
    }

    pub fn frame(&mut self) -> Generated {
        if self.rng.u8(..100) < 4 {
            return self.random();
        }
        let (name, frame, layout) = self.base();
        let mut bytes = frame.bytes();
        if name == "not-ip" {
            let at = 12 + 4 * frame.vlans.len();
            let ether_type: u16 = match self.rng.u8(..3) {
                0 => 0x0806,
                1 => 0x88cc,
                _ => self.rng.u16(..),
            };
            bytes[at..at + 2].copy_from_slice(&ether_type.to_be_bytes());
        }
        let mut steps = vec![Step::Base(name)];
        // A third of the frames stay valid: the paths that forward must be walked often too.
        let mutations = match self.rng.u8(..100) {
            0..33 => 0,
            33..70 => 1,
            70..88 => 2,
            _ => self.rng.usize(3..=6),
        };
        for _ in 0..mutations {
            self.mutate(&mut bytes, &layout, &mut steps);
        }
        Generated { bytes, steps }
    }

    /// Random bytes, half of them behind an Ethernet header with an IP or VLAN EtherType.
    fn random(&mut self) -> Generated {
        let len = self.rng.usize(14..=160);
        let mut bytes: Vec<u8> = std::iter::repeat_with(|| self.rng.u8(..)).take(len).collect();
        if self.rng.bool() {
            bytes[0..6].copy_from_slice(&GATEWAY_MAC);
            let ether_type: u16 = *self.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8]);
            bytes[12..14].copy_from_slice(&ether_type.to_be_bytes());
        }
        Generated { bytes, steps: vec![Step::Random(len)] }
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[self.rng.usize(..items.len())]
    }

    /// Mostly a service of the family, to aim a frame at; otherwise none.
    fn aimed(&mut self, v6: bool) -> Option<&'a Service> {
        if self.rng.u8(..4) == 0 {
            return None;
        }
        let services: Vec<&'a Service> = self.services.iter().filter(|s| s.vip.is_ipv6() == v6).collect();
        Some(*self.pick(&services))
    }

    fn service(&mut self) -> &'a Service {
        &self.services[self.rng.usize(..self.services.len())]
    }

    /// A destination: mostly a configured VIP, sometimes its neighbour or a stranger.
    fn destination(&mut self, v6: bool) -> IpAddr {
        let vips: Vec<IpAddr> = self.services.iter().map(|s| s.vip).filter(|a| a.is_ipv6() == v6).collect();
        match self.rng.u8(..10) {
            0 => self.address(v6),
            1 => match *self.pick(&vips) {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) ^ 1 << self.rng.u32(0..8))),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ 1 << self.rng.u32(0..16))),
            },
            _ => *self.pick(&vips),
        }
    }

    fn address(&mut self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, self.rng.u16(..4), 0, 0, self.rng.u16(..), self.rng.u16(..)))
        } else {
            IpAddr::V4(Ipv4Addr::new(10, self.rng.u8(..3), self.rng.u8(..), self.rng.u8(..)))
        }
    }

    /// A port: mostly a configured one, sometimes 0 or any.
    fn port(&mut self) -> u16 {
        match self.rng.u8(..10) {
            0 => 0,
            1 | 2 => self.rng.u16(..),
            _ => self.service().port,
        }
    }

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.u8(..4) {
            0 => crate::packet::TCP_SYN,
            1 => crate::packet::TCP_ACK,
            2 => crate::packet::TCP_ACK | crate::packet::TCP_PSH,
            _ => self.rng.u8(..),
        }
    }

    fn l4(&mut self, proto: u8, sport: u16, dport: u16) -> L4 {
        if proto == TCP { L4::Tcp { sport, dport, flags: self.tcp_flags() } } else { L4::Udp { sport, dport } }
    }

    /// TCP or UDP from any port to a port that is mostly a configured one.
    fn l4_to_port(&mut self, proto: u8) -> L4 {
        let (sport, dport) = (self.rng.u16(..), self.port());
        self.l4(proto, sport, dport)
    }

    fn proto(&mut self) -> u8 {
        if self.rng.bool() { TCP } else { UDP }
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = if self.rng.u8(..20) == 0 { self.rng.usize(..1400) } else { self.rng.usize(..48) };
        std::iter::repeat_with(|| self.rng.u8(..)).take(len).collect()
    }

    /// IPv4 options (their content is not the program's business) or an IPv6 extension chain.
    fn extensions(&mut self, frame: &mut Frame) {
        if frame.src.is_ipv4() {
            if self.rng.u8(..4) == 0 {
                let len = 4 * self.rng.usize(1..=10);
                frame.ipv4_options = std::iter::repeat_with(|| self.rng.u8(..)).take(len).collect();
            }
        } else if self.rng.u8(..3) == 0 {
            let n = *self.pick(&[1, 1, 2, 3, 4, 4, 5, 6]);
            frame.ipv6_ext = (0..n).map(|_| self.extension()).collect();
        }
    }

    fn extension(&mut self) -> Ext6 {
        match self.rng.u8(..12) {
            0..3 => ext_padding(0, self.rng.usize(1..=3)),
            3..5 => ext_padding(43, self.rng.usize(1..=3)),
            5..8 => ext_padding(60, self.rng.usize(1..=3)),
            8..10 => ext_fragment(0, false),
            10 => ext_fragment(self.rng.u16(..0x2000), self.rng.bool()),
            _ => ext_ah(),
        }
    }

    fn vlans(&mut self, mut frame: Frame) -> Frame {
        let n = match self.rng.u8(..20) {
            0..12 => 0,
            12..16 => 1,
            16..19 => 2,
            _ => 3,
        };
        for _ in 0..n {
            let tpid = *self.pick(&[0x8100, 0x88a8]);
            frame = frame.with_vlan(tpid, self.rng.u16(..0x1000));
        }
        frame
    }

    fn macs(&mut self, mut frame: Frame) -> Frame {
        frame.dst_mac = match self.rng.u8(..20) {
            0 => [0xff; 6],
            1 => [0x02, 0x47, 0x57, 0x00, 0x00, self.rng.u8(..)],
            _ => GATEWAY_MAC,
        };
        frame.src_mac = [0x02, 0xc1, 0, 0, self.rng.u8(..), self.rng.u8(..)];
        frame
    }

    /// A valid frame of a random shape, and where its fields are.
    fn base(&mut self) -> (&'static str, Frame, Layout) {
        let v6 = self.rng.u8(..5) < 2;
        let (name, mut frame, quote) = match self.rng.u8(..100) {
            0..55 => {
                let src = self.address(v6);
                let frame = match self.aimed(v6) {
                    Some(s) => {
                        let (sport, flags) = (self.rng.u16(..), self.tcp_flags());
                        let l4 = if s.proto == TCP { L4::Tcp { sport, dport: s.port, flags } } else { L4::Udp { sport, dport: s.port } };
                        Frame::new(src, s.vip, l4)
                    }
                    None => {
                        let proto = self.proto();
                        let l4 = self.l4_to_port(proto);
                        Frame::new(src, self.destination(v6), l4)
                    }
                };
                ("whole", frame, None)
            }
            55..80 => {
                let (frame, quote) = self.icmp_error(v6);
                ("icmp-error", frame, Some(quote))
            }
            80..92 => {
                // Few sources: parts of one datagram must share its addresses.
                let src = if v6 {
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, self.rng.u16(1..3)))
                } else {
                    IpAddr::V4(Ipv4Addr::new(10, 1, 0, self.rng.u8(1..3)))
                };
                let (dst, proto) = match self.aimed(v6) {
                    Some(s) => (s.vip, s.proto),
                    None => (self.destination(v6), self.proto()),
                };
                let l4 = self.l4_to_port(proto);
                let mut f = Frame::new(src, dst, l4);
                // First parts (offset 0, more to come) a third of the time, and a handful of
                // datagram ids, so that later parts often follow a first one sent just before
                // and sometimes one of another flow.
                let offset = if self.rng.u8(..3) == 0 { 0 } else { self.rng.u16(1..0x2000) };
                let more = offset == 0 || self.rng.bool();
                let id = *self.pick(&[1u16, 2, 3, 0x1234]);
                if v6 {
                    f.ipv6_ext.push(ext_fragment_id(offset, more, u32::from(id)));
                } else {
                    f.ipv4_id = id;
                    f.ipv4_frag = offset | if more { 0x2000 } else { 0 } | (self.rng.u16(..2) << 14);
                }
                ("fragment", f, None)
            }
            92..97 => {
                // Other ICMP (echo, neighbour discovery) and other protocols.
                let proto = *self.pick(&[1, 58, 47, 132, 0, 255]);
                let bytes = (0..self.rng.usize(..24)).map(|_| self.rng.u8(..)).collect();
                ("other-ip", Frame::new(self.address(v6), self.destination(v6), L4::Other { proto, bytes }), None)
            }
            _ => {
                // ARP-sized non-IP frames: the builder makes IP, so the EtherType is replaced.
                ("not-ip", Frame::udp(self.address(false), 1, self.destination(false), 2), None)
            }
        };
        if name != "fragment" && name != "not-ip" {
            self.extensions(&mut frame);
        }
        if matches!(frame.l4, L4::Tcp { .. } | L4::Udp { .. }) {
            frame.payload = self.payload();
        }
        let frame = self.macs(frame);
        let frame = self.vlans(frame);
        let layout = layout(&frame, quote.as_ref());
        (name, frame, layout)
    }

    /// An ICMP error about a service's answer (VIP:port -> client), mostly as a router sends
    /// it, with the quote cut anywhere from the IP header on.
    fn icmp_error(&mut self, v6: bool) -> (Frame, Frame) {
        let services: Vec<&Service> = self.services.iter().filter(|s| s.vip.is_ipv6() == v6).collect();
        let s = *self.pick(&services);
        let client = self.address(v6);
        let mut answer = if s.proto == TCP {
            Frame::tcp(s.vip, s.port, client, self.rng.u16(..), crate::packet::TCP_ACK)
        } else {
            Frame::udp(s.vip, s.port, client, self.rng.u16(..))
        };
        if self.rng.u8(..8) == 0 {
            // A quote that is not a service's answer.
            answer.src = self.destination(v6);
            let (proto, sport, dport) = (self.proto(), self.port(), self.rng.u16(..));
            answer.l4 = self.l4(proto, sport, dport);
        }
        answer.payload = self.payload();
        self.extensions(&mut answer);
        let kind = if v6 {
            *self.pick(&[(1, 4), (2, 0), (3, 0), (1, 0), (4, 0), (128, 0)])
        } else {
            *self.pick(&[(3, 4), (3, 3), (3, 1), (11, 0), (0, 0), (8, 0), (5, 1)])
        };
        let cut = if self.rng.bool() { None } else { Some(self.rng.usize(..16)) };
        let router = self.address(v6);
        let to = if self.rng.u8(..8) == 0 { self.destination(v6) } else { answer.src };
        let mtu = [0, 0, self.rng.u8(..), self.rng.u8(..)];
        (Frame::icmp_error(router, to, kind, mtu, &answer, cut), answer)
    }

    fn mutate(&mut self, bytes: &mut Vec<u8>, layout: &Layout, steps: &mut Vec<Step>) {
        let len = bytes.len();
        let step = match self.rng.u8(..100) {
            0..60 => {
                let (at, width) = *self.pick(&layout.fields);
                if at + width > len {
                    return;
                }
                self.set_field(&mut bytes[at..at + width]);
                Step::Field { at, width }
            }
            60..68 => {
                let at = self.rng.usize(..len);
                bytes[at] = self.rng.u8(..);
                Step::Field { at, width: 1 }
            }
            68..82 => {
                // Cut mostly at or near a field boundary, where off-by-ones live.
                let near = self.pick(&layout.fields).0 + self.rng.usize(..4);
                let cut = if self.rng.u8(..4) == 0 { self.rng.usize(14..=len) } else { near.clamp(14, len) };
                bytes.truncate(cut);
                Step::Truncate(cut)
            }
            82..90 => {
                let n = self.rng.usize(1..=64).min(MAX_FRAME.saturating_sub(len));
                let zero = self.rng.bool();
                bytes.extend((0..n).map(|_| if zero { 0 } else { self.rng.u8(..) }));
                Step::Pad(n)
            }
            90..95 => {
                let at = self.pick(&layout.fields).0.min(len);
                let n = self.rng.usize(1..=8).min(MAX_FRAME.saturating_sub(len));
                let fill: Vec<u8> = (0..n).map(|_| self.rng.u8(..)).collect();
                bytes.splice(at..at, fill);
                Step::Insert { at, len: n }
            }
            _ => {
                let at = self.pick(&layout.fields).0;
                if at >= len || len - at <= 1 {
                    return;
                }
                let n = self.rng.usize(1..=8).min(len - at).min(len - 14);
                bytes.drain(at..at + n);
                Step::Delete { at, len: n }
            }
        };
        steps.push(step);
    }

    /// A value for a field: the edges (0, all ones), small changes around what is there, a
    /// configured address or MAC, or anything.
    fn set_field(&mut self, field: &mut [u8]) {
        match field.len() {
            1 => {
                field[0] = match self.rng.u8(..6) {
                    0 => 0,
                    1 => 0xff,
                    2 => field[0].wrapping_add(self.rng.u8(1..8)),
                    3 => field[0].wrapping_sub(self.rng.u8(1..8)),
                    // One nibble: a version, an IHL, a data offset.
                    4 => if self.rng.bool() { field[0] & 0xf0 | self.rng.u8(..16) } else { field[0] & 0x0f | self.rng.u8(..16) << 4 },
                    _ => self.rng.u8(..),
                }
            }
            2 => {
                let old = u16::from_be_bytes([field[0], field[1]]);
                let new = match self.rng.u8(..7) {
                    0 => 0,
                    1 => 0xffff,
                    2 => old.wrapping_add(self.rng.u16(1..64)),
                    3 => old.wrapping_sub(self.rng.u16(1..64)),
                    4 => self.rng.u16(..128),
                    5 => self.service().port,
                    _ => self.rng.u16(..),
                };
                field.copy_from_slice(&new.to_be_bytes());
            }
            4 | 16 => {
                let v6 = field.len() == 16;
                if self.rng.bool() {
                    let to = self.destination(v6);
                    match to {
                        IpAddr::V4(a) => field.copy_from_slice(&a.octets()),
                        IpAddr::V6(a) => field.copy_from_slice(&a.octets()),
                    }
                } else {
                    let i = self.rng.usize(..field.len());
                    field[i] = self.rng.u8(..);
                }
            }
            _ => {
                if self.rng.bool() {
                    field.copy_from_slice(&GATEWAY_MAC[..field.len()]);
                } else {
                    field.iter_mut().for_each(|b| *b = self.rng.u8(..));
                }
            }
        }
    }
}

/// The fields of `frame` (and of the packet its ICMP error quotes).
fn layout(frame: &Frame, quote: Option<&Frame>) -> Layout {
    let mut fields = vec![(0, 6)];
    for i in 0..=frame.vlans.len() {
        fields.push((12 + 4 * i, 2));
    }
    let l3 = 14 + 4 * frame.vlans.len();
    let l4 = ip_fields(frame, l3, &mut fields);
    match &frame.l4 {
        L4::Tcp { .. } => fields.extend([(l4, 2), (l4 + 2, 2), (l4 + 12, 1), (l4 + 13, 1)]),
        L4::Udp { .. } => fields.extend([(l4, 2), (l4 + 2, 2), (l4 + 4, 2)]),
        L4::Other { .. } => {
            fields.extend([(l4, 1), (l4 + 1, 1)]);
            if let Some(q) = quote {
                let ports = ip_fields(q, l4 + 8, &mut fields);
                fields.extend([(ports, 2), (ports + 2, 2)]);
            }
        }
    }
    Layout { fields }
}

/// The IP header fields of `frame` placed at `at`; returns where its L4 header starts.
fn ip_fields(frame: &Frame, at: usize, fields: &mut Vec<(usize, usize)>) -> usize {
    if frame.src.is_ipv4() {
        fields.extend([(at, 1), (at + 2, 2), (at + 6, 2), (at + 6, 1), (at + 9, 1), (at + 12, 4), (at + 16, 4)]);
    } else {
        fields.extend([(at, 1), (at + 4, 2), (at + 6, 1), (at + 8, 16), (at + 24, 16)]);
        let mut e = at + 40;
        for ext in &frame.ipv6_ext {
            fields.extend([(e, 1), (e + 1, 1)]);
            if ext.kind == 44 {
                fields.extend([(e + 2, 2), (e + 3, 1)]);
            }
            e += ext.body.len() + 2;
        }
    }
    at + frame.ip_header_len()
}
