//! Slow start: a master that comes up takes its share of new connections in steps, so that a
//! master that was away (cold caches, a restarted service) is not handed a whole share at once.
//!
//! The schedule is a pure function of the time since the master came up and the service's
//! `slow_start_s`, quantized into [`STEPS`] equal steps: during step k (1-based) the master
//! asks for k/STEPS of its weight. Each step is one table change, made like a weight change
//! on reload (slots that change master are marked, so no established flow moves), and two
//! directors whose verdicts came within a step of each other build the same tables.
//!
//! Table weights are counted in 1/STEPS of a configured weight: a master at full weight asks
//! for `weight × STEPS`. Maglev's apportionment depends only on the ratios of the weights, so
//! this scale changes no table of a service with nobody ramping.

use std::time::Duration;

/// Steps of a slow start; the table changes `STEPS - 1` times on the way, and not at the end.
pub const STEPS: u32 = 10;

/// The step (1..=STEPS) of a master that came up `elapsed_ns` ago, or `None` once its slow
/// start is over (or the service has none).
pub fn step(elapsed_ns: u64, slow_start: Duration) -> Option<u32> {
    let total = slow_start.as_nanos();
    let elapsed = u128::from(elapsed_ns);
    if total == 0 || elapsed >= total {
        return None;
    }
    // elapsed < total, so the quotient is below STEPS.
    Some((elapsed * u128::from(STEPS) / total) as u32 + 1)
}

/// When step `k` (1..=STEPS) begins, counted from the moment the master came up; `k =
/// STEPS + 1` gives the end of the slow start.
pub fn step_begins_ns(k: u32, slow_start: Duration) -> u64 {
    let offset = slow_start.as_nanos() * u128::from(k.saturating_sub(1)) / u128::from(STEPS);
    u64::try_from(offset).unwrap_or(u64::MAX)
}

/// The weight a master asks the Maglev table for, in 1/STEPS of a configured weight.
pub fn table_weight(weight: u32, step: Option<u32>) -> u32 {
    weight.saturating_mul(step.unwrap_or(STEPS).min(STEPS))
}

/// A master in slow start: since when it is up, and the step it was last committed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ramp {
    /// `CLOCK_MONOTONIC` ns of the commit that brought it up.
    pub since_ns: u64,
    pub step: u32,
}

impl Ramp {
    /// The ramp at `now_ns`, or `None` once it is over.
    pub fn at(since_ns: u64, now_ns: u64, slow_start: Duration) -> Option<Ramp> {
        step(now_ns.saturating_sub(since_ns), slow_start).map(|step| Ramp { since_ns, step })
    }

    /// When the table must change next for this master: the next step, or the end.
    pub fn next_change_ns(&self, slow_start: Duration) -> u64 {
        self.since_ns.saturating_add(step_begins_ns(self.step + 1, slow_start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn ten_equal_steps_then_the_full_weight() {
        let ss = Duration::from_secs(10);
        // Written out: step k covers [k-1, k) seconds of a 10 s slow start.
        let expected = [(0, Some(1)), (S - 1, Some(1)), (S, Some(2)), (5 * S + 1, Some(6)), (9 * S, Some(10)), (10 * S - 1, Some(10)), (10 * S, None), (99 * S, None)];
        for (elapsed, want) in expected {
            assert_eq!(step(elapsed, ss), want, "at {elapsed} ns");
        }
        assert_eq!(step(0, Duration::ZERO), None, "slow start off");
    }

    #[test]
    fn weights_are_counted_in_tenths() {
        assert_eq!(table_weight(100, Some(1)), 100);
        assert_eq!(table_weight(100, Some(7)), 700);
        assert_eq!(table_weight(100, None), 1000);
        assert_eq!(table_weight(1, Some(1)), 1, "a weight of 1 still ramps: 1/10, 2/10, ...");
        assert_eq!(table_weight(65_535, None), 655_350);
    }

    #[test]
    fn the_next_change_is_the_next_step_or_the_end() {
        let ss = Duration::from_secs(5);
        let r = Ramp::at(100 * S, 100 * S, ss).unwrap();
        assert_eq!(r.step, 1);
        assert_eq!(r.next_change_ns(ss), 100 * S + S / 2);
        let last = Ramp::at(100 * S, 104 * S + S / 2, ss).unwrap();
        assert_eq!(last.step, 10);
        assert_eq!(last.next_change_ns(ss), 105 * S, "the end of the slow start");
        assert_eq!(Ramp::at(100 * S, 105 * S, ss), None);
    }

    #[test]
    fn the_schedule_depends_only_on_the_time_since_up() {
        let ss = Duration::from_millis(7_300);
        for elapsed in (0..8 * S).step_by(12_345_678) {
            let a = Ramp::at(1_000, 1_000 + elapsed, ss).map(|r| r.step);
            let b = Ramp::at(9 * S, 9 * S + elapsed, ss).map(|r| r.step);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn scaling_every_weight_keeps_the_table() {
        // Full weights in tenths must give the tables plain weights gave, so that this scale
        // moves no slot of a service where nobody ramps.
        let keys: Vec<[u8; 4]> = (1..=5).map(|i| [10, 0, 0, i]).collect();
        let weights = [100, 50, 1, 300, 7];
        let build = |scale: u32| {
            let members: Vec<crate::maglev::MaglevBackend> = keys
                .iter()
                .zip(weights)
                .enumerate()
                .map(|(i, (k, w))| crate::maglev::MaglevBackend { id: i as u32 + 1, key: k, weight: w * scale })
                .collect();
            crate::maglev::build(&members, 1021)
        };
        assert_eq!(build(1), build(STEPS));
    }
}
