//! Deciding what a commit writes, without touching the kernel: everything that can fail for a
//! reason other than a map write fails here, before anything is written.

use std::{collections::BTreeMap, net::IpAddr};

use mim_lb_common::{BackendEntry, SERVICE_F_SOURCE_HASH, ServiceEntry};

use super::{
    ApplyReport, Change, Desired, Director, DirectorError, Resized, ServiceDesire, WrittenService,
    backend_entry, build_table, index_entries, marks, same_entries, service_flags,
};
use crate::{config::ServiceKey, dataplane::service_index};

/// Writes into one Maglev region of one service.
pub(super) struct RegionWrite {
    pub key: ServiceKey,
    pub id: u32,
    pub half: u32,
    /// (slot, entry) pairs.
    pub writes: Vec<(u32, u32)>,
}

/// Everything one commit writes, in the order it is written.
pub(super) struct Plan {
    /// Every backend entry the data path should hold, by id.
    pub entries: BTreeMap<u32, BackendEntry>,
    pub new_services: Vec<u32>,
    /// Tables from before a resize, for `MAGLEV_OLD`: (service id, master per slot).
    pub old_tables: Vec<(u32, Vec<u32>)>,
    pub region_writes: Vec<RegionWrite>,
    /// A new live half of the service index, when the entries changed.
    pub index: Option<(Vec<ServiceEntry>, service_index::Placed)>,
    /// What the director will have written once the plan is carried out.
    pub written: BTreeMap<ServiceKey, WrittenService>,
    pub report: ApplyReport,
}

impl Director {
    /// What making the data path match `next` at `now_ns` takes.
    pub(super) fn plan(&self, next: &Desired, now_ns: u64) -> Result<Plan, DirectorError> {
        let mut plan = Plan {
            entries: BTreeMap::new(),
            new_services: Vec::new(),
            old_tables: Vec::new(),
            region_writes: Vec::new(),
            index: None,
            written: BTreeMap::new(),
            report: ApplyReport::default(),
        };
        for (key, s) in next {
            for (addr, b) in &s.backends {
                let last_mac = self.written_backends.get(&b.id).map(|e| e.mac).filter(|m| *m != [0; 6]);
                plan.entries.insert(b.id, backend_entry(s.id, *addr, b, last_mac));
                let (to, reason) = b.state();
                let from = self.desired.get(key).and_then(|o| o.backends.get(addr)).map(|o| o.state().0);
                if let Some(from) = from
                    && from != to
                {
                    plan.report.changes.push(Change { service: *key, backend: *addr, from, to, reason });
                }
            }
        }
        for (key, s) in next {
            self.plan_service(key, s, now_ns, &mut plan)?;
        }
        let entries = index_entries(next, &plan.written);
        if !self.ready || !same_entries(&entries, &self.index_entries) {
            let placed = service_index::place(&entries)?;
            plan.index = Some((entries, placed));
        }
        Ok(plan)
    }

    /// Plans one service's table: kept when its inputs did not change, else rebuilt, with the
    /// slots whose master changed marked, written into the region the data path is not reading.
    fn plan_service(&self, key: &ServiceKey, s: &ServiceDesire, now_ns: u64, plan: &mut Plan) -> Result<(), DirectorError> {
        let flags = service_flags(s.scheduler);
        let inputs: Vec<(IpAddr, u32, u32)> = s.backends.iter().map(|(addr, b)| (*addr, b.id, b.table_weight())).collect();
        let old = self.written.get(key).filter(|o| o.id == s.id);
        if let Some(old) = old.filter(|o| o.table_size == s.table_size && o.flags == flags && o.inputs == inputs) {
            // Only what changed is rebuilt: a verdict about one service costs no Maglev build of
            // the others.
            plan.written.insert(*key, old.clone());
            return Ok(());
        }
        let built = build_table(s);
        plan.report.tables_built += 1;
        let (target, table, times, resized) = match old {
            Some(old) if old.table_size == s.table_size && old.flags == flags => {
                let live = old.table();
                let next = marks::next_table(live, &built);
                if next == live {
                    plan.written.insert(*key, WrittenService { inputs, ..old.clone() });
                    return Ok(());
                }
                let times = old.times.after(live, &next, now_ns);
                (1 - old.active, next, times, old.resized)
            }
            // A new size or hash: a flow may now hash to any slot, so every slot is marked and
            // unrecorded flows look up the table they began under. A second resize before the
            // first one is over keeps the first old table, which is right only while every
            // slot still sends its unrecorded flows there (every flow begun since was then
            // recorded); once the sweep has cleared a slot, its unrecorded flows began on the
            // new table, which no single old table can describe, so the change must wait.
            Some(old) => {
                if old.resized.is_some() && old.table().iter().any(|e| !marks::is_marked(*e) || mim_lb_common::maglev_prev(*e) != 0) {
                    return Err(DirectorError::ResizeInProgress { service: s.name.clone() });
                }
                let resized = old.resized.or_else(|| {
                    plan.old_tables.push((s.id, old.table().iter().map(|e| marks::began_on(*e)).collect()));
                    Some(Resized { old_table_size: old.table_size, old_flags: old.flags })
                });
                let next = marks::resized_table(&built);
                let times = marks::SlotTimes::all_at(&next, now_ns);
                (1 - old.active, next, times, resized)
            }
            None => {
                plan.new_services.push(s.id);
                let times = marks::SlotTimes::clean(built.len());
                (0, built, times, None)
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
            plan.region_writes.push(RegionWrite { key: *key, id: s.id, half: 1 - target, writes: writes.clone() });
            regions[(1 - target) as usize] = table.clone();
        }
        plan.region_writes.push(RegionWrite { key: *key, id: s.id, half: target, writes });
        regions[target as usize] = table;
        let marked = regions[target as usize].iter().filter(|e| marks::is_marked(**e)).count();
        let digest = service_digest(s, &regions[target as usize], flags);
        plan.written.insert(
            *key,
            WrittenService { id: s.id, flags, table_size: s.table_size, active: target, regions, times, marked, resized, digest, inputs },
        );
        plan.report.changed_services.push(s.name.clone());
        Ok(())
    }
}

/// The digest of `table` as a table of `s`, whose backends name its masters' addresses.
pub(super) fn service_digest(s: &ServiceDesire, table: &[u32], flags: u32) -> String {
    let by_id: std::collections::HashMap<u32, IpAddr> = s.backends.iter().map(|(addr, b)| (b.id, *addr)).collect();
    super::digest::table_digest(table, flags, |id| by_id.get(&id).copied())
}

/// The flags an index entry carries for a resized service, and its old table size.
pub(super) fn resized_fields(resized: Option<Resized>) -> (u32, u32) {
    match resized {
        None => (0, 0),
        Some(r) => {
            let mut flags = mim_lb_common::SERVICE_F_RESIZED;
            if r.old_flags & SERVICE_F_SOURCE_HASH != 0 {
                flags |= mim_lb_common::SERVICE_F_OLD_SOURCE_HASH;
            }
            (flags, r.old_table_size)
        }
    }
}
