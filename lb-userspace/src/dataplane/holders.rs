//! Which processes hold edgelb's pinned data plane open.
//!
//! `edgelb stop` removes the pins when no controller answers on the admin socket. But a socket
//! that does not answer does not mean no controller runs: during `run --takeover` the old
//! process unlinks the socket before the new one binds it, and after a failed take-back the
//! socket can be gone for good while a controller still runs. Every running controller keeps
//! descriptors of its maps and program, so a process holding those is the tell.

use std::{collections::BTreeSet, io, path::Path};

use aya::{
    maps::{MapError, MapInfo},
    programs::links::{FdLink, LinkError, PinnedLink},
};

use super::{Dataplane, is_link_pin};

/// A process that holds a descriptor of one of edgelb's pinned maps or of the program on one of
/// its pinned XDP links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its PID (in this PID namespace).
    pub pid: u32,
    /// Its `comm` (`/proc/<pid>/comm`), `?` if it could not be read.
    pub comm: String,
}

impl std::fmt::Display for Holder {
    /// `PID <pid> (<comm>)`, as the refusals that name it write it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PID {} ({})", self.pid, self.comm)
    }
}

/// The processes other than this one that hold edgelb's data plane pinned in `dir` open: a
/// descriptor of one of its pinned maps, or of the program on one of its pinned XDP links
/// (`map_id:` / `prog_id:` in `/proc/<pid>/fdinfo/*`). Every running controller holds these, so
/// `edgelb stop` asks this before it removes the pins of a controller whose admin socket does not
/// answer (one mid-takeover, say): removing them would detach XDP under it.
///
/// Only processes visible in this PID namespace's `/proc` are seen, and only those this one may
/// inspect (ptrace access rules: one with capabilities this one lacks is not, which a controller
/// is not once it has dropped all of its own). A pin or process that goes away during the search
/// is skipped too; anything else that cannot be read is an error, since the answer would then not
/// be known. Nothing pinned in `dir`: no holders.
pub fn pin_holders(dir: &Path) -> io::Result<Vec<Holder>> {
    let (mine, _) = Dataplane::pins_in(dir)?;
    let mut maps = BTreeSet::new();
    let mut progs = BTreeSet::new();
    for pin in &mine {
        let found = if is_link_pin(pin) {
            link_program(pin).map(|id| progs.insert(id))
        } else {
            map_id(pin).map(|id| maps.insert(id))
        };
        match found {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if maps.is_empty() && progs.is_empty() {
        return Ok(Vec::new());
    }
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(at("/proc".as_ref()))? {
        let entry = entry.map_err(at("/proc".as_ref()))?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        match holds(&entry.path(), &maps, &progs) {
            Ok(false) => {}
            Ok(true) => {
                let comm = std::fs::read_to_string(entry.path().join("comm"))
                    .map_or_else(|_| "?".to_owned(), |c| c.trim_end().to_owned());
                found.push(Holder { pid, comm });
            }
            Err(e) if exited(&e) || e.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(e),
        }
    }
    found.sort_by_key(|h| h.pid);
    Ok(found)
}

/// Does the process at `proc` (`/proc/<pid>`) hold a descriptor of one of `maps` or `progs`?
fn holds(proc: &Path, maps: &BTreeSet<u32>, progs: &BTreeSet<u32>) -> io::Result<bool> {
    let dir = proc.join("fdinfo");
    for entry in std::fs::read_dir(&dir).map_err(at(&dir))? {
        let path = entry.map_err(at(&dir))?.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // That descriptor was closed meanwhile.
            Err(e) if exited(&e) => continue,
            Err(e) => return Err(at(&path)(e)),
        };
        if fdinfo_names(&text, maps, progs) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Does the text of an fdinfo file name one of `maps` (`map_id:`) or `progs` (`prog_id:`)?
fn fdinfo_names(text: &str, maps: &BTreeSet<u32>, progs: &BTreeSet<u32>) -> bool {
    text.lines().any(|line| {
        let id = |key: &str| line.strip_prefix(key).and_then(|v| v.trim().parse::<u32>().ok());
        id("map_id:").is_some_and(|id| maps.contains(&id))
            || id("prog_id:").is_some_and(|id| progs.contains(&id))
    })
}

/// Is `e` what reading `/proc` of a process (or descriptor) that is gone gives?
fn exited(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Prefixes an error with the path it concerns (keeping its kind).
fn at(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The id of the map pinned at `pin`.
fn map_id(pin: &Path) -> io::Result<u32> {
    MapInfo::from_pin(pin).map(|info| info.id()).map_err(|e| match e {
        MapError::SyscallError(s) => at(pin)(s.io_error),
        e => io::Error::other(format!("{}: {e}", pin.display())),
    })
}

/// The id of the program on the XDP link pinned at `pin`.
fn link_program(pin: &Path) -> io::Result<u32> {
    let err = |e: LinkError| match e {
        LinkError::SyscallError(s) => at(pin)(s.io_error),
        e => io::Error::other(format!("{}: {e}", pin.display())),
    };
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(err)?);
    Ok(link.info().map_err(err)?.program_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_ids_are_matched_by_kind() {
        let maps = BTreeSet::from([7]);
        let progs = BTreeSet::from([9]);
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t2\nkey_size:\t4\nmap_id:\t7\nfrozen:\t0\n";
        assert!(fdinfo_names(map, &maps, &progs));
        assert!(!fdinfo_names(&map.replace("map_id:\t7", "map_id:\t9"), &maps, &progs));
        let prog = "pos:\t0\nprog_type:\t6\nprog_tag:\tabc\nprog_id:\t9\nrun_cnt:\t7\n";
        assert!(fdinfo_names(prog, &maps, &progs));
        assert!(!fdinfo_names(&prog.replace("prog_id:\t9", "prog_id:\t7"), &maps, &progs));
        assert!(!fdinfo_names("pos:\t0\nflags:\t02\n", &maps, &progs));
    }

    #[test]
    fn nothing_pinned_has_no_holders() {
        let dir = std::env::temp_dir().join(format!("edgelb-holders-{}", std::process::id()));
        assert_eq!(pin_holders(&dir).unwrap(), Vec::new());
    }
}
