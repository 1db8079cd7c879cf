//! `cargo xtask lab --directors 2`: two directors, each running mim-lb with the same config,
//! and keepalived (real VRRP) moving the VIP between them. Long-lived connections to every
//! master and a steady stream of new ones run while the active director dies (kill -9 of mim-lb
//! and keepalived, its link down) and while it comes back; the demo shows that no connection
//! broke, how long the VIP was nowhere, and how long new connections failed.
//!
//! Everything belongs to a [`Lab`], [`Directors`] and a [`Traffic`], whose `Drop` removes it,
//! so an error or Ctrl-C anywhere (see [`signals`]) cleans up too.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::signals;
use super::story::{STEPS, step};
use super::story::{Options, PORT};
use crate::continuity::{Progress, Traffic, TrafficReport, TrafficSpec};
use crate::gateway::ServiceSpec;
use crate::keepalived::{Directors, SyncKey, VrrpSpec, director_configs, priority, sync_section, vip_holders};
use crate::{Lab, LabSpec};

/// How often the demo looks at who holds the VIP.
const TICK: Duration = Duration::from_millis(50);
/// How long keepalived may take to move the VIP before the demo says it did not.
const MOVE_LIMIT: Duration = Duration::from_secs(15);
/// The flows' idle timeout: long enough that nothing the demo shows depends on it.
const IDLE_TIMEOUT_S: u32 = 60;

/// The directors' names on screen.
fn name(i: usize) -> &'static str {
    ["A", "B"][i]
}

/// What the two-director demo saw.
#[derive(Debug, Clone, Default)]
pub struct PairSummary {
    pub masters: usize,
    pub held: usize,
    pub held_broken: usize,
    /// From the kill until B alone held the VIP.
    pub vip_moved_after: Option<Duration>,
    /// From the kill until the first new connection begun after it was answered.
    pub first_new_after_kill: Option<Duration>,
    /// New connections begun after the kill that failed: all before the first success, and
    /// after it (which must be none).
    pub failed_in_outage: usize,
    pub failed_after_recovery: usize,
    /// The longest silence of a long-lived connection around the kill.
    pub longest_silence_kill: Duration,
    /// From A's daemon serving again until A alone held the VIP again.
    pub vip_back_after: Option<Duration>,
    /// New connections begun after A started coming back that failed.
    pub failed_in_failback: usize,
    pub longest_silence_failback: Duration,
    pub new_ok: usize,
    pub new_failed: usize,
}

impl PairSummary {
    /// What went differently from the story; empty when it held.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.held_broken > 0 {
            problems.push(format!("{} of {} long-lived connections broke", self.held_broken, self.held));
        }
        if self.vip_moved_after.is_none() {
            problems.push("director B never held the VIP alone after A died".into());
        }
        if self.first_new_after_kill.is_none() {
            problems.push("no new connection succeeded after the kill".into());
        }
        if self.failed_after_recovery > 0 {
            problems.push(format!(
                "{} new connections failed after new connections worked again",
                self.failed_after_recovery
            ));
        }
        if self.vip_back_after.is_none() {
            problems.push("director A never took the VIP back".into());
        }
        problems
    }

    pub fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "directors": 2,
            "masters": self.masters,
            "held": self.held,
            "held_broken": self.held_broken,
            "vip_moved_after_ms": ms(self.vip_moved_after),
            "first_new_after_kill_ms": ms(self.first_new_after_kill),
            "failed_in_outage": self.failed_in_outage,
            "failed_after_recovery": self.failed_after_recovery,
            "longest_silence_kill_ms": self.longest_silence_kill.as_millis() as u64,
            "vip_back_after_ms": ms(self.vip_back_after),
            "failed_in_failback": self.failed_in_failback,
            "longest_silence_failback_ms": self.longest_silence_failback.as_millis() as u64,
            "new_ok": self.new_ok,
            "new_failed": self.new_failed,
            "problems": self.problems(),
        })
    }

    fn render(&self) -> Vec<String> {
        let secs = |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
        vec![
            format!("  kill -9 of director A (mim-lb and keepalived) and its link down:"),
            format!("    the VIP was on director B alone after      {}", secs(self.vip_moved_after)),
            format!("    first new connection answered after        {}", secs(self.first_new_after_kill)),
            format!(
                "    new connections that failed in between     {} (and {} after that)",
                self.failed_in_outage, self.failed_after_recovery
            ),
            format!("    longest silence of a long-lived connection {:.2} s", self.longest_silence_kill.as_secs_f64()),
            format!("  director A back (mim-lb serving, then keepalived: it preempts):"),
            format!("    the VIP was on director A again after      {}", secs(self.vip_back_after)),
            format!("    new connections that failed meanwhile      {}", self.failed_in_failback),
            format!("    longest silence of a long-lived connection {:.2} s", self.longest_silence_failback.as_secs_f64()),
            format!(
                "  {} long-lived connections to {} masters, {} broken; {} new connections, {} failed",
                self.held, self.masters, self.held_broken, self.new_ok + self.new_failed, self.new_failed
            ),
        ]
    }
}


fn heading(n: usize, title: &str) {
    println!("\n[{n}/{STEPS}] {title}");
}

/// Runs the two-director demo and returns its summary.
pub fn run(opts: &Options) -> Result<PairSummary> {
    let removed = crate::cleanup_stale_labs().context("removing labs of earlier runs that were killed")?
        + crate::gateway::cleanup_stale_pins().context("removing pins of earlier runs that were killed")?;
    if removed > 0 {
        println!("(removed {removed} namespaces and pin directories that killed runs left behind)");
    }
    println!(
        "mim-lb lab, two directors: a client, directors A and B each running mim-lb and keepalived, \
         {} masters behind the VIP,",
        opts.masters
    );
    println!("each in a network namespace of its own on this machine, all on one bridge\n");
    let mut lab = step(1, "Building the lab", || {
        Lab::new(LabSpec { masters: opts.masters, directors: 2, ipv6: false, ..LabSpec::default() })
    })?;
    let result = SyncKey::new(&lab).and_then(|key| {
        let result = start(&mut lab, opts, &key).and_then(|directors| story(&mut lab, directors, opts));
        drop(key);
        result
    });
    let why = if signals::interrupted() { "Interrupted: removing" } else { "Removing" };
    print!("\n{why} the lab (mim-lb, keepalived, their files, {} namespaces) ... ", lab.namespaces().len());
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    drop(lab);
    println!("done in {:.2} s", started.elapsed().as_secs_f64());
    result
}

fn start(lab: &mut Lab, opts: &Options, key: &SyncKey) -> Result<Directors> {
    for i in 0..2 {
        println!(
            "      director {}  {:<14} {:<24} priority {}; runs mim-lb and keepalived",
            name(i),
            lab.director_addr4(i).to_string(),
            lab.director_ns(i),
            priority(i)
        );
    }
    println!("      client      {:<14} {}", lab.client_addr4().to_string(), lab.client_ns());
    println!("      masters     {} to {}, VIP {} on lo", lab.master_addr4(0), lab.master_addr4(lab.master_count() - 1), lab.vip4());
    lab.start_tcp_servers(PORT)?;
    signals::check()?;
    let interval = opts.check_interval.as_millis();
    let service = ServiceSpec {
        health: format!("interval_ms = {interval}\ntimeout_ms = {interval}\nrise = 1\nfall = 2"),
        ..ServiceSpec::tcp(lab, PORT)
    };
    let configs =
        director_configs(lab, &[service], &format!("tcp_idle_timeout_s = {IDLE_TIMEOUT_S}"), |i| sync_section(lab, key, i));
    let directors = step(2, "Starting mim-lb, then keepalived, on both directors", || {
        Directors::start(lab, opts.mode, &configs, VrrpSpec::default())
    })?;
    println!(
        "      {} XDP on each director's eth0, the same services, flow sync between them; VRRPv3 every 200 ms, `mim-lb ready` as track script",
        opts.mode.name()
    );
    println!("      director A won the election: the VIP is on its eth0");
    step(3, "Waiting until each director has the other's state and the same tables", || {
        directors.wait_synced(Duration::from_secs(30))
    })?;
    println!("      both build the same Maglev table from the same config and masters (`table digest` in");
    println!("      `mim-lb status`); what a table cannot tell, the flows recorded where a master changed,");
    println!("      each tells the other within milliseconds (`[sync]`, OPERATIONS.md \"Two directors\")");
    Ok(directors)
}

/// The VIP's holder on screen: "A", "B", "A+B" or "-".
fn holders(lab: &Lab) -> String {
    match vip_holders(lab) {
        Ok(h) if h.is_empty() => "-".into(),
        Ok(h) => h.iter().map(|&i| name(i)).collect::<Vec<_>>().join("+"),
        Err(_) => "?".into(),
    }
}

/// Whether director `i` alone holds the VIP.
fn sole_holder(lab: &Lab, i: usize) -> bool {
    vip_holders(lab).is_ok_and(|h| h == [i])
}

/// A line a second of what the traffic did in that second and who holds the VIP.
struct Ticker {
    t0: Instant,
    next_row: Instant,
    last: Progress,
}

impl Ticker {
    fn header() {
        println!("     time   new ok  failed   lines  broken  VIP on");
    }

    fn row(&mut self, lab: &Lab, traffic: &Traffic) {
        let now = Instant::now();
        if now < self.next_row {
            return;
        }
        self.next_row += Duration::from_secs(1);
        let p = traffic.progress();
        println!(
            "  {:>6.1}s {:>8} {:>7} {:>7} {:>7}  {}",
            (now - self.t0).as_secs_f64(),
            p.new_ok - self.last.new_ok,
            p.new_failed - self.last.new_failed,
            p.echoes - self.last.echoes,
            p.broken,
            holders(lab)
        );
        self.last = p;
    }

    /// Rows until `done` holds or `limit` passes; returns when it held.
    fn until(&mut self, lab: &Lab, traffic: &Traffic, limit: Duration, done: impl Fn() -> bool) -> Result<Option<Instant>> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.row(lab, traffic);
            if done() {
                return Ok(Some(Instant::now()));
            }
            signals::sleep(TICK)?;
        }
        Ok(None)
    }

    fn run_for(&mut self, lab: &Lab, traffic: &Traffic, phase: Duration) -> Result<()> {
        self.until(lab, traffic, phase, || false).map(|_| ())
    }
}

fn story(lab: &mut Lab, mut directors: Directors, opts: &Options) -> Result<PairSummary> {
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    heading(4, "Traffic: long-lived connections to every master, a line each every 50 ms; a new connection every 20 ms");
    let traffic = Traffic::start(lab, TrafficSpec::new(vip))?;
    let mut ticker = Ticker { t0: Instant::now(), next_row: Instant::now() + Duration::from_secs(1), last: Progress::default() };
    Ticker::header();
    ticker.run_for(lab, &traffic, opts.phase)?;

    println!("  >> kill -9 of director A's mim-lb and keepalived, and its link down");
    let killed = directors.kill(lab, 0)?;
    let moved = ticker.until(lab, &traffic, MOVE_LIMIT, || sole_holder(lab, 1))?;
    match moved {
        Some(at) => println!("  >> director B holds the VIP ({:.2} s after the kill)", (at - killed).as_secs_f64()),
        None => println!("  >> director B does not hold the VIP after {MOVE_LIMIT:?}"),
    }
    ticker.run_for(lab, &traffic, opts.phase)?;

    heading(5, "Director A comes back: link up, mim-lb again (over its pins), then keepalived");
    Ticker::header();
    let back_from = Instant::now();
    directors.reconnect(lab, 0)?;
    directors.restart_daemon(lab, 0, &[])?;
    let serving = Instant::now();
    directors.restart_keepalived(lab, 0)?;
    println!("  >> director A's mim-lb serves again; its keepalived runs the track script, then preempts");
    let back = ticker.until(lab, &traffic, MOVE_LIMIT, || sole_holder(lab, 0))?;
    match back {
        Some(at) => println!("  >> director A holds the VIP again ({:.2} s after its mim-lb was serving)", (at - serving).as_secs_f64()),
        None => println!("  >> director A has not taken the VIP back after {MOVE_LIMIT:?}"),
    }
    ticker.run_for(lab, &traffic, opts.phase)?;
    let report = traffic.finish();
    if signals::interrupted() {
        bail!(signals::Interrupted);
    }

    let summary = summarize(lab, &report, killed, moved, back_from, serving, back);
    heading(6, "Summary");
    super::summary::print_verdict(
        &summary.render(),
        &summary.problems(),
        "no long-lived connection broke, and once new connections worked again, all did",
        (!opts.live).then(|| summary.to_json()),
    );
    if opts.keep {
        keep(lab, &directors)?;
    }
    Ok(summary)
}

fn summarize(
    lab: &Lab,
    report: &TrafficReport,
    killed: Instant,
    moved: Option<Instant>,
    back_from: Instant,
    serving: Instant,
    back: Option<Instant>,
) -> PairSummary {
    // The kill's window ends where the return begins; failures in it are counted once.
    let in_kill = |t: Instant| t >= killed && t < back_from;
    let first = report.first_success_after(killed).filter(|(k, _)| in_kill(report.attempts[*k].started));
    let recovered = first.map(|(k, _)| report.attempts[k].ended);
    let failed = |a: &&crate::continuity::Attempt| a.outcome.is_err();
    PairSummary {
        masters: lab.master_count(),
        held: report.held.len(),
        held_broken: report.broken_held().len(),
        vip_moved_after: moved.map(|m| m - killed),
        first_new_after_kill: first.map(|(_, d)| d),
        failed_in_outage: report
            .attempts
            .iter()
            .filter(|a| in_kill(a.started) && recovered.is_none_or(|r| a.started < r))
            .filter(failed)
            .count(),
        failed_after_recovery: report.failures_after_recovery(killed).len(),
        longest_silence_kill: silence_between(report, killed, back_from),
        vip_back_after: back.map(|b| b - serving),
        failed_in_failback: report.attempts.iter().filter(|a| a.started >= back_from).filter(failed).count(),
        longest_silence_failback: report.longest_held_gap_after(back_from),
        new_ok: report.attempts.iter().filter(|a| a.outcome.is_ok()).count(),
        new_failed: report.attempts.iter().filter(|a| a.outcome.is_err()).count(),
    }
}

/// The longest wait for an echo that ended between `from` and `to`.
fn silence_between(report: &TrafficReport, from: Instant, to: Instant) -> Duration {
    report.held.iter().flat_map(|h| &h.stalls).filter(|(end, _)| *end >= from && *end < to).map(|(_, d)| *d).max().unwrap_or_default()
}

/// What an operator needs to look around in the two-director lab: rows of
/// [`super::keep::print_guide`], every command runnable as printed (tests/tests/lab_demo.rs).
fn guide(lab: &Lab, directors: &Directors) -> Vec<(&'static str, String)> {
    let cli = super::keep::operator_cli();
    let config = |i: usize| directors.gateway(i).config_path().display().to_string();
    vec![
        ("director A", format!("ip netns exec {} bash", lab.director_ns(0))),
        ("director B", format!("ip netns exec {} bash", lab.director_ns(1))),
        ("", "(ip addr show eth0 there: the VIP is on the one keepalived made master)".to_owned()),
        ("the client", format!("ip netns exec {} bash", lab.client_ns())),
        ("mim-lb status on A", format!("{cli} status --config {}", config(0))),
        ("mim-lb status on B", format!("{cli} status --config {}", config(1))),
        ("is B ready?", format!("{cli} ready --config {}", config(1))),
        ("keepalived on A", format!("cat {}", directors.keepalived(0).config_path().display())),
        (super::keep::GUIDE_LAST_LABEL, format!("bpftool map dump pinned {}/BACKENDS", directors.gateway(0).pin_dir().display())),
    ]
}

/// `--keep`: the lab stays up until Ctrl-C, with the commands to look around.
fn keep(lab: &Lab, directors: &Directors) -> Result<()> {
    super::keep::print_guide(&guide(lab, directors));
    let _ = std::io::stdout().flush();
    loop {
        if signals::sleep(Duration::from_secs(1)).is_err() {
            return Ok(());
        }
    }
}
