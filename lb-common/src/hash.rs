//! The flow hash: one implementation, run by the XDP program and by user space (`edgelb route`,
//! tests), so both always agree on which ring slot a flow lands in.
//!
//! It is MurmurHash3's 32-bit block mix and finaliser over whole words: a handful of multiplies
//! and rotates, no tables and no loops the verifier has to bound.

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

/// Connection-table bucket hash of an IPv4 flow (four words instead of ten).
#[inline(always)]
pub const fn flow_key_v4_hash(key: &FlowKeyV4, seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, key.src);
    h = mix(h, key.dst);
    h = mix(h, (key.sport as u32) | ((key.dport as u32) << 16));
    h = mix(h, key.proto as u32);
    finish(h, 16)
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

    #[test]
    fn five_tuple_hash_depends_on_ports() {
        let k = FlowKey { sport: 1, dport: 80, proto: 6, ..FlowKey::default() };
        let mut k2 = k;
        k2.sport = 2;
        assert_ne!(five_tuple_hash(&k, 0), five_tuple_hash(&k2, 0));
    }
}
