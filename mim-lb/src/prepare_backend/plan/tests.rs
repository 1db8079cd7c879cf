use super::*;
use crate::prepare_backend::state::{SysctlRecord, VipRecord};

fn vip(s: &str) -> Vip {
    s.parse().unwrap()
}

fn key(conf: &str, knob: Knob) -> SysctlKey {
    SysctlKey::new(conf, knob)
}

/// A host with `lo` and `eth0` and the given `(conf, knob, value)` sysctls over all-zero
/// defaults (a fresh kernel).
fn host(overrides: &[(&str, Knob, i32)]) -> HostState {
    let mut sysctls = Values::new();
    for conf in ["all", "default", "lo", "eth0"] {
        for knob in Knob::ALL {
            sysctls.insert(key(conf, knob), 0);
        }
    }
    for &(conf, knob, value) in overrides {
        sysctls.insert(key(conf, knob), value);
    }
    HostState {
        lo_up: true,
        ipv6_on_lo: Ipv6OnLo::Enabled,
        addresses: vec![
            addr(LO, "127.0.0.1", 8),
            addr(LO, "::1", 128),
            addr("eth0", "10.0.0.11", 24),
            addr("eth0", "fd00::11", 64),
        ],
        sysctls,
    }
}

fn addr(ifname: &str, ip: &str, prefix_len: u8) -> IfAddr {
    IfAddr { ifname: ifname.into(), ip: ip.parse().unwrap(), prefix_len }
}

fn lines(plan: &Plan) -> Vec<String> {
    plan.actions.iter().map(|a| a.to_string()).collect()
}

fn sets(values: &Values) -> Vec<(String, i32, i32)> {
    sysctl_actions(values)
        .into_iter()
        .map(|a| match a {
            Action::Set { key, from, to, .. } => (key.to_string(), from, to),
            other => panic!("not a sysctl action: {other}"),
        })
        .collect()
}

/// Applies a plan's changes to a host, as the kernel would (without `default` propagation).
fn apply(host: &mut HostState, plan: &Plan) {
    for a in &plan.actions {
        match a {
            Action::AddVip(v) => host.addresses.push(addr(LO, &v.ip().to_string(), v.prefix_len())),
            Action::RemoveVip(v) => host.addresses.retain(|x| !(x.ifname == LO && x.ip == v.ip())),
            Action::Set { key, to, .. } => {
                host.sysctls.insert(key.clone(), *to);
            }
        }
    }
}

#[test]
fn fresh_host_gets_settings_first_then_vips() {
    let h = host(&[]);
    let plan =
        plan_prepare(&h, &[vip("10.0.0.100"), vip("fd00::100")], &Ledger::default()).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "set net.ipv4.conf.all.arp_ignore 0 -> 1 (answer ARP only for addresses on the asking interface)",
            "set net.ipv4.conf.all.arp_announce 0 -> 2 (never use the VIP as the sender address of ARP requests)",
            "add 10.0.0.100/32 to lo",
            "add fd00::100/128 to lo",
        ]
    );
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    let ledger = plan.ledger.unwrap();
    assert_eq!(
        ledger.vips,
        vec![
            VipRecord { vip: vip("10.0.0.100"), added: true },
            VipRecord { vip: vip("fd00::100"), added: true },
        ]
    );
    assert_eq!(
        ledger.sysctls,
        vec![
            SysctlRecord { key: key("all", Knob::ArpIgnore), original: 0, set: 1 },
            SysctlRecord { key: key("all", Knob::ArpAnnounce), original: 0, set: 2 },
        ]
    );
}

#[test]
fn second_run_changes_nothing_and_keeps_the_ledger() {
    let mut h = host(&[]);
    let vips = [vip("10.0.0.100"), vip("fd00::100")];
    let first = plan_prepare(&h, &vips, &Ledger::default()).unwrap();
    apply(&mut h, &first);
    let ledger = first.ledger.unwrap();
    let second = plan_prepare(&h, &vips, &ledger).unwrap();
    assert!(second.actions.is_empty(), "{:?}", second.actions);
    assert_eq!(second.ledger.as_ref(), Some(&ledger));
    assert_eq!(
        second.notes,
        vec![
            Note::SysctlsAlreadyRight,
            Note::VipAlreadyOnLo(vips[0]),
            Note::VipAlreadyOnLo(vips[1])
        ]
    );
}

#[test]
fn ipv6_only_needs_no_ipv4_settings() {
    let plan = plan_prepare(&host(&[]), &[vip("fd00::100")], &Ledger::default()).unwrap();
    assert_eq!(lines(&plan), vec!["add fd00::100/128 to lo"]);
    assert!(plan.ledger.unwrap().sysctls.is_empty());
}

#[test]
fn arp_ignore_is_judged_by_the_value_in_force() {
    use Knob::ArpIgnore as I;
    let only = |h: HostState| -> Vec<(String, i32, i32)> {
        sets(&h.sysctls).into_iter().filter(|(k, ..)| k.contains("arp_ignore")).collect()
    };
    // all=1 covers eth0=0, and 2 and 8 are safe on their own.
    assert_eq!(only(host(&[("all", I, 1)])), vec![]);
    assert_eq!(only(host(&[("all", I, 2)])), vec![]);
    assert_eq!(only(host(&[("all", I, 8), ("eth0", I, 2)])), vec![]);
    // all=0 with every interface at 1 is safe today but not for the next interface: fix all.
    assert_eq!(
        only(host(&[("eth0", I, 1), ("default", I, 1)])),
        vec![("net.ipv4.conf.all.arp_ignore".into(), 0, 1)]
    );
    // eth0=3 wins over all=1 (max) and claims the VIP: eth0 itself must change.
    assert_eq!(
        only(host(&[("all", I, 1), ("eth0", I, 3)])),
        vec![("net.ipv4.conf.eth0.arp_ignore".into(), 3, 1)]
    );
    // all=3 is unsafe everywhere; lowering it is enough when the interfaces are at 0.
    assert_eq!(only(host(&[("all", I, 3)])), vec![("net.ipv4.conf.all.arp_ignore".into(), 3, 1)]);
    // default=5 would make every new interface claim the VIP; lo is never touched.
    assert_eq!(
        only(host(&[("default", I, 5), ("lo", I, 7)])),
        vec![
            ("net.ipv4.conf.all.arp_ignore".into(), 0, 1),
            ("net.ipv4.conf.default.arp_ignore".into(), 5, 1),
        ]
    );
    // Negative values lose against all's.
    assert_eq!(only(host(&[("all", I, 1), ("eth0", I, -4)])), vec![]);
    assert_eq!(only(host(&[("all", I, 9)])), vec![("net.ipv4.conf.all.arp_ignore".into(), 9, 1)]);
}

#[test]
fn arp_announce_must_be_exactly_two() {
    use Knob::ArpAnnounce as A;
    let only = |h: HostState| -> Vec<(String, i32, i32)> {
        sets(&h.sysctls).into_iter().filter(|(k, ..)| k.contains("arp_announce")).collect()
    };
    assert_eq!(only(host(&[("all", A, 2)])), vec![]);
    assert_eq!(only(host(&[("all", A, 1)])), vec![("net.ipv4.conf.all.arp_announce".into(), 1, 2)]);
    // Above 2 the kernel falls back to announcing any local address, the VIP included.
    assert_eq!(
        only(host(&[("all", A, 2), ("eth0", A, 3)])),
        vec![("net.ipv4.conf.eth0.arp_announce".into(), 3, 2)]
    );
}

#[test]
fn rp_filter_strict_becomes_loose_and_off_stays_off() {
    use Knob::RpFilter as R;
    let only = |h: HostState| -> Vec<(String, i32, i32)> {
        sets(&h.sysctls).into_iter().filter(|(k, ..)| k.contains("rp_filter")).collect()
    };
    assert_eq!(only(host(&[])), vec![]);
    assert_eq!(only(host(&[("all", R, 2), ("eth0", R, 1)])), vec![]);
    assert_eq!(
        only(host(&[("all", R, 1), ("eth0", R, 2)])),
        vec![("net.ipv4.conf.all.rp_filter".into(), 1, 2)]
    );
    // Strict on all only: all goes loose, which covers every interface at 0 or 1.
    assert_eq!(
        only(host(&[("all", R, 1), ("eth0", R, 1), ("default", R, 1), ("lo", R, 1)])),
        vec![("net.ipv4.conf.all.rp_filter".into(), 1, 2)]
    );
    // Strict on one interface with all=0: only that interface changes; filtering is not turned
    // on for interfaces where it is off.
    assert_eq!(
        only(host(&[("eth0", R, 1), ("default", R, 1)])),
        vec![
            ("net.ipv4.conf.default.rp_filter".into(), 1, 2),
            ("net.ipv4.conf.eth0.rp_filter".into(), 1, 2),
        ]
    );
}

#[test]
fn refuses_hosts_that_would_still_claim_the_vip_or_cannot_hold_it() {
    let v4 = vip("10.0.0.100");
    let mut on_eth0 = host(&[]);
    on_eth0.addresses.push(addr("eth0", "10.0.0.100", 24));
    let err = plan_prepare(&on_eth0, &[v4], &Ledger::default()).unwrap_err();
    assert_eq!(err, PlanError::VipOnInterface { vip: v4, ifname: "eth0".into() });
    assert!(err.to_string().contains("ip addr del 10.0.0.100/32 dev eth0"), "{err}");

    let mut wide = host(&[]);
    wide.addresses.push(addr(LO, "10.0.0.100", 24));
    let err = plan_prepare(&wide, &[v4], &Ledger::default()).unwrap_err();
    assert!(err.to_string().contains("ip addr del 10.0.0.100/24 dev lo"), "{err}");

    let mut down = host(&[]);
    down.lo_up = false;
    assert_eq!(plan_prepare(&down, &[v4], &Ledger::default()).unwrap_err(), PlanError::LoDown);

    let v6 = vip("fd00::100");
    let mut no_v6 = host(&[]);
    no_v6.ipv6_on_lo = Ipv6OnLo::Disabled;
    assert_eq!(
        plan_prepare(&no_v6, &[v6], &Ledger::default()).unwrap_err(),
        PlanError::Ipv6DisabledOnLo(v6)
    );
    no_v6.ipv6_on_lo = Ipv6OnLo::Unavailable;
    assert_eq!(
        plan_prepare(&no_v6, &[v4, v6], &Ledger::default()).unwrap_err(),
        PlanError::NoIpv6(v6)
    );
    // IPv4 alone is fine without IPv6.
    assert!(plan_prepare(&no_v6, &[v4], &Ledger::default()).is_ok());
}

#[test]
fn prepare_twice_then_undo_restores_the_first_originals() {
    let original = host(&[]);
    let mut h = original.clone();
    let vips = [vip("10.0.0.100"), vip("fd00::100")];
    let first = plan_prepare(&h, &vips, &Ledger::default()).unwrap();
    apply(&mut h, &first);
    // Someone sets arp_ignore back to 0 between runs; the second run fixes it again but the
    // ledger keeps the first original.
    h.sysctls.insert(key("all", Knob::ArpIgnore), 0);
    let second = plan_prepare(&h, &vips, first.ledger.as_ref().unwrap()).unwrap();
    assert_eq!(lines(&second).len(), 1);
    apply(&mut h, &second);
    let undo = plan_undo(&h, &[], second.ledger.as_ref()).unwrap();
    assert_eq!(
        lines(&undo),
        vec![
            "remove 10.0.0.100/32 from lo",
            "remove fd00::100/128 from lo",
            "set net.ipv4.conf.all.arp_announce 2 -> 0 (restore the value from before prepare-backend)",
            "set net.ipv4.conf.all.arp_ignore 1 -> 0 (restore the value from before prepare-backend)",
        ]
    );
    assert_eq!(undo.ledger, None);
    apply(&mut h, &undo);
    assert_eq!(h.sysctls, original.sysctls);
    assert_eq!(h.addresses, original.addresses);
}

#[test]
fn undo_keeps_settings_while_other_ipv4_vips_are_prepared() {
    let mut h = host(&[]);
    let (a, b, c) = (vip("10.0.0.100"), vip("10.0.0.101"), vip("fd00::100"));
    let first = plan_prepare(&h, &[a], &Ledger::default()).unwrap();
    apply(&mut h, &first);
    let second = plan_prepare(&h, &[b, c], first.ledger.as_ref().unwrap()).unwrap();
    assert_eq!(lines(&second), vec!["add 10.0.0.101/32 to lo", "add fd00::100/128 to lo"]);
    apply(&mut h, &second);
    let ledger = second.ledger.unwrap();

    let undo_a = plan_undo(&h, &[a], Some(&ledger)).unwrap();
    assert_eq!(lines(&undo_a), vec!["remove 10.0.0.100/32 from lo"]);
    assert_eq!(undo_a.notes, vec![Note::SysctlsStillNeeded(vec![b])]);
    apply(&mut h, &undo_a);
    let ledger = undo_a.ledger.unwrap();
    assert_eq!(ledger.sysctls.len(), 2);

    // With b gone only an IPv6 VIP is left, which needs none of the IPv4 settings.
    let undo_b = plan_undo(&h, &[b], Some(&ledger)).unwrap();
    assert_eq!(lines(&undo_b).len(), 3, "{:?}", lines(&undo_b));
    apply(&mut h, &undo_b);
    let ledger = undo_b.ledger.unwrap();
    assert_eq!(ledger.vips, vec![VipRecord { vip: c, added: true }]);
    assert!(ledger.sysctls.is_empty());
    assert_eq!(
        lines(&plan_undo(&h, &[], Some(&ledger)).unwrap()),
        vec!["remove fd00::100/128 from lo"]
    );
}

#[test]
fn undo_leaves_what_was_there_before_and_what_others_changed() {
    let v = vip("10.0.0.100");
    let mut h = host(&[]);
    h.addresses.push(addr(LO, "10.0.0.100", 32));
    let prep = plan_prepare(&h, &[v], &Ledger::default()).unwrap();
    assert_eq!(prep.notes, vec![Note::VipAlreadyOnLo(v)]);
    assert_eq!(prep.ledger.as_ref().unwrap().vips, vec![VipRecord { vip: v, added: false }]);
    apply(&mut h, &prep);
    // An operator sets arp_announce to 1 by hand after prepare-backend.
    h.sysctls.insert(key("all", Knob::ArpAnnounce), 1);
    let undo = plan_undo(&h, &[], prep.ledger.as_ref()).unwrap();
    assert_eq!(
        lines(&undo),
        vec![
            "set net.ipv4.conf.all.arp_ignore 1 -> 0 (restore the value from before prepare-backend)"
        ]
    );
    assert_eq!(
        undo.notes,
        vec![
            Note::VipWasThereBefore(v),
            Note::ChangedSince { key: key("all", Knob::ArpAnnounce), set: 2, now: 1, original: 0 },
            Note::ClaimedAgain(vec![v]),
        ]
    );
    assert_eq!(undo.ledger, None);
}

#[test]
fn undo_without_state_removes_the_vips_and_says_what_it_cannot_revert() {
    let mut h = host(&[("all", Knob::ArpIgnore, 1), ("all", Knob::ArpAnnounce, 2)]);
    h.addresses.push(addr(LO, "10.0.0.100", 32));
    let v = vip("10.0.0.100");
    let w = vip("fd00::100");
    let plan = plan_undo(&h, &[v, w], None).unwrap();
    assert_eq!(lines(&plan), vec!["remove 10.0.0.100/32 from lo"]);
    assert_eq!(plan.ledger, None);
    assert_eq!(plan.notes[0], Note::VipNotOnLo(w));
    let unknown = plan.notes[1].to_string();
    assert!(unknown.contains("are unknown"), "{unknown}");
    assert!(unknown.contains("\n  net.ipv4.conf.all.arp_ignore = 1"), "{unknown}");
    assert!(unknown.contains("\n  net.ipv4.conf.all.arp_announce = 2"), "{unknown}");
    assert_eq!(plan_undo(&h, &[], None).unwrap_err(), PlanError::NothingToUndo);
}

#[test]
fn undo_with_state_leaves_vips_it_does_not_know() {
    let mut h = host(&[]);
    let prep = plan_prepare(&h, &[vip("10.0.0.100")], &Ledger::default()).unwrap();
    apply(&mut h, &prep);
    h.addresses.push(addr(LO, "10.0.0.200", 32));
    let plan = plan_undo(&h, &[vip("10.0.0.200")], prep.ledger.as_ref()).unwrap();
    assert!(plan.actions.is_empty());
    assert_eq!(plan.notes[0], Note::VipNotPrepared(vip("10.0.0.200")));
    assert_eq!(plan.ledger, prep.ledger);
}

#[test]
fn undo_skips_interfaces_that_are_gone() {
    let mut h = host(&[("eth0", Knob::ArpIgnore, 3)]);
    let prep = plan_prepare(&h, &[vip("10.0.0.100")], &Ledger::default()).unwrap();
    apply(&mut h, &prep);
    for knob in Knob::ALL {
        h.sysctls.remove(&key("eth0", knob));
    }
    let undo = plan_undo(&h, &[], prep.ledger.as_ref()).unwrap();
    assert!(undo.notes.contains(&Note::InterfaceGone(key("eth0", Knob::ArpIgnore))));
    assert_eq!(
        undo.notes.last().unwrap().to_string(),
        "skip net.ipv4.conf.eth0.arp_ignore: the interface is gone"
    );
}
