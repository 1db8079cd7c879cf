//! Every map of the data path, and nothing else. All are BTF maps, so `bpftool map dump`
//! prints their keys and values with field names. The control plane pins them by these names.

use aya_ebpf::{
    btf_maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use mim_lb_common::{
    ActiveSketch, BackendEntry, Counter, FlowEntry, FlowEvent, FlowKey, FragmentEntry, FragmentKey, Globals,
    SYNC_STAT_SLOTS, ServiceEntry, TrafficStats,
    limits::{
        DEFAULT_FLOW_TABLE_SIZE, FLOW_EVENTS_BYTES, FRAGMENT_TABLE_SIZE, MAGLEV_MAP_ENTRIES, MAX_BACKENDS,
        MAX_SERVICES, REASON_SLOTS, SERVICE_SLOTS, SKETCH_GENERATIONS, SLOT_MAP_ENTRIES,
    },
};

const TWO_SERVICE_HALVES: usize = 2 * SERVICE_SLOTS as usize;

#[btf_map]
pub static GLOBALS: Array<Globals, 1> = Array::new();

/// The service index: two halves of `SERVICE_SLOTS` (see `Globals`).
#[btf_map]
pub static SERVICES: Array<ServiceEntry, TWO_SERVICE_HALVES> = Array::new();

/// Maglev tables, built in userspace: entry = master | previous master | changed mark
/// (`mim_lb_common::maglev_entry`).
#[btf_map]
pub static MAGLEV: Array<u32, { MAGLEV_MAP_ENTRIES as usize }> = Array::new();

/// Per (service, live slot): when an unrecorded TCP flow last went to the slot's previous
/// master (`CLOCK_MONOTONIC >> SEEN_SHIFT`). The sweep keeps a slot's mark while it is recent.
#[btf_map]
pub static SLOT_SEEN: Array<u32, { SLOT_MAP_ENTRIES as usize }> = Array::new();

/// Per (service, slot of the table before its last resize): the master unrecorded flows of
/// that slot began on. Read only for services marked `SERVICE_F_RESIZED`.
#[btf_map]
pub static MAGLEV_OLD: Array<u32, { SLOT_MAP_ENTRIES as usize }> = Array::new();

#[btf_map]
pub static BACKENDS: Array<BackendEntry, { MAX_BACKENDS as usize }> = Array::new();

/// The connection table. Its size is set by the control plane at load time.
#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowEntry, { DEFAULT_FLOW_TABLE_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static REASON_STATS: PerCpuArray<Counter, { REASON_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static SERVICE_STATS: PerCpuArray<TrafficStats, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// Changes to `FLOWS` made by the data path, for the daemon to share with the other
/// directors (only while `GLOBALS_F_SYNC` is set).
#[btf_map]
pub static FLOW_EVENTS: RingBuf<FlowEvent, { FLOW_EVENTS_BYTES as usize }> = RingBuf::new();

/// Events sent to and lost from `FLOW_EVENTS` (`SYNC_STAT_*`).
#[btf_map]
pub static SYNC_STATS: PerCpuArray<u64, { SYNC_STAT_SLOTS as usize }> = PerCpuArray::new();

/// Where the first fragment of each recent fragmented datagram went (`fragment.rs`).
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry, { FRAGMENT_TABLE_SIZE as usize }> =
    LruHashMap::new();

/// Per generation and backend: HyperLogLog registers of the TCP flows sent to the backend
/// while the generation was live (`stats::note_flow`). Shared by the CPUs, unlike the
/// counters: a register is written only when it grows (a few hundred times per backend and
/// generation), so its cache line stays shared, and per-CPU copies would cost seven generations
/// of 4096 backends on every CPU. Two CPUs growing one register at once may leave the smaller
/// rank: an estimate a little low, never a master with connections seen as idle.
#[btf_map]
pub static ACTIVE_SKETCH: Array<ActiveSketch, { (MAX_BACKENDS * SKETCH_GENERATIONS) as usize }> = Array::new();

/// The live generation of `ACTIVE_SKETCH` (below `SKETCH_GENERATIONS`), moved on by the
/// control plane.
#[btf_map]
pub static SKETCH_GEN: Array<u32, 1> = Array::new();
