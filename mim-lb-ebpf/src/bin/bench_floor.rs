//! The benchmark's floor: the least an XDP forwarder can do (swap the MACs, XDP_TX). Loaded
//! next to mim-lb in `cargo xtask bench`, so each run measures its own floor.
#![no_std]
#![no_main]

use aya_ebpf::{macros::xdp, programs::XdpContext};

#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return 2; // XDP_PASS
    }
    let mac = start as *mut [u8; 6];
    unsafe {
        let dst = *mac;
        *mac = *mac.add(1);
        *mac.add(1) = dst;
    }
    3 // XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
