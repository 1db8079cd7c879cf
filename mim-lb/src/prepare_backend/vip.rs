//! A VIP as a master holds it: the address alone on `lo`, as a host route (/32 or /128).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::unusable_address;

/// A virtual IP a master must accept traffic for. Always a single address: a wider prefix on
/// `lo` would make the master swallow traffic for its neighbours too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Vip(IpAddr);

/// Why a `--vip` argument is not a usable VIP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("{0:?} is not an IP address (give the address alone, without a prefix length)")]
    NotAnAddress(String),
    #[error("{ip} is {what}; a VIP must be a unicast address")]
    Unusable { ip: IpAddr, what: &'static str },
    #[error("{text}: a VIP is a single address (/{host}) on lo; give the address alone")]
    NotAHostPrefix { text: String, host: u8 },
}

impl Vip {
    /// Checks `ip` with the same rules a config's `vip` is checked with.
    pub fn new(ip: IpAddr) -> Result<Vip, VipError> {
        match unusable_address(ip) {
            Some(what) => Err(VipError::Unusable { ip, what }),
            None => Ok(Vip(ip)),
        }
    }

    pub fn ip(self) -> IpAddr {
        self.0
    }

    pub fn is_ipv4(self) -> bool {
        self.0.is_ipv4()
    }

    /// /32 or /128: the VIP alone.
    pub fn prefix_len(self) -> u8 {
        match self.0 {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }
}

impl FromStr for Vip {
    type Err = VipError;

    fn from_str(text: &str) -> Result<Vip, VipError> {
        // "10.0.0.1/32" is what a VIP looks like in `ip addr`; accept that spelling of the
        // only prefix that makes sense, so copying from there works.
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr =
            addr.trim().parse().map_err(|_| VipError::NotAnAddress(text.to_owned()))?;
        let vip = Vip::new(ip)?;
        match prefix {
            Some(p) if p.trim().parse::<u8>().ok() != Some(vip.prefix_len()) => {
                Err(VipError::NotAHostPrefix { text: text.to_owned(), host: vip.prefix_len() })
            }
            _ => Ok(vip),
        }
    }
}

/// `10.0.0.100/32`, `fd00::100/128`: the form `ip addr` shows it on `lo`.
impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_their_host_prefix() {
        let v4: Vip = "10.0.0.100".parse().unwrap();
        assert_eq!(v4.to_string(), "10.0.0.100/32");
        assert_eq!("10.0.0.100/32".parse::<Vip>().unwrap(), v4);
        let v6: Vip = "fd00::100".parse().unwrap();
        assert_eq!(v6.to_string(), "fd00::100/128");
        assert_eq!(v6.prefix_len(), 128);
        assert!(!v6.is_ipv4());
    }

    #[test]
    fn rejects_what_a_config_rejects() {
        let err = |s: &str| s.parse::<Vip>().unwrap_err().to_string();
        assert_eq!(
            err("127.0.0.1"),
            "127.0.0.1 is a loopback address; a VIP must be a unicast address"
        );
        assert_eq!(err("::1"), "::1 is a loopback address; a VIP must be a unicast address");
        assert_eq!(
            err("224.0.0.1"),
            "224.0.0.1 is a multicast address; a VIP must be a unicast address"
        );
        assert_eq!(
            err("0.0.0.0"),
            "0.0.0.0 is the unspecified address; a VIP must be a unicast address"
        );
        assert_eq!(err("::"), ":: is the unspecified address; a VIP must be a unicast address");
        assert!(err("::ffff:10.0.0.1").contains("IPv4-mapped"));
        assert!(err("vip.example").contains("not an IP address"));
        // Only the host prefix is a VIP; a /24 on lo would capture the neighbours' traffic.
        assert_eq!(
            err("10.0.0.0/24"),
            "10.0.0.0/24: a VIP is a single address (/32) on lo; give the address alone"
        );
        assert!(err("fd00::1/64").contains("(/128)"));
    }
}
