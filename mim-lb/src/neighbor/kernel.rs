//! Talking to the kernel: reading, making and removing neighbour entries over rtnetlink, and
//! the UDP nudge for kernels without managed entries.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
    NeighbourState,
};
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};

use super::NeighborError;
use super::track::Entry;

/// Longest wait for the kernel to answer one request. It answers in microseconds; this only
/// keeps a wedged socket from hanging the resolver (or its shutdown) for good.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The discard service (RFC 863): a datagram sent there asks nothing of the receiver.
const DISCARD_PORT: u16 = 9;

/// Runs one netlink exchange with [`REQUEST_TIMEOUT`], naming `operation` on `interface` in
/// errors.
pub(super) async fn bounded<T>(
    operation: &str,
    interface: &str,
    exchange: impl Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, NeighborError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(NeighborError::Netlink {
            operation: operation.to_owned(),
            interface: interface.to_owned(),
            source,
        }),
        Err(_) => Err(NeighborError::Timeout {
            operation: operation.to_owned(),
            interface: interface.to_owned(),
            timeout: REQUEST_TIMEOUT,
        }),
    }
}

/// Index and link-layer address of `interface` (RTM_GETLINK by name).
pub(super) async fn link(
    handle: &Handle,
    interface: &str,
) -> Result<(u32, Vec<u8>), rtnetlink::Error> {
    let mut links = handle.link().get().match_name(interface).execute();
    let Some(link) = links.try_next().await? else {
        return Err(rtnetlink::Error::RequestFailed);
    };
    let address = link.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => Some(bytes),
        _ => None,
    });
    Ok((link.header.index, address.unwrap_or_default()))
}

/// The entry `message` describes, if it is an ARP or ND entry on `ifindex`.
pub(super) fn parse(message: &NeighbourMessage, ifindex: u32) -> Option<(IpAddr, Entry)> {
    let header = &message.header;
    if header.ifindex != ifindex || header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let (mut address, mut mac, mut ext) = (None, None, NeighbourExtFlags::empty());
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                address = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                address = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = bytes.as_slice().try_into().ok(),
            NeighbourAttribute::ExtFlags(flags) => ext = *flags,
            _ => {}
        }
    }
    let entry = Entry {
        state: header.state,
        mac,
        managed: ext.contains(NeighbourExtFlags::Managed),
        external: header.flags.contains(NeighbourFlags::ExtLearned)
            || !ext.difference(NeighbourExtFlags::Managed).is_empty(),
    };
    Some((address?, entry))
}

/// The ARP and ND entries on `ifindex` (RTM_GETNEIGH dump of all families).
pub(super) async fn dump(
    handle: &Handle,
    ifindex: u32,
) -> Result<BTreeMap<IpAddr, Entry>, rtnetlink::Error> {
    let mut entries = BTreeMap::new();
    let mut messages = handle.neighbours().get().execute();
    while let Some(message) = messages.try_next().await? {
        entries.extend(parse(&message, ifindex));
    }
    Ok(entries)
}

fn message(ifindex: u32, address: IpAddr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.ifindex = ifindex;
    let (family, destination) = match address {
        IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(a)),
    };
    message.header.family = family;
    message.attributes.push(NeighbourAttribute::Destination(destination));
    message
}

/// Sends one request and waits for the kernel's acknowledgement.
async fn acknowledged(
    handle: &Handle,
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut request = NetlinkMessage::from(message);
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut responses = handle.clone().request(request)?;
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::Error(error) = response.payload
            && error.code.is_some()
        {
            return Err(rtnetlink::Error::NetlinkError(error));
        }
    }
    Ok(())
}

/// Makes the entry for `address` a managed one (`ip neigh add|change ADDR dev IF managed`):
/// the kernel resolves it and then re-probes it whenever it ages, for as long as it exists.
/// `create`: there is no entry yet (fails with EEXIST if one appeared); otherwise an existing
/// entry is converted, keeping its state and MAC.
pub(super) async fn make_managed(
    handle: &Handle,
    ifindex: u32,
    address: IpAddr,
    create: bool,
) -> Result<(), rtnetlink::Error> {
    let mut message = message(ifindex, address);
    // NUD_NONE, as iproute2 sends: the kernel keeps an entry's own state for a managed
    // request (and refuses a permanent one).
    message.header.state = NeighbourState::None;
    // NTF_USE as well: kernels before 5.16 ignore NDA_FLAGS_EXT, and without NTF_USE would set
    // the entry to NUD_NONE, dropping a MAC it had; with it they start resolving instead.
    message.header.flags = NeighbourFlags::Use;
    message.attributes.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    let flags = if create { NLM_F_CREATE | NLM_F_EXCL } else { NLM_F_REPLACE };
    acknowledged(handle, RouteNetlinkMessage::NewNeighbour(message), flags).await
}

/// Turns a managed entry back into an ordinary one: an admin update without NTF_EXT_MANAGED
/// clears the flag, and NTF_USE keeps the entry's state and MAC.
pub(super) async fn make_unmanaged(
    handle: &Handle,
    ifindex: u32,
    address: IpAddr,
) -> Result<(), rtnetlink::Error> {
    let mut message = message(ifindex, address);
    message.header.flags = NeighbourFlags::Use;
    acknowledged(handle, RouteNetlinkMessage::NewNeighbour(message), NLM_F_REPLACE).await
}

pub(super) async fn delete(
    handle: &Handle,
    ifindex: u32,
    address: IpAddr,
) -> Result<(), rtnetlink::Error> {
    acknowledged(handle, RouteNetlinkMessage::DelNeighbour(message(ifindex, address)), 0).await
}

/// The errno of a failed netlink request, if the kernel refused it.
pub(super) fn errno(error: &NeighborError) -> Option<i32> {
    match error {
        NeighborError::Netlink { source: rtnetlink::Error::NetlinkError(e), .. } => {
            Some(-e.raw_code())
        }
        _ => None,
    }
}

/// Makes the kernel resolve `address` on `interface` where managed entries are not available:
/// an empty UDP datagram to the discard port. Sending needs the neighbour's MAC, so the kernel
/// creates the entry and sends ARP/ND (or, for a STALE entry, confirms it with a unicast probe
/// shortly after), holding the datagram until then. The socket is bound to the interface
/// (SO_BINDTODEVICE) so that the resolution happens there even if routing would pick another
/// interface. The neighbour may answer with an ICMP port unreachable; nobody reads it.
pub(super) fn send_udp_nudge(interface: &str, ifindex: u32, address: IpAddr) -> io::Result<()> {
    let (socket, target) = match address {
        IpAddr::V4(a) => {
            (UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?, SocketAddr::from((a, DISCARD_PORT)))
        }
        // The scope id matters for link-local addresses only; the kernel ignores it otherwise.
        IpAddr::V6(a) => (
            UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
            SocketAddr::V6(SocketAddrV6::new(a, DISCARD_PORT, 0, ifindex)),
        ),
    };
    let name = interface.as_bytes();
    // SAFETY: the kernel copies at most `name.len()` bytes from a live slice and keeps no
    // pointer; the fd is owned by `socket`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // A full socket buffer must not block the resolver; the next nudge will do.
    socket.set_nonblocking(true)?;
    socket.send_to(&[], target)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neighbour(ifindex: u32, state: NeighbourState) -> NeighbourMessage {
        let mut m = message(ifindex, "10.0.0.11".parse().unwrap());
        m.header.state = state;
        m
    }

    #[test]
    fn parses_entries_of_the_interface_only() {
        let mut m = neighbour(7, NeighbourState::Reachable);
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]));
        m.attributes.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        let (address, entry) = parse(&m, 7).unwrap();
        assert_eq!(address, "10.0.0.11".parse::<IpAddr>().unwrap());
        assert_eq!(
            entry,
            Entry {
                state: NeighbourState::Reachable,
                mac: Some([2, 0, 0, 0, 0, 1]),
                managed: true,
                external: false
            }
        );
        assert_eq!(parse(&m, 8), None);
    }

    #[test]
    fn proxy_and_driver_entries() {
        let mut proxy = neighbour(7, NeighbourState::None);
        proxy.header.flags = NeighbourFlags::Proxy;
        assert_eq!(parse(&proxy, 7), None);
        let mut learned = neighbour(7, NeighbourState::Reachable);
        learned.header.flags = NeighbourFlags::ExtLearned;
        assert!(parse(&learned, 7).unwrap().1.is_configured());
        let plain = neighbour(7, NeighbourState::Stale);
        let (_, entry) = parse(&plain, 7).unwrap();
        assert!(!entry.is_configured() && !entry.managed && entry.mac.is_none());
    }

    #[test]
    fn errno_of_a_refusal() {
        let mut e = rtnetlink::packet_core::ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(-libc::EEXIST);
        let error = NeighborError::Netlink {
            operation: "x".into(),
            interface: "eth0".into(),
            source: rtnetlink::Error::NetlinkError(e),
        };
        assert_eq!(errno(&error), Some(libc::EEXIST));
    }
}
