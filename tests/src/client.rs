//! Client side of the masters' services. These open sockets in the calling thread's network
//! namespace: call them inside [`crate::in_netns`] (e.g. with the lab's client namespace).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Time left until `deadline`, never zero (std rejects zero socket timeouts).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn read_line(reader: &mut BufReader<TcpStream>, deadline: Instant) -> Result<String> {
    reader.get_ref().set_read_timeout(Some(left(deadline)))?;
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    if n == 0 || !line.ends_with('\n') {
        bail!("connection closed before a full line (got {line:?})");
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Connects to a master service, reads the name line it sends, and closes. The whole exchange
/// must finish within `timeout`.
pub fn tcp_ask(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    let mut reader = BufReader::new(stream);
    read_line(&mut reader, deadline).with_context(|| format!("reading the name from {addr}"))
}

/// Like [`tcp_ask`], from a chosen local port (to know a connection's 5-tuple in advance).
pub fn tcp_ask_from(addr: SocketAddr, local_port: u16, timeout: Duration) -> Result<String> {
    ask_from(addr, local_port, timeout, false)
}

/// Like [`tcp_ask_from`], closing with a reset (SO_LINGER 0) instead of a FIN, so the port
/// leaves no TIME_WAIT behind and the same connection (same addresses and ports) can be made
/// again at once: what busy clients that cycle through their ports do.
pub fn tcp_ask_from_then_reset(addr: SocketAddr, local_port: u16, timeout: Duration) -> Result<String> {
    ask_from(addr, local_port, timeout, true)
}

fn ask_from(addr: SocketAddr, local_port: u16, timeout: Duration, reset: bool) -> Result<String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket, sockopt};
    use std::os::fd::AsRawFd as _;
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reset {
        setsockopt(&fd, sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 })?;
    }
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, local_port).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, local_port).into(),
    };
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local)).with_context(|| format!("binding {local}"))?;
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    connect(stream.as_raw_fd(), &SockaddrStorage::from(addr))
        .with_context(|| format!("connecting to {addr} from port {local_port}"))?;
    let deadline = Instant::now() + timeout;
    let mut reader = BufReader::new(stream);
    read_line(&mut reader, deadline).with_context(|| format!("reading the name from {addr} (port {local_port})"))
}

/// [`tcp_ask`] `count` times in a row, each on a new connection (and so a new source port).
pub fn tcp_ask_many(addr: SocketAddr, count: usize, timeout: Duration) -> Result<Vec<String>> {
    (0..count)
        .map(|i| tcp_ask(addr, timeout).with_context(|| format!("connection {} of {count}", i + 1)))
        .collect()
}

/// Sends one datagram to `addr` from `local_port` (any port if `None`) and returns the answer.
/// The socket is connected, so only an answer from `addr` itself counts.
pub fn udp_ask(addr: SocketAddr, local_port: Option<u16>, timeout: Duration) -> Result<String> {
    udp_ask_with(addr, local_port, b"who?\n", timeout)
}

/// [`udp_ask`] with a request of the caller's: one larger than the path MTU leaves the client
/// in fragments.
pub fn udp_ask_with(addr: SocketAddr, local_port: Option<u16>, request: &[u8], timeout: Duration) -> Result<String> {
    let local: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let local = SocketAddr::new(local, local_port.unwrap_or(0));
    let socket = UdpSocket::bind(local).with_context(|| format!("binding UDP {local}"))?;
    socket.connect(addr).with_context(|| format!("connecting UDP to {addr}"))?;
    socket.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    socket.send(request).with_context(|| format!("sending to {addr}"))?;
    let mut buf = [0u8; 1500];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("waiting {timeout:?} for an answer from {addr}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

/// A long-lived connection to a master service: created with `hold`, so the server keeps it
/// open and echoes lines. The socket stays in the namespace it was opened in, so a `TcpHold`
/// made inside [`crate::in_netns`] can be returned and used from any thread.
#[derive(Debug)]
pub struct TcpHold {
    name: String,
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TcpHold {
    /// Connects, reads the master's name and asks it to hold the connection.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpHold> {
        let deadline = Instant::now() + timeout;
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let name = read_line(&mut reader, deadline)
            .with_context(|| format!("reading the name from {addr}"))?;
        writer.write_all(b"hold\n").with_context(|| format!("asking {addr} to hold"))?;
        Ok(TcpHold { name, addr, reader, writer })
    }

    /// The master that answered.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The local (client) address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }

    /// Segments this side has retransmitted over the connection's life (TCP_INFO
    /// `tcpi_total_retrans`): a segment the gateway dropped or passed to its own kernel is
    /// retransmitted, so a count that stays put proves none was lost, which an echo that
    /// waits longer than the retransmission timeout cannot.
    pub fn retransmits(&self) -> Result<u32> {
        use std::os::fd::AsRawFd as _;
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is a writable tcp_info of `len` bytes; the fd is open (owned by self).
        let rc = unsafe {
            libc::getsockopt(
                self.writer.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("getsockopt(TCP_INFO)");
        }
        Ok(info.tcpi_total_retrans)
    }

    /// Sends `line` and waits for its echo; fails if the echo differs, so a connection that was
    /// moved to another master (which would answer with a reset) shows up as an error.
    pub fn echo(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("sending on the held connection to {}", self.addr))?;
        let got = read_line(&mut self.reader, deadline)
            .with_context(|| format!("reading the echo from {}", self.addr))?;
        if got != line {
            bail!("{} echoed {got:?} instead of {line:?}", self.addr);
        }
        Ok(())
    }
}

/// One line on each held connection, echoed within `timeout`; panics (failing the test) naming
/// the connection and the round if one broke.
pub fn echo_all(held: &mut [TcpHold], round: &str, timeout: Duration) {
    for (k, conn) in held.iter_mut().enumerate() {
        conn.echo(&format!("{round} {k}"), timeout)
            .unwrap_or_else(|e| panic!("{round}: held connection {k} to {} broke: {e:#}", conn.name()));
    }
}

/// How many times each name occurs.
pub fn count_names(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

/// Each name's share of `names` in whole percent (rounded to nearest), e.g. to check that a
/// balancer spreads connections evenly. Empty input gives an empty map.
pub fn percent_spread(names: &[String]) -> BTreeMap<String, usize> {
    let total = names.len();
    count_names(names)
        .into_iter()
        .map(|(name, count)| (name, (count * 100 + total / 2) / total))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_rounds_to_whole_percent() {
        let names: Vec<String> = ["a", "a", "b"].iter().map(|s| s.to_string()).collect();
        let spread = percent_spread(&names);
        assert_eq!(spread["a"], 67);
        assert_eq!(spread["b"], 33);
        assert!(percent_spread(&[]).is_empty());
    }
}
