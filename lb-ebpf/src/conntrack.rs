//! Backend selection: the connection table first, then the VIP's Maglev ring.
//!
//! A flow stays on its backend for as long as that backend is in the pool (serving or drained):
//! the table entry is trusted only while the backend is PRESENT and has the generation the entry
//! recorded. Otherwise the flow re-hashes onto the current ring.

use crate::maps::{BACKENDS, CONNTRACK, CONNTRACK_V4, RINGS};
use lb_common::{
    AF_INET, Backend, Conn, FlowKey, HASH_SEED, VipMeta, backend_flags, hash, vip_flags,
};

/// The chosen backend.
pub struct Pick {
    /// Backend id (index into BACKENDS and BACKEND_STATS).
    pub id: u32,
    /// Copy of the backend entry.
    pub backend: Backend,
    /// True when the flow was placed by the ring now (a new flow).
    pub new_flow: bool,
}

/// The hash that places `key` on `meta`'s ring.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, meta: &VipMeta) -> u32 {
    if meta.flags & vip_flags::HASH_5TUPLE != 0 {
        hash::five_tuple_hash(key, HASH_SEED)
    } else {
        hash::client_hash(&key.src, HASH_SEED)
    }
}

#[inline(always)]
fn live_backend(id: u32) -> Option<Backend> {
    let b = BACKENDS.get(id)?;
    if b.flags & backend_flags::PRESENT == 0 {
        return None;
    }
    Some(*b)
}

/// Picks the backend for `key`. With `remember`, a ring placement is stored in the connection
/// table (data packets); without it (ICMP errors) the table is only read.
#[inline(always)]
pub fn pick(key: &FlowKey, meta: &VipMeta, fhash: u32, remember: bool) -> Option<Pick> {
    // SAFETY: the value is copied out at once; an LRU entry evicted concurrently yields at worst
    // a stale copy, which the generation check below rejects.
    let found = if key.family == AF_INET {
        unsafe { CONNTRACK_V4.get(&key.v4()) }.copied()
    } else {
        // SAFETY: as above.
        unsafe { CONNTRACK.get(key) }.copied()
    };
    if let Some(conn) = found
        && let Some(backend) = live_backend(conn.backend)
        && backend.generation == conn.generation
    {
        return Some(Pick { id: conn.backend, backend, new_flow: false });
    }
    if meta.ring_size == 0 {
        return None;
    }
    let slot = meta.ring_base + fhash % meta.ring_size;
    let id = *RINGS.get(slot)?;
    let backend = live_backend(id)?;
    if remember {
        let conn = Conn { backend: id, generation: backend.generation };
        // A full table evicts the least recently used entry; an error here only means the next
        // packet of this flow is placed by the ring again, which picks the same backend.
        let _ = if key.family == AF_INET {
            CONNTRACK_V4.insert(&key.v4(), &conn, 0)
        } else {
            CONNTRACK.insert(key, &conn, 0)
        };
    }
    Some(Pick { id, backend, new_flow: true })
}
