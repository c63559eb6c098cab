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
    T::try_from(map).map_err(|error| DataplaneError::Map { name, error })
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

    /// Every map with the name it is pinned under: what [`super::Dataplane::publish_pins`] pins,
    /// since a program loaded beside a running edgelb pins its fresh maps only once it has taken
    /// over.
    pub fn by_name(&self) -> [(&'static str, &MapData); 13] {
        use aya::maps::IterableMap;
        [
            (names::VIPS, self.vips.map()),
            (names::VIPS_V4, self.vips_v4.map()),
            (names::VIP_EPOCH, self.vip_epoch.map()),
            (names::VIP_ADDRS, self.vip_addrs.map()),
            (names::RINGS, self.rings.map()),
            (names::BACKENDS, self.backends.map()),
            (names::CONNTRACK, self.conntrack.map()),
            (names::CONNTRACK_V4, self.conntrack_v4.map()),
            (names::CONFIG, self.config.map()),
            (names::VIP_STATS, self.vip_stats.map()),
            (names::BACKEND_STATS, self.backend_stats.map()),
            (names::REASONS, self.reasons.map()),
            (names::CT_STATS, self.ct_stats.map()),
        ]
    }

    /// Publishes a VIP entry in the table for its family (one atomic map update), then bumps the
    /// epoch so no CPU keeps answering from a cached lookup.
    pub fn put_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
        if key.family == lb_common::AF_INET {
            self.vips_v4
                .insert(&key.v4(), meta, 0)
                .map_err(|error| DataplaneError::Map { name: names::VIPS_V4, error })?;
        } else {
            self.vips
                .insert(key, meta, 0)
                .map_err(|error| DataplaneError::Map { name: names::VIPS, error })?;
        }
        self.bump_vip_epoch()
    }

    /// Invalidates the per-CPU VIP lookup caches. A CPU that read the old epoch a moment before
    /// may still use an answer from before the change for that one packet, exactly as if it had
    /// looked the table up a moment before the change.
    fn bump_vip_epoch(&mut self) -> Result<(), DataplaneError> {
        let err = |error| DataplaneError::Map { name: names::VIP_EPOCH, error };
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
            Err(error) => Err(DataplaneError::Map { name, error }),
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

/// The batch arm of the kernel's `union bpf_attr` (`BPF_MAP_LOOKUP_BATCH`,
/// `BPF_MAP_UPDATE_BATCH`), which aya does not wrap.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `enum bpf_cmd` values.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// A batch command's failure, as aya reports other system calls'.
fn batch_error(call: &'static str, io_error: std::io::Error) -> MapError {
    MapError::SyscallError(SyscallError { call, io_error })
}

/// Runs one batch command on `map` (`attr.map_fd` is set here); returns how many elements the
/// kernel processed, an error if none.
#[allow(unsafe_code)]
fn batch(
    map: &Array<MapData, u32>,
    cmd: libc::c_long,
    call: &'static str,
    mut attr: BatchAttr,
) -> Result<usize, MapError> {
    use aya::maps::IterableMap;
    use std::os::fd::{AsFd, AsRawFd};
    attr.map_fd = map.map().fd().as_fd().as_raw_fd() as u32;
    // SAFETY: `attr` is an initialised `bpf_attr` prefix of the size passed, with the trailing
    // fields the kernel checks left zero; every pointer in it refers to a buffer the caller
    // keeps alive across the call and sized for `attr.count` elements of the map's key and
    // value sizes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(batch_error(call, std::io::Error::last_os_error()));
    }
    match attr.count {
        0 => Err(batch_error(call, std::io::Error::other("the kernel processed no slot"))),
        n => Ok(n as usize),
    }
}

/// Writes `values[k]` into slot `keys[k]` of a `u32` array map in one system call
/// (`BPF_MAP_UPDATE_BATCH`, Linux 5.6) instead of one per slot: filling a Maglev ring is 65 537
/// writes.
pub fn set_slots(map: &Array<MapData, u32>, keys: &[u32], values: &[u32]) -> Result<(), MapError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            ..Default::default()
        };
        done += batch(map, BPF_MAP_UPDATE_BATCH, "bpf_map_update_batch", attr)?;
    }
    Ok(())
}

/// Reads slots `first..first + count` of a `u32` array map in one system call
/// (`BPF_MAP_LOOKUP_BATCH`) instead of one per slot.
pub fn get_slots(map: &Array<MapData, u32>, first: u32, count: u32) -> Result<Vec<u32>, MapError> {
    let (mut keys, mut values) = (vec![0u32; count as usize], vec![0u32; count as usize]);
    let mut got = 0usize;
    while got < count as usize {
        // The batch starts after the key `in_batch` names (at slot 0 without one).
        let prev = (first + got as u32).checked_sub(1);
        let mut cursor = 0u32;
        let attr = BatchAttr {
            in_batch: prev.as_ref().map_or(0, |p| p as *const u32 as u64),
            out_batch: &mut cursor as *mut u32 as u64,
            keys: keys[got..].as_mut_ptr() as u64,
            values: values[got..].as_mut_ptr() as u64,
            count: count - got as u32,
            ..Default::default()
        };
        got += batch(map, BPF_MAP_LOOKUP_BATCH, "bpf_map_lookup_batch", attr)?;
    }
    // An array map's batches go key by key; anything else would be a misread ring.
    if keys.iter().enumerate().any(|(i, &k)| k != first + i as u32) {
        let io_error = std::io::Error::other("slots came back out of order");
        return Err(batch_error("bpf_map_lookup_batch", io_error));
    }
    Ok(values)
}
