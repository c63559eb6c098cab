//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights.
//!
//! The ring is built in user space and only indexed by the data path. Each backend walks its own
//! permutation of the M slots (an offset and a skip derived from its identity). Weights are
//! honoured exactly: every backend's quota is the floor or the ceiling of its weighted share of M
//! (largest-remainder rounding), and a backend stops claiming once it has its quota. Weight 0
//! (drained) gets no slot.
//!
//! One change from the paper's fill: in each round every backend looks at exactly the next slot
//! of its permutation and takes it if it is free, instead of skipping ahead to its next free
//! slot. So a slot goes to the backend that ranks it earliest (among those still under quota),
//! which depends much less on what the other backends took before. Removing one of 100 equal
//! backends at M = 65537 then moves about 1.3x the ideal 1/N of the slots instead of 1.58x (1000
//! backends: 4.4x instead of 6.7x), with the same exact balance and build time.
//!
//! The result depends only on the set of (identity, weight) pairs, never on their order in the
//! config: backends are sorted by identity first.

/// Something that can turn a backend set into a ring: Maglev here, a trait so that another
/// table (or a test double) can stand in.
pub trait ConsistentHash {
    /// Returns `ring_size` entries, each an index into `backends`; `None` when no backend has
    /// weight.
    fn build(&self, backends: &[RingMember], ring_size: u32) -> Option<Vec<u32>>;
}

/// One backend as the ring builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingMember {
    /// Stable identity (the backend address as 16 bytes); the permutation derives from it.
    pub id: [u8; 16],
    /// Relative weight; 0 means no slots.
    pub weight: u32,
}

impl RingMember {
    /// A member identified by its IP address.
    pub fn from_addr(addr: std::net::IpAddr, weight: u32) -> Self {
        let id = match addr {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(a) => a.octets(),
        };
        RingMember { id, weight }
    }

    /// A member identified by its address and port: an L7 pool may list one address on several
    /// ports, which must not share a permutation (the ring would then depend on their order).
    /// The port is folded into the address's first two bytes (zero in an IPv4-mapped address).
    pub fn from_socket_addr(addr: std::net::SocketAddr, weight: u32) -> Self {
        let mut m = Self::from_addr(addr.ip(), weight);
        let port = addr.port().to_be_bytes();
        m.id[0] ^= port[0];
        m.id[1] ^= port[1];
        m
    }
}

/// The Maglev builder.
#[derive(Clone, Copy, Debug, Default)]
pub struct Maglev;

/// 64-bit FNV-1a with a seed, for the permutation parameters (cold path, any decent hash does).
fn fnv(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64), so nearby addresses get unrelated permutations.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Each backend's slot quota: floor or ceil of `m * w / total`, summing to exactly `m`.
fn quotas(weights: &[u32], m: u32) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    let mut q: Vec<u32> = weights.iter().map(|&w| ((m as u64 * w as u64) / total) as u32).collect();
    let mut left = m - q.iter().sum::<u32>();
    // Largest remainders first; ties broken by position (the sorted identity order).
    let mut rem: Vec<(u64, usize)> =
        weights.iter().enumerate().map(|(i, &w)| ((m as u64 * w as u64) % total, i)).collect();
    rem.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (r, i) in rem {
        if left == 0 {
            break;
        }
        if r > 0 {
            q[i] += 1;
            left -= 1;
        }
    }
    q
}

impl ConsistentHash for Maglev {
    fn build(&self, backends: &[RingMember], ring_size: u32) -> Option<Vec<u32>> {
        let m = ring_size as u64;
        // Sort by identity so config order cannot matter; keep original indices for the output.
        let mut order: Vec<usize> =
            (0..backends.len()).filter(|&i| backends[i].weight > 0).collect();
        if order.is_empty() {
            return None;
        }
        order.sort_by_key(|&i| backends[i].id);
        let weights: Vec<u32> = order.iter().map(|&i| backends[i].weight).collect();
        let quota = quotas(&weights, ring_size);
        let mut offset = Vec::with_capacity(order.len());
        let mut skip = Vec::with_capacity(order.len());
        for &i in &order {
            offset.push(fnv(&backends[i].id, 0xdead_beef) % m);
            skip.push(fnv(&backends[i].id, 0x00c0_ffee) % (m - 1) + 1);
        }
        // Where each backend's walk is: offset + k * skip after k rounds.
        let mut pos = offset;
        let mut taken = vec![0u32; order.len()];
        const EMPTY: u32 = u32::MAX;
        let mut ring = vec![EMPTY; ring_size as usize];
        let mut filled = 0u32;
        let mut claiming: Vec<usize> = (0..order.len()).collect();
        while filled < ring_size {
            // Every backend under quota looks at the next slot of its walk. The walk is a full
            // cycle (skip and M are coprime, M prime) and the quotas sum to M, so a backend under
            // quota always reaches a free slot: the loop ends.
            claiming.retain(|&k| taken[k] < quota[k]);
            for &k in &claiming {
                let slot = pos[k] as usize;
                pos[k] = (pos[k] + skip[k]) % m;
                if ring[slot] == EMPTY && taken[k] < quota[k] {
                    ring[slot] = order[k] as u32;
                    taken[k] += 1;
                    filled += 1;
                }
            }
        }
        Some(ring)
    }
}

#[cfg(test)]
mod tests;
