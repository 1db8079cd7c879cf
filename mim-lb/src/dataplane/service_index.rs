//! Placement of services in the service index.
//!
//! The XDP program finds a service in one probe: it hashes (vip, port, protocol, family) with
//! the half's seed to a slot and compares the full key there. That only works if no two entries
//! share a slot, so the control plane searches for a seed that keeps them apart. With at most
//! `2 * MAX_SERVICES` entries in `SERVICE_SLOTS` slots a collision-free seed turns up within a
//! few thousand tries.

use std::net::IpAddr;

use mim_lb_common::{FAMILY_V4, FAMILY_V6, ServiceEntry, hash::service_slot, limits};

/// Most entries one half holds: every service plus a VIP marker for each (vip, protocol).
pub const MAX_ENTRIES: usize = 2 * limits::MAX_SERVICES as usize;

/// Seeds tried before giving up. For `MAX_ENTRIES` entries a seed works with probability about
/// 1/2700, so failing this many in a row is practically impossible for valid input.
pub const MAX_SEEDS: u32 = 100_000;

/// Entries placed under one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub seed: u32,
    /// (slot, entry), sorted by slot; slots are distinct and below `SERVICE_SLOTS`.
    pub slots: Vec<(u32, ServiceEntry)>,
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    #[error("{count} service index entries, at most {max} fit")]
    TooMany { count: usize, max: usize },
    #[error("no seed below {tried} places all {count} service index entries in distinct slots")]
    NoSeed { count: usize, tried: u32 },
    #[error("service index entry {vip}:{port} protocol {proto} appears twice")]
    Duplicate { vip: String, port: u16, proto: u8 },
    #[error("service index entry has address family {family}, expected {FAMILY_V4} or {FAMILY_V6}")]
    BadFamily { family: u8 },
}

/// The wire-order address words of `ip` as stored in map keys, and its family.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

/// The address that wire-order `words` of `family` encode (the inverse of [`addr_words`]).
pub fn words_addr(words: &[u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (chunk, w) in o.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

/// The lookup key of an entry: what the data path compares.
type Key = ([u32; 4], u16, u8, u8);

fn key(e: &ServiceEntry) -> Key {
    (e.vip, e.port, e.proto, e.family)
}

fn slot_of(seed: u32, e: &ServiceEntry) -> u32 {
    service_slot(seed, &e.vip, e.port, e.proto, e.family)
}

/// Finds the smallest seed under which every entry has a slot of its own. The result depends
/// only on the set of entries, not on their order.
pub fn place(entries: &[ServiceEntry]) -> Result<Placed, IndexError> {
    if entries.len() > MAX_ENTRIES {
        return Err(IndexError::TooMany {
            count: entries.len(),
            max: MAX_ENTRIES,
        });
    }
    if let Some(e) = entries
        .iter()
        .find(|e| e.family != FAMILY_V4 && e.family != FAMILY_V6)
    {
        return Err(IndexError::BadFamily { family: e.family });
    }
    let mut keys: Vec<Key> = entries.iter().map(key).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        let (vip, port, proto, family) = w[0];
        return Err(IndexError::Duplicate {
            vip: words_addr(&vip, family).to_string(),
            port: u16::from_be(port),
            proto,
        });
    }

    const WORDS: usize = limits::SERVICE_SLOTS as usize / 64;
    for seed in 0..MAX_SEEDS {
        let mut used = [0u64; WORDS];
        let distinct = entries.iter().all(|e| {
            let slot = slot_of(seed, e) as usize;
            let (word, bit) = (slot / 64, 1u64 << (slot % 64));
            let free = used[word] & bit == 0;
            used[word] |= bit;
            free
        });
        if distinct {
            let mut slots: Vec<(u32, ServiceEntry)> =
                entries.iter().map(|e| (slot_of(seed, e), *e)).collect();
            slots.sort_unstable_by_key(|&(slot, _)| slot);
            return Ok(Placed { seed, slots });
        }
    }
    Err(IndexError::NoSeed {
        count: entries.len(),
        tried: MAX_SEEDS,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use mim_lb_common::{PROTO_TCP, PROTO_UDP, SERVICE_F_VIP_MARKER};

    use super::*;

    fn entry(ip: IpAddr, port: u16, proto: u8, service_id: u32) -> ServiceEntry {
        let (vip, family) = addr_words(ip);
        ServiceEntry {
            vip,
            port: port.to_be(),
            proto,
            family,
            service_id,
            flags: if port == 0 { SERVICE_F_VIP_MARKER } else { 0 },
            table_size: limits::MAGLEV_DEFAULT_TABLE_SIZE,
            ..Default::default()
        }
    }

    /// MAX_SERVICES services on distinct VIPs, half IPv4, half IPv6, mixed protocols, and one
    /// VIP marker for each.
    fn full_set() -> Vec<ServiceEntry> {
        let mut v = Vec::new();
        for i in 0..limits::MAX_SERVICES {
            let ip = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1))
            } else {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16 + 1))
            };
            let proto = if i % 3 == 0 { PROTO_UDP } else { PROTO_TCP };
            v.push(entry(ip, 7000 + i as u16, proto, i));
            v.push(entry(ip, 0, proto, i));
        }
        v
    }

    fn check(placed: &Placed, entries: &[ServiceEntry]) {
        assert_eq!(placed.slots.len(), entries.len());
        let mut seen = std::collections::HashSet::new();
        for (slot, e) in &placed.slots {
            assert!(*slot < limits::SERVICE_SLOTS);
            assert!(seen.insert(*slot), "slot {slot} used twice");
            assert_eq!(
                *slot,
                service_slot(placed.seed, &e.vip, e.port, e.proto, e.family)
            );
            assert!(entries.contains(e));
        }
        assert!(placed.slots.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn full_set_places_without_collisions() {
        let entries = full_set();
        assert_eq!(entries.len(), MAX_ENTRIES);
        let placed = place(&entries).unwrap();
        println!("{} entries placed with seed {}", entries.len(), placed.seed);
        check(&placed, &entries);
    }

    #[test]
    fn placement_does_not_depend_on_order() {
        let entries = full_set();
        let placed = place(&entries).unwrap();
        let mut reversed = entries.clone();
        reversed.reverse();
        assert_eq!(place(&reversed).unwrap(), placed);
        let shuffled: Vec<_> = (0..entries.len())
            .map(|i| entries[(i * 37) % entries.len()])
            .collect();
        assert_eq!(place(&shuffled).unwrap(), placed);
    }

    #[test]
    fn first_working_seed_is_taken() {
        let one = [entry(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)),
            7000,
            PROTO_TCP,
            0,
        )];
        assert_eq!(place(&one).unwrap().seed, 0);
        assert_eq!(
            place(&[]).unwrap(),
            Placed {
                seed: 0,
                slots: vec![]
            }
        );

        let entries = full_set();
        let placed = place(&entries).unwrap();
        for seed in 0..placed.seed {
            let mut slots: Vec<u32> = entries
                .iter()
                .map(|e| service_slot(seed, &e.vip, e.port, e.proto, e.family))
                .collect();
            slots.sort_unstable();
            slots.dedup();
            assert!(
                slots.len() < entries.len(),
                "seed {seed} worked but was skipped"
            );
        }
    }

    #[test]
    fn rejects_bad_input() {
        let mut entries = full_set();
        entries.push(entries[5]);
        assert!(matches!(
            place(&entries),
            Err(IndexError::TooMany {
                count: 129,
                max: 128
            })
        ));

        let vip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100));
        let a = entry(vip, 7000, PROTO_TCP, 0);
        let mut b = entry(vip, 7000, PROTO_TCP, 1);
        b.flags = 7;
        let err = place(&[a, entry(vip, 7000, PROTO_UDP, 2), b]).unwrap_err();
        assert_eq!(
            err,
            IndexError::Duplicate {
                vip: "10.0.0.100".into(),
                port: 7000,
                proto: PROTO_TCP
            }
        );
        assert_eq!(
            err.to_string(),
            "service index entry 10.0.0.100:7000 protocol 6 appears twice"
        );

        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let err = place(&[entry(v6, 443, PROTO_TCP, 0), entry(v6, 443, PROTO_TCP, 1)]).unwrap_err();
        assert_eq!(
            err,
            IndexError::Duplicate {
                vip: "2001:db8::1".into(),
                port: 443,
                proto: PROTO_TCP
            }
        );

        let empty = ServiceEntry::default();
        assert_eq!(place(&[empty]), Err(IndexError::BadFamily { family: 0 }));
    }

    #[test]
    fn address_words_are_wire_order() {
        let (w, family) = addr_words(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)));
        assert_eq!(family, FAMILY_V4);
        assert_eq!(w[0].to_ne_bytes(), [10, 0, 0, 100]);
        assert_eq!(&w[1..], &[0, 0, 0]);

        let v6: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
        let (w, family) = addr_words(IpAddr::V6(v6));
        assert_eq!(family, FAMILY_V6);
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        assert_eq!(bytes, v6.octets());
        assert_eq!(words_addr(&w, family), IpAddr::V6(v6));
    }
}
