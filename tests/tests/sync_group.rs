//! Flow sync in a group of three directors over a multicast group (`[sync] group`,
//! OPERATIONS.md "Many directors"): a change is sent once, to the group, and reaches every
//! director; a director that returns pulls the state from one peer; connections recorded by
//! one director carry on through each of the others in turn.
//!
//! keepalived moves the VIP here (three VRRP priorities), which is enough to send all traffic
//! through one director at a time and to kill it; the ECMP router tests do the same with a
//! router spreading flows.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec, TcpHold,
    continuity::{Traffic, TrafficSpec},
    echo_all,
    gateway::{Mode, ServiceSpec},
    keepalived::{Directors, SYNC_GROUP, SyncKey, VrrpSpec, director_configs, group_sync_section},
};

const PORT: u16 = 7000;
const FAILOVER_LIMIT: Duration = Duration::from_secs(10);
const FAILBACK_LIMIT: Duration = Duration::from_secs(15);
const SETTLE: Duration = Duration::from_secs(2);

fn vip(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.vip4().into(), PORT)
}

fn open_held(lab: &Lab, n: usize) -> Vec<TcpHold> {
    mim_lb_tests::in_netns(lab.client_ns(), || (0..n).map(|_| TcpHold::connect(vip(lab), Duration::from_secs(5)).unwrap()).collect())
        .unwrap()
}

fn sync_of(directors: &Directors, i: usize) -> mim_lb::status::SyncStatus {
    directors.gateway(i).status().unwrap().sync.expect("[sync] is configured")
}

/// Unicast state datagrams director `i` sent to its peers, all told (pull answers; in a group,
/// changes never go to a peer one by one).
fn unicast_sent(directors: &Directors, i: usize) -> u64 {
    sync_of(directors, i).peers.iter().map(|p| p.sent).sum()
}

fn kill(lab: &Lab, directors: &mut Directors, i: usize, next: usize) -> Instant {
    let killed = directors.kill(lab, i).unwrap();
    directors.wait_master(lab, next, FAILOVER_LIMIT).unwrap();
    eprintln!("director {next} holds the VIP alone {:?} after director {i} was killed", killed.elapsed());
    killed
}

/// A master is drained on every director, connections opened since (on the slots the drain
/// changed, recorded by the active director alone) are shared through the group, once each;
/// the active director dies and the next carries them; the first returns, pulls the state from
/// one peer only, and takes the VIP back; then it and the second die together, and the third,
/// which heard every record only from the group, carries them all.
#[test]
fn a_group_of_three_shares_each_change_once_and_each_director_carries_every_flow() {
    let mut lab = Lab::new(LabSpec { directors: 3, ipv6: false, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    let configs = director_configs(&lab, &[ServiceSpec::tcp(&lab, PORT)], "tcp_idle_timeout_s = 60", |i| group_sync_section(&lab, &key, i));
    let mut directors = Directors::start(&mut lab, Mode::Generic, &configs, VrrpSpec::default()).unwrap();
    directors.wait_synced(Duration::from_secs(20)).unwrap();
    for i in 0..3 {
        let s = sync_of(&directors, i);
        assert_eq!(s.group.as_deref(), Some(SYNC_GROUP), "status names the group");
        assert_eq!(s.peers.len(), 2);
    }
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    std::thread::sleep(SETTLE);

    // Drain master 0 on every director (an operator runs it on each).
    let service = format!("{}:{PORT}", lab.vip4());
    let drained = lab.master_addr4(0).to_string();
    for i in 0..3 {
        directors.gateway(i).ctl(&["drain", &service, &drained]).unwrap();
    }
    let unicast_before = unicast_sent(&directors, 0);
    let group_before = sync_of(&directors, 0).group_sent;
    let mut opened = open_held(&lab, 60);
    echo_all(&mut opened, "after the drain", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let a = sync_of(&directors, 0);
    assert!(a.group_sent > group_before, "the new records went to the group: {a:?}");
    assert_eq!(unicast_sent(&directors, 0), unicast_before, "and not to each peer: {a:?}");
    for i in 1..3 {
        let s = sync_of(&directors, i);
        let from_0 = s.peers.iter().find(|p| p.address == format!("{}:7946", lab.director_addr4(0))).unwrap();
        assert_eq!(from_0.missing, 0, "director {i} misses nothing of director 0's stream: {s:?}");
        assert_eq!(from_0.replayed + from_0.bad_auth + from_0.malformed, 0, "{s:?}");
    }

    let killed = kill(&lab, &mut directors, 0, 1);
    echo_all(&mut opened, "through director 1", Duration::from_secs(5));

    // Director 0 returns over its pins and pulls from one peer: the first ready one it lists.
    let revived = Instant::now();
    directors.revive(&mut lab, 0, &[]).unwrap();
    directors.wait_master(&lab, 0, FAILBACK_LIMIT).unwrap();
    let back = sync_of(&directors, 0);
    let pulls: Vec<&str> = back.peers.iter().map(|p| p.pull.as_str()).collect();
    assert_eq!(pulls, vec!["done", "from another peer"], "one pull, from director 1: {back:?}");
    echo_all(&mut opened, "after director 0's return", Duration::from_secs(5));

    // Directors 0 and 1 die together: director 2 never carried a packet of these connections.
    // From the moment director 0 is off the segment: a connection begun just before may
    // still have made it through.
    let both = directors.kill(&lab, 0).unwrap();
    kill(&lab, &mut directors, 1, 2);
    echo_all(&mut opened, "through director 2", Duration::from_secs(5));

    let report = traffic.finish_after(SETTLE);
    report.assert_survived_before("killing director 0", killed, revived);
    report.assert_survived_before("director 0's return", revived, both);
    report.assert_survived("killing directors 0 and 1", both);
    drop(directors);
    drop(key);
}

/// IPv6 directors on a link-local group (`[ff02::6d6c]:7947`, CONFIG.md's example) hear each
/// other over it. A director still in its first round of health checks (its table empty)
/// tells its peers it is not ready, so a peer that starts never chooses it to pull from;
/// once ready it says so.
#[test]
fn a_link_local_ipv6_group_works_and_a_starting_director_is_not_ready_to_its_peers() {
    use mim_lb_tests::gateway::{Gateway, lab_config};
    let mut lab = Lab::new(LabSpec { directors: 2, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    let addr6 = |i: usize| format!("[{}]:7946", lab.director_addr6(i).unwrap());
    let sync = |i: usize| {
        format!(
            "[sync]\nlisten = \"{}\"\npeers = [\"{}\"]\nkey_file = \"{}\"\ngroup = \"[ff02::6d6c]:7947\"\n",
            addr6(i),
            addr6(1 - i),
            key.0.display()
        )
    };
    // Director 1's first round of checks takes 30 checks 100 ms apart.
    let slow = ServiceSpec { health: "interval_ms = 100\ntimeout_ms = 100\nrise = 30\nfall = 2".into(), ..ServiceSpec::tcp(&lab, PORT) };
    let config0 = format!("{}\n{}", lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], ""), sync(0));
    let config1 = format!("{}\n{}", lab_config(&lab, &[slow], ""), sync(1));
    let d0 = Gateway::start_on(&mut lab, 0, &config0, Mode::Generic, &[]).unwrap();
    d0.wait_all_up().unwrap();
    let d1 = Gateway::start_on(&mut lab, 1, &config1, Mode::Generic, &[]).unwrap();
    let seen = d0
        .wait_until("director 1 heard on the IPv6 group", Duration::from_secs(10), |s| {
            s.sync.as_ref().is_some_and(|y| y.peers[0].state == "up")
        })
        .unwrap();
    let why = format!("{:#}", d1.ctl(&["ready"]).expect_err("director 1 is in its first round of checks"));
    assert!(why.contains("first health checks"), "{why}");
    assert!(!seen.sync.unwrap().peers[0].ready, "director 1 told its peer it was ready with an empty table");
    d0.wait_until("director 1 ready, as it tells its peer", Duration::from_secs(20), |s| {
        s.sync.as_ref().is_some_and(|y| y.peers[0].ready && y.peers[0].tables_agree == Some(true))
    })
    .unwrap();
    let s1 = d1.status().unwrap().sync.unwrap();
    assert_eq!(s1.group.as_deref(), Some("[ff02::6d6c]:7947"));
    assert_eq!(s1.peers[0].pull, "done", "{s1:?}");
    drop((d0, d1));
    drop(key);
}

/// A running director that receives a whole state it did not ask for (a repair: here, in the
/// each-peer mode, after a partition longer than the 2 s that counts a peer down) stays
/// ready: its `[announce]` route stays in the table throughout (`ip monitor route` sees no
/// deletion), so a routing daemon never withdraws it.
#[test]
fn a_repairing_whole_state_keeps_a_running_director_ready_and_announced() {
    use mim_lb_tests::keepalived::sync_section;
    let mut lab = Lab::new(LabSpec { directors: 2, ipv6: false, ..LabSpec::default() }).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let key = SyncKey::new(&lab).unwrap();
    let configs = director_configs(&lab, &[ServiceSpec::tcp(&lab, PORT)], "", |i| {
        format!("{}{}", sync_section(&lab, &key, i), mim_lb_tests::bird::announce_section(0))
    });
    let directors = Directors::start_daemons(&mut lab, Mode::Generic, &configs).unwrap();
    directors.wait_synced(Duration::from_secs(20)).unwrap();
    let d0 = directors.gateway(0);
    d0.wait_until("its VIP announced", Duration::from_secs(10), |s| s.announce.as_ref().is_some_and(|a| a.announcing)).unwrap();
    let mut monitor = std::process::Command::new("ip");
    monitor.args(["-4", "monitor", "route"]);
    let ns0 = lab.director_ns(0).to_owned();
    let monitor = lab.spawn_in(&ns0, &mut monitor).unwrap();

    // A partition of the sync traffic, both ways, until each counts the other down.
    let block = |verb: &str| {
        for i in 0..2 {
            let other = format!("{}/32", lab.director_addr4(1 - i));
            lab.run_in(lab.director_ns(i), "ip", &["route", verb, "blackhole", &other]).unwrap();
        }
    };
    block("add");
    d0.wait_until("its peer down", Duration::from_secs(10), |s| s.sync.as_ref().is_some_and(|y| y.peers[0].state == "down")).unwrap();
    let since = d0.proc().line_count();
    block("del");
    d0.proc().wait_for_line_since(since, "finished sending its state (own pull: false)", Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let vip = lab.vip4().to_string();
    let deleted: Vec<String> = monitor.lines().into_iter().filter(|l| l.starts_with("Deleted") && l.contains(&vip)).collect();
    assert!(deleted.is_empty(), "the VIP's route was withdrawn while a repair was settled: {deleted:?}");
    assert!(d0.status().unwrap().announce.unwrap().announcing);
    drop(directors);
    drop(key);
}
