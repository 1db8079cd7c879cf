use std::net::IpAddr;

use mim_lb_common::{FAMILY_V4, PROTO_TCP};

use super::*;
use crate::config::Protocol;

pub(super) fn key() -> Key {
    Key::new(b"a shared key of thirty-two bytes!").unwrap()
}

const A: &str = "10.0.0.2:7946";
const B: &str = "10.0.0.3:7946";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub(super) fn web() -> ServiceKey {
    ServiceKey { vip: "10.0.0.100".parse().unwrap(), port: 7000, protocol: Protocol::Tcp }
}

/// A TCP flow to 10.0.0.100:7000 from client `n`, on one of three masters.
pub(super) fn record(n: u32) -> WireRecord {
    let key = FlowKey {
        src: [u32::from_ne_bytes([10, 9, (n >> 8) as u8, n as u8]), 0, 0, 0],
        dst: [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0],
        sport: 40000u16.to_be(),
        dport: 7000u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad0: [0; 2],
    };
    WireRecord { key, backend: IpAddr::from([10, 0, 0, 11 + (n % 3) as u8]), age_ms: n }
}

/// Two engines and the wire between them, which may drop datagrams.
struct Pair {
    a: Engine,
    b: Engine,
    now: Instant,
    /// One datagram in `drop_every` is dropped, at random (0: none; 1: all).
    drop_every: usize,
    /// Drops apply only to datagrams from A to B.
    drop_to_b_only: bool,
    rng: fastrand::Rng,
    got_a: Vec<Inbound>,
    got_b: Vec<Inbound>,
}

impl Pair {
    fn new(b_pulls: bool) -> Pair {
        let now = Instant::now();
        Pair {
            a: Engine::new(key(), addr(A), &[addr(B)], 100, false, Duration::from_secs(3), now),
            b: Engine::new(key(), addr(B), &[addr(A)], 200, b_pulls, Duration::from_secs(3), now),
            now,
            drop_every: 0,
            drop_to_b_only: false,
            rng: fastrand::Rng::with_seed(7),
            got_a: Vec::new(),
            got_b: Vec::new(),
        }
    }

    /// Carries what both sent, then lets `step` pass; repeated `rounds` times. Answers pulls
    /// from A with `state`.
    fn run(&mut self, rounds: usize, step: Duration, state: &[WireRecord]) {
        for _ in 0..rounds {
            let mut inbound_a = self.a.tick(true, &[(web(), [1; 8])], self.now);
            let inbound_b = self.b.tick(false, &[(web(), [1; 8])], self.now);
            self.got_b.extend(inbound_b);
            for _ in 0..4 {
                for (to, bytes) in self.a.take_out() {
                    assert_eq!(to, addr(B));
                    if self.carry(true) {
                        self.got_b.extend(self.b.receive(addr(A), &bytes, self.now));
                    }
                }
                for (to, bytes) in self.b.take_out() {
                    assert_eq!(to, addr(A));
                    if self.carry(false) {
                        inbound_a.extend(self.a.receive(addr(B), &bytes, self.now));
                    }
                }
            }
            for i in inbound_a {
                if i == Inbound::SendAll(addr(B)) {
                    let marks = match state.first() {
                        Some(r) => vec![(web(), 65537, vec![WireMark { slot: 5, owner: Some(r.backend), prev: None }])],
                        None => Vec::new(),
                    };
                    self.a.answer_pull(addr(B), state.to_vec(), marks, self.now);
                }
                self.got_a.push(i);
            }
            self.now += step;
        }
    }

    fn carry(&mut self, to_b: bool) -> bool {
        (self.drop_to_b_only && !to_b)
            || self.drop_every == 0 || (self.drop_every > 1 && self.rng.usize(..self.drop_every) != 0)
    }

    fn records_at_b(&self) -> Vec<WireRecord> {
        self.got_b.iter().filter_map(|i| if let Inbound::Records(r) = i { Some(r.clone()) } else { None }).flatten().collect()
    }
}

#[test]
fn a_starting_director_pulls_the_whole_state_before_it_is_done() {
    let state: Vec<WireRecord> = (0..500).map(record).collect();
    let mut p = Pair::new(true);
    assert!(!p.b.pulled());
    assert_eq!(p.b.pulling_from(), vec![addr(A)]);
    p.run(20, Duration::from_millis(50), &state);
    assert!(p.b.pulled(), "{:?}", p.b.peers()[0].pull);
    assert_eq!(p.b.peers()[0].pull, PullState::Done);
    assert_eq!(p.records_at_b(), state, "every record once, in order");
    assert!(p.got_b.iter().any(|i| matches!(i, Inbound::Marks { marks, .. } if marks[0].slot == 5)));
    assert!(p.got_b.contains(&Inbound::Pulled { from: addr(A), own_pull: true }));
    assert_eq!(p.a.peers()[0].in_flight(), 0);
    assert!(p.b.peers()[0].ready, "hellos carry readiness");
    assert_eq!(p.b.peers()[0].digests.get(&web()), Some(&[1; 8]));
}

#[test]
fn lost_datagrams_are_sent_again_and_applied_once() {
    let state: Vec<WireRecord> = (0..300).map(record).collect();
    let mut p = Pair::new(true);
    p.drop_every = 3;
    p.run(80, Duration::from_millis(50), &state);
    assert!(p.b.pulled(), "{:?} {:?} {:?}", p.b.peers()[0].pull, p.a.peers()[0].counters, p.got_a);
    assert_eq!(p.records_at_b(), {
        // Order may change with resends; content may not, and nothing is applied twice.
        let mut got = p.records_at_b();
        got.sort_by_key(|r| r.age_ms);
        assert_eq!(got, state);
        p.records_at_b()
    });
    assert!(p.a.peers()[0].counters.resent > 0);
    assert_eq!(p.a.peers()[0].counters.lost, 0);
}

#[test]
fn new_records_reach_a_live_peer_with_their_lag_measured() {
    let mut p = Pair::new(false);
    p.run(2, Duration::from_millis(10), &[]);
    let happened = p.now - Duration::from_millis(3);
    for n in 0..50 {
        p.a.queue_record(record(n), Some(happened), p.now);
    }
    p.a.flush(p.now);
    p.run(2, Duration::from_millis(10), &[]);
    assert_eq!(p.records_at_b(), (0..50).map(record).collect::<Vec<_>>());
    let lag = p.a.peers()[0].lag_last.expect("acknowledged");
    assert!(lag >= Duration::from_millis(3), "{lag:?}");
}

#[test]
fn a_peer_that_never_answers_is_given_up_after_the_pull_timeout() {
    let now = Instant::now();
    let mut b = Engine::new(key(), addr(B), &[addr(A)], 200, true, Duration::from_secs(3), now);
    b.tick(false, &[], now);
    assert!(!b.pulled());
    b.tick(false, &[], now + Duration::from_secs(2));
    assert!(!b.pulled());
    b.tick(false, &[], now + Duration::from_secs(3));
    assert!(b.pulled());
    assert_eq!(b.peers()[0].pull, PullState::GaveUp);
    // Nothing but hellos and pulls went out: a down peer costs no state.
    assert!(b.take_out().len() < 40);
}

#[test]
fn strangers_wrong_keys_replays_and_old_incarnations_are_refused_and_counted() {
    let mut p = Pair::new(false);
    p.run(2, Duration::from_millis(10), &[]);
    let msg = |sender, seq| Message { sender, seq, body: Body::Records(vec![record(1)]) };
    let good = wire::encode(&key(), addr(B), &msg(100, 1000));
    assert_eq!(p.b.receive(addr("10.0.0.9:7946"), &good, p.now), vec![]);
    assert_eq!(p.b.counters.unknown_peer, 1);
    let forged = wire::encode(&Key::new(&[9u8; 32]).unwrap(), addr(B), &msg(100, 1001));
    assert_eq!(p.b.receive(addr(A), &forged, p.now), vec![]);
    assert_eq!(p.b.peers()[0].counters.bad_auth, 1);
    assert_eq!(p.b.receive(addr(A), &good, p.now), vec![Inbound::Records(vec![record(1)])]);
    assert_eq!(p.b.receive(addr(A), &good, p.now), vec![], "a replay is acknowledged, not applied");
    let old = wire::encode(&key(), addr(B), &msg(99, 5000));
    assert_eq!(p.b.receive(addr(A), &old, p.now), vec![]);
    assert_eq!(p.b.peers()[0].counters.replayed, 1);
    assert_eq!(p.b.receive(addr(A), &[1, 2, 3], p.now), vec![]);
    assert_eq!(p.b.peers()[0].counters.malformed, 1);
}

#[test]
fn a_peer_back_from_a_partition_is_sent_the_whole_state_again() {
    let mut p = Pair::new(false);
    p.run(4, Duration::from_millis(50), &[]);
    // A partition: nothing gets through for longer than DEAD_AFTER, while A records flows.
    p.drop_every = 1;
    for n in 0..5 {
        p.a.queue_record(record(n), None, p.now);
    }
    p.run(60, Duration::from_millis(50), &[]);
    assert!(p.records_at_b().is_empty());
    p.drop_every = 0;
    let state: Vec<WireRecord> = (0..5).map(record).collect();
    p.run(10, Duration::from_millis(50), &state);
    assert!(p.got_a.contains(&Inbound::SendAll(addr(B))), "{:?}", p.got_a);
    assert_eq!(p.records_at_b(), state);
}

#[test]
fn the_replay_window_accepts_reordering_and_refuses_repeats() {
    let mut peer = ReplayWindow::default();
    assert!(peer.fresh(5));
    assert!(peer.fresh(3));
    assert!(!peer.fresh(3));
    assert!(peer.fresh(2000));
    assert!(peer.fresh(1800), "within the window, out of order");
    assert!(!peer.fresh(1800));
    assert!(!peer.fresh(2000 - REPLAY_WINDOW), "too old");
}

#[test]
fn a_pull_answer_with_a_datagram_lost_for_good_is_given_again_never_ended() {
    let state: Vec<WireRecord> = (0..200).map(record).collect();
    let mut p = Pair::new(true);
    // B's pull reaches A, whose answer then meets a blackout long enough that every send of
    // its datagrams is lost (8 tries, 200 ms apart), though not long enough for A to count B
    // as down.
    p.run(1, Duration::from_millis(50), &state);
    p.drop_every = 1;
    p.drop_to_b_only = true;
    // Over by the time the answer's datagrams are given up (8 sends, 200 ms apart), not yet
    // when its end would be.
    p.run(48, Duration::from_millis(50), &state);
    assert!(p.a.peers()[0].counters.lost > 0);
    p.drop_every = 0;
    p.run(40, Duration::from_millis(50), &state);
    // Whenever B hears that the answer is complete, it has all of it.
    let end = p.got_b.iter().position(|i| matches!(i, Inbound::Pulled { .. })).expect("the answer ended");
    let mut got: Vec<WireRecord> =
        p.got_b[..end].iter().filter_map(|i| if let Inbound::Records(r) = i { Some(r.clone()) } else { None }).flatten().collect();
    got.sort_by_key(|r| r.age_ms);
    got.dedup();
    assert_eq!(got, state, "the answer ended with holes");
}

#[test]
fn a_peer_that_falls_too_far_behind_is_sent_the_whole_state_instead() {
    let mut p = Pair::new(false);
    p.run(2, Duration::from_millis(50), &[]);
    // B does not acknowledge fast enough (nothing is carried here), while A records more than a backlog
    // holds: memory stays bounded, and B is owed everything.
    let now = p.now;
    for n in 0..((MAX_BACKLOG + WINDOW + 10) * wire::RECORDS_PER_DATAGRAM) as u32 {
        p.a.queue_record(record(n % 1000), None, now);
    }
    p.a.flush(now);
    assert!(p.a.peers()[0].in_flight() <= MAX_BACKLOG + WINDOW);
    assert!(p.a.peers()[0].counters.lost > 0);
    let inbound = p.a.tick(true, &[], now);
    assert_eq!(inbound, vec![Inbound::SendAll(addr(B))]);
}

#[test]
fn a_whole_state_a_running_director_did_not_ask_for_gives_it_no_marks_to_take() {
    let mut p = Pair::new(false);
    p.run(2, Duration::from_millis(50), &[]);
    let marks = vec![(web(), 65537, vec![WireMark { slot: 5, owner: Some(record(0).backend), prev: None }])];
    p.a.answer_pull(addr(B), vec![record(1)], marks, p.now);
    p.run(3, Duration::from_millis(50), &[]);
    assert!(p.got_b.iter().any(|i| matches!(i, Inbound::Marks { own_pull: false, .. })), "{:?}", p.got_b);
    assert!(!p.got_b.iter().any(|i| matches!(i, Inbound::Marks { own_pull: true, .. })));
    assert!(p.got_b.contains(&Inbound::Pulled { from: addr(A), own_pull: false }));
}

#[test]
fn a_director_s_own_datagram_sent_back_to_it_is_refused() {
    let mut p = Pair::new(false);
    p.run(2, Duration::from_millis(50), &[]);

    let own = wire::encode(&key(), addr(B), &Message { sender: 200, seq: 99, body: Body::Records(vec![record(1)]) });
    assert_eq!(p.b.receive(addr(A), &own, p.now), vec![]);
    assert_eq!(p.b.peers()[0].counters.replayed, 1);
    // A sequence number at the end of the space neither panics nor blocks what follows.
    let last = wire::encode(&key(), addr(B), &Message { sender: 100, seq: u64::MAX, body: Body::Forget(vec![record(2).key]) });
    assert_eq!(p.b.receive(addr(A), &last, p.now), vec![Inbound::Forget(vec![record(2).key])]);
}
