//! What prepare-backend and its undo do, decided from what the host looks like: pure functions
//! from a [`HostState`] (and the [`Ledger`] of earlier runs) to a [`Plan`].
//!
//! # The kernel rules this follows
//!
//! Measured on Linux 6.18 in namespaces (two hosts on a veth, the VIP on one host's `lo`); the
//! same rules are in net/ipv4/arp.c, net/ipv4/fib_frontend.c and include/linux/inetdevice.h.
//!
//! - For `arp_ignore`, `arp_announce` and `rp_filter` the value in force on an interface is
//!   `max(conf/all, conf/<interface>)`. The kernel accepts any integer for them.
//! - `arp_ignore` (the interface that *receives* the ARP request counts): 0 answers for any
//!   local address, so the master claims a VIP on `lo`; 1 (target configured on the receiving
//!   interface) and 2 (1, and the sender in that interface's subnet) do not; 3 (refuse only
//!   scope host addresses) does claim a global VIP on `lo`; 4 to 7 and anything above 8 behave
//!   like 0; 8 never answers at all. Safe: {1, 2, 8}. `all=1` with `eth0=3` gives 3 and claims.
//! - `arp_announce` (the *outgoing* interface counts): when the master answers from the VIP
//!   and must first resolve the client or router, 0 and 1 put the VIP in the ARP request as the
//!   sender address (1 avoids only addresses outside the target's subnet, and a DR VIP usually
//!   is inside it), and receivers that know the VIP update their cache to the master's MAC.
//!   Only 2 picks the interface's own address; values above 2 behave like 0. Safe: {2}.
//! - `rp_filter` (the *receiving* interface counts): 1 (strict) drops a packet when the route
//!   back to its source leaves by another interface, which in DR happens as soon as a master
//!   has a second way to the clients (another uplink, a VPN, policy routing); 2 (loose, any
//!   value >= 2) only wants *some* route back; 0 checks nothing. Only exactly 1 is a problem.
//! - New interfaces start from `conf/default`. Writing `default` also writes every interface
//!   that follows it: one whose value was never written and that has no IPv4 address yet
//!   (adding one pins all its values). Writing `conf/all` writes nothing else.
//! - `lo` is left out: it never receives ARP (IFF_NOARP) and its packets skip the
//!   reverse-path check (they arrive with their route already attached), so its values change
//!   nothing.
//!
//! IPv6 needs nothing: measured the same way, a VIP on `lo` is not answered by neighbour
//! discovery on other interfaces (the kernel answers a solicitation only for addresses of the
//! receiving interface, even with forwarding on, unless proxy NDP is set up for it), its
//! solicited-node group is joined on `lo` only, and the master's own solicitations never use
//! an address of another interface as source. IPv6 has no reverse-path sysctl.
//!
//! Not changed, for lack of a reason: `accept_local` (only matters when a packet's source is one
//! of the master's own addresses, which a client's is not), `arp_filter` (the VIP is on no
//! interface ARP can be asked on), `lo`'s settings (above).

use std::fmt;

use super::state::Ledger;
use super::sysctl::{Ipv6OnLo, Knob, SysctlKey, Values};
use super::vip::Vip;

pub use super::netlink::IfAddr;

/// The loopback interface, where VIPs go.
pub const LO: &str = "lo";

/// What the host looks like now.
#[derive(Debug, Clone)]
pub struct HostState {
    pub lo_up: bool,
    pub ipv6_on_lo: Ipv6OnLo,
    /// Every address of every interface.
    pub addresses: Vec<IfAddr>,
    /// Every [`Knob`] of `all`, `default` and every interface.
    pub sysctls: Values,
}

impl HostState {
    fn vip_on(&self, vip: Vip) -> impl Iterator<Item = &IfAddr> {
        self.addresses.iter().filter(move |a| a.ip == vip.ip())
    }

    fn on_lo(&self, vip: Vip) -> bool {
        self.vip_on(vip).any(|a| a.ifname == LO && a.prefix_len == vip.prefix_len())
    }
}

/// Why a setting is set to the value it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Needed(Knob),
    Restore,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Why::Needed(Knob::ArpIgnore) => "answer ARP only for addresses on the asking interface",
            Why::Needed(Knob::ArpAnnounce) => "never use the VIP as the sender address of ARP requests",
            Why::Needed(Knob::RpFilter) => {
                "loose reverse-path filter: accept requests whose route back leaves by another interface"
            }
            Why::Restore => "restore the value from before prepare-backend",
        })
    }
}

/// One change to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    AddVip(Vip),
    RemoveVip(Vip),
    Set { key: SysctlKey, from: i32, to: i32, why: Why },
}

/// `add 10.0.0.100/32 to lo`, `set net.ipv4.conf.all.arp_ignore 0 -> 1 (...)`.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::AddVip(vip) => write!(f, "add {vip} to {LO}"),
            Action::RemoveVip(vip) => write!(f, "remove {vip} from {LO}"),
            Action::Set { key, from, to, why } => write!(f, "set {key} {from} -> {to} ({why})"),
        }
    }
}

/// Something worth saying that is not a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    VipAlreadyOnLo(Vip),
    /// prepare: nothing to set.
    SysctlsAlreadyRight,
    /// undo: the VIP is not on `lo` (any more).
    VipNotOnLo(Vip),
    /// undo: the VIP was on `lo` before prepare-backend first ran.
    VipWasThereBefore(Vip),
    /// undo: the ledger does not list this VIP, so prepare-backend did not add it.
    VipNotPrepared(Vip),
    /// undo: other prepared IPv4 VIPs still need the settings.
    SysctlsStillNeeded(Vec<Vip>),
    /// undo: someone changed the setting after prepare-backend set it; theirs is kept.
    ChangedSince {
        key: SysctlKey,
        set: i32,
        now: i32,
        original: i32,
    },
    /// undo: the interface is gone, and its setting with it.
    InterfaceGone(SysctlKey),
    /// undo without a ledger: the settings from before are unknown; these are the current ones.
    SysctlsUnknown(Vec<(SysctlKey, i32)>),
    /// undo: these IPv4 VIPs stay on `lo` while the ARP settings go back, so the host will
    /// claim them again.
    ClaimedAgain(Vec<Vip>),
}

fn list(vips: &[Vip]) -> String {
    vips.iter().map(|v| v.ip().to_string()).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::VipAlreadyOnLo(vip) => write!(f, "{vip} is already on {LO}"),
            Note::SysctlsAlreadyRight => f.write_str(
                "arp_ignore, arp_announce and rp_filter are already right on every interface",
            ),
            Note::VipNotOnLo(vip) => write!(f, "{vip} is not on {LO}: nothing to remove"),
            Note::VipWasThereBefore(vip) => {
                write!(f, "leave {vip} on {LO}: it was there before prepare-backend first ran")
            }
            Note::VipNotPrepared(vip) => {
                write!(
                    f,
                    "leave {vip} alone: prepare-backend did not prepare it (not in its state)"
                )
            }
            Note::SysctlsStillNeeded(vips) => write!(
                f,
                "keep the ARP and rp_filter settings: still needed by {} (undo those too to restore them)",
                list(vips)
            ),
            Note::ChangedSince { key, set, now, original } => write!(
                f,
                "leave {key} at {now}: changed since prepare-backend set it to {set} (it was {original} before)"
            ),
            Note::InterfaceGone(key) => write!(f, "skip {key}: the interface is gone"),
            Note::SysctlsUnknown(current) => {
                write!(
                    f,
                    "the ARP and rp_filter settings from before prepare-backend are unknown, so they are left as \
                     they are (kernel defaults are 0):"
                )?;
                for (key, value) in current {
                    write!(f, "\n  {key} = {value}")?;
                }
                Ok(())
            }
            Note::ClaimedAgain(vips) => write!(
                f,
                "warning: {} stays on {LO} and with the ARP settings restored this host answers ARP for it again",
                list(vips)
            ),
        }
    }
}

/// What to do, what to say, and the ledger to keep afterwards (`None`: remove the state file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub notes: Vec<Note>,
    pub actions: Vec<Action>,
    pub ledger: Option<Ledger>,
}

/// Why the host cannot be prepared as asked. Nothing is changed in these cases.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{vip} is on {ifname}: a master must hold the VIP only on lo, or it answers ARP/ND for it and \
         takes the VIP's traffic away from the balancer. Remove it (ip addr del {vip} dev {ifname}); \
         or is this the balancer rather than a master?"
    )]
    VipOnInterface { vip: Vip, ifname: String },
    #[error(
        "{ip}/{prefix_len} is on lo: a VIP must be on lo as /{want} only, a wider prefix makes this host \
         take traffic for its neighbours too; remove it first (ip addr del {ip}/{prefix_len} dev lo)",
        ip = vip.ip(), want = vip.prefix_len()
    )]
    VipOnLoWithPrefix { vip: Vip, prefix_len: u8 },
    #[error("lo is down, so addresses on it are not local; bring it up first (ip link set lo up)")]
    LoDown,
    #[error("{0} is an IPv6 VIP but this kernel has no IPv6")]
    NoIpv6(Vip),
    #[error("{0} is an IPv6 VIP but IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6 = 1)")]
    Ipv6DisabledOnLo(Vip),
    #[error(
        "nothing to undo: no state for this network namespace and no --vip given \
         (give the VIPs to remove from lo)"
    )]
    NothingToUndo,
}

/// Whether the value in force, `max(all, dev)`, is safe for a DR master (see the module docs).
fn safe(knob: Knob, effective: i32) -> bool {
    match knob {
        Knob::ArpIgnore => matches!(effective, 1 | 2 | 8),
        Knob::ArpAnnounce => effective == 2,
        Knob::RpFilter => effective != 1,
    }
}

/// The value prepare-backend writes where one is needed: the mildest safe one. For rp_filter
/// that is loose mode, which still drops packets from sources with no route back at all.
fn fix(knob: Knob) -> i32 {
    match knob {
        Knob::ArpIgnore => 1,
        Knob::ArpAnnounce | Knob::RpFilter => 2,
    }
}

/// The settings to change so that the value in force is safe on every interface, now and for
/// interfaces created later.
///
/// `all` is fixed first, because it covers every interface with a usual value at once. For
/// arp_ignore and arp_announce `all` is always made safe (a host with `all=0` and every
/// interface at 1 today gets an unsafe interface tomorrow); for rp_filter only strict `all` is
/// changed, so filtering is never turned on where it was off. Then each interface, and
/// `default` (the start value of new interfaces), whose own value still makes the result
/// unsafe gets the fix too.
pub fn sysctl_actions(values: &Values) -> Vec<Action> {
    let mut actions = Vec::new();
    for knob in Knob::ALL {
        let all_key = SysctlKey::new("all", knob);
        let all = values.get(&all_key).copied().unwrap_or(0);
        let all_unsafe = match knob {
            Knob::ArpIgnore | Knob::ArpAnnounce => !safe(knob, all),
            Knob::RpFilter => all == 1,
        };
        let all = if all_unsafe {
            actions.push(Action::Set {
                key: all_key,
                from: all,
                to: fix(knob),
                why: Why::Needed(knob),
            });
            fix(knob)
        } else {
            all
        };
        let confs = values
            .iter()
            .filter(|(k, _)| k.knob == knob && k.conf != "all" && k.conf != LO)
            // `default` before the interfaces: writing it also fixes the interfaces that follow
            // it, and the executor sees that when it gets to them.
            .map(|(k, v)| (k.conf != "default", k, *v));
        let mut confs: Vec<_> = confs.collect();
        confs.sort();
        for (_, key, dev) in confs {
            if !safe(knob, all.max(dev)) {
                actions.push(Action::Set {
                    key: key.clone(),
                    from: dev,
                    to: fix(knob),
                    why: Why::Needed(knob),
                });
            }
        }
    }
    actions
}

/// prepare-backend: the settings first, then the VIPs, so that no VIP is on `lo` while the
/// host would still answer ARP for it.
pub fn plan_prepare(host: &HostState, vips: &[Vip], ledger: &Ledger) -> Result<Plan, PlanError> {
    if !host.lo_up {
        return Err(PlanError::LoDown);
    }
    for &vip in vips {
        if !vip.is_ipv4() {
            match host.ipv6_on_lo {
                Ipv6OnLo::Enabled => {}
                Ipv6OnLo::Disabled => return Err(PlanError::Ipv6DisabledOnLo(vip)),
                Ipv6OnLo::Unavailable => return Err(PlanError::NoIpv6(vip)),
            }
        }
        for a in host.vip_on(vip) {
            if a.ifname != LO {
                return Err(PlanError::VipOnInterface { vip, ifname: a.ifname.clone() });
            }
            if a.prefix_len != vip.prefix_len() {
                return Err(PlanError::VipOnLoWithPrefix { vip, prefix_len: a.prefix_len });
            }
        }
    }
    let mut ledger = ledger.clone();
    let mut notes = Vec::new();
    let mut actions = Vec::new();
    // The ARP and rp_filter settings concern IPv4 only.
    if vips.iter().any(|v| v.is_ipv4()) {
        actions = sysctl_actions(&host.sysctls);
        if actions.is_empty() {
            notes.push(Note::SysctlsAlreadyRight);
        }
        for a in &actions {
            if let Action::Set { key, from, to, .. } = a {
                ledger.record_sysctl(key, *from, *to);
            }
        }
    }
    for &vip in vips {
        if host.on_lo(vip) {
            notes.push(Note::VipAlreadyOnLo(vip));
            ledger.record_vip(vip, false);
        } else {
            actions.push(Action::AddVip(vip));
            ledger.record_vip(vip, true);
        }
    }
    Ok(Plan { notes, actions, ledger: Some(ledger) })
}

/// `--undo`: remove the VIPs prepare-backend added, then, once no prepared IPv4 VIP is left,
/// put back the settings it changed, where nobody changed them since. `vips` empty means every
/// VIP in the ledger. Without a ledger the VIPs given are removed from `lo`, and the settings
/// are left alone, since their earlier values are unknown.
pub fn plan_undo(
    host: &HostState,
    vips: &[Vip],
    ledger: Option<&Ledger>,
) -> Result<Plan, PlanError> {
    let targets: Vec<Vip> = match (vips.is_empty(), ledger) {
        (false, _) => vips.to_vec(),
        (true, Some(l)) => l.vips.iter().map(|r| r.vip).collect(),
        (true, None) => return Err(PlanError::NothingToUndo),
    };
    let mut notes = Vec::new();
    let mut actions = Vec::new();
    let mut kept_on_lo = Vec::new();
    for &vip in &targets {
        let ours = match ledger {
            None => true,
            Some(l) => match l.vip(vip) {
                Some(r) if r.added => true,
                Some(_) => {
                    notes.push(Note::VipWasThereBefore(vip));
                    false
                }
                None => {
                    notes.push(Note::VipNotPrepared(vip));
                    false
                }
            },
        };
        if ours && host.on_lo(vip) {
            actions.push(Action::RemoveVip(vip));
        } else if ours {
            notes.push(Note::VipNotOnLo(vip));
        } else if host.on_lo(vip) && vip.is_ipv4() {
            kept_on_lo.push(vip);
        }
    }
    let Some(ledger) = ledger else {
        let current = host
            .sysctls
            .iter()
            .filter(|(k, _)| k.conf == "all")
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        notes.push(Note::SysctlsUnknown(current));
        return Ok(Plan { notes, actions, ledger: None });
    };
    let mut left = ledger.clone();
    for &vip in &targets {
        left.forget_vip(vip);
    }
    let still_v4: Vec<Vip> = left.vips.iter().map(|r| r.vip).filter(|v| v.is_ipv4()).collect();
    if !still_v4.is_empty() {
        if !left.sysctls.is_empty() {
            notes.push(Note::SysctlsStillNeeded(still_v4));
        }
    } else {
        // Reverse order: interfaces before `default` before `all`, the opposite of prepare.
        let mut restored_arp = false;
        for r in ledger.sysctls.iter().rev() {
            match host.sysctls.get(&r.key) {
                None => notes.push(Note::InterfaceGone(r.key.clone())),
                Some(&now) if now == r.original => {}
                Some(&now) if now == r.set => {
                    restored_arp |= r.key.knob != Knob::RpFilter;
                    actions.push(Action::Set {
                        key: r.key.clone(),
                        from: now,
                        to: r.original,
                        why: Why::Restore,
                    });
                }
                Some(&now) => notes.push(Note::ChangedSince {
                    key: r.key.clone(),
                    set: r.set,
                    now,
                    original: r.original,
                }),
            }
        }
        left.sysctls.clear();
        if restored_arp && !kept_on_lo.is_empty() {
            notes.push(Note::ClaimedAgain(kept_on_lo));
        }
    }
    Ok(Plan { notes, actions, ledger: (!left.is_empty()).then_some(left) })
}

#[cfg(test)]
mod tests;
