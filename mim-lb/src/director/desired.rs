//! What the director wants the data path to be: every service and backend with what the
//! configuration, the operator, the health checks and the neighbour table say about it, and
//! the one rule that turns that into a backend's state.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use mim_lb_common::{
    ADMIN_DISABLED, ADMIN_DRAINED, ADMIN_ENABLED, BACKEND_STATE_DISABLED, BACKEND_STATE_DOWN,
    BACKEND_STATE_DRAINING, BACKEND_STATE_REMOVING, BACKEND_STATE_UP,
};
use serde::Serialize;

use crate::config::{HealthCheck, Scheduler, ServiceKey};

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

    /// Share of new flows this backend asks for in the Maglev table.
    pub fn table_weight(&self) -> u32 {
        if self.state().0 == State::Up { self.weight } else { 0 }
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
    pub backends: BTreeMap<IpAddr, BackendDesire>,
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
        }
    }

    #[test]
    fn states_follow_their_precedence() {
        let b = backend();
        assert_eq!(b.state().0, State::Up);
        assert_eq!(b.table_weight(), 100);

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
    fn a_backend_without_a_mac_is_down_with_the_resolver_reason() {
        let b = BackendDesire { config_mac: None, mac_problem: Some("no ARP reply".into()), ..backend() };
        assert_eq!(b.state(), (State::Down, "no ARP reply".into()));
        let resolved = BackendDesire { resolved_mac: Some([2, 0, 0, 0, 0, 9]), ..b };
        assert_eq!(resolved.state().0, State::Up);
        assert_eq!(resolved.mac(), Some([2, 0, 0, 0, 0, 9]));
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
