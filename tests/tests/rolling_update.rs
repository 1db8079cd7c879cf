//! Running a group day to day (OPERATIONS.md, "Rolling update"): the connection counts,
//! `mim-lb drain --wait`, a rolling update of every master under continuous traffic,
//! `mim-lb status --watch`, and finding the daemon from its config file.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec, TcpHold, echo_all,
    continuity::{Traffic, TrafficSpec},
    gateway::{Gateway, Mode, ServiceSpec, lab_config, mim_lb_binary},
    netns::run_in_with_env,
};

const PORT: u16 = 7000;

fn start(lab: &mut Lab) -> (Gateway, String) {
    lab.start_tcp_servers(PORT).unwrap();
    let service = ServiceSpec::tcp(lab, PORT);
    let name = service.name.clone();
    let gw = Gateway::start(lab, &lab_config(lab, &[service], ""), Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    (gw, name)
}

fn vip(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.vip4().into(), PORT)
}

/// A drained master's long-lived connections show as active while they talk; `drain --wait`
/// times out (exit status 1, saying so) while they last, and returns once they have ended.
#[test]
fn drain_wait_waits_for_the_connections_a_drained_master_holds() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    let (gw, service) = start(&mut lab);
    let master: IpAddr = lab.master_addr4(0).into();
    let spec = TrafficSpec { held_on: Some(vec![0]), held_per_master: 3, ..TrafficSpec::new(vip(&lab)) };
    let traffic = Traffic::start(&lab, spec).unwrap();

    let master_s = master.to_string();
    let drained = gw.ctl(&["drain", &service, &master_s]).unwrap();
    assert!(drained.contains("-> draining"), "{drained}");
    // Its three connections keep going to it, unrecorded, each stamping its slot.
    let seen = gw
        .wait_until("the drained master's connections counted", Duration::from_secs(15), |s| {
            s.connections.is_some()
                && s.services[0].backends.iter().any(|b| b.address == master && b.active_connections >= 1)
        })
        .unwrap();
    let text = mim_lb::status::render(&seen);
    assert!(text.contains("ActConn InActConn"), "{text}");

    let err = gw.ctl(&["drain", &service, &master_s, "--wait", "--timeout", "8s"]).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("timed out after 8s") && err.contains("still holds") && err.contains("stays drained"), "{err}");

    let report = traffic.finish();
    assert!(report.broken_held().is_empty(), "{}", report.summary("drain", report.started));
    let began = Instant::now();
    let out = gw.ctl(&["drain", &service, &master_s, "--wait", "--timeout", "45s"]).unwrap();
    assert!(out.contains(&format!("backend {master} of {service} holds no active connection")), "{out}");
    // Not before a count begun a whole window after the drain could say so.
    assert!(began.elapsed() >= Duration::from_secs(5), "returned after {:?}: {out}", began.elapsed());
    let b = gw.backend(master).unwrap();
    assert_eq!((b.active_connections, b.state.as_str()), (0, "draining"), "{b:?}");
}

/// Every master's long-lived connections count as active, also on an up master whose slots
/// never changed (no connection there is recorded: the data path's sketch counts them), and
/// the counts follow the connections: zero once they have ended.
#[test]
fn the_connections_of_up_masters_are_counted() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    let (gw, _) = start(&mut lab);
    const HELD: usize = 5;
    let target = vip(&lab);
    let names: Vec<String> = (0..lab.master_count()).map(|i| lab.master_name(i)).collect();
    // Connections until every master has HELD (the table decides which master each reaches;
    // extras are closed at once and count only in the window they opened in).
    let mut held = mim_lb_tests::in_netns(lab.client_ns(), || {
        let mut held: Vec<TcpHold> = Vec::new();
        for _ in 0..300 {
            if names.iter().all(|n| held.iter().filter(|h| h.name() == n).count() >= HELD) {
                break;
            }
            let conn = TcpHold::connect(target, Duration::from_secs(2)).unwrap();
            if held.iter().filter(|h| h.name() == conn.name()).count() < HELD {
                held.push(conn);
            }
        }
        held
    })
    .unwrap();
    assert_eq!(held.len(), HELD * names.len(), "could not open {HELD} connections to every master");
    // Two whole windows with only these connections talking, a line every 200 ms.
    let until = Instant::now() + Duration::from_secs(11);
    let mut round = 0;
    while Instant::now() < until {
        echo_all(&mut held, &format!("round {round}"), Duration::from_secs(2));
        round += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = gw.status().unwrap();
    for b in &status.services[0].backends {
        // 64 registers: a collision now and then makes 5 connections look like 4 (or 3).
        assert!(
            (HELD as u64 - 2..=HELD as u64 + 2).contains(&b.active_connections),
            "{} holds {HELD} talking connections, counted {}: {status:?}",
            b.address,
            b.active_connections
        );
    }
    drop(held);
    gw.wait_until("no connection left", Duration::from_secs(20), |s| {
        s.services[0].backends.iter().all(|b| b.active_connections == 0)
    })
    .unwrap();
}

/// The procedure of OPERATIONS.md, "Rolling update", on every master in turn under
/// continuous traffic (long-lived connections that end and are replaced now and then, and
/// a new connection every 20 ms): `drain --wait`, update (the master's service stops, which
/// breaks any connection it still holds, and starts again), check, `enable`. No connection
/// may fail.
#[test]
fn a_rolling_update_of_every_master_loses_no_connection() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    let (gw, service) = start(&mut lab);
    let spec = TrafficSpec { held_per_master: 2, held_lifetime: Some(Duration::from_secs(10)), ..TrafficSpec::new(vip(&lab)) };
    let traffic = Traffic::start(&lab, spec).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    for i in 0..lab.master_count() {
        let master: IpAddr = lab.master_addr4(i).into();
        let master_s = master.to_string();
        let out = gw.ctl(&["drain", &service, &master_s, "--wait", "--timeout", "45s"]).unwrap();
        assert!(out.contains("holds no active connection"), "master {i}: {out}");
        // The update: the service stops (its open connections close) and starts again.
        assert_eq!(lab.stop_servers(i, PORT), 1);
        lab.start_tcp_server(i, PORT).unwrap();
        // The check: its health checks pass again (it stays drained meanwhile).
        gw.wait_until("the updated master passes its checks", Duration::from_secs(20), |s| {
            s.services[0].backends.iter().any(|b| b.address == master && b.health == "up" && b.state == "draining")
        })
        .unwrap();
        gw.ctl(&["enable", &service, &master_s]).unwrap();
        gw.wait_until("the master back in service", Duration::from_secs(10), |s| {
            s.services[0].backends.iter().any(|b| b.address == master && b.state == "up")
        })
        .unwrap();
        let served = traffic.progress();
        assert_eq!((served.new_failed, served.broken), (0, 0), "after updating master {i}: {served:?}");
    }
    let report = traffic.finish_after(Duration::from_secs(1));
    let summary = report.summary("the rolling update", report.started);
    assert!(report.broken_held().is_empty(), "{summary}");
    let failed: Vec<_> = report.attempts.iter().filter(|a| a.outcome.is_err()).collect();
    assert!(failed.is_empty(), "{} new connections failed: {failed:?}\n{summary}", failed.len());
    assert!(report.held.iter().all(|h| h.renewed >= 2), "the long-lived connections were renewed: {summary}");
    // Every master served new connections after its update.
    for i in 0..lab.master_count() {
        assert!(lab.served(i).tcp_accepted_to.get(&IpAddr::from(lab.vip4())).copied().unwrap_or(0) > 0, "master {i}");
    }
}

/// `status --watch` off a terminal: one frame per interval, a blank line apart, each with
/// per-second rates once there is a previous answer; `--count` ends it.
#[test]
fn status_watch_prints_frames_with_rates() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    let (gw, _) = start(&mut lab);
    let traffic = Traffic::start(&lab, TrafficSpec::new(vip(&lab))).unwrap();
    let out = gw.ctl(&["status", "--watch", "0.5", "--count", "3"]).unwrap();
    drop(traffic);
    let frames: Vec<&str> = out.split("\n\n").collect();
    assert_eq!(frames.len(), 3, "{out}");
    assert!(frames.iter().all(|f| f.contains("Pkts/s") && f.contains("every 500ms")), "{out}");
    // The first frame has no rate; the next ones have the service's, and it is not zero.
    let service_rate = |frame: &str| -> String {
        let line = frame.lines().find(|l| l.starts_with("TCP ")).unwrap_or_else(|| panic!("no service line: {frame}"));
        line.split_whitespace().nth(4).unwrap_or_default().to_owned()
    };
    assert_eq!(service_rate(frames[0]), "-", "{out}");
    for f in &frames[1..] {
        let pps: f64 = service_rate(f).parse().unwrap_or_else(|_| panic!("no rate: {f}"));
        assert!(pps > 0.0, "{f}");
    }
}

/// The control commands find the daemon from `--config` (its `control_socket`), which wins
/// over MIM_LB_SOCKET; `--socket` works before and after the command and wins over both.
#[test]
fn control_commands_find_the_socket_from_the_config_file() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    let (gw, _) = start(&mut lab);
    let config = gw.config_path();
    let config = config.to_str().unwrap();
    let socket = gw.socket().to_str().unwrap();
    let cli = mim_lb_binary();
    let cli = cli.to_str().unwrap();
    let wrong = [("MIM_LB_SOCKET", "/nonexistent/mim-lb.sock")];
    let run = |args: &[&str]| run_in_with_env(gw.ns(), cli, args, &wrong);
    assert!(run(&["status"]).is_err(), "the wrong socket of MIM_LB_SOCKET is used when nothing else is given");
    for args in [
        vec!["status", "--config", config],
        vec!["status", "-c", config],
        vec!["--socket", socket, "status"],
        vec!["status", "--socket", socket],
        vec!["status", "--config", "/nonexistent.toml", "--socket", socket],
        vec!["ready", "--config", config],
    ] {
        let out = run(&args).unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
        assert!(!out.is_empty(), "{args:?}");
    }
    let err = format!("{:#}", run(&["status", "--config", "/nonexistent.toml"]).unwrap_err());
    assert!(err.contains("reading the control socket from /nonexistent.toml"), "{err}");
}

/// On a terminal (`script` gives the CLI a pty): `status --watch` clears the screen and draws
/// each frame from the top, and `drain --wait` redraws one progress line in place.
#[test]
fn on_a_terminal_watch_and_drain_wait_redraw_in_place() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    let (gw, service) = start(&mut lab);
    let cli = mim_lb_binary();
    let socket = gw.socket().display().to_string();
    let master = lab.master_addr4(1).to_string();
    let on_a_tty = |args: &str| -> String {
        let command = format!("{} --socket {socket} {args}", cli.display());
        run_in_with_env(gw.ns(), "script", &["-qec", &command, "/dev/null"], &[]).unwrap_or_else(|e| panic!("{args}: {e:#}"))
    };
    let watch = on_a_tty("status --watch 0.2 --count 3");
    assert_eq!(watch.matches("\x1b[H\x1b[2J").count(), 3, "{watch:?}");
    assert!(!watch.contains("\n\n\n"), "{watch:?}");
    let drain = on_a_tty(&format!("drain {service} {master} --wait --timeout 30s"));
    assert!(drain.contains(&format!("\r\x1b[Kwaiting for {master} of {service}: counting its connections")), "{drain:?}");
    assert!(drain.contains("holds no active connection"), "{drain:?}");
}
