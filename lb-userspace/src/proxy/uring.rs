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
    /// How long a send may wait with its peer taking none of the bytes sent to it (see
    /// [`Socket::new`] and [`Socket::keep_stall`]).
    stall: Cell<Duration>,
    /// The bytes the peer had acknowledged at [`Socket::draining`]'s last look.
    acked: Cell<u64>,
    /// Its close has begun ([`Socket::begin_close`]): what was to be sent on it is
    /// all with the kernel, so a stop's drain deadline hands it to the kernel rather than
    /// resetting it ([`Socket::end_at_deadline`]).
    closing: Cell<bool>,
    /// How many of its close's looks at the peer ([`Socket::wait_delivered`], and a lingering
    /// close's, [`Socket::look_lingering`]) saw it take more, up to 2: one that took more at
    /// two looks at least is reading, and a handover gets the kernel's timeout for a reader
    /// ([`Socket::hand_to_kernel`]). Not one look: what the peer took first may only have
    /// filled the room its window had then (a client that reads nothing took 2 KiB more 40 ms
    /// into the wait, and nothing after).
    took_more: Cell<u8>,
    /// The bytes the peer had acknowledged at a lingering close's last look
    /// ([`Socket::look_lingering`]); `None` before its first (or if the kernel does not say).
    lingered: Cell<Option<u64>>,
    /// Ended at a stop's drain deadline already ([`Socket::end_at_deadline`]).
    ended: Cell<bool>,
}

/// The TCP_USER_TIMEOUT a connection handed to the kernel at a stop's drain deadline gets
/// ([`Socket::hand_to_kernel`]) when its peer was seen reading, unless its stall time is
/// longer: the kernel holds such an orphan, outside the proxy's sight and limits, no longer
/// than this (or the stall time) after the process is gone, however slow the reader.
const HANDED_READER_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The most unread bytes a connection handed to the kernel at a stop's drain deadline has read
/// and dropped so that its close is a FIN, not a reset ([`Socket::hand_to_kernel`]): far more
/// than pipelined requests take, and bounded, as the deadline does this for every such
/// connection on the thread at once; a client with more unread is reset at the close.
const HANDED_DISCARD: usize = 1 << 20;

/// How many times a send's peer is looked at within its socket's stall time, once the send
/// waits that long, and how many looks in a row that see it take nothing cut it: between one
/// stall time and one and a quarter after its last progress (see [`Socket::send_all_with`]).
const LOOKS_PER_STALL: u32 = 4;

impl Socket {
    /// Wraps a connected socket (in blocking mode: io_uring honours O_NONBLOCK and would fail
    /// an operation that has to wait with EAGAIN instead of waiting). A peer that takes none
    /// of the data sent to it for `stall` (the VIP's idle timeout, or its tunnel timeout for a
    /// relay: it stopped reading, or went away) has the connection aborted by the proxy, so a
    /// pending send fails instead of holding the connection, and the one behind it, forever
    /// ([`Socket::send_all_with`] watches the bytes the peer acknowledges). A peer that keeps
    /// reading, however slowly, is not cut. Each request gives its connections the idle timeout
    /// in force for it, and a relay its tunnel timeout ([`Socket::keep_stall`]).
    ///
    /// Not the kernel's TCP_USER_TIMEOUT, which was that clock before: Linux times zero-window
    /// probing from the first probe, and starts that clock again only when the window opens
    /// wide enough for the whole segment queued first, so a reader slower than its sender
    /// that frees its window a few KiB at a time was aborted at the timeout while it kept
    /// reading, and would be at any value.
    pub(crate) fn new(s: TcpStream, stall: Duration) -> Self {
        Self(Rc::new(Shared {
            stream: s,
            stall: Cell::new(stall),
            acked: Cell::new(0),
            closing: Cell::new(false),
            took_more: Cell::new(0),
            lingered: Cell::new(None),
            ended: Cell::new(false),
        }))
    }

    /// Gives the socket `stall` as its stall time (see [`Socket::new`]): the idle timeout of
    /// the config a request runs under, which a reload may have changed since the socket was
    /// made, or, on a pooled backend connection, which another VIP's request may have set (the
    /// pool keeps connections by backend address alone), or a relay's tunnel timeout. Otherwise
    /// a stalled peer went on being cut at the old value while the proxy's own idle clocks ran
    /// on the new one. No system call: the proxy keeps that clock.
    pub(crate) fn keep_stall(&self, stall: Duration) {
        self.0.stall.set(stall);
    }

    /// Connects to `addr`, giving up after `within` (`TimedOut`); its sends may wait `stall`
    /// for their peer to take something (see [`Socket::new`]). The connection has TCP_NODELAY,
    /// as the client connections have it from their listener: a relay or a request passes on
    /// bytes as they come, and under Nagle's algorithm a small write behind one not yet
    /// acknowledged waits for the peer's delayed ACK (some 40 ms on Linux), which a peer
    /// waiting for the rest of a message does not send sooner.
    ///
    /// An attempt given up, on that timeout or because this future was dropped, ends in the
    /// kernel too: the connecting socket is shut down, which stops its SYN retransmissions at
    /// once. Only dropping the wait would leave it in SYN_SENT for the kernel's whole SYN retry
    /// schedule (`tcp_syn_retries`: about two minutes), still able to connect to a backend
    /// nobody waits for, one such socket per attempt at a blackholed backend. TCP_USER_TIMEOUT
    /// is `within` until the handshake completes as well, in case an attempt ever escapes the
    /// shutdown: Linux honours it in SYN_SENT, though only when the SYN retransmission timer
    /// fires (1 s, 3 s, 7 s... after the first SYN), so it alone would end the attempt late.
    /// Connected, the socket has it no more: it would cut a slow reader (see [`Socket::new`]).
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
        let s = Self::new(TcpStream::from_std(sock.into()), stall);
        let attempt = Connecting(Some(s.clone()));
        // Boxed: the operation keeps the address (which the SQE points to) until the kernel
        // completes it, wherever the box moves.
        let to = Box::new(socket2::SockAddr::from(addr));
        let sqe =
            opcode::Connect::new(types::Fd(s.0.stream.as_raw_fd()), to.as_ptr().cast(), to.len())
                .build();
        let op = UnsubmittedOneshot::new(Held::new(to, s.clone()), Connected, sqe);
        match tokio::time::timeout(within, op.submit()).await {
            Ok(Ok(())) => {
                attempt.done();
                s.no_user_timeout();
                Ok(s)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Takes the connect's TCP_USER_TIMEOUT off the connected socket (see [`Socket::connect`]).
    /// Left on, it would abort a slow reader at the connect timeout: worth a warning (once), not
    /// a refused connection (Linux does not refuse it).
    fn no_user_timeout(&self) {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Err(e) = self.with_sock(|r| r.set_tcp_user_timeout(None))
            && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "clearing TCP_USER_TIMEOUT after a connect: the kernel may abort backend connections whose peer reads slowly, at the connect timeout");
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
        // until the kernel completes: tokio-uring holds a dropped operation's data until then,
        // but for one still in flight as the runtime ends, which `Held` keeps from being freed.
        Armed(UnsubmittedOneshot::new(Held::new(buf, self.clone()), Received, sqe).submit())
    }

    /// Sends all of `data`, returning it when done (or failing with `TimedOut` once the peer
    /// took nothing for the socket's stall time: see [`Socket::new`]).
    pub(crate) async fn send_all<B: IoBuf>(&self, data: B) -> io::Result<B> {
        self.send_all_with(data, || {}).await
    }

    /// [`Socket::send_all`], calling `progress` after each send that took part of `data`, and
    /// whenever a send that waits sees its peer acknowledge more: a slow receiver takes a large
    /// buffer in several sends, or in one that waits long, each of them progress that a
    /// relay's idle clock must see.
    ///
    /// A send still waiting after a quarter of the stall time (rounded up to the watch's
    /// [`TICK`]) has its peer looked at (TCP_INFO's `tcpi_bytes_acked`), and again every
    /// quarter: one that acknowledged more since the look before makes progress, and the send
    /// goes on waiting; the [`LOOKS_PER_STALL`]th look in a row that sees none (the first look
    /// has nothing to compare with, and counts none) aborts the connection ([`Socket::abort`]:
    /// a reset, which also completes the send, with an error, as it must: a send is never
    /// dropped while the kernel has it, nor issued again) and the send fails with `TimedOut`.
    /// So a peer is cut between one stall time and one and a quarter after its last progress
    /// a look saw (the quarters rounded up), or one and a quarter after the send began to wait
    /// if none did. Looks are counted, not timed: the ticks they come at are the stall time's
    /// grain, and a clock read against the stall time cut at the fifth look or the sixth by a
    /// tick's jitter. A send that completes before its first look costs no timer and no system
    /// call.
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
            let held = Held::new(data, self.clone());
            let op = UnsubmittedOneshot::new(held, Sent(PhantomData), sqe).submit();
            let Some((r, b)) = self.unless_stalled(op, &progress).await else {
                return Err(io::ErrorKind::TimedOut.into());
            };
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

    /// Waits for send `op` as long as its peer takes something within the stall time (see
    /// [`Socket::send_all_with`]), calling `progress` when a look sees it take more. `None`
    /// when it did not: the connection was aborted, and the send has completed (its outcome,
    /// an error, dropped).
    async fn unless_stalled<T>(
        &self,
        op: impl Future<Output = T>,
        progress: &impl Fn(),
    ) -> Option<T> {
        let mut op = std::pin::pin!(op);
        let every = ticks(self.0.stall.get() / LOOKS_PER_STALL);
        // On the thread's watch from its first wait on ([`Watch`]): no timer of its own.
        let mut watched: Option<Watched> = None;
        let mut looks = Looks::default();
        loop {
            let done = std::future::poll_fn(|cx| {
                if let Poll::Ready(out) = op.as_mut().poll(cx) {
                    return Poll::Ready(Some(out));
                }
                match &watched {
                    None => watched = Some(Watched::new(cx.waker(), every)),
                    Some(w) if w.due() => return Poll::Ready(None),
                    Some(w) => w.wake(cx.waker()),
                }
                Poll::Pending
            })
            .await;
            let Some(w) = &watched else { return done };
            if let Some(out) = done {
                return Some(out);
            }
            match looks.look(self.acked_bytes()) {
                Look::Progress => progress(),
                Look::Nothing => {}
                Look::Stalled => {
                    drop(watched);
                    self.abort();
                    op.await;
                    return None;
                }
            }
            w.again(every);
        }
    }

    /// The bytes of this connection its peer has acknowledged (TCP_INFO's `tcpi_bytes_acked`,
    /// Linux 4.1 on, older than io_uring's sends), or `None` if the kernel does not say.
    fn acked_bytes(&self) -> Option<u64> {
        let (info, len) = crate::tcp_info::get(&self.0.stream).ok()?;
        acked_of(&info, len)
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

    /// Closes the connection once the kernel has sent its peer everything sent on it (this
    /// also completes a receive still pending on it, as [`Socket::shutdown`] does): at once
    /// when nothing is left unsent ([`Socket::unsent`], one getsockopt), the common case, even
    /// off loopback, where the last bytes are still on their way for a round trip: the kernel
    /// delivers those, and gives up on a peer that vanished after its retransmissions
    /// (`tcp_orphan_retries`). Otherwise (the peer's window is closed on the rest) the sending
    /// side is shut first (a FIN after the data) and the close waits while the peer takes more
    /// (TCP_INFO's `tcpi_bytes_acked`), until nothing is left unsent, or resets the connection
    /// ([`Socket::abort`]) once the peer took nothing for the socket's stall time. Closed at
    /// once, the socket would become an orphan the kernel keeps sending to for minutes,
    /// zero-window probing a peer that reads nothing (some 5.5 minutes seen), beyond the
    /// proxy's sight and `max_connections`; and no TCP_USER_TIMEOUT set for the close would do
    /// instead, as it cuts a slow reader still reading the tail (see [`Socket::new`]). The
    /// caller's connection stays open, and counted, while this waits; a stop's drain deadline
    /// drops the wait and hands the socket to the kernel ([`Socket::end_at_deadline`]).
    ///
    /// The peer is looked at [`FIRST_CLOSING_LOOK`] after the shutdown, then at twice the
    /// interval before, up to a quarter of the stall time: a peer that reads has everything
    /// within a round trip or so, and must not hold its connection for a quarter of the idle
    /// timeout. A timer per look: a close that waits is rare.
    pub(crate) async fn close_when_delivered(&self) {
        self.close_delivered(self.unsent()).await;
    }

    /// [`Socket::close_when_delivered`], whose caller has looked whether the kernel holds
    /// bytes it has not sent the peer yet (`unsent`, [`Socket::unsent`]).
    async fn close_delivered(&self, unsent: bool) {
        self.begin_close();
        if unsent {
            let _ = self.shutdown(std::net::Shutdown::Write);
            self.wait_delivered().await;
        }
        let _ = self.shutdown(std::net::Shutdown::Both);
    }

    /// [`Socket::close_when_delivered`] in a task of its own, for a connection nobody waits
    /// for any more (`http::upstream_pool::close_idle`), whose caller has looked whether the
    /// kernel holds bytes it has not sent the peer yet (`unsent`: [`Unacked::Unsent`]). The
    /// close is begun at once, and a task dropped before its close is done (its thread's
    /// runtime ends at a stop, the task maybe never polled) hands the socket to the kernel
    /// ([`Socket::end_at_deadline`], via [`Detached`]) rather than closing it plainly:
    /// plainly, it was an orphan with no TCP_USER_TIMEOUT, probed for minutes when its peer
    /// read nothing.
    pub(crate) fn close_detached(self, unsent: bool) {
        self.begin_close();
        let close = Detached(Some(self));
        tokio_uring::spawn(async move {
            if let Some(s) = &close.0 {
                s.close_delivered(unsent).await;
            }
            close.done();
        });
    }

    /// Waits, its sending side shut, until the kernel has sent the peer everything sent on this
    /// connection, or resets the connection once the peer took nothing for the stall time (see
    /// [`Socket::close_when_delivered`]).
    async fn wait_delivered(&self) {
        let stall = self.0.stall.get();
        let quarter = (stall / LOOKS_PER_STALL).max(FIRST_CLOSING_LOOK);
        let mut every = FIRST_CLOSING_LOOK;
        let mut acked = self.acked_bytes();
        // When the connection is reset unless the peer takes more before.
        let mut cut = tokio::time::Instant::now() + stall;
        loop {
            tokio::time::sleep_until(cut.min(tokio::time::Instant::now() + every)).await;
            every = (every * 2).min(quarter);
            let Ok((info, len)) = crate::tcp_info::get(&self.0.stream) else { return };
            if !unsent_in(&info) {
                return;
            }
            let now = acked_of(&info, len);
            if now != acked {
                self.took_more();
                acked = now;
                cut = tokio::time::Instant::now() + stall;
            } else if tokio::time::Instant::now() >= cut {
                self.abort();
                return;
            }
        }
    }

    /// Counts a look of its close that saw the peer take more ([`Shared::took_more`]).
    fn took_more(&self) {
        self.0.took_more.set((self.0.took_more.get() + 1).min(2));
    }

    /// Looks at the peer of a lingering close (`http::linger`: its answer complete, what the
    /// client still sends read and dropped): has it acknowledged more since the look before?
    /// Such a look counts as one of its close's ([`Shared::took_more`]), so that a stop's
    /// deadline that comes while the close lingers hands a peer seen reading to the kernel
    /// with the reader's timeout ([`handed_timeout`]), not its stall time: a slow reader of a
    /// large answer, with a request pipelined behind it, was reset after the process exited.
    /// The linger looks when it begins, and now and then while it lasts; the handover looks
    /// once more ([`Socket::hand_to_kernel`]). One getsockopt(TCP_INFO): a linger is rare,
    /// and an ordinary close does not look.
    pub(crate) fn look_lingering(&self) {
        let Some(now) = self.acked_bytes() else { return };
        if self.0.lingered.replace(Some(now)).is_some_and(|before| now != before) {
            self.took_more();
        }
    }

    /// Marks its close as begun: everything to be sent on it is with the kernel (the answer,
    /// or a relay's direction, is complete), so that a stop's drain deadline hands it to the
    /// kernel rather than resetting it ([`Socket::end_at_deadline`]). Its close's
    /// [`Socket::close_when_delivered`] does this, and so does a lingering close before it
    /// (`http::linger`, after a complete answer), which otherwise was reset at the deadline.
    pub(crate) fn begin_close(&self) {
        self.0.closing.set(true);
    }

    /// Has its close begun ([`Socket::begin_close`])? Then everything to be sent on
    /// it is with the kernel (the answer, or a relay's direction, is complete).
    pub(crate) fn closing(&self) -> bool {
        self.0.closing.get()
    }

    /// Ends the connection at a stop's drain deadline: hands it to the kernel if its close has
    /// begun ([`Socket::hand_to_kernel`]: what is left of a complete answer is still
    /// delivered, after the process ends), or resets it ([`Socket::abort`]) if it is still in
    /// the middle of an exchange, where a close would pass the part sent for the whole.
    /// Once: a finished relay's client socket comes here from the accept loop, then again as
    /// the relay is dropped (`tcp::Unfinished`).
    pub(crate) fn end_at_deadline(&self) {
        if self.0.ended.replace(true) {
            return;
        }
        if self.closing() { self.hand_to_kernel() } else { self.abort() }
    }

    /// Leaves a connection whose close has begun to the kernel, at a stop's drain deadline,
    /// rather than waiting in [`Socket::close_when_delivered`] (the stop would wait for the
    /// slowest reader) or resetting it (a slow reader still taking the tail of a complete
    /// answer lost that tail): it gets a TCP_USER_TIMEOUT ([`handed_timeout`]), and is shut
    /// down both ways (its sending side is shut already, the FIN queued behind the data; this
    /// completes a receive still pending on it, whose clone of the socket would keep the
    /// descriptor open), so that it closes as soon as the caller drops its last clone. The
    /// kernel then delivers the rest to the peer on its own, an orphan, and gives up on it at
    /// that timeout: without one such an orphan was probed for some 5.5 minutes, outside the
    /// proxy's sight.
    ///
    /// The timeout is the kernel's clock, not the proxy's stall clock: Linux times zero-window
    /// probing from the first probe and starts that clock again only when the window opens
    /// wide enough for the whole segment queued first (see [`Socket::new`]), so a reader that
    /// frees its window a few KiB at a time is cut at the timeout however steadily it reads.
    /// At the stall time alone, such a reader whose rest took longer than about that was cut
    /// (30 readers at 50 KB/s through 256 KiB buffers, idle timeout 5 s: 9 reset 7.6 to 18 s
    /// after the stop, one at 97 %). And that clock may have run long before the handover, all
    /// through the answer's last sends and the close's wait, so no timeout sized from the
    /// handover on (the rest at the rate seen) can be trusted to outlast it. Hence a peer the
    /// close saw reading ([`Shared::took_more`]: its wait's looks, or a lingering close's,
    /// with one more here) gets [`HANDED_READER_TIMEOUT`], ten minutes (or its stall time, if
    /// longer), a generous bound on an orphan; one not seen taking more than once (one that
    /// reads nothing, or a close that had not waited and looked yet) gets the stall time, ten
    /// minutes at most (a relay's is its tunnel timeout, up to a day): the bounded orphan this
    /// is for.
    ///
    /// What the peer sent that nobody read (a request sent behind a `Connection: close`
    /// answer) is read and dropped first ([`Socket::discard_unread`]): Linux resets a
    /// connection closed with unread bytes, and the reset throws away the rest of the answer,
    /// though the deadline counts the connection as handed. Bytes that arrive after the close
    /// still reset it, as they would at any server's close. Best effort: a socket reset
    /// meanwhile refuses every call, and has nothing left to deliver.
    pub(crate) fn hand_to_kernel(&self) {
        self.discard_unread();
        if self.0.lingered.get().is_some() {
            self.look_lingering();
        }
        let timeout = self.handed_timeout();
        let _ = self.with_sock(|s| s.set_tcp_user_timeout(Some(timeout)));
        let _ = self.shutdown(std::net::Shutdown::Both);
    }

    /// Reads and drops, without waiting, what the peer sent that nobody read, up to
    /// [`HANDED_DISCARD`] bytes (see [`Socket::hand_to_kernel`]): until nothing is left, the
    /// peer's end, or an error.
    fn discard_unread(&self) {
        let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); 16 << 10];
        let mut left = HANDED_DISCARD;
        while left > 0 {
            match self.with_sock(|s| s.recv_with_flags(&mut sink, libc::MSG_DONTWAIT)) {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => return,
            }
        }
    }

    /// The TCP_USER_TIMEOUT of this connection handed to the kernel now (see
    /// [`Socket::hand_to_kernel`]).
    fn handed_timeout(&self) -> Duration {
        handed_timeout(self.0.stall.get(), self.0.took_more.get())
    }

    /// Does the kernel still hold bytes sent on this connection that it has not sent its peer
    /// yet (its window closed on them), on a connection still up? One getsockopt(TCP_INFO).
    pub(crate) fn unsent(&self) -> bool {
        crate::tcp_info::get(&self.0.stream).is_ok_and(|(info, _)| unsent_in(&info))
    }

    /// Is the peer draining bytes sent on this connection: does the kernel still hold some
    /// for it ([`Socket::unacknowledged`]), and has it acknowledged more since this was last
    /// asked (or, the first time, ever)? A relay whose own sends are long done is not idle
    /// while the peer drains them (a slow reader); one whose peer takes nothing more (it
    /// stopped reading, or went away), bytes still queued for it, is, and so is one whose peer
    /// has everything. One getsockopt(TCP_INFO).
    pub(crate) fn draining(&self) -> bool {
        let Ok((info, len)) = crate::tcp_info::get(&self.0.stream) else { return false };
        let acked = acked_of(&info, len).unwrap_or(0);
        let more = acked != self.0.acked.replace(acked);
        more && queued(&info)
    }

    /// Does the kernel still hold bytes sent on this connection that its peer has not
    /// acknowledged (sent or not yet), on a connection still up, and are some of them not sent
    /// yet? Closed at once, such a connection would throw them away
    /// (`http::upstream_pool::close_idle`), and its close waits if some are unsent
    /// ([`Socket::close_detached`]). One getsockopt(TCP_INFO), for both.
    pub(crate) fn unacknowledged(&self) -> Unacked {
        match crate::tcp_info::get(&self.0.stream) {
            Ok((info, _)) if unsent_in(&info) => Unacked::Unsent,
            Ok((info, _)) if queued(&info) => Unacked::Sent,
            _ => Unacked::Nothing,
        }
    }
}

/// What the kernel holds of the bytes sent on a connection that its peer has not acknowledged
/// ([`Socket::unacknowledged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unacked {
    /// Nothing (or the connection is down, or the kernel did not say).
    Nothing,
    /// Some, all sent, on their way or waiting for the peer's acknowledgement.
    Sent,
    /// Some not sent yet (the peer's window closed on them).
    Unsent,
}

/// The bytes a connection's peer has acknowledged, from its TCP_INFO `info` of `len` bytes (as
/// the kernel filled it: `tcpi_bytes_acked` came with Linux 4.1), or `None` if it does not say.
fn acked_of(info: &libc::tcp_info, len: usize) -> Option<u64> {
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + size_of::<u64>();
    (len >= end).then_some(info.tcpi_bytes_acked)
}

/// Does a connection whose TCP_INFO is `info` still hold bytes its peer has not acknowledged
/// (sent or not yet), in a state in which they still go out?
fn queued(info: &libc::tcp_info) -> bool {
    // Linux's TCP states in which queued bytes still go out.
    const ESTABLISHED: u8 = 1;
    const FIN_WAIT1: u8 = 4;
    const CLOSE_WAIT: u8 = 8;
    const LAST_ACK: u8 = 9;
    const CLOSING: u8 = 11;
    matches!(info.tcpi_state, ESTABLISHED | FIN_WAIT1 | CLOSE_WAIT | LAST_ACK | CLOSING)
        && (info.tcpi_unacked > 0 || info.tcpi_notsent_bytes > 0)
}

/// The TCP_USER_TIMEOUT of a connection handed to the kernel ([`Socket::hand_to_kernel`])
/// whose stall time is `stall`, its close's looks having seen its peer take more `took_more`
/// times: [`HANDED_READER_TIMEOUT`] (or `stall`, if longer) for a peer seen reading, at two
/// looks at least; `stall` for one that was not, but never more than
/// [`HANDED_READER_TIMEOUT`]: a relay's stall time is its tunnel timeout (up to a day), and a
/// peer that reads nothing is not to keep an orphan that long after the process is gone.
fn handed_timeout(stall: Duration, took_more: u8) -> Duration {
    if took_more >= 2 { stall.max(HANDED_READER_TIMEOUT) } else { stall.min(HANDED_READER_TIMEOUT) }
}

/// What the looks at a waiting send's peer saw so far (see [`Socket::send_all_with`]).
#[derive(Default)]
struct Looks {
    /// The bytes the peer had acknowledged at the last look (`Some(None)`: the kernel did not
    /// say), `None` before the first.
    acked: Option<Option<u64>>,
    /// Looks in a row since then that saw it take nothing more.
    idle: u32,
}

/// What one look at a waiting send's peer found ([`Looks::look`]).
#[derive(Debug, PartialEq, Eq)]
enum Look {
    /// It acknowledged more since the look before.
    Progress,
    /// Nothing more, not for long enough to cut it (or this was the first look).
    Nothing,
    /// Nothing more at [`LOOKS_PER_STALL`] looks in a row: the connection is to be cut.
    Stalled,
}

impl Looks {
    /// Looks at a peer that has acknowledged `acked` bytes now.
    fn look(&mut self, acked: Option<u64>) -> Look {
        match self.acked.replace(acked) {
            None => Look::Nothing,
            Some(before) if before != acked => {
                self.idle = 0;
                Look::Progress
            }
            Some(_) => {
                self.idle += 1;
                if self.idle >= LOOKS_PER_STALL { Look::Stalled } else { Look::Nothing }
            }
        }
    }
}

/// Does a connection whose TCP_INFO is `info` still hold bytes it has not sent its peer yet,
/// in a state in which they still go out ([`queued`])?
fn unsent_in(info: &libc::tcp_info) -> bool {
    queued(info) && info.tcpi_notsent_bytes > 0
}

/// How soon a connection closing with bytes not yet sent to its peer first looks whether the
/// kernel has sent them all (see [`Socket::close_when_delivered`]).
const FIRST_CLOSING_LOOK: Duration = Duration::from_millis(5);

/// How often the thread's [`Watch`] ticks: the grain of the stall times of sends.
const TICK: Duration = Duration::from_millis(50);

/// `d` in [`TICK`]s, rounded up (never shorter than `d`, so that [`LOOKS_PER_STALL`] looks
/// never cut a peer before the stall time), at least one.
fn ticks(d: Duration) -> u64 {
    d.as_nanos().div_ceil(TICK.as_nanos()).max(1) as u64
}

thread_local! {
    /// The thread's sends that wait ([`Socket::send_all_with`]).
    static WATCH: Watch = Watch::default();
}

/// The sends of a proxy thread that wait, each woken when it is due a look at its peer's
/// progress, by one ticker task per thread (every [`TICK`], while any send waits) rather than a
/// timer per send: the ring reports every send's completion only when the thread next waits,
/// so nearly every send waits, and a timer-wheel entry (and a clock read) for each cost some
/// 1 % of the proxy's core, 4-7 % fewer requests per CPU-second at c64 (docs/BENCHMARKS.md,
/// eighth session). A send on the watch costs a slot and a waker's clone.
#[derive(Default)]
struct Watch {
    /// The sends waiting, by slot: their task's waker and the tick at which they are due.
    sends: std::cell::RefCell<slab::Slab<(Waker, u64)>>,
    /// Ticks so far.
    tick: Cell<u64>,
    /// Is a ticker task running on this thread?
    ticking: Cell<bool>,
}

/// A send on the thread's [`Watch`]: its slot, given back when it is dropped.
struct Watched(usize);

impl Watched {
    /// Puts a send, its task woken by `waker`, on the watch, due in `every` ticks; starts the
    /// thread's ticker if none runs.
    fn new(waker: &Waker, every: u64) -> Watched {
        WATCH.with(|w| {
            let slot = w.sends.borrow_mut().insert((waker.clone(), w.tick.get() + every));
            if !w.ticking.replace(true) {
                tokio_uring::spawn(tick());
            }
            Watched(slot)
        })
    }

    /// Has the send's tick come?
    fn due(&self) -> bool {
        WATCH.with(|w| w.sends.borrow().get(self.0).is_some_and(|(_, at)| *at <= w.tick.get()))
    }

    /// The send is waited for by `waker` now (a task polls it with a waker of its own).
    fn wake(&self, waker: &Waker) {
        WATCH.with(|w| {
            if let Some((known, _)) = w.sends.borrow_mut().get_mut(self.0)
                && !known.will_wake(waker)
            {
                *known = waker.clone();
            }
        });
    }

    /// Due again `every` ticks from now.
    fn again(&self, every: u64) {
        WATCH.with(|w| {
            if let Some((_, at)) = w.sends.borrow_mut().get_mut(self.0) {
                *at = w.tick.get() + every;
            }
        });
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // `try_with`: a task dropped as its thread ends may come after the watch.
        let _ = WATCH.try_with(|w| w.sends.borrow_mut().try_remove(self.0));
    }
}

/// The thread's ticker: every [`TICK`], wakes the sends that are due; ends when none waits.
async fn tick() {
    /// Marks the ticker gone however it ends (its runtime may drop it), so that the next send
    /// that waits starts another.
    struct Ticking;
    impl Drop for Ticking {
        fn drop(&mut self) {
            let _ = WATCH.try_with(|w| w.ticking.set(false));
        }
    }
    let _ticking = Ticking;
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let waiting = WATCH.with(|w| {
            let now = w.tick.get() + 1;
            w.tick.set(now);
            let sends = w.sends.borrow();
            for (_, (waker, _)) in sends.iter().filter(|(_, (_, at))| *at <= now) {
                waker.wake_by_ref();
            }
            !sends.is_empty()
        });
        if !waiting {
            return;
        }
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

/// A detached close under way ([`Socket::close_detached`]): dropped before [`Detached::done`]
/// (its task dropped with its runtime), it hands the socket to the kernel.
struct Detached(Option<Socket>);

impl Detached {
    /// The close is done: nothing to hand over.
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.end_at_deadline();
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
///
/// tokio-uring (0.5) keeps the data of an operation whose future was dropped until the kernel
/// completes it, but not when its runtime ends first: the driver's drop frees the data of every
/// operation still in flight, and only then asks the kernel to cancel them and waits. A receive
/// whose bytes arrived before the cancel (a client's, on a connection still open at the end of
/// a proxy thread) is copied into memory already freed, which the allocator may have handed
/// out again, or whose free-list pointers it overwrites. So a buffer dropped here while its
/// thread's runtime ends ([`RuntimeEnd`]) is leaked instead of freed: a few KiB per operation
/// in flight, once, at the end of a proxy thread. The socket goes as usual: the kernel's
/// operation holds the file of its own.
struct Held<B> {
    /// The operation's buffer (or a connect's address), `None` once given back with its
    /// outcome.
    buf: Option<B>,
    _socket: Socket,
}

impl<B> Held<B> {
    /// The data of an operation on `socket` into or out of `buf`.
    fn new(buf: B, socket: Socket) -> Self {
        Self { buf: Some(buf), _socket: socket }
    }

    /// The buffer, back with the operation's outcome (the kernel is done with it).
    fn give_back(mut self) -> B {
        self.buf.take().expect("an operation's buffer is given back once")
    }
}

impl<B> Drop for Held<B> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take()
            && ENDING.with(Cell::get)
        {
            std::mem::forget(buf);
            KEPT.with(|k| k.set(k.get() + 1));
        }
    }
}

thread_local! {
    /// Is this thread's runtime ending ([`RuntimeEnd`])? Then [`Held`] leaks what it holds.
    static ENDING: Cell<bool> = const { Cell::new(false) };
    /// Buffers [`Held`] leaked on this thread as its runtime ended.
    static KEPT: Cell<u64> = const { Cell::new(0) };
    /// Has tokio-uring's own code panicked on this thread since its runtime last ended
    /// ([`suspect_driver`], [`end_runtime`])?
    static SUSPECT: Cell<bool> = const { Cell::new(false) };
}

/// Marks the end of a tokio-uring runtime's work on this thread when dropped: created first
/// thing in the future the runtime runs, it drops as that future ends (or unwinds), before the
/// runtime itself, whose driver frees the data of operations still in flight before the kernel
/// is done with them (see [`Held`]).
pub(crate) struct RuntimeEnd(());

impl RuntimeEnd {
    /// Starts a runtime's work on this thread (operations dropped from now on are freed as
    /// usual, once complete).
    pub(crate) fn arm() -> Self {
        ENDING.with(|e| e.set(false));
        Self(())
    }
}

impl Drop for RuntimeEnd {
    fn drop(&mut self) {
        ENDING.with(|e| e.set(true));
    }
}

/// Marks this thread's io_uring driver suspect: the panic hook (`panics::install_hook`) saw
/// a panic in tokio-uring's own code on this thread. tokio-uring (0.5) panics in
/// `Driver::submit_op_2` after it has taken a slot for an operation the kernel never sees (an
/// `io_uring_enter` failing other than with EBUSY or EINTR as it flushes a full submission
/// queue); its driver's drop would wait for that operation for ever, and so would the thread's
/// end and the stop joining it ([`end_runtime`]). Panics in edgelb's own code leave the driver
/// as it was, and the runtime is dropped as usual, with what its drop does (a detached close
/// handed to the kernel, a relay still open reset).
pub(crate) fn suspect_driver() {
    SUSPECT.with(|s| s.set(true));
}

/// Ends `rt`, the runtime of thread `thread` whose work is done: drops it, unless tokio-uring's
/// own code panicked on this thread since ([`suspect_driver`]). Then its driver may hold an
/// operation the kernel never saw, which its drop would wait for for ever: the runtime is left
/// as it is (forgotten), with what it still holds (the operation's slot, a few KiB, and any
/// connection still open, closed plainly as the process exits) until the process exits, which
/// follows a proxy's stop, and the kernel tears its io_uring down then.
pub(crate) fn end_runtime(rt: tokio_uring::Runtime, thread: &str) {
    if SUSPECT.with(|s| s.replace(false)) {
        tracing::warn!(
            thread,
            "tokio-uring panicked on L7 thread `{thread}` (said above): its io_uring driver may hold an operation the kernel never saw, which dropping it would wait for for ever, so the thread's runtime is left as it is, and what it holds is freed as the process exits"
        );
        std::mem::forget(rt);
    } else {
        drop(rt);
    }
}

/// `tokio_uring::start` for tests, with the runtime's end marked ([`RuntimeEnd`]) as a proxy
/// thread's is.
#[cfg(test)]
pub(crate) fn start<F: Future>(f: F) -> F::Output {
    tokio_uring::start(async {
        let _end = RuntimeEnd::arm();
        f.await
    })
}

/// Completes a receive: the bytes the kernel wrote become part of the buffer.
struct Received;

impl OneshotOutputTransform for Received {
    type Output = (io::Result<usize>, BytesMut);
    type StoredData = Held<BytesMut>;

    #[allow(unsafe_code)]
    fn transform_oneshot_output(self, held: Held<BytesMut>, cqe: cqueue::Entry) -> Self::Output {
        let mut buf = held.give_back();
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
        (r, held.give_back())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receive still in flight as its runtime ends keeps its buffer: the driver's drop frees
    /// such an operation's data before the kernel has cancelled it, and bytes arriving
    /// meanwhile would be copied into freed memory ([`Held`]).
    #[test]
    fn a_receive_in_flight_as_its_runtime_ends_keeps_its_buffer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let before = KEPT.with(Cell::get);
        let peer = start(async {
            let long = Duration::from_secs(60);
            let s = Socket::connect(addr, long, long).await.unwrap();
            let peer = l.accept().unwrap().0;
            // Its future dropped, the receive is the driver's to finish.
            drop(s.recv_armed(BytesMut::new(), 64));
            peer
        });
        assert_eq!(KEPT.with(Cell::get) - before, 1, "the pending receive's buffer is kept");
        drop(peer);
        // A runtime that ends as usual frees what completed: nothing is kept then.
        let before = KEPT.with(Cell::get);
        start(async {
            let long = Duration::from_secs(60);
            let s = Socket::connect(addr, long, long).await.unwrap();
            let mut peer = l.accept().unwrap().0;
            std::io::Write::write_all(&mut peer, b"x").unwrap();
            let (n, buf) = s.recv(BytesMut::new(), 64).await;
            assert_eq!((n.unwrap(), &buf[..]), (1, &b"x"[..]));
        });
        assert_eq!(KEPT.with(Cell::get), before, "a completed receive's buffer is not kept");
    }

    /// A runtime on whose thread tokio-uring's own code panicked is left at its end, not
    /// dropped: its driver may wait for ever in its drop for an operation the kernel never saw
    /// ([`end_runtime`]); one on whose thread edgelb's code panicked is dropped as usual. Seen
    /// from the peer of a connection a task holds open: dropped, the runtime drops the task and
    /// the connection ends (end of stream); left, it stays open. The panic hook
    /// (`panics::install_hook`) tells the two apart, so this runs in a child (this test binary
    /// again, this test only), where it is installed. tokio-uring is made to panic by polling
    /// a completed receive once more.
    #[test]
    fn a_runtime_whose_driver_panicked_is_left_at_its_end() {
        const CHILD: &str = "EDGELB_TEST_DRIVER_PANIC";
        let Some(case) = std::env::var_os(CHILD) else {
            let name = "proxy::uring::tests::a_runtime_whose_driver_panicked_is_left_at_its_end";
            for (case, end) in [("tokio-uring", "left"), ("edgelb", "dropped")] {
                let (status, said) = crate::testlog::in_child(name, CHILD, case);
                assert!(status.success(), "{case}: {said}");
                assert!(said.contains(&format!("the runtime was {end}")), "{case}: {said}");
            }
            return;
        };
        crate::panics::install_hook();
        let in_driver = case == "tokio-uring";
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let rt = tokio_uring::Runtime::new(&tokio_uring::builder()).unwrap();
        let peer = rt.block_on(async {
            let _end = RuntimeEnd::arm();
            let long = Duration::from_secs(60);
            // A connection a task holds open, waiting for bytes that never come.
            let held = Socket::connect(addr, long, long).await.unwrap();
            let peer = l.accept().unwrap().0;
            let armed = held.recv_armed(BytesMut::new(), 64);
            tokio_uring::spawn(async move {
                let _s = held;
                let _ = armed.await;
            });
            // Another, whose task panics.
            let s = Socket::connect(addr, long, long).await.unwrap();
            let mut other = l.accept().unwrap().0;
            let faulty = tokio_uring::spawn(async move {
                if in_driver {
                    std::io::Write::write_all(&mut other, b"x").unwrap();
                    let mut armed = s.recv_armed(BytesMut::new(), 64);
                    let _ = (&mut armed).await;
                    // A completed operation polled again: tokio-uring's own `expect` panics.
                    std::future::poll_fn(|cx| {
                        Poll::Ready(Pin::new(&mut armed).poll(cx).is_ready())
                    })
                    .await;
                } else {
                    panic!("a fault in edgelb's own code (expected)");
                }
            });
            assert!(faulty.await.unwrap_err().is_panic(), "the runtime sees the panic");
            peer
        });
        end_runtime(rt, "test");
        peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let end = match std::io::Read::read(&mut &peer, &mut [0u8; 1]) {
            Ok(0) => "dropped",
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                "left"
            }
            other => panic!("{other:?}"),
        };
        assert!(!SUSPECT.with(Cell::get), "the thread's next runtime starts unsuspected");
        println!("the runtime was {end}");
    }

    /// A peer that takes nothing is cut at the [`LOOKS_PER_STALL`]th look in a row that sees
    /// it take nothing, after the first look (which has nothing to compare with): at the same
    /// look every time, whatever the clock says between them.
    #[test]
    fn a_peer_is_cut_at_the_fourth_look_in_a_row_without_progress() {
        let mut looks = Looks::default();
        assert_eq!(looks.look(Some(10)), Look::Nothing, "the first look only starts the count");
        for _ in 1..LOOKS_PER_STALL {
            assert_eq!(looks.look(Some(10)), Look::Nothing);
        }
        assert_eq!(looks.look(Some(10)), Look::Stalled);
    }

    /// Progress at any look starts the count again; a kernel that does not say what was
    /// acknowledged shows none.
    #[test]
    fn progress_starts_the_count_again() {
        let mut looks = Looks::default();
        looks.look(Some(10));
        for _ in 1..LOOKS_PER_STALL {
            assert_eq!(looks.look(Some(10)), Look::Nothing);
        }
        assert_eq!(looks.look(Some(11)), Look::Progress);
        for _ in 1..LOOKS_PER_STALL {
            assert_eq!(looks.look(Some(11)), Look::Nothing);
        }
        assert_eq!(looks.look(Some(11)), Look::Stalled);
        let mut blind = Looks::default();
        let seen: Vec<Look> = (0..=LOOKS_PER_STALL).map(|_| blind.look(None)).collect();
        assert_eq!(seen.last(), Some(&Look::Stalled), "{seen:?}");
    }

    /// A look's interval is rounded up to whole ticks: [`LOOKS_PER_STALL`] of them never add up
    /// to less than the stall time (75 ms was one tick, so a 300 ms stall time cut at 200 ms).
    #[test]
    fn look_intervals_round_up_to_whole_ticks() {
        assert_eq!(ticks(Duration::ZERO), 1);
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::from_millis(50)), 1);
        assert_eq!(ticks(Duration::from_millis(75)), 2);
        assert_eq!(ticks(Duration::from_millis(250)), 5);
        assert_eq!(ticks(Duration::from_secs(8) / LOOKS_PER_STALL), 40);
        for ms in [1u64, 49, 51, 99, 300, 500, 999, 1001, 60_000] {
            let stall = Duration::from_millis(ms);
            let every = ticks(stall / LOOKS_PER_STALL);
            assert!(TICK * (every as u32 * LOOKS_PER_STALL) >= stall, "{ms} ms");
        }
    }

    /// A handed connection whose peer was seen reading (two looks at least) gets the reader's
    /// timeout, or its stall time if longer; one seen taking more once, or never, its stall
    /// time, but no more than the reader's timeout (a relay's tunnel timeout may be a day).
    #[test]
    fn a_handed_timeout_is_the_readers_for_a_peer_seen_reading() {
        let s = Duration::from_secs;
        assert_eq!(handed_timeout(s(1), 2), HANDED_READER_TIMEOUT);
        assert_eq!(handed_timeout(s(3600), 2), s(3600));
        assert_eq!(handed_timeout(s(1), 1), s(1));
        assert_eq!(handed_timeout(s(1), 0), s(1));
        assert_eq!(handed_timeout(s(86_400), 0), HANDED_READER_TIMEOUT);
        assert_eq!(handed_timeout(s(86_400), 1), HANDED_READER_TIMEOUT);
        assert_eq!(handed_timeout(HANDED_READER_TIMEOUT, 0), HANDED_READER_TIMEOUT);
    }
}
