//! The mim-lb control plane.
//!
//! Data flows one way: `config` (parse, validate) -> `director` (desired state: ids, Maglev
//! tables, service index) -> `dataplane` (maps, program, attachment) -> kernel.
pub mod config;
pub mod dataplane;
pub mod maglev;
