//! Carrying the connection tables over into tables of another size: a start whose
//! `node.conntrack_flows_per_cpu` changed (a restart or a `run --takeover`) adopts every other
//! map as usual and fills its new, empty `CT_V4` / `CT_V6` from the pinned old ones, so that
//! established flows keep their backends where the ring would now place them elsewhere.
//!
//! Kept apart from the loading in `mod.rs`: the re-placement ([`rehash_region`]) is pure, tested
//! without a kernel, and the only kernel work is reading the old tables and writing the new ones
//! through memory maps (both tables are `BPF_F_MMAPABLE` arrays), which copies the largest
//! tables in a fraction of a second where one `lookup` system call per bucket would take
//! seconds.
//!
//! Each CPU's region is copied into the same CPU's region of the new table (XDP writes a region
//! only from its own CPU). An entry's bucket is recomputed from its 5-tuple with the hash the
//! program uses (`lb_common::hash`): an IPv4 entry holds its whole 5-tuple; an IPv6 entry names
//! its VIP by index, whose address the adopted VIP table gives. Within a new bucket the old most
//! recently used order is kept as far as it goes: a bucket of a larger table takes its ways from
//! one old bucket, in their order; a bucket of a smaller table takes them from several, their
//! most recently used ways first, and what does not fit is dropped (counted). As the program's
//! eviction does, flows their client ended (FIN or RST seen) give way to live ones in the older
//! half of a new bucket: they are placed after them, and dropped first ([`rehash_region`]).
//!
//! The old program keeps forwarding with the old tables while they are read (a start replaces
//! it only once its own program is attached): an entry it writes after its bucket was read is
//! not carried over, and that flow's next packet is placed as after any restart (its handshake
//! slot, another CPU's table, else the ring). A bucket read while the old program wrote it could
//! hold a torn way (a way is four 32-bit stores) or one flow twice (mid-promotion): each
//! region is read twice, and a bucket read differently is read again until two reads agree
//! (else its flows are left behind, [`settle`]); a flow held twice is carried once
//! ([`rehash_region`]). Two equal reads rule out a write under way unless one stalled
//! mid-way across both reads; the hash check (a way whose recomputed bucket is not the one it
//! was read from is left behind) catches only some tears, and the program checks every
//! entry's backend, generation and VIP before following it.

use std::{
    collections::HashMap,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    ptr::NonNull,
    time::{Duration, Instant},
};

use lb_common::{
    AF_INET6, CONN_CLOSING, CONNTRACK_WAYS, Conn, ConnBucket, ConnBucketV4, ConnEntry, ConnEntryV4,
    FlowKey, FlowKeyV4, HASH_SEED, hash,
};

use super::DataplaneError;

/// A connection-table bucket, as the copy sees it: [`CONNTRACK_WAYS`] ways, most recently used
/// first, an empty way all zero (tag 0).
pub(super) trait Bucket: aya::Pod + Default + PartialEq {
    /// One way.
    type Way: Copy;
    /// The ways, most recently used first.
    fn ways(&self) -> &[Self::Way; CONNTRACK_WAYS];
    /// The ways, to fill.
    fn ways_mut(&mut self) -> &mut [Self::Way; CONNTRACK_WAYS];
    /// Does `way` hold a flow? An empty way is all zero, its tag too (no flow has protocol 0).
    fn occupied(way: &Self::Way) -> bool {
        Self::tag(way) != 0
    }
    /// The tag word of `way` ([`Conn::tag`]).
    fn tag(way: &Self::Way) -> u32;
    /// Do `a` and `b` hold the same flow (5-tuple; their backends and closing marks aside)?
    fn same_flow(a: &Self::Way, b: &Self::Way) -> bool;
    /// Has the client of `way`'s flow ended it (FIN or RST seen, [`CONN_CLOSING`])?
    fn closing(way: &Self::Way) -> bool {
        Self::tag(way) & CONN_CLOSING != 0
    }
}

impl Bucket for ConnBucketV4 {
    type Way = ConnEntryV4;
    fn ways(&self) -> &[ConnEntryV4; CONNTRACK_WAYS] {
        &self.ways
    }
    fn ways_mut(&mut self) -> &mut [ConnEntryV4; CONNTRACK_WAYS] {
        &mut self.ways
    }
    fn tag(way: &ConnEntryV4) -> u32 {
        way.tag
    }
    fn same_flow(a: &ConnEntryV4, b: &ConnEntryV4) -> bool {
        (a.src, a.dst, a.ports, Conn::tag_proto(a.tag))
            == (b.src, b.dst, b.ports, Conn::tag_proto(b.tag))
    }
}

impl Bucket for ConnBucket {
    type Way = ConnEntry;
    fn ways(&self) -> &[ConnEntry; CONNTRACK_WAYS] {
        &self.ways
    }
    fn ways_mut(&mut self) -> &mut [ConnEntry; CONNTRACK_WAYS] {
        &mut self.ways
    }
    fn tag(way: &ConnEntry) -> u32 {
        way.tag
    }
    fn same_flow(a: &ConnEntry, b: &ConnEntry) -> bool {
        (a.src, a.vip, a.ports, Conn::tag_proto(a.tag))
            == (b.src, b.vip, b.ports, Conn::tag_proto(b.tag))
    }
}

/// What a copy did with the flows it found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResizeTally {
    /// Entries written into the new table: flows, but for one a connection table holds in two
    /// CPUs' regions (its packets came in on both), which counts twice.
    pub carried: u64,
    /// Entries dropped because their new bucket was full (a smaller table): the last of those
    /// that met there in [`rehash_region`]'s order (ended flows past the two most recent, then
    /// the least recently used).
    pub dropped: u64,
    /// Entries left behind: an IPv6 flow of a VIP index no VIP holds any more, or an entry the
    /// running program was writing as it was read (a bucket whose reads never agreed, an entry
    /// not in the bucket its hash names, a flow a bucket held twice).
    pub left: u64,
}

impl std::ops::AddAssign for ResizeTally {
    fn add_assign(&mut self, o: ResizeTally) {
        self.carried += o.carried;
        self.dropped += o.dropped;
        self.left += o.left;
    }
}

/// Re-places the flows of one CPU's region `old` into `new`, an empty region of another number
/// of buckets (both powers of two), by the bucket `hash` gives each way (`None`: none can be
/// computed, the way is left behind). A way whose hash names another old bucket than the one it
/// is in is left behind too, and so is a way whose flow a more recent way of its bucket holds
/// already (a bucket read while the program promoted a way, which copies way 0 into way 1
/// before it writes way 0, holds one flow twice): two ways of one flow share their hash, so
/// both would meet in the same new bucket, which keeps one.
///
/// Each new bucket's candidates are ranked as the program's eviction (`victim()` in
/// `lb-ebpf/src/conntrack.rs`) would rank them. Old buckets are taken in groups that share their
/// low bucket bits, and each group's ways by rank (every old bucket's most recent way, then
/// every second most recent...): a new bucket several old ones meet in (a smaller table) sees
/// their most recent flows first, one fed by a single old bucket (a larger table) its order.
/// The first [`CONNTRACK_WAYS`]` / 2` candidates of a new bucket take its newer half whatever
/// their mark: `victim()` never gives up one of the two most recent ways before the least
/// recent (an ended flow there may be a half-closed download whose ACKs still come). The
/// others fill the older half live flows first, then those their client ended
/// ([`CONN_CLOSING`]), each in their order: `victim()` gives up an ended flow of the older half
/// (way 3, else way 2) before a live one, so ended flows sit last, where the program would
/// evict them first, and are the first dropped when the new bucket is full.
pub(super) fn rehash_region<B: Bucket>(
    old: &[B],
    new: &mut [B],
    hash: impl Fn(&B::Way) -> Option<u32>,
) -> ResizeTally {
    let (from, to) = (old.len(), new.len());
    assert!(from.is_power_of_two() && to.is_power_of_two(), "bucket counts are powers of two");
    let group = from.min(to);
    let mut tally = ResizeTally::default();
    // Candidates of the group that fall past their new bucket's newer half, in rank order,
    // with their new bucket.
    let mut older: Vec<(usize, B::Way)> = Vec::new();
    // Into the first free way of `bucket`, else dropped.
    let place = |bucket: &mut B, way: B::Way, tally: &mut ResizeTally| {
        let free = bucket.ways().iter().position(|w| !B::occupied(w));
        if let Some(free) = free {
            bucket.ways_mut()[free] = way;
            tally.carried += 1;
        } else {
            tally.dropped += 1;
        }
    };
    for first in 0..group {
        older.clear();
        for rank in 0..CONNTRACK_WAYS {
            for at in (first..from).step_by(group) {
                let ways = old[at].ways();
                let way = ways[rank];
                if !B::occupied(&way) {
                    continue;
                }
                let twice = ways[..rank].iter().any(|w| B::occupied(w) && B::same_flow(w, &way));
                let Some(h) = hash(&way).filter(|&h| !twice && h as usize & (from - 1) == at)
                else {
                    tally.left += 1;
                    continue;
                };
                let to_bucket = h as usize & (to - 1);
                // Newer-half ways are placed as they come (none of their bucket waits yet: it
                // waits only once the newer half is taken); the rest wait until the group is
                // read, so that live ones are placed first.
                let taken = new[to_bucket].ways().iter().filter(|w| B::occupied(w)).count();
                if taken < CONNTRACK_WAYS / 2 {
                    place(&mut new[to_bucket], way, &mut tally);
                } else {
                    older.push((to_bucket, way));
                }
            }
        }
        for ended in [false, true] {
            for &(to_bucket, way) in older.iter().filter(|(_, w)| B::closing(w) == ended) {
                place(&mut new[to_bucket], way, &mut tally);
            }
        }
    }
    tally
}

/// The table hash of an IPv4 entry: its whole 5-tuple is in it.
pub(super) fn v4_hash(way: &ConnEntryV4) -> Option<u32> {
    let key = FlowKeyV4 {
        src: way.src,
        dst: way.dst,
        sport: way.ports as u16,
        dport: (way.ports >> 16) as u16,
        proto: Conn::tag_proto(way.tag),
        _pad: [0; 3],
    };
    Some(hash::flow_key_v4_hash(&key, HASH_SEED))
}

/// The table hash of an IPv6 entry, whose VIP address (the packet's destination, hashed by the
/// program) `vips` gives by the VIP index the entry holds; `None` for an index no VIP has.
pub(super) fn v6_hash(vips: &HashMap<u32, [u32; 4]>, way: &ConnEntry) -> Option<u32> {
    let key = FlowKey {
        src: way.src,
        dst: *vips.get(&way.vip)?,
        sport: way.ports as u16,
        dport: (way.ports >> 16) as u16,
        proto: Conn::tag_proto(way.tag),
        family: AF_INET6,
        _pad: [0; 2],
    };
    Some(hash::flow_key_hash(&key, HASH_SEED))
}

/// An array map's values, memory-mapped (`BPF_F_MMAPABLE`: the values start at offset 0, each
/// `size_of::<T>()` bytes, a multiple of 8 as the kernel lays them out). Unmapped on drop.
struct Mapped<T> {
    ptr: NonNull<T>,
    entries: usize,
    bytes: usize,
    /// Mapped writable ([`Mapped::write`] may be called)?
    writable: bool,
}

/// `aya::Pod`: plain data, for which any bytes (those another CPU's program left half
/// written, too) are a value.
impl<T: aya::Pod> Mapped<T> {
    /// Maps the `entries` values of the array map `fd`, read-only or writable.
    #[allow(unsafe_code)]
    fn map(fd: BorrowedFd<'_>, entries: u32, writable: bool) -> std::io::Result<Mapped<T>> {
        use std::os::fd::AsRawFd;
        assert!(size_of::<T>().is_multiple_of(8), "array values are laid out 8-byte aligned");
        let entries = entries as usize;
        let bytes = entries * size_of::<T>();
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a new shared mapping of `bytes` of the map behind `fd` (which the kernel
        // checks against the map's size), at an address the kernel picks: nothing else in this
        // process is affected.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap gave 0"))?;
        Ok(Mapped { ptr, entries, bytes, writable })
    }

    /// Copies values `first..first + out.len()` into `out`. Volatile reads: the running program
    /// may be writing them.
    #[allow(unsafe_code)]
    fn read(&self, first: usize, out: &mut [T]) {
        assert!(first + out.len() <= self.entries, "within the map");
        for (i, v) in out.iter_mut().enumerate() {
            // SAFETY: in bounds of the live mapping (checked above), page-aligned at its start
            // and `T`-sized steps after; `T` is `Pod` (any bytes are a value).
            *v = unsafe { self.ptr.as_ptr().add(first + i).read_volatile() };
        }
    }

    /// Writes `from` into values `first..first + from.len()` (of a map opened writable).
    #[allow(unsafe_code)]
    fn write(&mut self, first: usize, from: &[T]) {
        assert!(self.writable, "a mapping written to is mapped writable");
        assert!(first + from.len() <= self.entries, "within the map");
        // SAFETY: in bounds of the live, writable mapping (checked above); no program runs
        // with this map yet, and nothing in this process holds a reference into it.
        unsafe {
            std::ptr::copy_nonoverlapping(from.as_ptr(), self.ptr.as_ptr().add(first), from.len())
        };
    }
}

impl<T> Drop for Mapped<T> {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Copies the pinned table at `old_pin` (`old_entries` buckets, a region per CPU of `cpus`)
/// into the new, empty table `new` (`new_buckets` per CPU), region by region. Returns what
/// became of the entries, and how many buckets [`settle`] read again (the running program
/// changed them between the two reads of their region).
pub(super) fn carry_table<B: Bucket>(
    old_pin: &Path,
    old_entries: u32,
    new: BorrowedFd<'_>,
    cpus: u32,
    new_buckets: u32,
    hash: impl Fn(&B::Way) -> Option<u32>,
) -> Result<(ResizeTally, u64), DataplaneError> {
    let failed = |error| DataplaneError::TableCopy { path: old_pin.to_owned(), error };
    let old_map = aya::maps::MapData::from_pin(old_pin)
        .map_err(|error| DataplaneError::PinUnreadable { path: old_pin.to_owned(), error })?;
    let old = Mapped::<B>::map(old_map.fd().as_fd(), old_entries, false).map_err(failed)?;
    let mut into = Mapped::<B>::map(new, cpus * new_buckets, true).map_err(failed)?;
    let (from, to) = ((old_entries / cpus) as usize, new_buckets as usize);
    let (mut region, mut again) = (vec![B::default(); from], vec![B::default(); from]);
    let mut placed = vec![B::default(); to];
    let (mut tally, mut reread) = (ResizeTally::default(), 0);
    for cpu in 0..cpus as usize {
        old.read(cpu * from, &mut region);
        old.read(cpu * from, &mut again);
        let (left, read_again) = settle(&old, cpu * from, &mut region, &again);
        tally.left += left;
        reread += read_again;
        placed.fill(B::default());
        tally += rehash_region(&region, &mut placed, &hash);
        into.write(cpu * to, &placed);
    }
    Ok((tally, reread))
}

/// Reads of one bucket [`settle`] makes at most before it gives the bucket up.
const BUCKET_READS: usize = 4;

/// Keeps, of the buckets of `region` (read from `old` at `first`), only what the running
/// program was not writing as they were read: a bucket read the same in `again` (read after
/// it) stands; one read differently is read again until two reads in a row agree, at most
/// [`BUCKET_READS`] reads in all, and a bucket that never settles is emptied. Returns the flows
/// of the emptied buckets (of their last read), left behind, and how many buckets were read
/// again.
///
/// A way is four 32-bit stores (the tag last), and a promotion moves several ways: a bucket
/// read mid-write may hold a way of two flows, or a flow twice ([`rehash_region`] keeps it
/// once). Two equal reads mean no write was under way across both, but for one stalled
/// mid-write (an interrupt on the program's CPU) for as long as both reads took: a way torn so
/// is carried over only if its hash still names its bucket, and the program checks each
/// entry's backend and generation (and an IPv6 entry's VIP) before following it.
fn settle<B: Bucket>(old: &Mapped<B>, first: usize, region: &mut [B], again: &[B]) -> (u64, u64) {
    let (mut left, mut again_read) = (0, 0);
    let mut reread = [B::default()];
    for (i, (bucket, next)) in region.iter_mut().zip(again).enumerate() {
        if bucket == next {
            continue;
        }
        again_read += 1;
        *bucket = *next;
        let mut settled = false;
        for _ in 2..BUCKET_READS {
            old.read(first + i, &mut reread);
            settled = reread[0] == *bucket;
            *bucket = reread[0];
            if settled {
                break;
            }
        }
        if !settled {
            left += bucket.ways().iter().filter(|w| B::occupied(w)).count() as u64;
            *bucket = B::default();
        }
    }
    (left, again_read)
}

/// A connection table pinned at another size than this start's, whose flows are copied into
/// the new one ([`carry_over`]): its name and its buckets over all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Resize {
    /// `CT_V4` or `CT_V6`.
    pub(super) name: &'static str,
    /// The pinned table's buckets (a region per CPU).
    pub(super) entries: u32,
}

/// Fills the fresh connection tables of `maps` (of `shape`) from the tables pinned in `dir` at
/// another size (`resize`): every CPU's flows into the same CPU's region. `v6_vips` gives each
/// IPv6 VIP's address by its index (from the adopted VIP table), which IPv6 entries hash by.
pub(super) fn carry_over(
    dir: &Path,
    resize: &[Resize],
    maps: &super::Maps,
    shape: super::TableShape,
    v6_vips: &HashMap<u32, [u32; 4]>,
) -> Result<TablesResized, DataplaneError> {
    use aya::maps::IterableMap;
    let started = Instant::now();
    let cpus = shape.cpus;
    let mut done = TablesResized {
        v4_flows: (shape.v4_flows_per_cpu(), shape.v4_flows_per_cpu()),
        v6_flows: (shape.v6_flows_per_cpu(), shape.v6_flows_per_cpu()),
        ..TablesResized::default()
    };
    for &Resize { name, entries } in resize {
        let flows = u64::from(entries / cpus) * CONNTRACK_WAYS as u64;
        let pin = dir.join(name);
        let (tally, reread) = if name == lb_common::maps::CONNTRACK_V4 {
            done.v4_flows.0 = flows;
            let new = maps.conntrack_v4.map().fd().as_fd();
            carry_table::<ConnBucketV4>(&pin, entries, new, cpus, shape.v4_buckets, v4_hash)?
        } else {
            assert_eq!(name, lb_common::maps::CONNTRACK, "only the connection tables are resized");
            done.v6_flows.0 = flows;
            let new = maps.conntrack.map().fd().as_fd();
            carry_table::<ConnBucket>(&pin, entries, new, cpus, shape.v6_buckets, |w| {
                v6_hash(v6_vips, w)
            })?
        };
        done.flows += tally;
        done.buckets_reread += reread;
    }
    done.took = started.elapsed();
    Ok(done)
}

/// What a start did with connection tables pinned at another size
/// ([`super::PinsFound::resized`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TablesResized {
    /// IPv4 flows per CPU, pinned and now.
    pub v4_flows: (u64, u64),
    /// IPv6 flows per CPU, pinned and now.
    pub v6_flows: (u64, u64),
    /// What happened to the entries of both tables.
    pub flows: ResizeTally,
    /// Buckets read again because the old program changed them between the two reads of their
    /// region ([`settle`]): how much it wrote the tables while they were copied.
    pub buckets_reread: u64,
    /// How long the copy took (the old program forwarded meanwhile).
    pub took: Duration,
}

impl TablesResized {
    /// The sizes as words: one count when both tables have it, else each family's.
    fn sizes(v4: u64, v6: u64) -> String {
        if v4 == v6 { v4.to_string() } else { format!("{v4} IPv4 / {v6} IPv6") }
    }

    /// The log line's message, logged once the copy is the running data plane's (when this
    /// process publishes its pins: a takeover committed, or a restart). It counts entries (a
    /// flow in two CPUs' regions is two), and says what no copy made before the switch can
    /// carry: flows the old program places until the new one is attached.
    pub fn message(&self) -> String {
        let ResizeTally { carried, dropped, left } = self.flows;
        let mut said = format!(
            "connection tables copied into the new size, from {} to {} flows per CPU: {carried} entries carried over, {dropped} dropped (new buckets full)",
            Self::sizes(self.v4_flows.0, self.v6_flows.0),
            Self::sizes(self.v4_flows.1, self.v6_flows.1),
        );
        if left > 0 {
            said.push_str(&format!(
                ", {left} left behind (of a VIP no longer in the maps, or changed while read)"
            ));
        }
        said.push_str(&format!(
            "; copied in {} ms while the old program forwarded: flows it places until the new program is attached are not carried (the new one places them as after any restart)",
            self.took.as_millis()
        ));
        said
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A way of flow `n` (`src` n; the tests hash a way by its `src`).
    fn way(n: u32) -> ConnEntryV4 {
        ConnEntryV4 { src: n, dst: 0, ports: 0, tag: 6 << 24 | n }
    }

    fn bucket(ways: &[u32]) -> ConnBucketV4 {
        let mut b = ConnBucketV4::default();
        for (i, &n) in ways.iter().enumerate() {
            b.ways[i] = way(n);
        }
        b
    }

    fn flows(b: &ConnBucketV4) -> Vec<u32> {
        b.ways.iter().filter(|w| w.tag != 0).map(|w| w.src).collect()
    }

    /// A table of 4 buckets shrunk to 1: every old bucket full, so the new bucket takes each
    /// old bucket's most recently used flow (rank 0), in bucket order, and drops the other 12;
    /// shrunk to 2, each new bucket meets two old ones and keeps both their two most recent.
    #[test]
    fn a_smaller_table_keeps_the_most_recently_used_flows() {
        // Flow n's hash is n: old bucket n % 4, new bucket n % (new size).
        let old = [
            bucket(&[0, 4, 8, 12]),
            bucket(&[1, 5, 9, 13]),
            bucket(&[2, 6, 10, 14]),
            bucket(&[3, 7, 11, 15]),
        ];
        let hash = |w: &ConnEntryV4| Some(w.src);
        let mut one = [ConnBucketV4::default()];
        let t = rehash_region(&old, &mut one, hash);
        assert_eq!(t, ResizeTally { carried: 4, dropped: 12, left: 0 });
        assert_eq!(flows(&one[0]), [0, 1, 2, 3]);
        let mut two = [ConnBucketV4::default(); 2];
        let t = rehash_region(&old, &mut two, hash);
        assert_eq!(t, ResizeTally { carried: 8, dropped: 8, left: 0 });
        // New bucket 0 meets old buckets 0 and 2: their first, then their second ways.
        assert_eq!(flows(&two[0]), [0, 2, 4, 6]);
        assert_eq!(flows(&two[1]), [1, 3, 5, 7]);
        // Half-full old buckets all fit, most recent first.
        let old = [bucket(&[0, 4]), bucket(&[1]), bucket(&[2, 6]), bucket(&[])];
        let t = rehash_region(&old, &mut [ConnBucketV4::default(); 2], hash);
        assert_eq!(t, ResizeTally { carried: 5, dropped: 0, left: 0 });
        let mut two = [ConnBucketV4::default(); 2];
        rehash_region(&old, &mut two, hash);
        assert_eq!((flows(&two[0]), flows(&two[1])), (vec![0, 2, 4, 6], vec![1]));
        let old = [bucket(&[0, 4, 8, 12]), bucket(&[]), bucket(&[2, 6, 10]), bucket(&[])];
        let mut two = [ConnBucketV4::default(); 2];
        rehash_region(&old, &mut two, hash);
        assert_eq!(flows(&two[0]), [0, 2, 4, 6], "8, 12 and 10 dropped, the least recent");
    }

    /// The reviewer's case: two full old buckets, [a0 live, a1 ended, a2 ended, a3 live] and
    /// [b0 ended, b1 live, b2 ended, b3 live], meet in one new bucket. Merged by rank they are
    /// a0 b0 a1 b1 a2 b2 a3 b3; the two most recent (a0, and b0 though ended) keep the newer
    /// half, as `victim()` never gives up the two most recent ways; in the older half live
    /// flows come before ended ones, so b1 and a3 are kept, and a1, a2, b2 (ended) and b3 (the
    /// least recent live flow) dropped. Without the rule a1 (ended) was kept and a3 dropped.
    #[test]
    fn a_smaller_table_gives_up_ended_flows_of_the_older_half_first() {
        // Flow n's hash is n: a* even (old bucket 0), b* odd (old bucket 1).
        let (a, b) = ([0, 2, 4, 6], [1, 3, 5, 7]);
        let ended = [a[1], a[2], b[0], b[2]];
        let mut old = [bucket(&a), bucket(&b)];
        for w in old.iter_mut().flat_map(|b| b.ways.iter_mut()) {
            if ended.contains(&w.src) {
                w.tag |= lb_common::CONN_CLOSING;
            }
        }
        let mut one = [ConnBucketV4::default()];
        let t = rehash_region(&old, &mut one, |w: &ConnEntryV4| Some(w.src));
        assert_eq!(t, ResizeTally { carried: 4, dropped: 4, left: 0 });
        assert_eq!(flows(&one[0]), [a[0], b[0], b[1], a[3]], "a0 b0 (newer half), then live b1 a3");
        // Two ended flows only in the older half: they go last, behind a live one, even when
        // everything fits (the order `victim()` would give them up in).
        let mut old = [bucket(&[0, 2, 4, 6])];
        old[0].ways[2].tag |= lb_common::CONN_CLOSING;
        let mut one = [ConnBucketV4::default()];
        rehash_region(&old, &mut one, |w: &ConnEntryV4| Some(w.src));
        assert_eq!(flows(&one[0]), [0, 2, 6, 4]);
    }

    /// A larger table: each old bucket's flows spread over the new buckets their hash names,
    /// in their old order; nothing is dropped.
    #[test]
    fn a_larger_table_keeps_every_flow_in_order() {
        let old = [bucket(&[0, 6, 2, 4]), bucket(&[5, 1, 7])];
        let mut four = [ConnBucketV4::default(); 4];
        let t = rehash_region(&old, &mut four, |w: &ConnEntryV4| Some(w.src));
        assert_eq!(t, ResizeTally { carried: 7, dropped: 0, left: 0 });
        let got: Vec<Vec<u32>> = four.iter().map(flows).collect();
        assert_eq!(got, [vec![0, 4], vec![5, 1], vec![6, 2], vec![7]]);
    }

    /// Ways whose bucket cannot be computed (their VIP is gone), or whose hash names another
    /// bucket than the one they sit in (torn while read), are left behind and counted.
    #[test]
    fn ways_without_a_bucket_of_their_own_are_left_behind() {
        let old = [bucket(&[0, 99, 2]), bucket(&[4, 1])];
        let hash = |w: &ConnEntryV4| (w.src != 99).then_some(w.src);
        let mut two = [ConnBucketV4::default(); 2];
        let t = rehash_region(&old, &mut two, hash);
        // 99: no hash; 4 sits in bucket 1, its hash names bucket 0.
        assert_eq!(t, ResizeTally { carried: 3, dropped: 0, left: 2 });
        assert_eq!((flows(&two[0]), flows(&two[1])), (vec![0, 2], vec![1]));
    }

    /// A bucket read while the program promoted a way (`promote` copies way 0 into way 1
    /// before it writes the promoted way into way 0) holds one flow twice: the copy keeps the
    /// more recent and leaves the other behind (counted), whatever their closing marks.
    #[test]
    fn a_flow_read_twice_in_a_bucket_is_carried_once() {
        let mut old = [bucket(&[0, 0, 4, 8]), bucket(&[1, 5, 5, 5])];
        old[1].ways[3].tag |= lb_common::CONN_CLOSING;
        let hash = |w: &ConnEntryV4| Some(w.src);
        let mut one = [ConnBucketV4::default()];
        let t = rehash_region(&old, &mut one, hash);
        assert_eq!(t, ResizeTally { carried: 4, dropped: 1, left: 3 });
        assert_eq!(flows(&one[0]), [0, 1, 5, 4], "each flow once, 8 dropped");
        let mut four = [ConnBucketV4::default(); 4];
        let t = rehash_region(&old, &mut four, hash);
        assert_eq!(t, ResizeTally { carried: 5, dropped: 0, left: 3 });
        let got: Vec<Vec<u32>> = four.iter().map(flows).collect();
        assert_eq!(got, [vec![0, 4, 8], vec![1, 5], vec![], vec![]]);
    }

    /// The hashes of the copy are the program's: an entry, as the program writes it (the
    /// protocol in its tag, a closing mark or not), hashes as its flow's key does
    /// (`lb_common::hash`, which the program runs); an IPv6 entry by its VIP's address.
    #[test]
    fn entries_hash_as_their_flows_do() {
        let v4 = ConnEntryV4 {
            src: u32::from_ne_bytes([198, 18, 5, 1]),
            dst: u32::from_ne_bytes([198, 18, 1, 1]),
            ports: 40000u16.to_be() as u32 | (80u16.to_be() as u32) << 16,
            tag: Conn { backend: 3, generation: 1 }.tag(6) | lb_common::CONN_CLOSING,
        };
        let key = FlowKeyV4 {
            src: v4.src,
            dst: v4.dst,
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        assert_eq!(v4_hash(&v4), Some(hash::flow_key_v4_hash(&key, HASH_SEED)));
        let vip = [0x0220_0120, 0, 0x0100_0000, 0x0100_0000];
        let v6 = ConnEntry {
            src: [1, 2, 3, 4],
            ports: v4.ports,
            tag: Conn { backend: 3, generation: 1 }.tag(17),
            vip: 5,
            _pad: 0,
        };
        let key = FlowKey {
            src: v6.src,
            dst: vip,
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 17,
            family: AF_INET6,
            _pad: [0; 2],
        };
        let vips = HashMap::from([(5, vip)]);
        assert_eq!(v6_hash(&vips, &v6), Some(hash::flow_key_hash(&key, HASH_SEED)));
        assert_eq!(v6_hash(&HashMap::new(), &v6), None, "a VIP index no VIP has");
    }

    /// The log line says the sizes once when both tables have them, and each family's when
    /// not (the default sizes differ by family).
    #[test]
    fn the_log_line_names_the_sizes_and_counts() {
        let r = TablesResized {
            v4_flows: (4096, 8192),
            v6_flows: (4096, 8192),
            flows: ResizeTally { carried: 10, dropped: 2, left: 0 },
            buckets_reread: 0,
            took: Duration::from_millis(3),
        };
        assert!(
            r.message().starts_with("connection tables copied into the new size, from 4096 to 8192 flows per CPU: 10 entries carried over, 2 dropped (new buckets full); copied in 3 ms"),
            "{}",
            r.message()
        );
        let r = TablesResized { v4_flows: (131072, 4096), v6_flows: (65536, 4096), ..r };
        assert!(r.message().contains("from 131072 IPv4 / 65536 IPv6 to 4096 flows"));
    }
}
