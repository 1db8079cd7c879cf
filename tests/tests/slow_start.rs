//! Slow start (CONFIG.md `slow_start_s`, OPERATIONS.md "Slow start"): a master that comes back
//! takes a small part of its share of new connections at first and its whole share after
//! `slow_start_s`, in steps that move no established flow. Real namespaces, the real daemon,
//! real connections; the returning master's share is counted from the connections it answered.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec,
    continuity::{Traffic, TrafficSpec, hold_on_every_master},
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
const HEALTH_PORT: u16 = 8080;
const SLOW_START_S: u64 = 15;
const MASTERS: usize = 4;
const RETURNING: usize = 3;

fn addr(lab: &Lab, i: usize) -> IpAddr {
    lab.master_addr4(i).into()
}

/// The returning master's share of the new connections answered in `[from, to)`, and how many
/// there were.
fn share(report: &mim_lb_tests::continuity::TrafficReport, name: &str, from: Instant, to: Instant) -> (f64, usize) {
    let answered: Vec<&String> =
        report.attempts.iter().filter(|a| a.started >= from && a.started < to).filter_map(|a| a.outcome.as_ref().ok()).collect();
    let mine = answered.iter().filter(|n| *n == &name).count();
    (mine as f64 / answered.len().max(1) as f64, answered.len())
}

#[test]
fn a_returning_master_ramps_up_without_moving_a_flow() {
    let mut lab = Lab::new(LabSpec::masters(MASTERS)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let healthy = lab.start_http_health(HEALTH_PORT).unwrap();
    let service = ServiceSpec {
        health: format!("check = \"http\"\nport = {HEALTH_PORT}\ninterval_ms = 100\ntimeout_ms = 100\nrise = 2\nfall = 2"),
        ..ServiceSpec::tcp(&lab, PORT)
    };
    let config = lab_config(&lab, &[service], "")
        .replacen("protocol = \"tcp\"\n", &format!("protocol = \"tcp\"\nslow_start_s = {SLOW_START_S}\n"), 1);
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    let first = gw.wait_all_up().unwrap();
    let returning = addr(&lab, RETURNING);
    let slots_of = |s: &mim_lb::status::Status| s.services[0].backends.iter().find(|b| b.address == returning).unwrap().slots;
    let full_slots = slots_of(&first);
    assert!(first.services[0].backends.iter().all(|b| b.slow_start.is_none()), "the first round of checks ramps nobody");

    // The master fails its checks (its service stays, so only the director's view changes).
    healthy[RETURNING].store(false, Ordering::Relaxed);
    gw.wait_until("the master down", Duration::from_secs(10), |s| slots_of(s) == 0).unwrap();

    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let spec = TrafficSpec {
        held_on: Some((0..MASTERS).filter(|i| *i != RETURNING).collect()),
        new_every: Duration::from_millis(3),
        ..TrafficSpec::new(vip)
    };
    let traffic = Traffic::start(&lab, spec).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    healthy[RETURNING].store(true, Ordering::Relaxed);
    // Polled here rather than with `wait_until`, to know when the status that shows it up
    // was asked for: the moment it came up is then read from the status' own count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (asked, b) = loop {
        let asked = Instant::now();
        let status = gw.status().unwrap();
        let b = status.services[0].backends.iter().find(|b| b.address == returning).unwrap().clone();
        if b.state == "up" {
            break (asked, b);
        }
        assert!(Instant::now() < deadline, "the master did not come back: {b:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let ss = b.slow_start.clone().unwrap_or_else(|| panic!("no slow start in status: {b:?}"));
    eprintln!("slow start in status: {ss:?}, {} slots of {full_slots}", b.slots);
    assert_eq!((ss.step, ss.steps), (1, 10));
    let came_up = asked + Duration::from_secs_f64(ss.full_in_s) - Duration::from_secs(SLOW_START_S);
    assert!(b.slots < full_slots / 4, "the table gives it {} slots of {full_slots} at step 1", b.slots);
    let text = gw.ctl(&["status"]).unwrap();
    assert!(text.contains("slow start: step 1/10, weight 10 of 100"), "{text}");

    // Connections opened during the ramp, to every master, must survive the steps after it.
    let during = hold_on_every_master(&lab, vip, 2, Duration::from_secs(3)).unwrap();

    let done = gw
        .wait_until("the slow start over", Duration::from_secs(SLOW_START_S + 10), |s| {
            s.services[0].backends.iter().any(|b| b.address == returning && b.slow_start.is_none() && b.state == "up")
        })
        .unwrap();
    let over = Instant::now();
    assert!(over >= came_up + Duration::from_secs(SLOW_START_S) - Duration::from_millis(200), "over early: {:?}", over - came_up);
    assert_eq!(slots_of(&done), full_slots, "its full share after slow_start_s: the table it had before it failed");
    std::thread::sleep(Duration::from_secs(3));
    let mut during = during;
    mim_lb_tests::echo_all(&mut during, "after the slow start", Duration::from_secs(3));
    let report = traffic.finish();
    report.assert_survived("a master's slow start", came_up);

    let name = lab.master_name(RETURNING);
    let (first_share, first_n) = share(&report, &name, came_up, came_up + Duration::from_secs(1));
    let (final_share, final_n) = share(&report, &name, over + Duration::from_millis(200), over + Duration::from_secs(3));
    eprintln!("returning master's share: {first_share:.3} of {first_n} in its first second, {final_share:.3} of {final_n} at full weight");
    assert!(first_n >= 100 && final_n >= 200, "too few connections to measure a share: {first_n}, {final_n}");
    assert!(final_share > 0.15, "its full share of 4 equal masters is a quarter: {final_share}");
    assert!(first_share < final_share / 4.0, "first second: {first_share}, full: {final_share}");
}
