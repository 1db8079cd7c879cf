//! The masters' TCP and UDP services, run as threads of the test process inside each master's
//! namespace.
//!
//! TCP protocol: on accept the server writes `<name>\n`. If the client's first line is `hold`,
//! the connection stays open and every further line is echoed back; on EOF, any other first
//! line, or no line within [`HOLD_WINDOW`], the server closes. UDP: every datagram is answered
//! with `<name>`, sent from the address it was sent to (so answers to the VIP come from the VIP).

use std::io::{ErrorKind, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::cmsg_space;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    SockaddrIn, SockaddrIn6, SockaddrStorage, bind, listen, recvmsg, sendmsg, setsockopt, socket,
    sockopt,
};

use crate::netns::spawn_in_netns;

/// How long a connection that has not asked to `hold` may stay silent before the server closes.
pub const HOLD_WINDOW: Duration = Duration::from_secs(2);

/// How often blocked server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(50);

/// Connections one server handles at once; more are closed right after accept.
const MAX_CONCURRENT: u64 = 1024;

/// Longest line a held connection may send; a longer one closes it.
const MAX_LINE: usize = 64 * 1024;

/// What one master's servers have done so far.
#[derive(Debug, Default)]
pub struct ServeCounters {
    /// TCP connections accepted.
    pub tcp_accepted: AtomicU64,
    /// TCP connections accepted, by the local address they were made to (a VIP, or the
    /// master's own address for health checks and direct tests).
    pub tcp_accepted_to: std::sync::Mutex<std::collections::BTreeMap<IpAddr, u64>>,
    /// TCP connections open right now.
    pub tcp_open: AtomicU64,
    /// UDP datagrams answered.
    pub udp_answered: AtomicU64,
}

/// A copy of [`ServeCounters`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Served {
    pub tcp_accepted: u64,
    pub tcp_accepted_to: std::collections::BTreeMap<IpAddr, u64>,
    pub tcp_open: u64,
    pub udp_answered: u64,
}

impl ServeCounters {
    pub fn snapshot(&self) -> Served {
        Served {
            tcp_accepted: self.tcp_accepted.load(Ordering::Relaxed),
            tcp_accepted_to: self.tcp_accepted_to.lock().map(|m| m.clone()).unwrap_or_default(),
            tcp_open: self.tcp_open.load(Ordering::Relaxed),
            udp_answered: self.udp_answered.load(Ordering::Relaxed),
        }
    }
}

/// A running server thread; [`Server::stop`] or drop ends it and its connections.
#[derive(Debug)]
pub(crate) struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub(crate) fn stop(&mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a server thread in `ns`; returns once its sockets are bound (so clients may connect
/// right away) or with the bind error.
fn start_in(
    ns: &str,
    thread_name: &str,
    setup: impl FnOnce() -> Result<Box<dyn FnOnce(Arc<AtomicBool>) + Send>> + Send + 'static,
) -> Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    let stop_for_thread = Arc::clone(&stop);
    let thread = spawn_in_netns(ns, thread_name, move || match setup() {
        Ok(serve) => {
            let _ = tx.send(Ok(()));
            serve(stop_for_thread);
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    })?;
    let mut server = Server { stop, thread: Some(thread) };
    match rx.recv() {
        Ok(Ok(())) => Ok(server),
        Ok(Err(e)) => {
            server.stop();
            Err(e.context(format!("starting a server in {ns}")))
        }
        Err(_) => {
            server.stop();
            Err(anyhow::anyhow!("server thread in {ns} died during setup"))
        }
    }
}

/// A listening socket on `[::]:port` that also takes IPv4 (falls back to `0.0.0.0` when the
/// kernel has no IPv6). The backlog is large because tests open bursts of connections.
fn tcp_listener(port: u16) -> Result<TcpListener> {
    let (fd, addr): (OwnedFd, SocketAddr) =
        match socket(AddressFamily::Inet6, SockType::Stream, SockFlag::SOCK_CLOEXEC, None) {
            Ok(fd) => {
                setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
                (fd, (Ipv6Addr::UNSPECIFIED, port).into())
            }
            Err(_) => {
                let fd =
                    socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                (fd, (Ipv4Addr::UNSPECIFIED, port).into())
            }
        };
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .with_context(|| format!("binding TCP {addr}"))?;
    listen(&fd, Backlog::new(4096)?)?;
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Waits up to [`TICK`] for `fds` to become readable; returns which are.
fn wait_readable(fds: &[&impl AsFd]) -> Vec<bool> {
    let mut polls: Vec<PollFd> =
        fds.iter().map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN)).collect();
    let timeout = PollTimeout::try_from(TICK.as_millis() as i32).unwrap_or(PollTimeout::NONE);
    match poll(&mut polls, timeout) {
        Ok(n) if n > 0 => polls
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect(),
        _ => vec![false; fds.len()],
    }
}

pub(crate) fn start_tcp(
    ns: &str,
    name: String,
    port: u16,
    counters: Arc<ServeCounters>,
) -> Result<Server> {
    let thread_name = format!("tcp-{port}-{name}");
    start_tcp_with(ns, &thread_name, port, counters, move |stream, stop| {
        serve_tcp_conn(stream, &name, stop)
    })
}

/// What a TCP service does with one accepted connection; it runs on a thread of its own and
/// should return soon after `stop` is set.
pub(crate) type ConnHandler = dyn Fn(TcpStream, &AtomicBool) + Send + Sync;

/// Starts a TCP service on `[::]:port` in `ns` that runs `handler` for every connection, at
/// most [`MAX_CONCURRENT`] at once. The accept loop is shared by every service of the lab.
pub(crate) fn start_tcp_with(
    ns: &str,
    thread_name: &str,
    port: u16,
    counters: Arc<ServeCounters>,
    handler: impl Fn(TcpStream, &AtomicBool) + Send + Sync + 'static,
) -> Result<Server> {
    let handler: Arc<ConnHandler> = Arc::new(handler);
    start_in(ns, thread_name, move || {
        let listener = tcp_listener(port)?;
        Ok(Box::new(move |stop: Arc<AtomicBool>| {
            serve_tcp(listener, &handler, &stop, &counters)
        }))
    })
}

fn serve_tcp(
    listener: TcpListener,
    handler: &Arc<ConnHandler>,
    stop: &Arc<AtomicBool>,
    counters: &Arc<ServeCounters>,
) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        conns.retain(|c| !c.is_finished());
        if !wait_readable(&[&listener])[0] {
            continue;
        }
        // Drain the accept queue: bursts of connects arrive faster than one per tick.
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            };
            counters.tcp_accepted.fetch_add(1, Ordering::Relaxed);
            if let (Ok(local), Ok(mut to)) = (stream.local_addr(), counters.tcp_accepted_to.lock()) {
                // IPv4 on the dual-stack listener shows up as ::ffff:a.b.c.d.
                let ip = match local.ip() {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    v4 => v4,
                };
                *to.entry(ip).or_default() += 1;
            }
            if counters.tcp_open.load(Ordering::Relaxed) >= MAX_CONCURRENT {
                continue;
            }
            counters.tcp_open.fetch_add(1, Ordering::Relaxed);
            let (handler, stop, conn_counters) =
                (Arc::clone(handler), Arc::clone(stop), Arc::clone(counters));
            let spawned = thread::Builder::new().name("tcp-conn".into()).spawn(move || {
                let _ = stream.set_nonblocking(false);
                handler(stream, &stop);
                conn_counters.tcp_open.fetch_sub(1, Ordering::Relaxed);
            });
            match spawned {
                Ok(handle) => conns.push(handle),
                Err(_) => {
                    counters.tcp_open.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
    for conn in conns {
        let _ = conn.join();
    }
}

fn serve_tcp_conn(mut stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(TICK));
    let give_up = Instant::now() + HOLD_WINDOW;
    let mut holding = false;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if !holding && Instant::now() >= give_up {
                    break;
                }
                continue;
            }
            Err(_) => break,
        }
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            if holding {
                if stream.write_all(format!("{text}\n").as_bytes()).is_err() {
                    return;
                }
            } else if text == "hold" {
                holding = true;
            } else {
                return;
            }
        }
        if pending.len() > MAX_LINE {
            return;
        }
    }
}

/// An HTTP health endpoint: every request gets `200 ok` while `healthy` is set and `503 fail`
/// otherwise, whatever its path, then the connection closes. The TCP port itself keeps
/// accepting either way, which is what an http check must see through.
pub(crate) fn start_http_health(ns: &str, port: u16, healthy: Arc<AtomicBool>) -> Result<Server> {
    start_in(ns, &format!("http-{port}"), move || {
        let listener = tcp_listener(port)?;
        Ok(Box::new(move |stop: Arc<AtomicBool>| {
            while !stop.load(Ordering::Relaxed) {
                if !wait_readable(&[&listener])[0] {
                    continue;
                }
                while let Ok((stream, _)) = listener.accept() {
                    answer_http(stream, healthy.load(Ordering::Relaxed));
                }
            }
        }))
    })
}

fn answer_http(mut stream: TcpStream, healthy: bool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    // Read the head only; a check sends no body.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_LINE {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if healthy { ("200 OK", "ok") } else { ("503 Service Unavailable", "fail") };
    let _ = stream.write_all(
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    );
}

pub(crate) fn start_udp(
    ns: &str,
    name: String,
    port: u16,
    counters: Arc<ServeCounters>,
) -> Result<Server> {
    start_in(ns, &format!("udp-{port}-{name}"), move || {
        let v4 = udp_socket(AddressFamily::Inet, port)?;
        // No IPv6 in the kernel: serve IPv4 only.
        let v6 = udp_socket(AddressFamily::Inet6, port).ok();
        Ok(Box::new(move |stop: Arc<AtomicBool>| {
            serve_udp(v4, v6, &name, &stop, &counters)
        }))
    })
}

/// One socket per family: each reports the datagram's destination address, which the reply
/// then uses as its source. A wildcard socket would otherwise answer a datagram sent to the
/// VIP from the master's own address, and a connected client would never see it.
fn udp_socket(family: AddressFamily, port: u16) -> Result<OwnedFd> {
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if family == AddressFamily::Inet {
        setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)?;
        let addr = SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        bind(fd.as_raw_fd(), &addr).with_context(|| format!("binding UDP {addr}"))?;
    } else {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true)?;
        let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
        bind(fd.as_raw_fd(), &addr).with_context(|| format!("binding UDP {addr}"))?;
    }
    Ok(fd)
}

fn serve_udp(
    v4: OwnedFd,
    v6: Option<OwnedFd>,
    name: &str,
    stop: &AtomicBool,
    counters: &ServeCounters,
) {
    let mut sockets = vec![v4];
    sockets.extend(v6);
    while !stop.load(Ordering::Relaxed) {
        let refs: Vec<&OwnedFd> = sockets.iter().collect();
        let ready = wait_readable(&refs);
        for (fd, ready) in sockets.iter().zip(ready) {
            if ready {
                let _ = answer_one(fd, name, counters);
            }
        }
    }
}

fn answer_one(fd: &OwnedFd, name: &str, counters: &ServeCounters) -> nix::Result<()> {
    // Room for any datagram, so a large (reassembled) request is read whole.
    let mut buf = vec![0u8; 65536];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = cmsg_space!(libc::in6_pktinfo);
    let msg = recvmsg::<SockaddrStorage>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let Some(peer) = msg.address else {
        return Err(nix::Error::EINVAL);
    };
    let mut local: Option<IpAddr> = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(info) => {
                local = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)).into());
            }
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                local = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr).into());
            }
            _ => {}
        }
    }
    // Counted before sending: a client that got its answer must see it counted.
    counters.udp_answered.fetch_add(1, Ordering::Relaxed);
    let reply = [IoSlice::new(name.as_bytes())];
    match local {
        Some(IpAddr::V4(addr)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr { s_addr: u32::from(addr).to_be() },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsgs = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(fd.as_raw_fd(), &reply, &cmsgs, MsgFlags::empty(), Some(&peer))?;
        }
        Some(IpAddr::V6(addr)) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr { s6_addr: addr.octets() },
                ipi6_ifindex: 0,
            };
            let cmsgs = [ControlMessage::Ipv6PacketInfo(&info)];
            sendmsg(fd.as_raw_fd(), &reply, &cmsgs, MsgFlags::empty(), Some(&peer))?;
        }
        None => {
            sendmsg(fd.as_raw_fd(), &reply, &[], MsgFlags::empty(), Some(&peer))?;
        }
    }
    Ok(())
}
