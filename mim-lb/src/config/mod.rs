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
};

pub use error::{ConfigError, Problem};

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
    /// At least one, at most `limits::MAX_SERVICES`, no two with the same name or the same
    /// (vip, port, protocol).
    pub services: Vec<Service>,
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
    /// Addresses are unique and of the vip's family.
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub address: IpAddr,
    /// Where frames for this backend are sent. Always present for now; `None` is reserved for
    /// resolving it from the neighbour table.
    pub mac: Option<[u8; 6]>,
    /// 0..=65535; 0 means the backend takes no new flows (draining).
    pub weight: u32,
}

impl Config {
    /// Reads and validates a configuration file. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| e.in_file(path.to_owned()))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(text, &e))?;
        validate::validate(raw)
    }

    /// A commented example configuration with one service and three backends.
    pub fn example() -> &'static str {
        include_str!("example.toml")
    }
}

impl Service {
    /// `10.0.0.100:7000/tcp`, `[2001:db8::1]:443/tcp`: how logs and errors name the service.
    pub fn endpoint(&self) -> String {
        endpoint(self.vip, self.port, self.protocol)
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
