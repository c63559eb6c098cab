//! Small XDP programs around the balancer:
//! - `edgelb_decap`: strips IPIP / IP6IP6 / 4in6 on backends whose kernel has no tunnel modules
//!   (the test VMs have none), so DSR works end to end; the inner packet goes up the stack, with
//!   the outer header's congestion marks carried into it (RFC 6040).
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
mod csum;
#[allow(dead_code)]
mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::proto;
use parse::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPV4_LEN, IPV6_LEN, Ipv4Hdr, Ipv6Hdr, ptr_at};

/// Slot 0: 1 when the decapsulator takes tunnels only from the outer sources listed in
/// `DECAP_SRC_V4` / `DECAP_SRC_V6` (`edgelb decap attach --allow-source`); 0 from any.
#[map]
static DECAP_RESTRICTED: Array<u32> = Array::with_max_entries(1, 0);

/// Outer IPv4 sources (prefixes) tunnels are taken from, when restricted.
#[map]
static DECAP_SRC_V4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(256, 0);

/// Outer IPv6 sources (prefixes) tunnels are taken from, when restricted.
#[map]
static DECAP_SRC_V6: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(256, 0);

/// Does the decapsulator take a tunnel from this outer source? Any source unless restricted; a
/// tunnel from another is passed untouched (the kernel, without tunnel modules, drops it), so
/// that no one else can hand the backend an inner packet with a source of their choosing.
#[inline(always)]
fn allowed_source(v4: Option<u32>, v6: Option<[u32; 4]>) -> bool {
    if DECAP_RESTRICTED.get(0).copied().unwrap_or(0) == 0 {
        return true;
    }
    match (v4, v6) {
        (Some(a), _) => DECAP_SRC_V4.get(&Key::new(32, a)).is_some(),
        (_, Some(a)) => DECAP_SRC_V6.get(&Key::new(128, a)).is_some(),
        _ => false,
    }
}

#[xdp]
pub fn edgelb_decap(ctx: XdpContext) -> u32 {
    try_decap(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, ()> {
    let l2 = parse::parse_l2(ctx)?;
    // A frame to a group address (broadcast, multicast) was not sent to this host alone: the
    // balancer sends its tunnels to one backend's MAC, so this is no tunnel of its, and the
    // stack gets it as it came.
    if l2.group_dst {
        return Ok(xdp_action::XDP_PASS);
    }
    let (outer, inner_type, outer_ecn) = if l2.proto == ETH_P_IP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        if h.ver_ihl != 0x45 || h.proto != proto::IPIP || h.frag_off & parse::IP_MF_OFFSET != 0 {
            return Ok(xdp_action::XDP_PASS);
        }
        // The outer source decides below whether the tunnel is taken, so a header the kernel
        // would discard (its checksum fails) is not trusted for it: it passes untouched, and
        // the stack drops it.
        if !csum::ipv4_csum_ok(&h) {
            return Ok(xdp_action::XDP_PASS);
        }
        if !allowed_source(Some(h.saddr), None) {
            return Ok(xdp_action::XDP_PASS);
        }
        (IPV4_LEN, ETH_P_IP, h.tos & ECN_MASK)
    } else if l2.proto == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        let ecn = (u32::from_be(h.vtc_flow) >> 20) as u8 & ECN_MASK;
        let tunnel = match h.next_hdr {
            proto::IPV6 => (IPV6_LEN, ETH_P_IPV6, ecn),
            proto::IPIP => (IPV6_LEN, ETH_P_IP, ecn),
            _ => return Ok(xdp_action::XDP_PASS),
        };
        if !allowed_source(None, Some(h.saddr)) {
            return Ok(xdp_action::XDP_PASS);
        }
        tunnel
    } else {
        return Ok(xdp_action::XDP_PASS);
    };
    if !carry_ecn(ctx, l2.l3_off + outer, inner_type, outer_ecn)? {
        return Ok(xdp_action::XDP_DROP);
    }
    // Move the L2 header forward over the outer IP header, then drop the bytes in front.
    let keep_macs = |e: &parse::EthWords| (parse::eth_dst(e), parse::eth_src(e));
    parse::move_l2(ctx, 0, outer, l2.l3_off != ETH_LEN, inner_type, keep_macs)?;
    // SAFETY: shrinks the head; no pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    Ok(xdp_action::XDP_PASS)
}

/// The ECN field: the low two bits of the IPv4 TOS or the IPv6 traffic class.
const ECN_MASK: u8 = 0b11;
/// ECN codepoints (RFC 3168).
const NOT_ECT: u8 = 0b00;
const ECT_1: u8 = 0b01;
const ECT_0: u8 = 0b10;
const CE: u8 = 0b11;

/// Carries the outer header's ECN field into the inner packet at `off` (of ethertype
/// `inner_type`), as RFC 6040 (normal mode) asks of a decapsulator: congestion experienced
/// (CE) on the outer header marks an ECN-capable inner packet, and ECT(1) replaces ECT(0).
/// False when the packet must be dropped instead: CE on an inner packet that is not
/// ECN-capable, whose sender would otherwise never learn of the congestion.
#[inline(always)]
fn carry_ecn(ctx: &XdpContext, off: usize, inner_type: u16, outer: u8) -> Result<bool, ()> {
    if outer != CE && outer != ECT_1 {
        return Ok(true);
    }
    let to = |inner: u8| match (outer, inner) {
        (CE, NOT_ECT) => None,
        (CE, _) => Some(CE),
        (_, ECT_0) => Some(ECT_1),
        (_, other) => Some(other),
    };
    if inner_type == ETH_P_IP {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, off)?;
        // SAFETY: bounds-checked by ptr_at; the packet is this program's to change.
        let h = unsafe { &mut *ip };
        let Some(ecn) = to(h.tos & ECN_MASK) else { return Ok(false) };
        let old = u16::from_ne_bytes([h.ver_ihl, h.tos]);
        h.tos = h.tos & !ECN_MASK | ecn;
        h.check = csum::csum_replace2(h.check, old, u16::from_ne_bytes([h.ver_ihl, h.tos]));
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, off)?;
        // SAFETY: as above.
        let h = unsafe { &mut *ip };
        let vtc = u32::from_be(h.vtc_flow);
        let Some(ecn) = to((vtc >> 20) as u8 & ECN_MASK) else { return Ok(false) };
        h.vtc_flow = (vtc & !((ECN_MASK as u32) << 20) | (ecn as u32) << 20).to_be();
    }
    Ok(true)
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

/// Bytes written at the start of every generated frame (`lb_common::GEN_TEMPLATE_LEN`).
pub const TEMPLATE_LEN: usize = lb_common::GEN_TEMPLATE_LEN;

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
        h.check = csum::ipv4_csum(&h);
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
