//! What the director wants the data path to be: every service and backend with what the
//! configuration, the operator, the health checks and the neighbour table say about it, and
//! the one rule that turns that into a backend's state.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use mim_lb_common::{
    ADMIN_DISABLED, ADMIN_DRAINED, ADMIN_ENABLED, BACKEND_STATE_DISABLED, BACKEND_STATE_DOWN,
    BACKEND_STATE_DRAINING, BACKEND_STATE_REMOVING, BACKEND_STATE_UP,
};
use serde::Serialize;

use super::{
    damping::Flaps,
    slow_start::{self, Ramp},
};
use crate::config::{FlapDamping, HealthCheck, Scheduler, ServiceKey};

/// The operator's say over one backend (`mim-lb drain | enable | disable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    #[default]
    Enabled,
    /// No new flows; established flows stay until they end.
    Drained,
    /// Out of service: its flows move to other masters.
    Disabled,
}

impl Admin {
    pub fn code(self) -> u32 {
        match self {
            Admin::Enabled => ADMIN_ENABLED,
            Admin::Drained => ADMIN_DRAINED,
            Admin::Disabled => ADMIN_DISABLED,
        }
    }

    pub fn from_code(code: u32) -> Admin {
        match code {
            ADMIN_DRAINED => Admin::Drained,
            ADMIN_DISABLED => Admin::Disabled,
            _ => Admin::Enabled,
        }
    }
}

/// What a backend does with flows, decided by [`BackendDesire::state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// In the Maglev table: takes new flows and keeps its own.
    Up,
    /// Health check failed or MAC unknown: out of the table, its flows are re-steered.
    Down,
    /// Weight 0 or drained: no new flows, keeps its own.
    Draining,
    /// Disabled by the operator: out of the table, its flows are re-steered.
    Disabled,
    /// Removed from the configuration: no new flows, kept until its flows end.
    Removing,
}

impl State {
    pub fn code(self) -> u32 {
        match self {
            State::Up => BACKEND_STATE_UP,
            State::Down => BACKEND_STATE_DOWN,
            State::Draining => BACKEND_STATE_DRAINING,
            State::Disabled => BACKEND_STATE_DISABLED,
            State::Removing => BACKEND_STATE_REMOVING,
        }
    }

    /// Whether flows recorded on a backend in this state stay on it.
    pub fn keeps_flows(self) -> bool {
        matches!(self, State::Up | State::Draining | State::Removing)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
            State::Disabled => "disabled",
            State::Removing => "removing",
        })
    }
}

/// Everything known about one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendDesire {
    /// Index in `BACKENDS` (never 0).
    pub id: u32,
    pub weight: u32,
    /// The MAC from the configuration, if it gives one.
    pub config_mac: Option<[u8; 6]>,
    /// The MAC the neighbour table gave, for backends configured without one.
    pub resolved_mac: Option<[u8; 6]>,
    /// Why `resolved_mac` is missing, when it is.
    pub mac_problem: Option<String>,
    pub health_up: bool,
    /// The last health transition's cause, e.g. "tcp check failed: connection refused".
    pub health_reason: String,
    pub admin: Admin,
    /// Gone from the configuration; kept (draining) until no live flow uses it.
    pub removing: bool,
    /// In slow start: taking a growing part of its weight (set by each commit).
    pub ramp: Option<Ramp>,
    /// Its recent health verdict changes, and whether flap damping holds it down.
    pub flaps: Flaps,
}

impl BackendDesire {
    /// The MAC frames for this backend are sent to.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.config_mac.or(self.resolved_mac)
    }

    /// The backend's state and, for states other than up, why.
    ///
    /// The operator's disable wins over everything (it is how a master is taken out for
    /// sure); a backend that cannot be reached (no MAC, failed checks) is down even while
    /// removed or drained, because keeping flows on it would only black-hole them.
    pub fn state(&self) -> (State, String) {
        if self.admin == Admin::Disabled {
            return (State::Disabled, "disabled by the operator".into());
        }
        if self.mac().is_none() {
            let why = self.mac_problem.clone().unwrap_or_else(|| "MAC not resolved yet".into());
            return (State::Down, why);
        }
        if let Some(hold) = self.flaps.hold() {
            return (
                State::Down,
                format!(
                    "held down for flapping: its health changed more than {} times within {} s (flap damping); \
                     health now {}",
                    hold.max_changes,
                    hold.window_s,
                    if self.health_up { "up" } else { "down" }
                ),
            );
        }
        if !self.health_up {
            return (State::Down, self.health_reason.clone());
        }
        if self.removing {
            return (State::Removing, "removed from the configuration; kept while its flows last".into());
        }
        if self.admin == Admin::Drained {
            return (State::Draining, "drained by the operator".into());
        }
        if self.weight == 0 {
            return (State::Draining, "weight 0 in the configuration".into());
        }
        (State::Up, String::new())
    }

    /// Share of new flows this backend asks for in the Maglev table, in 1/`slow_start::STEPS`
    /// of a configured weight: its weight while up (the part its slow start allows), else 0.
    pub fn table_weight(&self) -> u32 {
        if self.state().0 == State::Up { slow_start::table_weight(self.weight, self.ramp.map(|r| r.step)) } else { 0 }
    }
}

/// Everything known about one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDesire {
    /// Index of its Maglev regions and counters.
    pub id: u32,
    pub name: String,
    pub scheduler: Scheduler,
    pub table_size: u32,
    pub health: HealthCheck,
    pub slow_start: std::time::Duration,
    pub flap_damping: FlapDamping,
    pub backends: BTreeMap<IpAddr, BackendDesire>,
}

impl ServiceDesire {
    /// Whether any backend other than `except` is up.
    fn others_up(&self, except: &IpAddr) -> bool {
        self.backends.iter().any(|(addr, b)| addr != except && b.state().0 == State::Up)
    }
}

/// Sets every backend's slow start in `next`, which replaces `prev` at `now_ns`.
///
/// A backend starts a slow start when it is up in `next` and was not up in `prev` (after a
/// failure, an enable, or added by a reload) while another master of the service was up: with
/// nobody to share with, a ramp would change nothing (a service's first masters, the first
/// round of checks, a restart over pinned maps all take their full weight at once). A ramp
/// goes on at the step its start time gives, and ends when its time is up or its master is
/// no longer up.
pub fn stamp_slow_starts(prev: &Desired, next: &mut Desired, now_ns: u64) {
    for (key, s) in next.iter_mut() {
        let before = prev.get(key);
        let starting: Vec<IpAddr> = s
            .backends
            .iter()
            .filter(|(addr, b)| {
                b.ramp.is_none()
                    && b.state().0 == State::Up
                    && before.is_some_and(|o| {
                        o.others_up(addr) && o.backends.get(*addr).is_none_or(|ob| ob.state().0 != State::Up)
                    })
            })
            .map(|(addr, _)| *addr)
            .collect();
        let ramp_time = s.slow_start;
        for (addr, b) in s.backends.iter_mut() {
            b.ramp = if b.state().0 != State::Up {
                None
            } else if let Some(r) = b.ramp {
                Ramp::at(r.since_ns, now_ns, ramp_time)
            } else if starting.contains(addr) {
                Ramp::at(now_ns, now_ns, ramp_time)
            } else {
                None
            };
        }
    }
}

/// The earliest time a slow start in `desired` takes its next step (or ends).
pub fn next_ramp_change_ns(desired: &Desired) -> Option<u64> {
    desired
        .values()
        .flat_map(|s| s.backends.values().filter_map(move |b| b.ramp.map(|r| r.next_change_ns(s.slow_start))))
        .min()
}

/// The whole desired state.
pub type Desired = BTreeMap<ServiceKey, ServiceDesire>;

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> BackendDesire {
        BackendDesire {
            id: 1,
            weight: 100,
            config_mac: Some([2, 0, 0, 0, 0, 1]),
            resolved_mac: None,
            mac_problem: None,
            health_up: true,
            health_reason: String::new(),
            admin: Admin::Enabled,
            removing: false,
            ramp: None,
            flaps: Flaps::default(),
        }
    }

    #[test]
    fn states_follow_their_precedence() {
        let b = backend();
        assert_eq!(b.state().0, State::Up);
        assert_eq!(b.table_weight(), 1000, "weight 100 in tenths");

        let drained = BackendDesire { admin: Admin::Drained, ..backend() };
        assert_eq!(drained.state().0, State::Draining);
        assert_eq!(drained.table_weight(), 0);
        assert_eq!(BackendDesire { weight: 0, ..backend() }.state().0, State::Draining);

        let down = BackendDesire { health_up: false, health_reason: "tcp: refused".into(), ..backend() };
        assert_eq!(down.state(), (State::Down, "tcp: refused".into()));
        // Down beats drained and removing: flows on an unreachable master must move.
        assert_eq!(BackendDesire { admin: Admin::Drained, ..down.clone() }.state().0, State::Down);
        assert_eq!(BackendDesire { removing: true, ..down }.state().0, State::Down);

        assert_eq!(BackendDesire { removing: true, ..backend() }.state().0, State::Removing);
        // Disabled beats everything, even an unknown MAC.
        let disabled = BackendDesire { admin: Admin::Disabled, config_mac: None, ..backend() };
        assert_eq!(disabled.state().0, State::Disabled);
    }

    #[test]
    fn a_held_master_is_down_whatever_its_checks_say() {
        let cfg = FlapDamping { max_changes: 2, window: std::time::Duration::from_secs(10), hold: std::time::Duration::from_secs(5) };
        let mut b = backend();
        for k in 0..3 {
            b.flaps.record(&cfg, 1_000 + k);
        }
        let (state, why) = b.state();
        assert_eq!(state, State::Down);
        assert_eq!(why, "held down for flapping: its health changed more than 2 times within 10 s (flap damping); health now up");
        assert_eq!(b.table_weight(), 0);
        // The operator's disable still wins.
        assert_eq!(BackendDesire { admin: Admin::Disabled, ..b.clone() }.state().0, State::Disabled);
        assert!(b.flaps.release_if_due(&cfg, 1_001 + 10_000_000_000), "calm: the second change left the window");
        assert_eq!(b.state().0, State::Up);
    }

    #[test]
    fn a_backend_without_a_mac_is_down_with_the_resolver_reason() {
        let b = BackendDesire { config_mac: None, mac_problem: Some("no ARP reply".into()), ..backend() };
        assert_eq!(b.state(), (State::Down, "no ARP reply".into()));
        let resolved = BackendDesire { resolved_mac: Some([2, 0, 0, 0, 0, 9]), ..b };
        assert_eq!(resolved.state().0, State::Up);
        assert_eq!(resolved.mac(), Some([2, 0, 0, 0, 0, 9]));
    }

    const S: u64 = 1_000_000_000;

    fn service(backends: &[(u8, bool)]) -> ServiceDesire {
        ServiceDesire {
            id: 1,
            name: "web".into(),
            scheduler: Scheduler::Maglev,
            table_size: 251,
            health: HealthCheck::default(),
            slow_start: std::time::Duration::from_secs(10),
            flap_damping: FlapDamping::default(),
            backends: backends
                .iter()
                .map(|(i, up)| {
                    let addr = IpAddr::from([10, 0, 0, *i]);
                    (addr, BackendDesire { id: u32::from(*i), health_up: *up, ..backend() })
                })
                .collect(),
        }
    }

    fn desired(s: ServiceDesire) -> Desired {
        let key: ServiceKey = "10.0.0.100:80/tcp".parse().unwrap();
        Desired::from([(key, s)])
    }

    fn ramps(d: &Desired) -> Vec<Option<u32>> {
        d.values().next().unwrap().backends.values().map(|b| b.ramp.map(|r| r.step)).collect()
    }

    #[test]
    fn a_master_that_returns_ramps_up_in_steps_while_others_serve() {
        let prev = desired(service(&[(1, true), (2, true), (3, false)]));
        let mut next = desired(service(&[(1, true), (2, true), (3, true)]));
        stamp_slow_starts(&prev, &mut next, 100 * S);
        assert_eq!(ramps(&next), vec![None, None, Some(1)]);
        let b3 = next.values().next().unwrap().backends.values().nth(2).unwrap().clone();
        assert_eq!(b3.table_weight(), 100, "1/10 of weight 100, in tenths");
        assert_eq!(next_ramp_change_ns(&next), Some(101 * S));

        // Later commits carry the ramp on by time, not by how many commits there were.
        let mut later = next.clone();
        stamp_slow_starts(&next, &mut later, 105 * S + 1);
        assert_eq!(ramps(&later), vec![None, None, Some(6)]);
        let mut done = later.clone();
        stamp_slow_starts(&later, &mut done, 110 * S);
        assert_eq!(ramps(&done), vec![None, None, None]);
        assert_eq!(next_ramp_change_ns(&done), None);
        assert_eq!(done.values().next().unwrap().backends.values().nth(2).unwrap().table_weight(), 1000);
    }

    #[test]
    fn no_ramp_without_another_master_up_or_without_slow_start() {
        // The first round of checks: everything comes up together.
        let prev = desired(service(&[(1, false), (2, false)]));
        let mut next = desired(service(&[(1, true), (2, true)]));
        stamp_slow_starts(&prev, &mut next, S);
        assert_eq!(ramps(&next), vec![None, None]);
        // A new service, or a restart (nothing before).
        let mut fresh = desired(service(&[(1, true), (2, true)]));
        stamp_slow_starts(&Desired::new(), &mut fresh, S);
        assert_eq!(ramps(&fresh), vec![None, None]);
        // slow_start_s = 0.
        let prev = desired(service(&[(1, true), (2, false)]));
        let mut off = desired(ServiceDesire { slow_start: std::time::Duration::ZERO, ..service(&[(1, true), (2, true)]) });
        stamp_slow_starts(&prev, &mut off, S);
        assert_eq!(ramps(&off), vec![None, None]);
    }

    #[test]
    fn enabled_and_added_masters_ramp_and_a_failure_ends_the_ramp() {
        let mut prev_s = service(&[(1, true), (2, true)]);
        prev_s.backends.values_mut().nth(1).unwrap().admin = Admin::Disabled;
        let prev = desired(prev_s);
        let mut next = desired(service(&[(1, true), (2, true), (3, true)]));
        stamp_slow_starts(&prev, &mut next, S);
        assert_eq!(ramps(&next), vec![None, Some(1), Some(1)], "enabled, and added by a reload");
        let mut failed = next.clone();
        failed.values_mut().next().unwrap().backends.values_mut().nth(1).unwrap().health_up = false;
        stamp_slow_starts(&next, &mut failed, 2 * S);
        assert_eq!(ramps(&failed), vec![None, None, Some(2)]);
    }

    #[test]
    fn only_up_draining_and_removing_keep_flows() {
        assert!(State::Up.keeps_flows());
        assert!(State::Draining.keeps_flows());
        assert!(State::Removing.keeps_flows());
        assert!(!State::Down.keeps_flows());
        assert!(!State::Disabled.keeps_flows());
    }
}
