//! Types shared by edgelb's XDP programs (`lb-ebpf`) and its controller (`lb-userspace`).
//!
//! Everything here is `#[repr(C)]` and laid out without implicit padding, because the same bytes
//! are written by user space into eBPF maps and read back by the verifier-checked XDP program.
//! The flow hash lives here too: the kernel and the `edgelb route` command must pick the same
//! backend for the same client, so there is exactly one implementation of it.
//!
//! Addresses are stored as four `u32` words holding the address bytes in network order, loaded
//! with the host's native endianness (`u32::from_ne_bytes`). That is what the XDP program gets
//! when it reads the packet header as `u32`, so no byte swapping is ever needed on the fast path.
//! An IPv4 address uses word 0 and leaves words 1..3 zero.
#![no_std]
#![deny(missing_docs)]

pub mod hash;
pub mod stats;

/// Default and largest Maglev ring size: a prime, as Maglev requires, and Katran's default.
pub const DEFAULT_RING_SIZE: u32 = 65_537;
/// Largest ring a VIP may use. Each VIP owns two regions of this many slots in [`maps::RINGS`].
pub const MAX_RING_SIZE: u32 = 65_537;

/// First slot in [`maps::RINGS`] of ring region `region` (0 or 1) of the VIP of index
/// `vip_index` ([`VipMeta::ring_base`] when that region is live): each VIP owns two regions of
/// [`MAX_RING_SIZE`] slots, side by side. One formula for the controller that writes the rings
/// and the one that adopts them after a restart (which reads the live region back from
/// `ring_base`); the `fingerprint` test covers it, since pinned maps carry it over.
pub const fn ring_region_base(vip_index: u32, region: u32) -> u32 {
    (vip_index * 2 + region) * MAX_RING_SIZE
}
/// How many VIPs one balancer serves. Bounds the ring array: `MAX_VIPS * 2 * MAX_RING_SIZE` u32s
/// (16 MiB at 32 VIPs).
pub const MAX_VIPS: u32 = 32;
/// How many backends (over all VIPs) the backend table holds.
pub const MAX_BACKENDS: u32 = 4096;
/// Flows one connection-table bucket holds, kept in least-recently-used order.
pub const CONNTRACK_WAYS: usize = 4;
/// Most IPv4 connection-table buckets per CPU (x [`CONNTRACK_WAYS`] = 131 072 flows per CPU,
/// 2 MiB). Machines with many CPUs get fewer (a power of two), so that the table stays within
/// [`CONNTRACK_BUDGET`]; the count is set when the program is loaded.
pub const CONNTRACK_V4_BUCKETS: u32 = 32_768;
/// Most IPv6 connection-table buckets per CPU (x [`CONNTRACK_WAYS`] = 65 536 flows per CPU,
/// 2 MiB), likewise.
pub const CONNTRACK_V6_BUCKETS: u32 = 16_384;
/// Slots per CPU of the handshake tables (`CT_SYN_V4`, `CT_SYN_V6`), where a TCP SYN's flow waits
/// for its next packet before it enters the connection table: small enough to stay in the CPU's
/// cache (16 / 32 KiB), so a SYN's write does not wait for memory. (4096 slots, 64 KiB, already
/// measured about a cache miss per SYN here.) At 10 000 new connections per second on a CPU a
/// slot lasts about 100 ms, longer than most handshakes take.
pub const SYN_STAGE_SLOTS: u32 = 1 << SYN_STAGE_BITS;
/// A flow's handshake slot is the top this many bits of its table hash (the table's bucket takes
/// the low bits), so that flows sharing a bucket do not share a slot.
pub const SYN_STAGE_BITS: u32 = 10;

/// One CPU's token bucket in the XDP program (lb-ebpf `budget`): its budget of reads of the
/// other CPUs' connection tables, or of frag-needed / packet-too-big answers; refilled by the
/// time since it was last refilled.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SearchBudget {
    /// Reads left (below zero after a search that read more than was left).
    pub tokens: i64,
    /// When it was last refilled (bpf_ktime_get_ns).
    pub last_ns: u64,
}
/// Memory each of the two connection tables may take over all CPUs (bytes).
pub const CONNTRACK_BUDGET: u64 = 128 << 20;

/// Names of the XDP program's load-time constants (read-only globals the loader overrides).
pub mod globals {
    /// `u32`: IPv4 connection-table buckets per CPU (a power of two).
    pub const CT_V4_BUCKETS: &str = "CT_V4_BUCKETS";
    /// `u32`: IPv6 connection-table buckets per CPU (a power of two).
    pub const CT_V6_BUCKETS: &str = "CT_V6_BUCKETS";
}
/// Seed of the flow hash. Fixed so that every node of a fleet behind ECMP picks the same backend
/// for the same client.
pub const HASH_SEED: u32 = 0x6564_6765; // "edge"

/// Address family tags used in keys ([`AF_INET`] and [`AF_INET6`] as on Linux).
pub const AF_INET: u8 = 2;
/// IPv6 address family tag.
pub const AF_INET6: u8 = 10;

/// IP protocol numbers the data path understands.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// IPv4-in-IP encapsulation.
    pub const IPIP: u8 = 4;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6-in-IP encapsulation.
    pub const IPV6: u8 = 41;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Map names, shared so user space never spells one differently from the ELF.
pub mod maps {
    /// `HashMap<VipKey, VipMeta>`: which (address, port, protocol) are IPv6 VIPs.
    pub const VIPS: &str = "VIPS";
    /// `HashMap<VipKeyV4, VipMeta>`: IPv4 VIPs, with a compact key (cheaper to hash per packet).
    pub const VIPS_V4: &str = "VIPS_V4";
    /// `Array<u32>` with one element: bumped by user space after every change to the VIP tables,
    /// which invalidates every CPU's VIP lookup cache.
    pub const VIP_EPOCH: &str = "VIP_EPOCH";
    /// `PerCpuArray<VipCacheEntry>`: per-CPU cache of IPv4 VIP lookups (not pinned: a fresh one
    /// starts empty).
    pub const VIP_CACHE: &str = "VIP_CACHE";
    /// `PerCpuArray<VipCacheEntryV6>`: the same for IPv6 VIP lookups (not pinned either).
    pub const VIP_CACHE_V6: &str = "VIP_CACHE_V6";
    /// `PerCpuArray<u64>`, indexed by [`crate::ct_stats`]: connection-table events.
    pub const CT_STATS: &str = "CT_STATS";
    /// `HashMap<AddrKey, u32>`: every VIP address (any port) -> its [`crate::addr_flags`], for
    /// ICMP and the fragment policy.
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    /// `Array<u32>`: Maglev rings, `ring_base + slot` -> backend id.
    pub const RINGS: &str = "RINGS";
    /// `Array<Backend>`: backend id -> where to send.
    pub const BACKENDS: &str = "BACKENDS";
    /// `Array<ConnBucket>`: established IPv6 flows, a region of set-associative LRU buckets per
    /// CPU (`cpu * CONNTRACK_V6_BUCKETS + bucket`).
    pub const CONNTRACK: &str = "CT_V6";
    /// `Array<ConnBucketV4>`: established IPv4 flows, likewise.
    pub const CONNTRACK_V4: &str = "CT_V4";
    /// `PerCpuArray<ConnEntryV4>`: IPv4 TCP handshakes not yet in the table (not pinned: after a
    /// restart a handshake's next packet is placed by the ring, onto the same backend while the
    /// pool is unchanged).
    pub const SYN_V4: &str = "CT_SYN_V4";
    /// `PerCpuArray<ConnEntry>`: IPv6 TCP handshakes, likewise.
    pub const SYN_V6: &str = "CT_SYN_V6";
    /// `PerCpuArray<SearchBudget>`: each CPU's budget of searches through the other CPUs'
    /// tables (not pinned: a fresh one starts empty and fills at once).
    pub const SEARCH_BUDGET: &str = "SEARCH_BUDGET";
    /// Names the connection tables had before they became per-CPU bucket arrays (pins left by
    /// an older edgelb under these names are removed on load).
    pub const RETIRED: [&str; 2] = ["CONNTRACK", "CONNTRACK_V4"];
    /// `Array<GlobalConfig>` with one element: node-wide settings.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<Counters>`, indexed by VIP index.
    pub const VIP_STATS: &str = "VIP_STATS";
    /// `PerCpuArray<Counters>`, indexed by backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// `PerCpuArray<u64>`, indexed by [`crate::stats::Reason`].
    pub const REASONS: &str = "REASONS";
}

/// Map names of the auxiliary object (`lb-ebpf/src/aux.rs`: the decapsulator, the benchmark's
/// generator and sink), shared so user space never spells one differently from the ELF.
pub mod aux_maps {
    /// `LpmTrie<u32, u8>`: IPv4 outer sources the decapsulator takes tunnels from.
    pub const DECAP_SRC_V4: &str = "DECAP_SRC_V4";
    /// `LpmTrie<[u32; 4], u8>`: IPv6 outer sources, likewise.
    pub const DECAP_SRC_V6: &str = "DECAP_SRC_V6";
    /// `Array<u32>` with one element: non-zero once sources are restricted (without it the
    /// decapsulator takes tunnels from any source).
    pub const DECAP_RESTRICTED: &str = "DECAP_RESTRICTED";
    /// `PerCpuArray<u64>`: slot 0 is the generator's per-CPU frame counter.
    pub const GEN_STATE: &str = "GEN_STATE";
    /// `Array<[u32; GEN_TEMPLATE_LEN / 4]>` with one element: the generator's frame template.
    pub const GEN_TEMPLATE: &str = "GEN_TEMPLATE";
    /// `PerCpuArray<u64>`: slot 0 counts the frames the sink received.
    pub const SINK_COUNT: &str = "SINK_COUNT";
}

/// Bytes of the generator's template written at the start of every generated frame: Ethernet,
/// IPv4, UDP headers and the first bytes of payload.
pub const GEN_TEMPLATE_LEN: usize = 48;

/// The map flag that makes an array memory-mappable (`BPF_F_MMAPABLE`): the connection tables
/// have it, which page-aligns their values and puts every 64-byte bucket on exactly one cache
/// line; user space checks pinned tables for it.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Program names in the ELF objects.
pub mod programs {
    /// The balancer, in `edgelb-xdp`.
    pub const BALANCER: &str = "edgelb_balancer";
    /// Backend-side IPIP/IP6IP6 decapsulator, in `edgelb-aux`.
    pub const DECAP: &str = "edgelb_decap";
    /// Passes everything; a baseline and the veth peer program the testbed needs for XDP_TX.
    pub const PASS: &str = "edgelb_pass";
    /// Swaps MACs and sends back: the trivial XDP_TX baseline for benchmarks.
    pub const TX_SWAP: &str = "edgelb_tx_swap";
    /// Live-frames packet generator for the packet-rate benchmark.
    pub const GEN: &str = "edgelb_gen";
    /// Counting drop program, the packet-rate benchmark's receiver.
    pub const SINK: &str = "edgelb_sink";
}

/// VIP flags ([`VipMeta::flags`]).
pub mod vip_flags {
    /// Hash the whole 5-tuple instead of the client address only.
    pub const HASH_5TUPLE: u32 = 1 << 0;
    /// L7 VIP: pass to the kernel stack, where the proxy terminates it.
    pub const L7: u32 = 1 << 1;
    /// Forward by rewriting the destination MAC (L2 DSR) instead of encapsulating.
    pub const L2_DSR: u32 = 1 << 2;
    /// No connection table: every packet is placed by the ring (`conntrack = false`).
    pub const NO_CONNTRACK: u32 = 1 << 3;
}

/// Values of the VIP address set ([`maps::VIP_ADDRS`]): which kinds of VIP an address has.
///
/// An edgelb from before these flags wrote 1 for every VIP address: that reads as [`L4`], the
/// policy that edgelb applied to every VIP address, so pinned maps it left keep working until
/// the controller rewrites each value with the flags of its config (it compares values, not
/// only addresses).
///
/// [`L4`]: addr_flags::L4
pub mod addr_flags {
    /// A VIP XDP balances (`ipip` or `l2`) has this address: fragments, IPv4 options and IPv6
    /// extension headers towards it are dropped, since balancing them would split flows.
    pub const L4: u32 = 1 << 0;
    /// An L7 VIP has this address. Alone, fragments and the rest pass to the kernel, which
    /// terminates the traffic and reassembles them.
    pub const L7: u32 = 1 << 1;
}

/// Backend flags ([`Backend::flags`]).
pub mod backend_flags {
    /// The backend is in its pool (serving or draining). Cleared when it is removed or dead:
    /// its established flows then re-hash.
    pub const PRESENT: u8 = 1 << 0;
    /// The backend is configured but down (its health check failed): absent for the program,
    /// which looks at PRESENT alone (its flows re-hash, no ring names it), but its entry id,
    /// and with it its counters, stay reserved for it, so that they go on counting when it
    /// comes back instead of starting again from zero at every failure. User space only.
    pub const PARKED: u8 = 1 << 1;
}

/// Key of the VIP table. Port 0 means any port of that address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Address words (see the crate docs).
    pub addr: [u32; 4],
    /// Destination port in network byte order, or 0 for any port.
    pub port: u16,
    /// IP protocol (TCP or UDP).
    pub proto: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
}

/// Compact key of the IPv4 VIP table (8 bytes instead of 20: the kernel hashes it per packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKeyV4 {
    /// Address word.
    pub addr: u32,
    /// Destination port in network byte order, or 0 for any port.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
}

/// One entry of a per-CPU VIP lookup cache (`maps::VIP_CACHE` for IPv4, `maps::VIP_CACHE_V6`
/// for IPv6): the answer the VIP table gave for (address, port, protocol), exact port first and
/// then "any port", while the tables' epoch (`maps::VIP_EPOCH`) was `epoch`. Saves the kernel's
/// jhash and bucket walk (one or two of them) on most packets; an entry is trusted only while
/// the epoch is unchanged, and user space bumps it after every change to the tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipCacheEntryOf<A> {
    /// Destination address word(s).
    pub addr: A,
    /// Destination port (network order).
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`VIP_CACHE_EMPTY`], [`VIP_CACHE_HIT`] (`meta` is the VIP) or [`VIP_CACHE_NONE`] (no VIP).
    pub state: u8,
    /// `VIP_EPOCH` when the answer was looked up.
    pub epoch: u32,
    /// The VIP, when `state` is [`VIP_CACHE_HIT`].
    pub meta: VipMeta,
}

/// An entry of the IPv4 VIP cache.
pub type VipCacheEntry = VipCacheEntryOf<u32>;
/// An entry of the IPv6 VIP cache.
pub type VipCacheEntryV6 = VipCacheEntryOf<[u32; 4]>;

/// [`VipCacheEntry::state`]: nothing cached.
pub const VIP_CACHE_EMPTY: u8 = 0;
/// [`VipCacheEntry::state`]: the destination is a VIP.
pub const VIP_CACHE_HIT: u8 = 1;
/// [`VipCacheEntry::state`]: the destination is no VIP.
pub const VIP_CACHE_NONE: u8 = 2;
/// Entries of the per-CPU VIP lookup cache (direct-mapped by a hash of the destination).
pub const VIP_CACHE_ENTRIES: u32 = 64;

/// The VIP cache slot of an IPv4 destination (one multiply; the cache is direct-mapped).
#[inline(always)]
pub const fn vip_cache_slot(addr: u32, port: u16, proto: u8) -> u32 {
    (addr ^ ((port as u32) << 16) ^ proto as u32).wrapping_mul(0x9e37_79b1) >> 26
}
const _: () = assert!(VIP_CACHE_ENTRIES == 1 << (32 - 26));

/// The VIP cache slot of an IPv6 destination: its words folded, then as IPv4.
#[inline(always)]
pub const fn vip_cache_slot_v6(addr: &[u32; 4], port: u16, proto: u8) -> u32 {
    vip_cache_slot(addr[0] ^ addr[1] ^ addr[2] ^ addr[3], port, proto)
}

impl VipKey {
    /// The compact key of an IPv4 VIP.
    pub const fn v4(&self) -> VipKeyV4 {
        VipKeyV4 { addr: self.addr[0], port: self.port, proto: self.proto, _pad: 0 }
    }
}

/// Compact connection-table key of an IPv4 flow (16 bytes instead of 40).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    /// Client address word.
    pub src: u32,
    /// VIP address word.
    pub dst: u32,
    /// Client port (network order).
    pub sport: u16,
    /// VIP port (network order).
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The compact key of an IPv4 flow.
    pub const fn v4(&self) -> FlowKeyV4 {
        FlowKeyV4 {
            src: self.src[0],
            dst: self.dst[0],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Key of the VIP address set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// Address words.
    pub addr: [u32; 4],
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

/// What the data path needs to know about one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// [`vip_flags`] bits.
    pub flags: u32,
    /// Index into the per-VIP counters (0..[`MAX_VIPS`]).
    pub vip_index: u32,
    /// First slot of this VIP's current ring in [`maps::RINGS`]. User space flips it between two
    /// regions, so a packet always sees a complete ring.
    pub ring_base: u32,
    /// Ring size M (prime, at most [`MAX_RING_SIZE`]); 0 means the VIP has no backend.
    pub ring_size: u32,
}

/// One backend: where encapsulated (or MAC-rewritten) packets go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Address words of the backend's real address.
    pub addr: [u32; 4],
    /// Bumped every time the id is given to a different backend, so a stale connection-table
    /// entry never follows an id to a stranger.
    pub generation: u32,
    /// Next-hop MAC for this backend: the backend's own MAC on the same segment, or the gateway.
    pub mac: [u8; 6],
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// [`backend_flags`] bits.
    pub flags: u8,
    /// Index of the VIP this backend entry belongs to (each VIP has its own entries, so health
    /// and drain are per VIP). The data path checks it against the VIP of a connection-table
    /// entry (an entry left by another VIP whose backend id was reused is not followed) and of
    /// the ring that named it (a packet that read a removed VIP's entry just before a reload may
    /// read its ring, whose ids that reload can already have given to another VIP's backends),
    /// and a restarted controller adopts the pinned maps by it.
    pub vip_index: u32,
}

/// Connection-table key: one direction of one flow, as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address words.
    pub src: [u32; 4],
    /// VIP address words.
    pub dst: [u32; 4],
    /// Client port (network order); 0 for ICMP.
    pub sport: u16,
    /// VIP port (network order).
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

/// Connection-table value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// Backend id the flow is pinned to.
    pub backend: u32,
    /// [`Backend::generation`] when the flow was pinned.
    pub generation: u32,
}

/// Slots of `maps::CT_STATS`: what happens in the connection table, for operators to size it
/// and to see flows moving between CPUs.
pub mod ct_stats {
    /// A flow entering the table (a TCP flow at its first packet after the SYN, any other at
    /// its first packet) pushed the least recently used flow of its bucket out.
    pub const EVICTED: u32 = 0;
    /// An established TCP flow this CPU did not know was found in another CPU's table.
    pub const FOUND_ON_OTHER_CPU: u32 = 1;
    /// A TCP segment without SYN whose flow no CPU's table held: a flow pushed out before it
    /// ended (the table is small for the traffic), one older than the table, or a handshake
    /// whose slot another SYN took first (a heavy SYN rate). It is placed again by the ring.
    pub const MISSED_ESTABLISHED: u32 = 2;
    /// A TCP segment without SYN (or an ICMP error) whose flow this CPU did not know was not
    /// looked for on the other CPUs: this CPU's search budget was spent (a flood of segments of
    /// unknown flows, or very many flows moved between CPUs at once). It is placed by the ring.
    pub const SEARCH_SKIPPED: u32 = 3;
    /// Number of slots.
    pub const COUNT: u32 = 4;
    /// Slot names, for metrics.
    pub const NAMES: [&str; COUNT as usize] =
        ["evicted", "found_on_other_cpu", "missed_established", "search_skipped"];
}

/// Bits of [`Backend::generation`] a connection-table entry keeps. A stale entry could only be
/// mistaken for current after its backend id was handed out again 4096 times, and then only to
/// another backend of the same VIP (entries are also checked against the VIP), which is where a
/// re-hash would send the flow anyway: its own backend is gone.
pub const CONN_GENERATION_BITS: u32 = 12;
/// Mask of [`CONN_GENERATION_BITS`].
pub const CONN_GENERATION_MASK: u32 = (1 << CONN_GENERATION_BITS) - 1;
const _: () = assert!(MAX_BACKENDS <= 1 << 12, "backend ids must fit a connection tag");

impl Conn {
    /// The tag word a connection-table entry (IPv4 or IPv6) keeps for this backend and a flow of
    /// `proto`: backend id (bits 0..12) | low bits of its generation (12..24) | protocol (24..32).
    pub const fn tag(&self, proto: u8) -> u32 {
        (proto as u32) << 24
            | (self.generation & CONN_GENERATION_MASK) << 12
            | (self.backend & 0xfff)
    }

    /// The backend a tag names.
    pub const fn from_tag(tag: u32) -> Conn {
        Conn { backend: tag & 0xfff, generation: (tag >> 12) & CONN_GENERATION_MASK }
    }

    /// The IP protocol of the flow a tag belongs to.
    pub const fn tag_proto(tag: u32) -> u8 {
        ((tag & !CONN_CLOSING) >> 24) as u8
    }
}

/// Tag bit (the top bit of the protocol byte: no tracked protocol reaches 128) marking a TCP flow
/// whose client sent FIN or RST. Its 5-tuple may come back as a new connection (a client reusing
/// its port), whose SYN the ring places: while the bit is set, a packet that hits the entry also
/// looks in its handshake slot, and follows the new handshake if that holds the same 5-tuple.
pub const CONN_CLOSING: u32 = 1 << 31;

/// One IPv4 connection-table entry: a flow and where it goes, packed into 16 bytes so that a
/// bucket of [`CONNTRACK_WAYS`] is exactly one cache line. An all-zero entry is an empty way (no
/// real flow has protocol 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntryV4 {
    /// Client address word.
    pub src: u32,
    /// VIP address word.
    pub dst: u32,
    /// Client port | VIP port << 16 (each as read from the packet, network order).
    pub ports: u32,
    /// The backend and protocol ([`Conn::tag`]).
    pub tag: u32,
}

/// One bucket of the IPv4 connection table: [`CONNTRACK_WAYS`] flows, most recently used
/// first, in one cache line (the map is created mmapable, which page-aligns its values). A new
/// flow goes to the front and pushes the least recently used one out.
///
/// Why not the kernel's LRU hash: it hashes the key with jhash on every lookup and again on
/// insert, and an insert takes a bucket lock and a node off the LRU lists. This table is indexed
/// by the flow hash the program computes anyway, is per CPU (no locks, no atomics), and a miss
/// plus insert touches one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnBucketV4 {
    /// The ways, most recently used first.
    pub ways: [ConnEntryV4; CONNTRACK_WAYS],
}

/// One connection-table entry for an IPv6 flow, packed into 32 bytes so that a bucket of
/// [`CONNTRACK_WAYS`] is two cache lines rather than three. The VIP is named by its index rather
/// than its 16-byte address: the VIP lookup, which comes first, has already turned destination
/// address, port and protocol into that index, so (client address, ports, VIP, protocol) is the
/// same flow as the 5-tuple. An all-zero entry is an empty way (no real flow has protocol 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    /// Client address words.
    pub src: [u32; 4],
    /// Client port | VIP port << 16 (each as read from the packet, network order).
    pub ports: u32,
    /// The backend and protocol ([`Conn::tag`]).
    pub tag: u32,
    /// The VIP's index ([`VipMeta::vip_index`]).
    pub vip: u32,
    /// Zero.
    pub _pad: u32,
}

/// One bucket of the IPv6 connection table (see [`ConnBucketV4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnBucket {
    /// The ways, most recently used first.
    pub ways: [ConnEntry; CONNTRACK_WAYS],
}

/// The meaning of what the pinned maps hold, as this build reads and writes it. A restart or an
/// upgrade adopts pinned maps only when their sizes match this build's *and* they were written
/// under this version: bump it whenever a map's contents change meaning without changing size
/// (a bucket hash, how a tag packs, what a flag bit says), or the new program would misread the
/// old entries (the `fingerprint` test below fails until it is bumped for what it covers).
pub const MAPS_VERSION: u32 = 1;

/// Node-wide settings, element 0 of [`maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Outer source prefix for IPv4 encapsulation; the low [`GlobalConfig::src_v4_host_bits`]
    /// bits are filled from the flow hash so backends' RSS spreads the load.
    pub src_v4: u32,
    /// Outer source prefix for IPv6 encapsulation; the last word is filled from the flow hash.
    pub src_v6: [u32; 4],
    /// How many low bits of `src_v4` vary per flow (0..=16).
    pub src_v4_host_bits: u32,
    /// Largest IP packet the egress link carries; encapsulated packets larger than this are
    /// answered with ICMP frag-needed / packet-too-big. 0 checks no link's MTU but stands for
    /// 65 535: a packet larger once encapsulated cannot be sent (its outer IPv4 length would wrap).
    pub mtu: u32,
    /// Source MAC for frames we send (the balancer's interface); all zero keeps the frame's
    /// destination MAC as the new source.
    pub src_mac: [u8; 6],
    /// Zero.
    pub _pad: [u8; 2],
    /// [`MAPS_VERSION`] of the edgelb that wrote the maps (the program never reads it): what a
    /// later edgelb checks before it adopts them.
    pub maps_version: u32,
}

/// Per-VIP and per-backend counters (one per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (as received, before encapsulation).
    pub bytes: u64,
    /// Forwarded packets the Maglev ring placed: every TCP SYN (retransmits and floods
    /// included), every packet whose flow neither the connection table nor (TCP) a handshake
    /// slot held (a UDP flow's first datagram, a flow re-placed after an eviction, a restart or
    /// a move between CPUs), and every packet of a VIP without a connection table. Ring
    /// placements, not connections.
    pub new_flows: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields, so any bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnBucketV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GlobalConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod layout {
    use super::*;
    use core::mem::size_of;

    // The eBPF side relies on these sizes having no implicit padding.
    #[test]
    fn sizes_have_no_hidden_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<VipMeta>(), 16);
        assert_eq!(size_of::<Backend>(), 32);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<VipKeyV4>(), 8);
        assert_eq!(size_of::<FlowKeyV4>(), 16);
        assert_eq!(size_of::<Conn>(), 8);
        assert_eq!(size_of::<ConnBucketV4>(), 64);
        assert_eq!(size_of::<ConnBucket>(), 128);
        assert_eq!(size_of::<GlobalConfig>(), 40);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<VipCacheEntry>(), 28);
        assert_eq!(size_of::<VipCacheEntryV6>(), 40);
    }

    /// What the pinned maps' contents mean beyond their sizes: the connection-table bucket
    /// hashes, the tag packing, where a VIP's ring regions lie and the flag bits of the VIP,
    /// backend and address entries. A change here without a bump of [`MAPS_VERSION`] would let a
    /// restart adopt entries the new program misreads (flows in buckets it never looks in): when
    /// this fails, bump MAPS_VERSION and write the new values here.
    #[test]
    fn fingerprint() {
        let v4 = FlowKeyV4 {
            src: 0x0a00_0001,
            dst: 0xc612_0101,
            sport: 40000,
            dport: 80,
            proto: 6,
            _pad: [0; 3],
        };
        let v6 = FlowKey {
            src: [0x2001_0db8, 0, 0, 7],
            dst: [0x2001_0db8, 0, 1, 1],
            sport: 40000,
            dport: 443,
            proto: 17,
            family: AF_INET6,
            _pad: [0; 2],
        };
        // Each flag bit at its place: bit i of the word set for the i-th flag listed.
        let bits = |flags: &[u32]| -> u32 {
            flags.iter().enumerate().map(|(i, &f)| f.wrapping_mul(i as u32 + 1)).sum()
        };
        let got = (
            crate::hash::flow_key_v4_hash(&v4, 7),
            crate::hash::flow_key_hash(&v6, 7),
            Conn { backend: 5, generation: 9 }.tag(6),
            ring_region_base(5, 1),
            bits(&[
                vip_flags::HASH_5TUPLE,
                vip_flags::L7,
                vip_flags::L2_DSR,
                vip_flags::NO_CONNTRACK,
                backend_flags::PRESENT as u32,
                backend_flags::PARKED as u32,
                addr_flags::L4,
                addr_flags::L7,
                CONN_CLOSING,
            ]),
        );
        // One line per version, kept: a new meaning gets a new version and a new line.
        type Fingerprint = (u32, u32, u32, u32, u32);
        const RECORDED: &[(u32, Fingerprint)] =
            &[(1, (740_936_812, 2_388_707_097, 100_700_165, 720_907, 2_147_483_737))];
        let (latest, want) = RECORDED[RECORDED.len() - 1];
        assert!(
            latest == MAPS_VERSION && got == want,
            "the maps' meaning changed ({got:?}, recorded {want:?} for version {latest}): bump MAPS_VERSION to {} and add a line ({}, {got:?}) to RECORDED",
            MAPS_VERSION.max(latest) + 1,
            MAPS_VERSION.max(latest) + 1
        );
    }
}
