//! `cargo xtask lab`: the demo an operator runs first. It builds a lab (a client, a gateway
//! running mim-lb, masters running a model of the master service, and the slaves they hand
//! out), sends a steady stream of requests through the VIP, kills one master's service, brings
//! it back, and shows all along what the clients saw and what mim-lb said. With two directors
//! ([`pair`]) it kills the active director instead, and keepalived moves the VIP; with
//! `--ecmp` ([`ecmp`]) 2 to 8 directors sit behind a router that spreads connections over them.

pub mod ecmp;
pub mod keep;
pub mod pair;
mod show;
pub mod signals;
pub mod summary;
pub mod tally;
pub mod traffic;
pub mod view;

mod story;

pub use story::{Options, run};
