use std::{fs, os::unix::fs::PermissionsExt, path::Path, time::Instant};

use super::*;
use crate::{
    config::Protocol,
    health::test_support::{Scratch, assert_all_gone, pids_in, sh},
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn backend(address: &str) -> Backend {
    Backend {
        address: address.parse().unwrap(),
        port: 8080,
        service: ServiceKey {
            vip: "10.0.0.100".parse().unwrap(),
            port: 7000,
            protocol: Protocol::Tcp,
        },
    }
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn exit_0_passes() {
    assert_eq!(
        check(&argv(&["/bin/true"]), &backend("127.0.0.1"), TIMEOUT).await,
        Ok("exit status 0".to_owned())
    );
}

#[tokio::test]
async fn another_exit_status_fails() {
    assert_eq!(
        check(&argv(&["/bin/false"]), &backend("127.0.0.1"), TIMEOUT).await,
        Err("exit status 1".to_owned())
    );
}

#[tokio::test]
async fn placeholders_and_environment_reach_the_program() {
    // Placeholders anywhere in any argument, repeatedly; the script says what it got if wrong.
    let script = r#"
        [ "$0" = "x-127.0.0.1-8080-127.0.0.1" ] && [ "$1" = 127.0.0.1 ] && [ "$2" = 8080 ] &&
        [ "$MIM_LB_BACKEND_ADDRESS" = 127.0.0.1 ] && [ "$MIM_LB_BACKEND_PORT" = 8080 ] &&
        [ "$MIM_LB_SERVICE" = 10.0.0.100:7000/tcp ] && [ ! -t 0 ] && [ -z "$(cat)" ] ||
        { echo "got $0 $1 $2 $MIM_LB_BACKEND_ADDRESS $MIM_LB_BACKEND_PORT $MIM_LB_SERVICE"; exit 3; }
    "#;
    let argv = sh(
        script,
        "x-{address}-{port}-{address}",
        &["{address}", "{port}"],
    );
    assert_eq!(
        check(&argv, &backend("127.0.0.1"), TIMEOUT).await,
        Ok("exit status 0".to_owned())
    );
}

#[tokio::test]
async fn ipv6_addresses_are_substituted_without_brackets() {
    let script =
        r#"[ "$1" = ::1 ] && [ "$MIM_LB_BACKEND_ADDRESS" = ::1 ] || { echo "got $1"; exit 3; }"#;
    let argv = sh(script, "check", &["{address}"]);
    assert_eq!(
        check(&argv, &backend("::1"), TIMEOUT).await,
        Ok("exit status 0".to_owned())
    );
}

#[tokio::test]
async fn the_first_line_of_output_explains_a_failure() {
    let argv = sh(
        "printf '\\n   first problem  \\nsecond\\n'; exit 3",
        "check",
        &[],
    );
    let result = check(&argv, &backend("127.0.0.1"), TIMEOUT).await;
    assert_eq!(result, Err("exit status 3: first problem".to_owned()));

    let argv = sh("echo 'on stderr' >&2; exit 2", "check", &[]);
    let result = check(&argv, &backend("127.0.0.1"), TIMEOUT).await;
    assert_eq!(result, Err("exit status 2: on stderr".to_owned()));

    let argv = sh("echo '3 workers'", "check", &[]);
    let result = check(&argv, &backend("127.0.0.1"), TIMEOUT).await;
    assert_eq!(result, Ok("exit status 0: 3 workers".to_owned()));
}

#[tokio::test]
async fn a_flood_of_output_is_drained_and_cut_short() {
    // A megabyte on one line: far more than a pipe holds, so the program only gets to exit if
    // the output is read all along.
    let argv = sh(
        "head -c 1000000 /dev/zero | tr '\\0' x; exit 1",
        "check",
        &[],
    );
    let detail = check(&argv, &backend("127.0.0.1"), TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(
        detail,
        format!("exit status 1: {}...", "x".repeat(LINE_MAX))
    );
}

#[tokio::test]
async fn a_program_killed_by_a_signal_fails() {
    let argv = sh("kill -9 $$", "check", &[]);
    assert_eq!(
        check(&argv, &backend("127.0.0.1"), TIMEOUT).await,
        Err("killed by signal 9".to_owned())
    );
}

#[tokio::test]
async fn a_hung_command_is_cut_at_the_timeout_with_its_whole_group() {
    let scratch = Scratch::new();
    let pidfile = scratch.path("pids");
    let argv = sh("sleep 30 & echo $$ $! > \"$0\"; sleep 30", &pidfile, &[]);
    let timeout = Duration::from_millis(500);
    let start = Instant::now();
    let result = check(&argv, &backend("127.0.0.1"), timeout).await;
    let took = start.elapsed();
    assert_eq!(result, Err("timed out after 500 ms".to_owned()));
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(1),
        "{took:?}"
    );

    let pids = pids_in(&pidfile).await;
    assert_eq!(pids.len(), 2, "{pids:?}");
    // The shell was our child: it must be reaped, not even a zombie.
    assert!(
        !Path::new(&format!("/proc/{}", pids[0])).exists(),
        "shell {} not reaped",
        pids[0]
    );
    assert_all_gone(&pids).await;
}

#[tokio::test]
async fn leftovers_of_a_finished_command_are_killed_and_do_not_hold_up_the_result() {
    let scratch = Scratch::new();
    let pidfile = scratch.path("pids");
    let argv = sh("sleep 30 & echo $! > \"$0\"; echo done", &pidfile, &[]);
    let result = check(&argv, &backend("127.0.0.1"), TIMEOUT).await;
    // Not a timeout: the background sleep inherited the output pipe, but was killed.
    assert_eq!(result, Ok("exit status 0: done".to_owned()));
    assert_all_gone(&pids_in(&pidfile).await).await;
}

#[tokio::test]
async fn a_check_dropped_half_way_kills_its_group() {
    let scratch = Scratch::new();
    let pidfile = scratch.path("pids");
    let argv = sh("sleep 30 & echo $$ $! > \"$0\"; sleep 30", &pidfile, &[]);
    let backend = backend("127.0.0.1");
    let pids = tokio::select! {
        result = check(&argv, &backend, TIMEOUT) => panic!("a 30 s command finished: {result:?}"),
        pids = pids_in(&pidfile) => pids,
    };
    // The check's future is gone here, as when its target's task is aborted.
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_all_gone(&pids).await;
}

#[tokio::test]
async fn a_missing_program_fails_to_start() {
    let result = check(
        &argv(&["/nonexistent/mim-lb-check", "{address}"]),
        &backend("127.0.0.1"),
        TIMEOUT,
    )
    .await;
    assert_eq!(
        result,
        Err("cannot start /nonexistent/mim-lb-check: no such file or directory".to_owned())
    );
}

#[tokio::test]
async fn a_program_without_execute_permission_fails_to_start() {
    let scratch = Scratch::new();
    let script = scratch.path("check.sh");
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    let result = check(&argv(&[&script]), &backend("127.0.0.1"), TIMEOUT).await;
    assert_eq!(
        result,
        Err(format!("cannot start {script}: permission denied"))
    );
}

#[tokio::test]
async fn an_empty_command_fails() {
    assert_eq!(
        check(&[], &backend("127.0.0.1"), TIMEOUT).await,
        Err("no command to run".to_owned())
    );
}

#[test]
fn first_lines_are_trimmed_and_cut_at_a_character_boundary() {
    assert_eq!(first_line(b""), None);
    assert_eq!(first_line(b" \n\t\n"), None);
    assert_eq!(first_line(b"\n  a b  \nc"), Some("a b".to_owned()));
    let long = "é".repeat(LINE_MAX);
    let cut = first_line(long.as_bytes()).unwrap();
    assert_eq!(cut, format!("{}...", "é".repeat(LINE_MAX / 2)));
}
