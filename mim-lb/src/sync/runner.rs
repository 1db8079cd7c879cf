//! The daemon's side of the flow sync: the UDP socket, the data path's event ring, the
//! timers, and applying what peers send through the director. Everything runs on the event
//! loop, so imports and commits never interleave.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, RingBuf};
use log::{debug, info, warn};
use mim_lb_common::{FLOW_EVENT_FORGOTTEN, FLOW_EVENT_RECORDED, FlowEvent, maps::names};
use tokio::{io::unix::AsyncFd, net::UdpSocket};

use super::{
    multicast,
    engine::{Engine, Inbound, PullState},
    wire::{Key, WireRecord},
};
use crate::{
    config::{ServiceKey, Sync as SyncConfig},
    director::{Director, ServiceSlots, marks::seen_ns, sweep::monotonic_ns},
};

/// How often the engine's timers run (hellos, resends).
pub const TICK: Duration = Duration::from_millis(50);
/// How often marked slots' `SLOT_SEEN` stamps go to peers.
pub const SEEN_EVERY: Duration = Duration::from_secs(1);
/// How long a change waits for others to share its datagram: what it adds to the lag.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);

/// The sync sockets: this director's own address, and the group's when there is one.
pub struct Sockets {
    unicast: UdpSocket,
    group: Option<UdpSocket>,
}

/// Binds the sync sockets (before anything touches the kernel, so a taken address fails the
/// start).
pub async fn bind(config: &SyncConfig) -> anyhow::Result<Sockets> {
    use anyhow::Context as _;
    let unicast =
        UdpSocket::bind(config.listen).await.with_context(|| format!("binding the sync socket (sync.listen) {}", config.listen))?;
    enlarge_buffers(&unicast);
    let group = match config.group {
        Some(group) => {
            let socket = multicast::join(config.listen, group).with_context(|| format!("joining the sync group (sync.group) {group}"))?;
            multicast::send_from(&unicast, config.listen).with_context(|| format!("sending to the sync group (sync.group) {group} from {}", config.listen))?;
            enlarge_buffers(&socket);
            Some(socket)
        }
        None => None,
    };
    Ok(Sockets { unicast, group })
}

/// Socket buffers for bursts: a pull answer or a burst of new flows arrives faster than one
/// event loop turn reads it, and every datagram a full buffer drops costs a resend.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

fn enlarge_buffers(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    for (forced, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        let size = SOCKET_BUFFER;
        let set = |opt| {
            // SAFETY: setsockopt on our own socket with a c_int option value that outlives the call.
            unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&size as *const libc::c_int).cast(), size_of::<libc::c_int>() as libc::socklen_t)
            }
        };
        // The forced form passes net.core.[rw]mem_max (root, CAP_NET_ADMIN); else the
        // plain one, capped by it.
        if set(forced) != 0 && set(plain) != 0 {
            debug!("sync socket: buffer option {plain}: {}", std::io::Error::last_os_error());
        }
    }
}

struct Settle {
    peer: SocketAddr,
    reported: HashMap<ServiceKey, std::collections::HashSet<u32>>,
    own_pull: bool,
}

pub struct SyncRunner {
    socket: UdpSocket,
    group_socket: Option<UdpSocket>,
    engine: Engine,
    events: AsyncFd<RingBuf<MapData>>,
    /// The stamps last sent, per service, so that only changes go out.
    seen_sent: HashMap<ServiceKey, Vec<(u32, u32)>>,
    /// When the last refresh of live records began (`CLOCK_MONOTONIC` ns).
    refreshed_ns: u64,
    pull_logged: bool,
    buf: Vec<u8>,
    /// The slots each peer reported marked in the answer it is sending, by service.
    pulled_marks: HashMap<SocketAddr, HashMap<ServiceKey, std::collections::HashSet<u32>>>,
    /// Peers to send the whole state with the next read of the connection table.
    answer_wanted: Vec<SocketAddr>,
    /// Whole states received, whose marks are settled with the next read of the table.
    /// `own_pull`: the answer to this director's own start-up pull, which readiness waits
    /// for; a repair a running director receives does not take its readiness away.
    settles: Vec<Settle>,
    /// When the queued changes go (see [`FLUSH_DELAY`]).
    flush_at: Option<Instant>,
    /// After a failed read of the connection table, the next is not tried before this.
    read_again_at: Option<Instant>,
    /// Keys the data path forgot, with when (`CLOCK_MONOTONIC` ns): a read that began before
    /// must not bring their old records back to the peers.
    forgotten: HashMap<mim_lb_common::FlowKey, u64>,
    /// `SYNC_STAT_LOST` at the last read: more since means events were lost, and every live
    /// record goes to the peers again.
    events_lost: u64,
    /// The idle timeouts: what a live record is, and how long a mark's stamp counts.
    tcp_idle: Duration,
    udp_idle: Duration,
}

impl SyncRunner {
    /// Starts syncing over `socket`: opens the data path's event ring under `pin_dir` and has
    /// the program report its changes. The pull from every peer begins at once with
    /// `pull_now`, else with [`SyncRunner::start_pull`] (after a fresh start's first round of
    /// health checks: the peer's marks fit only a table with its masters in it).
    pub fn start(
        sockets: Sockets,
        config: &crate::config::Config,
        director: &mut Director,
        pull_now: bool,
    ) -> anyhow::Result<SyncRunner> {
        use anyhow::Context as _;
        let pin_dir: &Path = &config.pin_dir;
        let config_all = config;
        let config: &SyncConfig = config.sync.as_ref().context("[sync] is not configured")?;
        let data = MapData::from_pin(pin_dir.join(names::FLOW_EVENTS)).context("opening the pinned FLOW_EVENTS ring")?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).context("opening the pinned FLOW_EVENTS ring")?;
        // SAFETY: the ring owns its map fd and keeps it open, unchanged, for as long as the
        // AsyncFd owns the ring.
        let events = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the FLOW_EVENTS ring: {e}"))?;
        director.set_sync_events(true).context("turning on the data path's flow events")?;
        let key = Key::new(&config.key).context("sync key")?;
        // Grows from one start to the next: the wall clock in ns.
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let now = Instant::now();
        let mut engine = Engine::new(key, config.listen, &config.peers, incarnation, pull_now, config.pull_timeout, now);
        if let Some(group) = config.group {
            engine = engine.with_group(group);
        }
        info!(
            "flow sync on {} with {} peers: {}; changes go {}; pulling the state of one before ready (up to {:?} for a silent group)",
            config.listen,
            config.peers.len(),
            config.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
            config.group.map_or("to each peer".to_owned(), |g| format!("to the group {g}")),
            config.pull_timeout
        );
        Ok(SyncRunner {
            socket: sockets.unicast,
            group_socket: sockets.group,
            engine,
            events,
            seen_sent: HashMap::new(),
            refreshed_ns: monotonic_ns(),
            pull_logged: false,
            buf: vec![0; 2048],
            pulled_marks: HashMap::new(),
            answer_wanted: Vec::new(),
            settles: Vec::new(),
            flush_at: None,
            read_again_at: None,
            forgotten: HashMap::new(),
            events_lost: 0,
            tcp_idle: config_all.tcp_idle_timeout,
            udp_idle: config_all.udp_idle_timeout,
        })
    }

    /// Begins the pull from every peer (see [`SyncRunner::start`]).
    pub fn start_pull(&mut self) {
        self.engine.start_pull(Instant::now());
    }

    /// The idle timeouts after a reload.
    pub fn set_idle(&mut self, tcp: Duration, udp: Duration) {
        self.tcp_idle = tcp;
        self.udp_idle = udp;
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Why this director is not ready yet, if its pull is not over.
    pub fn not_ready(&self) -> Option<String> {
        if self.settles.iter().any(|s| s.own_pull) {
            return Some("settling the marks of the peers' state".into());
        }
        let waiting = self.engine.pulling_from();
        (!waiting.is_empty()).then(|| {
            format!(
                "pulling flow state from peers: waiting for {}",
                waiting.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Waits for a datagram, on either socket.
    pub async fn readable(&self) -> std::io::Result<()> {
        match &self.group_socket {
            Some(group) => tokio::select! {
                r = self.socket.readable() => r,
                r = group.readable() => r,
            },
            None => self.socket.readable().await,
        }
    }

    /// Waits until the event ring has events. Readiness is cleared here, before
    /// [`SyncRunner::on_events`] drains the ring, so an event written meanwhile wakes it again.
    pub async fn events_ready(&self) {
        match self.events.readable().await {
            Ok(mut guard) => guard.clear_ready(),
            // Not pollable: fall back to draining on a timer.
            Err(_) => tokio::time::sleep(TICK).await,
        }
    }

    /// Reads every waiting datagram, on both sockets, and applies it.
    pub fn on_readable(&mut self, director: &mut Director) {
        // Bounded: a flood cannot keep the event loop here.
        for _ in 0..256 {
            let mut got = false;
            for to_group in [false, true] {
                let socket = if to_group { self.group_socket.as_ref() } else { Some(&self.socket) };
                let Some(socket) = socket else { continue };
                match socket.try_recv_from(&mut self.buf) {
                    Ok((n, from)) => {
                        got = true;
                        let datagram = self.buf[..n].to_vec();
                        let now = Instant::now();
                        let inbound = if to_group {
                            self.engine.receive_group(from, &datagram, now)
                        } else {
                            self.engine.receive(from, &datagram, now)
                        };
                        self.apply(director, inbound);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => debug!("sync socket: {e}"),
                }
            }
            if !got {
                break;
            }
        }
        self.send();
    }

    /// Takes the data path's events off the ring and queues them for the peers.
    pub fn on_events(&mut self, director: &mut Director) {
        let now_ns = monotonic_ns();
        let now = Instant::now();
        let mut recorded = Vec::new();
        let mut forgotten = Vec::new();
        let ring = self.events.get_mut();
        // Bounded per call; the rest waits for the next wakeup.
        for _ in 0..65_536 {
            let Some(item) = ring.next() else { break };
            if item.len() < size_of::<FlowEvent>() {
                continue;
            }
            // SAFETY: the ring holds `FlowEvent`s written by the data path (repr(C), any bit
            // pattern valid); read unaligned from the item's bytes.
            let event: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            match event.kind {
                FLOW_EVENT_RECORDED => recorded.push((event.key, event.flow)),
                FLOW_EVENT_FORGOTTEN => {
                    self.forgotten.insert(event.key, now_ns);
                    forgotten.push(event.key)
                }
                _ => {}
            }
        }
        for record in director.export_records(&recorded, now_ns) {
            let happened = now.checked_sub(Duration::from_millis(record.age_ms as u64));
            self.engine.queue_record(record, happened, now);
        }
        for key in forgotten {
            self.engine.queue_forget(key, now);
        }
        // Full datagrams went already; the rest waits a moment for company, so that a
        // steady trickle of new flows shares datagrams instead of sending one each.
        if self.engine.has_queued() && self.flush_at.is_none() {
            self.flush_at = Some(now + FLUSH_DELAY);
        }
        self.send();
    }

    /// When the changes queued for the peers are due to go, if any are queued.
    pub fn flush_due(&self) -> Option<Instant> {
        self.flush_at
    }

    /// Sends what is queued.
    pub fn flush(&mut self) {
        self.flush_at = None;
        self.engine.flush(Instant::now());
        self.send();
    }

    /// The engine's timers; the pull's end is logged once.
    pub fn on_tick(&mut self, director: &mut Director, ready: bool) {
        // The engine's tick sends what is queued too.
        self.flush_at = None;
        let inbound = self.engine.tick(ready, &director.digests(), Instant::now());
        self.apply(director, inbound);
        if !self.pull_logged && self.engine.pulled() {
            self.pull_logged = true;
            for p in self.engine.peers() {
                match p.pull {
                    PullState::Done => info!("flow sync: pulled the state of {}", p.addr),
                    PullState::GaveUp => warn!("flow sync: {} did not answer; ready without its state", p.addr),
                    _ => {}
                }
            }
        }
        self.send();
    }

    /// Sends peers the `SLOT_SEEN` stamps that changed since the last time.
    pub fn on_seen_tick(&mut self, director: &Director) {
        let Ok(stamps) = director.seen_stamps() else { return };
        let now_ns = monotonic_ns();
        let now = Instant::now();
        for (service, table_size, slots) in stamps {
            let before = self.seen_sent.get(&service);
            let changed: Vec<(u32, u32)> = slots
                .iter()
                .filter(|s| before.is_none_or(|b| !b.contains(s)))
                .map(|&(slot, stamp)| (slot, (now_ns.saturating_sub(seen_ns(stamp)) / 1_000_000) as u32))
                .collect();
            if !changed.is_empty() {
                self.engine.send_seen(service, table_size, changed, now);
            }
            self.seen_sent.insert(service, slots);
        }
        self.send();
    }


    /// What `mim-lb status` shows of the sync.
    pub fn status(&self, director: &Director, listen: SocketAddr) -> crate::status::SyncStatus {
        let now = Instant::now();
        let ours: HashMap<ServiceKey, [u8; 8]> = director.digests().into_iter().collect();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let peers = self
            .engine
            .peers()
            .iter()
            .map(|p| {
                let c = p.counters;
                crate::status::PeerStatus {
                    address: p.addr.to_string(),
                    state: match (p.last_heard, p.alive(now)) {
                        (None, _) => "never heard".into(),
                        (Some(_), true) => "up".into(),
                        (Some(_), false) => "down".into(),
                    },
                    last_heard_s: p.last_heard.map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    ready: p.ready,
                    tables_agree: (!p.digests.is_empty()).then(|| ours.iter().all(|(k, d)| p.digests.get(k) == Some(d))),
                    pull: match p.pull {
                        PullState::None => "none",
                        PullState::Asking { .. } => "pulling",
                        PullState::Done => "done",
                        PullState::GaveUp => "gave up",
                        PullState::Elsewhere => "from another peer",
                    }
                    .into(),
                    in_flight: p.in_flight(),
                    lag_ms_last: ms(p.lag_last),
                    lag_ms_max: ms(p.lag_max),
                    sent: c.sent,
                    received: c.received,
                    resent: c.resent,
                    lost: c.lost,
                    bad_auth: c.bad_auth,
                    malformed: c.malformed,
                    replayed: c.replayed,
                    missed: c.missed,
                    missing: p.missing(),
                    nacks: c.nacks,
                }
            })
            .collect();
        crate::status::SyncStatus {
            listen: listen.to_string(),
            ready: self.not_ready().is_none(),
            peers,
            unknown_peer: self.engine.counters.unknown_peer,
            group: self.engine.group().map(|g| g.to_string()),
            group_sent: self.engine.counters.sent,
            events_lost: director.dataplane().maps_ro().sync_stats().map_or(0, |s| s[mim_lb_common::SYNC_STAT_LOST as usize]),
        }
    }

    fn apply(&mut self, director: &mut Director, inbound: Vec<Inbound>) {
        let now_ns = monotonic_ns();
        for i in inbound {
            let result = match i {
                Inbound::Records(records) => director.import_records(&records, now_ns).map(|r| {
                    if r.slots_marked > 0 || r.unknown > 0 {
                        debug!("flow sync: {r:?}");
                    }
                }),
                Inbound::Forget(keys) => director.import_forgets(&keys).map(|_| ()),
                Inbound::Seen { service, table_size, slots } => director.import_seen(&service, table_size, &slots, now_ns).map(|_| ()),
                Inbound::Marks { from, service, table_size, marks, own_pull } => {
                    self.pulled_marks.entry(from).or_default().entry(service).or_default().extend(marks.iter().map(|m| m.slot));
                    if own_pull { director.import_marks(&service, table_size, &marks, now_ns).map(|_| ()) } else { Ok(()) }
                }
                Inbound::SendAll(peer) => {
                    // Answered with the next read of the connection table, which the daemon
                    // starts at once (on a thread of its own: a large table takes a while).
                    if !self.answer_wanted.contains(&peer) {
                        self.answer_wanted.push(peer);
                    }
                    Ok(())
                }
                Inbound::Cleared { service, table_size, marks } => director.import_cleared(&service, table_size, &marks, now_ns).map(|_| ()),
                Inbound::Pulled { from, own_pull } => {
                    debug!("flow sync: {from} finished sending its state (own pull: {own_pull})");
                    let reported = self.pulled_marks.remove(&from).unwrap_or_default();
                    self.settles.push(Settle { peer: from, reported, own_pull });
                    Ok(())
                }
            };
            if let Err(e) = result {
                warn!("flow sync: applying what a peer sent: {e}");
            }
        }
    }

    /// After a peer's whole state: for each service whose table the peer builds alike (same
    /// digest), marks held here that the peer did not report are cleared where this
    /// director's own facts allow it (`Director::settle_marks_after_pull`).
    /// Done with the next read of the connection table (on its own thread), which tells which
    /// marks this director's live records need.
    fn settle_after_pull(
        &mut self,
        director: &mut Director,
        peer: SocketAddr,
        reported: HashMap<ServiceKey, std::collections::HashSet<u32>>,
        flows: &[(mim_lb_common::FlowKey, mim_lb_common::FlowEntry)],
        read_ns: u64,
    ) -> Result<(), crate::director::DirectorError> {
        let Some(p) = self.engine.peers().iter().find(|p| p.addr == peer) else { return Ok(()) };
        let agreeing: Vec<ServiceKey> =
            director.digests().into_iter().filter(|(k, d)| p.digests.get(k) == Some(d)).map(|(k, _)| k).collect();
        let cleared = director.settle_marks_after_pull(&agreeing, &reported, flows, read_ns, self.tcp_idle)?;
        if cleared > 0 {
            info!("flow sync: {cleared} slots were marked here but not on {peer}, and no flow here needs them: cleared");
        }
        Ok(())
    }

    /// Tells peers which marks this director's sweep cleared.
    pub fn send_cleared(&mut self, director: &Director, cleared: &[ServiceSlots]) {
        let now = Instant::now();
        for (service, table_size, entries) in cleared {
            let marks = director.wire_marks(service, entries);
            self.engine.send_cleared(*service, *table_size, marks, now);
        }
        self.send();
    }

    /// Peers waiting for the whole state: the daemon reads the connection table now (not
    /// again within a second of a failed read).
    pub fn wants_a_read(&self) -> bool {
        (!self.answer_wanted.is_empty() || !self.settles.is_empty()) && self.read_again_at.is_none_or(|t| Instant::now() >= t)
    }

    /// A read of the connection table failed: the next waits a second.
    pub fn read_failed(&mut self) {
        self.read_again_at = Some(Instant::now() + Duration::from_secs(1));
    }

    /// A read of the connection table that began at `read_ns`: the whole state for every
    /// peer that asked for it (it starts, or lost datagrams for good), then the refresh of
    /// live records for the others. Records the data path forgot after the read began are
    /// left out (they would bring back an old connection's record), and so are records no
    /// longer live.
    pub fn on_table_read(&mut self, director: &mut Director, flows: &[(mim_lb_common::FlowKey, mim_lb_common::FlowEntry)], read_ns: u64) {
        self.read_again_at = None;
        for Settle { peer, reported, .. } in std::mem::take(&mut self.settles) {
            if let Err(e) = self.settle_after_pull(director, peer, reported, flows, read_ns) {
                warn!("flow sync: settling marks after {peer}'s state: {e}");
            }
        }
        let (tcp, udp) = (self.tcp_idle.as_nanos() as u64, self.udp_idle.as_nanos() as u64);
        let forgotten = &self.forgotten;
        let current: Vec<_> = flows
            .iter()
            .filter(|(k, f)| {
                let idle = if k.proto == mim_lb_common::PROTO_TCP { tcp } else { udp };
                read_ns.saturating_sub(f.last_seen_ns) < idle && forgotten.get(k).is_none_or(|t| *t < read_ns)
            })
            .copied()
            .collect();
        self.forgotten.retain(|_, t| *t >= read_ns);
        let peers = std::mem::take(&mut self.answer_wanted);
        if !peers.is_empty() {
            let records: Vec<WireRecord> = director.export_records(&current, read_ns);
            let marks = director.export_marks();
            for peer in peers {
                info!(
                    "flow sync: sending {} live records and {} marked slots to {peer}",
                    records.len(),
                    marks.iter().map(|m| m.2.len()).sum::<usize>()
                );
                self.engine.answer_pull(peer, records.clone(), marks.clone(), Instant::now());
            }
            // The stamps of marked slots go to every peer again with the next tick.
            self.seen_sent.clear();
        }
        let lost = director.dataplane().maps_ro().sync_stats().map_or(0, |s| s[mim_lb_common::SYNC_STAT_LOST as usize]);
        let all = lost > self.events_lost;
        if all {
            warn!("flow sync: {} data-path events were lost (the ring was full); sending every live record again", lost - self.events_lost);
        }
        self.events_lost = lost;
        self.refresh(director, &current, read_ns, all);
    }

    /// Sends peers every record seen here since the last refresh (all of them with `all`):
    /// what keeps their copies alive, and repairs events the ring lost. Records a peer sent
    /// that no packet here has touched since are not sent back.
    fn refresh(&mut self, director: &Director, flows: &[(mim_lb_common::FlowKey, mim_lb_common::FlowEntry)], read_ns: u64, all: bool) {
        let since = if all { 0 } else { self.refreshed_ns.saturating_sub(2_000_000_000) };
        let fresh: Vec<_> = flows
            .iter()
            .filter(|(_, f)| f.last_seen_ns >= since && f.flags & mim_lb_common::FLOW_F_IMPORTED == 0)
            .copied()
            .collect();
        self.refreshed_ns = read_ns;
        let now = Instant::now();
        for record in director.export_records(&fresh, read_ns) {
            self.engine.queue_record(record, None, now);
        }
        self.engine.flush(now);
        self.send();
    }

    fn send(&mut self) {
        for (to, bytes) in self.engine.take_out() {
            // A full socket buffer drops the datagram; state datagrams are sent again.
            if let Err(e) = self.socket.try_send_to(&bytes, to)
                && e.kind() != std::io::ErrorKind::WouldBlock
            {
                debug!("flow sync: sending to {to}: {e}");
            }
        }
    }
}
