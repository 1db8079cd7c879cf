//! Hashes used by both sides. They are pure functions of their inputs with fixed seeds: two
//! directors in front of the same masters, or one director before and after a restart, send a
//! flow to the same master because they compute the same numbers.
//!
//! Inputs are wire-order words (as stored in map keys); each is read as a big-endian number
//! first, so the result does not depend on the host's byte order.
//!
//! The mixing is MurmurHash3's 32-bit block and finalisation steps: cheap in BPF (no loops, no
//! tables) and with full avalanche, which Maglev needs from its flow hash.

use crate::FAMILY_V4;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// Seed of the flow hash (the Maglev slot of a flow).
pub const FLOW_SEED: u32 = 0x6d69_6d6c; // "miml"
/// Seeds of a backend's Maglev permutation (offset and skip).
pub const MAGLEV_OFFSET_SEED: u32 = 0x4d61_676c; // "Magl"
pub const MAGLEV_SKIP_SEED: u32 = 0x6576_3031; // "ev01"

#[inline(always)]
const fn block(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len_words: u32) -> u32 {
    let mut h = h ^ (len_words * 4);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn wire(w: u32) -> u32 {
    u32::from_be(w)
}

/// Hash of an address and one extra host-order word. An IPv4 address is one word (the
/// other three are zero and are not hashed: mixing zeros costs a third of the program's time
/// on IPv4 packets and separates nothing).
#[inline(always)]
pub const fn hash_addr(seed: u32, family: u8, addr: &[u32; 4], extra: u32) -> u32 {
    let mut h = seed;
    h = block(h, wire(addr[0]));
    if family == FAMILY_V4 {
        h = block(h, extra);
        return finish(h, 2);
    }
    h = block(h, wire(addr[1]));
    h = block(h, wire(addr[2]));
    h = block(h, wire(addr[3]));
    h = block(h, extra);
    finish(h, 5)
}

/// The flow hash of the `maglev` scheduler: source and destination address, both ports
/// (wire order) and the protocol.
#[inline(always)]
pub const fn flow_hash(family: u8, src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = ((u16::from_be(sport) as u32) << 16) | u16::from_be(dport) as u32;
    let mut h = FLOW_SEED;
    if family == FAMILY_V4 {
        h = block(h, wire(src[0]));
        h = block(h, wire(dst[0]));
        h = block(h, ports);
        h = block(h, proto as u32);
        return finish(h, 4);
    }
    h = block(h, wire(src[0]));
    h = block(h, wire(src[1]));
    h = block(h, wire(src[2]));
    h = block(h, wire(src[3]));
    h = block(h, wire(dst[0]));
    h = block(h, wire(dst[1]));
    h = block(h, wire(dst[2]));
    h = block(h, wire(dst[3]));
    h = block(h, ports);
    h = block(h, proto as u32);
    finish(h, 10)
}

/// The flow hash of the `maglev-source` scheduler: the client address only, so every
/// connection of one client reaches the same master (persistence).
#[inline(always)]
pub const fn source_hash(family: u8, src: &[u32; 4]) -> u32 {
    hash_addr(FLOW_SEED, family, src, 0)
}

/// The service-index slot of (vip, port, protocol, family) for a given seed. The control plane
/// searches for a seed under which all configured services land in distinct slots.
#[inline(always)]
pub const fn service_slot(seed: u32, vip: &[u32; 4], port: u16, proto: u8, family: u8) -> u32 {
    let extra = ((u16::from_be(port) as u32) << 16) | ((proto as u32) << 8) | family as u32;
    hash_addr(seed, family, vip, extra) & (crate::limits::SERVICE_SLOTS - 1)
}

/// The Maglev slot of a flow hash in a table of `table_size` slots: the hash scaled to the
/// table (`hash * size / 2^32`) instead of `hash % size`, which the data path would pay for
/// with a division on every packet. Uniform for a well-mixed hash, and the one definition
/// both sides use.
#[inline(always)]
pub const fn table_slot(hash: u32, table_size: u32) -> u32 {
    ((hash as u64 * table_size as u64) >> 32) as u32
}

/// Where a flow of flow hash `flow` lands in a backend's active-connection sketch: (register,
/// rank), HyperLogLog's register index and 1 + the trailing zeros of the next bits. Both come
/// from the low 16 bits of the flow hash: a backend's flows share its high bits (they chose
/// its Maglev slots, `table_slot`), while the low ones are as mixed as the hash. The rank is
/// looked up, not counted: BPF has no instruction that counts zeros.
#[inline(always)]
pub const fn sketch_register(flow: u32) -> (u32, u8) {
    let index = flow & (crate::limits::SKETCH_REGISTERS as u32 - 1);
    let rest = (flow >> crate::limits::SKETCH_INDEX_BITS) & (SKETCH_RANK_INPUTS as u32 - 1);
    (index, SKETCH_RANKS[rest as usize])
}

/// Bits of the flow hash a sketch rank is taken from: ranks go up to 11, enough to count
/// about 64 x 2^11 connections per master and window.
pub const SKETCH_RANK_BITS: u32 = 10;
const SKETCH_RANK_INPUTS: usize = 1 << SKETCH_RANK_BITS;

/// 1 + trailing zeros of each `SKETCH_RANK_BITS`-bit value (`SKETCH_RANK_BITS + 1` for 0).
pub const SKETCH_RANKS: [u8; SKETCH_RANK_INPUTS] = {
    let mut t = [0u8; SKETCH_RANK_INPUTS];
    let mut i = 0;
    while i < SKETCH_RANK_INPUTS {
        t[i] = if i == 0 { SKETCH_RANK_BITS as u8 + 1 } else { (i as u32).trailing_zeros() as u8 + 1 };
        i += 1;
    }
    t
};

/// Hash of arbitrary bytes (userspace only: names and addresses of backends for Maglev).
pub fn hash_bytes(seed: u32, bytes: &[u8]) -> u32 {
    let mut h = seed;
    let mut chunks = bytes.chunks_exact(4);
    for c in &mut chunks {
        h = block(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 4];
        last[..rest.len()].copy_from_slice(rest);
        // Same tail treatment as MurmurHash3: mixed without the rotate-multiply-add step.
        let k = u32::from_le_bytes(last).wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    let mut h = h ^ bytes.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_reference_vectors() {
        // Published MurmurHash3_x86_32 results, which pin the mixing steps down.
        assert_eq!(hash_bytes(0, b""), 0);
        assert_eq!(hash_bytes(1, b""), 0x514e_28b7);
        assert_eq!(hash_bytes(0, b"test"), 0xba6b_d213);
        assert_eq!(hash_bytes(0x9747_b28c, b"Hello, world!"), 0x2488_4cba);
        assert_eq!(hash_bytes(0, b"The quick brown fox jumps over the lazy dog"), 0x2e4f_f723);
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let a = [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0];
        let b = [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0];
        let v4 = crate::FAMILY_V4;
        let base = flow_hash(v4, &a, &b, 1000u16.to_be(), 80u16.to_be(), 6);
        assert_ne!(base, flow_hash(v4, &b, &a, 1000u16.to_be(), 80u16.to_be(), 6));
        assert_ne!(base, flow_hash(v4, &a, &b, 1001u16.to_be(), 80u16.to_be(), 6));
        assert_ne!(base, flow_hash(v4, &a, &b, 1000u16.to_be(), 81u16.to_be(), 6));
        assert_ne!(base, flow_hash(v4, &a, &b, 1000u16.to_be(), 80u16.to_be(), 17));
        let c = [u32::from_ne_bytes([0x20, 1, 0x0d, 0xb8]), 0, 0, 1u32.to_be()];
        let d = [u32::from_ne_bytes([0x20, 1, 0x0d, 0xb8]), 0, 0, 2u32.to_be()];
        let six = flow_hash(crate::FAMILY_V6, &c, &d, 1000u16.to_be(), 80u16.to_be(), 6);
        assert_ne!(six, flow_hash(crate::FAMILY_V6, &d, &c, 1000u16.to_be(), 80u16.to_be(), 6));
    }

    /// Pins the hashes: two directors (or one before and after an upgrade) must send every
    /// flow to the same master, so a change here is a change of every flow's master.
    #[test]
    fn golden_hash_values() {
        let client = [u32::from_ne_bytes([192, 0, 2, 7]), 0, 0, 0];
        let vip = [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0];
        let client6 = [u32::from_ne_bytes([0x20, 1, 0x0d, 0xb8]), 0, 0, 7u32.to_be()];
        let vip6 = [u32::from_ne_bytes([0x20, 1, 0x0d, 0xb8]), 0, 0, 0x100u32.to_be()];
        let v4 = crate::FAMILY_V4;
        let v6 = crate::FAMILY_V6;
        assert_eq!(flow_hash(v4, &client, &vip, 40000u16.to_be(), 7000u16.to_be(), 6), GOLDEN[0]);
        assert_eq!(flow_hash(v6, &client6, &vip6, 40000u16.to_be(), 7000u16.to_be(), 17), GOLDEN[1]);
        assert_eq!(source_hash(v4, &client), GOLDEN[2]);
        assert_eq!(source_hash(v6, &client6), GOLDEN[3]);
        assert_eq!(service_slot(0, &vip, 7000u16.to_be(), 6, v4), GOLDEN[4]);
        assert_eq!(service_slot(0, &vip6, 7000u16.to_be(), 6, v6), GOLDEN[5]);
    }

    #[test]
    fn table_slots_cover_the_table_evenly() {
        let size = 65_537u32;
        assert_eq!(table_slot(0, size), 0);
        assert_eq!(table_slot(u32::MAX, size), size - 1);
        let mut counts = [0u32; 7];
        for i in 0..70_000u32 {
            counts[table_slot(hash_bytes(1, &i.to_le_bytes()), 7) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }

    const GOLDEN: [u32; 6] = [0x03c3_0f5a, 0x2440_6bb7, 0x01ae_da04, 0xd1a6_b555, 947, 768];
}
