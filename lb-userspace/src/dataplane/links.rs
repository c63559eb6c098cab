//! The XDP links of the balancer (and of the decapsulator) and their pins: attaching, pinning,
//! taking a pinned link over at a restart, following interface renames, holding links open,
//! and looking at a link pin to tell whose it is and where it runs.
//!
//! Kept apart from the maps and their apply because a link is what keeps XDP on an interface
//! across restarts: a pin removed, replaced or misread here takes the data plane off an
//! interface, or puts this program on another namespace's.

use std::{
    ffi::CString,
    os::fd::RawFd,
    path::{Path, PathBuf},
};

use aya::programs::{
    ProgramError, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
};
use lb_common::programs;
use tracing::{debug, info, warn};

use super::{
    Dataplane, DataplaneError,
    iface::{ifindex, interface_name, lookup_failed},
    netlink,
    pins::{BPFFS, is_link_pin, link_pin},
};
use crate::config::XdpAttachMode;

/// Pins the XDP link `id` of `prog` at `pin`, and returns it, taken from `prog`: the caller
/// holds it open or lets it go (the pin keeps it attached).
pub(super) fn pin_link(
    prog: &mut Xdp,
    id: XdpLinkId,
    pin: &Path,
) -> Result<FdLink, DataplaneError> {
    let pin_err =
        |reason: String| DataplaneError::Pin { step: "pinning to", path: pin.to_owned(), reason };
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
pub(super) struct HeldLink {
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
    pub(super) failed_at: Option<DirStamp>,
    /// A failure to pin it again was logged (until it is pinned).
    pub(super) pin_error_logged: bool,
    /// A failure to read its device was logged (until it is read).
    pub(super) device_error_logged: bool,
}

impl HeldLink {
    /// Holds `link`, its descriptor looked for in `/proc/self/fd` (once).
    pub(super) fn new(link: FdLink) -> HeldLink {
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
    pub(super) fn device(&mut self) -> Result<u32, String> {
        let (_, info) = self.fdinfo()?;
        info.ifindex.ok_or_else(|| "the kernel does not report the device of XDP links".to_owned())
    }

    /// Pins the link at `pin` without letting go of it. aya's [`FdLink::pin`] consumes the
    /// link, and closes its descriptor when pinning fails: for a link whose pin is gone, that
    /// would detach XDP. So the link is pinned through its descriptor ([`HeldLink::fdinfo`])
    /// with `BPF_OBJ_PIN`, which needs no capability, only write access to the directory; the
    /// pin is then read back to check that it names this link.
    #[allow(unsafe_code)]
    pub(super) fn pin(&mut self, pin: &Path) -> Result<(), DataplaneError> {
        use std::os::unix::ffi::OsStrExt;
        let pin_err = |reason: String| DataplaneError::Pin {
            step: "pinning to",
            path: pin.to_owned(),
            reason,
        };
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
pub(super) struct DirStamp(Option<(u64, u64, i64, i64)>);

impl DirStamp {
    /// `dir` as it is now: one `stat`.
    pub(super) fn of(dir: &Path) -> DirStamp {
        use std::os::unix::fs::MetadataExt;
        DirStamp(std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())))
    }
}

/// Attaches `prog` to `interface`, with its link pinned at `pin` if given. A link already pinned
/// there gets `prog` in place of its program, atomically: a restart, an upgrade. Returns the
/// mode XDP runs in ("native", "generic"; for a link taken over, as the kernel reports it,
/// see [`running_mode`]), whether a pinned link was taken over, and the link, to hold open
/// (`None` without a pin: `prog` keeps it).
pub(super) fn attach_pinned(
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
                    step: "removing the pin",
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
pub(super) fn mode_differs(mode: XdpAttachMode, used: &str) -> bool {
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
pub(super) fn pinned_link_device(pin: &Path) -> Option<u32> {
    let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
    let id = link.info().ok()?.id();
    // Read while `link` is open: the fdinfo is that of its descriptor.
    let device = own_link_fdinfo(id)?.ifindex;
    drop(link);
    device
}

/// The link pin in `dir` whose link holds device `ifindex` (0: none looked for).
pub(super) fn link_pin_holding(dir: &Path, ifindex: u32) -> Option<PathBuf> {
    if ifindex == 0 {
        return None;
    }
    let (mine, _) = Dataplane::pins_in(dir).ok()?;
    mine.into_iter().filter(|p| is_link_pin(p)).find(|p| pinned_link_device(p) == Some(ifindex))
}

/// Did replacing a pinned link's program fail because the link no longer has a device
/// (ENOLINK: its interface was deleted)?
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
pub(super) fn repin_after_reattach(link: &mut HeldLink, pin: &Path, interface: &str) {
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
pub(super) fn replace_program(
    prog: &mut Xdp,
    pin: &Path,
    interface: &str,
) -> Result<FdLink, DataplaneError> {
    let pin_err = |reason: String| DataplaneError::Pin {
        step: "replacing the program of the link pinned at",
        path: pin.to_owned(),
        reason,
    };
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
pub(super) fn follow_renames(dir: &Path, interface: &str) -> Result<(), DataplaneError> {
    let pin = link_pin(dir, interface);
    let move_pin = |from: &Path, to: &Path, old: &str, new: &str| {
        if to.exists() {
            return Err(DataplaneError::Pin {
                step: "moving the pin",
                path: from.to_owned(),
                reason: format!(
                    "its interface `{old}` is called `{new}` now, but {} is taken: remove one of the two (`edgelb stop` removes the whole data plane)",
                    to.display()
                ),
            });
        }
        std::fs::rename(from, to).map_err(|e| DataplaneError::Pin {
            step: "moving the pin",
            path: from.to_owned(),
            reason: e.to_string(),
        })?;
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
                step: "following a rename of the interface of",
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
    let (mine, _) = Dataplane::pins_in(dir).map_err(|e| DataplaneError::Pin {
        step: "listing the pin directory",
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
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

/// Attaches `prog` to `interface` in `mode` (auto: native, then generic with a warning): by
/// its index `ifindex` when given (the device looked at, not whichever the name names by the
/// time of the call), else by name. Returns the mode used and the link.
pub(super) fn attach_xdp(
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

/// Whose link pins [`inspect_link_pin`] checks: the two programs edgelb pins an XDP link of, each
/// in a directory of its own, with the link named by the interface's name only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkRole {
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
pub(super) enum LinkPin {
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
pub(super) fn inspect_link_pin(
    pin: &Path,
    interface: &str,
    role: LinkRole,
) -> Result<LinkPin, DataplaneError> {
    let pin_err = |reason: String| DataplaneError::Pin {
        step: "reading the pin",
        path: pin.to_owned(),
        reason,
    };
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

/// The program of the link pinned at `pin`, if it can be read.
fn pinned_link_program(pin: &Path) -> Option<u32> {
    PinnedLink::from_pin(pin).ok().and_then(|l| FdLink::from(l).info().ok()).map(|i| i.program_id())
}

/// Checks every XDP link pinned in the balancer's pin directory `dir` ([`inspect_link_pin`])
/// before its maps are adopted: they must be the balancer's, and on this network namespace's
/// interfaces (under their names, or renamed since: [`Dataplane::attach`] follows a rename), or
/// on none (their interfaces deleted). A link on another namespace's interface means the
/// directory is that namespace's data plane ([`DataplaneError::BalancerElsewhere`]).
pub(super) fn check_balancer_links(dir: &Path) -> Result<(), DataplaneError> {
    let (mine, _) = Dataplane::pins_in(dir).map_err(|e| DataplaneError::Pin {
        step: "listing the pin directory",
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
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

#[cfg(test)]
mod tests {
    use super::{
        Dataplane, FD_SCANS, LinkFdinfo, UNKNOWN_MODE, XdpAttachMode, ifindex, link_fdinfo,
        link_pin, mode_differs, pinned_link_device,
    };
    use crate::dataplane::InterfaceState;

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
}
