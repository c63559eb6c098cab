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
//!
//! This module is the connection loop; beside it, modules of their own: parsing and reading
//! message heads (`head`), the target and the head a backend gets (`forward`), and the idle
//! backend connections (`upstream_pool`).

mod forward;
mod head;
mod upstream_pool;

use std::{
    cell::Cell,
    fmt::Write as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::Poll,
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::time::{Sleep, timeout_at};
use tokio_uring::buf::IoBuf;

use super::{
    Failure, Shared, VipRuntime,
    balance::{InFlight, Pool},
    chunked::Chunked,
    client_ip,
    proxy_protocol::proxy_header,
    reuse::Idle as IdleClients,
    uring::{Armed, Socket},
};
use crate::config::Algorithm;
use forward::{ForwardedClient, target, upstream_head};
pub(crate) use head::is_tchar;
pub use head::parse_request_for_bench;
use head::{
    Framing, Head, HeadError, HeadScan, ReqHead, RespHead, binds_connection, body_framing,
    content_length, declared_length, header, max_forwards, parse_request, parse_response,
    status_and_headers, tokens, transfer_encoding,
};
pub(super) use upstream_pool::UpstreamPool;
use upstream_pool::{Bound, Idle, Private, close, close_after_backend};

/// Read size.
const READ_CHUNK: usize = 4 * 1024;
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

/// Reads more bytes into `buf` (appending); Ok(0) at end of stream. Once the parts split off
/// `buf` earlier (heads, body chunks) are dropped, the receive's `reserve` takes their room back,
/// so a connection keeps re-using one allocation.
async fn read_more(s: &Socket, buf: &mut BytesMut) -> io::Result<usize> {
    let (r, b) = s.recv(std::mem::take(buf), READ_CHUNK).await;
    *buf = b;
    r
}

/// A wait that ran out ([`within`]).
struct TimedOut;

/// `work`, unless `timer`, moved to `deadline`, runs out first: [`timeout_at`] on a timer kept
/// for a connection's many waits (one per direction) rather than one made for each, which
/// took the runtime's timer lock to register and again to cancel, twice a request. Moved later
/// (the usual case, from one request to the next), a registered timer takes no lock
/// (`Sleep::reset`). `work` is polled first, as `timeout_at` polls it.
fn within<F: Future>(
    mut timer: Pin<&mut Sleep>,
    deadline: tokio::time::Instant,
    work: F,
) -> Within<'_, F> {
    timer.as_mut().reset(deadline);
    Within { timer, work }
}

pin_project_lite::pin_project! {
    /// A wait of [`within`]: a future of its own, not an `async fn` that pins its argument,
    /// which would hold `work` twice (the argument, and the pinned copy), and copy both each
    /// time it is made and moved into its caller's future: the response head's wait, made
    /// once a request, was some 3 KiB instead of 1.5.
    struct Within<'t, F> {
        timer: Pin<&'t mut Sleep>,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.work.poll(cx) {
            Poll::Ready(r) => Poll::Ready(Ok(r)),
            Poll::Pending => this.timer.as_mut().poll(cx).map(|()| Err(TimedOut)),
        }
    }
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

/// Counts a request answered with `status` (in `edgelb_l7_requests_total`), and its latency
/// since `started` (the complete head) in `edgelb_l7_request_duration_seconds` when it has one
/// (an answer to a head that never came whole has none), and, with the VIP's `access_log`,
/// logs it: client, method and target (when the head parsed), status, backend (when one was
/// tried), milliseconds since `started`, and who cut the response's body short after its head
/// went out (`cut`, `-` for a whole response). The one place both are counted: the proxy's own
/// answers (a 504 at the response timeout, a 502, a 400) were left out of the histogram.
fn finished(
    vip: &VipRuntime,
    peer: SocketAddr,
    status: u16,
    req: Option<&ReqHead>,
    backend: Option<SocketAddr>,
    started: Option<Instant>,
    cut: Option<Cut>,
) {
    finished_cut(vip, peer, status, req, backend, started, None, cut, None);
}

/// [`finished`], with who ended the rest of a request body that went on beside an early 2xx
/// and did not go through (`cut_body`, `-` otherwise): for a response streamed after a
/// backend's head, whose `end` the caller read already (for its latency: the log's
/// milliseconds then need no clock read of their own). One access-log line shape for every
/// request.
#[allow(clippy::too_many_arguments)]
fn finished_cut(
    vip: &VipRuntime,
    peer: SocketAddr,
    status: u16,
    req: Option<&ReqHead>,
    backend: Option<SocketAddr>,
    started: Option<Instant>,
    end: Option<Instant>,
    cut: Option<Cut>,
    cut_body: Option<Cut>,
) {
    vip.count(status);
    let took = started.map(|s| end.map_or_else(|| s.elapsed(), |e| e.saturating_duration_since(s)));
    if let Some(took) = took {
        vip.duration.observe(took);
    }
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
            backend = %OrDash(backend),
            ms = took.map_or(0.0, millis),
            cut = %cut.map_or("-", Cut::as_str),
            cut_body = %cut_body.map_or("-", Cut::as_str),
            "request"
        );
    }
}

/// A latency in milliseconds as the access log writes it: to the microsecond, so that both log
/// formats (each writes a float as the shortest text that reads back as it) print at most 3
/// decimals, `1.626`, and a number in JSON still. `as_secs_f64() * 1000.0` printed float noise,
/// `1.6260109999999999`. Whole microseconds over 1000 are the float nearest to the 3-decimal
/// value (the division is exact to the last bit).
fn millis(took: Duration) -> f64 {
    // Exact up to 2^53 µs (285 years).
    took.as_micros() as f64 / 1000.0
}

/// An address as the access log writes it, `-` for none: written straight into the formatter,
/// without a `String` made for each line.
struct OrDash(Option<SocketAddr>);

impl std::fmt::Display for OrDash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The most the access log writes of a client-sent field (method, target), in bytes as written,
/// after escaping ([`Escaped`]): a longer one is cut there and marked `...(NB)`, N its whole
/// length as received. A 16 KiB target of non-ASCII bytes made a 47 KiB line, and
/// `max_header_bytes` at its largest some 3 MiB: lines a log pipeline truncates or refuses,
/// that fill the log's queue and its reader's rate limit.
pub const ACCESS_LOG_FIELD_MAX: usize = 1024;

/// A client-sent field as the access log writes it: each byte outside visible ASCII
/// (0x21-0x7E) as `%XX`, so that a client cannot put a control (a C1 CSI, which a terminal
/// showing the log obeys), a line separator (U+2028) or anything else invisible into a log line;
/// cut at [`ACCESS_LOG_FIELD_MAX`] bytes (never inside a `%XX`). Written straight into the
/// formatter: nothing is allocated, and a short field with nothing to escape (the common case)
/// is one write.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        // What is left of the field's bytes; then the rest is cut.
        let mut room = ACCESS_LOG_FIELD_MAX;
        let cut = |f: &mut std::fmt::Formatter<'_>, last: &str| {
            f.write_str(last)?;
            write!(f, "...({}B)", s.len())
        };
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if !c.is_ascii_graphic() {
                // `s[start..i]` is visible ASCII: cut anywhere in it.
                if i - start > room {
                    return cut(f, &s[start..start + room]);
                }
                f.write_str(&s[start..i])?;
                room -= i - start;
                if 3 * c.len_utf8() > room {
                    return cut(f, "");
                }
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    write!(f, "%{b:02X}")?;
                }
                room -= 3 * c.len_utf8();
                start = i + c.len_utf8();
            }
        }
        if s.len() - start > room {
            return cut(f, &s[start..start + room]);
        }
        f.write_str(&s[start..])
    }
}

/// Refuses a request with `status` (counted and logged as [`finished`], from `started`, the
/// complete head, when it came whole) and closes. The close lingers ([`linger`]) when the
/// client may still be sending: the rest of a head too large to read (431) or malformed (400,
/// 505: its body, say, which may still be on its way when the head is found wrong), the body of
/// one read whole, or anything still unread behind a head that came too slowly (408). Closing
/// at once would reset the connection under the bytes still arriving, and the client would see
/// "connection reset" instead of the answer (a browser with oversized cookies, an upload
/// refused).
async fn reject(
    client: &Socket,
    vip: &VipRuntime,
    peer: SocketAddr,
    status: u16,
    req: Option<&ReqHead>,
    started: Option<Instant>,
) {
    finished(vip, peer, status, req, None, started, None);
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
///
/// Every caller has sent its whole answer (or relayed stream) by then, so the close has begun
/// ([`Socket::begin_close`]): a stop's drain deadline hands the connection to the kernel, which
/// delivers the rest of the answer to a slow reader, rather than resetting it (what the client
/// sent meanwhile is read and dropped first, so that the close is a FIN). The linger looks at
/// the bytes the client acknowledges as it begins, then [`LINGER_FIRST_LOOK`] later and at
/// doubling intervals ([`Socket::look_lingering`]), so that such a handover gives a client
/// seen reading the reader's timeout, not the stall time alone, which cut a slow reader of a
/// large answer after the process exited.
pub(super) async fn linger(client: &Socket, idle: Duration) {
    client.begin_close();
    client.look_lingering();
    let _ = client.shutdown(std::net::Shutdown::Write);
    let end = tokio::time::Instant::now() + LINGER.min(idle);
    let looks = async {
        let mut every = LINGER_FIRST_LOOK;
        loop {
            tokio::time::sleep(every).await;
            client.look_lingering();
            every = (every * 2).min(LINGER_LOOKS_AT_MOST);
        }
    };
    // On the timeout the read stays pending until the socket is shut down, as `serve` does
    // next.
    let _ = timeout_at(end, async {
        tokio::select! {
            () = discard(client) => {}
            () = looks => {}
        }
    })
    .await;
}

/// How long after a lingering close begins it first looks at the bytes its client
/// acknowledged since ([`linger`]): after the round trip or two in which a client that reads
/// nothing may still take what room its window had, so that only a client reading takes more
/// at two looks.
const LINGER_FIRST_LOOK: Duration = Duration::from_millis(100);

/// The longest interval between a lingering close's looks at its client ([`linger`]): a few
/// looks over [`LINGER`], each a getsockopt, on a close that is rare.
const LINGER_LOOKS_AT_MOST: Duration = Duration::from_secs(1);

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

/// Over the connection limit, an HTTP VIP answers 503 (counted and logged as [`finished`], with
/// no latency: it is refused before it is served; a TCP-mode VIP's refusal is `tcp::refuse`).
/// When `graceful` (a place among the proxy's lingering refusals was free), the request head is
/// read first, for at most [`REFUSE_WAIT`] and [`READ_CHUNK`] bytes: the answer to a HEAD
/// request has no content, and the refusal is logged with the request it refused. The close
/// then lingers, for [`REFUSE_WAIT`] at most: the request was read no further, and closing with
/// it unread would reset the connection under the 503 (and cost a client that is still sending
/// an upload the answer). Otherwise (a flood) the 503 goes at once. The caller shuts the socket
/// down after.
pub async fn refuse(s: &Socket, vip: &VipRuntime, peer: SocketAddr, graceful: bool) {
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

    /// [`IdleClock::read`] for [`stream_body`]: whether `src` closed (end of stream), or which
    /// side's failure ended the read ([`Side::Src`] for a reset or a failed read,
    /// [`Side::Timeout`] when the idle timeout or `deadline` passed first).
    async fn read_body(
        &self,
        src: &Socket,
        pending: &mut BytesMut,
        deadline: tokio::time::Instant,
    ) -> Result<bool, Side> {
        match self.read(src, pending, deadline).await {
            Some(Ok(n)) => Ok(n == 0),
            Some(Err(_)) => Err(Side::Src),
            None => Err(Side::Timeout),
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
            if clock.read_body(src, pending, deadline).await? {
                return Err(Side::Closed);
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
                if clock.read_body(src, pending, deadline).await? {
                    return Err(Side::Closed);
                }
            }
        }
        Framing::UntilClose => loop {
            if !pending.is_empty() {
                write(dst, pending.split().freeze()).await.map_err(|_| Side::Dst)?;
            }
            if clock.read_body(src, pending, deadline).await? {
                return Ok(());
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

/// Logs a response head over the limits ([`Attempt::TooLarge`]) of VIP `vip`, at most once
/// every 10 s for the VIP ([`super::VipLines`]; it was the whole process's, and one VIP's line
/// hid another's): an endpoint that always answers so would log a line per request. Every one
/// is counted among the 5xx answers, and by backend in
/// `edgelb_l7_response_heads_too_large_total` (which tells it from other 502s), and, with
/// `access_log`, logged as its 502.
fn say_head_too_large(vip: &VipRuntime, backend: SocketAddr) {
    if vip.said.head_too_large.ready() {
        tracing::warn!(
            vip = vip.name,
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

impl Attempt {
    /// The backend's failure this was, as passive health is told it; `None` for what is not
    /// the backend's doing (this node's, the client's, an answer too large for the proxy).
    fn failure(&self) -> Option<Failure> {
        match self {
            Attempt::Connect => Some(Failure::Connect),
            Attempt::Timeout => Some(Failure::Timeout),
            Attempt::Deadline | Attempt::Squeezed => Some(Failure::Deadline),
            Attempt::Broken => Some(Failure::Broken),
            Attempt::Local
            | Attempt::TooLarge
            | Attempt::ClientGone
            | Attempt::ClientBad
            | Attempt::ClientTimeout => None,
        }
    }
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
    // the socket down completes it, so the connection really closes. Not before the client has
    // what the kernel still holds for it (the end of a `Connection: close` answer), or took
    // none of it for the idle timeout: closed at once, the kernel would keep the socket for
    // minutes for a client that reads nothing, uncounted.
    client.close_when_delivered().await;
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
    // The buffer request heads for backends are written in: its room comes back once the head
    // of the request before is dropped.
    let mut uhead = BytesMut::new();
    let mut tried: Vec<usize> = Vec::new();
    let mut forwarded: Option<ForwardedClient> = None;
    // This client connection's private backend connection, between its requests (closed when
    // it is dropped, with the client connection's end).
    let mut private = Private::default();
    let mut first = true;
    // The generation of the snapshot `vip` was last looked up in (`Shared::generation`).
    let mut seen = None;
    // When the wait for the next request head starts: now, and then when the answer to the
    // request before ended (`end`, read for its latency anyway: clock reads showed up in
    // profiles), for a keep-alive connection.
    let mut waiting = tokio::time::Instant::now();
    // The timers of the connection's waits ([`within`]): for the client's request heads, and
    // for the backends' response heads.
    let mut head_timer = std::pin::pin!(tokio::time::sleep_until(waiting));
    let mut answer_timer = std::pin::pin!(tokio::time::sleep_until(waiting));
    loop {
        let cfg = &vip.cfg;
        // 1. Request head, within the header timeout (idle timeout while waiting for a
        // keep-alive request to start; the header timeout then runs from its first bytes).
        // One clock read for both deadlines of the wait.
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
                    return reject(client, &vip, peer, 431, None, None).await;
                }
                Ok(None) if started_late => {
                    head_deadline = tokio::time::Instant::now() + cfg.header_timeout;
                }
                Ok(None) => {}
                Err(HeadError::TooLarge) => {
                    return reject(client, &vip, peer, 431, None, None).await;
                }
                Err(HeadError::Bad) => return reject(client, &vip, peer, 400, None, None).await,
                Err(HeadError::Version) => {
                    return reject(client, &vip, peer, 505, None, None).await;
                }
            }
            let waiting_for_start = buf.is_empty() && !first;
            let deadline = if waiting_for_start { idle_deadline } else { head_deadline };
            // A cancelled read loses its buffer (tokio-uring owns it until the kernel is done),
            // so decide now what a timeout means.
            let partial = !buf.is_empty();
            // Stopping closes a keep-alive connection idle between requests (as nginx and
            // HAProxy do), but not one just accepted: its client has sent, or is sending, a
            // request that nobody else will answer, so it is read and served (with `close`).
            // The stop's accept loops close this thread's idle ones (`Idle::close_all`), as a
            // new connection over `max_connections` does one (`super::reuse`): that shuts the
            // socket down, and the read ends with the end of the stream (or, had it completed
            // with a request before, the request is not served: `Waiting::finish`). One that
            // goes idle after that sees the stop here. A takeover's drain keeps them instead
            // (`super::DrainKind::Takeover`): the next request is read and served with
            // `close`, like one just accepted, and one going idle now (its answer said
            // keep-alive before the drain began) waits as well.
            let closable = waiting_for_start.then(|| idle.waiting(client));
            if closable.is_some() && shared.closes_idle() {
                return;
            }
            let read = within(head_timer.as_mut(), deadline, read_more(client, &mut buf));
            // Idle at the drain's deadline (kept by a takeover's drain): closed as the idle
            // timeout closes it, not reset as a connection cut in the middle of an exchange
            // (`accept_loop`), which would pass for a failure. Polled before that reset.
            let read = if closable.is_some() {
                tokio::select! {
                    biased;
                    () = super::wait_forced_seen(&shared) => return,
                    read = read => read,
                }
            } else {
                read.await
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
                Err(_) => return reject(client, &vip, peer, 408, None, None).await,
            }
        };
        first = false;
        // The newest pools for every request, taken once its head is in: a keep-alive
        // connection may have waited up to the idle timeout for it, and a drain, a backend
        // found dead or a reload meanwhile must count for it. Looked up only when a snapshot
        // was published since the last look (its generation, read first: a snapshot published
        // in between is looked up again at the next request), not for every request (a load,
        // a lookup by name and two reference counts).
        let generation = shared.generation.load(Ordering::Acquire);
        if seen != Some(generation) {
            seen = Some(generation);
            if let Some(v) = shared.snapshot.load().vips.get(&vip.name) {
                vip = v.clone();
            }
        }
        let cfg = &vip.cfg;
        // A reload may have changed the idle timeout since the connection was accepted.
        client.keep_stall(cfg.idle_timeout);
        // Latency counts from a complete request head: not the keep-alive wait before it.
        let started = Instant::now();
        if req.head.bytes.len() > cfg.max_header_bytes {
            return reject(client, &vip, peer, 431, Some(&req), Some(started)).await;
        }
        // Transfer-Encoding in an HTTP/1.0 message means faulty framing (RFC 9112 6.1).
        let te10 = req.http10 && header(&req.head, "transfer-encoding").next().is_some();
        let Some(framing) = body_framing(&req.head, true).ok().filter(|_| !te10) else {
            return reject(client, &vip, peer, 400, Some(&req), Some(started)).await;
        };
        let client_keepalive =
            if req.http10 { req.head.connection.keep_alive } else { !req.head.connection.close };
        let deadline = tokio::time::Instant::from_std(started) + cfg.request_timeout;
        // CONNECT asks for a tunnel, which only a forward proxy gives.
        if req.method() == "CONNECT" {
            return reject(client, &vip, peer, 501, Some(&req), Some(started)).await;
        }
        // TRACE would echo the request as the backend got it: the client's cookies and
        // credentials, and the X-Forwarded-For the proxy adds (cross-site tracing). Refused, as
        // nginx does by default; no `Allow`, as the proxy does not know the resource's methods.
        if req.method() == "TRACE" {
            return reject(client, &vip, peer, 405, Some(&req), Some(started)).await;
        }
        let Some(target) = target(&req, cfg.normalize_path) else {
            return reject(client, &vip, peer, 400, Some(&req), Some(started)).await;
        };
        // An OPTIONS request with `Max-Forwards: 0` is for the proxy to answer as its final
        // recipient (RFC 9110 7.6.2); one whose Max-Forwards is not a number is refused.
        match max_forwards(&req) {
            Err(()) => return reject(client, &vip, peer, 400, Some(&req), Some(started)).await,
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
                    waiting = tokio::time::Instant::now();
                    continue;
                }
                if framing != Framing::None || sends_more(client, &buf) {
                    linger(client, cfg.idle_timeout).await;
                }
                return;
            }
            Ok(_) => {}
        }
        // The host the backend gets: for an HTTP/1.0 request without one, the listening address.
        let host = target.routing_host(listen);
        let host = host.as_deref();
        // Borrowed from `vip`, which holds it for the request: no reference count moves.
        let pool = vip.pool_for(host, &target.path);
        // An escaped slash, a segment's `;` parameters and other escapes (`%3A`) stay data
        // here, but backends that decode or drop them first would serve the request by a path
        // another route takes: refused, rather than routed around that route.
        // A VIP without routes has one pool, which every reading takes.
        if cfg.normalize_path
            && !vip.routes.is_empty()
            && !readings_agree(&vip, host, &target.path, pool)
        {
            return reject(client, &vip, peer, 400, Some(&req), Some(started)).await;
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
        // With `upstream_keepalive = 0` no backend connection is kept. One that opened with a
        // PROXY header speaks for this client connection only: it is kept private to it
        // ([`Private`]), never pooled, and the backend is asked to close it with the client's
        // last request (its TIME_WAIT then stays on the backend's side, as without reuse).
        let proxied = cfg.proxy_protocol;
        let reuse = cfg.upstream_keepalive > 0;
        let keep_up = reuse && (proxied.is_none() || client_keepalive);
        let head =
            upstream_head(&mut uhead, &req, &target, listen, framing, upgrade, names, keep_up);
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
            private.take(pool, started, proxied)
        } else {
            private = Private::default();
            None
        };
        let own_member = own.as_ref().map(|&(i, ..)| i);
        let own_session = own.as_ref().is_some_and(|&(.., bound)| bound.session);
        tried.clear();
        let mut last = Attempt::Connect;
        let mut done = None;
        let mut kept: Option<Kept> = None;
        for attempt in 0..=cfg.retries {
            if attempt > 0 && tokio::time::Instant::now() >= deadline {
                last = Attempt::Deadline;
                break;
            }
            let given = own.take().map(|(_, s, armed, _)| (s, armed));
            let i = match own_member.filter(|_| attempt == 0) {
                Some(i) => i,
                None => {
                    let Some(i) = vip.pick(pool, client_ip(peer), &tried, sticky, attempt) else {
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
                client,
                &mut buf,
                &mut ubuf,
                &upstream,
                given,
                &vip,
                pool,
                i,
                &head,
                framing,
                expect,
                can_retry,
                peer,
                listen,
                now,
                deadline,
                &clock,
                &interim,
                &mut answer_timer,
            )
            .await;
            match r {
                Ok(Answer { up, resp, cut, rest }) => {
                    // Any other answer counts as the backend's success once its body is
                    // through (or the client left): a body the backend cuts short is a failure.
                    let retryable = matches!(resp.status, 502..=504);
                    if retryable {
                        vip.failed(&member.state, Failure::Status(resp.status));
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
                    say_head_too_large(&vip, member.state.addr);
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
                    if charged && let Some(why) = e.failure() {
                        vip.failed(&member.state, why);
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
            // A client that left meanwhile is logged as 499; it still gets the answer (one
            // that only ended its side reads it).
            let logged = if client_left(client, &buf) { 499 } else { status };
            finished(&vip, peer, logged, Some(&req), backend, Some(started), None);
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
                set_cookie(&mut out, pool, i);
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
            // So does whatever the client sent after its request head.
            let sent = write(client, out.split().freeze()).await.is_ok()
                && (buf.is_empty() || write(&up, buf.split().freeze()).await.is_ok());
            // The relay counts itself in flight.
            drop(counted);
            if sent {
                super::tcp::relay(client, &up, vip.cfg.tunnel_timeout, &pool.members[i].state)
                    .await;
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
        // safe), one this exchange binds to the client, or any under the PROXY protocol. It
        // holds a session if the private one did or this exchange binds it. Looked at only
        // for a connection that could be kept.
        let keepable = reuse && upstream_keepalive;
        let carried = own_member == Some(i) && own_session;
        let session = keepable && (carried || binds_connection(&req.head, &resp.head));
        let bound = keepable && (session || own_member == Some(i) || proxied.is_some());
        // An HTTP/1.0 client cannot read the chunked coding (RFC 9112 6.1): it gets the body
        // decoded, delimited by the connection's close.
        let decode = req.http10 && rframing == Framing::Chunked;
        // A client that left while the backend worked (`client_left`; not one whose body is
        // still going to the backend, whose end that stream sees) is counted and logged as 499,
        // as one whose answer cannot be written to it below. It is still sent the answer, with
        // `close`: one that only ended its side (a half-close) reads it, and for one that closed
        // it costs a reset.
        let left =
            rest.is_none() && started.elapsed() >= LEFT_LOOK_AFTER && client_left(client, &buf);
        // A request body cut off (`Answer::cut`): the rest of it is still coming, and is not
        // a request.
        let keep = client_keepalive
            && !left
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
            set_cookie(&mut out, pool, i);
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
        // The rest of a cut-off body is read and dropped while the answer streams; the rest of
        // one the backend answered 2xx goes on to it meanwhile (`Answer::rest`), where it
        // stands kept in `rest` even when the drain deadline drops the streams.
        let mut rest = rest.map(Rest::Going);
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
        let ended = {
            let streaming = stream_body(&up, &mut ubuf, client, rframing, decode, deadline, &clock);
            // Pinned here, once: the functions that go on beside it take it pinned, and `body`
            // holds only a reference (by value, each would hold the stream twice, and `body`
            // both ways of going on, some 2 KiB made and moved at every response).
            let mut streaming = std::pin::pin!(streaming);
            let body = async {
                match rest.as_mut() {
                    _ if cut => with_the_rest_dropped(streaming.as_mut(), client).await,
                    Some(rest) => beside(streaming.as_mut(), rest, client, deadline).await,
                    None => streaming.as_mut().await,
                }
            };
            tokio::select! {
                biased;
                r = body => Some(r),
                () = super::wait_forced_in_task(&shared) => None,
            }
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
                () = super::wait_forced_in_task(&shared) => Rest::Failed(Cut::Drain),
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
            Some(Cut::Backend) if blamed => vip.failed(member, Failure::CutBody),
            Some(Cut::Backend | Cut::Deadline | Cut::Idle | Cut::Drain) => {}
        }
        if let Some(c) = cut_by {
            vip.responses_cut[c as usize].inc();
        }
        if let Some(c) = body_cut_by {
            vip.request_bodies_cut[c as usize].inc();
        }
        let (backend, head, took) = (Some(member.addr), Some(&req), (Some(started), Some(end)));
        let logged = if left { 499 } else { status };
        finished_cut(&vip, peer, logged, head, backend, took.0, took.1, cut_by, body_cut_by);
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
                // Made private now: not the one this client's private connection was (or its
                // fresh stand-in), which was counted when it was. By a session or by its PROXY
                // header: counted once either way.
                if own_member != Some(i) {
                    vip.private_connections.inc();
                }
                let idle = Idle::kept_for(up, ubuf, end, max_idle, bodiless);
                private.keep(addr, idle, Bound { session, proxy: proxied });
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
        waiting = tokio::time::Instant::from_std(end);
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

/// How long a request must have waited for its backend's answer before the proxy looks whether
/// its client left meanwhile ([`client_left`]): the look is a system call, which every request
/// of a busy VIP would pay, while clients give up on answers that keep them waiting (a timeout, a
/// cancel), not on answers that come within milliseconds. A clock read is cheaper than the look.
const LEFT_LOOK_AFTER: Duration = Duration::from_millis(5);

/// Has the client left while its request was served: ended its side (FIN) or reset the
/// connection, with no request pipelined behind this one, read already (`buf`) or waiting in
/// the kernel? Looked at as its answer's head is about to go: a client that closes normally
/// (`curl --max-time`, a browser's cancel) takes a small answer's write without an error, so
/// only this tells that it left (nginx sees that end while waiting for the backend, its 499).
/// A client that pipelined requests and then ended its side waits for their answers.
fn client_left(client: &Socket, buf: &BytesMut) -> bool {
    buf.is_empty() && client.ended()
}

/// Do the other readings backends may give the normalized `path` ([`super::path`]: escaped
/// separators decoded, `;` segment parameters dropped, or both; and each of those and the path
/// itself with every other escape decoded) take the request to `pool` too, the pool the path as
/// sent takes? A reading that is itself to be refused does not.
fn readings_agree(vip: &VipRuntime, host: Option<&str>, path: &str, pool: &Arc<Pool>) -> bool {
    use super::path::{escapes_decoded, params_stripped, separators_decoded};
    let agrees = |reading: &Option<Result<String, ()>>| match reading {
        None => true,
        Some(Ok(p)) => Arc::ptr_eq(vip.pool_for(host, p), pool),
        Some(Err(())) => false,
    };
    // A reading, and the same with every other escape decoded.
    let agrees_also_decoded = |reading: &Option<Result<String, ()>>| {
        agrees(reading)
            && match reading {
                Some(Ok(p)) => agrees(&escapes_decoded(p)),
                _ => true,
            }
    };
    let decoded = separators_decoded(path);
    let both = match &decoded {
        Some(Ok(p)) => params_stripped(p),
        _ => None,
    };
    agrees(&escapes_decoded(path))
        && agrees_also_decoded(&decoded)
        && agrees_also_decoded(&params_stripped(path))
        && agrees_also_decoded(&both)
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
async fn beside<F: Future<Output = Result<(), Side>>>(
    mut response: Pin<&mut F>,
    rest: &mut Rest<'_>,
    client: &Socket,
    deadline: tokio::time::Instant,
) -> Result<(), Side> {
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
async fn with_the_rest_dropped<F: Future<Output = Result<(), Side>>>(
    mut response: Pin<&mut F>,
    client: &Socket,
) -> Result<(), Side> {
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
/// again from each interim response, which `interim` notes ([`head_within`], on `timer`).
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
    timer: &mut Pin<&mut Sleep>,
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
        // What the request's first write sends: its head, behind the PROXY header on a fresh
        // connection that needs one, in one write and one segment as the health probe sends
        // them, rather than a segment (and a backend's read) for the header alone.
        let mut first_write = None;
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
                        super::say_local_failure(vip, addr, &e);
                        return Err(Attempt::Local);
                    }
                    Err(_) => return Err(timed_out(deadline, Attempt::Connect)),
                };
                if let Some(v) = cfg.proxy_protocol {
                    let mut opening = proxy_header(v, peer, listen);
                    opening.extend_from_slice(head);
                    first_write = Some(Bytes::from(opening));
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
            let out = first_write.unwrap_or_else(|| head.clone());
            let send = async {
                let r = write(&up, out).await;
                if r.is_err() {
                    let _ = up.shutdown(std::net::Shutdown::Both);
                }
                r
            };
            let read = read_first(&up, ubuf, armed);
            let (sent, read) = tokio::join!(send, within(timer.as_mut(), resp_deadline, read));
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
            let waited = {
                let reading = response_head(client, &up, ubuf, addr, expect, first, stale, interim);
                let reading = std::pin::pin!(reading);
                head_within(timer.as_mut(), reading, resp_deadline, interim, wait, deadline).await
            };
            match waited {
                Some(Ok(Some(resp))) => return Ok(Answer { up, resp, cut: false, rest: None }),
                Some(Ok(None)) => continue,
                Some(Err(e)) => return Err(abandon(&up, e)),
                None => return Err(abandon(&up, timed_out(deadline, Attempt::Timeout))),
            }
        }
        if write(&up, first_write.unwrap_or_else(|| head.clone())).await.is_err() {
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
        // charged to a healthy backend) or wait for the stalled send to be given up on (the
        // backend taking nothing for the idle timeout: `Socket::send_all_with`).
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
                    let waited =
                        head_within(timer.as_mut(), reading.as_mut(), by, interim, wait, deadline);
                    match waited.await {
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
                    // and the proxy aborted it, `Socket::send_all_with`): the body ends here
                    // for it. An answer it sent before came before the reset (TCP delivers in
                    // order), so it is in the socket and the read ends at once with it;
                    // without one, the read ends at once with the error. The response timeout,
                    // which a complete request would have had from here, bounds the rare wait
                    // in between.
                    let by = answer_by(tokio::time::Instant::now());
                    let waited =
                        head_within(timer.as_mut(), reading.as_mut(), by, interim, wait, deadline);
                    match waited.await {
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
/// 10.1). Never past `deadline` (the whole request's). `None` once the time is up. The timer
/// (`timer`, the connection's for response heads: [`within`]) that runs out after an interim
/// response is set again on the same read (a receive dropped to issue a new one would take the
/// next bytes with it). `reading` comes pinned by the caller, which holds it: taken by value
/// and pinned here, it would be held twice (see [`Within`]).
async fn head_within<F: Future>(
    mut timer: Pin<&mut Sleep>,
    mut reading: Pin<&mut F>,
    by: tokio::time::Instant,
    interim: &Interim,
    wait: Duration,
    deadline: tokio::time::Instant,
) -> Option<F::Output> {
    let mut until = by;
    loop {
        match within(timer.as_mut(), until, reading.as_mut()).await {
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
    use super::{forward::valid_forwarded, *};

    /// The access log's milliseconds print with at most 3 decimals, in the text format (a
    /// float's `Debug`) and in JSON (serde_json), and stay a number there.
    #[test]
    fn access_log_milliseconds_print_to_the_microsecond() {
        for (nanos, text) in [
            (1_626_011, "1.626"),
            (1_626_999, "1.626"),
            (2_000_000, "2.0"),
            (50_000, "0.05"),
            (0, "0.0"),
            (30_000_123_456, "30000.123"),
        ] {
            let ms = millis(Duration::from_nanos(nanos));
            assert_eq!(format!("{ms:?}"), text, "{nanos} ns");
            assert_eq!(serde_json::to_string(&ms).unwrap(), text, "{nanos} ns");
        }
    }

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

    /// A field is cut at [`ACCESS_LOG_FIELD_MAX`] bytes as written, escapes counted, never
    /// inside a `%XX`, and the cut is marked with the field's whole length; one that fits is
    /// written whole. A 16 KiB target used to be logged whole, 47 KiB escaped.
    #[test]
    fn access_log_fields_are_cut_at_their_limit_and_say_their_length() {
        let max = ACCESS_LOG_FIELD_MAX;
        let fits = format!("/{}", "a".repeat(max - 1));
        assert_eq!(Escaped(&fits).to_string(), fits);
        let long = format!("/{}", "a".repeat(16_000));
        assert_eq!(Escaped(&long).to_string(), format!("{}...(16001B)", &long[..max]));
        // 2-byte characters, 6 bytes escaped each: 170 fit after the `/` (1021 bytes), not 171.
        let wide = format!("/{}", "\u{e9}".repeat(8000));
        let said = Escaped(&wide).to_string();
        assert_eq!(said, format!("/{}...(16001B)", "%C3%A9".repeat(170)));
        // Visible ASCII after escapes fills the room to the byte.
        let mixed = format!("\u{e9}{}", "b".repeat(2000));
        let said = Escaped(&mixed).to_string();
        assert_eq!(said, format!("%C3%A9{}...(2002B)", "b".repeat(max - 6)));
        assert!(said.len() < max + 20, "{}", said.len());
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

    /// A head keeps its headers' positions in itself up to `INLINE_HEADERS`, and one with
    /// more has every header all the same, in order, request or response.
    #[test]
    fn heads_with_more_headers_than_kept_inline_lose_none() {
        for n in [0, 1, 15, 16, 17, 40] {
            let names: Vec<String> = (0..n).map(|k| format!("X-H{k}")).collect();
            let pairs: Vec<(&str, &str)> = names.iter().map(|k| (k.as_str(), "v")).collect();
            let got: Vec<String> = h(&pairs)
                .headers()
                .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
                .collect();
            assert_eq!(got, names, "{n} request headers");
            let mut text = "HTTP/1.1 200 OK\r\n".to_owned();
            for k in &names {
                text += &format!("{k}: v\r\n");
            }
            text += "\r\n";
            let resp = parse_response(&mut BytesMut::from(text.as_bytes()));
            let resp = resp.ok().flatten().expect("a complete head");
            let got: Vec<&[u8]> = resp.head.headers().map(|(name, _)| name).collect();
            assert_eq!(got, names.iter().map(String::as_bytes).collect::<Vec<_>>(), "{n}");
        }
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

    /// A backend's request head is written in the connection's buffer, whose room comes back
    /// once the head before it is dropped: one allocation for the connection, not two per
    /// request (a Vec, and the `Bytes` made from it).
    #[test]
    fn backend_heads_take_the_room_of_the_one_before() {
        let r = req(&[("Host", "a.example"), ("Accept", "*/*")]);
        let t = target(&r, true).expect("a valid target");
        let listen = "198.18.1.6:80".parse().unwrap();
        let mut buf = BytesMut::new();
        let mut heads = Vec::new();
        for _ in 0..2 {
            let head = upstream_head(&mut buf, &r, &t, listen, Framing::None, None, None, true);
            // Split off the buffer: the buffer's room goes on right after it.
            assert_eq!(head.as_ptr_range().end, buf.as_ptr());
            heads.push((head.as_ptr(), head.to_vec()));
        }
        assert_eq!(heads[0], heads[1], "the same head, in the same room");
    }

    /// A large head does not leave its room with the connection's buffer: written in a buffer
    /// of its own, it is freed with the head. (Kept, one large head held that much for each
    /// idle keep-alive connection: up to `max_header_bytes` apiece.)
    #[test]
    fn a_large_backend_head_leaves_no_room_behind() {
        let big = "x".repeat(2 * forward::UPSTREAM_HEAD_KEEP);
        let r = req(&[("Host", "a.example"), ("X-Big", &big)]);
        let t = target(&r, true).expect("a valid target");
        let listen = "198.18.1.6:80".parse().unwrap();
        let mut buf = BytesMut::new();
        let head = upstream_head(&mut buf, &r, &t, listen, Framing::None, None, None, true);
        assert!(head.len() > 2 * forward::UPSTREAM_HEAD_KEEP);
        drop(head);
        // The room the next usual head asks for: a buffer that kept the large head's
        // allocation takes all of it back (it is the only owner again).
        buf.reserve(forward::UPSTREAM_HEAD_KEEP);
        assert!(buf.capacity() <= forward::UPSTREAM_HEAD_KEEP, "{} kept", buf.capacity());
    }

    /// The head sent to the backend for `r` (client 198.18.4.1:5000 on VIP 198.18.1.6:80).
    fn forward(r: &ReqHead, framing: Framing, forwarded_for: bool) -> String {
        let t = target(r, true).expect("a valid target");
        let (peer, listen) = ("198.18.4.1:5000".parse().unwrap(), "198.18.1.6:80".parse().unwrap());
        let client = ForwardedClient::new(peer);
        String::from_utf8(
            upstream_head(
                &mut BytesMut::new(),
                r,
                &t,
                listen,
                framing,
                None,
                forwarded_for.then_some(&client),
                true,
            )
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
        // The port: 0..=65535, leading zeros or none after the colon (`port = *DIGIT`).
        for h in ["a:65535", "a:0", "a:00080", "a:", "[2001:db8::1]:65535"] {
            assert_eq!(host("GET / HTTP/1.1", &[("Host", h)]), some(h, "/"), "{h}");
        }
        assert_eq!(host("GET / HTTP/1.0", &[]), Some((None, "/".to_owned())));
        // Routed by the host the backend gets: the Host header, an absolute-form target's
        // authority, or (HTTP/1.0 without Host) the listening address, not by none.
        let listen = "198.18.1.6:8080".parse().unwrap();
        for (line, pairs) in [
            ("GET / HTTP/1.1", &[("Host", "a.example:80")][..]),
            ("GET http://b.example/ HTTP/1.1", &[("Host", "a.example")]),
            ("GET / HTTP/1.0", &[]),
        ] {
            let r = req_line(line, pairs);
            let t = target(&r, true).expect("a valid target");
            let head = upstream_head(
                &mut BytesMut::new(),
                &r,
                &t,
                listen,
                Framing::None,
                None,
                None,
                true,
            );
            let head = String::from_utf8(head.to_vec()).unwrap();
            let sent = head.lines().find_map(|l| l.strip_prefix("Host: "));
            assert_eq!(t.routing_host(listen).as_deref(), sent, "{line}: {head:?}");
            assert!(sent.is_some(), "{line}: {head:?}");
        }
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
            ("GET / HTTP/1.1", &[("Host", "a:99999")][..]),
            ("GET / HTTP/1.1", &[("Host", "a:65536")][..]),
            ("GET / HTTP/1.1", &[("Host", "[2001:db8::1]:65536")][..]),
            ("GET / HTTP/1.1", &[("Host", "a:8x")][..]),
            ("GET http://b:99999/ HTTP/1.1", &[("Host", "b:99999")][..]),
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

    /// Empty elements of the client's X-Forwarded-For and Forwarded (an empty header, `a,,b`,
    /// a trailing comma, whitespace alone) are left out: written on in front of this hop they
    /// made `X-Forwarded-For: , 198.18.4.1` and `for=a,,, for=...`, an empty address first.
    /// A comma in a quoted string is no element's end; the elements go on in order.
    #[test]
    fn empty_forwarding_list_elements_are_left_out() {
        let cases = [
            (vec![("X-Forwarded-For", "")], "X-Forwarded-For: 198.18.4.1\r\n"),
            (vec![("X-Forwarded-For", " \t ")], "X-Forwarded-For: 198.18.4.1\r\n"),
            (
                vec![("X-Forwarded-For", ", 203.0.113.9 ,, ,203.0.113.10,")],
                "X-Forwarded-For: 203.0.113.9, 203.0.113.10, 198.18.4.1\r\n",
            ),
            (
                vec![("X-Forwarded-For", ","), ("X-Forwarded-For", "203.0.113.9")],
                "X-Forwarded-For: 203.0.113.9, 198.18.4.1\r\n",
            ),
            (
                vec![("Forwarded", "for=2.2.2.2,,")],
                "Forwarded: for=2.2.2.2, for=198.18.4.1;proto=http\r\n",
            ),
            (
                vec![("Forwarded", ", for=\"a,b\";proto=http ,\tfor=_x,")],
                "Forwarded: for=\"a,b\";proto=http, for=_x, for=198.18.4.1;proto=http\r\n",
            ),
        ];
        for (headers, want) in cases {
            let mut all = vec![("Host", "x")];
            all.extend(headers.iter().copied());
            let out = forward(&req(&all), Framing::None, true);
            assert!(out.contains(&format!("\r\n{want}")), "{headers:?}: {out}");
        }
    }
}
