//! The bpf filesystem on /sys/fs/bpf, where mim-lb pins its maps; some machines leave it
//! unmounted.
use anyhow::{Context as _, Result};

use crate::util;

pub const BPFFS: &str = "/sys/fs/bpf";

/// Whether `/proc/self/mounts` has a bpf filesystem on `/sys/fs/bpf`.
pub fn mounted(mounts: &str) -> bool {
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&BPFFS) && f.get(2) == Some(&"bpf")
    })
}

/// Mounts a bpf filesystem on /sys/fs/bpf unless one is there; `who` says what needs it.
pub fn ensure(who: &str) -> Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounted(&mounts) {
        return Ok(());
    }
    println!("xtask: {BPFFS} is not a bpf filesystem; mounting one");
    util::run(util::command("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .with_context(|| format!("mounting bpffs ({who} pins maps there)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        let sysfs_only = "sysfs /sys sysfs rw,relatime 0 0\n";
        assert!(!mounted(sysfs_only));
        let with_bpf = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime,mode=700 0 0\n";
        assert!(mounted(with_bpf));
        assert!(!mounted("bpf /mnt/bpf bpf rw 0 0\n"));
    }
}
