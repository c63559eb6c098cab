//! TCP_INFO: the one thin wrapper over `getsockopt(TCP_INFO)`, which the proxy reads to tell
//! whether a peer still takes the bytes sent to it (`proxy::uring::Socket::send_all_with`,
//! `Socket::draining`) or has some on their way to it (`Socket::unacknowledged`), and tests
//! read to count the segments a write took (`testbed::servers::data_segments_in`).
#![allow(unsafe_code)]

use std::{io, os::fd::AsRawFd};

/// The kernel's TCP_INFO of socket `s`, with the length it filled: an older kernel fills a
/// shorter struct, its later fields left zero, so a field past that length is not reported.
pub fn get(s: &impl AsRawFd) -> io::Result<(libc::tcp_info, usize)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a buffer of `len` bytes the kernel fills for the descriptor (a shorter struct from
    // an older kernel leaves the rest zero, which `zeroed` made a valid value); a descriptor
    // that is not a TCP socket fails with an errno, writing nothing.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed, then filled by the kernel: every field is an integer.
    Ok((unsafe { info.assume_init() }, len as usize))
}

#[cfg(test)]
mod tests {
    /// A connected socket's TCP_INFO says it is established; a socket that is not TCP is an
    /// error, not zeroes.
    #[test]
    fn reads_a_connected_sockets_state() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (info, len) = super::get(&s).unwrap();
        assert!(len > 0);
        assert_eq!(info.tcpi_state, 1, "TCP_ESTABLISHED");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(super::get(&u).is_err());
    }
}
