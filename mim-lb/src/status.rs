//! The status view: what `mim-lb status` shows and `--json` prints, and what the metrics
//! endpoint exposes. The JSON field names are a stable interface (see OPERATIONS.md), pinned
//! by tests/golden/status.json (tests/tests/stable_interfaces.rs): a renamed field keeps its
//! old name readable with `#[serde(alias = "...")]`, since the CLI reads the daemon's answer
//! into these types and the two may be of different versions during an upgrade.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, time::Duration};

use mim_lb_common::{MAGLEV_BACKEND_MASK, reason};
use serde::{Deserialize, Serialize};

use crate::{
    config::{ServiceKey, format_mac},
    director::{
        Director,
        slow_start::{self, Ramp},
        held::{ACTIVE_WINDOW, Held, HeldCounts},
    },
};

/// Everything `mim-lb status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub interface: String,
    /// `native` or `generic`.
    pub xdp_mode: String,
    pub pin_dir: String,
    pub uptime_s: f64,
    pub services: Vec<ServiceStatus>,
    /// Every packet the program saw, by the reason for its verdict.
    pub reasons: Vec<ReasonCount>,
    /// Flow sync with peer directors (absent without `[sync]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// The VIPs' routes for the routing daemon (absent without `[announce]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceStatus>,
    /// How fresh the backends' `active_connections` and `inactive_connections` are (absent
    /// until the first read of the connection table, a second or so after the start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionCounts>,
}

/// The read of the connection table the connection counts come from (`director::held`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionCounts {
    /// Seconds since the read began: the counts speak for that moment.
    pub age_s: f64,
    /// A TCP connection counts as active when it was seen within this many seconds (give or
    /// take the data path's one-second refresh).
    pub active_window_s: f64,
}

/// This director's flow sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub listen: String,
    /// Whether this director may carry the VIP (what `mim-lb ready` answers).
    pub ready: bool,
    pub peers: Vec<PeerStatus>,
    /// Datagrams from addresses that are not peers.
    pub unknown_peer: u64,
    /// Data-path events lost because the ring was full (repaired by the next refresh).
    pub events_lost: u64,
    /// The multicast group changes go to (`[sync] group`); absent: to each peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Datagrams of changes sent to the group.
    #[serde(default)]
    pub group_sent: u64,
}

/// The routes this director keeps for its routing daemon to announce (`[announce]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The kernel table the routes are in.
    pub table: u32,
    /// Their route protocol number.
    pub protocol: u8,
    /// At least one VIP's route is in the table.
    pub announcing: bool,
    /// The operator withdrew this director (`mim-lb withdraw`).
    pub withdrawn: bool,
    /// One per VIP of the configuration, sorted.
    pub vips: Vec<AnnouncedVip>,
    /// The last failure to write the table, until a write succeeds; empty when none.
    pub error: String,
}

/// One VIP and whether its route is in the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnouncedVip {
    pub vip: String,
    pub announced: bool,
    /// Why it is not announced (empty when it is).
    pub reason: String,
}

/// One peer director, as this one sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub address: String,
    /// `up` (heard within 2 s), `down`, or `never heard`.
    pub state: String,
    pub last_heard_s: Option<f64>,
    /// The peer says it is ready.
    pub ready: bool,
    /// Every service's table digest equals this director's (None: not heard yet).
    pub tables_agree: Option<bool>,
    /// This director's pull of the peer's state: `done`, `pulling`, `gave up`, or `none`.
    pub pull: String,
    /// State datagrams sent and not yet acknowledged, or waiting to be sent.
    pub in_flight: usize,
    /// From a flow's record in the data path here to its acknowledgement by the peer.
    pub lag_ms_last: Option<f64>,
    pub lag_ms_max: Option<f64>,
    pub sent: u64,
    pub received: u64,
    pub resent: u64,
    pub lost: u64,
    pub bad_auth: u64,
    pub malformed: u64,
    pub replayed: u64,
    /// Changes it sent to the group that did not arrive here, noticed by a gap in their
    /// numbers; `missing` of them are still asked for (NACKs sent: `nacks`).
    #[serde(default)]
    pub missed: u64,
    #[serde(default)]
    pub missing: usize,
    #[serde(default)]
    pub nacks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `maglev` or `maglev-source`.
    pub scheduler: String,
    pub table_size: u32,
    /// `tcp`, `http`, `command` or `none`.
    pub health_check: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Slots of the live table marked changed: flows begun before their master changed may
    /// still be on their first master there (OPERATIONS.md, "The flow table").
    #[serde(default)]
    pub changed_slots: usize,
    /// A change of `table_size` or `scheduler` is not over: some connections still follow
    /// the table from before it, and the next such change is refused until it is.
    #[serde(default)]
    pub resizing: bool,
    /// A digest of the live table's decisions (each slot's master, by address; the size and
    /// hash): equal on two directors that send every new connection to the same master.
    #[serde(default)]
    pub table_digest: String,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    /// `None` while unresolved.
    pub mac: Option<String>,
    /// `config` or `neighbour`.
    pub mac_source: String,
    pub weight: u32,
    /// `up`, `down`, `draining`, `disabled` or `removing`.
    pub state: String,
    /// Why the state is not `up` (empty when it is).
    pub reason: String,
    /// `enabled`, `drained` or `disabled`: the operator's last command.
    pub admin: String,
    /// `up` or `down`: the health checks' verdict.
    pub health: String,
    /// Maglev slots owned: the share of new flows is `slots / table_size`.
    pub slots: u32,
    pub last_check: Option<CheckStatus>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// The master's slow start, while it is in one (`null` otherwise).
    #[serde(default)]
    pub slow_start: Option<SlowStartStatus>,
    /// Changes of its health verdict within the service's `flap_damping.window_s`: its flap
    /// damping penalty.
    #[serde(default)]
    pub health_changes: u32,
    /// Its flap damping hold, while it is held down (`null` otherwise).
    #[serde(default)]
    pub held_down: Option<HeldDownStatus>,
    /// Connections held now, as of `connections.age_s` ago: TCP connections that sent a
    /// packet within the active window (the data path's sketch, an estimate), and UDP flows
    /// not expired.
    #[serde(default)]
    pub active_connections: u64,
    /// Recorded TCP flows idle for longer than the active window but not yet expired.
    #[serde(default)]
    pub inactive_connections: u64,
}

/// A master held down by flap damping (OPERATIONS.md, "Flap damping").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldDownStatus {
    /// The limit its health changes went above, within `window_s`.
    pub max_changes: u32,
    pub window_s: u64,
    /// Seconds since the hold began.
    pub held_for_s: f64,
    /// Seconds until it is released if its health stops changing now.
    pub release_in_s: f64,
}

/// Where a master is in its slow start (OPERATIONS.md, "Slow start").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowStartStatus {
    /// 1..=steps: the master asks for step/steps of its weight.
    pub step: u32,
    pub steps: u32,
    /// The weight the table is built with now: weight × step / steps.
    pub table_weight: f64,
    /// Seconds until the next step (the end, at the last one).
    pub next_step_in_s: f64,
    /// Seconds until the slow start is over.
    pub full_in_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    pub ok: bool,
    pub detail: String,
    pub latency_ms: f64,
    /// Seconds since the check ended.
    pub age_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub code: u32,
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The answer of `mim-lb simulate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Simulation {
    pub flow: String,
    /// `XDP_TX`, `XDP_PASS` or `XDP_DROP`.
    pub verdict: String,
    /// The reason code's name (`forwarded`, `no_backend`, ...).
    pub reason: String,
    pub service: Option<String>,
    /// The master the flow reaches now, when forwarded: the one its record names if the
    /// connection table has one, else the one a new connection reaches.
    pub backend: Option<IpAddr>,
    pub mac: Option<String>,
    /// The master a new connection from the same address and port reaches (a TCP SYN always
    /// follows the current table).
    #[serde(default)]
    pub new_backend: Option<IpAddr>,
    /// The master the packets of an established connection with these addresses and ports
    /// reach: differs from `new_backend` for a recorded flow, and for an unrecorded one that
    /// began before its slot changed master.
    #[serde(default)]
    pub established_backend: Option<IpAddr>,
    /// The master an ICMP error about the flow's answers ("fragmentation needed" or "packet
    /// too big" from a router, addressed to the VIP) is relayed to: the master the flow's
    /// packets go to now.
    #[serde(default)]
    pub icmp_error_backend: Option<IpAddr>,
}

/// The daemon's facts that the director does not hold.
pub struct DaemonFacts<'a> {
    pub interface: &'a str,
    pub xdp_mode: String,
    pub pin_dir: String,
    pub uptime: Duration,
    /// The last health check result of each backend.
    pub checks: &'a BTreeMap<(ServiceKey, IpAddr), CheckStatus>,
    /// The last connection counts, with their age.
    pub held: Option<(Duration, &'a HeldCounts)>,
}

/// Collects the status from the director's state and the data path's counters.
pub fn collect(director: &Director, facts: &DaemonFacts) -> Result<Status, crate::dataplane::DataplaneError> {
    let maps = director.dataplane().maps_ro();
    let now_ns = crate::director::monotonic_ns();
    let mut services = Vec::new();
    for (key, s) in director.desired() {
        let written = director.written().get(key);
        let table = written.map(|w| w.table()).unwrap_or(&[]);
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for e in table {
            *slots.entry(e & MAGLEV_BACKEND_MASK).or_default() += 1;
        }
        let stats = maps.service_stats(s.id)?;
        let mut backends = Vec::new();
        for (addr, b) in &s.backends {
            let (state, why) = b.state();
            let bstats = maps.backend_stats(b.id)?;
            let held = facts.held.and_then(|(_, h)| h.by_backend.get(&b.id)).copied().unwrap_or(Held::default());
            backends.push(BackendStatus {
                address: *addr,
                mac: b.mac().as_ref().map(format_mac),
                mac_source: if b.config_mac.is_some() { "config" } else { "neighbour" }.into(),
                weight: b.weight,
                state: state.to_string(),
                reason: why,
                admin: serde_plain(&b.admin),
                health: if b.health_up { "up" } else { "down" }.into(),
                slots: slots.get(&b.id).copied().unwrap_or(0),
                last_check: facts.checks.get(&(*key, *addr)).cloned(),
                packets: bstats.packets,
                bytes: bstats.bytes,
                new_flows: bstats.new_flows,
                slow_start: b.ramp.map(|r| slow_start_status(b.weight, r, s.slow_start, now_ns)),
                health_changes: b.flaps.penalty(&s.flap_damping, now_ns),
                held_down: b.flaps.hold().map(|h| HeldDownStatus {
                    max_changes: h.max_changes,
                    window_s: h.window_s,
                    held_for_s: now_ns.saturating_sub(h.since_ns) as f64 / 1e9,
                    release_in_s: b.flaps.release_at(&s.flap_damping).map_or(0.0, |at| at.saturating_sub(now_ns) as f64 / 1e9),
                }),
                active_connections: held.active,
                inactive_connections: held.inactive,
            });
        }
        services.push(ServiceStatus {
            name: s.name.clone(),
            vip: key.vip,
            port: key.port,
            protocol: key.protocol.to_string(),
            scheduler: s.scheduler.to_string(),
            table_size: s.table_size,
            health_check: s.health.kind.name().into(),
            packets: stats.packets,
            bytes: stats.bytes,
            new_flows: stats.new_flows,
            changed_slots: written.map_or(0, |w| w.marked()),
            resizing: written.is_some_and(|w| w.resized()),
            table_digest: written.map(|w| w.digest().to_owned()).unwrap_or_default(),
            backends,
        });
    }
    let counters = maps.reason_counters()?;
    let reasons = reason::ALL
        .iter()
        .map(|(code, name)| ReasonCount {
            code: *code,
            name: (*name).into(),
            packets: counters[*code as usize].packets,
            bytes: counters[*code as usize].bytes,
        })
        .collect();
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        interface: facts.interface.into(),
        xdp_mode: facts.xdp_mode.clone(),
        pin_dir: facts.pin_dir.clone(),
        uptime_s: facts.uptime.as_secs_f64(),
        services,
        reasons,
        sync: None,
        announce: None,
        connections: facts
            .held
            .map(|(age, _)| ConnectionCounts { age_s: age.as_secs_f64(), active_window_s: ACTIVE_WINDOW.as_secs_f64() }),
    })
}

/// `slow start: step 3/10, weight 30 of 100; next step in 0.4 s, full weight in 7.4 s`.
fn render_slow_start(ss: &SlowStartStatus, weight: u32) -> String {
    let next = if ss.step < ss.steps { format!("next step in {:.1} s, ", ss.next_step_in_s) } else { String::new() };
    format!(
        "slow start: step {}/{}, weight {} of {weight}; {next}full weight in {:.1} s",
        ss.step, ss.steps, ss.table_weight, ss.full_in_s
    )
}

fn slow_start_status(weight: u32, ramp: Ramp, slow_start: Duration, now_ns: u64) -> SlowStartStatus {
    let until = |at_ns: u64| at_ns.saturating_sub(now_ns) as f64 / 1e9;
    SlowStartStatus {
        step: ramp.step,
        steps: slow_start::STEPS,
        table_weight: f64::from(weight) * f64::from(ramp.step) / f64::from(slow_start::STEPS),
        next_step_in_s: until(ramp.next_change_ns(slow_start)),
        full_in_s: until(ramp.since_ns.saturating_add(slow_start.as_nanos() as u64)),
    }
}

fn serde_plain<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The human view, in the spirit of `ipvsadm -Ln --stats`: one line per service, one per
/// backend under it, then the verdict counters that are not zero.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mim-lb {} on {} ({} XDP), up {}",
        status.version,
        status.interface,
        status.xdp_mode,
        human_duration(status.uptime_s)
    );
    let _ = writeln!(
        out,
        "Prot LocalAddress:Port            Scheduler      Check   NewFlows    Packets      Bytes  Name (table digest)"
    );
    let _ = writeln!(
        out,
        "  -> RemoteAddress                State     Weight   Share ActConn InActConn   NewFlows    Packets      Bytes  MAC                Last check"
    );
    for s in &status.services {
        let endpoint = std::net::SocketAddr::new(s.vip, s.port).to_string();
        let _ = writeln!(
            out,
            "{:<4} {:<28} {:<14} {:<7} {:>8} {:>10} {:>10}  {} ({})",
            s.protocol.to_uppercase(),
            endpoint,
            s.scheduler,
            s.health_check,
            s.new_flows,
            s.packets,
            human_bytes(s.bytes),
            s.name,
            s.table_digest
        );
        if s.changed_slots > 0 || s.resizing {
            let _ = writeln!(
                out,
                "     {} slots changed master recently; flows begun before keep their first master{}",
                s.changed_slots,
                if s.resizing { "; resizing (table_size or scheduler cannot change again yet)" } else { "" }
            );
        }
        for b in &s.backends {
            let share = if s.table_size > 0 { 100.0 * f64::from(b.slots) / f64::from(s.table_size) } else { 0.0 };
            let check = match &b.last_check {
                None => "-".to_owned(),
                Some(c) => format!(
                    "{} {} ({:.1} ms, {:.0} s ago)",
                    if c.ok { "ok" } else { "FAIL" },
                    c.detail,
                    c.latency_ms,
                    c.age_s
                ),
            };
            let _ = writeln!(
                out,
                "  -> {:<28} {:<9} {:>6} {:>6.1}% {:>7} {:>9} {:>10} {:>10} {:>10}  {:<18} {}",
                b.address.to_string(),
                b.state,
                b.weight,
                share,
                b.active_connections,
                b.inactive_connections,
                b.new_flows,
                b.packets,
                human_bytes(b.bytes),
                b.mac.as_deref().unwrap_or("(unresolved)"),
                check
            );
            if !b.reason.is_empty() && b.state != "up" {
                let _ = writeln!(out, "       {}: {}", b.state, b.reason);
            }
            if let Some(ss) = &b.slow_start {
                let _ = writeln!(out, "       {}", render_slow_start(ss, b.weight));
            }
            if let Some(h) = &b.held_down {
                let _ = writeln!(
                    out,
                    "       held down {:.1} s so far; released in {:.1} s if its health stops changing ({} changes within {} s now)",
                    h.held_for_s, h.release_in_s, b.health_changes, h.window_s
                );
            }
        }
    }
    let counted: Vec<String> = status
        .reasons
        .iter()
        .filter(|r| r.packets > 0)
        .map(|r| format!("{} {}", r.name, r.packets))
        .collect();
    let _ = writeln!(
        out,
        "Verdicts (packets): {}",
        if counted.is_empty() { "none yet".to_owned() } else { counted.join(", ") }
    );
    let _ = writeln!(out, "{}", connections_line(status.connections.as_ref()));
    if let Some(sync) = &status.sync {
        render_sync(&mut out, sync);
    }
    if let Some(announce) = &status.announce {
        render_announce(&mut out, announce);
    }
    out
}

fn render_announce(out: &mut String, a: &AnnounceStatus) {
    let announced: Vec<&str> = a.vips.iter().filter(|v| v.announced).map(|v| v.vip.as_str()).collect();
    let head = if a.withdrawn {
        "WITHDRAWN by the operator".to_owned()
    } else if announced.is_empty() {
        "NOT ANNOUNCING".to_owned()
    } else {
        format!("announcing {}", announced.join(", "))
    };
    let _ = writeln!(out, "Announce (table {}, protocol {}): {head}", a.table, a.protocol);
    for v in a.vips.iter().filter(|v| !v.announced) {
        let _ = writeln!(out, "  {} not announced: {}", v.vip, v.reason);
    }
    if !a.error.is_empty() {
        let _ = writeln!(out, "  error: {}", a.error);
    }
}

/// How fresh and how exact ActConn and InActConn are.
fn connections_line(counts: Option<&ConnectionCounts>) -> String {
    match counts {
        None => "Connections: not counted yet (the first read of the connection table is under way)".to_owned(),
        Some(c) => format!(
            "Connections counted {:.1} s ago (ActConn: seen within {:.0} s; recorded flows and changed slots only, see OPERATIONS.md)",
            c.age_s, c.active_window_s
        ),
    }
}

fn render_sync(out: &mut String, sync: &SyncStatus) {
    let _ = writeln!(out, "Flow sync on {}: {}", sync.listen, if sync.ready { "ready" } else { "NOT READY (pulling peers' state)" });
    for p in &sync.peers {
        let agree = match p.tables_agree {
            Some(true) => "tables agree",
            Some(false) => "TABLES DIFFER",
            None => "tables unknown",
        };
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
        let _ = writeln!(
            out,
            "  peer {:<28} {:<10} {}, pull {}, in flight {}, lag {} (max {}), sent {} resent {} lost {}, refused {}{}",
            p.address,
            p.state,
            agree,
            p.pull,
            p.in_flight,
            ms(p.lag_ms_last),
            ms(p.lag_ms_max),
            p.sent,
            p.resent,
            p.lost,
            p.bad_auth + p.malformed + p.replayed,
            if sync.group.is_some() { format!(", missed {} (asking for {})", p.missed, p.missing) } else { String::new() }
        );
    }
    if let Some(group) = &sync.group {
        let _ = writeln!(out, "  group {group}: sent {}", sync.group_sent);
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes}B") } else { format!("{value:.1}{}", UNITS[unit]) }
}

fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// One service with one backend that is down for want of a MAC, for tests of the views.
#[cfg(test)]
pub(crate) fn sample() -> Status {
    Status {
        version: "0.1.0".into(),
        interface: "eth0".into(),
        xdp_mode: "native".into(),
        pin_dir: "/sys/fs/bpf/mim-lb".into(),
        uptime_s: 61.0,
        services: vec![ServiceStatus {
            name: "mim-master".into(),
            vip: "10.0.0.100".parse().expect("an address"),
            port: 7000,
            protocol: "tcp".into(),
            scheduler: "maglev".into(),
            table_size: 65_537,
            health_check: "tcp".into(),
            packets: 10,
            bytes: 2048,
            new_flows: 3,
            changed_slots: 0,
            resizing: false,
            table_digest: "0123456789abcdef".into(),
            backends: vec![BackendStatus {
                address: "10.0.0.11".parse().expect("an address"),
                mac: None,
                mac_source: "neighbour".into(),
                weight: 100,
                state: "down".into(),
                reason: "no ARP reply".into(),
                admin: "enabled".into(),
                health: "up".into(),
                slots: 0,
                last_check: Some(CheckStatus { ok: true, detail: "connected".into(), latency_ms: 1.5, age_s: 1.0 }),
                packets: 7,
                bytes: 448,
                new_flows: 1,
                slow_start: None,
                health_changes: 0,
                held_down: None,
                active_connections: 2,
                inactive_connections: 1,
            }],
        }],
        reasons: vec![ReasonCount { code: 0, name: "forwarded".into(), packets: 10, bytes: 2048 }],
        sync: None,
        announce: None,
        connections: Some(ConnectionCounts { age_s: 0.5, active_window_s: 5.0 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_naturally() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0G");
        assert_eq!(human_duration(59.9), "59s");
        assert_eq!(human_duration(3725.0), "1h2m");
        assert_eq!(human_duration(90_000.0), "1d1h");
    }

    #[test]
    fn render_shows_what_is_announced_and_why_not() {
        let mut s = sample();
        s.announce = Some(AnnounceStatus {
            table: 100,
            protocol: 250,
            announcing: true,
            withdrawn: false,
            vips: vec![
                AnnouncedVip { vip: "10.0.0.100".into(), announced: true, reason: String::new() },
                AnnouncedVip { vip: "10.0.0.101".into(), announced: false, reason: "no service of this VIP has a master that is up, draining or removing".into() },
            ],
            error: String::new(),
        });
        let text = render(&s);
        assert!(text.contains("Announce (table 100, protocol 250): announcing 10.0.0.100\n"), "{text}");
        assert!(text.contains("  10.0.0.101 not announced: no service of this VIP has a master"), "{text}");
        let a = s.announce.as_mut().unwrap();
        a.withdrawn = true;
        a.announcing = false;
        a.vips[0].announced = false;
        a.error = "writing the route of 10.0.0.100 to table 100: Permission denied".into();
        let text = render(&s);
        assert!(text.contains("Announce (table 100, protocol 250): WITHDRAWN by the operator\n"), "{text}");
        assert!(text.contains("  error: writing the route"), "{text}");
    }

    #[test]
    fn render_shows_states_reasons_and_counters() {
        let status = sample();
        let text = render(&status);
        assert!(text.contains("TCP  10.0.0.100:7000"), "{text}");
        assert!(text.contains("(unresolved)"), "{text}");
        assert!(text.contains("down: no ARP reply"), "{text}");
        assert!(text.contains("Verdicts (packets): forwarded 10"), "{text}");
        assert!(text.contains("(0123456789abcdef)"), "the table digest is shown: {text}");
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), status);
    }

    #[test]
    fn render_shows_a_hold_and_when_it_ends() {
        let mut status = sample();
        let b = &mut status.services[0].backends[0];
        b.reason = "held down for flapping: its health changed more than 4 times within 5 s (flap damping); health now up".into();
        b.health_changes = 7;
        b.held_down = Some(HeldDownStatus { max_changes: 4, window_s: 5, held_for_s: 2.04, release_in_s: 4.96 });
        let text = render(&status);
        assert!(text.contains("down: held down for flapping: its health changed more than 4 times within 5 s"), "{text}");
        assert!(text.contains("held down 2.0 s so far; released in 5.0 s if its health stops changing (7 changes within 5 s now)"), "{text}");
    }

    #[test]
    fn render_shows_a_slow_start_schedule() {
        let mut status = sample();
        let b = &mut status.services[0].backends[0];
        b.state = "up".into();
        b.slow_start = Some(SlowStartStatus { step: 3, steps: 10, table_weight: 30.0, next_step_in_s: 0.44, full_in_s: 7.44 });
        let text = render(&status);
        assert!(text.contains("slow start: step 3/10, weight 30 of 100; next step in 0.4 s, full weight in 7.4 s"), "{text}");
        status.services[0].backends[0].slow_start =
            Some(SlowStartStatus { step: 10, steps: 10, table_weight: 100.0, next_step_in_s: 0.5, full_in_s: 0.5 });
        let text = render(&status);
        assert!(text.contains("slow start: step 10/10, weight 100 of 100; full weight in 0.5 s"), "{text}");
    }
}
