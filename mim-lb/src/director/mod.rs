//! The control plane: owns the desired state (configuration + operator commands + health
//! verdicts + resolved MACs), and writes it into the data path so that the program never sees
//! a half-written state and no established flow moves while its master can keep it.
//!
//! Every change goes through one function, [`Director::commit`]: a pure plan
//! ([`plan`]) computes everything that can fail without the kernel (ids, tables, marks, index
//! placement), then the plan is written:
//! 1. backend entries (a new master must exist before a slot names it);
//! 2. old tables of resized services, then each changed service's Maglev table, into the
//!    region the data path is not reading, with slots whose master changed marked
//!    (see [`marks`]) so flows that began on the old master keep it;
//! 3. when a table moved or the service set changed, a complete new half of the service index
//!    (pointing at the new regions), and one word in `GLOBALS` that flips the data path to it;
//! 4. only then are entries of backends that are gone cleared.
//!
//! A write that fails before the flip leaves the data path reading what it read before; the
//! director then forgets what it believed the unread regions hold, so the next commit writes
//! them whole. Once the flip is done, the commit is adopted; clearing what is gone is retried
//! by the next commit if it fails.
//!
//! [`Director::sweep`] later clears the marks no live flow needs any more and lets removed
//! backends go once their last flow has ended.

mod damping;
mod desired;
pub mod digest;
mod ids;
pub mod marks;
pub mod held;
mod plan;
mod recover;
pub mod slow_start;
pub mod shared;

/// Some slots of a service's live table with a word each (its entry, or its `SLOT_SEEN`
/// stamp): (service, table size, [(slot, word)]).
pub type ServiceSlots = (crate::config::ServiceKey, u32, Vec<(u32, u32)>);
pub mod sweep;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

pub use desired::{Admin, BackendDesire, Desired, ServiceDesire, State};
use mim_lb_common::{
    ABI_VERSION, BACKEND_F_IN_USE, BACKEND_F_KEEPS_FLOWS, BackendEntry, GLOBALS_F_READY,
    HEALTH_DOWN, HEALTH_UP, SERVICE_F_SOURCE_HASH, SERVICE_F_VIP_MARKER, ServiceEntry, limits,
};
pub use sweep::{SweepReport, monotonic_ns, read_pinned_flows, record_slot};

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
    #[error(
        "max_services: the maps were sized at start for {room} services, and this configuration needs \
         {needed} at once (a service a reload replaces keeps its room until the new tables are live, \
         so it counts beside its successor); nothing was changed. Restart mim-lb with a larger \
         max_services to grow them (over pinned maps, only after `mim-lb detach`, which loses the \
         recorded flows; see CONFIG.md, max_services)"
    )]
    ServiceRoom { room: u32, needed: usize },
    #[error("no service {0} (give VIP:PORT[/PROTO] or the service's name)")]
    UnknownService(String),
    #[error("service {service} has no backend {backend}")]
    UnknownBackend { service: String, backend: IpAddr },
    #[error(
        "service {service}: table_size or scheduler cannot change again yet: connections begun \
         before its previous change still follow the table from before it. Retry once `mim-lb \
         status` no longer shows the service as resizing (about tcp_idle_timeout_s after the \
         last such connection ends)"
    )]
    ResizeInProgress { service: String },
}

/// What the director has written for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenService {
    pub id: u32,
    /// `SERVICE_F_SOURCE_HASH` or 0: how the live table hashes.
    pub flags: u32,
    pub table_size: u32,
    /// The Maglev region the data path reads (0 or 1).
    pub active: u32,
    /// Contents of both regions as last written (entries with their marks); empty when
    /// unknown (after a restart, or after a write to it failed), and then written whole.
    regions: [Vec<u32>; 2],
    /// When each slot of the live table last changed master and since when it is marked.
    times: marks::SlotTimes,
    /// Marked slots in the live table, so that nothing scans the table to know.
    marked: usize,
    /// Set by a resize until no slot sends unrecorded flows to the old table.
    resized: Option<Resized>,
    /// [`digest::table_digest`] of the live table: equal on two directors that send every
    /// new connection of the service to the same master.
    digest: String,
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

    /// Marked slots in the live table.
    pub fn marked(&self) -> usize {
        self.marked
    }

    /// The digest of the live table's decisions ([`digest::table_digest`]).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The region the data path does not read, if it holds something other than the live
    /// table (or is unknown).
    fn unread_differs(&self) -> bool {
        self.regions[1 - self.active as usize] != self.regions[self.active as usize]
    }

    /// Takes the live region as the kernel holds it (after a write to it failed part-way):
    /// slots found clean lose their mark time, the count follows.
    fn adopt_live_region(&mut self, live: Vec<u32>) {
        for (slot, entry) in live.iter().enumerate() {
            if !marks::is_marked(*entry)
                && let Some(t) = self.times.marked_ns.get_mut(slot)
            {
                *t = 0;
            }
        }
        self.marked = live.iter().filter(|e| marks::is_marked(**e)).count();
        self.regions[self.active as usize] = live;
    }

    /// Whether unrecorded flows of marked slots may still look up the table from before a
    /// resize.
    pub fn resized(&self) -> bool {
        self.resized.is_some()
    }
}

/// The table a resized service had before: its size and hash (`SERVICE_F_SOURCE_HASH` or 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resized {
    pub old_table_size: u32,
    pub old_flags: u32,
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
    /// When each removed backend (by id) began removing: a sweep whose read began earlier
    /// may miss its newest flows.
    removing_since: BTreeMap<u32, u64>,
    /// Services whose unread Maglev region may differ from the live table ([`Director::tidy`]).
    untidy: BTreeSet<ServiceKey>,
    /// The connection table may hold TCP records on clean slots that name another master
    /// (maps taken over from an earlier run, which may predate the rule): the next sweep
    /// checks every record.
    records_unchecked: bool,
    ready: bool,
    /// Peers are configured: the data path reports its changes to `FLOWS` (`GLOBALS_F_SYNC`).
    sync_events: bool,
    /// What the last sweep found: slots live records need marked, by service, and the TCP
    /// idle timeout it judged by. A peer's cleared marks are checked against it.
    last_sweep: Option<(std::collections::HashMap<ServiceKey, BTreeSet<u32>>, std::time::Duration)>,
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
            removing_since: BTreeMap::new(),
            untidy: BTreeSet::new(),
            records_unchecked: false,
            ready: false,
            sync_events: false,
            last_sweep: None,
        }
    }

    /// The source MAC forwarded frames carry.
    pub fn gateway_mac(&self) -> [u8; 6] {
        self.gateway_mac
    }

    /// Uses `mac` as the source MAC of forwarded frames from now on (the interface's address
    /// changed). Written at once if the maps are live.
    pub fn set_gateway_mac(&mut self, mac: [u8; 6]) -> Result<bool, DirectorError> {
        if mac == self.gateway_mac {
            return Ok(false);
        }
        let old = std::mem::replace(&mut self.gateway_mac, mac);
        if self.ready
            && let Err(e) = self.write_globals_identity()
        {
            // Not adopted, so the next call (the daemon checks every second) tries again.
            self.gateway_mac = old;
            return Err(e);
        }
        Ok(true)
    }

    /// Makes `GLOBALS` carry the gateway MAC and this build's ABI version, if it does not
    /// already (after a restart on an interface whose MAC changed, or over maps an older
    /// ABI filled), in one write that changes no other word.
    fn write_globals_identity(&mut self) -> Result<(), DirectorError> {
        let current = self.dataplane.maps().globals()?;
        if current.gateway_mac != self.gateway_mac || current.abi_version != ABI_VERSION {
            let updated = mim_lb_common::Globals { gateway_mac: self.gateway_mac, abi_version: ABI_VERSION, ..current };
            self.dataplane.maps().set_globals(&updated)?;
        }
        Ok(())
    }

    /// Writes `entries` ((slot, entry)) into `service`'s live Maglev region (a single-word write
    /// each: the data path sees the old entry or the new one) and keeps the record in step:
    /// the count of marked slots, and since when each is marked (`now_ns` for one this write
    /// marks). If the write fails part-way, what the data path reads is the truth, and the
    /// record is taken from it before anything is built on it.
    fn write_live_entries(&mut self, service: ServiceKey, entries: &[(u32, u32)], now_ns: u64) -> Result<(), DirectorError> {
        if entries.is_empty() {
            return Ok(());
        }
        let w = self.written.get(&service).expect("callers name a written service");
        let (id, active, size) = (w.id, w.active, w.table_size);
        self.untidy.insert(service);
        if let Err(e) = self.dataplane.maps().set_maglev_entries(id, active, entries.iter().copied()) {
            let live = self.dataplane.maps_ro().maglev_region(id, active, size)?;
            let w = self.written.get_mut(&service).expect("checked above");
            w.adopt_live_region(live);
            for &(slot, _) in entries {
                let i = slot as usize;
                if marks::is_marked(w.regions[active as usize][i]) && w.times.marked_ns[i] == 0 {
                    w.times.marked_ns[i] = now_ns;
                }
            }
            return Err(e.into());
        }
        let w = self.written.get_mut(&service).expect("checked above");
        for &(slot, entry) in entries {
            let i = slot as usize;
            match (marks::is_marked(w.regions[active as usize][i]), marks::is_marked(entry)) {
                (false, true) => {
                    w.marked += 1;
                    w.times.marked_ns[i] = now_ns;
                }
                (true, false) => {
                    w.marked -= 1;
                    w.times.marked_ns[i] = 0;
                }
                _ => {}
            }
            w.regions[active as usize][i] = entry;
        }
        Ok(())
    }

    fn sync_flag(&self) -> u32 {
        if self.sync_events { mim_lb_common::GLOBALS_F_SYNC } else { 0 }
    }

    /// Turns the data path's reports of connection-table changes (for peer directors) on or
    /// off; a flag word of `GLOBALS`, written at once when the maps are ready.
    pub fn set_sync_events(&mut self, on: bool) -> Result<(), DirectorError> {
        self.sync_events = on;
        let current = self.dataplane.maps().globals()?;
        if current.flags & GLOBALS_F_READY != 0 {
            let flags = (current.flags & !mim_lb_common::GLOBALS_F_SYNC) | self.sync_flag();
            if flags != current.flags {
                self.dataplane.maps().set_globals(&mim_lb_common::Globals { flags, ..current })?;
            }
        }
        Ok(())
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
        let room = self.dataplane.service_room();
        let kept = config.services.iter().filter(|s| self.desired.contains_key(&s.key())).count();
        // Services the change leaves written until its flip keep their ids meanwhile.
        let needed = ids.services.used() + config.services.len() - kept;
        let mut next = Desired::new();
        for service in &config.services {
            let key = service.key();
            let old = self.desired.get(&key);
            let id = match old {
                Some(o) => o.id,
                None => ids.services.take().map_err(|_| DirectorError::ServiceRoom { room, needed })?,
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
                        // The neighbour table speaks of addresses, not services: what it said
                        // of this address for another service holds here too, and it will not
                        // say it again for an address it already watches.
                        resolved_mac: self.resolved_mac_of(&b.address),
                        mac_problem: None,
                        health_up: unchecked,
                        health_reason: if unchecked {
                            String::new()
                        } else {
                            format!("new: needs {} passed {} check(s)", service.health.rise, service.health.kind.name())
                        },
                        admin: Admin::Enabled,
                        removing: false,
                        ramp: None,
                        flaps: damping::Flaps::default(),
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
                    slow_start: service.slow_start,
                    flap_damping: service.flap_damping,
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
        let Some(s) = next.get_mut(service) else { return Ok(None) };
        let damping = s.flap_damping;
        let Some(b) = s.backends.get_mut(&backend) else {
            // A report that raced with a reload removing the backend.
            return Ok(None);
        };
        if b.health_up == up {
            return Ok(None);
        }
        b.health_up = up;
        b.health_reason = reason.to_owned();
        let held = b.flaps.record(&damping, sweep::monotonic_ns());
        let change = self.commit(next)?.changes.into_iter().next();
        // Logged once adopted: a failed commit counted nothing.
        if let Some(hold) = held {
            log_hold(service, backend, &hold, &damping);
        }
        Ok(change)
    }

    /// Several health verdicts as one change (the first round after a fresh start). Masters
    /// unknown by now (removed by a reload meanwhile) are skipped.
    pub fn set_health_many(&mut self, verdicts: &[(ServiceKey, IpAddr, bool, String)]) -> Result<Vec<Change>, DirectorError> {
        let mut next = self.desired.clone();
        let mut any = false;
        let now = sweep::monotonic_ns();
        let mut holds = Vec::new();
        for (service, backend, up, reason) in verdicts {
            let Some(s) = next.get_mut(service) else { continue };
            let damping = s.flap_damping;
            if let Some(b) = s.backends.get_mut(backend)
                && b.health_up != *up
            {
                b.health_up = *up;
                b.health_reason = reason.clone();
                if let Some(hold) = b.flaps.record(&damping, now) {
                    holds.push((*service, *backend, hold, damping));
                }
                any = true;
            }
        }
        if !any {
            return Ok(Vec::new());
        }
        let changes = self.commit(next)?.changes;
        for (service, backend, hold, damping) in holds {
            log_hold(&service, backend, &hold, &damping);
        }
        Ok(changes)
    }

    /// When [`Director::on_timer`] has something to do (`CLOCK_MONOTONIC` ns): the next step of
    /// a slow start, or the end of a hold.
    pub fn next_timer_ns(&self) -> Option<u64> {
        let releases = self
            .desired
            .values()
            .flat_map(|s| s.backends.values().filter_map(move |b| b.flaps.release_at(&s.flap_damping)));
        desired::next_ramp_change_ns(&self.desired).into_iter().chain(releases).min()
    }

    /// Ends the holds that are due and moves every slow start on to the step its time gives,
    /// in one commit. Returns the backends whose step changed, with their new step (`None`:
    /// at full weight).
    pub fn on_timer(&mut self) -> Result<Vec<(ServiceKey, IpAddr, Option<slow_start::Ramp>)>, DirectorError> {
        let before = self.desired.clone();
        let now = sweep::monotonic_ns();
        let mut next = self.desired.clone();
        let mut released = Vec::new();
        for (key, s) in next.iter_mut() {
            for (addr, b) in s.backends.iter_mut() {
                if b.flaps.release_if_due(&s.flap_damping, now) {
                    released.push((*key, *addr, b.flaps.penalty(&s.flap_damping, now)));
                }
            }
        }
        let report = self.commit(next)?;
        for (key, addr, penalty) in released {
            log::info!("backend {addr} of {key}: released from its flap damping hold ({penalty} health changes in the window now)");
        }
        for change in &report.changes {
            log::info!("{change}");
        }
        let mut stepped = Vec::new();
        for (key, s) in &self.desired {
            for (addr, b) in &s.backends {
                let old = before.get(key).and_then(|o| o.backends.get(addr)).and_then(|o| o.ramp);
                if old.map(|r| r.step) != b.ramp.map(|r| r.step) {
                    stepped.push((*key, *addr, b.ramp));
                }
            }
        }
        Ok(stepped)
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

    /// Brings the region each service's data path does not read up to date with the live
    /// table. A change writes into that region, and writes only the slots where it differs
    /// from the new table: after this, the next change (a failover, usually, with clients
    /// waiting) writes its own slots only, not those of the change before too. Nothing reads
    /// the region meanwhile, so the daemon calls this after each event, outside any change.
    /// Returns the entries written. A failed write leaves the region unknown (written whole
    /// by the next change).
    pub fn tidy(&mut self) -> usize {
        let mut written = 0;
        for key in std::mem::take(&mut self.untidy) {
            let Some(w) = self.written.get(&key).filter(|w| w.unread_differs()) else { continue };
            let unread = 1 - w.active;
            let previous = &w.regions[unread as usize];
            let writes: Vec<(u32, u32)> = w
                .table()
                .iter()
                .enumerate()
                .filter(|(slot, v)| previous.get(*slot) != Some(*v))
                .map(|(slot, v)| (slot as u32, *v))
                .collect();
            let id = w.id;
            let result = self.dataplane.maps().set_maglev_entries(id, unread, writes.iter().copied());
            let w = self.written.get_mut(&key).expect("listed above");
            match result {
                Ok(n) => {
                    written += n;
                    w.regions[unread as usize] = w.regions[w.active as usize].clone();
                }
                Err(e) => {
                    log::warn!("bringing the unread Maglev region of {key} up to date (the next change writes it whole): {e}");
                    w.regions[unread as usize] = Vec::new();
                    self.untidy.insert(key);
                }
            }
        }
        written
    }

    /// The MAC the neighbour table gave for `address`, for any backend at that address.
    fn resolved_mac_of(&self, address: &IpAddr) -> Option<[u8; 6]> {
        self.desired.values().filter_map(|s| s.backends.get(address)).find_map(|b| b.resolved_mac)
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
        let mut pools = ids::Pools::new(self.dataplane.service_room());
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
            // A marked slot sends flows that began before its change to its previous master
            // by id: that id must not name another backend while the mark lasts.
            for e in w.table().iter().filter(|e| marks::is_marked(**e)) {
                let prev = mim_lb_common::maglev_prev(*e);
                if prev != 0 {
                    pools.backends.reserve(prev);
                }
            }
        }
        for id in self.written_backends.keys() {
            pools.backends.reserve(*id);
        }
        pools
    }

    /// Makes the data path match `next`, then adopts it as the desired state. On an error
    /// nothing was adopted and the data path reads what it read before.
    fn commit(&mut self, mut next: Desired) -> Result<ApplyReport, DirectorError> {
        let now = sweep::monotonic_ns();
        desired::stamp_slow_starts(&self.desired, &mut next, now);
        let mut plan = self.plan(&next, now)?;
        let mut counts = ApplyReport::default();
        let backends_before = self.written_backends.clone();
        if let Err(e) = self.write_before_flip(&plan, &mut counts) {
            self.undo_before_flip(&plan, &backends_before);
            return Err(e);
        }
        if let Some((entries, placed)) = plan.index.take() {
            if let Err(e) = self.write_index(&placed) {
                self.undo_before_flip(&plan, &backends_before);
                return Err(e);
            }
            self.index_entries = entries;
            plan.report.index_flipped = true;
        }
        let mut report = ApplyReport { maglev_writes: counts.maglev_writes, backend_writes: counts.backend_writes, ..plan.report };
        for (key, old) in &self.desired {
            if !next.contains_key(key) {
                report.removed_services.push(old.name.clone());
            }
        }
        for s in next.values() {
            for b in s.backends.values().filter(|b| b.removing) {
                self.removing_since.entry(b.id).or_insert(now);
            }
        }
        let removing: BTreeSet<u32> =
            next.values().flat_map(|s| s.backends.values()).filter(|b| b.removing).map(|b| b.id).collect();
        self.removing_since.retain(|id, _| removing.contains(id));
        self.desired = next;
        self.written = plan.written;
        self.untidy.extend(plan.region_writes.iter().map(|w| w.key));
        // The flip is done: what follows only tidies up, and is retried by the next commit.
        if let Err(e) = self.clear_gone_backends(&plan.entries) {
            log::warn!("clearing entries of backends that are gone (retried on the next change): {e}");
        }
        if let Err(e) = self.write_globals_identity() {
            log::warn!("writing the gateway MAC (retried on the next change): {e}");
        }
        Ok(report)
    }

    /// Steps 1 and 2: backend entries, old tables, Maglev regions the data path is not reading.
    /// Counts what it writes into `counts` (`maglev_writes`, `backend_writes`).
    fn write_before_flip(&mut self, plan: &plan::Plan, counts: &mut ApplyReport) -> Result<(), DirectorError> {
        for (id, entry) in &plan.entries {
            if self.written_backends.get(id) == Some(entry) {
                continue;
            }
            if !self.written_backends.contains_key(id) {
                self.dataplane.maps().reset_backend_stats(*id)?;
            }
            self.dataplane.maps().set_backend(*id, entry)?;
            self.written_backends.insert(*id, *entry);
            counts.backend_writes += 1;
        }
        for id in &plan.new_services {
            self.dataplane.maps().reset_service_stats(*id)?;
        }
        for (id, owners) in &plan.old_tables {
            self.dataplane.maps().set_maglev_old(*id, owners)?;
        }
        for w in &plan.region_writes {
            counts.maglev_writes += self.dataplane.maps().set_maglev_entries(w.id, w.half, w.writes.iter().copied())?;
        }
        Ok(())
    }

    /// After a failed write before the flip: backend entries the data path reads go back to
    /// what they were (entries of new ids are not read: no table names them yet), and the
    /// regions the plan wrote into may hold anything, so the next commit writes them whole
    /// instead of only what it believes changed.
    fn undo_before_flip(&mut self, plan: &plan::Plan, backends_before: &BTreeMap<u32, BackendEntry>) {
        for (id, before) in backends_before {
            if self.written_backends.get(id) != Some(before) {
                match self.dataplane.maps().set_backend(*id, before) {
                    Ok(()) => {
                        self.written_backends.insert(*id, *before);
                    }
                    // What is written stays recorded as written, so the next commit fixes it.
                    Err(e) => log::warn!("restoring backend entry {id} after a failed change: {e}"),
                }
            }
        }
        self.forget_unread_regions(plan);
    }

    /// The regions the plan wrote into may hold anything, so the next commit writes them
    /// whole instead of only what it believes changed.
    fn forget_unread_regions(&mut self, plan: &plan::Plan) {
        for w in &plan.region_writes {
            if let Some(old) = self.written.get_mut(&w.key)
                && old.id == w.id
                && old.active != w.half
            {
                old.regions[w.half as usize] = Vec::new();
                self.untidy.insert(w.key);
            }
        }
    }

    /// Step 4: clears the entries of backends the data path can no longer reach.
    fn clear_gone_backends(&mut self, entries: &BTreeMap<u32, BackendEntry>) -> Result<(), DirectorError> {
        let gone: Vec<u32> = self.written_backends.keys().filter(|id| !entries.contains_key(id)).copied().collect();
        for id in gone {
            self.dataplane.maps().set_backend(id, &BackendEntry::default())?;
            self.written_backends.remove(&id);
        }
        Ok(())
    }

    /// Writes a new half of the service index and flips the data path to it. If a write
    /// fails, the half's contents are unknown: the next write clears every slot of it.
    fn write_index(&mut self, placed: &service_index::Placed) -> Result<(), DirectorError> {
        let result = self.write_index_half(placed);
        if result.is_err() {
            let half = 1 - self.index_active;
            self.index_slots[half as usize] = (0..limits::SERVICE_SLOTS).collect();
        }
        result
    }

    fn write_index_half(&mut self, placed: &service_index::Placed) -> Result<(), DirectorError> {
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
            flags: if self.ready { GLOBALS_F_READY | self.sync_flag() } else { 0 },
            active_services: self.index_active,
            service_seeds: seeds,
            abi_version: ABI_VERSION,
            ..current
        };
        // The seed of the half being switched to is written before the switch itself, and the
        // switch is a write that changes no other word.
        self.dataplane.maps().set_globals(&staged)?;
        let flags = GLOBALS_F_READY | self.sync_flag();
        self.dataplane.maps().set_globals(&mim_lb_common::Globals {
            flags,
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

/// The log line of a hold that began.
fn log_hold(service: &ServiceKey, address: IpAddr, hold: &damping::Hold, damping: &crate::config::FlapDamping) {
    log::warn!(
        "backend {address} of {service}: held down for flapping: its health changed more than {} times within {} s \
         (held at least {} s, then until calm)",
        hold.max_changes,
        hold.window_s,
        damping.hold.as_secs()
    );
}

pub(super) fn service_flags(scheduler: Scheduler) -> u32 {
    match scheduler {
        Scheduler::Maglev => 0,
        Scheduler::MaglevSource => SERVICE_F_SOURCE_HASH,
    }
}

/// The entry the data path reads for a backend. A backend whose MAC is unknown keeps the MAC
/// it was last written with (or none), never the zero MAC: its state is down, so no new flow
/// goes to it, and packets still in flight before the table flip that removes it go where it
/// was.
pub(super) fn backend_entry(service_id: u32, addr: IpAddr, b: &BackendDesire, last_mac: Option<[u8; 6]>) -> BackendEntry {
    let (state, _) = b.state();
    let (words, family) = addr_words(addr);
    let mut flags = BACKEND_F_IN_USE;
    if state.keeps_flows() {
        flags |= BACKEND_F_KEEPS_FLOWS;
    }
    BackendEntry {
        mac: b.mac().or(last_mac).unwrap_or_default(),
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

/// Service index entries: one per service, plus one VIP marker per (vip, protocol) so that
/// fragments (which carry no port) addressed to a VIP are recognised. Where a (vip, protocol)
/// has a single service and it hashes the client address only, the marker carries that
/// service's table (port 0), so a fragment that overtook its first fragment can be placed by
/// its source (`SERVICE_F_VIP_MARKER`).
pub(super) fn index_entries(desired: &Desired, written: &BTreeMap<ServiceKey, WrittenService>) -> Vec<ServiceEntry> {
    let mut entries = Vec::new();
    let mut by_vip: BTreeMap<(IpAddr, u8), Vec<ServiceEntry>> = BTreeMap::new();
    for (key, w) in written {
        if !desired.contains_key(key) {
            continue;
        }
        let (vip, family) = addr_words(key.vip);
        let (resized_flags, old_table_size) = plan::resized_fields(w.resized);
        let entry = ServiceEntry {
            vip,
            port: key.port.to_be(),
            proto: key.protocol.number(),
            family,
            service_id: w.id,
            flags: w.flags | resized_flags,
            table_size: w.table_size,
            active_table: w.active,
            old_table_size,
        };
        entries.push(entry);
        by_vip.entry((key.vip, key.protocol.number())).or_default().push(entry);
    }
    for services in by_vip.values() {
        entries.push(vip_marker(services));
    }
    entries
}

/// The marker of the services of one (vip, protocol).
fn vip_marker(services: &[ServiceEntry]) -> ServiceEntry {
    match services {
        [only] if only.flags & SERVICE_F_SOURCE_HASH != 0 => {
            ServiceEntry { port: 0, flags: only.flags | SERVICE_F_VIP_MARKER, ..*only }
        }
        _ => ServiceEntry {
            vip: services[0].vip,
            port: 0,
            proto: services[0].proto,
            family: services[0].family,
            flags: SERVICE_F_VIP_MARKER,
            ..ServiceEntry::default()
        },
    }
}

pub(super) fn same_entries(a: &[ServiceEntry], b: &[ServiceEntry]) -> bool {
    let key = |e: &ServiceEntry| {
        (e.vip, e.port, e.proto, e.family, e.service_id, e.flags, e.table_size, e.active_table, e.old_table_size)
    };
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

    #[test]
    fn maglev_limits_are_respected_by_the_map_layout() {
        assert!(limits::maglev_index(limits::MAX_SERVICES - 1, 1, limits::MAGLEV_MAX_TABLE_SIZE - 1) < limits::MAGLEV_MAP_ENTRIES);
        for room in 1..=limits::MAX_SERVICES {
            // The last slot of the last service's second region is the map's last entry.
            let last = limits::maglev_index(room - 1, 1, limits::MAGLEV_MAX_TABLE_SIZE - 1);
            assert_eq!(last + 1, limits::maglev_map_entries(room));
            assert_eq!(limits::slot_index(room - 1, limits::MAGLEV_MAX_TABLE_SIZE - 1) + 1, limits::slot_map_entries(room));
        }
    }
}
