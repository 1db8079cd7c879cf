//! The group mode (`[sync] group`): N engines and a simulated segment that carries a
//! datagram to the group to every other director, and may lose it on the way to some.

use super::tests::{key, record, web};
use super::*;

fn group() -> SocketAddr {
    "239.255.77.1:7947".parse().unwrap()
}

fn addr(i: usize) -> SocketAddr {
    format!("10.0.0.{}:7946", i + 2).parse().unwrap()
}

/// What one datagram was: to the group or to one director, from whom, of which kind.
#[derive(Debug, Clone)]
struct Sent {
    from: usize,
    to: Option<usize>,
    body: Body,
}

/// Whether a datagram reaches director `to`: (from, to, body) -> carried.
type Carry = Box<dyn FnMut(usize, usize, &Body) -> bool>;

struct Mesh {
    engines: Vec<Engine>,
    now: Instant,
    got: Vec<Vec<Inbound>>,
    sent: Vec<Sent>,
    carry: Carry,
    /// Directors that are down: they neither tick nor receive.
    down: Vec<bool>,
    ready: Vec<bool>,
    /// The state a director answers a pull with.
    state: Vec<WireRecord>,
}

impl Mesh {
    /// `n` directors in a group; those in `pulling` start with a pull.
    fn new(n: usize, pulling: &[usize]) -> Mesh {
        let now = Instant::now();
        let engines = (0..n)
            .map(|i| {
                let peers: Vec<SocketAddr> = (0..n).filter(|&j| j != i).map(addr).collect();
                Engine::new(key(), addr(i), &peers, 100 + i as u64, pulling.contains(&i), Duration::from_secs(3), now).with_group(group())
            })
            .collect();
        Mesh {
            engines,
            now,
            got: vec![Vec::new(); n],
            sent: Vec::new(),
            carry: Box::new(|_, _, _| true),
            down: vec![false; n],
            ready: (0..n).map(|i| !pulling.contains(&i)).collect(),
            state: Vec::new(),
        }
    }

    fn index(&self, a: SocketAddr) -> usize {
        (0..self.engines.len()).find(|&i| addr(i) == a).expect("a director's address")
    }

    /// Carries everything sent until quiet, then lets `step` pass; `rounds` times.
    fn run(&mut self, rounds: usize, step: Duration) {
        for _ in 0..rounds {
            for i in 0..self.engines.len() {
                if !self.down[i] {
                    let inbound = self.engines[i].tick(self.ready[i], &[(web(), [1; 8])], self.now);
                    self.take(i, inbound);
                }
            }
            self.deliver();
            self.now += step;
        }
    }

    fn take(&mut self, i: usize, inbound: Vec<Inbound>) {
        for item in inbound {
            if let Inbound::SendAll(to) = item {
                let state = self.state.clone();
                self.engines[i].answer_pull(to, state, Vec::new(), self.now);
            }
            self.got[i].push(item);
        }
    }

    fn deliver(&mut self) {
        for _ in 0..64 {
            let mut any = false;
            for from in 0..self.engines.len() {
                for (to, bytes) in self.engines[from].take_out() {
                    any = true;
                    if self.down[from] {
                        continue;
                    }
                    let targets: Vec<usize> = if to == group() {
                        (0..self.engines.len()).filter(|&j| j != from).collect()
                    } else {
                        vec![self.index(to)]
                    };
                    let body = wire::decode(&key(), to, &bytes).expect("our own datagrams decode").body;
                    self.sent.push(Sent { from, to: (to != group()).then(|| self.index(to)), body: body.clone() });
                    for j in targets {
                        if self.down[j] || !(self.carry)(from, j, &body) {
                            continue;
                        }
                        let inbound = if to == group() {
                            self.engines[j].receive_group(addr(from), &bytes, self.now)
                        } else {
                            self.engines[j].receive(addr(from), &bytes, self.now)
                        };
                        // What readiness reads (nobody is waited for) and what status shows
                        // (a peer still "pulling") agree after every datagram.
                        let e = &self.engines[j];
                        assert!(
                            !(e.pulling_from().is_empty() && e.peers().iter().any(|p| matches!(p.pull, PullState::Asking { .. }))),
                            "director {j} waits for nobody while a peer is still asked: {:?}",
                            e.peers().iter().map(|p| p.pull).collect::<Vec<_>>()
                        );
                        self.take(j, inbound);
                    }
                }
            }
            if !any {
                return;
            }
        }
    }

    fn records_at(&self, i: usize) -> Vec<WireRecord> {
        let mut r: Vec<WireRecord> =
            self.got[i].iter().filter_map(|x| if let Inbound::Records(r) = x { Some(r.clone()) } else { None }).flatten().collect();
        r.sort_by_key(|r| r.age_ms);
        r
    }

    fn queue(&mut self, i: usize, records: std::ops::Range<u32>) {
        for n in records {
            self.engines[i].queue_record(record(n), None, self.now);
        }
        self.engines[i].flush(self.now);
        self.deliver();
    }

    fn sent_by(&self, i: usize) -> Vec<&Sent> {
        self.sent.iter().filter(|s| s.from == i).collect()
    }
}

fn is_stream(b: &Body) -> bool {
    matches!(b, Body::Stream { .. })
}

#[test]
fn a_change_goes_to_the_group_once_and_reaches_every_director_unacknowledged() {
    for n in [3, 6] {
        let mut m = Mesh::new(n, &[]);
        m.run(2, Duration::from_millis(50));
        let before = m.sent.len();
        m.queue(0, 0..500);
        let datagrams = 500usize.div_ceil(wire::RECORDS_PER_DATAGRAM);
        let new = &m.sent[before..];
        assert_eq!(new.len(), datagrams, "{n} directors: one datagram per batch of changes, no acks, nothing per peer: {new:?}");
        assert!(new.iter().all(|s| s.from == 0 && s.to.is_none() && is_stream(&s.body)));
        for j in 1..n {
            assert_eq!(m.records_at(j), (0..500).map(record).collect::<Vec<_>>(), "director {j} of {n}");
        }
        // Heartbeats: one per director per period, whatever the group's size.
        m.run(1, HELLO_EVERY);
        let before = m.sent.len();
        m.run(4, HELLO_EVERY);
        let beacons = m.sent[before..].iter().filter(|s| matches!(s.body, Body::Beacon { .. })).count();
        assert_eq!(beacons, 4 * n);
        assert!(m.sent.iter().all(|s| !matches!(s.body, Body::Ack { .. } | Body::Nack { .. })), "nothing lost, nothing acknowledged");
    }
}

#[test]
fn a_change_lost_on_the_way_to_one_director_is_sent_again_to_it_alone() {
    let mut m = Mesh::new(3, &[]);
    m.run(2, Duration::from_millis(50));
    // The second datagram of changes from 0 never reaches 2; 1 gets everything.
    let mut streams_to_2 = 0;
    m.carry = Box::new(move |from, to, body| {
        if from == 0 && to == 2 && is_stream(body) {
            streams_to_2 += 1;
            return streams_to_2 != 2;
        }
        true
    });
    let total = 3 * wire::RECORDS_PER_DATAGRAM as u32;
    m.queue(0, 0..total);
    let all: Vec<WireRecord> = (0..total).map(record).collect();
    assert_eq!(m.records_at(1), all);
    assert_ne!(m.records_at(2), all);
    assert_eq!(m.engines[2].peers()[0].missing(), 1, "the gap is noticed when the next one arrives");
    m.run(3, Duration::from_millis(50));
    assert_eq!(m.records_at(2), all, "applied once, after a NACK");
    assert_eq!(m.records_at(1), all, "nothing twice at the director that had it");
    let resent: Vec<&Sent> = m.sent_by(0).into_iter().filter(|s| s.to.is_some() && is_stream(&s.body)).collect();
    assert_eq!(resent.len(), 1, "one datagram again, to 2 alone: {resent:?}");
    assert_eq!(resent[0].to, Some(2));
    let p = &m.engines[2].peers()[0];
    assert_eq!((p.counters.missed, p.missing(), p.counters.nacks), (1, 0, 1));
    assert_eq!(m.engines[0].peers()[1].counters.resent, 1);
}

#[test]
fn the_last_change_lost_is_noticed_from_the_next_beacon() {
    let mut m = Mesh::new(3, &[]);
    m.run(2, Duration::from_millis(50));
    m.carry = Box::new(|from, to, body| !(from == 1 && to == 0 && is_stream(body)));
    m.queue(1, 0..10);
    assert!(m.records_at(0).is_empty());
    m.carry = Box::new(|_, _, _| true);
    // The next beacon names the change; the NACK follows once it has had time to arrive
    // reordered.
    m.run(8, Duration::from_millis(50));
    assert_eq!(m.records_at(0), (0..10).map(record).collect::<Vec<_>>());
    assert_eq!(m.records_at(2), (0..10).map(record).collect::<Vec<_>>());
}

#[test]
fn a_change_no_longer_in_the_history_brings_the_whole_state_instead() {
    let mut m = Mesh::new(3, &[]);
    m.run(2, Duration::from_millis(50));
    m.state = (0..7).map(record).collect();
    // Director 2 hears nothing of 0's changes while 0 sends more than its history holds,
    // but stays up (beacons pass).
    m.carry = Box::new(|from, to, body| !(from == 0 && to == 2 && is_stream(body)));
    for _ in 0..(HISTORY + 10).div_ceil(BURST) + 1 {
        for _ in 0..BURST * wire::FORGETS_PER_DATAGRAM {
            m.engines[0].queue_forget(record(1).key, m.now);
        }
        m.engines[0].flush(m.now);
        m.run(1, BURST_EVERY);
    }
    assert!(m.engines[0].stream_next > HISTORY as u64 + 1, "{}", m.engines[0].stream_next);
    m.carry = Box::new(|_, _, _| true);
    m.run(80, Duration::from_millis(50));
    let whole = m.got[0].iter().filter(|i| **i == Inbound::SendAll(addr(2))).count();
    assert_eq!(whole, 1, "0 sends its whole state once, not again for every NACK of the same gap");
    assert!(m.got[2].contains(&Inbound::Pulled { from: addr(0), own_pull: false }));
    assert!(m.engines[2].peers()[0].missing() == 0);
}

#[test]
fn a_starting_director_pulls_from_one_ready_peer_and_needs_no_other() {
    let mut m = Mesh::new(4, &[3]);
    m.state = (0..300).map(record).collect();
    m.ready[0] = false;
    assert_eq!(m.engines[3].pulling_from().len(), 3, "none heard yet: waiting for all");
    m.run(12, Duration::from_millis(50));
    assert!(m.engines[3].pulled());
    let pulls: Vec<Option<usize>> = m.sent_by(3).into_iter().filter(|s| matches!(s.body, Body::Pull)).map(|s| s.to).collect();
    assert!(!pulls.is_empty() && pulls.iter().all(|t| *t == Some(1)), "only the first ready peer is asked: {pulls:?}");
    let states: Vec<PullState> = m.engines[3].peers().iter().map(|p| p.pull).collect();
    assert_eq!(states, vec![PullState::Elsewhere, PullState::Done, PullState::Elsewhere]);
    assert_eq!(m.records_at(3), m.state);
    // One whole state went out, from 1 alone.
    assert!(m.got[1].contains(&Inbound::SendAll(addr(3))));
    assert!(!m.got[0].iter().chain(&m.got[2]).any(|i| matches!(i, Inbound::SendAll(_))));
}

#[test]
fn a_pull_source_that_goes_down_before_answering_is_replaced() {
    let mut m = Mesh::new(3, &[2]);
    m.state = (0..50).map(record).collect();
    // 0 hears the pull but its answers never arrive; then it goes down.
    m.carry = Box::new(|from, to, body| !(from == 0 && to == 2 && matches!(body, Body::Records(_) | Body::PullEnd { .. })));
    m.run(4, Duration::from_millis(50));
    assert_eq!(m.engines[2].pulling_from(), vec![addr(0)]);
    m.down[0] = true;
    m.run(60, Duration::from_millis(50));
    assert!(m.engines[2].pulled());
    let states: Vec<PullState> = m.engines[2].peers().iter().map(|p| p.pull).collect();
    assert_eq!(states, vec![PullState::GaveUp, PullState::Done]);
    assert_eq!(m.records_at(2), m.state);
}

#[test]
fn a_whole_group_starting_at_once_pulls_from_peers_not_yet_ready() {
    let mut m = Mesh::new(3, &[0, 1, 2]);
    m.run(30, Duration::from_millis(50));
    assert!(m.engines.iter().all(|e| e.pulled()), "nobody waits for a ready peer forever");
}

#[test]
fn a_group_datagram_repeated_or_replayed_is_applied_once() {
    let mut m = Mesh::new(3, &[]);
    m.run(2, Duration::from_millis(50));
    m.engines[0].queue_record(record(1), None, m.now);
    m.engines[0].flush(m.now);
    let out = m.engines[0].take_out();
    assert_eq!(out.len(), 1);
    let (to, bytes) = &out[0];
    assert_eq!(*to, group());
    assert_eq!(m.engines[1].receive_group(addr(0), bytes, m.now), vec![Inbound::Records(vec![record(1)])]);
    assert_eq!(m.engines[1].receive_group(addr(0), bytes, m.now), vec![]);
    // Signed for the group: refused when sent to a director's own address, and from a
    // director that is not its sender.
    assert_eq!(m.engines[2].receive(addr(0), bytes, m.now), vec![]);
    assert_eq!(m.engines[2].peers()[0].counters.bad_auth, 1);
    // A stream number the sender resends under a new datagram number is still applied once.
    let again = wire::encode(
        &key(),
        group(),
        &Message { sender: 100, seq: 10_000, body: wire::decode(&key(), group(), bytes).unwrap().body },
    );
    assert_eq!(m.engines[1].receive_group(addr(0), &again, m.now), vec![]);
    assert_eq!(m.engines[2].receive_group(addr(0), &again, m.now), vec![Inbound::Records(vec![record(1)])]);
}

#[test]
fn a_restarted_peer_s_stream_is_followed_from_its_start() {
    let mut m = Mesh::new(3, &[]);
    m.run(2, Duration::from_millis(50));
    m.queue(0, 0..5);
    // 0 restarts (a new incarnation), and its first change after the restart is lost on the
    // way to 1: 1 must notice, though it never heard number 1 of the new stream.
    let peers: Vec<SocketAddr> = vec![addr(1), addr(2)];
    m.engines[0] = Engine::new(key(), addr(0), &peers, 500, false, Duration::from_secs(3), m.now).with_group(group());
    let mut first = true;
    m.carry = Box::new(move |from, to, body| {
        if from == 0 && to == 1 && is_stream(body) && first {
            first = false;
            return false;
        }
        true
    });
    m.run(1, Duration::from_millis(50));
    m.queue(0, 100..101);
    m.queue(0, 101..102);
    m.run(6, Duration::from_millis(50));
    let at_1: Vec<u32> = m.records_at(1).iter().map(|r| r.age_ms).collect();
    assert_eq!(at_1, vec![0, 1, 2, 3, 4, 100, 101]);
}

#[test]
fn config_order_picks_the_same_source_whatever_is_heard_first() {
    // Two ready peers: the first in the list is asked, so that a restart asks the same one.
    let mut m = Mesh::new(3, &[2]);
    m.run(6, Duration::from_millis(50));
    let pulls: Vec<Option<usize>> = m.sent_by(2).into_iter().filter(|s| matches!(s.body, Body::Pull)).map(|s| s.to).collect();
    assert!(pulls.iter().all(|t| *t == Some(0)), "{pulls:?}");
}

#[test]
fn a_flood_of_changes_keeps_the_queue_bounded_and_owes_every_peer_the_whole_state() {
    let mut m = Mesh::new(3, &[]);
    m.run(2, Duration::from_millis(50));
    // Ten times what the queue holds, faster than the pacing lets out.
    for _ in 0..10 * MAX_STREAM_QUEUE * wire::FORGETS_PER_DATAGRAM {
        m.engines[0].queue_forget(record(1).key, m.now);
    }
    m.engines[0].flush(m.now);
    assert!(m.engines[0].stream_queued() <= MAX_STREAM_QUEUE, "{}", m.engines[0].stream_queued());
    assert!(m.engines[0].counters.lost > 0);
    let inbound = m.engines[0].tick(true, &[], m.now);
    assert!(inbound.contains(&Inbound::SendAll(addr(1))) && inbound.contains(&Inbound::SendAll(addr(2))), "{inbound:?}");
}

#[test]
fn a_nack_cannot_make_the_sender_exceed_its_pacing() {
    let mut m = Mesh::new(2, &[]);
    m.run(2, Duration::from_millis(50));
    // 0 sends (paced) more than a burst, over several bursts, all delivered.
    for _ in 0..3 {
        m.queue(0, 0..(BURST * wire::RECORDS_PER_DATAGRAM) as u32);
        m.run(1, BURST_EVERY);
    }
    let high = m.engines[0].stream_next - 1;
    assert!(high as usize >= 2 * BURST);
    // A NACK for everything at once, in a fresh burst: at most a burst is sent again now.
    m.now += BURST_EVERY;
    let nack = wire::encode(&key(), addr(0), &Message { sender: 101, seq: 1 << 20, body: Body::Nack { ranges: vec![(1, high as u32)] } });
    m.engines[0].receive(addr(1), &nack, m.now);
    let resent = m.engines[0].take_out().len();
    assert!(resent > 0 && resent <= BURST, "{resent} datagrams sent again for one NACK");
}

#[test]
fn group_datagrams_are_not_refused_as_replays_after_a_burst_to_this_director_alone() {
    let mut m = Mesh::new(2, &[]);
    m.run(2, Duration::from_millis(50));
    m.engines[0].queue_record(record(1), None, m.now);
    m.engines[0].flush(m.now);
    let group_datagram = m.engines[0].take_out().pop().unwrap().1;
    // Meanwhile 0 numbered thousands of datagrams to 1 alone (a whole state), and one of
    // them is read first.
    let later = wire::encode(&key(), addr(1), &Message { sender: 100, seq: 50_000, body: Body::Pull });
    m.engines[1].receive(addr(0), &later, m.now);
    assert_eq!(m.engines[1].receive_group(addr(0), &group_datagram, m.now), vec![Inbound::Records(vec![record(1)])]);
}

#[test]
fn a_source_that_stays_up_but_never_answers_is_replaced_after_the_pull_limit() {
    let mut m = Mesh::new(3, &[2]);
    m.state = (0..20).map(record).collect();
    // 0 (asked first: first in the list and ready) hears the pulls but its answers never
    // arrive; its beacons do.
    m.carry = Box::new(|from, to, body| !(from == 0 && to == 2 && !matches!(body, Body::Beacon { .. })));
    m.run(20, Duration::from_millis(50));
    assert_eq!(m.engines[2].pulling_from(), vec![addr(0)]);
    m.run((PULL_LIMIT.as_secs() + 2) as usize, Duration::from_secs(1));
    m.run(20, Duration::from_millis(50));
    assert!(m.engines[2].pulled());
    let states: Vec<PullState> = m.engines[2].peers().iter().map(|p| p.pull).collect();
    assert_eq!(states, vec![PullState::GaveUp, PullState::Done], "the next live peer was asked");
    assert_eq!(m.records_at(2), m.state);
}

#[test]
fn a_gap_gone_from_the_history_brings_the_whole_state_once() {
    use std::{cell::Cell, rc::Rc};
    let mut m = Mesh::new(2, &[]);
    m.run(2, Duration::from_millis(50));
    // Phase 0: 0's changes do not reach 1. Phase 1: they do, but 1's NACKs do not reach 0,
    // while 0 sends more than its history holds. Phase 2: everything passes.
    let phase = Rc::new(Cell::new(0u8));
    let p = phase.clone();
    m.carry = Box::new(move |from, _, body| match p.get() {
        0 => !(from == 0 && is_stream(body)),
        1 => !(from == 1 && matches!(body, Body::Nack { .. })),
        _ => true,
    });
    m.queue(0, 0..(10 * wire::RECORDS_PER_DATAGRAM) as u32);
    phase.set(1);
    m.queue(0, 0..1);
    assert_eq!(m.engines[1].peers()[0].missing(), 10);
    while m.engines[0].stream_next as usize <= HISTORY + 20 {
        m.queue(0, 0..(BURST * wire::RECORDS_PER_DATAGRAM) as u32);
        m.run(1, BURST_EVERY);
    }
    phase.set(2);
    m.run(80, Duration::from_millis(50));
    let whole = m.got[0].iter().filter(|i| **i == Inbound::SendAll(addr(1))).count();
    assert_eq!(whole, 1, "one whole state repairs the gap; NACKs of it while it is on its way, or after, bring no more");
    assert_eq!(m.engines[1].peers()[0].missing(), 0);
}
