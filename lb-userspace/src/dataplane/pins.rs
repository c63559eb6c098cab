//! The pin directory and what is pinned in it: the layout a pinned map must have to be re-used
//! ([`check_pins`]), what making one fresh costs, what makes no sense in an adopted entry, the
//! names of link pins, and a bpffs and pin directory fit to keep the data plane past this
//! process ([`ensure_bpffs`], [`pin_dir_ready`]).
//!
//! Kept apart from the loading and applying in `mod.rs` because these checks decide, before
//! anything is adopted, whether a start carries the connection table over or drops it, and
//! whether the pins outlive the process at all.

use std::path::{Path, PathBuf};

use aya::maps::{MapError, MapInfo, MapType};
use lb_common::{
    AF_INET, AF_INET6, AddrKey, Backend, Counters, GlobalConfig, MAX_BACKENDS, MAX_RING_SIZE,
    MAX_VIPS, VipKey, VipMeta, backend_flags, vip_flags,
};
use tracing::{info, warn};

use super::{DataplaneError, TableShape, resize::Resize, words_addr};

// Map flags, as the kernel reports them (`bpf_map_info.map_flags`): the connection tables are
// memory-mappable ([`lb_common::BPF_F_MMAPABLE`]); the access flags are left out of the
// comparison.
use lb_common::BPF_F_MMAPABLE;
const BPF_F_RDONLY: u32 = 1 << 3;
const BPF_F_WRONLY: u32 = 1 << 4;
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// Every map the balancer pins, and what a pinned one must look like to be re-used: (name,
/// type, key size, value size, max entries, flags). Mirrors lb-ebpf's `maps.rs` (all maps but the
/// per-CPU VIP cache, which starts empty); a test checks it against the loaded object.
pub(super) fn map_layouts(shape: TableShape) -> [(&'static str, MapType, u32, u32, u32, u32); 13] {
    use lb_common::{ConnBucket, ConnBucketV4, VipKeyV4, maps as n, stats::REASON_COUNT};
    use std::mem::size_of;
    let sz = |s: usize| s as u32;
    let TableShape { cpus, v4_buckets, v6_buckets } = shape;
    [
        (
            n::VIPS,
            MapType::Hash,
            sz(size_of::<VipKey>()),
            sz(size_of::<VipMeta>()),
            MAX_VIPS * 4,
            0,
        ),
        (
            n::VIPS_V4,
            MapType::Hash,
            sz(size_of::<VipKeyV4>()),
            sz(size_of::<VipMeta>()),
            MAX_VIPS * 4,
            0,
        ),
        (
            n::CONNTRACK_V4,
            MapType::Array,
            4,
            sz(size_of::<ConnBucketV4>()),
            cpus * v4_buckets,
            BPF_F_MMAPABLE,
        ),
        (n::VIP_EPOCH, MapType::Array, 4, 4, 1, 0),
        (n::CT_STATS, MapType::PerCpuArray, 4, 8, lb_common::ct_stats::COUNT, 0),
        (n::VIP_ADDRS, MapType::Hash, sz(size_of::<AddrKey>()), 4, MAX_VIPS * 4, 0),
        (n::RINGS, MapType::Array, 4, 4, MAX_VIPS * 2 * MAX_RING_SIZE, 0),
        (n::BACKENDS, MapType::Array, 4, sz(size_of::<Backend>()), MAX_BACKENDS, 0),
        (
            n::CONNTRACK,
            MapType::Array,
            4,
            sz(size_of::<ConnBucket>()),
            cpus * v6_buckets,
            BPF_F_MMAPABLE,
        ),
        (n::CONFIG, MapType::Array, 4, sz(size_of::<GlobalConfig>()), 1, 0),
        (n::VIP_STATS, MapType::PerCpuArray, 4, sz(size_of::<Counters>()), MAX_VIPS, 0),
        (n::BACKEND_STATS, MapType::PerCpuArray, 4, sz(size_of::<Counters>()), MAX_BACKENDS, 0),
        (n::REASONS, MapType::PerCpuArray, 4, 8, REASON_COUNT, 0),
    ]
}

/// Removes the pin at `path`; absent is fine.
pub(super) fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    std::fs::remove_file(path)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .map_err(|e| DataplaneError::Pin {
            step: "removing the pin",
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Maps whose contents are only counters that user space reads: one pinned with another layout
/// (a counter array that grew, a verdict reason added: ordinary feature work) is made fresh
/// alone, its counters starting again from 0, and the rest of the data plane is still adopted.
/// Any other map of another layout makes every map fresh: the connection tables, rings,
/// backend and VIP entries name one another, and one re-used beside a fresh other would be
/// misread.
fn counters_only(name: &str) -> bool {
    use lb_common::maps as n;
    matches!(name, n::VIP_STATS | n::BACKEND_STATS | n::REASONS | n::CT_STATS)
}

/// What starting every map fresh costs, said wherever a start cannot adopt the connection
/// tables: established flows are placed again by the rings, which give a flow another backend
/// when the pool changed since it began (a backend added, removed, reweighted, back from a
/// failure) or when its backend is drained (drains keep flows only through the tables).
pub const FRESH_TABLES_COST: &str = "established flows are placed anew by the rings: those whose backend changed since they began (the pool changed since) and those on drained backends move to another backend, and their connections break; counters start again from 0";

/// What a start at another `node.conntrack_flows_per_cpu` still costs, said where a reload is
/// refused for one: it copies the pinned connection tables into tables of the new size
/// (`resize`), but a smaller table keeps only what its buckets hold, and flows that begin while
/// the new process loads miss the copy.
pub const RESIZED_TABLES_COST: &str = "it copies the connection tables into tables of the new size: a smaller table keeps each bucket's most recently used flows (ended ones given up first, as a full bucket does), and flows that do not fit, or that begin while the new process loads, are placed anew by the rings, so those whose backend changed since they began, or on a drained backend, move to another backend (their connections break)";

/// Whether `error` (reading a pin) says that nothing is pinned there.
fn pin_missing(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.kind() == std::io::ErrorKind::NotFound)
}

/// What [`check_pins`] found in a pin directory.
pub(super) struct PinCheck {
    /// One line per pin this build will not re-use (retired names included).
    pub(super) problems: Vec<String>,
    /// Maps pinned with this build's layout: adopted, unless `mismatched`.
    pub(super) adopt: Vec<&'static str>,
    /// Counter maps of another layout ([`counters_only`]): made fresh alone.
    pub(super) fresh_counters: Vec<&'static str>,
    /// Connection tables of this build's layout at another size ([`resizable`]): made fresh at
    /// this start's size and filled from the pinned ones.
    pub(super) resize: Vec<Resize>,
    /// No map may be re-used: one other than a counter map has another layout, the maps were
    /// written under another layout version, or nothing says which (no CONFIG pin).
    pub(super) mismatched: bool,
}

/// Looks at the map pins in `dir` without changing any: a process loaded beside a running
/// edgelb must leave that one's pins alone until it has taken over. A pin that cannot be read
/// (out of descriptors or memory) is an error, not a map of another layout: taken for one, it
/// would have had this start drop the connection table.
pub(super) fn check_pins(dir: &Path, shape: TableShape) -> Result<PinCheck, DataplaneError> {
    let mut problems = Vec::new();
    for name in lb_common::maps::RETIRED {
        if dir.join(name).exists() {
            problems.push(format!("{name}: pinned by an older edgelb, no longer used"));
        }
    }
    let (mut mismatched, mut adopt, mut fresh_counters) = (false, Vec::new(), Vec::new());
    let mut resize = Vec::new();
    for (name, ty, key, value, max, flags) in map_layouts(shape) {
        let path = dir.join(name);
        let info = match MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(e) if pin_missing(&e) => continue,
            Err(error) => return Err(DataplaneError::PinUnreadable { path, error }),
        };
        // Flags count too: aya refuses a pinned map whose flags differ from the object's, and
        // every start would then fail rather than start afresh. The access flags are the
        // kernel's and aya's own business.
        let found = info.map_type().ok().map(|t| {
            let flags = info.map_flags() & !(BPF_F_RDONLY | BPF_F_WRONLY | BPF_F_RDONLY_PROG);
            (t, info.key_size(), info.value_size(), info.max_entries(), flags)
        });
        if let Some(entries) =
            found.and_then(|f| resizable(name, f, (ty, key, value, max, flags), shape))
        {
            resize.push(Resize { name, entries });
        } else if found != Some((ty, key, value, max, flags)) {
            let alone = counters_only(name);
            problems.push(format!(
                "{name}: pinned map is {found:?}, this edgelb needs {:?} (type, key, value, entries, flags){}",
                (ty, key, value, max, flags),
                if alone { ": made fresh alone, its counters start again from 0" } else { "" }
            ));
            if alone {
                fresh_counters.push(name);
            } else {
                mismatched = true;
            }
        } else {
            adopt.push(name);
        }
    }
    // Sizes alike, the meaning may still differ: the maps say which edgelb wrote them. Without
    // the CONFIG map that says it, nothing is adopted.
    if !(adopt.is_empty() && fresh_counters.is_empty() && resize.is_empty()) && !mismatched {
        match pinned_maps_version(&dir.join(lb_common::maps::CONFIG))? {
            // 0: pinned by an edgelb that never wrote them (it stopped before its first
            // apply), so there is nothing in them to misread. (Maps from before the stamp have
            // a smaller CONFIG entry, a size mismatch above.)
            Some(0) => {}
            Some(v) if v == lb_common::MAPS_VERSION => {}
            Some(v) => {
                problems.push(format!(
                    "the pinned maps were written under map layout version {v}, this edgelb uses {}",
                    lb_common::MAPS_VERSION
                ));
                mismatched = true;
            }
            None => {
                problems.push(format!(
                    "maps are pinned in {} without the {} map, whose entry says under which map layout version they were written: whether this edgelb reads them right cannot be told",
                    dir.display(),
                    lb_common::maps::CONFIG
                ));
                mismatched = true;
            }
        }
    }
    Ok(PinCheck { problems, adopt, fresh_counters, resize, mismatched })
}

/// A pinned map's layout as [`check_pins`] compares it: type, key size, value size, entries,
/// flags.
type Layout = (MapType, u32, u32, u32, u32);

/// The buckets of the pinned connection table `name` of layout `found`, when it differs from
/// this build's (`want`, for `shape`) only by its size (`node.conntrack_flows_per_cpu`
/// changed): a region per CPU of a power of two of buckets. Its flows are then copied into the
/// new table (`resize::carry_over`) rather than every map made fresh. The possible-CPU count
/// cannot have changed under pins (it is fixed at boot, and bpffs does not outlive one); a size
/// that is no power of two of buckets per CPU is another layout, and makes every map fresh.
fn resizable(name: &str, found: Layout, want: Layout, shape: TableShape) -> Option<u32> {
    let is_table = name == lb_common::maps::CONNTRACK_V4 || name == lb_common::maps::CONNTRACK;
    let (ty, key, value, entries, flags) = found;
    let per_cpu = entries / shape.cpus.max(1);
    (is_table
        && (ty, key, value, flags) == (want.0, want.1, want.2, want.4)
        && entries != want.3
        && entries.is_multiple_of(shape.cpus.max(1))
        && per_cpu.is_power_of_two())
    .then_some(entries)
}

/// Whether `dir` holds the pin of an XDP link ([`is_link_pin`]).
pub(super) fn link_pinned_in(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| d.flatten().any(|e| is_link_pin(&e.path())))
}

/// What it costs that the map pinned as `name` was missing from a data plane whose other maps
/// are taken over (its pin removed by hand, or by a tool), or was a counter map of another
/// layout: the map is made fresh, empty, and the running program's one is lost once the program
/// is replaced.
fn fresh_map_cost(name: &str) -> &'static str {
    use lb_common::maps as n;
    match name {
        n::CONNTRACK_V4 => {
            "IPv4 connection table: established IPv4 flows are placed anew by the rings, and those whose backend the ring gives another now (the pool changed since they began, or their backend is drained) lose their connection"
        }
        n::CONNTRACK => {
            "IPv6 connection table: established IPv6 flows are placed anew by the rings, and those whose backend the ring gives another now (the pool changed since they began, or their backend is drained) lose their connection"
        }
        n::BACKENDS => {
            "backend entries: written again from the config, but under ids and generations that start over, which the connection tables' entries cannot tell from their own: an established flow may be sent to another backend of its VIP, and its connection lost"
        }
        n::VIPS | n::VIPS_V4 | n::VIP_ADDRS | n::RINGS | n::VIP_EPOCH | n::CONFIG => {
            "written again from the config before the program runs with it: nothing is lost"
        }
        n::VIP_STATS | n::BACKEND_STATS | n::REASONS | n::CT_STATS => {
            "counters: they start again from 0 (a reset to Prometheus)"
        }
        _ => "made empty",
    }
}

/// The warning for a map whose pin alone is missing from a data plane whose other maps are
/// taken over: made fresh, and what that costs, or the "adopted" that follows would hide it.
pub(super) fn fresh_map_warning(name: &str) -> String {
    format!(
        "{name} was not pinned with the rest of the data plane (its pin removed?): made fresh; {}",
        fresh_map_cost(name)
    )
}

/// The [`lb_common::MAPS_VERSION`] recorded in the pinned CONFIG map at `path`: `None` when
/// nothing is pinned there; `Some(0)` for maps pinned by an edgelb that never wrote them. A pin
/// that cannot be read is an error (see [`check_pins`]).
fn pinned_maps_version(path: &Path) -> Result<Option<u32>, DataplaneError> {
    let unreadable = |error| DataplaneError::PinUnreadable { path: path.to_owned(), error };
    let data = match aya::maps::MapData::from_pin(path) {
        Ok(data) => data,
        Err(e) if pin_missing(&e) => return Ok(None),
        Err(e) => return Err(unreadable(e)),
    };
    let config: aya::maps::Array<_, GlobalConfig> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(unreadable)?;
    config.get(&0, 0).map(|c| Some(c.maps_version)).map_err(unreadable)
}

/// A VIP entry's key as words for a message (`198.18.1.1 port 80 protocol 17`).
pub(super) fn vip_entry_words(key: &VipKey) -> String {
    format!(
        "{} port {} protocol {}",
        words_addr(key.addr, key.family),
        u16::from_be(key.port),
        key.proto
    )
}

/// The ring region (0 or 1) an adopted VIP entry names live, `None` for a VIP without a ring;
/// `Err` says what makes no sense in it: an index past the maps, a family its table does not
/// hold, flag bits this build does not know, a ring larger than a region, or a ring base that
/// is not the start of one of the VIP's own two regions ([`lb_common::ring_region_base`]).
pub(super) fn vip_entry_region(key: &VipKey, meta: &VipMeta) -> Result<Option<usize>, String> {
    const KNOWN: u32 =
        vip_flags::HASH_5TUPLE | vip_flags::L7 | vip_flags::L2_DSR | vip_flags::NO_CONNTRACK;
    if key.family != AF_INET && key.family != AF_INET6 {
        return Err(format!("address family {} is neither IPv4 nor IPv6", key.family));
    }
    if meta.vip_index >= MAX_VIPS {
        return Err(format!("VIP index {} is past the {MAX_VIPS} the maps hold", meta.vip_index));
    }
    if meta.flags & !KNOWN != 0 {
        return Err(format!("flags {:#x} have bits this edgelb does not know", meta.flags));
    }
    if meta.ring_size == 0 {
        return Ok(None);
    }
    if meta.ring_size > MAX_RING_SIZE {
        return Err(format!(
            "ring size {} is larger than a ring region ({MAX_RING_SIZE} slots)",
            meta.ring_size
        ));
    }
    let region = |r| lb_common::ring_region_base(meta.vip_index, r);
    match (0..2).find(|&r| region(r) == meta.ring_base) {
        Some(r) => Ok(Some(r as usize)),
        None => Err(format!(
            "ring base {} is the start of neither ring region of VIP index {} ({} or {})",
            meta.ring_base,
            meta.vip_index,
            region(0),
            region(1)
        )),
    }
}

/// What makes no sense in an adopted backend entry, if anything: one held (present or parked)
/// with flag bits this build does not know, an address family neither IPv4 nor IPv6, or a VIP
/// index past the maps. A free entry (no flag) only keeps its generation, which any value is.
pub(super) fn backend_entry_problem(b: &Backend) -> Result<(), String> {
    const KNOWN: u8 = backend_flags::PRESENT | backend_flags::PARKED;
    if b.flags == 0 {
        return Ok(());
    }
    if b.flags & !KNOWN != 0 {
        return Err(format!("flags {:#x} have bits this edgelb does not know", b.flags));
    }
    if b.family != AF_INET && b.family != AF_INET6 {
        return Err(format!("address family {} is neither IPv4 nor IPv6", b.family));
    }
    if b.vip_index >= MAX_VIPS {
        return Err(format!("VIP index {} is past the {MAX_VIPS} the maps hold", b.vip_index));
    }
    Ok(())
}

/// Pin file of the XDP link on `interface`.
pub(super) fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{interface}"))
}

/// Is `path` the pin of an XDP link ([`link_pin`])?
pub(super) fn is_link_pin(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link-"))
}

/// Where bpffs lives.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs on /sys/fs/bpf unless it already is (systemd usually does it; minimal systems
/// and fresh VMs may not).
///
/// Only in the host's mount namespace (PID 1's): a bpffs mounted in a namespace of this
/// process's own (`ip netns exec` makes one and hides the host's /sys/fs/bpf; so do containers
/// and units with `ProtectSystem=`) lives only as long as that namespace, and the pins, and
/// XDP with them, would go when edgelb exits: SIGTERM would take the data plane down, and every
/// restart would lose the connection table. That is refused, saying what to do instead. When
/// it cannot be told (PID 1's namespace unreadable, as some containers make it, and no
/// ancestor's another), bpffs is mounted as before, with a warning.
pub fn ensure_bpffs() -> Result<(), String> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
    if mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
    }) {
        return Ok(());
    }
    match mount_namespace_of_its_own() {
        Ok(false) => {}
        Ok(true) => return Err(own_mount_namespace_refusal()),
        Err(e) => warn!(
            error = %e,
            "cannot tell whether this process shares the host's mount namespace (/proc/1/ns/mnt): if it does not (a container, `ip netns exec`), the bpffs mounted now goes with that namespace, and the pins and XDP with it when edgelb exits"
        ),
    }
    info!("mounting bpffs on {BPFFS}");
    // Root-only, as systemd mounts it: mounted without a mode, bpffs is writable by every user.
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "-o", "mode=0700", "bpf", BPFFS])
        .output()
        .map_err(|e| format!("running mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mounting bpffs on {BPFFS} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Whether this process runs in a mount namespace of its own: another than PID 1's (the host's,
/// or a container's own init's). Where PID 1's cannot be read (sandboxes that deny it even to
/// root), another than an ancestor's says so too: `ip netns exec` (and `unshare -m`) makes a
/// namespace for the command it runs, apart from the shell that ran it. An error (PID 1's)
/// when neither tells.
fn mount_namespace_of_its_own() -> std::io::Result<bool> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt"));
    let mine = ns("self")?;
    let unreadable = match ns("1") {
        Ok(init) => return Ok(mine != init),
        Err(e) => e,
    };
    let mut pid = std::os::unix::process::parent_id();
    while pid > 1 {
        match ns(&pid.to_string()) {
            Ok(theirs) if theirs != mine => return Ok(true),
            Ok(_) => {}
            Err(_) => break,
        }
        match crate::procfs::Stat::of(pid) {
            Ok(stat) => pid = stat.ppid,
            Err(_) => break,
        }
    }
    Err(unreadable)
}

/// Why bpffs is not mounted from a mount namespace of this process's own, and what to do.
fn own_mount_namespace_refusal() -> String {
    format!(
        "bpffs is not mounted on {BPFFS}, and this process runs in a mount namespace of its own (`ip netns exec`, a container, a unit with ProtectSystem= or PrivateTmp=): a bpffs mounted here would vanish with that namespace, taking the pins, and XDP with them, when edgelb exits. Mount bpffs on the host (`mount -t bpf bpf {BPFFS}`), or enter a network namespace with `nsenter --net=/run/netns/<ns>` rather than `ip netns exec`"
    )
}

/// Makes sure pin directory `dir` exists on a mounted bpffs.
///
/// The directory must be this user's and writable by no one else: whoever may write to it may
/// remove the link pins (which detaches XDP) or plant maps of the right shape for edgelb to
/// adopt.
pub(super) fn pin_dir_ready(dir: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::fs::MetadataExt;
    let fail = |reason: String| DataplaneError::Pin {
        step: "preparing the pin directory",
        path: dir.to_owned(),
        reason,
    };
    ensure_bpffs().map_err(fail)?;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                // Root-only whatever the umask.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| fail(format!("creating the pin directory: {e}")))?;
    }
    // The directory and each of its parents below bpffs: a symbolic link, another user's
    // directory or one others may write to along the way would let them swap what edgelb
    // pins into.
    let me = crate::admin::fdpass::euid();
    let below: Vec<&Path> =
        dir.ancestors().take_while(|a| a.starts_with(BPFFS) && *a != Path::new(BPFFS)).collect();
    for d in below {
        let m = std::fs::symlink_metadata(d).map_err(|e| fail(format!("{}: {e}", d.display())))?;
        if m.file_type().is_symlink() || !m.is_dir() {
            return Err(fail(format!(
                "{} is not a directory but {}: pin directories are plain directories",
                d.display(),
                if m.file_type().is_symlink() { "a symbolic link" } else { "a file" }
            )));
        }
        if m.uid() != me {
            return Err(fail(format!(
                "{} belongs to user {}, not to this one ({me}): another user could remove edgelb's pins (detaching XDP) or plant maps for it; remove it, or choose another node.pin_dir",
                d.display(),
                m.uid()
            )));
        }
        if m.mode() & 0o022 != 0 {
            return Err(fail(format!(
                "{} is writable by other users (mode {:o}): they could remove edgelb's pins (detaching XDP) or plant maps for it; `chmod go-w` it",
                d.display(),
                m.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{TableShape, pin_dir_ready};

    /// A pin that cannot be removed is said as a removal: every step done to a pin or to the
    /// pin directory (removing, listing, bpffs not mounted) used to be said as "pinning to".
    #[test]
    fn a_pin_that_cannot_be_removed_says_so() {
        let dir = std::env::temp_dir().join(format!("edgelb-pin-step-{}", std::process::id()));
        // A directory where a pin was expected: unlink fails with EISDIR.
        let pin = dir.join("VIPS");
        std::fs::create_dir_all(pin.join("inside")).unwrap();
        let e = super::remove_pin(&pin).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.starts_with(&format!("removing the pin {}: ", pin.display())), "{e}");
        assert!(!e.contains("pinning"), "{e}");
    }

    /// A map made fresh under a data plane otherwise taken over is named with what it costs:
    /// a connection table, its established flows; every map of the layout has its own words.
    #[test]
    fn a_map_made_fresh_says_what_it_costs() {
        use super::{fresh_map_warning, map_layouts};
        let ct = fresh_map_warning(lb_common::maps::CONNTRACK_V4);
        assert!(
            ct.starts_with("CT_V4 was not pinned")
                && ct.contains("IPv4 connection table: established IPv4 flows are placed anew"),
            "{ct}"
        );
        assert!(fresh_map_warning(lb_common::maps::CONNTRACK).contains("IPv6 connection table"));
        for (name, ..) in map_layouts(TableShape::auto()) {
            let w = fresh_map_warning(name);
            assert!(w.starts_with(name) && !w.ends_with("made empty"), "{w}");
        }
    }

    /// A pin directory another user owns, or others may write to, is refused: they could
    /// remove the link pins (detaching XDP) or plant maps for edgelb to adopt.
    #[test]
    fn a_pin_directory_others_control_is_refused() {
        use crate::testbed::netns::{euid, require};
        use std::os::unix::fs::PermissionsExt;
        if !require(
            euid() == 0,
            "a_pin_directory_others_control_is_refused: needs root to make a directory under /sys/fs/bpf",
        ) {
            return;
        }
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/edgelb-test-owner-{}",
            std::process::id()
        ));
        /// Removes the test's directories, even when an assertion failed.
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        pin_dir_ready(&dir).expect("a directory of its own making");
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let e = pin_dir_ready(&dir).unwrap_err().to_string();
        assert!(e.contains("belongs to user 65534"), "{e}");
        std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = pin_dir_ready(&dir).unwrap_err().to_string();
        assert!(e.contains("writable by other users"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        pin_dir_ready(&dir).expect("root's, 0755");
        // A parent another user owns: refused too. (bpffs takes no symbolic links here, so
        // the check of those is not exercised.)
        let inner = dir.join("inner");
        pin_dir_ready(&inner).expect("a new directory below a good one");
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let e = pin_dir_ready(&inner).unwrap_err().to_string();
        assert!(e.contains("belongs to user 65534"), "{e}");
    }
}
