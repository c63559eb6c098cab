//! Client connections idle between keep-alive requests, closed to make room for a new client
//! when their VIP is at its `max_connections` (nginx's "reusable connections"). Without this,
//! as many idle keep-alive connections as the limit (20 browsers left open, or one client that
//! opens them on purpose) had every new client refused with 503 for up to the idle timeout.
//!
//! The limit counts a VIP's connections over all proxy threads (its active-connections gauge),
//! so room is made on any thread: the accepting thread closes the longest-idle connection of its
//! own, or, having none, claims one of another thread's, which that thread closes. Only a
//! connection waiting for its next request head with none of it read is idle: one in the middle
//! of a request (its head partly read, its body or response on the way) is never closed. Such a
//! connection is closed as the idle timeout closes it (shut down: its client reads the end of
//! the stream, as from any server closing an idle keep-alive connection, and opens a new one).
//! A stop closes every idle connection of the thread so ([`Idle::close_all`]); a takeover's
//! drain leaves them open for their next request (`super::DrainKind::Takeover`): nothing is
//! accepted any more then, so none is closed for room but to meet a claim made before.
//! A request that had arrived just before, read but not yet seen by the connection's task, is
//! dropped unserved ([`Waiting::finish`]): the client finds the connection closed without an
//! answer, as when the close comes first, and may send the request again on a new one; served,
//! it would reach a backend while its answer could not reach the client.
//!
//! Each thread keeps its idle connections to itself ([`Idle`], no lock), and shows the other
//! threads only how many it has, in an atomic counter per thread and VIP ([`Shelf`]): going
//! idle and leaving it costs a request a borrow of the thread's own idle set, an insertion into
//! it and a removal, a reference count, and two atomic additions on a counter no other thread
//! writes unless a VIP is at its limit; never a lock or a message (an A/B run showed no
//! difference in requests per CPU-second beyond noise). A claim takes one from that counter
//! (only while it is above 0) and wakes the thread's [`Idle::close_claimed`]. Claims race with
//! the connections they count (one may start its next request before its thread closes it): a
//! claim its thread cannot meet is given back, and the VIP is over its limit by that connection
//! until some connection ends, as it is, briefly, by each connection being closed for room.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicIsize, AtomicUsize, Ordering},
    },
};

use prometheus_client::metrics::counter::Counter;

use super::uring::Socket;

/// One proxy thread's connections of one VIP idle between requests, as every thread sees them.
/// Aligned to keep each thread's counters off the others' cache lines: each is written at every
/// request of its own thread.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Shelf {
    /// The thread's idle connections less the claims on them it has not acted on yet; below 0
    /// when some that were claimed started a request meanwhile. Claimed only while above 0.
    idle: AtomicIsize,
    /// Claims by other threads not acted on yet.
    claims: AtomicUsize,
    /// Wakes the thread's [`Idle::close_claimed`] for a claim.
    wake: tokio::sync::Notify,
}

/// Every proxy thread's [`Shelf`] for one VIP, by thread index.
pub(crate) fn shelves(threads: usize) -> Arc<[Shelf]> {
    (0..threads).map(|_| Shelf::default()).collect()
}

/// The connections idle now on `shelves` (one VIP's, every thread's), claims on them not yet
/// met left out: what a takeover's drain keeps, for its log line.
pub(crate) fn idle_in(shelves: &[Shelf]) -> usize {
    shelves.iter().map(|s| s.idle.load(Ordering::SeqCst).max(0) as usize).sum()
}

/// This proxy thread's client connections of one VIP idle between requests, the longest idle
/// first, and every thread's counts of theirs.
#[derive(Clone)]
pub(crate) struct Idle {
    local: Rc<RefCell<Local>>,
    shelves: Arc<[Shelf]>,
    thread: usize,
    /// The VIP's `edgelb_l7_connections_closed_for_room_total`, counted by the thread that
    /// closes each connection: a client that finds its keep-alive connection closed shows
    /// nowhere else.
    closed: Counter,
}

/// The idle connections themselves, in the order they went idle.
#[derive(Default)]
struct Local {
    next: u64,
    waiting: BTreeMap<u64, Socket>,
}

/// A connection counted idle ([`Idle::waiting`]) until [`Waiting::finish`], or until this
/// drops.
pub(crate) struct Waiting<'a> {
    idle: &'a Idle,
    key: u64,
}

impl Waiting<'_> {
    /// Counts the connection idle no more, once its wait is over: true if it was still idle
    /// then, false if it was taken to make room meanwhile. A connection taken so is shut down
    /// and must not serve what it read: its read may have completed before the shutdown, with
    /// the client's next request, and the request would go to a backend while its answer
    /// cannot be written (the client, reading the end of the stream, may send it again).
    pub(crate) fn finish(self) -> bool {
        let kept = self.leave();
        // Left already: nothing for the drop to do.
        std::mem::forget(self);
        kept
    }

    /// Takes the connection out of the idle ones if it is still there (not if it was closed to
    /// make room, and counted out then); whether it was.
    fn leave(&self) -> bool {
        let kept = self.idle.local.borrow_mut().waiting.remove(&self.key).is_some();
        if kept {
            self.idle.own().idle.fetch_sub(1, Ordering::SeqCst);
        }
        kept
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Closes an idle connection as its idle timeout would: its task, waiting for the next request,
/// reads the end of the stream and ends.
fn close(s: &Socket) {
    let _ = s.shutdown(std::net::Shutdown::Both);
}

impl Idle {
    /// Thread `thread`'s idle connections of the VIP whose shelves are `shelves`, counting
    /// those it closes for room in `closed`.
    pub(crate) fn new(shelves: Arc<[Shelf]>, thread: usize, closed: Counter) -> Idle {
        Idle { local: Rc::default(), shelves, thread, closed }
    }

    /// Closes `s`, taken from the idle ones to make room, and counts it. Counted first, so
    /// that whoever sees the connection closed sees it counted too.
    fn close_for_room(&self, s: &Socket) {
        self.closed.inc();
        close(s);
    }

    fn own(&self) -> &Shelf {
        &self.shelves[self.thread]
    }

    /// Counts `client` idle, and closable to make room, until the guard drops: call it only
    /// while waiting for a request head none of which has been read.
    pub(crate) fn waiting(&self, client: &Socket) -> Waiting<'_> {
        let key = {
            let mut local = self.local.borrow_mut();
            let key = local.next;
            local.next += 1;
            local.waiting.insert(key, client.clone());
            key
        };
        self.own().idle.fetch_add(1, Ordering::SeqCst);
        Waiting { idle: self, key }
    }

    /// Closes every connection of this thread's idle now, as the idle timeout would: a stop
    /// ends the keep-alive connections idle between requests (as nginx and HAProxy do). Called
    /// by the thread's accept loops once they see the stop (not a takeover's drain, which
    /// keeps them: `super::DrainKind`); not counted as closed for room.
    /// Each connection's task reads the end of the stream, or finds it was taken
    /// ([`Waiting::finish`]), and ends; one that goes idle after this sees the stop itself
    /// (`http::serve`). So no idle connection waits on the stop's notification itself, which
    /// took its lock twice or three times per request.
    pub(crate) fn close_all(&self) {
        let waiting = std::mem::take(&mut self.local.borrow_mut().waiting);
        self.own().idle.fetch_sub(waiting.len() as isize, Ordering::SeqCst);
        waiting.values().for_each(close);
    }

    /// Makes room for a connection over the VIP's limit: closes this thread's longest-idle
    /// connection of the VIP now, or else claims one of another thread's, which that thread
    /// closes. False when no thread has one.
    pub(crate) fn make_room(&self) -> bool {
        let n = self.shelves.len();
        for t in (0..n).map(|k| (self.thread + k) % n) {
            let shelf = &self.shelves[t];
            let claimed = shelf
                .idle
                .try_update(Ordering::SeqCst, Ordering::SeqCst, |i| (i > 0).then(|| i - 1));
            if claimed.is_err() {
                continue;
            }
            if t != self.thread {
                shelf.claims.fetch_add(1, Ordering::SeqCst);
                shelf.wake.notify_one();
                return true;
            }
            let longest = self.local.borrow_mut().waiting.pop_first();
            match longest {
                Some((_, s)) => {
                    self.close_for_room(&s);
                    return true;
                }
                // Above 0 means one is here (claims are taken from the count first): not
                // reached, but the count goes back should it be.
                None => {
                    shelf.idle.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        false
    }

    /// Closes this thread's longest-idle connections as other threads claim them, until the
    /// task running it is aborted.
    pub(crate) async fn close_claimed(self) {
        let shelf = self.own();
        loop {
            shelf.wake.notified().await;
            let claimed = shelf.claims.swap(0, Ordering::SeqCst);
            let mut closed = 0;
            while closed < claimed {
                let longest = self.local.borrow_mut().waiting.pop_first();
                let Some((_, s)) = longest else { break };
                self.close_for_room(&s);
                closed += 1;
            }
            // Claims on connections that started a request before they could be closed: given
            // back, so that the count matches the connections here again.
            if closed < claimed {
                shelf.idle.fetch_add((claimed - closed) as isize, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room is made from the accepting thread's own idle connections first, the longest idle
    /// first, then by claims on another thread's, which that thread meets; connections no
    /// longer idle are never closed, and a claim that cannot be met is given back. Each
    /// connection closed is counted once, by the thread that closes it, and nothing else is.
    #[test]
    fn room_is_made_from_idle_connections_only() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let long = std::time::Duration::from_secs(60);
        let closed = |peer: &mut std::net::TcpStream| {
            peer.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            matches!(peer.read(&mut [0u8; 1]), Ok(0))
        };
        let open = |peer: &std::net::TcpStream| {
            peer.set_nonblocking(true).unwrap();
            let open = matches!(peer.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            peer.set_nonblocking(false).unwrap();
            open
        };
        let shelves = shelves(2);
        // Two threads' views, run on one here: the claims work the same.
        let closed_for_room = Counter::default();
        let idle = |thread| Idle::new(shelves.clone(), thread, closed_for_room.clone());
        let (mine, theirs) = (idle(0), idle(1));
        crate::proxy::uring::start(async {
            let closer = tokio_uring::spawn(theirs.clone().close_claimed());
            let mut conns = Vec::new();
            for _ in 0..4 {
                let s = Socket::connect(addr, long, long).await.unwrap();
                conns.push((s, l.accept().unwrap().0));
            }
            let (a, b) = (mine.waiting(&conns[0].0), mine.waiting(&conns[1].0));
            let c = theirs.waiting(&conns[2].0);
            // conns[3] is busy: never counted idle.
            assert!(mine.make_room(), "an own idle connection");
            assert!(closed(&mut conns[0].1), "the longest idle is closed");
            assert_eq!(closed_for_room.get(), 1);
            assert!(open(&conns[1].1) && open(&conns[2].1) && open(&conns[3].1));
            drop(a);
            // b starts a request: no longer idle, not closable.
            drop(b);
            assert!(mine.make_room(), "another thread's idle connection");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(closed(&mut conns[2].1), "closed by its thread");
            assert_eq!(closed_for_room.get(), 2, "counted by its thread");
            assert!(open(&conns[1].1) && open(&conns[3].1));
            drop(c);
            assert!(!mine.make_room(), "nothing idle left");
            assert_eq!(shelves[0].idle.load(Ordering::SeqCst), 0);
            assert_eq!(shelves[1].idle.load(Ordering::SeqCst), 0);
            // A claim whose connection starts a request before its thread acts is given back.
            let s = Socket::connect(addr, long, long).await.unwrap();
            let peer = l.accept().unwrap().0;
            let d = theirs.waiting(&s);
            assert!(mine.make_room());
            drop(d);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(open(&peer), "started a request: not closed");
            assert_eq!(shelves[1].idle.load(Ordering::SeqCst), 0, "the claim given back");
            assert!(!mine.make_room());
            assert_eq!(closed_for_room.get(), 2, "nothing closed, nothing counted");
            closer.abort();
        });
    }

    /// A stop closes every idle connection of the thread, and only those, and counts none as
    /// closed for room; a connection taken so finds it was when its wait is over, and the
    /// thread's count of idle ones is 0 again.
    #[test]
    fn a_stop_closes_every_idle_connection() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let long = std::time::Duration::from_secs(60);
        let shelves = shelves(1);
        let closed_for_room = Counter::default();
        let idle = Idle::new(shelves.clone(), 0, closed_for_room.clone());
        crate::proxy::uring::start(async {
            let mut conns = Vec::new();
            for _ in 0..3 {
                let s = Socket::connect(addr, long, long).await.unwrap();
                let peer = l.accept().unwrap().0;
                peer.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
                conns.push((s, peer));
            }
            let (a, b) = (idle.waiting(&conns[0].0), idle.waiting(&conns[1].0));
            // conns[2] is busy: never counted idle.
            idle.close_all();
            for (_, peer) in &mut conns[..2] {
                assert!(matches!(peer.read(&mut [0u8; 1]), Ok(0)), "closed");
            }
            conns[2].1.set_nonblocking(true).unwrap();
            let busy = conns[2].1.peek(&mut [0u8; 1]).map_err(|e| e.kind());
            assert_eq!(busy, Err(std::io::ErrorKind::WouldBlock), "the busy one is open");
            assert!(!a.finish() && !b.finish(), "taken");
            assert_eq!(shelves[0].idle.load(Ordering::SeqCst), 0);
            assert_eq!(closed_for_room.get(), 0);
            assert!(!idle.make_room(), "nothing idle left");
        });
    }

    /// A connection closed to make room just as its client's next request arrived (read, but
    /// not yet seen by the connection's task) does not serve that request: the backend never
    /// gets it. Before, the task parsed and forwarded it, and its answer could not be written
    /// (499): the backend ran a request its client saw fail, and may have been sent again.
    #[test]
    fn a_connection_closed_for_room_serves_no_request_it_read() {
        use std::io::{Read, Write};
        // A backend answering each request head, keeping all it received.
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let baddr = backend.local_addr().unwrap();
        let got = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let recorded = got.clone();
        std::thread::spawn(move || {
            for s in backend.incoming() {
                let (Ok(mut s), got) = (s, recorded.clone()) else { return };
                std::thread::spawn(move || {
                    let (mut pending, mut b) = (Vec::new(), [0u8; 4096]);
                    while let Ok(n @ 1..) = s.read(&mut b) {
                        got.lock().unwrap().extend_from_slice(&b[..n]);
                        pending.extend_from_slice(&b[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                        }
                    }
                });
            }
        });
        // A proxy for the VIP's runtime and shared state; its own listener is not used.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\n\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}]\n",
            baddr.port()
        );
        let cfg = crate::config::Config::parse(&text, "t.toml".as_ref()).expect("a valid config");
        let proxy = super::super::Proxy::start(&cfg, 1, crate::metrics::Metrics::new().l7.clone())
            .expect("proxy starts");
        let shared = proxy.shared.clone();
        let vip = shared.snapshot.load().vips["web"].clone();
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let shelves = shelves(1);
        let idle = Idle::new(shelves.clone(), 0, Counter::default());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        crate::proxy::uring::start(async {
            let long = std::time::Duration::from_secs(60);
            // The proxy's side of a client connection, and the client's.
            let conn = Socket::connect(l.local_addr().unwrap(), long, long).await.unwrap();
            let (mut client, peer) = l.accept().unwrap();
            let upstream = super::super::http::UpstreamPool::default();
            let served = tokio_uring::spawn(super::super::http::serve(
                conn,
                peer,
                listen,
                vip,
                shared.clone(),
                upstream,
                idle.clone(),
            ));
            client.write_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            // Answered, and idle: waiting for the next request.
            let start = std::time::Instant::now();
            while shelves[0].idle.load(Ordering::SeqCst) == 0 {
                assert!(start.elapsed() < std::time::Duration::from_secs(5), "never idle");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            // The whole first answer: its head, then its 2-byte body.
            let mut answer = Vec::new();
            let mut byte = [0u8; 1];
            while !answer.ends_with(b"\r\n\r\n") {
                client.read_exact(&mut byte).unwrap();
                answer.push(byte[0]);
            }
            let mut body = [0u8; 2];
            client.read_exact(&mut body).unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
            assert_eq!(&body, b"ok");
            // The next request arrives, and the connection is taken for room before its task
            // runs again (nothing awaited in between: one thread).
            client.write_all(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            assert!(idle.make_room(), "the connection is idle");
            let ended = tokio::time::timeout(std::time::Duration::from_secs(5), served).await;
            assert!(ended.is_ok(), "the connection ends");
            client.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest);
            let answered = rest.windows(5).any(|w| w == b"HTTP/");
            assert!(!answered, "no answer: {:?}", String::from_utf8_lossy(&rest));
        });
        // Anything forwarded was received before the connection's task ended (it waited for
        // the answer); a moment more for the backend's thread to record it.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let got = String::from_utf8_lossy(&got.lock().unwrap()).into_owned();
        assert!(got.contains("GET /first "), "{got}");
        assert!(!got.contains("/second"), "the backend got the request: {got}");
        proxy.shutdown(std::time::Duration::ZERO);
    }
}
