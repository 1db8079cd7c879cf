//! Failover time, end to end: the namespace lab, the real daemon on its gateway with the lab's
//! health settings, a client opening new connections to the VIP in a tight (bounded) loop, and
//! one master's service killed and restarted.
//!
//! The masters' service is a small one of our own rather than the lab's servers, because it
//! can be killed at an exact instant: `shutdown(2)` on its listening socket makes the port
//! refuse connections at once (the lab's servers notice a stop request only at their next
//! 50 ms tick). Protocol as the lab's: on accept, `<name>\n`, then close.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mim_lb::control::{client::request, protocol::Request};
use mim_lb::status::Status;
use mim_lb_tests::{
    Lab, LabSpec,
    gateway::{Gateway, Mode, ServiceSpec, lab_config, mim_lb_binary},
    netns::{set_sysctls, spawn_in_netns},
    tcp_ask,
};
use serde_json::json;

use crate::interrupt;
use crate::report::{Section, max, median};

const PORT: u16 = 7000;
/// The longest any single phase may take before the round is abandoned as failed.
const PHASE_LIMIT: Duration = Duration::from_secs(15);
/// How long one client connection may take (connect + name line).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Settings {
    pub rounds: usize,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub masters: usize,
    /// How long the client keeps going after the gateway reports the master down (to see
    /// that no failure follows) and after it is back.
    pub settle_ms: u64,
    pub native: bool,
}

/// A master's service that can be killed at an exact instant.
struct Service {
    stop: Arc<AtomicBool>,
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl Service {
    fn start(ns: &str, name: String) -> Result<Service> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<i32>>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_t = Arc::clone(&stop);
        let thread = spawn_in_netns(ns, "bench-service", move || {
            let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            let _ = tx.send(Ok(listener.as_raw_fd()));
            let line = format!("{name}\n");
            // Blocking accept: a shutdown of the socket wakes it with an error.
            while !stop_t.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.write_all(line.as_bytes());
                    }
                    Err(_) if stop_t.load(Ordering::Relaxed) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })?;
        let fd = rx.recv().context("service thread died")??;
        Ok(Service { stop, fd, thread: Some(thread) })
    }

    /// Kills the service: from the returned instant on, the port refuses connections.
    fn kill(mut self) -> Instant {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: the fd is the live listening socket, owned by the thread until it exits,
        // which it cannot do before this call wakes it (or it sees `stop` after an accept).
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        let at = Instant::now();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        at
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::Relaxed);
            // SAFETY: as in `kill`: the thread still owns the open socket.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
            let _ = t.join();
        }
    }
}

/// One client connection attempt.
#[derive(Clone, Debug)]
struct Attempt {
    start: Instant,
    end: Instant,
    /// The master that answered, or why it failed.
    outcome: Result<usize, &'static str>,
}

fn classify(err: &anyhow::Error) -> &'static str {
    for cause in err.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "refused",
                std::io::ErrorKind::ConnectionReset => "reset",
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout",
                _ => "other",
            };
        }
    }
    if format!("{err:#}").contains("closed before") { "closed" } else { "other" }
}

/// The client: new connections to the VIP one after another until stopped (or the limit).
struct Client {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    fn start(lab: &Lab, vip: SocketAddr, limit: Duration) -> Result<Client> {
        let attempts = Arc::new(Mutex::new(Vec::with_capacity(50_000)));
        let stop = Arc::new(AtomicBool::new(false));
        let names: Vec<String> = (0..lab.master_count()).map(|i| lab.master_name(i)).collect();
        let (a, s) = (Arc::clone(&attempts), Arc::clone(&stop));
        let thread = spawn_in_netns(lab.client_ns(), "bench-client", move || {
            let deadline = Instant::now() + limit;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline && !interrupt::interrupted() {
                let start = Instant::now();
                let result = tcp_ask(vip, CONNECT_TIMEOUT);
                let end = Instant::now();
                let outcome = match result {
                    Ok(name) => names.iter().position(|n| *n == name).ok_or("unknown name"),
                    Err(e) => Err(classify(&e)),
                };
                a.lock().unwrap().push(Attempt { start, end, outcome });
            }
        })?;
        Ok(Client { attempts, stop, thread: Some(thread) })
    }

    fn any(&self, f: impl Fn(&Attempt) -> bool) -> bool {
        self.attempts.lock().unwrap().iter().any(f)
    }

    fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.attempts.lock().unwrap())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn state_of(status: &Status, master: Ipv4Addr) -> Option<String> {
    status
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .find(|b| b.address == std::net::IpAddr::V4(master))
        .map(|b| b.state.clone())
}

/// Polls the daemon's status over its control socket (what `mim-lb status` asks) until
/// `master`'s state is `want`. Returns (first poll that showed it, last poll before that).
fn poll_state(gw: &Gateway, master: Ipv4Addr, want: &str, latencies: &mut Vec<f64>) -> Result<(Instant, Instant)> {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut last_other = Instant::now();
    loop {
        interrupt::check()?;
        let asked = Instant::now();
        let response = request(gw.socket(), &Request::Status).context("asking the daemon for its status")?;
        latencies.push(since(Instant::now(), asked));
        let status = response.status.context("status response without a status")?;
        if state_of(&status, master).as_deref() == Some(want) {
            return Ok((Instant::now(), last_other));
        }
        last_other = asked;
        if Instant::now() > deadline {
            bail!("{master} not {want} within {PHASE_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        interrupt::check()?;
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

struct Round {
    victim: usize,
    /// Kill to the first status poll showing the master down, and that poll's resolution
    /// (time since the previous poll, which still showed it up).
    detect_ms: f64,
    detect_resolution_ms: f64,
    /// Kill to the end of the last failed connection: from then on every new one succeeded.
    window_ms: f64,
    failed: usize,
    /// Connections started between the kill and the end of the window.
    in_window: usize,
    failed_by_kind: std::collections::BTreeMap<&'static str, usize>,
    /// Connections during the whole round and their rate.
    connections: usize,
    rate: f64,
    /// Restart to the status showing it up, and to its first client connection.
    up_ms: f64,
    back_ms: f64,
    failed_after_recovery: usize,
    failed_before_kill: usize,
    /// How long the daemon took to answer a status request (it shares one event loop with
    /// the health verdicts).
    poll_median_ms: f64,
    poll_max_ms: f64,
}

/// One round in a lab of its own (so that every round starts alike: no recorded flows, no
/// marked slots, no sweep under way): kill one master's service, wait until the daemon has
/// taken it out and the client sees no more failures, restart it, wait until it takes
/// connections again. Everything is dropped (daemon, servers, namespaces) on return.
fn round(settings: &Settings, health: &str, mode: Mode, r: usize) -> Result<Round> {
    let lab = Lab::new(LabSpec { masters: settings.masters, ipv6: false, vips: 1, ..LabSpec::default() })?;
    // A wide port range: the client opens tens of thousands of connections per round.
    set_sysctls(lab.client_ns(), &[("net.ipv4.ip_local_port_range", "1024 65535")])?;
    let mut lab = lab;
    let mut services: Vec<Option<Service>> = (0..lab.master_count())
        .map(|i| Service::start(lab.master_ns(i), lab.master_name(i)).map(Some))
        .collect::<Result<_>>()?;
    let config = lab_config(&lab, &[ServiceSpec { health: health.to_owned(), ..ServiceSpec::tcp(&lab, PORT) }], "");
    let gw = Gateway::start(&mut lab, &config, mode)?;
    gw.wait_all_up()?;
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let settle = Duration::from_millis(settings.settle_ms);

    let victim = r % lab.master_count();
    let master = lab.master_addr4(victim);
    let client = Client::start(&lab, vip, 4 * PHASE_LIMIT)?;
    // Warm-up: every master answers before anything is killed.
    let n = lab.master_count();
    wait_for("every master answering through the VIP", PHASE_LIMIT, || {
        (0..n).all(|i| client.any(|a| a.outcome == Ok(i)))
    })?;
    interrupt::sleep(Duration::from_millis(200))?;

    let mut polls = Vec::new();
    let killed = services[victim].take().expect("victim running").kill();
    let (down_seen, before_down) = poll_state(&gw, master, "down", &mut polls)?;
    interrupt::sleep(settle)?;

    let restarted = Instant::now();
    services[victim] = Some(Service::start(lab.master_ns(victim), lab.master_name(victim))?);
    let (up_seen, _) = poll_state(&gw, master, "up", &mut polls)?;
    wait_for("the restarted master taking a new connection", PHASE_LIMIT, || {
        client.any(|a| a.outcome == Ok(victim) && a.start >= restarted)
    })?;
    interrupt::sleep(settle)?;
    let attempts = client.finish();
    drop(gw);
    drop(services);
    drop(lab);

    let first = attempts.first().map_or(killed, |a| a.start);
    let last = attempts.last().map_or(killed, |a| a.end);
    let failed: Vec<&Attempt> =
        attempts.iter().filter(|a| a.outcome.is_err() && a.end >= killed && a.start < restarted).collect();
    let mut failed_by_kind = std::collections::BTreeMap::new();
    for a in &failed {
        *failed_by_kind.entry(a.outcome.unwrap_err()).or_insert(0) += 1;
    }
    let window_end = failed.iter().map(|a| a.end).max().unwrap_or(killed);
    let back = attempts
        .iter()
        .filter(|a| a.outcome == Ok(victim) && a.start >= restarted)
        .map(|a| a.start)
        .min()
        .unwrap_or(restarted);
    Ok(Round {
        victim,
        detect_ms: since(down_seen, killed),
        detect_resolution_ms: since(down_seen, before_down),
        window_ms: since(window_end, killed),
        failed: failed.len(),
        in_window: attempts.iter().filter(|a| a.start >= killed && a.start <= window_end).count(),
        failed_by_kind,
        connections: attempts.len(),
        rate: attempts.len() as f64 / since(last, first).max(1.0) * 1e3,
        up_ms: since(up_seen, restarted),
        back_ms: since(back, restarted),
        failed_after_recovery: attempts.iter().filter(|a| a.outcome.is_err() && a.start >= restarted).count(),
        failed_before_kill: attempts.iter().filter(|a| a.outcome.is_err() && a.end < killed).count(),
        poll_median_ms: median(&polls),
        poll_max_ms: max(&polls),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn since(later: Instant, earlier: Instant) -> f64 {
    ms(later.saturating_duration_since(earlier))
}

pub fn measure(settings: &Settings) -> Result<Section> {
    let dut = mim_lb_binary();
    if !dut.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p mim-lb-tests --bin mim-lb-dut` (cargo xtask bench does)",
            dut.display()
        );
    }
    let health = format!(
        "interval_ms = {}\ntimeout_ms = {}\nrise = {}\nfall = {}",
        settings.interval_ms, settings.timeout_ms, settings.rise, settings.fall
    );
    let mode = if settings.native { Mode::Native } else { Mode::Generic };
    let mut rounds = Vec::new();
    for r in 0..settings.rounds {
        interrupt::check()?;
        rounds.push(round(settings, &health, mode, r).with_context(|| format!("failover round {}", r + 1))?);
    }
    let interval = settings.interval_ms as f64;
    let fall_bound = f64::from(settings.fall) * interval;
    let detect_bound = fall_bound + settings.timeout_ms as f64;
    let rise_bound = f64::from(settings.rise) * interval;
    let recover_bound = rise_bound + settings.timeout_ms as f64;
    let col = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let detect = col(&|r| r.detect_ms);
    let window = col(&|r| r.window_ms);
    let failed = col(&|r| r.failed as f64);
    let up = col(&|r| r.up_ms);
    let back = col(&|r| r.back_ms);

    let mut s = Section::new(
        format!("Failover ({} masters, {} rounds)", settings.masters, rounds.len()),
        &["measurement", "median", "max", "bound", "median / baseline"],
    );
    s.method = vec![
        format!(
            "Namespace lab, the real daemon (`mim-lb run`, {} XDP) on the gateway, TCP check every {} ms, timeout {} ms, fall {}, rise {}.",
            mode.name(),
            settings.interval_ms,
            settings.timeout_ms,
            settings.fall,
            settings.rise
        ),
        "A client opens new connections to the VIP one after another (connect, read the master's name, close); one master's service is killed \
         (its port refuses from that instant), later restarted; the victim rotates over the masters."
            .into(),
        "Detection: kill to the first status poll (control socket, every ~2 ms) showing the master down. Failure window: kill to the end of the last \
         failed connection (every later one succeeded). Baseline for the ratios: fall x interval (detection, window) and rise x interval (recovery); \
         bound: that plus the check timeout."
            .into(),
    ];
    let row = |name: &str, v: &[f64], unit: &str, bound: Option<f64>, baseline: Option<f64>| {
        vec![
            name.to_string(),
            format!("{:.0}{unit}", median(v)),
            format!("{:.0}{unit}", max(v)),
            bound.map_or("-".into(), |b| format!("{b:.0}{unit}")),
            baseline.map_or("-".into(), |b| format!("{:.2}x", median(v) / b)),
        ]
    };
    s.row(row("detected down (status)", &detect, " ms", Some(detect_bound), Some(fall_bound)));
    s.row(row("failure window seen by clients", &window, " ms", Some(detect_bound), Some(fall_bound)));
    s.row(row("failed connections", &failed, "", None, None));
    s.row(row("restarted master up (status)", &up, " ms", Some(recover_bound), Some(rise_bound)));
    s.row(row("restarted master takes connections", &back, " ms", Some(recover_bound), Some(rise_bound)));
    for (i, r) in rounds.iter().enumerate() {
        s.notes.push(format!(
            "round {}: killed master-{}; down after {:.0} ms (poll resolution {:.1} ms; status answered in {:.1} ms median, {:.1} ms max), window {:.0} ms, {} failed {:?} of {} in the window, {} in the round ({:.0}/s); \
             up after {:.0} ms, first connection after {:.0} ms; failures before the kill {}, after the restart {}",
            i + 1,
            r.victim + 1,
            r.detect_ms,
            r.detect_resolution_ms,
            r.poll_median_ms,
            r.poll_max_ms,
            r.window_ms,
            r.failed,
            r.failed_by_kind,
            r.in_window,
            r.connections,
            r.rate,
            r.up_ms,
            r.back_ms,
            r.failed_before_kill,
            r.failed_after_recovery
        ));
    }
    let within = rounds.iter().filter(|r| r.window_ms <= detect_bound && r.detect_ms <= detect_bound).count();
    s.notes.push(format!("{within} of {} rounds had detection and failure window within the bound.", rounds.len()));
    s.json = json!({
        "health": {"interval_ms": settings.interval_ms, "timeout_ms": settings.timeout_ms, "fall": settings.fall, "rise": settings.rise},
        "xdp_mode": mode.name(),
        "bound_down_ms": detect_bound, "baseline_down_ms": fall_bound,
        "bound_up_ms": recover_bound, "baseline_up_ms": rise_bound,
        "rounds": rounds.iter().map(|r| json!({
            "victim": r.victim, "detect_ms": r.detect_ms, "detect_resolution_ms": r.detect_resolution_ms,
            "window_ms": r.window_ms, "failed": r.failed, "connections_in_window": r.in_window, "failed_by_kind": r.failed_by_kind,
            "connections": r.connections, "connections_per_s": r.rate,
            "up_ms": r.up_ms, "back_ms": r.back_ms,
            "failed_before_kill": r.failed_before_kill,
            "status_answer_median_ms": r.poll_median_ms, "status_answer_max_ms": r.poll_max_ms, "failed_after_restart": r.failed_after_recovery,
        })).collect::<Vec<_>>(),
    });
    Ok(s)
}
