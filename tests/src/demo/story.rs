//! The demo's story, step by step. Everything it makes belongs to a [`Lab`] and a [`Gateway`],
//! whose `Drop` removes it, so an error or Ctrl-C anywhere (see [`signals`]) cleans up too.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use mim_lb::status::Status;

use super::signals::{self, Interrupted};
use super::summary::{JSON_PREFIX, Summary};
use super::tally::Tally;
use super::traffic::Traffic;
use super::view::{self, Frame, LiveView, MasterRow};
use crate::gateway::{Gateway, Mode, ServiceSpec, lab_config, mim_lb_binary};
use crate::{Lab, LabSpec};

/// The VIP's port, where the masters answer.
pub const PORT: u16 = 7000;
/// Where the slaves answer.
pub const SLAVE_PORT: u16 = 9000;
/// The service's name in mim-lb's config, as in the example config.
const SERVICE: &str = "mim-master";
/// Each step of a request (master, then slave) gets this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the live view and mim-lb's status are refreshed.
const TICK: Duration = Duration::from_millis(50);
/// How long mim-lb may take to mark the master down or up before the demo says it did not.
const STATE_CHANGE_LIMIT: Duration = Duration::from_secs(10);
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

const STEPS: usize = 6;

/// Prints `[n/6] title ...`, runs `f`, and finishes the line with how long it took.
fn step<T>(n: usize, title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    print!("[{n}/{STEPS}] {title} ... ");
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

/// The live part of the demo: what the story needs while traffic flows.
struct Show<'a> {
    gateway: &'a Gateway,
    traffic: Traffic,
    tally: Tally,
    view: Box<dyn LiveView>,
    rate: u32,
    /// When the traffic started: the live view's clock.
    t0: Instant,
    /// The masters' names and addresses (to find them in mim-lb's status).
    names: Vec<String>,
    addresses: Vec<IpAddr>,
    /// The master whose service the story kills.
    killed: usize,
}

impl Show<'_> {
    /// Takes in finished requests, asks mim-lb for its status, and redraws.
    fn tick(&mut self) -> Result<Status> {
        signals::check()?;
        for outcome in self.traffic.finished() {
            self.tally.record(&outcome);
        }
        let status = self.gateway.query_status().context("asking mim-lb for its status")?;
        let frame = self.frame(&status, Instant::now());
        self.view.frame(&frame);
        Ok(status)
    }

    fn backend<'s>(&self, status: &'s Status, master: usize) -> Option<&'s mim_lb::status::BackendStatus> {
        status.services.iter().flat_map(|s| &s.backends).find(|b| b.address == self.addresses[master])
    }

    fn state(&self, status: &Status, master: usize) -> String {
        self.backend(status, master).map_or_else(|| "?".to_owned(), |b| b.state.clone())
    }

    fn frame(&self, status: &Status, now: Instant) -> Frame {
        let total = self.tally.counts(self.t0, None);
        let last = self.tally.last_second(now);
        Frame {
            elapsed: now - self.t0,
            rate: self.rate,
            requests: total.requests,
            failed: total.failed,
            last_second_requests: last.requests,
            last_second_failed: last.failed,
            masters: (0..self.names.len())
                .map(|k| MasterRow {
                    name: self.names[k].clone(),
                    address: self.addresses[k].to_string(),
                    state: self.state(status, k),
                    total: total.per_master[k],
                    last_second: last.per_master[k],
                })
                .collect(),
        }
    }

    /// Shows traffic for `duration`.
    fn run_for(&mut self, duration: Duration) -> Result<()> {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.tick()?;
            signals::sleep(TICK)?;
        }
        Ok(())
    }

    /// Shows traffic until mim-lb's status gives `master` a state for which `wanted` holds,
    /// for at most [`STATE_CHANGE_LIMIT`] after `since`; returns when that was seen and the
    /// status of that moment. `each` runs after every tick (for events).
    fn run_until_state(
        &mut self,
        master: usize,
        wanted: impl Fn(&str) -> bool,
        since: Instant,
        mut each: impl FnMut(&mut Self),
    ) -> Result<Option<(Instant, Status)>> {
        loop {
            let status = self.tick()?;
            let now = Instant::now();
            each(self);
            if wanted(&self.state(&status, master)) {
                return Ok(Some((now, status)));
            }
            if now >= since + STATE_CHANGE_LIMIT {
                return Ok(None);
            }
            signals::sleep(TICK)?;
        }
    }

    /// A line above the live view, timed from `since`.
    fn event(&mut self, since: Instant, text: &str) {
        let at = Instant::now().saturating_duration_since(since);
        self.view.event(&format!("      +{:.2} s  {text}", at.as_secs_f64()));
    }

    /// Shows mim-lb's own log line about `backend` changing state, the first one after log
    /// line `since`. The daemon logs the change before it answers the status that showed it,
    /// so the line is there or about to be; if it is not, there is nothing to show.
    fn log_event(&mut self, since: usize, backend: IpAddr) {
        let needle = format!("backend {backend} of ");
        if let Ok(line) = self.gateway.proc().wait_for_line_since(since, &needle, Duration::from_secs(1)) {
            // env_logger's `[time LEVEL target] ` prefix says nothing here.
            let message = line.split_once("] ").map_or(line.as_str(), |(_, m)| m);
            self.view.event(&format!("               mim-lb logs: {message}"));
        }
    }
}

/// Polls mim-lb until every master is up.
fn wait_all_up(gateway: &Gateway) -> Result<()> {
    let deadline = Instant::now() + STATE_CHANGE_LIMIT;
    loop {
        let status = gateway.query_status().context("asking mim-lb for its status")?;
        if status.services.iter().all(|s| s.backends.iter().all(|b| b.state == "up")) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("not every master was up after {STATE_CHANGE_LIMIT:?}:\n{}", mim_lb::status::render(&status));
        }
        signals::sleep(TICK)?;
    }
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
    println!("      every master is up after {:.1} s; `mim-lb status` says:", started.elapsed().as_secs_f64());
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
    for line in summary.render() {
        println!("{line}");
    }
    let problems = summary.problems();
    if problems.is_empty() {
        println!("  => as it should be: every request after the detection succeeded");
    } else {
        println!("  => NOT as it should be:");
        for p in &problems {
            println!("     - {p}");
        }
    }
    // For scripts and CI; people on a terminal have the lines above.
    if !opts.live {
        println!("{JSON_PREFIX}{}", summary.to_json());
    }

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

/// Leaves the lab running until Ctrl-C, with what an operator needs to look around.
fn keep(lab: &Lab, gateway: &Gateway) -> Result<()> {
    let cli = operator_cli();
    let socket = gateway.socket().display();
    let pin_dir = gateway.pin_dir().display();
    let mut maps: Vec<String> = std::fs::read_dir(gateway.pin_dir())
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    maps.sort();
    let vip = lab.vip4();
    let row = |what: &str, how: String| println!("  {what:<22} {how}");
    println!("\nThe lab keeps running (the demo's traffic has stopped). Press Ctrl-C to remove it.");
    row("enter a host", format!("ip netns exec {} bash", lab.client_ns()));
    // The other namespaces differ from the client's only in the role at the end.
    let prefix = lab.client_ns().trim_end_matches("client");
    let others: Vec<&str> = std::iter::once(lab.gateway_ns())
        .chain((0..lab.master_count()).map(|i| lab.master_ns(i)))
        .chain((0..lab.slave_count()).map(|i| lab.slave_ns(i)))
        .map(|ns| ns.trim_start_matches(prefix))
        .collect();
    row("", format!("(the others: {prefix}{{{}}})", others.join(",")));
    // Both steps of a request, with nothing but bash: ask the VIP, then go to the slave.
    row(
        "ask for a slave",
        format!(
            "ip netns exec {} bash -c 'exec 3<>/dev/tcp/{vip}/{PORT}; echo \"slave?\" >&3; \
             read -r m _ a <&3; echo \"$m: slave $a\"; exec 4<>/dev/tcp/${{a%:*}}/${{a#*:}}; head -n1 <&4'",
            lab.client_ns()
        ),
    );
    row("mim-lb status", format!("{cli} --socket {socket} status"));
    row(
        "take a master out",
        format!("{cli} --socket {socket} disable {SERVICE} {}   (enable: the same with enable)", lab.master_addr4(0)),
    );
    row("unplug a master", format!("ip -n {} link set eth0 down   (and up again)", lab.master_ns(0)));
    row("the config", gateway.config_path().display().to_string());
    row("the XDP program", format!("ip netns exec {} bpftool net show dev eth0", lab.gateway_ns()));
    row("its maps", format!("bpftool map dump pinned {pin_dir}/BACKENDS"));
    row("", format!("(pinned in {pin_dir}: {})", maps.join(", ")));
    let _ = std::io::stdout().flush();
    loop {
        match signals::sleep(Duration::from_secs(1)) {
            Ok(()) => {}
            Err(Interrupted) => return Ok(()),
        }
        // The lab is only useful while the daemon serves; say so if it stopped.
        if let Ok(Some(status)) = gateway.proc().try_exit_status() {
            anyhow::bail!("mim-lb exited ({status}):\n{}", gateway.proc().tail(20));
        }
    }
}

/// The mim-lb command for the operator: the real `mim-lb` binary if it was built next to this
/// one (`cargo xtask lab` builds it), else `mim-lb-dut`, the same CLI under the test crate's name.
fn operator_cli() -> String {
    let dut = mim_lb_binary();
    let real = dut.with_file_name("mim-lb");
    if real.exists() { real } else { dut }.display().to_string()
}
