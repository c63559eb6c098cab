//! Hand-built packets, byte by byte, with correct checksums. Used both for inputs and for the
//! exact expected outputs of the XDP program.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The balancer's MAC in fixtures (frames arrive addressed to it).
pub const LB_MAC: [u8; 6] = [2, 0xed, 0, 0, 0, 2];
/// The client's (or router's) MAC in fixtures.
pub const CLIENT_MAC: [u8; 6] = [2, 0xed, 0, 0, 0, 1];

pub const ETH_IP: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;

/// Internet checksum of `data` (plus an initial sum).
pub fn csum_with(mut sum: u32, data: &[u8]) -> u16 {
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Internet checksum of `data`.
pub fn csum(data: &[u8]) -> u16 {
    csum_with(0, data)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut b = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend(s.octets());
            b.extend(d.octets());
            b.extend([0, proto]);
            b.extend((len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend(s.octets());
            b.extend(d.octets());
            b.extend((len as u32).to_be_bytes());
            b.extend([0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    b.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum()
}

/// Ethernet frame.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(dst);
    p.extend(src);
    p.extend(ethertype.to_be_bytes());
    p.extend(payload);
    p
}

/// Ethernet frame with one 802.1Q tag.
pub fn eth_vlan(dst: [u8; 6], src: [u8; 6], vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(dst);
    p.extend(src);
    p.extend(0x8100u16.to_be_bytes());
    p.extend(vid.to_be_bytes());
    p.extend(ethertype.to_be_bytes());
    p.extend(payload);
    p
}

/// IPv4 header fields the fixtures vary.
#[derive(Clone)]
pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub tos: u8,
    pub id: u16,
    pub df: bool,
    pub mf: bool,
    pub frag_offset: u16,
    pub ttl: u8,
    pub options: Vec<u8>,
}

impl V4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> V4 {
        V4 {
            src,
            dst,
            proto,
            tos: 0,
            id: 0,
            df: true,
            mf: false,
            frag_offset: 0,
            ttl: 64,
            options: Vec::new(),
        }
    }

    /// The IPv4 packet: header (checksummed) + payload.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        assert!(hlen.is_multiple_of(4));
        let mut h = Vec::new();
        h.push(0x40 | (hlen / 4) as u8);
        h.push(self.tos);
        h.extend(((hlen + payload.len()) as u16).to_be_bytes());
        h.extend(self.id.to_be_bytes());
        let flags = (if self.df { 0x4000 } else { 0 })
            | (if self.mf { 0x2000 } else { 0 })
            | self.frag_offset;
        h.extend(flags.to_be_bytes());
        h.push(self.ttl);
        h.push(self.proto);
        h.extend([0, 0]);
        h.extend(self.src.octets());
        h.extend(self.dst.octets());
        h.extend(&self.options);
        let c = csum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend(payload);
        h
    }
}

/// IPv6 packet with a fixed header only.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, flow: u32, hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend((0x6000_0000u32 | (flow & 0x0fff_ffff)).to_be_bytes());
    h.extend((payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(hop);
    h.extend(src.octets());
    h.extend(dst.octets());
    h.extend(payload);
    h
}

/// TCP segment (20-byte header) with a correct checksum.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(sport.to_be_bytes());
    t.extend(dport.to_be_bytes());
    t.extend(1u32.to_be_bytes());
    t.extend(0u32.to_be_bytes());
    t.push(5 << 4);
    t.push(flags);
    t.extend(65535u16.to_be_bytes());
    t.extend([0, 0, 0, 0]);
    t.extend(payload);
    let c = csum_with(pseudo_sum(src, dst, 6, t.len()), &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// UDP datagram with a correct checksum.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend(sport.to_be_bytes());
    u.extend(dport.to_be_bytes());
    u.extend(((8 + payload.len()) as u16).to_be_bytes());
    u.extend([0, 0]);
    u.extend(payload);
    let c = csum_with(pseudo_sum(src, dst, 17, u.len()), &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// ICMP message (v4: no pseudo header).
pub fn icmp4(ty: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend(rest);
    m.extend(payload);
    let c = csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// ICMPv6 message (checksum over the pseudo header).
pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend(rest);
    m.extend(payload);
    let c = csum_with(pseudo_sum(IpAddr::V6(src), IpAddr::V6(dst), 58, m.len()), &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// TCP SYN flag.
pub const SYN: u8 = 0x02;
/// TCP ACK flag.
pub const ACK: u8 = 0x10;
/// TCP FIN flag.
pub const FIN: u8 = 0x01;
/// TCP RST flag.
pub const RST: u8 = 0x04;
