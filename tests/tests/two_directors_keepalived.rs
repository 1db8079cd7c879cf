//! Two directors, each running the real daemon with the same services, and keepalived (real
//! VRRP) moving the VIP between them: when the active director dies, the other takes the VIP
//! and carries on, and no client connection breaks, neither the long-lived ones nor the new
//! ones once the VIP has moved. When the dead director returns, keepalived gives it the VIP
//! back (it has the higher priority, preempts, and its `mim-lb ready` track script passes),
//! again without breaking a connection. A partition between the directors (each believes
//! itself master) breaks none either.
//!
//! `dist/keepalived.conf`, the shipped example, does the same on the lab's directors.
//!
//! Without flow sync between the directors this holds because both tables are the same
//! function of the same config and the same masters' health (the `table_digest` both show), so
//! the surviving director sends every established flow where the dead one did.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec,
    continuity::{Traffic, TrafficReport, TrafficSpec},
    gateway::{Mode, ServiceSpec, mim_lb_binary},
    keepalived::{Directors, SyncKey, VrrpSpec, director_configs, sync_section, vip_holders},
};

const PORT: u16 = 7000;
/// VRRP with 200 ms adverts gives the VIP up for lost after about 0.65 s; this is that, the
/// gratuitous ARPs and a loaded machine's delays, with room to spare.
const FAILOVER_LIMIT: Duration = Duration::from_secs(10);
/// The returning director's track script runs once a second; then a master down interval.
const FAILBACK_LIMIT: Duration = Duration::from_secs(15);
/// How long the traffic runs before and after each event.
const SETTLE: Duration = Duration::from_secs(2);
/// How long a director whose daemon is not running is watched not taking the VIP: two runs of
/// its track script (one a second) and more than a master down interval.
const NOT_READY_WATCH: Duration = Duration::from_millis(2500);

fn vip(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.vip4().into(), PORT)
}

/// Three masters serving on [`PORT`], two directors with the same service, keepalived on both,
/// director 0 holding the VIP. IPv4 only: keepalived moves the IPv4 VIP.
fn two_directors() -> (Lab, Directors) {
    let mut lab = Lab::new(LabSpec { directors: 2, ipv6: false, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    // A short idle timeout, so that the marks the start leaves clear within seconds.
    let configs = director_configs(&lab, &[ServiceSpec::tcp(&lab, PORT)], "tcp_idle_timeout_s = 1", |_| String::new());
    let directors = Directors::start(&mut lab, Mode::Generic, &configs, VrrpSpec::default()).unwrap();
    // The premise of a hitless failover without flow sync: both tables decide alike, and
    // neither has a changed slot, whose unrecorded flows would go to a previous master.
    directors.wait_settled(Duration::from_secs(20)).unwrap();
    let digest = |i: usize| directors.gateway(i).status().unwrap().services[0].table_digest.clone();
    assert_eq!(digest(0), digest(1), "the two directors' tables differ");
    (lab, directors)
}

/// Packets director `i` forwarded for the service so far.
fn forwarded(directors: &Directors, i: usize) -> u64 {
    directors.gateway(i).status().unwrap().services.iter().map(|s| s.packets).sum()
}

/// The traffic ran cleanly before anything was broken: no connection that ended before `t`
/// failed. One still under way at `t` was exposed to what happened then (a SYN in flight
/// while the director's link was cut times out), as the ones started just after it are.
fn assert_clean_before(report: &TrafficReport, t: Instant) {
    let failed: Vec<_> = report.attempts.iter().filter(|a| a.ended < t && a.outcome.is_err()).collect();
    assert!(failed.is_empty(), "{} new connections failed before anything was broken: {:?}", failed.len(), failed[0].outcome);
    assert!(report.attempts.iter().any(|a| a.ended < t && a.outcome.is_ok()), "no connection worked before anything was broken");
}

/// Director `i` alone holds the VIP for the whole of `watch`.
fn assert_holder_stays(lab: &Lab, directors: &Directors, i: usize, watch: Duration) {
    let end = Instant::now() + watch;
    while Instant::now() < end {
        let holder = directors.holder(lab).unwrap();
        assert_eq!(holder, Some(i), "the VIP moved while director {i} should have kept it");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills director 0 (the active one) under traffic and waits until director 1 alone holds
/// the VIP: returns the moment of the kill (when director 0 was off the segment, its processes
/// killed a few milliseconds before).
fn kill_active(lab: &Lab, directors: &mut Directors) -> Instant {
    assert_eq!(directors.holder(lab).unwrap(), Some(0));
    let killed = directors.kill(lab, 0).unwrap();
    directors.wait_master(lab, 1, FAILOVER_LIMIT).unwrap();
    eprintln!("director 1 holds the VIP alone {:?} after the kill", killed.elapsed());
    killed
}

#[test]
fn killing_the_active_director_breaks_no_connection() {
    let (lab, mut directors) = two_directors();
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    std::thread::sleep(SETTLE);
    let before = forwarded(&directors, 1);

    let killed = kill_active(&lab, &mut directors);
    let report = traffic.finish_after(SETTLE);

    assert_clean_before(&report, killed);
    let first = report.assert_survived("killing the active director", killed);
    eprintln!("kill -9 of the active director to the first new connection answered: {first:?}");
    assert!(forwarded(&directors, 1) > before, "director 1 forwarded nothing: the traffic did not go through it");
}

#[test]
fn the_dead_director_returns_and_takes_the_vip_back_without_breaking_a_connection() {
    let (mut lab, mut directors) = two_directors();
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    std::thread::sleep(SETTLE);

    let killed = kill_active(&lab, &mut directors);
    std::thread::sleep(SETTLE);

    // Back on the segment with keepalived, but no daemon yet: its track script fails, and it
    // must not take the VIP, however high its priority.
    let revived = Instant::now();
    directors.reconnect(&lab, 0).unwrap();
    directors.restart_keepalived(&mut lab, 0).unwrap();
    assert_holder_stays(&lab, &directors, 1, NOT_READY_WATCH);
    directors.restart_daemon(&mut lab, 0, &[]).unwrap();
    let ready = Instant::now();
    directors.wait_master(&lab, 0, FAILBACK_LIMIT).unwrap();
    eprintln!("director 0 holds the VIP alone again {:?} after its daemon was serving", ready.elapsed());
    // It took the VIP back because its track script passed, which needs its daemon serving.
    assert!(directors.gateway(0).ctl(&["ready", "--quiet"]).is_ok());
    let back = forwarded(&directors, 0);
    let report = traffic.finish_after(SETTLE);

    assert_clean_before(&report, killed);
    report.assert_survived("killing the active director", killed);
    let first = report.assert_survived("the failback", revived);
    let (_, failed) = report.counts_after(revived);
    eprintln!(
        "failback: first new connection answered {first:?} after the return began; {failed} failed during it; \
         longest silence of a long-lived connection since {:?}",
        report.longest_held_gap_after(revived)
    );
    assert!(forwarded(&directors, 0) > back, "director 0 forwarded nothing after taking the VIP back");
}

/// The directors lose each other (a partition: each still reaches the client and the
/// masters): each believes itself master and holds the VIP, and the client follows the last
/// gratuitous ARP. Both tables decide alike, so whichever director a packet reaches sends it to
/// the same master: no connection breaks, none fails. When the partition heals, director A
/// (the higher priority) alone holds the VIP again, still without a failure.
#[test]
fn a_partition_between_the_directors_breaks_no_connection() {
    let (lab, directors) = two_directors();
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    std::thread::sleep(SETTLE);

    let cut = Instant::now();
    let b_before = forwarded(&directors, 1);
    lab.set_directors_partitioned(true).unwrap();
    wait_holders(&lab, &[0, 1], FAILOVER_LIMIT);
    eprintln!("both directors hold the VIP {:?} after the partition", cut.elapsed());
    std::thread::sleep(SETTLE);
    // The split is real: B's gratuitous ARPs moved the client to it.
    assert!(forwarded(&directors, 1) > b_before, "director B forwarded nothing while it claimed the VIP");

    let healed = Instant::now();
    lab.set_directors_partitioned(false).unwrap();
    directors.wait_master(&lab, 0, FAILOVER_LIMIT).unwrap();
    eprintln!("director 0 alone holds the VIP {:?} after the partition healed", healed.elapsed());
    let report = traffic.finish_after(SETTLE);

    assert_clean_before(&report, cut);
    for (what, t) in [("the partition", cut), ("the healing", healed)] {
        report.assert_survived(what, t);
        let (_, failed) = report.counts_after(t);
        assert_eq!(failed, 0, "{what}: new connections failed although a director held the VIP all along");
    }
}

/// Waits until exactly `holders` hold the VIP.
fn wait_holders(lab: &Lab, holders: &[usize], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = vip_holders(lab).unwrap();
        if now == holders {
            return;
        }
        assert!(Instant::now() < deadline, "the VIP is held by {now:?}, not {holders:?}, after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A master changes (drained on both directors), connections are opened after the change, and
/// then the active director dies. Without flow sync two kinds break (seen here before sync):
/// - one opened after the change on a slot the change moved is recorded only by the director
///   it went through: the other sends its packets to the slot's previous master, which resets
///   it;
/// - one from before the change to the drained master: the backup director sees none of its
///   packets, so it clears the slot's mark one idle timeout after the change (1 s here, 900 s
///   by default) and then sends them to the slot's new master.
///
/// With `[sync]`, both survive: records are shared, and so are the stamps that keep a mark.
#[test]
fn connections_opened_after_a_master_change_survive_the_active_directors_death() {
    let (mut lab, key) = lab_with_key();
    // Longer than the idle timeout passes between the drain and the kill: the backup, which
    // sees no packet, keeps the drain's marks only because the active director tells it that
    // flows still use them.
    let mut directors = synced_pair(&mut lab, &key, 3);
    let before = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    let drained = lab.master_addr4(0).to_string();
    for i in 0..2 {
        let said = directors.gateway(i).ctl(&["drain", &format!("{}:{PORT}", lab.vip4()), &drained]).unwrap();
        assert!(said.contains("-> draining"), "director {i}: {said}");
    }
    // New connections now go to masters 2 and 3, many of them on slots that were master 1's;
    // enough of them that some land there (a third of the slots moved).
    let spec = TrafficSpec { held_on: Some(vec![1, 2]), held_per_master: 8, ..TrafficSpec::new(vip(&lab)) };
    let after = Traffic::start(&lab, spec).unwrap();
    std::thread::sleep(Duration::from_secs(8));

    let killed = kill_active(&lab, &mut directors);
    std::thread::sleep(SETTLE);
    let after = after.finish();
    let before = before.finish();
    before.assert_survived("connections from before the drain, through the kill", killed);
    after.assert_survived("connections opened after the drain, through the kill", killed);
    drop(directors);
    drop(key);
}

/// `dist/keepalived.conf` made concrete for director `i` of `lab`: what its comments tell an
/// operator to change (the binary's and the socket's paths, the VIP, and on the second
/// director its name and priority), and nothing else.
fn shipped_keepalived_conf(lab: &Lab, directors: &Directors, i: usize) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/keepalived.conf")).unwrap();
    let mut conf = text
        .replace("/usr/local/bin/mim-lb", mim_lb_binary().to_str().unwrap())
        .replace("/run/mim-lb/control.sock", directors.gateway(i).socket().to_str().unwrap())
        .replace("10.0.0.100/32", &format!("{}/32", lab.vip4()));
    if i == 1 {
        for (a, b) in [("router_id mim-lb-a", "router_id mim-lb-b"), ("priority 150", "priority 100")] {
            assert!(conf.contains(a), "the example has no `{a}` to change");
            conf = conf.replace(a, b);
        }
    }
    conf
}

/// The shipped example works as its comments say: director A (priority 150) takes the VIP; when
/// its daemon stops, its `mim-lb ready` track script fails and B takes the VIP; when the daemon
/// is back, A takes it back (preempt). Connections go through whoever holds it.
#[test]
fn the_shipped_keepalived_example_moves_the_vip_with_the_daemon() {
    let mut lab = Lab::new(LabSpec { directors: 2, ipv6: false, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let configs = director_configs(&lab, &[ServiceSpec::tcp(&lab, PORT)], "", |_| String::new());
    let mut directors = Directors::start_daemons(&mut lab, Mode::Generic, &configs).unwrap();
    let texts: Vec<String> = (0..2).map(|i| shipped_keepalived_conf(&lab, &directors, i)).collect();
    directors.start_keepalived(&mut lab, &texts).unwrap();
    // advert_int 0.5: a master down interval of about 1.6 s after the first script run.
    directors.wait_master(&lab, 0, Duration::from_secs(15)).unwrap();
    lab.ask(vip(&lab), 10, Duration::from_secs(3));

    let stopped = Instant::now();
    directors.gateway_mut(0).stop().unwrap();
    directors.wait_master(&lab, 1, Duration::from_secs(15)).unwrap();
    eprintln!("the example: director B holds the VIP {:?} after A's daemon stopped", stopped.elapsed());
    let before = forwarded(&directors, 1);
    lab.ask(vip(&lab), 10, Duration::from_secs(3));
    assert!(forwarded(&directors, 1) > before, "director B holds the VIP but forwarded nothing");

    directors.restart_daemon(&mut lab, 0, &[]).unwrap();
    let ready = Instant::now();
    directors.wait_master(&lab, 0, Duration::from_secs(15)).unwrap();
    eprintln!("the example: director A holds the VIP again {:?} after its daemon was serving", ready.elapsed());
    let before = forwarded(&directors, 0);
    lab.ask(vip(&lab), 10, Duration::from_secs(3));
    assert!(forwarded(&directors, 0) > before, "director A holds the VIP again but forwarded nothing");
}

/// A lab of two directors and the group's sync key.
fn lab_with_key() -> (Lab, SyncKey) {
    lab_with_key_and(3)
}

/// [`lab_with_key`] with `masters` masters.
fn lab_with_key_and(masters: usize) -> (Lab, SyncKey) {
    let mut lab = Lab::new(LabSpec { directors: 2, masters, ipv6: false, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    (lab, key)
}

/// Both directors with `[sync]` naming each other, keepalived on both, director 0 holding the
/// VIP, and each seeing its peer up with the same tables.
fn synced_pair(lab: &mut Lab, key: &SyncKey, tcp_idle_s: u64) -> Directors {
    let services = [ServiceSpec::tcp(lab, PORT)];
    synced_pair_with(lab, key, tcp_idle_s, &services)
}

/// [`synced_pair`] with these services.
fn synced_pair_with(lab: &mut Lab, key: &SyncKey, tcp_idle_s: u64, services: &[ServiceSpec]) -> Directors {
    let configs = director_configs(lab, services, &format!("tcp_idle_timeout_s = {tcp_idle_s}"), |i| sync_section(lab, key, i));
    let directors = Directors::start(lab, Mode::Generic, &configs, VrrpSpec::default()).unwrap();
    directors.wait_master(lab, 0, FAILOVER_LIMIT).unwrap();
    for i in 0..2 {
        wait_peer_agrees(&directors, i);
    }
    directors
}

/// Waits until director `i` is ready and sees its peer up with the same tables.
fn wait_peer_agrees(directors: &Directors, i: usize) {
    directors
        .gateway(i)
        .wait_until("its peer up and its tables agreeing", Duration::from_secs(20), |s| {
            s.sync.as_ref().is_some_and(|y| y.ready && y.peers[0].state == "up" && y.peers[0].tables_agree == Some(true))
        })
        .unwrap();
}

/// Kills the active director; `opened` must still echo, and `traffic` must have lived
/// through it.
fn kill_and_check(lab: &Lab, directors: &mut Directors, opened: &mut [mim_lb_tests::TcpHold], traffic: Traffic, what: &str) {
    let killed = kill_active(lab, directors);
    mim_lb_tests::echo_all(opened, "after the kill", Duration::from_secs(5));
    let report = traffic.finish_after(SETTLE);
    report.assert_survived(what, killed);
}

/// Brings killed director 0 back (link, daemon, keepalived) and waits until it holds the VIP
/// again; returns when the return began.
fn fail_back(lab: &mut Lab, directors: &mut Directors) -> Instant {
    let revived = Instant::now();
    directors.reconnect(lab, 0).unwrap();
    directors.restart_daemon(lab, 0, &[]).unwrap();
    directors.restart_keepalived(lab, 0).unwrap();
    directors.wait_master(lab, 0, FAILBACK_LIMIT).unwrap();
    revived
}

/// Opens `n` connections to the VIP from the client, each answered by its master.
fn open_held(lab: &Lab, n: usize) -> Vec<mim_lb_tests::TcpHold> {
    mim_lb_tests::in_netns(lab.client_ns(), || {
        (0..n).map(|_| mim_lb_tests::TcpHold::connect(vip(lab), Duration::from_secs(5)).unwrap()).collect()
    })
    .unwrap()
}

/// Drains master 0 on both directors (as an operator does on every director of a group).
fn drain_master_0(lab: &Lab, directors: &Directors, on: &[usize]) {
    let service = format!("{}:{PORT}", lab.vip4());
    let drained = lab.master_addr4(0).to_string();
    for &i in on {
        directors.gateway(i).ctl(&["drain", &service, &drained]).unwrap();
    }
}

/// With flow sync: a master is drained on both directors, connections opened since on its
/// former slots are recorded by the active director only (the backup sees none of their
/// packets), and the active director is killed right after. The backup has their records
/// from its peer, so those connections carry on through it, as do all the others. Without
/// the sync, the backup sends them to the slot's previous master, which resets them.
#[test]
fn with_flow_sync_connections_opened_after_a_drain_survive_the_active_directors_death() {
    use mim_lb_tests::echo_all;
    let (mut lab, key) = lab_with_key();
    let mut directors = synced_pair(&mut lab, &key, 60);
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    std::thread::sleep(SETTLE);

    drain_master_0(&lab, &directors, &[0, 1]);
    let mut opened = open_held(&lab, 60);
    echo_all(&mut opened, "after the drain", Duration::from_secs(5));
    // The records reach the backup within milliseconds; the status says how long it took.
    let a = directors
        .gateway(0)
        .wait_until("a record acknowledged by the backup", Duration::from_secs(5), |s| {
            s.sync.as_ref().is_some_and(|y| y.peers[0].lag_ms_last.is_some())
        })
        .unwrap();
    let lag = a.sync.as_ref().unwrap().peers[0].lag_ms_last;
    eprintln!("flow sync lag (record on the active director to the backup's ack): {lag:?} ms");

    kill_and_check(&lab, &mut directors, &mut opened, traffic, "killing the active director right after a drain");
    drop(directors);
    drop(key);
}

/// With flow sync, the failback: the active director dies, connections are opened through the
/// backup on slots a drain changed (recorded there only), and the dead director returns over
/// its kept pins. It pulls the backup's state before `mim-lb ready` lets keepalived give it the
/// VIP back, so those connections carry on through it. Without the pull it would send them by
/// its own table, to the slot's previous master, which resets them.
#[test]
fn with_flow_sync_connections_made_while_a_director_was_dead_survive_its_return() {
    use mim_lb_tests::echo_all;
    let (mut lab, key) = lab_with_key();
    let mut directors = synced_pair(&mut lab, &key, 60);
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    drain_master_0(&lab, &directors, &[0, 1]);
    std::thread::sleep(SETTLE);
    let killed = kill_active(&lab, &mut directors);

    let mut opened = open_held(&lab, 60);
    echo_all(&mut opened, "through the backup", Duration::from_secs(5));
    std::thread::sleep(SETTLE);

    let revived = fail_back(&mut lab, &mut directors);
    let status = directors.gateway(0).status().unwrap();
    let sync = status.sync.as_ref().unwrap();
    assert_eq!(sync.peers[0].pull, "done", "{sync:?}");
    eprintln!("director 0 holds the VIP again {:?} after its return", revived.elapsed());

    echo_all(&mut opened, "after the failback", Duration::from_secs(5));
    let report = traffic.finish_after(SETTLE);
    report.assert_survived("killing the active director", killed);
    report.assert_survived("the failback", revived);
    drop(directors);
    drop(key);
}

/// Blocks (or unblocks) unicast between the two directors, both ways, while VRRP's multicast
/// still passes: a partition of the sync traffic alone, as on a dedicated sync link that
/// fails, with the directors still agreeing which of them is active.
fn set_sync_blocked(lab: &Lab, blocked: bool) {
    let verb = if blocked { "add" } else { "del" };
    for i in 0..2 {
        let other = format!("{}/32", lab.director_addr4(1 - i));
        lab.run_in(lab.director_ns(i), "ip", &["route", verb, "blackhole", &other]).unwrap();
    }
}

/// The FLOWS keys director `i` holds.
fn recorded_keys(directors: &Directors, i: usize) -> std::collections::HashSet<mim_lb_common::FlowKey> {
    let path = directors.gateway(i).pin_dir().join(mim_lb_common::maps::names::FLOWS);
    mim_lb::director::sweep::read_pinned_flows(&path).unwrap().into_iter().map(|(k, _)| k).collect()
}

/// The connection table's key of a client connection to the VIP.
fn flow_key(lab: &Lab, conn: &mim_lb_tests::TcpHold) -> mim_lb_common::FlowKey {
    let local = conn.local_addr().unwrap();
    let (src, family) = mim_lb::dataplane::service_index::addr_words(local.ip());
    let (dst, _) = mim_lb::dataplane::service_index::addr_words(lab.vip4().into());
    mim_lb_common::FlowKey { src, dst, sport: local.port().to_be(), dport: PORT.to_be(), proto: mim_lb_common::PROTO_TCP, family, _pad0: [0; 2] }
}

/// (d) The sync traffic between the directors is cut (VRRP still passes, so director A stays
/// active), a master is drained on both, connections are opened through A, and then A dies.
/// What is lost is exactly what OPERATIONS.md ("What can be lost") says: the connections A
/// recorded during the partition (on slots the drain changed), and nothing else; connections
/// from before the partition, and those on slots the drain left alone, carry on through B.
#[test]
fn a_sync_partition_then_a_failover_loses_exactly_the_flows_recorded_during_it() {
    use mim_lb_tests::echo_all;
    let (mut lab, key) = lab_with_key();
    let mut directors = synced_pair(&mut lab, &key, 60);
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    std::thread::sleep(SETTLE);

    set_sync_blocked(&lab, true);
    directors
        .gateway(0)
        .wait_until("its peer down", Duration::from_secs(10), |s| s.sync.as_ref().is_some_and(|y| y.peers[0].state == "down"))
        .unwrap();
    drain_master_0(&lab, &directors, &[0, 1]);
    let mut opened = open_held(&lab, 60);
    echo_all(&mut opened, "during the partition", Duration::from_secs(5));
    let on_a = recorded_keys(&directors, 0);
    let on_b = recorded_keys(&directors, 1);
    let recorded: Vec<bool> = opened.iter().map(|c| on_a.contains(&flow_key(&lab, c))).collect();
    assert!(recorded.iter().any(|r| *r) && recorded.iter().any(|r| !*r), "the drain should leave some connections recorded, some not: {recorded:?}");
    assert!(opened.iter().all(|c| !on_b.contains(&flow_key(&lab, c))), "a record crossed the partition");

    let killed = kill_active(&lab, &mut directors);
    let outcome: Vec<bool> = opened.iter_mut().enumerate().map(|(k, c)| c.echo(&format!("after the kill {k}"), Duration::from_secs(3)).is_ok()).collect();
    let lost: Vec<usize> = (0..opened.len()).filter(|&k| !outcome[k]).collect();
    let expected: Vec<usize> = (0..opened.len()).filter(|&k| recorded[k]).collect();
    assert_eq!(lost, expected, "lost connections (by index) are not exactly those recorded during the partition");
    let report = traffic.finish_after(SETTLE);
    report.assert_survived("the failover after a sync partition (connections from before it)", killed);
    set_sync_blocked(&lab, false);
    drop(directors);
    drop(key);
}

/// (b) The master group changes in every way at once, on both directors as an operator does it:
/// master 1 is drained, master 2's service dies, master 4 is added (a reload of a file that
/// lists it); as soon as both directors see the change alike (the same table digest), the
/// active director is killed. Every long-lived connection to a live master carries on through
/// the backup, and so does every connection opened after the change.
#[test]
fn a_drain_a_dead_master_and_an_added_one_then_the_active_directors_death_break_nothing() {
    use mim_lb_tests::echo_all;
    let (mut lab, key) = lab_with_key_and(4);
    let mut three = ServiceSpec::tcp(&lab, PORT);
    three.masters.truncate(3);
    let mut directors = synced_pair_with(&mut lab, &key, 60, &[three]);
    // Long-lived connections to master 1 (to be drained) and master 3 (left alone); master 2's
    // die with it.
    let spec = TrafficSpec { held_on: Some(vec![0, 2]), ..TrafficSpec::new(vip(&lab)) };
    let traffic = Traffic::start(&lab, spec).unwrap();
    std::thread::sleep(SETTLE);

    drain_master_0(&lab, &directors, &[0, 1]);
    lab.stop_servers(1, PORT);
    let four = director_configs(&lab, &[ServiceSpec::tcp(&lab, PORT)], "tcp_idle_timeout_s = 60", |i| sync_section(&lab, &key, i));
    for (i, config) in four.iter().enumerate() {
        directors.gateway(i).write_config(config).unwrap();
        directors.gateway(i).ctl(&["reload"]).unwrap();
    }
    let (dead, added) = (lab.master_addr4(1).into(), lab.master_addr4(3).into());
    let digests: Vec<String> = (0..2)
        .map(|i| {
            let s = directors
                .gateway(i)
                .wait_until("master 2 down and master 4 up", Duration::from_secs(15), |s| {
                    let state = |a: std::net::IpAddr| s.services[0].backends.iter().find(|b| b.address == a).map(|b| b.state.clone());
                    state(dead).as_deref() == Some("down") && state(added).as_deref() == Some("up")
                })
                .unwrap();
            s.services[0].table_digest.clone()
        })
        .collect();
    assert_eq!(digests[0], digests[1], "the two directors see the change differently");
    let mut opened = open_held(&lab, 60);
    echo_all(&mut opened, "after the change", Duration::from_secs(5));

    kill_and_check(&lab, &mut directors, &mut opened, traffic, "the change and the kill of the active director");
    drop(directors);
    drop(key);
}

/// UDP has no handshake: every flow is recorded, and shared. UDP flows begun through the active
/// director stay on their master through the backup after its death, also those whose slot a
/// drain gave to another master since (a director without the records would send their next
/// datagrams there).
#[test]
fn with_flow_sync_udp_flows_keep_their_master_through_the_backup() {
    const UDP_PORT: u16 = 7001;
    let mut lab = Lab::new(LabSpec { directors: 2, ipv6: false, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    lab.start_udp_servers(UDP_PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    // UDP masters are checked with TCP on the TCP port.
    let udp = ServiceSpec { name: "udp".into(), ..ServiceSpec::udp_checked_by_tcp(&lab, UDP_PORT, PORT) };
    let services = [ServiceSpec::tcp(&lab, PORT), udp];
    let mut directors = synced_pair_with(&mut lab, &key, 60, &services);
    let target = SocketAddr::new(lab.vip4().into(), UDP_PORT);
    let ports: Vec<u16> = (41000..41060).collect();
    let ask = |lab: &Lab| -> Vec<String> {
        mim_lb_tests::in_netns(lab.client_ns(), || {
            ports.iter().map(|p| mim_lb_tests::udp_ask(target, Some(*p), Duration::from_secs(2)).unwrap()).collect()
        })
        .unwrap()
    };
    let first = ask(&lab);
    let drained_name = lab.master_name(0);
    assert!(first.contains(&drained_name), "no flow on the master to be drained: {first:?}");
    let service = format!("{target}/udp");
    for i in 0..2 {
        directors.gateway(i).ctl(&["drain", &service, &lab.master_addr4(0).to_string()]).unwrap();
    }
    assert_eq!(ask(&lab), first, "the active director moved UDP flows on a drain");

    kill_active(&lab, &mut directors);
    assert_eq!(ask(&lab), first, "UDP flows moved with the failover");
    drop(directors);
    drop(key);
}

/// A director that comes back with no state at all (a reboot: no pins, the program gone)
/// while its peer holds the marks of a change: it applies its first health checks, then takes
/// the peer's marks (a table with its masters in it is what they fit), and only then says it
/// is ready. Long-lived connections begun before the change, recorded nowhere, stay on their
/// masters through the failback to it.
#[test]
fn a_director_rebooted_without_its_pins_takes_its_peer_s_marks_before_it_is_ready() {
    let (mut lab, key) = lab_with_key_and(4);
    // Checks as slow as the defaults: the peer's state arrives long before the first round
    // of checks is over.
    let slow = ServiceSpec { health: "interval_ms = 1000\ntimeout_ms = 500\nrise = 2\nfall = 2".into(), ..ServiceSpec::tcp(&lab, PORT) };
    let mut three = slow.clone();
    three.masters.truncate(3);
    let mut directors = synced_pair_with(&mut lab, &key, 60, &[three]);
    let spec = TrafficSpec { held_on: Some(vec![0, 1, 2]), held_per_master: 6, ..TrafficSpec::new(vip(&lab)) };
    let traffic = Traffic::start(&lab, spec).unwrap();
    std::thread::sleep(SETTLE);

    // A fourth master, by reload on both: a quarter of the slots move to it, and the
    // connections there stay on the masters they began on.
    let four = director_configs(&lab, &[slow], "tcp_idle_timeout_s = 60", |i| sync_section(&lab, &key, i));
    for (i, config) in four.iter().enumerate() {
        directors.gateway(i).write_config(config).unwrap();
        directors.gateway(i).ctl(&["reload"]).unwrap();
    }
    let added: std::net::IpAddr = lab.master_addr4(3).into();
    directors
        .wait_all("master 4 up", Duration::from_secs(15), |s| s.services[0].backends.iter().any(|b| b.address == added && b.state == "up"))
        .unwrap();
    directors.wait_synced(Duration::from_secs(15)).unwrap();
    let marked = directors.gateway(1).status().unwrap().services[0].changed_slots;
    assert!(marked > 0, "the added master marked no slot");

    let killed = kill_active(&lab, &mut directors);
    // The reboot: the program and the pins are gone.
    let config_path = directors.gateway(0).config_path();
    directors.gateway(0).ctl(&["detach", "--config", config_path.to_str().unwrap()]).unwrap();
    std::thread::sleep(SETTLE);

    let revived = fail_back(&mut lab, &mut directors);
    let a = directors.gateway(0).status().unwrap();
    assert_eq!(a.sync.as_ref().unwrap().peers[0].pull, "done");
    assert_eq!(a.services[0].changed_slots, marked, "the rebooted director holds other marks than its peer");
    std::thread::sleep(SETTLE);
    let report = traffic.finish();
    report.assert_survived("the death of the active director", killed);
    report.assert_survived("its return without state", revived);
    drop(directors);
    drop(key);
}
