//! `cargo xtask bench -- ARGS`: the benchmarks from the test crate.
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

use crate::{setup, util};

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    setup::ensure()?;
    let mut cmd = util::cargo();
    cmd.args([
        "run",
        "--release",
        "--package",
        "mim-lb-tests",
        "--bin",
        "mim-lb-bench",
        "--",
    ])
    .args(args);
    // exec so that Ctrl-C and the exit status belong to the benchmark itself.
    Err(util::exec(&mut cmd))
}
