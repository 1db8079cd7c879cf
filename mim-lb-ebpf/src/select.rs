//! Which service a packet belongs to and which master gets it: the service index, the
//! Maglev slot and the connection table.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use aya_log_ebpf::warn;
use mim_lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEPS_FLOWS, BackendEntry, FlowEntry, FlowKey, Globals,
    MAGLEV_BACKEND_MASK, MAGLEV_SLOT_CHANGED, PROTO_TCP, SERVICE_F_SOURCE_HASH, ServiceEntry,
    hash, limits, reason,
};

use crate::{
    maps::{BACKENDS, FLOWS, MAGLEV, SERVICES},
    parse::Packet,
};

/// A flow seen on a changed slot refreshes its `last_seen_ns` at most this often, so a busy
/// flow does not write its entry on every packet.
const LAST_SEEN_REFRESH_NS: u64 = 1_000_000_000;

/// `CLOCK_MONOTONIC` at the kernel tick's resolution (a few ms): what `last_seen_ns` needs,
/// for idle timeouts of seconds. The precise clock (`bpf_ktime_get_ns`) costs about 30 ns
/// more per read here (`cargo xtask bench`), on every packet of a changed slot.
#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The service entry for (dst, port, proto) in the live half of the index, if any.
#[inline(always)]
pub fn service(globals: &Globals, packet: &Packet, port: u16) -> Option<&'static ServiceEntry> {
    let half = globals.active_services & 1;
    let seed = if half == 0 { globals.service_seeds[0] } else { globals.service_seeds[1] };
    let slot = hash::service_slot(seed, &packet.dst, port, packet.proto, packet.family);
    let entry = SERVICES.get(half * limits::SERVICE_SLOTS + slot)?;
    if entry.family == packet.family
        && entry.proto == packet.proto
        && entry.port == port
        && entry.vip == packet.dst
    {
        Some(entry)
    } else {
        None
    }
}

/// Where a packet goes.
pub struct Choice {
    pub backend_id: u32,
    pub backend: &'static BackendEntry,
    /// The flow was recorded by this packet.
    pub new_flow: bool,
}

/// Chooses the master for a packet of `service`.
///
/// A recorded flow keeps its master while that master keeps flows (up or draining). The
/// connection table is consulted for new flows (TCP SYN), for UDP (which has no SYN), and for
/// any packet whose Maglev slot is marked changed; a TCP packet of an established flow on an
/// unchanged slot goes straight to the slot's master, which is the one it was recorded with.
#[inline(always)]
pub fn choose(ctx: &XdpContext, service: &ServiceEntry, packet: &Packet) -> Result<Choice, u32> {
    let flow_hash = if service.flags & SERVICE_F_SOURCE_HASH != 0 {
        hash::source_hash(packet.family, &packet.src)
    } else {
        hash::flow_hash(packet.family, &packet.src, &packet.dst, packet.sport, packet.dport, packet.proto)
    };
    let table_size = service.table_size;
    if table_size == 0 {
        return Err(reason::NO_BACKEND);
    }
    let slot = hash::table_slot(flow_hash, table_size);
    let index = limits::maglev_index(service.service_id, service.active_table & 1, slot);
    let entry = *MAGLEV.get(index).ok_or(reason::INTERNAL)?;
    let slot_backend = entry & MAGLEV_BACKEND_MASK;

    if packet.proto == PROTO_TCP && !packet.tcp_syn && entry & MAGLEV_SLOT_CHANGED == 0 {
        return Ok(Choice { backend_id: slot_backend, backend: backend(slot_backend)?, new_flow: false });
    }

    let key = FlowKey {
        src: packet.src,
        dst: packet.dst,
        sport: packet.sport,
        dport: packet.dport,
        proto: packet.proto,
        family: packet.family,
        _pad0: [0; 2],
    };
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        let recorded = unsafe { (*flow).backend_id };
        if let Some(b) = BACKENDS.get(recorded) {
            let keeps = BACKEND_F_IN_USE | BACKEND_F_KEEPS_FLOWS;
            if b.flags & keeps == keeps && b.service_id == service.service_id {
                if entry & MAGLEV_SLOT_CHANGED != 0 && !crate::simulating() {
                    let now = now_ns();
                    unsafe {
                        if now.wrapping_sub((*flow).last_seen_ns) > LAST_SEEN_REFRESH_NS {
                            (*flow).last_seen_ns = now;
                        }
                    }
                }
                return Ok(Choice { backend_id: recorded, backend: b, new_flow: false });
            }
        }
        // Its master is gone: the flow is re-steered below and recorded again.
    }

    let chosen = backend(slot_backend)?;
    let flow = FlowEntry {
        backend_id: slot_backend,
        service_id: service.service_id,
        slot,
        _pad0: 0,
        last_seen_ns: now_ns(),
    };
    // An LRU map makes room by evicting, so this fails only when the kernel is out of memory;
    // the packet still goes to the slot's master, only the flow is not pinned to it.
    if crate::simulating() {
        return Ok(Choice { backend_id: slot_backend, backend: chosen, new_flow: true });
    }
    if let Err(err) = FLOWS.insert(&key, &flow, 0) {
        warn!(ctx, "connection table insert failed: {}", err);
    }
    Ok(Choice { backend_id: slot_backend, backend: chosen, new_flow: true })
}

#[inline(always)]
fn backend(id: u32) -> Result<&'static BackendEntry, u32> {
    if id == 0 {
        return Err(reason::NO_BACKEND);
    }
    match BACKENDS.get(id) {
        Some(b) if b.flags & BACKEND_F_IN_USE != 0 => Ok(b),
        _ => Err(reason::BACKEND_MISSING),
    }
}
