//! Test lab for mim-lb: builds an LVS direct-routing network out of network namespaces, veths
//! and a Linux bridge, runs services on the masters, sends real TCP/UDP traffic and captures
//! frames. Everything a [`Lab`] makes is removed when it is dropped.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2.
//!
//! ```no_run
//! use std::time::Duration;
//! use mim_lb_tests::{Lab, LabSpec, in_netns, tcp_ask};
//!
//! let mut lab = Lab::new(LabSpec::default())?;
//! lab.start_tcp_servers(7000)?;
//! let addr = (lab.master_addr4(0), 7000).into();
//! let name = in_netns(lab.client_ns(), || tcp_ask(addr, Duration::from_secs(2)))??;
//! assert_eq!(name, lab.master_name(0));
//! # anyhow::Ok(())
//! ```
//!
//! Traffic only ever goes to the lab's own namespaces, and every helper that sends or waits
//! takes a count or a timeout.

pub mod bird;
pub mod capture;
pub mod client;
pub mod continuity;
pub mod demo;
pub mod fault;
pub mod frr;
// The XDP program fuzzer (`cargo xtask fuzz`, and a short run in the suite).
pub mod fuzz;
pub mod gateway;
pub mod keepalived;
pub mod lab;
pub mod master_service;
pub mod netns;
// Fixtures for BPF_PROG_TEST_RUN tests and the bench binary (maintained alongside the lab).
pub mod packet;
pub mod process;
pub mod servers;
pub mod soak;
pub mod testrun;

pub use capture::{Capture, FrameInfo, mac_to_string};
pub use client::{TcpHold, count_names, echo_all, percent_spread, tcp_ask, tcp_ask_from, tcp_ask_from_then_reset, tcp_ask_many, udp_ask};
pub use lab::{Lab, LabSpec, LinkSide};
pub use netns::{RUN_TIMEOUT, cleanup_stale_labs, in_netns, output_within, run_in, wait_within};
pub use process::Proc;
pub use servers::Served;
