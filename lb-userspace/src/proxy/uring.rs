//! The proxy's sockets and their io_uring operations.
//!
//! Receives and sends are io_uring RECV and SEND operations rather than tokio-uring's READ and
//! WRITE. On a socket those went through the kernel's generic read/write path, which for a
//! read that has to wait sets up an iterator state to retry with; RECV and SEND go to the
//! socket directly. Measured (docs/BENCHMARKS.md), that is 5–10 % more requests per CPU-second.

use std::{io, marker::PhantomData, net::SocketAddr, os::fd::AsRawFd, rc::Rc, time::Duration};

use bytes::BytesMut;
use io_uring::{cqueue, opcode, types};
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot, buf::IoBuf, net::TcpStream};

/// A connected TCP socket. Clones share it; every operation in flight holds one, so the socket
/// is not closed (and its descriptor number not handed out again) before the kernel is done with
/// it, even when the future waiting for the operation was dropped on a timeout.
#[derive(Clone)]
pub(crate) struct Socket(Rc<TcpStream>);

impl Socket {
    /// Wraps a connected socket (in blocking mode: io_uring honours O_NONBLOCK and would fail
    /// an operation that has to wait with EAGAIN instead of waiting). A peer that takes none
    /// of the data sent to it for `stall` (the VIP's idle timeout: it stopped reading, or went
    /// away) has the connection aborted by the kernel (TCP_USER_TIMEOUT, which also bounds
    /// zero-window probing), so a pending send fails instead of holding the connection, and
    /// the one behind it, forever. The kernel keeps that clock: no timer per send.
    pub(crate) fn new(s: TcpStream, stall: Duration) -> Self {
        let s = Self(Rc::new(s));
        // Without it a stalled peer is still cut off by the whole-request deadline (or, for a
        // relay, never): worth a warning (once), not a refused connection.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Err(e) = s.with_sock(|r| r.set_tcp_user_timeout(Some(stall)))
            && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "setting TCP_USER_TIMEOUT: peers that stop reading are not cut off at the idle timeout");
        }
        s
    }

    /// Connects to `addr`; its sends may wait `stall` each.
    pub(crate) async fn connect(addr: SocketAddr, stall: Duration) -> io::Result<Self> {
        TcpStream::connect(addr).await.map(|s| Self::new(s, stall))
    }

    /// Shuts down one or both directions. This also completes a receive still pending on the
    /// socket (one abandoned on a timeout), which would otherwise keep the socket open.
    pub(crate) fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }

    /// Is this idle connection still open, with nothing unread? A peek that does not wait:
    /// false once the peer closed or reset it, or sent something unasked.
    pub(crate) fn idle_open(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        let r =
            self.with_sock(|s| s.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT));
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Runs `f` on the socket as socket2 sees it, for the calls io_uring is not needed for.
    #[allow(unsafe_code)]
    fn with_sock<R>(&self, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
        // SAFETY: the descriptor belongs to the socket in `self.0`, which outlives the borrow (`f` runs
        // while `&self` is held) and is closed only when the last clone of this socket is dropped.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0.as_raw_fd()) };
        f(socket2::SockRef::from(&fd))
    }

    /// Sets TCP_NODELAY.
    pub(crate) fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.0.set_nodelay(on)
    }

    /// Receives into `buf`'s spare capacity (first reserving `want` bytes of it), appending;
    /// Ok(0) at the end of the stream.
    pub(crate) async fn recv(
        &self,
        mut buf: BytesMut,
        want: usize,
    ) -> (io::Result<usize>, BytesMut) {
        buf.reserve(want);
        let spare = buf.spare_capacity_mut();
        let len = spare.len().min(u32::MAX as usize) as u32;
        let sqe = opcode::Recv::new(types::Fd(self.0.as_raw_fd()), spare.as_mut_ptr().cast(), len)
            .build();
        // The heap memory `sqe` points into moves with `buf` into the operation, which keeps it
        // until the kernel completes (tokio-uring holds a dropped operation's data until then).
        UnsubmittedOneshot::new(Held { buf, _socket: self.clone() }, Received, sqe).submit().await
    }

    /// Sends all of `data`, returning it when done (or failing once the peer took nothing for
    /// the socket's stall time: see [`Socket::new`]).
    pub(crate) async fn send_all<B: IoBuf>(&self, mut data: B) -> io::Result<B> {
        let mut sent = 0;
        while sent < data.bytes_init() {
            let ptr = data.stable_ptr().wrapping_add(sent);
            let len = (data.bytes_init() - sent).min(u32::MAX as usize) as u32;
            // MSG_NOSIGNAL: a peer that went away is an error to handle, not a SIGPIPE.
            let sqe = opcode::Send::new(types::Fd(self.0.as_raw_fd()), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            let held = Held { buf: data, _socket: self.clone() };
            let (r, b) = UnsubmittedOneshot::new(held, Sent(PhantomData), sqe).submit().await;
            data = b;
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) => return Err(e),
            }
        }
        Ok(data)
    }
}

/// What an operation in flight keeps alive: its buffer and its socket.
struct Held<B> {
    buf: B,
    _socket: Socket,
}

/// Completes a receive: the bytes the kernel wrote become part of the buffer.
struct Received;

impl OneshotOutputTransform for Received {
    type Output = (io::Result<usize>, BytesMut);
    type StoredData = Held<BytesMut>;

    #[allow(unsafe_code)]
    fn transform_oneshot_output(self, held: Held<BytesMut>, cqe: cqueue::Entry) -> Self::Output {
        let mut buf = held.buf;
        let r = cqe.result();
        if r < 0 {
            return (Err(io::Error::from_raw_os_error(-r)), buf);
        }
        let n = r as usize;
        // SAFETY: the kernel wrote `n` bytes (at most the length it was given) into the spare
        // capacity right after the buffer's initialized part.
        unsafe { buf.set_len(buf.len() + n) };
        (Ok(n), buf)
    }
}

/// Completes a send: how many bytes went, and the buffer back.
struct Sent<B>(PhantomData<B>);

impl<B> OneshotOutputTransform for Sent<B> {
    type Output = (io::Result<usize>, B);
    type StoredData = Held<B>;

    fn transform_oneshot_output(self, held: Held<B>, cqe: cqueue::Entry) -> Self::Output {
        let r = cqe.result();
        let r = if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(r as usize) };
        (r, held.buf)
    }
}
