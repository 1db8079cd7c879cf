//! Flap damping (CONFIG.md `[service.flap_damping]`, OPERATIONS.md "Flap damping"): a master
//! whose health keeps changing is held down, with the reason in `status` and the log, until it
//! has calmed; the other masters' connections never notice. Real namespaces, the real daemon,
//! real connections; the master's health endpoint flaps every 300 ms.

use std::net::{IpAddr, SocketAddr};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec,
    continuity::{Traffic, TrafficSpec},
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
const HEALTH_PORT: u16 = 8080;
const FLAPPER: usize = 2;
const T: Duration = Duration::from_secs(5);

/// Toggles `flag` every `every` until `stop` is set (or a minute has passed), then leaves it
/// set (healthy).
fn flap(flag: Arc<AtomicBool>, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            flag.fetch_xor(true, Ordering::Relaxed);
            std::thread::sleep(every);
        }
        flag.store(true, Ordering::Relaxed);
    })
}

#[test]
fn a_master_flapping_every_300_ms_is_held_down_until_it_calms() {
    let mut lab = Lab::new(LabSpec::masters(3)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let healthy = lab.start_http_health(HEALTH_PORT).unwrap();
    let service = ServiceSpec {
        // Every 300 ms phase of the flapper holds 3 checks: enough for `fall = 2`, which keeps
        // one check slowed by a loaded machine from taking a steady master down.
        health: format!("check = \"http\"\nport = {HEALTH_PORT}\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1\nfall = 2"),
        ..ServiceSpec::tcp(&lab, PORT)
    };
    let config = lab_config(&lab, &[service], "") + "[service.flap_damping]\nmax_changes = 4\nwindow_s = 5\nhold_s = 3\n";
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    let flapper: IpAddr = lab.master_addr4(FLAPPER).into();
    let name = lab.master_name(FLAPPER);

    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let spec = TrafficSpec { held_on: Some(vec![0, 1]), ..TrafficSpec::new(vip) };
    let traffic = Traffic::start(&lab, spec).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let flapping = flap(Arc::clone(&healthy[FLAPPER]), Duration::from_millis(300), Arc::clone(&stop));
    let started = Instant::now();
    let held = gw
        .wait_until("the flapping master held down", Duration::from_secs(10), |s| {
            s.services[0].backends.iter().any(|b| b.address == flapper && b.held_down.is_some())
        })
        .unwrap();
    let t_held = Instant::now();
    eprintln!("held down {:?} after the flapping began", t_held - started);
    let b = held.services[0].backends.iter().find(|b| b.address == flapper).unwrap();
    assert_eq!(b.state, "down");
    assert!(b.reason.starts_with("held down for flapping: its health changed more than 4 times within 5 s"), "{:?}", b.reason);
    assert!(b.health_changes > 4, "the penalty is above the limit: {}", b.health_changes);
    let h = b.held_down.clone().unwrap();
    assert_eq!((h.max_changes, h.window_s), (4, 5));
    gw.proc().wait_for_line("held down for flapping", T).unwrap();
    let text = gw.ctl(&["status"]).unwrap();
    assert!(text.contains("held down for flapping"), "{text}");

    // It stays held while it flaps, whatever its checks say meanwhile.
    let mut verdicts = std::collections::BTreeSet::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let b = gw.backend(flapper).unwrap();
        assert!(b.held_down.is_some() && b.state == "down" && b.slots == 0, "released while still flapping: {b:?}");
        verdicts.insert(b.health.clone());
    }
    assert_eq!(verdicts.len(), 2, "its health verdict kept changing while held: {verdicts:?}");
    stop.store(true, Ordering::Relaxed);
    let t_calm = Instant::now();
    flapping.join().unwrap();

    let released = gw
        .wait_until("the master released once calm", Duration::from_secs(15), |s| {
            s.services[0].backends.iter().any(|b| b.address == flapper && b.held_down.is_none() && b.state == "up")
        })
        .unwrap();
    let t_released = Instant::now();
    eprintln!("released {:?} after the flapping stopped", t_released - t_calm);
    // Calm means at most 2 changes within 5 s: the window must pass over all but the last two.
    assert!(t_released - t_calm > Duration::from_secs(3), "released before it had calmed: {:?}", t_released - t_calm);
    assert!(released.services[0].backends.iter().find(|b| b.address == flapper).unwrap().slots > 0);
    gw.proc().wait_for_line("released from its flap damping hold", T).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let report = traffic.finish();
    // While held, no new connection reached it; once released, new connections do again.
    let reached = |from: Instant, to: Instant| {
        report.attempts.iter().filter(|a| a.started >= from && a.started < to && a.outcome.as_deref() == Ok(name.as_str())).count()
    };
    assert_eq!(reached(t_held + Duration::from_millis(300), t_calm), 0, "a new connection reached the held master");
    assert!(reached(t_released, Instant::now()) > 0, "no new connection reached the released master");
    // The other masters' long-lived connections never noticed, and once the master was held,
    // every new connection worked.
    report.assert_survived("a master flapping every 300 ms", t_held + Duration::from_millis(300));
}
