//! The metrics port answers anyone who can reach it, without authentication. Whatever a peer
//! does there must not cost the daemon the file descriptors its health checks, its control
//! socket and its neighbour watch need, nor hold the endpoint forever.
//!
//! The numbers below are the ones OPERATIONS.md gives for the endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec, in_netns, tcp_ask,
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
const METRICS: &str = "127.0.0.1:9469";
const T: Duration = Duration::from_secs(3);

/// Metrics connections the daemon serves at once; it closes the ones beyond.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request headers, from its opening or from the
/// end of the previous answer.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a metrics connection lives, whatever it does.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// Slack for scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn start(lab: &mut Lab, soft: u64, hard: u64) -> Gateway {
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(lab, &[ServiceSpec::tcp(lab, PORT)], &format!("metrics_listen = \"{METRICS}\""));
    let gw = Gateway::start_with_nofile(lab, &config, Mode::Generic, soft, hard).unwrap();
    gw.wait_all_up().unwrap();
    gw
}

/// (soft, hard) RLIMIT_NOFILE of a process, as the kernel reports it.
fn open_file_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_else(|| panic!("{limits}"));
    let mut values = line["Max open files".len()..].split_whitespace().map(|v| v.parse::<u64>().unwrap());
    (values.next().unwrap(), values.next().unwrap())
}

/// The test process holds the client end of every connection it opens.
fn raise_own_file_limit(need: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit of this process with a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        assert!(limit.rlim_max >= need, "this test needs {need} open files; the hard limit is {}", limit.rlim_max);
        if limit.rlim_cur < need {
            limit.rlim_cur = limit.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

/// Whether the daemon has closed (FIN or RST) its end, found without reading anything.
fn closed_by_daemon(stream: &TcpStream) -> bool {
    let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one pollfd for a socket the caller holds open; zero timeout.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Reads one HTTP response with a Content-Length from `stream`, leaving the connection open.
fn read_response(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "no end of headers in {:?}", String::from_utf8_lossy(&head));
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

/// More idle connections than the daemon may have files: before the bound, accepting them
/// took every descriptor, every health check failed with "too many open files" and every
/// master went down. The soft and hard limits are equal, so that raising the soft limit
/// cannot be what saves the daemon.
#[test]
fn idle_metrics_connections_beyond_the_file_limit_leave_health_checks_and_forwarding_alone() {
    const NOFILE: u64 = 512;
    const FLOOD: usize = 700;
    const HOLD: Duration = Duration::from_secs(3);
    raise_own_file_limit(FLOOD as u64 + 512);
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    let gw = start(&mut lab, NOFILE, NOFILE);
    assert_eq!(open_file_limit(gw.proc().pid()), (NOFILE, NOFILE), "the daemon runs with another file limit");
    gw.proc().wait_for_line("open files limit: 512 (the hard limit)", Duration::ZERO).unwrap();
    let metrics: SocketAddr = METRICS.parse().unwrap();

    let mark = gw.proc().line_count();
    // The kernel completes connections the daemon has not accepted yet, up to the listen
    // backlog (128); a daemon that stops accepting lets the next connect time out.
    let flood: Vec<TcpStream> = in_netns(lab.gateway_ns(), || {
        (0..FLOOD).map_while(|_| TcpStream::connect_timeout(&metrics, T).ok()).collect()
    })
    .unwrap();
    let opened = Instant::now();
    assert!(flood.len() as u64 > NOFILE, "only {} connections to the metrics port were made", flood.len());
    // Those beyond the bound are closed as soon as they are accepted (asserted below, after
    // what matters most).
    let open = || flood.iter().filter(|s| !closed_by_daemon(s)).count();
    let mut open_at_first = open();
    while open_at_first > MAX_CONNECTIONS && opened.elapsed() < SLACK {
        std::thread::sleep(Duration::from_millis(50));
        open_at_first = open();
    }

    // Health checks run every 100 ms and two failures mark a master down: the hold spans
    // thirty checks of each master.
    if let Ok(line) = gw.proc().wait_for_line_since(mark, "(was up)", HOLD) {
        panic!("a master went down while {} idle connections were open to the metrics port: {line}", flood.len());
    }
    assert!(gw.proc().try_exit_status().unwrap().is_none(), "the daemon ended:\n{}", gw.proc().tail(30));
    let status = gw.query_status().unwrap();
    for b in status.services.iter().flat_map(|s| &s.backends) {
        assert_eq!(b.state, "up", "backend {} during the flood: {}", b.address, b.reason);
    }
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let name = in_netns(lab.client_ns(), || tcp_ask(vip, T)).unwrap().unwrap();
    assert!(lab.master_index(&name).is_some(), "the VIP answered {name:?}");
    assert!(open_at_first <= MAX_CONNECTIONS, "{open_at_first} of {} idle metrics connections open", flood.len());
    let refusals = gw.proc().lines()[mark..].iter().filter(|l| l.contains("connections open already")).count();
    assert_eq!(refusals, 1, "lines saying that new metrics connections are closed");

    // The others are closed by the header timeout.
    let deadline = opened + HEADER_TIMEOUT + SLACK;
    while open() > 0 {
        assert!(Instant::now() < deadline, "idle metrics connections still open {:?} after they were made", opened.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(flood);

    // The endpoint works again, and an idle keep-alive connection is closed like a new one.
    let mut scrape = in_netns(lab.gateway_ns(), || TcpStream::connect_timeout(&metrics, T).unwrap()).unwrap();
    scrape.set_read_timeout(Some(T)).unwrap();
    scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let answer = read_response(&mut scrape);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("mim_lb_backend_state{"), "{answer}");
    let answered = Instant::now();
    while !closed_by_daemon(&scrape) {
        assert!(answered.elapsed() < HEADER_TIMEOUT + SLACK, "an idle keep-alive connection stayed open");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(500), "closed after {:?}", answered.elapsed());
}

/// A scraper that asks and never reads the answers holds its connection only until the
/// deadline: many pipelined requests fill the socket buffers, so the daemon's writes stall.
#[test]
fn a_metrics_connection_that_never_reads_is_cut_at_the_deadline() {
    const REQUESTS: usize = 5000;
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    let gw = start(&mut lab, 1024, 1024);
    let metrics: SocketAddr = METRICS.parse().unwrap();
    let mut stream = in_netns(lab.gateway_ns(), || TcpStream::connect_timeout(&metrics, T).unwrap()).unwrap();
    let opened = Instant::now();
    // Once the daemon's writes stall it may stop reading too: send what it takes.
    stream.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut sent = 0;
    while sent < REQUESTS && stream.write_all(request).is_ok() {
        sent += 1;
    }

    std::thread::sleep((CONNECTION_DEADLINE + SLACK).saturating_sub(opened.elapsed()));
    // Cut off, the connection ends after what was already queued; alive, it would deliver
    // every answer and then wait for the next request.
    stream.set_read_timeout(Some(T)).unwrap();
    let mut received = Vec::new();
    let ended = loop {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
        assert!(received.len() < 1 << 30, "more than 1 GiB of answers");
    };
    let answers = String::from_utf8_lossy(&received).matches("HTTP/1.1 200").count();
    assert!(ended, "the connection was still open {:?} after it was made ({answers} answers read)", opened.elapsed());
    assert!(answers < sent, "all {sent} pipelined requests were answered: the writes never stalled");
    assert!(gw.proc().try_exit_status().unwrap().is_none());
}

/// The unit's LimitNOFILE is the hard limit; the daemon takes all of it, whatever soft limit
/// it was started with.
#[test]
fn the_daemon_raises_its_soft_file_limit_to_the_hard_limit() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    let gw = start(&mut lab, 256, 4096);
    assert_eq!(open_file_limit(gw.proc().pid()), (4096, 4096));
    gw.proc().wait_for_line("open files limit raised from 256 to 4096 (the hard limit)", Duration::ZERO).unwrap();
}
