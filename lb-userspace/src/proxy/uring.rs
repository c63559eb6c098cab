//! The proxy's sockets and their io_uring operations.
//!
//! Receives and sends are io_uring RECV and SEND operations rather than tokio-uring's READ and
//! WRITE. On a socket those went through the kernel's generic read/write path, which for a
//! read that has to wait sets up an iterator state to retry with; RECV and SEND go to the
//! socket directly. Measured (docs/BENCHMARKS.md), that is 5–10 % more requests per CPU-second.

use std::{
    cell::Cell,
    future::Future,
    io,
    marker::PhantomData,
    net::SocketAddr,
    os::fd::AsRawFd,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::BytesMut;
use io_uring::{cqueue, opcode, types};
use tokio_uring::{
    InFlightOneshot, OneshotOutputTransform, UnsubmittedOneshot, buf::IoBuf, net::TcpStream,
};

/// A connected TCP socket. Clones share it; every operation in flight holds one, so the socket
/// is not closed (and its descriptor number not handed out again) before the kernel is done with
/// it, even when the future waiting for the operation was dropped on a timeout.
#[derive(Clone)]
pub(crate) struct Socket(Rc<Shared>);

/// What the clones of a [`Socket`] share.
struct Shared {
    /// The socket.
    stream: TcpStream,
    /// The TCP_USER_TIMEOUT it has, as last set (see [`Socket::keep_stall`]).
    stall: Cell<Duration>,
}

impl Socket {
    /// Wraps a connected socket (in blocking mode: io_uring honours O_NONBLOCK and would fail
    /// an operation that has to wait with EAGAIN instead of waiting). A peer that takes none
    /// of the data sent to it for `stall` (the VIP's idle timeout, or its tunnel timeout for a
    /// relay: it stopped reading, or went away) has the connection aborted by the kernel
    /// (TCP_USER_TIMEOUT, which also bounds zero-window probing), so a pending send fails
    /// instead of holding the connection, and the one behind it, forever. The kernel keeps that
    /// clock: no timer per send. Each request gives its connections the idle timeout in force
    /// for it, and a relay its tunnel timeout ([`Socket::keep_stall`]).
    pub(crate) fn new(s: TcpStream, stall: Duration) -> Self {
        let s = Self::of(s);
        s.set_stall(stall);
        s
    }

    /// Wraps `s`, its TCP_USER_TIMEOUT not set yet.
    fn of(s: TcpStream) -> Self {
        Self(Rc::new(Shared { stream: s, stall: Cell::new(Duration::ZERO) }))
    }

    /// Gives the socket `stall` as its TCP_USER_TIMEOUT (see [`Socket::new`]) unless it has it
    /// already: the idle timeout of the config a request runs under, which a reload may have
    /// changed since the socket was made, or, on a pooled backend connection, which another
    /// VIP's request may have set (the pool keeps connections by backend address alone).
    /// Otherwise the kernel went on aborting a stalled peer at the old value while the proxy's
    /// own idle clocks ran on the new one. One comparison when it has.
    pub(crate) fn keep_stall(&self, stall: Duration) {
        if self.0.stall.get() != stall {
            self.set_stall(stall);
        }
    }

    /// Sets TCP_USER_TIMEOUT to `stall` (see [`Socket::new`]).
    fn set_stall(&self, stall: Duration) {
        // Recorded even if the kernel refuses it: not tried again for every request.
        self.0.stall.set(stall);
        // Without it a stalled peer is still cut off by the whole-request deadline (or, for a
        // relay, never): worth a warning (once), not a refused connection.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Err(e) = self.with_sock(|r| r.set_tcp_user_timeout(Some(stall)))
            && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "setting TCP_USER_TIMEOUT: peers that stop reading are not cut off at the idle timeout");
        }
    }

    /// Connects to `addr`, giving up after `within` (`TimedOut`); its sends may wait `stall`
    /// each. The connection has TCP_NODELAY, as the client connections have it from their
    /// listener: a relay or a request passes on bytes as they come, and under Nagle's algorithm
    /// a small write behind one not yet acknowledged waits for the peer's delayed ACK (some
    /// 40 ms on Linux), which a peer waiting for the rest of a message does not send sooner.
    ///
    /// An attempt given up, on that timeout or because this future was dropped, ends in the
    /// kernel too: the connecting socket is shut down, which stops its SYN retransmissions at
    /// once. Only dropping the wait would leave it in SYN_SENT for the kernel's whole SYN retry
    /// schedule (`tcp_syn_retries`: about two minutes), still able to connect to a backend
    /// nobody waits for, one such socket per attempt at a blackholed backend. TCP_USER_TIMEOUT
    /// is `within` until the handshake completes as well, in case an attempt ever escapes the
    /// shutdown: Linux honours it in SYN_SENT, though only when the SYN retransmission timer
    /// fires (1 s, 3 s, 7 s... after the first SYN), so it alone would end the attempt late.
    pub(crate) async fn connect(
        addr: SocketAddr,
        within: Duration,
        stall: Duration,
    ) -> io::Result<Self> {
        let sock =
            socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        // Best effort: the shutdown below is what ends an abandoned attempt on time.
        let _ = sock.set_tcp_user_timeout(Some(within));
        // Best effort too: without it the connection works, only slower.
        let _ = sock.set_tcp_nodelay(true);
        let s = Self::of(TcpStream::from_std(sock.into()));
        let attempt = Connecting(Some(s.clone()));
        // Boxed: the operation keeps the address (which the SQE points to) until the kernel
        // completes it, wherever the box moves.
        let to = Box::new(socket2::SockAddr::from(addr));
        let sqe =
            opcode::Connect::new(types::Fd(s.0.stream.as_raw_fd()), to.as_ptr().cast(), to.len())
                .build();
        let op = UnsubmittedOneshot::new(Held { buf: to, _socket: s.clone() }, Connected, sqe);
        match tokio::time::timeout(within, op.submit()).await {
            Ok(Ok(())) => {
                attempt.done();
                s.set_stall(stall);
                Ok(s)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Shuts down one or both directions. This also completes a receive still pending on the
    /// socket (one abandoned on a timeout), which would otherwise keep the socket open.
    pub(crate) fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        self.0.stream.shutdown(how)
    }

    /// Is this idle connection still open, with nothing unread? A peek that does not wait:
    /// false once the peer closed or reset it, or sent something unasked.
    pub(crate) fn idle_open(&self) -> bool {
        matches!(self.peek(), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Has the peer sent bytes that nobody has read yet? A peek that does not wait. Closing a
    /// socket with unread bytes resets the connection at once (and so does a byte arriving
    /// after the close), which throws away whatever of the answer the kernel still had to send:
    /// the caller closes such a connection lingering instead.
    pub(crate) fn has_unread(&self) -> bool {
        matches!(self.peek(), Ok(n) if n > 0)
    }

    /// Has the peer ended its side (FIN) or reset the connection, with nothing unread before
    /// that end? A peek that does not wait. Writing to a peer that only ended its side
    /// succeeds (it may have half-closed and still read), so a write cannot tell that it left.
    pub(crate) fn ended(&self) -> bool {
        match self.peek() {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        }
    }

    /// Peeks at one byte without waiting: Ok(1) when something is unread, Ok(0) once the peer
    /// ended its side, WouldBlock when it is open with nothing unread, or the socket's error.
    fn peek(&self) -> io::Result<usize> {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        self.with_sock(|s| s.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT))
    }

    /// Runs `f` on the socket as socket2 sees it, for the calls io_uring is not needed for.
    #[allow(unsafe_code)]
    fn with_sock<R>(&self, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
        // SAFETY: the descriptor belongs to the socket in `self.0`, which outlives the borrow (`f` runs
        // while `&self` is held) and is closed only when the last clone of this socket is dropped.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0.stream.as_raw_fd()) };
        f(socket2::SockRef::from(&fd))
    }

    /// Receives into `buf`'s spare capacity (first reserving `want` bytes of it), appending;
    /// Ok(0) at the end of the stream.
    pub(crate) async fn recv(&self, buf: BytesMut, want: usize) -> (io::Result<usize>, BytesMut) {
        self.recv_armed(buf, want).await
    }

    /// [`Socket::recv`], issued now rather than when first polled, and held: an idle pooled
    /// connection keeps one pending, which both notices whatever the backend does meanwhile
    /// (see [`Armed::pending`]) and is the first read of the next response on it.
    pub(crate) fn recv_armed(&self, mut buf: BytesMut, want: usize) -> Armed {
        buf.reserve(want);
        let spare = buf.spare_capacity_mut();
        let len = spare.len().min(u32::MAX as usize) as u32;
        let sqe =
            opcode::Recv::new(types::Fd(self.0.stream.as_raw_fd()), spare.as_mut_ptr().cast(), len)
                .build();
        // The heap memory `sqe` points into moves with `buf` into the operation, which keeps it
        // until the kernel completes (tokio-uring holds a dropped operation's data until then).
        Armed(UnsubmittedOneshot::new(Held { buf, _socket: self.clone() }, Received, sqe).submit())
    }

    /// Sends all of `data`, returning it when done (or failing once the peer took nothing for
    /// the socket's stall time: see [`Socket::new`]).
    pub(crate) async fn send_all<B: IoBuf>(&self, data: B) -> io::Result<B> {
        self.send_all_with(data, || {}).await
    }

    /// [`Socket::send_all`], calling `progress` after each send that took part of `data`: a
    /// slow receiver takes a large buffer in several sends, each of them progress that a relay's
    /// idle clock must see.
    pub(crate) async fn send_all_with<B: IoBuf>(
        &self,
        mut data: B,
        progress: impl Fn(),
    ) -> io::Result<B> {
        let mut sent = 0;
        while sent < data.bytes_init() {
            let ptr = data.stable_ptr().wrapping_add(sent);
            let len = (data.bytes_init() - sent).min(u32::MAX as usize) as u32;
            // MSG_NOSIGNAL: a peer that went away is an error to handle, not a SIGPIPE.
            let sqe = opcode::Send::new(types::Fd(self.0.stream.as_raw_fd()), ptr, len)
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
            progress();
        }
        Ok(data)
    }

    /// Ends the connection with a reset (RST) now, so that its peer reads an error, not an end
    /// of stream: how a relay passes on the reset or failure of the connection on its other
    /// side, and how an idle backend connection closes without leaving a TIME_WAIT on this
    /// node (`http::upstream_pool::close_idle`). connect() to an AF_UNSPEC address disconnects a
    /// TCP socket at once (connect(2); the kernel's `tcp_disconnect`, which sends the RST, drops
    /// what was queued either way and wakes the operations pending on the socket). A close with
    /// SO_LINGER {on, 0} would reset too, but only when the last clone of the socket goes,
    /// which the operations in flight hold; and shutdown() would send an orderly FIN first.
    /// SO_LINGER {on, 0} is set as well, so that should the disconnect ever fail, the close
    /// still resets.
    #[allow(unsafe_code)]
    pub(crate) fn abort(&self) {
        let _ = self.with_sock(|s| s.set_linger(Some(Duration::ZERO)));
        let unspec =
            libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
        // SAFETY: a valid descriptor (held by `self`) and a valid address of the length given.
        unsafe {
            libc::connect(
                self.0.stream.as_raw_fd(),
                &unspec,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            );
        }
    }

    /// Does the kernel still hold bytes sent on this connection that its peer has not
    /// acknowledged (sent or not yet), on a connection still up? A relay whose own sends are
    /// long done is not idle while the peer drains them (a slow reader); a peer that takes
    /// nothing for the stall time has the connection aborted by the kernel (see
    /// [`Socket::new`]), which ends that. One getsockopt(TCP_INFO).
    pub(crate) fn delivering(&self) -> bool {
        // Linux's TCP states in which queued bytes still go out.
        const ESTABLISHED: u8 = 1;
        const FIN_WAIT1: u8 = 4;
        const CLOSE_WAIT: u8 = 8;
        const LAST_ACK: u8 = 9;
        const CLOSING: u8 = 11;
        let Ok((info, _)) = crate::tcp_info::get(&self.0.stream) else { return false };
        matches!(info.tcpi_state, ESTABLISHED | FIN_WAIT1 | CLOSE_WAIT | LAST_ACK | CLOSING)
            && (info.tcpi_unacked > 0 || info.tcpi_notsent_bytes > 0)
    }
}

/// A connect in progress: dropped before [`Connecting::done`] (given up, or its future dropped),
/// it shuts the socket down, which ends the kernel's attempt (a shutdown of a socket in
/// SYN_SENT disconnects it) and so completes the operation, which then closes the socket.
struct Connecting(Option<Socket>);

impl Connecting {
    /// The connection is established: nothing to end.
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A receive in flight ([`Socket::recv_armed`]): awaited, the bytes received (Ok(0) at the end
/// of the stream) and the buffer. Dropped, it stays in flight until the kernel completes it,
/// holding its buffer and its socket, as any operation abandoned; a shutdown of the socket
/// completes it at once.
pub(crate) struct Armed(InFlightOneshot<Held<BytesMut>, Received>);

impl Armed {
    /// Is the receive still waiting, nothing received, no end of stream, no error? Looks once,
    /// without waiting and without a system call: what the thread's io_uring has completed so
    /// far. Still waiting, it is handed back, to be awaited later; completed, its outcome is.
    pub(crate) fn pending(mut self) -> Result<Self, (io::Result<usize>, BytesMut)> {
        match Pin::new(&mut self.0).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Pending => Ok(self),
            Poll::Ready(done) => Err(done),
        }
    }
}

impl Future for Armed {
    type Output = (io::Result<usize>, BytesMut);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A waker left by `pending` (a no-op one) is replaced by this one.
        Pin::new(&mut self.0).poll(cx)
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

/// Completes a connect.
struct Connected;

impl OneshotOutputTransform for Connected {
    type Output = io::Result<()>;
    type StoredData = Held<Box<socket2::SockAddr>>;

    fn transform_oneshot_output(
        self,
        _: Held<Box<socket2::SockAddr>>,
        cqe: cqueue::Entry,
    ) -> io::Result<()> {
        let r = cqe.result();
        if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
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
