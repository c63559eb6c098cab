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

/// The most descriptors [`send`] takes: a listener per thread (up to 256) for each of the 32
/// L7 VIPs a config may have, plus the metrics listener.
pub const MAX_FDS: usize = 256 * 32 + 1;

/// The most descriptors the kernel lets one message carry (SCM_MAX_FD).
const PER_MESSAGE: usize = 253;

/// Room for the control message of `n` descriptors, in u64 words (cmsghdr alignment).
fn control_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(size_of::<u64>())
}

/// Sends `data` with `fds` attached to its first bytes, and the rest of `data` after them.
/// The kernel takes at most 253 descriptors a message, so more go in several messages, one
/// byte of `data` each: a receiver reading until the end of `data` (as [`recv`] in a loop does)
/// gets them all, in order. `data` must be at least one byte per 253 descriptors.
///
/// All of it by `until`, or TimedOut: a receiver that stops reading (its buffer full) must not
/// hold the sender for good.
pub fn send(
    stream: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    until: std::time::Instant,
) -> io::Result<()> {
    let chunks = fds.len().div_ceil(PER_MESSAGE).max(1);
    if data.len() < chunks || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too little data or too many descriptors",
        ));
    }
    // Each call may wait only for what is left of the time.
    let mut deadline = super::Deadline { conn: stream, until };
    let mut sent = 0;
    for (i, part) in fds.chunks(PER_MESSAGE).enumerate() {
        // Every message but the last carries one byte; the last the rest.
        let end = if i + 1 == chunks { data.len() } else { sent + 1 };
        deadline.arm_write()?;
        sent += send_one(stream, &data[sent..end], part)?;
    }
    if fds.is_empty() {
        deadline.arm_write()?;
        sent += send_one(stream, data, &[])?;
    }
    // The rest, if a message took less than it was given, goes plainly.
    while sent < data.len() {
        sent += io::Write::write(&mut deadline, &data[sent..])?;
    }
    Ok(())
}

/// One sendmsg of `data` with at most [`PER_MESSAGE`] descriptors on it; how many bytes went.
fn send_one(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
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
    Ok(n as usize)
}

/// Receives up to `buf.len()` bytes and the descriptors attached to them (owned by the caller
/// from here on, close-on-exec). Returns the byte count (0 at end of stream) and the
/// descriptors.
pub fn recv(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = vec![0u64; control_words(PER_MESSAGE)];
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

/// The user id of the process at the other end of `stream` (SO_PEERCRED: who connected, or
/// who bound the socket connected to), for both ends of the admin socket to refuse anyone but
/// root or this process's own user.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a ucred and a socklen_t, as
    // getsockopt(SO_PEERCRED) needs; the descriptor is open for the borrow of `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A deadline no test exchange comes near.
    fn soon() -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(30)
    }

    /// A receiver that reads nothing holds the sender until the deadline, not for good; an
    /// answer with descriptors larger than the socket's buffer, as a handover's may be.
    #[test]
    fn a_send_nobody_reads_ends_at_its_deadline() {
        let (a, _b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let start = std::time::Instant::now();
        let until = start + std::time::Duration::from_millis(300);
        let e = send(&a, &vec![b'x'; 8 << 20], &[l.as_fd()], until).unwrap_err();
        assert!(matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{e:?}");
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(3), "held {took:?}");
    }

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send(&a, b"two\n", &[l1.as_fd(), l2.as_fd()], soon()).unwrap();
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
        send(&a, b"x", &[], soon()).unwrap();
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        assert!(send(&a, b"", &[], soon()).is_err());
    }

    /// More descriptors than the kernel takes in one message (253): 600 (300 threads'
    /// listeners for two VIPs) arrive whole and in order over several messages. The list names
    /// two listeners in turn (a message may carry one descriptor many times), and each one
    /// received is checked and closed as it comes, so that the test holds some 260 descriptors
    /// at most and passes under the usual limit of 1024 open files: with 600 copies sent and
    /// 600 received it held 1200, and the kernel cut a message short (MSG_CTRUNC) whenever the
    /// receiver read before the sender had closed its copies.
    #[test]
    fn more_descriptors_than_one_message_carries() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = [0, 1].map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let addrs = l.each_ref().map(|l| l.local_addr().unwrap());
        let fds: Vec<BorrowedFd<'_>> = (0..600).map(|i| l[i % 2].as_fd()).collect();
        let line = b"a line long enough to carry them\n";
        let (mut got, mut came) = (Vec::new(), Vec::new());
        std::thread::scope(|s| {
            let sender = s.spawn(|| send(&a, line, &fds, soon()));
            let mut buf = [0u8; 64];
            while !got.ends_with(b"\n") {
                let (n, more) = recv(&b, &mut buf).unwrap();
                assert!(n > 0, "the sender hung up early");
                got.extend_from_slice(&buf[..n]);
                for fd in more {
                    came.push(std::net::TcpListener::from(fd).local_addr().unwrap());
                }
            }
            sender.join().unwrap().unwrap();
        });
        assert_eq!(got, line);
        let sent: Vec<_> = (0..600).map(|i| addrs[i % 2]).collect();
        assert!(came == sent, "{} descriptors came, not in the order sent", came.len());
    }
}
