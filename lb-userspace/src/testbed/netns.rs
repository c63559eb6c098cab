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
    #[allow(unsafe_code)]
    // SAFETY: `set` is a plain bit set owned by this frame; sched_setaffinity only reads it, and
    // pid 0 names the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        match cpu {
            Some(cpu) => libc::CPU_SET(cpu, &mut set),
            // Every CPU: the kernel keeps those the thread may use (available_parallelism
            // would count a CPU quota, and unpin to CPU 0 alone under one).
            None => (0..libc::CPU_SETSIZE as usize).for_each(|c| libc::CPU_SET(c, &mut set)),
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
/// `EDGELB_REQUIRE_PRIVILEGED=1` is set (as in CI), in which case a skip is a failure (see
/// [`require`]).
pub fn require_privileged(test: &str) -> bool {
    require(
        euid() == 0,
        &format!("{test}: needs root (CAP_BPF + CAP_NET_ADMIN) to load XDP programs"),
    )
}

/// The one gate every test that can skip goes through: returns true when `available` (the test
/// may run). Otherwise it prints `SKIPPED <reason>` and returns false, unless
/// `EDGELB_REQUIRE_PRIVILEGED=1` is set (as in CI), which makes the skip a failure; any other
/// value of the variable (or none) lets it skip.
///
/// The line goes straight to the process's stderr: libtest captures what `eprintln!` prints and
/// shows it only for a failing test, so a skip, which passes, would leave no trace. `./x test`
/// counts these lines (a test that skips calls this once, then returns) and shows them as skipped
/// in its summary.
pub fn require(available: bool, reason: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("EDGELB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{reason}, and EDGELB_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    // One write, so that tests running in parallel do not interleave their lines.
    let _ = io::Write::write_all(&mut io::stderr(), format!("{SKIPPED}{reason}\n").as_bytes());
    false
}

/// How a line [`require`] prints starts (`./x test` counts the lines that start so).
pub const SKIPPED: &str = "SKIPPED ";

/// The CPUs the calling thread may run on: its affinity mask, which `taskset` or a cpuset
/// narrow. (A CPU quota does not, though it makes `available_parallelism` report fewer CPUs:
/// with a quota of one CPU it says 1 while the thread can still be pinned to CPU 1.) Ask before
/// pinning the thread ([`pin_current_thread`]), which narrows the mask to one CPU.
pub fn runnable_cpus() -> io::Result<Vec<usize>> {
    #[allow(unsafe_code)]
    // SAFETY: `set` is a plain bit set owned by this frame; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it, pid 0 names the calling thread, and CPU_ISSET
    // only reads it, at indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}
