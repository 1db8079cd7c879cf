//! State shared with peer directors: what this director's tables say, by address (ids are
//! each director's own), and what a peer's say, applied here.
//!
//! Identical tables already agree on every flow of a clean slot. What they cannot reproduce:
//! - recorded flows (marked slots, UDP): imported into `FLOWS`, unless the local record is
//!   newer. A TCP record that names another master than the local slot's, on a clean slot
//!   (the peer saw a change this director has not, or saw it earlier), marks the slot, with
//!   its own master as the previous one, so that its records are looked up here too and
//!   everything else goes where it went;
//! - when unrecorded flows last went to a marked slot's previous master (`SLOT_SEEN`): a
//!   director that carries no traffic would otherwise clear marks its peer still needs;
//! - which slots are marked, and with which previous master: sent in a pull answer, for a
//!   director that starts without that history.

use std::{collections::HashMap, net::IpAddr};

use mim_lb_common::{FlowEntry, FlowKey, PROTO_TCP, PROTO_UDP, limits::SEEN_SHIFT, maglev_entry, maglev_prev};

use super::{Director, DirectorError, ServiceSlots, marks, sweep::record_slot};
use crate::{
    config::{Protocol, ServiceKey},
    dataplane::service_index::words_addr,
    sync::wire::{WireMark, WireRecord},
};

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    pub written: usize,
    /// The local record was as new or newer.
    pub kept_local: usize,
    /// No such service or backend here (configurations differ).
    pub unknown: usize,
    pub slots_marked: usize,
}

/// The service a recorded flow belongs to: its destination is the VIP and port.
pub fn service_of(key: &FlowKey) -> Option<ServiceKey> {
    let protocol = match key.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some(ServiceKey { vip: words_addr(&key.dst, key.family), port: u16::from_be(key.dport), protocol })
}

fn age_ms(now_ns: u64, then_ns: u64) -> u32 {
    (now_ns.saturating_sub(then_ns) / 1_000_000).min(u32::MAX as u64) as u32
}

impl Director {
    /// The first 8 bytes of each service's table digest, for hellos.
    pub fn digests(&self) -> Vec<(ServiceKey, [u8; 8])> {
        self.written
            .iter()
            .map(|(k, w)| {
                let mut d = [0u8; 8];
                for (i, pair) in w.digest.as_bytes().chunks(2).take(8).enumerate() {
                    d[i] = std::str::from_utf8(pair).ok().and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
                }
                (*k, d)
            })
            .collect()
    }

    /// `flows` as peers read them: by backend address, with their age at `now_ns`. Records of
    /// services or backends this director no longer has are left out.
    pub fn export_records(&self, flows: &[(FlowKey, FlowEntry)], now_ns: u64) -> Vec<WireRecord> {
        let by_id: HashMap<(u32, u32), IpAddr> = self
            .desired
            .values()
            .flat_map(|s| s.backends.iter().map(move |(a, b)| ((s.id, b.id), *a)))
            .collect();
        flows
            .iter()
            .filter_map(|(key, flow)| {
                let backend = *by_id.get(&(flow.service_id, flow.backend_id))?;
                Some(WireRecord { key: *key, backend, age_ms: age_ms(now_ns, flow.last_seen_ns) })
            })
            .collect()
    }

    /// Every marked slot of every service, by address.
    pub fn export_marks(&self) -> Vec<(ServiceKey, u32, Vec<WireMark>)> {
        self.written
            .iter()
            .filter(|(_, w)| w.marked > 0)
            .filter_map(|(key, w)| {
                let s = self.desired.get(key)?;
                let addr: HashMap<u32, IpAddr> = s.backends.iter().map(|(a, b)| (b.id, *a)).collect();
                let marks = w
                    .table()
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| marks::is_marked(**e))
                    .map(|(slot, e)| WireMark {
                        slot: slot as u32,
                        owner: addr.get(&marks::owner(*e)).copied(),
                        prev: addr.get(&maglev_prev(*e)).copied(),
                    })
                    .collect();
                Some((*key, w.table_size, marks))
            })
            .collect()
    }

    /// The marked slots of services with any, and their `SLOT_SEEN` stamps (0: never).
    pub fn seen_stamps(&self) -> Result<Vec<ServiceSlots>, DirectorError> {
        let mut out = Vec::new();
        for (key, w) in self.written.iter().filter(|(_, w)| w.marked > 0) {
            let seen = self.dataplane.maps_ro().slot_seen(w.id, w.table_size)?;
            let stamps = w
                .table()
                .iter()
                .enumerate()
                .filter(|(slot, e)| marks::is_marked(**e) && seen.get(*slot).is_some_and(|s| *s != 0))
                .map(|(slot, _)| (slot as u32, seen[slot]))
                .collect();
            out.push((*key, w.table_size, stamps));
        }
        Ok(out)
    }

    /// Records a peer made (or refreshed), seen `age_ms` before `now_ns`.
    pub fn import_records(&mut self, records: &[WireRecord], now_ns: u64) -> Result<ImportReport, DirectorError> {
        let mut report = ImportReport::default();
        let mut writes = Vec::new();
        let mut to_mark: HashMap<ServiceKey, Vec<u32>> = HashMap::new();
        for r in records {
            let Some(service) = service_of(&r.key) else {
                report.unknown += 1;
                continue;
            };
            let (Some(s), Some(w)) = (self.desired.get(&service), self.written.get(&service)) else {
                report.unknown += 1;
                continue;
            };
            let Some(b) = s.backends.get(&r.backend) else {
                report.unknown += 1;
                continue;
            };
            let last_seen_ns = now_ns.saturating_sub(r.age_ms as u64 * 1_000_000);
            if let Some(local) = self.dataplane.maps_ro().flow(&r.key)?
                && local.last_seen_ns >= last_seen_ns
            {
                report.kept_local += 1;
                continue;
            }
            let slot = record_slot(w, &r.key);
            writes.push((r.key, FlowEntry { backend_id: b.id, service_id: w.id, slot, flags: mim_lb_common::FLOW_F_IMPORTED, last_seen_ns }));
            let entry = w.table().get(slot as usize).copied().unwrap_or(0);
            if r.key.proto == PROTO_TCP && !marks::is_marked(entry) && marks::owner(entry) != b.id {
                to_mark.entry(service).or_default().push(slot);
            }
        }
        report.written = self.dataplane.maps().set_flows(&writes)?;
        for (service, slots) in to_mark {
            let w = &self.written[&service];
            let entries: Vec<(u32, u32)> = slots
                .into_iter()
                .map(|slot| {
                    let owner = marks::owner(w.table()[slot as usize]);
                    (slot, maglev_entry(owner, owner, true))
                })
                .collect();
            report.slots_marked += entries.len();
            self.write_live_entries(service, &entries, now_ns)?;
        }
        Ok(report)
    }

    /// Records a peer deleted.
    pub fn import_forgets(&mut self, keys: &[FlowKey]) -> Result<usize, DirectorError> {
        Ok(self.dataplane.maps().delete_flows(keys.iter())?)
    }

    /// Unrecorded flows a peer sent to the previous master of marked slots, `age_ms` ago:
    /// stamped here too, so that this director keeps the marks as long as the peer does.
    pub fn import_seen(&mut self, service: &ServiceKey, table_size: u32, slots: &[(u32, u32)], now_ns: u64) -> Result<usize, DirectorError> {
        let Some(w) = self.written.get(service).filter(|w| w.table_size == table_size) else { return Ok(0) };
        let (id, size) = (w.id, w.table_size);
        let local = self.dataplane.maps_ro().slot_seen(id, size)?;
        let stamps: Vec<(u32, u32)> = slots
            .iter()
            .filter(|(slot, _)| *slot < size)
            .map(|&(slot, age)| (slot, (now_ns.saturating_sub(age as u64 * 1_000_000) >> SEEN_SHIFT) as u32))
            .filter(|&(slot, stamp)| stamp > local[slot as usize])
            .collect();
        self.dataplane.maps().set_slot_seen(id, &stamps)?;
        Ok(stamps.len())
    }

    /// A peer's marked slots (from its pull answer): a slot with the same master here takes
    /// the peer's mark and previous master, which is where the slot's unrecorded flows went
    /// on the peer. Slots whose master differs, or whose previous master this director does
    /// not know, are left as they are.
    pub fn import_marks(&mut self, service: &ServiceKey, table_size: u32, peer_marks: &[WireMark], now_ns: u64) -> Result<usize, DirectorError> {
        let (Some(s), Some(w)) = (self.desired.get(service), self.written.get(service)) else { return Ok(0) };
        if w.table_size != table_size {
            return Ok(0);
        }
        let entries: Vec<(u32, u32)> = peer_marks
            .iter()
            .filter_map(|m| {
                let entry = *w.table().get(m.slot as usize)?;
                let owner = marks::owner(entry);
                let owner_here = m.owner.and_then(|a| s.backends.get(&a)).map_or(0, |b| b.id);
                let prev = s.backends.get(&m.prev?)?.id;
                let wanted = maglev_entry(owner, prev, true);
                (owner_here == owner && entry != wanted).then_some((m.slot, wanted))
            })
            .collect();
        self.write_live_entries(*service, &entries, now_ns)?;
        Ok(entries.len())
    }

    /// Entries as peers read them (by address).
    pub fn wire_marks(&self, service: &ServiceKey, entries: &[(u32, u32)]) -> Vec<WireMark> {
        let Some(s) = self.desired.get(service) else { return Vec::new() };
        let addr: HashMap<u32, IpAddr> = s.backends.iter().map(|(a, b)| (b.id, *a)).collect();
        entries
            .iter()
            .map(|&(slot, e)| WireMark { slot, owner: addr.get(&marks::owner(e)).copied(), prev: addr.get(&maglev_prev(e)).copied() })
            .collect()
    }

    /// Marks a peer's sweep cleared. A slot marked alike here (same master, same previous
    /// master) is cleared too, so that both send its unrecorded flows to its master, but only
    /// if what this director itself knows allows it as well ([`marks::may_clear`] with its own
    /// `SLOT_SEEN` and its last sweep's records): the peer may know less (it carries no
    /// traffic, or missed stamps in a partition), and a director must never drop a mark its
    /// own flows still use. Before this director's first sweep, nothing is cleared.
    pub fn import_cleared(&mut self, service: &ServiceKey, table_size: u32, cleared: &[WireMark], now_ns: u64) -> Result<usize, DirectorError> {
        let (Some(s), Some(w)) = (self.desired.get(service), self.written.get(service)) else { return Ok(0) };
        let Some((needed, tcp_idle)) = &self.last_sweep else { return Ok(0) };
        if w.table_size != table_size {
            return Ok(0);
        }
        let id = |a: Option<IpAddr>| a.and_then(|a| s.backends.get(&a)).map_or(0, |b| b.id);
        let seen = self.dataplane.maps_ro().slot_seen(w.id, w.table_size)?;
        let keep = needed.get(service);
        let clear: Vec<(u32, u32)> = cleared
            .iter()
            .filter_map(|m| {
                let entry = *w.table().get(m.slot as usize)?;
                let alike = marks::is_marked(entry) && marks::owner(entry) == id(m.owner) && maglev_prev(entry) == id(m.prev);
                let facts = self.slot_facts(w, m.slot, keep, seen[m.slot as usize]);
                (alike && marks::may_clear(&facts, now_ns, *tcp_idle)).then_some((m.slot, marks::owner(entry)))
            })
            .collect();
        self.write_live_entries(*service, &clear, now_ns)?;
        Ok(clear.len())
    }

    /// After a peer's whole state arrived, for services whose table the peer builds alike
    /// (same digest): a slot marked here that the peer did not report is cleared where this
    /// director's own facts allow it too: no unrecorded flow went to the slot's previous
    /// master here within `tcp_idle` (`SLOT_SEEN`), and no live record here needs the mark.
    /// A director back from a restart or a partition so drops marks its peer cleared while
    /// it could not hear of it, and never one its own flows use. `flows` is a read of the
    /// connection table that began at `now_ns`.
    pub fn settle_marks_after_pull(
        &mut self,
        services: &[ServiceKey],
        reported: &HashMap<ServiceKey, std::collections::HashSet<u32>>,
        flows: &[(FlowKey, FlowEntry)],
        now_ns: u64,
        tcp_idle: std::time::Duration,
    ) -> Result<usize, DirectorError> {
        let candidates: Vec<ServiceKey> = services.iter().filter(|k| self.written.get(k).is_some_and(|w| w.marked > 0)).copied().collect();
        if candidates.is_empty() {
            return Ok(0);
        }
        let live = self.live_flows(flows, now_ns, tcp_idle, tcp_idle);
        let none = std::collections::HashSet::new();
        let mut cleared = 0;
        for service in candidates {
            let w = &self.written[&service];
            let seen = self.dataplane.maps_ro().slot_seen(w.id, w.table_size)?;
            let needed = live.needed.get(&service);
            let reported = reported.get(&service).unwrap_or(&none);
            let idle = tcp_idle.as_nanos() as u64;
            let clear: Vec<(u32, u32)> = w
                .table()
                .iter()
                .enumerate()
                .filter(|(slot, e)| {
                    let slot = *slot as u32;
                    marks::is_marked(**e)
                        && !reported.contains(&slot)
                        && !needed.is_some_and(|n| n.contains(&slot))
                        && now_ns.saturating_sub(marks::seen_ns(seen[slot as usize])) >= idle
                })
                .map(|(slot, e)| (slot as u32, marks::owner(*e)))
                .collect();
            self.write_live_entries(service, &clear, now_ns)?;
            cleared += clear.len();
        }
        Ok(cleared)
    }
}
