//! Forwarding: IPIP / IP6IP6 / 4in6 encapsulation for DSR, and L2 DSR (MAC rewrite).
//!
//! Encapsulation grows the packet at the front with `bpf_xdp_adjust_head`, moves the L2 header
//! (with its VLAN tag, if any) to the new start and writes the outer IP header behind it. All
//! packet pointers are re-derived after the head moves.

use crate::{
    csum::ipv4_csum,
    parse::{
        self, ETH_LEN, ETH_P_IPV6, IP_DF, IPV4_LEN, IPV6_LEN, Ipv4Hdr, Ipv6Hdr, eth_dst, eth_src,
        mac_words, ptr_at, read_eth, write_eth,
    },
};
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Backend, GlobalConfig, proto};

/// Outer TTL / hop limit of encapsulated packets.
const OUTER_TTL: u8 = 64;

/// Our source MAC for a frame we send on: the configured one, or else the address the frame
/// was sent to (`old_dst`, ours on that interface: the balancer never sends for a frame sent to
/// a group address, whose bit would make it an invalid source).
#[inline(always)]
fn source_mac(cfg: &GlobalConfig, old_dst: [u16; 3]) -> [u16; 3] {
    if cfg.src_mac == [0; 6] { old_dst } else { mac_words(&cfg.src_mac) }
}

/// Moves the L2 header (with its VLAN tag, if any) from `grown` bytes in to the packet start
/// after the head grew by `grown`, addressed to `dst_mac` from us, with `ethertype`.
#[inline(always)]
fn move_l2(
    ctx: &XdpContext,
    grown: usize,
    vlan: bool,
    dst_mac: [u16; 3],
    cfg: &GlobalConfig,
    ethertype: u16,
) -> Result<(), ()> {
    parse::move_l2(ctx, grown, 0, vlan, ethertype, |old| (dst_mac, source_mac(cfg, eth_dst(old))))
}

/// Wraps the IPv4 packet at `l3_off` (of `inner_len` bytes, TOS `tos`) in an outer IPv4 header
/// to `backend`, from the per-flow source `src`.
#[inline(always)]
pub fn encap_v4(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    tos: u8,
    backend: &Backend,
    src: u32,
    cfg: &GlobalConfig,
) -> Result<(), ()> {
    let ethertype = crate::parse::ETH_P_IP;
    // `forward` refuses a packet over 65 535 bytes with its outer header; should one get here,
    // it is not sent with a wrapped length.
    let tot_len = inner_len.checked_add(IPV4_LEN as u16).ok_or(())?;
    // SAFETY: the helper only moves ctx->data; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_LEN as i32)) } != 0 {
        return Err(());
    }
    move_l2(ctx, IPV4_LEN, l3_off != ETH_LEN, mac_words(&backend.mac), cfg, ethertype)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3_off)?;
    let mut h = Ipv4Hdr {
        ver_ihl: 0x45,
        tos,
        tot_len: tot_len.to_be(),
        id: 0,
        frag_off: IP_DF,
        ttl: OUTER_TTL,
        proto: proto::IPIP,
        check: 0,
        saddr: src,
        daddr: backend.addr[0],
    };
    h.check = ipv4_csum(&h);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *ip = h };
    Ok(())
}

/// Wraps the packet at `l3_off` (`inner_len` bytes, IP protocol `inner_proto`: IPv6 or IPIP for
/// 4in6, TOS or traffic class `tos`, copied so that the underlay sees its DSCP and ECN) in an
/// outer IPv6 header to `backend`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn encap_v6(
    ctx: &XdpContext,
    l3_off: usize,
    inner_len: u16,
    inner_proto: u8,
    tos: u8,
    backend: &Backend,
    src: &[u32; 4],
    flow_label: u32,
    cfg: &GlobalConfig,
) -> Result<(), ()> {
    // SAFETY: as in encap_v4.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV6_LEN as i32)) } != 0 {
        return Err(());
    }
    move_l2(ctx, IPV6_LEN, l3_off != ETH_LEN, mac_words(&backend.mac), cfg, ETH_P_IPV6)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3_off)?;
    let h = Ipv6Hdr {
        vtc_flow: (0x6000_0000u32 | (tos as u32) << 20 | (flow_label & 0x000f_ffff)).to_be(),
        payload_len: inner_len.to_be(),
        next_hdr: inner_proto,
        hop_limit: OUTER_TTL,
        saddr: *src,
        daddr: backend.addr,
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *ip = h };
    Ok(())
}

/// L2 DSR: the backend holds the VIP and sits on this segment, so only the MACs change.
#[inline(always)]
pub fn rewrite_l2(ctx: &XdpContext, backend: &Backend, cfg: &GlobalConfig) -> Result<(), ()> {
    let old = read_eth(ctx, 0)?;
    write_eth(ctx, 0, mac_words(&backend.mac), source_mac(cfg, eth_dst(&old)), old[6])
}

/// Addresses an answer built in place back to where the frame came from: to its source MAC,
/// from ours (see [`source_mac`]).
#[inline(always)]
pub fn reply_macs(ctx: &XdpContext, cfg: &GlobalConfig) -> Result<(), ()> {
    let e = read_eth(ctx, 0)?;
    write_eth(ctx, 0, eth_src(&e), source_mac(cfg, eth_dst(&e)), e[6])
}

/// Outer IPv4 source: the configured prefix with its host bits taken from the flow's
/// (5-tuple) hash, so a backend's RSS spreads flows over its queues.
#[inline(always)]
pub fn outer_src_v4(cfg: &GlobalConfig, hash: u32) -> u32 {
    let bits = cfg.src_v4_host_bits & 31;
    let mask = (1u32 << bits) - 1;
    (u32::from_be(cfg.src_v4) & !mask | (hash & mask)).to_be()
}

/// Outer IPv6 source: the configured prefix with the last word from the flow's hash.
#[inline(always)]
pub fn outer_src_v6(cfg: &GlobalConfig, hash: u32) -> [u32; 4] {
    [cfg.src_v6[0], cfg.src_v6[1], cfg.src_v6[2], hash]
}

/// Like `move_l2` for answers to the sender: the frame goes back where it came from.
#[inline(always)]
pub fn move_l2_reply(
    ctx: &XdpContext,
    grown: usize,
    vlan: bool,
    cfg: &GlobalConfig,
    ethertype: u16,
) -> Result<(), ()> {
    parse::move_l2(ctx, grown, 0, vlan, ethertype, |old| {
        (eth_src(old), source_mac(cfg, eth_dst(old)))
    })
}
