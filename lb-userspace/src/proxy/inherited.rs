//! Listening sockets handed to edgelb by its service manager (systemd socket activation, the
//! `sd_listen_fds` protocol).
//!
//! The manager keeps these sockets open while edgelb restarts, so a connection to an L7 VIP that
//! arrives between one process and the next waits in the socket's backlog and is served by the
//! next process, instead of being refused because nothing listens. Sockets edgelb binds itself
//! close with the process, unless it hands them to the `edgelb run --takeover` replacing it
//! ([`Inherited::adopt`] takes those).

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
};

/// The protocol's first descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// Set once the descriptors have been taken, so that they get exactly one owner.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the inherited sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    /// `LISTEN_FDS` is not a count.
    #[error("LISTEN_FDS={0:?} is not a number of descriptors")]
    Count(String),
    /// A descriptor is not what the protocol promises, or cannot be inspected.
    #[error("descriptor {fd} passed by the service manager: {reason}")]
    Descriptor {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
}

/// Ownership of descriptor `fd`, one the service manager passed.
#[allow(unsafe_code)]
fn take_passed(fd: RawFd) -> OwnedFd {
    // SAFETY: the sd_listen_fds protocol gives the process named by LISTEN_PID (this one)
    // descriptors 3..3+LISTEN_FDS, open; nothing else in edgelb opens or owns them, and the
    // TAKEN flag makes `Inherited::from_env` (the only caller) take them once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The listening TCP sockets passed to this process, by local address (several per address
/// when a previous edgelb handed over one per proxy thread).
#[derive(Debug, Default)]
pub struct Inherited {
    /// Where each address's sockets came from (for the log), and the sockets.
    by_addr: HashMap<SocketAddr, (&'static str, Vec<TcpListener>)>,
}

/// Where sockets came from.
const FROM_SERVICE_MANAGER: &str = "passed by the service manager";
/// Likewise.
const FROM_PREVIOUS_EDGELB: &str = "handed over by the previous edgelb";

/// Checks that `fd` is a listening TCP socket and readies it for the proxy; returns it with its
/// address.
fn listening(fd: OwnedFd) -> Result<(SocketAddr, TcpListener), String> {
    let sock = socket2::Socket::from(fd);
    sock.set_cloexec(true).map_err(|e| format!("setting close-on-exec: {e}"))?;
    let stream = sock.r#type().map_err(|e| e.to_string())? == socket2::Type::STREAM;
    let listening = sock.is_listener().map_err(|e| e.to_string())?;
    if !stream || !listening {
        return Err("not a listening TCP socket (edgelb takes ListenStream= sockets only)".into());
    }
    let addr = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| "not an IPv4 or IPv6 socket".to_owned())?;
    // As edgelb's own listeners: accepted connections inherit it.
    sock.set_tcp_nodelay(true).map_err(|e| format!("setting TCP_NODELAY: {e}"))?;
    Ok((addr, sock.into()))
}

impl Inherited {
    /// Takes the sockets the service manager passed: descriptors 3 to 3 + `LISTEN_FDS` - 1, when
    /// `LISTEN_PID` names this process (variables inherited from a parent that got sockets name
    /// the parent and are ignored). Only the first call takes them; later calls find none.
    pub fn from_env() -> Result<Inherited, InheritError> {
        let pid = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok());
        if pid != Some(std::process::id()) || TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(Inherited::default());
        }
        let count = std::env::var("LISTEN_FDS").unwrap_or_default();
        let n: RawFd = count.trim().parse().map_err(|_| InheritError::Count(count.clone()))?;
        let mut inherited = Inherited::default();
        for fd in FIRST_FD..FIRST_FD.saturating_add(n.max(0)) {
            let (addr, l) = listening(take_passed(fd))
                .map_err(|reason| InheritError::Descriptor { fd, reason })?;
            inherited.push(addr, l, FROM_SERVICE_MANAGER);
        }
        Ok(inherited)
    }

    /// Adds `l`, listening on `addr`, from `origin` (the first origin of an address names it).
    fn push(&mut self, addr: SocketAddr, l: TcpListener, origin: &'static str) {
        self.by_addr.entry(addr).or_insert((origin, Vec::new())).1.push(l);
    }

    /// Takes a listening socket handed over by a previous edgelb (`edgelb run --takeover`).
    pub fn adopt(&mut self, fd: OwnedFd) -> Result<(), InheritError> {
        let raw = fd.as_raw_fd();
        let (addr, l) = listening(fd).map_err(|reason| InheritError::Descriptor {
            fd: raw,
            reason: format!("{FROM_PREVIOUS_EDGELB}: {reason}"),
        })?;
        self.push(addr, l, FROM_PREVIOUS_EDGELB);
        Ok(())
    }

    /// Descriptors of the inherited sockets listening on `addr` for proxy thread `thread` of
    /// `threads` (none when no socket listens there). Every socket goes to some thread, so none
    /// is left with connections nobody accepts: with at least as many sockets as threads, thread
    /// t takes sockets t, t + threads, ...; with fewer, thread t shares socket t % sockets. Each
    /// is a new descriptor: every thread owns its own.
    pub fn for_thread(
        &self,
        addr: SocketAddr,
        thread: usize,
        threads: usize,
    ) -> Vec<std::io::Result<TcpListener>> {
        let Some((_, socks)) = self.by_addr.get(&addr) else { return Vec::new() };
        let threads = threads.max(1);
        if socks.len() >= threads {
            socks.iter().skip(thread).step_by(threads).map(TcpListener::try_clone).collect()
        } else {
            vec![socks[thread % socks.len()].try_clone()]
        }
    }

    /// Was a socket listening on `addr` passed?
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// Where the sockets listening on `addr` came from ("passed by the service manager" or
    /// "handed over by the previous edgelb"), for the log.
    pub fn origin(&self, addr: SocketAddr) -> &'static str {
        self.by_addr.get(&addr).map_or("inherited", |(origin, _)| origin)
    }

    /// Addresses of every inherited socket.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_addr.keys().copied()
    }

    /// True when no socket was passed.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};

    /// The socket (its inode) behind a descriptor.
    fn inode(l: &TcpListener) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap().ino()
    }

    /// `n` SO_REUSEPORT listeners on one loopback port, as one proxy thread each binds them.
    fn group(n: usize) -> Vec<TcpListener> {
        let mut port = 0;
        (0..n)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
                s.listen(16).unwrap();
                let l: TcpListener = s.into();
                port = l.local_addr().unwrap().port();
                l
            })
            .collect()
    }

    #[test]
    fn handed_over_sockets_each_go_to_some_thread() {
        let socks = group(4);
        let addr = socks[0].local_addr().unwrap();
        let want: Vec<u64> = socks.iter().map(inode).collect();
        let mut inh = Inherited::default();
        for s in socks {
            inh.adopt(OwnedFd::from(s)).unwrap();
        }
        assert!(inh.contains(addr));
        assert_eq!(inh.origin(addr), "handed over by the previous edgelb");
        let taken = |t: usize, threads: usize| -> Vec<u64> {
            inh.for_thread(addr, t, threads).into_iter().map(|l| inode(&l.unwrap())).collect()
        };
        // As many threads as sockets, fewer, one: every socket is accepted on by some thread.
        for threads in [4, 2, 3, 1] {
            let mut all: Vec<u64> = (0..threads).flat_map(|t| taken(t, threads)).collect();
            all.sort_unstable();
            let mut expect = want.clone();
            expect.sort_unstable();
            assert_eq!(all, expect, "{threads} threads");
        }
        assert_eq!(taken(1, 2), vec![want[1], want[3]]);
        // More threads than sockets: they share.
        let shared: Vec<u64> = (0..6).flat_map(|t| taken(t, 6)).collect();
        assert_eq!(shared, vec![want[0], want[1], want[2], want[3], want[0], want[1]]);
        // An address nothing was handed for: nothing, so the proxy binds its own.
        assert!(inh.for_thread(SocketAddr::from(([127, 0, 0, 1], 1)), 0, 2).is_empty());
    }

    #[test]
    fn a_handed_over_descriptor_must_be_a_listening_socket() {
        let bound = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = Inherited::default().adopt(OwnedFd::from(bound)).unwrap_err();
        assert!(err.to_string().contains("not a listening TCP socket"), "{err}");
    }
}
