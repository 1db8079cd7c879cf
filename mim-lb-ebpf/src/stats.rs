//! Per-CPU counters. Each CPU writes only its own copy, so plain additions are exact without
//! atomics; the control plane sums the copies when it reads.

use mim_lb_common::{hash, limits};

use crate::maps::{ACTIVE_SKETCH, BACKEND_STATS, REASON_STATS, SERVICE_STATS, SKETCH_GEN};

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

/// Notes a packet of the TCP flow with flow hash `flow_hash` sent to `backend_id` in the
/// backend's active-connection sketch: what `mim-lb status` counts as its active
/// connections. A register is written only when it grows, so a busy flow writes nothing.
#[inline(always)]
pub fn note_flow(backend_id: u32, flow_hash: u32) {
    let generation = SKETCH_GEN.get(0).copied().unwrap_or(0);
    if generation >= limits::SKETCH_GENERATIONS {
        return;
    }
    let Some(sketch) = ACTIVE_SKETCH.get_ptr_mut(limits::sketch_index(generation, backend_id)) else { return };
    let (index, rank) = hash::sketch_register(flow_hash);
    // SAFETY: an array map value, valid for this program run; `index` is below
    // `SKETCH_REGISTERS` (the low `SKETCH_INDEX_BITS` bits of the flow hash, masked again for the
    // verifier).
    unsafe {
        let register = (*sketch).registers.as_mut_ptr().add(index as usize & (limits::SKETCH_REGISTERS - 1));
        if *register < rank {
            *register = rank;
        }
    }
}
