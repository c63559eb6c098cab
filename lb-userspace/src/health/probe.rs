//! The probes themselves: blocking std sockets, each bounded by the check's timeout, waiting
//! in slices of at most [`SLICE`] so that a check stopped mid-probe is given up within one.

use std::{
    fmt,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use crate::config::{CheckKind, HealthCheck};

/// Why a probe failed: the backend's doing, or this node's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The backend refused, did not answer in time, or answered wrong: the probe counts toward
    /// the check's `fall`.
    Backend(String),
    /// This node is out of descriptors, memory, buffers or local ports
    /// ([`crate::proxy::local_failure`], as the L7 proxy's passive health judges it): the probe
    /// says nothing of the backend, and counts neither way.
    Local(String),
    /// This node has no route to the backend (ENETUNREACH, its routing table having none): a
    /// failure, counted toward `fall` (a route withdrawn is real news), but one an `ipip` or
    /// `ip6ip6` VIP's traffic does not share (XDP sends it through `gateway_mac` whatever the
    /// routes say), so its reason says so, and the checker logs it once per VIP.
    NoRoute(String),
    /// The check was stopped mid-probe (reconciled away, or restarted with new settings): the
    /// probe was given up, and its result is nobody's.
    Stopped,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Backend(why) | Failure::Local(why) | Failure::NoRoute(why) => f.write_str(why),
            Failure::Stopped => f.write_str("the check was stopped"),
        }
    }
}

/// The longest a probe waits in one go (to connect, send or read) before it looks whether its
/// check was stopped. A reload that changes a VIP's check restarts each of its backends'
/// checks: an old one stuck on a blackholed backend used to live until its timeout (up to
/// 600 s), and a config tool reloading every minute piled up thousands of such threads. Short
/// enough that a stopped check's thread ends promptly, long enough that a probe waiting out a
/// long timeout wakes only twice a second.
pub const SLICE: Duration = Duration::from_millis(500);

/// A probe's time: its deadline (the check's timeout, kept exact whatever the slices), and
/// whether its check has been stopped since it began.
struct Clock<'a> {
    deadline: Instant,
    stopped: &'a dyn Fn() -> bool,
}

impl Clock<'_> {
    /// The next wait: the time left, at most one [`SLICE`] (and at least 1 ms: a socket
    /// timeout of zero waits for ever); None once the time is up; [`Failure::Stopped`] once the
    /// check is.
    fn wait(&self) -> Result<Option<Duration>, Failure> {
        if (self.stopped)() {
            return Err(Failure::Stopped);
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        Ok((!left.is_zero()).then(|| left.min(SLICE).max(Duration::from_millis(1))))
    }
}

/// Whether a socket call that failed with `e` only ran out of its (sliced) time, or was
/// interrupted: tried again while the probe has time left.
fn waited_out(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
    matches!(e.kind(), WouldBlock | TimedOut | Interrupted)
}

/// Maps a failed socket call (`what`: which one) of a probe of `addr` to a [`Failure`] by
/// whose side it failed on ([`failure`], this node's routing table asked when it matters).
fn failed(what: &'static str, addr: SocketAddr) -> impl Fn(std::io::Error) -> Failure {
    move |e| failure(what, addr, e, routed)
}

/// [`failed`], with `routed` telling whether this node's routing table has a route to an
/// address. ENETUNREACH from the table (or for UDP, whose connect only looks a route up) is
/// [`Failure::NoRoute`]; from a router on the way (an ICMP network unreachable ending a TCP
/// handshake), with a route here, it stays the backend's failure as it was. EHOSTUNREACH
/// ("No route to host") is left the backend's too: the route is there, and the host did not
/// answer ARP or neighbour discovery, or a router said it is unreachable.
fn failure(
    what: &str,
    addr: SocketAddr,
    e: std::io::Error,
    routed: impl FnOnce(IpAddr) -> bool,
) -> Failure {
    if e.raw_os_error() == Some(libc::ENETUNREACH) && !routed(addr.ip()) {
        return Failure::NoRoute(format!(
            "no route from this node to {} (ENETUNREACH): health probes follow the kernel's routing table, not gateway_mac",
            addr.ip()
        ));
    }
    let why = format!("{what}: {e}");
    if crate::proxy::local_failure(&e) { Failure::Local(why) } else { Failure::Backend(why) }
}

/// Whether this node's routing table has a route to `ip`: a UDP socket's connect looks one up,
/// sending nothing. Asked only of a probe that failed with ENETUNREACH.
fn routed(ip: IpAddr) -> bool {
    let any = SocketAddr::new(
        if ip.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() },
        0,
    );
    let looked_up = UdpSocket::bind(any).and_then(|s| s.connect((ip, 9)));
    !looked_up.is_err_and(|e| e.raw_os_error() == Some(libc::ENETUNREACH))
}

/// A TCP connection to `addr` within `check`'s timeout, with `request` sent on it (none for a
/// TCP check). When the backend expects the PROXY protocol, its header goes first (else the
/// backend refuses an HTTP probe, and logs a broken connection at a TCP one), carrying the LOCAL
/// command: the proxy-protocol spec has a proxy's own connections, "such as health-checks", say
/// so rather than pass off the probe's address as a client's. Header and request go in one
/// write, with TCP_NODELAY: written in pieces (as they were, the request itself in five) they
/// left in as many segments, and Nagle held each piece after the first until the backend
/// acknowledged the one before, which a backend waiting for the whole head may delay (40 ms on
/// Linux).
///
/// The connect waits a [`SLICE`] at a time, with `SO_SNDTIMEO`: a blocking connect that runs
/// out of it returns EINPROGRESS, the handshake going on (socket(7)), and Linux's connect on a
/// socket still connecting waits again for the handshake's end (EALREADY when that time runs out
/// too), returning 0 once it completes or the error that ended it. So a stopped check is seen
/// between slices, safely, without polling the descriptor.
fn connect(
    check: &HealthCheck,
    addr: SocketAddr,
    clock: &Clock<'_>,
    request: &[u8],
) -> Result<TcpStream, Failure> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(failed("socket", addr))?;
    let to = addr.into();
    loop {
        let Some(wait) = clock.wait()? else {
            return Err(Failure::Backend("connect: connection timed out".to_owned()));
        };
        socket.set_write_timeout(Some(wait)).map_err(failed("timeout", addr))?;
        match socket.connect(&to) {
            Ok(()) => break,
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EALREADY))
                    || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed("connect", addr)(e)),
        }
    }
    let mut s = TcpStream::from(socket);
    let header = check.proxy_protocol.map(crate::proxy::proxy_header_local).unwrap_or_default();
    if header.is_empty() && request.is_empty() {
        return Ok(s);
    }
    s.set_nodelay(true).map_err(failed("nodelay", addr))?;
    let out = [header.as_slice(), request].concat();
    let mut sent = 0;
    while sent < out.len() {
        let Some(wait) = clock.wait()? else {
            return Err(Failure::Backend(format!(
                "send: not sent within {} ms",
                check.timeout.as_millis()
            )));
        };
        s.set_write_timeout(Some(wait)).map_err(failed("timeout", addr))?;
        match s.write(&out[sent..]) {
            Ok(0) => return Err(failed("send", addr)(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => sent += n,
            Err(e) if waited_out(&e) => {}
            Err(e) => return Err(failed("send", addr)(e)),
        }
    }
    Ok(s)
}

/// Runs one probe; Ok with its latency, or why it failed, and on whose side. `stopped` is
/// asked between the waits (each at most a [`SLICE`]): once it says the check was stopped, the
/// probe gives up ([`Failure::Stopped`]).
pub fn probe(
    check: &HealthCheck,
    addr: SocketAddr,
    stopped: &dyn Fn() -> bool,
) -> Result<Duration, Failure> {
    let start = Instant::now();
    let clock = Clock { deadline: start + check.timeout, stopped };
    match &check.kind {
        CheckKind::Tcp => {
            connect(check, addr, &clock, &[])?;
        }
        CheckKind::Http { path, host, expect_status, expect_body } => {
            let host = host.clone().unwrap_or_else(|| default_host(addr));
            // HTTP/1.1: servers may refuse HTTP/1.0 (Envoy answers 426 by default). The
            // connection is closed once the answer is decided, which `Connection: close` says.
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: edgelb-health\r\nConnection: close\r\n\r\n"
            );
            let mut s = connect(check, addr, &clock, request.as_bytes())?;
            // Read until the answer is decided: a complete head with the wrong status, or the
            // right one and no body to look for, or the body text found; else the end of the
            // stream, 64 KiB, or the timeout (however slowly the bytes come) decides on what
            // arrived. A backend that answers and then resets (it closed with the request
            // unread) or keeps the connection open has still answered.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let verdict = loop {
                if let Some(v) = judge(&buf, *expect_status, expect_body.as_deref(), false) {
                    break v.map_err(Failure::Backend);
                }
                let timed_out = || {
                    Failure::Backend(format!(
                        "no whole response within {} ms",
                        check.timeout.as_millis()
                    ))
                };
                let cut = if buf.len() > 64 * 1024 {
                    Failure::Backend("the answer passed 64 KiB".to_owned())
                } else if let Some(wait) = clock.wait()? {
                    s.set_read_timeout(Some(wait)).map_err(failed("timeout", addr))?;
                    match s.read(&mut chunk) {
                        Ok(0) => Failure::Backend("the backend closed".to_owned()),
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            continue;
                        }
                        // A slice waited out: the clock says whether time is left.
                        Err(e) if waited_out(&e) => continue,
                        Err(e) => failed("read", addr)(e),
                    }
                } else {
                    timed_out()
                };
                // Nothing more comes: decide on what arrived, or say why there is no answer.
                break judge(&buf, *expect_status, expect_body.as_deref(), true)
                    .map(|v| v.map_err(Failure::Backend))
                    .unwrap_or(Err(cut));
            };
            verdict?;
        }
        CheckKind::Udp { send, expect } => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(local).map_err(failed("bind", addr))?;
            s.connect(addr).map_err(failed("connect", addr))?;
            s.send(send).map_err(failed("send", addr))?;
            // The largest datagram whole: a longer answer's tail would be cut off, and an
            // `expect` found there missed. One buffer per check's thread, not one per probe.
            thread_local! {
                static ANSWER: std::cell::RefCell<Vec<u8>> =
                    std::cell::RefCell::new(vec![0u8; crate::config::MAX_UDP_PROBE]);
            }
            ANSWER.with_borrow_mut(|buf| {
                let n = loop {
                    let Some(wait) = clock.wait()? else {
                        return Err(Failure::Backend(format!(
                            "no answer within {} ms",
                            check.timeout.as_millis()
                        )));
                    };
                    s.set_read_timeout(Some(wait)).map_err(failed("timeout", addr))?;
                    match s.recv(buf) {
                        Ok(n) => break n,
                        Err(e) if waited_out(&e) => {}
                        Err(e) => return Err(failed("no answer", addr)(e)),
                    }
                };
                match expect {
                    // (`windows` takes no empty window: an empty `expect` is in every answer.)
                    Some(want)
                        if !want.is_empty()
                            && !buf[..n].windows(want.len()).any(|w| w == want.as_slice()) =>
                    {
                        Err(Failure::Backend(format!(
                            "answer lacks {:?}",
                            String::from_utf8_lossy(want)
                        )))
                    }
                    _ => Ok(()),
                }
            })?;
        }
    }
    Ok(start.elapsed())
}

/// The Host of a probe of `addr` when the check names none: the address (an IPv6 literal
/// bracketed, RFC 3986 3.2.2), with its port unless that is 80, HTTP's default (RFC 9110 7.2):
/// a server that routes by host and port (Envoy's virtual hosts, a backend serving several
/// ports) is asked for the one probed.
fn default_host(addr: SocketAddr) -> String {
    let ip = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    if addr.port() == 80 { ip } else { format!("{ip}:{}", addr.port()) }
}

/// The verdict on an HTTP answer read so far (`buf`), if it can be given: `None` while more
/// bytes could change it. With `last` (nothing more comes), a complete head is judged on what
/// arrived, and an incomplete one is `None` (the caller says why nothing more came). Interim
/// answers (1xx but 101: 103 Early Hints, which HTTP/1.1 servers may send first) are skipped
/// unless a 1xx is expected. `expect_body` is looked for in the body as [`body`] frames it:
/// decoded when chunked, and failed as soon as the body is whole without it (a server that
/// keeps the connection open after a framed answer is not waited out to the timeout).
fn judge(
    buf: &[u8],
    expect_status: u16,
    expect_body: Option<&str>,
    last: bool,
) -> Option<Result<(), String>> {
    let mut at = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut many: Vec<httparse::Header<'_>>;
        let mut resp = httparse::Response::new(&mut headers);
        let mut parsed = resp.parse(&buf[at..]);
        if parsed == Err(httparse::Error::TooManyHeaders) {
            // An answer of more than 128 header lines is still an answer: parsed again with
            // room for as many as the bytes read could hold (a line takes 3 at least), which
            // the read's 64 KiB bounds.
            many = vec![httparse::EMPTY_HEADER; (buf.len() - at) / 3 + 1];
            resp = httparse::Response::new(&mut many);
            parsed = resp.parse(&buf[at..]);
        }
        let head_len = match parsed {
            Ok(httparse::Status::Complete(n)) => at + n,
            Ok(httparse::Status::Partial) if buf.len() == at || !last => return None,
            Ok(httparse::Status::Partial) => return Some(Err("incomplete response head".into())),
            Err(e) => return Some(Err(format!("not an HTTP response: {e}"))),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) && status != 101 && expect_status >= 200 {
            at = head_len;
            continue;
        }
        if status != expect_status {
            return Some(Err(format!("status {status}, expected {expect_status}")));
        }
        let Some(want) = expect_body else { return Some(Ok(())) };
        let (body, whole) = match body(resp.headers, &buf[head_len..]) {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        return if String::from_utf8_lossy(&body).contains(want) {
            Some(Ok(()))
        } else if whole || last {
            Some(Err(format!("body lacks {want:?}")))
        } else {
            None
        };
    }
}

/// The body of an answer with `headers` so far, from `raw` (what arrived after its head), and
/// whether it is whole (RFC 9112 6.3): with `Transfer-Encoding` ending in `chunked`, the chunk
/// data decoded (a text may straddle two chunks, and size lines would sit inside it), whole at
/// the last chunk; else with `Content-Length`, that many bytes; else delimited by the close,
/// never whole before it.
fn body<'a>(
    headers: &[httparse::Header<'_>],
    raw: &'a [u8],
) -> Result<(std::borrow::Cow<'a, [u8]>, bool), String> {
    use std::borrow::Cow;
    let value = |name: &str| {
        headers
            .iter()
            .rev()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if let Some(codings) = value("transfer-encoding") {
        if codings.rsplit(',').next().is_some_and(|c| c.trim() == "chunked") {
            let mut decoded = Vec::new();
            let mut framer = crate::proxy::chunked::Chunked::default();
            framer
                .feed_with(raw, |data| decoded.extend_from_slice(&raw[data]))
                .map_err(|_| "the chunked body breaks the chunked coding".to_owned())?;
            return Ok((Cow::Owned(decoded), framer.done()));
        }
        return Ok((Cow::Borrowed(raw), false));
    }
    match value("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(len) => Ok((Cow::Borrowed(&raw[..len.min(raw.len())]), raw.len() >= len)),
        None => Ok((Cow::Borrowed(raw), false)),
    }
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead, net::TcpListener, sync::mpsc};

    use super::*;

    /// A probe of a check that nobody stops.
    fn probe(check: &HealthCheck, addr: SocketAddr) -> Result<Duration, Failure> {
        super::probe(check, addr, &|| false)
    }

    fn http(timeout_ms: u64, expect_body: Option<&str>) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Http {
                path: "/healthz".into(),
                host: None,
                expect_status: 200,
                expect_body: expect_body.map(str::to_owned),
            },
            port: 0,
            interval: Duration::from_millis(timeout_ms),
            timeout: Duration::from_millis(timeout_ms),
            rise: 1,
            fall: 1,
            proxy_protocol: None,
        }
    }

    /// A one-connection HTTP server on `bind` that sends the request head it read down
    /// `heads` and answers with `answer`.
    fn server(
        bind: &str,
        answer: impl FnOnce(&mut TcpStream) + Send + 'static,
    ) -> (SocketAddr, mpsc::Receiver<String>) {
        let l = TcpListener::bind(bind).unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            while r.read_line(&mut head).is_ok_and(|n| n > 2) {}
            let _ = tx.send(head);
            answer(&mut s);
        });
        (addr, rx)
    }

    #[test]
    fn the_body_check_reads_the_whole_body_after_the_head() {
        let (addr, _) = server("127.0.0.1:0", |s| {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\na\r\n\r\nstatus: ok");
        });
        assert!(probe(&http(1000, Some("status: ok")), addr).is_ok());
        let (addr, _) = server("127.0.0.1:0", |s| {
            let _ = s.write_all(b"HTTP/1.0 500 Oops\r\n\r\nHTTP/1.0 200 OK");
        });
        let e = probe(&http(1000, None), addr).unwrap_err().to_string();
        assert!(e.contains("status 500"), "{e}");
    }

    /// A udp check sending `send` and expecting `expect`, timed out after 500 ms.
    fn udp_check(send: &[u8], expect: &[u8]) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Udp { send: send.to_vec(), expect: Some(expect.to_vec()) },
            port: 0,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
            proxy_protocol: None,
        }
    }

    /// A UDP probe passes when the answer holds `expect`, wherever in the datagram: one far
    /// longer than a small buffer (a DNS answer with many records) is read whole.
    #[test]
    fn a_udp_probe_reads_the_whole_answer() {
        let answering = |answer: Vec<u8>| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = s.local_addr().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok((_, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&answer, from);
                }
            });
            addr
        };
        let udp = |expect: &str| udp_check(b"ping", expect.as_bytes());
        let mut long = vec![b'x'; 10_000];
        long.extend(b"backend-1");
        let addr = answering(long);
        assert!(probe(&udp("backend-1"), addr).is_ok(), "the expected text at the end");
        // Twice on one thread: the buffer it keeps is read afresh.
        assert!(probe(&udp("backend-1"), addr).is_ok());
        let e = probe(&udp("backend-2"), addr).unwrap_err().to_string();
        assert!(e.contains("answer lacks"), "{e}");
    }

    /// A binary probe (a DNS query) is sent byte for byte, and its expected bytes are found in
    /// an answer that is not text: bytes of 0x80 and above used to go out as UTF-8 (two bytes
    /// each) and could not be expected at all.
    #[test]
    fn a_udp_probe_sends_and_expects_bytes() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                // A DNS-like answer: the query's id, then flags 0x8180 (NOERROR), or FORMERR
                // (0x8181) to a query that is not the exact bytes expected.
                let flags: &[u8] = if buf[..n] == [0xab, 0x12, 0x01, 0x00] {
                    &[0x81, 0x80]
                } else {
                    &[0x81, 0x81]
                };
                let _ = s.send_to(&[&buf[..2], flags, &[0xff; 4]].concat(), from);
            }
        });
        let query = [0xab, 0x12, 0x01, 0x00];
        assert!(probe(&udp_check(&query, &[0x81, 0x80]), addr).is_ok());
        assert!(probe(&udp_check(&query, &[0xab, 0x12, 0x81, 0x80]), addr).is_ok());
        let e = probe(&udp_check(&[0xab, 0x13, 0x01, 0x00], &[0x81, 0x80]), addr).unwrap_err();
        assert!(format!("{e:?}").contains("answer lacks"), "{e:?}");
        // An empty `expect` is in every answer.
        assert!(probe(&udp_check(&query, &[]), addr).is_ok());
    }

    /// A backend that answers and then resets (it closed with the request unread), or that
    /// keeps the connection open after its answer, has answered: the probe passes, at once.
    #[test]
    fn an_answer_counts_whatever_the_connection_does_after_it() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // Nothing of the request is read: the close resets the connection.
            std::thread::sleep(Duration::from_millis(20));
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        });
        assert_eq!(probe(&http(1000, None), addr).map(|_| ()), Ok(()));
        let (addr, _) = server("127.0.0.1:0", |s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            std::thread::sleep(Duration::from_secs(3));
        });
        // Within the 1 s timeout, though the backend holds the connection for 3 s.
        assert_eq!(probe(&http(1000, Some("ok")), addr).map(|_| ()), Ok(()));
        // A head cut off by the reset is still a failure, saying why.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nX-Half");
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        });
        let e = probe(&http(1000, None), addr).unwrap_err().to_string();
        assert!(e.contains("incomplete response head"), "{e}");
    }

    /// A probe waits in slices yet keeps its deadline: a timeout that is no whole number of
    /// slices fails at the timeout, not at the end of a slice, whether the connect, the HTTP
    /// answer or the UDP one is waited for; and a probe whose check is stopped gives up within a
    /// slice, whatever is left of its timeout.
    #[test]
    fn a_sliced_probe_keeps_its_deadline_and_gives_up_when_stopped() {
        // A full accept queue drops SYNs; a listener nobody accepts from answers no request; a
        // UDP socket nobody reads answers nothing.
        let hole =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        hole.listen(0).unwrap();
        let hole = hole.local_addr().unwrap().as_socket().unwrap();
        let _filler = TcpStream::connect(hole).unwrap();
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let mute = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let with_timeout = |mut c: HealthCheck, ms: u64| {
            c.timeout = Duration::from_millis(ms);
            c
        };
        let tcp = HealthCheck { kind: CheckKind::Tcp, ..http(0, None) };
        let cases = [
            ("connect", tcp, hole, "connect: connection timed out"),
            ("read", http(0, None), silent.local_addr().unwrap(), "no whole response within"),
            ("udp", udp_check(b"ping", b"pong"), mute.local_addr().unwrap(), "no answer within"),
        ];
        for (what, check, addr, why) in &cases {
            let start = Instant::now();
            let e = probe(&with_timeout(check.clone(), 1200), *addr).unwrap_err().to_string();
            let took = start.elapsed();
            assert!(e.contains(why), "{what}: {e}");
            assert!(
                took >= Duration::from_millis(1200) && took < Duration::from_millis(2500),
                "{what}: failed after {took:?}, not at its 1200 ms timeout"
            );
        }
        for (what, check, addr, _) in &cases {
            let start = Instant::now();
            let stopped = || start.elapsed() > Duration::from_millis(200);
            let e = super::probe(&with_timeout(check.clone(), 60_000), *addr, &stopped);
            assert_eq!(e, Err(Failure::Stopped), "{what}");
            let took = start.elapsed();
            assert!(took < SLICE + Duration::from_millis(1500), "{what}: gave up after {took:?}");
        }
    }

    /// ENETUNREACH with no route in this node's table is said as such, pointing at the cause an
    /// `ipip` VIP's operator would not guess (its packets go through gateway_mac, the probes
    /// through the kernel's routes); from a router on the way (a route here) it stays as it was,
    /// and so does EHOSTUNREACH, whose route is there.
    #[test]
    fn a_probe_without_a_route_says_why() {
        let unreachable = || std::io::Error::from_raw_os_error(libc::ENETUNREACH);
        for (addr, ip) in [("198.18.0.11:80", "198.18.0.11"), ("[2001:2::11]:80", "2001:2::11")] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(
                failure("connect", addr, unreachable(), |to| to != addr.ip()),
                Failure::NoRoute(format!(
                    "no route from this node to {ip} (ENETUNREACH): health probes follow the kernel's routing table, not gateway_mac"
                ))
            );
        }
        let addr: SocketAddr = "198.18.0.11:80".parse().unwrap();
        assert_eq!(
            failure("connect", addr, unreachable(), |_| true),
            Failure::Backend("connect: Network is unreachable (os error 101)".into())
        );
        let host = std::io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        assert_eq!(
            failure("connect", addr, host, |_| panic!("asked for EHOSTUNREACH")),
            Failure::Backend("connect: No route to host (os error 113)".into())
        );
    }

    /// In a namespace without routes, TCP and UDP probes fail with that reason, the table looked
    /// up for real.
    #[test]
    fn a_probe_in_a_namespace_without_routes_says_no_route() {
        use crate::testbed::{netns, sh};
        if !netns::require(
            netns::euid() == 0,
            "a_probe_in_a_namespace_without_routes_says_no_route: needs root for a namespace",
        ) {
            return;
        }
        /// Deletes the namespace when the test ends, however it ends.
        struct Gone(String);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = sh(&["ip", "netns", "del", &self.0]);
            }
        }
        let name = format!("edgelb-noroute-{}", std::process::id());
        let _ = sh(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name]).unwrap();
        let _gone = Gone(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]).unwrap();
        let tcp = HealthCheck { kind: CheckKind::Tcp, ..http(1000, None) };
        let reasons = netns::in_netns(&name, || {
            ["198.18.0.11:80", "[2001:2::11]:80"]
                .iter()
                .flat_map(|a| {
                    let addr: SocketAddr = a.parse().unwrap();
                    [&tcp, &udp_check(b"ping", b"pong")].map(|c| probe(c, addr))
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
        for r in reasons {
            assert!(
                matches!(&r, Err(Failure::NoRoute(why)) if why.starts_with("no route from this node to ")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_backend_dripping_bytes_fails_within_the_timeout() {
        let (addr, _) = server("127.0.0.1:0", |s| {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n");
            for _ in 0..2000 {
                if s.write_all(b"X-Pad: y\r\n").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let start = Instant::now();
        let e = probe(&http(150, None), addr).unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(600), "{e} after {:?}", start.elapsed());
    }

    /// An HTTP probe's request leaves in one segment, behind its PROXY header when it sends one:
    /// it was written in five pieces (`write!` on the socket, Nagle on), as many segments, the
    /// header in one more. Counted by the backend's kernel: a backend's single read does not
    /// tell, as on loopback the pieces are all there within microseconds.
    #[test]
    fn an_http_probe_sends_its_request_in_one_segment() {
        for proxy_protocol in [None, Some(1), Some(2)] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let (tx, got) = mpsc::channel();
            std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let segments = crate::testbed::servers::data_segments_in(&s);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                let _ = tx.send((head, segments));
            });
            let mut check = http(1000, None);
            check.proxy_protocol = proxy_protocol;
            let probed = probe(&check, addr);
            let (head, segments) = got.recv_timeout(Duration::from_secs(5)).unwrap();
            let head = String::from_utf8_lossy(&head);
            assert!(probed.is_ok(), "{proxy_protocol:?}: {probed:?}");
            assert!(head.ends_with("\r\n\r\n"), "{proxy_protocol:?}: the whole head: {head:?}");
            let Some(segments) = segments else {
                eprintln!("the kernel does not count data segments (TCP_INFO): skipped");
                return;
            };
            assert_eq!(segments, 1, "{proxy_protocol:?}: {head:?}");
        }
    }

    #[test]
    fn an_ipv6_backend_gets_a_bracketed_host() {
        let Ok(probe_l) = TcpListener::bind("[::1]:0") else {
            eprintln!("no IPv6 loopback: skipped");
            return;
        };
        drop(probe_l);
        let (addr, heads) = server("[::1]:0", |s| {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
        });
        assert!(probe(&http(1000, None), addr).is_ok());
        let head = heads.recv().unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nHost: [::1]:{}\r\n", addr.port())), "{head}");
    }

    /// The probe speaks HTTP/1.1 (Envoy, among others, refuses HTTP/1.0 with a 426), says it
    /// closes, and names the probed port in its default Host (not for 80, HTTP's default); a
    /// Host the check names goes as written. Byte for byte.
    #[test]
    fn an_http_probe_sends_an_http_1_1_head_with_the_port_in_host() {
        let answer = |s: &mut TcpStream| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        };
        let (addr, heads) = server("127.0.0.1:0", answer);
        assert_eq!(probe(&http(1000, None), addr).map(|_| ()), Ok(()));
        assert_eq!(
            heads.recv_timeout(Duration::from_secs(5)).unwrap(),
            format!(
                "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: edgelb-health\r\nConnection: close\r\n\r\n",
                addr.port()
            )
        );
        let (addr, heads) = server("127.0.0.1:0", answer);
        let mut named = http(1000, None);
        if let CheckKind::Http { host, .. } = &mut named.kind {
            *host = Some("health.example".into());
        }
        assert_eq!(probe(&named, addr).map(|_| ()), Ok(()));
        let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(head.contains("\r\nHost: health.example\r\n"), "{head}");
        // Port 80 is HTTP's default, which a Host leaves out (no test binds it).
        assert_eq!(default_host("198.18.0.11:80".parse().unwrap()), "198.18.0.11");
        assert_eq!(default_host("[2001:db8::1]:80".parse().unwrap()), "[2001:db8::1]");
        assert_eq!(default_host("[2001:db8::1]:8080".parse().unwrap()), "[2001:db8::1]:8080");
    }

    /// An HTTP/1.1 answer is framed as HTTP/1.1 frames it: a chunked body is searched decoded
    /// (the text straddling two chunks found), a framed body that is whole without the text
    /// fails at once though the server keeps the connection open, and an interim 103 before
    /// the final answer is skipped.
    #[test]
    fn an_http_1_1_answer_is_judged_by_its_framing() {
        let answering = |answer: &'static [u8]| {
            server("127.0.0.1:0", move |s| {
                let _ = s.write_all(answer);
                // Kept open past the probe's timeout, as a keep-alive server may.
                std::thread::sleep(Duration::from_secs(6));
            })
            .0
        };
        // A timeout well above the time an answer takes on a busy machine: one judged only
        // when the connection ends would fail at the timeout, 5 s.
        let body = |want: &str| http(5000, Some(want));
        let chunked: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nstatus:\r\n4\r\n ok!\r\n0\r\n\r\n";
        assert_eq!(probe(&body("status: ok"), answering(chunked)).map(|_| ()), Ok(()));
        for framed in [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nstatus:\r\n4\r\n bad\r\n0\r\n\r\n"
                as &[u8],
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nstatus: bad",
        ] {
            let start = Instant::now();
            let e = probe(&body("status: ok"), answering(framed)).unwrap_err().to_string();
            assert!(e.contains("body lacks"), "{e}");
            assert!(start.elapsed() < Duration::from_secs(2), "{e} after {:?}", start.elapsed());
        }
        let early: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(probe(&body("ok"), answering(early)).map(|_| ()), Ok(()));
        assert_eq!(probe(&http(1000, None), answering(early)).map(|_| ()), Ok(()));
        let e = probe(
            &http(1000, None),
            answering(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 503 No\r\n\r\n"),
        );
        assert!(e.unwrap_err().to_string().contains("status 503"));
    }

    /// An answer with more than 128 header lines is judged as any other (it used to fail as
    /// "not an HTTP response: too many headers"), its body found behind them.
    #[test]
    fn an_answer_with_many_headers_is_judged() {
        let head: String = (0..300).map(|i| format!("X-Header-{i}: {i}\r\n")).collect();
        let answer = format!("HTTP/1.1 200 OK\r\n{head}Content-Length: 2\r\n\r\nok");
        assert_eq!(judge(answer.as_bytes(), 200, Some("ok"), false), Some(Ok(())));
        assert_eq!(judge(answer.as_bytes(), 200, None, false), Some(Ok(())));
        let half = &answer.as_bytes()[..answer.len() / 2];
        assert_eq!(judge(half, 200, None, false), None, "a head still coming");
        let wrong = answer.replace("200 OK", "503 No");
        let e = judge(wrong.as_bytes(), 200, None, false);
        assert_eq!(e, Some(Err("status 503, expected 200".to_owned())));
    }

    /// A backend behind `proxy_protocol` reads the PROXY header before the request: the probe
    /// sends it with the LOCAL command, as haproxy's proxy-protocol.txt asks of connections a
    /// proxy opens itself, "such as health-checks" (v1 `PROXY UNKNOWN\r\n`; v2 the signature,
    /// 0x20, family 0x00, length 0), and the request right behind it. Without it such a backend
    /// refuses every probe.
    #[test]
    fn a_probe_speaks_the_proxy_protocol_its_backend_expects() {
        // A backend that reads exactly `len` bytes of header, sends them down `got` with the
        // request line behind them, and answers only an exact LOCAL header.
        let strict = |version: u8| {
            let want: &[u8] = if version == 1 {
                b"PROXY UNKNOWN\r\n"
            } else {
                b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"
            };
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let (tx, got) = mpsc::channel();
            std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut header = vec![0u8; want.len()];
                let read = r.read_exact(&mut header).is_ok();
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                if read && header == want {
                    let mut head = String::new();
                    while r.read_line(&mut head).is_ok_and(|n| n > 2) {}
                    let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
                }
                let _ = tx.send((header, line));
            });
            (addr, got, want)
        };
        for v in [1, 2] {
            let mut check = http(1000, None);
            check.proxy_protocol = Some(v);
            let (addr, got, want) = strict(v);
            let probed = probe(&check, addr);
            let (header, line) = got.recv().unwrap();
            assert_eq!(header, want, "v{v}: the LOCAL header, byte for byte");
            assert_eq!(line, "GET /healthz HTTP/1.1\r\n", "v{v}: the request right behind it");
            assert!(probed.is_ok(), "v{v}: {probed:?}");
            // Refused: the backend closes (or resets) without an answer.
            let (addr, _got, _) = strict(v);
            assert!(probe(&http(1000, None), addr).is_err(), "v{v} without the header");
        }
    }
}
