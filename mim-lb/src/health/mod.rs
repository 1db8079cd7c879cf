//! Health checking: probes each backend (tcp, http or a command) on its own schedule, turns
//! the results into up/down verdicts with rise/fall counting, and reports every result.
//!
//! This module only reports; deciding what a verdict does to the data path is the daemon's job.

pub mod bringup;
mod command;
mod http;
mod probe;
mod rise_fall;
mod runner;
mod tcp;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use log::error;
use tokio::{runtime::Handle, sync::mpsc::Sender};

use crate::config::{CheckKind, HealthCheck, ServiceKey};
use runner::Running;

pub use rise_fall::{RiseFall, Step};

/// One backend of one service to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: ServiceKey,
    pub address: IpAddr,
    /// The service's port; checks connect to `check.port_for(port)`.
    pub port: u16,
    pub check: HealthCheck,
}

impl Target {
    /// The port the checks connect to.
    pub fn check_port(&self) -> u16 {
        self.check.port_for(self.port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Up,
    Down,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Up => "up",
            Verdict::Down => "down",
        })
    }
}

/// The result of one check.
#[derive(Clone, Debug)]
pub struct CheckOutcome {
    pub ok: bool,
    /// From the start of the check to its result (about the timeout when it timed out).
    pub latency: Duration,
    /// What happened, for people: "connected", "HTTP 503 (expected 200)", "timed out after
    /// 500 ms", "exit status 1: <first line of output>".
    pub detail: String,
}

/// One check result of one target, and the verdict it led to.
#[derive(Clone, Debug)]
pub struct Report {
    pub service: ServiceKey,
    pub address: IpAddr,
    /// "tcp", "http" or "command".
    pub check: &'static str,
    pub outcome: CheckOutcome,
    /// The verdict after this result.
    pub verdict: Verdict,
    /// The verdict changed with this result.
    pub transition: bool,
    /// Consecutive results of this kind (successes if `outcome.ok`), this one included.
    pub streak: u32,
    /// The port that was checked (the target's `check_port()`).
    pub port: u16,
}

impl fmt::Display for Report {
    /// `tcp check of 10.0.0.11:7000 for 10.0.0.100:7000/tcp failed: connection refused after
    /// 0.3 ms (3 in a row): down (was up)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} check of {} for {} {}: {} after {} ({} in a row): {}",
            self.check,
            SocketAddr::new(self.address, self.port),
            self.service,
            if self.outcome.ok {
                "succeeded"
            } else {
                "failed"
            },
            self.outcome.detail,
            format_duration(self.outcome.latency),
            self.streak,
            self.verdict,
        )?;
        if self.transition {
            let was = match self.verdict {
                Verdict::Up => Verdict::Down,
                Verdict::Down => Verdict::Up,
            };
            write!(f, " (was {was})")?;
        }
        Ok(())
    }
}

/// Runs the checks of a set of targets, each in a task of its own, and sends a [`Report`] for
/// every result.
pub struct HealthChecker {
    reports: Sender<Report>,
    /// The runtime `new` was called in, for `set_targets` calls made outside of any.
    runtime: Option<Handle>,
    running: HashMap<(ServiceKey, IpAddr), Running>,
}

impl HealthChecker {
    /// Reports go to `reports` (every result, not only transitions: the daemon shows the last
    /// result and latency in its status). A full channel holds the sending target's next check
    /// back until there is room; other targets are unaffected until they need room too.
    pub fn new(reports: Sender<Report>) -> Self {
        HealthChecker {
            reports,
            runtime: Handle::try_current().ok(),
            running: HashMap::new(),
        }
    }

    /// Makes the running set equal to `targets`, keyed by (service, address); of several
    /// entries with one key the last counts. Returns at once: checks run in tasks on the
    /// current tokio runtime (any flavour), or on the one `new` was called in.
    ///
    /// - A new key starts being checked in the given verdict, its first check at a random
    ///   point of its first interval.
    /// - A key whose `Target` is unchanged keeps running undisturbed; the verdict given for it
    ///   is ignored (the checker's own is current).
    /// - A key whose check or port changed is restarted, from the verdict of the last report
    ///   its old checks queued (the verdict given is ignored), with its streak starting again.
    /// - A key no longer listed, or now `CheckKind::None` (the caller treats those as up), is
    ///   stopped.
    ///
    /// Once this returns, no report of a stopped or restarted target's old checks is queued
    /// any more. Reports queued before it returned may still be waiting in the channel; a
    /// receiver can drop those of keys it no longer has. For a restarted target they are
    /// consistent with its new checks: the verdict carried over is that of the last of them.
    /// A check under way in a stopped task is cancelled when the runtime next gets to that
    /// task, which kills a command's whole process group.
    pub fn set_targets(&mut self, targets: Vec<(Target, Verdict)>) {
        let Some(runtime) = Handle::try_current().ok().or_else(|| self.runtime.clone()) else {
            error!("health checks not started: there is no tokio runtime to run them on");
            return;
        };
        let mut wanted: HashMap<(ServiceKey, IpAddr), (Target, Verdict)> = HashMap::new();
        for (target, verdict) in targets {
            if target.check.kind != CheckKind::None {
                wanted.insert((target.service, target.address), (target, verdict));
            }
        }
        let dropped: Vec<_> = self
            .running
            .extract_if(|key, _| !wanted.contains_key(key))
            .collect();
        for (_, running) in dropped {
            running.stop();
        }
        for (key, (target, verdict)) in wanted {
            let verdict = match self.running.remove(&key) {
                Some(running) if running.target == target => {
                    self.running.insert(key, running);
                    continue;
                }
                Some(running) => running.stop(),
                None => verdict,
            };
            if let Some(running) = Running::start(target, verdict, self.reports.clone(), &runtime) {
                self.running.insert(key, running);
            }
        }
    }

    /// Stops everything, with the same promise as `set_targets` about reports. Dropping the
    /// checker does the same.
    pub fn shutdown(&mut self) {
        for (_, running) in self.running.drain() {
            running.stop();
        }
    }
}

/// Durations in log lines: whole milliseconds as such ("500 ms"), short ones with enough
/// digits to tell a loopback answer from a remote one ("0.31 ms", "4.2 ms").
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{} ms", d.as_millis())
    } else if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod format_tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::config::Protocol;

    fn report(ok: bool, verdict: Verdict, transition: bool) -> Report {
        Report {
            service: ServiceKey {
                vip: "10.0.0.100".parse().unwrap(),
                port: 7000,
                protocol: Protocol::Tcp,
            },
            address: "10.0.0.11".parse().unwrap(),
            check: "tcp",
            outcome: CheckOutcome {
                ok,
                latency: Duration::from_micros(300),
                detail: if ok {
                    "connected"
                } else {
                    "connection refused"
                }
                .to_owned(),
            },
            verdict,
            transition,
            streak: 3,
            port: 7000,
        }
    }

    #[test]
    fn a_report_line_says_which_check_what_happened_and_how_long_it_took() {
        assert_eq!(
            report(false, Verdict::Down, true).to_string(),
            "tcp check of 10.0.0.11:7000 for 10.0.0.100:7000/tcp failed: connection refused \
             after 0.30 ms (3 in a row): down (was up)"
        );
        assert_eq!(
            report(true, Verdict::Up, false).to_string(),
            "tcp check of 10.0.0.11:7000 for 10.0.0.100:7000/tcp succeeded: connected after \
             0.30 ms (3 in a row): up"
        );
    }

    #[test]
    fn ipv6_backends_are_bracketed() {
        let mut r = report(true, Verdict::Up, true);
        r.address = IpAddr::V6(Ipv6Addr::LOCALHOST);
        r.port = 8080;
        assert!(
            r.to_string().starts_with("tcp check of [::1]:8080 for "),
            "{r}"
        );
        assert!(r.to_string().ends_with(": up (was down)"), "{r}");
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(Duration::from_millis(500)), "500 ms");
        assert_eq!(format_duration(Duration::ZERO), "0 ms");
        assert_eq!(format_duration(Duration::from_micros(312)), "0.31 ms");
        assert_eq!(format_duration(Duration::from_micros(4_249)), "4.2 ms");
        assert_eq!(format_duration(Duration::from_micros(123_456)), "123 ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2000 ms");
    }

    #[test]
    fn verdicts_serialize_lowercase() {
        assert_eq!(serde_json::to_string(&Verdict::Up).unwrap(), "\"up\"");
        assert_eq!(serde_json::to_string(&Verdict::Down).unwrap(), "\"down\"");
    }
}
