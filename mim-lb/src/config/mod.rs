//! Configuration: the TOML schema, its validation, and the validated types the rest of the
//! control plane works from.
//!
//! Reading happens in two steps so that each can grow on its own: serde fills the raw structs
//! in `raw` (which only know the shape of the file), then `validate` checks every rule and
//! builds a [`Config`]. A new section means a raw struct, a validated type and a check function.
//! A configuration is accepted whole or rejected whole, with every problem found listed.

mod error;
mod raw;
mod validate;

#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

pub use error::{ConfigError, Problem};
pub(crate) use validate::unusable_address;

/// Larger than any config can usefully be (64 services of 4096 backends is well under this).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The text of a config file, at most `MAX_CONFIG_BYTES` of it: a path to a device such as
/// /dev/zero would otherwise be read until memory ran out. Opened non-blocking, because
/// opening a FIFO that nobody writes to blocks (the daemon's event loop, on a reload) until a
/// writer comes; with the flag the open returns and the read sees end-of-file. The flag is
/// cleared once open, so a pipe that has a writer (`--config /dev/stdin`) is read to its end.
fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read as _};
    use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    // SAFETY: fcntl on a descriptor this function owns, changing only its status flags.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(Error::last_os_error());
        }
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::new(ErrorKind::InvalidData, format!("larger than {} MiB", MAX_CONFIG_BYTES >> 20)));
    }
    Ok(text)
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The interface receiving VIP traffic; forwarded frames leave through it.
    pub interface: String,
    pub xdp_mode: XdpMode,
    /// Absolute; the maps are pinned here.
    pub pin_dir: PathBuf,
    /// Capacity of the connection table.
    pub flow_table_size: u32,
    /// Room for services the maps are made with at start (`None`: by `DEFAULT_SERVICE_ROOM_*`,
    /// see [`Config::service_room`]). Reloads may serve at most that many at once.
    pub max_services: Option<u32>,
    /// How long a recorded TCP flow may stay silent and still count as alive: while any flow
    /// on a master that lost its Maglev slot is alive, the slot keeps consulting the
    /// connection table and a removed master is kept (draining).
    pub tcp_idle_timeout: Duration,
    /// The same for UDP flows.
    pub udp_idle_timeout: Duration,
    /// The daemon's Unix control socket (absolute path), mode 0600.
    pub control_socket: PathBuf,
    /// Where Prometheus metrics are served; `None` turns the endpoint off.
    pub metrics_listen: Option<SocketAddr>,
    /// At least one, at most `limits::MAX_SERVICES`, no two with the same name or the same
    /// (vip, port, protocol).
    pub services: Vec<Service>,
    /// Flow sharing with other directors of the same group; `None` for a lone director.
    pub sync: Option<Sync>,
    /// Routes for the VIPs in a kernel table a routing daemon announces from; `None`: this
    /// director announces nothing (one director, or VRRP).
    pub announce: Option<Announce>,
}

/// The `[announce]` section: where the daemon puts a route for each VIP it can serve, for a
/// routing daemon (BIRD, FRR) to announce to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// The kernel routing table (never main, local or default).
    pub table: u32,
    /// The routes' `rtm_protocol`: how this daemon knows its own routes, and how the routing
    /// daemon's filter picks them.
    pub protocol: u8,
    /// On a clean stop that detaches the program: how long it keeps forwarding after the
    /// routes are gone, while the router moves the traffic to the other directors.
    pub withdraw_wait: Duration,
}

/// The `[sync]` section: where this director listens for its peers, who they are, and the
/// group's shared key.
#[derive(Clone, PartialEq, Eq)]
pub struct Sync {
    pub listen: SocketAddr,
    /// Every other director of the group (not this one).
    pub peers: Vec<SocketAddr>,
    pub key_file: PathBuf,
    /// The key's bytes (at least 32), read from `key_file` when the file is loaded.
    pub key: Vec<u8>,
    /// How long a starting director waits for a peer that does not answer before it counts
    /// it as down and becomes ready without its state.
    pub pull_timeout: Duration,
    /// The multicast group changes go to, once each, instead of to every peer.
    pub group: Option<SocketAddr>,
}

impl fmt::Debug for Sync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sync")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("key_file", &self.key_file)
            .field("pull_timeout", &self.pull_timeout)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum XdpMode {
    /// Native where the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// One load-balanced service: traffic to `vip`:`port` over `protocol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    /// A prime, at most `limits::MAGLEV_MAX_TABLE_SIZE`, greater than `backends.len()`.
    pub table_size: u32,
    /// How the service's backends are checked.
    pub health: HealthCheck,
    /// How long a master that comes up takes to reach its full share of new connections
    /// (zero: at once).
    pub slow_start: Duration,
    /// When a master whose health verdict keeps changing is held down.
    pub flap_damping: FlapDamping,
    /// Addresses are unique and of the vip's family.
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// What a service's Maglev lookup hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scheduler {
    /// The 5-tuple: connections spread independently.
    #[default]
    Maglev,
    /// The client address only: every connection of a client reaches the same backend.
    MaglevSource,
}

/// The `[service.flap_damping]` section: a master whose health verdict changes more than
/// `max_changes` times within `window` is held down for at least `hold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapDamping {
    /// 0 turns damping off; otherwise at least 2, so one failure and recovery never count.
    pub max_changes: u32,
    pub window: Duration,
    pub hold: Duration,
}

impl Default for FlapDamping {
    fn default() -> Self {
        FlapDamping { max_changes: 6, window: Duration::from_secs(60), hold: Duration::from_secs(30) }
    }
}

/// A service's health check: how each backend is probed and how many results in a row change
/// its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Time between the starts of two checks of one backend.
    pub interval: Duration,
    /// A check that has not finished after this long fails; never longer than `interval`.
    pub timeout: Duration,
    /// Successes in a row that bring a down backend up (1..=100).
    pub rise: u32,
    /// Failures in a row that take an up backend down (1..=100).
    pub fall: u32,
    /// Port to check instead of the service's port.
    pub port: Option<u16>,
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// No check: backends are up as soon as they are configured (and their MAC is known).
    None,
    /// A TCP connection to address:port succeeds.
    Tcp,
    /// `GET path` over HTTP/1.1 answers `expect_status`, with `expect_body` in the body if set.
    Http { path: String, expect_status: u16, expect_body: Option<String> },
    /// `argv` exits 0. `{address}` and `{port}` in any argument are replaced by the backend's.
    Command { argv: Vec<String> },
}

impl HealthCheck {
    /// The port checks connect to for a service on `service_port`.
    pub fn port_for(&self, service_port: u16) -> u16 {
        self.port.unwrap_or(service_port)
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            port: None,
        }
    }
}

impl CheckKind {
    /// The name used in the config file and in status output.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::None => "none",
            CheckKind::Tcp => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Command { .. } => "command",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub address: IpAddr,
    /// Where frames for this backend are sent. `None`: the daemon resolves it from the
    /// kernel's neighbour table on the gateway interface.
    pub mac: Option<[u8; 6]>,
    /// 0..=65535; 0 means the backend takes no new flows (draining).
    pub weight: u32,
}

/// Without `max_services`, the maps are made with room for twice the services configured at
/// start (so a reload can add as many again, or replace every one), at least this many...
pub const DEFAULT_SERVICE_ROOM_MIN: u32 = 8;
/// ...and for each service configured at start, room for this many.
pub const DEFAULT_SERVICE_ROOM_PER_SERVICE: u32 = 2;

impl Config {
    /// The room for services to make the maps with at start, and the least room pinned maps
    /// must have to be reused: `max_services` for both when set; otherwise twice the services
    /// configured (at least `DEFAULT_SERVICE_ROOM_MIN`, at most `limits::MAX_SERVICES`), and
    /// pinned maps that fit the services configured. Each service of room costs 2 MiB of
    /// kernel memory (two Maglev regions and two per-slot tables of 65,537 slots).
    pub fn service_room(&self) -> (u32, u32) {
        let configured = self.services.len() as u32;
        match self.max_services {
            Some(n) => (n, n),
            None => {
                let wanted = (configured * DEFAULT_SERVICE_ROOM_PER_SERVICE)
                    .clamp(DEFAULT_SERVICE_ROOM_MIN, mim_lb_common::limits::MAX_SERVICES);
                (wanted, configured.clamp(1, wanted))
            }
        }
    }

    /// Reads and validates a configuration file. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = read_config_file(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| e.in_file(path.to_owned()))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // serde_path_to_error keeps the key being read when the parser fails (`service[0].port`),
        // which the TOML error alone does not name.
        let raw: raw::RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| ConfigError::from_toml(text, &e.path().to_string(), e.inner()))?;
        validate::validate(raw)
    }

    /// The commented example configuration shipped in dist/ (one service, three backends).
    pub fn example() -> &'static str {
        include_str!("../../../dist/mim-lb.toml")
    }
}

impl Service {
    /// The identity of the service in the data path and on the command line.
    pub fn key(&self) -> ServiceKey {
        ServiceKey { vip: self.vip, port: self.port, protocol: self.protocol }
    }

    /// `10.0.0.100:7000/tcp`, `[2001:db8::1]:443/tcp`: how logs and errors name the service.
    pub fn endpoint(&self) -> String {
        endpoint(self.vip, self.port, self.protocol)
    }
}

/// What identifies a service: the data path matches packets on it, operators name services by
/// it (`10.0.0.100:7000/tcp`, or `10.0.0.100:7000` when only one protocol uses the port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&endpoint(self.vip, self.port, self.protocol))
    }
}

impl std::str::FromStr for ServiceKey {
    type Err = String;

    /// `VIP:PORT/PROTO`, `[V6]:PORT/PROTO`; without `/PROTO`, TCP.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, protocol) = match s.rsplit_once('/') {
            Some((a, "tcp")) => (a, Protocol::Tcp),
            Some((a, "udp")) => (a, Protocol::Udp),
            Some((_, other)) => return Err(format!("{other:?} is not tcp or udp")),
            None => (s, Protocol::Tcp),
        };
        let sa: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not VIP:PORT (IPv6 as [VIP]:PORT)"))?;
        Ok(ServiceKey { vip: sa.ip(), port: sa.port(), protocol })
    }
}

fn endpoint(vip: IpAddr, port: u16, protocol: Protocol) -> String {
    format!("{}/{}", SocketAddr::new(vip, port), protocol)
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => mim_lb_common::PROTO_TCP,
            Protocol::Udp => mim_lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::Maglev => "maglev",
            Scheduler::MaglevSource => "maglev-source",
        })
    }
}

/// `02:00:00:00:00:11`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Parses six colon-separated hex octets (`02:00:00:00:00:11`, either case). Each octet has
/// one or two digits, as `ip link` and most tools accept.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for octet in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    match parts.next() {
        Some(_) => None,
        None => Some(mac),
    }
}
