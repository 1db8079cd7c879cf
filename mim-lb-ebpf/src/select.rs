//! Which service a packet belongs to and which master gets it: the service index, the
//! Maglev slot and the connection table.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use aya_log_ebpf::warn;
use mim_lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEPS_FLOWS, BackendEntry, FLOW_EVENT_FORGOTTEN, FLOW_EVENT_RECORDED,
    FlowEntry, FlowEvent, FlowKey, GLOBALS_F_SYNC, Globals, SYNC_STAT_LOST, SYNC_STAT_SENT,
    MAGLEV_BACKEND_MASK, MAGLEV_SLOT_CHANGED, PROTO_TCP, SERVICE_F_OLD_SOURCE_HASH,
    SERVICE_F_RESIZED, SERVICE_F_SOURCE_HASH, ServiceEntry, hash, limits, maglev_prev, reason,
};

use crate::{
    maps::{BACKENDS, FLOW_EVENTS, FLOWS, GLOBALS, MAGLEV, MAGLEV_OLD, SERVICES, SLOT_SEEN, SYNC_STATS},
    parse::Packet,
};

/// A flow whose record is consulted refreshes its `last_seen_ns` at most this often, so a
/// busy flow does not write its entry on every packet.
const LAST_SEEN_REFRESH_NS: u64 = 1_000_000_000;

/// `CLOCK_MONOTONIC` at the kernel tick's resolution (a few ms): what `last_seen_ns` needs,
/// for idle timeouts of seconds. The precise clock (`bpf_ktime_get_ns`) costs about 30 ns
/// more per read here (`cargo xtask bench`), on every packet that consults the table.
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
    /// The packet opens a flow: a TCP SYN, or a UDP datagram of no recorded flow.
    pub new_flow: bool,
    /// The flow's hash (of its addresses, ports and protocol, whatever the service hashes
    /// for its table): what tells flows apart in the active-connection sketch.
    pub flow_hash: u32,
}

/// Chooses the master for a packet of `service`.
///
/// The rule that keeps every established flow on its master while recording as little as
/// possible:
/// - a TCP SYN always goes to the slot's master (the table holds only masters that are up).
///   It is recorded only on a marked slot whose unrecorded flows go elsewhere; on a clean slot
///   the table itself remembers it, and any record there names the same master (the sweep
///   deletes those that do not), so it is not even looked up;
/// - other TCP packets on a clean slot go to the slot's master without a lookup: every flow
///   there began on it;
/// - on a marked slot, a recorded flow keeps its master while that master keeps flows (up or
///   draining); an unrecorded one began before the slot changed, so it goes to the slot's
///   previous master (or, after a resize, its master in the old table) if that one keeps flows;
/// - UDP has no SYN: every datagram consults the table, and a datagram of no live record is
///   a new flow, recorded on the slot's master.
#[inline(always)]
pub fn choose(ctx: &XdpContext, service: &ServiceEntry, packet: &Packet) -> Result<Choice, u32> {
    choose_in::<false>(ctx, service, packet)
}

/// [`choose`] without a trace: the master the packet's flow goes to now, with no record
/// created, replaced, refreshed or deleted and no slot marked as seen. For ICMP errors, which
/// must follow a flow and never change it.
#[inline(always)]
pub fn choose_quietly(ctx: &XdpContext, service: &ServiceEntry, packet: &Packet) -> Result<Choice, u32> {
    choose_in::<true>(ctx, service, packet)
}

/// Whether nothing may be written: `QUIET` (an ICMP error) or the simulation copy. A constant
/// false on the live path of ordinary packets, so it costs them nothing.
#[inline(always)]
fn quiet<const QUIET: bool>() -> bool {
    QUIET || crate::simulating()
}

#[inline(always)]
fn choose_in<const QUIET: bool>(ctx: &XdpContext, service: &ServiceEntry, packet: &Packet) -> Result<Choice, u32> {
    let source_only = service.flags & SERVICE_F_SOURCE_HASH != 0;
    let h = packet_hash(source_only, packet);
    let mut choice = choose_by::<QUIET>(ctx, service, packet, h)?;
    choice.flow_hash = if source_only { packet_hash(false, packet) } else { h };
    Ok(choice)
}

#[inline(always)]
fn choose_by<const QUIET: bool>(ctx: &XdpContext, service: &ServiceEntry, packet: &Packet, h: u32) -> Result<Choice, u32> {
    let table_size = service.table_size;
    if table_size == 0 {
        return Err(reason::NO_BACKEND);
    }
    // Regions are `MAGLEV_MAX_TABLE_SIZE` apart: a larger table would read the next
    // service's slots, and an id past `MAX_SERVICES` could wrap the index around onto
    // another's. The control plane writes neither; this keeps a bad entry harmless (an index
    // past the map's size, which `max_services` sets, is refused by the lookup itself).
    if table_size > limits::MAGLEV_MAX_TABLE_SIZE || service.service_id >= limits::MAX_SERVICES {
        return Err(reason::INTERNAL);
    }
    let slot = hash::table_slot(h, table_size);
    let index = limits::maglev_index(service.service_id, service.active_table & 1, slot);
    let entry = *MAGLEV.get(index).ok_or(reason::INTERNAL)?;
    let owner = entry & MAGLEV_BACKEND_MASK;
    let marked = entry & MAGLEV_SLOT_CHANGED != 0;

    if packet.proto == PROTO_TCP && !marked {
        // No lookup, SYN or not: every record a clean slot holds names its master (the sweep
        // keeps it so), so even one left by an earlier connection on these ports agrees with
        // where this packet goes.
        return to(owner, packet.tcp_syn);
    }
    let key = flow_key(packet);
    if packet.proto == PROTO_TCP && packet.tcp_syn {
        if owner == 0 {
            return Err(reason::NO_BACKEND);
        }
        // A flow needs a record only where unrecorded flows go elsewhere than the slot's
        // master: to a previous master, or to the table before a resize.
        let prev = maglev_prev(entry);
        if prev == owner || (prev == 0 && service.flags & SERVICE_F_RESIZED == 0) {
            forget::<QUIET>(&key);
        } else {
            record::<QUIET>(ctx, &key, service, owner, slot);
        }
        return to(owner, true);
    }
    let new_flow = match recorded::<QUIET>(service, &key) {
        Recorded::Kept(choice) => return Ok(choice),
        Recorded::None if packet.proto == PROTO_TCP => return unrecorded_tcp::<QUIET>(service, packet, entry, slot),
        // A UDP datagram of no flow starts one on the slot's master.
        Recorded::None => true,
        // Its master is gone: the flow moves to the slot's master, and stays there.
        Recorded::Gone => false,
    };
    // Only a slot with a master records anything.
    if owner == 0 {
        return Err(reason::NO_BACKEND);
    }
    record::<QUIET>(ctx, &key, service, owner, slot);
    to(owner, new_flow)
}

/// What the connection table says of a flow.
enum Recorded {
    None,
    /// Recorded on a master that keeps it.
    Kept(Choice),
    /// Recorded on a master that no longer keeps flows (down, disabled, gone).
    Gone,
}

#[inline(always)]
fn packet_hash(source_only: bool, packet: &Packet) -> u32 {
    if source_only {
        hash::source_hash(packet.family, &packet.src)
    } else {
        hash::flow_hash(packet.family, &packet.src, &packet.dst, packet.sport, packet.dport, packet.proto)
    }
}

#[inline(always)]
fn flow_key(packet: &Packet) -> FlowKey {
    FlowKey {
        src: packet.src,
        dst: packet.dst,
        sport: packet.sport,
        dport: packet.dport,
        proto: packet.proto,
        family: packet.family,
        _pad0: [0; 2],
    }
}

#[inline(always)]
fn to(id: u32, new_flow: bool) -> Result<Choice, u32> {
    Ok(Choice { backend_id: id, backend: backend(id)?, new_flow, flow_hash: 0 })
}

/// The backend `id` if it keeps the flows of `service` (up or draining, of this service).
#[inline(always)]
fn keeper(service: &ServiceEntry, id: u32) -> Option<&'static BackendEntry> {
    keeper_of(service.service_id, id)
}

/// The backend `id` if it keeps the flows of service `service_id`.
#[inline(always)]
pub fn keeper_of(service_id: u32, id: u32) -> Option<&'static BackendEntry> {
    let b = BACKENDS.get(id)?;
    let keeps = BACKEND_F_IN_USE | BACKEND_F_KEEPS_FLOWS;
    (b.flags & keeps == keeps && b.service_id == service_id).then_some(b)
}

/// For a service that hashes the client address only: the master of the packet's slot if
/// the slot is clean, where every flow of the slot is (and every new one goes). On a marked
/// slot a flow may be recorded elsewhere, which a packet without ports cannot look up.
#[inline(always)]
pub fn clean_slot_owner(service: &ServiceEntry, packet: &Packet) -> Option<u32> {
    if service.table_size == 0
        || service.table_size > limits::MAGLEV_MAX_TABLE_SIZE
        || service.service_id >= limits::MAX_SERVICES
    {
        return None;
    }
    let slot = hash::table_slot(packet_hash(true, packet), service.table_size);
    let entry = *MAGLEV.get(limits::maglev_index(service.service_id, service.active_table & 1, slot))?;
    let owner = entry & MAGLEV_BACKEND_MASK;
    (entry & MAGLEV_SLOT_CHANGED == 0 && owner != 0).then_some(owner)
}

/// The recorded master of a flow. Refreshes the record's `last_seen_ns` (at most once a
/// second) when it is kept, which the sweep reads to tell live flows.
#[inline(always)]
fn recorded<const QUIET: bool>(service: &ServiceEntry, key: &FlowKey) -> Recorded {
    let Some(flow) = FLOWS.get_ptr_mut(key) else { return Recorded::None };
    // SAFETY: `flow` points into the map's value, valid for this program run.
    let id = unsafe { (*flow).backend_id };
    let Some(b) = keeper(service, id) else { return Recorded::Gone };
    if !quiet::<QUIET>() {
        let now = now_ns();
        // SAFETY: `flow` points into the map's value, valid for this program run.
        unsafe {
            if now.wrapping_sub((*flow).last_seen_ns) > LAST_SEEN_REFRESH_NS {
                (*flow).last_seen_ns = now;
                // A packet passed here: the record is this director's to refresh to peers.
                (*flow).flags = 0;
            }
        }
    }
    Recorded::Kept(Choice { backend_id: id, backend: b, new_flow: false, flow_hash: 0 })
}

/// An established TCP flow on a marked slot with no record: it began before the slot
/// changed, on the slot's previous master (or its master in the table before a resize).
#[inline(always)]
fn unrecorded_tcp<const QUIET: bool>(
    service: &ServiceEntry,
    packet: &Packet,
    entry: u32,
    slot: u32,
) -> Result<Choice, u32> {
    let owner = entry & MAGLEV_BACKEND_MASK;
    let mut began_on = maglev_prev(entry);
    if began_on == 0
        && service.flags & SERVICE_F_RESIZED != 0
        && service.old_table_size != 0
        && service.old_table_size <= limits::MAGLEV_MAX_TABLE_SIZE
    {
        let old_slot =
            hash::table_slot(packet_hash(service.flags & SERVICE_F_OLD_SOURCE_HASH != 0, packet), service.old_table_size);
        began_on = MAGLEV_OLD.get(limits::slot_index(service.service_id, old_slot)).copied().unwrap_or(0);
    }
    if began_on != 0
        && began_on != owner
        && let Some(b) = keeper(service, began_on)
    {
        if !quiet::<QUIET>() {
            touch_seen(service.service_id, slot);
        }
        return Ok(Choice { backend_id: began_on, backend: b, new_flow: false, flow_hash: 0 });
    }
    // Its first master is gone (or was the slot's master all along): the slot's master.
    to(owner, false)
}

/// Tells the sweep that the slot's previous master still carries a live flow.
#[inline(always)]
fn touch_seen(service_id: u32, slot: u32) {
    let now = (now_ns() >> limits::SEEN_SHIFT) as u32;
    if let Some(seen) = SLOT_SEEN.get_ptr_mut(limits::slot_index(service_id, slot)) {
        // SAFETY: a u32 inside an array map value, valid for this program run. Written only
        // when it changes (once a second), so busy slots do not bounce a cache line.
        unsafe {
            if *seen != now {
                *seen = now;
            }
        }
    }
}

/// Records a flow on `owner`, replacing any record of an earlier flow with the same key.
#[inline(always)]
fn record<const QUIET: bool>(ctx: &XdpContext, key: &FlowKey, service: &ServiceEntry, owner: u32, slot: u32) {
    if quiet::<QUIET>() {
        return;
    }
    let flow = FlowEntry { backend_id: owner, service_id: service.service_id, slot, flags: 0, last_seen_ns: now_ns() };
    // An LRU map makes room by evicting, so this fails only when the kernel is out of memory;
    // the packet still goes to the slot's master.
    if let Err(err) = FLOWS.insert(key, &flow, 0) {
        warn!(ctx, "connection table insert failed: {}", err);
        return;
    }
    tell_peers(key, &flow, FLOW_EVENT_RECORDED);
}

/// Sends a change of the connection table to the daemon, which passes it on to the other
/// directors; only while peers are configured. A full ring loses the event (counted): the
/// daemon's periodic refresh of live records repairs it.
#[inline(always)]
fn tell_peers(key: &FlowKey, flow: &FlowEntry, kind: u32) {
    let syncing = GLOBALS.get(0).is_some_and(|g| g.flags & GLOBALS_F_SYNC != 0);
    if !syncing {
        return;
    }
    let event = FlowEvent { key: *key, flow: *flow, kind, _pad0: 0 };
    let stat = if FLOW_EVENTS.output(event, 0).is_ok() { SYNC_STAT_SENT } else { SYNC_STAT_LOST };
    if let Some(count) = SYNC_STATS.get_ptr_mut(stat) {
        // SAFETY: a u64 of this CPU's copy of a per-CPU array, valid for this program run.
        unsafe { *count += 1 };
    }
}

/// Deletes the record of an earlier connection that used the same addresses and ports, so
/// that it cannot claim this one: on a marked slot, where records are looked up. A lookup
/// first: the common case is no record, and a lookup takes no lock.
#[inline(always)]
fn forget<const QUIET: bool>(key: &FlowKey) {
    if quiet::<QUIET>() {
        return;
    }
    if FLOWS.get_ptr(key).is_some() && FLOWS.remove(key).is_ok() {
        tell_peers(key, &FlowEntry::default(), FLOW_EVENT_FORGOTTEN);
    }
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
