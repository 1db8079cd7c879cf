//! Typed readers and writers for each map. The only place that names map types.
//!
//! Whole-table reads (the connection table, a Maglev region, the backend and service tables)
//! and Maglev writes go through [`super::batch`], many elements per syscall. Where the kernel
//! has no batch command for a map (before Linux 5.6) they fall back to one syscall per
//! element; the `*_per_element` methods are those fallbacks, public so that tests and the
//! benchmark can compare the two paths.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use mim_lb_common::{
    ActiveSketch, BackendEntry, Counter, FlowEntry, FlowKey, Globals, ServiceEntry, TrafficStats, limits,
    maps::names,
};

use super::{
    DataplaneError,
    batch::{self, BatchError},
};

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// `batched`, or what `per_element` gives when the kernel has no batch command for the map
/// (nothing was read or written then).
fn or_per_element<T>(
    name: &'static str,
    batched: Result<T, BatchError>,
    per_element: impl FnOnce() -> Result<T, DataplaneError>,
) -> Result<T, DataplaneError> {
    match batched {
        Err(e) if e.is_unsupported() => {
            warn_per_element(name, &e);
            per_element()
        }
        r => r.map_err(|source| DataplaneError::Batch { name, source }),
    }
}

/// Says once per process that maps are read and written the slow way, since that makes the
/// sweep and every table change take much longer.
fn warn_per_element(name: &str, e: &BatchError) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!("map {name}: {e}; falling back to one syscall per map element");
    }
}

/// Every recorded flow in the connection table pinned at `path`, read with a map fd of its
/// own (so that it can run on a thread of its own while the event loop goes on), batched.
///
/// The error is aya's, as `director::read_pinned_flows` has always returned; a batch failure
/// travels inside it (see [`BatchError`]'s conversion).
pub fn read_flows_from_pin(path: &Path) -> Result<Vec<(FlowKey, FlowEntry)>, MapError> {
    let map = Map::from_map_data(MapData::from_pin(path)?)?;
    let flows: HashMap<&MapData, FlowKey, FlowEntry> = HashMap::try_from(&map)?;
    match batch::lookup_hash(flows.map(), batch::HASH_BATCH) {
        Err(e) if e.is_unsupported() => {
            warn_per_element(names::FLOWS, &e);
            Ok(flows_per_element(&flows))
        }
        r => r.map_err(MapError::from),
    }
}

/// The connection table one flow at a time: `BPF_MAP_GET_NEXT_KEY` then a lookup, two
/// syscalls per flow. Entries that vanish between the two are skipped.
fn flows_per_element(flows: &HashMap<&MapData, FlowKey, FlowEntry>) -> Vec<(FlowKey, FlowEntry)> {
    flows.iter().filter_map(Result::ok).collect()
}

/// Read access to the maps.
pub struct MapsRo<'a> {
    ebpf: &'a Ebpf,
}

/// Read and write access to the maps.
pub struct Maps<'a> {
    ebpf: &'a mut Ebpf,
}

impl<'a> MapsRo<'a> {
    pub(super) fn new(ebpf: &'a Ebpf) -> Self {
        MapsRo { ebpf }
    }

    fn array<V: aya::Pod>(&self, name: &'static str) -> Result<Array<&'a MapData, V>, DataplaneError> {
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        Array::try_from(map).map_err(map_err(name))
    }

    fn per_cpu<V: aya::Pod>(&self, name: &'static str) -> Result<PerCpuArray<&'a MapData, V>, DataplaneError> {
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        PerCpuArray::try_from(map).map_err(map_err(name))
    }

    fn flows_map(&self) -> Result<HashMap<&'a MapData, FlowKey, FlowEntry>, DataplaneError> {
        let map = self.ebpf.map(names::FLOWS).ok_or(DataplaneError::MissingMap(names::FLOWS))?;
        HashMap::try_from(map).map_err(map_err(names::FLOWS))
    }

    pub fn globals(&self) -> Result<Globals, DataplaneError> {
        self.array::<Globals>(names::GLOBALS)?.get(&0, 0).map_err(map_err(names::GLOBALS))
    }

    pub fn service_slot(&self, half: u32, slot: u32) -> Result<ServiceEntry, DataplaneError> {
        let index = half * limits::SERVICE_SLOTS + slot;
        self.array::<ServiceEntry>(names::SERVICES)?.get(&index, 0).map_err(map_err(names::SERVICES))
    }

    /// Every non-empty slot of one half of the service index, as (slot, entry).
    pub fn service_half(&self, half: u32) -> Result<Vec<(u32, ServiceEntry)>, DataplaneError> {
        let map = self.array::<ServiceEntry>(names::SERVICES)?;
        let batched = batch::lookup_array::<ServiceEntry>(map.map(), half * limits::SERVICE_SLOTS, limits::SERVICE_SLOTS);
        let all = or_per_element(names::SERVICES, batched, || self.service_half_all_per_element(half))?;
        Ok((0..).zip(all).filter(|(_, e)| e.family != mim_lb_common::FAMILY_NONE).collect())
    }

    /// [`MapsRo::service_half`] one syscall per slot.
    pub fn service_half_per_element(&self, half: u32) -> Result<Vec<(u32, ServiceEntry)>, DataplaneError> {
        let all = self.service_half_all_per_element(half)?;
        Ok((0..).zip(all).filter(|(_, e)| e.family != mim_lb_common::FAMILY_NONE).collect())
    }

    fn service_half_all_per_element(&self, half: u32) -> Result<Vec<ServiceEntry>, DataplaneError> {
        let map = self.array::<ServiceEntry>(names::SERVICES)?;
        (0..limits::SERVICE_SLOTS)
            .map(|slot| map.get(&(half * limits::SERVICE_SLOTS + slot), 0).map_err(map_err(names::SERVICES)))
            .collect()
    }

    pub fn maglev_entry(&self, service_id: u32, half: u32, slot: u32) -> Result<u32, DataplaneError> {
        self.array::<u32>(names::MAGLEV)?
            .get(&limits::maglev_index(service_id, half, slot), 0)
            .map_err(map_err(names::MAGLEV))
    }

    /// The first `size` entries of one Maglev region.
    pub fn maglev_region(&self, service_id: u32, half: u32, size: u32) -> Result<Vec<u32>, DataplaneError> {
        let map = self.array::<u32>(names::MAGLEV)?;
        let batched = batch::lookup_array::<u32>(map.map(), limits::maglev_index(service_id, half, 0), size);
        or_per_element(names::MAGLEV, batched, || self.maglev_region_per_element(service_id, half, size))
    }

    /// [`MapsRo::maglev_region`] one syscall per slot.
    pub fn maglev_region_per_element(&self, service_id: u32, half: u32, size: u32) -> Result<Vec<u32>, DataplaneError> {
        let map = self.array::<u32>(names::MAGLEV)?;
        (0..size)
            .map(|slot| map.get(&limits::maglev_index(service_id, half, slot), 0).map_err(map_err(names::MAGLEV)))
            .collect()
    }

    /// `SLOT_SEEN` of the first `size` slots of a service: when an unrecorded flow last went
    /// to each slot's previous master (`CLOCK_MONOTONIC >> SEEN_SHIFT`).
    pub fn slot_seen(&self, service_id: u32, size: u32) -> Result<Vec<u32>, DataplaneError> {
        let map = self.array::<u32>(names::SLOT_SEEN)?;
        let batched = batch::lookup_array::<u32>(map.map(), limits::slot_index(service_id, 0), size);
        or_per_element(names::SLOT_SEEN, batched, || {
            (0..size)
                .map(|slot| map.get(&limits::slot_index(service_id, slot), 0).map_err(map_err(names::SLOT_SEEN)))
                .collect()
        })
    }

    /// The live generation of `ACTIVE_SKETCH`.
    pub fn sketch_gen(&self) -> Result<u32, DataplaneError> {
        self.array::<u32>(names::SKETCH_GEN)?.get(&0, 0).map_err(map_err(names::SKETCH_GEN))
    }

    /// Backend `backend_id`'s active-connection sketch of generation `generation`.
    pub fn active_sketch(&self, generation: u32, backend_id: u32) -> Result<ActiveSketch, DataplaneError> {
        self.array::<ActiveSketch>(names::ACTIVE_SKETCH)?
            .get(&limits::sketch_index(generation, backend_id), 0)
            .map_err(map_err(names::ACTIVE_SKETCH))
    }

    /// `SYNC_STATS` summed over CPUs, by `SYNC_STAT_*` index.
    pub fn sync_stats(&self) -> Result<Vec<u64>, DataplaneError> {
        let map = self.ebpf.map(names::SYNC_STATS).ok_or(DataplaneError::MissingMap(names::SYNC_STATS))?;
        let stats: aya::maps::PerCpuArray<&MapData, u64> =
            aya::maps::PerCpuArray::try_from(map).map_err(map_err(names::SYNC_STATS))?;
        (0..mim_lb_common::SYNC_STAT_SLOTS)
            .map(|i| stats.get(&i, 0).map(|v| v.iter().sum()).map_err(map_err(names::SYNC_STATS)))
            .collect()
    }

    pub fn backend(&self, id: u32) -> Result<BackendEntry, DataplaneError> {
        self.array::<BackendEntry>(names::BACKENDS)?.get(&id, 0).map_err(map_err(names::BACKENDS))
    }

    /// Every backend entry in use, as (id, entry). Id 0 means "no backend" and is skipped.
    pub fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, DataplaneError> {
        let map = self.array::<BackendEntry>(names::BACKENDS)?;
        let batched = batch::lookup_array::<BackendEntry>(map.map(), 1, limits::MAX_BACKENDS - 1);
        let all = or_per_element(names::BACKENDS, batched, || self.backends_all_per_element())?;
        Ok((1..).zip(all).filter(|(_, e)| e.flags & mim_lb_common::BACKEND_F_IN_USE != 0).collect())
    }

    /// [`MapsRo::backends`] one syscall per backend id.
    pub fn backends_per_element(&self) -> Result<Vec<(u32, BackendEntry)>, DataplaneError> {
        let all = self.backends_all_per_element()?;
        Ok((1..).zip(all).filter(|(_, e)| e.flags & mim_lb_common::BACKEND_F_IN_USE != 0).collect())
    }

    fn backends_all_per_element(&self) -> Result<Vec<BackendEntry>, DataplaneError> {
        let map = self.array::<BackendEntry>(names::BACKENDS)?;
        (1..limits::MAX_BACKENDS).map(|id| map.get(&id, 0).map_err(map_err(names::BACKENDS))).collect()
    }

    /// Every recorded flow, batched (see [`batch::lookup_hash`]). Entries can be evicted or
    /// replaced while the walk goes on; those are missing from the result or seen in either
    /// state.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>, DataplaneError> {
        let flows = self.flows_map()?;
        let batched = batch::lookup_hash(flows.map(), batch::HASH_BATCH);
        or_per_element(names::FLOWS, batched, || Ok(flows_per_element(&flows)))
    }

    /// [`MapsRo::flows`] two syscalls per flow (the next key, then its value).
    pub fn flows_per_element(&self) -> Result<Vec<(FlowKey, FlowEntry)>, DataplaneError> {
        Ok(flows_per_element(&self.flows_map()?))
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowEntry>, DataplaneError> {
        match self.flows_map()?.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::FLOWS)(e)),
        }
    }

    /// The per-reason counters, summed over CPUs, indexed by reason code.
    pub fn reason_counters(&self) -> Result<Vec<Counter>, DataplaneError> {
        let map = self.per_cpu::<Counter>(names::REASON_STATS)?;
        (0..limits::REASON_SLOTS)
            .map(|i| {
                let per_cpu = map.get(&i, 0).map_err(map_err(names::REASON_STATS))?;
                Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                }))
            })
            .collect()
    }

    pub fn service_stats(&self, service_id: u32) -> Result<TrafficStats, DataplaneError> {
        sum_stats(&self.per_cpu::<TrafficStats>(names::SERVICE_STATS)?, service_id, names::SERVICE_STATS)
    }

    pub fn backend_stats(&self, backend_id: u32) -> Result<TrafficStats, DataplaneError> {
        sum_stats(&self.per_cpu::<TrafficStats>(names::BACKEND_STATS)?, backend_id, names::BACKEND_STATS)
    }
}

impl<'a> Maps<'a> {
    pub(super) fn new(ebpf: &'a mut Ebpf) -> Self {
        Maps { ebpf }
    }

    /// The read side of the same maps.
    pub fn ro(&self) -> MapsRo<'_> {
        MapsRo::new(self.ebpf)
    }

    fn array<V: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, V>, DataplaneError> {
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        Array::try_from(map).map_err(map_err(name))
    }

    pub fn globals(&self) -> Result<Globals, DataplaneError> {
        self.ro().globals()
    }

    pub fn set_globals(&mut self, value: &Globals) -> Result<(), DataplaneError> {
        self.array::<Globals>(names::GLOBALS)?.set(0, value, 0).map_err(map_err(names::GLOBALS))
    }

    /// Deletes every record of `FRAGMENTS` (the fuzzer's oracle forgets its own at the same
    /// moment; the daemon never needs to).
    pub fn clear_fragments(&mut self) -> Result<(), DataplaneError> {
        let map = self.ebpf.map_mut(names::FRAGMENTS).ok_or(DataplaneError::MissingMap(names::FRAGMENTS))?;
        let mut records: HashMap<&mut MapData, mim_lb_common::FragmentKey, mim_lb_common::FragmentEntry> =
            HashMap::try_from(map).map_err(map_err(names::FRAGMENTS))?;
        let keys: Vec<_> = records.keys().collect::<Result<_, _>>().map_err(map_err(names::FRAGMENTS))?;
        for key in keys {
            // One the LRU evicted meanwhile is gone already.
            let _ = records.remove(&key);
        }
        Ok(())
    }

    /// Makes `generation` the live one of `ACTIVE_SKETCH`.
    pub fn set_sketch_gen(&mut self, generation: u32) -> Result<(), DataplaneError> {
        self.array::<u32>(names::SKETCH_GEN)?.set(0, generation, 0).map_err(map_err(names::SKETCH_GEN))
    }

    /// Zeroes backend `backend_id`'s sketch of `generation`.
    pub fn clear_active_sketch(&mut self, generation: u32, backend_id: u32) -> Result<(), DataplaneError> {
        self.array::<ActiveSketch>(names::ACTIVE_SKETCH)?
            .set(limits::sketch_index(generation, backend_id), ActiveSketch::default(), 0)
            .map_err(map_err(names::ACTIVE_SKETCH))
    }

    /// Writes slot `slot` of half `half` of the service index.
    pub fn set_service_slot(&mut self, half: u32, slot: u32, value: &ServiceEntry) -> Result<(), DataplaneError> {
        let index = half * limits::SERVICE_SLOTS + slot;
        self.array::<ServiceEntry>(names::SERVICES)?.set(index, value, 0).map_err(map_err(names::SERVICES))
    }

    /// Writes the given (slot, entry) pairs into one Maglev region, in order, in one
    /// `BPF_MAP_UPDATE_BATCH` per 65,536 entries. Returns the number of entries written.
    pub fn set_maglev_entries(
        &mut self,
        service_id: u32,
        half: u32,
        entries: impl IntoIterator<Item = (u32, u32)>,
    ) -> Result<usize, DataplaneError> {
        let pairs: Vec<(u32, u32)> = entries.into_iter().collect();
        if pairs.is_empty() {
            return Ok(0);
        }
        let (indices, values): (Vec<u32>, Vec<u32>) =
            pairs.iter().map(|&(slot, value)| (limits::maglev_index(service_id, half, slot), value)).unzip();
        let batched = {
            let map = self.array::<u32>(names::MAGLEV)?;
            batch::update(map.map(), &indices, &values)
        };
        or_per_element(names::MAGLEV, batched, || self.set_maglev_entries_per_element(service_id, half, pairs))
    }

    /// [`Maps::set_maglev_entries`] one syscall per entry.
    pub fn set_maglev_entries_per_element(
        &mut self,
        service_id: u32,
        half: u32,
        entries: impl IntoIterator<Item = (u32, u32)>,
    ) -> Result<usize, DataplaneError> {
        let mut map = self.array::<u32>(names::MAGLEV)?;
        let mut written = 0;
        for (slot, value) in entries {
            map.set(limits::maglev_index(service_id, half, slot), value, 0)
                .map_err(map_err(names::MAGLEV))?;
            written += 1;
        }
        Ok(written)
    }

    /// Writes a service's table from before a resize into `MAGLEV_OLD` (master per slot).
    pub fn set_maglev_old(&mut self, service_id: u32, owners: &[u32]) -> Result<usize, DataplaneError> {
        let indices: Vec<u32> = (0..owners.len() as u32).map(|slot| limits::slot_index(service_id, slot)).collect();
        let batched = {
            let map = self.array::<u32>(names::MAGLEV_OLD)?;
            batch::update(map.map(), &indices, owners)
        };
        or_per_element(names::MAGLEV_OLD, batched, || {
            let mut map = self.array::<u32>(names::MAGLEV_OLD)?;
            for (index, owner) in indices.iter().zip(owners) {
                map.set(*index, *owner, 0).map_err(map_err(names::MAGLEV_OLD))?;
            }
            Ok(owners.len())
        })
    }

    pub fn set_backend(&mut self, id: u32, value: &BackendEntry) -> Result<(), DataplaneError> {
        self.array::<BackendEntry>(names::BACKENDS)?.set(id, value, 0).map_err(map_err(names::BACKENDS))
    }

    /// Writes records into the connection table (flows a peer director recorded).
    pub fn set_flows(&mut self, records: &[(FlowKey, FlowEntry)]) -> Result<usize, DataplaneError> {
        let map = self.ebpf.map_mut(names::FLOWS).ok_or(DataplaneError::MissingMap(names::FLOWS))?;
        let mut flows: HashMap<&mut MapData, FlowKey, FlowEntry> =
            HashMap::try_from(map).map_err(map_err(names::FLOWS))?;
        for (key, flow) in records {
            flows.insert(key, flow, 0).map_err(map_err(names::FLOWS))?;
        }
        Ok(records.len())
    }

    /// Writes (slot, stamp) pairs into a service's `SLOT_SEEN`.
    pub fn set_slot_seen(&mut self, service_id: u32, stamps: &[(u32, u32)]) -> Result<(), DataplaneError> {
        let mut map = self.array::<u32>(names::SLOT_SEEN)?;
        for (slot, stamp) in stamps {
            map.set(limits::slot_index(service_id, *slot), *stamp, 0).map_err(map_err(names::SLOT_SEEN))?;
        }
        Ok(())
    }

    /// Removes recorded flows; keys already gone are skipped.
    pub fn delete_flows<'k>(&mut self, keys: impl IntoIterator<Item = &'k FlowKey>) -> Result<usize, DataplaneError> {
        let map = self.ebpf.map_mut(names::FLOWS).ok_or(DataplaneError::MissingMap(names::FLOWS))?;
        let mut flows: HashMap<&mut MapData, FlowKey, FlowEntry> =
            HashMap::try_from(map).map_err(map_err(names::FLOWS))?;
        let mut deleted = 0;
        for key in keys {
            match flows.remove(key) {
                Ok(()) => deleted += 1,
                // Evicted, or deleted already: aya reports a missing key on delete as the
                // syscall's ENOENT.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err(names::FLOWS)(e)),
            }
        }
        Ok(deleted)
    }

    /// Zeroes the counters of a service id about to be (re)used.
    pub fn reset_service_stats(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        reset_stats(self.ebpf, names::SERVICE_STATS, service_id)
    }

    /// Zeroes the counters of a backend id about to be (re)used, and its active-connection
    /// sketches: the connections of the backend that had the id are not the new one's.
    pub fn reset_backend_stats(&mut self, backend_id: u32) -> Result<(), DataplaneError> {
        reset_stats(self.ebpf, names::BACKEND_STATS, backend_id)?;
        for generation in 0..limits::SKETCH_GENERATIONS {
            self.clear_active_sketch(generation, backend_id)?;
        }
        Ok(())
    }
}

fn sum_stats(
    map: &PerCpuArray<&MapData, TrafficStats>,
    index: u32,
    name: &'static str,
) -> Result<TrafficStats, DataplaneError> {
    let per_cpu = map.get(&index, 0).map_err(map_err(name))?;
    Ok(per_cpu.iter().fold(TrafficStats::default(), |a, s| TrafficStats {
        packets: a.packets + s.packets,
        bytes: a.bytes + s.bytes,
        new_flows: a.new_flows + s.new_flows,
    }))
}

fn reset_stats(ebpf: &mut Ebpf, name: &'static str, index: u32) -> Result<(), DataplaneError> {
    let map = ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
    let mut map: PerCpuArray<&mut MapData, TrafficStats> =
        PerCpuArray::try_from(map).map_err(map_err(name))?;
    let cpus = nr_cpus().map_err(|(_, source)| DataplaneError::Cpus(source))?;
    let zeros =
        PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).map_err(DataplaneError::Cpus)?;
    map.set(index, zeros, 0).map_err(map_err(name))
}
