//! The benchmark's floor and reference variants, loaded next to mim-lb in `cargo xtask bench`
//! so that each run measures its own baselines. None of these is ever attached.
//!
//! - `bench_floor`: the least an XDP forwarder can do (swap the MACs, XDP_TX).
//! - `bench_hashes`: the floor plus exactly the two hashes mim-lb computes for an established
//!   IPv4 TCP packet (the service-index slot and the flow hash, from `mim_lb_common::hash`),
//!   on the packet's own fields. It shows how much of mim-lb's cost is hashing.
//! - `bench_service_hash`: the floor plus only the service-index slot hash (what a packet
//!   that is not for a service pays for besides parsing and one array lookup).
//! - `bench_clock`, `bench_clock_coarse`: the floor plus one `bpf_ktime_get_ns` (what mim-lb
//!   reads when it records a flow or sees a packet on a changed slot), or one
//!   `bpf_ktime_get_coarse_ns` instead, writing the time into the frame.
//! - `bench_flow_insert`: the floor plus what mim-lb's record of a new flow costs: the flow's
//!   key from the packet, a coarse clock read and one insert into an LRU hash map of mim-lb's
//!   key and value types and of the size the benchmark gives mim-lb's connection table. Run
//!   on the same frame again and again, each run replaces the record the last one made, as
//!   mim-lb's runs of a SYN on a changed slot do.
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::LruHashMap,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use mim_lb_common::{FAMILY_V4, FlowEntry, FlowKey, PROTO_TCP, hash};

/// Entries of `BENCH_FLOWS`: what the per-packet benchmark sizes mim-lb's connection table to
/// (an LRU map's cost per insert does not depend much on its size, but its memory does).
const BENCH_FLOWS_ENTRIES: usize = 65_536;

/// `bench_flow_insert`'s connection table.
#[btf_map]
static BENCH_FLOWS: LruHashMap<FlowKey, FlowEntry, BENCH_FLOWS_ENTRIES> = LruHashMap::new();

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The upper address words of an IPv4 packet (zero), read at run time the way mim-lb sees
/// them after its parser merged the IPv4 and IPv6 paths, so the compiler cannot fold them.
#[unsafe(no_mangle)]
static UPPER_WORDS: [u32; 3] = [0; 3];

#[inline(always)]
fn swap_macs(start: usize) {
    let mac = start as *mut [u8; 6];
    unsafe {
        let dst = *mac;
        *mac = *mac.add(1);
        *mac.add(1) = dst;
    }
}

#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return XDP_PASS;
    }
    swap_macs(start);
    XDP_TX
}

/// Ethernet + IPv4 without options + the TCP ports: (src, dst, sport, dport), wire order.
#[inline(always)]
fn ipv4_tcp(ctx: &XdpContext) -> Option<(u32, u32, u16, u16)> {
    let start = ctx.data();
    if start + 14 + 20 + 4 > ctx.data_end() {
        return None;
    }
    unsafe {
        let src = core::ptr::read_unaligned((start + 26) as *const u32);
        let dst = core::ptr::read_unaligned((start + 30) as *const u32);
        let sport = core::ptr::read_unaligned((start + 34) as *const u16);
        let dport = core::ptr::read_unaligned((start + 36) as *const u16);
        Some((src, dst, sport, dport))
    }
}

#[inline(always)]
fn upper_words() -> [u32; 3] {
    unsafe { core::ptr::read_volatile(&UPPER_WORDS) }
}

/// Mixes the hashes into the frame's destination MAC so that they are computed, then swaps.
#[inline(always)]
fn use_and_swap(start: usize, a: u32, b: u32) {
    unsafe {
        let p = start as *mut [u8; 4];
        let v = u32::from_ne_bytes(*p) ^ a ^ b;
        *p = v.to_ne_bytes();
    }
    swap_macs(start);
}

#[xdp]
pub fn bench_hashes(ctx: XdpContext) -> u32 {
    let Some((src, dst, sport, dport)) = ipv4_tcp(&ctx) else {
        return XDP_PASS;
    };
    let up = upper_words();
    let src = [src, up[0], up[1], up[2]];
    let dst = [dst, up[0], up[1], up[2]];
    let slot = hash::service_slot(up[0], &dst, dport, PROTO_TCP, FAMILY_V4);
    let flow = hash::flow_hash(FAMILY_V4, &src, &dst, sport, dport, PROTO_TCP);
    use_and_swap(ctx.data(), slot, flow);
    XDP_TX
}

#[xdp]
pub fn bench_service_hash(ctx: XdpContext) -> u32 {
    let Some((_, dst, _, dport)) = ipv4_tcp(&ctx) else {
        return XDP_PASS;
    };
    let up = upper_words();
    let dst = [dst, up[0], up[1], up[2]];
    let slot = hash::service_slot(up[0], &dst, dport, PROTO_TCP, FAMILY_V4);
    use_and_swap(ctx.data(), slot, 0);
    XDP_TX
}

#[xdp]
pub fn bench_clock(ctx: XdpContext) -> u32 {
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    clock_into_frame(&ctx, now)
}

#[xdp]
pub fn bench_clock_coarse(ctx: XdpContext) -> u32 {
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    clock_into_frame(&ctx, now)
}

#[xdp]
pub fn bench_flow_insert(ctx: XdpContext) -> u32 {
    let Some((src, dst, sport, dport)) = ipv4_tcp(&ctx) else {
        return XDP_PASS;
    };
    let up = upper_words();
    let key = FlowKey {
        src: [src, up[0], up[1], up[2]],
        dst: [dst, up[0], up[1], up[2]],
        sport,
        dport,
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad0: [0; 2],
    };
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    let entry = FlowEntry { backend_id: 1, service_id: 0, slot: u32::from(sport), flags: 0, last_seen_ns: now };
    // The result goes into the frame, so the insert cannot be dropped (with the bounds
    // checked again: the helper call invalidated the packet pointers).
    let failed = BENCH_FLOWS.insert(&key, &entry, 0).is_err();
    clock_into_frame(&ctx, failed as u64)
}

#[inline(always)]
fn clock_into_frame(ctx: &XdpContext, now: u64) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return XDP_PASS;
    }
    use_and_swap(start, now as u32, 0);
    XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
