//! The end-to-end benchmark's load generator: new TCP connections from the lab's client, each
//! one request and one answer, either started at an offered rate (open loop) or by a fixed
//! number of workers one after another (closed loop). One tokio thread in the client's
//! namespace; bounded in time (the step's length plus one connection timeout), in
//! connections in flight, and by Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use mim_lb_tests::in_netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::interrupt;

/// How new connections are started.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// Open loop: this many connections per second, whatever the answers do (up to
    /// [`Plan::max_in_flight`]).
    Rate(u32),
    /// Closed loop: this many workers, each starting its next connection when the last ends.
    Workers(usize),
}

/// What each connection asks.
#[derive(Clone, Copy, Debug)]
pub enum Ask {
    /// `S\n`: the master's name, one short line.
    Short,
    /// `L <n>\n`: n bytes.
    Large(usize),
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub target: SocketAddr,
    pub ask: Ask,
    pub pace: Pace,
    pub duration: Duration,
    pub max_in_flight: usize,
    /// Longest a connection may take, connect to close.
    pub timeout: Duration,
}

/// What a step did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ok: u64,
    /// Failed connections by reason.
    pub failed: BTreeMap<&'static str, u64>,
    /// Latency of each successful connection, connect to the answer's end, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Answer bytes received.
    pub bytes: u64,
    /// From the first start to the last end.
    pub elapsed: Duration,
}

impl Outcome {
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Runs `plan` from the client namespace `ns` and returns what happened.
pub fn run(ns: &str, plan: &Plan) -> Result<Outcome> {
    let plan = plan.clone();
    in_netns(ns, move || -> Result<Outcome> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the client's runtime")?;
        Ok(runtime.block_on(drive(plan)))
    })?
}

type Result1 = std::result::Result<(u32, u64), &'static str>;

async fn drive(plan: Plan) -> Outcome {
    let start = Instant::now();
    let end_of_starts = start + plan.duration;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result1>();
    let mut outcome = Outcome::default();
    let mut over_limit = 0u64;
    match plan.pace {
        Pace::Rate(rate) => {
            let mut started: u64 = 0;
            // Timers tick by the millisecond: each wake-up starts every connection that is due.
            while Instant::now() < end_of_starts && !interrupt::interrupted() {
                let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
                while started < due {
                    started += 1;
                    if in_flight.load(Ordering::Relaxed) >= plan.max_in_flight {
                        over_limit += 1;
                        continue;
                    }
                    spawn_one(&plan, &in_flight, &tx);
                }
                while let Ok(r) = rx.try_recv() {
                    record(&mut outcome, r);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Pace::Workers(n) => {
            for _ in 0..n.min(plan.max_in_flight) {
                spawn_one(&plan, &in_flight, &tx);
            }
            while Instant::now() < end_of_starts && !interrupt::interrupted() {
                let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await else { continue };
                record(&mut outcome, r);
                if Instant::now() < end_of_starts {
                    spawn_one(&plan, &in_flight, &tx);
                }
            }
        }
    }
    drop(tx);
    // Every connection ends within its timeout, and then its sender is gone.
    while let Some(r) = rx.recv().await {
        record(&mut outcome, r);
    }
    if over_limit > 0 {
        outcome.failed.insert("not started: too many in flight", over_limit);
    }
    outcome.elapsed = start.elapsed();
    outcome
}

fn record(outcome: &mut Outcome, r: Result1) {
    match r {
        Ok((us, bytes)) => {
            outcome.ok += 1;
            outcome.latencies_us.push(us);
            outcome.bytes += bytes;
        }
        Err(why) => *outcome.failed.entry(why).or_default() += 1,
    }
}

fn spawn_one(plan: &Plan, in_flight: &Arc<AtomicUsize>, tx: &tokio::sync::mpsc::UnboundedSender<Result1>) {
    in_flight.fetch_add(1, Ordering::Relaxed);
    let (in_flight, tx) = (Arc::clone(in_flight), tx.clone());
    let (target, ask, timeout) = (plan.target, plan.ask, plan.timeout);
    tokio::spawn(async move {
        let t0 = Instant::now();
        let r = match tokio::time::timeout(timeout, one(target, ask)).await {
            Ok(Ok(bytes)) => Ok((t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32, bytes)),
            Ok(Err(why)) => Err(why),
            Err(_) => Err("timeout"),
        };
        in_flight.fetch_sub(1, Ordering::Relaxed);
        let _ = tx.send(r);
    });
}

/// One connection: connect, ask, read the answer to the master's close, check it.
async fn one(target: SocketAddr, ask: Ask) -> std::result::Result<u64, &'static str> {
    let mut s = TcpStream::connect(target).await.map_err(io_reason)?;
    let _ = s.set_nodelay(true);
    let request = match ask {
        Ask::Short => "S\n".to_owned(),
        Ask::Large(n) => format!("L {n}\n"),
    };
    s.write_all(request.as_bytes()).await.map_err(io_reason)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut head = Vec::new();
    loop {
        let n = s.read(&mut buf).await.map_err(io_reason)?;
        if n == 0 {
            break;
        }
        if head.len() < 16 {
            head.extend_from_slice(&buf[..n.min(16)]);
        }
        got += n as u64;
    }
    let complete = match ask {
        Ask::Short => head.starts_with(b"master-") && head.ends_with(b"\n"),
        Ask::Large(n) => got == n as u64,
    };
    if complete { Ok(got) } else if got == 0 { Err("closed without an answer") } else { Err("short answer") }
}

fn io_reason(e: std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused",
        std::io::ErrorKind::ConnectionReset => "reset",
        std::io::ErrorKind::TimedOut => "timeout",
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse => "no local port",
        _ => "other I/O error",
    }
}

/// Idle connections held open from the client (each asked `H\n`, which the master answers
/// with nothing until the client closes), on a thread of their own in the client's namespace,
/// until dropped.
pub struct Idle {
    pub opened: usize,
    pub failed: usize,
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Idle {
    /// Opens `n` connections to `target` one after another (each within `timeout`) and
    /// returns once all are open or have failed.
    pub fn open(ns: &str, target: SocketAddr, n: usize, timeout: Duration) -> Result<Idle> {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, usize)>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread = mim_lb_tests::netns::spawn_in_netns(ns, "e2e-idle", move || {
            let mut held = Vec::with_capacity(n);
            let mut failed = 0;
            for _ in 0..n {
                if interrupt::interrupted() {
                    break;
                }
                match std::net::TcpStream::connect_timeout(&target, timeout) {
                    Ok(mut s) => {
                        if std::io::Write::write_all(&mut s, b"H\n").is_ok() {
                            held.push(s);
                        } else {
                            failed += 1;
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            let _ = done_tx.send((held.len(), failed));
            // Held until released (or the benchmark goes away).
            let _ = released.recv();
            drop(held);
        })?;
        let (opened, failed) = done_rx.recv().context("the idle connections' thread died")?;
        Ok(Idle { opened, failed, release: Some(release), thread: Some(thread) })
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
