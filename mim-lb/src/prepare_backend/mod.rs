//! `mim-lb prepare-backend`: configures a master host for direct routing.
//!
//! In direct routing the balancer only rewrites the destination MAC, so packets reach the
//! master still addressed to the VIP. The master must take them as its own (the VIP on `lo`)
//! without ever claiming the VIP on the wire: if it answered ARP for the VIP, or put the VIP
//! in its own ARP requests, clients and routers would send VIP traffic straight to it and
//! past the balancer. It must also not drop the requests for arriving by a path its route
//! back to the client does not take (strict reverse-path filtering). [`plan`] explains each
//! setting and the kernel rules behind it; this module observes the host, prints and carries
//! out the plan, and keeps the [`state`] that `--undo` needs.
//!
//! Order matters and is kept both ways: settings before addresses when preparing, addresses
//! before settings when undoing, so the VIP is never on `lo` while the host would answer ARP
//! for it. The state file is written before anything changes, so an interrupted run can still
//! be undone.

mod netlink;
pub mod plan;
pub mod state;
pub mod sysctl;
pub mod vip;

use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow, bail};

use self::netlink::{Link, Netlink};
use self::plan::{Action, HostState, LO, Plan, plan_prepare, plan_undo};
use self::state::{Ledger, Loaded, NetnsId, Store};
pub use self::vip::Vip;

/// Arguments of `mim-lb prepare-backend`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Run on each master (as root), not on the balancer. Each change is printed as it is made.

Examples:
  mim-lb prepare-backend --vip 10.0.0.100 --vip fd00::100
  mim-lb prepare-backend --vip 10.0.0.100 --dry-run
  mim-lb prepare-backend --undo")]
pub struct Args {
    /// A VIP this master serves (IPv4 or IPv6; repeat for several). With --undo: the VIPs to
    /// undo (default: every VIP prepared before).
    #[arg(long = "vip", value_name = "VIP", required_unless_present = "undo")]
    pub vips: Vec<Vip>,
    /// Revert what earlier runs did: remove the VIPs they added from lo and, once no prepared
    /// IPv4 VIP is left, restore the settings from before the first run.
    #[arg(long)]
    pub undo: bool,
    /// Print what would be done and change nothing (needs no root).
    #[arg(long)]
    pub dry_run: bool,
    /// Where the values from before prepare-backend are kept, one file per network namespace.
    #[arg(long, value_name = "DIR", default_value = state::DEFAULT_DIR)]
    pub state_dir: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let mut vips: Vec<Vip> = Vec::new();
    for &vip in &args.vips {
        if !vips.contains(&vip) {
            vips.push(vip);
        }
    }
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if !args.dry_run && unsafe { libc::geteuid() } != 0 {
        bail!(
            "prepare-backend changes addresses and sysctls and must run as root \
             (--dry-run shows what it would do without)"
        );
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_async(args, &vips))
}

async fn run_async(args: &Args, vips: &[Vip]) -> Result<()> {
    let netlink = Netlink::connect()?;
    let store = Store::new(&args.state_dir, NetnsId::current()?);
    // A dry run must not create the state directory, so it takes no lock.
    let _lock = if args.dry_run { None } else { Some(store.lock()?) };
    let ledger = match store.load()? {
        Loaded::Found(ledger) => Some(ledger),
        Loaded::Missing => None,
        Loaded::Stale => {
            println!(
                "ignoring {}: it belongs to a network namespace that no longer exists \
                 (an earlier boot, or a deleted namespace), so nothing it records applies here",
                store.path().display()
            );
            None
        }
    };
    let (host, lo) = observe(&netlink).await?;
    if args.undo {
        undo(args, vips, &netlink, &lo, &host, &store, ledger).await
    } else {
        prepare(args, vips, &netlink, &lo, &host, &store, ledger).await
    }
}

async fn observe(netlink: &Netlink) -> Result<(HostState, Link)> {
    let links = netlink.links().await?;
    let lo = links
        .iter()
        .find(|l| l.name == LO)
        .cloned()
        .ok_or_else(|| anyhow!("this network namespace has no {LO} interface"))?;
    let host = HostState {
        lo_up: lo.up,
        ipv6_on_lo: sysctl::ipv6_on_lo()?,
        addresses: netlink.addresses(&links).await?,
        sysctls: sysctl::read_all()?,
    };
    Ok((host, lo))
}

fn vip_list(vips: &[Vip]) -> String {
    vips.iter().map(|v| v.ip().to_string()).collect::<Vec<_>>().join(", ")
}

fn print_notes(plan: &Plan) {
    for note in &plan.notes {
        println!("{note}");
    }
}

fn print_dry_run(plan: &Plan) {
    for action in &plan.actions {
        println!("{action}");
    }
    match plan.actions.len() {
        0 => println!("dry run: nothing to change"),
        n => println!("dry run: {n} change{} not made", if n == 1 { "" } else { "s" }),
    }
}

async fn prepare(
    args: &Args,
    vips: &[Vip],
    netlink: &Netlink,
    lo: &Link,
    host: &HostState,
    store: &Store,
    ledger: Option<Ledger>,
) -> Result<()> {
    let plan = plan_prepare(host, vips, ledger.as_ref().unwrap_or(&Ledger::default()))?;
    print_notes(&plan);
    if args.dry_run {
        print_dry_run(&plan);
        return Ok(());
    }
    let path = store.path();
    // Written before any change: if this run stops part-way, undo still knows the originals.
    if let Some(new) = plan.ledger.as_ref().filter(|new| Some(*new) != ledger.as_ref()) {
        store.save(new)?;
    }
    if plan.actions.is_empty() {
        println!("no change: this host is already prepared for {}", vip_list(vips));
        return Ok(());
    }
    let made = execute(netlink, lo, &plan.actions).await.with_context(|| {
        format!(
            "stopped part-way; {} records everything that was to be changed, so \
             `mim-lb prepare-backend --undo --state-dir {}` reverts what was done",
            path.display(),
            args.state_dir.display()
        )
    })?;
    println!("prepared for {}: {made} changes; state in {}", vip_list(vips), path.display());
    Ok(())
}

async fn undo(
    args: &Args,
    vips: &[Vip],
    netlink: &Netlink,
    lo: &Link,
    host: &HostState,
    store: &Store,
    ledger: Option<Ledger>,
) -> Result<()> {
    let path = store.path();
    if ledger.is_none() {
        println!("no prepare-backend state for this network namespace ({})", path.display());
    }
    let plan = plan_undo(host, vips, ledger.as_ref())?;
    print_notes(&plan);
    if args.dry_run {
        print_dry_run(&plan);
        return Ok(());
    }
    let made = execute(netlink, lo, &plan.actions).await?;
    match &plan.ledger {
        Some(left) if Some(left) != ledger.as_ref() => store.save(left)?,
        Some(_) => {}
        // Also drops a stale file, which describes a namespace that is gone.
        None => store.remove()?,
    }
    match made {
        0 => println!("no change: nothing to undo"),
        n => println!("undone: {n} change{}", if n == 1 { "" } else { "s" }),
    }
    Ok(())
}

/// Carries out `actions` in order, printing each as it is made; returns how many were made.
async fn execute(netlink: &Netlink, lo: &Link, actions: &[Action]) -> Result<usize> {
    let mut made = 0;
    for action in actions {
        match action {
            Action::AddVip(vip) => netlink.add_vip(lo, *vip).await?,
            Action::RemoveVip(vip) => netlink.remove_vip(lo, *vip).await?,
            Action::Set { key, to, why, .. } => {
                // Read again: writing `default` changes the interfaces that still follow it
                // (see `plan`), and the value printed is the one really replaced.
                match sysctl::read(key)? {
                    None => {
                        println!("skip {key}: the interface is gone");
                        continue;
                    }
                    Some(now) if now == *to => {
                        println!("{key} is already {to}");
                        continue;
                    }
                    Some(now) => {
                        sysctl::write(key, *to)?;
                        let done = Action::Set { key: key.clone(), from: now, to: *to, why: *why };
                        println!("{done}");
                        made += 1;
                        continue;
                    }
                }
            }
        }
        println!("{action}");
        made += 1;
    }
    Ok(made)
}
