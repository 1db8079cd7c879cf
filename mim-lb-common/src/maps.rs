//! Map names, keys and values. Field names are what operators see in `bpftool map dump`.

/// Names of the maps in the BPF object; they are also the file names under the pin directory.
pub mod names {
    pub const GLOBALS: &str = "GLOBALS";
    pub const SERVICES: &str = "SERVICES";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const SLOT_SEEN: &str = "SLOT_SEEN";
    pub const MAGLEV_OLD: &str = "MAGLEV_OLD";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const SYNC_STATS: &str = "SYNC_STATS";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const ACTIVE_SKETCH: &str = "ACTIVE_SKETCH";
    pub const SKETCH_GEN: &str = "SKETCH_GEN";
    /// Maps that hold no state a restart must keep (a channel and its counters, the fragment
    /// records, which live for `FRAGMENT_TIMEOUT_NS`, and the active-connection sketches,
    /// which speak for the last few seconds): a pinned set of any readable ABI may lack them,
    /// and they are then created beside the others.
    pub const STATELESS: [&str; 5] = [FLOW_EVENTS, SYNC_STATS, FRAGMENTS, ACTIVE_SKETCH, SKETCH_GEN];
    /// Every map the control plane owns and pins.
    pub const ALL: [&str; 15] = [
        GLOBALS,
        SERVICES,
        MAGLEV,
        BACKENDS,
        FLOWS,
        REASON_STATS,
        SERVICE_STATS,
        BACKEND_STATS,
        SLOT_SEEN,
        MAGLEV_OLD,
        FLOW_EVENTS,
        SYNC_STATS,
        FRAGMENTS,
        ACTIVE_SKETCH,
        SKETCH_GEN,
    ];
}

/// Address families as stored in keys (0 marks an empty slot).
pub const FAMILY_NONE: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `Globals::flags`: the control plane has filled the maps; until then every packet passes.
pub const GLOBALS_F_READY: u32 = 1;
/// `Globals::flags`: peers are configured: every change to the connection table made by the
/// data path is also sent to `FLOW_EVENTS`, for the daemon to pass on to the other directors.
pub const GLOBALS_F_SYNC: u32 = 2;

/// `Globals::abi_version`: the meaning of the pinned maps' contents. A daemon reuses maps
/// pinned by an earlier run only if they carry its own version (sizes are checked too), so an
/// upgrade that changes what a field means cannot misread the maps it inherits.
pub const ABI_VERSION: u32 = 2;

/// `Globals::attach_mode`.
pub const ATTACH_NONE: u32 = 0;
pub const ATTACH_NATIVE: u32 = 1;
pub const ATTACH_GENERIC: u32 = 2;

/// Program-wide settings, one entry at index 0 of `GLOBALS`.
///
/// The service index is double-buffered: `service_seeds[h]` is the hash seed of half `h` of
/// `SERVICES`, and `active_services` says which half the data path reads. The control plane
/// writes a complete new half and its seed first, then flips `active_services` in a second
/// write that changes no other word, so a reader never mixes the two halves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Globals {
    /// Source MAC written into forwarded frames: the gateway interface's own address.
    pub gateway_mac: [u8; 6],
    pub _pad0: [u8; 2],
    pub flags: u32,
    pub active_services: u32,
    pub service_seeds: [u32; 2],
    /// `ABI_VERSION` of the daemon that filled the maps.
    pub abi_version: u32,
    /// Interface index and `ATTACH_*` mode of the pinned attachment, so a restarted daemon
    /// knows whether it can replace the program in place.
    pub ifindex: u32,
    pub attach_mode: u32,
}

/// `ServiceEntry::flags`: the service hashes the client address only (`maglev-source`).
pub const SERVICE_F_SOURCE_HASH: u32 = 1;
/// `ServiceEntry::flags`: the entry only marks `vip` as a VIP for `proto` (its port is 0), so
/// that fragments, which may carry no port, are recognised as addressed to a VIP. When the VIP
/// has exactly one service for `proto` and that service hashes the client address only, the
/// marker is a copy of the service's entry (port 0, with `SERVICE_F_SOURCE_HASH`): a fragment
/// that arrives before its datagram's first fragment can then be sent by its source alone.
pub const SERVICE_F_VIP_MARKER: u32 = 2;
/// `ServiceEntry::flags`: the table's size or hash changed recently. Unrecorded TCP flows on a
/// marked slot whose entry names no previous master began under the old table, whose masters
/// are in the service's region of `MAGLEV_OLD` (`old_table_size` slots, hashed as
/// `SERVICE_F_OLD_SOURCE_HASH` says).
pub const SERVICE_F_RESIZED: u32 = 4;
/// `ServiceEntry::flags`: the table before the resize hashed the client address only.
pub const SERVICE_F_OLD_SOURCE_HASH: u32 = 8;

/// One slot of the service index (`SERVICES`, an array of `2 * SERVICE_SLOTS` entries). The
/// data path hashes (vip, port, proto, family) to a slot and compares the whole key, so an
/// empty or foreign slot never matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Wire-order address words (IPv4 in word 0).
    pub vip: [u32; 4],
    /// Wire order.
    pub port: u16,
    pub proto: u8,
    /// `FAMILY_*`; `FAMILY_NONE` marks an empty slot.
    pub family: u8,
    /// Index of the service's Maglev regions and counters (`< MAX_SERVICES`).
    pub service_id: u32,
    pub flags: u32,
    /// Number of slots of the service's Maglev table (a prime `<= MAGLEV_MAX_TABLE_SIZE`).
    pub table_size: u32,
    /// Which of the service's two Maglev regions is live (0 or 1). The control plane rebuilds
    /// the other one and then flips this word alone.
    pub active_table: u32,
    /// Slots of the service's table before its last resize (with `SERVICE_F_RESIZED`).
    pub old_table_size: u32,
}

/// Low bits of a Maglev entry: the slot's master, its backend id (0 = no backend). New flows
/// (TCP SYNs, unrecorded UDP) go to it.
pub const MAGLEV_BACKEND_MASK: u32 = 0x0000_0fff;
/// Bits 12..24 of a marked Maglev entry: the slot's master when the slot was last clean, which
/// is where every unrecorded TCP flow of the slot began (0: none known). SYNs on a clean slot
/// are not recorded, so this is how their flows stay put when the slot changes.
pub const MAGLEV_PREV_SHIFT: u32 = 12;
pub const MAGLEV_PREV_MASK: u32 = 0x00ff_f000;
/// High bit of a Maglev entry: the slot's master changed and flows that began before may be
/// alive. On a marked slot, TCP SYNs are recorded, recorded flows keep their master, and
/// unrecorded flows go to the previous master. On a clean slot every TCP packet goes to the
/// slot's master without touching the connection table.
pub const MAGLEV_SLOT_CHANGED: u32 = 0x8000_0000;

/// A Maglev entry: `owner`, with `prev` and the changed mark when `marked`.
#[inline(always)]
pub const fn maglev_entry(owner: u32, prev: u32, marked: bool) -> u32 {
    if marked {
        (owner & MAGLEV_BACKEND_MASK) | ((prev << MAGLEV_PREV_SHIFT) & MAGLEV_PREV_MASK) | MAGLEV_SLOT_CHANGED
    } else {
        owner & MAGLEV_BACKEND_MASK
    }
}

/// The previous master recorded in a marked Maglev entry (0 when none).
#[inline(always)]
pub const fn maglev_prev(entry: u32) -> u32 {
    (entry & MAGLEV_PREV_MASK) >> MAGLEV_PREV_SHIFT
}

/// `BackendEntry::flags`: the entry describes a backend.
pub const BACKEND_F_IN_USE: u32 = 1;
/// `BackendEntry::flags`: flows recorded on this backend stay on it (it is up or draining).
/// Without it (down, disabled), recorded flows are re-steered through the Maglev table.
pub const BACKEND_F_KEEPS_FLOWS: u32 = 2;

/// `BackendEntry::state`: what the control plane decided. The data path reads only `flags`;
/// the state is for operators (`bpftool map dump`) and for a restarted daemon, which carries
/// on from it instead of starting every master as down.
pub const BACKEND_STATE_UP: u32 = 1;
/// Health checks failed or its MAC is unknown: out of the table, its flows move.
pub const BACKEND_STATE_DOWN: u32 = 2;
/// Weight 0 or drained by the operator: no new flows, its flows stay.
pub const BACKEND_STATE_DRAINING: u32 = 3;
/// Disabled by the operator: out of the table, its flows move.
pub const BACKEND_STATE_DISABLED: u32 = 4;
/// Removed from the configuration: no new flows, its flows stay until they end.
pub const BACKEND_STATE_REMOVING: u32 = 5;

/// `BackendEntry::admin`: the operator's last command for this master.
pub const ADMIN_ENABLED: u32 = 0;
pub const ADMIN_DRAINED: u32 = 1;
pub const ADMIN_DISABLED: u32 = 2;

/// `BackendEntry::health`: the last health verdict.
pub const HEALTH_DOWN: u32 = 0;
pub const HEALTH_UP: u32 = 1;

/// One master (`BACKENDS`, indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEntry {
    /// Destination MAC written into frames sent to this master.
    pub mac: [u8; 6],
    pub family: u8,
    pub _pad0: u8,
    /// `BACKEND_F_*`: all the data path looks at besides `mac` and `service_id`.
    pub flags: u32,
    /// The service this master belongs to; a recorded flow is kept only by a master of the
    /// flow's own service, so a reused id can never pull a flow into another service.
    pub service_id: u32,
    /// `BACKEND_STATE_*`.
    pub state: u32,
    /// The master's address (wire order).
    pub addr: [u32; 4],
    /// Configured weight.
    pub weight: u32,
    /// `ADMIN_*`.
    pub admin: u32,
    /// `HEALTH_*`.
    pub health: u32,
}

/// Key of the connection table (`FLOWS`, an LRU hash map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Wire order.
    pub sport: u16,
    /// Wire order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad0: [u8; 2],
}

/// `FlowEntry::flags`: the record came from a peer director and no packet of the flow has
/// passed here since (the data path clears it when it refreshes `last_seen_ns`). Such a
/// record is not sent back to the peers with the periodic refresh.
pub const FLOW_F_IMPORTED: u32 = 1;

/// Value of the connection table: where a flow was sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub backend_id: u32,
    pub service_id: u32,
    /// The Maglev slot the flow hashed to when it was recorded (for operators; the sweep
    /// recomputes it from the live table, which may have been resized since).
    pub slot: u32,
    /// `FLOW_F_*`.
    pub flags: u32,
    /// `CLOCK_MONOTONIC` (read with `bpf_ktime_get_coarse_ns`: the kernel tick's resolution)
    /// when the flow was recorded or last seen on a changed slot.
    pub last_seen_ns: u64,
}

/// `FlowEvent::kind`: the data path recorded (or re-recorded) the flow.
pub const FLOW_EVENT_RECORDED: u32 = 1;
/// `FlowEvent::kind`: the data path deleted the flow's record (a new connection reused its
/// addresses and ports where no record is needed).
pub const FLOW_EVENT_FORGOTTEN: u32 = 2;

/// One change to the connection table, as the data path sends it to the daemon through the
/// `FLOW_EVENTS` ring buffer when `GLOBALS_F_SYNC` is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    /// The record written (`FLOW_EVENT_RECORDED`); zero for `FLOW_EVENT_FORGOTTEN`.
    pub flow: FlowEntry,
    /// `FLOW_EVENT_*`.
    pub kind: u32,
    pub _pad0: u32,
}

/// `SYNC_STATS` (per CPU) indices: events sent, and events lost because the ring was full
/// (the daemon's periodic refresh repairs those).
pub const SYNC_STAT_SENT: u32 = 0;
pub const SYNC_STAT_LOST: u32 = 1;
pub const SYNC_STAT_SLOTS: u32 = 2;

/// Key of the fragment table (`FRAGMENTS`, an LRU hash map): one fragmented datagram, named as
/// IP reassembly names it (RFC 791, RFC 8200).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The IP identification: 16 bits for IPv4, 32 for IPv6 (host order).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad0: [u8; 2],
}

/// Value of the fragment table: the master the datagram's first fragment was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentEntry {
    pub backend_id: u32,
    pub service_id: u32,
    /// `CLOCK_MONOTONIC` (coarse) when the first fragment passed; the record is followed for
    /// `limits::FRAGMENT_TIMEOUT_NS` after it.
    pub first_seen_ns: u64,
}

/// One backend's active-connection sketch for one generation (`ACTIVE_SKETCH`, at
/// `limits::sketch_index`): HyperLogLog registers of the TCP flows whose packets were sent to
/// it while the generation was live (`SKETCH_GEN`). The control plane moves to the next
/// generation every second, zeroing it first, and estimates from the union (each register's
/// maximum) of the complete ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveSketch {
    pub registers: [u8; crate::limits::SKETCH_REGISTERS],
}

impl Default for ActiveSketch {
    fn default() -> Self {
        ActiveSketch { registers: [0; crate::limits::SKETCH_REGISTERS] }
    }
}

/// A packet and byte counter (`REASON_STATS`, per CPU, indexed by reason code).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Traffic of one service or one backend (`SERVICE_STATS`, `BACKEND_STATS`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    /// New flows: TCP SYNs, and UDP datagrams of no recorded flow.
    pub new_flows: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made of integers only, with every padding byte an
    // explicit field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for Globals {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendEntry {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentEntry {}
    unsafe impl aya::Pod for ActiveSketch {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for TrafficStats {}
}

// Layout guards: a field added without its padding changes a size and fails the build.
const _: () = {
    assert!(core::mem::size_of::<Globals>() == 36);
    assert!(core::mem::size_of::<ServiceEntry>() == 40);
    assert!(core::mem::size_of::<BackendEntry>() == 48);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowEntry>() == 24);
    assert!(core::mem::size_of::<FlowEvent>() == 72);
    assert!(core::mem::size_of::<FragmentKey>() == 40);
    assert!(core::mem::size_of::<FragmentEntry>() == 16);
    assert!(core::mem::size_of::<ActiveSketch>() == 64);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<TrafficStats>() == 24);
    // Every backend id fits in a Maglev entry's owner and previous-owner fields.
    assert!(crate::limits::MAX_BACKENDS - 1 <= MAGLEV_BACKEND_MASK);
};
