//! Frames for BPF_PROG_TEST_RUN fixtures and benchmarks, built byte by byte so a test can
//! put anything on the wire: VLAN stacks, IPv4 options, IPv6 extension headers, fragments.
//! Checksums are computed (IPv4 header) or left zero (L4): the XDP program never reads them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// ICMP error (type, code) pairs.
pub const ICMP_FRAG_NEEDED: (u8, u8) = (3, 4);
pub const ICMP_PORT_UNREACHABLE: (u8, u8) = (3, 3);
pub const ICMP_TTL_EXCEEDED: (u8, u8) = (11, 0);
pub const ICMPV6_UNREACHABLE: (u8, u8) = (1, 4);
pub const ICMPV6_PACKET_TOO_BIG: (u8, u8) = (2, 0);
pub const ICMPV6_TIME_EXCEEDED: (u8, u8) = (3, 0);

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    /// Any other protocol number with a raw payload (ICMP, ...).
    Other { proto: u8, bytes: Vec<u8> },
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Other { proto, .. } => *proto,
        }
    }
}

/// An IPv6 extension header: (header type, body after the next-header/length octets).
/// The body length plus two must be a multiple of 8.
#[derive(Clone, Debug)]
pub struct Ext6 {
    pub kind: u8,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// (TPID, VLAN id), outermost first.
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 options (padded to a multiple of 4 by the caller).
    pub ipv4_options: Vec<u8>,
    /// IPv4 flags+fragment offset field (host order): 0x2000 = more fragments.
    pub ipv4_frag: u16,
    /// IPv4 identification (what fragments of one datagram share).
    pub ipv4_id: u16,
    pub ipv6_ext: Vec<Ext6>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Frame {
            dst_mac: crate::testrun::GATEWAY_MAC,
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            vlans: Vec::new(),
            src,
            dst,
            ipv4_options: Vec::new(),
            ipv4_frag: 0,
            ipv4_id: 0x1234,
            ipv6_ext: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }

    pub fn tcp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16, flags: u8) -> Self {
        Frame::new(src.into(), dst.into(), L4::Tcp { sport, dport, flags })
    }

    pub fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Frame::new(src.into(), dst.into(), L4::Udp { sport, dport })
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn with_vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    pub fn with_macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    /// The length of the IP header with its options or extension headers.
    pub fn ip_header_len(&self) -> usize {
        match self.src {
            IpAddr::V4(_) => 20 + self.ipv4_options.len(),
            IpAddr::V6(_) => 40 + self.ipv6_ext.iter().map(|e| e.body.len() + 2).sum::<usize>(),
        }
    }

    /// The IP datagram of this frame (no Ethernet header or VLAN tags).
    pub fn datagram(&self) -> Vec<u8> {
        self.bytes()[14 + 4 * self.vlans.len()..].to_vec()
    }

    /// An ICMP error (ICMPv4 if `quoted` is IPv4, ICMPv6 otherwise) of `icmp_type` and `code`
    /// from `router` to `to`, with `rest` as the four octets after the checksum (the next-hop
    /// MTU of "fragmentation needed", the MTU of "packet too big"), quoting `quoted`'s
    /// datagram cut to its IP header and `l4_octets` octets after it (all of it if `None`;
    /// RFC 792 guarantees 8). The ICMP checksum is left zero: the program does not read it.
    pub fn icmp_error(
        router: impl Into<IpAddr>,
        to: impl Into<IpAddr>,
        (icmp_type, code): (u8, u8),
        rest: [u8; 4],
        quoted: &Frame,
        l4_octets: Option<usize>,
    ) -> Frame {
        let mut quote = quoted.datagram();
        if let Some(n) = l4_octets {
            quote.truncate(quoted.ip_header_len() + n);
        }
        let mut bytes = vec![icmp_type, code, 0, 0];
        bytes.extend_from_slice(&rest);
        bytes.extend(quote);
        let proto = if quoted.src.is_ipv4() { 1 } else { 58 };
        Frame::new(router.into(), to.into(), L4::Other { proto, bytes })
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match &self.l4 {
            L4::Tcp { sport, dport, flags } => {
                l4.extend_from_slice(&sport.to_be_bytes());
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&1u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.push(5 << 4); // data offset
                l4.push(*flags);
                l4.extend_from_slice(&64240u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            }
            L4::Udp { sport, dport } => {
                l4.extend_from_slice(&sport.to_be_bytes());
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            L4::Other { bytes, .. } => l4.extend_from_slice(bytes),
        }
        l4.extend_from_slice(&self.payload);

        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        for (tpid, vid) in &self.vlans {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                out.extend_from_slice(&0x0800u16.to_be_bytes());
                out.extend(ipv4_header(src, dst, &self.ipv4_options, (self.ipv4_id, self.ipv4_frag), self.l4.proto(), l4.len()));
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                out.extend_from_slice(&0x86ddu16.to_be_bytes());
                out.extend(ipv6_header(src, dst, &self.ipv6_ext, self.l4.proto(), l4.len()));
            }
            _ => panic!("source and destination of different families"),
        }
        out.extend(l4);
        out
    }
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, options: &[u8], (id, frag): (u16, u16), proto: u8, l4_len: usize) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40, "IPv4 options must be padded to 4 octets");
    let header_len = 20 + options.len();
    let mut h = Vec::with_capacity(header_len);
    h.push(0x40 | (header_len / 4) as u8);
    h.push(0);
    h.extend_from_slice(&((header_len + l4_len) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(64);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let sum = internet_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, ext: &[Ext6], proto: u8, l4_len: usize) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, e) in ext.iter().enumerate() {
        assert!((e.body.len() + 2) % 8 == 0, "extension header length must be a multiple of 8");
        let next = ext.get(i + 1).map_or(proto, |n| n.kind);
        chain.push(next);
        // Fragment headers have a reserved octet where others have a length; AH counts its
        // length in 4-octet units, not counting the first two (RFC 4302).
        chain.push(match e.kind {
            44 => 0,
            51 => ((e.body.len() + 2) / 4 - 2) as u8,
            _ => ((e.body.len() + 2) / 8 - 1) as u8,
        });
        chain.extend_from_slice(&e.body);
    }
    let mut h = Vec::with_capacity(40 + chain.len());
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&((chain.len() + l4_len) as u16).to_be_bytes());
    h.push(ext.first().map_or(proto, |e| e.kind));
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend(chain);
    h
}

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A hop-by-hop (0), routing (43) or destination-options (60) header of `len8` 8-octet units.
pub fn ext_padding(kind: u8, len8: usize) -> Ext6 {
    let mut body = vec![0u8; len8 * 8 - 2];
    // PadN option filling the whole body, so the header is valid as options.
    if kind != 43 && body.len() >= 2 {
        body[0] = 1;
        body[1] = (body.len() - 2) as u8;
    }
    Ext6 { kind, body }
}

/// An IPv6 fragment header with the given offset (8-octet units) and more-fragments flag.
pub fn ext_fragment(offset: u16, more: bool) -> Ext6 {
    ext_fragment_id(offset, more, 0xdead_beef)
}

/// [`ext_fragment`] with the datagram's identification.
pub fn ext_fragment_id(offset: u16, more: bool, id: u32) -> Ext6 {
    let field = (offset << 3) | more as u16;
    let mut body = field.to_be_bytes().to_vec();
    body.extend_from_slice(&id.to_be_bytes());
    Ext6 { kind: 44, body }
}

/// An IPv6 authentication header (51) with a 96-bit ICV (HMAC-SHA1-96), 24 octets in all.
pub fn ext_ah() -> Ext6 {
    let mut body = vec![0, 0]; // reserved
    body.extend_from_slice(&0x0000_1234u32.to_be_bytes()); // SPI
    body.extend_from_slice(&1u32.to_be_bytes()); // sequence number
    body.extend_from_slice(&[0xab; 12]); // ICV
    Ext6 { kind: 51, body }
}
