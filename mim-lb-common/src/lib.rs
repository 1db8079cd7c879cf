//! The one definition of everything the mim-lb XDP program and its control plane share:
//! map keys and values, map names, table sizes, verdict reason codes and the flow hash.
//!
//! Rules for this crate (they keep the two sides from drifting apart):
//! - every map value is `#[repr(C)]` with explicit padding fields, so its layout is the same
//!   in the BPF object, in BTF (what `bpftool map dump` prints) and in userspace;
//! - no `bool`, `enum` or `Option` inside map values: flags are integers with named bits;
//! - addresses are stored as four `u32` words holding the bytes exactly as they are on the wire
//!   (IPv4 in word 0, the other words zero), so neither side converts byte order to compare them.
#![no_std]

pub mod hash;
pub mod limits;
pub mod maps;
pub mod reason;

pub use maps::*;
