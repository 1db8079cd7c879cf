//! `cargo xtask fuzz -- ARGS`: the XDP program fuzzer of the test crate (`mim-lb-fuzz ARGS`,
//! by default ten million frames from a random seed), built in release mode and run as root.
//! `--seed S --frames N` replays a failing batch.
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::{bpffs, setup, test, util};

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    if !util::is_root() {
        bail!(
            "`cargo xtask fuzz` must run as root: it loads the XDP program. \
             Try: sudo -E env \"PATH=$PATH\" cargo xtask fuzz"
        );
    }
    setup::ensure()?;
    bpffs::ensure("the fuzzer")?;
    let mut cmd = util::cargo();
    cmd.args(["run", "--release", "--package", "mim-lb-tests", "--bin", "mim-lb-fuzz", "--"])
        .args(&args);
    test::survive_interrupts();
    let status = util::status(&mut cmd)?;
    Ok(util::exit_code(status))
}
