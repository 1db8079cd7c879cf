//! The rise/fall state machine: how check results in a row turn into a verdict.
//!
//! Kept free of I/O and time so that every rule can be tested exhaustively.

use super::Verdict;

/// What one result did to the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The verdict after this result.
    pub verdict: Verdict,
    /// The verdict changed with this result.
    pub transition: bool,
    /// Results in a row of the same kind as this one (successes if it succeeded), this one
    /// included.
    pub streak: u32,
}

/// A backend's verdict and its current run of identical results.
///
/// A down backend comes up after `rise` successes in a row; an up one goes down after `fall`
/// failures in a row. Any result of the other kind starts a new run, so flapping results never
/// accumulate towards a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    verdict: Verdict,
    /// `None` before the first result.
    last_ok: Option<bool>,
    streak: u32,
}

impl RiseFall {
    /// Starts in `verdict` with no results seen. A `rise` or `fall` of 0 acts as 1: config
    /// validation forbids 0, and "change on zero results" has no meaning.
    pub fn new(rise: u32, fall: u32, verdict: Verdict) -> Self {
        RiseFall {
            rise: rise.max(1),
            fall: fall.max(1),
            verdict,
            last_ok: None,
            streak: 0,
        }
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Records one check result.
    pub fn record(&mut self, ok: bool) -> Step {
        if self.last_ok == Some(ok) {
            // Saturating: a backend healthy for years must not wrap around into a change.
            self.streak = self.streak.saturating_add(1);
        } else {
            self.last_ok = Some(ok);
            self.streak = 1;
        }
        let next = match (self.verdict, ok) {
            (Verdict::Down, true) if self.streak >= self.rise => Verdict::Up,
            (Verdict::Up, false) if self.streak >= self.fall => Verdict::Down,
            (current, _) => current,
        };
        let transition = next != self.verdict;
        self.verdict = next;
        Step {
            verdict: next,
            transition,
            streak: self.streak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{Down, Up};

    /// Feeds `results` and returns the steps, so tests read as a timeline.
    fn run(rf: &mut RiseFall, results: &[bool]) -> Vec<Step> {
        results.iter().map(|&ok| rf.record(ok)).collect()
    }

    fn verdicts(steps: &[Step]) -> Vec<Verdict> {
        steps.iter().map(|s| s.verdict).collect()
    }

    #[test]
    fn down_needs_rise_successes_in_a_row() {
        let mut rf = RiseFall::new(3, 2, Down);
        let steps = run(&mut rf, &[true, true, true, true]);
        assert_eq!(verdicts(&steps), [Down, Down, Up, Up]);
        assert_eq!(
            steps.iter().map(|s| s.transition).collect::<Vec<_>>(),
            [false, false, true, false]
        );
        assert_eq!(
            steps.iter().map(|s| s.streak).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn up_needs_fall_failures_in_a_row() {
        let mut rf = RiseFall::new(2, 3, Up);
        let steps = run(&mut rf, &[false, false, false, false]);
        assert_eq!(verdicts(&steps), [Up, Up, Down, Down]);
        assert_eq!(
            steps.iter().map(|s| s.transition).collect::<Vec<_>>(),
            [false, false, true, false]
        );
        assert_eq!(
            steps.iter().map(|s| s.streak).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn a_failure_resets_the_success_streak() {
        let mut rf = RiseFall::new(3, 3, Down);
        let steps = run(&mut rf, &[true, true, false, true, true, true]);
        assert_eq!(verdicts(&steps), [Down, Down, Down, Down, Down, Up]);
        assert_eq!(
            steps.iter().map(|s| s.streak).collect::<Vec<_>>(),
            [1, 2, 1, 1, 2, 3]
        );
        assert!(steps[5].transition);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut rf = RiseFall::new(3, 2, Up);
        let steps = run(&mut rf, &[false, true, false, true, false, false]);
        assert_eq!(verdicts(&steps), [Up, Up, Up, Up, Up, Down]);
        assert_eq!(
            steps.iter().map(|s| s.streak).collect::<Vec<_>>(),
            [1, 1, 1, 1, 1, 2]
        );
    }

    #[test]
    fn results_agreeing_with_the_verdict_never_change_it() {
        let mut up = RiseFall::new(1, 1, Up);
        assert!(
            run(&mut up, &[true; 10])
                .iter()
                .all(|s| s.verdict == Up && !s.transition)
        );
        let mut down = RiseFall::new(1, 1, Down);
        assert!(
            run(&mut down, &[false; 10])
                .iter()
                .all(|s| s.verdict == Down && !s.transition)
        );
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut rf = RiseFall::new(1, 1, Down);
        let steps = run(&mut rf, &[true, false, true, true, false]);
        assert_eq!(verdicts(&steps), [Up, Down, Up, Up, Down]);
        assert_eq!(
            steps.iter().map(|s| s.transition).collect::<Vec<_>>(),
            [true, true, true, false, true]
        );
    }

    #[test]
    fn the_starting_verdict_counts_as_if_already_reached() {
        // Starting up means no successes are needed to stay up, and fall failures to go down.
        let mut rf = RiseFall::new(5, 2, Up);
        assert_eq!(rf.verdict(), Up);
        assert_eq!(
            rf.record(true),
            Step {
                verdict: Up,
                transition: false,
                streak: 1
            }
        );
        let mut rf = RiseFall::new(5, 2, Up);
        assert_eq!(verdicts(&run(&mut rf, &[false, false])), [Up, Down]);
        // Starting down, a failure does nothing and rise successes are needed.
        let mut rf = RiseFall::new(2, 5, Down);
        assert_eq!(
            rf.record(false),
            Step {
                verdict: Down,
                transition: false,
                streak: 1
            }
        );
        assert_eq!(verdicts(&run(&mut rf, &[true, true])), [Down, Up]);
    }

    #[test]
    fn a_full_cycle_down_up_down_up() {
        let mut rf = RiseFall::new(2, 3, Down);
        let steps = run(&mut rf, &[true, true, false, false, false, true, true]);
        assert_eq!(verdicts(&steps), [Down, Up, Up, Up, Down, Down, Up]);
        let transitions: Vec<usize> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.transition)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(transitions, [1, 4, 6]);
    }

    #[test]
    fn zero_rise_or_fall_act_as_one() {
        let mut rf = RiseFall::new(0, 0, Down);
        assert_eq!(verdicts(&run(&mut rf, &[true, false])), [Up, Down]);
    }

    #[test]
    fn the_streak_saturates_instead_of_wrapping() {
        let mut rf = RiseFall::new(2, 2, Up);
        rf.last_ok = Some(true);
        rf.streak = u32::MAX - 1;
        assert_eq!(rf.record(true).streak, u32::MAX);
        assert_eq!(
            rf.record(true),
            Step {
                verdict: Up,
                transition: false,
                streak: u32::MAX
            }
        );
        assert_eq!(rf.record(false).streak, 1);
    }
}
