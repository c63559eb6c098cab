//! Backend selection: the connection table first, then the VIP's Maglev ring.
//!
//! A flow stays on its backend for as long as that backend is in the pool (serving or drained):
//! the table entry is trusted only while the backend is PRESENT and has the generation the entry
//! recorded. Otherwise the flow re-hashes onto the current ring.
//!
//! The table is per CPU: one array, a region of buckets per CPU (`cpu * buckets + bucket`),
//! sized by user space for the machine's CPUs (the bucket count is a load-time constant). XDP
//! runs one packet at a time per CPU with migration disabled, so a region is only ever written
//! by its CPU. (A plain array rather than a per-CPU array map: its lookup is one address
//! computation, where a per-CPU array first loads the element's per-CPU pointer from a table,
//! another cache miss per packet.) It is set-associative: a flow's hash names one bucket of
//! [`CONNTRACK_WAYS`] flows kept most recently used first. A hit moves the flow to the front; a
//! new flow goes to the front and the least recently used one of that bucket is forgotten, one
//! its client has ended (FIN or RST seen) in the older half of the bucket before a live one (it
//! re-hashes onto the ring if it ever sends again, which picks the same backend unless the pool
//! changed meanwhile). An IPv4 bucket is one cache line (16-byte entries, page-aligned mmapable
//! map), an IPv6 bucket two (32-byte entries that name the VIP by its index rather than its
//! address); no kernel hashing, no locks.
//!
//! A TCP SYN does not touch the table. It is placed by the ring and its flow written to a
//! handshake slot: a small direct-mapped per-CPU table (`CT_SYN_V4` / `CT_SYN_V6`,
//! [`lb_common::SYN_STAGE_SLOTS`] slots, 16 / 32 KiB per CPU) indexed by the top bits of the same hash, small
//! enough to stay in the cache, where the table's bucket is almost always a cache miss the SYN
//! would wait for (reading it, or writing it: a store to a line not cached is waited for too). The
//! flow's next packet misses the table, finds its handshake slot, and moves the flow into the
//! bucket it has just read (so the write hits the cache). This saves a cache miss per connection,
//! and a SYN flood cannot push established flows out of the table: spoofed SYNs only overwrite
//! each other's handshake slots. A handshake whose slot another SYN took before its next packet
//! came (one of [`lb_common::SYN_STAGE_SLOTS`] per CPU, so under a heavy SYN rate) is placed by the
//! ring again then: the same backend, unless the pool changed meanwhile.
//!
//! A TCP segment without SYN whose flow no table holds (after an eviction, a restart, a move
//! between CPUs, or a flood of spoofed ACKs or RSTs, one per made-up flow) waits in its handshake
//! slot the same way, and enters the table at its next packet: such a flood cannot push
//! established flows out either. Looking for such a flow in the other CPUs' tables reads a
//! bucket per CPU, so each CPU has a budget of those reads ([`SEARCH_READS_PER_SEC`]).
//!
//! A flow whose next packet ends it (RST or FIN: a handshake aborted, a port scan's RST after
//! the backend's SYN-ACK, spoofed SYN+RST pairs) goes to its handshake slot's backend and empties
//! the slot, but does not enter the table. What does put a made-up flow in the table is two
//! spoofed packets of one 5-tuple, a SYN then an ACK (or two segments without SYN): the
//! backend's SYN-ACK does not come back through here (direct server return), so the ACK number
//! cannot be checked against it.
//!
//! A client can reuse a 5-tuple while its old entry is still in the table (a port reused soon
//! after a close). The new connection's SYN is placed by the ring, which picks another backend
//! than the entry's if the pool changed while the old connection lived. So a FIN or RST from the
//! client marks its flow's entry closing ([`CONN_CLOSING`]), and a packet that hits a closing
//! entry also looks in its handshake slot: if a new SYN of the same 5-tuple waits there, the
//! flow follows that SYN's backend from then on. Packets of the old connection's close (its
//! last ACKs) still hit the entry and go to the old backend. A connection that ended without the
//! program seeing a FIN or RST (a client that crashed, or a close that went through another
//! node) is not marked: a new connection on its 5-tuple has its SYN placed by the ring but its
//! next packets follow the old entry, a split handshake if the pool changed meanwhile (the old
//! backend resets it; the client's retry on another port goes through).

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_loop},
};

use crate::{
    maps::{
        BACKENDS, CONNTRACK, CONNTRACK_V4, CT_V4_BUCKETS, CT_V6_BUCKETS, RINGS, SEARCH_BUDGET,
        SYN_STAGE_V4, SYN_STAGE_V6,
    },
    same_addr,
    stats::count_ct,
};
use lb_common::{
    AF_INET, Backend, CONN_CLOSING, CONN_GENERATION_MASK, CONNTRACK_WAYS, Conn, ConnBucket,
    ConnBucketV4, ConnEntry, ConnEntryV4, FlowKey, HASH_SEED, SYN_STAGE_BITS, VipMeta,
    backend_flags, ct_stats, hash, proto, vip_flags,
};

/// The chosen backend.
pub struct Pick {
    /// Backend id (index into BACKENDS and BACKEND_STATS).
    pub id: u32,
    /// Copy of the backend entry.
    pub backend: Backend,
    /// True when the flow was placed by the ring now (a new flow).
    pub new_flow: bool,
    /// The flow's connection-table hash (of its whole 5-tuple), also the entropy of the outer
    /// source address and flow label: computed for every packet anyway, unlike the ring hash,
    /// which only a flow the table does not know needs.
    pub hash: u32,
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

const _: () = assert!(CONNTRACK_WAYS == 4, "promote() and find() are written for 4 ways");

/// Moves way `at` to the front of `ways`, shifting the ones before it back by one. Constant
/// indices only: no bounds checks for the verifier to choke on, no memmove loop.
#[inline(always)]
fn promote<T: Copy>(ways: &mut [T; CONNTRACK_WAYS], at: usize) {
    let moved = match at {
        1 => ways[1],
        2 => ways[2],
        3 => ways[3],
        _ => return,
    };
    if at >= 3 {
        ways[3] = ways[2];
    }
    if at >= 2 {
        ways[2] = ways[1];
    }
    ways[1] = ways[0];
    ways[0] = moved;
}

/// A connection-table bucket of one address family.
trait Bucket: Sized + 'static {
    /// One way of the bucket.
    type Way: Copy + Default;
    /// Buckets in each CPU's region of the table (a power of two, fixed at load).
    fn buckets() -> u32;
    /// The hash that picks `key`'s bucket.
    fn hash(key: &FlowKey) -> u32;
    /// Bucket `index` of the whole table (`cpu * buckets() + bucket`); `None` past its end.
    fn at(index: u32) -> Option<*mut Self>;
    /// The ways, most recently used first.
    fn ways(&self) -> &[Self::Way; CONNTRACK_WAYS];
    /// The ways, to reorder or overwrite.
    fn ways_mut(&mut self) -> &mut [Self::Way; CONNTRACK_WAYS];
    /// The backend of `way` if it holds `key` (a flow of VIP index `vip`).
    fn matches(way: &Self::Way, key: &FlowKey, vip: u32) -> Option<Conn>;
    /// A way holding `key -> conn` (a flow of VIP index `vip`).
    fn way(key: &FlowKey, vip: u32, conn: Conn) -> Self::Way;
    /// The tag word of `way` ([`Conn::tag`]; zero for an empty way).
    fn tag(way: &Self::Way) -> u32;
    /// The tag word of `way`, to change.
    fn tag_mut(way: &mut Self::Way) -> &mut u32;
    /// This CPU's handshake slot for table hash `hash`.
    fn stage(hash: u32) -> Option<*mut Self::Way>;

    /// Does `way` hold a flow?
    #[inline(always)]
    fn occupied(way: &Self::Way) -> bool {
        Self::tag(way) != 0
    }

    /// Has the client of `way`'s flow sent FIN or RST ([`CONN_CLOSING`])?
    #[inline(always)]
    fn closing(way: &Self::Way) -> bool {
        Self::tag(way) & CONN_CLOSING != 0
    }

    /// Marks `way`'s flow as closing.
    #[inline(always)]
    fn mark_closing(way: &mut Self::Way) {
        *Self::tag_mut(way) |= CONN_CLOSING;
    }

    /// Way holding `key` (of VIP index `vip`), its entry, and whether the flow is closing.
    #[inline(always)]
    fn find(&self, key: &FlowKey, vip: u32) -> Option<(usize, Conn, bool)> {
        for (i, way) in self.ways().iter().enumerate() {
            if let Some(conn) = Self::matches(way, key, vip) {
                return Some((i, conn, Self::closing(way)));
            }
        }
        None
    }

    /// Makes way `at` the most recently used; with `closing`, marks its flow as closing.
    #[inline(always)]
    fn touch(&mut self, at: usize, closing: bool) {
        let ways = self.ways_mut();
        promote(ways, at);
        if closing {
            Self::mark_closing(&mut ways[0]);
        }
    }

    /// The way a flow entering this bucket takes: an empty one if any (empty ways are always
    /// the last), else the least recently used flow its client has ended (FIN or RST seen, whose
    /// last packets re-hash onto the ring if it is pushed out: the same backend unless the pool
    /// changed meanwhile) among the older half of the bucket, else the least recently used flow.
    #[inline(always)]
    fn victim(&self) -> usize {
        let ways = self.ways();
        let last = &ways[CONNTRACK_WAYS - 1];
        if !Self::occupied(last) || Self::closing(last) {
            CONNTRACK_WAYS - 1
        } else if Self::closing(&ways[2]) {
            2
        } else {
            // Not an ended flow among the two most recent: one ended by its client's FIN may be
            // a half-closed download whose ACKs still come (the server still sends), so only
            // the older half of the bucket gives its ended flows up first.
            CONNTRACK_WAYS - 1
        }
    }

    /// Stores `key -> conn` in front, in way `at` if the key is there already, else in place of
    /// the [`Bucket::victim`] way (an ended flow before a live one); with `closing`, marked as
    /// closing.
    #[inline(always)]
    fn store(&mut self, at: Option<usize>, key: &FlowKey, vip: u32, conn: Conn, closing: bool) {
        let at = match at {
            Some(at) => at,
            None => {
                let victim = self.victim();
                if Self::occupied(&self.ways()[victim]) {
                    count_ct(ct_stats::EVICTED);
                }
                victim
            }
        };
        let ways = self.ways_mut();
        promote(ways, at);
        ways[0] = Self::way(key, vip, conn);
        if closing {
            Self::mark_closing(&mut ways[0]);
        }
    }
}

impl Pick {
    /// The connection-table entry that keeps a flow on this pick.
    #[inline(always)]
    fn conn(&self) -> Conn {
        Conn { backend: self.id, generation: self.backend.generation }
    }
}

impl Bucket for ConnBucketV4 {
    type Way = ConnEntryV4;
    #[inline(always)]
    fn buckets() -> u32 {
        CT_V4_BUCKETS.load()
    }
    #[inline(always)]
    fn hash(key: &FlowKey) -> u32 {
        hash::flow_key_v4_hash(&key.v4(), HASH_SEED)
    }
    #[inline(always)]
    fn at(index: u32) -> Option<*mut Self> {
        CONNTRACK_V4.get_ptr_mut(index)
    }
    #[inline(always)]
    fn ways(&self) -> &[ConnEntryV4; CONNTRACK_WAYS] {
        &self.ways
    }
    #[inline(always)]
    fn ways_mut(&mut self) -> &mut [ConnEntryV4; CONNTRACK_WAYS] {
        &mut self.ways
    }
    #[inline(always)]
    fn matches(way: &ConnEntryV4, key: &FlowKey, _vip: u32) -> Option<Conn> {
        (way.src == key.src[0]
            && way.dst == key.dst[0]
            && way.ports == ports(key)
            && Conn::tag_proto(way.tag) == key.proto)
            .then(|| Conn::from_tag(way.tag))
    }
    #[inline(always)]
    fn way(key: &FlowKey, _vip: u32, conn: Conn) -> ConnEntryV4 {
        ConnEntryV4 {
            src: key.src[0],
            dst: key.dst[0],
            ports: ports(key),
            tag: conn.tag(key.proto),
        }
    }
    #[inline(always)]
    fn tag(way: &ConnEntryV4) -> u32 {
        way.tag
    }
    #[inline(always)]
    fn tag_mut(way: &mut ConnEntryV4) -> &mut u32 {
        &mut way.tag
    }
    #[inline(always)]
    fn stage(hash: u32) -> Option<*mut ConnEntryV4> {
        SYN_STAGE_V4.get_ptr_mut(hash >> (32 - SYN_STAGE_BITS))
    }
}

/// Both ports in one word, as [`ConnEntryV4::ports`] holds them.
#[inline(always)]
fn ports(key: &FlowKey) -> u32 {
    key.sport as u32 | (key.dport as u32) << 16
}

impl Bucket for ConnBucket {
    type Way = ConnEntry;
    #[inline(always)]
    fn buckets() -> u32 {
        CT_V6_BUCKETS.load()
    }
    #[inline(always)]
    fn hash(key: &FlowKey) -> u32 {
        hash::flow_key_hash(key, HASH_SEED)
    }
    #[inline(always)]
    fn at(index: u32) -> Option<*mut Self> {
        CONNTRACK.get_ptr_mut(index)
    }
    #[inline(always)]
    fn ways(&self) -> &[ConnEntry; CONNTRACK_WAYS] {
        &self.ways
    }
    #[inline(always)]
    fn ways_mut(&mut self) -> &mut [ConnEntry; CONNTRACK_WAYS] {
        &mut self.ways
    }
    #[inline(always)]
    fn matches(way: &ConnEntry, key: &FlowKey, vip: u32) -> Option<Conn> {
        (same_addr(&way.src, &key.src)
            && way.ports == ports(key)
            && way.vip == vip
            && Conn::tag_proto(way.tag) == key.proto)
            .then(|| Conn::from_tag(way.tag))
    }
    #[inline(always)]
    fn way(key: &FlowKey, vip: u32, conn: Conn) -> ConnEntry {
        ConnEntry { src: key.src, ports: ports(key), tag: conn.tag(key.proto), vip, _pad: 0 }
    }
    #[inline(always)]
    fn tag(way: &ConnEntry) -> u32 {
        way.tag
    }
    #[inline(always)]
    fn tag_mut(way: &mut ConnEntry) -> &mut u32 {
        &mut way.tag
    }
    #[inline(always)]
    fn stage(hash: u32) -> Option<*mut ConnEntry> {
        SYN_STAGE_V6.get_ptr_mut(hash >> (32 - SYN_STAGE_BITS))
    }
}

/// How a packet's flow is looked up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// In this CPU's table (UDP, and TCP segments whose flags could not be read).
    Table,
    /// In this CPU's table, then in the other CPUs' (TCP without SYN, and ICMP errors quoting a
    /// flow): the flow should be known somewhere.
    Established,
    /// As [`Lookup::Established`], for a TCP segment with FIN or RST: the flow's entry is marked
    /// closing ([`CONN_CLOSING`]); a flow found in its handshake slot is forgotten there, not
    /// stored (an aborted handshake never enters the table).
    Closing,
    /// Not at all: a TCP SYN (without FIN or RST) starts a new flow, placed by the ring and
    /// written to its handshake slot, not to the table.
    Syn,
}

/// How many CPUs an established flow is looked for on (CPUs past this are not searched; their
/// flows re-hash onto the ring, which picks the same backend while the pool is unchanged).
const MAX_SEARCH_CPUS: u32 = 256;

/// Other CPUs' buckets each CPU may read per second searching for flows it does not know, and
/// at most at once (the budget's fill). A search reads one bucket per CPU, almost always a cache
/// miss: unbounded, a flood of spoofed ACKs would cost every packet a miss per CPU. A million
/// reads a second is about a tenth of a CPU's time at worst; flows that miss the search are
/// placed by the ring (the same backend while the pool is unchanged) and counted.
const SEARCH_READS_PER_SEC: u64 = 1_000_000;
const SEARCH_READS_BURST: i64 = 65_536;

/// May this CPU search the other CPUs' tables now? Refills this CPU's budget by the time since
/// it was last looked at; true while any is left (a search then spends what it read, `spend`).
#[inline(never)]
fn search_allowed() -> bool {
    let Some(b) = SEARCH_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's element of a per-CPU array, touched by no other CPU, and XDP does not
    // preempt itself on one CPU.
    let b = unsafe { &mut *b };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    crate::budget::refill(b, now, 1_000_000_000 / SEARCH_READS_PER_SEC, SEARCH_READS_BURST)
}

/// Takes `reads` bucket reads of a search from this CPU's budget.
#[inline(always)]
fn spend(reads: u32) {
    if let Some(b) = SEARCH_BUDGET.get_ptr_mut(0) {
        // SAFETY: as in `search_allowed`.
        unsafe { (*b).tokens -= reads as i64 };
    }
}

/// Picks the backend for `key`. With `remember`, a ring placement is stored in the connection
/// table (data packets); without it (ICMP errors) the table is only read. With `search`, a flow
/// missing from this CPU's table is looked for in the other CPUs' (established TCP, ICMP errors)
/// and, when found, copied here.
#[inline(always)]
pub fn pick(key: &FlowKey, meta: &VipMeta, remember: bool, lookup: Lookup) -> Option<Pick> {
    // A VIP without a connection table: the ring alone, nothing read or written. Each data
    // packet is placed as a new flow; an ICMP error about one (`remember` false) starts none.
    let stateless = meta.flags & vip_flags::NO_CONNTRACK != 0;
    let stateless_pick = |hash| {
        let mut pick = ring_pick(key, meta, hash)?;
        pick.new_flow = remember;
        Some(pick)
    };
    match (key.family == AF_INET, stateless) {
        (true, false) => pick_in::<ConnBucketV4>(key, meta, remember, lookup),
        (false, false) => pick_in::<ConnBucket>(key, meta, remember, lookup),
        (true, true) => stateless_pick(ConnBucketV4::hash(key)),
        (false, true) => stateless_pick(ConnBucket::hash(key)),
    }
}

/// The backend of table entry `conn`, if it may still be used for a flow of `meta`: present,
/// same generation, same VIP (an entry read from another CPU's table may be torn by a
/// concurrent write; these checks keep a torn entry from sending a flow anywhere it could not
/// legitimately go).
#[inline(always)]
fn valid(conn: &Conn, meta: &VipMeta) -> Option<Backend> {
    let backend = live_backend(conn.backend)?;
    ((backend.generation ^ conn.generation) & CONN_GENERATION_MASK == 0
        && backend.vip_index == meta.vip_index)
        .then_some(backend)
}

/// State of one search through the other CPUs' tables (the `bpf_loop` callback's context).
struct Search {
    slot: u32,
    me: u32,
    key: FlowKey,
    vip: u32,
    /// The entry found, and whether its client had ended the flow (FIN/RST).
    found: Option<(Conn, bool)>,
    /// Other CPUs' buckets read.
    reads: u32,
}

/// One step of the search: CPU `cpu`'s copy of the bucket. Returns 1 (stop) when the flow is
/// found or there are no more CPUs, 0 to go on. Run through `bpf_loop`, so the verifier checks
/// this body once instead of once per CPU.
extern "C" fn search_step<B: Bucket>(cpu: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Search` on the caller's stack that `search_other_cpus` passed to
    // bpf_loop, alive for the whole loop.
    let s = unsafe { &mut *(ctx as *mut Search) };
    let cpu = cpu as u32;
    if cpu == s.me {
        return 0;
    }
    let Some(other) = B::at(cpu * B::buckets() + s.slot) else {
        return 1; // past the last CPU's region
    };
    s.reads += 1;
    // SAFETY: a bucket in another CPU's region, which that CPU may be writing meanwhile. In
    // Rust's model that makes this shared reference a data race; in BPF each read through it
    // is one load of a word, which that CPU's stores never tear. A way read as it changes gives
    // a flow not found, or an entry of another flow: only a copy is kept, and the caller checks
    // its backend and generation (`valid`) before use, so the worst is one packet placed by a
    // stale but live entry. Volatile copies of the ways would say this in the code, at the
    // price of stack, of which the program has little left under the verifier's 512 bytes.
    match unsafe { &*other }.find(&s.key, s.vip) {
        Some((_, conn, ended)) => {
            s.found = Some((conn, ended));
            1
        }
        None => 0,
    }
}

/// Looks for `key` in bucket `slot` of every other CPU's region: the entry, its backend, and
/// whether its client had ended the flow (the mark is carried with the copy).
#[inline(always)]
fn search_other_cpus<B: Bucket>(
    me: u32,
    slot: u32,
    key: &FlowKey,
    meta: &VipMeta,
) -> Option<(Conn, Backend, bool)> {
    let mut search = Search { slot, me, key: *key, vip: meta.vip_index, found: None, reads: 0 };
    // SAFETY: the callback has bpf_loop's signature and `search` outlives the call.
    unsafe {
        bpf_loop(
            MAX_SEARCH_CPUS,
            search_step::<B> as *mut c_void,
            core::ptr::addr_of_mut!(search).cast(),
            0,
        )
    };
    spend(search.reads);
    let (conn, ended) = search.found?;
    Some((conn, valid(&conn, meta)?, ended))
}

#[inline(always)]
fn pick_in<B: Bucket>(
    key: &FlowKey,
    meta: &VipMeta,
    remember: bool,
    lookup: Lookup,
) -> Option<Pick> {
    let hash = B::hash(key);
    let slot = hash & (B::buckets() - 1);
    // SAFETY: a helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // Without this CPU's region (a table sized for fewer CPUs than the machine has), flows are
    // placed by the ring alone.
    let Some(bucket) = B::at(cpu * B::buckets() + slot) else {
        return ring_pick(key, meta, hash);
    };
    // SAFETY: this CPU's region is written only by this CPU, and XDP does not preempt itself
    // on one CPU, so this is the only reference for this run of the program.
    let bucket = unsafe { &mut *bucket };
    if lookup == Lookup::Syn {
        let pick = ring_pick(key, meta, hash)?;
        if remember {
            stage::<B>(hash, key, meta.vip_index, pick.conn(), false);
        }
        return Some(pick);
    }
    let search = matches!(lookup, Lookup::Established | Lookup::Closing);
    let closing = lookup == Lookup::Closing;
    let found = bucket.find(key, meta.vip_index);
    if let Some((at, conn, ended)) = found {
        if let Some(backend) = valid(&conn, meta) {
            // A flow whose client ended it, and a new handshake of the same 5-tuple (a reused
            // port) in its slot: the new connection goes where its SYN went.
            if ended && let Some((conn, backend, _)) = unstage::<B>(hash, key, meta, remember) {
                if remember {
                    bucket.store(Some(at), key, meta.vip_index, conn, closing);
                }
                return Some(Pick { id: conn.backend, backend, new_flow: false, hash });
            }
            if remember {
                bucket.touch(at, closing);
            }
            return Some(Pick { id: conn.backend, backend, new_flow: false, hash });
        }
    } else {
        // A TCP flow's first packet after its SYN: the flow moves from its handshake slot into
        // the bucket just read.
        let mut known =
            if key.proto == proto::TCP { unstage::<B>(hash, key, meta, remember) } else { None };
        // ... unless that packet ends it (RST or FIN): a handshake aborted, or a port scan (the
        // scanner's SYN, the backend's SYN-ACK, the scanner's kernel's RST). It goes to the
        // handshake's backend, its slot emptied, and the flow never enters the table: spoofed
        // SYN+RST pairs cannot push established flows out.
        if closing && let Some((conn, backend, _)) = known {
            return Some(Pick { id: conn.backend, backend, new_flow: false, hash });
        }
        if known.is_none() && search {
            if search_allowed() {
                known = search_other_cpus::<B>(cpu, slot, key, meta);
                if known.is_some() && remember {
                    count_ct(ct_stats::FOUND_ON_OTHER_CPU);
                }
            } else {
                count_ct(ct_stats::SEARCH_SKIPPED);
            }
        }
        // Known elsewhere (its handshake slot, another CPU's table): it enters this bucket.
        if let Some((conn, backend, ended)) = known {
            if remember {
                bucket.store(None, key, meta.vip_index, conn, closing || ended);
            }
            return Some(Pick { id: conn.backend, backend, new_flow: false, hash });
        }
        if search && remember {
            count_ct(ct_stats::MISSED_ESTABLISHED);
            // A TCP segment without SYN of a flow no table knows: legitimate after an eviction,
            // a restart or a move between CPUs, but also what a flood of spoofed ACKs or RSTs
            // looks like, one packet per made-up flow. It waits in a handshake slot like a SYN,
            // and enters the table at its next packet, so such a flood cannot push established
            // flows out.
            let pick = ring_pick(key, meta, hash)?;
            stage::<B>(hash, key, meta.vip_index, pick.conn(), closing);
            return Some(pick);
        }
    }
    place(bucket, found.map(|(at, ..)| at), key, meta, hash, remember, closing)
}

/// Writes `key -> conn` (a flow of VIP index `vip`; marked closing with `closing`) to this CPU's
/// handshake slot for table hash `hash`, over whatever flow held it.
#[inline(always)]
fn stage<B: Bucket>(hash: u32, key: &FlowKey, vip: u32, conn: Conn, closing: bool) {
    if let Some(slot) = B::stage(hash) {
        // SAFETY: this CPU's element of a per-CPU array, written only on this CPU, and XDP does
        // not preempt itself on one CPU.
        let slot = unsafe { &mut *slot };
        *slot = B::way(key, vip, conn);
        if closing {
            B::mark_closing(slot);
        }
    }
}

/// The backend of `key`'s handshake, if this CPU's handshake slot for `hash` holds it and it may
/// still be used, and whether its client had ended the flow (a FIN or RST staged it); with
/// `remember`, the slot is emptied (the flow moves to the table).
#[inline(always)]
fn unstage<B: Bucket>(
    hash: u32,
    key: &FlowKey,
    meta: &VipMeta,
    remember: bool,
) -> Option<(Conn, Backend, bool)> {
    // SAFETY: as in `stage`.
    let way = unsafe { &mut *B::stage(hash)? };
    let conn = B::matches(way, key, meta.vip_index)?;
    let backend = valid(&conn, meta)?;
    let ended = B::closing(way);
    if remember {
        *way = B::Way::default();
    }
    Some((conn, backend, ended))
}

/// Places a flow by the VIP's ring (by [`flow_hash`]) and, with `remember`, stores it in
/// `bucket` (over way `at` when a stale entry for this flow is there; marked closing with
/// `closing`). `hash` is the flow's table hash, handed on in the [`Pick`].
#[inline(always)]
fn place<B: Bucket>(
    bucket: &mut B,
    at: Option<usize>,
    key: &FlowKey,
    meta: &VipMeta,
    hash: u32,
    remember: bool,
    closing: bool,
) -> Option<Pick> {
    let mut pick = ring_pick(key, meta, hash)?;
    if remember {
        bucket.store(at, key, meta.vip_index, pick.conn(), closing);
    } else {
        // Only read (an ICMP error about the flow): no flow starts here.
        pick.new_flow = false;
    }
    Some(pick)
}

/// The backend `meta`'s ring gives the flow of `key` (by [`flow_hash`]), as a new flow with
/// table hash `hash`; `None` without a ring or when that backend is gone or belongs to another
/// VIP.
///
/// The VIP check is for a packet whose VIP lookup answered just before a reload removed the
/// VIP: its ring still holds the removed VIP's backend ids, which the same reload may already
/// have given to another VIP's backends, present. Without the check such a packet could be
/// sent to that other VIP's backend; with it, it is dropped as having no backend, as it would
/// be a moment later. (One compare, as the table path's [`valid`] makes.)
#[inline(always)]
fn ring_pick(key: &FlowKey, meta: &VipMeta, hash: u32) -> Option<Pick> {
    if meta.ring_size == 0 {
        return None;
    }
    let id = *RINGS.get(meta.ring_base + flow_hash(key, meta) % meta.ring_size)?;
    let backend = live_backend(id)?;
    if backend.vip_index != meta.vip_index {
        return None;
    }
    Some(Pick { id, backend, new_flow: true, hash })
}
