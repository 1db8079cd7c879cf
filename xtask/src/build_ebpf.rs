//! `cargo xtask build-ebpf`: mim-lb's build script compiles the XDP program and embeds it, so
//! building the userspace crate is how the eBPF object gets built.
use std::process::ExitCode;

use anyhow::Result;

use crate::{setup, util};

pub fn main(release: bool) -> Result<ExitCode> {
    setup::ensure()?;
    let mut cmd = util::cargo();
    cmd.args(["build", "--package", "mim-lb"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    Ok(ExitCode::SUCCESS)
}
