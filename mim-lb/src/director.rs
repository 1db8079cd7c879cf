//! The control plane: turns a validated configuration into map contents and writes them so
//! that the data path never sees a half-written state and no established flow moves.
//!
//! How a change reaches the data path:
//! 1. backend entries are written first (a new master must exist before a slot names it);
//! 2. each changed service's Maglev table is written into the region the data path is not
//!    reading, with slots whose master changed marked `MAGLEV_SLOT_CHANGED` so flows recorded
//!    on the old master keep it;
//! 3. a complete new half of the service index (pointing at the new regions) is written into
//!    the half not being read, with its seed;
//! 4. one word in `GLOBALS` flips the data path to the new half: every change lands at once;
//! 5. only then are removed backends cleared.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use mim_lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEPS_FLOWS, BackendEntry, GLOBALS_F_READY, Globals,
    MAGLEV_BACKEND_MASK, MAGLEV_SLOT_CHANGED, SERVICE_F_SOURCE_HASH, SERVICE_F_VIP_MARKER,
    ServiceEntry, limits,
};

use crate::{
    config::{Config, Scheduler, ServiceKey},
    dataplane::{
        Dataplane, DataplaneError,
        service_index::{self, IndexError, addr_words},
    },
    maglev,
};

#[derive(Debug, thiserror::Error)]
pub enum DirectorError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("service index: {0}")]
    Index(#[from] IndexError),
    #[error("no free {what} id: at most {max} at once, counting those being replaced")]
    Capacity { what: &'static str, max: u32 },
    #[error("service {service}, backend {backend}: no MAC address (required)")]
    NoMac { service: String, backend: IpAddr },
}

/// What the director has written for one backend.
#[derive(Clone, Debug)]
pub struct AppliedBackend {
    pub id: u32,
    pub mac: [u8; 6],
    pub weight: u32,
}

/// What the director has written for one service.
#[derive(Clone, Debug)]
pub struct AppliedService {
    pub id: u32,
    pub name: String,
    pub flags: u32,
    pub table_size: u32,
    /// The Maglev region the data path reads (0 or 1).
    pub active: u32,
    /// Contents of both regions as last written (entries with their changed marks).
    regions: [Vec<u32>; 2],
    pub backends: BTreeMap<IpAddr, AppliedBackend>,
}

impl AppliedService {
    /// The live Maglev table: backend id (and changed mark) per slot.
    pub fn table(&self) -> &[u32] {
        &self.regions[self.active as usize]
    }
}

/// Owns the data path and the record of what is written in it.
pub struct Director {
    dataplane: Dataplane,
    gateway_mac: [u8; 6],
    services: BTreeMap<ServiceKey, AppliedService>,
    index_active: u32,
    index_seeds: [u32; 2],
    /// Occupied slots of each half of the service index, to clear them on the next rewrite.
    index_slots: [BTreeSet<u32>; 2],
    applied_once: bool,
}

impl Director {
    /// Takes a freshly loaded data path. Until the first `apply`, the program passes every
    /// packet (`GLOBALS` is not marked ready).
    pub fn new(dataplane: Dataplane, gateway_mac: [u8; 6]) -> Self {
        Director {
            dataplane,
            gateway_mac,
            services: BTreeMap::new(),
            index_active: 0,
            index_seeds: [0; 2],
            index_slots: [BTreeSet::new(), BTreeSet::new()],
            applied_once: false,
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    pub fn into_dataplane(self) -> Dataplane {
        self.dataplane
    }

    pub fn services(&self) -> &BTreeMap<ServiceKey, AppliedService> {
        &self.services
    }

    /// Makes the data path serve `config.services`. Unchanged services are not touched;
    /// changed ones move only the slots Maglev moves, and flows recorded on a master that is
    /// still configured keep it.
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport, DirectorError> {
        let mut report = ApplyReport::default();
        let mut next: BTreeMap<ServiceKey, AppliedService> = BTreeMap::new();
        let mut service_ids = IdPool::new(0, limits::MAX_SERVICES, "service");
        let mut backend_ids = IdPool::new(1, limits::MAX_BACKENDS, "backend");
        // Ids in use stay reserved until the flip: the data path may still read them.
        for s in self.services.values() {
            service_ids.reserve(s.id);
            for b in s.backends.values() {
                backend_ids.reserve(b.id);
            }
        }

        // Assign ids and write backend entries (step 1).
        for service in &config.services {
            let key = service.key();
            let old = self.services.get(&key);
            let id = match old {
                Some(o) => o.id,
                None => service_ids.take()?,
            };
            let mut backends = BTreeMap::new();
            for backend in &service.backends {
                let mac = backend.mac.ok_or_else(|| DirectorError::NoMac {
                    service: service.name.clone(),
                    backend: backend.address,
                })?;
                let old_backend = old.and_then(|o| o.backends.get(&backend.address));
                let backend_id = match old_backend {
                    Some(b) => b.id,
                    None => backend_ids.take()?,
                };
                if old_backend.is_none() {
                    self.dataplane.maps().reset_backend_stats(backend_id)?;
                }
                if old_backend.is_none_or(|b| b.mac != mac) {
                    let (addr, family) = addr_words(backend.address);
                    let entry = BackendEntry {
                        mac,
                        family,
                        _pad0: 0,
                        flags: BACKEND_F_IN_USE | BACKEND_F_KEEPS_FLOWS,
                        service_id: id,
                        addr,
                    };
                    self.dataplane.maps().set_backend(backend_id, &entry)?;
                }
                backends.insert(
                    backend.address,
                    AppliedBackend { id: backend_id, mac, weight: backend.weight },
                );
            }
            let flags = match service.scheduler {
                Scheduler::Maglev => 0,
                Scheduler::MaglevSource => SERVICE_F_SOURCE_HASH,
            };
            next.insert(
                key,
                AppliedService {
                    id,
                    name: service.name.clone(),
                    flags,
                    table_size: service.table_size,
                    active: 0,
                    regions: [Vec::new(), Vec::new()],
                    backends,
                },
            );
        }

        // Maglev tables into the regions not being read (step 2).
        for (key, svc) in next.iter_mut() {
            let keys: Vec<Vec<u8>> = svc.backends.keys().map(maglev_key).collect();
            let members: Vec<maglev::MaglevBackend> = svc
                .backends
                .values()
                .zip(&keys)
                .map(|(b, k)| maglev::MaglevBackend {
                    id: b.id,
                    key: k,
                    weight: b.weight,
                })
                .collect();
            let built = maglev::build(&members, svc.table_size);
            match self.services.get(key).filter(|o| o.table_size == svc.table_size) {
                Some(old) => {
                    let live = old.table();
                    let marked = mark_changed(live, &built);
                    svc.regions = old.regions.clone();
                    if marked == live {
                        svc.active = old.active;
                    } else {
                        let target = 1 - old.active;
                        let region = &old.regions[target as usize];
                        let diff = marked
                            .iter()
                            .enumerate()
                            .filter(|(slot, v)| region.get(*slot) != Some(*v))
                            .map(|(slot, v)| (slot as u32, *v));
                        report.maglev_writes += self.dataplane.maps().set_maglev_entries(svc.id, target, diff)?;
                        svc.regions[target as usize] = marked;
                        svc.active = target;
                        report.changed_services.push(svc.name.clone());
                    }
                }
                None => {
                    // A new service (or a new table size): nothing recorded can be on it yet.
                    self.dataplane.maps().reset_service_stats(svc.id)?;
                    let target = match self.services.get(key) {
                        Some(old) => 1 - old.active,
                        None => 0,
                    };
                    let all = built.iter().enumerate().map(|(slot, v)| (slot as u32, *v));
                    report.maglev_writes += self.dataplane.maps().set_maglev_entries(svc.id, target, all)?;
                    svc.regions[target as usize] = built;
                    svc.active = target;
                    report.changed_services.push(svc.name.clone());
                }
            }
        }

        // The new service index half, then the flip (steps 3 and 4).
        let entries = index_entries(&next);
        let placed = service_index::place(&entries)?;
        let half = 1 - self.index_active;
        let placed_slots: BTreeSet<u32> = placed.slots.iter().map(|(slot, _)| *slot).collect();
        for stale in self.index_slots[half as usize].difference(&placed_slots) {
            self.dataplane.maps().set_service_slot(half, *stale, &ServiceEntry::default())?;
        }
        for (slot, entry) in &placed.slots {
            self.dataplane.maps().set_service_slot(half, *slot, entry)?;
        }
        let mut seeds = self.index_seeds;
        seeds[half as usize] = placed.seed;
        let staged = Globals {
            gateway_mac: self.gateway_mac,
            _pad0: [0; 2],
            flags: if self.applied_once { GLOBALS_F_READY } else { 0 },
            active_services: self.index_active,
            service_seeds: seeds,
        };
        self.dataplane.maps().set_globals(&staged)?;
        self.dataplane.maps().set_globals(&Globals {
            flags: GLOBALS_F_READY,
            active_services: half,
            ..staged
        })?;
        self.index_active = half;
        self.index_seeds = seeds;
        self.index_slots[half as usize] = placed_slots;
        self.applied_once = true;

        // Clear what is gone (step 5).
        for (key, old) in &self.services {
            let kept = next.get(key);
            for (addr, b) in &old.backends {
                if kept.is_none_or(|s| !s.backends.contains_key(addr)) {
                    self.dataplane.maps().set_backend(b.id, &BackendEntry::default())?;
                }
            }
            if kept.is_none() {
                report.removed_services.push(old.name.clone());
            }
        }
        self.services = next;
        Ok(report)
    }
}

/// What one `apply` did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub changed_services: Vec<String>,
    pub removed_services: Vec<String>,
    pub maglev_writes: usize,
}

/// The new live table with changed marks: a slot is marked when its master changes while the
/// old one had a master (flows recorded there may be alive), and stays marked until the
/// control plane knows no recorded flow needs it.
fn mark_changed(live: &[u32], built: &[u32]) -> Vec<u32> {
    built
        .iter()
        .enumerate()
        .map(|(slot, &id)| {
            let old = live.get(slot).copied().unwrap_or(0);
            let old_id = old & MAGLEV_BACKEND_MASK;
            let changed = old & MAGLEV_SLOT_CHANGED != 0 || (old_id != 0 && old_id != id);
            if changed { id | MAGLEV_SLOT_CHANGED } else { id }
        })
        .collect()
}

/// Service index entries: one per service, plus one VIP marker per (vip, protocol) so that
/// fragments (which carry no port) addressed to a VIP are recognised.
fn index_entries(services: &BTreeMap<ServiceKey, AppliedService>) -> Vec<ServiceEntry> {
    let mut entries = Vec::new();
    let mut markers = BTreeSet::new();
    for (key, svc) in services {
        let (vip, family) = addr_words(key.vip);
        entries.push(ServiceEntry {
            vip,
            port: key.port.to_be(),
            proto: key.protocol.number(),
            family,
            service_id: svc.id,
            flags: svc.flags,
            table_size: svc.table_size,
            active_table: svc.active,
            _pad0: 0,
        });
        if markers.insert((key.vip, key.protocol)) {
            entries.push(ServiceEntry {
                vip,
                port: 0,
                proto: key.protocol.number(),
                family,
                service_id: 0,
                flags: SERVICE_F_VIP_MARKER,
                table_size: 0,
                active_table: 0,
                _pad0: 0,
            });
        }
    }
    entries
}

/// A backend's Maglev key: its address octets (4 or 16), so the table depends only on
/// which masters there are, not on their order in the file.
fn maglev_key(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Hands out the lowest free id in a range.
struct IdPool {
    used: BTreeSet<u32>,
    first: u32,
    end: u32,
    what: &'static str,
}

impl IdPool {
    fn new(first: u32, end: u32, what: &'static str) -> Self {
        IdPool { used: BTreeSet::new(), first, end, what }
    }

    fn reserve(&mut self, id: u32) {
        self.used.insert(id);
    }

    fn take(&mut self) -> Result<u32, DirectorError> {
        let id = (self.first..self.end)
            .find(|id| !self.used.contains(id))
            .ok_or(DirectorError::Capacity { what: self.what, max: self.end - self.first })?;
        self.used.insert(id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_that_changes_master_is_marked_and_stays_marked() {
        let live = vec![1, 2, 3, 0];
        let built = vec![1, 3, 3, 2];
        let marked = mark_changed(&live, &built);
        assert_eq!(marked, vec![1, 3 | MAGLEV_SLOT_CHANGED, 3, 2]);
        let again = mark_changed(&marked, &built);
        assert_eq!(again, marked, "marks persist until cleared by the control plane");
    }
}
