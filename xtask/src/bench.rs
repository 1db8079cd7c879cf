//! `cargo xtask bench -- ARGS`: the benchmarks of the test crate (`mim-lb-bench ARGS`), as
//! root, with leftovers of killed runs removed before and after, like `cargo xtask test`; the
//! per-packet benchmark also gets the baseline program of issue 7 (see `baseline`).
use std::ffi::OsString;
use std::process::{Command, ExitCode};

use anyhow::{Result, bail};

use crate::{baseline, bpffs, setup, test, util};

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    if !util::is_root() {
        bail!(
            "`cargo xtask bench` must run as root: it loads XDP programs and builds namespace labs. \
             Try: sudo -E env \"PATH=$PATH\" cargo xtask bench"
        );
    }
    setup::ensure()?;
    bpffs::ensure("the benchmarks")?;
    test::remove_stale()?;
    // The failover benchmark starts the real daemon, `mim-lb-dut`, from next to the bench
    // binary; `cargo run` builds only the binary it runs.
    util::run(util::cargo().args([
        "build",
        "--release",
        "--package",
        "mim-lb-tests",
        "--bin",
        "mim-lb-dut",
        "--bin",
        "mim-lb-bench",
    ]))?;
    let mut cmd = util::cargo();
    cmd.args(["run", "--release", "--package", "mim-lb-tests", "--bin", "mim-lb-bench", "--"])
        .args(&args);
    if baseline::wanted(&args) {
        pass_baseline(&mut cmd);
    }
    // Ctrl-C reaches the benchmark (same process group), which removes what it made and exits;
    // xtask stays to sweep up after a benchmark that was killed harder than that.
    test::survive_interrupts();
    let status = util::status(&mut cmd)?;
    test::remove_stale()?;
    Ok(util::exit_code(status))
}

/// Builds the baseline program and hands it to the benchmark. A baseline that cannot be built
/// (no git history, a build failure) skips only the comparison with it: the benchmark is told
/// why and says so in its report, and everything else runs.
fn pass_baseline(cmd: &mut Command) {
    match baseline::object() {
        Ok(object) => {
            cmd.env(baseline::ENV_OBJECT, object)
                .env(baseline::ENV_COMMIT, baseline::COMMIT);
        }
        Err(e) => {
            let why = format!("{e:#}");
            eprintln!(
                "xtask bench: warning: the baseline XDP program ({}) could not be built; the \
                 per-packet comparison with it is skipped: {why}",
                baseline::COMMIT
            );
            cmd.env(baseline::ENV_MISSING, why);
        }
    }
}
