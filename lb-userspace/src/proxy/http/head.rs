//! Message heads: request and response heads parsed (httparse) into [`Head`]s kept as the
//! bytes they arrived in, and what the proxy reads in them or writes from them: headers and
//! their tokens, the `Connection` options and hop-by-hop headers, connection-bound
//! authentication, Max-Forwards, body framing (RFC 9112 6.3), the one Content-Length and
//! Transfer-Encoding a forwarded message carries, a response's status line and headers. Apart
//! from the connection loop (`super`) because none of it does I/O: bytes in, answers out, which
//! is where a request is refused as malformed or ambiguous (request smuggling), and what the
//! unit tests and the request-head bench (`parse_request_for_bench`) exercise.

use std::mem::MaybeUninit;

use ahash::AHashMap;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

use super::{MAX_RESPONSE_HEAD_BYTES, MAX_RESPONSE_HEADERS};

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
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

/// Headers whose positions a head keeps in itself ([`Head::headers`]); only a head with more
/// allocates. As many as most requests and responses have: browsers send ten to twenty.
const INLINE_HEADERS: usize = 16;

/// Where each header's name and value lie in a head's bytes, in order.
type Spans = SmallVec<[(Span, Span); INLINE_HEADERS]>;

/// A parsed message head, kept as the bytes it arrived in (split off the read buffer, not
/// copied); names, values, method, path and reason are positions in them. This saves the two
/// allocations per header that owned strings cost, and the positions themselves are kept in
/// the head (up to [`INLINE_HEADERS`]): no allocation per head either.
pub(super) struct Head {
    pub(super) bytes: Bytes,
    headers: Spans,
    /// What its Connection headers say, found once, as the head is parsed.
    pub(super) connection: ConnectionOptions,
}

/// What a head's `Connection` headers say (RFC 9112 9.6, RFC 9110 7.6.1), found in one pass
/// over their tokens when the head is parsed. Every header is then checked against them in
/// constant time, however many tokens there are: checked against every token, a head with many
/// headers and a long Connection list (1000 headers and half a million tokens fit in 1 MiB)
/// cost its proxy thread seconds, and every connection on that thread waited.
#[derive(Default)]
pub(super) struct ConnectionOptions {
    /// `close` is listed.
    pub(super) close: bool,
    /// `keep-alive` is listed.
    pub(super) keep_alive: bool,
    /// `upgrade` is listed.
    pub(super) upgrade: bool,
    /// By header index: does a token name that header, which is hop-by-hop then (never Host:
    /// see [`Head::end_to_end`])? Empty when no token names any header (the usual case: no
    /// allocation).
    pub(super) named: Vec<bool>,
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
    fn new(bytes: Bytes, headers: Spans) -> Head {
        let mut head = Head { bytes, headers, connection: ConnectionOptions::default() };
        head.connection = ConnectionOptions::of(&head);
        head
    }

    /// (name, value) of every header that goes on to the next hop, in order: not the
    /// hop-by-hop ones (RFC 9110 7.6.1), by the fixed list or because a `Connection` token
    /// names them. Not Host, whatever `Connection` says: it is meant for every recipient, and
    /// the proxy routes by it, so the backend must get the one the proxy read.
    pub(super) fn end_to_end(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
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
    pub(super) fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers.iter().map(|&(n, v)| (self.at(n), self.at(v)))
    }

    /// Positions of `headers` within `buf`.
    fn spans(buf: &[u8], headers: &[httparse::Header]) -> Spans {
        headers.iter().map(|h| (Span::of(buf, h.name.as_bytes()), Span::of(buf, h.value))).collect()
    }
}

/// A parsed request head.
pub(super) struct ReqHead {
    pub(super) head: Head,
    method: Span,
    path: Span,
    pub(super) http10: bool,
}

impl ReqHead {
    pub(super) fn method(&self) -> &str {
        // httparse checked the method is a token (ASCII).
        std::str::from_utf8(self.head.at(self.method)).unwrap_or("")
    }

    pub(super) fn path(&self) -> &str {
        // httparse hands the path out as a str, so this always succeeds.
        std::str::from_utf8(self.head.at(self.path)).unwrap_or("/")
    }
}

pub(super) enum HeadError {
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
pub(super) struct HeadScan(usize);

impl HeadScan {
    /// Whether `buf` may hold a complete head (or a new error) since the last call.
    pub(super) fn worth_parsing(&mut self, buf: &[u8]) -> bool {
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
    pub(super) fn request_ready(&mut self, buf: &mut BytesMut) -> bool {
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
pub(super) fn parse_request(
    buf: &mut BytesMut,
    max_headers: usize,
) -> Result<Option<ReqHead>, HeadError> {
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
pub(super) fn header<'a>(head: &'a Head, name: &str) -> impl Iterator<Item = &'a [u8]> {
    head.headers().filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
}

/// The comma-separated tokens of every `name` header, trimmed (empty ones skipped), without
/// allocating.
pub(super) fn tokens<'a>(head: &'a Head, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
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
///
/// [`Private`]: super::upstream_pool::Private
pub(super) fn binds_connection(req: &Head, resp: &Head) -> bool {
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
///
/// [`upgrade_of`]: super::upgrade_of
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
pub(super) fn reads_as(name: &[u8], dashed: &str) -> bool {
    name.len() == dashed.len()
        && name
            .iter()
            .zip(dashed.bytes())
            .all(|(&a, b)| (if a == b'_' { b'-' } else { a.to_ascii_lowercase() }) == b)
}

/// Is `name` an underscore spelling of the header `dashed` (`Content_Length` for
/// `content-length`): one that the proxy does not take for it, but such backends do?
pub(super) fn underscore_spelling(name: &[u8], dashed: &str) -> bool {
    // The length first: most names are over before the scan for `_` would be.
    reads_as(name, dashed) && name.contains(&b'_')
}

/// Headers the proxy reads or writes itself, whose underscore spellings (`Keep_Alive`,
/// `X_Forwarded_For`) are never forwarded: a backend that takes `_` for `-` would read them as
/// the header the proxy handled, and act on the client's value (as nginx, which drops every
/// name with `_` by default, never forwards them). The framing headers are not here: a request
/// with an underscore spelling of one is refused ([`body_framing`]). Names without `-` (Host,
/// Connection, Upgrade, TE, Trailer, Expect) have no such spelling.
pub(super) const UNDERSCORE_DROPPED: [&str; 6] = [
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
pub(super) fn max_forwards(req: &ReqHead) -> Result<Option<u64>, ()> {
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
pub(super) fn content_length(out: &mut impl BufMut, framing: Framing, declared: Option<u64>) {
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
pub(super) fn put_decimal(out: &mut impl BufMut, mut n: u64) {
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
pub(super) fn transfer_encoding(out: &mut impl BufMut, head: &Head) {
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
pub(super) fn declared_length(head: &Head) -> Option<u64> {
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
///
/// [`response_head`]: super::response_head
pub(super) fn body_framing(head: &Head, request: bool) -> Result<Framing, ()> {
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

/// A parsed response head.
pub(super) struct RespHead {
    pub(super) head: Head,
    pub(super) status: u16,
    reason: Span,
    /// An HTTP/1.0 response: its connection persists only if it says `keep-alive`.
    pub(super) http10: bool,
    /// How its headers delimit its body ([`body_framing`]), found once, as the head is parsed:
    /// [`response_head`] refuses a final response whose framing is invalid, and the caller
    /// streams the body by it. Whether there is a body at all (not for a HEAD request, 1xx,
    /// 204 or 304) is the caller's to say.
    ///
    /// [`response_head`]: super::response_head
    pub(super) framing: Result<Framing, ()>,
}

impl RespHead {
    /// Has it a body whose end cannot be known: is it a final response other than 204 or 304,
    /// to a request other than HEAD (`head_request`; RFC 9112 6.3 items 1 and 2: such a
    /// response has no body whatever its head says, and its framing does not matter), with an
    /// invalid Content-Length and no Transfer-Encoding (item 5)?
    pub(super) fn unframable(&self, head_request: bool) -> bool {
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
    pub(super) fn bad_coding(&self, http10_client: bool, head_request: bool) -> bool {
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
pub(super) fn status_and_headers(out: &mut impl BufMut, resp: &RespHead) {
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
pub(super) fn parse_response(buf: &mut BytesMut) -> Result<Option<RespHead>, HeadError> {
    // Uninitialised slots, as for a request head (`parse_request`): filling 128 empty headers
    // (4 KiB) for every parse, whatever the head.
    let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
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
