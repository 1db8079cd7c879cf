//! New connections per master over the last minutes: the daemon samples the per-backend
//! counters every `INTERVAL` and keeps `SAMPLES` of them; the page draws the rates between
//! successive samples.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::status::Status;

/// How often the counters are sampled.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes at `INTERVAL`.
pub const SAMPLES: usize = 120;

/// (service name, backend address) -> new flows counted so far.
type Counters = BTreeMap<(String, String), u64>;

/// The last `SAMPLES` samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<(u64, Counters)>,
}

/// One master's rates, as `/history.json` gives them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub service: String,
    pub backend: String,
    /// (unix time in ms at the end of the interval, new connections per second in it).
    pub new_flows_per_s: Vec<(u64, f64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryJson {
    pub interval_s: u64,
    pub series: Vec<Series>,
}

impl History {
    /// Adds the counters of `status`, read at `unix_ms`, dropping the oldest sample beyond
    /// `SAMPLES`.
    pub fn push(&mut self, unix_ms: u64, status: &Status) {
        let counters = status
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| ((s.name.clone(), b.address.to_string()), b.new_flows)))
            .collect();
        self.samples.push_back((unix_ms, counters));
        while self.samples.len() > SAMPLES {
            self.samples.pop_front();
        }
    }

    /// Every master's rate between each pair of successive samples that both counted it. A
    /// counter that went down (its id was given to a new backend) starts again: that
    /// interval has no point.
    pub fn json(&self) -> HistoryJson {
        let mut series: BTreeMap<(String, String), Vec<(u64, f64)>> = BTreeMap::new();
        for pair in self.samples.iter().collect::<Vec<_>>().windows(2) {
            let ((t0, before), (t1, after)) = (pair[0], pair[1]);
            let seconds = t1.saturating_sub(*t0) as f64 / 1000.0;
            if seconds <= 0.0 {
                continue;
            }
            for (key, n1) in after {
                let points = series.entry(key.clone()).or_default();
                if let Some(n0) = before.get(key).filter(|n0| *n0 <= n1) {
                    points.push((*t1, (n1 - n0) as f64 / seconds));
                }
            }
        }
        HistoryJson {
            interval_s: INTERVAL.as_secs(),
            series: series
                .into_iter()
                .map(|((service, backend), new_flows_per_s)| Series { service, backend, new_flows_per_s })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(counts: &[(&str, u64)]) -> Status {
        let mut s: Status = serde_json::from_str(include_str!("../../../tests/golden/status.json")).unwrap();
        let template = s.services[0].backends[0].clone();
        s.services.truncate(1);
        s.services[0].name = "web".into();
        s.services[0].backends = counts
            .iter()
            .map(|(addr, n)| crate::status::BackendStatus { address: addr.parse().unwrap(), new_flows: *n, ..template.clone() })
            .collect();
        s
    }

    #[test]
    fn rates_are_per_second_between_samples_and_a_reset_counter_has_no_point() {
        let mut h = History::default();
        h.push(10_000, &status(&[("10.0.0.1", 100), ("10.0.0.2", 50)]));
        h.push(15_000, &status(&[("10.0.0.1", 150), ("10.0.0.2", 50)]));
        // 10.0.0.2's id went to a new backend: its counter restarted.
        h.push(20_000, &status(&[("10.0.0.1", 250), ("10.0.0.2", 5)]));
        h.push(25_000, &status(&[("10.0.0.1", 250), ("10.0.0.2", 30), ("10.0.0.3", 7)]));
        let json = h.json();
        let of = |addr: &str| json.series.iter().find(|s| s.backend == addr).unwrap().new_flows_per_s.clone();
        assert_eq!(of("10.0.0.1"), vec![(15_000, 10.0), (20_000, 20.0), (25_000, 0.0)]);
        assert_eq!(of("10.0.0.2"), vec![(15_000, 0.0), (25_000, 5.0)]);
        // A master added since the last sample has no interval yet.
        assert_eq!(of("10.0.0.3"), vec![]);
        assert_eq!(json.interval_s, 5);
    }

    #[test]
    fn only_the_last_ten_minutes_are_kept() {
        let mut h = History::default();
        for i in 0..(SAMPLES as u64 + 30) {
            h.push(i * 5000, &status(&[("10.0.0.1", i)]));
        }
        let points = &h.json().series[0].new_flows_per_s;
        assert_eq!(points.len(), SAMPLES - 1);
        assert_eq!(points[0].0, 31 * 5000, "the oldest samples were not the ones dropped");
    }
}
