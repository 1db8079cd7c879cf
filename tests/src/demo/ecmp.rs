//! `cargo xtask lab --directors N --ecmp`: N directors behind a router that spreads client
//! connections over them by equal-cost multipath (OPERATIONS.md, "Many directors behind ECMP").
//! Every director runs mim-lb with `[announce]` and `[sync]` (a multicast group) and BIRD with
//! `dist/bird/director.conf`; the router runs BIRD with `dist/bird/router.conf` (BGP with BFD)
//! and installs one route to the VIP with a next hop per director. Long-lived connections to
//! every master and a steady stream of new ones run while one director dies (its processes
//! killed, its link cut) and comes back, and while another is withdrawn and announced again;
//! each second a row shows which director carried how many new flows, and the router's next
//! hops.
//!
//! Everything belongs to a [`Lab`] and an [`Ecmp`], whose `Drop` removes it, so an error or
//! Ctrl-C anywhere (see [`signals`]) cleans up too.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::signals;
use super::story::{Options, PORT, step_of};
use crate::bird::{Ecmp, director_mim_lb_config};
use crate::continuity::{Progress, Traffic, TrafficReport, TrafficSpec};
use crate::gateway::ServiceSpec;
use crate::keepalived::SyncKey;
use crate::{Lab, LabSpec};

/// Directors the demo runs at most: a row per second must fit a terminal.
pub const MAX_DIRECTORS: usize = 8;
/// The steps of this story.
const STEPS: usize = 7;
/// How often the demo looks at the router's route.
const TICK: Duration = Duration::from_millis(50);
/// How long the first BGP sessions may take to bring every director into the route.
const UP_LIMIT: Duration = Duration::from_secs(40);
/// How long the route may take to follow a change before the demo says it did not.
const FOLLOW_LIMIT: Duration = Duration::from_secs(20);
/// The flows' idle timeout: long enough that nothing the demo shows depends on it.
const IDLE_TIMEOUT_S: u32 = 60;
/// On a clean stop (the demo's end) each daemon forwards this long after it withdrew.
const WITHDRAW_WAIT_MS: u64 = 500;
/// The director that dies and comes back, and the one withdrawn and announced again.
const KILLED: usize = 0;
const WITHDRAWN: usize = 1;

/// Director `i`'s name on screen: A, B, C, ...
pub fn name(i: usize) -> String {
    char::from(b'A' + i as u8).to_string()
}

/// A set of directors on screen: "A B C", or "-" for none.
fn names(set: &BTreeSet<usize>) -> String {
    if set.is_empty() { "-".to_owned() } else { set.iter().map(|&i| name(i)).collect::<Vec<_>>().join(" ") }
}

/// What the ECMP demo saw.
#[derive(Debug, Clone, Default)]
pub struct EcmpSummary {
    pub directors: usize,
    pub masters: usize,
    pub held: usize,
    pub held_broken: usize,
    /// New flows each director carried while the traffic ran (from its status' `new_flows`).
    pub carried: Vec<u64>,
    /// From the kill (link cut) until the router's route no longer had the director.
    pub kill_out_after: Option<Duration>,
    /// From the start of its return (link up) until the route had it again.
    pub revive_in_after: Option<Duration>,
    /// From `mim-lb withdraw` until the route no longer had that director, and from
    /// `mim-lb announce` until it had it again.
    pub withdraw_out_after: Option<Duration>,
    pub announce_in_after: Option<Duration>,
    /// New connections that failed: begun between the kill and the route dropping the dead
    /// director (the router still sent some to it), and any other (which must be none).
    pub failed_before_converged: usize,
    pub failed_otherwise: usize,
    pub new_ok: usize,
    pub new_failed: usize,
}

impl EcmpSummary {
    /// What went differently from the story; empty when it held.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.held_broken > 0 {
            problems.push(format!("{} of {} long-lived connections broke", self.held_broken, self.held));
        }
        for (i, n) in self.carried.iter().enumerate() {
            if *n == 0 {
                problems.push(format!("director {} carried no new flow: the router did not spread connections over it", name(i)));
            }
        }
        let (killed, withdrawn) = (name(KILLED), name(WITHDRAWN));
        if self.kill_out_after.is_none() {
            problems.push(format!("the router kept director {killed} in its route after it died"));
        }
        if self.revive_in_after.is_none() {
            problems.push(format!("director {killed} did not come back into the router's route"));
        }
        if self.withdraw_out_after.is_none() {
            problems.push(format!("director {withdrawn} stayed in the router's route after `mim-lb withdraw`"));
        }
        if self.announce_in_after.is_none() {
            problems.push(format!("director {withdrawn} did not come back into the route after `mim-lb announce`"));
        }
        if self.failed_otherwise > 0 {
            problems.push(format!(
                "{} new connections failed that were begun outside the kill's convergence",
                self.failed_otherwise
            ));
        }
        problems
    }

    pub fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let carried: serde_json::Map<String, Value> = self.carried.iter().enumerate().map(|(i, n)| (name(i), json!(n))).collect();
        json!({
            "directors": self.directors,
            "ecmp": true,
            "masters": self.masters,
            "held": self.held,
            "held_broken": self.held_broken,
            "carried": carried,
            "killed": name(KILLED),
            "withdrawn": name(WITHDRAWN),
            "kill_out_after_ms": ms(self.kill_out_after),
            "revive_in_after_ms": ms(self.revive_in_after),
            "withdraw_out_after_ms": ms(self.withdraw_out_after),
            "announce_in_after_ms": ms(self.announce_in_after),
            "failed_before_converged": self.failed_before_converged,
            "failed_otherwise": self.failed_otherwise,
            "new_ok": self.new_ok,
            "new_failed": self.new_failed,
            "problems": self.problems(),
        })
    }

    fn render(&self) -> Vec<String> {
        let secs = |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
        let (killed, withdrawn) = (name(KILLED), name(WITHDRAWN));
        let per: Vec<String> = self.carried.iter().enumerate().map(|(i, n)| format!("{} {n}", name(i))).collect();
        vec![
            format!("  new flows each director carried: {}", per.join(", ")),
            format!("  the router's route (convergence):"),
            format!("    director {killed} killed, out of the route after        {}", secs(self.kill_out_after)),
            format!("    director {killed} brought back, in the route after      {}", secs(self.revive_in_after)),
            format!("    director {withdrawn} withdrawn, out of the route after     {}", secs(self.withdraw_out_after)),
            format!("    director {withdrawn} announced, in the route after         {}", secs(self.announce_in_after)),
            format!(
                "  new connections: {} ok, {} failed ({} begun before the route dropped the dead director, {} other)",
                self.new_ok, self.new_failed, self.failed_before_converged, self.failed_otherwise
            ),
            format!("  {} long-lived connections to {} masters, {} broken", self.held, self.masters, self.held_broken),
        ]
    }
}

fn heading(n: usize, title: &str) {
    println!("\n[{n}/{STEPS}] {title}");
}

/// Runs the ECMP demo and returns its summary.
pub fn run(opts: &Options) -> Result<EcmpSummary> {
    if !(2..=MAX_DIRECTORS).contains(&opts.directors) {
        bail!("the ECMP demo runs 2 to {MAX_DIRECTORS} directors, not {}", opts.directors);
    }
    let removed = crate::cleanup_stale_labs().context("removing labs of earlier runs that were killed")?
        + crate::gateway::cleanup_stale_pins().context("removing pins of earlier runs that were killed")?;
    if removed > 0 {
        println!("(removed {removed} namespaces and pin directories that killed runs left behind)");
    }
    println!(
        "mim-lb lab, {} directors behind an ECMP router: a client, a router, the directors each running \
         mim-lb and BIRD, {} masters behind the VIP,",
        opts.directors, opts.masters
    );
    println!("each in a network namespace of its own on this machine\n");
    println!("  - the router hashes each connection's addresses and ports to one director (ECMP): one route, a next hop per director");
    println!("  - every director builds the same table from the same config: whichever one a connection reaches, it goes to the same master");
    println!("  - each director tells the others the flows it records, over the sync group (multicast): when the router moves a");
    println!("    connection to another director, that one knows it already\n");
    let mut lab = step_of(1, STEPS, "Building the lab", || {
        Lab::new(LabSpec { masters: opts.masters, ..LabSpec::router(opts.directors) })
    })?;
    layout(&lab);
    let result = start(&mut lab).and_then(|ecmp| story(&mut lab, ecmp, opts));
    let why = if signals::interrupted() { "Interrupted: removing" } else { "Removing" };
    print!("\n{why} the lab (mim-lb and BIRD, their files, {} namespaces) ... ", lab.namespaces().len());
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    drop(lab);
    println!("done in {:.2} s", started.elapsed().as_secs_f64());
    result
}

/// Who is where: a line per host.
fn layout(lab: &Lab) {
    println!("      client      {:<14} {:<24} behind the router, on a link of its own", lab.client_addr4().to_string(), lab.client_ns());
    println!(
        "      router      {:<14} {:<24} BIRD: BGP with BFD to every director; forwards by an L4 multipath hash",
        lab.router_addr4().map(|a| a.to_string()).unwrap_or_default(),
        lab.router_ns().unwrap_or_default()
    );
    for i in 0..lab.director_count() {
        println!(
            "      director {}  {:<14} {:<24} mim-lb (generic XDP) and BIRD",
            name(i),
            lab.director_addr4(i).to_string(),
            lab.director_ns(i)
        );
    }
    println!(
        "      masters     {} to {}, VIP {} on lo",
        lab.master_addr4(0),
        lab.master_addr4(lab.master_count() - 1),
        lab.vip4()
    );
}

fn start(lab: &mut Lab) -> Result<Ecmp> {
    lab.start_tcp_servers(PORT)?;
    signals::check()?;
    let key = SyncKey::new(lab)?;
    let service = ServiceSpec::tcp(lab, PORT);
    let configs: Vec<String> = (0..lab.director_count())
        .map(|i| {
            director_mim_lb_config(lab, &key, i, std::slice::from_ref(&service), &format!("tcp_idle_timeout_s = {IDLE_TIMEOUT_S}"), WITHDRAW_WAIT_MS)
        })
        .collect();
    let ecmp = step_of(2, STEPS, "Starting BIRD on the router, then mim-lb and BIRD on every director", || {
        Ecmp::start(lab, key, &configs)
    })?;
    println!("      each mim-lb puts a route to the VIP in its `[announce]` table once it is ready; its BIRD announces it to the router");
    let vip = lab.vip4();
    let all: BTreeSet<usize> = (0..lab.director_count()).collect();
    step_of(3, STEPS, "Waiting until the router's route to the VIP has every director", || {
        wait_route(lab, &ecmp, vip, &all, UP_LIMIT)
    })?;
    let router = lab.router_ns().context("the lab has no router")?;
    println!("      router# ip route show {vip}");
    for line in lab.run_in(router, "ip", &["-4", "route", "show", &vip.to_string()])?.lines() {
        println!("        {line}");
    }
    Ok(ecmp)
}

/// [`Ecmp::wait_nexthops`] that a Ctrl-C ends.
fn wait_route(lab: &Lab, ecmp: &Ecmp, vip: Ipv4Addr, want: &BTreeSet<usize>, limit: Duration) -> Result<()> {
    let end = Instant::now() + limit;
    loop {
        if &ecmp.nexthop_directors(lab, vip)? == want {
            return Ok(());
        }
        if Instant::now() >= end {
            // Its error shows the route and the BGP sessions.
            ecmp.wait_nexthops(lab, vip, want, Duration::ZERO)?;
        }
        signals::sleep(TICK)?;
    }
}

/// A row a second: what the traffic did in that second, the new flows each director carried
/// in it, and the router's next hops.
struct Ticker {
    vip: Ipv4Addr,
    t0: Instant,
    next_row: Instant,
    last: Progress,
    /// Each director's `new_flows` when last seen (kept while it is down: a daemon started
    /// again over its pins may go on from there).
    last_flows: Vec<u64>,
    carried: Vec<u64>,
    /// Flows a director carried since the last row and before it died: shown in the next row.
    pending: Vec<Option<u64>>,
}

/// The new flows director `i`'s daemon has made, summed over its services; `None` when it is
/// not running or does not answer.
fn new_flows(ecmp: &Ecmp, i: usize) -> Option<u64> {
    let gw = &ecmp.gateways[i];
    if !gw.running() {
        return None;
    }
    gw.query_status().ok().map(|s| s.services.iter().map(|svc| svc.new_flows).sum())
}

/// Flows carried since the counter was `last`: a counter that went down was started again
/// from zero.
fn flows_since(last: u64, now: u64) -> u64 {
    if now >= last { now - last } else { now }
}

impl Ticker {
    fn new(ecmp: &Ecmp, vip: Ipv4Addr) -> Ticker {
        let n = ecmp.gateways.len();
        let last_flows = (0..n).map(|i| new_flows(ecmp, i).unwrap_or(0)).collect();
        let now = Instant::now();
        Ticker {
            vip,
            t0: now,
            next_row: now + Duration::from_secs(1),
            last: Progress::default(),
            last_flows,
            carried: vec![0; n],
            pending: vec![None; n],
        }
    }

    fn header(&self) {
        let cols: String = (0..self.carried.len()).map(|i| format!(" {:>5}", name(i))).collect();
        println!("{:43}| new flows each director carried in that second", "");
        println!("     time   new ok  failed   lines  broken |{cols} | the router's next hops");
    }

    fn row(&mut self, lab: &Lab, ecmp: &Ecmp, traffic: &Traffic) {
        let now = Instant::now();
        if now < self.next_row {
            return;
        }
        self.next_row += Duration::from_secs(1);
        let p = traffic.progress();
        let mut cols = String::new();
        for i in 0..self.carried.len() {
            match (new_flows(ecmp, i), self.pending[i].take()) {
                (Some(n), _) => cols += &format!(" {:>5}", self.count(i, n)),
                (None, Some(d)) => cols += &format!(" {d:>5}"),
                (None, None) => cols += &format!(" {:>5}", "down"),
            }
        }
        let hops = ecmp.nexthop_directors(lab, self.vip).map_or("?".to_owned(), |h| names(&h));
        println!(
            "  {:>6.1}s {:>8} {:>7} {:>7} {:>7} |{cols} | {hops}",
            (now - self.t0).as_secs_f64(),
            p.new_ok - self.last.new_ok,
            p.new_failed - self.last.new_failed,
            p.echoes - self.last.echoes,
            p.broken
        );
        self.last = p;
    }

    /// Counts director `i`'s counter at `n`; returns the flows since the last count.
    fn count(&mut self, i: usize, n: u64) -> u64 {
        let d = flows_since(self.last_flows[i], n);
        self.carried[i] += d;
        self.last_flows[i] = n;
        d
    }

    /// Counts what every running director carried since the last row.
    fn count_all(&mut self, ecmp: &Ecmp) {
        for i in 0..self.carried.len() {
            if let Some(n) = new_flows(ecmp, i) {
                self.count(i, n);
            }
        }
    }

    /// Counts what director `i` carried since the last row, before it dies: its next row
    /// shows that, the rows after it "down".
    fn last_look(&mut self, ecmp: &Ecmp, i: usize) {
        if let Some(n) = new_flows(ecmp, i) {
            let d = self.count(i, n);
            self.pending[i] = Some(d);
        }
    }

    /// Rows until the router's next hops are `want` or `limit` passes; returns when they were.
    fn until(&mut self, lab: &Lab, ecmp: &Ecmp, traffic: &Traffic, want: &BTreeSet<usize>, limit: Duration) -> Result<Option<Instant>> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.row(lab, ecmp, traffic);
            if ecmp.nexthop_directors(lab, self.vip).is_ok_and(|h| &h == want) {
                return Ok(Some(Instant::now()));
            }
            signals::sleep(TICK)?;
        }
        Ok(None)
    }

    fn run_for(&mut self, lab: &Lab, ecmp: &Ecmp, traffic: &Traffic, phase: Duration) -> Result<()> {
        let end = Instant::now() + phase;
        while Instant::now() < end {
            self.row(lab, ecmp, traffic);
            signals::sleep(TICK)?;
        }
        Ok(())
    }
}

/// The moments the story's events happened, for the summary.
struct Events {
    killed: Instant,
    kill_out: Option<Instant>,
    revive_from: Instant,
    revive_in: Option<Instant>,
    withdrawn: Instant,
    withdraw_out: Option<Instant>,
    announced: Instant,
    announce_in: Option<Instant>,
}

/// `>> what happened (t s after <since>)`, or that it did not within `limit`.
fn said(at: Option<Instant>, since: Instant, done: &str, not_done: &str, limit: Duration) {
    match at {
        Some(at) => println!("  >> {done} ({:.2} s after)", (at - since).as_secs_f64()),
        None => println!("  >> {not_done} after {limit:?}"),
    }
}

fn story(lab: &mut Lab, mut ecmp: Ecmp, opts: &Options) -> Result<EcmpSummary> {
    let vip = lab.vip4();
    let n = lab.director_count();
    let all: BTreeSet<usize> = (0..n).collect();
    let without = |j: usize| -> BTreeSet<usize> { all.iter().copied().filter(|&i| i != j).collect() };
    let (k, w) = (name(KILLED), name(WITHDRAWN));

    heading(4, "Traffic: 3 long-lived connections to every master, a line each every 50 ms; a new connection every 20 ms");
    let traffic = Traffic::start(lab, TrafficSpec::new(SocketAddr::new(vip.into(), PORT)))?;
    let mut ticker = Ticker::new(&ecmp, vip);
    println!("      (a new connection counts in the second it ends: one sent to a dead director fails after 900 ms)");
    ticker.header();
    ticker.run_for(lab, &ecmp, &traffic, opts.phase)?;
    println!("  >> director {k} dies: its link is cut, its mim-lb and BIRD get kill -9 (nothing tells the router)");
    ticker.last_look(&ecmp, KILLED);
    let killed = ecmp.kill(lab, KILLED)?;
    let kill_out = ticker.until(lab, &ecmp, &traffic, &without(KILLED), FOLLOW_LIMIT)?;
    said(kill_out, killed, &format!("the router dropped director {k} (BFD: 3 missed packets 100 ms apart); the others carry its flows"), &format!("the router still has director {k}"), FOLLOW_LIMIT);
    ticker.run_for(lab, &ecmp, &traffic, opts.phase)?;

    heading(5, &format!("Director {k} comes back: link up, mim-lb again over its pins, then BIRD"));
    println!("      mim-lb pulls its peers' flows first and puts the VIP's route in its table only once it has them");
    ticker.header();
    let revive_from = Instant::now();
    ecmp.revive(lab, KILLED, &[])?;
    let revive_in = ticker.until(lab, &ecmp, &traffic, &all, FOLLOW_LIMIT)?;
    said(revive_in, revive_from, &format!("director {k} is back in the router's route"), &format!("director {k} is not back in the route"), FOLLOW_LIMIT);
    if let Some(pulls) = pulls(lab, &ecmp, KILLED) {
        println!("      director {k}'s pull of its peers' flows before it announced (`mim-lb status`, Sync): {pulls}");
    }
    ticker.run_for(lab, &ecmp, &traffic, opts.phase)?;

    heading(6, &format!("`mim-lb withdraw` on director {w}: it leaves the route, and forwards what still reaches it"));
    ticker.header();
    let withdrawn = Instant::now();
    ecmp.withdraw(WITHDRAWN)?;
    let withdraw_out = ticker.until(lab, &ecmp, &traffic, &without(WITHDRAWN), FOLLOW_LIMIT)?;
    said(withdraw_out, withdrawn, &format!("the router dropped director {w}: no new flow for it, its connections go on elsewhere"), &format!("the router still has director {w}"), FOLLOW_LIMIT);
    ticker.run_for(lab, &ecmp, &traffic, opts.phase)?;
    println!("  >> `mim-lb announce` on director {w}");
    let announced = Instant::now();
    ecmp.announce(WITHDRAWN)?;
    let announce_in = ticker.until(lab, &ecmp, &traffic, &all, FOLLOW_LIMIT)?;
    said(announce_in, announced, &format!("director {w} is back in the router's route"), &format!("director {w} is not back in the route"), FOLLOW_LIMIT);
    ticker.run_for(lab, &ecmp, &traffic, opts.phase)?;
    let report = traffic.finish();
    // The flows of the last part of a second, which no row showed, count too.
    ticker.count_all(&ecmp);
    if signals::interrupted() {
        bail!(signals::Interrupted);
    }

    let events = Events { killed, kill_out, revive_from, revive_in, withdrawn, withdraw_out, announced, announce_in };
    let summary = summarize(lab, &report, &events, ticker.carried.clone());
    heading(7, "Summary");
    super::summary::print_verdict(
        &summary.render(),
        &summary.problems(),
        "every director carried flows, no long-lived connection broke, and new connections failed only until the router dropped the dead director",
        (!opts.live).then(|| summary.to_json()),
    );
    if opts.keep {
        keep(lab, &ecmp)?;
    }
    drop(ecmp);
    Ok(summary)
}

/// Director `i`'s pulls of its peers' state, by peer: "B done, C done" (`done`, `pulling`,
/// `gave up` or `none`: it needs one peer's).
fn pulls(lab: &Lab, ecmp: &Ecmp, i: usize) -> Option<String> {
    let sync = ecmp.gateways[i].query_status().ok()?.sync?;
    let peer = |address: &str| {
        (0..lab.director_count()).find(|&j| address.split(':').next() == Some(&lab.director_addr4(j).to_string())).map_or_else(|| address.to_owned(), name)
    };
    Some(sync.peers.iter().map(|p| format!("{} {}", peer(&p.address), p.pull)).collect::<Vec<_>>().join(", "))
}

fn summarize(lab: &Lab, report: &TrafficReport, e: &Events, carried: Vec<u64>) -> EcmpSummary {
    // The router sends some new connections to the dead director until BFD drops it: those
    // may fail. The kill's window ends where the route converged (or where the return began).
    let converged = e.kill_out.unwrap_or(e.revive_from);
    let in_outage = |t: Instant| t >= e.killed && t < converged;
    let failed: Vec<_> = report.attempts.iter().filter(|a| a.outcome.is_err()).collect();
    let before = failed.iter().filter(|a| in_outage(a.started)).count();
    EcmpSummary {
        directors: lab.director_count(),
        masters: lab.master_count(),
        held: report.held.len(),
        held_broken: report.broken_held().len(),
        carried,
        kill_out_after: e.kill_out.map(|t| t - e.killed),
        revive_in_after: e.revive_in.map(|t| t - e.revive_from),
        withdraw_out_after: e.withdraw_out.map(|t| t - e.withdrawn),
        announce_in_after: e.announce_in.map(|t| t - e.announced),
        failed_before_converged: before,
        failed_otherwise: failed.len() - before,
        new_ok: report.attempts.len() - failed.len(),
        new_failed: failed.len(),
    }
}

/// What an operator needs to look around in the ECMP lab: rows of
/// [`super::keep::print_guide`], every command runnable as printed (tests/tests/lab_demo.rs).
fn guide(lab: &Lab, ecmp: &Ecmp) -> Vec<(&'static str, String)> {
    let cli = super::keep::operator_cli();
    let router = lab.router_ns().unwrap_or_default();
    let config = |i: usize| ecmp.gateways[i].config_path().display().to_string();
    let w = WITHDRAWN;
    vec![
        ("the router", format!("ip netns exec {router} bash")),
        ("its route to the VIP", format!("ip -n {router} route show {}", lab.vip4())),
        ("its BGP sessions", format!("birdc -s {} show protocols", ecmp.router.socket().display())),
        ("director A", format!("ip netns exec {} bash", lab.director_ns(0))),
        ("", format!("(the others: {})", (1..lab.director_count()).map(|i| lab.director_ns(i)).collect::<Vec<_>>().join(", "))),
        ("the client", format!("ip netns exec {} bash", lab.client_ns())),
        ("mim-lb status on A", format!("{cli} status --config {}", config(0))),
        ("", "(Announce: the VIP's route; Sync: the group and each peer; NewFlows per master)".to_owned()),
        ("A's announced route", format!("ip -n {} route show table {} proto {}", lab.director_ns(0), crate::bird::ANNOUNCE_TABLE, crate::bird::ANNOUNCE_PROTOCOL)),
        ("take B out of ECMP", format!("{cli} withdraw --config {}", config(w))),
        ("and back in", format!("{cli} announce --config {}", config(w))),
        (super::keep::GUIDE_LAST_LABEL, format!("bpftool map dump pinned {}/BACKENDS", ecmp.gateways[0].pin_dir().display())),
    ]
}

/// `--keep`: the lab stays up until Ctrl-C, with the commands to look around.
fn keep(lab: &Lab, ecmp: &Ecmp) -> Result<()> {
    super::keep::print_guide(&guide(lab, ecmp));
    let _ = std::io::stdout().flush();
    loop {
        if signals::sleep(Duration::from_secs(1)).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> EcmpSummary {
        let ms = |n| Some(Duration::from_millis(n));
        EcmpSummary {
            directors: 3,
            masters: 3,
            held: 9,
            held_broken: 0,
            carried: vec![300, 310, 290],
            kill_out_after: ms(350),
            revive_in_after: ms(1200),
            withdraw_out_after: ms(40),
            announce_in_after: ms(40),
            failed_before_converged: 6,
            failed_otherwise: 0,
            new_ok: 900,
            new_failed: 6,
        }
    }

    #[test]
    fn a_story_that_held_has_no_problems() {
        let s = good();
        assert!(s.problems().is_empty(), "{:?}", s.problems());
        let j = s.to_json();
        assert_eq!(j["carried"]["B"], 310);
        assert_eq!(j["kill_out_after_ms"], 350);
        assert!(s.render().iter().any(|l| l.contains("A 300, B 310, C 290")), "{:#?}", s.render());
    }

    #[test]
    fn each_broken_promise_is_named() {
        let mut s = good();
        s.held_broken = 1;
        s.carried[2] = 0;
        s.kill_out_after = None;
        s.announce_in_after = None;
        s.failed_otherwise = 2;
        let p = s.problems();
        assert!(p.iter().any(|p| p.contains("1 of 9 long-lived connections broke")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("director C carried no new flow")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("kept director A")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("after `mim-lb announce`")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("2 new connections failed")), "{p:?}");
    }

    #[test]
    fn a_counter_that_went_down_started_again() {
        assert_eq!(flows_since(10, 15), 5);
        assert_eq!(flows_since(10, 3), 3);
    }
}
