//! The demo's clients: a steady stream of requests from the client namespace, each on new
//! connections. One request is the whole path of the modelled service: ask the VIP for a slave
//! (a master answers), then connect to that slave directly.
//!
//! Requests are paced, not fired as fast as possible: worker `k` of `K` owns the slots
//! `k, k + K, k + 2K, ...` of the schedule, one slot every `1/rate` seconds. A worker whose
//! request is slow (a timeout) skips the slots it missed instead of catching up in a burst, so
//! the rate never exceeds the one asked for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::master_service::{ExchangeError, ask_for_slave, greet_slave};
use crate::netns::spawn_in_netns;

/// Most requests per second the demo sends: the lab runs on ordinary machines, next to other
/// work, and the story needs no more.
pub const MAX_RATE: u32 = 500;

/// A request that got all the way to a slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    /// The master that answered through the VIP.
    pub master: String,
    /// The slave it named, and the name that slave greeted with.
    pub slave: SocketAddr,
    pub slave_name: String,
}

/// Which step of a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Asking the VIP for a slave.
    Master,
    /// Connecting to the slave the master named.
    Slave,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub step: Step,
    /// One word: `refused`, `timeout`, `reset`, ... (see [`ExchangeError::kind`]).
    pub kind: &'static str,
    pub detail: String,
}

impl Failure {
    fn new(step: Step, e: &ExchangeError) -> Failure {
        Failure { step, kind: e.kind(), detail: e.to_string() }
    }
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the request started (its first connect).
    pub started: Instant,
    pub result: Result<Reached, Failure>,
}

/// One request: the master through `vip`, then the slave it names. Runs in the calling
/// thread's namespace; each step has `timeout`.
pub fn request(vip: SocketAddr, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let result = ask_for_slave(vip, timeout).map_err(|e| Failure::new(Step::Master, &e)).and_then(|offer| {
        greet_slave(offer.slave, timeout)
            .map(|slave_name| Reached { master: offer.master, slave: offer.slave, slave_name })
            .map_err(|e| Failure::new(Step::Slave, &e))
    });
    Outcome { started, result }
}

/// Workers for `rate` requests per second: enough that a few slow requests do not lower the
/// rate, few enough to stay cheap.
fn workers_for(rate: u32) -> u32 {
    (rate / 5).clamp(2, 32)
}

/// The slot a worker should take next: the first of its slots (`k + j*K`) that is not already
/// more than one period late at `elapsed`.
fn next_slot(k: u64, workers: u64, rate: f64, elapsed: Duration, current: u64) -> u64 {
    let late_by = elapsed.as_secs_f64() - (k + current * workers) as f64 / rate;
    if late_by <= workers as f64 / rate {
        return current;
    }
    // Skip to the first slot not in the past.
    let first_future = ((elapsed.as_secs_f64() * rate - k as f64) / workers as f64).ceil();
    (first_future.max(0.0) as u64).max(current)
}

/// The stream of requests; stops (and joins its workers) when dropped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    outcomes: Receiver<Outcome>,
}

impl Traffic {
    /// Starts `rate` requests per second (1 to [`MAX_RATE`]) from namespace `ns` to `vip`.
    pub fn start(ns: &str, vip: SocketAddr, rate: u32, timeout: Duration) -> Result<Traffic> {
        anyhow::ensure!(
            (1..=MAX_RATE).contains(&rate),
            "the rate must be 1 to {MAX_RATE} requests per second, not {rate}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, outcomes) = mpsc::channel();
        let count = workers_for(rate);
        let t0 = Instant::now();
        let mut traffic = Traffic { stop, workers: Vec::new(), outcomes };
        for k in 0..count {
            let (stop, tx) = (Arc::clone(&traffic.stop), tx.clone());
            let worker = spawn_in_netns(ns, &format!("client-{k}"), move || {
                work(k.into(), count.into(), rate, t0, vip, timeout, &stop, &tx)
            })?;
            traffic.workers.push(worker);
        }
        Ok(traffic)
    }

    /// The requests that finished since the last call.
    pub fn finished(&self) -> Vec<Outcome> {
        self.outcomes.try_iter().collect()
    }

    /// Stops sending, waits for the requests under way (each step ends within its timeout),
    /// and returns those that finished since the last [`Traffic::finished`].
    pub fn stop(&mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.finished()
    }
}

#[allow(clippy::too_many_arguments)]
fn work(
    k: u64,
    workers: u64,
    rate: u32,
    t0: Instant,
    vip: SocketAddr,
    timeout: Duration,
    stop: &AtomicBool,
    tx: &Sender<Outcome>,
) {
    let rate = f64::from(rate);
    let mut slot = 0u64;
    while !stop.load(Ordering::Relaxed) {
        slot = next_slot(k, workers, rate, t0.elapsed(), slot);
        let due = t0 + Duration::from_secs_f64((k + slot * workers) as f64 / rate);
        // Sleep in short steps so that stopping never waits for a slow schedule.
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        if tx.send(request(vip, timeout)).is_err() {
            return;
        }
        slot += 1;
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_scale_with_the_rate_within_bounds() {
        assert_eq!(workers_for(1), 2);
        assert_eq!(workers_for(50), 10);
        assert_eq!(workers_for(MAX_RATE), 32);
    }

    #[test]
    fn a_worker_on_time_keeps_its_slot_and_a_late_one_skips_ahead() {
        // Worker 1 of 10 at 50/s owns slots at 0.02 s, 0.22 s, 0.42 s, ...
        let ms = Duration::from_millis;
        assert_eq!(next_slot(1, 10, 50.0, ms(0), 0), 0);
        assert_eq!(next_slot(1, 10, 50.0, ms(100), 0), 0, "within one period: still due");
        // A request that took a second: slots 0..=4 are gone, slot 5 (1.02 s) is next.
        assert_eq!(next_slot(1, 10, 50.0, ms(1000), 1), 5);
        // Never goes back.
        assert_eq!(next_slot(1, 10, 50.0, ms(0), 7), 7);
    }
}
