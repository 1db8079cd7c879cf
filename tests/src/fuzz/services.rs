//! The services the fuzzer configures, as a plain table: the config file the real control
//! plane reads is written from it, and the oracle answers from it, so the oracle never asks
//! the control plane (or the program) what is configured.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mim_lb::config::{Protocol, ServiceKey};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub struct Service {
    pub name: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// The masters that take traffic (weight above 0): (address, MAC).
    pub masters: Vec<(IpAddr, [u8; 6])>,
    /// `scheduler = "maglev-source"`.
    pub source_hash: bool,
}

impl Service {
    pub fn key(&self) -> ServiceKey {
        let protocol = if self.proto == UDP { Protocol::Udp } else { Protocol::Tcp };
        ServiceKey { vip: self.vip, port: self.port, protocol }
    }
}

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const STICKY_VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
/// A VIP whose only master has weight 0: every packet to it is `no_backend`.
pub const EMPTY_VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
/// A TCP-only IPv6 VIP.
pub const TCP_ONLY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101);

fn mac(last: u8, family: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, family, last]
}

fn masters4(n: u8) -> Vec<(IpAddr, [u8; 6])> {
    (1..=n).map(|i| (IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)), mac(i, 4))).collect()
}

fn masters6(n: u8) -> Vec<(IpAddr, [u8; 6])> {
    (1..=n).map(|i| (IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, i as u16)), mac(i, 6))).collect()
}

/// Both families, both protocols, a VIP with several ports and both protocols, a TCP-only VIP
/// (its UDP fragments are not the program's), a source-hash service, ports at both ends of
/// the range, and a service with no master.
pub fn table() -> Vec<Service> {
    let s = |name, vip: IpAddr, port, proto, masters, source_hash| Service { name, vip, port, proto, masters, source_hash };
    vec![
        s("tcp4", VIP4.into(), 7000, TCP, masters4(3), false),
        s("tcp4-http", VIP4.into(), 80, TCP, masters4(2), false),
        s("udp4", VIP4.into(), 5353, UDP, masters4(2), false),
        s("udp4-top", VIP4.into(), 65535, UDP, masters4(3), false),
        s("sticky", STICKY_VIP4.into(), 443, TCP, masters4(3), true),
        s("empty", EMPTY_VIP4.into(), 7000, TCP, Vec::new(), false),
        s("tcp6", VIP6.into(), 7000, TCP, masters6(2), false),
        s("udp6", VIP6.into(), 53, UDP, masters6(3), false),
        s("tcp6-low", TCP_ONLY_VIP6.into(), 1, TCP, masters6(2), false),
    ]
}

/// The config file for `services`.
pub fn config(services: &[Service]) -> String {
    let mut out = String::from("interface = \"lo\"\n");
    for s in services {
        let proto = if s.proto == UDP { "udp" } else { "tcp" };
        let _ = writeln!(out, "\n[[service]]\nname = \"{}\"\nvip = \"{}\"\nport = {}\nprotocol = \"{proto}\"", s.name, s.vip, s.port);
        if s.proto == UDP {
            // UDP has no connection to check; any TCP port will do (the fuzzer marks every
            // master healthy itself).
            out.push_str("health = { port = 7000 }\n");
        }
        if s.source_hash {
            out.push_str("scheduler = \"maglev-source\"\n");
        }
        let backend = |out: &mut String, addr: &IpAddr, mac: &[u8; 6], weight: Option<u32>| {
            let m = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            let _ = writeln!(out, "[[service.backend]]\naddress = \"{addr}\"\nmac = \"{m}\"");
            if let Some(w) = weight {
                let _ = writeln!(out, "weight = {w}");
            }
        };
        if s.masters.is_empty() {
            let addr = if s.vip.is_ipv4() { masters4(1) } else { masters6(1) };
            backend(&mut out, &addr[0].0, &addr[0].1, Some(0));
        }
        for (addr, m) in &s.masters {
            backend(&mut out, addr, m, None);
        }
    }
    out
}
