//! Two directors (issue 8): the namespace lab with two directors, the real daemon on each with
//! `[sync]`, and keepalived (real VRRP) moving the VIP between them.
//!
//! - Failover: the active director is killed (SIGKILL to its daemon and keepalived, its link
//!   cut) under long-lived connections and a stream of new ones. Baseline: VRRP's own master
//!   down interval for the advert interval and the backup's priority.
//! - Sync lag: UDP flows (every one is recorded and shared) at a steady rate through the active
//!   director, its `lag_ms_last` sampled from its status. Baseline: the round trip between the
//!   two directors' namespaces (ping, and a UDP echo between two user-space sockets).
//! - Sync traffic and CPU: a known rate of new UDP flows through the active director; the sync
//!   datagrams and bytes it sent and its daemon's CPU time. Baseline: the same load on a pair
//!   started without `[sync]`.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mim_lb::status::{PeerStatus, Status};
use mim_lb_tests::{
    Capture, Lab, LabSpec,
    continuity::{Traffic, TrafficSpec},
    gateway::{Mode, ServiceSpec, mim_lb_binary},
    keepalived::{Directors, VrrpSpec, director_configs, priority},
    netns::spawn_in_netns,
};
use serde_json::json;

use crate::interrupt;
use crate::report::{Section, max, median, min};

/// The TCP port of the masters' service (and the UDP service's health check).
pub(crate) const PORT: u16 = 7000;
/// The UDP service whose every flow is recorded and shared.
pub(crate) const UDP_PORT: u16 = 7001;
pub(crate) const SYNC_PORT: u16 = 7946;
/// A UDP echo on director 1, for the round-trip baseline.
const ECHO_PORT: u16 = 7950;
/// Source ports the load uses, one per new flow (never one twice in a lab).
const FIRST_SOURCE_PORT: u16 = 1024;
/// How long the daemon waits between two reads of its table to refresh the peer's copies
/// (`min(tcp_idle_timeout_s, udp_idle_timeout_s) / 4`, at most 30 s; 30 s with the defaults).
const REFRESH_PERIOD: Duration = Duration::from_secs(30);
/// The longest any wait in a phase may take before the benchmark gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(20);
/// Traffic before the kill and after the VIP moved.
const SETTLE: Duration = Duration::from_secs(2);
/// Between two status polls while sampling the lag: a status answer occupies the daemon's
/// event loop for milliseconds, so polling much more often would add to the lag it measures.
const LAG_POLL: Duration = Duration::from_millis(100);

pub struct Settings {
    /// Failover rounds (a new lab each).
    pub rounds: usize,
    /// How long the lag is sampled (s), and the flow rate meanwhile.
    pub lag_s: u64,
    pub lag_rate: u32,
    /// New flows per second of each load step, and how long each runs (s).
    pub rates: Vec<u32>,
    pub load_s: u64,
}

/// The group's sync key, in a file of its own (mode 600), removed on drop.
pub(crate) struct SyncKey(pub(crate) PathBuf);

impl SyncKey {
    pub(crate) fn new(lab: &Lab) -> Result<SyncKey> {
        let path = std::env::temp_dir().join(format!("mimlb-bench-sync-{}.key", lab.id()));
        let key = SyncKey(path);
        std::fs::write(&key.0, format!("a benchmark key for lab {} of at least 32 bytes\n", lab.id()))
            .with_context(|| format!("writing {}", key.0.display()))?;
        std::fs::set_permissions(&key.0, std::fs::Permissions::from_mode(0o600))?;
        Ok(key)
    }
}

impl Drop for SyncKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A lab of two directors (IPv4 only: keepalived moves the IPv4 VIP) with the masters' TCP
/// service running.
fn two_director_lab() -> Result<Lab> {
    let mut lab = Lab::new(LabSpec { directors: 2, ipv6: false, ..LabSpec::default() })?;
    lab.start_tcp_servers(PORT)?;
    Ok(lab)
}

/// The UDP service, its masters checked by TCP on [`PORT`].
pub(crate) fn udp_service(lab: &Lab) -> ServiceSpec {
    ServiceSpec {
        name: "udp".into(),
        port: UDP_PORT,
        protocol: "udp",
        health: format!("port = {PORT}\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1\nfall = 2"),
        ..ServiceSpec::tcp(lab, PORT)
    }
}

/// Both directors with `services`, with `[sync]` naming each other if `key` is given,
/// keepalived on both (default VRRP: 200 ms adverts), director 0 holding the VIP, and with
/// sync each seeing its peer up with the same tables.
fn start_pair(lab: &mut Lab, key: Option<&SyncKey>, services: &[ServiceSpec]) -> Result<Directors> {
    let sync = |i: usize| match key {
        Some(key) => format!(
            "[sync]\nlisten = \"{}:{SYNC_PORT}\"\npeers = [\"{}:{SYNC_PORT}\"]\nkey_file = \"{}\"\n",
            lab.director_addr4(i),
            lab.director_addr4(1 - i),
            key.0.display()
        ),
        None => String::new(),
    };
    let configs = director_configs(lab, services, "", sync);
    let directors = Directors::start(lab, Mode::Generic, &configs, VrrpSpec::default())?;
    if key.is_some() {
        for i in 0..2 {
            directors.gateway(i).wait_until("its peer up with the same tables", PHASE_LIMIT, |s| {
                s.sync.as_ref().is_some_and(|y| y.ready && y.peers[0].state == "up" && y.peers[0].tables_agree == Some(true))
            })?;
        }
    }
    Ok(directors)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn since(later: Instant, earlier: Instant) -> f64 {
    ms(later.saturating_duration_since(earlier))
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let k = ((v.len() - 1) as f64 * p).round() as usize;
    v[k]
}

// ---------------------------------------------------------------------------------------------
// Failover

struct FailoverRound {
    /// Kill to director 1 alone holding the VIP (polled with `ip addr` every ~20 ms).
    vip_ms: f64,
    /// Kill to the answer of the first new connection started after it.
    first_ms: f64,
    /// Kill to the end of the last failed new connection (every later one succeeded), and to
    /// its start (every one started later succeeded).
    window_ms: f64,
    last_failed_start_ms: f64,
    failed: usize,
    failed_after_recovery: usize,
    failed_before_kill: usize,
    new_connections: usize,
    /// The longest silence of a long-lived connection that ended after the kill.
    held_gap_ms: f64,
    held: usize,
    held_broken: usize,
}

fn failover_round() -> Result<FailoverRound> {
    let mut lab = two_director_lab()?;
    let key = SyncKey::new(&lab)?;
    let services = [ServiceSpec::tcp(&lab, PORT)];
    let mut directors = start_pair(&mut lab, Some(&key), &services)?;
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip))?;
    interrupt::sleep(SETTLE)?;
    if traffic.progress().new_ok == 0 {
        bail!("no new connection succeeded before the kill");
    }
    let killed = directors.kill(&lab, 0)?;
    directors.wait_master(&lab, 1, PHASE_LIMIT)?;
    let vip_ms = since(Instant::now(), killed);
    interrupt::sleep(SETTLE)?;
    let report = traffic.finish();
    drop(directors);
    drop(key);
    drop(lab);

    let Some((_, first)) = report.first_success_after(killed) else {
        bail!("no new connection succeeded after the kill\n{}", report.summary("the kill", killed));
    };
    let failed: Vec<_> = report.attempts.iter().filter(|a| a.outcome.is_err() && a.ended >= killed).collect();
    let window_end = failed.iter().map(|a| a.ended).max().unwrap_or(killed);
    let last_failed_start = failed.iter().map(|a| a.started).max().unwrap_or(killed);
    Ok(FailoverRound {
        vip_ms,
        first_ms: ms(first),
        window_ms: since(window_end, killed),
        last_failed_start_ms: since(last_failed_start, killed),
        failed: failed.len(),
        failed_after_recovery: report.failures_after_recovery(killed).len(),
        failed_before_kill: report.attempts.iter().filter(|a| a.outcome.is_err() && a.ended < killed).count(),
        new_connections: report.attempts.len(),
        held_gap_ms: ms(report.longest_held_gap_after(killed)),
        held: report.held.len(),
        held_broken: report.broken_held().len(),
    })
}

// ---------------------------------------------------------------------------------------------
// The load: new UDP flows at a known rate

/// Sends `count` UDP datagrams to `vip` from the client at `rate` a second, each from its own
/// source port (`first_port`, `first_port + 1`, ...): each is a new flow the active director
/// records. A raw socket writes the UDP header itself, so one `sendto` per flow and no socket
/// per port. Nothing answers: the masters have no UDP service, so nothing comes back through
/// a director (their ICMP errors go straight to the client). Returns (sent, failed sends, time
/// taken).
pub(crate) fn send_flows(lab: &Lab, vip: SocketAddrV4, first_port: u16, rate: u32, count: u32) -> Result<(u32, u32, Duration)> {
    let limit = Duration::from_secs_f64(f64::from(count) / f64::from(rate)) + Duration::from_secs(5);
    let handle = spawn_in_netns(lab.client_ns(), "bench-flows", move || -> Result<(u32, u32, Duration)> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_UDP) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening a raw UDP socket");
        }
        // SAFETY: a fresh fd of ours.
        let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(*vip.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let payload = b"mim-lb bench flow";
        let mut datagram = vec![0u8; 8 + payload.len()];
        datagram[2..4].copy_from_slice(&vip.port().to_be_bytes());
        let len = datagram.len() as u16;
        datagram[4..6].copy_from_slice(&len.to_be_bytes());
        // Checksum 0: none (allowed over IPv4).
        datagram[8..].copy_from_slice(payload);
        let started = Instant::now();
        let (mut sent, mut failed) = (0u32, 0u32);
        while sent + failed < count {
            let elapsed = started.elapsed();
            if elapsed > limit || interrupt::interrupted() {
                break;
            }
            let due = ((elapsed.as_secs_f64() * f64::from(rate)) as u32 + 1).min(count);
            while sent + failed < due {
                let port = first_port + (sent + failed) as u16;
                datagram[0..2].copy_from_slice(&port.to_be_bytes());
                // SAFETY: valid buffer and address for the call's duration.
                let r = unsafe {
                    libc::sendto(
                        fd,
                        datagram.as_ptr().cast(),
                        datagram.len(),
                        0,
                        (&raw const to).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if r < 0 { failed += 1 } else { sent += 1 }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok((sent, failed, started.elapsed()))
    })?;
    let result = handle.join().map_err(|_| anyhow::anyhow!("the flow sender panicked"))??;
    interrupt::check()?;
    Ok(result)
}

/// Source ports handed out to the load, each once per lab.
pub(crate) struct Ports(u32);

impl Ports {
    pub(crate) fn new() -> Ports {
        Ports(u32::from(FIRST_SOURCE_PORT))
    }
    pub(crate) fn take(&mut self, n: u32) -> Result<u16> {
        if self.0 + n > 65_536 {
            bail!("{n} more new flows need more source ports than the client has left ({} after {})", 65_536 - self.0, self.0);
        }
        let first = self.0 as u16;
        self.0 += n;
        Ok(first)
    }
}

/// utime + stime of a process, all its threads (ms).
pub(crate) fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("an unexpected /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 * 1e3 / hz)
}

fn peer(status: &Status) -> Option<&PeerStatus> {
    status.sync.as_ref().and_then(|s| s.peers.first())
}

pub(crate) fn udp_new_flows(status: &Status) -> u64 {
    status.services.iter().filter(|s| s.port == UDP_PORT && s.protocol == "udp").map(|s| s.new_flows).sum()
}

/// The counters a load step is measured by, at one moment.
#[derive(Clone, Copy, Default)]
struct Counters {
    at: Option<Instant>,
    cpu0_ms: f64,
    cpu1_ms: f64,
    new_flows: u64,
    sent: u64,
    resent: u64,
    lost: u64,
    received1: u64,
    /// State datagrams the backup sent to the active director.
    sent1: u64,
}

fn counters(directors: &Directors) -> Result<Counters> {
    let s0 = directors.gateway(0).status()?;
    let s1 = directors.gateway(1).status()?;
    Ok(Counters {
        at: Some(Instant::now()),
        cpu0_ms: cpu_ms(directors.gateway(0).proc().pid())?,
        cpu1_ms: cpu_ms(directors.gateway(1).proc().pid())?,
        new_flows: udp_new_flows(&s0),
        sent: peer(&s0).map_or(0, |p| p.sent),
        resent: peer(&s0).map_or(0, |p| p.resent),
        lost: peer(&s0).map_or(0, |p| p.lost),
        received1: peer(&s1).map_or(0, |p| p.received),
        sent1: peer(&s1).map_or(0, |p| p.sent),
    })
}

/// Sync frames director 0 sent (count, bytes on the wire) and received, from a capture of its
/// `eth0` (which sees the daemon's own traffic, not the frames the XDP program sends back out).
#[derive(Clone, Copy, Default)]
struct SyncFrames {
    out: u64,
    out_bytes: u64,
    back: u64,
    back_bytes: u64,
}

fn sync_frames(frames: &[mim_lb_tests::FrameInfo]) -> SyncFrames {
    let mut f = SyncFrames::default();
    for frame in frames.iter().filter(|f| f.is_udp()) {
        if frame.outgoing && frame.src_port == Some(SYNC_PORT) {
            f.out += 1;
            f.out_bytes += frame.len as u64;
        } else if !frame.outgoing && frame.dst_port == Some(SYNC_PORT) {
            f.back += 1;
            f.back_bytes += frame.len as u64;
        }
    }
    f
}

/// One load step on one pair.
struct Step {
    rate: u32,
    sent: u32,
    send_failed: u32,
    send_s: f64,
    /// The whole window: the load and a second after it.
    window_s: f64,
    /// Flows the active director recorded (its UDP service's `new_flows`).
    recorded: u64,
    cpu0_ms: f64,
    cpu1_ms: f64,
    /// With sync: state datagrams sent (status), resent, lost, and what the capture saw.
    datagrams: u64,
    resent: u64,
    lost: u64,
    received1: u64,
    backup_datagrams: u64,
    frames: SyncFrames,
    in_flight_after: usize,
    /// Whether a periodic refresh may have fallen into the window (it began more than
    /// [`REFRESH_PERIOD`] after the daemons started).
    refresh_possible: bool,
    /// With sync: the next periodic refresh after the window, which sends the step's flows
    /// again: state datagrams of the active director and of the backup (whose own refresh
    /// sends the records it was given back), and the capture's frames and bytes (None if not
    /// seen).
    refresh: Option<(u64, u64, SyncFrames)>,
    /// The same for the refresh after that (None: no such traffic within a refresh period and
    /// 5 s: the step's flows, silent since, were not sent again).
    second_refresh: Option<(u64, u64, SyncFrames)>,
    /// Whether the second refresh was looked for, and if it was not seen, the state datagrams
    /// of each side during the watch.
    second_watched: bool,
    second_quiet: (u64, u64),
}

/// Runs one load step of `rate` flows a second for `secs` on a pair, measuring from the start
/// of the load to a second after its end (both daemons' CPU, the active one's sync traffic).
fn load_step(lab: &Lab, directors: &Directors, ports: &mut Ports, rate: u32, secs: u64, synced: bool, started: Instant) -> Result<Step> {
    let vip = SocketAddrV4::new(lab.vip4(), UDP_PORT);
    let count = rate * secs as u32;
    let first_port = ports.take(count)?;
    let capture = Capture::start_with_limits(lab.director_ns(0), "eth0", 1_000_000, Duration::from_secs(300))?;
    let before = counters(directors)?;
    let (sent, send_failed, took) = send_flows(lab, vip, first_port, rate, count)?;
    interrupt::sleep(Duration::from_secs(1))?;
    let after = counters(directors)?;
    let end = Instant::now();
    let frames = sync_frames(&capture.stop());
    let status = directors.gateway(0).status()?;
    let in_flight_after = peer(&status).map_or(0, |p| p.in_flight);
    let window_s = since(after.at.unwrap_or(end), before.at.unwrap_or(end)) / 1e3;
    let mut step = Step {
        rate,
        sent,
        send_failed,
        send_s: took.as_secs_f64(),
        window_s,
        recorded: after.new_flows - before.new_flows,
        cpu0_ms: after.cpu0_ms - before.cpu0_ms,
        cpu1_ms: after.cpu1_ms - before.cpu1_ms,
        datagrams: after.sent - before.sent,
        resent: after.resent - before.resent,
        lost: after.lost - before.lost,
        received1: after.received1 - before.received1,
        backup_datagrams: after.sent1 - before.sent1,
        frames,
        in_flight_after,
        refresh_possible: synced && end > started + REFRESH_PERIOD,
        refresh: None,
        second_refresh: None,
        second_watched: false,
        second_quiet: (0, 0),
    };
    if synced {
        step.refresh = next_refresh(lab, directors, &after, step.recorded, end + REFRESH_PERIOD + Duration::from_secs(5))?;
        if step.refresh.is_some() {
            let now = counters(directors)?;
            step.second_watched = true;
            step.second_refresh =
                next_refresh(lab, directors, &now, step.recorded, Instant::now() + REFRESH_PERIOD + Duration::from_secs(5))?;
            let end = counters(directors)?;
            step.second_quiet = (end.sent - now.sent, end.sent1 - now.sent1);
        }
    }
    Ok(step)
}

/// Waits (until `deadline`) for the periodic read of the table that sends the step's flows
/// again: with no load, state datagrams go out only for it (hellos and acks are not counted),
/// so the two directors' `sent` grow by half the full datagrams the step's records fill or
/// more. Then waits until
/// it is acknowledged. Returns the datagrams and frames from `after` to then.
fn next_refresh(lab: &Lab, directors: &Directors, after: &Counters, recorded: u64, deadline: Instant) -> Result<Option<(u64, u64, SyncFrames)>> {
    let capture = Capture::start_with_limits(lab.director_ns(0), "eth0", 1_000_000, Duration::from_secs(300))?;
    let threshold = (recorded / mim_lb::sync::wire::RECORDS_PER_DATAGRAM as u64 / 2).max(2);
    loop {
        interrupt::sleep(Duration::from_millis(250))?;
        let now = counters(directors)?;
        if (now.sent - after.sent) + (now.sent1 - after.sent1) >= threshold {
            break;
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
    }
    // Acknowledged (in flight back to 0) and 3 s without a state datagram from either side:
    // the backup started a second or two after the active director, and so does its refresh,
    // which sends the records it was given back.
    let settle_deadline = Instant::now() + PHASE_LIMIT;
    let mut quiet_since = None;
    let mut last = (0, 0);
    loop {
        interrupt::sleep(Duration::from_millis(250))?;
        let now = counters(directors)?;
        let s = directors.gateway(0).status()?;
        let idle = peer(&s).is_some_and(|p| p.in_flight == 0);
        if (now.sent, now.sent1) != last {
            quiet_since = None;
        }
        last = (now.sent, now.sent1);
        let quiet = *quiet_since.get_or_insert(Instant::now());
        if (idle && quiet.elapsed() >= Duration::from_secs(3)) || Instant::now() > settle_deadline {
            break;
        }
    }
    let end = counters(directors)?;
    let frames = sync_frames(&capture.stop());
    Ok(Some((end.sent - after.sent, end.sent1 - after.sent1, frames)))
}

// ---------------------------------------------------------------------------------------------
// The round trip between the directors

/// `ping -c 20 -i 0.05` from director 0 to director 1: (min, avg, max) ms.
fn ping_rtt(lab: &Lab) -> Result<(f64, f64, f64)> {
    let out = lab.run_in(lab.director_ns(0), "ping", &["-n", "-q", "-c", "20", "-i", "0.05", "-W", "1", &lab.director_addr4(1).to_string()])?;
    let line = out.lines().find(|l| l.contains("min/avg/max")).with_context(|| format!("no rtt line in ping's output:\n{out}"))?;
    let numbers: Vec<f64> = line
        .split('=')
        .nth(1)
        .context("an unexpected rtt line")?
        .trim()
        .trim_end_matches("ms")
        .split('/')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if numbers.len() < 3 {
        bail!("an unexpected rtt line: {line}");
    }
    Ok((numbers[0], numbers[1], numbers[2]))
}

/// Round trips of a UDP datagram from a socket in director 0's namespace to an echo socket
/// in director 1's and back, both in user space as the sync is: `n` samples (ms).
fn udp_echo_rtts(lab: &Lab, n: usize) -> Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let at = SocketAddrV4::new(lab.director_addr4(1), ECHO_PORT);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    let stop_t = Arc::clone(&stop);
    let echo = spawn_in_netns(lab.director_ns(1), "bench-echo", move || {
        let socket = match UdpSocket::bind(at) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.into()));
                return;
            }
        };
        let _ = socket.set_read_timeout(Some(Duration::from_millis(50)));
        let _ = tx.send(Ok(()));
        let mut buf = [0u8; 64];
        while !stop_t.load(Ordering::Relaxed) {
            if let Ok((len, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..len], from);
            }
        }
    })?;
    struct Stop(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
            if let Some(h) = self.1.take() {
                let _ = h.join();
            }
        }
    }
    let _stop = Stop(stop, Some(echo));
    rx.recv().context("the echo thread died")??;
    let from = SocketAddrV4::new(lab.director_addr4(0), 0);
    mim_lb_tests::in_netns(lab.director_ns(0), move || -> Result<Vec<f64>> {
        let socket = UdpSocket::bind(from)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        for k in 0..n * 2 {
            if rtts.len() == n || interrupt::interrupted() {
                break;
            }
            let probe = (k as u64).to_be_bytes();
            let sent = Instant::now();
            socket.send_to(&probe, at)?;
            // An answer to an earlier, timed-out probe is skipped.
            while let Ok((len, _)) = socket.recv_from(&mut buf) {
                if buf[..len] == probe {
                    rtts.push(since(Instant::now(), sent));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(rtts)
    })?
}

// ---------------------------------------------------------------------------------------------
// The lag

struct Lag {
    rate: u32,
    sent: u32,
    /// `lag_ms_last` as sampled (every ~100 ms) while the flows were sent, and the status's
    /// `lag_ms_max` at the end (since the daemon started).
    samples: Vec<f64>,
    max_since_start: Option<f64>,
    status_answer_ms: Vec<f64>,
}

fn lag(lab: &Lab, directors: &Directors, ports: &mut Ports, rate: u32, secs: u64) -> Result<Lag> {
    let vip = SocketAddrV4::new(lab.vip4(), UDP_PORT);
    let count = rate * secs as u32;
    let first_port = ports.take(count)?;
    let sending = Arc::new(AtomicBool::new(true));
    let result = std::thread::scope(|scope| -> Result<Lag> {
        let sending_t = Arc::clone(&sending);
        let sender = scope.spawn(move || {
            let r = send_flows(lab, vip, first_port, rate, count);
            sending_t.store(false, Ordering::Relaxed);
            r
        });
        let mut samples = Vec::new();
        let mut answers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs) + PHASE_LIMIT;
        let mut polled: Result<()> = Ok(());
        while sending.load(Ordering::Relaxed) && Instant::now() < deadline && !interrupt::interrupted() {
            let asked = Instant::now();
            match directors.gateway(0).status() {
                Ok(s) => {
                    answers.push(since(Instant::now(), asked));
                    if let Some(l) = peer(&s).and_then(|p| p.lag_ms_last) {
                        samples.push(l);
                    }
                }
                Err(e) => {
                    polled = Err(e);
                    break;
                }
            }
            std::thread::sleep(LAG_POLL);
        }
        let (sent, _, _) = sender.join().map_err(|_| anyhow::anyhow!("the flow sender panicked"))??;
        polled?;
        let end = directors.gateway(0).status()?;
        Ok(Lag { rate, sent, samples, max_since_start: peer(&end).and_then(|p| p.lag_ms_max), status_answer_ms: answers })
    })?;
    if result.samples.is_empty() {
        bail!("no lag sample: the active director's status never showed one while flows were sent");
    }
    Ok(result)
}

// ---------------------------------------------------------------------------------------------

pub fn measure(settings: &Settings) -> Result<Vec<Section>> {
    let dut = mim_lb_binary();
    if !dut.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p mim-lb-tests --bin mim-lb-dut` (cargo xtask bench does)",
            dut.display()
        );
    }
    let mut sections = Vec::new();
    sections.push(measure_failover(settings)?);
    let (lag_section, load_section) = measure_sync(settings)?;
    sections.push(lag_section);
    sections.push(load_section);
    Ok(sections)
}

/// VRRPv3's master down interval for `advert` and the backup's priority: 3 x advert + skew,
/// skew = (256 - priority) x advert / 256.
fn master_down_ms(advert: Duration, backup_priority: u8) -> (f64, f64) {
    let a = ms(advert);
    let skew = f64::from(256 - u16::from(backup_priority)) * a / 256.0;
    (3.0 * a + skew, skew)
}

fn measure_failover(settings: &Settings) -> Result<Section> {
    let spec = VrrpSpec::default();
    let (mdi, skew) = master_down_ms(spec.advert_int, priority(1));
    let mut rounds = Vec::new();
    for r in 0..settings.rounds {
        interrupt::check()?;
        eprintln!("mim-lb-bench: directors: failover round {} of {} ...", r + 1, settings.rounds);
        rounds.push(failover_round().with_context(|| format!("director failover round {}", r + 1))?);
    }
    let col = |f: &dyn Fn(&FailoverRound) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let mut s = Section::new(
        format!("Director failover ({} rounds)", rounds.len()),
        &["measurement", "min", "median", "max", "median / master down interval"],
    );
    s.method = vec![
        format!(
            "Namespace lab, 3 masters, two directors each running the real daemon (generic XDP) with [sync] and keepalived (VRRPv3, advert_int {:.0} ms, \
             priorities {} and {}, `mim-lb ready` as track script); a new lab each round.",
            ms(spec.advert_int),
            priority(0),
            priority(1)
        ),
        "Traffic from the client to the VIP: 3 long-lived connections per master exchanging a line every 50 ms, and a new connection \
         (connect, read the master's name, close; 900 ms limit) started every 20 ms. After 2 s the active director is killed: SIGKILL to its \
         daemon and keepalived and its link cut (`Directors::kill`, the instant it is off the segment); the traffic runs 2 s past the VIP's move."
            .into(),
        format!(
            "Baseline: VRRP's master down interval for the backup, 3 x advert_int + skew ((256 - {}) x advert_int / 256 = {skew:.1} ms) = {mdi:.1} ms. \
             Goal: the failure window within it plus 1 s.",
            priority(1)
        ),
    ];
    let row = |name: &str, v: &[f64], unit: &str, ratio: bool| {
        vec![
            name.to_string(),
            format!("{:.0}{unit}", min(v)),
            format!("{:.0}{unit}", median(v)),
            format!("{:.0}{unit}", max(v)),
            if ratio { format!("{:.2}x", median(v) / mdi) } else { "-".into() },
        ]
    };
    let vip = col(&|r| r.vip_ms);
    let first = col(&|r| r.first_ms);
    let window = col(&|r| r.window_ms);
    let gap = col(&|r| r.held_gap_ms);
    s.row(row("kill -> director 1 alone holds the VIP (ip addr, ~20 ms polls)", &vip, " ms", true));
    s.row(row("kill -> first new connection answered", &first, " ms", true));
    s.row(row("kill -> start of the last new connection that failed", &col(&|r| r.last_failed_start_ms), " ms", true));
    s.row(row("kill -> end of the last failed new connection", &window, " ms", true));
    s.row(row("longest silence of a long-lived connection", &gap, " ms", true));
    s.row(row("failed new connections", &col(&|r| r.failed as f64), "", false));
    s.row(row("long-lived connections broken", &col(&|r| r.held_broken as f64), "", false));
    for (i, r) in rounds.iter().enumerate() {
        s.notes.push(format!(
            "round {}: VIP moved after {:.0} ms, first new answer {:.0} ms, last failure started {:.0} ms and ended {:.0} ms after the kill ({} failed, {} of them after \
             the first success, {} before the kill, of {} new connections); long-lived: {} held, {} broken, longest silence {:.0} ms",
            i + 1,
            r.vip_ms,
            r.first_ms,
            r.last_failed_start_ms,
            r.window_ms,
            r.failed,
            r.failed_after_recovery,
            r.failed_before_kill,
            r.new_connections,
            r.held,
            r.held_broken,
            r.held_gap_ms
        ));
    }
    let within = rounds.iter().filter(|r| r.window_ms <= mdi + 1000.0).count();
    s.notes.push(format!(
        "{within} of {} rounds had their failure window within the master down interval + 1 s ({:.0} ms). A new connection whose SYN went to the \
         dead director fails only at its 900 ms limit, so the window can end up to 900 ms after the VIP moved; the start of the last \
         failed one shows when new connections began to work.",
        rounds.len(),
        mdi + 1000.0
    ));
    s.json = json!({
        "advert_int_ms": ms(spec.advert_int), "backup_priority": priority(1), "master_down_interval_ms": mdi, "skew_ms": skew,
        "rounds": rounds.iter().map(|r| json!({
            "vip_moved_ms": r.vip_ms, "first_new_answered_ms": r.first_ms, "failure_window_ms": r.window_ms, "last_failed_start_ms": r.last_failed_start_ms,
            "failed": r.failed, "failed_after_recovery": r.failed_after_recovery, "failed_before_kill": r.failed_before_kill,
            "new_connections": r.new_connections, "held": r.held, "held_broken": r.held_broken, "held_longest_gap_ms": r.held_gap_ms,
        })).collect::<Vec<_>>(),
    });
    Ok(s)
}

/// A pair of directors with the UDP service, with or without sync, each on a lab of its own.
struct Pair {
    // Dropped in this order: daemons and keepalived, the key, the lab.
    directors: Directors,
    _key: Option<SyncKey>,
    lab: Lab,
    started: Instant,
    ports: Ports,
}

fn pair(synced: bool) -> Result<Pair> {
    let mut lab = two_director_lab()?;
    let key = if synced { Some(SyncKey::new(&lab)?) } else { None };
    let started = Instant::now();
    let services = [udp_service(&lab)];
    let directors = start_pair(&mut lab, key.as_ref(), &services)?;
    Ok(Pair { directors, _key: key, lab, started, ports: Ports::new() })
}

fn measure_sync(settings: &Settings) -> Result<(Section, Section)> {
    // Every load step in a pair of its own, started just before, so that the step ends before
    // the daemon's first periodic refresh (REFRESH_PERIOD after its start) and the refresh
    // after it can be measured on its own.
    let mut synced_steps = Vec::new();
    let mut plain_steps = Vec::new();
    let mut lag_result = None;
    let mut rtt = None;
    for (k, &rate) in settings.rates.iter().enumerate() {
        interrupt::check()?;
        eprintln!("mim-lb-bench: directors: {rate} new flows/s with sync ...");
        let mut p = pair(true)?;
        let step = load_step(&p.lab, &p.directors, &mut p.ports, rate, settings.load_s, true, p.started)
            .with_context(|| format!("{rate} flows/s with sync"))?;
        synced_steps.push(step);
        if k == 0 {
            eprintln!("mim-lb-bench: directors: sync lag at {} flows/s and the round trip ...", settings.lag_rate);
            let (pmin, pavg, pmax) = ping_rtt(&p.lab)?;
            let echo = udp_echo_rtts(&p.lab, 50)?;
            if echo.is_empty() {
                bail!("no UDP echo came back from director 1");
            }
            rtt = Some(((pmin, pavg, pmax), echo));
            lag_result = Some(lag(&p.lab, &p.directors, &mut p.ports, settings.lag_rate, settings.lag_s)?);
        }
        drop(p);
        interrupt::check()?;
        eprintln!("mim-lb-bench: directors: {rate} new flows/s without sync ...");
        let mut p = pair(false)?;
        plain_steps.push(
            load_step(&p.lab, &p.directors, &mut p.ports, rate, settings.load_s, false, p.started)
                .with_context(|| format!("{rate} flows/s without sync"))?,
        );
    }
    let lag = lag_result.context("no load step ran")?;
    let ((pmin, pavg, pmax), echo) = rtt.context("no round trip measured")?;
    Ok((lag_section(&lag, (pmin, pavg, pmax), &echo), load_section(settings, &synced_steps, &plain_steps)))
}

fn lag_section(lag: &Lag, ping: (f64, f64, f64), echo: &[f64]) -> Section {
    let echo_median = median(echo);
    let mut s = Section::new(
        format!("Flow sync lag ({} new UDP flows/s through the active director)", lag.rate),
        &["measurement", "p50", "p90", "max", "p50 / UDP echo RTT", "p50 / ping RTT"],
    );
    s.method = vec![
        "The pair with [sync] and keepalived, a UDP service (every new flow is recorded and shared; its masters checked by TCP). The client \
         sends one datagram per new flow (its own source port each) to the VIP at a steady rate; the active director's status (control socket) \
         is polled every ~100 ms for its peer's `lag_ms_last`: from a flow's record in the data path to the peer's acknowledgement of the \
         datagram carrying it."
            .into(),
        "Baseline, same lab, same run: the round trip between the directors' namespaces, as a UDP datagram echoed by a user-space socket in \
         director 1 to one in director 0 (50 probes; the sync is user space at both ends too), and `ping -c 20 -i 0.05` (kernel to kernel)."
            .into(),
    ];
    let ratio = |v: f64, base: f64| if base > 0.0 { format!("{:.0}x", v / base) } else { "-".into() };
    s.row(vec![
        "lag_ms_last".into(),
        format!("{:.2} ms", percentile(&lag.samples, 0.5)),
        format!("{:.2} ms", percentile(&lag.samples, 0.9)),
        format!("{:.2} ms", max(&lag.samples)),
        ratio(percentile(&lag.samples, 0.5), echo_median),
        ratio(percentile(&lag.samples, 0.5), ping.1),
    ]);
    s.row(vec![
        "UDP echo round trip (baseline)".into(),
        format!("{:.3} ms", percentile(echo, 0.5)),
        format!("{:.3} ms", percentile(echo, 0.9)),
        format!("{:.3} ms", max(echo)),
        "1x".into(),
        "-".into(),
    ]);
    s.row(vec![
        "ping round trip (baseline; avg as p50)".into(),
        format!("{:.3} ms", ping.1),
        "-".into(),
        format!("{:.3} ms", ping.2),
        "-".into(),
        "1x".into(),
    ]);
    let p50 = percentile(&lag.samples, 0.5);
    s.notes.push(format!(
        "{} samples over {} flows sent; lag_ms_max since the daemon started (including the earlier load step and its refresh): {}; \
         status answered in {:.1} ms median, {:.1} ms max",
        lag.samples.len(),
        lag.sent,
        lag.max_since_start.map_or("-".into(), |m| format!("{m:.1} ms")),
        median(&lag.status_answer_ms),
        max(&lag.status_answer_ms)
    ));
    let tick = kernel_tick_ms();
    s.notes.push(format!(
        "Goal: lag under 10x the round trip: p50 {:.2} ms is {:.0}x the UDP echo's {:.3} ms: {}.",
        p50,
        p50 / echo_median,
        echo_median,
        if p50 <= 10.0 * echo_median { "ok" } else { "MISSED" }
    ));
    s.notes.push(format!(
        "Resolution: the lag starts at the record's `last_seen_ns`, which the data path takes from the coarse kernel clock (updated once a \
         tick: {}), so it reads 0 to one tick longer than the real lag; the daemon's clock is CLOCK_MONOTONIC. A status answer occupies \
         the daemon's event loop (median above), which a record may wait behind; hence polls only every 100 ms.",
        tick.map_or("the kernel's HZ is unknown here".into(), |t| format!("{t:.0} ms on this kernel"))
    ));
    s.json = json!({
        "rate": lag.rate, "flows_sent": lag.sent,
        "lag_ms_samples": lag.samples.len(),
        "lag_ms_p50": percentile(&lag.samples, 0.5), "lag_ms_p90": percentile(&lag.samples, 0.9), "lag_ms_max_sampled": max(&lag.samples),
        "lag_ms_max_since_start": lag.max_since_start,
        "udp_echo_rtt_ms": {"p50": percentile(echo, 0.5), "p90": percentile(echo, 0.9), "max": max(echo), "n": echo.len()},
        "ping_rtt_ms": {"min": ping.0, "avg": ping.1, "max": ping.2},
        "status_answer_ms_median": median(&lag.status_answer_ms),
        "kernel_tick_ms": kernel_tick_ms(),
    });
    s
}

/// One kernel tick (1000 / CONFIG_HZ ms) from /proc/config.gz, if the kernel has it.
fn kernel_tick_ms() -> Option<f64> {
    let out = std::process::Command::new("zcat").arg("/proc/config.gz").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hz: f64 = text.lines().find_map(|l| l.strip_prefix("CONFIG_HZ="))?.trim().parse().ok()?;
    (hz > 0.0).then(|| 1000.0 / hz)
}

fn load_section(settings: &Settings, synced: &[Step], plain: &[Step]) -> Section {
    let mut s = Section::new(
        "Flow sync traffic and CPU per 1,000 new flows/s",
        &[
            "new flows/s",
            "recorded",
            "state datagrams / 1k flows",
            "sync bytes sent / 1k flows",
            "next refresh / 1k flows: datagrams active + backup; bytes out + in",
            "active CPU ms/s, sync / without",
            "ratio",
            "backup CPU ms/s, sync / without",
        ],
    );
    s.method = vec![
        format!(
            "The pair with keepalived and the UDP service; the client sends one datagram per new flow (a raw socket, its own source port each) to \
             the VIP at the given rate for {} s; the window runs from the start of the load to 1 s after its end. Each step on a pair of its own, \
             started just before, once with [sync] and once without (the baseline: same lab, same load).",
            settings.load_s
        ),
        "Recorded: the active director's `new_flows` for the UDP service over the window. State datagrams: its peer's `sent` in its status \
         (records and marks; not hellos, every 250 ms, nor acknowledgements). Sync bytes: every frame from its sync port on its eth0 (a packet \
         capture, which sees the daemon's own traffic, not the frames XDP sends back out), Ethernet header included, hellos and acks included."
            .into(),
        "Next refresh: every record seen since the previous read of the table is sent again with the next periodic read (every 30 s with the \
         default idle timeouts), by the active director (the backup sends none of the records it was given back, unless a packet of the \
         flow passed through it since); measured \
         after the window until both are acknowledged (state datagrams of each side; bytes sent and received on the active director's sync \
         port). CPU: utime + stime of each daemon (all threads, /proc/PID/stat, 10 ms ticks) over \
         the window, per second of it."
            .into(),
    ];
    let per_k = |x: f64, flows: u64| if flows > 0 { x * 1000.0 / flows as f64 } else { f64::NAN };
    for (a, b) in synced.iter().zip(plain) {
        let refresh = match &a.refresh {
            Some((d, d1, f)) => format!(
                "{:.1} + {:.1}; {:.0} B + {:.0} B",
                per_k(*d as f64, a.recorded),
                per_k(*d1 as f64, a.recorded),
                per_k(f.out_bytes as f64, a.recorded),
                per_k(f.back_bytes as f64, a.recorded)
            ),
            None => "not seen".into(),
        };
        let cpu_a = a.cpu0_ms / a.window_s;
        let cpu_b = b.cpu0_ms / b.window_s;
        s.row(vec![
            a.rate.to_string(),
            format!("{} / {}", a.recorded, b.recorded),
            format!("{:.1}", per_k(a.datagrams as f64, a.recorded)),
            format!("{:.0} B ({:.1} frames)", per_k(a.frames.out_bytes as f64, a.recorded), per_k(a.frames.out as f64, a.recorded)),
            refresh,
            format!("{cpu_a:.1} / {cpu_b:.1}"),
            if cpu_b > 0.0 { format!("{:.1}x", cpu_a / cpu_b) } else { "- (no tick without)".into() },
            format!("{:.1} / {:.1}", a.cpu1_ms / a.window_s, b.cpu1_ms / b.window_s),
        ]);
    }
    for (a, b) in synced.iter().zip(plain) {
        s.notes.push(format!(
            "{}/s: sent {} flows in {:.2} s ({} sends failed) with sync, {} without; window {:.2} s / {:.2} s; active daemon CPU {:.0} ms with sync, \
             {:.0} ms without ({:.1} ms per 1,000 recorded flows more); backup daemon {:.0} ms / {:.0} ms; state datagrams {} (resent {}, lost {}), \
             received by the backup {}, in flight after {}, sent by the backup {}; sync frames out {} ({} B), in {} ({} B){}{}{}",
            a.rate,
            a.sent,
            a.send_s,
            a.send_failed,
            b.sent,
            a.window_s,
            b.window_s,
            a.cpu0_ms,
            b.cpu0_ms,
            per_k(a.cpu0_ms - b.cpu0_ms, a.recorded),
            a.cpu1_ms,
            b.cpu1_ms,
            a.datagrams,
            a.resent,
            a.lost,
            a.received1,
            a.in_flight_after,
            a.backup_datagrams,
            a.frames.out,
            a.frames.out_bytes,
            a.frames.back,
            a.frames.back_bytes,
            match &a.refresh {
                Some((d, d1, f)) => format!(
                    "; next refresh: {d} state datagrams from the active director, {d1} from the backup; frames out {} ({} B), in {} ({} B)",
                    f.out, f.out_bytes, f.back, f.back_bytes
                ),
                None => "; the next refresh was not seen".into(),
            },
            match (&a.second_refresh, a.second_watched) {
                (Some((d, d1, _)), _) => format!("; the refresh after it: {d} state datagrams from the active director, {d1} from the backup"),
                (None, true) => format!(
                    "; the refresh after it: not seen, {} state datagrams from the active director and {} from the backup in the {} s after the \
                     first (the flows, silent since, were not sent again)",
                    a.second_quiet.0,
                    a.second_quiet.1,
                    REFRESH_PERIOD.as_secs() + 5
                ),
                (None, false) => String::new(),
            },
            if a.refresh_possible { "; WARNING: the window ran past the first refresh period, a refresh may be in it" } else { "" },
        ));
        if a.recorded < u64::from(a.sent) * 9 / 10 {
            s.notes.push(format!("{}/s: only {} of {} flows sent were recorded by the active director", a.rate, a.recorded, a.sent));
        }
    }
    s.json = json!({
        "load_s": settings.load_s,
        "steps": synced.iter().zip(plain).map(|(a, b)| json!({
            "rate": a.rate,
            "sync": step_json(a),
            "without_sync": step_json(b),
        })).collect::<Vec<_>>(),
    });
    s
}

fn step_json(a: &Step) -> serde_json::Value {
    json!({
        "sent": a.sent, "send_failed": a.send_failed, "send_s": a.send_s, "window_s": a.window_s, "recorded": a.recorded,
        "active_cpu_ms": a.cpu0_ms, "backup_cpu_ms": a.cpu1_ms,
        "state_datagrams": a.datagrams, "backup_state_datagrams": a.backup_datagrams, "resent": a.resent, "lost": a.lost, "received_by_backup": a.received1,
        "sync_frames_out": a.frames.out, "sync_bytes_out": a.frames.out_bytes, "sync_frames_in": a.frames.back, "sync_bytes_in": a.frames.back_bytes,
        "in_flight_after": a.in_flight_after, "refresh_possibly_in_window": a.refresh_possible,
        "second_refresh_watched": a.second_watched,
        "second_refresh_quiet_state_datagrams": [a.second_quiet.0, a.second_quiet.1],
        "second_refresh": a.second_refresh.as_ref().map(|(d, d1, _)| json!({"state_datagrams": d, "backup_state_datagrams": d1})),
        "next_refresh": a.refresh.as_ref().map(|(d, d1, f)| json!({
            "state_datagrams": d, "backup_state_datagrams": d1,
            "frames_out": f.out, "bytes_out": f.out_bytes, "frames_in": f.back, "bytes_in": f.back_bytes,
        })),
    })
}
