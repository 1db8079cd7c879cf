//! `cargo xtask lab`, the demo, run as CI runs it: the real `mim-lb-lab` binary, plain output.
//! It must tell its story to the end (every master served, clients recovered after the kill),
//! and leave nothing behind, also when Ctrl-C stops it halfway; with `--directors 2` as well
//! (two directors with keepalived; the active one dies, and no connection may break), and with
//! `--directors 3 --ecmp` (three directors behind an ECMP router with BIRD; one dies and comes
//! back, another is withdrawn and announced: every director carries flows, none breaks).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The whole demo takes about 12 s; this leaves room for a loaded machine.
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// Cleanup after Ctrl-C: stopping mim-lb (it removes its pins) and deleting namespaces.
const CLEANUP_LIMIT: Duration = Duration::from_secs(20);

/// The demo process, with its stdout read line by line. Dropping it (when a test fails) stops
/// the demo the way a user would, so that its lab is removed anyway.
struct Demo {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mim-lb-lab"))
            .arg("--non-interactive")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mim-lb-lab");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, tx) in [(Box::new(stdout) as Box<dyn std::io::Read + Send>, tx.clone()), (Box::new(stderr), tx)] {
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Demo { child, lines, seen: Vec::new() }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// Waits until a line for which `wanted` holds has been printed, and returns it.
    fn wait_for_line(&mut self, what: &str, timeout: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {what} within {timeout:?}; output:\n{}", self.output()),
                Err(RecvTimeoutError::Disconnected) => panic!("the demo ended without {what}; output:\n{}", self.output()),
            }
        }
    }

    /// Waits for the process to exit and for the rest of its output.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the demo still runs after {timeout:?}; output:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        };
        // Both pipes close with the process (its children do not hold them: they have pipes of
        // their own), so the rest comes at once.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        status
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + CLEANUP_LIMIT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Everything of the demo with this pid that could outlive it: namespaces, pin directories,
/// the daemons' and BIRD's directories, the sync key, and processes (the daemons, keepalived,
/// BIRD) started for it.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("{pid:x}-");
    let mut found = Vec::new();
    let netns = mim_lb_tests::output_within(Command::new("ip").args(["netns", "list"]), mim_lb_tests::RUN_TIMEOUT).expect("running ip netns list");
    for line in String::from_utf8_lossy(&netns.stdout).lines() {
        if line.starts_with(&format!("mimlb-{tag}")) {
            found.push(format!("namespace {line}"));
        }
    }
    for (dir, prefix) in [("/sys/fs/bpf", "mim-lb-test-"), ("/tmp", "mimlb-"), ("/tmp", "mimlb-sync-")] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}{tag}")) {
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    // The daemon's (and BIRD's) command line names its config file in /tmp/mimlb-<pid>-<n>/.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&format!("/mimlb-{tag}")) {
            found.push(format!("process {}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Runs the demo with `args` to its end: its pid, its summary (which must list no problem)
/// and its output.
fn run_to_the_end(args: &[&str]) -> (u32, Value, String) {
    let mut demo = Demo::start(args);
    let pid = demo.pid();
    let json_line = demo.wait_for_line("summary-json line", RUN_LIMIT, |l| l.starts_with("summary-json: "));
    let status = demo.wait_exit(CLEANUP_LIMIT);
    let output = demo.output();
    assert!(status.success(), "the demo exited with {status}; output:\n{output}");
    let summary: Value = serde_json::from_str(json_line.trim_start_matches("summary-json: ")).unwrap();
    assert_eq!(summary["problems"], Value::Array(vec![]), "{output}");
    (pid, summary, output)
}

#[test]
fn the_demo_tells_its_story_and_leaves_nothing_behind() {
    let (pid, summary, output) = run_to_the_end(&[]);
    // Every master answered while all were up, and the killed one again after its return.
    let masters = summary["masters"].as_array().unwrap();
    assert_eq!(masters.len(), 3);
    let all_up = &summary["phases"][0];
    for m in masters {
        let n = all_up["per_master"][m.as_str().unwrap()].as_u64().unwrap();
        assert!(n > 0, "{m} answered nothing while every master was up: {summary}");
    }
    assert_eq!(summary["every_master_served"], true);
    assert!(summary["answered_after_return"].as_u64().unwrap() > 0, "{summary}");
    // The dead service answered nothing after the kill: the clients' answers are real.
    assert_eq!(summary["phases"][1]["per_master"]["master-2"], 0, "{summary}");
    // mim-lb noticed, after which every request succeeded.
    assert!(summary["detected_after_ms"].as_u64().is_some(), "{summary}");
    assert!(summary["down_reason"].as_str().unwrap().contains("tcp check"), "{summary}");
    assert_eq!(summary["after_detection"]["failed"], 0, "{summary}");
    assert!(summary["after_detection"]["ok"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["recovered"], true);
    // Every answer led to a slave that greeted back: ok requests are complete paths.
    let greeted: u64 = summary["slaves"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(greeted, summary["ok"].as_u64().unwrap(), "{summary}");

    // The human side shows the same story.
    assert!(output.contains("mim-lb marks master-2 down"), "{output}");
    assert!(output.contains("`mim-lb status` when it noticed:"), "{output}");
    assert!(output.contains("Removing the lab"), "{output}");
    let left = leftovers(pid);
    assert!(left.is_empty(), "the demo left behind:\n{}", left.join("\n"));
}

/// A per-second line of the plain view with traffic in it: `   2.0s     50       0  ...`.
fn is_traffic_row(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let time = words.next().and_then(|w| w.strip_suffix('s')).and_then(|t| t.parse::<f64>().ok());
    let requests = words.next().and_then(|w| w.parse::<u64>().ok());
    time.is_some() && requests.is_some_and(|n| n > 0)
}

#[test]
fn ctrl_c_in_the_middle_removes_the_lab() {
    ctrl_c_in_the_middle_removes_the_lab_of(&[]);
}

/// The same with two directors, where keepalived and a second daemon must go too.
#[test]
fn ctrl_c_in_the_middle_of_the_two_director_demo_removes_the_lab() {
    ctrl_c_in_the_middle_removes_the_lab_of(&["--directors", "2"]);
}

/// The same with three directors behind an ECMP router, where BIRD on the router and on every
/// director, three daemons and the sync key must go too.
#[test]
fn ctrl_c_in_the_middle_of_the_ecmp_demo_removes_the_lab() {
    ctrl_c_in_the_middle_removes_the_lab_of(&["--directors", "3", "--ecmp"]);
}

fn ctrl_c_in_the_middle_removes_the_lab_of(args: &[&str]) {
    let mut demo = Demo::start(args);
    let pid = demo.pid();
    demo.wait_for_line("line showing traffic", Duration::from_secs(60), is_traffic_row);
    // While it runs, the lab is there: the check below would see leftovers if it stayed.
    assert!(!leftovers(pid).is_empty(), "no lab while traffic flows?");

    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let status = demo.wait_exit(CLEANUP_LIMIT);
    let output = demo.output();
    assert_eq!(status.code(), Some(130), "exit status {status}; output:\n{output}");
    assert!(output.contains("Interrupted: removing the lab"), "{output}");
    assert!(!output.contains("summary-json"), "an interrupted demo has no summary:\n{output}");
    let left = leftovers(pid);
    assert!(left.is_empty(), "the demo left behind:\n{}", left.join("\n"));
}

/// `cargo xtask lab --directors 2`: two directors with keepalived; the active one dies under
/// traffic and comes back. No long-lived connection may break, new connections work again once
/// the VIP has moved and keep working, and the dead director takes the VIP back.
#[test]
fn the_two_director_demo_breaks_no_connection_and_leaves_nothing_behind() {
    let (pid, summary, output) = run_to_the_end(&["--directors", "2"]);
    assert_eq!(summary["directors"], 2);
    // Three long-lived connections per master, none broken.
    assert_eq!(summary["held"], 9, "{summary}");
    assert_eq!(summary["held_broken"], 0, "{summary}");
    // The VIP moved and came back; new connections worked again and kept working.
    assert!(summary["vip_moved_after_ms"].as_u64().is_some(), "{summary}");
    assert!(summary["first_new_after_kill_ms"].as_u64().is_some(), "{summary}");
    assert_eq!(summary["failed_after_recovery"], 0, "{summary}");
    assert!(summary["vip_back_after_ms"].as_u64().is_some(), "{summary}");
    assert!(summary["new_ok"].as_u64().unwrap() > 0, "{summary}");

    // The human side shows the same story.
    assert!(output.contains("kill -9 of director A's mim-lb and keepalived"), "{output}");
    assert!(output.contains(">> director B holds the VIP"), "{output}");
    assert!(output.contains(">> director A holds the VIP again"), "{output}");
    assert!(output.contains("Removing the lab"), "{output}");
    let left = leftovers(pid);
    assert!(left.is_empty(), "the demo left behind:\n{}", left.join("\n"));
}

/// `cargo xtask lab --directors 3 --ecmp`: three directors behind a router that spreads
/// connections by ECMP. The router's route has every director; each carries new flows (its
/// status' `new_flows`, shown per second); one dies and the router drops it, it comes back and
/// rejoins, another is withdrawn and announced again. No long-lived connection may break, and
/// new connections fail only until the router dropped the dead director.
#[test]
fn the_ecmp_demo_spreads_flows_breaks_no_connection_and_leaves_nothing_behind() {
    let (pid, summary, output) = run_to_the_end(&["--directors", "3", "--ecmp"]);
    assert_eq!(summary["directors"], 3, "{summary}");
    assert_eq!(summary["ecmp"], true, "{summary}");
    assert_eq!(summary["held"], 9, "{summary}");
    assert_eq!(summary["held_broken"], 0, "{summary}");
    // Every director carried new flows, and the counts account for the new connections: each
    // went through one director (what the dead one carried in its last milliseconds, and the
    // connections that failed on it, may be uncounted).
    let carried: Vec<u64> = ["A", "B", "C"].iter().map(|d| summary["carried"][d].as_u64().unwrap_or(0)).collect();
    assert!(carried.iter().all(|&n| n > 0), "a director carried no flow: {summary}");
    let (ok, failed) = (summary["new_ok"].as_u64().unwrap(), summary["new_failed"].as_u64().unwrap());
    let sum: u64 = carried.iter().sum();
    assert!(sum * 100 >= ok * 95 && sum <= ok + failed + 10, "flows carried {carried:?} for {ok} ok and {failed} failed new connections: {summary}");
    // The route followed each event; new connections failed only before it dropped the dead one.
    for key in ["kill_out_after_ms", "revive_in_after_ms", "withdraw_out_after_ms", "announce_in_after_ms"] {
        assert!(summary[key].as_u64().is_some(), "no {key}: {summary}");
    }
    assert_eq!(summary["failed_otherwise"], 0, "{summary}");
    assert_eq!(summary["failed_before_converged"], summary["new_failed"], "{summary}");

    // The human side shows the same story: the router's route with a next hop per director,
    // and rows whose next hops lose and regain the dead and the withdrawn director.
    assert!(output.contains("router# ip route show"), "{output}");
    assert_eq!(output.lines().filter(|l| l.trim_start().starts_with("nexthop via")).count(), 3, "{output}");
    assert!(output.contains(">> the router dropped director A"), "{output}");
    assert!(output.contains(">> director A is back in the router's route"), "{output}");
    assert!(output.contains(">> the router dropped director B"), "{output}");
    let rows_ending = |hops: &str| output.lines().filter(|l| is_traffic_row(l) && l.ends_with(&format!("| {hops}"))).count();
    assert!(rows_ending("B C") > 0 && rows_ending("A C") > 0 && rows_ending("A B C") > 0, "{output}");
    assert!(output.contains("Removing the lab"), "{output}");
    let left = leftovers(pid);
    assert!(left.is_empty(), "the demo left behind:\n{}", left.join("\n"));
}

/// More than two directors need `--ecmp`, and `--ecmp` 2 to 8: a clear error, before
/// anything is built.
#[test]
fn three_directors_without_ecmp_is_an_error_naming_the_flag() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mim-lb-lab")).arg("--non-interactive").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(&["--directors", "3"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--directors 3 needs --ecmp"), "{stderr}");
    let (code, stderr) = run(&["--directors", "1", "--ecmp"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--ecmp needs 2 to 8 directors"), "{stderr}");
    let (code, stderr) = run(&["--directors", "9", "--ecmp"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("9 is not in 1..=8"), "{stderr}");
}

/// `cargo xtask lab --keep`: every command of the guide it prints runs, exactly as printed
/// and in the order printed, against the lab it leaves running; Ctrl-C then removes the lab.
#[test]
fn every_command_the_keep_guide_prints_runs_as_printed() {
    every_command_of_the_keep_guide_runs(&["--keep"], 10);
}

/// The same with two directors.
#[test]
fn every_command_the_two_director_keep_guide_prints_runs_as_printed() {
    every_command_of_the_keep_guide_runs(&["--directors", "2", "--keep"], 8);
}

/// The same with three directors behind an ECMP router.
#[test]
fn every_command_the_ecmp_keep_guide_prints_runs_as_printed() {
    every_command_of_the_keep_guide_runs(&["--directors", "3", "--ecmp", "--keep"], 10);
}

fn every_command_of_the_keep_guide_runs(args: &[&str], at_least: usize) {
    use mim_lb_tests::demo::keep::{GUIDE_COLUMN, GUIDE_HEADING, GUIDE_LAST_LABEL};

    let mut demo = Demo::start(args);
    let pid = demo.pid();
    demo.wait_for_line("the --keep guide", RUN_LIMIT, |l| l == GUIDE_HEADING);
    let mut commands: Vec<(String, String)> = Vec::new();
    loop {
        let line = demo.wait_for_line("a row of the guide", Duration::from_secs(10), |_| true);
        let (label, how) = line.split_at(GUIDE_COLUMN.min(line.len()));
        let label = label.trim().to_owned();
        if !how.starts_with('(') {
            commands.push((label.clone(), how.to_owned()));
        }
        if label == GUIDE_LAST_LABEL {
            break;
        }
    }
    assert!(commands.len() >= at_least, "{commands:?}\n{}", demo.output());
    for (label, command) in &commands {
        let out = mim_lb_tests::output_within(Command::new("bash").args(["-c", command]).stdin(Stdio::null()), RUN_LIMIT)
            .unwrap_or_else(|e| panic!("{label}: `{command}`: {e:#}"));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{label}: `{command}` failed ({}):\n{stdout}\n{stderr}", out.status);
        let expect = match label.as_str() {
            "ask for a slave" => "slave",
            "mim-lb status" | "mim-lb status on A" | "mim-lb status on B" => "ActConn",
            "is B ready?" => "ready",
            "keepalived on A" => "vrrp_instance",
            "its route to the VIP" => "nexthop via",
            "its BGP sessions" => "Established",
            "A's announced route" => "dev lo",
            "take B out of ECMP" => "withdrawn",
            "and back in" => "announcing again",
            "take a master out" => "-> disabled",
            "drain one and wait" => "holds no active connection",
            "put it back" => "-> ",
            "the config" => "[[service]]",
            "its maps" => "key",
            _ => "",
        };
        assert!(stdout.contains(expect), "{label}: `{command}` printed:\n{stdout}\n{stderr}");
    }
    drop(demo);
    let left = leftovers(pid);
    assert!(left.is_empty(), "the demo left behind:\n{}", left.join("\n"));
}
