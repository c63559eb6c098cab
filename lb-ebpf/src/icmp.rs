//! ICMP for VIPs: echo answered here, errors about a VIP flow routed to the backend that owns the
//! flow (so path-MTU discovery works with DSR, and a backend learns that its client cannot be
//! reached), and frag-needed / packet-too-big generated when an encapsulated packet would not
//! fit the egress MTU.

use crate::{
    L3,
    conntrack::Lookup,
    csum::{csum_add32, csum_fold, csum_replace2, ipv4_csum, ipv4_csum_ok},
    encap::{move_l2_reply, reply_macs},
    forward, is_vip_addr, lookup_vip,
    parse::{
        ETH_LEN, ETH_P_IP, ETH_P_IPV6, ICMP_LEN, IP_OFFSET, IPV4_LEN, IPV6_FRAG_LEN,
        IPV6_FRAG_OFFSET, IPV6_LEN, IcmpHdr, Ipv4Hdr, Ipv6FragHdr, Ipv6Hdr, Ports, ptr_at,
    },
    stats::count,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{AF_INET, FlowKey, GlobalConfig, proto, stats::Reason, vip_flags};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO: u8 = 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOO_BIG: u8 = 2;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// TTL / hop limit of packets we originate.
const REPLY_TTL: u8 = 64;

/// ICMP or ICMPv6 towards a VIP address.
#[inline(always)]
pub fn handle(ctx: &XdpContext, l3: &L3) -> Result<u32, ()> {
    if (l3.family == AF_INET) != (l3.proto == proto::ICMP) {
        // ICMPv6 inside IPv4 or ICMP inside IPv6: not ours to judge.
        return Ok(crate::not_served(&l3.dst, l3.family));
    }
    // Any VIP's address, an L7 VIP's alone included: echo is answered here all the same, and
    // an error about an L7 VIP's flow goes to the kernel, which owns the flow (`PassL7` below).
    if !is_vip_addr(&l3.dst, l3.family) {
        count(Reason::PassNotVip);
        return Ok(xdp_action::XDP_PASS);
    }
    // The ICMP header, and below the quoted header and ports, must lie within the IP packet,
    // not in the frame's padding.
    if !l3.holds(l3.l4_off, ICMP_LEN) {
        return Err(());
    }
    let icmp: *mut IcmpHdr = ptr_at(ctx, l3.l4_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let h = unsafe { *icmp };
    if l3.family == AF_INET {
        if h.ty == ICMP_ECHO {
            if !answerable(ctx, l3)? {
                count(Reason::PassNotUnicast);
                return Ok(xdp_action::XDP_PASS);
            }
            return echo_v4(ctx, l3, icmp);
        }
        // Destination unreachable, whatever the code: frag-needed for path-MTU discovery, and
        // the others (host, port, administratively prohibited...) so the backend's stack can
        // give up on a client it cannot reach (RFC 1122 4.2.3.9, RFC 6069; IP_RECVERR for UDP),
        // as Katran forwards them. Time exceeded and the rest stay with the kernel.
        if h.ty == ICMP_DEST_UNREACH {
            return error_to_backend(ctx, l3);
        }
    } else {
        if h.ty == ICMPV6_ECHO {
            if !answerable(ctx, l3)? {
                count(Reason::PassNotUnicast);
                return Ok(xdp_action::XDP_PASS);
            }
            return echo_v6(ctx, l3, icmp);
        }
        // Packet too big and destination unreachable (any code), as for IPv4 above.
        if h.ty == ICMPV6_PKT_TOO_BIG || h.ty == ICMPV6_DEST_UNREACH {
            return error_to_backend(ctx, l3);
        }
    }
    count(Reason::PassNoService);
    Ok(xdp_action::XDP_PASS)
}

/// May the sender of this packet be answered from here (an echo reply, a frag-needed)? Only
/// from a unicast MAC and a unicast address, and for IPv4 with a header whose checksum
/// verifies. An answer to a group MAC, or to a broadcast, multicast, unspecified or loopback
/// address, would go to many hosts or to none (RFC 1122 3.2.2 and 3.2.1.3, RFC 4443 2.4 (e)), and
/// a damaged header could name another host as its source; the kernel drops such packets too.
#[inline(always)]
fn answerable(ctx: &XdpContext, l3: &L3) -> Result<bool, ()> {
    // The first byte of the source MAC (after the 6 of the destination).
    let src_mac: *const u8 = ptr_at(ctx, 6)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { *src_mac } & 1 != 0 {
        return Ok(false);
    }
    if l3.family == AF_INET {
        let src = u32::from_be(l3.src[0]);
        let first = src >> 24;
        // The sources the kernel also takes as martian: 0/8 (this network), 127/8 (loopback),
        // 224/4 (multicast) and the broadcast address.
        if first == 0 || first == 127 || (224..240).contains(&first) || src == u32::MAX {
            return Ok(false);
        }
        let ip: *const Ipv4Hdr = ptr_at(ctx, l3.l3_off)?;
        // SAFETY: bounds-checked by ptr_at.
        return Ok(ipv4_csum_ok(unsafe { &*ip }));
    }
    let s = l3.src;
    let multicast = u32::from_be(s[0]) >> 24 == 0xff;
    let unspecified_or_loopback = s[0] == 0 && s[1] == 0 && s[2] == 0 && u32::from_be(s[3]) <= 1;
    Ok(!multicast && !unspecified_or_loopback)
}

#[inline(always)]
fn echo_v4(ctx: &XdpContext, l3: &L3, icmp: *mut IcmpHdr) -> Result<u32, ()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3.l3_off)?;
    // SAFETY: both headers were bounds-checked by ptr_at (icmp by the caller).
    unsafe {
        let mut h = *ip;
        h.saddr = l3.dst[0];
        h.daddr = l3.src[0];
        h.ttl = REPLY_TTL;
        h.check = 0;
        h.check = ipv4_csum(&h);
        *ip = h;
        let old = u16::from_ne_bytes([(*icmp).ty, (*icmp).code]);
        let new = u16::from_ne_bytes([ICMP_ECHO_REPLY, (*icmp).code]);
        (*icmp).check = csum_replace2((*icmp).check, old, new);
        (*icmp).ty = ICMP_ECHO_REPLY;
    }
    reply_macs(ctx, &crate::config())?;
    count(Reason::TxIcmpEcho);
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
fn echo_v6(ctx: &XdpContext, l3: &L3, icmp: *mut IcmpHdr) -> Result<u32, ()> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3.l3_off)?;
    // SAFETY: bounds-checked by ptr_at. Swapping the addresses leaves the pseudo-header sum as
    // it was, so only the type change enters the checksum.
    unsafe {
        (*ip).saddr = l3.dst;
        (*ip).daddr = l3.src;
        (*ip).hop_limit = REPLY_TTL;
        let old = u16::from_ne_bytes([(*icmp).ty, (*icmp).code]);
        let new = u16::from_ne_bytes([ICMPV6_ECHO_REPLY, (*icmp).code]);
        (*icmp).check = csum_replace2((*icmp).check, old, new);
        (*icmp).ty = ICMPV6_ECHO_REPLY;
    }
    reply_macs(ctx, &crate::config())?;
    count(Reason::TxIcmpEcho);
    Ok(xdp_action::XDP_TX)
}

/// An ICMP error quotes the packet the VIP "sent" (VIP -> client). Reverse the quoted header to
/// get the client's flow, find that flow's backend and send the error there.
///
/// Only a quote whose ports can be read is routed: a fragment other than the first carries
/// none (the bytes behind its header are data), so an error about one is passed. A first
/// fragment is routed like the whole packet: in IPv6 that means stepping over the fragment
/// header (a backend's large UDP reply, fragmented at its source, whose packet-too-big must
/// reach it for path-MTU discovery to work).
#[inline(always)]
fn error_to_backend(ctx: &XdpContext, l3: &L3) -> Result<u32, ()> {
    let inner_off = l3.l4_off + ICMP_LEN;
    let (vip, client, inner_proto, ports_off) = if l3.family == AF_INET {
        let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *inner };
        if h.ver_ihl != 0x45 || h.frag_off & IP_OFFSET != 0 {
            count(Reason::PassNoService);
            return Ok(xdp_action::XDP_PASS);
        }
        ([h.saddr, 0, 0, 0], [h.daddr, 0, 0, 0], h.proto, inner_off + IPV4_LEN)
    } else {
        let inner: *const Ipv6Hdr = ptr_at(ctx, inner_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *inner };
        // What is quoted must be an IPv6 header, as an IPv4 quote must be 0x45 above.
        if u32::from_be(h.vtc_flow) >> 28 != 6 {
            count(Reason::PassNoService);
            return Ok(xdp_action::XDP_PASS);
        }
        let (mut next, mut off) = (h.next_hdr, inner_off + IPV6_LEN);
        // One fragment header at most, straight behind the fixed one (as a source writes it
        // when no other extension header comes first); no loop for the verifier to bound.
        if next == crate::IPV6_FRAGMENT {
            if !l3.holds(off, IPV6_FRAG_LEN) {
                return Err(());
            }
            let frag: *const Ipv6FragHdr = ptr_at(ctx, off)?;
            // SAFETY: bounds-checked by ptr_at.
            let f = unsafe { *frag };
            if f.frag_off & IPV6_FRAG_OFFSET != 0 {
                count(Reason::PassNoService);
                return Ok(xdp_action::XDP_PASS);
            }
            (next, off) = (f.next_hdr, off + IPV6_FRAG_LEN);
        }
        (h.saddr, h.daddr, next, off)
    };
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        count(Reason::PassNoService);
        return Ok(xdp_action::XDP_PASS);
    }
    if !l3.holds(ports_off, size_of::<Ports>()) {
        return Err(());
    }
    let ports: *const Ports = ptr_at(ctx, ports_off)?;
    // SAFETY: bounds-checked by ptr_at.
    let p = unsafe { *ports };
    let Some(meta) = lookup_vip(&vip, p.src, inner_proto, l3.family) else {
        count(Reason::PassNoService);
        return Ok(xdp_action::XDP_PASS);
    };
    if meta.flags & vip_flags::L7 != 0 {
        count(Reason::PassL7);
        return Ok(xdp_action::XDP_PASS);
    }
    let key = FlowKey {
        src: client,
        dst: vip,
        sport: p.dst,
        dport: p.src,
        proto: inner_proto,
        family: l3.family,
        _pad: [0; 2],
    };
    // The quoted flow is established by definition: look for it on every CPU.
    Ok(forward(ctx, l3, &key, &meta, Reason::TxIcmpToBackend, Lookup::Established))
}

/// Bytes of the offending packet quoted in the error: its IP header and 8 bytes of transport
/// (in IPv6, an atomic fragment's header too: [`too_big_v6`]).
const QUOTE_V4: usize = IPV4_LEN + 8;
const QUOTE_V6: usize = IPV6_LEN + 8;

/// Frag-needed / packet-too-big answers each CPU may send per second, and at most at once. A
/// flood of spoofed packets too big to forward must not make the node an ICMP source at line
/// rate (the kernel caps its own ICMP errors too, at 1000 a second by default); past the
/// budget, such packets are dropped unanswered, as they would be without DF.
const TOO_BIG_PER_SEC: u64 = 10_000;
const TOO_BIG_BURST: i64 = 1_000;

/// May this CPU answer one more packet too big now? Takes a token if so.
#[inline(never)]
fn too_big_allowed() -> bool {
    let Some(b) = crate::maps::TOO_BIG_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's element of a per-CPU array, touched by no other CPU, and XDP does not
    // preempt itself on one CPU.
    let b = unsafe { &mut *b };
    // SAFETY: a helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    if !crate::budget::refill(b, now, 1_000_000_000 / TOO_BIG_PER_SEC, TOO_BIG_BURST) {
        return false;
    }
    b.tokens -= 1;
    true
}

/// Turns the packet into ICMP frag-needed (IPv4) or packet-too-big (IPv6) back to its sender,
/// advertising `mtu`.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, l3: &L3, mtu: u32, cfg: &GlobalConfig) -> u32 {
    // A sender that may not be answered (see `answerable`) gets nothing, nor does anyone past
    // this CPU's budget; the packet, too big to forward, is dropped all the same.
    if !matches!(answerable(ctx, l3), Ok(true)) || !too_big_allowed() {
        count(Reason::DropTooBig);
        return xdp_action::XDP_DROP;
    }
    let done = if l3.family == AF_INET {
        too_big_v4(ctx, l3, mtu, cfg)
    } else {
        too_big_v6(ctx, l3, mtu, cfg)
    };
    match done {
        Ok(()) => {
            count(Reason::TxIcmpTooBig);
            xdp_action::XDP_TX
        }
        Err(()) => {
            count(Reason::DropTooBig);
            xdp_action::XDP_DROP
        }
    }
}

/// Cuts the packet to the L2 header plus `quote` bytes of the IP packet and grows `grow` bytes of
/// room in front, moving the L2 header there with the MACs swapped.
#[inline(always)]
fn reshape(
    ctx: &XdpContext,
    l3: &L3,
    quote: usize,
    grow: usize,
    ethertype: u16,
    cfg: &GlobalConfig,
) -> Result<(), ()> {
    let len = ctx.data_end() - ctx.data();
    let want = l3.l3_off + quote;
    if len < want {
        return Err(());
    }
    // SAFETY: the helpers only move ctx->data / data_end; pointers are re-derived afterwards.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - want) as i32)) } != 0 {
        return Err(());
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Err(());
    }
    move_l2_reply(ctx, grow, l3.l3_off != ETH_LEN, cfg, ethertype)
}

#[inline(always)]
fn too_big_v4(ctx: &XdpContext, l3: &L3, mtu: u32, cfg: &GlobalConfig) -> Result<(), ()> {
    reshape(ctx, l3, QUOTE_V4, IPV4_LEN + ICMP_LEN, ETH_P_IP, cfg)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3.l3_off)?;
    let mut h = Ipv4Hdr {
        ver_ihl: 0x45,
        tos: 0,
        tot_len: ((IPV4_LEN + ICMP_LEN + QUOTE_V4) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: REPLY_TTL,
        proto: proto::ICMP,
        check: 0,
        saddr: l3.dst[0],
        daddr: l3.src[0],
    };
    h.check = ipv4_csum(&h);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *ip = h };
    let icmp_off = l3.l3_off + IPV4_LEN;
    let body: *mut [u16; (ICMP_LEN + QUOTE_V4) / 2] = ptr_at(ctx, icmp_off)?;
    let icmp: *mut IcmpHdr = body.cast();
    let mtu = (mtu as u16).to_be_bytes();
    // SAFETY: `body` covers the ICMP header and the quote, checked by ptr_at.
    unsafe {
        *icmp = IcmpHdr {
            ty: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            check: 0,
            rest: u32::from_ne_bytes([0, 0, mtu[0], mtu[1]]),
        };
        let mut sum = 0u64;
        let words = &*body;
        let mut i = 0;
        while i < words.len() {
            sum += words[i] as u64;
            i += 1;
        }
        (*icmp).check = csum_fold(sum);
    }
    Ok(())
}

#[inline(always)]
fn too_big_v6(ctx: &XdpContext, l3: &L3, mtu: u32, cfg: &GlobalConfig) -> Result<(), ()> {
    // An atomic fragment's header (the one extension header `parse_v6` steps over) is quoted
    // too, with the 8 bytes of transport behind it: the sender finds its socket by those ports.
    let frag = l3.l4_off != l3.l3_off + IPV6_LEN;
    let extra = if frag { IPV6_FRAG_LEN } else { 0 };
    reshape(ctx, l3, QUOTE_V6 + extra, IPV6_LEN + ICMP_LEN, ETH_P_IPV6, cfg)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3.l3_off)?;
    let payload = (ICMP_LEN + QUOTE_V6 + extra) as u16;
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        *ip = Ipv6Hdr {
            vtc_flow: 0x6000_0000u32.to_be(),
            payload_len: payload.to_be(),
            next_hdr: proto::ICMPV6,
            hop_limit: REPLY_TTL,
            saddr: l3.dst,
            daddr: l3.src,
        };
    }
    let body: *mut [u16; (ICMP_LEN + QUOTE_V6) / 2] = ptr_at(ctx, l3.l3_off + IPV6_LEN)?;
    let icmp: *mut IcmpHdr = body.cast();
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum = csum_add32(sum, l3.dst[i]);
        sum = csum_add32(sum, l3.src[i]);
        i += 1;
    }
    sum += payload.to_be() as u64 + (proto::ICMPV6 as u16).to_be() as u64;
    // SAFETY: `body` covers the ICMPv6 header and the quote (`more` the rest of a longer one),
    // checked by ptr_at.
    unsafe {
        *icmp = IcmpHdr { ty: ICMPV6_PKT_TOO_BIG, code: 0, check: 0, rest: mtu.to_be() };
        let words = &*body;
        let mut i = 0;
        while i < words.len() {
            sum += words[i] as u64;
            i += 1;
        }
        if frag {
            // The quote's last 8 bytes, past `body`: it holds an atomic fragment's header.
            let more: *const [u16; IPV6_FRAG_LEN / 2] =
                ptr_at(ctx, l3.l3_off + IPV6_LEN + ICMP_LEN + QUOTE_V6)?;
            let words = &*more;
            let mut i = 0;
            while i < words.len() {
                sum += words[i] as u64;
                i += 1;
            }
        }
        (*icmp).check = csum_fold(sum);
    }
    Ok(())
}
