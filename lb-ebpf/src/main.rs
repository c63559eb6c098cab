//! edgelb's L4 balancer, run at the NIC driver's XDP hook.
//!
//! `edgelb_balancer` parses the packet, matches (VIP, port, protocol), picks a backend (connection
//! table, then Maglev ring) and forwards by encapsulation or MAC rewrite with XDP_TX. Each step
//! either hands on to the next or ends in a verdict; anything not for a VIP, malformed or not
//! understood is passed to the kernel untouched. Nothing is logged per packet: every packet
//! counts into exactly one reason slot instead.
#![no_std]
#![no_main]

mod budget;
mod conntrack;
mod csum;
mod encap;
mod icmp;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, maps::PerCpuArray, programs::XdpContext};
use conntrack::Lookup;
use lb_common::{
    AF_INET, AF_INET6, AddrKey, FlowKey, GlobalConfig, VIP_CACHE_EMPTY, VIP_CACHE_HIT,
    VIP_CACHE_NONE, VipCacheEntryOf, VipKey, VipKeyV4, VipMeta, addr_flags, proto, stats::Reason,
    vip_cache_slot, vip_cache_slot_v6, vip_flags,
};
use maps::{CONFIG, VIP_ADDRS, VIP_CACHE, VIP_CACHE_V6, VIP_EPOCH, VIPS, VIPS_V4};
use parse::{
    ETH_P_IP, ETH_P_IPV6, IPV4_LEN, IPV6_FRAG_LEN, IPV6_LEN, Ipv4Hdr, Ipv6FragHdr, Ipv6Hdr, Ports,
    ptr_at,
};
use stats::count;

/// The network-layer facts every later step needs.
pub struct L3 {
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// AF_INET or AF_INET6.
    pub family: u8,
    /// Source address words.
    pub src: [u32; 4],
    /// Destination address words.
    pub dst: [u32; 4],
    /// Transport protocol.
    pub proto: u8,
    /// Length of the whole IP packet (header included), from the header.
    pub tot_len: u16,
    /// IPv4 TOS / IPv6 traffic class.
    pub tos: u8,
    /// IPv4 DF bit (always true for IPv6, which routers never fragment).
    pub df: bool,
}

impl L3 {
    /// Do `len` bytes at frame offset `off` lie within the IP packet (by its own length, not
    /// the frame's, which may carry Ethernet padding after it)?
    #[inline(always)]
    pub fn holds(&self, off: usize, len: usize) -> bool {
        off + len <= self.l3_off + self.tot_len as usize
    }
}

/// Either go on with a value or stop with an XDP verdict.
pub enum Step<T> {
    /// Continue processing.
    Go(T),
    /// Final verdict.
    Done(u32),
}

#[xdp]
#[inline(always)]
pub fn edgelb_balancer(ctx: XdpContext) -> u32 {
    match try_balance(&ctx) {
        Ok(action) => action,
        Err(()) => {
            count(Reason::PassMalformed);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_balance(ctx: &XdpContext) -> Result<u32, ()> {
    let l2 = parse::parse_l2(ctx)?;
    // Broadcast and multicast frames are never balanced or answered: they were not sent to this
    // node alone, and what we sent would carry their group address as its source MAC. (One
    // test on the path of unicast frames; the EtherType is looked at only for the rest.)
    if l2.group_dst {
        let ip = l2.proto == ETH_P_IP || l2.proto == ETH_P_IPV6;
        count(if ip { Reason::PassNotUnicast } else { Reason::PassNotIp });
        return Ok(xdp_action::XDP_PASS);
    }
    let step = if l2.proto == ETH_P_IP {
        parse_v4(ctx, l2.l3_off)?
    } else if l2.proto == ETH_P_IPV6 {
        parse_v6(ctx, l2.l3_off)?
    } else {
        count(Reason::PassNotIp);
        return Ok(xdp_action::XDP_PASS);
    };
    let l3 = match step {
        Step::Go(l3) => l3,
        Step::Done(action) => return Ok(action),
    };
    match l3.proto {
        proto::TCP | proto::UDP => balance_l4(ctx, &l3),
        proto::ICMP | proto::ICMPV6 => icmp::handle(ctx, &l3),
        _ => Ok(not_served(&l3.dst, l3.family)),
    }
}

/// The [`addr_flags`] of `addr` when it is the address of some VIP (any port, any protocol).
#[inline(always)]
pub fn vip_addr_flags(addr: &[u32; 4], family: u8) -> Option<u32> {
    // Built from a zeroed key: a literal `_pad: [0; 3]` compiles to a call to a byte-wise memset.
    // SAFETY: AddrKey is plain integers; all-zero is a valid value.
    let mut key: AddrKey = unsafe { core::mem::zeroed() };
    key.addr = *addr;
    key.family = family;
    // SAFETY: the value is copied out at once.
    unsafe { VIP_ADDRS.get(&key) }.copied()
}

/// Is `addr` the address of some VIP (any port, any protocol; L7 VIPs included)?
#[inline(always)]
pub fn is_vip_addr(addr: &[u32; 4], family: u8) -> bool {
    vip_addr_flags(addr, family).is_some()
}

/// Verdict for traffic towards an address with nothing to balance it: pass, counted by whether
/// the address is a VIP's.
#[inline(always)]
pub fn not_served(dst: &[u32; 4], family: u8) -> u32 {
    if is_vip_addr(dst, family) {
        count(Reason::PassNoService);
    } else {
        count(Reason::PassNotVip);
    }
    xdp_action::XDP_PASS
}

/// Policy for fragments, IPv4 options and IPv6 extension headers: dropped (counted under
/// `reason`) when aimed at the address of a VIP XDP balances, which cannot balance them
/// (splitting a flow's packets between backends); passed otherwise. An address only L7 VIPs
/// have is the kernel's: it terminates their traffic, and reassembles and serves these.
#[inline(always)]
fn unbalanceable(dst: &[u32; 4], family: u8, reason: Reason) -> Step<L3> {
    match vip_addr_flags(dst, family) {
        Some(flags) if flags & addr_flags::L4 != 0 => {
            count(reason);
            Step::Done(xdp_action::XDP_DROP)
        }
        Some(_) => {
            count(Reason::PassL7);
            Step::Done(xdp_action::XDP_PASS)
        }
        None => {
            count(Reason::PassNotVip);
            Step::Done(xdp_action::XDP_PASS)
        }
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3_off: usize) -> Result<Step<L3>, ()> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let h = unsafe { *ip };
    let ihl = (h.ver_ihl & 0x0f) as u16;
    let tot_len = u16::from_be(h.tot_len);
    if h.ver_ihl >> 4 != 4 || ihl < 5 || tot_len < ihl * 4 {
        return Err(());
    }
    if l3_off + tot_len as usize > ctx.data_end() - ctx.data() {
        return Err(());
    }
    let dst = [h.daddr, 0, 0, 0];
    if ihl != 5 {
        return Ok(unbalanceable(&dst, AF_INET, Reason::DropIpOptions));
    }
    if h.frag_off & parse::IP_MF_OFFSET != 0 {
        return Ok(unbalanceable(&dst, AF_INET, Reason::DropFragment));
    }
    Ok(Step::Go(L3 {
        l3_off,
        l4_off: l3_off + IPV4_LEN,
        family: AF_INET,
        src: [h.saddr, 0, 0, 0],
        dst,
        proto: h.proto,
        tot_len,
        tos: h.tos,
        df: h.frag_off & parse::IP_DF != 0,
    }))
}

/// IPv6 extension headers we do not walk: hop-by-hop, routing, destination options (fragment is
/// handled on its own). ESP (50) and AH (51) are not among them: as over IPv4, they are upper
/// layers no VIP serves, passed to the kernel (`not_served`) rather than dropped.
const IPV6_EXT_HEADERS: [u8; 3] = [0, 43, 60];
/// IPv6 fragment header's next-header value.
pub const IPV6_FRAGMENT: u8 = 44;

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3_off: usize) -> Result<Step<L3>, ()> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let h = unsafe { *ip };
    let vtc = u32::from_be(h.vtc_flow);
    let payload = u16::from_be(h.payload_len);
    if vtc >> 28 != 6 || payload > u16::MAX - IPV6_LEN as u16 {
        return Err(());
    }
    let tot_len = payload + IPV6_LEN as u16;
    if l3_off + tot_len as usize > ctx.data_end() - ctx.data() {
        return Err(());
    }
    let daddr = h.daddr;
    let (mut next, mut l4_off) = (h.next_hdr, l3_off + IPV6_LEN);
    if next == IPV6_FRAGMENT {
        // An atomic fragment (offset 0, M clear) is a whole packet that carries a fragment
        // header all the same, to be processed as unfragmented (RFC 6946): its header, right
        // behind the fixed one, is stepped over, once. Any other fragment, or one whose header
        // the packet does not hold, cannot be balanced.
        let frag = match ptr_at::<Ipv6FragHdr>(ctx, l4_off) {
            Ok(frag) if tot_len as usize >= IPV6_LEN + IPV6_FRAG_LEN => frag,
            _ => return Ok(unbalanceable(&daddr, AF_INET6, Reason::DropFragment)),
        };
        // SAFETY: bounds-checked by ptr_at.
        let (frag_off, frag_next) = unsafe { ((*frag).frag_off, (*frag).next_hdr) };
        if frag_off & parse::IPV6_FRAG_OFFSET_M != 0 || frag_next == IPV6_FRAGMENT {
            return Ok(unbalanceable(&daddr, AF_INET6, Reason::DropFragment));
        }
        (next, l4_off) = (frag_next, l4_off + IPV6_FRAG_LEN);
    }
    let mut i = 0;
    while i < IPV6_EXT_HEADERS.len() {
        if next == IPV6_EXT_HEADERS[i] {
            return Ok(unbalanceable(&daddr, AF_INET6, Reason::DropIpOptions));
        }
        i += 1;
    }
    Ok(Step::Go(L3 {
        l3_off,
        l4_off,
        family: AF_INET6,
        src: h.saddr,
        dst: daddr,
        proto: next,
        tot_len,
        tos: (vtc >> 20) as u8,
        df: true,
    }))
}

/// Same address? Word by word: an array comparison could compile to a `bcmp` call, which BPF
/// cannot make.
#[inline(always)]
pub fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// An address the VIP caches are keyed by.
trait CacheAddr: Copy {
    fn same(&self, other: &Self) -> bool;
}

impl CacheAddr for u32 {
    #[inline(always)]
    fn same(&self, other: &u32) -> bool {
        self == other
    }
}

impl CacheAddr for [u32; 4] {
    #[inline(always)]
    fn same(&self, other: &[u32; 4]) -> bool {
        same_addr(self, other)
    }
}

/// A VIP table lookup (exact port, then "any port", by `table`) through this CPU's cache
/// `cache`, at `slot`.
#[inline(always)]
fn lookup_vip_cached<A: CacheAddr>(
    cache: &PerCpuArray<VipCacheEntryOf<A>>,
    slot: u32,
    addr: A,
    port: u16,
    proto: u8,
    table: impl Fn(u16) -> Option<VipMeta>,
) -> Option<VipMeta> {
    let epoch = VIP_EPOCH.get(0).copied().unwrap_or(0);
    let cached = cache.get_ptr_mut(slot);
    if let Some(e) = cached {
        // SAFETY: a per-CPU array element, valid for this run and touched by no other CPU.
        let e = unsafe { &*e };
        if e.state != VIP_CACHE_EMPTY
            && e.epoch == epoch
            && e.addr.same(&addr)
            && e.port == port
            && e.proto == proto
        {
            return if e.state == VIP_CACHE_HIT { Some(e.meta) } else { None };
        }
    }
    let found = table(port).or_else(|| table(0));
    if let Some(e) = cached {
        // SAFETY: as above; this CPU is the only writer.
        let e = unsafe { &mut *e };
        e.addr = addr;
        e.port = port;
        e.proto = proto;
        e.epoch = epoch;
        match found {
            Some(meta) => {
                e.meta = meta;
                e.state = VIP_CACHE_HIT;
            }
            None => e.state = VIP_CACHE_NONE,
        }
    }
    found
}

/// Finds the VIP for (address, port, protocol), trying the exact port, then "any port", through
/// this CPU's cache of answers for the address family.
#[inline(always)]
pub fn lookup_vip(addr: &[u32; 4], port: u16, proto: u8, family: u8) -> Option<VipMeta> {
    if family == AF_INET {
        let slot = vip_cache_slot(addr[0], port, proto);
        return lookup_vip_cached(&VIP_CACHE, slot, addr[0], port, proto, |port| {
            let key = VipKeyV4 { addr: addr[0], port, proto, _pad: 0 };
            // SAFETY: the value is copied out at once.
            unsafe { VIPS_V4.get(&key) }.copied()
        });
    }
    let slot = vip_cache_slot_v6(addr, port, proto);
    lookup_vip_cached(&VIP_CACHE_V6, slot, *addr, port, proto, |port| {
        let key = VipKey { addr: *addr, port, proto, family };
        // SAFETY: the value is copied out at once.
        unsafe { VIPS.get(&key) }.copied()
    })
}

#[inline(always)]
fn balance_l4(ctx: &XdpContext, l3: &L3) -> Result<u32, ()> {
    // The L4 header must lie within the IP packet, not in the frame's padding after it: a whole
    // TCP header, or UDP's. A shorter one is passed untouched for the kernel to judge.
    let l4_min = if l3.proto == proto::TCP { parse::TCP_MIN_LEN } else { parse::UDP_LEN };
    if !l3.holds(l3.l4_off, l4_min) {
        return Err(());
    }
    let ports: *const Ports = ptr_at(ctx, l3.l4_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let p = unsafe { *ports };
    let Some(meta) = lookup_vip(&l3.dst, p.dst, l3.proto, l3.family) else {
        count(Reason::PassNotVip);
        return Ok(xdp_action::XDP_PASS);
    };
    if meta.flags & vip_flags::L7 != 0 {
        count(Reason::PassL7);
        return Ok(xdp_action::XDP_PASS);
    }
    let key = FlowKey {
        src: l3.src,
        dst: l3.dst,
        sport: p.src,
        dport: p.dst,
        proto: l3.proto,
        family: l3.family,
        _pad: [0; 2],
    };
    // A TCP segment without SYN belongs to a connection that should already be in the table; if
    // this CPU has not seen it (RSS or IRQ affinity moved the flow), the other CPUs' tables are
    // searched before the ring re-places it. UDP never searches, and a SYN is not even looked up
    // (placed by the ring, its flow waits in a handshake slot for its next packet: see
    // `conntrack`). A FIN or RST marks the flow's entry as closing, so that a new connection
    // reusing its 5-tuple can follow its own handshake. With SYN as well it is still a FIN or
    // RST, not a SYN: it starts no flow (Linux drops SYN+RST and SYN+FIN at LISTEN), and an
    // in-window RST|SYN resets the backend's established socket.
    let lookup = if l3.proto != proto::TCP {
        Lookup::Table
    } else {
        match parse::ptr_at::<u8>(ctx, l3.l4_off + parse::TCP_FLAGS_OFF) {
            // SAFETY: bounds-checked by ptr_at.
            Ok(flags) => match unsafe { *flags } {
                f if f & parse::TCP_FIN_RST != 0 => Lookup::Closing,
                f if f & parse::TCP_SYN != 0 => Lookup::Syn,
                _ => Lookup::Established,
            },
            Err(()) => Lookup::Table,
        }
    };
    Ok(forward(ctx, l3, &key, &meta, Reason::TxEncap, lookup))
}

/// Global config, or all-zero defaults before user space wrote it.
#[inline(always)]
pub fn config() -> GlobalConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Sends the packet described by `l3` to the backend of flow `key` on VIP `meta`.
///
/// `reason` is the slot counted on success: TxEncap for data packets (which also create a
/// connection-table entry), TxIcmpToBackend for ICMP errors (which only read it). `lookup` says
/// how the flow is looked up ([`Lookup`]): with `Established` or `Closing`, a flow this CPU does
/// not know is looked for in the other CPUs' tables.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    l3: &L3,
    key: &FlowKey,
    meta: &VipMeta,
    reason: Reason,
    lookup: Lookup,
) -> u32 {
    let data_packet = reason as u32 == Reason::TxEncap as u32;
    let Some(pick) = conntrack::pick(key, meta, data_packet, lookup) else {
        count(Reason::DropNoBackend);
        return xdp_action::XDP_DROP;
    };
    let cfg = config();
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if meta.flags & vip_flags::L2_DSR != 0 {
        if encap::rewrite_l2(ctx, &pick.backend, &cfg).is_err() {
            count(Reason::DropAdjustFailed);
            return xdp_action::XDP_DROP;
        }
        count(if data_packet { Reason::TxL2 } else { reason });
        stats::count_forward(meta.vip_index, pick.id, bytes, pick.new_flow);
        return xdp_action::XDP_TX;
    }
    let overhead = if pick.backend.family == AF_INET { IPV4_LEN } else { IPV6_LEN } as u32;
    // `mtu = 0` checks no link's MTU, but a packet that would be over 65 535 bytes once
    // encapsulated cannot be sent at all: an outer IPv4 header's 16-bit length would wrap
    // (generic XDP sees GRO-merged packets of up to 64 KiB, and `lo`'s MTU is 65 536). So 0
    // stands for 65 535, the largest `mtu` the config takes, for both outer families, which keeps
    // one comparison on the path (an outer IPv6 header could say 40 bytes more: refused as well).
    let mtu = if cfg.mtu == 0 { u16::MAX as u32 } else { cfg.mtu };
    if l3.tot_len as u32 + overhead > mtu {
        if data_packet && l3.df && mtu > overhead {
            return icmp::too_big(ctx, l3, mtu - overhead, &cfg);
        }
        count(Reason::DropTooBig);
        return xdp_action::XDP_DROP;
    }
    // Bytes after the IP packet (Ethernet padding, or a trailer someone added) would be carried
    // into the encapsulated frame: cut them when they would take it over the MTU (padding to
    // the 60-byte minimum never does, so the common path pays one comparison).
    let frame_l3 = (ctx.data_end() - ctx.data()).saturating_sub(l3.l3_off) as u32;
    if frame_l3 + overhead > mtu {
        let excess = frame_l3 - l3.tot_len as u32;
        // SAFETY: moves ctx->data_end only; the encapsulation re-derives its pointers.
        if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_tail(ctx.ctx, -(excess as i32)) } != 0 {
            count(Reason::DropAdjustFailed);
            return xdp_action::XDP_DROP;
        }
    }
    let sent = match (l3.family, pick.backend.family) {
        (AF_INET, AF_INET) => encap::encap_v4(
            ctx,
            l3.l3_off,
            l3.tot_len,
            l3.tos,
            &pick.backend,
            encap::outer_src_v4(&cfg, pick.hash),
            &cfg,
        ),
        (AF_INET, AF_INET6) => encap::encap_v6(
            ctx,
            l3.l3_off,
            l3.tot_len,
            proto::IPIP,
            l3.tos,
            &pick.backend,
            &encap::outer_src_v6(&cfg, pick.hash),
            pick.hash,
            &cfg,
        ),
        (AF_INET6, AF_INET6) => encap::encap_v6(
            ctx,
            l3.l3_off,
            l3.tot_len,
            proto::IPV6,
            l3.tos,
            &pick.backend,
            &encap::outer_src_v6(&cfg, pick.hash),
            pick.hash,
            &cfg,
        ),
        // IPv6 VIPs with IPv4 backends are rejected by config validation.
        _ => Err(()),
    };
    if sent.is_err() {
        count(Reason::DropAdjustFailed);
        return xdp_action::XDP_DROP;
    }
    count(reason);
    stats::count_forward(meta.vip_index, pick.id, bytes, pick.new_flow);
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
