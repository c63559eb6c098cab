//! Clearer errors for common TOML mistakes, whose parser and serde messages do not say what to
//! write ("invalid float, expected `nan`" for an unquoted word, "invalid type: map, expected a
//! sequence" for `[vip]`, "invalid value: integer `70000`, expected u16"). Used only once the
//! file has been refused, at the offending value, in two ways:
//!
//! - [`for_mistake`] names a mistake found in the file's own text or table structure (a bare
//!   word where a string goes, `[vip]` for `[[vip]]`), which is an error in itself: it does not
//!   depend on what the parser said.
//! - [`reworded`] says the parser's or serde's message again with the key, the value as written
//!   and the form to write. The key and the value come from the file's text at the error's span;
//!   what was expected comes from the message's vocabulary ("expected u16", "expected a
//!   boolean", "duplicate key"). Reading a message is acceptable here because the `toml` crate
//!   is pinned by Cargo.lock and the config tests pin each form it rewrites, so an upgrade that
//!   changes a message fails a test rather than silently degrading; and a message it does not
//!   recognize is kept as it is, so nothing the parser said is lost.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::message::{quoted, quoted_as_written, toml_string};

/// A clearer error than the parser's for a common mistake in `text`, if it holds one: where, and
/// what to write instead.
pub(super) fn for_mistake(text: &str, error_at: Option<usize>) -> Option<(Range<usize>, String)> {
    match DeTable::parse(text) {
        Err(_) => {
            let at = error_at?;
            unquoted_word(text, at).or_else(|| no_single_value(text, at))
        }
        Ok(root) => misshapen(root.get_ref()),
    }
}

/// A syntax error inside a value written as a bare word (`xdp_mode = native`,
/// `address = 198.18.0.1`, or in an inline table `{ address = 198.18.0.11, ... }`): TOML strings
/// need quotes. Only a word that directly follows `key =` is named: one in a list
/// (`interfaces = [eth0]`) is not the value of a key, and `key = "word"` would be wrong there.
fn unquoted_word(text: &str, at: usize) -> Option<(Range<usize>, String)> {
    let at = at.min(text.len());
    if !text.is_char_boundary(at) {
        return None;
    }
    let Range { start: line_start, end: line_end } = line_around(text, at);
    // In an inline table a `key = value` pair runs from the last `{` or `,` to the next `,` or
    // `}`; elsewhere it is the line.
    let before = &text[line_start..at];
    let (start, end) = if before.contains('{') {
        (
            line_start + before.rfind(['{', ',']).map_or(0, |i| i + 1),
            at + text[at..line_end].find([',', '}']).unwrap_or(line_end - at),
        )
    } else {
        (line_start, line_end)
    };
    let pair = &text[start..end];
    let eq = pair.find('=')?;
    let key = pair[..eq].trim();
    let rest = &pair[eq + 1..];
    let value_at = start + eq + 1 + (rest.len() - rest.trim_start().len());
    let value = rest.split('#').next().unwrap_or("").trim();
    let word = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b))
        && !matches!(value, "true" | "false");
    if !bare_key(key) || !word || at < value_at || at > value_at + value.len() {
        return None;
    }
    let write = toml_string(shown(key, value));
    let (shown, key) = (quoted(shown(key, value)), quoted(key));
    Some((
        value_at..value_at + value.len(),
        format!("`{shown}` is not a TOML value: strings need quotes, write {key} = {write}"),
    ))
}

/// What a hint says of `value`, the value of `key`: the value itself, but for a key that holds
/// a secret (`cookie_secret`, `cookie_secret_previous`), whose value must not reach the logs a
/// refused reload's error goes to.
fn shown<'a>(key: &str, value: &'a str) -> &'a str {
    if key.to_ascii_lowercase().contains("secret") { SECRET } else { value }
}

/// What a hint says in place of a secret's value.
const SECRET: &str = "<your secret>";

/// A syntax error in the value of a line `key =` that has none, or `key = 80 80` that has more
/// than one: the parser says "string values must be quoted" of both, though neither is about a
/// string. Only for values without quotes, brackets or braces (whose own errors the parser
/// places and words well enough), and outside inline tables.
fn no_single_value(text: &str, at: usize) -> Option<(Range<usize>, String)> {
    let at = at.min(text.len());
    if !text.is_char_boundary(at) {
        return None;
    }
    let line = line_around(text, at);
    let pair = &text[line.clone()];
    let eq = pair.find('=')?;
    let key = pair[..eq].trim();
    let rest = &pair[eq + 1..];
    let value_at = line.start + eq + 1 + (rest.len() - rest.trim_start().len());
    let value = rest.split('#').next().unwrap_or("").trim();
    if !bare_key(key) || at < value_at || value.bytes().any(|b| b"\"'[]{}".contains(&b)) {
        return None;
    }
    if value.is_empty() {
        return Some((
            line.start + (pair.len() - pair.trim_start().len())..line.start + eq + 1,
            format!(
                "`{} =` has no value: write one after `=` (a string in quotes, a number, true or false, a list in brackets)",
                quoted(key)
            ),
        ));
    }
    // A second word: more than one value.
    value.split_whitespace().nth(1)?;
    let span = value_at..value_at + value.len();
    let value = quoted_as_written(shown(key, value));
    Some((
        span,
        format!(
            "`{} = {value}` has more than one value: a key takes one (a list is written in brackets, [a, b]; a comment starts with #)",
            quoted(key)
        ),
    ))
}

/// Where the line of `text` that holds offset `at` (a char boundary) starts, and where it ends
/// (at its newline, or the end of the text).
fn line_around(text: &str, at: usize) -> Range<usize> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    start..end
}

/// A bare (possibly dotted) TOML key.
fn bare_key(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The parser's or serde's `message` about the value (or key) at `span`, said again with the key,
/// the value as written and what to write, for the forms it knows: a value of the wrong type or
/// out of range ("invalid type: string \"80\", expected u16", "invalid value: integer `70000`,
/// expected u16", "expected a boolean", "expected a string") and a key set twice ("duplicate
/// key"). A number is said with the field's own range (`RANGES`) or values (`FORMS`), not its
/// type's. `None` for any other message, or a value that is not directly the value of a key (an
/// entry of a list): the caller keeps the message as it is.
pub(super) fn reworded(text: &str, span: Range<usize>, message: &str) -> Option<String> {
    let message = message.trim();
    if message == "duplicate key" {
        return duplicate_key(text, span);
    }
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))?;
    // The expected part never holds ", expected "; a string that was found may.
    let (_, expected) = rest.rsplit_once(", expected ")?;
    let mut want = Want::of(expected)?;
    let key = key_before(text, span.start)?;
    // The field's own range where it is narrower than its type's (a weight is 0..=10000): a
    // hint quoting the type's would send the writer to a second error.
    if let (Want::Int { min, max }, Some(&(_, lo, hi))) =
        (&mut want, super::limits::RANGES.iter().find(|(k, ..)| *k == key))
    {
        (*min, *max) = (Some(lo.into()), Some(hi.into()));
    }
    let written = text.get(span)?.trim();
    if written.is_empty() || written.contains('\n') {
        return None;
    }
    // What was written, as TOML reads it. An integer beyond i64 (TOML's) does not read as a
    // value, but serde took it for a number out of the field's range.
    let value = match toml::from_str::<toml::Table>(&format!("v = {written}")) {
        Ok(mut t) => t.remove("v")?,
        Err(_) if matches!(want, Want::Int { .. }) && written.parse::<u128>().is_ok() => {
            toml::Value::Integer(i64::MAX)
        }
        Err(_) => return None,
    };
    // Of a secret key only the form is said (a string is the only form such a key takes).
    let as_string = toml_string(shown(key, written));
    let written = quoted_as_written(shown(key, written));
    // The values of a field that are not one range (`mtu`: 0 or 576..=65535), in its own words.
    let form =
        super::limits::FORMS.iter().find(|(k, ..)| *k == key).map(|&(_, words, ok)| (words, ok));
    let ms = key.ends_with("_ms");
    // The key as the hint says it from here on: a key of the file may be as long as a value.
    let key = &quoted(key);
    let said = format!("`{key}` = {written}");
    Some(match want {
        Want::Int { min, max } => {
            // With its range; `short` leaves out an open one ("0 or more") where it is noise.
            let (what, short) = match form {
                Some((words, _)) => (words.to_owned(), words.to_owned()),
                None => (whole_number(key, min, max, true), whole_number(key, min, max, false)),
            };
            let fits = |n: i128| match form {
                Some((_, ok)) => u64::try_from(n).is_ok_and(ok),
                None => min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m),
            };
            match value {
                // The field's own range may be narrower than its type's (a weight is 0..=10000,
                // checked once the file is read): a negative number is told as such.
                toml::Value::Integer(n) if n < 0 && min.is_some_and(|m| m >= 0) => match form {
                    Some((words, _)) => format!("{said}: write {words}, not negative"),
                    None => format!(
                        "{said}: write {}, not negative",
                        whole_number(key, None, None, false)
                    ),
                },
                toml::Value::Integer(_) => format!("{said} is out of range: {what}"),
                toml::Value::String(s) => match s.trim().parse::<i128>() {
                    Ok(n) if fits(n) => {
                        format!("{said}: write a number without quotes, {key} = {n}")
                    }
                    _ => match milliseconds(&s).filter(|&n| ms && fits(n)) {
                        Some(n) => format!("{said}: {short}, write {key} = {n}"),
                        None if ms => format!("{said}: {short}, e.g. {key} = 1000"),
                        None => format!("{said}: write {short}, without quotes"),
                    },
                },
                toml::Value::Float(f) if f.fract() == 0.0 && fits(f as i128) => {
                    format!("{said}: write a whole number, {key} = {}", f as i128)
                }
                toml::Value::Float(_) => format!("{said} is not a whole number: write {short}"),
                _ => format!("{said}: write {short}"),
            }
        }
        Want::Bool => match value {
            toml::Value::String(s)
                if matches!(s.trim().to_ascii_lowercase().as_str(), "true" | "false") =>
            {
                format!("{said}: write {key} = {}, without quotes", s.trim().to_ascii_lowercase())
            }
            toml::Value::String(_) => format!("{said}: write true or false, without quotes"),
            _ => format!("{said}: write true or false"),
        },
        Want::Str => match value {
            toml::Value::Array(_) | toml::Value::Table(_) => {
                format!("{said}: write one string, in quotes")
            }
            _ => format!("{said}: strings need quotes, write {key} = {as_string}"),
        },
        // What goes in the list is not in the message: no example of an entry.
        Want::List => format!("{said}: write a list, {key} = [...]"),
        Want::Table => format!("{said}: write a table, {key} = {{ ... }}"),
    })
}

/// What serde expected, in the words of its message.
enum Want {
    /// An integer type, with its range (`None`: unbounded on that side, as TOML reads it).
    Int {
        min: Option<i128>,
        max: Option<i128>,
    },
    Bool,
    Str,
    List,
    Table,
}

impl Want {
    fn of(expected: &str) -> Option<Want> {
        let int = |min: i128, max: i128| Some(Want::Int { min: Some(min), max: Some(max) });
        match expected {
            "u8" => int(0, u8::MAX.into()),
            "u16" => int(0, u16::MAX.into()),
            "u32" => int(0, u32::MAX.into()),
            "u64" => Some(Want::Int { min: Some(0), max: None }),
            "i64" => Some(Want::Int { min: None, max: None }),
            "a boolean" => Some(Want::Bool),
            "a string" => Some(Want::Str),
            "a sequence" => Some(Want::List),
            "a map" => Some(Want::Table),
            s if s.starts_with("struct ") => Some(Want::Table),
            _ => None,
        }
    }
}

/// "a whole number[ of milliseconds] 0..=65535" for `key`; an open range ("0 or more") only
/// with `open`.
fn whole_number(key: &str, min: Option<i128>, max: Option<i128>, open: bool) -> String {
    let unit = if key.ends_with("_ms") { " of milliseconds" } else { "" };
    match (min, max) {
        (Some(min), Some(max)) => format!("a whole number{unit} {min}..={max}"),
        (Some(min), None) if open => format!("a whole number{unit}, {min} or more"),
        _ => format!("a whole number{unit}"),
    }
}

/// `s` as milliseconds if it is a whole number with a unit of time (`1s`, `500ms`, `2m`, `1h`).
fn milliseconds(s: &str) -> Option<i128> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let n: i128 = s[..digits].parse().ok()?;
    let per = match s[digits..].trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(per)
}

/// The key whose value starts at `at`: on the same line, after the last `{` or `,` (or the line
/// start) and before an `=` that directly precedes the value. `None` when the value is not
/// directly a key's (an entry of a list).
fn key_before(text: &str, at: usize) -> Option<&str> {
    text.get(..at)?; // a char boundary
    let line = &text[line_around(text, at).start..at];
    let pair = &line[line.rfind(['{', ',']).map_or(0, |i| i + 1)..];
    let key = pair.trim_end().strip_suffix('=')?.trim();
    bare_key(key).then_some(key)
}

/// A key set twice in one table, or a table header given twice; `span` is the second key.
fn duplicate_key(text: &str, span: Range<usize>) -> Option<String> {
    let key = text.get(span.clone())?.trim().trim_matches(['"', '\'']);
    if key.is_empty() || key.contains('\n') {
        return None;
    }
    let Range { start: line_start, end: line_end } = line_around(text, span.start);
    let line = text[line_start..line_end].trim();
    // A header is a line that starts with `[`, the key inside it (not a value in a list).
    let header = line.starts_with('[') && !text[line_start..span.start].contains(['=', '{']);
    Some(match line.strip_prefix('[').filter(|_| header) {
        Some(h) if !h.starts_with('[') => {
            let header = quoted_as_written(&line[..line.find(']').map_or(line.len(), |i| i + 1)]);
            format!("{header} is given twice: keep one {header} and put all its keys there")
        }
        Some(_) => format!("`{}` is defined twice: keep one", quoted(key)),
        None => format!("`{}` is set twice in this table: keep one", quoted(key)),
    })
}

/// A table where the schema has an array of tables or the reverse (`[vip]`, `[[node]]`,
/// `[vip.route]`, `[[vip.health]]`), a backend written as a bare address, a single interface
/// written as a string.
fn misshapen(root: &DeTable<'_>) -> Option<(Range<usize>, String)> {
    for table in ["node", "metrics"] {
        if let Some((span, DeValue::Array(_))) = get(root, table) {
            return Some((
                span,
                format!("write [{table}], not [[{table}]]: there is one {table} table"),
            ));
        }
    }
    if let Some((_, DeValue::Table(node))) = get(root, "node")
        && let Some((span, DeValue::String(s))) = get(node, "interfaces")
    {
        return Some((
            span,
            format!("node.interfaces is a list: write interfaces = [{}]", toml_string(s)),
        ));
    }
    match get(root, "vip") {
        Some((span, DeValue::Table(_))) => {
            return Some((span, "write [[vip]], not [vip]: each VIP is an array entry".to_owned()));
        }
        Some((_, DeValue::Array(vips))) => {
            for vip in vips.iter() {
                let DeValue::Table(vip) = vip.get_ref() else { continue };
                for table in ["health", "l7"] {
                    if let Some((span, DeValue::Array(_))) = get(vip, table) {
                        return Some((
                            span,
                            format!(
                                "write [vip.{table}], not [[vip.{table}]]: a VIP has one {table} table"
                            ),
                        ));
                    }
                }
                if let Some(hint) = backends_hint(get(vip, "backends"), "vip") {
                    return Some(hint);
                }
                match get(vip, "route") {
                    Some((span, DeValue::Table(_))) => {
                        return Some((
                            span,
                            "write [[vip.route]], not [vip.route]: each route is an array entry"
                                .to_owned(),
                        ));
                    }
                    Some((_, DeValue::Array(routes))) => {
                        for route in routes.iter() {
                            let DeValue::Table(route) = route.get_ref() else { continue };
                            if let Some(hint) = backends_hint(get(route, "backends"), "vip.route") {
                                return Some(hint);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    None
}

/// The value of `key` in `t`, with its span.
fn get<'a, 'i>(t: &'a DeTable<'i>, key: &str) -> Option<(Range<usize>, &'a DeValue<'i>)> {
    t.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| (v.span(), v.get_ref()))
}

/// A `backends` value that is not a list of tables.
fn backends_hint(
    backends: Option<(Range<usize>, &DeValue<'_>)>,
    parent: &str,
) -> Option<(Range<usize>, String)> {
    match backends? {
        (_, DeValue::Array(list)) => list.iter().find_map(|b| match b.get_ref() {
            DeValue::String(s) => Some((
                b.span(),
                format!("a backend is a table: write {{ address = {} }}", toml_string(s)),
            )),
            _ => None,
        }),
        (span, DeValue::Table(_)) => Some((
            span,
            format!(
                "`backends` is a list: write backends = [{{ address = \"...\" }}, ...] (or one [[{parent}.backends]] table per backend)"
            ),
        )),
        _ => None,
    }
}
