//! The flow hashes: one implementation, run by the XDP program and by user space (`edgelb route`,
//! tests), so both always agree on which ring slot a flow lands in and which table bucket holds it.
//!
//! The ring hashes ([`client_hash`], [`five_tuple_hash`]) are MurmurHash3's 32-bit block mix and
//! finaliser over whole words: a handful of multiplies and rotates, no tables and no loops the
//! verifier has to bound. They decide which backend a flow gets, on every node behind ECMP, so
//! they never change.
//!
//! The connection-table hashes ([`flow_key_v4_hash`], [`flow_key_hash`]) only pick a bucket on
//! this node and are computed for every packet, so they are built for speed on BPF, which has
//! 64-bit multiplies but no rotate instruction (each 32-bit rotate is four instructions): one
//! multiply per 64-bit word of the key, then a multiply-xorshift fold. Nine instructions for an
//! IPv4 key instead of about sixty.

use crate::{FlowKey, FlowKeyV4};

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of the client address alone: source-IP affinity, the default per VIP.
#[inline(always)]
pub const fn client_hash(addr: &[u32; 4], seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, addr[0]);
    h = mix(h, addr[1]);
    h = mix(h, addr[2]);
    h = mix(h, addr[3]);
    finish(h, 16)
}

/// Hash of the whole 5-tuple, for VIPs that spread one client's flows over backends.
#[inline(always)]
pub const fn five_tuple_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, (key.sport as u32) | ((key.dport as u32) << 16));
    h = mix(h, key.proto as u32);
    finish(h, 40)
}

/// Odd 64-bit multipliers of the table hashes: the golden ratio, and MurmurHash3's fmix64
/// constants.
const T1: u64 = 0x9e37_79b9_7f4a_7c15;
const T2: u64 = 0xc4ce_b9fe_1a85_ec53;
const T3: u64 = 0xff51_afd7_ed55_8ccd;

/// One step of the table hash: fold in a 64-bit word.
#[inline(always)]
const fn table_step(h: u64, w: u64, k: u64) -> u64 {
    (h ^ w).wrapping_mul(k)
}

/// The table hash's finish: brings the high bits, which every input bit reaches, down to the
/// low ones that index the table.
#[inline(always)]
const fn table_finish(h: u64) -> u32 {
    let h = (h ^ (h >> 32)).wrapping_mul(T3);
    (h ^ (h >> 29)) as u32
}

/// Two 32-bit words as one 64-bit word.
#[inline(always)]
const fn word64(hi: u32, lo: u32) -> u64 {
    (hi as u64) << 32 | lo as u64
}

/// Connection-table bucket hash of an IPv4 flow (its 16-byte key as two 64-bit words).
#[inline(always)]
pub const fn flow_key_v4_hash(key: &FlowKeyV4, seed: u32) -> u32 {
    let ports = key.sport as u32 | (key.dport as u32) << 16;
    let h = table_step(seed as u64, word64(ports, key.src), T1);
    table_finish(table_step(h, word64(key.proto as u32, key.dst), T2))
}

/// Connection-table bucket hash of any flow (the IPv6 table): five 64-bit words.
#[inline(always)]
pub const fn flow_key_hash(key: &FlowKey, seed: u32) -> u32 {
    let ports = key.sport as u32 | (key.dport as u32) << 16;
    let mut h = table_step(seed as u64, word64(key.src[0], key.src[1]), T1);
    h = table_step(h, word64(key.src[2], key.src[3]), T2);
    h = table_step(h, word64(key.dst[0], key.dst[1]), T1);
    h = table_step(h, word64(key.dst[2], key.dst[3]), T2);
    table_finish(table_step(h, word64(key.proto as u32, ports), T1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hash_depends_on_every_word_and_the_seed() {
        let a = [0x0100_12c6, 0, 0, 0];
        let base = client_hash(&a, 1);
        for i in 0..4 {
            let mut b = a;
            b[i] ^= 1;
            assert_ne!(client_hash(&b, 1), base, "word {i}");
        }
        assert_ne!(client_hash(&a, 2), base);
    }

    /// A tiny deterministic generator for the tests (xorshift64*).
    fn rng(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    const BUCKETS: u32 = 1 << 15;

    /// Most loaded bucket when `keys` go into `BUCKETS` buckets.
    fn max_load(keys: impl Iterator<Item = u32>) -> u32 {
        let mut load = [0u32; BUCKETS as usize];
        for h in keys {
            load[(h & (BUCKETS - 1)) as usize] += 1;
        }
        *load.iter().max().unwrap()
    }

    fn v4(src: u32, sport: u16) -> FlowKeyV4 {
        FlowKeyV4 { src, dst: 0x0101_12c6, sport, dport: 80u16.to_be(), proto: 6, _pad: [0; 3] }
    }

    #[test]
    fn table_hashes_spread_regular_traffic_over_the_buckets() {
        // Two keys per bucket on average: with a uniform hash the fullest bucket of 32768 holds
        // about 9; a hash that ignored some input bits would pile keys up far beyond that.
        // Clients of one /16 (address bytes in network order, as the program loads them), one
        // port each.
        let clients = (0..65_536u32).map(|i| 0x0000_12c6 | (i.swap_bytes() >> 16) << 16);
        assert!(max_load(clients.map(|c| flow_key_v4_hash(&v4(c, 40000u16.to_be()), 7))) <= 14);
        // One client, many source ports.
        let ports =
            (0..65_536u32).map(|p| flow_key_v4_hash(&v4(0x0704_12c6, (p as u16).to_be()), 7));
        assert!(max_load(ports) <= 14);
        // IPv6 clients of one /64, one port each.
        let v6 = (0..65_536u32).map(|i| {
            let key = FlowKey {
                src: [0x0200_0120, 0, 0, i.swap_bytes()],
                dst: [0x0200_0120, 0x0100_0000, 0, 0x0100_0000],
                sport: 40000u16.to_be(),
                dport: 80u16.to_be(),
                proto: 6,
                family: 10,
                _pad: [0; 2],
            };
            flow_key_hash(&key, 7)
        });
        assert!(max_load(v6) <= 14);
    }

    #[test]
    fn every_key_bit_moves_the_bucket() {
        // Flipping any one bit of a random key sends it to another bucket almost always (a bit
        // that never reached the index bits would stay put every time).
        let mut state = 0x1234_5678_9abc_def1;
        for bit in 0..96 {
            let mut same = 0;
            for _ in 0..1000 {
                let r = rng(&mut state);
                let key = FlowKeyV4 {
                    src: r as u32,
                    dst: (r >> 32) as u32,
                    sport: rng(&mut state) as u16,
                    dport: 80,
                    proto: 6,
                    _pad: [0; 3],
                };
                let mut flipped = key;
                match bit {
                    0..32 => flipped.src ^= 1 << bit,
                    32..64 => flipped.dst ^= 1 << (bit - 32),
                    64..80 => flipped.sport ^= 1 << (bit - 64),
                    _ => flipped.dport ^= 1 << (bit - 80),
                }
                let (a, b) = (flow_key_v4_hash(&key, 7), flow_key_v4_hash(&flipped, 7));
                same += u32::from((a ^ b) & (BUCKETS - 1) == 0);
            }
            assert!(same <= 5, "bit {bit}: {same} of 1000 flips kept the bucket");
        }
    }

    #[test]
    fn five_tuple_hash_depends_on_ports() {
        let k = FlowKey { sport: 1, dport: 80, proto: 6, ..FlowKey::default() };
        let mut k2 = k;
        k2.sport = 2;
        assert_ne!(five_tuple_hash(&k, 0), five_tuple_hash(&k2, 0));
    }
}
