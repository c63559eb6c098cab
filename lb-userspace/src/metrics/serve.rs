//! The metrics endpoint: `GET /metrics` (and `HEAD`) over HTTP/1.1, answered from one background
//! thread.
//!
//! Its own small server (httparse for the request head, a current-thread tokio runtime for the
//! sockets) rather than an HTTP crate, because it must be able to stop accepting on a listening
//! socket it shares: a `--takeover` hands the very socket to the new process, and once that one
//! serves, this one stops ([`Serving::stop`]). If both answered, each scrape would land on one
//! process or the other and every counter would jump between two values, which Prometheus reads
//! as counter resets. A thread blocked in `accept` cannot be stopped without shutting the socket
//! down for both processes; a deregistered tokio listener can.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::Sender,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Semaphore, watch},
    time::{Instant, timeout, timeout_at},
};

/// A scrape waiting for the controller: the reply channel gets the exposition text, shared by
/// every scrape the controller answers at once (a page of a few MB with thousands of backends,
/// copied per connection, would cost the controller a copy per waiting scrape and the process
/// that much memory per connection).
pub type Scrape = tokio::sync::oneshot::Sender<std::sync::Arc<str>>;

/// Binds the metrics listener (separately from serving it, so the serving thread starts after
/// edgelb has dropped its capabilities).
pub fn bind(listen: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(listen)
}

/// How long a scrape's client may take to take each step of the response (a large exposition
/// to a slow reader goes through): a client that stops reading must not hold a connection slot.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection may take to send the first byte of its request: a scraper sends
/// it at once, and a silent connection holds one of the slots meanwhile.
const FIRST_BYTE: Duration = Duration::from_secs(2);
/// How long a request head may take, from its first byte to its end: a scraper sends it in one
/// segment, and a client dripping it byte by byte holds one of the slots meanwhile (hundreds of
/// them, all of the slots, for as long as this lasts if room were not made).
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a kept-alive connection may wait for its next request (Prometheus scrapes every
/// 15 to 60 s, typically), unless the endpoint runs out of connection slots: then idle
/// connections close, to make room.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the controller may take to render a scrape before the answer is a 503.
const CONTROLLER_WAIT: Duration = Duration::from_secs(10);
/// Connections served at once (each a task and a few KiB); more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// Largest request head taken.
const MAX_HEAD: usize = 8 * 1024;
/// Bytes written per step of a response (each within the client timeout).
const WRITE_CHUNK: usize = 256 * 1024;
/// How often room is made again while every connection slot is taken and the accept loop
/// waits for one (see [`accept_loop`]).
const MAKE_ROOM_EVERY: Duration = Duration::from_millis(50);

/// The endpoint being served; [`Serving::stop`] ends it.
pub struct Serving {
    stop: watch::Sender<bool>,
    /// Told once the listener is deregistered and closed.
    released: std::sync::mpsc::Receiver<()>,
}

impl Serving {
    /// Stops accepting and returns once this endpoint no longer takes connections (the
    /// listening socket itself stays open for whoever else holds it). Idle kept-alive
    /// connections close; scrapes in progress finish in the background, answered by the
    /// controller, which must not wait for them here: the controller calls this.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.released.recv_timeout(Duration::from_secs(2));
    }
}

/// Serves `GET /metrics` (and `HEAD /metrics`) on `listener` from a background thread; each
/// scrape asks the controller through `to_controller`.
pub fn serve(
    listener: std::net::TcpListener,
    to_controller: Sender<Scrape>,
) -> std::io::Result<Serving> {
    serve_with(listener, to_controller, CLIENT_TIMEOUT)
}

/// [`serve`] with clients cut off after `client_timeout` in a step of a response, or in a
/// request head after the shorter of it and [`HEAD_TIMEOUT`].
pub fn serve_with(
    listener: std::net::TcpListener,
    to_controller: Sender<Scrape>,
    client_timeout: Duration,
) -> std::io::Result<Serving> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    // Registered here, so that a listener the runtime cannot take fails the start.
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let (stop, stopping) = watch::channel(false);
    let (release, released) = std::sync::mpsc::channel();
    // A panic outside a connection's task ends the process (`panics::or_exit`): scrapes would
    // otherwise go unanswered with nothing said.
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        crate::panics::or_exit("metrics", || {
            rt.block_on(accept_loop(listener, to_controller, client_timeout, stopping, release))
        });
    })?;
    Ok(Serving { stop, released })
}

/// Accepts until told to stop, each connection in a task of its own, at most
/// [`MAX_CONNECTIONS`] at once; on stop, closes the listener, says so on `release`, and waits
/// for the tasks.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    to_controller: Sender<Scrape>,
    client_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
    release: std::sync::mpsc::Sender<()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // While every slot is taken: connections idle between requests close (those waiting are
    // told, those that become idle meanwhile see the flag), or if none is idle, the one that has
    // waited longest for a request head, to make room.
    let crowded = Arc::new(Crowded::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut failures = crate::accept::AcceptFailures::default();
    'accept: loop {
        let full = slots.available_permits() == 0;
        crowded.full.store(full, Ordering::Relaxed);
        // While every slot is taken, room is made again every MAKE_ROOM_EVERY: the first try
        // may come before the connections that took the last slots (just spawned) have listed
        // themselves as waiting for a head, or before a connection taken up by a scrape comes
        // to wait for its next head, and finds none to close; the loop would then wait for a
        // slot until HEAD_TIMEOUT frees one.
        let slot = loop {
            if full {
                crowded.make_room();
            }
            tokio::select! {
                biased;
                _ = stopped(&mut stopping) => break 'accept,
                s = slots.clone().acquire_owned() => {
                    break s.expect("the semaphore is never closed");
                }
                () = tokio::time::sleep(MAKE_ROOM_EVERY), if full => {}
            }
        };
        crowded.full.store(false, Ordering::Relaxed);
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut stopping) => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((s, _)) => {
                if let Some(failed) = failures.accepted() {
                    tracing::info!(failed, "metrics endpoint: accepting connections again");
                }
                let (ctl, stop, crowded) =
                    (to_controller.clone(), stopping.clone(), crowded.clone());
                tasks.spawn(async move {
                    connection(s, &ctl, client_timeout, stop, &crowded).await;
                    drop(slot);
                });
            }
            Err(e) => {
                let failed = failures.failed(&e);
                if let Some(say) = failed.say {
                    tracing::warn!(error = %e, "metrics endpoint: {say}");
                }
                if let Some(pause) = failed.pause {
                    tokio::time::sleep(pause).await;
                }
            }
        }
        // Reap what is done, so the set does not grow with every connection served.
        while tasks.try_join_next().is_some() {}
    }
    // Deregistered and closed now: new connections go to whoever else holds the socket.
    drop(listener);
    let _ = release.send(());
    while tasks.join_next().await.is_some() {}
}

/// Whether every connection slot is taken, and the connections that give way when it is:
/// those idle between requests, else the one that has waited longest for a request head.
#[derive(Default)]
struct Crowded {
    full: AtomicBool,
    /// Tells every connection idle between requests to close.
    idle: tokio::sync::Notify,
    /// Connections idle between requests now (each closes when `idle` tells it).
    idlers: AtomicUsize,
    /// Connections waiting for a request head (new ones, and those with a request already begun
    /// when they came to it), by when they began to wait; each is told to close through its
    /// sender.
    heads: std::sync::Mutex<Heads>,
}

/// The connections waiting for a request head, oldest first, and the number the next one gets
/// (two may begin in the same instant).
#[derive(Default)]
struct Heads {
    waiting: BTreeMap<(Instant, u64), tokio::sync::oneshot::Sender<()>>,
    next: u64,
}

impl Crowded {
    /// Every slot is taken: makes room for the next connection. The connections idle between
    /// requests close (their scrapers reconnect for their next scrape); if there is none, the
    /// one that has waited longest for a request head closes: clients that send a head slowly,
    /// or not at all, cannot hold every slot and keep a scrape, which sends its head at once,
    /// waiting in the backlog.
    fn make_room(&self) {
        if self.idlers.load(Ordering::Relaxed) > 0 {
            self.idle.notify_waiters();
            return;
        }
        let oldest = self.heads().waiting.pop_first();
        if let Some((_, close)) = oldest {
            let _ = close.send(());
        }
    }

    /// The connections waiting for a head (a panic elsewhere leaves the list whole: it is
    /// changed only by single inserts and removals).
    fn heads(&self) -> std::sync::MutexGuard<'_, Heads> {
        self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection now waits for a request: counted as idle (between requests) until the
    /// returned value is dropped, or listed as waiting for a head from now.
    fn waiting(&self, idle: bool) -> Waiting<'_> {
        if idle {
            self.idlers.fetch_add(1, Ordering::Relaxed);
            return Waiting { crowded: self, head: None };
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut heads = self.heads();
        let key = (Instant::now(), heads.next);
        heads.next += 1;
        heads.waiting.insert(key, tx);
        Waiting { crowded: self, head: Some((key, rx)) }
    }
}

/// A connection waiting for a request, known to [`Crowded`] until dropped: idle between
/// requests, or (`head`) listed as waiting for a head, with what tells it to close.
struct Waiting<'a> {
    crowded: &'a Crowded,
    head: Option<((Instant, u64), tokio::sync::oneshot::Receiver<()>)>,
}

impl Waiting<'_> {
    /// Resolves once this connection must close to make room.
    async fn told(&mut self) {
        match &mut self.head {
            Some((_, close)) => {
                // The sender is dropped only when it tells (`Crowded` outlives its connections).
                let _ = close.await;
            }
            None => self.crowded.idle.notified().await,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        match &self.head {
            Some((key, _)) => {
                self.crowded.heads().waiting.remove(key);
            }
            None => {
                self.crowded.idlers.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Serves one connection: requests one after another (keep-alive), until the client closes,
/// asks to close, stalls, or the endpoint stops, or runs out of slots while the connection is
/// idle (or has waited longest for a request head).
async fn connection(
    mut s: TcpStream,
    to_controller: &Sender<Scrape>,
    client_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
    crowded: &Crowded,
) {
    let mut buf = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        // A kept-alive connection is idle from here unless a request already waits: it makes
        // room if the endpoint is full, and goes if it stops. (A new one sends its request at
        // once, or goes after FIRST_BYTE; until its head is in, it makes room if it has waited
        // longest.)
        let idle = !first && buf.is_empty();
        if idle && (crowded.full.load(Ordering::Relaxed) || *stopping.borrow()) {
            return;
        }
        let wait = if first { FIRST_BYTE.min(client_timeout) } else { IDLE_TIMEOUT };
        first = false;
        let mut waiting = crowded.waiting(idle);
        let head = tokio::select! {
            biased;
            // Idle between requests, or in the head of one that began meanwhile (its scraper
            // asks again, of whoever serves now); pipelined requests already read are answered.
            _ = stopped(&mut stopping), if buf.is_empty() => return,
            // Every slot is taken, and this one is idle or has waited longest for its head.
            () = waiting.told() => return,
            h = read_head(&mut s, &mut buf, wait, HEAD_TIMEOUT.min(client_timeout)) => h,
        };
        drop(waiting);
        let Some(Head { method, path, close }) = head else { return };
        // HEAD (`curl -I`, uptime probes) is answered as GET is, scrape included, so that its
        // status says whether a scrape would work and its Content-Length is that of the body
        // GET would get (RFC 9110 9.3.2); only the body is left out.
        let head_only = method == "HEAD";
        let (status, body, kind): (u16, std::sync::Arc<str>, &str) = if path != "/metrics" {
            (404, "not found\n".into(), "text/plain; charset=utf-8")
        } else if method != "GET" && !head_only {
            (405, "method not allowed\n".into(), "text/plain; charset=utf-8")
        } else {
            match scrape(to_controller).await {
                Some(text) => {
                    (200, text, "application/openmetrics-text; version=1.0.0; charset=utf-8")
                }
                None => (503, "controller busy\n".into(), "text/plain; charset=utf-8"),
            }
        };
        // After a stop, no request more on this connection: the next goes to the new process.
        let close = close || *stopping.borrow();
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        // A 405 must say which methods the resource takes (RFC 9110 15.5.6).
        let allow = if status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: {}\r\n\r\n",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        // The client timeout bounds each step, so a large exposition to a slow but reading
        // client goes through, and one that stops reading is cut off. The head goes out with
        // the start of the body in one write (a small answer in one segment, as a client
        // reading it in one read expects); the rest is written from the shared text, so a large
        // exposition is not copied whole per connection.
        let body = if head_only { &[][..] } else { body.as_bytes() };
        let first = body.len().min(WRITE_CHUNK.saturating_sub(head.len()));
        let mut start = head.into_bytes();
        start.extend_from_slice(&body[..first]);
        for part in std::iter::once(&start[..]).chain(body[first..].chunks(WRITE_CHUNK)) {
            if !matches!(timeout(client_timeout, s.write_all(part)).await, Ok(Ok(()))) {
                return;
            }
        }
        if close {
            return;
        }
    }
}

/// What the endpoint reads of a request.
struct Head {
    method: String,
    /// The target without its query.
    path: String,
    /// The client asked to close after this response (or speaks HTTP/1.0), or sent a body,
    /// which is not read.
    close: bool,
}

/// Reads one request head into `buf` (which keeps any bytes after it for the next): waits up to
/// `wait` for its first byte, then up to `head_timeout` from it for the whole head. `None` when
/// the client closed, stalled, or sent something too large or unreadable (the connection then
/// closes: a scraper gets its answer or nothing, never a half-parsed one).
async fn read_head(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    wait: Duration,
    head_timeout: Duration,
) -> Option<Head> {
    let mut deadline =
        if buf.is_empty() { Instant::now() + wait } else { Instant::now() + head_timeout };
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let token = |h: &httparse::Header, t: &str| {
                    h.value
                        .split(|&b| b == b',')
                        .any(|v| v.trim_ascii().eq_ignore_ascii_case(t.as_bytes()))
                };
                let connection =
                    || req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection"));
                // A request body is never read: the connection closes after the answer, or the
                // body's bytes would be read as the next request's head.
                let body = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        || (h.name.eq_ignore_ascii_case("content-length")
                            && h.value.trim_ascii() != b"0")
                });
                let close = body
                    || if req.version == Some(0) {
                        !connection().any(|h| token(h, "keep-alive"))
                    } else {
                        connection().any(|h| token(h, "close"))
                    };
                let target = req.path.unwrap_or("");
                let head = Head {
                    method: req.method.unwrap_or("").to_owned(),
                    path: target.split('?').next().unwrap_or("").to_owned(),
                    close,
                };
                buf.drain(..len);
                return Some(head);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return None,
        }
        let had = buf.len();
        buf.reserve(1024);
        let mut chunk = [0u8; 1024];
        let n = match timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        buf.extend_from_slice(&chunk[..n]);
        if had == 0 {
            // The request has begun: the whole of its head comes within the head timeout.
            deadline = Instant::now() + head_timeout;
        }
    }
}

/// Resolves once the endpoint is told to stop; never if its [`Serving`] was dropped instead
/// (dropping the handle leaves the endpoint serving for the life of the process).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Asks the controller for the exposition text; `None` if it does not answer in time.
async fn scrape(to_controller: &Sender<Scrape>) -> Option<std::sync::Arc<str>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    to_controller.send(tx).ok()?;
    timeout(CONTROLLER_WAIT, rx).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        time::Instant,
    };

    use super::*;

    /// An endpoint served with `client_timeout` whose controller answers every scrape with
    /// `body`; its address.
    fn endpoint(body: &'static str, repeat: usize, client_timeout: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Scrape>();
        std::thread::spawn(move || {
            for s in rx {
                let _ = s.send(body.repeat(repeat).into());
            }
        });
        // Dropped, the handle leaves the endpoint serving.
        drop(serve_with(l, tx, client_timeout).unwrap());
        addr
    }

    /// A scraper that asks for a large exposition and stops reading holds the endpoint only
    /// until the client timeout; the next scrape is answered after it.
    #[test]
    fn a_scraper_that_stops_reading_does_not_hold_the_endpoint() {
        // Every scrape gets 16 MiB.
        let addr = endpoint("x", 16 << 20, Duration::from_secs(2));
        let stuck =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        stuck.set_recv_buffer_size(4096).unwrap();
        stuck.connect(&addr.into()).unwrap();
        let mut stuck: TcpStream = stuck.into();
        stuck.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&got[..got.len().min(80)])
        );
        assert!(got.len() > 16 << 20, "the whole exposition ({} bytes)", got.len());
        assert!(t.elapsed() < Duration::from_secs(5), "answered after {:?}", t.elapsed());
        drop(stuck);
    }

    /// An endpoint nobody scrapes for longer than the client timeout still answers, on a new
    /// connection and on a kept-alive one.
    #[test]
    fn an_idle_endpoint_keeps_serving() {
        let addr = endpoint("ok\n", 1, Duration::from_millis(300));
        let mut kept = TcpStream::connect(addr).unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let ask = |s: &mut TcpStream| {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut got = [0u8; 512];
            let n = s.read(&mut got).unwrap_or(0);
            String::from_utf8_lossy(&got[..n]).into_owned()
        };
        assert!(ask(&mut kept).starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(1200));
        let mut fresh = TcpStream::connect(addr).unwrap();
        fresh.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        assert!(ask(&mut fresh).starts_with("HTTP/1.1 200"));
        assert!(ask(&mut kept).starts_with("HTTP/1.1 200"));
    }

    /// A controller that answers every scrape with `body`.
    fn controller(body: &'static str) -> Sender<Scrape> {
        let (tx, rx) = std::sync::mpsc::channel::<Scrape>();
        std::thread::spawn(move || {
            for s in rx {
                let _ = s.send(body.into());
            }
        });
        tx
    }

    /// As in a takeover: two endpoints serve one listening socket, then the old one stops. From
    /// then on every scrape reaches the new one, and a scraper kept alive on the old one is
    /// closed rather than answered again, so counters never jump back.
    #[test]
    fn a_stopped_endpoint_leaves_a_shared_socket_to_the_other() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let old = serve(l.try_clone().unwrap(), controller("old\n")).unwrap();
        // The body of one response (4 bytes here), or None if the connection ends first.
        let ask = |s: &mut TcpStream| {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").ok()?;
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            loop {
                match s.read(&mut byte) {
                    Ok(1) => got.push(byte[0]),
                    _ => return None,
                }
                let text = String::from_utf8_lossy(&got);
                if let Some((_, body)) = text.split_once("\r\n\r\n")
                    && body.len() == 4
                {
                    return Some(body.to_owned());
                }
            }
        };
        let connect = || {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        };
        let mut kept = connect();
        assert_eq!(ask(&mut kept).as_deref(), Some("old\n"));
        let new = serve(l, controller("new\n")).unwrap();
        old.stop();
        for _ in 0..20 {
            assert_eq!(ask(&mut connect()).as_deref(), Some("new\n"));
        }
        assert_ne!(ask(&mut kept).as_deref(), Some("old\n"), "the old endpoint answered again");
        new.stop();
    }

    /// Connections that take every slot give way to a scrape at once: silent new ones (the one
    /// that has waited longest for each new connection), not after [`FIRST_BYTE`], and
    /// kept-alive ones idle between scrapes.
    #[test]
    fn idle_connections_make_room_for_a_scrape() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _serving = serve_with(l, controller("m\n"), Duration::from_secs(10)).unwrap();
        let scrape = |within: Duration| {
            let t = Instant::now();
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
            let mut got = String::new();
            let _ = s.read_to_string(&mut got);
            assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("m\n"), "{got:?}");
            assert!(t.elapsed() < within, "answered after {:?}", t.elapsed());
        };
        let silent: Vec<TcpStream> =
            (0..MAX_CONNECTIONS + 8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        scrape(Duration::from_secs(1));
        drop(silent);
        // Kept alive after one scrape each, then idle: the next scrape needs no timeout.
        let kept: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
                let mut got = [0u8; 512];
                let n = s.read(&mut got).unwrap();
                assert!(got[..n].starts_with(b"HTTP/1.1 200"));
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        scrape(Duration::from_secs(1));
        drop(kept);
    }

    /// Clients that each began a request head and send no more of it take every slot, and more
    /// wait in the backlog: a scrape is answered at once (the one that has waited longest
    /// closes to make room for each new connection), well before [`HEAD_TIMEOUT`] would free a
    /// slot; and a client dripping its head is cut off after [`HEAD_TIMEOUT`] from its first
    /// byte, however long the client timeout.
    #[test]
    fn slow_request_heads_make_room_for_a_scrape() {
        // A backlog that holds every client (std's holds 128).
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        l.listen(1024).unwrap();
        let l = TcpListener::from(l);
        let addr = l.local_addr().unwrap();
        // Queued in the backlog before the endpoint serves, and the scrape sent at once after:
        // the endpoint takes them in one burst, with no pause for the slow ones to be listed.
        let slow: Vec<TcpStream> = (0..MAX_CONNECTIONS + 8)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"G").unwrap();
                s
            })
            .collect();
        let _serving = serve(l, controller("m\n")).unwrap();
        let t = Instant::now();
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("m\n"), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "answered after {:?}", t.elapsed());
        drop(slow);
        // Alone, a client sending a byte of its head every 200 ms is closed once HEAD_TIMEOUT
        // has passed since the first (its writes fail a write or two later), with a client
        // timeout of 10 s.
        let mut drip = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let bound = HEAD_TIMEOUT + Duration::from_secs(2);
        let head =
            b"GET /metrics HTTP/1.1\r\nX-Slow: ".iter().copied().chain(std::iter::repeat(b'a'));
        let cut = head.take_while(|_| t.elapsed() < bound).find_map(|b| {
            let failed = drip.write_all(&[b]).is_err();
            std::thread::sleep(Duration::from_millis(200));
            failed.then(|| t.elapsed())
        });
        let cut =
            cut.unwrap_or_else(|| panic!("a head dripped for {:?} was still read", t.elapsed()));
        assert!(cut > HEAD_TIMEOUT, "closed after {cut:?}");
    }

    /// Every slot taken by a scrape the controller answers only once all have asked, each with
    /// the first byte of its next request behind it: when the accept loop finds itself full,
    /// none waits for a head yet and there is no room to make; once answered, they all wait for
    /// their next head, and room is made again while the loop waits for a slot, so a new
    /// scrape is answered well before [`HEAD_TIMEOUT`] would free one.
    #[test]
    fn connections_that_come_to_wait_for_a_head_make_room_for_a_scrape() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Scrape>();
        std::thread::spawn(move || {
            // Held until every slot has asked, then answered at once, and later ones at once.
            let (mut asked, mut all) = (Vec::new(), false);
            for s in rx {
                asked.push(s);
                all |= asked.len() >= MAX_CONNECTIONS;
                if all {
                    for s in asked.drain(..) {
                        let _ = s.send("m\n".into());
                    }
                }
            }
        });
        let _serving = serve(l, tx).unwrap();
        let busy: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n\r\nG").unwrap();
                s
            })
            .collect();
        let t = Instant::now();
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("m\n"), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "answered after {:?}", t.elapsed());
        drop(busy);
    }

    /// Sends `req` on a new connection to `addr`; what came back until the server closed (or
    /// 3 s passed).
    fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(req).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Paths other than `/metrics` get 404, methods other than GET and HEAD on it 405; HTTP/1.0
    /// and `Connection: close` close after the answer; the query string does not matter. The
    /// scrape is OpenMetrics whatever `Accept` asks for (README).
    #[test]
    fn answers_only_metrics_and_honours_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _serving = serve(l, controller("m\n")).unwrap();
        let exchange = |req: &[u8]| exchange(addr, req);
        let r = exchange(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nm\n"), "{r:?}");
        assert!(r.contains("Connection: close\r\n"), "{r:?}");
        let openmetrics = "\r\nContent-Type: application/openmetrics-text; version=1.0.0; ";
        assert!(r.contains(openmetrics), "{r:?}");
        let r = exchange(b"GET /metrics HTTP/1.0\r\nAccept: text/plain;version=0.0.4\r\n\r\n");
        assert!(r.contains(openmetrics) && r.ends_with("\r\n\r\nm\n"), "{r:?}");
        let r = exchange(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 "), "{r:?}");
        // Another method on /metrics: 405, naming the ones it takes; another path stays 404.
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let r = exchange(
                format!("{method} /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
            );
            assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{method}: {r:?}");
            assert!(r.contains("\r\nAllow: GET, HEAD\r\n"), "{method}: {r:?}");
        }
        let r = exchange(b"POST / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 ") && !r.contains("Allow:"), "{r:?}");
        // Garbage: closed without an answer.
        assert_eq!(exchange(b"\x00\x01 nonsense\r\n\r\n"), "");
        // A request with a body (never read) is answered, then the connection closes: its
        // body is not taken for the next request (here one that would be answered).
        let r = exchange(
            b"POST /metrics HTTP/1.1\r\nContent-Length: 25\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 405 ") && r.contains("Connection: close\r\n"), "{r:?}");
        assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r:?}");
    }

    /// `HEAD /metrics` (as `curl -I` sends) gets the head `GET /metrics` gets, Content-Length
    /// included, and no body: the next request on the connection is answered right after it.
    /// `HEAD` elsewhere gets the 404 head, again without a body.
    #[test]
    fn head_is_answered_like_get_without_the_body() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _serving = serve(l, controller("m\n")).unwrap();
        let exchange = |req: &[u8]| exchange(addr, req);
        let r = exchange(
            b"HEAD /metrics HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        let (head, rest) = r.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{r:?}"));
        let get = rest.strip_suffix("\r\n\r\nm\n").unwrap_or_else(|| panic!("{r:?}"));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{r:?}");
        assert!(head.contains("\r\nContent-Length: 2\r\n"), "{r:?}");
        assert_eq!(head, get.replace("Connection: close", "Connection: keep-alive"), "{r:?}");
        let r = exchange(b"HEAD /?x HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 ") && r.ends_with("\r\n\r\n"), "{r:?}");
    }
}
