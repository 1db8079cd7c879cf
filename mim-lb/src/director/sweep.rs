//! The sweep: reads the connection table and retires what no live flow needs any more.
//!
//! Two things wait on the flows:
//! - a Maglev slot marked `MAGLEV_SLOT_CHANGED` makes every packet on it consult the
//!   connection table, which is only needed while some live flow recorded there sits on
//!   another master than the slot's; once none does, the mark is cleared and established TCP
//!   packets on the slot take the fast path again;
//! - a backend removed from the configuration is kept (draining) while live flows use it;
//!   after its last one it is removed for good and its records deleted.
//!
//! A flow is live if it was seen within the idle timeout of its protocol. The data path
//! refreshes `last_seen_ns` only on marked slots (at most once a second), so a flow recorded
//! before a change counts as seen at the time of the change: it gets one full timeout to show
//! itself.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Duration,
};

use mim_lb_common::{
    FlowEntry, FlowKey, MAGLEV_BACKEND_MASK, MAGLEV_SLOT_CHANGED, PROTO_TCP, SERVICE_F_SOURCE_HASH,
    hash,
};

use super::{Director, DirectorError, WrittenService};
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
    /// Removed backends whose last flow ended: (service, address).
    pub backends_retired: Vec<(ServiceKey, std::net::IpAddr)>,
    pub flows_deleted: usize,
}

/// The Maglev slot a recorded flow hashes to in `service`'s current table: what the data path
/// computes, recomputed here so that it stays right after a table resize.
pub(super) fn flow_slot(service: &WrittenService, key: &FlowKey) -> u32 {
    let h = if service.flags & SERVICE_F_SOURCE_HASH != 0 {
        hash::source_hash(key.family, &key.src)
    } else {
        hash::flow_hash(key.family, &key.src, &key.dst, key.sport, key.dport, key.proto)
    };
    hash::table_slot(h, service.table_size)
}

/// Whether a flow counts as live at `now_ns`.
pub(super) fn is_live(flow: &FlowEntry, changed_at_ns: u64, now_ns: u64, idle: Duration) -> bool {
    let seen = flow.last_seen_ns.max(changed_at_ns);
    now_ns.saturating_sub(seen) < idle.as_nanos() as u64
}

impl Director {
    /// Whether a sweep has anything to do: marked slots or backends waiting to be retired.
    pub fn sweep_pending(&self) -> bool {
        self.written.values().any(|w| w.table().iter().any(|e| e & MAGLEV_SLOT_CHANGED != 0))
            || self.desired.values().any(|s| s.backends.values().any(|b| b.removing))
    }

    /// Clears marks no live flow needs and retires removed backends without live flows.
    pub fn sweep(&mut self, now_ns: u64, tcp_idle: Duration, udp_idle: Duration) -> Result<SweepReport, DirectorError> {
        if !self.sweep_pending() {
            return Ok(SweepReport::default());
        }
        let flows = self.dataplane.maps_ro().flows()?;
        self.sweep_with(&flows, now_ns, tcp_idle, udp_idle)
    }

    /// [`Director::sweep`] on a copy of the connection table read earlier, at `now_ns` or
    /// later. Reading a large table takes seconds of syscalls, so the daemon reads it on
    /// another thread and hands the copy here; a flow recorded since only ever sits on its
    /// slot's current master, which needs no mark.
    pub fn sweep_with(
        &mut self,
        flows: &[(FlowKey, FlowEntry)],
        now_ns: u64,
        tcp_idle: Duration,
        udp_idle: Duration,
    ) -> Result<SweepReport, DirectorError> {
        let mut report = SweepReport { flows_seen: flows.len(), ..SweepReport::default() };
        if !self.sweep_pending() {
            return Ok(report);
        }

        let by_id: HashMap<u32, ServiceKey> = self.written.iter().map(|(k, w)| (w.id, *k)).collect();
        let keeps: HashSet<u32> = self
            .desired
            .values()
            .flat_map(|s| s.backends.values())
            .filter(|b| b.state().0.keeps_flows())
            .map(|b| b.id)
            .collect();
        let mut needed: HashMap<ServiceKey, BTreeSet<u32>> = HashMap::new();
        let mut in_use: HashSet<u32> = HashSet::new();
        let mut records_of: HashMap<u32, Vec<FlowKey>> = HashMap::new();
        for (key, flow) in flows {
            records_of.entry(flow.backend_id).or_default().push(*key);
            let Some(service) = by_id.get(&flow.service_id) else { continue };
            let written = &self.written[service];
            let idle = if key.proto == PROTO_TCP { tcp_idle } else { udp_idle };
            if !is_live(flow, written.changed_at_ns, now_ns, idle) {
                continue;
            }
            report.live_flows += 1;
            in_use.insert(flow.backend_id);
            let slot = flow_slot(written, key);
            let owner = written.table().get(slot as usize).map_or(0, |e| e & MAGLEV_BACKEND_MASK);
            // A flow on a master that no longer keeps flows is re-steered on its next packet
            // whichever way the packet goes, so it needs no mark.
            if owner != flow.backend_id && keeps.contains(&flow.backend_id) {
                needed.entry(*service).or_default().insert(slot);
            }
        }

        for (key, written) in self.written.iter_mut() {
            let keep = needed.get(key);
            let clear: Vec<(u32, u32)> = written
                .table()
                .iter()
                .enumerate()
                .filter(|(slot, e)| *e & MAGLEV_SLOT_CHANGED != 0 && keep.is_none_or(|k| !k.contains(&(*slot as u32))))
                .map(|(slot, e)| (slot as u32, e & !MAGLEV_SLOT_CHANGED))
                .collect();
            if clear.is_empty() {
                continue;
            }
            // Clearing a mark in the live region is a single-word write: the data path sees
            // either the marked or the clean entry, both of which route the slot correctly.
            report.marks_cleared += self.dataplane.maps().set_maglev_entries(written.id, written.active, clear.iter().copied())?;
            let active = written.active as usize;
            for (slot, value) in clear {
                written.regions[active][slot as usize] = value;
            }
        }

        let mut next = self.desired.clone();
        let mut retired_ids = Vec::new();
        for (key, s) in next.iter_mut() {
            s.backends.retain(|addr, b| {
                let retire = b.removing && (!in_use.contains(&b.id) || !b.state().0.keeps_flows());
                if retire {
                    report.backends_retired.push((*key, *addr));
                    retired_ids.push(b.id);
                }
                !retire
            });
        }
        if !retired_ids.is_empty() {
            self.commit(next)?;
            let doomed: Vec<FlowKey> =
                retired_ids.iter().filter_map(|id| records_of.get(id)).flatten().copied().collect();
            report.flows_deleted = self.dataplane.maps().delete_flows(doomed.iter())?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(last_seen_ns: u64) -> FlowEntry {
        FlowEntry { backend_id: 1, service_id: 0, slot: 0, _pad0: 0, last_seen_ns }
    }

    #[test]
    fn a_flow_is_live_for_one_timeout_after_it_was_seen_or_the_table_changed() {
        let idle = Duration::from_secs(10);
        let s = 1_000_000_000u64;
        assert!(is_live(&flow(100 * s), 0, 105 * s, idle));
        assert!(!is_live(&flow(100 * s), 0, 111 * s, idle));
        // Recorded long ago, but the table changed recently: it gets a full timeout.
        assert!(is_live(&flow(10 * s), 100 * s, 105 * s, idle));
        assert!(!is_live(&flow(10 * s), 100 * s, 110 * s, idle));
        // A clock reading before the record (another CPU's later write) is not an underflow.
        assert!(is_live(&flow(100 * s), 0, 99 * s, idle));
    }

    #[test]
    fn flow_slot_matches_the_data_path_hash() {
        let w = WrittenService {
            id: 0,
            flags: 0,
            table_size: 65_537,
            active: 0,
            regions: Default::default(),
            changed_at_ns: 0,
            inputs: Vec::new(),
        };
        let key = FlowKey {
            src: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            dst: [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0],
            sport: 40000u16.to_be(),
            dport: 7000u16.to_be(),
            proto: PROTO_TCP,
            family: 4,
            _pad0: [0; 2],
        };
        let expected = hash::table_slot(hash::flow_hash(key.family, &key.src, &key.dst, key.sport, key.dport, key.proto), 65_537);
        assert_eq!(flow_slot(&w, &key), expected);
        let sticky = WrittenService { flags: SERVICE_F_SOURCE_HASH, ..w };
        assert_eq!(flow_slot(&sticky, &key), hash::table_slot(hash::source_hash(key.family, &key.src), 65_537));
    }
}
