//! What the resolver knows about each wanted address, and which events that warrants.
//!
//! No I/O and no clock of its own (time is passed in), so the event rules are unit-tested here
//! and the netlink side only has to feed in what the kernel's table says.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_route::neighbour::NeighbourState;
use tokio::time::Instant;

use super::NeighborEvent;

/// How long a wanted address may go without a usable entry before it is reported unresolved.
/// ARP and ND give up after 3 probes sent 1 s apart, so a live neighbour answers well within it.
pub(super) const UNRESOLVED_AFTER: Duration = Duration::from_secs(3);

/// A kernel neighbour entry, reduced to what the resolver needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub state: NeighbourState,
    /// The link-layer address, if the entry has an Ethernet one.
    pub mac: Option<[u8; 6]>,
    /// NTF_EXT_MANAGED: the kernel itself keeps the entry resolved.
    pub managed: bool,
    /// Learned or validated by a driver or controller (NTF_EXT_LEARNED and the like): not ours
    /// to change.
    pub external: bool,
}

impl Entry {
    /// The MAC, if the entry is in a state whose address may be used to forward.
    pub fn usable_mac(&self) -> Option<[u8; 6]> {
        use NeighbourState as S;
        match self.state {
            S::Reachable | S::Stale | S::Delay | S::Probe | S::Permanent | S::Noarp => self.mac,
            _ => None,
        }
    }

    /// Configured by someone (static, or owned by a driver): the resolver never changes it.
    pub fn is_configured(&self) -> bool {
        matches!(self.state, NeighbourState::Permanent | NeighbourState::Noarp) || self.external
    }
}

/// `ip neigh` spelling of a state, for operators.
pub(super) fn state_name(state: NeighbourState) -> String {
    match state {
        NeighbourState::Other(bits) => format!("state {bits:#x}"),
        known => known.to_string().to_uppercase(),
    }
}

#[derive(Debug)]
struct Wanted {
    /// Whether the table was looked at since the address became wanted.
    seen: bool,
    /// State of the entry last seen; `None`: there was no entry.
    last: Option<NeighbourState>,
    /// MAC of the last `Resolved` event; `None` before the first and after an `Unresolved`.
    reported: Option<[u8; 6]>,
    /// Since when the address has had no usable entry; `None` while it has one.
    unusable_since: Option<Instant>,
    /// Whether the current stretch without a usable entry has been reported.
    unresolved_reported: bool,
}

/// Per wanted address: the last kernel state seen and the last event sent.
#[derive(Debug)]
pub(super) struct Tracker {
    interface: String,
    wanted: BTreeMap<IpAddr, Wanted>,
}

impl Tracker {
    pub fn new(interface: &str) -> Tracker {
        Tracker { interface: interface.to_owned(), wanted: BTreeMap::new() }
    }

    /// Makes `addresses` the wanted set. Returns the added and the removed addresses; removed
    /// ones are forgotten (a later want starts afresh and reports `Resolved` again).
    pub fn set_wanted(
        &mut self,
        addresses: &BTreeSet<IpAddr>,
        now: Instant,
    ) -> (Vec<IpAddr>, Vec<IpAddr>) {
        let removed: Vec<IpAddr> =
            self.wanted.keys().filter(|a| !addresses.contains(a)).copied().collect();
        for address in &removed {
            self.wanted.remove(address);
        }
        let mut added = Vec::new();
        for address in addresses {
            if !self.wanted.contains_key(address) {
                self.wanted.insert(
                    *address,
                    Wanted {
                        seen: false,
                        last: None,
                        reported: None,
                        unusable_since: Some(now),
                        unresolved_reported: false,
                    },
                );
                added.push(*address);
            }
        }
        (added, removed)
    }

    pub fn is_wanted(&self, address: &IpAddr) -> bool {
        self.wanted.contains_key(address)
    }

    pub fn wanted(&self) -> Vec<IpAddr> {
        self.wanted.keys().copied().collect()
    }

    /// Takes in what the kernel's table says about `address` (`None`: no entry) and returns
    /// the event that warrants, if any.
    pub fn observe(
        &mut self,
        address: IpAddr,
        entry: Option<&Entry>,
        now: Instant,
    ) -> Option<NeighborEvent> {
        let w = self.wanted.get_mut(&address)?;
        let state = entry.map(|e| e.state);
        // FAILED means the kernel has just given up probing; one seen at the first look may be
        // old news, and the resolver is about to make the kernel try again.
        let turned_failed = state == Some(NeighbourState::Failed) && w.seen && w.last != state;
        w.seen = true;
        w.last = state;
        if let Some(mac) = entry.and_then(Entry::usable_mac) {
            w.unusable_since = None;
            w.unresolved_reported = false;
            if w.reported == Some(mac) {
                return None;
            }
            w.reported = Some(mac);
            return Some(NeighborEvent::Resolved { address, mac });
        }
        w.unusable_since.get_or_insert(now);
        if turned_failed && !w.unresolved_reported {
            return Some(self.unresolved(address, false));
        }
        None
    }

    /// `Unresolved` for every address that has gone [`UNRESOLVED_AFTER`] without a usable
    /// entry and was not reported yet.
    pub fn expire(&mut self, now: Instant) -> Vec<NeighborEvent> {
        let due: Vec<IpAddr> = self
            .wanted
            .iter()
            .filter(|(_, w)| !w.unresolved_reported)
            .filter(|(_, w)| w.unusable_since.is_some_and(|t| now >= t + UNRESOLVED_AFTER))
            .map(|(a, _)| *a)
            .collect();
        due.into_iter().map(|a| self.unresolved(a, true)).collect()
    }

    /// When [`Tracker::expire`] next has something to report, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.wanted
            .values()
            .filter(|w| !w.unresolved_reported)
            .filter_map(|w| w.unusable_since)
            .min()
            .map(|t| t + UNRESOLVED_AFTER)
    }

    /// Marks `address` as reported unresolved and says why, e.g. "no ARP reply from 10.0.0.11
    /// on eth0 (neighbour entry FAILED)".
    fn unresolved(&mut self, address: IpAddr, timed_out: bool) -> NeighborEvent {
        let protocol = match address {
            IpAddr::V4(_) => "ARP reply",
            IpAddr::V6(_) => "neighbour advertisement",
        };
        let mut reason = format!("no {protocol} from {address} on {}", self.interface);
        if let Some(w) = self.wanted.get_mut(&address) {
            w.unresolved_reported = true;
            // A later resolution is news even if the MAC is the same as before.
            w.reported = None;
            if timed_out {
                reason += &format!(" within {} s", UNRESOLVED_AFTER.as_secs());
            }
            reason += &match w.last {
                Some(state) => format!(" (neighbour entry {})", state_name(state)),
                None => " (no neighbour entry)".to_owned(),
            };
        }
        NeighborEvent::Unresolved { address, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11));
    const MAC1: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC2: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn entry(state: NeighbourState, mac: Option<[u8; 6]>) -> Entry {
        Entry { state, mac, managed: true, external: false }
    }

    fn tracker(now: Instant) -> Tracker {
        let mut t = Tracker::new("eth0");
        let (added, removed) = t.set_wanted(&BTreeSet::from([A]), now);
        assert_eq!((added, removed), (vec![A], vec![]));
        t
    }

    fn resolved(mac: [u8; 6]) -> Option<NeighborEvent> {
        Some(NeighborEvent::Resolved { address: A, mac })
    }

    #[test]
    fn usable_states() {
        use NeighbourState::*;
        for state in [Reachable, Stale, Delay, Probe, Permanent, Noarp] {
            assert_eq!(entry(state, Some(MAC1)).usable_mac(), Some(MAC1), "{state}");
        }
        for state in [Incomplete, Failed, None] {
            assert_eq!(entry(state, Some(MAC1)).usable_mac(), Option::None, "{state}");
        }
        assert_eq!(entry(Reachable, Option::None).usable_mac(), Option::None);
    }

    #[test]
    fn resolved_once_then_only_on_change() {
        let now = Instant::now();
        let mut t = tracker(now);
        assert_eq!(t.observe(A, None, now), None);
        let e = entry(NeighbourState::Reachable, Some(MAC1));
        assert_eq!(t.observe(A, Some(&e), now), resolved(MAC1));
        assert_eq!(t.observe(A, Some(&e), now), None);
        // Aging and probing keep the address: nothing to say.
        for state in [NeighbourState::Stale, NeighbourState::Delay, NeighbourState::Probe] {
            assert_eq!(t.observe(A, Some(&entry(state, Some(MAC1))), now), None);
        }
        let e2 = entry(NeighbourState::Stale, Some(MAC2));
        assert_eq!(t.observe(A, Some(&e2), now), resolved(MAC2));
        assert_eq!(t.next_deadline(), None);
        assert!(t.expire(now + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn unresolved_after_timeout_once_per_episode() {
        let now = Instant::now();
        let mut t = tracker(now);
        let incomplete = entry(NeighbourState::Incomplete, None);
        assert_eq!(t.observe(A, Some(&incomplete), now), None);
        assert_eq!(t.next_deadline(), Some(now + UNRESOLVED_AFTER));
        assert!(t.expire(now + Duration::from_millis(2900)).is_empty());
        let events = t.expire(now + UNRESOLVED_AFTER);
        let [NeighborEvent::Unresolved { address, reason }] = events.as_slice() else {
            panic!("expected one Unresolved, got {events:?}");
        };
        assert_eq!(*address, A);
        assert_eq!(
            reason,
            "no ARP reply from 10.0.0.11 on eth0 within 3 s (neighbour entry INCOMPLETE)"
        );
        // Still nothing, failing over and over: no repeats.
        let failed = entry(NeighbourState::Failed, None);
        assert_eq!(t.observe(A, Some(&failed), now), None);
        assert_eq!(t.observe(A, Some(&incomplete), now), None);
        assert_eq!(t.observe(A, Some(&failed), now), None);
        assert!(t.expire(now + Duration::from_secs(60)).is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn failed_is_reported_at_once_and_resolution_after_it_again() {
        let now = Instant::now();
        let mut t = tracker(now);
        let e = entry(NeighbourState::Reachable, Some(MAC1));
        assert_eq!(t.observe(A, Some(&e), now), resolved(MAC1));
        let probe = entry(NeighbourState::Probe, Some(MAC1));
        assert_eq!(t.observe(A, Some(&probe), now), None);
        let failed = entry(NeighbourState::Failed, None);
        assert_eq!(
            t.observe(A, Some(&failed), now),
            Some(NeighborEvent::Unresolved {
                address: A,
                reason: "no ARP reply from 10.0.0.11 on eth0 (neighbour entry FAILED)".into()
            })
        );
        assert!(t.expire(now + Duration::from_secs(60)).is_empty());
        // Back, with the same MAC: the daemon was told it was gone, so it is news.
        assert_eq!(t.observe(A, Some(&e), now), resolved(MAC1));
        // A new episode is reported again.
        assert!(t.observe(A, None, now).is_none());
        assert_eq!(t.expire(now + UNRESOLVED_AFTER).len(), 1);
    }

    #[test]
    fn failed_at_first_look_waits_for_the_retry() {
        let now = Instant::now();
        let mut t = tracker(now);
        let failed = entry(NeighbourState::Failed, None);
        assert_eq!(t.observe(A, Some(&failed), now), None);
        let e = entry(NeighbourState::Reachable, Some(MAC1));
        assert_eq!(t.observe(A, Some(&e), now), resolved(MAC1));
    }

    #[test]
    fn short_gap_is_not_reported() {
        let now = Instant::now();
        let mut t = tracker(now);
        let e = entry(NeighbourState::Reachable, Some(MAC1));
        assert_eq!(t.observe(A, Some(&e), now), resolved(MAC1));
        // Entry deleted (say, `ip neigh flush`) and made again within the grace time.
        let later = now + Duration::from_secs(10);
        assert_eq!(t.observe(A, None, later), None);
        assert_eq!(t.next_deadline(), Some(later + UNRESOLVED_AFTER));
        assert_eq!(t.observe(A, Some(&e), later + Duration::from_secs(1)), None);
        assert!(t.expire(later + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn unwanted_addresses_are_forgotten() {
        let now = Instant::now();
        let mut t = tracker(now);
        let e = entry(NeighbourState::Reachable, Some(MAC1));
        assert_eq!(t.observe(A, Some(&e), now), resolved(MAC1));
        assert_eq!(t.set_wanted(&BTreeSet::new(), now), (vec![], vec![A]));
        assert_eq!(t.observe(A, Some(&e), now), None);
        assert!(t.expire(now + Duration::from_secs(60)).is_empty());
        t.set_wanted(&BTreeSet::from([A]), now);
        assert_eq!(t.observe(A, Some(&e), now), resolved(MAC1));
    }

    #[test]
    fn ipv6_reason_names_neighbour_discovery() {
        let now = Instant::now();
        let b: IpAddr = "fd00::11".parse().unwrap();
        let mut t = Tracker::new("eth0");
        t.set_wanted(&BTreeSet::from([b]), now);
        t.observe(b, None, now);
        let events = t.expire(now + UNRESOLVED_AFTER);
        assert_eq!(
            events,
            vec![NeighborEvent::Unresolved {
                address: b,
                reason: "no neighbour advertisement from fd00::11 on eth0 within 3 s \
                         (no neighbour entry)"
                    .into()
            }]
        );
    }
}
