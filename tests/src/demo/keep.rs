//! `--keep`: after the story, the lab stays up until Ctrl-C, and the demo prints what an
//! operator needs to look around in it.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Result;

use super::signals::{self, Interrupted};
use super::story::{PORT, SERVICE};
use crate::Lab;
use crate::gateway::{Gateway, mim_lb_binary};

/// Where the guide's text starts on a row (after two spaces and the label's column): each row
/// is either a command to run as it stands or a note in parentheses.
pub const GUIDE_COLUMN: usize = 2 + GUIDE_LABEL_WIDTH + 1;
const GUIDE_LABEL_WIDTH: usize = 22;

/// The first line of the guide, and the label of its last row.
pub const GUIDE_HEADING: &str = "The lab keeps running (the demo's traffic has stopped). Press Ctrl-C to remove it.";
pub const GUIDE_LAST_LABEL: &str = "its maps";

/// What an operator needs to look around in the lab: (label, command or note) rows. Every
/// command runs as printed, in the order printed (tests/tests/lab_demo.rs runs them all).
pub fn guide(lab: &Lab, gateway: &Gateway) -> Vec<(&'static str, String)> {
    let cli = operator_cli();
    let config = gateway.config_path().display().to_string();
    let pin_dir = gateway.pin_dir().display();
    let mut maps: Vec<String> = std::fs::read_dir(gateway.pin_dir())
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    maps.sort();
    let vip = lab.vip4();
    // The other namespaces differ from the client's only in the role at the end.
    let prefix = lab.client_ns().trim_end_matches("client");
    let others: Vec<&str> = std::iter::once(lab.gateway_ns())
        .chain((0..lab.master_count()).map(|i| lab.master_ns(i)))
        .chain((0..lab.slave_count()).map(|i| lab.slave_ns(i)))
        .map(|ns| ns.trim_start_matches(prefix))
        .collect();
    let master = lab.master_addr4(0);
    vec![
        ("enter a host", format!("ip netns exec {} bash", lab.client_ns())),
        ("", format!("(the others: {prefix}{{{}}})", others.join(","))),
        // Both steps of a request, with nothing but bash: ask the VIP, then go to the slave.
        (
            "ask for a slave",
            format!(
                "ip netns exec {} bash -c 'exec 3<>/dev/tcp/{vip}/{PORT}; echo \"slave?\" >&3; \
                 read -r m _ a <&3; echo \"$m: slave $a\"; exec 4<>/dev/tcp/${{a%:*}}/${{a#*:}}; head -n1 <&4'",
                lab.client_ns()
            ),
        ),
        ("mim-lb status", format!("{cli} status --config {config}")),
        ("", "(or --socket PATH, or MIM_LB_SOCKET; --json for scripts, --watch to follow it)".to_owned()),
        ("take a master out", format!("{cli} disable {SERVICE} {master} --config {config}")),
        ("drain one and wait", format!("{cli} drain {SERVICE} {master} --wait --timeout 1m --config {config}")),
        ("put it back", format!("{cli} enable {SERVICE} {master} --config {config}")),
        ("unplug a master", format!("ip -n {} link set eth0 down", lab.master_ns(0))),
        ("plug it back", format!("ip -n {} link set eth0 up", lab.master_ns(0))),
        ("the config", format!("cat {config}")),
        ("the XDP program", format!("ip netns exec {} bpftool net show dev eth0", lab.gateway_ns())),
        (GUIDE_LAST_LABEL, format!("bpftool map dump pinned {pin_dir}/BACKENDS")),
        ("", format!("(pinned in {pin_dir}: {})", maps.join(", "))),
    ]
}

/// Prints the guide: the heading, then a row per (label, command or note).
pub(super) fn print_guide(rows: &[(&'static str, String)]) {
    println!("\n{GUIDE_HEADING}");
    for (what, how) in rows {
        println!("  {what:<GUIDE_LABEL_WIDTH$} {how}");
    }
}

/// Leaves the lab running until Ctrl-C, with what an operator needs to look around.
pub fn keep(lab: &Lab, gateway: &Gateway) -> Result<()> {
    print_guide(&guide(lab, gateway));
    let _ = std::io::stdout().flush();
    loop {
        match signals::sleep(Duration::from_secs(1)) {
            Ok(()) => {}
            Err(Interrupted) => return Ok(()),
        }
        // The lab is only useful while the daemon serves; say so if it stopped.
        if let Ok(Some(status)) = gateway.proc().try_exit_status() {
            anyhow::bail!("mim-lb exited ({status}):\n{}", gateway.proc().tail(20));
        }
    }
}

/// The mim-lb command for the operator: the real `mim-lb` binary if it was built next to this
/// one (`cargo xtask lab` builds it) and is not older than it, else `mim-lb-dut`, the same CLI
/// under the test crate's name (a `mim-lb` left by an earlier build is not this code).
pub(super) fn operator_cli() -> String {
    let dut = mim_lb_binary();
    let real = dut.with_file_name("mim-lb");
    let built = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = matches!((built(&real), built(&dut)), (Some(r), Some(d)) if r >= d);
    if fresh { real } else { dut }.display().to_string()
}
