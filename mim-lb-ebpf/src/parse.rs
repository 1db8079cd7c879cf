//! Packet parsing: one bounds-checked accessor and the header walk built on it. Every offset
//! comes from the headers themselves (VLAN tags, IPv4 IHL, IPv6 extension lengths), never from
//! a fixed layout. A header that does not fit in the frame is an error (`MALFORMED`), so no
//! read can go past `data_end`.

use aya_ebpf::programs::XdpContext;
use mim_lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, reason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

// EtherTypes and IPv6 next-header values, in the order they appear on the wire.
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_ESP: u8 = 50;
const IPV6_AH: u8 = 51;
const IPV6_MOBILITY: u8 = 135;
const IPV6_HIP: u8 = 139;
const IPV6_SHIM6: u8 = 140;
/// Extension headers walked before giving up (`IPV6_EXTENSION`). Real traffic to a service
/// carries none or one; the bound keeps the verifier's path count small.
const IPV6_MAX_EXTENSIONS: usize = 4;

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(reason::MALFORMED);
    }
    Ok((start + offset) as *mut T)
}

/// What the program needs to know of a packet.
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    /// Wire-order address words.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Wire order; zero for fragments.
    pub sport: u16,
    pub dport: u16,
    /// TCP SYN without ACK: the first packet of a connection.
    pub tcp_syn: bool,
    /// `WHOLE`, `FIRST_FRAGMENT`, `FRAGMENT` or `ICMP_ERROR`.
    pub kind: u8,
    /// The IP identification of a fragment (`FIRST_FRAGMENT`, `FRAGMENT`), host order.
    pub frag_id: u32,
}

/// A whole TCP or UDP datagram: the fields are its own.
pub const WHOLE: u8 = 0;
/// A later part of a fragmented datagram, or a first part too short to hold the ports: only
/// the addresses, the protocol and `frag_id` are known.
pub const FRAGMENT: u8 = 1;
/// The first fragment of a TCP or UDP datagram (offset 0, more to come): its ports are read,
/// and it goes where the whole datagram would.
pub const FIRST_FRAGMENT: u8 = 3;
/// An ICMP error addressed to the source of the packet it quotes, which is a TCP segment or
/// UDP datagram with its ports: the fields describe the quoted packet's flow in the other
/// direction (source = the quote's destination, `dport` = the quote's source port), the
/// direction the flow's own packets take through the gateway; never a SYN.
pub const ICMP_ERROR: u8 = 2;

/// Walks Ethernet, up to two VLAN tags, IPv4 (with options) or IPv6 (with hop-by-hop,
/// routing, destination-options and fragment headers), then TCP or UDP.
/// The error is the reason code the packet is counted under.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;

    // 802.1ad outer tag, then 802.1Q inner tag: both are kept as they are.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, offset)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        offset += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        ETH_P_8021Q | ETH_P_8021AD => Err(reason::VLAN_TOO_DEEP),
        _ => Err(reason::NOT_IP),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Packet, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    let (vihl, frags, proto, src, dst, tot_len, id) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            u16::from_be_bytes((*ip).tot_len),
            u16::from_be_bytes((*ip).id),
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || (tot_len as usize) < header_len {
        return Err(reason::MALFORMED);
    }
    // The datagram ends at its total length; what follows in the frame is Ethernet padding,
    // which must never be read as ports or flags.
    let end = offset + tot_len as usize;
    let mut packet = Packet {
        family: FAMILY_V4,
        proto,
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        sport: 0,
        dport: 0,
        tcp_syn: false,
        kind: WHOLE,
        frag_id: id as u32,
    };
    if frags & 0x1fff != 0 {
        packet.kind = FRAGMENT;
        return Ok(packet);
    }
    if frags & IPV4_MORE_FRAGMENTS != 0 {
        first_fragment(ctx, offset + header_len, end, &mut packet);
        return Ok(packet);
    }
    if let Err(code) = parse_l4(ctx, offset + header_len, end, &mut packet) {
        // Only on the way out of a datagram that is not TCP or UDP, and cold: without the
        // hint LLVM tests for ICMP first in the switch on the protocol, one more test for
        // every TCP packet.
        if proto == PROTO_ICMP {
            core::hint::cold_path();
            parse_icmp_error(ctx, offset + header_len, end, &mut packet)?;
            return Ok(packet);
        }
        return Err(code);
    }
    Ok(packet)
}

/// IPv4 "more fragments" flag, in the flags-and-offset word.
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;

/// The first fragment of a datagram whose L4 header starts at `offset`: a TCP or UDP one whose
/// ports it holds becomes a `FIRST_FRAGMENT` with them; any other stays a `FRAGMENT` (no
/// service matches another protocol; one too short for its ports cannot be placed).
#[inline(always)]
fn first_fragment(ctx: &XdpContext, offset: usize, end: usize, packet: &mut Packet) {
    packet.kind = FRAGMENT;
    if (packet.proto == PROTO_TCP || packet.proto == PROTO_UDP) && parse_l4(ctx, offset, end, packet).is_ok() {
        packet.kind = FIRST_FRAGMENT;
    }
}

/// A header of `T` at `offset` that lies inside both the frame and the datagram (`end`).
/// Both checks stay: the verifier needs the one against the frame on every path, so the
/// program never compares `end` with the frame length (the compiler would then drop the
/// frame check as implied).
#[inline(always)]
fn header_at<T>(ctx: &XdpContext, offset: usize, end: usize) -> Result<*const T, u32> {
    inside::<T>(ctx, offset, end, reason::MALFORMED)
}

/// A header of `T` at `offset` inside the frame and before `end`; one past `end` is `short`.
#[inline(always)]
fn inside<T>(ctx: &XdpContext, offset: usize, end: usize, short: u32) -> Result<*const T, u32> {
    if offset + core::mem::size_of::<T>() > end {
        return Err(short);
    }
    Ok(ptr_at::<T>(ctx, offset)?)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<Packet, u32> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    let (version, payload_len, mut next, src, dst) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len),
            (*ip).next_hdr,
            core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).src_addr),
            core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).dst_addr),
        )
    };
    if version != 6 {
        return Err(reason::MALFORMED);
    }
    let end = offset + Ipv6Hdr::LEN + payload_len as usize;
    let mut packet = Packet {
        family: FAMILY_V6,
        proto: next,
        src,
        dst,
        sport: 0,
        dport: 0,
        tcp_syn: false,
        kind: WHOLE,
        frag_id: 0,
    };
    let mut offset = offset + Ipv6Hdr::LEN;
    for _ in 0..IPV6_MAX_EXTENSIONS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                // next header, length in 8-octet units not counting the first 8.
                let ext: *const [u8; 2] = header_at(ctx, offset, end)?;
                let (nh, len) = unsafe { ((*ext)[0], (*ext)[1]) };
                next = nh;
                offset += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                // next header, reserved, offset (13 bits) and M flag, identification.
                let frag: *const [u8; 8] = header_at(ctx, offset, end)?;
                let (nh, off_hi, off_lo_m, id) = unsafe {
                    let f = *frag;
                    (f[0], f[2], f[3], u32::from_be_bytes([f[4], f[5], f[6], f[7]]))
                };
                packet.frag_id = id;
                if off_hi != 0 || off_lo_m & 0xf8 != 0 {
                    packet.proto = nh;
                    packet.kind = FRAGMENT;
                    return Ok(packet);
                }
                // Offset 0 and M set: the first fragment. Its ports are read only when TCP or
                // UDP follows the fragment header at once: the later fragments name that header
                // as their protocol, and a first fragment must be named as they are.
                if off_lo_m & 1 != 0 {
                    packet.kind = FIRST_FRAGMENT;
                    if nh != PROTO_TCP && nh != PROTO_UDP {
                        packet.proto = nh;
                        packet.kind = FRAGMENT;
                        return Ok(packet);
                    }
                }
                // Otherwise an atomic fragment, a whole datagram (RFC 6946), whose headers
                // follow as in any other.
                next = nh;
                offset += 8;
            }
            _ => break,
        }
    }
    packet.proto = next;
    if packet.kind == FIRST_FRAGMENT {
        first_fragment(ctx, offset, end, &mut packet);
        return Ok(packet);
    }
    match next {
        PROTO_TCP | PROTO_UDP => {
            parse_l4(ctx, offset, end, &mut packet)?;
            Ok(packet)
        }
        PROTO_ICMPV6 => {
            parse_icmp_error(ctx, offset, end, &mut packet)?;
            Ok(packet)
        }
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_FRAGMENT | IPV6_ESP | IPV6_AH
        | IPV6_MOBILITY | IPV6_HIP | IPV6_SHIM6 => Err(reason::IPV6_EXTENSION),
        _ => Err(reason::NOT_TCP_UDP),
    }
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, end: usize, packet: &mut Packet) -> Result<(), u32> {
    match packet.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = header_at(ctx, offset, end)?;
            let (source, dest, doff, syn, ack) = unsafe {
                (
                    (*tcp).source,
                    (*tcp).dest,
                    (*tcp).doff(),
                    (*tcp).syn(),
                    (*tcp).ack(),
                )
            };
            if doff < 5 {
                return Err(reason::MALFORMED);
            }
            packet.sport = u16::from_ne_bytes(source);
            packet.dport = u16::from_ne_bytes(dest);
            packet.tcp_syn = syn != 0 && ack == 0;
            Ok(())
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = header_at(ctx, offset, end)?;
            let (src, dst) = unsafe { ((*udp).src, (*udp).dst) };
            packet.sport = u16::from_ne_bytes(src);
            packet.dport = u16::from_ne_bytes(dst);
            Ok(())
        }
        _ => Err(reason::NOT_TCP_UDP),
    }
}

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
// ICMP errors that are relayed to a master (RFC 792, RFC 4443).
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// The ICMP header before the quote: type, code, checksum and four octets (unused, or the
/// next-hop MTU).
const ICMP_HEADER_LEN: usize = 8;

/// Like `header_at`, for the quote inside an ICMP error: a header that the datagram (`end`)
/// does not hold is a short quote (`ICMP_QUOTE_SHORT`); one that the frame does not hold is
/// still `MALFORMED`.
#[inline(always)]
fn quoted_at<T>(ctx: &XdpContext, offset: usize, end: usize) -> Result<*const T, u32> {
    inside::<T>(ctx, offset, end, reason::ICMP_QUOTE_SHORT)
}

/// An ICMP or ICMPv6 message at `offset` (`packet` is its IP datagram, which ends at `end`).
/// An error of a relayed kind that quotes a TCP segment or UDP datagram sent from the
/// datagram's destination turns `packet` into an `ICMP_ERROR` packet of the quoted flow,
/// turned round; anything else is `NOT_TCP_UDP`, as all ICMP was before. The quote is read
/// up to its ports only (RFC 792 guarantees the IP header and 8 octets), bounded by `end`,
/// never by the quoted length.
#[inline(always)]
fn parse_icmp_error(ctx: &XdpContext, offset: usize, end: usize, outer: &mut Packet) -> Result<(), u32> {
    let icmp: *const [u8; ICMP_HEADER_LEN] = header_at(ctx, offset, end).map_err(|_| reason::NOT_TCP_UDP)?;
    let kind = unsafe { (*icmp)[0] };
    let relayed = if outer.family == FAMILY_V4 {
        kind == ICMP_DEST_UNREACHABLE || kind == ICMP_TIME_EXCEEDED
    } else {
        kind == ICMPV6_DEST_UNREACHABLE || kind == ICMPV6_PACKET_TOO_BIG || kind == ICMPV6_TIME_EXCEEDED
    };
    if !relayed {
        return Err(reason::NOT_TCP_UDP);
    }
    let quote = offset + ICMP_HEADER_LEN;
    let (proto, src, dst, ports_at) = if outer.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = quoted_at(ctx, quote, end)?;
        let (vihl, frags, proto, src, dst) = unsafe {
            (
                (*ip).vihl,
                u16::from_be_bytes((*ip).frags),
                (*ip).proto,
                u32::from_ne_bytes((*ip).src_addr),
                u32::from_ne_bytes((*ip).dst_addr),
            )
        };
        let header_len = ((vihl & 0x0f) as usize) * 4;
        // Only a whole datagram or a first fragment quotes ports.
        if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || frags & 0x1fff != 0 {
            return Err(reason::NOT_TCP_UDP);
        }
        (proto, [src, 0, 0, 0], [dst, 0, 0, 0], quote + header_len)
    } else {
        let ip: *const Ipv6Hdr = quoted_at(ctx, quote, end)?;
        // A master's answers carry no extension headers: a quote with any is not walked.
        let (version, proto, src, dst) = unsafe {
            (
                (*ip).vcf[0] >> 4,
                (*ip).next_hdr,
                core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).src_addr),
                core::mem::transmute::<[u8; 16], [u32; 4]>((*ip).dst_addr),
            )
        };
        if version != 6 {
            return Err(reason::NOT_TCP_UDP);
        }
        (proto, src, dst, quote + Ipv6Hdr::LEN)
    };
    // The error must be addressed to the quoted packet's source: the VIP that sent it.
    if (proto != PROTO_TCP && proto != PROTO_UDP) || src != outer.dst {
        return Err(reason::NOT_TCP_UDP);
    }
    let ports: *const [u8; 4] = quoted_at(ctx, ports_at, end)?;
    let (sport, dport) = unsafe {
        let p = *ports;
        (u16::from_ne_bytes([p[0], p[1]]), u16::from_ne_bytes([p[2], p[3]]))
    };
    *outer = Packet {
        family: outer.family,
        proto,
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        tcp_syn: false,
        kind: ICMP_ERROR,
        frag_id: 0,
    };
    Ok(())
}
