//! `cargo xtask lab ARGS`: the demo (`mim-lb-lab` from the test crate).
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::{bpffs, setup, util};

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    let help = args.iter().any(|a| a == "--help" || a == "-h");
    if !util::is_root() && !help {
        bail!(
            "`cargo xtask lab` must run as root: the lab creates network namespaces, loads XDP \
             programs and pins maps in bpffs. Try: sudo -E env \"PATH=$PATH\" cargo xtask lab"
        );
    }
    setup::ensure()?;
    if !help {
        bpffs::ensure("the lab's mim-lb")?;
    }
    // Every binary the demo uses: mim-lb-lab itself, mim-lb-dut (the daemon it starts on the
    // gateway, found next to mim-lb-lab) and mim-lb (the CLI it tells the operator to use).
    util::run(util::cargo().args([
        "build",
        "--release",
        "--package",
        "mim-lb",
        "--package",
        "mim-lb-tests",
        "--bins",
    ]))?;
    let binary = util::target_directory()?.join("release").join("mim-lb-lab");
    let mut cmd = util::command(&binary);
    cmd.args(args);
    // exec so that Ctrl-C and the exit status belong to the demo itself.
    Err(util::exec(&mut cmd))
}
