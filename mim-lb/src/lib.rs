//! The mim-lb control plane.
//!
//! Data flows one way: `config` (parse, validate) -> `director` (desired state: ids, Maglev
//! tables, service index) -> `dataplane` (maps, program, attachment) -> kernel. `health`
//! (checks) and `neighbor` (MACs) report to the daemon's event loop (`daemon`), which hands
//! their verdicts to the director; `control` carries operators' commands the same way.
pub mod announce;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod detach;
pub mod drain_wait;
pub mod director;
pub mod health;
pub mod lock;
pub mod maglev;
pub mod manual;
pub mod metrics;
pub mod neighbor;
pub mod prepare_backend;
pub mod rlimit;
pub mod simulate;
pub mod status;
pub mod status_page;
pub mod sync;
pub mod watch;
