//! A small model of the service mim-lb was built for: a client asks a master for a slave, and
//! the master answers with the address of one of its slave hosts, so that the client's next
//! step goes straight to that slave (not through the VIP).
//!
//! Protocol, one TCP connection per question: the client sends `slave?\n`; the master answers
//! `<master name> slave <ip>:<port>\n`, taking its slaves in turn, and closes. Any other line
//! gets `error unknown request\n`. A connection that sends nothing (a health check) is closed
//! after EOF or [`REQUEST_WINDOW`]. The slaves run the lab's name service, which greets every
//! connection with `<slave name>\n`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What a client sends to ask for a slave.
pub const QUESTION: &str = "slave?";

/// How long a master waits for the question before it closes the connection.
pub const REQUEST_WINDOW: Duration = Duration::from_secs(1);

/// How often a waiting connection looks at the stop flag.
const TICK: Duration = Duration::from_millis(50);

/// Longest line either side accepts.
const MAX_LINE: usize = 256;

/// A master's answer: who answered and where the client goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveOffer {
    pub master: String,
    pub slave: SocketAddr,
}

impl SlaveOffer {
    /// The answer line, without its newline.
    pub fn to_line(&self) -> String {
        format!("{} slave {}", self.master, self.slave)
    }

    /// Parses an answer line (without its newline).
    pub fn parse(line: &str) -> Option<SlaveOffer> {
        let mut words = line.split(' ');
        let master = words.next().filter(|w| !w.is_empty())?;
        if words.next()? != "slave" {
            return None;
        }
        let slave = words.next()?.parse().ok()?;
        words.next().is_none().then(|| SlaveOffer { master: master.to_owned(), slave })
    }
}

/// How one exchange with a master or a slave failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("talking to {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} closed the connection without a full answer")]
    Closed { addr: SocketAddr },
    #[error("{addr} answered {line:?}, which is not an offer of a slave")]
    NotAnOffer { addr: SocketAddr, line: String },
}

impl ExchangeError {
    /// One word for tallies and tables: `refused`, `timeout`, `reset`, `closed`, ...
    pub fn kind(&self) -> &'static str {
        let source = match self {
            ExchangeError::Connect { source, .. } | ExchangeError::Io { source, .. } => source,
            ExchangeError::Closed { .. } => return "closed",
            ExchangeError::NotAnOffer { .. } => return "bad answer",
        };
        match source.kind() {
            ErrorKind::ConnectionRefused => "refused",
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => "reset",
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
            _ => "error",
        }
    }
}

/// Time left until `deadline`, never zero (std rejects zero socket timeouts).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

/// Connects to `addr`, sends `question` (if any) and reads one line, all within `timeout`.
/// Opens its socket in the calling thread's namespace.
fn exchange(addr: SocketAddr, question: Option<&str>, timeout: Duration) -> Result<String, ExchangeError> {
    let deadline = Instant::now() + timeout;
    let io = |source| ExchangeError::Io { addr, source };
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| ExchangeError::Connect { addr, source })?;
    stream.set_nodelay(true).map_err(io)?;
    if let Some(q) = question {
        stream.write_all(format!("{q}\n").as_bytes()).map_err(io)?;
    }
    stream.set_read_timeout(Some(left(deadline))).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE as u64)).read_line(&mut line).map_err(io)?;
    match line.strip_suffix('\n') {
        Some(text) => Ok(text.trim_end_matches('\r').to_owned()),
        None => Err(ExchangeError::Closed { addr }),
    }
}

/// Asks the master behind `addr` (a VIP, usually) for a slave.
pub fn ask_for_slave(addr: SocketAddr, timeout: Duration) -> Result<SlaveOffer, ExchangeError> {
    let line = exchange(addr, Some(QUESTION), timeout)?;
    SlaveOffer::parse(&line).ok_or(ExchangeError::NotAnOffer { addr, line })
}

/// Connects to a slave and returns the name it greets with.
pub fn greet_slave(addr: SocketAddr, timeout: Duration) -> Result<String, ExchangeError> {
    exchange(addr, None, timeout)
}

/// The server side: one master's answers. Shared by the connections of one master.
#[derive(Debug)]
pub struct MasterService {
    name: String,
    slaves: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl MasterService {
    /// A master called `name` that hands out `slaves` in turn (an empty list is allowed: every
    /// question then gets an error line).
    pub fn new(name: String, slaves: Vec<SocketAddr>) -> MasterService {
        MasterService { name, slaves, next: AtomicUsize::new(0) }
    }

    /// The answer line to one request line (both without newline).
    pub fn answer(&self, request: &str) -> String {
        if request != QUESTION {
            return "error unknown request".to_owned();
        }
        if self.slaves.is_empty() {
            return "error no slaves".to_owned();
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.slaves.len();
        SlaveOffer { master: self.name.clone(), slave: self.slaves[k] }.to_line()
    }

    /// Serves one accepted connection: waits for the question, answers, closes.
    pub fn serve(&self, mut stream: TcpStream, stop: &AtomicBool) {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(TICK));
        let give_up = Instant::now() + REQUEST_WINDOW;
        let mut pending = Vec::new();
        let mut buf = [0u8; MAX_LINE];
        while !stop.load(Ordering::Relaxed) && pending.len() <= MAX_LINE {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= give_up {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
            if let Some(end) = pending.iter().position(|b| *b == b'\n') {
                // A killed service answers nothing from the moment of the kill, even if its
                // threads take a tick to notice: so no answer comes from a request that
                // started after it (the demo counts on that).
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let request = String::from_utf8_lossy(&pending[..end]);
                let answer = self.answer(request.trim_end_matches('\r'));
                let _ = stream.write_all(format!("{answer}\n").as_bytes());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn offers_round_trip_through_their_line() {
        let offer = SlaveOffer { master: "master-2".into(), slave: addr("10.1.2.201:9000") };
        assert_eq!(offer.to_line(), "master-2 slave 10.1.2.201:9000");
        assert_eq!(SlaveOffer::parse(&offer.to_line()), Some(offer));
    }

    #[test]
    fn anything_else_is_not_an_offer() {
        for line in [
            "",
            "master-1",
            "master-1 slave",
            "master-1 slave nowhere",
            "master-1 host 10.0.0.1:1",
            "master-1 slave 10.0.0.1:1 extra",
            " slave 10.0.0.1:1",
        ] {
            assert_eq!(SlaveOffer::parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn a_master_hands_out_its_slaves_in_turn() {
        let slaves = vec![addr("10.0.0.201:9000"), addr("10.0.0.202:9000")];
        let m = MasterService::new("master-3".into(), slaves);
        assert_eq!(m.answer("slave?"), "master-3 slave 10.0.0.201:9000");
        assert_eq!(m.answer("slave?"), "master-3 slave 10.0.0.202:9000");
        assert_eq!(m.answer("slave?"), "master-3 slave 10.0.0.201:9000");
        assert_eq!(m.answer("hello"), "error unknown request");
        assert_eq!(MasterService::new("m".into(), vec![]).answer("slave?"), "error no slaves");
    }
}
