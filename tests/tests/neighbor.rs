//! The neighbour resolver against the real kernel: it runs inside the lab's gateway namespace
//! (on a current_thread runtime whose thread is in that namespace, so its netlink sockets read
//! and change that namespace's tables) and resolves the masters on the lab segment.
//!
//! Traffic goes only to the lab's own namespaces (ARP/ND and the resolver's probes on the lab
//! bridge); every wait is bounded; the lab is removed on drop, also when a test panics.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use mim_lb::neighbor::{
    NeighborError, NeighborEvent, NeighborResolver, RESYNC_INTERVAL, interface_mac,
};
use mim_lb_tests::netns::set_sysctls;
use mim_lb_tests::{Lab, LabSpec, in_netns, mac_to_string, run_in};
use tokio::sync::mpsc;

const IF: &str = "eth0";
/// Longest wait for expected events: resolving takes milliseconds, giving up about 3 s.
const WAIT: Duration = Duration::from_secs(5);

fn lab() -> Lab {
    Lab::new(LabSpec::default()).expect("building the lab")
}

/// Runs `f` to completion on a current_thread runtime on a thread inside `ns`.
fn block_on_in<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
{
    in_netns(ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        runtime.block_on(f())
    })
    .expect("entering the namespace")
}

/// Receives events until `done` holds for all received so far; panics after `limit`.
async fn events_until(
    rx: &mut mpsc::Receiver<NeighborEvent>,
    limit: Duration,
    done: impl Fn(&[NeighborEvent]) -> bool,
) -> Vec<NeighborEvent> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut events = Vec::new();
    while !done(&events) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!("the resolver closed its channel; events so far: {events:?}"),
            Err(_) => panic!("no complete answer within {limit:?}; events so far: {events:?}"),
        }
    }
    events
}

/// `n` events, within `limit`.
async fn events(
    rx: &mut mpsc::Receiver<NeighborEvent>,
    n: usize,
    limit: Duration,
) -> Vec<NeighborEvent> {
    events_until(rx, limit, |events| events.len() >= n).await
}

/// Whatever events arrive within `period`.
async fn events_during(
    rx: &mut mpsc::Receiver<NeighborEvent>,
    period: Duration,
) -> Vec<NeighborEvent> {
    let deadline = tokio::time::Instant::now() + period;
    let mut events = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        events.push(event);
    }
    events
}

/// The `Resolved` events by address; panics on anything else.
fn resolved(events: &[NeighborEvent]) -> BTreeMap<IpAddr, [u8; 6]> {
    events
        .iter()
        .map(|e| match e {
            NeighborEvent::Resolved { address, mac } => (*address, *mac),
            other => panic!("expected Resolved, got {other:?} (all: {events:?})"),
        })
        .collect()
}

/// `ip -d neigh show ADDR dev eth0` in `ns`, trimmed; empty if there is no entry.
fn neigh(ns: &str, address: IpAddr) -> String {
    let address = address.to_string();
    run_in(ns, "ip", &["-d", "neigh", "show", &address, "dev", IF])
        .expect("ip neigh show")
        .trim()
        .to_owned()
}

/// Polls `neigh` until `ok` holds for it; panics after `limit`.
async fn neigh_until(ns: &str, address: IpAddr, limit: Duration, ok: impl Fn(&str) -> bool) {
    let start = Instant::now();
    loop {
        let entry = neigh(ns, address);
        if ok(&entry) {
            return;
        }
        assert!(start.elapsed() < limit, "entry for {address} after {limit:?}: {entry:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Both addresses of master `i` with its MAC.
fn master(lab: &Lab, i: usize) -> [(IpAddr, [u8; 6]); 2] {
    let v6 = lab.master_addr6(i).expect("the lab has IPv6");
    [(lab.master_addr4(i).into(), lab.master_mac(i)), (v6.into(), lab.master_mac(i))]
}

/// An address on the lab segment that no host has.
fn nobody(lab: &Lab) -> [IpAddr; 2] {
    let [a, b, c, _] = lab.gateway_addr4().octets();
    let p = lab.prefix6().expect("the lab has IPv6").segments();
    [
        Ipv4Addr::new(a, b, c, 200).into(),
        Ipv6Addr::new(p[0], p[1], p[2], p[3], 0, 0, 0, 0x200).into(),
    ]
}

#[test]
fn interface_mac_is_read_over_netlink() {
    let lab = lab();
    let gateway_mac = lab.gateway_mac();
    block_on_in(lab.gateway_ns(), || async move {
        assert_eq!(interface_mac(IF).await.expect("eth0 of the gateway"), gateway_mac);

        let error = interface_mac("nosuch0").await.expect_err("no such interface");
        assert!(matches!(error, NeighborError::NoSuchInterface { .. }), "{error:?}");
        assert_eq!(error.to_string(), "interface nosuch0 does not exist");

        let (tx, _rx) = mpsc::channel(8);
        let error = NeighborResolver::start("nosuch0", tx).await.expect_err("no such interface");
        assert_eq!(error.to_string(), "interface nosuch0 does not exist");
    });
    // Each namespace has its own eth0; the answer comes from the caller's namespace.
    let master_mac = lab.master_mac(0);
    block_on_in(lab.master_ns(0), || async move {
        assert_eq!(interface_mac(IF).await.expect("eth0 of master 1"), master_mac);
    });
}

#[test]
fn resolves_every_master_v4_and_v6() {
    let lab = lab();
    let gw = lab.gateway_ns();
    let masters: Vec<(IpAddr, [u8; 6])> =
        (0..lab.master_count()).flat_map(|i| master(&lab, i)).collect();
    block_on_in(gw, || async {
        // Nothing on the gateway has talked to the masters: the resolver must get the kernel
        // to ask.
        for (address, _) in &masters {
            assert_eq!(neigh(gw, *address), "", "entry for {address} before the test");
        }
        let (tx, mut rx) = mpsc::channel(64);
        let resolver = NeighborResolver::start(IF, tx).await.expect("starting the resolver");
        let start = Instant::now();
        resolver.set_wanted(masters.iter().map(|(a, _)| *a).collect());
        let got = resolved(&events(&mut rx, masters.len(), WAIT).await);
        eprintln!("resolved {} addresses in {:?}", got.len(), start.elapsed());
        assert_eq!(got, masters.iter().copied().collect());

        // The kernel holds them as managed entries, which it keeps probing.
        for (address, mac) in &masters {
            let entry = neigh(gw, *address);
            eprintln!("{entry}");
            assert!(entry.contains(&mac_to_string(mac)) && entry.contains(" managed "), "{entry}");
        }

        // Nothing changed, so nothing more is said, also not after re-reading the table.
        let more = events_during(&mut rx, RESYNC_INTERVAL + Duration::from_secs(1)).await;
        assert_eq!(more, vec![]);
        resolver.shutdown().await;
    });
}

#[test]
fn an_address_nobody_has_is_reported_unresolved_once() {
    let lab = lab();
    let gw = lab.gateway_ns();
    let ghosts = nobody(&lab);
    block_on_in(gw, || async {
        let (tx, mut rx) = mpsc::channel(64);
        let resolver = NeighborResolver::start(IF, tx).await.expect("starting the resolver");
        let start = Instant::now();
        resolver.set_wanted(ghosts.into());
        let got = events(&mut rx, 2, WAIT).await;
        eprintln!("unresolved after {:?}: {got:?}", start.elapsed());
        let mut reported = BTreeSet::new();
        for event in &got {
            let NeighborEvent::Unresolved { address, reason } = event else {
                panic!("expected Unresolved, got {event:?}");
            };
            assert!(reason.contains(&address.to_string()) && reason.contains(IF), "{reason}");
            // The kernel was asked: it has an entry, still probing or given up.
            assert!(
                reason.ends_with("(neighbour entry INCOMPLETE)")
                    || reason.ends_with("(neighbour entry FAILED)"),
                "{reason}"
            );
            reported.insert(*address);
        }
        assert_eq!(reported, BTreeSet::from(ghosts));

        // The kernel keeps trying (managed entries are re-probed every few seconds), but the
        // episode was reported already.
        for ghost in ghosts {
            eprintln!("{}", neigh(gw, ghost));
        }
        let more = events_during(&mut rx, RESYNC_INTERVAL + Duration::from_secs(2)).await;
        assert_eq!(more, vec![]);

        resolver.shutdown().await;
        for ghost in ghosts {
            assert_eq!(neigh(gw, ghost), "", "entry for {ghost} after shutdown");
        }
    });
}

/// The MAC the master's eth0 gets in the MAC change tests: outside the lab's 02:6d:… range.
const NEW_MAC: [u8; 6] = [0x02, 0x6e, 0x00, 0x00, 0x00, 0x01];

#[test]
fn a_changed_mac_is_reported() {
    let lab = lab();
    let gw = lab.gateway_ns();
    let m = master(&lab, 0);
    let master_ns = lab.master_ns(0);
    block_on_in(gw, || async {
        let (tx, mut rx) = mpsc::channel(64);
        let resolver = NeighborResolver::start(IF, tx).await.expect("starting the resolver");
        resolver.set_wanted(m.iter().map(|(a, _)| *a).collect());
        assert_eq!(resolved(&events(&mut rx, 2, WAIT).await), m.into());

        // The master's NIC is replaced and the host announces its new MAC (gratuitous ARP,
        // unsolicited neighbour advertisement), as Linux does with arp_notify/ndisc_notify on
        // and as VRRP does when an address moves.
        set_sysctls(
            master_ns,
            &[("net.ipv4.conf.eth0.arp_notify", "1"), ("net.ipv6.conf.eth0.ndisc_notify", "1")],
        )
        .expect("sysctls on the master");
        let start = Instant::now();
        run_in(master_ns, "ip", &["link", "set", IF, "address", &mac_to_string(&NEW_MAC)])
            .expect("changing the master's MAC");
        let got = resolved(&events(&mut rx, 2, WAIT).await);
        eprintln!("new MAC reported after {:?}", start.elapsed());
        assert_eq!(got, m.iter().map(|(a, _)| (*a, NEW_MAC)).collect());
        resolver.shutdown().await;
    });
}

/// Without any announcement from the master, only the kernel's probing of the managed entry
/// can notice: once the entry ages (reachable time, 15-45 s by default), it is re-probed at
/// the old MAC, fails, and is resolved again by broadcast. The gateway namespace's neighbour
/// timers are shortened here (reachable time 1 s, first probe after 1 s, probes 200 ms apart),
/// so the same mechanism runs in seconds instead of up to a minute.
#[test]
fn a_changed_mac_is_noticed_by_probing_alone() {
    let lab = lab();
    let gw = lab.gateway_ns();
    let (address, mac) = master(&lab, 0)[0];
    let master_ns = lab.master_ns(0);
    for (key, value) in [("base_reachable_time_ms", "1000"), ("delay_first_probe_time", "1"), ("retrans_time_ms", "200")] {
        run_in(gw, "sysctl", &["-qw", &format!("net.ipv4.neigh.{IF}.{key}={value}")]).expect("shortening the neighbour timers");
    }
    block_on_in(gw, || async {
        let (tx, mut rx) = mpsc::channel(64);
        let resolver = NeighborResolver::start(IF, tx).await.expect("starting the resolver");
        resolver.set_wanted(BTreeSet::from([address]));
        assert_eq!(resolved(&events(&mut rx, 1, WAIT).await), BTreeMap::from([(address, mac)]));
        let start = Instant::now();
        run_in(master_ns, "ip", &["link", "set", IF, "address", &mac_to_string(&NEW_MAC)])
            .expect("changing the master's MAC");
        // The old MAC fails its probes first, which is reported, then the new one is found.
        let got = events_until(&mut rx, Duration::from_secs(30), |events| {
            events.iter().any(|e| matches!(e, NeighborEvent::Resolved { .. }))
        })
        .await;
        eprintln!("after {:?}: {got:?}", start.elapsed());
        assert_eq!(got.last(), Some(&NeighborEvent::Resolved { address, mac: NEW_MAC }));
        resolver.shutdown().await;
    });
}

#[test]
fn shutdown_removes_only_the_entries_it_made() {
    let lab = lab();
    let gw = lab.gateway_ns();
    let [(m1_v4, m1_mac), (m1_v6, _)] = master(&lab, 0);
    let [(m2_v4, m2_mac), _] = master(&lab, 1);
    let [(m3_v4, m3_mac), _] = master(&lab, 2);
    // Before the resolver: a static entry an operator made for master 2, and an entry the
    // kernel learned for master 3 when the gateway talked to it.
    let m2 = (m2_v4.to_string(), mac_to_string(&m2_mac));
    run_in(gw, "ip", &["neigh", "add", &m2.0, "lladdr", &m2.1, "nud", "permanent", "dev", IF])
        .expect("static entry");
    run_in(gw, "ping", &["-c", "1", "-W", "2", &m3_v4.to_string()]).expect("ping master 3");
    let learned = neigh(gw, m3_v4);
    assert!(learned.contains(&mac_to_string(&m3_mac)), "{learned}");

    block_on_in(gw, || async {
        let (tx, mut rx) = mpsc::channel(64);
        let resolver = NeighborResolver::start(IF, tx).await.expect("starting the resolver");
        let wanted = BTreeSet::from([m1_v4, m1_v6, m2_v4, m3_v4]);
        resolver.set_wanted(wanted.clone());
        let got = resolved(&events(&mut rx, 4, WAIT).await);
        let expected = [(m1_v4, m1_mac), (m1_v6, m1_mac), (m2_v4, m2_mac), (m3_v4, m3_mac)];
        assert_eq!(got, expected.into());

        // Master 1's entries were made managed; the static one was left alone; the learned
        // one was made managed too, so that the kernel keeps it fresh.
        for address in [m1_v4, m1_v6, m3_v4] {
            let entry = neigh(gw, address);
            assert!(entry.contains(" managed "), "{entry}");
        }
        let entry = neigh(gw, m2_v4);
        assert!(entry.contains("PERMANENT") && !entry.contains("managed"), "{entry}");

        // No longer wanted: the entry the resolver created goes at once.
        let mut fewer = wanted.clone();
        fewer.remove(&m1_v6);
        resolver.set_wanted(fewer);
        neigh_until(gw, m1_v6, Duration::from_secs(3), str::is_empty).await;

        resolver.shutdown().await;
    });

    assert_eq!(neigh(gw, m1_v4), "", "the resolver's own entry is gone");
    let entry = neigh(gw, m2_v4);
    assert!(entry.contains("PERMANENT") && entry.contains(&m2.1), "static entry: {entry}");
    let entry = neigh(gw, m3_v4);
    assert!(
        entry.contains(&mac_to_string(&m3_mac)) && !entry.contains("managed"),
        "learned entry is ordinary again: {entry}"
    );
}

/// The path for kernels without managed entries (before 5.16), forced: the resolver makes the
/// kernel resolve by sending it UDP datagrams.
#[test]
fn resolves_with_udp_nudges_without_managed_entries() {
    let lab = lab();
    let gw = lab.gateway_ns();
    let masters: Vec<(IpAddr, [u8; 6])> =
        (0..lab.master_count()).flat_map(|i| master(&lab, i)).collect();
    let ghosts = nobody(&lab);
    block_on_in(gw, || async {
        for (address, _) in &masters {
            assert_eq!(neigh(gw, *address), "", "entry for {address} before the test");
        }
        let (tx, mut rx) = mpsc::channel(64);
        let resolver =
            NeighborResolver::start_with_udp_nudges(IF, tx).await.expect("starting the resolver");
        let start = Instant::now();
        resolver.set_wanted(masters.iter().map(|(a, _)| *a).collect());
        let got = resolved(&events(&mut rx, masters.len(), WAIT).await);
        eprintln!("resolved {} addresses in {:?}", got.len(), start.elapsed());
        assert_eq!(got, masters.iter().copied().collect());
        for (address, _) in &masters {
            let entry = neigh(gw, *address);
            assert!(!entry.contains("managed"), "{entry}");
        }

        resolver.set_wanted(ghosts.into());
        let got = events(&mut rx, 2, WAIT).await;
        assert!(got.iter().all(|e| matches!(e, NeighborEvent::Unresolved { .. })), "{got:?}");
        resolver.shutdown().await;
    });
    // The entries are the kernel's own: the resolver created none, and removes none.
    for (address, mac) in &masters {
        let entry = neigh(gw, *address);
        assert!(entry.contains(&mac_to_string(mac)), "{entry}");
    }
}
