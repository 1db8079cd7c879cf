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

/// The last `SAMPLES` samples of each master's new-flow counter, by (service name, backend
/// address), and the JSON of their rates, made once per sample rather than per request.
#[derive(Debug, Default)]
pub struct History {
    series: BTreeMap<(String, String), VecDeque<(u64, u64)>>,
    json: std::sync::Arc<String>,
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
    /// Adds the counters of `status`, read at `unix_ms`: each master keeps its last `SAMPLES`;
    /// a master absent from `SAMPLES` samples in a row is forgotten.
    pub fn push(&mut self, unix_ms: u64, status: &Status) {
        for s in &status.services {
            for b in &s.backends {
                let key = (s.name.clone(), b.address.to_string());
                let points = self.series.entry(key).or_default();
                points.push_back((unix_ms, b.new_flows));
                if points.len() > SAMPLES {
                    points.pop_front();
                }
            }
        }
        let oldest = unix_ms.saturating_sub(INTERVAL.as_millis() as u64 * SAMPLES as u64);
        self.series.retain(|_, points| points.back().is_some_and(|(t, _)| *t > oldest));
        self.json = std::sync::Arc::new(serde_json::to_string(&self.rates()).unwrap_or_default());
    }

    /// `/history.json`, as of the last sample.
    pub fn json(&self) -> std::sync::Arc<String> {
        if self.json.is_empty() {
            return std::sync::Arc::new(serde_json::to_string(&self.rates()).unwrap_or_default());
        }
        std::sync::Arc::clone(&self.json)
    }

    /// Every master's rate between each pair of its successive samples. A counter that went
    /// down (its id was given to a new backend) starts again: that interval has no point.
    pub fn rates(&self) -> HistoryJson {
        let series = self
            .series
            .iter()
            .map(|((service, backend), points)| {
                let new_flows_per_s = points
                    .iter()
                    .zip(points.iter().skip(1))
                    .filter(|((t0, n0), (t1, n1))| t1 > t0 && n1 >= n0)
                    .map(|((t0, n0), (t1, n1))| (*t1, (n1 - n0) as f64 / ((t1 - t0) as f64 / 1000.0)))
                    .collect();
                Series { service: service.clone(), backend: backend.clone(), new_flows_per_s }
            })
            .collect();
        HistoryJson { interval_s: INTERVAL.as_secs(), series }
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
        let json = h.rates();
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
        let points = &h.rates().series[0].new_flows_per_s;
        assert_eq!(points.len(), SAMPLES - 1);
        assert_eq!(points[0].0, 31 * 5000, "the oldest samples were not the ones dropped");
    }
}
