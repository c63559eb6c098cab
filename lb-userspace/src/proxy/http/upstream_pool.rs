//! The per-thread pool of idle keep-alive connections to backends ([`UpstreamPool`]), and a
//! client connection's private backend connection ([`Private`]), which never enters the pool.
//! Apart from the connection loop (`super`), which only takes connections from them and puts
//! them back: what keeps a connection (its pending receive, its idle limit, the checks before
//! it is used again, the sweep, how an idle one closes) is one concern, tested on its own.

use std::{
    cell::RefCell,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use ahash::AHashMap;
use bytes::BytesMut;

use super::{READ_CHUNK, read_more};
use crate::proxy::{
    balance::{Member, Pool},
    uring::{Armed, Socket, Unacked},
};

/// Pooled connections idle longer than this are not reused (backends time out idle keep-alive
/// connections; a stale one would fail the next request). A VIP with a shorter idle timeout
/// keeps its backend connections idle only that long: the idle timeout is the VIP's keep-alive
/// time on both sides.
const POOL_MAX_IDLE: Duration = Duration::from_secs(4);
/// How often each thread closes the pooled connections past their idle limit. Without it, a
/// connection is only found stale when a request for its backend comes (a backend removed from
/// the config, or the surplus of a busy moment, would stay open for ever).
const POOL_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The most room a pooled backend connection's receive buffer ([`Idle::armed`]) may hold. A
/// response head reads into the backend buffer until it is complete, which grows it up to
/// [`MAX_RESPONSE_HEAD_BYTES`] and a read more (some 128 KiB); such a buffer goes into the pool
/// replaced by a fresh one of [`READ_CHUNK`], rather than be held for as long as its connection
/// idles. Body streaming and ordinary heads keep it at a read or two.
///
/// [`MAX_RESPONSE_HEAD_BYTES`]: super::MAX_RESPONSE_HEAD_BYTES
const POOLED_BUF_MAX: usize = 4 * READ_CHUNK;

/// An idle keep-alive connection to a backend.
pub(super) struct Idle {
    socket: Socket,
    /// A receive kept pending on it while it is idle, as nginx and HAProxy keep a read event
    /// armed on theirs. Whatever the backend does meanwhile completes it: bytes written past
    /// its response (a body to a HEAD in a second write, bytes past its Content-Length, a 408
    /// before it closes an idle connection), a close or a reset; and such a connection is never
    /// used again ([`UpstreamPool::take`]), so the stray bytes are never read as the next
    /// request's response, and a request that must not be sent twice does not go on a
    /// connection already closed. Still pending when the connection is taken, it is the first
    /// read of the next response: the receive that request would issue anyway, issued earlier,
    /// so the check costs no system call. What it sees is what the thread's io_uring has
    /// completed by then: bytes arriving in the moment before the request goes out (or in the
    /// thread's last turn, under load) are still read as its response, the window nginx and
    /// HAProxy leave too (no check closes it: a backend that writes after its response races
    /// the next request).
    armed: Armed,
    /// When it is too old to reuse.
    expires: Instant,
    /// Also peeked at (one system call) before reuse: its last response had no body (HEAD, 204,
    /// 304), which is where backends most often send one anyway, right behind the head, and
    /// where the connection is most often back at work in the same turn of the thread, before
    /// its receive has even gone to the kernel.
    peek: bool,
}

impl Idle {
    /// `s`, idle since `now`, kept for reuse for at most `max_idle` (and [`POOL_MAX_IDLE`]),
    /// with a receive pending on it into `buf` ([`Idle::armed`]; a fresh one instead if `buf`
    /// holds more than [`POOLED_BUF_MAX`]); with `peek`, it is also peeked at before its next
    /// use (see [`Idle::peek`]).
    fn new(s: Socket, buf: BytesMut, now: Instant, max_idle: Duration, peek: bool) -> Idle {
        Idle::kept_for(s, buf, now, max_idle.min(POOL_MAX_IDLE), peek)
    }

    /// As [`Idle::new`], kept for `max_idle` whatever [`POOL_MAX_IDLE`] says: for a private
    /// connection ([`Private`]), which its one client may come back to within the VIP's
    /// `idle_timeout_ms`, and which is peeked at before reuse (see [`Private::take`]).
    pub(super) fn kept_for(
        s: Socket,
        mut buf: BytesMut,
        now: Instant,
        max_idle: Duration,
        peek: bool,
    ) -> Idle {
        // Over [`POOLED_BUF_MAX`], a fresh buffer goes with the connection. An empty buffer
        // whose head was split off reports only the room after it as its capacity, while it
        // holds the whole allocation once the head is dropped: `try_reclaim` (which moves
        // nothing in an empty buffer, and allocates nothing) tells by the allocation.
        if buf.is_empty() && buf.try_reclaim(POOLED_BUF_MAX + 1) {
            buf = BytesMut::with_capacity(READ_CHUNK);
        }
        let expires = now + max_idle;
        let armed = s.recv_armed(buf, READ_CHUNK);
        Idle { socket: s, armed, expires, peek }
    }

    /// This connection (to `addr`) for its next request at `now`, with the receive pending on
    /// it (the first read of the next response), if it may be used again; else it is closed.
    /// It may if it has not been idle too long and nothing happened on it while it was idle
    /// ([`Idle::armed`]: a look at the receive, no system call). With `check` (a request that
    /// is never sent twice, so a connection the backend closed must not be tried), or after a
    /// response without a body ([`Idle::peek`]), only if a peek also finds it open with nothing
    /// unread: that sees what the kernel has and the thread's io_uring has not reported yet.
    fn reusable(self, addr: SocketAddr, now: Instant, check: bool) -> Option<(Socket, Armed)> {
        if now < self.expires {
            match self.armed.pending() {
                Ok(_) if (check || self.peek) && !self.socket.idle_open() => {
                    tracing::debug!(%addr, "idle backend connection found closed or written to by a peek; closed");
                }
                Ok(armed) => return Some((self.socket, armed)),
                Err((Ok(n), _)) if n > 0 => {
                    tracing::debug!(%addr, bytes = n, "backend wrote past its response on an idle connection; closed");
                }
                Err(_) => {}
            }
        }
        close_idle(&self.socket);
        None
    }
}

/// Idle connections to one backend, oldest first.
type IdleList = Vec<Idle>;

/// Idle keep-alive connections to backends, per thread.
#[derive(Clone, Default)]
pub(crate) struct UpstreamPool {
    idle: Rc<RefCell<AHashMap<SocketAddr, IdleList>>>,
}

/// Closes a connection taken out of the pool now, not whenever its last clone goes (this also
/// completes a receive still pending on it, which holds a clone).
pub(super) fn close(s: &Socket) {
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Closes an idle backend connection (its last response read whole, nothing of a request
/// going) with a reset ([`Socket::abort`]: SO_LINGER {on, 0} and a disconnect now), not a FIN:
/// the side that closes first keeps the connection in TIME_WAIT for a minute, holding one of
/// this node's local ports to that backend, and the proxy closes these first (a pooled one past
/// its time, or found unusable, or over the pool's limit; a private one when its client
/// connection ends or can no longer use it; every pooled one at a stop). With the PROXY protocol
/// that is one per client connection: some 470 client connections a second would run a
/// backend's local ports out. HAProxy closes its server connections so too (every one is marked
/// to be closed with SO_LINGER 0 unless it saw the server's close first). The disconnect rather
/// than SO_LINGER alone: clones of the socket (the receive pending on it) keep it open past
/// this call, and a FIN first would let the backend's own FIN in, and the TIME_WAIT with it,
/// before the last clone goes. Should the backend not have acknowledged everything sent to it
/// yet ([`Socket::unacknowledged`]: the end of a request body still on its way), an ordinary close
/// instead, as a reset would throw that away, once the kernel has sent them all, in a task of
/// its own ([`Socket::close_detached`]: reset once the backend took none of them for the
/// socket's stall time, the idle timeout, rather than left to the kernel, which would probe a
/// backend that reads nothing for minutes; handed to the kernel with that as TCP_USER_TIMEOUT
/// should the thread end first, as it does at a stop). A connection closed mid-exchange never
/// comes here, nor one the backend closes itself ([`close_after_backend`]).
pub(super) fn close_idle(s: &Socket) {
    match s.unacknowledged() {
        Unacked::Nothing => s.abort(),
        held => s.clone().close_detached(held == Unacked::Unsent),
    }
}

/// How long a backend that closes its connection after a response is given to do so.
const BACKEND_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Closes a backend connection whose response is complete and which the backend closes itself
/// (it said `Connection: close`, or was asked to), once it has: the side that closes first
/// keeps the connection in TIME_WAIT for a minute, holding its local port, and a proxy that
/// closed every such connection first would run out of ports to a backend at some 500 requests
/// a second (with `upstream_keepalive = 0` every request opens one, and with the PROXY protocol
/// every client connection).
/// Waits in a task of its own, so that the client's next request does not; closes anyway after
/// [`BACKEND_CLOSE_WAIT`].
pub(super) fn close_after_backend(up: Socket) {
    tokio_uring::spawn(async move {
        let mut buf = BytesMut::with_capacity(64);
        let ended = tokio::time::timeout(BACKEND_CLOSE_WAIT, async {
            while let Ok(n) = read_more(&up, &mut buf).await {
                if n == 0 {
                    break;
                }
                buf.clear();
            }
        })
        .await;
        match ended {
            // The backend closed first (or failed): the TIME_WAIT, if any, is its own.
            Ok(()) => close(&up),
            // A backend that ignores `close` (or is late with it) leaves the connection idle,
            // its response read whole: closed as the proxy closes idle ones, with a reset, or
            // each such request would hold one of this node's local ports for a minute.
            Err(_) => close_idle(&up),
        }
    });
}

impl UpstreamPool {
    /// An idle connection to `addr` that may be used again at `now` ([`Idle::reusable`], with
    /// `check`; the most recently idle first), with the receive pending on it (the first read
    /// of its next response). Those found unusable on the way are closed.
    pub(super) fn take(
        &self,
        addr: SocketAddr,
        now: Instant,
        check: bool,
    ) -> Option<(Socket, Armed)> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if let Some(reused) = c.reusable(addr, now, check) {
                return Some(reused);
            }
        }
        None
    }

    /// Keeps `s`, idle since `now`, for reuse for at most `max_idle` (and [`POOL_MAX_IDLE`])
    /// unless `max` connections to `addr` are idle already, with a receive pending on it into
    /// `buf` ([`Idle::armed`]; a fresh one instead if `buf` holds more than [`POOLED_BUF_MAX`]);
    /// with `peek`, it is also peeked at before its next use (see
    /// [`Idle::peek`]). Connections to `addr` past their time go first: the list is oldest
    /// first, so they are at its front.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put(
        &self,
        addr: SocketAddr,
        s: Socket,
        buf: BytesMut,
        max: usize,
        now: Instant,
        max_idle: Duration,
        peek: bool,
    ) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        let stale = list.iter().take_while(|c| c.expires <= now).count();
        list.drain(..stale).for_each(|c| close_idle(&c.socket));
        if list.len() < max {
            list.push(Idle::new(s, buf, now, max_idle, peek));
        } else {
            close_idle(&s);
        }
    }

    /// Closes every connection past its time at `now`, for every backend, and forgets
    /// backends left without idle connections (one removed from the config, say).
    fn sweep(&self, now: Instant) {
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|c| {
                let keep = c.expires > now;
                if !keep {
                    close_idle(&c.socket);
                }
                keep
            });
            !list.is_empty()
        });
    }

    /// Closes every pooled connection ([`close_idle`]): at the thread's end, once its client
    /// connections are done. Left to the runtime's end, they closed with a FIN each, and each
    /// left a TIME_WAIT here.
    pub(crate) fn close_all(&self) {
        for (_, list) in self.idle.borrow_mut().drain() {
            list.iter().for_each(|c| close_idle(&c.socket));
        }
    }

    /// Sweeps the pool every [`POOL_SWEEP_EVERY`], until its task is aborted (when the thread
    /// ends).
    pub(crate) async fn sweep_every(self) {
        loop {
            tokio::time::sleep(POOL_SWEEP_EVERY).await;
            self.sweep(Instant::now());
        }
    }
}

/// A client connection's private backend connection, idle between its requests: one that
/// carries connection-bound authentication ([`binds_connection`]: NTLM, Negotiate), which
/// backends such as IIS with Windows authentication tie to the TCP connection rather than to
/// each request, or one that opened with a PROXY protocol header, which names this client
/// connection (its addresses) and so speaks for no other. Shared through the pool, the one would
/// serve another client's requests as this client's user (and NTLM's handshake needs its legs
/// on one connection, which the pool does not give), the other would tell the backend they came
/// from this client. So, as HAProxy marks such connections private, it never enters the pool: it
/// waits here for this client connection's next request, which goes over it to its backend,
/// bypassing the pick, while that backend may take it ([`Private::take`]); otherwise, and when
/// the client connection ends (this is dropped), it is closed, idle, with a reset
/// ([`close_idle`]). One per client connection: the request that takes it makes the next one,
/// if any.
///
/// [`binds_connection`]: super::head::binds_connection
#[derive(Default)]
pub(super) struct Private(Option<(SocketAddr, Idle, Bound)>);

/// What binds a [`Private`] connection to its client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Bound {
    /// It carries connection-bound authentication: the client's session is on it, which keeps
    /// a drained backend (as a drained backend keeps its sticky clients). One bound by its
    /// PROXY header alone holds nothing a drain must spare: a drain moves its client.
    pub(super) session: bool,
    /// The PROXY protocol version of the header it opened with, if any. The header describes
    /// this client connection: a request under another setting (a reload changed it) does not
    /// take it, as its backend expects another header, or none.
    pub(super) proxy: Option<u8>,
}

impl Private {
    /// Keeps `c`, a connection to `addr` bound to this client connection by `bound`, for this
    /// client connection's next request (closing one kept before, if any).
    pub(super) fn keep(&mut self, addr: SocketAddr, c: Idle, bound: Bound) {
        if let Some((_, old, _)) = self.0.replace((addr, c, bound)) {
            close_idle(&old.socket);
        }
    }

    /// The private connection for a request at `now` that routes to `pool` under the PROXY
    /// protocol setting `proxy`, as (member, connection, the receive pending on it, what binds
    /// it), if it opened under that setting ([`Bound::proxy`]), its backend is a member of `pool`
    /// that may take the request (up and not passively down, see [`Pool::pick`]; a backend back
    /// from an ejection only as its trial; a drained one only for a connection that holds a
    /// session, [`Bound::session`], as it keeps its sticky clients: the session authenticated on
    /// the connection is this client's, and moving it would break an NTLM handshake half done)
    /// and the connection may be used again, with the checks of a pooled one
    /// ([`Idle::reusable`], always with a peek: it may have waited as long as the client's idle
    /// timeout, longer than backends keep idle connections). Otherwise it is closed. Either way
    /// the slot is empty after.
    pub(super) fn take(
        &mut self,
        pool: &Pool,
        now: Instant,
        proxy: Option<u8>,
    ) -> Option<(usize, Socket, Armed, Bound)> {
        let (addr, c, bound) = self.0.take()?;
        let takes = |m: &Member| m.state.addr == addr && m.up && (bound.session || m.weight > 0);
        let member = pool.members.iter().position(takes).filter(|_| bound.proxy == proxy);
        let Some(i) = member else {
            close_idle(&c.socket);
            return None;
        };
        let (s, armed) = c.reusable(addr, now, true)?;
        // Last: it claims a trial of a backend back from an ejection.
        if !pool.members[i].state.admit() {
            close_idle(&s);
            return None;
        }
        Some((i, s, armed, bound))
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        if let Some((_, c, _)) = self.0.take() {
            close_idle(&c.socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{super::read_first, *};

    /// The pool lets go of connections past their time: `put` trims them from the front of
    /// their backend's list, a sweep closes the rest and forgets the backend, and each one
    /// dropped is closed, idle, with a reset (its peer reads ECONNRESET), which leaves no
    /// TIME_WAIT on the proxy's side ([`close_idle`]).
    #[test]
    fn the_pool_closes_connections_past_their_time() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let closed = |peer: &mut std::net::TcpStream| {
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let read = peer.read(&mut [0u8; 1]).map_err(|e| e.kind());
            read == Err(std::io::ErrorKind::ConnectionReset)
        };
        crate::proxy::uring::start(async {
            let pool = UpstreamPool::default();
            let t0 = Instant::now();
            let mut peers = Vec::new();
            let long = Duration::from_secs(60);
            // Idle since t0, t0 + 1 s, t0 + 2 s and t0 + 5 s: kept 4 s at most, so the put at
            // t0 + 5 s finds the first two past their time.
            for at in [0, 1, 2, 5] {
                let s = Socket::connect(addr, long, long).await.unwrap();
                peers.push(l.accept().unwrap().0);
                pool.put(addr, s, BytesMut::new(), 10, t0 + Duration::from_secs(at), long, false);
            }
            assert_eq!(pool.idle.borrow()[&addr].len(), 2);
            assert!(peers[..2].iter_mut().all(closed), "trimmed connections are closed");
            // A shorter idle limit (the VIP's idle timeout) holds too.
            let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let s = Socket::connect(other.local_addr().unwrap(), long, long).await.unwrap();
            let mut peer = other.accept().unwrap().0;
            pool.put(
                other.local_addr().unwrap(),
                s,
                BytesMut::new(),
                10,
                t0,
                Duration::from_secs(1),
                false,
            );
            pool.sweep(t0 + Duration::from_millis(1500));
            assert!(closed(&mut peer));
            assert_eq!(
                pool.idle.borrow().len(),
                1,
                "a backend without idle connections is forgotten"
            );
            assert!(pool.take(addr, t0 + Duration::from_millis(9500), false).is_none());
            pool.sweep(t0 + Duration::from_millis(9500));
            assert!(pool.idle.borrow().is_empty());
            assert!(peers[2..].iter_mut().all(closed));
        });
    }

    /// A pooled connection on which anything happened while it was idle is closed, not handed
    /// out: bytes from the backend (which would be read as the next response), its close, its
    /// reset. One on which nothing happened is handed out with its receive still pending, and
    /// that receive reads what the backend sends next (the response to the next request).
    #[test]
    fn the_pool_hands_out_only_connections_nothing_happened_on() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let long = Duration::from_secs(60);
        crate::proxy::uring::start(async {
            let pool = UpstreamPool::default();
            let now = Instant::now();
            // Put oldest first: `take` tries the most recently idle first.
            let mut peers = Vec::new();
            for _ in 0..4 {
                let s = Socket::connect(addr, long, long).await.unwrap();
                peers.push(l.accept().unwrap().0);
                pool.put(addr, s, BytesMut::new(), 10, now, long, false);
            }
            // Untouched: peers[0]. Stray bytes: peers[1]. Closed: peers[2]. Reset: peers[3].
            peers[1].write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON").unwrap();
            peers[2].shutdown(std::net::Shutdown::Write).unwrap();
            socket2::SockRef::from(&peers[3]).set_linger(Some(Duration::ZERO)).unwrap();
            drop(peers.pop());
            // The completions reach the thread's io_uring.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (s, armed) = pool.take(addr, now, false).expect("the untouched connection");
            assert!(pool.take(addr, now, false).is_none(), "the three others are not handed out");
            assert!(pool.idle.borrow()[&addr].is_empty());
            // Reset: they were idle ([`close_idle`]).
            let closed = |peer: &mut std::net::TcpStream| {
                peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let read = peer.read_to_end(&mut Vec::new()).map_err(|e| e.kind());
                read == Err(std::io::ErrorKind::ConnectionReset)
            };
            assert!(closed(&mut peers[1]) && closed(&mut peers[2]), "dropped ones are closed");
            // The one handed out is peers[0]'s: its pending receive reads the next response.
            const NEXT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
            peers[0].write_all(NEXT).unwrap();
            let mut ubuf = BytesMut::new();
            let n = tokio::time::timeout(long, read_first(&s, &mut ubuf, Some(armed))).await;
            assert_eq!(n.unwrap().unwrap(), NEXT.len());
            assert_eq!(&ubuf[..], NEXT);
        });
    }

    /// A pooled connection does not keep a receive buffer a large response head grew: `put`
    /// gives it a fresh one of the read size, whether the large buffer shows its capacity or
    /// (a head split off its front and dropped) holds it behind a small one.
    #[test]
    fn a_pooled_connection_does_not_keep_a_grown_buffer() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let long = Duration::from_secs(60);
        let grown = || BytesMut::with_capacity(128 * 1024);
        let behind_a_head = || {
            let mut b = BytesMut::with_capacity(128 * 1024);
            b.resize(126 * 1024, b'h');
            drop(b.split().freeze());
            assert!(b.capacity() <= POOLED_BUF_MAX, "the room after the head only");
            b
        };
        let small = || BytesMut::with_capacity(READ_CHUNK);
        crate::proxy::uring::start(async {
            let pool = UpstreamPool::default();
            let now = Instant::now();
            for (buf, what) in [(grown(), "grown"), (behind_a_head(), "behind"), (small(), "small")]
            {
                let s = Socket::connect(addr, long, long).await.unwrap();
                let mut peer = l.accept().unwrap().0;
                pool.put(addr, s, buf, 10, now, long, false);
                let (s, armed) = pool.take(addr, now, false).expect("the pooled connection");
                peer.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
                let mut ubuf = BytesMut::new();
                tokio::time::timeout(long, read_first(&s, &mut ubuf, Some(armed)))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(ubuf.starts_with(b"HTTP/1.1 204"), "{what}");
                ubuf.clear();
                assert!(!ubuf.try_reclaim(POOLED_BUF_MAX + 1), "{what}: {}", ubuf.capacity());
            }
        });
    }

    /// In the same turn of the thread as its `put`, a pooled connection's receive has not gone
    /// to the kernel yet, so it sees nothing: after a response without a body (where backends
    /// most often write one anyway) and for a request that is never sent twice, `take` also
    /// peeks, and a connection with bytes waiting or closed by the backend is not handed out.
    #[test]
    fn a_peek_backs_the_armed_receive_where_it_cannot_see_yet() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let long = Duration::from_secs(60);
        crate::proxy::uring::start(async {
            let pool = UpstreamPool::default();
            let now = Instant::now();
            let s = Socket::connect(addr, long, long).await.unwrap();
            let mut peer = l.accept().unwrap().0;
            // No await between the put, the backend's write and the take.
            pool.put(addr, s, BytesMut::new(), 10, now, long, true);
            peer.write_all(b"body of a HEAD response").unwrap();
            assert!(pool.take(addr, now, false).is_none(), "stray bytes after a bodiless response");
            let s = Socket::connect(addr, long, long).await.unwrap();
            let peer = l.accept().unwrap().0;
            pool.put(addr, s, BytesMut::new(), 10, now, long, false);
            peer.shutdown(std::net::Shutdown::Write).unwrap();
            // Give the FIN time to arrive, without a turn of the thread.
            std::thread::sleep(Duration::from_millis(20));
            assert!(pool.take(addr, now, true).is_none(), "closed, for a request never sent twice");
        });
    }

    /// A listener on loopback whose connections have a 4 KiB receive buffer (set before the
    /// handshake, which fixes the window), so that a peer that reads nothing soon closes its
    /// window; and its address.
    fn small_window_listener() -> (std::net::TcpListener, SocketAddr) {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.set_recv_buffer_size(4096).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        l.listen(1).unwrap();
        let l: std::net::TcpListener = l.into();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// An idle close resets only a connection whose peer has acknowledged everything sent to
    /// it: bytes still on their way (the end of a request body a backend answered early, and
    /// read slowly) would be thrown away by the reset, so such a connection closes with a FIN
    /// behind them, and the peer reads every byte and then the end of the stream.
    #[test]
    fn an_idle_close_does_not_reset_bytes_still_on_their_way() {
        use std::io::Read;
        // A peer with a small receive window, which reads nothing until the close.
        let (l, addr) = small_window_listener();
        let long = Duration::from_secs(60);
        const SENT: usize = 48 * 1024;
        crate::proxy::uring::start(async {
            let s = Socket::connect(addr, long, long).await.unwrap();
            let mut peer = l.accept().unwrap().0;
            // More than the peer's window, less than the proxy's send buffer takes.
            let sent = tokio::time::timeout(Duration::from_secs(5), s.send_all(vec![7u8; SENT]));
            sent.await.expect("the send buffer takes it").unwrap();
            let held = s.unacknowledged();
            assert_ne!(held, Unacked::Nothing, "bytes the peer has not acknowledged");
            close_idle(&s);
            drop(s);
            // Read on a thread of its own: the close waits in a task of this runtime.
            let reader = std::thread::spawn(move || {
                peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut got = Vec::new();
                peer.read_to_end(&mut got).map(|_| got.len())
            });
            while !reader.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let got = reader.join().unwrap().expect("the end of the stream, no reset");
            assert_eq!(got, SENT);
        });
    }

    /// An idle close that waits for bytes still on their way (see
    /// [`an_idle_close_does_not_reset_bytes_still_on_their_way`]) resets the connection once
    /// its peer took none of them for the socket's stall time. Closed with a FIN alone, the
    /// kernel kept the socket for minutes, probing a peer that reads nothing.
    #[test]
    fn an_idle_close_resets_a_peer_that_takes_nothing_for_the_stall_time() {
        use std::io::Read;
        let (l, addr) = small_window_listener();
        const SENT: usize = 48 * 1024;
        crate::proxy::uring::start(async {
            let stall = Duration::from_millis(300);
            let s = Socket::connect(addr, Duration::from_secs(60), stall).await.unwrap();
            let mut peer = l.accept().unwrap().0;
            let sent = tokio::time::timeout(Duration::from_secs(5), s.send_all(vec![7u8; SENT]));
            sent.await.expect("the send buffer takes it").unwrap();
            close_idle(&s);
            drop(s);
            // The close's task runs meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let end = peer.read_to_end(&mut got).map_err(|e| e.kind());
            assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "{} bytes", got.len());
        });
    }
}
