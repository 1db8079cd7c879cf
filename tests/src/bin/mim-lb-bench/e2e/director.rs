//! The directors the end-to-end benchmark compares, each set up on the lab's gateway in turn
//! and removed again before the next: mim-lb (native and generic XDP), HAProxy, the kernel's
//! netdev forwarding by nftables, and none at all (the client talks to one master).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mim_lb_tests::{
    Lab, Proc, mac_to_string,
    gateway::{Gateway, Mode, ServiceSpec, lab_config, unique_suffix},
    netns::enter_netns_on_spawn,
    wait_within,
};

/// The name of the nftables table the benchmark adds in the gateway's namespace.
const NFT_TABLE: &str = "mimlb_e2e";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    MimLbNative,
    MimLbGeneric,
    Haproxy,
    Nftables,
    NoDirector,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::NoDirector, Kind::MimLbNative, Kind::MimLbGeneric, Kind::Nftables, Kind::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::MimLbNative => "mim-lb native XDP",
            Kind::MimLbGeneric => "mim-lb generic XDP",
            Kind::Haproxy => "HAProxy",
            Kind::Nftables => "nftables netdev",
            Kind::NoDirector => "no director",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Kind::MimLbNative => "mim_lb_native",
            Kind::MimLbGeneric => "mim_lb_generic",
            Kind::Haproxy => "haproxy",
            Kind::Nftables => "nftables",
            Kind::NoDirector => "no_director",
        }
    }

    /// Whether the director spreads connections over every master (the no-director run
    /// talks to master 1 only).
    pub fn balances(self) -> bool {
        self != Kind::NoDirector
    }
}

/// A director set up on the gateway; dropping it removes it.
pub enum Running {
    /// Boxed: a gateway is much larger than the other variants.
    MimLb(Box<Gateway>),
    Haproxy(Haproxy),
    /// Held for its drop, which deletes the table.
    Nftables { _table: NftTable },
    NoDirector,
}

impl Running {
    pub fn start(kind: Kind, lab: &mut Lab, port: u16) -> Result<Running> {
        Ok(match kind {
            Kind::MimLbNative | Kind::MimLbGeneric => {
                let mode = if kind == Kind::MimLbNative { Mode::Native } else { Mode::Generic };
                // The lab's usual service: every master, checked by TCP every 100 ms. HAProxy
                // below checks as often.
                let config = lab_config(lab, &[ServiceSpec::tcp(lab, port)], "");
                let gw = Gateway::start(lab, &config, mode).context("starting mim-lb")?;
                gw.wait_all_up()?;
                Running::MimLb(Box::new(gw))
            }
            Kind::Haproxy => Running::Haproxy(Haproxy::start(lab, port)?),
            Kind::Nftables => Running::Nftables { _table: NftTable::add(lab, port)? },
            Kind::NoDirector => Running::NoDirector,
        })
    }

    /// Where the client connects: the VIP, or master 1 itself without a director.
    pub fn target(lab: &Lab, kind: Kind, port: u16) -> SocketAddr {
        match kind {
            Kind::NoDirector => (lab.master_addr4(0), port).into(),
            _ => (lab.vip4(), port).into(),
        }
    }

    /// The last lines the director's process printed, for an error about it.
    pub fn log_tail(&self) -> String {
        match self {
            Running::MimLb(gw) if gw.running() => format!("; mim-lb's last output:\n{}", gw.proc().tail(20)),
            Running::MimLb(_) => String::new(),
            Running::Haproxy(h) => format!("; haproxy's last output:\n{}", h.proc.tail(20)),
            Running::Nftables { .. } | Running::NoDirector => String::new(),
        }
    }

    /// mim-lb's pin directory, where its maps are.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        match self {
            Running::MimLb(gw) => Some(gw.pin_dir()),
            _ => None,
        }
    }

    /// The director's process on the gateway, if it has one.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Running::MimLb(gw) => gw.running().then(|| gw.proc().pid()),
            Running::Haproxy(h) => Some(h.proc.pid()),
            Running::Nftables { .. } | Running::NoDirector => None,
        }
    }
}

/// HAProxy in the gateway's namespace, a TCP proxy on the VIP: the masters see the gateway's
/// address as the client and answer it, on the ordinary route of the segment.
pub struct Haproxy {
    proc: Proc,
    dir: PathBuf,
}

/// The configuration: `mode tcp`, round robin, a TCP connect check every 100 ms (as mim-lb's
/// in this lab), `maxconn` for the open file limit it inherits (two descriptors a
/// connection), and otherwise HAProxy's defaults (one thread per CPU).
pub fn haproxy_config(vip: SocketAddr, masters: &[SocketAddr], maxconn: u64) -> String {
    let mut text = format!(
        "global\n    maxconn {maxconn}\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n\n\
         frontend e2e\n    bind {vip}\n    default_backend masters\n\n\
         backend masters\n    balance roundrobin\n"
    );
    for (i, m) in masters.iter().enumerate() {
        text += &format!("    server m{} {m} check inter 100ms rise 1 fall 2\n", i + 1);
    }
    text
}

impl Haproxy {
    fn start(lab: &mut Lab, port: u16) -> Result<Haproxy> {
        let dir = std::env::temp_dir().join(format!("mimlb-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let masters: Vec<SocketAddr> = (0..lab.master_count()).map(|i| (lab.master_addr4(i), port).into()).collect();
        let cfg = dir.join("haproxy.cfg");
        let written = std::fs::write(&cfg, haproxy_config((lab.vip4(), port).into(), &masters, haproxy_maxconn()));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e).with_context(|| format!("writing {}", cfg.display()));
        }
        let ns = lab.gateway_ns().to_owned();
        // -db: stay in the foreground, so that the lab owns the process.
        let spawned = lab.spawn_in(&ns, Command::new("haproxy").arg("-db").arg("-f").arg(&cfg));
        let proc = match spawned {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).context("starting haproxy");
            }
        };
        Ok(Haproxy { proc, dir })
    }
}

/// What HAProxy can hold with the open file limit it inherits from us (it cannot raise the
/// hard limit either where the benchmark cannot): two descriptors per proxied connection and
/// some to spare for listeners, checks and logs.
fn haproxy_maxconn() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid pointer to a local.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_max } else { 1024 };
    (hard.saturating_sub(100) / 2).clamp(100, 60_000)
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SIGTERM is HAProxy's immediate stop.
        let _ = self.proc.signal(libc::SIGTERM);
        if self.proc.wait_exit(Duration::from_secs(5)).is_err() {
            let _ = self.proc.signal(libc::SIGKILL);
            let _ = self.proc.wait_exit(Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The ruleset: on the gateway's ingress, packets for the VIP's port get the gateway's MAC as
/// source and a master's MAC as destination, chosen by a hash of the client's address and
/// port, and are sent back out of the same interface. No state, no health.
pub fn nft_ruleset(ifname: &str, vip: SocketAddr, gateway_mac: &str, master_macs: &[String]) -> String {
    let map: Vec<String> = master_macs.iter().enumerate().map(|(i, m)| format!("{i} : {m}")).collect();
    format!(
        "table netdev {NFT_TABLE} {{\n  chain ingress {{\n    \
         type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n    \
         ip daddr {} tcp dport {} ether saddr set {gateway_mac} \
         ether daddr set jhash ip saddr . tcp sport mod {} seed 0x6d696d map {{ {} }} fwd to \"{ifname}\"\n  }}\n}}\n",
        vip.ip(),
        vip.port(),
        master_macs.len(),
        map.join(", ")
    )
}

/// The nftables table of [`nft_ruleset`] in the gateway's namespace; deleted on drop.
pub struct NftTable {
    ns: String,
}

impl NftTable {
    fn add(lab: &Lab, port: u16) -> Result<NftTable> {
        let macs: Vec<String> = (0..lab.master_count()).map(|i| mac_to_string(&lab.master_mac(i))).collect();
        let rules = nft_ruleset(
            lab.gateway_ifname(),
            (lab.vip4(), port).into(),
            &mac_to_string(&lab.gateway_mac()),
            &macs,
        );
        let ns = lab.gateway_ns().to_owned();
        nft(&ns, &["-f", "-"], Some(&rules)).context("adding the nftables forwarding rules")?;
        Ok(NftTable { ns })
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.ns, &["delete", "table", "netdev", NFT_TABLE], None) {
            eprintln!("mim-lb-bench: warning: removing the nftables table in {}: {e:#}", self.ns);
        }
    }
}

fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    enter_netns_on_spawn(&mut cmd, ns)?;
    let mut child = cmd.spawn().context("starting `nft` (Debian package nftables)")?;
    if let Some(text) = stdin {
        child.stdin.take().expect("stdin is piped").write_all(text.as_bytes()).context("writing to nft")?;
    }
    let out = wait_within(child, Duration::from_secs(20))?;
    if !out.status.success() {
        bail!("`nft {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nft_rule_hashes_the_flow_onto_every_master() {
        let macs = vec!["02:6d:01:02:00:0b".to_owned(), "02:6d:01:02:00:0c".to_owned()];
        let text = nft_ruleset("eth0", "10.1.2.100:7000".parse().unwrap(), "02:6d:01:02:00:02", &macs);
        assert!(text.contains("hook ingress device \"eth0\""));
        assert!(text.contains("ip daddr 10.1.2.100 tcp dport 7000 ether saddr set 02:6d:01:02:00:02"));
        // The flow's client address and port pick the master (the VIP and port are fixed).
        assert!(text.contains(
            "ether daddr set jhash ip saddr . tcp sport mod 2 seed 0x6d696d map { 0 : 02:6d:01:02:00:0b, 1 : 02:6d:01:02:00:0c } fwd to \"eth0\""
        ));
    }

    #[test]
    fn haproxy_checks_every_master() {
        let masters: Vec<SocketAddr> = vec!["10.1.2.11:7000".parse().unwrap(), "10.1.2.12:7000".parse().unwrap()];
        let text = haproxy_config("10.1.2.100:7000".parse().unwrap(), &masters, 9950);
        assert!(text.contains("maxconn 9950") && text.contains("mode tcp") && text.contains("balance roundrobin") && text.contains("bind 10.1.2.100:7000"));
        assert!(text.contains("server m1 10.1.2.11:7000 check inter 100ms"));
        assert!(text.contains("server m2 10.1.2.12:7000 check inter 100ms"));
    }
}
