//! The soak's report: the counts, the classification of every failure, the daemon's
//! resources over time, and the broken invariants, as text and as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use super::flows::{PoolOutcome, Proto, ShortOutcome};
use super::judge::{Death, Flatness, JudgedEnd, JudgedFailure, Sample, Timers};

#[derive(Debug)]
pub struct SoakReport {
    pub seed: u64,
    pub planned: Duration,
    pub elapsed: Duration,
    pub timers: Timers,
    pub warm_up: Duration,
    pub limit_pct: f64,
    /// (when, what) of every step taken.
    pub steps: Vec<(Duration, String)>,
    /// Broken invariants found while stepping (a status that disagreed, a slow detection).
    pub step_violations: Vec<(Duration, String)>,
    pub deaths: Vec<Death>,
    /// Death to `down`, and return to `up` (or `draining`), as the status showed them.
    pub detections: Vec<Duration>,
    pub recoveries: Vec<Duration>,
    pub shorts: ShortOutcome,
    pub judged_failures: Vec<JudgedFailure>,
    pub flows: PoolOutcome,
    pub judged_ends: Vec<JudgedEnd>,
    pub samples: Vec<Sample>,
    pub flatness: Vec<Flatness>,
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A step's kind: its label without the master and the weights.
fn step_kind(label: &str) -> String {
    let mut kind = label.split(" master-").next().unwrap_or(label).to_owned();
    if let (Some(a), Some(b)) = (kind.find('['), kind.find(']')) {
        kind.replace_range(a..=b, "");
        kind = kind.replace("  ", " ");
    }
    kind
}

impl SoakReport {
    /// Every broken invariant, one line each; empty when the soak passed.
    pub fn violations(&self) -> Vec<String> {
        let mut out: Vec<String> = self.step_violations.iter().map(|(t, what)| format!("+{}: {what}", secs(*t))).collect();
        for j in self.judged_failures.iter().filter(|j| j.excused_by.is_none()) {
            let f = &j.failure;
            out.push(format!(
                "+{}: a short {} {} failed with no master death to excuse it: {}",
                secs(f.started),
                f.proto.name(),
                if f.proto == Proto::Tcp { "connection" } else { "request" },
                f.error
            ));
        }
        for j in self.judged_ends.iter().filter(|j| j.explained_by.is_none()) {
            let e = &j.end;
            out.push(format!(
                "+{}: a long-lived {} flow to live master-{} (open since +{}) broke: {}",
                secs(e.ended),
                e.proto.name(),
                e.master + 1,
                secs(e.opened),
                e.error
            ));
        }
        for f in self.flatness.iter().filter(|f| f.flat == Some(false)) {
            out.push(format!(
                "daemon run {}: {} grew {:.1}% after warm-up (floor {} -> {}; limit {}%)",
                f.run, f.what, f.growth_pct, f.first_floor, f.last_floor, self.limit_pct
            ));
        }
        out
    }

    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    fn step_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (_, label) in &self.steps {
            *counts.entry(step_kind(label)).or_default() += 1;
        }
        counts
    }

    fn excused(&self, proto: Proto) -> (usize, usize) {
        let of: Vec<&JudgedFailure> = self.judged_failures.iter().filter(|j| j.failure.proto == proto).collect();
        let excused = of.iter().filter(|j| j.excused_by.is_some()).count();
        (excused, of.len() - excused)
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let t = &self.timers;
        let (from, to) = t.excused_window(Duration::from_secs(3600));
        let _ = writeln!(s, "mim-lb soak: seed {}, {} planned, {} run", self.seed, secs(self.planned), secs(self.elapsed));
        let steps: Vec<String> = self.step_counts().iter().map(|(k, n)| format!("{k}: {n}")).collect();
        let _ = writeln!(s, "steps: {} ({})", self.steps.len(), steps.join(", "));
        let _ = writeln!(
            s,
            "health checks: interval {}, timeout {}, rise {}, fall {}; short failures are excused from {} before a \
             master's death to {} after it (fall x interval + timeout = {}, + {} noise)",
            ms(t.interval),
            ms(t.timeout),
            t.rise,
            t.fall,
            ms(Duration::from_secs(3600) - from),
            ms(to - Duration::from_secs(3600)),
            ms(t.detection_bound()),
            ms(t.noise)
        );
        let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
        let median = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        let _ = writeln!(
            s,
            "master deaths: {}; marked down after median {}, max {} (bound {}); back after median {}, max {} (bound {})",
            self.deaths.len(),
            ms(median(&self.detections)),
            ms(max(&self.detections)),
            ms(t.detection_bound() + t.noise),
            ms(median(&self.recoveries)),
            ms(max(&self.recoveries)),
            ms(t.recovery_bound() + t.noise)
        );
        let sh = &self.shorts;
        for (proto, ok, failed) in [(Proto::Tcp, sh.tcp_ok, sh.tcp_failed), (Proto::Udp, sh.udp_ok, sh.udp_failed)] {
            let (excused, not) = self.excused(proto);
            let _ = writeln!(
                s,
                "short {}: {} attempted, {failed} failed ({excused} within a death's window, {not} not)",
                proto.name(),
                ok + failed
            );
        }
        let explained = self.judged_ends.iter().filter(|j| j.explained_by.is_some()).count();
        let broken = self.judged_ends.len() - explained;
        let _ = writeln!(
            s,
            "long-lived flows: {} tcp and {} udp opened; {explained} ended with their master's death, {broken} broke to a \
             live master, {} alive at the end; longest life {}",
            self.flows.opened.get(&Proto::Tcp).unwrap_or(&0),
            self.flows.opened.get(&Proto::Udp).unwrap_or(&0),
            self.flows.still_alive,
            secs(self.flows.longest)
        );
        let _ = writeln!(
            s,
            "daemon resources ({} samples; floors of the first and last quarter after {} of warm-up, limit {}%):",
            self.samples.len(),
            secs(self.warm_up),
            self.limit_pct
        );
        for f in &self.flatness {
            let verdict = match f.flat {
                Some(true) => "flat",
                Some(false) => "GREW",
                None => "too short to judge",
            };
            let _ = writeln!(
                s,
                "  run {} {}: {} samples, floor {} -> {} ({:+.1}%), max {}: {verdict}",
                f.run, f.what, f.samples, f.first_floor, f.last_floor, f.growth_pct, f.max
            );
        }
        let flows: Vec<u64> = self.samples.iter().filter_map(|x| x.flows).collect();
        if let (Some(min), Some(max)) = (flows.iter().min(), flows.iter().max()) {
            let _ = writeln!(
                s,
                "connection table (FLOWS records, capacity {}, filled by {} UDP flows before the start): min {min}, max {max}, last {}",
                super::FLOW_TABLE_SIZE,
                2 * super::FLOW_TABLE_SIZE,
                flows.last().unwrap_or(&0)
            );
        }
        let _ = writeln!(s, "series (t, run, rss kB, fds, FLOWS records), about one a minute:");
        let stride = (self.samples.len() / 30).max(1);
        for x in self.samples.iter().step_by(stride) {
            let _ = writeln!(
                s,
                "  +{:>7} run {} rss {} fds {} flows {}",
                secs(x.t),
                x.run,
                x.rss_kb,
                x.fds,
                x.flows.map_or("?".to_owned(), |f| f.to_string())
            );
        }
        let violations = self.violations();
        if violations.is_empty() {
            let _ = writeln!(s, "verdict: PASSED (no broken invariant)");
        } else {
            let _ = writeln!(s, "verdict: FAILED, {} broken invariants:", violations.len());
            for v in violations.iter().take(50) {
                let _ = writeln!(s, "  {v}");
            }
        }
        s
    }

    pub fn json(&self) -> Value {
        let sh = &self.shorts;
        let (tcp_excused, tcp_not) = self.excused(Proto::Tcp);
        let (udp_excused, udp_not) = self.excused(Proto::Udp);
        json!({
            "seed": self.seed,
            "planned_s": self.planned.as_secs_f64(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "passed": self.passed(),
            "violations": self.violations(),
            "steps": self.step_counts(),
            "master_deaths": self.deaths.len(),
            "detection_ms": self.detections.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
            "recovery_ms": self.recoveries.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
            "short": {
                "tcp": {"attempted": sh.tcp_ok + sh.tcp_failed, "failed": sh.tcp_failed, "excused": tcp_excused, "not_excused": tcp_not},
                "udp": {"attempted": sh.udp_ok + sh.udp_failed, "failed": sh.udp_failed, "excused": udp_excused, "not_excused": udp_not},
            },
            "long_lived": {
                "opened": self.flows.opened.iter().map(|(p, n)| (p.name(), *n)).collect::<BTreeMap<_, _>>(),
                "ended_with_master_death": self.judged_ends.iter().filter(|j| j.explained_by.is_some()).count(),
                "broken_to_live_master": self.judged_ends.iter().filter(|j| j.explained_by.is_none()).count(),
                "alive_at_end": self.flows.still_alive,
                "longest_s": self.flows.longest.as_secs_f64(),
            },
            // Every failed short attempt, and the death that excuses it (null: none does).
            "short_failures": self.judged_failures.iter().map(|j| json!({
                "proto": j.failure.proto.name(),
                "started_s": j.failure.started.as_secs_f64(),
                "ended_s": j.failure.ended.as_secs_f64(),
                "error": j.failure.error,
                "excused_by": j.excused_by.map(|d| json!({"master": d.master + 1, "died_s": d.at.as_secs_f64()})),
            })).collect::<Vec<_>>(),
            // Every long-lived flow that ended, and the death of its master that explains it.
            "long_lived_ends": self.judged_ends.iter().map(|j| json!({
                "proto": j.end.proto.name(),
                "master": j.end.master + 1,
                "opened_s": j.end.opened.as_secs_f64(),
                "ended_s": j.end.ended.as_secs_f64(),
                "error": j.end.error,
                "explained_by": j.explained_by.map(|d| json!({"master": d.master + 1, "died_s": d.at.as_secs_f64()})),
            })).collect::<Vec<_>>(),
            "flatness": self.flatness.iter().map(|f| json!({
                "run": f.run, "what": f.what, "samples": f.samples, "first_floor": f.first_floor,
                "last_floor": f.last_floor, "max": f.max, "growth_pct": f.growth_pct, "flat": f.flat,
            })).collect::<Vec<_>>(),
            "samples": self.samples.iter().map(|x| json!([x.t.as_secs_f64(), x.run, x.rss_kb, x.fds, x.flows])).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_kinds_drop_the_master_and_the_weights() {
        assert_eq!(step_kind("kill master-3"), "kill");
        assert_eq!(step_kind("reweight [1, 2, 3, 1] by SIGHUP"), "reweight by SIGHUP");
        assert_eq!(step_kind("restart (SIGKILL)"), "restart (SIGKILL)");
    }
}
