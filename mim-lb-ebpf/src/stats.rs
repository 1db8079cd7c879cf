//! Per-CPU counters. Each CPU writes only its own copy, so plain additions are exact without
//! atomics; the control plane sums the copies when it reads.

use crate::maps::{BACKEND_STATS, REASON_STATS, SERVICE_STATS};

/// Counts one packet of `bytes` under a reason code.
#[inline(always)]
pub fn count_reason(code: u32, bytes: u64) {
    if let Some(c) = REASON_STATS.get_ptr_mut(code) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a forwarded packet against its service and its backend.
#[inline(always)]
pub fn count_forward(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    let new = new_flow as u64;
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_flows += new;
        }
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*b).packets += 1;
            (*b).bytes += bytes;
            (*b).new_flows += new;
        }
    }
}
