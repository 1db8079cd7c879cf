//! The command check: an operator-supplied program exits 0.
//!
//! The program runs in a process group of its own, so that everything it starts can be killed
//! with it: a check must not leave processes behind, whether it finished, timed out, or was
//! stopped half-way because its target was removed.

use std::{
    io,
    net::IpAddr,
    os::{fd::OwnedFd, unix::process::ExitStatusExt},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::Duration,
};

use tokio::{
    io::AsyncReadExt,
    net::unix::pipe,
    process::{Child, Command},
};

use super::probe::{describe_io, timed_out};
use crate::config::ServiceKey;

/// Output kept for the detail; the rest is read and thrown away so that a chatty program
/// never blocks on a full pipe.
const OUTPUT_KEPT: usize = 1024;
/// Longest output line quoted in a detail.
const LINE_MAX: usize = 200;
/// How long to wait for a killed group's leader to be reaped before leaving it to tokio's
/// background reaper; SIGKILL makes this immediate unless the kernel itself is stuck.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// Which backend the command checks: fills the placeholders and the environment.
pub(super) struct Backend {
    pub address: IpAddr,
    pub port: u16,
    pub service: ServiceKey,
}

/// Runs `argv` for `backend`; `Err` is the failure's detail.
pub(super) async fn check(
    argv: &[String],
    backend: &Backend,
    timeout: Duration,
) -> Result<String, String> {
    let argv = substitute(argv, backend);
    let Some(program) = argv.first() else {
        return Err("no command to run".to_owned());
    };
    let (reader, writer) =
        io::pipe().map_err(|e| format!("cannot create a pipe: {}", describe_io(&e)))?;
    let mut child = spawn(&argv, backend, writer)
        .map_err(|e| format!("cannot start {program}: {}", describe_io(&e)))?;
    // Declared after `child`, so dropped before it: the group is killed while its leader is
    // still unreaped, which keeps the group id from being reused by an unrelated process.
    let group = GroupKiller::new(&child);
    let output = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
        .map_err(|e| format!("cannot read the output of {program}: {}", describe_io(&e)))?;

    let finished = tokio::time::timeout(timeout, async {
        tokio::join!(
            async {
                let status = child.wait().await;
                // Leftovers such as `sleep 30 &` hold the output pipe open: killing them is
                // what lets the read below end.
                group.kill();
                status
            },
            read_output(output),
        )
    })
    .await;

    match finished {
        Ok((Ok(status), output)) => {
            let detail = describe_exit(status, &output);
            if status.success() {
                Ok(detail)
            } else {
                Err(detail)
            }
        }
        Ok((Err(e), _)) => Err(format!("waiting for {program}: {}", describe_io(&e))),
        Err(_) => {
            group.kill();
            // Reap it; if that takes too long, `kill_on_drop` hands it to tokio's reaper.
            let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
            Err(timed_out(timeout))
        }
    }
}

/// Replaces `{address}` and `{port}` in every argument. IPv6 addresses go in without brackets,
/// as programs taking an address argument expect.
fn substitute(argv: &[String], backend: &Backend) -> Vec<String> {
    let address = backend.address.to_string();
    let port = backend.port.to_string();
    argv.iter()
        .map(|arg| arg.replace("{address}", &address).replace("{port}", &port))
        .collect()
}

/// Starts `argv` with stdout and stderr both on `output`. The `Command`, and with it the
/// parent's copies of the pipe's write end, is gone when this returns: the read side sees the
/// end of the output as soon as the program's side closes.
fn spawn(argv: &[String], backend: &Backend, output: io::PipeWriter) -> io::Result<Child> {
    let (program, args) = match argv.split_first() {
        Some(split) => split,
        None => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    let stderr = output.try_clone()?;
    Command::new(program)
        .args(args)
        .env("MIM_LB_BACKEND_ADDRESS", backend.address.to_string())
        .env("MIM_LB_BACKEND_PORT", backend.port.to_string())
        .env("MIM_LB_SERVICE", backend.service.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(output))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// Kills a process group with SIGKILL once: when asked, or at the latest when dropped (a check
/// stopped half-way).
struct GroupKiller {
    /// The group id, which is the leader's pid; 0 once killed, or if the leader was already
    /// gone. Killing only once keeps a later call from hitting a group id that was freed and
    /// reused in between.
    pgid: AtomicI32,
}

impl GroupKiller {
    fn new(leader: &Child) -> Self {
        let pgid = leader
            .id()
            .and_then(|pid| libc::pid_t::try_from(pid).ok())
            .unwrap_or(0);
        GroupKiller {
            pgid: AtomicI32::new(pgid),
        }
    }

    fn kill(&self) {
        let pgid = self.pgid.swap(0, Ordering::Relaxed);
        if pgid > 0 {
            // SAFETY: kill(2) has no memory-safety preconditions. ESRCH (the whole group has
            // already exited) is a normal outcome and needs no handling.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the output to its end, keeping the first `OUTPUT_KEPT` bytes.
async fn read_output(mut output: pipe::Receiver) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match output.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// "exit status 1: <first line of output>", "killed by signal 9".
fn describe_exit(status: ExitStatus, output: &[u8]) -> String {
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    };
    match first_line(output) {
        Some(line) => format!("{how}: {line}"),
        None => how,
    }
}

/// The first non-blank line, trimmed, at most `LINE_MAX` bytes (cut at a character boundary).
fn first_line(output: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(output);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    if line.len() <= LINE_MAX {
        return Some(line.to_owned());
    }
    let mut end = LINE_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}...", &line[..end]))
}

#[cfg(test)]
mod tests;
