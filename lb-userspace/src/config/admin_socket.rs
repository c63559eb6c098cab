//! Which admin socket a config file names, read leniently ([`admin_socket_of`]): the admin
//! commands (`edgelb reload`, `stop`, `status`...) must find the running controller even when
//! the file now holds an invalid config, yet never fall back to the default socket when the
//! file means another (a misspelt key, a broken line), since a `stop` sent there would stop
//! another edgelb. Apart from validation, which refuses such a file outright.

use std::path::{Path, PathBuf};

use super::{
    DEFAULT_ADMIN_SOCKET,
    file::{line_col, read_bytes},
    message::{parser_message, quoted, quoted_as_written},
};

/// The admin socket named by the config at `path`, read leniently: `edgelb reload` must find the
/// running controller even when the file now holds an invalid config. The default when the file
/// does not set one; an error when it sets one that is not a string (`admin_socket = 5`), which
/// names no socket, and the default may be another edgelb's. A file that cannot be read is an error, not the default socket: a mistyped
/// `-c` would otherwise send `stop` to whichever edgelb owns the default. A file that is not even TOML is searched for an
/// `admin_socket = "..."` line; if it has one that cannot be read, or more than one, the answer
/// is an error rather than the default socket, which may be another edgelb's (a `stop` sent there
/// would stop the wrong one). A file that is not all UTF-8 (a comment saved as Latin-1) is read
/// with each byte that is not as U+FFFD, which leaves the rest, and its `admin_socket`, as it
/// is; only a socket path that itself held such a byte is an error.
pub fn admin_socket_of(path: &Path) -> Result<PathBuf, String> {
    let (bytes, _) = read_bytes(path).map_err(|e| {
        format!(
            "cannot read {} ({e}): the config names the admin socket of the edgelb to talk to; give the file edgelb runs with (-c), or the socket itself (--socket)",
            path.display()
        )
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let socket = admin_socket_in(&text, path)?;
    if matches!(text, std::borrow::Cow::Owned(_))
        && socket.to_string_lossy().contains(char::REPLACEMENT_CHARACTER)
    {
        return Err(format!(
            "{}: node.admin_socket holds a byte that is not UTF-8, so the admin socket is unclear: save the file as UTF-8, or give --socket",
            path.display()
        ));
    }
    Ok(socket)
}

/// The admin socket named by `text`, the config at `path`, as [`admin_socket_of`] reads it.
fn admin_socket_in(text: &str, path: &Path) -> Result<PathBuf, String> {
    let default = || PathBuf::from(DEFAULT_ADMIN_SOCKET);
    let e = match toml::from_str::<toml::Table>(text) {
        Ok(t) => {
            return match t.get("node").and_then(|n| n.get("admin_socket")) {
                None => match admin_socket_lookalike(text) {
                    None => Ok(default()),
                    // `admin_sockt`, `admin-socket`, or admin_socket in another table: the
                    // operator meant a socket, which the default may not be.
                    Some((key, at)) => {
                        let (line, col) = line_col(text, at);
                        Err(format!(
                            "{}:{line}:{col}: `{}` is not node.admin_socket, so the admin socket is unclear (the default, {DEFAULT_ADMIN_SOCKET}, may be another edgelb's): fix the file, or give --socket",
                            path.display(),
                            quoted(&key)
                        ))
                    }
                },
                Some(toml::Value::String(s)) => Ok(PathBuf::from(s)),
                // Set, but to no path: as unclear as a broken line, and no more the default.
                Some(v) => {
                    let at = admin_socket_at(text)
                        .map(|a| line_col(text, a))
                        .map_or(String::new(), |(line, col)| format!(":{line}:{col}"));
                    Err(format!(
                        "{}{at}: node.admin_socket is {} {}, not a path in quotes, so the admin socket is unclear: fix the file (e.g. admin_socket = \"{DEFAULT_ADMIN_SOCKET}\"), or give --socket",
                        path.display(),
                        v.type_str(),
                        quoted_as_written(&v.to_string())
                    ))
                }
            };
        }
        Err(e) => e,
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.split(['=', ' ', '\t']).next() == Some("admin_socket"))
        .collect();
    let value = |l: &str| {
        let v = l.split_once('=')?.1.trim();
        let v = v.strip_prefix('"')?;
        let end = v.find('"')?;
        let rest = v[end + 1..].trim();
        (rest.is_empty() || rest.starts_with('#')).then(|| PathBuf::from(&v[..end]))
    };
    // The last part of each line's key, for a line that may misspell admin_socket.
    let misspelled = text.lines().any(|l| {
        let key = l.trim().split(['=', ' ', '\t']).next().unwrap_or("");
        let last = key.rsplit('.').next().unwrap_or(key);
        last != "admin_socket" && looks_like_admin_socket(last)
    });
    match lines.as_slice() {
        [] if misspelled => Err(()),
        [] => Ok(default()),
        [l] => value(l).ok_or(()),
        _ => Err(()),
    }
    .map_err(|()| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        format!(
            "{}:{line}:{col}: {} (not TOML, so its admin_socket is unclear: fix the file, or give --socket)",
            path.display(),
            parser_message(e.message().trim())
        )
    })
}

/// Where the value of `node.admin_socket` starts in `text`, a TOML file.
fn admin_socket_at(text: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let (_, node) = root.get_ref().iter().find(|(k, _)| k.get_ref() == "node")?;
    let DeValue::Table(node) = node.get_ref() else { return None };
    let (_, socket) = node.iter().find(|(k, _)| k.get_ref() == "admin_socket")?;
    Some(socket.span().start)
}

/// The first key of `text` (a TOML file) that looks meant as `node.admin_socket` but is not
/// it, by its dotted path, with where it starts: a misspelling (`admin_sockt`, `admin-socket`,
/// `adminSocket`) or `admin_socket` in another table. The admin commands read the file
/// leniently, and without this would talk to the default socket, which may be another edgelb's
/// (a `stop` sent there stops the wrong one).
fn admin_socket_lookalike(text: &str) -> Option<(String, usize)> {
    use toml::de::{DeTable, DeValue};
    fn walk(t: &DeTable<'_>, path: &str) -> Option<(String, usize)> {
        for (k, v) in t.iter() {
            let name: &str = k.get_ref();
            let full = if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
            if full != "node.admin_socket" && looks_like_admin_socket(name) {
                return Some((full, k.span().start));
            }
            let found = match v.get_ref() {
                DeValue::Table(t) => walk(t, &full),
                DeValue::Array(items) => items.iter().find_map(|item| match item.get_ref() {
                    DeValue::Table(t) => walk(t, &full),
                    _ => None,
                }),
                _ => None,
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }
    walk(DeTable::parse(text).ok()?.get_ref(), "")
}

/// Does the key `name` look meant as `admin_socket`? Compared by its letters and digits alone,
/// case aside, within two edits, or naming both "admin" and "sock". No other key of the config
/// comes close.
fn looks_like_admin_socket(name: &str) -> bool {
    let n: Vec<u8> =
        name.bytes().filter(u8::is_ascii_alphanumeric).map(|b| b.to_ascii_lowercase()).collect();
    let contains = |w: &[u8]| n.windows(w.len()).any(|x| x == w);
    (contains(b"admin") && contains(b"sock")) || edit_distance(&n, b"adminsocket") <= 2
}

/// Levenshtein distance between `a` and `b`.
fn edit_distance(a: &[u8], b: &[u8]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let next = (diag + usize::from(x != y)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}
