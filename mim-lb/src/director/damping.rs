//! Flap damping, in the spirit of BGP route-flap damping (RFC 2439): a master whose health
//! verdict keeps changing is held down until it has calmed, instead of pulling new connections
//! to itself and tearing them away again every few hundred milliseconds.
//!
//! The penalty is the number of verdict changes within the last `window`: each change adds
//! one, and decays when it leaves the window. A change that takes the penalty above
//! `max_changes` starts a hold (the suppress limit); changes while held still count. The hold
//! ends once it has lasted `hold` and the penalty has fallen to `max_changes / 2` (the reuse
//! limit). Everything here is a pure function of the changes' times, so it is tested with
//! simulated time.

use crate::config::FlapDamping;

/// Why a master is held down: the settings that held it, for the reason shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    /// `CLOCK_MONOTONIC` ns of the change that started it.
    pub since_ns: u64,
    pub max_changes: u32,
    pub window_s: u64,
}

/// One master's recent verdict changes, and its hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flaps {
    /// The latest changes (`CLOCK_MONOTONIC` ns), oldest first: those within the window, at
    /// most `max_changes + 1` (enough to decide both limits).
    changes: Vec<u64>,
    hold: Option<Hold>,
}

fn window_ns(cfg: &FlapDamping) -> u64 {
    u64::try_from(cfg.window.as_nanos()).unwrap_or(u64::MAX)
}

impl Flaps {
    /// The penalty at `now_ns`: changes within the window.
    pub fn penalty(&self, cfg: &FlapDamping, now_ns: u64) -> u32 {
        let window = window_ns(cfg);
        self.changes.iter().filter(|&&c| c.saturating_add(window) > now_ns).count() as u32
    }

    pub fn hold(&self) -> Option<Hold> {
        self.hold
    }

    /// Counts a verdict change at `now_ns`. Returns the hold it starts, if it starts one.
    pub fn record(&mut self, cfg: &FlapDamping, now_ns: u64) -> Option<Hold> {
        if cfg.max_changes == 0 {
            self.changes.clear();
            return None;
        }
        let window = window_ns(cfg);
        self.changes.retain(|&c| c.saturating_add(window) > now_ns);
        self.changes.push(now_ns);
        let keep = cfg.max_changes as usize + 1;
        if self.changes.len() > keep {
            self.changes.drain(..self.changes.len() - keep);
        }
        if self.hold.is_none() && self.changes.len() > cfg.max_changes as usize {
            let hold = Hold { since_ns: now_ns, max_changes: cfg.max_changes, window_s: cfg.window.as_secs() };
            self.hold = Some(hold);
            return Some(hold);
        }
        None
    }

    /// When the hold ends if no change comes meanwhile: once it has lasted `hold` and the
    /// penalty is down to `max_changes / 2`. At once when damping was turned off since.
    pub fn release_at(&self, cfg: &FlapDamping) -> Option<u64> {
        let hold = self.hold?;
        if cfg.max_changes == 0 {
            return Some(hold.since_ns);
        }
        let held_long_enough = hold.since_ns.saturating_add(u64::try_from(cfg.hold.as_nanos()).unwrap_or(u64::MAX));
        let reuse = (cfg.max_changes / 2) as usize;
        // The penalty is `reuse` once every change but the newest `reuse` has left the window.
        let calm = match self.changes.len().checked_sub(reuse + 1) {
            Some(i) => self.changes[i].saturating_add(window_ns(cfg)),
            None => 0,
        };
        Some(held_long_enough.max(calm))
    }

    /// Ends the hold if its time has come. Returns whether it did.
    pub fn release_if_due(&mut self, cfg: &FlapDamping, now_ns: u64) -> bool {
        if self.release_at(cfg).is_some_and(|at| at <= now_ns) {
            self.hold = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    fn cfg(max_changes: u32, window_s: u64, hold_s: u64) -> FlapDamping {
        FlapDamping { max_changes, window: Duration::from_secs(window_s), hold: Duration::from_secs(hold_s) }
    }

    #[test]
    fn defaults_never_hold_a_single_failure_and_recovery() {
        let d = FlapDamping::default();
        let mut f = Flaps::default();
        assert_eq!(f.record(&d, 10 * S), None, "down");
        assert_eq!(f.record(&d, 10 * S + MS), None, "up a millisecond later");
        assert_eq!(f.hold(), None);
        // Even three failures and recoveries in a row (6 changes) are within the default.
        for k in 2..6 {
            assert_eq!(f.record(&d, 10 * S + k * MS), None);
        }
        assert_eq!(f.penalty(&d, 10 * S + 10 * MS), 6);
        assert!(f.record(&d, 10 * S + 10 * MS).is_some(), "the seventh change within a minute holds it");
    }

    #[test]
    fn a_master_flapping_every_300_ms_is_held_until_it_calms() {
        let c = cfg(4, 5, 3);
        let mut f = Flaps::default();
        let mut held_at = None;
        // Flapping for 6 s: a change every 300 ms.
        for k in 0..20u64 {
            let t = 100 * S + k * 300 * MS;
            if let Some(h) = f.record(&c, t) {
                assert!(held_at.is_none(), "one hold, not one per change");
                held_at = Some(h.since_ns);
            }
            assert!(!f.release_if_due(&c, t), "released while flapping at change {k}");
        }
        // The fifth change (1.2 s in) takes the penalty above 4.
        assert_eq!(held_at, Some(100 * S + 1200 * MS));
        let last = 100 * S + 19 * 300 * MS;
        // The penalty falls to 2 when the third-newest change leaves the 5 s window.
        let calm = 100 * S + 17 * 300 * MS + 5 * S;
        assert_eq!(f.release_at(&c), Some(calm));
        assert!(calm > last);
        assert!(!f.release_if_due(&c, calm - 1));
        assert!(f.release_if_due(&c, calm));
        assert_eq!(f.hold(), None);
        assert_eq!(f.penalty(&c, calm), 2);
        // Released with a penalty of 2: it takes three more quick changes to be held again.
        assert_eq!(f.record(&c, calm + MS), None);
        assert_eq!(f.record(&c, calm + 2 * MS), None);
        assert!(f.record(&c, calm + 3 * MS).is_some());
    }

    #[test]
    fn a_hold_lasts_at_least_hold_s() {
        let c = cfg(2, 1, 30);
        let mut f = Flaps::default();
        for k in 0..3 {
            f.record(&c, S + k * MS);
        }
        assert_eq!(f.hold().map(|h| h.since_ns), Some(S + 2 * MS));
        // Calm after about a second, but held for 30 s.
        assert_eq!(f.release_at(&c), Some(31 * S + 2 * MS));
    }

    #[test]
    fn changes_spread_out_beyond_the_window_never_hold() {
        let c = cfg(4, 10, 5);
        let mut f = Flaps::default();
        for k in 0..100u64 {
            assert_eq!(f.record(&c, k * 3 * S), None, "a change every 3 s is 4 per 10 s at most");
        }
        assert!(f.changes.len() <= 5, "memory stays bounded: {}", f.changes.len());
    }

    #[test]
    fn turning_damping_off_releases_and_counts_nothing() {
        let c = cfg(2, 60, 60);
        let mut f = Flaps::default();
        for k in 0..3 {
            f.record(&c, S + k * MS);
        }
        assert!(f.hold().is_some());
        let off = cfg(0, 60, 60);
        assert!(f.release_if_due(&off, S + 3 * MS));
        for k in 0..50 {
            assert_eq!(f.record(&off, 2 * S + k * MS), None);
        }
    }
}
