//! Traffic that must live through a failover: long-lived connections to every master that
//! exchange a line every few tens of milliseconds, and a steady stream of new connections
//! (one request each), all from the lab's client on threads of their own. Every event is timed, so that a
//! test can say what happened after the moment it broke something: how long until new
//! connections worked again, whether any failed after that, whether a long-lived one broke or
//! stalled.
//!
//! ```no_run
//! # use std::time::{Duration, Instant};
//! # use mim_lb_tests::{Lab, LabSpec, continuity::{Traffic, TrafficSpec}};
//! # let lab = Lab::new(LabSpec::default())?;
//! let traffic = Traffic::start(&lab, TrafficSpec::new((lab.vip4(), 7000).into()))?;
//! let broken = Instant::now();
//! // ... kill something ...
//! let report = traffic.finish_after(Duration::from_secs(3));
//! report.assert_survived("after the kill", broken);
//! # anyhow::Ok(())
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{TcpHold, tcp_ask};
use crate::netns::{in_netns, spawn_in_netns};
use crate::Lab;

/// What traffic to run.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    /// Where every connection goes (a VIP and port).
    pub target: SocketAddr,
    /// Long-lived connections per master: connections are opened until every master has this
    /// many (the director's table decides which master each reaches).
    pub held_per_master: usize,
    /// The masters (lab indexes) that must each get `held_per_master`; `None` for all. Others
    /// get none (connections that reach them are closed), e.g. a drained master that takes no
    /// new connection.
    pub held_on: Option<Vec<usize>>,
    /// Between two lines on one long-lived connection.
    pub echo_every: Duration,
    /// Longest a line may wait for its echo before the connection counts as stalled, and so
    /// broken. Long enough for TCP to retransmit through a failover (200 ms, 400 ms, ...),
    /// short enough that a connection that stopped for good fails the test.
    pub stall_limit: Duration,
    /// A new connection starts this often, whether the ones before it have ended or not, so
    /// that the first to work after an outage shows when new connections work again to within
    /// this much (and not to within `new_timeout`).
    pub new_every: Duration,
    /// Time limit of one new connection (connect, read the answer). Below TCP's first SYN
    /// retransmission (1 s): each attempt is one SYN, and one whose SYN was lost fails rather
    /// than succeeds late on a retransmission.
    pub new_timeout: Duration,
    /// Most new connections in flight at once; none starts while this many are.
    pub max_in_flight: usize,
    /// When set, a long-lived connection ends (closes cleanly) once it is this old and is
    /// replaced at once by a new one to the target, wherever the director sends it: how a
    /// drained master's long-lived connections end naturally. `None`: they live until the end.
    pub held_lifetime: Option<Duration>,
}

impl TrafficSpec {
    /// Three long-lived connections per master, a line every 50 ms, stalled after 5 s; a new
    /// connection every 20 ms, each given 900 ms.
    pub fn new(target: SocketAddr) -> TrafficSpec {
        TrafficSpec {
            target,
            held_per_master: 3,
            held_on: None,
            echo_every: Duration::from_millis(50),
            stall_limit: Duration::from_secs(5),
            new_every: Duration::from_millis(20),
            new_timeout: Duration::from_millis(900),
            max_in_flight: 64,
            held_lifetime: None,
        }
    }
}

/// What one long-lived connection did.
#[derive(Debug, Clone)]
pub struct HeldLog {
    /// The master it reached (its first, with `held_lifetime`).
    pub master: String,
    /// Times it was replaced by a new connection at the end of its `held_lifetime`.
    pub renewed: u64,
    /// Lines echoed.
    pub echoes: u64,
    /// The longest time between two echoes (or from the start to the first).
    pub longest_gap: Duration,
    /// When that gap ended.
    pub longest_gap_end: Option<Instant>,
    /// Every wait for an echo longer than two `echo_every`: when it ended, and how long.
    pub stalls: Vec<(Instant, Duration)>,
    /// Why it broke (reset, closed, stalled past the limit, wrong echo), if it did.
    pub error: Option<String>,
    pub broke_at: Option<Instant>,
}

/// One new connection.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Its number, in the order they started.
    pub number: usize,
    pub started: Instant,
    pub ended: Instant,
    /// The master's name, or the error.
    pub outcome: std::result::Result<String, String>,
}

/// Running totals, readable while the traffic runs (a live view), unlike the timed details
/// that [`Traffic::finish`] returns.
#[derive(Debug, Default)]
struct Counters {
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    echoes: AtomicU64,
    broken: AtomicU64,
}

/// [`Traffic::progress`]: totals so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub new_ok: u64,
    pub new_failed: u64,
    /// Lines echoed on the long-lived connections.
    pub echoes: u64,
    /// Long-lived connections that broke or stalled.
    pub broken: u64,
}

/// Long-lived connections and a steady stream of new ones, running until [`Traffic::finish`].
pub struct Traffic {
    started: Instant,
    stop: Arc<AtomicBool>,
    held: Vec<JoinHandle<HeldLog>>,
    new_conns: Option<JoinHandle<Vec<Attempt>>>,
    counters: Arc<Counters>,
}

/// Opens long-lived connections from the client to `target` until every one of the lab's
/// masters has `per_master` of them; extra ones to a master that has enough are closed. Gives
/// up after 20 connections per wanted one.
pub fn hold_on_every_master(lab: &Lab, target: SocketAddr, per_master: usize, timeout: Duration) -> Result<Vec<TcpHold>> {
    let all: Vec<usize> = (0..lab.master_count()).collect();
    hold_on_masters(lab, target, &all, per_master, timeout)
}

/// [`hold_on_every_master`] for the masters `masters` (lab indexes) only.
pub fn hold_on_masters(lab: &Lab, target: SocketAddr, masters: &[usize], per_master: usize, timeout: Duration) -> Result<Vec<TcpHold>> {
    let wanted = masters.len() * per_master;
    let names: Vec<String> = masters.iter().map(|&i| lab.master_name(i)).collect();
    in_netns(lab.client_ns(), || -> Result<Vec<TcpHold>> {
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        let mut kept = Vec::new();
        for _ in 0..wanted * 20 {
            if kept.len() == wanted {
                return Ok(kept);
            }
            let conn = TcpHold::connect(target, timeout)?;
            let n = per.entry(conn.name().to_owned()).or_default();
            if *n < per_master && names.iter().any(|m| m == conn.name()) {
                *n += 1;
                kept.push(conn);
            }
        }
        if kept.len() == wanted {
            return Ok(kept);
        }
        bail!("after {} connections to {target}, the masters had {per:?} (wanted {per_master} each)", wanted * 20)
    })?
}

impl Traffic {
    /// Opens the long-lived connections (see [`hold_on_every_master`]), then starts a thread
    /// per connection and one that starts the new connections.
    pub fn start(lab: &Lab, spec: TrafficSpec) -> Result<Traffic> {
        let held = match &spec.held_on {
            Some(masters) => hold_on_masters(lab, spec.target, masters, spec.held_per_master, Duration::from_secs(3))?,
            None => hold_on_every_master(lab, spec.target, spec.held_per_master, Duration::from_secs(3))?,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let counters: Arc<Counters> = Arc::default();
        let mut traffic =
            Traffic { started, stop: Arc::clone(&stop), held: Vec::new(), new_conns: None, counters: Arc::clone(&counters) };
        for (k, conn) in held.into_iter().enumerate() {
            let (stop, spec, counters) = (Arc::clone(&stop), spec.clone(), Arc::clone(&counters));
            // In the client's namespace: a connection that is renewed connects from there.
            let handle = spawn_in_netns(lab.client_ns(), &format!("held-{k}"), move || chat(conn, k, &spec, &stop, started, &counters))
                .context("starting a held connection's thread")?;
            traffic.held.push(handle);
        }
        // Connections are made in the client's namespace, so the thread lives there (and the
        // threads it starts too: a thread inherits its creator's namespace).
        let handle = spawn_in_netns(lab.client_ns(), "new-conns", move || new_connections(&spec, &stop, &counters))?;
        traffic.new_conns = Some(handle);
        Ok(traffic)
    }

    /// When the traffic started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Totals so far, while it runs.
    pub fn progress(&self) -> Progress {
        let c = &self.counters;
        Progress {
            new_ok: c.new_ok.load(Ordering::Relaxed),
            new_failed: c.new_failed.load(Ordering::Relaxed),
            echoes: c.echoes.load(Ordering::Relaxed),
            broken: c.broken.load(Ordering::Relaxed),
        }
    }

    /// Lets the traffic run on for `more`, then stops it and returns what happened.
    pub fn finish_after(self, more: Duration) -> TrafficReport {
        std::thread::sleep(more);
        self.finish()
    }

    /// Stops every thread (each within one step: an echo or a connection, so within
    /// `stall_limit`) and returns what happened.
    pub fn finish(mut self) -> TrafficReport {
        self.stop.store(true, Ordering::Relaxed);
        let held = self.held.drain(..).map(|h| h.join().expect("a held connection's thread panicked")).collect();
        let attempts = self.new_conns.take().map(|h| h.join().expect("the new connections' thread panicked")).unwrap_or_default();
        TrafficReport { started: self.started, held, attempts }
    }
}

impl Drop for Traffic {
    /// A test that fails before [`Traffic::finish`] still stops the threads, which end within
    /// one step.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.held.drain(..) {
            let _ = h.join();
        }
        if let Some(h) = self.new_conns.take() {
            let _ = h.join();
        }
    }
}

/// One long-lived connection: a line every `echo_every` until `stop` or the first failure.
fn chat(mut conn: TcpHold, k: usize, spec: &TrafficSpec, stop: &AtomicBool, started: Instant, counters: &Counters) -> HeldLog {
    let mut log = HeldLog {
        master: conn.name().to_owned(),
        renewed: 0,
        echoes: 0,
        longest_gap: Duration::ZERO,
        longest_gap_end: None,
        stalls: Vec::new(),
        error: None,
        broke_at: None,
    };
    let mut last = started;
    let mut next = Instant::now();
    let mut opened = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(lifetime) = spec.held_lifetime
            && opened.elapsed() >= lifetime
        {
            // Closed cleanly (dropped), then replaced: a failure to connect is a broken one.
            let target = spec.target;
            conn = match TcpHold::connect(target, spec.stall_limit) {
                Ok(new) => new,
                Err(e) => {
                    log.error = Some(format!("renewing it: {e:#}"));
                    log.broke_at = Some(Instant::now());
                    counters.broken.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            opened = Instant::now();
            log.renewed += 1;
        }
        let result = conn.echo(&format!("conn {k} line {}", log.echoes), spec.stall_limit);
        let now = Instant::now();
        if let Err(e) = result {
            log.error = Some(format!("{e:#} (after {:?} without an echo)", now - last));
            log.broke_at = Some(now);
            counters.broken.fetch_add(1, Ordering::Relaxed);
            break;
        }
        log.echoes += 1;
        counters.echoes.fetch_add(1, Ordering::Relaxed);
        if now - last > spec.echo_every * 2 {
            log.stalls.push((now, now - last));
        }
        if now - last > log.longest_gap {
            log.longest_gap = now - last;
            log.longest_gap_end = Some(now);
        }
        last = now;
        next += spec.echo_every;
        // Behind schedule after a stall: start again from now rather than burst.
        next = next.max(now);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    log
}

/// A new connection every `new_every`, each on a thread of its own (at most `max_in_flight`
/// at once), until `stop`; then waits for those in flight (each ends within `new_timeout`).
fn new_connections(spec: &TrafficSpec, stop: &AtomicBool, counters: &Arc<Counters>) -> Vec<Attempt> {
    let done: Arc<std::sync::Mutex<Vec<Attempt>>> = Arc::default();
    let mut in_flight: Vec<JoinHandle<()>> = Vec::new();
    let mut number = 0;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        in_flight.retain(|h| !h.is_finished());
        if in_flight.len() < spec.max_in_flight {
            let (done, target, timeout, counters) = (Arc::clone(&done), spec.target, spec.new_timeout, Arc::clone(counters));
            let spawned = std::thread::Builder::new().name(format!("new-conn-{number}")).spawn(move || {
                let started = Instant::now();
                let outcome = tcp_ask(target, timeout).map_err(|e| format!("{e:#}"));
                let counter = if outcome.is_ok() { &counters.new_ok } else { &counters.new_failed };
                counter.fetch_add(1, Ordering::Relaxed);
                done.lock().unwrap().push(Attempt { number, started, ended: Instant::now(), outcome });
            });
            if let Ok(handle) = spawned {
                in_flight.push(handle);
                number += 1;
            }
        }
        next += spec.new_every;
        next = next.max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    for h in in_flight {
        let _ = h.join();
    }
    let mut attempts = std::mem::take(&mut *done.lock().unwrap());
    attempts.sort_by_key(|a| a.started);
    attempts
}

/// What the traffic saw, for asserting and printing.
#[derive(Debug)]
pub struct TrafficReport {
    pub started: Instant,
    pub held: Vec<HeldLog>,
    /// Every new connection, in the order they were started.
    pub attempts: Vec<Attempt>,
}

impl TrafficReport {
    /// The new connection started at or after `t` that succeeded first (had its answer
    /// first): its index in [`TrafficReport::attempts`] and the time from `t` to its answer.
    pub fn first_success_after(&self, t: Instant) -> Option<(usize, Duration)> {
        self.attempts
            .iter()
            .enumerate()
            .filter(|(_, a)| a.started >= t && a.outcome.is_ok())
            .min_by_key(|(_, a)| a.ended)
            .map(|(k, a)| (k, a.ended - t))
    }

    /// New connections that failed although they started after the first one that succeeded
    /// after `t` had its answer: once new connections work again, they must keep working.
    pub fn failures_after_recovery(&self, t: Instant) -> Vec<&Attempt> {
        let Some((first, _)) = self.first_success_after(t) else { return Vec::new() };
        let recovered = self.attempts[first].ended;
        self.attempts.iter().filter(|a| a.started >= recovered && a.outcome.is_err()).collect()
    }

    /// New connections that started at or after `t`: (succeeded, failed).
    pub fn counts_after(&self, t: Instant) -> (usize, usize) {
        let after: Vec<&Attempt> = self.attempts.iter().filter(|a| a.started >= t).collect();
        let ok = after.iter().filter(|a| a.outcome.is_ok()).count();
        (ok, after.len() - ok)
    }

    /// Long-lived connections that broke or stalled.
    pub fn broken_held(&self) -> Vec<&HeldLog> {
        self.held.iter().filter(|h| h.error.is_some()).collect()
    }

    /// The longest wait between two echoes on any long-lived connection.
    pub fn longest_held_gap(&self) -> Duration {
        self.held.iter().map(|h| h.longest_gap).max().unwrap_or_default()
    }

    /// The longest wait for an echo that ended at or after `t` on any long-lived connection
    /// (zero if none was longer than two `echo_every`).
    pub fn longest_held_gap_after(&self, t: Instant) -> Duration {
        self.held.iter().flat_map(|h| &h.stalls).filter(|(end, _)| *end >= t).map(|(_, d)| *d).max().unwrap_or_default()
    }

    /// The connections per master among the long-lived ones.
    pub fn held_per_master(&self) -> BTreeMap<String, usize> {
        crate::count_names(&self.held.iter().map(|h| h.master.clone()).collect::<Vec<_>>())
    }

    /// One paragraph for the test's output: what happened after `t`.
    pub fn summary(&self, what: &str, t: Instant) -> String {
        let (ok, failed) = self.counts_after(t);
        let first = self.first_success_after(t).map_or("none".to_owned(), |(_, d)| format!("{d:?}"));
        let gaps: Vec<String> = self
            .held
            .iter()
            .map(|h| {
                let after = h.stalls.iter().filter(|(end, _)| *end >= t).map(|(_, d)| *d).max().unwrap_or_default();
                format!("{}:{}ms", h.master, after.as_millis())
            })
            .collect();
        format!(
            "{what}: first new connection answered {first} after it; {ok} new connections succeeded and {failed} failed \
             after it, {} of them after the first success; {} long-lived connections ({:?}), {} broken, longest \
             silence since {:?} (per connection: {})",
            self.failures_after_recovery(t).len(),
            self.held.len(),
            self.held_per_master(),
            self.broken_held().len(),
            self.longest_held_gap_after(t),
            gaps.join(" ")
        )
    }

    /// Panics, with the details, unless the traffic lived through what happened at `t`: every
    /// long-lived connection kept exchanging lines (none broke, none went silent for
    /// `stall_limit`), a new connection succeeded after `t`, and none failed after the first
    /// that did. Returns the time from `t` to that first success.
    pub fn assert_survived(&self, what: &str, t: Instant) -> Duration {
        self.assert_survived_until(what, t, None)
    }

    /// [`TrafficReport::assert_survived`] for one of several events: new connections that
    /// started at or after `until` (the next event) are that event's to answer for.
    pub fn assert_survived_before(&self, what: &str, t: Instant, until: Instant) -> Duration {
        self.assert_survived_until(what, t, Some(until))
    }

    fn assert_survived_until(&self, what: &str, t: Instant, until: Option<Instant>) -> Duration {
        let summary = self.summary(what, t);
        eprintln!("{summary}");
        let broken: Vec<String> = self
            .broken_held()
            .iter()
            .map(|h| format!("to {}: {} ({:?} after the start)", h.master, h.error.as_deref().unwrap_or(""), h.broke_at.map(|b| b - self.started)))
            .collect();
        assert!(broken.is_empty(), "{what}: long-lived connections broke:\n{}\n{summary}", broken.join("\n"));
        let Some((_, first)) = self.first_success_after(t) else {
            panic!("{what}: no new connection succeeded after it\n{summary}\n{}", self.attempt_lines(t, 10));
        };
        let late: Vec<&Attempt> =
            self.failures_after_recovery(t).into_iter().filter(|a| until.is_none_or(|u| a.started < u)).collect();
        assert!(
            late.is_empty(),
            "{what}: {} new connections failed after they had worked again, e.g. {:?} after it: {}\n{summary}",
            late.len(),
            late[0].started - t,
            late[0].outcome.as_ref().unwrap_err()
        );
        first
    }

    /// The first `n` attempts started at or after `t`, one a line, for failure messages.
    pub fn attempt_lines(&self, t: Instant, n: usize) -> String {
        self.attempts
            .iter()
            .filter(|a| a.started >= t)
            .take(n)
            .map(|a| {
                format!(
                    "  +{:?} (connection {}, took {:?}): {}",
                    a.started - t,
                    a.number,
                    a.ended - a.started,
                    match &a.outcome {
                        Ok(name) => name.clone(),
                        Err(e) => e.clone(),
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
