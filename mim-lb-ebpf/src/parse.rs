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
    /// Part of a fragmented datagram (ports not read).
    pub fragment: bool,
}

/// Walks Ethernet, up to two VLAN tags, IPv4 (with options) or IPv6 (with hop-by-hop,
/// routing, destination-options and atomic fragment headers), then TCP or UDP.
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
    let (vihl, frags, proto, src, dst, tot_len) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            u16::from_be_bytes((*ip).tot_len),
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
        // More-fragments flag or a non-zero offset.
        fragment: frags & 0x3fff != 0,
    };
    if packet.fragment {
        return Ok(packet);
    }
    parse_l4(ctx, offset + header_len, end, &mut packet)?;
    Ok(packet)
}

/// A header of `T` at `offset` that lies inside both the frame and the datagram (`end`).
/// Both checks stay: the verifier needs the one against the frame on every path, so the
/// program never compares `end` with the frame length (the compiler would then drop the
/// frame check as implied).
#[inline(always)]
fn header_at<T>(ctx: &XdpContext, offset: usize, end: usize) -> Result<*const T, u32> {
    if offset + core::mem::size_of::<T>() > end {
        return Err(reason::MALFORMED);
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
        fragment: false,
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
                let frag: *const [u8; 4] = header_at(ctx, offset, end)?;
                let (nh, off_hi, off_lo_m) = unsafe { ((*frag)[0], (*frag)[2], (*frag)[3]) };
                // An atomic fragment (offset 0, no more fragments) is a whole datagram.
                if off_hi != 0 || off_lo_m & 0xf9 != 0 {
                    packet.proto = nh;
                    packet.fragment = true;
                    return Ok(packet);
                }
                next = nh;
                offset += 8;
            }
            _ => break,
        }
    }
    packet.proto = next;
    match next {
        PROTO_TCP | PROTO_UDP => {
            parse_l4(ctx, offset, end, &mut packet)?;
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
