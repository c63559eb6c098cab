//! Packet header layouts and bounds-checked access.
//!
//! Every read goes through [`ptr_at`], which checks the whole header against `data_end` right
//! before it is used, as the verifier demands. Headers are `packed(2)`: after a 14-byte Ethernet
//! header the IP header is only 2-byte aligned, and the layouts must not promise more.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

/// EtherType of IPv4, as read from the wire in native order.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
/// EtherType of an 802.1Q tag.
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();

/// Ethernet header.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

/// The Ethernet header as seven 16-bit words (destination MAC 0..3, source MAC 3..6, EtherType
/// 6). Headers are copied through this view with a volatile read: copying the byte arrays of
/// `EthHdr` between overlapping places in the packet makes LLVM emit a call to a byte-wise
/// `memmove`, which cost a fifth of the program's time per packet.
pub type EthWords = [u16; 7];

/// A MAC address as the three 16-bit words it occupies in [`EthWords`].
#[inline(always)]
pub fn mac_words(m: &[u8; 6]) -> [u16; 3] {
    [
        u16::from_ne_bytes([m[0], m[1]]),
        u16::from_ne_bytes([m[2], m[3]]),
        u16::from_ne_bytes([m[4], m[5]]),
    ]
}

/// The destination MAC of a header.
#[inline(always)]
pub fn eth_dst(e: &EthWords) -> [u16; 3] {
    [e[0], e[1], e[2]]
}

/// The source MAC of a header.
#[inline(always)]
pub fn eth_src(e: &EthWords) -> [u16; 3] {
    [e[3], e[4], e[5]]
}

/// Reads the Ethernet header at `offset` as words, with no copy elision into a memmove.
#[inline(always)]
pub fn read_eth(ctx: &XdpContext, offset: usize) -> Result<EthWords, ()> {
    let p: *const EthWords = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked by ptr_at; Ethernet headers start at even offsets of a packet
    // buffer, which is at least 2-byte aligned.
    Ok(unsafe { core::ptr::read_volatile(p) })
}

/// Writes an Ethernet header at `offset`.
#[inline(always)]
pub fn write_eth(
    ctx: &XdpContext,
    offset: usize,
    dst: [u16; 3],
    src: [u16; 3],
    proto: u16,
) -> Result<(), ()> {
    let p: *mut EthWords = ptr_at(ctx, offset)?;
    // SAFETY: as in read_eth.
    unsafe { *p = [dst[0], dst[1], dst[2], src[0], src[1], src[2], proto] };
    Ok(())
}

/// Moves the L2 header (14 bytes, or 18 with `vlan`) from offset `from` to offset `to`, which may
/// overlap: the old header is read whole before the new one is written. The new header gets the
/// (destination, source) MACs `macs` picks from the old one and `ethertype` as its innermost
/// EtherType; a VLAN tag keeps its TCI. For encapsulation (moving towards the start) and
/// decapsulation (moving away from it) alike.
#[inline(always)]
pub fn move_l2(
    ctx: &XdpContext,
    from: usize,
    to: usize,
    vlan: bool,
    ethertype: u16,
    macs: impl FnOnce(&EthWords) -> ([u16; 3], [u16; 3]),
) -> Result<(), ()> {
    let old = read_eth(ctx, from)?;
    let (dst, src) = macs(&old);
    if vlan {
        let old_tag: *const VlanHdr = ptr_at(ctx, from + ETH_LEN)?;
        // SAFETY: bounds-checked by ptr_at; read before anything overlapping it is written.
        let tci = unsafe { core::ptr::read_volatile(old_tag) }.tci;
        write_eth(ctx, to, dst, src, old[6])?;
        let new_tag: *mut VlanHdr = ptr_at(ctx, to + ETH_LEN)?;
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *new_tag = VlanHdr { tci, proto: ethertype } };
    } else {
        write_eth(ctx, to, dst, src, ethertype)?;
    }
    Ok(())
}

/// 802.1Q tag (follows the source MAC; `proto` is the inner EtherType).
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub tci: u16,
    pub proto: u16,
}

/// IPv4 header without options.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// IPv6 fixed header.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// Offset of the flags byte in the TCP header.
pub const TCP_FLAGS_OFF: usize = 13;
/// A TCP header without options.
pub const TCP_MIN_LEN: usize = 20;
/// A UDP header.
pub const UDP_LEN: usize = 8;
/// The SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// The FIN and RST flags: the client ends the connection.
pub const TCP_FIN_RST: u8 = 0x01 | 0x04;

/// The first four bytes of TCP and UDP: the ports.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// IPv6 fragment header (RFC 8200 4.5): read where a packet carries one, to step over an atomic
/// fragment's, and where an ICMPv6 error quotes a fragment, to find the ports behind it.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct Ipv6FragHdr {
    pub next_hdr: u8,
    pub reserved: u8,
    /// Fragment offset (13 bits), 2 reserved bits, M flag.
    pub frag_off: u16,
    pub id: u32,
}

/// ICMP / ICMPv6 header.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

pub const ETH_LEN: usize = size_of::<EthHdr>();
pub const VLAN_LEN: usize = size_of::<VlanHdr>();
pub const IPV4_LEN: usize = size_of::<Ipv4Hdr>();
pub const IPV6_LEN: usize = size_of::<Ipv6Hdr>();
pub const ICMP_LEN: usize = size_of::<IcmpHdr>();
pub const IPV6_FRAG_LEN: usize = size_of::<Ipv6FragHdr>();

/// IPv4 "more fragments" flag and fragment offset bits of `frag_off` (native order).
pub const IP_MF_OFFSET: u16 = 0x3FFFu16.to_be();
/// IPv4 fragment offset bits of `frag_off` (native order): non-zero in all but a first fragment,
/// the one that holds the transport header.
pub const IP_OFFSET: u16 = 0x1FFFu16.to_be();
/// IPv6 fragment offset bits of a fragment header's `frag_off` (native order): likewise.
pub const IPV6_FRAG_OFFSET: u16 = 0xFFF8u16.to_be();
/// IPv6 fragment offset and M flag bits of a fragment header's `frag_off` (native order): zero in
/// an atomic fragment, a whole packet that carries a fragment header all the same (RFC 6946).
pub const IPV6_FRAG_OFFSET_M: u16 = 0xFFF9u16.to_be();
/// IPv4 "don't fragment" bit.
pub const IP_DF: u16 = 0x4000u16.to_be();

/// Returns a pointer to a `T` at `offset` from the packet start, or `Err` when the packet is too
/// short. The check covers all of `T`.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Where the network header starts and which EtherType it has.
pub struct L2 {
    /// Offset of the IP header: 14, or 18 behind one 802.1Q tag.
    pub l3_off: usize,
    /// Inner EtherType (native order of the wire bytes).
    pub proto: u16,
    /// The destination MAC is a group address (broadcast or multicast: the I/G bit, the
    /// lowest bit of its first byte, is set): the frame was not sent to this node alone.
    pub group_dst: bool,
}

/// Parses Ethernet and at most one 802.1Q tag.
#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Result<L2, ()> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    let (proto, group_dst) = unsafe { ((*eth).proto, (*eth).dst[0] & 1 != 0) };
    if proto == ETH_P_8021Q {
        let vlan: *const VlanHdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: checked by ptr_at.
        let inner = unsafe { (*vlan).proto };
        return Ok(L2 { l3_off: ETH_LEN + VLAN_LEN, proto: inner, group_dst });
    }
    Ok(L2 { l3_off: ETH_LEN, proto, group_dst })
}
