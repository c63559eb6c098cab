//! The auxiliary programs ([`AuxPrograms`]: the backend decapsulator, and the pass, tx_swap,
//! packet generator and sink baselines of the benchmarks) and `edgelb decap`, which attaches
//! the decapsulator to a backend's interface and detaches it.
//!
//! Kept apart from the balancer because a backend is not a balancer node: the decapsulator has
//! an object ([`AUX_OBJ`]), a pin directory ([`DECAP_PIN_DIR`]) and checks of its own, and
//! nothing here reads or writes the balancer's maps.

use std::{net::IpAddr, path::Path};

use aya::{
    Ebpf,
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
    },
};
use lb_common::programs;

use super::{
    AUX_OBJ, DataplaneError, addr_words,
    iface::{ifindex, interface_exists},
    links::{LinkPin, LinkRole, attach_pinned, attach_xdp, inspect_link_pin, pin_link},
    map_err, netlink,
    pins::{link_pin, pin_dir_ready},
    program,
};
use crate::config::XdpAttachMode;

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
        Err(e) => {
            return Err(DataplaneError::Pin {
                step: "removing the pin",
                path: pin,
                reason: e.to_string(),
            });
        }
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

    /// Sum over CPUs of slot 0 of one of the auxiliary per-CPU counters
    /// ([`lb_common::aux_maps::GEN_STATE`], [`lb_common::aux_maps::SINK_COUNT`]), for the
    /// packet-rate benchmark.
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
                const NAME: &str = lb_common::aux_maps::DECAP_SRC_V4;
                let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
                let mut t = LpmTrie::<_, u32, u8>::try_from(m).map_err(map_err(NAME))?;
                t.insert(&Key::new(u32::from(len), words[0]), &1, 0).map_err(map_err(NAME))?;
            } else {
                const NAME: &str = lb_common::aux_maps::DECAP_SRC_V6;
                let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
                let mut t = LpmTrie::<_, [u32; 4], u8>::try_from(m).map_err(map_err(NAME))?;
                t.insert(&Key::new(u32::from(len), words), &1, 0).map_err(map_err(NAME))?;
            }
        }
        if !prefixes.is_empty() {
            const NAME: &str = lb_common::aux_maps::DECAP_RESTRICTED;
            let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
            let mut arr = aya::maps::Array::<_, u32>::try_from(m).map_err(map_err(NAME))?;
            arr.set(0, &1, 0).map_err(map_err(NAME))?;
        }
        Ok(())
    }

    /// Sets the packet generator's frame template (its first [`lb_common::GEN_TEMPLATE_LEN`]
    /// bytes are rewritten into every generated frame).
    pub fn set_gen_template(&mut self, frame: &[u8]) -> Result<(), DataplaneError> {
        use lb_common::GEN_TEMPLATE_LEN as LEN;
        const NAME: &str = lb_common::aux_maps::GEN_TEMPLATE;
        let mut t = [0u8; LEN];
        let n = frame.len().min(LEN);
        t[..n].copy_from_slice(&frame[..n]);
        let m = self.ebpf.map_mut(NAME).ok_or(DataplaneError::MissingMap(NAME))?;
        let mut arr = aya::maps::Array::<_, [u8; LEN]>::try_from(m).map_err(map_err(NAME))?;
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
