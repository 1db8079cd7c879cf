//! The mim-lb control plane.
//!
//! Data flows one way: `config` (parse, validate) -> `director` (desired state: ids, Maglev
//! tables, service index) -> `dataplane` (maps, program, attachment) -> kernel.
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod director;
pub mod health;
pub mod maglev;
pub mod neighbor;
pub mod prepare_backend;
