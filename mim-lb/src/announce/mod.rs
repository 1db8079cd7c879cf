//! Announcing the VIPs through a routing daemon (`[announce]`, OPERATIONS.md "Many directors
//! behind ECMP"). mim-lb speaks no routing protocol: it keeps one host route per VIP it can
//! serve in a kernel table of its own, marked with its own route protocol number, and a
//! routing daemon (BIRD's `kernel` protocol with `learn`, FRR's `ip import-table`) announces
//! what it finds there to the router. Removing a route withdraws the VIP.
//!
//! This file decides which VIPs to announce and how the table must change (pure); `kernel`
//! writes the routes, on a task of its own so that the event loop never waits for netlink.

mod kernel;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    config::Announce,
    director::Desired,
    status::{AnnounceStatus, AnnouncedVip},
};

pub use kernel::AnnounceError;

/// Why a VIP is not announced, or `None` when it is wanted in the table.
pub type Decision = BTreeMap<IpAddr, Option<String>>;

/// Whether each VIP has a master that still carries connections (up, draining or removing)
/// in one of its services.
pub fn live_vips(desired: &Desired) -> BTreeMap<IpAddr, bool> {
    let mut live: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for (key, service) in desired {
        let any = service.backends.values().any(|b| b.state().0.keeps_flows());
        *live.entry(key.vip).or_default() |= any;
    }
    live
}

/// Whether each VIP should be announced. A VIP is announced while the director is ready, the
/// operator has not withdrawn it, and one of its services has a master that still carries
/// connections (`live`): a director that can reach none of a VIP's masters (its own checks
/// fail) steps out, so the router sends clients to directors that can, while a VIP whose
/// masters are only drained stays: their connections still need a way in.
pub fn decide(live: &BTreeMap<IpAddr, bool>, not_ready: Option<&str>, withdrawn: bool) -> Decision {
    live.iter()
        .map(|(vip, live)| {
            let why = if withdrawn {
                Some("withdrawn by the operator (`mim-lb announce` announces it again)".to_owned())
            } else if let Some(why) = not_ready {
                Some(format!("not ready: {why}"))
            } else if !live {
                Some("no service of this VIP has a master that is up, draining or removing".to_owned())
            } else {
                None
            };
            (*vip, why)
        })
        .collect()
}

/// The VIPs `decision` wants in the table.
pub fn wanted(decision: &Decision) -> BTreeSet<IpAddr> {
    decision.iter().filter(|(_, why)| why.is_none()).map(|(vip, _)| *vip).collect()
}

/// A route of ours found in the table: its destination and prefix length, and whether it is
/// the route this daemon writes (`dev lo`, unicast) rather than one with other attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub as_written: bool,
}

/// What to change in the table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Routes of ours to remove: VIPs no longer wanted (withdrawn, or gone from the config)
    /// and anything that is not a host route of a VIP (left by someone else with our number).
    pub delete: Vec<(IpAddr, u8)>,
    /// VIPs to write: missing, or there with other attributes (NLM_F_REPLACE: a route an
    /// earlier run or an operator left is overwritten, not duplicated). A route already as
    /// written is left alone, so a periodic check changes nothing the routing daemon would
    /// hear of.
    pub replace: Vec<IpAddr>,
}

fn host_len(vip: &IpAddr) -> u8 {
    if vip.is_ipv4() { 32 } else { 128 }
}

/// How to bring the routes `found` in the table to `want`.
pub fn plan(found: &[Found], want: &BTreeSet<IpAddr>) -> Plan {
    let host = |f: &Found| f.prefix_len == host_len(&f.destination);
    let delete = found
        .iter()
        .filter(|f| !host(f) || !want.contains(&f.destination))
        .map(|f| (f.destination, f.prefix_len))
        .collect();
    let proper: BTreeSet<IpAddr> = found.iter().filter(|f| host(f) && f.as_written).map(|f| f.destination).collect();
    let replace = want.iter().filter(|vip| !proper.contains(vip)).copied().collect();
    Plan { delete, replace }
}

/// What the writer last achieved.
#[derive(Debug, Clone, Default)]
struct Applied {
    /// The generation of the wish it last finished applying (successfully or not).
    generation: u64,
    /// VIPs whose route is in the table, as far as the writer knows.
    installed: BTreeSet<IpAddr>,
    /// The last failure, until a pass succeeds.
    error: Option<String>,
}

/// The daemon's side: it says which VIPs it wants, the writer task makes it so.
pub struct Announcer {
    config: Announce,
    wish: watch::Sender<(u64, BTreeSet<IpAddr>)>,
    applied: watch::Receiver<Applied>,
    task: tokio::task::JoinHandle<()>,
    /// The operator's `mim-lb withdraw`, until `mim-lb announce`.
    pub withdrawn: bool,
    decision: Decision,
}

/// How often the writer reads the table back and rewrites it, which repairs a route someone
/// removed or changed by hand.
const RECHECK: Duration = Duration::from_secs(30);
/// How soon a failed pass is tried again, doubling up to `RECHECK` while it keeps failing.
const RETRY: Duration = Duration::from_secs(1);
/// How long a stop waits for the routes to be removed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Announcer {
    /// Opens the netlink socket and starts the writer. Its first pass removes every route of
    /// ours left in the table (nothing is announced before the daemon is ready).
    pub async fn start(config: Announce) -> Result<Announcer, AnnounceError> {
        let writer = kernel::Writer::open(config).await?;
        let (wish, wishes) = watch::channel((0, BTreeSet::new()));
        let (report, applied) = watch::channel(Applied::default());
        let task = tokio::spawn(writer.run(wishes, report, RECHECK, RETRY));
        Ok(Announcer { config, wish, applied, task, withdrawn: false, decision: Decision::new() })
    }

    /// Hands the writer a new decision; nothing happens if the wanted set did not change.
    pub fn set(&mut self, decision: Decision) {
        let want = wanted(&decision);
        self.decision = decision;
        self.wish.send_if_modified(|(generation, old)| {
            if *old == want {
                return false;
            }
            *generation += 1;
            *old = want;
            true
        });
    }

    /// Whether any route is in the table now (as far as the writer knows).
    pub fn announcing(&self) -> bool {
        !self.applied.borrow().installed.is_empty()
    }

    pub fn status(&self) -> AnnounceStatus {
        let applied = self.applied.borrow();
        let wished = self.wish.borrow();
        let vips = self
            .decision
            .iter()
            .map(|(vip, why)| {
                let announced = applied.installed.contains(vip);
                let reason = match (why, announced) {
                    (Some(why), _) => why.clone(),
                    (None, true) => String::new(),
                    (None, false) => match &applied.error {
                        Some(e) if applied.generation >= wished.0 => format!("writing its route failed: {e}"),
                        _ => "its route is being written".to_owned(),
                    },
                };
                AnnouncedVip { vip: vip.to_string(), announced, reason }
            })
            .collect();
        AnnounceStatus {
            table: self.config.table,
            protocol: self.config.protocol,
            announcing: !applied.installed.is_empty(),
            withdrawn: self.withdrawn,
            vips,
            error: applied.error.clone().unwrap_or_default(),
        }
    }

    /// Removes every route (the writer's last pass) and waits for it, at most a few seconds.
    /// Returns whether any route was in the table before.
    pub async fn withdraw_all(mut self) -> bool {
        let had = self.announcing();
        self.set(self.decision.keys().map(|vip| (*vip, Some("stopping".to_owned()))).collect());
        // A fresh generation even if nothing was wanted: the writer confirms the table is empty.
        let generation = {
            let mut g = 0;
            self.wish.send_modify(|(generation, _)| {
                *generation += 1;
                g = *generation;
            });
            g
        };
        let done = tokio::time::timeout(STOP_TIMEOUT, self.applied.wait_for(|a| a.generation >= generation)).await;
        match done {
            Ok(Ok(a)) if a.installed.is_empty() && a.error.is_none() => {
                log::info!("announce: routes removed from table {}", self.config.table)
            }
            Ok(Ok(a)) => log::warn!(
                "announce: removing the routes from table {} failed ({}); {} left",
                self.config.table,
                a.error.clone().unwrap_or_default(),
                a.installed.len()
            ),
            _ => log::warn!("announce: the routes of table {} were not removed within {STOP_TIMEOUT:?}", self.config.table),
        }
        self.task.abort();
        had
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_vip_is_announced_when_ready_not_withdrawn_and_live() {
        let live: BTreeMap<IpAddr, bool> = [(ip("10.0.0.100"), true), (ip("10.0.0.101"), false)].into();
        let d = decide(&live, None, false);
        assert_eq!(d[&ip("10.0.0.100")], None);
        assert_eq!(d[&ip("10.0.0.101")].as_deref(), Some("no service of this VIP has a master that is up, draining or removing"));
        assert_eq!(wanted(&d), [ip("10.0.0.100")].into());
        // Not ready: nothing, with the reason readiness gives.
        let d = decide(&live, Some("pulling flow state from peers"), false);
        assert!(wanted(&d).is_empty());
        assert_eq!(d[&ip("10.0.0.100")].as_deref(), Some("not ready: pulling flow state from peers"));
        // Withdrawn by the operator wins over everything.
        let d = decide(&live, Some("x"), true);
        assert!(d.values().all(|why| why.as_deref().is_some_and(|w| w.starts_with("withdrawn by the operator"))));
    }

    #[test]
    fn plan_removes_what_is_not_wanted_and_writes_what_is_missing_or_different() {
        let f = |d: &str, len: u8, as_written: bool| Found { destination: ip(d), prefix_len: len, as_written };
        let found = vec![
            f("10.0.0.100", 32, true),
            f("10.0.0.101", 32, true),
            f("10.0.0.0", 24, true),
            f("fd00::100", 128, true),
            f("10.0.0.103", 32, false),
        ];
        let want: BTreeSet<IpAddr> = [ip("10.0.0.100"), ip("10.0.0.102"), ip("10.0.0.103"), ip("fd00::100")].into();
        let p = plan(&found, &want);
        assert_eq!(p.delete, vec![(ip("10.0.0.101"), 32), (ip("10.0.0.0"), 24)]);
        // Missing, and there with other attributes; those as written are left alone.
        assert_eq!(p.replace, vec![ip("10.0.0.102"), ip("10.0.0.103")]);
        // A /32 for an IPv6 address is not a host route of it.
        let p = plan(&[f("fd00::100", 32, true)], &want);
        assert_eq!(p.delete, vec![(ip("fd00::100"), 32)]);
        assert!(p.replace.contains(&ip("fd00::100")));
        // Nothing wanted: everything of ours goes.
        assert_eq!(plan(&found, &BTreeSet::new()).delete.len(), 5);
        assert!(plan(&found, &BTreeSet::new()).replace.is_empty());
    }
}
