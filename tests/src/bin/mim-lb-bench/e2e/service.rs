//! The masters' service of the end-to-end benchmark: one request line, one answer, then the
//! master closes (as an HTTP/1.0 server does), so the TIME_WAIT state stays on the masters
//! and the client's ports are free again at once.
//!
//! Requests: `S\n` gets the master's name and a newline (a short answer); `L <bytes>\n` gets
//! that many bytes (at most [`MAX_ANSWER`]); `H\n` holds the connection open until the client
//! closes it. A connection closed before any request (a health check) is simply closed.
//!
//! Our own rather than a Debian web server: it runs on the benchmark's runtime, in the
//! masters' namespaces, with nothing to configure or clean up, and it costs the same under
//! every director, so the no-director run subtracts it. All masters share one thread.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context as _, Result};
use mim_lb_tests::{Lab, in_netns};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

/// The largest answer a request can ask for.
pub const MAX_ANSWER: usize = 1 << 20;
/// Accept queue of each listener: bursts of SYNs at the top of the rate ladder must not be
/// dropped by the masters themselves.
const BACKLOG: i32 = 4096;

static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// The service on every master of a lab, on one port; stopped on drop.
pub struct Masters {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    /// Requests answered, per master.
    served: Vec<Arc<AtomicU64>>,
}

impl Masters {
    pub fn start(lab: &Lab, port: u16) -> Result<Masters> {
        let mut listeners = Vec::new();
        for i in 0..lab.master_count() {
            let listener = in_netns(lab.master_ns(i), || -> Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
                // std listens with a backlog of 128; listen(2) again only raises it.
                // SAFETY: a valid listening socket owned by `l`.
                if unsafe { libc::listen(l.as_raw_fd(), BACKLOG) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .with_context(|| format!("listening on port {port} on master {}", i + 1))?;
            listeners.push((lab.master_name(i), listener));
        }
        let served: Vec<Arc<AtomicU64>> = listeners.iter().map(|_| Arc::default()).collect();
        let (stop, stopped) = watch::channel(false);
        let counters = served.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the masters' runtime")?;
        let thread = std::thread::Builder::new()
            .name("e2e-masters".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut tasks = Vec::new();
                    for ((name, listener), served) in listeners.into_iter().zip(counters) {
                        let stopped = stopped.clone();
                        tasks.push(tokio::spawn(accept_loop(name, listener, served, stopped)));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })
            .context("spawning the masters' thread")?;
        Ok(Masters { stop, thread: Some(thread), served })
    }

    /// Requests answered so far, per master.
    pub fn served(&self) -> Vec<u64> {
        self.served.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

impl Drop for Masters {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(name: String, listener: std::net::TcpListener, served: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    let name: Arc<[u8]> = format!("{name}\n").into_bytes().into();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let name = Arc::clone(&name);
                let served = Arc::clone(&served);
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.changed() => {}
                        _ = serve(stream, &name, &served) => {}
                    }
                });
            }
        }
    }
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Name,
    Bytes(usize),
    Hold,
}

fn parse_request(line: &[u8]) -> Option<Ask> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    match line.split_once(' ') {
        None if line == "S" => Some(Ask::Name),
        None if line == "H" => Some(Ask::Hold),
        Some(("L", n)) => n.parse().ok().filter(|n| *n <= MAX_ANSWER).map(Ask::Bytes),
        _ => None,
    }
}

async fn serve(mut stream: tokio::net::TcpStream, name: &[u8], served: &AtomicU64) {
    let _ = stream.set_nodelay(true);
    let mut line = [0u8; 64];
    let mut len = 0;
    // Requests are one short line; a client that sends more than 64 bytes without a newline
    // is not one of ours.
    while !line[..len].contains(&b'\n') {
        match stream.read(&mut line[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        if len == line.len() {
            return;
        }
    }
    let Some(ask) = parse_request(&line[..len]) else { return };
    served.fetch_add(1, Ordering::Relaxed);
    match ask {
        Ask::Name => {
            let _ = stream.write_all(name).await;
        }
        Ask::Bytes(mut left) => {
            while left > 0 {
                let n = left.min(ZEROES.len());
                if stream.write_all(&ZEROES[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        }
        Ask::Hold => {
            let mut sink = [0u8; 64];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    }
    // Dropping the stream closes it: the master closes first.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_and_bounded() {
        assert_eq!(parse_request(b"S\n"), Some(Ask::Name));
        assert_eq!(parse_request(b"H\r\n"), Some(Ask::Hold));
        assert_eq!(parse_request(b"L 1048576\n"), Some(Ask::Bytes(1 << 20)));
        assert_eq!(parse_request(b"L 1048577\n"), None);
        assert_eq!(parse_request(b"L x\n"), None);
        assert_eq!(parse_request(b"GET / HTTP/1.0\n"), None);
    }
}
