//! The XDP objects built by build.rs and embedded in the binary.

/// The mim-lb XDP program (also holds `mim_lb_pass`, the no-op program for veth peers).
pub static MIM_LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mim-lb"));

/// The benchmark floor (swap MACs, XDP_TX).
pub static BENCH_FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-floor"));
