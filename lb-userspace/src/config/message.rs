//! What the validator says, and how it quotes the file. A failure is a message at a place of
//! the file ([`Invalid`], made by [`bad`]); each value of the file a message quotes goes through
//! the quoting here ([`quoted`], [`quoted_as_written`], [`toml_string`], and [`parser_message`]
//! for the parser's own words), so that any value, however long or whatever it holds, comes out
//! short and escaped, and forges no line where the message goes. Kept in one place so that every
//! check, and the hints, quote alike.

use std::ops::Range;

/// A validation failure: where, and what.
pub(super) struct Invalid(pub(super) Range<usize>, pub(super) String);

/// The failure `message` at `span`, as a check returns it.
pub(super) fn bad<T>(span: Range<usize>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(span, message.into()))
}

/// The most characters of a value that a message quotes: enough to find the value by, while a
/// value of 70 000 bytes quoted whole made a 70 KB line of an error, a log or a terminal.
pub(crate) const QUOTED_CHARS: usize = 80;

/// `value` as a message quotes it (between backticks): escaped as `escape_debug` does, so that
/// a control character or line separator in the file cannot forge or hide a line where the
/// message goes, and cut after [`QUOTED_CHARS`] characters, saying how long it was
/// (`abc…` (70000 bytes)). Every value of the file that a message of the config module quotes goes
/// through here, or through [`quoted_as_written`]; what a message tells the operator to write,
/// through [`toml_string`].
pub(crate) fn quoted(value: &str) -> String {
    let (head, cut) = cut_at_quoted_chars(value);
    let mut out = head.escape_debug().to_string();
    if cut {
        out.push_str(&format!("… ({} bytes)", value.len()));
    }
    out
}

/// `text`, a value as the file writes it (quotes and escapes included), cut as [`quoted`] cuts
/// a value, and with only what [`quoted`] escapes but quotes and backslashes escaped
/// ([`escape_raw`]): TOML's own escapes are what the operator wrote, but a literal string may
/// hold a tab and a line that does not parse anything at all.
pub(crate) fn quoted_as_written(text: &str) -> String {
    cut_as_written(text, QUOTED_CHARS)
}

/// `text` cut after `chars` characters, saying how long it was, and escaped as
/// [`quoted_as_written`] escapes it.
fn cut_as_written(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}… ({} bytes)", escape_raw(&text[..end]), text.len()),
        None => escape_raw(text),
    }
}

/// `s` escaped as `escape_debug` escapes it (control characters, line separators, bidi
/// overrides: what could forge or hide a line where a message goes), but for quotes and
/// backslashes, kept as they are: in text already escaped (TOML as written, serde's `{:?}` of
/// a string) they are its escapes, not characters to escape again.
fn escape_raw(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(['\\', '"', '\'']) {
        out.extend(rest[..at].escape_debug());
        out.push_str(&rest[at..=at]);
        rest = &rest[at + 1..];
    }
    out.extend(rest.escape_debug());
    out
}

/// The most bytes of a value, written as TOML with its quotes, that a message telling the
/// operator to write it shows whole ([`toml_string`]): a suggestion is derived from a value of the file, which may be 70 KB, so it
/// is bounded too, but well past the longest the operator means to write.
pub(crate) const WRITE_BYTES: usize = 1024;

/// `value` as a TOML basic string (in double quotes), for a message that says what to write:
/// whole, so that it pastes back into the file as `value`: `"` and `\` escaped as TOML escapes
/// them, and what [`quoted`] escapes (control characters, line separators) as `\uXXXX`, so that
/// it still forges no line where the message goes. [`quoted`] would write `'` as `\'`, which TOML
/// does not take, and cut the value. Past [`WRITE_BYTES`] it is cut as [`quoted`] cuts a value,
/// saying its length and that it is too long to show whole.
pub(crate) fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(WRITE_BYTES) + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\'' => out.push(c),
            c if c.escape_debug().next() == Some('\\') => match u16::try_from(u32::from(c)) {
                Ok(u) => out.push_str(&format!("\\u{u:04X}")),
                Err(_) => out.push_str(&format!("\\U{:08X}", u32::from(c))),
            },
            c => out.push(c),
        }
        // With the closing quote, past the bound.
        if out.len() >= WRITE_BYTES {
            break;
        }
    }
    if out.len() >= WRITE_BYTES {
        let (head, _) = cut_at_quoted_chars(&out);
        return format!("{head}… ({} bytes; too long to show whole)", value.len());
    }
    out.push('"');
    out
}

/// The first [`QUOTED_CHARS`] characters of `s`, and whether that left any out.
fn cut_at_quoted_chars(s: &str) -> (&str, bool) {
    match s.char_indices().nth(QUOTED_CHARS) {
        Some((end, _)) => (&s[..end], true),
        None => (s, false),
    }
}

/// The most characters of the parser's or serde's own words between two quoted parts of its
/// message that [`parser_message`] shows: theirs are shorter ("invalid multi-line basic string,
/// expected "), but a key of the file that holds a backtick puts the rest of it there.
const PARSER_WORDS_CHARS: usize = 4 * QUOTED_CHARS;

/// The parser's or serde's `message`, with each value in it that is quoted (between backticks,
/// or in double quotes as serde writes a string) and longer than [`QUOTED_CHARS`] cut as
/// [`quoted`] cuts one: their messages quote a key or value of the file whole
/// (``unknown field `...` ``, `invalid type: string "..."`). Every part of it is escaped as
/// [`quoted_as_written`] escapes a value: serde writes a key raw (``unknown field `...` ``),
/// control characters and newlines included.
pub(super) fn parser_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().expect("found");
        out.push_str(&cut_as_written(&rest[..open], PARSER_WORDS_CHARS));
        out.push(quote);
        rest = &rest[open + 1..];
        // serde writes a string with `{:?}`: an escaped quote is not its end.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                '\\' if quote == '"' && !escaped => escaped = true,
                c if c == quote && !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        out.push_str(&quoted_as_written(&rest[..end]));
        out.push(quote);
        rest = &rest[end + 1..];
    }
    out.push_str(&cut_as_written(rest, PARSER_WORDS_CHARS));
    out
}
