//! `cargo xtask soak --minutes N [--seed S] [--json FILE]`: the soak of issue 10
//! (`mim-lb-soak` from the test crate), as root, with leftovers of killed runs removed before
//! and after, like `cargo xtask test`. Built in the test profile the suite uses, so the
//! daemon under test is the one `cargo xtask test` runs.
use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::{bpffs, setup, test, util};

pub fn main(args: Vec<OsString>) -> Result<ExitCode> {
    let help = args.iter().any(|a| a == "--help" || a == "-h");
    if !util::is_root() && !help {
        bail!(
            "`cargo xtask soak` must run as root: it builds a namespace lab, loads XDP programs and pins \
             maps in bpffs. Try: sudo -E env \"PATH=$PATH\" cargo xtask soak"
        );
    }
    setup::ensure()?;
    if !help {
        bpffs::ensure("the soak")?;
        test::remove_stale()?;
    }
    // mim-lb-dut (the daemon the soak starts, found next to mim-lb-soak) and the soak; building
    // mim-lb compiles and embeds the XDP program.
    util::run(util::cargo().args(["build", "--package", "mim-lb-tests", "--bin", "mim-lb-dut", "--bin", "mim-lb-soak"]))?;
    let binary = util::target_directory()?.join("debug").join("mim-lb-soak");
    let mut cmd = util::command(&binary);
    cmd.args(&args);
    // Ctrl-C reaches the soak (same process group), whose labs and daemons die with it; xtask
    // stays to sweep up what was left.
    test::survive_interrupts();
    let status = util::status(&mut cmd)?;
    if !help {
        test::remove_stale()?;
    }
    Ok(util::exit_code(status))
}
