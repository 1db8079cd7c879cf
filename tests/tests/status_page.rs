//! The status page on the metrics listener (OPERATIONS.md, "Status page"), loaded in headless
//! Chromium (Debian's chromium-headless-shell) while clients connect and after a master died:
//! the DOM it builds must show every master with its state, the dead one down, rates from
//! successive polls, and a chart line of new connections per master from the daemon's history.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use mim_lb_tests::{
    Lab, LabSpec, in_netns, tcp_ask,
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
const METRICS: &str = "127.0.0.1:9469";
const T: Duration = Duration::from_secs(2);

/// The page's DOM after its scripts ran for 5 s of virtual time (three polls).
fn load_page(lab: &Lab) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", lab.gateway_ns(), "chromium-headless-shell"])
        .args(["--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("http://{METRICS}/"))
        .output()
        .expect("chromium-headless-shell runs (cargo xtask setup installs it)");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The opening tag of the element of `class` whose `data-backend` is `address`.
fn tag_of<'a>(dom: &'a str, class: &str, address: &str) -> Option<&'a str> {
    let needle = format!("data-backend=\"{address}\"");
    dom.match_indices(&needle).find_map(|(i, _)| {
        let start = dom[..i].rfind('<')?;
        let end = i + dom[i..].find('>')?;
        let tag = &dom[start..=end];
        tag.contains(&format!("class=\"{class}\"")).then_some(tag)
    })
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    tag.split(&format!("{name}=\"")).nth(1)?.split('"').next()
}

/// The text of the cell of `class` in the row that starts at the row tag of `address`.
fn cell<'a>(dom: &'a str, address: &str, class: &str) -> Option<&'a str> {
    let row = tag_of(dom, "backend", address)?;
    let from = dom.find(row)?;
    let rest = &dom[from..from + dom[from..].find("</tr>")?];
    let open = format!("class=\"{class}\">");
    let i = rest.find(&open)? + open.len();
    Some(&rest[i..i + rest[i..].find('<')?])
}

#[test]
fn the_status_page_shows_masters_rates_and_a_dead_master_in_chromium() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], &format!("metrics_listen = \"{METRICS}\""));
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();

    // Clients for long enough that the daemon's history (a sample every 5 s) holds a few
    // intervals with new connections on every master.
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let asked = in_netns(lab.client_ns(), || {
        let until = Instant::now() + Duration::from_secs(16);
        let mut asked = 0;
        while Instant::now() < until {
            tcp_ask(vip, T).unwrap();
            asked += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        asked
    })
    .unwrap();
    assert!(asked > 100, "only {asked} connections made");

    // Master 1 dies: its service stops, its checks fail.
    let dead = lab.master_addr4(1);
    lab.stop_servers(1, PORT);
    gw.wait_until("master 1 down", Duration::from_secs(10), |s| {
        s.services[0].backends.iter().any(|b| b.address == std::net::IpAddr::from(dead) && b.state == "down")
    })
    .unwrap();

    let dom = load_page(&lab);
    assert!(dom.contains("<div id=\"error\"></div>"), "the page could not poll:\n{dom}");
    for i in 0..lab.master_count() {
        let address = lab.master_addr4(i).to_string();
        let row = tag_of(&dom, "backend", &address).unwrap_or_else(|| panic!("no row for {address}:\n{dom}"));
        let want = if i == 1 { "down" } else { "up" };
        assert_eq!(attr(row, "data-state"), Some(want), "{address}: {row}");
        let reason = cell(&dom, &address, "reason").unwrap_or_default();
        if i == 1 {
            assert!(!reason.is_empty(), "the dead master's row gives no reason:\n{dom}");
        }
        // Two polls happened: every row has a rate (the clients have stopped, so it may be 0).
        let rate = cell(&dom, &address, "new-flows-rate").unwrap_or_default();
        assert!(rate.parse::<f64>().is_ok(), "{address}: new connections/s {rate:?}:\n{dom}");
        let line = polyline_of(&dom, &address).unwrap_or_else(|| panic!("no chart line for {address}:\n{dom}"));
        let points: usize = attr(line, "data-points").and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(points >= 2, "{address}: chart line of {points} points: {line}");
    }
}

/// The chart line of `address`.
fn polyline_of<'a>(dom: &'a str, address: &str) -> Option<&'a str> {
    let needle = format!("data-backend=\"{address}\"");
    dom.match_indices("<polyline").find_map(|(i, _)| {
        let tag = &dom[i..=i + dom[i..].find('>')?];
        tag.contains(&needle).then_some(tag)
    })
}
