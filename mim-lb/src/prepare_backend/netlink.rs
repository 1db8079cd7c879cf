//! Interfaces and addresses over rtnetlink: what prepare-backend needs to see and to change.
//! Netlink sockets belong to the network namespace of the thread that opens them.

use std::io;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{AddressMessageBuilder, Handle};

use super::vip::Vip;

/// A netlink request that failed, with the operation it was for.
#[derive(Debug, thiserror::Error)]
#[error("netlink: {op}: {source}")]
pub struct NetlinkError {
    pub op: String,
    pub source: io::Error,
}

impl NetlinkError {
    fn new(op: impl Into<String>, e: rtnetlink::Error) -> NetlinkError {
        let source = match e {
            // The kernel's errno, so that "File exists" or "Operation not permitted" shows.
            rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
            other => io::Error::other(other.to_string()),
        };
        NetlinkError { op: op.into(), source }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
}

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub ifname: String,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// A connection to the kernel's routing netlink, served by a task on the current tokio
/// runtime.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Must be called inside a tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|source| NetlinkError { op: "opening a netlink socket".into(), source })?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let messages: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new("listing interfaces", e))?;
        Ok(messages
            .into_iter()
            .filter_map(|m| {
                let name = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                })?;
                Some(Link {
                    index: m.header.index,
                    name,
                    up: m.header.flags.contains(LinkFlags::Up),
                })
            })
            .collect())
    }

    /// Every address of every interface (IPv4 and IPv6).
    pub async fn addresses(&self, links: &[Link]) -> Result<Vec<IfAddr>, NetlinkError> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new("listing addresses", e))?;
        Ok(messages
            .iter()
            .filter_map(|m| {
                let ifname = links.iter().find(|l| l.index == m.header.index)?.name.clone();
                Some(IfAddr { ifname, ip: local_address(m)?, prefix_len: m.header.prefix_len })
            })
            .collect())
    }

    /// `ip addr add VIP/32 dev lo` (or `/128 ... nodad`).
    pub async fn add_vip(&self, lo: &Link, vip: Vip) -> Result<(), NetlinkError> {
        let mut request = self.handle.address().add(lo.index, vip.ip(), vip.prefix_len());
        if !vip.is_ipv4() {
            // No duplicate address detection: nothing else can answer for an address on lo,
            // and a tentative address would not accept traffic for a second or two.
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("adding {vip} to {}", lo.name), e))
    }

    /// `ip addr del VIP/32 dev lo`.
    pub async fn remove_vip(&self, lo: &Link, vip: Vip) -> Result<(), NetlinkError> {
        let message = match vip.ip() {
            IpAddr::V4(ip) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
                .index(lo.index)
                .address(ip, vip.prefix_len())
                .build(),
            IpAddr::V6(ip) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(lo.index)
                .address(ip, vip.prefix_len())
                .build(),
        };
        self.handle
            .address()
            .del(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("removing {vip} from {}", lo.name), e))
    }
}

/// The interface's own address: IFA_LOCAL where present (on point-to-point links IFA_ADDRESS
/// is the peer), else IFA_ADDRESS; what `ip addr` shows.
fn local_address(m: &AddressMessage) -> Option<IpAddr> {
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}
