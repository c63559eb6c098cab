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

mod holders;
pub mod maps;
pub mod netlink;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ffi::CString,
    net::IpAddr,
    os::fd::RawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, MapInfo, MapType},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    AF_INET, AF_INET6, AddrKey, Backend, Counters, GlobalConfig, MAX_BACKENDS, MAX_RING_SIZE,
    MAX_VIPS, VipKey, VipMeta, addr_flags, backend_flags, programs, vip_flags,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{
        Config, Forwarding, HashMode, MAX_CONNTRACK_FLOWS, MIN_CONNTRACK_FLOWS, Vip, XdpAttachMode,
    },
    maglev::{ConsistentHash, Maglev, RingMember},
};
pub use holders::{Holder, pin_holders};
pub use maps::Maps;

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
    /// Pinning a link failed.
    #[error("pinning to {path}: {reason}")]
    Pin {
        /// Pin path.
        path: std::path::PathBuf,
        /// Cause.
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

/// Address words of `addr` as the data path stores them (see lb-common).
pub fn addr_words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], AF_INET6)
        }
    }
}

/// How many slots of `ring` each value (a backend's index or entry id) holds, in one pass:
/// `status` gives each backend's share of its VIP's ring from it, where a count per backend
/// (a scan of the ring for each) took O(backends x ring size), 0.7 s on the controller thread
/// at 4096 backends.
pub fn ring_slot_counts(ring: &[u32]) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for &v in ring {
        *counts.entry(v).or_insert(0) += 1;
    }
    counts
}

/// The map key of a configured VIP.
pub fn vip_key(vip: &Vip) -> VipKey {
    let (addr, family) = addr_words(vip.address);
    VipKey { addr, port: vip.port.to_be(), proto: vip.protocol.number(), family }
}

/// The ring a VIP gets for its configured backends, as indices into `vip.backends`.
pub fn vip_ring(vip: &Vip) -> Option<Vec<u32>> {
    if vip.forwarding == Forwarding::L7 {
        return None;
    }
    let members: Vec<RingMember> =
        vip.backends.iter().map(|b| RingMember::from_addr(b.address, b.weight)).collect();
    Maglev.build(&members, vip.ring_size)
}

/// The flow key the XDP program builds for a packet from `client:sport` to `vip` at `dport`.
fn flow_key(vip: &Vip, client: IpAddr, sport: u16, dport: u16) -> lb_common::FlowKey {
    let (src, family) = addr_words(client);
    let key = vip_key(vip);
    lb_common::FlowKey {
        src,
        dst: key.addr,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: key.proto,
        family,
        _pad: [0; 2],
    }
}

/// The ring hash the XDP program computes for a packet from `client:sport` to `vip` (sport only
/// matters for 5-tuple VIPs).
pub fn flow_hash(vip: &Vip, client: IpAddr, sport: u16) -> u32 {
    match vip.hash {
        HashMode::Client => {
            lb_common::hash::client_hash(&addr_words(client).0, lb_common::HASH_SEED)
        }
        HashMode::FiveTuple => lb_common::hash::five_tuple_hash(
            &flow_key(vip, client, sport, vip.port),
            lb_common::HASH_SEED,
        ),
    }
}

/// The connection-table hash of the flow `client:sport` → `vip` at `dport`, which also gives
/// the outer source address (and IPv6 flow label) of its encapsulated packets.
pub fn conn_hash(vip: &Vip, client: IpAddr, sport: u16, dport: u16) -> u32 {
    let key = flow_key(vip, client, sport, dport);
    if key.family == lb_common::AF_INET {
        lb_common::hash::flow_key_v4_hash(&key.v4(), lb_common::HASH_SEED)
    } else {
        lb_common::hash::flow_key_hash(&key, lb_common::HASH_SEED)
    }
}

/// The backend a new flow from `client` (with `sport`, for 5-tuple VIPs) gets on `vip`: the same
/// hash and ring the XDP program uses. `None` when the VIP has no backend with weight.
pub fn route(vip: &Vip, client: IpAddr, sport: u16) -> Option<&crate::config::Backend> {
    let ring = vip_ring(vip)?;
    let h = flow_hash(vip, client, sport);
    Some(&vip.backends[ring[(h % vip.ring_size) as usize] as usize])
}

/// A flow `edgelb route` asks about, resolved against a config: the VIP it reaches and the
/// fields XDP hashes. One resolution for both answers, the file's ([`RouteFlow::by_config`])
/// and the running controller's ([`Dataplane::live_route`]), so they can differ only by the
/// state the controller adds (drains, health verdicts, a reload not yet made).
#[derive(Debug, Clone)]
pub struct RouteFlow<'c> {
    /// The VIP the flow reaches, as the config lists it.
    pub vip: &'c Vip,
    /// The client, in the family XDP sees (an IPv4-mapped address is its IPv4 client).
    pub client: IpAddr,
    /// The source port (0 when the VIP hashes the client address alone).
    pub sport: u16,
    /// The destination port: the VIP's, or for an any-port VIP the one it was given with.
    pub dport: u16,
}

/// Why `edgelb route` has no answer: the question is wrong (exit 2) or the VIP places no new
/// flow (exit 1). Apart, because scripts alert on the second: a VIP that sends its clients
/// nowhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No such VIP, a client of the other family, a missing `--sport` or port, or an L7 VIP:
    /// its proxy picks a backend per request, so no flow has one to name (and nothing is wrong
    /// with the VIP).
    #[error("{0}")]
    BadQuestion(String),
    /// The VIP has no backend for new flows.
    #[error("{0}")]
    NoBackend(String),
}

impl<'c> RouteFlow<'c> {
    /// Resolves `vip` (a name, address or address:port; `proto` when a TCP and a UDP VIP share
    /// them), `client` and `sport` against `cfg`, as XDP would see such a flow.
    pub fn resolve(
        cfg: &'c Config,
        vip: &str,
        proto: Option<crate::config::Protocol>,
        client: IpAddr,
        sport: Option<u16>,
    ) -> Result<RouteFlow<'c>, RouteError> {
        let v = cfg.find_vip(vip, proto).map_err(RouteError::BadQuestion)?;
        // An any-port VIP hashed on the 5-tuple places a flow by its destination port too: the
        // one the VIP is given with.
        let mut dport = v.port;
        if v.port == 0 && v.hash == HashMode::FiveTuple {
            dport = vip.parse::<std::net::SocketAddr>().map(|sa| sa.port()).map_err(|_| {
                RouteError::BadQuestion(format!(
                    "VIP {v} serves any port and hashes the 5-tuple: give it as address:port"
                ))
            })?;
        }
        // A client written IPv4-mapped is the IPv4 client whose packets XDP hashes; one of the
        // other family never reaches the VIP at all.
        let client = client.to_canonical();
        if client.is_ipv4() != v.address.is_ipv4() {
            return Err(RouteError::BadQuestion(format!(
                "client {client} and VIP {v} are of different address families: its packets never reach this VIP"
            )));
        }
        let sport = match (sport, v.hash) {
            (Some(p), _) => p,
            (None, HashMode::FiveTuple) => {
                return Err(RouteError::BadQuestion(format!(
                    "VIP {v} hashes the 5-tuple: give the flow's source port, --sport PORT"
                )));
            }
            (None, HashMode::Client) => 0,
        };
        if v.forwarding == Forwarding::L7 {
            return Err(RouteError::BadQuestion(format!(
                "VIP {v} is L7: its proxy picks a backend per request, not per flow by an XDP ring, so `route` has no answer for it (`edgelb status` shows its backends and the requests each was sent)"
            )));
        }
        Ok(RouteFlow { vip: v, client, sport, dport })
    }

    /// The VIP as the flow hashes it: its port the flow's destination port.
    fn hashed_vip(&self) -> Vip {
        Vip { port: self.dport, ..self.vip.clone() }
    }

    /// The backend the ring of the config's weights gives the flow (no drains, no health
    /// verdicts): what `edgelb route` answers when no controller does.
    pub fn by_config(&self) -> Result<IpAddr, RouteError> {
        route(&self.hashed_vip(), self.client, self.sport).map(|b| b.address).ok_or_else(|| {
            RouteError::NoBackend(format!("VIP {} has no backend with weight", self.vip))
        })
    }
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

/// Map flags, as the kernel reports them (`bpf_map_info.map_flags`): the connection tables are
/// memory-mappable (lb-ebpf's `maps.rs`); the access flags are left out of the comparison.
const BPF_F_MMAPABLE: u32 = 1 << 10;
const BPF_F_RDONLY: u32 = 1 << 3;
const BPF_F_WRONLY: u32 = 1 << 4;
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// Every map the balancer pins, and what a pinned one must look like to be re-used: (name,
/// type, key size, value size, max entries, flags). Mirrors lb-ebpf's `maps.rs` (all maps but the
/// per-CPU VIP cache, which starts empty); a test checks it against the loaded object.
fn map_layouts(shape: TableShape) -> [(&'static str, MapType, u32, u32, u32, u32); 13] {
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

/// Makes the map pins in `dir` safe to re-use: pins under names edgelb no longer uses are
/// removed, and if any pinned map's layout differs from this build's (an upgrade that changed a
/// map), every map pin is removed so the maps start fresh and consistent. XDP link pins stay: the
/// running program keeps its old maps until the new program replaces it with
/// `bpf_link_update`, so traffic flows throughout; established flows then re-hash onto the rings
/// (which pick the same backends while the pool is unchanged). A connection table of another
/// `shape` (`node.conntrack_flows_per_cpu` changed, or the CPU count) is such a difference.
/// Returns the problems found.
pub fn reconcile_pins(dir: &Path, shape: TableShape) -> Result<Vec<String>, DataplaneError> {
    let check = check_pins(dir, shape);
    for name in lb_common::maps::RETIRED {
        remove_pin(&dir.join(name))?;
    }
    if check.mismatched {
        for (name, ..) in map_layouts(shape) {
            remove_pin(&dir.join(name))?;
        }
    }
    Ok(check.problems)
}

/// Removes the pin at `path`; absent is fine.
fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    std::fs::remove_file(path)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .map_err(|e| DataplaneError::Pin {
            path: path.to_owned(),
            reason: format!("removing: {e}"),
        })
}

/// What [`check_pins`] found in a pin directory.
struct PinCheck {
    /// One line per pin this build will not re-use (retired names included).
    problems: Vec<String>,
    /// Some pinned map has another layout (or layout version): none of them may be re-used.
    mismatched: bool,
}

/// Looks at the map pins in `dir` without changing any (see [`reconcile_pins`]): a process
/// loaded beside a running edgelb must leave that one's pins alone until it has taken over.
fn check_pins(dir: &Path, shape: TableShape) -> PinCheck {
    let mut problems = Vec::new();
    for name in lb_common::maps::RETIRED {
        if dir.join(name).exists() {
            problems.push(format!("{name}: pinned by an older edgelb, no longer used"));
        }
    }
    let mut mismatched = false;
    for (name, ty, key, value, max, flags) in map_layouts(shape) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        // Flags count too: aya refuses a pinned map whose flags differ from the object's, and
        // every start would then fail rather than start afresh. The access flags are the
        // kernel's and aya's own business.
        let found = match MapInfo::from_pin(&path) {
            Ok(info) => info.map_type().ok().map(|t| {
                let flags = info.map_flags() & !(BPF_F_RDONLY | BPF_F_WRONLY | BPF_F_RDONLY_PROG);
                (t, info.key_size(), info.value_size(), info.max_entries(), flags)
            }),
            Err(_) => None,
        };
        if found != Some((ty, key, value, max, flags)) {
            problems.push(format!(
                "{name}: pinned map is {found:?}, this edgelb needs {:?} (type, key, value, entries, flags)",
                (ty, key, value, max, flags)
            ));
            mismatched = true;
        }
    }
    // Sizes alike, the meaning may still differ: the maps say which edgelb wrote them.
    if !mismatched {
        let path = dir.join(lb_common::maps::CONFIG);
        if path.exists() {
            // 0: pinned by an edgelb that never wrote them (it stopped before its first
            // apply), so there is nothing in them to misread. (Maps from before the stamp have
            // a smaller CONFIG entry, a size mismatch above.)
            let written = pinned_maps_version(&path);
            if !matches!(written, Some(0)) && written != Some(lb_common::MAPS_VERSION) {
                problems.push(format!(
                    "the pinned maps were written under map layout version {}, this edgelb uses {}",
                    written.map_or("unknown".to_owned(), |v| v.to_string()),
                    lb_common::MAPS_VERSION
                ));
                mismatched = true;
            }
        }
    }
    PinCheck { problems, mismatched }
}

/// Whether `dir` holds the pin of an XDP link ([`is_link_pin`]).
fn link_pinned_in(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| d.flatten().any(|e| is_link_pin(&e.path())))
}

/// What it costs that the map pinned as `name` was missing from a data plane whose other maps
/// are taken over (its pin removed by hand, or by a tool): the map is made fresh, empty, and
/// the running program's one is lost once the program is replaced.
fn fresh_map_warning(name: &str) -> String {
    use lb_common::maps as n;
    let cost = match name {
        n::CONNTRACK_V4 => {
            "IPv4 connection table: established IPv4 flows are placed anew by the rings, and those whose backend the ring gives another now (the pool changed since they began) lose their connection"
        }
        n::CONNTRACK => {
            "IPv6 connection table: established IPv6 flows are placed anew by the rings, and those whose backend the ring gives another now (the pool changed since they began) lose their connection"
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
    };
    format!(
        "{name} was not pinned with the rest of the data plane (its pin removed?): made fresh; {cost}"
    )
}

/// The [`lb_common::MAPS_VERSION`] recorded in the pinned CONFIG map at `path`: `None` when it
/// cannot be read; `Some(0)` for maps pinned by an edgelb that never wrote them.
fn pinned_maps_version(path: &Path) -> Option<u32> {
    let data = aya::maps::MapData::from_pin(path).ok()?;
    let config: aya::maps::Array<_, GlobalConfig> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).ok()?;
    config.get(&0, 0).ok().map(|c| c.maps_version)
}

/// Pin file of the XDP link on `interface`.
fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{interface}"))
}

/// Is `path` the pin of an XDP link ([`link_pin`])?
fn is_link_pin(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link-"))
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
    /// pinned maps of this build's layout are adopted (as [`Dataplane::load_with_table`] does);
    /// where any differs (another layout or table size), every map is made fresh and left
    /// unpinned, and so is a map with no pin yet. [`Dataplane::publish_pins`] pins them once this
    /// process has taken over: until then the running edgelb may take back over, and its next
    /// restart must find its own maps under the pins, not this process's empty ones.
    pub fn load_beside(
        pins: Option<&Path>,
        shape: TableShape,
    ) -> Result<Dataplane, DataplaneError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pins {
            pin_dir_ready(dir)?;
            // Before any map is adopted: a data plane pinned here for another namespace (or
            // for an interface since renamed) is not this one's to write.
            check_balancer_links(dir)?;
            let check = check_pins(dir, shape);
            for problem in &check.problems {
                warn!(%problem, "pinned map not re-used (established flows re-hash once)");
            }
            if !check.mismatched {
                let mut fresh = Vec::new();
                for (name, ..) in map_layouts(shape) {
                    let path = dir.join(name);
                    if path.exists() {
                        loader.map_pin_path(name, path);
                    } else {
                        fresh.push(name);
                    }
                }
                // A data plane pinned here (some map or link of it) whose other maps are taken
                // over: each map it lacks is made fresh, and what that costs is said, or the
                // "adopted" that follows would hide it.
                if fresh.len() < map_layouts(shape).len() || link_pinned_in(dir) {
                    for name in fresh {
                        warn!(map = name, pin_dir = %dir.display(), "{}", fresh_map_warning(name));
                    }
                }
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
        };
        if pins.is_some() {
            dp.adopt()?;
        }
        Ok(dp)
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
            map.pin(&path)
                .map_err(|e| DataplaneError::Pin { path: path.clone(), reason: e.to_string() })?;
        }
        if replaced > 0 {
            info!(replaced, pin_dir = %dir.display(), "map pins now name this edgelb's maps");
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
            self.generations[id] = b.generation;
        }
        if vips.is_empty() {
            return Ok(());
        }
        let mut by_index = HashMap::new();
        for (key, meta) in vips {
            let mut regions = [None, None];
            let active = if meta.ring_size == 0 {
                1
            } else {
                let active = (meta.ring_base / MAX_RING_SIZE - meta.vip_index * 2) as usize;
                let ring = maps::get_slots(&self.maps.rings, meta.ring_base, meta.ring_size)
                    .map_err(map_err(lb_common::maps::RINGS))?;
                regions[active] = Some(ring);
                active
            };
            by_index.insert(meta.vip_index, key);
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
        // (`controller::gro_warnings`), knowing the config.
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
                let pin_err = |reason: String| DataplaneError::Pin { path: pin.clone(), reason };
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
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| DataplaneError::Pin { path: dir.clone(), reason: e.to_string() })?;
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
                let base = (slot.index * 2 + target as u32) * MAX_RING_SIZE;
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

/// Inverse of [`addr_words`].
pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(std::net::Ipv4Addr::from(words[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    }
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
        match parent_of(pid) {
            Some(parent) => pid = parent,
            None => break,
        }
    }
    Err(unreadable)
}

/// The parent of process `pid` (field 4 of /proc/PID/stat, after the command in parentheses,
/// which may itself hold spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Why bpffs is not mounted from a mount namespace of this process's own, and what to do.
fn own_mount_namespace_refusal() -> String {
    format!(
        "bpffs is not mounted on {BPFFS}, and this process runs in a mount namespace of its own (`ip netns exec`, a container, a unit with ProtectSystem= or PrivateTmp=): a bpffs mounted here would vanish with that namespace, taking the pins, and XDP with them, when edgelb exits. Mount bpffs on the host (`mount -t bpf bpf {BPFFS}`), or enter a network namespace with `nsenter --net=/run/netns/<ns>` rather than `ip netns exec`"
    )
}

/// Pins the XDP link `id` of `prog` at `pin`, and returns it, taken from `prog`: the caller
/// holds it open or lets it go (the pin keeps it attached).
fn pin_link(prog: &mut Xdp, id: XdpLinkId, pin: &Path) -> Result<FdLink, DataplaneError> {
    let pin_err = |reason: String| DataplaneError::Pin { path: pin.to_owned(), reason };
    let link = prog.take_link(id).map_err(|e| pin_err(e.to_string()))?;
    let fd: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| {
        pin_err(format!(
            "{e} (netlink-attached XDP cannot be pinned: restarts will not be hitless)"
        ))
    })?;
    let pinned = fd.pin(pin).map_err(|e| pin_err(e.to_string()))?;
    Ok(FdLink::from(pinned))
}

/// An XDP link this process holds open ([`Dataplane::links`]), with what
/// [`Dataplane::repin_links`] needs to look at it each second without listing `/proc/self/fd`:
/// the number of its descriptor, found there once, when it is stored. aya's [`FdLink`] does
/// not give its descriptor, and pinning a held link without letting go of it, or reading the
/// device it holds (its fdinfo), needs it ([`HeldLink::pin`]).
struct HeldLink {
    /// The link, held for its descriptor: closed, with the pin gone, XDP leaves the interface.
    _link: FdLink,
    /// The link's id; why it could not be read otherwise.
    id: Result<u32, String>,
    /// A descriptor of the link in this process (its own: the controller's thread is the only
    /// one to open links), as found in `/proc/self/fd`; `None` when none was. Checked by the
    /// link id its fdinfo names each time it is used, and looked for again when it no longer
    /// names this link or none was found ([`HeldLink::fdinfo`]).
    fd: Option<RawFd>,
    /// The pin directory as it was when pinning this link again last failed, or its device
    /// could not be read: not tried again until it is otherwise ([`DirStamp`]).
    failed_at: Option<DirStamp>,
    /// A failure to pin it again was logged (until it is pinned).
    pin_error_logged: bool,
    /// A failure to read its device was logged (until it is read).
    device_error_logged: bool,
}

impl HeldLink {
    /// Holds `link`, its descriptor looked for in `/proc/self/fd` (once).
    fn new(link: FdLink) -> HeldLink {
        let id = link.info().map(|i| i.id()).map_err(|e| format!("reading the link's info: {e}"));
        let fd = id.as_ref().ok().and_then(|&id| own_link_fd(id)).map(|(fd, _)| fd);
        HeldLink {
            _link: link,
            id,
            fd,
            failed_at: None,
            pin_error_logged: false,
            device_error_logged: false,
        }
    }

    /// The link's descriptor and its fdinfo, read from `/proc/self/fdinfo/<fd>` alone while
    /// the descriptor recorded still names this link (by its id); looked for again in
    /// `/proc/self/fd` otherwise, which lists every descriptor: a caller that fails does not
    /// call again until something changed ([`Dataplane::repin_links`]). An error names what
    /// could not be read.
    fn fdinfo(&mut self) -> Result<(RawFd, LinkFdinfo), String> {
        let id = self.id.clone()?;
        if let Some(fd) = self.fd {
            match std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) {
                Ok(text) => {
                    if let Some(info) = link_fdinfo(&text, id) {
                        return Ok((fd, info));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("reading /proc/self/fdinfo/{fd}: {e}")),
            }
        }
        let found = own_link_fd(id);
        self.fd = found.as_ref().map(|&(fd, _)| fd);
        found.ok_or_else(|| format!("no descriptor of link {id} found in /proc/self/fd"))
    }

    /// The device (its interface index; 0 when it is gone, or the link was detached) the link
    /// holds, from its fdinfo ([`HeldLink::fdinfo`]).
    fn device(&mut self) -> Result<u32, String> {
        let (_, info) = self.fdinfo()?;
        info.ifindex.ok_or_else(|| "the kernel does not report the device of XDP links".to_owned())
    }

    /// Pins the link at `pin` without letting go of it. aya's [`FdLink::pin`] consumes the
    /// link, and closes its descriptor when pinning fails: for a link whose pin is gone, that
    /// would detach XDP. So the link is pinned through its descriptor ([`HeldLink::fdinfo`])
    /// with `BPF_OBJ_PIN`, which needs no capability, only write access to the directory; the
    /// pin is then read back to check that it names this link.
    #[allow(unsafe_code)]
    fn pin(&mut self, pin: &Path) -> Result<(), DataplaneError> {
        use std::os::unix::ffi::OsStrExt;
        let pin_err = |reason: String| DataplaneError::Pin { path: pin.to_owned(), reason };
        let (fd, _) = self.fdinfo().map_err(pin_err)?;
        let id = self.id.clone().map_err(pin_err)?;
        let path = CString::new(pin.as_os_str().as_bytes())
            .map_err(|_| pin_err("a path with a NUL byte".to_owned()))?;
        /// The `BPF_OBJ_PIN` part of `union bpf_attr` (the kernel takes a shorter attribute and
        /// reads the rest as zeros).
        #[repr(C)]
        struct ObjAttr {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
            path_fd: i32,
            _pad: u32,
        }
        const BPF_OBJ_PIN: libc::c_long = 6;
        let attr = ObjAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd as u32,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        };
        // SAFETY: `attr` and the path it points to live until the call returns; the kernel only
        // reads them (`size_of` bytes of `attr`, the NUL-terminated path). `fd` is a descriptor of
        // the held link (its fdinfo just named it), which the borrow of `self` keeps open.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_PIN,
                &attr as *const ObjAttr,
                std::mem::size_of::<ObjAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(pin_err(format!("BPF_OBJ_PIN: {}", std::io::Error::last_os_error())));
        }
        let pinned = PinnedLink::from_pin(pin).ok().and_then(|l| FdLink::from(l).info().ok());
        if pinned.map(|i| i.id()) != Some(id) {
            let _ = std::fs::remove_file(pin);
            return Err(pin_err(format!("the pin made does not name link {id}; removed")));
        }
        Ok(())
    }
}

/// What tells whether a pin directory changed: its device, inode and change time (which a
/// change of an entry, of its mode or of its owner moves), or `None` when it is not there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirStamp(Option<(u64, u64, i64, i64)>);

impl DirStamp {
    /// `dir` as it is now: one `stat`.
    fn of(dir: &Path) -> DirStamp {
        use std::os::unix::fs::MetadataExt;
        DirStamp(std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())))
    }
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

/// Attaches `prog` to `interface`, with its link pinned at `pin` if given. A link already pinned
/// there gets `prog` in place of its program, atomically: a restart, an upgrade. Returns the
/// mode XDP runs in ("native", "generic"; for a link taken over, as the kernel reports it,
/// see [`running_mode`]), whether a pinned link was taken over, and the link, to hold open
/// (`None` without a pin: `prog` keeps it).
fn attach_pinned(
    prog: &mut Xdp,
    interface: &str,
    mode: XdpAttachMode,
    pin: Option<&Path>,
) -> Result<(&'static str, bool, Option<FdLink>), DataplaneError> {
    if let Some(pin) = pin.filter(|p| p.exists()) {
        match replace_program(prog, pin, interface) {
            Ok(link) => {
                let mode = running_mode(interface);
                info!(
                    interface,
                    mode, "took over the pinned XDP link (program replaced atomically)"
                );
                return Ok((mode, true, Some(link)));
            }
            // The link outlived its interface (deleted and made again, a driver reload): it
            // holds no device, so nothing runs through it. Its pin goes and the program is
            // attached afresh, rather than every start failing until someone removes it.
            Err(e) if lost_its_device(&e) => {
                warn!(
                    interface,
                    "the pinned XDP link's interface is gone (recreated?): attaching afresh"
                );
                std::fs::remove_file(pin).map_err(|e| DataplaneError::Pin {
                    path: pin.to_owned(),
                    reason: e.to_string(),
                })?;
            }
            Err(e) => return Err(e),
        }
    }
    let (used, id) =
        attach_xdp(prog, interface, None, mode).map_err(|e| own_program_holds(e, pin))?;
    let link = pin.map(|pin| pin_link(prog, id, pin)).transpose()?;
    Ok((used, false, link))
}

/// The label [`running_mode`] gives a mode the kernel did not report.
const UNKNOWN_MODE: &str = "unknown";

/// Does XDP run in `used` (a [`running_mode`] label) where node.xdp_mode asks for `mode`? Not
/// when the mode could not be read (already logged): a mode not known is no mismatch, and a
/// warning to stop and start again for it would send the operator after nothing.
fn mode_differs(mode: XdpAttachMode, used: &str) -> bool {
    let wanted = match mode {
        XdpAttachMode::Native => "native",
        XdpAttachMode::Generic => "generic",
        XdpAttachMode::Auto => return false,
    };
    used != UNKNOWN_MODE && used != wanted
}

/// The mode XDP runs in on `interface`, as the kernel reports it (rtnetlink, see
/// [`netlink::xdp_attachment`]): a link taken over from a previous process says which
/// interface it is on but not in which mode, and `status` must not guess. [`UNKNOWN_MODE`]
/// (logged) when it cannot be read.
fn running_mode(interface: &str) -> &'static str {
    match ifindex(interface).and_then(|i| netlink::xdp_attachment(i.unwrap_or(0))) {
        Ok(Some(a)) => a.mode.label(),
        Ok(None) => {
            warn!(interface, "the kernel reports no XDP program on the interface just attached");
            UNKNOWN_MODE
        }
        Err(e) => {
            warn!(interface, error = %e, "could not read the XDP mode of the interface");
            UNKNOWN_MODE
        }
    }
}

/// `e` as [`DataplaneError::HeldByEdgelb`] when it is a [`DataplaneError::Held`] whose holder is
/// edgelb's own balancer (by the attached program's name, read through netlink and its program
/// info), naming where that program's link is pinned if a pin of it is found under bpffs.
/// Anything else, or a holder that cannot be looked at, stays as it was.
fn own_program_holds(e: DataplaneError, pin: Option<&Path>) -> DataplaneError {
    let DataplaneError::Held { interface, mode, error } = e else { return e };
    let Some(prog_id) = balancer_on(&interface) else {
        return DataplaneError::Held { interface, mode, error };
    };
    let found = match pinned_link_of(&interface, prog_id) {
        Some(path) => format!(", its link pinned at {}", path.display()),
        None => format!(
            ", its link pinned nowhere under {BPFFS} (held by a running process: `edgelb stop` it, or stop it by PID)"
        ),
    };
    let pin_dir = pin
        .and_then(Path::parent)
        .map_or_else(|| "none: not pinned".to_owned(), |d| d.display().to_string());
    DataplaneError::HeldByEdgelb { interface, mode, prog_id, found, pin_dir, error }
}

/// The id of edgelb's balancer program when it is the XDP program on `interface` (in this
/// network namespace, as netlink reports it, by the program's name).
/// `None` too when program names cannot be read ([`program_name`]).
fn balancer_on(interface: &str) -> Option<u32> {
    let attached = netlink::xdp_attachment(ifindex(interface).ok()??).ok().flatten()?;
    let name = program_name(attached.prog_id).ok().flatten();
    (name.as_deref() == Some(programs::BALANCER)).then_some(attached.prog_id)
}

/// The name of loaded BPF program `prog_id` (`None`: no such program, or it has none). An error
/// when program names cannot be read at all: the kernel lets only CAP_SYS_ADMIN walk program
/// ids and open programs by id, and the systemd unit (contrib/edgelb.service) does not give it,
/// so a controller under the unit must do without the name.
fn program_name(prog_id: u32) -> Result<Option<String>, ProgramError> {
    for p in aya::programs::loaded_programs() {
        match p {
            Ok(p) if p.id() == prog_id => return Ok(p.name_as_str().map(str::to_owned)),
            Ok(_) => {}
            // Not allowed (the one item yielded then); anything else is a program that went
            // between its id and its descriptor, and the walk goes on.
            Err(ProgramError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                return Err(ProgramError::SyscallError(e));
            }
            Err(_) => {}
        }
    }
    Ok(None)
}

/// edgelb's balancers running on `interfaces` with no link pinned in `pin_dir`: a data plane
/// some other pin directory holds (node.pin_dir changed since it was started), or that a
/// running process holds. Each with its program id and where its link is pinned, if anywhere
/// under bpffs. For `edgelb stop`, which finds nothing to remove in `pin_dir` and must not say
/// the balancer is gone while it runs.
pub fn balancers_elsewhere(
    interfaces: &[String],
    pin_dir: &Path,
) -> Vec<(String, u32, Option<PathBuf>)> {
    // Programs run by links pinned in `pin_dir` (under any name: a rename moves a pin) are this
    // data plane's, however deep the directory lies under bpffs.
    let own: Vec<u32> = Dataplane::pins_in(pin_dir)
        .map(|(mine, _)| mine)
        .unwrap_or_default()
        .iter()
        .filter(|p| is_link_pin(p))
        .filter_map(|p| pinned_link_program(p))
        .collect();
    let mut found: Vec<(String, u32, Option<PathBuf>)> = interfaces
        .iter()
        .filter_map(|i| {
            let prog_id = balancer_on(i)?;
            (!own.contains(&prog_id)).then(|| (i.clone(), prog_id, pinned_link_of(i, prog_id)))
        })
        .collect();
    // A link pinned nowhere may be one let go of a moment ago (a `stop` just before this one
    // removed its pin): the kernel detaches it only after a grace period.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while found.iter().any(|(_, _, pin)| pin.is_none()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        found.retain(|(i, prog_id, pin)| pin.is_some() || balancer_on(i) == Some(*prog_id));
    }
    found
}

/// The pin under bpffs (at most three directories down) of an XDP link whose program is
/// `prog_id`: where another edgelb pinned the link that holds `interface`. Named
/// `link-<interface>` first; any link pin holding that program next (a pin moved with a
/// rename names the interface by another name).
fn pinned_link_of(interface: &str, prog_id: u32) -> Option<PathBuf> {
    let mut found = pinned_links_running(prog_id);
    let name = format!("link-{interface}");
    found.sort_by_key(|p| p.file_name().and_then(|n| n.to_str()) != Some(name.as_str()));
    found.into_iter().next()
}

/// The link pins under bpffs (at most three directories down) whose link runs `prog_id`.
fn pinned_links_running(prog_id: u32) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![(PathBuf::from(BPFFS), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() && depth < 3 {
                dirs.push((path, depth + 1));
            } else if kind.is_file()
                && is_link_pin(&path)
                && pinned_link_program(&path) == Some(prog_id)
            {
                found.push(path);
            }
        }
    }
    found
}

/// The device (its interface index) the XDP link pinned at `pin` holds: 0 when its interface
/// is gone; `None` when that cannot be read (no such pin, not a link).
fn pinned_link_device(pin: &Path) -> Option<u32> {
    let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
    let id = link.info().ok()?.id();
    // Read while `link` is open: the fdinfo is that of its descriptor.
    let device = own_link_fdinfo(id)?.ifindex;
    drop(link);
    device
}

/// The link pin in `dir` whose link holds device `ifindex` (0: none looked for).
fn link_pin_holding(dir: &Path, ifindex: u32) -> Option<PathBuf> {
    if ifindex == 0 {
        return None;
    }
    let (mine, _) = Dataplane::pins_in(dir).ok()?;
    mine.into_iter().filter(|p| is_link_pin(p)).find(|p| pinned_link_device(p) == Some(ifindex))
}

/// Did replacing a pinned link's program fail because the link no longer has a device
/// (ENOLINK: its interface was deleted)?
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

fn lost_its_device(e: &DataplaneError) -> bool {
    matches!(
        e,
        DataplaneError::Attach {
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }),
            ..
        } if io_error.raw_os_error() == Some(libc::ENOLINK)
    )
}

/// Pins `link`, just attached again to `interface` ([`Dataplane::reattach`]), at `pin`: the
/// link pinned there before holds no device (its interface deleted, or it was detached) and is
/// removed first; a pin whose link holds a live device is not this data plane's to replace, and
/// is left alone, as is a failure to pin (warned of: the link stays attached, held open, and
/// [`Dataplane::repin_links`] tries again when the pin is gone).
fn repin_after_reattach(link: &mut HeldLink, pin: &Path, interface: &str) {
    if std::fs::symlink_metadata(pin).is_ok() {
        match pinned_link_device(pin) {
            Some(d) if d != 0 => {
                warn!(interface, pin = %pin.display(), ifindex = d, "XDP attached again, but its pin holds another live link: left alone, and the new link unpinned (a restart will not take it over)");
                return;
            }
            _ => {
                if let Err(e) = std::fs::remove_file(pin) {
                    warn!(interface, pin = %pin.display(), error = %e, "XDP attached again, but the dead link's pin could not be removed: the new link stays unpinned (a restart will not take it over)");
                    return;
                }
            }
        }
    }
    if let Err(e) = link.pin(pin) {
        warn!(interface, error = %e, "XDP attached again, but its link could not be pinned (a restart will not take it over)");
    }
}

/// Puts `prog` on the XDP link pinned at `pin` (for `interface`), replacing the program there
/// atomically. Returns the link, opened through its pin, to hold open.
fn replace_program(prog: &mut Xdp, pin: &Path, interface: &str) -> Result<FdLink, DataplaneError> {
    let pin_err = |reason: String| DataplaneError::Pin { path: pin.to_owned(), reason };
    let pinned = PinnedLink::from_pin(pin).map_err(|e| pin_err(e.to_string()))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(e.to_string()))?;
    let id = prog.attach_to_link(link).map_err(|error| DataplaneError::Attach {
        interface: interface.to_owned(),
        mode: "replace",
        error,
    })?;
    // Opened from a pin, it is a descriptor link: the conversion does not fail.
    let link = prog.take_link(id).map_err(|e| pin_err(e.to_string()))?;
    FdLink::try_from(link).map_err(|e| pin_err(e.to_string()))
}

/// Makes the balancer's link pins in `dir` follow interface renames before `interface` is
/// attached. A link pin is named by its interface's name, but the link holds the device: after
/// `ip link set <old> name <new>`, the program runs on under the new name while `link-<old>`
/// names it. Without this, a start naming the new interface found no pin of its name, and its
/// attach was refused (the device runs edgelb's program already); one naming a new interface
/// made under the old name had its program put on the renamed device through the old pin.
///
/// So: `link-<interface>` holding a device renamed away moves to that device's new name (where
/// its attach finds it, or [`Dataplane::remove_unused_links`] removes it when the config does not
/// name it); then, with no pin of `interface`'s name, a link pinned under another name that holds
/// `interface` moves to `link-<interface>`, and the attach replaces its program in place, keeping
/// the connection table and the traffic.
fn follow_renames(dir: &Path, interface: &str) -> Result<(), DataplaneError> {
    let pin = link_pin(dir, interface);
    let move_pin = |from: &Path, to: &Path, old: &str, new: &str| {
        if to.exists() {
            return Err(DataplaneError::Pin {
                path: from.to_owned(),
                reason: format!(
                    "its interface `{old}` is called `{new}` now, but {} is taken: remove one of the two (`edgelb stop` removes the whole data plane)",
                    to.display()
                ),
            });
        }
        std::fs::rename(from, to)
            .map_err(|e| DataplaneError::Pin { path: from.to_owned(), reason: e.to_string() })?;
        info!(from = old, to = new, "the interface was renamed: its pinned XDP link follows");
        Ok(())
    };
    if let LinkPin::Renamed { ifindex, .. } = inspect_link_pin(&pin, interface, LinkRole::Balancer)?
    {
        let new = interface_name(ifindex).map_err(|error| DataplaneError::Lookup {
            interface: format!("of index {ifindex}"),
            error,
        })?;
        let Some(new) = new else {
            return Err(DataplaneError::Pin {
                path: pin,
                reason: format!(
                    "its interface (index {ifindex}) was renamed, to a name that cannot be read"
                ),
            });
        };
        move_pin(&pin, &link_pin(dir, &new), interface, &new)?;
    }
    if pin.exists() {
        return Ok(());
    }
    let Some(here) = ifindex(interface).map_err(lookup_failed(interface))? else {
        return Ok(());
    };
    let (mine, _) = Dataplane::pins_in(dir)
        .map_err(|e| DataplaneError::Pin { path: dir.to_owned(), reason: e.to_string() })?;
    for other in mine.iter().filter(|p| is_link_pin(p)) {
        let old = pin_interface(other);
        if matches!(
            inspect_link_pin(other, &old, LinkRole::Balancer)?,
            LinkPin::Renamed { ifindex, .. } if ifindex == here
        ) {
            return move_pin(other, &pin, &old, interface);
        }
    }
    Ok(())
}

/// Where an attached interface stands, as [`Dataplane::interface_states`] finds it.
#[derive(Debug)]
pub enum InterfaceState {
    /// Its name names the device XDP was attached to, and the kernel reports this process's
    /// program on it (or that device is not known).
    Attached,
    /// The device is there under another name, this one, still running this process's program:
    /// XDP goes on balancing on it, but under a name `node.interfaces` does not give, so the
    /// operator is told to put it there (a restart then follows the rename, see
    /// [`follow_renames`]).
    Renamed(String),
    /// This process's program no longer runs on it, as the kernel reports it: deleted (a link
    /// whose device goes is detached by the kernel), deleted and made again (the name now names
    /// another device, or none, or a new device under the same index), or its link detached
    /// (`bpftool link detach`). Its VIP traffic reaches the kernel unbalanced until XDP is
    /// attached again.
    Lost,
    /// Could not be told: a lookup failed for another reason than an interface's absence (out
    /// of descriptors or memory, see [`DataplaneError::Lookup`]). Says nothing of the interface:
    /// it is as it was last seen.
    Unknown(std::io::Error),
}

/// Where the attached interface `name` stands, attached to device `was` (0: not known) with
/// program `prog_id`. The name still naming that index says little: an interface deleted and
/// made again may get the same index (`ip link add ... index N`), and a link may be detached
/// while its device stays; so the kernel is asked which program runs there (rtnetlink,
/// [`netlink::xdp_attachment`]).
fn interface_state(name: &str, was: u32, prog_id: u32) -> InterfaceState {
    if was == 0 {
        return InterfaceState::Attached;
    }
    // Whether `prog_id` runs on device `was`: no when the device is gone meanwhile (ENODEV);
    // a query that could not be made (out of descriptors: it opens a socket) tells nothing.
    let runs = || match netlink::xdp_attachment(was) {
        Ok(a) => Ok(a.is_some_and(|a| a.runs(prog_id))),
        Err(e) => no_such_interface::<()>(e).map(|_| false),
    };
    match ifindex(name) {
        Ok(Some(now)) if now == was => {
            return match runs() {
                Ok(true) => InterfaceState::Attached,
                Ok(false) => InterfaceState::Lost,
                Err(e) => InterfaceState::Unknown(e),
            };
        }
        Ok(_) => {}
        Err(e) => return InterfaceState::Unknown(e),
    }
    match interface_name(was) {
        Ok(Some(now)) => match runs() {
            Ok(true) => InterfaceState::Renamed(now),
            // Another device under that index, or the program detached from it.
            Ok(false) => InterfaceState::Lost,
            Err(e) => InterfaceState::Unknown(e),
        },
        Ok(None) => InterfaceState::Lost,
        Err(e) => InterfaceState::Unknown(e),
    }
}

/// The name of the interface of index `ifindex` in the calling thread's network namespace;
/// `None` if there is none. An error when that could not be told ([`no_such_interface`]).
#[allow(unsafe_code)]
fn interface_name(ifindex: u32) -> std::io::Result<Option<String>> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, what if_indextoname writes at most (the name and
    // its NUL); it returns NULL (nothing written that is read) when it fails.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return no_such_interface(why_no_socket(std::io::Error::last_os_error(), open_a_socket));
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(Some(name.to_string_lossy().into_owned()))
}

/// Is there a network interface called `name` in the calling thread's network namespace? Asked
/// before anything is attached, so that a misspelt interface stops edgelb before it touches the
/// data plane. An error when that could not be told ([`DataplaneError::Lookup`]).
pub fn interface_exists(name: &str) -> Result<bool, DataplaneError> {
    Ok(ifindex(name).map_err(lookup_failed(name))?.is_some())
}

/// The index of the interface called `name` in the calling thread's network namespace; `None`
/// if there is none. An error when that could not be told ([`no_such_interface`]).
#[allow(unsafe_code)]
fn ifindex(name: &str) -> std::io::Result<Option<u32>> {
    // No interface name holds a NUL.
    let Ok(name) = CString::new(name) else { return Ok(None) };
    // SAFETY: `name` is a NUL-terminated string that outlives the call, which only reads it.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => no_such_interface(why_no_socket(std::io::Error::last_os_error(), open_a_socket)),
        index => Ok(Some(index)),
    }
}

/// What the error `e` of a failed interface lookup (`if_nametoindex`, `if_indextoname`) says:
/// no such interface (`Ok(None)`) for ENODEV and ENXIO (the kernel's "no such device", and
/// what if_indextoname turns it into, as POSIX asks); otherwise `e`, nothing told. Each lookup
/// opens a socket for its ioctl, so that out of descriptors or memory it fails whether the
/// interface is there or not (glibc then says ENOENT, whose cause [`why_no_socket`] finds):
/// taken for "gone", a healthy interface was said to have lost XDP. Only the ioctl's answer
/// says an interface is not there.
fn no_such_interface<T>(e: std::io::Error) -> std::io::Result<Option<T>> {
    match e.raw_os_error() {
        Some(libc::ENODEV | libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// The real cause of a lookup's failure `e`, when glibc hides it: each lookup opens a socket
/// for its ioctl (AF_UNIX, then AF_INET, then AF_INET6), and when none opens it sets ENOENT
/// itself, whatever the sockets' errno (EMFILE out of descriptors, ENFILE, ENOMEM...). The
/// operator was told "No such file or directory" of an interface that is there. So on ENOENT
/// (which the ioctls do not give: a missing interface is ENODEV) a socket is opened as glibc
/// first tries (`open`), and its error said instead; if it opens (a descriptor was freed
/// meanwhile), `e` stays.
fn why_no_socket(e: std::io::Error, open: impl FnOnce() -> std::io::Result<()>) -> std::io::Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) => open().err().unwrap_or(e),
        _ => e,
    }
}

/// Opens (and closes) the socket glibc's interface lookups open first, for [`why_no_socket`].
fn open_a_socket() -> std::io::Result<()> {
    std::os::unix::net::UnixDatagram::unbound().map(drop)
}

/// The index of the interface called `name` in the calling thread's network namespace; `None`
/// if there is none: where a lost interface is to be attached again ([`Dataplane::reattach`]).
/// An error when that could not be told ([`DataplaneError::Lookup`]).
pub fn interface_index(name: &str) -> Result<Option<u32>, DataplaneError> {
    ifindex(name).map_err(lookup_failed(name))
}

/// [`DataplaneError::Lookup`] of the interface `name`.
fn lookup_failed(name: &str) -> impl FnOnce(std::io::Error) -> DataplaneError + '_ {
    move |error| DataplaneError::Lookup { interface: format!("`{name}`"), error }
}

/// Attaches `prog` to `interface` in `mode` (auto: native, then generic with a warning): by
/// its index `ifindex` when given (the device looked at, not whichever the name names by the
/// time of the call), else by name. Returns the mode used and the link.
fn attach_xdp(
    prog: &mut Xdp,
    interface: &str,
    ifindex: Option<u32>,
    mode: XdpAttachMode,
) -> Result<(&'static str, XdpLinkId), DataplaneError> {
    let name = CString::new(interface).map_err(|_| DataplaneError::Attach {
        interface: interface.to_owned(),
        mode: "none",
        error: ProgramError::UnexpectedProgramType,
    })?;
    let target = || match ifindex {
        Some(i) => aya::programs::NetworkInterface::Index(i),
        None => aya::programs::NetworkInterface::Name(&name),
    };
    let try_mode = |prog: &mut Xdp, m: XdpMode, label: &'static str| {
        prog.attach(target(), m).map(|id| (label, id)).map_err(|source| {
            let interface = interface.to_owned();
            match source {
                ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. })
                    if matches!(io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)) =>
                {
                    DataplaneError::Held { interface, mode: label, error: io_error }
                }
                error => DataplaneError::Attach { interface, mode: label, error },
            }
        })
    };
    match mode {
        XdpAttachMode::Native => try_mode(prog, XdpMode::Driver, "native"),
        XdpAttachMode::Generic => try_mode(prog, XdpMode::Skb, "generic"),
        XdpAttachMode::Auto => match try_mode(prog, XdpMode::Driver, "native") {
            Ok(m) => Ok(m),
            Err(e @ DataplaneError::Held { .. }) => Err(e),
            Err(e) => {
                let mtu = netlink::link_info(interface).ok().flatten().map(|l| l.mtu);
                warn!(interface, "{}", native_fallback_message(interface, &e, mtu));
                try_mode(prog, XdpMode::Skb, "generic")
            }
        },
    }
}

/// The MTU above which drivers refuse, in native mode, an XDP program without multi-buffer
/// support (`xdp.frags`, which edgelb's programs do not declare): a frame must fit one page
/// with its headroom, about 3 KB (ixgbe and i40e take up to some 3000 bytes, mlx5 and veth
/// some 3500).
const NATIVE_XDP_MTU: u32 = 3000;

/// The warning of an `xdp_mode = "auto"` attach to `interface` that falls back to generic mode
/// because native mode failed with `e`: the error with its causes (aya's says only which call
/// failed, the errno is in its source), and, when the interface's `mtu` is above
/// [`NATIVE_XDP_MTU`], that this is the likely reason and what would let it run natively.
fn native_fallback_message(interface: &str, e: &DataplaneError, mtu: Option<u32>) -> String {
    let why = crate::error_chain(e);
    let mut msg = format!(
        "native XDP unavailable on {interface} ({why}): falling back to generic mode (slower)"
    );
    if let Some(mtu) = mtu.filter(|&m| m > NATIVE_XDP_MTU) {
        msg.push_str(&format!(
            "; likely for its MTU, {mtu}: above about {NATIVE_XDP_MTU} bytes drivers refuse native XDP to a program without multi-buffer support (xdp.frags), as edgelb's is; with an MTU of at most {NATIVE_XDP_MTU} (`ip link set {interface} mtu 3000`, and node.mtu to match) it may run natively"
        ));
    }
    msg
}

/// Makes sure pin directory `dir` exists on a mounted bpffs.
///
/// The directory must be this user's and writable by no one else: whoever may write to it may
/// remove the link pins (which detaches XDP) or plant maps of the right shape for edgelb to
/// adopt.
fn pin_dir_ready(dir: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::fs::MetadataExt;
    let fail = |reason: String| DataplaneError::Pin { path: dir.to_owned(), reason };
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

/// Default pin directory of backend decapsulators (`edgelb decap`), apart from the balancer's:
/// a backend is not a balancer node, and `edgelb stop` must not detach its decapsulator.
pub const DECAP_PIN_DIR: &str = "/sys/fs/bpf/edgelb-decap";

/// Attaches the backend decapsulator (`edgelb_decap`) to `interface` with its link pinned in
/// `dir`, so it stays attached after this process exits (`edgelb decap attach`). Attached
/// already there: its program is replaced in place (an upgrade), with no moment without it, as
/// the balancer's is at a restart. With `sources` (prefixes), only tunnels whose outer source
/// is in one of them are stripped ([`AuxPrograms::allow_decap_sources`]); without, any.
/// Returns the mode used ("native", "generic" or "replaced").
///
/// A pin there that is not the decapsulator of this network namespace's `interface` is left
/// alone and refused ([`check_decap_pin`]); a pin whose interface was deleted goes, and the
/// decapsulator is attached afresh. The attach is checked with the kernel: its program must be
/// the one the interface runs.
pub fn attach_decap(
    interface: &str,
    mode: XdpAttachMode,
    dir: &Path,
    sources: &[(IpAddr, u8)],
) -> Result<&'static str, DataplaneError> {
    if !interface_exists(interface)? {
        return Err(DataplaneError::NoInterface(interface.to_owned()));
    }
    pin_dir_ready(dir)?;
    let pin = link_pin(dir, interface);
    // Refuses a pin that is not this namespace's decapsulator. A stale one (its interface
    // deleted) goes in `attach_pinned`, as the balancer's does, and the program is attached
    // afresh.
    check_decap_pin(&pin, interface)?;
    let mut aux = AuxPrograms::load()?;
    aux.allow_decap_sources(sources)?;
    let prog = program(&mut aux.ebpf, programs::DECAP)?;
    // The link is let go of on return: its pin keeps it attached.
    let (used, replaced, _link) = attach_pinned(prog, interface, mode, Some(&pin))?;
    let prog_id =
        prog.info().map_err(|error| DataplaneError::Program { name: programs::DECAP, error })?.id();
    let found = match ifindex(interface).and_then(|i| netlink::xdp_attachment(i.unwrap_or(0))) {
        Ok(Some(a)) if a.runs(prog_id) => return Ok(if replaced { "replaced" } else { used }),
        Ok(Some(a)) => format!("XDP program id {}", a.prog_id),
        Ok(None) => "no XDP program".to_owned(),
        Err(e) => format!("nothing it could be asked ({e})"),
    };
    Err(DataplaneError::NotAttached { interface: interface.to_owned(), prog_id, found })
}

/// Detaches the decapsulator `attach_decap` left on `interface` (its link pin in `dir` is
/// removed, and with it the link); the directory goes once empty. False if none was there. A
/// pin there that is not the decapsulator of this network namespace's `interface` is left
/// alone and refused ([`check_decap_pin`]).
pub fn detach_decap(interface: &str, dir: &Path) -> Result<bool, DataplaneError> {
    let pin = link_pin(dir, interface);
    if !check_decap_pin(&pin, interface)? {
        return Ok(false);
    }
    // The link's id, to see it go: the kernel lets go of a pinned link only after an RCU grace
    // period once its pin is removed, and "detached" must be true when the command says so.
    let id =
        PinnedLink::from_pin(&pin).ok().and_then(|l| FdLink::from(l).info().ok()).map(|i| i.id());
    match std::fs::remove_file(&pin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(DataplaneError::Pin { path: pin, reason: e.to_string() }),
    }
    let _ = std::fs::remove_dir(dir);
    if let Some(id) = id {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while aya::programs::loaded_links().flatten().any(|l| l.id() == id)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    Ok(true)
}

/// Whose link pins [`inspect_link_pin`] checks: the two programs edgelb pins an XDP link of, each
/// in a directory of its own, with the link named by the interface's name only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkRole {
    /// `edgelb decap`'s decapsulator, pinned in its `--pin-dir`.
    Decap,
    /// The balancer, pinned in `node.pin_dir`.
    Balancer,
}

impl LinkRole {
    /// The name of the program a link of this role runs.
    fn program(self) -> &'static str {
        match self {
            LinkRole::Decap => programs::DECAP,
            LinkRole::Balancer => programs::BALANCER,
        }
    }

    /// The refusal of a pin that holds `holds` rather than a link of this role's program.
    fn not_ours(self, pin: &Path, holds: String) -> DataplaneError {
        match self {
            LinkRole::Decap => DataplaneError::NotDecapPin { path: pin.to_owned(), holds },
            LinkRole::Balancer => DataplaneError::NotBalancerPin { path: pin.to_owned(), holds },
        }
    }
}

/// Where the XDP link at a link pin of edgelb's runs, seen from this network namespace
/// ([`inspect_link_pin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkPin {
    /// Nothing is pinned there.
    Absent,
    /// On this namespace's interface of the pin's name, or on none (its interface deleted:
    /// nothing runs through it, and an attach replaces it afresh).
    Usable,
    /// On this namespace's interface of index `ifindex`, which has another name now (renamed).
    Renamed {
        /// The interface it holds.
        ifindex: u32,
        /// Its program.
        prog_id: u32,
    },
    /// On an interface of another network namespace.
    Elsewhere {
        /// The interface it holds, as that namespace numbers it.
        ifindex: u32,
        /// Its program.
        prog_id: u32,
    },
}

/// Looks at the link pinned at `pin` (`<dir>/link-<interface>`) before edgelb replaces,
/// removes or renames it, or adopts the maps pinned beside it. The pin is named by the
/// interface's name only, and bpffs is one for every network namespace: a pin of that name may
/// be the link of another namespace's interface of the same name, of this namespace's interface
/// renamed since, or (a pin directory shared by mistake) of the other program.
///
/// The link must be an XDP link whose program is `role`'s ([`DataplaneError::NotDecapPin`],
/// [`DataplaneError::NotBalancerPin`] otherwise); where it runs is the answer. The device a link
/// holds comes from its fdinfo (`ifindex:`, Linux 5.9, as old as XDP links), which aya's link
/// info leaves out; an interface index alone would not do, as every namespace numbers its own,
/// so the program netlink reports on that index in this namespace tells whether it is here.
fn inspect_link_pin(
    pin: &Path,
    interface: &str,
    role: LinkRole,
) -> Result<LinkPin, DataplaneError> {
    let pin_err = |reason: String| DataplaneError::Pin { path: pin.to_owned(), reason };
    match std::fs::symlink_metadata(pin) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LinkPin::Absent),
        Err(e) => return Err(pin_err(e.to_string())),
    }
    let not_ours = |holds: String| role.not_ours(pin, holds);
    let link = match PinnedLink::from_pin(pin) {
        Ok(l) => FdLink::from(l),
        // A pinned map or program, or a plain file: the kernel's EINVAL, EPERM.
        Err(e) => return Err(not_ours(format!("no BPF link that can be opened ({e})"))),
    };
    let info = link.info().map_err(|e| not_ours(format!("no BPF link ({e})")))?;
    // The fdinfo of the descriptor just opened, while it is open; a map or program fd has no
    // `link_id:` line.
    let Some(fdinfo) = own_link_fdinfo(info.id()) else {
        return Err(not_ours("no BPF link".to_owned()));
    };
    if fdinfo.link_type.as_deref() != Some("xdp") {
        let kind = fdinfo.link_type.unwrap_or_else(|| "unknown".to_owned());
        return Err(not_ours(format!("a BPF link of type {kind}, not an XDP link")));
    }
    let prog_id = info.program_id();
    // Where names cannot be read (no CAP_SYS_ADMIN, as under the systemd unit), the program is
    // taken for `role`'s: where it runs, below, is still checked, and that is what keeps
    // another namespace's data plane safe.
    match program_name(prog_id) {
        Ok(name) if name.as_deref() == Some(role.program()) => {}
        Ok(name) => {
            let name =
                name.map_or_else(|| "no name that could be read".to_owned(), |n| format!("`{n}`"));
            return Err(not_ours(format!("an XDP link of program id {prog_id}, named {name}")));
        }
        Err(e) => {
            debug!(pin = %pin.display(), error = %e, "program names cannot be read (no CAP_SYS_ADMIN): the pinned link's program is not checked by name");
        }
    }
    // No `ifindex:` line at all (a kernel that does not say): nothing shows the pin is stale,
    // and it may be another namespace's.
    let Some(ifindex_held) = fdinfo.ifindex else {
        return Err(not_ours("an XDP link whose device the kernel does not report".to_owned()));
    };
    // A lookup that could not be done for want of descriptors or memory says nothing of where
    // the link runs: taken for "not here", it would have the pin refused as another
    // namespace's, or moved as if its interface had been renamed.
    let here = ifindex(interface).map_err(lookup_failed(interface))?;
    let runs = |i: u32| match netlink::xdp_attachment(i) {
        Ok(a) => Ok(a.is_some_and(|a| a.runs(prog_id))),
        Err(e) if crate::proxy::out_of_resources(&e) => {
            Err(DataplaneError::Lookup { interface: format!("of index {i}"), error: e })
        }
        Err(_) => Ok(false),
    };
    Ok(if ifindex_held == 0 || here.map(runs).transpose()? == Some(true) {
        LinkPin::Usable
    } else if runs(ifindex_held)? {
        LinkPin::Renamed { ifindex: ifindex_held, prog_id }
    } else {
        LinkPin::Elsewhere { ifindex: ifindex_held, prog_id }
    })
}

/// [`inspect_link_pin`] for `edgelb decap`, which replaces or removes only its own
/// decapsulator on this namespace's `interface` (or one holding no device): another
/// namespace's, or one on an interface renamed since, is refused
/// ([`DataplaneError::DecapElsewhere`]). Returns whether such a link is pinned there.
fn check_decap_pin(pin: &Path, interface: &str) -> Result<bool, DataplaneError> {
    let (ifindex_held, prog_id, whose) = match inspect_link_pin(pin, interface, LinkRole::Decap)? {
        LinkPin::Absent => return Ok(false),
        LinkPin::Usable => return Ok(true),
        LinkPin::Renamed { ifindex, prog_id } => (
            ifindex,
            prog_id,
            format!(
                "this network namespace's interface of index {ifindex} (renamed from `{interface}`? `ip link` names it)"
            ),
        ),
        LinkPin::Elsewhere { ifindex, prog_id } => (
            ifindex,
            prog_id,
            format!("an interface in another network namespace (likely its `{interface}`)"),
        ),
    };
    Err(DataplaneError::DecapElsewhere {
        path: pin.to_owned(),
        interface: interface.to_owned(),
        whose,
        ifindex: ifindex_held,
        prog_id,
    })
}

/// The program of the link pinned at `pin`, if it can be read.
fn pinned_link_program(pin: &Path) -> Option<u32> {
    PinnedLink::from_pin(pin).ok().and_then(|l| FdLink::from(l).info().ok()).map(|i| i.program_id())
}

/// Checks every XDP link pinned in the balancer's pin directory `dir` ([`inspect_link_pin`])
/// before its maps are adopted: they must be the balancer's, and on this network namespace's
/// interfaces (under their names, or renamed since: [`Dataplane::attach`] follows a rename), or
/// on none (their interfaces deleted). A link on another namespace's interface means the
/// directory is that namespace's data plane ([`DataplaneError::BalancerElsewhere`]).
fn check_balancer_links(dir: &Path) -> Result<(), DataplaneError> {
    let (mine, _) = Dataplane::pins_in(dir)
        .map_err(|e| DataplaneError::Pin { path: dir.to_owned(), reason: e.to_string() })?;
    for pin in mine.iter().filter(|p| is_link_pin(p)) {
        let interface = pin_interface(pin);
        if let LinkPin::Elsewhere { ifindex, prog_id } =
            inspect_link_pin(pin, &interface, LinkRole::Balancer)?
        {
            return Err(DataplaneError::BalancerElsewhere {
                path: pin.to_owned(),
                interface,
                ifindex,
                prog_id,
                dir: dir.to_owned(),
            });
        }
    }
    Ok(())
}

/// The interface a link pin is named for (`link-<interface>`).
fn pin_interface(pin: &Path) -> String {
    let name = pin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_prefix("link-").unwrap_or(&name).to_owned()
}

/// What the kernel's fdinfo says of a BPF link.
#[derive(Debug, Default, PartialEq, Eq)]
struct LinkFdinfo {
    /// `link_type:` ("xdp" for XDP links).
    link_type: Option<String>,
    /// `ifindex:` of an XDP link: the device it holds, 0 when that is gone.
    ifindex: Option<u32>,
}

/// The fdinfo of the descriptor this process holds for BPF link `link_id`; `None` if it holds
/// none.
///
/// Only the descriptors of BPF links are read (told by their `/proc/self/fd` link, one call
/// each): a controller taking its data plane back after a failed takeover holds a descriptor
/// per L7 connection, and reading every one's fdinfo, for each pin, held up its loop.
fn own_link_fdinfo(link_id: u32) -> Option<LinkFdinfo> {
    own_link_fd(link_id).map(|(_, info)| info)
}

#[cfg(test)]
thread_local! {
    /// How many times this thread listed `/proc/self/fd` ([`own_link_fd`]): tests bound it.
    static FD_SCANS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A descriptor this process holds for BPF link `link_id`, and its fdinfo ([`own_link_fdinfo`]).
fn own_link_fd(link_id: u32) -> Option<(RawFd, LinkFdinfo)> {
    #[cfg(test)]
    FD_SCANS.with(|n| n.set(n.get() + 1));
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .flatten()
        .filter(|e| {
            // "bpf-link" for a link opened from its pin, "bpf_link" for one just made.
            std::fs::read_link(e.path()).is_ok_and(|t| {
                t.as_os_str() == "anon_inode:bpf-link" || t.as_os_str() == "anon_inode:bpf_link"
            })
        })
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let text =
                std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(e.file_name())).ok()?;
            Some((fd, text))
        })
        .find_map(|(fd, text)| Some((fd, link_fdinfo(&text, link_id)?)))
}

/// Reads `text`, the fdinfo of a descriptor, as that of BPF link `link_id`; `None` if it is not.
fn link_fdinfo(text: &str, link_id: u32) -> Option<LinkFdinfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
    };
    if field("link_id")?.parse::<u32>().ok()? != link_id {
        return None;
    }
    Some(LinkFdinfo {
        link_type: field("link_type").map(str::to_owned),
        ifindex: field("ifindex").and_then(|i| i.parse().ok()),
    })
}

/// The auxiliary programs: decap for backends, pass and tx_swap baselines.
pub struct AuxPrograms {
    ebpf: Ebpf,
}

impl AuxPrograms {
    /// Loads and verifies all auxiliary programs.
    pub fn load() -> Result<AuxPrograms, DataplaneError> {
        let mut ebpf = Ebpf::load(AUX_OBJ)?;
        for name in
            [programs::DECAP, programs::PASS, programs::TX_SWAP, programs::GEN, programs::SINK]
        {
            program(&mut ebpf, name)?
                .load()
                .map_err(|error| DataplaneError::Program { name, error })?;
        }
        Ok(AuxPrograms { ebpf })
    }

    /// Sum over CPUs of slot 0 of one of the auxiliary per-CPU counters (`GEN_STATE`,
    /// `SINK_COUNT`), for the packet-rate benchmark.
    pub fn counter(&self, map: &'static str) -> Result<u64, DataplaneError> {
        let m = self.ebpf.map(map).ok_or(DataplaneError::MissingMap(map))?;
        let arr = aya::maps::PerCpuArray::<_, u64>::try_from(m).map_err(map_err(map))?;
        Ok(arr.get(&0, 0).map_err(map_err(map))?.iter().sum())
    }

    /// Restricts the decapsulator to tunnels whose outer source is in one of `prefixes`
    /// (address, prefix length): the balancer's `encap_source_v4` / `encap_source_v6`. Without
    /// a call it takes tunnels from any source. Prefix lengths past the address's bits are
    /// refused.
    pub fn allow_decap_sources(&mut self, prefixes: &[(IpAddr, u8)]) -> Result<(), DataplaneError> {
        use aya::maps::lpm_trie::{Key, LpmTrie};
        for &(addr, len) in prefixes {
            let bits = if addr.is_ipv4() { 32 } else { 128 };
            if len > bits {
                return Err(DataplaneError::Capacity(format!(
                    "--allow-source {addr}/{len}: an IPv{} prefix is at most /{bits}",
                    if addr.is_ipv4() { 4 } else { 6 }
                )));
            }
            // The address as the program reads it from the packet.
            let (words, _) = addr_words(addr);
            if addr.is_ipv4() {
                const NAME: &str = "DECAP_SRC_V4";
                let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
                let mut t = LpmTrie::<_, u32, u8>::try_from(m).map_err(map_err(NAME))?;
                t.insert(&Key::new(u32::from(len), words[0]), &1, 0).map_err(map_err(NAME))?;
            } else {
                const NAME: &str = "DECAP_SRC_V6";
                let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
                let mut t = LpmTrie::<_, [u32; 4], u8>::try_from(m).map_err(map_err(NAME))?;
                t.insert(&Key::new(u32::from(len), words), &1, 0).map_err(map_err(NAME))?;
            }
        }
        if !prefixes.is_empty() {
            const NAME: &str = "DECAP_RESTRICTED";
            let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
            let mut arr = aya::maps::Array::<_, u32>::try_from(m).map_err(map_err(NAME))?;
            arr.set(0, &1, 0).map_err(map_err(NAME))?;
        }
        Ok(())
    }

    /// Sets the packet generator's frame template (its first 48 bytes are rewritten into every
    /// generated frame).
    pub fn set_gen_template(&mut self, frame: &[u8]) -> Result<(), DataplaneError> {
        const NAME: &str = "GEN_TEMPLATE";
        let mut t = [0u8; 48];
        let n = frame.len().min(48);
        t[..n].copy_from_slice(&frame[..n]);
        let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
        let mut arr = aya::maps::Array::<_, [u8; 48]>::try_from(m).map_err(map_err(NAME))?;
        arr.set(0, &t, 0).map_err(map_err(NAME))
    }

    /// One of the programs, for attaching or BPF_PROG_TEST_RUN.
    pub fn program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        program(&mut self.ebpf, name)
    }

    /// Attaches program `name` to `interface` in the calling thread's namespace. With `pin`,
    /// the link is pinned there and outlives this process until the pin is removed.
    pub fn attach(
        &mut self,
        name: &'static str,
        interface: &str,
        mode: XdpAttachMode,
        pin: Option<&Path>,
    ) -> Result<&'static str, DataplaneError> {
        let prog = program(&mut self.ebpf, name)?;
        let (used, id) = attach_xdp(prog, interface, None, mode)?;
        if let Some(path) = pin {
            // The pin keeps it attached once this process lets go of it.
            drop(pin_link(prog, id, path)?);
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Dataplane, FD_SCANS, InterfaceState, LinkFdinfo, MAX_CONNTRACK_FLOWS, MIN_CONNTRACK_FLOWS,
        TableShape, UNKNOWN_MODE, XdpAttachMode, buckets_for, fresh_backend_id, ifindex,
        interface_name, interface_state, link_fdinfo, link_pin, mode_differs, no_such_interface,
        pin_dir_ready, pinned_link_device, ring_slot_counts, vip_ring, why_no_socket,
    };

    /// The slots each backend holds, counted in one pass over the ring, are those a scan of
    /// the ring for each backend counts, and add up to the ring's size.
    #[test]
    fn ring_slots_are_counted_as_a_scan_per_backend_counts_them() {
        let backends: Vec<String> = (0..40)
            .map(|i| format!("{{ address = \"198.18.2.{i}\", weight = {} }}", 1 + i % 5))
            .collect();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nring_size = 4099\nbackends = [{}]\n",
            backends.join(", ")
        );
        let cfg = crate::config::Config::parse(&text, "t.toml".as_ref()).expect("valid");
        let ring = vip_ring(&cfg.vips[0]).expect("an XDP VIP has a ring");
        assert_eq!(ring.len(), 4099);
        let counts = ring_slot_counts(&ring);
        assert_eq!(counts.values().sum::<usize>(), ring.len());
        for i in 0..40u32 {
            let naive = ring.iter().filter(|&&x| x == i).count();
            assert_eq!(counts.get(&i).copied().unwrap_or(0), naive, "backend {i}");
            assert!(naive > 0, "backend {i} has slots");
        }
        assert_eq!(counts.len(), 40, "no value the ring does not hold");
        assert!(ring_slot_counts(&[]).is_empty());
    }

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

    /// Only the kernel's "no such device" (ENODEV, or the ENXIO if_indextoname makes of it)
    /// says an interface is not there. Any other failure of a lookup (out of descriptors, the
    /// socket it opens fails, with whatever errno its last try left) tells nothing: taken for
    /// "gone", it had a healthy interface said to have lost XDP.
    #[test]
    fn only_no_such_device_says_an_interface_is_not_there() {
        let told = |code| no_such_interface::<u32>(std::io::Error::from_raw_os_error(code));
        assert!(matches!(told(libc::ENODEV), Ok(None)));
        assert!(matches!(told(libc::ENXIO), Ok(None)));
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::ENOENT, 0] {
            assert!(told(code).is_err(), "errno {code} taken for no such interface");
        }
        // The lookups themselves, with descriptors to spare (`lo` is in every namespace).
        let lo = ifindex("lo").unwrap().expect("lo is there");
        assert_eq!(interface_name(lo).unwrap().as_deref(), Some("lo"));
        assert_eq!(ifindex("edgelb-none0").unwrap(), None);
        assert_eq!(ifindex("with\0nul").unwrap(), None);
        let none = 0x7fff_fff0;
        assert_eq!(interface_name(none).unwrap(), None);
        // Where an attached interface stands, from those answers and the program the kernel
        // reports there: `lo` runs none, so program 77 is not on it, whether the name still
        // names the device or not (tests/xdp_fixtures.rs has it attached).
        assert!(matches!(interface_state("lo", lo, 77), InterfaceState::Lost));
        assert!(matches!(interface_state("edgelb-none0", lo, 77), InterfaceState::Lost));
        assert!(matches!(interface_state("lo", none, 77), InterfaceState::Lost));
        assert!(
            matches!(interface_state("lo", 0, 77), InterfaceState::Attached),
            "device not known"
        );
    }

    /// glibc's ENOENT of a lookup that opened no socket gives way to the socket's own error;
    /// any other errno, or a socket that opens after all, leaves the lookup's error as it was.
    #[test]
    fn a_lookup_without_a_socket_says_why() {
        let errno = |code| std::io::Error::from_raw_os_error(code);
        let emfile = || Err(errno(libc::EMFILE));
        let why = |code, open: &dyn Fn() -> std::io::Result<()>| {
            why_no_socket(errno(code), open).raw_os_error()
        };
        assert_eq!(why(libc::ENOENT, &emfile), Some(libc::EMFILE));
        assert_eq!(why(libc::ENOENT, &|| Err(errno(libc::ENFILE))), Some(libc::ENFILE));
        assert_eq!(why(libc::ENOENT, &|| Ok(())), Some(libc::ENOENT), "a socket opens now");
        assert_eq!(why(libc::ENOMEM, &emfile), Some(libc::ENOMEM));
        assert_eq!(why(libc::ENODEV, &emfile), Some(libc::ENODEV));
    }

    /// Out of descriptors, both lookups fail with EMFILE, not the ENOENT glibc leaves. Run in a
    /// child (this test binary again, this test only) whose descriptor limit `sh` lowers, so
    /// that the other tests of this process keep theirs.
    #[test]
    fn lookups_out_of_descriptors_say_emfile() {
        const CHILD: &str = "EDGELB_TEST_OUT_OF_DESCRIPTORS";
        let name = "dataplane::tests::lookups_out_of_descriptors_say_emfile";
        if std::env::var_os(CHILD).is_none() {
            let exe = std::env::current_exe().expect("the test binary's path");
            let out = std::process::Command::new("sh")
                .args(["-c", r#"ulimit -n 64 && exec "$0" "$@""#])
                .arg(exe)
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .output()
                .expect("run the test binary again under `sh`");
            let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && said.contains("1 passed"), "the child: {said}");
            return;
        }
        let mut held = Vec::new();
        let full = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) if held.len() < 4096 => held.push(f),
                Ok(_) => panic!("the descriptor limit was not lowered"),
                Err(e) => break e,
            }
        };
        assert_eq!(full.raw_os_error(), Some(libc::EMFILE), "{full}");
        let by_name = ifindex("lo").map(drop);
        let by_index = interface_name(1).map(drop);
        drop(held);
        assert_eq!(by_name.map_err(|e| e.raw_os_error()), Err(Some(libc::EMFILE)));
        assert_eq!(by_index.map_err(|e| e.raw_os_error()), Err(Some(libc::EMFILE)));
    }

    /// An XDP link's fdinfo gives its type and the device it holds (0 once that is gone); a
    /// map's, or another link's, is not taken for it.
    #[test]
    fn link_fdinfo_reads_the_type_and_device_of_that_link_only() {
        let xdp = "pos:\t0\nflags:\t02000000\nmnt_id:\t16\nino:\t1059\nlink_type:\txdp\nlink_id:\t7\nprog_tag:\t3b185187f1855c4c\nprog_id:\t42\nifindex:\t3\n";
        let want = LinkFdinfo { link_type: Some("xdp".to_owned()), ifindex: Some(3) };
        assert_eq!(link_fdinfo(xdp, 7), Some(want));
        assert_eq!(link_fdinfo(xdp, 17), None, "another link");
        let gone = xdp.replace("ifindex:\t3", "ifindex:\t0");
        assert_eq!(link_fdinfo(&gone, 7).unwrap().ifindex, Some(0));
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t2\nkey_size:\t4\nmap_id:\t7\n";
        assert_eq!(link_fdinfo(map, 7), None, "a map of the same id");
    }

    /// A native attach that failed says its errno (aya's error names only the call), once; and,
    /// on an interface whose MTU is above what drivers take natively without multi-buffer
    /// support, that this is the likely reason. It said only "`bpf_link_create` failed".
    #[test]
    fn a_fallback_to_generic_says_the_errno_and_the_mtu() {
        use super::{DataplaneError, native_fallback_message};
        let e = DataplaneError::Attach {
            interface: "eth0".to_owned(),
            mode: "native",
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            }),
        };
        let m = native_fallback_message("eth0", &e, Some(1500));
        let errno = std::io::Error::from_raw_os_error(libc::EOPNOTSUPP).to_string();
        assert!(m.contains(&format!("`bpf_link_create` failed: {errno}")), "{m}");
        assert_eq!(m.matches("bpf_link_create").count(), 1, "{m}");
        assert!(m.contains("falling back to generic mode") && !m.contains("xdp.frags"), "{m}");
        let m = native_fallback_message("eth0", &e, Some(9000));
        assert!(m.contains("its MTU, 9000") && m.contains("xdp.frags"), "{m}");
        assert!(m.contains("`ip link set eth0 mtu 3000`"), "{m}");
        assert!(!native_fallback_message("eth0", &e, None).contains("MTU"));
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

    /// A link pin that cannot be made again (the whole pin directory removed) costs at most one
    /// listing of /proc/self/fd until the directory is back, however often it is looked at:
    /// an L7 node holds two descriptors per connection, and two listings a second per
    /// interface took most of each second at 100k. Once the directory is back, the pin is
    /// made again, and the link stayed on the interface meanwhile.
    #[test]
    fn a_pin_that_cannot_be_made_again_costs_no_listing_until_its_directory_is_back() {
        use crate::testbed::{netns, sh};
        if !netns::require_privileged(
            "a_pin_that_cannot_be_made_again_costs_no_listing_until_its_directory_is_back",
        ) {
            return;
        }
        /// Deletes the namespace and the pin directory when the test ends, however it ends.
        struct Gone(String, std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.1);
                let _ = sh(&["ip", "netns", "del", &self.0]);
            }
        }
        let name = format!("edgelb-repin-{}", std::process::id());
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/edgelb-test-repin-{}",
            std::process::id()
        ));
        let _ = sh(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name]).unwrap();
        let _gone = Gone(name.clone(), dir.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]).unwrap();
        netns::in_netns(&name, || {
            let mut dp = Dataplane::load(Some(&dir)).expect("the balancer loads");
            dp.attach("lo", XdpAttachMode::Generic).expect("attached to lo");
            let pin = link_pin(&dir, "lo");
            assert!(pin.exists(), "pinned at {}", pin.display());
            std::fs::remove_dir_all(&dir).unwrap();
            let scans = || FD_SCANS.with(std::cell::Cell::get);
            let before = scans();
            for _ in 0..5 {
                dp.repin_links(false);
            }
            assert!(scans() - before <= 1, "{} listings of /proc/self/fd", scans() - before);
            assert!(!pin.exists());
            assert!(
                matches!(dp.interface_states()[0].1, InterfaceState::Attached),
                "XDP stayed on lo"
            );
            std::fs::create_dir(&dir).unwrap();
            dp.repin_links(false);
            assert!(pin.exists(), "pinned again once its directory is back");
            assert!(scans() - before <= 2, "{} listings of /proc/self/fd", scans() - before);
            assert_eq!(pinned_link_device(&pin), Some(ifindex("lo").unwrap().unwrap()));
        })
        .unwrap();
    }

    /// A link taken over in another mode than node.xdp_mode asks is warned of; one whose mode
    /// the kernel would not tell is not (it was warned of a mismatch it may not have).
    #[test]
    fn an_unknown_running_mode_is_no_mode_mismatch() {
        assert!(mode_differs(XdpAttachMode::Native, "generic"));
        assert!(mode_differs(XdpAttachMode::Generic, "native"));
        assert!(!mode_differs(XdpAttachMode::Native, "native"));
        assert!(!mode_differs(XdpAttachMode::Auto, "generic"), "auto takes either");
        assert!(!mode_differs(XdpAttachMode::Native, UNKNOWN_MODE));
        assert!(!mode_differs(XdpAttachMode::Generic, UNKNOWN_MODE));
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
