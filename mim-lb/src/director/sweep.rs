//! The sweep: reads the connection table and retires what no live flow needs any more.
//!
//! Three things wait on the flows:
//! - a marked Maglev slot (see [`super::marks`]) keeps its mark while some live flow on it is
//!   not on the slot's master: a recorded one (found in the connection table) or an unrecorded
//!   one going to the slot's previous master (the data path stamps `SLOT_SEEN` for those);
//! - a resized service keeps its old table while any slot still sends flows there;
//! - a backend removed from the configuration is kept (draining) while live flows use it;
//!   after its last one it is removed for good and its records deleted.
//!
//! The connection table is read on another thread while commits go on, so the sweep only
//! decides what that read can speak for: a slot whose master changed after the read began, or
//! a backend removed after it began, waits for the next sweep.
//!
//! A flow is live if it was seen within the idle timeout of its protocol. The data path
//! refreshes `last_seen_ns` only when it looks the record up (at most once a second), which TCP
//! does on marked slots only, so a record counts as seen when its slot was marked: it gets one
//! full timeout to show itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::Duration,
};

use mim_lb_common::{FlowEntry, FlowKey, PROTO_TCP, SERVICE_F_SOURCE_HASH, hash};

use super::{Director, DirectorError, ServiceSlots, WrittenService, marks};
use crate::config::ServiceKey;

/// Reads every recorded flow from the pinned connection table at `path`, with a map fd of its
/// own, so that it can run on a thread of its own while the event loop goes on.
pub fn read_pinned_flows(path: &std::path::Path) -> Result<Vec<(FlowKey, FlowEntry)>, aya::maps::MapError> {
    crate::dataplane::maps::read_flows_from_pin(path)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into `ts`, which lives for the call; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Recorded flows looked at (0 when there was nothing to wait for).
    pub flows_seen: usize,
    pub live_flows: usize,
    pub marks_cleared: usize,
    /// The marks cleared, as they were: (service, table size, [(slot, entry)]), for peers.
    pub cleared: Vec<ServiceSlots>,
    /// Removed backends whose last flow ended: (service, address).
    pub backends_retired: Vec<(ServiceKey, std::net::IpAddr)>,
    pub flows_deleted: usize,
}

/// The Maglev slot a recorded flow hashes to in `service`'s current table: what the data path
/// computes, recomputed here so that it stays right after a table resize.
pub fn record_slot(service: &WrittenService, key: &FlowKey) -> u32 {
    let h = if service.flags & SERVICE_F_SOURCE_HASH != 0 {
        hash::source_hash(key.family, &key.src)
    } else {
        hash::flow_hash(key.family, &key.src, &key.dst, key.sport, key.dport, key.proto)
    };
    hash::table_slot(h, service.table_size)
}

/// How much older than its last packet a record's `last_seen_ns` can be: the data path
/// refreshes it at most once a second, from a clock of the kernel tick's resolution.
pub(super) const REFRESH_SLACK: Duration = Duration::from_secs(2);

/// Whether a flow counts as live at `now_ns`, given that it could not refresh its record
/// before `grace_from_ns`.
pub(super) fn is_live(flow: &FlowEntry, grace_from_ns: u64, now_ns: u64, idle: Duration) -> bool {
    let seen = flow.last_seen_ns.max(grace_from_ns);
    now_ns.saturating_sub(seen) < (idle + REFRESH_SLACK).as_nanos() as u64
}

/// What the recorded flows say, by service.
#[derive(Default)]
pub(super) struct LiveFlows {
    /// Slots that must stay marked: a live TCP record names another master that keeps flows.
    pub(super) needed: HashMap<ServiceKey, BTreeSet<u32>>,
    /// Backends with a live record.
    in_use: HashSet<u32>,
    /// Every record, by backend, to delete those of retired backends.
    records_of: HashMap<u32, Vec<FlowKey>>,
    /// TCP records naming another master than their slot's, live or not, by service and
    /// slot: a clean slot must hold none (see [`Director::clean_records`]).
    disagreeing: HashMap<ServiceKey, BTreeMap<u32, Vec<FlowKey>>>,
    /// Records of services that are gone: nothing reads them, and a service id given to a
    /// new service must not inherit them.
    orphans: Vec<FlowKey>,
    live: usize,
}

impl Director {
    /// Whether a sweep has anything to do: marked slots, resized services or backends waiting
    /// to be retired. Kept counts, no scan.
    pub fn sweep_pending(&self) -> bool {
        self.written.values().any(|w| w.marked > 0 || w.resized.is_some())
            || !self.removing_since.is_empty()
            || self.records_unchecked
    }

    /// Clears marks no live flow needs and retires removed backends without live flows.
    pub fn sweep(&mut self, now_ns: u64, tcp_idle: Duration, udp_idle: Duration) -> Result<SweepReport, DirectorError> {
        if !self.sweep_pending() {
            return Ok(SweepReport::default());
        }
        let flows = self.dataplane.maps_ro().flows()?;
        self.sweep_with(&flows, now_ns, tcp_idle, udp_idle)
    }

    /// [`Director::sweep`] on a copy of the connection table whose read began at `read_ns`
    /// (taken as the time of the sweep). Reading a large table takes a while, so the daemon
    /// reads it on another thread and hands the copy here.
    pub fn sweep_with(
        &mut self,
        flows: &[(FlowKey, FlowEntry)],
        read_ns: u64,
        tcp_idle: Duration,
        udp_idle: Duration,
    ) -> Result<SweepReport, DirectorError> {
        let mut report = SweepReport { flows_seen: flows.len(), ..SweepReport::default() };
        if !self.sweep_pending() {
            return Ok(report);
        }
        let live = self.live_flows(flows, read_ns, tcp_idle, udp_idle);
        report.live_flows = live.live;
        report.cleared = self.clear_marks(&live.needed, read_ns, tcp_idle)?;
        self.last_sweep = Some((live.needed.clone(), tcp_idle));
        report.marks_cleared = report.cleared.iter().map(|c| c.2.len()).sum();
        report.flows_deleted += self.clean_records(&live, read_ns)?;
        self.end_resizes()?;
        let (retired, deleted) = self.retire(&live, read_ns)?;
        report.backends_retired = retired;
        report.flows_deleted += deleted;
        Ok(report)
    }

    pub(super) fn live_flows(&self, flows: &[(FlowKey, FlowEntry)], read_ns: u64, tcp_idle: Duration, udp_idle: Duration) -> LiveFlows {
        let by_id: HashMap<u32, ServiceKey> = self.written.iter().map(|(k, w)| (w.id, *k)).collect();
        let keeps: HashSet<u32> = self
            .desired
            .values()
            .flat_map(|s| s.backends.values())
            .filter(|b| b.state().0.keeps_flows())
            .map(|b| b.id)
            .collect();
        let mut live = LiveFlows::default();
        for (key, flow) in flows {
            live.records_of.entry(flow.backend_id).or_default().push(*key);
            let Some(service) = by_id.get(&flow.service_id) else {
                live.orphans.push(*key);
                continue;
            };
            let written = &self.written[service];
            let slot = record_slot(written, key);
            let owner = written.table().get(slot as usize).map_or(0, |e| marks::owner(*e));
            if key.proto == PROTO_TCP && owner != flow.backend_id {
                live.disagreeing.entry(*service).or_default().entry(slot).or_default().push(*key);
            }
            let grace = written.times.marked_ns.get(slot as usize).copied().unwrap_or(0);
            let idle = if key.proto == PROTO_TCP { tcp_idle } else { udp_idle };
            if !is_live(flow, grace, read_ns, idle) {
                continue;
            }
            live.live += 1;
            live.in_use.insert(flow.backend_id);
            // UDP looks its record up on every datagram, marked slot or not; a flow on a master
            // that no longer keeps flows is re-steered whichever way its packets go.
            if key.proto == PROTO_TCP && owner != flow.backend_id && keeps.contains(&flow.backend_id) {
                live.needed.entry(*service).or_default().insert(slot);
            }
        }
        live
    }

    /// Clears the marks [`marks::may_clear`] allows. Clearing a mark in the live region is a
    /// single-word write: the data path sees either the marked or the clean entry, and both
    /// send every live flow of the slot to the same master.
    fn clear_marks(
        &mut self,
        needed: &HashMap<ServiceKey, BTreeSet<u32>>,
        read_ns: u64,
        tcp_idle: Duration,
    ) -> Result<Vec<ServiceSlots>, DirectorError> {
        let mut cleared = Vec::new();
        let keys: Vec<ServiceKey> = self.written.iter().filter(|(_, w)| w.marked > 0).map(|(k, _)| *k).collect();
        for key in keys {
            let w = &self.written[&key];
            let keep = needed.get(&key);
            // Only slots every other condition allows are looked up in SLOT_SEEN (a stamp of 0,
            // "never", is no obstacle).
            let candidates: Vec<u32> = (0..w.table().len() as u32)
                .filter(|&slot| marks::may_clear(&self.slot_facts(w, slot, keep, 0), read_ns, tcp_idle))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let seen = self.dataplane.maps_ro().slot_seen(w.id, w.table_size)?;
            let clear: Vec<(u32, u32)> = candidates
                .into_iter()
                .filter(|&slot| marks::may_clear(&self.slot_facts(w, slot, keep, seen[slot as usize]), read_ns, tcp_idle))
                .map(|slot| (slot, marks::owner(w.table()[slot as usize])))
                .collect();
            if clear.is_empty() {
                continue;
            }
            let before: Vec<(u32, u32)> = clear.iter().map(|&(slot, _)| (slot, w.table()[slot as usize])).collect();
            let size = w.table_size;
            self.write_live_entries(key, &clear, read_ns)?;
            cleared.push((key, size, before));
        }
        Ok(cleared)
    }

    /// Keeps the rule a SYN on a clean slot relies on (it neither looks records up nor
    /// deletes them): every TCP record on a clean slot names the slot's master. Such a
    /// record, even one an earlier connection on the same addresses and ports left, names the
    /// master the slot gives every new connection for as long as the slot stays clean, which
    /// is where a later change's mark sends unrecorded flows too. The sweep deletes the TCP
    /// records of clean slots that name another master: a mark is cleared only when none of
    /// them is live and keeps flows (the others move to the slot's master at their next packet
    /// anyway). Slots whose master changed after the read began are left to the next sweep, as
    /// are records made since (they name the master of their moment, which is the slot's).
    /// Records of services that are gone go too.
    fn clean_records(&mut self, live: &LiveFlows, read_ns: u64) -> Result<usize, DirectorError> {
        let mut doomed: Vec<FlowKey> = live.orphans.clone();
        for (key, slots) in &live.disagreeing {
            let Some(w) = self.written.get(key) else { continue };
            for (slot, keys) in slots {
                let i = *slot as usize;
                let clean = w.table().get(i).is_some_and(|e| !marks::is_marked(*e));
                let settled = w.times.changed_ns.get(i).is_some_and(|t| *t < read_ns);
                if clean && settled {
                    doomed.extend(keys);
                }
            }
        }
        if doomed.is_empty() {
            self.records_unchecked = false;
            return Ok(0);
        }
        // Until they are gone, the next sweep checks again.
        self.records_unchecked = true;
        let deleted = self.dataplane.maps().delete_flows(doomed.iter())?;
        self.records_unchecked = false;
        Ok(deleted)
    }

    pub(super) fn slot_facts(&self, w: &WrittenService, slot: u32, keep: Option<&BTreeSet<u32>>, seen: u32) -> marks::SlotFacts {
        let i = slot as usize;
        marks::SlotFacts {
            entry: w.table()[i],
            changed_ns: w.times.changed_ns.get(i).copied().unwrap_or(u64::MAX),
            marked_ns: w.times.marked_ns.get(i).copied().unwrap_or(u64::MAX),
            needed_by_record: keep.is_some_and(|k| k.contains(&slot)),
            seen,
        }
    }

    /// A resized service whose marked slots all name a previous master (or are clean) sends no
    /// flow to its old table any more: the index entry drops the old table.
    fn end_resizes(&mut self) -> Result<(), DirectorError> {
        let mut ended = Vec::new();
        for (key, w) in self.written.iter_mut() {
            if w.resized.is_some() && !w.table().iter().any(|e| marks::is_marked(*e) && mim_lb_common::maglev_prev(*e) == 0) {
                ended.push((*key, w.resized.take()));
            }
        }
        if ended.is_empty() {
            return Ok(());
        }
        // Inputs are unchanged, so the commit only rewrites the index. If it fails, the index
        // still names the old tables, and so must the record.
        if let Err(e) = self.commit(self.desired.clone()) {
            for (key, resized) in ended {
                if let Some(w) = self.written.get_mut(&key) {
                    w.resized = resized;
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Retires removed backends that no live flow uses: none recorded, none on a marked slot
    /// that remembers it as its previous master, and none the read could have missed.
    fn retire(&mut self, live: &LiveFlows, read_ns: u64) -> Result<(Vec<(ServiceKey, std::net::IpAddr)>, usize), DirectorError> {
        let mut next = self.desired.clone();
        let mut retired = Vec::new();
        let mut retired_ids = Vec::new();
        for (key, s) in next.iter_mut() {
            let Some(w) = self.written.get(key) else { continue };
            let remembered: HashSet<u32> = w
                .table()
                .iter()
                .filter(|e| marks::is_marked(**e))
                .map(|e| mim_lb_common::maglev_prev(*e))
                .collect();
            let resized = w.resized.is_some();
            s.backends.retain(|addr, b| {
                let unused = !live.in_use.contains(&b.id)
                    && !remembered.contains(&b.id)
                    && !resized
                    && self.removing_since.get(&b.id).is_some_and(|since| *since < read_ns);
                let retire = b.removing && (unused || !b.state().0.keeps_flows());
                if retire {
                    retired.push((*key, *addr));
                    retired_ids.push(b.id);
                }
                !retire
            });
        }
        if retired_ids.is_empty() {
            return Ok((retired, 0));
        }
        self.commit(next)?;
        let doomed: Vec<FlowKey> = retired_ids.iter().filter_map(|id| live.records_of.get(id)).flatten().copied().collect();
        let deleted = self.dataplane.maps().delete_flows(doomed.iter())?;
        Ok((retired, deleted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(last_seen_ns: u64) -> FlowEntry {
        FlowEntry { backend_id: 1, service_id: 0, slot: 0, flags: 0, last_seen_ns }
    }

    #[test]
    fn a_flow_is_live_for_one_timeout_after_it_was_seen_or_its_slot_was_marked() {
        let idle = Duration::from_secs(10);
        let s = 1_000_000_000u64;
        assert!(is_live(&flow(100 * s), 0, 105 * s, idle));
        // A busy flow's record lags its last packet by up to the refresh slack.
        assert!(is_live(&flow(100 * s), 0, 111 * s, idle));
        assert!(!is_live(&flow(100 * s), 0, 112 * s, idle));
        // Recorded long ago, but its slot was marked recently: it gets a full timeout.
        assert!(is_live(&flow(10 * s), 100 * s, 105 * s, idle));
        assert!(!is_live(&flow(10 * s), 100 * s, 112 * s, idle));
        // A clock reading before the record (another CPU's later write) is not an underflow.
        assert!(is_live(&flow(100 * s), 0, 99 * s, idle));
    }
}
