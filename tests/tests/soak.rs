//! Issue 10's soak for two minutes: masters die and come back, operators drain, enable and
//! reload (valid and invalid files, by `mim-lb reload` and by SIGHUP), the daemon restarts
//! over its pins after SIGTERM and after SIGKILL, all at random, under long-lived and short
//! TCP and UDP traffic. No long-lived flow to a live master breaks, no short one fails outside
//! the window a master's death excuses, the status always agrees with what was done, and the
//! daemon's memory and descriptors stay flat (see `mim_lb_tests::soak` for each rule and
//! TESTING.md, "The soak"; `cargo xtask soak --minutes 30` is the long run).

use std::time::Duration;

use mim_lb_tests::soak::{self, SoakSpec};

/// `MIM_LB_SOAK_SEED` replays a schedule (the report and a failure print the seed).
#[test]
fn soak_two_minutes_of_deaths_operator_actions_and_restarts() {
    let seed = std::env::var("MIM_LB_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(soak::random_seed);
    let report = soak::run(&SoakSpec::new(Duration::from_secs(120), seed)).unwrap();
    eprintln!("{}", report.text());
    assert!(
        report.passed(),
        "the soak broke invariants (replay: MIM_LB_SOAK_SEED={seed}, or cargo xtask soak --minutes 2 --seed {seed}):\n{}",
        report.violations().join("\n")
    );
}
