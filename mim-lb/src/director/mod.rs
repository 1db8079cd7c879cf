//! The control plane: owns the desired state (configuration + operator commands + health
//! verdicts + resolved MACs), and writes it into the data path so that the program never sees
//! a half-written state and no established flow moves while its master can keep it.
//!
//! Every change goes through one function, [`Director::commit`], which first computes
//! everything that can fail (ids, tables, index placement), and only then writes:
//! 1. backend entries (a new master must exist before a slot names it);
//! 2. each changed service's Maglev table, into the region the data path is not reading, with
//!    slots whose master changed marked `MAGLEV_SLOT_CHANGED` so flows recorded on the old
//!    master keep it;
//! 3. when a table moved or the service set changed, a complete new half of the service index
//!    (pointing at the new regions), and one word in `GLOBALS` that flips the data path to it;
//! 4. only then are entries of backends that are gone cleared.
//!
//! [`Director::sweep`] later clears the marks no live flow needs any more and lets removed
//! backends go once their last flow has ended.

mod desired;
mod ids;
mod recover;
mod sweep;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

pub use desired::{Admin, BackendDesire, Desired, ServiceDesire, State};
use mim_lb_common::{
    ABI_VERSION, BACKEND_F_IN_USE, BACKEND_F_KEEPS_FLOWS, BackendEntry, GLOBALS_F_READY,
    HEALTH_DOWN, HEALTH_UP, MAGLEV_SLOT_CHANGED, SERVICE_F_SOURCE_HASH, SERVICE_F_VIP_MARKER,
    ServiceEntry,
};
pub use sweep::{SweepReport, monotonic_ns, read_pinned_flows};

use crate::{
    config::{CheckKind, Config, HealthCheck, Protocol, Scheduler, ServiceKey},
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
    #[error("no free {what} id: at most {max} at once, counting those still draining or being replaced")]
    Capacity { what: &'static str, max: u32 },
    #[error("no service {0} (give VIP:PORT[/PROTO] or the service's name)")]
    UnknownService(String),
    #[error("service {service} has no backend {backend}")]
    UnknownBackend { service: String, backend: IpAddr },
}

/// What the director has written for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenService {
    pub id: u32,
    pub flags: u32,
    pub table_size: u32,
    /// The Maglev region the data path reads (0 or 1).
    pub active: u32,
    /// Contents of both regions as last written (entries with their changed marks); empty
    /// when unknown (after a restart, for the region not being read).
    regions: [Vec<u32>; 2],
    /// `CLOCK_MONOTONIC` (the clock of `bpf_ktime_get_ns`) of the last change of the live
    /// table: flows older than that may not have refreshed their `last_seen_ns` yet.
    changed_at_ns: u64,
    /// What the live table was built from: (address, id, table weight) of every backend.
    /// Unchanged inputs mean an unchanged table, so a change elsewhere rebuilds nothing
    /// here. Empty when unknown (after a restart).
    inputs: Vec<(IpAddr, u32, u32)>,
}

impl WrittenService {
    /// The live Maglev table: backend id (and changed mark) per slot.
    pub fn table(&self) -> &[u32] {
        &self.regions[self.active as usize]
    }
}

/// A change of one backend's state, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub service: ServiceKey,
    pub backend: IpAddr,
    pub from: State,
    pub to: State,
    pub reason: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend {} of {}: {} -> {}", self.backend, self.service, self.from, self.to)?;
        if !self.reason.is_empty() {
            write!(f, " ({})", self.reason)?;
        }
        Ok(())
    }
}

/// What one commit did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub changed_services: Vec<String>,
    pub removed_services: Vec<String>,
    pub maglev_writes: usize,
    pub backend_writes: usize,
    /// Maglev tables built: only services whose backends, weights or states changed.
    pub tables_built: usize,
    pub index_flipped: bool,
    pub changes: Vec<Change>,
}

/// Writes into one Maglev region: (service id, region, (slot, entry) pairs).
type RegionWrite = (u32, u32, Vec<(u32, u32)>);

/// Owns the data path and the record of what is written in it.
pub struct Director {
    dataplane: Dataplane,
    gateway_mac: [u8; 6],
    desired: Desired,
    written: BTreeMap<ServiceKey, WrittenService>,
    written_backends: BTreeMap<u32, BackendEntry>,
    index_active: u32,
    index_seeds: [u32; 2],
    /// Occupied slots of each half of the service index, to clear them on the next rewrite.
    index_slots: [BTreeSet<u32>; 2],
    /// The entries of the live half, to skip rewriting an unchanged index.
    index_entries: Vec<ServiceEntry>,
    ready: bool,
}

impl Director {
    /// Takes a data path whose maps hold nothing live. Until the first commit, the program
    /// passes every packet (`GLOBALS` is not marked ready).
    pub fn new(dataplane: Dataplane, gateway_mac: [u8; 6]) -> Self {
        Director {
            dataplane,
            gateway_mac,
            desired: Desired::new(),
            written: BTreeMap::new(),
            written_backends: BTreeMap::new(),
            index_active: 0,
            index_seeds: [0; 2],
            index_slots: [BTreeSet::new(), BTreeSet::new()],
            index_entries: Vec::new(),
            ready: false,
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

    /// The desired state, as last committed.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// What is written for each service.
    pub fn written(&self) -> &BTreeMap<ServiceKey, WrittenService> {
        &self.written
    }

    /// Makes the data path serve `config.services`: new services and backends are added (new
    /// backends start down until their health check passes, unless the service checks
    /// nothing), weights and MACs are updated, backends no longer listed are kept draining
    /// until their flows end, and services no longer listed are removed. The operator's
    /// drain/disable and the health verdicts of backends that stay are kept.
    ///
    /// Nothing is written unless the whole change can be made.
    pub fn apply_config(&mut self, config: &Config) -> Result<ApplyReport, DirectorError> {
        let mut ids = self.id_pools();
        let mut next = Desired::new();
        for service in &config.services {
            let key = service.key();
            let old = self.desired.get(&key);
            let id = match old {
                Some(o) => o.id,
                None => ids.services.take()?,
            };
            let unchecked = service.health.kind == CheckKind::None;
            let mut backends = BTreeMap::new();
            for b in &service.backends {
                let desire = match old.and_then(|o| o.backends.get(&b.address)) {
                    Some(prev) => BackendDesire {
                        weight: b.weight,
                        config_mac: b.mac,
                        removing: false,
                        health_up: prev.health_up || unchecked,
                        ..prev.clone()
                    },
                    None => BackendDesire {
                        id: ids.backends.take()?,
                        weight: b.weight,
                        config_mac: b.mac,
                        resolved_mac: None,
                        mac_problem: None,
                        health_up: unchecked,
                        health_reason: if unchecked {
                            String::new()
                        } else {
                            format!("new: needs {} passed {} check(s)", service.health.rise, service.health.kind.name())
                        },
                        admin: Admin::Enabled,
                        removing: false,
                    },
                };
                backends.insert(b.address, desire);
            }
            if let Some(old) = old {
                for (addr, prev) in &old.backends {
                    if !backends.contains_key(addr) {
                        backends.insert(*addr, BackendDesire { removing: true, ..prev.clone() });
                    }
                }
            }
            next.insert(
                key,
                ServiceDesire {
                    id,
                    name: service.name.clone(),
                    scheduler: service.scheduler,
                    table_size: service.table_size,
                    health: service.health.clone(),
                    backends,
                },
            );
        }
        self.commit(next)
    }

    /// Records a health verdict. Returns the state change it caused, if any.
    pub fn set_health(
        &mut self,
        service: &ServiceKey,
        backend: IpAddr,
        up: bool,
        reason: &str,
    ) -> Result<Option<Change>, DirectorError> {
        let mut next = self.desired.clone();
        let Some(b) = next.get_mut(service).and_then(|s| s.backends.get_mut(&backend)) else {
            // A report that raced with a reload removing the backend.
            return Ok(None);
        };
        if b.health_up == up {
            return Ok(None);
        }
        b.health_up = up;
        b.health_reason = reason.to_owned();
        Ok(self.commit(next)?.changes.into_iter().next())
    }

    /// Applies an operator's drain / enable / disable.
    pub fn set_admin(
        &mut self,
        service: &ServiceKey,
        backend: IpAddr,
        admin: Admin,
    ) -> Result<Option<Change>, DirectorError> {
        let mut next = self.desired.clone();
        let s = next.get_mut(service).ok_or_else(|| DirectorError::UnknownService(service.to_string()))?;
        let b = s.backends.get_mut(&backend).ok_or_else(|| DirectorError::UnknownBackend {
            service: service.to_string(),
            backend,
        })?;
        if b.admin == admin {
            return Ok(None);
        }
        b.admin = admin;
        Ok(self.commit(next)?.changes.into_iter().next())
    }

    /// Records what the neighbour table says about `address`, for every backend at that
    /// address configured without a MAC. Flows stay where they are when only the MAC changes.
    pub fn set_resolved_mac(
        &mut self,
        address: IpAddr,
        resolved: Result<[u8; 6], String>,
    ) -> Result<Vec<Change>, DirectorError> {
        let mut next = self.desired.clone();
        let mut touched = false;
        for s in next.values_mut() {
            if let Some(b) = s.backends.get_mut(&address).filter(|b| b.config_mac.is_none()) {
                match &resolved {
                    Ok(mac) => {
                        b.resolved_mac = Some(*mac);
                        b.mac_problem = None;
                    }
                    Err(why) => {
                        b.resolved_mac = None;
                        b.mac_problem = Some(why.clone());
                    }
                }
                touched = true;
            }
        }
        if !touched || next == self.desired {
            return Ok(Vec::new());
        }
        Ok(self.commit(next)?.changes)
    }

    /// The service a command names: `VIP:PORT`, `VIP:PORT/PROTO` or the service's name. A
    /// port without protocol that only a UDP service uses names that service.
    pub fn find_service(&self, name: &str) -> Result<ServiceKey, DirectorError> {
        if let Some((key, _)) = self.desired.iter().find(|(_, s)| s.name == name) {
            return Ok(*key);
        }
        let unknown = || DirectorError::UnknownService(name.to_owned());
        let key: ServiceKey = name.parse().map_err(|_| unknown())?;
        if self.desired.contains_key(&key) {
            return Ok(key);
        }
        let udp = ServiceKey { protocol: Protocol::Udp, ..key };
        if !name.contains('/') && self.desired.contains_key(&udp) {
            return Ok(udp);
        }
        Err(unknown())
    }

    /// What each backend should be checked with, and the verdict its checks start from.
    pub fn health_targets(&self) -> Vec<(ServiceKey, IpAddr, HealthCheck, bool)> {
        self.desired
            .iter()
            .flat_map(|(key, s)| {
                s.backends.iter().map(move |(addr, b)| (*key, *addr, s.health.clone(), b.health_up))
            })
            .collect()
    }

    /// Addresses of backends whose MAC comes from the neighbour table.
    pub fn wanted_macs(&self) -> BTreeSet<IpAddr> {
        self.desired
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|(_, b)| b.config_mac.is_none())
            .map(|(addr, _)| *addr)
            .collect()
    }

    fn id_pools(&self) -> ids::Pools {
        let mut pools = ids::Pools::new();
        // Ids still written stay reserved: the data path may read them until the next flip.
        for (key, s) in &self.desired {
            pools.services.reserve(s.id);
            if let Some(w) = self.written.get(key) {
                pools.services.reserve(w.id);
            }
            for b in s.backends.values() {
                pools.backends.reserve(b.id);
            }
        }
        for w in self.written.values() {
            pools.services.reserve(w.id);
        }
        for id in self.written_backends.keys() {
            pools.backends.reserve(*id);
        }
        pools
    }

    /// Makes the data path match `next`, then adopts it as the desired state.
    fn commit(&mut self, next: Desired) -> Result<ApplyReport, DirectorError> {
        let now = sweep::monotonic_ns();
        let mut report = ApplyReport::default();

        // Everything that can fail without touching the kernel comes first.
        let mut entries: BTreeMap<u32, BackendEntry> = BTreeMap::new();
        for (key, s) in &next {
            for (addr, b) in &s.backends {
                entries.insert(b.id, backend_entry(s.id, *addr, b));
                let (to, reason) = b.state();
                let from = self.desired.get(key).and_then(|o| o.backends.get(addr)).map(|o| o.state().0);
                if let Some(from) = from
                    && from != to
                {
                    report.changes.push(Change { service: *key, backend: *addr, from, to, reason });
                }
            }
        }
        let mut written_next = BTreeMap::new();
        // (service id, region, (slot, entry) writes)
        let mut region_writes: Vec<RegionWrite> = Vec::new();
        let mut new_services = Vec::new();
        for (key, s) in &next {
            let flags = service_flags(s.scheduler);
            let inputs: Vec<(IpAddr, u32, u32)> =
                s.backends.iter().map(|(addr, b)| (*addr, b.id, b.table_weight())).collect();
            if let Some(old) = self.written.get(key).filter(|o| {
                o.id == s.id && o.table_size == s.table_size && o.flags == flags && o.inputs == inputs
            }) {
                // Only what changed is rebuilt: a verdict about one service costs no Maglev
                // build of the others.
                written_next.insert(*key, old.clone());
                continue;
            }
            let built = build_table(s);
            report.tables_built += 1;
            let old = self.written.get(key).filter(|o| o.id == s.id);
            let (target, table, changed_at_ns) = match old {
                Some(old) if old.table_size == s.table_size && old.flags == flags => {
                    let live = old.table();
                    let marked = mark_changed(live, &built);
                    if marked == live {
                        written_next.insert(*key, WrittenService { inputs, ..old.clone() });
                        continue;
                    }
                    (1 - old.active, marked, now)
                }
                // A new table size or hash: any recorded flow may now hash anywhere, so every
                // slot consults the connection table until the sweep knows better.
                Some(old) => (1 - old.active, built.iter().map(|id| id | MAGLEV_SLOT_CHANGED).collect(), now),
                None => {
                    new_services.push(s.id);
                    (0, built, now)
                }
            };
            let previous = old.map(|o| o.regions[target as usize].as_slice()).unwrap_or(&[]);
            let writes: Vec<(u32, u32)> = table
                .iter()
                .enumerate()
                .filter(|(slot, v)| previous.get(*slot) != Some(*v))
                .map(|(slot, v)| (slot as u32, *v))
                .collect();
            let mut regions = old.map(|o| o.regions.clone()).unwrap_or_default();
            if old.is_none() {
                // A new service gets the same table in both regions, so that its first change
                // (a failover, usually) writes only the slots that change instead of a whole
                // table: that write sits between the verdict and the data path seeing it.
                region_writes.push((s.id, 1 - target, writes.clone()));
                regions[(1 - target) as usize] = table.clone();
            }
            region_writes.push((s.id, target, writes));
            regions[target as usize] = table;
            written_next.insert(
                *key,
                WrittenService { id: s.id, flags, table_size: s.table_size, active: target, regions, changed_at_ns, inputs },
            );
            report.changed_services.push(s.name.clone());
        }
        let index_entries = index_entries(&next, &written_next);
        let placed = if !self.ready || !same_entries(&index_entries, &self.index_entries) {
            Some(service_index::place(&index_entries)?)
        } else {
            None
        };

        // Step 1: backend entries.
        for (id, entry) in &entries {
            if self.written_backends.get(id) == Some(entry) {
                continue;
            }
            if !self.written_backends.contains_key(id) {
                self.dataplane.maps().reset_backend_stats(*id)?;
            }
            self.dataplane.maps().set_backend(*id, entry)?;
            self.written_backends.insert(*id, *entry);
            report.backend_writes += 1;
        }
        // Step 2: Maglev regions.
        for id in &new_services {
            self.dataplane.maps().reset_service_stats(*id)?;
        }
        for (id, half, writes) in region_writes {
            report.maglev_writes += self.dataplane.maps().set_maglev_entries(id, half, writes)?;
        }
        // Step 3: the index half and the flip.
        if let Some(placed) = placed {
            self.write_index(&placed)?;
            self.index_entries = index_entries;
            report.index_flipped = true;
        }
        // Step 4: what is gone.
        let gone: Vec<u32> = self.written_backends.keys().filter(|id| !entries.contains_key(id)).copied().collect();
        for id in gone {
            self.dataplane.maps().set_backend(id, &BackendEntry::default())?;
            self.written_backends.remove(&id);
        }
        for (key, old) in &self.desired {
            if !next.contains_key(key) {
                report.removed_services.push(old.name.clone());
            }
        }
        self.desired = next;
        self.written = written_next;
        Ok(report)
    }

    fn write_index(&mut self, placed: &service_index::Placed) -> Result<(), DirectorError> {
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
        // The attachment fields belong to the dataplane; keep whatever is there.
        let current = self.dataplane.maps().globals()?;
        let staged = mim_lb_common::Globals {
            gateway_mac: self.gateway_mac,
            flags: if self.ready { GLOBALS_F_READY } else { 0 },
            active_services: self.index_active,
            service_seeds: seeds,
            abi_version: ABI_VERSION,
            ..current
        };
        // The seed of the half being switched to is written before the switch itself, and the
        // switch is a write that changes no other word.
        self.dataplane.maps().set_globals(&staged)?;
        self.dataplane.maps().set_globals(&mim_lb_common::Globals {
            flags: GLOBALS_F_READY,
            active_services: half,
            ..staged
        })?;
        self.index_active = half;
        self.index_seeds = seeds;
        self.index_slots[half as usize] = placed_slots;
        self.ready = true;
        Ok(())
    }
}

fn service_flags(scheduler: Scheduler) -> u32 {
    match scheduler {
        Scheduler::Maglev => 0,
        Scheduler::MaglevSource => SERVICE_F_SOURCE_HASH,
    }
}

fn backend_entry(service_id: u32, addr: IpAddr, b: &BackendDesire) -> BackendEntry {
    let (state, _) = b.state();
    let (words, family) = addr_words(addr);
    let mut flags = BACKEND_F_IN_USE;
    if state.keeps_flows() {
        flags |= BACKEND_F_KEEPS_FLOWS;
    }
    BackendEntry {
        mac: b.mac().unwrap_or_default(),
        family,
        _pad0: 0,
        flags,
        service_id,
        state: state.code(),
        addr: words,
        weight: b.weight,
        admin: b.admin.code(),
        health: if b.health_up { HEALTH_UP } else { HEALTH_DOWN },
    }
}

/// The new live table with changed marks: a slot is marked when its master changes while the
/// old one had a master (flows recorded there may be alive), and stays marked until the
/// sweep knows no recorded flow needs it.
fn mark_changed(live: &[u32], built: &[u32]) -> Vec<u32> {
    built
        .iter()
        .enumerate()
        .map(|(slot, &id)| {
            let old = live.get(slot).copied().unwrap_or(0);
            let old_id = old & mim_lb_common::MAGLEV_BACKEND_MASK;
            let changed = old & MAGLEV_SLOT_CHANGED != 0 || (old_id != 0 && old_id != id);
            if changed { id | MAGLEV_SLOT_CHANGED } else { id }
        })
        .collect()
}

/// Service index entries: one per service, plus one VIP marker per (vip, protocol) so that
/// fragments (which carry no port) addressed to a VIP are recognised.
fn index_entries(desired: &Desired, written: &BTreeMap<ServiceKey, WrittenService>) -> Vec<ServiceEntry> {
    let mut entries = Vec::new();
    let mut markers = BTreeSet::new();
    for (key, w) in written {
        if !desired.contains_key(key) {
            continue;
        }
        let (vip, family) = addr_words(key.vip);
        entries.push(ServiceEntry {
            vip,
            port: key.port.to_be(),
            proto: key.protocol.number(),
            family,
            service_id: w.id,
            flags: w.flags,
            table_size: w.table_size,
            active_table: w.active,
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

fn same_entries(a: &[ServiceEntry], b: &[ServiceEntry]) -> bool {
    let key = |e: &ServiceEntry| (e.vip, e.port, e.proto, e.family, e.service_id, e.flags, e.table_size, e.active_table);
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// The Maglev table of `service` as the director builds it: a pure function of its backends'
/// addresses, ids and table weights (weight while up, else 0) and its table size.
pub fn build_table(service: &ServiceDesire) -> Vec<u32> {
    let keys: Vec<Vec<u8>> = service.backends.keys().map(maglev_key).collect();
    let members: Vec<maglev::MaglevBackend> = service
        .backends
        .values()
        .zip(&keys)
        .map(|(b, k)| maglev::MaglevBackend { id: b.id, key: k, weight: b.table_weight() })
        .collect();
    maglev::build(&members, service.table_size)
}

/// A backend's Maglev key: its address octets (4 or 16), so the table depends only on which
/// masters there are and their weights, never on ids or the order of the file: two directors
/// given the same configuration and the same verdicts build the same tables.
pub fn maglev_key(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use mim_lb_common::limits;

    use super::*;

    #[test]
    fn a_slot_that_changes_master_is_marked_and_stays_marked() {
        let live = vec![1, 2, 3, 0];
        let built = vec![1, 3, 3, 2];
        let marked = mark_changed(&live, &built);
        assert_eq!(marked, vec![1, 3 | MAGLEV_SLOT_CHANGED, 3, 2]);
        let again = mark_changed(&marked, &built);
        assert_eq!(again, marked, "marks persist until the sweep clears them");
    }

    #[test]
    fn maglev_limits_are_respected_by_the_map_layout() {
        assert!(limits::maglev_index(limits::MAX_SERVICES - 1, 1, limits::MAGLEV_MAX_TABLE_SIZE - 1) < limits::MAGLEV_MAP_ENTRIES);
    }
}
