//! The checks of one target: a task that probes it every interval and queues a report per
//! result, and the handle that stops it.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{
    runtime::Handle,
    sync::mpsc::Sender,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};

use super::{Report, RiseFall, Target, Verdict, probe::Probe};

/// The shortest interval honoured: a zero interval (which config validation rejects) would
/// otherwise spin.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// A running target's checks.
pub(super) struct Running {
    pub target: Target,
    gate: Arc<Mutex<Gate>>,
    task: JoinHandle<()>,
}

/// Shared by the task and its handle. The task queues a report only while holding the lock
/// and only if not stopped, which is what lets [`Running::stop`] promise that nothing is
/// queued after it returns, on any runtime flavour.
struct Gate {
    stopped: bool,
    /// The verdict of the last queued report (the starting verdict before the first), so a
    /// restarted target continues from what the receiver has been, or will be, told.
    verdict: Verdict,
}

impl Running {
    /// Starts checking `target` from `verdict`; `None` if it is not to be checked.
    pub fn start(
        target: Target,
        verdict: Verdict,
        reports: Sender<Report>,
        runtime: &Handle,
    ) -> Option<Running> {
        let probe = Probe::for_target(&target)?;
        let check = &target.check;
        let rise_fall = RiseFall::new(check.rise, check.fall, verdict);
        let interval = check.interval.max(MIN_INTERVAL);
        let gate = Arc::new(Mutex::new(Gate {
            stopped: false,
            verdict,
        }));
        let first = Instant::now() + first_delay(interval);
        let task = runtime.spawn(run(
            probe,
            rise_fall,
            interval,
            first,
            gate.clone(),
            reports,
        ));
        Some(Running { target, gate, task })
    }

    /// Stops the checks: no report of this target is queued after this returns. Returns the
    /// verdict of the last report queued. A check under way is dropped when the runtime next
    /// gets to the task (a command's process group is killed then).
    pub fn stop(self) -> Verdict {
        self.halt()
    }

    fn halt(&self) -> Verdict {
        let verdict = {
            let mut gate = lock(&self.gate);
            gate.stopped = true;
            gate.verdict
        };
        self.task.abort();
        verdict
    }
}

impl Drop for Running {
    /// A task outlives its `JoinHandle`: forgetting to stop one must not leave it checking.
    fn drop(&mut self) {
        self.halt();
    }
}

/// When the first check runs: anywhere within the first interval, so that targets configured
/// together do not all fire at once, for ever after.
fn first_delay(interval: Duration) -> Duration {
    let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..nanos.max(1)))
}

async fn run(
    probe: Probe,
    mut rise_fall: RiseFall,
    interval: Duration,
    first: Instant,
    gate: Arc<Mutex<Gate>>,
    reports: Sender<Report>,
) {
    let mut ticks = tokio::time::interval_at(first, interval);
    // A check that overran (only a command being cleaned up can) delays the next one rather
    // than causing a burst to catch up.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcome = probe.run().await;
        let step = rise_fall.record(outcome.ok);
        let report = Report {
            service: probe.service,
            address: probe.address,
            check: probe.kind.name(),
            outcome,
            verdict: step.verdict,
            transition: step.transition,
            streak: step.streak,
            port: probe.port,
        };
        // Waiting for room happens outside the lock: a slow receiver must not block `stop`.
        let Ok(permit) = reports.reserve().await else {
            return; // The receiver is gone: nobody is listening any more.
        };
        let mut open = lock(&gate);
        if open.stopped {
            return;
        }
        open.verdict = step.verdict;
        permit.send(report);
    }
}

/// The lock is only held for a few assignments that cannot panic; a poisoned one is still
/// consistent.
fn lock(gate: &Mutex<Gate>) -> MutexGuard<'_, Gate> {
    gate.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_checks_spread_over_the_interval() {
        let interval = Duration::from_millis(1000);
        let delays: Vec<Duration> = (0..200).map(|_| first_delay(interval)).collect();
        assert!(delays.iter().all(|d| *d < interval));
        // Spread, not bunched: some in each half (failing by chance has odds of 2^-199).
        assert!(delays.iter().any(|d| *d < interval / 2));
        assert!(delays.iter().any(|d| *d >= interval / 2));
    }

    #[test]
    fn a_zero_interval_does_not_panic() {
        assert_eq!(first_delay(Duration::ZERO), Duration::ZERO);
    }
}
