//! `mim-lb status --watch`: the status again and again, with per-second rates computed from
//! two successive answers, in the spirit of `watch ipvsadm -Ln --rate`. On a terminal each
//! frame replaces the last; otherwise the frames follow each other, a blank line apart.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    control::{client, protocol::Request},
    status::Status,
};

/// Per-second rates of one service or backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub packets: f64,
    pub bytes: f64,
    pub new_flows: f64,
}

/// Rates by service name, and by (service name, backend address).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    pub services: BTreeMap<String, Rate>,
    pub backends: BTreeMap<(String, IpAddr), Rate>,
}

/// The rates between two answers of the same daemon, over the daemon's own clock (its
/// uptime). None when they cannot be told: not later, or another daemon (a restart). A
/// counter that went down (a service recreated) has no rate.
pub fn rates(before: &Status, after: &Status) -> Option<Rates> {
    let dt = after.uptime_s - before.uptime_s;
    if dt <= 0.0 {
        return None;
    }
    let per = |a: u64, b: u64| b.checked_sub(a).map(|d| d as f64 / dt);
    let rate = |a: (u64, u64, u64), b: (u64, u64, u64)| -> Option<Rate> {
        Some(Rate { packets: per(a.0, b.0)?, bytes: per(a.1, b.1)?, new_flows: per(a.2, b.2)? })
    };
    let mut out = Rates::default();
    for s in &after.services {
        let Some(old) = before.services.iter().find(|o| o.name == s.name) else { continue };
        if let Some(r) = rate((old.packets, old.bytes, old.new_flows), (s.packets, s.bytes, s.new_flows)) {
            out.services.insert(s.name.clone(), r);
        }
        for b in &s.backends {
            let Some(ob) = old.backends.iter().find(|o| o.address == b.address) else { continue };
            if let Some(r) = rate((ob.packets, ob.bytes, ob.new_flows), (b.packets, b.bytes, b.new_flows)) {
                out.backends.insert((s.name.clone(), b.address), r);
            }
        }
    }
    Some(out)
}

/// One frame: a line per service and per backend with state, connections and rates.
pub fn render(status: &Status, rates: Option<&Rates>, every: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mim-lb {} on {}, up {:.0}s; every {}, rates per second over the last interval",
        status.version,
        status.interface,
        status.uptime_s,
        humantime::format_duration(every)
    );
    let _ = writeln!(out, "Prot LocalAddress:Port            State      ActConn InActConn     Pkts/s   NewFlows/s    Bytes/s  Name");
    let _ = writeln!(out, "  -> RemoteAddress");
    let shown = |r: Option<&Rate>, f: fn(&Rate) -> f64| r.map_or("-".to_owned(), |r| format!("{:.1}", f(r)));
    for s in &status.services {
        let r = rates.and_then(|x| x.services.get(&s.name));
        let endpoint = std::net::SocketAddr::new(s.vip, s.port).to_string();
        let _ = writeln!(
            out,
            "{:<4} {:<28} {:<9} {:>8} {:>9} {:>10} {:>12} {:>10}  {}",
            s.protocol.to_uppercase(),
            endpoint,
            "",
            s.backends.iter().map(|b| b.active_connections).sum::<u64>(),
            s.backends.iter().map(|b| b.inactive_connections).sum::<u64>(),
            shown(r, |r| r.packets),
            shown(r, |r| r.new_flows),
            shown(r, |r| r.bytes),
            s.name
        );
        for b in &s.backends {
            let r = rates.and_then(|x| x.backends.get(&(s.name.clone(), b.address)));
            let _ = writeln!(
                out,
                "  -> {:<28} {:<9} {:>8} {:>9} {:>10} {:>12} {:>10}",
                b.address.to_string(),
                b.state,
                b.active_connections,
                b.inactive_connections,
                shown(r, |r| r.packets),
                shown(r, |r| r.new_flows),
                shown(r, |r| r.bytes)
            );
        }
    }
    match &status.connections {
        Some(c) => {
            let _ = writeln!(out, "Connections counted {:.1} s ago (ActConn: seen within {:.0} s)", c.age_s, c.active_window_s);
        }
        None => {
            let _ = writeln!(out, "Connections: not counted yet");
        }
    }
    out
}

/// Asks for the status every `every`, `count` times (forever if None), drawing each frame.
pub fn run(socket: &Path, every: Duration, count: Option<u64>) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut before: Option<Status> = None;
    let mut next = Instant::now();
    let mut drawn = 0u64;
    while count.is_none_or(|n| drawn < n) {
        let response = client::request(socket, &Request::Status)?;
        if !response.ok {
            anyhow::bail!("{}", response.error.unwrap_or_else(|| "the daemon refused without a reason".into()));
        }
        let status = response.status.context("the daemon sent no status")?;
        let frame = render(&status, before.as_ref().and_then(|b| rates(b, &status)).as_ref(), every);
        let mut stdout = std::io::stdout().lock();
        if tty {
            // Home and clear, then the frame: what `watch` does.
            write!(stdout, "\x1b[H\x1b[2J{frame}")?;
        } else {
            if drawn > 0 {
                writeln!(stdout)?;
            }
            write!(stdout, "{frame}")?;
        }
        stdout.flush()?;
        drop(stdout);
        before = Some(status);
        drawn += 1;
        if count.is_some_and(|n| drawn >= n) {
            break;
        }
        next += every;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(())
}

/// `--watch`'s interval: seconds (`2`, `0.5`) or a duration (`500ms`, `1m`).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let every = match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("{text}: the interval must be more than 0")),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("{text}: {e}"))?,
    };
    if every < Duration::from_millis(100) {
        return Err(format!("{text}: the interval must be at least 100ms"));
    }
    Ok(every)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::sample;

    #[test]
    fn rates_are_differences_over_the_daemons_clock() {
        let before = sample();
        let mut after = sample();
        after.uptime_s += 2.0;
        after.services[0].packets += 100;
        after.services[0].new_flows += 4;
        after.services[0].backends[0].packets += 30;
        after.services[0].backends[0].bytes += 2048;
        after.services[0].backends[0].new_flows += 1;
        let r = rates(&before, &after).expect("later");
        assert_eq!(r.services["mim-master"], Rate { packets: 50.0, bytes: 0.0, new_flows: 2.0 });
        let b = r.backends[&("mim-master".to_owned(), "10.0.0.11".parse().unwrap())];
        assert_eq!(b, Rate { packets: 15.0, bytes: 1024.0, new_flows: 0.5 });
        let frame = render(&after, Some(&r), Duration::from_secs(2));
        assert!(frame.contains("      50.0          2.0"), "{frame}");
    }

    #[test]
    fn no_rate_across_a_restart_or_a_recreated_counter() {
        let before = sample();
        let mut restarted = sample();
        restarted.uptime_s = 1.0;
        assert_eq!(rates(&before, &restarted), None);
        let mut recreated = sample();
        recreated.uptime_s += 1.0;
        recreated.services[0].backends[0].packets = 0;
        let r = rates(&before, &recreated).expect("later");
        assert!(r.backends.is_empty() && r.services.contains_key("mim-master"));
        assert!(render(&recreated, Some(&r), Duration::from_secs(1)).contains("  -  "));
    }

    #[test]
    fn intervals_read_as_seconds_or_durations() {
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
