//! Running code inside a network namespace, and the privilege gate for tests that need one.

use std::{fs::File, io, os::fd::AsRawFd, path::PathBuf};

/// Where `ip netns add` puts its namespace handles.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Moves the *calling thread* into network namespace `name`.
///
/// setns(CLONE_NEWNET) is per thread, so the rest of the process stays where it was; callers run
/// this on a dedicated thread (see [`in_netns`]).
pub fn enter(name: &str) -> io::Result<()> {
    let f = File::open(netns_path(name))?;
    // SAFETY: setns takes a valid open fd (kept alive by `f` for the call) and a namespace type
    // flag; it touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `name` and returns its result.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            Ok(f())
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// Pins the calling thread to `cpu`. The connection table is per CPU, and BPF_PROG_TEST_RUN runs
/// the program on the caller's CPU: tests and benchmarks that care which CPU's table a packet
/// sees pin themselves first.
/// `None` lets the thread run anywhere again (children inherit affinity, so undo a pin before
/// spawning load generators).
pub fn pin_current_thread(cpu: Option<usize>) -> std::io::Result<()> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[allow(unsafe_code)]
    // SAFETY: `set` is a plain bit set owned by this frame; sched_setaffinity only reads it, and
    // pid 0 names the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        match cpu {
            Some(cpu) => libc::CPU_SET(cpu, &mut set),
            None => (0..all).for_each(|c| libc::CPU_SET(c, &mut set)),
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gate for tests that need root (CAP_BPF, CAP_NET_ADMIN). Returns true when the test may run.
///
/// Unprivileged, it prints why the test is skipped and returns false, unless
/// `EDGELB_REQUIRE_PRIVILEGED=1` is set (as in CI), in which case a skip is a failure.
pub fn require_privileged(test: &str) -> bool {
    if euid() == 0 {
        return true;
    }
    let reason = format!("{test}: needs root (CAP_BPF + CAP_NET_ADMIN) to load XDP programs");
    if std::env::var("EDGELB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{reason}, and EDGELB_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIPPED {reason}");
    false
}
