//! Taking over the state an earlier run left in pinned maps, so that a restart (after a crash,
//! or to upgrade) changes nothing in the data path unless the configuration did.

use std::collections::{BTreeMap, BTreeSet};

use mim_lb_common::{
    BACKEND_STATE_REMOVING, GLOBALS_F_READY, HEALTH_UP, PROTO_UDP, SERVICE_F_OLD_SOURCE_HASH,
    SERVICE_F_RESIZED, SERVICE_F_SOURCE_HASH, SERVICE_F_VIP_MARKER,
};

use super::{
    Admin, BackendDesire, Director, DirectorError, Resized, ServiceDesire, WrittenService, marks,
    sweep,
};
use crate::{
    config::{HealthCheck, Protocol, Scheduler, ServiceKey},
    dataplane::{Dataplane, service_index::words_addr},
};

/// What was found in the pinned maps.
#[derive(Debug, Default)]
pub struct Recovered {
    pub services: usize,
    pub backends: usize,
}

impl Director {
    /// Builds a director from maps an earlier run filled: the live half of the service index,
    /// each service's live Maglev table and every backend entry, with the health, operator
    /// state and MAC recorded there. A backend that was up stays up until its checks say
    /// otherwise, so a restart moves no flow. Names and health settings are unknown until
    /// the configuration is applied.
    pub fn recover(dataplane: Dataplane, gateway_mac: [u8; 6]) -> Result<(Director, Recovered), DirectorError> {
        let mut director = Director::new(dataplane, gateway_mac);
        let maps = director.dataplane.maps_ro();
        let globals = maps.globals()?;
        if globals.flags & GLOBALS_F_READY == 0 {
            return Ok((director, Recovered::default()));
        }
        let active = globals.active_services & 1;
        let halves = [maps.service_half(0)?, maps.service_half(1)?];
        let now = sweep::monotonic_ns();

        let mut desired = BTreeMap::new();
        let mut written = BTreeMap::new();
        let mut by_id: BTreeMap<u32, ServiceKey> = BTreeMap::new();
        for (_, e) in &halves[active as usize] {
            if e.flags & SERVICE_F_VIP_MARKER != 0 {
                continue;
            }
            let key = ServiceKey {
                vip: words_addr(&e.vip, e.family),
                port: u16::from_be(e.port),
                protocol: if e.proto == PROTO_UDP { Protocol::Udp } else { Protocol::Tcp },
            };
            let table = maps.maglev_region(e.service_id, e.active_table & 1, e.table_size)?;
            // Unknown history: every marked slot counts as just changed, so its mark is kept
            // for at least a full idle timeout.
            let times = marks::SlotTimes::all_at(&table, now);
            let marked = table.iter().filter(|e| marks::is_marked(**e)).count();
            let mut regions: [Vec<u32>; 2] = Default::default();
            regions[(e.active_table & 1) as usize] = table;
            let resized = (e.flags & SERVICE_F_RESIZED != 0).then_some(Resized {
                old_table_size: e.old_table_size,
                old_flags: if e.flags & SERVICE_F_OLD_SOURCE_HASH != 0 { SERVICE_F_SOURCE_HASH } else { 0 },
            });
            written.insert(
                key,
                WrittenService {
                    id: e.service_id,
                    flags: e.flags & SERVICE_F_SOURCE_HASH,
                    table_size: e.table_size,
                    active: e.active_table & 1,
                    regions,
                    times,
                    marked,
                    resized,
                    // Known once the backends are read, below.
                    digest: String::new(),
                    inputs: Vec::new(),
                },
            );
            desired.insert(
                key,
                ServiceDesire {
                    id: e.service_id,
                    name: key.to_string(),
                    scheduler: if e.flags & SERVICE_F_SOURCE_HASH != 0 {
                        Scheduler::MaglevSource
                    } else {
                        Scheduler::Maglev
                    },
                    table_size: e.table_size,
                    health: HealthCheck::default(),
                    slow_start: std::time::Duration::ZERO,
                    flap_damping: crate::config::FlapDamping::default(),
                    backends: BTreeMap::new(),
                },
            );
            by_id.insert(e.service_id, key);
        }

        let mut recovered = Recovered { services: desired.len(), backends: 0 };
        let mut written_backends = BTreeMap::new();
        for (id, b) in maps.backends()? {
            let Some(service) = by_id.get(&b.service_id).and_then(|k| desired.get_mut(k)) else {
                // A backend of a service that is gone; the next commit clears it.
                written_backends.insert(id, b);
                continue;
            };
            let mac = (b.mac != [0; 6]).then_some(b.mac);
            service.backends.insert(
                words_addr(&b.addr, b.family),
                BackendDesire {
                    id,
                    weight: b.weight,
                    config_mac: None,
                    resolved_mac: mac,
                    mac_problem: None,
                    health_up: b.health == HEALTH_UP,
                    health_reason: "as recorded before the restart".into(),
                    admin: Admin::from_code(b.admin),
                    removing: b.state == BACKEND_STATE_REMOVING,
                    ramp: None,
                    flaps: Default::default(),
                },
            );
            written_backends.insert(id, b);
            recovered.backends += 1;
        }

        for (key, w) in written.iter_mut() {
            if let Some(s) = desired.get(key) {
                w.digest = super::plan::service_digest(s, w.table(), w.flags);
            }
        }
        let index_slots = [0, 1].map(|h| halves[h].iter().map(|(slot, _)| *slot).collect::<BTreeSet<u32>>());
        director.index_entries = halves[active as usize].iter().map(|(_, e)| *e).collect();
        director.index_slots = index_slots;
        director.index_active = active;
        director.index_seeds = globals.service_seeds;
        director.desired = desired;
        // The unread regions are unknown: tidying writes them once, outside any change.
        director.untidy = written.keys().copied().collect();
        director.records_unchecked = true;
        director.written = written;
        let now_removing = director
            .desired
            .values()
            .flat_map(|s| s.backends.values())
            .filter(|b| b.removing)
            .map(|b| (b.id, now))
            .collect();
        director.removing_since = now_removing;
        director.written_backends = written_backends;
        director.ready = true;
        Ok((director, recovered))
    }
}
