//! The rules a configuration must follow, checked on the raw file.
//!
//! Every check records its problem and carries on with a placeholder value, so one run reports
//! everything that is wrong. The placeholders never escape: any problem rejects the whole
//! configuration.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use mim_lb_common::limits;

use super::{
    Backend, Config, ConfigError, Protocol, Scheduler, Service, XdpMode, endpoint,
    error::Problems,
    parse_mac,
    raw::{RawBackend, RawConfig, RawService},
};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mim-lb";
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

    p.into_result(Config {
        interface: raw.interface,
        xdp_mode,
        pin_dir,
        flow_table_size,
        services,
    })
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
    T::default()
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

/// Parses an address that must be usable as a VIP or a backend.
fn address(key: &str, text: &str, p: &mut Problems) -> Option<IpAddr> {
    let Ok(ip) = text.parse::<IpAddr>() else {
        p.add(key, format!("{text:?} is not an IP address"));
        return None;
    };
    let unusable = match ip {
        _ if ip.is_unspecified() => Some("the unspecified address"),
        _ if ip.is_loopback() => Some("a loopback address"),
        _ if ip.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        // Packets for it arrive as IPv4, so an entry with this IPv6 form would never match.
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address (write the IPv4 address instead)")
        }
        _ => None,
    };
    match unusable {
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
        None => {
            p.add(
                mac_key,
                "missing: a MAC address is required (finding it from the neighbour table is not \
                 supported yet)",
            );
            None
        }
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
