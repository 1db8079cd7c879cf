//! A digest of what a service's live table decides, so that operators (and tests) can check at
//! a glance that two directors send every new connection to the same master.
//!
//! Only decisions go in: the master of each slot, by address (backend ids are local: two
//! directors may number the same master differently), the table size and how it hashes. The
//! changed marks and previous masters stay out: they are each director's own history (which
//! master came up first), and they decide nothing for a new connection.

use std::net::IpAddr;

use sha2::{Digest as _, Sha256};

use super::marks;

/// Hex characters shown: 64 bits, enough to tell two tables apart at a glance.
const SHOWN: usize = 16;

/// The digest of `table` (Maglev entries), whose masters' addresses `address_of` gives.
pub fn table_digest(table: &[u32], flags: u32, address_of: impl Fn(u32) -> Option<IpAddr>) -> String {
    let mut hash = Sha256::new();
    hash.update(b"mim-lb table 1");
    hash.update((table.len() as u32).to_be_bytes());
    hash.update(flags.to_be_bytes());
    for entry in table {
        // A length byte keeps IPv4 and IPv6 addresses, and "no master", apart.
        match address_of(marks::owner(*entry)) {
            None => hash.update([0u8]),
            Some(IpAddr::V4(a)) => {
                hash.update([4u8]);
                hash.update(a.octets());
            }
            Some(IpAddr::V6(a)) => {
                hash.update([16u8]);
                hash.update(a.octets());
            }
        }
    }
    let full = hash.finalize();
    full.iter().map(|b| format!("{b:02x}")).collect::<String>()[..SHOWN].to_owned()
}

#[cfg(test)]
mod tests {
    use mim_lb_common::maglev_entry;

    use super::*;

    fn addr(id: u32) -> Option<IpAddr> {
        (id != 0).then(|| IpAddr::from([10, 0, 0, id as u8]))
    }

    #[test]
    fn marks_and_ids_do_not_change_the_digest_masters_do() {
        let plain = table_digest(&[1, 2, 3, 1], 0, addr);
        let marked = table_digest(&[1, maglev_entry(2, 3, true), 3, maglev_entry(1, 0, true)], 0, addr);
        assert_eq!(plain, marked, "marks are local history");
        // The same masters under other ids.
        let renumbered = table_digest(&[7, 8, 9, 7], 0, |id| addr(id - 6));
        assert_eq!(plain, renumbered, "ids are local");
        assert_ne!(plain, table_digest(&[1, 2, 3, 2], 0, addr), "a slot's master changed");
        assert_ne!(plain, table_digest(&[1, 2, 3, 1], 1, addr), "another hash");
        assert_ne!(plain, table_digest(&[1, 2, 3], 0, addr), "another size");
        assert_eq!(plain.len(), 16);
    }
}
