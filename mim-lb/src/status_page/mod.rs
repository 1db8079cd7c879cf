//! The read-only status page on the metrics listener, for operators without Prometheus: one
//! self-contained HTML page (no external assets) that polls `/status.json` (what `mim-lb
//! status --json` prints) and `/history.json` (new connections per master over the last ten
//! minutes, sampled by the daemon, so the chart is full as soon as the page opens).

pub mod history;

pub use history::History;

/// The page, served at `/`.
pub const PAGE: &str = include_str!("page.html");
