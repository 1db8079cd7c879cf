//! IP fragments of a service's datagrams. Only the first fragment carries the ports, so it is
//! placed like the whole datagram would be, and its master is remembered under the datagram's
//! reassembly key (addresses, protocol, IP id); the later fragments follow that record. A
//! fragment that cannot be placed for certain is dropped, never guessed: parts of one datagram
//! on two masters are lost on both.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use mim_lb_common::{
    FragmentEntry, FragmentKey, Globals, PROTO_TCP, SERVICE_F_SOURCE_HASH, SERVICE_F_VIP_MARKER, ServiceEntry,
    limits, reason,
};
use network_types::eth::EthHdr;

use crate::{
    addressed_to_gateway,
    maps::FRAGMENTS,
    parse::Packet,
    rewrite_macs, select, simulating, stats,
};

#[inline(always)]
fn key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.frag_id,
        proto: packet.proto,
        family: packet.family,
        _pad0: [0; 2],
    }
}

/// Remembers where the first fragment of a datagram of `service` went.
#[inline(always)]
pub fn remember(packet: &Packet, service: &ServiceEntry, backend_id: u32) {
    if simulating() {
        return;
    }
    let entry = FragmentEntry {
        backend_id,
        service_id: service.service_id,
        first_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    // An LRU map makes room by evicting; a failed insert (out of memory) leaves the later
    // fragments unplaced, and they are dropped and counted.
    let _ = FRAGMENTS.insert(&key(packet), &entry, 0);
}

/// A later fragment (or a first one too short for its ports): to the master of its
/// datagram's first fragment, or by its source alone where the VIP allows it. The outcome is
/// a reason code, never `Ok`.
#[inline(always)]
pub fn later(globals: &Globals, packet: &Packet, eth: *mut EthHdr, bytes: u64) -> Result<(), u32> {
    let marker = vip_marker(globals, packet).ok_or(reason::NOT_A_SERVICE)?;
    addressed_to_gateway(eth, globals)?;
    let (backend_id, service_id, code) = match followed(packet) {
        Some((backend_id, service_id)) => (backend_id, service_id, reason::FRAGMENT_FOLLOWED),
        // TCP only: a UDP flow stays on its recorded master after its slot's mark is cleared
        // (marks are kept for TCP flows alone), so for UDP a clean slot does not name it.
        None if marker.flags & SERVICE_F_SOURCE_HASH != 0 && packet.proto == PROTO_TCP => {
            let backend_id = select::clean_slot_owner(marker, packet).ok_or(reason::FRAGMENT)?;
            (backend_id, marker.service_id, reason::FRAGMENT_BY_SOURCE)
        }
        None => return Err(reason::FRAGMENT),
    };
    // Only to a master that still keeps its flows: the first fragment's master went down in
    // between, and the rest of its datagram is lost with it.
    let backend = select::keeper_of(service_id, backend_id).ok_or(reason::FRAGMENT)?;
    // SAFETY: `eth` points at a whole Ethernet header inside the frame (ptr_at checked it).
    unsafe { rewrite_macs(eth, backend, globals) };
    if !simulating() {
        stats::count_forward(service_id, backend_id, bytes, false);
    }
    Err(code)
}

/// A first fragment to a port of a VIP where no service listens: dropped if the VIP has a
/// service for the protocol (its later fragments could otherwise reach a master by source
/// while this part goes to the gateway's kernel), the kernel's otherwise.
#[inline(always)]
pub fn unserved_first(globals: &Globals, packet: &Packet, eth: *mut EthHdr) -> Result<(), u32> {
    vip_marker(globals, packet).ok_or(reason::NOT_A_SERVICE)?;
    addressed_to_gateway(eth, globals)?;
    Err(reason::FRAGMENT)
}

/// The VIP marker of the packet's destination and protocol, if the VIP has a service for it.
/// Fragments are matched on the VIP alone: after the first, they carry no ports.
#[inline(always)]
fn vip_marker(globals: &Globals, packet: &Packet) -> Option<&'static ServiceEntry> {
    select::service(globals, packet, 0).filter(|m| m.flags & SERVICE_F_VIP_MARKER != 0)
}

/// The master and service of the datagram's first fragment, if it passed within the timeout.
#[inline(always)]
fn followed(packet: &Packet) -> Option<(u32, u32)> {
    // SAFETY: a value of the map, copied out at once.
    let entry = unsafe { *FRAGMENTS.get(&key(packet))? };
    let age = unsafe { bpf_ktime_get_coarse_ns() }.wrapping_sub(entry.first_seen_ns);
    (age <= limits::FRAGMENT_TIMEOUT_NS).then_some((entry.backend_id, entry.service_id))
}
