//! The HTTP/1.1 proxy: one task per client connection, requests handled one at a time in order
//! (so pipelined requests are safe: the next one is only read once the previous response is
//! complete), bodies streamed in both directions (never buffered whole), keep-alive on both sides
//! with a per-thread pool of idle backend connections.
//!
//! Phases of a request: read and parse the head (httparse; header-size, header-count and time
//! limits) → pick a pool by Host and path → pick a backend → send the rewritten head and stream
//! the body, reading the response head meanwhile (a backend may answer before the body is
//! through, which ends the body there, but for a 2xx: the rest of the body then goes on beside
//! the response) → read the response head (response timeout) → stream the response back.
//! Connect errors, timeouts and 502/503/504 answers are retried on another backend for
//! idempotent requests without a body (for one on the member its stickiness cookie names,
//! connect errors only; for none once an interim response reached the client); anything else
//! gets one clean error response.

use std::{
    borrow::Cow,
    cell::{Cell, RefCell},
    fmt::Write as _,
    io::{self, Write as _},
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use ahash::AHashMap;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::time::timeout_at;
use tokio_uring::buf::IoBuf;

use super::{
    Shared, VipRuntime,
    balance::{InFlight, Pool},
    chunked::Chunked,
    client_ip,
    reuse::Idle as IdleClients,
    uring::{Armed, Socket},
};
use crate::config::{Algorithm, L7Mode};

/// Pooled connections idle longer than this are not reused (backends time out idle keep-alive
/// connections; a stale one would fail the next request). A VIP with a shorter idle timeout
/// keeps its backend connections idle only that long: the idle timeout is the VIP's keep-alive
/// time on both sides.
const POOL_MAX_IDLE: Duration = Duration::from_secs(4);
/// How often each thread closes the pooled connections past their idle limit. Without it, a
/// connection is only found stale when a request for its backend comes (a backend removed from
/// the config, or the surplus of a busy moment, would stay open for ever).
const POOL_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Read size.
const READ_CHUNK: usize = 4 * 1024;
/// The most room a pooled backend connection's receive buffer ([`Idle::armed`]) may hold. A
/// response head reads into the backend buffer until it is complete, which grows it up to
/// [`MAX_RESPONSE_HEAD_BYTES`] and a read more (some 128 KiB); such a buffer goes into the pool
/// replaced by a fresh one of [`READ_CHUNK`], rather than be held for as long as its connection
/// idles. Body streaming and ordinary heads keep it at a read or two.
const POOLED_BUF_MAX: usize = 4 * READ_CHUNK;
/// The most headers a backend's response head may have. Fixed, and generous: above HAProxy's
/// default (101, `tune.http.maxhdr`), so an answer HAProxy relays passes here too, however many
/// `Set-Cookie` or security headers it carries; parsed into slots on the stack. A head with
/// more gets the client a 502 ([`Attempt::TooLarge`]).
const MAX_RESPONSE_HEADERS: usize = 128;
/// The most bytes a backend's response head may take, from its status line to the blank line
/// that ends it. Fixed, and generous: 4 times HAProxy's 16 KiB buffer and 8 to 16 times nginx's
/// `proxy_buffer_size` (4 or 8 KiB), so what those proxies relay passes here too, while one
/// response cannot make a proxy thread buffer or parse much more. Enforced to the byte whatever
/// sizes the head arrives in: a larger head gets the client a 502 ([`Attempt::TooLarge`]).
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// How many bytes of a response head that does not parse the debug log shows.
const SHOWN_HEAD_BYTES: usize = 200;
/// How long at most a client connection whose request body was cut off ([`Answer::cut`]) or
/// refused ([`reject`]) is kept after its response, reading and dropping the rest of the body (the VIP's idle timeout
/// if shorter): nginx's `lingering_timeout`. A client that reads the response as it sends (curl,
/// browsers, Go) stops and closes within a round trip, which ends the wait at once; this bounds
/// what one that sends its whole body first can hold (a task and its `max_connections` place).
const LINGER: Duration = Duration::from_secs(5);
/// Read size for the rest of a request body that is dropped ([`discard`]): fewer, larger reads.
const LINGER_CHUNK: usize = 64 * 1024;

/// An idle keep-alive connection to a backend.
struct Idle {
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
    fn kept_for(
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
        close(&self.socket);
        None
    }
}

/// Idle connections to one backend, oldest first.
type IdleList = Vec<Idle>;

/// Idle keep-alive connections to backends, per thread.
#[derive(Clone, Default)]
pub struct UpstreamPool {
    idle: Rc<RefCell<AHashMap<SocketAddr, IdleList>>>,
}

/// Closes a connection taken out of the pool now, not whenever its last clone goes (this also
/// completes a receive still pending on it, which holds a clone).
fn close(s: &Socket) {
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// How long a backend that closes its connection after a response is given to do so.
const BACKEND_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Closes a backend connection whose response is complete and which the backend closes itself
/// (it said `Connection: close`, or was asked to), once it has: the side that closes first
/// keeps the connection in TIME_WAIT for a minute, holding its local port, and a proxy that
/// closed every such connection first would run out of ports to a backend at some 500 requests
/// a second (with the PROXY protocol, or `upstream_keepalive = 0`, every request opens one).
/// Waits in a task of its own, so that the client's next request does not; closes anyway after
/// [`BACKEND_CLOSE_WAIT`].
fn close_after_backend(up: Socket) {
    tokio_uring::spawn(async move {
        let mut buf = BytesMut::with_capacity(64);
        let _ = tokio::time::timeout(BACKEND_CLOSE_WAIT, async {
            while let Ok(n) = read_more(&up, &mut buf).await {
                if n == 0 {
                    break;
                }
                buf.clear();
            }
        })
        .await;
        close(&up);
    });
}

impl UpstreamPool {
    /// An idle connection to `addr` that may be used again at `now` ([`Idle::reusable`], with
    /// `check`; the most recently idle first), with the receive pending on it (the first read
    /// of its next response). Those found unusable on the way are closed.
    fn take(&self, addr: SocketAddr, now: Instant, check: bool) -> Option<(Socket, Armed)> {
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
    fn put(
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
        list.drain(..stale).for_each(|c| close(&c.socket));
        if list.len() < max {
            list.push(Idle::new(s, buf, now, max_idle, peek));
        } else {
            close(&s);
        }
    }

    /// Closes every connection past its time at `now`, for every backend, and forgets
    /// backends left without idle connections (one removed from the config, say).
    fn sweep(&self, now: Instant) {
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|c| {
                let keep = c.expires > now;
                if !keep {
                    close(&c.socket);
                }
                keep
            });
            !list.is_empty()
        });
    }

    /// Sweeps the pool every [`POOL_SWEEP_EVERY`], until its task is aborted (when the thread
    /// ends).
    pub(super) async fn sweep_every(self) {
        loop {
            tokio::time::sleep(POOL_SWEEP_EVERY).await;
            self.sweep(Instant::now());
        }
    }
}

/// A client connection's private backend connection, idle between its requests: one that
/// carries connection-bound authentication ([`binds_connection`]: NTLM, Negotiate), which
/// backends such as IIS with Windows authentication tie to the TCP connection rather than to
/// each request. Shared through the pool, it would serve another client's requests as this
/// client's user (and NTLM's handshake needs its legs on one connection, which the pool does not
/// give). So, as HAProxy marks such connections private, it never enters the pool: it waits
/// here for this client connection's next request, which goes over it to its backend, bypassing
/// the pick, while that backend may take it ([`Private::take`]); otherwise, and when the client
/// connection ends (this is dropped), it is closed. One per client connection: the request that
/// takes it makes the next one, if any.
#[derive(Default)]
struct Private(Option<(SocketAddr, Idle)>);

impl Private {
    /// Keeps `c`, a connection to `addr`, for this client connection's next request (closing
    /// one kept before, if any).
    fn keep(&mut self, addr: SocketAddr, c: Idle) {
        if let Some((_, old)) = self.0.replace((addr, c)) {
            close(&old.socket);
        }
    }

    /// The private connection for a request at `now` that routes to `pool`, as (member,
    /// connection, the receive pending on it), if its backend is a member of `pool` that may
    /// take the request (up and not passively down, see [`Pool::pick`]; a backend back from an
    /// ejection only as its trial; a drained one too, as it keeps its sticky clients: the
    /// session authenticated on the connection is this client's, and moving it would break an
    /// NTLM handshake half done) and the connection may be used again, with the checks of a
    /// pooled one ([`Idle::reusable`], always with a peek: it may have waited as long as the
    /// client's idle timeout, longer than backends keep idle connections). Otherwise it is
    /// closed. Either way the slot is empty after.
    fn take(&mut self, pool: &Pool, now: Instant) -> Option<(usize, Socket, Armed)> {
        let (addr, c) = self.0.take()?;
        let member = pool.members.iter().position(|m| m.state.addr == addr && m.up);
        let Some(i) = member else {
            close(&c.socket);
            return None;
        };
        let (s, armed) = c.reusable(addr, now, true)?;
        // Last: it claims a trial of a backend back from an ejection.
        if !pool.members[i].state.admit() {
            close(&s);
            return None;
        }
        Some((i, s, armed))
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        if let Some((_, c)) = self.0.take() {
            close(&c.socket);
        }
    }
}

/// Reads more bytes into `buf` (appending); Ok(0) at end of stream. Once the parts split off
/// `buf` earlier (heads, body chunks) are dropped, the receive's `reserve` takes their room back,
/// so a connection keeps re-using one allocation.
async fn read_more(s: &Socket, buf: &mut BytesMut) -> io::Result<usize> {
    let (r, b) = s.recv(std::mem::take(buf), READ_CHUNK).await;
    *buf = b;
    r
}

/// Writes all of `data` (a `Vec`, or `Bytes` split off a read buffer without copying).
async fn write<B: IoBuf>(s: &Socket, data: B) -> io::Result<()> {
    s.send_all(data).await.map(drop)
}

/// The reason phrase of a status the proxy answers with itself.
fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Counts a request answered with `status` (in `edgelb_l7_requests_total`) and, with the VIP's
/// `access_log`, logs it: client, method and target (when the head parsed), status, backend
/// (when one was tried), milliseconds since `started` (the complete head), and who cut the
/// response's body short after its head went out (`cut`, `-` for a whole response).
fn finished(
    vip: &VipRuntime,
    peer: SocketAddr,
    status: u16,
    req: Option<&ReqHead>,
    backend: Option<SocketAddr>,
    started: Option<Instant>,
    cut: Option<Cut>,
) {
    finished_cut(vip, peer, status, req, backend, started, cut, None);
}

/// [`finished`], with who ended the rest of a request body that went on beside an early 2xx
/// and did not go through (`cut_body`, `-` otherwise): for a response streamed after a
/// backend's head. One access-log line shape for every request.
#[allow(clippy::too_many_arguments)]
fn finished_cut(
    vip: &VipRuntime,
    peer: SocketAddr,
    status: u16,
    req: Option<&ReqHead>,
    backend: Option<SocketAddr>,
    started: Option<Instant>,
    cut: Option<Cut>,
    cut_body: Option<Cut>,
) {
    vip.count(status);
    if vip.cfg.access_log {
        // The method and target are the client's bytes; httparse admits any byte from 0x80 up
        // (as UTF-8) in a target. No header is logged.
        tracing::info!(
            target: "edgelb::access",
            vip = %vip.name,
            client = %client_ip(peer),
            method = %Escaped(req.map_or("-", |r| r.method())),
            target = %Escaped(req.map_or("-", |r| r.path())),
            status,
            backend = %backend.map(|b| b.to_string()).as_deref().unwrap_or("-"),
            ms = started.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0),
            cut = %cut.map_or("-", Cut::as_str),
            cut_body = %cut_body.map_or("-", Cut::as_str),
            "request"
        );
    }
}

/// A client-sent field as the access log writes it: each byte outside visible ASCII
/// (0x21-0x7E) as `%XX`, so that a client cannot put a control (a C1 CSI, which a terminal
/// showing the log obeys), a line separator (U+2028) or anything else invisible into a log line.
/// Written straight into the formatter: nothing is allocated, and a field with nothing to escape
/// (the common case) is one write.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if !c.is_ascii_graphic() {
                f.write_str(&s[start..i])?;
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    write!(f, "%{b:02X}")?;
                }
                start = i + c.len_utf8();
            }
        }
        f.write_str(&s[start..])
    }
}

/// Refuses a request with `status` (counted and logged as [`finished`]) and closes. The close
/// lingers ([`linger`]) when the client may still be sending: the rest of a head too large to
/// read (431) or malformed (400, 505: its body, say, which may still be on its way when the
/// head is found wrong), the body of one read whole, or anything still unread behind a head
/// that came too slowly (408). Closing at once would reset the
/// connection under the bytes still arriving, and the client would see "connection reset"
/// instead of the answer (a browser with oversized cookies, an upload refused).
async fn reject(
    client: &Socket,
    vip: &VipRuntime,
    peer: SocketAddr,
    status: u16,
    req: Option<&ReqHead>,
) {
    finished(vip, peer, status, req, None, None, None);
    let sent = respond(client, status, req.is_some_and(|r| r.method() == "HEAD")).await;
    if sent.is_ok() && (req.is_some() || matches!(status, 400 | 431 | 505) || client.has_unread()) {
        linger(client, vip.cfg.idle_timeout).await;
    }
}

/// Answers with a complete error response of the proxy's own, and closes. The answer to a HEAD
/// request has no content (RFC 9110 9.3.2), only the length a GET would get.
async fn respond(s: &Socket, status: u16, head_request: bool) -> io::Result<()> {
    let reason = reason(status);
    let body = format!("{status} {reason}\n");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_request {
        out.push_str(&body);
    }
    write(s, out.into_bytes()).await
}

/// Closes a client connection whose request body was cut off ([`Answer::cut`]) or left unread
/// (the proxy's own refusals, [`reject`]) after its response: ends the sending side (the client
/// reads the end of the stream after the response), then reads and drops what the client still
/// sends until it ends its side too, for at most [`LINGER`] (the idle timeout if shorter).
/// Closing at once, with the body's rest unread or still arriving, would reset the connection,
/// and a reset can cost the client the response it has not read yet, or fail the write it is in
/// before it reads the response at all (nginx's lingering close, Go's `closeWriteAndWait`).
pub(super) async fn linger(client: &Socket, idle: Duration) {
    let _ = client.shutdown(std::net::Shutdown::Write);
    let end = tokio::time::Instant::now() + LINGER.min(idle);
    // On the timeout the read stays pending until the socket is shut down, as `serve` does
    // next.
    let _ = timeout_at(end, discard(client)).await;
}

/// Reads and drops what the client sends until its side ends (or fails): the rest of a
/// request body that is not passed on. Unbounded: callers bound it.
async fn discard(client: &Socket) {
    let mut sink = BytesMut::new();
    loop {
        sink.clear();
        let (read, back) = client.recv(sink, LINGER_CHUNK).await;
        sink = back;
        if !matches!(read, Ok(n) if n > 0) {
            return;
        }
    }
}

/// How long a connection over the limit is given to send its request head before it is
/// refused all the same (the header timeout if shorter), and then to end its side while its
/// close lingers: a client's head arrives with its first segments, and a connection over the
/// limit is not to be held long.
const REFUSE_WAIT: Duration = Duration::from_secs(1);

/// Over the connection limit: a 503 for HTTP (counted and logged as [`finished`]), a plain
/// close for TCP. When `graceful` (a place among the proxy's lingering refusals was free), the
/// request head is read first, for at most [`REFUSE_WAIT`] and [`READ_CHUNK`] bytes: the
/// answer to a HEAD request has no content, and the refusal is logged with the request it
/// refused. The close then lingers, for [`REFUSE_WAIT`] at most: the request was read no
/// further, and closing with it unread would reset the connection under the 503 (and cost a
/// client that is still sending an upload the answer). Otherwise (a flood) the 503 goes at
/// once. The caller shuts the socket down after.
pub async fn refuse(s: &Socket, vip: &VipRuntime, peer: SocketAddr, graceful: bool) {
    if vip.cfg.mode != L7Mode::Http {
        return;
    }
    if !graceful {
        finished(vip, peer, 503, None, None, None, None);
        let _ = respond(s, 503, false).await;
        return;
    }
    let cfg = &vip.cfg;
    let deadline = tokio::time::Instant::now() + REFUSE_WAIT.min(cfg.header_timeout);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut scan = HeadScan::default();
    let req = loop {
        // Enough for the request line and the usual headers: the method is all that is needed.
        if buf.len() >= READ_CHUNK {
            break None;
        }
        if scan.request_ready(&mut buf) {
            match parse_request(&mut buf, cfg.max_headers) {
                Ok(Some(r)) => break Some(r),
                Ok(None) => {}
                Err(_) => break None,
            }
        }
        match timeout_at(deadline, read_more(s, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Gone, or failed: nobody to answer.
            Ok(_) => return,
            Err(_) => break None,
        }
    };
    finished(vip, peer, 503, req.as_ref(), None, None, None);
    let head_request = req.as_ref().is_some_and(|r| r.method() == "HEAD");
    if respond(s, 503, head_request).await.is_ok() && (req.is_some() || s.has_unread()) {
        linger(s, REFUSE_WAIT.min(cfg.idle_timeout)).await;
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Where a part of a message head lies in its bytes.
#[derive(Clone, Copy, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// The position of `part`, a sub-slice of `base` (as httparse hands them out).
    fn of(base: &[u8], part: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
        if part.is_empty() || start + part.len() > base.len() {
            return Span::default();
        }
        Span { start: start as u32, end: (start + part.len()) as u32 }
    }
}

/// A parsed message head, kept as the bytes it arrived in (split off the read buffer, not
/// copied); names, values, method, path and reason are positions in them. This saves the two
/// allocations per header that owned strings cost.
struct Head {
    bytes: Bytes,
    headers: Vec<(Span, Span)>,
    /// What its Connection headers say, found once, as the head is parsed.
    connection: ConnectionOptions,
}

/// What a head's `Connection` headers say (RFC 9112 9.6, RFC 9110 7.6.1), found in one pass
/// over their tokens when the head is parsed. Every header is then checked against them in
/// constant time, however many tokens there are: checked against every token, a head with many
/// headers and a long Connection list (1000 headers and half a million tokens fit in 1 MiB)
/// cost its proxy thread seconds, and every connection on that thread waited.
#[derive(Default)]
struct ConnectionOptions {
    /// `close` is listed.
    close: bool,
    /// `keep-alive` is listed.
    keep_alive: bool,
    /// `upgrade` is listed.
    upgrade: bool,
    /// By header index: does a token name that header, which is hop-by-hop then (never Host:
    /// see [`Head::end_to_end`])? Empty when no token names any header (the usual case: no
    /// allocation).
    named: Vec<bool>,
}

/// Connection tokens naming headers that a head keeps at hand and compares each header name
/// with; past that many, the head's header names go into a table (one lookup per token).
const CONNECTION_TOKENS: usize = 8;

/// Bit `n` of a length mask stands for names of `n` bytes (`n` < 63), bit 63 for longer ones.
fn length_bit(name: &[u8]) -> u64 {
    1 << name.len().min(63)
}

/// The lengths ([`length_bit`]) of the fixed hop-by-hop names and the connection options
/// (`close`; the others are in the list): a token of another length is none of them, and is
/// passed over with one comparison.
const SPECIAL_LENGTHS: u64 = {
    let mut mask = 1 << "close".len();
    let mut i = 0;
    while i < HOP_BY_HOP.len() {
        mask |= 1 << HOP_BY_HOP[i].len();
        i += 1;
    }
    mask
};

/// A header name, compared and hashed without regard to ASCII case.
struct Caseless<'a>(&'a [u8]);

impl PartialEq for Caseless<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(other.0)
    }
}

impl Eq for Caseless<'_> {}

impl std::hash::Hash for Caseless<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_usize(self.0.len());
        self.0.iter().for_each(|b| h.write_u8(b.to_ascii_lowercase()));
    }
}

impl ConnectionOptions {
    /// The options of `head`'s Connection headers: one pass over their tokens, and one over the
    /// headers if a token may name one.
    fn of(head: &Head) -> ConnectionOptions {
        let mut o = ConnectionOptions::default();
        // Tokens that may name headers: the first few at hand; with more, every header name
        // of the head in a table, marked when a token names it (the table is as large as the
        // head's header count, whatever the token count).
        let mut few: [&[u8]; CONNECTION_TOKENS] = [&[]; CONNECTION_TOKENS];
        let mut n = 0;
        let mut table: Option<AHashMap<Caseless<'_>, bool>> = None;
        // Which lengths the head's header names have ([`length_bit`]): a token of another
        // length names none, and needs no lookup.
        let mut lengths = 0u64;
        for t in tokens(head, "connection") {
            // Only tokens of these lengths can be options or hop-by-hop names: most tokens
            // are passed over with one comparison.
            if SPECIAL_LENGTHS & length_bit(t) != 0 {
                o.close |= t.eq_ignore_ascii_case(b"close");
                o.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                o.upgrade |= t.eq_ignore_ascii_case(b"upgrade");
                // Dropped anyway (`keep-alive`, `upgrade` and the others).
                if fixed_hop(t) {
                    continue;
                }
            }
            if n < CONNECTION_TOKENS {
                few[n] = t;
                n += 1;
                continue;
            }
            let table = table.get_or_insert_with(|| {
                let mut names: AHashMap<Caseless<'_>, bool> = head
                    .headers()
                    .map(|(name, _)| {
                        lengths |= length_bit(name);
                        (Caseless(name), false)
                    })
                    .collect();
                for t in few {
                    if let Some(listed) = names.get_mut(&Caseless(t)) {
                        *listed = true;
                    }
                }
                names
            });
            if lengths & length_bit(t) != 0
                && let Some(listed) = table.get_mut(&Caseless(t))
            {
                *listed = true;
            }
        }
        if n == 0 {
            return o;
        }
        let named = |name: &[u8]| {
            !name.eq_ignore_ascii_case(b"host")
                && match &table {
                    Some(names) => names.get(&Caseless(name)).copied().unwrap_or(false),
                    None => few[..n].iter().any(|t| t.eq_ignore_ascii_case(name)),
                }
        };
        if head.headers().any(|(name, _)| named(name)) {
            o.named = head.headers().map(|(name, _)| named(name)).collect();
        }
        o
    }
}

impl Head {
    fn new(bytes: Bytes, headers: Vec<(Span, Span)>) -> Head {
        let mut head = Head { bytes, headers, connection: ConnectionOptions::default() };
        head.connection = ConnectionOptions::of(&head);
        head
    }

    /// (name, value) of every header that goes on to the next hop, in order: not the
    /// hop-by-hop ones (RFC 9110 7.6.1), by the fixed list or because a `Connection` token
    /// names them. Not Host, whatever `Connection` says: it is meant for every recipient, and
    /// the proxy routes by it, so the backend must get the one the proxy read.
    fn end_to_end(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let named = &self.connection.named;
        self.headers()
            .enumerate()
            .filter(move |&(i, (name, _))| {
                !fixed_hop(name) && !named.get(i).copied().unwrap_or(false)
            })
            .map(|(_, h)| h)
    }

    fn at(&self, s: Span) -> &[u8] {
        &self.bytes[s.start as usize..s.end as usize]
    }

    /// (name, value) of every header, in order.
    fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers.iter().map(|&(n, v)| (self.at(n), self.at(v)))
    }

    /// Positions of `headers` within `buf`.
    fn spans(buf: &[u8], headers: &[httparse::Header]) -> Vec<(Span, Span)> {
        headers.iter().map(|h| (Span::of(buf, h.name.as_bytes()), Span::of(buf, h.value))).collect()
    }
}

/// A parsed request head.
struct ReqHead {
    head: Head,
    method: Span,
    path: Span,
    http10: bool,
}

impl ReqHead {
    fn method(&self) -> &str {
        // httparse checked the method is a token (ASCII).
        std::str::from_utf8(self.head.at(self.method)).unwrap_or("")
    }

    fn path(&self) -> &str {
        // httparse hands the path out as a str, so this always succeeds.
        std::str::from_utf8(self.head.at(self.path)).unwrap_or("/")
    }
}

enum HeadError {
    Bad,
    TooLarge,
    /// A request line of another major version than HTTP/1 (505).
    Version,
}

/// Header slots parsed on the stack; configs allowing more use the heap.
const STACK_HEADERS: usize = 64;

/// How much of a head being received has been looked at. A head ends with a line feed, so
/// bytes received since the last parse without one cannot have completed it, and the head is not
/// parsed again for them. Without this, a peer sending its head a byte at a time (or in tiny
/// segments) made every read parse everything received so far again: quadratic in the head's
/// size, which `max_header_bytes` lets reach 1 MiB, for seconds of a core per connection.
/// The first bytes of a head are always parsed, so that garbage (a TLS hello on a plain port)
/// is refused at once.
#[derive(Debug, Default)]
struct HeadScan(usize);

impl HeadScan {
    /// Whether `buf` may hold a complete head (or a new error) since the last call.
    fn worth_parsing(&mut self, buf: &[u8]) -> bool {
        // A buffer shorter than last time had a head split off: what is left is new.
        let seen = if self.0 > buf.len() { 0 } else { self.0 };
        self.0 = buf.len();
        seen == 0 || buf[seen..].contains(&b'\n')
    }

    /// [`HeadScan::worth_parsing`] for a request head, after dropping the empty lines `buf`
    /// starts with ([`empty_lines`]). RFC 9112 2.2 lets a server ignore empty lines before the
    /// request line, and httparse skips them without limit: kept, they made every read holding
    /// a line feed parse them all again, so a client that filled a large `max_header_bytes`
    /// with CRLFs and then sent 2-byte segments held a core for seconds with a few KiB. Dropped
    /// as they arrive, they cost nothing to look at again and count towards no limit; a client
    /// sending only them is as good as idle, bounded by the header timeout (the idle timeout
    /// between keep-alive requests).
    fn request_ready(&mut self, buf: &mut BytesMut) -> bool {
        let blank = empty_lines(buf);
        if blank > 0 {
            buf.advance(blank);
            // Whatever is left came after the bytes this scan has seen: all new to it.
            *self = HeadScan::default();
        }
        self.worth_parsing(buf)
    }
}

/// How many bytes of empty lines (CRLF, or a bare LF, as httparse takes them) `buf` starts
/// with. A CR is left in place unless its LF is there too: the next bytes may bring it, and a
/// CR followed by anything else is refused by the parse (400), as before.
fn empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match buf[i..] {
            [b'\n', ..] => i += 1,
            [b'\r', b'\n', ..] => i += 2,
            _ => return i,
        }
    }
}

/// Parses a request head at the start of `buf`; when complete, splits it off `buf`.
fn parse_request(buf: &mut BytesMut, max_headers: usize) -> Result<Option<ReqHead>, HeadError> {
    // Uninitialised slots on the stack: no per-request allocation or 32-byte-per-slot
    // initialisation. A limit above them (the default, 100, is) is parsed into the heap only
    // when a head has more headers than the stack holds, which real requests rarely do.
    let mut stack = [const { MaybeUninit::<httparse::Header>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let mut req = httparse::Request::new(&mut []);
    let mut parsed =
        req.parse_with_uninit_headers(buf, &mut stack[..max_headers.min(STACK_HEADERS)]);
    if max_headers > STACK_HEADERS && matches!(parsed, Err(httparse::Error::TooManyHeaders)) {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        req = httparse::Request::new(&mut []);
        parsed = req.parse_with_uninit_headers(buf, &mut heap);
    }
    let len = match parsed {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => {
            // httparse knows HTTP/1.0 and 1.1 only. A later HTTP/1 minor version is handled as
            // 1.1 (RFC 9110 6.2: as the highest minor version the recipient implements), and
            // its request line is not forwarded (the backend gets the proxy's own), so the
            // digit is rewritten and the head parsed again.
            let Some(minor) = later_http1_minor(buf)? else { return Ok(None) };
            buf[minor] = b'1';
            return parse_request(buf, max_headers);
        }
        Err(_) => return Err(HeadError::Bad),
    };
    let (method, path) = (
        Span::of(buf, req.method.unwrap_or("").as_bytes()),
        Span::of(buf, req.path.unwrap_or("").as_bytes()),
    );
    let (http10, headers) = (req.version == Some(0), Head::spans(buf, req.headers));
    let head = Head::new(buf.split_to(len).freeze(), headers);
    Ok(Some(ReqHead { head, method, path, http10 }))
}

/// The proxy's own request-head parse (`parse_request`) for the criterion bench
/// (`benches/hotpaths.rs`), which must time what every request costs here (header slots on the
/// stack, headers kept as spans, the head split off `buf` and frozen) rather than httparse's
/// parse alone. Returns the parsed head's length; `None` for a partial or refused head. Not an
/// API: the head's types stay private to the proxy.
#[doc(hidden)]
pub fn parse_request_for_bench(buf: &mut BytesMut, max_headers: usize) -> Option<usize> {
    let before = buf.len();
    parse_request(buf, max_headers).ok().flatten().map(|_| before - buf.len())
}

/// Where the minor version digit of a request line ending in `HTTP/1.<2-9>` is in `buf`
/// (`None` while the line is incomplete); [`HeadError::Version`] for another major version
/// (`HTTP/<d>.<d>`, `d` not 1), else [`HeadError::Bad`]: a line ending in `HTTP/1.0` or
/// `HTTP/1.1` that httparse refused the version of is malformed before it (a space in the path
/// makes it read `b HTTP/1.1` in `GET /a b HTTP/1.1` as the version), not of another version.
fn later_http1_minor(buf: &[u8]) -> Result<Option<usize>, HeadError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else { return Ok(None) };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Method, target and version: a line with more words (a space in the target) is malformed
    // whatever its last word says.
    if line.iter().filter(|&&b| b == b' ').count() != 2 {
        return Err(HeadError::Bad);
    }
    let start = line.iter().rposition(|&b| b == b' ').ok_or(HeadError::Bad)? + 1;
    match &line[start..] {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9'] => Ok(Some(start + 7)),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && *major != b'1' && minor.is_ascii_digit() =>
        {
            Err(HeadError::Version)
        }
        _ => Err(HeadError::Bad),
    }
}

/// The values of every `name` header.
fn header<'a>(head: &'a Head, name: &str) -> impl Iterator<Item = &'a [u8]> {
    head.headers().filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
}

/// The comma-separated tokens of every `name` header, trimmed (empty ones skipped), without
/// allocating.
fn tokens<'a>(head: &'a Head, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    header(head, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Is `credentials` (an `Authorization` value, or one challenge of a `WWW-Authenticate`, trimmed)
/// of a scheme that authenticates the connection rather than the request: NTLM, or Negotiate
/// (SPNEGO: Kerberos or NTLM), the scheme name in any case (RFC 9110 11.1)?
fn connection_auth(credentials: &[u8]) -> bool {
    let scheme = credentials.split(|&b| b == b' ' || b == b'\t').next().unwrap_or_default();
    scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate")
}

/// Does this exchange bind its backend connection to its client ([`Private`])? When the
/// response challenges with NTLM or Negotiate (any challenge of any `WWW-Authenticate`, see
/// [`challenges_bind`]), or the request carried such credentials. A look at those headers
/// alone, in the heads already parsed, without allocating.
fn binds_connection(req: &Head, resp: &Head) -> bool {
    header(resp, "www-authenticate").any(challenges_bind)
        || header(req, "authorization").any(|v| connection_auth(v.trim_ascii()))
}

/// Does the `WWW-Authenticate` value `value` hold a challenge of NTLM or Negotiate? Its list
/// (RFC 9110 11.6.1) is split at the commas outside quoted strings (whose `\` escapes the next
/// byte), and each element is read by [`element_binds`]: a comma or a scheme name inside an
/// auth-param's quoted value (`Basic realm="Windows, NTLM or Kerberos"`) made a connection
/// private for nothing. A quoted string left open (a malformed header) is read as the plain
/// comma-separated tokens it was read as before, so that a challenge it may hide still binds:
/// private for nothing rather than shared when it should not be. One pass (a second for a
/// malformed value), no allocation.
fn challenges_bind(value: &[u8]) -> bool {
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in value.iter().enumerate() {
        if quoted {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else if b == b'"' {
            quoted = true;
        } else if b == b',' {
            if element_binds(&value[start..i]) {
                return true;
            }
            start = i + 1;
        }
    }
    if quoted {
        return value.split(|&b| b == b',').any(|t| connection_auth(t.trim_ascii()));
    }
    element_binds(&value[start..])
}

/// Does the element `element` of a `WWW-Authenticate` list begin a challenge of NTLM or
/// Negotiate, in any case? An element is a challenge (its first token the scheme, then token68
/// or auth-params) unless `=` follows that first token (whitespace allowed between): then it is
/// an auth-param of the challenge before (`realm=Negotiate`), whatever its name or value.
fn element_binds(element: &[u8]) -> bool {
    let element = element.trim_ascii_start();
    let end = element.iter().position(|&b| !is_tchar(b)).unwrap_or(element.len());
    let (scheme, after) = element.split_at(end);
    if after.trim_ascii_start().first() == Some(&b'=') {
        return false;
    }
    scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate")
}

/// Headers that describe one hop and are never forwarded (RFC 9110 7.6.1). Not `Trailer`: it
/// announces the fields of the trailer section, which goes on with a chunked body passed on as
/// it came, so it is end-to-end (RFC 9110 6.6.2; RFC 2616 13.5.1 listed "Trailers", a
/// misspelling RFC 7230 and its successors dropped). `HTTP2-Settings` belongs to an upgrade to
/// HTTP/2 (RFC 7540 3.2.1 makes it hop-by-hop), which is never relayed ([`upgrade_of`]). Those a
/// head's `Connection` names are hop-by-hop too: see [`Head::end_to_end`].
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "transfer-encoding",
    "http2-settings",
];

/// Is `name` hop-by-hop by the fixed list?
fn fixed_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Is `name` the header `dashed` (lower case, with `-`), read as backends that take `_` for `-`
/// read it (CGI-style environments: Puma, gunicorn, PHP; RFC 3875 4.1.18 maps both to `_`)?
/// True for the exact spelling too, in any case.
fn reads_as(name: &[u8], dashed: &str) -> bool {
    name.len() == dashed.len()
        && name
            .iter()
            .zip(dashed.bytes())
            .all(|(&a, b)| (if a == b'_' { b'-' } else { a.to_ascii_lowercase() }) == b)
}

/// Is `name` an underscore spelling of the header `dashed` (`Content_Length` for
/// `content-length`): one that the proxy does not take for it, but such backends do?
fn underscore_spelling(name: &[u8], dashed: &str) -> bool {
    // The length first: most names are over before the scan for `_` would be.
    reads_as(name, dashed) && name.contains(&b'_')
}

/// Headers the proxy reads or writes itself, whose underscore spellings (`Keep_Alive`,
/// `X_Forwarded_For`) are never forwarded: a backend that takes `_` for `-` would read them as
/// the header the proxy handled, and act on the client's value (as nginx, which drops every
/// name with `_` by default, never forwards them). The framing headers are not here: a request
/// with an underscore spelling of one is refused ([`body_framing`]). Names without `-` (Host,
/// Connection, Upgrade, TE, Trailer, Expect) have no such spelling.
const UNDERSCORE_DROPPED: [&str; 6] = [
    "keep-alive",
    "proxy-connection",
    "http2-settings",
    "x-forwarded-for",
    "x-forwarded-proto",
    "max-forwards",
];

/// What an OPTIONS request's Max-Forwards says (RFC 9110 7.6.2): how many more intermediaries
/// may forward it, `Ok(None)` without one, or for another method (Max-Forwards applies to
/// TRACE and OPTIONS only, and TRACE is refused: its header is left alone). A value of more
/// digits than a `u64` holds counts as `u64::MAX`. Err for anything but one value of 1*DIGIT
/// (two headers, a list, a sign, nothing): a count the proxy cannot decrement, which another
/// recipient may read otherwise; a 400, as Apache's mod_proxy answers.
fn max_forwards(req: &ReqHead) -> Result<Option<u64>, ()> {
    if req.method() != "OPTIONS" {
        return Ok(None);
    }
    let mut values = header(&req.head, "max-forwards");
    let Some(value) = values.next() else { return Ok(None) };
    let value = value.trim_ascii();
    if values.next().is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    Ok(Some(decimal(value).unwrap_or(u64::MAX)))
}

/// A Content-Length value: 1*DIGIT (RFC 9110 8.6). `str::parse` would also take a leading `+`,
/// which other parsers on the path may read differently (request smuggling).
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// Writes the one `Content-Length` a forwarded message carries: its framing's, or 0 when the
/// original declared an empty body (or, for `declared`, the length a HEAD or 304 response
/// describes). Original Content-Length headers are never copied: duplicates and odd spellings
/// that this proxy accepted could be read differently by the next parser.
fn content_length(out: &mut impl BufMut, framing: Framing, declared: Option<u64>) {
    let n = match framing {
        Framing::Length(n) => n,
        Framing::None => match declared {
            Some(n) => n,
            None => return,
        },
        Framing::Chunked | Framing::UntilClose => return,
    };
    out.put_slice(b"Content-Length: ");
    put_decimal(out, n);
    out.put_slice(b"\r\n");
}

/// Writes `n` in decimal, without `core::fmt` (heads are written per request).
fn put_decimal(out: &mut impl BufMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

/// Writes the Transfer-Encoding of a chunked message that is passed on without decoding: every
/// coding the sender listed, in order, in one header (empty list elements, which RFC 9110 5.6.1
/// lets a sender write, dropped so that no later parser has to cope with them), in lower case
/// (coding names are case-insensitive, RFC 9112 7: a `CHUNKED` goes on as `chunked`, so no
/// parser downstream has to know that).
fn transfer_encoding(out: &mut impl BufMut, head: &Head) {
    out.put_slice(b"Transfer-Encoding: ");
    for (i, coding) in tokens(head, "transfer-encoding").enumerate() {
        if i > 0 {
            out.put_slice(b", ");
        }
        coding.iter().for_each(|b| out.put_u8(b.to_ascii_lowercase()));
    }
    out.put_slice(b"\r\n");
}

/// Folds one element of a Content-Length list into the length found so far: Err once an
/// element is not 1*DIGIT or two disagree (RFC 9112 6.3).
fn fold_length(len: Result<Option<u64>, ()>, part: &[u8]) -> Result<Option<u64>, ()> {
    match (len, decimal(part.trim_ascii())) {
        (Ok(None), Some(n)) => Ok(Some(n)),
        (Ok(Some(l)), Some(n)) if l == n => Ok(Some(l)),
        _ => Err(()),
    }
}

/// The length a head's Content-Length declares, if it declares one validly (see
/// [`body_framing`]).
fn declared_length(head: &Head) -> Option<u64> {
    header(head, "content-length")
        .flat_map(|v| v.split(|&b| b == b','))
        .fold(Ok(None), fold_length)
        .ok()
        .flatten()
}

/// Body framing of a message with `head` (RFC 9112 6.3); Err for ambiguous or invalid framing.
/// One pass over the headers.
///
/// Requests may only be chunked with `chunked` as their one transfer coding (as nginx does):
/// stacked or repeated codings, and spellings other parsers may read otherwise, are how
/// requests get smuggled past a proxy. Responses may list other codings before `chunked`, which
/// the proxy passes on without decoding; any other Transfer-Encoding makes the response
/// delimited by the close (RFC 9112 6.3), a response the proxy refuses as broken
/// ([`RespHead::bad_coding`]). A response with both a chunked Transfer-Encoding and
/// a Content-Length is chunked: the coding overrides the length, which is not passed on (RFC
/// 9112 6.3); its connection is not re-used. An Err for a response (an invalid Content-Length
/// without Transfer-Encoding) makes it a broken response, answered with 502 (RFC 9112 6.3 item
/// 5: see [`response_head`]).
///
/// A request with a header that backends taking `_` for `-` read as Content-Length or
/// Transfer-Encoding (`Transfer_Encoding`, `content_length`) is an Err too: the proxy frames it
/// by the other headers, such a backend (Puma before 6.4.3, CVE-2024-45614; CGI and WSGI
/// stacks) by that one, and a request hidden in the body would be smuggled past the proxy onto
/// a pooled connection. Dropping the header would leave the request framed for those backends
/// as the proxy framed it; refusing says the message is ambiguous, which it is.
fn body_framing(head: &Head, request: bool) -> Result<Framing, ()> {
    // Transfer codings: how many, whether each is a token, whether `chunked` is among the
    // ones before the last, and the last.
    let (mut codings, mut valid, mut early_chunked, mut te_last) = (0, true, false, None);
    let mut has_cl = false;
    // A bad or conflicting Content-Length only matters without Transfer-Encoding.
    let mut len: Result<Option<u64>, ()> = Ok(None);
    for (name, value) in head.headers() {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                codings += 1;
                valid &= t.iter().all(|&b| is_tchar(b));
                early_chunked |= te_last.is_some_and(|l: &[u8]| l.eq_ignore_ascii_case(b"chunked"));
                te_last = Some(t);
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            has_cl = true;
            len = value.split(|&b| b == b',').fold(len, fold_length);
        } else if request
            && (underscore_spelling(name, "content-length")
                || underscore_spelling(name, "transfer-encoding"))
        {
            return Err(());
        }
    }
    if let Some(last) = te_last {
        let chunked = last.eq_ignore_ascii_case(b"chunked") && valid && !early_chunked;
        if !chunked || (request && (has_cl || codings != 1)) {
            // Both, or codings we will not frame: request smuggling territory.
            return if request { Err(()) } else { Ok(Framing::UntilClose) };
        }
        return Ok(Framing::Chunked);
    }
    Ok(match len? {
        Some(0) => Framing::None,
        Some(n) => Framing::Length(n),
        None if request => Framing::None,
        None => Framing::UntilClose,
    })
}

/// A token character (RFC 9110 5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The idle clock of one exchange: when its bytes last moved, and the idle timeout after which
/// a read waiting for more gives up. The request body and the response of one request share
/// it, so that while both stream at once (the rest of a body going on beside an early 2xx,
/// [`beside`]) the exchange is idle only once neither direction moved for the idle timeout, as
/// a TCP relay is (`tcp::relay`): an upload that flows while the backend holds its content
/// until the upload's end, or a response that ticks while the client pauses between pieces of
/// its body, is not idle. One direction streaming alone moves the clock alone, so its reads
/// wait the idle timeout each, as they always did.
struct IdleClock {
    /// When the last read of either direction started: right after the bytes before it went
    /// on (no clock read of its own: the read's timer needs the time anyway).
    moved: Cell<tokio::time::Instant>,
    idle: Duration,
}

impl IdleClock {
    /// A clock for an exchange with the idle timeout `idle`, moved last at `at`.
    fn new(idle: Duration, at: tokio::time::Instant) -> IdleClock {
        IdleClock { moved: Cell::new(at), idle }
    }

    /// Reads more of `src` into `pending` (as [`read_more`]), moving the clock now, for as long
    /// as the exchange is not idle and at most until `deadline`; `None` once either passed. A
    /// timer that runs out while the other direction moved the clock meanwhile is set again
    /// from there, on the same read: a receive dropped to issue a new one would take the next
    /// bytes with it.
    async fn read(
        &self,
        src: &Socket,
        pending: &mut BytesMut,
        deadline: tokio::time::Instant,
    ) -> Option<io::Result<usize>> {
        let now = tokio::time::Instant::now();
        self.moved.set(now);
        let mut until = (now + self.idle).min(deadline);
        let mut read = std::pin::pin!(read_more(src, pending));
        loop {
            match timeout_at(until, &mut read).await {
                Ok(r) => return Some(r),
                Err(_) => {
                    let later = (self.moved.get() + self.idle).min(deadline);
                    if later <= until {
                        return None;
                    }
                    until = later;
                }
            }
        }
    }
}

/// Streams a body framed by `framing` from `src` (with `pending` bytes already read) to `dst`;
/// with `decode`, a chunked body goes on decoded (for an HTTP/1.0 client, which the response
/// then reaches delimited by the connection's close). Bytes after the body stay in `pending`.
/// Each read waits for the exchange's idle timeout (`clock`) and never past `deadline`.
/// Errors say which side failed ([`Side::Bad`]: `src` sent a chunked body that breaks the
/// coding; what came before the bad bytes may have been passed on), and, for `src`, whether it
/// closed cleanly before the body's end ([`Side::Closed`]) or reset ([`Side::Src`]).
async fn stream_body(
    src: &Socket,
    pending: &mut BytesMut,
    dst: &Socket,
    framing: Framing,
    decode: bool,
    deadline: tokio::time::Instant,
    clock: &IdleClock,
) -> Result<(), Side> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(mut left) => loop {
            let take = (pending.len() as u64).min(left) as usize;
            if take > 0 {
                write(dst, pending.split_to(take).freeze()).await.map_err(|_| Side::Dst)?;
                left -= take as u64;
            }
            if left == 0 {
                return Ok(());
            }
            match clock.read(src, pending, deadline).await {
                Some(Ok(0)) => return Err(Side::Closed),
                Some(Err(_)) => return Err(Side::Src),
                Some(Ok(_)) => {}
                None => return Err(Side::Timeout),
            }
        },
        Framing::Chunked => {
            let mut c = Chunked::default();
            loop {
                if decode {
                    // The data runs copied out: a rare path (HTTP/1.0 clients), kept simple.
                    let mut data = Vec::new();
                    let take = c
                        .feed_with(pending, |r| data.extend_from_slice(&pending[r]))
                        .map_err(|_| Side::Bad)?;
                    pending.advance(take);
                    if !data.is_empty() {
                        write(dst, data).await.map_err(|_| Side::Dst)?;
                    }
                } else {
                    let take = c.feed(pending).map_err(|_| Side::Bad)?;
                    if take > 0 {
                        write(dst, pending.split_to(take).freeze()).await.map_err(|_| Side::Dst)?;
                    }
                }
                if c.done() {
                    return Ok(());
                }
                match clock.read(src, pending, deadline).await {
                    Some(Ok(0)) => return Err(Side::Closed),
                    Some(Err(_)) => return Err(Side::Src),
                    Some(Ok(_)) => {}
                    None => return Err(Side::Timeout),
                }
            }
        }
        Framing::UntilClose => loop {
            if !pending.is_empty() {
                write(dst, pending.split().freeze()).await.map_err(|_| Side::Dst)?;
            }
            match clock.read(src, pending, deadline).await {
                Some(Ok(0)) => return Ok(()),
                Some(Err(_)) => return Err(Side::Src),
                Some(Ok(_)) => {}
                None => return Err(Side::Timeout),
            }
        },
    }
}

/// Which side of a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The source reset its connection, or reading from it failed otherwise.
    Src,
    /// The source closed its connection cleanly (end of stream) before the body's end: it cut
    /// the body short itself. Told apart from [`Side::Src`] for the charging rule after an
    /// early 2xx (in `serve_conn`); everywhere else the two are the same.
    Closed,
    Dst,
    Timeout,
    /// The source's body is malformed (chunked coding): the source is at fault, and can be
    /// told so (400 to a client).
    Bad,
}

/// Who ended a response whose body was cut short after its head went to the client: logged
/// (`cut=` in the access log) and counted (`edgelb_l7_responses_cut_total{side}`, indexed by
/// this in [`VipRuntime::responses_cut`]). Also who ended the rest of a request body going
/// beside an early 2xx that did not go through ([`body_cut`]; `cut_body=` in the access log,
/// `edgelb_l7_request_bodies_cut_total{side}`, [`VipRuntime::request_bodies_cut`]), which a
/// response already whole would not show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// The backend: it closed or reset its connection, or broke the chunked coding. A
    /// passive-health failure, unless it refused the request body with an early answer (a
    /// backend that then closes with the rest unread resets the connection, which is how such
    /// an answer ends, not a fault). After an early 2xx, which took the body: a broken chunked
    /// coding always, a close or reset only once the body was through (before, its close with
    /// the body unread resets the connection, dropping what of the response it had not sent).
    /// Of a request body: the backend took no more of it.
    Backend = 0,
    /// The client: the write to it failed (it left, or took nothing for the idle timeout), or
    /// the rest of its request body, going to the backend beside a 2xx answered early, did not
    /// come (it left or broke the chunked coding; a pause of it, the backend waiting, is
    /// [`Cut::Idle`]).
    Client = 1,
    /// The whole-request deadline (`request_timeout_ms`) passed while the body streamed.
    Deadline = 2,
    /// The backend sent nothing for the idle timeout (`idle_timeout_ms`; with a request body
    /// going beside the response, nothing moved either way, [`IdleClock`], as when the client
    /// paused its body while the backend waited for it): the proxy's limit on a pause, which a
    /// healthy backend's stream of events or long poll can outlast, so no passive-health
    /// failure. Of a request body: nothing moved either way, the client paused.
    Idle = 3,
    /// The proxy stopped, and its drain deadline (`node.l7_drain_timeout_ms`) passed while the
    /// body streamed (or a second stop signal cut the drain short).
    Drain = 4,
}

impl Cut {
    /// Every side, in the order of their index.
    pub(super) const ALL: [Cut; 5] =
        [Cut::Backend, Cut::Client, Cut::Deadline, Cut::Idle, Cut::Drain];

    /// Its name in the log and as the metric's `side` label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Cut::Backend => "backend",
            Cut::Client => "client",
            Cut::Deadline => "deadline",
            Cut::Idle => "idle",
            Cut::Drain => "drain",
        }
    }
}

/// Logs a response head over the limits ([`Attempt::TooLarge`]), at most once every 10 s for
/// the whole process ([`super::Throttle`]): an endpoint that always answers so would log a line
/// per request. Every one is counted among the 5xx answers, and by backend in
/// `edgelb_l7_response_heads_too_large_total` (which tells it from other 502s), and, with
/// `access_log`, logged as its 502.
fn say_head_too_large(vip: &str, backend: SocketAddr) {
    static SAID: super::Throttle = super::Throttle::new();
    if SAID.ready() {
        tracing::warn!(
            vip,
            %backend,
            max_headers = MAX_RESPONSE_HEADERS,
            max_bytes = MAX_RESPONSE_HEAD_BYTES,
            "a backend's response head is too large (more headers or bytes than the proxy \
             takes): the client gets 502, and the backend is not blamed (no passive-health \
             failure); said at most every 10 s; edgelb_l7_response_heads_too_large_total \
             counts every one"
        );
    }
}

/// The PROXY protocol header for a connection the proxy opens on its own account, such as a
/// health check's: the LOCAL command (haproxy's proxy-protocol.txt, 2.1 and 2.2), which says no
/// client is behind it, so the backend takes the connection's own addresses and logs no
/// made-up client. v1: `PROXY UNKNOWN\r\n`; v2: the signature, version 2 with command LOCAL
/// (0x20), family and transport unspecified (0x00), no address block.
pub fn proxy_header_local(version: u8) -> Vec<u8> {
    if version == 1 {
        return b"PROXY UNKNOWN\r\n".to_vec();
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x20, 0x00, 0, 0]);
    h
}

/// The PROXY protocol header for a connection from `peer` to `local`.
pub fn proxy_header(version: u8, peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (peer, local) = (
        SocketAddr::new(client_ip(peer), peer.port()),
        SocketAddr::new(client_ip(local), local.port()),
    );
    if version == 1 {
        let fam = if peer.is_ipv4() && local.is_ipv4() { "TCP4" } else { "TCP6" };
        let ip = |a: SocketAddr| match (fam, a.ip()) {
            ("TCP6", IpAddr::V4(v4)) => v4.to_ipv6_mapped().to_string(),
            (_, ip) => ip.to_string(),
        };
        return format!(
            "PROXY {fam} {} {} {} {}\r\n",
            ip(peer),
            ip(local),
            peer.port(),
            local.port()
        )
        .into_bytes();
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY command
    match (peer.ip(), local.ip()) {
        (IpAddr::V4(p), IpAddr::V4(l)) => {
            h.push(0x11);
            h.extend(12u16.to_be_bytes());
            h.extend(p.octets());
            h.extend(l.octets());
        }
        (p, l) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend(36u16.to_be_bytes());
            h.extend(v6(p).octets());
            h.extend(v6(l).octets());
        }
    }
    h.extend(peer.port().to_be_bytes());
    h.extend(local.port().to_be_bytes());
    h
}

fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// Does the client wait for `100 Continue` before sending its body (RFC 9110 10.1.1)? The proxy
/// answers that itself, before it picks a backend, as nginx does: a backend that ignores the
/// expectation, or a retry on another one, then never leaves the client waiting for a `100`
/// (curl waits a second before sending anyway). RFC 9110 10.1.1 would rather have a proxy pass
/// the expectation on (answering itself only for HTTP/1.0 next hops): what that costs is that a
/// backend refusing the upload (401, 413) does so once the body has begun, which the early
/// answer's cut of the body ([`Answer::cut`]) then ends.
fn expects_continue(req: &ReqHead, framing: Framing) -> bool {
    !req.http10
        && framing != Framing::None
        && header(&req.head, "expect").any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade`, named by `Connection`, as
/// WebSocket handshakes do), if it asks and has no body, and none of the protocols it lists is
/// HTTP/2 ([`http2`]). A request asking for HTTP/2 (`Upgrade: h2c`) goes on as a plain request,
/// without `Upgrade` (and `HTTP2-Settings`, hop-by-hop anyway): after a 101 the connection
/// would carry HTTP/2 to the backend, whose requests the proxy never sees, so they would be
/// neither routed nor normalized, and carry no X-Forwarded-For (h2c smuggling).
fn upgrade_of(req: &ReqHead, framing: Framing) -> Option<&[u8]> {
    if req.http10 || framing != Framing::None || !req.head.connection.upgrade {
        return None;
    }
    if tokens(&req.head, "upgrade").any(http2) {
        return None;
    }
    header(&req.head, "upgrade").next().filter(|v| !v.trim_ascii().is_empty())
}

/// Does the `Upgrade` protocol `p` (`name[/version]`, RFC 9110 7.8) name HTTP/2: `h2c` (RFC
/// 7540 3.2), `h2` (TLS only, but some servers take it), or `HTTP/2` in any version?
fn http2(p: &[u8]) -> bool {
    let (name, version) = match p.iter().position(|&b| b == b'/') {
        Some(at) => (&p[..at], &p[at + 1..]),
        None => (p, &[][..]),
    };
    name.eq_ignore_ascii_case(b"h2c")
        || name.eq_ignore_ascii_case(b"h2")
        || (name.eq_ignore_ascii_case(b"http") && version.first() == Some(&b'2'))
}

/// Where a request is going: the host it names and the target sent on to the backend.
struct Target<'a> {
    /// The host (and port) the request names, for routing: from an absolute-form target, else
    /// from the Host header; `None` for an HTTP/1.0 request without one.
    host: Option<&'a [u8]>,
    /// The request target in origin form (or `*`), as the backend gets it: its path normalized
    /// ([`super::path::normalize`]) unless the VIP says not to.
    path: Cow<'a, str>,
    /// The Host header the backend gets instead of the client's, if any: the authority of an
    /// absolute-form target, or for an HTTP/1.0 request without Host the address the client
    /// connected to (HTTP/1.1 backends require one).
    host_out: Option<HostOut<'a>>,
}

/// A Host header written by the proxy.
enum HostOut<'a> {
    /// The authority of an absolute-form target.
    Authority(&'a [u8]),
    /// The listening address the client connected to.
    Listen,
}

/// The request's [`Target`], or `None` when it must be refused with 400: a target in neither
/// origin, absolute nor asterisk form, an absolute-form target with user information or an
/// invalid host, more than one Host header, none in an HTTP/1.1 request (whatever the form of
/// its target), or an invalid one (RFC 9112 3.2); with `normalize`, a path with a malformed escape. Routing and the backend
/// then see one and the same host and path: a request cannot be routed by one and served by
/// another.
fn target(req: &ReqHead, normalize: bool) -> Option<Target<'_>> {
    let mut t = target_as_sent(req)?;
    if normalize
        && let Cow::Borrowed(p) = t.path
        && p.starts_with('/')
    {
        t.path = super::path::normalize(p)?;
    }
    Some(t)
}

/// [`target`] with the path as the client sent it.
fn target_as_sent(req: &ReqHead) -> Option<Target<'_>> {
    let mut hosts = header(&req.head, "host");
    let host = hosts.next().map(|h| h.trim_ascii());
    if hosts.next().is_some() || host.is_some_and(|h| !valid_host(h)) {
        return None;
    }
    let path = req.path();
    if path.starts_with('/') || (path == "*" && req.method() == "OPTIONS") {
        return match host {
            Some(h) => Some(Target { host: Some(h), path: path.into(), host_out: None }),
            None if req.http10 => {
                Some(Target { host: None, path: path.into(), host_out: Some(HostOut::Listen) })
            }
            None => None,
        };
    }
    // Absolute form (a client talking to the proxy as a forward proxy): its authority is the
    // host (RFC 9112 3.2.2: the Host header is ignored), and the backend gets the origin form.
    // An HTTP/1.1 request needs a Host header all the same (RFC 9112 3.2: 400 without one).
    if host.is_none() && !req.http10 {
        return None;
    }
    let scheme_len = ["http://", "https://"]
        .iter()
        .find(|s| path.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)))?
        .len();
    let rest = &path[scheme_len..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, origin) = rest.split_at(end);
    if !valid_host(authority.as_bytes()) || origin.starts_with('#') {
        return None;
    }
    // "http://h?q" has an empty path: its origin form is "/?q", which would need a copy; such
    // targets are rare enough to refuse as a bare authority with a query. An OPTIONS request
    // for a bare authority asks about the server, not a resource: the last proxy sends it on
    // as `*` (RFC 9112 3.2.4), not as `/`.
    let path = match origin {
        "" if req.method() == "OPTIONS" => "*",
        "" => "/",
        o if o.starts_with('/') => o,
        _ => return None,
    };
    let a = authority.as_bytes();
    Some(Target { host: Some(a), path: path.into(), host_out: Some(HostOut::Authority(a)) })
}

/// Is `h` a valid Host value: `uri-host [":" port]` (RFC 3986: a reg-name or IPv4 address, or
/// an IPv6 literal in brackets; the port digits only), not empty, without user information?
/// Nothing looser: the router takes the host without a port of digits, and backends cut at the
/// first `:` (nginx) or ignore a bad port (Go), so `admin.example:x` would reach a backend as
/// `admin.example` while missing that host's route.
fn valid_host(h: &[u8]) -> bool {
    let (host, port) = match h.first() {
        Some(b'[') => match h.iter().position(|&b| b == b']') {
            Some(end) => h.split_at(end + 1),
            None => return false,
        },
        _ => h.split_at(h.iter().position(|&b| b == b':').unwrap_or(h.len())),
    };
    let port_ok = port
        .split_first()
        .is_none_or(|(&colon, digits)| colon == b':' && digits.iter().all(u8::is_ascii_digit));
    let host_ok = match host.strip_prefix(b"[").and_then(|l| l.strip_suffix(b"]")) {
        Some(literal) => {
            std::str::from_utf8(literal).is_ok_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => {
            !host.is_empty()
                && host
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
        }
    };
    host_ok && port_ok
}

/// The client as the forwarding headers name it, written at most once per connection (at the
/// first request of a VIP that adds those headers) rather than formatted for every request.
struct ForwardedClient {
    /// The address, for X-Forwarded-For.
    xff: String,
    /// The `for=` parameter of Forwarded (an IPv6 address quoted and bracketed, RFC 7239).
    forwarded: String,
}

impl ForwardedClient {
    fn new(peer: SocketAddr) -> Self {
        let ip = client_ip(peer);
        let forwarded = match ip {
            IpAddr::V4(a) => format!("for={a}"),
            IpAddr::V6(a) => format!("for=\"[{a}]\""),
        };
        ForwardedClient { xff: ip.to_string(), forwarded }
    }
}

/// Does `v` parse as a Forwarded value (RFC 7239 4) with at least one parameter: elements
/// separated by commas (with optional whitespace around them, and empty ones allowed, as in
/// every list, RFC 9110 5.6.1), each of parameters separated by `;` (empty ones allowed), each
/// `token=token` or `token=quoted-string`. Nothing else (no whitespace around `;` or `=`): then
/// a parser that reads the value strictly reads the element the proxy appends behind it as the
/// last one, whatever the client sent. One pass, no allocation.
fn valid_forwarded(v: &[u8]) -> bool {
    let (mut at, mut params) = (0, 0);
    let tokens = |at: &mut usize| {
        let start = *at;
        while v.get(*at).is_some_and(|&b| is_tchar(b)) {
            *at += 1;
        }
        *at > start
    };
    let spaces = |at: &mut usize| {
        while matches!(v.get(*at), Some(b' ' | b'\t')) {
            *at += 1;
        }
    };
    // qdtext and the character after a backslash (RFC 9110 5.6.4): HTAB, SP, VCHAR, obs-text.
    let text = |b: u8| b == b'\t' || (b >= b' ' && b != 0x7f);
    loop {
        spaces(&mut at);
        // One element: parameters separated by `;`.
        loop {
            if tokens(&mut at) {
                if v.get(at) != Some(&b'=') {
                    return false;
                }
                at += 1;
                if v.get(at) == Some(&b'"') {
                    at += 1;
                    loop {
                        match v.get(at) {
                            Some(b'"') => break,
                            Some(b'\\') if v.get(at + 1).is_some_and(|&b| text(b)) => at += 2,
                            Some(&b) if b != b'\\' && text(b) => at += 1,
                            _ => return false,
                        }
                    }
                    at += 1;
                } else if !tokens(&mut at) {
                    return false;
                }
                params += 1;
            }
            if v.get(at) != Some(&b';') {
                break;
            }
            at += 1;
        }
        spaces(&mut at);
        match v.get(at) {
            None => return params > 0,
            Some(b',') => at += 1,
            Some(_) => return false,
        }
    }
}

/// The request head as sent to the backend (shared by every attempt without copying). An
/// upgrade request (`upgrade`, from [`upgrade_of`]) keeps its `Upgrade` header and says
/// `Connection: upgrade`. The request line and Host come from `target` (`listen` names the
/// address the client connected to, for a Host the proxy adds). With `forwarded_for`, the
/// client's forwarding headers are replaced by ones that append that client (Forwarded values
/// that are not RFC 7239 left out: see [`valid_forwarded`]). Without `reuse` (the connection
/// will not be pooled) the request says `Connection: close`: the backend then closes first, and
/// the TIME_WAIT of each connection stays on its side (see [`close_after_backend`]).
fn upstream_head(
    req: &ReqHead,
    target: &Target,
    listen: SocketAddr,
    framing: Framing,
    upgrade: Option<&[u8]>,
    forwarded_for: Option<&ForwardedClient>,
    reuse: bool,
) -> Bytes {
    let head = &req.head;
    let mut out = Vec::with_capacity(256 + head.bytes.len());
    out.extend(req.method().as_bytes());
    out.push(b' ');
    out.extend(target.path.as_bytes());
    out.extend(b" HTTP/1.1\r\n");
    match target.host_out {
        Some(HostOut::Authority(a)) => {
            out.extend(b"Host: ");
            out.extend(a);
            out.extend(b"\r\n");
        }
        // Writes into a Vec cannot fail.
        Some(HostOut::Listen) => drop(write!(out, "Host: {listen}\r\n")),
        None => {}
    }
    let mut had_length = false;
    // An OPTIONS request's Max-Forwards goes on one lower (RFC 9110 7.6.2; `serve_conn` answers
    // one at 0 itself, and refuses one that is not a number).
    let hops = max_forwards(req).ok().flatten().filter(|&n| n > 0);
    for (name, value) in head.end_to_end() {
        // The client's Host is replaced by an absolute-form target's authority.
        if target.host_out.is_some() && name.eq_ignore_ascii_case(b"host") {
            continue;
        }
        // Content-Length is written once, below.
        if name.eq_ignore_ascii_case(b"content-length") {
            had_length = true;
            continue;
        }
        // A 100-continue expectation is answered by the proxy itself (see `expects_continue`).
        if name.eq_ignore_ascii_case(b"expect")
            && value.trim_ascii().eq_ignore_ascii_case(b"100-continue")
        {
            continue;
        }
        // Underscore spellings of headers the proxy handles itself: never forwarded.
        if UNDERSCORE_DROPPED.iter().any(|h| underscore_spelling(name, h)) {
            continue;
        }
        // Written below, decremented.
        if hops.is_some() && name.eq_ignore_ascii_case(b"max-forwards") {
            continue;
        }
        // Rewritten below, with the client appended.
        if forwarded_for.is_some()
            && ["x-forwarded-for", "forwarded", "x-forwarded-proto"]
                .into_iter()
                .any(|h| reads_as(name, h))
        {
            continue;
        }
        out.extend(name);
        out.extend(b": ");
        out.extend(value);
        out.extend(b"\r\n");
    }
    if let Some(client) = forwarded_for {
        // Every earlier hop the client's headers list, in order, then this one (backends take
        // the rightmost element they trust, as with nginx and HAProxy). A Forwarded value that
        // is not RFC 7239 is dropped: an unterminated quoted string in it would swallow this
        // hop's element for the backend's parser.
        let append = |out: &mut Vec<u8>, name: &str, keep: fn(&[u8]) -> bool| {
            out.extend(name.as_bytes());
            out.extend(b": ");
            for v in header(head, name).filter(|v| keep(v)) {
                out.extend(v);
                out.extend(b", ");
            }
        };
        append(&mut out, "X-Forwarded-For", |_| true);
        out.extend(client.xff.as_bytes());
        out.extend(b"\r\nX-Forwarded-Proto: http\r\n");
        append(&mut out, "Forwarded", valid_forwarded);
        out.extend(client.forwarded.as_bytes());
        out.extend(b";proto=http\r\n");
    }
    if let Some(n) = hops {
        out.extend(b"Max-Forwards: ");
        put_decimal(&mut out, n - 1);
        out.extend(b"\r\n");
    }
    if framing == Framing::Chunked {
        transfer_encoding(&mut out, head);
    }
    // A request framed without a body that had a Content-Length had one of 0: body_framing
    // refuses any other value that does not frame a body.
    content_length(&mut out, framing, had_length.then_some(0));
    match upgrade {
        Some(protocol) => {
            out.extend(b"Upgrade: ");
            out.extend(protocol);
            out.extend(b"\r\nConnection: upgrade\r\n\r\n");
        }
        None if reuse => out.extend(b"Connection: keep-alive\r\n\r\n"),
        None => out.extend(b"Connection: close\r\n\r\n"),
    }
    Bytes::from(out)
}

/// A parsed response head.
struct RespHead {
    head: Head,
    status: u16,
    reason: Span,
    /// An HTTP/1.0 response: its connection persists only if it says `keep-alive`.
    http10: bool,
    /// How its headers delimit its body ([`body_framing`]), found once, as the head is parsed:
    /// [`response_head`] refuses a final response whose framing is invalid, and the caller
    /// streams the body by it. Whether there is a body at all (not for a HEAD request, 1xx,
    /// 204 or 304) is the caller's to say.
    framing: Result<Framing, ()>,
}

impl RespHead {
    /// Has it a body whose end cannot be known: is it a final response other than 204 or 304,
    /// to a request other than HEAD (`head_request`; RFC 9112 6.3 items 1 and 2: such a
    /// response has no body whatever its head says, and its framing does not matter), with an
    /// invalid Content-Length and no Transfer-Encoding (item 5)?
    fn unframable(&self, head_request: bool) -> bool {
        self.framing.is_err()
            && !head_request
            && self.status >= 200
            && !matches!(self.status, 204 | 304)
    }

    /// Is its Transfer-Encoding one the proxy cannot pass on? Any Transfer-Encoding that does
    /// not frame the body chunked ([`body_framing`]: codings not ending in `chunked`, `chunked`
    /// twice, a coding that is not a token) would leave a body delimited by the close, which
    /// goes on without its header (hop-by-hop): the client would take what may still be
    /// chunk framing (`chunked, chunked`) or another coding for the content, and wait for a
    /// close a keep-alive backend never makes. And an HTTP/1.0 client (`http10_client`)
    /// cannot be sent Transfer-Encoding, and gets a chunked body decoded, so any other coding
    /// would come as if it were the content. The proxy sends backends no `TE`, so a backend
    /// may apply no coding but `chunked`, and that once (RFC 9112 7, 7.4): such a response is
    /// broken (nginx answers 502 too). Only for final responses with a body (not to HEAD, nor
    /// 204 or 304).
    fn bad_coding(&self, http10_client: bool, head_request: bool) -> bool {
        if head_request || self.status < 200 || matches!(self.status, 204 | 304) {
            return false;
        }
        let mut codings = tokens(&self.head, "transfer-encoding").peekable();
        if codings.peek().is_none() {
            return false;
        }
        self.framing != Ok(Framing::Chunked)
            || (http10_client && codings.any(|t| !t.eq_ignore_ascii_case(b"chunked")))
    }
}

/// Writes `resp`'s status line and its end-to-end headers: not the hop-by-hop ones, nor
/// Content-Length, which a caller writes from the framing it uses (see [`content_length`]),
/// nor underscore spellings of the framing headers (`Transfer_Encoding`, `Content_Length`):
/// the proxy frames the response by the real ones, and a client or cache in front that took
/// `_` for `-` would frame it by the other, and read the rest of the body as the next response.
fn status_and_headers(out: &mut impl BufMut, resp: &RespHead) {
    // parse_response admits 100..=599 only: three digits.
    out.put_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(resp.status));
    out.put_slice(b" ");
    out.put_slice(resp.head.at(resp.reason));
    out.put_slice(b"\r\n");
    for (name, value) in resp.head.end_to_end() {
        if name.eq_ignore_ascii_case(b"content-length")
            || underscore_spelling(name, "content-length")
            || underscore_spelling(name, "transfer-encoding")
        {
            continue;
        }
        out.put_slice(name);
        out.put_slice(b": ");
        out.put_slice(value);
        out.put_slice(b"\r\n");
    }
}

/// Parses a response head at the start of `buf`; when complete, splits it off `buf`. A head
/// over [`MAX_RESPONSE_HEADERS`] or [`MAX_RESPONSE_HEAD_BYTES`] is [`HeadError::TooLarge`]
/// (one still incomplete is the caller's to measure), any other fault [`HeadError::Bad`].
fn parse_response(buf: &mut BytesMut) -> Result<Option<RespHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) if len > MAX_RESPONSE_HEAD_BYTES => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad),
    };
    let (status, reason) =
        (resp.code.unwrap_or(0), Span::of(buf, resp.reason.unwrap_or("").as_bytes()));
    // httparse takes any three digits; RFC 9110 15 defines 100..=599, and a client may take
    // anything else as the start of another message.
    if !(100..=599).contains(&status) {
        return Err(HeadError::Bad);
    }
    let http10 = resp.version == Some(0);
    let headers = Head::spans(buf, resp.headers);
    let head = Head::new(buf.split_to(len).freeze(), headers);
    let framing = body_framing(&head, false);
    Ok(Some(RespHead { head, status, reason, http10, framing }))
}

/// Why an attempt on one backend failed.
enum Attempt {
    /// Could not connect (or the connection broke before the request was sent).
    Connect,
    /// This node could not open a connection: out of descriptors, memory or buffers, or of
    /// local ports towards that backend. It says nothing of the backend, which is not charged
    /// a failure (charging it ejected healthy backends during a descriptor spike).
    Local,
    /// No response head in time.
    Timeout,
    /// The whole request's deadline passed while waiting for this backend (504). Nothing is
    /// tried after it: another backend would do the work for a client already answered.
    Deadline,
    /// As [`Attempt::Deadline`], but the client's request body came through so late that
    /// the deadline left the backend less than its response timeout to answer: the slow
    /// upload's doing, not the backend's, which is not charged a passive-health failure
    /// (charged, a slow upload, or a deliberate trickle, took healthy backends out).
    Squeezed,
    /// Connection broke or garbage before a response head.
    Broken,
    /// The response head is over [`MAX_RESPONSE_HEADERS`] or [`MAX_RESPONSE_HEAD_BYTES`]: the
    /// application's answer, too large for the proxy, not a sign of the backend's health. A
    /// 502, not retried (another backend of the same application would answer alike, and do
    /// the work again), and no passive-health failure (an endpoint that sets many cookies
    /// would otherwise take every backend out in turn).
    TooLarge,
    /// The client broke off while sending its body (or could not take an interim response).
    ClientGone,
    /// The client's chunked body broke the coding (400).
    ClientBad,
    /// The client stalled while sending its body: nothing for the idle timeout, or the
    /// whole-request deadline passed (408).
    ClientTimeout,
}

/// A backend's retryable answer (502, 503, 504) to a request that was tried again elsewhere,
/// kept with its connection: when no other backend answers better (none is left to try, or the
/// others fail too), the client gets this answer, as it would have without retries (as nginx's
/// `proxy_next_upstream` does), rather than a 502 of the proxy's own that loses the backend's
/// status, headers (Retry-After) and body.
struct Kept<'a> {
    /// The member that answered.
    i: usize,
    up: Socket,
    resp: RespHead,
    /// What was read past the head (the start of the body).
    rest: BytesMut,
    /// The request still counts in flight on that backend: its connection is held.
    counted: InFlight<'a>,
}

/// Serves one client connection until it closes, errs, or the proxy stops.
pub async fn serve(
    client: Socket,
    peer: SocketAddr,
    listen: SocketAddr,
    vip: Arc<VipRuntime>,
    shared: Arc<Shared>,
    upstream: UpstreamPool,
    idle: IdleClients,
) {
    serve_conn(&client, peer, listen, vip, shared, upstream, &idle).await;
    // A read abandoned on a timeout stays pending in the kernel and keeps the fd open; shutting
    // the socket down completes it, so the connection really closes.
    let _ = client.shutdown(std::net::Shutdown::Both);
}

async fn serve_conn(
    client: &Socket,
    peer: SocketAddr,
    listen: SocketAddr,
    vip: Arc<VipRuntime>,
    shared: Arc<Shared>,
    upstream: UpstreamPool,
    idle: &IdleClients,
) {
    let mut vip = vip;
    // Read buffers for the client and the backend side, and the buffer response heads are
    // built in: each keeps one allocation for the whole connection (heads and body chunks are
    // split off and sent without copies, and their room is taken back once they are dropped).
    // The backend buffer goes into the pool with a backend connection put back there, and one
    // comes back with a pooled connection taken.
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut ubuf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(512);
    let mut tried: Vec<usize> = Vec::new();
    let mut forwarded: Option<ForwardedClient> = None;
    // This client connection's private backend connection, between its requests (closed when
    // it is dropped, with the client connection's end).
    let mut private = Private::default();
    let mut first = true;
    loop {
        let cfg = &vip.cfg;
        // 1. Request head, within the header timeout (idle timeout while waiting for a
        // keep-alive request to start; the header timeout then runs from its first bytes).
        // One clock read for both deadlines of the wait (clock reads showed up in profiles).
        let waiting = tokio::time::Instant::now();
        let (mut head_deadline, idle_deadline) =
            (waiting + cfg.header_timeout, waiting + cfg.idle_timeout);
        // A keep-alive request started arriving after the wait: its head has the whole header
        // timeout from now (read only if the head is not complete yet).
        let mut started_late = false;
        let mut scan = HeadScan::default();
        let req = loop {
            let parsed = if scan.request_ready(&mut buf) {
                parse_request(&mut buf, cfg.max_headers)
            } else {
                Ok(None)
            };
            match parsed {
                Ok(Some(r)) => break r,
                Ok(None) if buf.len() > cfg.max_header_bytes => {
                    return reject(client, &vip, peer, 431, None).await;
                }
                Ok(None) if started_late => {
                    head_deadline = tokio::time::Instant::now() + cfg.header_timeout;
                }
                Ok(None) => {}
                Err(HeadError::TooLarge) => return reject(client, &vip, peer, 431, None).await,
                Err(HeadError::Bad) => return reject(client, &vip, peer, 400, None).await,
                Err(HeadError::Version) => return reject(client, &vip, peer, 505, None).await,
            }
            let waiting_for_start = buf.is_empty() && !first;
            let deadline = if waiting_for_start { idle_deadline } else { head_deadline };
            // A cancelled read loses its buffer (tokio-uring owns it until the kernel is done),
            // so decide now what a timeout means.
            let partial = !buf.is_empty();
            // Stopping closes a keep-alive connection idle between requests (as nginx and
            // HAProxy do), but not one just accepted: its client has sent, or is sending, a
            // request that nobody else will answer, so it is read and served (with `close`).
            // So does a new connection over `max_connections` (`super::reuse`): it shuts the
            // socket down, and the read ends with the end of the stream (or, had it completed
            // with a request before, the request is not served: `Waiting::finish`).
            let closable = waiting_for_start.then(|| idle.waiting(client));
            let read = tokio::select! {
                r = timeout_at(deadline, read_more(client, &mut buf)) => r,
                _ = super::wait_stopping(&shared), if waiting_for_start => return,
            };
            // Taken to make room while the read completed: shut down, and whatever it read
            // (a request) is not served, as if the read had come after the shutdown.
            if closable.is_some_and(|w| !w.finish()) {
                return;
            }
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => started_late = waiting_for_start,
                Err(_) if !partial => return,
                Err(_) => return reject(client, &vip, peer, 408, None).await,
            }
        };
        first = false;
        // The newest pools for every request, taken once its head is in: a keep-alive
        // connection may have waited up to the idle timeout for it, and a drain, a backend
        // found dead or a reload meanwhile must count for it.
        if let Some(v) = shared.snapshot.load().vips.get(&vip.name) {
            vip = v.clone();
        }
        let cfg = &vip.cfg;
        // A reload may have changed the idle timeout since the connection was accepted.
        client.keep_stall(cfg.idle_timeout);
        // Latency counts from a complete request head: not the keep-alive wait before it.
        let started = Instant::now();
        if req.head.bytes.len() > cfg.max_header_bytes {
            return reject(client, &vip, peer, 431, Some(&req)).await;
        }
        // Transfer-Encoding in an HTTP/1.0 message means faulty framing (RFC 9112 6.1).
        let te10 = req.http10 && header(&req.head, "transfer-encoding").next().is_some();
        let Some(framing) = body_framing(&req.head, true).ok().filter(|_| !te10) else {
            return reject(client, &vip, peer, 400, Some(&req)).await;
        };
        let client_keepalive =
            if req.http10 { req.head.connection.keep_alive } else { !req.head.connection.close };
        let deadline = tokio::time::Instant::from_std(started) + cfg.request_timeout;
        // CONNECT asks for a tunnel, which only a forward proxy gives.
        if req.method() == "CONNECT" {
            return reject(client, &vip, peer, 501, Some(&req)).await;
        }
        // TRACE would echo the request as the backend got it: the client's cookies and
        // credentials, and the X-Forwarded-For the proxy adds (cross-site tracing). Refused, as
        // nginx does by default; no `Allow`, as the proxy does not know the resource's methods.
        if req.method() == "TRACE" {
            return reject(client, &vip, peer, 405, Some(&req)).await;
        }
        let Some(target) = target(&req, cfg.normalize_path) else {
            return reject(client, &vip, peer, 400, Some(&req)).await;
        };
        // An OPTIONS request with `Max-Forwards: 0` is for the proxy to answer as its final
        // recipient (RFC 9110 7.6.2); one whose Max-Forwards is not a number is refused.
        match max_forwards(&req) {
            Err(()) => return reject(client, &vip, peer, 400, Some(&req)).await,
            Ok(Some(0)) => {
                finished(&vip, peer, 200, Some(&req), None, Some(started), None);
                // The connection goes on as after a backend's answer, but for one with a
                // body, which would have to be read first: it closes, lingering, as after the
                // proxy's refusals.
                let keep = client_keepalive
                    && framing == Framing::None
                    && !shared.stopping.load(Ordering::Relaxed);
                let answer: &'static [u8] = if keep {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                if write(client, answer).await.is_err() {
                    return;
                }
                if keep {
                    continue;
                }
                if framing != Framing::None || sends_more(client, &buf) {
                    linger(client, cfg.idle_timeout).await;
                }
                return;
            }
            Ok(_) => {}
        }
        // valid_host admits ASCII only.
        let host = target.host.and_then(|h| std::str::from_utf8(h).ok());
        let pool = vip.pool_for(host, &target.path).clone();
        // An escaped slash, and a segment's `;` parameters, stay data here, but backends that
        // decode the one or drop the other first would serve the request by a path another
        // route takes: refused, rather than routed around that route.
        if cfg.normalize_path && !readings_agree(&vip, host, &target.path, &pool) {
            return reject(client, &vip, peer, 400, Some(&req)).await;
        }

        // Sticky cookie, if the pool uses them.
        let named = (pool.algorithm == Algorithm::Cookie)
            .then(|| pool.cookie_in(header(&req.head, "cookie")))
            .flatten();
        let sticky = named.map(|n| n.member);
        // A cookie signed with the previous secret (a rotation under way), or read under the
        // name a host route's pool has without a Domain (`Pool::scope_cookie`), keeps its
        // member, and is issued anew under the current secret and the pool's own name with the
        // answer. (One with a Max-Age is set again with most answers too, see `refresh` below.)
        let renew = named.is_some_and(|n| n.renew());

        let continued = expects_continue(&req, framing);
        if continued && write(client, &b"HTTP/1.1 100 Continue\r\n\r\n"[..]).await.is_err() {
            return;
        }

        // 2..4. Pick, send, read the response head; retry where that is safe.
        let can_retry = idempotent(req.method()) && framing == Framing::None;
        let upgrade = upgrade_of(&req, framing);
        let names = cfg
            .forwarded_for
            .then(|| &*forwarded.get_or_insert_with(|| ForwardedClient::new(peer)));
        // A connection that opened with a PROXY header speaks for one client only, and with
        // `upstream_keepalive = 0` none is pooled.
        let reuse = cfg.proxy_protocol.is_none() && cfg.upstream_keepalive > 0;
        let head = upstream_head(&req, &target, listen, framing, upgrade, names, reuse);
        let expect = Expect {
            upgrade: upgrade.is_some(),
            continued,
            http10: req.http10,
            head: req.method() == "HEAD",
        };
        // The exchange's idle clock, moved by each read of the request body and the response
        // (no clock read here: the first read sets it).
        let clock = IdleClock::new(cfg.idle_timeout, tokio::time::Instant::from_std(started));
        // The interim responses of this request's backend: once one reached the client, no
        // other backend is tried.
        let interim = Interim::default();
        // The client's private connection, if its backend may take this request: the first
        // attempt goes over it, to that backend, without a pick (a retry, to another backend,
        // gets a pooled or fresh connection). Closed otherwise (and without reuse: a reload may
        // have turned it off).
        let mut own = if reuse {
            private.take(&pool, started)
        } else {
            private = Private::default();
            None
        };
        let own_member = own.as_ref().map(|&(i, ..)| i);
        tried.clear();
        let mut last = Attempt::Connect;
        let mut done = None;
        let mut kept: Option<Kept> = None;
        for attempt in 0..=cfg.retries {
            if attempt > 0 && tokio::time::Instant::now() >= deadline {
                last = Attempt::Deadline;
                break;
            }
            let given = own.take().map(|(_, s, armed)| (s, armed));
            let i = match own_member.filter(|_| attempt == 0) {
                Some(i) => i,
                None => {
                    let Some(i) = vip.pick(&pool, client_ip(peer), &tried, sticky, attempt) else {
                        break;
                    };
                    i
                }
            };
            tried.push(i);
            // The member the client's cookie names (live, or the pool failing open): the
            // session is there. Its own errors are the client's answer: retried elsewhere,
            // the request might run twice, and the other member's answer would move the
            // session for good (HAProxy redispatches a cookie client only when its server
            // cannot be connected to). A connect failure still goes on to another member.
            let pinned = sticky == Some(i);
            let member = &pool.members[i];
            let counted = InFlight::new(&member.state);
            member.state.requests.fetch_add(1, Ordering::Relaxed);
            // The first attempt starts with the request; a retry reads the clock again.
            let now = if attempt == 0 { started } else { Instant::now() };
            let r = attempt_once(
                client, &mut buf, &mut ubuf, &upstream, given, &vip, &pool, i, &head, framing,
                expect, can_retry, peer, listen, now, deadline, &clock, &interim,
            )
            .await;
            match r {
                Ok(Answer { up, resp, cut, rest }) => {
                    // Any other answer counts as the backend's success once its body is
                    // through (or the client left): a body the backend cuts short is a failure.
                    let retryable = matches!(resp.status, 502..=504);
                    if retryable {
                        vip.failed(&member.state);
                    }
                    // Not after an interim response reached the client: see `Interim::relayed`.
                    let answered = interim.relayed.get();
                    if retryable && can_retry && !pinned && !answered && attempt < cfg.retries {
                        // The latest such answer is the one passed on if nothing better comes.
                        // (A request retried has no body: nothing of it is still going.)
                        debug_assert!(rest.is_none());
                        let rest = ubuf.split();
                        if let Some(old) = kept.replace(Kept { i, up, resp, rest, counted }) {
                            close(&old.up);
                        }
                        continue;
                    }
                    done = Some((i, up, resp, counted, cut, rest));
                    break;
                }
                Err(e @ (Attempt::ClientGone | Attempt::ClientTimeout | Attempt::ClientBad)) => {
                    // Nothing was sent to the client yet: a stalled one gets 408, one whose
                    // chunked body broke the coding 400, one that left is counted and logged as
                    // 499 (nginx's "client closed request"). The backend connection, which has
                    // part of the request, is closed (`abandon`), and no failure of the backend.
                    let status = match e {
                        Attempt::ClientTimeout => 408,
                        Attempt::ClientBad => 400,
                        _ => 499,
                    };
                    finished(
                        &vip,
                        peer,
                        status,
                        Some(&req),
                        Some(member.state.addr),
                        Some(started),
                        None,
                    );
                    if let Some(k) = kept {
                        close(&k.up);
                    }
                    // The stalled client may yet send the rest of its body, and the one whose body
                    // is malformed whatever followed the bad bytes.
                    if status != 499 && respond(client, status, false).await.is_ok() {
                        linger(client, cfg.idle_timeout).await;
                    }
                    return;
                }
                Err(Attempt::TooLarge) => {
                    // The backend answered: no failure of its health (see `Attempt::TooLarge`).
                    vip.succeeded(&member.state);
                    vip.metrics.head_too_large(&vip.name, member.state.addr);
                    say_head_too_large(&vip.name, member.state.addr);
                    last = Attempt::TooLarge;
                    break;
                }
                Err(e) => {
                    tracing::debug!(
                        vip = %vip.name,
                        backend = %member.state.addr,
                        attempt,
                        failure = match e { Attempt::Connect => "connect", Attempt::Local => "no local resources", Attempt::Timeout => "timeout", Attempt::Deadline => "request deadline", Attempt::Squeezed => "request deadline after a late body", Attempt::Broken => "broken", Attempt::TooLarge => "response head too large", Attempt::ClientGone => "client gone", Attempt::ClientTimeout => "client timeout", Attempt::ClientBad => "malformed client body" },
                        "L7 attempt failed"
                    );
                    // The request's deadline is charged to the backend that had all of it, the
                    // first, not to one that got what was left after others; nor to one that
                    // got what a slow request body left of it (`Attempt::Squeezed`).
                    let out_of_time = matches!(e, Attempt::Deadline | Attempt::Squeezed);
                    let charged = match e {
                        Attempt::Deadline => attempt == 0,
                        Attempt::Squeezed | Attempt::Local => false,
                        _ => true,
                    };
                    if charged {
                        vip.failed(&member.state);
                    }
                    let sent = matches!(e, Attempt::Timeout | Attempt::Broken);
                    last = e;
                    // The client has seen this backend's answer begin (`Interim::relayed`).
                    let answered = interim.relayed.get();
                    if out_of_time || (sent && (!can_retry || pinned || answered)) {
                        break;
                    }
                }
            }
        }
        // A backend's own retryable answer rather than the proxy's: as if not retried.
        match (&done, kept) {
            (None, Some(k)) => {
                ubuf.clear();
                ubuf.extend_from_slice(&k.rest);
                // Only a bodiless request is retried, and its body cannot be cut off.
                done = Some((k.i, k.up, k.resp, k.counted, false, None));
            }
            (Some(_), Some(k)) => close(&k.up),
            (_, None) => {}
        }
        let Some((i, up, resp, counted, cut, rest)) = done else {
            let status = match (tried.is_empty(), last) {
                (true, _) | (_, Attempt::Local) => 503,
                (_, Attempt::Deadline | Attempt::Squeezed) | (false, Attempt::Timeout) => 504,
                _ => 502,
            };
            let backend = tried.last().map(|&i| pool.members[i].state.addr);
            finished(&vip, peer, status, Some(&req), backend, Some(started), None);
            // The request body may be unread: the connection cannot continue, and closes
            // lingering so that the client reads this answer rather than a reset.
            let head_request = req.method() == "HEAD";
            if respond(client, status, head_request).await.is_ok()
                && (framing != Framing::None || sends_more(client, &buf))
            {
                linger(client, cfg.idle_timeout).await;
            }
            return;
        };

        if resp.status == 101 {
            // The backend switched protocols (attempt_once admits 101 only for an upgrade
            // request): pass its answer on, then relay bytes both ways until both sides are
            // done, as TCP mode does. The connection is no longer HTTP.
            status_and_headers(&mut out, &resp);
            // A WebSocket client placed anew is as sticky as any other: later requests of its
            // page, and its reconnects, go where its session is.
            // A cookie with a Max-Age is set again too: no cache stores a 101.
            if pool.algorithm == Algorithm::Cookie
                && (sticky != Some(i) || renew || pool.cookie_refresh())
            {
                set_cookie(&mut out, &pool, i);
            }
            let protocol = header(&resp.head, "upgrade").next().or(upgrade).unwrap_or_default();
            out.extend_from_slice(b"Upgrade: ");
            out.extend_from_slice(protocol);
            out.extend_from_slice(b"\r\nConnection: upgrade\r\n\r\n");
            // Whatever the backend sent after its head already belongs to the new protocol.
            out.extend_from_slice(&ubuf);
            ubuf.clear();
            drop(resp);
            vip.succeeded(&pool.members[i].state);
            finished(
                &vip,
                peer,
                101,
                Some(&req),
                Some(pool.members[i].state.addr),
                Some(started),
                None,
            );
            vip.duration.observe(started.elapsed().as_secs_f64());
            // So does whatever the client sent after its request head.
            let sent = write(client, out.split().freeze()).await.is_ok()
                && (buf.is_empty() || write(&up, buf.split().freeze()).await.is_ok());
            // The relay counts itself in flight.
            drop(counted);
            if sent {
                super::tcp::relay(client, &up, vip.cfg.idle_timeout, &pool.members[i].state).await;
            } else {
                let _ = up.shutdown(std::net::Shutdown::Both);
                let _ = client.shutdown(std::net::Shutdown::Both);
            }
            return;
        }

        // 5. Response head and body to the client.
        let head_req = req.method() == "HEAD";
        // A response that has no body whatever its head says.
        let bodiless = head_req || resp.status == 204 || resp.status == 304;
        let rframing = match resp.framing {
            _ if bodiless => Framing::None,
            Ok(f) => f,
            // `response_head` refuses such a response (a 502): not reached.
            Err(()) => Framing::UntilClose,
        };
        // A connection the backend keeps open (RFC 9112 9.3): not after `close`, nor after an
        // HTTP/1.0 response without `keep-alive`, nor after a length that was overridden, nor
        // after an HTTP/1.0 response with Transfer-Encoding, which HTTP/1.0 does not have: its
        // framing is faulty, and the connection closes after it (RFC 9112 6.1).
        let upstream_keepalive = !resp.head.connection.close
            && (!resp.http10
                || (resp.head.connection.keep_alive
                    && header(&resp.head, "transfer-encoding").next().is_none()))
            && rframing != Framing::UntilClose
            && !(rframing == Framing::Chunked
                && header(&resp.head, "content-length").next().is_some());
        // A connection that goes on stays private once it is ([`Private`]): the one this
        // client's private connection was (or a fresh one to its backend in its place, to be
        // safe), or one this exchange binds to the client. Looked at only for a connection
        // that could be kept.
        let bound = reuse
            && upstream_keepalive
            && (own_member == Some(i) || binds_connection(&req.head, &resp.head));
        // An HTTP/1.0 client cannot read the chunked coding (RFC 9112 6.1): it gets the body
        // decoded, delimited by the connection's close.
        let decode = req.http10 && rframing == Framing::Chunked;
        // A request body cut off (`Answer::cut`): the rest of it is still coming, and is not
        // a request.
        let keep = client_keepalive
            && !cut
            && rframing != Framing::UntilClose
            && !decode
            && !shared.stopping.load(Ordering::Relaxed);
        // Transfer-Encoding and Content-Length are written below.
        status_and_headers(&mut out, &resp);
        if rframing == Framing::Chunked && !decode {
            transfer_encoding(&mut out, &resp.head);
        }
        // Only a response framed without a body needs its declared length: 204 has none; HEAD
        // and 304 responses describe the one a GET would have; others declared 0.
        let declared = if rframing == Framing::None && resp.status != 204 {
            declared_length(&resp.head)
        } else {
            None
        };
        content_length(&mut out, rframing, declared);
        // A new or moved client gets its cookie, and one whose cookie is signed with the
        // previous secret gets it anew, whatever the answer's caching headers (a shared cache
        // in front must not store answers with a Set-Cookie). A cookie with a Max-Age is set
        // again with other answers too, so that its lifetime runs from the client's last answer
        // rather than its first (`Pool::cookie_refresh`), but not with one a shared cache may
        // store by the backend's leave, nor with a 304, which refreshes a stored answer's
        // headers: Set-Cookie does not stop a cache (RFC 9111 7.3), which would hand this
        // client's cookie to every other (all to one backend) or refuse to store the answer.
        // None with a 5xx, which would pin the client to a member that failed it (the last of
        // several that answered 503, say).
        let refresh = pool.cookie_refresh() && resp.status != 304 && !shared_cacheable(&resp.head);
        if pool.algorithm == Algorithm::Cookie
            && (sticky != Some(i) || renew || refresh)
            && resp.status < 500
        {
            set_cookie(&mut out, &pool, i);
        }
        out.extend_from_slice(if keep {
            &b"Connection: keep-alive\r\n\r\n"[..]
        } else {
            &b"Connection: close\r\n\r\n"[..]
        });
        // The backend's head is copied out: drop it, so its room in `ubuf` can be re-used.
        let status = resp.status;
        drop(resp);
        // One write for the head and whatever of a content-length body is already here.
        let mut rframing = rframing;
        if let Framing::Length(n) = rframing {
            let take = (ubuf.len() as u64).min(n) as usize;
            out.extend_from_slice(&ubuf[..take]);
            ubuf.advance(take);
            rframing =
                if take as u64 == n { Framing::None } else { Framing::Length(n - take as u64) };
        }
        // A 502-504 was charged to its backend with its head; any other answer counts as a
        // success unless the backend cuts its body short.
        let charged = matches!(status, 502..=504);
        let member = &pool.members[i].state;
        if write(client, out.split().freeze()).await.is_err() {
            // The client left before its answer: counted and logged as 499 (nginx's "client
            // closed request"), as when it leaves before the backend has its request; the
            // backend answered, and is not blamed.
            drop(counted);
            close(&up);
            if !charged {
                vip.succeeded(member);
            }
            finished(&vip, peer, 499, Some(&req), Some(member.addr), Some(started), None);
            return;
        }
        let streaming = stream_body(&up, &mut ubuf, client, rframing, decode, deadline, &clock);
        // The rest of a cut-off body is read and dropped while the answer streams; the rest of
        // one the backend answered 2xx goes on to it meanwhile (`Answer::rest`), where it
        // stands kept in `rest` even when the drain deadline drops the streams.
        let mut rest = rest.map(Rest::Going);
        let body = async {
            match rest.as_mut() {
                _ if cut => with_the_rest_dropped(streaming, client).await,
                Some(rest) => beside(streaming, rest, client, deadline).await,
                None => streaming.await,
            }
        };
        // Who ended a body that could not be passed on whole. The backend, when it closed or
        // reset its connection or broke the chunked coding: a passive-health failure (but see
        // `blamed` below). The client, when the write to it failed (it left), or when the rest
        // of its request body, going beside the answer, failed (it left or broke the chunked
        // coding: see `beside`); the whole-request deadline, which a slow client can make a
        // download outlast; the idle timeout, which a healthy stream's pause can outlast (and,
        // beside a request body, the client's pause while the backend waits for it); and the
        // drain deadline of a stop: none is the backend's fault. The response
        // is still counted and logged by the status its head gave the client (as nginx and
        // HAProxy log it), with the cut beside it.
        let ended = tokio::select! {
            biased;
            r = body => Some(r),
            () = super::wait_forced(&shared) => None,
        };
        let cut_by = match ended {
            None => Some(Cut::Drain),
            Some(Ok(())) => None,
            Some(Err(Side::Dst)) => Some(Cut::Client),
            Some(Err(Side::Timeout)) if tokio::time::Instant::now() >= deadline => {
                Some(Cut::Deadline)
            }
            Some(Err(Side::Timeout)) => Some(Cut::Idle),
            Some(Err(Side::Src | Side::Closed | Side::Bad)) => Some(Cut::Backend),
        };
        // A response through whole while the rest of the request body still goes to the
        // backend: that goes on (on the exchange's idle clock, now moved by the body alone,
        // within the request's deadline and the drain deadline of a stop), and the exchange is
        // over once it is through. A cut response resets both connections below, and the rest
        // of its body goes with it.
        if cut_by.is_none()
            && let Some(Rest::Going(going)) = &mut rest
        {
            let end = tokio::select! {
                biased;
                ended = going => Rest::ended(ended, deadline),
                () = super::wait_forced(&shared) => Rest::Failed(Cut::Drain),
            };
            rest = Some(end);
        }
        // A backend that cut its response short (`Cut::Backend`) is charged a passive-health
        // failure, but not always. Without an early 2xx: not when it answered before it had the
        // whole request body (`cut`: with the rest unread, its close resets the connection,
        // which is how an early answer to an upload ends). After an early 2xx, which took the
        // body: a malformed response always (nothing to do with the body); a reset
        // mid-response only once the body was through. Before that, the backend may have
        // closed with the body unread, whole response sent: its kernel then resets the
        // connection, which drops what of the response it had not sent yet, and whether the
        // proxy sees that reset on the response or first on the body's write (`Rest::Failed`
        // by the backend) is a race; a response delimited by its close ends so too. A clean
        // close (FIN) before the response's length or last chunk (`Side::Closed`; where the
        // close delimits the response, it is its end) cannot come from that: a backend that
        // closes with data unread resets. It cut its response short itself, and is charged,
        // the body still going or through. Not once the body's write failed on the backend
        // (`Rest::Failed`): the write may have taken the reset's error, the read then seeing
        // only the end of stream a reset leaves. For the same reason a FIN is judged only
        // after one more look at a body still going, whose failed write's completion may have
        // come in the same batch as the read's.
        let malformed = ended == Some(Err(Side::Bad));
        let closed = ended == Some(Err(Side::Closed));
        if closed && let Some(Rest::Going(going)) = &mut rest {
            let now = tokio::select! {
                biased;
                ended = going => Some(Rest::ended(ended, deadline)),
                () = std::future::ready(()) => None,
            };
            if let Some(now) = now {
                rest = Some(now);
            }
        }
        let blamed = match &rest {
            None => !cut,
            Some(_) if malformed => true,
            Some(Rest::Going(_)) if closed => true,
            Some(Rest::Going(_) | Rest::Failed(Cut::Backend)) => false,
            Some(Rest::Through(_) | Rest::Failed(_)) => true,
        };
        // Who ended the rest of a body going beside an early 2xx that did not go through: the
        // backend, the client, the deadline, the idle clock or a stop's drain deadline, as it
        // failed; or, still going, the response's cut, which ends it too. A 2xx cut off
        // (`cut`, no `rest`) is one whose backend took no more of the body before its head
        // was read (an early refusal, any other status, ends the body by design).
        let body_cut_by = match &rest {
            Some(Rest::Failed(c)) => Some(*c),
            Some(Rest::Going(_)) => cut_by,
            Some(Rest::Through(_)) => None,
            None if cut && (200..300).contains(&status) => Some(Cut::Backend),
            None => None,
        };
        // The rest of a body answered 2xx that did not go through (the backend took no more of
        // it, the client failed to send it, or the response was cut while it still went) ends
        // the exchange as a cut-off body does: the backend connection, with part of a request,
        // is not reused, and the client connection (whose rest of a body is not a request)
        // closes lingering. Its response, whole, still counts as the backend's success.
        let cut = match rest {
            None => cut,
            Some(Rest::Through(pending)) => {
                // What followed the body: the client's next request.
                buf = pending;
                cut
            }
            Some(Rest::Failed(by)) => {
                tracing::debug!(vip = %vip.name, backend = %member.addr, by = by.as_str(), "the rest of a request body answered 2xx early did not go through");
                true
            }
            Some(Rest::Going(_)) => true,
        };
        drop(counted);
        let end = Instant::now();
        match cut_by {
            _ if charged => {}
            None | Some(Cut::Client) => vip.succeeded(member),
            Some(Cut::Backend) if blamed => vip.failed(member),
            Some(Cut::Backend | Cut::Deadline | Cut::Idle | Cut::Drain) => {}
        }
        if let Some(c) = cut_by {
            vip.responses_cut[c as usize].inc();
        }
        if let Some(c) = body_cut_by {
            vip.request_bodies_cut[c as usize].inc();
        }
        let (backend, head) = (Some(member.addr), Some(&req));
        finished_cut(&vip, peer, status, head, backend, Some(started), cut_by, body_cut_by);
        vip.duration.observe(end.saturating_duration_since(started).as_secs_f64());
        if cut_by.is_some() {
            // The body could not be passed on whole, and its head is with the client: a
            // reset tells it so. A clean close would not, where the close delimits the body
            // (one without a length, or a chunked one decoded for HTTP/1.0): the client takes
            // a body cut short there for the whole one (RFC 9112 8), caches or saves it. Every
            // other end of a client connection is an ordinary close.
            let _ = up.shutdown(std::net::Shutdown::Both);
            client.abort();
            return;
        }
        let clean = !cut && ubuf.is_empty();
        if clean && upstream_keepalive && reuse {
            let (max, max_idle) = (vip.cfg.upstream_keepalive, vip.cfg.idle_timeout);
            // The backend buffer (empty) goes with the connection, for the receive kept pending
            // on it (`Idle::armed`); the request that takes the connection next, from this
            // client or another (never another for a private one), takes the buffer with it.
            let addr = pool.members[i].state.addr;
            let ubuf = std::mem::take(&mut ubuf);
            if bound {
                if own_member != Some(i) {
                    vip.private_connections.inc();
                }
                private.keep(addr, Idle::kept_for(up, ubuf, end, max_idle, bodiless));
            } else {
                upstream.put(addr, up, ubuf, max, end, max_idle, bodiless);
            }
        } else if clean {
            // The backend closes this one (it said so, or was asked to): let it close first.
            close_after_backend(up);
        } else {
            // Now, not when the last clone goes: a send of a cut-off body may still hold one.
            close(&up);
        }
        if cut || (!keep && sends_more(client, &buf)) {
            return linger(client, vip.cfg.idle_timeout).await;
        }
        if !keep {
            return;
        }
    }
}

/// Is a client whose connection closes after this answer sending more: requests pipelined
/// behind this one, read already (`buf`) or waiting in the kernel? Its connection then closes
/// lingering ([`linger`]). Closed at once, the unread bytes, or the next ones to arrive, would
/// reset the connection, and the reset throws away the part of the answer the kernel has not
/// sent yet: a large body reaching the client cut short, with an error.
fn sends_more(client: &Socket, buf: &BytesMut) -> bool {
    !buf.is_empty() || client.has_unread()
}

/// Do the other readings backends may give the normalized `path` ([`super::path`]: escaped
/// separators decoded, `;` segment parameters dropped, or both) take the request to `pool`
/// too, the pool the path as sent takes? A reading that is itself to be refused does not.
fn readings_agree(vip: &VipRuntime, host: Option<&str>, path: &str, pool: &Arc<Pool>) -> bool {
    use super::path::{params_stripped, separators_decoded};
    let agrees = |reading: &Option<Result<String, ()>>| match reading {
        None => true,
        Some(Ok(p)) => Arc::ptr_eq(vip.pool_for(host, p), pool),
        Some(Err(())) => false,
    };
    let decoded = separators_decoded(path);
    let both = match &decoded {
        Some(Ok(p)) => params_stripped(p),
        _ => None,
    };
    agrees(&decoded) && agrees(&params_stripped(path)) && agrees(&both)
}

/// Whether a shared cache (a CDN in front of the proxy) may store a response by its backend's
/// leave (RFC 9111 3): a `Cache-Control` directive `public`, `s-maxage` or `max-age`
/// (5.2.2.9, 5.2.2.10, 5.2.2.1), or an `Expires` header, unless `private` or `no-store` forbids
/// it; or a `CDN-Cache-Control` (RFC 9213) or `Surrogate-Control` header, which speak to such
/// caches alone. Directive names in any case. Such an answer does not get a cookie set again only
/// to renew its lifetime (see `serve_conn`): a cache that stored it would hand the cookie to
/// everyone. Erring towards "may store" costs only a refresh, which the client's next answer
/// that no cache may store brings.
fn shared_cacheable(head: &Head) -> bool {
    if header(head, "cdn-cache-control").next().is_some()
        || header(head, "surrogate-control").next().is_some()
    {
        return true;
    }
    let (mut allows, mut forbids) = (header(head, "expires").next().is_some(), false);
    for t in tokens(head, "cache-control") {
        let name = t.split(|&b| b == b'=').next().unwrap_or(t).trim_ascii();
        let is = |d: &str| name.eq_ignore_ascii_case(d.as_bytes());
        allows |= is("public") || is("s-maxage") || is("max-age");
        forbids |= is("private") || is("no-store");
    }
    allows && !forbids
}

/// Writes the `Set-Cookie` header that sticks a client to member `i` of `pool`: `Path` and
/// `HttpOnly` always, then the VIP's `cookie_attributes` (`Secure; SameSite=None` for
/// cross-site clients, `Max-Age`, ...).
fn set_cookie(out: &mut BytesMut, pool: &Pool, i: usize) {
    // Writes into a BytesMut cannot fail.
    let _ = write!(
        out,
        "Set-Cookie: {}={}; Path={}; HttpOnly{}\r\n",
        pool.cookie_name(),
        pool.cookie(i),
        pool.cookie_path(),
        pool.cookie_attributes()
    );
}

/// Shuts a backend connection down (completing any read left pending by a timeout, so the fd
/// closes) and passes `why` on.
fn abandon(up: &Socket, why: Attempt) -> Attempt {
    let _ = up.shutdown(std::net::Shutdown::Both);
    why
}

/// A backend's final response head to one attempt, with its connection.
struct Answer<'c> {
    up: Socket,
    resp: RespHead,
    /// The backend answered before it had the whole request body, not with a 2xx, and the
    /// rest was not sent (see [`attempt_once`]). The rest of the client's body is not read as
    /// a request, so the client connection closes after this response (lingering: see
    /// [`linger`]), the rest read and dropped while the response streams too; the backend
    /// connection, where the body broke off, is not reused.
    cut: bool,
    /// The backend answered 2xx before it had the whole request body: the body's stream, still
    /// going, which the caller drives beside the response ([`beside`]). `None` for a request
    /// without a body (no allocation on that path), or one whose body went through first.
    rest: Option<BodyRest<'c>>,
}

/// The rest of a request body still on its way to the backend after the backend answered 2xx
/// ([`Answer::rest`]): the body's [`stream_body`], kept alive rather than started again (it
/// holds where the body is, the chunked decoder's state, and a write maybe in flight, all lost
/// with a dropped one). It owns clones of both sockets and the client's read buffer, which it
/// hands back with how it ended: what follows the body there is the client's next request.
/// It borrows the exchange's [`IdleClock`], which the response moves too.
type BodyRest<'c> = std::pin::Pin<Box<dyn Future<Output = (Result<(), Side>, BytesMut)> + 'c>>;

/// Where the rest of a request body sent beside its response ([`beside`]) stands.
enum Rest<'c> {
    /// Still going.
    Going(BodyRest<'c>),
    /// Through: the client's read buffer, with whatever followed the body.
    Through(BytesMut),
    /// Failed, and who ended it ([`body_cut`]).
    Failed(Cut),
}

impl Rest<'_> {
    /// Where the rest of a body stands once its stream ended as `ended` (how, and the client's
    /// read buffer it hands back): through, or failed and by whom ([`body_cut`]).
    fn ended((r, pending): (Result<(), Side>, BytesMut), deadline: tokio::time::Instant) -> Self {
        match r {
            Ok(()) => Rest::Through(pending),
            Err(side) => Rest::Failed(body_cut(side, deadline)),
        }
    }
}

/// Who ended the rest of a request body going beside an early 2xx that failed with `side`
/// ([`stream_body`] from the client to the backend): the backend, which took no more of it
/// (`Side::Dst`: it closed or reset its connection, or took nothing for the idle timeout); the
/// client, which left or broke the chunked coding; the whole-request deadline; or the idle
/// timeout, nothing having moved either way for it ([`IdleClock`]: the client paused).
fn body_cut(side: Side, deadline: tokio::time::Instant) -> Cut {
    match side {
        Side::Dst => Cut::Backend,
        Side::Src | Side::Closed | Side::Bad => Cut::Client,
        Side::Timeout if tokio::time::Instant::now() >= deadline => Cut::Deadline,
        Side::Timeout => Cut::Idle,
    }
}

/// Streams a response (`response`) to the client while the rest of the request body (`rest`,
/// [`Rest::Going`]) still goes to the backend, after the backend's early 2xx
/// ([`Answer::rest`]), until the response ends: both directions at once, in this one task, on
/// one idle clock ([`IdleClock`]). Returns how the response ended, and leaves in `rest` where
/// the body stands (also when this is dropped, at a stop's drain deadline, say):
/// - the response ends first (whole or cut): the body may still be going; the caller finishes
///   it (a whole response) or drops it (a cut one, where everything is reset);
/// - the body is through first: the response goes on to its end;
/// - the backend takes no more of the body (it closed or reset its connection, or took nothing
///   for the idle timeout): its response is still read to its end if it can be, the client's
///   rest read and dropped meanwhile, as after a cut ([`with_the_rest_dropped`]);
/// - the client leaves or breaks the chunked coding, or the deadline passes: the backend cannot
///   have the whole request, so its response cannot end (a full-duplex backend waits for the
///   body's end): a cut by the client (`Err(Side::Dst)`, the response's client side) or by the
///   deadline (`Err(Side::Timeout)` past it), which the caller ends with a reset on both
///   connections.
///
/// A client that pauses its body while the backend waits for it leaves both directions still:
/// the exchange is idle, and the response's read, polled first with its timer set again to the
/// same moment as the body's, gives up first (`Err(Side::Timeout)`: `cut=idle`, the body still
/// going). Only a response stuck in a write to the client meanwhile lets the body's read give
/// up first (a cut by the client).
async fn beside(
    response: impl Future<Output = Result<(), Side>>,
    rest: &mut Rest<'_>,
    client: &Socket,
    deadline: tokio::time::Instant,
) -> Result<(), Side> {
    let mut response = std::pin::pin!(response);
    let Rest::Going(going) = rest else { return response.await };
    let first = tokio::select! {
        biased;
        r = &mut response => Ok(r),
        r = going => Err(r),
    };
    match first {
        Ok(r) => r,
        Err((Ok(()), pending)) => {
            *rest = Rest::Through(pending);
            response.await
        }
        Err((Err(Side::Dst), _)) => {
            *rest = Rest::Failed(Cut::Backend);
            with_the_rest_dropped(response, client).await
        }
        Err((Err(side), _)) => {
            let cut = body_cut(side, deadline);
            *rest = Rest::Failed(cut);
            Err(if cut == Cut::Deadline { Side::Timeout } else { Side::Dst })
        }
    }
}

/// Streams a response (`response`) while reading and dropping what the client still sends: the
/// rest of a request body that is not passed on. Not only after the response (`linger`): a
/// client that writes its whole body before it reads anything (Python's http.client, requests)
/// would otherwise stall its send to the proxy while the proxy stalls its send of an answer
/// larger than the socket buffers to the client, until the idle timeout resets the connection.
/// The answer goes first (`biased`): one framed without a body issues no read at all. Once the
/// client's side ends the reading is polled no more; one left pending when the answer is
/// through stays in flight with its buffer, harmlessly (what it gets is dropped anyway), and
/// completes at the latest when `serve` shuts the socket down.
async fn with_the_rest_dropped(
    response: impl Future<Output = Result<(), Side>>,
    client: &Socket,
) -> Result<(), Side> {
    let mut response = std::pin::pin!(response);
    let mut draining = std::pin::pin!(discard(client));
    let mut drained = false;
    loop {
        tokio::select! {
            biased;
            r = &mut response => return r,
            () = &mut draining, if !drained => drained = true,
        }
    }
}

/// One try on member `i`, starting at `now`: connect (or reuse: `given`, the client's private
/// connection to that member, else one from the pool), send head and body, read the response
/// head (one that `expect` admits). A `replayable` request (idempotent, no body) is
/// sent again on a fresh connection when a reused one turns out closed before any response. A
/// final response that arrives while the body is still streaming ends the body there
/// ([`Answer::cut`]), but for a 2xx, which takes the body's stream with it ([`Answer::rest`]).
/// The wait for the response head runs from the request's end for the response timeout, and
/// again from each interim response, which `interim` notes ([`head_within`]).
#[allow(clippy::too_many_arguments)]
async fn attempt_once<'c>(
    client: &Socket,
    buf: &mut BytesMut,
    ubuf: &mut BytesMut,
    upstream: &UpstreamPool,
    given: Option<(Socket, Armed)>,
    vip: &VipRuntime,
    pool: &Pool,
    i: usize,
    head: &Bytes,
    framing: Framing,
    expect: Expect,
    replayable: bool,
    peer: SocketAddr,
    listen: SocketAddr,
    now: Instant,
    deadline: tokio::time::Instant,
    clock: &'c IdleClock,
    interim: &Interim,
) -> Result<Answer<'c>, Attempt> {
    let cfg = &vip.cfg;
    let addr = pool.members[i].state.addr;
    // A pooled connection comes checked: nothing happened on it while it was idle (see
    // `Idle::armed`), and the receive pending on it is the first read of the response. The
    // backend may still close it just as the request arrives, having read it or not: a request
    // that may be sent again then goes on a fresh one; any other is never sent twice.
    let mut reused = match given {
        Some(c) => Some(c),
        None if cfg.proxy_protocol.is_none() => upstream.take(addr, now, !replayable),
        None => None,
    };
    // The response timeout runs from the request's end (within the whole request's deadline):
    // known now for a bodiless request.
    let sent_at = tokio::time::Instant::from_std(now);
    let answer_by = |end: tokio::time::Instant| (end + cfg.response_timeout).min(deadline);
    let wait = cfg.response_timeout;
    loop {
        let fresh = reused.is_none();
        let (up, armed) = match reused.take() {
            // Made for a request under another idle timeout, perhaps: before a reload, or for
            // another VIP.
            Some((s, armed)) => {
                s.keep_stall(cfg.idle_timeout);
                (s, Some(armed))
            }
            None => {
                // Within what the request's deadline leaves.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let within = cfg.connect_timeout.min(left);
                let s = match Socket::connect(addr, within, cfg.idle_timeout).await {
                    Ok(s) => s,
                    Err(e) if super::local_failure(&e) => {
                        super::say_local_failure(&vip.name, addr, &e);
                        return Err(Attempt::Local);
                    }
                    Err(_) => return Err(timed_out(deadline, Attempt::Connect)),
                };
                if let Some(v) = cfg.proxy_protocol {
                    write(&s, proxy_header(v, peer, listen)).await.map_err(|_| Attempt::Connect)?;
                }
                (s, None)
            }
        };
        ubuf.clear();
        if framing == Framing::None {
            // A bodiless request: the read of the response is issued together with the write
            // of the head (on a pooled connection it was issued before), which saves the thread
            // a round through its event loop per request. A failed write shuts the connection
            // down, which ends the read at once.
            let resp_deadline = answer_by(sent_at);
            let send = async {
                let r = write(&up, head.clone()).await;
                if r.is_err() {
                    let _ = up.shutdown(std::net::Shutdown::Both);
                }
                r
            };
            let read = read_first(&up, ubuf, armed);
            let (sent, read) = tokio::join!(send, timeout_at(resp_deadline, read));
            if sent.is_err() {
                if fresh {
                    return Err(Attempt::Connect);
                }
                continue;
            }
            let Ok(first) = read else {
                return Err(abandon(&up, timed_out(deadline, Attempt::Timeout)));
            };
            // A pooled connection closed before any response: the request goes again on a
            // fresh one (`Ok(None)`).
            let stale = !fresh && replayable;
            let first = Some(FirstRead::Done(first));
            let reading = response_head(client, &up, ubuf, addr, expect, first, stale, interim);
            match head_within(reading, resp_deadline, interim, wait, deadline).await {
                Some(Ok(Some(resp))) => return Ok(Answer { up, resp, cut: false, rest: None }),
                Some(Ok(None)) => continue,
                Some(Err(e)) => return Err(abandon(&up, e)),
                None => return Err(abandon(&up, timed_out(deadline, Attempt::Timeout))),
            }
        }
        if write(&up, head.clone()).await.is_err() {
            if fresh {
                return Err(Attempt::Connect);
            }
            // Closed now: the receive pending on it holds it open until it completes.
            close(&up);
            continue;
        }
        // The response is read while the body streams, as nginx does: a backend may answer
        // before it has the whole body (a 413 from a size check, a 401) and read no more of it,
        // or close the connection, which fails the body's write. Waiting for the body to go
        // through first would lose that answer (a 502 instead, and a passive-health failure
        // charged to a healthy backend) or wait for the kernel to give up on the stalled send.
        // The body stream goes first when both are ready: a body that is through is through.
        //
        // The body's stream is boxed and owns what it works with (clones of both sockets, and
        // the client's read buffer, handed back with its end; it borrows only the exchange's
        // idle clock, which the response shares), so that it can outlive this attempt: a 2xx
        // that comes before the body is through does not end it, and the same stream goes on
        // beside the response ([`Answer::rest`]). Only a request with a body pays for the box.
        let (resp, cut, rest) = {
            let first = armed.map(FirstRead::Armed);
            let reading = response_head(client, &up, ubuf, addr, expect, first, false, interim);
            let mut reading = std::pin::pin!(reading);
            let (c, u) = (client.clone(), up.clone());
            let mut pending = std::mem::take(buf);
            let mut body: BodyRest = Box::pin(async move {
                let r = stream_body(&c, &mut pending, &u, framing, false, deadline, clock).await;
                (r, pending)
            });
            let streamed = tokio::select! {
                biased;
                r = &mut body => Ok(r),
                h = &mut reading => Err(h),
            };
            match streamed {
                Ok((Ok(()), pending)) => {
                    // What the client sent after the body (a pipelined request) is read later.
                    *buf = pending;
                    // A body through so late that the deadline comes before the response
                    // timeout: a wait that ends there is not the backend's failure.
                    let through = tokio::time::Instant::now();
                    let squeezed = through + cfg.response_timeout > deadline;
                    let by = answer_by(through);
                    match head_within(&mut reading, by, interim, wait, deadline).await {
                        Some(r) => (r, false, None),
                        None if squeezed => return Err(abandon(&up, Attempt::Squeezed)),
                        None => return Err(abandon(&up, timed_out(deadline, Attempt::Timeout))),
                    }
                }
                Ok((Err(Side::Src | Side::Closed), _)) => {
                    return Err(abandon(&up, Attempt::ClientGone));
                }
                Ok((Err(Side::Bad), _)) => return Err(abandon(&up, Attempt::ClientBad)),
                Ok((Err(Side::Timeout), _)) => return Err(abandon(&up, Attempt::ClientTimeout)),
                Ok((Err(Side::Dst), _)) => {
                    // The backend reset the connection (or took nothing for the idle timeout,
                    // and the kernel aborted it): the body ends here for it. An answer it sent
                    // before came before the reset (TCP delivers in order), so it is in the
                    // socket and the read ends at once with it; without one, the read ends at
                    // once with the error. The response timeout, which a complete request
                    // would have had from here, bounds the rare wait in between.
                    let by = answer_by(tokio::time::Instant::now());
                    match head_within(&mut reading, by, interim, wait, deadline).await {
                        Some(Ok(Some(resp))) => (Ok(Some(resp)), true, None),
                        Some(Err(e @ (Attempt::ClientGone | Attempt::TooLarge))) => {
                            return Err(abandon(&up, e));
                        }
                        _ => return Err(abandon(&up, Attempt::Broken)),
                    }
                }
                // An answer before the whole body went: a 2xx takes the body's stream with it,
                // any other ends the body there (below).
                Err(r) => (r, true, Some(body)),
            }
        };
        match resp {
            Ok(Some(resp)) => {
                // A 2xx: the backend took the request and is answering it, and may read the
                // rest of the body as it answers (a full-duplex stream) or after its head (an
                // upload answered `200` at once): the rest goes on beside the response, as
                // HAProxy passes both directions on at once (RFC 9112 9.3 and RFC 9110 15 let a
                // server answer before the request is complete; curl goes on sending after an
                // early 2xx too). Any other final answer (a 413 or 401, a 3xx sending the
                // client elsewhere, a 5xx) refuses the body: its stream is dropped here, and
                // with it the rest of the body.
                let rest = rest.filter(|_| (200..300).contains(&resp.status));
                let cut = cut && rest.is_none();
                if cut {
                    tracing::debug!(%addr, status = resp.status, "backend answered before the whole request body; the rest is not sent");
                } else if rest.is_some() {
                    tracing::debug!(%addr, status = resp.status, "backend answered 2xx before the whole request body; the rest goes on beside the response");
                }
                return Ok(Answer { up, resp, cut, rest });
            }
            // Only a bodiless request is sent again (`stale` is false here).
            Ok(None) => return Err(abandon(&up, Attempt::Broken)),
            Err(e) => return Err(abandon(&up, e)),
        }
    }
}

/// `failure`, or [`Attempt::Deadline`] when the request's deadline has passed: the wait that
/// failed was cut short by it (a connect or response timeout past the deadline never fires).
fn timed_out(deadline: tokio::time::Instant, failure: Attempt) -> Attempt {
    if tokio::time::Instant::now() >= deadline { Attempt::Deadline } else { failure }
}

/// What a backend's response head must be, for the request it answers.
#[derive(Clone, Copy)]
struct Expect {
    /// The request asked to upgrade: 101 is its final answer.
    upgrade: bool,
    /// The client had its `100 Continue` from the proxy: the backend's is dropped.
    continued: bool,
    /// An HTTP/1.0 client: it gets no interim responses (RFC 9110 15.2).
    http10: bool,
    /// A HEAD request: its response has no body whatever its head says (RFC 9112 6.3 item 1),
    /// so the framing that head declares does not matter.
    head: bool,
}

/// The interim (1xx) responses a request's backend sent before its final answer, shared by the
/// request's attempts and the waits for their response heads.
#[derive(Default)]
struct Interim {
    /// One was passed on to the client: the backend's answer has begun there, so the request
    /// goes to no other backend whatever follows (a timeout, a broken or retryable answer),
    /// and it is not sent again on a fresh connection either: the client would see the
    /// answers of two backends (or connections) to one request, and the backend that sent it
    /// has the request and is working on it (102 Processing, 103 Early Hints).
    relayed: Cell<bool>,
    /// When the last one came (passed on or not): the response timeout runs again from there
    /// ([`head_within`]).
    last: Cell<Option<tokio::time::Instant>>,
}

impl Interim {
    /// Notes an interim response that came now, `relayed` to the client or not.
    fn came(&self, relayed: bool) {
        self.last.set(Some(tokio::time::Instant::now()));
        if relayed {
            self.relayed.set(true);
        }
    }
}

/// Waits for a response head (`reading`) until `by` (the response timeout after the request's
/// end), or later as interim responses come: each starts the response timeout (`wait`) again,
/// as nginx's `proxy_read_timeout` runs between two reads, so a backend that sends `102
/// Processing` while it works is not cut off as silent (the status exists for that, RFC 2518
/// 10.1). Never past `deadline` (the whole request's). `None` once the time is up. A timer that
/// runs out after an interim response is set again on the same read (a receive dropped to
/// issue a new one would take the next bytes with it).
async fn head_within<F: Future>(
    reading: F,
    by: tokio::time::Instant,
    interim: &Interim,
    wait: Duration,
    deadline: tokio::time::Instant,
) -> Option<F::Output> {
    let mut reading = std::pin::pin!(reading);
    let mut until = by;
    loop {
        match timeout_at(until, &mut reading).await {
            Ok(r) => return Some(r),
            Err(_) => {
                let later = interim.last.get().map_or(until, |at| (at + wait).min(deadline));
                if later <= until {
                    return None;
                }
                until = later;
            }
        }
    }
}

/// The first read of a response head that [`response_head`] does not issue itself.
enum FirstRead {
    /// A read into the response buffer done already (issued with the request head).
    Done(io::Result<usize>),
    /// The receive kept pending on a pooled connection ([`Idle::armed`]).
    Armed(Armed),
}

/// Reads more bytes into `buf` (empty) as [`read_more`] does, or, on a pooled connection, waits
/// for the receive pending on it (`armed`, see [`Idle::armed`]), whose buffer becomes `buf`.
async fn read_first(up: &Socket, buf: &mut BytesMut, armed: Option<Armed>) -> io::Result<usize> {
    let Some(armed) = armed else { return read_more(up, buf).await };
    debug_assert!(buf.is_empty(), "the pending receive's bytes start the response");
    let (r, b) = armed.await;
    *buf = b;
    r
}

/// Reads the backend's final response head into `ubuf`, starting with `first` (a read already
/// done, or pending since the connection was idle) if given, and passes interim (1xx) responses
/// on to the client as they come. Reads wait as long as the backend takes: callers bound the
/// whole. With `stale` (a pooled connection, for a request that may be sent again), a
/// connection that ends before any response is `Ok(None)`: the request goes again on a fresh
/// one. Interim responses are noted in `interim`.
#[allow(clippy::too_many_arguments)]
async fn response_head(
    client: &Socket,
    up: &Socket,
    ubuf: &mut BytesMut,
    addr: SocketAddr,
    expect: Expect,
    mut first: Option<FirstRead>,
    stale: bool,
    interim: &Interim,
) -> Result<Option<RespHead>, Attempt> {
    let mut scan = HeadScan::default();
    loop {
        let parsed = if scan.worth_parsing(ubuf) { parse_response(ubuf) } else { Ok(None) };
        if matches!(parsed, Ok(Some(_))) {
            // Split off: what follows (a final response after an interim one) is a new head.
            scan = HeadScan::default();
        }
        match parsed {
            // 101 is final for an upgrade request. Unsolicited, the connection would carry
            // another protocol from here on: a broken response.
            Ok(Some(r)) if r.status == 101 && expect.upgrade => return Ok(Some(r)),
            Ok(Some(r)) if r.status == 101 => return Err(Attempt::Broken),
            // The client had its 100 Continue from the proxy already.
            Ok(Some(r)) if r.status == 100 && expect.continued => {
                interim.came(false);
                continue;
            }
            // An HTTP/1.0 client gets no interim responses (RFC 9110 15.2).
            Ok(Some(r)) if (100..200).contains(&r.status) && expect.http10 => {
                interim.came(false);
                continue;
            }
            Ok(Some(r)) if (100..200).contains(&r.status) => {
                // Interim response (100 Continue...): pass it on, wait for the final one.
                // Rewritten like a final head: a 1xx has no body, and a Content-Length or
                // Transfer-Encoding a backend put in one could make a client expect one.
                let mut head = Vec::with_capacity(r.head.bytes.len());
                status_and_headers(&mut head, &r);
                head.extend_from_slice(b"\r\n");
                write(client, head).await.map_err(|_| Attempt::ClientGone)?;
                interim.came(true);
                continue;
            }
            // A proxy must close the connection, discard the response and answer 502 (RFC
            // 9112 6.3 item 5). Relayed delimited by the close, its body could be the start of
            // another response, or miss its end; so it is broken like an unparsable head (a
            // passive-health failure, retried only where that is safe).
            Ok(Some(r)) if r.unframable(expect.head) => {
                tracing::debug!(%addr, status = r.status, "invalid response Content-Length");
                return Err(Attempt::Broken);
            }
            Ok(Some(r)) if r.bad_coding(expect.http10, expect.head) => {
                tracing::debug!(%addr, status = r.status, "response Transfer-Encoding that does not frame its body chunked, or a coding an HTTP/1.0 client cannot be told of");
                return Err(Attempt::Broken);
            }
            Ok(Some(r)) => return Ok(Some(r)),
            // Still incomplete with this many bytes: longer than the limit, however it came.
            Ok(None) if ubuf.len() >= MAX_RESPONSE_HEAD_BYTES => return Err(Attempt::TooLarge),
            Ok(None) => {}
            Err(HeadError::TooLarge) => return Err(Attempt::TooLarge),
            Err(_) => {
                // Escaped (CR and LF as `\r\n`), so that the event stays on one line.
                let head = ubuf[..ubuf.len().min(SHOWN_HEAD_BYTES)].escape_ascii();
                tracing::debug!(%addr, %head, "unparsable response head");
                return Err(Attempt::Broken);
            }
        }
        let read = match first.take() {
            Some(FirstRead::Done(read)) => read,
            Some(FirstRead::Armed(armed)) => read_first(up, ubuf, Some(armed)).await,
            None => read_more(up, ubuf).await,
        };
        match read {
            Ok(0) | Err(_) if ubuf.is_empty() && stale && !interim.relayed.get() => {
                return Ok(None);
            }
            Ok(0) => {
                tracing::debug!(%addr, got = ubuf.len(), "backend closed before a response head");
                return Err(Attempt::Broken);
            }
            Err(e) => {
                tracing::debug!(%addr, got = ubuf.len(), error = %e, "backend connection failed before a response head");
                return Err(Attempt::Broken);
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request with `pairs` as its headers, parsed.
    fn req(pairs: &[(&str, &str)]) -> ReqHead {
        req_line("GET /a HTTP/1.1", pairs)
    }

    fn req_line(line: &str, pairs: &[(&str, &str)]) -> ReqHead {
        let mut text = format!("{line}\r\n");
        for (n, v) in pairs {
            text += &format!("{n}: {v}\r\n");
        }
        text += "\r\n";
        let mut buf = BytesMut::from(text.as_bytes());
        let r = parse_request(&mut buf, 64).ok().flatten().expect("a complete head");
        assert!(buf.is_empty());
        r
    }

    /// Every byte outside visible ASCII is `%XX` (each byte of a character's UTF-8), and a field
    /// with nothing to escape goes to the formatter in one write.
    #[test]
    fn access_log_fields_escape_what_is_not_visible_ascii() {
        for (field, want) in [
            ("/a?b=%41&c", "/a?b=%41&c"),
            ("/\u{9b}31m", "/%C2%9B31m"),
            ("/a\u{2028}b", "/a%E2%80%A8b"),
            ("\u{e9}", "%C3%A9"),
            ("/a b\x1b\x7f", "/a%20b%1B%7F"),
            ("", ""),
        ] {
            assert_eq!(Escaped(field).to_string(), want, "{field:?}");
        }
        struct Writes(usize);
        impl std::fmt::Write for Writes {
            fn write_str(&mut self, _: &str) -> std::fmt::Result {
                self.0 += 1;
                Ok(())
            }
        }
        let mut w = Writes(0);
        write!(w, "{}", Escaped("/static/app.js?v=1")).unwrap();
        assert_eq!(w.0, 1);
    }

    #[test]
    fn a_head_is_parsed_again_only_when_a_line_may_have_ended() {
        let mut scan = HeadScan::default();
        let mut buf = BytesMut::new();
        let mut parses = 0;
        // A head sent a byte at a time: parsed on its first byte and after each line feed.
        let text = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut got = None;
        for &b in text {
            buf.extend_from_slice(&[b]);
            if scan.worth_parsing(&buf) {
                parses += 1;
                if let Some(r) = parse_request(&mut buf, 64).ok().flatten() {
                    got = Some(r);
                }
            }
        }
        let r = got.expect("the head completes on its last byte");
        assert_eq!(r.path(), "/a");
        // The first byte and four line feeds, not one parse per byte (70 bytes).
        assert_eq!(parses, 5);
        // A buffer split after a head starts afresh: the next head's first bytes are parsed.
        let mut scan = HeadScan::default();
        assert!(scan.worth_parsing(b"GET"));
        assert!(!scan.worth_parsing(b"GET /b"));
        assert!(scan.worth_parsing(b"GET /b HTTP/1.1\r\n"));
        // Fewer bytes than last time (a head split off without a reset): looked at afresh.
        assert!(scan.worth_parsing(b"\n"));
    }

    /// Empty lines before a request line are dropped as they arrive: a run of CRLFs sent in
    /// small segments costs parse work in proportion to its length. Kept in the buffer, each
    /// segment's line feed made the parse skip every one received so far again (quadratic: 7 s
    /// of a core for 14 KB sent, with a 1 MiB `max_header_bytes`).
    #[test]
    fn empty_lines_before_a_request_cost_parse_work_in_proportion_to_their_bytes() {
        let mut scan = HeadScan::default();
        let mut buf = BytesMut::new();
        // Bytes handed to the parse in all.
        let mut parsed = 0;
        let mut feed = |buf: &mut BytesMut, bytes: &[u8]| {
            buf.extend_from_slice(bytes);
            if scan.request_ready(buf) {
                parsed += buf.len();
                return parse_request(buf, 64);
            }
            Ok(None)
        };
        let blank = 16 * 1024;
        for _ in 0..blank / 4 {
            // In 2-byte segments, and split inside a CRLF too.
            for segment in [&b"\r\n"[..], b"\r", b"\n"] {
                assert!(matches!(feed(&mut buf, segment), Ok(None)));
            }
        }
        let kept = buf.len();
        let r = feed(&mut buf, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = r.ok().flatten().expect("the head after the empty lines");
        assert_eq!((r.path(), buf.is_empty()), ("/a", true));
        let head = 28;
        assert!(parsed <= blank + head, "{parsed} bytes parsed for {blank} bytes of empty lines");
        assert_eq!(kept, 0, "empty lines kept");
        // A bare LF is an empty line too, as httparse takes it; a CR followed by anything but
        // its LF is still refused.
        let mut buf = BytesMut::from(&b"\n\r\n\nGET /b HTTP/1.1\r\n\r\n"[..]);
        let mut scan = HeadScan::default();
        assert!(scan.request_ready(&mut buf));
        assert_eq!(parse_request(&mut buf, 64).ok().flatten().expect("parsed").path(), "/b");
        let mut buf = BytesMut::from(&b"\r\n\rGET /c HTTP/1.1\r\n\r\n"[..]);
        let mut scan = HeadScan::default();
        assert!(scan.request_ready(&mut buf));
        assert!(matches!(parse_request(&mut buf, 64), Err(HeadError::Bad)));
    }

    #[test]
    fn header_limits_above_the_stack_slots_are_kept_exactly() {
        let head = |n: usize| {
            let many: String = (0..n).map(|i| format!("X-{i}: v\r\n")).collect();
            BytesMut::from(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes())
        };
        for (headers, max, ok) in
            [(20, 21, true), (20, 20, false), (79, 100, true), (99, 100, true)]
        {
            let parsed = parse_request(&mut head(headers), max);
            match parsed {
                Ok(Some(r)) if ok => assert_eq!(r.head.headers().count(), headers + 1),
                Err(HeadError::TooLarge) if !ok => {}
                _ => panic!("{headers} headers + Host, at most {max}: ok = {ok}"),
            }
        }
        assert!(matches!(parse_request(&mut head(100), 100), Err(HeadError::TooLarge)));
    }

    #[test]
    fn later_http1_minor_versions_parse_as_1_1_and_other_majors_are_refused() {
        let parse = |text: &str| parse_request(&mut BytesMut::from(text.as_bytes()), 64);
        let r = parse("GET /x HTTP/1.2\r\nHost: a\r\n\r\n").ok().flatten().expect("parsed");
        assert_eq!((r.path(), r.http10), ("/x", false));
        assert!(matches!(parse("GET /x HTTP/1.9"), Ok(None)), "an incomplete line waits");
        for text in ["GET / HTTP/2.0\r\n\r\n", "GET / HTTP/0.9\r\n\r\n", "PRI * HTTP/2.0\r\n"] {
            assert!(matches!(parse(text), Err(HeadError::Version)), "{text}");
        }
        for text in ["GET / HTTP/1.x\r\n\r\n", "GET / HTTP/1.10\r\n\r\n", "GET / HTTQ/1.2\r\n"] {
            assert!(matches!(parse(text), Err(HeadError::Bad)), "{text}");
        }
        // A space in the path makes httparse read the rest as the version: the line is
        // malformed (400), not of another version (505), even though it ends in `HTTP/1.1`.
        for text in
            ["GET /a b HTTP/1.1\r\n\r\n", "GET /a b HTTP/1.2\r\n\r\n", "GET /a b HTTP/2.0\r\n\r\n"]
        {
            assert!(matches!(parse(text), Err(HeadError::Bad)), "{text}");
        }
    }

    fn h(pairs: &[(&str, &str)]) -> Head {
        req(pairs).head
    }

    /// NTLM and Negotiate, in any case, bind a connection whether the answer challenges with
    /// them (among other challenges, in one header or several) or the request carries their
    /// credentials; other schemes, and auth-params or tokens that merely contain the names, do
    /// not.
    #[test]
    fn connection_bound_authentication_is_told_by_scheme() {
        let binds = |request: &[(&str, &str)], response: &[(&str, &str)]| {
            binds_connection(&h(request), &h(response))
        };
        let challenge = |v: &str| binds(&[], &[("WWW-Authenticate", v)]);
        let credentials = |v: &str| binds(&[("Authorization", v)], &[]);
        for v in
            ["NTLM", "Negotiate", "ntlm", "NEGOTIATE", "NTLM TlRMTVNTUAACAAAA", "Negotiate YII="]
        {
            assert!(challenge(v), "{v}");
        }
        for v in
            [r#"Basic realm="x", charset="UTF-8", NTLM"#, "Bearer, Negotiate", "Digest a=b,NTLM"]
        {
            assert!(challenge(v), "{v}");
        }
        assert!(binds(
            &[],
            &[("WWW-Authenticate", "Basic realm=\"x\""), ("www-authenticate", "NTLM")]
        ));
        for v in ["Basic realm=\"NTLM\"", "Bearer", "NTLMv2", "Negotiated", "realm=NTLM", ""] {
            assert!(!challenge(v), "{v}");
        }
        // Commas and scheme names inside quoted strings, or as an auth-param's name or value,
        // begin no challenge (RFC 9110 11.6.1).
        for v in [
            r#"Basic realm="a, NTLM""#,
            r#"Basic realm="Windows, NTLM or Kerberos""#,
            r#"Basic realm="a,Negotiate", charset="UTF-8""#,
            r#"Basic realm="a\", NTLM""#,
            r#"Basic realm="a\\\", NTLM", charset="x, negotiate""#,
            r#"Basic realm=Negotiate"#,
            r#"Basic realm="x", error=NTLM"#,
            r#"Bearer realm="x",NTLM = "y""#,
            r#"Basic realm="x", Negotiate= abc"#,
            r#"Digest realm="a, Negotiate YII=", nonce="b,NTLM""#,
            "Basic ,, realm=x,",
        ] {
            assert!(!challenge(v), "{v}");
        }
        // Past quoted strings (escaped quotes and backslashes included), the challenges after
        // them still bind, whatever their case, alone or with a token68 or auth-params.
        for v in [
            r#"Basic realm="x", NTLM"#,
            r#"Basic realm="a, b", Negotiate"#,
            r#"Basic realm="a\"b", ntlm"#,
            r#"Basic realm="a\\", NTLM"#,
            r#"Basic realm="a", NeGoTiAtE YIIGhgYGKwYBBQUCoII="#,
            r#"Bearer realm="x", error="a,b",NTLM TlRMTVNTUAACAAAA"#,
            r#"Basic realm="x", Negotiate realm="y, z""#,
            r#"Basic abc=, NTLM"#,
            "  NTLM  ",
        ] {
            assert!(challenge(v), "{v}");
        }
        // A quoted string left open is malformed: read as before, a challenge it hides binds.
        assert!(challenge(r#"Basic realm="a\", NTLM"#));
        assert!(challenge(r#"Basic realm="a, NTLM"#));
        for v in ["NTLM TlRMTVNTUAABAAAA", "Negotiate YIIGhgYGKwYBBQUCoII=", "ntlm x", "Negotiate"]
        {
            assert!(credentials(v), "{v}");
        }
        for v in ["Basic YWxpY2U6eA==", "Bearer NTLM", "NTLMx y"] {
            assert!(!credentials(v), "{v}");
        }
        assert!(!binds(&[("Proxy-Authorization", "NTLM x")], &[("X-Auth", "NTLM")]));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(body_framing(&h(&[]), true), Ok(Framing::None));
        assert_eq!(body_framing(&h(&[]), false), Ok(Framing::UntilClose));
        assert_eq!(body_framing(&h(&[("Content-Length", "10")]), true), Ok(Framing::Length(10)));
        assert_eq!(
            body_framing(&h(&[("Content-Length", "10, 10")]), true),
            Ok(Framing::Length(10))
        );
        assert_eq!(
            body_framing(&h(&[("Content-Length", "10"), ("content-length", "11")]), true),
            Err(())
        );
        // Requests: `chunked` alone. Responses: other codings may come first.
        assert_eq!(body_framing(&h(&[("Transfer-Encoding", "gzip, chunked")]), true), Err(()));
        assert_eq!(
            body_framing(&h(&[("Transfer-Encoding", "gzip, chunked")]), false),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            body_framing(
                &h(&[("Transfer-Encoding", "chunked,"), ("Transfer-Encoding", " ")]),
                true
            ),
            Ok(Framing::Chunked)
        );
        for bad in ["chunked, chunked", "ch unked", "chunked;q=1", "chunked, gzip", "xchunked"] {
            assert_eq!(body_framing(&h(&[("Transfer-Encoding", bad)]), true), Err(()), "{bad}");
            assert_eq!(
                body_framing(&h(&[("Transfer-Encoding", bad)]), false),
                Ok(Framing::UntilClose),
                "{bad}"
            );
        }
        assert_eq!(
            body_framing(
                &h(&[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")]),
                true
            ),
            Err(())
        );
        assert_eq!(
            body_framing(&h(&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")]), true),
            Err(())
        );
        assert_eq!(
            body_framing(&h(&[("Content-Length", "3"), ("Transfer-Encoding", "chunked")]), false),
            Ok(Framing::Chunked),
            "the coding overrides the length"
        );
        assert_eq!(body_framing(&h(&[("Content-Length", "x")]), true), Err(()));
        // 1*DIGIT only: a sign or inner space is another parser's number (smuggling).
        for bad in ["+3", "-0", "3 3", "0x3", ""] {
            assert_eq!(body_framing(&h(&[("Content-Length", bad)]), true), Err(()), "{bad:?}");
        }
        assert_eq!(
            body_framing(&h(&[("Content-Length", "+3"), ("Content-Length", "3")]), true),
            Err(())
        );
        assert_eq!(
            body_framing(&h(&[("Content-Length", "99999999999999999999999")]), true),
            Err(())
        );
        // Underscore spellings of the framing headers: an ambiguous request, whatever else it
        // says; in a response, ignored (clients do not read `_` as `-`).
        for pairs in [
            &[("Transfer_Encoding", "chunked")][..],
            &[("Content-Length", "3"), ("content_length", "5")],
            &[("Transfer-Encoding", "chunked"), ("CONTENT_LENGTH", "0")],
            &[("Transfer_encoding", "identity")],
        ] {
            assert_eq!(body_framing(&h(pairs), true), Err(()), "{pairs:?}");
        }
        assert_eq!(body_framing(&h(&[("Content_Length", "5")]), false), Ok(Framing::UntilClose));
        assert_eq!(body_framing(&h(&[("Content_Type", "a")]), true), Ok(Framing::None));
    }

    /// The head sent to the backend for `r` (client 198.18.4.1:5000 on VIP 198.18.1.6:80).
    fn forward(r: &ReqHead, framing: Framing, forwarded_for: bool) -> String {
        let t = target(r, true).expect("a valid target");
        let (peer, listen) = ("198.18.4.1:5000".parse().unwrap(), "198.18.1.6:80".parse().unwrap());
        let client = ForwardedClient::new(peer);
        String::from_utf8(
            upstream_head(r, &t, listen, framing, None, forwarded_for.then_some(&client), true)
                .to_vec(),
        )
        .unwrap()
    }

    #[test]
    fn targets_and_hosts_are_checked_and_one_host_reaches_the_backend() {
        let host = |line: &str, pairs: &[(&str, &str)]| {
            let r = req_line(line, pairs);
            target(&r, true).map(|t| {
                (t.host.map(|h| String::from_utf8_lossy(h).into_owned()), t.path.into_owned())
            })
        };
        let some = |h: &str, p: &str| Some((Some(h.to_owned()), p.to_owned()));
        assert_eq!(
            host("GET /a HTTP/1.1", &[("Host", "a.example:8080")]),
            some("a.example:8080", "/a")
        );
        assert_eq!(host("OPTIONS * HTTP/1.1", &[("Host", "a")]), some("a", "*"));
        assert_eq!(host("GET / HTTP/1.0", &[]), Some((None, "/".to_owned())));
        // Absolute form: the authority is the host, whatever Host says.
        assert_eq!(
            host("GET http://b.example/x?y HTTP/1.1", &[("Host", "a.example")]),
            some("b.example", "/x?y")
        );
        assert_eq!(
            host("GET HTTPS://[2001:db8::1]:8443 HTTP/1.1", &[("Host", "a")]),
            some("[2001:db8::1]:8443", "/")
        );
        assert_eq!(host("GET http://b.example/x HTTP/1.0", &[]), some("b.example", "/x"));
        // OPTIONS for a bare authority goes on in asterisk form (RFC 9112 3.2.4); with a path,
        // as that path.
        assert_eq!(
            host("OPTIONS http://b.example HTTP/1.1", &[("Host", "a")]),
            some("b.example", "*")
        );
        assert_eq!(
            host("OPTIONS http://b.example/ HTTP/1.1", &[("Host", "a")]),
            some("b.example", "/")
        );
        // Refused: no Host in HTTP/1.1 (an absolute-form target or not), two, invalid ones,
        // user information, other forms.
        for (line, pairs) in [
            ("GET / HTTP/1.1", &[][..]),
            ("GET http://b.example/ HTTP/1.1", &[][..]),
            ("OPTIONS http://b.example HTTP/1.1", &[][..]),
            ("GET http://b.example/ HTTP/1.1", &[("Host", "a"), ("Host", "b")][..]),
            ("GET / HTTP/1.1", &[("Host", "a"), ("Host", "b")][..]),
            ("GET / HTTP/1.1", &[("Host", "a"), ("host", "a")][..]),
            ("GET / HTTP/1.1", &[("Host", "")][..]),
            ("GET / HTTP/1.1", &[("Host", "a b")][..]),
            ("GET / HTTP/1.1", &[("Host", "a/b")][..]),
            ("GET / HTTP/1.1", &[("Host", "user@a")][..]),
            ("GET http://user@b/ HTTP/1.1", &[("Host", "b")][..]),
            ("GET http:///x HTTP/1.1", &[("Host", "b")][..]),
            ("GET http://b?q HTTP/1.1", &[("Host", "b")][..]),
            ("GET ftp://b/ HTTP/1.1", &[("Host", "b")][..]),
            ("GET x HTTP/1.1", &[("Host", "b")][..]),
            ("GET * HTTP/1.1", &[("Host", "b")][..]),
        ] {
            assert!(host(line, pairs).is_none(), "{line} {pairs:?}");
        }
        // The backend gets the origin form and exactly one Host.
        let r = req_line(
            "GET http://b.example/x HTTP/1.1",
            &[("Host", "a.example"), ("Accept", "*/*")],
        );
        let out = forward(&r, Framing::None, false);
        assert!(out.starts_with("GET /x HTTP/1.1\r\nHost: b.example\r\nAccept: */*\r\n"), "{out}");
        assert_eq!(out.matches("Host:").count(), 1, "{out}");
        let r = req_line("OPTIONS http://b.example HTTP/1.1", &[("Host", "a.example")]);
        let out = forward(&r, Framing::None, false);
        assert!(out.starts_with("OPTIONS * HTTP/1.1\r\nHost: b.example\r\n"), "{out}");
        // HTTP/1.0 without Host: the address the client connected to.
        let out = forward(&req_line("GET / HTTP/1.0", &[]), Framing::None, false);
        assert!(out.starts_with("GET / HTTP/1.1\r\nHost: 198.18.1.6:80\r\n"), "{out}");
    }

    /// Max-Forwards counts down on OPTIONS only (RFC 9110 7.6.2): one number, decremented on
    /// its way to the backend; anything else about it is refused; other methods' go on as sent.
    #[test]
    fn max_forwards_counts_down_on_options_only() {
        let hops = |line: &str, value: &[&str]| {
            let mut pairs = vec![("Host", "a")];
            pairs.extend(value.iter().map(|v| ("Max-Forwards", *v)));
            max_forwards(&req_line(line, &pairs))
        };
        assert_eq!(hops("OPTIONS * HTTP/1.1", &[]), Ok(None));
        assert_eq!(hops("OPTIONS * HTTP/1.1", &["0"]), Ok(Some(0)));
        assert_eq!(hops("OPTIONS /x HTTP/1.1", &[" 07 "]), Ok(Some(7)));
        assert_eq!(hops("OPTIONS * HTTP/1.1", &["99999999999999999999999"]), Ok(Some(u64::MAX)));
        for bad in [&[""][..], &["x"], &["-1"], &["+1"], &["1, 2"], &["1 2"], &["1", "1"]] {
            assert_eq!(hops("OPTIONS * HTTP/1.1", bad), Err(()), "{bad:?}");
        }
        assert_eq!(hops("GET / HTTP/1.1", &["x"]), Ok(None));
        assert_eq!(hops("GET / HTTP/1.1", &["0"]), Ok(None));
        let r = req_line(
            "OPTIONS /x HTTP/1.1",
            &[("Host", "a"), ("Max-Forwards", "5"), ("Max_Forwards", "0")],
        );
        let out = forward(&r, Framing::None, false);
        assert!(out.contains("\r\nMax-Forwards: 4\r\n"), "{out}");
        assert_eq!(out.to_ascii_lowercase().matches("max").count(), 1, "{out}");
        let r = req_line("GET /x HTTP/1.1", &[("Host", "a"), ("Max-Forwards", "5")]);
        let out = forward(&r, Framing::None, false);
        assert!(out.contains("\r\nMax-Forwards: 5\r\n"), "{out}");
    }

    #[test]
    fn forwarded_requests_carry_one_content_length() {
        let fwd = |pairs: &[(&str, &str)]| {
            let r = req(pairs);
            let framing = body_framing(&r.head, true).unwrap();
            forward(&r, framing, false)
        };
        let out = fwd(&[("Host", "x"), ("Content-Length", "3"), ("content-length", "3, 3")]);
        assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
        assert!(out.contains("\r\nContent-Length: 3\r\n"), "{out}");
        let out = fwd(&[("Host", "x"), ("Content-Length", "0")]);
        assert!(out.contains("\r\nContent-Length: 0\r\n"), "{out}");
        let out = fwd(&[("Host", "x")]);
        assert!(!out.to_ascii_lowercase().contains("content-length"), "{out}");
        let out = fwd(&[("Host", "x"), ("Transfer-Encoding", "chunked")]);
        assert!(!out.to_ascii_lowercase().contains("content-length"), "{out}");
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        // One clean header whatever the client's spelling.
        let out =
            fwd(&[("Host", "x"), ("Transfer-Encoding", "chunked,"), ("transfer-encoding", " ")]);
        assert!(out.contains("\r\nTransfer-Encoding: chunked\r\n"), "{out}");
        assert_eq!(out.to_ascii_lowercase().matches("transfer-encoding").count(), 1, "{out}");
        // Codings the proxy does not decode go on as listed (responses may carry them).
        let mut buf = Vec::new();
        transfer_encoding(
            &mut buf,
            &h(&[("Transfer-Encoding", "gzip,"), ("Transfer-Encoding", "chunked")]),
        );
        assert_eq!(buf, b"Transfer-Encoding: gzip, chunked\r\n");
        let mut buf = Vec::new();
        content_length(&mut buf, Framing::Length(1_234_567), None);
        assert_eq!(buf, b"Content-Length: 1234567\r\n");
    }

    #[test]
    fn upgrades_to_http2_are_not_relayed() {
        let up = |value: &str| {
            let r = req(&[("Host", "x"), ("Connection", "upgrade"), ("Upgrade", value)]);
            upgrade_of(&r, Framing::None).map(|p| String::from_utf8_lossy(p).into_owned())
        };
        assert_eq!(up("websocket").as_deref(), Some("websocket"));
        assert_eq!(up("h2cx, foo/2").as_deref(), Some("h2cx, foo/2"));
        for value in ["h2c", "H2C", "websocket, h2c", "h2", "HTTP/2.0", "http/2", "h2c/1"] {
            assert_eq!(up(value), None, "{value}");
        }
        let r = req(&[
            ("Host", "x"),
            ("Connection", "upgrade"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMA"),
            ("http2_settings", "AAMA"),
        ]);
        let out = forward(&r, Framing::None, false).to_ascii_lowercase();
        assert!(!out.contains("upgrade") && !out.contains("settings"), "{out}");
    }

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_dropped() {
        let req = req(&[
            ("Host", "x"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("Accept", "*/*"),
        ]);
        let out = forward(&req, Framing::None, true);
        assert!(out.starts_with("GET /a HTTP/1.1\r\nHost: x\r\n"), "{out}");
        assert!(!out.contains("X-Secret") && !out.contains("Keep-Alive"), "{out}");
        assert!(out.contains("X-Forwarded-For: 203.0.113.9, 198.18.4.1\r\n"), "{out}");
        assert!(out.contains("Forwarded: for=198.18.4.1;proto=http\r\n"), "{out}");
        assert!(out.ends_with("Accept: */*\r\nX-Forwarded-For: 203.0.113.9, 198.18.4.1\r\nX-Forwarded-Proto: http\r\nForwarded: for=198.18.4.1;proto=http\r\nConnection: keep-alive\r\n\r\n"), "{out}");
        // The Host the proxy routed by reaches the backend, whatever Connection lists.
        let out = forward(
            &req_line("GET / HTTP/1.1", &[("Host", "x"), ("Connection", "host")]),
            Framing::None,
            false,
        );
        assert!(out.contains("\r\nHost: x\r\n"), "{out}");
        // However many tokens, in any case, over several headers: the headers they name go,
        // the options are read, and the others stay.
        let many: String = (0..50).map(|i| format!("T-{i}, ")).collect();
        let r = req_line(
            "GET / HTTP/1.1",
            &[
                ("Host", "x"),
                ("Connection", &format!("{many}X-SECRET, close")),
                ("x-secret", "1"),
                ("Connection", "Close, x-other, HOST"),
                ("Close", "1"),
                ("X-Other", "1"),
                ("X-Kept", "1"),
                ("X-secret", "2"),
                ("T-49", "1"),
            ],
        );
        let o = &r.head.connection;
        assert!(o.close && !o.keep_alive && !o.upgrade);
        let out = forward(&r, Framing::None, false);
        assert!(
            out.contains("\r\nHost: x\r\nX-Kept: 1\r\nConnection: keep-alive\r\n\r\n"),
            "{out}"
        );
        for gone in ["secret", "Close", "Other", "T-49"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        // A few tokens (kept at hand, no table), naming no header: nothing is marked.
        let r = req_line(
            "GET / HTTP/1.1",
            &[("Host", "x"), ("Connection", "Upgrade, keep-alive, x-none"), ("Upgrade", "ws")],
        );
        let o = &r.head.connection;
        assert!(o.upgrade && o.keep_alive && !o.close && o.named.is_empty());
    }

    #[test]
    fn forwarded_values_are_checked_against_rfc_7239() {
        for ok in [
            "for=192.0.2.60;proto=http;by=203.0.113.43",
            "For=\"[2001:db8:cafe::17]:4711\"",
            "for=192.0.2.43, for=198.51.100.17",
            "for=192.0.2.43 ,\tfor=_hidden ",
            "for=\"_gazonk\"",
            "for=\"a\\\"b\"",
            "for=\"x\\\\\"",
            "for=a;",
            ";for=a",
            "for=a,,for=b",
            "for=a,",
            "for=\"\"",
        ] {
            assert!(valid_forwarded(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            " ",
            ",",
            ";",
            "for=\"6.6.6.6",
            "for=\"6.6.6.6\\\"",
            "for=\"a\"b",
            "for=a b",
            "for=a; proto=http",
            "for =a",
            "for= a",
            "for=",
            "for",
            "=a",
            "for=[::1]",
            "for=a\"",
            "for=\"a\u{7f}\"",
        ] {
            assert!(!valid_forwarded(bad.as_bytes()), "{bad:?}");
        }
        // Left out of what the backend gets; valid ones are kept in order.
        let r = req(&[
            ("Host", "x"),
            ("Forwarded", "for=192.0.2.1"),
            ("Forwarded", "for=\"6.6.6.6"),
            ("Forwarded", "for=192.0.2.2;proto=https"),
        ]);
        let out = forward(&r, Framing::None, true);
        assert!(
            out.contains(
                "\r\nForwarded: for=192.0.2.1, for=192.0.2.2;proto=https, for=198.18.4.1;proto=http\r\n"
            ),
            "{out}"
        );
        assert!(!out.contains("6.6.6.6"), "{out}");
    }

    /// The pool lets go of connections past their time: `put` trims them from the front of
    /// their backend's list, a sweep closes the rest and forgets the backend, and each one
    /// dropped is closed (its peer reads the end of the stream).
    #[test]
    fn the_pool_closes_connections_past_their_time() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let closed = |peer: &mut std::net::TcpStream| {
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            matches!(peer.read(&mut [0u8; 1]), Ok(0))
        };
        tokio_uring::start(async {
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
        tokio_uring::start(async {
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
            let closed = |peer: &mut std::net::TcpStream| {
                peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut rest = Vec::new();
                peer.read_to_end(&mut rest).is_ok()
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
        tokio_uring::start(async {
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
        tokio_uring::start(async {
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

    #[test]
    fn proxy_protocol_headers() {
        let v1 =
            proxy_header(1, "198.18.4.1:5000".parse().unwrap(), "198.18.1.6:80".parse().unwrap());
        assert_eq!(v1, b"PROXY TCP4 198.18.4.1 198.18.1.6 5000 80\r\n");
        let v2 =
            proxy_header(2, "198.18.4.1:5000".parse().unwrap(), "198.18.1.6:80".parse().unwrap());
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&v2[16..20], &[198, 18, 4, 1]);
        assert_eq!(&v2[24..28], &[0x13, 0x88, 0, 80]);
        assert_eq!(proxy_header_local(1), b"PROXY UNKNOWN\r\n");
        assert_eq!(proxy_header_local(2), b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    }
}
