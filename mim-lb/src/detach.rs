//! `mim-lb detach`: removes what a stopped daemon left in place on purpose. A daemon stopped
//! with `--keep-pinned` (as the systemd unit does, so restarts and upgrades keep every flow)
//! leaves its program attached and forwarding with the last state; this takes it off the
//! interface and removes the pinned maps.

use anyhow::{Context as _, Result};

use crate::{
    cli::DetachArgs,
    config::Config,
    dataplane::{LINK_PIN, detach_pinned_link},
    lock::InstanceLock,
};

pub fn run(args: &DetachArgs) -> Result<()> {
    let config = Config::from_file(&args.config)
        .with_context(|| format!("{} is not a valid mim-lb config", args.config.display()))?;
    // A running daemon owns the pins; refusing here beats pulling them from under it.
    let _lock = InstanceLock::acquire(&config.control_socket, &config.pin_dir)
        .context("a mim-lb daemon is running: stop it first (systemctl stop mim-lb)")?;
    let dir = &config.pin_dir;
    let pinned = std::iter::once(LINK_PIN).chain(mim_lb_common::maps::names::ALL).any(|n| dir.join(n).exists());
    if !pinned {
        let _ = std::fs::remove_dir(dir);
        println!("nothing is pinned under {}: mim-lb is not attached", dir.display());
        return Ok(());
    }
    let mut removed = Vec::new();
    // The link first, so the maps are never gone while the program still runs on them.
    if dir.join(LINK_PIN).exists() {
        detach_pinned_link(&dir.join(LINK_PIN))?;
        removed.push(LINK_PIN);
    }
    for name in mim_lb_common::maps::names::ALL {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    let _ = std::fs::remove_dir(dir);
    if removed.contains(&LINK_PIN) {
        println!("detached mim-lb from {} (removed {})", config.interface, dir.join(LINK_PIN).display());
    }
    println!("removed {} pinned maps under {}; recorded flows are gone", removed.len() - usize::from(removed.contains(&LINK_PIN)), dir.display());
    Ok(())
}
