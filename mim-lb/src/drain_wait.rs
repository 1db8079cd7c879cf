//! `mim-lb drain --wait`: after the drain, polls the daemon's status until the backend holds
//! no active connection, as the connection counts say (`director::held`).
//!
//! "Idle" means: a count whose read of the connection table began at least one active window
//! after the drain shows no active connection on the backend. Every connection that sent a
//! packet within that window is in such a count (recorded, or stamped on its slot), so what is
//! left are connections silent for longer than the window (and inactive records, which are
//! shown but not waited for).

use std::{
    io::{IsTerminal as _, Write as _},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    config::ServiceKey,
    control::{client, protocol::Request},
    status::{BackendStatus, ServiceStatus, Status},
};

/// How often the status is asked for while waiting.
const POLL: Duration = Duration::from_secs(1);

/// What a status says of a drained backend, `since_drain` after the drain was applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// No count yet begun late enough to speak for the time after the drain.
    Counting,
    /// The service's `table_size` or `scheduler` change is not over: connections that follow
    /// the old table are not counted, so none can be said to be gone.
    Resizing,
    /// Still holds active connections (as of `age_s` ago).
    Busy { active: u64, inactive: u64, age_s: f64 },
    /// Holds no active connection.
    Idle { inactive: u64, age_s: f64 },
}

/// Judges a status: pure, so the rule is tested without a daemon. An error when the backend
/// is gone or no longer drained (enabled again: waiting makes no sense any more).
pub fn judge(status: &Status, service: &str, backend: IpAddr, since_drain: Duration) -> Result<Progress, String> {
    let (s, b) = find(status, service, backend).ok_or_else(|| format!("backend {backend} of {service} is no longer configured"))?;
    if b.admin == "enabled" {
        return Err(format!("backend {backend} of {service} was enabled again while waiting for it to drain"));
    }
    if s.resizing {
        return Ok(Progress::Resizing);
    }
    let Some(counts) = &status.connections else { return Ok(Progress::Counting) };
    // The read began `age_s` ago; it must have begun a whole window after the drain.
    let read_after_drain = since_drain.as_secs_f64() - counts.age_s;
    if read_after_drain < counts.active_window_s {
        return Ok(Progress::Counting);
    }
    let (active, inactive, age_s) = (b.active_connections, b.inactive_connections, counts.age_s);
    Ok(if active == 0 { Progress::Idle { inactive, age_s } } else { Progress::Busy { active, inactive, age_s } })
}

/// The service named `service` (by name, `VIP:PORT`, `VIP:PORT/udp` or `[IPv6]:PORT`, as the
/// daemon reads it) and its backend `backend`.
pub fn find<'a>(status: &'a Status, service: &str, backend: IpAddr) -> Option<(&'a ServiceStatus, &'a BackendStatus)> {
    let by_name = status.services.iter().find(|s| s.name == service);
    let by_key = || {
        let key: ServiceKey = service.parse().ok()?;
        let same = |s: &&ServiceStatus, protocol: &str| s.vip == key.vip && s.port == key.port && s.protocol == protocol;
        let protocol = key.protocol.to_string();
        status
            .services
            .iter()
            .find(|s| same(s, &protocol))
            .or_else(|| if service.contains('/') { None } else { status.services.iter().find(|s| same(s, "udp")) })
    };
    let s = by_name.or_else(by_key)?;
    s.backends.iter().find(|b| b.address == backend).map(|b| (s, b))
}

/// Shows the progress on a terminal (one line, redrawn) or as plain lines (one per change).
struct Shown {
    tty: bool,
    last: Option<String>,
}

impl Shown {
    fn show(&mut self, line: String) {
        if self.tty {
            eprint!("\r\x1b[K{line}");
            let _ = std::io::stderr().flush();
        } else if self.last.as_deref() != Some(line.as_str()) {
            println!("{line}");
        }
        self.last = Some(line);
    }

    fn end(&self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}

/// Waits until the backend is idle or `timeout` passed (an error: the backend stays drained).
/// `drained_at` is when the daemon's answer to the drain arrived.
pub fn wait(socket: &Path, service: &str, backend: IpAddr, drained_at: Instant, timeout: Option<Duration>) -> anyhow::Result<()> {
    let mut shown = Shown { tty: std::io::stderr().is_terminal(), last: None };
    let waited = |now: Instant| now.duration_since(drained_at);
    loop {
        let response = client::request(socket, &Request::Status)?;
        let Some(status) = response.status.filter(|_| response.ok) else {
            shown.end();
            bail!("{}", response.error.unwrap_or_else(|| "the daemon sent no status".into()));
        };
        let now = Instant::now();
        let progress = match judge(&status, service, backend, waited(now)) {
            Ok(p) => p,
            Err(why) => {
                shown.end();
                bail!("{why}");
            }
        };
        let plain = |p: &Progress| match p {
            Progress::Counting => format!("waiting for {backend} of {service}: counting its connections"),
            Progress::Resizing => format!("waiting for {backend} of {service}: the service's table change is not over (resizing)"),
            Progress::Busy { active, inactive, age_s } => format!(
                "waiting for {backend} of {service}: {active} active, {inactive} inactive connections (counted {age_s:.1} s ago), {:.0} s so far",
                waited(now).as_secs_f64()
            ),
            Progress::Idle { .. } => String::new(),
        };
        if let Progress::Idle { inactive, age_s } = progress {
            shown.end();
            println!(
                "backend {backend} of {service} holds no active connection (counted {age_s:.1} s ago; {inactive} inactive records); drained after {:.0} s",
                waited(now).as_secs_f64()
            );
            return Ok(());
        }
        if let Some(limit) = timeout
            && waited(now) >= limit
        {
            shown.end();
            let what = match progress {
                Progress::Busy { active, inactive, .. } => format!("still holds {active} active and {inactive} inactive connections"),
                _ => "had no connection count recent enough".to_owned(),
            };
            bail!(
                "timed out after {}: backend {backend} of {service} {what}; it stays drained",
                humantime::format_duration(Duration::from_secs(limit.as_secs()))
            );
        }
        shown.show(plain(&progress));
        let left = timeout.map_or(POLL, |limit| limit.saturating_sub(waited(Instant::now())));
        std::thread::sleep(POLL.min(left).max(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ConnectionCounts, sample};

    fn drained(active: u64, age_s: f64) -> Status {
        let mut status = sample();
        let b = &mut status.services[0].backends[0];
        b.admin = "drained".into();
        b.active_connections = active;
        b.inactive_connections = 1;
        status.connections = Some(ConnectionCounts { age_s, active_window_s: 5.0 });
        status
    }

    const B: &str = "10.0.0.11";

    #[test]
    fn only_a_count_begun_a_window_after_the_drain_decides() {
        let b: IpAddr = B.parse().unwrap();
        // Read 1 s ago, 3 s after the drain: a connection may not have shown itself yet.
        assert_eq!(judge(&drained(0, 1.0), "mim-master", b, Duration::from_secs(4)), Ok(Progress::Counting));
        // Read 1 s ago, 6 s after the drain.
        assert_eq!(
            judge(&drained(0, 1.0), "mim-master", b, Duration::from_secs(7)),
            Ok(Progress::Idle { inactive: 1, age_s: 1.0 })
        );
        assert_eq!(
            judge(&drained(2, 1.0), "10.0.0.100:7000", b, Duration::from_secs(7)),
            Ok(Progress::Busy { active: 2, inactive: 1, age_s: 1.0 })
        );
        let mut uncounted = drained(0, 1.0);
        uncounted.connections = None;
        assert_eq!(judge(&uncounted, "mim-master", b, Duration::from_secs(60)), Ok(Progress::Counting));
    }

    #[test]
    fn a_resizing_service_is_not_idle() {
        let mut status = drained(0, 1.0);
        status.services[0].resizing = true;
        assert_eq!(judge(&status, "mim-master", B.parse().unwrap(), Duration::from_secs(60)), Ok(Progress::Resizing));
    }

    #[test]
    fn an_enabled_or_unknown_backend_ends_the_wait() {
        let mut status = drained(0, 0.5);
        status.services[0].backends[0].admin = "enabled".into();
        let err = judge(&status, "mim-master", B.parse().unwrap(), Duration::from_secs(9)).unwrap_err();
        assert!(err.contains("enabled again"), "{err}");
        let err = judge(&drained(0, 0.5), "mim-master", "10.0.0.99".parse().unwrap(), Duration::from_secs(9)).unwrap_err();
        assert!(err.contains("no longer configured"), "{err}");
        assert!(judge(&drained(0, 0.5), "10.0.0.100:7000/udp", B.parse().unwrap(), Duration::from_secs(9)).is_err());
    }
}
