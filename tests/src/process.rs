//! Processes started inside a lab namespace, with their output collected line by line.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::{command_line, enter_netns_on_spawn};

/// Lines kept per process; older ones are dropped so a chatty daemon cannot eat the memory.
const MAX_LINES: usize = 20_000;

/// How long a process gets to exit after SIGTERM when its lab is dropped, before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct OutBuf {
    lines: VecDeque<String>,
    /// Lines dropped from the front, so that line numbers stay stable.
    dropped: usize,
    /// stdout and stderr both at EOF.
    open_streams: u8,
}

struct Inner {
    label: String,
    pid: u32,
    child: Mutex<Child>,
    out: Mutex<OutBuf>,
    changed: Condvar,
}

/// A process started by [`crate::Lab::spawn_in`]. Cheap to clone; every clone refers to the
/// same process. The lab kills it (its whole process group) when the lab is dropped.
#[derive(Clone)]
pub struct Proc {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proc({} pid {})", self.inner.label, self.inner.pid)
    }
}

/// Sent to the spawner thread. The caller blocks until the reply comes, so the pointer stays
/// valid for as long as the spawner uses it.
struct SpawnRequest {
    cmd: *mut Command,
    reply: mpsc::SyncSender<std::io::Result<Child>>,
}

// SAFETY: `Command` is Send, and the requesting thread keeps its `&mut Command` borrowed and
// unused until the reply arrives.
unsafe impl Send for SpawnRequest {}

/// Spawns `cmd` from one thread that lives as long as the process. PR_SET_PDEATHSIG fires
/// when the *thread* that forked the child exits, so forking from a test's own thread would
/// kill daemons as soon as that thread ended; the spawner thread only ends with the process.
fn spawn_from_lasting_thread(cmd: &mut Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("mimlb-spawner".into())
            .spawn(move || {
                for req in rx {
                    // SAFETY: see `SpawnRequest`.
                    let cmd = unsafe { &mut *req.cmd };
                    let _ = req.reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        tx
    });
    let (reply, answer) = mpsc::sync_channel(1);
    spawner
        .send(SpawnRequest { cmd, reply })
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    answer
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("spawner thread died")))
}

impl Proc {
    pub(crate) fn spawn(ns: &str, cmd: &mut Command) -> Result<Proc> {
        let label = format!("`{}` in {ns}", command_line(cmd));
        enter_netns_on_spawn(cmd, ns)?;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only prctl(2) and getppid(2), both async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // If the test process dies without running Drop, its daemons die too.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
        // Own process group, so that killing the group also stops children of a shell wrapper
        // that would otherwise keep our output pipes open.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            spawn_from_lasting_thread(cmd).with_context(|| format!("starting {label}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let inner = Arc::new(Inner {
            label,
            pid: child.id(),
            child: Mutex::new(child),
            out: Mutex::new(OutBuf { open_streams: 2, ..OutBuf::default() }),
            changed: Condvar::new(),
        });
        spawn_reader(&inner, stdout, "out")?;
        spawn_reader(&inner, stderr, "err")?;
        Ok(Proc { inner })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The command line and namespace, for messages.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// All kept lines of stdout and stderr, in arrival order.
    pub fn lines(&self) -> Vec<String> {
        let out = self.inner.out.lock().unwrap();
        out.lines.iter().cloned().collect()
    }

    /// Number of lines seen so far (dropped ones included): pass it to
    /// [`Proc::wait_for_line_since`] to wait only for lines printed after this point.
    pub fn line_count(&self) -> usize {
        let out = self.inner.out.lock().unwrap();
        out.dropped + out.lines.len()
    }

    /// The last `n` lines joined, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let out = self.inner.out.lock().unwrap();
        let skip = out.lines.len().saturating_sub(n);
        out.lines.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits until a line containing `needle` has been printed (at any time so far) and
    /// returns it. Fails on timeout or when the process exits without printing it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line_since(0, needle, timeout)
    }

    /// Like [`Proc::wait_for_line`], considering only lines numbered `since` and later
    /// (see [`Proc::line_count`]).
    pub fn wait_for_line_since(
        &self,
        since: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut out = self.inner.out.lock().unwrap();
        loop {
            let first = since.saturating_sub(out.dropped);
            if let Some(line) = out.lines.iter().skip(first).find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            if out.open_streams == 0 {
                drop(out);
                let status = self.wait_exit(Duration::from_secs(1)).ok();
                bail!(
                    "{} ended ({}) without printing {needle:?}; last lines:\n{}",
                    self.inner.label,
                    status.map_or_else(|| "still running".to_owned(), |s| s.to_string()),
                    self.tail(30)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(out);
                bail!(
                    "{} printed no line containing {needle:?} within {timeout:?}; last lines:\n{}",
                    self.inner.label,
                    self.tail(30)
                );
            }
            out = self.inner.changed.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process itself.
    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: plain kill(2) to our own child.
        if unsafe { libc::kill(self.inner.pid as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {signal} to {}", self.inner.label));
        }
        Ok(())
    }

    /// Sends `signal` to the process's whole process group: a daemon and the children it forked
    /// (keepalived's VRRP child), all at once, as a crash of the machine would.
    pub fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) of the process group this process leads.
        unsafe { libc::kill(-(self.inner.pid as libc::pid_t), signal) };
    }

    /// SIGTERM, up to 5 s for the exit, then SIGKILL: how a harness stops a daemon it owns
    /// (on drop, also while a test unwinds). Errors are ignored: it may be gone already.
    pub fn stop_politely(&self) {
        let _ = self.signal(libc::SIGTERM);
        if self.wait_exit(Duration::from_secs(5)).is_err() {
            let _ = self.signal(libc::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(2));
        }
    }

    /// The exit status if the process has ended.
    pub fn try_exit_status(&self) -> Result<Option<ExitStatus>> {
        let mut child = self.inner.child.lock().unwrap();
        child.try_wait().with_context(|| format!("waiting for {}", self.inner.label))
    }

    /// Waits up to `timeout` for the process to exit, and then (up to the same deadline, and
    /// at least a second) for its last output to be read, so that [`Proc::lines`] after it
    /// holds everything the process printed: an exit is seen before the reader threads reach
    /// the end of the pipes, and a test reading the log at once missed its last lines.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                self.wait_output_read(deadline.max(Instant::now() + Duration::from_secs(1)));
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!("{} still running after {timeout:?}", self.inner.label));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Proc {
    /// Waits until both output streams are at their end or `deadline` passed. A child of the
    /// process that keeps the pipes open past its exit only costs the wait.
    fn wait_output_read(&self, deadline: Instant) {
        let mut out = self.inner.out.lock().unwrap();
        while out.open_streams > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            out = self.inner.changed.wait_timeout(out, deadline - now).unwrap().0;
        }
    }
}

/// Stops processes the polite way first, all at once, so that a lab with several daemons
/// does not wait for them one after another.
pub(crate) fn terminate_all(procs: &[Proc]) {
    let running: Vec<&Proc> =
        procs.iter().filter(|p| !matches!(p.try_exit_status(), Ok(Some(_)))).collect();
    for p in &running {
        p.signal_group(libc::SIGTERM);
    }
    let deadline = Instant::now() + TERM_GRACE;
    for p in &running {
        let left = deadline.saturating_duration_since(Instant::now());
        if p.wait_exit(left).is_err() {
            eprintln!("mim-lb-tests: {} ignored SIGTERM, killing it", p.label());
        }
    }
    for p in procs {
        // The leader may be gone while its children still hold the group.
        p.signal_group(libc::SIGKILL);
        let _ = p.wait_exit(Duration::from_secs(2));
    }
}

fn spawn_reader(inner: &Arc<Inner>, stream: impl Read + Send + 'static, tag: &str) -> Result<()> {
    let inner = Arc::clone(inner);
    thread::Builder::new()
        .name(format!("mimlb-{tag}-{}", inner.pid))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&raw).trim_end_matches(['\n', '\r']).to_owned();
                        let mut out = inner.out.lock().unwrap();
                        out.lines.push_back(line);
                        if out.lines.len() > MAX_LINES {
                            out.lines.pop_front();
                            out.dropped += 1;
                        }
                        drop(out);
                        inner.changed.notify_all();
                    }
                }
            }
            inner.out.lock().unwrap().open_streams -= 1;
            inner.changed.notify_all();
        })
        .context("starting an output reader thread")?;
    Ok(())
}
