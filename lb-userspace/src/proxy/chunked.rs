//! Finds where a chunked body ends without decoding it: the proxy forwards chunked bodies as they
//! are, byte for byte, and only needs to know which bytes belong to the message (anything after
//! is the next pipelined message). For an HTTP/1.0 client, which cannot read the chunked coding,
//! it also hands out where the chunk data lies, so the proxy can send the body decoded.

/// Chunked-encoding framing errors.
#[derive(Debug, PartialEq, Eq)]
pub struct BadChunk;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size; `digits` seen so far.
    Size { size: u64, digits: u8 },
    /// Whitespace after the size, which only a chunk extension may follow (RFC 9112 7.1.1: BWS
    /// before `;`; not before the line's end).
    Bws { size: u64 },
    /// Skipping a chunk extension up to CR.
    Ext { size: u64 },
    /// Inside a quoted-string of a chunk extension: it must end before the line does, or a
    /// parser that reads quoted strings on past CRLF would frame the body otherwise.
    ExtQuoted { size: u64 },
    /// After a backslash in a quoted-string (quoted-pair).
    ExtEscape { size: u64 },
    /// Expecting LF after the size line.
    SizeLf { size: u64 },
    /// Inside chunk data, this many bytes left.
    Data { left: u64 },
    /// Expecting CR after chunk data.
    DataCr,
    /// Expecting LF after chunk data.
    DataLf,
    /// In the trailer section, at the start of a line (len 0) or inside one; `colon` once the
    /// field name has ended.
    Trailer { line: u64, colon: bool },
    /// Expecting LF after a trailer line's CR.
    TrailerLf { line: u64 },
    /// The message is complete.
    Done,
}

/// Incremental chunked-body framer.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    /// Bytes of the current size line after its digits (whitespace and extensions).
    ext: u64,
    /// Bytes of the trailer section so far.
    trailers: u64,
    /// The field name of the current trailer line, in lower case, with `_` read as `-`, as far
    /// as [`TRAILER_NAME`] bytes (longer names are none of the refused ones).
    name: [u8; TRAILER_NAME],
    /// Its length (saturating past [`TRAILER_NAME`]).
    name_len: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size { size: 0, digits: 0 },
            ext: 0,
            trailers: 0,
            name: [0; TRAILER_NAME],
            name_len: 0,
        }
    }
}

/// Largest chunk size accepted (1 TiB: a bound against overflow, not a policy).
const MAX_CHUNK: u64 = 1 << 40;
/// Longest trailer line.
const MAX_TRAILER_LINE: u64 = 8192;
/// Most bytes after a chunk size's digits (whitespace and extensions, which the proxy passes
/// on unread): without a bound, one size line could stream extension bytes for ever, which no
/// body needs (nginx takes a whole size line within its 4 KiB-ish buffer as well).
const MAX_EXTENSION: u64 = 4096;
/// Most bytes of a trailer section, every line together: the default `max_header_bytes`. One
/// line is bounded by [`MAX_TRAILER_LINE`]; without this, a sender could stream trailer lines
/// for ever.
const MAX_TRAILER_SECTION: u64 = 16 * 1024;
/// Longest trailer field name kept to compare with [`REFUSED_TRAILERS`].
const TRAILER_NAME: usize = 17;
/// Fields a trailer section must not carry (RFC 9110 6.5.1: framing and routing), however
/// spelled (in any case, and with `_` for `-`, as CGI-style backends read names): the proxy
/// framed and routed the message by its head, and a recipient that merges trailers into the
/// head (many do) could reframe or reroute it.
const REFUSED_TRAILERS: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];

impl Chunked {
    /// True once the terminating chunk and trailers were seen.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes `input`; returns how many of its bytes belong to the body (all of them unless
    /// the body ended inside `input`).
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, BadChunk> {
        self.feed_with(input, |_| {})
    }

    /// [`feed`](Self::feed), also handing `data` the range of `input` each run of chunk data
    /// takes up, in order: what the body is once decoded (for a client that cannot read the
    /// chunked coding).
    pub fn feed_with(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data { left } => {
                    let take = left.min((input.len() - i) as u64);
                    data(i..i + take as usize);
                    i += take as usize;
                    self.state = if left == take {
                        State::DataCr
                    } else {
                        State::Data { left: left - take }
                    };
                    continue;
                }
                State::Size { size, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).expect("hex digit") as u64;
                        let size = size * 16 + d;
                        if size > MAX_CHUNK || digits >= 16 {
                            return Err(BadChunk);
                        }
                        State::Size { size, digits: digits + 1 }
                    }
                    b';' if digits > 0 => {
                        self.ext = 0;
                        State::Ext { size }
                    }
                    b' ' | b'\t' if digits > 0 => {
                        self.ext = 0;
                        State::Bws { size }
                    }
                    b'\r' if digits > 0 => State::SizeLf { size },
                    _ => return Err(BadChunk),
                },
                State::Bws { .. }
                | State::Ext { .. }
                | State::ExtQuoted { .. }
                | State::ExtEscape { .. }
                    if self.ext > MAX_EXTENSION =>
                {
                    return Err(BadChunk);
                }
                // "0 1", "6\tx=1" or "0 " may be read otherwise by a laxer parser downstream.
                State::Bws { size } => match b {
                    b' ' | b'\t' => State::Bws { size },
                    b';' => State::Ext { size },
                    _ => return Err(BadChunk),
                },
                State::Ext { size } => match b {
                    b'\r' => State::SizeLf { size },
                    b'"' => State::ExtQuoted { size },
                    // Control characters (bare LF, NUL...) have no place in an extension.
                    b'\t' => State::Ext { size },
                    0..=0x1f | 0x7f => return Err(BadChunk),
                    _ => State::Ext { size },
                },
                // RFC 9110 5.6.4: qdtext and quoted-pair, no CR or LF: an unterminated string
                // is refused at the line's end.
                State::ExtQuoted { size } => match b {
                    b'"' => State::Ext { size },
                    b'\\' => State::ExtEscape { size },
                    b'\t' => State::ExtQuoted { size },
                    0..=0x1f | 0x7f => return Err(BadChunk),
                    _ => State::ExtQuoted { size },
                },
                State::ExtEscape { size } => match b {
                    b'\t' => State::ExtQuoted { size },
                    0..=0x1f | 0x7f => return Err(BadChunk),
                    _ => State::ExtQuoted { size },
                },
                State::SizeLf { size } => match (b, size) {
                    (b'\n', 0) => {
                        self.name_len = 0;
                        State::Trailer { line: 0, colon: false }
                    }
                    (b'\n', n) => State::Data { left: n },
                    _ => return Err(BadChunk),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(BadChunk),
                },
                State::DataLf => match b {
                    b'\n' => State::Size { size: 0, digits: 0 },
                    _ => return Err(BadChunk),
                },
                // Trailer fields are forwarded as they are, so each must be a well-formed
                // `name: value` line (RFC 9112 7.1.2, 5): a line a laxer parser downstream could
                // read as a request (no colon), a folded line, or a control byte (NUL, a bare
                // CR or LF) is refused.
                State::Trailer { line, colon } => match b {
                    _ if line >= MAX_TRAILER_LINE || self.trailers >= MAX_TRAILER_SECTION => {
                        return Err(BadChunk);
                    }
                    b'\r' if line == 0 || colon => State::TrailerLf { line },
                    b':' if line > 0 && !colon => {
                        let name = &self.name[..self.name_len.min(TRAILER_NAME)];
                        if self.name_len <= TRAILER_NAME && REFUSED_TRAILERS.contains(&name) {
                            return Err(BadChunk);
                        }
                        State::Trailer { line: line + 1, colon: true }
                    }
                    _ if !colon && super::http::is_tchar(b) => {
                        if let Some(slot) = self.name.get_mut(self.name_len) {
                            *slot = if b == b'_' { b'-' } else { b.to_ascii_lowercase() };
                        }
                        self.name_len = self.name_len.saturating_add(1);
                        State::Trailer { line: line + 1, colon }
                    }
                    b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff if colon => {
                        State::Trailer { line: line + 1, colon }
                    }
                    _ => return Err(BadChunk),
                },
                State::TrailerLf { line } => match (b, line) {
                    (b'\n', 0) => {
                        self.state = State::Done;
                        return Ok(i + 1);
                    }
                    (b'\n', _) => {
                        self.name_len = 0;
                        State::Trailer { line: 0, colon: false }
                    }
                    _ => return Err(BadChunk),
                },
            };
            match self.state {
                State::Bws { .. }
                | State::Ext { .. }
                | State::ExtQuoted { .. }
                | State::ExtEscape { .. } => self.ext += 1,
                State::Trailer { .. } | State::TrailerLf { .. } => self.trailers += 1,
                _ => {}
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `msg` whole: the body must end inside it, followed by `rest`.
    fn ends_before(msg: &[u8], rest: &[u8]) {
        let mut c = Chunked::default();
        let n = c.feed(msg).unwrap();
        assert!(c.done());
        assert_eq!(&msg[n..], rest);
    }

    #[test]
    fn finds_the_end_and_leaves_the_rest() {
        ends_before(
            b"4\r\nWiki\r\n5 ;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1",
            b"GET / HTTP/1.1",
        );
    }

    #[test]
    fn well_formed_trailers_pass() {
        ends_before(b"0\r\nX-T: 1\r\nChecksum:\tab c\xe9\r\nEmpty:\r\n\r\nnext", b"next");
    }

    #[test]
    fn works_byte_by_byte() {
        let msg = b"a\r\n0123456789\r\n0\r\n\r\n";
        let mut c = Chunked::default();
        for (i, b) in msg.iter().enumerate() {
            assert!(!c.done(), "done early at {i}");
            assert_eq!(c.feed(&[*b]).unwrap(), 1);
        }
        assert!(c.done());
    }

    #[test]
    fn hands_out_the_decoded_data() {
        let msg = b"4\r\nWiki\r\n5;e=1\r\npedia\r\n0\r\n\r\nnext";
        for split in 0..msg.len() {
            let (mut c, mut body) = (Chunked::default(), Vec::new());
            let (first, second) = msg.split_at(split);
            let mut end = c.feed_with(first, |r| body.extend_from_slice(&first[r])).unwrap();
            if !c.done() {
                end = split + c.feed_with(second, |r| body.extend_from_slice(&second[r])).unwrap();
            }
            assert!(c.done());
            assert_eq!(&msg[end..], b"next", "split at {split}");
            assert_eq!(body, b"Wikipedia", "split at {split}");
        }
    }

    /// Quoted extension values pass when they end on their line (with escapes); one left open
    /// at the line's end is refused: a parser that reads quoted strings on past CRLF would take
    /// the body's next bytes for part of the extension.
    #[test]
    fn quoted_extension_values_must_close_on_their_line() {
        ends_before(b"5;x=\"a;b\\\"c\"\r\npedia\r\n0\r\n\r\nnext", b"next");
        for bad in [&b"5;x=\"a\r\npedia\r\n0\r\n\r\n"[..], b"5;x=\"a\\\"\r\nx", b"5;x=\"\x01\"\r\n"]
        {
            assert_eq!(
                Chunked::default().feed(bad),
                Err(BadChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Extensions are bounded per size line, and the trailer section as a whole: a sender can
    /// no longer stream either for ever. Up to the bounds they pass.
    #[test]
    fn extensions_and_trailers_are_bounded() {
        let ext = |n: usize| format!("5;x={}\r\npedia\r\n0\r\n\r\nnext", "a".repeat(n));
        // `;x=` and the value: the 4 KiB hold the whole extension.
        ends_before(ext(4096 - 3).as_bytes(), b"next");
        assert_eq!(Chunked::default().feed(ext(4096 - 2).as_bytes()), Err(BadChunk));
        // Each size line has the whole allowance.
        let two = format!("1;{0}\r\na\r\n1;{0}\r\nb\r\n0\r\n\r\nnext", "e".repeat(4000));
        ends_before(two.as_bytes(), b"next");
        // Whitespace before a `;` counts too.
        let ws = format!("5{};x\r\n", " ".repeat(5000));
        assert_eq!(Chunked::default().feed(ws.as_bytes()), Err(BadChunk));
        // Trailer lines each within the line limit, but the section over 16 KiB.
        let section = |lines: usize| {
            let mut t = b"0\r\n".to_vec();
            for i in 0..lines {
                t.extend(format!("X-{i:04}: {}\r\n", "v".repeat(1000)).bytes());
            }
            t.extend(b"\r\nnext");
            t
        };
        ends_before(&section(15), b"next");
        let mut c = Chunked::default();
        let big = section(17);
        // Fed in pieces, as it arrives: the bound holds across reads.
        let fed = big.chunks(700).try_for_each(|p| c.feed(p).map(drop));
        assert_eq!(fed, Err(BadChunk));
    }

    /// Trailer fields that would reframe or reroute the message, in any spelling, are refused;
    /// names that only begin like them pass.
    #[test]
    fn framing_and_routing_fields_are_refused_in_trailers() {
        for name in [
            "Content-Length",
            "content-length",
            "Content_Length",
            "TRANSFER-ENCODING",
            "Transfer_Encoding",
            "Host",
            "hOsT",
        ] {
            let msg = format!("0\r\n{name}: 5\r\n\r\n");
            assert_eq!(Chunked::default().feed(msg.as_bytes()), Err(BadChunk), "{name}");
            // Byte by byte too.
            let mut c = Chunked::default();
            let fed = msg.as_bytes().chunks(1).try_for_each(|b| c.feed(b).map(drop));
            assert_eq!(fed, Err(BadChunk), "{name} byte by byte");
        }
        ends_before(
            b"0\r\nHosts: a\r\nX-Host: b\r\nContent-Length-X: 1\r\nTransfer-Encodings: x\r\n\r\nnext",
            b"next",
        );
        // The name of each line counts alone.
        ends_before(b"0\r\nX-A: Host\r\nContent-MD5: x\r\n\r\nnext", b"next");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"4\nWiki",
            b"4\r\nWikiX",
            b"fffffffffffffffff\r\n",
            b"0 1\r\n",
            b"0 \r\n",
            b"6\tx=1\r\n",
            b"+6\r\n",
            b"6;a\x00b\r\n",
            // Trailers that are not `name: value` lines: a request line, NUL, a folded line,
            // no name, a bare CR.
            b"0\r\nGET /x HTTP/1.1\r\n\r\n",
            b"0\r\nX: a\x00b\r\n\r\n",
            b"0\r\nX: a\r\n b\r\n\r\n",
            b"0\r\n: a\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
        ] {
            assert_eq!(
                Chunked::default().feed(bad),
                Err(BadChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
