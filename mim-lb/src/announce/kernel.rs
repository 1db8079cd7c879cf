//! Writing the VIPs' routes into the announce table over rtnetlink: `ip route replace VIP/32
//! dev lo table T proto P`, read back and removed the same way.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
};
use rtnetlink::{
    Handle,
    packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
};
use tokio::sync::watch;

use super::{Applied, Found, host_len, plan};
use crate::config::Announce;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("opening a netlink socket for the announce routes: {0}")]
    Socket(std::io::Error),
    #[error("{operation}: {source}")]
    Netlink { operation: String, source: rtnetlink::Error },
    #[error("{operation}: no answer from the kernel within {timeout:?}")]
    Timeout { operation: String, timeout: Duration },
    #[error("the loopback interface lo was not found")]
    NoLoopback,
}

/// Longest wait for the kernel's answer to one request: it answers in microseconds; this only
/// keeps a wedged socket from holding the writer, or the daemon's stop, for good.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The table RTM_NEWROUTE's one-byte field names when the real id is in RTA_TABLE.
const RT_TABLE_COMPAT: u8 = 252;

async fn bounded<T>(
    operation: impl Fn() -> String,
    exchange: impl Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, AnnounceError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(AnnounceError::Netlink { operation: operation(), source }),
        Err(_) => Err(AnnounceError::Timeout { operation: operation(), timeout: REQUEST_TIMEOUT }),
    }
}

/// Owns the netlink socket; runs as a task of its own.
pub(super) struct Writer {
    config: Announce,
    handle: Handle,
    loopback: u32,
    connection: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub(super) async fn open(config: Announce) -> Result<Writer, AnnounceError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(AnnounceError::Socket)?;
        let connection = tokio::spawn(connection);
        let mut links = handle.link().get().match_name("lo".to_owned()).execute();
        let loopback = match bounded(|| "looking up lo".to_owned(), links.try_next()).await {
            Ok(Some(link)) => link.header.index,
            Ok(None) => {
                connection.abort();
                return Err(AnnounceError::NoLoopback);
            }
            Err(e) => {
                connection.abort();
                return Err(e);
            }
        };
        Ok(Writer { config, handle, loopback, connection })
    }

    /// Applies every wish as it comes, reads the table back every `recheck` (and after a
    /// failure, every `retry`), and reports what it achieved.
    pub(super) async fn run(
        self,
        mut wishes: watch::Receiver<(u64, BTreeSet<IpAddr>)>,
        report: watch::Sender<Applied>,
        recheck: Duration,
        retry: Duration,
    ) {
        // The first pass reads the table: routes an earlier run left are removed or rewritten.
        let mut installed: Option<BTreeSet<IpAddr>> = None;
        let mut failures: u32 = 0;
        loop {
            let (generation, want) = wishes.borrow_and_update().clone();
            let result = self.apply(installed.as_ref(), &want).await;
            match result {
                Ok(now) => {
                    failures = 0;
                    installed = Some(now.clone());
                    report.send_replace(Applied { generation, installed: now, error: None });
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    log::warn!("announce: {e} (tried again in {:?})", backoff(retry, recheck, failures));
                    // What is there is unknown now: the next pass reads the table.
                    installed = None;
                    report.send_modify(|a| {
                        a.generation = generation;
                        a.error = Some(e.to_string());
                    });
                }
            }
            let wait = if failures > 0 { backoff(retry, recheck, failures) } else { recheck };
            tokio::select! {
                changed = wishes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(wait) => installed = None,
            }
        }
    }

    /// One pass: with `installed` unknown, reads the table first; otherwise changes only the
    /// difference. Returns the VIPs now in the table.
    async fn apply(&self, installed: Option<&BTreeSet<IpAddr>>, want: &BTreeSet<IpAddr>) -> Result<BTreeSet<IpAddr>, AnnounceError> {
        let found: Vec<Found> = match installed {
            Some(set) => {
                set.iter().map(|vip| Found { destination: *vip, prefix_len: host_len(vip), as_written: true }).collect()
            }
            None => self.read().await?,
        };
        let p = plan(&found, want);
        let mut now: BTreeSet<IpAddr> =
            found.iter().filter(|f| f.prefix_len == host_len(&f.destination)).map(|f| f.destination).collect();
        for (vip, len) in &p.delete {
            self.delete(*vip, *len).await?;
            if *len == host_len(vip) {
                now.remove(vip);
            }
            log::info!("announce: removed the route of {vip}/{len} from table {}", self.config.table);
        }
        for vip in &p.replace {
            self.replace(*vip).await?;
            if now.insert(*vip) {
                log::info!("announce: route of {vip} written to table {}", self.config.table);
            }
        }
        Ok(now)
    }

    fn message(&self, vip: IpAddr, len: u8) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header = RouteHeader {
            address_family: if vip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 },
            destination_prefix_length: len,
            table: u8::try_from(self.config.table).unwrap_or(RT_TABLE_COMPAT),
            protocol: RouteProtocol::from(self.config.protocol),
            scope: RouteScope::Link,
            kind: RouteType::Unicast,
            ..RouteHeader::default()
        };
        message.attributes.push(RouteAttribute::Destination(RouteAddress::from(vip)));
        message.attributes.push(RouteAttribute::Table(self.config.table));
        message
    }

    async fn replace(&self, vip: IpAddr) -> Result<(), AnnounceError> {
        let mut message = self.message(vip, host_len(&vip));
        message.attributes.push(RouteAttribute::Oif(self.loopback));
        let what = || format!("writing the route of {vip} to table {}", self.config.table);
        bounded(what, self.acknowledged(RouteNetlinkMessage::NewRoute(message), NLM_F_CREATE | NLM_F_REPLACE)).await
    }

    async fn delete(&self, vip: IpAddr, len: u8) -> Result<(), AnnounceError> {
        let message = self.message(vip, len);
        let what = || format!("removing the route of {vip}/{len} from table {}", self.config.table);
        match bounded(what, self.acknowledged(RouteNetlinkMessage::DelRoute(message), 0)).await {
            // Already gone (an operator, or a race with our own read): what we wanted.
            Err(AnnounceError::Netlink { source: rtnetlink::Error::NetlinkError(e), .. }) if -e.raw_code() == libc::ESRCH => Ok(()),
            other => other,
        }
    }

    /// The routes in the table with our protocol number, both families.
    async fn read(&self) -> Result<Vec<Found>, AnnounceError> {
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let routes = self.handle.route().get(query).execute();
            let what = || format!("reading the routes of table {}", self.config.table);
            let all: Vec<RouteMessage> = bounded(what, routes.try_collect()).await?;
            found.extend(all.iter().filter_map(|r| ours(r, self.config, self.loopback)));
        }
        Ok(found)
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    async fn acknowledged(&self, message: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut responses = self.handle.clone().request(request)?;
        while let Some(response) = responses.next().await {
            if let NetlinkPayload::Error(error) = response.payload
                && error.code.is_some()
            {
                return Err(rtnetlink::Error::NetlinkError(error));
            }
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// The wait before the `failures`th retry: `retry`, doubled each time, at most `cap`.
fn backoff(retry: Duration, cap: Duration, failures: u32) -> Duration {
    retry.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(cap)
}

/// The route `route` is, if it is in our table with our protocol number.
fn ours(route: &RouteMessage, config: Announce, loopback: u32) -> Option<Found> {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    if table != config.table || u8::from(route.header.protocol) != config.protocol {
        return None;
    }
    let destination = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    // A default route of ours has no destination attribute.
    let destination = destination.unwrap_or(match route.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    });
    let via_lo = route.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == loopback));
    let as_written = via_lo && route.header.kind == RouteType::Unicast;
    Some(Found { destination, prefix_len: route.header.destination_prefix_length, as_written })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_recheck_period() {
        let (retry, cap) = (Duration::from_secs(1), Duration::from_secs(30));
        let waits: Vec<u64> = (1..=7).map(|n| backoff(retry, cap, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(retry, cap, u32::MAX), cap);
    }
}
