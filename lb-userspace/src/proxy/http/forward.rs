//! Where a request goes and what its backend gets: the request's target and Host, checked so
//! that routing and the backend read one and the same host and path ([`target`]), the
//! forwarding headers naming the client ([`ForwardedClient`], [`valid_forwarded`]), and the
//! request head rewritten for the backend ([`upstream_head`]). Apart from the connection loop
//! (`super`) because none of it does I/O (a parsed head in, a target or bytes out), and it is
//! what decides which host a request is routed by and what a backend sees of it.

use std::{
    borrow::Cow,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use bytes::{Bytes, BytesMut};

use super::head::{
    Framing, ReqHead, UNDERSCORE_DROPPED, content_length, header, is_tchar, max_forwards,
    put_decimal, reads_as, transfer_encoding, underscore_spelling,
};
use crate::proxy::{client_ip, path};

/// Where a request is going: the host it names and the target sent on to the backend.
pub(super) struct Target<'a> {
    /// The host (and port) the request names: from an absolute-form target, else from the Host
    /// header; `None` for an HTTP/1.0 request without one (routed by the listening address,
    /// which its backend gets: [`Target::routing_host`]).
    pub(super) host: Option<&'a [u8]>,
    /// The request target in origin form (or `*`), as the backend gets it: its path normalized
    /// ([`path::normalize`]) unless the VIP says not to.
    pub(super) path: Cow<'a, str>,
    /// The Host header the backend gets instead of the client's, if any: the authority of an
    /// absolute-form target, or for an HTTP/1.0 request without Host the address the client
    /// connected to (HTTP/1.1 backends require one).
    host_out: Option<HostOut<'a>>,
}

impl Target<'_> {
    /// The host (and port) the request is routed by: the one its backend gets as Host, so that
    /// the router and the backend read the same host. For an HTTP/1.0 request without Host,
    /// the address the client connected to (the backend gets it as Host): routed with no host,
    /// such a request missed a route for that address (`host = "198.18.1.6"`) whose host the
    /// backend then served it as. `None` only for a host that is not UTF-8, which
    /// [`valid_host`] lets through none of.
    pub(super) fn routing_host(&self, listen: SocketAddr) -> Option<Cow<'_, str>> {
        match (self.host, &self.host_out) {
            (_, Some(HostOut::Listen)) => Some(Cow::Owned(listen.to_string())),
            (Some(h), _) => std::str::from_utf8(h).ok().map(Cow::Borrowed),
            (None, _) => None,
        }
    }
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
pub(super) fn target(req: &ReqHead, normalize: bool) -> Option<Target<'_>> {
    let mut t = target_as_sent(req)?;
    if normalize
        && let Cow::Borrowed(p) = t.path
        && p.starts_with('/')
    {
        t.path = path::normalize(p)?;
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
/// an IPv6 literal in brackets; the port digits only, and a port, 0..=65535, if there are any),
/// not empty, without user information? Nothing looser: the router takes the host without a
/// port of digits, and backends cut at the first `:` (nginx) or ignore a bad port (Go), so
/// `admin.example:x` would reach a backend as `admin.example` while missing that host's route;
/// `a:99999` names no port at all, and backends that check (Apache Traffic Server) refuse it.
fn valid_host(h: &[u8]) -> bool {
    let (host, port) = match h.first() {
        Some(b'[') => match h.iter().position(|&b| b == b']') {
            Some(end) => h.split_at(end + 1),
            None => return false,
        },
        _ => h.split_at(h.iter().position(|&b| b == b':').unwrap_or(h.len())),
    };
    // Leading zeros count for nothing (`port = *DIGIT`); an empty port is the grammar's too.
    let port_ok = port.split_first().is_none_or(|(&colon, digits)| {
        colon == b':'
            && digits
                .iter()
                .try_fold(0u32, |n, &d| {
                    let n = n * 10 + u32::from(d.wrapping_sub(b'0'));
                    (d.is_ascii_digit() && n <= u32::from(u16::MAX)).then_some(n)
                })
                .is_some()
    });
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
pub(super) struct ForwardedClient {
    /// The address, for X-Forwarded-For.
    xff: String,
    /// The `for=` parameter of Forwarded (an IPv6 address quoted and bracketed, RFC 7239).
    forwarded: String,
}

impl ForwardedClient {
    pub(super) fn new(peer: SocketAddr) -> Self {
        let ip = client_ip(peer);
        let forwarded = match ip {
            IpAddr::V4(a) => format!("for={a}"),
            IpAddr::V6(a) => format!("for=\"[{a}]\""),
        };
        ForwardedClient { xff: ip.to_string(), forwarded }
    }
}

/// Writes the elements of `v`, a comma-separated list (RFC 9110 5.6.1), into `out`, each
/// followed by `, `, leaving out the empty ones (an empty header, `a,,b`, a trailing comma,
/// whitespace alone): a recipient must ignore them, but written on in front of the element the
/// proxy appends they make `X-Forwarded-For: , 198.18.4.1` or `for=a,,, for=b`, which a strict
/// parser refuses, or reads as an empty address. A comma inside a quoted string (a Forwarded
/// `for="[2001:db8::1]:80"` has none, an obfuscated identifier may) does not end an element;
/// each element goes on as it was, but for the whitespace around it.
fn list_elements(out: &mut BytesMut, v: &[u8]) {
    let mut rest = v;
    loop {
        let (mut at, mut quoted) = (0, false);
        while let Some(&b) = rest.get(at) {
            match b {
                b'"' => quoted = !quoted,
                b'\\' if quoted => at += 1,
                b',' if !quoted => break,
                _ => {}
            }
            at += 1;
        }
        let (element, after) = rest.split_at(at.min(rest.len()));
        let element = element.trim_ascii();
        if !element.is_empty() {
            out.extend_from_slice(element);
            out.extend_from_slice(b", ");
        }
        match after.split_first() {
            Some((_, more)) => rest = more,
            None => return,
        }
    }
}

/// Does `v` parse as a Forwarded value (RFC 7239 4) with at least one parameter: elements
/// separated by commas (with optional whitespace around them, and empty ones allowed, as in
/// every list, RFC 9110 5.6.1), each of parameters separated by `;` (empty ones allowed), each
/// `token=token` or `token=quoted-string`. Nothing else (no whitespace around `;` or `=`): then
/// a parser that reads the value strictly reads the element the proxy appends behind it as the
/// last one, whatever the client sent. One pass, no allocation.
pub(super) fn valid_forwarded(v: &[u8]) -> bool {
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

/// The largest request head to a backend written in the connection's own buffer
/// ([`upstream_head`]), which keeps the room of the heads it held: the usual head of a few
/// hundred bytes, and then some.
pub(super) const UPSTREAM_HEAD_KEEP: usize = 4 * 1024;

/// The request head as sent to the backend (shared by every attempt without copying), written
/// into `out` (empty; the connection's, whose room comes back once the head sent before is
/// dropped: no allocation per request) and split off it; a head above [`UPSTREAM_HEAD_KEEP`]
/// is written into a buffer of its own instead, freed with it. An upgrade request (`upgrade`,
/// from [`upgrade_of`]) keeps its `Upgrade` header and says `Connection: upgrade`. The request
/// line and Host come from `target` (`listen` names the address the client connected to, for
/// a Host the proxy adds). With `forwarded_for`, the client's forwarding headers are replaced
/// by ones that append that client (Forwarded values that are not RFC 7239 left out: see
/// [`valid_forwarded`]; and empty list elements of both: see [`list_elements`]). Without
/// `reuse` (the connection will not be kept: no keep-alive, or a PROXY client's last request)
/// the request says `Connection: close`: the backend then closes first, and the TIME_WAIT of
/// each connection stays on its side (see [`close_after_backend`]).
///
/// [`close_after_backend`]: super::upstream_pool::close_after_backend
/// [`upgrade_of`]: super::upgrade_of
#[allow(clippy::too_many_arguments)]
pub(super) fn upstream_head(
    out: &mut BytesMut,
    req: &ReqHead,
    target: &Target,
    listen: SocketAddr,
    framing: Framing,
    upgrade: Option<&[u8]>,
    forwarded_for: Option<&ForwardedClient>,
    reuse: bool,
) -> Bytes {
    let head = &req.head;
    let need = 256 + head.bytes.len();
    // A large head gets a buffer of its own, freed with it: the connection's buffer takes back
    // the room of each head it held, so one large head would keep that much allocated for as
    // long as the connection lasts (up to `max_header_bytes` per idle keep-alive connection).
    let mut own = BytesMut::new();
    let out = if need > UPSTREAM_HEAD_KEEP { &mut own } else { out };
    out.reserve(need);
    out.extend_from_slice(req.method().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    match target.host_out {
        Some(HostOut::Authority(a)) => {
            out.extend_from_slice(b"Host: ");
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        // Writes into a BytesMut cannot fail.
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
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(client) = forwarded_for {
        // Every earlier hop the client's headers list, in order, then this one (backends take
        // the rightmost element they trust, as with nginx and HAProxy). A Forwarded value that
        // is not RFC 7239 is dropped: an unterminated quoted string in it would swallow this
        // hop's element for the backend's parser. Empty elements are left out.
        let append = |out: &mut BytesMut, name: &str, keep: fn(&[u8]) -> bool| {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            for v in header(head, name).filter(|v| keep(v)) {
                list_elements(out, v);
            }
        };
        append(out, "X-Forwarded-For", |_| true);
        out.extend_from_slice(client.xff.as_bytes());
        out.extend_from_slice(b"\r\nX-Forwarded-Proto: http\r\n");
        append(out, "Forwarded", valid_forwarded);
        out.extend_from_slice(client.forwarded.as_bytes());
        out.extend_from_slice(b";proto=http\r\n");
    }
    if let Some(n) = hops {
        out.extend_from_slice(b"Max-Forwards: ");
        put_decimal(out, n - 1);
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        transfer_encoding(out, head);
    }
    // A request framed without a body that had a Content-Length had one of 0: body_framing
    // refuses any other value that does not frame a body.
    content_length(out, framing, had_length.then_some(0));
    match upgrade {
        Some(protocol) => {
            out.extend_from_slice(b"Upgrade: ");
            out.extend_from_slice(protocol);
            out.extend_from_slice(b"\r\nConnection: upgrade\r\n\r\n");
        }
        None if reuse => out.extend_from_slice(b"Connection: keep-alive\r\n\r\n"),
        None => out.extend_from_slice(b"Connection: close\r\n\r\n"),
    }
    out.split().freeze()
}
