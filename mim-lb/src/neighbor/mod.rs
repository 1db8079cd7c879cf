//! Backend MAC resolution from the kernel's neighbour table, over rtnetlink.
//!
//! The XDP program rewrites the destination MAC of VIP packets to a master's MAC. Where the
//! operator configured none, [`NeighborResolver`] finds it in the neighbour (ARP/ND) table of
//! the director's interface and reports it, and changes of it, as [`NeighborEvent`]s.
//!
//! Forwarded frames leave by XDP_TX and never pass the kernel's neighbour code, so nothing
//! would otherwise keep these entries fresh. The resolver therefore makes every wanted entry a
//! *managed* one (NTF_EXT_MANAGED, Linux 5.16): the kernel resolves it at once and re-probes it
//! whenever it ages, so a master that changed its MAC is re-learned even without traffic
//! (within about a minute: the entry must age, fail its unicast probes and be resolved again;
//! a gratuitous ARP or unsolicited NA from the master is taken in at once). On kernels without
//! managed entries the resolver sends UDP datagrams instead, which make the kernel resolve.
//! Static (PERMANENT, NOARP) entries are used as they are.
//!
//! The table is watched through the RTNLGRP_NEIGH multicast group, plus a full dump every
//! [`RESYNC_INTERVAL`] in case notifications were lost (a full multicast socket drops them).

mod kernel;
mod track;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use log::{debug, warn};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use track::{Entry, Tracker};

/// How often the whole table is read again, as a safety net for lost notifications, and (on
/// kernels without managed entries) how often unresolved or aging entries are nudged.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5);

/// What the resolver learned about a wanted address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeighborEvent {
    /// First resolution of a wanted address, or its MAC changed.
    Resolved { address: IpAddr, mac: [u8; 6] },
    /// A wanted address has no usable entry (failed, or not resolved within a few seconds of
    /// being wanted); `reason` is for operators, e.g. "no ARP reply from 10.0.0.11 on eth0
    /// (neighbour entry FAILED)".
    Unresolved { address: IpAddr, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum NeighborError {
    #[error("interface {interface} does not exist")]
    NoSuchInterface { interface: String },
    #[error("interface {interface} has no Ethernet address (link-layer address {address:02x?})")]
    NotEthernet { interface: String, address: Vec<u8> },
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{operation} on {interface}: {source}")]
    Netlink {
        operation: String,
        interface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{operation} on {interface}: no answer from the kernel within {timeout:?}")]
    Timeout { operation: String, interface: String, timeout: Duration },
}

/// Index and MAC address of a local interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub index: u32,
    pub mac: [u8; 6],
}

/// The index and MAC address of a local interface, read over netlink (not from
/// /sys/class/net: the daemon may run in a network namespace whose sysfs shows another one).
pub async fn interface_info(interface: &str) -> Result<InterfaceInfo, NeighborError> {
    let (handle, _connection) = connect()?;
    lookup_interface(&handle, interface).await
}

/// The MAC address of a local interface, read over netlink (see [`interface_info`]).
pub async fn interface_mac(interface: &str) -> Result<[u8; 6], NeighborError> {
    Ok(interface_info(interface).await?.mac)
}

async fn lookup_interface(
    handle: &Handle,
    interface: &str,
) -> Result<InterfaceInfo, NeighborError> {
    // The kernel would refuse such a name with a less helpful EINVAL.
    if interface.is_empty() || interface.len() >= libc::IFNAMSIZ || interface.contains('/') {
        return Err(NeighborError::NoSuchInterface { interface: interface.to_owned() });
    }
    let (index, address) =
        match kernel::bounded("reading the link", interface, kernel::link(handle, interface)).await
        {
            Err(e) if kernel::errno(&e) == Some(libc::ENODEV) => {
                return Err(NeighborError::NoSuchInterface { interface: interface.to_owned() });
            }
            result => result?,
        };
    let mac = address
        .as_slice()
        .try_into()
        .map_err(|_| NeighborError::NotEthernet { interface: interface.to_owned(), address })?;
    Ok(InterfaceInfo { index, mac })
}

/// A spawned netlink connection; stops when dropped.
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A netlink socket for requests, with its connection task on the current runtime.
fn connect() -> Result<(Handle, Connection), NeighborError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NeighborError::Socket)?;
    Ok((handle, Connection(tokio::spawn(connection))))
}

/// Keeps the MACs of wanted addresses on one interface known: see the module documentation.
#[derive(Debug)]
pub struct NeighborResolver {
    wanted: watch::Sender<BTreeSet<IpAddr>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl NeighborResolver {
    /// Starts watching the neighbour table of `interface` (spawns its tasks on the current
    /// tokio runtime, which may be current_thread). Errors if the interface does not exist.
    pub async fn start(
        interface: &str,
        events: mpsc::Sender<NeighborEvent>,
    ) -> Result<Self, NeighborError> {
        Self::start_with(interface, events, true).await
    }

    /// Like [`NeighborResolver::start`], but never makes managed entries: it nudges the kernel
    /// with UDP datagrams as on kernels older than 5.16. For testing that path.
    #[doc(hidden)]
    pub async fn start_with_udp_nudges(
        interface: &str,
        events: mpsc::Sender<NeighborEvent>,
    ) -> Result<Self, NeighborError> {
        Self::start_with(interface, events, false).await
    }

    async fn start_with(
        interface: &str,
        events: mpsc::Sender<NeighborEvent>,
        managed: bool,
    ) -> Result<Self, NeighborError> {
        // Subscribe before the first dump, so no change between the two goes unseen. The
        // subscription has a socket of its own: on a socket also used for requests, a burst of
        // notifications filling the buffer would make the kernel drop request acks too.
        let (monitor, _, notifications) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Neigh])
                .map_err(NeighborError::Socket)?;
        let monitor = Connection(tokio::spawn(monitor));
        let (handle, requests) = connect()?;
        let ifindex = lookup_interface(&handle, interface).await?.index;
        let (wanted, wanted_rx) = watch::channel(BTreeSet::new());
        let (stop, stop_rx) = oneshot::channel();
        let worker = Worker {
            interface: interface.to_owned(),
            ifindex,
            handle,
            events,
            tracker: Tracker::new(interface),
            owned: BTreeMap::new(),
            trigger: if managed { Trigger::Unverified } else { Trigger::Udp },
            _connections: [monitor, requests],
        };
        let task = tokio::spawn(worker.run(wanted_rx, notifications, stop_rx));
        Ok(NeighborResolver { wanted, stop, task })
    }

    /// The addresses whose MACs are wanted (IPv4 and/or IPv6). New ones are looked up and
    /// resolved; ones no longer wanted stop producing events (and lose the managed entry the
    /// resolver made for them). Cheap and synchronous: the resolver's task does the work.
    pub fn set_wanted(&self, addresses: BTreeSet<IpAddr>) {
        self.wanted.send_replace(addresses);
    }

    /// Stops, and removes the neighbour entries this resolver itself created. Entries that
    /// existed before stay: static, driver-owned and already managed ones were never touched,
    /// and kernel-learned ones it made managed are made ordinary again, keeping their MAC.
    /// Dropping the resolver without calling this does the same in the background, as long as
    /// the runtime runs.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            warn!("neighbour resolver task panicked: {e}");
        }
    }
}

/// How the kernel is made to resolve and refresh entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// Managed entries, not yet seen to work on this kernel.
    Unverified,
    /// Managed entries, which this kernel supports.
    Managed,
    /// UDP nudges: the kernel has no managed entries.
    Udp,
}

/// Why the resolver holds the managed flag on an entry, which decides what it undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owned {
    /// There was no entry: the resolver created it, and deletes it when done.
    Created,
    /// An ordinary (kernel-learned) entry existed: the resolver made it managed, and makes it
    /// ordinary again when done, leaving its MAC in place. Static, driver-owned and already
    /// managed entries are never touched.
    Adopted,
}

/// The event receiver is gone: nobody listens any more.
struct Closed;

struct Worker {
    interface: String,
    ifindex: u32,
    handle: Handle,
    events: mpsc::Sender<NeighborEvent>,
    tracker: Tracker,
    owned: BTreeMap<IpAddr, Owned>,
    trigger: Trigger,
    /// Monitor and request connections, stopped when the worker ends.
    _connections: [Connection; 2],
}

type Notifications =
    UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, rtnetlink::sys::SocketAddr)>;

impl Worker {
    async fn run(
        mut self,
        mut wanted: watch::Receiver<BTreeSet<IpAddr>>,
        mut notifications: Notifications,
        stop: oneshot::Receiver<()>,
    ) {
        // `stop` also fires when the resolver is dropped. Either way the serving future is
        // dropped wherever it waits; ownership is recorded before each request that could
        // create an entry, so the cleanup below misses none.
        tokio::select! {
            _ = stop => {}
            () = self.serve(&mut wanted, &mut notifications) => {}
        }
        self.release_all().await;
    }

    async fn serve(
        &mut self,
        wanted: &mut watch::Receiver<BTreeSet<IpAddr>>,
        notifications: &mut Notifications,
    ) {
        let mut resync_at = Instant::now() + RESYNC_INTERVAL;
        let mut monitoring = true;
        loop {
            let wake = self.tracker.next_deadline().map_or(resync_at, |d| d.min(resync_at));
            let step = tokio::select! {
                changed = wanted.changed() => match changed {
                    Ok(()) => {
                        let addresses = wanted.borrow_and_update().clone();
                        self.set_wanted(&addresses).await
                    }
                    // The resolver is gone; `run` stops us.
                    Err(_) => std::future::pending().await,
                },
                notification = notifications.next(), if monitoring => match notification {
                    Some((message, _)) => self.on_notification(message).await,
                    None => {
                        warn!(
                            "neighbour notifications for {} stopped; relying on table reads \
                             every {RESYNC_INTERVAL:?}",
                            self.interface
                        );
                        monitoring = false;
                        Ok(())
                    }
                },
                () = sleep_until(wake) => {
                    let periodic = Instant::now() >= resync_at;
                    if periodic {
                        resync_at = Instant::now() + RESYNC_INTERVAL;
                    }
                    // Also read the table before reporting an address unresolved: the kernel
                    // does not announce every state change (NONE to INCOMPLETE, for one), and
                    // the reason should name the entry's state as it is.
                    match self.resync(periodic).await {
                        Ok(()) => self.expire().await,
                        closed => closed,
                    }
                }
            };
            if step.is_err() {
                debug!("neighbour events for {} are no longer received; stopping", self.interface);
                return;
            }
        }
    }

    async fn emit(&self, event: NeighborEvent) -> Result<(), Closed> {
        match &event {
            NeighborEvent::Resolved { address, mac } => {
                debug!("neighbour {address} on {} is at {}", self.interface, format_mac(mac))
            }
            NeighborEvent::Unresolved { reason, .. } => debug!("neighbour unresolved: {reason}"),
        }
        self.events.send(event).await.map_err(|_| Closed)
    }

    async fn expire(&mut self) -> Result<(), Closed> {
        for event in self.tracker.expire(Instant::now()) {
            self.emit(event).await?;
        }
        Ok(())
    }

    /// Looks at what the table says about a wanted `address`, reports what changed, and makes
    /// sure the kernel keeps it resolved.
    async fn observe(
        &mut self,
        address: IpAddr,
        entry: Option<&Entry>,
        nudge: bool,
    ) -> Result<(), Closed> {
        if let Some(event) = self.tracker.observe(address, entry, Instant::now()) {
            self.emit(event).await?;
        }
        self.keep_fresh(address, entry, nudge).await;
        Ok(())
    }

    /// The table on the interface, or `None` (logged) if it could not be read; the next
    /// resync tries again.
    async fn dump(&self) -> Option<BTreeMap<IpAddr, Entry>> {
        let dump = kernel::dump(&self.handle, self.ifindex);
        match kernel::bounded("reading the neighbour table", &self.interface, dump).await {
            Ok(table) => Some(table),
            Err(e) => {
                warn!("{e}");
                None
            }
        }
    }

    async fn set_wanted(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), Closed> {
        let (added, removed) = self.tracker.set_wanted(addresses, Instant::now());
        if added.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let table = self.dump().await;
        for address in removed {
            self.release(address, table.as_ref().map(|t| t.get(&address))).await;
        }
        let Some(table) = table else { return Ok(()) };
        for address in added {
            self.observe(address, table.get(&address), true).await?;
        }
        Ok(())
    }

    /// Reads the whole table again and takes in every wanted address. `nudge`: also nudge
    /// entries that need it, when managed entries are not available.
    async fn resync(&mut self, nudge: bool) -> Result<(), Closed> {
        let Some(table) = self.dump().await else { return Ok(()) };
        for address in self.tracker.wanted() {
            self.observe(address, table.get(&address), nudge).await?;
        }
        Ok(())
    }

    async fn on_notification(
        &mut self,
        message: NetlinkMessage<RouteNetlinkMessage>,
    ) -> Result<(), Closed> {
        let (neighbour, present) = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => (n, true),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => (n, false),
            NetlinkPayload::Overrun(_) => {
                warn!(
                    "neighbour notifications for {} overflowed; reading the table",
                    self.interface
                );
                return self.resync(false).await;
            }
            _ => return Ok(()),
        };
        let Some((address, entry)) = kernel::parse(&neighbour, self.ifindex) else {
            return Ok(());
        };
        if !self.tracker.is_wanted(&address) {
            return Ok(());
        }
        self.observe(address, present.then_some(&entry), false).await
    }

    /// Makes sure the kernel resolves `address` and keeps it fresh: with a managed entry, or
    /// else (when `nudge`) with a UDP nudge.
    async fn keep_fresh(&mut self, address: IpAddr, entry: Option<&Entry>, nudge: bool) {
        if entry.is_some_and(|e| e.is_configured() || e.managed) {
            return;
        }
        if self.trigger != Trigger::Udp {
            self.make_managed(address, entry.is_none()).await;
        }
        if self.trigger == Trigger::Udp
            && nudge
            && needs_nudge(entry)
            && let Err(e) = kernel::send_udp_nudge(&self.interface, self.ifindex, address)
        {
            debug!("nudging the kernel to resolve {address} on {}: {e}", self.interface);
        }
    }

    async fn make_managed(&mut self, address: IpAddr, create: bool) {
        // Recorded first: if shutdown interrupts the request, the entry is still cleaned up.
        let owned = if create { Owned::Created } else { Owned::Adopted };
        let before = self.owned.insert(address, owned);
        let request = kernel::make_managed(&self.handle, self.ifindex, address, create);
        let operation = format!("making a managed neighbour entry for {address}");
        match kernel::bounded(&operation, &self.interface, request).await {
            Ok(()) if self.trigger == Trigger::Unverified => self.verify_managed(address).await,
            Ok(()) => {}
            // The entry appeared (EEXIST) or vanished (ENOENT) meanwhile; the notification
            // about that brings it here again.
            Err(e) if matches!(kernel::errno(&e), Some(libc::EEXIST | libc::ENOENT)) => {
                self.restore_ownership(address, before);
            }
            // Refused as such: this kernel does not do managed entries.
            Err(e) if matches!(kernel::errno(&e), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                self.restore_ownership(address, before);
                warn!("{e}; resolving on {} with UDP nudges instead", self.interface);
                self.trigger = Trigger::Udp;
            }
            // Anything else is tried again at the next resync.
            Err(e) => {
                self.restore_ownership(address, before);
                warn!("{e}");
            }
        }
    }

    fn restore_ownership(&mut self, address: IpAddr, before: Option<Owned>) {
        match before {
            Some(owned) => self.owned.insert(address, owned),
            None => self.owned.remove(&address),
        };
    }

    /// Kernels before 5.16 accept a managed request but ignore the flag: check the first entry.
    async fn verify_managed(&mut self, address: IpAddr) {
        let Some(table) = self.dump().await else { return };
        match table.get(&address) {
            Some(entry) if entry.managed => self.trigger = Trigger::Managed,
            Some(_) => {
                warn!(
                    "the kernel does not keep managed neighbour entries (Linux < 5.16?); \
                     resolving on {} with UDP nudges instead",
                    self.interface
                );
                self.trigger = Trigger::Udp;
            }
            None => {}
        }
    }

    /// Undoes what the resolver did to the entry of `address`, if anything. `entry`: what the
    /// table says, if it could be read (`Some(None)`: no entry).
    async fn release(&mut self, address: IpAddr, entry: Option<Option<&Entry>>) {
        let Some(owned) = self.owned.remove(&address) else { return };
        // Someone may have replaced the entry meanwhile, e.g. with a static one: leave that.
        let ours = match entry {
            Some(None) => false,
            Some(Some(e)) => !e.is_configured() && (owned == Owned::Created || e.managed),
            None => true,
        };
        if !ours {
            return;
        }
        let (operation, result) = match owned {
            Owned::Created => {
                let request = kernel::delete(&self.handle, self.ifindex, address);
                let operation = format!("deleting the neighbour entry for {address}");
                let result = kernel::bounded(&operation, &self.interface, request).await;
                (operation, result)
            }
            Owned::Adopted => {
                let request = kernel::make_unmanaged(&self.handle, self.ifindex, address);
                let operation = format!("making the neighbour entry for {address} unmanaged");
                let result = kernel::bounded(&operation, &self.interface, request).await;
                (operation, result)
            }
        };
        match result {
            Ok(()) => debug!("{operation} on {}: done", self.interface),
            Err(e) if kernel::errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => warn!("{e}"),
        }
    }

    async fn release_all(&mut self) {
        if self.owned.is_empty() {
            return;
        }
        let table = self.dump().await;
        let owned: Vec<IpAddr> = self.owned.keys().copied().collect();
        for address in owned {
            self.release(address, table.as_ref().map(|t| t.get(&address))).await;
        }
    }
}

/// Whether an entry (without the kernel's management) needs a UDP nudge: missing, failed, or
/// aging unconfirmed. INCOMPLETE is being resolved; REACHABLE, DELAY and PROBE are fine or
/// about to be confirmed.
fn needs_nudge(entry: Option<&Entry>) -> bool {
    use netlink_packet_route::neighbour::NeighbourState as S;
    entry.is_none_or(|e| matches!(e.state, S::Stale | S::Failed | S::None))
}

fn format_mac(mac: &[u8; 6]) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}
