//! Descriptors over the admin socket (SCM_RIGHTS): how a running edgelb hands its listening
//! sockets to the `edgelb run --takeover` replacing it, so the sockets never close and no
//! connection is refused between the two processes.
//!
//! std has no stable API for ancillary data, so these two calls go to libc directly.
#![allow(unsafe_code)]

use std::{
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

/// The most descriptors one message carries: a listener per thread for each of the 32 L7 VIPs
/// a config may have on a large machine, plus the metrics listener.
pub const MAX_FDS: usize = 1024;

/// Room for the control message of `n` descriptors, in u64 words (cmsghdr alignment).
fn control_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(size_of::<u64>())
}

/// Sends `data` with `fds` attached to its first byte. `data` must not be empty (the
/// descriptors ride on data) and is sent whole.
pub fn send(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no data or too many descriptors"));
    }
    let mut control = vec![0u64; control_words(fds.len().max(1))];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers); the fields set below point at
    // `iov` and `control`, which outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = fds.len() * size_of::<RawFd>();
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len as u32) } as _;
        // SAFETY: `msg` points at a control buffer of msg_controllen bytes, room for one header
        // and `len` bytes of data (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and
        // CMSG_DATA has room for the descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as _;
            let out = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                out.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` is fully initialised and its buffers are alive; the kernel only reads them.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut sent = n as usize;
    // The descriptors went with the first bytes; the rest, if any, goes plainly.
    while sent < data.len() {
        sent += io::Write::write(&mut &*stream, &data[sent..])?;
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and the descriptors attached to them (owned by the caller
/// from here on, close-on-exec). Returns the byte count (0 at end of stream) and the
/// descriptors.
pub fn recv(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = vec![0u64; control_words(MAX_FDS)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as in `send`; here the kernel writes into `buf` and `control`, both alive and of
    // the lengths given.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = (control.len() * size_of::<u64>()) as _;
    // SAFETY: see above; MSG_CMSG_CLOEXEC makes every received descriptor close-on-exec.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed headers, which
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk within it; each SCM_RIGHTS header carries
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors, new in this process and owned by nobody else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off (too many in one message)"));
    }
    Ok((n as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send(&a, b"two\n", &[l1.as_fd(), l2.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"two\n");
        assert_eq!(fds.len(), 2);
        let got: Vec<_> = fds
            .into_iter()
            .map(|fd| std::net::TcpListener::from(fd).local_addr().unwrap())
            .collect();
        assert_eq!(got, vec![l1.local_addr().unwrap(), l2.local_addr().unwrap()]);
        // Without descriptors: plain data.
        send(&a, b"x", &[]).unwrap();
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        assert!(send(&a, b"", &[]).is_err());
    }
}
