//! Request paths in one normal form, so that routing by path prefix and the backend agree on
//! which path a request names.
//!
//! Without it, `/static/../admin`, `/%61dmin` and `//admin` all miss a route for `/admin` and
//! go to the default pool, while most backends (and every filesystem) serve them as `/admin`:
//! a path route could be walked around. nginx normalizes the same way before it matches
//! locations; Envoy offers it as `normalize_path` and `merge_slashes`.

use std::borrow::Cow;

/// `target` (an origin-form request target: a path starting with `/`, maybe a query) with its
/// path in normal form: percent-encoded unreserved characters decoded and other escapes' hex
/// digits in upper case (RFC 3986 6.2.2.1-2), raw bytes past ASCII (UTF-8 sent unencoded)
/// percent-encoded as clients encode them (so `/ü` and `/%C3%BC` are one path, as they are to
/// backends, which decode both), dot segments removed (5.2.4, which also keeps a path from
/// climbing above the root) and runs of slashes merged, as nginx's default `merge_slashes`
/// does. The query is left as it is, and encoded slashes (`%2F`) stay encoded: they are data,
/// not separators. Other escapes stay too (`%3A` is not `:` here): the backend gets them as
/// sent, and [`escapes_decoded`] is the reading that decodes them. `None` for a malformed
/// escape (`%` not followed by two hex digits), which a request must not carry, and for a path
/// that common backends read as another one than its normal form says ([`ambiguous`]).
/// Borrowed when the path is already normal, as nearly every request's is: the check is one
/// pass over its bytes.
pub fn normalize(target: &str) -> Option<Cow<'_, str>> {
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    if path.contains(['\\', ';']) && ambiguous(path) {
        return None;
    }
    if !path.contains('%')
        && path.is_ascii()
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..")
    {
        return Some(Cow::Borrowed(target));
    }
    let decoded = unescape(path)?;
    if ambiguous(&decoded) {
        return None;
    }
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    // Whether the path ends in a directory: a trailing slash, or a last `.` or `..` segment.
    let mut directory = false;
    for (i, &s) in segments.iter().enumerate() {
        directory = match s {
            "" => i + 1 == segments.len(),
            "." => true,
            ".." => {
                kept.pop();
                true
            }
            s => {
                kept.push(s);
                false
            }
        };
    }
    let mut out = String::with_capacity(target.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if kept.is_empty() || directory {
        out.push('/');
    }
    out.push_str(query);
    Some(Cow::Owned(out))
}

/// The path of `target` (in normal form, from [`normalize`]) as backends read it that decode an
/// escaped slash or backslash (`%2F`, `%5C`) into a separator before they resolve the path
/// (nginx, WSGI servers such as gunicorn, IIS): in normal form, with its query. `None` when the
/// path holds no such escape and has no other reading; `Some(Err(()))` when that reading is
/// itself one to refuse ([`normalize`] gives `None` for it). The proxy keeps such escapes as
/// data, and refuses a request this reading would route elsewhere: `/admin%2Fx` and
/// `/static/..%2Fadmin/x` would otherwise miss a route for `/admin/` that those backends then
/// serve them by.
pub fn separators_decoded(target: &str) -> Option<Result<String, ()>> {
    let path = &target[..target.find('?').unwrap_or(target.len())];
    if !path.contains("%2F") && !path.contains("%5C") {
        return None;
    }
    let read = path.replace("%2F", "/").replace("%5C", "/") + &target[path.len()..];
    Some(normalize(&read).map(Cow::into_owned).ok_or(()))
}

/// The path of `target` (in normal form, from [`normalize`]) as backends read it that drop the
/// `;` parameters of each segment before they match it (Tomcat, Jetty, Spring: `/admin;x/secret`
/// is `/admin/secret` to them, and `/;x/admin` is `/admin`): in normal form, with its query.
/// `None` when the path has no `;`; `Some(Err(()))` when that reading is itself one to refuse
/// ([`normalize`] gives `None` for it). The proxy routes the path as sent, and refuses a request
/// this reading would route elsewhere, which would otherwise miss a route for `/admin/` that
/// those backends then serve it by; parameters that keep a path on its pool (`;jsessionid=`)
/// go on as sent.
pub fn params_stripped(target: &str) -> Option<Result<String, ()>> {
    let path = &target[..target.find('?').unwrap_or(target.len())];
    if !path.contains(';') {
        return None;
    }
    let mut read = String::with_capacity(target.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            read.push('/');
        }
        read.push_str(segment.split(';').next().unwrap_or_default());
    }
    read.push_str(&target[path.len()..]);
    Some(normalize(&read).map(Cow::into_owned).ok_or(()))
}

/// The path of `target` (in normal form, from [`normalize`]) as backends read it that decode
/// every escape before they match it (nginx, Go's `URL.Path`, WSGI's `PATH_INFO`): `/v1%3Aadmin/`
/// is `/v1:admin/` to them, and `/a%7Cb` is `/a|b`. Spelled as route prefixes must be
/// (`config::routes` holds them to it), so that it can be routed: each character raw, but those
/// [`spelled_escaped`], which stay (or become, as a raw `;` does) escapes; escaped slashes and
/// backslashes stay escaped too, [`separators_decoded`] being their reading. With its query.
/// `None` when that is the path itself; `Some(Err(()))` for a malformed escape, which a path in
/// normal form does not hold. The proxy routes the path as sent, and refuses a request this
/// reading would route elsewhere: with a route for `/v1:admin/`, `/v1%3Aadmin/x` would
/// otherwise go to the default pool while the backend serves it as `/v1:admin/x`.
pub fn escapes_decoded(target: &str) -> Option<Result<String, ()>> {
    let path = &target[..target.find('?').unwrap_or(target.len())];
    if !path.bytes().any(spelled_escaped) {
        return None;
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(target.len());
    let mut i = 0;
    while i < b.len() {
        let (v, escaped) = match b[i] {
            b'%' => {
                let Some(v) = escape_at(b, i) else { return Some(Err(())) };
                i += 3;
                (v, true)
            }
            v => {
                i += 1;
                (v, false)
            }
        };
        if spelled_escaped(v) || (escaped && matches!(v, b'/' | b'\\')) {
            push_escape(&mut out, v);
        } else {
            out.push(v);
        }
    }
    if out == b {
        return None;
    }
    // Bytes past ASCII are written escaped: each byte is an ASCII character.
    let mut read: String = out.into_iter().map(char::from).collect();
    read.push_str(&target[path.len()..]);
    Some(Ok(read))
}

/// Is `v` spelled escaped in [`escapes_decoded`]'s reading, and in route prefixes: a byte a
/// path cannot hold raw (controls, space, bytes past ASCII, `%`, `?`, `#`), `;`, which raw
/// starts a segment's parameters and escaped is data, and those browsers escape in a path (`"`,
/// `<`, `>`, `` ` ``, `{`, `}`: the WHATWG URL standard's path percent-encode set), so that the
/// spelling browsers send takes its route directly? Every other character is spelled raw, as
/// browsers send it (`:`, `@`, `|`, `!`, ...).
fn spelled_escaped(v: u8) -> bool {
    !v.is_ascii_graphic() || b"%?#;\"<>`{}".contains(&v)
}

/// Does `path` hold what backends on other platforms read as separators or dot segments, though
/// its normal form does not: a backslash (IIS and Windows-hosted servers take it for `/`), or a
/// dot segment with parameters (`..;x`, which Tomcat, Jetty and Spring take for `..`)? Either
/// would let a request walk around a path route; such requests get 400.
fn ambiguous(path: &str) -> bool {
    path.contains('\\')
        || path
            .split('/')
            .any(|s| s.contains(';') && matches!(s.split(';').next(), Some(".") | Some("..")))
}

/// `path` with escapes of unreserved characters decoded, the others' hex digits upper-cased
/// and raw bytes past ASCII encoded; `None` for a malformed escape.
fn unescape(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii() {
            push_escape(&mut out, b[i]);
            i += 1;
            continue;
        }
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let v = escape_at(b, i)?;
        if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
            out.push(v);
        } else {
            push_escape(&mut out, v);
        }
        i += 3;
    }
    // Every byte past ASCII was encoded: the bytes are ASCII.
    String::from_utf8(out).ok()
}

/// Appends `v` percent-encoded, hex digits in upper case (the normal form's, RFC 3986 6.2.2.1).
fn push_escape(out: &mut Vec<u8>, v: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend([b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]]);
}

/// The byte escaped at `b[i]` (a `%`): `None` unless two hex digits follow.
fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    let d = b.get(i + 1..i + 3)?;
    Some(hex(d[0])? << 4 | hex(d[1])?)
}

/// The value of hex digit `d`.
fn hex(d: u8) -> Option<u8> {
    (d as char).to_digit(16).map(|v| v as u8)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn paths_are_normalized_and_normal_ones_borrowed() {
        let n = |t: &str| normalize(t).map(|c| c.into_owned());
        for t in ["/", "/a", "/a/b/", "/a.b/c..d/.e", "/a?x=/../&y=%zz", "/a/b?"] {
            assert!(matches!(normalize(t), Some(std::borrow::Cow::Borrowed(_))), "{t}");
        }
        for (t, want) in [
            ("/static/../admin", "/admin"),
            ("/a/./b", "/a/b"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("//admin", "/admin"),
            ("/a//b///c/", "/a/b/c/"),
            ("//", "/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("/a/%2E/b?q=%2e", "/a/b?q=%2e"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2F..%2Fb", "/a%2F..%2Fb"),
            ("/%7E%5f%2D", "/~_-"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/é/../x", "/x"),
            // Raw UTF-8 is spelled as clients encode it (the query stays as sent).
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/\u{fc}/x?q=\u{fc}", "/%C3%BC/x?q=\u{fc}"),
            ("/%C3%BC/\u{fc}", "/%C3%BC/%C3%BC"),
        ] {
            assert_eq!(n(t).as_deref(), Some(want), "{t}");
        }
        for t in ["/%", "/%4", "/a%zz", "/%+1", "/%4g"] {
            assert_eq!(n(t), None, "{t}");
        }
        // What other platforms read as separators or dot segments: refused.
        for t in
            ["/public\\..\\admin", "/a\\b", "/public/..;/admin", "/a/.;x/b", "/p/%2e%2e;/admin"]
        {
            assert_eq!(n(t), None, "{t}");
        }
        // Parameters elsewhere, and in the query, are fine.
        assert_eq!(n("/a;v=1/b").as_deref(), Some("/a;v=1/b"));
        assert_eq!(n("/a?x=..;\\").as_deref(), Some("/a?x=..;\\"));
    }

    #[test]
    fn escaped_separators_have_a_second_reading() {
        let read = |t: &str| super::separators_decoded(&normalize(t).unwrap());
        assert_eq!(read("/admin/x?a=%2F"), None, "only the path counts");
        for (t, want) in [
            ("/admin%2Fx", "/admin/x"),
            ("/static/..%2Fadmin/x", "/admin/x"),
            ("/%2F%2Fadmin/x?q", "/admin/x?q"),
            ("/a%5C..%5Cadmin", "/admin"),
            ("/group%2fproject", "/group/project"),
            ("/p/..%2F;x/admin", "/;x/admin"),
        ] {
            assert_eq!(read(t), Some(Ok(want.to_owned())), "{t}");
        }
        assert_eq!(read("/p%2F..;/admin"), Some(Err(())), "a dot segment with parameters");
    }

    #[test]
    fn segment_parameters_have_a_second_reading() {
        let read = |t: &str| super::params_stripped(&normalize(t).unwrap());
        assert_eq!(read("/admin/x?a=;b"), None, "only the path counts");
        for (t, want) in [
            ("/admin;x/secret", "/admin/secret"),
            ("/;x/admin/secret", "/admin/secret"),
            ("/a;v=1/b;c=2?q;r", "/a/b?q;r"),
            ("/app/page;jsessionid=AB12", "/app/page"),
            ("/x/;/admin/", "/x/admin/"),
            ("/x;a/y;b/", "/x/y/"),
        ] {
            assert_eq!(read(t), Some(Ok(want.to_owned())), "{t}");
        }
    }

    /// Backends that decode every escape read `%3A` as `:`: that reading spells each character
    /// raw but those a path cannot hold raw, `;` and those browsers escape, which it spells
    /// escaped (a raw `;` too), and it leaves escaped slashes and backslashes to
    /// [`super::separators_decoded`].
    #[test]
    fn other_escapes_have_a_decoded_reading() {
        let read = |t: &str| super::escapes_decoded(&normalize(t).unwrap());
        for t in
            ["/", "/admin/x", "/a%2Fb%5Cc", "/%C3%BC/x", "/a%3Bb", "/a%20b%25c%3F%23", "/x?a=%3A"]
        {
            assert_eq!(read(t), None, "{t}: already so spelled");
        }
        for (t, want) in [
            ("/v1%3Aadmin/x", "/v1:admin/x"),
            ("/x%40y/z?q=%40", "/x@y/z?q=%40"),
            ("/a%7cb/x", "/a|b/x"),
            ("/%21%24%26%27%28%29%2A%2B%2C%3D%5B%5D%5E", "/!$&'()*+,=[]^"),
            ("/a;b/c%7Bd%7D", "/a%3Bb/c%7Bd%7D"),
            ("/a{b}\"<>`", "/a%7Bb%7D%22%3C%3E%60"),
            ("/%2F%3A%5C", "/%2F:%5C"),
        ] {
            assert_eq!(read(t), Some(Ok(want.to_owned())), "{t}");
        }
        assert_eq!(super::escapes_decoded("/a%zz"), Some(Err(())));
        assert_eq!(super::escapes_decoded("/a%3"), Some(Err(())));
    }
}
