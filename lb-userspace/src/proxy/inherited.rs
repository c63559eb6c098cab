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
    by_addr: HashMap<SocketAddr, Vec<TcpListener>>,
    /// Where each address's sockets came from, for the log.
    origin: HashMap<SocketAddr, &'static str>,
}

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
        let mut by_addr = HashMap::new();
        for fd in FIRST_FD..FIRST_FD.saturating_add(n.max(0)) {
            let (addr, l) = listening(take_passed(fd))
                .map_err(|reason| InheritError::Descriptor { fd, reason })?;
            by_addr.entry(addr).or_insert_with(Vec::new).push(l);
        }
        let origin = by_addr.keys().map(|a| (*a, "passed by the service manager")).collect();
        Ok(Inherited { by_addr, origin })
    }

    /// Takes a listening socket handed over by a previous edgelb (`edgelb run --takeover`).
    pub fn adopt(&mut self, fd: OwnedFd) -> Result<(), InheritError> {
        let raw = fd.as_raw_fd();
        let (addr, l) = listening(fd).map_err(|reason| InheritError::Descriptor {
            fd: raw,
            reason: format!("handed over by the previous edgelb: {reason}"),
        })?;
        self.by_addr.entry(addr).or_default().push(l);
        self.origin.entry(addr).or_insert("handed over by the previous edgelb");
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
        let Some(socks) = self.by_addr.get(&addr) else { return Vec::new() };
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
        self.origin.get(&addr).copied().unwrap_or("inherited")
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
