//! The XDP data path as the controller sees it: load the programs, attach them, and keep the
//! maps in step with the config.
//!
//! [`Dataplane::apply`] is the one way config reaches the kernel. It is incremental and ordered so
//! that no packet sees an inconsistent state: new backends are written before any ring names
//! them; a changed ring is written into the VIP's *inactive* region (only the slots that differ
//! from what that region already holds) and then published by one atomic update of the VIP entry;
//! removed backends are retired only after no ring points at them. VIPs gone from the config
//! (a changed address, port or protocol is a removal and an addition) are removed first, with
//! their backend entries: no ring of a live VIP names those, and a config at the capacity limits
//! must not need room for the old and the new VIP at once. A packet that read a removed VIP's
//! entry just before its removal may still read its ring, whose ids this apply can give to
//! another VIP's backends before the packet gets there: the program refuses a ring slot whose
//! backend is not of the VIP it serves (`Backend::vip_index`), and drops that packet; for that
//! check to hold, a VIP index this apply frees goes to a new VIP only when no other is free.
//! When the maps have room for the new backend entries only once those of backends leaving the
//! VIPs kept are retired, an apply goes in two passes, the first of which only frees (see
//! `Dataplane::freeing_pass`).
//!
//! This file holds the loaded balancer ([`Dataplane`]: load, attach, apply), its errors and
//! reports, and the connection tables' shape; the files beside it each hold one concern it
//! relies on: `route.rs` where a flow goes (keys, rings, hashes), `pins.rs` the pin directory
//! and the pinned maps' checks, `links.rs` the XDP links and their pins, `iface.rs` interface
//! lookups, `decap.rs` the auxiliary programs and `edgelb decap`, `maps.rs` the typed maps,
//! `netlink.rs` what the kernel says of an interface, and `holders.rs` which processes hold the
//! pinned data plane.

mod decap;
mod holders;
mod iface;
mod links;
pub mod maps;
pub mod netlink;
mod pins;
mod resize;
mod route;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, MapInfo},
    programs::{ProgramError, Xdp, links::FdLink},
};
use lb_common::{
    AF_INET, AF_INET6, AddrKey, Backend, Counters, GlobalConfig, MAX_BACKENDS, MAX_VIPS, VipKey,
    VipMeta, addr_flags, backend_flags, programs, vip_flags,
};
use tracing::{error, info, warn};

use crate::config::{
    Config, Forwarding, HashMode, MAX_CONNTRACK_FLOWS, MIN_CONNTRACK_FLOWS, Vip, XdpAttachMode,
};
pub use decap::{AuxPrograms, DECAP_PIN_DIR, attach_decap, detach_decap};
pub use holders::{Holder, pin_holders};
pub use iface::{InterfaceState, interface_exists, interface_index};
use iface::{ifindex, interface_state, lookup_failed};
pub use links::balancers_elsewhere;
use links::{
    DirStamp, HeldLink, attach_pinned, attach_xdp, check_balancer_links, follow_renames,
    link_pin_holding, mode_differs, pinned_link_device, repin_after_reattach, replace_program,
};
pub use maps::Maps;
pub use pins::{BPFFS, FRESH_TABLES_COST, RESIZED_TABLES_COST, ensure_bpffs};
use pins::{
    backend_entry_problem, check_pins, fresh_map_warning, is_link_pin, link_pin, link_pinned_in,
    map_layouts, pin_dir_ready, remove_pin, vip_entry_region, vip_entry_words,
};
pub use resize::{ResizeTally, TablesResized};
pub use route::{
    RouteError, RouteFlow, addr_words, conn_hash, flow_hash, ring_slot_counts, route, vip_key,
    vip_ring, words_addr,
};

/// The balancer object, built from lb-ebpf by build.rs.
pub static BALANCER_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgelb-xdp"));
/// The auxiliary programs (decap, pass, tx_swap).
pub static AUX_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgelb-aux"));

/// What went wrong in the data path. A message that names its cause renders it with the
/// cause's own causes ([`crate::error_chain`]: aya keeps a syscall's error code in `source()`),
/// and that cause is not also the error's `source()`: a caller that prints the source chain
/// would say it twice.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The ELF object could not be loaded (maps created, BTF...).
    #[error("loading the eBPF object failed")]
    Load(#[from] EbpfError),
    /// A program is missing from the object or failed verification/attachment.
    #[error("eBPF program `{name}`: {}", crate::error_chain(error))]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        error: ProgramError,
    },
    /// A map the code expects is not in the object.
    #[error("map `{0}` is missing from the eBPF object")]
    MissingMap(&'static str),
    /// A map operation failed.
    #[error("map `{name}`: {}", crate::error_chain(error))]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        error: MapError,
    },
    /// The interface already has an XDP program that another tool attached (the kernel's EBUSY
    /// or EEXIST): no mode would do, and a fallback to generic mode would only hide the cause.
    #[error(
        "`{interface}` already has an XDP program that is not this edgelb's ({mode} attach: {error}); `ip -d link show {interface}` names it: detach it, or take the interface out of node.interfaces"
    )]
    Held {
        /// Interface name.
        interface: String,
        /// Mode tried.
        mode: &'static str,
        /// Cause.
        error: std::io::Error,
    },
    /// The interface already runs edgelb's own balancer program, but not through a link pinned
    /// in this `node.pin_dir`: the pin directory was changed under a running data plane, or
    /// another edgelb instance balances there. Said apart from [`DataplaneError::Held`], whose
    /// "another tool's program" would send the operator looking for the wrong culprit.
    #[error(
        "`{interface}` already runs edgelb's own XDP balancer (program id {prog_id}){found}, not through a link pinned in this node.pin_dir ({pin_dir}) ({mode} attach: {error}). Likely node.pin_dir was changed while that data plane ran (a controller stopped with --detach, or still running), or another edgelb instance balances on this interface. To move to this pin_dir, remove the old data plane first (`edgelb stop` with the config that names the old pin_dir; removing its link pin detaches it), or set node.pin_dir back; for another instance, give each its own interfaces"
    )]
    HeldByEdgelb {
        /// Interface name.
        interface: String,
        /// Mode tried.
        mode: &'static str,
        /// The attached program's id.
        prog_id: u32,
        /// Where its link is pinned, as words for the message (", its link pinned at ...").
        found: String,
        /// This process's pin directory.
        pin_dir: String,
        /// Cause.
        error: std::io::Error,
    },
    /// Attaching to an interface failed.
    #[error("attaching XDP to `{interface}` ({mode}) failed: {}", crate::error_chain(error))]
    Attach {
        /// Interface name.
        interface: String,
        /// Mode tried.
        mode: &'static str,
        /// Cause.
        error: ProgramError,
    },
    /// Something done to a pin or to the pin directory failed: pinning a map or a link,
    /// removing or moving a pin, listing or preparing the directory (bpffs not mounted, say).
    /// `step` says which, so that a removal or a missing bpffs is not reported as "pinning".
    #[error("{step} {path}: {reason}")]
    Pin {
        /// What was being done, as the message says it ("pinning to", "removing the pin").
        step: &'static str,
        /// The pin, or the pin directory.
        path: std::path::PathBuf,
        /// Cause.
        reason: String,
    },
    /// A pinned map could not be read while deciding whether to adopt it (out of descriptors
    /// or memory, say, or something that is no map pinned under a map's name). Taken for a map
    /// of another layout, it had a start drop the connection table without a word of why.
    #[error(
        "reading the pinned map {path} failed ({}): nothing was adopted or replaced. A start that could not tell its layout would have made every map fresh, the connection table with them; is this process out of descriptors or memory (a retry adopts it), or is something other than edgelb's map pinned there?",
        crate::error_chain(error)
    )]
    PinUnreadable {
        /// The pin.
        path: PathBuf,
        /// Cause.
        error: MapError,
    },
    /// The connection tables pinned at another size could not be copied into this start's (a
    /// memory map of either refused: out of memory or address space, say). Nothing was
    /// replaced: the running data plane keeps forwarding with its tables.
    #[error(
        "copying the connection table pinned at {path} into one of this start's size failed ({error}): nothing was replaced; a retry may copy it, or `node.conntrack_flows_per_cpu` set back to the pinned size adopts it as it is"
    )]
    TableCopy {
        /// The pinned table.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// An entry of an adopted map that no edgelb of this build writes (a rollback to a build of
    /// another ring layout, an entry written by hand): the controller's view cannot be rebuilt
    /// from it. A start then makes every map fresh rather than adopt it.
    #[error("pinned map `{map}`, entry {entry}: {reason}")]
    PinnedEntry {
        /// Map name.
        map: &'static str,
        /// The entry, as words for the message.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// More VIPs or backends than the maps hold.
    #[error("{0}")]
    Capacity(String),
    /// No network interface of that name in this namespace.
    #[error("no network interface `{0}` here (`ip link` lists them)")]
    NoInterface(String),
    /// Looking up a network interface failed for another reason than its absence: the lookup
    /// opens a socket, and fails for want of descriptors or memory whether the interface is
    /// there or not. Taken for "no such interface", it had a start refuse a healthy interface,
    /// or pins follow a rename that never happened.
    #[error(
        "looking up network interface {interface} failed ({error}); whether it is there could not be told: the lookup needs a socket, is this process out of descriptors or memory?"
    )]
    Lookup {
        /// The interface, as words for the message (`` `eth0` ``, "of index 7").
        interface: String,
        /// Cause.
        error: std::io::Error,
    },
    /// The link pin `edgelb decap` would replace or remove holds something other than the
    /// decapsulator: with `--pin-dir` at a balancer's pin directory, the balancer's own link,
    /// which a decap attach would have turned into a decapsulator and a detach removed.
    #[error(
        "{path} holds {holds}, not edgelb's decapsulator (`{decap}`): left alone. Is --pin-dir another program's pin directory (a balancer's node.pin_dir)? Give the decapsulator a directory of its own (the default is {DECAP_PIN_DIR})",
        decap = programs::DECAP
    )]
    NotDecapPin {
        /// The pin.
        path: PathBuf,
        /// What it holds, as words for the message.
        holds: String,
    },
    /// The decapsulator pinned under the interface's name runs on another interface: bpffs is
    /// one for every network namespace, so the same pin directory names the interfaces of
    /// every namespace alike, and replacing that link would have changed another namespace's
    /// decapsulator (and left this interface without one).
    #[error(
        "{path} is the decapsulator of {whose} (link ifindex {ifindex}, program id {prog_id}), not of `{interface}` in this network namespace: left alone. bpffs is shared by all network namespaces and the pin is named by the interface's name only, so give each namespace a pin directory of its own (e.g. --pin-dir {DECAP_PIN_DIR}-<namespace>)"
    )]
    DecapElsewhere {
        /// The pin.
        path: PathBuf,
        /// The interface asked for.
        interface: String,
        /// Where the pinned link runs, as words for the message.
        whose: String,
        /// The interface index the link holds (in the namespace it runs in).
        ifindex: u32,
        /// The decapsulator's program id.
        prog_id: u32,
    },
    /// A link pinned in `node.pin_dir` is not the balancer's: the directory is shared with
    /// something else (the decapsulator's `--pin-dir`, another tool), whose program a start
    /// would have replaced with the balancer.
    #[error(
        "{path} holds {holds}, not edgelb's balancer (`{balancer}`): nothing was adopted or replaced. node.pin_dir must be a directory of the balancer's own (is it `edgelb decap`'s --pin-dir?)",
        balancer = programs::BALANCER
    )]
    NotBalancerPin {
        /// The pin.
        path: PathBuf,
        /// What it holds, as words for the message.
        holds: String,
    },
    /// The pin directory holds another network namespace's data plane: bpffs is one for every
    /// namespace, so the same `node.pin_dir` names the same pins in each. Adopting it would
    /// have written this config into that data plane's maps and put this program on that
    /// namespace's interface through its link, leaving this one's without XDP.
    #[error(
        "{path} is the balancer's XDP link on an interface in another network namespace (likely its `{interface}`; link ifindex {ifindex}, program id {prog_id}), so {dir} is that namespace's data plane (its maps and links): nothing was adopted or replaced. bpffs is shared by all network namespaces: give each namespace's edgelb a node.pin_dir of its own (e.g. {dir}-<namespace>)",
        dir = dir.display()
    )]
    BalancerElsewhere {
        /// The pin.
        path: PathBuf,
        /// The interface its name gives.
        interface: String,
        /// The interface index the link holds (in the namespace it runs in).
        ifindex: u32,
        /// The balancer's program id.
        prog_id: u32,
        /// The pin directory.
        dir: PathBuf,
    },
    /// After an attach, the kernel does not report the program just attached on the interface.
    #[error(
        "the kernel reports {found} on `{interface}` just after the decapsulator (program id {prog_id}) was attached to it; `ip -d link show {interface}` shows what runs there"
    )]
    NotAttached {
        /// Interface name.
        interface: String,
        /// The program that was attached.
        prog_id: u32,
        /// What the kernel reports instead, as words for the message.
        found: String,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |error| DataplaneError::Map { name, error }
}

/// What user space remembers about a VIP's slot in the maps.
struct VipSlot {
    index: u32,
    /// Which of the two ring regions is live.
    active: usize,
    /// What each region holds (backend ids), as last written; `None` when unknown (adopted from
    /// a previous process), which makes the next write to that region a full one.
    regions: [Option<Vec<u32>>; 2],
    meta: VipMeta,
}

/// Summary of one [`Dataplane::apply`], for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Ring slots written.
    pub ring_slots_written: usize,
    /// VIPs added.
    pub vips_added: usize,
    /// VIPs removed.
    pub vips_removed: usize,
    /// VIP entries (re)published; one rewritten in both passes of a two-pass apply counts once.
    pub vips_updated: usize,
    /// Backends added.
    pub backends_added: usize,
    /// Backends retired.
    pub backends_removed: usize,
    /// Backend entries rewritten in place (MAC changed).
    pub backends_updated: usize,
    /// Backends parked: down, their id and counters kept for their return.
    pub backends_parked: usize,
    /// Parked backends back in their pool.
    pub backends_restored: usize,
    /// Applied in two passes, short of backend entries (see [`Dataplane::apply_keeping`]). The
    /// counts cover both (a ring slot written in each counts twice, a VIP entry once), and the
    /// words say so: the reply to a reload explains its numbers.
    pub two_passes: bool,
}

impl ApplyReport {
    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        *self == ApplyReport::default()
    }
}

/// What was written, in words (`1 backend added, 300 ring slots written`; `no change`), for
/// logs and the reply to a reload: an operator reads them, not a debug dump.
impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let parts: Vec<String> = [
            (self.vips_added, "VIP added", "VIPs added"),
            (self.vips_removed, "VIP removed", "VIPs removed"),
            (self.vips_updated, "VIP entry rewritten", "VIP entries rewritten"),
            (self.backends_added, "backend added", "backends added"),
            (self.backends_removed, "backend removed", "backends removed"),
            (self.backends_updated, "backend entry rewritten", "backend entries rewritten"),
            (self.backends_parked, "backend parked (down)", "backends parked (down)"),
            (self.backends_restored, "backend restored", "backends restored"),
            (self.ring_slots_written, "ring slot written", "ring slots written"),
        ]
        .into_iter()
        .filter(|(n, _, _)| *n > 0)
        .map(|(n, one, many)| format!("{n} {}", if n == 1 { one } else { many }))
        .collect();
        f.write_str(&parts.join(", "))?;
        if self.two_passes {
            f.write_str(" (applied in two passes; the counts cover both)")?;
        }
        Ok(())
    }
}

/// Sums the passes of one apply (see [`Dataplane::apply_keeping`]).
impl std::ops::AddAssign for ApplyReport {
    fn add_assign(&mut self, other: ApplyReport) {
        self.ring_slots_written += other.ring_slots_written;
        self.vips_added += other.vips_added;
        self.vips_removed += other.vips_removed;
        self.vips_updated += other.vips_updated;
        self.backends_added += other.backends_added;
        self.backends_removed += other.backends_removed;
        self.backends_updated += other.backends_updated;
        self.backends_parked += other.backends_parked;
        self.backends_restored += other.backends_restored;
        self.two_passes |= other.two_passes;
    }
}

/// A backend entry is owned by one VIP: health and drain are per VIP.
type BackendKey = (VipKey, IpAddr);

/// Backend entries a config needs beyond those the maps hold for it, and those free for them
/// without a pass of its own: free now, or held by the VIPs it removes.
struct Room {
    needed: usize,
    free: usize,
}

/// The least share, in percent, of the weight a VIP's pool will have (once the reload is
/// applied) that the backends it keeps must carry for [`Dataplane::freeing_pass`] to give it a
/// reduced ring. Between the two passes its new flows, and the leavers' flows re-hashed, all
/// land on those backends, and the connection table keeps them there after the second pass (a
/// long-lived UDP flow, syslog or SIP, for as long as it lasts): a VIP keeping 1 of 128
/// backends would pour a whole pool's new flows onto one. Below half, its reduced ring would
/// more than double the new flows each kept backend takes, so the VIP is left as it is in the
/// first pass and its leavers are not counted as room (the reload may then be refused, saying
/// what to do).
const FREEING_PASS_MIN_KEPT_WEIGHT_PERCENT: u64 = 50;

/// The first pass of an apply short of backend entries (see [`Dataplane::freeing_pass`]).
struct FreeingPass {
    /// The effective config of the pass.
    cfg: Config,
    /// The configured one it was made from: its down backends are parked, as in any apply.
    configured: Config,
    /// VIPs the pass leaves as they are: every VIP it keeps but those it gives a reduced ring.
    frozen: HashSet<VipKey>,
    /// Backend entries it retires (besides those of the VIPs removed).
    leaving: usize,
}

/// The loaded balancer and the controller's view of its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    pins: Option<PathBuf>,
    vips: HashMap<VipKey, VipSlot>,
    backend_ids: HashMap<BackendKey, u32>,
    backends: Vec<Option<Backend>>,
    generations: Vec<u32>,
    /// VIP addresses and their `lb_common::addr_flags`, as written in `VIP_ADDRS`.
    addrs: BTreeMap<([u32; 4], u8), u32>,
    config: Option<GlobalConfig>,
    attached: Vec<(String, &'static str)>,
    /// The ifindex each attached interface had when attached (0: unknown).
    ifindexes: Vec<u32>,
    /// The XDP link of each attached interface, held open for this process's lifetime (`None`
    /// without a pin directory, where aya's program keeps it). A pinned link is detached only
    /// once its pin is removed *and* every descriptor of it is closed: held here, a pin removed
    /// by hand (`rm <pin_dir>/link-<interface>`) no longer takes XDP off the interface, and
    /// [`Dataplane::repin_links`] puts the pin back.
    links: Vec<Option<HeldLink>>,
    /// The balancer program's id: what must run on an attached interface for it to be
    /// [`InterfaceState::Attached`].
    prog_id: u32,
    adopted: bool,
    shape: TableShape,
    /// What the load found under the pin directory ([`Dataplane::pins_found`]).
    pins_found: PinsFound,
    /// A copy of the connection tables into another size not yet logged: it is logged once
    /// this process's maps are published ([`Dataplane::publish_pins`]), so that a takeover
    /// that fails before its commit does not say that it resized the tables.
    resize_unsaid: Option<TablesResized>,
}

/// What a load found under `node.pin_dir` and did about it ([`Dataplane::pins_found`]): a
/// start that could not carry the connection table over says so, and tests tell it apart from
/// one that did by more than the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinsFound {
    /// Maps re-used from their pins (the connection tables among them, or not).
    pub adopted: Vec<&'static str>,
    /// Maps made fresh although a data plane was pinned there: every map when none could be
    /// adopted; otherwise those whose pin alone was missing and counter maps of another
    /// layout. Empty at a first start.
    pub fresh: Vec<&'static str>,
    /// Each problem warned of: pins of another layout or version, a missing CONFIG pin, an
    /// adopted entry that made no sense.
    pub problems: Vec<String>,
    /// Connection tables pinned at another size (`node.conntrack_flows_per_cpu` changed),
    /// made at this start's size and filled from the pinned ones, and what became of their
    /// flows. The tables are then in neither `adopted` nor `fresh`.
    pub resized: Option<TablesResized>,
}

/// CPUs the connection table has a region for: every possible CPU
/// (`/sys/devices/system/cpu/possible`, as the kernel sizes per-CPU data), which on a VM may be
/// many more than those online: the tables' memory grows with it. 1 when it cannot be read.
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1, |n| n.get())
}

/// The connection tables' shape: a region of buckets per CPU, for each address family. It is
/// fixed when the program is loaded (the program learns the bucket counts as load-time
/// constants, and the maps are sized by it), so changing it takes a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableShape {
    /// CPUs with a region: every possible CPU.
    pub cpus: u32,
    /// IPv4 buckets per CPU (a power of two).
    pub v4_buckets: u32,
    /// IPv6 buckets per CPU (a power of two).
    pub v6_buckets: u32,
}

impl TableShape {
    /// The default shape on this machine: [`lb_common::CONNTRACK_V4_BUCKETS`] and
    /// [`lb_common::CONNTRACK_V6_BUCKETS`] buckets per CPU, or fewer where that would take either
    /// table past [`lb_common::CONNTRACK_BUDGET`] (see [`buckets_for`]).
    pub fn auto() -> TableShape {
        let cpus = possible_cpus();
        TableShape {
            cpus,
            v4_buckets: buckets_for(
                cpus,
                std::mem::size_of::<lb_common::ConnBucketV4>(),
                lb_common::CONNTRACK_V4_BUCKETS,
            ),
            v6_buckets: buckets_for(
                cpus,
                std::mem::size_of::<lb_common::ConnBucket>(),
                lb_common::CONNTRACK_V6_BUCKETS,
            ),
        }
    }

    /// The shape for `node.conntrack_flows_per_cpu`: that many flows per CPU in each family's
    /// table, or [`TableShape::auto`] when unset. Config validation keeps the count a power of
    /// two within [`MIN_CONNTRACK_FLOWS`]..=[`MAX_CONNTRACK_FLOWS`]; a count outside is clamped.
    pub fn for_flows(flows_per_cpu: Option<u32>) -> TableShape {
        match flows_per_cpu {
            None => TableShape::auto(),
            Some(flows) => TableShape::of_flows(flows, possible_cpus()),
        }
    }

    /// The shape for `flows_per_cpu` set on a machine of `cpus` possible CPUs (pure: the
    /// arithmetic of [`TableShape::for_flows`], and of the config's caution on the tables'
    /// memory). A count outside [`MIN_CONNTRACK_FLOWS`]..=[`MAX_CONNTRACK_FLOWS`] is clamped.
    pub fn of_flows(flows_per_cpu: u32, cpus: u32) -> TableShape {
        let flows = flows_per_cpu.clamp(MIN_CONNTRACK_FLOWS, MAX_CONNTRACK_FLOWS);
        let buckets = 1u32 << (31 - (flows / lb_common::CONNTRACK_WAYS as u32).leading_zeros());
        TableShape { cpus, v4_buckets: buckets, v6_buckets: buckets }
    }

    /// Bytes of the IPv4 table, over every CPU: kernel memory the map takes.
    pub fn v4_bytes(&self) -> u64 {
        u64::from(self.cpus)
            * u64::from(self.v4_buckets)
            * std::mem::size_of::<lb_common::ConnBucketV4>() as u64
    }

    /// Bytes of the IPv6 table, over every CPU: kernel memory the map takes.
    pub fn v6_bytes(&self) -> u64 {
        u64::from(self.cpus)
            * u64::from(self.v6_buckets)
            * std::mem::size_of::<lb_common::ConnBucket>() as u64
    }

    /// IPv4 flows each CPU's table holds.
    pub fn v4_flows_per_cpu(&self) -> u64 {
        u64::from(self.v4_buckets) * lb_common::CONNTRACK_WAYS as u64
    }

    /// IPv6 flows each CPU's table holds.
    pub fn v6_flows_per_cpu(&self) -> u64 {
        u64::from(self.v6_buckets) * lb_common::CONNTRACK_WAYS as u64
    }
}

/// Buckets per CPU for a table of `bucket`-byte buckets on `cpus` CPUs: `most`, or fewer when
/// the table would pass `lb_common::CONNTRACK_BUDGET`; a power of two, at least 1024.
pub fn buckets_for(cpus: u32, bucket: usize, most: u32) -> u32 {
    let n = (lb_common::CONNTRACK_BUDGET / bucket as u64 / u64::from(cpus.max(1)))
        .clamp(1024, u64::from(most));
    1u32 << (63 - n.leading_zeros())
}

impl Dataplane {
    /// Loads the balancer object and verifies its program (not attached yet).
    ///
    /// With `pins`, every map is pinned in that bpffs directory, or re-used from it if a previous
    /// edgelb left it there: the connection table, rings and counters then carry over, and the
    /// controller's view is rebuilt from the maps (see [`Dataplane::adopted`]).
    pub fn load(pins: Option<&Path>) -> Result<Dataplane, DataplaneError> {
        Dataplane::load_with_table(pins, TableShape::auto())
    }

    /// [`Dataplane::load`] with connection tables of `shape` (see [`TableShape::for_flows`]).
    pub fn load_with_table(
        pins: Option<&Path>,
        shape: TableShape,
    ) -> Result<Dataplane, DataplaneError> {
        let mut dp = Dataplane::load_beside(pins, shape)?;
        dp.publish_pins()?;
        Ok(dp)
    }

    /// Loads the balancer beside a running edgelb (`run --takeover`) without changing a pin:
    /// pinned maps of this build's layout are adopted (as [`Dataplane::load_with_table`] does),
    /// but only under a CONFIG pin stamped with this build's [`lb_common::MAPS_VERSION`]. A
    /// counter map of another layout is made fresh alone (`pins::counters_only`); connection
    /// tables of another size (`node.conntrack_flows_per_cpu` changed) are made at this size and
    /// filled from the pinned ones (`resize`, said in [`PinsFound::resized`], and logged by
    /// [`Dataplane::publish_pins`]);
    /// any other map of another layout, another version, no CONFIG pin, or an adopted entry
    /// that makes no sense (checked as the view is rebuilt) makes every map fresh. A map with no
    /// pin yet is made fresh too. Fresh maps are left unpinned: [`Dataplane::publish_pins`] pins
    /// them once this process has taken over, since until then the running edgelb may take
    /// back over, and its next restart must find its own maps under the pins, not this
    /// process's empty ones. A pin that cannot be read is an error
    /// ([`DataplaneError::PinUnreadable`]), the pins left as they are.
    pub fn load_beside(
        pins: Option<&Path>,
        shape: TableShape,
    ) -> Result<Dataplane, DataplaneError> {
        let Some(dir) = pins else { return Dataplane::load_object(None, shape, &[]) };
        pin_dir_ready(dir)?;
        // Before any map is adopted: a data plane pinned here for another namespace (or for an
        // interface since renamed) is not this one's to write.
        check_balancer_links(dir)?;
        let check = check_pins(dir, shape)?;
        let all: Vec<&'static str> = map_layouts(shape).iter().map(|l| l.0).collect();
        let mut found = PinsFound { problems: check.problems, ..PinsFound::default() };
        // One warning that says why and what it costs.
        let nothing_adopted = |found: &mut PinsFound, why: &str| {
            warn!(pin_dir = %dir.display(), "pinned map not re-used ({why}): nothing adopted, every map starts fresh; {FRESH_TABLES_COST}");
            found.adopted.clear();
            found.fresh.clone_from(&all);
        };
        if check.mismatched {
            let why = found.problems.join("; ");
            nothing_adopted(&mut found, &why);
            return Dataplane::load_object(Some(dir), shape, &[]).map(|dp| dp.found(found));
        }
        // Retired pins, counter maps made fresh alone.
        for problem in &found.problems {
            warn!(%problem, pin_dir = %dir.display(), "pinned map not re-used");
        }
        found.adopted = check.adopt;
        // Tables of another size are copied only into a data plane otherwise adopted.
        let resize = if found.adopted.is_empty() { Vec::new() } else { check.resize };
        let resized = |name: &&'static str| resize.iter().any(|r| r.name == *name);
        if found.adopted.is_empty() {
            // No map pinned at all: a first start, or a data plane whose XDP link alone is left.
            if link_pinned_in(dir) {
                nothing_adopted(
                    &mut found,
                    "an XDP link of a data plane is pinned, but none of its maps (their pins removed?)",
                );
            }
        } else {
            // A data plane pinned here whose other maps are taken over: each map it lacks is
            // made fresh, and what that costs is said, or the "adopted" that follows would hide
            // it. (Counter maps of another layout were named with the problems.)
            for &name in &all {
                if !found.adopted.contains(&name)
                    && !check.fresh_counters.contains(&name)
                    && !resized(&name)
                {
                    warn!(map = name, pin_dir = %dir.display(), "{}", fresh_map_warning(name));
                }
            }
            found.fresh = all
                .iter()
                .copied()
                .filter(|name| !found.adopted.contains(name) && !resized(name))
                .collect();
        }
        match Dataplane::load_object(Some(dir), shape, &found.adopted) {
            // An entry the view cannot be rebuilt from: as for maps of another layout, rather
            // than panic on it at every start (a restart loop under a service manager).
            Err(e @ DataplaneError::PinnedEntry { .. }) => {
                let why = format!("{e}, which makes no sense to this edgelb");
                nothing_adopted(&mut found, &why);
                found.problems.push(e.to_string());
                Dataplane::load_object(Some(dir), shape, &[]).map(|dp| dp.found(found))
            }
            Ok(dp) if !resize.is_empty() => {
                // Every VIP's address by its index: IPv6 entries name their VIP by index, and
                // their bucket hash is of its address.
                let v6_vips = dp
                    .vips
                    .iter()
                    .filter(|(key, _)| key.family == AF_INET6)
                    .map(|(key, slot)| (slot.index, key.addr))
                    .collect();
                info!(
                    pin_dir = %dir.display(),
                    "copying the connection tables pinned at another size (node.conntrack_flows_per_cpu changed) into tables of this start's; the old program forwards meanwhile"
                );
                let done = resize::carry_over(dir, &resize, &dp.maps, shape, &v6_vips)?;
                found.resized = Some(done);
                Ok(dp.found(found))
            }
            r => r.map(|dp| dp.found(found)),
        }
    }

    /// Loads the object, re-using the maps pinned under `dir` (`pins`) whose names `adopt`
    /// lists (as [`check_pins`] found them fit) and making the others fresh, and rebuilds the
    /// view from what the maps hold.
    fn load_object(
        pins: Option<&Path>,
        shape: TableShape,
        adopt: &[&'static str],
    ) -> Result<Dataplane, DataplaneError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pins {
            for &name in adopt {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        // One region of connection-table buckets per CPU; the program learns the region size as
        // a load-time constant.
        let TableShape { cpus, v4_buckets, v6_buckets } = shape;
        loader
            .map_max_entries(lb_common::maps::CONNTRACK_V4, cpus * v4_buckets)
            .map_max_entries(lb_common::maps::CONNTRACK, cpus * v6_buckets)
            .override_global(lb_common::globals::CT_V4_BUCKETS, &v4_buckets, true)
            .override_global(lb_common::globals::CT_V6_BUCKETS, &v6_buckets, true);
        let mut ebpf = loader.load(BALANCER_OBJ)?;
        let prog: &mut Xdp = program(&mut ebpf, programs::BALANCER)?;
        prog.load().map_err(|error| DataplaneError::Program { name: programs::BALANCER, error })?;
        let prog_id = prog
            .info()
            .map_err(|error| DataplaneError::Program { name: programs::BALANCER, error })?
            .id();
        let maps = Maps::take(&mut ebpf)?;
        let mut dp = Dataplane {
            ebpf,
            maps,
            pins: pins.map(Path::to_owned),
            vips: HashMap::new(),
            backend_ids: HashMap::new(),
            backends: vec![None; MAX_BACKENDS as usize],
            generations: vec![0; MAX_BACKENDS as usize],
            addrs: BTreeMap::new(),
            config: None,
            attached: Vec::new(),
            ifindexes: Vec::new(),
            links: Vec::new(),
            prog_id,
            adopted: false,
            shape,
            pins_found: PinsFound::default(),
            resize_unsaid: None,
        };
        if pins.is_some() {
            dp.adopt()?;
        }
        Ok(dp)
    }

    /// This data plane, with what its load found under the pin directory.
    fn found(mut self, found: PinsFound) -> Dataplane {
        self.resize_unsaid = found.resized;
        self.pins_found = found;
        self
    }

    /// What the load found under the pin directory and did about it: which maps it adopted,
    /// which it made fresh, and the problems it warned of. For tests, and for an operator's
    /// tools to tell a start that carried the connection table over from one that did not.
    pub fn pins_found(&self) -> &PinsFound {
        &self.pins_found
    }

    /// Makes the pin directory name this process's maps: pins under retired names go, and a
    /// map pinned under another map's id (another layout, or a map of a failed takeover) or not
    /// pinned at all is pinned afresh. Maps already pinned are left alone. A process loaded with
    /// [`Dataplane::load_beside`] calls it once it has taken over; [`Dataplane::reclaim`] calls
    /// it to put the pins back after a takeover that failed once it had published its own.
    /// Needs no capability (the pin directory is this user's).
    pub fn publish_pins(&mut self) -> Result<(), DataplaneError> {
        let Some(dir) = self.pins.clone() else { return Ok(()) };
        for name in lb_common::maps::RETIRED {
            remove_pin(&dir.join(name))?;
        }
        let mut replaced = 0;
        for (name, map) in self.maps.by_name() {
            let path = dir.join(name);
            let ours = map.info().map_err(map_err(name))?.id();
            if MapInfo::from_pin(&path).is_ok_and(|pinned| pinned.id() == ours) {
                continue;
            }
            // Another map's pin, or a file that is no map's.
            if path.exists() {
                remove_pin(&path)?;
                replaced += 1;
            }
            map.pin(&path).map_err(|e| DataplaneError::Pin {
                step: "pinning to",
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        if replaced > 0 {
            info!(replaced, pin_dir = %dir.display(), "map pins now name this edgelb's maps");
        }
        if let Some(done) = self.resize_unsaid.take() {
            info!(pin_dir = %dir.display(), "{}", done.message());
        }
        Ok(())
    }

    /// The connection tables' shape this program was loaded with.
    pub fn table_shape(&self) -> TableShape {
        self.shape
    }

    /// True when the maps were inherited from a previous process (hitless restart).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Reads the adopted maps again: for a process that loaded its program beside a running
    /// edgelb (`--takeover`), whose controller went on writing the maps until it handed over.
    /// Without this, the view taken at load would name the wrong live ring region and miss the
    /// backends retired since, and the first writes would go into the live region.
    pub fn refresh(&mut self) -> Result<(), DataplaneError> {
        if self.adopted { self.adopt() } else { Ok(()) }
    }

    /// Rebuilds the controller's view from what the maps hold: maps a previous process left
    /// pinned, or (after a failed takeover) maps another process wrote. Whatever view there was
    /// is dropped first.
    fn adopt(&mut self) -> Result<(), DataplaneError> {
        self.vips.clear();
        self.backend_ids.clear();
        self.backends.fill(None);
        self.generations.fill(0);
        self.addrs.clear();
        self.config = None;
        let mut vips: Vec<(VipKey, VipMeta)> = self
            .maps
            .vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(lb_common::maps::VIPS))?;
        for kv in self.maps.vips_v4.iter() {
            let (k, meta) = kv.map_err(map_err(lb_common::maps::VIPS_V4))?;
            let key =
                VipKey { addr: [k.addr, 0, 0, 0], port: k.port, proto: k.proto, family: AF_INET };
            vips.push((key, meta));
        }
        // Generations are read even from maps without a VIP (a config that removed them all):
        // the connection tables may still name those backend ids, and the next config must not
        // hand the same id out under the generation an old entry carries.
        let entries: Vec<Backend> = (0..MAX_BACKENDS)
            .map(|id| self.maps.backends.get(&id, 0))
            .collect::<Result<_, _>>()
            .map_err(map_err(lb_common::maps::BACKENDS))?;
        for (id, b) in entries.iter().enumerate() {
            backend_entry_problem(b).map_err(|reason| DataplaneError::PinnedEntry {
                map: lb_common::maps::BACKENDS,
                entry: format!("id {id}"),
                reason,
            })?;
            self.generations[id] = b.generation;
        }
        if vips.is_empty() {
            return Ok(());
        }
        // Every entry checked before it is used: one that names no ring region of its own VIP
        // (a rollback to a build of another ring layout, an entry written by hand) made the
        // arithmetic below panic at every start.
        let mut by_index: HashMap<u32, VipKey> = HashMap::new();
        for (key, meta) in vips {
            let bad = |reason: String| DataplaneError::PinnedEntry {
                map: if key.family == AF_INET {
                    lb_common::maps::VIPS_V4
                } else {
                    lb_common::maps::VIPS
                },
                entry: vip_entry_words(&key),
                reason,
            };
            let live = vip_entry_region(&key, &meta).map_err(bad)?;
            if let Some(other) = by_index.insert(meta.vip_index, key) {
                return Err(bad(format!(
                    "its VIP index {} is also that of {}",
                    meta.vip_index,
                    vip_entry_words(&other)
                )));
            }
            let mut regions = [None, None];
            if let Some(live) = live {
                let ring = maps::get_slots(&self.maps.rings, meta.ring_base, meta.ring_size)
                    .map_err(map_err(lb_common::maps::RINGS))?;
                if let Some(i) = ring.iter().position(|&id| id >= MAX_BACKENDS) {
                    return Err(DataplaneError::PinnedEntry {
                        map: lb_common::maps::RINGS,
                        entry: format!(
                            "{} (of {})",
                            meta.ring_base as usize + i,
                            vip_entry_words(&key)
                        ),
                        reason: format!(
                            "backend id {} is past the {MAX_BACKENDS} the maps hold",
                            ring[i]
                        ),
                    });
                }
                regions[live] = Some(ring);
            }
            // Without a ring, region 0 takes the next one.
            let active = live.unwrap_or(1);
            self.vips.insert(key, VipSlot { index: meta.vip_index, active, regions, meta });
        }
        // Present entries first, then parked ones whose (VIP, address) no present entry holds:
        // an older edgelb, which does not know PARKED, may have given a parked backend that came
        // back a new id and left the parked one behind. Two entries of one key would leave one
        // owned by no key, never retired nor handed out again; the one skipped is free (its
        // generation is known, so handing it out again is safe).
        for flag in [backend_flags::PRESENT, backend_flags::PARKED] {
            for (id, b) in entries.iter().enumerate() {
                if b.flags & flag == 0
                    || (flag == backend_flags::PARKED && b.flags & backend_flags::PRESENT != 0)
                {
                    continue;
                }
                let Some(key) = by_index.get(&b.vip_index) else { continue };
                let bk = (*key, words_addr(b.addr, b.family));
                if self.backend_ids.contains_key(&bk) {
                    continue;
                }
                self.backend_ids.insert(bk, id as u32);
                self.backends[id] = Some(*b);
            }
        }
        // With their values: an older edgelb wrote 1 (`addr_flags::L4`) on every address, L7
        // VIPs' included, and `apply` rewrites every value its config disagrees with.
        for kv in self.maps.vip_addrs.iter() {
            let (k, flags) = kv.map_err(map_err(lb_common::maps::VIP_ADDRS))?;
            self.addrs.insert((k.addr, k.family), flags);
        }
        self.config = Some(self.maps.config.get(&0, 0).map_err(map_err(lb_common::maps::CONFIG))?);
        self.adopted = true;
        info!(
            vips = self.vips.len(),
            backends = self.backend_ids.len(),
            "adopted pinned data-plane state"
        );
        Ok(())
    }

    /// The balancer program, for BPF_PROG_TEST_RUN.
    pub fn balancer(&mut self) -> &mut Xdp {
        program(&mut self.ebpf, programs::BALANCER).expect("checked at load")
    }

    /// The maps, for counters and inspection.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Mutable maps, for tests that stage connection-table state.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Interfaces attached so far and the mode each got.
    pub fn attached(&self) -> &[(String, &'static str)] {
        &self.attached
    }

    /// Attaches the balancer to `interface` (by name, in the calling thread's network
    /// namespace). Auto mode tries native first and falls back to generic with a warning.
    ///
    /// With a pin directory, an XDP link a previous edgelb pinned there is taken over and its
    /// program replaced atomically (no packet sees an interface without a program); a new link is
    /// pinned so that the next process can do the same. Returns the mode XDP runs in: for a link
    /// taken over, the one it was attached in, as the kernel reports it (`status` shows it).
    /// Link pins follow interface renames first ([`follow_renames`]).
    pub fn attach(
        &mut self,
        interface: &str,
        mode: XdpAttachMode,
    ) -> Result<&'static str, DataplaneError> {
        // The device, to tell later whether XDP is still on it ([`Dataplane::interface_states`]),
        // and which link pins are this process's ([`Dataplane::remove_unused_links`]): asked
        // before anything is touched, so that a lookup that cannot tell stops the attach here.
        let device = ifindex(interface).map_err(lookup_failed(interface))?;
        if let Some(dir) = &self.pins {
            follow_renames(dir, interface)?;
        }
        let pin = self.pins.as_deref().map(|d| link_pin(d, interface));
        let prog = program(&mut self.ebpf, programs::BALANCER)?;
        let (used, took_over, link) = attach_pinned(prog, interface, mode, pin.as_deref())?;
        // A link taken over keeps the mode it was attached in; a config that asks for another
        // one gets it only after `edgelb stop` (which detaches) and a start.
        if took_over && mode_differs(mode, used) {
            warn!(interface, running = used, configured = ?mode, "the pinned XDP link runs in another mode than node.xdp_mode asks; `edgelb stop` (which detaches) and a start attach in the configured one");
        }
        // Whether GRO is on here matters only to VIPs that encapsulate: the controller says so
        // (`controller::links::gro_warnings`), knowing the config.
        self.attached.push((interface.to_owned(), used));
        self.ifindexes.push(device.unwrap_or(0));
        self.links.push(link.map(HeldLink::new));
        Ok(used)
    }

    /// Lets go of the XDP links this process holds open (their pins keep them attached): at a
    /// stop that removes the data plane, whose pins then go, and once a takeover's new process
    /// has the data plane, so that a link it unpins (an interface its config drops) is detached
    /// then rather than when this process exits.
    pub fn release_links(&mut self) {
        self.links.iter_mut().for_each(|l| *l = None);
    }

    /// Pins again, as `link-<interface>`, the XDP link of each attached interface whose pin is
    /// gone (removed by hand) while the link still holds its device: held open by this process,
    /// it stayed attached, but the next start would not find it, and would attach afresh (not
    /// hitlessly) or fail. Logged as a warning; a pin that cannot be made again, or a link whose
    /// device cannot be read, is an error, logged once.
    ///
    /// Called each second, it costs a `stat` of each pin while they are there, and the fdinfo of
    /// the link's own descriptor when one is gone ([`HeldLink::device`]). After a failure, it
    /// is not tried again until the pin directory changes (one `stat` of it: made again after
    /// `rm -r`, an entry added or removed, its mode or owner changed): listing `/proc/self/fd`
    /// for each try, as this once did, took most of each second on an L7 node holding 100k
    /// descriptors. With `again`, those are tried too (once, when it matters: before a handover,
    /// whose new process takes the links over through their pins, and at a detached stop,
    /// after which only the pins keep the links). Needs no capability (the pin directory is
    /// this user's).
    pub fn repin_links(&mut self, again: bool) {
        let Some(dir) = self.pins.clone() else { return };
        // Looked at once per call, and only if some pin is gone.
        let mut dir_now = None;
        for ((interface, _), held) in self.attached.iter().zip(&mut self.links) {
            let Some(held) = held else { continue };
            let pin = link_pin(&dir, interface);
            if std::fs::symlink_metadata(&pin).is_ok() {
                held.failed_at = None;
                held.pin_error_logged = false;
                continue;
            }
            let now = *dir_now.get_or_insert_with(|| DirStamp::of(&dir));
            if held.failed_at == Some(now) && !again {
                continue;
            }
            // A link whose device is gone (deleted, or its link detached) is not pinned again:
            // it runs nowhere, and the interface is reported lost.
            match held.device() {
                Ok(0) => continue,
                Ok(_) => held.device_error_logged = false,
                Err(e) => {
                    if !std::mem::replace(&mut held.device_error_logged, true) {
                        error!(interface, error = %e, "the XDP link's pin was removed, and the device its link holds cannot be read: it is not pinned again (XDP stays attached while this edgelb runs, but a restart will not take the link over); tried again when the pin directory changes");
                    }
                    held.failed_at = Some(now);
                    continue;
                }
            }
            match held.pin(&pin) {
                Ok(()) => {
                    warn!(interface, pin = %pin.display(), "the XDP link's pin was removed; pinned it again (the link stayed attached: this edgelb holds it open)");
                    held.failed_at = None;
                    held.pin_error_logged = false;
                }
                Err(e) => {
                    if !std::mem::replace(&mut held.pin_error_logged, true) {
                        error!(interface, error = %e, "the XDP link's pin was removed and could not be made again: XDP stays attached while this edgelb runs, but a restart will not take the link over; tried again when the pin directory changes");
                    }
                    held.failed_at = Some(now);
                }
            }
        }
    }

    /// The attached interfaces whose XDP link this process holds open, still on its device, but
    /// which is not pinned (its pin removed, and not made again: [`Dataplane::repin_links`]):
    /// XDP leaves them when this process exits, as only a pin keeps a link after it. One whose
    /// device cannot be read is among them (it may hold one).
    pub fn unpinned_links(&mut self) -> Vec<String> {
        let Some(dir) = self.pins.clone() else { return Vec::new() };
        let held = self.attached.iter().zip(&mut self.links);
        held.filter_map(|((interface, _), held)| {
            let held = held.as_mut()?;
            if std::fs::symlink_metadata(link_pin(&dir, interface)).is_ok() {
                return None;
            }
            (held.device() != Ok(0)).then(|| interface.clone())
        })
        .collect()
    }

    /// Attaches the balancer again to `interface`, one of those attached whose device no longer
    /// runs it ([`InterfaceState::Lost`]: deleted and made again, its link detached), now the
    /// device of index `ifindex` (looked up by the caller, see [`interface_index`]): by that index,
    /// in `mode`, the program this process holds. Its link is held open, and pinned as
    /// `link-<interface>` in place of the dead link pinned there; a pin holding a live device is
    /// left alone, and the link then stays unpinned (warned of). Returns the mode XDP runs in.
    ///
    /// No capability is needed since Linux 5.19, where `kernel.unprivileged_bpf_disabled` gates
    /// only the loading of programs and the making of maps (commit c8644cd0efe7): a process
    /// holding a loaded program's descriptor may make a link of it, with `BPF_LINK_CREATE`,
    /// after it dropped its capabilities, as the controller has by then. Older kernels refuse
    /// it (EPERM): the error names that, and a restart attaches.
    pub fn reattach(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: XdpAttachMode,
    ) -> Result<&'static str, DataplaneError> {
        let Some(at) = self.attached.iter().position(|(i, _)| i == interface) else {
            return Err(DataplaneError::NoInterface(interface.to_owned()));
        };
        let pin = self.pins.as_deref().map(|d| link_pin(d, interface));
        let prog = program(&mut self.ebpf, programs::BALANCER)?;
        let (used, id) = attach_xdp(prog, interface, Some(ifindex), mode)?;
        let link = match &pin {
            Some(pin) => {
                let pin_err = |reason: String| DataplaneError::Pin {
                    step: "pinning to",
                    path: pin.clone(),
                    reason,
                };
                let link = prog.take_link(id).map_err(|e| pin_err(e.to_string()))?;
                let link = FdLink::try_from(link)
                    .map_err(|e| pin_err(format!("{e} (netlink-attached XDP cannot be pinned)")))?;
                let mut link = HeldLink::new(link);
                repin_after_reattach(&mut link, pin, interface);
                Some(link)
            }
            // Without a pin directory, the program keeps the link, as at a start.
            None => None,
        };
        self.attached[at].1 = used;
        self.ifindexes[at] = ifindex;
        // The dead link goes with its descriptor.
        self.links[at] = link;
        Ok(used)
    }

    /// Where each attached interface stands now ([`InterfaceState`]), looked up in the calling
    /// thread's network namespace: in one pass, so that the controller sees every interface
    /// as it was at one moment, and keeps the last state of one that could not be told.
    pub fn interface_states(&self) -> Vec<(String, InterfaceState)> {
        self.attached
            .iter()
            .zip(&self.ifindexes)
            .map(|((name, _), &was)| (name.clone(), interface_state(name, was, self.prog_id)))
            .collect()
    }

    /// The attached interfaces that XDP is no longer on ([`InterfaceState::Lost`]). One whose
    /// state could not be told is not among them.
    pub fn lost_interfaces(&self) -> Vec<String> {
        let states = self.interface_states().into_iter();
        states.filter(|(_, s)| matches!(s, InterfaceState::Lost)).map(|(name, _)| name).collect()
    }

    /// The attached interfaces renamed since, each with its new name
    /// ([`InterfaceState::Renamed`]). One whose state could not be told is not among them.
    pub fn renamed_interfaces(&self) -> Vec<(String, String)> {
        let states = self.interface_states().into_iter();
        states
            .filter_map(|(name, s)| match s {
                InterfaceState::Renamed(now) => Some((name, now)),
                _ => None,
            })
            .collect()
    }

    /// Takes the data plane back after an `edgelb run --takeover` that failed after it began
    /// writing the maps: this program goes back on every interface it was attached to, through
    /// the pinned links (atomically, as at a restart), a link the failed process pinned for an
    /// interface this one does not use is removed (which detaches its program), and the view of
    /// the maps is rebuilt from what they hold now, so that the next [`Dataplane::apply`] writes
    /// every difference. Needs no capability: links and maps are reached through their pins and
    /// descriptors. Maps the failed process pinned in place of these (another layout) are
    /// replaced by this program's own again ([`Dataplane::publish_pins`]), so that the next
    /// restart adopts the maps that were forwarding, not that process's.
    pub fn reclaim(&mut self) -> Result<(), DataplaneError> {
        let Some(dir) = self.pins.clone() else { return Ok(()) };
        let prog = program(&mut self.ebpf, programs::BALANCER)?;
        // Every interface it can, the others named: one link that cannot be reclaimed (its
        // interface gone, its pin removed by the failed process) must not leave the rest with
        // that process's program.
        let mut first_error = None;
        let attached = self.attached.iter().zip(&self.ifindexes).zip(&mut self.links);
        for (((interface, _), &device), held) in attached {
            // By the device the link holds first: the failed process may have moved the pin
            // under the interface's new name (`follow_renames`), and pinned a link of another
            // device under the old one. By name where the device is not known.
            let pin = link_pin_holding(&dir, device).unwrap_or_else(|| link_pin(&dir, interface));
            match replace_program(prog, &pin, interface) {
                // The link now forwarding through this program: the one to hold.
                Ok(link) => *held = Some(HeldLink::new(link)),
                Err(e) => {
                    error!(interface, error = %e, "could not put this edgelb's program back");
                    first_error.get_or_insert(e);
                }
            }
        }
        for interface in self.remove_unused_links()? {
            warn!(interface, "removed the XDP link a failed takeover left");
        }
        if let Err(e) = self.publish_pins() {
            error!(error = %e, "could not pin this edgelb's maps again (a restart would not adopt them)");
            first_error.get_or_insert(e);
        }
        self.adopt()?;
        first_error.map_or(Ok(()), Err)
    }

    /// Is some XDP link pinned in this data plane's pin directory: was a data plane running
    /// here before this process, even one whose maps it could not adopt (another layout or
    /// table size)? Such a link forwards with or without this process.
    pub fn links_pinned(&self) -> bool {
        let Some(dir) = &self.pins else { return false };
        std::fs::read_dir(dir).into_iter().flatten().flatten().any(|e| is_link_pin(&e.path()))
    }

    /// Removes the pinned XDP links of interfaces this process is not attached to (which
    /// detaches the program from them): interfaces taken out of `node.interfaces` since the
    /// previous process, or added by a takeover that failed. Returns their names.
    pub fn remove_unused_links(&mut self) -> Result<Vec<String>, DataplaneError> {
        let Some(dir) = self.pins.clone() else { return Ok(Vec::new()) };
        let entries = std::fs::read_dir(&dir).map_err(|e| DataplaneError::Pin {
            step: "listing the pin directory",
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let mut removed = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let Some(interface) = name.strip_prefix("link-") else { continue };
            // A link holding a device this process attached is its own, whatever its pin is
            // called now (moved with a rename by a takeover that then failed), and one holding
            // another device is not, whatever its name. By name where the device is not known.
            let ours = match pinned_link_device(&path) {
                Some(d) if d != 0 => self.ifindexes.contains(&d),
                _ => self.attached.iter().any(|(i, _)| i == interface),
            };
            if !ours {
                std::fs::remove_file(&path).map_err(|e| DataplaneError::Pin {
                    step: "removing the pin",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                removed.push(interface.to_owned());
            }
        }
        Ok(removed)
    }

    /// Removes everything edgelb pinned in `dir`: XDP links (which detaches the programs) and
    /// maps, then the directory. Files edgelb did not pin are left alone (`node.pin_dir` may
    /// name a directory other tools use), and returned; the directory then stays. Missing files
    /// are fine; used by `edgelb stop` and tests.
    pub fn teardown(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let (mine, others) = Dataplane::pins_in(dir)?;
        // Links first, so no program runs with half its maps gone.
        let (links, maps): (Vec<PathBuf>, Vec<PathBuf>) =
            mine.into_iter().partition(|p| is_link_pin(p));
        for f in links.iter().chain(&maps) {
            std::fs::remove_file(f)?;
        }
        if others.is_empty() && dir.exists() {
            std::fs::remove_dir(dir)?;
        }
        Ok(others)
    }

    /// What `dir` holds: edgelb's pins (XDP links and maps, by their names), and the rest.
    /// Nothing when it does not exist.
    pub fn pins_in(dir: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(e),
        };
        let ours: Vec<&str> = map_layouts(TableShape::auto())
            .iter()
            .map(|(name, ..)| *name)
            .chain(lb_common::maps::RETIRED.iter().copied())
            .collect();
        Ok(entries.flatten().map(|e| e.path()).partition(|p| {
            is_link_pin(p)
                || p.file_name().and_then(|n| n.to_str()).is_some_and(|n| ours.contains(&n))
        }))
    }

    /// Brings the maps in line with `cfg` (see the module docs for the order of writes). `cfg`
    /// is the *effective* config: the controller has already dropped dead backends and zeroed
    /// drained ones. Backends it leaves out are retired (see [`Dataplane::apply_keeping`] for
    /// dead backends that are still configured).
    pub fn apply(&mut self, cfg: &Config) -> Result<ApplyReport, DataplaneError> {
        self.apply_keeping(cfg, cfg)
    }

    /// [`Dataplane::apply`] of the effective config `cfg`, where `configured` is the config it
    /// was made from: a backend `configured` lists but `cfg` leaves out (it is down) is parked
    /// rather than retired. Its entry is absent for the program (not PRESENT: its flows re-hash,
    /// no ring names it) but keeps its id, so its counters go on when it comes back, under a
    /// new generation (the flows its old entries named moved on while it was down). Operators
    /// read a backend's counters across its health flaps; retiring it would reset them to zero
    /// at each one, which Prometheus reads as a counter reset and `status` as lost totals.
    ///
    /// When the maps have room for `cfg`'s new backend entries only once the entries of backends
    /// leaving the VIPs it keeps are retired, it is applied in two passes (see
    /// `Dataplane::freeing_pass`): first with as few VIPs as make the room given reduced rings,
    /// without their leavers (every other VIP left as it is), then whole. Only when even that
    /// leaves too little room is it refused, before anything is written.
    pub fn apply_keeping(
        &mut self,
        cfg: &Config,
        configured: &Config,
    ) -> Result<ApplyReport, DataplaneError> {
        let live_keys: Vec<VipKey> = cfg.vips.iter().map(vip_key).collect();
        let gone: Vec<VipKey> =
            self.vips.keys().filter(|k| !live_keys.contains(k)).copied().collect();
        let room = self.room(cfg, &live_keys, &gone)?;
        // VIP indices freed by removals, an earlier pass's included (see step 0 of `write`).
        let mut freed = BTreeSet::new();
        // VIP entries rewritten, an earlier pass's included (counted once).
        let mut rewritten = HashSet::new();
        if room.needed <= room.free {
            return self.write(cfg, configured, None, &mut freed, &mut rewritten);
        }
        let first = self.freeing_pass(cfg, configured, room.needed - room.free);
        if room.needed > room.free + first.leaving {
            return Err(short_of_backend_entries(room.needed, room.free + first.leaving));
        }
        info!(
            needed = room.needed,
            free = room.free,
            leaving = first.leaving,
            reduced = first.cfg.vips.len() - first.frozen.len(),
            "backend entries short until those leaving their VIPs are retired: applying in two passes"
        );
        let mut report = self.write(
            &first.cfg,
            &first.configured,
            Some(&first.frozen),
            &mut freed,
            &mut rewritten,
        )?;
        report += self.write(cfg, configured, None, &mut freed, &mut rewritten)?;
        report.two_passes = true;
        Ok(report)
    }

    /// The first of two passes of [`Dataplane::apply_keeping`], for a config whose new backend
    /// entries fit only once `short` entries of backends leaving the VIPs it keeps are freed.
    /// Their entries can be freed only once no published ring names them, so this pass publishes
    /// reduced rings without them: VIPs `cfg` removes are removed; a few VIPs it keeps get the
    /// backends they had that `cfg` still lists (with `cfg`'s weights, VIP settings and down,
    /// parked and drained backends, decided by the same code as any apply); no new VIP nor
    /// backend is added, and every other VIP is left as it is (frozen: its VIP entry, ring and
    /// backend entries), to change in the second pass only.
    ///
    /// The VIPs given a reduced ring are as few as free `short` entries: those with the most
    /// leavers first (in config order among equals). A VIP is never one of them when that
    /// would leave it without a ring (its pool swapped whole, or what remains all down or
    /// drained), nor when the backends it keeps (alive, with weight: those its reduced ring
    /// uses) carry less than [`FREEING_PASS_MIN_KEPT_WEIGHT_PERCENT`] (half) of the weight its
    /// new pool will have. When those it may involve free fewer than `short`, `leaving` says how
    /// many they would, and the apply is refused before anything is written.
    ///
    /// For traffic, on a VIP given a reduced ring: the leavers' flows re-hash on their next
    /// packet onto the reduced ring, and the VIP's new flows land there too, on the backends it
    /// keeps, which are alive; the connection table then keeps those flows where they landed
    /// after the second pass publishes the ring with the newcomers (as any ring change keeps
    /// established flows). A VIP with `conntrack = false` has no table: its flows follow the
    /// ring, and may move twice, onto the reduced ring and then onto the whole one.
    fn freeing_pass(&self, cfg: &Config, configured: &Config, short: usize) -> FreeingPass {
        let held = |vip: &Vip| {
            let key = vip_key(vip);
            let mut kept = vip.clone();
            kept.backends.retain(|b| self.backend_ids.contains_key(&(key, b.address)));
            kept
        };
        let kept = |vip: &&Vip| self.vips.contains_key(&vip_key(vip));
        let mut first = FreeingPass {
            cfg: Config { vips: cfg.vips.iter().filter(kept).map(held).collect(), ..cfg.clone() },
            configured: Config {
                vips: configured.vips.iter().filter(kept).map(held).collect(),
                ..configured.clone()
            },
            frozen: HashSet::new(),
            leaving: 0,
        };
        // What a reduced ring retires: the VIP's entries that neither config lists.
        let listed: HashSet<BackendKey> = [cfg, configured]
            .iter()
            .flat_map(|c| c.vips.iter())
            .flat_map(|v| v.backends.iter().map(move |b| (vip_key(v), b.address)))
            .collect();
        let mut leavers: HashMap<VipKey, usize> = HashMap::new();
        for bk in self.backend_ids.keys().filter(|bk| !listed.contains(bk)) {
            *leavers.entry(bk.0).or_default() += 1;
        }
        let weight = |v: &Vip| v.backends.iter().map(|b| u64::from(b.weight)).sum::<u64>();
        // `first.cfg`'s VIPs are `cfg`'s kept ones, in the same order.
        let mut candidates: Vec<(usize, VipKey)> = Vec::new();
        for (whole, reduced) in cfg.vips.iter().filter(kept).zip(&first.cfg.vips) {
            let key = vip_key(reduced);
            let n = leavers.get(&key).copied().unwrap_or(0);
            let kept_weight = weight(reduced);
            // A VIP XDP forwards with some weight kept has a ring (`vip_ring` is `None` only
            // for L7 and for no weight): no Maglev build here just to tell.
            if n > 0
                && reduced.forwarding != Forwarding::L7
                && kept_weight > 0
                && kept_weight * 100 >= weight(whole) * FREEING_PASS_MIN_KEPT_WEIGHT_PERCENT
            {
                candidates.push((n, key));
            }
        }
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut reduced = HashSet::new();
        for (n, key) in candidates {
            if first.leaving >= short {
                break;
            }
            first.leaving += n;
            reduced.insert(key);
        }
        first.frozen =
            first.cfg.vips.iter().map(vip_key).filter(|k| !reduced.contains(k)).collect();
        first
    }

    /// Writes `cfg` into the maps (steps 0 to 6 below). `frozen` is `None` for a whole config;
    /// for the first pass of two (see [`Dataplane::freeing_pass`]) it names the VIPs left as
    /// they are (their VIP entry, ring and backend entries), and the node-wide settings and VIP
    /// addresses are left to the second pass. `freed` gathers the VIP indices this apply's
    /// passes freed, `rewritten` the VIPs whose entry they rewrote (each counted once in the
    /// reports).
    fn write(
        &mut self,
        cfg: &Config,
        configured: &Config,
        frozen: Option<&HashSet<VipKey>>,
        freed: &mut BTreeSet<u32>,
        rewritten: &mut HashSet<VipKey>,
    ) -> Result<ApplyReport, DataplaneError> {
        let mut report = ApplyReport::default();
        let live_keys: Vec<VipKey> = cfg.vips.iter().map(vip_key).collect();
        let gone: Vec<VipKey> =
            self.vips.keys().filter(|k| !live_keys.contains(k)).copied().collect();
        let no_vip = HashSet::new();
        let is_frozen = |k: &VipKey| frozen.unwrap_or(&no_vip).contains(k);

        // 0. Removed VIPs: their entries go first, then their backend entries (only their own
        // rings named those), so their indices and ids are free for what replaces them.
        // Their indices are given to a new VIP of this same reload only when no other is free:
        // a packet whose VIP lookup answered just before the removal may still read the removed
        // VIP's ring, and the program tells a backend of the VIP it serves from another VIP's by
        // the backend's VIP index (`Backend::vip_index`), which a new VIP under the same index
        // would pass.
        freed.extend(gone.iter().filter_map(|k| self.vips.get(k)).map(|s| s.index));
        for key in &gone {
            self.maps.remove_vip(key)?;
            self.vips.remove(key);
            report.vips_removed += 1;
        }
        self.retire_backends(|(k, _)| gone.contains(k), &mut report)?;

        // 1. VIP indices, then backend entries: one per (VIP, backend address).
        let mut vip_index_of: HashMap<VipKey, u32> = HashMap::new();
        for vip in &cfg.vips {
            let key = vip_key(vip);
            let index = match self.vips.get(&key) {
                Some(slot) => slot.index,
                None => {
                    let used: BTreeSet<u32> = self.vips.values().map(|s| s.index).collect();
                    let free = |i: &u32| !used.contains(i);
                    let index = (0..MAX_VIPS)
                        .find(|i| free(i) && !freed.contains(i))
                        .or_else(|| (0..MAX_VIPS).find(free))
                        .ok_or_else(no_room_for_vips)?;
                    Maps::reset_counters(&mut self.maps.vip_stats, index)
                        .map_err(map_err(lb_common::maps::VIP_STATS))?;
                    self.vips.insert(
                        key,
                        VipSlot {
                            index,
                            active: 1,
                            regions: [Some(Vec::new()), Some(Vec::new())],
                            meta: VipMeta::default(),
                        },
                    );
                    report.vips_added += 1;
                    info!(vip = %vip, index, "VIP added");
                    index
                }
            };
            vip_index_of.insert(key, index);
        }
        let mut wanted: HashMap<BackendKey, Backend> = HashMap::new();
        for vip in
            cfg.vips.iter().filter(|v| v.forwarding != Forwarding::L7 && !is_frozen(&vip_key(v)))
        {
            let key = vip_key(vip);
            for b in &vip.backends {
                let (addr, family) = addr_words(b.address);
                wanted.insert(
                    (key, b.address),
                    Backend {
                        addr,
                        generation: 0,
                        mac: b.mac.or(cfg.node.gateway_mac).unwrap_or([0; 6]),
                        family,
                        flags: backend_flags::PRESENT,
                        vip_index: vip_index_of[&key],
                    },
                );
            }
        }
        // Down backends that hold an entry: kept, parked (see `apply_keeping`) in step 6.
        let parked: HashSet<BackendKey> = configured
            .vips
            .iter()
            .filter(|v| v.forwarding != Forwarding::L7 && vip_index_of.contains_key(&vip_key(v)))
            .filter(|v| !is_frozen(&vip_key(v)))
            .flat_map(|v| v.backends.iter().map(move |b| (vip_key(v), b.address)))
            .filter(|bk| !wanted.contains_key(bk) && self.backend_ids.contains_key(bk))
            .collect();
        let mut order: Vec<&BackendKey> = wanted.keys().collect();
        order.sort_by_key(|(k, a)| (vip_index_of[k], *a));
        for bk in order {
            let id = match self.backend_ids.get(bk) {
                // Back from parking: the same id and counters, a new generation.
                Some(&id)
                    if self.backends[id as usize]
                        .is_some_and(|b| b.flags & backend_flags::PARKED != 0) =>
                {
                    self.generations[id as usize] = self.generations[id as usize].wrapping_add(1);
                    report.backends_restored += 1;
                    id
                }
                Some(&id) => id,
                None => {
                    let id = fresh_backend_id(&self.backends, &self.generations)
                        .ok_or_else(no_room_for_backends)?;
                    self.generations[id as usize] = self.generations[id as usize].wrapping_add(1);
                    Maps::reset_counters(&mut self.maps.backend_stats, id)
                        .map_err(map_err(lb_common::maps::BACKEND_STATS))?;
                    self.backend_ids.insert(*bk, id);
                    report.backends_added += 1;
                    id
                }
            };
            let entry = Backend { generation: self.generations[id as usize], ..wanted[bk] };
            if self.backends[id as usize] != Some(entry) {
                if self.backends[id as usize].is_some_and(|b| b.flags & backend_flags::PARKED == 0)
                {
                    report.backends_updated += 1;
                }
                self.maps
                    .backends
                    .set(id, &entry, 0)
                    .map_err(map_err(lb_common::maps::BACKENDS))?;
                self.backends[id as usize] = Some(entry);
            }
        }

        // 2. Node-wide settings.
        let gc = global_config(cfg);
        if frozen.is_none() && self.config != Some(gc) {
            self.maps.config.set(0, &gc, 0).map_err(map_err(lb_common::maps::CONFIG))?;
            self.config = Some(gc);
        }

        // 3. Rings into the inactive region, then publish the VIP entry.
        for vip in &cfg.vips {
            let key = vip_key(vip);
            if is_frozen(&key) {
                continue;
            }
            let ring: Vec<u32> = match vip_ring(vip) {
                Some(r) => r
                    .iter()
                    .map(|&i| self.backend_ids[&(key, vip.backends[i as usize].address)])
                    .collect(),
                None => Vec::new(),
            };
            let mut flags = 0;
            if vip.hash == HashMode::FiveTuple {
                flags |= vip_flags::HASH_5TUPLE;
            }
            if !vip.conntrack {
                flags |= vip_flags::NO_CONNTRACK;
            }
            match vip.forwarding {
                Forwarding::L2 => flags |= vip_flags::L2_DSR,
                Forwarding::L7 => flags |= vip_flags::L7,
                Forwarding::Ipip => {}
            }
            let slot = self.vips.get_mut(&key).expect("allocated in step 1");
            let mut meta = VipMeta { flags, vip_index: slot.index, ..slot.meta };
            let live = slot.meta.ring_size != 0
                && slot.regions[slot.active].as_deref() == Some(ring.as_slice());
            // The region written below, which becomes the live one once the VIP entry names it.
            let mut publish = None;
            if ring.is_empty() {
                meta.ring_size = 0;
            } else if !live {
                let target = 1 - slot.active;
                let base = lb_common::ring_region_base(slot.index, target as u32);
                let old = slot.regions[target].take();
                // Only the slots that differ, in one batch.
                let (mut keys, mut ids) = (Vec::new(), Vec::new());
                for (i, &id) in ring.iter().enumerate() {
                    if old.as_ref().and_then(|o| o.get(i)) != Some(&id) {
                        keys.push(base + i as u32);
                        ids.push(id);
                    }
                }
                maps::set_slots(&self.maps.rings, &keys, &ids)
                    .map_err(map_err(lb_common::maps::RINGS))?;
                report.ring_slots_written += keys.len();
                slot.regions[target] = Some(ring);
                publish = Some(target);
                meta.ring_base = base;
                meta.ring_size = vip.ring_size;
            }
            if meta != slot.meta {
                self.maps.put_vip(&key, &meta)?;
                slot.meta = meta;
                if rewritten.insert(key) {
                    report.vips_updated += 1;
                }
            }
            // Only now: had the VIP entry's write failed, packets would still read the other
            // region, and a view that took this one for live would write the next ring into
            // the region they read (the next apply publishes this one again instead).
            if let Some(target) = publish {
                slot.active = target;
            }
        }

        // 4. VIP addresses (for ICMP and the fragment policy), with the kinds of VIP each has:
        // new addresses, and addresses whose kinds changed (or that an older edgelb wrote). The
        // view follows each write, so a config put back after a failure rewrites what differs.
        // The first of two passes leaves them as they are: it adds no VIP, changes no VIP's
        // kind (a VIP turned L7 or back has no ring in it), and an address a removed VIP and a
        // new one share must not be missing in between.
        let wanted_addrs = if frozen.is_some() { self.addrs.clone() } else { addr_flags_of(cfg) };
        for (&(addr, family), &flags) in &wanted_addrs {
            if self.addrs.get(&(addr, family)) != Some(&flags) {
                self.maps
                    .vip_addrs
                    .insert(&AddrKey { addr, family, _pad: [0; 3] }, &flags, 0)
                    .map_err(map_err(lb_common::maps::VIP_ADDRS))?;
                self.addrs.insert((addr, family), flags);
            }
        }

        // 5. Addresses no VIP uses any more.
        let unused: Vec<([u32; 4], u8)> =
            self.addrs.keys().filter(|k| !wanted_addrs.contains_key(k)).copied().collect();
        for (addr, family) in unused {
            match self.maps.vip_addrs.remove(&AddrKey { addr, family, _pad: [0; 3] }) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(lb_common::maps::VIP_ADDRS)(e)),
            }
            self.addrs.remove(&(addr, family));
        }

        // 6. Park the entries of down backends, and retire those no VIP lists: their flows
        // re-hash on their next packet. Only now that no published ring names them: a ring
        // slot naming an absent backend drops the new flows it places.
        for bk in &parked {
            let id = self.backend_ids[bk] as usize;
            let mut entry = self.backends[id].expect("owned id");
            if entry.flags != backend_flags::PARKED {
                entry.flags = backend_flags::PARKED;
                self.maps
                    .backends
                    .set(id as u32, &entry, 0)
                    .map_err(map_err(lb_common::maps::BACKENDS))?;
                self.backends[id] = Some(entry);
                report.backends_parked += 1;
            }
        }
        self.retire_backends(
            |k| !wanted.contains_key(k) && !parked.contains(k) && !is_frozen(&k.0),
            &mut report,
        )?;
        Ok(report)
    }

    /// Refuses, before anything is written, a config the maps have no room for VIPs for; says
    /// how many backend entries it needs, and how many are free now or freed by the VIPs it
    /// removes. (Entries of backends leaving a live VIP are freed only after its new ring is
    /// published: [`Dataplane::apply_keeping`] decides what to do when those are needed too.)
    fn room(
        &self,
        cfg: &Config,
        live_keys: &[VipKey],
        gone: &[VipKey],
    ) -> Result<Room, DataplaneError> {
        let new_vips = live_keys.iter().filter(|k| !self.vips.contains_key(k)).count();
        if self.vips.len() - gone.len() + new_vips > MAX_VIPS as usize {
            return Err(no_room_for_vips());
        }
        let new_entries = cfg
            .vips
            .iter()
            .filter(|v| v.forwarding != Forwarding::L7)
            .flat_map(|v| v.backends.iter().map(move |b| (vip_key(v), b.address)))
            .filter(|k| !self.backend_ids.contains_key(k))
            .count();
        let freed = self.backend_ids.keys().filter(|(k, _)| gone.contains(k)).count();
        let free = self.backends.iter().filter(|b| b.is_none()).count();
        Ok(Room { needed: new_entries, free: free + freed })
    }

    /// Marks the backend entries `which` selects absent and frees their ids.
    fn retire_backends(
        &mut self,
        which: impl Fn(&BackendKey) -> bool,
        report: &mut ApplyReport,
    ) -> Result<(), DataplaneError> {
        let retired: Vec<(BackendKey, u32)> =
            self.backend_ids.iter().filter(|(k, _)| which(k)).map(|(k, i)| (*k, *i)).collect();
        for (bk, id) in retired {
            let mut entry = self.backends[id as usize].expect("owned id");
            entry.flags = 0;
            self.maps.backends.set(id, &entry, 0).map_err(map_err(lb_common::maps::BACKENDS))?;
            self.backends[id as usize] = None;
            self.backend_ids.remove(&bk);
            report.backends_removed += 1;
        }
        Ok(())
    }

    /// The backend a new flow gets now: the ring slot XDP indexes for it, read from the kernel's
    /// `RINGS` map in the VIP's live region, and the backend entry that slot names. `flow` is
    /// resolved against the configured VIPs; the ring is whatever the last write left (drained
    /// backends without slots, dead ones out of it, unless the VIP fails open).
    pub fn live_route(&self, flow: &RouteFlow<'_>) -> Result<IpAddr, RouteError> {
        let no = |why: &str| RouteError::NoBackend(format!("VIP {} {why}", flow.vip));
        let slot = self.vips.get(&vip_key(flow.vip)).ok_or_else(|| no("is not in the maps"))?;
        let meta = slot.meta;
        if meta.ring_size == 0 {
            return Err(no("has no backend for new flows (every one drained or weight 0)"));
        }
        let h = flow_hash(&flow.hashed_vip(), flow.client, flow.sport);
        let read = |what: &str, e: &dyn std::fmt::Display| {
            RouteError::NoBackend(format!("reading {what} of VIP {}: {e}", flow.vip))
        };
        let id = maps::get_slots(&self.maps.rings, meta.ring_base + h % meta.ring_size, 1)
            .map_err(|e| read("the ring", &e))?[0];
        let b = self.maps.backends.get(&id, 0).map_err(|e| read("the backend entry", &e))?;
        if b.flags & backend_flags::PRESENT == 0 {
            return Err(no("has a ring slot naming no present backend (a write in progress?)"));
        }
        Ok(words_addr(b.addr, b.family))
    }

    /// The live ring of `vip` as the slots each backend entry id holds
    /// ([`ring_slot_counts`]), with the ring's size; `None` when the maps give it no ring (an L7
    /// VIP, one with no backend for new flows, one not in the maps). From the ring as this
    /// process last published or adopted it, which packets read: `status` neither builds every
    /// Maglev ring again nor reads the map.
    pub fn ring_slots(&self, vip: &Vip) -> Option<(HashMap<u32, usize>, usize)> {
        let slot = self.vips.get(&vip_key(vip))?;
        if slot.meta.ring_size == 0 {
            return None;
        }
        let ring = slot.regions[slot.active].as_deref()?;
        Some((ring_slot_counts(ring), ring.len()))
    }

    /// Backend entry id of `addr` in `vip`, if it is in the maps.
    pub fn backend_id(&self, vip: &Vip, addr: IpAddr) -> Option<u32> {
        self.backend_ids.get(&(vip_key(vip), addr)).copied()
    }

    /// Whether backend entry `id` is held (by a present or a parked backend) rather than free
    /// for the next backend added: an id adopted from an older edgelb's maps must be one or the
    /// other, never held for nobody.
    pub fn backend_id_held(&self, id: u32) -> bool {
        self.backends.get(id as usize).is_some_and(Option::is_some)
    }

    /// Counter index of a VIP, if it is configured.
    pub fn vip_index(&self, vip: &Vip) -> Option<u32> {
        self.vips.get(&vip_key(vip)).map(|s| s.index)
    }

    /// Summed counters of a VIP.
    pub fn vip_counters(&self, vip: &Vip) -> Result<Counters, DataplaneError> {
        let Some(index) = self.vip_index(vip) else { return Ok(Counters::default()) };
        Maps::sum_counters(&self.maps.vip_stats, index).map_err(map_err(lb_common::maps::VIP_STATS))
    }

    /// Summed counters of one VIP's backend.
    pub fn backend_counters(&self, vip: &Vip, addr: IpAddr) -> Result<Counters, DataplaneError> {
        let Some(id) = self.backend_id(vip, addr) else { return Ok(Counters::default()) };
        Maps::sum_counters(&self.maps.backend_stats, id)
            .map_err(map_err(lb_common::maps::BACKEND_STATS))
    }
}

/// Every VIP address of `cfg` with its `lb_common::addr_flags`: `L4` when a VIP XDP balances
/// has it (fragments and the like to it are dropped), `L7` when an L7 VIP has it.
fn addr_flags_of(cfg: &Config) -> BTreeMap<([u32; 4], u8), u32> {
    let mut addrs = BTreeMap::new();
    for vip in &cfg.vips {
        let key = vip_key(vip);
        let flag = if vip.forwarding == Forwarding::L7 { addr_flags::L7 } else { addr_flags::L4 };
        *addrs.entry((key.addr, key.family)).or_insert(0) |= flag;
    }
    addrs
}

fn global_config(cfg: &Config) -> GlobalConfig {
    let (src_v4, bits) = match cfg.node.encap_source_v4 {
        Some((a, len)) => (u32::from_ne_bytes(a.octets()), 32 - len as u32),
        None => (0, 0),
    };
    let src_v6 = cfg.node.encap_source_v6.map_or([0; 4], |a| addr_words(IpAddr::V6(a)).0);
    GlobalConfig {
        src_v4,
        src_v6,
        src_v4_host_bits: bits,
        mtu: cfg.node.mtu,
        src_mac: cfg.node.src_mac.unwrap_or([0; 6]),
        _pad: [0; 2],
        maps_version: lb_common::MAPS_VERSION,
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Program { name, error: ProgramError::UnexpectedProgramType })?;
    prog.try_into().map_err(|error| DataplaneError::Program { name, error })
}

/// The maps hold no more VIPs.
fn no_room_for_vips() -> DataplaneError {
    DataplaneError::Capacity(format!("more than {MAX_VIPS} VIPs"))
}

/// The maps have no room for a config's new backend entries, even with the entries a first
/// pass may free retired (see [`Dataplane::freeing_pass`]): what it needs and has, and what to
/// do.
fn short_of_backend_entries(needed: usize, free: usize) -> DataplaneError {
    DataplaneError::Capacity(format!(
        "more than {MAX_BACKENDS} backend entries: this config needs {needed} new backend entries, with {free} free (counting those of the VIPs and backends it removes). A VIP's old entries are retired only once its new ring is published, and a VIP is never left without its pool in between, nor with less than half of its new pool's weight: a pool swapped whole, or mostly (or whose remaining backends are all down or drained), needs room for its old and new entries at once. Apply it in two steps: first a config that removes backends (or the VIPs being replaced), then one that adds the new ones"
    ))
}

/// The maps hold no more backend entries.
fn no_room_for_backends() -> DataplaneError {
    DataplaneError::Capacity(format!(
        "more than {MAX_BACKENDS} backend entries (a pool being replaced counts its old and new entries until its new ring is published)"
    ))
}

/// The free backend id to hand out next: the one handed out least often (lowest generation;
/// the lowest such id), so that reuse spreads over every free id. A connection-table entry keeps
/// only [`lb_common::CONN_GENERATION_BITS`] of its backend's generation: handing out the lowest
/// free id, as this once did, gave a rolling replacement of one backend per reload the same id
/// every time, and its generation wrapped after 4096 reloads rather than 4096 reuses of every id.
fn fresh_backend_id(backends: &[Option<Backend>], generations: &[u32]) -> Option<u32> {
    backends
        .iter()
        .zip(generations)
        .enumerate()
        .filter(|(_, (b, _))| b.is_none())
        .min_by_key(|&(i, (_, g))| (*g, i))
        .map(|(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::{
        MAX_CONNTRACK_FLOWS, MIN_CONNTRACK_FLOWS, TableShape, buckets_for, fresh_backend_id,
    };

    /// A failed attach says the syscall and its error code once, whether the chain is printed
    /// (`edgelb run`) or only the message (a reload's answer): aya keeps the code in the
    /// syscall error's `source()`.
    #[test]
    fn an_attach_error_says_the_syscall_and_its_code_once() {
        let e = super::DataplaneError::Attach {
            interface: "eth0".into(),
            mode: "native",
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            }),
        };
        let want = "attaching XDP to `eth0` (native) failed: `bpf_link_create` failed: Operation not supported (os error 95)";
        assert_eq!(e.to_string(), want);
        assert_eq!(crate::error_chain(&e), want);
    }

    /// A rolling replacement of one backend per reload spreads its ids over every free one, so
    /// a generation (of which connection-table entries keep 12 bits) wraps only after 4096
    /// reuses of every id: 5000 such reloads among 4096 ids reuse none more than twice. (The
    /// lowest free id, handed out before, took the same id every time: generation 5000.)
    #[test]
    fn backend_ids_are_reused_least_often_first() {
        let n = lb_common::MAX_BACKENDS as usize;
        let mut backends: Vec<Option<lb_common::Backend>> = vec![None; n];
        let mut generations = vec![0u32; n];
        // Ten backends stay; one more is replaced at every reload.
        let stay = lb_common::Backend::default();
        for b in &mut backends[..10] {
            *b = Some(stay);
        }
        let mut held = None;
        for _ in 0..5000 {
            let id = fresh_backend_id(&backends, &generations).expect("a free id") as usize;
            assert!(backends[id].is_none());
            generations[id] += 1;
            backends[id] = Some(stay);
            // The one it replaces is freed after the new ring is out.
            if let Some(old) = held.replace(id) {
                backends[old] = None;
            }
        }
        assert!(generations.iter().all(|&g| g <= 2), "max {:?}", generations.iter().max());
        backends.fill(Some(stay));
        assert_eq!(fresh_backend_id(&backends, &generations), None, "no room");
    }

    #[test]
    fn connection_table_fits_its_budget_on_big_machines() {
        // A few CPUs: the full table (IPv4 64-byte buckets, IPv6 128-byte buckets).
        assert_eq!(buckets_for(2, 64, 32_768), 32_768);
        assert_eq!(buckets_for(2, 128, 16_384), 16_384);
        // 128 CPUs: 128 MiB each at most, rounded down to a power of two.
        assert_eq!(buckets_for(128, 64, 32_768), 16_384);
        assert_eq!(buckets_for(128, 128, 16_384), 8_192);
        // A size that does not divide evenly rounds down: 128 MiB / 192 B / 128 CPUs = 5461.
        assert_eq!(buckets_for(128, 192, 16_384), 4_096);
        // Absurdly many: never below 1024 per CPU.
        assert_eq!(buckets_for(100_000, 64, 32_768), 1_024);
    }

    #[test]
    fn a_configured_size_gives_both_tables_that_many_flows() {
        assert_eq!(TableShape::for_flows(None), TableShape::auto());
        let small = TableShape::for_flows(Some(MIN_CONNTRACK_FLOWS));
        assert_eq!((small.v4_buckets, small.v6_buckets), (1024, 1024));
        assert_eq!(small.v4_flows_per_cpu(), u64::from(MIN_CONNTRACK_FLOWS));
        let big = TableShape::for_flows(Some(MAX_CONNTRACK_FLOWS));
        assert_eq!((big.v4_flows_per_cpu(), big.v6_flows_per_cpu()), (1 << 20, 1 << 20));
        // Past the limits (config validation refuses these): clamped.
        assert_eq!(TableShape::for_flows(Some(1)), small);
        assert_eq!(TableShape::for_flows(Some(u32::MAX)), big);
    }
}
