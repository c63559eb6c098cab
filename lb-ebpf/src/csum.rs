//! Internet checksums (RFC 1071) over headers the programs write or change, and their
//! incremental update (RFC 1624). Words are taken as they lie in memory: the one's-complement
//! sum is the same in either byte order, so no swapping is needed.

use crate::parse::Ipv4Hdr;

/// Folds a 32-bit one's-complement sum into the final 16-bit checksum.
#[inline(always)]
pub fn csum_fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Adds a 32-bit word (address half-words) to a checksum accumulator.
#[inline(always)]
pub fn csum_add32(sum: u64, w: u32) -> u64 {
    sum + (w & 0xffff) as u64 + (w >> 16) as u64
}

/// One's-complement sum of an IPv4 header without options, its `check` field left out.
#[inline(always)]
fn ipv4_sum(h: &Ipv4Hdr) -> u64 {
    let mut s: u64 = u16::from_ne_bytes([h.ver_ihl, h.tos]) as u64;
    s += h.tot_len as u64 + h.id as u64 + h.frag_off as u64;
    s += u16::from_ne_bytes([h.ttl, h.proto]) as u64;
    s = csum_add32(s, h.saddr);
    csum_add32(s, h.daddr)
}

/// Header checksum of an IPv4 header without options (its `check` field taken as zero).
#[inline(always)]
pub fn ipv4_csum(h: &Ipv4Hdr) -> u16 {
    csum_fold(ipv4_sum(h))
}

/// Does the checksum of an IPv4 header without options verify (the sum over the header, its
/// `check` field included, folds to zero)?
#[inline(always)]
pub fn ipv4_csum_ok(h: &Ipv4Hdr) -> bool {
    csum_fold(ipv4_sum(h) + h.check as u64) == 0
}

/// RFC 1624 incremental update of `check` when a 16-bit word changes from `old` to `new`.
///
/// Where the update comes to 0x0000 it gives 0xffff: both are the one's-complement zero to a
/// receiver summing words that are not all zero, but only 0xffff verifies where they are (an
/// ICMP echo request of zeros past its type, whose reply's words are then all zero), which the
/// update alone cannot tell apart.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let s = (!check) as u64 + (!old) as u64 + new as u64;
    match csum_fold(s) {
        0 => 0xffff,
        c => c,
    }
}
