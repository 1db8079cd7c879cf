//! The mim-lb XDP program: packets for a configured VIP:port are sent back out of the
//! interface (XDP_TX) to a master, with only the two MAC addresses rewritten; everything else
//! goes to the kernel untouched.
#![no_std]
#![no_main]

mod fragment;
mod maps;
mod parse;
mod select;
mod stats;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use mim_lb_common::{BackendEntry, GLOBALS_F_READY, Globals, PROTO_TCP, SERVICE_F_VIP_MARKER, reason};
use network_types::eth::EthHdr;

use crate::maps::GLOBALS;

/// Non-zero in the copy of the program that `mim-lb simulate` loads next to the live one
/// (sharing its maps): that copy records no flow, counts nothing and returns
/// `reason::SIMULATED + code` instead of a verdict. The live copy is loaded with 0; the value
/// is read-only data, so the verifier removes the simulation branches from it entirely.
#[unsafe(no_mangle)]
static SIMULATE: u8 = 0;

#[inline(always)]
pub(crate) fn simulating() -> bool {
    // SAFETY: a plain read of a static; volatile so the compiler keeps the load that the
    // loader's override decides.
    unsafe { core::ptr::read_volatile(&SIMULATE) != 0 }
}

/// The entry point: runs the data path and turns its outcome into a verdict, counting every
/// packet under exactly one reason.
#[xdp]
pub fn mim_lb(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let code = match try_mim_lb(&ctx, bytes) {
        Ok(()) => reason::FORWARDED,
        Err(code) => code,
    };
    if simulating() {
        return reason::SIMULATED + code;
    }
    stats::count_reason(code, bytes);
    verdict(code)
}

/// `reason::verdict` of every code below 32, two bits each (XDP_DROP 1, XDP_PASS 2, XDP_TX 3),
/// built from it at compile time: a verdict is then a shift and a mask, whatever the number
/// of reasons (a `match` grows a test with each reason that is not a pass).
const VERDICTS: u64 = {
    let mut table = 0u64;
    let mut code = 0;
    while code < 32 {
        table |= (reason::verdict(code) as u64) << (2 * code);
        code += 1;
    }
    table
};

#[inline(always)]
fn verdict(code: u32) -> u32 {
    if code < 32 { ((VERDICTS >> (2 * code)) & 3) as u32 } else { reason::verdict(code) }
}

/// Passes every packet. Attached to the peer of a veth that runs mim-lb in native mode:
/// without an XDP program there, frames sent back with XDP_TX are dropped by the veth driver.
#[xdp]
pub fn mim_lb_pass(_ctx: XdpContext) -> u32 {
    reason::XDP_PASS
}

#[inline(always)]
fn try_mim_lb(ctx: &XdpContext, bytes: u64) -> Result<(), u32> {
    let globals = GLOBALS.get(0).ok_or(reason::INTERNAL)?;
    if globals.flags & GLOBALS_F_READY == 0 {
        return Err(reason::NOT_READY);
    }
    let packet = parse::parse(ctx)?;
    let eth: *mut EthHdr = parse::ptr_at(ctx, 0)?;

    if packet.kind == parse::ICMP_ERROR {
        return icmp_error(ctx, globals, &packet, eth, bytes);
    }
    if packet.kind == parse::FRAGMENT {
        return fragment::later(globals, &packet, eth, bytes);
    }
    let service = match select::service(globals, &packet, packet.dport) {
        // Port 0 matching a VIP marker is no service either.
        Some(s) if s.flags & SERVICE_F_VIP_MARKER == 0 => s,
        _ if packet.kind == parse::FIRST_FRAGMENT => return fragment::unserved_first(globals, &packet, eth),
        _ => return Err(reason::NOT_A_SERVICE),
    };
    addressed_to_gateway(eth, globals)?;
    let choice = select::choose(ctx, service, &packet)?;

    // SAFETY: `eth` points at a whole Ethernet header inside the frame (ptr_at checked it),
    // and both sources are six-byte arrays inside map values that live for the program run.
    unsafe { rewrite_macs(eth, choice.backend, globals) };
    if !simulating() {
        stats::count_forward(service.service_id, choice.backend_id, bytes, choice.new_flow);
        if packet.proto == PROTO_TCP {
            stats::note_flow(choice.backend_id, choice.flow_hash);
        }
    }
    if packet.kind == parse::FIRST_FRAGMENT {
        fragment::remember(&packet, service, choice.backend_id);
        return Err(reason::FRAGMENT_FIRST);
    }
    Ok(())
}

/// Points the frame at `backend`, from the gateway.
///
/// # Safety
/// `eth` must point at a whole Ethernet header inside the frame.
#[inline(always)]
pub(crate) unsafe fn rewrite_macs(eth: *mut EthHdr, backend: &BackendEntry, globals: &Globals) {
    unsafe {
        copy_mac((*eth).dst_addr.as_mut_ptr(), backend.mac.as_ptr());
        copy_mac((*eth).src_addr.as_mut_ptr(), globals.gateway_mac.as_ptr());
    }
}

/// An ICMP error about a master's answer (`packet` is the quoted flow turned round, as the
/// flow's own packets arrive): sent to the master that those packets go to now, chosen by the
/// same rule in a mode that records nothing and refreshes nothing, so an error (which anyone
/// can forge) never creates or moves a flow. The outcome is a reason code, never `Ok`.
#[inline(always)]
fn icmp_error(
    ctx: &XdpContext,
    globals: &Globals,
    packet: &parse::Packet,
    eth: *mut EthHdr,
    bytes: u64,
) -> Result<(), u32> {
    // An error about a packet of no service is the kernel's, as all ICMP was before.
    let service = select::service(globals, packet, packet.dport).ok_or(reason::NOT_TCP_UDP)?;
    if service.flags & SERVICE_F_VIP_MARKER != 0 {
        return Err(reason::NOT_TCP_UDP);
    }
    addressed_to_gateway(eth, globals)?;
    let choice = select::choose_quietly(ctx, service, packet)?;
    // SAFETY: as in `try_mim_lb`.
    unsafe { rewrite_macs(eth, choice.backend, globals) };
    if !simulating() {
        stats::count_forward(service.service_id, choice.backend_id, bytes, false);
    }
    Err(reason::ICMP_ERROR_FORWARDED)
}

/// Only frames sent to the gateway's own MAC are forwarded: a copy of a VIP frame that reached
/// this interface for another host must not be sent to a master a second time.
#[inline(always)]
pub(crate) fn addressed_to_gateway(eth: *const EthHdr, globals: &Globals) -> Result<(), u32> {
    // SAFETY: `eth` points at a whole Ethernet header inside the frame (ptr_at checked it),
    // and `gateway_mac` is six bytes inside a map value; both are read as 4 + 2 byte words.
    let same = unsafe {
        let dst = (*eth).dst_addr.as_ptr();
        let own = globals.gateway_mac.as_ptr();
        core::ptr::read_unaligned(dst as *const u32) == core::ptr::read_unaligned(own as *const u32)
            && core::ptr::read_unaligned(dst.add(4) as *const u16) == core::ptr::read_unaligned(own.add(4) as *const u16)
    };
    if same { Ok(()) } else { Err(reason::FOREIGN_MAC) }
}

/// Copies a MAC address as one 4-byte and one 2-byte word. A plain array assignment from a
/// map value into the packet becomes a call to a byte-by-byte memmove (the compiler cannot
/// rule out overlap), and even through a local it stays 12 byte loads and stores per MAC.
/// The program is built to allow misaligned accesses (bpf-linker +allows-misaligned-mem-access;
/// the kernel takes them on x86-64 and arm64), so the words need no alignment.
///
/// # Safety
/// `dst` and `src` must each be valid for six bytes.
#[inline(always)]
unsafe fn copy_mac(dst: *mut u8, src: *const u8) {
    unsafe {
        let head = core::ptr::read_unaligned(src as *const u32);
        let tail = core::ptr::read_unaligned(src.add(4) as *const u16);
        core::ptr::write_unaligned(dst as *mut u32, head);
        core::ptr::write_unaligned(dst.add(4) as *mut u16, tail);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
