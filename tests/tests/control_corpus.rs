//! Issue 10, the control plane's inputs: a corpus of malformed, truncated and hostile config
//! files (through `mim-lb reload`) and control-socket messages (oversized, invalid UTF-8,
//! wrong JSON types, unknown commands, bad arguments, many clients at once), sent to the real
//! daemon in the namespace lab. Each is refused with a message that names the problem; the
//! daemon's state (services, backends, states, tables) is the same before and after, and
//! connections through the VIP still reach every master. CONFIG.md: "a bad config is
//! rejected whole, naming the key and the reason".

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use mim_lb_tests::{
    Lab, LabSpec, count_names,
    gateway::{Gateway, Mode, ServiceSpec, lab_config, status_shape},
};

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(3);


/// A lab whose gateway runs one TCP service with every master up, and its config.
fn started() -> (Lab, Gateway, String) {
    let mut lab = Lab::new(LabSpec::default()).unwrap();
    lab.start_tcp_servers(PORT).unwrap();
    let config = lab_config(&lab, &[ServiceSpec::tcp(&lab, PORT)], "");
    let gw = Gateway::start(&mut lab, &config, Mode::Generic).unwrap();
    gw.wait_all_up().unwrap();
    (lab, gw, config)
}

/// Still forwarding: new connections through the VIP reach all three masters.
fn forwards_to_every_master(lab: &Lab, after: &str) {
    let names = lab.ask(SocketAddr::new(lab.vip4().into(), PORT), 60, T);
    assert_eq!(count_names(&names).len(), 3, "after {after}, new connections no longer reach every master");
}

/// Hostile config files, each with the words its refusal must contain (the key, the line, or
/// what is wrong with the file). `good` is the running config.
fn config_corpus(good: &str) -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let replaced = |from: &str, to: &str| {
        assert!(good.contains(from), "{from:?} is not in the config");
        good.replacen(from, to, 1).into_bytes()
    };
    let port_line = format!("port = {PORT}");
    let cut = good.find("[[service.backend]]").unwrap() + 12;
    let nested = format!("{good}\nx = {}{}\n", "[".repeat(5000), "]".repeat(5000));
    let mut invalid_utf8 = good.as_bytes().to_vec();
    invalid_utf8.extend_from_slice(b"\nname = \"\xff\xfe\"\n");
    vec![
        ("truncated in a table header", good.as_bytes()[..cut].to_vec(), vec!["line"]),
        ("an empty file", Vec::new(), vec!["missing field `interface`"]),
        ("a port of the wrong type", replaced(&port_line, "port = \"7000\""), vec!["line", "service[0].port: invalid type: string \"7000\""]),
        ("a port out of range", replaced(&port_line, "port = 70000"), vec!["service[0].port", "70000", "out of range"]),
        ("a weight too large for any integer", replaced("mac = \"", "weight = 99999999999999999999\nmac = \""), vec!["line", "service[0].backend[0].weight", "number too large"]),
        ("an unknown key", replaced(&port_line, &format!("{port_line}\ncolour = \"blue\"")), vec!["unknown field `colour`"]),
        ("a duplicate key", replaced(&port_line, &format!("{port_line}\nport = 7001")), vec!["duplicate key `port`"]),
        ("a VIP that is not an address", replaced("vip = \"", "vip = \"300."), vec!["service[0].vip", "is not an IP address"]),
        ("a NUL in a name", replaced("name = \"tcp-7000\"", "name = \"tcp\\u0000\""), vec!["service[0].name", "is not a valid name"]),
        ("arrays nested 5000 deep", nested.into_bytes(), vec!["recursion limit"]),
        ("invalid UTF-8", invalid_utf8, vec!["valid UTF-8"]),
    ]
}

/// Control-socket lines, each with the words its refusal must contain.
fn socket_corpus() -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let line = |s: &str| format!("{s}\n").into_bytes();
    let mut oversized = b"{\"command\":\"status\",\"pad\":\"".to_vec();
    oversized.extend(std::iter::repeat_n(b'a', 100 * 1024));
    oversized.extend_from_slice(b"\"}\n");
    vec![
        ("an oversized line", oversized, vec!["one line of JSON under 64 KiB"]),
        ("a request with no newline", b"{\"command\":\"status\"}".to_vec(), vec!["one line of JSON"]),
        ("invalid UTF-8", b"{\"command\":\"st\xff\xfeatus\"}\n".to_vec(), vec!["invalid utf-8"]),
        ("an empty line", line(""), vec!["not a valid request"]),
        ("not JSON", line("status please"), vec!["not a valid request"]),
        ("a JSON array", line("[1,2,3]"), vec!["not a valid request"]),
        ("a number as the command", line("{\"command\":5}"), vec!["not a valid request", "invalid type"]),
        ("an unknown command", line("{\"command\":\"format-disk\"}"), vec!["not a valid request", "unknown variant `format-disk`"]),
        ("a number as the service", line("{\"command\":\"drain\",\"service\":7000,\"backend\":\"10.0.0.1\"}"), vec!["invalid type: integer `7000`"]),
        ("a backend that is not an address", line("{\"command\":\"drain\",\"service\":\"tcp-7000\",\"backend\":\"master-1\"}"), vec!["not a valid request", "invalid IP address"]),
        ("a drain without its backend", line("{\"command\":\"drain\",\"service\":\"tcp-7000\"}"), vec!["missing field `backend`"]),
        ("a drain of an unknown service", line("{\"command\":\"drain\",\"service\":\"nope\",\"backend\":\"10.0.0.1\"}"), vec!["nope"]),
        ("a drain of an unknown backend", line("{\"command\":\"disable\",\"service\":\"tcp-7000\",\"backend\":\"192.0.2.1\"}"), vec!["192.0.2.1"]),
        ("a flow that does not parse", line("{\"command\":\"simulate\",\"flow\":\"garbage\"}"), vec!["garbage"]),
    ]
}

/// Sends `bytes` on a new connection and returns the daemon's answer (one JSON line).
fn send_raw(socket: &Path, bytes: &[u8]) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).expect("connecting to the control socket");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The daemon reads at most 64 KiB and answers; the rest of an oversized line may then
    // meet a closed socket, which is the daemon's right.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    BufReader::new(&mut stream).read_line(&mut answer).expect("reading the answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("the answer is not JSON ({e}): {answer:?}"))
}

fn assert_refused(what: &str, answer: &serde_json::Value, words: &[&str]) {
    assert_eq!(answer["ok"], serde_json::json!(false), "{what} was accepted: {answer}");
    let error = answer["error"].as_str().unwrap_or_else(|| panic!("{what}: no error in {answer}"));
    for word in words {
        assert!(error.contains(word), "{what}: the error does not say {word:?}: {error}");
    }
}

#[test]
fn hostile_configs_and_control_messages_are_refused_and_change_nothing() {
    let (lab, gw, config) = started();
    let before = status_shape(&gw.status().unwrap());
    gw.write_config(&config).unwrap();
    let good = std::fs::read_to_string(gw.config_path()).unwrap();

    for (what, bytes, words) in config_corpus(&good) {
        std::fs::write(gw.config_path(), &bytes).unwrap();
        let err = format!("{:#}", gw.ctl(&["reload"]).expect_err(what));
        assert!(err.contains("reload rejected, nothing changed"), "{what}: {err}");
        for word in words {
            assert!(err.contains(word), "{what}: the refusal does not say {word:?}: {err}");
        }
        assert_eq!(status_shape(&gw.status().unwrap()), before, "the refused config ({what}) changed the state");
    }
    std::fs::write(gw.config_path(), &good).unwrap();
    forwards_to_every_master(&lab, "the refused configs");

    for (what, bytes, words) in socket_corpus() {
        assert_refused(what, &send_raw(gw.socket(), &bytes), &words);
        assert_eq!(status_shape(&gw.status().unwrap()), before, "the refused message ({what}) changed the state");
    }
    forwards_to_every_master(&lab, "the refused messages");
}

/// Many clients at once, each sending a message of the corpus or asking the status, and one
/// that connects and says nothing: every message is answered (refused, or the status), none
/// waits for the silent one, and the state is unchanged.
#[test]
fn many_concurrent_clients_are_each_answered_and_change_nothing() {
    let (lab, gw, _) = started();
    let before = status_shape(&gw.status().unwrap());
    let socket = gw.socket().to_owned();
    let silent = UnixStream::connect(&socket).unwrap();

    let corpus = socket_corpus();
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..48)
            .map(|i| {
                let (socket, corpus) = (&socket, &corpus);
                scope.spawn(move || {
                    for round in 0..4 {
                        if (i + round) % 3 == 0 {
                            let answer = send_raw(socket, b"{\"command\":\"status\"}\n");
                            assert_eq!(answer["ok"], serde_json::json!(true), "client {i}: status refused: {answer}");
                            assert!(answer["status"]["services"].is_array(), "client {i}: no status in {answer}");
                        } else {
                            let (what, bytes, words) = &corpus[(i * 7 + round) % corpus.len()];
                            assert_refused(&format!("client {i}: {what}"), &send_raw(socket, bytes), words);
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
    });
    // The silent client held no one up, and is told why it is dropped.
    silent.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut answer = String::new();
    (&silent).read_to_string(&mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_refused("a client that sends nothing", &answer, &["no request within"]);
    assert_eq!(status_shape(&gw.status().unwrap()), before, "the clients changed the state");
    forwards_to_every_master(&lab, "the concurrent clients");
}

/// Opens a FIFO for writing and closes it at once, on drop: a reader blocked in its open (a
/// daemon that opened the FIFO as its config) then reads end-of-file and goes on.
struct Unblock<'a>(&'a Path);

impl Drop for Unblock<'_> {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt as _;
        let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(self.0);
    }
}

/// A config path that leads to something that is not a config file is refused without
/// blocking the daemon (a FIFO holds a plain `open` until a writer comes) or reading without
/// end (a runaway file; /dev/zero meets the same limit, CONFIG.md "How a file is checked").
#[test]
fn config_paths_that_are_not_config_files_are_refused_without_blocking_the_daemon() {
    let (lab, gw, config) = started();
    let before = status_shape(&gw.status().unwrap());
    gw.write_config(&config).unwrap();
    let good = std::fs::read(gw.config_path()).unwrap();
    let path = gw.config_path();
    let reload = b"{\"command\":\"reload\"}\n";

    std::fs::remove_file(&path).unwrap();
    let fifo = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    {
        let _unblock = Unblock(&path);
        // Nobody writes to it: it reads as an empty file.
        assert_refused("a FIFO as the config", &send_raw(gw.socket(), reload), &["missing field `interface`"]);
    }
    std::fs::remove_file(&path).unwrap();
    assert_eq!(status_shape(&gw.status().unwrap()), before, "the refused FIFO changed the state");

    // A valid config after 17 MiB of comments: no config is that large.
    let mut huge = format!("# {}\n", "x".repeat(1022)).into_bytes().repeat(17 * 1024);
    huge.extend_from_slice(&good);
    std::fs::write(&path, &huge).unwrap();
    assert_refused("a 17 MiB config", &send_raw(gw.socket(), reload), &["larger than 16 MiB"]);
    assert_eq!(status_shape(&gw.status().unwrap()), before, "the refused 17 MiB file changed the state");

    std::fs::write(&path, &good).unwrap();
    forwards_to_every_master(&lab, "the refused config paths");
}
