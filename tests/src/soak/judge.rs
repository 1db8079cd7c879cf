//! Deciding what the soak's observations mean: which failures the health-check timing
//! excuses, which long-lived flows broke for a reason, whether the daemon's memory and
//! descriptors stayed flat. Pure: it reads what the run recorded and does no I/O.

use std::time::Duration;

use super::flows::{FlowEnd, ShortFailure};

/// The health-check timers of the soak's services, and the allowance for a loaded machine.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Added to every bound derived from the timers: a check task, the map write or the
    /// soak's own status poll may be scheduled late on a shared, loaded machine.
    pub noise: Duration,
    /// A short attempt that started up to this long before a master died may have been on
    /// its way to it (the short connections' timeout).
    pub in_flight: Duration,
}

impl Timers {
    /// OPERATIONS.md, "Health checks": a dead master is down at most `fall × interval +
    /// timeout` after it died.
    pub fn detection_bound(&self) -> Duration {
        self.interval * self.fall + self.timeout
    }

    /// A master that came back is up after `rise` passing checks: at most `rise × interval +
    /// timeout`.
    pub fn recovery_bound(&self) -> Duration {
        self.interval * self.rise + self.timeout
    }

    /// The window in which new flows may fail because of a master that died at `at`: from
    /// `in_flight` before it (attempts already on their way) to `detection_bound + noise`
    /// after it (until then the dead master still owns its slots).
    pub fn excused_window(&self, at: Duration) -> (Duration, Duration) {
        (at.saturating_sub(self.in_flight), at + self.detection_bound() + self.noise)
    }
}

/// A master's services were stopped at `at` (since the soak started).
#[derive(Debug, Clone, Copy)]
pub struct Death {
    pub master: usize,
    pub at: Duration,
}

/// A short failure, and the death that excuses it if one does.
#[derive(Debug, Clone)]
pub struct JudgedFailure {
    pub failure: ShortFailure,
    pub excused_by: Option<Death>,
}

pub fn judge_short_failures(failures: &[ShortFailure], deaths: &[Death], timers: &Timers) -> Vec<JudgedFailure> {
    failures
        .iter()
        .map(|f| {
            let excused_by = deaths
                .iter()
                .find(|d| {
                    let (from, to) = timers.excused_window(d.at);
                    f.started >= from && f.started <= to
                })
                .copied();
            JudgedFailure { failure: f.clone(), excused_by }
        })
        .collect()
}

/// A long-lived flow's end, and the death of its master that explains it if one does.
#[derive(Debug, Clone)]
pub struct JudgedEnd {
    pub end: FlowEnd,
    pub explained_by: Option<Death>,
}

/// A long-lived flow may end only because its own master died while it was open: a flow to a
/// master that is up or draining never breaks, whatever else happens (drains, reloads,
/// restarts of the daemon, other masters dying and coming back).
pub fn judge_flow_ends(ends: &[FlowEnd], deaths: &[Death]) -> Vec<JudgedEnd> {
    ends.iter()
        .map(|e| {
            let explained_by =
                deaths.iter().find(|d| d.master == e.master && d.at >= e.opened && d.at <= e.ended).copied();
            JudgedEnd { end: e.clone(), explained_by }
        })
        .collect()
}

/// One sample of the daemon's resources.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Since the soak started.
    pub t: Duration,
    /// Which run of the daemon (0 is the first; each restart adds one).
    pub run: usize,
    /// Since that run started.
    pub age: Duration,
    pub rss_kb: u64,
    pub fds: u64,
    /// Records in the connection table (FLOWS), if they could be counted.
    pub flows: Option<u64>,
}

/// How one run of the daemon's RSS or descriptors went after warm-up.
#[derive(Debug, Clone)]
pub struct Flatness {
    pub what: &'static str,
    pub run: usize,
    /// Samples after warm-up.
    pub samples: usize,
    /// The lowest value in the first and in the last quarter of those samples.
    pub first_floor: u64,
    pub last_floor: u64,
    pub max: u64,
    /// Growth of the floor, in percent of the first.
    pub growth_pct: f64,
    /// None when there were too few samples to judge.
    pub flat: Option<bool>,
}

/// Fewest samples after warm-up that a run needs to be judged.
pub const MIN_SAMPLES: usize = 4;

/// Per run of the daemon: the floor (lowest value) of the last quarter of the samples after
/// `warm_up` against the floor of the first quarter. Floors, not peaks: a health check or a
/// control connection opens a descriptor for a moment, and a reload allocates for a moment;
/// a leak raises the floor. Flat means the floor grew by at most `limit_pct`.
pub fn judge_flatness(samples: &[Sample], warm_up: Duration, limit_pct: f64) -> Vec<Flatness> {
    let runs: std::collections::BTreeSet<usize> = samples.iter().map(|s| s.run).collect();
    let mut out = Vec::new();
    for run in runs {
        let after: Vec<&Sample> = samples.iter().filter(|s| s.run == run && s.age >= warm_up).collect();
        for (what, value) in [("rss_kb", (|s: &Sample| s.rss_kb) as fn(&Sample) -> u64), ("fds", |s: &Sample| s.fds)] {
            let values: Vec<u64> = after.iter().map(|s| value(s)).collect();
            out.push(flatness(what, run, &values, limit_pct));
        }
    }
    out
}

fn flatness(what: &'static str, run: usize, values: &[u64], limit_pct: f64) -> Flatness {
    let quarter = values.len().div_ceil(4).max(1);
    let floor = |v: &[u64]| v.iter().copied().min().unwrap_or(0);
    let first_floor = floor(&values[..quarter.min(values.len())]);
    let last_floor = floor(&values[values.len().saturating_sub(quarter)..]);
    let growth_pct = if first_floor == 0 { 0.0 } else { (last_floor as f64 - first_floor as f64) * 100.0 / first_floor as f64 };
    Flatness {
        what,
        run,
        samples: values.len(),
        first_floor,
        last_floor,
        max: values.iter().copied().max().unwrap_or(0),
        growth_pct,
        flat: (values.len() >= MIN_SAMPLES).then_some(growth_pct <= limit_pct),
    }
}

#[cfg(test)]
mod tests {
    use super::super::flows::Proto;
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_millis;

    fn timers() -> Timers {
        Timers { interval: S(250), timeout: S(250), rise: 2, fall: 3, noise: S(1000), in_flight: S(900) }
    }

    fn failure(started: u64) -> ShortFailure {
        ShortFailure { proto: Proto::Tcp, started: S(started), ended: S(started + 1), error: "refused".into() }
    }

    #[test]
    fn the_window_follows_the_documented_detection_bound() {
        // fall 3 x 250 ms + 250 ms = 1 s (OPERATIONS.md), plus 1 s of noise; 900 ms before.
        assert_eq!(timers().detection_bound(), S(1000));
        assert_eq!(timers().excused_window(S(10_000)), (S(9_100), S(12_000)));
    }

    #[test]
    fn failures_are_excused_only_near_a_death() {
        let deaths = [Death { master: 1, at: S(10_000) }];
        let judged = judge_short_failures(&[failure(9_000), failure(9_200), failure(11_999), failure(12_001)], &deaths, &timers());
        let excused: Vec<bool> = judged.iter().map(|j| j.excused_by.is_some()).collect();
        assert_eq!(excused, [false, true, true, false]);
    }

    #[test]
    fn a_flow_may_end_only_after_its_own_master_died_while_it_was_open() {
        let end = |master, opened, ended| FlowEnd { proto: Proto::Udp, master, opened: S(opened), ended: S(ended), error: String::new() };
        let deaths = [Death { master: 1, at: S(10_000) }];
        let judged = judge_flow_ends(&[end(1, 5_000, 10_050), end(2, 5_000, 10_050), end(1, 11_000, 12_000), end(1, 5_000, 9_000)], &deaths);
        let explained: Vec<bool> = judged.iter().map(|j| j.explained_by.is_some()).collect();
        assert_eq!(explained, [true, false, false, false]);
    }

    #[test]
    fn a_rising_floor_is_not_flat_and_a_spike_is() {
        let samples = |values: &[u64]| -> Vec<Sample> {
            values
                .iter()
                .enumerate()
                .map(|(k, v)| Sample { t: S(k as u64 * 1000), run: 0, age: S(k as u64 * 1000), rss_kb: *v, fds: 20, flows: None })
                .collect()
        };
        // The first sample is inside the 1 s warm-up and does not count.
        let spike = judge_flatness(&samples(&[1, 100, 100, 150, 100, 100, 100, 100, 104]), S(1000), 5.0);
        assert_eq!(spike[0].flat, Some(true), "{spike:?}");
        assert_eq!(spike[1].flat, Some(true));
        let leak = judge_flatness(&samples(&[1, 100, 102, 104, 106, 108, 110, 112, 114]), S(1000), 5.0);
        assert_eq!(leak[0].flat, Some(false), "{leak:?}");
        assert_eq!((leak[0].first_floor, leak[0].last_floor), (100, 112));
        let short = judge_flatness(&samples(&[100, 100, 200]), S(1000), 5.0);
        assert_eq!(short[0].flat, None);
    }
}
