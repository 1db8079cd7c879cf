//! Reloads of the real daemon (control socket and SIGHUP) in the namespace lab: what CONFIG.md
//! ("What a reload can and cannot change") and OPERATIONS.md ("Health checks") promise.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mim_lb::status::Status;
use mim_lb_tests::{
    Lab, LabSpec, TcpHold, count_names,
    gateway::{Gateway, Mode, ServiceSpec, lab_config, status_shape},
};

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(3);
const HEALTH: &str = "interval_ms = 100\ntimeout_ms = 100\nrise = 2\nfall = 2";

fn vip(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.vip4().into(), PORT)
}

fn ask(lab: &Lab, n: usize) -> Vec<String> {
    lab.ask(vip(lab), n, T)
}

fn hold(lab: &Lab, n: usize) -> Vec<TcpHold> {
    lab.hold(vip(lab), n, T)
}

fn echo_all(held: &mut [TcpHold], round: &str) {
    mim_lb_tests::echo_all(held, round, T);
}


/// The files of refused reloads: each changes one fixed key, and also leaves master 2 out of
/// the service, so that a reload applied even in part would show in the status.
fn fixed_key_changes(lab: &Lab, gw: &Gateway, top: &str) -> Vec<(&'static str, String)> {
    let two = ServiceSpec { health: HEALTH.into(), masters: vec![(0, true), (1, true)], ..ServiceSpec::tcp(lab, PORT) };
    let body = lab_config(lab, &[two], top);
    let (pin_dir, socket) = (gw.pin_dir().display().to_string(), gw.socket().display().to_string());
    let file = |pin: &str, sock: &str, body: &str| format!("pin_dir = \"{pin}\"\ncontrol_socket = \"{sock}\"\n{body}");
    let changed = |from: &str, to: &str| {
        assert!(body.contains(from), "{from} is not in the config");
        file(&pin_dir, &socket, &body.replacen(from, to, 1))
    };
    vec![
        ("interface", changed(&format!("interface = \"{}\"", lab.gateway_ifname()), "interface = \"lo\"")),
        ("xdp_mode", changed("xdp_mode = \"generic\"", "xdp_mode = \"native\"")),
        ("pin_dir", file(&format!("{pin_dir}-other"), &socket, &body)),
        ("flow_table_size", changed("flow_table_size = 4096", "flow_table_size = 8192")),
        ("max_services", changed("max_services = 4", "max_services = 5")),
        ("control_socket", file(&pin_dir, &format!("{socket}.other"), &body)),
        ("metrics_listen", changed("metrics_listen = \"127.0.0.1:9469\"", "metrics_listen = \"127.0.0.1:9470\"")),
    ]
}

/// A reload that changes a key fixed at start is refused, naming the key, over the control
/// socket and on SIGHUP; the status is as before (master 2, which each refused file leaves
/// out, still up with its slots), held connections keep talking and new ones reach every
/// master. Fails if a fixed key is not compared, or a refused reload applies the rest.
#[test]
fn a_reload_changing_a_fixed_key_is_refused_naming_it_and_changes_nothing() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let top = "xdp_mode = \"generic\"\nflow_table_size = 4096\nmax_services = 4\nmetrics_listen = \"127.0.0.1:9469\"";
    let service = ServiceSpec { health: HEALTH.into(), ..ServiceSpec::tcp(&lab, PORT) };
    let config = lab_config(&lab, &[service], top);
    let gw = Gateway::start(&mut lab, &config, Mode::GenericFromFile).unwrap();
    gw.wait_all_up().unwrap();
    let mut held = hold(&lab, 20);
    let before = status_shape(&gw.status().unwrap());

    for (key, text) in fixed_key_changes(&lab, &gw, top) {
        std::fs::write(gw.config_path(), &text).unwrap();
        let err = format!("{:#}", gw.ctl(&["reload"]).expect_err(key));
        let want = format!("reload rejected, nothing changed: {key} cannot change while running");
        assert!(err.contains(&want), "changing {key}: {err}");
        assert_eq!(status_shape(&gw.status().unwrap()), before, "the refused change of {key} changed the state");
        echo_all(&mut held, key);
    }
    // SIGHUP takes the same path (the file still changes metrics_listen).
    gw.proc().signal(libc::SIGHUP).unwrap();
    gw.proc().wait_for_line("SIGHUP: reload rejected, nothing changed: metrics_listen cannot change", T).unwrap();
    assert_eq!(status_shape(&gw.status().unwrap()), before, "the refused SIGHUP changed the state");
    echo_all(&mut held, "after SIGHUP");
    assert_eq!(count_names(&ask(&lab, 150)).len(), 3, "new connections no longer reach every master");
}

/// The maps are sized at start for twice the services configured (at least 8): the daemon
/// says so, a reload within that room adds services, and one beyond it is refused whole,
/// naming `max_services` and saying a restart grows it; the status and the held connections
/// are as before. Fails if the room is not enforced by the daemon's reload, or a refused
/// reload applies part of its file.
#[test]
fn a_reload_beyond_the_room_for_services_is_refused_whole() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    // Every service checks the masters' one server, on PORT.
    let spec = |lab: &Lab, port: u16| ServiceSpec { health: format!("{HEALTH}\nport = {PORT}"), ..ServiceSpec::tcp(lab, port) };
    let config = |lab: &Lab, n: u16| {
        let specs: Vec<ServiceSpec> = (0..n).map(|i| spec(lab, PORT + i)).collect();
        lab_config(lab, &specs, "")
    };
    let first = config(&lab, 1);
    let gw = Gateway::start(&mut lab, &first, Mode::Generic).unwrap();
    gw.proc().wait_for_line("maps sized for 8 services (by default twice the services configured, at least 8); reloads may serve up to 8", T).unwrap();
    gw.wait_all_up().unwrap();
    let mut held = hold(&lab, 20);

    // Eight: the whole room.
    let (pin_dir, socket) = (gw.pin_dir().display().to_string(), gw.socket().display().to_string());
    let file = |body: String| format!("pin_dir = \"{pin_dir}\"\ncontrol_socket = \"{socket}\"\n{body}");
    std::fs::write(gw.config_path(), file(config(&lab, 8))).unwrap();
    gw.ctl(&["reload"]).unwrap();
    gw.wait_all_up().unwrap();
    let before = status_shape(&gw.status().unwrap());
    assert_eq!(gw.status().unwrap().services.len(), 8);
    echo_all(&mut held, "after the reload to 8 services");

    // Nine: refused whole.
    std::fs::write(gw.config_path(), file(config(&lab, 9))).unwrap();
    let err = format!("{:#}", gw.ctl(&["reload"]).expect_err("nine services"));
    assert!(
        err.contains("reload rejected, nothing changed: max_services: the maps were sized at start for 8 services, and this configuration needs 9"),
        "{err}"
    );
    assert!(err.contains("Restart mim-lb with a larger max_services"), "{err}");
    assert_eq!(status_shape(&gw.status().unwrap()), before, "the refused reload changed the state");
    echo_all(&mut held, "after the refused reload");
    assert_eq!(count_names(&ask(&lab, 150)).len(), 3, "new connections no longer reach every master");
}

/// A backend's state, and whether its last check failed (None before its first check).
fn backend_state(s: &Status, address: IpAddr) -> Option<(String, Option<bool>)> {
    let b = s.services.iter().flat_map(|s| &s.backends).find(|b| b.address == address)?;
    Some((b.state.clone(), b.last_check.as_ref().map(|c| !c.ok)))
}

/// A master added by reload whose port is closed starts `down` and stays so while its checks
/// fail: never `up`, and no new connection is sent to it (one would be refused, and fail
/// `ask`). Once it answers, `rise` checks bring it up. The reload also keeps the operator's
/// drain of master 0. Fails if a new backend starts up, or a reload forgets the drain.
#[test]
fn a_master_added_by_reload_stays_down_until_its_checks_pass() {
    let mut lab = Lab::new(LabSpec::masters(4)).unwrap();
    for i in 0..3 {
        lab.start_tcp_server(i, PORT).unwrap();
    }
    let spec = |lab: &Lab, n: usize| ServiceSpec {
        health: HEALTH.into(),
        masters: (0..n).map(|i| (i, true)).collect(),
        ..ServiceSpec::tcp(lab, PORT)
    };
    let config = lab_config(&lab, &[spec(&lab, 3)], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    let (drained, added): (IpAddr, IpAddr) = (lab.master_addr4(0).into(), lab.master_addr4(3).into());
    gw.ctl(&["drain", "tcp-7000", &drained.to_string()]).unwrap();

    gw.write_config(&lab_config(&lab, &[spec(&lab, 4)], "")).unwrap();
    let said = gw.ctl(&["reload"]).unwrap();
    assert!(said.contains("applied"), "{said}");
    let now = gw.status().unwrap();
    assert_eq!(backend_state(&now, added).map(|s| s.0).as_deref(), Some("down"), "the new master right after the reload");
    assert_eq!(backend_state(&now, drained).map(|s| s.0).as_deref(), Some("draining"), "the reload forgot the drain");

    // Its checks run and fail, and it never comes up meanwhile.
    gw.wait_until("the new master's check failing", Duration::from_secs(10), |s| {
        let (state, failed) = backend_state(s, added).unwrap();
        assert_ne!(state, "up", "the new master came up with its port closed");
        failed == Some(true)
    })
    .unwrap();
    // "Never up" needs a window: 2 s is about 20 checks, ten times the `rise` of 2.
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        let (state, failed) = backend_state(&gw.status().unwrap(), added).unwrap();
        assert_eq!((state.as_str(), failed), ("down", Some(true)), "the new master with its port closed");
        let names = ask(&lab, 20);
        assert!(!names.contains(&lab.master_name(0)), "a new connection reached the drained master");
    }
    let stats = gw.status().unwrap();
    let b = stats.services[0].backends.iter().find(|b| b.address == added).unwrap();
    assert_eq!((b.new_flows, b.slots), (0, 0), "the down master was given flows or slots");

    lab.start_tcp_server(3, PORT).unwrap();
    gw.wait_until("the new master up once it answers", Duration::from_secs(10), |s| {
        backend_state(s, added).is_some_and(|(state, _)| state == "up")
    })
    .unwrap();
    assert!(ask(&lab, 150).contains(&lab.master_name(3)), "the master that came up gets no connection");
}
