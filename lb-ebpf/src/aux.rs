//! Small XDP programs around the balancer:
//! - `edgelb_decap`: strips IPIP / IP6IP6 / 4in6 on backends whose kernel has no tunnel modules
//!   (the test VMs have none), so DSR works end to end; the inner packet goes up the stack.
//! - `edgelb_pass`: passes everything. Attached to veth peers, because XDP_TX on veth only
//!   delivers when the receiving side runs an XDP program; also the pass baseline in benchmarks.
//! - `edgelb_tx_swap`: swaps MACs and sends back, the trivial XDP_TX baseline in benchmarks.
#![no_std]
#![no_main]

#[allow(dead_code)]
mod parse;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext,
};
use lb_common::proto;
use parse::{
    ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_LEN, IPV6_LEN, Ipv4Hdr, Ipv6Hdr, VlanHdr, ptr_at,
};

#[xdp]
pub fn edgelb_decap(ctx: XdpContext) -> u32 {
    try_decap(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, ()> {
    let l2 = parse::parse_l2(ctx)?;
    let (outer, inner_type) = if l2.proto == ETH_P_IP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        if h.ver_ihl != 0x45 || h.proto != proto::IPIP || h.frag_off & parse::IP_MF_OFFSET != 0 {
            return Ok(xdp_action::XDP_PASS);
        }
        (IPV4_LEN, ETH_P_IP)
    } else if l2.proto == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        match h.next_hdr {
            proto::IPV6 => (IPV6_LEN, ETH_P_IPV6),
            proto::IPIP => (IPV6_LEN, ETH_P_IP),
            _ => return Ok(xdp_action::XDP_PASS),
        }
    } else {
        return Ok(xdp_action::XDP_PASS);
    };
    // Move the L2 header forward over the outer IP header, then drop the bytes in front.
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let new_eth: *mut EthHdr = ptr_at(ctx, outer)?;
    // SAFETY: both bounds-checked; the old header is copied out before the write.
    unsafe {
        let e = *eth;
        *new_eth = e;
    }
    if l2.l3_off != ETH_LEN {
        let tag: *const VlanHdr = ptr_at(ctx, ETH_LEN)?;
        let new_tag: *mut VlanHdr = ptr_at(ctx, ETH_LEN + outer)?;
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            let t = *tag;
            *new_tag = VlanHdr { tci: t.tci, proto: inner_type };
        }
    } else {
        // SAFETY: bounds-checked above.
        unsafe { (*new_eth).proto = inner_type };
    }
    // SAFETY: shrinks the head; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    Ok(xdp_action::XDP_PASS)
}

#[xdp]
pub fn edgelb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn edgelb_tx_swap(ctx: XdpContext) -> u32 {
    let Ok(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        let e = *eth;
        (*eth).dst = e.src;
        (*eth).src = e.dst;
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
