//! The Prometheus endpoint (`metrics_listen`): every scrape asks the event loop for a status
//! snapshot, the same one `mim-lb status` shows, and encodes it with the Prometheus project's
//! own client library. Counters come straight from the per-CPU maps, so they are exact and
//! survive daemon restarts (the maps are pinned).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
};

use crate::{
    control::{protocol, server::Pending},
    status::Status,
    status_page::{self, History},
};

/// The five states a backend can be in, each exported as its own 0/1 series so that a
/// dashboard can sum them and an alert can fire on `mim_lb_backend_state{state="down"} == 1`.
const STATES: [&str; 5] = ["up", "down", "draining", "disabled", "removing"];

/// Encodes `status` in the Prometheus text format (0.0.4).
pub fn render(status: &Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(status.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct StatusCollector(Status);

type Labels = Vec<(&'static str, String)>;

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels, u64)]) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge<N>(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels, N)]) -> std::fmt::Result
where
    N: prometheus_client::encoding::EncodeGaugeValue + Copy + std::fmt::Debug + Send + Sync,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let e = &mut encoder;
        gauge(e, "mim_lb_build_info", "mim-lb version (always 1)", &[(vec![("version", s.version.clone())], 1i64)])?;
        gauge(e, "mim_lb_uptime_seconds", "Seconds since the daemon started", &[(vec![], s.uptime_s)])?;

        let service_labels = |svc: &crate::status::ServiceStatus| -> Labels {
            vec![
                ("service", svc.name.clone()),
                ("vip", svc.vip.to_string()),
                ("port", svc.port.to_string()),
                ("protocol", svc.protocol.clone()),
            ]
        };
        let per_service = |f: fn(&crate::status::ServiceStatus) -> u64| -> Vec<(Labels, u64)> {
            s.services.iter().map(|svc| (service_labels(svc), f(svc))).collect()
        };
        counter(e, "mim_lb_service_packets", "Packets forwarded for the service", &per_service(|x| x.packets))?;
        counter(e, "mim_lb_service_bytes", "Bytes forwarded for the service", &per_service(|x| x.bytes))?;
        counter(e, "mim_lb_service_new_flows", "Flows recorded for the service (TCP SYNs, first UDP datagrams)", &per_service(|x| x.new_flows))?;

        let backends: Vec<(Labels, &crate::status::BackendStatus, u32)> = s
            .services
            .iter()
            .flat_map(|svc| {
                svc.backends.iter().map(move |b| {
                    let mut labels = service_labels(svc);
                    labels.push(("backend", b.address.to_string()));
                    (labels, b, svc.table_size)
                })
            })
            .collect();
        let per_backend_u = |f: fn(&crate::status::BackendStatus) -> u64| -> Vec<(Labels, u64)> {
            backends.iter().map(|(l, b, _)| (l.clone(), f(b))).collect()
        };
        counter(e, "mim_lb_backend_packets", "Packets forwarded to the backend", &per_backend_u(|b| b.packets))?;
        counter(e, "mim_lb_backend_bytes", "Bytes forwarded to the backend", &per_backend_u(|b| b.bytes))?;
        counter(e, "mim_lb_backend_new_flows", "Flows recorded on the backend", &per_backend_u(|b| b.new_flows))?;
        let states: Vec<(Labels, i64)> = backends
            .iter()
            .flat_map(|(l, b, _)| {
                STATES.iter().map(move |state| {
                    let mut labels = l.clone();
                    labels.push(("state", (*state).to_owned()));
                    (labels, i64::from(b.state == *state))
                })
            })
            .collect();
        gauge(e, "mim_lb_backend_state", "1 for the backend's current state, 0 for the others", &states)?;
        let gauge_of = |f: &dyn Fn(&crate::status::BackendStatus, u32) -> Option<f64>| -> Vec<(Labels, f64)> {
            backends.iter().filter_map(|(l, b, size)| f(b, *size).map(|v| (l.clone(), v))).collect()
        };
        let int_of = |f: &dyn Fn(&crate::status::BackendStatus) -> Option<i64>| -> Vec<(Labels, i64)> {
            backends.iter().filter_map(|(l, b, _)| f(b).map(|v| (l.clone(), v))).collect()
        };
        gauge(e, "mim_lb_backend_health_up", "1 while the backend's health checks pass", &int_of(&|b| Some(i64::from(b.health == "up"))))?;
        gauge(e, "mim_lb_backend_weight", "Configured weight", &int_of(&|b| Some(i64::from(b.weight))))?;
        gauge(
            e,
            "mim_lb_backend_table_share",
            "Share of the service's Maglev table (of new flows) the backend owns, 0 to 1",
            &gauge_of(&|b, size| Some(if size > 0 { f64::from(b.slots) / f64::from(size) } else { 0.0 })),
        )?;
        gauge(
            e,
            "mim_lb_backend_slow_start_ratio",
            "Part of its weight the backend asks the table for: below 1 during its slow start",
            &gauge_of(&|b, _| Some(b.slow_start.as_ref().map_or(1.0, |ss| f64::from(ss.step) / f64::from(ss.steps)))),
        )?;
        gauge(
            e,
            "mim_lb_backend_held_down",
            "1 while flap damping holds the backend down",
            &int_of(&|b| Some(i64::from(b.held_down.is_some()))),
        )?;
        gauge(
            e,
            "mim_lb_backend_health_changes",
            "Changes of the backend's health verdict within the service's flap damping window",
            &int_of(&|b| Some(i64::from(b.health_changes))),
        )?;
        gauge(
            e,
            "mim_lb_backend_check_latency_seconds",
            "How long the backend's last health check took",
            &gauge_of(&|b, _| b.last_check.as_ref().map(|c| c.latency_ms / 1e3)),
        )?;
        gauge(
            e,
            "mim_lb_backend_check_ok",
            "1 if the backend's last health check passed",
            &int_of(&|b| b.last_check.as_ref().map(|c| i64::from(c.ok))),
        )?;
        // Only once counted: a 0 before the first read of the connection table would be a lie.
        if let Some(counts) = &s.connections {
            gauge(
                e,
                "mim_lb_backend_active_connections",
                "Connections the backend holds that were seen lately (recorded flows and changed slots; see OPERATIONS.md)",
                &int_of(&|b| Some(b.active_connections as i64)),
            )?;
            gauge(
                e,
                "mim_lb_backend_inactive_connections",
                "Recorded TCP flows of the backend, idle but not expired",
                &int_of(&|b| Some(b.inactive_connections as i64)),
            )?;
            gauge(e, "mim_lb_connections_age_seconds", "Age of the connection counts (since their read of the connection table began)", &[(vec![], counts.age_s)])?;
        }

        // Only with [announce]: the VIPs' routes for the routing daemon.
        if let Some(a) = &s.announce {
            let vips: Vec<(Labels, i64)> = a.vips.iter().map(|v| (vec![("vip", v.vip.clone())], i64::from(v.announced))).collect();
            gauge(e, "mim_lb_vip_announced", "1 while the VIP's route is in the [announce] table (the routing daemon announces it)", &vips)?;
            gauge(e, "mim_lb_announce_withdrawn", "1 while the operator has withdrawn this director (mim-lb withdraw)", &[(vec![], i64::from(a.withdrawn))])?;
        }

        let reasons = |f: fn(&crate::status::ReasonCount) -> u64| -> Vec<(Labels, u64)> {
            s.reasons.iter().map(|r| (vec![("reason", r.name.clone())], f(r))).collect()
        };
        counter(e, "mim_lb_xdp_packets", "Packets seen by the XDP program, by the reason for its verdict", &reasons(|r| r.packets))?;
        counter(e, "mim_lb_xdp_bytes", "Bytes seen by the XDP program, by the reason for its verdict", &reasons(|r| r.bytes))?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("listening for metrics on {addr}: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the metrics address (so a taken port fails the start, not a later scrape).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|source| MetricsError { addr, source })
}

/// Metrics connections served at once; the ones beyond are closed as soon as they are
/// accepted. A Prometheus server needs one. The bound is what keeps a peer that opens
/// thousands from taking the file descriptors the health checks and the control socket need.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send a request's headers. hyper starts the clock when
/// the connection opens and again after each answer, so this also closes idle keep-alive
/// connections; a scraper sends its request at once and reconnects for the next scrape.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection lives, whatever it does. A peer that asks and never reads the
/// answer stalls the writes, which no read timeout notices; without this it would keep its
/// slot for good.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// The pause after a failed accept, doubled on each failure in a row up to the second value.
/// A connection that could not be accepted (EMFILE, ENFILE, ENOBUFS) stays queued, so
/// retrying at once fails again at once and spins a worker the health checks share.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// A run of like warnings (failed accepts, refused connections) is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` and the status page until the event loop goes away.
pub async fn serve(listener: TcpListener, requests: mpsc::Sender<Pending>) {
    let history = Arc::new(Mutex::new(History::default()));
    tokio::spawn(sample_history(requests.clone(), Arc::clone(&history)));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut accept_failed = Throttled::default();
    let mut refused = Throttled::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            Err(e) => {
                accept_failed.warn(|| {
                    format!("metrics: accepting a connection failed ({e}); retrying in up to {:?}", ACCEPT_BACKOFF.1)
                });
                tokio::time::sleep(backoff).await;
                backoff = next_backoff(backoff);
                continue;
            }
        };
        // Dropping the stream closes it: the peer learns at once, and holds nothing here.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused.warn(|| format!("metrics: {MAX_CONNECTIONS} connections open already; closing new ones"));
            continue;
        };
        tokio::spawn(serve_connection(stream, slot, requests.clone(), Arc::clone(&history)));
    }
}

async fn serve_connection(
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    requests: mpsc::Sender<Pending>,
    history: Arc<Mutex<History>>,
) {
    let service = service_fn(move |req| answer(req, requests.clone(), Arc::clone(&history)));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("metrics connection: {e}"),
        Err(_) => log::debug!("metrics connection: closed at the {CONNECTION_DEADLINE:?} deadline"),
    }
}

/// Lets the first warning of a run through, then at most one per [`LOG_EVERY`] with how many
/// were left out: a flood of connections must not become a flood of log lines.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    left_out: u64,
}

impl Throttled {
    fn warn(&mut self, message: impl FnOnce() -> String) {
        match self.admit(Instant::now()) {
            Some(0) => log::warn!("{}", message()),
            Some(n) => log::warn!("{} ({n} more like it since the last such message)", message()),
            None => {}
        }
    }

    /// Whether a warning at `now` is logged, with how many were left out before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now.duration_since(last) < LOG_EVERY) {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}

/// The pause after another failed accept in a row.
fn next_backoff(pause: Duration) -> Duration {
    (pause * 2).min(ACCEPT_BACKOFF.1)
}

async fn answer(
    req: Request<Incoming>,
    requests: mpsc::Sender<Pending>,
    history: Arc<Mutex<History>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = code;
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
        Ok(response)
    };
    let unavailable = || reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "the daemon could not read its maps\n".into());
    if req.method() != Method::GET {
        return reply(StatusCode::NOT_FOUND, "text/plain", NOT_FOUND.into());
    }
    match req.uri().path() {
        "/metrics" => match ask_status(&requests).await {
            Some(status) => reply(StatusCode::OK, prometheus_text::CONTENT_TYPE, render(&status)),
            None => unavailable(),
        },
        "/status.json" => match ask_status(&requests).await {
            Some(status) => reply(StatusCode::OK, "application/json", serde_json::to_string(&status).unwrap_or_default()),
            None => unavailable(),
        },
        "/history.json" => {
            // Made once per sample: a request only copies it.
            let json = history.lock().map(|h| h.json()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", json.as_str().to_owned())
        }
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", status_page::PAGE.into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", NOT_FOUND.into()),
    }
}

const NOT_FOUND: &str = "mim-lb serves GET /metrics, and its status page: GET /, /status.json, /history.json\n";

/// A status snapshot from the event loop, if it could read its maps.
async fn ask_status(requests: &mpsc::Sender<Pending>) -> Option<Status> {
    let (tx, rx) = oneshot::channel();
    requests.send((protocol::Request::Status, tx)).await.ok()?;
    rx.await.ok().and_then(|r| r.status)
}

/// Samples the counters into `history` every `history::INTERVAL` while the event loop runs.
async fn sample_history(requests: mpsc::Sender<Pending>, history: Arc<Mutex<History>>) {
    let mut tick = tokio::time::interval(status_page::history::INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if requests.is_closed() {
            return;
        }
        let Some(status) = ask_status(&requests).await else { continue };
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Ok(mut h) = history.lock() {
            h.push(unix_ms, &status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_warnings_is_logged_once_a_minute_with_a_count() {
        let start = Instant::now();
        let mut throttled = Throttled::default();
        assert_eq!(throttled.admit(start), Some(0));
        for ms in 1..=1000 {
            assert_eq!(throttled.admit(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(throttled.admit(start + LOG_EVERY), Some(1000));
        assert_eq!(throttled.admit(start + LOG_EVERY + Duration::from_secs(1)), None);
    }

    #[test]
    fn accept_backoff_doubles_up_to_a_second() {
        let mut pause = ACCEPT_BACKOFF.0;
        let mut pauses = vec![pause];
        for _ in 0..10 {
            pause = next_backoff(pause);
            pauses.push(pause);
        }
        assert_eq!(pauses[..3], [Duration::from_millis(10), Duration::from_millis(20), Duration::from_millis(40)]);
        assert_eq!(pauses[7..], [Duration::from_secs(1); 4]);
    }

    #[test]
    fn exposition_has_every_family_with_labels() {
        let mut status = crate::status::sample();
        let b = &mut status.services[0].backends[0];
        b.state = "draining".into();
        let text = render(&status);
        let svc = r#"service="mim-master",vip="10.0.0.100",port="7000",protocol="tcp""#;
        for line in [
            "# TYPE mim_lb_backend_packets_total counter".to_owned(),
            format!("mim_lb_service_packets_total{{{svc}}} 10"),
            format!("mim_lb_backend_packets_total{{{svc},backend=\"10.0.0.11\"}} 7"),
            format!("mim_lb_backend_new_flows_total{{{svc},backend=\"10.0.0.11\"}} 1"),
            format!("mim_lb_backend_state{{{svc},backend=\"10.0.0.11\",state=\"draining\"}} 1"),
            format!("mim_lb_backend_state{{{svc},backend=\"10.0.0.11\",state=\"up\"}} 0"),
            format!("mim_lb_backend_check_latency_seconds{{{svc},backend=\"10.0.0.11\"}} 0.0015"),
            "mim_lb_xdp_packets_total{reason=\"forwarded\"} 10".to_owned(),
            format!("mim_lb_backend_active_connections{{{svc},backend=\"10.0.0.11\"}} 2"),
            format!("mim_lb_backend_inactive_connections{{{svc},backend=\"10.0.0.11\"}} 1"),
            "mim_lb_connections_age_seconds 0.5".to_owned(),
            "mim_lb_build_info{version=\"0.1.0\"} 1".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn slow_start_ratio_is_the_step_or_one() {
        let mut status = crate::status::sample();
        let svc = r#"service="mim-master",vip="10.0.0.100",port="7000",protocol="tcp""#;
        let line = format!("mim_lb_backend_slow_start_ratio{{{svc},backend=\"10.0.0.11\"}} 1.0");
        assert!(render(&status).lines().any(|l| l == line), "not in slow start: 1");
        status.services[0].backends[0].slow_start =
            Some(crate::status::SlowStartStatus { step: 3, steps: 10, table_weight: 30.0, next_step_in_s: 1.0, full_in_s: 8.0 });
        let line = format!("mim_lb_backend_slow_start_ratio{{{svc},backend=\"10.0.0.11\"}} 0.3");
        let text = render(&status);
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }

    #[test]
    fn a_hold_is_exported() {
        let mut status = crate::status::sample();
        let svc = r#"service="mim-master",vip="10.0.0.100",port="7000",protocol="tcp""#;
        let b = &mut status.services[0].backends[0];
        b.health_changes = 5;
        b.held_down = Some(crate::status::HeldDownStatus { max_changes: 4, window_s: 5, held_for_s: 1.0, release_in_s: 4.0 });
        let text = render(&status);
        for line in [
            format!("mim_lb_backend_held_down{{{svc},backend=\"10.0.0.11\"}} 1"),
            format!("mim_lb_backend_health_changes{{{svc},backend=\"10.0.0.11\"}} 5"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        status.services[0].backends[0].held_down = None;
        let line = format!("mim_lb_backend_held_down{{{svc},backend=\"10.0.0.11\"}} 0");
        assert!(render(&status).lines().any(|l| l == line));
    }

    #[test]
    fn announced_vips_are_exported_with_announce_only() {
        let mut status = crate::status::sample();
        assert!(!render(&status).contains("announce"), "no [announce], no series");
        status.announce = Some(crate::status::AnnounceStatus {
            table: 100,
            protocol: 250,
            announcing: true,
            withdrawn: false,
            vips: vec![
                crate::status::AnnouncedVip { vip: "10.0.0.100".into(), announced: true, reason: String::new() },
                crate::status::AnnouncedVip { vip: "10.0.0.101".into(), announced: false, reason: "not ready: x".into() },
            ],
            error: String::new(),
        });
        let text = render(&status);
        for line in ["mim_lb_vip_announced{vip=\"10.0.0.100\"} 1", "mim_lb_vip_announced{vip=\"10.0.0.101\"} 0", "mim_lb_announce_withdrawn 0"] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn connection_counts_are_absent_until_counted() {
        let mut status = crate::status::sample();
        status.connections = None;
        let text = render(&status);
        assert!(!text.contains("_connections"), "{text}");
    }

    /// One GET of `path` from `addr`: the status line.
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer.lines().next().unwrap_or_default().to_owned()
    }

    /// OPERATIONS.md: other paths answer 404; when the daemon cannot read its maps, 503 for
    /// the metrics and the status JSON (its
    /// status request then fails as `reading the maps: ...`, as the daemon answers it).
    #[test]
    fn other_paths_are_404_and_unreadable_maps_503() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut rx) = mpsc::channel::<Pending>(4);
            tokio::spawn(serve(listener, tx));
            tokio::spawn(async move {
                while let Some((_, reply)) = rx.recv().await {
                    let _ = reply.send(protocol::Response::error("reading the maps: Bad file descriptor"));
                }
            });
            let deadline = Duration::from_secs(5);
            let other = tokio::time::timeout(deadline, get(addr, "/other")).await.unwrap();
            assert!(other.starts_with("HTTP/1.1 404"), "{other}");
            let metrics = tokio::time::timeout(deadline, get(addr, "/metrics")).await.unwrap();
            assert!(metrics.starts_with("HTTP/1.1 503"), "{metrics}");
            let status = tokio::time::timeout(deadline, get(addr, "/status.json")).await.unwrap();
            assert!(status.starts_with("HTTP/1.1 503"), "{status}");
            // The page and the history need no map read.
            for path in ["/", "/history.json"] {
                let answer = tokio::time::timeout(deadline, get(addr, path)).await.unwrap();
                assert!(answer.starts_with("HTTP/1.1 200"), "GET {path}: {answer}");
            }
        });
    }

}
