//! Network interfaces by name and index, as the calling thread's network namespace has them,
//! and where an attached interface stands now (attached, renamed, lost).
//!
//! Kept apart because every lookup here must tell "no such interface" from "could not be
//! told" (out of descriptors or memory, which glibc hides): taken for one another, a misspelt
//! interface would pass the checks, or a healthy one be said to have lost XDP.

use std::ffi::CString;

use super::{DataplaneError, netlink};

/// Where an attached interface stands, as
/// [`Dataplane::interface_states`](super::Dataplane::interface_states) finds it.
#[derive(Debug)]
pub enum InterfaceState {
    /// Its name names the device XDP was attached to, and the kernel reports this process's
    /// program on it (or that device is not known).
    Attached,
    /// The device is there under another name, this one, still running this process's program:
    /// XDP goes on balancing on it, but under a name `node.interfaces` does not give, so the
    /// operator is told to put it there (a restart then follows the rename, see
    /// [`follow_renames`](super::follow_renames)).
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
pub(super) fn interface_state(name: &str, was: u32, prog_id: u32) -> InterfaceState {
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
pub(super) fn interface_name(ifindex: u32) -> std::io::Result<Option<String>> {
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
pub(super) fn ifindex(name: &str) -> std::io::Result<Option<u32>> {
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
/// if there is none: where a lost interface is to be attached again
/// ([`Dataplane::reattach`](super::Dataplane::reattach)). An error when that could not be told
/// ([`DataplaneError::Lookup`]).
pub fn interface_index(name: &str) -> Result<Option<u32>, DataplaneError> {
    ifindex(name).map_err(lookup_failed(name))
}

/// [`DataplaneError::Lookup`] of the interface `name`.
pub(super) fn lookup_failed(name: &str) -> impl FnOnce(std::io::Error) -> DataplaneError + '_ {
    move |error| DataplaneError::Lookup { interface: format!("`{name}`"), error }
}

#[cfg(test)]
mod tests {
    use super::{
        InterfaceState, ifindex, interface_name, interface_state, no_such_interface, why_no_socket,
    };

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
        let name = "dataplane::iface::tests::lookups_out_of_descriptors_say_emfile";
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
}
