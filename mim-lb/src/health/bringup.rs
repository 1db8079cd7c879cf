//! The first round of health checks after a fresh start, applied as one change.
//!
//! Masters that come up one after another each change the Maglev table, and each change
//! marks the slots it moves with the master they had (`director::marks`). On a director that
//! starts fresh, which master came up first is an accident of check timing, so two directors
//! started side by side would mark different slots with different previous masters, and a
//! flow would go elsewhere through each. Holding the first verdicts until every master has
//! had `rise` checks (or a deadline) makes the first real table the same on every director,
//! with nothing marked. A start over kept pins carries its masters' states over and needs none
//! of this.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::config::ServiceKey;

/// Longest the first round may hold verdicts back.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Verdicts held until the first round of checks is complete.
#[derive(Debug)]
pub struct Bringup {
    pub deadline: Instant,
    /// Checks each master still needs before its first verdict is settled.
    missing: BTreeMap<(ServiceKey, IpAddr), u32>,
    /// The latest verdict of each master that changed: up, and why.
    held: BTreeMap<(ServiceKey, IpAddr), (bool, String)>,
}

impl Bringup {
    /// `targets`: every health-checked master with its `rise` and the time `rise` checks take
    /// (interval × rise + timeout).
    pub fn new(targets: impl IntoIterator<Item = ((ServiceKey, IpAddr), u32, Duration)>, now: Instant) -> Bringup {
        let mut missing = BTreeMap::new();
        let mut longest = Duration::ZERO;
        for (key, rise, takes) in targets {
            missing.insert(key, rise.max(1));
            longest = longest.max(takes);
        }
        Bringup { deadline: now + (longest + Duration::from_secs(1)).min(MAX_WAIT), missing, held: BTreeMap::new() }
    }

    /// A check result: `verdict` is `Some(up)` when it changed the master's verdict.
    pub fn report(&mut self, key: (ServiceKey, IpAddr), verdict: Option<(bool, String)>) {
        if let Some(n) = self.missing.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.missing.remove(&key);
            }
        }
        if let Some(v) = verdict {
            self.held.insert(key, v);
        }
    }

    /// Whether the held verdicts are to be applied now.
    pub fn complete(&self, now: Instant) -> bool {
        self.missing.is_empty() || now >= self.deadline
    }

    /// The verdicts to apply, in one change.
    pub fn into_verdicts(self) -> Vec<(ServiceKey, IpAddr, bool, String)> {
        self.held.into_iter().map(|((s, a), (up, why))| (s, a, up, why)).collect()
    }

    /// Masters still waiting for checks, for the readiness message.
    pub fn waiting(&self) -> usize {
        self.missing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn key(last: u8) -> (ServiceKey, IpAddr) {
        (ServiceKey { vip: "10.0.0.100".parse().unwrap(), port: 7000, protocol: Protocol::Tcp }, IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn verdicts_wait_for_every_master_s_rise_checks_or_the_deadline() {
        let now = Instant::now();
        let mut b = Bringup::new([(key(11), 2, Duration::from_secs(3)), (key(12), 2, Duration::from_secs(5))], now);
        assert_eq!(b.deadline, now + Duration::from_secs(6));
        b.report(key(11), None);
        b.report(key(11), Some((true, "up".into())));
        assert!(!b.complete(now), "master 12 has had no check yet");
        b.report(key(12), None);
        b.report(key(12), None);
        assert!(b.complete(now), "master 12 stayed down after rise checks: settled");
        assert_eq!(b.into_verdicts(), vec![(key(11).0, key(11).1, true, "up".into())]);

        let b = Bringup::new([(key(11), 3, Duration::from_secs(100))], now);
        assert_eq!(b.deadline, now + MAX_WAIT);
        assert!(!b.complete(now + Duration::from_secs(59)));
        assert!(b.complete(now + MAX_WAIT));
        assert!(Bringup::new([], now).complete(now), "no checked master: nothing to wait for");
    }
}
