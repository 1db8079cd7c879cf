//! `--keep`: after the story, the lab stays up until Ctrl-C, and the demo prints what an
//! operator needs to look around in it.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Result;

use super::signals::{self, Interrupted};
use super::story::{PORT, SERVICE};
use crate::Lab;
use crate::gateway::{Gateway, mim_lb_binary};

/// Leaves the lab running until Ctrl-C, with what an operator needs to look around.
pub fn keep(lab: &Lab, gateway: &Gateway) -> Result<()> {
    let cli = operator_cli();
    let socket = gateway.socket().display();
    let pin_dir = gateway.pin_dir().display();
    let mut maps: Vec<String> = std::fs::read_dir(gateway.pin_dir())
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    maps.sort();
    let vip = lab.vip4();
    let row = |what: &str, how: String| println!("  {what:<22} {how}");
    println!("\nThe lab keeps running (the demo's traffic has stopped). Press Ctrl-C to remove it.");
    row("enter a host", format!("ip netns exec {} bash", lab.client_ns()));
    // The other namespaces differ from the client's only in the role at the end.
    let prefix = lab.client_ns().trim_end_matches("client");
    let others: Vec<&str> = std::iter::once(lab.gateway_ns())
        .chain((0..lab.master_count()).map(|i| lab.master_ns(i)))
        .chain((0..lab.slave_count()).map(|i| lab.slave_ns(i)))
        .map(|ns| ns.trim_start_matches(prefix))
        .collect();
    row("", format!("(the others: {prefix}{{{}}})", others.join(",")));
    // Both steps of a request, with nothing but bash: ask the VIP, then go to the slave.
    row(
        "ask for a slave",
        format!(
            "ip netns exec {} bash -c 'exec 3<>/dev/tcp/{vip}/{PORT}; echo \"slave?\" >&3; \
             read -r m _ a <&3; echo \"$m: slave $a\"; exec 4<>/dev/tcp/${{a%:*}}/${{a#*:}}; head -n1 <&4'",
            lab.client_ns()
        ),
    );
    row("mim-lb status", format!("{cli} --socket {socket} status"));
    row(
        "take a master out",
        format!("{cli} --socket {socket} disable {SERVICE} {}   (enable: the same with enable)", lab.master_addr4(0)),
    );
    row("unplug a master", format!("ip -n {} link set eth0 down   (and up again)", lab.master_ns(0)));
    row("the config", gateway.config_path().display().to_string());
    row("the XDP program", format!("ip netns exec {} bpftool net show dev eth0", lab.gateway_ns()));
    row("its maps", format!("bpftool map dump pinned {pin_dir}/BACKENDS"));
    row("", format!("(pinned in {pin_dir}: {})", maps.join(", ")));
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
/// one (`cargo xtask lab` builds it), else `mim-lb-dut`, the same CLI under the test crate's name.
fn operator_cli() -> String {
    let dut = mim_lb_binary();
    let real = dut.with_file_name("mim-lb");
    if real.exists() { real } else { dut }.display().to_string()
}
