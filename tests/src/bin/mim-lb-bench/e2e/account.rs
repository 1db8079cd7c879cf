//! What the end-to-end benchmark reads off the machine, and the arithmetic on it: CPU time
//! from `/proc/stat`, an interface's byte counters from `/proc/net/dev`, latency percentiles.
//! The parsing and the arithmetic are pure, so they have tests of their own.

use anyhow::{Context as _, Result, bail};

/// The machine's CPU time so far, summed over every CPU, in clock ticks (`USER_HZ`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Everything but idle and iowait: user, nice, system, irq, softirq, steal.
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    pub fn read() -> Result<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_proc_stat(&text)
    }

    /// Busy CPU time from `self` to `later`, in milliseconds.
    pub fn busy_ms_until(&self, later: &CpuTimes) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 * 1000.0 / user_hz()
    }
}

/// Ticks per second of `/proc/stat`'s counters.
fn user_hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The first line of `/proc/stat`: `cpu  user nice system idle iowait irq softirq steal guest
/// guest_nice`. Guest time is already counted in user (and nice), so it is left out.
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu ")).context("no `cpu` line in /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>().with_context(|| format!("bad /proc/stat field {f:?}")))
        .collect::<Result<_>>()?;
    if fields.len() < 8 {
        bail!("/proc/stat's cpu line has {} fields, expected at least 8: {line:?}", fields.len());
    }
    let (idle, iowait) = (fields[3], fields[4]);
    let total: u64 = fields[..8].iter().sum();
    Ok(CpuTimes { busy: total - idle - iowait, total })
}

/// CPU time of the lab's own processes: this one (the load generator, the masters' service and
/// everything they make the kernel do in their context, such as a veth's receive path, which
/// runs in the sender's softirq), the director's process if it has one, and the ksoftirqd
/// threads (softirq work deferred out of those contexts). The kernel here has no IRQ time
/// accounting, so a softirq's time belongs to the task it interrupted: on a machine shared
/// with other work, this leaves out most of the others' CPU, which a machine-wide sum keeps.
#[derive(Clone, Debug, Default)]
pub struct LabCpu {
    /// The director's process, counted apart too.
    director: Option<u32>,
    ksoftirqd: Vec<u32>,
}

/// A reading of [`LabCpu`], in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct LabCpuMs {
    pub total: f64,
    /// The director's process alone (also in `total`).
    pub director: f64,
}

impl LabCpu {
    /// The lab's CPU: this process, `director` and the ksoftirqd threads.
    pub fn new(director: Option<u32>) -> LabCpu {
        let mut ksoftirqd = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                if comm.starts_with("ksoftirqd/") {
                    ksoftirqd.push(pid);
                }
            }
        }
        LabCpu { director, ksoftirqd }
    }

    /// CPU time so far, in milliseconds (a process that has gone counts nothing).
    pub fn read(&self) -> LabCpuMs {
        let director = self.director.map_or(0.0, process_cpu_ms);
        let ksoftirqd: f64 = self.ksoftirqd.iter().copied().map(process_cpu_ms).sum();
        LabCpuMs { total: self_cpu_ms() + director + ksoftirqd, director }
    }
}

impl LabCpuMs {
    /// From `self` to `later`.
    pub fn until(&self, later: &LabCpuMs) -> LabCpuMs {
        LabCpuMs { total: (later.total - self.total).max(0.0), director: (later.director - self.director).max(0.0) }
    }
}

/// utime + stime of a process (all its threads), in ms; 0 for one that has gone.
fn process_cpu_ms(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    parse_pid_stat(&text).map_or(0.0, |(utime, stime)| (utime + stime) as f64 * 1000.0 / user_hz())
}

/// User plus system time of this process, all its threads, those that ended too.
fn self_cpu_ms() -> f64 {
    // SAFETY: getrusage with a valid pointer to a zeroed local.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime and stime (clock ticks) of `/proc/<pid>/stat`: fields 14 and 15, counted after the
/// command name, which is in parentheses and may itself hold spaces and parentheses.
pub fn parse_pid_stat(text: &str) -> Option<(u64, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// From `/proc/net/sockstat` (of the namespace it was read in): TCP sockets in use in that
/// namespace, and the pages all TCP sockets of the machine hold (the kernel keeps that count
/// per protocol, not per namespace).
pub fn parse_sockstat(text: &str) -> Result<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("TCP:")).context("no TCP line in /proc/net/sockstat")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| -> Result<u64> {
        let i = words.iter().position(|w| *w == name).with_context(|| format!("no {name} in {line:?}"))?;
        words.get(i + 1).and_then(|v| v.parse().ok()).with_context(|| format!("bad {name} in {line:?}"))
    };
    Ok((field("inuse")?, field("mem")?))
}

/// Received and sent bytes of `ifname` in `/proc/net/dev` text (of the namespace it was read in).
pub fn parse_net_dev(text: &str, ifname: &str) -> Result<(u64, u64)> {
    for line in text.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else { continue };
        if name.trim() != ifname {
            continue;
        }
        let v: Vec<u64> = counters.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        if v.len() < 16 {
            bail!("/proc/net/dev line for {ifname} has {} counters: {line:?}", v.len());
        }
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes ...
        return Ok((v[0], v[8]));
    }
    bail!("no {ifname} in /proc/net/dev")
}

/// The `p`-th percentile (0 < p <= 100) of `sorted` by nearest rank: the smallest value with
/// at least p% of the sample at or below it. None for an empty sample.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    // p * n / 100 in floating point can land a hair above a whole rank (99.9% of 1000 is
    // 999.0000000000001), which must not round up to the next sample.
    let rank = (p * sorted.len() as f64 / 100.0 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `a / b`, or None when `b` is zero (an overhead of zero has no meaningful multiple).
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// A director's own cost from rounds paired with the floor's: the median over rounds of the
/// director's cost minus the floor's in the same round (both measured minutes apart at most,
/// so a machine that got busier or quieter between rounds moves both), never below zero.
/// None without a pair.
pub fn paired_overhead(director: &[f64], floor: &[f64]) -> Option<f64> {
    let diffs: Vec<f64> = director.iter().zip(floor).map(|(d, f)| d - f).filter(|x| x.is_finite()).collect();
    if diffs.is_empty() {
        return None;
    }
    Some(crate::report::median(&diffs).max(0.0))
}

/// One own cost as a multiple of another's: None when both are 0 (nothing to tell apart),
/// infinite when only the other one is.
pub fn own_ratio(own: f64, other: f64) -> Option<f64> {
    match (own > 0.0, other > 0.0) {
        (_, true) => Some(own / other),
        (true, false) => Some(f64::INFINITY),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_is_everything_but_idle_and_iowait() {
        // A real line from a 2-CPU guest (kernel 6.18); guest columns are already in user.
        let text = "cpu  43250 120 21000 900000 3100 0 5400 230 77 0\ncpu0 1 2 3 4 5 6 7 8 9 0\nintr 1\n";
        let t = parse_proc_stat(text).unwrap();
        assert_eq!(t.total, 43250 + 120 + 21000 + 900000 + 3100 + 5400 + 230);
        assert_eq!(t.busy, 43250 + 120 + 21000 + 5400 + 230);
        assert!(parse_proc_stat("cpu0 1 2 3\n").is_err());
        assert!(parse_proc_stat("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn busy_time_is_converted_from_ticks() {
        let a = CpuTimes { busy: 100, total: 1000 };
        let b = CpuTimes { busy: 100 + user_hz() as u64, total: 2000 };
        assert_eq!(a.busy_ms_until(&b), 1000.0);
        // A counter that went backwards (it cannot, but a wrong pairing could) is no time.
        assert_eq!(b.busy_ms_until(&a), 0.0);
    }

    #[test]
    fn pid_stat_gives_user_and_system_ticks_past_an_awkward_name() {
        // From `cat /proc/<haproxy>/stat`, the name changed to hold a space and a parenthesis.
        let text = "4242 (ha proxy)) S 4200 4242 4200 0 -1 4194560 1350 0 0 0 731 296 0 0 20 0 2 0 51211 9000000 4000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_pid_stat(text), Some((731, 296)));
        assert_eq!(parse_pid_stat("4242 (x) S 1 2"), None);
        assert_eq!(parse_pid_stat("garbage"), None);
    }

    #[test]
    fn sockstat_gives_sockets_in_use_and_pages() {
        let text = "sockets: used 8113\nTCP: inuse 8004 orphan 0 tw 12 alloc 8010 mem 2231\nUDP: inuse 3 mem 4\n";
        assert_eq!(parse_sockstat(text).unwrap(), (8004, 2231));
        assert!(parse_sockstat("UDP: inuse 3 mem 4\n").is_err());
        assert!(parse_sockstat("TCP: inuse x mem 4\n").is_err());
    }

    #[test]
    fn net_dev_gives_the_interface_bytes() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
                    face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  \
                    eth0: 1234567    8901    0    0    0     0          0         0   765432    1098    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(text, "eth0").unwrap(), (1_234_567, 765_432));
        assert_eq!(parse_net_dev(text, "lo").unwrap(), (0, 0));
        assert!(parse_net_dev(text, "eth1").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), Some(500));
        assert_eq!(percentile(&v, 99.0), Some(990));
        assert_eq!(percentile(&v, 99.9), Some(999));
        assert_eq!(percentile(&v, 100.0), Some(1000));
        // Fewer samples than the percentile can tell apart: the largest one.
        assert_eq!(percentile(&[3, 7, 9], 99.9), Some(9));
        assert_eq!(percentile(&[3, 7, 9], 50.0), Some(7));
        assert_eq!(percentile(&[5], 0.1), Some(5));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn own_costs_are_paired_by_round_and_ratios_need_a_divisor() {
        assert_eq!(ratio(70.0, 200.0), Some(0.35));
        assert_eq!(ratio(70.0, 0.0), None);
        assert_eq!(own_ratio(70.0, 200.0), Some(0.35));
        assert_eq!(own_ratio(0.0, 45.0), Some(0.0));
        assert_eq!(own_ratio(70.0, 0.0), Some(f64::INFINITY));
        assert_eq!(own_ratio(0.0, 0.0), None);
        // Round by round: (30 - 10), (25 - 20), (50 - 15); the median of 20, 5, 35.
        assert_eq!(paired_overhead(&[30.0, 25.0, 50.0], &[10.0, 20.0, 15.0]), Some(20.0));
        assert_eq!(paired_overhead(&[10.0, 12.0, 9.0], &[20.0, 20.0, 20.0]), Some(0.0));
        assert_eq!(paired_overhead(&[], &[1.0]), None);
    }
}
