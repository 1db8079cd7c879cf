//! The demo's story, step by step. Everything it makes belongs to a [`Lab`] and a [`Gateway`],
//! whose `Drop` removes it, so an error or Ctrl-C anywhere (see [`signals`]) cleans up too.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::keep::keep;
use super::show::{STATE_CHANGE_LIMIT, Show, TICK, wait_all_up};
use super::signals;
use super::summary::Summary;
use super::tally::Tally;
use super::traffic::Traffic;
use super::view;
use crate::gateway::{Gateway, Mode, ServiceSpec, lab_config};
use crate::{Lab, LabSpec};

/// The VIP's port, where the masters answer.
pub const PORT: u16 = 7000;
/// Where the slaves answer.
pub const SLAVE_PORT: u16 = 9000;
/// The service's name in mim-lb's config, as in the example config.
pub const SERVICE: &str = "mim-master";
/// Each step of a request (master, then slave) gets this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Health checks: this many failed (passed) checks in a row mark a master down (up).
const FALL: u32 = 2;
const RISE: u32 = 2;

/// What the demo does, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub masters: usize,
    pub slaves: usize,
    /// Requests per second.
    pub rate: u32,
    /// How long each phase of traffic lasts (after the state change it waits for).
    pub phase: Duration,
    /// The master (0-based) whose service is killed.
    pub kill: usize,
    /// Redraw a table in place (a terminal) instead of printing a line per second.
    pub live: bool,
    /// Leave the lab running after the summary, until Ctrl-C.
    pub keep: bool,
    pub mode: Mode,
    pub check_interval: Duration,
    /// 1: the one-gateway story; 2: two directors and keepalived ([`super::pair`]); with
    /// [`Options::ecmp`], 2 to 8 directors behind a router ([`super::ecmp`]).
    pub directors: usize,
    /// The directors sit behind an ECMP router and announce the VIP with BIRD.
    pub ecmp: bool,
}

/// Runs the demo and returns its summary. With [`Options::keep`], returns only after Ctrl-C,
/// with the lab removed.
pub fn run(opts: &Options) -> Result<Summary> {
    let removed = crate::cleanup_stale_labs().context("removing labs of earlier runs that were killed")?
        + crate::gateway::cleanup_stale_pins().context("removing pins of earlier runs that were killed")?;
    if removed > 0 {
        println!("(removed {removed} namespaces and pin directories that killed runs left behind)");
    }
    let (bold, reset) = if opts.live { (BOLD, RESET) } else { ("", "") };
    println!(
        "{bold}mim-lb lab{reset}: a client, a gateway running mim-lb, {} masters behind its VIP and {} slaves,",
        opts.masters, opts.slaves
    );
    println!("each in a network namespace of its own on this machine, all on one bridge\n");

    let mut lab = step(1, "Building the lab", || {
        Lab::new(LabSpec { masters: opts.masters, slaves: opts.slaves, ..LabSpec::default() })
    })?;
    let gateway = match start(&mut lab, opts) {
        Ok(gateway) => gateway,
        Err(e) => {
            teardown(lab, None);
            return Err(e);
        }
    };
    let result = with_gateway(&mut lab, &gateway, opts);
    teardown(lab, Some(gateway));
    result
}

const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// Steps of either demo (one director, or two).
pub(super) const STEPS: usize = 6;

/// Prints `[n/6] title ...`, runs `f`, and finishes the line with how long it took.
pub(super) fn step<T>(n: usize, title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    step_of(n, STEPS, title, f)
}

/// [`step`] for a story of `steps` steps.
pub(super) fn step_of<T>(n: usize, steps: usize, title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let gap = if n > 1 { "\n" } else { "" };
    print!("{gap}[{n}/{steps}] {title} ... ");
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    let value = f();
    match &value {
        Ok(_) => println!("done in {:.2} s", started.elapsed().as_secs_f64()),
        Err(_) => println!("failed"),
    }
    value
}

fn heading(n: usize, title: &str, live: bool) {
    let (bold, reset) = if live { (BOLD, RESET) } else { ("", "") };
    println!("\n{bold}[{n}/{STEPS}] {title}{reset}");
}

/// Stops the daemon (which detaches and removes its pins) and then deletes the namespaces,
/// saying so: on success, on error and after Ctrl-C alike.
fn teardown(lab: Lab, gateway: Option<Gateway>) {
    let why = if signals::interrupted() { "Interrupted: removing" } else { "Removing" };
    print!("\n{why} the lab (mim-lb, its pins, {} namespaces) ... ", lab.namespaces().len());
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    drop(gateway);
    drop(lab);
    println!("done in {:.2} s", started.elapsed().as_secs_f64());
}

/// Starts the masters' and slaves' services and mim-lb.
fn start(lab: &mut Lab, opts: &Options) -> Result<Gateway> {
    describe_lab(lab);
    let slaves = slave_addresses(lab);
    lab.start_slave_servers(SLAVE_PORT)?;
    for i in 0..lab.master_count() {
        lab.start_master_service(i, PORT, slaves.clone())?;
    }
    signals::check()?;

    let interval = opts.check_interval.as_millis();
    let gateway = step(2, "Starting mim-lb on the gateway", || {
        let service = ServiceSpec {
            name: SERVICE.into(),
            health: format!("interval_ms = {interval}\ntimeout_ms = {interval}\nrise = {RISE}\nfall = {FALL}"),
            ..ServiceSpec::tcp(lab, PORT)
        };
        let config = lab_config(lab, &[service], "");
        let started = Gateway::start(lab, &config, opts.mode);
        if opts.mode == Mode::Native {
            started.context("starting mim-lb (if native XDP is what fails here, try --xdp-mode generic)")
        } else {
            started
        }
    })?;
    println!(
        "      {} XDP on the gateway's eth0; a tcp health check of each master every {interval} ms:",
        opts.mode.name()
    );
    println!("      down after {FALL} failures in a row, up again after {RISE} successes");
    Ok(gateway)
}

fn describe_lab(lab: &Lab) {
    let row = |name: &str, addr: IpAddr, ns: &str, role: &str| {
        println!("      {name:<9} {:<14} {ns:<22} {role}", addr.to_string());
    };
    row("client", lab.client_addr4().into(), lab.client_ns(), "sends the requests");
    row("gateway", lab.gateway_addr4().into(), lab.gateway_ns(), &format!("VIP {} on eth0; runs mim-lb", lab.vip4()));
    for i in 0..lab.master_count() {
        row(
            &lab.master_name(i),
            lab.master_addr4(i).into(),
            lab.master_ns(i),
            &format!("VIP on lo; master service on port {PORT}"),
        );
    }
    for i in 0..lab.slave_count() {
        row(
            &lab.slave_name(i),
            lab.slave_addr4(i).into(),
            lab.slave_ns(i),
            &format!("slave service on port {SLAVE_PORT}"),
        );
    }
    println!("      masters answer clients directly, not through the gateway (direct routing)");
}

/// Prints another program's output, indented; on a terminal, cut to its width.
fn print_indented(text: &str) {
    let width = view::terminal_width();
    for line in text.lines() {
        let line = format!("        {line}");
        match width {
            Some(w) => println!("{}", view::fit(&line, w)),
            None => println!("{line}"),
        }
    }
}

fn with_gateway(lab: &mut Lab, gateway: &Gateway, opts: &Options) -> Result<Summary> {
    let started = Instant::now();
    wait_all_up(gateway)?;
    println!(
        "      the health checks found every master up in {:.2} s; `mim-lb status` says:",
        started.elapsed().as_secs_f64()
    );
    print_indented(&gateway.ctl(&["status"])?);

    heading(3, &format!("Traffic: {} requests/s from the client, each on new connections", opts.rate), opts.live);
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    println!("      a request: client -> VIP {vip} -> mim-lb sends it on to a master;");
    println!("                 the master answers \"master-N slave ADDR\" -> the client connects to that slave");
    let names: Vec<String> = (0..lab.master_count()).map(|i| lab.master_name(i)).collect();
    let mut show = Show {
        gateway,
        traffic: Traffic::start(lab.client_ns(), vip, opts.rate, REQUEST_TIMEOUT)?,
        tally: Tally::new(names.clone()),
        view: view::for_stdout(opts.live),
        rate: opts.rate,
        t0: Instant::now(),
        names,
        addresses: (0..lab.master_count()).map(|i| lab.master_addr4(i).into()).collect(),
        killed: opts.kill,
    };
    show.view.begin();
    show.run_for(opts.phase)?;
    show.view.end();

    let kill = kill_phase(&mut show, lab, opts)?;
    let back = return_phase(&mut show, lab, opts)?;
    let end_at = Instant::now();
    for outcome in show.traffic.stop() {
        show.tally.record(&outcome);
    }

    let summary = summarize(&show, &kill, &back, end_at);
    heading(6, "Summary", opts.live);
    // The JSON line is for scripts and CI; people on a terminal have the lines above.
    super::summary::print_verdict(
        &summary.render(),
        &summary.problems(),
        "every request after the detection succeeded",
        (!opts.live).then(|| summary.to_json()),
    );

    if opts.keep {
        keep(lab, gateway)?;
    }
    Ok(summary)
}

/// What happened in the kill phase.
struct KillPhase {
    at: Instant,
    /// When mim-lb's status said the master was no longer up, and why.
    detected: Option<Instant>,
    reason: String,
}

/// What happened in the return phase.
struct ReturnPhase {
    at: Instant,
    /// When mim-lb's status said the master was up again.
    up: Option<Instant>,
}

/// Kills the master's service and shows traffic until mim-lb noticed, and for a phase more.
fn kill_phase(show: &mut Show, lab: &mut Lab, opts: &Options) -> Result<KillPhase> {
    let victim = opts.kill;
    let name = lab.master_name(victim);
    heading(4, &format!("Killing {name}'s service: its port {PORT} refuses connections, the host stays up"), opts.live);
    show.view.begin();
    let log_mark = show.gateway.proc().line_count();
    // From here on, failures belong to the kill.
    let at = Instant::now();
    lab.stop_servers(victim, PORT);
    show.event(at, &format!("{name}'s service is gone"));
    let mut failure_seen = false;
    let down = show.run_until_state(
        victim,
        |s| s != "up",
        at,
        |show| {
            if !failure_seen && show.tally.counts(at, None).failed > 0 {
                failure_seen = true;
                show.event(at, "clients see failures: mim-lb still sends some of them to the dead service");
            }
        },
    )?;
    let mut phase = KillPhase { at, detected: None, reason: String::new() };
    let mut status_text = None;
    match down {
        Some((detected, status)) => {
            phase.detected = Some(detected);
            phase.reason = show.backend(&status, victim).map(|b| b.reason.clone()).unwrap_or_default();
            show.event(
                at,
                &format!("mim-lb marks {name} {}: no new connection goes there", show.state(&status, victim)),
            );
            show.log_event(log_mark, lab.master_addr4(victim).into());
            status_text = Some(show.gateway.ctl(&["status"])?);
        }
        None => show.event(at, &format!("mim-lb has not marked {name} down after {STATE_CHANGE_LIMIT:?}")),
    }
    show.run_for(opts.phase)?;
    show.view.end();
    if let Some(text) = status_text {
        println!("      `mim-lb status` when it noticed:");
        print_indented(&text);
    }
    Ok(phase)
}

/// Restarts the master's service and shows traffic until mim-lb takes it back, and for a phase
/// more.
fn return_phase(show: &mut Show, lab: &mut Lab, opts: &Options) -> Result<ReturnPhase> {
    let victim = opts.kill;
    let name = lab.master_name(victim);
    heading(5, &format!("Restarting {name}'s service"), opts.live);
    show.view.begin();
    let log_mark = show.gateway.proc().line_count();
    let at = Instant::now();
    lab.start_master_service(victim, PORT, slave_addresses(lab))?;
    show.event(at, &format!("{name}'s service listens again"));
    let up = show.run_until_state(victim, |s| s == "up", at, |_| {})?.map(|(when, _)| when);
    match up {
        Some(_) => {
            show.event(at, &format!("mim-lb marks {name} up: new connections go there again"));
            show.log_event(log_mark, lab.master_addr4(victim).into());
        }
        None => show.event(at, &format!("mim-lb has not marked {name} up after {STATE_CHANGE_LIMIT:?}")),
    }
    let mut answer_seen = false;
    let until = Instant::now() + opts.phase;
    while Instant::now() < until {
        show.tick()?;
        if !answer_seen && show.tally.counts(at, None).per_master[victim] > 0 {
            answer_seen = true;
            show.event(at, &format!("{name} answers requests again"));
        }
        signals::sleep(TICK)?;
    }
    show.view.end();
    Ok(ReturnPhase { at, up })
}

fn summarize(show: &Show, kill: &KillPhase, back: &ReturnPhase, end_at: Instant) -> Summary {
    let tally = &show.tally;
    let victim = &show.names[show.killed];
    let phases = vec![
        ("every master up".to_owned(), tally.counts(show.t0, Some(kill.at))),
        (format!("{victim} killed"), tally.counts(kill.at, Some(back.at))),
        (format!("{victim} back"), tally.counts(back.at, Some(end_at))),
    ];
    let after_kill = &phases[1].1;
    let total = tally.counts(show.t0, Some(end_at));
    Summary {
        masters: show.names.clone(),
        killed: show.killed,
        failures_after_kill: after_kill.failed,
        failure_window: after_kill
            .first_failure
            .zip(after_kill.last_failure)
            .map(|(first, last)| (first - kill.at, last - kill.at)),
        detected_after: kill.detected.map(|d| d - kill.at),
        down_reason: kill.reason.clone(),
        after_detection: kill.detected.map(|d| {
            let c = tally.counts(d, Some(back.at));
            (c.ok, c.failed)
        }),
        back_up_after: back.up.map(|u| u - back.at),
        failure_kinds: after_kill.failure_kinds.clone(),
        slaves: total.per_slave.clone(),
        total,
        phases,
    }
}

fn slave_addresses(lab: &Lab) -> Vec<SocketAddr> {
    (0..lab.slave_count()).map(|i| SocketAddr::new(lab.slave_addr4(i).into(), SLAVE_PORT)).collect()
}
