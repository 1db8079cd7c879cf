//! Samples the daemon's resident memory (`VmRSS` in /proc/PID/status), its open descriptors
//! (/proc/PID/fd) and the records in its connection table (the pinned FLOWS map, counted with
//! bpftool as OPERATIONS.md tells operators to) every few seconds, on a thread of its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::judge::Sample;

/// The daemon being watched: its pid, which run it is, and when that run started.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pub pid: u32,
    pub run: usize,
    pub since: Instant,
}

pub struct Sampler {
    watched: Arc<Mutex<Option<Watched>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    pub fn start(pin_dir: &Path, every: Duration, t0: Instant) -> Result<Sampler> {
        let watched: Arc<Mutex<Option<Watched>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (w, s, flows_pin) = (Arc::clone(&watched), Arc::clone(&stop), pin_dir.join("FLOWS"));
        let thread = std::thread::Builder::new()
            .name("soak-sampler".into())
            .spawn(move || {
                let mut samples = Vec::new();
                let mut next = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        next += every;
                        // A daemon between runs (or one that exited) has nothing to sample.
                        if let Some(watched) = *w.lock().unwrap()
                            && let Ok(sample) = sample(&watched, &flows_pin, t0)
                        {
                            samples.push(sample);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                samples
            })
            .context("starting the sampler")?;
        Ok(Sampler { watched, stop, thread: Some(thread) })
    }

    /// The daemon to watch from now on (None while none runs).
    pub fn watch(&self, watched: Option<Watched>) {
        *self.watched.lock().unwrap() = watched;
    }

    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sample(watched: &Watched, flows_pin: &Path, t0: Instant) -> Result<Sample> {
    let proc = PathBuf::from(format!("/proc/{}", watched.pid));
    let status = std::fs::read_to_string(proc.join("status")).context("reading /proc/PID/status")?;
    let rss_kb = vm_rss_kb(&status).context("no VmRSS in /proc/PID/status")?;
    let fds = std::fs::read_dir(proc.join("fd")).context("listing /proc/PID/fd")?.count() as u64;
    Ok(Sample {
        t: t0.elapsed(),
        run: watched.run,
        age: watched.since.elapsed(),
        rss_kb,
        fds,
        flows: count_flows(flows_pin).ok(),
    })
}

/// `VmRSS:    12345 kB` from /proc/PID/status.
pub fn vm_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Records in a pinned map: `bpftool -j map dump pinned PATH`, counted.
fn count_flows(pin: &Path) -> Result<u64> {
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["-j", "map", "dump", "pinned"]).arg(pin);
    let out = crate::netns::output_within(&mut cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!("bpftool: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
    Ok(dump.as_array().map_or(0, |a| a.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_the_status_file() {
        let status = "Name:\tmim-lb-dut\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(vm_rss_kb(status), Some(12345));
        assert_eq!(vm_rss_kb("Name:\tx\n"), None);
    }
}
