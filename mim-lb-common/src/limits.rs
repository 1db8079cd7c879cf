//! Sizes of the data-path tables. The BPF program is compiled with these; the control plane
//! validates configurations against them.

/// Largest Maglev table a service may use (a prime). Each service owns two regions of this
/// size in the Maglev map (one live, one being rebuilt), whatever its own table size is.
pub const MAGLEV_MAX_TABLE_SIZE: u32 = 65_537;

/// The default Maglev table size: a prime much larger than any backend count, which keeps
/// the share of each backend within a fraction of a percent of its weight.
pub const MAGLEV_DEFAULT_TABLE_SIZE: u32 = 65_537;

/// How many services (VIP, port, protocol) one director can serve: the ceiling of the
/// `max_services` setting. The Maglev maps are sized at start for `max_services` services
/// (`maglev_map_entries`), not for this many.
pub const MAX_SERVICES: u32 = 64;

/// Slots in one half of the service index. A power of two much larger than `MAX_SERVICES`, so
/// the control plane quickly finds a seed that places every service in a slot of its own.
pub const SERVICE_SLOTS: u32 = 1024;

/// Backend ids are `1..MAX_BACKENDS`; id 0 means "no backend" everywhere.
pub const MAX_BACKENDS: u32 = 4096;

/// Default capacity of the connection table (an LRU map; overridable at load time).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;

/// Entries of the Maglev map for room for `services` services: two regions of
/// `MAGLEV_MAX_TABLE_SIZE` slots each. Every region has the largest table's size whatever the
/// service's own is, so a reload may change a table's size without moving any other service.
#[inline(always)]
pub const fn maglev_map_entries(services: u32) -> u32 {
    services * 2 * MAGLEV_MAX_TABLE_SIZE
}

/// Entries the BPF object declares for the Maglev map (room for `MAX_SERVICES`). The control
/// plane always loads it with the size `max_services` asks for instead.
pub const MAGLEV_MAP_ENTRIES: u32 = maglev_map_entries(MAX_SERVICES);

/// Entries in the per-reason counter map. Reason codes are below this.
pub const REASON_SLOTS: u32 = 32;

/// Index of the Maglev slot `slot` of `service_id` in its `half` (0 or 1) of the Maglev map.
#[inline(always)]
pub const fn maglev_index(service_id: u32, half: u32, slot: u32) -> u32 {
    (service_id * 2 + half) * MAGLEV_MAX_TABLE_SIZE + slot
}

/// Entries of the per-slot maps that follow the live table rather than a region (`SLOT_SEEN`,
/// `MAGLEV_OLD`) for room for `services` services: one table's worth per service.
#[inline(always)]
pub const fn slot_map_entries(services: u32) -> u32 {
    services * MAGLEV_MAX_TABLE_SIZE
}

/// Entries the BPF object declares for the per-slot maps (room for `MAX_SERVICES`); loaded
/// with the size `max_services` asks for, like the Maglev map.
pub const SLOT_MAP_ENTRIES: u32 = slot_map_entries(MAX_SERVICES);

/// Index of slot `slot` of `service_id` in `SLOT_SEEN` and `MAGLEV_OLD`.
#[inline(always)]
pub const fn slot_index(service_id: u32, slot: u32) -> u32 {
    service_id * MAGLEV_MAX_TABLE_SIZE + slot
}

/// `SLOT_SEEN` holds `CLOCK_MONOTONIC >> SEEN_SHIFT`: units of 2^30 ns (about 1.07 s), so
/// a u32 lasts over a century and a slot is written at most once per unit.
pub const SEEN_SHIFT: u32 = 30;

/// Bytes of the `FLOW_EVENTS` ring buffer (a power of two): about 52,000 events (72 bytes and an
/// 8-byte header each), a quarter of a second of new flows at 200,000 per second before the
/// daemon reads them.
pub const FLOW_EVENTS_BYTES: u32 = 1 << 22;

/// Entries of the fragment table (an LRU map): datagrams whose first fragment passed within
/// `FRAGMENT_TIMEOUT_NS`. At 16,384, a gateway keeps every record for the timeout up to about
/// 8,000 fragmented datagrams per second; past that the oldest are evicted first.
pub const FRAGMENT_TABLE_SIZE: u32 = 16_384;

/// How long after a datagram's first fragment its other fragments follow it. Fragments of one
/// datagram leave the client back to back; a bound this short keeps a reused IP id (the
/// client's counter wraps) from sending a new datagram's fragments after an old one's.
pub const FRAGMENT_TIMEOUT_NS: u64 = 2_000_000_000;

/// Registers of a backend's active-connection sketch (HyperLogLog): `2^SKETCH_INDEX_BITS`. 64
/// one-byte registers count the connections a master held in a window within about 13% (one
/// standard error; exact at zero, and within a few connections below about 100; up to about
/// 100,000, where ranks of `hash::SKETCH_RANK_BITS` bits saturate), in 64 bytes per backend
/// and generation.
pub const SKETCH_INDEX_BITS: u32 = 6;
pub const SKETCH_REGISTERS: usize = 1 << SKETCH_INDEX_BITS;

/// Generations of the active-connection sketch: the live one and the six before it. The
/// control plane moves to the next every second, so the six complete ones cover the last six
/// seconds, a count every second: at least the 5 s active window, even when a flip comes a
/// little late or takes a few milliseconds itself.
pub const SKETCH_GENERATIONS: u32 = 7;

/// Index of backend `backend_id`'s sketch of generation `generation` in `ACTIVE_SKETCH`:
/// generation-major, so one generation of every backend is one range.
#[inline(always)]
pub const fn sketch_index(generation: u32, backend_id: u32) -> u32 {
    generation * MAX_BACKENDS + backend_id
}
