//! Fuzzing the XDP program (issue 10): structured mutations of valid frames and random bytes
//! through the live program, each outcome checked against an oracle of its own.
//!
//! - [`services`]: the configured services, one table for the config and the oracle;
//! - [`generate`]: the seeded frame generator;
//! - [`oracle`]: what the program must do with a frame, from the documented contract;
//! - [`run`]: the loop and the invariants.

pub mod generate;
pub mod oracle;
pub mod run;
pub mod services;

pub use run::{Batch, Fuzzer};
