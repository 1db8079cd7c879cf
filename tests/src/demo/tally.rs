//! What the clients saw, kept per request so that any time range can be counted afterwards:
//! a phase of the story, the last second, everything after the failure was detected.
//! Requests belong to the moment they started, whenever they finished.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::traffic::{Outcome, Step};

#[derive(Debug, Clone, Copy)]
struct Entry {
    started: Instant,
    /// Success: the master that answered (index into the tally's masters, `None` for a name
    /// it does not know) and the slave that greeted (index into `slave_names`).
    /// Failure: the index of its kind in `failure_names`.
    result: Result<(Option<usize>, usize), usize>,
}

/// Counts over one time range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counts {
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    /// Answers per master (same order as the tally's masters).
    pub per_master: Vec<u64>,
    /// Greetings per slave name.
    pub per_slave: BTreeMap<String, u64>,
    /// Failures by step and kind, e.g. `asking the VIP: refused`.
    pub failure_kinds: BTreeMap<String, u64>,
    pub first_failure: Option<Instant>,
    pub last_failure: Option<Instant>,
}

/// Every request the demo's clients made.
#[derive(Debug)]
pub struct Tally {
    masters: Vec<String>,
    entries: Vec<Entry>,
    /// Names that entries refer to by index, so that an entry stays small and `Copy`.
    slave_names: Vec<String>,
    failure_names: Vec<String>,
}

/// The index of `name` in `names`, added if new.
fn index_of(names: &mut Vec<String>, name: &str) -> usize {
    names.iter().position(|n| n == name).unwrap_or_else(|| {
        names.push(name.to_owned());
        names.len() - 1
    })
}

impl Tally {
    /// A tally for masters answering with these names.
    pub fn new(masters: Vec<String>) -> Tally {
        Tally { masters, entries: Vec::new(), slave_names: Vec::new(), failure_names: Vec::new() }
    }

    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    pub fn record(&mut self, outcome: &Outcome) {
        let result = match &outcome.result {
            Ok(reached) => Ok((
                self.masters.iter().position(|m| *m == reached.master),
                index_of(&mut self.slave_names, &reached.slave_name),
            )),
            Err(failure) => {
                let step = match failure.step {
                    Step::Master => "asking the VIP",
                    Step::Slave => "reaching the slave",
                };
                Err(index_of(&mut self.failure_names, &format!("{step}: {}", failure.kind)))
            }
        };
        self.entries.push(Entry { started: outcome.started, result });
    }

    /// Requests that started in `[from, to)` (`to` open-ended if `None`).
    pub fn counts(&self, from: Instant, to: Option<Instant>) -> Counts {
        let mut c = Counts { per_master: vec![0; self.masters.len()], ..Counts::default() };
        for e in &self.entries {
            if e.started < from || to.is_some_and(|to| e.started >= to) {
                continue;
            }
            c.requests += 1;
            match e.result {
                Ok((master, slave)) => {
                    c.ok += 1;
                    if let Some(m) = master {
                        c.per_master[m] += 1;
                    }
                    *c.per_slave.entry(self.slave_names[slave].clone()).or_default() += 1;
                }
                Err(kind) => {
                    c.failed += 1;
                    *c.failure_kinds.entry(self.failure_names[kind].clone()).or_default() += 1;
                    c.first_failure = Some(c.first_failure.map_or(e.started, |f| f.min(e.started)));
                    c.last_failure = Some(c.last_failure.map_or(e.started, |l| l.max(e.started)));
                }
            }
        }
        c
    }

    /// Requests that started in the second before `now`.
    pub fn last_second(&self, now: Instant) -> Counts {
        self.counts(now.checked_sub(Duration::from_secs(1)).unwrap_or(now), Some(now))
    }

    /// Everything, from the first request on.
    pub fn total(&self) -> Counts {
        self.entries.iter().map(|e| e.started).min().map_or_else(
            || Counts { per_master: vec![0; self.masters.len()], ..Counts::default() },
            |first| self.counts(first, None),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::traffic::{Failure, Reached};

    fn ok(at: Instant, master: &str, slave: &str) -> Outcome {
        Outcome {
            started: at,
            result: Ok(Reached {
                master: master.into(),
                slave: "10.0.0.201:9000".parse().unwrap(),
                slave_name: slave.into(),
            }),
        }
    }

    fn failed(at: Instant, step: Step) -> Outcome {
        Outcome { started: at, result: Err(Failure { step, kind: "refused", detail: String::new() }) }
    }

    #[test]
    fn counts_by_start_time_master_and_failure() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut tally = Tally::new(vec!["master-1".into(), "master-2".into()]);
        for outcome in [
            ok(t0, "master-1", "slave-1"),
            ok(t0 + s(1), "master-2", "slave-1"),
            failed(t0 + s(2), Step::Master),
            ok(t0 + s(3), "master-1", "slave-2"),
            failed(t0 + s(4), Step::Slave),
            ok(t0 + s(5), "master-1", "slave-2"),
        ] {
            tally.record(&outcome);
        }
        let all = tally.total();
        assert_eq!((all.requests, all.ok, all.failed), (6, 4, 2));
        assert_eq!(all.per_master, [3, 1]);
        assert_eq!(all.first_failure, Some(t0 + s(2)));
        assert_eq!(all.last_failure, Some(t0 + s(4)));

        let middle = tally.counts(t0 + s(1), Some(t0 + s(4)));
        assert_eq!((middle.requests, middle.failed), (3, 1));
        assert_eq!(middle.per_master, [1, 1]);
        assert_eq!((middle.first_failure, middle.last_failure), (Some(t0 + s(2)), Some(t0 + s(2))));

        let last = tally.last_second(t0 + s(5) + Duration::from_millis(1));
        assert_eq!((last.requests, last.ok), (1, 1));

        assert_eq!(all.per_slave.get("slave-2"), Some(&2));
        assert_eq!(all.failure_kinds.get("asking the VIP: refused"), Some(&1));
        assert_eq!(all.failure_kinds.get("reaching the slave: refused"), Some(&1));
        assert_eq!(middle.per_slave, BTreeMap::from([("slave-1".to_owned(), 1), ("slave-2".to_owned(), 1)]));
        assert_eq!(middle.failure_kinds, BTreeMap::from([("asking the VIP: refused".to_owned(), 1)]));
    }

    #[test]
    fn an_empty_tally_counts_nothing() {
        let tally = Tally::new(vec!["master-1".into()]);
        assert_eq!(tally.total().per_master, [0]);
        assert_eq!(tally.total().requests, 0);
    }
}
