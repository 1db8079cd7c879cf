//! The soak's traffic, all from the lab's client: long-lived flows (TCP connections that echo a
//! line every few hundred milliseconds, UDP flows that keep their source port and ask again
//! and again) kept topped up on every master that takes new connections, and steady streams
//! of short TCP connections and single UDP requests. Every end of a long-lived flow and every
//! failed short one is recorded with its time, for [`super::judge`] to classify.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::client::{TcpHold, tcp_ask, udp_ask};
use crate::netns::{in_netns, spawn_in_netns};

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Timing of the traffic.
#[derive(Debug, Clone)]
pub struct FlowTiming {
    /// Between two lines (TCP) or requests (UDP) on a long-lived flow.
    pub chat_every: Duration,
    /// A long-lived flow that has had no answer for this long is broken. Long enough for TCP
    /// to retransmit a lost segment twice (200 ms, 400 ms) on a loaded machine.
    pub stall_limit: Duration,
    /// How often a short TCP connection and a single UDP request start.
    pub short_every: Duration,
    /// Time limit of one short connection or request: below TCP's first SYN retransmission
    /// (1 s), so a lost SYN is a failure and not a late success.
    pub short_timeout: Duration,
}

impl Default for FlowTiming {
    fn default() -> Self {
        FlowTiming {
            chat_every: Duration::from_millis(200),
            stall_limit: Duration::from_secs(5),
            short_every: Duration::from_millis(50),
            short_timeout: Duration::from_millis(900),
        }
    }
}

/// A long-lived flow that ended before the soak did.
#[derive(Debug, Clone)]
pub struct FlowEnd {
    pub proto: Proto,
    /// The master it was on (lab index).
    pub master: usize,
    /// Since the soak started.
    pub opened: Duration,
    pub ended: Duration,
    pub error: String,
}

/// A short connection or request that failed.
#[derive(Debug, Clone)]
pub struct ShortFailure {
    pub proto: Proto,
    pub started: Duration,
    pub ended: Duration,
    pub error: String,
}

struct Live {
    proto: Proto,
    master: usize,
    opened: Duration,
    thread: JoinHandle<()>,
}

/// The long-lived flows.
pub struct Pool {
    client_ns: String,
    tcp_target: SocketAddr,
    udp_target: SocketAddr,
    timing: FlowTiming,
    t0: Instant,
    stop: Arc<AtomicBool>,
    live: Vec<Live>,
    ended: Arc<Mutex<Vec<FlowEnd>>>,
    opened: BTreeMap<Proto, u64>,
    /// The longest any flow lived (ended or still going at the last look).
    longest: Duration,
}

impl Pool {
    pub fn new(client_ns: &str, tcp_target: SocketAddr, udp_target: SocketAddr, timing: FlowTiming, t0: Instant) -> Pool {
        Pool {
            client_ns: client_ns.to_owned(),
            tcp_target,
            udp_target,
            timing,
            t0,
            stop: Arc::default(),
            live: Vec::new(),
            ended: Arc::default(),
            opened: BTreeMap::new(),
            longest: Duration::ZERO,
        }
    }

    /// Opens flows until every master in `wanted` has `per_master` of each protocol; a flow
    /// the director sends elsewhere is closed again. Gives up (until the next call) after ten
    /// tries per missing flow, so a master with a small share of the table cannot stall the
    /// soak. `master_of` maps a master's name to its index.
    pub fn top_up(&mut self, wanted: &[usize], per_master: usize, master_of: &dyn Fn(&str) -> Option<usize>) -> Result<()> {
        let now = self.t0.elapsed();
        self.live.retain(|l| !l.thread.is_finished());
        for l in &self.live {
            self.longest = self.longest.max(now - l.opened);
        }
        for proto in [Proto::Tcp, Proto::Udp] {
            let mut have: BTreeMap<usize, usize> = BTreeMap::new();
            for l in self.live.iter().filter(|l| l.proto == proto) {
                *have.entry(l.master).or_default() += 1;
            }
            let missing: usize = wanted.iter().map(|m| per_master.saturating_sub(have.get(m).copied().unwrap_or(0))).sum();
            for _ in 0..missing * 10 {
                if wanted.iter().all(|m| have.get(m).copied().unwrap_or(0) >= per_master) {
                    break;
                }
                let opened = match proto {
                    Proto::Tcp => self.open_tcp(),
                    Proto::Udp => self.open_udp(),
                };
                // A failed open is a short connection that failed; the short streams account
                // for those, so a failure here only ends this round of topping up.
                let Ok((name, flow)) = opened else { break };
                let Some(master) = master_of(&name) else { continue };
                let count = have.entry(master).or_default();
                if !wanted.contains(&master) || *count >= per_master {
                    continue;
                }
                *count += 1;
                self.start(proto, master, flow)?;
            }
        }
        Ok(())
    }

    fn open_tcp(&self) -> Result<(String, Opened)> {
        let (target, timeout) = (self.tcp_target, self.timing.short_timeout);
        let conn = in_netns(&self.client_ns, || TcpHold::connect(target, timeout))??;
        Ok((conn.name().to_owned(), Opened::Tcp(conn)))
    }

    fn open_udp(&self) -> Result<(String, Opened)> {
        let (target, timeout) = (self.udp_target, self.timing.short_timeout);
        let socket = in_netns(&self.client_ns, || -> Result<UdpSocket> {
            let socket = UdpSocket::bind(("0.0.0.0", 0)).context("binding UDP")?;
            socket.connect(target)?;
            Ok(socket)
        })??;
        let name = udp_request(&socket, timeout)?;
        Ok((name, Opened::Udp(socket)))
    }

    fn start(&mut self, proto: Proto, master: usize, flow: Opened) -> Result<()> {
        let (stop, ended, timing, t0) = (Arc::clone(&self.stop), Arc::clone(&self.ended), self.timing.clone(), self.t0);
        let opened = t0.elapsed();
        let n = self.opened.entry(proto).or_default();
        *n += 1;
        let thread = std::thread::Builder::new()
            .name(format!("soak-{}-{n}", proto.name()))
            .spawn(move || {
                let error = match flow {
                    Opened::Tcp(conn) => chat_tcp(conn, &timing, &stop),
                    Opened::Udp(socket) => chat_udp(&socket, &timing, &stop),
                };
                if let Some(error) = error {
                    let end = FlowEnd { proto, master, opened, ended: t0.elapsed(), error };
                    ended.lock().unwrap().push(end);
                }
            })
            .context("starting a long-lived flow's thread")?;
        self.live.push(Live { proto, master, opened, thread });
        Ok(())
    }

    /// Long-lived flows now, per protocol and master.
    pub fn live_counts(&self) -> BTreeMap<(Proto, usize), usize> {
        let mut counts = BTreeMap::new();
        for l in self.live.iter().filter(|l| !l.thread.is_finished()) {
            *counts.entry((l.proto, l.master)).or_default() += 1;
        }
        counts
    }

    /// Stops every flow (each within one exchange, so within `stall_limit`) and returns the
    /// ones that ended on their own, how many were opened per protocol, how many were still
    /// alive, and the longest life.
    pub fn finish(mut self) -> PoolOutcome {
        let now = self.t0.elapsed();
        for l in &self.live {
            self.longest = self.longest.max(now - l.opened);
        }
        self.stop.store(true, Ordering::Relaxed);
        let live = std::mem::take(&mut self.live);
        let mut still_alive = 0;
        for l in live {
            let finished = l.thread.is_finished();
            let _ = l.thread.join();
            still_alive += usize::from(!finished);
        }
        let mut ended = std::mem::take(&mut *self.ended.lock().unwrap());
        // Flows that were still alive when told to stop may have recorded nothing or an
        // error; an error recorded after `now` is one the stop caused.
        ended.retain(|e| e.ended <= now);
        ended.sort_by_key(|e| e.ended);
        PoolOutcome { ended, opened: std::mem::take(&mut self.opened), still_alive, longest: self.longest }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in self.live.drain(..) {
            let _ = l.thread.join();
        }
    }
}

/// What [`Pool::finish`] returns.
#[derive(Debug)]
pub struct PoolOutcome {
    pub ended: Vec<FlowEnd>,
    pub opened: BTreeMap<Proto, u64>,
    pub still_alive: usize,
    pub longest: Duration,
}

enum Opened {
    Tcp(TcpHold),
    Udp(UdpSocket),
}

/// Echoes a line every `chat_every` until `stop` (None) or the first failure (its error).
fn chat_tcp(mut conn: TcpHold, timing: &FlowTiming, stop: &AtomicBool) -> Option<String> {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = conn.echo(&format!("soak line {n}"), timing.stall_limit) {
            return Some(format!("{e:#}"));
        }
        n += 1;
        std::thread::sleep(timing.chat_every);
    }
    None
}

/// Asks every `chat_every` from the same port until `stop` (None), an answer from another
/// master than the first (the flow moved), or `stall_limit` without an answer.
fn chat_udp(socket: &UdpSocket, timing: &FlowTiming, stop: &AtomicBool) -> Option<String> {
    let first = match udp_request(socket, timing.short_timeout) {
        Ok(name) => name,
        Err(e) => return Some(format!("{e:#}")),
    };
    let mut last_answer = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(timing.chat_every);
        match udp_request(socket, timing.chat_every.max(Duration::from_millis(100))) {
            Ok(name) if name == first => last_answer = Instant::now(),
            Ok(name) => return Some(format!("moved from {first} to {name}")),
            Err(e) if last_answer.elapsed() >= timing.stall_limit => {
                return Some(format!("no answer for {:?}: {e:#}", last_answer.elapsed()));
            }
            Err(_) => {}
        }
    }
    None
}

/// One request on a connected UDP socket; answers to earlier requests that arrive late are
/// skipped (every answer is the master's name, so a late one is only a duplicate).
fn udp_request(socket: &UdpSocket, timeout: Duration) -> Result<String> {
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"who?\n").context("sending")?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).with_context(|| format!("waiting {timeout:?} for an answer"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

/// Running totals of the short streams.
#[derive(Debug, Default)]
struct ShortCounts {
    tcp_ok: AtomicU64,
    tcp_failed: AtomicU64,
    udp_ok: AtomicU64,
    udp_failed: AtomicU64,
}

/// Short TCP connections and single UDP requests, each `short_every`, on threads in the
/// client's namespace.
pub struct Shorts {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counts: Arc<ShortCounts>,
    failures: Arc<Mutex<Vec<ShortFailure>>>,
}

/// Most short attempts in flight at once (each ends within `short_timeout`).
const MAX_IN_FLIGHT: usize = 64;

impl Shorts {
    pub fn start(client_ns: &str, tcp_target: SocketAddr, udp_target: SocketAddr, timing: FlowTiming, t0: Instant) -> Result<Shorts> {
        let stop: Arc<AtomicBool> = Arc::default();
        let counts: Arc<ShortCounts> = Arc::default();
        let failures: Arc<Mutex<Vec<ShortFailure>>> = Arc::default();
        let (s, c, f) = (Arc::clone(&stop), Arc::clone(&counts), Arc::clone(&failures));
        let thread = spawn_in_netns(client_ns, "soak-shorts", move || {
            let mut in_flight: Vec<JoinHandle<()>> = Vec::new();
            let mut next = Instant::now();
            let mut k = 0u64;
            while !s.load(Ordering::Relaxed) {
                in_flight.retain(|h| !h.is_finished());
                for proto in [Proto::Tcp, Proto::Udp] {
                    if in_flight.len() >= MAX_IN_FLIGHT {
                        break;
                    }
                    let (c, f, timeout) = (Arc::clone(&c), Arc::clone(&f), timing.short_timeout);
                    let spawned = std::thread::Builder::new().name(format!("soak-short-{k}")).spawn(move || {
                        let started = t0.elapsed();
                        let outcome = match proto {
                            Proto::Tcp => tcp_ask(tcp_target, timeout),
                            Proto::Udp => udp_ask(udp_target, None, timeout),
                        };
                        let (ok, failed) = match proto {
                            Proto::Tcp => (&c.tcp_ok, &c.tcp_failed),
                            Proto::Udp => (&c.udp_ok, &c.udp_failed),
                        };
                        match outcome {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let failure = ShortFailure { proto, started, ended: t0.elapsed(), error: format!("{e:#}") };
                                f.lock().unwrap().push(failure);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    });
                    if let Ok(h) = spawned {
                        in_flight.push(h);
                        k += 1;
                    }
                }
                next += timing.short_every;
                next = next.max(Instant::now());
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for h in in_flight {
                let _ = h.join();
            }
        })?;
        Ok(Shorts { stop, thread: Some(thread), counts, failures })
    }

    /// (TCP ok, TCP failed, UDP ok, UDP failed) so far.
    pub fn progress(&self) -> [u64; 4] {
        let c = &self.counts;
        [&c.tcp_ok, &c.tcp_failed, &c.udp_ok, &c.udp_failed].map(|a| a.load(Ordering::Relaxed))
    }

    /// Stops the streams, waits for attempts in flight, and returns the totals and failures.
    pub fn finish(mut self) -> ShortOutcome {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let [tcp_ok, tcp_failed, udp_ok, udp_failed] = self.progress();
        let mut failures = std::mem::take(&mut *self.failures.lock().unwrap());
        failures.sort_by_key(|f| f.started);
        ShortOutcome { tcp_ok, tcp_failed, udp_ok, udp_failed, failures }
    }
}

impl Drop for Shorts {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What [`Shorts::finish`] returns.
#[derive(Debug)]
pub struct ShortOutcome {
    pub tcp_ok: u64,
    pub tcp_failed: u64,
    pub udp_ok: u64,
    pub udp_failed: u64,
    pub failures: Vec<ShortFailure>,
}
