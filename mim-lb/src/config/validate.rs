//! The rules a configuration must follow, checked on the raw file.
//!
//! Every check records its problem and carries on with a placeholder value, so one run reports
//! everything that is wrong. The placeholders never escape: any problem rejects the whole
//! configuration.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use mim_lb_common::limits;

use super::{
    Backend, CheckKind, Config, ConfigError, FlapDamping, HealthCheck, Protocol, Scheduler, Service, XdpMode,
    endpoint,
    error::Problems,
    parse_mac,
    raw::{RawAnnounce, RawBackend, RawConfig, RawFlapDamping, RawHealth, RawService, RawSync},
};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mim-lb";
const DEFAULT_CONTROL_SOCKET: &str = "/run/mim-lb/control.sock";
/// LVS's defaults for established TCP and for UDP.
const DEFAULT_TCP_IDLE_S: i64 = 900;
const DEFAULT_UDP_IDLE_S: i64 = 300;
const IDLE_MIN_S: i64 = 1;
const IDLE_MAX_S: i64 = 7 * 24 * 3600;
const INTERVAL_MIN_MS: i64 = 10;
const INTERVAL_MAX_MS: i64 = 3_600_000;
const RISE_FALL_MAX: i64 = 100;
const SLOW_START_MAX_S: i64 = 3600;
const FLAP_CHANGES_MAX: i64 = 1000;
const FLAP_SECONDS_MAX: i64 = 24 * 3600;
/// Longest `sun_path` of a Unix socket, without its terminating NUL.
const SOCKET_PATH_MAX: usize = 107;
const FLOW_TABLE_MIN: i64 = 1024;
const FLOW_TABLE_MAX: i64 = 1 << 24;
const DEFAULT_WEIGHT: u32 = 100;
const MAX_WEIGHT: i64 = 65_535;
/// IFNAMSIZ minus the terminating NUL.
const IFNAME_MAX: usize = 15;
const SERVICE_NAME_MAX: usize = 64;

pub(crate) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut p = Problems::default();

    check_interface(&raw.interface, &mut p);
    let xdp_mode = xdp_mode(raw.xdp_mode.as_deref(), &mut p);
    let pin_dir = pin_dir(raw.pin_dir.as_deref(), &mut p);
    let flow_table_size = match raw.flow_table_size {
        None => limits::DEFAULT_FLOW_TABLE_SIZE,
        Some(n) => in_range("flow_table_size", n, FLOW_TABLE_MIN, FLOW_TABLE_MAX, &mut p),
    };

    let max_services: Option<u32> =
        raw.max_services.map(|n| in_range("max_services", n, 1, i64::from(limits::MAX_SERVICES), &mut p));
    if let Some(max) = max_services.filter(|m| raw.services.len() > *m as usize) {
        p.add(
            "max_services",
            format!("{} services are configured, more than max_services ({max})", raw.services.len()),
        );
    }
    let tcp_idle_timeout = idle_timeout("tcp_idle_timeout_s", raw.tcp_idle_timeout_s, DEFAULT_TCP_IDLE_S, &mut p);
    let udp_idle_timeout = idle_timeout("udp_idle_timeout_s", raw.udp_idle_timeout_s, DEFAULT_UDP_IDLE_S, &mut p);
    let control_socket = control_socket(raw.control_socket.as_deref(), &mut p);
    let metrics_listen = raw.metrics_listen.as_deref().and_then(|text| match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Some(addr),
        _ => {
            p.add(
                "metrics_listen",
                format!("{text:?} is not an address and port like 127.0.0.1:9469 or [::1]:9469"),
            );
            None
        }
    });

    if raw.services.is_empty() {
        p.add(
            "service",
            "no service is configured; at least one [[service]] is required",
        );
    }
    if raw.services.len() > limits::MAX_SERVICES as usize {
        p.add(
            "service",
            format!(
                "{} services are configured; at most {} are supported",
                raw.services.len(),
                limits::MAX_SERVICES
            ),
        );
    }
    let total_backends: usize = raw.services.iter().map(|s| s.backends.len()).sum();
    // Backend id 0 means "no backend", so one id fewer than the map has entries.
    let max_backends = limits::MAX_BACKENDS as usize - 1;
    if total_backends > max_backends {
        p.add(
            "service.backend",
            format!(
                "{total_backends} backends are configured over all services; at most \
                 {max_backends} are supported"
            ),
        );
    }

    let (services, endpoints): (Vec<Service>, Vec<Option<Endpoint>>) = raw
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| service(i, s, &mut p))
        .unzip();
    check_service_duplicates(&services, &endpoints, &mut p);
    let sync = raw.sync.as_ref().map(|s| sync(s, &mut p));
    let announce = raw.announce.as_ref().map(|a| announce(a, &mut p));

    p.into_result(Config {
        interface: raw.interface,
        xdp_mode,
        pin_dir,
        flow_table_size,
        max_services,
        tcp_idle_timeout,
        udp_idle_timeout,
        control_socket,
        metrics_listen,
        services,
        sync,
        announce,
    })
}

/// The protocol number of the routes when the file names none: unused by the kernel and by the
/// routing daemons in iproute2's `rt_protos`.
pub const DEFAULT_ANNOUNCE_PROTOCOL: i64 = 250;
const DEFAULT_WITHDRAW_WAIT_MS: i64 = 2000;
const WITHDRAW_WAIT_MAX_MS: i64 = 60_000;

fn announce(raw: &RawAnnounce, p: &mut Problems) -> super::Announce {
    let table = match raw.table {
        0 => {
            p.add("announce.table", "0 is not a routing table (RT_TABLE_UNSPEC); use a table of its own, like 100");
            1
        }
        253..=255 => {
            let name = ["default", "main", "local"][(raw.table - 253) as usize];
            p.add(
                "announce.table",
                format!(
                    "{} is the kernel's {name} table, which this host routes with; use a table of its own, like 100",
                    raw.table
                ),
            );
            1
        }
        _ => in_range("announce.table", raw.table, 1, i64::from(u32::MAX), p),
    };
    let number = raw.protocol.unwrap_or(DEFAULT_ANNOUNCE_PROTOCOL);
    let protocol = match number {
        0..=4 => {
            p.add("announce.protocol", format!("{number} is one of the kernel's own route protocols (0 to 4); use a number of its own, like 250"));
            DEFAULT_ANNOUNCE_PROTOCOL as u8
        }
        11 | 12 | 186..=197 => {
            let owner = match number {
                11 | 186..=197 => "FRR",
                _ => "BIRD",
            };
            p.add(
                "announce.protocol",
                format!("{number} is {owner}'s own route protocol: it would take mim-lb's routes for its own and flush them; use a number of its own, like 250"),
            );
            DEFAULT_ANNOUNCE_PROTOCOL as u8
        }
        _ => in_range("announce.protocol", number, 5, 255, p),
    };
    let wait: u64 = in_range(
        "announce.withdraw_wait_ms",
        raw.withdraw_wait_ms.unwrap_or(DEFAULT_WITHDRAW_WAIT_MS),
        0,
        WITHDRAW_WAIT_MAX_MS,
        p,
    );
    super::Announce { table, protocol, withdraw_wait: Duration::from_millis(wait) }
}

const DEFAULT_PULL_TIMEOUT_S: i64 = 3;
const PULL_TIMEOUT_MAX_S: i64 = 600;
/// Peers a director syncs with: the group's other directors.
const MAX_PEERS: usize = 32;

fn socket_addr(key: &str, text: &str, p: &mut Problems) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 && !addr.ip().is_unspecified() => Some(addr),
        _ => {
            p.add(key, format!("{text:?} is not an address and port like 10.0.0.2:7946 or [fd00::2]:7946"));
            None
        }
    }
}

fn sync(raw: &RawSync, p: &mut Problems) -> super::Sync {
    let placeholder: SocketAddr = (Ipv4Addr::UNSPECIFIED, 0).into();
    let listen = socket_addr("sync.listen", &raw.listen, p).unwrap_or(placeholder);
    let peers: Vec<SocketAddr> = raw.peers.iter().filter_map(|t| socket_addr("sync.peers", t, p)).collect();
    if raw.peers.is_empty() {
        p.add("sync.peers", "no peer is listed; list the other directors' sync addresses, or remove [sync]");
    }
    if raw.peers.len() > MAX_PEERS {
        p.add("sync.peers", format!("{} peers are listed; at most {MAX_PEERS} are supported", raw.peers.len()));
    }
    if peers.contains(&listen) {
        p.add("sync.peers", format!("{listen} is this director's own sync.listen; list only the other directors"));
    }
    if peers.iter().any(|a| a.is_ipv4() != listen.is_ipv4()) {
        p.add("sync.peers", "peers and sync.listen must be of the same address family");
    }
    let mut seen = std::collections::HashSet::new();
    for a in &peers {
        if !seen.insert(a) {
            p.add("sync.peers", format!("{a} is listed twice"));
        }
    }
    let key_file = PathBuf::from(&raw.key_file);
    let key = sync_key(&key_file, p);
    let secs: u64 = in_range("sync.pull_timeout_s", raw.pull_timeout_s.unwrap_or(DEFAULT_PULL_TIMEOUT_S), 0, PULL_TIMEOUT_MAX_S, p);
    let group = raw.group.as_deref().and_then(|g| sync_group(g, listen, p));
    super::Sync { listen, peers, key_file, key, pull_timeout: Duration::from_secs(secs), group }
}

/// The directors' multicast group: of `listen`'s family, and not a reserved block.
fn sync_group(text: &str, listen: SocketAddr, p: &mut Problems) -> Option<SocketAddr> {
    const KEY: &str = "sync.group";
    let group = socket_addr(KEY, text, p)?;
    let reason = match group.ip() {
        ip if !ip.is_multicast() => Some(format!("{ip} is not a multicast address; use one the directors' segment carries, like 239.255.77.1:7947 or [ff02::6d6c]:7947")),
        // 224.0.0.0/24 is local network control (VRRP, OSPF, ...); its groups are taken.
        std::net::IpAddr::V4(v4) if v4.octets()[..3] == [224, 0, 0] => Some(format!("{v4} is in 224.0.0.0/24, reserved for routing protocols; use an administratively scoped group in 239.0.0.0/8")),
        // ff01::/16 never leaves the host.
        std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xff0f == 0xff01 => Some(format!("{v6} is interface-local and never leaves this host; use a link-local group like ff02::6d6c")),
        ip if ip.is_ipv4() != listen.is_ipv4() => Some("the group and sync.listen must be of the same address family".to_owned()),
        _ => None,
    };
    match reason {
        Some(r) => {
            p.add(KEY, r);
            None
        }
        None => Some(group),
    }
}

/// The shared key: the file's contents without surrounding whitespace, at least 32 bytes,
/// and readable by its owner only (it authenticates every flow a peer may inject).
fn sync_key(path: &Path, p: &mut Problems) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    const KEY: &str = "sync.key_file";
    if !path.is_absolute() {
        p.add(KEY, format!("{} is not an absolute path", path.display()));
        return Vec::new();
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            p.add(KEY, format!("cannot read {}: {e}", path.display()));
            return Vec::new();
        }
    };
    if meta.permissions().mode() & 0o077 != 0 {
        p.add(KEY, format!("{} can be read by others (mode {:o}); `chmod 600` it", path.display(), meta.permissions().mode() & 0o777));
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            p.add(KEY, format!("cannot read {}: {e}", path.display()));
            return Vec::new();
        }
    };
    let key = bytes.trim_ascii().to_vec();
    let min = crate::sync::wire::MIN_KEY_BYTES;
    if key.len() < min {
        p.add(KEY, format!("{} holds {} bytes; the key must have at least {min} (e.g. `openssl rand -hex 32 > {}`)", path.display(), key.len(), path.display()));
    }
    key
}

fn idle_timeout(key: &str, value: Option<i64>, default: i64, p: &mut Problems) -> Duration {
    let secs: u64 = in_range(key, value.unwrap_or(default), IDLE_MIN_S, IDLE_MAX_S, p);
    Duration::from_secs(secs)
}

fn control_socket(text: Option<&str>, p: &mut Problems) -> PathBuf {
    let path = PathBuf::from(text.unwrap_or(DEFAULT_CONTROL_SOCKET));
    if !path.is_absolute() || path.file_name().is_none() {
        p.add(
            "control_socket",
            format!("{:?} is not an absolute path to a file", path.display().to_string()),
        );
    } else if path.as_os_str().len() > SOCKET_PATH_MAX {
        p.add(
            "control_socket",
            format!("{:?} is longer than the {SOCKET_PATH_MAX} bytes a Unix socket path can have", path.display().to_string()),
        );
    }
    path
}

fn check_interface(name: &str, p: &mut Problems) {
    if name.is_empty() {
        p.add("interface", "must not be empty");
    } else if name.len() > IFNAME_MAX {
        p.add(
            "interface",
            format!(
                "{name:?} is {} bytes long; interface names have at most {IFNAME_MAX}",
                name.len()
            ),
        );
    } else if name == "." || name == ".." {
        p.add(
            "interface",
            format!("{name:?} is not a valid interface name"),
        );
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        // The kernel refuses these in interface names, so no interface can match.
        p.add(
            "interface",
            format!("{name:?} contains '/', ':' or whitespace, which interface names cannot"),
        );
    }
}

fn xdp_mode(text: Option<&str>, p: &mut Problems) -> XdpMode {
    match text {
        None | Some("auto") => XdpMode::Auto,
        Some("native") => XdpMode::Native,
        Some("generic") => XdpMode::Generic,
        Some(other) => {
            p.add(
                "xdp_mode",
                format!("{other:?} is not one of auto, native, generic"),
            );
            XdpMode::Auto
        }
    }
}

fn pin_dir(text: Option<&str>, p: &mut Problems) -> PathBuf {
    let dir = PathBuf::from(text.unwrap_or(DEFAULT_PIN_DIR));
    if !dir.is_absolute() {
        p.add(
            "pin_dir",
            format!("{:?} is not an absolute path", dir.display().to_string()),
        );
    }
    dir
}

/// Checks `value` against `min..=max` and converts it; out-of-range values give `min`.
fn in_range<T: TryFrom<i64> + Default>(
    key: &str,
    value: i64,
    min: i64,
    max: i64,
    p: &mut Problems,
) -> T {
    if (min..=max).contains(&value)
        && let Ok(v) = T::try_from(value)
    {
        return v;
    }
    p.add(key, format!("{value} is out of range {min}..={max}"));
    // The documented placeholder: `min` keeps later checks that compare values (a timeout
    // against its interval) from reporting problems that are not there.
    T::try_from(min).unwrap_or_default()
}

/// What the data path finds a service by.
type Endpoint = (IpAddr, u16, Protocol);

/// The service, and its endpoint if the vip, port and protocol are all valid.
fn service(i: usize, raw: &RawService, p: &mut Problems) -> (Service, Option<Endpoint>) {
    let key = format!("service[{i}]");

    if !valid_service_name(&raw.name) {
        p.add(
            format!("{key}.name"),
            format!(
                "{:?} is not a valid name (1 to {SERVICE_NAME_MAX} characters out of A-Z, a-z, \
                 0-9, '_', '.' and '-')",
                raw.name
            ),
        );
    }

    let vip = address(&format!("{key}.vip"), &raw.vip, p);
    let port = u16::try_from(raw.port).ok().filter(|&port| port != 0);
    if port.is_none() {
        p.add(
            format!("{key}.port"),
            format!("{} is out of range 1..=65535", raw.port),
        );
    }

    let protocol = match raw.protocol.as_deref() {
        None | Some("tcp") => Some(Protocol::Tcp),
        Some("udp") => Some(Protocol::Udp),
        Some(other) => {
            p.add(
                format!("{key}.protocol"),
                format!("{other:?} is not one of tcp, udp"),
            );
            None
        }
    };

    let scheduler = match raw.scheduler.as_deref() {
        None | Some("maglev") => Scheduler::Maglev,
        Some("maglev-source") => Scheduler::MaglevSource,
        Some(other) => {
            p.add(
                format!("{key}.scheduler"),
                format!("{other:?} is not one of maglev, maglev-source"),
            );
            Scheduler::Maglev
        }
    };

    let table_size = table_size(&key, raw.table_size, raw.backends.len(), p);
    let health = match &raw.health {
        None => HealthCheck::default(),
        Some(h) => health(&format!("{key}.health"), h, p),
    };
    let slow_start = match raw.slow_start_s {
        None => Duration::ZERO,
        Some(v) => Duration::from_secs(in_range(&format!("{key}.slow_start_s"), v, 0, SLOW_START_MAX_S, p)),
    };
    let flap_damping = match &raw.flap_damping {
        None => FlapDamping::default(),
        Some(f) => flap_damping(&format!("{key}.flap_damping"), f, p),
    };
    if protocol == Some(Protocol::Udp) && health.kind == CheckKind::Tcp && health.port.is_none() {
        // The default check, left as it is on a UDP service, would connect over TCP to the
        // UDP port: every master would fail it and the service would drop all traffic.
        p.add(
            format!("{key}.health"),
            format!(
                "a tcp check of UDP port {} cannot see the service; set health.port to a TCP port \
                 the masters serve, or use check = \"command\" or \"none\"",
                raw.port
            ),
        );
    }

    let mut seen: HashMap<IpAddr, usize> = HashMap::new();
    let backends = raw
        .backends
        .iter()
        .enumerate()
        .map(|(j, b)| backend(&format!("{key}.backend[{j}]"), b, vip, &mut seen, p))
        .collect();

    let service = Service {
        name: raw.name.clone(),
        vip: vip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        port: port.unwrap_or(0),
        protocol: protocol.unwrap_or(Protocol::Tcp),
        scheduler,
        table_size,
        health,
        slow_start,
        flap_damping,
        backends,
    };
    let endpoint = vip.zip(port).zip(protocol).map(|((v, p), pr)| (v, p, pr));
    (service, endpoint)
}

fn valid_service_name(name: &str) -> bool {
    (1..=SERVICE_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn table_size(key: &str, size: Option<i64>, backends: usize, p: &mut Problems) -> u32 {
    let Some(size) = size else {
        if backends >= limits::MAGLEV_DEFAULT_TABLE_SIZE as usize {
            p.add(
                format!("{key}.table_size"),
                format!(
                    "the default {} is not greater than the number of backends ({backends})",
                    limits::MAGLEV_DEFAULT_TABLE_SIZE
                ),
            );
        }
        return limits::MAGLEV_DEFAULT_TABLE_SIZE;
    };
    let key = format!("{key}.table_size");
    let max = i64::from(limits::MAGLEV_MAX_TABLE_SIZE);
    if !(2..=max).contains(&size) {
        p.add(
            key,
            format!("{size} is out of range 2..={max} (and must be a prime)"),
        );
        return limits::MAGLEV_DEFAULT_TABLE_SIZE;
    }
    // In range, so it fits.
    let size = size as u32;
    if !is_prime(size) {
        // Maglev's permutations only cover every slot when the table size is prime.
        p.add(key, format!("{size} is not a prime"));
    } else if size as usize <= backends {
        p.add(
            key,
            format!("{size} is not greater than the number of backends ({backends})"),
        );
    }
    size
}

pub(crate) fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Why `ip` cannot be a VIP or a backend address (e.g. "a loopback address"), or `None` if it
/// can. Shared with `prepare-backend`, so that a master accepts exactly the VIPs a config may
/// name.
pub(crate) fn unusable_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("the unspecified address"),
        _ if ip.is_loopback() => Some("a loopback address"),
        _ if ip.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        // Packets for it arrive as IPv4, so an entry with this IPv6 form would never match.
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address (write the IPv4 address instead)")
        }
        _ => None,
    }
}

/// Parses an address that must be usable as a VIP or a backend.
fn address(key: &str, text: &str, p: &mut Problems) -> Option<IpAddr> {
    let Ok(ip) = text.parse::<IpAddr>() else {
        p.add(key, format!("{text:?} is not an IP address"));
        return None;
    };
    match unusable_address(ip) {
        Some(what) => {
            p.add(key, format!("{ip} is {what}"));
            None
        }
        None => Some(ip),
    }
}

fn family_name(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

fn backend(
    key: &str,
    raw: &RawBackend,
    vip: Option<IpAddr>,
    seen: &mut HashMap<IpAddr, usize>,
    p: &mut Problems,
) -> Backend {
    let addr_key = format!("{key}.address");
    let address = address(&addr_key, &raw.address, p);
    if let Some(addr) = address {
        match vip {
            Some(vip) if vip.is_ipv4() != addr.is_ipv4() => p.add(
                &addr_key,
                format!(
                    "{} address {addr} but the service vip {vip} is {}",
                    family_name(addr),
                    family_name(vip)
                ),
            ),
            Some(vip) if vip == addr => {
                p.add(&addr_key, format!("{addr} is the service's own vip"));
            }
            _ => {}
        }
        if seen.insert(addr, seen.len()).is_some() {
            p.add(&addr_key, format!("{addr} is listed twice in this service"));
        }
    }

    let mac_key = format!("{key}.mac");
    let mac = match raw.mac.as_deref() {
        // Resolved from the neighbour table at run time.
        None => None,
        Some(text) => match parse_mac(text) {
            None => {
                p.add(
                    mac_key,
                    format!(
                        "{text:?} is not a MAC address (expected six hex octets like \
                         02:00:00:00:00:11)"
                    ),
                );
                None
            }
            Some(mac) if mac[0] & 1 == 1 => {
                p.add(
                    mac_key,
                    format!("{text} is a multicast address; a backend needs a unicast one"),
                );
                None
            }
            Some(mac) if mac == [0; 6] => {
                p.add(
                    mac_key,
                    format!("{text} is all zeros, not a usable address"),
                );
                None
            }
            Some(mac) => Some(mac),
        },
    };

    let weight = match raw.weight {
        None => DEFAULT_WEIGHT,
        Some(w) => in_range(&format!("{key}.weight"), w, 0, MAX_WEIGHT, p),
    };

    Backend {
        address: address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        mac,
        weight,
    }
}

fn flap_damping(key: &str, raw: &RawFlapDamping, p: &mut Problems) -> FlapDamping {
    let defaults = FlapDamping::default();
    let max_changes = match raw.max_changes {
        None => defaults.max_changes,
        Some(1) => {
            p.add(
                format!("{key}.max_changes"),
                "1 would hold a master down after a single failure and recovery; use at least 2, \
                 or 0 to turn flap damping off"
                    .to_owned(),
            );
            defaults.max_changes
        }
        Some(v) => in_range(&format!("{key}.max_changes"), v, 0, FLAP_CHANGES_MAX, p),
    };
    let seconds = |name: &str, value: Option<i64>, default: Duration, p: &mut Problems| match value {
        None => default,
        Some(v) => Duration::from_secs(in_range(&format!("{key}.{name}"), v, 1, FLAP_SECONDS_MAX, p)),
    };
    let window = seconds("window_s", raw.window_s, defaults.window, p);
    let hold = seconds("hold_s", raw.hold_s, defaults.hold, p);
    FlapDamping { max_changes, window, hold }
}

fn health(key: &str, raw: &RawHealth, p: &mut Problems) -> HealthCheck {
    let defaults = HealthCheck::default();
    let ms = |name: &str, value: Option<i64>, default: Duration, p: &mut Problems| -> Duration {
        match value {
            None => default,
            Some(v) => Duration::from_millis(in_range(&format!("{key}.{name}"), v, INTERVAL_MIN_MS, INTERVAL_MAX_MS, p)),
        }
    };
    let interval = ms("interval_ms", raw.interval_ms, defaults.interval, p);
    // The default timeout shrinks with a short interval, so `interval_ms = 200` alone is valid.
    let timeout = ms("timeout_ms", raw.timeout_ms, defaults.timeout.min(interval), p);
    if timeout > interval {
        p.add(
            format!("{key}.timeout_ms"),
            format!(
                "{} is longer than interval_ms ({}): a check must end before the next one starts",
                timeout.as_millis(),
                interval.as_millis()
            ),
        );
    }
    let count = |name: &str, value: Option<i64>, default: u32, p: &mut Problems| -> u32 {
        match value {
            None => default,
            Some(v) => in_range(&format!("{key}.{name}"), v, 1, RISE_FALL_MAX, p),
        }
    };
    let rise = count("rise", raw.rise, defaults.rise, p);
    let fall = count("fall", raw.fall, defaults.fall, p);
    let port = raw.port.and_then(|v| match u16::try_from(v) {
        Ok(port) if port != 0 => Some(port),
        _ => {
            p.add(format!("{key}.port"), format!("{v} is out of range 1..=65535"));
            None
        }
    });

    let check = raw.check.as_deref().unwrap_or("tcp");
    // Options of one kind of check given to another are mistakes, not harmless extras.
    let misplaced = |p: &mut Problems, name: &str, given: bool, belongs: &str| {
        if given {
            p.add(
                format!("{key}.{name}"),
                format!("only applies to check = \"{belongs}\", but check is \"{check}\""),
            );
        }
    };
    let http_keys = [
        ("path", raw.path.is_some()),
        ("expect_status", raw.expect_status.is_some()),
        ("expect_body", raw.expect_body.is_some()),
    ];
    let kind = match check {
        "none" | "tcp" => {
            for (name, given) in http_keys {
                misplaced(p, name, given, "http");
            }
            misplaced(p, "command", raw.command.is_some(), "command");
            if check == "none" { CheckKind::None } else { CheckKind::Tcp }
        }
        "http" => {
            misplaced(p, "command", raw.command.is_some(), "command");
            let path = raw.path.clone().unwrap_or_else(|| "/".to_owned());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.add(
                    format!("{key}.path"),
                    format!("{path:?} is not an HTTP path (it starts with '/' and has no spaces)"),
                );
            }
            let expect_status = match raw.expect_status {
                None => 200,
                Some(v) => in_range(&format!("{key}.expect_status"), v, 100, 599, p),
            };
            CheckKind::Http { path, expect_status, expect_body: raw.expect_body.clone() }
        }
        "command" => {
            for (name, given) in http_keys {
                misplaced(p, name, given, "http");
            }
            let argv = raw.command.clone().unwrap_or_default();
            match argv.first() {
                None => p.add(
                    format!("{key}.command"),
                    "missing or empty: check = \"command\" needs the program and its arguments, \
                     like [\"/usr/local/bin/check-master\", \"{address}\", \"{port}\"]",
                ),
                Some(program) if !Path::new(program).is_absolute() => p.add(
                    format!("{key}.command"),
                    format!("{program:?} is not an absolute path (the daemon does not search PATH)"),
                ),
                Some(_) => {}
            }
            CheckKind::Command { argv }
        }
        other => {
            p.add(
                format!("{key}.check"),
                format!("{other:?} is not one of tcp, http, command, none"),
            );
            CheckKind::Tcp
        }
    };
    HealthCheck { kind, interval, timeout, rise, fall, port }
}

/// Two services with one name, or on one (vip, port, protocol), cannot both be served: the
/// data path finds a service by that triple, and operators address it by name.
fn check_service_duplicates(
    services: &[Service],
    endpoints: &[Option<Endpoint>],
    p: &mut Problems,
) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut seen: HashMap<Endpoint, usize> = HashMap::new();
    for (i, (s, e)) in services.iter().zip(endpoints).enumerate() {
        if let Some(&first) = names.get(s.name.as_str()) {
            p.add(
                format!("service[{i}].name"),
                format!("{:?} is already the name of service[{first}]", s.name),
            );
        } else {
            names.insert(&s.name, i);
        }

        // A service with an invalid vip, port or protocol has already been reported; its
        // placeholders must not make it look like a duplicate.
        let Some(e @ (vip, port, protocol)) = *e else {
            continue;
        };
        if let Some(&first) = seen.get(&e) {
            p.add(
                format!("service[{i}] ({:?})", s.name),
                format!(
                    "duplicate of service[{first}] ({:?}): both are {}",
                    services[first].name,
                    endpoint(vip, port, protocol)
                ),
            );
        } else {
            seen.insert(e, i);
        }
    }
}
