//! The lab: an LVS direct-routing network built from namespaces, veths and a bridge.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::netns::{
    NS_PREFIX, create_namespaces, delete_namespaces, disable_tx_checksum, in_netns, ip_batch,
    new_lab_id, random_u64, set_sysctls,
};
use crate::master_service::MasterService;
use crate::process::{Proc, terminate_all};
use crate::servers::{ServeCounters, Served, Server, start_tcp, start_tcp_with, start_udp};

/// The interface every host has on the lab segment, inside its own namespace.
pub const HOST_IFNAME: &str = "eth0";
/// The bridge, inside the bridge namespace.
pub const BRIDGE_IFNAME: &str = "br0";
/// The router's interface towards the client, with [`LabSpec::router`].
pub const CLIENT_SIDE_IFNAME: &str = "eth1";

/// Most masters a lab can have: their addresses are .11 to .74.
pub const MAX_MASTERS: usize = 64;
/// Most VIPs per family: .100 to .115.
pub const MAX_VIPS: usize = 16;
/// Most slave hosts a lab can have: their addresses are .201 to .216.
pub const MAX_SLAVES: usize = 16;
/// Most directors (gateways) a lab can have: their addresses are .2 to .10.
pub const MAX_DIRECTORS: usize = 9;

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Number of master namespaces (real servers), 1 to [`MAX_MASTERS`].
    pub masters: usize,
    /// Also give every host an IPv6 address, and add IPv6 VIPs.
    pub ipv6: bool,
    /// VIPs per family, 1 to [`MAX_VIPS`]: `10.x.y.100`, `.101`, ... and `fd00:…::100`, ...
    pub vips: usize,
    /// Configure the masters as DR backends (VIPs on `lo`, `arp_ignore`/`arp_announce`).
    /// Without it they are plain hosts, e.g. for testing `mim-lb prepare-backend`.
    pub prepare_masters: bool,
    /// Number of slave hosts, 0 to [`MAX_SLAVES`]: plain hosts on the segment that clients
    /// reach directly, after a master named one of them (see [`crate::master_service`]).
    pub slaves: usize,
    /// Number of directors (gateways), 1 to [`MAX_DIRECTORS`]. Director 0 is the gateway of
    /// the one-director lab; the others are `.3`, `.4`, ... With two or more, no gateway has
    /// the VIPs: whoever moves them (keepalived, see [`crate::keepalived`]) puts them on the
    /// active director's `eth0`, and there are only IPv4 ones to move.
    pub directors: usize,
    /// A router between the client and the segment (see [`Lab`]): the client gets a subnet
    /// of its own behind it, and the router reaches the VIPs through routes the directors
    /// announce (BIRD, [`crate::bird`]), by ECMP with an L4 hash. IPv4 only; no director
    /// holds a VIP on its interface.
    pub router: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec { masters: 3, ipv6: true, vips: 1, prepare_masters: true, slaves: 0, directors: 1, router: false }
    }
}

impl LabSpec {
    pub fn masters(masters: usize) -> LabSpec {
        LabSpec { masters, ..LabSpec::default() }
    }

    /// The default lab with `directors` directors.
    pub fn directors(directors: usize) -> LabSpec {
        LabSpec { directors, ..LabSpec::default() }
    }

    /// `directors` directors behind a router, IPv4 only ([`LabSpec::router`]).
    pub fn router(directors: usize) -> LabSpec {
        LabSpec { directors, router: true, ipv6: false, ..LabSpec::default() }
    }
}

#[derive(Debug)]
struct Host {
    ns: String,
    /// The bridge-side end of this host's veth, inside the bridge namespace.
    port: String,
    mac: [u8; 6],
    addr4: Ipv4Addr,
    addr6: Option<Ipv6Addr>,
}

/// A running lab. Dropping it stops the master servers, terminates spawned processes and
/// deletes every namespace it made (which removes its veths and bridge), also while a test
/// unwinds from a panic.
///
/// Layout, all on one L2 segment (`10.x.y.0/24`, `fd00:6d6c:x:y::/64`):
/// - client `.1`; gateway `.2`, which also holds the VIPs on its `eth0` and so answers ARP/ND
///   for them, like an LVS director (it does not forward);
/// - with [`LabSpec::directors`] above 1, more directors `.3`, `.4`, ..., and then no director
///   holds a VIP until something (keepalived) puts it on one;
/// - masters `.11`, `.12`, ... with the VIPs on `lo`, `arp_ignore=1`, `arp_announce=2`, so they
///   accept VIP traffic but never claim the VIP on the wire (plain hosts without
///   [`LabSpec::prepare_masters`]);
/// - slaves, if any, `.201`, `.202`, ...: plain hosts;
/// - with [`LabSpec::router`], the router takes the client's place on the segment (`.1`), and
///   the client sits alone on a veth to the router in `172.16.y.0/24` (client `.1`, router
///   `.254`); masters and directors route that subnet via the router, which forwards with
///   `fib_multipath_hash_policy = 1` (the L4 hash of ECMP);
/// - every host's `eth0` has TX checksum offload off (native XDP on veth needs it).
#[derive(Debug)]
pub struct Lab {
    id: String,
    bridge_ns: String,
    client: Host,
    /// With [`LabSpec::router`]: the router, `.1` on the segment (where the client is
    /// otherwise) and `.254` on the client's subnet.
    router: Option<Host>,
    /// The client's own subnet behind the router (`172.16.y.0/24`), and the router's address
    /// there.
    client_net: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Director 0 is "the gateway" of the one-director lab.
    directors: Vec<Host>,
    masters: Vec<Host>,
    slaves: Vec<Host>,
    vips4: Vec<Ipv4Addr>,
    vips6: Vec<Ipv6Addr>,
    prefix6: [u16; 4],
    /// Namespaces to delete on drop, recorded before they are made.
    namespaces: Vec<String>,
    /// Running servers: (master index, port, server).
    servers: Vec<(usize, u16, Server)>,
    counters: Vec<Arc<ServeCounters>>,
    /// Running slave servers and what each slave has served.
    slave_servers: Vec<Server>,
    slave_counters: Vec<Arc<ServeCounters>>,
    procs: Vec<Proc>,
}

fn host_mac(subnet: (u8, u8), host: u8) -> [u8; 6] {
    // Locally administered, unicast; the subnet bytes make MACs differ between labs too.
    [0x02, 0x6d, subnet.0, subnet.1, 0x00, host]
}

/// `::NN` with NN read as hex digits of the decimal host number, so that `.11` maps to `::11`.
fn v6_host(prefix: [u16; 4], host: u16) -> Ipv6Addr {
    let low = u16::from_str_radix(&host.to_string(), 16).expect("decimal digits are hex digits");
    Ipv6Addr::new(prefix[0], prefix[1], prefix[2], prefix[3], 0, 0, 0, low)
}

impl Lab {
    /// Builds the lab. On error, whatever was made is removed again.
    pub fn new(spec: LabSpec) -> Result<Lab> {
        if !(1..=MAX_MASTERS).contains(&spec.masters) {
            bail!("a lab needs 1 to {MAX_MASTERS} masters, not {}", spec.masters);
        }
        if !(1..=MAX_VIPS).contains(&spec.vips) {
            bail!("a lab needs 1 to {MAX_VIPS} VIPs, not {}", spec.vips);
        }
        if spec.slaves > MAX_SLAVES {
            bail!("a lab can have at most {MAX_SLAVES} slaves, not {}", spec.slaves);
        }
        if !(1..=MAX_DIRECTORS).contains(&spec.directors) {
            bail!("a lab needs 1 to {MAX_DIRECTORS} directors, not {}", spec.directors);
        }
        if spec.router && spec.ipv6 {
            bail!("a lab with a router is IPv4 only (ipv6: false)");
        }
        let id = new_lab_id();
        let ns = |role: &str| format!("{NS_PREFIX}{id}-{role}");
        // Labs live on separate bridges, so equal subnets would still work; distinct ones keep
        // captures and logs of parallel labs from being confused with each other.
        let r = random_u64();
        let subnet = (64 + (r % 128) as u8, (r >> 8) as u8);
        let net4 = |host: u8| Ipv4Addr::new(10, subnet.0, subnet.1, host);
        let prefix6 = [0xfd00, 0x6d6c, u16::from(subnet.0), u16::from(subnet.1)];
        let net6 = |host: u16| spec.ipv6.then(|| v6_host(prefix6, host));
        let host = |role: &str, port: String, number: u8| Host {
            ns: ns(role),
            port,
            mac: host_mac(subnet, number),
            addr4: net4(number),
            addr6: net6(u16::from(number)),
        };
        let masters = (0..spec.masters)
            .map(|i| host(&format!("m{}", i + 1), format!("p-m{}", i + 1), 11 + i as u8))
            .collect();
        let slaves = (0..spec.slaves)
            .map(|i| host(&format!("s{}", i + 1), format!("p-s{}", i + 1), 201 + i as u8))
            .collect();
        // Director 0 keeps the one-director lab's names; director i is `gw<i+1>`.
        let directors = (0..spec.directors)
            .map(|i| {
                let role = if i == 0 { "gw".to_owned() } else { format!("gw{}", i + 1) };
                host(&role, format!("p-{role}"), 2 + i as u8)
            })
            .collect();
        let client_net = spec.router.then(|| (Ipv4Addr::new(172, 16, subnet.1, 0), Ipv4Addr::new(172, 16, subnet.1, 254)));
        let client = match client_net {
            // Alone on its veth to the router: no bridge port.
            Some((net, _)) => Host {
                ns: ns("client"),
                port: String::new(),
                mac: host_mac(subnet, 250),
                addr4: Ipv4Addr::new(172, 16, net.octets()[2], 1),
                addr6: None,
            },
            None => host("client", "p-client".into(), 1),
        };
        let mut lab = Lab {
            bridge_ns: ns("br"),
            client,
            router: spec.router.then(|| host("rt", "p-rt".into(), 1)),
            client_net,
            directors,
            masters,
            slaves,
            vips4: (0..spec.vips).map(|k| net4(100 + k as u8)).collect(),
            vips6: if spec.ipv6 {
                (0..spec.vips).map(|k| v6_host(prefix6, 100 + k as u16)).collect()
            } else {
                Vec::new()
            },
            prefix6,
            id,
            namespaces: Vec::new(),
            servers: Vec::new(),
            counters: Vec::new(),
            slave_servers: Vec::new(),
            slave_counters: (0..spec.slaves).map(|_| Arc::default()).collect(),
            procs: Vec::new(),
        };
        lab.namespaces = std::iter::once(lab.bridge_ns.clone())
            .chain(std::iter::once(lab.client.ns.clone()))
            // Without a router the client is on the segment too: named once.
            .chain(lab.segment_hosts().filter(|h| h.ns != lab.client.ns).map(|h| h.ns.clone()))
            .collect();
        lab.counters = (0..spec.masters).map(|_| Arc::default()).collect();
        lab.build(spec.ipv6, spec.prepare_masters).with_context(|| format!("building lab {}", lab.id))?;
        Ok(lab)
    }

    /// The hosts on the segment: the client (or, with a router, the router in its place),
    /// directors, masters, slaves.
    fn segment_hosts(&self) -> impl Iterator<Item = &Host> {
        std::iter::once(self.router.as_ref().unwrap_or(&self.client))
            .chain(self.directors.iter())
            .chain(self.masters.iter())
            .chain(self.slaves.iter())
    }

    /// Director 0: the gateway of a one-director lab.
    fn gateway(&self) -> &Host {
        &self.directors[0]
    }

    fn is_director(&self, host: &Host) -> bool {
        self.directors.iter().any(|d| d.ns == host.ns)
    }

    fn is_master(&self, host: &Host) -> bool {
        self.masters.iter().any(|m| m.ns == host.ns)
    }

    fn build(&self, ipv6: bool, prepare_masters: bool) -> Result<()> {
        create_namespaces(&self.namespaces)?;

        // Defaults first: interfaces created later inherit them.
        let mut host_sysctls: Vec<(&str, &str)> = vec![
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ];
        if ipv6 {
            host_sysctls.extend([
                ("net.ipv6.conf.all.forwarding", "0"),
                // No DAD: addresses are usable at once instead of after a second or two.
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                // No router solicitations: less noise in captures.
                ("net.ipv6.conf.default.router_solicitations", "0"),
                ("net.ipv6.conf.default.accept_ra", "0"),
            ]);
        } else {
            host_sysctls.extend([
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ]);
        }
        let master_sysctls = [
            // Answer ARP only for addresses on the asking interface: the VIP lives on lo.
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.default.arp_ignore", "1"),
            // Never use the VIP as the source of our own ARP requests.
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.default.arp_announce", "2"),
        ];
        set_sysctls(
            &self.bridge_ns,
            &[
                ("net.ipv4.ip_forward", "0"),
                // The bridge only switches frames; without IPv6 its ports send no MLD or RS.
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ],
        )?;
        set_sysctls(&self.client.ns, &host_sysctls)?;
        if let Some(r) = &self.router {
            set_sysctls(&r.ns, &host_sysctls)?;
            // A router, spreading flows over equal-cost next hops by their L4 5-tuple, as
            // OPERATIONS.md asks of the router in front of the directors.
            set_sysctls(&r.ns, &[("net.ipv4.ip_forward", "1"), ("net.ipv4.fib_multipath_hash_policy", "1")])?;
        }
        for d in &self.directors {
            set_sysctls(&d.ns, &host_sysctls)?;
        }
        for m in &self.masters {
            set_sysctls(&m.ns, &host_sysctls)?;
            if prepare_masters {
                set_sysctls(&m.ns, &master_sysctls)?;
            }
        }
        for s in &self.slaves {
            set_sysctls(&s.ns, &host_sysctls)?;
        }

        // The veths are made from the bridge namespace with their host end created directly in
        // the host's namespace, so the root namespace never sees them.
        let mut bridge = vec![format!(
            "link add {BRIDGE_IFNAME} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
        )];
        for h in self.segment_hosts() {
            bridge.push(format!(
                "link add {} type veth peer name {HOST_IFNAME} address {} netns {}",
                h.port,
                crate::capture::mac_to_string(&h.mac),
                h.ns
            ));
            bridge.push(format!("link set {} master {BRIDGE_IFNAME} up", h.port));
        }
        bridge.push(format!("link set {BRIDGE_IFNAME} up"));
        ip_batch(Some(&self.bridge_ns), &bridge, false)?;

        for h in self.segment_hosts() {
            let mut lines = vec![
                "link set lo up".to_owned(),
                format!("link set {HOST_IFNAME} up"),
                format!("addr add {}/24 dev {HOST_IFNAME}", h.addr4),
            ];
            if let Some(a6) = h.addr6 {
                lines.push(format!("addr add {a6}/64 dev {HOST_IFNAME} nodad"));
            }
            let vip_dev = if self.is_director(h) {
                // With several directors the VIP is the active one's, put there by whoever
                // elects it; a static copy on each would have them all answer ARP for it.
                // Behind a router, the router's routes bring VIP traffic, not ARP.
                (self.directors.len() == 1 && self.router.is_none()).then_some(HOST_IFNAME)
            } else if prepare_masters && self.is_master(h) {
                Some("lo")
            } else {
                None
            };
            if let Some(dev) = vip_dev {
                for v in &self.vips4 {
                    lines.push(format!("addr add {v}/32 dev {dev}"));
                }
                for v in &self.vips6 {
                    // On the gateway the VIP shares eth0 with the gateway's own address, and
                    // IPv6 source selection would pick the VIP (its /128 "matches" more of a
                    // master's address than a /64 can) for the gateway's own connections,
                    // health checks included, whose answers the master then keeps for its own
                    // VIP. A deprecated address (preferred_lft 0) is never chosen as source,
                    // yet still answers neighbour discovery and accepts traffic. OPERATIONS.md
                    // gives real gateways the same advice.
                    let deprecated = if dev == HOST_IFNAME { " preferred_lft 0" } else { "" };
                    lines.push(format!("addr add {v}/128 dev {dev} nodad{deprecated}"));
                }
            }
            if let (Some((net, _)), Some(router)) = (self.client_net, &self.router)
                && h.ns != router.ns
            {
                // Masters answer the client directly (direct routing), through the router.
                lines.push(format!("route add {net}/24 via {}", router.addr4));
            }
            ip_batch(Some(&h.ns), &lines, false)?;
            in_netns(&h.ns, || disable_tx_checksum(HOST_IFNAME))??;
        }
        if let (Some((_, via)), Some(router)) = (self.client_net, &self.router) {
            // The client's own link: made from the router's namespace, its far end created
            // directly in the client's.
            ip_batch(
                Some(&router.ns),
                &[
                    format!(
                        "link add {CLIENT_SIDE_IFNAME} type veth peer name {HOST_IFNAME} address {} netns {}",
                        crate::capture::mac_to_string(&self.client.mac),
                        self.client.ns
                    ),
                    format!("link set {CLIENT_SIDE_IFNAME} up"),
                    format!("addr add {via}/24 dev {CLIENT_SIDE_IFNAME}"),
                ],
                false,
            )?;
            ip_batch(
                Some(&self.client.ns),
                &[
                    "link set lo up".to_owned(),
                    format!("link set {HOST_IFNAME} up"),
                    format!("addr add {}/24 dev {HOST_IFNAME}", self.client.addr4),
                    format!("route add default via {via}"),
                ],
                false,
            )?;
            in_netns(&self.client.ns, || disable_tx_checksum(HOST_IFNAME))??;
            in_netns(&router.ns, || disable_tx_checksum(CLIENT_SIDE_IFNAME))??;
        }
        Ok(())
    }

    /// The lab's unique id (part of every namespace name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every namespace of this lab.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn bridge_ns(&self) -> &str {
        &self.bridge_ns
    }
    /// The router's namespace, with [`LabSpec::router`].
    pub fn router_ns(&self) -> Option<&str> {
        self.router.as_ref().map(|r| r.ns.as_str())
    }
    /// The router's address on the segment (the directors' BGP neighbour), with
    /// [`LabSpec::router`].
    pub fn router_addr4(&self) -> Option<Ipv4Addr> {
        self.router.as_ref().map(|r| r.addr4)
    }
    pub fn client_ns(&self) -> &str {
        &self.client.ns
    }
    pub fn gateway_ns(&self) -> &str {
        &self.gateway().ns
    }
    /// Namespace of master `i` (0-based).
    pub fn master_ns(&self, i: usize) -> &str {
        &self.masters[i].ns
    }
    pub fn master_count(&self) -> usize {
        self.masters.len()
    }
    /// Namespace of slave `i` (0-based).
    pub fn slave_ns(&self, i: usize) -> &str {
        &self.slaves[i].ns
    }
    pub fn slave_count(&self) -> usize {
        self.slaves.len()
    }

    /// The gateway's interface on the segment, inside [`Lab::gateway_ns`]: where the XDP
    /// director attaches.
    pub fn gateway_ifname(&self) -> &str {
        HOST_IFNAME
    }
    /// The bridge-side end of the gateway's veth, inside [`Lab::bridge_ns`]. Native XDP on the
    /// gateway's veth sends XDP_TX frames here, which works only if this end has an XDP
    /// program of its own (an XDP_PASS one will do); the caller attaches it.
    pub fn gateway_peer_ifname(&self) -> &str {
        &self.gateway().port
    }
    /// The bridge-side end of master `i`'s veth, inside [`Lab::bridge_ns`].
    pub fn master_peer_ifname(&self, i: usize) -> &str {
        &self.masters[i].port
    }
    /// The bridge-side end of the client's veth, inside [`Lab::bridge_ns`].
    pub fn client_peer_ifname(&self) -> &str {
        &self.client.port
    }

    /// The first IPv4 VIP.
    pub fn vip4(&self) -> Ipv4Addr {
        self.vips4[0]
    }
    /// The first IPv6 VIP, if the lab has IPv6.
    pub fn vip6(&self) -> Option<Ipv6Addr> {
        self.vips6.first().copied()
    }
    pub fn vips4(&self) -> &[Ipv4Addr] {
        &self.vips4
    }
    pub fn vips6(&self) -> &[Ipv6Addr] {
        &self.vips6
    }
    /// The IPv6 /64 of the segment.
    pub fn prefix6(&self) -> Option<Ipv6Addr> {
        let p = self.prefix6;
        self.client.addr6.map(|_| Ipv6Addr::new(p[0], p[1], p[2], p[3], 0, 0, 0, 0))
    }

    pub fn client_addr4(&self) -> Ipv4Addr {
        self.client.addr4
    }
    pub fn client_addr6(&self) -> Option<Ipv6Addr> {
        self.client.addr6
    }
    pub fn gateway_addr4(&self) -> Ipv4Addr {
        self.gateway().addr4
    }
    pub fn gateway_addr6(&self) -> Option<Ipv6Addr> {
        self.gateway().addr6
    }
    pub fn master_addr4(&self, i: usize) -> Ipv4Addr {
        self.masters[i].addr4
    }
    pub fn master_addr6(&self, i: usize) -> Option<Ipv6Addr> {
        self.masters[i].addr6
    }
    pub fn slave_addr4(&self, i: usize) -> Ipv4Addr {
        self.slaves[i].addr4
    }

    pub fn client_mac(&self) -> [u8; 6] {
        self.client.mac
    }
    pub fn gateway_mac(&self) -> [u8; 6] {
        self.gateway().mac
    }
    pub fn master_mac(&self, i: usize) -> [u8; 6] {
        self.masters[i].mac
    }

    /// Number of directors ([`LabSpec::directors`]).
    pub fn director_count(&self) -> usize {
        self.directors.len()
    }
    /// Namespace of director `i` (0-based); director 0's is [`Lab::gateway_ns`].
    pub fn director_ns(&self, i: usize) -> &str {
        &self.directors[i].ns
    }
    pub fn director_addr4(&self, i: usize) -> Ipv4Addr {
        self.directors[i].addr4
    }
    pub fn director_addr6(&self, i: usize) -> Option<Ipv6Addr> {
        self.directors[i].addr6
    }
    pub fn director_mac(&self, i: usize) -> [u8; 6] {
        self.directors[i].mac
    }
    /// The bridge-side end of director `i`'s veth, inside [`Lab::bridge_ns`].
    pub fn director_peer_ifname(&self, i: usize) -> &str {
        &self.directors[i].port
    }
    /// The director that has `ns` as its namespace.
    pub fn director_index(&self, ns: &str) -> Option<usize> {
        self.directors.iter().position(|d| d.ns == ns)
    }

    /// Takes director `i` off the segment (`up` false) or puts it back, by the link state of
    /// its veth on `side`. On the bridge side the director's `eth0` only loses its carrier, as
    /// when a cable is pulled or the switch port dies: its addresses (IPv6 ones too) and XDP
    /// program stay. On the director's side it is an administrative down, which also drops
    /// its IPv6 addresses.
    pub fn set_director_link(&self, i: usize, side: LinkSide, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        let (ns, ifname) = match side {
            LinkSide::Bridge => (self.bridge_ns.as_str(), self.directors[i].port.as_str()),
            LinkSide::Director => (self.directors[i].ns.as_str(), HOST_IFNAME),
        };
        ip_batch(Some(ns), &[format!("link set {ifname} {state}")], false)
            .with_context(|| format!("setting director {i}'s link {state} on the {side:?} side"))
    }

    /// Cuts director `i` off the segment on the bridge side: nothing it sends arrives, nothing
    /// reaches it, and it sees its carrier go.
    pub fn cut_director(&self, i: usize) -> Result<()> {
        self.set_director_link(i, LinkSide::Bridge, false)
    }

    /// Undoes [`Lab::cut_director`].
    pub fn reconnect_director(&self, i: usize) -> Result<()> {
        self.set_director_link(i, LinkSide::Bridge, true)
    }

    /// Cuts the directors off from each other (`partitioned` true) while each still reaches
    /// the client and the masters, or heals that: the bridge's port isolation, which keeps
    /// isolated ports from exchanging frames with each other. With keepalived, both directors
    /// then stop hearing each other's adverts and each believes itself master.
    pub fn set_directors_partitioned(&self, partitioned: bool) -> Result<()> {
        let state = if partitioned { "on" } else { "off" };
        let lines: Vec<String> =
            self.directors.iter().map(|d| format!("link set dev {} isolated {state}", d.port)).collect();
        let mut cmd = Command::new("bridge");
        cmd.args(["-n", &self.bridge_ns, "-batch", "-"]);
        run_bridge_batch(&mut cmd, &lines).with_context(|| format!("setting the directors' isolation {state}"))
    }

    /// Whether director `i`'s `eth0` has its carrier (`LOWER_UP`): up on its side, and its
    /// bridge port up too, so frames pass both ways.
    pub fn director_connected(&self, i: usize) -> Result<bool> {
        let out = self.run_in(&self.directors[i].ns, "ip", &["-o", "link", "show", "dev", HOST_IFNAME])?;
        Ok(link_flags(&out).contains(&"LOWER_UP"))
    }

    /// The IPv4 addresses on director `i`'s `eth0` (its own and any VIP it holds).
    pub fn director_addrs4(&self, i: usize) -> Result<Vec<Ipv4Addr>> {
        let out = self.run_in(&self.directors[i].ns, "ip", &["-4", "-o", "addr", "show", "dev", HOST_IFNAME])?;
        Ok(parse_ip_addr_o(&out))
    }

    /// The name master `i`'s services answer with: `master-1` for `i == 0`.
    pub fn master_name(&self, i: usize) -> String {
        format!("master-{}", i + 1)
    }

    /// The name slave `i`'s service greets with: `slave-1` for `i == 0`.
    pub fn slave_name(&self, i: usize) -> String {
        format!("slave-{}", i + 1)
    }

    /// The master index for a name returned by [`Lab::master_name`].
    pub fn master_index(&self, name: &str) -> Option<usize> {
        let n: usize = name.strip_prefix("master-")?.parse().ok()?;
        (1..=self.masters.len()).contains(&n).then(|| n - 1)
    }

    /// Starts the TCP name/echo service on `port` on every master (see [`crate::servers`]);
    /// returns once all of them listen, on `[::]` and so on the VIPs too.
    pub fn start_tcp_servers(&mut self, port: u16) -> Result<()> {
        for i in 0..self.masters.len() {
            self.start_tcp_server(i, port)?;
        }
        Ok(())
    }

    /// Starts the TCP name/echo service on `port` on master `i` only.
    pub fn start_tcp_server(&mut self, i: usize, port: u16) -> Result<()> {
        let server = start_tcp(&self.masters[i].ns, self.master_name(i), port, Arc::clone(&self.counters[i]))?;
        self.servers.push((i, port, server));
        Ok(())
    }

    /// Starts the master service (see [`crate::master_service`]) on `port` on master `i`,
    /// handing out `slaves`; returns once it listens. [`Lab::stop_servers`] stops it.
    pub fn start_master_service(&mut self, i: usize, port: u16, slaves: Vec<std::net::SocketAddr>) -> Result<()> {
        let service = Arc::new(MasterService::new(self.master_name(i), slaves));
        let server = start_tcp_with(
            &self.masters[i].ns,
            &format!("mim-{port}-m{}", i + 1),
            port,
            Arc::clone(&self.counters[i]),
            move |stream, stop| service.serve(stream, stop),
        )?;
        self.servers.push((i, port, server));
        Ok(())
    }

    /// Starts the TCP name service on `port` on every slave: each greets with its name.
    pub fn start_slave_servers(&mut self, port: u16) -> Result<()> {
        for i in 0..self.slaves.len() {
            let server =
                start_tcp(&self.slaves[i].ns, self.slave_name(i), port, Arc::clone(&self.slave_counters[i]))?;
            self.slave_servers.push(server);
        }
        Ok(())
    }

    /// What slave `i`'s service has done so far.
    pub fn slave_served(&self, i: usize) -> Served {
        self.slave_counters[i].snapshot()
    }

    /// Stops master `i`'s servers on `port` (as if the process died): the port refuses
    /// connections and the server's open connections close. Returns how many were stopped.
    pub fn stop_servers(&mut self, i: usize, port: u16) -> usize {
        let (stopped, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.servers).into_iter().partition(|(m, p, _)| *m == i && *p == port);
        self.servers = kept;
        let n = stopped.len();
        drop(stopped);
        n
    }

    /// Starts an HTTP health endpoint on `port` on every master; each answers 200 while its
    /// flag (returned, one per master) is set, 503 otherwise.
    pub fn start_http_health(&mut self, port: u16) -> Result<Vec<Arc<std::sync::atomic::AtomicBool>>> {
        let mut flags = Vec::new();
        for i in 0..self.masters.len() {
            let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let server = crate::servers::start_http_health(&self.masters[i].ns, port, Arc::clone(&healthy))?;
            self.servers.push((i, port, server));
            flags.push(healthy);
        }
        Ok(flags)
    }

    /// Starts the UDP name service on `port` on every master: each datagram is answered with
    /// the master's name, from the address it was sent to.
    pub fn start_udp_servers(&mut self, port: u16) -> Result<()> {
        for i in 0..self.masters.len() {
            self.start_udp_server(i, port)?;
        }
        Ok(())
    }

    /// Starts the UDP name service on `port` on master `i` only.
    pub fn start_udp_server(&mut self, i: usize, port: u16) -> Result<()> {
        let server = start_udp(&self.masters[i].ns, self.master_name(i), port, Arc::clone(&self.counters[i]))?;
        self.servers.push((i, port, server));
        Ok(())
    }

    /// What master `i`'s services have done so far.
    pub fn served(&self, i: usize) -> Served {
        self.counters[i].snapshot()
    }

    /// Starts `cmd` inside `ns` (any namespace, not only this lab's) with stdout and stderr
    /// collected. The process gets its own process group and SIGKILL if the test process
    /// dies; the lab terminates it on drop (SIGTERM, then SIGKILL after 2 s). `cmd` is
    /// changed in place (pipes, namespace hook), so spawn it only through here.
    pub fn spawn_in(&mut self, ns: &str, cmd: &mut Command) -> Result<Proc> {
        let proc = Proc::spawn(ns, cmd)?;
        self.procs.push(proc.clone());
        Ok(proc)
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to a process started with [`Lab::spawn_in`].
    pub fn kill(&self, proc: &Proc, signal: i32) -> Result<()> {
        proc.signal(signal)
    }

    /// Runs `program args...` in `ns` to completion and returns stdout.
    pub fn run_in(&self, ns: &str, program: &str, args: &[&str]) -> Result<String> {
        crate::netns::run_in(ns, program, args)
    }

    /// `n` connections from the client to `addr`, one after another: the names of the
    /// masters that answered. Panics (failing the test) if one fails.
    pub fn ask(&self, addr: std::net::SocketAddr, n: usize, timeout: std::time::Duration) -> Vec<String> {
        crate::in_netns(self.client_ns(), || crate::tcp_ask_many(addr, n, timeout)).unwrap().unwrap()
    }

    /// `n` held connections from the client to `addr` (the servers keep them open and echo).
    pub fn hold(&self, addr: std::net::SocketAddr, n: usize, timeout: std::time::Duration) -> Vec<crate::TcpHold> {
        crate::in_netns(self.client_ns(), || (0..n).map(|_| crate::TcpHold::connect(addr, timeout)).collect::<Result<Vec<_>>>())
            .unwrap()
            .unwrap()
    }
}

/// Feeds `lines` to `bridge -batch -` (as [`ip_batch`] does for `ip`), within [`crate::RUN_TIMEOUT`].
fn run_bridge_batch(cmd: &mut Command, lines: &[String]) -> Result<()> {
    use std::io::Write as _;
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("starting `bridge` (iproute2)")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all((lines.join("\n") + "\n").as_bytes())
        .context("writing to `bridge -batch`")?;
    let out = crate::wait_within(child, crate::RUN_TIMEOUT)?;
    if !out.status.success() {
        bail!("`bridge -batch` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Which end of a director's veth [`Lab::set_director_link`] acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkSide {
    /// The port on the bridge: the director sees only its carrier go.
    Bridge,
    /// The director's own `eth0`, set down as an operator would.
    Director,
}

/// The flags in `ip -o link show` output: `2: eth0@if5: <BROADCAST,MULTICAST,UP,LOWER_UP> ...`.
fn link_flags(out: &str) -> Vec<&str> {
    out.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags.split(',').collect())
        .unwrap_or_default()
}

/// The IPv4 addresses in `ip -4 -o addr show` output (`2: eth0    inet 10.1.2.3/24 ...`).
fn parse_ip_addr_o(out: &str) -> Vec<Ipv4Addr> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stop all servers at once, then join, so that teardown takes one tick and not one
        // per server.
        for (_, _, s) in &self.servers {
            s.signal_stop();
        }
        for s in &self.slave_servers {
            s.signal_stop();
        }
        self.servers.clear();
        self.slave_servers.clear();
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!("--- last output of {} ---\n{}", p.label(), p.tail(40));
            }
        }
        terminate_all(&self.procs);
        if let Err(e) = delete_namespaces(&self.namespaces) {
            eprintln!("mim-lb-tests: tearing down lab {}: {e:#}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addr_lines_give_the_ipv4_addresses() {
        let out = "2: eth0    inet 10.70.3.2/24 scope global eth0\\       valid_lft forever preferred_lft forever\n\
                   2: eth0    inet 10.70.3.100/32 scope global eth0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(parse_ip_addr_o(out), [Ipv4Addr::new(10, 70, 3, 2), Ipv4Addr::new(10, 70, 3, 100)]);
        assert!(parse_ip_addr_o("").is_empty());
    }

    #[test]
    fn link_flags_are_read_between_the_angle_brackets() {
        let up = "2: eth0@if7: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP";
        assert_eq!(link_flags(up), ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"]);
        let cut = "2: eth0@if7: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 state LOWERLAYERDOWN";
        assert!(!link_flags(cut).contains(&"LOWER_UP"));
        assert!(link_flags("").is_empty());
    }
}
