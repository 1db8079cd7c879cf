//! The Maglev lookup table (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016), extended to weights.
//!
//! Each backend has a fixed preference order over the slots, a permutation derived from its key
//! alone. Backends take turns; on its turn a backend claims its most preferred slot that is
//! still free. Because a backend's preferences never depend on the other backends, removing
//! or adding one mostly changes the slots it owns, which is what keeps established flows on
//! their backend when the set changes.
//!
//! Weights decide how often a backend gets a turn: its k-th turn (k = 1, 2, ...) happens at
//! time (k - 1/2) / weight, so after any number of turns every backend's count is within one of
//! its exact share (Webster/Sainte-Laguë apportionment). The time of a backend's turns depends
//! only on its own weight, so the relative order of the other backends' turns, and with it the
//! minimal disruption of unweighted Maglev, survives the removal of one of them. Equal weights
//! give plain Maglev: one turn each per round, in key order.

use std::{cmp::Ordering, collections::BinaryHeap};

use mim_lb_common::hash::{MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED, hash_bytes};

/// A backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// What the table holds for the backend's slots; should be non-zero (0 means "no backend").
    pub id: u32,
    /// Identifies the backend across rebuilds (its address octets); unique within a table.
    pub key: &'a [u8],
    /// Relative share of the slots; 0 takes none.
    pub weight: u32,
}

/// Builds a Maglev table of `table_size` slots: `entries[i]` is the id of the backend owning
/// slot `i`, or 0 when no backend has a weight above 0.
///
/// The result depends only on the set of (key, weight, id), never on the order of `backends`.
/// `table_size` should be a prime (the configuration guarantees it); otherwise some
/// permutations do not reach every slot and slots nobody reaches stay 0.
pub fn build(backends: &[MaglevBackend], table_size: u32) -> Vec<u32> {
    let m = table_size as usize;
    let mut entries = vec![0u32; m];

    let mut live: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if m == 0 || live.is_empty() {
        return entries;
    }
    // Turn order ties are broken by position in this order, which is why it must not depend on
    // the caller's order.
    live.sort_unstable_by(|a, b| a.key.cmp(b.key).then(a.id.cmp(&b.id)));
    debug_assert!(
        live.windows(2).all(|w| w[0].key != w[1].key),
        "Maglev backend keys must be unique"
    );

    let mut walks: Vec<Walk> = live.iter().map(|b| Walk::new(b.key, table_size)).collect();
    let mut taken = vec![false; m];
    let mut free = m;

    let mut turns: BinaryHeap<Turn> = live
        .iter()
        .enumerate()
        .map(|(index, b)| Turn {
            k: 1,
            weight: b.weight,
            index,
        })
        .collect();

    while free > 0 {
        let Some(turn) = turns.pop() else {
            // Only reachable when table_size is not prime: every permutation is exhausted.
            break;
        };
        let walk = &mut walks[turn.index];
        if let Some(slot) = walk.claim_next_free(&taken) {
            taken[slot] = true;
            entries[slot] = live[turn.index].id;
            free -= 1;
            turns.push(Turn {
                k: turn.k + 1,
                ..turn
            });
        }
    }
    entries
}

/// A backend's position in its permutation: slot j of the permutation is
/// (offset + j * skip) mod M.
struct Walk {
    next: u32,
    skip: u32,
    m: u32,
    /// Slots looked at so far; after M of them the whole cycle has been seen.
    steps: u32,
}

impl Walk {
    fn new(key: &[u8], m: u32) -> Walk {
        let offset = hash_bytes(MAGLEV_OFFSET_SEED, key) % m;
        // skip in 1..M, so for a prime M the walk visits every slot exactly once.
        let skip = hash_bytes(MAGLEV_SKIP_SEED, key) % (m - 1).max(1) + 1;
        Walk {
            next: offset,
            skip: skip % m,
            m,
            steps: 0,
        }
    }

    /// The next slot of the permutation not yet taken, or `None` once the walk has been all the
    /// way round (possible only for a non-prime table size).
    fn claim_next_free(&mut self, taken: &[bool]) -> Option<usize> {
        while self.steps < self.m {
            let slot = self.next;
            self.steps += 1;
            // Both below M < 2^32, so the sum cannot overflow u64, and a subtraction suffices.
            let sum = u64::from(self.next) + u64::from(self.skip);
            self.next = if sum >= u64::from(self.m) {
                sum - u64::from(self.m)
            } else {
                sum
            } as u32;
            if !taken[slot as usize] {
                return Some(slot as usize);
            }
        }
        None
    }
}

/// The k-th turn of the backend at `index`, due at time (2k - 1) / (2 * weight).
#[derive(Clone, Copy, Debug)]
struct Turn {
    k: u32,
    weight: u32,
    index: usize,
}

impl Turn {
    /// Earlier turns first; at equal times, the backend with the smaller key.
    fn order(&self, other: &Turn) -> Ordering {
        // Compare (2k-1)/w by cross-multiplying: both factors are below 2^33, so no overflow.
        let mine = (2 * u64::from(self.k) - 1) * u64::from(other.weight);
        let theirs = (2 * u64::from(other.k) - 1) * u64::from(self.weight);
        mine.cmp(&theirs).then(self.index.cmp(&other.index))
    }
}

// BinaryHeap pops the greatest element, so "greater" means "due sooner".
impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        self.order(other).reverse()
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const M: u32 = 65_537;

    /// Backends 10.0.i.j with ids 1.. and the given weights.
    fn keys(n: usize) -> Vec<[u8; 4]> {
        (0..n)
            .map(|i| Ipv4Addr::new(10, 0, (i / 200) as u8, (i % 200 + 11) as u8).octets())
            .collect()
    }

    fn backends<'a>(keys: &'a [[u8; 4]], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (key, &weight))| MaglevBackend {
                id: i as u32 + 1,
                key,
                weight,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n + 1];
        for &id in table {
            c[id as usize] += 1;
        }
        c
    }

    /// Asserts every backend's share is within 1% of the table size of its ideal share, and
    /// returns the largest deviation in slots.
    fn assert_shares(weights: &[u32], m: u32) -> f64 {
        let k = keys(weights.len());
        let table = build(&backends(&k, weights), m);
        assert!(table.iter().all(|&id| id != 0), "every slot is owned");
        let c = counts(&table, weights.len());
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut worst = 0f64;
        for (i, &w) in weights.iter().enumerate() {
            let ideal = f64::from(m) * f64::from(w) / total as f64;
            let off = (c[i + 1] as f64 - ideal).abs();
            assert!(
                off <= f64::from(m) * 0.01,
                "backend {i} (weight {w}) has {} slots, ideal {ideal:.1}",
                c[i + 1]
            );
            worst = worst.max(off);
        }
        worst
    }

    /// Small deterministic generator so the "random" weights are the same on every run.
    fn pseudo_random(seed: u32, n: usize, max: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| hash_bytes(seed, &i.to_le_bytes()) % max + 1)
            .collect()
    }

    #[test]
    fn equal_weights_share_equally() {
        for n in [1, 2, 3, 10, 100] {
            let worst = assert_shares(&vec![100; n], M);
            // Plain Maglev with equal weights gives every backend M/N rounded.
            assert!(worst <= 1.0, "n={n}: off by {worst}");
        }
    }

    #[test]
    fn unequal_weights_follow_weights() {
        assert!(assert_shares(&[1, 2, 3, 10], M) <= 1.0);
        assert!(assert_shares(&pseudo_random(7, 10, 1000), M) <= 1.0);
        assert!(assert_shares(&pseudo_random(8, 10, 65_535), M) <= 1.0);
        assert!(assert_shares(&[65_535, 1, 1, 1], M) <= 1.0);
        // Small tables too (the shares are still within one slot).
        assert!(assert_shares(&[1, 2, 3, 10], 251) <= 1.0);
    }

    #[test]
    fn zero_weight_gets_no_slot() {
        let k = keys(4);
        let table = build(&backends(&k, &[100, 0, 100, 50]), M);
        let c = counts(&table, 4);
        assert_eq!(c[0], 0);
        assert_eq!(c[2], 0);
        assert!(c[1] > 0 && c[3] > 0 && c[4] > 0);
    }

    #[test]
    fn nothing_to_place_gives_zeros() {
        assert_eq!(build(&[], 7), vec![0; 7]);
        let k = keys(3);
        assert_eq!(build(&backends(&k, &[0, 0, 0]), M), vec![0; M as usize]);
        assert_eq!(build(&backends(&k, &[1, 1, 1]), 0), Vec::<u32>::new());
    }

    #[test]
    fn order_does_not_matter() {
        let k = keys(20);
        let weights = pseudo_random(3, 20, 200);
        let forward = backends(&k, &weights);
        let table = build(&forward, M);
        let mut reversed = forward.clone();
        reversed.reverse();
        assert_eq!(build(&reversed, M), table);
        // A fixed shuffle: every 7th, wrapping around (7 and 20 are coprime).
        let shuffled: Vec<_> = (0..20).map(|i| forward[(i * 7) % 20]).collect();
        assert_eq!(build(&shuffled, M), table);
    }

    /// Slots whose owner changed between `before` and `after` and involve neither `left` (a
    /// backend only in `before`) nor `joined` (only in `after`): flows moved needlessly.
    fn needless_moves(before: &[u32], after: &[u32], left: u32, joined: u32) -> usize {
        before
            .iter()
            .zip(after)
            .filter(|&(&b, &a)| b != a && b != left && a != joined)
            .count()
    }

    fn assert_removal_disruption(weights: &[u32]) -> (usize, f64) {
        let n = weights.len();
        let k = keys(n);
        let all = backends(&k, weights);
        let before = build(&all, M);
        let mut worst = 0;
        for gone in 0..n {
            let rest: Vec<_> = all
                .iter()
                .copied()
                .filter(|b| b.id != gone as u32 + 1)
                .collect();
            let after = build(&rest, M);
            assert!(!after.contains(&(gone as u32 + 1)));
            let moved = needless_moves(&before, &after, gone as u32 + 1, u32::MAX);
            assert!(
                moved as f64 <= f64::from(M) * 0.01,
                "N={n}: removing backend {gone} moved {moved} other slots"
            );
            worst = worst.max(moved);
        }
        (worst, worst as f64 * 100.0 / f64::from(M))
    }

    fn assert_addition_disruption(weights: &[u32], new_weight: u32) -> (usize, f64) {
        let n = weights.len();
        let k = keys(n + 1);
        let mut with_new = weights.to_vec();
        with_new.push(new_weight);
        let all = backends(&k, &with_new);
        let before = build(&all[..n], M);
        let after = build(&all, M);
        let moved = needless_moves(&before, &after, u32::MAX, n as u32 + 1);
        assert!(
            moved as f64 <= f64::from(M) * 0.01,
            "N={n}: adding a backend moved {moved} other slots"
        );
        (moved, moved as f64 * 100.0 / f64::from(M))
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        for n in [3, 5, 10, 50] {
            let (moved, pct) = assert_removal_disruption(&vec![100; n]);
            println!(
                "equal weights, N={n}: worst removal moved {moved} other slots ({pct:.3}% of M)"
            );
            let (moved, pct) = assert_removal_disruption(&pseudo_random(n as u32, n, 1000));
            println!(
                "random weights, N={n}: worst removal moved {moved} other slots ({pct:.3}% of M)"
            );
        }
    }

    #[test]
    fn adding_a_backend_moves_little_else() {
        for n in [3, 5, 10, 50] {
            let (moved, pct) = assert_addition_disruption(&vec![100; n], 100);
            println!("equal weights, N={n}: addition moved {moved} other slots ({pct:.3}% of M)");
            let (moved, pct) = assert_addition_disruption(&pseudo_random(n as u32, n, 1000), 500);
            println!("random weights, N={n}: addition moved {moved} other slots ({pct:.3}% of M)");
        }
    }

    #[test]
    fn changing_a_weight_moves_little_else() {
        let k = keys(10);
        let mut weights = vec![100; 10];
        let before = build(&backends(&k, &weights), M);
        weights[4] = 0;
        let after = build(&backends(&k, &weights), M);
        let moved = needless_moves(&before, &after, 5, u32::MAX);
        println!("draining 1 of 10: moved {moved} other slots");
        assert!(moved as f64 <= f64::from(M) * 0.01);
    }

    /// Pins the table: the same backend set must give the same table on every machine and in
    /// every version, or a restarted or second director would send flows elsewhere.
    #[test]
    fn golden_fingerprint() {
        let keys = [[10, 0, 0, 11], [10, 0, 0, 12], [10, 0, 0, 13]];
        let table = build(&backends(&keys, &[100, 100, 100]), M);
        let bytes: Vec<u8> = table.iter().flat_map(|id| id.to_le_bytes()).collect();
        assert_eq!(
            &table[..16],
            &[1, 2, 3, 1, 1, 1, 1, 1, 1, 1, 3, 2, 2, 3, 2, 2],
            "the 3-backend table changed"
        );
        assert_eq!(
            hash_bytes(0, &bytes),
            0x9928_ca0a,
            "the 3-backend table changed"
        );
        // Equal weights: 65537 = 3 * 21845 + 2, and the first two in key order get the extras.
        assert_eq!(counts(&table, 3)[1..], [21_846, 21_846, 21_845]);
    }

    #[test]
    fn non_prime_sizes_terminate() {
        let k = keys(3);
        for m in [1, 2, 4, 6, 100, 65_536] {
            let table = build(&backends(&k, &[1, 2, 3]), m);
            assert_eq!(table.len(), m as usize);
        }
        // One slot: the first turn takes it.
        assert_ne!(build(&backends(&k, &[1, 2, 3]), 1)[0], 0);
    }

    #[test]
    fn large_build_is_fast() {
        let k = keys(1000);
        let weights = pseudo_random(11, 1000, 65_535);
        let b = backends(&k, &weights);
        let start = std::time::Instant::now();
        let table = build(&b, M);
        let took = start.elapsed();
        println!("M={M}, 1000 backends: built in {took:?}");
        assert!(table.iter().all(|&id| id != 0));
        // Generous: debug builds are much slower than release.
        assert!(took.as_secs() < 5, "took {took:?}");
    }
}
