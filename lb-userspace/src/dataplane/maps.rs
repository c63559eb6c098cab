//! Typed handles on the balancer's maps: the only code that touches aya maps.
//!
//! Each map is taken out of the loaded object once and converted to its typed wrapper, so key and
//! value sizes are checked at load time rather than on first use.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    sys::SyscallError,
};
use lb_common::{
    AddrKey, Backend, ConnBucket, ConnBucketV4, Counters, GlobalConfig, VipKey, VipKeyV4, VipMeta,
    ct_stats, maps as names, stats::REASON_COUNT,
};

use super::DataplaneError;

/// The balancer's maps.
pub struct Maps {
    /// IPv6 VIP table.
    pub vips: HashMap<MapData, VipKey, VipMeta>,
    /// IPv4 VIP table (compact keys).
    pub vips_v4: HashMap<MapData, VipKeyV4, VipMeta>,
    /// Epoch of the VIP tables: bumped after every change, invalidating the XDP program's
    /// per-CPU VIP lookup caches.
    pub vip_epoch: Array<MapData, u32>,
    /// VIP address set.
    pub vip_addrs: HashMap<MapData, AddrKey, u32>,
    /// Maglev rings.
    pub rings: Array<MapData, u32>,
    /// Backend table.
    pub backends: Array<MapData, Backend>,
    /// IPv6 connection table (a region of buckets per CPU; written only by the data path, held
    /// here so a wrong layout fails at load).
    pub conntrack: Array<MapData, ConnBucket>,
    /// IPv4 connection table (likewise, compact keys).
    pub conntrack_v4: Array<MapData, ConnBucketV4>,
    /// Global config.
    pub config: Array<MapData, GlobalConfig>,
    /// Per-VIP counters.
    pub vip_stats: PerCpuArray<MapData, Counters>,
    /// Per-backend counters.
    pub backend_stats: PerCpuArray<MapData, Counters>,
    /// Reason counters.
    pub reasons: PerCpuArray<MapData, u64>,
    /// Connection-table events (`lb_common::ct_stats`).
    pub ct_stats: PerCpuArray<MapData, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DataplaneError::Map { name, source })
}

/// Sum over CPUs of each of the first `N` slots of a per-CPU counter array.
fn sum_slots<const N: usize>(map: &PerCpuArray<MapData, u64>) -> Result<[u64; N], MapError> {
    let mut out = [0u64; N];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = map.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}

impl Maps {
    /// Takes every map out of `ebpf`.
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, DataplaneError> {
        Ok(Maps {
            vips: take(ebpf, names::VIPS)?,
            vips_v4: take(ebpf, names::VIPS_V4)?,
            vip_epoch: take(ebpf, names::VIP_EPOCH)?,
            vip_addrs: take(ebpf, names::VIP_ADDRS)?,
            rings: take(ebpf, names::RINGS)?,
            backends: take(ebpf, names::BACKENDS)?,
            conntrack: take(ebpf, names::CONNTRACK)?,
            conntrack_v4: take(ebpf, names::CONNTRACK_V4)?,
            config: take(ebpf, names::CONFIG)?,
            vip_stats: take(ebpf, names::VIP_STATS)?,
            backend_stats: take(ebpf, names::BACKEND_STATS)?,
            reasons: take(ebpf, names::REASONS)?,
            ct_stats: take(ebpf, names::CT_STATS)?,
        })
    }

    /// Publishes a VIP entry in the table for its family (one atomic map update), then bumps the
    /// epoch so no CPU keeps answering from a cached lookup.
    pub fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
        if key.family == lb_common::AF_INET {
            self.vips_v4
                .insert(&key.v4(), meta, 0)
                .map_err(|source| DataplaneError::Map { name: names::VIPS_V4, source })?;
        } else {
            self.vips
                .insert(key, meta, 0)
                .map_err(|source| DataplaneError::Map { name: names::VIPS, source })?;
        }
        self.bump_vip_epoch()
    }

    /// Invalidates the per-CPU VIP lookup caches. A CPU that read the old epoch a moment before
    /// may still use an answer from before the change for that one packet, exactly as if it had
    /// looked the table up a moment before the change.
    fn bump_vip_epoch(&mut self) -> Result<(), DataplaneError> {
        let err = |source| DataplaneError::Map { name: names::VIP_EPOCH, source };
        let epoch = self.vip_epoch.get(&0, 0).map_err(err)?;
        self.vip_epoch.set(0, &epoch.wrapping_add(1), 0).map_err(err)
    }

    /// Removes a VIP entry (absent is fine).
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        let (r, name) = if key.family == lb_common::AF_INET {
            (self.vips_v4.remove(&key.v4()), names::VIPS_V4)
        } else {
            (self.vips.remove(key), names::VIPS)
        };
        match r {
            Ok(()) | Err(MapError::KeyNotFound) => self.bump_vip_epoch(),
            Err(source) => Err(DataplaneError::Map { name, source }),
        }
    }

    /// Sum over CPUs of one per-CPU counter slot.
    pub fn sum_counters(
        map: &PerCpuArray<MapData, Counters>,
        index: u32,
    ) -> Result<Counters, MapError> {
        let per_cpu = map.get(&index, 0)?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        }))
    }

    /// Sum over CPUs of every reason slot.
    pub fn reasons(&self) -> Result<[u64; REASON_COUNT as usize], MapError> {
        sum_slots(&self.reasons)
    }

    /// Sum over CPUs of every connection-table event slot.
    pub fn ct_stats(&self) -> Result<[u64; ct_stats::COUNT as usize], MapError> {
        sum_slots(&self.ct_stats)
    }

    /// Zeroes one per-CPU counter slot (a VIP index or backend id given to someone new).
    pub fn reset_counters(
        map: &mut PerCpuArray<MapData, Counters>,
        index: u32,
    ) -> Result<(), MapError> {
        let syscall = |call, io_error| MapError::SyscallError(SyscallError { call, io_error });
        let cpus = aya::util::nr_cpus().map_err(|(call, e)| syscall(call, e))?.get();
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus as usize])
            .map_err(|e| syscall("nr_cpus", e))?;
        map.set(index, zeros, 0)
    }
}
