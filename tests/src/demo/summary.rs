//! The end of the story: what the clients saw in each phase, how long the failure lasted, how
//! fast mim-lb noticed, and whether the story held. Printed for people, and as one line of JSON
//! (`summary-json: {...}`) for scripts and tests.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::tally::Counts;

/// The prefix of the machine-readable line.
pub const JSON_PREFIX: &str = "summary-json: ";

/// The three phases, in order.
pub const PHASES: usize = 3;

#[derive(Debug, Clone)]
pub struct Summary {
    /// Master names, in lab order.
    pub masters: Vec<String>,
    /// Index of the master whose service was killed.
    pub killed: usize,
    /// Names and counts of: every master up, one killed, it back.
    pub phases: Vec<(String, Counts)>,
    pub total: Counts,
    /// Failed requests started after the kill, and when the first and last of them started
    /// (since the kill).
    pub failures_after_kill: u64,
    pub failure_window: Option<(Duration, Duration)>,
    /// From the kill until mim-lb's status said the master was down, and why.
    pub detected_after: Option<Duration>,
    pub down_reason: String,
    /// Requests started between the detection and the restart: (ok, failed).
    pub after_detection: Option<(u64, u64)>,
    /// From the restart until mim-lb's status said the master was up.
    pub back_up_after: Option<Duration>,
    /// Greetings per slave.
    pub slaves: BTreeMap<String, u64>,
    /// The failures after the kill, by step and kind.
    pub failure_kinds: BTreeMap<String, u64>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

impl Summary {
    fn killed_name(&self) -> &str {
        &self.masters[self.killed]
    }

    /// Answers by the killed master after its restart.
    pub fn answered_after_return(&self) -> u64 {
        self.phases.get(2).map_or(0, |(_, c)| c.per_master[self.killed])
    }

    /// Every master answered while all were up.
    pub fn every_master_served(&self) -> bool {
        self.phases.first().is_some_and(|(_, c)| c.per_master.iter().all(|&n| n > 0))
    }

    /// mim-lb took the dead master out and every request after that succeeded.
    pub fn recovered(&self) -> bool {
        self.detected_after.is_some() && matches!(self.after_detection, Some((ok, 0)) if ok > 0)
    }

    /// What went differently from the story; empty when it held.
    pub fn problems(&self) -> Vec<String> {
        let victim = self.killed_name();
        let mut problems = Vec::new();
        if self.phases.len() != PHASES {
            problems.push(format!("the demo ended after {} of {PHASES} phases", self.phases.len()));
        }
        if let Some((_, c)) = self.phases.first() {
            for (name, n) in self.masters.iter().zip(&c.per_master) {
                if *n == 0 {
                    problems.push(format!("{name} answered no request while every master was up"));
                }
            }
            if c.failed > 0 {
                problems.push(format!("{} requests failed while every master was up", c.failed));
            }
        }
        match (self.detected_after, self.after_detection) {
            (None, _) => problems.push(format!("mim-lb did not mark {victim} down")),
            (Some(_), Some((_, failed))) if failed > 0 => {
                problems.push(format!("{failed} requests failed after mim-lb had marked {victim} down"))
            }
            (Some(_), Some((0, _)) | None) => {
                problems.push(format!("no request was made after mim-lb had marked {victim} down"))
            }
            _ => {}
        }
        if self.phases.len() == PHASES {
            if self.back_up_after.is_none() {
                problems.push(format!("mim-lb did not mark {victim} up again"));
            } else if self.answered_after_return() == 0 {
                problems.push(format!("{victim} answered no request after it came back"));
            }
            let failed = self.phases[2].1.failed;
            if failed > 0 {
                problems.push(format!("{failed} requests failed after {victim} was restarted"));
            }
        }
        problems
    }

    /// The summary for people.
    pub fn render(&self) -> Vec<String> {
        let victim = self.killed_name();
        let mut lines = Vec::new();
        let mut header = format!("  {:<22} {:>8} {:>7} ", "phase", "requests", "failed");
        for m in &self.masters {
            header += &format!(" {m:>9}");
        }
        lines.push(header);
        let row = |name: &str, c: &Counts| {
            let mut line = format!("  {name:<22} {:>8} {:>7} ", c.requests, c.failed);
            for n in &c.per_master {
                line += &format!(" {n:>9}");
            }
            line
        };
        for (name, c) in &self.phases {
            lines.push(row(name, c));
        }
        lines.push(row("total", &self.total));
        lines.push(String::new());

        let kinds: Vec<String> = self.failure_kinds.iter().map(|(k, n)| format!("{k} ({n})")).collect();
        let label = |name: &str| format!("  {name:<17}");
        match self.failure_window {
            Some((first, last)) => {
                lines.push(format!(
                    "{}{} requests failed: {}",
                    label("client failures"),
                    self.failures_after_kill,
                    kinds.join(", ")
                ));
                lines.push(format!(
                    "{}they started {} to {} after the kill: a window of {}",
                    label(""),
                    secs(first),
                    secs(last),
                    secs(last.saturating_sub(first))
                ));
            }
            None => lines.push(format!("{}none after the kill", label("client failures"))),
        }
        match self.detected_after {
            Some(d) => {
                lines.push(format!("{}mim-lb marked {victim} down {} after the kill", label("detection"), secs(d)));
                lines.push(format!("{}why: {}", label(""), self.down_reason));
            }
            None => lines.push(format!("{}mim-lb did not mark {victim} down", label("detection"))),
        }
        if let Some((ok, failed)) = self.after_detection {
            let verdict = if failed == 0 { "all succeeded".to_owned() } else { format!("{failed} FAILED") };
            lines.push(format!("{}{} requests until the restart: {verdict}", label("after detection"), ok + failed));
        }
        match self.back_up_after {
            Some(d) => {
                lines.push(format!("{}mim-lb marked {victim} up {} after its restart", label("return"), secs(d)));
                lines.push(format!("{}{victim} answered {} requests since", label(""), self.answered_after_return()));
            }
            None => lines.push(format!("{}mim-lb did not mark {victim} up again", label("return"))),
        }
        let slaves: Vec<String> = self.slaves.iter().map(|(s, n)| format!("{s} {n}")).collect();
        lines.push(format!("{}the client reached the slave named in each answer:", label("slaves")));
        lines.push(format!("{}{}", label(""), if slaves.is_empty() { "none".to_owned() } else { slaves.join(", ") }));
        lines
    }

    /// The summary for scripts.
    pub fn to_json(&self) -> Value {
        let per_master = |c: &Counts| -> Value {
            self.masters.iter().zip(&c.per_master).map(|(m, n)| (m.clone(), json!(n))).collect()
        };
        json!({
            "masters": self.masters,
            "killed": self.killed_name(),
            "requests": self.total.requests,
            "ok": self.total.ok,
            "failed": self.total.failed,
            "per_master": per_master(&self.total),
            "phases": self.phases.iter().map(|(name, c)| json!({
                "name": name,
                "requests": c.requests,
                "failed": c.failed,
                "per_master": per_master(c),
            })).collect::<Vec<_>>(),
            "failures_after_kill": self.failures_after_kill,
            "failure_window_ms": self.failure_window.map(|(first, last)| json!({
                "first": ms(first), "last": ms(last), "length": ms(last.saturating_sub(first)),
            })),
            "detected_after_ms": self.detected_after.map(ms),
            "down_reason": self.down_reason,
            "after_detection": self.after_detection.map(|(ok, failed)| json!({"ok": ok, "failed": failed})),
            "back_up_after_ms": self.back_up_after.map(ms),
            "answered_after_return": self.answered_after_return(),
            "slaves": self.slaves,
            "failure_kinds_after_kill": self.failure_kinds,
            "every_master_served": self.every_master_served(),
            "recovered": self.recovered(),
            "problems": self.problems(),
        })
    }
}

/// Prints a demo's summary lines and its verdict: `as_it_should_be` when there is no problem,
/// else each problem; then, for scripts and CI (not on a live terminal), its JSON line.
pub fn print_verdict(lines: &[String], problems: &[String], as_it_should_be: &str, json: Option<Value>) {
    for line in lines {
        println!("{line}");
    }
    if problems.is_empty() {
        println!("  => as it should be: {as_it_should_be}");
    } else {
        println!("  => NOT as it should be:");
        for p in problems {
            println!("     - {p}");
        }
    }
    if let Some(json) = json {
        println!("{JSON_PREFIX}{json}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, failed: u64, per_master: &[u64]) -> Counts {
        Counts { requests, ok: requests - failed, failed, per_master: per_master.to_vec(), ..Counts::default() }
    }

    fn good() -> Summary {
        let ms = Duration::from_millis;
        Summary {
            masters: vec!["master-1".into(), "master-2".into(), "master-3".into()],
            killed: 1,
            phases: vec![
                ("all masters up".into(), counts(150, 0, &[50, 50, 50])),
                ("master-2 killed".into(), counts(175, 5, &[85, 0, 85])),
                ("master-2 back".into(), counts(150, 0, &[50, 50, 50])),
            ],
            total: counts(475, 5, &[185, 100, 185]),
            failures_after_kill: 5,
            failure_window: Some((ms(10), ms(300))),
            detected_after: Some(ms(350)),
            down_reason: "tcp check failed".into(),
            after_detection: Some((150, 0)),
            back_up_after: Some(ms(400)),
            slaves: BTreeMap::from([("slave-1".into(), 470)]),
            failure_kinds: BTreeMap::from([("asking the VIP: refused".into(), 5)]),
        }
    }

    #[test]
    fn a_story_that_held_has_no_problems() {
        let s = good();
        assert!(s.problems().is_empty(), "{:?}", s.problems());
        let j = s.to_json();
        assert_eq!(j["recovered"], true);
        assert_eq!(j["every_master_served"], true);
        assert_eq!(j["failure_window_ms"]["length"], 290);
        assert_eq!(j["answered_after_return"], 50);
        assert_eq!(j["per_master"]["master-2"], 100);
        assert!(s.render().iter().any(|l| l.contains("a window of 0.29 s")), "{:#?}", s.render());
    }

    #[test]
    fn each_broken_promise_is_named() {
        let mut s = good();
        s.phases[0].1.per_master[2] = 0;
        s.after_detection = Some((100, 2));
        s.phases[2].1.per_master[1] = 0;
        let problems = s.problems();
        assert!(problems.iter().any(|p| p.contains("master-3 answered no request")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("2 requests failed after mim-lb had marked master-2 down")));
        assert!(problems.iter().any(|p| p.contains("master-2 answered no request after it came back")));
        assert!(!s.recovered());

        let mut s = good();
        s.detected_after = None;
        assert!(s.problems().iter().any(|p| p.contains("did not mark master-2 down")));
        assert_eq!(s.to_json()["recovered"], false);
    }
}
