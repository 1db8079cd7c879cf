//! `cargo xtask run -- ARGS`: builds the release daemon and becomes `mim-lb run ARGS`.
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::{setup, util};

/// Where cargo puts build output; CARGO_TARGET_DIR or the config can move it away from
/// `<workspace>/target`.
fn target_directory() -> Result<PathBuf> {
    let json =
        util::stdout_of(util::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&json).context("parsing `cargo metadata` output")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` output has no target_directory")?;
    Ok(PathBuf::from(dir))
}

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    setup::ensure()?;
    util::run(util::cargo().args(["build", "--release", "--package", "mim-lb"]))?;
    let binary = target_directory()?.join("release").join("mim-lb");
    let mut cmd = util::command(&binary);
    cmd.arg("run").args(args);
    Err(util::exec(&mut cmd))
}
