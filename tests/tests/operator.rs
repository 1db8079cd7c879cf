//! What an operator looks at on a running gateway: the metrics endpoint, `mim-lb status`,
//! `mim-lb simulate`, and the pinned maps through bpftool.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use mim_lb_tests::{
    Lab, LabSpec, TcpHold, in_netns, tcp_ask_from, tcp_ask_many,
    gateway::{Gateway, Mode, ServiceSpec, lab_config},
};

const PORT: u16 = 7000;
const METRICS: &str = "127.0.0.1:9469";
const T: Duration = Duration::from_secs(3);

fn start(lab: &mut Lab, extra: &str) -> Gateway {
    let config = lab_config(lab, &[ServiceSpec::tcp(lab, PORT)], extra);
    let gw = Gateway::start(lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    gw
}

/// One scrape of the gateway's metrics endpoint, from inside the gateway namespace (the
/// endpoint listens on that namespace's loopback).
fn scrape(lab: &Lab) -> String {
    in_netns(lab.gateway_ns(), || -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&METRICS.parse().unwrap(), T)?;
        stream.set_read_timeout(Some(T))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        anyhow::ensure!(answer.starts_with("HTTP/1.1 200"), "scrape answered {answer}");
        Ok(answer)
    })
    .unwrap()
    .unwrap()
}

/// The value of each series of `family` that has label `backend`, by that label.
fn by_backend(text: &str, family: &str) -> BTreeMap<IpAddr, u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter_map(|l| {
            let backend = l.split("backend=\"").nth(1)?.split('"').next()?.parse().ok()?;
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((backend, value))
        })
        .collect()
}

#[test]
fn metrics_count_exactly_what_the_masters_served() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, &format!("metrics_listen = \"{METRICS}\""));
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    // Connections made to the VIP: the health checks connect to the masters' own addresses.
    let to_vip = |lab: &Lab, i: usize| lab.served(i).tcp_accepted_to.get(&IpAddr::from(lab.vip4())).copied().unwrap_or(0);
    let before: Vec<u64> = (0..lab.master_count()).map(|i| to_vip(&lab, i)).collect();

    // Scrape while traffic flows: counters only grow.
    let client_ns = lab.client_ns().to_owned();
    let traffic = std::thread::spawn(move || in_netns(&client_ns, || tcp_ask_many(vip, 200, T)).unwrap().unwrap());
    let mut last: BTreeMap<IpAddr, u64> = BTreeMap::new();
    while !traffic.is_finished() {
        let now = by_backend(&scrape(&lab), "mim_lb_backend_new_flows_total");
        for (b, v) in &now {
            assert!(*v >= last.get(b).copied().unwrap_or(0), "a counter went down");
        }
        last = now;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(traffic.join().unwrap().len(), 200);

    let text = scrape(&lab);
    let new_flows = by_backend(&text, "mim_lb_backend_new_flows_total");
    let packets = by_backend(&text, "mim_lb_backend_packets_total");
    let mut total = 0;
    for (i, before) in before.iter().enumerate() {
        let address: IpAddr = lab.master_addr4(i).into();
        let served = to_vip(&lab, i) - before;
        assert_eq!(new_flows[&address], served, "new flows of {address} against what it accepted");
        // At least SYN, ACK, request and FIN per connection came through the gateway.
        assert!(packets[&address] >= 3 * served, "{address}: {} packets for {served} connections", packets[&address]);
        total += served;
    }
    assert_eq!(total, 200);
    for family in ["mim_lb_backend_state", "mim_lb_backend_check_latency_seconds", "mim_lb_xdp_packets_total", "mim_lb_build_info"] {
        assert!(text.contains(&format!("# TYPE {family}")) || text.contains(&format!("# TYPE {}", family.trim_end_matches("_total"))), "no {family}");
    }
    assert!(text.contains("mim_lb_xdp_packets_total{reason=\"forwarded\"}"));
    drop(gw);
}

#[test]
fn simulate_agrees_with_where_real_connections_went() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, "");
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let client = lab.client_addr4();
    let master_of = |name: &str| -> IpAddr { lab.master_addr4(lab.master_index(name).unwrap()).into() };
    let simulate = |sport: u16| -> IpAddr {
        let json = gw.ctl(&["simulate", "--json", "--flow", &format!("{client}:{sport}-{vip}/tcp")]).unwrap();
        let sim: mim_lb::status::Simulation = serde_json::from_str(&json).unwrap();
        assert_eq!(sim.verdict, "XDP_TX", "{json}");
        sim.backend.unwrap_or_else(|| panic!("no backend in {json}"))
    };

    // Flows that exist: the simulation finds where they were sent.
    let held: Vec<TcpHold> = in_netns(lab.client_ns(), || (0..20).map(|_| TcpHold::connect(vip, T).unwrap()).collect()).unwrap();
    for h in &held {
        assert_eq!(simulate(h.local_addr().unwrap().port()), master_of(h.name()));
    }
    // Flows that do not exist yet: the simulation says where they will go, and they do.
    let before = gw.status().unwrap().services[0].new_flows;
    let predicted: Vec<(u16, IpAddr)> = (41000..41030).map(|p| (p, simulate(p))).collect();
    assert_eq!(gw.status().unwrap().services[0].new_flows, before, "simulate recorded flows");
    let mut masters = std::collections::BTreeSet::new();
    for (sport, want) in predicted {
        let name = in_netns(lab.client_ns(), || tcp_ask_from(vip, sport, T)).unwrap().unwrap();
        assert_eq!(master_of(&name), want, "flow from port {sport}");
        masters.insert(want);
    }
    assert!(masters.len() > 1, "30 flows all predicted on one master: the check is weak");

    let human = gw.ctl(&["simulate", "--flow", &format!("{client}:1-{}:22/tcp", lab.vip4())]).unwrap();
    assert!(human.contains("XDP_PASS (not_a_service)"), "{human}");
    let err = gw.ctl(&["simulate", "--flow", "nonsense"]).unwrap_err();
    assert!(format!("{err:#}").contains("is not a flow"), "{err:#}");
}

#[test]
fn status_reads_like_ipvsadm_and_bpftool_shows_field_names() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, "");
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    // A drain changes a third of the slots: connections there are recorded, so that FLOWS
    // has entries to dump (a table that never changed records no TCP connection).
    gw.ctl(&["drain", &vip.to_string(), &lab.master_addr4(0).to_string()]).unwrap();
    in_netns(lab.client_ns(), || tcp_ask_many(vip, 30, T)).unwrap().unwrap();

    let human = gw.ctl(&["status"]).unwrap();
    assert!(human.contains(&format!("TCP  {vip}")), "{human}");
    // The socket may also be given before the command, as `cargo xtask lab --keep` prints it
    // (no MIM_LB_SOCKET here); a command that does not talk to a daemon refuses it.
    let binary = mim_lb_tests::gateway::mim_lb_binary();
    let socket = gw.socket().to_str().unwrap();
    let before = lab.run_in(lab.gateway_ns(), binary.to_str().unwrap(), &["--socket", socket, "status"]).unwrap();
    assert_eq!(before.lines().nth(1), human.lines().nth(1), "{before}");
    let err = lab.run_in(lab.gateway_ns(), binary.to_str().unwrap(), &["--socket", socket, "run", "--config", "/nonexistent"]).unwrap_err();
    assert!(format!("{err:#}").contains("is for the commands that talk to a running daemon"), "{err:#}");
    for i in 0..lab.master_count() {
        assert!(human.contains(&format!("-> {}", lab.master_addr4(i))), "{human}");
    }
    assert!(human.contains("forwarded"), "{human}");

    let dump = lab
        .run_in(lab.gateway_ns(), "bpftool", &["map", "dump", "pinned", gw.pin_dir().join("BACKENDS").to_str().unwrap()])
        .unwrap();
    for field in ["\"mac\"", "\"state\"", "\"weight\"", "\"service_id\"", "\"addr\"", "\"health\""] {
        assert!(dump.contains(field), "bpftool's dump of BACKENDS lacks {field}");
    }
    let flows = lab
        .run_in(lab.gateway_ns(), "bpftool", &["map", "dump", "pinned", gw.pin_dir().join("FLOWS").to_str().unwrap()])
        .unwrap();
    assert!(flows.contains("\"backend_id\"") && flows.contains("\"sport\""), "bpftool's dump of FLOWS lacks field names");
}

#[test]
fn cli_errors_are_clear_without_a_daemon() {
    let lab = Lab::new(LabSpec::masters(1)).unwrap();
    let socket = std::env::temp_dir().join(format!("mimlb-none-{:x}.sock", std::process::id()));
    let bin = mim_lb_tests::gateway::mim_lb_binary();
    let err = lab.run_in(lab.gateway_ns(), bin.to_str().unwrap(), &["status", "--socket", socket.to_str().unwrap()]).unwrap_err();
    assert!(format!("{err:#}").contains("no mim-lb daemon is running"), "{err:#}");
}

/// The control socket is root's only: another user gets a clear refusal, not a hang.
#[test]
fn the_control_socket_refuses_other_users() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, "");
    let mode = std::fs::metadata(gw.socket()).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap();
    assert_eq!(mode, 0o600);
    let bin = mim_lb_tests::gateway::mim_lb_binary();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&bin).args(["status", "--socket", gw.socket().to_str().unwrap()]);
    let out = mim_lb_tests::output_within(&mut cmd, mim_lb_tests::RUN_TIMEOUT).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied") && stderr.contains("run this as root"), "{stderr}");
}

/// The daemon runs with exactly the capabilities the systemd unit leaves it
/// (`CapabilityBoundingSet=` and `NoNewPrivileges=` of dist/mim-lb.service, read from the
/// file so the two cannot drift apart): it loads, attaches, pins, checks, serves and stops.
#[test]
fn the_daemon_works_with_the_units_capabilities_only() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/mim-lb.service")).unwrap();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds capabilities")
        .split_whitespace()
        .map(|c| format!("+{}", c.to_lowercase().trim_start_matches("cap_")))
        .collect();
    assert!(unit.lines().any(|l| l == "NoNewPrivileges=yes"));
    let bounding = format!("-all,{}", caps.join(","));
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let mut gw = Gateway::start_wrapped(&mut lab, &config, Mode::Generic, &["setpriv", "--bounding-set", &bounding, "--no-new-privs"]).unwrap();
    gw.wait_all_up().unwrap();
    // The daemon really runs with the reduced set: CAP_SYS_PTRACE (not in the unit) is gone.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.proc().pid())).unwrap();
    let bnd = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim();
    let bnd = u64::from_str_radix(bnd, 16).unwrap();
    const CAP_SYS_PTRACE: u32 = 19;
    assert_eq!(bnd & (1 << CAP_SYS_PTRACE), 0, "the daemon kept capabilities the unit does not give: {bnd:x}");
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let names = in_netns(lab.client_ns(), || tcp_ask_many(vip, 30, T)).unwrap().unwrap();
    let masters: std::collections::BTreeSet<&String> = names.iter().collect();
    assert!(masters.len() > 1, "30 connections all reached one master: {masters:?}");
    assert!(gw.pin_dir().join("XDP_LINK").exists(), "the daemon pinned nothing");
    gw.stop().unwrap();
    assert!(!gw.pin_dir().join("XDP_LINK").exists(), "the daemon could not remove its pins on a clean stop");
}

/// One GET of `path` from the gateway's metrics endpoint: the status line and the body.
fn get(lab: &Lab, path: &str) -> (String, String) {
    in_netns(lab.gateway_ns(), || -> anyhow::Result<(String, String)> {
        let mut stream = TcpStream::connect_timeout(&METRICS.parse().unwrap(), T)?;
        stream.set_read_timeout(Some(T))?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
    })
    .unwrap()
    .unwrap()
}

/// The metric families OPERATIONS.md documents ("Metrics"), with their type and label names.
fn documented_families() -> BTreeMap<String, (String, Vec<String>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../OPERATIONS.md")).unwrap();
    let section = doc.split("\n## Metrics\n").nth(1).unwrap().split("\n## ").next().unwrap();
    let service = ["service", "vip", "port", "protocol"].map(String::from);
    section
        .lines()
        .filter(|l| l.starts_with("| `mim_lb_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let labels = cells[3]
                .split(',')
                .map(|c| c.trim().trim_matches('`'))
                .filter(|c| !c.is_empty())
                .flat_map(|c| if c == "service" { service.to_vec() } else { vec![c.to_owned()] })
                .collect();
            (cells[1].trim_matches('`').to_owned(), (cells[2].to_owned(), labels))
        })
        .collect()
}

/// Each family of a scrape: its `# TYPE` and the label names of every one of its series.
fn scraped_families(text: &str) -> BTreeMap<String, (String, Vec<Vec<String>>)> {
    let mut families: BTreeMap<String, (String, Vec<Vec<String>>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            // OpenMetrics names a counter's family without `_total`, its series with it.
            let name = if kind == "counter" && !name.ends_with("_total") { format!("{name}_total") } else { name.to_owned() };
            families.insert(name, (kind.to_owned(), vec![]));
        } else if line.starts_with("mim_lb_") {
            let name = line.split(['{', ' ']).next().unwrap();
            let labels = line
                .split_once('{')
                .map(|(_, rest)| rest.split('}').next().unwrap())
                .map(|l| l.split(',').map(|kv| kv.split('=').next().unwrap().to_owned()).collect())
                .unwrap_or_default();
            families.get_mut(name).unwrap_or_else(|| panic!("series {line:?} has no # TYPE")).1.push(labels);
        }
    }
    families
}

/// OPERATIONS.md's list of metrics against a real scrape, both ways: every documented family
/// is served, with its type and exactly its labels on every series; nothing undocumented is
/// served; every backend has a series for each of the five states.
#[test]
fn every_documented_metric_is_served_with_its_labels() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    // With [announce] (its table is the lab gateway's own), so that its families are served too.
    let gw = start(&mut lab, &format!("metrics_listen = \"{METRICS}\"\n[announce]\ntable = 100"));
    // The connection gauges are served once the connections were first counted: about 7 s
    // after the start, when the sketch's six windows are all of this daemon (OPERATIONS.md).
    gw.wait_until("the first connection count", Duration::from_secs(15), |s| s.connections.is_some()).unwrap();
    let text = scrape(&lab);
    let documented = documented_families();
    assert!(documented.len() >= 16, "the doc's table was not found: {documented:?}");
    let served = scraped_families(&text);
    for (name, (kind, labels)) in &documented {
        let (served_kind, series) = served.get(name).unwrap_or_else(|| panic!("{name} is documented but not served:\n{text}"));
        assert_eq!(served_kind, kind, "{name}: type");
        assert!(!series.is_empty(), "{name} has no series");
        for got in series {
            assert_eq!(got, labels, "{name}: labels");
        }
    }
    let undocumented: Vec<&String> = served.keys().filter(|n| !documented.contains_key(*n)).collect();
    assert!(undocumented.is_empty(), "served but not in OPERATIONS.md: {undocumented:?}");
    for i in 0..lab.master_count() {
        for state in ["up", "down", "draining", "disabled", "removing"] {
            let series = format!("backend=\"{}\",state=\"{state}\"}}", lab.master_addr4(i));
            assert!(text.lines().any(|l| l.starts_with("mim_lb_backend_state{") && l.contains(&series)), "no {series}");
        }
    }
    // Other paths are neither the metrics nor the status page.
    for path in ["/index.html", "/metrics/extra", "/status"] {
        let (status_line, _) = get(&lab, path);
        assert!(status_line.starts_with("HTTP/1.1 404"), "GET {path}: {status_line}");
    }
}

/// `dist/grafana-dashboard.json` queries only metrics a real scrape serves, each with at least
/// one series (a panel on a name that does not exist stays empty without an error).
#[test]
fn the_grafana_dashboard_queries_only_served_metrics() {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let _gw = start(&mut lab, &format!("metrics_listen = \"{METRICS}\""));
    let text = scrape(&lab);
    let served = scraped_families(&text);
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "too few queries found: {queries:?}");
    let mut names: Vec<String> = queries
        .iter()
        .flat_map(|q| {
            q.match_indices("mim_lb_").map(|(i, _)| {
                q[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>()
            }).collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    for name in &names {
        let (_, series) = served.get(name).unwrap_or_else(|| panic!("the dashboard queries {name}, which is not served:\n{text}"));
        assert!(!series.is_empty(), "{name} is served without a series");
    }
}

/// Every PromQL string of a Grafana dashboard: panel targets' `expr` and variables' queries.
fn collect_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

/// A taken `metrics_listen` fails the start with an error naming the address, before anything
/// touches the kernel: no pins, nothing attached.
#[test]
fn a_taken_metrics_address_fails_the_start_before_touching_the_kernel() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let mut gw = start(&mut lab, "");
    gw.stop().unwrap();
    let _taken = in_netns(lab.gateway_ns(), || std::net::TcpListener::bind(METRICS)).unwrap().unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], &format!("metrics_listen = \"{METRICS}\""));
    gw.write_config(&config).unwrap();
    let (status, log) = gw.restart_failing(&mut lab, &[]).unwrap();
    assert!(!status.success(), "the start succeeded on a taken address:\n{log}");
    assert!(log.contains(&format!("listening for metrics on {METRICS}: Address already in use")), "{log}");
    // The pin directory itself may exist: the instance lock is taken on it first.
    let pins: Vec<_> = std::fs::read_dir(gw.pin_dir()).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(pins.is_empty(), "the failed start pinned {pins:?}");
    let link = lab.run_in(lab.gateway_ns(), "ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert!(!link.contains("xdp"), "the failed start attached a program: {link}");
}

/// A second daemon with the same control socket (and its own pins) is refused with the
/// documented message; the first keeps its socket and keeps serving.
#[test]
fn a_second_daemon_on_the_same_control_socket_is_refused() {
    let mut lab = Lab::new(LabSpec::masters(1)).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let gw = start(&mut lab, &format!("metrics_listen = \"{METRICS}\""));
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let other = gw.config_path().with_file_name("second.toml");
    let other_pins = format!("{}-second", gw.pin_dir().display());
    let _cleanup = RemoveOnDrop(other_pins.clone().into());
    let socket = gw.socket().display().to_string();
    std::fs::write(&other, format!("pin_dir = \"{other_pins}\"\ncontrol_socket = \"{socket}\"\n{config}")).unwrap();

    let (status, log) = mim_lb_tests::gateway::run_failing(&mut lab, &other).unwrap();
    assert!(!status.success(), "the second daemon started:\n{log}");
    let want = format!("another mim-lb is running with control socket {socket} (it holds a lock on {socket}.lock)");
    assert!(log.contains(&want), "{log}");
    let pins: Vec<_> = std::fs::read_dir(&other_pins).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(pins.is_empty(), "the refused daemon pinned {pins:?}");
    // The first one still answers on its socket and its metrics, and forwards.
    assert_eq!(gw.query_status().unwrap().services[0].backends[0].state, "up");
    assert!(get(&lab, "/metrics").0.starts_with("HTTP/1.1 200"));
    let vip = SocketAddr::new(lab.vip4().into(), PORT);
    let names = in_netns(lab.client_ns(), || tcp_ask_many(vip, 5, T)).unwrap().unwrap();
    let masters: Vec<String> = (0..lab.master_count()).map(|i| lab.master_name(i)).collect();
    assert!(names.iter().all(|n| masters.contains(n)), "connections reached something other than a master: {names:?}");
}

struct RemoveOnDrop(std::path::PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
