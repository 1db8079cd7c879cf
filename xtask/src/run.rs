//! `cargo xtask run -- ARGS`: builds the release daemon and becomes `mim-lb run ARGS`.
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

use crate::{setup, util};

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    setup::ensure()?;
    util::run(util::cargo().args(["build", "--release", "--package", "mim-lb"]))?;
    let binary = util::target_directory()?.join("release").join("mim-lb");
    let mut cmd = util::command(&binary);
    cmd.arg("run").args(args);
    Err(util::exec(&mut cmd))
}
