//! `cargo xtask bench -- ARGS`: the benchmarks of the test crate (`mim-lb-bench ARGS`), as
//! root, with leftovers of killed runs removed before and after, like `cargo xtask test`.
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::{bpffs, setup, test, util};

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
    // Ctrl-C reaches the benchmark (same process group), which removes what it made and exits;
    // xtask stays to sweep up after a benchmark that was killed harder than that.
    test::survive_interrupts();
    let mut cmd = util::cargo();
    cmd.args(["run", "--release", "--package", "mim-lb-tests", "--bin", "mim-lb-bench", "--"])
        .args(args);
    let status = util::status(&mut cmd)?;
    test::remove_stale()?;
    Ok(util::exit_code(status))
}
