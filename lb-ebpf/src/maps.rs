//! The balancer's maps. User space (lb-userspace `dataplane::maps`) fills all but the connection
//! tables, the VIP cache and the counters; names and layouts come from lb-common.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, CONNTRACK_V4_BUCKETS, CONNTRACK_V6_BUCKETS, ConnBucket, ConnBucketV4,
    ConnEntry, ConnEntryV4, Counters, GlobalConfig, MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS,
    SYN_STAGE_SLOTS, SearchBudget, VIP_CACHE_ENTRIES, VipCacheEntry, VipCacheEntryV6, VipKey,
    VipKeyV4, VipMeta, ct_stats, stats::REASON_COUNT,
};

// Mmapable arrays have page-aligned values, which puts every 64-byte connection-table bucket on
// exactly one cache line (a plain array's values start at an offset of its header).
use lb_common::BPF_F_MMAPABLE;

/// IPv6 (address, port, protocol) -> VIP metadata. Port 0 entries match any port.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS * 4, 0);

/// IPv4 VIPs, with the compact key.
#[map]
pub static VIPS_V4: HashMap<VipKeyV4, VipMeta> = HashMap::with_max_entries(MAX_VIPS * 4, 0);

/// Epoch of the VIP tables (one element), bumped by user space after every change.
#[map]
pub static VIP_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU cache of IPv4 VIP lookups, checked against VIP_EPOCH.
#[map]
pub static VIP_CACHE: PerCpuArray<VipCacheEntry> =
    PerCpuArray::with_max_entries(VIP_CACHE_ENTRIES, 0);

/// Per-CPU cache of IPv6 VIP lookups, likewise.
#[map]
pub static VIP_CACHE_V6: PerCpuArray<VipCacheEntryV6> =
    PerCpuArray::with_max_entries(VIP_CACHE_ENTRIES, 0);

/// Every VIP address, for ICMP echo, ICMP errors and the fragment/options policy.
#[map]
pub static VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_VIPS * 4, 0);

/// Maglev rings: two regions of MAX_RING_SIZE slots per VIP; each slot holds a backend id.
#[map]
pub static RINGS: Array<u32> = Array::with_max_entries(MAX_VIPS * 2 * MAX_RING_SIZE, 0);

/// Backend id -> backend.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// IPv4 connection-table buckets per CPU, set by the loader (lb_common::globals).
#[unsafe(no_mangle)]
pub static CT_V4_BUCKETS: Global<u32> = Global::new(CONNTRACK_V4_BUCKETS);

/// IPv6 connection-table buckets per CPU, set by the loader.
#[unsafe(no_mangle)]
pub static CT_V6_BUCKETS: Global<u32> = Global::new(CONNTRACK_V6_BUCKETS);

/// Established IPv6 flows -> their backend: a region of set-associative LRU buckets per CPU,
/// indexed by the flow's hash (see `conntrack`). User space sets the size to CPUs x buckets at
/// load time; the size here (one region) is only the object's default.
#[map(name = "CT_V6")]
pub static CONNTRACK: Array<ConnBucket> =
    Array::with_max_entries(CONNTRACK_V6_BUCKETS, BPF_F_MMAPABLE);

/// Established IPv4 flows -> their backend, likewise with the compact key.
#[map(name = "CT_V4")]
pub static CONNTRACK_V4: Array<ConnBucketV4> =
    Array::with_max_entries(CONNTRACK_V4_BUCKETS, BPF_F_MMAPABLE);

/// TCP handshakes of IPv4 flows not yet in CT_V4: a small direct-mapped table per CPU, indexed
/// by the flow hash (see `conntrack`).
#[map(name = "CT_SYN_V4")]
pub static SYN_STAGE_V4: PerCpuArray<ConnEntryV4> =
    PerCpuArray::with_max_entries(SYN_STAGE_SLOTS, 0);

/// TCP handshakes of IPv6 flows not yet in CT_V6, likewise.
#[map(name = "CT_SYN_V6")]
pub static SYN_STAGE_V6: PerCpuArray<ConnEntry> = PerCpuArray::with_max_entries(SYN_STAGE_SLOTS, 0);

/// Each CPU's budget of searches through the other CPUs' tables (see `conntrack`).
#[map]
pub static SEARCH_BUDGET: PerCpuArray<SearchBudget> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's budget of frag-needed / packet-too-big answers (see `icmp`).
#[map]
pub static TOO_BIG_BUDGET: PerCpuArray<SearchBudget> = PerCpuArray::with_max_entries(1, 0);

/// Node-wide settings (one element).
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// Per-VIP counters, by VIP index.
#[map]
pub static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-backend counters, by backend id.
#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Connection-table events (lb_common::ct_stats).
#[map]
pub static CT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ct_stats::COUNT, 0);

/// Pass/drop/tx reasons (lb_common::stats::Reason).
#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);
