//! The report: the machine it ran on, then one section per benchmark. Each section is a table
//! (printed as text, or as Markdown) plus notes, and carries its numbers as JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// A table of one benchmark.
pub struct Section {
    pub title: String,
    /// What the numbers are and how they were measured, printed above the table.
    pub method: Vec<String>,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// Findings and caveats, printed below the table.
    pub notes: Vec<String>,
    pub json: Value,
}

impl Section {
    pub fn new(title: impl Into<String>, columns: &[&'static str]) -> Section {
        Section {
            title: title.into(),
            method: Vec::new(),
            columns: columns.to_vec(),
            rows: Vec::new(),
            notes: Vec::new(),
            json: Value::Null,
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }
}

/// What the benchmarks ran on.
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub hypervisor: Option<String>,
    pub load_before: String,
    pub load_after: String,
    pub bpf_stats_enabled: bool,
    pub started: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        };
        let mut cpu = field("model name").unwrap_or_else(|| "unknown CPU".into());
        if let (Some(family), Some(model)) = (field("cpu family"), field("model")) {
            cpu += &format!(" (family {family}, model {model}");
            if let Some(mhz) = field("cpu MHz") {
                cpu += &format!(", {:.0} MHz", mhz.parse::<f64>().unwrap_or(0.0));
            }
            cpu += ")";
        }
        let flags = field("flags").unwrap_or_default();
        let hypervisor = flags.split_whitespace().any(|f| f == "hypervisor").then(hypervisor_vendor);
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            hypervisor,
            load_before: load_average(),
            load_after: String::new(),
            bpf_stats_enabled: read_trimmed("/proc/sys/kernel/bpf_stats_enabled") == "1",
            started: now_utc(),
        }
    }

    pub fn finish(&mut self) {
        self.load_after = load_average();
    }

    fn lines(&self) -> Vec<String> {
        let mut v = vec![
            format!("CPU: {} x {}{}", self.cpus, self.cpu, match &self.hypervisor {
                Some(h) => format!(" ({h})"),
                None => String::new(),
            }),
            format!("kernel: {}", self.kernel),
            format!(
                "load average (1/5/15 min) at start: {}; at end: {}",
                self.load_before, self.load_after
            ),
            format!(
                "kernel.bpf_stats_enabled: {} (when on, every program run also pays for two clock reads)",
                if self.bpf_stats_enabled { "1" } else { "0" }
            ),
            format!("started: {}", self.started),
        ];
        v.retain(|l| !l.is_empty());
        v
    }

    fn json(&self) -> Value {
        json!({
            "cpu": self.cpu,
            "cpus": self.cpus,
            "kernel": self.kernel,
            "hypervisor": self.hypervisor,
            "load_average_start": self.load_before,
            "load_average_end": self.load_after,
            "bpf_stats_enabled": self.bpf_stats_enabled,
            "started": self.started,
        })
    }
}

/// The hypervisor's CPUID signature (e.g. "KVMKVMKVM"), or just "virtual machine".
fn hypervisor_vendor() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0x40000000 is reserved for hypervisors; the "hypervisor" CPU flag says one
        // is there to answer it.
        let r = core::arch::x86_64::__cpuid(0x4000_0000);
        let bytes: Vec<u8> = [r.ebx, r.ecx, r.edx].iter().flat_map(|w| w.to_le_bytes()).collect();
        let name = String::from_utf8_lossy(&bytes).trim_matches(char::from(0)).trim().to_string();
        if !name.is_empty() {
            return format!("virtual machine, hypervisor signature {name}");
        }
    }
    "virtual machine".into()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn load_average() -> String {
    read_trimmed("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Civil date from days since the epoch (Howard Hinnant's algorithm), to avoid a time crate.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub struct Report {
    pub machine: Machine,
    pub settings: Value,
    pub sections: Vec<Section>,
}

impl Report {
    pub fn text(&self) -> String {
        let mut out = String::from("mim-lb benchmarks\n");
        for l in self.machine.lines() {
            let _ = writeln!(out, "  {l}");
        }
        for s in &self.sections {
            let _ = writeln!(out, "\n== {} ==", s.title);
            for m in &s.method {
                let _ = writeln!(out, "  {m}");
            }
            if !s.rows.is_empty() {
                let widths: Vec<usize> = (0..s.columns.len())
                    .map(|c| {
                        s.rows.iter().map(|r| r[c].chars().count()).chain([s.columns[c].len()]).max().unwrap_or(0)
                    })
                    .collect();
                let line = |cells: Vec<&str>| {
                    let mut l = String::from("  ");
                    for (c, cell) in cells.iter().enumerate() {
                        let pad = widths[c] - cell.chars().count();
                        if c == 0 {
                            l += cell;
                            l += &" ".repeat(pad);
                        } else {
                            l += "  ";
                            l += &" ".repeat(pad);
                            l += cell;
                        }
                    }
                    l.trim_end().to_string()
                };
                let _ = writeln!(out, "{}", line(s.columns.clone()));
                for r in &s.rows {
                    let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
                }
            }
            for n in &s.notes {
                let _ = writeln!(out, "  * {n}");
            }
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from("## mim-lb benchmark run\n\n");
        for l in self.machine.lines() {
            let _ = writeln!(out, "- {l}");
        }
        for s in &self.sections {
            let _ = writeln!(out, "\n### {}\n", s.title);
            for m in &s.method {
                let _ = writeln!(out, "{m}");
            }
            if !s.method.is_empty() {
                out.push('\n');
            }
            if !s.rows.is_empty() {
                let _ = writeln!(out, "| {} |", s.columns.join(" | "));
                let _ = writeln!(
                    out,
                    "|{}",
                    s.columns.iter().enumerate().map(|(i, _)| if i == 0 { "---|" } else { "---:|" }).collect::<String>()
                );
                for r in &s.rows {
                    let _ = writeln!(out, "| {} |", r.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "));
                }
                out.push('\n');
            }
            for n in &s.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let sections: serde_json::Map<String, Value> =
            self.sections.iter().map(|s| (s.title.clone(), s.json.clone())).collect();
        json!({
            "machine": self.machine.json(),
            "settings": self.settings,
            "sections": sections,
        })
    }
}

/// Median of a non-empty sample (the upper middle one for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// "ok" or "MISSED" for a ratio against a goal (a most-allowed ratio).
pub fn goal_verdict(ratio: f64, goal: f64) -> String {
    if ratio <= goal { format!("<= {goal}x ok") } else { format!("<= {goal}x MISSED") }
}
