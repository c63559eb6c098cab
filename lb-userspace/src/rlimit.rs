//! The process's resource limits: the one thin wrapper over `getrlimit` and `setrlimit`, which
//! the controller uses to raise the limits edgelb outgrows and the proxy to name the
//! locked-memory limit when its io_uring rings do not fit.
#![allow(unsafe_code)]

use std::io;

/// A resource whose limit is read or set (`libc::RLIMIT_NOFILE`, `libc::RLIMIT_MEMLOCK`, ...).
pub type Resource = libc::__rlimit_resource_t;

/// The soft and hard limits of `resource`.
pub fn get(resource: Resource) -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the limit into `lim`, a valid rlimit on this stack.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Sets the soft and hard limits of `resource` to `lim`.
pub fn set(resource: Resource, lim: &libc::rlimit) -> io::Result<()> {
    // SAFETY: setrlimit reads `lim`, a valid rlimit the caller lends.
    if unsafe { libc::setrlimit(resource, lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Setting the limits just read changes nothing and succeeds; a failure is the kernel's
    /// errno, not a silent no-op.
    #[test]
    fn reads_and_sets_back_the_open_file_limit() {
        let lim = get(libc::RLIMIT_NOFILE).unwrap();
        assert!(lim.rlim_cur <= lim.rlim_max);
        set(libc::RLIMIT_NOFILE, &lim).unwrap();
        let again = get(libc::RLIMIT_NOFILE).unwrap();
        assert_eq!((again.rlim_cur, again.rlim_max), (lim.rlim_cur, lim.rlim_max));
        // A soft limit above the hard one is refused, and said so.
        if lim.rlim_max != libc::RLIM_INFINITY {
            let bad = libc::rlimit { rlim_cur: lim.rlim_max + 1, rlim_max: lim.rlim_max };
            let e = set(libc::RLIMIT_NOFILE, &bad).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        }
    }
}
