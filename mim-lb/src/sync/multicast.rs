//! The directors' multicast group (`[sync] group`): one socket that receives what is sent to
//! the group, and the options that make the unicast socket send to it on the right link.

use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV6},
};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::UdpSocket;

/// A socket bound to the group's address and port, joined on the interface that holds
/// `listen`: it receives the group's datagrams and nothing else.
pub fn join(listen: SocketAddr, group: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(group), Type::DGRAM, Some(Protocol::UDP))?;
    // Another program on the host may use the same group and port.
    socket.set_reuse_address(true)?;
    let bind_to: SocketAddr = match (group.ip(), listen.ip()) {
        (IpAddr::V4(g), IpAddr::V4(l)) => {
            socket.join_multicast_v4(&g, &l)?;
            group
        }
        (IpAddr::V6(g), IpAddr::V6(l)) => {
            let index = interface_index(IpAddr::V6(l))?;
            socket.join_multicast_v6(&g, index)?;
            // A link-local group (ff02::/16) is bound only with its link named.
            SocketAddrV6::new(g, group.port(), 0, index).into()
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "the group and sync.listen are of different families")),
    };
    socket.bind(&bind_to.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Makes `socket` (bound to `listen`) send to groups out of `listen`'s interface, to the
/// segment only (one hop), and not back to itself.
pub fn send_from(socket: &UdpSocket, listen: SocketAddr) -> io::Result<()> {
    let s = SockRef::from(socket);
    match listen.ip() {
        IpAddr::V4(l) => {
            s.set_multicast_if_v4(&l)?;
            s.set_multicast_ttl_v4(1)?;
            s.set_multicast_loop_v4(false)
        }
        IpAddr::V6(l) => {
            s.set_multicast_if_v6(interface_index(IpAddr::V6(l))?)?;
            s.set_multicast_hops_v6(1)?;
            s.set_multicast_loop_v6(false)
        }
    }
}

/// The index of the interface that holds `addr`.
fn interface_index(addr: IpAddr) -> io::Result<u32> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family says which struct it is.
        let here = unsafe {
            match (*ifa.ifa_addr).sa_family as libc::c_int {
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()))
                }
                _ => None,
            }
        };
        if here == Some(addr) {
            // SAFETY: ifa_name is a NUL-terminated name while the list lives.
            let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
            if index != 0 {
                found = Some(index);
                break;
            }
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface holds {addr}")))
}
