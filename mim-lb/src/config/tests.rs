use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use mim_lb_common::limits;

use super::*;

const MINIMAL: &str = r#"
interface = "eth0"

[[service]]
name = "mim-master"
vip = "10.0.0.100"
port = 7000

[[service.backend]]
address = "10.0.0.11"
mac = "02:00:00:00:00:11"
"#;

/// A config with one service made of `service` lines, followed by `rest` (backends, more
/// services).
fn with_service(service: &str, rest: &str) -> String {
    format!("interface = \"eth0\"\n\n[[service]]\n{service}\n{rest}")
}

fn backend(address: &str, mac: &str) -> String {
    format!("[[service.backend]]\naddress = \"{address}\"\nmac = \"{mac}\"\n")
}

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text) {
        Ok(c) => panic!("accepted:\n{text}\nas {c:#?}"),
        Err(e @ ConfigError::Invalid { .. }) => {
            // Display is the problems, one per line.
            let shown: Vec<String> = e.to_string().lines().map(str::to_owned).collect();
            let listed: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
            assert_eq!(shown, listed);
            listed
        }
        Err(e) => panic!("expected an invalid-value error, got: {e}"),
    }
}

/// Asserts that `text` is rejected with exactly one problem, `expected`.
fn rejects(text: &str, expected: &str) {
    assert_eq!(problems(text), vec![expected.to_owned()], "config:\n{text}");
}

fn syntax_error(text: &str) -> (usize, String) {
    match Config::parse(text) {
        Err(ConfigError::Syntax {
            line,
            message,
            file: None,
            ..
        }) => (line, message),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.interface, "eth0");
    assert_eq!(c.xdp_mode, XdpMode::Auto);
    assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/mim-lb"));
    assert_eq!(c.flow_table_size, limits::DEFAULT_FLOW_TABLE_SIZE);
    assert_eq!(
        c.services,
        vec![Service {
            name: "mim-master".into(),
            vip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)),
            port: 7000,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Maglev,
            table_size: limits::MAGLEV_DEFAULT_TABLE_SIZE,
            health: HealthCheck::default(),
            slow_start: Duration::ZERO,
            flap_damping: FlapDamping { max_changes: 6, window: Duration::from_secs(60), hold: Duration::from_secs(30) },
            backends: vec![Backend {
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11)),
                mac: Some([2, 0, 0, 0, 0, 0x11]),
                weight: 100,
            }],
        }]
    );
}

#[test]
fn example_parses() {
    let c = Config::parse(Config::example()).unwrap();
    assert_eq!(c.services.len(), 1);
    let addrs: Vec<String> = c.services[0]
        .backends
        .iter()
        .map(|b| b.address.to_string())
        .collect();
    assert_eq!(addrs, ["10.0.0.11", "10.0.0.12", "10.0.0.13"]);
    assert!(c.services[0].backends.iter().all(|b| b.mac.is_none()), "MACs come from the neighbour table");
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9469".parse().unwrap()));
}

#[test]
fn every_key_set_explicitly() {
    let text = r#"
interface = "ens1f0"
xdp_mode = "native"
pin_dir = "/sys/fs/bpf/other"
flow_table_size = 2048

[[service]]
name = "dns.v6_1-a"
vip = "2001:db8::100"
port = 53
protocol = "udp"
scheduler = "maglev-source"
table_size = 251
health = { check = "none" }

[[service.backend]]
address = "2001:db8::11"
mac = "0A:bc:DE:f0:1:2"
weight = 0

[[service.backend]]
address = "2001:db8::12"
mac = "02:00:00:00:00:12"
weight = 65535

[[service]]
name = "empty"
vip = "10.0.0.100"
port = 80
"#;
    let c = Config::parse(text).unwrap();
    assert_eq!(c.xdp_mode, XdpMode::Native);
    assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/other"));
    assert_eq!(c.flow_table_size, 2048);
    let s = &c.services[0];
    assert_eq!(s.vip, "2001:db8::100".parse::<IpAddr>().unwrap());
    assert_eq!(
        (s.port, s.protocol, s.scheduler, s.table_size),
        (53, Protocol::Udp, Scheduler::MaglevSource, 251)
    );
    assert_eq!(s.backends[0].mac, Some([0x0a, 0xbc, 0xde, 0xf0, 1, 2]));
    assert_eq!(s.backends[0].weight, 0);
    assert_eq!(s.backends[1].weight, 65535);
    assert_eq!(s.endpoint(), "[2001:db8::100]:53/udp");
    // A service without backends is allowed: its VIP is claimed, traffic is dropped.
    assert!(c.services[1].backends.is_empty());
    assert_eq!(c.services[1].endpoint(), "10.0.0.100:80/tcp");
}

#[test]
fn displays() {
    assert_eq!(XdpMode::Auto.to_string(), "auto");
    assert_eq!(XdpMode::Native.to_string(), "native");
    assert_eq!(XdpMode::Generic.to_string(), "generic");
    assert_eq!(Protocol::Tcp.to_string(), "tcp");
    assert_eq!(Protocol::Udp.to_string(), "udp");
    assert_eq!(Protocol::Tcp.number(), 6);
    assert_eq!(Protocol::Udp.number(), 17);
    assert_eq!(Scheduler::Maglev.to_string(), "maglev");
    assert_eq!(Scheduler::MaglevSource.to_string(), "maglev-source");
    assert_eq!(format_mac(&[2, 0, 0, 0, 0, 0x11]), "02:00:00:00:00:11");
    assert_eq!(
        format_mac(&[0xff, 0xab, 0, 1, 0x10, 0xfe]),
        "ff:ab:00:01:10:fe"
    );
}

#[test]
fn mac_parsing() {
    assert_eq!(parse_mac("02:00:00:00:00:11"), Some([2, 0, 0, 0, 0, 0x11]));
    assert_eq!(parse_mac("2:0:0:0:0:11"), Some([2, 0, 0, 0, 0, 0x11]));
    assert_eq!(
        parse_mac("AA:bb:Cc:00:00:00"),
        Some([0xaa, 0xbb, 0xcc, 0, 0, 0])
    );
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:11:22",
        "02:00:00:00:00:",
        "002:00:00:00:00:11",
        "zz:00:00:00:00:00",
        "02-00-00-00-00-11",
        "+2:00:00:00:00:11",
        " 02:00:00:00:00:11",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad:?}");
    }
    for mac in [[2, 0, 0, 0, 0, 0x11], [0xff; 6], [0; 6]] {
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
    }
}

// ---- top-level keys ----

#[test]
fn xdp_modes() {
    for (text, mode) in [
        ("auto", XdpMode::Auto),
        ("native", XdpMode::Native),
        ("generic", XdpMode::Generic),
    ] {
        let c = Config::parse(&format!("xdp_mode = \"{text}\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.xdp_mode, mode);
    }
    rejects(
        &format!("xdp_mode = \"fast\"\n{MINIMAL}"),
        r#"xdp_mode: "fast" is not one of auto, native, generic"#,
    );
}

#[test]
fn interface_rules() {
    let swap =
        |name: &str| MINIMAL.replace(r#"interface = "eth0""#, &format!("interface = {name:?}"));
    rejects(&swap(""), "interface: must not be empty");
    rejects(
        &swap("abcdefghijklmnop"),
        r#"interface: "abcdefghijklmnop" is 16 bytes long; interface names have at most 15"#,
    );
    assert_eq!(
        Config::parse(&swap("abcdefghijklmno")).unwrap().interface,
        "abcdefghijklmno"
    );
    rejects(
        &swap("eth 0"),
        r#"interface: "eth 0" contains '/', ':' or whitespace, which interface names cannot"#,
    );
    rejects(
        &swap(".."),
        r#"interface: ".." is not a valid interface name"#,
    );
}

#[test]
fn interface_is_required() {
    let (line, message) = syntax_error(&MINIMAL.replace(r#"interface = "eth0""#, ""));
    assert_eq!(line, 1);
    assert!(message.contains("missing field `interface`"), "{message}");
}

#[test]
fn pin_dir_must_be_absolute() {
    rejects(
        &format!("pin_dir = \"bpf/mim\"\n{MINIMAL}"),
        r#"pin_dir: "bpf/mim" is not an absolute path"#,
    );
    rejects(
        &format!("pin_dir = \"\"\n{MINIMAL}"),
        r#"pin_dir: "" is not an absolute path"#,
    );
}

#[test]
fn flow_table_size_range() {
    let with = |n: i64| format!("flow_table_size = {n}\n{MINIMAL}");
    assert_eq!(Config::parse(&with(1024)).unwrap().flow_table_size, 1024);
    assert_eq!(
        Config::parse(&with(16_777_216)).unwrap().flow_table_size,
        16_777_216
    );
    rejects(
        &with(1023),
        "flow_table_size: 1023 is out of range 1024..=16777216",
    );
    rejects(
        &with(16_777_217),
        "flow_table_size: 16777217 is out of range 1024..=16777216",
    );
    rejects(
        &with(-1),
        "flow_table_size: -1 is out of range 1024..=16777216",
    );
}

#[test]
fn max_services_range_and_default() {
    let with = |n: i64| format!("max_services = {n}\n{MINIMAL}");
    assert_eq!(Config::parse(&with(1)).unwrap().max_services, Some(1));
    assert_eq!(Config::parse(&with(1)).unwrap().service_room(), (1, 1));
    assert_eq!(Config::parse(&with(64)).unwrap().service_room(), (64, 64));
    rejects(&with(0), "max_services: 0 is out of range 1..=64");
    rejects(&with(65), "max_services: 65 is out of range 1..=64");
    // Without it: twice the services configured, at least 8, at most 64; pins fit that
    // hold the services configured.
    let config = Config::parse(MINIMAL).unwrap();
    assert_eq!(config.max_services, None);
    assert_eq!(config.service_room(), (8, 1));
    let services = |n: u32| {
        let mut text = String::from("interface = \"eth0\"\n");
        for i in 0..n {
            text += &format!("[[service]]\nname = \"s{i}\"\nvip = \"10.0.0.100\"\nport = {}\n", i + 1);
        }
        text
    };
    assert_eq!(Config::parse(&services(5)).unwrap().service_room(), (10, 5));
    assert_eq!(Config::parse(&services(40)).unwrap().service_room(), (64, 40));
    rejects(
        &format!("max_services = 2\n{}", services(3)),
        "max_services: 3 services are configured, more than max_services (2)",
    );
}

#[test]
fn at_least_one_service() {
    rejects(
        "interface = \"eth0\"\n",
        "service: no service is configured; at least one [[service]] is required",
    );
}

#[test]
fn at_most_max_services() {
    let mut text = String::from("interface = \"eth0\"\n");
    for i in 0..=limits::MAX_SERVICES {
        text += &format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"10.0.0.100\"\nport = {}\n",
            i + 1
        );
    }
    rejects(
        &text,
        "service: 65 services are configured; at most 64 are supported",
    );
}

#[test]
fn at_most_max_backends_in_all() {
    // 63 services of 65 backends: 4095 backends, the most there can be.
    let mut ok = String::from("interface = \"eth0\"\n");
    for i in 0..63 {
        ok += &format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"10.0.0.100\"\nport = {}\n",
            i + 1
        );
        for j in 0..65 {
            ok += &backend(&format!("10.1.{i}.{}", j + 1), "02:00:00:00:00:11");
        }
    }
    assert!(Config::parse(&ok).is_ok());
    let one_more = format!("{ok}{}", backend("10.2.0.1", "02:00:00:00:00:11"));
    rejects(
        &one_more,
        "service.backend: 4096 backends are configured over all services; at most 4095 are \
         supported",
    );
}

// ---- service keys ----

#[test]
fn service_name_rules() {
    let named = |n: &str| MINIMAL.replace(r#"name = "mim-master""#, &format!("name = {n:?}"));
    assert!(Config::parse(&named(&"a".repeat(64))).is_ok());
    assert!(Config::parse(&named("A-z_0.9")).is_ok());
    let reason = "is not a valid name (1 to 64 characters out of A-Z, a-z, 0-9, '_', '.' and '-')";
    rejects(&named(""), &format!(r#"service[0].name: "" {reason}"#));
    rejects(
        &named("a b"),
        &format!(r#"service[0].name: "a b" {reason}"#),
    );
    rejects(&named("é"), &format!(r#"service[0].name: "é" {reason}"#));
    let long = "a".repeat(65);
    rejects(
        &named(&long),
        &format!(r#"service[0].name: "{long}" {reason}"#),
    );
}

#[test]
fn service_names_are_unique() {
    let text = format!(
        "{MINIMAL}\n[[service]]\nname = \"mim-master\"\nvip = \"10.0.0.100\"\nport = 7001\n"
    );
    rejects(
        &text,
        r#"service[1].name: "mim-master" is already the name of service[0]"#,
    );
}

#[test]
fn service_endpoints_are_unique() {
    let text = format!(
        "{MINIMAL}
[[service]]
name = \"other-port\"
vip = \"10.0.0.100\"
port = 7001
[[service]]
name = \"web\"
vip = \"10.0.0.100\"
port = 7000
[[service]]
name = \"udp\"
vip = \"10.0.0.100\"
port = 7000
protocol = \"udp\"
health = {{ check = \"none\" }}
[[service]]
name = \"v6\"
vip = \"2001:db8::1\"
port = 7000
[[service]]
name = \"v6-again\"
vip = \"2001:db8:0::1\"
port = 7000
"
    );
    assert_eq!(
        problems(&text),
        [
            r#"service[2] ("web"): duplicate of service[0] ("mim-master"): both are 10.0.0.100:7000/tcp"#,
            r#"service[5] ("v6-again"): duplicate of service[4] ("v6"): both are [2001:db8::1]:7000/tcp"#,
        ]
    );
}

#[test]
fn invalid_endpoints_are_not_duplicates() {
    // The second service's placeholders (bad vip, bad protocol) must not collide with the first.
    let text = format!(
        "{MINIMAL}
[[service]]
name = \"a\"
vip = \"0.0.0.0\"
port = 7000
[[service]]
name = \"b\"
vip = \"10.0.0.100\"
port = 7000
protocol = \"sctp\"
"
    );
    assert_eq!(
        problems(&text),
        [
            "service[1].vip: 0.0.0.0 is the unspecified address",
            r#"service[2].protocol: "sctp" is not one of tcp, udp"#,
        ]
    );
}

#[test]
fn vip_rules() {
    let vip = |v: &str| MINIMAL.replace(r#"vip = "10.0.0.100""#, &format!("vip = {v:?}"));
    rejects(
        &vip("10.0.0.300"),
        r#"service[0].vip: "10.0.0.300" is not an IP address"#,
    );
    rejects(
        &vip("eth0"),
        r#"service[0].vip: "eth0" is not an IP address"#,
    );
    rejects(
        &vip("0.0.0.0"),
        "service[0].vip: 0.0.0.0 is the unspecified address",
    );
    rejects(
        &vip("127.0.0.2"),
        "service[0].vip: 127.0.0.2 is a loopback address",
    );
    rejects(
        &vip("224.0.0.1"),
        "service[0].vip: 224.0.0.1 is a multicast address",
    );
    rejects(
        &vip("255.255.255.255"),
        "service[0].vip: 255.255.255.255 is the broadcast address",
    );
    // The IPv4 backend of an IPv6 vip would be a second problem, but a vip that is itself
    // wrong is not compared against.
    rejects(&vip("::"), "service[0].vip: :: is the unspecified address");
    rejects(&vip("::1"), "service[0].vip: ::1 is a loopback address");
    rejects(
        &vip("ff02::1"),
        "service[0].vip: ff02::1 is a multicast address",
    );
    rejects(
        &vip("::ffff:10.0.0.100"),
        "service[0].vip: ::ffff:10.0.0.100 is an IPv4-mapped IPv6 address (write the IPv4 \
         address instead)",
    );
}

#[test]
fn port_range() {
    let port = |p: i64| MINIMAL.replace("port = 7000", &format!("port = {p}"));
    assert_eq!(Config::parse(&port(1)).unwrap().services[0].port, 1);
    assert_eq!(Config::parse(&port(65535)).unwrap().services[0].port, 65535);
    rejects(&port(0), "service[0].port: 0 is out of range 1..=65535");
    rejects(
        &port(65536),
        "service[0].port: 65536 is out of range 1..=65535",
    );
    rejects(&port(-80), "service[0].port: -80 is out of range 1..=65535");
}

#[test]
fn protocol_and_scheduler_names() {
    let extra = |line: &str| {
        with_service(
            &format!("name = \"s\"\nvip = \"10.0.0.100\"\nport = 1\n{line}\nhealth = {{ port = 2 }}"),
            "",
        )
    };
    assert_eq!(
        Config::parse(&extra("protocol = \"udp\""))
            .unwrap()
            .services[0]
            .protocol,
        Protocol::Udp
    );
    rejects(
        &extra("protocol = \"TCP\""),
        r#"service[0].protocol: "TCP" is not one of tcp, udp"#,
    );
    assert_eq!(
        Config::parse(&extra("scheduler = \"maglev-source\""))
            .unwrap()
            .services[0]
            .scheduler,
        Scheduler::MaglevSource
    );
    rejects(
        &extra("scheduler = \"rr\""),
        r#"service[0].scheduler: "rr" is not one of maglev, maglev-source"#,
    );
}

#[test]
fn table_size_rules() {
    let sized = |n: i64| MINIMAL.replace("port = 7000", &format!("port = 7000\ntable_size = {n}"));
    assert_eq!(
        Config::parse(&sized(65537)).unwrap().services[0].table_size,
        65537
    );
    assert_eq!(Config::parse(&sized(2)).unwrap().services[0].table_size, 2);
    rejects(&sized(65536), "service[0].table_size: 65536 is not a prime");
    rejects(&sized(9), "service[0].table_size: 9 is not a prime");
    rejects(
        &sized(65539),
        "service[0].table_size: 65539 is out of range 2..=65537 (and must be a prime)",
    );
    rejects(
        &sized(1),
        "service[0].table_size: 1 is out of range 2..=65537 (and must be a prime)",
    );
    rejects(
        &sized(0),
        "service[0].table_size: 0 is out of range 2..=65537 (and must be a prime)",
    );

    let three = with_service(
        "name = \"s\"\nvip = \"10.0.0.100\"\nport = 1\ntable_size = 3",
        &(backend("10.0.0.1", "02:00:00:00:00:01")
            + &backend("10.0.0.2", "02:00:00:00:00:02")
            + &backend("10.0.0.3", "02:00:00:00:00:03")),
    );
    rejects(
        &three,
        "service[0].table_size: 3 is not greater than the number of backends (3)",
    );
    assert!(Config::parse(&three.replace("table_size = 3", "table_size = 5")).is_ok());
}

#[test]
fn primality() {
    let primes: Vec<u32> = (0..50).filter(|&n| validate::is_prime(n)).collect();
    assert_eq!(
        primes,
        [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
    );
    assert!(validate::is_prime(65537));
    assert!(validate::is_prime(65521));
    assert!(!validate::is_prime(65535));
    assert!(!validate::is_prime(u32::MAX));
    assert!(validate::is_prime(4_294_967_291));
}

// ---- backend keys ----

fn one_backend(lines: &str) -> String {
    with_service(
        "name = \"s\"\nvip = \"10.0.0.100\"\nport = 7000",
        &format!("[[service.backend]]\n{lines}\n"),
    )
}

#[test]
fn backend_weight() {
    let weighted = |w: i64| {
        one_backend(&format!(
            "address = \"10.0.0.11\"\nmac = \"02:00:00:00:00:11\"\nweight = {w}"
        ))
    };
    assert_eq!(
        Config::parse(&weighted(0)).unwrap().services[0].backends[0].weight,
        0
    );
    assert_eq!(
        Config::parse(&weighted(65535)).unwrap().services[0].backends[0].weight,
        65535
    );
    rejects(
        &weighted(70000),
        "service[0].backend[0].weight: 70000 is out of range 0..=65535",
    );
    rejects(
        &weighted(-1),
        "service[0].backend[0].weight: -1 is out of range 0..=65535",
    );

    // The example key from the issue: the second service's first backend.
    let text = format!(
        "{MINIMAL}
[[service]]
name = \"web\"
vip = \"10.0.0.100\"
port = 80
[[service.backend]]
address = \"10.0.0.11\"
mac = \"02:00:00:00:00:11\"
weight = 70000
"
    );
    rejects(
        &text,
        "service[1].backend[0].weight: 70000 is out of range 0..=65535",
    );
}

#[test]
fn backend_address_rules() {
    let at = |a: &str| one_backend(&format!("address = {a:?}\nmac = \"02:00:00:00:00:11\""));
    rejects(
        &at("10.0.0"),
        r#"service[0].backend[0].address: "10.0.0" is not an IP address"#,
    );
    rejects(
        &at("0.0.0.0"),
        "service[0].backend[0].address: 0.0.0.0 is the unspecified address",
    );
    rejects(
        &at("127.0.0.1"),
        "service[0].backend[0].address: 127.0.0.1 is a loopback address",
    );
    rejects(
        &at("239.1.1.1"),
        "service[0].backend[0].address: 239.1.1.1 is a multicast address",
    );
    rejects(
        &at("255.255.255.255"),
        "service[0].backend[0].address: 255.255.255.255 is the broadcast address",
    );
    rejects(
        &at("2001:db8::1"),
        "service[0].backend[0].address: IPv6 address 2001:db8::1 but the service vip 10.0.0.100 \
         is IPv4",
    );
    rejects(
        &at("10.0.0.100"),
        "service[0].backend[0].address: 10.0.0.100 is the service's own vip",
    );

    let v6 = with_service(
        "name = \"s\"\nvip = \"2001:db8::100\"\nport = 7000",
        &backend("10.0.0.11", "02:00:00:00:00:11"),
    );
    rejects(
        &v6,
        "service[0].backend[0].address: IPv4 address 10.0.0.11 but the service vip 2001:db8::100 \
         is IPv6",
    );
}

#[test]
fn backend_addresses_are_unique_within_a_service() {
    let text = format!(
        "{MINIMAL}{}{}",
        backend("10.0.0.11", "02:00:00:00:00:12"),
        backend("10.0.0.12", "02:00:00:00:00:13"),
    );
    rejects(
        &text,
        "service[0].backend[1].address: 10.0.0.11 is listed twice in this service",
    );

    // The same backend serving two services is fine.
    let text = format!(
        "{MINIMAL}[[service]]\nname = \"b\"\nvip = \"10.0.0.100\"\nport = 7001\n{}",
        backend("10.0.0.11", "02:00:00:00:00:11"),
    );
    assert!(Config::parse(&text).is_ok());
}

#[test]
fn backend_mac_rules() {
    let mac = |m: &str| one_backend(&format!("address = \"10.0.0.11\"\nmac = {m:?}"));
    rejects(
        &mac("zz:00:00:00:00:00"),
        r#"service[0].backend[0].mac: "zz:00:00:00:00:00" is not a MAC address (expected six hex octets like 02:00:00:00:00:11)"#,
    );
    rejects(
        &mac("01:00:5e:00:00:01"),
        "service[0].backend[0].mac: 01:00:5e:00:00:01 is a multicast address; a backend needs a \
         unicast one",
    );
    rejects(
        &mac("ff:ff:ff:ff:ff:ff"),
        "service[0].backend[0].mac: ff:ff:ff:ff:ff:ff is a multicast address; a backend needs a \
         unicast one",
    );
    rejects(
        &mac("00:00:00:00:00:00"),
        "service[0].backend[0].mac: 00:00:00:00:00:00 is all zeros, not a usable address",
    );
    // Without a MAC the daemon resolves it from the neighbour table.
    let c = Config::parse(&one_backend("address = \"10.0.0.11\"")).unwrap();
    assert_eq!(c.services[0].backends[0].mac, None);
}

// ---- reporting ----

#[test]
fn all_problems_are_reported() {
    let text = r#"
interface = ""
xdp_mode = "turbo"
pin_dir = "relative"
flow_table_size = 10

[[service]]
name = "a"
vip = "10.0.0.300"
port = 0
protocol = "icmp"
scheduler = "wrr"
table_size = 4

[[service.backend]]
address = "10.0.0.11"
mac = "zz:00:00:00:00:00"
weight = 70000

[[service]]
name = "a"
vip = "10.0.0.100"
port = 80

[[service.backend]]
address = "2001:db8::1"
mac = "02:00:00:00:00:11"

[[service.backend]]
address = "2001:db8::1"
"#;
    assert_eq!(
        problems(text),
        [
            "interface: must not be empty",
            r#"xdp_mode: "turbo" is not one of auto, native, generic"#,
            r#"pin_dir: "relative" is not an absolute path"#,
            "flow_table_size: 10 is out of range 1024..=16777216",
            r#"service[0].vip: "10.0.0.300" is not an IP address"#,
            "service[0].port: 0 is out of range 1..=65535",
            r#"service[0].protocol: "icmp" is not one of tcp, udp"#,
            r#"service[0].scheduler: "wrr" is not one of maglev, maglev-source"#,
            "service[0].table_size: 4 is not a prime",
            r#"service[0].backend[0].mac: "zz:00:00:00:00:00" is not a MAC address (expected six hex octets like 02:00:00:00:00:11)"#,
            "service[0].backend[0].weight: 70000 is out of range 0..=65535",
            "service[1].backend[0].address: IPv6 address 2001:db8::1 but the service vip 10.0.0.100 is IPv4",
            "service[1].backend[1].address: IPv6 address 2001:db8::1 but the service vip 10.0.0.100 is IPv4",
            "service[1].backend[1].address: 2001:db8::1 is listed twice in this service",
            r#"service[1].name: "a" is already the name of service[0]"#,
        ]
    );
}

#[test]
fn unknown_keys_name_the_key_and_line() {
    let (line, message) =
        syntax_error(&MINIMAL.replace("port = 7000", "port = 7000\nprot = \"tcp\""));
    assert_eq!(line, 8);
    assert!(
        message.contains("unknown field `prot`, expected one of"),
        "{message}"
    );

    let (line, message) = syntax_error(&format!("{MINIMAL}weigth = 5\n"));
    assert_eq!(line, 12);
    assert!(message.contains("unknown field `weigth`"), "{message}");

    let (line, message) = syntax_error(&format!("colour = \"blue\"\n{MINIMAL}"));
    assert_eq!(line, 1);
    assert!(message.contains("unknown field `colour`"), "{message}");

    let err = Config::parse(&format!("{MINIMAL}\n\n[health]\n")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("line 14, column 2: unknown field `health`"),
        "{err}"
    );
}

#[test]
fn type_errors_name_the_line_and_the_key() {
    let (line, message) = syntax_error(&MINIMAL.replace("port = 7000", "port = \"7000\""));
    assert_eq!(line, 7);
    assert!(message.starts_with("service[0].port: invalid type"), "{message}");

    // Nested keys are named with their indexes, as the validation's errors name them.
    let (_, message) = syntax_error(&MINIMAL.replace("port = 7000", "port = 7000\ntable_size = 1.5"));
    assert!(message.starts_with("service[0].table_size: invalid type"), "{message}");

    // A missing key is reported at no place: no key written on line 1 is named for it.
    let (_, message) = syntax_error("pin_dir = \"/sys/fs/bpf/x\"\n");
    assert_eq!(message, "missing field `interface`");

    let (line, _) = syntax_error("interface = \"eth0\"\nservice = 3\n");
    assert_eq!(line, 2);

    let (line, message) = syntax_error("interface = \"eth0\n");
    assert_eq!(line, 1);
    assert!(!message.is_empty());
}

#[test]
fn file_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("mim-lb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let good = dir.join("good.toml");
    std::fs::write(&good, Config::example()).unwrap();
    assert_eq!(
        Config::from_file(&good).unwrap(),
        Config::parse(Config::example()).unwrap()
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, MINIMAL.replace("port = 7000", "port = 0")).unwrap();
    let err = Config::from_file(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: service[0].port: 0 is out of range 1..=65535",
            bad.display()
        )
    );
    assert_eq!(err.problems().len(), 1);

    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "interface = \n").unwrap();
    let err = Config::from_file(&broken).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}: line 1, column ", broken.display())),
        "{err}"
    );

    let missing = dir.join("missing.toml");
    let err = Config::from_file(&missing).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ipv6_service() {
    let text = with_service(
        "name = \"v6\"\nvip = \"2001:db8::100\"\nport = 443",
        &backend("2001:db8::11", "02:00:00:00:00:11"),
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(
        c.services[0].vip,
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100))
    );
    assert_eq!(
        c.services[0].backends[0].address,
        "2001:db8::11".parse::<IpAddr>().unwrap()
    );
}

// ---- daemon settings ----

#[test]
fn daemon_settings_have_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.control_socket, PathBuf::from("/run/mim-lb/control.sock"));
    assert_eq!(c.metrics_listen, None);
    assert_eq!(c.tcp_idle_timeout, Duration::from_secs(900));
    assert_eq!(c.udp_idle_timeout, Duration::from_secs(300));
}

#[test]
fn daemon_settings_are_checked() {
    let top = |line: &str| format!("{line}\n{MINIMAL}");
    let c = Config::parse(&top("metrics_listen = \"[::1]:9469\"\ncontrol_socket = \"/tmp/x.sock\"\ntcp_idle_timeout_s = 30\nudp_idle_timeout_s = 5")).unwrap();
    assert_eq!(c.metrics_listen, Some("[::1]:9469".parse().unwrap()));
    assert_eq!(c.control_socket, PathBuf::from("/tmp/x.sock"));
    assert_eq!(c.tcp_idle_timeout, Duration::from_secs(30));
    assert_eq!(c.udp_idle_timeout, Duration::from_secs(5));
    rejects(
        &top("metrics_listen = \"localhost\""),
        r#"metrics_listen: "localhost" is not an address and port like 127.0.0.1:9469 or [::1]:9469"#,
    );
    rejects(
        &top("control_socket = \"run/x.sock\""),
        r#"control_socket: "run/x.sock" is not an absolute path to a file"#,
    );
    rejects(&top("tcp_idle_timeout_s = 0"), "tcp_idle_timeout_s: 0 is out of range 1..=604800");
}

// ---- health checks ----

fn with_health(lines: &str) -> String {
    with_service(
        "name = \"s\"\nvip = \"10.0.0.100\"\nport = 7000",
        &format!("[service.health]\n{lines}\n\n{}", backend("10.0.0.11", "02:00:00:00:00:11")),
    )
}

fn health_of(lines: &str) -> HealthCheck {
    Config::parse(&with_health(lines)).unwrap().services[0].health.clone()
}

#[test]
fn health_defaults_to_tcp() {
    let h = Config::parse(MINIMAL).unwrap().services[0].health.clone();
    assert_eq!(h, HealthCheck::default());
    assert_eq!(h.kind, CheckKind::Tcp);
    assert_eq!((h.interval, h.timeout, h.rise, h.fall, h.port), (Duration::from_millis(1000), Duration::from_millis(500), 2, 3, None));
    assert_eq!(h.port_for(7000), 7000);
    // A short interval alone also shortens the default timeout.
    let h = health_of("interval_ms = 200");
    assert_eq!(h.timeout, Duration::from_millis(200));
}

#[test]
fn health_kinds_parse() {
    let h = health_of("check = \"http\"\npath = \"/health\"\nexpect_status = 204\nexpect_body = \"ok\"\nport = 8080\nrise = 1\nfall = 5");
    assert_eq!(
        h.kind,
        CheckKind::Http { path: "/health".into(), expect_status: 204, expect_body: Some("ok".into()) }
    );
    assert_eq!((h.port_for(7000), h.rise, h.fall), (8080, 1, 5));
    assert_eq!(
        health_of("check = \"http\"").kind,
        CheckKind::Http { path: "/".into(), expect_status: 200, expect_body: None }
    );
    assert_eq!(
        health_of("check = \"command\"\ncommand = [\"/bin/true\", \"{address}\", \"{port}\"]").kind,
        CheckKind::Command { argv: vec!["/bin/true".into(), "{address}".into(), "{port}".into()] }
    );
    assert_eq!(health_of("check = \"none\"").kind, CheckKind::None);
}

#[test]
fn health_rules() {
    rejects(&with_health("check = \"icmp\""), r#"service[0].health.check: "icmp" is not one of tcp, http, command, none"#);
    rejects(
        &with_health("interval_ms = 100\ntimeout_ms = 200"),
        "service[0].health.timeout_ms: 200 is longer than interval_ms (100): a check must end before the next one starts",
    );
    rejects(&with_health("interval_ms = 5"), "service[0].health.interval_ms: 5 is out of range 10..=3600000");
    rejects(&with_health("rise = 0"), "service[0].health.rise: 0 is out of range 1..=100");
    rejects(&with_health("fall = 101"), "service[0].health.fall: 101 is out of range 1..=100");
    rejects(&with_health("port = 70000"), "service[0].health.port: 70000 is out of range 1..=65535");
    rejects(
        &with_health("path = \"/x\""),
        r#"service[0].health.path: only applies to check = "http", but check is "tcp""#,
    );
    rejects(
        &with_health("check = \"http\"\ncommand = [\"/bin/true\"]"),
        r#"service[0].health.command: only applies to check = "command", but check is "http""#,
    );
    rejects(
        &with_health("check = \"http\"\npath = \"health\""),
        r#"service[0].health.path: "health" is not an HTTP path (it starts with '/' and has no spaces)"#,
    );
    rejects(
        &with_health("check = \"command\"\ncommand = [\"check-master\"]"),
        r#"service[0].health.command: "check-master" is not an absolute path (the daemon does not search PATH)"#,
    );
    assert_eq!(problems(&with_health("check = \"command\"")).len(), 1);
    let (_, message) = syntax_error(&with_health("retries = 3"));
    assert!(message.contains("retries"), "{message}");
}

#[test]
fn service_keys_parse_and_print() {
    let k: ServiceKey = "10.0.0.100:7000".parse().unwrap();
    assert_eq!(k, ServiceKey { vip: "10.0.0.100".parse().unwrap(), port: 7000, protocol: Protocol::Tcp });
    assert_eq!(k.to_string(), "10.0.0.100:7000/tcp");
    let k: ServiceKey = "[2001:db8::1]:53/udp".parse().unwrap();
    assert_eq!(k.to_string(), "[2001:db8::1]:53/udp");
    assert!("10.0.0.100".parse::<ServiceKey>().is_err());
    assert!("10.0.0.100:7000/sctp".parse::<ServiceKey>().is_err());
}


#[test]
fn a_udp_service_needs_a_check_that_can_see_it() {
    let udp = |health: &str| {
        with_service(
            "name = \"dns\"\nvip = \"10.0.0.100\"\nport = 53\nprotocol = \"udp\"",
            &format!("{health}\n{}", backend("10.0.0.11", "02:00:00:00:00:11")),
        )
    };
    rejects(
        &udp(""),
        "service[0].health: a tcp check of UDP port 53 cannot see the service; set health.port to a \
         TCP port the masters serve, or use check = \"command\" or \"none\"",
    );
    assert!(Config::parse(&udp("[service.health]\nport = 8053")).is_ok());
    assert!(Config::parse(&udp("[service.health]\ncheck = \"none\"")).is_ok());
}

#[test]
fn an_out_of_range_interval_does_not_invent_a_timeout_problem() {
    rejects(&with_health("interval_ms = 5\ntimeout_ms = 10"), "service[0].health.interval_ms: 5 is out of range 10..=3600000");
}

/// A key file in a directory of its own, with `mode`.
fn key_file(content: &[u8], mode: u32) -> (tempdir::Dir, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir::Dir::new();
    let path = dir.0.join("sync.key");
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    let shown = path.display().to_string();
    (dir, shown)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let path = std::env::temp_dir().join(format!("mimlb-cfg-{}-{}", std::process::id(), fastrand::u64(..)));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn sync_section_is_read_with_its_key() {
    let (_dir, path) = key_file(b"0123456789abcdef0123456789abcdef0123456789abcdef\n", 0o600);
    let c = Config::parse(&format!(
        "{MINIMAL}\n[sync]\nlisten = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\", \"10.0.0.4:7946\"]\nkey_file = \"{path}\"\npull_timeout_s = 5\n"
    ))
    .unwrap();
    let s = c.sync.unwrap();
    assert_eq!(s.listen, "10.0.0.2:7946".parse().unwrap());
    assert_eq!(s.peers.len(), 2);
    assert_eq!(s.key, b"0123456789abcdef0123456789abcdef0123456789abcdef", "surrounding whitespace is not key");
    assert_eq!(s.pull_timeout, Duration::from_secs(5));
    assert!(!format!("{s:?}").contains("0123456789"), "the key never reaches a log");
    assert!(Config::parse(MINIMAL).unwrap().sync.is_none());
}

#[test]
fn sync_mistakes_name_their_key() {
    let (_dir, short) = key_file(b"too short", 0o600);
    let (_dir2, open) = key_file(&[b'k'; 40], 0o644);
    let sync = |body: &str| format!("{MINIMAL}\n[sync]\n{body}\n");
    rejects(
        &sync(&format!("listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"{short}\"")),
        &format!("sync.key_file: {short} holds 9 bytes; the key must have at least 32 (e.g. `openssl rand -hex 32 > {short}`)"),
    );
    rejects(
        &sync(&format!("listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"{open}\"")),
        &format!("sync.key_file: {open} can be read by others (mode 644); `chmod 600` it"),
    );
    let (_dir3, good) = key_file(&[b'k'; 40], 0o600);
    rejects(
        &sync(&format!("listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.2:7946\"]\nkey_file = \"{good}\"")),
        "sync.peers: 10.0.0.2:7946 is this director's own sync.listen; list only the other directors",
    );
    rejects(
        &sync(&format!("listen = \"10.0.0.2\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"{good}\"")),
        "sync.listen: \"10.0.0.2\" is not an address and port like 10.0.0.2:7946 or [fd00::2]:7946",
    );
    rejects(
        &sync(&format!("listen = \"10.0.0.2:7946\"\npeers = []\nkey_file = \"{good}\"")),
        "sync.peers: no peer is listed; list the other directors' sync addresses, or remove [sync]",
    );
    rejects(
        &sync(&format!("listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"{good}\"\npull_timeout_s = 601")),
        "sync.pull_timeout_s: 601 is out of range 0..=600",
    );
    let grouped = |group: &str| sync(&format!("listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"{good}\"\ngroup = \"{group}\""));
    rejects(
        &grouped("10.0.0.9:7947"),
        "sync.group: 10.0.0.9 is not a multicast address; use one the directors' segment carries, like 239.255.77.1:7947 or [ff02::6d6c]:7947",
    );
    rejects(
        &grouped("224.0.0.18:7947"),
        "sync.group: 224.0.0.18 is in 224.0.0.0/24, reserved for routing protocols; use an administratively scoped group in 239.0.0.0/8",
    );
    rejects(&grouped("[ff02::6d6c]:7947"), "sync.group: the group and sync.listen must be of the same address family");
    rejects(&grouped("239.255.77.1"), "sync.group: \"239.255.77.1\" is not an address and port like 10.0.0.2:7946 or [fd00::2]:7946");
    let ok = Config::parse(&grouped("239.255.77.1:7947")).unwrap();
    assert_eq!(ok.sync.unwrap().group, Some("239.255.77.1:7947".parse().unwrap()));
    let v6 = Config::parse(&sync(&format!("listen = \"[fd00::2]:7946\"\npeers = [\"[fd00::3]:7946\"]\nkey_file = \"{good}\"\ngroup = \"[ff01::1]:7947\""))).unwrap_err();
    assert!(v6.to_string().contains("sync.group: ff01::1 is interface-local and never leaves this host; use a link-local group like ff02::6d6c"), "{v6}");
    rejects(
        &sync("listen = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"/nonexistent/mim-lb.key\""),
        "sync.key_file: cannot read /nonexistent/mim-lb.key: No such file or directory (os error 2)",
    );
}

#[test]
fn slow_start_is_read_in_seconds_and_checked() {
    let c = Config::parse(&with_service("name = \"w\"\nvip = \"10.0.0.100\"\nport = 80\nslow_start_s = 30", "")).unwrap();
    assert_eq!(c.services[0].slow_start, Duration::from_secs(30));
    let off = Config::parse(&with_service("name = \"w\"\nvip = \"10.0.0.100\"\nport = 80\nslow_start_s = 0", "")).unwrap();
    assert_eq!(off.services[0].slow_start, Duration::ZERO);
    rejects(
        &with_service("name = \"w\"\nvip = \"10.0.0.100\"\nport = 80\nslow_start_s = 3601", ""),
        "service[0].slow_start_s: 3601 is out of range 0..=3600",
    );
    rejects(
        &with_service("name = \"w\"\nvip = \"10.0.0.100\"\nport = 80\nslow_start_s = -1", ""),
        "service[0].slow_start_s: -1 is out of range 0..=3600",
    );
}

fn with_flap_damping(lines: &str) -> String {
    with_service("name = \"w\"\nvip = \"10.0.0.100\"\nport = 80", &format!("[service.flap_damping]\n{lines}\n"))
}

#[test]
fn flap_damping_is_read_and_checked() {
    let c = Config::parse(&with_flap_damping("max_changes = 4\nwindow_s = 10\nhold_s = 3")).unwrap();
    assert_eq!(
        c.services[0].flap_damping,
        FlapDamping { max_changes: 4, window: Duration::from_secs(10), hold: Duration::from_secs(3) }
    );
    let off = Config::parse(&with_flap_damping("max_changes = 0")).unwrap();
    assert_eq!(off.services[0].flap_damping.max_changes, 0);
    assert_eq!(off.services[0].flap_damping.window, Duration::from_secs(60), "unset keys keep their defaults");
    rejects(
        &with_flap_damping("max_changes = 1"),
        "service[0].flap_damping.max_changes: 1 would hold a master down after a single failure and recovery; \
         use at least 2, or 0 to turn flap damping off",
    );
    rejects(&with_flap_damping("max_changes = 1001"), "service[0].flap_damping.max_changes: 1001 is out of range 0..=1000");
    rejects(&with_flap_damping("window_s = 0"), "service[0].flap_damping.window_s: 0 is out of range 1..=86400");
    rejects(&with_flap_damping("hold_s = 86401"), "service[0].flap_damping.hold_s: 86401 is out of range 1..=86400");
    let (line, message) = syntax_error(&with_flap_damping("max_flaps = 3"));
    assert_eq!(line, 8);
    assert!(message.contains("unknown field `max_flaps`"), "{message}");
}

#[test]
fn a_bad_flap_damping_rejects_the_whole_file_with_every_problem() {
    let text = with_service(
        "name = \"w\"\nvip = \"10.0.0.100\"\nport = 80\nslow_start_s = 99999",
        "[service.flap_damping]\nmax_changes = 1\nwindow_s = -5\n",
    );
    assert_eq!(
        problems(&text),
        vec![
            "service[0].slow_start_s: 99999 is out of range 0..=3600".to_owned(),
            "service[0].flap_damping.max_changes: 1 would hold a master down after a single failure and recovery; \
             use at least 2, or 0 to turn flap damping off"
                .to_owned(),
            "service[0].flap_damping.window_s: -5 is out of range 1..=86400".to_owned(),
        ]
    );
}

#[test]
fn announce_section_is_read_with_its_defaults() {
    let c = Config::parse(&format!("{MINIMAL}\n[announce]\ntable = 100\n")).unwrap();
    let a = c.announce.unwrap();
    assert_eq!((a.table, a.protocol, a.withdraw_wait), (100, 250, Duration::from_secs(2)));
    let c = Config::parse(&format!("{MINIMAL}\n[announce]\ntable = 4000\nprotocol = 201\nwithdraw_wait_ms = 0\n")).unwrap();
    let a = c.announce.unwrap();
    assert_eq!((a.table, a.protocol, a.withdraw_wait), (4000, 201, Duration::ZERO));
    assert!(Config::parse(MINIMAL).unwrap().announce.is_none());
    // The table is required.
    assert!(Config::parse(&format!("{MINIMAL}\n[announce]\nprotocol = 201\n")).is_err());
}

/// Every error CONFIG.md gives as an example under `[announce]` is what a file with that value
/// gets, word for word: the expectation is the document's.
#[test]
fn announce_errors_are_the_ones_config_md_shows() {
    let doc = include_str!("../../../CONFIG.md");
    let start = doc.find("## `[announce]`").expect("CONFIG.md has an [announce] section");
    let section = &doc[start..start + doc[start..].find("\n## Limits").expect("followed by Limits")];
    let errors = &section[section.find("Errors:").expect("the section lists errors")..];
    let text = errors.split_whitespace().collect::<Vec<_>>().join(" ");
    let examples: Vec<&str> = text.split('`').skip(1).step_by(2).filter(|e| e.starts_with("announce.")).collect();
    assert!(examples.len() >= 5, "{examples:?}");
    for example in examples {
        let (key, reason) = example.split_once(": ").unwrap();
        let field = key.strip_prefix("announce.").unwrap();
        let value: i64 = reason.split_whitespace().next().unwrap().parse().unwrap();
        let body = if field == "table" { format!("table = {value}") } else { format!("table = 100\n{field} = {value}") };
        rejects(&format!("{MINIMAL}\n[announce]\n{body}\n"), example);
    }
    // The reserved ids the examples do not show are refused too.
    for table in [253, 255] {
        assert!(problems(&format!("{MINIMAL}\n[announce]\ntable = {table}\n"))[0].contains("the kernel's"));
    }
    for protocol in [11, 186, 197, 2] {
        assert_eq!(problems(&format!("{MINIMAL}\n[announce]\ntable = 100\nprotocol = {protocol}\n")).len(), 1);
    }
}
