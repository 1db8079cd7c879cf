//! The checker end to end: real checks of loopback servers, on short intervals.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::{self, Receiver};

use super::*;
use crate::{
    config::Protocol,
    health::test_support::{Scratch, Server, assert_all_gone, closed_port, pids_in, sh},
};

/// How long to wait for a report that should come: generous, as only its absence is a
/// failure.
const PATIENCE: Duration = Duration::from_secs(5);
const FAST: Duration = Duration::from_millis(20);

fn service(port: u16) -> ServiceKey {
    ServiceKey {
        vip: "10.0.0.100".parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    }
}

fn target(service_port: u16, addr: SocketAddr, kind: CheckKind, rise: u32, fall: u32) -> Target {
    Target {
        service: service(service_port),
        address: addr.ip(),
        port: addr.port(),
        check: HealthCheck {
            kind,
            interval: FAST,
            timeout: FAST,
            rise,
            fall,
            port: None,
        },
    }
}

fn checker() -> (HealthChecker, Receiver<Report>) {
    let (tx, rx) = mpsc::channel(256);
    (HealthChecker::new(tx), rx)
}

async fn next(rx: &mut Receiver<Report>) -> Report {
    match tokio::time::timeout(PATIENCE, rx.recv()).await {
        Ok(Some(report)) => report,
        Ok(None) => panic!("the report channel closed"),
        Err(_) => panic!("no report within {PATIENCE:?}"),
    }
}

/// Everything already queued, without waiting.
fn drain(rx: &mut Receiver<Report>) -> Vec<Report> {
    let mut queued = Vec::new();
    while let Ok(report) = rx.try_recv() {
        queued.push(report);
    }
    queued
}

/// Reports arriving during `span`.
async fn collect_for(rx: &mut Receiver<Report>, span: Duration) -> Vec<Report> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(span, async {
        while let Some(report) = rx.recv().await {
            got.push(report);
        }
    })
    .await;
    got
}

/// Waits until every sender is gone, which proves every check task has ended.
async fn assert_closes(rx: &mut Receiver<Report>) {
    let closed = tokio::time::timeout(PATIENCE, async { while rx.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "check tasks still hold the report channel");
}

#[tokio::test]
async fn a_failing_target_goes_down_after_fall_and_comes_back_after_rise() {
    let addr = closed_port("127.0.0.1").await;
    let (mut checker, mut rx) = checker();
    checker.set_targets(vec![(
        target(7000, addr, CheckKind::Tcp, 2, 3),
        Verdict::Up,
    )]);

    for streak in 1..=3 {
        let r = next(&mut rx).await;
        assert_eq!(
            (r.service, r.address, r.port, r.check),
            (service(7000), addr.ip(), addr.port(), "tcp")
        );
        assert!(!r.outcome.ok);
        assert_eq!(r.outcome.detail, "connection refused");
        assert_eq!(r.streak, streak);
        let expected = if streak < 3 {
            Verdict::Up
        } else {
            Verdict::Down
        };
        assert_eq!((r.verdict, r.transition), (expected, streak == 3), "{r}");
    }

    let _server = Server::start(&addr.to_string(), Some(Vec::new())).await;
    // Checks already under way may still fail; none may change anything.
    let first_ok = loop {
        let r = next(&mut rx).await;
        if r.outcome.ok {
            break r;
        }
        assert_eq!((r.verdict, r.transition), (Verdict::Down, false), "{r}");
    };
    assert_eq!(
        (first_ok.verdict, first_ok.transition, first_ok.streak),
        (Verdict::Down, false, 1)
    );
    let r = next(&mut rx).await;
    assert_eq!(r.outcome.detail, "connected");
    assert_eq!(
        (r.outcome.ok, r.verdict, r.transition, r.streak),
        (true, Verdict::Up, true, 2),
        "{r}"
    );
}

/// Two targets, one removed: it stops reporting, the other goes on.
async fn removing_a_target_stops_its_reports() {
    let server = Server::start("127.0.0.1:0", Some(Vec::new())).await;
    let (a, b) = (
        target(7000, server.addr, CheckKind::Tcp, 1, 1),
        target(7001, server.addr, CheckKind::Tcp, 1, 1),
    );
    let (mut checker, mut rx) = checker();
    checker.set_targets(vec![(a.clone(), Verdict::Up), (b.clone(), Verdict::Up)]);
    let (mut seen_a, mut seen_b) = (0, 0);
    while seen_a < 2 || seen_b < 2 {
        let r = next(&mut rx).await;
        if r.service == a.service {
            seen_a += 1
        } else {
            seen_b += 1
        }
    }

    checker.set_targets(vec![(b.clone(), Verdict::Up)]);
    // Whatever a queued before the call may still be in the channel, but nothing after.
    drain(&mut rx);
    let later = collect_for(&mut rx, Duration::from_millis(300)).await;
    assert!(later.iter().all(|r| r.service == b.service), "{later:#?}");
    assert!(later.len() >= 3, "b reported only {} times", later.len());

    checker.set_targets(Vec::new());
    drain(&mut rx);
    assert_eq!(
        collect_for(&mut rx, Duration::from_millis(200)).await.len(),
        0
    );
    drop(checker);
    assert_closes(&mut rx).await;
}

#[tokio::test]
async fn removing_a_target_stops_its_reports_current_thread() {
    removing_a_target_stops_its_reports().await;
}

/// With checks running on other threads while `set_targets` runs, the promise still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_target_stops_its_reports_multi_thread() {
    removing_a_target_stops_its_reports().await;
}

#[tokio::test]
async fn a_changed_check_restarts_from_the_current_verdict() {
    let closed = closed_port("127.0.0.1").await;
    let server = Server::start("127.0.0.1:0", Some(Vec::new())).await;
    let (mut checker, mut rx) = checker();
    let mut t = target(7000, closed, CheckKind::Tcp, 3, 2);
    checker.set_targets(vec![(t.clone(), Verdict::Up)]);
    while !next(&mut rx).await.transition {}

    // Now down. Check another port: given `Up`, which is not the current verdict and must be
    // ignored.
    t.check.port = Some(server.addr.port());
    checker.set_targets(vec![(t.clone(), Verdict::Up)]);
    let before = drain(&mut rx);
    assert!(
        before
            .iter()
            .all(|r| r.port == closed.port() && r.verdict == Verdict::Down),
        "{before:#?}"
    );

    // From the new port, from down, counting from 1.
    for streak in 1..=3 {
        let r = next(&mut rx).await;
        assert_eq!(r.port, server.addr.port(), "{r}");
        assert!(r.outcome.ok, "{r}");
        assert_eq!(r.streak, streak, "{r}");
        let expected = if streak < 3 {
            Verdict::Down
        } else {
            Verdict::Up
        };
        assert_eq!((r.verdict, r.transition), (expected, streak == 3), "{r}");
    }
    // The old checks are gone for good.
    let later = collect_for(&mut rx, Duration::from_millis(200)).await;
    assert!(
        later
            .iter()
            .all(|r| r.port == server.addr.port() && r.outcome.ok),
        "{later:#?}"
    );
}

#[tokio::test]
async fn an_unchanged_target_keeps_running_undisturbed() {
    let server = Server::start("127.0.0.1:0", Some(Vec::new())).await;
    let t = target(7000, server.addr, CheckKind::Tcp, 2, 2);
    let (mut checker, mut rx) = checker();
    checker.set_targets(vec![(t.clone(), Verdict::Up)]);
    let r = next(&mut rx).await;
    assert_eq!((r.verdict, r.streak), (Verdict::Up, 1));

    // The same target again, with a verdict that must be ignored.
    checker.set_targets(vec![(t.clone(), Verdict::Down)]);
    let mut last = r.streak;
    for _ in 0..3 {
        let r = next(&mut rx).await;
        assert_eq!(
            (r.verdict, r.transition, r.streak),
            (Verdict::Up, false, last + 1),
            "{r}"
        );
        last = r.streak;
    }
}

#[tokio::test]
async fn a_hung_check_does_not_delay_other_targets() {
    let hang = Server::start("127.0.0.1:0", None).await;
    let fine = Server::start("127.0.0.1:0", Some(Vec::new())).await;
    let http = CheckKind::Http {
        path: "/".to_owned(),
        expect_status: 200,
        expect_body: None,
    };
    let mut slow = target(7000, hang.addr, http, 1, 1);
    // A long timeout, so that "well before it" leaves a loaded 2-core machine room.
    slow.check.interval = Duration::from_secs(6);
    slow.check.timeout = Duration::from_secs(6);
    let quick = target(7001, fine.addr, CheckKind::Tcp, 1, 1);
    let (mut checker, mut rx) = checker();
    checker.set_targets(vec![(slow, Verdict::Up), (quick.clone(), Verdict::Up)]);

    // Wait for the slow check to be hanging (its first check runs anywhere within its first
    // interval)...
    let deadline = Instant::now() + Duration::from_secs(6) + PATIENCE;
    while hang.requests().is_empty() {
        assert!(Instant::now() < deadline, "the slow check never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...then the quick one keeps reporting, well before the slow one times out.
    let hung_since = Instant::now();
    drain(&mut rx);
    for _ in 0..5 {
        let r = next(&mut rx).await;
        assert_eq!(r.service, quick.service, "{r}");
    }
    assert!(
        hung_since.elapsed() < Duration::from_secs(4),
        "five quick reports took {:?}: the hung check (timeout 6 s) held them up",
        hung_since.elapsed()
    );
}

#[tokio::test]
async fn unchecked_targets_are_ignored_and_shutdown_stops_everything() {
    let server = Server::start("127.0.0.1:0", Some(Vec::new())).await;
    let (mut checker, mut rx) = checker();
    checker.set_targets(vec![
        (
            target(7000, server.addr, CheckKind::None, 1, 1),
            Verdict::Up,
        ),
        (target(7001, server.addr, CheckKind::Tcp, 1, 1), Verdict::Up),
    ]);
    assert_eq!(checker.running.len(), 1);
    let reports = collect_for(&mut rx, Duration::from_millis(200)).await;
    assert!(!reports.is_empty());
    assert!(
        reports.iter().all(|r| r.service == service(7001)),
        "{reports:#?}"
    );

    checker.shutdown();
    drain(&mut rx);
    assert_eq!(
        collect_for(&mut rx, Duration::from_millis(200)).await.len(),
        0
    );
    drop(checker);
    assert_closes(&mut rx).await;
}

#[tokio::test]
async fn a_check_becoming_none_is_stopped() {
    let server = Server::start("127.0.0.1:0", Some(Vec::new())).await;
    let (mut checker, mut rx) = checker();
    let mut t = target(7000, server.addr, CheckKind::Tcp, 1, 1);
    checker.set_targets(vec![(t.clone(), Verdict::Up)]);
    next(&mut rx).await;
    t.check.kind = CheckKind::None;
    checker.set_targets(vec![(t, Verdict::Up)]);
    assert!(checker.running.is_empty());
    drain(&mut rx);
    assert_eq!(
        collect_for(&mut rx, Duration::from_millis(200)).await.len(),
        0
    );
}

#[tokio::test]
async fn removing_a_target_kills_its_running_command() {
    let scratch = Scratch::new();
    let pidfile = scratch.path("pids");
    let argv = sh("sleep 30 & echo $$ $! > \"$0\"; sleep 30", &pidfile, &[]);
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut t = target(7000, addr, CheckKind::Command { argv }, 1, 1);
    // A timeout longer than the interval (which config forbids) starts the check soon and
    // leaves stopping the target as the only way the command can end within the test.
    t.check.interval = Duration::from_millis(200);
    t.check.timeout = Duration::from_secs(30);
    let (mut checker, mut rx) = checker();
    checker.set_targets(vec![(t, Verdict::Up)]);
    let pids = pids_in(&pidfile).await;
    assert_eq!(pids.len(), 2, "{pids:?}");

    checker.set_targets(Vec::new());
    assert_all_gone(&pids).await;
    assert!(drain(&mut rx).is_empty());
}

#[tokio::test]
async fn failures_of_each_kind_are_reported_with_their_check_and_detail() {
    let addr = closed_port("127.0.0.1").await;
    let http = CheckKind::Http {
        path: "/".to_owned(),
        expect_status: 200,
        expect_body: None,
    };
    let command = CheckKind::Command {
        argv: sh("echo no {address} {port}; exit 1", "check", &[]),
    };
    let mut command = target(7001, addr, command, 1, 1);
    // Starting a shell can take longer than FAST on a busy machine.
    command.check.interval = Duration::from_secs(1);
    command.check.timeout = Duration::from_secs(1);
    let (mut checker, mut rx) = checker();
    checker.set_targets(vec![
        (target(7000, addr, http, 1, 1), Verdict::Up),
        (command, Verdict::Up),
    ]);
    let (mut http_seen, mut command_seen) = (false, false);
    while !(http_seen && command_seen) {
        let r = next(&mut rx).await;
        assert!(!r.outcome.ok);
        match r.check {
            "http" => {
                assert_eq!(r.outcome.detail, "connection refused");
                http_seen = true;
            }
            "command" => {
                assert_eq!(
                    r.outcome.detail,
                    format!("exit status 1: no {} {}", addr.ip(), addr.port())
                );
                command_seen = true;
            }
            other => panic!("unexpected check {other}"),
        }
    }
}
