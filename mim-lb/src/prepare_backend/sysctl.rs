//! The IPv4 per-interface settings prepare-backend manages, read and written through
//! `/proc/sys`.
//!
//! `/proc/sys/net` shows the network namespace of the thread that opens the file, so this works
//! in a namespace entered with setns(2) as well. `/sys/class/net` would not: sysfs shows the
//! namespace it was mounted in.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the `net.ipv4.conf.*` settings live: one directory per interface, plus `all` and
/// `default`.
pub const IPV4_CONF: &str = "/proc/sys/net/ipv4/conf";
/// Present only if the kernel has IPv6.
pub const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// The IPv4 settings a DR master needs. For all three the kernel uses the larger of
/// `conf/all/<knob>` and `conf/<interface>/<knob>` (`IN_DEV_MAXCONF` in
/// include/linux/inetdevice.h; measured on 6.18 in namespaces, see [`super::plan`]). The
/// kernel accepts any integer for them, negative ones too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Knob {
    ArpIgnore,
    ArpAnnounce,
    RpFilter,
}

impl Knob {
    /// In the order prepare-backend changes them.
    pub const ALL: [Knob; 3] = [Knob::ArpIgnore, Knob::ArpAnnounce, Knob::RpFilter];

    /// The file name under `conf/<interface>/`.
    pub fn name(self) -> &'static str {
        match self {
            Knob::ArpIgnore => "arp_ignore",
            Knob::ArpAnnounce => "arp_announce",
            Knob::RpFilter => "rp_filter",
        }
    }
}

/// One setting: `net.ipv4.conf.<conf>.<knob>`, where `conf` is `all`, `default` or an
/// interface name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SysctlKey {
    pub conf: String,
    pub knob: Knob,
}

impl SysctlKey {
    pub fn new(conf: &str, knob: Knob) -> SysctlKey {
        SysctlKey { conf: conf.to_owned(), knob }
    }

    pub fn path(&self) -> PathBuf {
        Path::new(IPV4_CONF).join(&self.conf).join(self.knob.name())
    }
}

/// The name `sysctl(8)` uses: `net.ipv4.conf.eth0.arp_ignore`. A dot inside an interface name
/// (a VLAN such as `eth0.100`) becomes `/`, as sysctl(8) writes it.
impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net.ipv4.conf.{}.{}", self.conf.replace('.', "/"), self.knob.name())
    }
}

/// Current values, by key.
pub type Values = BTreeMap<SysctlKey, i32>;

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("listing {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("reading {key} ({path}): {source}", path = key.path().display())]
    Read { key: SysctlKey, source: io::Error },
    #[error("{key} ({path}) holds {text:?}, not a number", path = key.path().display())]
    NotANumber { key: SysctlKey, text: String },
    #[error("setting {key} to {value} ({path}): {source}", path = key.path().display())]
    Write { key: SysctlKey, value: i32, source: io::Error },
    #[error("reading {path}: {source}")]
    Ipv6 { path: PathBuf, source: io::Error },
}

/// Names under [`IPV4_CONF`]: `all`, `default` and every interface, sorted.
pub fn conf_names() -> Result<Vec<String>, SysctlError> {
    let list = |source| SysctlError::List { path: IPV4_CONF.into(), source };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(IPV4_CONF).map_err(list)? {
        names.push(entry.map_err(list)?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The value of `key`, or `None` if its interface is gone.
pub fn read(key: &SysctlKey) -> Result<Option<i32>, SysctlError> {
    let text = match std::fs::read_to_string(key.path()) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SysctlError::Read { key: key.clone(), source }),
    };
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| SysctlError::NotANumber { key: key.clone(), text: text.trim().to_owned() })
}

pub fn write(key: &SysctlKey, value: i32) -> Result<(), SysctlError> {
    std::fs::write(key.path(), format!("{value}\n")).map_err(|source| SysctlError::Write {
        key: key.clone(),
        value,
        source,
    })
}

/// Every [`Knob`] of `all`, `default` and every interface. An interface that disappears while
/// this reads is left out, as if it had gone a moment earlier.
pub fn read_all() -> Result<Values, SysctlError> {
    let mut values = Values::new();
    for conf in conf_names()? {
        for knob in Knob::ALL {
            let key = SysctlKey::new(&conf, knob);
            if let Some(value) = read(&key)? {
                values.insert(key, value);
            }
        }
    }
    Ok(values)
}

/// Whether IPv6 addresses can be put on `lo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6OnLo {
    Enabled,
    /// `net.ipv6.conf.lo.disable_ipv6` is 1.
    Disabled,
    /// The kernel has no IPv6 (or it is off on the command line).
    Unavailable,
}

pub fn ipv6_on_lo() -> Result<Ipv6OnLo, SysctlError> {
    // Writing `all.disable_ipv6` also writes every interface's value, so lo's own value is the
    // one that decides.
    let path = Path::new(IPV6_CONF).join("lo").join("disable_ipv6");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim() == "0" => Ok(Ipv6OnLo::Enabled),
        Ok(_) => Ok(Ipv6OnLo::Disabled),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ipv6OnLo::Unavailable),
        Err(source) => Err(SysctlError::Ipv6 { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_print_as_sysctl_names_and_map_to_proc_paths() {
        let key = SysctlKey::new("all", Knob::ArpIgnore);
        assert_eq!(key.to_string(), "net.ipv4.conf.all.arp_ignore");
        assert_eq!(key.path(), Path::new("/proc/sys/net/ipv4/conf/all/arp_ignore"));
        let vlan = SysctlKey::new("eth0.100", Knob::RpFilter);
        assert_eq!(vlan.to_string(), "net.ipv4.conf.eth0/100.rp_filter");
        assert_eq!(vlan.path(), Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter"));
    }

    #[test]
    fn reads_this_namespace() {
        // Every Linux network namespace has these; reading needs no privilege.
        let names = conf_names().unwrap();
        assert!(names.iter().any(|n| n == "all") && names.iter().any(|n| n == "lo"), "{names:?}");
        let values = read_all().unwrap();
        assert!(values.contains_key(&SysctlKey::new("default", Knob::ArpAnnounce)));
        assert_eq!(read(&SysctlKey::new("no-such-interface", Knob::RpFilter)).unwrap(), None);
    }
}
