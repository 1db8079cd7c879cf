//! What a live Maglev table becomes when its masters change, and when a slot's changed mark
//! may go: the pure half of the flow invariant (the data path's half is in
//! `mim-lb-ebpf/src/select.rs`).
//!
//! A clean slot sends every TCP packet to its master, and the data path records no flow there.
//! When the slot's master changes, the slot is marked and remembers the master it had while
//! clean (`prev`): every unrecorded flow of the slot began on that master, so that is where
//! the data path sends them, while SYNs on the marked slot are recorded. The mark keeps `prev`
//! through further changes, because flows begun while the slot was marked are all recorded.
//!
//! A mark may go once no flow needs it: no live record on the slot names another master than
//! the slot's, and no unrecorded flow has gone to `prev` for a whole idle timeout (the data
//! path stamps `SLOT_SEEN` when one does) since the slot was marked.

use std::time::Duration;

use mim_lb_common::{MAGLEV_BACKEND_MASK, MAGLEV_SLOT_CHANGED, maglev_entry, maglev_prev};

/// The slot's master.
pub fn owner(entry: u32) -> u32 {
    entry & MAGLEV_BACKEND_MASK
}

pub fn is_marked(entry: u32) -> bool {
    entry & MAGLEV_SLOT_CHANGED != 0
}

/// Where the slot's unrecorded TCP flows go: its previous master while marked with one, else
/// its master. What a resize saves of the old table.
pub fn began_on(entry: u32) -> u32 {
    let prev = maglev_prev(entry);
    if is_marked(entry) && prev != 0 { prev } else { owner(entry) }
}

/// The new live table: `built` (a master per slot) with each slot marked when its master
/// changes while the old one had a master, remembering that master; a marked slot stays
/// marked and keeps the master it remembers.
pub fn next_table(live: &[u32], built: &[u32]) -> Vec<u32> {
    built
        .iter()
        .enumerate()
        .map(|(slot, &id)| {
            let old = live.get(slot).copied().unwrap_or(0);
            if is_marked(old) {
                maglev_entry(id, maglev_prev(old), true)
            } else if owner(old) != 0 && owner(old) != id {
                maglev_entry(id, owner(old), true)
            } else {
                maglev_entry(id, 0, false)
            }
        })
        .collect()
}

/// The table after a resize or a change of hash: every slot marked with no previous master,
/// so that unrecorded flows look up the old table (`MAGLEV_OLD`).
pub fn resized_table(built: &[u32]) -> Vec<u32> {
    built.iter().map(|&id| maglev_entry(id, 0, true)).collect()
}

/// When each slot of a live table last changed master and since when it is marked
/// (`CLOCK_MONOTONIC` ns; 0 for never and for clean).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotTimes {
    pub changed_ns: Vec<u64>,
    pub marked_ns: Vec<u64>,
}

impl SlotTimes {
    /// A table written fresh, with nothing marked.
    pub fn clean(size: usize) -> SlotTimes {
        SlotTimes { changed_ns: vec![0; size], marked_ns: vec![0; size] }
    }

    /// A table whose history is unknown (taken over after a restart) or entirely new (a
    /// resize): every marked slot counts as changed and marked at `now_ns`.
    pub fn all_at(table: &[u32], now_ns: u64) -> SlotTimes {
        let at = |e: &u32| if is_marked(*e) { now_ns } else { 0 };
        SlotTimes { changed_ns: table.iter().map(at).collect(), marked_ns: table.iter().map(at).collect() }
    }

    /// The times of `next`, which replaces `live` at `now_ns`.
    pub fn after(&self, live: &[u32], next: &[u32], now_ns: u64) -> SlotTimes {
        let old = |v: &Vec<u64>, slot: usize| v.get(slot).copied().unwrap_or(0);
        let mut times = SlotTimes::clean(next.len());
        for (slot, &entry) in next.iter().enumerate() {
            let before = live.get(slot).copied().unwrap_or(0);
            times.changed_ns[slot] = if owner(before) != owner(entry) { now_ns } else { old(&self.changed_ns, slot) };
            times.marked_ns[slot] = match (is_marked(before), is_marked(entry)) {
                (_, false) => 0,
                (false, true) => now_ns,
                (true, true) => old(&self.marked_ns, slot),
            };
        }
        times
    }
}

/// `SLOT_SEEN` units (`CLOCK_MONOTONIC >> SEEN_SHIFT`) as the latest nanosecond they can
/// stand for, so a stamp is never taken for older than it is. 0 is "never".
pub fn seen_ns(seen: u32) -> u64 {
    if seen == 0 { 0 } else { ((seen as u64 + 1) << mim_lb_common::limits::SEEN_SHIFT) - 1 }
}

/// What the sweep knows about one marked slot.
#[derive(Clone, Copy, Debug)]
pub struct SlotFacts {
    pub entry: u32,
    pub changed_ns: u64,
    pub marked_ns: u64,
    /// A live record on the slot names a master other than the slot's, one that keeps flows.
    pub needed_by_record: bool,
    /// `SLOT_SEEN` of the slot.
    pub seen: u32,
}

/// Whether a marked slot's mark may be cleared by a sweep whose read of the connection table
/// began at `read_ns`. Every condition is needed:
/// - its master has not changed since the read began (a flow recorded since is not in it);
/// - it has been marked for a whole idle timeout, so every flow that began before the change
///   and is still alive has sent a packet since, and stamped `SLOT_SEEN`;
/// - no unrecorded flow went to the previous master within the idle timeout;
/// - no live record on the slot names another master that keeps flows.
pub fn may_clear(slot: &SlotFacts, read_ns: u64, tcp_idle: Duration) -> bool {
    let idle = tcp_idle.as_nanos() as u64;
    is_marked(slot.entry)
        && slot.changed_ns < read_ns
        && slot.marked_ns.saturating_add(idle) <= read_ns
        && read_ns.saturating_sub(seen_ns(slot.seen)) >= idle
        && !slot.needed_by_record
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = MAGLEV_SLOT_CHANGED;

    #[test]
    fn a_changed_slot_is_marked_with_the_master_it_had_while_clean() {
        let live = vec![1, 2, 3, 0];
        let built = vec![1, 3, 3, 2];
        let next = next_table(&live, &built);
        assert_eq!(next, vec![1, maglev_entry(3, 2, true), 3, 2]);
        assert_eq!(began_on(next[1]), 2);
        // A second change keeps the mark and the first master: unrecorded flows began there.
        let again = next_table(&next, &[1, 1, 3, 2]);
        assert_eq!(again[1], maglev_entry(1, 2, true));
        assert_eq!(next_table(&again, &[1, 1, 3, 2]), again, "marks persist until the sweep clears them");
    }

    #[test]
    fn a_resized_table_is_marked_everywhere_with_no_previous_master() {
        let t = resized_table(&[4, 5]);
        assert_eq!(t, vec![4 | M, 5 | M]);
        assert_eq!(began_on(t[0]), 4);
    }

    #[test]
    fn slot_times_follow_changes_and_marks() {
        let live = vec![1, maglev_entry(2, 1, true), 3];
        let times = SlotTimes { changed_ns: vec![0, 50, 0], marked_ns: vec![0, 50, 0] };
        let next = next_table(&live, &[1, 3, 1]);
        let t = times.after(&live, &next, 100);
        assert_eq!(t.changed_ns, vec![0, 100, 100]);
        assert_eq!(t.marked_ns, vec![0, 50, 100], "a slot marked before keeps its mark time");
    }

    #[test]
    fn a_mark_clears_only_when_every_condition_holds() {
        let s = 1_000_000_000u64;
        let idle = Duration::from_secs(10);
        let base = SlotFacts { entry: maglev_entry(2, 1, true), changed_ns: 5 * s, marked_ns: 5 * s, needed_by_record: false, seen: 0 };
        assert!(may_clear(&base, 20 * s, idle));
        assert!(!may_clear(&SlotFacts { entry: 2, ..base }, 20 * s, idle), "clean slots have no mark");
        assert!(!may_clear(&base, 14 * s, idle), "marked for less than a timeout");
        assert!(!may_clear(&SlotFacts { changed_ns: 20 * s, ..base }, 20 * s, idle), "changed after the read began");
        assert!(!may_clear(&SlotFacts { needed_by_record: true, ..base }, 20 * s, idle));
        let recent = ((15 * s) >> mim_lb_common::limits::SEEN_SHIFT) as u32;
        assert!(!may_clear(&SlotFacts { seen: recent, ..base }, 20 * s, idle), "a flow went to prev 5 s ago");
        assert!(may_clear(&SlotFacts { seen: recent, ..base }, 30 * s, idle));
    }
}
