//! Small XDP programs around the balancer:
//! - `edgelb_decap`: strips IPIP / IP6IP6 / 4in6 on backends whose kernel has no tunnel modules
//!   (the test VMs have none), so DSR works end to end; the inner packet goes up the stack.
//! - `edgelb_pass`: passes everything. Attached to veth peers, because XDP_TX on veth only
//!   delivers when the receiving side runs an XDP program; also the pass baseline in benchmarks.
//! - `edgelb_tx_swap`: swaps MACs and sends back, the trivial XDP_TX baseline in benchmarks.
//! - `edgelb_gen`: the packet-rate benchmark's generator, run in BPF_PROG_TEST_RUN live-frames
//!   mode. Live frames recycle pages without re-copying the template, and the program on the far
//!   side rewrites them (encapsulation), so every frame gets its headers written afresh from
//!   `GEN_TEMPLATE`, plus a new IPv4 source, before it is sent with XDP_TX.
//! - `edgelb_sink`: counts and drops what comes back, the benchmark's receiver.
#![no_std]
#![no_main]

#[allow(dead_code)]
mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::proto;
use parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_LEN, IPV6_LEN, Ipv4Hdr, Ipv6Hdr, ptr_at};

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
    let keep_macs = |e: &parse::EthWords| (parse::eth_dst(e), parse::eth_src(e));
    parse::move_l2(ctx, 0, outer, l2.l3_off != ETH_LEN, inner_type, keep_macs)?;
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

/// Generator state: slot 0 is the per-CPU frame counter.
#[map]
static GEN_STATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Bytes written at the start of every generated frame: Ethernet, IPv4, UDP headers and the
/// first bytes of payload.
pub const TEMPLATE_LEN: usize = 48;

/// The generator's frame template (one element), set by user space. Held as words so that the
/// per-frame copy is a dozen loads and stores, not a byte-wise memmove.
#[map]
static GEN_TEMPLATE: aya_ebpf::maps::Array<[u32; TEMPLATE_LEN / 4]> =
    aya_ebpf::maps::Array::with_max_entries(1, 0);

/// Frames the sink received (slot 0), per CPU.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn edgelb_gen(ctx: XdpContext) -> u32 {
    try_gen(&ctx).unwrap_or(xdp_action::XDP_DROP)
}

#[inline(always)]
fn try_gen(ctx: &XdpContext) -> Result<u32, ()> {
    let n = GEN_STATE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: per-CPU slot, only this CPU touches it during the run.
    let n = unsafe {
        *n += 1;
        *n
    };
    let template = GEN_TEMPLATE.get(0).ok_or(())?;
    let head: *mut [u32; TEMPLATE_LEN / 4] = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at; the template is a map value valid for this run, read
    // into registers first (a direct map-to-packet copy becomes a byte-wise memmove call).
    unsafe { *head = core::ptr::read_volatile(template) };
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at. The low bits of the source vary per frame (up to a /16 of
    // clients), and the header checksum is rebuilt from scratch.
    unsafe {
        let mut h = *ip;
        let base = u32::from_be(h.saddr) & 0xffff_0000;
        // The template's IP ID holds the source mask (sources - 1); 0 means all 65 536.
        let mask = match u16::from_be(h.id) as u32 {
            0 => 0xffff,
            m => m,
        };
        h.saddr = (base | (n as u32 & mask)).to_be();
        h.check = 0;
        let mut sum: u64 = u16::from_ne_bytes([h.ver_ihl, h.tos]) as u64
            + h.tot_len as u64
            + h.id as u64
            + h.frag_off as u64
            + u16::from_ne_bytes([h.ttl, h.proto]) as u64
            + (h.saddr & 0xffff) as u64
            + (h.saddr >> 16) as u64
            + (h.daddr & 0xffff) as u64
            + (h.daddr >> 16) as u64;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        h.check = !(sum as u16);
        *ip = h;
    }
    Ok(xdp_action::XDP_TX)
}

#[xdp]
pub fn edgelb_sink(_ctx: XdpContext) -> u32 {
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
