//! The flow-sync protocol between directors, without sockets or maps: what to send, what to
//! send again, what a received datagram means. The daemon feeds it datagrams, events and
//! the clock, sends what it returns, and applies what it reports to its own tables.
//!
//! Two ways to send changes (records, forgets, seen slots, cleared marks):
//! - **to each peer** (no `[sync] group`): every change goes to every peer, is acknowledged
//!   by each, and is sent again until it is, a bounded number of times. Fine for two or three
//!   directors; the traffic grows with the square of their number.
//! - **to the group** (`[sync] group`, a multicast address on the directors' segment): every
//!   change is sent once, numbered in a stream of the sender's own. A receiver that sees a
//!   gap in the numbers (or a beacon naming a number it never got) asks the sender for just
//!   those (a NACK), and the sender sends them to it again from a bounded history. Nothing is
//!   acknowledged, so a change costs one datagram whatever the number of directors.
//!
//! Either way, a peer that missed changes for good (beyond the retries or the history) gets
//! the whole state, as a director that starts asks for it (a pull) from one peer: every
//! director holds the same shared state, so one answer is enough. Whole states are sent to
//! the one peer that needs them, acknowledged. Memory is bounded by a window of datagrams in
//! flight per peer, the snapshot of a pull answer being sent, and the group's history and
//! queue ([`HISTORY`], [`MAX_STREAM_QUEUE`]).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use mim_lb_common::FlowKey;

use super::wire::{self, Body, Key, Message, WireError, WireMark, WireRecord};
use crate::config::ServiceKey;

/// How often a hello goes to every peer.
pub const HELLO_EVERY: Duration = Duration::from_millis(250);
/// A peer not heard from for this long is down: nothing more is sent to it but hellos (and a
/// pull, while one is wanted).
pub const DEAD_AFTER: Duration = Duration::from_secs(2);
/// A datagram not acknowledged within this is sent again.
pub const RESEND_AFTER: Duration = Duration::from_millis(200);
/// Sends of one datagram before it counts as lost (the peer then gets the whole state again).
pub const MAX_TRIES: u32 = 8;
/// Datagrams in flight to one peer; more wait in its backlog. Small enough (about 90 KB) that
/// a burst fits the peer's socket buffer.
pub const WINDOW: usize = 64;
/// Datagrams waiting in a peer's backlog beyond a pull answer's snapshot before the oldest
/// are dropped (the peer then gets the whole state again).
pub const MAX_BACKLOG: usize = 8_192;
/// How long a starting director asks a peer that answers for its state before it gives up.
pub const PULL_LIMIT: Duration = Duration::from_secs(60);
/// Width of the replay window: a datagram more than this many behind the newest is refused.
const REPLAY_WINDOW: u64 = 1024;
/// Group changes kept for peers that missed them: about 5.6 MB at most.
pub const HISTORY: usize = 4096;
/// Group changes waiting for their burst, at most; beyond, the oldest is dropped and every
/// peer is owed the whole state (as a peer's backlog does to each peer).
pub const MAX_STREAM_QUEUE: usize = HISTORY;
/// Group changes sent per [`BURST_EVERY`]; more wait. Receivers' socket buffers take a
/// burst, and a refresh of a large table does not flood the segment.
pub const BURST: usize = 512;
pub const BURST_EVERY: Duration = Duration::from_millis(50);
/// A gap in a peer's stream is asked for after this (a datagram only reordered arrives first).
pub const NACK_AFTER: Duration = Duration::from_millis(20);
/// Stream numbers of one peer noted missing at once; beyond, its whole state is asked for.
pub const MAX_MISSING: usize = 4096;
/// Numbers one NACK makes the sender look up.
const NACK_ANSWER_MAX: u64 = 1024;
/// How long a starting director waits for a ready peer to pull from, once it has heard one
/// that is not ready (a whole group starting at once has none).
pub const PREFER_READY_FOR: Duration = Duration::from_millis(500);

/// What a received datagram (or the passing of time) asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Records(Vec<WireRecord>),
    Forget(Vec<FlowKey>),
    Seen { service: ServiceKey, table_size: u32, slots: Vec<(u32, u32)> },
    /// Part of a peer's whole state; `own_pull` while this director's own pull from it runs
    /// (only a starting director takes marks from a peer: a running one has its own history,
    /// and uses the list only to clear what it holds and the peer does not, if its own facts
    /// agree).
    Marks { from: SocketAddr, service: ServiceKey, table_size: u32, marks: Vec<WireMark>, own_pull: bool },
    Cleared { service: ServiceKey, table_size: u32, marks: Vec<WireMark> },
    /// Send this peer the whole state ([`Engine::answer_pull`]): it asked (it starts), or it
    /// missed datagrams for good.
    SendAll(SocketAddr),
    /// A peer's answer is complete; `own_pull` when this director asked for it (it starts).
    Pulled { from: SocketAddr, own_pull: bool },
}

/// Where this director's own pull from a peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullState {
    /// Not wanted (the daemon did not start with one).
    None,
    Asking { since: Instant },
    Done,
    /// Not heard from within the pull timeout (down), or no complete answer within
    /// [`PULL_LIMIT`], or went down while answering.
    GaveUp,
    /// Not needed: the state came from another peer (every director holds the same).
    Elsewhere,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub sent: u64,
    pub received: u64,
    pub resent: u64,
    /// Datagrams given up on after [`MAX_TRIES`] (or dropped from a full backlog).
    pub lost: u64,
    pub unknown_peer: u64,
    pub bad_auth: u64,
    pub malformed: u64,
    pub replayed: u64,
    /// Group changes from this peer noticed missing (a gap in its stream).
    pub missed: u64,
    /// NACKs sent to this peer.
    pub nacks: u64,
}

/// A number missing from a peer's stream.
#[derive(Debug, Clone, Copy)]
struct Missing {
    noticed: Instant,
    last_nack: Option<Instant>,
    nacks: u32,
}

struct Unacked {
    bytes: Vec<u8>,
    sent_at: Instant,
    tries: u32,
    /// When the oldest change it carries happened, to measure the lag.
    oldest: Option<Instant>,
    in_pull_answer: bool,
}

struct Waiting {
    body: Body,
    oldest: Option<Instant>,
    in_pull_answer: bool,
}

/// Which datagram numbers of a peer's incarnation were seen: the newest, and a window of
/// [`REPLAY_WINDOW`] behind it.
#[derive(Default)]
struct ReplayWindow {
    newest: u64,
    bits: u128,
    more: std::collections::BTreeSet<u64>,
}

impl ReplayWindow {
    /// Whether `seq` is new; remembers it.
    fn fresh(&mut self, seq: u64) -> bool {
        if seq > self.newest {
            let shift = seq - self.newest;
            self.bits = if shift >= 128 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.newest = seq;
            self.more.retain(|s| s.saturating_add(REPLAY_WINDOW) > seq);
            return true;
        }
        let behind = self.newest - seq;
        if behind >= REPLAY_WINDOW {
            return false;
        }
        if behind < 128 {
            let bit = 1u128 << behind;
            let new = self.bits & bit == 0;
            self.bits |= bit;
            new
        } else {
            self.more.insert(seq)
        }
    }
}

/// One peer, by address.
pub struct Peer {
    pub addr: SocketAddr,
    /// Its incarnation, once heard (0: never).
    incarnation: u64,
    /// Datagrams to this director's own address, and to the group: two windows, because the
    /// sender numbers both alike and the two sockets are read in turn (a burst on one must not
    /// push the other's datagrams out of the window).
    window: ReplayWindow,
    group_window: ReplayWindow,
    pub last_heard: Option<Instant>,
    pub ready: bool,
    pub digests: HashMap<ServiceKey, [u8; 8]>,
    unacked: BTreeMap<u64, Unacked>,
    backlog: VecDeque<Waiting>,
    /// Items of `backlog` that are changes, not parts of a whole-state answer.
    backlog_changes: usize,
    /// A pull answer being sent: its totals, sent with its end once all of it is acknowledged.
    answering: Option<(u64, u64)>,
    /// [`Inbound::SendAll`] was reported and not answered yet.
    answer_wanted: bool,
    pub pull: PullState,
    /// Lost datagrams since the last full state: send everything when it is heard from again.
    needs_all: bool,
    was_dead: bool,
    pub lag_last: Option<Duration>,
    pub lag_max: Option<Duration>,
    pub counters: Counters,
    /// The next number expected from its group stream (0: none heard from this incarnation
    /// since this director started; the first heard starts it, as the pull covers earlier).
    stream_expected: u64,
    missing: BTreeMap<u64, Missing>,
    /// Its changes were missed beyond repair: its whole state is asked for, since then.
    asking_all: Option<Instant>,
    /// When a pull (for a start or a repair) was last sent to it.
    last_pull_sent: Option<Instant>,
    /// When the whole state it is sending began to arrive (group mode: its first record or
    /// mark sent to this director alone).
    answer_since: Option<Instant>,
}

impl Peer {
    fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            incarnation: 0,
            window: ReplayWindow::default(),
            group_window: ReplayWindow::default(),
            last_heard: None,
            ready: false,
            digests: HashMap::new(),
            unacked: BTreeMap::new(),
            backlog: VecDeque::new(),
            backlog_changes: 0,
            answering: None,
            answer_wanted: false,
            pull: PullState::None,
            needs_all: false,
            was_dead: true,
            lag_last: None,
            lag_max: None,
            counters: Counters::default(),
            stream_expected: 0,
            missing: BTreeMap::new(),
            asking_all: None,
            last_pull_sent: None,
            answer_since: None,
        }
    }

    /// Group stream numbers of this peer noticed missing and not received yet.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// Notes that the peer has sent everything before `next`. Gaps are remembered, or, when
    /// too many, turned into a request for the whole state.
    fn stream_reaches(&mut self, next: u64, now: Instant) {
        if self.stream_expected == 0 {
            self.stream_expected = next;
            return;
        }
        if next <= self.stream_expected {
            return;
        }
        let gap = next - self.stream_expected;
        self.counters.missed += gap;
        if gap as usize + self.missing.len() > MAX_MISSING {
            self.missing.clear();
            self.asking_all.get_or_insert(now);
        } else {
            for n in self.stream_expected..next {
                self.missing.insert(n, Missing { noticed: now, last_nack: None, nacks: 0 });
            }
        }
        self.stream_expected = next;
    }

    /// Whether change `n` of the stream is new; remembers it.
    fn take_stream(&mut self, n: u64, now: Instant) -> bool {
        if n == 0 {
            return false;
        }
        if self.stream_expected == 0 || n >= self.stream_expected {
            self.stream_reaches(n, now);
            self.stream_expected = n + 1;
            return true;
        }
        self.missing.remove(&n).is_some()
    }

    pub fn alive(&self, now: Instant) -> bool {
        self.last_heard.is_some_and(|t| now.saturating_duration_since(t) < DEAD_AFTER)
    }

    /// Datagrams sent and not yet acknowledged, plus those waiting for room.
    pub fn in_flight(&self) -> usize {
        self.unacked.len() + self.backlog.len()
    }

    /// Whether `seq` of the current incarnation is new on its path; remembers it.
    fn fresh(&mut self, seq: u64, to_group: bool) -> bool {
        if to_group { self.group_window.fresh(seq) } else { self.window.fresh(seq) }
    }
}

/// The protocol state of this director.
pub struct Engine {
    key: Key,
    /// This director's sync address: the tag of every datagram for it covers it.
    me: SocketAddr,
    incarnation: u64,
    next_seq: u64,
    peers: Vec<Peer>,
    out: Vec<(SocketAddr, Vec<u8>)>,
    pending_records: Vec<WireRecord>,
    pending_oldest: Option<Instant>,
    pending_forgets: Vec<FlowKey>,
    last_hello: Option<Instant>,
    pull_timeout: Duration,
    started: Instant,
    /// The directors' multicast group, when changes go there.
    group: Option<SocketAddr>,
    /// The number of the next change sent to the group.
    stream_next: u64,
    /// The last changes sent to the group, as sent, by number.
    history: VecDeque<(u64, Vec<u8>)>,
    /// Group changes waiting for the next burst.
    stream_queue: VecDeque<Body>,
    /// Start of the current burst, and how many went in it.
    burst: (Option<Instant>, usize),
    /// The peer this director pulls from (an index into `peers`).
    pull_source: Option<usize>,
    /// When a peer was first heard from while pulling.
    first_heard: Option<Instant>,
    /// Datagrams from addresses that are not peers, and ones that fail before a peer is known.
    pub counters: Counters,
}

impl Engine {
    /// `incarnation` must grow from one start of the daemon to the next (the wall clock in
    /// ns does); `pull` asks a peer for its state first.
    pub fn new(key: Key, me: SocketAddr, peers: &[SocketAddr], incarnation: u64, pull: bool, pull_timeout: Duration, now: Instant) -> Engine {
        let mut peers: Vec<Peer> = peers.iter().map(|a| Peer::new(*a)).collect();
        if pull {
            peers.iter_mut().for_each(|p| p.pull = PullState::Asking { since: now });
        }
        Engine {
            key,
            me,
            incarnation,
            next_seq: 1,
            peers,
            out: Vec::new(),
            pending_records: Vec::new(),
            pending_oldest: None,
            pending_forgets: Vec::new(),
            last_hello: None,
            pull_timeout,
            started: now,
            group: None,
            stream_next: 1,
            history: VecDeque::new(),
            stream_queue: VecDeque::new(),
            burst: (None, 0),
            pull_source: None,
            first_heard: None,
            counters: Counters::default(),
        }
    }

    /// Sends changes to the multicast `group` instead of to each peer.
    pub fn with_group(mut self, group: SocketAddr) -> Engine {
        self.group = Some(group);
        self
    }

    pub fn group(&self) -> Option<SocketAddr> {
        self.group
    }

    /// Begins this director's pull (from one peer, chosen when heard from).
    pub fn start_pull(&mut self, now: Instant) {
        for p in self.peers.iter_mut().filter(|p| p.pull == PullState::None) {
            p.pull = PullState::Asking { since: now };
        }
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// Whether this director's pull is over (every peer answered, or was given up on).
    pub fn pulled(&self) -> bool {
        self.peers.iter().all(|p| !matches!(p.pull, PullState::Asking { .. }))
    }

    /// The peer being pulled from, or while none is chosen, those waited for.
    pub fn pulling_from(&self) -> Vec<SocketAddr> {
        if let Some(i) = self.pull_source
            && matches!(self.peers[i].pull, PullState::Asking { .. })
        {
            return vec![self.peers[i].addr];
        }
        self.peers.iter().filter(|p| matches!(p.pull, PullState::Asking { .. })).map(|p| p.addr).collect()
    }

    /// Datagrams to send now; the daemon sends them in order.
    pub fn take_out(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.out)
    }

    /// A flow recorded (or refreshed) here; sent with the next [`Engine::flush`] or when a
    /// datagram's worth is queued. `happened` is when the data path recorded it.
    pub fn queue_record(&mut self, record: WireRecord, happened: Option<Instant>, now: Instant) {
        self.pending_oldest = match (self.pending_oldest, happened) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.pending_records.push(record);
        if self.pending_records.len() >= wire::RECORDS_PER_DATAGRAM {
            self.flush_records(now);
        }
    }

    /// A record deleted here.
    pub fn queue_forget(&mut self, key: FlowKey, now: Instant) {
        self.pending_forgets.push(key);
        if self.pending_forgets.len() >= wire::FORGETS_PER_DATAGRAM {
            self.flush_forgets(now);
        }
    }

    /// Whether changes are queued, waiting for [`Engine::flush`].
    pub fn has_queued(&self) -> bool {
        !self.pending_records.is_empty() || !self.pending_forgets.is_empty()
    }

    /// Sends what is queued.
    pub fn flush(&mut self, now: Instant) {
        self.flush_records(now);
        self.flush_forgets(now);
    }

    fn flush_records(&mut self, now: Instant) {
        if self.pending_records.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.pending_records);
        let oldest = self.pending_oldest.take();
        self.broadcast(Body::Records(records), oldest, now);
    }

    fn flush_forgets(&mut self, now: Instant) {
        if !self.pending_forgets.is_empty() {
            let keys = std::mem::take(&mut self.pending_forgets);
            self.broadcast(Body::Forget(keys), None, now);
        }
    }

    /// Slots where unrecorded flows went to their previous master, to every live peer.
    pub fn send_seen(&mut self, service: ServiceKey, table_size: u32, slots: Vec<(u32, u32)>, now: Instant) {
        for chunk in slots.chunks(wire::SEEN_PER_DATAGRAM) {
            self.broadcast(Body::Seen { service, table_size, slots: chunk.to_vec() }, None, now);
        }
    }

    /// Marks this director's sweep cleared, to every live peer.
    pub fn send_cleared(&mut self, service: ServiceKey, table_size: u32, marks: Vec<WireMark>, now: Instant) {
        for chunk in wire::mark_chunks(&marks) {
            self.broadcast(Body::Cleared { service, table_size, marks: chunk }, None, now);
        }
    }

    /// The whole state for `to`, after [`Inbound::SendAll`]: records, then each service's
    /// marked slots, then (once all of it is acknowledged) the end of the answer.
    pub fn answer_pull(&mut self, to: SocketAddr, records: Vec<WireRecord>, marks: Vec<(ServiceKey, u32, Vec<WireMark>)>, now: Instant) {
        let Some(i) = self.peers.iter().position(|p| p.addr == to) else { return };
        let totals = (records.len() as u64, marks.iter().map(|m| m.2.len() as u64).sum());
        let peer = &mut self.peers[i];
        peer.needs_all = false;
        peer.answer_wanted = false;
        for chunk in records.chunks(wire::RECORDS_PER_DATAGRAM) {
            peer.backlog.push_back(Waiting { body: Body::Records(chunk.to_vec()), oldest: None, in_pull_answer: true });
        }
        for (service, table_size, marks) in marks {
            for chunk in wire::mark_chunks(&marks) {
                peer.backlog.push_back(Waiting {
                    body: Body::Marks { service, table_size, marks: chunk },
                    oldest: None,
                    in_pull_answer: true,
                });
            }
        }
        peer.answering = Some(totals);
        self.pump(i, now);
    }

    fn broadcast(&mut self, body: Body, oldest: Option<Instant>, now: Instant) {
        if self.group.is_some() {
            self.stream_queue.push_back(body);
            if self.stream_queue.len() > MAX_STREAM_QUEUE {
                self.stream_queue.pop_front();
                self.counters.lost += 1;
                for p in self.peers.iter_mut() {
                    p.needs_all = true;
                }
            }
            self.pump_stream(now);
            return;
        }
        for i in 0..self.peers.len() {
            if !self.peers[i].alive(now) {
                // It gets everything when it is back.
                self.peers[i].needs_all = true;
                continue;
            }
            let peer = &mut self.peers[i];
            peer.backlog.push_back(Waiting { body: body.clone(), oldest, in_pull_answer: false });
            peer.backlog_changes += 1;
            if peer.backlog_changes > MAX_BACKLOG {
                // The oldest change goes, never a part of a whole-state answer (an answer
                // with a hole must not end as if complete); the peer is owed everything.
                if let Some(at) = peer.backlog.iter().position(|w| !w.in_pull_answer) {
                    peer.backlog.remove(at);
                    peer.backlog_changes -= 1;
                }
                peer.counters.lost += 1;
                peer.needs_all = true;
            }
            self.pump(i, now);
        }
    }

    /// Moves datagrams from a peer's backlog onto the wire while its window has room, and
    /// ends a pull answer once all of it is acknowledged.
    fn pump(&mut self, i: usize, now: Instant) {
        while self.peers[i].unacked.len() < WINDOW {
            let Some(w) = self.peers[i].backlog.pop_front() else { break };
            if !w.in_pull_answer {
                self.peers[i].backlog_changes -= 1;
            }
            let seq = self.seq();
            let to = self.peers[i].addr;
            let bytes = wire::encode(&self.key, to, &Message { sender: self.incarnation, seq, body: w.body });
            let peer = &mut self.peers[i];
            self.out.push((peer.addr, bytes.clone()));
            peer.counters.sent += 1;
            peer.unacked.insert(seq, Unacked { bytes, sent_at: now, tries: 1, oldest: w.oldest, in_pull_answer: w.in_pull_answer });
        }
        let peer = &self.peers[i];
        let answer_sent = peer.answering.is_some()
            && !peer.backlog.iter().any(|w| w.in_pull_answer)
            && !peer.unacked.values().any(|u| u.in_pull_answer);
        if answer_sent {
            let (records, marked_slots) = self.peers[i].answering.take().expect("checked");
            self.peers[i].backlog.push_front(Waiting { body: Body::PullEnd { records, marked_slots }, oldest: None, in_pull_answer: false });
            self.peers[i].backlog_changes += 1;
            self.pump(i, now);
        }
    }

    /// Sends queued group changes, up to [`BURST`] per [`BURST_EVERY`].
    fn new_burst_if_due(&mut self, now: Instant) {
        if self.burst.0.is_none_or(|t| now.saturating_duration_since(t) >= BURST_EVERY) {
            self.burst = (Some(now), 0);
        }
    }

    fn pump_stream(&mut self, now: Instant) {
        let Some(group) = self.group else { return };
        self.new_burst_if_due(now);
        while self.burst.1 < BURST {
            let Some(body) = self.stream_queue.pop_front() else { break };
            let n = self.stream_next;
            self.stream_next += 1;
            let seq = self.seq();
            let bytes = wire::encode(&self.key, group, &Message { sender: self.incarnation, seq, body: Body::Stream { n, body: Box::new(body) } });
            self.out.push((group, bytes.clone()));
            self.counters.sent += 1;
            self.burst.1 += 1;
            self.history.push_back((n, bytes));
            if self.history.len() > HISTORY {
                self.history.pop_front();
            }
        }
    }

    /// Group changes queued for a later burst.
    pub fn stream_queued(&self) -> usize {
        self.stream_queue.len()
    }

    /// A peer's NACK: what is still in the history goes to it again (to it alone); for what
    /// is not, it gets the whole state.
    fn answer_nack(&mut self, i: usize, ranges: Vec<(u64, u32)>, now: Instant) {
        let Some(group) = self.group else { return };
        let oldest = self.history.front().map_or(self.stream_next, |(n, _)| *n);
        let mut budget = NACK_ANSWER_MAX;
        // Resends share the group's burst budget: a NACK cannot make this director send more
        // than its pacing allows (what is left out, the peer asks for again).
        self.new_burst_if_due(now);
        for (first, count) in ranges {
            let end = first.saturating_add(count as u64).min(self.stream_next);
            let mut n = first.max(1);
            while n < end && budget > 0 && self.burst.1 < BURST {
                budget -= 1;
                if n < oldest {
                    // Gone from the history: only the whole state repairs it (once: not again
                    // while one is wanted or on its way).
                    let peer = &mut self.peers[i];
                    if !peer.needs_all && !peer.answer_wanted && peer.answering.is_none() {
                        peer.needs_all = true;
                        peer.counters.lost += oldest - n.min(oldest);
                    }
                    n = oldest;
                    continue;
                }
                let (_, bytes) = &self.history[(n - oldest) as usize];
                let Ok(message) = wire::decode(&self.key, group, bytes) else { break };
                let to = self.peers[i].addr;
                self.send_now(to, message.body);
                self.peers[i].counters.resent += 1;
                self.burst.1 += 1;
                n += 1;
            }
        }
    }

    /// Picks the peer to pull from: a ready one if one is heard, else (after
    /// [`PREFER_READY_FOR`]) any live one; one that goes down while answering is replaced.
    fn choose_pull_source(&mut self, now: Instant) {
        if let Some(i) = self.pull_source {
            let p = &mut self.peers[i];
            match p.pull {
                PullState::Asking { .. } if p.alive(now) => return,
                PullState::Asking { .. } => p.pull = PullState::GaveUp,
                // The answer's end marked the other peers already.
                PullState::Done => return,
                _ => {}
            }
            self.pull_source = None;
        }
        let asking = |p: &Peer| matches!(p.pull, PullState::Asking { .. }) && p.alive(now);
        if self.peers.iter().any(asking) {
            self.first_heard.get_or_insert(now);
        }
        let any_will_do = self.first_heard.is_some_and(|t| now.saturating_duration_since(t) >= PREFER_READY_FOR);
        self.pull_source = self
            .peers
            .iter()
            .position(|p| asking(p) && p.ready)
            .or_else(|| any_will_do.then(|| self.peers.iter().position(asking)).flatten());
        // Each source gets its own [`PULL_LIMIT`], from when it is asked.
        if let Some(i) = self.pull_source {
            self.peers[i].pull = PullState::Asking { since: now };
        }
    }

    /// Gaps in peers' streams: NACKs for what is due, the whole state for what is lost.
    fn ask_for_missing(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            let peer = &mut self.peers[i];
            let mut ranges: Vec<(u64, u32)> = Vec::new();
            let mut lost = 0u64;
            for (n, m) in peer.missing.iter_mut() {
                if now.saturating_duration_since(m.noticed) < NACK_AFTER || m.last_nack.is_some_and(|t| now.saturating_duration_since(t) < RESEND_AFTER) {
                    continue;
                }
                if m.nacks >= MAX_TRIES {
                    lost += 1;
                    continue;
                }
                if ranges.len() == wire::NACK_RANGES_PER_DATAGRAM && ranges.last().is_none_or(|r| r.0 + r.1 as u64 != *n) {
                    continue;
                }
                m.nacks += 1;
                m.last_nack = Some(now);
                match ranges.last_mut() {
                    Some(r) if r.0 + r.1 as u64 == *n => r.1 += 1,
                    _ => ranges.push((*n, 1)),
                }
            }
            if lost > 0 {
                peer.missing.retain(|_, m| m.nacks < MAX_TRIES);
                peer.counters.lost += lost;
                peer.asking_all.get_or_insert(now);
            }
            if !ranges.is_empty() {
                peer.counters.nacks += 1;
                let to = peer.addr;
                self.send_now(to, Body::Nack { ranges });
            }
        }
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn send_now(&mut self, to: SocketAddr, body: Body) {
        let seq = self.seq();
        let bytes = wire::encode(&self.key, to, &Message { sender: self.incarnation, seq, body });
        self.out.push((to, bytes));
    }

    /// Hellos, pulls, resends, and peers found down or back. Call every few tens of ms.
    pub fn tick(&mut self, ready: bool, digests: &[(ServiceKey, [u8; 8])], now: Instant) -> Vec<Inbound> {
        let mut inbound = Vec::new();
        self.flush(now);
        let hello_due = self.last_hello.is_none_or(|t| now.saturating_duration_since(t) >= HELLO_EVERY);
        if hello_due {
            self.last_hello = Some(now);
            let chunks: Vec<Vec<(ServiceKey, [u8; 8])>> = if digests.is_empty() {
                vec![Vec::new()]
            } else {
                digests.chunks(wire::DIGESTS_PER_DATAGRAM).map(|c| c.to_vec()).collect()
            };
            if let Some(group) = self.group {
                let stream_high = self.stream_next - 1;
                for c in &chunks {
                    self.send_now(group, Body::Beacon { ready, stream_high, digests: c.clone() });
                }
            } else {
                for i in 0..self.peers.len() {
                    let addr = self.peers[i].addr;
                    for c in &chunks {
                        self.send_now(addr, Body::Hello { ready, digests: c.clone() });
                    }
                }
            }
        }
        self.choose_pull_source(now);
        if hello_due {
            for i in 0..self.peers.len() {
                let own = self.pull_source == Some(i) && matches!(self.peers[i].pull, PullState::Asking { .. });
                let wanted = own || (self.peers[i].asking_all.is_some() && self.peers[i].alive(now));
                if wanted && self.peers[i].last_pull_sent.is_none_or(|t| now.saturating_duration_since(t) >= HELLO_EVERY) {
                    self.peers[i].last_pull_sent = Some(now);
                    let addr = self.peers[i].addr;
                    self.send_now(addr, Body::Pull);
                }
            }
        }
        self.ask_for_missing(now);
        self.pump_stream(now);
        for i in 0..self.peers.len() {
            let alive = self.peers[i].alive(now);
            let is_source = self.pull_source == Some(i);
            let peer = &mut self.peers[i];
            if let PullState::Asking { since } = peer.pull {
                // A peer never heard is given up after the pull timeout; the one asked, after
                // PULL_LIMIT without a complete answer (the next live one is asked then). Others
                // heard stay candidates.
                let waited = now.saturating_duration_since(since);
                if (peer.last_heard.is_none() && waited >= self.pull_timeout) || (is_source && waited >= PULL_LIMIT) {
                    peer.pull = PullState::GaveUp;
                }
            }
            if !alive {
                if !peer.was_dead {
                    peer.was_dead = true;
                    peer.counters.lost += (peer.unacked.len() + peer.backlog.len()) as u64;
                    peer.unacked.clear();
                    peer.backlog.clear();
                    peer.backlog_changes = 0;
                    peer.answering = None;
                    // To each peer, what it missed is sent again as a whole; in a group, it
                    // asks for what it missed when it is back.
                    peer.needs_all = self.group.is_none();
                }
                continue;
            }
            let mut resend = Vec::new();
            let mut gave_up = Vec::new();
            for (seq, u) in peer.unacked.iter_mut() {
                if now.saturating_duration_since(u.sent_at) < RESEND_AFTER {
                    continue;
                }
                if u.tries >= MAX_TRIES {
                    gave_up.push(*seq);
                    continue;
                }
                u.tries += 1;
                u.sent_at = now;
                resend.push(u.bytes.clone());
            }
            for seq in gave_up {
                // Gone already when an earlier one restarted a pull answer it belonged to.
                let Some(u) = peer.unacked.remove(&seq) else { continue };
                peer.counters.lost += 1;
                peer.needs_all = true;
                if u.in_pull_answer && peer.answering.is_some() {
                    // The answer has a hole: it must never end as if complete (the peer would
                    // take its missing marks for cleared). It is given again from the start.
                    peer.answering = None;
                    peer.backlog.retain(|w| !w.in_pull_answer);
                    peer.unacked.retain(|_, u| !u.in_pull_answer);
                }
            }
            peer.counters.resent += resend.len() as u64;
            let addr = peer.addr;
            self.out.extend(resend.into_iter().map(|b| (addr, b)));
            let peer = &mut self.peers[i];
            if peer.needs_all && peer.answering.is_none() && !peer.answer_wanted {
                peer.needs_all = false;
                peer.answer_wanted = true;
                inbound.push(Inbound::SendAll(addr));
            }
            self.pump(i, now);
        }
        inbound
    }

    /// A datagram from `from`, sent to this director's own address.
    pub fn receive(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> Vec<Inbound> {
        self.receive_at(from, self.me, datagram, now)
    }

    /// A datagram from `from`, sent to the group.
    pub fn receive_group(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> Vec<Inbound> {
        match self.group {
            Some(group) => self.receive_at(from, group, datagram, now),
            None => Vec::new(),
        }
    }

    fn receive_at(&mut self, from: SocketAddr, to: SocketAddr, datagram: &[u8], now: Instant) -> Vec<Inbound> {
        let Some(i) = self.peers.iter().position(|p| p.addr == from) else {
            self.counters.unknown_peer += 1;
            return Vec::new();
        };
        let message = match wire::decode(&self.key, to, datagram) {
            Ok(m) => m,
            Err(WireError::BadTag) => {
                self.peers[i].counters.bad_auth += 1;
                return Vec::new();
            }
            Err(_) => {
                self.peers[i].counters.malformed += 1;
                return Vec::new();
            }
        };
        if message.sender == self.incarnation {
            // Our own datagram sent back to us.
            self.peers[i].counters.replayed += 1;
            return Vec::new();
        }
        let peer = &mut self.peers[i];
        if message.sender < peer.incarnation {
            peer.counters.replayed += 1;
            return Vec::new();
        }
        let mut inbound = Vec::new();
        if message.sender > peer.incarnation {
            // A new start of the peer: it pulls what it needs; what was in flight to the old
            // one is moot.
            let restarted = peer.incarnation != 0;
            peer.incarnation = message.sender;
            peer.window = ReplayWindow::default();
            peer.group_window = ReplayWindow::default();
            peer.digests.clear();
            // A restarted peer's stream starts again at 1, all of it sent while this
            // director listened; a peer first heard now owes nothing from before (this
            // director's pull covers that).
            peer.stream_expected = if restarted { 1 } else { 0 };
            peer.missing.clear();
            peer.asking_all = None;
            if restarted {
                peer.unacked.clear();
                peer.backlog.clear();
                peer.backlog_changes = 0;
                peer.answering = None;
                peer.answer_wanted = false;
                peer.needs_all = false;
            }
        }
        if !peer.fresh(message.seq, Some(to) == self.group) {
            // A copy resent because our ack was lost: acknowledge again, apply nothing.
            if message.body.reliable() {
                self.send_now(from, Body::Ack { seq: message.seq });
            } else {
                self.peers[i].counters.replayed += 1;
            }
            return inbound;
        }
        peer.counters.received += 1;
        peer.last_heard = Some(now);
        if peer.was_dead {
            peer.was_dead = false;
        }
        if message.body.reliable() {
            self.send_now(from, Body::Ack { seq: message.seq });
        }
        let peer = &mut self.peers[i];
        match message.body {
            Body::Hello { ready, digests } => {
                peer.ready = ready;
                peer.digests.extend(digests);
            }
            Body::Beacon { ready, stream_high, digests } => {
                peer.ready = ready;
                peer.digests.extend(digests);
                peer.stream_reaches(stream_high.saturating_add(1), now);
            }
            Body::Stream { n, body } => {
                if peer.take_stream(n, now) {
                    inbound.extend(change(*body));
                } else {
                    peer.counters.replayed += 1;
                }
            }
            Body::Nack { ranges } => self.answer_nack(i, ranges, now),
            body @ (Body::Records(_) | Body::Forget(_) | Body::Seen { .. }) => {
                if self.group.is_some() && matches!(body, Body::Records(_)) {
                    // In a group, records come alone only in a whole state.
                    peer.answer_since.get_or_insert(now);
                }
                inbound.extend(change(body))
            }
            Body::Marks { service, table_size, marks } => {
                peer.answer_since.get_or_insert(now);
                let own_pull = matches!(peer.pull, PullState::Asking { .. });
                inbound.push(Inbound::Marks { from, service, table_size, marks, own_pull })
            }
            body @ Body::Cleared { .. } => inbound.extend(change(body)),
            Body::Pull => {
                if peer.answering.is_none() && !peer.answer_wanted {
                    peer.needs_all = false;
                    peer.answer_wanted = true;
                    inbound.push(Inbound::SendAll(from));
                }
            }
            Body::PullEnd { .. } => {
                let own_pull = matches!(peer.pull, PullState::Asking { .. } | PullState::GaveUp);
                if own_pull {
                    peer.pull = PullState::Done;
                }
                // The whole state holds what the changes found missing before it began to
                // arrive said (it was read after they were sent); asking for them again would
                // only bring another whole state.
                let since = peer.answer_since.take().unwrap_or(now);
                peer.asking_all = None;
                peer.missing.retain(|_, m| m.noticed >= since);
                inbound.push(Inbound::Pulled { from, own_pull });
                if own_pull {
                    // One whole state is the group's: the others are not needed, from now (not
                    // from the next tick: readiness and status must agree at every moment).
                    for q in self.peers.iter_mut().filter(|q| matches!(q.pull, PullState::Asking { .. })) {
                        q.pull = PullState::Elsewhere;
                    }
                }
            }
            Body::Ack { seq } => {
                if let Some(u) = peer.unacked.remove(&seq)
                    && let Some(oldest) = u.oldest
                {
                    let lag = now.saturating_duration_since(oldest);
                    peer.lag_last = Some(lag);
                    peer.lag_max = Some(peer.lag_max.map_or(lag, |m| m.max(lag)));
                }
                self.pump(i, now);
            }
        }
        inbound
    }

    /// How long since the engine started.
    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Totals over every peer and the engine's own counters.
    pub fn totals(&self) -> Counters {
        let mut t = self.counters;
        for p in &self.peers {
            let c = p.counters;
            t.sent += c.sent;
            t.received += c.received;
            t.resent += c.resent;
            t.lost += c.lost;
            t.bad_auth += c.bad_auth;
            t.malformed += c.malformed;
            t.replayed += c.replayed;
            t.missed += c.missed;
            t.nacks += c.nacks;
        }
        t
    }
}

/// What a received change asks of the daemon.
fn change(body: Body) -> Option<Inbound> {
    match body {
        Body::Records(r) => Some(Inbound::Records(r)),
        Body::Forget(k) => Some(Inbound::Forget(k)),
        Body::Seen { service, table_size, slots } => Some(Inbound::Seen { service, table_size, slots }),
        Body::Cleared { service, table_size, marks } => Some(Inbound::Cleared { service, table_size, marks }),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod group_tests;
