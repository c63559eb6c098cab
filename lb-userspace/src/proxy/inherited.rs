//! Listening sockets handed to edgelb by its service manager (systemd socket activation, the
//! `sd_listen_fds` protocol).
//!
//! The manager keeps these sockets open while edgelb restarts, so a connection to an L7 VIP that
//! arrives between one process and the next waits in the socket's backlog and is served by the
//! next process, instead of being refused because nothing listens. Sockets edgelb binds itself
//! close with the process.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    os::fd::{FromRawFd, OwnedFd, RawFd},
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

/// The listening TCP sockets passed to this process, by local address.
#[derive(Debug, Default)]
pub struct Inherited {
    by_addr: HashMap<SocketAddr, TcpListener>,
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
            let bad = |reason: String| InheritError::Descriptor { fd, reason };
            let sock = socket2::Socket::from(take_passed(fd));
            sock.set_cloexec(true).map_err(|e| bad(format!("setting close-on-exec: {e}")))?;
            let stream = sock.r#type().map_err(|e| bad(e.to_string()))? == socket2::Type::STREAM;
            let listening = sock.is_listener().map_err(|e| bad(e.to_string()))?;
            if !stream || !listening {
                return Err(bad(
                    "not a listening TCP socket (edgelb takes ListenStream= sockets only)".into(),
                ));
            }
            let addr = sock
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| bad("not an IPv4 or IPv6 socket".into()))?;
            // As edgelb's own listeners: accepted connections inherit it.
            sock.set_tcp_nodelay(true).map_err(|e| bad(format!("setting TCP_NODELAY: {e}")))?;
            by_addr.insert(addr, sock.into());
        }
        Ok(Inherited { by_addr })
    }

    /// A descriptor for the inherited socket listening on `addr`, if there is one (a new
    /// descriptor of the same socket on every call: each proxy thread owns one).
    pub fn get(&self, addr: SocketAddr) -> Option<std::io::Result<TcpListener>> {
        self.by_addr.get(&addr).map(TcpListener::try_clone)
    }

    /// Was a socket listening on `addr` passed?
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr)
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
