//! Typed readers and writers for each map. The only place that names map types.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use mim_lb_common::{
    BackendEntry, Counter, FlowEntry, FlowKey, Globals, ServiceEntry, TrafficStats, limits,
    maps::names,
};

use super::DataplaneError;

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
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
        let mut found = Vec::new();
        for slot in 0..limits::SERVICE_SLOTS {
            let entry = map.get(&(half * limits::SERVICE_SLOTS + slot), 0).map_err(map_err(names::SERVICES))?;
            if entry.family != mim_lb_common::FAMILY_NONE {
                found.push((slot, entry));
            }
        }
        Ok(found)
    }

    pub fn maglev_entry(&self, service_id: u32, half: u32, slot: u32) -> Result<u32, DataplaneError> {
        self.array::<u32>(names::MAGLEV)?
            .get(&limits::maglev_index(service_id, half, slot), 0)
            .map_err(map_err(names::MAGLEV))
    }

    /// The first `size` entries of one Maglev region.
    pub fn maglev_region(&self, service_id: u32, half: u32, size: u32) -> Result<Vec<u32>, DataplaneError> {
        let map = self.array::<u32>(names::MAGLEV)?;
        (0..size)
            .map(|slot| map.get(&limits::maglev_index(service_id, half, slot), 0).map_err(map_err(names::MAGLEV)))
            .collect()
    }

    /// `SLOT_SEEN` of the first `size` slots of a service: when an unrecorded flow last went
    /// to each slot's previous master (`CLOCK_MONOTONIC >> SEEN_SHIFT`).
    pub fn slot_seen(&self, service_id: u32, size: u32) -> Result<Vec<u32>, DataplaneError> {
        let map = self.array::<u32>(names::SLOT_SEEN)?;
        (0..size)
            .map(|slot| map.get(&limits::slot_index(service_id, slot), 0).map_err(map_err(names::SLOT_SEEN)))
            .collect()
    }

    pub fn backend(&self, id: u32) -> Result<BackendEntry, DataplaneError> {
        self.array::<BackendEntry>(names::BACKENDS)?.get(&id, 0).map_err(map_err(names::BACKENDS))
    }

    /// Every backend entry in use, as (id, entry).
    pub fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, DataplaneError> {
        let map = self.array::<BackendEntry>(names::BACKENDS)?;
        let mut found = Vec::new();
        for id in 1..limits::MAX_BACKENDS {
            let entry = map.get(&id, 0).map_err(map_err(names::BACKENDS))?;
            if entry.flags & mim_lb_common::BACKEND_F_IN_USE != 0 {
                found.push((id, entry));
            }
        }
        Ok(found)
    }

    /// Every recorded flow. Entries can be evicted or replaced while the walk goes on; those
    /// are missing from the result or seen in either state.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>, DataplaneError> {
        Ok(self.flows_map()?.iter().filter_map(Result::ok).collect())
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

    /// Writes slot `slot` of half `half` of the service index.
    pub fn set_service_slot(&mut self, half: u32, slot: u32, value: &ServiceEntry) -> Result<(), DataplaneError> {
        let index = half * limits::SERVICE_SLOTS + slot;
        self.array::<ServiceEntry>(names::SERVICES)?.set(index, value, 0).map_err(map_err(names::SERVICES))
    }

    /// Writes the given (slot, entry) pairs into one Maglev region.
    pub fn set_maglev_entries(
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
        let mut map = self.array::<u32>(names::MAGLEV_OLD)?;
        for (slot, owner) in owners.iter().enumerate() {
            map.set(limits::slot_index(service_id, slot as u32), *owner, 0).map_err(map_err(names::MAGLEV_OLD))?;
        }
        Ok(owners.len())
    }

    pub fn set_backend(&mut self, id: u32, value: &BackendEntry) -> Result<(), DataplaneError> {
        self.array::<BackendEntry>(names::BACKENDS)?.set(id, value, 0).map_err(map_err(names::BACKENDS))
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
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::FLOWS)(e)),
            }
        }
        Ok(deleted)
    }

    /// Zeroes the counters of a service id about to be (re)used.
    pub fn reset_service_stats(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        reset_stats(self.ebpf, names::SERVICE_STATS, service_id)
    }

    /// Zeroes the counters of a backend id about to be (re)used.
    pub fn reset_backend_stats(&mut self, backend_id: u32) -> Result<(), DataplaneError> {
        reset_stats(self.ebpf, names::BACKEND_STATS, backend_id)
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
