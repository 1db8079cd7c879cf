//! What the soak does next: a seeded generator picks each step from what the lab's state
//! allows, so a seed replays the same schedule (the timing of the machine aside). Pure: no
//! I/O, so the choices can be tested without a lab.

use std::time::Duration;

/// splitmix64: tiny, fast, and good enough to pick steps; the same seed gives the same
/// sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A duration in `lo..=hi`, to the millisecond.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.as_millis().saturating_sub(lo.as_millis()) as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// What the soak believes of one master: its services run (`alive`) and the operator drained
/// it. The daemon's status must agree with this after every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterModel {
    pub alive: bool,
    pub drained: bool,
    pub weight: u32,
}

impl MasterModel {
    /// The state `mim-lb status` must show for it once its checks have settled.
    pub fn expected_state(&self) -> &'static str {
        match (self.alive, self.drained) {
            (false, _) => "down",
            (true, true) => "draining",
            (true, false) => "up",
        }
    }

    /// Takes new connections: long-lived ones are opened to it.
    pub fn takes_new(&self) -> bool {
        self.alive && !self.drained
    }
}

/// One step of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Stop master `i`'s TCP and UDP services (its connections break, checks fail).
    Kill(usize),
    /// Start them again.
    Revive(usize),
    /// `mim-lb drain` it.
    Drain(usize),
    /// `mim-lb enable` it.
    Enable(usize),
    /// New weights in the file, then `mim-lb reload` (or SIGHUP when `by_signal`).
    Reweight { weights: Vec<u32>, by_signal: bool },
    /// A file the daemon must refuse, then `mim-lb reload` (or SIGHUP): nothing may change.
    InvalidReload { by_signal: bool },
    /// SIGTERM to a daemon run with `--keep-pinned`, then start it again.
    RestartKeepPinned,
    /// SIGKILL, then start it again over the pins it left.
    RestartAfterKill,
}

impl Step {
    pub fn label(&self) -> String {
        match self {
            Step::Kill(i) => format!("kill master-{}", i + 1),
            Step::Revive(i) => format!("revive master-{}", i + 1),
            Step::Drain(i) => format!("drain master-{}", i + 1),
            Step::Enable(i) => format!("enable master-{}", i + 1),
            Step::Reweight { weights, by_signal } => {
                format!("reweight {weights:?} by {}", if *by_signal { "SIGHUP" } else { "mim-lb reload" })
            }
            Step::InvalidReload { by_signal } => {
                format!("invalid reload by {}", if *by_signal { "SIGHUP" } else { "mim-lb reload" })
            }
            Step::RestartKeepPinned => "restart (SIGTERM, --keep-pinned)".into(),
            Step::RestartAfterKill => "restart (SIGKILL)".into(),
        }
    }
}

/// Fewest masters that must keep taking new connections: a step that would leave fewer is
/// not chosen, so that new connections always have somewhere to go (a service with no master
/// drops them, which no health-check timing excuses).
pub const MIN_TAKING_NEW: usize = 2;

/// Picks the next step. `restart_allowed`: the daemon has run long enough since its last
/// start (the soak spaces restarts so that each run of the daemon is long enough to watch its
/// memory and descriptors).
pub fn next_step(rng: &mut Rng, masters: &[MasterModel], restart_allowed: bool) -> Step {
    let taking = masters.iter().filter(|m| m.takes_new()).count();
    let pick = |rng: &mut Rng, want: &dyn Fn(&MasterModel) -> bool| -> Option<usize> {
        let candidates: Vec<usize> = (0..masters.len()).filter(|&i| want(&masters[i])).collect();
        (!candidates.is_empty()).then(|| candidates[rng.below(candidates.len() as u64) as usize])
    };
    // Bounded: every kind below has a fallback, and Reweight is always possible.
    for _ in 0..32 {
        let step = match rng.below(100) {
            0..=21 if taking > MIN_TAKING_NEW => pick(rng, &|m| m.takes_new()).map(Step::Kill),
            22..=39 => pick(rng, &|m| !m.alive).map(Step::Revive),
            40..=51 if taking > MIN_TAKING_NEW => pick(rng, &|m| m.takes_new()).map(Step::Drain),
            52..=63 => pick(rng, &|m| m.drained).map(Step::Enable),
            64..=75 => Some(Step::Reweight {
                weights: (0..masters.len()).map(|_| 1 + rng.below(3) as u32).collect(),
                by_signal: rng.below(2) == 0,
            }),
            76..=85 => Some(Step::InvalidReload { by_signal: rng.below(2) == 0 }),
            86..=92 if restart_allowed => Some(Step::RestartKeepPinned),
            93..=99 if restart_allowed => Some(Step::RestartAfterKill),
            _ => None,
        };
        if let Some(step) = step {
            return step;
        }
    }
    Step::InvalidReload { by_signal: false }
}

/// The model after `step` has been carried out.
pub fn apply(masters: &mut [MasterModel], step: &Step) {
    match step {
        Step::Kill(i) => masters[*i].alive = false,
        Step::Revive(i) => masters[*i].alive = true,
        Step::Drain(i) => masters[*i].drained = true,
        Step::Enable(i) => masters[*i].drained = false,
        Step::Reweight { weights, .. } => {
            for (m, w) in masters.iter_mut().zip(weights) {
                m.weight = *w;
            }
        }
        Step::InvalidReload { .. } | Step::RestartKeepPinned | Step::RestartAfterKill => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(n: usize) -> Vec<MasterModel> {
        vec![MasterModel { alive: true, drained: false, weight: 1 }; n]
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let run = |seed| {
            let (mut rng, mut masters) = (Rng::new(seed), fresh(4));
            (0..200)
                .map(|k| {
                    let step = next_step(&mut rng, &masters, k % 7 == 0);
                    apply(&mut masters, &step);
                    step
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn enough_masters_always_take_new_connections_and_every_kind_occurs() {
        let (mut rng, mut masters) = (Rng::new(7), fresh(4));
        let mut kinds = std::collections::HashSet::new();
        for k in 0..2000 {
            let step = next_step(&mut rng, &masters, k % 5 == 0);
            if matches!(step, Step::RestartKeepPinned | Step::RestartAfterKill) {
                assert!(k % 5 == 0, "a restart was chosen while not allowed");
            }
            kinds.insert(std::mem::discriminant(&step));
            apply(&mut masters, &step);
            let taking = masters.iter().filter(|m| m.takes_new()).count();
            assert!(taking >= MIN_TAKING_NEW, "step {k} ({}) left {taking} masters taking new connections", step.label());
        }
        assert_eq!(kinds.len(), 8, "some kind of step never occurred");
    }

    #[test]
    fn expected_states() {
        let m = |alive, drained| MasterModel { alive, drained, weight: 1 };
        assert_eq!(m(true, false).expected_state(), "up");
        assert_eq!(m(true, true).expected_state(), "draining");
        assert_eq!(m(false, true).expected_state(), "down");
        assert_eq!(m(false, false).expected_state(), "down");
    }
}
