//! The connections each master holds, in the spirit of `ipvsadm -Ln`'s ActiveConn and
//! InActConn, counted from a read of the connection table the daemon makes anyway on a thread
//! of its own: nothing is added to the data path, and a status call reads no table.
//!
//! What the director can count is what it has to remember. A TCP connection on a slot that
//! kept its master since the connection began has no record (Maglev sends it by hash), so it
//! is not counted; the counts cover:
//! - recorded flows (every UDP flow; TCP flows on slots whose master changed): active when
//!   seen within [`ACTIVE_WINDOW`] (UDP: alive, not yet expired), inactive when idle but not
//!   yet expired;
//! - unrecorded TCP flows still going to a slot's previous master (a drained or replaced
//!   master keeps them): the data path stamps the slot (`SLOT_SEEN`) when one passes, so each
//!   such slot seen within the window counts as one active connection (a lower bound).
//!
//! That is exactly what a drained master needs to be idle: all its slots went to others, so
//! every connection it still holds is one of the two.

use std::{collections::HashMap, time::Duration};

use mim_lb_common::{FlowEntry, FlowKey, PROTO_TCP, maglev_prev};

use super::{Director, DirectorError, marks, sweep::is_live};

/// A TCP connection whose last packet is older than this (plus the data path's refresh slack)
/// counts as inactive. Several times the data path's once-a-second refresh and `SLOT_SEEN`'s
/// one-second resolution, so a connection exchanging a packet every second or two is active.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(5);

/// How long after the start of a read that took `read_took` the next read for the counts
/// begins: ten times the read, so the reading thread is busy a tenth of the time at most
/// (a third of a second for a million flows: counts every 3.5 s), and between one second
/// (small tables) and 30 s.
pub fn next_count_in(read_took: Duration) -> Duration {
    (read_took * 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// What one master holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub active: u64,
    pub inactive: u64,
}

/// Counts of a read of the connection table, by backend id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldCounts {
    /// When the read began (`CLOCK_MONOTONIC` ns): the counts speak for that moment.
    pub read_ns: u64,
    pub by_backend: HashMap<u32, Held>,
}

/// Counts the recorded flows of a read begun at `read_ns`, by the backend each names. Pure:
/// the daemon runs it on the reading thread, so the event loop never walks the table for it.
pub fn count_records(flows: &[(FlowKey, FlowEntry)], read_ns: u64, tcp_idle: Duration, udp_idle: Duration) -> HeldCounts {
    let mut by_backend: HashMap<u32, Held> = HashMap::new();
    for (key, flow) in flows {
        let tcp = key.proto == PROTO_TCP;
        let idle = if tcp { tcp_idle } else { udp_idle };
        if !is_live(flow, 0, read_ns, idle) {
            continue;
        }
        let held = by_backend.entry(flow.backend_id).or_default();
        if !tcp || is_live(flow, 0, read_ns, ACTIVE_WINDOW) {
            held.active += 1;
        } else {
            held.inactive += 1;
        }
    }
    HeldCounts { read_ns, by_backend }
}

/// Marked slots whose unrecorded flows went to the previous master within the window before
/// `read_ns`, by that master: `(entry, marked_ns, seen)` per slot. A stamp from before the
/// slot was marked belongs to an earlier mark.
pub fn previous_master_seen(slots: impl Iterator<Item = (u32, u64, u32)>, read_ns: u64) -> HashMap<u32, u64> {
    let since = read_ns.saturating_sub(ACTIVE_WINDOW.as_nanos() as u64);
    let mut seen_by: HashMap<u32, u64> = HashMap::new();
    for (entry, marked_ns, seen) in slots {
        let prev = maglev_prev(entry);
        let at = marks::seen_ns(seen);
        if marks::is_marked(entry) && prev != 0 && prev != marks::owner(entry) && seen != 0 && at >= since && at >= marked_ns {
            *seen_by.entry(prev).or_default() += 1;
        }
    }
    seen_by
}

impl Director {
    /// Adds to `counts` the unrecorded TCP flows seen going to a slot's previous master, from
    /// `SLOT_SEEN` read now (one batched read per service with marked slots).
    pub fn add_previous_master_flows(&self, counts: &mut HeldCounts) -> Result<(), DirectorError> {
        for w in self.written.values().filter(|w| w.marked > 0) {
            let seen = self.dataplane.maps_ro().slot_seen(w.id, w.table_size)?;
            let slots = w
                .table()
                .iter()
                .enumerate()
                .map(|(i, e)| (*e, w.times.marked_ns.get(i).copied().unwrap_or(0), seen.get(i).copied().unwrap_or(0)));
            for (id, n) in previous_master_seen(slots, counts.read_ns) {
                counts.by_backend.entry(id).or_default().active += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mim_lb_common::{PROTO_UDP, maglev_entry};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(proto: u8, backend_id: u32, last_seen_ns: u64) -> (FlowKey, FlowEntry) {
        let key = FlowKey { proto, ..FlowKey::default() };
        (key, FlowEntry { backend_id, service_id: 0, slot: 0, flags: 0, last_seen_ns })
    }

    #[test]
    fn recorded_flows_are_active_when_seen_lately_inactive_when_idle_and_gone_when_expired() {
        let idle = Duration::from_secs(100);
        let flows = [
            flow(PROTO_TCP, 1, 1000 * S),      // seen now
            flow(PROTO_TCP, 1, 994 * S),       // within the window and the refresh slack
            flow(PROTO_TCP, 1, 990 * S),       // idle
            flow(PROTO_TCP, 1, 800 * S),       // expired
            flow(PROTO_UDP, 2, 950 * S),       // UDP: alive is active
            flow(PROTO_UDP, 2, 800 * S),       // expired
        ];
        let counts = count_records(&flows, 1000 * S, idle, idle);
        assert_eq!(counts.by_backend[&1], Held { active: 2, inactive: 1 });
        assert_eq!(counts.by_backend[&2], Held { active: 1, inactive: 0 });
        assert_eq!(counts.read_ns, 1000 * S);
    }

    #[test]
    fn counting_reads_keep_the_reading_thread_busy_a_tenth_of_the_time_within_bounds() {
        assert_eq!(next_count_in(Duration::from_millis(3)), Duration::from_secs(1));
        assert_eq!(next_count_in(Duration::from_millis(350)), Duration::from_millis(3500));
        assert_eq!(next_count_in(Duration::from_secs(10)), Duration::from_secs(30));
    }

    #[test]
    fn a_slot_counts_for_its_previous_master_when_seen_since_it_was_marked_and_lately() {
        let stamp = |ns: u64| (ns >> mim_lb_common::limits::SEEN_SHIFT) as u32;
        let read = 1000 * S;
        let slots = vec![
            (maglev_entry(2, 1, true), 900 * S, stamp(999 * S)), // seen: counts for 1
            (maglev_entry(2, 1, true), 900 * S, stamp(990 * S)), // seen too long ago
            (maglev_entry(3, 1, true), 999 * S, stamp(996 * S)), // a stamp of an earlier mark
            (maglev_entry(2, 0, false), 0, stamp(999 * S)),      // clean
            (maglev_entry(3, 4, true), 900 * S, 0),              // never seen
            (maglev_entry(3, 4, true), 900 * S, stamp(998 * S)), // counts for 4
        ];
        let seen = previous_master_seen(slots.into_iter(), read);
        assert_eq!(seen, HashMap::from([(1, 1), (4, 1)]));
    }
}
